//! `kapsel cordon|uncordon|drain NODE`: take a node out of scheduling (and put it back), and
//! move its pods elsewhere. Cordon sets `spec.unschedulable` and shows the
//! `node.kubernetes.io/unschedulable:NoSchedule` taint, as Kubernetes does; drain cordons, then
//! deletes (gracefully) every pod on the node that a ReplicaSet owns, so the ReplicaSet
//! replaces it on another node, and waits until they are gone.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::client::{Client, ClientError};
use crate::model::taint::{Taint, TaintEffect, TAINT_UNSCHEDULABLE};
use crate::model::Node;

/// Set or clear `spec.unschedulable` (and its taint), compare-and-swap, retried on conflicts.
/// Returns whether anything changed.
pub async fn set_unschedulable(client: &Client, name: &str, on: bool) -> Result<bool> {
    let path = format!("/api/v1/nodes/{name}");
    for _ in 0..10 {
        let cur = client.get(&path).await.map_err(|e| match e.code() {
            Some(404) => anyhow!("node {name:?} not found"),
            _ => anyhow!("reading node {name}: {e}"),
        })?;
        let mut node: Node = serde_json::from_value(cur)?;
        let before = node.clone();
        node.spec.taints.retain(|t| t.key != TAINT_UNSCHEDULABLE);
        if on {
            node.spec.unschedulable = Some(true);
            node.spec.taints.push(Taint {
                time_added: Some(chrono::Utc::now()),
                ..Taint::new(TAINT_UNSCHEDULABLE, TaintEffect::NoSchedule)
            });
        } else {
            node.spec.unschedulable = None;
        }
        let same_taints = |a: &Node, b: &Node| {
            a.spec
                .taints
                .iter()
                .map(|t| (&t.key, t.effect))
                .collect::<Vec<_>>()
                == b.spec
                    .taints
                    .iter()
                    .map(|t| (&t.key, t.effect))
                    .collect::<Vec<_>>()
        };
        if before.spec.unschedulable.unwrap_or(false) == on && same_taints(&before, &node) {
            return Ok(false);
        }
        match client.put(&path, &serde_json::to_value(&node)?).await {
            Ok(_) => return Ok(true),
            Err(e) if e.code() == Some(409) => continue,
            Err(e) => bail!("updating node {name}: {e}"),
        }
    }
    bail!("node {name} kept changing; try again")
}

pub async fn cordon(client: &Client, name: &str, on: bool) -> Result<i32> {
    let changed = set_unschedulable(client, name, on).await?;
    let verb = if on { "cordoned" } else { "uncordoned" };
    if changed {
        println!("node/{name} {verb}");
    } else {
        println!("node/{name} already {verb}");
    }
    Ok(0)
}

fn controller_kind(p: &Value) -> Option<&str> {
    p["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true)
        .and_then(|o| o["kind"].as_str())
}

/// The pods bound to `node`, in every namespace.
async fn pods_on(client: &Client, node: &str) -> Result<Vec<Value>, ClientError> {
    let list = client
        .get(&format!(
            "/api/v1/pods?fieldSelector=spec.nodeName%3D{node}"
        ))
        .await?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

fn key(p: &Value) -> (String, String) {
    (
        p["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        p["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

pub async fn drain(client: &Client, name: &str, force: bool, timeout: Duration) -> Result<i32> {
    set_unschedulable(client, name, true).await?;
    println!("node/{name} cordoned");
    let pods = pods_on(client, name).await?;
    let mut evict = Vec::new();
    let mut left = Vec::new();
    for p in &pods {
        let finished = matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
        if finished {
            continue;
        }
        if controller_kind(p) == Some("ReplicaSet") || force {
            evict.push(key(p));
        } else {
            left.push(key(p));
        }
    }
    if !left.is_empty() {
        let names: Vec<String> = left.iter().map(|(ns, n)| format!("{ns}/{n}")).collect();
        bail!(
            "cannot drain node {name}: pods not managed by a ReplicaSet would be lost: {} (use --force to delete them too)",
            names.join(", ")
        );
    }
    for (ns, pod) in &evict {
        match client
            .request(
                reqwest::Method::DELETE,
                &format!("/api/v1/namespaces/{ns}/pods/{pod}"),
                Some(&json!({})),
            )
            .await
        {
            Ok(_) => println!("evicting pod {ns}/{pod}"),
            Err(e) if e.code() == Some(404) => {}
            Err(e) => bail!("evicting pod {ns}/{pod}: {e}"),
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        let now: Vec<(String, String)> = pods_on(client, name)
            .await?
            .iter()
            .map(key)
            .filter(|k| evict.contains(k))
            .collect();
        if now.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let names: Vec<String> = now.iter().map(|(ns, n)| format!("{ns}/{n}")).collect();
            bail!(
                "drain of node {name} timed out after {timeout:?} (--timeout); still there: {}",
                names.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (ns, pod) in &evict {
        println!("pod/{pod} evicted (namespace {ns})");
    }
    println!("node/{name} drained");
    Ok(0)
}
