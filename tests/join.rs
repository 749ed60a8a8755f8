//! Joining securely: `kapsel serve --cluster-listen` with its CA and default join token, and
//! `kapsel agent --server https://… --token K10…` processes. An agent joins over TLS and runs a
//! pod bound to it; its certificate carries it across restarts without the token. Refused and
//! changing nothing: a wrong token (401, no Node), a token with a forged CA hash (the agent
//! stops before sending it: the server sees no join attempt), a second holder of the token
//! claiming a joined node's name (403), and the node's certificate used to read or write
//! another node's pod (403, the pod unchanged) or without a certificate at all (401).

mod common;

use common::*;
use serde_json::Value;

async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = http.request(method, url);
    if let Some(b) = body {
        req = req.json(b);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_joins_over_tls_runs_its_pods_and_is_held_to_them() {
    let (k, url, token) = cluster_server();
    // The CA key and the token are the server's alone.
    use std::os::unix::fs::PermissionsExt;
    for f in ["pki/ca.key", "token"] {
        let mode = std::fs::metadata(k.data.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    let node = node_name("edge");
    let agent = AgentProc::start_with(&url, &node, "127.0.0.2", &["--token", &token]);
    wait_node_ready(&k, &node, &agent).await;
    assert_eq!(
        k.metric("kapsel_join_requests_total{result=\"accepted\"}")
            .await,
        1.0
    );

    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: remote\nspec:\n  nodeName: {node}\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {}\n",
        fixture("quick.wat")
    );
    k.apply("remote", &yaml);
    let p = k.wait_pod("remote", 20, |p| phase(p) == "Succeeded").await;
    assert_eq!(p["status"]["hostIP"], "127.0.0.2", "{p}");

    // A pod of another node (the server's own): the node's certificate can neither read it
    // nor write its status, and the pod is unchanged.
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: theirs\nspec:\n  nodeName: {}\n  containers:\n  - name: main\n    image: {}\n",
        k.node,
        fixture("sleep.wat")
    );
    k.apply("theirs", &yaml);
    let before = k.wait_pod("theirs", 20, |p| phase(p) == "Running").await;
    let http = node_http(agent.data.path());
    let pod_url = format!("{url}/api/v1/namespaces/default/pods/theirs");
    let (code, v) = send(&http, reqwest::Method::GET, pod_url.clone(), None).await;
    assert_eq!(code, 403, "{v}");
    assert_eq!(v["kind"], "Status");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&format!("system:node:{node}")),
        "{v}"
    );
    let mut forged = before.clone();
    forged["status"]["phase"] = "Failed".into();
    let (code, v) = send(
        &http,
        reqwest::Method::PUT,
        format!("{pod_url}/status"),
        Some(&forged),
    )
    .await;
    assert_eq!(code, 403, "{v}");
    let (code, v) = send(&http, reqwest::Method::DELETE, pod_url.clone(), None).await;
    assert_eq!(code, 403, "{v}");
    let after = k.pod("theirs").await.unwrap();
    assert_eq!(
        after["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
    assert_eq!(phase(&after), "Running");
    // Its own pod it may read; listing needs the field selector naming itself.
    let own = format!("{url}/api/v1/namespaces/default/pods/remote");
    assert_eq!(send(&http, reqwest::Method::GET, own, None).await.0, 200);
    let (code, _) = send(
        &http,
        reqwest::Method::GET,
        format!("{url}/api/v1/pods"),
        None,
    )
    .await;
    assert_eq!(code, 403);
    let sel = format!("{url}/api/v1/pods?fieldSelector=spec.nodeName%3D{node}");
    let (code, list) = send(&http, reqwest::Method::GET, sel, None).await;
    assert_eq!(code, 200);
    assert!(list["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["spec"]["nodeName"] == node.as_str()));
    // Other nodes and other kinds are out of reach; no certificate at all is 401.
    let other = format!("{url}/api/v1/nodes/{}", k.node);
    assert_eq!(send(&http, reqwest::Method::GET, other, None).await.0, 403);
    let deps = format!("{url}/apis/apps/v1/namespaces/default/deployments");
    assert_eq!(send(&http, reqwest::Method::GET, deps, None).await.0, 403);
    let anon = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let (code, v) = send(&anon, reqwest::Method::GET, pod_url, None).await;
    assert_eq!(code, 401, "{v}");
    assert_eq!(v["reason"], "Unauthorized");

    // A restart without the token: the node's certificate is enough.
    let data = agent.stop();
    let agent = AgentProc::start_in(data, &url, &node, "127.0.0.2", &[]);
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: again\nspec:\n  nodeName: {node}\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {}\n",
        fixture("quick.wat")
    );
    k.apply("again", &yaml);
    k.wait_pod("again", 20, |p| phase(p) == "Succeeded").await;
    assert_eq!(
        k.metric("kapsel_join_requests_total{result=\"accepted\"}")
            .await,
        1.0,
        "the restart did not join again"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_tokens_forged_ca_hashes_and_taken_names_are_refused() {
    let (k, url, token) = cluster_server();
    let (hash, creds) = token.split_once("::").unwrap();
    let (id, _) = creds.split_once('.').unwrap();

    // A wrong secret: 401, the agent exits non-zero saying so, and no Node appears.
    let node = node_name("wrong");
    let bad = format!("{hash}::{id}.0000000000000000");
    let mut agent = AgentProc::start_with(&url, &node, "127.0.0.3", &["--token", &bad]);
    let (status, err) = agent.wait_exit(20);
    assert!(!status.success());
    assert!(err.contains("refused the token (401)"), "{err}");
    assert_eq!(k.get(&format!("/api/v1/nodes/{node}")).await.0, 404);
    assert_eq!(
        k.metric("kapsel_join_requests_total{result=\"unauthorized\"}")
            .await,
        1.0
    );

    // A forged CA hash: the agent refuses before sending anything to the join endpoint.
    let forged = format!("K10{}::{creds}", "f".repeat(64));
    let mut agent = AgentProc::start_with(&url, &node, "127.0.0.3", &["--token", &forged]);
    let (status, err) = agent.wait_exit(20);
    assert!(!status.success());
    assert!(
        err.contains("refusing to join") && err.contains("the token was not sent"),
        "{err}"
    );
    assert_eq!(
        k.metric("kapsel_join_requests_total{result=\"unauthorized\"}")
            .await,
        1.0,
        "the server saw a join attempt"
    );
    assert_eq!(
        k.metric("kapsel_join_requests_total{result=\"accepted\"}")
            .await,
        0.0
    );
    assert_eq!(k.get(&format!("/api/v1/nodes/{node}")).await.0, 404);

    // A joined node's name, claimed by another holder of the same token: 403.
    let node = node_name("held");
    let first = AgentProc::start_with(&url, &node, "127.0.0.4", &["--token", &token]);
    wait_node_ready(&k, &node, &first).await;
    let mut second = AgentProc::start_with(&url, &node, "127.0.0.5", &["--token", &token]);
    let (status, err) = second.wait_exit(20);
    assert!(!status.success());
    assert!(err.contains("refused the join (403)"), "{err}");
    assert_eq!(
        k.metric("kapsel_join_requests_total{result=\"forbidden\"}")
            .await,
        1.0
    );
    let (_, n) = k.get(&format!("/api/v1/nodes/{node}")).await;
    assert_eq!(n["status"]["addresses"][0]["address"], "127.0.0.4");
    // The server's own node name cannot be joined either.
    let mut own = AgentProc::start_with(&url, &k.node, "127.0.0.6", &["--token", &token]);
    let (status, err) = own.wait_exit(20);
    assert!(!status.success() && err.contains("403"), "{err}");

    // Tokens made with the CLI join; deleted ones do not.
    let out = k.cli(&["token", "create", "--ttl", "1h", "--description", "test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(made.starts_with(hash), "{made}");
    let list = String::from_utf8(k.cli(&["token", "list"]).stdout).unwrap();
    let made_id = &made[hash.len() + 2..hash.len() + 8];
    assert!(list.contains(made_id) && list.contains("test"), "{list}");
    assert!(
        !list.contains(&made[hash.len() + 9..]),
        "secrets are not listed"
    );
    let out = k.cli(&["token", "delete", made_id]);
    assert!(out.status.success());
    let mut gone =
        AgentProc::start_with(&url, &node_name("late"), "127.0.0.7", &["--token", &made]);
    let (status, err) = gone.wait_exit(20);
    assert!(!status.success() && err.contains("401"), "{err}");
}
