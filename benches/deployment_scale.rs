//! Deployment scaling benchmark (release build), side by side in one run:
//!   A. 1,000 bare WASM pods POSTed by a client (64 concurrent) until all are Ready — the
//!      anchor: what the node and the store do without any controller;
//!   B. one Deployment of the same pod scaled 0 → 1,000 with one `PUT .../scale`, until
//!      `status.readyReplicas` is 1,000 (the controllers create every pod);
//!   C. the server's CPU while nothing changes (1,000 pods idle, with and without the
//!      Deployment), and how many store writes happen meanwhile (the node's heartbeat only);
//!   D. scaling the Deployment back 1,000 → 0 until every pod is gone.
//! Every server is fresh; A and B alternate for REPS rounds (default 3); medians are reported.
//!
//! Run: `cargo bench --bench deployment_scale` (BENCH_REPLICAS, REPS, IDLE_SECS to change).
//! Prints a Markdown report, also written to target/bench-deployment-scale.md.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

#[path = "support/server.rs"]
mod server;
use server::{start_server as start, Server};

fn start_server() -> Server {
    start("bench", &["--no-docker", "--wasm-pool-slots", "2048"])
}

fn sleep_wat() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sleep.wat")
        .display()
        .to_string()
}

fn pod_spec() -> Value {
    json!({"containers": [{"name": "main", "image": sleep_wat(),
        "resources": {"limits": {"memory": "1Mi"}}}]})
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

async fn ready_pods(http: &reqwest::Client, url: &str) -> usize {
    let v: Value = get_json(http, &format!("{url}/api/v1/namespaces/default/pods")).await;
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["status"]["conditions"]
                .as_array()
                .map(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .unwrap_or(false)
        })
        .count()
}

async fn store_revision(http: &reqwest::Client, url: &str) -> u64 {
    let t = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    t.lines()
        .find_map(|l| l.strip_prefix("kapsel_store_revision "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A: bare pods. Returns seconds until all ready.
async fn bare_pods(n: usize) -> (f64, Server) {
    let s = start_server();
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    let url = s.url.clone();
    let codes: Vec<u16> = futures::stream::iter(0..n)
        .map(|i| {
            let http = http.clone();
            let url = url.clone();
            async move {
                let body = json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("p{i}"), "labels": {"app": "bare"}},
                    "spec": pod_spec()});
                http.post(format!("{url}/api/v1/namespaces/default/pods"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(codes.iter().all(|c| *c == 201));
    while ready_pods(&http, &s.url).await < n {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "bare pods not ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (t0.elapsed().as_secs_f64(), s)
}

/// B: a Deployment scaled 0 → n. Returns seconds until `readyReplicas == n`.
async fn deployment_scale(n: usize) -> (f64, Server) {
    let s = start_server();
    let http = reqwest::Client::new();
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": pod_spec()}}});
    let base = format!("{}/apis/apps/v1/namespaces/default/deployments", s.url);
    let r = http.post(&base).json(&d).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // Let the controller settle on 0 (an empty ReplicaSet).
    let t_settle = Instant::now();
    loop {
        let v: Value = get_json(&http, &format!("{base}/web")).await;
        if v["status"]["observedGeneration"] == 1 {
            break;
        }
        assert!(t_settle.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t0 = Instant::now();
    let r = http
        .put(format!("{base}/web/scale"))
        .json(&json!({"spec": {"replicas": n}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    loop {
        let v: Value = get_json(&http, &format!("{base}/web")).await;
        if v["status"]["readyReplicas"] == n {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "deployment not ready: {}",
            v["status"]
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (t0.elapsed().as_secs_f64(), s)
}

/// C: CPU seconds per second of wall time over `secs`, and store writes meanwhile.
async fn idle(s: &Server, secs: u64) -> (f64, u64) {
    let http = reqwest::Client::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rev0 = store_revision(&http, &s.url).await;
    let c0 = cpu_secs(s.child.id());
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let c1 = cpu_secs(s.child.id());
    let wall = t0.elapsed().as_secs_f64();
    let rev1 = store_revision(&http, &s.url).await;
    // The two /metrics requests themselves write nothing.
    ((c1 - c0) / wall, rev1 - rev0)
}

/// D: scale back to 0 until no pod is left.
async fn scale_down(s: &Server) -> f64 {
    let http = reqwest::Client::new();
    let base = format!("{}/apis/apps/v1/namespaces/default/deployments", s.url);
    let t0 = Instant::now();
    http.put(format!("{base}/web/scale"))
        .json(&json!({"spec": {"replicas": 0}}))
        .send()
        .await
        .unwrap();
    loop {
        let v: Value = get_json(&http, &format!("{}/api/v1/namespaces/default/pods", s.url)).await;
        if v["items"].as_array().map(|a| a.is_empty()).unwrap_or(false) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t0.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let idle_secs: u64 = std::env::var("IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let (mut a, mut b, mut down) = (vec![], vec![], vec![]);
    let (mut cpu_bare, mut cpu_dep, mut writes_dep, mut writes_bare) =
        (vec![], vec![], vec![], vec![]);
    for r in 0..reps {
        let (ta, sa) = bare_pods(n).await;
        let (ca, wa) = idle(&sa, idle_secs).await;
        drop(sa);
        let (tb, sb) = deployment_scale(n).await;
        let (cb, wb) = idle(&sb, idle_secs).await;
        let td = scale_down(&sb).await;
        drop(sb);
        eprintln!(
            "rep {r}: bare {ta:.3}s · deployment {tb:.3}s · idle CPU bare {:.2}% ({wa} store writes) / with deployment {:.2}% ({wb} store writes) · scale down {td:.3}s",
            ca * 100.0,
            cb * 100.0
        );
        a.push(ta);
        b.push(tb);
        down.push(td);
        cpu_bare.push(ca * 100.0);
        cpu_dep.push(cb * 100.0);
        writes_dep.push(wb as f64);
        writes_bare.push(wa as f64);
    }
    let (ma, mb) = (median(&mut a), median(&mut b));
    let report = format!(
        "### Deployment scale 0 → {n} WASM pods (medians of {reps})\n\n\
| | time until all {n} Ready |\n|---|---|\n\
| A. {n} bare pods POSTed by a client (64 concurrent) — anchor | {ma:.2} s |\n\
| B. one Deployment, `PUT /scale` 0 → {n} (controllers create the pods) | **{mb:.2} s** |\n\
| ratio B / A | {:.2}× |\n\
| D. scale back {n} → 0 until every pod is gone | {:.2} s |\n\n\
| idle, {n} pods running, {idle_secs} s window | server CPU | store writes |\n|---|---|---|\n\
| A. bare pods (no controller work) | {:.2} % of one core | {:.0} |\n\
| B. the Deployment's pods (controllers watching) | {:.2} % of one core | {:.0} |\n",
        mb / ma,
        median(&mut down),
        median(&mut cpu_bare),
        median(&mut writes_bare),
        median(&mut cpu_dep),
        median(&mut writes_dep),
    );
    println!("{report}");
    let _ = std::fs::write(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-deployment-scale.md"),
        &report,
    );
}
