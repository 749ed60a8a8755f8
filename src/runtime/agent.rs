//! The node agent: registers this node, watches the pods bound to it and reconciles desired
//! against observed state, level-triggered: a pod that should run and has no worker gets one
//! (also after a crash of the whole process); a pod being deleted is stopped, then removed;
//! directories of pods that no longer exist are cleaned up (their sub-path mounts undone
//! first). Pods the node evicts (an emptyDir over its `sizeLimit`, see `worker.rs`) end in
//! phase `Failed` and are not restarted.
//!
//! Heartbeats, as a kubelet's: the node renews its `coordination.k8s.io` Lease (in
//! `kube-node-lease`, named after the node) every `--node-lease-renew-interval`, from a task of
//! its own so busy pod handling never delays it; the Node object is rewritten only when what it
//! reports changed (runtimes, or a `Ready` condition someone else changed, such as the node
//! lifecycle controller marking it `Unknown`) or every [`NODE_STATUS_REPORT_FREQUENCY`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::worker::{run_pod, AgentCtx};
use crate::client::{ClientError, Selector, WatchItem};
use crate::model::affinity::{LABEL_ARCH, LABEL_HOSTNAME, LABEL_OS};
use crate::model::lease::NODE_LEASE_NAMESPACE;
use crate::model::node::{
    this_os_arch, NodeAddress, NodeCondition, NodeInfo, NodeSpec, NodeStatus, LABEL_WASM_ONLY,
};
use crate::model::taint::Taint;
use crate::model::{Kind, Lease, Node, ObjectMeta, Pod};
use crate::store::{EventType, WatchEvent};

/// Capacity this node advertises.
#[derive(Debug, Clone)]
pub struct NodeResources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub max_pods: u64,
}

impl NodeResources {
    /// Read the machine: CPUs and memory.
    pub fn detect(max_pods: u64) -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| kb * 1024)
            .unwrap_or(1 << 30);
        NodeResources {
            cpu_millis: cpus * 1000,
            memory_bytes: mem,
            max_pods,
        }
    }
}

/// The Node is rewritten at least this often even when nothing changed (kubelet's
/// `nodeStatusReportFrequency` idea); liveness itself is the Lease.
pub const NODE_STATUS_REPORT_FREQUENCY: Duration = Duration::from_secs(60);
/// How often the node looks at its own Node object and runtimes.
const NODE_STATUS_CHECK: Duration = Duration::from_secs(2);
/// Default `--node-lease-renew-interval`.
pub const DEFAULT_LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(2);
/// The `leaseDurationSeconds` a node writes (informational: the control plane's
/// `--node-monitor-grace-period` decides).
pub const LEASE_DURATION_SECONDS: i64 = 6;

struct Worker {
    stop: CancellationToken,
    task: JoinHandle<()>,
    deleting: bool,
}

pub struct NodeAgent {
    ctx: Arc<AgentCtx>,
    resources: NodeResources,
    workers: HashMap<String, Worker>,
    lease_renew_interval: Duration,
    /// `--node-label`s: set at registration and kept (merged into the Node's labels).
    labels: BTreeMap<String, String>,
    /// `--node-taint`s: the Node is created with them (afterwards taints are the
    /// administrator's and the node lifecycle controller's; NodeRestriction forbids the node
    /// to change them).
    taints: Vec<Taint>,
}

impl NodeAgent {
    pub fn new(ctx: Arc<AgentCtx>, resources: NodeResources) -> Self {
        NodeAgent {
            ctx,
            resources,
            workers: HashMap::new(),
            lease_renew_interval: DEFAULT_LEASE_RENEW_INTERVAL,
            labels: BTreeMap::new(),
            taints: Vec::new(),
        }
    }

    /// The labels and taints the node registers with (`--node-label`, `--node-taint`).
    pub fn with_registration(
        mut self,
        labels: BTreeMap<String, String>,
        taints: Vec<Taint>,
    ) -> Self {
        self.labels = labels;
        self.taints = taints;
        self
    }

    /// The labels this node keeps on its Node: the well-known ones
    /// (`kubernetes.io/hostname`, `kubernetes.io/os`, `kubernetes.io/arch`), `--node-label`s,
    /// and `kapsel.io/wasm-only=true` while it cannot run OCI containers. `None`: remove.
    fn managed_labels(&self, runtimes: &[String]) -> BTreeMap<String, Option<String>> {
        let (os, arch) = this_os_arch();
        let mut m: BTreeMap<String, Option<String>> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        m.insert(LABEL_HOSTNAME.into(), Some(self.ctx.node_name.clone()));
        m.insert(LABEL_OS.into(), Some(os.into()));
        m.insert(LABEL_ARCH.into(), Some(arch.into()));
        let wasm_only = !runtimes.iter().any(|r| r == "oci");
        m.insert(LABEL_WASM_ONLY.into(), wasm_only.then(|| "true".into()));
        m
    }

    /// How often the node renews its Lease.
    pub fn with_lease_renew_interval(mut self, every: Duration) -> Self {
        self.lease_renew_interval = every.max(Duration::from_millis(10));
        self
    }

    /// Why this node cannot run pods now, if it cannot: its data directory (pods' volumes,
    /// logs, modules) is not writable. The node then reports `Ready=False` with this message,
    /// and the node lifecycle controller taints it `node.kubernetes.io/not-ready`.
    fn problem(&self) -> Option<String> {
        let probe = self.ctx.pods_dir.join(".kapsel-health");
        match std::fs::write(&probe, b"ok").and_then(|_| std::fs::remove_file(&probe)) {
            Ok(()) => None,
            Err(e) => Some(format!(
                "data directory {} is not writable: {e}",
                self.ctx.pods_dir.display()
            )),
        }
    }

    /// Does the stored Node need this node's status again (gone, or its `Ready` condition
    /// not what this node reports, e.g. changed by the node lifecycle controller)?
    async fn status_stale(&self, ready: bool) -> bool {
        match self
            .ctx
            .client
            .get(Kind::Node, "", &self.ctx.node_name)
            .await
        {
            Ok(Some(n)) => {
                let stored = n["status"]["conditions"].as_array().and_then(|cs| {
                    cs.iter()
                        .find(|c| c["type"] == "Ready")
                        .map(|c| c["status"] == "True")
                });
                stored != Some(ready)
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Runtimes whose executors can run containers right now.
    async fn runtimes(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.ctx.executors {
            if e.available().await && !out.iter().any(|r| r == e.runtime()) {
                out.push(e.runtime().to_string());
            }
        }
        out
    }

    fn node_object(&self, runtimes: &[String]) -> Node {
        let problem = self.problem();
        let labels = self
            .managed_labels(runtimes)
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect();
        let r = &self.resources;
        let mut cap = std::collections::BTreeMap::new();
        cap.insert("cpu".to_string(), format!("{}m", r.cpu_millis));
        cap.insert("memory".to_string(), format!("{}Ki", r.memory_bytes / 1024));
        cap.insert("pods".to_string(), r.max_pods.to_string());
        Node {
            api_version: "v1".into(),
            kind: "Node".into(),
            metadata: ObjectMeta {
                name: self.ctx.node_name.clone(),
                labels,
                ..Default::default()
            },
            spec: NodeSpec {
                unschedulable: None,
                taints: self.taints.clone(),
            },
            status: Some(NodeStatus {
                allocatable: cap.clone(),
                capacity: cap,
                conditions: vec![NodeCondition {
                    type_: "Ready".into(),
                    status: if problem.is_none() { "True" } else { "False" }.into(),
                    reason: Some(
                        if problem.is_none() {
                            "KapselReady"
                        } else {
                            "KubeletNotReady"
                        }
                        .into(),
                    ),
                    message: Some(
                        problem
                            .unwrap_or_else(|| "kapsel node agent is posting ready status".into()),
                    ),
                    last_heartbeat_time: Some(Utc::now()),
                }],
                addresses: vec![
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: self.ctx.host_ip.clone(),
                    },
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: self.ctx.node_name.clone(),
                    },
                ],
                node_info: Some(NodeInfo {
                    kubelet_version: format!("kapsel/{}", env!("CARGO_PKG_VERSION")),
                    container_runtime_version: runtimes
                        .iter()
                        .map(|r| {
                            if r == "wasm" {
                                "wasmtime://48"
                            } else {
                                "docker://"
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    operating_system: this_os_arch().0.into(),
                    architecture: this_os_arch().1.into(),
                    runtimes: runtimes.to_vec(),
                }),
            }),
        }
    }

    /// Create or refresh this node's object (also the heartbeat).
    pub async fn register(&self, runtimes: &[String]) -> Result<(), ClientError> {
        let client = &self.ctx.client;
        for _ in 0..10 {
            let mut node = self.node_object(runtimes);
            match client.get(Kind::Node, "", &self.ctx.node_name).await? {
                None => {
                    node.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
                    node.metadata.creation_timestamp = Some(Utc::now());
                    match client
                        .create(Kind::Node, serde_json::to_value(&node).unwrap())
                        .await
                    {
                        Err(ClientError::AlreadyExists { .. }) => continue,
                        r => return r.map(|_| ()),
                    }
                }
                Some(cur) => {
                    let cur: Node = serde_json::from_value((*cur).clone())
                        .map_err(|e| ClientError::Invalid(format!("node object: {e}")))?;
                    // Keep what others set (labels, cordon, taints); refresh the labels this
                    // node manages.
                    let mut meta = cur.metadata;
                    for (k, v) in self.managed_labels(runtimes) {
                        match v {
                            Some(v) => meta.labels.insert(k, v),
                            None => meta.labels.remove(&k),
                        };
                    }
                    node.metadata = meta;
                    node.spec = cur.spec;
                    match client
                        .replace_status(Kind::Node, serde_json::to_value(&node).unwrap())
                        .await
                    {
                        Err(ClientError::Conflict(_)) => continue,
                        r => return r.map(|_| ()),
                    }
                }
            }
        }
        Ok(())
    }

    /// Run until `cancel`; `registered` fires once the node object exists.
    pub async fn run(
        mut self,
        cancel: CancellationToken,
        registered: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        let mut runtimes = self.runtimes().await;
        // The Lease first, as liveness is read from it: whoever sees this node Ready also
        // finds its heartbeat.
        let first_lease = match renew_once(&*self.ctx.client, &self.ctx.node_name, None).await {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "creating the node lease");
                None
            }
        };
        if let Err(e) = self.register(&runtimes).await {
            tracing::error!(error = %e, "registering node");
        }
        let mut last_status = tokio::time::Instant::now();
        let mut last_problem = self.problem();
        if let Some(tx) = registered {
            let _ = tx.send(());
        }
        let lease_stop = cancel.child_token();
        let lease_task = tokio::spawn(renew_lease(
            self.ctx.client.clone(),
            self.ctx.node_name.clone(),
            self.lease_renew_interval,
            first_lease,
            lease_stop.clone(),
        ));
        // Containers of an earlier run of this node: their pods are restarted from scratch
        // (the WASM members died with the process), so none of them is kept.
        if let Some(d) = &self.ctx.docker {
            if runtimes.iter().any(|r| r == "oci") {
                match d.remove_orphans(&HashSet::new()).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(containers = n, "removed containers left by an earlier run")
                    }
                    Err(e) => tracing::warn!(error = %e, "cleaning up old containers"),
                }
            }
        }
        let mut first = true;
        'outer: loop {
            let selector = Selector::NodeName(self.ctx.node_name.clone());
            let mut watch = match self.ctx.client.watch(Kind::Pod, None, selector).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(error = %e, "watching pods");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // Level-triggered resync: everything that exists now.
            let mut present = HashSet::new();
            for ev in std::mem::take(&mut watch.initial) {
                if let Some(uid) = self.handle(&ev) {
                    present.insert(uid);
                }
            }
            let gone: Vec<String> = self
                .workers
                .keys()
                .filter(|u| !present.contains(*u))
                .cloned()
                .collect();
            for uid in gone {
                self.forget(&uid);
            }
            if first {
                self.cleanup_orphans(&present);
                first = false;
            }
            // Runtimes and the stored Node are checked every 2 s (Docker coming or going
            // changes what the node offers); the Node is rewritten on a change or every 60 s.
            let mut heartbeat = tokio::time::interval(NODE_STATUS_CHECK);
            heartbeat.tick().await;
            loop {
                tokio::select! {
                    item = watch.live.next() => match item {
                        Some(WatchItem::Event(ev)) => { self.handle(&ev); }
                        Some(WatchItem::Resync) => {
                            tracing::warn!("pod watch lagged; resyncing");
                            continue 'outer;
                        }
                        None => break 'outer,
                    },
                    _ = heartbeat.tick() => {
                        let now = self.runtimes().await;
                        let problem = self.problem();
                        if now != runtimes
                            || problem != last_problem
                            || last_status.elapsed() >= NODE_STATUS_REPORT_FREQUENCY
                            || self.status_stale(problem.is_none()).await
                        {
                            if problem != last_problem {
                                match &problem {
                                    Some(p) => tracing::warn!(problem = %p, "node not ready"),
                                    None => tracing::info!("node ready again"),
                                }
                            }
                            runtimes = now;
                            last_problem = problem;
                            match self.register(&runtimes).await {
                                Ok(()) => last_status = tokio::time::Instant::now(),
                                Err(e) => tracing::warn!(error = %e, "node status"),
                            }
                        }
                        self.workers.retain(|_, w| !(w.deleting && w.task.is_finished()));
                    }
                    _ = cancel.cancelled() => break 'outer,
                }
            }
        }
        lease_stop.cancel();
        let _ = lease_task.await;
        // Shutdown: stop every pod concurrently, give them 10 s in all (like `docker compose`),
        // then force-remove whatever containers are left, so nothing outlives the node.
        for w in self.workers.values() {
            w.stop.cancel();
        }
        let tasks: Vec<_> = self.workers.drain().map(|(_, w)| w.task).collect();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(tasks)).await;
        if let Some(d) = &self.ctx.docker {
            if let Ok(n @ 1..) = d.remove_orphans(&HashSet::new()).await {
                tracing::info!(containers = n, "force-removed containers at shutdown");
            }
        }
    }

    /// React to one pod event. Returns the pod's uid when it is bound to this node and exists.
    fn handle(&mut self, ev: &WatchEvent) -> Option<String> {
        let pod: Pod = match serde_json::from_value((*ev.object).clone()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable pod in watch");
                return None;
            }
        };
        if pod.spec.node_name.as_deref() != Some(self.ctx.node_name.as_str()) {
            return None;
        }
        let uid = pod.uid().to_string();
        if ev.type_ == EventType::Deleted {
            self.forget(&uid);
            return None;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            let already = self.workers.get(&uid).map(|w| w.deleting).unwrap_or(false);
            if !already {
                let stop = self
                    .workers
                    .get(&uid)
                    .map(|w| w.stop.clone())
                    .unwrap_or_default();
                let prev = self.workers.remove(&uid).map(|w| w.task);
                let ctx = self.ctx.clone();
                ctx.recorder.normal(
                    crate::events::Recorder::pod_ref(&pod),
                    "Killing",
                    "Stopping all containers".into(),
                );
                let task = tokio::spawn(async move {
                    stop.cancel();
                    if let Some(t) = prev {
                        let _ = t.await;
                    }
                    finalize_delete(&ctx, &pod).await;
                });
                self.workers.insert(
                    uid.clone(),
                    Worker {
                        stop: CancellationToken::new(),
                        task,
                        deleting: true,
                    },
                );
            }
            return Some(uid);
        }
        if !self.workers.contains_key(&uid) && !pod.phase().is_terminal() {
            // The object just seen is what its first status write starts from.
            self.ctx.last_written.put(&uid, ev.object.clone());
            let stop = CancellationToken::new();
            let task = tokio::spawn(run_pod(self.ctx.clone(), pod, stop.clone()));
            self.workers.insert(
                uid.clone(),
                Worker {
                    stop,
                    task,
                    deleting: false,
                },
            );
        }
        Some(uid)
    }

    /// The pod object is gone: stop its worker and remove its directory.
    fn forget(&mut self, uid: &str) {
        let w = self.workers.remove(uid);
        let ctx = self.ctx.clone();
        let uid = uid.to_string();
        tokio::spawn(async move {
            if let Some(w) = w {
                w.stop.cancel();
                let _ = w.task.await;
            }
            cleanup_pod_dir(&ctx, &uid);
        });
    }

    fn cleanup_orphans(&self, present: &HashSet<String>) {
        let Ok(rd) = std::fs::read_dir(&self.ctx.pods_dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !present.contains(&name) {
                tracing::info!(uid = %name, "removing orphaned pod directory");
                if let Err(err) = super::volumes::remove_pod_dir(&e.path()) {
                    tracing::warn!(error = %err, uid = %name, "removing orphaned pod directory");
                }
            }
        }
    }
}

fn cleanup_pod_dir(ctx: &AgentCtx, uid: &str) {
    ctx.logs.forget_pod(uid);
    if let Some(d) = ctx.docker.clone() {
        let uid = uid.to_string();
        tokio::spawn(async move {
            let _ = d.remove_labelled(super::docker::LABEL_POD_UID, &uid).await;
        });
    }
    // Sub-path mounts are undone first: deleting through one would delete the volume's files.
    let dir = ctx.pods_dir.join(uid);
    if let Err(e) = super::volumes::remove_pod_dir(&dir) {
        tracing::warn!(error = %e, dir = %dir.display(), "removing pod directory");
    }
}

/// The pod's containers are stopped: remove the object (if it is still this pod). A server
/// that cannot be reached (or answers 5xx) is retried with back-off for up to a minute: giving
/// up would leave the pod `Terminating` for good, since nothing else removes it.
async fn finalize_delete(ctx: &AgentCtx, pod: &Pod) {
    let mut wait = Duration::from_millis(100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for _ in 0..100 {
        let r = match ctx.client.get(Kind::Pod, pod.ns(), pod.name()).await {
            Ok(Some(cur)) if cur["metadata"]["uid"].as_str() == Some(pod.uid()) => {
                let rv = crate::store::object_rv(&cur);
                ctx.client.delete(Kind::Pod, pod.ns(), pod.name(), rv).await
            }
            Ok(_) => break,
            Err(e) => Err(e),
        };
        match r {
            Err(ClientError::Conflict(_)) => continue,
            Err(ClientError::Unavailable(e)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, pod = %pod.key(), retry_in = ?wait, "removing a stopped pod");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!(error = %e, pod = %pod.key(), "removing a stopped pod");
                break;
            }
            Ok(()) => break,
        }
    }
    cleanup_pod_dir(ctx, pod.uid());
}

/// Renew this node's Lease every `every` until `stop`: the node's heartbeat.
async fn renew_lease(
    client: Arc<dyn crate::client::Client>,
    node: String,
    every: Duration,
    mut last: Option<serde_json::Value>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if last.is_some() {
        // Written just now: the first renewal is one interval away.
        tick.tick().await;
    }
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        match renew_once(&*client, &node, last.take()).await {
            Ok(v) => last = Some(v),
            Err(e) => tracing::warn!(error = %e, "renewing the node lease"),
        }
    }
}

/// One renewal: replace the Lease last written (compare-and-swap), reading it again or
/// creating it when that fails.
pub async fn renew_once(
    client: &dyn crate::client::Client,
    node: &str,
    mut last: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    for _ in 0..5 {
        let cur = match last.take() {
            Some(v) => v,
            None => match client.get(Kind::Lease, NODE_LEASE_NAMESPACE, node).await? {
                Some(v) => (*v).clone(),
                None => {
                    let mut l = Lease::for_node(node, LEASE_DURATION_SECONDS);
                    l.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
                    l.metadata.creation_timestamp = Some(Utc::now());
                    let v = serde_json::to_value(&l).expect("a lease serializes");
                    match client.create(Kind::Lease, v).await {
                        Err(ClientError::AlreadyExists { .. }) => continue,
                        r => return r,
                    }
                }
            },
        };
        let mut l: Lease = serde_json::from_value(cur)
            .map_err(|e| ClientError::Invalid(format!("lease object: {e}")))?;
        l.spec.holder_identity = Some(node.to_string());
        l.spec.lease_duration_seconds = Some(LEASE_DURATION_SECONDS);
        l.spec.renew_time = Some(Utc::now());
        let v = serde_json::to_value(&l).expect("a lease serializes");
        match client.replace(Kind::Lease, v).await {
            Err(ClientError::Conflict(_)) | Err(ClientError::NotFound { .. }) => continue,
            r => return r,
        }
    }
    Err(ClientError::Conflict(format!(
        "lease {NODE_LEASE_NAMESPACE}/{node} kept changing"
    )))
}
