//! Built-in pattern components, run natively inside Kapsel in the pod's sandbox:
//! `builtin/git-sync` (the sidecar, [`gitsync`]) and `builtin/redis-ambassador` (the
//! ambassador, [`redis`]). [`BuiltinExecutor`] puts them behind the same executor trait as WASM
//! and Docker.

pub mod adapter;
pub mod gitsync;
pub mod redis;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::runtime::executor::{
    ContainerSpec, ExecError, Executor, ExecutorProgress, ExitStatus, Instance, TaskInstance,
};

pub const GIT_SYNC: &str = "builtin/git-sync";
pub const REDIS_AMBASSADOR: &str = "builtin/redis-ambassador";
pub const METRICS_ADAPTER: &str = "builtin/metrics-adapter";
const ALL: &str = "builtin/git-sync, builtin/redis-ambassador, builtin/metrics-adapter";

/// The adapter's view of paths: its volume mounts.
fn mount_map(spec: &ContainerSpec) -> adapter::PathMap {
    let mounts: Vec<(PathBuf, String)> = spec
        .mounts
        .iter()
        .map(|m| (m.host_path.clone(), m.guest_path.clone()))
        .collect();
    Arc::new(move |p: &str| gitsync::host_path(&mounts, std::path::Path::new(p)))
}

fn adapter_new(spec: &ContainerSpec) -> Result<adapter::Adapter, ExecError> {
    let cfg = adapter::Config::parse(&spec.args, &spec.env)
        .map_err(|e| ExecError::Config(format!("metrics-adapter: {e}")))?;
    let log = spec.log.clone();
    adapter::Adapter::new(
        cfg,
        mount_map(spec),
        Arc::new(move |m: &str| log.append(m.as_bytes())),
    )
    .map_err(|e| ExecError::Config(format!("metrics-adapter: {e}")))
}

async fn start_adapter(spec: ContainerSpec) -> Result<Box<dyn Instance>, ExecError> {
    let a = Arc::new(adapter_new(&spec)?);
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
    let key = format!("{}/{}/{}", spec.pod_namespace, spec.pod_name, spec.name);
    adapter::node_registries()
        .lock()
        .unwrap()
        .insert(key, Arc::downgrade(&a.reg));
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
    Ok(Box::new(TaskInstance::new(
        format!(
            "builtin://metrics-adapter/{}",
            uuid::Uuid::new_v4().simple()
        ),
        done_rx,
        stop,
    )))
}

fn ambassador_config(spec: &ContainerSpec) -> Result<redis::Config, ExecError> {
    redis::Config::parse(&spec.args, &spec.env)
        .map_err(|e| ExecError::Config(format!("redis-ambassador: {e}")))
}

/// Runs `builtin/*` images.
pub struct BuiltinExecutor;

fn gitsync_config(spec: &ContainerSpec) -> Result<(gitsync::Config, PathBuf), ExecError> {
    let cfg = gitsync::Config::parse(&spec.args, &spec.env)
        .map_err(|e| ExecError::Config(format!("git-sync: {e}")))?;
    let mounts: Vec<(PathBuf, String)> = spec
        .mounts
        .iter()
        .filter(|m| !m.read_only)
        .map(|m| (m.host_path.clone(), m.guest_path.clone()))
        .collect();
    let root = gitsync::host_path(&mounts, &cfg.root).ok_or_else(|| {
        ExecError::Config(format!(
            "git-sync: --root {} is outside the container's writable volume mounts ({}); git-sync writes only inside its volumes",
            cfg.root.display(),
            spec.mounts.iter().map(|m| m.guest_path.as_str()).collect::<Vec<_>>().join(", ")
        ))
    })?;
    // Credentials are read from the container's volumes (a Secret mounted read-only).
    let all: Vec<(PathBuf, String)> = spec
        .mounts
        .iter()
        .map(|m| (m.host_path.clone(), m.guest_path.clone()))
        .collect();
    let mut cfg = cfg;
    for (flag, p) in [
        ("--password-file", &mut cfg.password_file),
        ("--ssh-key-file", &mut cfg.ssh_key_file),
        ("--ssh-known-hosts-file", &mut cfg.ssh_known_hosts_file),
    ] {
        if let Some(guest) = p.as_ref() {
            let host = gitsync::host_path(&all, guest).ok_or_else(|| {
                ExecError::Config(format!(
                    "git-sync: {flag} {} is not inside any of the container's volume mounts",
                    guest.display()
                ))
            })?;
            *p = Some(host);
        }
    }
    Ok((cfg, root))
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
    fn needs_network(&self, image: &str) -> bool {
        image == REDIS_AMBASSADOR || image == METRICS_ADAPTER
    }

    async fn prepare(
        &self,
        spec: &ContainerSpec,
        _progress: ExecutorProgress,
    ) -> Result<(), ExecError> {
        match spec.image.as_str() {
            GIT_SYNC => gitsync_config(spec).map(|_| ()),
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
            _ => start_gitsync(spec).await,
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
    let cfg = ambassador_config(&spec)?;
    let listener = bind_in_pod(&spec, &cfg.listen).await?;
    let metrics = match &cfg.metrics_listen {
        Some(a) => Some(bind_in_pod(&spec, a).await?),
        None => None,
    };
    let log = spec.log.clone();
    let amb = redis::Ambassador::new(cfg, Arc::new(move |m: &str| log.append(m.as_bytes())))
        .map_err(|e| ExecError::Config(format!("redis-ambassador: {e}")))?;
    let stop = CancellationToken::new();
    let (done_tx, done_rx) = oneshot::channel();
    // Served from a node thread: upstream connections leave from the node's network.
    let finished = amb
        .spawn_thread(listener, metrics, stop.clone())
        .map_err(|e| ExecError::StartFailed(format!("redis-ambassador thread: {e}")))?;
    tokio::spawn(async move {
        let _ = finished.await;
        let _ = done_tx.send(ExitStatus::code(0));
    });
    Ok(Box::new(TaskInstance::new(
        format!(
            "builtin://redis-ambassador/{}",
            uuid::Uuid::new_v4().simple()
        ),
        done_rx,
        stop,
    )))
}

async fn start_gitsync(spec: ContainerSpec) -> Result<Box<dyn Instance>, ExecError> {
    {
        let (cfg, root) = gitsync_config(&spec)?;
        let stats = Arc::new(gitsync::Stats::default());
        let log = spec.log.clone();
        let events = spec.events.clone();
        let sync = Arc::new(gitsync::GitSync {
            cfg: cfg.clone(),
            root,
            log: Arc::new(move |m: &str| log.append(m.as_bytes())),
            warn: Arc::new(move |m: &str| {
                if let Some(e) = &events {
                    e("GitSyncFailed", m);
                }
            }),
            stats: stats.clone(),
            env: spec.env.clone(),
        });
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
                Err(m) => ExitStatus {
                    exit_code: 1,
                    reason: "Error".into(),
                    message: Some(m),
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
                "git-sync: first sync failed: {msg}"
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
