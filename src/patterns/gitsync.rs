//! `builtin/git-sync`: keeps a directory in a pod volume in sync with a git repository, with
//! kubernetes/git-sync v4's flags and `GITSYNC_*` variables. It drives the git CLI (as
//! git-sync does): the repository lives in `--root`, every synced commit is checked out in a
//! worktree `<root>/.worktrees/<hash>`, and `<root>/<link>` is a symlink flipped atomically
//! (rename over the old one) to the new worktree, so a reader never sees a partial tree. Old
//! worktrees are removed after the flip.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// git-sync's configuration, from flags and `GITSYNC_*` environment variables.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
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
    pub webhook_url: Option<String>,
    pub webhook_method: String,
    pub webhook_success_status: u16,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ssh_key_file: Option<PathBuf>,
    pub ssh_known_hosts: bool,
    pub ssh_known_hosts_file: Option<PathBuf>,
    pub http_bind: Option<String>,
}

/// Flags git-sync v4 takes, with the kind of value each has.
const FLAGS: &[(&str, bool)] = &[
    ("repo", false),
    ("ref", false),
    ("root", false),
    ("link", false),
    ("period", false),
    ("depth", false),
    ("one-time", true),
    ("max-failures", false),
    ("sync-timeout", false),
    ("submodules", false),
    ("exechook-command", false),
    ("exechook-timeout", false),
    ("webhook-url", false),
    ("webhook-method", false),
    ("webhook-success-status", false),
    ("username", false),
    ("password-file", false),
    ("ssh-key-file", false),
    ("ssh-known-hosts", true),
    ("ssh-known-hosts-file", false),
    ("http-bind", false),
    ("http-metrics", true),
    ("verbose", false),
    ("v", false),
];

/// Go-style durations: `10s`, `1m30s`, `500ms`, `2h`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?} (examples: 10s, 1m, 500ms)");
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.trim().chars().peekable();
    if s.trim().is_empty() {
        return Err(err());
    }
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if c == 'm' && chars.peek() == Some(&'s') {
            unit.push(chars.next().unwrap());
        }
        let v: f64 = num.parse().map_err(|_| err())?;
        num.clear();
        total += v * match unit.as_str() {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return Err(err()),
        };
    }
    if !num.is_empty() {
        // A bare number: seconds (git-sync v3 took seconds).
        total += num.parse::<f64>().map_err(|_| err())?;
    }
    Ok(Duration::from_secs_f64(total))
}

fn parse_bool(flag: &str, v: &str) -> Result<bool, String> {
    match v {
        "" | "true" | "1" | "t" | "T" | "TRUE" | "True" => Ok(true),
        "false" | "0" | "f" | "F" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("--{flag}: invalid boolean {v:?}")),
    }
}

impl Config {
    /// Parse args (`--flag=value` or `--flag value`) over `GITSYNC_*` env (flags win).
    pub fn parse(args: &[String], env: &[(String, String)]) -> Result<Config, String> {
        let mut vals: HashMap<String, String> = HashMap::new();
        for (k, v) in env {
            if let Some(name) = k.strip_prefix("GITSYNC_") {
                let flag = name.to_lowercase().replace('_', "-");
                if FLAGS.iter().any(|(f, _)| *f == flag) {
                    vals.insert(flag, v.clone());
                }
            }
        }
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            let Some(body) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
                return Err(format!(
                    "unexpected argument {a:?}: git-sync takes only flags (--repo=URL ...)"
                ));
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (body.to_string(), None),
            };
            let Some((_, is_bool)) = FLAGS.iter().find(|(f, _)| *f == name) else {
                return Err(format!("unknown flag: --{name}"));
            };
            let value = match (inline, is_bool) {
                (Some(v), _) => v,
                (None, true) => "true".to_string(),
                (None, false) => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| format!("flag needs an argument: --{name}"))?
                }
            };
            vals.insert(name, value);
            i += 1;
        }
        let get = |k: &str| vals.get(k).cloned().filter(|v| !v.is_empty());
        let repo = get("repo").ok_or("required flag missing: --repo (or GITSYNC_REPO)")?;
        let root =
            PathBuf::from(get("root").ok_or("required flag missing: --root (or GITSYNC_ROOT)")?);
        if !root.is_absolute() {
            return Err(format!(
                "--root must be an absolute path, got {:?}",
                root.display()
            ));
        }
        let default_link = repo
            .trim_end_matches('/')
            .rsplit(['/', ':'])
            .next()
            .unwrap_or("repo")
            .trim_end_matches(".git")
            .to_string();
        let link = get("link").unwrap_or(default_link);
        if link.split('/').any(|p| p == "..")
            || link.starts_with('/') && !Path::new(&link).starts_with(&root)
        {
            return Err(format!("--link {link:?} must stay inside --root"));
        }
        let num = |k: &str, d: i64| -> Result<i64, String> {
            get(k)
                .map(|v| {
                    v.parse::<i64>()
                        .map_err(|_| format!("--{k}: invalid number {v:?}"))
                })
                .unwrap_or(Ok(d))
        };
        let dur = |k: &str, d: Duration| -> Result<Duration, String> {
            get(k)
                .map(|v| parse_go_duration(&v).map_err(|e| format!("--{k}: {e}")))
                .unwrap_or(Ok(d))
        };
        let period = dur("period", Duration::from_secs(10))?;
        if period < Duration::from_millis(10) {
            return Err("--period must be at least 10ms".into());
        }
        let submodules = get("submodules").unwrap_or_else(|| "recursive".into());
        if !["recursive", "shallow", "off"].contains(&submodules.as_str()) {
            return Err(format!(
                "--submodules must be recursive, shallow or off, got {submodules:?}"
            ));
        }
        let depth = num("depth", 1)?;
        if depth < 0 {
            return Err("--depth must be >= 0".into());
        }
        Ok(Config {
            repo,
            git_ref: get("ref").unwrap_or_else(|| "HEAD".into()),
            root,
            link,
            period,
            depth: depth as u32,
            one_time: get("one-time")
                .map(|v| parse_bool("one-time", &v))
                .transpose()?
                .unwrap_or(false),
            max_failures: num("max-failures", 0)?,
            sync_timeout: dur("sync-timeout", Duration::from_secs(120))?,
            submodules,
            exechook_command: get("exechook-command"),
            exechook_timeout: dur("exechook-timeout", Duration::from_secs(30))?,
            webhook_url: get("webhook-url"),
            webhook_method: get("webhook-method").unwrap_or_else(|| "POST".into()),
            webhook_success_status: num("webhook-success-status", 200)? as u16,
            username: get("username"),
            password_file: get("password-file").map(PathBuf::from),
            ssh_key_file: get("ssh-key-file").map(PathBuf::from),
            ssh_known_hosts: get("ssh-known-hosts")
                .map(|v| parse_bool("ssh-known-hosts", &v))
                .transpose()?
                .unwrap_or(true),
            ssh_known_hosts_file: get("ssh-known-hosts-file").map(PathBuf::from),
            http_bind: get("http-bind"),
        })
    }

    pub fn link_path(&self) -> PathBuf {
        self.root.join(&self.link)
    }
}

/// Map a guest path (inside the container's mounts) to the host path; None if outside.
pub fn host_path(mounts: &[(PathBuf, String)], guest: &Path) -> Option<PathBuf> {
    if guest.components().any(|c| c == Component::ParentDir) {
        return None;
    }
    mounts
        .iter()
        .filter(|(_, g)| guest.starts_with(g))
        .max_by_key(|(_, g)| g.len())
        .map(|(h, g)| h.join(guest.strip_prefix(g).unwrap_or(Path::new(""))))
}

/// What git-sync reports (its `/metrics` and readiness).
#[derive(Default)]
pub struct Stats {
    pub success: AtomicU64,
    pub errors: AtomicU64,
    pub last_duration_ms: AtomicU64,
    pub synced_once: std::sync::atomic::AtomicBool,
}

/// The sync loop, with host paths already resolved.
pub struct GitSync {
    pub cfg: Config,
    /// `--root` on the host.
    pub root: PathBuf,
    /// Where exechooks run relative paths from, and what they see: the host side of the volume.
    pub log: Arc<dyn Fn(&str) + Send + Sync>,
    pub warn: Arc<dyn Fn(&str) + Send + Sync>,
    pub stats: Arc<Stats>,
    pub env: Vec<(String, String)>,
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl GitSync {
    fn git(&self) -> Command {
        let mut c = Command::new("git");
        c.current_dir(&self.root)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        c.arg("-c").arg("safe.directory=*");
        if let (Some(user), Some(pf)) = (&self.cfg.username, &self.cfg.password_file) {
            if let Ok(pw) = std::fs::read_to_string(pf) {
                use base64_lite::encode;
                let token =
                    encode(format!("{user}:{}", pw.trim_end_matches(['\n', '\r'])).as_bytes());
                c.arg("-c")
                    .arg(format!("http.extraHeader=Authorization: Basic {token}"));
            }
        }
        if let Some(key) = &self.cfg.ssh_key_file {
            let mut ssh = format!("ssh -i {} -o IdentitiesOnly=yes", key.display());
            if self.cfg.ssh_known_hosts {
                if let Some(kh) = &self.cfg.ssh_known_hosts_file {
                    ssh.push_str(&format!(" -o UserKnownHostsFile={}", kh.display()));
                }
                ssh.push_str(" -o StrictHostKeyChecking=yes");
            } else {
                ssh.push_str(" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null");
            }
            c.env("GIT_SSH_COMMAND", ssh);
        }
        c
    }

    async fn run_git(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut cmd = self.git();
        cmd.args(args);
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| {
                format!(
                    "git {} timed out after {:?}",
                    args.first().unwrap_or(&""),
                    timeout
                )
            })?
            .map_err(err("running git"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(format!("git {}: {}", args.join(" "), stderr.trim()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The commit the link points to now.
    fn current(&self) -> Option<String> {
        let target = std::fs::read_link(self.root.join(&self.cfg.link)).ok()?;
        target.file_name().map(|f| f.to_string_lossy().into_owned())
    }

    async fn init(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.root).map_err(err("creating --root"))?;
        if !self.root.join(".git").exists() {
            self.run_git(&["init", "-q"], self.cfg.sync_timeout).await?;
        }
        Ok(())
    }

    /// One sync. Ok(Some(hash)) when the link moved, Ok(None) when already current.
    pub async fn sync_once(&self) -> Result<Option<String>, String> {
        let deadline = self.cfg.sync_timeout;
        self.init().await?;
        let mut fetch = vec!["fetch".to_string(), "--no-tags".into(), "--force".into()];
        if self.cfg.depth > 0 {
            fetch.push(format!("--depth={}", self.cfg.depth));
        }
        fetch.push(self.cfg.repo.clone());
        fetch.push(self.cfg.git_ref.clone());
        let f: Vec<&str> = fetch.iter().map(String::as_str).collect();
        self.run_git(&f, deadline).await?;
        let hash = self
            .run_git(&["rev-parse", "FETCH_HEAD^{commit}"], deadline)
            .await?;
        let previous = self.current();
        if previous.as_deref() == Some(hash.as_str()) {
            return Ok(None);
        }
        let wt_rel = format!(".worktrees/{hash}");
        let wt = self.root.join(&wt_rel);
        if wt.exists() {
            let _ = self
                .run_git(&["worktree", "remove", "--force", &wt_rel], deadline)
                .await;
            let _ = std::fs::remove_dir_all(&wt);
        }
        let _ = self.run_git(&["worktree", "prune"], deadline).await;
        self.run_git(
            &["worktree", "add", "--force", "--detach", &wt_rel, &hash],
            deadline,
        )
        .await?;
        if self.cfg.submodules != "off" && wt.join(".gitmodules").exists() {
            let mut sub = vec!["-C", &wt_rel, "submodule", "update", "--init"];
            if self.cfg.submodules == "recursive" {
                sub.push("--recursive");
            }
            let depth = format!("--depth={}", self.cfg.depth);
            if self.cfg.depth > 0 {
                sub.push(&depth);
            }
            self.run_git(&sub, deadline).await?;
        }
        // Flip the link atomically: a new symlink renamed over the old one.
        let link = self.root.join(&self.cfg.link);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(err("creating the link's directory"))?;
        }
        let rel_target = relative_target(&link, &wt);
        let tmp = link.with_file_name(format!(".{}.tmp", hash));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&rel_target, &tmp).map_err(err("creating the link"))?;
        std::fs::rename(&tmp, &link).map_err(err("flipping the link"))?;
        // Old worktrees go, except the one just replaced: a reader that resolved the link a
        // moment ago still finds a whole tree there until the next flip.
        if let Ok(rd) = std::fs::read_dir(self.root.join(".worktrees")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name != hash && Some(&name) != previous.as_ref() {
                    let rel = format!(".worktrees/{name}");
                    let _ = self
                        .run_git(&["worktree", "remove", "--force", &rel], deadline)
                        .await;
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let _ = self.run_git(&["worktree", "prune"], deadline).await;
        Ok(Some(hash))
    }

    async fn hooks(&self, hash: &str) {
        if let Some(cmd) = &self.cfg.exechook_command {
            let wt = self.root.join(".worktrees").join(hash);
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(cmd)
                .current_dir(&wt)
                .envs(self.env.iter().cloned())
                .env("GITSYNC_HASH", hash)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            match tokio::time::timeout(self.cfg.exechook_timeout, c.output()).await {
                Ok(Ok(out)) => {
                    (self.log)(&String::from_utf8_lossy(&out.stdout));
                    (self.log)(&String::from_utf8_lossy(&out.stderr));
                    if !out.status.success() {
                        (self.warn)(&format!("exechook failed with {}", out.status));
                    }
                }
                Ok(Err(e)) => (self.warn)(&format!("exechook: {e}")),
                Err(_) => (self.warn)("exechook timed out"),
            }
        }
        if let Some(url) = &self.cfg.webhook_url {
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
                    Ok(r) => (self.warn)(&format!("webhook {url} answered {}", r.status())),
                    Err(e) => (self.warn)(&format!("webhook {url}: {e}")),
                }
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }

    /// Sync until cancelled (or once with `--one-time`). `first` fires after the first sync.
    pub async fn run(
        &self,
        stop: CancellationToken,
        mut first: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) -> Result<(), String> {
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
                    if let Some(hash) = &moved {
                        (self.log)(&format!(
                            "synced {} @ {} to {}\n",
                            self.cfg.repo, hash, self.cfg.link
                        ));
                        self.hooks(hash).await;
                    }
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Ok(()));
                    }
                    if self.cfg.one_time {
                        return Ok(());
                    }
                }
                Err(e) => {
                    failures += 1;
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    let kept = match self.current() {
                        Some(h) => format!("; keeping {h}"),
                        None => String::new(),
                    };
                    (self.log)(&format!("sync failed ({failures} in a row){kept}: {e}\n"));
                    (self.warn)(&format!("sync failed ({failures} in a row){kept}: {e}"));
                    if self.cfg.max_failures >= 0 && failures > self.cfg.max_failures {
                        let msg = format!(
                            "too many failures ({failures} > --max-failures={}): {e}",
                            self.cfg.max_failures
                        );
                        if let Some(tx) = first.take() {
                            let _ = tx.send(Err(msg.clone()));
                        }
                        return Err(msg);
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

/// `.worktrees/<hash>` relative to the link's directory (so the tree works when mounted elsewhere).
fn relative_target(link: &Path, target: &Path) -> PathBuf {
    let base = link.parent().unwrap_or(Path::new("/"));
    let b: Vec<_> = base.components().collect();
    let t: Vec<_> = target.components().collect();
    let common = b.iter().zip(t.iter()).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// Minimal standard base64 (for the Authorization header).
mod base64_lite {
    pub fn encode(input: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
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
            Config::parse(&s(&["--root=/g"]), &[]).unwrap_err(),
            "required flag missing: --repo (or GITSYNC_REPO)"
        );
        assert_eq!(
            Config::parse(&s(&["--repo=x", "--root=/g", "--colour"]), &[]).unwrap_err(),
            "unknown flag: --colour"
        );
        assert!(Config::parse(&s(&["--repo=x", "--root=/g", "--period=soon"]), &[]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_go_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_go_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_go_duration("5x").is_err());
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
        assert_eq!(
            relative_target(Path::new("/r/link"), Path::new("/r/.worktrees/abc")),
            PathBuf::from(".worktrees/abc")
        );
        assert_eq!(base64_lite::encode(b"user:pw"), "dXNlcjpwdw==");
    }
}
