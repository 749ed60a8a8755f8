//! The Docker executor: OCI containers through the Docker Engine API (bollard), behind the same
//! executor trait as WASM. Images follow `imagePullPolicy`; containers join their pod's infra
//! container's network namespace, bind-mount the pod's volumes, get memory/CPU limits, and are
//! labelled with their pod's uid and node so deletion and crash recovery find every one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::Mutex;

use super::executor::{ContainerSpec, ExecError, Executor, ExecutorProgress, ExitStatus, Instance};
use crate::model::pod::{is_wasm_image, PullPolicy};

pub const LABEL_POD_UID: &str = "io.kapsel.pod.uid";
pub const LABEL_POD: &str = "io.kapsel.pod";
pub const LABEL_NODE: &str = "io.kapsel.node";
/// The node's identity (kept in its data directory): what start-up cleanup goes by.
pub const LABEL_NODE_ID: &str = "io.kapsel.node-id";
pub const LABEL_CONTAINER: &str = "io.kapsel.container";
/// The image holding pod network namespaces, built by Kapsel itself (no registry needed).
pub const PAUSE_IMAGE: &str = "kapsel/pause:1";

/// What `DockerExecutor::exec` gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    /// stdout and stderr interleaved, at most 1 KiB.
    pub output: String,
}

const EXEC_OUTPUT_MAX: usize = 1024;

/// A running container of a pod, as the daemon lists it.
#[derive(Debug, Clone)]
pub struct PodContainer {
    pub id: String,
    /// The pod's name for it (`spec.containers[].name`).
    pub name: String,
    /// Its mounts: (host source, path in the container).
    pub mounts: Vec<(std::path::PathBuf, String)>,
}

fn humantime_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

pub struct DockerExecutor {
    /// `unix:///var/run/docker.sock` or a path.
    host: String,
    node: String,
    /// This data directory's node identity (`<data-dir>/node-id`).
    node_id: String,
    client: Mutex<Option<Docker>>,
    pause_ready: Mutex<bool>,
}

fn unavailable(host: &str, e: impl std::fmt::Display) -> ExecError {
    ExecError::Unavailable(format!("Docker is unreachable at {host}: {e}"))
}

impl DockerExecutor {
    pub fn new(host: &str, node: &str, node_id: &str) -> Arc<Self> {
        Arc::new(DockerExecutor {
            host: host.to_string(),
            node: node.to_string(),
            node_id: node_id.to_string(),
            client: Mutex::new(None),
            pause_ready: Mutex::new(false),
        })
    }

    /// A connected client, negotiated down to the daemon's API version (Debian's 20.10 speaks
    /// 1.41). Reconnects after the daemon went away.
    pub async fn docker(&self) -> Result<Docker, ExecError> {
        let mut guard = self.client.lock().await;
        if let Some(d) = guard.as_ref() {
            return Ok(d.clone());
        }
        let path = self.host.strip_prefix("unix://").unwrap_or(&self.host);
        let d = Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION)
            .map_err(|e| unavailable(&self.host, e))?;
        let d = tokio::time::timeout(Duration::from_secs(5), d.negotiate_version())
            .await
            .map_err(|_| unavailable(&self.host, "timed out"))?
            .map_err(|e| unavailable(&self.host, e))?;
        *guard = Some(d.clone());
        Ok(d)
    }

    /// Is the daemon answering right now?
    pub async fn ping(&self) -> bool {
        let Ok(d) = self.docker().await else {
            return false;
        };
        let ok = tokio::time::timeout(Duration::from_secs(3), d.ping())
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        if !ok {
            *self.client.lock().await = None;
            *self.pause_ready.lock().await = false;
        }
        ok
    }

    async fn image_present(&self, d: &Docker, image: &str) -> Result<bool, ExecError> {
        match d.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(unavailable(&self.host, e)),
        }
    }

    /// Build the pause image from the static program embedded in Kapsel, once.
    async fn ensure_pause(&self, d: &Docker) -> Result<(), ExecError> {
        let mut ready = self.pause_ready.lock().await;
        if *ready || self.image_present(d, PAUSE_IMAGE).await? {
            *ready = true;
            return Ok(());
        }
        let elf = pause_elf().ok_or_else(|| {
            ExecError::Sandbox(format!(
                "no built-in pause program for {}; import an image named {PAUSE_IMAGE} with /pause",
                std::env::consts::ARCH
            ))
        })?;
        let tar = single_file_tar("pause", &elf, 0o755);
        let (repo, tag) = PAUSE_IMAGE.split_once(':').unwrap();
        let opts = CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.into()),
            tag: Some(tag.into()),
            changes: vec!["CMD [\"/pause\"]".into()],
            ..Default::default()
        };
        let mut s = d.create_image(Some(opts), Some(bollard::body_full(tar.into())), None);
        while let Some(r) = s.next().await {
            r.map_err(|e| ExecError::Sandbox(format!("importing {PAUSE_IMAGE}: {e}")))?;
        }
        *ready = true;
        Ok(())
    }

    fn labels(&self, spec_uid: &str, pod: &str, container: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_POD_UID.to_string(), spec_uid.to_string()),
            (LABEL_POD.to_string(), pod.to_string()),
            (LABEL_NODE.to_string(), self.node.clone()),
            (LABEL_NODE_ID.to_string(), self.node_id.clone()),
            (LABEL_CONTAINER.to_string(), container.to_string()),
        ])
    }

    /// Create and start the pod's infra container; returns (id, pid of its process).
    pub async fn create_infra(
        &self,
        uid: &str,
        ns: &str,
        pod: &str,
    ) -> Result<(String, u32), ExecError> {
        let d = self.docker().await?;
        self.ensure_pause(&d).await?;
        let name = format!("kapsel_{ns}_{pod}_{}_infra", &uid[..uid.len().min(8)]);
        let body = ContainerCreateBody {
            image: Some(PAUSE_IMAGE.into()),
            labels: Some(self.labels(uid, &format!("{ns}/{pod}"), "POD")),
            host_config: Some(HostConfig {
                network_mode: Some("bridge".into()),
                ipc_mode: Some("shareable".into()),
                init: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        // A leftover of the same name (a crash between create and record) is replaced.
        let _ = d
            .remove_container(
                &name,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
        let created = d
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| ExecError::Sandbox(format!("creating the pod's infra container: {e}")))?;
        d.start_container(
            &created.id,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .map_err(|e| ExecError::Sandbox(format!("starting the pod's infra container: {e}")))?;
        let info = d
            .inspect_container(&created.id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| ExecError::Sandbox(e.to_string()))?;
        let pid = info.state.and_then(|s| s.pid).unwrap_or(0);
        if pid <= 0 {
            return Err(ExecError::Sandbox(
                "the infra container has no process".into(),
            ));
        }
        Ok((created.id, pid as u32))
    }

    /// Run `argv` inside a running container (`docker exec`), as exec probes do: its exit code
    /// and the first KiB of its output. `timeout` bounds the command's run (setting the exec up
    /// has its own bound, so a slow daemon is not mistaken for a slow command). A command still
    /// running after it is an error; the process itself is left to finish (the Engine API
    /// cannot kill an exec).
    pub async fn exec(
        &self,
        container_id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, ExecError> {
        self.exec_with(container_id, argv, &[], None, timeout).await
    }

    /// [`exec`](Self::exec) with extra environment (`K=V`) and a working directory inside the
    /// container (git-sync's exechooks run so).
    pub async fn exec_with(
        &self,
        container_id: &str,
        argv: &[String],
        env: &[String],
        working_dir: Option<&str>,
        timeout: Duration,
    ) -> Result<ExecOutput, ExecError> {
        let d = self.docker().await?;
        let id = container_id
            .strip_prefix("docker://")
            .unwrap_or(container_id);
        let short = &id[..id.len().min(12)];
        let failed =
            |e: bollard::errors::Error| ExecError::Internal(format!("exec in {short}: {e}"));
        let created = tokio::time::timeout(
            Duration::from_secs(10),
            d.create_exec(
                id,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(argv.to_vec()),
                    env: (!env.is_empty()).then(|| env.to_vec()),
                    working_dir: working_dir.map(str::to_string),
                    ..Default::default()
                },
            ),
        )
        .await
        .map_err(|_| unavailable(&self.host, "creating an exec timed out"))?
        .map_err(failed)?;
        let run = async {
            let mut output = Vec::new();
            if let StartExecResults::Attached { output: mut s, .. } = d
                .start_exec(&created.id, None::<StartExecOptions>)
                .await
                .map_err(failed)?
            {
                while let Some(Ok(chunk)) = s.next().await {
                    let b = chunk.into_bytes();
                    let room = EXEC_OUTPUT_MAX.saturating_sub(output.len());
                    output.extend_from_slice(&b[..b.len().min(room)]);
                }
            }
            // The stream ends when the process does; its exit code may lag a moment behind.
            loop {
                let info = d.inspect_exec(&created.id).await.map_err(failed)?;
                if let (false, Some(code)) = (info.running == Some(true), info.exit_code) {
                    return Ok(ExecOutput {
                        exit_code: code,
                        output: String::from_utf8_lossy(&output).into_owned(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(timeout, run).await.map_err(|_| {
            ExecError::Internal(format!(
                "command timed out after {}",
                humantime_secs(timeout)
            ))
        })?
    }

    /// The running containers of a pod (not its infra container), with their bind mounts.
    pub async fn running_pod_containers(&self, uid: &str) -> Result<Vec<PodContainer>, ExecError> {
        let d = self.docker().await?;
        let filters = HashMap::from([
            ("label".to_string(), vec![format!("{LABEL_POD_UID}={uid}")]),
            ("status".to_string(), vec!["running".to_string()]),
        ]);
        let list = d
            .list_containers(Some(ListContainersOptions {
                all: false,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| unavailable(&self.host, e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let name = c.labels.as_ref()?.get(LABEL_CONTAINER)?.clone();
                (name != "POD").then_some(())?;
                let mounts = c
                    .mounts
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|m| Some((std::path::PathBuf::from(m.source?), m.destination?)))
                    .collect();
                Some(PodContainer {
                    id: c.id?,
                    name,
                    mounts,
                })
            })
            .collect())
    }

    /// Remove every container of a pod (by its uid label).
    pub async fn remove_labelled(&self, label: &str, value: &str) -> Result<usize, ExecError> {
        self.remove_where(&format!("{label}={value}"), &Default::default())
            .await
    }

    /// Every Kapsel container of this node (this data directory's node id) whose pod uid is
    /// not in `keep` is removed
    /// (checked again until none is left, for containers caught mid-stop).
    pub async fn remove_orphans(
        &self,
        keep: &std::collections::HashSet<String>,
    ) -> Result<usize, ExecError> {
        self.remove_where(&format!("{LABEL_NODE_ID}={}", self.node_id), keep)
            .await
    }

    /// Remove containers matching a label filter, except those of pods in `keep`.
    async fn remove_where(
        &self,
        label_filter: &str,
        keep: &std::collections::HashSet<String>,
    ) -> Result<usize, ExecError> {
        let d = self.docker().await?;
        let filters = HashMap::from([("label".to_string(), vec![label_filter.to_string()])]);
        let mut removed = 0;
        for attempt in 0..5 {
            let list = d
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: Some(filters.clone()),
                    ..Default::default()
                }))
                .await
                .map_err(|e| unavailable(&self.host, e))?;
            let ids: Vec<String> = list
                .into_iter()
                .filter(|c| {
                    let uid = c
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(LABEL_POD_UID))
                        .cloned()
                        .unwrap_or_default();
                    !keep.contains(&uid)
                })
                .filter_map(|c| c.id)
                .collect();
            if ids.is_empty() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            for id in ids {
                match d
                    .remove_container(
                        &id,
                        Some(RemoveContainerOptions {
                            force: true,
                            v: true,
                            ..Default::default()
                        }),
                    )
                    .await
                {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::debug!(error = %e, container = %id, "removing container"),
                }
            }
        }
        Ok(removed)
    }
}

/// Docker image references: `[host[:port]/]path[:tag][@digest]`, lowercase path components.
pub fn valid_image_name(image: &str) -> bool {
    if image.is_empty() || image.len() > 255 || image.contains(char::is_whitespace) {
        return false;
    }
    let (rest, _digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    let (path, tag) = match rest.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t)),
        _ => (rest, None),
    };
    if let Some(t) = tag {
        if t.is_empty()
            || t.len() > 128
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return false;
        }
    }
    let parts: Vec<&str> = path.split('/').collect();
    parts.iter().enumerate().all(|(i, p)| {
        let host =
            i == 0 && parts.len() > 1 && (p.contains('.') || p.contains(':') || *p == "localhost");
        !p.is_empty()
            && (host
                || p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)))
    })
}

#[async_trait]
impl Executor for Arc<DockerExecutor> {
    fn handles(&self, image: &str) -> bool {
        !is_wasm_image(image) && !image.starts_with("builtin/")
    }

    fn runtime(&self) -> &'static str {
        "oci"
    }

    async fn available(&self) -> bool {
        self.ping().await
    }

    async fn prepare(
        &self,
        spec: &ContainerSpec,
        progress: ExecutorProgress,
    ) -> Result<(), ExecError> {
        if !valid_image_name(&spec.image) {
            return Err(ExecError::InvalidImageName(format!(
                "invalid image name {:?}: expected [registry/]name[:tag] in lowercase",
                spec.image
            )));
        }
        let d = self.docker().await?;
        let present = self.image_present(&d, &spec.image).await?;
        match (spec.pull_policy, present) {
            (PullPolicy::Never, true) | (PullPolicy::IfNotPresent, true) => return Ok(()),
            (PullPolicy::Never, false) => {
                return Err(ExecError::NeverPull(format!(
                    "container image {:?} is not present with pull policy of Never",
                    spec.image
                )))
            }
            _ => {}
        }
        progress(&format!("pulling image {}", spec.image));
        let opts = CreateImageOptions {
            from_image: Some(spec.image.clone()),
            ..Default::default()
        };
        let mut s = d.create_image(Some(opts), None, None);
        let mut err = None;
        while let Some(r) = s.next().await {
            if let Err(e) = r {
                err = Some(e);
                break;
            }
        }
        match err {
            None => Ok(()),
            // Pull failed but Always with a local copy: run what we have, as a registry outage would.
            Some(_) if present => Ok(()),
            Some(e) => Err(ExecError::ImagePull(format!(
                "pulling image {:?}: {e}",
                spec.image
            ))),
        }
    }

    async fn start(&self, spec: ContainerSpec) -> Result<Box<dyn Instance>, ExecError> {
        let d = self.docker().await?;
        let infra = spec
            .infra
            .clone()
            .ok_or_else(|| ExecError::Sandbox("the pod has no infra container".into()))?;
        let binds: Vec<String> = spec
            .mounts
            .iter()
            .map(|m| {
                format!(
                    "{}:{}{}",
                    m.host_path.display(),
                    m.guest_path,
                    if m.read_only { ":ro" } else { "" }
                )
            })
            .collect();
        let memory = spec.memory_limit.map(|m| m as i64);
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: (!spec.command.is_empty()).then(|| spec.command.clone()),
            cmd: (!spec.args.is_empty()).then(|| spec.args.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: spec.working_dir.clone(),
            labels: Some(self.labels(
                &spec.pod_uid,
                &format!("{}/{}", spec.pod_namespace, spec.pod_name),
                &spec.name,
            )),
            host_config: Some(HostConfig {
                network_mode: Some(format!("container:{infra}")),
                ipc_mode: Some(format!("container:{infra}")),
                binds: Some(binds),
                memory,
                memory_swap: memory,
                nano_cpus: spec.cpu_limit_millis.map(|m| (m * 1_000_000) as i64),
                ..Default::default()
            }),
            ..Default::default()
        };
        let uid8 = &spec.pod_uid[..spec.pod_uid.len().min(8)];
        let name = format!(
            "kapsel_{}_{}_{}_{}_{}",
            spec.pod_namespace,
            spec.pod_name,
            uid8,
            spec.name,
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .get(..6)
                .unwrap_or("0")
        );
        let created = d
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| ExecError::Internal(format!("creating container: {e}")))?;
        let id = created.id;
        if let Err(e) = d
            .start_container(
                &id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
        {
            let _ = d
                .remove_container(
                    &id,
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
            return Err(ExecError::Internal(format!("starting container: {e}")));
        }
        // Follow the logs live. Docker can drop the last partial line of a container that
        // exits while being followed, so `finish` tops the log up from a full read.
        let log = spec.log.clone();
        let ld = d.clone();
        let lid = id.clone();
        let followed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = followed.clone();
        let logs = tokio::spawn(async move {
            let mut s = ld.logs(
                &lid,
                Some(LogsOptions {
                    follow: true,
                    stdout: true,
                    stderr: true,
                    ..Default::default()
                }),
            );
            while let Some(Ok(chunk)) = s.next().await {
                let b = chunk.into_bytes();
                log.append(&b);
                count.fetch_add(b.len() as u64, std::sync::atomic::Ordering::SeqCst);
            }
        });
        Ok(Box::new(DockerInstance {
            d,
            id,
            logs: Some(logs),
            followed,
            log: spec.log.clone(),
            result: None,
        }))
    }
}

struct DockerInstance {
    d: Docker,
    id: String,
    logs: Option<tokio::task::JoinHandle<()>>,
    /// Bytes the live follower appended.
    followed: Arc<std::sync::atomic::AtomicU64>,
    log: Arc<super::logs::LogStream>,
    result: Option<ExitStatus>,
}

impl DockerInstance {
    async fn finish(&mut self) -> Result<ExitStatus, ExecError> {
        if let Some(r) = &self.result {
            return Ok(r.clone());
        }
        let mut w = self
            .d
            .wait_container(&self.id, None::<WaitContainerOptions>);
        let code = match w.next().await {
            Some(Ok(r)) => r.status_code,
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => {
                return Err(ExecError::Unavailable(format!(
                    "waiting for container: {e}"
                )));
            }
            None => {
                return Err(ExecError::Unavailable(
                    "container wait ended without a status".into(),
                ))
            }
        };
        let info = self
            .d
            .inspect_container(&self.id, None::<InspectContainerOptions>)
            .await
            .ok();
        let oom = info
            .as_ref()
            .and_then(|i| i.state.as_ref())
            .and_then(|s| s.oom_killed)
            .unwrap_or(false);
        let err = info
            .as_ref()
            .and_then(|i| i.state.as_ref())
            .and_then(|s| s.error.clone())
            .filter(|e| !e.is_empty());
        // Let the follower drain, then append whatever it missed from a complete read.
        if let Some(l) = self.logs.take() {
            let abort = l.abort_handle();
            if tokio::time::timeout(Duration::from_millis(500), l)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let seen = self.followed.load(std::sync::atomic::Ordering::SeqCst) as usize;
        let mut all = Vec::new();
        let mut s = self.d.logs(
            &self.id,
            Some(LogsOptions {
                follow: false,
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        );
        while let Some(Ok(chunk)) = s.next().await {
            all.extend_from_slice(&chunk.into_bytes());
        }
        if all.len() > seen {
            self.log.append(&all[seen..]);
        }
        let _ = self
            .d
            .remove_container(
                &self.id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await;
        let mut st = ExitStatus::code(code as i32);
        if oom {
            st.reason = "OOMKilled".into();
            st.message = Some("the container exceeded its memory limit".into());
        } else if let Some(e) = err {
            st.message = Some(e);
        }
        self.result = Some(st.clone());
        Ok(st)
    }
}

#[async_trait]
impl Instance for DockerInstance {
    fn id(&self) -> String {
        format!("docker://{}", self.id)
    }

    async fn wait(&mut self) -> Result<ExitStatus, ExecError> {
        self.finish().await
    }

    async fn kill(&mut self, grace: Duration) -> Result<ExitStatus, ExecError> {
        if self.result.is_none() {
            let _ = self
                .d
                .stop_container(
                    &self.id,
                    Some(StopContainerOptions {
                        t: Some(grace.as_secs().min(600) as i32),
                        ..Default::default()
                    }),
                )
                .await;
        }
        self.finish().await
    }
}

/// A tar stream holding one file at the root.
fn single_file_tar(name: &str, data: &[u8], mode: u32) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |v: u64, width: usize| format!("{v:0w$o}\0", w = width - 1);
    h[100..108].copy_from_slice(octal(mode as u64, 8).as_bytes());
    h[108..116].copy_from_slice(octal(0, 8).as_bytes());
    h[116..124].copy_from_slice(octal(0, 8).as_bytes());
    h[124..136].copy_from_slice(octal(data.len() as u64, 12).as_bytes());
    h[136..148].copy_from_slice(octal(0, 12).as_bytes());
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// A complete static x86-64 Linux program: `loop { pause() }` (129 bytes). The infra
/// container's only job is to hold the pod's namespaces.
fn pause_elf() -> Option<Vec<u8>> {
    if std::env::consts::ARCH != "x86_64" {
        return None;
    }
    let code: [u8; 9] = [0xb8, 0x22, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xf7];
    let base: u64 = 0x400000;
    let total = (64 + 56 + code.len()) as u64;
    let mut e = Vec::with_capacity(total as usize);
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(base + 120).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    e.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    e.extend_from_slice(&1u16.to_le_bytes()); // phnum
    e.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&0u64.to_le_bytes()); // offset
    e.extend_from_slice(&base.to_le_bytes()); // vaddr
    e.extend_from_slice(&base.to_le_bytes()); // paddr
    e.extend_from_slice(&total.to_le_bytes()); // filesz
    e.extend_from_slice(&total.to_le_bytes()); // memsz
    e.extend_from_slice(&0x1000u64.to_le_bytes()); // align
    e.extend_from_slice(&code);
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        for ok in [
            "busybox",
            "kapsel-test/busybox:1",
            "localhost:5000/a/b:v1.2",
            "a@sha256:abc",
            "registry.io/x",
        ] {
            assert!(valid_image_name(ok), "{ok}");
        }
        for bad in ["", "UPPER/case", "a b", "busybox:", "x::y", "/leading"] {
            assert!(!valid_image_name(bad), "{bad}");
        }
    }

    #[test]
    fn tar_and_elf_are_well_formed() {
        let elf = pause_elf().unwrap();
        assert_eq!(elf.len(), 129);
        let t = single_file_tar("pause", &elf, 0o755);
        assert_eq!(t.len() % 512, 0);
        assert_eq!(&t[257..262], b"ustar");
    }
}
