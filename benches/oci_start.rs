//! OCI pod start through Kapsel vs `docker run --rm` of the same image, side by side in one run,
//! plus a mixed pod (a WASM module and a container sharing one network namespace).
//! Run: `cargo bench --bench oci_start` (BENCH_N sets the runs per measurement; default 15).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "support/server.rs"]
mod server;

const IMAGE: &str = "kapsel-test/busybox:1";

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn busybox(name: &str) -> Value {
    json!({"name": name, "image": IMAGE, "imagePullPolicy": "Never", "command": ["/bin/busybox", "true"]})
}

async fn until_phase(http: &reqwest::Client, url: &str, name: &str, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = http
            .get(format!("{url}/api/v1/namespaces/default/pods/{name}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let p = v["status"]["phase"].as_str().unwrap_or("");
        if p == phase {
            return;
        }
        assert!(p != "Failed", "{name} failed: {v}");
        assert!(Instant::now() < deadline, "{name} stuck: {v}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let ok = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("{IMAGE} missing: run scripts/install-deps.sh");
        std::process::exit(1);
    }
    let mut srv = server::start_server("bench-oci", &[]);
    let url = srv.url.clone();
    let http = reqwest::Client::new();
    let quick = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quick.wat")
        .display()
        .to_string();
    let post = |name: String, containers: Vec<Value>| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let body = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {"restartPolicy": "Never", "containers": containers}});
            let r = http
                .post(format!("{url}/api/v1/namespaces/default/pods"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    };
    // Warm-up: the pause image, the compile cache, connections.
    post(
        "warm".into(),
        vec![busybox("c"), json!({"name": "w", "image": quick})],
    )
    .await;
    until_phase(&http, &url, "warm", "Succeeded").await;

    let (mut docker, mut oci, mut mixed) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        // Interleaved, so drift on the shared machine hits all three alike.
        let t = Instant::now();
        let s = Command::new("docker")
            .args(["run", "--rm", IMAGE, "/bin/busybox", "true"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(s.success());
        docker.push(t.elapsed().as_secs_f64() * 1000.0);

        let t = Instant::now();
        post(format!("oci{i}"), vec![busybox("c")]).await;
        until_phase(&http, &url, &format!("oci{i}"), "Succeeded").await;
        oci.push(t.elapsed().as_secs_f64() * 1000.0);

        let t = Instant::now();
        post(
            format!("mixed{i}"),
            vec![busybox("c"), json!({"name": "w", "image": quick})],
        )
        .await;
        until_phase(&http, &url, &format!("mixed{i}"), "Succeeded").await;
        mixed.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // SIGTERM: the server stops its pods and removes their containers.
    // SAFETY: kill(2) takes plain integers; the pid is our own child, not yet reaped (so not reused).
    unsafe {
        libc::kill(srv.child.id() as i32, libc::SIGTERM);
    }
    let _ = srv.child.wait();
    let (d50, d99) = (pct(&mut docker, 0.5), pct(&mut docker, 0.9));
    let (o50, o99) = (pct(&mut oci, 0.5), pct(&mut oci, 0.9));
    let (m50, m99) = (pct(&mut mixed, 0.5), pct(&mut mixed, 0.9));
    println!("### OCI pod start ({n} runs each, interleaved)\n");
    println!("| measurement | p50 | p90 | vs docker run (p50) |");
    println!("|---|---|---|---|");
    println!("| `docker run --rm {IMAGE} /bin/busybox true` | {d50:.0} ms | {d99:.0} ms | 1.00× |");
    println!(
        "| Kapsel OCI pod (same command), POST → Succeeded | {o50:.0} ms | {o99:.0} ms | {:.2}× |",
        o50 / d50
    );
    println!("| Kapsel mixed pod (busybox + WASM module, one netns), POST → Succeeded | {m50:.0} ms | {m99:.0} ms | {:.2}× |", m50 / d50);
}
