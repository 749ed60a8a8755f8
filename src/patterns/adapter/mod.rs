//! `builtin/metrics-adapter`: one Prometheus view of every container's metrics in a pod.
//!
//! - [`statsd`]: StatsD / DogStatsD line parsing (UDP `--statsd.listen-udp`).
//! - [`mapping`]: statsd_exporter-style mapping rules (`--statsd.mapping-config`).
//! - [`sources`]: pulled sources from `--config`: JSON endpoints, Prometheus text endpoints
//!   with relabeling, and regex rules over text files.
//! - [`registry`]: the series store, TTL expiry, limits, and the exposition on
//!   `--web.listen-address` (Prometheus text or OpenMetrics by `Accept`).
//!
//! It runs inside the pod's network namespace, so `127.0.0.1` is the pod's localhost for both
//! what it listens on and what it scrapes. Configuration files are re-read when they change;
//! a bad file is reported and the previous configuration stays in force. The node keeps every
//! running adapter's registry in [`node_registries`], where controllers read the latest values.

pub mod mapping;
pub mod registry;
pub mod sources;
pub mod statsd;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::patterns::gitsync::parse_go_duration;
use mapping::Mapper;
use registry::{FamKind, Op, Opts, Registry};

pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Debug, Clone)]
pub struct Config {
    pub statsd_udp: Option<String>,
    pub web_listen: String,
    pub telemetry_path: String,
    pub mapping_config: Option<String>,
    pub config: Option<String>,
    pub max_series: usize,
    pub statsd_ttl: Option<Duration>,
    pub reload_interval: Duration,
}

const FLAGS: &[&str] = &[
    "statsd.listen-udp",
    "web.listen-address",
    "web.telemetry-path",
    "statsd.mapping-config",
    "config",
    "max-series",
    "statsd.ttl",
    "reload-interval",
];

fn listen_addr(flag: &str, v: &str) -> Result<String, String> {
    let (host, port) = v
        .rsplit_once(':')
        .ok_or_else(|| format!("--{flag}: {v:?} is not [host]:port"))?;
    port.parse::<u16>()
        .map_err(|_| format!("--{flag}: {v:?} has an invalid port"))?;
    let a = format!("{}:{port}", if host.is_empty() { "0.0.0.0" } else { host });
    a.parse::<std::net::SocketAddr>()
        .map_err(|_| format!("--{flag}: {v:?} is not an IP:port"))?;
    Ok(a)
}

impl Config {
    /// statsd_exporter's flag names where they overlap (`--statsd.listen-udp`,
    /// `--web.listen-address`, `--statsd.mapping-config`), plus `--config`, `--max-series`,
    /// `--statsd.ttl`, `--reload-interval`. Env: `KAPSEL_ADAPTER_<FLAG>` (dots and dashes as `_`).
    pub fn parse(args: &[String], env: &[(String, String)]) -> Result<Config, String> {
        let mut vals: HashMap<String, String> = HashMap::new();
        for (k, v) in env {
            if let Some(name) = k.strip_prefix("KAPSEL_ADAPTER_") {
                let n = name.to_lowercase();
                if let Some(f) = FLAGS.iter().find(|f| f.replace(['.', '-'], "_") == n) {
                    vals.insert(f.to_string(), v.clone());
                }
            }
        }
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            let Some(body) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
                return Err(format!(
                    "unexpected argument {a:?}: the adapter takes only flags"
                ));
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (body.to_string(), None),
            };
            if !FLAGS.contains(&name.as_str()) {
                return Err(format!(
                    "unknown flag: --{name} (flags: {})",
                    FLAGS
                        .iter()
                        .map(|f| format!("--{f}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            let v = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| format!("flag needs an argument: --{name}"))?
                }
            };
            vals.insert(name, v);
            i += 1;
        }
        let get = |k: &str| vals.get(k).cloned();
        let statsd_udp = match get("statsd.listen-udp") {
            None => Some(listen_addr("statsd.listen-udp", ":9125")?),
            Some(v) if v.is_empty() => None,
            Some(v) => Some(listen_addr("statsd.listen-udp", &v)?),
        };
        let dur = |k: &str, d: Duration| -> Result<Duration, String> {
            get(k)
                .map(|v| parse_go_duration(&v).map_err(|e| format!("--{k}: {e}")))
                .unwrap_or(Ok(d))
        };
        let path = get("web.telemetry-path").unwrap_or_else(|| "/metrics".into());
        if !path.starts_with('/') {
            return Err(format!(
                "--web.telemetry-path must start with /, got {path:?}"
            ));
        }
        let max_series = match get("max-series") {
            None => 200_000,
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("--max-series: invalid number {v:?}"))?,
        };
        let ttl = dur("statsd.ttl", Duration::from_secs(300))?;
        let reload = dur("reload-interval", Duration::from_secs(1))?;
        if reload < Duration::from_millis(100) {
            return Err("--reload-interval must be at least 100ms".into());
        }
        Ok(Config {
            statsd_udp,
            web_listen: listen_addr(
                "web.listen-address",
                &get("web.listen-address").unwrap_or_else(|| ":9102".into()),
            )?,
            telemetry_path: path,
            mapping_config: get("statsd.mapping-config").filter(|s| !s.is_empty()),
            config: get("config").filter(|s| !s.is_empty()),
            max_series,
            statsd_ttl: (!ttl.is_zero()).then_some(ttl),
            reload_interval: reload,
        })
    }
}

/// Every adapter running on this node, by `namespace/pod/container`: the latest values for
/// controllers (and `GET /api/v1/namespaces/{ns}/pods/{name}/metrics`).
pub fn node_registries() -> &'static Mutex<HashMap<String, Weak<Registry>>> {
    static M: LazyLock<Mutex<HashMap<String, Weak<Registry>>>> = LazyLock::new(Default::default);
    &M
}

/// The latest values of one pod's adapters: (container, metric, labels, value).
pub fn pod_values(ns: &str, pod: &str) -> Vec<(String, String, String, f64)> {
    let prefix = format!("{ns}/{pod}/");
    let mut m = node_registries().lock().unwrap();
    m.retain(|_, w| w.strong_count() > 0);
    let mut out = Vec::new();
    for (k, w) in m.iter() {
        if let (Some(c), Some(reg)) = (k.strip_prefix(&prefix), w.upgrade()) {
            for (n, l, v) in reg.snapshot() {
                out.push((c.to_string(), n, l, v));
            }
        }
    }
    out.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
    out
}

/// Maps a path as the container sees it to one on this machine (its volume mounts).
pub type PathMap = Arc<dyn Fn(&str) -> Option<PathBuf> + Send + Sync>;

pub struct Adapter {
    pub cfg: Config,
    pub reg: Arc<Registry>,
    mapper: RwLock<Arc<Mapper>>,
    sources: RwLock<Arc<sources::Compiled>>,
    paths: PathMap,
    log: LogFn,
    http: reqwest::Client,
    failing: Mutex<std::collections::HashSet<String>>,
}

fn read(paths: &PathMap, flag: &str, p: &str) -> Result<(String, PathBuf), String> {
    let host = paths(p)
        .ok_or_else(|| format!("--{flag} {p} is not inside the container's volume mounts"))?;
    let text = std::fs::read_to_string(&host).map_err(|e| format!("--{flag} {p}: {e}"))?;
    Ok((text, host))
}

fn mtime(p: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Adapter {
    /// Load the configuration files; a bad one fails the start with its error.
    pub fn new(cfg: Config, paths: PathMap, log: LogFn) -> Result<Self, String> {
        let mapper = match &cfg.mapping_config {
            Some(p) => {
                let (t, _) = read(&paths, "statsd.mapping-config", p)?;
                Mapper::parse(&t).map_err(|e| format!("--statsd.mapping-config {p}: {e}"))?
            }
            None => Mapper::empty(),
        };
        let srcs = match &cfg.config {
            Some(p) => {
                let (t, _) = read(&paths, "config", p)?;
                sources::compile(&t).map_err(|e| format!("--config {p}: {e}"))?
            }
            None => sources::compile("{}").expect("empty config"),
        };
        Ok(Adapter {
            reg: Arc::new(Registry::new(cfg.max_series, None, log.clone())),
            cfg,
            mapper: RwLock::new(Arc::new(mapper)),
            sources: RwLock::new(Arc::new(srcs)),
            paths,
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| e.to_string())?,
            failing: Mutex::new(Default::default()),
        })
    }

    /// Handle one StatsD datagram.
    pub fn ingest(&self, datagram: &[u8]) {
        let st = &self.reg.stats;
        st.statsd_packets.fetch_add(1, Ordering::Relaxed);
        let Ok(text) = std::str::from_utf8(datagram) else {
            st.statsd_malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mapper = self.mapper.read().unwrap().clone();
        let mut samples = Vec::with_capacity(4);
        let mut labels: Vec<(String, String)> = Vec::new();
        let (mut lines, mut bad, mut dropped) = (0u64, 0u64, 0u64);
        self.reg.batch(|b| {
            for line in text.split('\n') {
                if line.trim().is_empty() {
                    continue;
                }
                lines += 1;
                samples.clear();
                if statsd::parse_line(line, &mut samples).is_err() {
                    bad += 1;
                    continue;
                }
                for s in &samples {
                    let Some(m) = mapper.map(s.name, s.kind) else {
                        dropped += 1;
                        continue;
                    };
                    labels.clear();
                    labels.extend(m.labels.iter().cloned());
                    for (k, v) in &s.tags {
                        let k = statsd::escape_name(k);
                        if !labels.iter().any(|(lk, _)| *lk == k) {
                            labels.push((k, v.to_string()));
                        }
                    }
                    let o = Opts {
                        buckets: &m.buckets,
                        ttl: m.ttl.or(self.cfg.statsd_ttl),
                        help: m.help.as_deref(),
                    };
                    let (kind, op) = match s.kind {
                        statsd::Kind::Counter => (FamKind::Counter, Op::Add(s.value / s.rate)),
                        statsd::Kind::Gauge if s.relative => (FamKind::Gauge, Op::Add(s.value)),
                        statsd::Kind::Gauge => (FamKind::Gauge, Op::Set(s.value)),
                        statsd::Kind::Timer => (
                            FamKind::Histogram,
                            Op::Observe(if s.millis { s.value / 1000.0 } else { s.value }),
                        ),
                        statsd::Kind::Set => (FamKind::Gauge, Op::Member(s.member)),
                    };
                    b.update(&m.name, kind, &labels, op, &o);
                }
            }
        });
        st.statsd_lines.fetch_add(lines, Ordering::Relaxed);
        if bad > 0 {
            st.statsd_malformed.fetch_add(bad, Ordering::Relaxed);
        }
        if dropped > 0 {
            st.statsd_dropped_by_rule
                .fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Re-read changed configuration files. A bad file is logged, counted, and ignored.
    fn reload(&self, which: &str) {
        let r = match which {
            "mapping" => self.cfg.mapping_config.as_ref().map(|p| {
                read(&self.paths, "statsd.mapping-config", p)
                    .and_then(|(t, _)| {
                        Mapper::parse(&t).map_err(|e| format!("--statsd.mapping-config {p}: {e}"))
                    })
                    .map(|m| *self.mapper.write().unwrap() = Arc::new(m))
            }),
            _ => self.cfg.config.as_ref().map(|p| {
                read(&self.paths, "config", p)
                    .and_then(|(t, _)| {
                        sources::compile(&t).map_err(|e| format!("--config {p}: {e}"))
                    })
                    .map(|c| *self.sources.write().unwrap() = Arc::new(c))
            }),
        };
        match r {
            Some(Ok(())) => {
                self.reg
                    .stats
                    .config_reloads_ok
                    .fetch_add(1, Ordering::Relaxed);
                (self.log)(&format!(
                    "metrics-adapter: reloaded the {which} configuration\n"
                ));
            }
            Some(Err(e)) => {
                self.reg
                    .stats
                    .config_reloads_failed
                    .fetch_add(1, Ordering::Relaxed);
                (self.log)(&format!(
                    "metrics-adapter: keeping the previous {which} configuration: {e}\n"
                ));
            }
            None => {}
        }
    }

    /// Serve until `stop`.
    pub async fn serve(
        self: Arc<Self>,
        udp: Option<UdpSocket>,
        http: TcpListener,
        stop: CancellationToken,
    ) {
        let tracker = tokio_util::task::TaskTracker::new();
        (self.log)(&format!(
            "metrics-adapter: /metrics on {}{}\n",
            http.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            udp.as_ref()
                .and_then(|u| u.local_addr().ok())
                .map(|a| format!(", StatsD on udp {a}"))
                .unwrap_or_default()
        ));
        if let Some(udp) = udp {
            let me = self.clone();
            let stop = stop.clone();
            tracker.spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = udp.recv_from(&mut buf) => if let Ok((n, _)) = r {
                            me.ingest(&buf[..n]);
                            // Drain what is already queued without going back to the reactor.
                            while let Ok((n, _)) = udp.try_recv_from(&mut buf) {
                                me.ingest(&buf[..n]);
                            }
                        },
                    }
                }
            });
        }
        // Expiry.
        {
            let reg = self.reg.clone();
            let stop = stop.clone();
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => reg.expire(),
                    }
                }
            });
        }
        // HTTP.
        {
            let me = self.clone();
            let path = self.cfg.telemetry_path.clone();
            let app = axum::Router::new()
                .route(
                    &path,
                    axum::routing::get(move |headers: axum::http::HeaderMap| {
                        let me = me.clone();
                        async move {
                            let om = headers
                                .get(axum::http::header::ACCEPT)
                                .and_then(|v| v.to_str().ok())
                                .is_some_and(|a| a.contains("application/openmetrics-text"));
                            let body = me.reg.render(om);
                            let ct = if om {
                                "application/openmetrics-text; version=1.0.0; charset=utf-8"
                            } else {
                                "text/plain; version=0.0.4; charset=utf-8"
                            };
                            ([(axum::http::header::CONTENT_TYPE, ct)], body)
                        }
                    }),
                )
                .route("/-/healthy", axum::routing::get(|| async { "ok\n" }));
            let stop = stop.clone();
            tracker.spawn(async move {
                let _ = axum::serve(http, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
            });
        }
        // Sources, restarted on reload; and the file watcher.
        let mut generation = stop.child_token();
        self.clone().start_sources(&tracker, generation.clone());
        let watched: Vec<(&str, Option<PathBuf>)> = [
            ("mapping", self.cfg.mapping_config.as_deref()),
            ("sources", self.cfg.config.as_deref()),
        ]
        .into_iter()
        .filter_map(|(w, p)| p.map(|p| (w, (self.paths)(p))))
        .collect();
        let mut seen: Vec<Option<SystemTime>> = watched
            .iter()
            .map(|(_, p)| p.as_ref().and_then(mtime))
            .collect();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.cfg.reload_interval) => {}
            }
            for (i, (which, p)) in watched.iter().enumerate() {
                let m = p.as_ref().and_then(mtime);
                if m != seen[i] {
                    seen[i] = m;
                    self.reload(which);
                    if *which == "sources" {
                        generation.cancel();
                        generation = stop.child_token();
                        self.clone().start_sources(&tracker, generation.clone());
                    }
                }
            }
        }
        tracker.close();
        tracker.wait().await;
    }

    fn start_sources(
        self: Arc<Self>,
        tracker: &tokio_util::task::TaskTracker,
        stop: CancellationToken,
    ) {
        let c = self.sources.read().unwrap().clone();
        for i in 0..c.json.len() {
            let (me, c, stop) = (self.clone(), c.clone(), stop.clone());
            tracker.spawn(async move {
                let (src, every, kinds) = &c.json[i];
                loop {
                    let r = async {
                        let resp = me.http.get(&src.url).send().await.map_err(|e| e.to_string())?;
                        if !resp.status().is_success() {
                            return Err(format!("HTTP {}", resp.status()));
                        }
                        let doc: serde_json::Value = resp.json().await.map_err(|e| format!("not JSON: {e}"))?;
                        Ok(sources::apply_json(&me.reg, src, kinds, &doc, Some(*every * 3)))
                    }
                    .await;
                    me.report(&format!("json/{}", src.name), &src.url, r);
                    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(*every) => {} }
                }
            });
        }
        for i in 0..c.prom.len() {
            let (me, c, stop) = (self.clone(), c.clone(), stop.clone());
            tracker.spawn(async move {
                let (src, every, keep, drop_re) = &c.prom[i];
                loop {
                    let r = async {
                        let resp = me.http.get(&src.url).send().await.map_err(|e| e.to_string())?;
                        if !resp.status().is_success() {
                            return Err(format!("HTTP {}", resp.status()));
                        }
                        let t = resp.text().await.map_err(|e| e.to_string())?;
                        Ok(sources::apply_prom(&me.reg, src, keep.as_ref(), drop_re.as_ref(), &t, Some(*every * 3)))
                    }
                    .await;
                    me.report(&format!("prometheus/{}", src.name), &src.url, r);
                    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(*every) => {} }
                }
            });
        }
        for i in 0..c.lines.len() {
            let (me, c, stop) = (self.clone(), c.clone(), stop.clone());
            tracker.spawn(async move {
                let (src, every, rules) = &c.lines[i];
                let mut offset: u64 = 0;
                loop {
                    let r = match (me.paths)(&src.file) {
                        None => Err(format!("{} is not inside the container's volume mounts", src.file)),
                        Some(p) => read_lines(&p, src.mode == "tail", &mut offset)
                            .map(|t| sources::apply_lines(&me.reg, src, rules, &t)),
                    };
                    me.report(&format!("lines/{}", src.name), &src.file, r);
                    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(*every) => {} }
                }
            });
        }
    }

    /// Count a pull; log when a source starts failing, and when it recovers.
    fn report(&self, source: &str, what: &str, r: Result<usize, String>) {
        self.reg.scrape_result(source, r.is_ok());
        let mut failing = self.failing.lock().unwrap();
        match r {
            Ok(_) => {
                if failing.remove(source) {
                    (self.log)(&format!("metrics-adapter: {source} ({what}) recovered\n"));
                }
            }
            Err(e) => {
                if failing.insert(source.to_string()) {
                    (self.log)(&format!("metrics-adapter: {source} ({what}) failed: {e}\n"));
                }
            }
        }
    }
}

/// A whole file (snapshot) or what was appended since `offset` (tail; a shorter file restarts).
fn read_lines(p: &PathBuf, tail: bool, offset: &mut u64) -> Result<String, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if !tail {
        let mut s = String::new();
        f.take(16 << 20)
            .read_to_string(&mut s)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        return Ok(s);
    }
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < *offset {
        *offset = 0; // truncated or rotated
    }
    f.seek(SeekFrom::Start(*offset))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    f.take(16 << 20)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    // Only whole lines; a partial last line waits for its newline.
    let upto = buf
        .iter()
        .rposition(|b| *b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    *offset += upto as u64;
    Ok(String::from_utf8_lossy(&buf[..upto]).into_owned())
}

/// Bind the adapter's sockets on the current thread (in its network namespace).
pub fn bind_std(
    cfg: &Config,
) -> std::io::Result<(Option<std::net::UdpSocket>, std::net::TcpListener)> {
    let udp = match &cfg.statsd_udp {
        Some(a) => {
            let u = std::net::UdpSocket::bind(a)?;
            u.set_nonblocking(true)?;
            // A larger receive buffer rides out bursts (best effort; capped by net.core.rmem_max).
            let size: libc::c_int = 8 << 20;
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&u),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    &size as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            Some(u)
        }
        None => None,
    };
    let l = std::net::TcpListener::bind(&cfg.web_listen)?;
    l.set_nonblocking(true)?;
    Ok((udp, l))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags() {
        let c = Config::parse(
            &s(&[
                "--statsd.listen-udp=:9999",
                "--web.listen-address",
                "127.0.0.1:9000",
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.statsd_udp.as_deref(), Some("0.0.0.0:9999"));
        assert_eq!(c.web_listen, "127.0.0.1:9000");
        let c = Config::parse(
            &[],
            &[("KAPSEL_ADAPTER_STATSD_LISTEN_UDP".into(), "".into())],
        )
        .unwrap();
        assert!(c.statsd_udp.is_none());
        assert_eq!(c.web_listen, "0.0.0.0:9102");
        assert!(Config::parse(&s(&["--bogus=1"]), &[])
            .unwrap_err()
            .contains("--bogus"));
        assert!(Config::parse(&s(&["--web.listen-address=x"]), &[])
            .unwrap_err()
            .contains("web.listen-address"));
    }

    #[test]
    fn ingest_maps_statsd_into_series() {
        let a = Adapter::new(
            Config::parse(&[], &[]).unwrap(),
            Arc::new(|p: &str| Some(PathBuf::from(p))),
            Arc::new(|_: &str| {}),
        )
        .unwrap();
        a.ingest(b"api.hits:2|c|@0.5\napi.hits:1|c\nq.depth:5|g\nq.depth:-2|g\nreq.time:250|ms|#route:/a\nusers:al|s\nusers:bo|s\nusers:al|s\ngarbage\n");
        let t = a.reg.render(false);
        assert!(t.contains("api_hits 5\n"), "{t}");
        assert!(t.contains("q_depth 3\n"));
        assert!(
            t.contains("req_time_bucket{route=\"/a\",le=\"0.25\"} 1"),
            "{t}"
        );
        assert!(t.contains("users 2\n"));
        assert!(t.contains("kapsel_adapter_statsd_malformed_lines_total 1"));
    }
}
