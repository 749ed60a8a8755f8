//! Node API latency through the tunnel (release build): `GET .../pods/NAME/log` of a pod on the
//! embedded node of `kapsel serve` (anchor: read in-process) vs of a pod on a `kapsel agent`
//! joined over TLS (the API server → HTTP/2 stream in the agent's tunnel → the agent's node
//! API → back), side by side in one run, same short log (one line). N requests each (default
//! 300), sequential on one keep-alive connection, interleaved; medians and p90.
//!
//! Run: `cargo bench --bench tunnel_log` (N to change). Prints a Markdown line.

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

fn pod(name: &str, node: &str) -> String {
    let ticker = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ticker/ticker.wasm"
    );
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: main\n    image: {ticker}\n    env: [{{name: TICK_MS, value: '600000'}}]\n"
    )
}

async fn wait_log(http: &reqwest::Client, url: &str) {
    let t = Instant::now();
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status() == 200 && r.text().await.unwrap_or_default().starts_with("tick 1") {
                return;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{url} never served a log"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[v.len() / 2]), ms(v[v.len() * 9 / 10]))
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
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
    let adir = tempfile::tempdir().unwrap();
    let _agent = Proc(
        Command::new(bin())
            .args(["--server", &cluster, "agent", "--node-name", "remote"])
            .args(["--no-docker", "--token", token.trim()])
            .arg("--data-dir")
            .arg(adir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mdir = tempfile::tempdir().unwrap();
    for (name, node) in [("local", "bench"), ("far", "remote")] {
        let f = mdir.path().join(format!("{name}.yaml"));
        std::fs::write(&f, pod(name, node)).unwrap();
        let out = Command::new(bin())
            .args(["--server", &api, "apply", "-f"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let http = reqwest::Client::new();
    let local = format!("{api}/api/v1/namespaces/default/pods/local/log");
    let far = format!("{api}/api/v1/namespaces/default/pods/far/log");
    wait_log(&http, &local).await;
    wait_log(&http, &far).await;
    // Warm both paths.
    for _ in 0..20 {
        let _ = http.get(&local).send().await.unwrap().bytes().await;
        let _ = http.get(&far).send().await.unwrap().bytes().await;
    }
    let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        for (url, out) in [(&local, &mut a), (&far, &mut b)] {
            let t = Instant::now();
            let r = http.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let body = r.bytes().await.unwrap();
            out.push(t.elapsed());
            assert!(body.starts_with(b"tick 1"));
        }
    }
    let ((la, pa), (lb, pb)) = (stats(a), stats(b));
    println!(
        "| GET .../log, {n} requests each | embedded node (anchor) median {la:.3} ms, p90 {pa:.3} ms | remote node through the tunnel median {lb:.3} ms, p90 {pb:.3} ms ({:.2}× the anchor) |",
        lb / la
    );
}
