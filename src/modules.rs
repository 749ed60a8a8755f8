//! Content-addressed WASM modules: how a pod's `.wasm` / `.wat` file reaches a node that is not
//! the machine `kapsel apply` ran on.
//!
//! - [`Digest`]: `sha256:<64 hex>`, the sha256 of a module's bytes exactly as uploaded (text
//!   `.wat` modules are hashed as text).
//! - [`ModuleStore`]: the server's store, `<data-dir>/modules/sha256/<hex>`, written only through
//!   [`write_verified`] (streamed to a temporary file while hashing, size-capped, renamed into
//!   place only when the hash matches), so a file in the store always has the content its name
//!   says. Served by `api::modules`; nodes keep their own copies the same way
//!   (`runtime::wasm::fetch`).
//! - The pod convention ([`ANNOTATION_PREFIX`]): the container's `image` stays the path the user
//!   wrote (resolved by the CLI), and the CLI sets the annotation
//!   `modules.kapsel.io/<container>: sha256:<hex>` on the pod (or on a Deployment's pod
//!   template, so a new module is a new revision). A node runs the file at the path when it has
//!   that digest there, and otherwise fetches the module by digest.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

/// Annotation key prefix: `modules.kapsel.io/<container name>` holds that container's digest.
pub const ANNOTATION_PREFIX: &str = "modules.kapsel.io/";

/// The server's default cap on one module (`--max-module-size`).
pub const DEFAULT_MAX_MODULE_BYTES: u64 = 256 << 20;

/// The annotation key of a container's module digest.
pub fn annotation_key(container: &str) -> String {
    format!("{ANNOTATION_PREFIX}{container}")
}

/// Why a module could not be stored, found or fetched.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("invalid module digest {0:?}: want sha256:<64 lowercase hex digits>")]
    InvalidDigest(String),
    #[error("module content does not match its digest: expected {expected}, got {actual}")]
    HashMismatch { expected: Digest, actual: Digest },
    #[error("module is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("module {0} not found")]
    NotFound(Digest),
    #[error("reading the module's bytes: {0}")]
    Body(String),
    #[error("module store: {0}")]
    Io(#[from] std::io::Error),
}

/// A module's content digest, `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parse `sha256:<64 lowercase hex digits>`.
    pub fn parse(s: &str) -> Result<Digest, ModuleError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| ModuleError::InvalidDigest(s.to_string()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ModuleError::InvalidDigest(s.to_string()));
        }
        Ok(Digest(hex.to_string()))
    }

    /// The digest of these bytes.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(hex::encode(Sha256::digest(bytes)))
    }

    /// The digest of a file's bytes, read in chunks.
    pub fn of_file(path: &Path) -> std::io::Result<Digest> {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(Digest(hex::encode(h.finalize())))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// Removes a temporary file when dropped (an upload cut off half-way), unless disarmed.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Stream `body` into `dest` (named by `digest`): into a temporary file in `tmp_dir` while
/// hashing, at most `max` bytes, then fsync and rename into place, only if the bytes hash to
/// `digest`. `progress` is told the bytes written so far. Returns the size. Nothing is left
/// behind on error or when the future is dropped.
pub async fn write_verified<S, E>(
    tmp_dir: &Path,
    dest: &Path,
    digest: &Digest,
    body: S,
    max: u64,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<u64, ModuleError>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    let tmp = tmp_dir.join(format!(
        "{}.{}.part",
        digest.hex(),
        uuid::Uuid::new_v4().simple()
    ));
    let mut guard = TempFile(Some(tmp.clone()));
    // Modules are the node's data: readable by the node's user only (as the data directory).
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .await?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ModuleError::Body(e.to_string()))?;
        size += chunk.len() as u64;
        if size > max {
            return Err(ModuleError::TooLarge { limit: max });
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await?;
        progress(size);
    }
    let actual = Digest(hex::encode(hasher.finalize()));
    if &actual != digest {
        return Err(ModuleError::HashMismatch {
            expected: digest.clone(),
            actual,
        });
    }
    file.sync_all().await?;
    drop(file);
    tokio::fs::rename(&tmp, dest).await?;
    guard.0 = None;
    Ok(size)
}

/// One stored module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredModule {
    pub digest: Digest,
    pub size: u64,
    pub modified: SystemTime,
}

/// The server's content-addressed module store.
pub struct ModuleStore {
    /// `<data-dir>/modules/sha256`
    dir: PathBuf,
    /// `<data-dir>/modules/tmp`: uploads in progress (same filesystem, so rename is atomic).
    tmp: PathBuf,
    max_bytes: u64,
}

impl ModuleStore {
    /// Open (create) the store under `data_dir`; uploads in progress when the server stopped
    /// are removed.
    pub fn open(data_dir: &Path, max_bytes: u64) -> Result<ModuleStore, ModuleError> {
        let root = data_dir.join("modules");
        let dir = root.join("sha256");
        let tmp = root.join("tmp");
        for d in [&root, &dir, &tmp] {
            private_dir(d)?;
        }
        for e in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(e?.path());
        }
        Ok(ModuleStore {
            dir,
            tmp,
            max_bytes,
        })
    }

    /// Where the module is (or would be) kept.
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    /// The largest module accepted.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The module's size, if stored.
    pub fn stat(&self, d: &Digest) -> Result<Option<u64>, ModuleError> {
        match std::fs::metadata(self.path(d)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Store a module from a stream of its bytes, verifying `d`. Returns (created, size): an
    /// existing module is kept as it is and its upload not read.
    pub async fn put<S, E>(&self, d: &Digest, body: S) -> Result<(bool, u64), ModuleError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        if let Some(size) = self.stat(d)? {
            return Ok((false, size));
        }
        let size =
            write_verified(&self.tmp, &self.path(d), d, body, self.max_bytes, &|_| {}).await?;
        tracing::info!(digest = %d, size, "module stored");
        Ok((true, size))
    }

    /// Open a stored module for reading: its size and file.
    pub async fn open_module(&self, d: &Digest) -> Result<(u64, tokio::fs::File), ModuleError> {
        match tokio::fs::File::open(self.path(d)).await {
            Ok(f) => {
                let size = f.metadata().await?.len();
                Ok((size, f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ModuleError::NotFound(d.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every stored module, by digest.
    pub fn list(&self) -> Result<Vec<StoredModule>, ModuleError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let Ok(digest) = Digest::parse(&format!("sha256:{}", e.file_name().to_string_lossy()))
            else {
                continue;
            };
            let m = e.metadata()?;
            out.push(StoredModule {
                digest,
                size: m.len(),
                modified: m.modified()?,
            });
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }
}

/// Create `dir` 0700 if needed.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&[u8]]) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::copy_from_slice(p)))
                .collect::<Vec<_>>(),
        )
    }

    fn leftovers(store: &ModuleStore) -> usize {
        std::fs::read_dir(&store.tmp).unwrap().count()
    }

    #[test]
    fn digests_parse_strictly() {
        let hex = "a".repeat(64);
        assert_eq!(Digest::parse(&format!("sha256:{hex}")).unwrap().hex(), hex);
        for bad in [
            hex.clone(),
            format!("sha512:{hex}"),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}/../x", "a".repeat(58)),
            "sha256:".into(),
        ] {
            assert!(
                matches!(Digest::parse(&bad), Err(ModuleError::InvalidDigest(_))),
                "{bad}"
            );
        }
        assert_eq!(
            Digest::of(b"abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn store_verifies_and_dedups() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path(), 1024).unwrap();
        let d = Digest::of(b"hello world");
        assert_eq!(store.stat(&d).unwrap(), None);
        assert_eq!(
            store.put(&d, chunks(&[b"hello ", b"world"])).await.unwrap(),
            (true, 11)
        );
        assert_eq!(std::fs::read(store.path(&d)).unwrap(), b"hello world");
        // A second upload of a stored module is not read (the body would fail if it were).
        let failing = futures::stream::iter([Err::<Bytes, _>("boom")]);
        assert_eq!(store.put(&d, failing).await.unwrap(), (false, 11));
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].digest.clone(), listed[0].size), (d.clone(), 11));
        let (size, _) = store.open_module(&d).await.unwrap();
        assert_eq!(size, 11);
        assert_eq!(leftovers(&store), 0);
    }

    #[tokio::test]
    async fn store_refuses_wrong_hash_and_oversize_leaving_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path(), 8).unwrap();
        let d = Digest::of(b"tiny");
        let err = store.put(&d, chunks(&[b"tinY"])).await.unwrap_err();
        match err {
            ModuleError::HashMismatch { expected, actual } => {
                assert_eq!(expected, d);
                assert_eq!(actual, Digest::of(b"tinY"));
            }
            e => panic!("{e}"),
        }
        let big = Digest::of(b"0123456789");
        let err = store
            .put(&big, chunks(&[b"01234", b"56789"]))
            .await
            .unwrap_err();
        assert!(matches!(err, ModuleError::TooLarge { limit: 8 }), "{err}");
        let err = store
            .put(&d, futures::stream::iter([Err::<Bytes, _>("cut off")]))
            .await
            .unwrap_err();
        assert!(matches!(err, ModuleError::Body(_)), "{err}");
        assert_eq!(store.stat(&d).unwrap(), None);
        assert_eq!(store.stat(&big).unwrap(), None);
        assert_eq!(leftovers(&store), 0);
        assert!(matches!(
            store.open_module(&d).await,
            Err(ModuleError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn open_removes_interrupted_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path(), 8).unwrap();
        std::fs::write(store.tmp.join("x.part"), b"half").unwrap();
        let store = ModuleStore::open(dir.path(), 8).unwrap();
        assert_eq!(leftovers(&store), 0);
    }
}
