//! Node failover benchmark (release build): one `kapsel serve --cluster-listen` with the default
//! lifecycle settings (lease renew 2 s, grace 6 s, toleration 2 s) and AGENTS real
//! `kapsel agent` processes (default 4; WASM-only, loopback, joined over TLS). The server's own
//! node is cordoned. A Deployment of REPLICAS (default 12) `sleep.wat` pods runs on the agents.
//! Each of ROUNDS rounds (default 5) `kill -9`s the agent holding the most pods and measures
//! the time from the kill until the Deployment again has REPLICAS pods Running and Ready, none
//! on the dead node; the agent is then restarted (its kept certificate) and the next round
//! waits until it is Ready again.
//!
//! Run: `cargo bench --bench node_failover` (AGENTS, REPLICAS, ROUNDS to change). Prints a
//! Markdown report (also written to target/bench-node-failover.md) beside Kubernetes' and
//! Nomad's defaults. Exits non-zero when a round never recovers (120 s).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/cluster.rs"]
mod cluster;
use cluster::*;

/// (node, ready) of the Deployment's live (not terminating) pods.
async fn live_pods(http: &reqwest::Client, api: &str) -> Vec<(String, bool)> {
    let v: Value = get_json(
        http,
        &format!("{api}/api/v1/namespaces/default/pods?labelSelector=app%3Dfailover"),
    )
    .await;
    v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            (
                p["spec"]["nodeName"].as_str().unwrap_or("").to_string(),
                pod_ready(p),
            )
        })
        .collect()
}

/// Poll every 20 ms until `replicas` pods are Ready, none on `dead`; the time since `t0`.
async fn until_recovered(
    http: &reqwest::Client,
    api: &str,
    replicas: usize,
    dead: Option<&str>,
    t0: Instant,
) -> Option<Duration> {
    loop {
        let pods = live_pods(http, api).await;
        let ok = pods.len() == replicas
            && pods
                .iter()
                .all(|(n, r)| *r && !n.is_empty() && Some(n.as_str()) != dead);
        if ok {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(120) {
            eprintln!("not recovered after 120 s: {pods:?}");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let n_agents: usize = env_or("AGENTS", 4);
    let replicas: usize = env_or("REPLICAS", 12);
    let rounds: usize = env_or("ROUNDS", 5);
    let root = tempfile::tempdir().unwrap();
    let s = start_server(&[]);
    cordon_control(&s);
    let http = reqwest::Client::new();
    let names: Vec<String> = (0..n_agents).map(|i| format!("fo-{i}")).collect();
    let mut agents: Vec<Agent> = names
        .iter()
        .map(|n| Agent::start(root.path(), &s, n, &[]))
        .collect();
    wait_nodes_ready(&http, &s.api, &names, Duration::from_secs(60)).await;
    let r = http
        .post(format!(
            "{}/apis/apps/v1/namespaces/default/deployments",
            s.api
        ))
        .json(&deployment("failover", replicas))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    if until_recovered(&http, &s.api, replicas, None, Instant::now())
        .await
        .is_none()
    {
        eprintln!("FAILED: the Deployment never became Ready");
        drop(agents);
        drop(s);
        drop(root);
        std::process::exit(1);
    }

    let mut times = Vec::new();
    for round in 0..rounds {
        // The agent holding the most pods.
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        for (n, _) in live_pods(&http, &s.api).await {
            *per.entry(n).or_default() += 1;
        }
        let (victim, held) = per
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(n, c)| (n.clone(), *c))
            .unwrap();
        let i = names.iter().position(|n| *n == victim).unwrap();
        let t0 = Instant::now();
        agents[i].kill9();
        let Some(t) = until_recovered(&http, &s.api, replicas, Some(&victim), t0).await else {
            eprintln!("FAILED: round {round} never recovered");
            drop(agents);
            drop(s);
            drop(root);
            std::process::exit(1);
        };
        eprintln!(
            "round {round}: killed {victim} ({held} pods) → {replicas} Ready elsewhere after {:.2} s",
            t.as_secs_f64()
        );
        times.push(t.as_secs_f64());
        agents[i].spawn();
        wait_nodes_ready(&http, &s.api, &names, Duration::from_secs(60)).await;
        // Let the restarted node's taint go and its Lease settle before the next kill.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let max = times.iter().cloned().fold(0.0, f64::max);
    let rounds_list = times
        .iter()
        .map(|t| format!("{t:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    let p50 = median(&mut times);
    let report = format!(
        "### A lost node's pods Ready elsewhere: {n_agents} agents, {replicas} replicas, {rounds} × `kill -9`\n\n\
| | p50 | max |\n|---|---|---|\n\
| Kapsel, defaults (renew 2 s, grace 6 s, toleration 2 s) | **{p50:.2} s** | {max:.2} s |\n\
| Kubernetes defaults (50 s grace + 300 s toleration) | ≈ 350 s ({:.0}× Kapsel's p50) | |\n\
| Nomad (heartbeat TTL + grace, small cluster) | 20–30 s | |\n\n\
Rounds: {rounds_list} s.\n",
        350.0 / p50
    );
    println!("{report}");
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-node-failover.md"),
        &report,
    );
    drop(agents);
    drop(s);
}
