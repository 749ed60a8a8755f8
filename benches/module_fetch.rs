//! Module-fetch benchmark (release build): a WASM pod on a fresh `kapsel agent` (empty module
//! and compile caches), POST → Succeeded, side by side in one run against one
//! `kapsel serve --cluster-listen`:
//!   A. anchor: the module read from a local path on the node (`sample-pods/hello/hello.wasm`);
//!   B. the module named only by digest (`modules.kapsel.io/<container>`, no file at the path):
//!      fetched from the server's module store over the node's TLS client, verified while
//!      streaming, cached, then compiled as in A.
//! Also: moving an 18 MB component (`sample-pods/http-server/app.wasm`, if built) through the
//! store, `GET` + sha256 vs reading the file + sha256.
//! Each pod gets a new agent; REPS rounds (default 5), medians.
//!
//! Run: `cargo bench --bench module_fetch` (REPS to change). Prints Markdown lines.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::Digest as _;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_kapsel")
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

async fn until<F: Fn(&Value) -> bool>(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    pred: F,
) -> Value {
    let t = Instant::now();
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status() == 200 {
                let v: Value = r.json().await.unwrap();
                if pred(&v) {
                    return v;
                }
            }
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{what} timed out");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// An agent process and its data directory (removed after the process is killed).
struct Agent {
    _proc: Proc,
    _data: tempfile::TempDir,
}

/// A fresh agent, Ready.
async fn agent(http: &reqwest::Client, api: &str, cluster: &str, token: &str, node: &str) -> Agent {
    let data = tempfile::tempdir().unwrap();
    let p = Proc(
        Command::new(bin())
            .args(["--server", cluster, "agent", "--node-name", node])
            .args(["--no-docker", "--token", token])
            .arg("--data-dir")
            .arg(data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    until(
        http,
        &format!("{api}/api/v1/nodes/{node}"),
        "node Ready",
        |v| v["status"]["conditions"][0]["status"] == "True",
    )
    .await;
    Agent {
        _proc: p,
        _data: data,
    }
}

/// POST a pod bound to `node`; the time until it Succeeded.
async fn run_pod(
    http: &reqwest::Client,
    api: &str,
    name: &str,
    node: &str,
    image: &str,
    module: Option<&str>,
) -> Duration {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "restartPolicy": "Never",
                 "containers": [{"name": "main", "image": image}]}
    });
    if let Some(d) = module {
        pod["metadata"]["annotations"] = json!({"modules.kapsel.io/main": d});
    }
    let t = Instant::now();
    let r = http
        .post(format!("{api}/api/v1/namespaces/default/pods"))
        .json(&pod)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let p = until(
        http,
        &format!("{api}/api/v1/namespaces/default/pods/{name}"),
        name,
        |v| matches!(v["status"]["phase"].as_str(), Some("Succeeded" | "Failed")),
    )
    .await;
    assert_eq!(p["status"]["phase"], "Succeeded", "{p}");
    t.elapsed()
}

async fn put(http: &reqwest::Client, api: &str, bytes: Vec<u8>) -> String {
    let d = digest(&bytes);
    let r = http
        .put(format!("{api}/v1-kapsel/modules/{d}"))
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    d
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

    let hello = repo("sample-pods/hello/hello.wasm");
    let hello_bytes = std::fs::read(&hello).unwrap();
    let size_kib = hello_bytes.len() / 1024;
    let d = put(&http, &api, hello_bytes).await;
    let (mut local, mut fetched) = (Vec::new(), Vec::new());
    for i in 0..reps {
        let node = format!("local-{i}");
        let _a = agent(&http, &api, &cluster, token, &node).await;
        local.push(run_pod(&http, &api, &node, &node, hello.to_str().unwrap(), None).await);
        let node = format!("fetch-{i}");
        let _b = agent(&http, &api, &cluster, token, &node).await;
        fetched.push(
            run_pod(
                &http,
                &api,
                &node,
                &node,
                "/nonexistent/kapsel/hello.wasm",
                Some(&d),
            )
            .await,
        );
    }
    let (ml, mf) = (median(local), median(fetched));
    println!("| fresh agent, hello.wasm ({size_kib} KiB), POST → Succeeded, median of {reps} | local path (anchor) {ml:.1} ms | fetched by digest {mf:.1} ms ({:.2}×) |", mf / ml);

    let big = repo("sample-pods/http-server/app.wasm");
    if let Ok(bytes) = std::fs::read(&big) {
        let mb = bytes.len() as f64 / (1 << 20) as f64;
        let d = put(&http, &api, bytes).await;
        let (mut disk, mut wire) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            let b = std::fs::read(&big).unwrap();
            assert_eq!(digest(&b), d);
            disk.push(t.elapsed());
            let t = Instant::now();
            let r = http
                .get(format!("{api}/v1-kapsel/modules/{d}"))
                .send()
                .await
                .unwrap();
            let b = r.bytes().await.unwrap();
            assert_eq!(digest(&b), d);
            wire.push(t.elapsed());
        }
        let (md, mw) = (median(disk), median(wire));
        println!("| {mb:.1} MB component, bytes + sha256, median of {reps} | read file (anchor) {md:.1} ms | GET from the module store {mw:.1} ms ({:.2}×) |", mw / md);
    }
}
