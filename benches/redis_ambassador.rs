//! Redis ambassador vs twemproxy vs direct Redis, side by side in one run.
//!
//! Starts a redis-server master and two replicas, nutcracker (twemproxy) in front of the master,
//! and `kapsel redis-ambassador` in front of all three, all on 127.0.0.1. A second set of three
//! redis-servers listens on TLS ports only (certificates from a CA the bench makes), with a
//! second ambassador in front using `--tls`. Then runs `redis-benchmark -t get,set -c 50` at
//! `-P 1` and `-P 16` against each target (the TLS master directly with `redis-benchmark
//! --tls`), interleaved, `REPS` times (default 5), and prints medians of requests/s, p50 and p99
//! latency, and the CPU seconds each process used per million commands (from /proc/PID/stat).
//!
//! `cargo bench --bench redis_ambassador` (env: REPS, REQUESTS, PIPELINES=1,16)

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
    // SAFETY: sysconf only reads a system constant; no memory is passed.
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
fn bench(port: u16, pipeline: u32, n: u32, extra: &[String]) -> Vec<(String, Sample)> {
    let out = Command::new("redis-benchmark")
        .args(extra)
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
    // A CA and one certificate (127.0.0.1, localhost) for the TLS servers.
    let (ca_pem, cert_pem, key_pem) = {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a leaf named like its issuer looks self-signed to OpenSSL.
        ca.distinguished_name
            .push(DnType::CommonName, "kapsel bench CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, "redis.bench");
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let w = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        (
            w("ca.pem", ca_cert.pem()),
            w("cert.pem", cert.pem()),
            w("key.pem", key.serialize_pem()),
        )
    };
    let tls_server_args: Vec<String> = [
        "--tls-cert-file",
        &cert_pem,
        "--tls-key-file",
        &key_pem,
        "--tls-ca-cert-file",
        &ca_pem,
        "--tls-auth-clients",
        "no",
        "--tls-replication",
        "yes",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let redis_on = |port: u16, replica_of: Option<u16>, tls: bool| -> Proc {
        let mut c = Command::new("redis-server");
        if tls {
            c.args(["--port", "0", "--tls-port", &port.to_string()])
                .args(&tls_server_args);
        } else {
            c.args(["--port", &port.to_string()]);
        }
        c.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
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
    let redis = |port: u16, replica_of: Option<u16>| redis_on(port, replica_of, false);
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
    // The same over TLS: a master and two replicas on TLS ports, an ambassador with --tls.
    let (tmp, t1p, t2p, tap) = (free_port(), free_port(), free_port(), free_port());
    let tls_master = redis_on(tmp, None, true);
    let _t1 = redis_on(t1p, Some(tmp), true);
    let _t2 = redis_on(t2p, Some(tmp), true);
    let tls_cli: Vec<String> = ["--tls", "--cacert", &ca_pem]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for p in [t1p, t2p] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("redis-cli")
                .args(&tls_cli)
                .args(["-p", &p.to_string(), "INFO", "replication"])
                .output()
                .expect("redis-cli");
            if String::from_utf8_lossy(&out.stdout).contains("master_link_status:up") {
                break;
            }
            assert!(Instant::now() < deadline, "TLS replica {p} never synced");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let tls_amb = Proc(
        Command::new(env!("CARGO_BIN_EXE_kapsel"))
            .arg("redis-ambassador")
            .arg(format!("--listen=127.0.0.1:{tap}"))
            .arg(format!("--master=127.0.0.1:{tmp}"))
            .arg(format!("--replica=127.0.0.1:{t1p}"))
            .arg(format!("--replica=127.0.0.1:{t2p}"))
            .arg("--tls")
            .arg(format!("--tls-ca-file={ca_pem}"))
            .arg("--metrics-listen=off")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(tap);
    // Both replicas serving reads before measuring.
    std::thread::sleep(Duration::from_millis(1500));

    struct Target {
        name: &'static str,
        port: u16,
        proxy: Option<u32>,
        master: u32,
        extra: Vec<String>,
    }
    let targets = [
        Target {
            name: "direct redis (master)",
            port: mp,
            proxy: None,
            master: master.0.id(),
            extra: vec![],
        },
        Target {
            name: "twemproxy (nutcracker)",
            port: np,
            proxy: Some(nut.0.id()),
            master: master.0.id(),
            extra: vec![],
        },
        Target {
            name: "kapsel ambassador",
            port: ap,
            proxy: Some(amb.0.id()),
            master: master.0.id(),
            extra: vec![],
        },
        Target {
            name: "direct redis over TLS (master)",
            port: tmp,
            proxy: None,
            master: tls_master.0.id(),
            extra: tls_cli.clone(),
        },
        Target {
            name: "kapsel ambassador, TLS upstreams",
            port: tap,
            proxy: Some(tls_amb.0.id()),
            master: tls_master.0.id(),
            extra: vec![],
        },
    ];
    println!(
        "redis-benchmark -t set,get -c 50 -n {n}, {reps} interleaved reps, medians; {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    // results[pipeline][target][test] -> samples; cpu per million commands (proxy, servers)
    let pipelines: Vec<u32> = std::env::var("PIPELINES")
        .unwrap_or_else(|_| "1,16".into())
        .split(',')
        .map(|p| {
            p.trim()
                .parse()
                .expect("PIPELINES: comma-separated numbers, like 1,16")
        })
        .collect();
    for pipeline in pipelines {
        let mut samples: Vec<Vec<(String, Vec<Sample>)>> = vec![Vec::new(); targets.len()];
        let mut proxy_cpu = vec![Vec::new(); targets.len()];
        let mut server_cpu = vec![Vec::new(); targets.len()];
        for _ in 0..reps {
            for (ti, t) in targets.iter().enumerate() {
                let p0 = t.proxy.map(cpu_secs).unwrap_or(0.0);
                let s0 = cpu_secs(t.master);
                let res = bench(t.port, pipeline, n, &t.extra);
                let p1 = t.proxy.map(cpu_secs).unwrap_or(0.0);
                let s1 = cpu_secs(t.master);
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
        for (ti, Target { name, proxy, .. }) in targets.iter().enumerate() {
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
        // The issue's CPU target: the ambassador's CPU per command against what redis-server
        // itself spends per command when clients talk to it directly (the direct run's master).
        let cpu = |v: &Vec<f64>| median(v.clone());
        println!(
            "CPU s per 1M cmds: ambassador {:.2}, twemproxy {:.2}, redis-server's own (direct) {:.2}; ambassador/redis-server {:.2}×, ambassador/twemproxy {:.2}×; TLS-upstream ambassador {:.2} ({:.2}× plaintext)",
            cpu(&proxy_cpu[2]),
            cpu(&proxy_cpu[1]),
            cpu(&server_cpu[0]),
            cpu(&proxy_cpu[2]) / cpu(&server_cpu[0]),
            cpu(&proxy_cpu[2]) / cpu(&proxy_cpu[1]),
            cpu(&proxy_cpu[4]),
            cpu(&proxy_cpu[4]) / cpu(&proxy_cpu[2]),
        );
        println!(
            "ratios: ambassador/direct SET {:.2}× GET {:.2}×; twemproxy/direct SET {:.2}× GET {:.2}×; ambassador/twemproxy SET {:.2}× GET {:.2}×",
            ratio(2, 0, 0),
            ratio(2, 0, 1),
            ratio(1, 0, 0),
            ratio(1, 0, 1),
            ratio(2, 1, 0),
            ratio(2, 1, 1)
        );
        println!(
            "TLS: ambassador(TLS upstreams)/direct-TLS SET {:.2}× GET {:.2}×; ambassador TLS/plaintext SET {:.2}× GET {:.2}×",
            ratio(4, 3, 0),
            ratio(4, 3, 1),
            ratio(4, 2, 0),
            ratio(4, 2, 1)
        );
    }
    drop(tls_amb);
    drop(amb);
    drop(nut);
}
