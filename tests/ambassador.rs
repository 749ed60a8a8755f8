//! The Redis ambassador against real redis-server processes (a master, two replicas, and a
//! Sentinel, all on 127.0.0.1), real clients (redis-cli, redis-benchmark, raw RESP) and, in the
//! pod test, a busybox container using it on the pod's localhost. Routing is proven from each
//! server's own `INFO commandstats`. TLS upstreams use a CA and certificates made by the test
//! (rcgen) and redis-server's own TLS port; a slower replica is a delaying TCP proxy.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bin, free_port, Kapsel};
use kapsel::patterns::redis::resp::{encode_command, parse_value, scan_frame, Value};

// ------------------------------------------------------------------------- fixtures

struct Proc {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn poll<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn redis(replica_of: Option<u16>) -> Proc {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("redis-server");
    cmd.args([
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
    .arg(dir.path())
    .args(["--repl-ping-replica-period", "1"]);
    if let Some(m) = replica_of {
        cmd.args(["--replicaof", "127.0.0.1", &m.to_string()]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (scripts/install-deps.sh installs it)");
    let p = Proc {
        child,
        port,
        _dir: dir,
    };
    poll("redis-server to answer PING", 10, || {
        Conn::try_open(port).and_then(|mut c| (c.cmd(&["PING"]) == b"+PONG\r\n").then_some(()))
    });
    if replica_of.is_some() {
        poll("replica to finish its sync", 20, || {
            let info = info(port, "replication");
            (info.contains("master_link_status:up") && info.contains("master_sync_in_progress:0"))
                .then_some(())
        });
    }
    p
}

fn sentinel(master: u16) -> Proc {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master} 1\n\
             sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n"
        ),
    )
    .unwrap();
    let child = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server --sentinel");
    let p = Proc {
        child,
        port,
        _dir: dir,
    };
    poll("sentinel to answer", 10, || {
        Conn::try_open(port).and_then(|mut c| (c.cmd(&["PING"]) == b"+PONG\r\n").then_some(()))
    });
    p
}

/// `kapsel redis-ambassador` with a fast health check; waits until `healthy` replicas serve.
/// Its log (stderr) goes to a file, read with [`amb_log`].
fn ambassador(args: &[String], healthy: usize) -> (Proc, u16) {
    let port = free_port();
    let metrics = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("stderr")).unwrap();
    let child = Command::new(bin())
        .arg("redis-ambassador")
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--metrics-listen=127.0.0.1:{metrics}"))
        .arg("--health-interval=200ms")
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let p = Proc {
        child,
        port,
        _dir: dir,
    };
    poll("the ambassador's replicas to be healthy", 20, || {
        let m = metrics_text(metrics)?;
        (m.matches("kapsel_ambassador_replica_healthy{").count() >= healthy
            && m.lines()
                .filter(|l| {
                    l.starts_with("kapsel_ambassador_replica_healthy{") && l.ends_with(" 1")
                })
                .count()
                >= healthy)
            .then_some(())
    });
    (p, metrics)
}

fn amb_log(p: &Proc) -> String {
    std::fs::read_to_string(p._dir.path().join("stderr")).unwrap_or_default()
}

/// A metric's value from the metrics page (0 if absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

fn metrics_text(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A raw RESP connection: every reply exactly as the server (or ambassador) sent it.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn try_open(port: u16) -> Option<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        Some(Conn { s, buf: Vec::new() })
    }

    fn open(port: u16) -> Conn {
        Conn::try_open(port).unwrap_or_else(|| panic!("connect to 127.0.0.1:{port}"))
    }

    fn send(&mut self, args: &[&str]) {
        let mut out = Vec::new();
        encode_command(&mut out, args);
        self.s.write_all(&out).unwrap();
    }

    fn send_raw(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// The next reply frame, raw; empty if the connection closed.
    fn reply(&mut self) -> Vec<u8> {
        loop {
            if let Ok(Some(n)) = scan_frame(&self.buf) {
                return self.buf.drain(..n).collect();
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return std::mem::take(&mut self.buf),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn cmd(&mut self, args: &[&str]) -> Vec<u8> {
        self.send(args);
        self.reply()
    }

    fn value(&mut self, args: &[&str]) -> Value {
        let raw = self.cmd(args);
        parse_value(&raw)
            .ok()
            .flatten()
            .map(|(v, _)| v)
            .unwrap_or_else(|| panic!("no reply to {args:?}: {:?}", String::from_utf8_lossy(&raw)))
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn info(port: u16, section: &str) -> String {
    match Conn::open(port).value(&["INFO", section]) {
        Value::Bulk(b) => text(&b),
        other => panic!("INFO: {other:?}"),
    }
}

/// `calls` of one command from a server's own `INFO commandstats`.
fn calls(port: u16, command: &str) -> u64 {
    let info = info(port, "commandstats");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
        .unwrap_or(0)
}

fn resetstat(ports: &[u16]) {
    for p in ports {
        assert_eq!(Conn::open(*p).cmd(&["CONFIG", "RESETSTAT"]), b"+OK\r\n");
    }
}

fn static_args(m: &Proc, replicas: &[&Proc]) -> Vec<String> {
    let mut a = vec![format!("--master=127.0.0.1:{}", m.port)];
    for r in replicas {
        a.push(format!("--replica=127.0.0.1:{}", r.port));
    }
    a
}

// ------------------------------------------------------------------------- tests

#[test]
fn reads_go_to_replicas_and_writes_to_the_master() {
    let m = redis(None);
    let r1 = redis(Some(m.port));
    let r2 = redis(Some(m.port));
    let (amb, metrics) = ambassador(&static_args(&m, &[&r1, &r2]), 2);
    resetstat(&[m.port, r1.port, r2.port]);

    // A real client: redis-benchmark, 20 connections, plain and pipelined.
    for pipeline in ["1", "16"] {
        let out = Command::new("redis-benchmark")
            .args([
                "-p",
                &amb.port.to_string(),
                "-t",
                "set,get",
                "-n",
                "4000",
                "-c",
                "20",
                "-P",
                pipeline,
                "-q",
            ])
            .output()
            .expect("redis-benchmark");
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    // And redis-cli.
    let out = Command::new("redis-cli")
        .args(["-p", &amb.port.to_string(), "GET", "key:__rand_int__"])
        .output()
        .unwrap();
    assert!(out.status.success());

    let gets = (
        calls(m.port, "get"),
        calls(r1.port, "get"),
        calls(r2.port, "get"),
    );
    let sets_on_master = calls(m.port, "set");
    assert_eq!(gets.0, 0, "the master served no reads: {gets:?}");
    assert_eq!(
        gets.1 + gets.2,
        8001,
        "every read reached a replica: {gets:?}"
    );
    assert!(
        gets.1 >= 1600 && gets.2 >= 1600,
        "reads are balanced over both replicas: {gets:?}"
    );
    assert_eq!(sets_on_master, 8000, "every write reached the master");
    // The replicas' SETs are replication, counted once per write too, never more.
    assert!(calls(r1.port, "set") <= 8000);

    let mt = metrics_text(metrics).unwrap();
    let routed = |addr: u16| -> u64 {
        mt.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "kapsel_ambassador_commands_total{{upstream=\"127.0.0.1:{addr}\"}} "
                ))
            })
            .map(|v| v.parse().unwrap())
            .unwrap_or(0)
    };
    assert!(routed(m.port) >= 8000, "{mt}");
    assert_eq!(routed(r1.port) + routed(r2.port), 8001, "{mt}");
    assert!(mt.contains("kapsel_ambassador_upstream_roundtrip_seconds_bucket"));
}

/// Run a conversation against a server and return every raw reply.
fn converse(port: u16, other: u16) -> Vec<Vec<u8>> {
    let mut c = Conn::open(port);
    let mut o = Conn::open(other);
    let mut out = Vec::new();
    let mut run = |c: &mut Conn, args: &[&str]| {
        let r = c.cmd(args);
        out.push(r);
    };
    run(&mut c, &["SET", "k", "1"]);
    run(&mut c, &["WAIT", "2", "5000"]);
    run(&mut c, &["GET", "k"]);
    // A transaction.
    for a in [
        &["MULTI"][..],
        &["INCR", "k"],
        &["INCR", "k"],
        &["GET", "k"],
        &["EXEC"],
    ] {
        run(&mut c, a);
    }
    // WATCH: another client's write aborts the transaction.
    run(&mut c, &["WATCH", "k"]);
    run(&mut c, &["GET", "k"]);
    assert_eq!(o.cmd(&["SET", "k", "100"]), b"+OK\r\n");
    for a in [&["MULTI"][..], &["INCR", "k"], &["EXEC"]] {
        run(&mut c, a);
    }
    // And without interference it commits.
    for a in [
        &["WATCH", "k"][..],
        &["MULTI"],
        &["INCR", "k"],
        &["EXEC"],
        &["DISCARD"],
    ] {
        run(&mut c, a);
    }
    // Lua.
    run(
        &mut c,
        &[
            "EVAL",
            "return redis.call('incrby', KEYS[1], ARGV[1])",
            "1",
            "k",
            "5",
        ],
    );
    let sha = c.cmd(&[
        "SCRIPT",
        "LOAD",
        "return {ARGV[1], redis.call('get', KEYS[1])}",
    ]);
    let sha = text(&sha).lines().nth(1).unwrap().to_string();
    run(&mut c, &["EVALSHA", &sha, "1", "k", "hi"]);
    run(&mut c, &["EVAL", "return redis.call('nosuch')", "0"]);
    // SELECT: writes and replica reads in another database.
    run(&mut c, &["SELECT", "3"]);
    run(&mut c, &["SET", "d3", "x"]);
    run(&mut c, &["WAIT", "2", "5000"]);
    run(&mut c, &["GET", "d3"]);
    run(&mut c, &["SELECT", "0"]);
    run(&mut c, &["GET", "d3"]);
    // RESP3 through HELLO: maps and nulls, from the master and from a replica.
    run(&mut c, &["HSET", "h", "f", "v"]);
    run(&mut c, &["WAIT", "2", "5000"]);
    let _hello = c.cmd(&["HELLO", "3"]); // carries the connection id: not compared
    run(&mut c, &["HGETALL", "h"]);
    run(&mut c, &["GET", "nosuch"]);
    run(&mut c, &["ZSCORE", "nosuch", "m"]);
    let _hello = c.cmd(&["HELLO", "2"]);
    run(&mut c, &["GET", "nosuch"]);
    // Errors, verbatim.
    run(&mut c, &["FOO", "bar"]);
    run(&mut c, &["LPUSH", "l", "a"]);
    run(&mut c, &["GET", "l"]);
    run(&mut c, &["CLIENT", "SETNAME", "me"]);
    run(&mut c, &["CLIENT", "GETNAME"]);
    out
}

#[test]
fn transactions_lua_select_resp3_and_errors_behave_as_against_redis() {
    let m = redis(None);
    let r1 = redis(Some(m.port));
    let r2 = redis(Some(m.port));
    let (amb, _) = ambassador(&static_args(&m, &[&r1, &r2]), 2);

    let flush = || {
        let mut c = Conn::open(m.port);
        assert_eq!(c.cmd(&["FLUSHALL"]), b"+OK\r\n");
        c.cmd(&["WAIT", "2", "5000"]);
    };
    flush();
    let direct = converse(m.port, m.port);
    flush();
    let via = converse(amb.port, amb.port);
    assert_eq!(direct.len(), via.len());
    for (i, (d, v)) in direct.iter().zip(&via).enumerate() {
        assert_eq!(text(d), text(v), "reply #{i} differs");
    }
    assert_eq!(text(&via[2]), "$1\r\n1\r\n");
    assert!(
        text(&via[7]).starts_with("*3\r\n:2\r\n:3\r\n"),
        "{}",
        text(&via[7])
    );

    // Pipelined: 300 commands in one write, replies in order and identical to Redis's own.
    let mut script = Vec::new();
    for i in 0..100 {
        encode_command(&mut script, &["INCR", "ctr"]);
        encode_command(&mut script, &["GET", "preloaded"]);
        match i % 4 {
            0 => encode_command(&mut script, &["MULTI"]),
            1 => encode_command(&mut script, &["INCR", "tx"]),
            2 => encode_command(&mut script, &["EXEC"]),
            _ => encode_command(
                &mut script,
                &["EVAL", "return ARGV[1]", "0", &i.to_string()],
            ),
        }
    }
    let mut results = Vec::new();
    for port in [m.port, amb.port] {
        flush();
        let mut c = Conn::open(m.port);
        c.cmd(&["SET", "preloaded", "p"]);
        c.cmd(&["WAIT", "2", "5000"]);
        let mut c = Conn::open(port);
        c.send_raw(&script);
        let replies: Vec<Vec<u8>> = (0..300).map(|_| c.reply()).collect();
        results.push(replies);
    }
    assert_eq!(
        results[0].iter().map(|r| text(r)).collect::<Vec<_>>(),
        results[1].iter().map(|r| text(r)).collect::<Vec<_>>()
    );
    // Inline commands (telnet style) work too.
    let mut c = Conn::open(amb.port);
    c.send_raw(b"PING\r\nECHO hello\r\n");
    assert_eq!(c.reply(), b"+PONG\r\n");
    assert_eq!(c.reply(), b"$5\r\nhello\r\n");
}

#[test]
fn pubsub_and_blocking_commands_through_the_ambassador() {
    let m = redis(None);
    let r1 = redis(Some(m.port));
    let (amb, _) = ambassador(&static_args(&m, &[&r1]), 1);

    // RESP2 subscriber, pattern subscriber, and a RESP3 client that subscribes and keeps
    // issuing commands (push messages interleave with replies).
    let mut sub = Conn::open(amb.port);
    assert_eq!(sub.cmd(&["GET", "x"]), b"$-1\r\n");
    assert_eq!(
        text(&sub.cmd(&["SUBSCRIBE", "news"])),
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    let mut psub = Conn::open(amb.port);
    assert_eq!(
        text(&psub.cmd(&["PSUBSCRIBE", "n*"])),
        "*3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:1\r\n"
    );
    let mut r3 = Conn::open(amb.port);
    assert!(text(&r3.cmd(&["HELLO", "3"])).starts_with('%'));
    assert_eq!(
        text(&r3.cmd(&["SUBSCRIBE", "news"])),
        ">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );

    let mut publisher = Conn::open(amb.port);
    assert_eq!(publisher.cmd(&["PUBLISH", "news", "hello"]), b":3\r\n");
    assert_eq!(
        text(&sub.reply()),
        "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );
    assert_eq!(
        text(&psub.reply()),
        "*4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );
    assert_eq!(
        text(&r3.reply()),
        ">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );
    assert_eq!(r3.cmd(&["PING"]), b"+PONG\r\n");
    assert_eq!(
        text(&sub.cmd(&["UNSUBSCRIBE", "news"])),
        "*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:0\r\n"
    );

    // Blocking: BLPOP waits on the master until another client pushes.
    let port = amb.port;
    let waiter = std::thread::spawn(move || {
        let mut c = Conn::open(port);
        let t = Instant::now();
        let r = c.cmd(&["BLPOP", "queue", "10"]);
        (r, t.elapsed())
    });
    poll("BLPOP to block on the master", 10, || {
        (info(m.port, "clients").contains("blocked_clients:1")).then_some(())
    });
    assert_eq!(publisher.cmd(&["RPUSH", "queue", "job"]), b":1\r\n");
    let (r, waited) = waiter.join().unwrap();
    assert_eq!(text(&r), "*2\r\n$5\r\nqueue\r\n$3\r\njob\r\n");
    assert!(waited < Duration::from_secs(5));
    // A BLPOP that times out returns nil after its timeout, like Redis.
    let mut c = Conn::open(amb.port);
    let t = Instant::now();
    assert_eq!(c.cmd(&["BLPOP", "empty", "1"]), b"*-1\r\n");
    assert!(t.elapsed() >= Duration::from_millis(900));
}

#[test]
fn a_killed_replica_does_not_stop_reads_and_unhealthy_replicas_are_skipped() {
    let m = redis(None);
    let mut r1 = redis(Some(m.port));
    let r2 = redis(Some(m.port));
    let (amb, metrics) = ambassador(&static_args(&m, &[&r1, &r2]), 2);
    let mut c = Conn::open(amb.port);
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    assert_eq!(Conn::open(m.port).cmd(&["WAIT", "2", "5000"]), b":2\r\n");

    // Kill -9 one replica in the middle of a stream of reads from several clients.
    let port = amb.port;
    let readers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Conn::open(port);
                let mut bad = Vec::new();
                for _ in 0..1500 {
                    let r = c.cmd(&["GET", "k"]);
                    if r != b"$1\r\nv\r\n" {
                        bad.push(text(&r));
                    }
                }
                bad
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    r1.child.kill().unwrap();
    r1.child.wait().unwrap();
    for t in readers {
        let bad = t.join().unwrap();
        assert!(bad.is_empty(), "reads failed after a replica died: {bad:?}");
    }
    poll("the dead replica to be marked unhealthy", 10, || {
        metrics_text(metrics).filter(|t| {
            t.contains(&format!(
                "kapsel_ambassador_replica_healthy{{upstream=\"127.0.0.1:{}\"}} 0",
                r1.port
            ))
        })
    });

    // The other replica loses its master link: no healthy replica left, reads go to the master.
    let dead = free_port();
    assert_eq!(
        Conn::open(r2.port).cmd(&["REPLICAOF", "127.0.0.1", &dead.to_string()]),
        b"+OK\r\n"
    );
    poll("the unlinked replica to be skipped", 10, || {
        metrics_text(metrics).filter(|t| {
            t.contains(&format!(
                "kapsel_ambassador_replica_healthy{{upstream=\"127.0.0.1:{}\"}} 0",
                r2.port
            ))
        })
    });
    resetstat(&[m.port, r2.port]);
    let mut c = Conn::open(amb.port);
    for _ in 0..200 {
        assert_eq!(c.cmd(&["GET", "k"]), b"$1\r\nv\r\n");
    }
    assert_eq!(calls(m.port, "get"), 200, "reads fell back to the master");
    assert_eq!(
        calls(r2.port, "get"),
        0,
        "the unhealthy replica served nothing"
    );
}

#[test]
fn writes_follow_a_sentinel_failover() {
    let m = redis(None);
    let r1 = redis(Some(m.port));
    let r2 = redis(Some(m.port));
    let s = sentinel(m.port);
    // Sentinel learns the replicas from the master's INFO.
    poll("sentinel to know both replicas", 20, || {
        match Conn::open(s.port).value(&["SENTINEL", "replicas", "mymaster"]) {
            Value::Array(a) if a.len() == 2 => Some(()),
            _ => None,
        }
    });
    let (amb, metrics) = ambassador(
        &[
            format!("--sentinel=127.0.0.1:{}", s.port),
            "--master-name=mymaster".to_string(),
        ],
        2,
    );
    let mut c = Conn::open(amb.port);
    assert_eq!(c.cmd(&["SET", "before", "1"]), b"+OK\r\n");
    assert_eq!(
        calls(m.port, "set"),
        1,
        "the first write reached the original master"
    );

    poll("Sentinel to start a failover", 20, || {
        (Conn::open(s.port).cmd(&["SENTINEL", "FAILOVER", "mymaster"]) == b"+OK\r\n").then_some(())
    });
    let new_master = poll("Sentinel to promote a replica", 30, || {
        match Conn::open(s.port).value(&["SENTINEL", "get-master-addr-by-name", "mymaster"]) {
            Value::Array(a) => {
                let port: u16 = a[1].as_text().unwrap().parse().unwrap();
                (port != m.port).then_some(port)
            }
            _ => None,
        }
    });
    assert!(new_master == r1.port || new_master == r2.port);
    // Writes through the same client connection land on the new master.
    let t = Instant::now();
    // (A write the old master accepted during the switch is lost, as for any client: poll
    // until one lands on the new master, which is what the ambassador must get to.)
    let mut direct = Conn::open(new_master);
    let mut i = 0;
    poll("a write to reach the new master", 30, || {
        i += 1;
        let v = i.to_string();
        let r = c.cmd(&["SET", "after", &v]);
        (r == b"+OK\r\n"
            && text(&direct.cmd(&["GET", "after"])) == format!("${}\r\n{v}\r\n", v.len()))
        .then_some(())
    });
    // And keep landing there.
    for j in 0..20 {
        assert_eq!(c.cmd(&["SET", "steady", &j.to_string()]), b"+OK\r\n");
        assert_eq!(
            text(&direct.cmd(&["GET", "steady"])),
            format!("${}\r\n{j}\r\n", j.to_string().len())
        );
    }
    assert!(text(&direct.cmd(&["ROLE"])).contains("master"));
    eprintln!(
        "writes followed the failover {:?} after promotion",
        t.elapsed()
    );
    let mt = metrics_text(metrics).unwrap();
    assert!(mt.contains("kapsel_ambassador_failovers_total 1"), "{mt}");
}

#[test]
fn bad_input_gets_an_error_and_other_clients_are_unharmed() {
    let m = redis(None);
    let r1 = redis(Some(m.port));
    let (amb, metrics) = ambassador(&static_args(&m, &[&r1]), 1);
    let mut good = Conn::open(amb.port);
    assert_eq!(good.cmd(&["SET", "g", "1"]), b"+OK\r\n");

    let cases: [(&[u8], &str); 4] = [
        (
            b"*1\r\n:3\r\n",
            "-ERR Protocol error: expected '$', got ':'\r\n",
        ),
        (
            b"*1\r\n$99999999999\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*abc\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"GET \"unbalanced\r\n",
            "-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
    ];
    for (input, want) in cases {
        let mut bad = Conn::open(amb.port);
        bad.send_raw(input);
        assert_eq!(text(&bad.reply()), want);
        assert!(
            bad.closed(),
            "the connection is closed after a protocol error"
        );
        assert_eq!(
            good.cmd(&["INCR", "g"]).first(),
            Some(&b':'),
            "the other client is unharmed"
        );
    }
    // A valid bulk length still under the limit, sent slowly, is fine.
    let mut slow = Conn::open(amb.port);
    slow.send_raw(b"*3\r\n$3\r\nSET\r\n$4\r\nbig1\r\n$100000\r\n");
    slow.send_raw(&vec![b'x'; 100_000]);
    slow.send_raw(b"\r\n");
    assert_eq!(slow.reply(), b"+OK\r\n");
    // Unknown commands: Redis's own error, verbatim; the connection lives on.
    let mut c = Conn::open(amb.port);
    assert_eq!(
        text(&c.cmd(&["NOSUCH", "a"])),
        "-ERR unknown command 'NOSUCH', with args beginning with: 'a' \r\n"
    );
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
    // CLIENT REPLY would desynchronise replies: refused, clearly.
    assert!(text(&c.cmd(&["CLIENT", "REPLY", "OFF"])).contains("not supported"));
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
    let mt = metrics_text(metrics).unwrap();
    assert!(
        mt.contains("kapsel_ambassador_protocol_errors_total 4"),
        "{mt}"
    );

    // An unreachable master: a RESP error, quickly, never a hang.
    let dead = free_port();
    let (amb2, _) = ambassador(&[format!("--master=127.0.0.1:{dead}")], 0);
    let mut c = Conn::open(amb2.port);
    for _ in 0..3 {
        let t = Instant::now();
        let r = text(&c.cmd(&["SET", "a", "1"]));
        assert!(
            r.starts_with(&format!(
                "-ERR kapsel ambassador: master 127.0.0.1:{dead} unreachable"
            )),
            "{r}"
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_container_uses_the_ambassador_on_the_pods_localhost() {
    let m = redis(None);
    let r1 = redis(Some(m.port));
    let k = Kapsel::start();
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: redis-app}}
spec:
  restartPolicy: Never
  initContainers:
  - name: ambassador
    image: builtin/redis-ambassador
    restartPolicy: Always
    args: ["--master=127.0.0.1:{}", "--replica=127.0.0.1:{}", "--health-interval=200ms", "--read-your-writes=1s"]
  containers:
  - name: app
    image: {}
    command: ["sh", "-c", "printf 'SET from-pod hello\\r\\nINCR visits\\r\\nGET from-pod\\r\\nQUIT\\r\\n' | nc -w 5 127.0.0.1 6379"]
  - name: py
    image: {}
    env: [{{name: ITERATIONS, value: "3"}}]
"#,
        m.port,
        r1.port,
        common::BUSYBOX,
        redis_app()
    );
    k.apply("redis-app", &yaml);
    let pod = k
        .wait_pod("redis-app", 180, |p| {
            common::phase(p) == "Succeeded" || common::phase(p) == "Failed"
        })
        .await;
    assert_eq!(common::phase(&pod), "Succeeded", "{pod:#}");
    let logs = k.logs("redis-app", "app").await;
    assert!(logs.contains("+OK\r\n:1\r\n$5\r\nhello\r\n"), "{logs:?}");
    // The write reached the master on the node's loopback, outside the pod's network.
    let mut direct = Conn::open(m.port);
    assert_eq!(direct.cmd(&["GET", "from-pod"]), b"$5\r\nhello\r\n");
    let amb_logs = k.logs("redis-app", "ambassador").await;
    assert!(
        amb_logs.contains("listening on 127.0.0.1:6379"),
        "{amb_logs}"
    );
    // The WASM component: the real redis-py client library, over wasi:sockets, to the
    // ambassador on the same localhost as the busybox container.
    let py = k.logs("redis-app", "py").await;
    assert!(py.contains("iteration 3: visits="), "{py}");
    assert!(py.contains("done, 3/3 iterations succeeded"), "{py}");
    assert_eq!(direct.cmd(&["GET", "app:last"]), b"$1\r\n3\r\n");
    assert!(
        calls(m.port, "multi") >= 3,
        "redis-py's MULTI/EXEC pipelines ran on the master"
    );
    drop(r1);
}

/// The redis-py component (built by `sample-pods/redis-app/build.sh`, which test.sh runs).
fn redis_app() -> String {
    let p = common::repo("sample-pods/redis-app/app.wasm");
    assert!(
        p.exists(),
        "{} is missing: run sample-pods/redis-app/build.sh",
        p.display()
    );
    p.display().to_string()
}

#[test]
fn read_your_writes_window_sends_a_clients_reads_to_the_master() {
    let m = redis(None);
    let r1 = redis(Some(m.port));
    let mut args = static_args(&m, &[&r1]);
    args.push("--read-your-writes=2s".into());
    let (amb, _) = ambassador(&args, 1);
    let mut writer = Conn::open(amb.port);
    let mut other = Conn::open(amb.port);
    assert_eq!(other.cmd(&["GET", "warm"]), b"$-1\r\n");
    resetstat(&[m.port, r1.port]);
    assert_eq!(writer.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    // Right after its write, this client reads from the master: it sees its own write.
    assert_eq!(writer.cmd(&["GET", "k"]), b"$1\r\nv\r\n");
    assert_eq!(calls(m.port, "get"), 1);
    // Another client, which wrote nothing, still reads from the replica.
    other.cmd(&["GET", "k"]);
    assert_eq!(calls(r1.port, "get"), 1);
    // After the window, the writer's reads go back to the replica.
    std::thread::sleep(Duration::from_millis(2100));
    writer.cmd(&["GET", "k"]);
    assert_eq!(calls(r1.port, "get"), 2);
    assert_eq!(calls(m.port, "get"), 1);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        .unwrap()
}

#[test]
fn a_client_that_stops_reading_cannot_grow_the_ambassador_without_bound() {
    let m = redis(None);
    let r1 = redis(Some(m.port));
    let mut args = static_args(&m, &[&r1]);
    args.push("--max-client-output-bytes=16777216".into());
    let (amb, metrics) = ambassador(&args, 1);
    let big = "x".repeat(256 * 1024);
    let mut c = Conn::open(m.port);
    assert_eq!(c.cmd(&["SET", "big", &big]), b"+OK\r\n");
    assert_eq!(c.cmd(&["WAIT", "1", "5000"]), b":1\r\n");
    let before = rss_kib(amb.child.id());

    // 20,000 pipelined GETs of 256 KiB (5 GiB of replies) from a client that never reads.
    let mut slow = TcpStream::connect(("127.0.0.1", amb.port)).unwrap();
    slow.set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut pipeline = Vec::new();
    for _ in 0..20_000 {
        encode_command(&mut pipeline, &["GET", "big"]);
    }
    let writer = std::thread::spawn(move || {
        let _ = slow.write_all(&pipeline);
        slow
    });
    // Meanwhile another client is served normally, and the ambassador's memory stays bounded.
    let mut good = Conn::open(amb.port);
    let mut peak = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        assert_eq!(good.cmd(&["INCR", "n"]).first(), Some(&b':'));
        peak = peak.max(rss_kib(amb.child.id()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let _slow = writer.join().unwrap();
    eprintln!("ambassador RSS {before} KiB before, peak {peak} KiB");
    assert!(
        peak < before + 200 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
    poll(
        "the slow client to be disconnected at the limit",
        30,
        || {
            metrics_text(metrics)
                .filter(|t| t.contains("kapsel_ambassador_clients_output_limit_total 1"))
        },
    );
    let peak = peak.max(rss_kib(amb.child.id()));
    assert!(
        peak < before + 200 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
}

// ------------------------------------------------------------------ issue 14: reads, TLS, MULTI

/// One GET per TCP connection, as PHP/CGI apps and health checks do.
fn connect_per_request_get(port: u16, key: &str) -> Vec<u8> {
    let mut c = Conn::open(port);
    let r = c.cmd(&["GET", key]);
    drop(c);
    r
}

#[test]
fn reads_from_short_lived_clients_spread_over_both_replicas() {
    let m = redis(None);
    let r1 = redis(Some(m.port));
    let r2 = redis(Some(m.port));
    assert_eq!(Conn::open(m.port).cmd(&["SET", "k", "v"]), b"+OK\r\n");
    assert_eq!(Conn::open(m.port).cmd(&["WAIT", "2", "5000"]), b":2\r\n");
    let (amb, metrics) = ambassador(&static_args(&m, &[&r1, &r2]), 2);
    resetstat(&[m.port, r1.port, r2.port]);
    for _ in 0..200 {
        assert_eq!(connect_per_request_get(amb.port, "k"), b"$1\r\nv\r\n");
    }
    // And the same with the real client, one process (and connection) per read.
    for _ in 0..10 {
        let out = Command::new("redis-cli")
            .args(["-p", &amb.port.to_string(), "GET", "k"])
            .output()
            .unwrap();
        assert_eq!(text(&out.stdout), "v\n");
    }
    let (g1, g2) = (calls(r1.port, "get"), calls(r2.port, "get"));
    assert_eq!(calls(m.port, "get"), 0);
    assert_eq!(g1 + g2, 210, "every read reached a replica: {g1} + {g2}");
    assert!(
        g1 >= 63 && g2 >= 63,
        "each replica served at least 30 %: {g1} / {g2}"
    );
    // The split shows in the ambassador's metrics, per upstream and role.
    let mt = metrics_text(metrics).unwrap();
    let series = |p: u16| {
        format!("kapsel_ambassador_upstream_requests_total{{upstream=\"127.0.0.1:{p}\",role=\"replica\"}}")
    };
    assert_eq!(metric(&mt, &series(r1.port)), g1, "{mt}");
    assert_eq!(metric(&mt, &series(r2.port)), g2, "{mt}");
}

/// A TCP proxy in front of `target` that holds every chunk the server sends for `delay`:
/// a replica on a slower network. Stops accepting when dropped.
struct DelayProxy {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn delay_proxy(target: u16, delay: Duration) -> DelayProxy {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            if st.load(Ordering::Relaxed) {
                return;
            }
            let Ok(c) = c else { continue };
            let Ok(s) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let _ = (c.set_nodelay(true), s.set_nodelay(true));
            let (mut c_in, mut s_out) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (s, c);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match s_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            std::thread::sleep(delay);
                            if c_out.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = c_out.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    DelayProxy { port, stop }
}

#[test]
fn a_slower_replica_gets_fewer_reads_under_concurrent_load() {
    let m = redis(None);
    let fast = redis(Some(m.port));
    let slow_server = redis(Some(m.port));
    let slow = delay_proxy(slow_server.port, Duration::from_millis(4));
    assert_eq!(Conn::open(m.port).cmd(&["SET", "k", "v"]), b"+OK\r\n");
    assert_eq!(Conn::open(m.port).cmd(&["WAIT", "2", "5000"]), b":2\r\n");
    let args = vec![
        format!("--master=127.0.0.1:{}", m.port),
        format!("--replica=127.0.0.1:{}", fast.port),
        format!("--replica=127.0.0.1:{}", slow.port),
    ];
    let (amb, _) = ambassador(&args, 2);
    resetstat(&[fast.port, slow_server.port]);
    // 8 clients reading at once, each on its own connection, plus short-lived ones.
    let port = amb.port;
    let workers: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Conn::open(port);
                for _ in 0..150 {
                    assert_eq!(c.cmd(&["GET", "k"]), b"$1\r\nv\r\n");
                }
                for _ in 0..10 {
                    assert_eq!(connect_per_request_get(port, "k"), b"$1\r\nv\r\n");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let (f, s) = (calls(fast.port, "get"), calls(slow_server.port, "get"));
    eprintln!("fast replica {f} reads, slow replica (+4 ms) {s}");
    assert_eq!(f + s, 8 * 160);
    assert!(
        s * 2 < f,
        "the slower replica got fewer reads: fast {f}, slow {s}"
    );
    assert!(s > 0, "the slower replica still served some reads");
}

/// A test CA, and server and client certificates it signs, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path, name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("kapsel test CA {name}"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    // One certificate for the servers (127.0.0.1, localhost) that also serves as the client
    // certificate (the replicas' replication link and the ambassador).
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "redis.test");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let p = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&p.ca, ca_cert.pem()).unwrap();
    std::fs::write(&p.cert, cert.pem()).unwrap();
    std::fs::write(&p.key, key.serialize_pem()).unwrap();
    p
}

/// redis-server on a TLS port only, requiring client certificates; replicas replicate over TLS.
fn redis_tls(pki: &Pki, replica_of: Option<u16>) -> Proc {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--tls-cert-file")
        .arg(&pki.cert)
        .arg("--tls-key-file")
        .arg(&pki.key)
        .arg("--tls-ca-cert-file")
        .arg(&pki.ca)
        .args(["--tls-auth-clients", "yes", "--tls-replication", "yes"])
        .args(["--repl-ping-replica-period", "1"]);
    if let Some(m) = replica_of {
        cmd.args(["--replicaof", "127.0.0.1", &m.to_string()]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let p = Proc {
        child,
        port,
        _dir: dir,
    };
    let cli = |args: &[&str]| -> String {
        let out = Command::new("redis-cli")
            .args(["--tls", "-p", &port.to_string()])
            .arg("--cacert")
            .arg(&pki.ca)
            .arg("--cert")
            .arg(&pki.cert)
            .arg("--key")
            .arg(&pki.key)
            .args(args)
            .output()
            .expect("redis-cli");
        text(&out.stdout)
    };
    poll("redis-server to answer PING over TLS", 10, || {
        (cli(&["PING"]).trim() == "PONG").then_some(())
    });
    if replica_of.is_some() {
        poll("the TLS replica to finish its sync", 20, || {
            let info = cli(&["INFO", "replication"]);
            (info.contains("master_link_status:up") && info.contains("master_sync_in_progress:0"))
                .then_some(())
        });
    }
    p
}

#[test]
fn tls_upstreams_with_a_test_ca_and_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let good = pki(certs.path(), "good");
    let other = pki(certs.path(), "other");
    let m = redis_tls(&good, None);
    let r1 = redis_tls(&good, Some(m.port));
    let tls_args = |p: &Pki, client_cert: bool| {
        let mut a = vec![
            format!("--master=127.0.0.1:{}", m.port),
            format!("--replica=127.0.0.1:{}", r1.port),
            "--tls".to_string(),
            format!("--tls-ca-file={}", p.ca.display()),
            "--tls-server-name=localhost".to_string(),
        ];
        if client_cert {
            a.push(format!("--tls-cert-file={}", p.cert.display()));
            a.push(format!("--tls-key-file={}", p.key.display()));
        }
        a
    };
    // The right CA and a client certificate: writes, reads, and the replica's health check.
    let (amb, metrics) = ambassador(&tls_args(&good, true), 1);
    let mut c = Conn::open(amb.port);
    assert_eq!(c.cmd(&["SET", "t", "secure"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["WAIT", "1", "5000"]), b":1\r\n");
    for _ in 0..20 {
        assert_eq!(connect_per_request_get(amb.port, "t"), b"$6\r\nsecure\r\n");
    }
    let mt = metrics_text(metrics).unwrap();
    let reads = format!(
        "kapsel_ambassador_upstream_requests_total{{upstream=\"127.0.0.1:{}\",role=\"replica\"}}",
        r1.port
    );
    assert_eq!(
        metric(&mt, &reads),
        20,
        "reads went to the TLS replica: {mt}"
    );
    // A transaction and a dedicated connection (pooled, TLS) work too.
    assert_eq!(c.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["INCR", "n"]), b"+QUEUED\r\n");
    assert_eq!(c.cmd(&["EXEC"]), b"*1\r\n:1\r\n");
    drop(c);
    drop(amb);

    // A CA that did not sign the servers' certificates: refused, clearly, to the client, in
    // the log and in the metrics.
    let (amb, metrics) = ambassador(&tls_args(&other, true), 0);
    let r = text(&Conn::open(amb.port).cmd(&["SET", "t", "x"]));
    assert!(
        r.starts_with(&format!(
            "-ERR kapsel ambassador: master 127.0.0.1:{} TLS handshake failed: invalid peer certificate",
            m.port
        )),
        "{r}"
    );
    poll("the TLS failure in the log and metrics", 10, || {
        let mt = metrics_text(metrics)?;
        let log = amb_log(&amb);
        (log.contains("TLS handshake failed: invalid peer certificate")
            && metric(
                &mt,
                &format!(
                    "kapsel_ambassador_upstream_tls_errors_total{{upstream=\"127.0.0.1:{}\"}}",
                    m.port
                ),
            ) > 0)
            .then_some(())
    });
    drop(amb);

    // No client certificate where the servers require one: an error, not a hang.
    let (amb, _) = ambassador(&tls_args(&good, false), 0);
    let r = text(&Conn::open(amb.port).cmd(&["SET", "t", "x"]));
    assert!(
        r.starts_with(&format!(
            "-ERR kapsel ambassador: master 127.0.0.1:{}",
            m.port
        )),
        "{r}"
    );
}

#[test]
fn a_failover_inside_multi_or_watch_aborts_that_transaction_and_the_next_runs_on_the_new_master() {
    let m = redis(None);
    let _r1 = redis(Some(m.port));
    let _r2 = redis(Some(m.port));
    let s = sentinel(m.port);
    poll("sentinel to know both replicas", 20, || {
        match Conn::open(s.port).value(&["SENTINEL", "replicas", "mymaster"]) {
            Value::Array(a) if a.len() == 2 => Some(()),
            _ => None,
        }
    });
    let (amb, metrics) = ambassador(
        &[
            format!("--sentinel=127.0.0.1:{}", s.port),
            "--master-name=mymaster".to_string(),
        ],
        2,
    );
    // One client inside MULTI, another holding a WATCH, when the master changes.
    let mut tx = Conn::open(amb.port);
    assert_eq!(tx.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(tx.cmd(&["SET", "tx", "1"]), b"+QUEUED\r\n");
    let mut watcher = Conn::open(amb.port);
    assert_eq!(watcher.cmd(&["WATCH", "w"]), b"+OK\r\n");

    poll("Sentinel to start a failover", 20, || {
        (Conn::open(s.port).cmd(&["SENTINEL", "FAILOVER", "mymaster"]) == b"+OK\r\n").then_some(())
    });
    poll("the ambassador to follow the new master", 30, || {
        metrics_text(metrics).filter(|t| t.contains("kapsel_ambassador_failovers_total 1"))
    });
    let new_master =
        match Conn::open(s.port).value(&["SENTINEL", "get-master-addr-by-name", "mymaster"]) {
            Value::Array(a) => a[1].as_text().unwrap().parse::<u16>().unwrap(),
            other => panic!("{other:?}"),
        };
    assert_ne!(new_master, m.port);

    // The open transaction: a clear error for its remaining commands and its EXEC.
    let r = text(&tx.cmd(&["SET", "tx", "2"]));
    assert!(
        r.starts_with("-ERR kapsel ambassador: the Redis master changed during this transaction"),
        "{r}"
    );
    let r = text(&tx.cmd(&["EXEC"]));
    assert!(
        r.starts_with("-EXECABORT Transaction discarded: the Redis master changed during it (failover from 127.0.0.1:")
            && r.contains("retry it"),
        "{r}"
    );
    // Its next transaction runs on the new master: no READONLY from the old one.
    let mut direct = Conn::open(new_master);
    assert_eq!(tx.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(tx.cmd(&["SET", "tx", "3"]), b"+QUEUED\r\n");
    assert_eq!(tx.cmd(&["EXEC"]), b"*1\r\n+OK\r\n");
    assert_eq!(direct.cmd(&["GET", "tx"]), b"$1\r\n3\r\n");

    // The WATCHed transaction cannot be guaranteed on the new master: aborted, then retried.
    assert_eq!(watcher.cmd(&["MULTI"]), b"+OK\r\n");
    assert!(text(&watcher.cmd(&["SET", "w", "1"]))
        .starts_with("-ERR kapsel ambassador: the Redis master changed"));
    assert!(text(&watcher.cmd(&["EXEC"])).starts_with("-EXECABORT"));
    assert_eq!(watcher.cmd(&["WATCH", "w"]), b"+OK\r\n");
    assert_eq!(watcher.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(watcher.cmd(&["SET", "w", "2"]), b"+QUEUED\r\n");
    assert_eq!(watcher.cmd(&["EXEC"]), b"*1\r\n+OK\r\n");
    assert_eq!(direct.cmd(&["GET", "w"]), b"$1\r\n2\r\n");
    let mt = metrics_text(metrics).unwrap();
    assert!(
        mt.contains("kapsel_ambassador_transactions_broken_total 2"),
        "{mt}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_and_bad_flags_standalone_and_in_a_pod() {
    // Standalone: --help on stdout, exit 0; a bad flag named on one line, exit 2.
    let out = Command::new(bin())
        .args(["redis-ambassador", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let help = text(&out.stdout);
    for want in [
        "--master",
        "--replica",
        "--tls-ca-file",
        "KAPSEL_AMBASSADOR_MASTER",
    ] {
        assert!(help.contains(want), "{want} in {help}");
    }
    let out = Command::new(bin())
        .args(["redis-ambassador", "--master=127.0.0.1:1", "--bogus=1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("--bogus") && err.trim().lines().count() == 1,
        "{err}"
    );
    let out = Command::new(bin())
        .args([
            "redis-ambassador",
            "--master=127.0.0.1:1",
            "--health-interval=soon",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--health-interval"),
        "{}",
        text(&out.stderr)
    );

    // In a pod: --help goes to the container's log and it exits 0; a bad flag is a
    // CreateContainerConfigError naming it.
    let k = Kapsel::start();
    let yaml = |name: &str, args: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: ambassador\n    image: builtin/redis-ambassador\n    args: [{args}]\n"
        )
    };
    k.apply("amb-help", &yaml("amb-help", "\"--help\""));
    let pod = k
        .wait_pod("amb-help", 60, |p| {
            !common::state(p, 0)["terminated"].is_null()
        })
        .await;
    assert_eq!(
        common::state(&pod, 0)["terminated"]["exitCode"],
        0,
        "{pod:#}"
    );
    let logs = k.logs("amb-help", "ambassador").await;
    assert!(
        logs.contains("--master") && logs.contains("KAPSEL_AMBASSADOR_"),
        "{logs}"
    );
    k.apply(
        "amb-bad",
        &yaml("amb-bad", "\"--master=127.0.0.1:1\", \"--colour=red\""),
    );
    let pod = k
        .wait_pod("amb-bad", 30, |p| {
            common::state(p, 0)["waiting"]["reason"] == "CreateContainerConfigError"
        })
        .await;
    let msg = common::state(&pod, 0)["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("--colour"), "{msg}");
}
