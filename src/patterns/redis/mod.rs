//! `builtin/redis-ambassador`: a Redis proxy on the pod's localhost that sends reads to healthy
//! replicas and everything else to the master, so an app talks to "a Redis on localhost".
//!
//! - [`config`]: flags and `KAPSEL_AMBASSADOR_*` variables.
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

pub use config::Config;

/// Log sink: the container's log in a pod, stderr standalone.
pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

/// A configured ambassador, ready to serve on listeners bound by the caller.
pub struct Ambassador {
    shared: Arc<session::Shared>,
    log: LogFn,
}

impl Ambassador {
    pub fn new(cfg: Config, log: LogFn) -> Result<Self, String> {
        let cfg = Arc::new(cfg);
        let topo = topology::Topology::new(cfg.clone(), log.clone());
        let auth = topo.auth_prelude()?.map(Bytes::from);
        let limits = resp::Limits {
            max_bulk: cfg.max_bulk_bytes,
            ..Default::default()
        };
        Ok(Ambassador {
            shared: Arc::new(session::Shared {
                topo,
                metrics: Arc::new(metrics::Metrics::default()),
                limits,
                auth: auth.clone(),
                mux: mux::MuxCtx {
                    auth,
                    connect_timeout: cfg.connect_timeout,
                    epoch: std::time::Instant::now(),
                    stop: CancellationToken::new(),
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

/// Bind a listening socket from the current thread (and so in its network namespace),
/// non-blocking, ready for [`TcpListener::from_std`] on any runtime.
pub fn bind_std(addr: &str) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}
