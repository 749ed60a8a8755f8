//! Join benchmark (release build): agent process start → its Node Ready on the server, side by
//! side in one run against one `kapsel serve --cluster-listen`:
//!   A. anchor: an agent on the plain-HTTP loopback API (no TLS, no join);
//!   B. a first join over TLS with the default token (fetch /cacerts, check the hash, CSR,
//!      signed certificate, then register over mutual TLS);
//!   C. a restart of a joined agent (its Node deleted first) with its kept certificate.
//! Each agent has a fresh data directory (C reuses B's); REPS rounds (default 5), medians.
//!
//! Run: `cargo bench --bench join` (REPS to change). Prints a Markdown line.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_kapsel")
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(server: &str, node: &str, data: &std::path::Path, token: Option<&str>) -> Proc {
    let mut c = Command::new(bin());
    c.args([
        "--server",
        server,
        "agent",
        "--node-name",
        node,
        "--no-docker",
    ])
    .arg("--data-dir")
    .arg(data)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Some(t) = token {
        c.args(["--token", t]);
    }
    Proc(c.spawn().unwrap())
}

async fn until_ready(http: &reqwest::Client, api: &str, node: &str, t: Instant) -> Duration {
    loop {
        if let Ok(r) = http.get(format!("{api}/api/v1/nodes/{node}")).send().await {
            if r.status() == 200 {
                let v: serde_json::Value = r.json().await.unwrap();
                if v["status"]["conditions"][0]["status"] == "True" {
                    return t.elapsed();
                }
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{node} never Ready");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--node-name", "bench"])
        .args(["--cluster-listen", "127.0.0.1:0", "--no-docker"])
        .arg("--data-dir")
        .arg(dir.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let _server = Proc(child);
    let (mut api, mut cluster) = (String::new(), String::new());
    while cluster.is_empty() {
        let l = lines.next().expect("server exited").unwrap();
        if let Some(i) = l.find("API on http://") {
            api = l[i + 7..].split_whitespace().next().unwrap().to_string();
        }
        if let Some(i) = l.find("cluster listener on https://") {
            cluster = l[i + 20..].split_whitespace().next().unwrap().to_string();
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    let token = token.trim();
    let http = reqwest::Client::new();
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..reps {
        let d = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let p = agent(&api, &format!("plain-{i}"), d.path(), None);
        a.push(until_ready(&http, &api, &format!("plain-{i}"), t).await);
        drop(p);

        let d = tempfile::tempdir().unwrap();
        let node = format!("tls-{i}");
        let t = Instant::now();
        let p = agent(&cluster, &node, d.path(), Some(token));
        b.push(until_ready(&http, &api, &node, t).await);
        drop(p);
        http.delete(format!("{api}/api/v1/nodes/{node}"))
            .send()
            .await
            .unwrap();
        let t = Instant::now();
        let p = agent(&cluster, &node, d.path(), None);
        c.push(until_ready(&http, &api, &node, t).await);
        drop(p);
    }
    let (ma, mb, mc) = (median(a), median(b), median(c));
    println!("| agent start → Node Ready, median of {reps} | plain HTTP (anchor) {ma:.1} ms | first TLS join {mb:.1} ms ({:.2}×) | restart with kept certificate {mc:.1} ms ({:.2}×) |", mb / ma, mc / ma);
}
