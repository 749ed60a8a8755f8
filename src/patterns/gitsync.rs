//! `builtin/git-sync`: keeps a directory in a pod volume in sync with a git repository, with
//! kubernetes/git-sync v4's flags and `GITSYNC_*` variables. It drives the git CLI (as
//! git-sync does), and never on anything the pod can write:
//! - the repository (a bare git directory), git's `HOME`, the staging checkouts and the
//!   credential helper live in a node-private directory (mode 0700, under the pod's directory on
//!   the node, in no volume). Every git command gets that directory as `GIT_DIR` explicitly, a
//!   cleared environment, no system or global config, and `-c` overrides that allow only the
//!   http(s), ssh, git and (not from submodules) file transports, no hooks and no fsmonitor;
//! - each synced commit is checked out in the private directory, then moved (or, across
//!   filesystems, copied) to `<root>/.worktrees/<hash>` in the volume; `<root>/<link>` is a
//!   relative symlink flipped atomically (a new link renamed over the old one) to it, so a reader
//!   never sees a partial tree. Old worktrees go after the flip. Every file operation in the
//!   volume goes through a directory handle (cap-std) that cannot leave it: a symlink a guest
//!   planted at `.worktrees`, at the link or along `--root` is replaced, never followed out;
//! - credentials (`--password`, `--password-file`, `user:pass@` in `--repo`) reach git only
//!   through the environment of its process and a node-private askpass script, never its argv;
//!   URLs are stripped of them before use and redacted (`user:***@`) in every message;
//! - `--exechook-command` runs where the pod runs: [`HookRunner::InPod`] execs it in an OCI
//!   member of the pod (see `patterns::start_gitsync`), never on the node.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clap::ArgAction;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::flags::{self, FlagError};

/// A secret value: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// git-sync's configuration, from flags and `GITSYNC_*` environment variables.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The repository URL, without any credentials it came with (they move to `username` and
    /// `password`).
    pub repo: String,
    pub git_ref: String,
    pub root: PathBuf,
    pub link: String,
    pub period: Duration,
    pub depth: u32,
    pub one_time: bool,
    /// Consecutive failures tolerated before exiting; -1 retries forever.
    pub max_failures: i64,
    pub sync_timeout: Duration,
    /// `recursive`, `shallow` or `off`.
    pub submodules: String,
    pub exechook_command: Option<String>,
    pub exechook_timeout: Duration,
    /// Wait between attempts of a failed exechook (and while no pod member can run it yet).
    pub exechook_backoff: Duration,
    pub webhook_url: Option<String>,
    pub webhook_method: String,
    pub webhook_success_status: u16,
    pub username: Option<String>,
    /// `--password` / `GITSYNC_PASSWORD`, or the password of `--repo`'s userinfo.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub ssh_key_file: Option<PathBuf>,
    pub ssh_known_hosts: bool,
    pub ssh_known_hosts_file: Option<PathBuf>,
    pub http_bind: Option<String>,
}

/// git-sync v4's flags and `GITSYNC_*` variables, as [`flags::parse`] reads them. Values that
/// need checking beyond their type become a [`Config`] in [`Config::parse`].
#[derive(clap::Parser, Debug)]
#[command(
    about = "Keep a directory in sync with a git repository (kubernetes/git-sync v4 flags; each flag also reads GITSYNC_<FLAG>, e.g. GITSYNC_REPO).",
    after_help = "Durations are Go's: 10s, 1m30s, 1.5s, 500ms (a bare number is seconds, as git-sync v3 took). Booleans: --one-time, --one-time=true, --one-time=false."
)]
struct Flags {
    /// The git repository to sync from (URL or path); required.
    #[arg(long, env = "GITSYNC_REPO", value_name = "URL")]
    repo: Option<String>,
    /// The git revision (branch, tag or commit) to sync.
    #[arg(long = "ref", env = "GITSYNC_REF", default_value = "HEAD")]
    git_ref: String,
    /// The root directory for git-sync operations (absolute, in a volume); required.
    #[arg(long, env = "GITSYNC_ROOT", value_name = "DIR")]
    root: Option<String>,
    /// The name of the symlink to the current worktree, under --root (default: the repo's
    /// name).
    #[arg(long, env = "GITSYNC_LINK")]
    link: Option<String>,
    /// How long to wait between syncs (at least 10ms).
    #[arg(long, env = "GITSYNC_PERIOD", value_parser = gitsync_duration, default_value = "10s")]
    period: Duration,
    /// Create a shallow clone with this many commits; 0 for the whole history.
    #[arg(long, env = "GITSYNC_DEPTH", default_value_t = 1)]
    depth: u32,
    /// Sync once, then exit.
    #[arg(long, env = "GITSYNC_ONE_TIME", value_parser = flags::bool_flag, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, default_value = "false")]
    one_time: bool,
    /// Consecutive sync failures tolerated before exiting; -1 retries forever.
    #[arg(
        long,
        env = "GITSYNC_MAX_FAILURES",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    max_failures: i64,
    /// The total time allowed for one sync.
    #[arg(long, env = "GITSYNC_SYNC_TIMEOUT", value_parser = gitsync_duration, default_value = "120s")]
    sync_timeout: Duration,
    /// Submodules: recursive, shallow or off.
    #[arg(long, env = "GITSYNC_SUBMODULES", default_value = "recursive",
          value_parser = ["recursive", "shallow", "off"])]
    submodules: String,
    /// A command run (with `sh -c`, in an OCI member of the pod) in each new worktree, with
    /// GITSYNC_HASH set.
    #[arg(long, env = "GITSYNC_EXECHOOK_COMMAND", value_name = "COMMAND")]
    exechook_command: Option<String>,
    /// The time allowed for one run of the exechook.
    #[arg(long, env = "GITSYNC_EXECHOOK_TIMEOUT", value_parser = gitsync_duration, default_value = "30s")]
    exechook_timeout: Duration,
    /// The wait between attempts of a failed exechook (at least 100ms).
    #[arg(long, env = "GITSYNC_EXECHOOK_BACKOFF", value_parser = gitsync_duration, default_value = "3s")]
    exechook_backoff: Duration,
    /// A URL notified (with a Gitsync-Hash header) after each new worktree.
    #[arg(long, env = "GITSYNC_WEBHOOK_URL", value_name = "URL")]
    webhook_url: Option<String>,
    /// The HTTP method of the webhook.
    #[arg(long, env = "GITSYNC_WEBHOOK_METHOD", default_value = "POST")]
    webhook_method: String,
    /// The HTTP status the webhook must answer.
    #[arg(long, env = "GITSYNC_WEBHOOK_SUCCESS_STATUS", default_value_t = 200)]
    webhook_success_status: u16,
    /// The username for git authentication.
    #[arg(long, env = "GITSYNC_USERNAME")]
    username: Option<String>,
    /// The password or personal access token for git authentication (prefer --password-file).
    #[arg(long, env = "GITSYNC_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// A file (in a volume) holding the password.
    #[arg(long, env = "GITSYNC_PASSWORD_FILE", value_name = "FILE")]
    password_file: Option<String>,
    /// The SSH private key (in a volume) for git over ssh.
    #[arg(long, env = "GITSYNC_SSH_KEY_FILE", value_name = "FILE")]
    ssh_key_file: Option<String>,
    /// Check the SSH host key.
    #[arg(long, env = "GITSYNC_SSH_KNOWN_HOSTS", value_parser = flags::bool_flag, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, default_value = "true")]
    ssh_known_hosts: bool,
    /// The known_hosts file (in a volume) for --ssh-known-hosts.
    #[arg(long, env = "GITSYNC_SSH_KNOWN_HOSTS_FILE", value_name = "FILE")]
    ssh_known_hosts_file: Option<String>,
    /// Serve readiness (`/`) and Prometheus metrics (`/metrics`) on this address in the pod.
    #[arg(long, env = "GITSYNC_HTTP_BIND", value_name = "ADDR")]
    http_bind: Option<String>,
    /// Serve metrics on --http-bind (always on here; accepted for compatibility).
    #[arg(long, env = "GITSYNC_HTTP_METRICS", value_parser = flags::bool_flag, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set, default_value = "true")]
    http_metrics: bool,
    /// Log verbosity (accepted for compatibility; git-sync logs each sync and failure).
    #[arg(long, env = "GITSYNC_VERBOSE", value_name = "LEVEL")]
    verbose: Option<String>,
    /// Log verbosity, as `-v=N` (accepted for compatibility).
    #[arg(
        short = 'v',
        long = "v",
        env = "GITSYNC_V",
        value_name = "LEVEL",
        hide = true
    )]
    v: Option<String>,
}

/// A duration as git-sync takes it: Go's forms through [`flags::duration`], and a bare number
/// of seconds (git-sync v3's `--wait`).
fn gitsync_duration(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}")),
        Err(_) => flags::duration(s),
    }
}

/// Go-style durations (`10s`, `1m30s`, `1.5s`, a bare number of seconds): [`flags::duration`]
/// plus v3's bare seconds. Kept for the ambassador's and the adapter's parsers until they move
/// to [`flags`].
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    if s.trim().is_empty() {
        return Err(format!("invalid duration {s:?} (examples: 10s, 1m, 500ms)"));
    }
    gitsync_duration(s)
}

/// Why git-sync's configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--help`, or a flag or variable the parser refused (unknown, malformed, missing value).
    #[error(transparent)]
    Flags(#[from] FlagError),
    #[error("git-sync: required flag missing: --{flag} (or {var})")]
    Missing {
        flag: &'static str,
        var: &'static str,
    },
    /// A value of the right type that git-sync does not accept.
    #[error("git-sync: --{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

/// Go's flag package takes long flags with one dash (`-repo=URL`), and git-sync users write
/// them so: those become `--repo=URL`. Short flags (`-v 5`, `-h`) stay as they are.
fn go_style_long_flags(args: &[String]) -> Vec<String> {
    use clap::CommandFactory;
    let cmd = Flags::command();
    let longs: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
    args.iter()
        .map(|a| match a.strip_prefix('-') {
            Some(rest) if !rest.starts_with('-') => {
                let name = rest.split('=').next().unwrap_or_default();
                if name.len() > 1 && (longs.contains(&name) || name == "help") {
                    format!("-{a}")
                } else {
                    a.clone()
                }
            }
            _ => a.clone(),
        })
        .collect()
}

impl Config {
    /// Parse args (`--flag=value`, `--flag value`, Go's `-flag=value`) over `GITSYNC_*`
    /// variables (flags win; an empty variable counts as unset, as in git-sync).
    pub fn parse(args: &[String], env: &[(String, String)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .filter(|(k, v)| k.starts_with("GITSYNC_") && !v.is_empty())
            .cloned()
            .collect();
        let f: Flags = flags::parse("git-sync", &go_style_long_flags(args), &env)?;
        let given = |v: Option<String>| v.filter(|s| !s.is_empty());
        let invalid = |flag: &'static str, reason: String| ConfigError::Invalid { flag, reason };
        let repo = given(f.repo).ok_or(ConfigError::Missing {
            flag: "repo",
            var: "GITSYNC_REPO",
        })?;
        if repo.starts_with('-') {
            return Err(invalid(
                "repo",
                "must be a URL or a path, not start with '-'".into(),
            ));
        }
        let (repo, url_user, url_password) = split_credentials(&repo);
        let root = PathBuf::from(given(f.root).ok_or(ConfigError::Missing {
            flag: "root",
            var: "GITSYNC_ROOT",
        })?);
        if !root.is_absolute() {
            return Err(invalid(
                "root",
                format!("must be an absolute path, got {:?}", root.display()),
            ));
        }
        let default_link = repo
            .trim_end_matches('/')
            .rsplit(['/', ':'])
            .next()
            .unwrap_or("repo")
            .trim_end_matches(".git")
            .to_string();
        let link = given(f.link).unwrap_or(default_link);
        if link.split('/').any(|p| p == "..")
            || link.starts_with('/') && !Path::new(&link).starts_with(&root)
        {
            return Err(invalid("link", format!("{link:?} must stay inside --root")));
        }
        if f.period < Duration::from_millis(10) {
            return Err(invalid("period", "must be at least 10ms".into()));
        }
        let git_ref = Some(f.git_ref)
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "HEAD".into());
        if git_ref.starts_with('-') {
            return Err(invalid(
                "ref",
                format!("{git_ref:?} must not start with '-'"),
            ));
        }
        let username = given(f.username).or(url_user);
        let password = given(f.password).or(url_password).map(Secret);
        let password_file = given(f.password_file).map(PathBuf::from);
        if password.is_some() && password_file.is_some() {
            return Err(invalid(
                "password-file",
                "only one of --password (or credentials in --repo) and --password-file may be set"
                    .into(),
            ));
        }
        if (password.is_some() || password_file.is_some()) && username.is_none() {
            return Err(invalid(
                "username",
                "--password and --password-file need --username".into(),
            ));
        }
        Ok(Config {
            repo,
            git_ref,
            root,
            link,
            period: f.period,
            depth: f.depth,
            one_time: f.one_time,
            max_failures: f.max_failures,
            sync_timeout: f.sync_timeout,
            submodules: f.submodules,
            exechook_command: given(f.exechook_command),
            exechook_timeout: f.exechook_timeout,
            exechook_backoff: f.exechook_backoff.max(Duration::from_millis(100)),
            webhook_url: given(f.webhook_url),
            webhook_method: Some(f.webhook_method)
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "POST".into()),
            webhook_success_status: f.webhook_success_status,
            username,
            password,
            password_file,
            ssh_key_file: given(f.ssh_key_file).map(PathBuf::from),
            ssh_known_hosts: f.ssh_known_hosts,
            ssh_known_hosts_file: given(f.ssh_known_hosts_file).map(PathBuf::from),
            http_bind: given(f.http_bind),
        })
    }

    pub fn link_path(&self) -> PathBuf {
        self.root.join(&self.link)
    }
}

/// Split `scheme://user:password@host/...` into the URL without the password (and, for http(s),
/// without the user: git gets both from the askpass helper), the user and the password.
/// scp-like `user@host:path` and URLs without userinfo come back unchanged.
pub fn split_credentials(url: &str) -> (String, Option<String>, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None, None);
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..auth_end].rfind('@') else {
        return (url.to_string(), None, None);
    };
    let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (u, Some(percent_decode(p))),
        None => (userinfo, None),
    };
    let user = (!user.is_empty()).then(|| percent_decode(user));
    let http = matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https");
    let stripped = match (&user, http) {
        // ssh and friends take the user from the URL (and no password at all).
        (Some(_), false) => format!(
            "{scheme}://{}@{host}",
            &userinfo[..userinfo.find(':').unwrap_or(userinfo.len())]
        ),
        _ => format!("{scheme}://{host}"),
    };
    (stripped, user, password)
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every `scheme://user:password@` in `text` becomes `scheme://user:***@`: what git-sync says
/// (logs, events, statuses) never carries a password.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (before, after) = rest.split_at(i + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| {
                c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"' || c == '\''
            })
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Map a guest path (inside the container's mounts) to the host path; None if outside.
pub fn host_path(mounts: &[(PathBuf, String)], guest: &Path) -> Option<PathBuf> {
    split_mount(mounts, guest).map(|(base, rel)| base.join(rel))
}

/// The mount holding a guest path: (its host directory, the path relative to it). None if
/// outside every mount or climbing with `..`.
pub fn split_mount(mounts: &[(PathBuf, String)], guest: &Path) -> Option<(PathBuf, PathBuf)> {
    if guest.components().any(|c| c == Component::ParentDir) {
        return None;
    }
    mounts
        .iter()
        .filter(|(_, g)| guest.starts_with(g))
        .max_by_key(|(_, g)| g.len())
        .map(|(h, g)| {
            (
                h.clone(),
                guest.strip_prefix(g).unwrap_or(Path::new("")).to_path_buf(),
            )
        })
}

/// A file inside a directory Kapsel trusts (a volume's host directory), read through a handle
/// on that directory: a symlink in it cannot lead the read out of it.
#[derive(Debug, Clone, PartialEq)]
pub struct BeneathFile {
    pub base: PathBuf,
    pub rel: PathBuf,
}

impl BeneathFile {
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        let dir = cap_std::fs::Dir::open_ambient_dir(&self.base, cap_std::ambient_authority())?;
        dir.read(&self.rel)
    }
}

/// Where git-sync works on the node.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The volume's host directory holding `--root` (made by Kapsel, trusted).
    pub volume: PathBuf,
    /// `--root` relative to `volume`.
    pub root_rel: PathBuf,
    /// The node-private directory (0700): git directory, HOME, staging, askpass helper.
    pub private: PathBuf,
    pub password_file: Option<BeneathFile>,
    pub ssh_key_file: Option<BeneathFile>,
    pub ssh_known_hosts_file: Option<BeneathFile>,
}

/// Create `dir` (and missing parents) and make it 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// What git-sync reports (its `/metrics`, readiness, and `kapsel describe pod`).
#[derive(Default)]
pub struct Stats {
    pub success: AtomicU64,
    pub errors: AtomicU64,
    pub last_duration_ms: AtomicU64,
    pub synced_once: std::sync::atomic::AtomicBool,
    pub last: std::sync::Mutex<LastSync>,
}

/// The latest outcomes of git-sync's syncs.
#[derive(Debug, Default, Clone)]
pub struct LastSync {
    /// The commit the link points to.
    pub commit: Option<String>,
    /// When the link last moved (to `commit`).
    pub synced_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the last successful sync ended (whether or not the link moved).
    pub checked_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The last failure: when, and why (redacted).
    pub error: Option<(chrono::DateTime<chrono::Utc>, String)>,
}

/// What an exechook printed and how it ended.
#[derive(Debug, Clone)]
pub struct HookOutput {
    pub exit_code: i64,
    pub output: String,
    /// Where it ran (a container's name), for the log.
    pub ran_in: String,
}

/// Why an exechook did not run to success.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HookError {
    /// Nothing can run it yet (no pod member up): tried again later, not reported as a failure.
    #[error("{0}")]
    NotYet(String),
    #[error("{0}")]
    Failed(String),
}

/// Runs exechooks inside the pod (an OCI member that mounts the volume).
#[async_trait]
pub trait PodExec: Send + Sync {
    /// Run `sh -c command` with `GITSYNC_HASH=hash`, in the worktree `worktree` (a host path
    /// in the volume) as that member sees it.
    async fn run_hook(
        &self,
        command: &str,
        worktree: &Path,
        hash: &str,
        timeout: Duration,
    ) -> Result<HookOutput, HookError>;
}

/// Where `--exechook-command` runs.
pub enum HookRunner {
    /// `kapsel git-sync` run by hand: on this machine, as its user, with its environment (as
    /// upstream git-sync runs hooks in its own container).
    Local { env: Vec<(String, String)> },
    /// In a pod: inside a member of the pod, never on the node.
    InPod(Arc<dyn PodExec>),
}

/// Environment variables of Kapsel's own that git may see (proxies, CA bundles); nothing else.
const PASSED_ENV: &[&str] = &[
    "PATH",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GIT_SSL_CAINFO",
];

/// `-c` settings on every git command: they win over any config file.
const LOCKDOWN: &[&str] = &[
    "protocol.allow=never",
    "protocol.https.allow=always",
    "protocol.http.allow=always",
    "protocol.git.allow=always",
    "protocol.ssh.allow=always",
    // `user`: the --repo URL may be a path; a submodule may not reach into the node's disk.
    "protocol.file.allow=user",
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "credential.helper=",
    "gc.autoDetach=false",
    "maintenance.autoDetach=false",
];

/// Answers git's username and password prompts from the environment git was given.
const ASKPASS: &str = "#!/bin/sh\ncase \"$1\" in\n  Username*) printf '%s\\n' \"$GITSYNC_ASKPASS_USERNAME\" ;;\n  Password*) printf '%s\\n' \"$GITSYNC_ASKPASS_PASSWORD\" ;;\n  *) exit 1 ;;\nesac\n";

/// The sync loop, with host paths already resolved.
pub struct GitSync {
    pub cfg: Config,
    pub paths: Paths,
    pub log: Arc<dyn Fn(&str) + Send + Sync>,
    pub warn: Arc<dyn Fn(&str) + Send + Sync>,
    pub stats: Arc<Stats>,
    pub hooks: HookRunner,
    /// The private repository exists and knows its origin.
    initialised: std::sync::atomic::AtomicBool,
}

/// Why a sync (or git-sync as a whole) failed. Every message is free of credentials.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A file operation on the node (git-sync's private directory, the volume).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A git command failed; its stderr, redacted.
    #[error("git {args}: {stderr}")]
    Git { args: String, stderr: String },
    #[error("git {command} timed out after {timeout:?}")]
    GitTimeout { command: String, timeout: Duration },
    #[error("git rev-parse gave {0:?}, not a commit hash")]
    NotACommit(String),
    #[error("--link {0:?} names no file")]
    LinkNamesNoFile(String),
    /// `--max-failures` consecutive failures: git-sync gives up.
    #[error("too many failures ({failures} > --max-failures={max}): {last}")]
    TooManyFailures {
        failures: i64,
        max: i64,
        #[source]
        last: Arc<SyncError>,
    },
}

/// Wraps an io error with what was being done.
fn err(what: &str) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::Io {
        what: what.to_string(),
        source,
    }
}

fn io_kind(e: &std::io::Error, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
}

/// `dir/name` as a real directory: a symlink or a file a guest put there is removed (never
/// followed), a missing one created. Returns a handle on it.
fn real_dir(dir: &cap_std::fs::Dir, name: &std::ffi::OsStr) -> std::io::Result<cap_std::fs::Dir> {
    match dir.symlink_metadata(name) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            dir.remove_file(name)?;
            dir.create_dir(name)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir.create_dir(name)?,
        Err(e) => return Err(e),
    }
    dir.open_dir(name)
}

/// Walk `rel` below `dir` component by component with [`real_dir`].
fn real_dirs(dir: &cap_std::fs::Dir, rel: &Path) -> std::io::Result<cap_std::fs::Dir> {
    let mut d = dir.try_clone()?;
    for c in rel.components() {
        match c {
            Component::Normal(name) => d = real_dir(&d, name)?,
            Component::CurDir => {}
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{} leaves its directory", rel.display()),
                ))
            }
        }
    }
    Ok(d)
}

/// Remove `name` in `dir` whatever it is, without following it.
fn remove_any(dir: &cap_std::fs::Dir, name: &Path) -> std::io::Result<()> {
    match dir.symlink_metadata(name) {
        Ok(m) if m.is_dir() => dir.remove_dir_all(name),
        Ok(_) => dir.remove_file(name),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copy the private tree `src` to `name` in `dst` (another filesystem), symlinks as symlinks.
fn copy_tree(src: &Path, dst: &cap_std::fs::Dir, name: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    dst.create_dir(name)?;
    let out = dst.open_dir(name)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let t = e.file_type()?;
        let n = PathBuf::from(e.file_name());
        if t.is_dir() {
            copy_tree(&e.path(), &out, &n)?;
        } else if t.is_symlink() {
            out.symlink_contents(std::fs::read_link(e.path())?, &n)?;
        } else if t.is_file() {
            let mut from = std::fs::File::open(e.path())?;
            let mut to = out.create(&n)?;
            std::io::copy(&mut from, &mut to)?;
            let mode = e.metadata()?.permissions().mode() & 0o777;
            out.set_permissions(
                &n,
                cap_std::fs::Permissions::from_std(std::fs::Permissions::from_mode(mode)),
            )?;
        }
    }
    Ok(())
}

impl GitSync {
    pub fn new(
        cfg: Config,
        paths: Paths,
        log: Arc<dyn Fn(&str) + Send + Sync>,
        warn: Arc<dyn Fn(&str) + Send + Sync>,
        stats: Arc<Stats>,
        hooks: HookRunner,
    ) -> Self {
        GitSync {
            cfg,
            paths,
            log,
            warn,
            stats,
            hooks,
            initialised: Default::default(),
        }
    }

    fn say(&self, m: &str) {
        (self.log)(&redact(m));
    }

    fn alarm(&self, m: &str) {
        (self.warn)(&redact(m));
    }

    fn git_dir(&self) -> PathBuf {
        self.paths.private.join("repo.git")
    }

    /// The link, relative to `--root`.
    fn link_rel(&self) -> PathBuf {
        let l = Path::new(&self.cfg.link);
        l.strip_prefix(&self.cfg.root).unwrap_or(l).to_path_buf()
    }

    /// `<root>/.worktrees/<hash>` on the host.
    fn worktree_path(&self, hash: &str) -> PathBuf {
        self.paths
            .volume
            .join(&self.paths.root_rel)
            .join(".worktrees")
            .join(hash)
    }

    /// A handle on `--root` in the volume, every directory on the way made real.
    fn root_dir(&self) -> Result<cap_std::fs::Dir, SyncError> {
        let vol =
            cap_std::fs::Dir::open_ambient_dir(&self.paths.volume, cap_std::ambient_authority())
                .map_err(err("opening the volume"))?;
        real_dirs(&vol, &self.paths.root_rel).map_err(err("opening --root in the volume"))
    }

    /// A git command on the private repository: cleared environment, no config but the
    /// repository's own (private) and the lock-down overrides. `work`: a private staging
    /// checkout to work on.
    fn git(&self, creds: Option<&(String, String)>, work: Option<&Path>) -> Command {
        let p = &self.paths.private;
        let mut c = Command::new("git");
        c.env_clear();
        for k in PASSED_ENV {
            if let Some(v) = std::env::var_os(k) {
                c.env(k, v);
            }
        }
        if std::env::var_os("PATH").is_none() {
            c.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }
        c.env("HOME", p.join("home"))
            .env("XDG_CONFIG_HOME", p.join("home/.config"))
            .env("LC_ALL", "C")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_ATTR_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", p.join("askpass"))
            .env("GIT_DIR", self.git_dir());
        match work {
            Some(w) => {
                c.env("GIT_WORK_TREE", w)
                    .env("GIT_INDEX_FILE", p.join("index"))
                    .current_dir(w);
            }
            None => {
                c.current_dir(p);
            }
        }
        if let Some((user, pass)) = creds {
            c.env("GITSYNC_ASKPASS_USERNAME", user)
                .env("GITSYNC_ASKPASS_PASSWORD", pass);
        }
        let mut ssh = String::from("ssh -F /dev/null -o IdentityAgent=none -o BatchMode=yes");
        if self.paths.ssh_key_file.is_some() {
            ssh.push_str(&format!(
                " -i {} -o IdentitiesOnly=yes",
                p.join("ssh-key").display()
            ));
        }
        if self.cfg.ssh_known_hosts {
            if self.paths.ssh_known_hosts_file.is_some() {
                ssh.push_str(&format!(
                    " -o UserKnownHostsFile={}",
                    p.join("known_hosts").display()
                ));
            }
            ssh.push_str(" -o StrictHostKeyChecking=yes");
        } else {
            ssh.push_str(" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null");
        }
        c.env("GIT_SSH_COMMAND", ssh);
        for kv in LOCKDOWN {
            c.arg("-c").arg(kv);
        }
        c.stdin(std::process::Stdio::null()).kill_on_drop(true);
        c
    }

    async fn run_git(
        &self,
        args: &[&str],
        creds: Option<&(String, String)>,
        work: Option<&Path>,
        timeout: Duration,
    ) -> Result<String, SyncError> {
        let mut cmd = self.git(creds, work);
        cmd.args(args);
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| SyncError::GitTimeout {
                command: args.first().unwrap_or(&"").to_string(),
                timeout,
            })?
            .map_err(err("running git"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(SyncError::Git {
                args: redact(&args.join(" ")),
                stderr: redact(stderr.trim()),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The commit the link points to now (as far as the link says).
    fn current(&self) -> Option<String> {
        let root = self.root_dir().ok()?;
        let target = root.read_link_contents(self.link_rel()).ok()?;
        target.file_name().map(|f| f.to_string_lossy().into_owned())
    }

    /// Write `data` to `name` in the private directory (0600), by create-then-rename.
    fn write_private(&self, name: &str, data: &[u8], mode: u32) -> Result<(), SyncError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.paths.private.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err("writing git-sync's private files"))?;
        f.write_all(data)
            .map_err(err("writing git-sync's private files"))?;
        drop(f);
        std::fs::rename(&tmp, self.paths.private.join(name))
            .map_err(err("writing git-sync's private files"))
    }

    /// The credentials of this sync (the password file is read again each time).
    fn credentials(&self) -> Result<Option<(String, String)>, SyncError> {
        let Some(user) = &self.cfg.username else {
            return Ok(None);
        };
        let pass = match (&self.cfg.password, &self.paths.password_file) {
            (Some(p), _) => p.0.clone(),
            (None, Some(f)) => {
                let raw = f.read().map_err(|source| SyncError::Io {
                    what: format!(
                        "--password-file {}",
                        self.cfg
                            .password_file
                            .as_deref()
                            .unwrap_or(Path::new(""))
                            .display()
                    ),
                    source,
                })?;
                String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\n', '\r'])
                    .to_string()
            }
            (None, None) => String::new(),
        };
        Ok(Some((user.clone(), pass)))
    }

    async fn init(&self) -> Result<(), SyncError> {
        create_private_dir(&self.paths.private)
            .map_err(err("creating git-sync's private directory"))?;
        create_private_dir(&self.paths.private.join("home"))
            .map_err(err("creating git-sync's HOME"))?;
        // Keys are copied in (read through the volume's handle) so ssh never follows a link.
        if let Some(f) = &self.paths.ssh_key_file {
            let key = f.read().map_err(err("--ssh-key-file"))?;
            self.write_private("ssh-key", &key, 0o600)?;
        }
        if let Some(f) = &self.paths.ssh_known_hosts_file {
            let kh = f.read().map_err(err("--ssh-known-hosts-file"))?;
            self.write_private("known_hosts", &kh, 0o600)?;
        }
        if self.initialised.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.write_private("askpass", ASKPASS.as_bytes(), 0o700)?;
        let t = self.cfg.sync_timeout;
        if !self.git_dir().join("HEAD").exists() {
            let dir = self.git_dir();
            let _ = std::fs::remove_dir_all(&dir);
            let d = dir.to_string_lossy().into_owned();
            self.run_git(&["init", "-q", "--bare", &d], None, None, t)
                .await?;
        }
        // Relative submodule URLs resolve against origin.
        self.run_git(
            &["config", "remote.origin.url", &self.cfg.repo],
            None,
            None,
            t,
        )
        .await?;
        self.initialised.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Check `hash` out in a private staging directory; returns its path.
    async fn checkout(
        &self,
        hash: &str,
        creds: Option<&(String, String)>,
    ) -> Result<PathBuf, SyncError> {
        let deadline = self.cfg.sync_timeout;
        let stage = self.paths.private.join("stage");
        let _ = std::fs::remove_dir_all(&stage);
        create_private_dir(&stage).map_err(err("creating the staging directory"))?;
        let wt = stage.join(hash);
        std::fs::create_dir(&wt).map_err(err("creating the staging checkout"))?;
        let _ = std::fs::remove_file(self.paths.private.join("index"));
        self.run_git(
            &["read-tree", "--reset", "-u", hash],
            None,
            Some(&wt),
            deadline,
        )
        .await?;
        if self.cfg.submodules != "off" && wt.join(".gitmodules").exists() {
            let recursive = self.cfg.submodules == "recursive";
            let mut sync = vec!["submodule", "sync", "--quiet"];
            if recursive {
                sync.push("--recursive");
            }
            self.run_git(&sync, creds, Some(&wt), deadline).await?;
            let mut sub = vec!["submodule", "update", "--init"];
            if recursive {
                sub.push("--recursive");
            }
            let depth = format!("--depth={}", self.cfg.depth);
            if self.cfg.depth > 0 {
                sub.push(&depth);
            }
            self.run_git(&sub, creds, Some(&wt), deadline).await?;
        }
        Ok(wt)
    }

    /// One sync. Ok(Some(hash)) when the link moved, Ok(None) when already current.
    pub async fn sync_once(&self) -> Result<Option<String>, SyncError> {
        let deadline = self.cfg.sync_timeout;
        self.init().await?;
        let creds = self.credentials()?;
        let mut fetch = vec!["fetch".to_string(), "--no-tags".into(), "--force".into()];
        if self.cfg.depth > 0 {
            fetch.push(format!("--depth={}", self.cfg.depth));
        }
        fetch.push("--end-of-options".into());
        fetch.push(self.cfg.repo.clone());
        fetch.push(self.cfg.git_ref.clone());
        let f: Vec<&str> = fetch.iter().map(String::as_str).collect();
        self.run_git(&f, creds.as_ref(), None, deadline).await?;
        let hash = self
            .run_git(&["rev-parse", "FETCH_HEAD^{commit}"], None, None, deadline)
            .await?;
        if hash.len() < 40 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SyncError::NotACommit(hash));
        }
        let root = self.root_dir()?;
        let wts = real_dir(&root, std::ffi::OsStr::new(".worktrees"))
            .map_err(err("opening .worktrees in the volume"))?;
        let previous = self.current();
        if previous.as_deref() == Some(hash.as_str())
            && wts
                .symlink_metadata(&hash)
                .map(|m| m.is_dir())
                .unwrap_or(false)
        {
            return Ok(None);
        }
        let staged = self.checkout(&hash, creds.as_ref()).await?;
        // Publish: move the staged tree into the volume (copy it across filesystems).
        remove_any(&wts, Path::new(&hash)).map_err(err("removing a stale worktree"))?;
        let stage = cap_std::fs::Dir::open_ambient_dir(
            staged.parent().unwrap_or(&self.paths.private),
            cap_std::ambient_authority(),
        )
        .map_err(err("opening the staging directory"))?;
        match stage.rename(&hash, &wts, &hash) {
            Ok(()) => {}
            Err(e) if io_kind(&e, libc::EXDEV) => {
                let tmp = PathBuf::from(format!(".tmp-{hash}"));
                remove_any(&wts, &tmp).map_err(err("removing a stale worktree"))?;
                copy_tree(&staged, &wts, &tmp)
                    .map_err(err("copying the worktree into the volume"))?;
                wts.rename(&tmp, &wts, &hash)
                    .map_err(err("publishing the worktree"))?;
                let _ = std::fs::remove_dir_all(&staged);
            }
            Err(e) => return Err(err("publishing the worktree")(e)),
        }
        // Flip the link atomically: a new symlink renamed over the old one.
        let link = self.link_rel();
        let name = link
            .file_name()
            .ok_or_else(|| SyncError::LinkNamesNoFile(self.cfg.link.clone()))?
            .to_os_string();
        let parent_rel = link.parent().unwrap_or(Path::new(""));
        let parent = real_dirs(&root, parent_rel).map_err(err("creating the link's directory"))?;
        let mut target = PathBuf::new();
        for c in parent_rel.components() {
            if matches!(c, Component::Normal(_)) {
                target.push("..");
            }
        }
        target.push(".worktrees");
        target.push(&hash);
        let tmp = PathBuf::from(format!(".{}.{hash}.tmp", name.to_string_lossy()));
        let _ = remove_any(&parent, &tmp);
        parent
            .symlink_contents(&target, &tmp)
            .map_err(err("creating the link"))?;
        if let Err(e) = parent.rename(&tmp, &parent, &name) {
            // A directory where the link goes (a guest made one): git-sync owns that name.
            if io_kind(&e, libc::EISDIR)
                || io_kind(&e, libc::ENOTEMPTY)
                || io_kind(&e, libc::EEXIST)
            {
                remove_any(&parent, Path::new(&name)).map_err(err("replacing the link"))?;
                parent
                    .rename(&tmp, &parent, &name)
                    .map_err(err("flipping the link"))?;
            } else {
                let _ = parent.remove_file(&tmp);
                return Err(err("flipping the link")(e));
            }
        }
        // Old worktrees go, except the one just replaced: a reader that resolved the link a
        // moment ago still finds a whole tree there until the next flip.
        if let Ok(rd) = wts.entries() {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n != hash && Some(&n) != previous.as_ref() {
                    let _ = remove_any(&wts, Path::new(&n));
                }
            }
        }
        Ok(Some(hash))
    }

    /// The exechook for `hash`, once.
    async fn exechook(&self, command: &str, hash: &str) -> Result<(), HookError> {
        let wt = self.worktree_path(hash);
        let t = self.cfg.exechook_timeout;
        let out = match &self.hooks {
            HookRunner::InPod(exec) => exec.run_hook(command, &wt, hash, t).await?,
            HookRunner::Local { env } => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(command)
                    .current_dir(&wt)
                    .envs(env.iter().cloned())
                    .env("GITSYNC_HASH", hash)
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true);
                match tokio::time::timeout(t, c.output()).await {
                    Ok(Ok(out)) => HookOutput {
                        exit_code: out.status.code().unwrap_or(-1) as i64,
                        output: format!(
                            "{}{}",
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        ),
                        ran_in: "this machine".into(),
                    },
                    Ok(Err(e)) => return Err(HookError::Failed(format!("exechook: {e}"))),
                    Err(_) => {
                        return Err(HookError::Failed(format!("exechook timed out after {t:?}")))
                    }
                }
            }
        };
        if !out.output.is_empty() {
            self.say(&out.output);
            if !out.output.ends_with('\n') {
                self.say("\n");
            }
        }
        if out.exit_code != 0 {
            return Err(HookError::Failed(format!(
                "exechook (in {}) exited with {}",
                out.ran_in, out.exit_code
            )));
        }
        Ok(())
    }

    /// The exechook for `hash` until it succeeds, a newer hash comes, or syncing ends.
    async fn exechook_until_done(
        &self,
        command: &str,
        hash: &str,
        rx: &tokio::sync::watch::Receiver<Option<String>>,
        stop: &CancellationToken,
    ) {
        let mut said_waiting = false;
        loop {
            match self.exechook(command, hash).await {
                Ok(()) => return,
                Err(HookError::NotYet(m)) => {
                    if !said_waiting {
                        self.say(&format!("exechook for {hash} waits: {m}\n"));
                        said_waiting = true;
                    }
                }
                Err(HookError::Failed(m)) => {
                    self.say(&format!("{m}\n"));
                    self.alarm(&m);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.exechook_backoff) => {}
                _ = stop.cancelled() => return,
            }
            match rx.has_changed() {
                Ok(false) => {}
                // A newer hash is waiting, or syncing is over.
                _ => return,
            }
        }
    }

    async fn webhook(&self, hash: &str) {
        let Some(url) = &self.cfg.webhook_url else {
            return;
        };
        let client = reqwest::Client::new();
        let method = reqwest::Method::from_bytes(self.cfg.webhook_method.as_bytes())
            .unwrap_or(reqwest::Method::POST);
        let mut delay = Duration::from_millis(200);
        for _ in 0..5 {
            match client
                .request(method.clone(), url)
                .header("Gitsync-Hash", hash)
                .timeout(Duration::from_secs(10))
                .send()
                .await
            {
                Ok(r) if r.status().as_u16() == self.cfg.webhook_success_status => break,
                Ok(r) => self.alarm(&format!("webhook {url} answered {}", r.status())),
                Err(e) => self.alarm(&format!("webhook {url}: {e}")),
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }

    /// Hooks for each new hash, beside the sync loop: the newest hash wins.
    async fn hook_loop(
        &self,
        mut rx: tokio::sync::watch::Receiver<Option<String>>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
                _ = stop.cancelled() => return,
            }
            let Some(hash) = rx.borrow_and_update().clone() else {
                continue;
            };
            let exec = async {
                if let Some(cmd) = &self.cfg.exechook_command {
                    self.exechook_until_done(cmd, &hash, &rx, &stop).await;
                }
            };
            tokio::join!(exec, self.webhook(&hash));
        }
    }

    /// Sync until cancelled (or once with `--one-time`). `first` fires after the first sync.
    /// Hooks run beside the syncs (a hook waiting for its pod member holds no sync back).
    pub async fn run(
        &self,
        stop: CancellationToken,
        first: Option<tokio::sync::oneshot::Sender<Result<(), SyncError>>>,
    ) -> Result<(), SyncError> {
        let (tx, rx) = tokio::sync::watch::channel::<Option<String>>(None);
        let syncs = async {
            let tx = tx;
            self.sync_loop(&stop, first, &tx).await
        };
        let (r, ()) = tokio::join!(syncs, self.hook_loop(rx, stop.clone()));
        r
    }

    async fn sync_loop(
        &self,
        stop: &CancellationToken,
        mut first: Option<tokio::sync::oneshot::Sender<Result<(), SyncError>>>,
        hooks: &tokio::sync::watch::Sender<Option<String>>,
    ) -> Result<(), SyncError> {
        let mut failures: i64 = 0;
        let mut backoff = Duration::ZERO;
        loop {
            let t = Instant::now();
            let r = tokio::select! {
                r = self.sync_once() => r,
                _ = stop.cancelled() => return Ok(()),
            };
            self.stats
                .last_duration_ms
                .store(t.elapsed().as_millis() as u64, Ordering::Relaxed);
            match r {
                Ok(moved) => {
                    failures = 0;
                    backoff = Duration::ZERO;
                    self.stats.success.fetch_add(1, Ordering::Relaxed);
                    self.stats.synced_once.store(true, Ordering::Relaxed);
                    {
                        let now = chrono::Utc::now();
                        let mut last = self.stats.last.lock().unwrap();
                        last.checked_at = Some(now);
                        match &moved {
                            Some(hash) => {
                                last.commit = Some(hash.clone());
                                last.synced_at = Some(now);
                            }
                            // Already current (e.g. synced before a restart).
                            None if last.commit.is_none() => last.commit = self.current(),
                            None => {}
                        }
                    }
                    if let Some(hash) = &moved {
                        self.say(&format!(
                            "synced {} @ {} to {}\n",
                            self.cfg.repo, hash, self.cfg.link
                        ));
                        hooks.send_replace(Some(hash.clone()));
                    }
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Ok(()));
                    }
                    if self.cfg.one_time {
                        return Ok(());
                    }
                }
                Err(err) => {
                    let e = redact(&err.to_string());
                    failures += 1;
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    self.stats.last.lock().unwrap().error = Some((chrono::Utc::now(), e.clone()));
                    let kept = match self.current() {
                        Some(h) => format!("; keeping {h}"),
                        None => String::new(),
                    };
                    self.say(&format!("sync failed ({failures} in a row){kept}: {e}\n"));
                    self.alarm(&format!("sync failed ({failures} in a row){kept}: {e}"));
                    if self.cfg.max_failures >= 0 && failures > self.cfg.max_failures {
                        let last = Arc::new(err);
                        let give_up = || SyncError::TooManyFailures {
                            failures,
                            max: self.cfg.max_failures,
                            last: last.clone(),
                        };
                        if let Some(tx) = first.take() {
                            let _ = tx.send(Err(give_up()));
                        }
                        return Err(give_up());
                    }
                    backoff = (backoff * 2)
                        .max(Duration::from_millis(500))
                        .min(Duration::from_secs(30));
                }
            }
            let wait = if backoff.is_zero() {
                self.cfg.period
            } else {
                backoff.min(self.cfg.period.max(backoff))
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_env_and_defaults() {
        let c = Config::parse(
            &s(&[
                "--repo=https://example.com/org/site.git",
                "--root",
                "/git",
                "--period=2s",
                "--one-time",
            ]),
            &[
                ("GITSYNC_DEPTH".into(), "3".into()),
                ("GITSYNC_REPO".into(), "ignored".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.repo, "https://example.com/org/site.git");
        assert_eq!(c.link, "site");
        assert_eq!(c.period, Duration::from_secs(2));
        assert_eq!(c.depth, 3);
        assert!(c.one_time);
        assert_eq!(c.git_ref, "HEAD");
        assert_eq!(
            Config::parse(&s(&["--root=/g"]), &[])
                .unwrap_err()
                .to_string(),
            "git-sync: required flag missing: --repo (or GITSYNC_REPO)"
        );
        let e = Config::parse(&s(&["--repo=x", "--root=/g", "--colour"]), &[]).unwrap_err();
        assert!(
            matches!(e, ConfigError::Flags(FlagError::Invalid { .. }))
                && e.to_string() == "git-sync: unexpected argument '--colour' found",
            "{e}"
        );
        let e = Config::parse(&s(&["--repo=x", "--root=/g", "--period=soon"]), &[]).unwrap_err();
        assert!(e.to_string().contains("--period"), "{e}");
        let e = Config::parse(&s(&["--repo=x", "--root=g"]), &[]).unwrap_err();
        assert!(
            e.to_string().contains("--root: must be an absolute path"),
            "{e}"
        );
    }

    #[test]
    fn every_spelling_of_today_still_works() {
        let env = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        // Go's one-dash long flags, bare-seconds durations, `-v N`, boolean forms.
        let c = Config::parse(
            &s(&[
                "-repo=file:///r",
                "-root",
                "/git",
                "-period=5",
                "-v",
                "5",
                "--one-time=false",
                "--ssh-known-hosts=false",
                "--max-failures",
                "-1",
                "--http-metrics",
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.repo, "file:///r");
        assert_eq!(c.period, Duration::from_secs(5));
        assert!(!c.one_time && !c.ssh_known_hosts);
        assert_eq!(c.max_failures, -1);
        // Every value from GITSYNC_* variables; empty ones count as unset.
        let c = Config::parse(
            &[],
            &env(&[
                ("GITSYNC_REPO", "https://example.com/a/b.git"),
                ("GITSYNC_ROOT", "/git"),
                ("GITSYNC_REF", "v1"),
                ("GITSYNC_LINK", ""),
                ("GITSYNC_PERIOD", "1m30s"),
                ("GITSYNC_SYNC_TIMEOUT", "1.5s"),
                ("GITSYNC_ONE_TIME", "true"),
                ("GITSYNC_DEPTH", "0"),
                ("GITSYNC_SUBMODULES", "off"),
                ("GITSYNC_USERNAME", "u"),
                ("GITSYNC_PASSWORD", "p"),
                ("GITSYNC_WEBHOOK_SUCCESS_STATUS", "204"),
                ("GITSYNC_EXECHOOK_BACKOFF", "10ms"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.link, "b");
        assert_eq!(c.git_ref, "v1");
        assert_eq!(c.period, Duration::from_secs(90));
        assert_eq!(c.sync_timeout, Duration::from_millis(1500));
        assert!(c.one_time);
        assert_eq!((c.depth, c.submodules.as_str()), (0, "off"));
        assert_eq!(c.password, Some(Secret("p".into())));
        assert_eq!(c.webhook_success_status, 204);
        // Raised to the floor.
        assert_eq!(c.exechook_backoff, Duration::from_millis(100));
        // A variable that does not parse is named with its flag.
        let e = Config::parse(
            &s(&["--repo=x", "--root=/g"]),
            &env(&[("GITSYNC_ONE_TIME", "maybe")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--one-time") && e.contains("GITSYNC_ONE_TIME"),
            "{e}"
        );
        // --help, one dash or two.
        for h in ["--help", "-h", "-help"] {
            assert!(
                matches!(
                    Config::parse(&s(&[h]), &[]),
                    Err(ConfigError::Flags(FlagError::Help(t))) if t.contains("GITSYNC_REPO")
                ),
                "{h}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_go_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_go_duration("1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_go_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_go_duration("5x").is_err());
        assert!(parse_go_duration("").is_err());
    }

    #[test]
    fn paths_stay_in_mounts() {
        let m = vec![(PathBuf::from("/host/vol"), "/git".to_string())];
        assert_eq!(
            host_path(&m, Path::new("/git/repo")),
            Some(PathBuf::from("/host/vol/repo"))
        );
        assert_eq!(host_path(&m, Path::new("/etc")), None);
        assert_eq!(host_path(&m, Path::new("/git/../etc")), None);
    }

    #[test]
    fn credentials_leave_the_url_and_every_message() {
        let (u, user, pass) = split_credentials("https://alice:s%40cret@example.com/org/site.git");
        assert_eq!(u, "https://example.com/org/site.git");
        assert_eq!(user.as_deref(), Some("alice"));
        assert_eq!(pass.as_deref(), Some("s@cret"));
        let (u, user, pass) = split_credentials("ssh://git@example.com/site.git");
        assert_eq!(u, "ssh://git@example.com/site.git");
        assert_eq!((user.as_deref(), pass), (Some("git"), None));
        assert_eq!(
            split_credentials("git@example.com:org/site.git").0,
            "git@example.com:org/site.git"
        );
        assert_eq!(
            redact("fetch https://alice:pw@h/x.git and http://bob@h/ and file:///a@b"),
            "fetch https://alice:***@h/x.git and http://bob@h/ and file:///a@b"
        );
        let c = Config::parse(
            &s(&[
                "--repo=https://alice:pw@example.com/site.git",
                "--root=/git",
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.repo, "https://example.com/site.git");
        assert_eq!(c.link, "site");
        assert_eq!(c.password, Some(Secret("pw".into())));
        assert!(!format!("{c:?}").contains("pw\""));
        assert!(Config::parse(&s(&["--repo=x", "--root=/g", "--password=p"]), &[]).is_err());
        assert!(
            Config::parse(&s(&["--repo=x", "--root=/g", "--ref=--upload-pack=x"]), &[]).is_err()
        );
    }
}
