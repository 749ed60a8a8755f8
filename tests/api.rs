//! The HTTP API as clients see it: status codes and `Status` bodies, uid/resourceVersion,
//! stale writes, label selectors, graceful delete, and watch streams.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

fn pod_json(name: &str, image: &str) -> String {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
           "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": image}]}})
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_codes_and_status_objects() {
    let k = Kapsel::start();
    let quick = fixture("quick.wat");
    let base = "/api/v1/namespaces/default/pods";
    let (code, created) = k
        .send(Method::POST, base, Some(&pod_json("a", &quick)))
        .await;
    assert_eq!(code, 201, "{created}");
    assert!(created["metadata"]["uid"].as_str().unwrap().len() >= 32);
    assert!(created["metadata"]["resourceVersion"].as_str().is_some());
    assert!(created["metadata"]["creationTimestamp"].as_str().is_some());
    // Exists → 409 AlreadyExists.
    let (code, st) = k
        .send(Method::POST, base, Some(&pod_json("a", &quick)))
        .await;
    assert_eq!(code, 409);
    assert_eq!(st["kind"], "Status");
    assert_eq!(st["reason"], "AlreadyExists");
    assert_eq!(st["code"], 409);
    // Malformed JSON → 400; unknown field → 400 naming it.
    let (code, st) = k.send(Method::POST, base, Some("{not json")).await;
    assert_eq!(code, 400, "{st}");
    let (code, st) = k
        .send(
            Method::POST,
            base,
            Some(r#"{"metadata":{"name":"b"},"spec":{"containers":[],"colour":"red"}}"#),
        )
        .await;
    assert_eq!(code, 400);
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`"),
        "{st}"
    );
    // Invalid → 422 with the field.
    let (code, st) = k.send(Method::POST, base, Some(&pod_json("c", ""))).await;
    assert_eq!(code, 422);
    assert_eq!(st["reason"], "Invalid");
    assert_eq!(
        st["details"]["causes"][0]["field"],
        "spec.containers[0].image"
    );
    // Missing → 404.
    let (code, st) = k.get(&format!("{base}/nope")).await;
    assert_eq!(code, 404);
    assert_eq!(st["reason"], "NotFound");
    let (code, _) = k.get("/api/v1/nonsense").await;
    assert_eq!(code, 404);
    // Namespace mismatch → 400.
    let other = json!({"metadata": {"name": "x", "namespace": "other"}, "spec": {"containers": [{"name": "m", "image": quick}]}});
    let (code, _) = k.send(Method::POST, base, Some(&other.to_string())).await;
    assert_eq!(code, 400);
    // healthz, metrics.
    let (code, _) = k.get("/healthz").await;
    assert_eq!(code, 200);
    let (_, m) = k.get("/metrics").await;
    assert!(m.as_str().unwrap().contains("kapsel_pods{phase="));
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_writes_are_rejected_and_spec_is_immutable() {
    let k = Kapsel::start();
    let base = "/api/v1/namespaces/default/pods";
    let (_, created) = k
        .send(
            Method::POST,
            base,
            Some(&pod_json("p", &fixture("sleep.wat"))),
        )
        .await;
    k.wait_pod("p", 10, |p| !state(p, 0)["running"].is_null())
        .await;
    // The node has written status since: the creation's resourceVersion is stale.
    let mut stale = created.clone();
    stale["metadata"]["labels"]["tier"] = json!("x");
    let (code, st) = k
        .send(Method::PUT, &format!("{base}/p"), Some(&stale.to_string()))
        .await;
    assert_eq!(code, 409, "{st}");
    assert_eq!(st["reason"], "Conflict");
    // Fresh read → accepted.
    let mut cur = k.pod("p").await.unwrap();
    cur["metadata"]["labels"]["tier"] = json!("x");
    let (code, updated) = k
        .send(Method::PUT, &format!("{base}/p"), Some(&cur.to_string()))
        .await;
    assert_eq!(code, 200, "{updated}");
    assert_eq!(updated["metadata"]["labels"]["tier"], "x");
    // Label selector.
    let (_, l) = k.get(&format!("{base}?labelSelector=tier%3Dx")).await;
    assert_eq!(l["items"].as_array().unwrap().len(), 1);
    let (_, l) = k.get(&format!("{base}?labelSelector=tier%3Dy")).await;
    assert_eq!(l["items"].as_array().unwrap().len(), 0);
    // Changing the spec is refused.
    let mut cur = k.pod("p").await.unwrap();
    cur["spec"]["containers"][0]["image"] = json!("/other.wasm");
    let (code, st) = k
        .send(Method::PUT, &format!("{base}/p"), Some(&cur.to_string()))
        .await;
    assert_eq!(code, 422, "{st}");
    // Graceful delete: the first answer carries deletionTimestamp; the pod then goes away.
    let (code, d) = k.send(Method::DELETE, &format!("{base}/p"), None).await;
    assert_eq!(code, 200);
    assert!(d["metadata"]["deletionTimestamp"].is_string(), "{d}");
    k.wait_gone("p", 5).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_added_modified_deleted() {
    let k = Kapsel::start();
    let base = "/api/v1/namespaces/default/pods";
    let (_, list) = k.get(base).await;
    assert_eq!(list["kind"], "PodList");
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut resp = k
        .http
        .get(format!("{}{base}?watch=true&resourceVersion={rv}", k.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (code, _) = k
        .send(
            Method::POST,
            base,
            Some(&pod_json("w", &fixture("quick.wat"))),
        )
        .await;
    assert_eq!(code, 201);
    let mut buf = String::new();
    let mut events: Vec<Value> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if events
            .iter()
            .any(|e| e["object"]["status"]["phase"] == "Succeeded")
        {
            break;
        }
        let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await
        else {
            break;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find('\n') {
            let line: String = buf.drain(..=i).collect();
            events.push(serde_json::from_str(&line).unwrap());
        }
    }
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "w");
    assert!(events
        .iter()
        .any(|e| e["type"] == "MODIFIED" && e["object"]["spec"]["nodeName"] == k.node.as_str()));
    assert!(events
        .iter()
        .any(|e| e["object"]["status"]["phase"] == "Succeeded"));
    // resourceVersions increase along the stream.
    let rvs: Vec<u64> = events
        .iter()
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");
    let (code, _) = k.send(Method::DELETE, &format!("{base}/w"), None).await;
    assert_eq!(code, 200);
    let mut deleted = false;
    while !deleted {
        let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await
        else {
            break;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        deleted = buf.contains("\"DELETED\"");
    }
    assert!(deleted);
    // Nodes: the embedded node registered itself with capacity and runtimes.
    let (_, n) = k.get(&format!("/api/v1/nodes/{}", k.node)).await;
    assert_eq!(n["status"]["nodeInfo"]["runtimes"][0], "wasm");
    assert!(n["status"]["capacity"]["cpu"].is_string());
    let out = k.cli(&["get", "nodes"]);
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(t.contains(&k.node) && t.contains("Ready"), "{t}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_errors_are_one_line_and_nonzero() {
    let k = Kapsel::start();
    let out = k.cli(&["get", "pod", "missing"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("not found"));
    let out = k.cli(&["apply", "-f", "/does/not/exist.yaml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/does/not/exist.yaml"));
    let out = std::process::Command::new(bin())
        .args(["--server", "http://127.0.0.1:1", "get", "pods"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
    // apply twice: second time unchanged.
    let path = k.data.join("q.yaml");
    std::fs::write(
        &path,
        pod_yaml("q", &fixture("quick.wat"), &[], "Never", ""),
    )
    .unwrap();
    let first = k.cli(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim(),
        "pod/q created"
    );
    let again = k.cli(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        "pod/q unchanged"
    );
    let yaml = k.cli(&["get", "pods", "-o", "yaml"]);
    assert!(String::from_utf8_lossy(&yaml.stdout).contains("kind: PodList"));
}
