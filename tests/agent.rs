//! `kapsel agent`: a node in its own process, joined to a `kapsel serve` over the HTTP API.
//! It registers its Node, runs only the pods bound to it, and everything it reports (status,
//! events, the final removal of a deleted pod) goes through the API: the pod's `hostIP` is the
//! agent's `--node-ip`, which only the agent knows.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_joins_runs_its_pods_and_reports_through_the_api() {
    let k = Kapsel::start();
    let node = format!("edge-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let mut agent = AgentProc::start(&k.url, &node, "127.0.0.2");

    // The agent's Node appears, Ready, with its own address.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, n) = k.get(&format!("/api/v1/nodes/{node}")).await;
        if code == 200 && n["status"]["conditions"][0]["status"] == "True" {
            assert_eq!(n["status"]["addresses"][0]["address"], "127.0.0.2");
            break;
        }
        assert!(Instant::now() < deadline, "node {node} never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A pod bound to the agent's node runs there, not on the server's own node.
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: remote\nspec:\n  nodeName: {node}\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {}\n",
        fixture("quick.wat")
    );
    k.apply("remote", &yaml);
    let p = k.wait_pod("remote", 20, |p| phase(p) == "Succeeded").await;
    assert_eq!(p["status"]["hostIP"], "127.0.0.2", "{p}");
    assert_eq!(state(&p, 0)["terminated"]["exitCode"], 0);
    // Its output is in the agent's data directory, not the server's.
    let uid = p["metadata"]["uid"].as_str().unwrap();
    let log = agent.data.path().join("pods").join(uid);
    assert!(log.exists(), "no pod directory on the agent");
    assert!(!k.data.join("pods").join(uid).exists());
    // Its events came through the API too.
    let events = k.events_for("remote").await;
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "Started" && e["source"]["host"] == node.as_str()),
        "{events:?}"
    );

    // A pod on the agent that runs until deleted: the agent stops it and removes the object.
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: long\nspec:\n  nodeName: {node}\n  containers:\n  - name: main\n    image: {}\n",
        fixture("sleep.wat")
    );
    k.apply("long", &yaml);
    k.wait_pod("long", 20, |p| phase(p) == "Running").await;
    let out = k.cli(&["delete", "pod", "long"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    k.wait_gone("long", 20).await;

    // SIGTERM: the agent stops and exits 0.
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe {
        libc::kill(agent.child.id() as i32, libc::SIGTERM);
    }
    let t = Instant::now();
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "agent did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// `VmRSS` of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib * 1024
}

/// Issue 15: an idle WASM-only agent, joined over TLS as in production, stays under 15 MB of
/// RSS. Its RSS is sampled over an idle window of several Lease renewals (2 s each), so the
/// code its steady state runs again is counted, not just what start-up left behind.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_wasm_only_agent_stays_under_15_mb_of_rss() {
    let k = Kapsel::start_with(&["--cluster-listen", "127.0.0.1:0"]);
    let url = k.cluster_url();
    let token = std::fs::read_to_string(k.data.join("token")).unwrap();
    let node = format!("idle-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let agent = AgentProc::start_with(&url, &node, "127.0.0.2", &["--token", token.trim()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, n) = k.get(&format!("/api/v1/nodes/{node}")).await;
        if code == 200 && n["status"]["conditions"][0]["status"] == "True" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} never registered; agent stderr:\n{}",
            agent.stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent lets go of its start-up pages once it has joined (just after the Node is
    // Ready): wait for that, then the idle window.
    let pid = agent.child.id();
    let bound = 15_000_000;
    let settle = Instant::now() + Duration::from_secs(10);
    while rss_bytes(pid) > bound && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let window = Instant::now() + Duration::from_secs(6);
    let mut max = 0;
    while Instant::now() < window {
        max = max.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("idle agent VmRSS max {:.1} MiB", max as f64 / 1048576.0);
    assert!(
        max <= bound,
        "idle agent VmRSS reached {:.1} MiB (> 15 MB); agent stderr:\n{}",
        max as f64 / 1048576.0,
        agent.stderr.lock().unwrap()
    );
}
