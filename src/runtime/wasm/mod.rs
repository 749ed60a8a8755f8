//! The WASM executor: wasmtime + wasmtime-wasi, in-process.
//!
//! - Two engines with the same compiler settings: a **pooled** one (pooling allocator, sized by
//!   `--wasm-pool-slots` × `--wasm-pool-memory`, so address-space reservations fit small edge
//!   devices) for core modules whose memory limit fits a pool slot, and an **on-demand** one for
//!   components and large memories.
//! - Modules are compiled once and cached on disk by content digest
//!   (`<data-dir>/cache/wasm/<sha256>-<engine>.cwasm`), then kept in memory as `InstancePre`s,
//!   so a warm start is instantiate + run.
//! - A container whose pod names its module by digest runs the local file only if it has that
//!   digest; otherwise the module is fetched from the control plane ([`fetch`]).
//! - WASI preview 1 core modules (`_start`) and WASI 0.2 components (`wasi:cli/command`).
//! - The engines, their WASI linkers and the guest runtime are made by the first WASM pod: a node
//!   that runs none (an idle `kapsel agent`) never builds them.
//! - Guests run on a dedicated tokio runtime (`kapsel-wasm` threads), yield at every epoch tick
//!   and are CPU-limited by [`throttle`]; memory limits trap with `OOMKilled`.
//! - The only pre-opened directories are the container's volume mounts; a component may listen
//!   only on its declared `containerPort`s.

pub mod fetch;
pub mod limits;
pub mod stdio;
pub mod throttle;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use self::limits::{GuestLimits, MemoryLimitExceeded};
use self::stdio::LogSink;
use self::throttle::{EpochTicker, Throttled};
use super::executor::{
    ContainerSpec, ExecError, ExecutorProgress, ExitStatus, Instance, TaskInstance,
};
use crate::model::pod::is_wasm_image;
use crate::model::quantity::format_bytes;

/// Exit code reported for a trap (as `wasmtime run` exits: 128 + SIGABRT).
pub const TRAP_EXIT_CODE: i32 = 134;
/// Exit code reported for an instance killed by the runtime (128 + SIGKILL).
pub const KILLED_EXIT_CODE: i32 = 137;

/// Sizing of the WASM executor.
#[derive(Debug, Clone)]
pub struct WasmConfig {
    /// Where compiled modules are cached.
    pub cache_dir: PathBuf,
    /// Instances the pooling allocator holds at once (0 disables the pool).
    pub pool_slots: u32,
    /// Largest linear memory of a pooled instance; also its address-space reservation.
    pub pool_memory: u64,
    /// Epoch tick: how often a running guest yields (and how precise CPU limits are).
    pub tick: Duration,
    /// Threads running guests.
    pub threads: usize,
    /// The memory budget of a guest whose container sets no `resources.limits.memory`
    /// (None: unlimited).
    pub default_memory_limit: Option<u64>,
}

/// The node default for guests without a memory limit (`--wasm-default-memory-limit`): room for
/// a CPython component (tens of MiB) with a wide margin, yet a guest gone wrong stops at a size
/// the node survives instead of taking the kernel's OOM killer to the node's other processes,
/// the control plane included.
pub const DEFAULT_MEMORY_LIMIT: u64 = 512 << 20;

impl WasmConfig {
    pub fn new(cache_dir: PathBuf) -> Self {
        WasmConfig {
            cache_dir,
            pool_slots: 1024,
            pool_memory: 64 << 20,
            tick: Duration::from_millis(2),
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            default_memory_limit: Some(DEFAULT_MEMORY_LIMIT),
        }
    }
}

struct P1State {
    wasi: WasiP1Ctx,
    limits: GuestLimits,
}

struct P2State {
    ctx: WasiCtx,
    table: ResourceTable,
    limits: GuestLimits,
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

#[derive(Clone)]
enum Prepared {
    Core {
        engine: Engine,
        pre: InstancePre<P1State>,
    },
    Component {
        engine: Engine,
        pre: CommandPre<P2State>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum EngineKind {
    Pooled,
    OnDemand,
}

impl EngineKind {
    fn tag(self) -> &'static str {
        match self {
            EngineKind::Pooled => "pool",
            EngineKind::OnDemand => "dyn",
        }
    }
}

/// Runs `.wasm` / `.wat` images.
pub struct WasmExecutor {
    config: WasmConfig,
    /// Made by the first pod that needs them ([`WasmExecutor::engines`]): a node that runs no
    /// WASM pod (an idle `kapsel agent`) never builds an engine, links WASI or starts the guest
    /// runtime's threads, and keeps none of that code or memory resident.
    engines: OnceLock<Result<Engines, String>>,
    /// Prepared images by `<sha256>-<engine>`.
    prepared: Mutex<HashMap<String, Prepared>>,
    /// One lock per key so two pods of the same new module compile it once.
    compiling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// File path → (mtime, size, digest, bytes-kind) so a warm start does not re-hash the file.
    digests: Mutex<HashMap<PathBuf, (std::time::SystemTime, u64, String)>>,
    next_id: AtomicU64,
    stop_ticker: Arc<std::sync::atomic::AtomicBool>,
    /// The node API's listen address, which guests on the node's network may not connect to.
    api_addr: OnceLock<SocketAddr>,
    /// Modules by digest: checks local files, fetches the others ([`fetch`]).
    modules: fetch::ModuleFetcher,
}

/// The engines, their linkers and the runtime guests run on.
struct Engines {
    pooled: Option<(Engine, Linker<P1State>)>,
    ondemand: (
        Engine,
        Linker<P1State>,
        wasmtime::component::Linker<P2State>,
    ),
    /// The runtime guests run on, apart from the control plane's.
    rt: Option<tokio::runtime::Runtime>,
    /// Advances the epoch while any guest executes (time slicing, CPU limits, kill).
    ticker: Arc<EpochTicker>,
}

fn base_config() -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true);
    c.wasm_component_model(true);
    // Multi-memory modules run; all their memories count against the guest's one budget.
    c.wasm_multi_memory(true);
    c.cranelift_opt_level(wasmtime::OptLevel::Speed);
    // Each module compiles on its own blocking thread: with rayon-parallel compilation a small
    // module would queue behind every function of a large component being compiled.
    c.parallel_compilation(false);
    c
}

fn err_internal<E: std::fmt::Display>(e: E) -> ExecError {
    ExecError::Internal(e.to_string())
}

impl Engines {
    fn new(
        config: &WasmConfig,
        stop_ticker: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Engines, ExecError> {
        let pooled = if config.pool_slots > 0 {
            let mut c = base_config();
            let mut pool = PoolingAllocationConfig::default();
            pool.total_core_instances(config.pool_slots)
                .total_memories(config.pool_slots)
                .total_tables(config.pool_slots)
                .total_stacks(config.pool_slots)
                .total_component_instances(0)
                .max_memories_per_module(1)
                .max_tables_per_module(1)
                .max_memory_size(config.pool_memory as usize)
                .max_core_instance_size(1 << 20)
                .table_elements(65_536);
            c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            // Reserve only the slot size (explicit bounds checks beyond it), keeping the
            // whole pool's address space at slots × memory — small enough for a 39-bit VA.
            c.memory_reservation(config.pool_memory);
            c.memory_guard_size(64 << 10);
            c.memory_reservation_for_growth(0);
            match Engine::new(&c) {
                Ok(engine) => {
                    let mut linker = Linker::new(&engine);
                    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut P1State| {
                        &mut s.wasi
                    })
                    .map_err(err_internal)?;
                    Some((engine, linker))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pooling allocator unavailable; using on-demand allocation only");
                    None
                }
            }
        } else {
            None
        };
        let engine = Engine::new(&base_config()).map_err(err_internal)?;
        let mut l1 = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut l1, |s: &mut P1State| &mut s.wasi)
            .map_err(err_internal)?;
        let mut l2 = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut l2).map_err(err_internal)?;

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads.max(1))
            .thread_name("kapsel-wasm")
            .enable_all()
            .build()
            .map_err(err_internal)?;
        let engines: Vec<Engine> = pooled
            .iter()
            .map(|(e, _)| e.clone())
            .chain(std::iter::once(engine.clone()))
            .collect();
        let ticker = EpochTicker::start(engines, config.tick, stop_ticker).map_err(err_internal)?;
        Ok(Engines {
            pooled,
            ondemand: (engine, l1, l2),
            rt: Some(rt),
            ticker,
        })
    }

    fn pick(
        &self,
        config: &WasmConfig,
        is_component: bool,
        memory_limit: Option<u64>,
    ) -> EngineKind {
        match (&self.pooled, is_component, memory_limit) {
            (Some(_), false, Some(limit)) if limit <= config.pool_memory => EngineKind::Pooled,
            _ => EngineKind::OnDemand,
        }
    }
}

impl WasmExecutor {
    pub fn new(config: WasmConfig) -> Result<Arc<Self>, ExecError> {
        std::fs::create_dir_all(&config.cache_dir).map_err(err_internal)?;
        let modules = fetch::ModuleFetcher::new(&config.cache_dir).map_err(err_internal)?;
        Ok(Arc::new(WasmExecutor {
            modules,
            config,
            engines: OnceLock::new(),
            prepared: Mutex::default(),
            compiling: Mutex::default(),
            digests: Mutex::default(),
            next_id: AtomicU64::new(1),
            stop_ticker: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            api_addr: OnceLock::new(),
        }))
    }

    /// The engines, made on first use (a few milliseconds, blocking: call it off the async
    /// workers the first time, as [`WasmExecutor::prepared`] does). A failure is kept: every
    /// later pod gets the same error.
    fn engines(&self) -> Result<&Engines, ExecError> {
        self.engines
            .get_or_init(|| {
                Engines::new(&self.config, self.stop_ticker.clone()).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ExecError::Internal(e.clone()))
    }

    /// [`WasmExecutor::engines`] from async code: the first call builds them on a blocking
    /// thread.
    async fn engines_ready(self: &Arc<Self>) -> Result<&Engines, ExecError> {
        if self.engines.get().is_none() {
            let this = self.clone();
            tokio::task::spawn_blocking(move || this.engines().map(|_| ()))
                .await
                .map_err(err_internal)??;
        }
        self.engines()
    }

    /// Tell the executor where the node's API listens (once bound): guests on the node's
    /// network (no pod namespace) are refused connections to it.
    pub fn set_api_addr(&self, addr: SocketAddr) {
        let _ = self.api_addr.set(addr);
    }

    /// Where modules named by digest are fetched from: the node's client.
    pub fn set_module_source(&self, client: Arc<dyn crate::client::Client>) {
        self.modules.set_source(client);
    }

    /// The memory budget of the container's guest, and whether it is the node default.
    fn memory_limit(&self, spec: &ContainerSpec) -> (Option<u64>, bool) {
        match spec.memory_limit {
            Some(l) => (Some(l), false),
            None => (self.config.default_memory_limit, true),
        }
    }

    /// The image path of a container (`file://` stripped).
    pub fn image_path(image: &str) -> PathBuf {
        PathBuf::from(image.strip_prefix("file://").unwrap_or(image))
    }

    /// Read the image and return its digest, its binary form and whether it is a component.
    fn load(&self, path: &Path) -> Result<(String, Vec<u8>, bool), ExecError> {
        let bytes = std::fs::read(path).map_err(|e| {
            ExecError::ImagePull(format!("cannot read WASM image {}: {e}", path.display()))
        })?;
        let binary = if bytes.starts_with(b"\0asm") {
            bytes
        } else {
            match wat::parse_bytes(&bytes) {
                Ok(b) => b.into_owned(),
                Err(e) => {
                    let looks_text = std::str::from_utf8(&bytes[..bytes.len().min(64)])
                        .map(|s| s.trim_start().starts_with('('))
                        .unwrap_or(false);
                    return Err(ExecError::InvalidImage(if looks_text {
                        format!("{} is not valid WebAssembly text: {e}", path.display())
                    } else {
                        format!(
                            "{} is not a WebAssembly module or component (no \\0asm header)",
                            path.display()
                        )
                    }));
                }
            }
        };
        let is_component = binary.len() >= 8 && binary[4..8] != [1, 0, 0, 0];
        let digest = hex::encode(Sha256::digest(&binary));
        Ok((digest, binary, is_component))
    }

    fn pick_engine(&self, is_component: bool, memory_limit: Option<u64>) -> EngineKind {
        match self.engines.get() {
            Some(Ok(e)) => e.pick(&self.config, is_component, memory_limit),
            _ => EngineKind::OnDemand,
        }
    }

    /// Compile (or load from the disk cache) and pre-instantiate; cached in memory.
    async fn prepared(
        self: &Arc<Self>,
        spec: &ContainerSpec,
        progress: Option<&ExecutorProgress>,
    ) -> Result<Prepared, ExecError> {
        let path = self
            .modules
            .resolve(spec, Self::image_path(&spec.image), progress)
            .await?;
        // Fast path: unchanged file already prepared.
        let meta = std::fs::metadata(&path).map_err(|e| {
            ExecError::ImagePull(format!("cannot read WASM image {}: {e}", path.display()))
        })?;
        self.engines_ready().await?;
        let mtime = meta.modified().map_err(err_internal)?;
        let known = self.digests.lock().unwrap().get(&path).cloned();
        if let Some((m, size, key_base)) = known {
            if m == mtime && size == meta.len() {
                for kind in [EngineKind::Pooled, EngineKind::OnDemand] {
                    let key = format!("{key_base}-{}", kind.tag());
                    if let Some(p) = self.prepared.lock().unwrap().get(&key) {
                        let want = self.pick_engine(
                            matches!(p, Prepared::Component { .. }),
                            self.memory_limit(spec).0,
                        );
                        if want == kind {
                            return Ok(p.clone());
                        }
                    }
                }
            }
        }
        let this = self.clone();
        let p2 = path.clone();
        let (digest, binary, is_component) = tokio::task::spawn_blocking(move || this.load(&p2))
            .await
            .map_err(err_internal)??;
        self.digests
            .lock()
            .unwrap()
            .insert(path.clone(), (mtime, meta.len(), digest.clone()));
        let kind = self.pick_engine(is_component, self.memory_limit(spec).0);
        let key = format!("{digest}-{}", kind.tag());
        if let Some(p) = self.prepared.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let lock = self
            .compiling
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if let Some(p) = self.prepared.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let this = self.clone();
        let cache_file = self.config.cache_dir.join(format!("{key}.cwasm"));
        let size = binary.len();
        if !cache_file.exists() {
            if let Some(p) = progress {
                p(&format!(
                    "compiling {} ({} KiB) for the {} engine",
                    path.display(),
                    size / 1024,
                    if kind == EngineKind::Pooled {
                        "pooled"
                    } else {
                        "on-demand"
                    }
                ));
            }
        }
        let started = Instant::now();
        let path_for_msgs = path.clone();
        let dyn_cache = self
            .config
            .cache_dir
            .join(format!("{digest}-{}.cwasm", EngineKind::OnDemand.tag()));
        let prepared = tokio::task::spawn_blocking(move || {
            match this.compile(kind, is_component, &binary, &cache_file, &path_for_msgs) {
                // A module the pool's slots cannot hold (several memories or tables, a large
                // table) runs on the on-demand engine, under the same limits.
                Err(ExecError::InvalidImage(_)) if kind == EngineKind::Pooled => this.compile(
                    EngineKind::OnDemand,
                    is_component,
                    &binary,
                    &dyn_cache,
                    &path_for_msgs,
                ),
                r => r,
            }
        })
        .await
        .map_err(err_internal)??;
        let took = started.elapsed();
        if took > Duration::from_millis(500) {
            if let Some(p) = progress {
                p(&format!(
                    "compiled {} in {:.1}s",
                    path.display(),
                    took.as_secs_f64()
                ));
            }
        }
        self.prepared
            .lock()
            .unwrap()
            .insert(key.clone(), prepared.clone());
        self.compiling.lock().unwrap().remove(&key);
        Ok(prepared)
    }

    fn compile(
        &self,
        kind: EngineKind,
        is_component: bool,
        binary: &[u8],
        cache_file: &Path,
        path: &Path,
    ) -> Result<Prepared, ExecError> {
        let invalid = |e: wasmtime::Error| {
            ExecError::InvalidImage(format!(
                "{}: {}",
                path.display(),
                first_lines(&format!("{e:#}"))
            ))
        };
        let engines = self.engines()?;
        let (engine, l1) = match kind {
            EngineKind::Pooled => {
                let (e, l) = engines.pooled.as_ref().expect("pooled engine exists");
                (e.clone(), l)
            }
            EngineKind::OnDemand => (engines.ondemand.0.clone(), &engines.ondemand.1),
        };
        if is_component {
            // SAFETY: the file is one Kapsel wrote with `serialize` after its own compile, named by
            // the binary's hash, in Kapsel's module cache directory (no pod can write there);
            // wasmtime checks the engine and version header first, and a file that does not match
            // fails here and is compiled afresh.
            let component = match unsafe { Component::deserialize_file(&engine, cache_file) } {
                Ok(c) => c,
                Err(_) => {
                    let c = Component::new(&engine, binary).map_err(invalid)?;
                    write_cache(cache_file, c.serialize().map_err(err_internal)?);
                    c
                }
            };
            let pre = engines
                .ondemand
                .2
                .instantiate_pre(&component)
                .map_err(invalid)?;
            let pre = CommandPre::new(pre).map_err(|e| {
                ExecError::InvalidImage(format!(
                    "{}: not a wasi:cli/command component: {}",
                    path.display(),
                    first_lines(&format!("{e:#}"))
                ))
            })?;
            Ok(Prepared::Component { engine, pre })
        } else {
            // SAFETY: as for components above: a file this node serialized itself, header-checked.
            let module = match unsafe { Module::deserialize_file(&engine, cache_file) } {
                Ok(m) => m,
                Err(_) => {
                    let m = Module::new(&engine, binary).map_err(invalid)?;
                    write_cache(cache_file, m.serialize().map_err(err_internal)?);
                    m
                }
            };
            if module.get_export("_start").is_none() {
                return Err(ExecError::InvalidImage(format!(
                    "{}: the module exports no `_start` function (not a WASI command)",
                    path.display()
                )));
            }
            let pre = l1.instantiate_pre(&module).map_err(invalid)?;
            Ok(Prepared::Core { engine, pre })
        }
    }

    fn wasi_builder(spec: &ContainerSpec) -> Result<WasiCtxBuilder, ExecError> {
        let mut b = WasiCtxBuilder::new();
        b.args(&spec.argv);
        b.envs(&spec.env);
        let sink = LogSink(spec.log.clone());
        b.stdout(sink.clone());
        b.stderr(sink);
        for m in &spec.mounts {
            let perms = if m.read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            b.preopened_dir(&m.host_path, &m.guest_path, perms)
                .map_err(|e| {
                    ExecError::Config(format!(
                        "cannot open volume directory {} for {}: {e}",
                        m.host_path.display(),
                        m.guest_path
                    ))
                })?;
        }
        if let Some(wd) = &spec.working_dir {
            b.initial_cwd(wd);
        }
        Ok(b)
    }
}

fn write_cache(path: &Path, bytes: Vec<u8>) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    // The node's own file (0600), in its private data directory.
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&bytes));
    if written.is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn first_lines(s: &str) -> String {
    let mut out: String = s.lines().take(12).collect::<Vec<_>>().join("\n");
    if out.len() > 2000 {
        out.truncate(2000);
    }
    out
}

impl Drop for WasmExecutor {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
        if let Some(Ok(e)) = self.engines.get_mut() {
            if let Some(rt) = e.rt.take() {
                rt.shutdown_background();
            }
        }
    }
}

/// Turn how a guest ended into a container exit status.
fn classify(
    result: wasmtime::Result<i32>,
    oom_at: &AtomicU64,
    limit: Option<u64>,
    node_default: bool,
) -> ExitStatus {
    match result {
        Ok(code) => ExitStatus::code(code),
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                return ExitStatus::code(exit.0);
            }
            let oom = oom_at.load(Ordering::SeqCst);
            let exceeded = e.downcast_ref::<MemoryLimitExceeded>();
            if oom > 0 || exceeded.is_some() {
                let what = exceeded.map(|x| x.to_string()).unwrap_or_else(|| {
                    format!(
                        "memory limit of {} exceeded: the guest's linear memories and tables would total {}",
                        limit.map(format_bytes).unwrap_or_default(),
                        format_bytes(oom)
                    )
                });
                return ExitStatus {
                    exit_code: KILLED_EXIT_CODE,
                    reason: "OOMKilled".into(),
                    message: Some(if node_default {
                        format!("{what} (the node's default for WASM containers without resources.limits.memory, --wasm-default-memory-limit)")
                    } else {
                        what
                    }),
                };
            }
            let trap = e
                .downcast_ref::<wasmtime::Trap>()
                .map(|t| format!("wasm trap: {t}"));
            let full = first_lines(&format!("{e:?}"));
            ExitStatus {
                exit_code: TRAP_EXIT_CODE,
                reason: "Error".into(),
                message: Some(match trap {
                    Some(t) if !full.contains(&t) => format!("{t}\n{full}"),
                    _ => full,
                }),
            }
        }
    }
}

#[async_trait]
impl super::executor::Executor for Arc<WasmExecutor> {
    fn handles(&self, image: &str) -> bool {
        is_wasm_image(image)
    }

    fn runtime(&self) -> &'static str {
        "wasm"
    }

    /// Only components have sockets (WASI preview 1 has none usable): a pod of core modules
    /// needs no network namespace.
    fn needs_network(&self, image: &str, module: Option<&str>) -> bool {
        let mut path = WasmExecutor::image_path(image);
        if let Some(d) = module.and_then(|m| crate::modules::Digest::parse(m).ok()) {
            if !path.exists() {
                path = self.modules.cached(&d);
                // Not fetched yet: whether it is a component is unknown, so give the pod its
                // network (harmless for a core module).
                if !path.exists() {
                    return true;
                }
            }
        }
        let mut head = [0u8; 8];
        use std::io::Read;
        match std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut head)) {
            Ok(()) if head.starts_with(b"\0asm") => head[4..8] != [1, 0, 0, 0],
            // Text: a component starts with `(component`.
            Ok(()) => std::fs::read_to_string(&path)
                .map(|t| t.trim_start().starts_with("(component"))
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    async fn prepare(
        &self,
        spec: &ContainerSpec,
        progress: ExecutorProgress,
    ) -> Result<(), ExecError> {
        self.prepared(spec, Some(&progress)).await.map(|_| ())
    }

    async fn start(&self, spec: ContainerSpec) -> Result<Box<dyn Instance>, ExecError> {
        let prepared = self.prepared(&spec, None).await?;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let oom_at = Arc::new(AtomicU64::new(0));
        let (memory_limit, node_default) = self.memory_limit(&spec);
        let limits = GuestLimits::new(memory_limit, oom_at.clone());
        let cancel = CancellationToken::new();
        let (tx, rx) = oneshot::channel();
        let mut builder = WasmExecutor::wasi_builder(&spec)?;
        let guard = GuestGuard {
            cpu: spec.cpu_limit_millis,
            memory_limit,
            node_default,
            oom_at,
            cancel: cancel.clone(),
            done: tx,
        };
        let id;
        match prepared {
            Prepared::Core { engine, pre } => {
                id = format!("wasm://{}/{n}", pre.module().name().unwrap_or("module"));
                let mut store = Store::new(
                    &engine,
                    P1State {
                        wasi: builder.build_p1(),
                        limits,
                    },
                );
                store.limiter(|s| &mut s.limits);
                store.epoch_deadline_async_yield_and_update(1);
                self.spawn_guest(
                    async move {
                        let instance = pre.instantiate_async(&mut store).await?;
                        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                        start.call_async(&mut store, ()).await.map(|_| 0)
                    },
                    guard,
                    spec.sandbox_rt.as_ref(),
                )?;
            }
            Prepared::Component { engine, pre } => {
                id = format!("wasm://component/{n}");
                let ports = spec.ports.clone();
                // On the node's network (no pod namespace), the node's loopback and its API are
                // the node's, not the pod's: out of reach.
                let host_net = spec.host_network.then(|| self.api_addr.get().copied());
                builder
                    .allow_tcp(true)
                    .allow_udp(true)
                    .allow_ip_name_lookup(true)
                    .socket_addr_check(move |addr, use_| {
                        let port = addr.port();
                        let ok = match use_ {
                            // Implicit binds (before connect) use port 0: an ephemeral port.
                            SocketAddrUse::TcpBind | SocketAddrUse::UdpBind => {
                                port == 0 || ports.contains(&port)
                            }
                            SocketAddrUse::TcpListen => ports.contains(&port),
                            SocketAddrUse::TcpConnect | SocketAddrUse::UdpSend => match host_net {
                                Some(api) => host_net_allows(addr, api, is_node_address),
                                None => true,
                            },
                            _ => true,
                        };
                        Box::pin(async move { ok })
                    });
                let mut store = Store::new(
                    &engine,
                    P2State {
                        ctx: builder.build(),
                        table: ResourceTable::new(),
                        limits,
                    },
                );
                store.limiter(|s| &mut s.limits);
                store.epoch_deadline_async_yield_and_update(1);
                self.spawn_guest(
                    async move {
                        let cmd = pre.instantiate_async(&mut store).await?;
                        Ok(match cmd.wasi_cli_run().call_run(&mut store).await? {
                            Ok(()) => 0,
                            Err(()) => 1,
                        })
                    },
                    guard,
                    spec.sandbox_rt.as_ref(),
                )?;
            }
        }
        // WASM guests have no signal handlers: a kill is immediate (the guest yields at the
        // next epoch tick, and its task drops it there).
        Ok(Box::new(TaskInstance::new(id, rx, cancel)))
    }
}

/// What watches over a running guest: its limits, its kill switch, where its exit goes.
struct GuestGuard {
    cpu: Option<u64>,
    memory_limit: Option<u64>,
    /// The limit is the node's default (the container sets none).
    node_default: bool,
    oom_at: Arc<AtomicU64>,
    cancel: CancellationToken,
    done: oneshot::Sender<ExitStatus>,
}

impl WasmExecutor {
    /// Run a guest on the WASM runtime: CPU-sliced, killable, its exit classified and reported.
    fn spawn_guest<F>(
        &self,
        run: F,
        g: GuestGuard,
        rt: Option<&tokio::runtime::Handle>,
    ) -> Result<(), ExecError>
    where
        F: std::future::Future<Output = wasmtime::Result<i32>> + Send + 'static,
    {
        let engines = self.engines()?;
        let ticker = engines.ticker.clone();
        let own = engines
            .rt
            .as_ref()
            .ok_or_else(|| ExecError::Internal("the WASM runtime has stopped".into()))?;
        // A networked pod's guests run on its sandbox thread, inside the pod's namespace.
        rt.unwrap_or(own.handle()).spawn(async move {
            let status = tokio::select! {
                r = Throttled::new(run, g.cpu, ticker) => classify(r, &g.oom_at, g.memory_limit, g.node_default),
                _ = g.cancel.cancelled() => killed(),
            };
            let _ = g.done.send(status);
        });
        Ok(())
    }
}

/// Whether a guest running on the node's network (the unprivileged fallback, no pod network
/// namespace) may connect or send to `addr`: never to the node's loopback (127.0.0.0/8, ::1,
/// the unspecified address, which reaches it too), never to the API's listen address — on any of
/// the node's addresses when the API listens on all of them.
fn host_net_allows(
    addr: SocketAddr,
    api: Option<SocketAddr>,
    is_node_address: impl Fn(IpAddr) -> bool,
) -> bool {
    let ip = addr.ip().to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return false;
    }
    if let Some(api) = api {
        let api_ip = api.ip().to_canonical();
        if addr.port() == api.port()
            && (ip == api_ip || (api_ip.is_unspecified() && is_node_address(ip)))
        {
            return false;
        }
    }
    true
}

/// Whether `ip` is one of this node's interface addresses.
fn is_node_address(ip: IpAddr) -> bool {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we only read and free with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        // Unknown: refuse rather than let a guest reach the API.
        return true;
    }
    let mut found = false;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: the family tells which sockaddr type the address is.
            let a = unsafe {
                match (*ifa.ifa_addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => None,
                }
            };
            if a == Some(ip) {
                found = true;
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

fn killed() -> ExitStatus {
    ExitStatus {
        exit_code: KILLED_EXIT_CODE,
        reason: "Killed".into(),
        message: Some("stopped by Kapsel".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn host_network_guests_cannot_reach_the_node_loopback_or_its_api() {
        let none = |_| false;
        let api = Some(a("127.0.0.1:7070"));
        for denied in [
            "127.0.0.1:7070",
            "127.0.0.1:6379",
            "127.9.8.7:80",
            "[::1]:7070",
            "[::ffff:127.0.0.1]:22",
            "0.0.0.0:7070",
            "[::]:80",
        ] {
            assert!(!host_net_allows(a(denied), api, none), "{denied}");
        }
        assert!(host_net_allows(a("192.0.2.10:7070"), api, none));
        assert!(host_net_allows(a("[2001:db8::1]:443"), api, none));

        // An API on a node address: that address and port only.
        let api = Some(a("192.0.2.5:7070"));
        assert!(!host_net_allows(a("192.0.2.5:7070"), api, none));
        assert!(host_net_allows(a("192.0.2.5:8080"), api, none));

        // An API on every address: the API port on any node address.
        let node = |ip: IpAddr| ip == "192.0.2.5".parse::<IpAddr>().unwrap();
        for api in [a("0.0.0.0:7070"), a("[::]:7070")] {
            assert!(!host_net_allows(a("192.0.2.5:7070"), Some(api), node));
            assert!(host_net_allows(a("192.0.2.6:7070"), Some(api), node));
            assert!(host_net_allows(a("192.0.2.5:8080"), Some(api), node));
        }
    }

    #[test]
    fn the_node_knows_its_loopback_address() {
        assert!(is_node_address("127.0.0.1".parse().unwrap()));
        assert!(!is_node_address("198.51.100.123".parse().unwrap()));
    }
}
