//! `builtin/metrics-adapter`: one Prometheus view of every container's metrics in a pod.
//!
//! - [`statsd`]: StatsD / DogStatsD line parsing (UDP `--statsd.listen-udp`).
//! - [`mapping`]: statsd_exporter's mapping files (`--statsd.mapping-config`), with its
//!   matching semantics.
//! - [`sources`]: pulled sources from `--config`: JSON endpoints, Prometheus text endpoints
//!   with relabeling, and regex rules over text files.
//! - [`registry`]: the series store (counters, gauges, histograms, summaries), TTL expiry,
//!   limits, and the exposition on `--web.listen-address` (Prometheus text or OpenMetrics by
//!   `Accept`).
//!
//! This module owns the flags ([`Config`], parsed by the shared [`crate::patterns::flags`]),
//! the adapter's lifecycle ([`Adapter::serve`]) and its status ([`Adapter::status_lines`]).
//! It runs inside the pod's network namespace, so `127.0.0.1` is the pod's localhost for both
//! what it listens on and what it scrapes. Configuration files are re-read when they change;
//! a bad file is reported and the previous configuration stays in force. The node keeps every
//! running adapter in [`node_adapters`] (its registry in [`node_registries`]), where
//! controllers read the latest values and `describe` reads the status.

pub mod mapping;
pub mod registry;
pub mod sources;
pub mod statsd;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use clap::Parser;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::patterns::flags;
use mapping::{Mapper, MappingError, Observer};
use registry::{FamKind, Op, Opts, Registry};
use sources::SourcesError;

pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

/// An error and its causes on one line (`a: b: c`), for logs and container statuses.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s.replace('\n', " ")
}

/// The adapter's flags: statsd_exporter's names where they overlap (`--statsd.listen-udp`,
/// `--web.listen-address`, `--web.telemetry-path`, `--statsd.mapping-config`), each also
/// read from `KAPSEL_ADAPTER_<FLAG>` (dots and dashes as `_`).
#[derive(Parser, Debug, Clone)]
#[command(
    about = "Collects the metrics of a pod's containers (StatsD/DogStatsD over UDP, JSON and Prometheus endpoints, text files) and exposes them as one Prometheus endpoint."
)]
pub struct Config {
    /// StatsD/DogStatsD UDP address ([host]:port); empty disables StatsD.
    #[arg(long = "statsd.listen-udp", env = "KAPSEL_ADAPTER_STATSD_LISTEN_UDP",
          default_value = ":9125", value_parser = udp_addr, value_name = "ADDR")]
    pub statsd_udp: MaybeAddr,
    /// Address of the one /metrics endpoint ([host]:port).
    #[arg(long = "web.listen-address", env = "KAPSEL_ADAPTER_WEB_LISTEN_ADDRESS",
          default_value = ":9102", value_parser = flags::listen_addr, value_name = "ADDR")]
    pub web_listen: SocketAddr,
    /// Path of the metrics page.
    #[arg(long = "web.telemetry-path", env = "KAPSEL_ADAPTER_WEB_TELEMETRY_PATH",
          default_value = "/metrics", value_parser = telemetry_path, value_name = "PATH")]
    pub telemetry_path: String,
    /// statsd_exporter mapping file (a path inside the container's volume mounts).
    #[arg(
        long = "statsd.mapping-config",
        env = "KAPSEL_ADAPTER_STATSD_MAPPING_CONFIG",
        value_name = "FILE"
    )]
    pub mapping_config: Option<String>,
    /// Pulled sources: json, prometheus and lines (a path inside the volume mounts).
    #[arg(long = "config", env = "KAPSEL_ADAPTER_CONFIG", value_name = "FILE")]
    pub config: Option<String>,
    /// New series past this many are dropped and counted.
    #[arg(long = "max-series", env = "KAPSEL_ADAPTER_MAX_SERIES", default_value = "200000",
          value_parser = clap::value_parser!(u64).range(1..), value_name = "N")]
    pub max_series: u64,
    /// StatsD series not updated for this long disappear (0 keeps them); a mapping file's
    /// `ttl` wins.
    #[arg(long = "statsd.ttl", env = "KAPSEL_ADAPTER_STATSD_TTL", default_value = "5m",
          value_parser = flags::duration, value_name = "DURATION")]
    pub statsd_ttl_flag: Duration,
    /// How often the two files are checked for changes.
    #[arg(long = "reload-interval", env = "KAPSEL_ADAPTER_RELOAD_INTERVAL", default_value = "1s",
          value_parser = reload_interval, value_name = "DURATION")]
    pub reload_interval: Duration,
}

/// An optional listen address: empty means off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaybeAddr(pub Option<SocketAddr>);

fn udp_addr(s: &str) -> Result<MaybeAddr, String> {
    if s.trim().is_empty() {
        return Ok(MaybeAddr(None));
    }
    flags::listen_addr(s).map(|a| MaybeAddr(Some(a)))
}

fn telemetry_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("must start with /, got {s:?}"));
    }
    Ok(s.to_string())
}

fn reload_interval(s: &str) -> Result<Duration, String> {
    let d = flags::duration(s)?;
    if d < Duration::from_millis(10) {
        return Err(format!("{s} is too short (at least 10ms)"));
    }
    Ok(d)
}

impl Config {
    /// Parse the container's `args` and `env`. Go-style single-dash long flags
    /// (`-statsd.listen-udp=:9125`) are accepted too. `--help` is [`flags::FlagError::Help`].
    pub fn parse(args: &[String], env: &[(String, String)]) -> Result<Config, flags::FlagError> {
        let args: Vec<String> = args
            .iter()
            .map(|a| match a.strip_prefix('-') {
                Some(rest) if rest.len() > 1 && !rest.starts_with('-') => format!("--{rest}"),
                _ => a.clone(),
            })
            .collect();
        let mut c: Config = flags::parse("metrics-adapter", &args, env)?;
        c.mapping_config = c.mapping_config.filter(|s| !s.is_empty());
        c.config = c.config.filter(|s| !s.is_empty());
        Ok(c)
    }

    /// The StatsD UDP address, if StatsD is on.
    pub fn statsd_udp(&self) -> Option<SocketAddr> {
        self.statsd_udp.0
    }

    /// `--statsd.ttl`, `None` for 0 (never expire).
    pub fn statsd_ttl(&self) -> Option<Duration> {
        (!self.statsd_ttl_flag.is_zero()).then_some(self.statsd_ttl_flag)
    }
}

/// Why the adapter could not load its configuration.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("--{flag} {path} is not inside the container's volume mounts")]
    NotMounted { flag: &'static str, path: String },
    #[error("--{flag} {path}")]
    Read {
        flag: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--statsd.mapping-config {path}")]
    Mapping {
        path: String,
        #[source]
        source: MappingError,
    },
    #[error("--config {path}")]
    Sources {
        path: String,
        #[source]
        source: SourcesError,
    },
    #[error("cannot build the HTTP client")]
    Http(#[source] reqwest::Error),
}

/// Why one pull of a source failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("request failed")]
    Request(#[source] reqwest::Error),
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("not JSON")]
    NotJson(#[source] reqwest::Error),
    #[error("{0} is not inside the container's volume mounts")]
    NotMounted(String),
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Every adapter running on this node, by `namespace/pod/container`: the latest values for
/// controllers (and `GET /api/v1/namespaces/{ns}/pods/{name}/metrics`).
pub fn node_registries() -> &'static Mutex<HashMap<String, Weak<Registry>>> {
    static M: LazyLock<Mutex<HashMap<String, Weak<Registry>>>> = LazyLock::new(Default::default);
    &M
}

/// Every adapter running on this node, by `namespace/pod/container`, for its status
/// ([`Adapter::status_lines`], [`pod_status`]).
pub fn node_adapters() -> &'static Mutex<HashMap<String, Weak<Adapter>>> {
    static M: LazyLock<Mutex<HashMap<String, Weak<Adapter>>>> = LazyLock::new(Default::default);
    &M
}

/// The status of one pod's running adapters, by container name: what `kapsel describe pod`
/// shows under a `builtin/metrics-adapter` container (see [`Adapter::status_lines`]).
pub fn pod_status(ns: &str, pod: &str) -> Vec<(String, Vec<(String, String)>)> {
    let prefix = format!("{ns}/{pod}/");
    let mut m = node_adapters().lock().unwrap();
    m.retain(|_, w| w.strong_count() > 0);
    let mut out: Vec<(String, Vec<(String, String)>)> = m
        .iter()
        .filter_map(|(k, w)| Some((k.strip_prefix(&prefix)?.to_string(), w.upgrade()?)))
        .map(|(c, a)| (c, a.status_lines()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
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
    /// Failing sources: name → what failed (URL or file) and its last error.
    failing: Mutex<BTreeMap<String, String>>,
    /// The last refused reload of each file (`mapping`, `sources`), until one succeeds.
    reload_errors: Mutex<BTreeMap<&'static str, String>>,
}

fn read(paths: &PathMap, flag: &'static str, p: &str) -> Result<String, AdapterError> {
    let host = paths(p).ok_or_else(|| AdapterError::NotMounted {
        flag,
        path: p.to_string(),
    })?;
    std::fs::read_to_string(&host).map_err(|source| AdapterError::Read {
        flag,
        path: p.to_string(),
        source,
    })
}

fn load_mapper(paths: &PathMap, p: &str) -> Result<Mapper, AdapterError> {
    Mapper::parse(&read(paths, "statsd.mapping-config", p)?).map_err(|source| {
        AdapterError::Mapping {
            path: p.to_string(),
            source,
        }
    })
}

fn load_sources(paths: &PathMap, p: &str) -> Result<sources::Compiled, AdapterError> {
    sources::compile(&read(paths, "config", p)?).map_err(|source| AdapterError::Sources {
        path: p.to_string(),
        source,
    })
}

fn mtime(p: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Adapter {
    /// Load the configuration files; a bad one fails the start with its error. The mapping
    /// file's warnings (options that cannot apply here) go to the log.
    pub fn new(cfg: Config, paths: PathMap, log: LogFn) -> Result<Self, AdapterError> {
        let mapper = match &cfg.mapping_config {
            Some(p) => load_mapper(&paths, p)?,
            None => Mapper::empty(),
        };
        for w in &mapper.warnings {
            log(&format!(
                "metrics-adapter: warning: --statsd.mapping-config: {w}\n"
            ));
        }
        let srcs = match &cfg.config {
            Some(p) => load_sources(&paths, p)?,
            None => sources::compile("{}").expect("empty config"),
        };
        Ok(Adapter {
            reg: Arc::new(Registry::new(cfg.max_series as usize, None, log.clone())),
            cfg,
            mapper: RwLock::new(Arc::new(mapper)),
            sources: RwLock::new(Arc::new(srcs)),
            paths,
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(AdapterError::Http)?,
            failing: Mutex::new(BTreeMap::new()),
            reload_errors: Mutex::new(BTreeMap::new()),
        })
    }

    /// The adapter's status for `kapsel describe pod`, as (field, value) lines: series held,
    /// StatsD lines and mapping rules, configuration reloads refused, and each failing
    /// source with its last error ("Failing source" lines, none when all are healthy).
    pub fn status_lines(&self) -> Vec<(String, String)> {
        let st = &self.reg.stats;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut out = vec![
            ("Series".to_string(), self.reg.series_count().to_string()),
            (
                "StatsD".to_string(),
                match self.cfg.statsd_udp() {
                    Some(a) => format!(
                        "udp {a}: {} lines, {} malformed, {} dropped by rules; {} mapping rules",
                        l(&st.statsd_lines),
                        l(&st.statsd_malformed),
                        l(&st.statsd_dropped_by_rule),
                        self.mapper.read().unwrap().rules
                    ),
                    None => "off".to_string(),
                },
            ),
        ];
        for (which, e) in self.reload_errors.lock().unwrap().iter() {
            out.push((
                "Config error".to_string(),
                format!("{which} (previous configuration in force): {e}"),
            ));
        }
        for (src, e) in self.failing.lock().unwrap().iter() {
            out.push(("Failing source".to_string(), format!("{src}: {e}")));
        }
        out
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
        let flag_ttl = self.cfg.statsd_ttl();
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
                    let set = &m.settings;
                    labels.clear();
                    if set.honor_labels {
                        // The sample's tags win; the rule's labels are defaults.
                        for (k, v) in &s.tags {
                            let k = statsd::escape_name(k);
                            if !labels.iter().any(|(lk, _)| *lk == k) {
                                labels.push((k, v.to_string()));
                            }
                        }
                        for (k, v) in &m.labels {
                            if !labels.iter().any(|(lk, _)| lk == k) {
                                labels.push((k.clone(), v.clone()));
                            }
                        }
                    } else {
                        labels.extend(m.labels.iter().cloned());
                        for (k, v) in &s.tags {
                            let k = statsd::escape_name(k);
                            if !labels.iter().any(|(lk, _)| *lk == k) {
                                labels.push((k, v.to_string()));
                            }
                        }
                    }
                    let (buckets, summary): (&[f64], _) = match &set.observer {
                        Observer::Histogram(b) => (b, None),
                        Observer::Summary(so) => (&[], Some(so)),
                    };
                    let o = Opts {
                        buckets,
                        summary,
                        ttl: match set.ttl {
                            Some(t) => t,
                            None => flag_ttl,
                        },
                        help: set.help.as_deref(),
                    };
                    let scale = set.scale.unwrap_or(1.0);
                    let (kind, op) = match s.kind {
                        statsd::Kind::Counter => {
                            (FamKind::Counter, Op::Add(s.value / s.rate * scale))
                        }
                        statsd::Kind::Gauge if s.relative => {
                            (FamKind::Gauge, Op::Add(s.value * scale))
                        }
                        statsd::Kind::Gauge => (FamKind::Gauge, Op::Set(s.value * scale)),
                        statsd::Kind::Timer => (
                            if summary.is_some() {
                                FamKind::Summary
                            } else {
                                FamKind::Histogram
                            },
                            Op::Observe(if s.millis { s.value / 1000.0 } else { s.value } * scale),
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
    fn reload(&self, which: &'static str) {
        let r = match which {
            "mapping" => self.cfg.mapping_config.as_ref().map(|p| {
                load_mapper(&self.paths, p).map(|m| {
                    for w in &m.warnings {
                        (self.log)(&format!(
                            "metrics-adapter: warning: --statsd.mapping-config: {w}\n"
                        ));
                    }
                    *self.mapper.write().unwrap() = Arc::new(m);
                })
            }),
            _ => self.cfg.config.as_ref().map(|p| {
                load_sources(&self.paths, p).map(|c| *self.sources.write().unwrap() = Arc::new(c))
            }),
        };
        match r {
            Some(Ok(())) => {
                self.reload_errors.lock().unwrap().remove(which);
                self.reg
                    .stats
                    .config_reloads_ok
                    .fetch_add(1, Ordering::Relaxed);
                (self.log)(&format!(
                    "metrics-adapter: reloaded the {which} configuration\n"
                ));
            }
            Some(Err(e)) => {
                let e = error_chain(&e);
                self.reg
                    .stats
                    .config_reloads_failed
                    .fetch_add(1, Ordering::Relaxed);
                (self.log)(&format!(
                    "metrics-adapter: keeping the previous {which} configuration: {e}\n"
                ));
                self.reload_errors.lock().unwrap().insert(which, e);
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
        let watched: Vec<(&'static str, Option<PathBuf>)> = [
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
                        let resp = me.http.get(&src.url).send().await.map_err(PullError::Request)?;
                        if !resp.status().is_success() {
                            return Err(PullError::Status(resp.status()));
                        }
                        let doc: serde_json::Value = resp.json().await.map_err(PullError::NotJson)?;
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
                        let resp = me.http.get(&src.url).send().await.map_err(PullError::Request)?;
                        if !resp.status().is_success() {
                            return Err(PullError::Status(resp.status()));
                        }
                        let t = resp.text().await.map_err(PullError::Request)?;
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
                        None => Err(PullError::NotMounted(src.file.clone())),
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
    fn report(&self, source: &str, what: &str, r: Result<usize, PullError>) {
        self.reg.scrape_result(source, r.is_ok());
        let mut failing = self.failing.lock().unwrap();
        match r {
            Ok(_) => {
                if failing.remove(source).is_some() {
                    (self.log)(&format!("metrics-adapter: {source} ({what}) recovered\n"));
                }
            }
            Err(e) => {
                let e = error_chain(&e);
                if failing
                    .insert(source.to_string(), format!("{what}: {e}"))
                    .is_none()
                {
                    (self.log)(&format!("metrics-adapter: {source} ({what}) failed: {e}\n"));
                }
            }
        }
    }
}

/// A whole file (snapshot) or what was appended since `offset` (tail; a shorter file restarts).
fn read_lines(p: &PathBuf, tail: bool, offset: &mut u64) -> Result<String, PullError> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |source| PullError::Io {
        path: p.display().to_string(),
        source,
    };
    let mut f = std::fs::File::open(p).map_err(io)?;
    if !tail {
        let mut s = String::new();
        f.take(16 << 20).read_to_string(&mut s).map_err(io)?;
        return Ok(s);
    }
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < *offset {
        *offset = 0; // truncated or rotated
    }
    f.seek(SeekFrom::Start(*offset)).map_err(io)?;
    let mut buf = Vec::new();
    f.take(16 << 20).read_to_end(&mut buf).map_err(io)?;
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
    let udp = match cfg.statsd_udp() {
        Some(a) => {
            let u = std::net::UdpSocket::bind(a)?;
            u.set_nonblocking(true)?;
            // A larger receive buffer rides out bursts (best effort; capped by net.core.rmem_max).
            let size: libc::c_int = 8 << 20;
            // SAFETY: setsockopt on a socket this function owns (`u` lives across the call),
            // with a pointer to a local c_int and its exact size; the kernel only reads it.
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
    let l = std::net::TcpListener::bind(cfg.web_listen)?;
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
                "-statsd.ttl=1m30s",
                "--max-series",
                "7",
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.statsd_udp().unwrap().to_string(), "0.0.0.0:9999");
        assert_eq!(c.web_listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.statsd_ttl(), Some(Duration::from_secs(90)));
        assert_eq!(c.max_series, 7);
        let c = Config::parse(
            &[],
            &[
                ("KAPSEL_ADAPTER_STATSD_LISTEN_UDP".into(), "".into()),
                ("KAPSEL_ADAPTER_STATSD_TTL".into(), "0".into()),
                (
                    "KAPSEL_ADAPTER_STATSD_MAPPING_CONFIG".into(),
                    "/m.yaml".into(),
                ),
            ],
        )
        .unwrap();
        assert!(c.statsd_udp().is_none());
        assert_eq!(c.statsd_ttl(), None);
        assert_eq!(c.mapping_config.as_deref(), Some("/m.yaml"));
        assert_eq!(c.web_listen.to_string(), "0.0.0.0:9102");
        assert_eq!(c.reload_interval, Duration::from_secs(1));
        let err = |a: &[&str]| Config::parse(&s(a), &[]).unwrap_err().to_string();
        assert!(err(&["--bogus=1"]).contains("--bogus"));
        assert!(err(&["--web.listen-address=x"]).contains("--web.listen-address"));
        assert!(err(&["--web.telemetry-path=metrics"]).contains("must start with /"));
        assert!(err(&["--max-series=0"]).contains("--max-series"));
        assert!(matches!(
            Config::parse(&s(&["--help"]), &[]),
            Err(flags::FlagError::Help(h)) if h.contains("--statsd.mapping-config") && h.contains("KAPSEL_ADAPTER_STATSD_TTL")
        ));
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
        let st = a.status_lines();
        assert_eq!(st[0], ("Series".to_string(), "4".to_string()), "{st:?}");
        assert!(st[1].1.contains("9 lines, 1 malformed"), "{st:?}");
    }
}
