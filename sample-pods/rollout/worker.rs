//! rollout/worker — a long-running WASI preview-1 worker for the Deployment sample: it announces
//! its version (VERSION) and pod (HOSTNAME), then reports that it is alive every INTERVAL_MS
//! (default 2000). With CRASH=1 it exits 1 at once: the "broken release" of the sample.
use std::io::Write;
use std::time::Duration;

fn main() {
    let version = std::env::var("VERSION").unwrap_or_else(|_| "v1".into());
    let pod = std::env::var("HOSTNAME").unwrap_or_else(|_| "?".into());
    if std::env::var("CRASH").as_deref() == Ok("1") {
        eprintln!("{pod}: release {version} is broken: exiting 1");
        std::process::exit(1);
    }
    let every: u64 = std::env::var("INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    println!("{pod}: release {version} started");
    let mut n: u64 = 0;
    loop {
        std::thread::sleep(Duration::from_millis(every));
        n += 1;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{pod}: release {version} alive ({n})");
        let _ = out.flush();
    }
}
