//! One pod, two worlds: OCI containers (real Docker daemon, local busybox image) and WASM
//! modules sharing one network namespace and the pod's volumes; pods isolated from each other;
//! exit codes, logs, OOMKilled, restarts, cleanup after delete and after `kill -9`; bad input.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn container(name: &str, script: &str) -> String {
    format!(
        "  - name: {name}\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n    command: [\"sh\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    )
}

fn pod(name: &str, policy: &str, body: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: {policy}\n{body}")
}

async fn wait_logs(k: &Kapsel, pod: &str, c: &str, needle: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let l = k.logs(pod, c).await;
        if l.contains(needle) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "{pod}/{c} never logged {needle:?}; logs:\n{l}\n{}",
            k.stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wasm_and_containers_share_localhost_both_ways() {
    let web = component("sample-pods/http-server");
    let connect = component("tests/fixtures/connect");
    let k = Kapsel::start();
    let (port, host_port, echo_port) = (8080, free_port(), 9000);
    let body = format!(
        "  containers:\n  - name: web\n    image: {web}\n    env: [{{name: PORT, value: \"{port}\"}}]\n    ports: [{{containerPort: {port}, hostPort: {host_port}}}]\n{}{}  - name: wasm-client\n    image: {connect}\n    env: [{{name: PORT, value: \"{echo_port}\"}}]\n",
        container("fetch", &format!("until wget -qO- http://127.0.0.1:{port}/from-container; do sleep 0.2; done")),
        container("echo", &format!("nc -ll -p {echo_port} -e /bin/cat")),
    );
    k.apply("mixed", &pod("mixed", "OnFailure", &body));
    // container → WASM component over 127.0.0.1
    let l = wait_logs(
        &k,
        "mixed",
        "fetch",
        "hello from kapsel wasm component",
        180,
    )
    .await;
    assert!(l.contains("/from-container"));
    // WASM component → container over 127.0.0.1
    wait_logs(&k, "mixed", "wasm-client", "reply: ping", 180).await;
    // host → pod through hostPort
    let r = reqwest::get(format!("http://127.0.0.1:{host_port}/via-host"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(r.contains("/via-host"), "{r}");
    // Every container carries its pod's uid.
    let p = k.pod("mixed").await.unwrap();
    let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
    assert!(!docker_ids(&format!("io.kapsel.pod.uid={uid}")).is_empty());
    // Delete leaves no container behind.
    assert!(k.cli(&["delete", "pod", "mixed"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !docker_ids(&format!("io.kapsel.pod.uid={uid}")).is_empty() {
        assert!(Instant::now() < deadline, "containers left after delete");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_dir_is_shared_between_containers_and_modules() {
    let k = Kapsel::start();
    let files = fixture("files/files.wasm");
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: vol\nspec:\n  restartPolicy: Never\n  volumes: [{{name: data, emptyDir: {{}}}}]\n  initContainers:\n  - name: c-writes\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n    command: [sh, -c, 'echo from-container > /data/a.txt']\n    volumeMounts: [{{name: data, mountPath: /data}}]\n  - name: w-writes\n    image: {files}\n    args: [write, /data/b.txt, from-wasm]\n    volumeMounts: [{{name: data, mountPath: /data}}]\n  containers:\n  - name: w-reads\n    image: {files}\n    args: [read, /data/a.txt]\n    volumeMounts: [{{name: data, mountPath: /data}}]\n  - name: c-reads\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n    command: [cat, /data/b.txt]\n    volumeMounts: [{{name: data, mountPath: /data, readOnly: true}}]\n"
    );
    k.apply("vol", &yaml);
    k.wait_pod("vol", 60, |p| {
        phase(p) == "Succeeded" || phase(p) == "Failed"
    })
    .await;
    assert_eq!(k.logs("vol", "w-reads").await.trim(), "from-container");
    assert_eq!(k.logs("vol", "c-reads").await.trim(), "from-wasm");
    assert_eq!(phase(&k.pod("vol").await.unwrap()), "Succeeded");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_listening_on_the_same_port_are_isolated() {
    let echo = component("tests/fixtures/echo-server");
    let k = Kapsel::start();
    for name in ["pod-a", "pod-b"] {
        let body = format!(
            "  containers:\n{}{}",
            container(
                "server",
                &format!(
                    "mkdir -p /www && echo {name} > /www/index.html && httpd -f -p 8000 -h /www"
                )
            ),
            container(
                "client",
                "while true; do wget -qO- http://127.0.0.1:8000/ && sleep 0.5; sleep 0.1; done"
            ),
        );
        k.apply(name, &pod(name, "Always", &body));
    }
    // A WASM-only pod (its own namespace, no Docker) on the same port at the same time.
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-w\nspec:\n  containers:\n  - name: echo\n    image: {echo}\n    env: [{{name: PORT, value: \"8000\"}}]\n    ports: [{{containerPort: 8000}}]\n"
    );
    k.apply("pod-w", &yaml);
    let a = wait_logs(&k, "pod-a", "client", "pod-a", 60).await;
    let b = wait_logs(&k, "pod-b", "client", "pod-b", 60).await;
    assert!(
        !a.contains("pod-b") && !b.contains("pod-a"),
        "a pod reached another's localhost"
    );
    let p = k
        .wait_pod("pod-w", 120, |p| !state(p, 0)["running"].is_null())
        .await;
    // The echo server is still up after a while: its bind on 8000 did not conflict.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p2 = k.pod("pod-w").await.unwrap();
    assert_eq!(
        p2["status"]["containerStatuses"][0]["restartCount"],
        p["status"]["containerStatuses"][0]["restartCount"]
    );
    assert!(!state(&p2, 0)["running"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_logs_oom_and_restarts() {
    let k = Kapsel::start();
    k.apply(
        "exit",
        &pod(
            "exit",
            "Never",
            &format!(
                "  containers:\n{}",
                container("main", "echo to-stdout; echo to-stderr >&2; exit 3")
            ),
        ),
    );
    let mem = format!(
        "  containers:\n{}    resources:\n      limits:\n        memory: 16Mi\n",
        container("main", "echo start; exec tail /dev/zero")
    );
    k.apply("oom", &pod("oom", "Never", &mem));
    k.apply(
        "crash",
        &pod(
            "crash",
            "Always",
            &format!(
                "  containers:\n{}",
                container("main", "echo crashing; exit 1")
            ),
        ),
    );
    let p = k.wait_pod("exit", 60, |p| phase(p) == "Failed").await;
    assert_eq!(state(&p, 0)["terminated"]["exitCode"], 3);
    assert_eq!(state(&p, 0)["terminated"]["reason"], "Error");
    let logs = k.logs("exit", "main").await;
    assert!(
        logs.contains("to-stdout") && logs.contains("to-stderr"),
        "{logs}"
    );
    let p = k.wait_pod("oom", 60, |p| phase(p) == "Failed").await;
    assert_eq!(
        state(&p, 0)["terminated"]["reason"],
        "OOMKilled",
        "{}",
        state(&p, 0)
    );
    assert!(!k.logs("oom", "main").await.contains("survived"));
    let p = k
        .wait_pod("crash", 60, |p| {
            p["status"]["containerStatuses"][0]["restartCount"]
                .as_i64()
                .unwrap_or(0)
                >= 2
        })
        .await;
    assert_eq!(
        p["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"],
        1
    );
    assert!(k.logs("crash", "main").await.matches("crashing").count() >= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_then_restart_leaves_no_orphan_container() {
    let mut k = Kapsel::start();
    k.apply(
        "sleeper",
        &pod(
            "sleeper",
            "Always",
            &format!(
                "  containers:\n{}",
                container("main", "echo up; sleep 3600")
            ),
        ),
    );
    let p = k
        .wait_pod("sleeper", 60, |p| !state(p, 0)["running"].is_null())
        .await;
    let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
    let label = format!("io.kapsel.pod.uid={uid}");
    let before = docker_ids(&label);
    assert_eq!(before.len(), 2, "infra + app: {before:?}");
    k.kill9();
    // The containers outlive the process...
    assert_eq!(docker_ids(&label).len(), 2);
    k.restart();
    // ...and are replaced: exactly one infra + one app again, none of the old ones.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = docker_ids(&label);
        if now.len() == 2 && now.iter().all(|id| !before.contains(id)) {
            let p = k.pod("sleeper").await.unwrap();
            let restarts = p["status"]["containerStatuses"][0]["restartCount"]
                .as_i64()
                .unwrap();
            if !state(&p, 0)["running"].is_null() && restarts >= 1 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "containers after restart: {now:?} (before {before:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(docker_ids(&format!("io.kapsel.node={}", k.node)).len(), 2);
}

/// Two servers on one machine under the same node name (their own data directories) never
/// remove each other's containers, at start-up or at shutdown: cleanup goes by the data
/// directory's node id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_with_one_node_name_keep_each_others_containers() {
    let sleeper = |name: &str| {
        pod(
            name,
            "Always",
            &format!("  containers:\n{}", container("main", "sleep 3600")),
        )
    };
    let running = |p: &serde_json::Value| !state(p, 0)["running"].is_null();
    let a = Kapsel::start();
    a.apply("keep", &sleeper("keep"));
    let p = a.wait_pod("keep", 60, running).await;
    let label = format!(
        "io.kapsel.pod.uid={}",
        p["metadata"]["uid"].as_str().unwrap()
    );
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let before = sorted(docker_ids(&label));
    assert_eq!(before.len(), 2, "infra + app: {before:?}");
    {
        let b = Kapsel::start_named(&a.node, &[]);
        // B's start-up cleanup is over once it runs a pod of its own.
        b.apply("other", &sleeper("other"));
        b.wait_pod("other", 60, running).await;
        assert_eq!(
            sorted(docker_ids(&label)),
            before,
            "a second server of the same node name removed the first one's containers at start"
        );
    }
    assert_eq!(
        sorted(docker_ids(&label)),
        before,
        "a second server of the same node name removed the first one's containers at shutdown"
    );
    let p = a.pod("keep").await.unwrap();
    assert!(running(&p), "{p}");
    assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_images_get_clear_reasons() {
    let k = Kapsel::start();
    let c = |image: &str, policy: &str| {
        format!(
            "  containers:\n  - name: main\n    image: {image}\n    imagePullPolicy: {policy}\n"
        )
    };
    k.apply(
        "never",
        &pod("never", "Never", &c("kapsel-test/absent:1", "Never")),
    );
    k.apply(
        "ifnp",
        &pod("ifnp", "Never", &c("kapsel-test/absent:1", "IfNotPresent")),
    );
    k.apply(
        "badname",
        &pod("badname", "Never", &c("Not/A::Valid-Name", "IfNotPresent")),
    );
    let reason = |p: &serde_json::Value| {
        state(p, 0)["waiting"]["reason"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let p = k
        .wait_pod("never", 30, |p| reason(p) == "ErrImageNeverPull")
        .await;
    assert!(state(&p, 0)["waiting"]["message"]
        .as_str()
        .unwrap()
        .contains("kapsel-test/absent:1"));
    k.wait_pod("ifnp", 30, |p| {
        reason(p) == "ErrImagePull" || reason(p) == "ImagePullBackOff"
    })
    .await;
    k.wait_pod("badname", 30, |p| reason(p) == "InvalidImageName")
        .await;
}

/// A unix-socket relay in front of the Docker daemon, so a test can make Docker go away.
async fn relay(path: std::path::PathBuf, stop: tokio_util::sync::CancellationToken) {
    let _ = std::fs::remove_file(&path);
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    loop {
        let (mut a, _) = tokio::select! {
            c = l.accept() => c.unwrap(),
            _ = stop.cancelled() => { let _ = std::fs::remove_file(&path); return; }
        };
        tokio::spawn(async move {
            if let Ok(mut b) = tokio::net::UnixStream::connect("/var/run/docker.sock").await {
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_unreachable_keeps_oci_pods_pending_and_recovers_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("docker.sock");
    let k = Kapsel::start_with(&["--docker-host", &format!("unix://{}", sock.display())]);
    // The node registers itself shortly after the API is up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let n = loop {
        let (code, n) = k.get(&format!("/api/v1/nodes/{}", k.node)).await;
        if code == 200 {
            break n;
        }
        assert!(Instant::now() < deadline, "node never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let rts = n["status"]["nodeInfo"]["runtimes"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        rts.contains(&serde_json::json!("wasm")) && !rts.contains(&serde_json::json!("oci")),
        "{rts:?}"
    );
    k.apply(
        "oci",
        &pod(
            "oci",
            "Never",
            &format!(
                "  containers:\n{}",
                container("main", "echo hi-from-docker")
            ),
        ),
    );
    k.apply(
        "wasm",
        &pod_yaml("wasm", &fixture("quick.wat"), &[], "Never", ""),
    );
    k.wait_pod("wasm", 20, |p| phase(p) == "Succeeded").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let ev = loop {
        let ev = k.events_for("oci").await;
        if let Some(e) = ev.iter().find(|e| e["reason"] == "FailedScheduling") {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "no FailedScheduling");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(ev["message"].as_str().unwrap().contains("OCI"), "{ev}");
    assert_eq!(phase(&k.pod("oci").await.unwrap()), "Pending");
    // Docker comes (back): the node advertises oci and the pod runs.
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(relay(sock.clone(), stop.clone()));
    let p = k.wait_pod("oci", 60, |p| phase(p) == "Succeeded").await;
    assert_eq!(p["spec"]["nodeName"], k.node.as_str());
    assert!(k.logs("oci", "main").await.contains("hi-from-docker"));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_pods_and_removes_their_containers() {
    let mut k = Kapsel::start();
    let body = format!(
        "  terminationGracePeriodSeconds: 30\n  containers:\n{}",
        container("main", "sleep 3600")
    );
    k.apply("stubborn", &pod("stubborn", "Always", &body));
    k.wait_pod("stubborn", 60, |p| !state(p, 0)["running"].is_null())
        .await;
    assert_eq!(docker_ids(&format!("io.kapsel.node={}", k.node)).len(), 2);
    let mut child = k.child.take().unwrap();
    // SAFETY: kill(2) takes plain integers; the pid is our own child, not yet reaped (so not reused).
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "serve did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success());
    // `sleep` as PID 1 ignores SIGTERM: the shutdown gives it 10 s, then removes it.
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        t.elapsed()
    );
    let left = docker_ids(&format!("io.kapsel.node={}", k.node));
    assert!(
        left.is_empty(),
        "containers outlived kapsel serve after {:?}: {left:?}\n{}",
        t.elapsed(),
        k.stderr.lock().unwrap()
    );
}
