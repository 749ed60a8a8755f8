//! `builtin/git-sync` in real pods against real repositories (bare repos over `file://` and
//! `git daemon` on loopback): sync and serve, atomic flips under a reader, refs, failures,
//! hooks, and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The emptyDir of a pod on the host.
async fn volume(k: &Kapsel, pod: &str) -> PathBuf {
    let p = k.pod(pod).await.unwrap();
    k.data
        .join("pods")
        .join(p["metadata"]["uid"].as_str().unwrap())
        .join("volumes/git")
}

#[tokio::test(flavor = "multi_thread")]
async fn pushed_commits_are_served_within_period_plus_one_second() {
    let remote = Remote::new();
    remote.commit(&[("index.html", "v1\n".into())]);
    let k = Kapsel::start();
    let port = free_port();
    // The server's root is the volume, and every request goes through the link (a server
    // rooted *at* the link would stay in the first worktree it resolved).
    let app = format!(
        "  - name: web\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n    command: [httpd, -f, -p, \"8000\", -h, /git]\n    volumeMounts: [{{name: git, mountPath: /git, readOnly: true}}]\n    ports: [{{containerPort: 8000, hostPort: {port}}}]\n"
    );
    let args = vec![
        format!("--repo={}", remote.url()),
        "--root=/git".into(),
        "--link=site".into(),
        "--period=500ms".into(),
    ];
    k.apply("site", &gitsync_pod("site", &args, &app));
    // The app starts only after the first sync: its first answer is already v1.
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(b) = http_get(port, "/site/index.html").await {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "site never served: {}",
            k.stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(first, "v1\n");
    for v in 2..=4 {
        let want = format!("v{v}\n");
        remote.commit(&[("index.html", want.clone())]);
        let t = Instant::now();
        loop {
            if http_get(port, "/site/index.html").await.as_deref() == Some(want.as_str()) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_millis(1500),
                "commit v{v} not served within period + 1 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Only the current and the previous worktree are kept.
    let wts = std::fs::read_dir(volume(&k, "site").await.join(".worktrees"))
        .unwrap()
        .count();
    assert!(wts <= 2, "{wts} worktrees kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_never_sees_a_missing_or_partial_tree_during_20_syncs() {
    let remote = Remote::new();
    let files = |n: usize| -> Vec<(String, String)> {
        (0..40)
            .map(|i| (format!("f{i}.txt"), format!("{n}\n")))
            .collect()
    };
    let push = |n: usize| {
        let f = files(n);
        let refs: Vec<(&str, String)> = f.iter().map(|(a, b)| (a.as_str(), b.clone())).collect();
        remote.commit(&refs)
    };
    push(0);
    let k = Kapsel::start();
    let args = vec![
        format!("--repo={}", remote.url()),
        "--root=/git".into(),
        "--link=site".into(),
        "--period=100ms".into(),
    ];
    let app = format!("  - name: idle\n    image: {}\n", fixture("sleep.wat"));
    k.apply("atomic", &gitsync_pod("atomic", &args, &app));
    k.wait_pod("atomic", 30, |p| !state(p, 0)["running"].is_null())
        .await;
    let root = volume(&k, "atomic").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, root2) = (stop.clone(), root.clone());
    let reader = std::thread::spawn(move || {
        let mut reads = 0u64;
        let mut seen = std::collections::BTreeSet::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            // As a web server does: resolve the link, then read the tree under it.
            let target = std::fs::read_link(root2.join("site")).expect("link missing");
            let dir = root2.join(target);
            let mut values = std::collections::BTreeSet::new();
            for i in 0..40 {
                let v = std::fs::read_to_string(dir.join(format!("f{i}.txt")))
                    .unwrap_or_else(|e| panic!("f{i}.txt missing under {}: {e}", dir.display()));
                values.insert(v);
            }
            assert_eq!(values.len(), 1, "a partial tree: {values:?}");
            seen.insert(values.into_iter().next().unwrap());
            reads += 1;
        }
        (reads, seen.len())
    });
    for n in 1..=20 {
        push(n);
        let want = format!("{n}\n");
        let t = Instant::now();
        while std::fs::read_to_string(root.join("site/f0.txt"))
            .ok()
            .as_deref()
            != Some(want.as_str())
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "sync {n} never landed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, versions) = reader.join().expect("the reader saw a broken tree");
    assert!(reads > 100, "only {reads} reads");
    assert!(versions >= 10, "the reader saw only {versions} versions");
}

#[tokio::test(flavor = "multi_thread")]
async fn refs_tags_commits_and_a_git_daemon_remote() {
    let remote = Remote::new();
    let c1 = remote.commit(&[("v.txt", "one\n".into())]);
    git(&remote.work, &["tag", "v1"]);
    git(
        &remote.work,
        &["push", "-q", remote.bare.to_str().unwrap(), "v1"],
    );
    let c2 = remote.commit(&[("v.txt", "two\n".into())]);
    remote.commit(&[("v.txt", "three\n".into())]);
    // Serve the bare repo with `git daemon` on loopback.
    let port = free_port();
    let base = remote.bare.parent().unwrap().to_path_buf();
    // `git-daemon` itself (`git daemon` would run it as a child that outlives a kill).
    let exec_path = git(&base, &["--exec-path"]);
    let mut daemon = Command::new(Path::new(&exec_path).join("git-daemon"))
        .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", base.display()))
        .arg(&base)
        .spawn()
        .unwrap();
    let url = format!("git://127.0.0.1:{port}/site.git");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let k = Kapsel::start();
    let app = format!("  - name: idle\n    image: {}\n", fixture("sleep.wat"));
    for (name, r, want, hash) in [
        ("tag", "v1", "one\n", &c1),
        ("commit", c2.as_str(), "two\n", &c2),
        ("branch", "main", "three\n", &String::new()),
    ] {
        let args = vec![
            format!("--repo={url}"),
            "--root=/git".into(),
            format!("--ref={r}"),
            "--period=1s".into(),
            "--depth=0".into(),
        ];
        k.apply(name, &gitsync_pod(name, &args, &app));
        k.wait_pod(name, 30, |p| !state(p, 0)["running"].is_null())
            .await;
        let root = volume(&k, name).await;
        assert_eq!(
            std::fs::read_to_string(root.join("site/v.txt")).unwrap(),
            want,
            "--ref={r}"
        );
        if !hash.is_empty() {
            assert_eq!(
                std::fs::read_link(root.join("site"))
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap(),
                hash.as_str()
            );
        }
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_remote_keeps_the_last_tree_and_is_reported_then_recovers() {
    let remote = Remote::new();
    remote.commit(&[("v.txt", "good\n".into())]);
    let k = Kapsel::start();
    let args = vec![
        format!("--repo={}", remote.url()),
        "--root=/git".into(),
        "--period=200ms".into(),
        "--max-failures=-1".into(),
    ];
    let app = format!("  - name: idle\n    image: {}\n", fixture("sleep.wat"));
    k.apply("flaky", &gitsync_pod("flaky", &args, &app));
    k.wait_pod("flaky", 30, |p| !state(p, 0)["running"].is_null())
        .await;
    let root = volume(&k, "flaky").await;
    // The remote goes away.
    let moved = remote.bare.with_extension("gone");
    std::fs::rename(&remote.bare, &moved).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ev = k.events_for("flaky").await;
        if ev.iter().any(|e| {
            e["reason"] == "GitSyncFailed"
                && e["message"].as_str().unwrap_or("").contains("keeping")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "failure not reported: {ev:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        std::fs::read_to_string(root.join("site/v.txt")).unwrap(),
        "good\n"
    );
    assert!(k.logs("flaky", "git-sync").await.contains("sync failed"));
    // It comes back: syncing resumes.
    std::fs::rename(&moved, &remote.bare).unwrap();
    remote.commit(&[("v.txt", "better\n".into())]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::read_to_string(root.join("site/v.txt")).unwrap() != "better\n" {
        assert!(Instant::now() < deadline, "did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A bad ref with the default --max-failures=0: the sidecar fails to start and says why;
    // the app stays waiting for it.
    let args = vec![
        format!("--repo={}", remote.url()),
        "--root=/git".into(),
        "--ref=no-such-branch".into(),
    ];
    k.apply("badref", &gitsync_pod("badref", &args, &app));
    let p = k
        .wait_pod("badref", 30, |p| {
            p["status"]["initContainerStatuses"][0]["state"]["waiting"]["reason"]
                == "RunContainerError"
        })
        .await;
    let msg = p["status"]["initContainerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("no-such-branch"), "{msg}");
    assert!(p["status"]["containerStatuses"][0]["state"]["running"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn exechook_and_webhook_get_the_hash() {
    let remote = Remote::new();
    let hash = remote.commit(&[("v.txt", "x\n".into())]);
    // A webhook receiver.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let wport = listener.local_addr().unwrap().port();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |h: axum::http::HeaderMap| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(
                    h.get("gitsync-hash")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string(),
                );
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let hport = free_port();
    let k = Kapsel::start();
    let args = vec![
        format!("--repo={}", remote.url()),
        "--root=/git".into(),
        "--period=1s".into(),
        "--exechook-command=echo \"hook $GITSYNC_HASH $(cat v.txt)\" >> ../../hooks.log".into(),
        format!("--webhook-url=http://127.0.0.1:{wport}/hook"),
    ];
    // The exechook runs in the pod's OCI container (in the worktree as it sees it).
    let app = format!(
        "  - name: app\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n    command: [sleep, \"3600\"]\n    volumeMounts: [{{name: git, mountPath: /git}}]\n"
    );
    k.apply("hooks", &gitsync_pod("hooks", &args, &app));
    let got = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("webhook never called")
        .unwrap();
    assert_eq!(got, hash);
    let root = volume(&k, "hooks").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        if let Ok(l) = std::fs::read_to_string(root.join("hooks.log")) {
            if l.ends_with('\n') {
                break l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "exechook never ran: {}",
            k.logs("hooks", "git-sync").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(log, format!("hook {hash} x\n"));
    // --http-bind (in a pod without a network namespace of its own, so the test can reach
    // it): ready after the first sync, and metrics.
    let args = vec![
        format!("--repo={}", remote.url()),
        "--root=/git".into(),
        "--period=1s".into(),
        format!("--http-bind=127.0.0.1:{hport}"),
    ];
    let idle = format!("  - name: idle\n    image: {}\n", fixture("sleep.wat"));
    k.apply("status", &gitsync_pod("status", &args, &idle));
    k.wait_pod("status", 30, |p| !state(p, 0)["running"].is_null())
        .await;
    assert_eq!(http_get(hport, "/").await.as_deref(), Some("ok\n"));
    let m = http_get(hport, "/metrics").await.unwrap();
    let ok: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("git_sync_count_total{status=\"success\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(ok >= 1, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_named() {
    let k = Kapsel::start();
    let app = format!("  - name: idle\n    image: {}\n", fixture("sleep.wat"));
    let cases = [
        (
            "norepo",
            vec!["--root=/git".to_string()],
            "required flag missing: --repo",
        ),
        (
            "unknown",
            vec![
                "--repo=file:///x".into(),
                "--root=/git".into(),
                "--colour=red".into(),
            ],
            "unexpected argument '--colour' found",
        ),
        (
            "outside",
            vec!["--repo=file:///x".into(), "--root=/etc".into()],
            "outside the container's writable volume mounts",
        ),
    ];
    for (name, args, want) in cases {
        k.apply(name, &gitsync_pod(name, &args, &app));
        let p = k
            .wait_pod(name, 20, |p| {
                p["status"]["initContainerStatuses"][0]["state"]["waiting"]["reason"]
                    == "CreateContainerConfigError"
            })
            .await;
        let msg = p["status"]["initContainerStatuses"][0]["state"]["waiting"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(msg.contains(want), "{name}: {msg}");
        // The app never started.
        assert!(p["status"]["containerStatuses"][0]["state"]["running"].is_null());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http_basic_auth_with_a_password_file() {
    let remote = Remote::new();
    remote.commit(&[("v.txt", "secret\n".into())]);
    let port = free_port();
    let base = remote.bare.parent().unwrap().to_path_buf();
    let mut server = Command::new("python3")
        .arg(repo("tests/support/git_http_auth.py"))
        .args([&port.to_string(), base.to_str().unwrap(), "alice", "s3cret"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "auth server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let k = Kapsel::start();
    // The password file lives in a hostPath volume, read-only, as a Secret would be.
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("password"), "s3cret\n").unwrap();
    std::fs::write(secrets.path().join("wrong"), "nope\n").unwrap();
    let url = format!("http://127.0.0.1:{port}/site.git");
    for (name, file) in [("auth-ok", "password"), ("auth-bad", "wrong")] {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  volumes:\n  - {{name: git, emptyDir: {{}}}}\n  - {{name: secret, hostPath: {{path: {}}}}}\n  initContainers:\n  - name: git-sync\n    image: builtin/git-sync\n    restartPolicy: Always\n    args: [\"--repo={url}\", \"--root=/git\", \"--username=alice\", \"--password-file=/etc/git-secret/{file}\"]\n    volumeMounts:\n    - {{name: git, mountPath: /git}}\n    - {{name: secret, mountPath: /etc/git-secret, readOnly: true}}\n  containers:\n  - name: idle\n    image: {}\n",
            secrets.path().display(),
            fixture("sleep.wat")
        );
        k.apply(name, &yaml);
    }
    k.wait_pod("auth-ok", 30, |p| !state(p, 0)["running"].is_null())
        .await;
    assert_eq!(
        std::fs::read_to_string(volume(&k, "auth-ok").await.join("site/v.txt")).unwrap(),
        "secret\n"
    );
    // Wrong password: the sync fails (401) and the app never starts.
    let p = k
        .wait_pod("auth-bad", 30, |p| {
            p["status"]["initContainerStatuses"][0]["state"]["waiting"]["reason"]
                == "RunContainerError"
        })
        .await;
    assert!(p["status"]["containerStatuses"][0]["state"]["running"].is_null());
    let _ = server.kill();
    let _ = server.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn help_and_bad_flags_standalone_and_in_a_pod() {
    // Standalone: --help on stdout, exit 0; a bad flag or variable: exit 2, one line naming it.
    let out = Command::new(bin())
        .args(["git-sync", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--repo") && help.contains("GITSYNC_REPO") && help.contains("--one-time"),
        "{help}"
    );
    let root = tempfile::tempdir().unwrap();
    let root_flag = format!("--root={}", root.path().display());
    for (args, env, names) in [
        (
            vec!["--repo=file:///x", "--colour=red"],
            None,
            vec!["--colour"],
        ),
        (
            vec!["--repo=file:///x", "--one-time=maybe"],
            None,
            vec!["--one-time"],
        ),
        (
            vec!["--repo=file:///x"],
            Some(("GITSYNC_PERIOD", "soon")),
            vec!["--period", "GITSYNC_PERIOD"],
        ),
        (vec![], None, vec!["--repo", "GITSYNC_REPO"]),
    ] {
        let mut c = Command::new(bin());
        c.arg("git-sync").args(&args).arg(&root_flag);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        for n in names {
            assert!(err.contains(n), "{args:?} should name {n}: {err}");
        }
    }

    // In a pod: --help goes to the container's log and the container exits 0; a bad variable
    // is a config error naming the flag and the variable.
    let k = Kapsel::start();
    k.apply(
        "gs-help",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: gs-help}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: git-sync\n    image: builtin/git-sync\n    args: [--help]\n",
    );
    let p = k
        .wait_pod("gs-help", 30, |p| !state(p, 0)["terminated"].is_null())
        .await;
    assert_eq!(state(&p, 0)["terminated"]["exitCode"], 0, "{p}");
    let log = k.logs("gs-help", "git-sync").await;
    assert!(
        log.contains("--repo") && log.contains("GITSYNC_REPO"),
        "{log}"
    );
    let app = format!("  - name: idle\n    image: {}\n", fixture("sleep.wat"));
    let yaml = gitsync_pod(
        "gs-badenv",
        &["--repo=file:///x".to_string(), "--root=/git".to_string()],
        &app,
    )
    .replace(
        "    restartPolicy: Always\n",
        "    restartPolicy: Always\n    env: [{name: GITSYNC_PERIOD, value: soon}]\n",
    );
    k.apply("gs-badenv", &yaml);
    let p = k
        .wait_pod("gs-badenv", 20, |p| {
            p["status"]["initContainerStatuses"][0]["state"]["waiting"]["reason"]
                == "CreateContainerConfigError"
        })
        .await;
    let msg = p["status"]["initContainerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap();
    assert!(
        msg.contains("--period") && msg.contains("GITSYNC_PERIOD"),
        "{msg}"
    );
}
