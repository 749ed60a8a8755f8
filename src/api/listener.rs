//! The API's TCP front: the accept loop that serves the router over HTTP/1.1 with
//!
//! - a **connection cap** (`--max-connections`, default 2048): the loop takes a slot before it
//!   accepts, so beyond the cap new connections wait in the kernel's listen backlog — no file
//!   descriptor is spent on them — and are served as soon as a held connection ends;
//! - a **header-read timeout** (`--header-read-timeout`, default 30 s): a client that has not
//!   sent a whole request head within it — a half-sent request, or a keep-alive connection
//!   idle between requests — is disconnected, so held slots come back. Only the head is timed:
//!   long-lived responses (watches, `logs -f`) stream for as long as they need;
//! - a **drain on shutdown**: when the cancellation token fires the loop stops accepting, idle
//!   connections are closed, in-flight requests finish (watches and log streams end on the
//!   same token), and whatever is still open after the drain deadline is dropped.
//!
//! The cluster listener is the same loop over TLS ([`serve_tls`]): the handshake is timed like
//! a request head, and the node named by a verified client certificate rides on each request
//! as its [`Peer`].
//!
//! It also raises the soft `RLIMIT_NOFILE` to the hard limit, and keeps the cap below the
//! descriptor limit so pods, logs and the store keep theirs.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tower::ServiceExt;

use super::authz::Peer;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Defaults of `kapsel serve --max-connections` and `--header-read-timeout`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections the kernel may queue for us beyond the cap (it caps this at `somaxconn`); the
/// standard library's 128 would make clients past it retry their SYNs for seconds.
pub const LISTEN_BACKLOG: u32 = 4096;
/// Descriptors kept free for everything but API connections.
const RESERVED_FDS: u64 = 512;

/// How the listener treats connections.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Most connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Longest time a client may take to send a request head (`None`: no limit).
    pub header_read_timeout: Option<Duration>,
    /// How long shutdown waits for in-flight requests before dropping them.
    pub drain_timeout: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: Some(DEFAULT_HEADER_READ_TIMEOUT),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Bind `addr` (`host:port`, resolved) with a [`LISTEN_BACKLOG`]-deep accept queue.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if let Err(e) = socket.bind(a) {
            last = Some(e);
            continue;
        }
        return socket.listen(LISTEN_BACKLOG);
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// Raise the soft open-files limit to the hard one; returns the soft limit now in force.
#[allow(clippy::unnecessary_cast)] // `rlim_t` is not `u64` on every target
pub fn raise_nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Some(lim.rlim_cur as u64)
}

/// The cap actually applied: the configured one, lowered when the descriptor limit could not
/// hold it plus what the rest of the server needs.
pub fn effective_max_connections(configured: usize, nofile: Option<u64>) -> usize {
    let configured = configured.max(1);
    match nofile {
        Some(n) if (configured as u64).saturating_add(RESERVED_FDS) > n => {
            let capped = n.saturating_sub(RESERVED_FDS).max(16) as usize;
            let capped = capped.min(configured);
            tracing::warn!(
                configured,
                capped,
                nofile = n,
                "--max-connections lowered to fit the open-files limit"
            );
            capped
        }
        _ => configured,
    }
}

/// Serve `app` on `listener` until `cancel` fires, then drain.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: ListenerConfig,
    cancel: CancellationToken,
) {
    serve_with(listener, app, cfg, cancel, None).await
}

/// Serve `app` over TLS (the cluster listener): each connection's verified client
/// certificate becomes the [`Peer`] of its requests (a request extension).
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    cfg: ListenerConfig,
    cancel: CancellationToken,
    tls: Arc<rustls::ServerConfig>,
) {
    serve_with(
        listener,
        app,
        cfg,
        cancel,
        Some(tokio_rustls::TlsAcceptor::from(tls)),
    )
    .await
}

/// Serve one connection until it ends or `cancel` fires (then finish the request in flight).
async fn serve_conn<I>(
    http: hyper::server::conn::http1::Builder,
    io: I,
    app: Router,
    cancel: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Upgrades: `exec` (WebSocket) and the agents' tunnels.
    let conn = http
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
        .with_upgrades();
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = cancel.cancelled() => {
            // Finish the request in flight (streams end on the same token), close idle.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "API connection ended");
    }
}

/// The peer of a TLS connection: the node its verified client certificate names.
fn peer_of(conn: &rustls::ServerConnection) -> Peer {
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|c| crate::pki::ca::node_of_certificate(c))
        .map(Peer::Node)
        .unwrap_or(Peer::Anonymous)
}

async fn serve_with(
    listener: TcpListener,
    app: Router,
    cfg: ListenerConfig,
    cancel: CancellationToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let slots = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .keep_alive(true);
    let handshake_timeout = cfg.header_read_timeout.unwrap_or(Duration::from_secs(30));
    let mut conns: JoinSet<()> = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        // A slot first: beyond the cap, connections wait in the kernel's backlog.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = cancel.cancelled() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Per-connection errors (reset before accept) are not the listener's;
                    // EMFILE/ENFILE and the like: back off, the slot goes back meanwhile.
                    if !is_connection_error(&e) {
                        tracing::warn!(error = %e, "API accept failed; retrying");
                        drop(slot);
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = cancel.cancelled() => break,
                        }
                    }
                    continue;
                }
            },
            _ = cancel.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let cancel = cancel.clone();
        let http = http.clone();
        let app = app.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let _slot = slot;
            let Some(acceptor) = tls else {
                return serve_conn(http, stream, app, cancel).await;
            };
            // The handshake is timed like a request head: a silent client loses its slot.
            let tls_stream = tokio::select! {
                r = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)) => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                },
                _ = cancel.cancelled() => return,
            };
            let peer = peer_of(tls_stream.get_ref().1);
            let app = app.map_request(move |mut req: axum::extract::Request| {
                req.extensions_mut().insert(peer.clone());
                req
            });
            serve_conn(
                http,
                tls_stream,
                Router::new().fallback_service(app),
                cancel,
            )
            .await
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(cfg.drain_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            "API connections still open after the drain deadline; closing them"
        );
        conns.shutdown().await;
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fits_the_descriptor_limit() {
        assert_eq!(effective_max_connections(2048, Some(1_048_576)), 2048);
        assert_eq!(effective_max_connections(2048, None), 2048);
        assert_eq!(effective_max_connections(2048, Some(1024)), 512);
        assert_eq!(effective_max_connections(8, Some(100)), 8);
        assert_eq!(effective_max_connections(0, Some(1_048_576)), 1);
    }
}
