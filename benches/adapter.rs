//! Metrics adapter: StatsD ingestion against a bare UDP receiver, and `/metrics` scrape latency
//! with 100,000 series.
//!
//! 1. A sender thread blasts single-line StatsD datagrams at 127.0.0.1 for `SECS` seconds
//!    (default 3), first at a bare receiver thread that only counts datagrams (the machine's
//!    limit), then at `kapsel metrics-adapter` (counted by its own
//!    `kapsel_adapter_statsd_lines_total`). Interleaved, `REPS` times (default 3); medians.
//! 2. 100,000 distinct gauge series are fed to the adapter, then `/metrics` is fetched 30 times.
//!
//! `cargo bench --bench adapter`

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) the process has used, from `/proc/PID/stat`.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / tick
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Send for `secs` seconds; returns datagrams sent.
fn blast(port: u16, secs: f64) -> u64 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(("127.0.0.1", port)).unwrap();
    let lines: Vec<Vec<u8>> = (0..16)
        .map(|i| format!("bench.requests:1|c|#route:/r{i},method:GET").into_bytes())
        .collect();
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        for l in &lines {
            if s.send(l).is_ok() {
                n += 1;
            }
        }
    }
    n
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);

    // The bare receiver: a thread that counts datagrams.
    let bare = UdpSocket::bind("127.0.0.1:0").unwrap();
    let bare_port = bare.local_addr().unwrap().port();
    let count = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    {
        let (count, done) = (count.clone(), done.clone());
        bare.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !done.load(Ordering::Relaxed) {
                if bare.recv_from(&mut buf).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // The adapter without a mapping file, and one with a statsd_exporter mapping file whose
    // glob rules the bench's name goes through (several rules, so matching is exercised).
    let mapping_dir =
        std::env::temp_dir().join(format!("kapsel-bench-adapter-{}", std::process::id()));
    std::fs::create_dir_all(&mapping_dir).unwrap();
    let mapping = mapping_dir.join("mapping.yaml");
    std::fs::write(
        &mapping,
        "mappings:\n- {match: 'other.*.count', name: other_total}\n- {match: 'bench.*.errors', name: bench_errors_total}\n- match: 'bench.*'\n  name: 'bench_${1}_total'\n  labels: {app: bench, kind: '$1'}\n- {match: '*.*.*', name: three}\n",
    )
    .unwrap();
    let start = |mapping: Option<&std::path::Path>| {
        let (udp, web) = (free_port(), free_port());
        let mut c = Command::new(env!("CARGO_BIN_EXE_kapsel"));
        c.arg("metrics-adapter")
            .arg(format!("--statsd.listen-udp=127.0.0.1:{udp}"))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .arg("--max-series=300000")
            .stderr(Stdio::null());
        if let Some(m) = mapping {
            c.arg(format!("--statsd.mapping-config={}", m.display()));
        }
        let p = Proc(c.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while get(web, "/metrics").is_none() {
            assert!(Instant::now() < deadline, "adapter never served");
            std::thread::sleep(Duration::from_millis(50));
        }
        (p, udp, web)
    };
    let (plain, udp, web) = start(None);
    let (mapped, mudp, mweb) = start(Some(&mapping));

    // Lines/s and CPU µs per line of one adapter over one blast.
    let measure = |pid: u32, udp: u16, web: u16| -> (f64, f64) {
        let l0 = metric(
            &get(web, "/metrics").unwrap(),
            "kapsel_adapter_statsd_lines_total",
        );
        let c0 = cpu_secs(pid);
        blast(udp, secs);
        std::thread::sleep(Duration::from_millis(500));
        let c1 = cpu_secs(pid);
        let l1 = metric(
            &get(web, "/metrics").unwrap(),
            "kapsel_adapter_statsd_lines_total",
        );
        ((l1 - l0) / secs, (c1 - c0) * 1e6 / (l1 - l0).max(1.0))
    };
    let mut bare_rates = Vec::new();
    let mut sent_rates = Vec::new();
    let (mut plain_rates, mut plain_cpu) = (Vec::new(), Vec::new());
    let (mut mapped_rates, mut mapped_cpu) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let c0 = count.load(Ordering::Relaxed);
        let sent = blast(bare_port, secs);
        std::thread::sleep(Duration::from_millis(300));
        bare_rates.push((count.load(Ordering::Relaxed) - c0) as f64 / secs);
        sent_rates.push(sent as f64 / secs);
        let (r, c) = measure(plain.0.id(), udp, web);
        plain_rates.push(r);
        plain_cpu.push(c);
        let (r, c) = measure(mapped.0.id(), mudp, mweb);
        mapped_rates.push(r);
        mapped_cpu.push(c);
    }
    done.store(true, Ordering::Relaxed);
    let b = median(bare_rates);
    println!("StatsD ingestion, single-line datagrams, {secs}s x {reps} reps (medians):");
    println!("| receiver | lines/s | vs bare | adapter CPU per line |");
    println!("|---|---|---|---|");
    println!("| sender offered | {:.0} | | |", median(sent_rates));
    println!("| bare UDP receiver (counts datagrams) | {b:.0} | 1.00x | |");
    for (what, rates, cpu) in [
        (
            "kapsel metrics-adapter, no mapping file",
            plain_rates,
            plain_cpu,
        ),
        (
            "kapsel metrics-adapter, glob mapping file",
            mapped_rates,
            mapped_cpu,
        ),
    ] {
        let a = median(rates);
        println!(
            "| {what} | {a:.0} | {:.2}x | {:.2} µs |",
            a / b,
            median(cpu)
        );
    }
    drop(mapped);
    let _ = std::fs::remove_dir_all(&mapping_dir);

    // 100,000 series, fed in 50-line datagrams with pauses (UDP drops nothing then).
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = 100_000;
    let mut i = 0;
    while i < target {
        let mut d = String::new();
        for _ in 0..50 {
            d.push_str(&format!(
                "bench.series:{}|g|#shard:s{},id:i{}\n",
                i % 100,
                i % 10,
                i
            ));
            i += 1;
        }
        s.send_to(d.as_bytes(), ("127.0.0.1", udp)).unwrap();
        if i % 5000 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut series = 0.0;
    while Instant::now() < deadline {
        series = metric(&get(web, "/metrics").unwrap(), "kapsel_adapter_series");
        if series >= target as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut lat = Vec::new();
    let mut bytes = 0;
    for _ in 0..30 {
        let t = Instant::now();
        let page = get(web, "/metrics").unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        bytes = page.len();
    }
    println!(
        "\n/metrics with {series:.0} series held ({:.1} MiB page), 30 scrapes:",
        bytes as f64 / 1048576.0
    );
    println!("| p50 ms | p90 ms | max ms |");
    println!("|---|---|---|");
    println!(
        "| {:.1} | {:.1} | {:.1} |",
        pct(lat.clone(), 0.5),
        pct(lat.clone(), 0.9),
        pct(lat, 1.0)
    );
}
