//! Crash safety under churn: clients create and delete pods (WASM and OCI) while the server is
//! killed with `kill -9`; it restarts on the same data directory. No acknowledged write may be
//! lost (an acknowledged create exists unless its delete was attempted; an acknowledged delete
//! is carried out), and no Docker container may outlive its pod.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{docker_ids, fixture, Kapsel, BUSYBOX};

/// What a client knows about one pod name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Created (201), no delete attempted: it must exist after the restart.
    Created,
    /// Deleted (200): it must be gone after the restart (once its node has stopped it).
    Deleted,
    /// A request was in flight when the server died: either outcome is fine.
    Unknown,
}

fn pod(name: &str, oci: bool) -> Value {
    let container = if oci {
        json!({"name": "main", "image": BUSYBOX, "imagePullPolicy": "Never",
               "command": ["sleep", "3600"]})
    } else {
        json!({"name": "main", "image": fixture("sleep.wat")})
    };
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": {"churn": "yes"}},
           "spec": {"terminationGracePeriodSeconds": 1, "containers": [container]}})
}

/// One client: create, then (every other pod) delete, until the server stops answering.
async fn client(
    url: String,
    prefix: String,
    fates: Arc<Mutex<HashMap<String, Fate>>>,
    acked: Arc<AtomicUsize>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for i in 0.. {
        let name = format!("{prefix}-{i}");
        fates.lock().unwrap().insert(name.clone(), Fate::Unknown);
        let r = http
            .post(format!("{url}/api/v1/namespaces/default/pods"))
            .header("content-type", "application/json")
            .body(pod(&name, i % 3 == 0).to_string())
            .send()
            .await;
        match r {
            Ok(r) if r.status().as_u16() == 201 => {
                fates.lock().unwrap().insert(name.clone(), Fate::Created);
                acked.fetch_add(1, Ordering::SeqCst);
            }
            Ok(r) if r.status().is_server_error() => return,
            Ok(r) => panic!("create {name}: unexpected {}", r.status()),
            Err(_) => return,
        }
        if i % 2 == 1 {
            continue;
        }
        fates.lock().unwrap().insert(name.clone(), Fate::Unknown);
        let r = http
            .delete(format!("{url}/api/v1/namespaces/default/pods/{name}"))
            .send()
            .await;
        match r {
            Ok(r) if r.status().as_u16() == 200 => {
                fates.lock().unwrap().insert(name.clone(), Fate::Deleted);
                acked.fetch_add(1, Ordering::SeqCst);
            }
            Ok(r) if r.status().is_server_error() => return,
            Ok(r) => panic!("delete {name}: unexpected {}", r.status()),
            Err(_) => return,
        }
    }
}

async fn pods(k: &Kapsel) -> Vec<Value> {
    let (code, v) = k.get("/api/v1/namespaces/default/pods").await;
    assert_eq!(code, 200, "{v}");
    v["items"].as_array().cloned().unwrap_or_default()
}

/// Containers of this node whose pod is not (or no longer) in the store, after `secs` of
/// letting the node reconcile.
async fn orphans_after(k: &Kapsel, secs: u64) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let uids: HashSet<String> = pods(k)
            .await
            .iter()
            .filter_map(|p| p["metadata"]["uid"].as_str().map(str::to_string))
            .collect();
        let mut orphans = Vec::new();
        for id in docker_ids(&format!("io.kapsel.node={}", k.node)) {
            let out = std::process::Command::new("docker")
                .args([
                    "inspect",
                    "-f",
                    "{{index .Config.Labels \"io.kapsel.pod.uid\"}}",
                    &id,
                ])
                .output()
                .unwrap();
            let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
            // A container removed between `ps` and `inspect` is no orphan.
            if out.status.success() && !uids.contains(&uid) {
                orphans.push(format!("{id} (pod uid {uid})"));
            }
        }
        if orphans.is_empty() || Instant::now() > deadline {
            return orphans;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_during_churn_loses_no_acknowledged_write_and_leaves_no_orphan() {
    let mut k = Kapsel::start();
    let fates: Arc<Mutex<HashMap<String, Fate>>> = Arc::default();
    for round in 0..4 {
        let acked = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..4)
            .map(|c| {
                tokio::spawn(client(
                    k.url.clone(),
                    format!("r{round}c{c}"),
                    fates.clone(),
                    acked.clone(),
                ))
            })
            .collect();
        // Kill mid-stream: after a round-dependent number of acknowledged writes.
        let want = 12 + 7 * round;
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.load(Ordering::SeqCst) < want {
            assert!(
                Instant::now() < deadline,
                "only {} writes acknowledged in 60 s",
                acked.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        k.kill9();
        for c in clients {
            c.await.unwrap();
        }
        k.restart();

        // Every acknowledged write survived the crash.
        let snapshot = fates.lock().unwrap().clone();
        let present: HashSet<String> = pods(&k)
            .await
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
            .collect();
        for (name, fate) in &snapshot {
            if *fate == Fate::Created {
                assert!(
                    present.contains(name),
                    "round {round}: acknowledged create of {name} was lost"
                );
            }
        }
        for (name, fate) in &snapshot {
            if *fate == Fate::Deleted {
                k.wait_gone(name, 60).await;
            }
        }
        let orphans = orphans_after(&k, 60).await;
        assert!(
            orphans.is_empty(),
            "round {round}: containers without a pod after restart: {orphans:?}"
        );
    }

    // Clean up through the API: every pod goes, and with it every container of this node.
    for p in pods(&k).await {
        let name = p["metadata"]["name"].as_str().unwrap().to_string();
        let (code, v) = k
            .send(
                reqwest::Method::DELETE,
                &format!("/api/v1/namespaces/default/pods/{name}"),
                None,
            )
            .await;
        assert!(code == 200 || code == 404, "delete {name}: {code} {v}");
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while !pods(&k).await.is_empty() {
        assert!(Instant::now() < deadline, "pods left after deleting all");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = docker_ids(&format!("io.kapsel.node={}", k.node));
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "containers left after every pod was deleted: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
