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
