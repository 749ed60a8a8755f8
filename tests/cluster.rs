//! A cluster on a private network: `kapsel serve` and three real `kapsel agent` processes
//! (WASM-only), each in its own network namespace, joined over TLS with the server's token.
//! Heartbeats and node lifecycle with the default settings: a `kill -9`ed node goes NotReady
//! with the unreachable taint and its pods run elsewhere within 10 s; a node stopped for 3 s
//! loses nothing; a restarted control plane evicts nothing; `drain` empties a node and leaves
//! it SchedulingDisabled; a NoSchedule taint keeps pods off a node unless tolerated. And, with
//! the server's own node cordoned: a Deployment of 6 replicas of a module that `kapsel apply`
//! uploaded from a temporary directory (deleted before the replicas exist) runs 2-2-2 on the
//! agents, each of which fetched the module by digest into its own data directory; `kapsel
//! logs -f` of a pod on one agent streams new lines and the adapter-metrics endpoint of a pod
//! on another answers, through the agents' tunnels.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::netns::NetLab;
use common::*;

/// A live (not terminating) pod of the Deployment: (name, uid, node, running and ready).
#[derive(Debug, Clone)]
struct Live {
    name: String,
    uid: String,
    node: String,
    ready: bool,
}

fn ready(p: &Value) -> bool {
    phase(p) == "Running" && pod_ready(p)
}

async fn pods_of(k: &Kapsel, app: &str) -> Vec<Live> {
    live_pods(k, app)
        .await
        .iter()
        .map(|p| Live {
            name: p["metadata"]["name"].as_str().unwrap_or_default().into(),
            uid: p["metadata"]["uid"].as_str().unwrap_or_default().into(),
            node: p["spec"]["nodeName"].as_str().unwrap_or_default().into(),
            ready: ready(p),
        })
        .collect()
}

fn by_node(pods: &[Live]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in pods {
        *m.entry(p.node.clone()).or_default() += 1;
    }
    m
}

async fn node(k: &Kapsel, name: &str) -> Value {
    k.get(&format!("/api/v1/nodes/{name}")).await.1
}

fn has_taint(n: &Value, key: &str, effect: &str) -> bool {
    n["spec"]["taints"]
        .as_array()
        .is_some_and(|ts| ts.iter().any(|t| t["key"] == key && t["effect"] == effect))
}

fn ready_status(n: &Value) -> String {
    n["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Agent `i` of `lab`: WASM-only, its own data directory, in namespace `i`, joining `url`
/// with `token`.
fn agent_in(lab: &NetLab, i: usize, url: &str, token: &str, node: &str) -> AgentProc {
    let data = tempfile::Builder::new()
        .prefix("kapsel-agent-")
        .tempdir()
        .unwrap();
    AgentProc::start_in_netns(
        Some(lab.ns(i)),
        data,
        url,
        node,
        &lab.node_ip(i),
        &["--no-docker", "--token", token],
    )
}

/// Agent `i`'s node turns Ready, with its address in the private network and a Lease it holds.
async fn wait_joined(k: &Kapsel, lab: &NetLab, i: usize, a: &AgentProc) {
    wait_node_ready(k, &a.node, a).await;
    let n = node(k, &a.node).await;
    assert!(
        n["status"]["addresses"]
            .as_array()
            .is_some_and(|ads| ads.iter().any(|ad| ad["address"] == lab.node_ip(i))),
        "{n}"
    );
    // Its Lease is there and renewed.
    let (code, l) = k
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{}",
            a.node
        ))
        .await;
    assert_eq!(code, 200, "{l}");
    assert_eq!(l["spec"]["holderIdentity"], a.node.as_str());
}

fn deployment(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: {}\n",
        fixture("sleep.wat")
    )
}

/// The live pods on `node` (uids) stay exactly these, none terminating, for `window`.
async fn nothing_lost(k: &Kapsel, app: &str, node: &str, window: Duration, what: &str) {
    let before: BTreeSet<String> = pods_of(k, app)
        .await
        .into_iter()
        .filter(|p| p.node == node)
        .map(|p| p.uid)
        .collect();
    assert!(!before.is_empty(), "{what}: no pods on {node} to watch");
    let end = Instant::now() + window;
    while Instant::now() < end {
        let now: BTreeSet<String> = pods_of(k, app)
            .await
            .into_iter()
            .filter(|p| p.node == node)
            .map(|p| p.uid)
            .collect();
        assert_eq!(now, before, "{what}: pods on {node} changed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_nodes_fail_over_paused_ones_do_not_and_drain_and_taints_work() {
    // Three nodes, each in its own network namespace on a private bridge: they reach the
    // server only over TLS on the bridge address, and join with the server's token.
    let lab = NetLab::new(3);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let cluster = format!("{}:{}", lab.host_ip(), free_port());
    let mut k = Kapsel::start_with(&["--listen", &listen, "--cluster-listen", &cluster]);
    let url = k.cluster_url();
    assert_eq!(url, format!("https://{cluster}"));
    let token = k.token();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let agent = |i: usize| agent_in(&lab, i, &url, &token, &format!("edge{}-{tag}", i + 1));

    // A wrong token from a namespace is refused and registers nothing.
    let bad = token.rsplit_once('.').unwrap().0.to_string() + ".0000000000000000";
    let mut impostor = AgentProc::start_in_netns(
        Some(lab.ns(0)),
        tempfile::tempdir().unwrap(),
        &url,
        &format!("impostor-{tag}"),
        &lab.node_ip(0),
        &["--no-docker", "--token", &bad],
    );
    let (status, err) = impostor.wait_exit(20);
    assert!(!status.success(), "{err}");
    assert!(err.contains("refused the token (401)"), "{err}");
    let (code, _) = k.get(&format!("/api/v1/nodes/impostor-{tag}")).await;
    assert_eq!(code, 404);

    let mut a1 = agent(0);
    let a2 = agent(1);
    let a3 = agent(2);
    for (i, a) in [&a1, &a2, &a3].into_iter().enumerate() {
        wait_joined(&k, &lab, i, a).await;
    }
    let ip_of = |node: &str| {
        [&a1.node, &a2.node, &a3.node]
            .iter()
            .position(|n| n.as_str() == node)
            .map(|i| lab.node_ip(i))
    };

    // Six replicas, no node selector: every pod lands on a Ready node (the server's own node
    // is one too), and the spreading score puts some on each agent.
    k.apply("web", &deployment("web", 6));
    let pods = wait_for("6 ready pods", 30, || async {
        let p = pods_of(&k, "web").await;
        let ok = p.len() == 6 && p.iter().all(|p| p.ready);
        if ok {
            Ok(p)
        } else {
            Err(format!("{p:?}"))
        }
    })
    .await;
    let spread = by_node(&pods);
    for a in [&a1, &a2, &a3] {
        assert!(spread.get(&a.node).copied().unwrap_or(0) >= 1, "{spread:?}");
    }
    // Each pod's hostIP is its node's address in the private network.
    for p in &pods {
        if let Some(ip) = ip_of(&p.node) {
            let (_, v) = k
                .get(&format!("/api/v1/namespaces/default/pods/{}", p.name))
                .await;
            assert_eq!(v["status"]["hostIP"], ip.as_str(), "{v}");
        }
    }
    // Admission gave them the default tolerations (2 s).
    let (_, p0) = k
        .get(&format!("/api/v1/namespaces/default/pods/{}", pods[0].name))
        .await;
    let tols = p0["spec"]["tolerations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        tols.iter()
            .any(|t| t["key"] == "node.kubernetes.io/unreachable"
                && t["effect"] == "NoExecute"
                && t["tolerationSeconds"] == 2),
        "{tols:?}"
    );

    // kill -9 one agent: its pods run, Ready, elsewhere within 10 s.
    let lost: BTreeSet<String> = pods
        .iter()
        .filter(|p| p.node == a1.node)
        .map(|p| p.uid.clone())
        .collect();
    let killed = Instant::now();
    a1.kill9();
    let dead = a1.node.clone();
    wait_for("6 ready pods off the dead node", 30, || async {
        let p = pods_of(&k, "web").await;
        (p.len() == 6 && p.iter().all(|p| p.ready && p.node != dead))
            .then_some(())
            .ok_or_else(|| format!("{p:?}"))
    })
    .await;
    let failover = killed.elapsed();
    println!("failover: a kill -9ed node's pods Ready elsewhere after {failover:.2?}");
    assert!(
        failover < Duration::from_secs(10),
        "pods of a lost node took {failover:?} to be Ready elsewhere"
    );
    let now: BTreeSet<String> = pods_of(&k, "web")
        .await
        .into_iter()
        .map(|p| p.uid)
        .collect();
    assert!(
        lost.is_disjoint(&now),
        "the lost pods were replaced, not kept"
    );
    let n = node(&k, &dead).await;
    assert_eq!(ready_status(&n), "Unknown", "{n}");
    assert!(
        has_taint(&n, "node.kubernetes.io/unreachable", "NoExecute"),
        "{n}"
    );
    let out = k.cli(&["get", "nodes"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&dead) && l.contains("NotReady")),
        "{table}"
    );

    // SIGSTOP the other agent for 3 s, then SIGCONT: no pod lost, no taint.
    let a2_node = a2.node.clone();
    a2.signal(libc::SIGSTOP);
    let watch = nothing_lost(&k, "web", &a2_node, Duration::from_secs(3), "SIGSTOP");
    watch.await;
    a2.signal(libc::SIGCONT);
    nothing_lost(&k, "web", &a2_node, Duration::from_secs(4), "after SIGCONT").await;
    let n = node(&k, &a2_node).await;
    assert_eq!(ready_status(&n), "True", "{n}");
    assert!(
        !has_taint(&n, "node.kubernetes.io/unreachable", "NoExecute"),
        "{n}"
    );

    // Restarting serve evicts nothing: the agent's pods stay through a whole grace period
    // and toleration after the restart (its heartbeats were missed while serve was down).
    k.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await; // serve is down: a real outage
    k.restart();
    assert_eq!(k.url, format!("http://{listen}"));
    nothing_lost(&k, "web", &a2_node, Duration::from_secs(9), "serve restart").await;

    // drain moves every pod off the agent and leaves it SchedulingDisabled.
    let out = k.cli(&["drain", &a2_node, "--timeout", "30s"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let p = pods_of(&k, "web").await;
    assert!(p.iter().all(|p| p.node != a2_node), "{p:?}");
    let table = String::from_utf8_lossy(&k.cli(&["get", "nodes"]).stdout).to_string();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&a2_node) && l.contains("Ready,SchedulingDisabled")),
        "{table}"
    );
    let n = node(&k, &a2_node).await;
    assert!(
        has_taint(&n, "node.kubernetes.io/unschedulable", "NoSchedule"),
        "{n}"
    );
    wait_for("6 ready pods after the drain", 30, || async {
        let p = pods_of(&k, "web").await;
        (p.len() == 6 && p.iter().all(|p| p.ready))
            .then_some(())
            .ok_or_else(|| format!("{p:?}"))
    })
    .await;

    // A NoSchedule taint keeps pods off a node unless they tolerate it: uncordon the agent,
    // taint it, and pin pods to it.
    let out = k.cli(&["uncordon", &a2_node]);
    assert!(out.status.success());
    let mut n = node(&k, &a2_node).await;
    assert!(n["spec"]["unschedulable"].is_null(), "{n}");
    n["spec"]["taints"] =
        serde_json::json!([{"key": "dedicated", "value": "edge", "effect": "NoSchedule"}]);
    let (code, v) = k
        .send(
            reqwest::Method::PUT,
            &format!("/api/v1/nodes/{a2_node}"),
            Some(&n.to_string()),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let pinned = |name: &str, tolerate: bool| {
        let tol = if tolerate {
            "  tolerations:\n  - {key: dedicated, operator: Equal, value: edge, effect: NoSchedule}\n"
        } else {
            ""
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeSelector: {{kubernetes.io/hostname: {a2_node}}}\n{tol}  containers:\n  - name: main\n    image: {}\n",
            fixture("sleep.wat")
        )
    };
    k.apply("shy", &pinned("shy", false));
    k.apply("brave", &pinned("brave", true));
    let brave = k.wait_pod("brave", 20, |p| phase(p) == "Running").await;
    assert_eq!(brave["spec"]["nodeName"], a2_node.as_str());
    let shy = k
        .wait_pod("shy", 20, |p| {
            p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["type"] == "PodScheduled"
                        && c["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("untolerated taint {dedicated=edge"))
                })
            })
        })
        .await;
    assert!(shy["spec"]["nodeName"].is_null(), "{shy}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uploaded_module_spreads_2_2_2_and_remote_pods_answer_logs_and_metrics() {
    let lab = NetLab::new(3);
    let k = Kapsel::start_with(&["--cluster-listen", &format!("{}:0", lab.host_ip())]);
    let url = k.cluster_url();
    assert!(
        url.starts_with(&format!("https://{}:", lab.host_ip())),
        "{url}"
    );
    let token = k.token();
    // The server's own node takes no pods: the replicas go to the agents only.
    let out = k.cli(&["cordon", &k.node]);
    assert!(out.status.success(), "{out:?}");
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let agents: Vec<AgentProc> = (0..3)
        .map(|i| agent_in(&lab, i, &url, &token, &format!("mod{}-{tag}", i + 1)))
        .collect();
    for (i, a) in agents.iter().enumerate() {
        wait_joined(&k, &lab, i, a).await;
    }
    let names: Vec<String> = agents.iter().map(|a| a.node.clone()).collect();

    // The module exists only in this directory, named relatively by the manifest beside it.
    // `kapsel apply` uploads it and records its digest; the Deployment starts with no
    // replicas, so no pod can run before the file is gone.
    let dir = tempfile::tempdir().unwrap();
    let module_path = dir.path().join("app.wasm");
    std::fs::copy(fixture("ticker/ticker.wasm"), &module_path).unwrap();
    let module = std::fs::read(&module_path).unwrap();
    let hex = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&module))
    };
    let manifest = dir.path().join("ticker.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: tick\nspec:\n  replicas: 0\n  selector:\n    matchLabels: {app: tick}\n  template:\n    metadata:\n      labels: {app: tick}\n    spec:\n      terminationGracePeriodSeconds: 1\n      topologySpreadConstraints:\n      - maxSkew: 1\n        topologyKey: kubernetes.io/hostname\n        whenUnsatisfiable: DoNotSchedule\n        nodeTaintsPolicy: Honor\n        labelSelector:\n          matchLabels: {app: tick}\n      containers:\n      - name: main\n        image: app.wasm\n        env: [{name: TICK_MS, value: \"100\"}]\n",
    )
    .unwrap();
    let out = k.cli(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    drop(dir);
    assert!(!module_path.exists());
    let out = k.cli(&["scale", "deployment", "tick", "--replicas", "6"]);
    assert!(out.status.success(), "{out:?}");

    // 2-2-2 over the agents, none on the cordoned server node, each pod's hostIP its node's
    // address in the private network.
    let pods = wait_for("6 ready tick pods", 60, || async {
        let p = pods_of(&k, "tick").await;
        (p.len() == 6 && p.iter().all(|p| p.ready))
            .then(|| p.clone())
            .ok_or_else(|| format!("{p:?}"))
    })
    .await;
    let want: BTreeMap<String, usize> = names.iter().map(|n| (n.clone(), 2)).collect();
    assert_eq!(by_node(&pods), want, "{pods:?}");
    for p in &pods {
        let v = k.pod(&p.name).await.unwrap();
        let i = names.iter().position(|n| *n == p.node).unwrap();
        assert_eq!(v["status"]["hostIP"], lab.node_ip(i).as_str(), "{v}");
        assert_eq!(
            v["metadata"]["annotations"]["modules.kapsel.io/main"],
            format!("sha256:{hex}").as_str(),
            "{v}"
        );
    }
    // Every agent fetched the module by digest into its own data directory; the server's
    // store has it; the file it came from is gone.
    for a in &agents {
        let cached = a.data.path().join("cache/wasm/modules/sha256").join(&hex);
        assert_eq!(
            std::fs::read(&cached).ok().as_deref(),
            Some(&module[..]),
            "{} has no copy at {}",
            a.node,
            cached.display()
        );
    }
    assert_eq!(
        std::fs::read(k.data.join("modules/sha256").join(&hex)).unwrap(),
        module
    );
    assert!(!module_path.exists());

    // `kapsel logs -f` of a pod on the second agent: ticks written after it started arrive
    // (through that agent's tunnel; the pod's log lives in the agent's data directory).
    let remote = pods
        .iter()
        .find(|p| p.node == names[1])
        .unwrap()
        .name
        .clone();
    wait_ticks(&k, &[&remote], 1).await;
    let follow = LogsFollow::start(&k, &[&remote]);
    follow.wait_new_ticks(&k, &[&remote]).await;
    drop(follow);

    // The adapter-metrics endpoint of a pod on the third agent: a metrics adapter (listening
    // on that node's own loopback) reads a value the pod's init container wrote.
    let cfg = shop_jobs_config();
    k.apply("meter", &adapter_pod("meter", &names[2], cfg.path(), ""));
    let p = k.wait_pod("meter", 60, |p| phase(p) == "Running").await;
    assert_eq!(p["spec"]["nodeName"], names[2].as_str(), "{p}");
    assert_eq!(p["status"]["hostIP"], lab.node_ip(2).as_str(), "{p}");
    wait_shop_jobs(&k, "meter").await;
}
