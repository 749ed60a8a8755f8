//! The node lifecycle controller: tells live nodes from silent ones and moves the pods of a
//! lost node elsewhere, as Kubernetes' node lifecycle controller and taint manager do.
//!
//! Every `--node-monitor-period` it looks at each Node's heartbeats (its Lease's `renewTime`
//! and its `Ready` condition's `lastHeartbeatTime`). Time is measured on this controller's
//! own clock, from when it *saw* a heartbeat change, never from the timestamps' values, so
//! clock skew between machines does not matter, and every node starts with a fresh grace
//! period when the controller starts (a restarted control plane evicts nothing).
//!
//! - A node silent for longer than `--node-monitor-grace-period` gets `Ready=Unknown`
//!   (`NodeStatusUnknown`) and the `node.kubernetes.io/unreachable` taint, `NoSchedule` at
//!   once and `NoExecute` at most `--node-eviction-rate` nodes per second.
//! - Pods on a node with `NoExecute` taints they do not tolerate are evicted (deleted
//!   gracefully); a toleration's `tolerationSeconds` delays that from the taint's `timeAdded`.
//!   Admission gives every pod tolerations for the not-ready and unreachable taints for
//!   `--default-unreachable-toleration-seconds` (Kubernetes' `DefaultTolerationSeconds`).
//!   The ReplicaSet controller does not count terminating pods, so it replaces them at once.
//! - A node that reports `Ready=False` itself (its heartbeats are fine, its runtime is not) gets
//!   the `node.kubernetes.io/not-ready` taint, `NoSchedule` at once and `NoExecute` under the
//!   same rate limit; the taints go when it reports `Ready=True` again.
//! - Zones (`topology.kubernetes.io/zone`; nodes without it form one zone) are judged as in
//!   Kubernetes: a zone whose nodes are all not ready is in *full disruption*; one with more
//!   than 2 not-ready nodes making at least `--unhealthy-zone-threshold` of it is in *partial
//!   disruption*. Evictions run at `--node-eviction-rate` in a normal zone; in a partially
//!   disrupted zone at `--secondary-node-eviction-rate` if it has more than
//!   `--large-cluster-size-threshold` nodes, else not at all; a fully disrupted zone evicts
//!   at the normal rate unless every zone is fully disrupted, when the control plane (or its
//!   network) is the likely problem and nothing is evicted. So in a small cluster 1 or 2 of 3
//!   dead nodes are evicted, while all 3 silent, or 6 of 10, are not.
//! - A pod being deleted on an unreachable node cannot be stopped by its node: once its
//!   grace period is over it is removed (as Kubernetes' pod GC does for out-of-service nodes),
//!   so it stops showing as Terminating; if the node comes back, its agent stops what is left.
//! - A node whose heartbeats are back and that reports `Ready=True` again loses the
//!   unreachable taints.
//!
//! The decisions are [`Monitor::observe`], a pure function of the objects and the time, so
//! they are tested on paused tokio time; [`NodeLifecycle::run`] applies them to the store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::model::lease::NODE_LEASE_NAMESPACE;
use crate::model::node::NodeCondition;
use crate::model::taint::{
    no_execute_allowance, Taint, TaintEffect, TAINT_NOT_READY, TAINT_UNREACHABLE,
};
use crate::model::{Kind, Lease, Node, Pod};
use crate::store::{object_rv, Store, StoreError};

/// The controller's knobs, under Kubernetes' flag names (Kapsel's defaults are fast).
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleConfig {
    /// `--node-monitor-period`: how often nodes are looked at.
    pub monitor_period: Duration,
    /// `--node-monitor-grace-period`: silence after which a node is `Unknown`.
    pub grace_period: Duration,
    /// `--default-unreachable-toleration-seconds` (and not-ready): what admission adds.
    pub default_toleration_seconds: i64,
    /// `--node-eviction-rate`: nodes per second that may be tainted `NoExecute` (0: none).
    pub eviction_rate: f64,
    /// `--unhealthy-zone-threshold`: a zone with more than 2 not-ready nodes making this
    /// fraction of it is partially disrupted.
    pub unhealthy_zone_threshold: f64,
    /// `--large-cluster-size-threshold`: a partially disrupted zone with more nodes than this
    /// still evicts, at the secondary rate; a smaller one evicts nothing.
    pub large_cluster_size_threshold: usize,
    /// `--secondary-node-eviction-rate`: nodes per second in a large, partially disrupted zone.
    pub secondary_eviction_rate: f64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            monitor_period: Duration::from_secs(1),
            grace_period: Duration::from_secs(6),
            default_toleration_seconds: 2,
            eviction_rate: 10.0,
            unhealthy_zone_threshold: 0.55,
            large_cluster_size_threshold: 50,
            secondary_eviction_rate: 0.01,
        }
    }
}

impl LifecycleConfig {
    /// Check the knobs against each other; the error names the flag.
    pub fn validate(&self, lease_renew_interval: Duration) -> Result<(), String> {
        if self.monitor_period.is_zero() {
            return Err("--node-monitor-period must be more than 0".into());
        }
        if self.grace_period <= lease_renew_interval {
            return Err(format!(
                "--node-monitor-grace-period ({:?}) must be longer than --node-lease-renew-interval ({:?}), or every node flaps",
                self.grace_period, lease_renew_interval
            ));
        }
        if self.default_toleration_seconds < 0 {
            return Err("--default-unreachable-toleration-seconds must be 0 or more".into());
        }
        if !(self.eviction_rate >= 0.0 && self.eviction_rate.is_finite()) {
            return Err("--node-eviction-rate must be 0 or more (nodes per second)".into());
        }
        if !(self.secondary_eviction_rate >= 0.0 && self.secondary_eviction_rate.is_finite()) {
            return Err(
                "--secondary-node-eviction-rate must be 0 or more (nodes per second)".into(),
            );
        }
        if !(self.unhealthy_zone_threshold > 0.0 && self.unhealthy_zone_threshold <= 1.0) {
            return Err("--unhealthy-zone-threshold must be in (0, 1]".into());
        }
        Ok(())
    }
}

/// What the controller decided for one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Silent too long: `Ready=Unknown` and the unreachable `NoSchedule` taint.
    MarkUnknown(String),
    /// Add the unreachable `NoExecute` taint (rate-limited).
    TaintNoExecute(String),
    /// Heartbeats are back and the node is Ready: remove the unreachable and not-ready taints.
    Untaint(String),
    /// The node reports `Ready=False`: the not-ready `NoSchedule` taint (and no unreachable
    /// ones: it is heard).
    MarkNotReady(String),
    /// Add the not-ready `NoExecute` taint (rate-limited).
    TaintNotReadyNoExecute(String),
    /// Delete a pod gracefully: (namespace, name, node).
    Evict(String, String, String),
    /// Remove a pod that was being deleted on an unreachable node and whose grace is over.
    ForceDelete(String, String),
}

/// A node as the controller last saw it.
struct Health {
    /// The heartbeats last seen (lease renewTime, Ready lastHeartbeatTime).
    seen: String,
    /// When they last changed, on this controller's clock.
    probe: Instant,
}

/// A token bucket of burst 1: `rate` per second.
struct Limiter {
    rate: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Limiter {
    fn take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return false;
        }
        let elapsed = self
            .last
            .map(|l| now.saturating_duration_since(l).as_secs_f64())
            .unwrap_or(f64::INFINITY);
        self.last = Some(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(1.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The controller's memory and decisions, independent of the store.
pub struct Monitor {
    cfg: LifecycleConfig,
    health: HashMap<String, Health>,
    /// One eviction rate limiter per zone.
    limiters: HashMap<String, Limiter>,
    /// Whether the last pass found a zone too disrupted to evict in.
    pub disrupted: bool,
}

/// The label naming a node's zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

fn has_taint(node: &Node, effect: TaintEffect) -> bool {
    has_taint_key(node, TAINT_UNREACHABLE, effect)
}

fn has_taint_key(node: &Node, key: &str, effect: TaintEffect) -> bool {
    node.spec
        .taints
        .iter()
        .any(|t| t.key == key && t.effect == effect)
}

fn zone_of(node: &Node) -> &str {
    node.metadata
        .labels
        .get(LABEL_ZONE)
        .map(String::as_str)
        .unwrap_or("")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZoneState {
    Normal,
    PartialDisruption,
    FullDisruption,
}

impl Monitor {
    pub fn new(cfg: LifecycleConfig) -> Self {
        Monitor {
            cfg,
            health: HashMap::new(),
            limiters: HashMap::new(),
            disrupted: false,
        }
    }

    /// Take an eviction token in `zone`, whose rate is `rate`.
    fn take(&mut self, zone: &str, rate: f64, now: Instant) -> bool {
        let l = self.limiters.entry(zone.to_string()).or_insert(Limiter {
            rate,
            tokens: 1.0,
            last: None,
        });
        l.rate = rate;
        l.take(now)
    }

    /// One pass: what to do now, and when to look again. `pods` need only hold the pods of
    /// nodes with `NoExecute` taints (see [`Monitor::nodes_to_watch`]).
    pub fn observe(
        &mut self,
        now: Instant,
        wall: DateTime<Utc>,
        nodes: &[Node],
        leases: &HashMap<String, Lease>,
        pods: &[Pod],
    ) -> (Vec<Action>, Instant) {
        let grace = self.cfg.grace_period;
        let mut next = now + self.cfg.monitor_period;
        let mut actions = Vec::new();
        let names: HashSet<&str> = nodes.iter().map(|n| n.metadata.name.as_str()).collect();
        self.health.retain(|n, _| names.contains(n.as_str()));

        let mut stale: HashSet<&str> = HashSet::new();
        for node in nodes {
            let name = node.metadata.name.as_str();
            let seen = format!(
                "{:?}|{:?}",
                leases.get(name).and_then(|l| l.spec.renew_time),
                node.ready_condition().and_then(|c| c.last_heartbeat_time)
            );
            let h = self.health.entry(name.to_string()).or_insert(Health {
                seen: seen.clone(),
                probe: now,
            });
            if h.seen != seen {
                h.seen = seen;
                h.probe = now;
            }
            let deadline = h.probe + grace;
            if now > deadline {
                stale.insert(name);
            } else {
                next = next.min(deadline + Duration::from_millis(1));
            }
        }
        // Zone states (Kubernetes' ComputeZoneState) and their eviction rates.
        let mut zones: HashMap<&str, (usize, usize)> = HashMap::new();
        for node in nodes {
            let z = zones.entry(zone_of(node)).or_default();
            z.0 += 1;
            if stale.contains(node.metadata.name.as_str()) || !node.is_ready() {
                z.1 += 1;
            }
        }
        let states: HashMap<&str, (ZoneState, usize)> = zones
            .iter()
            .map(|(&z, &(total, not_ready))| {
                let st = if not_ready > 0 && not_ready == total {
                    ZoneState::FullDisruption
                } else if not_ready > 2
                    && not_ready as f64 / total as f64 >= self.cfg.unhealthy_zone_threshold
                {
                    ZoneState::PartialDisruption
                } else {
                    ZoneState::Normal
                };
                (z, (st, total))
            })
            .collect();
        let all_full = !states.is_empty()
            && states
                .values()
                .all(|(s, _)| *s == ZoneState::FullDisruption);
        let rates: HashMap<&str, f64> = states
            .iter()
            .map(|(&z, &(st, total))| {
                let r = match st {
                    ZoneState::Normal => self.cfg.eviction_rate,
                    ZoneState::PartialDisruption
                        if total > self.cfg.large_cluster_size_threshold =>
                    {
                        self.cfg.secondary_eviction_rate
                    }
                    ZoneState::PartialDisruption => 0.0,
                    ZoneState::FullDisruption if all_full => 0.0,
                    ZoneState::FullDisruption => self.cfg.eviction_rate,
                };
                (z, r)
            })
            .collect();
        // Halted: a disrupted zone that evicts nothing.
        let halted = |node: &Node| {
            let z = zone_of(node);
            states.get(z).is_some_and(|(s, _)| *s != ZoneState::Normal)
                && rates.get(z).copied().unwrap_or(0.0) <= 0.0
        };
        self.disrupted = nodes
            .iter()
            .any(|n| stale.contains(n.metadata.name.as_str()) && halted(n));

        for node in nodes {
            let name = &node.metadata.name;
            let zone = zone_of(node);
            let rate = rates.get(zone).copied().unwrap_or(0.0);
            let not_ready_reported = node.ready_condition().is_some_and(|c| c.status == "False");
            if stale.contains(name.as_str()) {
                let unknown = node
                    .ready_condition()
                    .map(|c| c.status == "Unknown")
                    .unwrap_or(false);
                let not_ready_taint = node.spec.taints.iter().any(|t| t.key == TAINT_NOT_READY);
                if !unknown || !has_taint(node, TaintEffect::NoSchedule) || not_ready_taint {
                    actions.push(Action::MarkUnknown(name.clone()));
                }
                if !halted(node) && !has_taint(node, TaintEffect::NoExecute) {
                    if self.take(zone, rate, now) {
                        actions.push(Action::TaintNoExecute(name.clone()));
                    } else {
                        next = next.min(now + Duration::from_millis(100));
                    }
                }
            } else if not_ready_reported {
                if !has_taint_key(node, TAINT_NOT_READY, TaintEffect::NoSchedule)
                    || has_taint(node, TaintEffect::NoSchedule)
                    || has_taint(node, TaintEffect::NoExecute)
                {
                    actions.push(Action::MarkNotReady(name.clone()));
                }
                if !halted(node) && !has_taint_key(node, TAINT_NOT_READY, TaintEffect::NoExecute) {
                    if self.take(zone, rate, now) {
                        actions.push(Action::TaintNotReadyNoExecute(name.clone()));
                    } else {
                        next = next.min(now + Duration::from_millis(100));
                    }
                }
            } else if node.is_ready()
                && node
                    .spec
                    .taints
                    .iter()
                    .any(|t| t.key == TAINT_UNREACHABLE || t.key == TAINT_NOT_READY)
            {
                actions.push(Action::Untaint(name.clone()));
            }
        }

        // Pods on nodes with NoExecute taints.
        let by_name: HashMap<&str, &Node> = nodes
            .iter()
            .map(|n| (n.metadata.name.as_str(), n))
            .collect();
        for pod in pods {
            let Some(node) = pod.spec.node_name.as_deref().and_then(|n| by_name.get(n)) else {
                continue;
            };
            let taints: Vec<&Taint> = node
                .spec
                .taints
                .iter()
                .filter(|t| t.effect == TaintEffect::NoExecute)
                .collect();
            if taints.is_empty() {
                continue;
            }
            let (ns, pname) = (pod.ns().to_string(), pod.name().to_string());
            if let Some(del) = pod.metadata.deletion_timestamp {
                // Being deleted: its node stops it, unless the node is unreachable.
                if has_taint(node, TaintEffect::NoExecute)
                    && stale.contains(node.metadata.name.as_str())
                {
                    let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(0);
                    let at = del + chrono::Duration::seconds(grace.max(0));
                    if wall >= at {
                        actions.push(Action::ForceDelete(ns, pname));
                    } else {
                        next = next.min(now + to_std(at - wall));
                    }
                }
                continue;
            }
            if halted(node) || pod.phase().is_terminal() {
                continue;
            }
            let owned: Vec<Taint> = taints.into_iter().cloned().collect();
            let Some(secs) = no_execute_allowance(&owned, &pod.spec.tolerations) else {
                continue;
            };
            let start = owned
                .iter()
                .filter_map(|t| t.time_added)
                .min()
                .unwrap_or(wall);
            let at = start + chrono::Duration::seconds(secs);
            if wall >= at {
                actions.push(Action::Evict(ns, pname, node.metadata.name.clone()));
            } else {
                next = next.min(now + to_std(at - wall));
            }
        }
        (actions, next)
    }
}

fn to_std(d: chrono::Duration) -> Duration {
    d.to_std().unwrap_or_default()
}

/// The controller over the store.
pub struct NodeLifecycle {
    store: Arc<dyn Store>,
    recorder: Recorder,
    monitor: Monitor,
}

impl NodeLifecycle {
    pub fn new(store: Arc<dyn Store>, cfg: LifecycleConfig) -> Self {
        let recorder = Recorder::new(store.clone(), "node-controller", None);
        NodeLifecycle {
            store,
            recorder,
            monitor: Monitor::new(cfg),
        }
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let next = match self.pass().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "node lifecycle pass");
                    Instant::now() + self.monitor.cfg.monitor_period
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    async fn pass(&mut self) -> Result<Instant, StoreError> {
        let (node_objs, _) = self.store.list(Kind::Node, None)?;
        let nodes: Vec<Node> = node_objs
            .iter()
            .filter_map(|v| serde_json::from_value((**v).clone()).ok())
            .collect();
        let (lease_objs, _) = self.store.list(Kind::Lease, Some(NODE_LEASE_NAMESPACE))?;
        let leases: HashMap<String, Lease> = lease_objs
            .iter()
            .filter_map(|v| serde_json::from_value::<Lease>((**v).clone()).ok())
            .map(|l| (l.metadata.name.clone(), l))
            .collect();
        // Only the pods of NoExecute-tainted nodes are decoded.
        let tainted: HashSet<&str> = nodes
            .iter()
            .filter(|n| {
                n.spec
                    .taints
                    .iter()
                    .any(|t| t.effect == TaintEffect::NoExecute)
            })
            .map(|n| n.metadata.name.as_str())
            .collect();
        let pods: Vec<Pod> = if tainted.is_empty() {
            Vec::new()
        } else {
            let (all, _) = self.store.list(Kind::Pod, None)?;
            all.iter()
                .filter(|p| {
                    p["spec"]["nodeName"]
                        .as_str()
                        .is_some_and(|n| tainted.contains(n))
                })
                .filter_map(|p| serde_json::from_value((**p).clone()).ok())
                .collect()
        };
        let was_disrupted = self.monitor.disrupted;
        let (actions, next) =
            self.monitor
                .observe(Instant::now(), Utc::now(), &nodes, &leases, &pods);
        if self.monitor.disrupted != was_disrupted {
            if self.monitor.disrupted {
                tracing::warn!("most nodes are silent: evictions stop until they are back (the control plane is the likely problem)");
            } else {
                tracing::info!("enough nodes are back: evictions resume");
            }
        }
        for a in actions {
            if let Err(e) = self.apply(&a).await {
                tracing::warn!(action = ?a, error = %e, "node lifecycle action");
            }
        }
        Ok(next)
    }

    async fn apply(&self, a: &Action) -> Result<(), StoreError> {
        match a {
            Action::MarkUnknown(n) => {
                self.update_node(n, |node| {
                    let now = Utc::now();
                    let st = node.status.get_or_insert_with(Default::default);
                    let cond = match st.conditions.iter_mut().find(|c| c.type_ == "Ready") {
                        Some(c) => c,
                        None => {
                            st.conditions.push(NodeCondition {
                                type_: "Ready".into(),
                                ..Default::default()
                            });
                            st.conditions.last_mut().expect("just pushed")
                        }
                    };
                    cond.status = "Unknown".into();
                    cond.reason = Some("NodeStatusUnknown".into());
                    cond.message = Some("Kubelet stopped posting node status.".into());
                    node.spec.taints.retain(|t| t.key != TAINT_NOT_READY);
                    add_taint(node, TaintEffect::NoSchedule, now);
                })
                .await?;
                self.recorder.normal(
                    Recorder::obj_ref("Node", &node_meta(n)),
                    "NodeNotReady",
                    format!("Node {n} status is now: NodeNotReady (no heartbeat)"),
                );
            }
            Action::TaintNoExecute(n) => {
                self.update_node(n, |node| {
                    add_taint(node, TaintEffect::NoExecute, Utc::now())
                })
                .await?;
            }
            Action::MarkNotReady(n) => {
                self.update_node(n, |node| {
                    node.spec.taints.retain(|t| t.key != TAINT_UNREACHABLE);
                    add_taint_key(node, TAINT_NOT_READY, TaintEffect::NoSchedule, Utc::now());
                })
                .await?;
                let why = self
                    .store
                    .get(Kind::Node, "", n)?
                    .and_then(|v| {
                        v["status"]["conditions"].as_array().and_then(|cs| {
                            cs.iter()
                                .find(|c| c["type"] == "Ready")
                                .and_then(|c| c["message"].as_str().map(str::to_string))
                        })
                    })
                    .unwrap_or_default();
                self.recorder.normal(
                    Recorder::obj_ref("Node", &node_meta(n)),
                    "NodeNotReady",
                    format!("Node {n} status is now: NodeNotReady ({why})"),
                );
            }
            Action::TaintNotReadyNoExecute(n) => {
                self.update_node(n, |node| {
                    add_taint_key(node, TAINT_NOT_READY, TaintEffect::NoExecute, Utc::now())
                })
                .await?;
            }
            Action::Untaint(n) => {
                self.update_node(n, |node| {
                    node.spec
                        .taints
                        .retain(|t| t.key != TAINT_UNREACHABLE && t.key != TAINT_NOT_READY)
                })
                .await?;
                self.recorder.normal(
                    Recorder::obj_ref("Node", &node_meta(n)),
                    "NodeReady",
                    format!("Node {n} status is now: NodeReady"),
                );
            }
            Action::Evict(ns, name, node) => {
                match crate::api::pods::delete_pod(&*self.store, ns, name, None).await {
                    Ok(_) | Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                let mut meta = node_meta(name);
                meta.namespace = Some(ns.clone());
                self.recorder.normal(
                    Recorder::obj_ref("Pod", &meta),
                    "TaintManagerEviction",
                    format!("Marking for deletion Pod {ns}/{name} (node {node} has a NoExecute taint it does not tolerate)"),
                );
            }
            Action::ForceDelete(ns, name) => {
                if let Some(cur) = self.store.get(Kind::Pod, ns, name)? {
                    match self
                        .store
                        .delete(Kind::Pod, ns, name, object_rv(&cur))
                        .await
                    {
                        Ok(_)
                        | Err(StoreError::NotFound { .. })
                        | Err(StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Read-modify-write a Node, retried on conflicts; unchanged nodes are not written.
    async fn update_node(&self, name: &str, f: impl Fn(&mut Node)) -> Result<(), StoreError> {
        for _ in 0..10 {
            let Some(cur) = self.store.get(Kind::Node, "", name)? else {
                return Ok(());
            };
            let mut node: Node = serde_json::from_value((*cur).clone())
                .map_err(|e| StoreError::Backend(format!("node {name}: {e}")))?;
            let before = node.clone();
            f(&mut node);
            if node == before {
                return Ok(());
            }
            let v: Value =
                serde_json::to_value(&node).map_err(|e| StoreError::Backend(e.to_string()))?;
            match self.store.update(Kind::Node, v).await {
                Err(StoreError::Conflict { .. }) => continue,
                r => return r.map(|_| ()),
            }
        }
        Ok(())
    }
}

fn node_meta(name: &str) -> crate::model::ObjectMeta {
    crate::model::ObjectMeta {
        name: name.to_string(),
        ..Default::default()
    }
}

fn add_taint(node: &mut Node, effect: TaintEffect, now: DateTime<Utc>) {
    add_taint_key(node, TAINT_UNREACHABLE, effect, now)
}

fn add_taint_key(node: &mut Node, key: &str, effect: TaintEffect, now: DateTime<Utc>) {
    if !has_taint_key(node, key, effect) {
        node.spec.taints.push(Taint {
            key: key.into(),
            value: None,
            effect,
            time_added: Some(now),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::node::NodeStatus;
    use crate::model::taint::add_default_tolerations;

    fn node(name: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = name.into();
        n.status = Some(NodeStatus {
            conditions: vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        n
    }

    fn lease(name: &str, at: DateTime<Utc>) -> (String, Lease) {
        let mut l = Lease::for_node(name, 6);
        l.spec.renew_time = Some(at);
        (name.to_string(), l)
    }

    fn pod_on(name: &str, node: &str, toleration: Option<i64>) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = name.into();
        p.metadata.namespace = Some("default".into());
        p.spec.node_name = Some(node.into());
        if let Some(s) = toleration {
            add_default_tolerations(&mut p.spec.tolerations, s);
        }
        p
    }

    /// Apply the node-level actions the way the controller would.
    fn apply(nodes: &mut [Node], actions: &[Action], wall: DateTime<Utc>) {
        for a in actions {
            match a {
                Action::MarkUnknown(n) => {
                    let node = nodes.iter_mut().find(|x| &x.metadata.name == n).unwrap();
                    node.status.as_mut().unwrap().conditions[0].status = "Unknown".into();
                    add_taint(node, TaintEffect::NoSchedule, wall);
                }
                Action::TaintNoExecute(n) => {
                    let node = nodes.iter_mut().find(|x| &x.metadata.name == n).unwrap();
                    add_taint(node, TaintEffect::NoExecute, wall);
                }
                Action::Untaint(n) => {
                    let node = nodes.iter_mut().find(|x| &x.metadata.name == n).unwrap();
                    node.spec.taints.clear();
                }
                Action::MarkNotReady(n) => {
                    let node = nodes.iter_mut().find(|x| &x.metadata.name == n).unwrap();
                    node.spec.taints.retain(|t| t.key != TAINT_UNREACHABLE);
                    add_taint_key(node, TAINT_NOT_READY, TaintEffect::NoSchedule, wall);
                }
                Action::TaintNotReadyNoExecute(n) => {
                    let node = nodes.iter_mut().find(|x| &x.metadata.name == n).unwrap();
                    add_taint_key(node, TAINT_NOT_READY, TaintEffect::NoExecute, wall);
                }
                _ => {}
            }
        }
    }

    /// A hand-driven clock: the monitor's decisions depend only on the times it is given,
    /// so the tests step time explicitly (no sleeping, nothing flaky).
    struct Clock {
        start: Instant,
        now: Instant,
        wall0: DateTime<Utc>,
    }

    impl Clock {
        fn new() -> Self {
            let now = Instant::now();
            Clock {
                start: now,
                now,
                wall0: Utc::now(),
            }
        }
        fn advance(&mut self, d: Duration) {
            self.now += d;
        }
        fn elapsed(&self) -> Duration {
            self.now - self.start
        }
        fn wall(&self) -> DateTime<Utc> {
            self.wall0 + chrono::Duration::from_std(self.elapsed()).unwrap()
        }
    }

    #[test]
    fn a_silent_node_is_marked_tainted_and_its_pods_evicted_after_their_toleration() {
        let mut m = Monitor::new(LifecycleConfig::default());
        let mut clock = Clock::new();
        let t0 = clock.wall();
        let mut nodes = vec![node("a"), node("b"), node("c")];
        let pods = vec![
            pod_on("p1", "a", Some(2)),
            pod_on("p2", "a", None),
            pod_on("p3", "b", Some(2)),
        ];
        // a stops renewing at t0; b and c renew every 2 s.
        let mut acted_at: HashMap<String, Duration> = HashMap::new();
        while clock.elapsed() < Duration::from_secs(12) {
            let beat = t0 + chrono::Duration::seconds(clock.elapsed().as_secs() as i64 / 2 * 2);
            let leases: HashMap<String, Lease> =
                [lease("a", t0), lease("b", beat), lease("c", beat)]
                    .into_iter()
                    .collect();
            let (acts, next) = m.observe(clock.now, clock.wall(), &nodes, &leases, &pods);
            for a in &acts {
                let key = match a {
                    Action::Evict(_, p, _) => format!("evict {p}"),
                    other => format!("{other:?}"),
                };
                acted_at.entry(key).or_insert(clock.elapsed());
            }
            apply(&mut nodes, &acts, clock.wall());
            assert!(next > clock.now, "the monitor always looks again later");
            // Wake when the monitor asks, or at the latest at the next renewal.
            let step = (next - clock.now).min(Duration::from_millis(250));
            clock.advance(step);
        }
        let at = |k: &str| {
            acted_at
                .get(k)
                .copied()
                .unwrap_or_else(|| panic!("no {k}: {acted_at:?}"))
        };
        // Marked right after the grace period (6 s), not before.
        let marked = at("MarkUnknown(\"a\")");
        assert!(
            marked > Duration::from_secs(6) && marked < Duration::from_millis(6100),
            "{marked:?}"
        );
        assert_eq!(at("TaintNoExecute(\"a\")"), marked);
        // The pod without tolerations goes with the next look; the one with 2 s, 2 s after
        // the taint.
        let p2 = at("evict p2");
        assert!(
            p2 > marked && p2 < marked + Duration::from_millis(300),
            "{p2:?}"
        );
        let p1 = at("evict p1");
        assert!(
            p1 >= marked + Duration::from_secs(2) && p1 < marked + Duration::from_millis(2100),
            "{p1:?} vs {marked:?}"
        );
        // Nothing happened to the live nodes.
        assert!(
            !acted_at
                .keys()
                .any(|k| k.contains("\"b\"") || k.contains("\"c\"") || k == "evict p3"),
            "{acted_at:?}"
        );
    }

    #[test]
    fn a_pause_shorter_than_the_grace_period_changes_nothing() {
        let mut m = Monitor::new(LifecycleConfig::default());
        let mut clock = Clock::new();
        let t0 = clock.wall();
        let nodes = vec![node("a"), node("b")];
        let pods = vec![pod_on("p", "a", Some(2))];
        // a renewed just before a pause (SIGSTOP) of 3 s plus a 2 s renew interval.
        let leases: HashMap<String, Lease> = [lease("a", t0), lease("b", t0)].into_iter().collect();
        for _ in 0..50 {
            let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &leases, &pods);
            assert!(acts.is_empty(), "{acts:?}");
            clock.advance(Duration::from_millis(100));
        }
        let later = t0 + chrono::Duration::seconds(5);
        let leases: HashMap<String, Lease> =
            [lease("a", later), lease("b", later)].into_iter().collect();
        for _ in 0..50 {
            let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &leases, &pods);
            assert!(acts.is_empty(), "{acts:?}");
            clock.advance(Duration::from_millis(100));
        }
    }

    #[test]
    fn a_fresh_controller_gives_every_node_a_full_grace_period() {
        // The heartbeats are old (the control plane was down for a minute), but this
        // controller has only just started: nothing happens before a whole grace period.
        let mut clock = Clock::new();
        let old = clock.wall() - chrono::Duration::seconds(60);
        let nodes = vec![node("a")];
        let leases: HashMap<String, Lease> = [lease("a", old)].into_iter().collect();
        let mut m = Monitor::new(LifecycleConfig::default());
        let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &leases, &[]);
        assert!(acts.is_empty(), "{acts:?}");
        clock.advance(Duration::from_secs(5));
        let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &leases, &[]);
        assert!(acts.is_empty(), "{acts:?}");
        // Still silent after the grace period: now it is marked.
        clock.advance(Duration::from_secs(2));
        let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &leases, &[]);
        assert!(acts.contains(&Action::MarkUnknown("a".into())), "{acts:?}");
    }

    #[test]
    fn most_nodes_silent_means_no_eviction_and_taints_are_rate_limited() {
        let cfg = LifecycleConfig {
            eviction_rate: 1.0,
            ..Default::default()
        };
        let mut clock = Clock::new();
        let t0 = clock.wall();
        let names: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
        let nodes: Vec<Node> = names.iter().map(|n| node(n)).collect();
        let pods: Vec<Pod> = names
            .iter()
            .map(|n| pod_on(&format!("p-{n}"), n, None))
            .collect();
        let leases: HashMap<String, Lease> = names.iter().map(|n| lease(n, t0)).collect();
        // All ten go silent at once: marked Unknown, but no NoExecute taint, no eviction.
        let mut m = Monitor::new(cfg.clone());
        m.observe(clock.now, clock.wall(), &nodes, &leases, &pods);
        clock.advance(Duration::from_secs(7));
        let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &leases, &pods);
        assert!(m.disrupted);
        assert_eq!(
            acts.iter()
                .filter(|a| matches!(a, Action::MarkUnknown(_)))
                .count(),
            10
        );
        assert!(
            !acts
                .iter()
                .any(|a| matches!(a, Action::TaintNoExecute(_) | Action::Evict(..))),
            "{acts:?}"
        );

        // Four of ten silent (under 0.55): tainted NoExecute one node per second.
        let mut m = Monitor::new(cfg);
        let mut clock = Clock::new();
        m.observe(clock.now, clock.wall(), &nodes, &leases, &pods);
        clock.advance(Duration::from_secs(7));
        for i in 0..4 {
            let renewed = t0 + chrono::Duration::seconds(7 + i);
            let live: HashMap<String, Lease> = names
                .iter()
                .enumerate()
                .map(|(j, n)| lease(n, if j < 4 { t0 } else { renewed }))
                .collect();
            let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &live, &[]);
            assert!(!m.disrupted);
            let n = acts
                .iter()
                .filter(|a| matches!(a, Action::TaintNoExecute(_)))
                .count();
            assert_eq!(n, 1, "one node per second at rate 1: {acts:?}");
            // Half a second later: no token yet.
            clock.advance(Duration::from_millis(500));
            let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &live, &[]);
            assert!(
                !acts.iter().any(|a| matches!(a, Action::TaintNoExecute(_))),
                "{acts:?}"
            );
            clock.advance(Duration::from_millis(500));
        }
    }

    /// `silent` of `total` nodes (in one zone) stop renewing; what is tainted NoExecute?
    fn no_execute_after_silence(total: usize, silent: usize) -> (bool, usize) {
        let cfg = LifecycleConfig {
            eviction_rate: 1000.0,
            ..Default::default()
        };
        let mut clock = Clock::new();
        let t0 = clock.wall();
        let names: Vec<String> = (0..total).map(|i| format!("n{i}")).collect();
        let mut nodes: Vec<Node> = names.iter().map(|n| node(n)).collect();
        let mut m = Monitor::new(cfg);
        let first: HashMap<String, Lease> = names.iter().map(|n| lease(n, t0)).collect();
        m.observe(clock.now, clock.wall(), &nodes, &first, &[]);
        clock.advance(Duration::from_secs(7));
        // The live ones renewed; the silent ones did not.
        let later = clock.wall();
        let leases: HashMap<String, Lease> = names
            .iter()
            .enumerate()
            .map(|(i, n)| lease(n, if i < silent { t0 } else { later }))
            .collect();
        // A few looks a little apart (a fast limiter refills in between).
        let mut tainted = 0;
        for _ in 0..10 {
            let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &leases, &[]);
            tainted += acts
                .iter()
                .filter(|a| matches!(a, Action::TaintNoExecute(_)))
                .count();
            apply(&mut nodes, &acts, clock.wall());
            clock.advance(Duration::from_millis(10));
        }
        (m.disrupted, tainted)
    }

    #[test]
    fn zone_disruption_follows_kubernetes_small_and_large_cluster_rules() {
        // Small clusters: 1 or 2 of 3 dead are evicted (never more than 2 not ready: normal).
        assert_eq!(no_execute_after_silence(3, 1), (false, 1));
        assert_eq!(no_execute_after_silence(3, 2), (false, 2));
        // All silent: full disruption everywhere, nothing evicted.
        assert_eq!(no_execute_after_silence(3, 3), (true, 0));
        // 6 of 10 (≥ 0.55, more than 2): partial disruption of a small zone, nothing.
        assert_eq!(no_execute_after_silence(10, 6), (true, 0));
        // 5 of 10 (under 0.55): normal.
        assert_eq!(no_execute_after_silence(10, 5), (false, 5));
        // A large zone (over 50 nodes) partially disrupted evicts at the secondary rate
        // (0.01/s: the first token only).
        assert_eq!(no_execute_after_silence(60, 40), (false, 1));
    }

    #[test]
    fn a_node_reporting_not_ready_is_tainted_and_untainted() {
        let mut m = Monitor::new(LifecycleConfig::default());
        let clock = Clock::new();
        let mut nodes = vec![node("a"), node("b")];
        {
            let c = &mut nodes[0].status.as_mut().unwrap().conditions[0];
            c.status = "False".into();
            c.message = Some("data directory not writable".into());
        }
        let leases: HashMap<String, Lease> = [lease("a", clock.wall()), lease("b", clock.wall())]
            .into_iter()
            .collect();
        let pods = vec![pod_on("p", "a", Some(0)), pod_on("q", "b", Some(0))];
        let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &leases, &pods);
        assert_eq!(
            acts,
            vec![
                Action::MarkNotReady("a".into()),
                Action::TaintNotReadyNoExecute("a".into())
            ]
        );
        apply(&mut nodes, &acts, clock.wall());
        // Its pods go (toleration 0 s); b's stay.
        let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &leases, &pods);
        assert_eq!(
            acts,
            vec![Action::Evict("default".into(), "p".into(), "a".into())]
        );
        // Ready again: untainted.
        nodes[0].status.as_mut().unwrap().conditions[0].status = "True".into();
        let (acts, _) = m.observe(clock.now, clock.wall(), &nodes, &leases, &[]);
        assert_eq!(acts, vec![Action::Untaint("a".into())]);
    }

    #[test]
    fn a_node_back_and_ready_is_untainted() {
        let mut m = Monitor::new(LifecycleConfig::default());
        let clock = Clock::new();
        let mut n = node("a");
        add_taint(&mut n, TaintEffect::NoSchedule, clock.wall());
        add_taint(&mut n, TaintEffect::NoExecute, clock.wall());
        let leases: HashMap<String, Lease> = [lease("a", clock.wall())].into_iter().collect();
        let (acts, _) = m.observe(clock.now, clock.wall(), &[n.clone()], &leases, &[]);
        assert_eq!(acts, vec![Action::Untaint("a".into())]);
        // Back but still Unknown (its agent has not posted yet): stays tainted.
        n.status.as_mut().unwrap().conditions[0].status = "Unknown".into();
        let (acts, _) = m.observe(clock.now, clock.wall(), &[n], &leases, &[]);
        assert!(acts.is_empty(), "{acts:?}");
    }
}
