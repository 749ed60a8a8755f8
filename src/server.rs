//! `kapsel serve`: one process holding the control plane (store, API, scheduler, controllers,
//! the node lifecycle controller) and a node
//! (agent + WASM executor). Shutdown is deliberate: cancel → the API stops accepting, the
//! scheduler stops, the node agent stops every pod, then the process exits.
//! The data directory is the node's alone: it is made (or tightened to) 0700, as are the
//! node-private directories in it, and the store file is 0600.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::events::Recorder;
use crate::model::Kind;
use crate::runtime::agent::{NodeAgent, NodeResources};
use crate::runtime::backoff::BackoffConfig;
use crate::runtime::docker::DockerExecutor;
use crate::runtime::executor::{ExecError, Executor};
use crate::runtime::logs::Logs;
use crate::runtime::wasm::{WasmConfig, WasmExecutor};
use crate::runtime::worker::AgentCtx;
use crate::sched::controllers::Controllers;
use crate::sched::nodelifecycle::{LifecycleConfig, NodeLifecycle};
use crate::sched::scheduler::Scheduler;
use crate::store::redb::RedbStore;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("runtime: {0}")]
    Runtime(#[from] ExecError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("control plane client: {0}")]
    Client(#[from] crate::client::ClientError),
    #[error("cluster PKI: {0}")]
    Pki(#[from] crate::pki::PkiError),
    #[error("joining the cluster: {0}")]
    Join(#[from] crate::pki::join::JoinError),
    #[error("{0}")]
    Modules(#[from] crate::modules::ModuleError),
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    pub node_name: String,
    pub max_pods: u64,
    pub backoff: BackoffConfig,
    pub wasm_pool_slots: u32,
    pub wasm_pool_memory: u64,
    /// Memory budget of a WASM guest without `resources.limits.memory` (None: unlimited).
    pub wasm_default_memory_limit: Option<u64>,
    /// Pod network namespaces (false only in tests: the unprivileged fallback, forced).
    pub pod_netns: bool,
    /// How long events are kept.
    pub event_ttl: Duration,
    /// Docker Engine socket; `None` makes a WASM-only node.
    pub docker_host: Option<String>,
    /// How often size-limited emptyDirs are measured.
    pub volume_check_interval: Duration,
    /// The API's connection cap, header-read timeout and drain deadline.
    pub api_listener: api::listener::ListenerConfig,
    /// Extra `Host` names the API answers to (see `api::guard`).
    pub allowed_hosts: Vec<String>,
    /// Where compiled WASM modules are cached; `None`: `<data-dir>/cache/wasm`. `kapsel up`
    /// uses the user's cache ([`user_module_cache`]) so a fresh temporary data directory does
    /// not recompile every module on every run.
    pub module_cache_dir: Option<PathBuf>,
    /// The address this node reports as its pods' `hostIP` and its Node's InternalIP.
    pub host_ip: String,
    /// `--cluster-listen`: the TLS listener for nodes (`None`: no such listener, no CA).
    pub cluster_listen: Option<String>,
    /// Names and addresses the cluster listener's certificate carries besides the listen
    /// address and the loopback (`--cluster-advertise-address`, `--tls-san`).
    pub cluster_sans: Vec<String>,
    /// How often the node renews its Lease (`--node-lease-renew-interval`).
    pub node_lease_renew_interval: Duration,
    /// The node lifecycle controller's knobs (`serve` only).
    pub lifecycle: LifecycleConfig,
    /// The largest module the module store accepts (`--max-module-size`).
    pub max_module_bytes: u64,
    /// `--node-label`s and `--node-taint`s the node registers with.
    pub node_labels: std::collections::BTreeMap<String, String>,
    pub node_taints: Vec<crate::model::taint::Taint>,
}

impl ServerConfig {
    pub fn new(listen: &str, data_dir: PathBuf, node_name: &str) -> Self {
        ServerConfig {
            listen: listen.to_string(),
            data_dir,
            node_name: node_name.to_string(),
            max_pods: 10_000,
            backoff: BackoffConfig::default(),
            wasm_pool_slots: 1024,
            wasm_pool_memory: 64 << 20,
            wasm_default_memory_limit: Some(crate::runtime::wasm::DEFAULT_MEMORY_LIMIT),
            pod_netns: true,
            event_ttl: Duration::from_secs(3600),
            docker_host: Some("unix:///var/run/docker.sock".into()),
            volume_check_interval: Duration::from_secs(5),
            api_listener: api::listener::ListenerConfig::default(),
            allowed_hosts: Vec::new(),
            module_cache_dir: None,
            host_ip: "127.0.0.1".into(),
            cluster_listen: None,
            cluster_sans: Vec::new(),
            node_lease_renew_interval: crate::runtime::agent::DEFAULT_LEASE_RENEW_INTERVAL,
            lifecycle: LifecycleConfig::default(),
            max_module_bytes: crate::modules::DEFAULT_MAX_MODULE_BYTES,
            node_labels: Default::default(),
            node_taints: Vec::new(),
        }
    }
}

/// The user's compiled-module cache: `$XDG_CACHE_HOME/kapsel/wasm` (else `~/.cache/kapsel/wasm`),
/// created 0700. Compiled modules are native code loaded without re-verification, so the
/// directory must be the user's alone: `None` (use the data directory) when it is owned by
/// someone else or writable by group or others, or when no home is known.
pub fn user_module_cache() -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".cache"))
        })?;
    let kapsel = base.join("kapsel");
    let dir = kapsel.join("wasm");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    for d in [&kapsel, &dir] {
        let m = std::fs::symlink_metadata(d).ok()?;
        if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
            tracing::warn!(dir = %d.display(), "not using the module cache: not a directory of this user's alone");
            return None;
        }
    }
    Some(dir)
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    /// The cluster listener's bound address, with `--cluster-listen`.
    pub cluster_addr: Option<SocketAddr>,
    /// `<data-dir>/token`: the default join token, with `--cluster-listen`.
    pub token_path: Option<PathBuf>,
    pub store: Arc<dyn Store>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Server {
    /// Open the store, bind the API, start the scheduler and the node. Returns once listening.
    pub async fn start(cfg: ServerConfig) -> Result<Server, ServerError> {
        private_dir(&cfg.data_dir)?;
        let store_dir = cfg.data_dir.join("store");
        private_dir(&store_dir)?;
        let store: Arc<dyn Store> = RedbStore::open(&store_dir)?;
        private_files(&store_dir)?;
        let pods_dir = cfg.data_dir.join("pods");
        let logs = Logs::new(pods_dir);

        let listener =
            api::listener::bind(&cfg.listen)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: cfg.listen.clone(),
                    source,
                })?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();

        // The cluster listener: bound first, so its address goes into its certificate.
        let mut cluster = None;
        if let Some(cl) = &cfg.cluster_listen {
            let l = api::listener::bind(cl)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: cl.clone(),
                    source,
                })?;
            let bound = l.local_addr()?;
            let mut sans = cfg.cluster_sans.clone();
            if !bound.ip().is_unspecified() {
                sans.push(bound.ip().to_string());
            }
            let c = Arc::new(crate::pki::Cluster::open(&cfg.data_dir, &sans)?);
            // The server's own node name is never a joining node's.
            c.nodes.reserve(&cfg.node_name);
            let token_path = c.default_token(&cfg.data_dir)?;
            let tls = crate::pki::tls::server_config(&c.ca)?;
            cluster = Some((l, bound, token_path, c, tls));
        }

        let modules = Arc::new(crate::modules::ModuleStore::open(
            &cfg.data_dir,
            cfg.max_module_bytes,
        )?);
        let state = AppState {
            modules: Some(modules.clone()),
            store: store.clone(),
            logs: logs.clone(),
            shutdown: cancel.clone(),
            cluster: cluster.as_ref().map(|(_, _, _, c, _)| c.clone()),
            default_toleration_seconds: cfg.lifecycle.default_toleration_seconds,
            nodes: api::tunnel::NodeLinks::new(&cfg.node_name),
            pods_by_node: api::podwatch::PodsByNode::new(store.clone(), cancel.clone()),
        };
        let nodes = state.nodes.clone();
        let app = api::router(
            state.clone(),
            api::guard::RequestGuard::new(addr, &cfg.allowed_hosts),
        );
        let mut lcfg = cfg.api_listener.clone();
        lcfg.max_connections = api::listener::effective_max_connections(
            lcfg.max_connections,
            api::listener::raise_nofile_limit(),
        );
        tracker.spawn(api::listener::serve(
            listener,
            app,
            lcfg.clone(),
            cancel.clone(),
        ));
        let (mut cluster_addr, mut token_path) = (None, None);
        if let Some((l, bound, tp, _, tls)) = cluster {
            tracker.spawn(api::listener::serve_tls(
                l,
                api::cluster_router(state),
                lcfg,
                cancel.clone(),
                tls,
            ));
            cluster_addr = Some(bound);
            token_path = Some(tp);
        }

        tracker.spawn(Scheduler::new(store.clone()).run(cancel.clone()));
        tracker.spawn(
            Controllers::new(store.clone())
                .with_default_toleration_seconds(cfg.lifecycle.default_toleration_seconds)
                .run(cancel.clone()),
        );
        tracker.spawn(NodeLifecycle::new(store.clone(), cfg.lifecycle.clone()).run(cancel.clone()));
        tracker.spawn(gc_events(store.clone(), cfg.event_ttl, cancel.clone()));

        // The node reaches the objects through the client seam, in-process here.
        let (node_up, node_api) = start_node(
            &cfg,
            crate::client::LocalClient::with_modules(store.clone(), modules),
            logs,
            Some(addr),
            &tracker,
            &cancel,
        )?;
        let _ = nodes.local.set(node_api);
        tracker.close();
        // Ready means ready to run pods: the node has registered itself.
        let _ = tokio::time::timeout(Duration::from_secs(15), node_up).await;
        Ok(Server {
            addr,
            cluster_addr,
            token_path,
            store,
            cancel,
            tracker,
        })
    }

    /// Ask every part to stop.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Wait until every part has stopped.
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }
}

/// Start a node over `client`: its executors (WASM, the built-ins, Docker when configured) and
/// its agent, as tasks of `tracker` stopped by `cancel`. `serve` passes the in-process client,
/// `kapsel agent` the HTTP one. `api_addr`: the control plane's address, out of reach of pods on
/// the node's network. Returns a receiver that fires once the node has registered, and the
/// node's API ([`crate::runtime::nodeapi`]).
pub fn start_node(
    cfg: &ServerConfig,
    client: Arc<dyn crate::client::Client>,
    logs: Logs,
    api_addr: Option<SocketAddr>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<(tokio::sync::oneshot::Receiver<()>, axum::Router), ServerError> {
    private_dir(&cfg.data_dir)?;
    let pods_dir = cfg.data_dir.join("pods");
    private_dir(&pods_dir)?;
    private_dir(&cfg.data_dir.join("cache"))?;
    let node_id = node_identity(&cfg.data_dir)?;
    let mut wcfg = WasmConfig::new(
        cfg.module_cache_dir
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("cache").join("wasm")),
    );
    wcfg.pool_slots = cfg.wasm_pool_slots;
    wcfg.pool_memory = cfg.wasm_pool_memory;
    wcfg.default_memory_limit = cfg.wasm_default_memory_limit;
    let wasm = WasmExecutor::new(wcfg)?;
    if let Some(a) = api_addr {
        wasm.set_api_addr(a);
    }
    wasm.set_module_source(client.clone());
    let docker = cfg
        .docker_host
        .as_deref()
        .map(|h| DockerExecutor::new(h, &cfg.node_name, &node_id));
    let mut executors: Vec<Arc<dyn Executor>> = vec![
        Arc::new(wasm),
        Arc::new(Arc::new(crate::patterns::BuiltinExecutor::new(
            docker.clone(),
        ))),
    ];
    if let Some(d) = &docker {
        executors.push(Arc::new(d.clone()));
    }
    let node_api = crate::runtime::nodeapi::router(crate::runtime::nodeapi::NodeApi {
        logs: logs.clone(),
        client: client.clone(),
        docker: docker.clone(),
        shutdown: cancel.clone(),
    });
    let ctx = Arc::new(AgentCtx {
        client: client.clone(),
        node_name: cfg.node_name.clone(),
        pods_dir,
        logs,
        executors,
        docker,
        recorder: Recorder::with_client(client, "kapsel-node", Some(cfg.node_name.clone())),
        backoff: cfg.backoff,
        host_ip: cfg.host_ip.clone(),
        volume_check_interval: cfg.volume_check_interval,
        pod_netns: cfg.pod_netns,
        last_written: Default::default(),
    });
    let agent = NodeAgent::new(ctx, NodeResources::detect(cfg.max_pods))
        .with_lease_renew_interval(cfg.node_lease_renew_interval)
        .with_registration(cfg.node_labels.clone(), cfg.node_taints.clone());
    let (registered, node_up) = tokio::sync::oneshot::channel();
    tracker.spawn(agent.run(cancel.clone(), Some(registered)));
    Ok((node_up, node_api))
}

/// `kapsel agent`: a node without a control plane, reaching one over HTTP.
pub struct Agent {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Agent {
    /// Start the node's parts against the API at `server`; returns once it has registered
    /// (or after 15 s, the agent retrying in the background). An `https://` server is joined
    /// securely ([`crate::pki::join`]): the token only for the first join, the node's client
    /// certificate from then on. Over plain `http://` the token is sent as a bearer token.
    pub async fn start(
        cfg: ServerConfig,
        server: &str,
        token: Option<String>,
    ) -> Result<Agent, ServerError> {
        let mut tunnel_creds = None;
        let client = if server.starts_with("https://") {
            private_dir(&cfg.data_dir)?;
            // An unreachable server is waited for (it may be starting); a refusal is final.
            let mut wait = Duration::from_millis(500);
            let creds = loop {
                match crate::pki::join::credentials(
                    server,
                    token.as_deref(),
                    &cfg.data_dir,
                    &cfg.node_name,
                )
                .await
                {
                    Err(e @ crate::pki::join::JoinError::Unreachable { .. }) => {
                        tracing::warn!(error = %e, retry_in = ?wait, "joining: server unreachable");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(10));
                    }
                    r => break r?,
                }
            };
            let c = crate::client::http::HttpClient::shared_tls(server, &creds)?;
            tunnel_creds = Some(creds);
            c
        } else {
            crate::client::http::HttpClient::shared(server, token)?
        };
        let api_addr = reqwest::Url::parse(server)
            .ok()
            .and_then(|u| u.socket_addrs(|| None).ok())
            .and_then(|a| a.into_iter().next());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let logs = Logs::new(cfg.data_dir.join("pods"));
        let (node_up, node_api) = start_node(&cfg, client, logs, api_addr, &tracker, &cancel)?;
        // The node API reaches the server through the tunnel (a joined node only: over plain
        // `http://` the server has no node identity to register it under).
        match tunnel_creds {
            Some(creds) => {
                tracker.spawn(crate::runtime::tunnel::run(
                    server.to_string(),
                    creds,
                    node_api,
                    cancel.clone(),
                ));
            }
            None => tracing::warn!(
                "no node tunnel over plain http://: logs, metrics and exec of this node's pods are not reachable through the API"
            ),
        }
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(15), node_up).await;
        Ok(Agent { cancel, tracker })
    }

    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    pub async fn wait(&self) {
        self.tracker.wait().await;
    }
}

/// Create `dir` (and its parents) if needed and make it 0700, also when it existed with a
/// wider mode: only the node reads what it keeps there.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// This data directory's node identity: a random id made on first start and kept in
/// `<data-dir>/node-id`. Docker containers carry it, and start-up cleans up only its own, so two
/// servers on one machine (same node name, other data directories) never remove each other's.
fn node_identity(data_dir: &std::path::Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tmp = data_dir.join("node-id.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(id.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

/// Make the regular files directly in `dir` 0600 (the store's database).
fn private_files(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// Delete events older than the TTL (Kubernetes keeps them an hour).
async fn gc_events(store: Arc<dyn Store>, ttl: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(ttl).unwrap_or_default();
        let Ok((events, _)) = store.list(Kind::Event, None) else {
            continue;
        };
        for ev in events {
            let last = ev["lastTimestamp"]
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
            if last.map(|t| t < cutoff).unwrap_or(false) {
                let ns = ev["metadata"]["namespace"].as_str().unwrap_or("default");
                let name = ev["metadata"]["name"].as_str().unwrap_or("");
                let _ = store.delete(Kind::Event, ns, name, None).await;
            }
        }
    }
}
