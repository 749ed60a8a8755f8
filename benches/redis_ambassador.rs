//! Redis ambassador vs twemproxy vs direct Redis, side by side in one run.
//!
//! Starts a redis-server master and two replicas, nutcracker (twemproxy) in front of the master,
//! and `kapsel redis-ambassador` in front of all three, all on 127.0.0.1. Then runs
//! `redis-benchmark -t get,set -c 50` at `-P 1` and `-P 16` against each target, interleaved,
//! `REPS` times (default 5), and prints medians of requests/s, p50 and p99 latency, and the CPU
//! seconds each process used per million commands (from /proc/PID/stat).
//!
//! `cargo bench --bench redis_ambassador` (env: REPS, REQUESTS)

use std::process::{Child, Command, Stdio};
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

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf takes an integer name and has no other preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let u: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let s: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (u + s) / ticks
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

#[derive(Default, Clone)]
struct Sample {
    rps: f64,
    p50: f64,
    p99: f64,
}

/// One redis-benchmark run: per test (SET, GET) its numbers.
fn bench(port: u16, pipeline: u32, n: u32) -> Vec<(String, Sample)> {
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &port.to_string(),
            "-t",
            "set,get",
            "-c",
            "50",
            "-r",
            "100000",
        ])
        .args(["-n", &n.to_string(), "-P", &pipeline.to_string(), "--csv"])
        .stderr(Stdio::null())
        .output()
        .expect("redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut res = Vec::new();
    for line in text.lines().skip(1) {
        // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
        let f: Vec<String> = line
            .split(',')
            .map(|s| s.trim_matches('"').to_string())
            .collect();
        if f.len() < 7 {
            continue;
        }
        res.push((
            f[0].clone(),
            Sample {
                rps: f[1].parse().unwrap_or(0.0),
                p50: f[4].parse().unwrap_or(0.0),
                p99: f[6].parse().unwrap_or(0.0),
            },
        ));
    }
    res
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let n: u32 = std::env::var("REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    let redis = |port: u16, replica_of: Option<u16>| -> Proc {
        let mut c = Command::new("redis-server");
        c.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path());
        if let Some(m) = replica_of {
            c.args(["--replicaof", "127.0.0.1", &m.to_string()]);
        }
        let p = Proc(
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server"),
        );
        wait_port(port);
        p
    };
    let (mp, r1p, r2p, np, ap) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let master = redis(mp, None);
    let _r1 = redis(r1p, Some(mp));
    let _r2 = redis(r2p, Some(mp));
    for p in [r1p, r2p] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cli(p, &["INFO", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "replica {p} never synced");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let conf = dir.path().join("nutcracker.yml");
    std::fs::write(
        &conf,
        format!(
            "alpha:\n  listen: 127.0.0.1:{np}\n  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  auto_eject_hosts: false\n  servers:\n   - 127.0.0.1:{mp}:1\n"
        ),
    )
    .unwrap();
    let nut = Proc(
        Command::new("nutcracker")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path().join("nut.pid"))
            .arg("-o")
            .arg(dir.path().join("nut.log"))
            .spawn()
            .expect("nutcracker (apt-get install nutcracker)"),
    );
    wait_port(np);
    let amb = Proc(
        Command::new(env!("CARGO_BIN_EXE_kapsel"))
            .arg("redis-ambassador")
            .arg(format!("--listen=127.0.0.1:{ap}"))
            .arg(format!("--master=127.0.0.1:{mp}"))
            .arg(format!("--replica=127.0.0.1:{r1p}"))
            .arg(format!("--replica=127.0.0.1:{r2p}"))
            .arg("--metrics-listen=off")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(ap);
    // Both replicas serving reads before measuring.
    std::thread::sleep(Duration::from_millis(1500));

    let targets: [(&str, u16, Option<u32>); 3] = [
        ("direct redis (master)", mp, None),
        ("twemproxy (nutcracker)", np, Some(nut.0.id())),
        ("kapsel ambassador", ap, Some(amb.0.id())),
    ];
    let master_pid = master.0.id();
    println!(
        "redis-benchmark -t set,get -c 50 -n {n}, {reps} interleaved reps, medians; {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    // results[pipeline][target][test] -> samples; cpu per million commands (proxy, servers)
    for pipeline in [1u32, 16] {
        let mut samples: Vec<Vec<(String, Vec<Sample>)>> = vec![Vec::new(); targets.len()];
        let mut proxy_cpu = vec![Vec::new(); targets.len()];
        let mut server_cpu = vec![Vec::new(); targets.len()];
        for _ in 0..reps {
            for (ti, (_, port, proxy)) in targets.iter().enumerate() {
                let p0 = proxy.map(cpu_secs).unwrap_or(0.0);
                let s0 = cpu_secs(master_pid);
                let res = bench(*port, pipeline, n);
                let p1 = proxy.map(cpu_secs).unwrap_or(0.0);
                let s1 = cpu_secs(master_pid);
                let cmds = 2.0 * n as f64 / 1e6;
                proxy_cpu[ti].push((p1 - p0) / cmds);
                server_cpu[ti].push((s1 - s0) / cmds);
                for (test, s) in res {
                    match samples[ti].iter_mut().find(|(t, _)| *t == test) {
                        Some((_, v)) => v.push(s),
                        None => samples[ti].push((test, vec![s])),
                    }
                }
            }
        }
        println!("\n-P {pipeline}");
        println!(
            "| target | SET req/s | GET req/s | SET p50/p99 ms | GET p50/p99 ms | proxy CPU s per 1M cmds | master redis-server CPU s per 1M cmds |"
        );
        println!("|---|---|---|---|---|---|---|");
        let mut rps = vec![[0.0f64; 2]; targets.len()];
        for (ti, (name, _, proxy)) in targets.iter().enumerate() {
            let get = |test: &str| -> Sample {
                samples[ti]
                    .iter()
                    .find(|(t, _)| t == test)
                    .map(|(_, v)| Sample {
                        rps: median(v.iter().map(|s| s.rps).collect()),
                        p50: median(v.iter().map(|s| s.p50).collect()),
                        p99: median(v.iter().map(|s| s.p99).collect()),
                    })
                    .unwrap_or_default()
            };
            let (set, getr) = (get("SET"), get("GET"));
            rps[ti] = [set.rps, getr.rps];
            println!(
                "| {name} | {:.0} | {:.0} | {:.3} / {:.3} | {:.3} / {:.3} | {} | {:.2} |",
                set.rps,
                getr.rps,
                set.p50,
                set.p99,
                getr.p50,
                getr.p99,
                if proxy.is_some() {
                    format!("{:.2}", median(proxy_cpu[ti].clone()))
                } else {
                    "-".into()
                },
                median(server_cpu[ti].clone()),
            );
        }
        let ratio = |a: usize, b: usize, i: usize| rps[a][i] / rps[b][i];
        println!(
            "ratios: ambassador/direct SET {:.2}× GET {:.2}×; twemproxy/direct SET {:.2}× GET {:.2}×; ambassador/twemproxy SET {:.2}× GET {:.2}×",
            ratio(2, 0, 0),
            ratio(2, 0, 1),
            ratio(1, 0, 0),
            ratio(1, 0, 1),
            ratio(2, 1, 0),
            ratio(2, 1, 1)
        );
    }
    drop(amb);
    drop(nut);
}
