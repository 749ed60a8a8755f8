//! The ambassador's error types, one per layer: [`UpstreamError`] for talking to one server,
//! [`TlsSetupError`] for turning the `--tls-*` flags into a client configuration,
//! [`TopologyError`] for finding the master through Sentinel, and [`AmbassadorError`] for
//! starting. Each keeps its cause as `#[source]`; [`chain`] renders the whole chain on one line,
//! as it is shown to clients (`-ERR kapsel ambassador: ...`), in the container log and metrics.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;

use super::resp::ProtoError;

/// `error: cause: cause ...` on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Talking to one upstream server failed. Cheap to clone: the fast failures while a server is
/// down repeat the last connect error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("unknown: no Sentinel has answered yet")]
    Unresolved,
    #[error("unreachable")]
    Connect(#[source] Arc<io::Error>),
    #[error("unreachable: no answer within {0:?}")]
    ConnectTimeout(Duration),
    #[error("TLS handshake failed")]
    Tls(#[source] Arc<io::Error>),
    #[error("{0:?} is not a valid TLS server name (set --tls-server-name)")]
    ServerName(String),
    #[error("connection lost")]
    Lost(#[source] Arc<io::Error>),
    #[error("closed the connection")]
    Closed,
    #[error("sent a malformed reply")]
    Malformed(#[source] ProtoError),
    #[error("refused the ambassador's AUTH: {0}")]
    AuthRefused(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the ambassador is shutting down")]
    ShuttingDown,
    #[error("the request was dropped")]
    Dropped,
    #[error("answered {0}")]
    Refused(String),
}

impl UpstreamError {
    pub fn lost(e: io::Error) -> Self {
        UpstreamError::Lost(Arc::new(e))
    }

    /// A TLS handshake (or certificate) failure, as opposed to the network.
    pub fn is_tls(&self) -> bool {
        matches!(self, UpstreamError::Tls(_) | UpstreamError::ServerName(_))
    }

    /// The one-line form.
    pub fn line(&self) -> String {
        chain(self)
    }
}

/// The `--tls-*` flags could not be turned into a TLS client configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("--tls-ca-file {}: cannot read certificates", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("--tls-ca-file {}: a certificate was not accepted", path.display())]
    CaCert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("--tls-ca-file {}: no certificate in it", path.display())]
    CaEmpty { path: PathBuf },
    #[error("no --tls-ca-file and no system CA bundle at {0} (set --tls-ca-file)")]
    NoSystemCas(String),
    #[error("--tls-cert-file {}: cannot read the certificate chain", path.display())]
    CertFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("--tls-key-file {}: cannot read the private key", path.display())]
    KeyFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("--tls-cert-file/--tls-key-file: not usable as a client certificate")]
    ClientCert(#[source] rustls::Error),
    #[error("--tls-server-name {0:?} is not a DNS name or IP address")]
    ServerName(String),
    #[error("TLS protocol versions")]
    Versions(#[source] rustls::Error),
}

/// Finding the master through Sentinel failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("no Sentinel answered: {}", .0.iter().map(|e| chain(e)).collect::<Vec<_>>().join("; "))]
    NoSentinel(Vec<SentinelError>),
}

/// What one Sentinel answered instead of a master.
#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    #[error("{addr}")]
    Query {
        addr: String,
        #[source]
        source: UpstreamError,
    },
    #[error("{addr}: {message}")]
    Refused { addr: String, message: String },
    #[error("{addr}: does not monitor a master named {name:?}")]
    UnknownMaster { addr: String, name: String },
}

/// The ambassador could not be set up from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum AmbassadorError {
    #[error("--password-file {}", path.display())]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_causes_once() {
        let e = UpstreamError::Connect(Arc::new(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "Connection refused",
        )));
        assert_eq!(e.line(), "unreachable: Connection refused");
        assert_eq!(UpstreamError::Closed.line(), "closed the connection");
    }
}
