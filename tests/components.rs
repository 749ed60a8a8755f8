//! WASI 0.2 components with networking, and `kapsel up` as a user runs it. Components are
//! built from source by `scripts/build-guests.sh` (componentize-py) when missing.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn components_serve_http_talk_over_localhost_and_listen_only_on_declared_ports() {
    let web = component("sample-pods/http-server");
    let echo = component("tests/fixtures/echo-server");
    let connect = component("tests/fixtures/connect");
    let k = Kapsel::start();

    // 1. An HTTP server component in its own network namespace, reachable through hostPort.
    let port = free_port();
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: web\n    image: {web}\n    env: [{{name: PORT, value: \"{port}\"}}]\n    ports: [{{containerPort: {port}, hostPort: {port}}}]\n"
    );
    k.apply("web", &yaml);
    let deadline = Instant::now() + Duration::from_secs(180);
    let body = loop {
        if let Some(b) = http_get(port, "/from/the/host").await {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "component never answered: {}",
            k.logs("web", "web").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.contains("hello from kapsel wasm component"), "{body}");
    assert!(body.contains("/from/the/host"));
    assert!(k
        .logs("web", "web")
        .await
        .contains(&format!("listening on {port}")));

    // 2. Listening on an undeclared port is refused.
    let (declared, wanted) = (free_port(), free_port());
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: sneaky\nspec:\n  restartPolicy: Never\n  containers:\n  - name: web\n    image: {web}\n    env: [{{name: PORT, value: \"{wanted}\"}}]\n    ports: [{{containerPort: {declared}}}]\n"
    );
    k.apply("sneaky", &yaml);
    let p = k.wait_pod("sneaky", 60, |p| phase(p) == "Failed").await;
    assert_ne!(state(&p, 0)["terminated"]["exitCode"], 0);
    assert!(
        http_get(wanted, "/").await.is_none(),
        "undeclared port is serving"
    );

    // 3. Two components in one pod: a client reaches the server over 127.0.0.1.
    let eport = free_port();
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pair\nspec:\n  restartPolicy: OnFailure\n  containers:\n  - name: echo\n    image: {echo}\n    env: [{{name: PORT, value: \"{eport}\"}}]\n    ports: [{{containerPort: {eport}}}]\n  - name: client\n    image: {connect}\n    env: [{{name: PORT, value: \"{eport}\"}}]\n"
    );
    k.apply("pair", &yaml);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let logs = k.logs("pair", "client").await;
        if logs.contains("reply: ping") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "client never got its echo: {logs}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let p = k
        .wait_pod("pair", 30, |p| {
            p["status"]["containerStatuses"][1]["state"]["terminated"]["exitCode"] == 0
        })
        .await;
    assert_eq!(p["status"]["containerStatuses"][1]["name"], "client");
}

#[test]
fn up_prints_the_hello_output_and_exits_zero_and_compiles_once_per_user() {
    // `up` keeps compiled modules in the user's cache ($XDG_CACHE_HOME/kapsel/wasm).
    let cache = tempfile::tempdir().unwrap();
    let up = || {
        let out = Command::new(bin())
            .current_dir(repo(""))
            .env("XDG_CACHE_HOME", cache.path())
            .args([
                "up",
                "-f",
                "sample-pods/hello.yaml",
                "--listen",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stdout}{stderr}");
        (stdout, stderr)
    };
    let (stdout, stderr) = up();
    // The container's output, and only its output: the node's "compiling" note is progress.
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "hello/hello | Howdy, Kapsel user! (from a WASM container in a Kapsel pod)",
            "hello/hello | argv: [\"hello.wasm\", \"Kapsel\", \"user\"]",
        ],
        "{stdout}"
    );
    assert!(
        stderr.contains("pod/hello container hello: compiling"),
        "{stderr}"
    );
    // (A quick pod may go from Pending to Succeeded in one status write: Running is optional.)
    assert!(stderr.contains("pod/hello Succeeded"), "{stderr}");
    let cached = std::fs::read_dir(cache.path().join("kapsel/wasm"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("cwasm".as_ref()))
        .count();
    assert!(cached >= 1, "nothing in the user's module cache");
    // A second run, with another temporary data directory, compiles nothing.
    let (stdout, stderr) = up();
    assert!(stdout.contains("Howdy"), "{stdout}");
    assert!(!stderr.contains("compiling"), "recompiled: {stderr}");
}

#[test]
fn up_whose_output_is_closed_stops_every_pod_and_leaves_no_container() {
    // `kapsel up … | head`: once head exits, up's writes fail. It must take the shutdown path.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("talk.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: talk\nspec:\n  containers:\n  - name: sh\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n    command: [sh, -c, 'while true; do echo line; sleep 0.05; done']\n  - name: wasm\n    image: {}\n",
            fixture("ticker/ticker.wasm")
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let cmd = format!(
        "'{}' up -f '{}' --data-dir '{}' --listen 127.0.0.1:0 2>&1 | head -n 12",
        bin(),
        manifest.display(),
        data.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &cmd])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("talk/sh | line"), "{out}");
    // head has exited; the pipeline ends only when up has.
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "up kept running with its output closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let node_id = std::fs::read_to_string(data.join("node-id")).unwrap();
    let left = docker_ids(&format!("io.kapsel.node-id={}", node_id.trim()));
    assert!(left.is_empty(), "containers left behind: {left:?}");
}

#[test]
fn up_stops_everything_on_ctrl_c_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("forever.yaml");
    std::fs::write(
        &manifest,
        pod_yaml("forever", &fixture("ticker/ticker.wasm"), &[], "Always", ""),
    )
    .unwrap();
    let mut child = Command::new(bin())
        .args([
            "up",
            "-f",
            manifest.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = lines.next().expect("up ended early").unwrap();
        if l.contains("forever/main | tick 2") {
            break;
        }
        assert!(Instant::now() < deadline);
    }
    // SAFETY: kill(2) takes plain integers; the pid is our own child, not yet reaped (so not reused).
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "up did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("stopped"), "{err}");
}
