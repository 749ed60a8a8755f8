//! The pod worker: one task per pod bound to this node. It sets up the pod's volumes, runs init
//! containers in order (native sidecars start first and stop last), starts the app containers,
//! restarts them by `restartPolicy` with back-off, and writes the pod's status. Each container
//! is driven by its own runner; runners report to the worker, which coalesces their reports
//! into status writes. A runner also runs its container's probes (`probe.rs`) beside the
//! instance: readiness sets `ready`, a startup probe holds back `started`, liveness and readiness,
//! and a failed liveness or startup probe kills the instance, which then restarts by policy.
//! While the pod runs, its size-limited emptyDirs are measured every `volume_check_interval`;
//! one over its limit evicts the pod as kubelet does (phase `Failed`, reason `Evicted`, its
//! containers stopped). When the worker ends, the pod's sub-path mounts are removed.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::backoff::{Backoff, BackoffConfig};
use super::executor::{ContainerSpec, ExecError, Executor, ExitStatus};
use super::logs::Logs;
use super::probe::{ProbeEvent, Probes, Target as ProbeTarget};
use super::sandbox::{NetMode, Sandbox};
use super::volumes;
use crate::client::{Client, ClientError};
use crate::events::Recorder;
use crate::model::pod::{
    Container, ContainerState, ContainerStatus, PodCondition, PodPhase, PodStatus, RestartPolicy,
    StateRunning, StateTerminated,
};
use crate::model::quantity::{parse_bytes, parse_millicpu};
use crate::model::{Kind, Pod};

/// What every pod worker of a node shares.
pub struct AgentCtx {
    /// The node's only way to the cluster's objects (see [`crate::client`]).
    pub client: Arc<dyn Client>,
    pub node_name: String,
    /// `<data-dir>/pods`: one directory per pod uid (volumes, logs).
    pub pods_dir: PathBuf,
    pub logs: Logs,
    pub executors: Vec<Arc<dyn Executor>>,
    /// The Docker executor, also the keeper of pods' infra containers (None: WASM-only node).
    pub docker: Option<Arc<super::docker::DockerExecutor>>,
    pub recorder: Recorder,
    pub backoff: BackoffConfig,
    pub host_ip: String,
    /// How often size-limited emptyDirs are measured (kubelet: its housekeeping period).
    pub volume_check_interval: Duration,
    /// Give pods that need one a network namespace of their own (false only in tests: WASM-only
    /// pods then use the node's network, as on a node without the privilege to create one).
    pub pod_netns: bool,
    /// Each pod as this node last wrote it, so a status write needs no read first.
    pub last_written: LastWritten,
}

/// The pod objects this node last wrote (the answers to its status writes), by uid. The next
/// status write of the same pod starts from that object instead of reading the pod again (one
/// request instead of two, over the network for `kapsel agent`); when someone else wrote in
/// between, the compare-and-swap fails with a conflict and the write falls back to a read.
/// A new pod's entry is the object its watch event brought, so even its first status write
/// needs no read. A pod's entry is removed when its worker ends.
#[derive(Default)]
pub struct LastWritten(std::sync::Mutex<std::collections::HashMap<String, Arc<serde_json::Value>>>);

impl LastWritten {
    fn take(&self, uid: &str) -> Option<Arc<serde_json::Value>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(uid)
    }

    pub(super) fn put(&self, uid: &str, obj: Arc<serde_json::Value>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_string(), obj);
    }
}

/// Drops a pod's [`LastWritten`] entry when its worker ends.
struct ForgetWritten(Arc<AgentCtx>, String);

impl Drop for ForgetWritten {
    fn drop(&mut self) {
        self.0.last_written.take(&self.1);
    }
}

/// Grace period of the containers of an evicted pod (kubelet evicts for local storage with 1 s).
const EVICTION_GRACE: Duration = Duration::from_secs(1);

impl AgentCtx {
    fn executor(&self, image: &str) -> Option<Arc<dyn Executor>> {
        self.executors.iter().find(|e| e.handles(image)).cloned()
    }
}

/// A runner's report: the container's new status, and whether it will never run again.
struct Report {
    init: bool,
    idx: usize,
    status: ContainerStatus,
    done: bool,
}

/// Conditions the node agent owns (the scheduler owns `PodScheduled`).
const AGENT_CONDITIONS: &[&str] = &["Initialized", "ContainersReady", "Ready"];

struct LocalStatus {
    init: Vec<ContainerStatus>,
    init_done: Vec<bool>,
    main: Vec<ContainerStatus>,
    main_done: Vec<bool>,
    initialized: bool,
    init_failed: bool,
    /// Why the node evicted the pod (an emptyDir over its sizeLimit).
    evicted: Option<String>,
    start_time: chrono::DateTime<Utc>,
}

impl LocalStatus {
    fn phase(&self) -> PodPhase {
        if self.init_failed || self.evicted.is_some() {
            return PodPhase::Failed;
        }
        if !self.initialized {
            return PodPhase::Pending;
        }
        if !self.main.is_empty() && self.main_done.iter().all(|d| *d) {
            let ok = self.main.iter().all(|c| {
                c.state
                    .terminated
                    .as_ref()
                    .map(|t| t.exit_code == 0)
                    .unwrap_or(false)
            });
            return if ok {
                PodPhase::Succeeded
            } else {
                PodPhase::Failed
            };
        }
        let active = self.main.iter().any(|c| {
            c.state.running.is_some() || c.restart_count > 0 || c.state.terminated.is_some()
        });
        if active {
            PodPhase::Running
        } else {
            PodPhase::Pending
        }
    }

    fn to_status(&self, host_ip: &str) -> PodStatus {
        let now = Some(Utc::now());
        let ready = !self.main.is_empty() && self.main.iter().all(|c| c.ready);
        let cond = |t: &str, ok: bool, reason: Option<&str>| PodCondition {
            type_: t.to_string(),
            status: if ok { "True" } else { "False" }.to_string(),
            reason: if ok { None } else { reason.map(str::to_string) },
            message: None,
            last_transition_time: now,
        };
        PodStatus {
            phase: self.phase(),
            conditions: vec![
                cond(
                    "Initialized",
                    self.initialized,
                    Some("ContainersNotInitialized"),
                ),
                cond("ContainersReady", ready, Some("ContainersNotReady")),
                cond("Ready", ready, Some("ContainersNotReady")),
            ],
            message: self.evicted.clone(),
            reason: self.evicted.as_ref().map(|_| "Evicted".to_string()),
            host_ip: Some(host_ip.to_string()),
            pod_ip: Some(host_ip.to_string()),
            start_time: Some(self.start_time),
            init_container_statuses: self.init.clone(),
            container_statuses: self.main.clone(),
        }
    }
}

/// A container's status when its pod worker starts: fresh, or carried over from before a
/// restart of the node agent. An instance the status calls running died with the old process:
/// it is recorded as lost and, if the policy restarts it, counted as a restart.
fn initial_status(
    c: &Container,
    prev: Option<&ContainerStatus>,
    restarts: RestartPolicy,
) -> ContainerStatus {
    let mut s = prev.cloned().unwrap_or_else(|| ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        state: ContainerState::waiting("ContainerCreating", None),
        ..Default::default()
    });
    s.ready = false;
    if let Some(r) = s.state.running.take() {
        let lost = ContainerState {
            terminated: Some(StateTerminated {
                exit_code: 137,
                reason: Some("Error".into()),
                message: Some("the instance was lost when the node agent restarted".into()),
                started_at: r.started_at,
                finished_at: Some(Utc::now()),
            }),
            ..Default::default()
        };
        if restarts == RestartPolicy::Never {
            s.state = lost;
        } else {
            s.last_state = lost;
            s.restart_count += 1;
            s.state = ContainerState::waiting("ContainerCreating", None);
        }
    }
    s
}

/// Removes the pod's sub-path mounts when its worker ends, however it ends.
struct SubpathMounts(PathBuf);

impl Drop for SubpathMounts {
    fn drop(&mut self) {
        let left = volumes::unmount_subpaths(&self.0);
        if left > 0 {
            tracing::warn!(pod_dir = %self.0.display(), left, "sub-path mounts left mounted");
        }
    }
}

/// Run a pod until it reaches a terminal phase, the node evicts it, or `node_stop` fires.
pub async fn run_pod(ctx: Arc<AgentCtx>, pod: Pod, node_stop: CancellationToken) {
    let pod = Arc::new(pod);
    let uid = pod.uid().to_string();
    let pod_dir = ctx.pods_dir.join(&uid);
    let _subpaths = SubpathMounts(pod_dir.clone());
    let _written = ForgetWritten(ctx.clone(), uid.clone());
    // Fired by the node (delete, shutdown) or by an eviction, which also sets `evicted`.
    let stop = node_stop.child_token();
    let evicted: Arc<OnceLock<String>> = Arc::default();
    let prev = pod.status.clone().unwrap_or_default();
    let find_prev =
        |list: &[ContainerStatus], name: &str| list.iter().find(|s| s.name == name).cloned();
    let mut local = LocalStatus {
        init: pod
            .spec
            .init_containers
            .iter()
            .map(|c| {
                // Init containers restart on failure (sidecars always) unless the pod says Never.
                let p = match (c.restart_policy, pod.restart_policy()) {
                    (Some(RestartPolicy::Always), _) => RestartPolicy::Always,
                    (_, RestartPolicy::Never) => RestartPolicy::Never,
                    _ => RestartPolicy::OnFailure,
                };
                initial_status(
                    c,
                    find_prev(&prev.init_container_statuses, &c.name).as_ref(),
                    p,
                )
            })
            .collect(),
        init_done: vec![false; pod.spec.init_containers.len()],
        main: pod
            .spec
            .containers
            .iter()
            .map(|c| {
                initial_status(
                    c,
                    find_prev(&prev.container_statuses, &c.name).as_ref(),
                    pod.restart_policy(),
                )
            })
            .collect(),
        main_done: vec![false; pod.spec.containers.len()],
        initialized: pod.spec.init_containers.is_empty(),
        init_failed: false,
        evicted: None,
        start_time: prev.start_time.unwrap_or_else(Utc::now),
    };
    let policy = pod.restart_policy();

    // Volumes first; retried until they can be set up.
    let mut vol_backoff = Backoff::new(ctx.backoff);
    loop {
        match volumes::setup(&pod, &pod_dir) {
            Ok(()) => break,
            Err(e) => {
                for c in local.init.iter_mut().chain(local.main.iter_mut()) {
                    c.state = ContainerState::waiting(e.waiting_reason(), Some(e.to_string()));
                }
                ctx.recorder
                    .warning(Recorder::pod_ref(&pod), "FailedMount", e.to_string());
                if !flush(&ctx, &pod, &local).await {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(vol_backoff.next_delay(Duration::ZERO)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
    if !flush(&ctx, &pod, &local).await {
        return;
    }
    let checker = stop.child_token();
    let _checker_guard = checker.clone().drop_guard();
    let limited = volumes::size_limited(&pod, &pod_dir);
    if !limited.is_empty() {
        tokio::spawn(check_usage(
            ctx.clone(),
            pod.clone(),
            limited,
            evicted.clone(),
            stop.clone(),
            checker,
        ));
    }

    // The pod's network sandbox, shared by every member.
    let guard = match setup_sandbox(&ctx, &pod, &mut local, &stop).await {
        Some(g) => g,
        None => return,
    };
    let net = guard.info();

    let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
    let main_stop = stop.child_token();
    let sidecar_stop = CancellationToken::new();
    let mut sidecars = tokio::task::JoinSet::new();
    let mut mains = tokio::task::JoinSet::new();

    // Init containers, in order.
    let prev_init_ok: Vec<bool> = local
        .init
        .iter()
        .map(|s| {
            s.state
                .terminated
                .as_ref()
                .map(|t| t.exit_code == 0)
                .unwrap_or(false)
        })
        .collect();
    let already_initialized = (0..pod.spec.init_containers.len())
        .all(|i| pod.spec.init_containers[i].restart_policy.is_some() || prev_init_ok[i]);
    for (i, c) in pod.spec.init_containers.iter().enumerate() {
        let sidecar = c.restart_policy == Some(RestartPolicy::Always);
        if sidecar {
            let r = Runner::new(
                &ctx,
                &pod,
                c,
                true,
                i,
                RestartPolicy::Always,
                &local.init[i],
                &tx,
                &pod_dir,
                &net,
                &evicted,
            );
            let token = sidecar_stop.clone();
            sidecars.spawn(r.run(token));
            // Wait until the sidecar runs (or fails to start and backs off).
            loop {
                tokio::select! {
                    Some(rep) = rx.recv() => {
                        // Started: running, and past its startup probe if it has one.
                        let started = rep.status.state.running.is_some()
                            && rep.status.started != Some(false);
                        apply(&mut local, rep);
                        if !flush(&ctx, &pod, &local).await { stop.cancel(); }
                        if started { break; }
                    }
                    _ = stop.cancelled() => break,
                }
            }
            continue;
        }
        if already_initialized && prev_init_ok[i] {
            local.init_done[i] = true;
            continue;
        }
        let init_policy = if policy == RestartPolicy::Never {
            RestartPolicy::Never
        } else {
            RestartPolicy::OnFailure
        };
        let r = Runner::new(
            &ctx,
            &pod,
            c,
            true,
            i,
            init_policy,
            &local.init[i],
            &tx,
            &pod_dir,
            &net,
            &evicted,
        );
        let token = main_stop.clone();
        let mut task = tokio::spawn(r.run(token));
        let result = loop {
            tokio::select! {
                Some(rep) = rx.recv() => {
                    apply(&mut local, rep);
                    while let Ok(rep) = rx.try_recv() { apply(&mut local, rep); }
                    if !flush(&ctx, &pod, &local).await { stop.cancel(); }
                }
                r = &mut task => break r.ok().flatten(),
            }
        };
        while let Ok(rep) = rx.try_recv() {
            apply(&mut local, rep);
        }
        if stop.is_cancelled() {
            break;
        }
        match result {
            Some(exit) if exit.success() => {}
            _ => {
                local.init_failed = true;
                flush(&ctx, &pod, &local).await;
                sidecar_stop.cancel();
                while sidecars.join_next().await.is_some() {}
                return;
            }
        }
    }
    if !stop.is_cancelled() {
        local.initialized = true;
        for (i, c) in pod.spec.containers.iter().enumerate() {
            let r = Runner::new(
                &ctx,
                &pod,
                c,
                false,
                i,
                policy,
                &local.main[i],
                &tx,
                &pod_dir,
                &net,
                &evicted,
            );
            mains.spawn(r.run(main_stop.clone()));
        }
        if !flush(&ctx, &pod, &local).await {
            stop.cancel();
        }
    }

    // Supervise until every app container is done, or we are told to stop.
    loop {
        if !local.main_done.is_empty() && local.main_done.iter().all(|d| *d) {
            break;
        }
        tokio::select! {
            Some(rep) = rx.recv() => {
                apply(&mut local, rep);
                while let Ok(rep) = rx.try_recv() { apply(&mut local, rep); }
                if !flush(&ctx, &pod, &local).await { stop.cancel(); }
            }
            _ = stop.cancelled() => break,
        }
    }
    if let Some(why) = evicted.get() {
        local.evicted = Some(why.clone());
        if !node_stop.is_cancelled() {
            flush(&ctx, &pod, &local).await;
        }
    }
    // App containers stop first, native sidecars last.
    main_stop.cancel();
    while mains.join_next().await.is_some() {}
    sidecar_stop.cancel();
    while sidecars.join_next().await.is_some() {}
    while let Ok(rep) = rx.try_recv() {
        apply(&mut local, rep);
    }
    guard.teardown().await;
    if !node_stop.is_cancelled() {
        flush(&ctx, &pod, &local).await;
    }
}

/// Measure the pod's size-limited emptyDirs every `volume_check_interval` until `done`; the
/// first one over its limit evicts the pod: the reason is kept in `evicted`, an `Evicted`
/// event recorded, and `stop` fired.
async fn check_usage(
    ctx: Arc<AgentCtx>,
    pod: Arc<Pod>,
    limited: Vec<volumes::SizeLimited>,
    evicted: Arc<OnceLock<String>>,
    stop: CancellationToken,
    done: CancellationToken,
) {
    let limited = Arc::new(limited);
    let mut tick = tokio::time::interval(ctx.volume_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.cancelled() => return,
        }
        let l = limited.clone();
        let over = match tokio::task::spawn_blocking(move || volumes::over_limit(&l)).await {
            Ok(o) => o,
            Err(_) => continue,
        };
        if let Some(why) = over {
            if done.is_cancelled() {
                return;
            }
            tracing::info!(pod = %pod.key(), reason = %why, "evicting pod");
            ctx.recorder
                .warning(Recorder::pod_ref(&pod), "Evicted", why.clone());
            let _ = evicted.set(why);
            stop.cancel();
            return;
        }
    }
}

/// What runners need of the sandbox.
#[derive(Clone, Default)]
pub struct NetInfo {
    infra: Option<String>,
    rt: Option<tokio::runtime::Handle>,
    /// The pod uses the node's network.
    host: bool,
}

/// Owns the pod's sandbox; tears it down (thread, forwarders, infra container) when dropped.
struct SandboxGuard {
    sandbox: Option<Sandbox>,
    ctx: Arc<AgentCtx>,
    uid: String,
}

impl SandboxGuard {
    fn info(&self) -> NetInfo {
        match &self.sandbox {
            None => NetInfo::default(),
            Some(s) => NetInfo {
                infra: match &s.mode {
                    NetMode::Infra { container_id } => Some(container_id.clone()),
                    _ => None,
                },
                rt: s.runtime(),
                host: s.mode == NetMode::Host,
            },
        }
    }

    async fn teardown(mut self) {
        self.release().await;
    }

    async fn release(&mut self) {
        if let Some(s) = self.sandbox.take() {
            release_sandbox(s, self.ctx.clone(), self.uid.clone()).await;
        }
    }
}

/// End the sandbox's thread and forwarders, then remove its infra container.
async fn release_sandbox(s: Sandbox, ctx: Arc<AgentCtx>, uid: String) {
    let infra = matches!(s.mode, NetMode::Infra { .. });
    let _ = tokio::task::spawn_blocking(move || s.shutdown()).await;
    if infra {
        if let Some(d) = &ctx.docker {
            let _ = d.remove_labelled(super::docker::LABEL_POD_UID, &uid).await;
        }
    }
}

impl Drop for SandboxGuard {
    fn drop(&mut self) {
        if let Some(s) = self.sandbox.take() {
            // The task owns the bare `Sandbox`, not a guard: when the runtime is shutting down
            // it drops the task unpolled, and dropping a `Sandbox` ends its thread without
            // spawning again (a guard here would re-spawn from its own drop, forever).
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(release_sandbox(s, self.ctx.clone(), self.uid.clone()));
            }
        }
    }
}

/// Create the pod's network sandbox when a member needs one (OCI containers, components);
/// retried with back-off. `None` when the pod was stopped or deleted meanwhile.
async fn setup_sandbox(
    ctx: &Arc<AgentCtx>,
    pod: &Arc<Pod>,
    local: &mut LocalStatus,
    stop: &CancellationToken,
) -> Option<SandboxGuard> {
    let all: Vec<&Container> = pod
        .spec
        .init_containers
        .iter()
        .chain(pod.spec.containers.iter())
        .collect();
    let needs_oci = all.iter().any(|c| {
        ctx.executor(&c.image)
            .map(|e| e.runtime() == "oci")
            .unwrap_or(false)
    });
    let needs_net = needs_oci
        || all.iter().any(|c| {
            ctx.executor(&c.image)
                .map(|e| {
                    let key = crate::modules::annotation_key(&c.name);
                    e.needs_network(
                        &c.image,
                        pod.metadata.annotations.get(&key).map(String::as_str),
                    )
                })
                .unwrap_or(false)
        });
    let mut guard = SandboxGuard {
        sandbox: None,
        ctx: ctx.clone(),
        uid: pod.uid().to_string(),
    };
    if !needs_net {
        return Some(guard);
    }
    let mut backoff = Backoff::new(ctx.backoff);
    loop {
        let made = if needs_oci {
            match &ctx.docker {
                None => Err(ExecError::Unavailable(
                    "this node has no Docker runtime".into(),
                )),
                Some(d) => match d.create_infra(pod.uid(), pod.ns(), pod.name()).await {
                    Ok((id, pid)) => Sandbox::join_infra(&id, pid),
                    Err(e) => Err(e),
                },
            }
        } else {
            Ok(if ctx.pod_netns {
                Sandbox::own_or_host()
            } else {
                Sandbox::host()
            })
        };
        match made {
            Ok(s) => {
                guard.sandbox = Some(s);
                break;
            }
            Err(e) => {
                for c in local.init.iter_mut().chain(local.main.iter_mut()) {
                    c.state = ContainerState::waiting(e.waiting_reason(), Some(e.to_string()));
                }
                ctx.recorder.warning(
                    Recorder::pod_ref(pod),
                    "FailedCreatePodSandBox",
                    e.to_string(),
                );
                if !flush(ctx, pod, local).await {
                    return None;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay(Duration::ZERO)) => {}
                    _ = stop.cancelled() => return None,
                }
            }
        }
    }
    let sandbox = guard.sandbox.as_ref().expect("set above");
    for c in &all {
        for p in &c.ports {
            if let (Some(hp), Ok(cp)) = (p.host_port, u16::try_from(p.container_port)) {
                if let Err(e) = sandbox.expose(hp as u16, cp).await {
                    ctx.recorder
                        .warning(Recorder::pod_ref(pod), "FailedHostPort", e.to_string());
                }
            }
        }
    }
    Some(guard)
}

fn apply(local: &mut LocalStatus, rep: Report) {
    let (list, done) = if rep.init {
        (&mut local.init, &mut local.init_done)
    } else {
        (&mut local.main, &mut local.main_done)
    };
    if let Some(s) = list.get_mut(rep.idx) {
        *s = rep.status;
    }
    if rep.done {
        if let Some(d) = done.get_mut(rep.idx) {
            *d = true;
        }
    }
}

/// Write the local status into the pod object. Returns false when the pod is gone.
async fn flush(ctx: &AgentCtx, pod: &Pod, local: &LocalStatus) -> bool {
    let status = local.to_status(&ctx.host_ip);
    let mut cached = ctx.last_written.take(pod.uid());
    for _ in 0..20 {
        let cur = match cached.take() {
            Some(c) => c,
            None => match ctx.client.get(Kind::Pod, pod.ns(), pod.name()).await {
                Ok(Some(c)) => c,
                Ok(None) => return false,
                Err(e) => {
                    tracing::warn!(error = %e, "reading pod for status");
                    return true;
                }
            },
        };
        let read = cur.clone();
        let mut cur: Pod = match serde_json::from_value((*cur).clone()) {
            Ok(p) => p,
            Err(_) => return false,
        };
        if cur.uid() != pod.uid() {
            return false;
        }
        let mut st = status.clone();
        if let Some(old) = &cur.status {
            for c in &old.conditions {
                if !AGENT_CONDITIONS.contains(&c.type_.as_str()) {
                    st.conditions.insert(0, c.clone());
                }
            }
            // Keep transition times of conditions whose status did not change.
            for c in st.conditions.iter_mut() {
                if let Some(o) = old.conditions.iter().find(|o| o.type_ == c.type_) {
                    if o.status == c.status {
                        c.last_transition_time = o.last_transition_time;
                    }
                }
            }
            if *old == st {
                ctx.last_written.put(pod.uid(), read);
                return true;
            }
        }
        cur.status = Some(st);
        match ctx
            .client
            .replace_status(Kind::Pod, serde_json::to_value(&cur).unwrap())
            .await
        {
            Ok(v) => {
                ctx.last_written.put(pod.uid(), Arc::new(v));
                return true;
            }
            Err(ClientError::Conflict(_)) => continue,
            Err(ClientError::NotFound { .. }) => return false,
            Err(e) => {
                tracing::warn!(error = %e, pod = %pod.key(), "writing pod status");
                return true;
            }
        }
    }
    true
}

/// Drives one container: prepare, start, wait, restart by policy with back-off.
struct Runner {
    ctx: Arc<AgentCtx>,
    pod: Arc<Pod>,
    container: Container,
    init: bool,
    idx: usize,
    policy: RestartPolicy,
    status: ContainerStatus,
    tx: mpsc::UnboundedSender<Report>,
    pod_dir: PathBuf,
    net: NetInfo,
    /// Set when the pod is evicted: its containers get a short grace period.
    evicted: Arc<OnceLock<String>>,
}

impl Runner {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ctx: &Arc<AgentCtx>,
        pod: &Arc<Pod>,
        c: &Container,
        init: bool,
        idx: usize,
        policy: RestartPolicy,
        status: &ContainerStatus,
        tx: &mpsc::UnboundedSender<Report>,
        pod_dir: &std::path::Path,
        net: &NetInfo,
        evicted: &Arc<OnceLock<String>>,
    ) -> Self {
        Runner {
            ctx: ctx.clone(),
            pod: pod.clone(),
            container: c.clone(),
            init,
            idx,
            policy,
            status: status.clone(),
            tx: tx.clone(),
            pod_dir: pod_dir.to_path_buf(),
            net: net.clone(),
            evicted: evicted.clone(),
        }
    }

    fn report(&self, done: bool) {
        let _ = self.tx.send(Report {
            init: self.init,
            idx: self.idx,
            status: self.status.clone(),
            done,
        });
    }

    fn should_restart(&self, exit: &ExitStatus) -> bool {
        match self.policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !exit.success(),
            RestartPolicy::Never => false,
        }
    }

    fn terminated(exit: &ExitStatus, started: Option<chrono::DateTime<Utc>>) -> ContainerState {
        ContainerState {
            terminated: Some(StateTerminated {
                exit_code: exit.exit_code,
                reason: Some(exit.reason.clone()),
                message: exit.message.clone(),
                started_at: started,
                finished_at: Some(Utc::now()),
            }),
            ..Default::default()
        }
    }

    fn spec(&self) -> Result<ContainerSpec, ExecError> {
        let pod = &self.pod;
        let c = &self.container;
        let mounts = volumes::mounts(pod, c, &self.pod_dir)?;
        let mut argv = if c.command.is_empty() {
            vec![
                std::path::Path::new(c.image.strip_prefix("file://").unwrap_or(&c.image))
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| c.name.clone()),
            ]
        } else {
            c.command.clone()
        };
        argv.extend(c.args.iter().cloned());
        let mut env = vec![("HOSTNAME".to_string(), pod.name().to_string())];
        for e in &c.env {
            let v = match (&e.value, &e.value_from) {
                (Some(v), _) => expand_env(v, &env),
                (None, Some(src)) => match src.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                    Some("metadata.name") => pod.name().to_string(),
                    Some("metadata.namespace") => pod.ns().to_string(),
                    Some("metadata.uid") => pod.uid().to_string(),
                    Some("spec.nodeName") => self.ctx.node_name.clone(),
                    Some("status.podIP") | Some("status.hostIP") => self.ctx.host_ip.clone(),
                    _ => String::new(),
                },
                (None, None) => String::new(),
            };
            env.retain(|(k, _)| k != &e.name);
            env.push((e.name.clone(), v));
        }
        if let Some(wd) = &c.working_dir {
            env.push(("PWD".into(), wd.clone()));
        }
        let limits = c.resources.as_ref().map(|r| &r.limits);
        let memory_limit = limits
            .and_then(|l| l.get("memory"))
            .and_then(|q| parse_bytes(&q.as_string()).ok());
        let cpu_limit_millis = limits
            .and_then(|l| l.get("cpu"))
            .and_then(|q| parse_millicpu(&q.as_string()).ok());
        Ok(ContainerSpec {
            pod_uid: pod.uid().to_string(),
            pod_namespace: pod.ns().to_string(),
            pod_name: pod.name().to_string(),
            name: c.name.clone(),
            image: c.image.clone(),
            argv,
            command: c.command.clone(),
            args: c.args.clone(),
            pull_policy: c.image_pull_policy.unwrap_or_default(),
            infra: self.net.infra.clone(),
            sandbox_rt: self.net.rt.clone(),
            host_network: self.net.host,
            events: {
                let rec = self.ctx.recorder.clone();
                let pod_ref = Recorder::pod_ref(pod);
                let cname = c.name.clone();
                Some(Arc::new(move |reason: &str, msg: &str| {
                    rec.warning(pod_ref.clone(), reason, format!("container {cname}: {msg}"))
                }))
            },
            pod: Some(pod.clone()),
            private_dir: Some(self.pod_dir.join("private").join(&c.name)),
            env,
            working_dir: c.working_dir.clone(),
            mounts,
            ports: c
                .ports
                .iter()
                .filter_map(|p| u16::try_from(p.container_port).ok())
                .collect(),
            memory_limit,
            cpu_limit_millis,
            log: self.ctx.logs.stream(pod.uid(), &c.name),
        })
    }

    /// Returns the last exit status, or `None` if stopped before one.
    async fn run(mut self, stop: CancellationToken) -> Option<ExitStatus> {
        let pod_ref = Recorder::pod_ref(&self.pod);
        let mut backoff = Backoff::new(self.ctx.backoff);
        let name = self.container.name.clone();
        // A container that already finished for good (before a restart of the agent) stays so.
        if let Some(t) = &self.status.state.terminated {
            let prev = ExitStatus {
                exit_code: t.exit_code,
                reason: t.reason.clone().unwrap_or_default(),
                message: t.message.clone(),
            };
            if !self.should_restart(&prev) {
                self.report(true);
                return Some(prev);
            }
        }
        let mut last: Option<ExitStatus> = None;
        loop {
            let Some(executor) = self.ctx.executor(&self.container.image) else {
                self.status.state = ContainerState::waiting(
                    "CreateContainerError",
                    Some(format!(
                        "no runtime on node {} runs image {:?}",
                        self.ctx.node_name, self.container.image
                    )),
                );
                self.report(false);
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay(Duration::ZERO)) => continue,
                    _ = stop.cancelled() => return last,
                }
            };
            let prepared = match self.spec() {
                Ok(spec) => {
                    // The node's own work (compiling a module, pulling an image) is told in the
                    // pod's events, not in the container's log: the log is the container's output.
                    let recorder = self.ctx.recorder.clone();
                    let (pod_ref, cname) = (pod_ref.clone(), name.clone());
                    let progress: super::executor::ExecutorProgress = Arc::new(move |msg: &str| {
                        let reason = if msg.starts_with("compiled ") {
                            "Compiled"
                        } else if msg.starts_with("compiling ") {
                            "Compiling"
                        } else if msg.starts_with("pulling ") {
                            "Pulling"
                        } else if msg.starts_with("pulled ") {
                            "Pulled"
                        } else {
                            "Preparing"
                        };
                        recorder.normal(
                            pod_ref.clone(),
                            reason,
                            format!("container {cname}: {msg}"),
                        );
                    });
                    match executor.prepare(&spec, progress).await {
                        Ok(()) => Ok(spec),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            let spec = match prepared {
                Ok(s) => s,
                Err(e) => {
                    let reason = match (&e, self.status.state.waiting.as_ref()) {
                        (ExecError::ImagePull(_), Some(w))
                            if w.reason.as_deref() == Some("ErrImagePull") =>
                        {
                            "ImagePullBackOff"
                        }
                        _ => e.waiting_reason(),
                    };
                    if self
                        .status
                        .state
                        .waiting
                        .as_ref()
                        .and_then(|w| w.message.as_deref())
                        != Some(&e.to_string())
                    {
                        self.ctx.recorder.warning(
                            pod_ref.clone(),
                            "Failed",
                            format!("container {name}: {e}"),
                        );
                        self.ctx
                            .logs
                            .stream(self.pod.uid(), &name)
                            .note(&e.to_string());
                    }
                    self.status.state = ContainerState::waiting(reason, Some(e.to_string()));
                    self.report(false);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay(Duration::ZERO)) => continue,
                        _ = stop.cancelled() => return last,
                    }
                }
            };
            if stop.is_cancelled() {
                return last;
            }
            let mut instance = match executor.start(spec).await {
                Ok(i) => i,
                Err(e) => {
                    self.status.state =
                        ContainerState::waiting(e.waiting_reason(), Some(e.to_string()));
                    self.report(false);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay(Duration::ZERO)) => continue,
                        _ = stop.cancelled() => return last,
                    }
                }
            };
            let started_at = Utc::now();
            let started = Instant::now();
            self.status.container_id = Some(instance.id());
            self.status.state = ContainerState {
                running: Some(StateRunning {
                    started_at: Some(started_at),
                }),
                ..Default::default()
            };
            // Ready when started, unless a readiness probe says otherwise; non-sidecar init
            // containers are never ready (and have no probes).
            let can_be_ready = !self.init || self.policy == RestartPolicy::Always;
            let probes = if can_be_ready {
                Probes::of(&self.container)
            } else {
                Probes::none()
            };
            let has_readiness = probes.has_readiness();
            self.status.started = Some(!probes.has_startup());
            self.status.ready = can_be_ready && !probes.has_startup() && !has_readiness;
            self.report(false);
            self.ctx.recorder.normal(
                pod_ref.clone(),
                "Started",
                format!("Started container {name}"),
            );
            let grace = Duration::from_secs(
                self.pod
                    .spec
                    .termination_grace_period_seconds
                    .unwrap_or(30)
                    .max(0) as u64,
            );
            // Probes run alongside the wait, in this task: they end with the instance.
            let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<ProbeEvent>();
            let probing = probes.run(
                ProbeTarget {
                    net: self.net.rt.clone(),
                    docker: self.ctx.docker.clone(),
                    container_id: self.status.container_id.clone(),
                },
                tokio::time::Instant::from_std(started),
                probe_tx,
            );
            let outcome = {
                let wait = instance.wait();
                tokio::pin!(wait);
                tokio::pin!(probing);
                let mut probing_done = false;
                loop {
                    tokio::select! {
                        r = &mut wait => break Outcome::Exited(r),
                        _ = stop.cancelled() => break Outcome::Stop,
                        _ = &mut probing, if !probing_done => probing_done = true,
                        Some(ev) = probe_rx.recv() => match ev {
                            ProbeEvent::Started => {
                                self.status.started = Some(true);
                                self.status.ready = can_be_ready && !has_readiness;
                                self.report(false);
                            }
                            ProbeEvent::Ready(ready, why) => {
                                if !ready {
                                    self.ctx.recorder.warning(
                                        pod_ref.clone(),
                                        "Unhealthy",
                                        format!("Readiness probe failed: {why}"),
                                    );
                                }
                                if self.status.ready != ready {
                                    self.status.ready = ready;
                                    self.report(false);
                                }
                            }
                            ProbeEvent::Failed(kind, why) => {
                                let probe = kind.label();
                                self.ctx.recorder.warning(
                                    pod_ref.clone(),
                                    "Unhealthy",
                                    format!("{probe} probe failed: {why}"),
                                );
                                self.ctx.recorder.normal(
                                    pod_ref.clone(),
                                    "Killing",
                                    format!(
                                        "Container {name} failed {} probe, will be restarted",
                                        probe.to_lowercase()
                                    ),
                                );
                                break Outcome::Unhealthy(probe, why);
                            }
                        },
                    }
                }
            };
            let exit = match outcome {
                Outcome::Exited(r) => r,
                Outcome::Stop => {
                    let grace = if self.evicted.get().is_some() {
                        grace.min(EVICTION_GRACE)
                    } else {
                        grace
                    };
                    let r = instance.kill(grace).await;
                    if let Ok(exit) = &r {
                        self.status.state = Self::terminated(exit, Some(started_at));
                        self.status.ready = false;
                        self.report(true);
                    }
                    return r.ok();
                }
                Outcome::Unhealthy(probe, why) => {
                    self.status.ready = false;
                    let mut exit = instance.kill(grace).await.unwrap_or_else(|_| ExitStatus {
                        // The instance's own status was lost with the abandoned wait.
                        exit_code: 137,
                        reason: "Killed".into(),
                        message: None,
                    });
                    if exit.message.is_none() || exit.reason == "Killed" {
                        exit.message =
                            Some(format!("{} probe failed: {why}", probe.to_lowercase()));
                    }
                    // A container killed for failing a probe did not succeed, whatever its code.
                    if exit.exit_code == 0 {
                        exit.exit_code = 137;
                        exit.reason = "Error".into();
                    }
                    Ok(exit)
                }
            };
            let exit = exit.unwrap_or_else(|e| ExitStatus {
                exit_code: 1,
                reason: "Error".into(),
                message: Some(e.to_string()),
            });
            self.status.ready = false;
            self.status.started = Some(false);
            self.status.state = Self::terminated(&exit, Some(started_at));
            last = Some(exit.clone());
            if exit.reason == "OOMKilled" || (exit.exit_code != 0 && exit.message.is_some()) {
                if let Some(m) = &exit.message {
                    self.ctx
                        .logs
                        .stream(self.pod.uid(), &name)
                        .note(&format!("{}: {m}", exit.reason));
                }
            }
            if !self.should_restart(&exit) {
                self.report(true);
                return last;
            }
            let delay = backoff.next_delay(started.elapsed());
            self.status.last_state = self.status.state.clone();
            self.status.state = ContainerState::waiting(
                "CrashLoopBackOff",
                Some(format!(
                    "back-off {} restarting failed container={name} pod={}",
                    humantime(delay),
                    self.pod.name()
                )),
            );
            self.report(false);
            self.ctx.recorder.warning(
                pod_ref.clone(),
                "BackOff",
                format!(
                    "Back-off restarting failed container {name} in pod {}",
                    self.pod.name()
                ),
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return last,
            }
            self.status.restart_count += 1;
        }
    }
}

/// How a running instance's wait ended.
enum Outcome {
    Exited(Result<ExitStatus, ExecError>),
    /// The container is being stopped (pod deleted, node shutting down).
    Stop,
    /// A liveness or startup probe failed (its label, why): kill and restart by policy.
    Unhealthy(&'static str, String),
}

/// `$(VAR)` references to earlier variables, as Kubernetes expands them.
fn expand_env(v: &str, env: &[(String, String)]) -> String {
    if !v.contains("$(") {
        return v.to_string();
    }
    let mut out = v.to_string();
    for (k, val) in env {
        out = out.replace(&format!("$({k})"), val);
    }
    out
}

fn humantime(d: Duration) -> String {
    if d >= Duration::from_secs(60) {
        format!("{}m{}s", d.as_secs() / 60, d.as_secs() % 60)
    } else if d >= Duration::from_secs(1) {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pod::StateTerminated;

    fn term(code: i32) -> ContainerStatus {
        ContainerStatus {
            name: "c".into(),
            state: ContainerState {
                terminated: Some(StateTerminated {
                    exit_code: code,
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn local(main: Vec<ContainerStatus>, done: Vec<bool>) -> LocalStatus {
        LocalStatus {
            init: vec![],
            init_done: vec![],
            main,
            main_done: done,
            initialized: true,
            init_failed: false,
            evicted: None,
            start_time: Utc::now(),
        }
    }

    #[test]
    fn phases_follow_kubernetes() {
        let waiting = initial_status(&Container::default(), None, RestartPolicy::Always);
        assert_eq!(
            local(vec![waiting.clone()], vec![false]).phase(),
            PodPhase::Pending
        );
        assert_eq!(
            local(vec![term(0), term(0)], vec![true, true]).phase(),
            PodPhase::Succeeded
        );
        assert_eq!(
            local(vec![term(0), term(1)], vec![true, true]).phase(),
            PodPhase::Failed
        );
        // One done, one restarting: still Running.
        assert_eq!(
            local(vec![term(0), term(1)], vec![true, false]).phase(),
            PodPhase::Running
        );
        let mut l = local(vec![waiting], vec![false]);
        l.initialized = false;
        assert_eq!(l.phase(), PodPhase::Pending);
        l.init_failed = true;
        assert_eq!(l.phase(), PodPhase::Failed);
    }

    #[test]
    fn env_expansion() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand_env("$(A)-$(B)", &env), "x-$(B)");
    }
}
