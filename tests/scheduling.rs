//! Scheduling across nodes with real processes: `kapsel serve --cluster-listen` (its own node
//! tainted with `--node-taint`, so it takes no pods) and three `kapsel agent --no-docker`
//! processes joined over TLS with the token, labelled with `--node-label`. Required node
//! affinity lands pods only on matching nodes; a topology spread constraint of maxSkew 1 over
//! the three hosts puts 6 replicas 2-2-2; required pod anti-affinity puts one replica per host
//! and leaves the extra one Pending; an unsatisfiable affinity leaves a pod Pending with a
//! FailedScheduling event saying why; an OCI pod is never bound to a WASM-only node. And
//! NodeRestriction with a real agent's certificate: the node may relabel itself, but not
//! change its taints, cordon itself, set restricted labels, or touch another node (403, the
//! Node unchanged).

mod common;

use std::collections::BTreeMap;

use serde_json::Value;

use common::*;

fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_string()
}

/// The live pods labelled `app=<app>`: name → node ("" while unbound).
async fn placement(k: &Kapsel, app: &str) -> BTreeMap<String, String> {
    live_pods(k, app)
        .await
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

fn count_by_node(p: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in p.values() {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

/// Poll until `app` has `total` live pods of which `bound` are bound to a node; their
/// placement.
async fn wait_placed(
    k: &Kapsel,
    app: &str,
    total: usize,
    bound: usize,
) -> BTreeMap<String, String> {
    wait_for(
        &format!("{bound} of {total} {app} pods bound"),
        30,
        || async {
            let p = placement(k, app).await;
            let b = p.values().filter(|n| !n.is_empty()).count();
            (p.len() == total && b == bound)
                .then(|| p.clone())
                .ok_or_else(|| format!("{p:?}"))
        },
    )
    .await
}

/// A Deployment of `replicas` WASM pods with `extra` (indented YAML) in the pod spec.
fn deployment(name: &str, replicas: u32, extra: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      terminationGracePeriodSeconds: 1\n{extra}      containers:\n      - name: main\n        image: {}\n",
        fixture("sleep.wat")
    )
}

async fn put(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = http.put(url).json(body).send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// The `FailedScheduling` message of a pod, once there is one.
async fn failed_scheduling(k: &Kapsel, pod: &str) -> String {
    wait_for(&format!("FailedScheduling for {pod}"), 20, || async {
        k.events_for(pod)
            .await
            .iter()
            .find(|e| e["reason"] == "FailedScheduling")
            .and_then(|e| e["message"].as_str().map(str::to_string))
            .ok_or_else(|| "no event yet".to_string())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn affinity_spread_anti_affinity_runtimes_and_node_restriction_over_three_agents() {
    let k = Kapsel::start_with(&[
        "--cluster-listen",
        "127.0.0.1:0",
        "--node-taint",
        "kapsel.io/control-plane:NoSchedule",
    ]);
    let url = k.cluster_url();
    let token = k.token();
    let t = tag();
    let names = [format!("e1-{t}"), format!("e2-{t}"), format!("e3-{t}")];
    let zones = ["a", "b", "b"];
    let agents: Vec<AgentProc> = names
        .iter()
        .zip(zones)
        .enumerate()
        .map(|(i, (n, z))| {
            let zone = format!("topology.kubernetes.io/zone={z}");
            let mut extra = vec!["--token", &token, "--node-label", &zone];
            extra.extend(["--node-label", "pool=edge"]);
            if i == 2 {
                extra.extend(["--node-taint", "dedicated=batch:PreferNoSchedule"]);
            }
            AgentProc::start_with(&url, n, &format!("127.0.0.{}", i + 2), &extra)
        })
        .collect();
    for (a, z) in agents.iter().zip(zones) {
        let n = wait_for(&format!("node {} Ready", a.node), 30, || async {
            let (_, n) = k.get(&format!("/api/v1/nodes/{}", a.node)).await;
            (n["status"]["conditions"][0]["status"] == "True")
                .then(|| n.clone())
                .ok_or_else(|| format!("{n}\n{}", a.stderr.lock().unwrap()))
        })
        .await;
        let l = &n["metadata"]["labels"];
        assert_eq!(l["kubernetes.io/hostname"], a.node.as_str(), "{n}");
        assert_eq!(l["kubernetes.io/os"], "linux", "{n}");
        assert!(l["kubernetes.io/arch"].is_string(), "{n}");
        assert_eq!(l["topology.kubernetes.io/zone"], z, "{n}");
        assert_eq!(l["pool"], "edge", "{n}");
        assert_eq!(l["kapsel.io/wasm-only"], "true", "{n}");
    }
    let (_, n3) = k.get(&format!("/api/v1/nodes/{}", names[2])).await;
    assert_eq!(n3["spec"]["taints"][0]["key"], "dedicated", "{n3}");
    assert_eq!(
        n3["spec"]["taints"][0]["effect"], "PreferNoSchedule",
        "{n3}"
    );
    let (_, own) = k.get(&format!("/api/v1/nodes/{}", k.node)).await;
    assert_eq!(
        own["spec"]["taints"][0]["key"], "kapsel.io/control-plane",
        "{own}"
    );

    // Required node affinity: zone b only.
    let affinity = "      affinity:\n        nodeAffinity:\n          requiredDuringSchedulingIgnoredDuringExecution:\n            nodeSelectorTerms:\n            - matchExpressions:\n              - {key: topology.kubernetes.io/zone, operator: In, values: [b]}\n";
    k.apply("zb", &deployment("zb", 4, affinity));
    let p = wait_placed(&k, "zb", 4, 4).await;
    for n in p.values() {
        assert!(
            n == &names[1] || n == &names[2],
            "zone a or the server: {p:?}"
        );
    }
    k.cli(&["delete", "deployment", "zb"]);

    // Topology spread over the three hosts: 2-2-2 (the server's node is tainted and not
    // tolerated, so with nodeTaintsPolicy: Honor it is no domain).
    let spread = "      topologySpreadConstraints:\n      - maxSkew: 1\n        topologyKey: kubernetes.io/hostname\n        whenUnsatisfiable: DoNotSchedule\n        nodeTaintsPolicy: Honor\n        labelSelector:\n          matchLabels: {app: spread}\n";
    k.apply("spread", &deployment("spread", 6, spread));
    let p = wait_placed(&k, "spread", 6, 6).await;
    let by = count_by_node(&p);
    let want: BTreeMap<String, usize> = names.iter().map(|n| (n.clone(), 2)).collect();
    assert_eq!(by, want, "{p:?}");
    k.cli(&["delete", "deployment", "spread"]);

    // Required anti-affinity on the hostname: one per agent, the fourth replica Pending.
    let anti = "      nodeSelector: {pool: edge}\n      affinity:\n        podAntiAffinity:\n          requiredDuringSchedulingIgnoredDuringExecution:\n          - topologyKey: kubernetes.io/hostname\n            labelSelector:\n              matchLabels: {app: solo}\n";
    k.apply("solo", &deployment("solo", 4, anti));
    let p = wait_placed(&k, "solo", 4, 3).await;
    let by = count_by_node(&p);
    for n in &names {
        assert_eq!(by.get(n), Some(&1), "{p:?}");
    }
    let pending = p.iter().find(|(_, n)| n.is_empty()).unwrap().0.clone();
    let msg = failed_scheduling(&k, &pending).await;
    assert!(
        msg.contains("3 node(s) didn't match pod anti-affinity rules"),
        "{msg}"
    );
    k.cli(&["delete", "deployment", "solo"]);

    // Unsatisfiable required affinity: Pending, and the event says why, node by node.
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: nowhere\nspec:\n  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n        - matchExpressions:\n          - {{key: topology.kubernetes.io/zone, operator: In, values: [mars]}}\n  containers:\n  - name: main\n    image: {}\n",
        fixture("sleep.wat")
    );
    k.apply("nowhere", &pod);
    let msg = failed_scheduling(&k, "nowhere").await;
    // The server's node has no zone either.
    assert!(
        msg.starts_with("0/4 nodes are available")
            && msg.contains("4 node(s) didn't match Pod's node affinity"),
        "{msg}"
    );
    let p = k.pod("nowhere").await.unwrap();
    assert!(p["spec"]["nodeName"].is_null(), "{p}");
    assert_eq!(phase(&p), "Pending");

    // An OCI pod never goes to a WASM-only node.
    let oci = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: oci\nspec:\n  nodeSelector: {pool: edge}\n  containers:\n  - name: main\n    image: busybox:1.36\n    imagePullPolicy: Never\n";
    k.apply("oci", oci);
    let msg = failed_scheduling(&k, "oci").await;
    assert!(msg.contains("3 node(s) cannot run OCI containers"), "{msg}");
    assert!(k.pod("oci").await.unwrap()["spec"]["nodeName"].is_null());

    // NodeRestriction, with e1's own certificate.
    let http = node_http(agents[0].data.path());
    let own_url = format!("{url}/api/v1/nodes/{}", names[0]);
    let cur = get_json(&http, &own_url).await;
    let mut relabel = cur.clone();
    relabel["metadata"]["labels"]["rack"] = "r7".into();
    let (code, v) = put(&http, &own_url, &relabel).await;
    assert_eq!(code, 200, "a node may label itself: {v}");
    let cur = get_json(&http, &own_url).await;
    let forbidden: Vec<(&str, Value)> = vec![
        ("taints", {
            let mut n = cur.clone();
            n["spec"]["taints"] = serde_json::json!([{"key": "x", "effect": "NoSchedule"}]);
            n
        }),
        ("unschedulable", {
            let mut n = cur.clone();
            n["spec"]["unschedulable"] = true.into();
            n
        }),
        ("restricted label", {
            let mut n = cur.clone();
            n["metadata"]["labels"]["node-restriction.kubernetes.io/trusted"] = "yes".into();
            n
        }),
        ("kubernetes.io label", {
            let mut n = cur.clone();
            n["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = "".into();
            n
        }),
    ];
    for (what, body) in forbidden {
        let (code, v) = put(&http, &own_url, &body).await;
        assert_eq!(code, 403, "{what}: {v}");
        assert_eq!(v["kind"], "Status", "{v}");
    }
    // Another node: refused whatever the body.
    let other_url = format!("{url}/api/v1/nodes/{}", names[1]);
    let (_, other) = k.get(&format!("/api/v1/nodes/{}", names[1])).await;
    let mut o = other.clone();
    o["metadata"]["labels"]["pool"] = "mine".into();
    let (code, v) = put(&http, &other_url, &o).await;
    assert_eq!(code, 403, "{v}");
    // Nothing changed.
    let (_, after) = k.get(&format!("/api/v1/nodes/{}", names[0])).await;
    assert_eq!(after["spec"], cur["spec"]);
    assert_eq!(after["metadata"]["labels"]["rack"], "r7");
    assert!(after["metadata"]["labels"]
        .get("node-restriction.kubernetes.io/trusted")
        .is_none());
    let (_, other_after) = k.get(&format!("/api/v1/nodes/{}", names[1])).await;
    assert_eq!(other_after["metadata"]["labels"]["pool"], "edge");
    drop(agents);
}
