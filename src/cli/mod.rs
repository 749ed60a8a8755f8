//! The `kapsel` command line: `serve`, `up`, `apply`, `get`, `describe`, `logs`, `exec`, `delete`,
//! `rollout`, `scale` (see CONTRACT.md). Client commands talk HTTP to `--server`; `serve` and `up` run the
//! embedded control plane and node. `anyhow` lives here, at the edge, and nowhere else.

pub mod client;
pub mod exec;
pub mod manifest;
pub mod modules;
pub mod node;
pub mod output;
pub mod rollout;
pub mod token;
pub mod up;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use self::client::{path_for, Client};
use self::manifest::Manifest;
use crate::api::pods::default_pod;
use crate::model::quantity::parse_bytes;
use crate::model::{Deployment, Event, Node, Pod, ReplicaSet};
use crate::server::{Server, ServerConfig};

#[derive(Parser, Debug)]
#[command(
    name = "kapsel",
    version,
    about = "A pod runtime and orchestrator: WASM modules and OCI containers in one pod"
)]
pub struct Cli {
    /// API server URL for client commands.
    #[arg(
        long,
        global = true,
        env = "KAPSEL_SERVER",
        default_value = "http://127.0.0.1:7070",
        value_parser = parse_server_url
    )]
    pub server: String,
    /// Namespace.
    #[arg(short = 'n', long, global = true, default_value = "default")]
    pub namespace: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct NodeOpts {
    /// Directory for the store, volumes, logs and the compiled-module cache.
    #[arg(long, default_value = "./kapsel-data")]
    pub data_dir: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Most pods this node accepts.
    #[arg(long, default_value_t = 10_000)]
    pub max_pods: u64,
    /// Instances the WASM pooling allocator holds (0 disables it).
    #[arg(long, default_value_t = 1024)]
    pub wasm_pool_slots: u32,
    /// Largest linear memory of a pooled WASM instance.
    #[arg(long, default_value = "64Mi")]
    pub wasm_pool_memory: String,
    /// Memory budget (all linear memories and tables) of a WASM container that sets no
    /// `resources.limits.memory`; `0` or `none`: unlimited.
    #[arg(long, default_value = "512Mi")]
    pub wasm_default_memory_limit: String,
    /// Tests only: give no pod a network namespace of its own (WASM-only pods use the node's
    /// network, as on a node without the privilege to create one).
    #[arg(long, hide = true)]
    pub no_pod_netns: bool,
    /// First restart back-off (Kubernetes: 10s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub backoff_initial: Duration,
    /// Longest restart back-off (Kubernetes: 5m).
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub backoff_max: Duration,
    /// Docker Engine socket for OCI containers.
    #[arg(
        long,
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub docker_host: String,
    /// Run WASM only, without Docker.
    #[arg(long)]
    pub no_docker: bool,
    /// How often emptyDirs with a sizeLimit are measured (a pod over its limit is evicted).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub volume_check_interval: Duration,
    /// How often this node renews its Lease (its heartbeat, kubelet's name for the knob).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub node_lease_renew_interval: Duration,
    /// A label this node sets on its Node, KEY=VALUE (repeatable). Not under
    /// node-restriction.kubernetes.io/, nor kubernetes.io/ or k8s.io/ except the well-known ones.
    #[arg(long = "node-label", value_name = "KEY=VALUE", value_parser = parse_node_label)]
    pub node_labels: Vec<(String, String)>,
    /// A taint the Node is registered with, KEY[=VALUE]:EFFECT, EFFECT one of NoSchedule,
    /// PreferNoSchedule, NoExecute (repeatable).
    #[arg(long = "node-taint", value_name = "KEY[=VALUE]:EFFECT", value_parser = parse_node_taint)]
    pub node_taints: Vec<crate::model::taint::Taint>,
}

/// `--node-label KEY=VALUE`: a valid label the node may set on itself.
fn parse_node_label(s: &str) -> std::result::Result<(String, String), String> {
    use crate::model::validate::{check_label_key, check_label_value};
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    check_label_key(k).map_err(|e| format!("{s:?}: key {k:?}: {e}"))?;
    check_label_value(v).map_err(|e| format!("{s:?}: value {v:?}: {e}"))?;
    crate::model::node::node_may_set_label(k)?;
    Ok((k.to_string(), v.to_string()))
}

/// `--node-taint KEY[=VALUE]:EFFECT`.
fn parse_node_taint(s: &str) -> std::result::Result<crate::model::taint::Taint, String> {
    use crate::model::validate::{check_label_key, check_label_value};
    let t = crate::model::taint::Taint::parse(s)?;
    check_label_key(&t.key).map_err(|e| format!("taint {s:?}: key {:?}: {e}", t.key))?;
    if let Some(v) = &t.value {
        check_label_value(v).map_err(|e| format!("taint {s:?}: value {v:?}: {e}"))?;
    }
    Ok(t)
}

/// The node lifecycle controller of `serve` (Kubernetes' kube-controller-manager flag names;
/// Kapsel's defaults are fast: a lost node's pods run elsewhere within about 10 s).
#[derive(Args, Debug, Clone)]
pub struct LifecycleOpts {
    /// How often the controller looks at the nodes' heartbeats.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub node_monitor_period: Duration,
    /// A node whose Lease was not renewed for this long is NotReady (Ready=Unknown) and
    /// tainted node.kubernetes.io/unreachable (Kubernetes: 50s).
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    pub node_monitor_grace_period: Duration,
    /// tolerationSeconds of the unreachable/not-ready NoExecute tolerations every pod gets,
    /// i.e. how long its pods stay on an unreachable node (Kubernetes: 300).
    #[arg(long, default_value_t = 2)]
    pub default_unreachable_toleration_seconds: i64,
    /// Most nodes tainted for eviction per second (0: never evict).
    #[arg(long, default_value_t = 10.0)]
    pub node_eviction_rate: f64,
    /// A zone (topology.kubernetes.io/zone) with more than 2 not-ready nodes making at least
    /// this fraction of it is partially disrupted: it evicts at --secondary-node-eviction-rate
    /// if larger than --large-cluster-size-threshold, else not at all. When every zone has all
    /// its nodes not ready, nothing is evicted (the control plane is the likely problem).
    #[arg(long, default_value_t = 0.55)]
    pub unhealthy_zone_threshold: f64,
    /// Zones with more nodes than this are "large" (see --unhealthy-zone-threshold).
    #[arg(long, default_value_t = 50)]
    pub large_cluster_size_threshold: usize,
    /// Nodes tainted for eviction per second in a large, partially disrupted zone.
    #[arg(long, default_value_t = 0.01)]
    pub secondary_node_eviction_rate: f64,
}

impl LifecycleOpts {
    pub fn apply(&self, cfg: &mut ServerConfig) -> Result<()> {
        cfg.lifecycle = crate::sched::nodelifecycle::LifecycleConfig {
            monitor_period: self.node_monitor_period,
            grace_period: self.node_monitor_grace_period,
            default_toleration_seconds: self.default_unreachable_toleration_seconds,
            eviction_rate: self.node_eviction_rate,
            unhealthy_zone_threshold: self.unhealthy_zone_threshold,
            large_cluster_size_threshold: self.large_cluster_size_threshold,
            secondary_eviction_rate: self.secondary_node_eviction_rate,
        };
        cfg.lifecycle
            .validate(cfg.node_lease_renew_interval)
            .map_err(|e| anyhow!(e))
    }
}

/// The API listener's protections (see `api::guard` and `api::listener`).
#[derive(Args, Debug, Clone)]
pub struct ApiOpts {
    /// Most API connections served at once; more wait in the listen backlog until one ends.
    #[arg(long, default_value_t = crate::api::listener::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Disconnect a client that has not sent a whole request head within this time (also
    /// closes idle keep-alive connections); 0 disables it.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Also answer to this Host name (DNS-rebinding protection accepts only loopback names on
    /// a loopback listener); repeatable or comma-separated. On a non-loopback listener, giving
    /// any turns the Host check on.
    #[arg(long = "allowed-host", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
}

/// `serve`'s listener for nodes on other machines (off unless `--cluster-listen` is given).
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterOpts {
    /// Serve nodes (`kapsel agent`) over TLS on this address, e.g. `0.0.0.0:6443`: makes the
    /// cluster CA in <data-dir>/pki and a join token in <data-dir>/token on first start.
    #[arg(long, value_name = "ADDR")]
    pub cluster_listen: Option<String>,
    /// The address or name nodes reach the cluster listener by (put in its certificate).
    #[arg(long, value_name = "HOST")]
    pub cluster_advertise_address: Option<String>,
    /// More names or addresses for the cluster listener's certificate; repeatable or
    /// comma-separated.
    #[arg(long = "tls-san", value_delimiter = ',', value_name = "NAME")]
    pub tls_sans: Vec<String>,
}

impl ClusterOpts {
    pub fn apply(&self, cfg: &mut ServerConfig) -> Result<()> {
        if self.cluster_listen.is_none()
            && (self.cluster_advertise_address.is_some() || !self.tls_sans.is_empty())
        {
            anyhow::bail!("--cluster-advertise-address and --tls-san need --cluster-listen ADDR");
        }
        cfg.cluster_listen = self.cluster_listen.clone();
        cfg.cluster_sans = self
            .cluster_advertise_address
            .iter()
            .chain(&self.tls_sans)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        Ok(())
    }
}

impl ApiOpts {
    pub fn apply(&self, cfg: &mut ServerConfig) {
        cfg.api_listener.max_connections = self.max_connections;
        cfg.api_listener.header_read_timeout =
            (!self.header_read_timeout.is_zero()).then_some(self.header_read_timeout);
        cfg.allowed_hosts = self.allowed_hosts.clone();
    }
}

/// `kapsel module …`
#[derive(Subcommand, Debug)]
pub enum ModuleCmd {
    /// Upload a `.wasm` / `.wat` file (unless the server has it) and print its digest
    /// (`sha256:<hex>` of the file's bytes).
    Push {
        /// The module file.
        file: PathBuf,
    },
    /// List the stored modules: digest, size, when stored.
    List,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the control plane and a local node.
    Serve {
        /// Address of the HTTP API (loopback by default).
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        #[command(flatten)]
        node: NodeOpts,
        #[command(flatten)]
        api: ApiOpts,
        #[command(flatten)]
        cluster: ClusterOpts,
        #[command(flatten)]
        lifecycle: LifecycleOpts,
    },
    /// Run a node that joins the control plane at --server: it registers its Node, runs the
    /// pods bound to it and reports their status through the API (nothing else is local).
    Agent {
        /// Join token (also KAPSEL_TOKEN): with an `https://` --server, the `K10…` token from
        /// `kapsel token create` or the server's <data-dir>/token, used once to get this node's
        /// certificate; with `http://`, sent as a bearer token.
        #[arg(long, env = "KAPSEL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The address reported as this node's InternalIP and its pods' hostIP.
        #[arg(long, default_value = "127.0.0.1")]
        node_ip: String,
        #[command(flatten)]
        node: NodeOpts,
    },
    /// Run manifests in the foreground with an embedded control plane + node; Ctrl-C stops all.
    Up {
        /// Manifest file or directory.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        /// Keep state here (default: a temporary directory removed on exit).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Most pods this node accepts.
        #[arg(long, default_value_t = 10_000)]
        max_pods: u64,
        #[command(flatten)]
        api: ApiOpts,
        /// Memory budget of a WASM container without `resources.limits.memory`
        /// (`0` or `none`: unlimited).
        #[arg(long, default_value = "512Mi")]
        wasm_default_memory_limit: String,
    },
    /// Create or update every object in the files.
    Apply {
        /// Manifest file (YAML or JSON, `---`-separated documents) or a directory of them.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Record this command line in each Deployment's `kubernetes.io/change-cause`
        /// annotation (unless the manifest sets one), shown by `rollout history`.
        #[arg(long)]
        record: bool,
    },
    /// List or read objects: pods (po), deployments (deploy), replicasets (rs), nodes (no),
    /// events (ev).
    Get {
        /// The kind: pods, deployments, replicasets, nodes or events (singular and short
        /// names work too).
        resource: String,
        /// One object's name (default: list them all).
        name: Option<String>,
        /// wide, json or yaml.
        #[arg(short = 'o', long)]
        output: Option<String>,
        /// Filter by labels (`app=web,tier!=db`).
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Show an object in detail with its recent events: pod, deployment, replicaset, node.
    Describe {
        /// The kind: pod, deployment, replicaset or node.
        resource: String,
        /// The object's name.
        name: String,
    },
    /// Print a container's logs.
    Logs {
        /// The pod's name.
        pod: String,
        /// The container (default: the pod's only container; required when it has several).
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Keep streaming new lines until the container ends (or Ctrl-C).
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
    },
    /// Run a command in a pod's OCI container, on any node; its exit code becomes kapsel's.
    Exec {
        /// The pod's name.
        pod: String,
        /// The container (default: the pod's only container; required when it has several).
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Pass stdin to the command.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Allocate a terminal for the command (stderr then arrives on stdout).
        #[arg(short = 't', long)]
        tty: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Delete objects by name or by manifest.
    Delete {
        resource: Option<String>,
        name: Option<String>,
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
        /// Wait until the objects are gone.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        wait: bool,
        /// Seconds to let the pod stop; 0 removes it at once.
        #[arg(long)]
        grace_period: Option<i64>,
    },
    /// Run the git-sync sidecar standalone, outside any pod (kubernetes/git-sync v4 flags and
    /// GITSYNC_* variables), e.g. `kapsel git-sync --repo=URL --root=/srv/git --one-time`.
    #[command(name = "git-sync", disable_help_flag = true)]
    GitSync {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the Redis ambassador standalone, outside any pod, e.g.
    /// `kapsel redis-ambassador --listen=127.0.0.1:6379 --master=10.0.0.5:6379 --replica=10.0.0.6:6379`
    /// (flags: see the README; also KAPSEL_AMBASSADOR_* variables).
    #[command(name = "redis-ambassador", disable_help_flag = true)]
    RedisAmbassador {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the metrics adapter standalone, e.g.
    /// `kapsel metrics-adapter --statsd.listen-udp=:9125 --web.listen-address=:9102 --config=sources.yaml`.
    #[command(name = "metrics-adapter", disable_help_flag = true)]
    MetricsAdapter {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Manage the rollouts of Deployments: status, history, undo, pause, resume, restart, and
    /// a canary's promote or abort.
    Rollout {
        #[command(subcommand)]
        action: rollout::RolloutCmd,
    },
    /// The server's content-addressed WASM module store (what `apply` uploads modules to).
    Module {
        #[command(subcommand)]
        action: ModuleCmd,
    },
    /// Manage join tokens for `kapsel agent` (server started with --cluster-listen).
    Token {
        #[command(subcommand)]
        action: token::TokenCmd,
    },
    /// Mark a node unschedulable: new pods go elsewhere, running ones stay.
    Cordon { node: String },
    /// Make a cordoned node schedulable again.
    Uncordon { node: String },
    /// Cordon a node, then evict (delete gracefully) every pod on it that a ReplicaSet owns,
    /// so it is replaced elsewhere, and wait until they are gone.
    Drain {
        node: String,
        /// Also delete pods no ReplicaSet owns (they are not replaced).
        #[arg(long)]
        force: bool,
        /// Give up after this long.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Set a Deployment's replicas: `kapsel scale deployment NAME --replicas N` (or
    /// `deployment/NAME`).
    Scale {
        /// `deployment`, `deployment/NAME` or `NAME`.
        target: String,
        name: Option<String>,
        #[arg(long)]
        replicas: i64,
    },
}

/// `--server`: `http(s)://HOST[:PORT]`, or a bare `HOST:PORT` (taken as `http://`). A path,
/// query or other scheme is refused: the API lives at the root of its server.
pub fn parse_server_url(s: &str) -> std::result::Result<String, String> {
    let s = s.trim();
    let with_scheme = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let url = reqwest::Url::parse(&with_scheme)
        .map_err(|e| format!("{s:?} is not a server address ({e}); use http://HOST:PORT"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{s:?}: scheme {:?} is not supported; use http://HOST:PORT or https://HOST:PORT",
            url.scheme()
        ));
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(format!("{s:?} names no host; use http://HOST:PORT"));
    };
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{s:?}: a server URL has no path or query (the API is at the server's root); use {}://{}",
            url.scheme(),
            url.port()
                .map(|p| format!("{host}:{p}"))
                .unwrap_or_else(|| host.to_string())
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{s:?}: credentials do not belong in the server URL"
        ));
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

/// `10s`, `500ms`, `2m`, `1h`, or bare seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 500ms, 10s, 5m)"))?;
    Ok(Duration::from_secs_f64(v * mult))
}

fn resource_name(r: &str) -> Result<&'static str> {
    Ok(match r {
        "pod" | "pods" | "po" => "pods",
        "node" | "nodes" | "no" => "nodes",
        "event" | "events" | "ev" => "events",
        "deployment" | "deployments" | "deploy" => "deployments",
        "replicaset" | "replicasets" | "rs" => "replicasets",
        other => bail!(
            "unknown resource type {other:?}: use pods, deployments, replicasets, nodes or events"
        ),
    })
}

pub fn server_config(listen: &str, opts: &NodeOpts) -> Result<ServerConfig> {
    let node_name = opts.node_name.clone().unwrap_or_else(default_node_name);
    let mut cfg = ServerConfig::new(listen, opts.data_dir.clone(), &node_name);
    cfg.max_pods = opts.max_pods;
    cfg.wasm_pool_slots = opts.wasm_pool_slots;
    cfg.wasm_pool_memory =
        parse_bytes(&opts.wasm_pool_memory).map_err(|e| anyhow!("--wasm-pool-memory: {e}"))?;
    cfg.wasm_default_memory_limit = parse_memory_limit(&opts.wasm_default_memory_limit)?;
    cfg.pod_netns = !opts.no_pod_netns;
    cfg.backoff.initial = opts.backoff_initial;
    cfg.backoff.max = opts.backoff_max;
    cfg.docker_host = (!opts.no_docker).then(|| opts.docker_host.clone());
    cfg.volume_check_interval = opts.volume_check_interval;
    if opts.node_lease_renew_interval.is_zero() {
        bail!("--node-lease-renew-interval must be more than 0");
    }
    cfg.node_lease_renew_interval = opts.node_lease_renew_interval;
    cfg.node_labels = opts.node_labels.iter().cloned().collect();
    cfg.node_taints = opts.node_taints.clone();
    Ok(cfg)
}

/// `--wasm-default-memory-limit`: a quantity; `0` or `none` for no limit.
pub fn parse_memory_limit(s: &str) -> Result<Option<u64>> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let bytes = parse_bytes(s).map_err(|e| anyhow!("--wasm-default-memory-limit: {e}"))?;
    Ok((bytes > 0).then_some(bytes))
}

pub fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_lowercase())
        .filter(|s| crate::model::validate::is_dns_subdomain(s))
        .unwrap_or_else(|| "kapsel-node".into())
}

pub async fn run(cli: Cli) -> Result<i32> {
    let client = Client::new(&cli.server);
    let ns = cli.namespace.clone();
    let server = cli.server.clone();
    match cli.command {
        Command::Serve {
            listen,
            node,
            api,
            cluster,
            lifecycle,
        } => {
            let mut cfg = server_config(&listen, &node)?;
            api.apply(&mut cfg);
            cluster.apply(&mut cfg)?;
            lifecycle.apply(&mut cfg)?;
            let server = Server::start(cfg.clone()).await?;
            eprintln!(
                "kapsel: API on http://{} · node {} · data in {}",
                server.addr,
                cfg.node_name,
                cfg.data_dir.display()
            );
            if let (Some(a), Some(t)) = (server.cluster_addr, &server.token_path) {
                let host = cluster
                    .cluster_advertise_address
                    .clone()
                    .unwrap_or_else(|| match a.ip() {
                        ip if ip.is_unspecified() => "<this-host>".into(),
                        ip => ip.to_string(),
                    });
                eprintln!(
                    "kapsel: cluster listener on https://{a} · add a node: kapsel agent --server https://{host}:{} --token $(cat {})",
                    a.port(),
                    t.display()
                );
            }
            shutdown_signal().await;
            eprintln!("kapsel: stopping pods…");
            server.shutdown();
            server.wait().await;
            Ok(0)
        }
        Command::Agent {
            token,
            node_ip,
            node,
        } => {
            let mut cfg = server_config("", &node)?;
            cfg.host_ip = node_ip;
            let agent = tokio::select! {
                a = crate::server::Agent::start(cfg.clone(), &server, token) => a?,
                _ = shutdown_signal() => return Ok(0),
            };
            eprintln!(
                "kapsel: node {} joined {} · data in {}",
                cfg.node_name,
                server,
                cfg.data_dir.display()
            );
            // Start-up is over: what it ran (argument parsing, the join) is not run again.
            match crate::runtime::residency::release_startup_pages() {
                Ok(n) => tracing::debug!(released = n, "start-up pages released"),
                Err(e) => tracing::debug!(error = %e, "start-up pages kept"),
            }
            shutdown_signal().await;
            eprintln!("kapsel: stopping pods…");
            agent.shutdown();
            agent.wait().await;
            Ok(0)
        }
        Command::Up {
            file,
            listen,
            data_dir,
            max_pods,
            api,
            wasm_default_memory_limit,
        } => {
            let wasm_limit = parse_memory_limit(&wasm_default_memory_limit)?;
            up::run(&file, &listen, data_dir, max_pods, &api, wasm_limit, &ns).await
        }
        Command::Apply { file, record } => {
            let mut manifests = manifest::load(&file)?;
            if record {
                record_change_cause(&mut manifests);
            }
            apply(&client, &manifests, &ns, |line| println!("{line}")).await?;
            Ok(0)
        }
        Command::Get {
            resource,
            name,
            output,
            selector,
            all_namespaces,
        } => {
            get(
                &client,
                &ns,
                &resource,
                name.as_deref(),
                output.as_deref(),
                selector.as_deref(),
                all_namespaces,
            )
            .await
        }
        Command::Describe { resource, name } => describe(&client, &ns, &resource, &name).await,
        Command::Logs {
            pod,
            container,
            follow,
            tail,
        } => logs(&client, &ns, &pod, container.as_deref(), follow, tail).await,
        Command::Exec {
            pod,
            container,
            stdin,
            tty,
            command,
        } => {
            let args = exec::ExecArgs {
                pod: &pod,
                container: container.as_deref(),
                stdin,
                tty,
                command,
            };
            exec::run(&client, &ns, args).await
        }
        Command::Delete {
            resource,
            name,
            file,
            wait,
            grace_period,
        } => delete(&client, &ns, resource, name, file, wait, grace_period).await,
        Command::GitSync { args } => git_sync(args).await,
        Command::RedisAmbassador { args } => redis_ambassador(args).await,
        Command::MetricsAdapter { args } => metrics_adapter(args).await,
        Command::Rollout { action } => rollout::run(&client, &ns, action).await,
        Command::Token { action } => token::run(&client, action).await,
        Command::Module { action } => match action {
            ModuleCmd::Push { file } => {
                println!("{}", modules::push(&client, &file).await?);
                Ok(0)
            }
            ModuleCmd::List => modules::list(&client).await.map(|()| 0),
        },
        Command::Cordon { node } => node::cordon(&client, &node, true).await,
        Command::Uncordon { node } => node::cordon(&client, &node, false).await,
        Command::Drain {
            node,
            force,
            timeout,
        } => node::drain(&client, &node, force, timeout).await,
        Command::Scale {
            target,
            name,
            replicas,
        } => {
            let target = match (target.as_str(), name) {
                ("deployment" | "deployments" | "deploy", Some(n)) => n,
                (_, Some(n)) => bail!("scale supports deployments, not {target:?} {n:?}"),
                (t, None) => t.to_string(),
            };
            rollout::scale(&client, &ns, &target, replicas).await
        }
    }
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Create, or update what may change; prints `pod/x created|configured|unchanged`.
pub async fn apply(
    client: &Client,
    manifests: &[Manifest],
    default_ns: &str,
    print: impl Fn(String),
) -> Result<()> {
    // Local modules go to the server's module store first; the objects name them by digest.
    let manifests = &modules::attach(client, manifests).await?;
    let results: Vec<Result<String>> = futures::stream::iter(manifests.iter().cloned())
        .map(|m| {
            let client = client.clone();
            let ns = m
                .namespace
                .clone()
                .unwrap_or_else(|| default_ns.to_string());
            async move {
                apply_one(&client, &m, &ns)
                    .await
                    .with_context(|| format!("{} ({})", m.source, m.name))
            }
        })
        .buffered(64)
        .collect()
        .await;
    let total = results.len();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(line) => print(line),
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.pop().unwrap()),
        n => {
            for e in &errors {
                eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            }
            Err(anyhow!("{n} of {total} objects were not applied"))
        }
    }
}

async fn apply_one(client: &Client, m: &Manifest, ns: &str) -> Result<String> {
    let resource = m.resource();
    let kind = m.kind.to_lowercase();
    match client.post(&path_for(resource, ns, None), &m.object).await {
        Ok(_) => return Ok(format!("{kind}/{} created", m.name)),
        Err(e) if e.code() == Some(409) && e.reason() == "AlreadyExists" => {}
        Err(e) => return Err(e.into()),
    }
    // A controller may write the object (its status) between our read and our write: retry.
    let mut tries = 0;
    loop {
        match update_one(client, m, ns).await {
            Err(e)
                if tries < 5
                    && e.downcast_ref::<client::ClientError>()
                        .map(|c| c.code() == Some(409) && c.reason() == "Conflict")
                        .unwrap_or(false) =>
            {
                tries += 1;
            }
            r => return r,
        }
    }
}

/// Read the stored object and replace it with the manifest's (unless nothing changed).
async fn update_one(client: &Client, m: &Manifest, ns: &str) -> Result<String> {
    let resource = m.resource();
    let kind = m.kind.to_lowercase();
    let cur = client.get(&path_for(resource, ns, Some(&m.name))).await?;
    if m.kind == "Pod" {
        let mut want: Pod = serde_json::from_value(m.object.clone())?;
        want.metadata.namespace = Some(ns.to_string());
        default_pod(&mut want);
        let cur_pod: Pod = serde_json::from_value(cur.clone())?;
        crate::model::taint::keep_default_tolerations(
            &mut want.spec.tolerations,
            &cur_pod.spec.tolerations,
        );
        let mut cur_spec = cur_pod.spec.clone();
        cur_spec.node_name = want.spec.node_name.clone();
        if cur_spec == want.spec
            && cur_pod.metadata.labels == want.metadata.labels
            && cur_pod.metadata.annotations == want.metadata.annotations
        {
            return Ok(format!("{kind}/{} unchanged", m.name));
        }
    }
    if m.kind == "Deployment" {
        use crate::api::deployments::Workload;
        let mut want: Deployment = serde_json::from_value(m.object.clone())?;
        want.defaults();
        let cur_d: Deployment = serde_json::from_value(cur.clone())?;
        if cur_d.spec == want.spec
            && cur_d.metadata.labels == want.metadata.labels
            && want
                .metadata
                .annotations
                .iter()
                .all(|(k, v)| cur_d.metadata.annotations.get(k) == Some(v))
        {
            return Ok(format!("deployment.apps/{} unchanged", m.name));
        }
    }
    let mut next = m.object.clone();
    if m.kind == "Deployment" {
        // Keep the annotations the controllers own (revision, promotion).
        if let Some(a) = cur["metadata"]["annotations"].as_object() {
            for (k, v) in a {
                if k.starts_with("deployment.") && next["metadata"]["annotations"][k].is_null() {
                    next["metadata"]["annotations"][k] = v.clone();
                }
            }
        }
    }
    next["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
    next["metadata"]["namespace"] = Value::String(ns.to_string());
    client
        .put(&path_for(resource, ns, Some(&m.name)), &next)
        .await?;
    Ok(format!("{kind}/{} configured", m.name))
}

async fn get(
    client: &Client,
    ns: &str,
    resource: &str,
    name: Option<&str>,
    output: Option<&str>,
    selector: Option<&str>,
    all_ns: bool,
) -> Result<i32> {
    let res = resource_name(resource)?;
    let mut path = if all_ns && name.is_none() && res != "nodes" {
        if matches!(res, "deployments" | "replicasets") {
            format!("/apis/apps/v1/{res}")
        } else {
            format!("/api/v1/{res}")
        }
    } else {
        path_for(res, ns, name)
    };
    if let Some(sel) = selector {
        path.push_str(&format!("?labelSelector={}", urlencode(sel)));
    }
    let v = client.get(&path).await?;
    match output {
        Some("json") | Some("yaml") => {
            print!("{}", output::render(&v, output.unwrap()));
            return Ok(0);
        }
        None | Some("wide") => {}
        Some(o) => bail!("unknown output format {o:?}: use wide, json or yaml"),
    }
    let wide = output == Some("wide");
    let items: Vec<Value> = if name.is_some() {
        vec![v]
    } else {
        v["items"].as_array().cloned().unwrap_or_default()
    };
    if items.is_empty() {
        eprintln!("No resources found in {ns} namespace.");
        return Ok(0);
    }
    let text = match res {
        "pods" => output::pods_table(&typed::<Pod>(items)?, wide, all_ns),
        "nodes" => output::nodes_table(&typed::<Node>(items)?, wide),
        "deployments" => output::deployments_table(&typed::<Deployment>(items)?, wide),
        "replicasets" => output::replicasets_table(&typed::<ReplicaSet>(items)?, wide),
        _ => {
            let mut evs: Vec<Event> = items
                .into_iter()
                .map(serde_json::from_value)
                .collect::<Result<_, _>>()?;
            evs.sort_by_key(|e| e.last_timestamp);
            output::events_table(&evs)
        }
    };
    print!("{text}");
    Ok(0)
}

/// The items of a list, as their type.
fn typed<T: serde::de::DeserializeOwned>(items: Vec<Value>) -> Result<Vec<T>> {
    Ok(items
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<_, _>>()?)
}

pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn describe(client: &Client, ns: &str, resource: &str, name: &str) -> Result<i32> {
    match resource_name(resource)? {
        "pods" => {
            let pod: Pod =
                serde_json::from_value(client.get(&path_for("pods", ns, Some(name))).await?)?;
            let evs = client.get(&path_for("events", ns, None)).await?;
            let mut events: Vec<Event> = evs["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|e| serde_json::from_value::<Event>(e).ok())
                .filter(|e| e.involved_object.uid == pod.uid())
                .collect();
            events.sort_by_key(|e| e.first_timestamp);
            // The built-ins' own status; a server without it (or a pod on no node yet) shows
            // none.
            let builtins = client
                .get(&format!(
                    "{}/builtins",
                    path_for("pods", ns, Some(pod.name()))
                ))
                .await
                .unwrap_or_default();
            print!("{}", output::describe_pod(&pod, &events, &builtins));
        }
        "nodes" => {
            let node: Node =
                serde_json::from_value(client.get(&path_for("nodes", ns, Some(name))).await?)?;
            let pods = client
                .get(&format!(
                    "/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
                    urlencode(name)
                ))
                .await?;
            let pods: Vec<Pod> = pods["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| serde_json::from_value(p).ok())
                .collect();
            print!("{}", output::describe_node(&node, &pods));
        }
        "deployments" => {
            let d: Deployment = serde_json::from_value(
                client.get(&path_for("deployments", ns, Some(name))).await?,
            )?;
            let uid = d.metadata.uid.clone().unwrap_or_default();
            let rss: Vec<ReplicaSet> = client.get(&path_for("replicasets", ns, None)).await?
                ["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|r| serde_json::from_value::<ReplicaSet>(r).ok())
                .filter(|r| r.metadata.owner_references.iter().any(|o| o.uid == uid))
                .collect();
            let evs = client.get(&path_for("events", ns, None)).await?;
            let mut events: Vec<Event> = evs["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|e| serde_json::from_value::<Event>(e).ok())
                .filter(|e| e.involved_object.uid == uid)
                .collect();
            events.sort_by_key(|e| e.first_timestamp);
            print!("{}", output::describe_deployment(&d, &rss, &events));
        }
        other => bail!("describe supports pods, deployments and nodes, not {other}"),
    }
    Ok(0)
}

async fn logs(
    client: &Client,
    ns: &str,
    pod: &str,
    container: Option<&str>,
    follow: bool,
    tail: Option<usize>,
) -> Result<i32> {
    let mut path = format!("{}/log?follow={follow}", path_for("pods", ns, Some(pod)));
    if let Some(c) = container {
        path.push_str(&format!("&container={}", urlencode(c)));
    }
    if let Some(t) = tail {
        path.push_str(&format!("&tailLines={t}"));
    }
    let resp = client.stream(&path).await?;
    let mut body = resp.bytes_stream();
    let mut out = tokio::io::stdout();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("log stream interrupted")?;
        out.write_all(&chunk).await?;
        out.flush().await?;
    }
    Ok(0)
}

async fn delete(
    client: &Client,
    ns: &str,
    resource: Option<String>,
    name: Option<String>,
    file: Option<PathBuf>,
    wait: bool,
    grace: Option<i64>,
) -> Result<i32> {
    let mut targets: Vec<(String, String, String)> = Vec::new();
    if let Some(f) = file {
        for m in manifest::load(&f)? {
            let ns = m.namespace.clone().unwrap_or_else(|| ns.to_string());
            targets.push((m.resource().to_string(), ns, m.name.clone()));
        }
    } else {
        let (Some(r), Some(n)) = (resource, name) else {
            bail!("usage: kapsel delete pod|node NAME, or kapsel delete -f FILE");
        };
        let r = resource_name(&r)?;
        targets.push((r.to_string(), ns.to_string(), n));
    }
    let mut failed = false;
    for (res, ns, name) in &targets {
        let mut path = path_for(res, ns, Some(name));
        if let Some(g) = grace {
            path.push_str(&format!("?gracePeriodSeconds={g}"));
        }
        match client.delete(&path).await {
            Ok(_) => {}
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
                continue;
            }
        }
        if wait {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                match client.get(&path_for(res, ns, Some(name))).await {
                    Err(e) if e.code() == Some(404) => break,
                    Err(e) => return Err(e.into()),
                    Ok(_) if Instant::now() > deadline => {
                        bail!("{res}/{name} is still terminating after 120s")
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        println!("{} \"{name}\" deleted", res.trim_end_matches('s'));
    }
    Ok(if failed { 1 } else { 0 })
}

/// `kapsel redis-ambassador`: the ambassador on this machine's network.
async fn redis_ambassador(args: Vec<String>) -> Result<i32> {
    use crate::patterns::redis::{bind_std, Ambassador, Config};
    use std::sync::Arc;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = match Config::parse(&args, &env) {
        Ok(cfg) => cfg,
        // `--help`: the flags on stdout, success; a bad flag: clap's line naming it, usage (2).
        Err(e) => match e.help_text() {
            Some(help) => {
                print!("{help}");
                return Ok(0);
            }
            None => {
                eprintln!("error: {e}");
                return Ok(2);
            }
        },
    };
    let bind = |a: &str| -> Result<std::net::TcpListener> {
        bind_std(a).map_err(|e| anyhow!("redis-ambassador: cannot listen on {a}: {e}"))
    };
    let listener = bind(&cfg.listen)?;
    let metrics = cfg.metrics_listen.as_deref().map(bind).transpose()?;
    let amb =
        Ambassador::new(cfg, Arc::new(|m: &str| eprint!("{m}"))).context("redis-ambassador")?;
    let stop = tokio_util::sync::CancellationToken::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        s2.cancel();
    });
    let _ = amb.spawn_thread(listener, metrics, stop)?.await;
    Ok(0)
}

/// `kapsel metrics-adapter`: the adapter on this machine's network and filesystem. `--help`
/// prints to stdout (exit 0); a bad flag is one line on stderr (exit 2).
async fn metrics_adapter(args: Vec<String>) -> Result<i32> {
    use crate::patterns::adapter::{bind_std, error_chain, Adapter, Config};
    use crate::patterns::flags::FlagError;
    use std::sync::Arc;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = match Config::parse(&args, &env) {
        Ok(c) => c,
        Err(FlagError::Help(text)) => {
            print!("{text}");
            return Ok(0);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    let (udp, http) = bind_std(&cfg).map_err(|e| anyhow!("metrics-adapter: cannot listen: {e}"))?;
    let a = Adapter::new(
        cfg,
        Arc::new(|p: &str| Some(std::path::PathBuf::from(p))),
        Arc::new(|m: &str| eprint!("{m}")),
    )
    .map_err(|e| anyhow!("metrics-adapter: {}", error_chain(&e)))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        s2.cancel();
    });
    let udp = udp.map(tokio::net::UdpSocket::from_std).transpose()?;
    Arc::new(a)
        .serve(udp, tokio::net::TcpListener::from_std(http)?, stop)
        .await;
    Ok(0)
}

/// `kapsel git-sync`: the sidecar's sync loop on this machine's filesystem.
async fn git_sync(args: Vec<String>) -> Result<i32> {
    use crate::patterns::flags::FlagError;
    use crate::patterns::gitsync::{
        redact, BeneathFile, Config, ConfigError, GitSync, HookRunner, Paths, Stats,
    };
    use std::sync::Arc;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = match Config::parse(&args, &env) {
        Ok(cfg) => cfg,
        Err(ConfigError::Flags(FlagError::Help(text))) => {
            print!("{text}");
            return Ok(0);
        }
        // A usage error: one line naming the flag, exit 2 (as clap and Go's flag package).
        Err(e) => {
            eprintln!("error: {}", redact(&e.to_string()).replace('\n', " "));
            return Ok(2);
        }
    };
    // On this machine the caller's paths are trusted; git's own directory is `<root>/.git-sync`.
    let file = |p: &Option<std::path::PathBuf>| {
        p.as_ref().map(|p| {
            let p = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            BeneathFile {
                base: "/".into(),
                rel: p.strip_prefix("/").unwrap_or(&p).to_path_buf(),
            }
        })
    };
    let paths = Paths {
        volume: cfg.root.clone(),
        root_rel: Default::default(),
        private: cfg.root.join(".git-sync"),
        password_file: file(&cfg.password_file),
        ssh_key_file: file(&cfg.ssh_key_file),
        ssh_known_hosts_file: file(&cfg.ssh_known_hosts_file),
    };
    std::fs::create_dir_all(&cfg.root)?;
    let sync = GitSync::new(
        cfg,
        paths,
        Arc::new(|m: &str| eprint!("{m}")),
        Arc::new(|_: &str| {}),
        Arc::new(Stats::default()),
        HookRunner::Local { env },
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        s2.cancel();
    });
    sync.run(stop, None)
        .await
        .map_err(|e| anyhow::Error::new(e).context("git-sync"))?;
    Ok(0)
}

/// `apply --record`: this command line becomes each Deployment's `kubernetes.io/change-cause`
/// (the manifest's own annotation wins), as kubectl's `--record` did.
fn record_change_cause(manifests: &mut [Manifest]) {
    let cause = std::iter::once("kapsel".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    for m in manifests.iter_mut().filter(|m| m.kind == "Deployment") {
        let meta = &mut m.object["metadata"];
        if !meta["annotations"].is_object() {
            meta["annotations"] = serde_json::json!({});
        }
        let ann = &mut meta["annotations"];
        if ann
            .get(crate::model::deployment::CHANGE_CAUSE_ANNOTATION)
            .is_none()
        {
            ann[crate::model::deployment::CHANGE_CAUSE_ANNOTATION] = cause.clone().into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_server_url;

    #[test]
    fn server_urls_with_or_without_scheme() {
        assert_eq!(
            parse_server_url("127.0.0.1:7070").unwrap(),
            "http://127.0.0.1:7070"
        );
        assert_eq!(
            parse_server_url("http://localhost:7070/").unwrap(),
            "http://localhost:7070"
        );
        assert_eq!(
            parse_server_url("https://[::1]:6443").unwrap(),
            "https://[::1]:6443"
        );
        let e = parse_server_url("http://127.0.0.1:7070/api").unwrap_err();
        assert!(
            e.contains("no path") && e.contains("http://127.0.0.1:7070"),
            "{e}"
        );
        let e = parse_server_url("ftp://h:1").unwrap_err();
        assert!(e.contains("scheme"), "{e}");
        assert!(parse_server_url("http://u:p@h:1").is_err());
        assert!(parse_server_url("http://:7070").is_err());
    }
}
