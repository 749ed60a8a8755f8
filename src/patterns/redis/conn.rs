//! Connections to upstream servers: plain TCP or TLS (rustls with the ring provider).
//!
//! [`UpStream`] and its halves [`UpRead`] / [`UpWrite`] are enums, not trait objects, so the
//! plaintext hot path costs one predictable branch per read or write and no dynamic dispatch.
//! A plain connection splits into tokio's owned halves (no lock); a TLS one into
//! `tokio::io::split` halves, which share the session.
//!
//! [`Connector`] turns the `--tls-*` settings into a rustls client configuration once and opens
//! connections with it: `--tls-ca-file` (else the system bundle) for the roots, an optional
//! client certificate, and `--tls-server-name` (else each address's host) for SNI and
//! verification.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, RootCertStore,
};
use tokio_rustls::TlsConnector;

use super::config::TlsConfig;
use super::error::{TlsSetupError, UpstreamError};

type Tls = TlsStream<TcpStream>;

/// One upstream connection.
pub enum UpStream {
    Plain(TcpStream),
    Tls(Box<Tls>),
}

/// The read half of an [`UpStream`].
pub enum UpRead {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<Tls>),
}

/// The write half of an [`UpStream`].
pub enum UpWrite {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<Tls>),
}

impl UpStream {
    pub fn into_split(self) -> (UpRead, UpWrite) {
        match self {
            UpStream::Plain(s) => {
                let (r, w) = s.into_split();
                (UpRead::Plain(r), UpWrite::Plain(w))
            }
            UpStream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (UpRead::Tls(r), UpWrite::Tls(w))
            }
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            UpStream::Plain(s) => s,
            UpStream::Tls(s) => s.get_ref().0,
        }
    }

    /// Open and quiet, so fit to hand to another client: nothing to read and not closed.
    /// Peeks without consuming, so a TLS record is never cut.
    pub fn is_idle_open(&self) -> bool {
        let mut b = [0u8; 1];
        let mut rb = ReadBuf::new(&mut b);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(self.tcp().poll_peek(&mut cx, &mut rb), Poll::Pending)
    }
}

impl UpRead {
    /// Put the halves back together (for the idle pool).
    pub fn reunite(self, w: UpWrite) -> Option<UpStream> {
        match (self, w) {
            (UpRead::Plain(r), UpWrite::Plain(w)) => r.reunite(w).ok().map(UpStream::Plain),
            (UpRead::Tls(r), UpWrite::Tls(w)) => {
                if r.is_pair_of(&w) {
                    Some(UpStream::Tls(Box::new(r.unsplit(w))))
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

macro_rules! delegate_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            #[inline]
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            #[inline]
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_flush(cx),
                    Self::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_read!(UpStream);
delegate_read!(UpRead);
delegate_write!(UpStream);
delegate_write!(UpWrite);

/// Opens upstream connections, plain or TLS.
#[derive(Clone)]
pub struct Connector {
    tls: Option<TlsSide>,
}

#[derive(Clone)]
struct TlsSide {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

/// Where the system's CA bundle is looked for when `--tls-ca-file` is not given.
const SYSTEM_CAS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

impl Connector {
    pub fn plain() -> Self {
        Connector { tls: None }
    }

    /// A TLS connector from the `--tls-*` settings (files are read now, once).
    pub fn tls(cfg: &TlsConfig) -> Result<Self, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        let ca_path = match &cfg.ca_file {
            Some(p) => p.clone(),
            None => std::env::var_os("SSL_CERT_FILE")
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    SYSTEM_CAS
                        .iter()
                        .map(std::path::PathBuf::from)
                        .find(|p| p.exists())
                })
                .ok_or_else(|| TlsSetupError::NoSystemCas(SYSTEM_CAS.join(", ")))?,
        };
        for cert in
            CertificateDer::pem_file_iter(&ca_path).map_err(|source| TlsSetupError::CaFile {
                path: ca_path.clone(),
                source,
            })?
        {
            let cert = cert.map_err(|source| TlsSetupError::CaFile {
                path: ca_path.clone(),
                source,
            })?;
            roots.add(cert).map_err(|source| TlsSetupError::CaCert {
                path: ca_path.clone(),
                source,
            })?;
        }
        if roots.is_empty() {
            return Err(TlsSetupError::CaEmpty { path: ca_path });
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(TlsSetupError::Versions)?
                .with_root_certificates(roots);
        let config = match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|source| TlsSetupError::CertFile {
                        path: cert.clone(),
                        source,
                    })?;
                let key =
                    PrivateKeyDer::from_pem_file(key).map_err(|source| TlsSetupError::KeyFile {
                        path: key.clone(),
                        source,
                    })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(TlsSetupError::ClientCert)?
            }
            _ => builder.with_no_client_auth(),
        };
        let server_name = match &cfg.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|_| TlsSetupError::ServerName(n.clone()))?,
            ),
            None => None,
        };
        Ok(Connector {
            tls: Some(TlsSide {
                connector: TlsConnector::from(Arc::new(config)),
                server_name,
            }),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connect to `addr` (`host:port`), and for TLS finish the handshake, within `timeout`.
    pub async fn connect(&self, addr: &str, timeout: Duration) -> Result<UpStream, UpstreamError> {
        let work = async {
            let s = TcpStream::connect(addr)
                .await
                .map_err(|e| UpstreamError::Connect(Arc::new(e)))?;
            let _ = s.set_nodelay(true);
            let Some(tls) = &self.tls else {
                return Ok(UpStream::Plain(s));
            };
            let name = match &tls.server_name {
                Some(n) => n.clone(),
                None => {
                    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    ServerName::try_from(host.to_string())
                        .map_err(|_| UpstreamError::ServerName(host.to_string()))?
                }
            };
            let t = tls
                .connector
                .connect(name, s)
                .await
                .map_err(|e| UpstreamError::Tls(Arc::new(e)))?;
            Ok(UpStream::Tls(Box::new(t)))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(timeout))?
    }
}
