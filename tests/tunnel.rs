//! The node API through the agent's tunnel: `kapsel serve --cluster-listen` on 127.0.0.1 and
//! real `kapsel agent` processes joined with the token. For a pod on a remote node the API's
//! `/log` (and `kapsel logs -f`: a line written after the follow started arrives, the follow
//! ends with the pod), the adapter-metrics endpoint (a value the pod wrote), the built-in
//! status (`describe pod`) and `kapsel exec` (output, stdin and exit code, in a busybox
//! container on an agent with Docker) answer through the tunnel; a WASM container's exec is a
//! clear 400; a node with no tunnel is a 503; a node's own identity may not read pod logs (403);
//! the tunnel comes back after the server restarts.

mod common;

use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

async fn wait_running(k: &Kapsel, pod: &str, secs: u64) -> Value {
    k.wait_pod(pod, secs, |p| phase(p) == "Running").await
}

/// Removes the Docker containers an agent left (agents are killed, not stopped).
struct DockerLeftovers(String);
impl Drop for DockerLeftovers {
    fn drop(&mut self) {
        let left = docker_ids(&format!("io.kapsel.node={}", self.0));
        if !left.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&left)
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_metrics_builtins_and_refusals_of_a_pod_on_a_remote_node() {
    let (mut k, url, token) = cluster_server();
    let node = node_name("edge");
    let agent = AgentProc::start_with(&url, &node, "127.0.0.2", &["--token", &token]);
    wait_node_ready(&k, &node, &agent).await;

    // A pod bound to the agent: a ticker, and a metrics adapter reading a file that the pod's
    // init container wrote.
    let cfg = shop_jobs_config();
    let ticker = format!(
        "  - name: ticker\n    image: {}\n    env: [{{name: TICK_MS, value: \"100\"}}]\n",
        fixture("ticker/ticker.wasm")
    );
    k.apply("remote", &adapter_pod("remote", &node, cfg.path(), &ticker));
    wait_running(&k, "remote", 30).await;

    // Logs through the tunnel: the server has none of this pod's files.
    let first = wait_ticks(&k, &["remote", "-c", "ticker"], 2).await;
    assert!(first.starts_with("tick 1\n"), "{first}");
    let (code, tail) = k
        .get("/api/v1/namespaces/default/pods/remote/log?container=ticker&tailLines=1")
        .await;
    assert_eq!(code, 200, "{tail}");
    assert_eq!(
        tail.as_str().unwrap_or_default().lines().count(),
        1,
        "{tail}"
    );

    // `logs -f`: a tick written after the follow started arrives; deleting the pod ends it.
    let follow = LogsFollow::start(&k, &["remote", "-c", "ticker"]);
    follow.wait_new_ticks(&k, &["remote", "-c", "ticker"]).await;

    // The adapter's value, pushed by the pod, from the agent's process.
    wait_shop_jobs(&k, "remote").await;

    // Built-in status: the API's JSON and `describe pod`.
    let (code, b) = k
        .get("/api/v1/namespaces/default/pods/remote/builtins")
        .await;
    assert_eq!(code, 200, "{b}");
    assert_eq!(b["adapter"]["kind"], "metrics-adapter", "{b}");
    let d = k.cli(&["describe", "pod", "remote"]);
    let text = String::from_utf8_lossy(&d.stdout);
    let section = text.split("Pattern components:").nth(1).unwrap_or_default();
    assert!(
        section.contains("adapter:") && section.contains("metrics-adapter"),
        "{text}"
    );

    // exec into a WASM container: a clear 400, kapsel exits non-zero.
    let out = k.cli(&["exec", "remote", "-c", "ticker", "--", "ls"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exec is for OCI containers"), "{err}");

    // A node's own identity may not read pod logs, not even of its own pod.
    let nh = node_http(agent.data.path());
    for pod in ["remote", "elsewhere"] {
        let r = nh
            .get(format!(
                "{url}/api/v1/namespaces/default/pods/{pod}/log?container=ticker"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{pod}");
    }
    // Nor open another node's tunnel without a certificate.
    let anon = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let r = anon
        .get(format!("{url}/v1-kapsel/connect"))
        .header("Upgrade", "kapsel-tunnel")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A pod bound to a node without a tunnel: 503 naming the node.
    k.apply(
        "ghost",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: ghost}}\nspec:\n  nodeName: ghost-node\n  containers:\n  - {{name: main, image: {}}}\n",
            fixture("sleep.wat")
        ),
    );
    let (code, v) = k.get("/api/v1/namespaces/default/pods/ghost/log").await;
    assert_eq!(code, 503, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("ghost-node"),
        "{v}"
    );

    // The server restarts: the agent's tunnel comes back (back-off from 0.5 s), logs work.
    k.kill9();
    k.restart();
    wait_for("logs through the re-opened tunnel", 30, || async {
        let (code, v) = k
            .get("/api/v1/namespaces/default/pods/remote/log?container=ticker&tailLines=1")
            .await;
        (code == 200 && v.as_str().unwrap_or_default().starts_with("tick "))
            .then_some(())
            .ok_or_else(|| format!("{code} {v}"))
    })
    .await;

    // The follow started before the restart ended with it; deleting the pod ends a new one.
    drop(follow);
    let mut follow = LogsFollow::start(&k, &["remote", "-c", "ticker"]);
    let out = k.cli(&["delete", "pod", "remote"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("logs -f to end with the pod", 20, || {
        let exited = follow.child.try_wait().unwrap();
        async move { exited.ok_or_else(|| "still following".to_string()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_into_an_oci_container_on_a_remote_node_returns_output_stdin_and_exit_code() {
    let (k, url, token) = cluster_server();
    let node = node_name("dock");
    let _leftovers = DockerLeftovers(node.clone());
    let agent = AgentProc::start_with_docker(&url, &node, "127.0.0.3", &["--token", &token]);
    wait_node_ready(&k, &node, &agent).await;
    k.apply(
        "box",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: box}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: sh\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n    command: [sleep, '3600']\n"
        ),
    );
    wait_running(&k, "box", 60).await;

    // Output on both streams and the exit code, relayed from the agent's Docker.
    let out = wait_for("exec through the tunnel", 20, || async {
        let out = k.cli(&[
            "exec",
            "box",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ]);
        (out.status.code() == Some(3))
            .then(|| out.clone())
            .ok_or_else(|| format!("{out:?}"))
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // stdin with -i, and exit code 0.
    let mut child = Command::new(bin())
        .args([
            "--server",
            &k.url,
            "exec",
            "-i",
            "box",
            "--",
            "sh",
            "-c",
            "tr a-z A-Z",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello tunnel\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO TUNNEL\n");

    // Bad input: an unknown container is a 400 naming the choices.
    let out = k.cli(&["exec", "box", "-c", "nope", "--", "true"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("choose one of: [sh]"),
        "{out:?}"
    );

    let out = k.cli(&["delete", "pod", "box"]);
    assert!(out.status.success(), "{out:?}");
    k.wait_gone("box", 30).await;
}
