//! Cluster scale benchmark (release build): one `kapsel serve --cluster-listen` and NODES real
//! `kapsel agent` processes (default 100; WASM-only, each with its own data directory, joined
//! over TLS with the server's token, all on loopback). The server's own node is cordoned, so
//! every pod runs on an agent. It measures, in one run:
//!   1. agents started → all NODES Ready;
//!   2. idle, no pods: the server's CPU over IDLE_SECS (utime + stime from /proc), the agents'
//!      CPU (mean) and RSS (median, max);
//!   3. one Deployment of REPLICAS (default 10,000) `sleep.wat` pods POSTed → every pod Running
//!      (`kapsel_pods{phase="Running"}`) and → `status.readyReplicas == REPLICAS`; pods/s;
//!   4. idle with every pod running: the server's CPU, the agents' RSS;
//!   5. `PUT /scale` to 0 → no pod left.
//!
//! Run: `cargo bench --bench cluster_scale` (NODES, REPLICAS, IDLE_SECS to change). Prints a
//! Markdown report (also written to target/bench-cluster-scale.md). Exits non-zero when the run
//! fails (a node or a pod never gets there); a missed target is reported, not a failure.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "support/cluster.rs"]
mod cluster;
use cluster::*;

struct Idle {
    server_cpu: f64,
    agents_cpu: f64,
    rss_median: f64,
    rss_max: f64,
    uss_median: f64,
    pss_median: f64,
    server_rss: f64,
}

/// CPU of the server and the agents over `secs` (percent of one core), then RSS (MiB).
async fn idle(s: &ClusterServer, agents: &[Agent], secs: u64) -> Idle {
    let c0 = cpu_secs(s.child.id());
    let a0: f64 = agents.iter().map(|a| cpu_secs(a.pid())).sum();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let c1 = cpu_secs(s.child.id());
    let a1: f64 = agents.iter().map(|a| cpu_secs(a.pid())).sum();
    let wall = t0.elapsed().as_secs_f64();
    let mut rss: Vec<f64> = agents
        .iter()
        .map(|a| rss_kib(a.pid()) as f64 / 1024.0)
        .collect();
    let rss_max = rss.iter().cloned().fold(0.0, f64::max);
    let mut uss: Vec<f64> = agents
        .iter()
        .map(|a| uss_kib(a.pid()) as f64 / 1024.0)
        .collect();
    let mut pss: Vec<f64> = agents
        .iter()
        .map(|a| smaps_kib(a.pid(), "Pss") as f64 / 1024.0)
        .collect();
    Idle {
        uss_median: median(&mut uss),
        pss_median: median(&mut pss),
        server_cpu: (c1 - c0) / wall * 100.0,
        agents_cpu: (a1 - a0) / wall * 100.0 / agents.len() as f64,
        rss_median: median(&mut rss),
        rss_max,
        server_rss: rss_kib(s.child.id()) as f64 / 1024.0,
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

#[tokio::main]
async fn main() {
    let nodes: usize = env_or("NODES", 100);
    let replicas: usize = env_or("REPLICAS", 10_000);
    let idle_secs: u64 = env_or("IDLE_SECS", 10);
    let root = tempfile::tempdir().unwrap();
    let s = start_server(&[]);
    cordon_control(&s);
    let http = reqwest::Client::new();

    // 1. Agents.
    let t0 = Instant::now();
    let names: Vec<String> = (0..nodes).map(|i| format!("agent-{i:03}")).collect();
    let agents: Vec<Agent> = names
        .iter()
        .map(|n| Agent::start(root.path(), &s, n, &[]))
        .collect();
    wait_nodes_ready(&http, &s.api, &names, Duration::from_secs(300)).await;
    let t_join = t0.elapsed().as_secs_f64();
    eprintln!("{nodes} agents Ready after {t_join:.2} s");

    // 2. Idle without pods (after the joins' writes have settled).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle0 = idle(&s, &agents, idle_secs).await;
    eprintln!(
        "idle, no pods: server {:.2} % · agent mean {:.2} % · agent RSS median {:.1} MiB, max {:.1} MiB, USS {:.1} MiB, PSS {:.1} MiB",
        idle0.server_cpu, idle0.agents_cpu, idle0.rss_median, idle0.rss_max, idle0.uss_median, idle0.pss_median
    );

    // 3. One Deployment of `replicas` pods.
    let base = format!("{}/apis/apps/v1/namespaces/default/deployments", s.api);
    let cpu0 = cpu_secs(s.child.id());
    let acpu0: f64 = agents.iter().map(|a| cpu_secs(a.pid())).sum();
    let t0 = Instant::now();
    let r = http
        .post(&base)
        .json(&deployment("fleet", replicas))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let mut t_running = None;
    let running_series = "kapsel_pods{phase=\"Running\"} ";
    let t_ready = loop {
        if t_running.is_none() && metric(&http, &s.api, running_series).await as usize >= replicas {
            t_running = Some(t0.elapsed().as_secs_f64());
        }
        let v: Value = get_json(&http, &format!("{base}/fleet")).await;
        if t_running.is_some() && v["status"]["readyReplicas"] == replicas {
            break t0.elapsed().as_secs_f64();
        }
        if t0.elapsed() > Duration::from_secs(600) {
            eprintln!(
                "FAILED: {replicas} pods not Ready after 600 s: running {} status {}",
                metric(&http, &s.api, running_series).await,
                v["status"]
            );
            drop(agents);
            drop(s);
            drop(root);
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let t_running = t_running.unwrap();
    let ramp_server_cpu = cpu_secs(s.child.id()) - cpu0;
    let ramp_agents_cpu = agents.iter().map(|a| cpu_secs(a.pid())).sum::<f64>() - acpu0;
    eprintln!(
        "{replicas} pods: all Running after {t_running:.2} s, all Ready after {t_ready:.2} s; CPU meanwhile: server {ramp_server_cpu:.1} s, agents {ramp_agents_cpu:.1} s"
    );

    // Spread over the agents.
    let v = get_json(&http, &format!("{}/api/v1/namespaces/default/pods", s.api)).await;
    let mut per: std::collections::BTreeMap<String, usize> =
        names.iter().map(|n| (n.clone(), 0)).collect();
    for p in v["items"].as_array().unwrap() {
        let n = p["spec"]["nodeName"].as_str().unwrap_or("").to_string();
        assert!(per.contains_key(&n), "a pod on {n:?}, not an agent");
        assert!(pod_ready(p), "pod not ready: {}", p["metadata"]["name"]);
        *per.get_mut(&n).unwrap() += 1;
    }
    let (pmin, pmax) = (
        per.values().min().copied().unwrap_or(0),
        per.values().max().copied().unwrap_or(0),
    );

    // 4. Idle with every pod running.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle1 = idle(&s, &agents, idle_secs).await;
    eprintln!(
        "idle, {replicas} pods: server {:.2} % · agent mean {:.2} % · agent RSS median {:.1} MiB, max {:.1} MiB",
        idle1.server_cpu, idle1.agents_cpu, idle1.rss_median, idle1.rss_max
    );

    // 5. Scale to 0.
    let t0 = Instant::now();
    let r = http
        .put(format!("{base}/fleet/scale"))
        .json(&json!({"spec": {"replicas": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let t_down = loop {
        let t = http
            .get(format!("{}/metrics", s.api))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let left: f64 = t
            .lines()
            .filter(|l| l.starts_with("kapsel_pods{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if left == 0.0 {
            break t0.elapsed().as_secs_f64();
        }
        if t0.elapsed() > Duration::from_secs(600) {
            eprintln!("FAILED: {left} pods left 600 s after scaling to 0");
            drop(agents);
            drop(s);
            drop(root);
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("scaled to 0 after {t_down:.2} s");

    let report = format!(
        "### Cluster: {nodes} agents, one Deployment of {replicas} WASM pods\n\n\
| measurement | value | target |\n|---|---|---|\n\
| {nodes} agents started → all Ready (first TLS join each) | {t_join:.2} s | |\n\
| server CPU, idle, {nodes} nodes, no pods ({idle_secs} s window) | **{:.2} %** of one core | ≤ 5 %: {} |\n\
| agent RSS, idle WASM-only, no pods: median / max | **{:.1}** / {:.1} MiB | ≤ 15 MB: {} |\n\
| of which its own (USS: private pages), median; PSS, median | {:.1} MiB; {:.1} MiB | |\n\
| agent CPU, idle, mean per agent | {:.2} % of one core | |\n\
| Deployment POSTed → all {replicas} Running | **{t_running:.2} s** ({:.0} pods/s) | ≤ 10 s: {} |\n\
| Deployment POSTed → `readyReplicas` = {replicas} | {t_ready:.2} s | |\n\
| CPU spent meanwhile: server / all agents | {ramp_server_cpu:.1} s / {ramp_agents_cpu:.1} s | |\n\
| pods per agent: min / max | {pmin} / {pmax} | |\n\
| server CPU, idle, {replicas} pods running | {:.2} % of one core | |\n\
| agent RSS with {} pods each: median / max; USS median | {:.1} / {:.1} MiB; {:.1} MiB | |\n\
| server RSS: no pods / {replicas} pods | {:.0} / {:.0} MiB | |\n\
| scale {replicas} → 0 until no pod is left | {t_down:.2} s | |\n",
        idle0.server_cpu,
        verdict(idle0.server_cpu <= 5.0),
        idle0.rss_median,
        idle0.rss_max,
        verdict(idle0.rss_median * 1024.0 * 1024.0 <= 15e6),
        idle0.uss_median,
        idle0.pss_median,
        idle0.agents_cpu,
        replicas as f64 / t_running,
        verdict(t_running <= 10.0),
        idle1.server_cpu,
        replicas / nodes.max(1),
        idle1.rss_median,
        idle1.rss_max,
        idle1.uss_median,
        idle0.server_rss,
        idle1.server_rss,
    );
    println!("{report}");
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-cluster-scale.md"),
        &report,
    );
    drop(agents);
    drop(s);
}
