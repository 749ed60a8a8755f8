//! Container probes (liveness, readiness, startup) with Kubernetes semantics. This module owns
//! what a probe checks (`tcpSocket`, `httpGet`, `exec`), where it checks from (the pod's network
//! namespace), when (initial delay, period, timeout) and when a result counts (success and
//! failure thresholds). The pod worker (`worker.rs`) owns what a result does: readiness sets
//! `ready`, a failed liveness or startup probe kills the container and restarts it by policy.
//!
//! - **Schedule.** The first check runs as soon as `initialDelaySeconds` (counted from the
//!   container's start) have passed, then one every `periodSeconds`, each bounded by
//!   `timeoutSeconds`. Defaults as in Kubernetes: period 10 s, timeout 1 s, success threshold 1,
//!   failure threshold 3, no initial delay.
//! - **Results.** A probe's result is unknown until `successThreshold` consecutive successes or
//!   `failureThreshold` consecutive failures; only changes are reported, so a probe that keeps
//!   failing is reported (and recorded as an event) once.
//! - **Order.** With a startup probe, liveness and readiness wait until it has succeeded.
//! - **Network.** `tcpSocket` and `httpGet` connect from the pod sandbox's runtime, whose thread
//!   entered the pod's network namespace, so `127.0.0.1` (the default host) is the pod's own
//!   localhost. Pods without a namespace (WASI preview-1 modules only) share the node's network.
//! - **exec** runs the command in the OCI container through the Docker Engine (`docker exec`);
//!   success iff it exits 0. Validation rejects exec probes on WASM and built-in containers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::docker::DockerExecutor;
use crate::model::pod::{Container, Probe};

/// Which probe: what its failure means, and how events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

impl ProbeKind {
    /// `Liveness`, as in the event message "Liveness probe failed: …".
    pub fn label(self) -> &'static str {
        match self {
            ProbeKind::Startup => "Startup",
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Readiness => "Readiness",
        }
    }
}

/// When a probe runs and when its results count (Kubernetes defaults, minimum 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(p: &Probe) -> Timing {
        let at_least = |v: Option<i64>, default: i64, min: i64| v.unwrap_or(default).max(min);
        Timing {
            initial_delay: Duration::from_secs(at_least(p.initial_delay_seconds, 0, 0) as u64),
            period: Duration::from_secs(at_least(p.period_seconds, 10, 1) as u64),
            timeout: Duration::from_secs(at_least(p.timeout_seconds, 1, 1) as u64),
            success_threshold: at_least(p.success_threshold, 1, 1).min(u32::MAX as i64) as u32,
            failure_threshold: at_least(p.failure_threshold, 3, 1).min(u32::MAX as i64) as u32,
        }
    }
}

/// What a probe checks, resolved against its container (named ports looked up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Tcp {
        host: String,
        port: u16,
    },
    Http {
        host: String,
        port: u16,
        path: String,
    },
    Exec {
        argv: Vec<String>,
    },
}

/// A probe's `port`: a number, or the name of one of the container's `ports`.
pub fn resolve_port(port: &serde_json::Value, c: &Container) -> Result<u16, String> {
    match port {
        serde_json::Value::Number(n) => n
            .as_i64()
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .ok_or_else(|| format!("port {n} is not between 1 and 65535")),
        serde_json::Value::String(name) => c
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("no port named {name:?} in the container's ports")),
        other => Err(format!("port {other} is neither a number nor a port name")),
    }
}

impl Action {
    pub fn of(p: &Probe, c: &Container) -> Result<Action, String> {
        let host = |h: &Option<String>| {
            h.clone()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "127.0.0.1".into())
        };
        if let Some(t) = &p.tcp_socket {
            return Ok(Action::Tcp {
                host: host(&t.host),
                port: resolve_port(&t.port, c)?,
            });
        }
        if let Some(h) = &p.http_get {
            let path = h.path.clone().filter(|p| !p.is_empty()).unwrap_or_default();
            return Ok(Action::Http {
                host: host(&h.host),
                port: resolve_port(&h.port, c)?,
                path: if path.starts_with('/') {
                    path
                } else {
                    format!("/{path}")
                },
            });
        }
        if let Some(e) = &p.exec {
            return Ok(Action::Exec {
                argv: e.command.clone(),
            });
        }
        Err("the probe has no handler".into())
    }
}

/// Where checks run: the pod's network, the container (for exec).
#[derive(Clone, Default)]
pub struct Target {
    /// The runtime whose thread lives in the pod's network namespace (None: the node's network).
    pub net: Option<Handle>,
    pub docker: Option<Arc<DockerExecutor>>,
    /// `docker://<id>` or a bare id, for exec.
    pub container_id: Option<String>,
}

/// Aborts a task spawned on the sandbox runtime when the check awaiting it is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Target {
    /// Run one check within `timeout`: Ok, or why it failed.
    pub async fn check(&self, action: &Action, timeout: Duration) -> Result<(), String> {
        match action {
            Action::Tcp { host, port } => {
                let (host, port) = (host.clone(), *port);
                self.in_pod_net(timeout, async move {
                    tokio::net::TcpStream::connect((host.as_str(), port))
                        .await
                        .map(drop)
                        .map_err(|e| format!("dial tcp {host}:{port}: {e}"))
                })
                .await
            }
            Action::Http { host, port, path } => {
                let (host, port, path) = (host.clone(), *port, path.clone());
                self.in_pod_net(timeout, http_get(host, port, path)).await
            }
            Action::Exec { argv } => {
                let (Some(d), Some(id)) = (&self.docker, &self.container_id) else {
                    return Err("exec probes run only in OCI containers".into());
                };
                let out = d.exec(id, argv, timeout).await.map_err(|e| e.to_string())?;
                if out.exit_code == 0 {
                    Ok(())
                } else {
                    let said = out.output.trim();
                    Err(format!(
                        "command {argv:?} exited with {}{}{said}",
                        out.exit_code,
                        if said.is_empty() { "" } else { ": " }
                    ))
                }
            }
        }
    }

    /// Run a network check inside the pod's namespace (or on the node's network), bounded by
    /// `timeout`.
    async fn in_pod_net<F>(&self, timeout: Duration, f: F) -> Result<(), String>
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let bounded = async move {
            tokio::time::timeout(timeout, f)
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {}s", timeout.as_secs())))
        };
        match &self.net {
            Some(rt) => {
                let mut task = AbortOnDrop(rt.spawn(bounded));
                (&mut task.0)
                    .await
                    .unwrap_or_else(|e| Err(format!("probe task ended: {e}")))
            }
            None => bounded.await,
        }
    }
}

/// `GET path` over HTTP/1.1: success iff the status is 200..=399 (redirects are not followed).
async fn http_get(host: String, port: u16, path: String) -> Result<(), String> {
    let url = format!("http://{host}:{port}{path}");
    let mut s = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("Get {url:?}: dial tcp {host}:{port}: {e}"))?;
    let host_header = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: kube-probe/kapsel\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("Get {url:?}: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let line = loop {
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            break String::from_utf8_lossy(&buf[..end]).trim_end().to_string();
        }
        if buf.len() > 8192 {
            return Err(format!("Get {url:?}: malformed HTTP response"));
        }
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("Get {url:?}: {e}"))?;
        if n == 0 {
            if buf.is_empty() {
                return Err(format!("Get {url:?}: EOF"));
            }
            break String::from_utf8_lossy(&buf).trim_end().to_string();
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut parts = line.splitn(3, ' ');
    let (proto, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let code: u16 = match (proto.starts_with("HTTP/"), code.parse()) {
        (true, Ok(c)) => c,
        _ => return Err(format!("Get {url:?}: malformed HTTP status line {line:?}")),
    };
    if (200..=399).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

/// Counts consecutive results and says when the probe's result changes: after
/// `success_threshold` successes in a row, or `failure_threshold` failures in a row. The result
/// starts unknown.
#[derive(Debug, Clone)]
pub struct Tracker {
    success_threshold: u32,
    failure_threshold: u32,
    last: Option<bool>,
    run: u32,
    state: Option<bool>,
}

impl Tracker {
    pub fn new(t: &Timing) -> Self {
        Tracker {
            success_threshold: t.success_threshold.max(1),
            failure_threshold: t.failure_threshold.max(1),
            last: None,
            run: 0,
            state: None,
        }
    }

    /// Record one check; `Some(new result)` when the result changes.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if self.last == Some(ok) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(ok);
            self.run = 1;
        }
        let threshold = if ok {
            self.success_threshold
        } else {
            self.failure_threshold
        };
        if self.run >= threshold && self.state != Some(ok) {
            self.state = Some(ok);
            return Some(ok);
        }
        None
    }

    /// The current result (None: not yet known).
    pub fn state(&self) -> Option<bool> {
        self.state
    }
}

/// Run `check` on `timing`'s schedule from `start` and call `changed(result, why)` on every
/// change of result; `why` is the failure's reason (empty on success). While the result stays
/// a failure, a failure for a different reason is reported again (once), so the latest cause
/// is visible. Returns when `changed` says to stop (returns false); otherwise runs until
/// dropped.
pub async fn schedule<C, Fut, F>(timing: Timing, start: Instant, mut check: C, mut changed: F)
where
    C: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
    F: FnMut(bool, String) -> bool,
{
    let mut tracker = Tracker::new(&timing);
    let mut reported: Option<String> = None;
    tokio::time::sleep_until(start + timing.initial_delay).await;
    loop {
        let began = Instant::now();
        let r = check().await;
        let ok = r.is_ok();
        let why = r.err().unwrap_or_default();
        let report = match tracker.observe(ok) {
            Some(_) => true,
            None => !ok && tracker.state() == Some(false) && reported.as_deref() != Some(&why),
        };
        if report {
            reported = (!ok).then(|| why.clone());
            if !changed(ok, why) {
                return;
            }
        }
        tokio::time::sleep_until(began + timing.period).await;
    }
}

/// What a container's probes tell its runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEvent {
    /// The startup probe succeeded: the container counts as started.
    Started,
    /// The readiness probe's result changed (the reason, when not ready).
    Ready(bool, String),
    /// A liveness or startup probe failed `failureThreshold` times: kill the container.
    Failed(ProbeKind, String),
}

/// A container's probes, ready to run against one instance.
pub struct Probes {
    startup: Option<(Timing, Result<Action, String>)>,
    liveness: Option<(Timing, Result<Action, String>)>,
    readiness: Option<(Timing, Result<Action, String>)>,
}

impl Probes {
    pub fn of(c: &Container) -> Probes {
        let one = |p: &Option<Probe>| p.as_ref().map(|p| (Timing::of(p), Action::of(p, c)));
        Probes {
            startup: one(&c.startup_probe),
            liveness: one(&c.liveness_probe),
            readiness: one(&c.readiness_probe),
        }
    }

    /// No probes at all.
    pub fn none() -> Probes {
        Probes {
            startup: None,
            liveness: None,
            readiness: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.startup.is_none() && self.liveness.is_none() && self.readiness.is_none()
    }

    pub fn has_startup(&self) -> bool {
        self.startup.is_some()
    }

    pub fn has_readiness(&self) -> bool {
        self.readiness.is_some()
    }

    /// Probe one instance started at `start`, sending changes to `tx`. The startup probe runs
    /// first; liveness and readiness run together once it has succeeded. Returns after a
    /// liveness or startup failure; otherwise runs until dropped (the runner drops it when the
    /// instance ends).
    pub async fn run(self, target: Target, start: Instant, tx: mpsc::UnboundedSender<ProbeEvent>) {
        let Probes {
            startup,
            liveness,
            readiness,
        } = self;
        let target = Arc::new(target);
        let runner = |action: Result<Action, String>, timeout: Duration| {
            let target = target.clone();
            let action = Arc::new(action);
            move || {
                let target = target.clone();
                let action = action.clone();
                async move {
                    match action.as_ref() {
                        Ok(a) => target.check(a, timeout).await,
                        Err(e) => Err(e.clone()),
                    }
                }
            }
        };
        if let Some((timing, action)) = startup {
            let mut failed = None;
            schedule(timing, start, runner(action, timing.timeout), |ok, why| {
                if !ok {
                    failed = Some(why);
                }
                false
            })
            .await;
            if let Some(why) = failed {
                let _ = tx.send(ProbeEvent::Failed(ProbeKind::Startup, why));
                return;
            }
            let _ = tx.send(ProbeEvent::Started);
        }
        let liveness = async {
            match liveness {
                Some((timing, action)) => {
                    schedule(timing, start, runner(action, timing.timeout), |ok, why| {
                        if ok {
                            return true;
                        }
                        let _ = tx.send(ProbeEvent::Failed(ProbeKind::Liveness, why));
                        false
                    })
                    .await
                }
                None => std::future::pending().await,
            }
        };
        let readiness = async {
            match readiness {
                Some((timing, action)) => {
                    schedule(timing, start, runner(action, timing.timeout), |ok, why| {
                        tx.send(ProbeEvent::Ready(ok, why)).is_ok()
                    })
                    .await;
                    std::future::pending::<()>().await
                }
                None => std::future::pending().await,
            }
        };
        // A liveness failure ends the probing; readiness alone runs until dropped.
        tokio::select! {
            _ = liveness => {}
            _ = readiness => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pod::{ContainerPort, HttpGetAction, TcpSocketAction};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn timing(success: u32, failure: u32) -> Timing {
        Timing {
            initial_delay: Duration::ZERO,
            period: Duration::from_millis(10),
            timeout: Duration::from_secs(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    #[test]
    fn defaults_and_minimums_follow_kubernetes() {
        let t = Timing::of(&Probe::default());
        assert_eq!(t.initial_delay, Duration::ZERO);
        assert_eq!(t.period, Duration::from_secs(10));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
        let t = Timing::of(&Probe {
            period_seconds: Some(0),
            timeout_seconds: Some(-1),
            failure_threshold: Some(0),
            initial_delay_seconds: Some(-5),
            ..Default::default()
        });
        assert_eq!(t.period, Duration::from_secs(1));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!(t.failure_threshold, 1);
        assert_eq!(t.initial_delay, Duration::ZERO);
    }

    #[test]
    fn results_change_only_after_thresholds_in_a_row() {
        let mut t = Tracker::new(&timing(2, 3));
        assert_eq!(t.observe(true), None);
        assert_eq!(t.state(), None);
        assert_eq!(t.observe(true), Some(true));
        assert_eq!(t.observe(true), None, "no change, no report");
        // Two failures, a success: the failure run starts over.
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(false));
        assert_eq!(t.observe(false), None, "a failure is reported once");
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(true));
    }

    #[test]
    fn a_first_failure_with_threshold_one_is_a_change() {
        let mut t = Tracker::new(&timing(1, 1));
        assert_eq!(t.observe(false), Some(false));
        assert_eq!(t.observe(true), Some(true));
    }

    #[tokio::test]
    async fn first_check_runs_after_the_initial_delay_not_a_period() {
        let mut t = timing(1, 3);
        t.period = Duration::from_secs(3600);
        t.initial_delay = Duration::from_millis(300);
        let start = Instant::now();
        let mut at = None;
        schedule(
            t,
            start,
            || async { Ok(()) },
            |ok, _| {
                assert!(ok);
                at = Some(Instant::now());
                false
            },
        )
        .await;
        let after = at.unwrap() - start;
        assert!(
            after >= Duration::from_millis(300) && after < Duration::from_secs(3),
            "{after:?}"
        );
    }

    #[tokio::test]
    async fn failures_are_reported_after_the_threshold_with_the_reason() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let start = Instant::now();
        let mut seen = vec![];
        schedule(
            timing(1, 3),
            start,
            move || {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        Ok(())
                    } else {
                        Err(format!("boom {n}"))
                    }
                }
            },
            |ok, why| {
                seen.push((ok, why, Instant::now() - start));
                ok
            },
        )
        .await;
        // Success at once, one more success (no change, no report), then failures: the third
        // in a row is the change, reported with its reason, four periods after the start.
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!((seen[0].0, seen[0].1.as_str()), (true, ""));
        assert!(seen[0].2 < Duration::from_millis(500), "{seen:?}");
        assert_eq!((seen[1].0, seen[1].1.as_str()), (false, "boom 4"));
        assert!(seen[1].2 >= Duration::from_millis(40), "{seen:?}");
    }

    #[tokio::test]
    async fn a_new_failure_reason_is_reported_once_while_failing() {
        let reasons = ["refused", "refused", "404", "404", "404", "ok", "404"];
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let mut seen = vec![];
        schedule(
            timing(1, 1),
            Instant::now(),
            move || {
                let why = reasons[c.fetch_add(1, Ordering::SeqCst)];
                async move {
                    if why == "ok" {
                        Ok(())
                    } else {
                        Err(why.to_string())
                    }
                }
            },
            |ok, why| {
                seen.push((ok, why));
                seen.len() < 4
            },
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 7);
        let s = |ok: bool, w: &str| (ok, w.to_string());
        assert_eq!(
            seen,
            vec![
                s(false, "refused"),
                s(false, "404"),
                s(true, ""),
                s(false, "404")
            ]
        );
    }

    fn container() -> Container {
        Container {
            name: "c".into(),
            image: "busybox".into(),
            ports: vec![ContainerPort {
                container_port: 8080,
                name: Some("http".into()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn actions_resolve_named_ports_and_defaults() {
        let c = container();
        let p = Probe {
            http_get: Some(HttpGetAction {
                path: Some("healthz".into()),
                port: serde_json::json!("http"),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            Action::of(&p, &c).unwrap(),
            Action::Http {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/healthz".into()
            }
        );
        let p = Probe {
            tcp_socket: Some(TcpSocketAction {
                port: serde_json::json!("nope"),
                host: None,
            }),
            ..Default::default()
        };
        assert!(Action::of(&p, &c).unwrap_err().contains("\"nope\""));
        let p = Probe {
            tcp_socket: Some(TcpSocketAction {
                port: serde_json::json!(70000),
                host: Some("10.0.0.1".into()),
            }),
            ..Default::default()
        };
        assert!(Action::of(&p, &c).is_err());
    }

    async fn serve_once(answer: &'static str) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /ok HTTP/1.1\r\n"));
            s.write_all(answer.as_bytes()).await.unwrap();
        });
        port
    }

    #[tokio::test]
    async fn http_and_tcp_checks() {
        let t = Target::default();
        let http = |port| Action::Http {
            host: "127.0.0.1".into(),
            port,
            path: "/ok".into(),
        };
        let port = serve_once("HTTP/1.1 204 No Content\r\n\r\n").await;
        t.check(&http(port), Duration::from_secs(2)).await.unwrap();
        let port = serve_once("HTTP/1.0 302 Found\r\nLocation: /x\r\n\r\n").await;
        t.check(&http(port), Duration::from_secs(2)).await.unwrap();
        let port = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let e = t
            .check(&http(port), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(e.contains("503"), "{e}");
        // A closed port fails both kinds.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let tcp = Action::Tcp {
            host: "127.0.0.1".into(),
            port: closed,
        };
        assert!(t.check(&tcp, Duration::from_secs(2)).await.is_err());
        assert!(t
            .check(&http(closed), Duration::from_secs(2))
            .await
            .is_err());
        // A listener that never answers times out.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let e = t
            .check(&http(port), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        let tcp = Action::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        t.check(&tcp, Duration::from_secs(1)).await.unwrap();
        // exec without Docker is refused.
        let e = t
            .check(&Action::Exec { argv: vec![] }, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.contains("OCI"), "{e}");
        drop(l);
    }

    #[tokio::test]
    async fn startup_gates_liveness_and_readiness() {
        // Startup passes at once; readiness never passes (threshold 2); liveness fails
        // after 4 checks: the events come in order Started, Ready(false), Failed(Liveness).
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap().port();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let tcp = |port: u16| {
            Ok(Action::Tcp {
                host: "127.0.0.1".into(),
                port,
            })
        };
        let probes = Probes {
            startup: Some((timing(1, 3), tcp(open))),
            readiness: Some((timing(1, 2), tcp(closed))),
            liveness: Some((timing(1, 4), tcp(closed))),
        };
        assert!(probes.has_startup() && probes.has_readiness() && !probes.is_empty());
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::time::timeout(
            Duration::from_secs(10),
            probes.run(Target::default(), Instant::now(), tx),
        )
        .await
        .expect("the liveness failure ends the probing");
        let mut got = vec![];
        while let Ok(e) = rx.try_recv() {
            got.push(e);
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], ProbeEvent::Started);
        assert!(matches!(&got[1], ProbeEvent::Ready(false, why) if why.contains("dial tcp")));
        assert!(matches!(
            &got[2],
            ProbeEvent::Failed(ProbeKind::Liveness, _)
        ));
        drop(l);
    }

    #[tokio::test]
    async fn without_a_startup_probe_readiness_runs_at_once() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap().port();
        let probes = Probes {
            readiness: Some((
                Timing {
                    period: Duration::from_secs(3600),
                    ..timing(1, 1)
                },
                Ok(Action::Tcp {
                    host: "127.0.0.1".into(),
                    port: open,
                }),
            )),
            ..Probes::none()
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t0 = std::time::Instant::now();
        let run = probes.run(Target::default(), Instant::now(), tx);
        tokio::pin!(run);
        let ev = tokio::select! {
            _ = &mut run => panic!("readiness alone runs until dropped"),
            e = rx.recv() => e.unwrap(),
        };
        assert_eq!(ev, ProbeEvent::Ready(true, String::new()));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn a_failed_startup_probe_stops_there() {
        // exec without Docker fails: after 2 failures the startup probe gives up, and the
        // liveness probe never runs.
        let exec = || {
            Ok(Action::Exec {
                argv: vec!["true".into()],
            })
        };
        let probes = Probes {
            startup: Some((timing(1, 2), exec())),
            liveness: Some((timing(1, 1), exec())),
            ..Probes::none()
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::time::timeout(
            Duration::from_secs(10),
            probes.run(Target::default(), Instant::now(), tx),
        )
        .await
        .expect("a startup failure ends the probing");
        match rx.try_recv().unwrap() {
            ProbeEvent::Failed(ProbeKind::Startup, why) => assert!(why.contains("OCI"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_err());
    }
}
