//! Deployments against a real `kapsel serve`: WASM pods on the real node, the controllers on
//! the store's watch. Replacement of deleted pods, scaling, rolling updates that keep every
//! replica ready, a broken version held at maxSurge and failed at its deadline, undo and
//! automatic rollback, canaries promoted and aborted (by command and on health), garbage
//! collection, and bad input.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const D: &str = "/apis/apps/v1/namespaces/default/deployments";

/// A Deployment of `sleep.wat` pods (idle forever) with `env V=version`.
fn deployment(name: &str, replicas: i32, version: &str, extra_spec: &str) -> String {
    deployment_image(name, replicas, &fixture("sleep.wat"), version, extra_spec)
}

fn deployment_image(
    name: &str,
    replicas: i32,
    image: &str,
    version: &str,
    extra_spec: &str,
) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: {name}}}\n{extra_spec}  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      containers:\n      - name: main\n        image: {image}\n        env: [{{name: V, value: \"{version}\"}}]\n"
    )
}

/// A version that runs but is never ready: its readiness probe knocks on a closed port.
fn never_ready(name: &str, replicas: i32, version: &str, extra_spec: &str) -> String {
    deployment(name, replicas, version, extra_spec)
        + "        readinessProbe:\n          tcpSocket: {port: 1}\n          periodSeconds: 1\n"
}

/// The live (not terminating, not finished) pods of a Deployment: (name, ready, V).
async fn pods_of(k: &Kapsel, app: &str) -> Vec<(String, bool, String)> {
    live_pods(k, app)
        .await
        .into_iter()
        .filter(|p| !matches!(phase(p), "Succeeded" | "Failed"))
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                pod_ready(&p),
                p["spec"]["containers"][0]["env"][0]["value"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

async fn deploy(k: &Kapsel, name: &str) -> Value {
    let (code, v) = k.get(&format!("{D}/{name}")).await;
    assert_eq!(code, 200, "{v}");
    v
}

/// Poll until `pred` holds over the Deployment's live pods; panics after `secs`.
async fn wait_pods(
    k: &Kapsel,
    app: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&[(String, bool, String)]) -> bool,
) -> Vec<(String, bool, String)> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = vec![];
    while Instant::now() < deadline {
        last = pods_of(k, app).await;
        if pred(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{what}: not reached in {secs}s; pods: {last:?}\ndeployment: {}",
        deploy(k, app).await
    );
}

async fn wait_deploy(
    k: &Kapsel,
    name: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = deploy(k, name).await;
        if pred(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not reached in {secs}s; deployment: {last:#}");
}

fn all_ready(p: &[(String, bool, String)], n: usize, version: &str) -> bool {
    p.len() == n && p.iter().all(|(_, r, v)| *r && v == version)
}

fn progressing(d: &Value) -> (String, String) {
    let c = d["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Progressing").cloned())
        .unwrap_or_default();
    (
        c["status"].as_str().unwrap_or_default().to_string(),
        c["reason"].as_str().unwrap_or_default().to_string(),
    )
}

async fn deployment_events(k: &Kapsel, name: &str) -> Vec<(String, String)> {
    k.events_for(name)
        .await
        .into_iter()
        .filter(|e| e["involvedObject"]["kind"] == "Deployment")
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn cli_ok(k: &Kapsel, args: &[&str]) -> String {
    let out = k.cli(args);
    assert!(
        out.status.success(),
        "kapsel {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_pods_are_replaced_within_a_second_scale_and_cascade_delete() {
    let k = Kapsel::start();
    k.apply("web", &deployment("web", 3, "1", ""));
    let pods = wait_pods(&k, "web", 20, "3 ready", |p| all_ready(p, 3, "1")).await;
    let d = wait_deploy(&k, "web", 10, "status", |d| {
        d["status"]["readyReplicas"] == 3
    })
    .await;
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );

    // Delete one pod: a new one is ready within 1 s.
    let victim = pods[0].0.clone();
    let before: BTreeSet<String> = pods.iter().map(|p| p.0.clone()).collect();
    let t0 = Instant::now();
    let (code, _) = k
        .send(
            reqwest::Method::DELETE,
            &format!("/api/v1/namespaces/default/pods/{victim}"),
            None,
        )
        .await;
    assert_eq!(code, 200);
    let after = wait_pods(&k, "web", 10, "replacement ready", |p| {
        all_ready(p, 3, "1") && p.iter().any(|(n, _, _)| !before.contains(n))
    })
    .await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "replacement took {took:?}");
    assert!(!after.iter().any(|(n, _, _)| *n == victim));
    let rs_events: Vec<Value> = k.get("/api/v1/namespaces/default/events").await.1["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(rs_events
        .iter()
        .any(|e| e["involvedObject"]["kind"] == "ReplicaSet" && e["reason"] == "SuccessfulCreate"));

    // Scale up and down with the CLI.
    let out = cli_ok(&k, &["scale", "deployment", "web", "--replicas", "6"]);
    assert!(out.contains("scaled"), "{out}");
    wait_pods(&k, "web", 20, "6 ready", |p| all_ready(p, 6, "1")).await;
    cli_ok(&k, &["scale", "deployment/web", "--replicas", "2"]);
    wait_pods(&k, "web", 20, "2 left", |p| all_ready(p, 2, "1")).await;
    let table = cli_ok(&k, &["get", "deployments"]);
    assert!(table.contains("READY") && table.contains("web"), "{table}");
    wait_deploy(&k, "web", 10, "status 2/2", |d| {
        d["status"]["replicas"] == 2 && d["status"]["availableReplicas"] == 2
    })
    .await;

    // Deleting the Deployment removes its ReplicaSets and pods.
    cli_ok(&k, &["delete", "deployment", "web"]);
    wait_pods(&k, "web", 20, "pods gone", |p| p.is_empty()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = k.get("/apis/apps/v1/namespaces/default/replicasets").await;
        if v["items"].as_array().map(|a| a.is_empty()).unwrap_or(false) {
            break;
        }
        assert!(Instant::now() < deadline, "replicasets left: {v}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_with_max_unavailable_0_never_drops_below_5_ready() {
    let k = Kapsel::start();
    // minReadySeconds makes each step wait 1 s, so the update is long enough to watch.
    let strategy = "  minReadySeconds: 1\n  strategy:\n    type: RollingUpdate\n    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}\n";
    k.apply("web", &deployment("web", 5, "1", strategy));
    wait_pods(&k, "web", 20, "5 ready", |p| all_ready(p, 5, "1")).await;
    wait_deploy(&k, "web", 10, "available", |d| {
        d["status"]["availableReplicas"] == 5
    })
    .await;

    // Version 2, its command line recorded as the change cause.
    let v2 = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(v2.path(), deployment("web", 5, "2", strategy)).unwrap();
    let v2_path = v2.path().to_str().unwrap();
    cli_ok(&k, &["apply", "-f", v2_path, "--record"]);
    let t0 = Instant::now();
    let (mut samples, mut min_ready, mut max_live) = (0, usize::MAX, 0);
    loop {
        let p = pods_of(&k, "web").await;
        let ready = p.iter().filter(|x| x.1).count();
        min_ready = min_ready.min(ready);
        max_live = max_live.max(p.len());
        samples += 1;
        if all_ready(&p, 5, "2") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "rollout did not finish: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        samples >= 20,
        "only {samples} samples: the rollout was too quick to observe"
    );
    assert!(min_ready >= 5, "ready replicas dropped to {min_ready}");
    assert!(
        max_live <= 6,
        "{max_live} live pods: more than replicas + maxSurge"
    );
    let d = wait_deploy(&k, "web", 10, "complete", |d| {
        progressing(d).1 == "NewReplicaSetAvailable" && d["status"]["updatedReplicas"] == 5
    })
    .await;
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "2"
    );
    let status = cli_ok(
        &k,
        &["rollout", "status", "deployment/web", "--timeout", "5s"],
    );
    assert!(status.contains("successfully rolled out"), "{status}");
    // Revisions can be told apart: what changed, and the recorded cause.
    let hist = cli_ok(&k, &["rollout", "history", "deployment/web"]);
    let row = |r: &str| {
        hist.lines()
            .find(|l| l.starts_with(&format!("{r} ")))
            .unwrap_or_else(|| panic!("no revision {r}: {hist}"))
            .to_string()
    };
    assert!(row("1").ends_with("<none>"), "{hist}");
    assert!(row("2").contains("env V=2"), "{hist}");
    assert!(
        row("2").contains(&format!(
            "kapsel --server {} apply -f {v2_path} --record",
            k.url
        )),
        "{hist}"
    );
    let ev = deployment_events(&k, "web").await;
    assert!(
        ev.iter().filter(|(r, _)| r == "ScalingReplicaSet").count() >= 10,
        "{ev:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_version_stops_at_max_surge_fails_at_deadline_and_undo_restores() {
    let k = Kapsel::start();
    let spec = "  progressDeadlineSeconds: 3\n  revisionHistoryLimit: 5\n  strategy:\n    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}\n";
    k.apply("web", &deployment("web", 5, "1", spec));
    wait_pods(&k, "web", 20, "5 ready", |p| all_ready(p, 5, "1")).await;
    wait_deploy(&k, "web", 10, "complete", |d| {
        progressing(d).1 == "NewReplicaSetAvailable"
    })
    .await;

    // Version 2 runs but never becomes ready.
    k.apply("web", &never_ready("web", 5, "2", spec));
    let t0 = Instant::now();
    let mut max_new = 0;
    let d = loop {
        let p = pods_of(&k, "web").await;
        let old_ready = p.iter().filter(|x| x.2 == "1" && x.1).count();
        let new = p.iter().filter(|x| x.2 == "2").count();
        max_new = max_new.max(new);
        assert!(
            new <= 1,
            "{new} pods of the broken version: more than maxSurge"
        );
        assert_eq!(old_ready, 5, "old replicas must stay ready: {p:?}");
        let d = deploy(&k, "web").await;
        if progressing(&d) == ("False".into(), "ProgressDeadlineExceeded".into()) {
            break d;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "never timed out: {d:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(max_new, 1, "the broken version never got its surge pod");
    assert!(
        t0.elapsed() >= Duration::from_millis(2500),
        "failed before its deadline: {:?}",
        t0.elapsed()
    );
    assert_eq!(d["status"]["availableReplicas"], 5);
    let ev = deployment_events(&k, "web").await;
    assert!(
        ev.iter().any(|(r, _)| r == "ProgressDeadlineExceeded"),
        "{ev:?}"
    );
    let out = k.cli(&["rollout", "status", "deployment/web", "--timeout", "5s"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exceeded its progress deadline"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Undo restores the previous template; the broken pod goes away.
    let out = cli_ok(&k, &["rollout", "undo", "deployment/web"]);
    assert!(out.contains("rolled back"), "{out}");
    wait_pods(&k, "web", 20, "back to v1", |p| all_ready(p, 5, "1")).await;
    let d = wait_deploy(&k, "web", 10, "complete again", |d| {
        progressing(d).1 == "NewReplicaSetAvailable"
    })
    .await;
    assert!(d["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .ends_with("sleep.wat"));
    // Revision 1's ReplicaSet became revision 3.
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    // Undo with nothing before revision 1 of a fresh deployment is a clear error.
    k.apply("solo", &deployment("solo", 1, "1", ""));
    wait_pods(&k, "solo", 20, "solo ready", |p| all_ready(p, 1, "1")).await;
    wait_deploy(&k, "solo", 10, "solo revision", |d| {
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "1"
    })
    .await;
    let out = k.cli(&["rollout", "undo", "deployment/solo"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no rollout history"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rollback_after_the_progress_deadline() {
    let k = Kapsel::start();
    let spec = "  progressDeadlineSeconds: 2\n  autoRollback: true\n  strategy:\n    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}\n";
    k.apply("api", &deployment("api", 3, "1", spec));
    wait_pods(&k, "api", 20, "3 ready", |p| all_ready(p, 3, "1")).await;
    wait_deploy(&k, "api", 10, "complete", |d| {
        progressing(d).1 == "NewReplicaSetAvailable"
    })
    .await;
    k.apply("api", &never_ready("api", 3, "2", spec));
    // `apply && rollout status` must not ship a release that was rolled back.
    let status = {
        let url = k.url.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(common::bin())
                .args(["--server", &url, "rollout", "status", "deployment/api"])
                .args(["--timeout", "60s"])
                .output()
                .unwrap()
        })
    };
    wait_deploy(&k, "api", 10, "a rollout of revision 2", |d| {
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    })
    .await;
    // Without anyone asking, the template goes back and the rollout completes.
    let d = wait_deploy(&k, "api", 20, "rolled back", |d| {
        d["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] == "1"
            && progressing(d).1 == "NewReplicaSetAvailable"
    })
    .await;
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    wait_pods(&k, "api", 20, "only v1", |p| all_ready(p, 3, "1")).await;
    let status = status.await.unwrap();
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(
        !status.status.success() && err.contains("rolled back") && err.contains("revision 2"),
        "rollout status of a rolled-back release: exit {:?}, stdout {}, stderr {err}",
        status.status.code(),
        String::from_utf8_lossy(&status.stdout)
    );
    let ev = deployment_events(&k, "api").await;
    assert!(
        ev.iter()
            .any(|(r, m)| r == "DeploymentRollback" && m.contains("to revision 1")),
        "{ev:?}"
    );

    // Long after it completed (past the 2 s deadline), scaling is progress, not a timeout.
    let settled = Instant::now();
    wait_deploy(&k, "api", 10, "complete", |d| {
        progressing(d).1 == "NewReplicaSetAvailable"
    })
    .await;
    while settled.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cli_ok(&k, &["scale", "deployment/api", "--replicas", "5"]);
    wait_pods(&k, "api", 20, "5 of v1", |p| all_ready(p, 5, "1")).await;
    wait_deploy(&k, "api", 10, "complete at 5", |d| {
        progressing(d).1 == "NewReplicaSetAvailable" && d["status"]["availableReplicas"] == 5
    })
    .await;
    let rollbacks =
        |ev: &[(String, String)]| ev.iter().filter(|(r, _)| r == "DeploymentRollback").count();
    assert_eq!(rollbacks(&deployment_events(&k, "api").await), 1);

    // Two bad releases in a row go back to the good one, not to each other.
    k.apply("api", &never_ready("api", 5, "2", spec));
    wait_deploy(&k, "api", 10, "revision 4", |d| {
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "4"
    })
    .await;
    k.apply("api", &never_ready("api", 5, "3", spec));
    let d = wait_deploy(&k, "api", 30, "back to v1", |d| {
        d["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] == "1"
            && progressing(d).1 == "NewReplicaSetAvailable"
    })
    .await;
    assert_eq!(d["status"]["availableReplicas"], 5);
    wait_pods(&k, "api", 20, "only v1 again", |p| all_ready(p, 5, "1")).await;
    assert_eq!(rollbacks(&deployment_events(&k, "api").await), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_promoted_by_command_then_aborted_by_command() {
    let k = Kapsel::start();
    let spec = "  strategy:\n    type: Canary\n    canary: {replicas: 1, maxSurge: 1, maxUnavailable: 0}\n";
    k.apply("shop", &deployment("shop", 4, "1", spec));
    wait_pods(&k, "shop", 20, "4 ready", |p| all_ready(p, 4, "1")).await;

    // v2: one canary beside the 4 old pods, and it stays so until promoted.
    k.apply("shop", &deployment("shop", 4, "2", spec));
    wait_pods(&k, "shop", 20, "1 canary", |p| {
        p.len() == 5 && p.iter().filter(|x| x.2 == "2" && x.1).count() == 1
    })
    .await;
    let d = wait_deploy(&k, "shop", 10, "canary status", |d| {
        d["status"]["canary"]["ready"] == 1
    })
    .await;
    assert_eq!(d["status"]["canary"]["desired"], 1);
    assert_eq!(progressing(&d).1, "CanaryWaitingForPromotion");
    let status = cli_ok(
        &k,
        &["rollout", "status", "deployment/shop", "--watch=false"],
    );
    assert!(status.contains("canar"), "{status}");
    let held = Instant::now();
    while held.elapsed() < Duration::from_millis(1500) {
        let p = pods_of(&k, "shop").await;
        assert_eq!(p.iter().filter(|x| x.2 == "2").count(), 1, "{p:?}");
        assert_eq!(p.iter().filter(|x| x.2 == "1" && x.1).count(), 4, "{p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cli_ok(&k, &["rollout", "promote", "deployment/shop"]);
    assert!(out.contains("promoted"), "{out}");
    wait_pods(&k, "shop", 20, "all v2", |p| all_ready(p, 4, "2")).await;
    wait_deploy(&k, "shop", 10, "complete", |d| {
        progressing(d).1 == "NewReplicaSetAvailable"
    })
    .await;

    // v3: abort the canary; v2 stays.
    k.apply("shop", &deployment("shop", 4, "3", spec));
    wait_pods(&k, "shop", 20, "v3 canary", |p| {
        p.iter().filter(|x| x.2 == "3" && x.1).count() == 1
    })
    .await;
    // A newer template replaces the waiting canary: v3's pod goes, v2 stays at 4.
    k.apply("shop", &deployment("shop", 4, "3b", spec));
    wait_pods(&k, "shop", 20, "v3b canary replaces v3", |p| {
        p.iter().filter(|x| x.2 == "3b" && x.1).count() == 1
            && !p.iter().any(|x| x.2 == "3")
            && p.iter().filter(|x| x.2 == "2" && x.1).count() == 4
    })
    .await;
    let out = k.cli(&["rollout", "promote", "deployment/nope"]);
    assert!(!out.status.success());
    let out = cli_ok(&k, &["rollout", "abort", "deployment/shop"]);
    assert!(out.contains("aborted"), "{out}");
    wait_pods(&k, "shop", 20, "canary gone", |p| all_ready(p, 4, "2")).await;
    let d = deploy(&k, "shop").await;
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"],
        "2"
    );
    let out = k.cli(&["rollout", "abort", "deployment/shop"]);
    assert!(!out.status.success(), "abort without a canary must fail");

    // The aborted template applied again is a canary again, not a full rollout.
    k.apply("shop", &deployment("shop", 4, "3b", spec));
    wait_pods(&k, "shop", 20, "v3b canary again", |p| {
        p.iter().filter(|x| x.2 == "3b" && x.1).count() == 1
    })
    .await;
    let held = Instant::now();
    while held.elapsed() < Duration::from_millis(1500) {
        let p = pods_of(&k, "shop").await;
        assert_eq!(p.iter().filter(|x| x.2 == "3b").count(), 1, "{p:?}");
        assert_eq!(p.iter().filter(|x| x.2 == "2" && x.1).count(), 4, "{p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cli_ok(&k, &["rollout", "promote", "deployment/shop"]);
    assert!(out.contains("promoted"), "{out}");
    wait_pods(&k, "shop", 20, "all v3b", |p| all_ready(p, 4, "3b")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_auto_promoted_when_healthy_and_auto_aborted_when_crashing() {
    let k = Kapsel::start();
    let spec = "  progressDeadlineSeconds: 30\n  autoRollback: true\n  strategy:\n    type: Canary\n    canary: {replicas: \"50%\", autoPromote: true, healthySeconds: 1}\n";
    k.apply("pay", &deployment("pay", 4, "1", spec));
    wait_pods(&k, "pay", 20, "4 ready", |p| all_ready(p, 4, "1")).await;
    k.apply("pay", &deployment("pay", 4, "2", spec));
    wait_pods(&k, "pay", 30, "auto-promoted to v2", |p| {
        all_ready(p, 4, "2")
    })
    .await;
    let ev = deployment_events(&k, "pay").await;
    assert!(ev.iter().any(|(r, _)| r == "CanaryPromoted"), "{ev:?}");

    // A crashing canary (2 pods: 50% of 4) is aborted on its own, long before the deadline.
    k.apply(
        "pay",
        &deployment_image("pay", 4, &fixture("trap.wat"), "3", spec),
    );
    let t0 = Instant::now();
    wait_deploy(&k, "pay", 20, "aborted", |d| {
        d["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] == "2"
            && d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "4"
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(20));
    wait_pods(&k, "pay", 20, "v2 only", |p| all_ready(p, 4, "2")).await;
    let ev = deployment_events(&k, "pay").await;
    assert!(ev.iter().any(|(r, _)| r == "CanaryAborted"), "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_deployments_are_rejected_with_the_field_named() {
    let k = Kapsel::start();
    let post = |body: Value| {
        let k = &k;
        async move {
            k.send(reqwest::Method::POST, D, Some(&body.to_string()))
                .await
        }
    };
    let base = || deployment_json("bad", 2);
    // Selector that does not match the template's labels.
    let mut d = base();
    d["spec"]["selector"]["matchLabels"]["app"] = "other".into();
    let (code, v) = post(d).await;
    assert_eq!(code, 422, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("spec.template.metadata.labels"),
        "{v}"
    );
    // Invalid strategy values.
    for (strategy, field) in [
        (
            serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}),
            "spec.strategy.rollingUpdate.maxUnavailable",
        ),
        (
            serde_json::json!({"rollingUpdate": {"maxSurge": "lots"}}),
            "spec.strategy.rollingUpdate.maxSurge",
        ),
        (
            serde_json::json!({"rollingUpdate": {"maxUnavailable": "120%"}}),
            "spec.strategy.rollingUpdate.maxUnavailable",
        ),
        (
            serde_json::json!({"type": "Recreate", "rollingUpdate": {"maxSurge": 1}}),
            "spec.strategy.rollingUpdate",
        ),
        (
            serde_json::json!({"type": "Canary", "canary": {"replicas": "0"}}),
            "spec.strategy.canary.replicas",
        ),
    ] {
        let mut d = base();
        d["spec"]["strategy"] = strategy.clone();
        let (code, v) = post(d).await;
        assert_eq!(code, 422, "{strategy}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "{strategy}: {v}"
        );
    }
    // An unknown strategy type or field is a 400 that names it.
    let mut d = base();
    d["spec"]["strategy"] = serde_json::json!({"type": "BlueGreen"});
    let (code, v) = post(d).await;
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("BlueGreen"), "{v}");
    let mut d = base();
    d["spec"]["replicaz"] = 3.into();
    let (code, v) = post(d).await;
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("replicaz"), "{v}");
    let mut d = base();
    d["spec"]["replicas"] = (-1).into();
    assert_eq!(post(d).await.0, 422);
    // Through the CLI: the manifest error names the field and the line.
    let out = k.try_apply(
        "typo",
        &deployment("typo", 1, "1", "  strategy:\n    typ: Recreate\n"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("typ") && err.contains(":10:"), "{err}");
    let out = k.try_apply(
        "mismatch",
        &deployment("mismatch", 1, "1", "")
            .replace("matchLabels: {app: mismatch}", "matchLabels: {app: x}"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("selector"));

    // A valid one, then: the selector is immutable, negative scale is refused.
    let (code, created) = post(base()).await;
    assert_eq!(code, 201, "{created}");
    let mut upd = created.clone();
    upd["spec"]["selector"]["matchLabels"]["tier"] = "x".into();
    upd["spec"]["template"]["metadata"]["labels"]["tier"] = "x".into();
    let (code, v) = k
        .send(
            reqwest::Method::PUT,
            &format!("{D}/bad"),
            Some(&upd.to_string()),
        )
        .await;
    assert_eq!(code, 422, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("spec.selector"),
        "{v}"
    );
    let (code, _) = k
        .send(
            reqwest::Method::PUT,
            &format!("{D}/bad/scale"),
            Some(r#"{"spec":{"replicas":-3}}"#),
        )
        .await;
    assert_eq!(code, 422);
    let out = k.cli(&["scale", "deployment", "missing", "--replicas", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

fn deployment_json(name: &str, replicas: i32) -> Value {
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": fixture("sleep.wat")}]}}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_deployment_rolls_with_exec_readiness_and_stays_ready() {
    let k = Kapsel::start();
    let yaml = |v: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: box\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: box}}\n  strategy:\n    rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}\n  template:\n    metadata:\n      labels: {{app: box}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: {BUSYBOX}\n        imagePullPolicy: Never\n        command: [sh, -c, 'sleep 1; touch /tmp/ready; exec sleep 3600']\n        env: [{{name: V, value: \"{v}\"}}]\n        readinessProbe:\n          exec: {{command: [cat, /tmp/ready]}}\n          periodSeconds: 1\n"
        )
    };
    k.apply("box", &yaml("1"));
    wait_pods(&k, "box", 60, "2 ready OCI pods", |p| all_ready(p, 2, "1")).await;
    k.apply("box", &yaml("2"));
    let t0 = Instant::now();
    let mut min_ready = usize::MAX;
    loop {
        let p = pods_of(&k, "box").await;
        min_ready = min_ready.min(p.iter().filter(|x| x.1).count());
        if all_ready(&p, 2, "2") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "rollout stuck: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(min_ready >= 2, "ready OCI replicas dropped to {min_ready}");
    // The readiness probe held each new pod back for about a second: the rollout took a while.
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    cli_ok(&k, &["delete", "deployment", "box"]);
    wait_pods(&k, "box", 60, "OCI pods gone", |p| p.is_empty()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !docker_ids(&format!("io.kapsel.node={}", k.node)).is_empty() {
        assert!(Instant::now() < deadline, "containers left behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
