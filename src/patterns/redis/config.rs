//! The ambassador's flags (`--flag=value` or `--flag value`, repeatable where noted) and their
//! `KAPSEL_AMBASSADOR_*` environment equivalents (flags win).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::patterns::gitsync::parse_go_duration;

/// Where the upstream servers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstreams {
    /// `--master` and `--replica` (repeated).
    Static {
        master: String,
        replicas: Vec<String>,
    },
    /// `--sentinel` (repeated) and `--master-name`: the master and replicas Sentinel reports,
    /// followed through failovers.
    Sentinel {
        sentinels: Vec<String>,
        master_name: String,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub upstreams: Upstreams,
    /// Credentials the ambassador itself presents to every upstream (`--username`,
    /// `--password` or `--password-file`). Clients' own `AUTH` is passed through.
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<String>,
    pub max_replica_lag: Duration,
    pub health_interval: Duration,
    pub read_your_writes: Duration,
    pub connect_timeout: Duration,
    pub metrics_listen: Option<String>,
    pub max_bulk_bytes: usize,
    pub max_clients: usize,
    /// Pipelined batches a client may have in flight before the ambassador stops reading it.
    pub max_inflight_batches: usize,
    /// Replies a client may have waiting in the ambassador before it is disconnected (Redis's
    /// `client-output-buffer-limit`, which a client that stops reading runs into).
    pub max_client_output: usize,
}

/// (flag, takes a list)
const FLAGS: &[(&str, bool)] = &[
    ("listen", false),
    ("master", false),
    ("replica", true),
    ("sentinel", true),
    ("master-name", false),
    ("username", false),
    ("password", false),
    ("password-file", false),
    ("max-replica-lag", false),
    ("health-interval", false),
    ("read-your-writes", false),
    ("connect-timeout", false),
    ("metrics-listen", false),
    ("max-bulk-bytes", false),
    ("max-clients", false),
    ("max-inflight-batches", false),
    ("max-client-output-bytes", false),
];

pub const ENV_PREFIX: &str = "KAPSEL_AMBASSADOR_";

fn check_addr(flag: &str, v: &str) -> Result<String, String> {
    // host:port with a numeric port; host names are resolved when connecting.
    let (host, port) = v
        .rsplit_once(':')
        .ok_or_else(|| format!("--{flag}: {v:?} is not host:port"))?;
    port.parse::<u16>()
        .map_err(|_| format!("--{flag}: {v:?} has an invalid port"))?;
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    Ok(format!("{host}:{port}"))
}

impl Config {
    pub fn parse(args: &[String], env: &[(String, String)]) -> Result<Config, String> {
        let mut vals: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in env {
            if let Some(name) = k.strip_prefix(ENV_PREFIX) {
                let flag = name.to_lowercase().replace('_', "-");
                if let Some((_, list)) = FLAGS.iter().find(|(f, _)| *f == flag) {
                    let items = if *list {
                        v.split(',').map(|s| s.trim().to_string()).collect()
                    } else {
                        vec![v.clone()]
                    };
                    vals.insert(flag, items);
                }
            }
        }
        let mut from_args: HashMap<String, Vec<String>> = HashMap::new();
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            let Some(body) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
                return Err(format!(
                    "unexpected argument {a:?}: the ambassador takes only flags (--master=HOST:PORT ...)"
                ));
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (body.to_string(), None),
            };
            if !FLAGS.iter().any(|(f, _)| *f == name) {
                return Err(format!(
                    "unknown flag: --{name} (flags: {})",
                    FLAGS
                        .iter()
                        .map(|(f, _)| format!("--{f}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| format!("flag needs an argument: --{name}"))?
                }
            };
            from_args.entry(name).or_default().push(value);
            i += 1;
        }
        vals.extend(from_args);
        let one = |k: &str| vals.get(k).and_then(|v| v.last().cloned());
        let list = |k: &str| -> Vec<String> {
            vals.get(k)
                .map(|v| v.iter().filter(|s| !s.is_empty()).cloned().collect())
                .unwrap_or_default()
        };
        let dur = |k: &str, d: Duration| -> Result<Duration, String> {
            one(k)
                .map(|v| parse_go_duration(&v).map_err(|e| format!("--{k}: {e}")))
                .unwrap_or(Ok(d))
        };
        let num = |k: &str, d: usize| -> Result<usize, String> {
            one(k)
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| format!("--{k}: invalid number {v:?}"))
                })
                .unwrap_or(Ok(d))
        };
        let listen = check_addr("listen", &one("listen").unwrap_or("127.0.0.1:6379".into()))?;
        listen
            .parse::<SocketAddr>()
            .map_err(|_| format!("--listen: {listen:?} is not an IP:port"))?;
        let master = one("master").filter(|s| !s.is_empty());
        let sentinels = list("sentinel");
        let upstreams = match (master, sentinels.is_empty()) {
            (Some(_), false) => {
                return Err("--master and --sentinel exclude each other: give the servers, or the Sentinels that know them".into())
            }
            (Some(m), true) => Upstreams::Static {
                master: check_addr("master", &m)?,
                replicas: list("replica")
                    .iter()
                    .map(|r| check_addr("replica", r))
                    .collect::<Result<_, _>>()?,
            },
            (None, false) => {
                if !list("replica").is_empty() {
                    return Err("--replica is for static upstreams; with --sentinel the replicas come from Sentinel".into());
                }
                Upstreams::Sentinel {
                    sentinels: sentinels
                        .iter()
                        .map(|s| check_addr("sentinel", s))
                        .collect::<Result<_, _>>()?,
                    master_name: one("master-name").filter(|s| !s.is_empty()).ok_or(
                        "required flag missing: --master-name (the name Sentinel monitors)",
                    )?,
                }
            }
            (None, true) => {
                return Err(
                    "required flag missing: --master=HOST:PORT (or --sentinel=HOST:PORT with --master-name)"
                        .into(),
                )
            }
        };
        let metrics_listen = match one("metrics-listen") {
            None => Some("127.0.0.1:9121".to_string()),
            Some(v) if v.is_empty() || v == "off" => None,
            Some(v) => Some(check_addr("metrics-listen", &v)?),
        };
        let cfg = Config {
            listen,
            upstreams,
            username: one("username").filter(|s| !s.is_empty()),
            password: one("password").filter(|s| !s.is_empty()),
            password_file: one("password-file").filter(|s| !s.is_empty()),
            max_replica_lag: dur("max-replica-lag", Duration::from_secs(10))?,
            health_interval: dur("health-interval", Duration::from_secs(1))?,
            read_your_writes: dur("read-your-writes", Duration::ZERO)?,
            connect_timeout: dur("connect-timeout", Duration::from_secs(1))?,
            metrics_listen,
            max_bulk_bytes: num("max-bulk-bytes", 512 << 20)?,
            max_clients: num("max-clients", 10_000)?,
            max_inflight_batches: num("max-inflight-batches", 32)?,
            max_client_output: num("max-client-output-bytes", 64 << 20)?,
        };
        if cfg.health_interval < Duration::from_millis(50) {
            return Err("--health-interval must be at least 50ms".into());
        }
        if cfg.connect_timeout.is_zero() {
            return Err("--connect-timeout must be positive".into());
        }
        if cfg.max_inflight_batches == 0 || cfg.max_clients == 0 {
            return Err("--max-inflight-batches and --max-clients must be at least 1".into());
        }
        if cfg.password.is_some() && cfg.password_file.is_some() {
            return Err("--password and --password-file exclude each other".into());
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_flags_and_env() {
        let c = Config::parse(
            &s(&[
                "--master=127.0.0.1:6390",
                "--replica",
                "127.0.0.1:6391",
                "--replica=127.0.0.1:6392",
                "--read-your-writes=250ms",
            ]),
            &[("KAPSEL_AMBASSADOR_LISTEN".into(), ":7000".into())],
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:7000");
        assert_eq!(
            c.upstreams,
            Upstreams::Static {
                master: "127.0.0.1:6390".into(),
                replicas: vec!["127.0.0.1:6391".into(), "127.0.0.1:6392".into()]
            }
        );
        assert_eq!(c.read_your_writes, Duration::from_millis(250));
        let c = Config::parse(
            &s(&["--sentinel=127.0.0.1:26379", "--master-name=mymaster"]),
            &[],
        )
        .unwrap();
        assert!(matches!(c.upstreams, Upstreams::Sentinel { .. }));
    }

    #[test]
    fn names_the_bad_flag() {
        let e = |a: &[&str]| Config::parse(&s(a), &[]).unwrap_err();
        assert!(e(&[]).contains("--master"));
        assert!(e(&["--master=x"]).contains("--master"));
        assert!(e(&["--master=h:1", "--bogus=1"]).contains("unknown flag: --bogus"));
        assert!(e(&["--sentinel=h:1"]).contains("--master-name"));
        assert!(e(&["--master=h:1", "--health-interval=xyz"]).contains("--health-interval"));
        assert!(e(&["--master=h:1", "--listen=nohost:1"]).contains("--listen"));
    }
}
