//! The scheduler: binds Pending pods to nodes. It watches pods and nodes, keeps what each node
//! already holds (including pods it has just assumed but whose binding is still being written),
//! runs every unbound pod through the filter/score pipeline, and binds the best node by writing
//! `spec.nodeName`. A pod that fits nowhere stays Pending with a `FailedScheduling` event and a
//! `PodScheduled=False` condition saying why, and is retried when a node changes or resources
//! are freed (and every 30 s). What it recorded survives a re-list of its watches and a server
//! restart (it is read back from the pods' conditions), and nothing is written again unless it
//! changed: thousands of pending pods cost nothing while nothing changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::plugins::{default_filters, default_scores, Filter, NodeInfo, Requests, Score};
use super::spread::{self, Counts, PlacedPod};
use crate::events::Recorder;
use crate::model::pod::{PodCondition, PodStatus};
use crate::model::{Kind, Node, Pod};
use crate::store::{EventType, Store, StoreError, WatchEvent, WatchFrom};

pub struct Scheduler {
    store: Arc<dyn Store>,
    recorder: Recorder,
    filters: Vec<Box<dyn Filter>>,
    scores: Vec<Box<dyn Score>>,
    /// Bounds the `PodScheduled=False` status writes in flight.
    status_writes: Arc<Semaphore>,
}

/// Status writes in flight at once.
const STATUS_WRITES: usize = 64;
/// Pods that fit nowhere are tried again when a node changes or resources are freed, at most
/// this often (a burst of deletions costs one pass, not one per deletion)...
const RETRY_ALL_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// ...and, whatever happens, this often.
const RETRY_ALL_INTERVAL: Duration = Duration::from_secs(30);

/// Pods holding resources on a node, by uid (with their labels, which spread constraints and
/// anti-affinity count).
type Placed = HashMap<String, PlacedPod>;

type PodKey = (String, String);

/// What the scheduler remembers across re-lists: a lagged watch restarts the lists, and the
/// scheduler must not then record again, for every pending pod, what it already recorded.
#[derive(Default)]
struct Memory {
    /// The `PodScheduled=False` message recorded per pending pod uid (seeded from the pods'
    /// stored conditions, so a restarted server does not rewrite them either).
    unschedulable: HashMap<String, String>,
}

/// The state of one run over one pair of watches.
#[derive(Default)]
struct Cycle {
    nodes: BTreeMap<String, Arc<Node>>,
    placed: Placed,
    /// Unbound pods waiting for a node.
    queue: BTreeMap<PodKey, Pod>,
    /// Queued pods to try at the next pass: new ones and changed ones. Pods already found to
    /// fit nowhere wait until a node changes or resources are freed (`retry_all`).
    active: BTreeSet<PodKey>,
    /// Binds being written (uids).
    in_flight: BTreeSet<String>,
    /// Something changed that may let an unschedulable pod fit.
    retry_all: bool,
}

enum BindResult {
    Bound {
        uid: String,
    },
    /// Lost the race (pod changed or gone): forget the assumption and look at the pod again.
    Failed {
        uid: String,
        key: PodKey,
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
            status_writes: Arc::new(Semaphore::new(STATUS_WRITES)),
        }
    }

    pub async fn run(self, cancel: CancellationToken) {
        let this = Arc::new(self);
        let mut memory = Memory::default();
        loop {
            if cancel.is_cancelled() {
                return;
            }
            match this.clone().run_once(&mut memory, cancel.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler restarting its watches");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = cancel.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn run_once(
        self: Arc<Self>,
        memory: &mut Memory,
        cancel: CancellationToken,
    ) -> Result<(), String> {
        let mut pw = self
            .store
            .watch(Kind::Pod, None, WatchFrom::Current)
            .map_err(|e| e.to_string())?;
        let mut nw = self
            .store
            .watch(Kind::Node, None, WatchFrom::Current)
            .map_err(|e| e.to_string())?;
        let mut c = Cycle::default();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<BindResult>();

        for ev in std::mem::take(&mut nw.initial) {
            on_node(&mut c, &ev);
        }
        for ev in std::mem::take(&mut pw.initial) {
            on_pod(&mut c, memory, &ev);
        }
        // Forget pods that are no longer pending (deleted or bound while the watch was down).
        let pending: HashSet<&str> = c.queue.values().map(|p| p.uid()).collect();
        memory
            .unschedulable
            .retain(|uid, _| pending.contains(uid.as_str()));
        // Every queued pod gets one pass now; unschedulable ones only write what changed.
        c.active = c.queue.keys().cloned().collect();
        c.retry_all = false;
        let mut last_retry_all = Instant::now();
        let mut tick = tokio::time::interval(RETRY_ALL_MIN_INTERVAL);
        loop {
            let since = last_retry_all.elapsed();
            if (c.retry_all && since >= RETRY_ALL_MIN_INTERVAL) || since >= RETRY_ALL_INTERVAL {
                c.active = c.queue.keys().cloned().collect();
                c.retry_all = false;
                last_retry_all = Instant::now();
            }
            if !c.active.is_empty() {
                self.schedule(&mut c, memory, &done_tx);
            }
            tokio::select! {
                ev = pw.live.recv() => match ev {
                    Ok(ev) => {
                        if pw.wants(&ev) {
                            on_pod(&mut c, memory, &ev);
                        }
                        // Drain what is already there before the next pass.
                        loop {
                            match pw.live.try_recv() {
                                Ok(ev) => if pw.wants(&ev) { on_pod(&mut c, memory, &ev) },
                                Err(TryRecvError::Lagged(_)) => return Err("pod watch lagged".into()),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(RecvError::Lagged(_)) => return Err("pod watch lagged".into()),
                    Err(RecvError::Closed) => return Ok(()),
                },
                ev = nw.live.recv() => match ev {
                    Ok(ev) => { if nw.wants(&ev) { on_node(&mut c, &ev); } }
                    Err(RecvError::Lagged(_)) => return Err("node watch lagged".into()),
                    Err(RecvError::Closed) => return Ok(()),
                },
                Some(r) = done_rx.recv() => {
                    match r {
                        BindResult::Bound { uid } => { c.in_flight.remove(&uid); }
                        BindResult::Failed { uid, key } => {
                            c.placed.remove(&uid);
                            c.in_flight.remove(&uid);
                            // The watch may have shown the pod's new state while the bind was
                            // in flight (and it was ignored then): look at it again.
                            if let Ok(Some(obj)) = self.store.get(Kind::Pod, &key.0, &key.1) {
                                let ev = WatchEvent {
                                    type_: EventType::Modified,
                                    kind: Kind::Pod,
                                    rv: 0,
                                    object: obj,
                                };
                                on_pod(&mut c, memory, &ev);
                            }
                        }
                    }
                }
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }

    fn node_infos(&self, nodes: &BTreeMap<String, Arc<Node>>, placed: &Placed) -> Vec<NodeInfo> {
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
        for p in placed.values() {
            if let Some(i) = infos.get_mut(p.node.as_str()) {
                i.requested.cpu_millis += p.req.cpu_millis;
                i.requested.memory_bytes += p.req.memory_bytes;
                i.pods += 1;
            }
        }
        infos.into_values().collect()
    }

    /// One pass over the active pods: bind each to the best node, or record why it fits nowhere
    /// (only when that differs from what was recorded last).
    fn schedule(
        self: &Arc<Self>,
        c: &mut Cycle,
        memory: &mut Memory,
        done: &mpsc::UnboundedSender<BindResult>,
    ) {
        let active = std::mem::take(&mut c.active);
        let mut infos = self.node_infos(&c.nodes, &c.placed);
        // Pods matching each spread/anti-affinity selector per node, counted once per pass
        // and kept current as this pass binds.
        let mut counts = Counts::default();
        for key in active {
            let Some(pod) = c.queue.get(&key) else {
                continue;
            };
            let uid = pod.uid().to_string();
            if c.in_flight.contains(&uid) {
                continue;
            }
            let req = Requests::of(pod);
            let plan =
                spread::has_rules(pod).then(|| spread::plan(pod, &infos, &c.placed, &mut counts));
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            let mut best: Option<(i64, usize)> = None;
            for (i, info) in infos.iter().enumerate() {
                let failed = self
                    .filters
                    .iter()
                    .find_map(|f| f.filter(pod, &req, info).err())
                    .or_else(|| plan.as_ref().and_then(|p| p.refused[i]).map(str::to_string));
                match failed {
                    Some(reason) => *reasons.entry(reason).or_default() += 1,
                    None => {
                        let s: i64 = self
                            .scores
                            .iter()
                            .map(|s| s.score(pod, &req, info))
                            .sum::<i64>()
                            + plan.as_ref().map(|p| p.score[i]).unwrap_or(0);
                        if best.map(|(b, _)| s > b).unwrap_or(true) {
                            best = Some((s, i));
                        }
                    }
                }
            }
            match best {
                Some((_, i)) => {
                    let pod = c.queue.remove(&key).expect("queued");
                    let info = &mut infos[i];
                    info.requested.cpu_millis += req.cpu_millis;
                    info.requested.memory_bytes += req.memory_bytes;
                    info.pods += 1;
                    let node = info.node.metadata.name.clone();
                    counts.on_bind(pod.ns(), &pod.metadata.labels, &node);
                    c.placed.insert(uid.clone(), PlacedPod::of(&pod, &node));
                    c.in_flight.insert(uid.clone());
                    memory.unschedulable.remove(&uid);
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
                                key,
                            },
                            Err(e) => {
                                tracing::warn!(error = %e, pod = %pod.key(), "bind failed");
                                BindResult::Failed {
                                    uid: pod.uid().to_string(),
                                    key,
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
                    if memory.unschedulable.get(&uid) == Some(&msg) {
                        continue;
                    }
                    memory.unschedulable.insert(uid.clone(), msg.clone());
                    // One FailedScheduling event per pod, its count and message updated.
                    self.recorder.warning_latest(
                        Recorder::pod_ref(pod),
                        "FailedScheduling",
                        msg.clone(),
                    );
                    let this = self.clone();
                    let (ns, name) = key;
                    tokio::spawn(async move {
                        let Ok(_permit) = this.status_writes.clone().acquire_owned().await else {
                            return;
                        };
                        this.mark_unschedulable(&ns, &name, &uid, &msg).await
                    });
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

    /// Record `PodScheduled=False` with `msg`, unless the pod already says exactly that.
    async fn mark_unschedulable(&self, ns: &str, name: &str, uid: &str, msg: &str) {
        for _ in 0..5 {
            let Ok(Some(cur)) = self.store.get(Kind::Pod, ns, name) else {
                return;
            };
            if cur["metadata"]["uid"].as_str() != Some(uid)
                || !cur["spec"]["nodeName"].is_null()
                || !cur["metadata"]["deletionTimestamp"].is_null()
            {
                return;
            }
            let Ok(mut cur) = serde_json::from_value::<Pod>((*cur).clone()) else {
                return;
            };
            if recorded_unschedulable(&cur).as_deref() == Some(msg) {
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

/// The message of a pod's `PodScheduled=False`/`Unschedulable` condition, if it has one.
fn recorded_unschedulable(pod: &Pod) -> Option<String> {
    let c = pod
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled")?;
    (c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
        .then(|| c.message.clone().unwrap_or_default())
}

fn set_condition(
    st: &mut PodStatus,
    type_: &str,
    status: &str,
    reason: Option<&str>,
    msg: Option<&str>,
) {
    let mut c = PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.map(str::to_string),
        message: msg.map(str::to_string),
        last_transition_time: Some(Utc::now()),
    };
    match st.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(old) => {
            // The transition time moves only when the status does.
            if old.status == c.status {
                c.last_transition_time = old.last_transition_time.or(c.last_transition_time);
            }
            *old = c
        }
        None => st.conditions.push(c),
    }
}

/// What the filters look at on a node; a change to it may let a pending pod fit.
fn node_fingerprint(n: &Node) -> impl PartialEq + use<> {
    let status = n.status.as_ref();
    (
        n.metadata.labels.clone(),
        n.spec.unschedulable,
        status.map(|s| s.allocatable.clone()),
        status.and_then(|s| s.node_info.as_ref().map(|i| i.runtimes.clone())),
        n.is_ready(),
    )
}

fn on_node(c: &mut Cycle, ev: &WatchEvent) {
    let Ok(node) = serde_json::from_value::<Node>((*ev.object).clone()) else {
        return;
    };
    if ev.type_ == EventType::Deleted {
        c.nodes.remove(&node.metadata.name);
        c.retry_all = true;
        return;
    }
    let changed = c
        .nodes
        .get(&node.metadata.name)
        .map(|old| node_fingerprint(old) != node_fingerprint(&node))
        .unwrap_or(true);
    c.nodes.insert(node.metadata.name.clone(), Arc::new(node));
    if changed {
        c.retry_all = true;
    }
}

fn on_pod(c: &mut Cycle, memory: &mut Memory, ev: &WatchEvent) {
    let Ok(pod) = serde_json::from_value::<Pod>((*ev.object).clone()) else {
        return;
    };
    let uid = pod.uid().to_string();
    let key = (pod.ns().to_string(), pod.name().to_string());
    let gone = ev.type_ == EventType::Deleted;
    match &pod.spec.node_name {
        Some(node) => {
            c.queue.remove(&key);
            c.active.remove(&key);
            memory.unschedulable.remove(&uid);
            if gone || pod.phase().is_terminal() {
                if c.placed.remove(&uid).is_some() {
                    // Resources were freed.
                    c.retry_all = true;
                }
            } else {
                c.placed.insert(uid, PlacedPod::of(&pod, node));
            }
        }
        None => {
            if gone || pod.metadata.deletion_timestamp.is_some() {
                c.queue.remove(&key);
                c.active.remove(&key);
                memory.unschedulable.remove(&uid);
                if !c.in_flight.contains(&uid) {
                    c.placed.remove(&uid);
                }
            } else if !c.in_flight.contains(&uid) {
                // What an earlier run (or an earlier server) already recorded for it.
                if let Some(msg) = recorded_unschedulable(&pod) {
                    memory.unschedulable.entry(uid.clone()).or_insert(msg);
                }
                let known_unschedulable = memory.unschedulable.contains_key(&uid);
                let new = c.queue.insert(key.clone(), pod).is_none();
                if new || !known_unschedulable {
                    c.active.insert(key);
                }
            }
        }
    }
}
