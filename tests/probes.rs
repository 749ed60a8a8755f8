//! Liveness, readiness and startup probes on real pods: WASM modules and components (tcpSocket
//! from inside the pod's network), OCI containers through Docker (exec, httpGet against busybox
//! httpd), restarts and events on failure, and validation of probe fields. Every wait is a
//! poll with a deadline; the state a test sets up (a file in a container) is made with
//! `docker exec`, so nothing depends on timing. Exec probes get `timeoutSeconds: 5`: the
//! suite runs beside others on two cores, and a slow daemon must not read as a failed probe.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

fn pod(name: &str, policy: &str, body: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: {policy}\n  terminationGracePeriodSeconds: 1\n{body}"
    )
}

fn busybox(name: &str, script: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n    command: [\"sh\", \"-c\", {}]\n{extra}",
        serde_json::to_string(script).unwrap()
    )
}

fn cstatus(p: &Value) -> &Value {
    &p["status"]["containerStatuses"][0]
}

fn running(p: &Value) -> bool {
    !cstatus(p)["state"]["running"].is_null()
}

fn restarts(p: &Value) -> i64 {
    cstatus(p)["restartCount"].as_i64().unwrap_or(0)
}

fn pod_ready(p: &Value) -> bool {
    p["status"]["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .unwrap_or(false)
}

/// Wait for an event on the pod with this reason whose message contains `needle`.
async fn wait_event(k: &Kapsel, pod: &str, reason: &str, needle: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let evs = k.events_for(pod).await;
        if let Some(e) = evs
            .iter()
            .find(|e| e["reason"] == reason && e["message"].as_str().unwrap_or("").contains(needle))
        {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} event containing {needle:?} for {pod} in {secs}s; events:\n{}",
            serde_json::to_string_pretty(&evs).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `docker exec` in the pod's first container; panics if the command fails.
fn docker_exec(p: &Value, argv: &[&str]) {
    let c = cstatus(p);
    let id = c["containerID"]
        .as_str()
        .or_else(|| c["containerId"].as_str())
        .and_then(|s| s.strip_prefix("docker://"))
        .expect("a docker container id")
        .to_string();
    let out = Command::new("docker")
        .arg("exec")
        .arg(&id)
        .args(argv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker exec {argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// For `secs`, the pod keeps satisfying `pred` (polled); returns the last object seen.
async fn holds_for(k: &Kapsel, name: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut last = Value::Null;
    while Instant::now() < until {
        let p = k.pod(name).await.expect("pod exists");
        assert!(
            pred(&p),
            "pod {name} left the expected state:\n{}",
            serde_json::to_string_pretty(&p).unwrap()
        );
        last = p;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread")]
async fn wasm_liveness_failure_restarts_while_a_healthy_component_stays_ready() {
    let echo = component("tests/fixtures/echo-server");
    let k = Kapsel::start();

    // A preview-1 module (no namespace: the node's network) probed on a port nobody listens on.
    let closed = free_port();
    let sleeper = pod(
        "dead",
        "Always",
        &format!(
            "  containers:\n  - name: main\n    image: {}\n    livenessProbe:\n      tcpSocket: {{port: {closed}}}\n      periodSeconds: 1\n      failureThreshold: 1\n",
            fixture("sleep.wat")
        ),
    );
    k.apply("dead", &sleeper);

    // A component listening on its declared port in its own namespace, probed on that port.
    let port = free_port();
    let probe =
        "      tcpSocket: {port: echo}\n      periodSeconds: 1\n      failureThreshold: 3\n";
    let healthy = pod(
        "alive",
        "Always",
        &format!(
            "  containers:\n  - name: echo\n    image: {echo}\n    env: [{{name: PORT, value: \"{port}\"}}]\n    ports: [{{name: echo, containerPort: {port}}}]\n    livenessProbe:\n{probe}    readinessProbe:\n{probe}"
        ),
    );
    k.apply("alive", &healthy);

    let p = k.wait_pod("dead", 60, |p| restarts(p) >= 2).await;
    let last = &cstatus(&p)["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 137, "{p}");
    assert!(
        last["message"]
            .as_str()
            .unwrap_or("")
            .contains("liveness probe failed"),
        "{p}"
    );
    let e = wait_event(&k, "dead", "Unhealthy", "Liveness probe failed", 10).await;
    assert_eq!(e["type"], "Warning");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{closed}")),
        "{e}"
    );
    let e = wait_event(
        &k,
        "dead",
        "Killing",
        "Container main failed liveness probe, will be restarted",
        10,
    )
    .await;
    assert_eq!(e["type"], "Normal");

    // The component becomes Ready (its readiness probe connects inside the pod's namespace)...
    let p = k
        .wait_pod("alive", 180, |p| {
            pod_ready(p) && cstatus(p)["ready"] == true
        })
        .await;
    assert_eq!(restarts(&p), 0);
    assert!(k.logs("alive", "echo").await.contains("client connected"));
    // ...and several liveness periods later it is still running, Ready, never restarted.
    holds_for(&k, "alive", 4, |p| {
        restarts(p) == 0 && running(p) && pod_ready(p)
    })
    .await;
    assert!(!k
        .events_for("alive")
        .await
        .iter()
        .any(|e| e["reason"] == "Unhealthy" || e["reason"] == "Killing"));
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_exec_probe_gates_ready_without_restarting() {
    let k = Kapsel::start();
    let probe = "    readinessProbe:\n      exec: {command: [cat, /tmp/ready]}\n      periodSeconds: 1\n      timeoutSeconds: 5\n      failureThreshold: 1\n";
    k.apply(
        "gated",
        &pod(
            "gated",
            "Always",
            &format!(
                "  containers:\n{}",
                busybox("app", "exec sleep 3600", probe)
            ),
        ),
    );
    // Running, its probe has failed (the event says why), and not Ready.
    let p = k.wait_pod("gated", 60, running).await;
    let e = wait_event(&k, "gated", "Unhealthy", "Readiness probe failed", 20).await;
    assert!(e["message"].as_str().unwrap().contains("/tmp/ready"), "{e}");
    let p2 = k.pod("gated").await.unwrap();
    assert!(running(&p2) && cstatus(&p2)["ready"] == false && !pod_ready(&p2));
    assert_eq!(cstatus(&p2)["started"], true);
    // The file appears: Ready.
    docker_exec(&p, &["touch", "/tmp/ready"]);
    let t = Instant::now();
    k.wait_pod("gated", 20, pod_ready).await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // It goes away: not Ready again, and the container is not restarted for it.
    docker_exec(&p, &["rm", "/tmp/ready"]);
    let p = k.wait_pod("gated", 20, |p| !pod_ready(p)).await;
    assert!(running(&p));
    assert_eq!(restarts(&p), 0);
    // One failure event per transition, not one per period.
    holds_for(&k, "gated", 3, |p| !pod_ready(p) && restarts(p) == 0).await;
    let fails: Vec<Value> = k
        .events_for("gated")
        .await
        .into_iter()
        .filter(|e| e["reason"] == "Unhealthy")
        .collect();
    let count: i64 = fails.iter().map(|e| e["count"].as_i64().unwrap_or(1)).sum();
    assert_eq!(count, 2, "{fails:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn http_get_readiness_against_busybox_httpd() {
    let k = Kapsel::start();
    let serve = "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www";
    let probe = |path: &str| {
        format!("    ports: [{{name: http, containerPort: 8080}}]\n    readinessProbe:\n      httpGet: {{path: {path}, port: http}}\n      periodSeconds: 1\n      failureThreshold: 1\n")
    };
    k.apply(
        "web",
        &pod(
            "web",
            "Always",
            &format!(
                "  containers:\n{}",
                busybox("web", serve, &probe("/index.html"))
            ),
        ),
    );
    k.apply(
        "web404",
        &pod(
            "web404",
            "Always",
            &format!(
                "  containers:\n{}",
                busybox("web", serve, &probe("/missing"))
            ),
        ),
    );
    let p = k.wait_pod("web", 60, pod_ready).await;
    assert_eq!(cstatus(&p)["ready"], true);
    assert_eq!(restarts(&p), 0);
    // A 404 is a failure: running, never Ready, and the event carries the status code.
    wait_event(&k, "web404", "Unhealthy", "statuscode: 404", 60).await;
    let p = k.pod("web404").await.unwrap();
    assert!(running(&p) && !pod_ready(&p) && cstatus(&p)["ready"] == false);
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_exec_liveness_failure_kills_and_restarts() {
    let k = Kapsel::start();
    let probe = "    livenessProbe:\n      exec: {command: [test, -f, /tmp/healthy]}\n      periodSeconds: 1\n      timeoutSeconds: 5\n      failureThreshold: 2\n";
    k.apply(
        "sick",
        &pod(
            "sick",
            "Always",
            &format!(
                "  containers:\n{}",
                busybox("app", "exec sleep 3600", probe)
            ),
        ),
    );
    let p = k.wait_pod("sick", 60, |p| restarts(p) >= 1).await;
    let last = &cstatus(&p)["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 137, "{p}");
    assert!(
        last["message"]
            .as_str()
            .unwrap_or("")
            .contains("liveness probe failed"),
        "{p}"
    );
    let e = wait_event(&k, "sick", "Unhealthy", "Liveness probe failed", 10).await;
    assert!(
        e["message"].as_str().unwrap().contains("exited with 1"),
        "{e}"
    );
    wait_event(
        &k,
        "sick",
        "Killing",
        "Container app failed liveness probe, will be restarted",
        10,
    )
    .await;
    // The restarted container is probed afresh: made healthy, it stays up.
    let p = k
        .wait_pod("sick", 60, |p| running(p) && restarts(p) >= 1)
        .await;
    docker_exec(&p, &["touch", "/tmp/healthy"]);
    let n = restarts(&p);
    holds_for(&k, "sick", 4, |p| restarts(p) == n && running(p)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_probe_holds_back_liveness_and_readiness() {
    let k = Kapsel::start();
    let check = "{command: [cat, /tmp/started]}";
    let probes = format!(
        "    startupProbe:\n      exec: {check}\n      periodSeconds: 1\n      timeoutSeconds: 5\n      failureThreshold: 60\n    livenessProbe:\n      exec: {check}\n      periodSeconds: 1\n      timeoutSeconds: 5\n      failureThreshold: 1\n    readinessProbe:\n      exec: {check}\n      periodSeconds: 1\n      timeoutSeconds: 5\n      failureThreshold: 1\n"
    );
    k.apply(
        "slow",
        &pod(
            "slow",
            "Always",
            &format!(
                "  containers:\n{}",
                busybox("app", "exec sleep 3600", &probes)
            ),
        ),
    );
    let p = k.wait_pod("slow", 60, running).await;
    // Not started yet: not Ready, and the liveness probe (which would fail at once) does not
    // run, so the container is not restarted.
    holds_for(&k, "slow", 3, |p| {
        running(p)
            && cstatus(p)["started"] == false
            && cstatus(p)["ready"] == false
            && restarts(p) == 0
    })
    .await;
    docker_exec(&p, &["touch", "/tmp/started"]);
    let p = k
        .wait_pod("slow", 20, |p| {
            cstatus(p)["started"] == true && pod_ready(p)
        })
        .await;
    assert_eq!(restarts(&p), 0);
    assert!(!k
        .events_for("slow")
        .await
        .iter()
        .any(|e| e["reason"] == "Unhealthy"));
    // From now on liveness runs: take the file away and the container is restarted.
    docker_exec(&p, &["rm", "/tmp/started"]);
    k.wait_pod("slow", 30, |p| restarts(p) >= 1).await;
    wait_event(&k, "slow", "Unhealthy", "Liveness probe failed", 10).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_startup_probe_restarts_the_container() {
    let k = Kapsel::start();
    let closed = free_port();
    k.apply(
        "never",
        &pod(
            "never",
            "Always",
            &format!(
                "  containers:\n  - name: main\n    image: {}\n    startupProbe:\n      tcpSocket: {{port: {closed}}}\n      periodSeconds: 1\n      failureThreshold: 2\n",
                fixture("sleep.wat")
            ),
        ),
    );
    let p = k.wait_pod("never", 60, |p| restarts(p) >= 1).await;
    assert!(
        cstatus(&p)["lastState"]["terminated"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("startup probe failed"),
        "{p}"
    );
    wait_event(&k, "never", "Unhealthy", "Startup probe failed", 10).await;
    wait_event(
        &k,
        "never",
        "Killing",
        "Container main failed startup probe, will be restarted",
        10,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_probes_are_rejected_with_the_field() {
    let k = Kapsel::start();
    // exec on a WASM container, over the HTTP API: 422 naming the field.
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bad"},
        "spec": {"containers": [{
            "name": "main", "image": fixture("sleep.wat"),
            "livenessProbe": {"exec": {"command": ["true"]}}
        }]}
    });
    let (code, v) = k
        .send(
            reqwest::Method::POST,
            "/api/v1/namespaces/default/pods",
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["kind"], "Status");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("spec.containers[0].livenessProbe.exec")
            && msg.contains("exec probes run only in OCI containers"),
        "{msg}"
    );
    // Through the CLI: a named port that does not exist, and probes on a plain init container.
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad2\nspec:\n  initContainers:\n  - name: setup\n    image: {BUSYBOX}\n    readinessProbe:\n      tcpSocket: {{port: 80}}\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    readinessProbe:\n      httpGet: {{port: web}}\n"
    );
    let out = k.try_apply("bad2", &yaml);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.initContainers[0].readinessProbe")
            && err.contains("spec.containers[0].readinessProbe.httpGet.port"),
        "{err}"
    );
    assert!(k.pod("bad").await.is_none() && k.pod("bad2").await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_native_sidecar_counts_as_started_only_after_its_startup_probe() {
    let k = Kapsel::start();
    let probe = "    restartPolicy: Always\n    startupProbe:\n      exec: {command: [cat, /tmp/up]}\n      periodSeconds: 1\n      timeoutSeconds: 5\n      failureThreshold: 60\n";
    k.apply(
        "side",
        &pod(
            "side",
            "Always",
            &format!(
                "  initContainers:\n{}  containers:\n{}",
                busybox("proxy", "exec sleep 3600", probe),
                busybox("app", "exec sleep 3600", "")
            ),
        ),
    );
    let sidecar = |p: &Value| p["status"]["initContainerStatuses"][0].clone();
    let p = k
        .wait_pod("side", 60, |p| !sidecar(p)["state"]["running"].is_null())
        .await;
    // The sidecar runs but has not started: the app container waits.
    holds_for(&k, "side", 3, |p| {
        sidecar(p)["started"] == false && !running(p)
    })
    .await;
    let mut as_first = p.clone();
    as_first["status"]["containerStatuses"] = serde_json::json!([sidecar(&p)]);
    docker_exec(&as_first, &["touch", "/tmp/up"]);
    let p = k.wait_pod("side", 30, |p| running(p) && pod_ready(p)).await;
    assert_eq!(sidecar(&p)["started"], true);
    assert_eq!(sidecar(&p)["ready"], true);
}
