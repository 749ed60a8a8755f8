//! The node API through the agent's tunnel: `kapsel serve --cluster-listen` on 127.0.0.1 and
//! real `kapsel agent` processes joined with the token. For a pod on a remote node the API's
//! `/log` (and `kapsel logs -f`: a line written after the follow started arrives, the follow
//! ends with the pod), the adapter-metrics endpoint (a value the pod wrote), the built-in
//! status (`describe pod`) and `kapsel exec` (output, stdin and exit code, in a busybox
//! container on an agent with Docker) answer through the tunnel; a WASM container's exec is a
//! clear 400; a node with no tunnel is a 503; a node's own identity may not read pod logs (403);
//! the tunnel comes back after the server restarts.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::Value;

fn node_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    )
}

/// A server with a cluster listener on a fixed port (so a restart keeps it), and its token.
fn cluster_server() -> (Kapsel, String, String) {
    let port = free_port();
    let k = Kapsel::start_with(&["--cluster-listen", &format!("127.0.0.1:{port}")]);
    let url = k.cluster_url();
    let token = std::fs::read_to_string(k.data.join("token"))
        .unwrap()
        .trim()
        .to_string();
    (k, url, token)
}

/// An HTTP client that presents a joined node's certificate to the cluster listener.
fn node_http(agent_data: &std::path::Path) -> reqwest::Client {
    let pki = agent_data.join("pki");
    let read = |f: &str| std::fs::read(pki.join(f)).unwrap();
    let mut id = read("node.crt");
    id.extend(read("node.key"));
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&read("ca.crt")).unwrap())
        .identity(reqwest::Identity::from_pem(&id).unwrap())
        .build()
        .unwrap()
}

async fn wait_running(k: &Kapsel, pod: &str, secs: u64) -> Value {
    k.wait_pod(pod, secs, |p| phase(p) == "Running").await
}

/// The highest `tick N` in `text`.
fn last_tick(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
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
    wait_for(&format!("node {node} Ready"), 30, || async {
        let (_, n) = k.get(&format!("/api/v1/nodes/{node}")).await;
        (n["status"]["conditions"][0]["status"] == "True")
            .then_some(())
            .ok_or_else(|| format!("{n}\n{}", agent.stderr.lock().unwrap()))
    })
    .await;

    // A pod bound to the agent: a ticker, and a metrics adapter reading a file that the pod's
    // init container wrote.
    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(
        cfg.path().join("sources.yaml"),
        "lines:\n- name: status\n  file: /data/status.txt\n  interval: 100ms\n  rules:\n  - {regex: '^jobs (?P<n>\\d+)', name: shop_jobs, value: '$n'}\n",
    )
    .unwrap();
    k.apply(
        "remote",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: remote}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  volumes: [{{name: cfg, hostPath: {{path: {cfg}}}}}, {{name: data, emptyDir: {{}}}}]
  initContainers:
  - name: writer
    image: {files}
    args: ["write", "/data/status.txt", "jobs 42"]
    volumeMounts: [{{name: data, mountPath: /data}}]
  containers:
  - name: ticker
    image: {ticker}
    env: [{{name: TICK_MS, value: "100"}}]
  - name: adapter
    image: builtin/metrics-adapter
    args: ["--config=/etc/adapter/sources.yaml", "--web.listen-address=127.0.0.1:9102"]
    volumeMounts: [{{name: cfg, mountPath: /etc/adapter}}, {{name: data, mountPath: /data}}]
"#,
            cfg = cfg.path().display(),
            files = fixture("files/files.wasm"),
            ticker = fixture("ticker/ticker.wasm"),
        ),
    );
    wait_running(&k, "remote", 30).await;

    // Logs through the tunnel: the server has none of this pod's files.
    let first = wait_for("ticks in `kapsel logs`", 20, || async {
        let out = k.cli(&["logs", "remote", "-c", "ticker"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success() && last_tick(&text) >= 2)
            .then(|| text.clone())
            .ok_or_else(|| format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    })
    .await;
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
    let mut follow = Command::new(bin())
        .args(["--server", &k.url, "logs", "-f", "remote", "-c", "ticker"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = last_tick(&String::from_utf8_lossy(
        &k.cli(&["logs", "remote", "-c", "ticker"]).stdout,
    ));
    let seen = Arc::new(Mutex::new(String::new()));
    {
        let (seen, out) = (seen.clone(), follow.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = seen.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
        });
    }
    wait_for("a new tick through logs -f", 20, || async {
        let s = seen.lock().unwrap().clone();
        (last_tick(&s) >= started + 5)
            .then_some(())
            .ok_or_else(|| format!("started at {started}; follow saw:\n{s}"))
    })
    .await;

    // The adapter's value, pushed by the pod, from the agent's process.
    let items = wait_for("the adapter's value through the tunnel", 20, || async {
        let (code, v) = k
            .get("/api/v1/namespaces/default/pods/remote/metrics")
            .await;
        let found = v["items"].as_array().is_some_and(|is| {
            is.iter()
                .any(|i| i["metric"] == "shop_jobs" && i["value"] == 42.0)
        });
        (code == 200 && found)
            .then_some(v.clone())
            .ok_or(v.to_string())
    })
    .await;
    assert!(items["items"][0]["container"] == "adapter", "{items}");

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
    let _ = follow.kill();
    let _ = follow.wait();
    let mut follow = Command::new(bin())
        .args(["--server", &k.url, "logs", "-f", "remote", "-c", "ticker"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = k.cli(&["delete", "pod", "remote"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("logs -f to end with the pod", 20, || {
        let exited = follow.try_wait().unwrap();
        async move { exited.ok_or_else(|| "still following".to_string()) }
    })
    .await;
    let _ = follow.kill();
    let _ = follow.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_into_an_oci_container_on_a_remote_node_returns_output_stdin_and_exit_code() {
    let (k, url, token) = cluster_server();
    let node = node_name("dock");
    let _leftovers = DockerLeftovers(node.clone());
    let agent = AgentProc::start_with_docker(&url, &node, "127.0.0.3", &["--token", &token]);
    wait_for(&format!("node {node} Ready"), 30, || async {
        let (_, n) = k.get(&format!("/api/v1/nodes/{node}")).await;
        (n["status"]["conditions"][0]["status"] == "True")
            .then_some(())
            .ok_or_else(|| format!("{n}\n{}", agent.stderr.lock().unwrap()))
    })
    .await;
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
