//! Pod-start benchmark (release build), side by side with `docker run --rm` of a local busybox
//! image in the same run:
//!   1. one WASM pod, POST → Running (and → Succeeded), warm node: p50 / p99;
//!   2. 1,000 WASM pods POSTed in one batch until all Succeeded;
//!   3. RSS of 1,000 idle WASM pods (blocked in sleep), per pod;
//!   4. the ratio to `docker run --rm busybox true` per pod start.
//!
//! Run: `cargo bench --bench pod_start` (set BENCH_N / BENCH_BATCH to change the sizes).
//! Prints a Markdown report, also written to target/bench-pod-start.md.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

#[path = "support/server.rs"]
mod server;
use server::{start_server as start, Server};

const IMAGE: &str = "kapsel-test/busybox:1";

fn start_server() -> Server {
    start("bench", &[])
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn pod(name: &str, image: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": image,
            "resources": {"limits": {"memory": "1Mi"}}}]}})
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A watch on all pods: yields (name, phase) for every event.
struct Watch {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
}

async fn watch(http: &reqwest::Client, url: &str) -> Watch {
    let resp = http
        .get(format!("{url}/api/v1/pods?watch=true&resourceVersion=1"))
        .send()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(Ok(c)) = body.next().await {
            buf.extend_from_slice(&c);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let v: Value = serde_json::from_slice(&line).unwrap();
                let name = v["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let phase = v["object"]["status"]["phase"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                if tx.send((name, phase)).is_err() {
                    return;
                }
            }
        }
    });
    Watch { rx }
}

impl Watch {
    async fn until(&mut self, name: &str, phases: &[&str]) {
        loop {
            let (n, p) = tokio::time::timeout(Duration::from_secs(30), self.rx.recv())
                .await
                .expect("pod never reached the phase")
                .unwrap();
            if n == name && phases.contains(&p.as_str()) {
                return;
            }
        }
    }
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) {
    let r = http
        .post(format!("{url}/api/v1/namespaces/default/pods"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

fn docker_ok() -> bool {
    Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn docker_run_once() -> f64 {
    let t = Instant::now();
    let s = Command::new("docker")
        .args(["run", "--rm", IMAGE, "/bin/busybox", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(s.success());
    t.elapsed().as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let batch: usize = std::env::var("BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let docker_n: usize = std::env::var("BENCH_DOCKER_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(21);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()
        .unwrap();
    let mut report = String::new();
    let mut line = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };

    // ---- 1. single pod start on a warm node
    let srv = start_server();
    let mut w = watch(&http, &srv.url).await;
    // Warm-up: compile and cache both fixtures, open connections.
    for (i, f) in ["sleep.wat", "quick.wat"].iter().enumerate() {
        post(&http, &srv.url, &pod(&format!("warm{i}"), &fixture(f))).await;
        w.until(&format!("warm{i}"), &["Running", "Succeeded"])
            .await;
    }
    let mut running = Vec::new();
    let mut succeeded = Vec::new();
    for i in 0..n {
        let name = format!("r{i}");
        let t = Instant::now();
        post(&http, &srv.url, &pod(&name, &fixture("sleep.wat"))).await;
        w.until(&name, &["Running"]).await;
        running.push(t.elapsed().as_secs_f64() * 1000.0);
        let name = format!("s{i}");
        let t = Instant::now();
        post(&http, &srv.url, &pod(&name, &fixture("quick.wat"))).await;
        w.until(&name, &["Succeeded"]).await;
        succeeded.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(w);
    drop(srv);

    // ---- docker anchor, same run
    let have_docker = docker_ok();
    let mut dock = Vec::new();
    if have_docker {
        docker_run_once();
        for _ in 0..docker_n {
            dock.push(docker_run_once());
        }
    }
    let (r50, r99) = (pct(&mut running, 0.5), pct(&mut running, 0.99));
    let (s50, s99) = (pct(&mut succeeded, 0.5), pct(&mut succeeded, 0.99));
    line(format!(
        "### Pod start, warm node ({n} pods each; docker: {docker_n} runs)\n"
    ));
    line("| measurement | p50 | p99 |".into());
    line("|---|---|---|".into());
    line(format!(
        "| WASM pod: POST → Running (sleep.wat) | {r50:.2} ms | {r99:.2} ms |"
    ));
    line(format!(
        "| WASM pod: POST → Succeeded (quick.wat, whole lifecycle) | {s50:.2} ms | {s99:.2} ms |"
    ));
    let (d50, d99) = if have_docker {
        let d = (pct(&mut dock, 0.5), pct(&mut dock, 0.99));
        line(format!(
            "| `docker run --rm {IMAGE} /bin/busybox true` | {:.1} ms | {:.1} ms |",
            d.0, d.1
        ));
        d
    } else {
        line("| docker run | (docker or image unavailable) | |".into());
        (f64::NAN, f64::NAN)
    };
    line(String::new());

    // ---- 2. batch of pods until all Succeeded
    let srv = start_server();
    let mut w = watch(&http, &srv.url).await;
    post(&http, &srv.url, &pod("warm", &fixture("quick.wat"))).await;
    w.until("warm", &["Succeeded"]).await;
    let t = Instant::now();
    let url = srv.url.clone();
    let posts = futures::stream::iter(0..batch)
        .map(|i| {
            let http = http.clone();
            let url = url.clone();
            async move { post(&http, &url, &pod(&format!("b{i}"), &fixture("quick.wat"))).await }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>();
    let waiter = async {
        let mut done = std::collections::HashSet::new();
        while done.len() < batch {
            let (n, p) = tokio::time::timeout(Duration::from_secs(60), w.rx.recv())
                .await
                .expect("batch stalled")
                .unwrap();
            if p == "Succeeded" && n.starts_with('b') {
                done.insert(n);
            }
        }
    };
    let posted_at = async {
        posts.await;
        t.elapsed()
    };
    let (posted, _) = tokio::join!(posted_at, waiter);
    let batch_s = t.elapsed().as_secs_f64();
    drop(w);
    drop(srv);
    // Docker anchor for throughput: a few concurrent `docker run --rm`, extrapolated.
    let dock_batch = if have_docker {
        let k = 8;
        let t = Instant::now();
        let hs: Vec<_> = (0..k)
            .map(|_| std::thread::spawn(docker_run_once))
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        Some(t.elapsed().as_secs_f64() / k as f64 * batch as f64)
    } else {
        None
    };
    line(format!(
        "### {batch} WASM pods in one batch (64 concurrent POSTs) until all Succeeded\n"
    ));
    line("| measurement | time |".into());
    line("|---|---|".into());
    line(format!("| Kapsel: {batch} pods POST → all Succeeded | {batch_s:.2} s (all POSTs answered after {:.2} s) |", posted.as_secs_f64()));
    if let Some(d) = dock_batch {
        line(format!(
            "| docker run --rm ×{batch}, extrapolated from 8 concurrent runs | {d:.0} s |"
        ));
    }
    line(String::new());

    // ---- 3. RSS of idle pods
    let srv = start_server();
    let mut w = watch(&http, &srv.url).await;
    post(&http, &srv.url, &pod("warm", &fixture("sleep.wat"))).await;
    w.until("warm", &["Running"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = srv.child.id();
    let before = rss_kib(pid);
    let url = srv.url.clone();
    futures::stream::iter(0..batch)
        .map(|i| {
            let http = http.clone();
            let url = url.clone();
            async move {
                post(
                    &http,
                    &url,
                    &pod(&format!("idle{i}"), &fixture("sleep.wat")),
                )
                .await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let mut up = std::collections::HashSet::new();
    while up.len() < batch {
        let (n, p) = tokio::time::timeout(Duration::from_secs(60), w.rx.recv())
            .await
            .expect("idle pods stalled")
            .unwrap();
        if p == "Running" && n.starts_with("idle") {
            up.insert(n);
        }
    }
    // Let allocations settle: sample until two readings agree within 1%.
    let mut after = rss_kib(pid);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rss_kib(pid);
        let stable = (now as f64 - after as f64).abs() / (after as f64) < 0.01;
        after = now;
        if stable {
            break;
        }
    }
    let per_pod = (after.saturating_sub(before)) as f64 / batch as f64;
    drop(w);
    drop(srv);
    line(format!("### RSS of {batch} idle WASM pods (sleep.wat: blocked in poll_oneoff; 64 KiB linear memory declared, 1 page touched)\n"));
    line("| measurement | value |".into());
    line("|---|---|".into());
    line(format!(
        "| kapsel serve RSS before → after | {:.1} MiB → {:.1} MiB |",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    ));
    line(format!("| per idle pod, everything (instance + touched linear memory + fiber stack + store object + worker); an upper bound of the cost beyond the module's own memory | {per_pod:.1} KiB |"));
    line(
        "| an idle docker container (TOOLCHAIN.md, measured on these machines) | ≈ 3 MiB |".into(),
    );
    line(String::new());

    // ---- 4. ratio
    if have_docker {
        line("### Ratio to `docker run --rm` per pod start (p50)\n".to_string());
        line("| WASM measurement | ratio |".into());
        line("|---|---|".into());
        line(format!("| POST → Running | {:.0}× faster |", d50 / r50));
        line(format!(
            "| POST → Succeeded (full lifecycle, like `docker run --rm … true`) | {:.0}× faster |",
            d50 / s50
        ));
        line(format!(
            "| p99, POST → Succeeded | {:.0}× faster |",
            d99 / s99
        ));
    }
    let _ = std::fs::create_dir_all(Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let _ = std::fs::write(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-pod-start.md"),
        &report,
    );
}
