//! End-to-end tests of WASM pods through a real `kapsel serve`: exit codes, traps, memory and
//! CPU limits, volumes, logs, restarts with back-off, deletion, bad images.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn hello_runs_to_completion_with_args_env_and_logs() {
    let k = Kapsel::start();
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hello\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {}\n    args: [\"Kapsel\", \"tester\"]\n    env:\n    - name: GREETING\n      value: Hi\n",
        repo("sample-pods/hello/hello.wasm").display()
    );
    k.apply("hello", &yaml);
    let p = k.wait_pod("hello", 20, |p| phase(p) == "Succeeded").await;
    let t = &state(&p, 0)["terminated"];
    assert_eq!(t["exitCode"], 0);
    assert_eq!(t["reason"], "Completed");
    assert_eq!(p["spec"]["nodeName"], k.node.as_str());
    let logs = k.logs("hello", "main").await;
    assert!(logs.contains("Hi, Kapsel tester!"), "{logs}");
    // The CLI shows the same through a table and JSON.
    let out = k.cli(&["get", "pods"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("hello") && table.contains("Completed"),
        "{table}"
    );
    let out = k.cli(&["get", "pod", "hello", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"]["phase"], "Succeeded");
    let out = k.cli(&["logs", "hello"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Hi, Kapsel tester!"));
    let ev = k.events_for("hello").await;
    let reasons: Vec<&str> = ev.iter().filter_map(|e| e["reason"].as_str()).collect();
    assert!(
        reasons.contains(&"Scheduled") && reasons.contains(&"Started"),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_code_and_trap_become_terminated_states() {
    let k = Kapsel::start();
    k.apply(
        "exit3",
        &pod_yaml("exit3", &fixture("exit3.wat"), &[], "Never", ""),
    );
    k.apply(
        "trap",
        &pod_yaml("trap", &fixture("trap.wat"), &[], "Never", ""),
    );
    let p = k.wait_pod("exit3", 20, |p| phase(p) == "Failed").await;
    assert_eq!(state(&p, 0)["terminated"]["exitCode"], 3);
    assert_eq!(state(&p, 0)["terminated"]["reason"], "Error");
    let p = k.wait_pod("trap", 20, |p| phase(p) == "Failed").await;
    let t = &state(&p, 0)["terminated"];
    assert_eq!(t["reason"], "Error");
    assert_eq!(t["exitCode"], 134);
    let msg = t["message"].as_str().unwrap();
    assert!(msg.contains("unreachable"), "trap text missing: {msg}");
    // Output before the trap is kept.
    assert!(k.logs("trap", "main").await.contains("about to trap"));
    let out = k.cli(&["describe", "pod", "trap"]);
    let d = String::from_utf8_lossy(&out.stdout);
    assert!(
        d.contains("Terminated") && d.contains("unreachable") && d.contains("Events:"),
        "{d}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_limit_is_oomkilled() {
    let k = Kapsel::start();
    let res = "    resources:\n      limits:\n        memory: 16Mi\n";
    k.apply(
        "bomb",
        &pod_yaml("bomb", &fixture("membomb.wat"), &[], "Never", res),
    );
    let p = k.wait_pod("bomb", 20, |p| phase(p) == "Failed").await;
    let t = &state(&p, 0)["terminated"];
    assert_eq!(t["reason"], "OOMKilled", "{t}");
    assert_eq!(t["exitCode"], 137);
    assert!(t["message"].as_str().unwrap().contains("16Mi"));
    // The same bomb without a pool-sized limit runs on the on-demand engine and is capped too.
    let res = "    resources:\n      limits:\n        memory: 200Mi\n";
    k.apply(
        "bomb2",
        &pod_yaml("bomb2", &fixture("membomb.wat"), &[], "Never", res),
    );
    let p = k.wait_pod("bomb2", 30, |p| phase(p) == "Failed").await;
    assert_eq!(state(&p, 0)["terminated"]["reason"], "OOMKilled");
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf takes an integer name and has no other preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[tokio::test(flavor = "multi_thread")]
async fn cpu_limit_slices_a_busy_loop_and_delete_stops_it_fast() {
    let k = Kapsel::start();
    let res = "    resources:\n      limits:\n        cpu: 200m\n";
    k.apply(
        "spin",
        &pod_yaml("spin", &fixture("spin.wat"), &[], "Always", res),
    );
    k.wait_pod("spin", 20, |p| !state(p, 0)["running"].is_null())
        .await;
    // Other pods keep running next to the busy loop.
    k.apply(
        "tick",
        &pod_yaml("tick", &fixture("ticker/ticker.wasm"), &["5"], "Never", ""),
    );
    let started = Instant::now();
    k.wait_pod("tick", 10, |p| phase(p) == "Succeeded").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a neighbour was stalled"
    );
    // Over 2 s the whole server uses about the limit (0.2 CPU), far below a free-running loop.
    let c0 = cpu_seconds(k.pid());
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = (cpu_seconds(k.pid()) - c0) / t0.elapsed().as_secs_f64();
    assert!(
        used < 0.45,
        "busy loop used {used:.2} CPUs with a 200m limit"
    );
    assert!(used > 0.05, "busy loop did not run at all ({used:.2} CPUs)");
    // Delete stops it within 2 s.
    let t = Instant::now();
    let out = k.cli(&["delete", "pod", "spin"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    k.wait_gone("spin", 5).await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "delete took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unlimited_busy_loop_does_not_stall_other_pods_and_dies_on_delete() {
    let k = Kapsel::start();
    for i in 0..2 {
        k.apply(
            &format!("spin{i}"),
            &pod_yaml(&format!("spin{i}"), &fixture("spin.wat"), &[], "Always", ""),
        );
    }
    k.wait_pod("spin1", 20, |p| !state(p, 0)["running"].is_null())
        .await;
    let t = Instant::now();
    k.apply(
        "quick",
        &pod_yaml("quick", &fixture("quick.wat"), &[], "Never", ""),
    );
    k.wait_pod("quick", 10, |p| phase(p) == "Succeeded").await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    assert!(k.cli(&["delete", "pod", "spin0"]).status.success());
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "delete took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_modules_share_an_empty_dir_and_see_only_their_mounts() {
    let k = Kapsel::start();
    let files = fixture("files/files.wasm");
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: share
spec:
  restartPolicy: Never
  volumes:
  - name: data
    emptyDir: {{}}
  initContainers:
  - name: writer
    image: {files}
    args: ["write", "/data/msg.txt", "from the writer"]
    volumeMounts:
    - name: data
      mountPath: /data
  containers:
  - name: reader
    image: {files}
    args: ["read", "/data/msg.txt"]
    volumeMounts:
    - name: data
      mountPath: /data
      readOnly: true
  - name: escaper
    image: {files}
    args: ["read", "/data/../../../etc/hostname"]
    volumeMounts:
    - name: data
      mountPath: /data
  - name: nomount
    image: {files}
    args: ["read", "/etc/hostname"]
"#
    );
    k.apply("share", &yaml);
    let p = k
        .wait_pod("share", 20, |p| {
            phase(p) == "Failed" || phase(p) == "Succeeded"
        })
        .await;
    assert_eq!(phase(&p), "Failed", "escapes must fail");
    assert_eq!(k.logs("share", "reader").await.trim(), "from the writer");
    let statuses = p["status"]["containerStatuses"].as_array().unwrap();
    let code = |n: &str| {
        statuses.iter().find(|s| s["name"] == n).unwrap()["state"]["terminated"]["exitCode"].clone()
    };
    assert_eq!(code("reader"), 0);
    assert_eq!(code("escaper"), 1);
    assert_eq!(code("nomount"), 1);
    assert!(k.logs("share", "escaper").await.contains("files:"));
    // A read-only mount refuses writes.
    let ro = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ro\nspec:\n  restartPolicy: Never\n  volumes:\n  - name: d\n    emptyDir: {{}}\n  containers:\n  - name: main\n    image: {files}\n    args: [\"write\", \"/d/x\", \"y\"]\n    volumeMounts:\n    - name: d\n      mountPath: /d\n      readOnly: true\n"
    );
    k.apply("ro", &ro);
    let p = k
        .wait_pod("ro", 20, |p| {
            phase(p) == "Failed" || phase(p) == "Succeeded"
        })
        .await;
    assert_eq!(phase(&p), "Failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_always_backs_off_with_growing_delays() {
    let k = Kapsel::start();
    k.apply(
        "crash",
        &pod_yaml("crash", &fixture("exit3.wat"), &[], "Always", ""),
    );
    let mut saw_backoff = false;
    let mut restart_times: Vec<(i64, Instant)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let p = k.pod("crash").await.unwrap();
        let cs = &p["status"]["containerStatuses"][0];
        if cs["state"]["waiting"]["reason"] == "CrashLoopBackOff" {
            saw_backoff = true;
        }
        let n = cs["restartCount"].as_i64().unwrap_or(0);
        if restart_times.last().map(|(c, _)| *c != n).unwrap_or(true) {
            restart_times.push((n, Instant::now()));
        }
        if n >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_backoff, "never saw CrashLoopBackOff");
    assert!(
        restart_times.last().unwrap().0 >= 4,
        "restarts: {restart_times:?}"
    );
    assert_eq!(phase(&k.pod("crash").await.unwrap()), "Running");
    // Delays grow: 200ms, 400ms, 800ms...
    let gaps: Vec<Duration> = restart_times.windows(2).map(|w| w[1].1 - w[0].1).collect();
    let n = gaps.len();
    assert!(gaps[n - 1] > gaps[n - 3], "back-off did not grow: {gaps:?}");
    let ev = k.events_for("crash").await;
    assert!(ev.iter().any(|e| e["reason"] == "BackOff"));
}

#[tokio::test(flavor = "multi_thread")]
async fn on_failure_restarts_until_success_is_not_needed_and_init_order_holds() {
    let k = Kapsel::start();
    let files = fixture("files/files.wasm");
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: order\nspec:\n  restartPolicy: OnFailure\n  volumes:\n  - name: d\n    emptyDir: {{}}\n  initContainers:\n  - name: first\n    image: {files}\n    args: [\"append\", \"/d/log\", \"first\"]\n    volumeMounts: [{{name: d, mountPath: /d}}]\n  - name: second\n    image: {files}\n    args: [\"append\", \"/d/log\", \"second\"]\n    volumeMounts: [{{name: d, mountPath: /d}}]\n  containers:\n  - name: main\n    image: {files}\n    args: [\"read\", \"/d/log\"]\n    volumeMounts: [{{name: d, mountPath: /d}}]\n"
    );
    k.apply("order", &yaml);
    let p = k.wait_pod("order", 20, |p| phase(p) == "Succeeded").await;
    assert_eq!(k.logs("order", "main").await, "first\nsecond\n");
    assert_eq!(
        p["status"]["initContainerStatuses"][1]["state"]["terminated"]["exitCode"],
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_images_report_clear_waiting_reasons_and_the_node_keeps_serving() {
    let k = Kapsel::start();
    k.apply(
        "missing",
        &pod_yaml("missing", "/nonexistent/app.wasm", &[], "Always", ""),
    );
    k.apply(
        "notwasm",
        &pod_yaml("notwasm", &fixture("not-wasm.wasm"), &[], "Always", ""),
    );
    let p = k
        .wait_pod("missing", 10, |p| {
            matches!(
                state(p, 0)["waiting"]["reason"].as_str(),
                Some("ErrImagePull") | Some("ImagePullBackOff")
            )
        })
        .await;
    assert!(state(&p, 0)["waiting"]["message"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/app.wasm"));
    assert_eq!(phase(&p), "Pending");
    let p = k
        .wait_pod("notwasm", 10, |p| {
            state(p, 0)["waiting"]["reason"] == "CreateContainerError"
        })
        .await;
    let msg = state(&p, 0)["waiting"]["message"].as_str().unwrap();
    assert!(msg.contains("not a WebAssembly module"), "{msg}");
    let ev = k.events_for("notwasm").await;
    assert!(ev
        .iter()
        .any(|e| e["reason"] == "Failed" && e["type"] == "Warning"));
    // Everything else still works.
    k.apply(
        "ok",
        &pod_yaml("ok", &fixture("quick.wat"), &[], "Never", ""),
    );
    k.wait_pod("ok", 10, |p| phase(p) == "Succeeded").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_streams_new_lines_and_tail_limits() {
    let k = Kapsel::start();
    k.apply(
        "ticker",
        &pod_yaml(
            "ticker",
            &fixture("ticker/ticker.wasm"),
            &["30"],
            "Never",
            "",
        ),
    );
    k.wait_pod("ticker", 10, |p| !state(p, 0)["running"].is_null())
        .await;
    let mut resp = k
        .http
        .get(format!(
            "{}/api/v1/namespaces/default/pods/ticker/log?follow=true",
            k.url
        ))
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains("tick 8\n") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), resp.chunk()).await {
            Ok(Ok(Some(c))) => seen.push_str(&String::from_utf8_lossy(&c)),
            _ => break,
        }
    }
    assert!(
        seen.contains("tick 1\n") && seen.contains("tick 8\n"),
        "{seen}"
    );
    let out = k.cli(&["logs", "ticker", "--tail", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    // After the pod finishes, `logs -f` ends by itself.
    k.wait_pod("ticker", 20, |p| phase(p) == "Succeeded").await;
    let out = k.cli(&["logs", "-f", "ticker"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("tick 30"));
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_removes_the_pod_and_its_directory() {
    let k = Kapsel::start();
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: idle\nspec:\n  volumes:\n  - name: d\n    emptyDir: {{}}\n  containers:\n  - name: main\n    image: {}\n    volumeMounts: [{{name: d, mountPath: /d}}]\n",
        fixture("sleep.wat")
    );
    k.apply("idle", &yaml);
    let p = k
        .wait_pod("idle", 10, |p| !state(p, 0)["running"].is_null())
        .await;
    let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
    let dir = k.data.join("pods").join(&uid);
    assert!(dir.join("volumes/d").is_dir());
    let out = k.cli(&["delete", "pod", "idle"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "pod \"idle\" deleted"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while dir.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!dir.exists(), "pod directory left behind");
    let out = k.cli(&["delete", "pod", "idle"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_and_restart_loses_nothing_and_restarts_always_pods() {
    let mut k = Kapsel::start();
    k.apply(
        "done",
        &pod_yaml("done", &fixture("quick.wat"), &[], "Never", ""),
    );
    k.apply(
        "forever",
        &pod_yaml("forever", &fixture("ticker/ticker.wasm"), &[], "Always", ""),
    );
    k.apply(
        "never",
        &pod_yaml("never", &fixture("sleep.wat"), &[], "Never", ""),
    );
    k.wait_pod("done", 10, |p| phase(p) == "Succeeded").await;
    k.wait_pod("forever", 10, |p| !state(p, 0)["running"].is_null())
        .await;
    k.wait_pod("never", 10, |p| !state(p, 0)["running"].is_null())
        .await;
    let uid_before = k.pod("forever").await.unwrap()["metadata"]["uid"].clone();
    // An orphan directory that no pod owns must be cleaned up on restart.
    let orphan = k.data.join("pods").join("00000000-orphan");
    std::fs::create_dir_all(orphan.join("volumes")).unwrap();
    k.kill9();
    k.restart();
    let (_, list) = k.get("/api/v1/namespaces/default/pods").await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let p = k
        .wait_pod("forever", 15, |p| {
            p["status"]["containerStatuses"][0]["restartCount"]
                .as_i64()
                .unwrap_or(0)
                >= 1
                && !state(p, 0)["running"].is_null()
        })
        .await;
    assert_eq!(p["metadata"]["uid"], uid_before);
    // The Never pod's instance died with the node: it is reported, not silently re-run.
    let p = k.wait_pod("never", 15, |p| phase(p) == "Failed").await;
    assert!(state(&p, 0)["terminated"]["message"]
        .as_str()
        .unwrap()
        .contains("lost"));
    assert_eq!(phase(&k.pod("done").await.unwrap()), "Succeeded");
    let deadline = Instant::now() + Duration::from_secs(5);
    while orphan.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!orphan.exists(), "orphan directory not removed");
    // The logs from before the crash survive.
    assert!(k.logs("forever", "main").await.contains("tick 1"));
    // Compiled modules come from the on-disk cache after the restart: no `Compiling` event.
    assert!(
        std::fs::read_dir(k.data.join("cache/wasm"))
            .unwrap()
            .count()
            >= 2
    );
    k.apply(
        "again",
        &pod_yaml("again", &fixture("quick.wat"), &[], "Never", ""),
    );
    k.wait_pod("again", 10, |p| phase(p) == "Succeeded").await;
    let events = k.events_for("again").await;
    assert!(
        !events.iter().any(|e| e["reason"] == "Compiling"),
        "module was recompiled: {events:?}"
    );
    // The node's progress is never in the container's own output.
    let logs = k.logs("again", "main").await;
    assert_eq!(logs, "ok\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn unschedulable_pod_stays_pending_with_a_reason() {
    let k = Kapsel::start();
    let res = "    resources:\n      requests:\n        memory: 100Ti\n";
    k.apply(
        "huge",
        &pod_yaml("huge", &fixture("quick.wat"), &[], "Never", res),
    );
    let p = k
        .wait_pod("huge", 10, |p| {
            p["status"]["conditions"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .any(|c| c["type"] == "PodScheduled" && c["status"] == "False")
                })
                .unwrap_or(false)
        })
        .await;
    assert_eq!(phase(&p), "Pending");
    assert!(p["spec"]["nodeName"].is_null());
    // A FailedScheduling event names the reason (an earlier one may predate the node).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = k.events_for("huge").await;
        if ev.iter().any(|e| {
            e["reason"] == "FailedScheduling"
                && e["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Insufficient memory")
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no FailedScheduling naming memory: {ev:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Unbound pods delete at once.
    assert!(k.cli(&["delete", "pod", "huge"]).status.success());
}
