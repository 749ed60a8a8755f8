//! Who the master is and which replicas may serve reads right now.
//!
//! [`Topology`] holds the current [`View`] (swapped whole, with a generation counter sessions
//! poll cheaply) and one [`Upstream`] per server address, which carries that server's counters
//! and its pool of idle connections. [`Topology::run`] keeps the view true: it asks Sentinel
//! for the master and replicas (and listens for `+switch-master`), and checks every replica with
//! `INFO replication`, skipping replicas that are down, resyncing, or lagging past
//! `--max-replica-lag`.
//!
//! Reads are spread by [`Topology::pick_replica`]: the healthy replica with the fewest reads in
//! flight, ties broken by a cursor all clients share, so one-command clients alternate too and a
//! slower replica, whose reads stay in flight longer, gets fewer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::config::{Config, Upstreams};
use super::conn::{Connector, UpStream};
use super::error::{chain, SentinelError, TopologyError, UpstreamError};
use super::metrics::UpStats;
use super::mux::{MuxCtx, MuxReq};
use super::resp::{self, Value};

/// One upstream server (by address).
pub struct Upstream {
    pub addr: String,
    pub stats: UpStats,
    /// Reads sent to this server and not yet answered (commands), for least-outstanding
    /// replica choice.
    pub outstanding: AtomicU64,
    /// Idle connections with no session state, ready for the next client.
    idle: Mutex<Vec<UpStream>>,
    /// After a failed connect, further connects fail fast until this instant (ms since start).
    down_until_ms: AtomicU64,
    /// The last connect error, for the fast failures and for status.
    last_error: Mutex<Option<UpstreamError>>,
    connector: Connector,
    /// The multiplexed connection's request queue (started on first use).
    mux: Mutex<Option<mpsc::UnboundedSender<MuxReq>>>,
}

const POOL_CAP: usize = 64;

impl Upstream {
    fn new(addr: String, connector: Connector) -> Self {
        Upstream {
            addr,
            stats: UpStats::default(),
            outstanding: AtomicU64::new(0),
            idle: Mutex::new(Vec::new()),
            down_until_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
            connector,
            mux: Mutex::new(None),
        }
    }

    /// Queue stateless commands on this server's shared connection.
    pub fn submit(self: &Arc<Self>, mut req: MuxReq, ctx: &MuxCtx) {
        let mut g = self.mux.lock().unwrap();
        for _ in 0..2 {
            let tx = g.get_or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(super::mux::run(self.clone(), rx, ctx.clone()));
                tx
            });
            match tx.send(req) {
                Ok(()) => return,
                Err(mpsc::error::SendError(r)) => {
                    // The multiplexer stopped (shutdown): start a new one once.
                    req = r;
                    *g = None;
                }
            }
        }
        let _ = req.reply.send(Err(UpstreamError::ShuttingDown));
    }

    /// Take an idle pooled connection that is still open.
    pub fn take_idle(&self) -> Option<UpStream> {
        let mut idle = self.idle.lock().unwrap();
        while let Some(s) = idle.pop() {
            // Open and quiet: reused. Closed, or unexpected bytes: dropped.
            if s.is_idle_open() {
                self.stats.pool_reused.fetch_add(1, Ordering::Relaxed);
                return Some(s);
            }
        }
        None
    }

    /// Give back a connection that carries no session state and owes no replies.
    pub fn put_idle(&self, s: UpStream) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < POOL_CAP {
            idle.push(s);
        }
    }

    /// The address for messages (`(unknown)` before Sentinel has named a master).
    pub fn shown(&self) -> &str {
        if self.addr.starts_with("sentinel-unresolved/") {
            "(unknown)"
        } else {
            &self.addr
        }
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().len()
    }

    /// The last connect error, if the last connect failed.
    pub fn last_error(&self) -> Option<UpstreamError> {
        self.last_error.lock().unwrap().clone()
    }

    /// Connect (or fail fast while the server is known to be down).
    pub async fn connect(
        &self,
        timeout: Duration,
        epoch: Instant,
    ) -> Result<UpStream, UpstreamError> {
        if self.addr.starts_with("sentinel-unresolved/") {
            return Err(UpstreamError::Unresolved);
        }
        let now_ms = epoch.elapsed().as_millis() as u64;
        if now_ms < self.down_until_ms.load(Ordering::Relaxed) {
            if let Some(e) = self.last_error() {
                return Err(e);
            }
        }
        let e = match self.connector.connect(&self.addr, timeout).await {
            Ok(s) => {
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock().unwrap() = None;
                return Ok(s);
            }
            Err(e) => e,
        };
        if e.is_tls() {
            self.stats.tls_errors.fetch_add(1, Ordering::Relaxed);
        }
        *self.last_error.lock().unwrap() = Some(e.clone());
        self.down_until_ms
            .store(epoch.elapsed().as_millis() as u64 + 500, Ordering::Relaxed);
        Err(e)
    }
}

/// Reads in flight on one upstream, counted in [`Upstream::outstanding`] until dropped.
pub struct InFlight {
    up: Arc<Upstream>,
    n: u64,
}

impl InFlight {
    pub fn new(up: &Arc<Upstream>, n: u64) -> Self {
        up.outstanding.fetch_add(n, Ordering::Relaxed);
        InFlight { up: up.clone(), n }
    }

    /// Count one more read in the same run.
    pub fn add(&mut self, n: u64) {
        self.up.outstanding.fetch_add(n, Ordering::Relaxed);
        self.n += n;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.up.outstanding.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// The routing view at one moment.
pub struct View {
    pub generation: u64,
    pub master: Arc<Upstream>,
    /// Healthy replicas only.
    pub replicas: Vec<Arc<Upstream>>,
}

/// Health of one replica, for metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaHealth {
    pub addr: String,
    pub healthy: bool,
    pub why: String,
}

pub struct Topology {
    pub cfg: Arc<Config>,
    pub epoch: Instant,
    view: RwLock<Arc<View>>,
    generation: AtomicU64,
    registry: Mutex<HashMap<String, Arc<Upstream>>>,
    pub health: Mutex<Vec<ReplicaHealth>>,
    pub failovers: AtomicU64,
    /// Wakes [`Topology::run`] for an early refresh (a `+switch-master`, a `READONLY` reply).
    pub refresh: Arc<Notify>,
    log: Arc<dyn Fn(&str) + Send + Sync>,
    /// Shared tie-breaker of [`Topology::pick_replica`].
    cursor: AtomicUsize,
    servers: Connector,
    sentinels: Connector,
    /// The master's last health-check error, logged when it changes.
    master_error: Mutex<Option<String>>,
    /// Lag (seconds) the master reports per replica address, from the last check.
    lags: Mutex<HashMap<String, f64>>,
}

/// Status of a running ambassador, for `kapsel describe pod` (see
/// [`super::Ambassador::status_lines`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub master: String,
    /// The master's last error, if it failed its last check.
    pub master_error: Option<String>,
    /// Every candidate replica: address, serving reads, lag in seconds if known, why not.
    pub replicas: Vec<(String, bool, Option<f64>, String)>,
    pub failovers: u64,
}

impl Topology {
    pub fn new(
        cfg: Arc<Config>,
        log: Arc<dyn Fn(&str) + Send + Sync>,
        servers: Connector,
        sentinels: Connector,
    ) -> Arc<Self> {
        let registry = Mutex::new(HashMap::new());
        let (master, replicas) = match &cfg.upstreams {
            // Until the first health check, replicas are trusted as configured.
            Upstreams::Static { master, replicas } => (master.clone(), replicas.clone()),
            // Until Sentinel answers, there is no master: connects fail with a clear error.
            Upstreams::Sentinel { master_name, .. } => {
                (format!("sentinel-unresolved/{master_name}:0"), vec![])
            }
        };
        let t = Topology {
            cfg,
            epoch: Instant::now(),
            view: RwLock::new(Arc::new(View {
                generation: 0,
                master: Arc::new(Upstream::new(String::new(), Connector::plain())),
                replicas: vec![],
            })),
            generation: AtomicU64::new(0),
            registry,
            health: Mutex::new(Vec::new()),
            failovers: AtomicU64::new(0),
            refresh: Arc::new(Notify::new()),
            log,
            cursor: AtomicUsize::new(0),
            servers,
            sentinels,
            master_error: Mutex::new(None),
            lags: Mutex::new(HashMap::new()),
        };
        let m = t.upstream(&master);
        let r = replicas.iter().map(|a| t.upstream(a)).collect();
        t.install(m, r);
        Arc::new(t)
    }

    /// The shared [`Upstream`] for an address.
    pub fn upstream(&self, addr: &str) -> Arc<Upstream> {
        self.registry
            .lock()
            .unwrap()
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(Upstream::new(addr.to_string(), self.servers.clone())))
            .clone()
    }

    /// The replica of `view` for the next read: the fewest reads in flight, ties broken by a
    /// cursor shared by all clients (so one-command clients alternate too).
    pub fn pick_replica(&self, view: &View) -> Option<Arc<Upstream>> {
        let n = view.replicas.len();
        match n {
            0 => None,
            1 => Some(view.replicas[0].clone()),
            _ => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                let mut best = start % n;
                let mut best_load = u64::MAX;
                for k in 0..n {
                    let i = (start + k) % n;
                    let load = view.replicas[i].outstanding.load(Ordering::Relaxed);
                    if load < best_load {
                        best = i;
                        best_load = load;
                        if load == 0 {
                            break;
                        }
                    }
                }
                Some(view.replicas[best].clone())
            }
        }
    }

    /// What the ambassador routes to now.
    pub fn status(&self) -> Status {
        let view = self.view();
        let lags = self.lags.lock().unwrap().clone();
        let mut health = self.health.lock().unwrap().clone();
        if health.is_empty() {
            // Before the first check: the configured replicas, trusted.
            health = view
                .replicas
                .iter()
                .map(|r| ReplicaHealth {
                    addr: r.addr.clone(),
                    healthy: true,
                    why: String::new(),
                })
                .collect();
        }
        let replicas = health
            .iter()
            .map(|h| {
                (
                    h.addr.clone(),
                    h.healthy,
                    lags.get(&h.addr).copied(),
                    h.why.clone(),
                )
            })
            .collect();
        Status {
            master: view.master.shown().to_string(),
            master_error: self.master_error.lock().unwrap().clone(),
            replicas,
            failovers: self.failovers.load(Ordering::Relaxed),
        }
    }

    pub fn all_upstreams(&self) -> Vec<Arc<Upstream>> {
        let mut v: Vec<_> = self.registry.lock().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.addr.cmp(&b.addr));
        v
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap().clone()
    }

    fn install(&self, master: Arc<Upstream>, replicas: Vec<Arc<Upstream>>) -> bool {
        let mut v = self.view.write().unwrap();
        let same = Arc::ptr_eq(&v.master, &master)
            && v.replicas.len() == replicas.len()
            && v.replicas
                .iter()
                .zip(&replicas)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return false;
        }
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        *v = Arc::new(View {
            generation,
            master,
            replicas,
        });
        self.generation.store(generation, Ordering::Release);
        true
    }

    /// Upstream credentials, as the commands that present them.
    pub fn auth_prelude(&self) -> Result<Option<Vec<u8>>, super::error::AmbassadorError> {
        let pass = match (&self.cfg.password, &self.cfg.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .map_err(|source| super::error::AmbassadorError::PasswordFile {
                        path: f.into(),
                        source,
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            (None, None) => None,
        };
        Ok(pass.map(|p| {
            let mut out = Vec::new();
            match &self.cfg.username {
                Some(u) => resp::encode_command(&mut out, &["AUTH", u, &p]),
                None => resp::encode_command(&mut out, &["AUTH", &p]),
            }
            out
        }))
    }

    /// Keep the view true until cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        if let Upstreams::Sentinel {
            sentinels,
            master_name,
        } = &self.cfg.upstreams
        {
            for s in sentinels.clone() {
                let me = self.clone();
                let name = master_name.clone();
                let stop = stop.clone();
                tokio::spawn(async move { me.listen_sentinel(s, name, stop).await });
            }
        }
        loop {
            self.refresh_once().await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.health_interval) => {}
                _ = self.refresh.notified() => {}
            }
        }
    }

    /// One round: resolve the master and candidate replicas, check each replica, install.
    pub async fn refresh_once(&self) {
        let (master, candidates) = match &self.cfg.upstreams {
            Upstreams::Static { master, replicas } => (master.clone(), replicas.clone()),
            Upstreams::Sentinel {
                sentinels,
                master_name,
            } => match self.ask_sentinels(sentinels, master_name).await {
                Ok(x) => x,
                Err(e) => {
                    (self.log)(&format!("redis-ambassador: Sentinel: {}\n", chain(&e)));
                    return;
                }
            },
        };
        let master_info = match self.query(&master, &[&["INFO", "replication"]]).await {
            Ok(v) => {
                if self.master_error.lock().unwrap().take().is_some() {
                    (self.log)(&format!(
                        "redis-ambassador: master {master} answers again\n"
                    ));
                }
                Some(v)
            }
            Err(e) => {
                let line = e.line();
                let mut last = self.master_error.lock().unwrap();
                if last.as_deref() != Some(line.as_str()) {
                    (self.log)(&format!("redis-ambassador: master {master}: {line}\n"));
                }
                *last = Some(line);
                None
            }
        };
        let master_info = master_info
            .as_ref()
            .and_then(|v| v.first())
            .and_then(|v| v.as_text())
            .map(|t| parse_info(&t))
            .unwrap_or_default();
        let checks = candidates
            .iter()
            .map(|r| self.check_replica(r, &master_info));
        let results = futures::future::join_all(checks).await;
        let mut healthy = Vec::new();
        let mut health = Vec::new();
        for (addr, why) in candidates.iter().zip(results) {
            let ok = why.is_none();
            if ok {
                healthy.push(self.upstream(addr));
            }
            health.push(ReplicaHealth {
                addr: addr.clone(),
                healthy: ok,
                why: why.unwrap_or_default(),
            });
        }
        {
            let mut old = self.health.lock().unwrap();
            for h in &health {
                let before = old.iter().find(|o| o.addr == h.addr);
                if before.map(|b| b.healthy) != Some(h.healthy) {
                    if h.healthy {
                        (self.log)(&format!(
                            "redis-ambassador: replica {} serves reads\n",
                            h.addr
                        ));
                    } else {
                        (self.log)(&format!(
                            "redis-ambassador: replica {} skipped: {}\n",
                            h.addr, h.why
                        ));
                    }
                }
            }
            *old = health;
        }
        let before = self.view().master.addr.clone();
        let m = self.upstream(&master);
        if self.install(m, healthy) && before != master {
            if !before.is_empty() && !before.starts_with("sentinel-unresolved") {
                self.failovers.fetch_add(1, Ordering::Relaxed);
            }
            (self.log)(&format!(
                "redis-ambassador: master is {master}{}\n",
                if before.is_empty() || before.starts_with("sentinel-unresolved") {
                    String::new()
                } else {
                    format!(" (was {before})")
                }
            ));
        }
    }

    /// `None` if healthy, else why not.
    async fn check_replica(
        &self,
        addr: &str,
        master_info: &HashMap<String, String>,
    ) -> Option<String> {
        let info = match self.query(addr, &[&["INFO", "replication"]]).await {
            Ok(v) => match v.first() {
                Some(Value::Error(e)) => return Some(format!("INFO replication: {e}")),
                Some(v) => parse_info(&v.as_text().unwrap_or_default()),
                None => return Some("no answer".into()),
            },
            Err(e) => return Some(e.line()),
        };
        let get = |k: &str| info.get(k).map(String::as_str).unwrap_or("");
        if get("role") != "slave" {
            return Some(format!("role is {:?}, not a replica", get("role")));
        }
        if get("master_link_status") != "up" {
            return Some(format!("master_link_status:{}", get("master_link_status")));
        }
        if get("master_sync_in_progress") == "1" {
            return Some("full resync in progress".into());
        }
        let max = self.cfg.max_replica_lag.as_secs_f64();
        if let Ok(io) = get("master_last_io_seconds_ago").parse::<f64>() {
            if io > max {
                return Some(format!(
                    "lagging: master_last_io_seconds_ago:{io} > --max-replica-lag {max}s"
                ));
            }
        }
        // The master's own view: slaveN:ip=..,port=..,state=online,offset=..,lag=N
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
        for (k, v) in master_info {
            if !k.starts_with("slave") || !k[5..].chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            let f: HashMap<&str, &str> = v.split(',').filter_map(|p| p.split_once('=')).collect();
            let same_host = f.get("ip") == Some(&host)
                || (host == "localhost" && f.get("ip") == Some(&"127.0.0.1"));
            if f.get("port") == Some(&port) && same_host {
                if let Some(lag) = f.get("lag").and_then(|l| l.parse::<f64>().ok()) {
                    self.lags.lock().unwrap().insert(addr.to_string(), lag);
                    if lag > max {
                        return Some(format!(
                            "lagging: the master reports lag={lag}s > --max-replica-lag {max}s"
                        ));
                    }
                }
            }
        }
        None
    }

    async fn ask_sentinels(
        &self,
        sentinels: &[String],
        name: &str,
    ) -> Result<(String, Vec<String>), TopologyError> {
        let mut errors = Vec::new();
        for s in sentinels {
            let r = self
                .query_plain(
                    s,
                    &[
                        &["SENTINEL", "get-master-addr-by-name", name],
                        &["SENTINEL", "replicas", name],
                    ],
                )
                .await;
            let v = match r {
                Ok(v) => v,
                Err(source) => {
                    errors.push(SentinelError::Query {
                        addr: s.clone(),
                        source,
                    });
                    continue;
                }
            };
            let master = match &v[0] {
                Value::Array(a) if a.len() == 2 => format!(
                    "{}:{}",
                    a[0].as_text().unwrap_or_default(),
                    a[1].as_text().unwrap_or_default()
                ),
                Value::Error(e) => {
                    errors.push(SentinelError::Refused {
                        addr: s.clone(),
                        message: e.clone(),
                    });
                    continue;
                }
                _ => {
                    errors.push(SentinelError::UnknownMaster {
                        addr: s.clone(),
                        name: name.to_string(),
                    });
                    continue;
                }
            };
            let mut replicas = Vec::new();
            if let Value::Array(list) = &v[1] {
                for r in list {
                    let Value::Array(kv) = r else { continue };
                    let mut m = HashMap::new();
                    for pair in kv.chunks(2) {
                        if let [k, v] = pair {
                            m.insert(
                                k.as_text().unwrap_or_default(),
                                v.as_text().unwrap_or_default(),
                            );
                        }
                    }
                    let flags = m.get("flags").cloned().unwrap_or_default();
                    if flags
                        .split(',')
                        .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
                    {
                        continue;
                    }
                    if let (Some(ip), Some(port)) = (m.get("ip"), m.get("port")) {
                        replicas.push(format!("{ip}:{port}"));
                    }
                }
            }
            replicas.sort();
            return Ok((master, replicas));
        }
        Err(TopologyError::NoSentinel(errors))
    }

    /// Subscribe to `+switch-master` on one Sentinel; any message triggers a refresh.
    async fn listen_sentinel(self: Arc<Self>, addr: String, name: String, stop: CancellationToken) {
        loop {
            let r = async {
                let mut s = self
                    .sentinels
                    .connect(&addr, self.cfg.connect_timeout)
                    .await?;
                let mut out = Vec::new();
                resp::encode_command(&mut out, &["SUBSCRIBE", "+switch-master"]);
                s.write_all(&out).await.map_err(UpstreamError::lost)?;
                let mut buf = bytes::BytesMut::with_capacity(4096);
                let mut first = true;
                loop {
                    while let Some((v, n)) =
                        resp::parse_value(&buf).map_err(UpstreamError::Malformed)?
                    {
                        bytes::Buf::advance(&mut buf, n);
                        if !first {
                            if let Value::Array(a) = &v {
                                let text = a.get(2).and_then(|m| m.as_text()).unwrap_or_default();
                                if text.split(' ').next() == Some(name.as_str()) {
                                    self.refresh.notify_one();
                                }
                            }
                        }
                        first = false;
                    }
                    if s.read_buf(&mut buf).await.map_err(UpstreamError::lost)? == 0 {
                        return Err::<(), UpstreamError>(UpstreamError::Closed);
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = r => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Run commands on a fresh connection to `addr`, with the upstream credentials.
    pub async fn query(&self, addr: &str, cmds: &[&[&str]]) -> Result<Vec<Value>, UpstreamError> {
        // The password file was read (and checked) when the ambassador started.
        let auth = self.auth_prelude().ok().flatten();
        let r = self
            .query_raw(&self.servers, addr, auth.as_deref(), cmds)
            .await
            .inspect_err(|e| {
                if e.is_tls() {
                    self.upstream(addr)
                        .stats
                        .tls_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            })?;
        if auth.is_some() {
            if let Some(Value::Error(e)) = r.first() {
                return Err(UpstreamError::AuthRefused(e.clone()));
            }
            return Ok(r[1..].to_vec());
        }
        Ok(r)
    }

    /// The same, without credentials (Sentinel).
    async fn query_plain(&self, addr: &str, cmds: &[&[&str]]) -> Result<Vec<Value>, UpstreamError> {
        self.query_raw(&self.sentinels, addr, None, cmds).await
    }

    async fn query_raw(
        &self,
        connector: &Connector,
        addr: &str,
        prelude: Option<&[u8]>,
        cmds: &[&[&str]],
    ) -> Result<Vec<Value>, UpstreamError> {
        let t = self.cfg.connect_timeout;
        let work = async {
            let mut s = connector.connect(addr, t).await?;
            let mut out = prelude.map(|p| p.to_vec()).unwrap_or_default();
            for c in cmds {
                resp::encode_command(&mut out, c);
            }
            s.write_all(&out).await.map_err(UpstreamError::lost)?;
            let want = cmds.len() + usize::from(prelude.is_some());
            let mut buf = bytes::BytesMut::with_capacity(8192);
            let mut vals = Vec::new();
            while vals.len() < want {
                match resp::parse_value(&buf).map_err(UpstreamError::Malformed)? {
                    Some((v, n)) => {
                        bytes::Buf::advance(&mut buf, n);
                        vals.push(v);
                    }
                    None => {
                        if s.read_buf(&mut buf).await.map_err(UpstreamError::lost)? == 0 {
                            return Err(UpstreamError::Closed);
                        }
                    }
                }
            }
            Ok(vals)
        };
        tokio::time::timeout(t * 2, work)
            .await
            .map_err(|_| UpstreamError::Timeout(t * 2))?
    }
}

/// `INFO` text → key/value pairs.
pub fn parse_info(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_parsing() {
        let i = parse_info("# Replication\r\nrole:slave\r\nmaster_link_status:up\r\nslave0:ip=127.0.0.1,port=1,lag=0\r\n");
        assert_eq!(i["role"], "slave");
        assert_eq!(i["slave0"], "ip=127.0.0.1,port=1,lag=0");
    }
}
