//! The scheduler: binds Pending pods to nodes. It watches pods and nodes, keeps what each node
//! already holds (including pods it has just assumed but whose binding is still being written),
//! runs every unbound pod through the filter/score pipeline, and binds the best node by writing
//! `spec.nodeName`. A pod that fits nowhere stays Pending with a `FailedScheduling` event and a
//! `PodScheduled=False` condition saying why, and is retried when nodes or pods change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::plugins::{default_filters, default_scores, Filter, NodeInfo, Requests, Score};
use crate::events::Recorder;
use crate::model::pod::{PodCondition, PodStatus};
use crate::model::{Kind, Node, Pod};
use crate::store::{EventType, Store, StoreError, WatchEvent, WatchFrom};

pub struct Scheduler {
    store: Arc<dyn Store>,
    recorder: Recorder,
    filters: Vec<Box<dyn Filter>>,
    scores: Vec<Box<dyn Score>>,
}

/// Pods holding resources on a node: uid → (node, requests).
type Placed = HashMap<String, (String, Requests)>;

enum BindResult {
    Bound {
        uid: String,
    },
    /// Lost the race (pod changed or gone): forget the assumption; the watch will tell.
    Failed {
        uid: String,
    },
}

impl Scheduler {
    pub fn new(store: Arc<dyn Store>) -> Self {
        let recorder = Recorder::new(store.clone(), "default-scheduler", None);
        Scheduler {
            store,
            recorder,
            filters: default_filters(),
            scores: default_scores(),
        }
    }

    pub async fn run(self, cancel: CancellationToken) {
        let this = Arc::new(self);
        loop {
            if cancel.is_cancelled() {
                return;
            }
            match this.clone().run_once(cancel.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler restarting its watches");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn run_once(self: Arc<Self>, cancel: CancellationToken) -> Result<(), String> {
        let mut pw = self
            .store
            .watch(Kind::Pod, None, WatchFrom::Current)
            .map_err(|e| e.to_string())?;
        let mut nw = self
            .store
            .watch(Kind::Node, None, WatchFrom::Current)
            .map_err(|e| e.to_string())?;
        let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
        let mut placed: Placed = HashMap::new();
        // Unbound pods waiting for a node: (ns, name) → pod.
        let mut queue: BTreeMap<(String, String), Pod> = BTreeMap::new();
        // Last FailedScheduling message per pod uid (to avoid repeating events).
        let mut unschedulable: HashMap<String, String> = HashMap::new();
        // Binds being written.
        let mut in_flight: BTreeSet<String> = BTreeSet::new();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<BindResult>();

        for ev in std::mem::take(&mut nw.initial) {
            on_node(&mut nodes, &ev);
        }
        for ev in std::mem::take(&mut pw.initial) {
            on_pod(&mut placed, &mut queue, &in_flight, &ev);
        }
        let mut retry = tokio::time::interval(Duration::from_secs(2));
        let mut dirty = true;
        loop {
            if dirty {
                self.schedule(
                    &nodes,
                    &mut placed,
                    &mut queue,
                    &mut unschedulable,
                    &mut in_flight,
                    &done_tx,
                );
                dirty = false;
            }
            tokio::select! {
                ev = pw.live.recv() => match ev {
                    Ok(ev) => {
                        if pw.wants(&ev) {
                            on_pod(&mut placed, &mut queue, &in_flight, &ev);
                        }
                        // Drain what is already there before the next pass.
                        while let Ok(ev) = pw.live.try_recv() {
                            if pw.wants(&ev) { on_pod(&mut placed, &mut queue, &in_flight, &ev); }
                        }
                        dirty = true;
                    }
                    Err(RecvError::Lagged(_)) => return Err("pod watch lagged".into()),
                    Err(RecvError::Closed) => return Ok(()),
                },
                ev = nw.live.recv() => match ev {
                    Ok(ev) => { if nw.wants(&ev) { on_node(&mut nodes, &ev); dirty = true; } }
                    Err(RecvError::Lagged(_)) => return Err("node watch lagged".into()),
                    Err(RecvError::Closed) => return Ok(()),
                },
                Some(r) = done_rx.recv() => {
                    match r {
                        BindResult::Bound { uid } => { in_flight.remove(&uid); }
                        BindResult::Failed { uid } => {
                            placed.remove(&uid);
                            in_flight.remove(&uid);
                            dirty = true;
                        }
                    }
                }
                _ = retry.tick() => { if !queue.is_empty() { dirty = true; } }
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }

    fn node_infos(&self, nodes: &BTreeMap<String, Node>, placed: &Placed) -> Vec<NodeInfo> {
        let mut infos: BTreeMap<&str, NodeInfo> = nodes
            .iter()
            .map(|(n, node)| {
                (
                    n.as_str(),
                    NodeInfo {
                        node: node.clone(),
                        requested: Requests::default(),
                        pods: 0,
                    },
                )
            })
            .collect();
        for (node, req) in placed.values() {
            if let Some(i) = infos.get_mut(node.as_str()) {
                i.requested.cpu_millis += req.cpu_millis;
                i.requested.memory_bytes += req.memory_bytes;
                i.pods += 1;
            }
        }
        infos.into_values().collect()
    }

    fn schedule(
        self: &Arc<Self>,
        nodes: &BTreeMap<String, Node>,
        placed: &mut Placed,
        queue: &mut BTreeMap<(String, String), Pod>,
        unschedulable: &mut HashMap<String, String>,
        in_flight: &mut BTreeSet<String>,
        done: &mpsc::UnboundedSender<BindResult>,
    ) {
        if queue.is_empty() {
            return;
        }
        let mut infos = self.node_infos(nodes, placed);
        let keys: Vec<(String, String)> = queue.keys().cloned().collect();
        for key in keys {
            let pod = queue.get(&key).cloned().expect("queued");
            let uid = pod.uid().to_string();
            if in_flight.contains(&uid) {
                continue;
            }
            let req = Requests::of(&pod);
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            let mut best: Option<(i64, usize)> = None;
            for (i, info) in infos.iter().enumerate() {
                let failed = self
                    .filters
                    .iter()
                    .find_map(|f| f.filter(&pod, &req, info).err());
                match failed {
                    Some(reason) => *reasons.entry(reason).or_default() += 1,
                    None => {
                        let s: i64 = self.scores.iter().map(|s| s.score(&pod, &req, info)).sum();
                        if best.map(|(b, _)| s > b).unwrap_or(true) {
                            best = Some((s, i));
                        }
                    }
                }
            }
            match best {
                Some((_, i)) => {
                    let info = &mut infos[i];
                    info.requested.cpu_millis += req.cpu_millis;
                    info.requested.memory_bytes += req.memory_bytes;
                    info.pods += 1;
                    let node = info.node.metadata.name.clone();
                    placed.insert(uid.clone(), (node.clone(), req));
                    in_flight.insert(uid.clone());
                    queue.remove(&key);
                    unschedulable.remove(&uid);
                    let this = self.clone();
                    let done = done.clone();
                    tokio::spawn(async move {
                        let r = match this.bind(&pod, &node).await {
                            Ok(true) => {
                                this.recorder.normal(
                                    Recorder::pod_ref(&pod),
                                    "Scheduled",
                                    format!("Successfully assigned {} to {node}", pod.key()),
                                );
                                BindResult::Bound {
                                    uid: pod.uid().to_string(),
                                }
                            }
                            Ok(false) => BindResult::Failed {
                                uid: pod.uid().to_string(),
                            },
                            Err(e) => {
                                tracing::warn!(error = %e, pod = %pod.key(), "bind failed");
                                BindResult::Failed {
                                    uid: pod.uid().to_string(),
                                }
                            }
                        };
                        let _ = done.send(r);
                    });
                }
                None => {
                    let detail: Vec<String> =
                        reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
                    let msg = format!(
                        "0/{} nodes are available{}{}.",
                        infos.len(),
                        if detail.is_empty() { "" } else { ": " },
                        detail.join(", ")
                    );
                    if unschedulable.get(&uid) != Some(&msg) {
                        unschedulable.insert(uid.clone(), msg.clone());
                        self.recorder.warning(
                            Recorder::pod_ref(&pod),
                            "FailedScheduling",
                            msg.clone(),
                        );
                        let this = self.clone();
                        tokio::spawn(async move { this.mark_unschedulable(&pod, &msg).await });
                    }
                }
            }
        }
    }

    /// Write `spec.nodeName`. Ok(false): the pod changed under us (deleted, bound elsewhere).
    async fn bind(&self, pod: &Pod, node: &str) -> Result<bool, StoreError> {
        for _ in 0..10 {
            let Some(cur) = self.store.get(Kind::Pod, pod.ns(), pod.name())? else {
                return Ok(false);
            };
            let mut cur: Pod = serde_json::from_value((*cur).clone())
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            if cur.uid() != pod.uid()
                || cur.spec.node_name.is_some()
                || cur.metadata.deletion_timestamp.is_some()
            {
                return Ok(false);
            }
            cur.spec.node_name = Some(node.to_string());
            let st = cur.status.get_or_insert_with(PodStatus::default);
            set_condition(st, "PodScheduled", "True", None, None);
            match self
                .store
                .update(Kind::Pod, serde_json::to_value(&cur).unwrap())
                .await
            {
                Ok(_) => return Ok(true),
                Err(StoreError::Conflict { .. }) => continue,
                Err(StoreError::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    async fn mark_unschedulable(&self, pod: &Pod, msg: &str) {
        for _ in 0..5 {
            let Ok(Some(cur)) = self.store.get(Kind::Pod, pod.ns(), pod.name()) else {
                return;
            };
            let Ok(mut cur) = serde_json::from_value::<Pod>((*cur).clone()) else {
                return;
            };
            if cur.uid() != pod.uid() || cur.spec.node_name.is_some() {
                return;
            }
            let st = cur.status.get_or_insert_with(PodStatus::default);
            set_condition(
                st,
                "PodScheduled",
                "False",
                Some("Unschedulable"),
                Some(msg),
            );
            match self
                .store
                .update(Kind::Pod, serde_json::to_value(&cur).unwrap())
                .await
            {
                Err(StoreError::Conflict { .. }) => continue,
                _ => return,
            }
        }
    }
}

fn set_condition(
    st: &mut PodStatus,
    type_: &str,
    status: &str,
    reason: Option<&str>,
    msg: Option<&str>,
) {
    let c = PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.map(str::to_string),
        message: msg.map(str::to_string),
        last_transition_time: Some(Utc::now()),
    };
    match st.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(old) => *old = c,
        None => st.conditions.push(c),
    }
}

fn on_node(nodes: &mut BTreeMap<String, Node>, ev: &WatchEvent) {
    let Ok(node) = serde_json::from_value::<Node>((*ev.object).clone()) else {
        return;
    };
    if ev.type_ == EventType::Deleted {
        nodes.remove(&node.metadata.name);
    } else {
        nodes.insert(node.metadata.name.clone(), node);
    }
}

fn on_pod(
    placed: &mut Placed,
    queue: &mut BTreeMap<(String, String), Pod>,
    in_flight: &BTreeSet<String>,
    ev: &WatchEvent,
) {
    let Ok(pod) = serde_json::from_value::<Pod>((*ev.object).clone()) else {
        return;
    };
    let uid = pod.uid().to_string();
    let key = (pod.ns().to_string(), pod.name().to_string());
    let gone = ev.type_ == EventType::Deleted;
    match &pod.spec.node_name {
        Some(node) => {
            queue.remove(&key);
            if gone || pod.phase().is_terminal() {
                placed.remove(&uid);
            } else {
                placed.insert(uid, (node.clone(), Requests::of(&pod)));
            }
        }
        None => {
            if gone || pod.metadata.deletion_timestamp.is_some() {
                queue.remove(&key);
                if !in_flight.contains(&uid) {
                    placed.remove(&uid);
                }
            } else if !in_flight.contains(&uid) {
                queue.insert(key, pod);
            }
        }
    }
}
