//! Test harness: a real `kapsel serve` process on 127.0.0.1:0 with its own data directory,
//! driven through the real CLI and HTTP API; real `kapsel agent` processes joined to it
//! ([`AgentProc`], [`cluster_server`], [`wait_node_ready`]); `kapsel logs -f` as a child
//! ([`LogsFollow`]) and the metrics-adapter pod the remote-node tests share ([`adapter_pod`]).
//! Waits are polls with deadlines, never sleeps.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod netns;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_kapsel")
}

pub fn fixture(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
        .display()
        .to_string()
}

pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub struct Kapsel {
    pub child: Option<Child>,
    pub url: String,
    pub data: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub stderr: Arc<Mutex<String>>,
    pub http: reqwest::Client,
    extra: Vec<String>,
    /// Unique per server: tests run in parallel and Docker objects are labelled by node.
    pub node: String,
}

impl Kapsel {
    /// A fresh server with short back-offs (so restart tests take seconds, not minutes).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let node = format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        Self::start_named(&node, extra)
    }

    /// A fresh server (own data directory) with a given node name.
    pub fn start_named(node: &str, extra: &[&str]) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("kapsel-test-")
            .tempdir()
            .unwrap();
        let data = tmp.path().to_path_buf();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let node = node.to_string();
        let (child, url, stderr) = spawn(&data, &node, &extra);
        Kapsel {
            node,
            child: Some(child),
            url,
            data,
            _tmp: Some(tmp),
            stderr,
            http: reqwest::Client::new(),
            extra,
        }
    }

    /// `kill -9` the server (pods die with it).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) takes plain integers; the pid is our own child, not yet reaped (so not reused).
            unsafe {
                libc::kill(c.id() as i32, libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    /// Start again on the same data directory (after `kill9`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        let (child, url, stderr) = spawn(&self.data, &self.node, &self.extra);
        self.child = Some(child);
        self.url = url;
        self.stderr = stderr;
    }

    /// The cluster listener's `https://` URL (a server started with `--cluster-listen`).
    pub fn cluster_url(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let buf = self.stderr.lock().unwrap().clone();
            if let Some(i) = buf.find("cluster listener on https://") {
                let rest = &buf[i + "cluster listener on ".len()..];
                return rest.split_whitespace().next().unwrap().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no cluster listener line:\n{buf}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's join token (`<data-dir>/token`).
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data.join("token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A counter or gauge from `/metrics` (the whole series name with labels).
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, v) = self.get("/metrics").await;
        let text = v.as_str().unwrap_or_default().to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Run the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--server")
            .arg(&self.url)
            .args(args)
            .output()
            .unwrap()
    }

    /// Write a manifest into the data dir and `kapsel apply -f` it; panics if apply fails.
    pub fn apply(&self, name: &str, yaml: &str) {
        let out = self.try_apply(name, yaml);
        assert!(
            out.status.success(),
            "apply failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn try_apply(&self, name: &str, yaml: &str) -> Output {
        let path = self.data.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        self.cli(&["apply", "-f", path.to_str().unwrap()])
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let r = req.send().await.unwrap();
        let code = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn pod(&self, name: &str) -> Option<Value> {
        let (code, v) = self
            .get(&format!("/api/v1/namespaces/default/pods/{name}"))
            .await;
        (code == 200).then_some(v)
    }

    /// Poll the pod until `pred` holds; panics with the last seen object after `secs`.
    pub async fn wait_pod(&self, name: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(p) = self.pod(name).await {
                if pred(&p) {
                    return p;
                }
                last = p;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "pod {name} did not reach the expected state in {secs}s; last seen:\n{}\nserver stderr:\n{}",
            serde_json::to_string_pretty(&last).unwrap(),
            self.stderr.lock().unwrap()
        );
    }

    pub async fn wait_gone(&self, name: &str, secs: u64) -> Duration {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            if self.pod(name).await.is_none() {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("pod {name} still exists after {secs}s");
    }

    pub async fn logs(&self, pod: &str, container: &str) -> String {
        let r = self
            .http
            .get(format!(
                "{}/api/v1/namespaces/default/pods/{pod}/log?container={container}",
                self.url
            ))
            .send()
            .await
            .unwrap();
        r.text().await.unwrap()
    }

    pub async fn events_for(&self, pod: &str) -> Vec<Value> {
        let (_, v) = self.get("/api/v1/namespaces/default/events").await;
        v["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["involvedObject"]["name"] == pod)
            .collect()
    }
}

impl Drop for Kapsel {
    /// Stop the server the way a user does (SIGTERM: it stops its pods and removes their
    /// containers), then make sure no container of this node is left either way.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) takes plain integers; the pid is our own child, not yet reaped (so not reused).
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // This server's containers: by its data directory's node id (another server may
        // share the node name), else by node name.
        let label = match std::fs::read_to_string(self.data.join("node-id")) {
            Ok(id) if !id.trim().is_empty() => format!("io.kapsel.node-id={}", id.trim()),
            _ => format!("io.kapsel.node={}", self.node),
        };
        let left = docker_ids(&label);
        if !left.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&left)
                .output();
        }
    }
}

fn spawn(data: &Path, node: &str, extra: &[String]) -> (Child, String, Arc<Mutex<String>>) {
    // A test that restarts the server with agents attached gives a fixed `--listen`.
    let listen: &[&str] = if extra.iter().any(|a| a == "--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    };
    let mut child = Command::new(bin())
        .arg("serve")
        .args(listen)
        .args(["--node-name", node])
        .arg("--data-dir")
        .arg(data)
        .args(["--backoff-initial", "200ms", "--backoff-max", "2s"])
        .args(extra)
        .env("KAPSEL_LOG", "warn")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let buf = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let b2 = buf.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("API on http://") {
                let url = line[i + 7..].split_whitespace().next().unwrap().to_string();
                if let Some(t) = tx.take() {
                    let _ = t.send(url);
                }
            }
            let mut b = b2.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("kapsel serve did not start: {}", buf.lock().unwrap()));
    (child, url, buf)
}

/// A one-container pod manifest.
pub fn pod_yaml(
    name: &str,
    image: &str,
    args: &[&str],
    policy: &str,
    extra_container: &str,
) -> String {
    let args = args
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: {policy}\n  containers:\n  - name: main\n    image: {image}\n    args: [{args}]\n{extra_container}"
    )
}

pub fn state(pod: &Value, container: usize) -> &Value {
    &pod["status"]["containerStatuses"][container]["state"]
}

pub fn phase(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or("")
}

/// The pod's `Ready` condition is `True`.
pub fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// The value of env var `name` of the pod's first container (`""` when unset).
pub fn first_env(pod: &Value, name: &str) -> String {
    pod["spec"]["containers"][0]["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == name))
        .and_then(|e| e["value"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The pods labelled `app=<app>` that are not terminating.
pub async fn live_pods(k: &Kapsel, app: &str) -> Vec<Value> {
    let (_, v) = k
        .get(&format!(
            "/api/v1/namespaces/default/pods?labelSelector=app%3D{app}"
        ))
        .await;
    v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .collect()
}

/// Container ids Docker has with this label (`key=value`), running or not.
pub fn docker_ids(label: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "-q", "--no-trunc", "--filter"])
        .arg(format!("label={label}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

pub const BUSYBOX: &str = "kapsel-test/busybox:1";

/// Build a WASI 0.2 component from its source dir (scripts/build-guests.sh), returning its path.
pub fn component(dir: &str) -> String {
    let out = Command::new(repo("scripts/build-guests.sh"))
        .args(["--component-if-missing", &repo(dir).display().to_string()])
        .output()
        .expect("run build-guests.sh");
    assert!(
        out.status.success(),
        "building {dir} failed (run scripts/install-deps.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `http://127.0.0.1:{port}{path}`: the body of a 2xx answer, None otherwise.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text().await.ok()
}

/// Poll `f` until it gives `Some`; panics naming `what` after `secs` (with `f`'s last note).
pub async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {secs}s waiting for {what}; last seen:\n{last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Where `kapsel up` keeps compiled modules in tests: one per-user cache (0700) under the
/// target directory, shared by every `up` the tests start, so an 18 MB component is compiled
/// once per build tree, never in the user's own `~/.cache`.
pub fn up_module_cache() -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kapsel-up-cache");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .unwrap();
    dir
}

/// `kapsel up -f MANIFEST` run from the checkout as the README runs it (on `127.0.0.1:0`, its
/// own temporary data directory), with its stdout (the containers' `pod/container | line`s)
/// and stderr (progress) collected as they come.
pub struct Up {
    child: Option<Child>,
    pub stdout: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
    /// The embedded API, for client commands.
    pub url: String,
    /// The node id of up's data directory: its Docker containers carry it.
    pub node_id: String,
}

impl Up {
    pub fn start(manifest: &str) -> Up {
        let mut child = Command::new(bin())
            .current_dir(repo(""))
            .env("XDG_CACHE_HOME", up_module_cache())
            .env("KAPSEL_LOG", "warn")
            .args(["up", "-f", manifest, "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |r: Box<dyn std::io::Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    let mut b = b.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
            });
            buf
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        let mut up = Up {
            child: Some(child),
            stdout,
            stderr,
            url: String::new(),
            node_id: String::new(),
        };
        // "kapsel: control plane + node up at http://ADDR (data: DIR)"
        let deadline = Instant::now() + Duration::from_secs(30);
        let (url, data) = loop {
            let err = up.stderr.lock().unwrap().clone();
            if let Some(l) = err
                .lines()
                .find(|l| l.contains("control plane + node up at "))
            {
                let rest = l.split("up at ").nth(1).unwrap();
                let url = rest.split_whitespace().next().unwrap().to_string();
                let data = rest.split("(data: ").nth(1).unwrap().trim_end_matches(')');
                break (url, PathBuf::from(data));
            }
            if let Some(s) = up.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("kapsel up -f {manifest} exited ({s}) before starting:\n{err}");
            }
            assert!(
                Instant::now() < deadline,
                "kapsel up -f {manifest} did not start:\n{err}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        up.url = url;
        up.node_id = std::fs::read_to_string(data.join("node-id"))
            .unwrap_or_default()
            .trim()
            .to_string();
        assert!(!up.node_id.is_empty(), "no node-id in {}", data.display());
        up
    }

    /// Run a client command against up's embedded API.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--server")
            .arg(&self.url)
            .args(args)
            .output()
            .unwrap()
    }

    /// Poll up's stdout until `pred` holds on it; panics with both streams after `secs`.
    pub async fn wait_stdout(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        wait_for(what, secs, || async {
            let out = self.stdout.lock().unwrap().clone();
            if pred(&out) {
                Ok(out)
            } else {
                Err(format!(
                    "stdout:\n{out}\nstderr:\n{}",
                    self.stderr.lock().unwrap()
                ))
            }
        })
        .await
    }

    /// Ctrl-C's path (SIGTERM): the exit status and up's stderr, once it has exited.
    pub async fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let mut c = self.child.take().expect("already stopped");
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "kapsel up did not stop within 60s of SIGTERM:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The reader threads finish at EOF; give them a moment to take the last lines.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !self.stderr.lock().unwrap().contains("kapsel: stopped")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (status, self.stderr.lock().unwrap().clone())
    }

    /// Docker containers of this `up` still present.
    pub fn containers_left(&self) -> Vec<String> {
        docker_ids(&format!("io.kapsel.node-id={}", self.node_id))
    }
}

impl Drop for Up {
    /// A failed test still stops `up` and removes whatever containers it left.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let left = self.containers_left();
        if !left.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&left)
                .output();
        }
    }
}

/// `git` in `dir` with a fixed author; panics with git's stderr when it fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare git remote (branch `main`) in a temporary directory and a work clone to push from.
pub struct Remote {
    _dir: tempfile::TempDir,
    pub bare: PathBuf,
    pub work: PathBuf,
}

impl Remote {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("site.git");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        git(
            dir.path(),
            &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
        );
        git(&work, &["init", "-q", "-b", "main"]);
        Remote {
            _dir: dir,
            bare,
            work,
        }
    }

    /// Commit `files` (name → content) and push to `main`; returns the commit hash.
    pub fn commit(&self, files: &[(&str, String)]) -> String {
        for (name, content) in files {
            std::fs::write(self.work.join(name), content).unwrap();
        }
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", "update"]);
        git(
            &self.work,
            &[
                "push",
                "-q",
                "-f",
                self.bare.to_str().unwrap(),
                "HEAD:refs/heads/main",
            ],
        );
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Commit `content` as `v.txt` and push; returns the commit hash.
    pub fn commit_text(&self, content: &str) -> String {
        self.commit(&[("v.txt", content.to_string())])
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }
}

/// A pod with `builtin/git-sync` (volume `git` at /git, a native sidecar) beside `app` (YAML
/// list items under `containers:`).
pub fn gitsync_pod(name: &str, args: &[String], app: &str) -> String {
    let args: Vec<String> = args
        .iter()
        .map(|a| serde_json::to_string(a).unwrap())
        .collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  volumes: [{{name: git, emptyDir: {{}}}}]\n  initContainers:\n  - name: git-sync\n    image: builtin/git-sync\n    restartPolicy: Always\n    args: [{}]\n    volumeMounts: [{{name: git, mountPath: /git}}]\n  containers:\n{app}",
        args.join(", ")
    )
}

/// A `kapsel agent` process with its own data directory, killed on drop.
pub struct AgentProc {
    pub child: Child,
    pub data: tempfile::TempDir,
    pub node: String,
    pub stderr: Arc<Mutex<String>>,
    stderr_done: Arc<std::sync::atomic::AtomicBool>,
}

/// Read `r` line by line into a buffer on a thread; the flag turns true at end of input.
fn collect_lines(
    r: Box<dyn std::io::Read + Send>,
) -> (Arc<Mutex<String>>, Arc<std::sync::atomic::AtomicBool>) {
    let buf = Arc::new(Mutex::new(String::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (b, d) = (buf.clone(), done.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut b = b.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
        d.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    (buf, done)
}

impl AgentProc {
    /// An agent joining `server` (WASM-only, short back-offs).
    pub fn start(server: &str, node: &str, node_ip: &str) -> Self {
        Self::start_with(server, node, node_ip, &[])
    }

    pub fn start_with(server: &str, node: &str, node_ip: &str, extra: &[&str]) -> Self {
        let data = tempfile::Builder::new()
            .prefix("kapsel-agent-")
            .tempdir()
            .unwrap();
        Self::start_in(data, server, node, node_ip, extra)
    }

    /// An agent on a given data directory (a restart keeps its certificate).
    pub fn start_in(
        data: tempfile::TempDir,
        server: &str,
        node: &str,
        node_ip: &str,
        extra: &[&str],
    ) -> Self {
        Self::start_in_netns(
            None,
            data,
            server,
            node,
            node_ip,
            &[&["--no-docker"], extra].concat(),
        )
    }

    /// An agent that runs OCI containers too (the machine's Docker). Its containers carry
    /// `io.kapsel.node=<node>`: the test removes them.
    pub fn start_with_docker(server: &str, node: &str, node_ip: &str, extra: &[&str]) -> Self {
        let data = tempfile::Builder::new()
            .prefix("kapsel-agent-")
            .tempdir()
            .unwrap();
        Self::start_in_netns(None, data, server, node, node_ip, extra)
    }

    /// An agent inside network namespace `netns` (see [`netns::NetLab`]) when given; `extra`
    /// says `--no-docker` for a WASM-only node.
    pub fn start_in_netns(
        netns: Option<&str>,
        data: tempfile::TempDir,
        server: &str,
        node: &str,
        node_ip: &str,
        extra: &[&str],
    ) -> Self {
        // `ip netns exec` enters the namespace and execs the agent: the child is the agent.
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin()]);
                c
            }
            None => Command::new(bin()),
        };
        let mut child = cmd
            .args(["--server", server, "agent", "--node-name", node])
            .args(["--node-ip", node_ip])
            .arg("--data-dir")
            .arg(data.path())
            .args(["--backoff-initial", "200ms", "--backoff-max", "2s"])
            .args(extra)
            .env("KAPSEL_LOG", "warn")
            .env_remove("KAPSEL_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (stderr, stderr_done) = collect_lines(Box::new(child.stderr.take().unwrap()));
        AgentProc {
            child,
            data,
            node: node.to_string(),
            stderr,
            stderr_done,
        }
    }

    /// Wait for the agent to exit (it should); its status and stderr.
    pub fn wait_exit(&mut self, secs: u64) -> (std::process::ExitStatus, String) {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "agent did not exit: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread drains the pipe to its end.
        let t = Instant::now();
        while !self.stderr_done.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "agent stderr never closed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        (status, self.stderr.lock().unwrap().clone())
    }

    /// Stop it (SIGKILL) and hand back its data directory.
    pub fn stop(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let data = tempfile::Builder::new().tempdir().unwrap();
        std::mem::replace(&mut self.data, data)
    }

    /// Send a signal to the agent process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// `kill -9` and reap it.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        // A stopped process must be continued to die of SIGKILL promptly everywhere.
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server with a cluster listener on a fixed 127.0.0.1 port (so a restart keeps it): the
/// server, the listener's `https://` URL and its join token.
pub fn cluster_server() -> (Kapsel, String, String) {
    let port = free_port();
    let k = Kapsel::start_with(&["--cluster-listen", &format!("127.0.0.1:{port}")]);
    let url = k.cluster_url();
    let token = k.token();
    assert!(token.starts_with("K10"), "{token}");
    (k, url, token)
}

/// A node name unique to this run: `<prefix>-<6 hex>`.
pub fn node_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    )
}

/// Poll until `node` (the agent's) is Ready; panics with the Node and the agent's stderr
/// after 30 s.
pub async fn wait_node_ready(k: &Kapsel, node: &str, agent: &AgentProc) {
    wait_for(&format!("node {node} Ready"), 30, || async {
        let (code, n) = k.get(&format!("/api/v1/nodes/{node}")).await;
        if code == 200 && n["status"]["conditions"][0]["status"] == "True" {
            Ok(())
        } else {
            Err(format!(
                "{n}\nagent stderr:\n{}",
                agent.stderr.lock().unwrap()
            ))
        }
    })
    .await
}

/// An HTTP client that presents a joined node's certificate to the cluster listener.
pub fn node_http(agent_data: &std::path::Path) -> reqwest::Client {
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

/// The highest `tick N` in `text` (the ticker fixture's output).
pub fn last_tick(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// Poll `kapsel logs ARGS…` until it shows `tick N` with N ≥ `at_least`; its output.
pub async fn wait_ticks(k: &Kapsel, args: &[&str], at_least: u64) -> String {
    let args = [&["logs"], args].concat();
    wait_for("ticks in `kapsel logs`", 30, || async {
        let out = k.cli(&args);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success() && last_tick(&text) >= at_least)
            .then(|| text.clone())
            .ok_or_else(|| format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    })
    .await
}

/// `kapsel logs -f ARGS…` as a child process, its stdout collected; killed on drop.
pub struct LogsFollow {
    pub child: Child,
    pub seen: Arc<Mutex<String>>,
}

impl LogsFollow {
    pub fn start(k: &Kapsel, args: &[&str]) -> LogsFollow {
        let mut child = Command::new(bin())
            .args(["--server", &k.url, "logs", "-f"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (seen, _) = collect_lines(Box::new(child.stdout.take().unwrap()));
        LogsFollow { child, seen }
    }

    /// Poll until the follow shows a tick 5 past the last one `kapsel logs ARGS…` shows now
    /// (after the follow started): lines written while it follows arrive.
    pub async fn wait_new_ticks(&self, k: &Kapsel, args: &[&str]) {
        let out = k.cli(&[&["logs"], args].concat());
        let started = last_tick(&String::from_utf8_lossy(&out.stdout));
        assert!(started >= 1, "`kapsel logs` shows no tick: {out:?}");
        wait_for("new ticks through `kapsel logs -f`", 30, || async {
            let s = self.seen.lock().unwrap().clone();
            (last_tick(&s) >= started + 5)
                .then_some(())
                .ok_or_else(|| format!("started at {started}; the follow saw:\n{s}"))
        })
        .await
    }
}

impl Drop for LogsFollow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A metrics-adapter configuration (`sources.yaml` in a new temporary directory): the gauge
/// `shop_jobs` from the line `jobs N` of `/data/status.txt`.
pub fn shop_jobs_config() -> tempfile::TempDir {
    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(
        cfg.path().join("sources.yaml"),
        "lines:\n- name: status\n  file: /data/status.txt\n  interval: 100ms\n  rules:\n  - {regex: '^jobs (?P<n>\\d+)', name: shop_jobs, value: '$n'}\n",
    )
    .unwrap();
    cfg
}

/// A pod bound to `node` whose init container writes `jobs 42` for a metrics adapter
/// (listening on the node's 127.0.0.1:9102, configured from `cfg`, see [`shop_jobs_config`]),
/// after `containers` (YAML list items, may be empty).
pub fn adapter_pod(name: &str, node: &str, cfg: &Path, containers: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
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
{containers}  - name: adapter
    image: builtin/metrics-adapter
    args: ["--config=/etc/adapter/sources.yaml", "--web.listen-address=127.0.0.1:9102"]
    volumeMounts: [{{name: cfg, mountPath: /etc/adapter}}, {{name: data, mountPath: /data}}]
"#,
        cfg = cfg.display(),
        files = fixture("files/files.wasm"),
    )
}

/// Poll the pod's adapter-metrics endpoint until the adapter reports `shop_jobs` 42; the answer.
pub async fn wait_shop_jobs(k: &Kapsel, pod: &str) -> Value {
    wait_for(&format!("shop_jobs from {pod}'s adapter"), 30, || async {
        let (code, v) = k
            .get(&format!("/api/v1/namespaces/default/pods/{pod}/metrics"))
            .await;
        let found = v["items"].as_array().is_some_and(|is| {
            is.iter().any(|i| {
                i["metric"] == "shop_jobs" && i["value"] == 42.0 && i["container"] == "adapter"
            })
        });
        (code == 200 && found)
            .then(|| v.clone())
            .ok_or_else(|| format!("{code} {v}"))
    })
    .await
}
