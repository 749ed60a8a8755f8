//! Where a WASM container's module comes from on this node. A container whose pod carries
//! `modules.kapsel.io/<container>: sha256:<hex>` ([`crate::modules`]) runs the file at its image
//! path when that file has the digest here (checked once per file version: path, mtime and size
//! are remembered, so a warm start does not re-hash); otherwise its copy in the node's module
//! cache (`<cache-dir>/modules/sha256/<hex>`), fetched from the control plane by digest through
//! the node's client when missing: streamed to a temporary file while hashing and renamed into
//! place only when the hash matches. Pods needing one digest at once fetch it once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use crate::client::{Client, ClientError};
use crate::modules::{annotation_key, write_verified, Digest, ModuleError};
use crate::runtime::executor::{ContainerSpec, ExecError, ExecutorProgress};

/// The largest module a node fetches.
const MAX_FETCH_BYTES: u64 = 1 << 30;

/// The node's module cache and its fetches.
pub struct ModuleFetcher {
    /// `<cache-dir>/modules/sha256`
    dir: PathBuf,
    /// `<cache-dir>/modules/tmp`
    tmp: PathBuf,
    source: OnceLock<Arc<dyn Client>>,
    /// One lock per digest being fetched.
    inflight: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Local files already hashed: path → (mtime, size, digest).
    hashed: Mutex<HashMap<PathBuf, (SystemTime, u64, Digest)>>,
}

/// The module digest the container's pod names, if any.
pub fn wanted(spec: &ContainerSpec) -> Result<Option<Digest>, ExecError> {
    let Some(pod) = spec.pod.as_deref() else {
        return Ok(None);
    };
    pod.metadata
        .annotations
        .get(&annotation_key(&spec.name))
        .map(|d| {
            Digest::parse(d).map_err(|e| {
                ExecError::InvalidImage(format!(
                    "metadata.annotations[{}]: {e}",
                    annotation_key(&spec.name)
                ))
            })
        })
        .transpose()
}

impl ModuleFetcher {
    pub fn new(cache_dir: &Path) -> std::io::Result<ModuleFetcher> {
        let root = cache_dir.join("modules");
        let dir = root.join("sha256");
        let tmp = root.join("tmp");
        for d in [&root, &dir, &tmp] {
            crate::modules::private_dir(d)?;
        }
        Ok(ModuleFetcher {
            dir,
            tmp,
            source: OnceLock::new(),
            inflight: Mutex::default(),
            hashed: Mutex::default(),
        })
    }

    /// Where modules are fetched from (the node's client to the control plane).
    pub fn set_source(&self, client: Arc<dyn Client>) {
        let _ = self.source.set(client);
    }

    /// The cached copy of a module (present or not).
    pub fn cached(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    /// Does the file at `path` exist here with digest `want`?
    async fn local_has(&self, path: &Path, want: &Digest) -> bool {
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let Ok(mtime) = meta.modified() else {
            return false;
        };
        if let Some((m, size, d)) = self.hashed.lock().unwrap().get(path) {
            if *m == mtime && *size == meta.len() {
                return d == want;
            }
        }
        let p = path.to_path_buf();
        let Ok(Ok(d)) = tokio::task::spawn_blocking(move || Digest::of_file(&p)).await else {
            return false;
        };
        let same = &d == want;
        self.hashed
            .lock()
            .unwrap()
            .insert(path.to_path_buf(), (mtime, meta.len(), d));
        same
    }

    /// The file to run for `spec`: its image path, or the module fetched by digest.
    pub async fn resolve(
        &self,
        spec: &ContainerSpec,
        image_path: PathBuf,
        progress: Option<&ExecutorProgress>,
    ) -> Result<PathBuf, ExecError> {
        let Some(want) = wanted(spec)? else {
            return Ok(image_path);
        };
        if self.local_has(&image_path, &want).await {
            return Ok(image_path);
        }
        let cached = self.cached(&want);
        if cached.exists() {
            return Ok(cached);
        }
        let lock = self
            .inflight
            .lock()
            .unwrap()
            .entry(want.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let fetched = if cached.exists() {
            Ok(())
        } else {
            self.fetch(&want, &cached, progress).await
        };
        self.inflight.lock().unwrap().remove(&want);
        fetched.map(|()| cached)
    }

    async fn fetch(
        &self,
        want: &Digest,
        dest: &Path,
        progress: Option<&ExecutorProgress>,
    ) -> Result<(), ExecError> {
        let source = self.source.get().ok_or_else(|| {
            ExecError::ModulePull(format!(
                "module {want} is not on this node and the node has no control plane to fetch it from"
            ))
        })?;
        let started = Instant::now();
        let body = source.get_module(want).await.map_err(|e| match e {
            ClientError::NotFound { .. } => ExecError::ModulePull(format!(
                "module {want} not found on the control plane: upload it with `kapsel module push FILE` or `kapsel apply` from the machine that has the file"
            )),
            e => ExecError::ModulePull(format!("fetching module {want}: {e}")),
        })?;
        if let Some(p) = progress {
            p(&format!(
                "pulling module {want}{} from the control plane",
                body.size
                    .map(|s| format!(" ({} KiB)", s.div_ceil(1024)))
                    .unwrap_or_default()
            ));
        }
        let size = write_verified(&self.tmp, dest, want, body.stream, MAX_FETCH_BYTES, &|_| {})
            .await
            .map_err(|e: ModuleError| {
                ExecError::ModulePull(format!("fetching module {want}: {e}"))
            })?;
        tracing::info!(digest = %want, size, took = ?started.elapsed(), "module fetched");
        if let Some(p) = progress {
            p(&format!(
                "pulled module {want} ({} KiB) in {:.2}s",
                size.div_ceil(1024),
                started.elapsed().as_secs_f64()
            ));
        }
        Ok(())
    }
}
