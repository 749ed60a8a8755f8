//! `builtin/redis-ambassador`: a Redis proxy on the pod's localhost that sends reads to healthy
//! replicas and everything else to the master, so an app talks to "a Redis on localhost".
//!
//! - [`config`]: flags and `KAPSEL_AMBASSADOR_*` variables (the shared clap-based parser).
//! - [`conn`]: upstream connections, plain TCP or TLS (`--tls`, rustls).
//! - [`error`]: the error types, one per layer.
//! - [`resp`]: RESP2/RESP3 framing and the small value parser.
//! - [`commands`]: the command table (read-only, session state, pub/sub, refused).
//! - [`topology`]: the master and healthy replicas (static or Sentinel), health checks, pools.
//! - [`session`]: one client connection, pipelined, split across upstreams, replies in order.
//! - [`mux`]: the shared upstream connections stateless commands of all clients travel on.
//! - [`metrics`]: the ambassador's own Prometheus metrics.
//!
//! The listening socket lives in the pod's network namespace (it is bound there, then driven
//! from the node's runtime); upstream connections leave from the node's network, so
//! `--master=127.0.0.1:6390` is the node's own loopback.

pub mod commands;
pub mod config;
pub mod conn;
pub mod error;
pub mod metrics;
pub mod mux;
pub mod resp;
pub mod session;
pub mod topology;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, ConfigError};
pub use error::AmbassadorError;

/// Log sink: the container's log in a pod, stderr standalone.
pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

/// A configured ambassador, ready to serve on listeners bound by the caller.
pub struct Ambassador {
    shared: Arc<session::Shared>,
    log: LogFn,
}

impl Ambassador {
    pub fn new(cfg: Config, log: LogFn) -> Result<Self, AmbassadorError> {
        let cfg = Arc::new(cfg);
        let tls = match &cfg.tls {
            Some(t) => Some(conn::Connector::tls(t)?),
            None => None,
        };
        let pick = |on: bool| match (&tls, on) {
            (Some(c), true) => c.clone(),
            _ => conn::Connector::plain(),
        };
        let topo = topology::Topology::new(
            cfg.clone(),
            log.clone(),
            pick(cfg.server_tls),
            pick(cfg.sentinel_tls),
        );
        let auth = topo.auth_prelude()?.map(Bytes::from);
        let limits = resp::Limits {
            max_bulk: cfg.max_bulk_bytes,
            ..Default::default()
        };
        Ok(Ambassador {
            shared: Arc::new(session::Shared {
                topo: topo.clone(),
                metrics: Arc::new(metrics::Metrics::default()),
                limits,
                auth: auth.clone(),
                mux: mux::MuxCtx {
                    auth,
                    connect_timeout: cfg.connect_timeout,
                    epoch: std::time::Instant::now(),
                    stop: CancellationToken::new(),
                    refresh: topo.refresh.clone(),
                },
            }),
            log,
        })
    }

    pub fn config(&self) -> &Config {
        &self.shared.topo.cfg
    }

    /// The master and healthy replicas as the ambassador sees them (for `describe pod`).
    pub fn topology(&self) -> Arc<topology::Topology> {
        self.shared.topo.clone()
    }

    /// A handle on the ambassador's live state that outlives moving the ambassador into
    /// [`Ambassador::spawn_thread`]: keep it with the container to answer `kapsel describe pod`.
    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle(self.shared.clone())
    }

    /// See [`StatusHandle::status_lines`].
    pub fn status_lines(&self) -> Vec<(String, String)> {
        self.status_handle().status_lines()
    }

    /// The metrics page, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render(&self.shared.topo)
    }

    /// Serve clients on `listener` (and metrics on `metrics`, if given) until `stop`.
    pub async fn serve(
        &self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        stop: CancellationToken,
    ) {
        let tracker = TaskTracker::new();
        tracker.spawn(self.shared.topo.clone().run(stop.clone()));
        if let Some(m) = metrics {
            let shared = self.shared.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let shared = shared.clone();
                    async move {
                        (
                            [("content-type", "text/plain; version=0.0.4")],
                            shared.metrics.render(&shared.topo),
                        )
                    }
                }),
            );
            let token = stop.clone();
            tracker.spawn(async move {
                let _ = axum::serve(m, app)
                    .with_graceful_shutdown(token.cancelled_owned())
                    .await;
            });
        }
        (self.log)(&format!(
            "redis-ambassador: listening on {}, {}\n",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            match &self.shared.topo.cfg.upstreams {
                config::Upstreams::Static { master, replicas } =>
                    format!("master {master}, replicas [{}]", replicas.join(", ")),
                config::Upstreams::Sentinel {
                    sentinels,
                    master_name,
                } => format!(
                    "master {master_name:?} from Sentinel [{}]",
                    sentinels.join(", ")
                ),
            }
        ));
        let max = self.shared.topo.cfg.max_clients as u64;
        loop {
            let (mut stream, _) = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "redis-ambassador accept");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let m = &self.shared.metrics;
            if m.clients_active.load(Ordering::Relaxed) >= max {
                m.clients_rejected.fetch_add(1, Ordering::Relaxed);
                tracker.spawn(async move {
                    let _ = stream
                        .write_all(b"-ERR max number of clients reached\r\n")
                        .await;
                });
                continue;
            }
            m.clients_active.fetch_add(1, Ordering::Relaxed);
            m.clients_total.fetch_add(1, Ordering::Relaxed);
            let shared = self.shared.clone();
            let stop = stop.clone();
            tracker.spawn(async move {
                session::run(stream, shared.clone(), stop).await;
                shared
                    .metrics
                    .clients_active
                    .fetch_sub(1, Ordering::Relaxed);
            });
        }
        self.shared.mux.stop.cancel();
        tracker.close();
        tracker.wait().await;
    }

    /// Serve on a thread of its own with a single-threaded runtime, like Redis and twemproxy:
    /// sessions and shared connections then never hop between threads. The thread is a plain
    /// node thread, so upstream connections leave from the node's network whatever namespace
    /// the listening sockets were bound in. Returns when `stop` fires and clients are closed.
    pub fn spawn_thread(
        self,
        listener: std::net::TcpListener,
        metrics: Option<std::net::TcpListener>,
        stop: CancellationToken,
    ) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("redis-ambassador".into())
            .spawn(move || {
                rt.block_on(async move {
                    let l = TcpListener::from_std(listener);
                    let m = metrics.map(TcpListener::from_std).transpose();
                    match (l, m) {
                        (Ok(l), Ok(m)) => self.serve(l, m, stop).await,
                        (Err(e), _) | (_, Err(e)) => {
                            (self.log)(&format!("redis-ambassador: cannot listen: {e}\n"))
                        }
                    }
                });
                let _ = done_tx.send(());
            })?;
        Ok(done_rx)
    }
}

/// A cheap, cloneable view of a running ambassador's state (see
/// [`Ambassador::status_handle`]).
#[derive(Clone)]
pub struct StatusHandle(Arc<session::Shared>);

impl StatusHandle {
    /// The ambassador's state for `kapsel describe pod`, as (label, value) rows in display
    /// order: `Master` (address, and its last error if it failed its check), `Replicas`
    /// (healthy ones serving reads, with the lag the master reports), one `Replica ADDR` row
    /// per replica skipped and why, `Clients` (open now, accepted in all), `Failovers`, and
    /// `Upstream TLS` when TLS is on. Cheap: reads counters and the last health check only.
    pub fn status_lines(&self) -> Vec<(String, String)> {
        let st = self.0.topo.status();
        let cfg = &self.0.topo.cfg;
        let m = &self.0.metrics;
        let mut rows = Vec::new();
        rows.push((
            "Master".to_string(),
            match &st.master_error {
                Some(e) => format!("{} ({e})", st.master),
                None => st.master.clone(),
            },
        ));
        let healthy: Vec<String> = st
            .replicas
            .iter()
            .filter(|r| r.1)
            .map(|(addr, _, lag, _)| match lag {
                Some(l) => format!("{addr} (lag {l}s)"),
                None => addr.clone(),
            })
            .collect();
        rows.push((
            "Replicas".to_string(),
            if healthy.is_empty() {
                "none healthy: reads go to the master".to_string()
            } else {
                healthy.join(", ")
            },
        ));
        for (addr, ok, _, why) in &st.replicas {
            if !ok {
                rows.push((format!("Replica {addr}"), format!("skipped: {why}")));
            }
        }
        rows.push((
            "Clients".to_string(),
            format!(
                "{} open, {} accepted",
                m.clients_active.load(Ordering::Relaxed),
                m.clients_total.load(Ordering::Relaxed)
            ),
        ));
        rows.push(("Failovers".to_string(), st.failovers.to_string()));
        if cfg.server_tls || cfg.sentinel_tls {
            rows.push((
                "Upstream TLS".to_string(),
                match (cfg.server_tls, cfg.sentinel_tls) {
                    (true, true) => "servers and Sentinels",
                    (true, false) => "servers",
                    _ => "Sentinels",
                }
                .to_string(),
            ));
        }
        rows
    }
}

/// Bind a listening socket from the current thread (and so in its network namespace),
/// non-blocking, ready for [`TcpListener::from_std`] on any runtime.
pub fn bind_std(addr: &str) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_show_the_master_replicas_and_clients() {
        let args: Vec<String> = ["--master=127.0.0.1:6390", "--replica=127.0.0.1:6391"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let a =
            Ambassador::new(Config::parse(&args, &[]).unwrap(), Arc::new(|_: &str| {})).unwrap();
        let rows = a.status_lines();
        let get = |k: &str| rows.iter().find(|(l, _)| l == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Master"), Some("127.0.0.1:6390"));
        assert_eq!(get("Replicas"), Some("127.0.0.1:6391"));
        assert_eq!(get("Clients"), Some("0 open, 0 accepted"));
        assert_eq!(get("Failovers"), Some("0"));
        assert_eq!(get("Upstream TLS"), None);
    }
}
