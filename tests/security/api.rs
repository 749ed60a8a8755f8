//! The open loopback API, attacked as a web page in a browser on the node, as a slow or greedy
//! client, and by a careless user: cross-site writes (text/plain + foreign Origin + foreign
//! Host, i.e. DNS rebinding), half-sent requests and connection floods, deletes racing status
//! updates, and manifests nested 100,000 levels deep.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// `127.0.0.1:PORT` of a server.
fn addr(k: &Kapsel) -> String {
    k.url.trim_start_matches("http://").to_string()
}

/// One raw HTTP/1.1 exchange (`Connection: close`): the status code and body.
fn raw(k: &Kapsel, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr(k)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    for (h, v) in headers {
        req.push_str(&format!("{h}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let code: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // A chunked body: the JSON sits between the chunk sizes.
    let json_part = body
        .find('{')
        .and_then(|i| body.rfind('}').map(|j| &body[i..=j]))
        .unwrap_or(body);
    (
        code,
        serde_json::from_str(json_part).unwrap_or(Value::String(body.to_string())),
    )
}

/// The page's payload: a pod mounting the node's `/`.
fn host_root_pod(name: &str) -> String {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"restartPolicy": "Never",
                    "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
                    "containers": [{"name": "main", "image": fixture("quick.wat"),
                                    "volumeMounts": [{"name": "root", "mountPath": "/host"}]}]}})
    .to_string()
}

async fn pod_names(k: &Kapsel) -> Vec<String> {
    let (code, list) = k.get("/api/v1/namespaces/default/pods").await;
    assert_eq!(code, 200, "{list}");
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

const PODS: &str = "/api/v1/namespaces/default/pods";

#[tokio::test(flavor = "multi_thread")]
async fn a_web_page_cannot_create_pods_cross_site() {
    let k = Kapsel::start();
    let port = addr(&k).rsplit(':').next().unwrap().to_string();
    let evil_host = format!("evil.example:{port}");
    let own_host = addr(&k);
    let body = host_root_pod("pwn");

    // The exact attack: a `fetch(..., {method: "POST", mode: "no-cors", body})` from a page
    // whose name was rebound to 127.0.0.1 — text/plain, foreign Origin, foreign Host.
    let (code, st) = raw(
        &k,
        "POST",
        PODS,
        &[
            ("Host", &evil_host),
            ("Origin", "http://evil.example"),
            ("Content-Type", "text/plain;charset=UTF-8"),
        ],
        &body,
    );
    assert_eq!(code, 403, "{st}");
    assert_eq!(st["kind"], "Status");
    assert_eq!(st["reason"], "Forbidden");

    // Each check alone refuses it.
    // (c) Host alone: JSON, no Origin, a rebound name.
    let (code, st) = raw(
        &k,
        "POST",
        PODS,
        &[("Host", &evil_host), ("Content-Type", "application/json")],
        &body,
    );
    assert_eq!(code, 403, "{st}");
    assert!(
        st["message"].as_str().unwrap().contains("DNS rebinding"),
        "{st}"
    );
    // Reads through a rebound name are refused too (a page would read Secrets or logs).
    let (code, _) = raw(&k, "GET", PODS, &[("Host", &evil_host)], "");
    assert_eq!(code, 403);
    // (b) Origin alone: correct Host, JSON.
    for origin in ["http://evil.example", "null", "http://localhost:1"] {
        let (code, st) = raw(
            &k,
            "POST",
            PODS,
            &[
                ("Host", &own_host),
                ("Origin", origin),
                ("Content-Type", "application/json"),
            ],
            &body,
        );
        assert_eq!(code, 403, "{origin}: {st}");
        assert!(
            st["message"].as_str().unwrap().contains("cross-origin"),
            "{st}"
        );
    }
    let (code, _) = raw(
        &k,
        "GET",
        PODS,
        &[("Host", &own_host), ("Sec-Fetch-Site", "cross-site")],
        "",
    );
    assert_eq!(code, 403);
    // (a) Content type alone: correct Host, no Origin — every type a browser may send
    // without a preflight, and none at all.
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let mut h = vec![("Host", own_host.as_str())];
        if let Some(ct) = ct {
            h.push(("Content-Type", ct));
        }
        let (code, st) = raw(&k, "POST", PODS, &h, &body);
        assert_eq!(code, 415, "{ct:?}: {st}");
        assert_eq!(st["reason"], "UnsupportedMediaType");
        assert!(
            st["message"].as_str().unwrap().contains("application/json"),
            "{st}"
        );
    }
    assert!(
        !pod_names(&k).await.iter().any(|n| n == "pwn"),
        "a refused request created the pod"
    );

    // The same body from a legitimate client is valid: the refusals above were the guard's.
    for host in [
        own_host.clone(),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (code, st) = raw(
            &k,
            "POST",
            PODS,
            &[("Host", &host), ("Content-Type", "application/json")],
            &body.replace("\"pwn\"", "\"control\""),
        );
        assert_eq!(code, 201, "{host}: {st}");
        let (code, st) = k
            .send(
                Method::DELETE,
                &format!("{PODS}/control?gracePeriodSeconds=0"),
                None,
            )
            .await;
        assert_eq!(code, 200, "{st}");
        k.wait_gone("control", 30).await;
    }
    // Same-origin requests (Origin equal to the Host the server answers to) are fine.
    let (code, _) = raw(
        &k,
        "GET",
        "/healthz",
        &[
            ("Host", &own_host),
            ("Origin", &format!("http://{own_host}")),
        ],
        "",
    );
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn non_loopback_names_are_opt_in() {
    let k = Kapsel::start_with(&["--allowed-host", "kapsel.internal"]);
    let port = addr(&k).rsplit(':').next().unwrap().to_string();
    let (code, _) = raw(
        &k,
        "GET",
        "/healthz",
        &[("Host", &format!("kapsel.internal:{port}"))],
        "",
    );
    assert_eq!(code, 200);
    let (code, _) = raw(
        &k,
        "GET",
        "/healthz",
        &[("Host", &format!("other.internal:{port}"))],
        "",
    );
    assert_eq!(code, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_still_works_through_the_guard() {
    let k = Kapsel::start();
    k.apply(
        "cli-pod",
        &pod_yaml("cli-pod", &fixture("sleep.wat"), &[], "Always", ""),
    );
    let out = k.cli(&["get", "pods"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("cli-pod"));
    let out = k.cli(&["get", "pod", "cli-pod", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    // Apply again: the update path (GET + PUT) too.
    let yaml = pod_yaml("cli-pod", &fixture("sleep.wat"), &[], "Always", "")
        .replace("name: cli-pod\n", "name: cli-pod\n  labels: {tier: web}\n");
    k.apply("cli-pod", &yaml);
    let p = k.pod("cli-pod").await.unwrap();
    assert_eq!(p["metadata"]["labels"]["tier"], "web");
    let out = k.cli(&["delete", "pod", "cli-pod"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(k.pod("cli-pod").await.is_none());
}

/// Open `n` connections that each send half a request head and stall.
async fn half_sent(k: &Kapsel, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr(k)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        conns.push(s);
    }
    conns
}

/// Wait until the server closes the connection (EOF or reset); false at the deadline.
async fn closed_by_server(mut s: tokio::net::TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a 408 answer before the close is fine
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn healthz(k: &Kapsel, timeout: Duration) -> Result<String, String> {
    let r = reqwest::Client::new()
        .get(format!("{}/healthz", k.url))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    r.text().await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn half_sent_requests_are_cut_off_and_healthz_keeps_answering() {
    let k = Kapsel::start_with(&["--header-read-timeout", "2s"]);
    let start = Instant::now();
    let conns = half_sent(&k, 300).await;
    // While 300 half-sent requests are held, the API answers.
    assert_eq!(
        healthz(&k, Duration::from_secs(2)).await.as_deref(),
        Ok("ok")
    );
    let deadline = start + Duration::from_secs(12);
    let results =
        futures::future::join_all(conns.into_iter().map(|c| closed_by_server(c, deadline))).await;
    let open = results.iter().filter(|closed| !**closed).count();
    assert_eq!(
        open, 0,
        "{open} of 300 half-sent requests still open after 12s (header-read timeout 2s)"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "closed before the timeout: {:?}",
        start.elapsed()
    );
    assert_eq!(
        healthz(&k, Duration::from_secs(2)).await.as_deref(),
        Ok("ok")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_wait_without_spending_descriptors() {
    let k = Kapsel::start_with(&["--max-connections", "16", "--header-read-timeout", "3s"]);
    assert_eq!(
        healthz(&k, Duration::from_secs(5)).await.as_deref(),
        Ok("ok")
    );
    let pid = k.pid();
    // Let the probe's connection close so the baseline holds no API connection.
    let base_deadline = Instant::now() + Duration::from_secs(10);
    let mut baseline = open_fds(pid);
    while Instant::now() < base_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = open_fds(pid);
        if now == baseline {
            break;
        }
        baseline = now;
    }

    // The cap is full: a new client waits until a slot frees (the held ones are cut off by
    // the header-read timeout), then is served.
    let held = half_sent(&k, 16).await;
    let t = Instant::now();
    let r = healthz(&k, Duration::from_secs(20)).await;
    let waited = t.elapsed();
    assert_eq!(r.as_deref(), Ok("ok"), "healthz after {waited:?}");
    assert!(
        waited >= Duration::from_millis(1500),
        "answered in {waited:?} while 16 of 16 slots were held: the cap is not applied"
    );
    drop(held);

    // A flood: 400 connections, 16 served, the rest wait in the listen backlog, costing the
    // server no descriptor.
    let flood = half_sent(&k, 400).await;
    let watch_until = Instant::now() + Duration::from_secs(1);
    let mut peak = 0;
    while Instant::now() < watch_until {
        peak = peak.max(open_fds(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        // 16 connections plus slack for the node's own files and sockets.
        peak <= baseline + 16 + 48,
        "the server holds {} descriptors more than at rest with 400 connections open (cap 16)",
        peak.saturating_sub(baseline)
    );
    // Once the flood is gone, the API answers at once.
    drop(flood);
    assert_eq!(
        healthz(&k, Duration::from_secs(10)).await.as_deref(),
        Ok("ok")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watches_outlive_the_header_timeout_and_shutdown_drains() {
    let mut k = Kapsel::start_with(&["--header-read-timeout", "1s"]);
    let resp = k
        .http
        .get(format!("{}{PODS}?watch=true", k.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let idle = half_sent(&k, 50).await;
    // The watch stays idle for three header-read timeouts: only request heads are timed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, st) = k
        .send(
            Method::POST,
            PODS,
            Some(
                &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w"},
                         "spec": {"restartPolicy": "Never",
                                  "containers": [{"name": "main", "image": fixture("quick.wat")}]}})
                .to_string(),
            ),
        )
        .await;
    assert_eq!(code, 201, "{st}");
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    use futures::StreamExt;
    while !seen.contains("\"ADDED\"") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("watch ended or stalled after the header timeout: {other:?}"),
        }
    }
    drop(idle);

    // Shutdown with a watch and held connections open: the server drains and exits.
    let _more = half_sent(&k, 20).await;
    let mut child = k.child.take().unwrap();
    // SAFETY: kill(2) takes plain integers; the pid is our own child, not yet reaped (so not reused).
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "kapsel serve did not exit within 20s of SIGTERM with connections open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    assert!(end.is_ok(), "the watch stream did not end on shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_delete_never_conflicts_with_status_updates() {
    let k = Kapsel::start();
    let mut failures = Vec::new();
    for round in 0..25 {
        let name = format!("churn-{round}");
        k.apply(
            &name,
            &pod_yaml(&name, &fixture("sleep.wat"), &[], "Always", ""),
        );
        // Right after the apply the scheduler binds the pod and the node writes its status.
        let out = k.cli(&["delete", "pod", &name]);
        if !out.status.success() {
            failures.push(format!(
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 25 deletes failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_explicit_stale_precondition_still_conflicts() {
    let k = Kapsel::start();
    let (code, st) = k
        .send(
            Method::POST,
            PODS,
            Some(
                &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pre"},
                         "spec": {"restartPolicy": "Never",
                                  "containers": [{"name": "main", "image": fixture("quick.wat")}]}})
                .to_string(),
            ),
        )
        .await;
    assert_eq!(code, 201, "{st}");
    // Finished: nothing writes it any more.
    let p = k.wait_pod("pre", 30, |p| phase(p) == "Succeeded").await;
    let stale = p["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut relabelled = p.clone();
    relabelled["metadata"]["labels"] = json!({"touched": "yes"});
    let (code, cur) = k
        .send(
            Method::PUT,
            &format!("{PODS}/pre"),
            Some(&relabelled.to_string()),
        )
        .await;
    assert_eq!(code, 200, "{cur}");
    let fresh = cur["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    let (code, st) = k
        .send(
            Method::DELETE,
            &format!("{PODS}/pre?resourceVersion={stale}"),
            None,
        )
        .await;
    assert_eq!(code, 409, "{st}");
    assert_eq!(st["reason"], "Conflict");
    let opts = |rv: &str| {
        json!({"kind": "DeleteOptions", "apiVersion": "v1",
               "preconditions": {"resourceVersion": rv}})
        .to_string()
    };
    let (code, st) = k
        .send(Method::DELETE, &format!("{PODS}/pre"), Some(&opts(&stale)))
        .await;
    assert_eq!(code, 409, "{st}");
    // A DeleteOptions body must be JSON like any other.
    let (code, st) = raw(
        &k,
        "DELETE",
        &format!("{PODS}/pre"),
        &[("Host", &addr(&k)), ("Content-Type", "text/plain")],
        &opts(&fresh),
    );
    assert_eq!(code, 415, "{st}");
    assert!(k.pod("pre").await.is_some());
    let (code, st) = k
        .send(Method::DELETE, &format!("{PODS}/pre"), Some(&opts(&fresh)))
        .await;
    assert_eq!(code, 200, "{st}");
    k.wait_gone("pre", 10).await;

    // Deployments: a stale precondition conflicts, a plain delete does not.
    let deploy = |name: &str| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
               "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                        "template": {"metadata": {"labels": {"app": name}},
                                     "spec": {"containers": [{"name": "main", "image": fixture("sleep.wat")}]}}}})
        .to_string()
    };
    let d = "/apis/apps/v1/namespaces/default/deployments";
    let (code, created) = k.send(Method::POST, d, Some(&deploy("dep"))).await;
    assert_eq!(code, 201, "{created}");
    let (code, st) = k
        .send(Method::DELETE, &format!("{d}/dep?resourceVersion=1"), None)
        .await;
    assert_eq!(code, 409, "{st}");
    let (code, st) = k.send(Method::DELETE, &format!("{d}/dep"), None).await;
    assert_eq!(code, 200, "{st}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deeply_nested_manifests_fail_fast() {
    let k = Kapsel::start();
    let cases = [
        (
            "flow.yaml",
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n",
                "[".repeat(100_000)
            ),
            "flow.yaml:4: nesting deeper than 128",
        ),
        (
            "block.yaml",
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\nspec:\n  containers:\n  {}x\n",
                "- ".repeat(100_000)
            ),
            "block.yaml:7: nesting deeper than 128",
        ),
        (
            "mappings.yaml",
            {
                let mut s = String::from("apiVersion: v1\nkind: Pod\nmetadata:\n");
                for i in 1..400 {
                    s.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
                }
                s
            },
            "mappings.yaml:131: nesting deeper than 128",
        ),
        (
            "deep.json",
            format!("{{\"kind\": \"Pod\", \"spec\": {}", "[".repeat(100_000)),
            "recursion limit exceeded",
        ),
    ];
    for (file, text, want) in cases {
        let path = k.data.join(file);
        std::fs::write(&path, &text).unwrap();
        let t = Instant::now();
        let out = k.cli(&["apply", "-f", path.to_str().unwrap()]);
        let took = t.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file}: applied?");
        assert!(err.contains(want), "{file}: {err}");
        assert!(took < Duration::from_secs(2), "{file}: took {took:?}");
        std::fs::remove_file(&path).unwrap();
    }

    // Over HTTP: the API decodes JSON only (YAML is 415), and serde_json stops at 128 levels —
    // in typed bodies and in the one untyped one (`/scale`).
    let nested = "[".repeat(100_000);
    let deep_pod = format!(
        "{{\"apiVersion\": \"v1\", \"kind\": \"Pod\", \"metadata\": {{\"name\": \"d\"}}, \"spec\": {nested}"
    );
    let deep_scale = format!("{{\"spec\": {{\"replicas\": {nested}");
    for (method, path, body) in [
        (Method::POST, PODS.to_string(), &deep_pod),
        (Method::POST, PODS.to_string(), &nested),
        (
            Method::PUT,
            "/apis/apps/v1/namespaces/default/deployments/x/scale".to_string(),
            &deep_scale,
        ),
    ] {
        let t = Instant::now();
        let (code, st) = k.send(method, &path, Some(body)).await;
        assert_eq!(code, 400, "{path}: {st}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{path}: {:?}",
            t.elapsed()
        );
    }
    let (_, st) = k
        .send(
            Method::PUT,
            "/apis/apps/v1/namespaces/default/deployments/x/scale",
            Some(&deep_scale),
        )
        .await;
    assert!(
        st["message"].as_str().unwrap().contains("recursion limit"),
        "{st}"
    );
    let (code, st) = raw(
        &k,
        "POST",
        PODS,
        &[("Host", &addr(&k)), ("Content-Type", "application/yaml")],
        "apiVersion: v1\nkind: Pod\n",
    );
    assert_eq!(code, 415, "{st}");
    assert_eq!(
        healthz(&k, Duration::from_secs(2)).await.as_deref(),
        Ok("ok")
    );
}
