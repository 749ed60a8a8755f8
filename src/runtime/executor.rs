//! The executor trait: how the node agent runs one container, whatever runs it (wasmtime now,
//! Docker next). An executor prepares an image (compile / pull), starts an instance, and the
//! instance is waited on or killed. Lifecycle moves that make no sense are errors, not no-ops.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::logs::LogStream;

/// Everything an executor needs to start one container, resolved by the node agent from the
/// pod spec (volumes are host directories by now, env values are final).
#[derive(Clone)]
pub struct ContainerSpec {
    pub pod_uid: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub name: String,
    pub image: String,
    /// For WASM: the full argv. (OCI containers use `command` and `args` below.)
    pub argv: Vec<String>,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub pull_policy: crate::model::pod::PullPolicy,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub mounts: Vec<Mount>,
    /// Declared `containerPort`s: a WASM guest may listen on these and no others.
    pub ports: Vec<u16>,
    pub memory_limit: Option<u64>,
    pub cpu_limit_millis: Option<u64>,
    pub log: Arc<LogStream>,
    /// The pod's infra container, whose network namespace OCI containers join.
    pub infra: Option<String>,
    /// The runtime whose thread lives in the pod's network namespace (WASM guests run there).
    pub sandbox_rt: Option<tokio::runtime::Handle>,
    /// The pod has no network namespace of its own and uses the node's network (the
    /// unprivileged fallback): the node's loopback and API are off limits to its guests.
    pub host_network: bool,
    /// Records a Warning event on the pod (reason, message), for components that keep running
    /// through failures (git-sync's failed syncs).
    pub events: Option<EventSink>,
    /// The whole pod, for components that need to know their pod's other members (git-sync's
    /// exechook runs in one of them).
    pub pod: Option<Arc<crate::model::Pod>>,
    /// A directory on the node for this container only, which no volume exposes to the pod
    /// (`<pods-dir>/<uid>/private/<container>`): built-in components keep their state there
    /// (git-sync's repository). Created on demand, mode 0700.
    pub private_dir: Option<PathBuf>,
}

/// Records an event on the container's pod: (reason, message).
pub type EventSink = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// A host directory made visible at `guest_path`.
#[derive(Debug, Clone)]
pub struct Mount {
    pub host_path: PathBuf,
    pub guest_path: String,
    pub read_only: bool,
}

/// How an instance ended: what becomes `state.terminated`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    pub exit_code: i32,
    /// `Completed`, `Error`, `OOMKilled`, `Killed`.
    pub reason: String,
    pub message: Option<String>,
}

impl ExitStatus {
    pub fn code(exit_code: i32) -> Self {
        ExitStatus {
            exit_code,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.to_string(),
            message: None,
        }
    }
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}

/// Why a container could not be started; each maps to a Kubernetes waiting reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecError {
    /// The image (a `.wasm` file) does not exist or cannot be read.
    #[error("{0}")]
    ImagePull(String),
    /// The module named by digest is neither on the node nor fetchable from the control plane.
    #[error("{0}")]
    ModulePull(String),
    /// The image exists but cannot run (not WASM, fails to compile or link).
    #[error("{0}")]
    InvalidImage(String),
    /// The container's configuration cannot be applied (a volume path is missing).
    #[error("{0}")]
    Config(String),
    /// The image name is not a valid reference.
    #[error("{0}")]
    InvalidImageName(String),
    /// The image is absent and `imagePullPolicy: Never`.
    #[error("{0}")]
    NeverPull(String),
    /// The container runtime (Docker) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The pod's sandbox (network namespace, infra container) cannot be set up.
    #[error("{0}")]
    Sandbox(String),
    /// The container was created but failed while starting (git-sync's first sync).
    #[error("{0}")]
    StartFailed(String),
    #[error("{0}")]
    Internal(String),
}

impl ExecError {
    /// The `state.waiting.reason` Kubernetes users expect.
    pub fn waiting_reason(&self) -> &'static str {
        match self {
            ExecError::ImagePull(_) => "ErrImagePull",
            ExecError::ModulePull(_) => "ErrModulePull",
            ExecError::InvalidImage(_) => "CreateContainerError",
            ExecError::Config(_) => "CreateContainerConfigError",
            ExecError::InvalidImageName(_) => "InvalidImageName",
            ExecError::NeverPull(_) => "ErrImageNeverPull",
            ExecError::Unavailable(_) => "ContainerRuntimeUnavailable",
            ExecError::Sandbox(_) => "CreatePodSandboxError",
            ExecError::StartFailed(_) => "RunContainerError",
            ExecError::Internal(_) => "CreateContainerError",
        }
    }
}

/// Progress of long preparation work (compiling a module, importing an image).
pub type ExecutorProgress = Arc<dyn Fn(&str) + Send + Sync>;

/// A container runtime.
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Does this executor run this image?
    fn handles(&self, image: &str) -> bool;
    /// The runtime this executor provides to the node (`wasm`, `oci`).
    fn runtime(&self) -> &'static str;
    /// Can it run containers right now (is its daemon reachable)?
    async fn available(&self) -> bool {
        true
    }
    /// Does a container of this image use the network (so its pod needs a sandbox)?
    /// `module`: the container's module digest (`modules.kapsel.io/<container>`), if any.
    fn needs_network(&self, _image: &str, _module: Option<&str>) -> bool {
        true
    }
    /// Make the image ready to start (compile and cache; pull). Idempotent and cached.
    async fn prepare(
        &self,
        spec: &ContainerSpec,
        progress: ExecutorProgress,
    ) -> Result<(), ExecError>;
    /// Start an instance; it runs until it exits or is killed.
    async fn start(&self, spec: ContainerSpec) -> Result<Box<dyn Instance>, ExecError>;
}

/// A running container.
#[async_trait]
pub trait Instance: Send {
    /// An identifier for `containerID` (`wasm://<digest>/<n>`).
    fn id(&self) -> String;
    /// Wait until the instance ends. Calling it again after it returned is an error.
    async fn wait(&mut self) -> Result<ExitStatus, ExecError>;
    /// Stop the instance: politely within `grace` where the runtime can, then forcibly.
    /// Returns the exit status.
    async fn kill(&mut self, grace: Duration) -> Result<ExitStatus, ExecError>;
}

/// An in-process instance: a task that reports its exit over a channel and stops when its
/// token is cancelled (WASM guests, built-in components). No signals: `kill` is immediate.
pub struct TaskInstance {
    id: String,
    done: Option<tokio::sync::oneshot::Receiver<ExitStatus>>,
    result: Option<ExitStatus>,
    cancel: tokio_util::sync::CancellationToken,
}

impl TaskInstance {
    pub fn new(
        id: String,
        done: tokio::sync::oneshot::Receiver<ExitStatus>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Self {
        TaskInstance {
            id,
            done: Some(done),
            result: None,
            cancel,
        }
    }
}

#[async_trait]
impl Instance for TaskInstance {
    fn id(&self) -> String {
        self.id.clone()
    }

    async fn wait(&mut self) -> Result<ExitStatus, ExecError> {
        if let Some(r) = &self.result {
            return Ok(r.clone());
        }
        // Cancel-safe: the receiver stays in place until it yields, so a `wait` dropped by a
        // `select!` (a probe's kill, a stop) can be followed by another `wait` or `kill`.
        let rx = self.done.as_mut().ok_or_else(|| {
            ExecError::Internal("invalid state transition: wait on a dropped instance".into())
        })?;
        let r = rx.await.unwrap_or(ExitStatus {
            exit_code: 137,
            reason: "Error".into(),
            message: Some("the instance's task was lost".into()),
        });
        self.done = None;
        self.result = Some(r.clone());
        Ok(r)
    }

    async fn kill(&mut self, _grace: Duration) -> Result<ExitStatus, ExecError> {
        self.cancel.cancel();
        self.wait().await
    }
}

impl Drop for TaskInstance {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
