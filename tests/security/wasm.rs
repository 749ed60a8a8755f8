//! WASM guests (issue 12): one memory budget per guest — every linear memory and table counted,
//! a node default for guests without a limit — and, on the node's network (the unprivileged
//! fallback, no pod namespace), no way to the node's loopback or its API.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

const LIMIT_100MI: &str = "    resources:\n      limits:\n        memory: 100Mi\n";

fn terminated(p: &serde_json::Value) -> &serde_json::Value {
    &state(p, 0)["terminated"]
}

/// Six linear memories of 90 MiB each under `limits.memory: 100Mi`: before, each memory had
/// the whole limit to itself and all six filled (540 MiB); now they share it.
#[tokio::test(flavor = "multi_thread")]
async fn six_memories_share_one_limit_and_the_guest_is_oomkilled() {
    let k = Kapsel::start();
    k.apply(
        "multimem",
        &pod_yaml(
            "multimem",
            &fixture("multimem.wat"),
            &[],
            "Never",
            LIMIT_100MI,
        ),
    );
    let p = k.wait_pod("multimem", 60, |p| phase(p) == "Failed").await;
    let t = terminated(&p);
    assert_eq!(t["reason"], "OOMKilled", "{t}");
    assert_eq!(t["exitCode"], 137);
    let msg = t["message"].as_str().unwrap();
    assert!(
        msg.contains("100Mi") && msg.contains("linear memories and tables"),
        "{msg}"
    );
    // The first memory filled (90 MiB); the second could not reach 90 MiB: the total stayed
    // under 100 MiB.
    let logs = k.logs("multimem", "main").await;
    assert!(logs.contains("memory 0 filled"), "{logs}");
    assert!(!logs.contains("memory 1 filled"), "{logs}");
}

/// A funcref table grown by 100,000 elements at a time, no linear memory growth: before, tables
/// were not counted at all (10 M elements allowed whatever the limit); now it is OOMKilled.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_bomb_counts_against_the_limit_and_is_oomkilled() {
    let k = Kapsel::start();
    k.apply(
        "tablebomb",
        &pod_yaml(
            "tablebomb",
            &fixture("tablebomb.wat"),
            &[],
            "Never",
            LIMIT_100MI,
        ),
    );
    let p = k.wait_pod("tablebomb", 60, |p| phase(p) == "Failed").await;
    let t = terminated(&p);
    assert_eq!(t["reason"], "OOMKilled", "{t}");
    assert_eq!(t["exitCode"], 137);
    let msg = t["message"].as_str().unwrap();
    assert!(msg.contains("100Mi") && msg.contains("table"), "{msg}");
}

/// A guest without `resources.limits.memory` on a node started with
/// `--wasm-default-memory-limit 64Mi` cannot grow to 200 MiB; an explicit limit still wins, and
/// ordinary guests run as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_without_a_limit_gets_the_node_default() {
    let k = Kapsel::start_with(&["--wasm-default-memory-limit", "64Mi"]);
    k.apply(
        "grow",
        &pod_yaml("grow", &fixture("grow200.wat"), &[], "Never", ""),
    );
    let p = k.wait_pod("grow", 60, |p| phase(p) == "Failed").await;
    let t = terminated(&p);
    assert_eq!(t["reason"], "OOMKilled", "{t}");
    assert_eq!(t["exitCode"], 137);
    let msg = t["message"].as_str().unwrap();
    assert!(
        msg.contains("64Mi") && msg.contains("--wasm-default-memory-limit"),
        "{msg}"
    );
    assert!(!k.logs("grow", "main").await.contains("grew to 200 MiB"));

    // The pod's own limit replaces the default.
    let res = "    resources:\n      limits:\n        memory: 300Mi\n";
    k.apply(
        "grow-limited",
        &pod_yaml("grow-limited", &fixture("grow200.wat"), &[], "Never", res),
    );
    // A normal guest (a sample pod) runs under the default.
    let hello = repo("sample-pods/hello/hello.wasm").display().to_string();
    k.apply(
        "hello",
        &pod_yaml("hello", &hello, &["Kapsel", "user"], "Never", ""),
    );
    k.wait_pod("grow-limited", 60, |p| phase(p) == "Succeeded")
        .await;
    assert!(k
        .logs("grow-limited", "main")
        .await
        .contains("grew to 200 MiB"));
    k.wait_pod("hello", 60, |p| phase(p) == "Succeeded").await;
    assert!(k.logs("hello", "main").await.contains("Kapsel user!"));

    // `none` disables the default.
    let k = Kapsel::start_with(&["--wasm-default-memory-limit", "none"]);
    k.apply(
        "grow",
        &pod_yaml("grow", &fixture("grow200.wat"), &[], "Never", ""),
    );
    k.wait_pod("grow", 60, |p| phase(p) == "Succeeded").await;
    assert!(k.logs("grow", "main").await.contains("grew to 200 MiB"));
}

/// A line-echo server on `ip`, counting the connections it accepted.
fn echo_on(ip: &str) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            a.fetch_add(1, Ordering::SeqCst);
            let mut line = String::new();
            let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut line);
            let _ = s.write_all(line.as_bytes());
        }
    });
    (port, accepted)
}

fn connect_pod(name: &str, image: &str, host: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {image}\n    env: [{{name: HOST, value: \"{host}\"}}, {{name: PORT, value: \"{port}\"}}]\n"
    )
}

/// The node's address on its default route (no packet is sent), if it has one.
fn node_address() -> Option<String> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9")
        .or_else(|_| s.connect("8.8.8.8:53"))
        .ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then(|| ip.to_string())
}

/// On a node that cannot create network namespaces (forced with the test-only
/// `--no-pod-netns`), a component runs on the node's network. Before, it could connect to the
/// node's unauthenticated API and to anything on the node's loopback; now both are refused by
/// the sandbox's socket check, while a normal pod's own localhost works as before.
#[tokio::test(flavor = "multi_thread")]
async fn host_network_components_cannot_reach_the_node_loopback_or_the_api() {
    let connect = component("tests/fixtures/connect");
    let echo = component("tests/fixtures/echo-server");
    let (node_port, accepted) = echo_on("127.0.0.1");

    let k = Kapsel::start_with(&["--no-pod-netns"]);
    let api_port: u16 = k.url.rsplit(':').next().unwrap().parse().unwrap();
    k.apply(
        "to-api",
        &connect_pod("to-api", &connect, "127.0.0.1", api_port),
    );
    k.apply(
        "to-node",
        &connect_pod("to-node", &connect, "127.0.0.1", node_port),
    );
    k.apply(
        "to-localhost",
        &connect_pod("to-localhost", &connect, "localhost", node_port),
    );
    for pod in ["to-api", "to-node", "to-localhost"] {
        let p = k.wait_pod(pod, 180, |p| phase(p) == "Failed").await;
        assert_eq!(terminated(&p)["exitCode"], 1, "{pod}: {p}");
        let logs = k.logs(pod, "main").await;
        assert!(logs.contains("connect failed"), "{pod}: {logs}");
        assert!(!logs.contains("reply:"), "{pod}: {logs}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a guest reached the node's loopback"
    );
    // The guests do run on the node's network: the node's other addresses stay reachable
    // (as they are from anywhere on the network), so the refusals above are the sandbox's.
    if let Some(ip) = node_address() {
        let (port, accepted) = echo_on("0.0.0.0");
        k.apply("to-lan", &connect_pod("to-lan", &connect, &ip, port));
        let p = k.wait_pod("to-lan", 180, |p| phase(p) == "Succeeded").await;
        assert_eq!(terminated(&p)["exitCode"], 0);
        assert!(k.logs("to-lan", "main").await.contains("reply: ping"));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
    drop(k);

    // A normal pod (its own namespace): the pod's own localhost still works.
    let k = Kapsel::start();
    let eport = free_port();
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pair\nspec:\n  restartPolicy: OnFailure\n  containers:\n  - name: echo\n    image: {echo}\n    env: [{{name: PORT, value: \"{eport}\"}}]\n    ports: [{{containerPort: {eport}}}]\n  - name: client\n    image: {connect}\n    env: [{{name: PORT, value: \"{eport}\"}}]\n"
    );
    k.apply("pair", &yaml);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let logs = k.logs("pair", "client").await;
        if logs.contains("reply: ping") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "client never got its echo: {logs}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
