//! The metrics adapter, for real: in a pod next to a WASM component emitting StatsD over UDP and
//! a busybox container serving JSON and Prometheus text and writing a status file; scraped by a
//! real Prometheus server whose query API must return the normalised series of every input.

mod common;

use std::io::Write;
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, free_port, http_get, Kapsel};
use serde_json::Value;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn poll<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// First value of an instant query, if the series exists.
async fn query(prom: u16, q: &str) -> Option<f64> {
    let url = format!("http://127.0.0.1:{prom}/api/v1/query");
    let r: Value = reqwest::Client::new()
        .get(url)
        .query(&[("query", q)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    r["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

const SOURCES: &str = r#"
json:
- name: web
  url: http://127.0.0.1:8080/stats.json
  interval: 500ms
  metrics:
  - {name: shop_queue_backlog, path: $.queue.depth, help: "Backlog from the JSON stats."}
  - name: shop_worker
    path: $.workers[*]
    labels: {worker: '{.name}'}
    values: {busy: '{.busy}'}
- name: missing
  url: http://127.0.0.1:8999/nothing.json
  interval: 500ms
  metrics: [{name: never_seen, path: $.x}]
prometheus:
- name: legacy
  url: http://127.0.0.1:8080/metrics
  interval: 500ms
  prefix: legacy_app_
  labels: {source: legacy}
lines:
- name: status
  file: /data/status.txt
  interval: 500ms
  rules:
  - {regex: '^jobs_done (?P<n>\d+)$', name: shop_jobs_done, value: '$n'}
  - {regex: '^worker=(?P<w>\w+) busy=(?P<b>\d+)$', name: shop_worker_busy_reported, value: '$b', labels: {worker: '$w'}}
"#;

const MAPPING: &str = r#"
mappings:
- match: "shop.requests"
  name: "shop_requests_total"
  help: "Requests, from StatsD."
- match: "shop.request_time"
  name: "shop_request_duration_seconds"
  histogram_options: {buckets: [0.05, 0.1, 0.25, 0.5]}
"#;

fn statsd_app() -> String {
    let out = Command::new(common::repo("scripts/build-guests.sh"))
        .args(["--component-if-missing", "sample-pods/statsd-app"])
        .current_dir(common::repo(""))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_statsd_json_prometheus_and_file_inputs_through_the_adapter() {
    let app = statsd_app();
    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(cfg.path().join("sources.yaml"), SOURCES).unwrap();
    std::fs::write(cfg.path().join("mapping.yaml"), MAPPING).unwrap();
    let hp = free_port();
    let k = Kapsel::start();
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: metrics-demo}}
spec:
  volumes:
  - {{name: cfg, hostPath: {{path: {cfg}}}}}
  - {{name: data, emptyDir: {{}}}}
  initContainers:
  - name: adapter
    image: builtin/metrics-adapter
    restartPolicy: Always
    args: ["--statsd.listen-udp=127.0.0.1:9125", "--web.listen-address=0.0.0.0:9102",
           "--config=/etc/adapter/sources.yaml", "--statsd.mapping-config=/etc/adapter/mapping.yaml",
           "--reload-interval=200ms"]
    ports: [{{containerPort: 9102, hostPort: {hp}}}]
    volumeMounts: [{{name: cfg, mountPath: /etc/adapter}}, {{name: data, mountPath: /data}}]
  containers:
  - name: app
    image: {app}
  - name: web
    image: {busybox}
    command: ["sh", "-c", "mkdir -p /www && echo '{{\"queue\":{{\"depth\":7}},\"workers\":[{{\"name\":\"a\",\"busy\":2}},{{\"name\":\"b\",\"busy\":0}}]}}' > /www/stats.json && printf '# TYPE hits_total counter\\nhits_total{{code=\"200\"}} 5\\nbroken line {{\\n' > /www/metrics && (while true; do printf 'jobs_done 42\\nworker=a busy=3\\n' > /data/status.txt; sleep 1; done) & exec httpd -f -p 8080 -h /www"]
    volumeMounts: [{{name: data, mountPath: /data}}]
"#,
        cfg = cfg.path().display(),
        busybox = common::BUSYBOX,
    );
    k.apply("metrics-demo", &yaml);

    let pp = free_port();
    let pdir = tempfile::tempdir().unwrap();
    std::fs::write(
        pdir.path().join("prometheus.yml"),
        format!("global: {{scrape_interval: 1s, scrape_timeout: 900ms}}\nscrape_configs:\n- job_name: pod\n  static_configs: [{{targets: ['127.0.0.1:{hp}']}}]\n"),
    )
    .unwrap();
    let _prom = Proc(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                pdir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                pdir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{pp}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (scripts/install-deps.sh installs it)"),
    );

    // Every input kind, normalised, through Prometheus's own query API.
    let checks: [(&str, Option<f64>); 8] = [
        ("shop_requests_total{route=\"/home\"}", None), // StatsD counter with a DogStatsD tag
        ("shop_request_duration_seconds_count{route=\"/cart\"}", None), // timer → histogram (seconds)
        ("shop_queue_depth", None),                                     // gauge
        ("shop_queue_backlog", Some(7.0)),                              // JSON value
        ("shop_worker_busy{worker=\"a\"}", Some(2.0)), // JSON objects → labelled values
        (
            "legacy_app_hits_total{source=\"legacy\",code=\"200\"}",
            Some(5.0),
        ), // Prometheus text, relabeled
        ("shop_jobs_done", Some(42.0)),                // regex over a status file
        ("shop_worker_busy_reported{worker=\"a\"}", Some(3.0)), // regex with a label
    ];
    for (q, want) in checks {
        let v = poll(&format!("Prometheus to return {q}"), 150, || query(pp, q)).await;
        if let Some(w) = want {
            assert_eq!(v, w, "{q}");
        } else {
            assert!(v > 0.0, "{q} = {v}");
        }
    }
    let users = poll("shop_users", 30, || query(pp, "shop_users")).await;
    assert!(
        (1.0..=5.0).contains(&users),
        "a StatsD set counts distinct members: {users}"
    );
    // The unreachable JSON endpoint is reported; everything else is still served (above).
    let failed = poll("the failing source to be counted", 30, || {
        query(
            pp,
            "kapsel_adapter_scrapes_total{source=\"json/missing\",result=\"failure\"}",
        )
    })
    .await;
    assert!(failed > 0.0);
    let page = http_get(hp, "/metrics").await.unwrap();
    assert!(
        page.contains("kapsel_adapter_prometheus_malformed_lines_total"),
        "{page}"
    );
    assert!(!page.contains("never_seen"));
    let logs = k.logs("metrics-demo", "adapter").await;
    assert!(
        logs.contains("json/missing (http://127.0.0.1:8999/nothing.json) failed"),
        "{logs}"
    );

    // OpenMetrics by content negotiation.
    let om = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{hp}/metrics"))
        .header("Accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(om.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let om = om.text().await.unwrap();
    assert!(om.contains("# TYPE shop_requests counter\n"), "{om}");
    assert!(om.ends_with("# EOF\n"));

    // The node keeps the latest values for controllers.
    let (code, v) = k
        .get("/api/v1/namespaces/default/pods/metrics-demo/metrics")
        .await;
    assert_eq!(code, 200);
    assert!(
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["metric"] == "shop_queue_backlog" && i["value"] == 7.0),
        "{v:#}"
    );

    // A broken mapping file is reported and the previous rules stay in force.
    // (Replaced by rename, as a ConfigMap update swaps files: never a half-written file.)
    std::fs::write(
        cfg.path().join("mapping.new"),
        "mappings:\n- match: 'shop.*'\n  labels: {x: y}\n",
    )
    .unwrap();
    std::fs::rename(
        cfg.path().join("mapping.new"),
        cfg.path().join("mapping.yaml"),
    )
    .unwrap();
    poll("the bad reload to be counted", 30, || async {
        http_get(hp, "/metrics")
            .await
            .filter(|p| p.contains("kapsel_adapter_config_reloads_total{result=\"failure\"} 1"))
    })
    .await;
    let logs = k.logs("metrics-demo", "adapter").await;
    assert!(
        logs.contains("keeping the previous mapping configuration"),
        "{logs}"
    );
    assert!(
        logs.contains("mappings[0]"),
        "the bad rule is named: {logs}"
    );
    let page = http_get(hp, "/metrics").await.unwrap();
    assert!(page.contains("shop_requests_total{route="));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_statsd_and_too_many_series_are_counted_not_fatal() {
    let web = free_port();
    let udp = free_port();
    let dir = tempfile::tempdir().unwrap();
    let _a = Proc(
        Command::new(bin())
            .arg("metrics-adapter")
            .arg(format!("--statsd.listen-udp=127.0.0.1:{udp}"))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .arg("--max-series=50")
            .current_dir(dir.path())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    poll("the adapter to serve", 20, || http_get(web, "/metrics")).await;
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let send = |b: &[u8]| {
        s.send_to(b, ("127.0.0.1", udp)).unwrap();
    };
    send(b"good.one:1|c\n:nonsense\nx:1|zz\nvery.bad");
    send(&[0xff, 0x00, 0x13]);
    send(b"conflict:1|c\nconflict:2|g\ntagged:1|c|#a:1\ntagged:1|c|#b:1\n");
    for i in 0..100 {
        send(format!("many:1|g|#i:{i}").as_bytes());
    }
    let page = poll("all datagrams to be ingested", 20, || async {
        http_get(web, "/metrics")
            .await
            .filter(|p| p.contains("kapsel_adapter_statsd_packets_total 103"))
    })
    .await;
    assert!(page.contains("good_one 1\n"), "{page}");
    assert!(
        page.contains("kapsel_adapter_statsd_malformed_lines_total 4\n"),
        "{page}"
    );
    assert!(
        page.contains("kapsel_adapter_type_conflicts_total 1\n"),
        "{page}"
    );
    assert!(
        page.contains("kapsel_adapter_label_conflicts_total 1\n"),
        "{page}"
    );
    assert!(page.contains("kapsel_adapter_series 50\n"), "{page}");
    assert!(
        page.contains("kapsel_adapter_cardinality_dropped_total"),
        "{page}"
    );
    // Still serving, still ingesting.
    send(b"after:3|g");
    poll("a later sample", 10, || async {
        http_get(web, "/metrics")
            .await
            .filter(|p| p.contains("kapsel_adapter_statsd_packets_total 104"))
    })
    .await;

    // A broken mapping file at start: a clear error naming the rule, non-zero exit.
    let bad = dir.path().join("bad.yaml");
    std::fs::File::create(&bad)
        .unwrap()
        .write_all(b"mappings:\n- match: 'a.*'\n  name: x\n  buckets: [1, 0.5]\n")
        .unwrap();
    let out = Command::new(bin())
        .args([
            "metrics-adapter",
            "--statsd.listen-udp=",
            "--web.listen-address=127.0.0.1:0",
        ])
        .arg(format!("--statsd.mapping-config={}", bad.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mappings[0]") && err.contains("strictly increasing"),
        "{err}"
    );
}

/// `sample-pods/metrics-adapter.yaml` as the README runs it (`kapsel up`): every source shows up
/// in the adapter's `/metrics` on hostPort 9102, and SIGTERM stops everything cleanly (exit 0,
/// no container left). Its web container once crash-looped (httpd started before `/www`
/// existed). `up` could also overflow its stack at exit, when a pod's sandbox guard was dropped
/// while the runtime shut down; that depends on timing and this test does not always catch it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_adapter_sample_runs_under_up_and_stops_cleanly() {
    statsd_app();
    let data = tempfile::tempdir().unwrap();
    let mut up = Command::new(bin())
        .current_dir(common::repo(""))
        .args(["up", "-f", "sample-pods/metrics-adapter.yaml"])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = up.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut s).unwrap();
        s
    });
    let wanted = [
        "shop_queue_backlog 7",
        "shop_worker_busy{worker=\"a\"} 2",
        "shop_jobs_done",
        "legacy_app_hits_total{code=\"200\",source=\"legacy\"} 5",
    ];
    poll(
        "every source of the sample in /metrics on :9102",
        120,
        || async {
            let m = http_get(9102, "/metrics").await?;
            wanted.iter().all(|w| m.contains(w)).then_some(m)
        },
    )
    .await;
    // SAFETY: kill(2) takes plain integers; the pid is our own child, not yet reaped (so not reused).
    unsafe {
        libc::kill(up.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "kapsel up did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let err = err.join().unwrap();
    assert!(status.success(), "exit {status:?}:\n{err}");
    assert!(!err.contains("overflowed"), "{err}");
    assert!(err.contains("kapsel: stopped"), "{err}");
    let id = std::fs::read_to_string(data.path().join("node-id")).unwrap();
    let left = common::docker_ids(&format!("io.kapsel.node-id={}", id.trim()));
    assert!(
        left.is_empty(),
        "containers left after up stopped: {left:?}"
    );
}

// ------------------------------------------------------------------ statsd_exporter's scenarios

/// One file of `tests/fixtures/statsd-mapper/`: a mapping file and what the adapter must make
/// of StatsD lines under it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    config: Option<String>,
    /// A file next to the scenario, used byte for byte.
    config_file: Option<String>,
    /// The adapter must refuse to start, with this in its error.
    refused: Option<String>,
    /// Warnings the adapter must log.
    #[serde(default)]
    warns: Vec<String>,
    #[serde(default)]
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// A StatsD line; `{1..100}` sends one line per number.
    line: String,
    name: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    /// counter, gauge, histogram or summary (by default from the line's StatsD type).
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Dropped by an `action: drop` rule.
    #[serde(default)]
    dropped: bool,
    /// Leaves the exposition after its ttl.
    #[serde(default)]
    gone: bool,
    #[serde(default = "one")]
    repeat: usize,
    value: Option<f64>,
    sum: Option<f64>,
    count: Option<f64>,
    buckets: Option<Vec<f64>>,
    quantiles: Option<Vec<f64>>,
    quantile_values: Option<serde_norway::Mapping>,
    help: Option<String>,
    #[allow(dead_code)]
    note: Option<String>,
}

fn one() -> usize {
    1
}

impl Case {
    fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        let expanded = match (self.line.find('{'), self.line.find("..")) {
            (Some(open), Some(dots)) if dots > open => {
                let close = self.line[dots..].find('}').unwrap() + dots;
                let a: i64 = self.line[open + 1..dots].parse().unwrap();
                let b: i64 = self.line[dots + 2..close].parse().unwrap();
                (a..=b)
                    .map(|v| format!("{}{v}{}", &self.line[..open], &self.line[close + 1..]))
                    .collect()
            }
            _ => vec![self.line.clone()],
        };
        for _ in 0..self.repeat {
            out.extend(expanded.iter().cloned());
        }
        out
    }

    fn kind(&self) -> String {
        self.kind.clone().unwrap_or_else(|| {
            match self.line.split('|').nth(1).unwrap_or("") {
                "c" => "counter",
                "g" | "s" => "gauge",
                _ => "histogram",
            }
            .to_string()
        })
    }
}

type Labels = std::collections::BTreeMap<String, String>;

/// A scraped page: samples, `# TYPE`s and `# HELP`s.
struct Page {
    samples: Vec<(String, Labels, f64)>,
    types: HashMap<String, String>,
    helps: HashMap<String, String>,
}

use std::collections::HashMap;

fn parse_page(text: &str) -> Page {
    let mut p = Page {
        samples: Vec::new(),
        types: HashMap::new(),
        helps: HashMap::new(),
    };
    for line in text.lines() {
        if let Some(r) = line.strip_prefix("# TYPE ") {
            let (n, t) = r.split_once(' ').unwrap();
            p.types.insert(n.to_string(), t.to_string());
            continue;
        }
        if let Some(r) = line.strip_prefix("# HELP ") {
            let (n, t) = r.split_once(' ').unwrap();
            p.helps.insert(n.to_string(), t.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, rest) = match line.find('{') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => {
                let (n, v) = line.split_once(' ').unwrap();
                p.samples
                    .push((n.to_string(), Labels::new(), parse_value(v)));
                continue;
            }
        };
        let mut labels = Labels::new();
        let b: Vec<char> = rest.chars().collect();
        let mut i = 0;
        loop {
            if b[i] == '}' {
                i += 1;
                break;
            }
            if b[i] == ',' {
                i += 1;
                continue;
            }
            let eq = (i..b.len()).find(|&j| b[j] == '=').unwrap();
            let key: String = b[i..eq].iter().collect();
            let mut j = eq + 2;
            let mut val = String::new();
            while b[j] != '"' {
                if b[j] == '\\' {
                    j += 1;
                    val.push(if b[j] == 'n' { '\n' } else { b[j] });
                } else {
                    val.push(b[j]);
                }
                j += 1;
            }
            labels.insert(key, val);
            i = j + 1;
        }
        let v: String = b[i..].iter().collect();
        p.samples
            .push((name.to_string(), labels, parse_value(v.trim())));
    }
    p
}

fn parse_value(v: &str) -> f64 {
    match v.trim() {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap(),
    }
}

impl Page {
    fn get(&self, name: &str, labels: &Labels) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .map(|s| s.2)
    }
    /// Samples of `name` whose labels are `labels` plus one more, `extra`: (its value, sample).
    fn by_extra(&self, name: &str, labels: &Labels, extra: &str) -> Vec<(f64, f64)> {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && l.len() == labels.len() + 1
                    && labels.iter().all(|(k, v)| l.get(k) == Some(v))
            })
            .filter_map(|(_, l, v)| Some((parse_value(l.get(extra)?), *v)))
            .collect()
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 + 1e-9 * b.abs()
}

fn get_sync(port: u16, path: &str) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.lines()
        .next()?
        .contains(" 200 ")
        .then(|| body.to_string())
}

fn own_metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(parse_value)
        .unwrap_or(f64::NAN)
}

/// Run one scenario against a real `kapsel metrics-adapter` over UDP; every failed
/// expectation is returned.
fn run_scenario(dir: &std::path::Path, file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    let sc: Scenario = serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut errs = Vec::new();
    let tmp = tempfile::tempdir().unwrap();
    let mapping = tmp.path().join("mapping.yaml");
    let config = match (&sc.config, &sc.config_file) {
        (_, Some(f)) => std::fs::read(dir.join(f)).unwrap(),
        (Some(c), None) => c.clone().into_bytes(),
        (None, None) => Vec::new(),
    };
    std::fs::write(&mapping, config).unwrap();
    let stderr_path = tmp.path().join("stderr");
    let (udp, web) = (free_port(), free_port());
    let mut child = Proc(
        Command::new(bin())
            .arg("metrics-adapter")
            .arg(format!("--statsd.listen-udp=127.0.0.1:{udp}"))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .arg(format!("--statsd.mapping-config={}", mapping.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    if let Some(want) = &sc.refused {
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                return vec![format!("{file}: the adapter accepted a bad mapping file")];
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = stderr();
        if status.success()
            || !err.contains("--statsd.mapping-config")
            || !err.contains(want.as_str())
        {
            errs.push(format!(
                "{file}: want a refusal naming {want:?}, got {status:?}: {err}"
            ));
        }
        return errs;
    }
    while get_sync(web, "/metrics").is_none() {
        if let Some(s) = child.0.try_wait().unwrap() {
            return vec![format!("{file}: the adapter exited ({s}): {}", stderr())];
        }
        assert!(
            Instant::now() < deadline,
            "{file}: the adapter never served"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sent = 0;
    for c in &sc.cases {
        for l in c.lines() {
            sock.send_to(l.as_bytes(), ("127.0.0.1", udp)).unwrap();
            sent += 1;
        }
    }
    let want_lines = format!("kapsel_adapter_statsd_lines_total {sent}\n");
    let page = loop {
        let p = get_sync(web, "/metrics").unwrap_or_default();
        if p.contains(&want_lines) {
            break p;
        }
        if Instant::now() > deadline {
            return vec![format!("{file}: not every line arrived: {p}")];
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let p = parse_page(&page);
    let mut series = std::collections::BTreeSet::new();
    let mut dropped = 0;
    for c in &sc.cases {
        let at = format!("{file}: {:?}", c.line);
        if c.dropped {
            dropped += c.lines().len();
            continue;
        }
        let name = c.name.clone().unwrap();
        series.insert((name.clone(), c.labels.clone()));
        let kind = c.kind();
        if p.types.get(&name) != Some(&kind) {
            errs.push(format!(
                "{at}: want # TYPE {name} {kind}, got {:?}",
                p.types.get(&name)
            ));
        }
        if let Some(h) = &c.help {
            if p.helps.get(&name) != Some(h) {
                errs.push(format!(
                    "{at}: want # HELP {name} {h}, got {:?}",
                    p.helps.get(&name)
                ));
            }
        }
        let check = |errs: &mut Vec<String>, what: &str, got: Option<f64>, want: Option<f64>| match (
            got, want,
        ) {
            (None, _) => errs.push(format!("{at}: no {what}{:?} in {page}", c.labels)),
            (Some(g), Some(w)) if !close(g, w) => {
                errs.push(format!("{at}: {what}{:?} is {g}, want {w}", c.labels))
            }
            _ => {}
        };
        match kind.as_str() {
            "counter" | "gauge" => check(&mut errs, &name, p.get(&name, &c.labels), c.value),
            "histogram" => {
                check(
                    &mut errs,
                    &format!("{name}_count"),
                    p.get(&format!("{name}_count"), &c.labels),
                    c.count,
                );
                check(
                    &mut errs,
                    &format!("{name}_sum"),
                    p.get(&format!("{name}_sum"), &c.labels),
                    c.sum,
                );
                if let Some(b) = &c.buckets {
                    let got: Vec<f64> = p
                        .by_extra(&format!("{name}_bucket"), &c.labels, "le")
                        .into_iter()
                        .map(|(le, _)| le)
                        .filter(|le| le.is_finite())
                        .collect();
                    if got.len() != b.len() || got.iter().zip(b).any(|(g, w)| !close(*g, *w)) {
                        errs.push(format!("{at}: buckets {got:?}, want {b:?}"));
                    }
                }
            }
            "summary" => {
                check(
                    &mut errs,
                    &format!("{name}_count"),
                    p.get(&format!("{name}_count"), &c.labels),
                    c.count,
                );
                check(
                    &mut errs,
                    &format!("{name}_sum"),
                    p.get(&format!("{name}_sum"), &c.labels),
                    c.sum,
                );
                let got = p.by_extra(&name, &c.labels, "quantile");
                if let Some(q) = &c.quantiles {
                    let qs: Vec<f64> = got.iter().map(|g| g.0).collect();
                    if qs.len() != q.len() || q.iter().any(|w| !qs.iter().any(|g| close(*g, *w))) {
                        errs.push(format!("{at}: quantiles {qs:?}, want {q:?}"));
                    }
                }
                for (k, v) in c.quantile_values.iter().flatten() {
                    let (q, want) = (k.as_f64().unwrap(), v.as_f64().unwrap());
                    match got.iter().find(|g| close(g.0, q)) {
                        Some((_, v)) if close(*v, want) => {}
                        other => errs.push(format!("{at}: quantile {q} is {other:?}, want {want}")),
                    }
                }
            }
            other => panic!("{at}: unknown type {other}"),
        }
    }
    let held = own_metric(&page, "kapsel_adapter_series");
    if held != series.len() as f64 {
        errs.push(format!(
            "{file}: {held} series held, want {} ({series:?}):\n{page}",
            series.len()
        ));
    }
    let by_rule = own_metric(&page, "kapsel_adapter_statsd_dropped_by_rule_total");
    if by_rule != dropped as f64 {
        errs.push(format!(
            "{file}: {by_rule} samples dropped by rules, want {dropped}"
        ));
    }
    let err = stderr();
    for w in &sc.warns {
        if !err.contains(w.as_str()) || !err.contains("warning") {
            errs.push(format!(
                "{file}: want a warning with {w:?} in the log: {err}"
            ));
        }
    }
    // Series past their ttl leave the exposition; the others stay.
    let gone: Vec<&Case> = sc.cases.iter().filter(|c| c.gone).collect();
    if !gone.is_empty() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let p = parse_page(&get_sync(web, "/metrics").unwrap_or_default());
            let left = gone
                .iter()
                .filter(|c| {
                    let name = c.name.clone().unwrap();
                    p.samples
                        .iter()
                        .any(|(n, l, _)| *n == name && *l == c.labels)
                })
                .count();
            let kept = sc.cases.iter().filter(|c| !c.gone && !c.dropped).all(|c| {
                p.samples
                    .iter()
                    .any(|(n, l, _)| Some(n) == c.name.as_ref() && *l == c.labels)
            });
            if left == 0 {
                if !kept {
                    errs.push(format!("{file}: a series without a ttl left too"));
                }
                break;
            }
            if Instant::now() > deadline {
                errs.push(format!("{file}: {left} series outlived their ttl"));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    errs
}

/// statsd_exporter's own mapper scenarios (`pkg/mapper/mapper_test.go`: every mapping-semantics
/// case of TestMetricMapperYAML, TestAction and TestMultipleMatches), its README's examples and
/// its documented starter configuration, each replayed through a running adapter: StatsD lines
/// over UDP, `/metrics` scraped, every expected name, label set, type, bucket and quantile
/// checked, and the series count (so nothing else appeared and drops dropped).
#[test]
fn statsd_exporter_mapper_scenarios_through_the_adapter_over_udp() {
    let dir = common::repo("tests/fixtures/statsd-mapper");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 60, "{files:?}");
    let queue = std::sync::Mutex::new(files.clone());
    let errs = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some(f) = queue.lock().unwrap().pop() else {
                    return;
                };
                let e = run_scenario(&dir, &f);
                errs.lock().unwrap().extend(e);
            });
        }
    });
    let errs = errs.into_inner().unwrap();
    assert!(
        errs.is_empty(),
        "{} of {} scenarios failed:\n{}",
        errs.len(),
        files.len(),
        errs.join("\n")
    );
}

// ------------------------------------------------------------------ flags

#[test]
fn help_and_bad_flags_standalone() {
    let out = Command::new(bin())
        .args(["metrics-adapter", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for f in [
        "--statsd.listen-udp",
        "--web.listen-address",
        "--statsd.mapping-config",
        "--config",
        "--max-series",
        "--statsd.ttl",
        "--reload-interval",
        "KAPSEL_ADAPTER_STATSD_MAPPING_CONFIG",
    ] {
        assert!(help.contains(f), "{f} in {help}");
    }
    for (args, env, want) in [
        (vec!["--bogus=1"], None, "--bogus"),
        (
            vec!["--web.listen-address=nowhere"],
            None,
            "--web.listen-address",
        ),
        (vec!["--statsd.ttl", "soon"], None, "--statsd.ttl"),
        (
            vec![],
            Some(("KAPSEL_ADAPTER_MAX_SERIES", "many")),
            "KAPSEL_ADAPTER_MAX_SERIES",
        ),
    ] {
        let mut c = Command::new(bin());
        c.arg("metrics-adapter").args(&args);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(want) && err.contains("metrics-adapter"),
            "{args:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_and_bad_flags_in_a_pod() {
    let k = Kapsel::start();
    k.apply(
        "adapter-help",
        &common::pod_yaml(
            "adapter-help",
            "builtin/metrics-adapter",
            &["--help"],
            "Never",
            "",
        ),
    );
    k.wait_pod("adapter-help", 30, |p| {
        common::state(p, 0)["terminated"]["exitCode"] == 0
    })
    .await;
    let logs = k.logs("adapter-help", "main").await;
    assert!(logs.contains("--statsd.mapping-config"), "{logs}");
    k.apply(
        "adapter-bad",
        &common::pod_yaml(
            "adapter-bad",
            "builtin/metrics-adapter",
            &["--statsd.listen-udp=:x"],
            "Never",
            "",
        ),
    );
    let p = k
        .wait_pod("adapter-bad", 30, |p| {
            common::state(p, 0)["waiting"]["reason"] == "CreateContainerConfigError"
        })
        .await;
    let msg = common::state(&p, 0)["waiting"]["message"]
        .as_str()
        .unwrap_or("");
    assert!(
        msg.contains("--statsd.listen-udp") && msg.contains("metrics-adapter"),
        "{msg}"
    );
}
