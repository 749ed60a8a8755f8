//! Modules reach the nodes: `kapsel serve --cluster-listen` and a real `kapsel agent` process
//! with its own data directory. `kapsel apply` uploads a pod's local module to the server's
//! content-addressed store and records its digest; the module file is deleted right after, and
//! the pod still runs on the agent, which fetched the module by digest (Pulling / Pulled
//! events, the copy in its own cache). Refused: an upload whose bytes do not match its digest
//! (400), a node uploading a module (403). A pod naming a digest the server does not have
//! waits with `ErrModulePull`. A Deployment's template carries the digest, so a changed module
//! is a new ReplicaSet.

mod common;

use common::*;
use serde_json::Value;
use sha2::Digest as _;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn put_module(url: &str, digest: &str, body: Vec<u8>) -> (u16, Value) {
    let r = reqwest::Client::new()
        .put(format!("{url}/v1-kapsel/modules/{digest}"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_applied_module_runs_on_another_node_after_the_file_is_gone() {
    let (k, cluster_url, token) = cluster_server();
    let node = node_name("far");
    let agent = AgentProc::start_with(&cluster_url, &node, "127.0.0.2", &["--token", &token]);
    wait_node_ready(&k, &node, &agent).await;

    // The module exists only in this directory, next to the manifest naming it relatively.
    let dir = tempfile::tempdir().unwrap();
    let module = std::fs::read(fixture("quick.wat")).unwrap();
    std::fs::write(dir.path().join("app.wat"), &module).unwrap();
    let manifest = dir.path().join("pod.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: travels\nspec:\n  nodeSelector:\n    kubernetes.io/hostname: {node}\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: app.wat\n"
        ),
    )
    .unwrap();
    let out = k.cli(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    drop(dir);

    let digest = sha256(&module);
    let p = k
        .wait_pod("travels", 30, |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
    assert_eq!(phase(&p), "Succeeded", "{p}");
    assert_eq!(p["spec"]["nodeName"], node.as_str());
    assert_eq!(state(&p, 0)["terminated"]["exitCode"], 0, "{p}");
    assert_eq!(
        p["metadata"]["annotations"]["modules.kapsel.io/main"],
        digest.as_str()
    );
    // The image stays what the user wrote (resolved), for get and describe.
    assert!(
        p["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .ends_with("/app.wat"),
        "{p}"
    );
    let reasons: Vec<String> = k
        .events_for("travels")
        .await
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .collect();
    for want in ["Pulling", "Pulled"] {
        assert!(reasons.iter().any(|r| r == want), "{want} in {reasons:?}");
    }
    let cached = agent
        .data
        .path()
        .join("cache/wasm/modules/sha256")
        .join(digest.trim_start_matches("sha256:"));
    assert_eq!(std::fs::read(&cached).unwrap(), module);
    assert_eq!(
        std::fs::read(
            k.data
                .join("modules/sha256")
                .join(digest.trim_start_matches("sha256:"))
        )
        .unwrap(),
        module
    );

    // `module list` shows it; `module push` of the same bytes prints the same digest.
    let out = k.cli(&["module", "list"]);
    assert!(
        out.status.success() && text(&out).contains(&digest),
        "{}",
        text(&out)
    );
    let again = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(again.path(), &module).unwrap();
    let out = k.cli(&["module", "push", again.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);

    // Bytes that do not match the digest: 400 naming both, and nothing stored.
    let wrong = sha256(b"something else");
    let (code, v) = put_module(&k.url, &wrong, module.clone()).await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["kind"], "Status");
    assert!(v["message"].as_str().unwrap().contains(&wrong), "{v}");
    let (code, _) = k.get(&format!("/v1-kapsel/modules/{wrong}")).await;
    assert_eq!(code, 404);
    let (code, v) = put_module(&k.url, "sha256:nothex", module.clone()).await;
    assert_eq!(code, 400, "{v}");

    // The node may read a module by digest but not upload or list.
    let http = node_http(agent.data.path());
    let url = format!("{cluster_url}/v1-kapsel/modules/{digest}");
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), module);
    let r = http
        .put(&url)
        .header("content-type", "application/octet-stream")
        .body(module.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&format!("system:node:{node}")),
        "{v}"
    );
    let r = http
        .get(format!("{cluster_url}/v1-kapsel/modules"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // A digest the server does not have: the container waits with ErrModulePull.
    let missing = sha256(uuid::Uuid::new_v4().to_string().as_bytes());
    k.apply(
        "missing",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: missing\n  annotations:\n    modules.kapsel.io/main: {missing}\nspec:\n  nodeSelector:\n    kubernetes.io/hostname: {node}\n  containers:\n  - name: main\n    image: /nonexistent/kapsel/app.wasm\n"
        ),
    );
    let p = k
        .wait_pod("missing", 30, |p| {
            state(p, 0)["waiting"]["reason"] == "ErrModulePull"
        })
        .await;
    let msg = state(&p, 0)["waiting"]["message"].as_str().unwrap();
    assert!(msg.contains(&missing) && msg.contains("not found"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_module_is_a_new_deployment_revision() {
    let k = Kapsel::start();
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("worker.wat");
    std::fs::copy(fixture("sleep.wat"), &module).unwrap();
    let manifest = dir.path().join("deploy.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: w\nspec:\n  replicas: 1\n  selector:\n    matchLabels:\n      app: w\n  template:\n    metadata:\n      labels:\n        app: w\n    spec:\n      containers:\n      - name: main\n        image: worker.wat\n",
    )
    .unwrap();
    let apply = || {
        let out = k.cli(&["apply", "-f", manifest.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
    };
    apply();
    let first = sha256(&std::fs::read(&module).unwrap());
    let (_, d) = k
        .get("/apis/apps/v1/namespaces/default/deployments/w")
        .await;
    assert_eq!(
        d["spec"]["template"]["metadata"]["annotations"]["modules.kapsel.io/main"],
        first.as_str(),
        "{d}"
    );
    // The same module again: unchanged, still one ReplicaSet.
    let out = k.cli(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(text(&out).contains("unchanged"), "{}", text(&out));

    let mut changed = std::fs::read_to_string(&module).unwrap();
    changed.push_str("\n;; a new build\n");
    std::fs::write(&module, &changed).unwrap();
    apply();
    let second = sha256(changed.as_bytes());
    assert_ne!(first, second);
    wait_for("a second ReplicaSet for the new module", 30, || async {
        let (_, v) = k.get("/apis/apps/v1/namespaces/default/replicasets").await;
        let digests: Vec<String> = v["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|rs| {
                rs["spec"]["template"]["metadata"]["annotations"]["modules.kapsel.io/main"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        if digests.contains(&first) && digests.contains(&second) {
            Ok(())
        } else {
            Err(format!("{digests:?}"))
        }
    })
    .await;
    // The new pod runs the new module (from the path: it has that digest).
    wait_for("a running pod of the new revision", 30, || async {
        let (_, v) = k
            .get("/api/v1/namespaces/default/pods?labelSelector=app%3Dw")
            .await;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        if items.iter().any(|p| {
            p["metadata"]["annotations"]["modules.kapsel.io/main"] == second.as_str()
                && phase(p) == "Running"
        }) {
            Ok(())
        } else {
            Err(format!("{v}"))
        }
    })
    .await;
}
