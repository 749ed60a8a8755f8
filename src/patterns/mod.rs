//! Built-in pattern components, run natively inside Kapsel in the pod's sandbox:
//! `builtin/git-sync` (the sidecar, [`gitsync`]), `builtin/redis-ambassador` (the
//! ambassador, [`redis`]) and `builtin/metrics-adapter` (the adapter, [`adapter`]).
//! [`BuiltinExecutor`] puts them behind the same executor trait as WASM and Docker, and keeps a
//! [`BuiltinStatus`] handle on each running one in [`node_builtins`], which the API serves as
//! `GET /api/v1/namespaces/{ns}/pods/{name}/builtins` for `kapsel describe pod`.

pub mod adapter;
pub mod flags;
pub mod gitsync;
pub mod redis;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::runtime::docker::DockerExecutor;
use crate::runtime::executor::{
    ContainerSpec, ExecError, Executor, ExecutorProgress, ExitStatus, Instance, TaskInstance,
};

pub const GIT_SYNC: &str = "builtin/git-sync";
pub const REDIS_AMBASSADOR: &str = "builtin/redis-ambassador";
pub const METRICS_ADAPTER: &str = "builtin/metrics-adapter";
const ALL: &str = "builtin/git-sync, builtin/redis-ambassador, builtin/metrics-adapter";

/// (label, value) status lines, in the order shown.
pub type StatusLines = Vec<(String, String)>;

/// A running built-in's own status, as `kapsel describe pod` shows it.
pub trait BuiltinStatus: Send + Sync {
    /// The component: `git-sync`, `redis-ambassador`, `metrics-adapter`.
    fn kind(&self) -> &'static str;
    /// (label, value) lines, in the order shown.
    fn status_lines(&self) -> StatusLines;
}

/// Every built-in container running on this node, by `namespace/pod/container`. Handles are
/// weak: a component that stopped drops out by itself.
pub fn node_builtins() -> &'static Mutex<BTreeMap<String, Weak<dyn BuiltinStatus>>> {
    static M: LazyLock<Mutex<BTreeMap<String, Weak<dyn BuiltinStatus>>>> =
        LazyLock::new(Default::default);
    &M
}

/// Record a running built-in container's status handle (replacing an earlier one's).
pub fn register_builtin(spec: &ContainerSpec, status: Weak<dyn BuiltinStatus>) {
    let key = format!("{}/{}/{}", spec.pod_namespace, spec.pod_name, spec.name);
    let mut m = node_builtins().lock().unwrap();
    m.retain(|_, w| w.strong_count() > 0);
    m.insert(key, status);
}

/// The status of one pod's running built-ins: (container, kind, lines), by container name.
pub fn pod_builtins(ns: &str, pod: &str) -> Vec<(String, &'static str, StatusLines)> {
    let prefix = format!("{ns}/{pod}/");
    let live: Vec<(String, Arc<dyn BuiltinStatus>)> = node_builtins()
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(k, w)| Some((k.strip_prefix(&prefix)?.to_string(), w.upgrade()?)))
        .collect();
    // Status lines are gathered outside the registry's lock.
    live.into_iter()
        .map(|(c, s)| (c, s.kind(), s.status_lines()))
        .collect()
}

fn when(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    match t {
        Some(t) => {
            let ago = (chrono::Utc::now() - t).to_std().unwrap_or_default();
            format!(
                "{} ({} ago)",
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                humantime::format_duration(Duration::from_secs(ago.as_secs()))
            )
        }
        None => "<never>".into(),
    }
}

impl BuiltinStatus for gitsync::GitSync {
    fn kind(&self) -> &'static str {
        "git-sync"
    }
    fn status_lines(&self) -> StatusLines {
        let last = self.stats.last.lock().unwrap().clone();
        vec![
            (
                "Repository".into(),
                format!("{} @ {}", gitsync::redact(&self.cfg.repo), self.cfg.git_ref),
            ),
            (
                "Last synced commit".into(),
                last.commit.unwrap_or_else(|| "<none>".into()),
            ),
            ("Last synced".into(), when(last.synced_at)),
            ("Last checked".into(), when(last.checked_at)),
            (
                "Syncs".into(),
                format!(
                    "{} ok, {} failed",
                    self.stats.success.load(Ordering::Relaxed),
                    self.stats.errors.load(Ordering::Relaxed)
                ),
            ),
            (
                "Last error".into(),
                match last.error {
                    Some((t, e)) => format!("{}: {e}", when(Some(t))),
                    None => "<none>".into(),
                },
            ),
        ]
    }
}

impl BuiltinStatus for redis::StatusHandle {
    fn kind(&self) -> &'static str {
        "redis-ambassador"
    }
    fn status_lines(&self) -> StatusLines {
        redis::StatusHandle::status_lines(self)
    }
}

impl BuiltinStatus for adapter::Adapter {
    fn kind(&self) -> &'static str {
        "metrics-adapter"
    }
    fn status_lines(&self) -> StatusLines {
        vec![("Series".into(), self.reg.series_count().to_string())]
    }
}

/// A built-in asked for `--help`: the text goes to the container's log and the container
/// exits 0 without starting.
fn help_instance(spec: &ContainerSpec, component: &str, text: &str) -> Box<dyn Instance> {
    spec.log.append(text.as_bytes());
    if !text.ends_with('\n') {
        spec.log.append(b"\n");
    }
    let (done_tx, done_rx) = oneshot::channel();
    let _ = done_tx.send(ExitStatus::code(0));
    Box::new(TaskInstance::new(
        format!("builtin://{component}/{}", uuid::Uuid::new_v4().simple()),
        done_rx,
        CancellationToken::new(),
    ))
}

/// git-sync's `--help` text, when its args ask for it.
fn gitsync_help(spec: &ContainerSpec) -> Option<String> {
    match gitsync::Config::parse(&spec.args, &spec.env) {
        Err(gitsync::ConfigError::Flags(flags::FlagError::Help(text))) => Some(text),
        _ => None,
    }
}

/// The adapter's view of paths: its volume mounts.
fn mount_map(spec: &ContainerSpec) -> adapter::PathMap {
    let mounts: Vec<(PathBuf, String)> = spec
        .mounts
        .iter()
        .map(|m| (m.host_path.clone(), m.guest_path.clone()))
        .collect();
    Arc::new(move |p: &str| gitsync::host_path(&mounts, std::path::Path::new(p)))
}

/// The adapter of a container spec; `Ok(None)` for `--help` (nothing to run).
fn adapter_new(spec: &ContainerSpec) -> Result<Option<adapter::Adapter>, ExecError> {
    let cfg = match adapter::Config::parse(&spec.args, &spec.env) {
        Ok(c) => c,
        Err(flags::FlagError::Help(_)) => return Ok(None),
        Err(e) => return Err(ExecError::Config(e.to_string())),
    };
    let log = spec.log.clone();
    adapter::Adapter::new(
        cfg,
        mount_map(spec),
        Arc::new(move |m: &str| log.append(m.as_bytes())),
    )
    .map(Some)
    .map_err(|e| ExecError::Config(format!("metrics-adapter: {}", adapter::error_chain(&e))))
}

async fn start_adapter(spec: ContainerSpec) -> Result<Box<dyn Instance>, ExecError> {
    let id = format!(
        "builtin://metrics-adapter/{}",
        uuid::Uuid::new_v4().simple()
    );
    let Some(a) = adapter_new(&spec)? else {
        // `--help`: the text goes to the container's log and the container exits 0.
        if let Err(flags::FlagError::Help(text)) = adapter::Config::parse(&spec.args, &spec.env) {
            spec.log.append(text.as_bytes());
        }
        let (done_tx, done_rx) = oneshot::channel();
        let _ = done_tx.send(ExitStatus::code(0));
        return Ok(Box::new(TaskInstance::new(
            id,
            done_rx,
            CancellationToken::new(),
        )));
    };
    let a = Arc::new(a);
    let cfg = a.cfg.clone();
    // Sockets, scrapes and file reads all happen in the pod: it runs on the pod's runtime.
    let bound = match &spec.sandbox_rt {
        Some(rt) => rt
            .spawn(async move { adapter::bind_std(&cfg) })
            .await
            .map_err(|e| ExecError::StartFailed(format!("pod network thread: {e}")))?,
        None => adapter::bind_std(&cfg),
    }
    .map_err(|e| ExecError::StartFailed(format!("metrics-adapter: cannot listen: {e}")))?;
    let handle: Weak<dyn BuiltinStatus> = Arc::downgrade(&a) as Weak<adapter::Adapter>;
    register_builtin(&spec, handle);
    let key = format!("{}/{}/{}", spec.pod_namespace, spec.pod_name, spec.name);
    adapter::node_registries()
        .lock()
        .unwrap()
        .insert(key.clone(), Arc::downgrade(&a.reg));
    adapter::node_adapters()
        .lock()
        .unwrap()
        .insert(key, Arc::downgrade(&a));
    let stop = CancellationToken::new();
    let (done_tx, done_rx) = oneshot::channel();
    let token = stop.clone();
    let run = async move {
        let (udp, http) = bound;
        let udp: Option<tokio::net::UdpSocket> = udp
            .map(tokio::net::UdpSocket::from_std)
            .transpose()
            .unwrap_or_default();
        if let Ok(http) = tokio::net::TcpListener::from_std(http) {
            a.serve(udp, http, token).await;
        }
        let _ = done_tx.send(ExitStatus::code(0));
    };
    match &spec.sandbox_rt {
        Some(rt) => {
            rt.spawn(run);
        }
        None => {
            tokio::spawn(run);
        }
    }
    Ok(Box::new(TaskInstance::new(id, done_rx, stop)))
}

/// The ambassador's configuration, or `Ok(Err(help))` when its args ask for `--help` (the
/// container then prints it to its log and exits 0). A bad flag is a config error naming it.
fn ambassador_config(spec: &ContainerSpec) -> Result<Result<redis::Config, String>, ExecError> {
    match redis::Config::parse(&spec.args, &spec.env) {
        Ok(cfg) => Ok(Ok(cfg)),
        Err(e) => match e.help_text() {
            Some(help) => Ok(Err(help.to_string())),
            None => Err(ExecError::Config(e.to_string())),
        },
    }
}

/// Runs `builtin/*` images.
pub struct BuiltinExecutor {
    /// The node's Docker, where git-sync's exechooks run (in an OCI member of the pod).
    docker: Option<Arc<DockerExecutor>>,
}

impl BuiltinExecutor {
    pub fn new(docker: Option<Arc<DockerExecutor>>) -> Self {
        BuiltinExecutor { docker }
    }
}

const NO_HOOK_RUNNER: &str =
    "--exechook-command needs an OCI container in the pod to run in; hooks never run on the node";

/// git-sync's configuration and its places on the node. With `--exechook-command`, also the
/// pod members (OCI containers mounting `--root`'s volume, in pod order) the hook may run in.
fn gitsync_config(
    spec: &ContainerSpec,
    docker: Option<&Arc<DockerExecutor>>,
) -> Result<(gitsync::Config, gitsync::Paths, Vec<String>), ExecError> {
    let cfg = gitsync::Config::parse(&spec.args, &spec.env)
        .map_err(|e| ExecError::Config(gitsync::redact(&e.to_string())))?;
    let mounts: Vec<(PathBuf, String)> = spec
        .mounts
        .iter()
        .filter(|m| !m.read_only)
        .map(|m| (m.host_path.clone(), m.guest_path.clone()))
        .collect();
    let (volume, root_rel) = gitsync::split_mount(&mounts, &cfg.root).ok_or_else(|| {
        ExecError::Config(format!(
            "git-sync: --root {} is outside the container's writable volume mounts ({}); git-sync writes only inside its volumes",
            cfg.root.display(),
            spec.mounts.iter().map(|m| m.guest_path.as_str()).collect::<Vec<_>>().join(", ")
        ))
    })?;
    let private = spec.private_dir.clone().ok_or_else(|| {
        ExecError::Config("git-sync: this node gives the container no private directory".into())
    })?;
    // Credentials are read from the container's volumes (a Secret mounted read-only), through
    // a handle on the volume.
    let all: Vec<(PathBuf, String)> = spec
        .mounts
        .iter()
        .map(|m| (m.host_path.clone(), m.guest_path.clone()))
        .collect();
    let inside = |flag: &str,
                  p: &Option<PathBuf>|
     -> Result<Option<gitsync::BeneathFile>, ExecError> {
        p.as_ref()
            .map(|guest| {
                gitsync::split_mount(&all, guest)
                    .map(|(base, rel)| gitsync::BeneathFile { base, rel })
                    .ok_or_else(|| {
                        ExecError::Config(format!(
                            "git-sync: {flag} {} is not inside any of the container's volume mounts",
                            guest.display()
                        ))
                    })
            })
            .transpose()
    };
    let paths = gitsync::Paths {
        volume,
        root_rel,
        private,
        password_file: inside("--password-file", &cfg.password_file)?,
        ssh_key_file: inside("--ssh-key-file", &cfg.ssh_key_file)?,
        ssh_known_hosts_file: inside("--ssh-known-hosts-file", &cfg.ssh_known_hosts_file)?,
    };
    let mut members = Vec::new();
    if cfg.exechook_command.is_some() {
        let pod = spec
            .pod
            .as_ref()
            .ok_or_else(|| ExecError::Config(format!("git-sync: {NO_HOOK_RUNNER}")))?;
        // The volume --root is in, by git-sync's own volumeMounts.
        let me = pod
            .spec
            .init_containers
            .iter()
            .chain(pod.spec.containers.iter())
            .find(|c| c.name == spec.name);
        let volume_name = me.and_then(|c| {
            c.volume_mounts
                .iter()
                .filter(|m| !m.read_only.unwrap_or(false) && cfg.root.starts_with(&m.mount_path))
                .max_by_key(|m| m.mount_path.len())
                .map(|m| m.name.clone())
        });
        members = pod
            .spec
            .containers
            .iter()
            .chain(pod.spec.init_containers.iter())
            .filter(|c| !c.is_wasm() && !c.image.starts_with("builtin/"))
            .filter(|c| {
                c.volume_mounts
                    .iter()
                    .any(|m| Some(&m.name) == volume_name.as_ref())
            })
            .map(|c| c.name.clone())
            .collect();
        if members.is_empty() {
            return Err(ExecError::Config(format!(
                "git-sync: {NO_HOOK_RUNNER} (no OCI container of pod {} mounts volume {:?})",
                pod.name(),
                volume_name.unwrap_or_default()
            )));
        }
        if docker.is_none() {
            return Err(ExecError::Config(format!(
                "git-sync: {NO_HOOK_RUNNER} (this node runs no OCI containers)"
            )));
        }
    }
    Ok((cfg, paths, members))
}

/// Runs git-sync's exechook in the first running member of `members` that mounts the
/// worktree, with `docker exec`, in the worktree as that container sees it.
struct DockerHooks {
    docker: Arc<DockerExecutor>,
    pod_uid: String,
    members: Vec<String>,
}

/// `host` as a container with `mounts` (host source, container path) sees it.
fn container_path(mounts: &[(PathBuf, String)], host: &Path) -> Option<String> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    mounts
        .iter()
        .filter_map(|(src, dst)| {
            let rest = host
                .strip_prefix(src)
                .or_else(|_| host.strip_prefix(canon(src)))
                .ok()?;
            Some((src.as_os_str().len(), Path::new(dst).join(rest)))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p.to_string_lossy().into_owned())
}

#[async_trait]
impl gitsync::PodExec for DockerHooks {
    async fn run_hook(
        &self,
        command: &str,
        worktree: &Path,
        hash: &str,
        timeout: Duration,
    ) -> Result<gitsync::HookOutput, gitsync::HookError> {
        use gitsync::HookError;
        let running = self
            .docker
            .running_pod_containers(&self.pod_uid)
            .await
            .map_err(|e| HookError::NotYet(e.to_string()))?;
        for name in &self.members {
            let Some(c) = running.iter().find(|c| &c.name == name) else {
                continue;
            };
            let Some(dir) = container_path(&c.mounts, worktree) else {
                continue;
            };
            let argv = vec!["sh".to_string(), "-c".to_string(), command.to_string()];
            let out = self
                .docker
                .exec_with(
                    &c.id,
                    &argv,
                    &[format!("GITSYNC_HASH={hash}")],
                    Some(&dir),
                    timeout,
                )
                .await
                .map_err(|e| HookError::Failed(format!("exechook in container {name}: {e}")))?;
            return Ok(gitsync::HookOutput {
                exit_code: out.exit_code,
                output: out.output,
                ran_in: format!("container {name}"),
            });
        }
        Err(HookError::NotYet(format!(
            "no container of the pod that mounts the worktree is running yet ({})",
            self.members.join(", ")
        )))
    }
}

#[async_trait]
impl Executor for Arc<BuiltinExecutor> {
    fn handles(&self, image: &str) -> bool {
        image.starts_with("builtin/")
    }

    fn runtime(&self) -> &'static str {
        "builtin"
    }

    /// git-sync fetches from the node's network; only its `--http-bind` lives in the pod.
    /// The ambassador listens on the pod's localhost, so the pod needs its own network.
    fn needs_network(&self, image: &str, _module: Option<&str>) -> bool {
        image == REDIS_AMBASSADOR || image == METRICS_ADAPTER
    }

    async fn prepare(
        &self,
        spec: &ContainerSpec,
        _progress: ExecutorProgress,
    ) -> Result<(), ExecError> {
        match spec.image.as_str() {
            GIT_SYNC if gitsync_help(spec).is_some() => Ok(()),
            GIT_SYNC => gitsync_config(spec, self.docker.as_ref()).map(|_| ()),
            REDIS_AMBASSADOR => ambassador_config(spec).map(|_| ()),
            METRICS_ADAPTER => adapter_new(spec).map(|_| ()),
            other => Err(ExecError::InvalidImage(format!(
                "unknown built-in component {other:?}; this build has: {ALL}"
            ))),
        }
    }

    async fn start(&self, spec: ContainerSpec) -> Result<Box<dyn Instance>, ExecError> {
        match spec.image.as_str() {
            REDIS_AMBASSADOR => start_ambassador(spec).await,
            METRICS_ADAPTER => start_adapter(spec).await,
            _ => match gitsync_help(&spec) {
                Some(text) => Ok(help_instance(&spec, "git-sync", &text)),
                None => start_gitsync(spec, self.docker.clone()).await,
            },
        }
    }
}

/// Bind `addr` in the pod's network namespace (on its runtime's thread) when it has one.
async fn bind_in_pod(spec: &ContainerSpec, addr: &str) -> Result<std::net::TcpListener, ExecError> {
    let std_listener = match &spec.sandbox_rt {
        Some(rt) => {
            let a = addr.to_string();
            rt.spawn(async move { redis::bind_std(&a) })
                .await
                .map_err(|e| ExecError::StartFailed(format!("pod network thread: {e}")))?
        }
        None => redis::bind_std(addr),
    }
    .map_err(|e| ExecError::StartFailed(format!("cannot listen on {addr}: {e}")));
    std_listener
}

async fn start_ambassador(spec: ContainerSpec) -> Result<Box<dyn Instance>, ExecError> {
    let id = format!(
        "builtin://redis-ambassador/{}",
        uuid::Uuid::new_v4().simple()
    );
    let cfg = match ambassador_config(&spec)? {
        Ok(cfg) => cfg,
        Err(help) => {
            spec.log.append(help.as_bytes());
            let (done_tx, done_rx) = oneshot::channel();
            let _ = done_tx.send(ExitStatus::code(0));
            return Ok(Box::new(TaskInstance::new(
                id,
                done_rx,
                CancellationToken::new(),
            )));
        }
    };
    let listener = bind_in_pod(&spec, &cfg.listen).await?;
    let metrics = match &cfg.metrics_listen {
        Some(a) => Some(bind_in_pod(&spec, a).await?),
        None => None,
    };
    let log = spec.log.clone();
    let amb = redis::Ambassador::new(cfg, Arc::new(move |m: &str| log.append(m.as_bytes())))
        .map_err(|e| ExecError::Config(format!("redis-ambassador: {}", redis::error::chain(&e))))?;
    // Held by the task below while the ambassador serves; the registry keeps a weak handle.
    let status = Arc::new(amb.status_handle());
    register_builtin(&spec, Arc::downgrade(&status) as Weak<redis::StatusHandle>);
    let stop = CancellationToken::new();
    let (done_tx, done_rx) = oneshot::channel();
    // Served from a node thread: upstream connections leave from the node's network.
    let finished = amb
        .spawn_thread(listener, metrics, stop.clone())
        .map_err(|e| ExecError::StartFailed(format!("redis-ambassador thread: {e}")))?;
    tokio::spawn(async move {
        let _ = finished.await;
        drop(status);
        let _ = done_tx.send(ExitStatus::code(0));
    });
    Ok(Box::new(TaskInstance::new(id, done_rx, stop)))
}

async fn start_gitsync(
    spec: ContainerSpec,
    docker: Option<Arc<DockerExecutor>>,
) -> Result<Box<dyn Instance>, ExecError> {
    {
        let (cfg, paths, members) = gitsync_config(&spec, docker.as_ref())?;
        if let Some(parent) = paths.private.parent() {
            gitsync::create_private_dir(parent).map_err(|e| {
                ExecError::StartFailed(format!("git-sync: creating its private directory: {e}"))
            })?;
        }
        let hooks = match docker {
            Some(docker) if !members.is_empty() => {
                gitsync::HookRunner::InPod(Arc::new(DockerHooks {
                    docker,
                    pod_uid: spec.pod_uid.clone(),
                    members,
                }))
            }
            // No exechook (gitsync_config refused one without a member to run in).
            _ => gitsync::HookRunner::Local { env: Vec::new() },
        };
        let stats = Arc::new(gitsync::Stats::default());
        let log = spec.log.clone();
        let events = spec.events.clone();
        let sync = Arc::new(gitsync::GitSync::new(
            cfg.clone(),
            paths,
            Arc::new(move |m: &str| log.append(gitsync::redact(m).as_bytes())),
            Arc::new(move |m: &str| {
                if let Some(e) = &events {
                    e("GitSyncFailed", &gitsync::redact(m));
                }
            }),
            stats.clone(),
            hooks,
        ));
        let handle: Weak<dyn BuiltinStatus> = Arc::downgrade(&sync) as Weak<gitsync::GitSync>;
        register_builtin(&spec, handle);
        let stop = CancellationToken::new();
        if let Some(bind) = &cfg.http_bind {
            let app = status_router(stats.clone());
            let bind = bind.clone();
            let token = stop.clone();
            let serve = async move {
                match tokio::net::TcpListener::bind(&bind).await {
                    Ok(l) => {
                        let _ = axum::serve(l, app)
                            .with_graceful_shutdown(token.cancelled_owned())
                            .await;
                    }
                    Err(e) => tracing::warn!(error = %e, %bind, "git-sync --http-bind"),
                }
            };
            // Inside the pod's network namespace when it has one.
            match &spec.sandbox_rt {
                Some(rt) => {
                    rt.spawn(serve);
                }
                None => {
                    tokio::spawn(serve);
                }
            }
        }
        let (first_tx, first_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let token = stop.clone();
        tokio::spawn(async move {
            let r = sync.run(token, Some(first_tx)).await;
            let _ = done_tx.send(match r {
                Ok(()) => ExitStatus::code(0),
                Err(e) => ExitStatus {
                    exit_code: 1,
                    reason: "Error".into(),
                    message: Some(gitsync::redact(&e.to_string())),
                },
            });
        });
        // The container counts as started once the first sync is on disk, so a native sidecar
        // holds the app back until then. A first sync that gives up fails the start (the
        // runner retries with back-off; the app keeps waiting).
        let first = tokio::time::timeout(cfg.sync_timeout + Duration::from_secs(5), first_rx).await;
        if let Ok(Ok(Err(msg))) = first {
            stop.cancel();
            return Err(ExecError::StartFailed(format!(
                "git-sync: first sync failed: {}",
                gitsync::redact(&msg.to_string())
            )));
        }
        Ok(Box::new(TaskInstance::new(
            format!("builtin://git-sync/{}", uuid::Uuid::new_v4().simple()),
            done_rx,
            stop,
        )))
    }
}

fn status_router(stats: Arc<gitsync::Stats>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let s1 = stats.clone();
    axum::Router::new()
        .route(
            "/",
            get(move || {
                let ready = s1.synced_once.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let s = stats.clone();
                async move {
                    format!(
                        "# HELP git_sync_count_total How many git syncs completed, by status.\n# TYPE git_sync_count_total counter\ngit_sync_count_total{{status=\"success\"}} {}\ngit_sync_count_total{{status=\"error\"}} {}\n# HELP git_sync_duration_seconds Duration of the last sync.\n# TYPE git_sync_duration_seconds gauge\ngit_sync_duration_seconds {}\n",
                        s.success.load(Ordering::Relaxed),
                        s.errors.load(Ordering::Relaxed),
                        s.last_duration_ms.load(Ordering::Relaxed) as f64 / 1000.0
                    )
                }
            }),
        )
}
