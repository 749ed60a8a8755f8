//! The ambassador's flags and their `KAPSEL_AMBASSADOR_*` environment equivalents (flags win),
//! declared once as a `clap` struct ([`Flags`]) and read through the shared built-in parser
//! ([`crate::patterns::flags`]), then checked into a [`Config`].
//!
//! Every flag takes `--flag=value` or `--flag value`; `--replica` and `--sentinel` repeat (or take
//! a comma-separated list, as their variables do); durations are `500ms`, `10s`, `1m30s`;
//! booleans are `--tls`, `--tls=true`, `--tls=false`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::patterns::flags::{self, bool_flag, duration, FlagError};

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

/// TLS towards the upstreams (`--tls` and friends).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM bundle of the CAs that sign the servers' certificates; the system's CAs if unset.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain and key (PEM), for servers with `tls-auth-clients yes`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name to send (SNI) and to verify the certificate against; the host of each address
    /// if unset.
    pub server_name: Option<String>,
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
    /// TLS settings, when any connection uses TLS.
    pub tls: Option<TlsConfig>,
    /// TLS to the master and replicas (`--tls`).
    pub server_tls: bool,
    /// TLS to the Sentinels (`--sentinel-tls`, default: as `--tls`), with the same settings.
    pub sentinel_tls: bool,
}

pub const ENV_PREFIX: &str = "KAPSEL_AMBASSADOR_";

/// The flags as given (see [`Config`] for their meaning once checked).
#[derive(Parser, Debug)]
#[command(
    about = "A Redis proxy on the pod's localhost: reads go to healthy replicas, everything else to the master.",
    after_help = "Every flag can also be set by its KAPSEL_AMBASSADOR_* variable (shown with each flag); a flag given explicitly wins."
)]
pub struct Flags {
    /// Address the ambassador listens on (`:PORT` is every interface).
    #[arg(
        long,
        env = "KAPSEL_AMBASSADOR_LISTEN",
        default_value = "127.0.0.1:6379",
        value_name = "HOST:PORT"
    )]
    listen: String,
    /// The master (static upstreams).
    #[arg(long, env = "KAPSEL_AMBASSADOR_MASTER", value_name = "HOST:PORT")]
    master: Option<String>,
    /// A replica that may serve reads (repeat, or a comma-separated list).
    #[arg(
        long = "replica",
        env = "KAPSEL_AMBASSADOR_REPLICA",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    replicas: Vec<String>,
    /// A Sentinel that knows the master and its replicas (repeat, or a comma-separated list).
    #[arg(
        long = "sentinel",
        env = "KAPSEL_AMBASSADOR_SENTINEL",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    sentinels: Vec<String>,
    /// The master's name in Sentinel (`sentinel monitor NAME ...`).
    #[arg(long, env = "KAPSEL_AMBASSADOR_MASTER_NAME", value_name = "NAME")]
    master_name: Option<String>,
    /// User the ambassador authenticates as on every upstream (ACL).
    #[arg(long, env = "KAPSEL_AMBASSADOR_USERNAME")]
    username: Option<String>,
    /// Password the ambassador authenticates with on every upstream.
    #[arg(long, env = "KAPSEL_AMBASSADOR_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// File holding that password (trailing newline ignored).
    #[arg(long, env = "KAPSEL_AMBASSADOR_PASSWORD_FILE", value_name = "PATH")]
    password_file: Option<String>,
    /// Replicas further behind than this serve no reads.
    #[arg(long, env = "KAPSEL_AMBASSADOR_MAX_REPLICA_LAG", value_parser = duration, default_value = "10s")]
    max_replica_lag: Duration,
    /// How often replicas are checked (INFO replication), at least 50ms.
    #[arg(long, env = "KAPSEL_AMBASSADOR_HEALTH_INTERVAL", value_parser = duration, default_value = "1s")]
    health_interval: Duration,
    /// After a client writes, its reads go to the master for this long (0: off).
    #[arg(long, env = "KAPSEL_AMBASSADOR_READ_YOUR_WRITES", value_parser = duration, default_value = "0")]
    read_your_writes: Duration,
    /// Time allowed to connect (and finish the TLS handshake) to an upstream.
    #[arg(long, env = "KAPSEL_AMBASSADOR_CONNECT_TIMEOUT", value_parser = duration, default_value = "1s")]
    connect_timeout: Duration,
    /// Address of the Prometheus /metrics page (`off` or empty: none).
    #[arg(
        long,
        env = "KAPSEL_AMBASSADOR_METRICS_LISTEN",
        default_value = "127.0.0.1:9121",
        value_name = "HOST:PORT"
    )]
    metrics_listen: String,
    /// Largest bulk string a client may send.
    #[arg(long, env = "KAPSEL_AMBASSADOR_MAX_BULK_BYTES", default_value_t = 512 << 20)]
    max_bulk_bytes: usize,
    /// Client connections served at once; more are refused.
    #[arg(long, env = "KAPSEL_AMBASSADOR_MAX_CLIENTS", default_value_t = 10_000)]
    max_clients: usize,
    /// Pipelined reads of one client in flight before the ambassador stops reading it.
    #[arg(
        long,
        env = "KAPSEL_AMBASSADOR_MAX_INFLIGHT_BATCHES",
        default_value_t = 32
    )]
    max_inflight_batches: usize,
    /// Replies one client may have waiting before it is disconnected.
    #[arg(long = "max-client-output-bytes", env = "KAPSEL_AMBASSADOR_MAX_CLIENT_OUTPUT_BYTES", default_value_t = 64 << 20)]
    max_client_output: usize,
    /// Connect to the master and replicas over TLS.
    #[arg(long, env = "KAPSEL_AMBASSADOR_TLS", value_parser = bool_flag, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, default_value = "false")]
    tls: bool,
    /// CA bundle (PEM) that signs the servers' certificates (default: the system's CAs).
    #[arg(long, env = "KAPSEL_AMBASSADOR_TLS_CA_FILE", value_name = "PATH")]
    tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for servers that check clients (`tls-auth-clients yes`).
    #[arg(long, env = "KAPSEL_AMBASSADOR_TLS_CERT_FILE", value_name = "PATH")]
    tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "KAPSEL_AMBASSADOR_TLS_KEY_FILE", value_name = "PATH")]
    tls_key_file: Option<PathBuf>,
    /// Server name sent (SNI) and verified in the certificates (default: each address's host).
    #[arg(long, env = "KAPSEL_AMBASSADOR_TLS_SERVER_NAME", value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Connect to the Sentinels over TLS too, with the same CA, certificate and server name
    /// (default: as --tls).
    #[arg(long, env = "KAPSEL_AMBASSADOR_SENTINEL_TLS", value_parser = bool_flag, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    sentinel_tls: Option<bool>,
}

/// Why the ambassador's configuration was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--help`, or a flag clap refused (unknown, malformed, missing value).
    #[error(transparent)]
    Flags(#[from] FlagError),
    /// A value clap accepted that the ambassador cannot use; names the flag.
    #[error("redis-ambassador: {0}")]
    Invalid(String),
}

impl ConfigError {
    /// `--help` was asked for: the text to show.
    pub fn help_text(&self) -> Option<&str> {
        match self {
            ConfigError::Flags(FlagError::Help(t)) => Some(t),
            _ => None,
        }
    }
}

fn check_addr(flag: &str, v: &str) -> Result<String, ConfigError> {
    // host:port with a numeric port; host names are resolved when connecting.
    let (host, port) = v
        .rsplit_once(':')
        .ok_or_else(|| ConfigError::Invalid(format!("--{flag}: {v:?} is not host:port")))?;
    port.parse::<u16>()
        .map_err(|_| ConfigError::Invalid(format!("--{flag}: {v:?} has an invalid port")))?;
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    Ok(format!("{host}:{port}"))
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

impl Config {
    /// Parse the container's (or the command line's) `args` and `env`.
    pub fn parse(args: &[String], env: &[(String, String)]) -> Result<Config, ConfigError> {
        let f: Flags = flags::parse("redis-ambassador", args, env)?;
        Config::from_flags(f)
    }

    fn from_flags(f: Flags) -> Result<Config, ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        let list = |v: Vec<String>| -> Vec<String> {
            v.into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let listen = check_addr("listen", &f.listen)?;
        listen
            .parse::<SocketAddr>()
            .map_err(|_| ConfigError::Invalid(format!("--listen: {listen:?} is not an IP:port")))?;
        let master = nonempty(f.master);
        let sentinels = list(f.sentinels);
        let replicas = list(f.replicas);
        let upstreams = match (master, sentinels.is_empty()) {
            (Some(_), false) => {
                return bad("--master and --sentinel exclude each other: give the servers, or the Sentinels that know them")
            }
            (Some(m), true) => Upstreams::Static {
                master: check_addr("master", &m)?,
                replicas: replicas
                    .iter()
                    .map(|r| check_addr("replica", r))
                    .collect::<Result<_, _>>()?,
            },
            (None, false) => {
                if !replicas.is_empty() {
                    return bad("--replica is for static upstreams; with --sentinel the replicas come from Sentinel");
                }
                Upstreams::Sentinel {
                    sentinels: sentinels
                        .iter()
                        .map(|s| check_addr("sentinel", s))
                        .collect::<Result<_, _>>()?,
                    master_name: nonempty(f.master_name).ok_or_else(|| {
                        ConfigError::Invalid(
                            "required flag missing: --master-name (the name Sentinel monitors)"
                                .into(),
                        )
                    })?,
                }
            }
            (None, true) => {
                return bad(
                    "required flag missing: --master=HOST:PORT (or --sentinel=HOST:PORT with --master-name)",
                )
            }
        };
        let metrics_listen = match f.metrics_listen.as_str() {
            "" | "off" => None,
            v => Some(check_addr("metrics-listen", v)?),
        };
        let tls_files = f.tls_ca_file.is_some()
            || f.tls_cert_file.is_some()
            || f.tls_key_file.is_some()
            || f.tls_server_name.is_some();
        if tls_files && !f.tls && f.sentinel_tls != Some(true) {
            return bad("--tls-ca-file, --tls-cert-file, --tls-key-file and --tls-server-name need --tls (or --sentinel-tls)");
        }
        if f.tls_cert_file.is_some() != f.tls_key_file.is_some() {
            return bad("--tls-cert-file and --tls-key-file go together: the client certificate and its key");
        }
        let tls_cfg = TlsConfig {
            ca_file: f.tls_ca_file,
            cert_file: f.tls_cert_file,
            key_file: f.tls_key_file,
            server_name: nonempty(f.tls_server_name),
        };
        let sentinel_tls = f.sentinel_tls.unwrap_or(f.tls);
        let cfg = Config {
            listen,
            upstreams,
            username: nonempty(f.username),
            password: nonempty(f.password),
            password_file: nonempty(f.password_file),
            max_replica_lag: f.max_replica_lag,
            health_interval: f.health_interval,
            read_your_writes: f.read_your_writes,
            connect_timeout: f.connect_timeout,
            metrics_listen,
            max_bulk_bytes: f.max_bulk_bytes,
            max_clients: f.max_clients,
            max_inflight_batches: f.max_inflight_batches,
            max_client_output: f.max_client_output,
            tls: (f.tls || sentinel_tls).then_some(tls_cfg),
            server_tls: f.tls,
            sentinel_tls,
        };
        if cfg.health_interval < Duration::from_millis(50) {
            return bad("--health-interval must be at least 50ms");
        }
        if cfg.connect_timeout.is_zero() {
            return bad("--connect-timeout must be positive");
        }
        if cfg.max_inflight_batches == 0 || cfg.max_clients == 0 {
            return bad("--max-inflight-batches and --max-clients must be at least 1");
        }
        if cfg.password.is_some() && cfg.password_file.is_some() {
            return bad("--password and --password-file exclude each other");
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
        assert!(c.tls.is_none() && !c.server_tls && !c.sentinel_tls);
        let c = Config::parse(
            &s(&["--master-name=mymaster"]),
            &[(
                "KAPSEL_AMBASSADOR_SENTINEL".into(),
                "127.0.0.1:26379, 127.0.0.1:26380".into(),
            )],
        )
        .unwrap();
        assert!(
            matches!(&c.upstreams, Upstreams::Sentinel { sentinels, .. } if sentinels.len() == 2)
        );
        let c = Config::parse(
            &s(&[
                "--master=h:1",
                "--tls",
                "--tls-ca-file=/ca.pem",
                "--tls-server-name=redis.internal",
                "--metrics-listen=off",
            ]),
            &[],
        )
        .unwrap();
        assert!(c.server_tls && c.sentinel_tls && c.metrics_listen.is_none());
        let t = c.tls.unwrap();
        assert_eq!(t.ca_file.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert_eq!(t.server_name.as_deref(), Some("redis.internal"));
        let c = Config::parse(&s(&["--master=h:1", "--tls", "--sentinel-tls=false"]), &[]).unwrap();
        assert!(c.server_tls && !c.sentinel_tls);
    }

    #[test]
    fn names_the_bad_flag() {
        let e = |a: &[&str]| Config::parse(&s(a), &[]).unwrap_err().to_string();
        assert!(e(&[]).contains("--master"));
        assert!(e(&["--master=x"]).contains("--master"));
        assert!(e(&["--master=h:1", "--bogus=1"]).contains("--bogus"));
        assert!(e(&["--sentinel=h:1"]).contains("--master-name"));
        assert!(e(&["--master=h:1", "--health-interval=xyz"]).contains("--health-interval"));
        assert!(e(&["--master=h:1", "--listen=nohost:1"]).contains("--listen"));
        assert!(e(&["--master=h:1", "--tls-ca-file=/x"]).contains("--tls"));
        assert!(e(&["--master=h:1", "--tls", "--tls-cert-file=/x"]).contains("--tls-key-file"));
        assert!(e(&["--master=h:1", "--tls=maybe"]).contains("--tls"));
        let env = [(
            "KAPSEL_AMBASSADOR_MAX_CLIENTS".to_string(),
            "lots".to_string(),
        )];
        let m = Config::parse(&s(&["--master=h:1"]), &env)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("--max-clients") && m.contains("KAPSEL_AMBASSADOR_MAX_CLIENTS"),
            "{m}"
        );
        assert!(Config::parse(&s(&["--help"]), &[])
            .unwrap_err()
            .help_text()
            .is_some());
    }
}
