//! The agent's end of the node tunnel (k3s's remotedialer idea): the node opens one
//! long-lived connection to the server's cluster listener, so a node behind NAT is reachable,
//! and serves the [node API](super::nodeapi) over it.
//!
//! The connection: TLS to the cluster listener with the node's client certificate (the
//! server's certificate verified against the cluster CA), `GET /v1-kapsel/connect` with
//! `Upgrade: kapsel-tunnel`, and after `101 Switching Protocols` the upgraded byte stream
//! carries HTTP/2 with the roles turned round: the server is the HTTP/2 client, the node the
//! HTTP/2 server. HTTP/2 is the multiplexer: every request of the API server is a stream of its
//! own with its own flow-control window, so a slow `logs -f` reader holds back only its stream;
//! pings detect a dead connection. When the connection ends (the server restarted), the agent
//! dials again with exponential back-off (0.5 s doubling to 10 s; reset after a connection
//! that lasted).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_util::sync::CancellationToken;

use crate::pki::join::NodeCredentials;

/// The path the agent upgrades on, and the protocol name it asks for.
pub const CONNECT_PATH: &str = "/v1-kapsel/connect";
pub const PROTOCOL: &str = "kapsel-tunnel";

/// How often each side pings the other, and how long a ping may go unanswered.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one tunnel connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("invalid server URL {0:?}")]
    Url(String),
    #[error("node credentials: {0}")]
    Credentials(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server refused the tunnel: HTTP {0}")]
    Refused(u16),
    #[error("tunnel HTTP: {0}")]
    Http(#[from] hyper::Error),
}

/// The rustls client configuration of a joined node: trusts only the cluster CA, presents
/// the node certificate.
pub fn client_tls(creds: &NodeCredentials) -> Result<Arc<rustls::ClientConfig>, TunnelError> {
    let bad = |e: &dyn std::fmt::Display| TunnelError::Credentials(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(creds.ca_pem.as_bytes()) {
        roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(creds.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).map_err(|e| bad(&e))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(crate::pki::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Keep a tunnel to `server` (`https://HOST:PORT`) open until `cancel` fires, serving
/// `node_api` on it.
pub async fn run(
    server: String,
    creds: NodeCredentials,
    node_api: Router,
    cancel: CancellationToken,
) {
    let tls = match client_tls(&creds) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "node tunnel disabled");
            return;
        }
    };
    let mut wait = Duration::from_millis(500);
    loop {
        let started = tokio::time::Instant::now();
        let r = tokio::select! {
            r = connect_and_serve(&server, tls.clone(), node_api.clone(), &cancel) => r,
            _ = cancel.cancelled() => return,
        };
        match r {
            Ok(()) => tracing::info!("node tunnel closed; reconnecting"),
            Err(e) => tracing::warn!(error = %e, retry_in = ?wait, "node tunnel failed"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            wait = Duration::from_millis(500);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return,
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// One tunnel connection: dial, upgrade, serve HTTP/2 until it ends.
async fn connect_and_serve(
    server: &str,
    tls: Arc<rustls::ClientConfig>,
    node_api: Router,
    cancel: &CancellationToken,
) -> Result<(), TunnelError> {
    let url = reqwest::Url::parse(server).map_err(|_| TunnelError::Url(server.into()))?;
    let host = url
        .host_str()
        .ok_or_else(|| TunnelError::Url(server.into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let addr = format!("{}:{port}", url.host_str().unwrap_or_default());
    let connect_err = |source| TunnelError::Connect {
        addr: addr.clone(),
        source,
    };
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
    .map_err(connect_err)?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(host.clone()).map_err(|_| TunnelError::Url(server.into()))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(connect_err)?;

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn.with_upgrades());
    let req = hyper::Request::builder()
        .method("GET")
        .uri(CONNECT_PATH)
        .header(hyper::header::HOST, url.authority())
        .header(hyper::header::CONNECTION, "Upgrade")
        .header(hyper::header::UPGRADE, PROTOCOL)
        .body(axum::body::Body::empty())
        .expect("static request");
    let resp = sender.send_request(req).await?;
    if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        conn.abort();
        return Err(TunnelError::Refused(resp.status().as_u16()));
    }
    let upgraded = hyper::upgrade::on(resp).await?;
    tracing::info!(server, "node tunnel open");
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let serving = h2.serve_connection(upgraded, TowerToHyperService::new(node_api));
    tokio::pin!(serving);
    tokio::select! {
        r = serving.as_mut() => r?,
        _ = cancel.cancelled() => {
            serving.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), serving).await;
        }
    }
    Ok(())
}
