//! The cluster's trust: the CA that `kapsel serve --cluster-listen` creates and keeps in
//! `<data-dir>/pki/` ([`ca`]), join tokens in k3s's form `K10<sha256 of the CA PEM>::<id>.<secret>`
//! kept as hashed secrets ([`token`]), the binding of each node name to the first key that
//! joined under it ([`nodes`]), the rustls configurations of the cluster listener and of an agent
//! ([`tls`]), and the agent's side of joining ([`join`]).
//!
//! [`Cluster`] ties the server's parts together; the API's cluster routes and its node
//! authorizer reach it through `AppState::cluster`.

pub mod ca;
pub mod join;
pub mod nodes;
pub mod tls;
pub mod token;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use ca::ClusterCa;
pub use nodes::NodeBindings;
pub use token::{JoinToken, TokenStore};

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("invalid token: {0}")]
    BadToken(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `data` to `path` atomically with mode 0600.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Create `dir` 0700 (tightened if it existed wider).
pub(crate) fn private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// sha256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Equal without an early exit (for secrets' hashes).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counters of the cluster listener, shown on `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    pub join_accepted: AtomicU64,
    pub join_unauthorized: AtomicU64,
    pub join_forbidden: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub forbidden: AtomicU64,
}

impl ClusterMetrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "# HELP kapsel_join_requests_total Join requests on the cluster listener by result.\n\
             # TYPE kapsel_join_requests_total counter\n\
             kapsel_join_requests_total{{result=\"accepted\"}} {}\n\
             kapsel_join_requests_total{{result=\"unauthorized\"}} {}\n\
             kapsel_join_requests_total{{result=\"forbidden\"}} {}\n\
             # HELP kapsel_cluster_requests_refused_total Requests the cluster listener refused.\n\
             # TYPE kapsel_cluster_requests_refused_total counter\n\
             kapsel_cluster_requests_refused_total{{code=\"401\"}} {}\n\
             kapsel_cluster_requests_refused_total{{code=\"403\"}} {}\n",
            g(&self.join_accepted),
            g(&self.join_unauthorized),
            g(&self.join_forbidden),
            g(&self.unauthenticated),
            g(&self.forbidden),
        )
    }
}

/// The server's cluster trust: CA, tokens, node bindings, counters.
pub struct Cluster {
    pub ca: ClusterCa,
    pub tokens: TokenStore,
    pub nodes: NodeBindings,
    pub metrics: ClusterMetrics,
}

impl Cluster {
    /// Open (or create on first start) `<data_dir>/pki`; the serving certificate is made anew
    /// for `sans` on every start (the CA, and so every token's hash, stays).
    pub fn open(data_dir: &Path, sans: &[String]) -> Result<Cluster, PkiError> {
        let dir = data_dir.join("pki");
        private_dir(&dir)?;
        Ok(Cluster {
            ca: ClusterCa::load_or_create(&dir, sans)?,
            tokens: TokenStore::open(&dir.join("tokens.json"))?,
            nodes: NodeBindings::open(&dir.join("node-keys.json"))?,
            metrics: ClusterMetrics::default(),
        })
    }

    /// The full join token for `id.secret`.
    pub fn join_token(&self, id: &str, secret: &str) -> String {
        JoinToken {
            ca_hash: Some(self.ca.hash()),
            id: id.to_string(),
            secret: secret.to_string(),
        }
        .to_string()
    }

    /// At first start: a join token without expiry written to `<data_dir>/token` (0600), so
    /// adding a node needs no other step. Returns the file's path.
    pub fn default_token(&self, data_dir: &Path) -> Result<PathBuf, PkiError> {
        let path = data_dir.join("token");
        if path.exists() {
            return Ok(path);
        }
        let (id, secret) = self
            .tokens
            .create("default join token (kapsel serve)", None)?;
        let mut t = self.join_token(&id, &secret);
        t.push('\n');
        write_private(&path, t.as_bytes())?;
        Ok(path)
    }
}
