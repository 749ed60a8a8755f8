//! Every sample in `sample-pods/` run as shipped (the file itself, through the real `kapsel`
//! binary: `kapsel up -f` where its header says so, else `kapsel serve` + `kapsel apply -f`),
//! checked against what the README and the sample's header promise a user sees.
//!
//! Which test covers each sample:
//! - `hello.yaml`: `tests/components.rs`, `up_prints_the_hello_output_and_exits_zero_and_compiles_once_per_user`
//! - `metrics-adapter.yaml`: `tests/adapter.rs`, `the_metrics_adapter_sample_runs_under_up_and_stops_cleanly`
//! - `shared-volume.yaml`: `shared_volume_sample_does_what_the_using_it_section_shows`
//! - `http-server.yaml`: `http_server_sample_answers_on_host_port_8080`
//! - `mixed.yaml`: `mixed_sample_under_up_talks_both_ways_over_one_localhost`
//! - `git-sync.yaml`: `git_sync_sample_under_up_serves_the_synced_checkout_and_a_pushed_commit`
//! - `redis-ambassador.yaml`: `redis_ambassador_sample_under_up_splits_reads_and_writes`
//! - `deployment.yaml`: `deployment_sample_rolls_out_keeping_4_ready_and_rolls_a_broken_release_back`
//! - `canary.yaml`: `canary_sample_waits_with_one_canary_until_promoted_or_aborted`
//!
//! The samples hard-code their host ports (8080, 8081, 8082, 9121; 9102 is the adapter's) and
//! the redis-servers' 6390/6391, all different, so these tests run in parallel.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn sample(name: &str) -> String {
    repo("sample-pods").join(name).display().to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// The CLI's stdout; panics with both streams if it failed.
fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Up's stdout lines of one container, without the `pod/container | ` prefix.
fn lines_of(stdout: &str, pod: &str, container: &str) -> Vec<String> {
    let prefix = format!("{pod}/{container} | ");
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

/// Stop `up` as Ctrl-C does: it must exit 0, say so, and leave no container behind.
async fn stop_cleanly(up: &mut Up) {
    let (status, err) = up.stop().await;
    assert!(status.success(), "kapsel up exited {status:?}:\n{err}");
    assert!(err.contains("kapsel: stopped"), "{err}");
    let left = up.containers_left();
    assert!(
        left.is_empty(),
        "containers left after up stopped: {left:?}"
    );
}

// ------------------------------------------------------------------------------ shared-volume

/// README "Using it": apply, `get pods -o wide`, `logs -c reader -f`, `describe`, `delete`
/// (which waits until the pod is gone) and `get nodes`, on `shared-volume.yaml`, whose header
/// promises the reader prints the writer's 5 lines from the shared emptyDir and both exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_volume_sample_does_what_the_using_it_section_shows() {
    let k = Kapsel::start();
    let out = ok(k.cli(&["apply", "-f", &sample("shared-volume.yaml")]));
    assert_eq!(out.trim(), "pod/shared-volume created");
    let p = k
        .wait_pod("shared-volume", 60, |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
    assert_eq!(phase(&p), "Succeeded", "{p:#}");
    for (i, name) in ["writer", "reader"].iter().enumerate() {
        assert_eq!(p["status"]["containerStatuses"][i]["name"], *name);
        let t = &state(&p, i)["terminated"];
        assert_eq!(t["exitCode"], 0, "{name}: {p:#}");
        assert_eq!(t["reason"], "Completed", "{name}: {p:#}");
    }

    // `kapsel logs shared-volume -c reader -f`: the file the writer wrote, in order; -f
    // returns once the container has finished.
    let mut follow = Command::new(bin())
        .args([
            "--server",
            &k.url,
            "logs",
            "shared-volume",
            "-c",
            "reader",
            "-f",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while follow.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = follow.kill();
            let _ = follow.wait();
            panic!("`logs -f` of a finished container did not return");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reader = ok(follow.wait_with_output().unwrap());
    let mut want =
        String::from("reader: waiting for /data/done\nreader: /data/messages.txt contains:\n");
    for i in 1..=5 {
        want.push_str(&format!("message {i} from writer\n"));
    }
    assert_eq!(reader, want);
    let writer = ok(k.cli(&["logs", "shared-volume", "-c", "writer"]));
    assert_eq!(writer.matches("writer: wrote").count(), 5, "{writer}");
    assert!(writer.ends_with("writer: done\n"), "{writer}");

    // NAME READY STATUS RESTARTS AGE IP NODE
    let wide = ok(k.cli(&["get", "pods", "-o", "wide"]));
    let head: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        head,
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"],
        "{wide}"
    );
    let row: Vec<&str> = wide
        .lines()
        .find(|l| l.starts_with("shared-volume "))
        .unwrap_or_else(|| panic!("no row: {wide}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[1], "0/2", "{wide}");
    assert_eq!(row[2], "Completed", "{wide}");
    assert_eq!(row.last(), Some(&k.node.as_str()), "{wide}");

    // spec, container states, events
    let d = ok(k.cli(&["describe", "pod", "shared-volume"]));
    for want in [
        "writer:",
        "reader:",
        "Completed",
        "Events:",
        "Scheduled",
        "/data",
    ] {
        assert!(d.contains(want), "describe lacks {want:?}:\n{d}");
    }

    // capacity, runtimes (wasm, oci when Docker answers)
    let nodes = ok(k.cli(&["get", "nodes"]));
    let row = nodes
        .lines()
        .find(|l| l.starts_with(&k.node))
        .unwrap_or_else(|| panic!("no row for {}: {nodes}", k.node));
    assert!(row.contains("wasm") && row.contains("oci"), "{nodes}");

    // "waits until it has stopped and is gone"
    ok(k.cli(&["delete", "pod", "shared-volume"]));
    assert!(
        k.pod("shared-volume").await.is_none(),
        "delete returned before the pod was gone"
    );
}

// -------------------------------------------------------------------------------- http-server

/// `http-server.yaml`: the component answers `curl http://127.0.0.1:8080/anything` (hostPort
/// 8080) with "hello from kapsel wasm component" and the path, and prints "listening on 8080".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_server_sample_answers_on_host_port_8080() {
    // The README: build it first with scripts/build-guests.sh --component-if-missing.
    component("sample-pods/http-server");
    let k = Kapsel::start();
    ok(k.cli(&["apply", "-f", &sample("http-server.yaml")]));
    let body = wait_for("the component on 127.0.0.1:8080", 180, || async {
        match http_get(8080, "/anything").await {
            Some(body) => Ok(body),
            None => Err(format!(
                "{:#}",
                k.pod("http-server").await.unwrap_or_default()
            )),
        }
    })
    .await;
    assert_eq!(body, "hello from kapsel wasm component\npath: /anything\n");
    let logs = k.logs("http-server", "web").await;
    assert!(logs.starts_with("listening on 8080\n"), "{logs}");
    assert!(logs.contains("GET /anything -> 200"), "{logs}");
    // A long-running service: Running, ready, never restarted.
    let p = k.pod("http-server").await.unwrap();
    assert_eq!(phase(&p), "Running");
    assert_eq!(p["status"]["containerStatuses"][0]["ready"], true);
    assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0);
}

// ------------------------------------------------------------------------------------- mixed

/// `mixed.yaml` under `kapsel up`, as its header says: the busybox container fetches from the
/// WASM component over 127.0.0.1, the WASM pinger gets the busybox echo server's answer over
/// 127.0.0.1, and `curl http://127.0.0.1:8081/hi` reaches the component through hostPort 8081.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_sample_under_up_talks_both_ways_over_one_localhost() {
    component("sample-pods/http-server");
    component("sample-pods/pinger");
    let mut up = Up::start("sample-pods/mixed.yaml");
    let out = up
        .wait_stdout("both directions over the pod's localhost", 240, |o| {
            lines_of(o, "mixed", "fetch")
                .iter()
                .any(|l| l == "path: /from-the-container")
                && lines_of(o, "mixed", "pinger")
                    .iter()
                    .any(|l| l == "pinger: container answered: ping from wasm")
        })
        .await;
    // container -> component: the whole answer, and the component saw the request.
    let fetch = lines_of(&out, "mixed", "fetch");
    let at = fetch
        .iter()
        .position(|l| l == "hello from kapsel wasm component")
        .unwrap_or_else(|| panic!("{fetch:?}"));
    assert_eq!(fetch[at + 1], "path: /from-the-container", "{fetch:?}");
    assert!(
        lines_of(&out, "mixed", "web").contains(&"GET /from-the-container -> 200".to_string()),
        "{out}"
    );
    // node -> component through hostPort 8081
    let body = wait_for("http://127.0.0.1:8081/hi", 30, || async {
        http_get(8081, "/hi").await.ok_or_else(String::new)
    })
    .await;
    assert_eq!(body, "hello from kapsel wasm component\npath: /hi\n");
    stop_cleanly(&mut up).await;
}

// ---------------------------------------------------------------------------------- git-sync

/// The bare repository `git-sync.yaml` syncs (`/tmp/kapsel-demo.git`, hard-coded in the
/// sample): made as the README says when absent, and then removed again; a user's own copy is
/// used and left alone.
struct DemoRepo {
    path: PathBuf,
    created: bool,
}

impl DemoRepo {
    fn ensure() -> DemoRepo {
        let path = PathBuf::from("/tmp/kapsel-demo.git");
        if path.exists() {
            return DemoRepo {
                path,
                created: false,
            };
        }
        // `git clone --bare . /tmp/kapsel-demo.git`, from the checkout.
        let out = Command::new("git")
            .current_dir(repo(""))
            .args(["clone", "-q", "--bare", "."])
            .arg(&path)
            .output()
            .unwrap();
        let repo = DemoRepo {
            path,
            created: true,
        };
        assert!(
            out.status.success(),
            "git clone --bare: {}",
            text(&out.stderr)
        );
        repo
    }

    fn git(&self, dir: &Path, args: &[&str]) -> String {
        ok(Command::new("git")
            .current_dir(dir)
            .args([
                "-c",
                "user.name=kapsel test",
                "-c",
                "user.email=test@kapsel.invalid",
            ])
            .args(args)
            .output()
            .unwrap())
    }
}

impl Drop for DemoRepo {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// `git-sync.yaml` under `kapsel up`: `curl http://127.0.0.1:8082/site/README.md` serves the
/// README of the repository's HEAD, and a commit pushed to it is served after the next sync
/// ("git push to deploy", `--period=10s`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_sync_sample_under_up_serves_the_synced_checkout_and_a_pushed_commit() {
    let demo = DemoRepo::ensure();
    let head_readme = demo.git(&demo.path, &["show", "HEAD:README.md"]);
    assert!(head_readme.starts_with("# Kapsel"), "{head_readme}");
    let mut up = Up::start("sample-pods/git-sync.yaml");
    let served = wait_for("/site/README.md on 127.0.0.1:8082", 120, || async {
        http_get(8082, "/site/README.md").await.ok_or_else(|| {
            format!(
                "stdout:\n{}\nstderr:\n{}",
                up.stdout.lock().unwrap(),
                up.stderr.lock().unwrap()
            )
        })
    })
    .await;
    assert!(served == head_readme, "served README differs from HEAD's");

    // A push to the repository is live after the next sync. Only into a repository this
    // test made: a user's own /tmp/kapsel-demo.git is not written to.
    if demo.created {
        let work = tempfile::tempdir().unwrap();
        demo.git(
            work.path(),
            &["clone", "-q", demo.path.to_str().unwrap(), "c"],
        );
        let c = work.path().join("c");
        let token = format!("deployed {}\n", uuid::Uuid::new_v4());
        std::fs::write(c.join("DEPLOYED.txt"), &token).unwrap();
        demo.git(&c, &["add", "DEPLOYED.txt"]);
        demo.git(&c, &["commit", "-q", "-m", "deploy"]);
        demo.git(&c, &["push", "-q", "origin", "HEAD"]);
        let pushed = Instant::now();
        let got = wait_for("the pushed commit on /site/DEPLOYED.txt", 40, || async {
            http_get(8082, "/site/DEPLOYED.txt")
                .await
                .ok_or_else(String::new)
        })
        .await;
        assert_eq!(got, token);
        assert!(
            pushed.elapsed() < Duration::from_secs(25),
            "the push took {:?} to be served with --period=10s",
            pushed.elapsed()
        );
        // The old README is still served from the new tree.
        assert!(http_get(8082, "/site/README.md").await.as_deref() == Some(&head_readme[..]));
    }
    stop_cleanly(&mut up).await;
}

// -------------------------------------------------------------------------- redis-ambassador

/// A foreground redis-server of the sample's header (its ports, no persistence), stopped when
/// dropped: `--daemonize yes` would leave it running after the test.
struct Redis {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (scripts/install-deps.sh installs redis-server and redis-tools)");
    text(&out.stdout)
}

async fn redis_server(port: u16, replica_of: Option<u16>) -> Redis {
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "127.0.0.1:{port} is taken: the redis-ambassador sample needs it for its redis-server"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path());
    if let Some(m) = replica_of {
        cmd.args(["--replicaof", "127.0.0.1", &m.to_string()]);
    }
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (scripts/install-deps.sh installs it)");
    let r = Redis { child, _dir: dir };
    wait_for(&format!("redis-server on {port}"), 10, || async {
        let info = redis_cli(port, &["info", "replication"]);
        let ready = match replica_of {
            None => info.contains("role:master"),
            Some(_) => {
                info.contains("master_link_status:up") && info.contains("master_sync_in_progress:0")
            }
        };
        if ready {
            Ok(())
        } else {
            Err(info)
        }
    })
    .await;
    r
}

/// `calls=` of one command in `INFO commandstats`.
fn calls(port: u16, cmd: &str) -> u64 {
    let stats = redis_cli(port, &["info", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `redis-ambassador.yaml` under `kapsel up` with the master (6390) and replica (6391) its
/// header starts: the redis-py component and the busybox `nc` client both work through the
/// ambassador on the pod's 127.0.0.1:6379; writes land on the master and reads on the
/// replica (`redis-cli -p 6391 info commandstats | grep get`); its metrics are on hostPort 9121.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_ambassador_sample_under_up_splits_reads_and_writes() {
    let app = repo("sample-pods/redis-app/app.wasm");
    assert!(
        app.exists(),
        "{} is missing: run sample-pods/redis-app/build.sh",
        app.display()
    );
    let master = redis_server(6390, None).await;
    let replica = redis_server(6391, Some(6390)).await;
    let mut up = Up::start("sample-pods/redis-ambassador.yaml");
    let out = up
        .wait_stdout("the app's and the counter's round trips", 240, |o| {
            lines_of(o, "redis-ambassador", "app")
                .iter()
                .any(|l| l.starts_with("iteration 3: visits="))
                && lines_of(o, "redis-ambassador", "counter")
                    .iter()
                    .filter(|l| l.starts_with(':') && l.contains('$'))
                    .count()
                    >= 2
        })
        .await;
    // redis-py, over wasi:sockets: every iteration succeeded.
    let app_lines = lines_of(&out, "redis-ambassador", "app");
    assert!(
        app_lines[0].starts_with("redis-app: redis-py ") && app_lines[0].contains("127.0.0.1:6379"),
        "{app_lines:?}"
    );
    for l in app_lines.iter().skip(1) {
        assert!(
            l.starts_with("iteration ") && l.contains(": visits=") && !l.contains("retrying"),
            "{app_lines:?}"
        );
    }
    let counter = lines_of(&out, "redis-ambassador", "counter");
    assert!(!counter.iter().any(|l| l.contains("ERR")), "{counter:?}");
    // busybox nc: INCR counter (`:N`) then GET app:last (a bulk string), N growing.
    let counts: Vec<u64> = lines_of(&out, "redis-ambassador", "counter")
        .iter()
        .filter_map(|l| l.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        counts.len() >= 2 && counts.windows(2).all(|w| w[1] > w[0]),
        "{out}"
    );
    // Writes on the master; the replica has them through replication.
    let on_master: u64 = redis_cli(6390, &["get", "counter"]).trim().parse().unwrap();
    assert!(
        on_master >= counts[counts.len() - 1],
        "{on_master} {counts:?}"
    );
    let stats = |port: u16| redis_cli(port, &["info", "commandstats"]);
    // The counter's INCRs, and redis-py's (INCRBY, twice an iteration) and SETs.
    let m = stats(6390);
    assert!(calls(6390, "incr") >= counts.len() as u64, "{m}");
    assert!(calls(6390, "incrby") >= 6 && calls(6390, "set") >= 3, "{m}");
    // Reads on the replica, which no one but the ambassador talks to.
    let gets = calls(6391, "get");
    assert!(
        gets >= 3,
        "only {gets} GETs on the replica: {}",
        stats(6391)
    );
    // The ambassador's metrics through hostPort 9121 count commands on both upstreams.
    let metrics = wait_for("the ambassador's /metrics on :9121", 30, || async {
        http_get(9121, "/metrics").await.ok_or_else(String::new)
    })
    .await;
    let routed = |upstream: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("kapsel_ambassador_commands_total{") && l.contains(upstream))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(routed("127.0.0.1:6390") > 0.0, "{metrics}");
    assert!(routed("127.0.0.1:6391") > 0.0, "{metrics}");
    stop_cleanly(&mut up).await;
    drop(replica);
    drop(master);
}

// --------------------------------------------------------------------- deployment and canary

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/default/deployments";

/// A changed copy of a shipped Deployment sample ("change VERSION to v2 and apply"), its
/// relative image made absolute (the CLI does the same for the shipped file) so the copy
/// differs in exactly the values replaced.
fn edited(sample_file: &str, replace: &[(&str, &str)]) -> tempfile::NamedTempFile {
    let mut yaml = std::fs::read_to_string(sample(sample_file)).unwrap();
    let worker = repo("sample-pods/rollout/worker.wasm")
        .display()
        .to_string();
    for (from, to) in [(
        "image: rollout/worker.wasm",
        &format!("image: {worker}")[..],
    )]
    .iter()
    .chain(replace)
    {
        assert_eq!(yaml.matches(from).count(), 1, "{from:?} in {sample_file}");
        yaml = yaml.replace(from, to);
    }
    let f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(f.path(), yaml).unwrap();
    f
}

/// The live pods of `app=<app>`: (name, ready, VERSION, CRASH).
async fn pods_of(k: &Kapsel, app: &str) -> Vec<(String, bool, String, String)> {
    live_pods(k, app)
        .await
        .into_iter()
        .filter(|p| !matches!(phase(p), "Succeeded" | "Failed"))
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                pod_ready(&p),
                first_env(&p, "VERSION"),
                first_env(&p, "CRASH"),
            )
        })
        .collect()
}

fn all_ready(p: &[(String, bool, String, String)], n: usize, version: &str) -> bool {
    p.len() == n && p.iter().all(|x| x.1 && x.2 == version)
}

async fn wait_pods(
    k: &Kapsel,
    app: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&[(String, bool, String, String)]) -> bool,
) {
    wait_for(what, secs, || async {
        let p = pods_of(k, app).await;
        if pred(&p) {
            Ok(())
        } else {
            Err(format!("{p:?}"))
        }
    })
    .await
}

async fn wait_deploy(
    k: &Kapsel,
    name: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(what, secs, || async {
        let (_, d) = k.get(&format!("{DEPLOYMENTS}/{name}")).await;
        if pred(&d) {
            Ok(d)
        } else {
            Err(format!("{d:#}"))
        }
    })
    .await
}

fn progressing(d: &Value) -> String {
    d["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Progressing"))
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn template_env(d: &Value, n: &str) -> String {
    d["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == n))
        .and_then(|e| e["value"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Sample the pods until `done`: (fewest pods for which `ready` holds, most live pods, most
/// pods for which `counted` holds, samples).
async fn observe(
    k: &Kapsel,
    app: &str,
    secs: u64,
    ready: impl Fn(&(String, bool, String, String)) -> bool,
    counted: impl Fn(&(String, bool, String, String)) -> bool,
    mut done: impl FnMut(&[(String, bool, String, String)]) -> bool,
) -> (usize, usize, usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut min_ready, mut max_live, mut max_counted, mut samples) = (usize::MAX, 0, 0, 0);
    loop {
        let p = pods_of(k, app).await;
        min_ready = min_ready.min(p.iter().filter(|x| ready(x)).count());
        max_live = max_live.max(p.len());
        max_counted = max_counted.max(p.iter().filter(|x| counted(x)).count());
        samples += 1;
        if done(&p) {
            return (min_ready, max_live, max_counted, samples);
        }
        assert!(Instant::now() < deadline, "not done after {secs}s: {p:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `deployment.yaml`, as its header walks through it: 4 workers; a v2 release rolled out
/// without ever dropping below 4 ready (maxUnavailable 0, maxSurge 1) and told apart in
/// `rollout history`; a broken release (CRASH=1) held at maxSurge, failed after
/// progressDeadlineSeconds (20) with `rollout status` exiting 1, and rolled back on its own,
/// which `describe deployment` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_sample_rolls_out_keeping_4_ready_and_rolls_a_broken_release_back() {
    let k = Kapsel::start();
    let out = ok(k.cli(&["apply", "-f", &sample("deployment.yaml")]));
    assert_eq!(out.trim(), "deployment/worker created");
    wait_pods(&k, "worker", 30, "4 ready v1 workers", |p| {
        all_ready(p, 4, "v1")
    })
    .await;
    let status = ok(k.cli(&["rollout", "status", "deployment/worker", "--timeout", "30s"]));
    assert!(status.contains("successfully rolled out"), "{status}");
    let get = ok(k.cli(&["get", "deployments"]));
    let row: Vec<&str> = get
        .lines()
        .find(|l| l.starts_with("worker "))
        .unwrap_or_else(|| panic!("{get}"))
        .split_whitespace()
        .collect();
    assert_eq!(&row[..4], ["worker", "4/4", "4", "4"], "{get}");
    let pod = &pods_of(&k, "worker").await[0].0;
    let logs = k.logs(pod, "worker").await;
    assert!(
        logs.starts_with(&format!("{pod}: release v1 started\n")),
        "{logs}"
    );

    // A new release: VERSION v2, applied again.
    let v2 = edited("deployment.yaml", &[("value: v1", "value: v2")]);
    ok(k.cli(&["apply", "-f", v2.path().to_str().unwrap()]));
    let (min_ready, max_live, _, samples) = observe(
        &k,
        "worker",
        60,
        |x| x.1,
        |_| false,
        |p| all_ready(p, 4, "v2"),
    )
    .await;
    assert!(min_ready >= 4, "ready workers dropped to {min_ready}");
    assert!(
        samples >= 10,
        "only {samples} samples: too quick to observe"
    );
    assert!(
        max_live <= 5,
        "{max_live} live pods: more than replicas + maxSurge"
    );
    ok(k.cli(&["rollout", "status", "deployment/worker", "--timeout", "30s"]));
    let hist = ok(k.cli(&["rollout", "history", "deployment/worker"]));
    let rev2 = hist
        .lines()
        .find(|l| l.starts_with("2 "))
        .unwrap_or_else(|| panic!("{hist}"));
    assert!(rev2.contains("env VERSION=v2"), "{hist}");

    // The broken release.
    let v3 = edited(
        "deployment.yaml",
        &[("value: v1", "value: v3"), ("value: \"0\"", "value: \"1\"")],
    );
    ok(k.cli(&["apply", "-f", v3.path().to_str().unwrap()]));
    let mut status = Command::new(bin())
        .args(["--server", &k.url, "rollout", "status", "deployment/worker"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut seen_broken = false;
    let (min_v2_ready, max_live, max_broken, _) = observe(
        &k,
        "worker",
        90,
        |x| x.1 && x.2 == "v2",
        |x| x.3 == "1",
        |p| {
            seen_broken |= p.iter().any(|x| x.3 == "1");
            seen_broken && all_ready(p, 4, "v2")
        },
    )
    .await;
    assert!(
        min_v2_ready >= 4,
        "ready v2 workers dropped to {min_v2_ready}"
    );
    assert_eq!(max_broken, 1, "broken pods at once (maxSurge 1)");
    assert!(max_live <= 5, "{max_live} live pods");
    let d = wait_deploy(&k, "worker", 60, "rolled back to v2", |d| {
        template_env(d, "CRASH") == "0"
            && template_env(d, "VERSION") == "v2"
            && progressing(d) == "NewReplicaSetAvailable"
    })
    .await;
    assert!(
        t0.elapsed() >= Duration::from_secs(20),
        "rolled back after {:?}, before progressDeadlineSeconds",
        t0.elapsed()
    );
    assert_eq!(d["status"]["availableReplicas"], 4);
    let deadline = Instant::now() + Duration::from_secs(30);
    while status.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = status.kill();
            let _ = status.wait();
            panic!("rollout status still running after the rollback");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.wait_with_output().unwrap();
    assert_eq!(
        status.status.code(),
        Some(1),
        "rollout status of the broken release: stdout {} stderr {}",
        text(&status.stdout),
        text(&status.stderr)
    );
    assert!(
        text(&status.stderr).contains("rolled back"),
        "{}",
        text(&status.stderr)
    );
    let desc = ok(k.cli(&["describe", "deployment", "worker"]));
    for want in ["ProgressDeadlineExceeded", "DeploymentRollback"] {
        assert!(desc.contains(want), "describe lacks {want}:\n{desc}");
    }
    wait_pods(&k, "worker", 30, "only v2 left", |p| all_ready(p, 4, "v2")).await;
}

/// `canary.yaml`, as its header walks through it: 4 v1 pods; v2 applied runs as 1 canary
/// beside the 4 old pods and waits (`rollout status --watch=false` says so); `rollout promote`
/// rolls it out to all 4; a v3 canary aborted with `rollout abort` leaves v2's 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_sample_waits_with_one_canary_until_promoted_or_aborted() {
    let k = Kapsel::start();
    ok(k.cli(&["apply", "-f", &sample("canary.yaml")]));
    wait_pods(&k, "checkout", 30, "4 ready v1", |p| all_ready(p, 4, "v1")).await;

    let v2 = edited("canary.yaml", &[("value: v1", "value: v2")]);
    ok(k.cli(&["apply", "-f", v2.path().to_str().unwrap()]));
    let one_canary = |p: &[(String, bool, String, String)], old: &str, new: &str| {
        p.len() == 5
            && p.iter().filter(|x| x.2 == new && x.1).count() == 1
            && p.iter().filter(|x| x.2 == old && x.1).count() == 4
    };
    wait_pods(&k, "checkout", 30, "1 v2 canary beside 4 v1", |p| {
        one_canary(p, "v1", "v2")
    })
    .await;
    let status = ok(k.cli(&["rollout", "status", "deployment/checkout", "--watch=false"]));
    assert!(status.contains("canary"), "{status}");
    // It waits (autoPromote: false): still 1 + 4 a while later.
    let held = Instant::now();
    while held.elapsed() < Duration::from_millis(1500) {
        let p = pods_of(&k, "checkout").await;
        assert!(one_canary(&p, "v1", "v2"), "{p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = ok(k.cli(&["rollout", "promote", "deployment/checkout"]));
    assert!(out.contains("promoted"), "{out}");
    wait_pods(&k, "checkout", 60, "4 ready v2", |p| all_ready(p, 4, "v2")).await;
    wait_deploy(&k, "checkout", 20, "v2 complete", |d| {
        progressing(d) == "NewReplicaSetAvailable"
    })
    .await;

    let v3 = edited("canary.yaml", &[("value: v1", "value: v3")]);
    ok(k.cli(&["apply", "-f", v3.path().to_str().unwrap()]));
    wait_pods(&k, "checkout", 30, "1 v3 canary beside 4 v2", |p| {
        one_canary(p, "v2", "v3")
    })
    .await;
    let out = ok(k.cli(&["rollout", "abort", "deployment/checkout"]));
    assert!(out.contains("aborted"), "{out}");
    wait_pods(&k, "checkout", 30, "back to 4 v2", |p| {
        all_ready(p, 4, "v2")
    })
    .await;
    // The status catches up with the pods: poll it rather than read it once.
    let d = wait_deploy(&k, "checkout", 10, "the v2 template, 4 available", |d| {
        template_env(d, "VERSION") == "v2" && d["status"]["availableReplicas"] == 4
    })
    .await;
    assert_eq!(d["status"]["availableReplicas"], 4);
}
