//! git-sync against its own pod (issue 12): a pod member rewrites git config in the shared
//! volume and plants symlinks where git-sync writes; an exechook tries to run on the node; a
//! password is looked for on command lines, in the status, the events and the logs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::common::*;

fn yaml_list(args: &[String]) -> String {
    args.iter()
        .map(|a| serde_json::to_string(a).unwrap())
        .collect::<Vec<_>>()
        .join(", ")
}

/// git-sync (volume `git` at /git) beside `containers` (YAML list items).
fn pod(name: &str, args: &[String], extra_volumes: &str, containers: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  volumes:\n  - {{name: git, emptyDir: {{}}}}\n{extra_volumes}  initContainers:\n  - name: git-sync\n    image: builtin/git-sync\n    restartPolicy: Always\n    args: [{}]\n    volumeMounts: [{{name: git, mountPath: /git}}]\n  containers:\n{containers}",
        yaml_list(args)
    )
}

/// A busybox member running `script` (a file on the host, mounted read-only at /attack).
fn attacker(script_dir: &Path) -> (String, String) {
    (
        format!(
            "  - {{name: attack, hostPath: {{path: {}}}}}\n",
            script_dir.display()
        ),
        format!(
            "  - name: attacker\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n    command: [sh, /attack/run.sh]\n    volumeMounts:\n    - {{name: git, mountPath: /git}}\n    - {{name: attack, mountPath: /attack, readOnly: true}}\n"
        ),
    )
}

async fn volume(k: &Kapsel, pod: &str) -> PathBuf {
    let p = k.pod(pod).await.unwrap();
    k.data
        .join("pods")
        .join(p["metadata"]["uid"].as_str().unwrap())
        .join("volumes/git")
}

async fn wait_file(k: &Kapsel, pod: &str, path: &Path, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared; git-sync says: {}",
            path.display(),
            k.logs(pod, "git-sync").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes a host path when the test ends, however it ends.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_member_rewriting_git_config_runs_nothing_on_the_node() {
    let remote = Remote::new();
    remote.commit_text("v1\n");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let marker = PathBuf::from(format!("/tmp/pwned-{id}"));
    let _cleanup = Cleanup(vec![
        marker.clone(),
        PathBuf::from(format!("/tmp/pwned-{id}-fsmonitor")),
    ]);
    // The attack, as a pod member: every git config git-sync could read in the volume gets a
    // URL rewrite to an ext:: command, ext allowed, an fsmonitor command and hooks.
    let script = tempfile::tempdir().unwrap();
    let config = format!(
        "[url \"ext::sh -c touch% {m}\"]\n\tinsteadOf = {url}\n[protocol \"ext\"]\n\tallow = always\n[protocol]\n\tallow = always\n[core]\n\tfsmonitor = \"touch {m}-fsmonitor; false\"\n\thooksPath = /git/hooks\n",
        m = marker.display(),
        url = remote.url()
    );
    std::fs::write(script.path().join("config"), &config).unwrap();
    std::fs::write(
        script.path().join("run.sh"),
        "until [ -e /git/site ]; do sleep 0.1; done\n\
         mkdir -p /git/.git\n\
         cat /attack/config >> /git/.git/config\n\
         for d in /git/.worktrees/*; do\n\
           if [ -f \"$d/.git\" ]; then g=$(sed -n 's/^gitdir: //p' \"$d/.git\"); cat /attack/config >> \"$g/config\" 2>/dev/null; fi\n\
           if [ -d \"$d/.git\" ]; then cat /attack/config >> \"$d/.git/config\"; fi\n\
         done\n\
         touch /git/.attacked\n\
         exec sleep 3600\n",
    )
    .unwrap();
    let (vols, members) = attacker(script.path());
    let k = Kapsel::start();
    let args = vec![
        format!("--repo={}", remote.url()),
        "--root=/git".into(),
        "--link=site".into(),
        "--period=300ms".into(),
        "--max-failures=-1".into(),
    ];
    k.apply("cfg", &pod("cfg", &args, &vols, &members));
    let root = volume(&k, "cfg").await;
    wait_file(&k, "cfg", &root.join(".attacked"), 60).await;
    // The next syncs: nothing runs on the node, and the new commits land.
    for v in ["v2\n", "v3\n"] {
        remote.commit_text(v);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                !marker.exists(),
                "a guest's git config ran a command on the node"
            );
            assert!(!PathBuf::from(format!("/tmp/pwned-{id}-fsmonitor")).exists());
            if std::fs::read_to_string(root.join("site/v.txt"))
                .ok()
                .as_deref()
                == Some(v)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{v:?} never synced: {}",
                k.logs("cfg", "git-sync").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let logs = k.logs("cfg", "git-sync").await;
    assert!(!logs.contains("sync failed"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_planted_symlinks_at_the_link_and_worktrees_stay_in_the_volume() {
    let remote = Remote::new();
    remote.commit_text("v1\n");
    // Two directories of the node, outside any volume: where the guest's symlinks point.
    let outside_link = tempfile::tempdir().unwrap();
    let outside_wts = tempfile::tempdir().unwrap();
    let script = tempfile::tempdir().unwrap();
    std::fs::write(
        script.path().join("run.sh"),
        format!(
            "until [ -e /git/pub/site ]; do sleep 0.1; done\n\
             rm -rf /git/.worktrees && ln -s {wts} /git/.worktrees\n\
             rm -rf /git/pub && ln -s {link} /git/pub\n\
             touch /git/.attacked\n\
             exec sleep 3600\n",
            wts = outside_wts.path().display(),
            link = outside_link.path().display()
        ),
    )
    .unwrap();
    let (vols, members) = attacker(script.path());
    let k = Kapsel::start();
    let args = vec![
        format!("--repo={}", remote.url()),
        "--root=/git".into(),
        "--link=pub/site".into(),
        "--period=300ms".into(),
        "--max-failures=-1".into(),
    ];
    k.apply("links", &pod("links", &args, &vols, &members));
    let root = volume(&k, "links").await;
    wait_file(&k, "links", &root.join(".attacked"), 60).await;
    remote.commit_text("v2\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for d in [outside_link.path(), outside_wts.path()] {
            let written: Vec<_> = std::fs::read_dir(d).unwrap().flatten().collect();
            assert!(
                written.is_empty(),
                "git-sync wrote outside the volume, in {}: {:?}",
                d.display(),
                written.iter().map(|e| e.file_name()).collect::<Vec<_>>()
            );
        }
        let real = |p: &Path| {
            std::fs::symlink_metadata(p)
                .map(|m| m.is_dir())
                .unwrap_or(false)
        };
        if real(&root.join("pub"))
            && real(&root.join(".worktrees"))
            && std::fs::read_to_string(root.join("pub/site/v.txt"))
                .ok()
                .as_deref()
                == Some("v2\n")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sync did not repair its paths in the volume: {}",
            k.logs("links", "git-sync").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The link is relative, inside the volume.
    let target = std::fs::read_link(root.join("pub/site")).unwrap();
    assert!(target.starts_with("../.worktrees"), "{}", target.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_exechook_runs_inside_the_pods_container_not_on_the_node() {
    let remote = Remote::new();
    let hash = remote.commit_text("v1\n");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let marker = PathBuf::from(format!("/tmp/hook-marker-{id}"));
    let _cleanup = Cleanup(vec![marker.clone()]);
    let k = Kapsel::start();
    let args = vec![
        format!("--repo={}", remote.url()),
        "--root=/git".into(),
        "--period=1s".into(),
        format!(
            "--exechook-command=hostname > ../../hook-host; echo $GITSYNC_HASH > ../../hook-hash; pwd > ../../hook-pwd; touch {}",
            marker.display()
        ),
        "--exechook-backoff=200ms".into(),
    ];
    let app = format!(
        "  - name: app\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n    command: [sleep, \"3600\"]\n    volumeMounts: [{{name: git, mountPath: /git}}]\n"
    );
    k.apply("hook", &pod("hook", &args, "", &app));
    let root = volume(&k, "hook").await;
    wait_file(&k, "hook", &root.join("hook-pwd"), 60).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let pwd = loop {
        let p = std::fs::read_to_string(root.join("hook-pwd")).unwrap();
        if p.ends_with('\n') {
            break p;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // It ran in the worktree as the container sees it, with the hash.
    assert_eq!(pwd.trim(), format!("/git/.worktrees/{hash}"));
    assert_eq!(
        std::fs::read_to_string(root.join("hook-hash"))
            .unwrap()
            .trim(),
        hash
    );
    // Its host name is the container's, not the node's.
    let ids = docker_ids(&format!("io.kapsel.node={}", k.node));
    let app_id = ids
        .iter()
        .find(|id| {
            let out = Command::new("docker")
                .args([
                    "inspect",
                    "-f",
                    "{{index .Config.Labels \"io.kapsel.container\"}}",
                    id,
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim() == "app"
        })
        .expect("the app container");
    let out = Command::new("docker")
        .args(["exec", app_id, "hostname"])
        .output()
        .unwrap();
    let container_host = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let node_host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let hook_host = std::fs::read_to_string(root.join("hook-host")).unwrap();
    assert_eq!(hook_host.trim(), container_host);
    assert_ne!(hook_host.trim(), node_host, "the hook ran on the node");
    // Its /tmp is the container's.
    assert!(!marker.exists(), "the exechook wrote on the node's /tmp");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exechook_in_a_pod_without_an_oci_member_is_refused() {
    let remote = Remote::new();
    remote.commit_text("v1\n");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let marker = PathBuf::from(format!("/tmp/hook-marker-{id}"));
    let _cleanup = Cleanup(vec![marker.clone()]);
    let k = Kapsel::start();
    let args = vec![
        format!("--repo={}", remote.url()),
        "--root=/git".into(),
        format!("--exechook-command=touch {}", marker.display()),
    ];
    let app = format!("  - name: idle\n    image: {}\n", fixture("sleep.wat"));
    k.apply("wasmhook", &pod("wasmhook", &args, "", &app));
    let p = k
        .wait_pod("wasmhook", 30, |p| {
            p["status"]["initContainerStatuses"][0]["state"]["waiting"]["reason"]
                == "CreateContainerConfigError"
        })
        .await;
    let msg = p["status"]["initContainerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains(
            "--exechook-command needs an OCI container in the pod to run in; hooks never run on the node"
        ),
        "{msg}"
    );
    assert!(p["status"]["containerStatuses"][0]["state"]["running"].is_null());
    assert!(!marker.exists());
}

/// Every command line on the machine now: (pid, argv joined by spaces).
fn cmdlines() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(raw) = std::fs::read(e.path().join("cmdline")) {
            let s: String = String::from_utf8_lossy(&raw).replace('\0', " ");
            out.push((pid, s));
        }
    }
    out
}

fn base64(input: &[u8]) -> String {
    use ::base64::Engine;
    ::base64::engine::general_purpose::STANDARD.encode(input)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_password_reaches_no_command_line_status_event_or_log() {
    let remote = Remote::new();
    remote.commit_text("secret\n");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let password = format!("pw{}", &id[..16]);
    let wrong = format!("wrong{}", &id[16..]);
    let port = free_port();
    let base = remote.bare.parent().unwrap().to_path_buf();
    // Every answer of the server takes 300 ms: each fetch runs for a second or more.
    let mut server = Command::new("python3")
        .arg(repo("tests/support/git_http_auth.py"))
        .args([
            &port.to_string(),
            base.to_str().unwrap(),
            "alice",
            &password,
            "0.3",
        ])
        .spawn()
        .unwrap();
    let server_pid = server.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "auth server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Watch every command line while the pods sync.
    let secrets = vec![
        password.clone(),
        wrong.clone(),
        base64(format!("alice:{password}").as_bytes()),
        base64(format!("alice:{wrong}").as_bytes()),
    ];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, secrets2) = (stop.clone(), secrets.clone());
    let needle = format!("127.0.0.1:{port}");
    let needle2 = needle.clone();
    let watcher = std::thread::spawn(move || {
        let (mut leaks, mut gits) = (Vec::new(), 0u64);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            for (pid, line) in cmdlines() {
                // The test's own server (and a launcher in front of it) has it in its argv.
                if pid == server_pid || line.contains("git_http_auth.py") {
                    continue;
                }
                if line.contains("git") && line.contains(&needle2) {
                    gits += 1;
                }
                if secrets2.iter().any(|s| line.contains(s.as_str())) {
                    leaks.push(line);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (leaks, gits)
    });
    let k = Kapsel::start();
    let url = format!("http://{needle}/site.git");
    let idle = format!("  - name: idle\n    image: {}\n", fixture("sleep.wat"));
    let with_env = |name: &str, args: Vec<String>, env: &str| {
        pod(name, &args, "", &idle).replace(
            "    restartPolicy: Always\n",
            &format!("    restartPolicy: Always\n{env}"),
        )
    };
    k.apply(
        "flag",
        &pod(
            "flag",
            &[
                format!("--repo={url}"),
                "--root=/git".into(),
                "--username=alice".into(),
                format!("--password={password}"),
            ],
            "",
            &idle,
        ),
    );
    k.apply(
        "env",
        &with_env(
            "env",
            vec![format!("--repo={url}"), "--root=/git".into()],
            &format!(
                "    env:\n    - {{name: GITSYNC_USERNAME, value: alice}}\n    - {{name: GITSYNC_PASSWORD, value: {password}}}\n"
            ),
        ),
    );
    let in_url = |pw: &str| format!("--repo=http://alice:{pw}@{needle}/site.git");
    k.apply(
        "inurl",
        &pod(
            "inurl",
            &[in_url(&password), "--root=/git".into()],
            "",
            &idle,
        ),
    );
    // A wrong password in the URL: the sync fails, and says so in the status, events and log.
    k.apply(
        "badurl",
        &pod(
            "badurl",
            &[in_url(&wrong), "--root=/git".into(), "--link=site".into()],
            "",
            &idle,
        ),
    );
    for name in ["flag", "env", "inurl"] {
        k.wait_pod(name, 60, |p| !state(p, 0)["running"].is_null())
            .await;
        assert_eq!(
            std::fs::read_to_string(volume(&k, name).await.join("site/v.txt")).unwrap(),
            "secret\n",
            "{name}"
        );
    }
    let bad = k
        .wait_pod("badurl", 60, |p| {
            p["status"]["initContainerStatuses"][0]["state"]["waiting"]["reason"]
                == "RunContainerError"
        })
        .await;
    let msg = bad["status"]["initContainerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        msg.contains(&needle),
        "the failure names the repository: {msg}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (leaks, gits) = watcher.join().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(gits > 0, "the watcher never saw git talk to the server");
    let mut leaks = leaks;
    leaks.sort();
    leaks.dedup();
    leaks.truncate(3);
    assert!(leaks.is_empty(), "a password on a command line: {leaks:?}");
    // Statuses, events and logs.
    let mut said = String::new();
    for name in ["flag", "env", "inurl", "badurl"] {
        said.push_str(&k.pod(name).await.unwrap()["status"].to_string());
        said.push_str(&k.logs(name, "git-sync").await);
    }
    let (_, events) = k.get("/api/v1/namespaces/default/events").await;
    said.push_str(&events.to_string());
    assert!(said.contains("synced http://"), "{said}");
    for s in &secrets {
        assert!(!said.contains(s.as_str()), "{s} leaked: {said}");
    }
}
