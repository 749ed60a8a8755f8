//! A cluster on loopback for the cluster benches: one `kapsel serve --cluster-listen` (release
//! binary, its own data directory) and real `kapsel agent` processes (WASM-only, each with its
//! own data directory, joined over TLS with the server's token). Every process is killed when
//! its handle is dropped. Also /proc readers for CPU time and RSS.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_kapsel")
}

/// `serve` with a cluster listener; its own node is named `control`.
pub struct ClusterServer {
    pub child: Child,
    pub api: String,
    pub cluster: String,
    pub token: String,
    pub dir: tempfile::TempDir,
}

impl Drop for ClusterServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_server(extra: &[&str]) -> ClusterServer {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--node-name", "control"])
        .args(["--cluster-listen", "127.0.0.1:0", "--no-docker"])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
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
    // Keep draining the server's log so it never blocks on a full pipe; echo warnings.
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if std::env::var_os("BENCH_VERBOSE").is_some() {
                eprintln!("serve: {l}");
            }
        }
    });
    let token = std::fs::read_to_string(dir.path().join("token"))
        .unwrap()
        .trim()
        .to_string();
    ClusterServer {
        child,
        api,
        cluster,
        token,
        dir,
    }
}

/// One `kapsel agent` process. Its data directory outlives a kill so it can be restarted
/// with its kept certificate.
pub struct Agent {
    pub name: String,
    pub child: Option<Child>,
    pub data: PathBuf,
    log: PathBuf,
    server: String,
    token: String,
    extra: Vec<String>,
}

impl Agent {
    pub fn start(root: &Path, s: &ClusterServer, name: &str, extra: &[&str]) -> Agent {
        let mut a = Agent {
            name: name.to_string(),
            child: None,
            data: root.join(name),
            log: root.join(format!("{name}.log")),
            server: s.cluster.clone(),
            token: s.token.clone(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        a.spawn();
        a
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin())
            .args(["--server", &self.server, "agent", "--no-docker"])
            .args(["--node-name", &self.name, "--token", &self.token])
            .arg("--data-dir")
            .arg(&self.data)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `kill -9`, reaped.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// utime + stime of a process, in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Resident set size of a process, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A field of `/proc/<pid>/smaps_rollup`, in KiB (`Pss`, `Private_Dirty`, …).
pub fn smaps_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Memory only this process holds (USS: private clean + private dirty), in KiB.
pub fn uss_kib(pid: u32) -> u64 {
    smaps_kib(pid, "Private_Clean") + smaps_kib(pid, "Private_Dirty")
}

pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

pub fn node_ready(n: &Value) -> bool {
    n["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .is_some_and(|c| c["status"] == "True")
}

/// Names of the Ready nodes.
pub async fn ready_nodes(http: &reqwest::Client, api: &str) -> Vec<String> {
    let v = get_json(http, &format!("{api}/api/v1/nodes")).await;
    v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|n| node_ready(n))
        .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
        .collect()
}

/// Poll (every 50 ms) until every one of `names` is a Ready node; the time it took.
pub async fn wait_nodes_ready(
    http: &reqwest::Client,
    api: &str,
    names: &[String],
    deadline: Duration,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let ready = ready_nodes(http, api).await;
        let missing = names.iter().filter(|n| !ready.contains(n)).count();
        if missing == 0 {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < deadline,
            "{missing} of {} nodes not Ready after {deadline:?}",
            names.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn sleep_wat() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sleep.wat")
        .display()
        .to_string()
}

/// A Deployment `name` of `replicas` idle WASM pods (`sleep.wat`, 1 MiB limit).
pub fn deployment(name: &str, replicas: usize) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {
                "containers": [{"name": "main", "image": sleep_wat(),
                    "resources": {"limits": {"memory": "1Mi"}}}]}}}})
}

/// Cordon the server's own node (`control`), so pods go to the agents only.
pub fn cordon_control(s: &ClusterServer) {
    let out = Command::new(bin())
        .args(["--server", &s.api, "cordon", "control"])
        .output()
        .unwrap();
    assert!(out.status.success(), "cordon: {out:?}");
}

/// A series' value from the server's `/metrics`.
pub async fn metric(http: &reqwest::Client, api: &str, series: &str) -> f64 {
    let t = http
        .get(format!("{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    t.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

pub fn pod_ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
