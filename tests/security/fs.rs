//! The node's file system against its pods (issue 12): a `subPath` through a symlink a pod
//! member planted must not hand the host's `/` to the next container (WASM or Docker), a
//! normal nested `subPath` still works and leaves no mount behind, an `emptyDir` over its
//! `sizeLimit` gets its pod evicted, and the data directory is the node's alone.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{docker_ids, fixture, phase, Kapsel, BUSYBOX};

/// Mount points at or under `dir` in this (the node's) mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(&dir))
        .map(str::to_string)
        .collect()
}

fn waiting<'a>(pod: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    pod["status"][list]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| &c["state"]["waiting"])
        .filter(|w| w.is_object())
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod["status"][list]
        .as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == name))
        .unwrap_or(&Value::Null)
}

/// The container is refused with CreateContainerConfigError naming the subPath and volume.
fn refused_for_symlink(pod: &Value, name: &str) -> bool {
    waiting(pod, "containerStatuses", name)
        .map(|w| {
            let msg = w["message"].as_str().unwrap_or("");
            w["reason"] == "CreateContainerConfigError"
                && msg.contains("subPath \"esc\"")
                && msg.contains("volume \"data\"")
                && msg.contains("symbolic link")
        })
        .unwrap_or(false)
}

fn uid(pod: &Value) -> String {
    pod["metadata"]["uid"].as_str().unwrap().to_string()
}

/// What the refused containers must never have seen: the host's shadow file.
fn assert_never_ran(k: &Kapsel, pod: &Value, containers: &[&str]) {
    for c in containers {
        let st = container(pod, "containerStatuses", c);
        assert!(
            st["containerID"].is_null() && st["restartCount"].as_i64().unwrap_or(0) == 0,
            "container {c} was started: {st}"
        );
    }
    let ids = docker_ids(&format!("io.kapsel.pod.uid={}", uid(pod)));
    for id in ids {
        let out = std::process::Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{index .Config.Labels \"io.kapsel.container\"}}",
                &id,
            ])
            .output()
            .unwrap();
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            !containers.contains(&name.as_str()),
            "a Docker container was created for refused container {name} (node {})",
            k.node
        );
    }
}

/// A file name the escaping container would create in the host's /tmp, as root.
fn marker(k: &Kapsel, pod: &str) -> String {
    format!("kapsel-escaped-{pod}-{}", k.node)
}

/// The container did not write to the host; a marker left by a failed run is removed.
fn assert_not_escaped(marker: &str) {
    let p = Path::new("/tmp").join(marker);
    let escaped = p.exists();
    let _ = std::fs::remove_file(&p);
    assert!(!escaped, "a pod member wrote {} on the host", p.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn wasm_planted_symlink_subpath_does_not_reach_host_root() {
    let k = Kapsel::start();
    let marker = marker(&k, "esc-wasm");
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: esc-wasm
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  volumes:
  - name: data
    emptyDir: {{}}
  initContainers:
  - name: plant
    image: {plant}
    volumeMounts:
    - {{name: data, mountPath: /data}}
  containers:
  - name: reader-oci
    image: {BUSYBOX}
    command: ["sh", "-c", "cat /host/etc/shadow; touch /host/tmp/{marker}; sleep 3600"]
    volumeMounts:
    - {{name: data, mountPath: /host, subPath: esc}}
  - name: reader-wasm
    image: {files}
    args: ["read", "/host/etc/shadow"]
    volumeMounts:
    - {{name: data, mountPath: /host, subPath: esc}}
"#,
        plant = fixture("symlink-escape.wat"),
        files = fixture("files/files.wasm"),
    );
    k.apply("esc-wasm", &yaml);
    let pod = k
        .wait_pod("esc-wasm", 60, |p| {
            refused_for_symlink(p, "reader-oci") && refused_for_symlink(p, "reader-wasm")
        })
        .await;
    // The attack was set up: the guest planted the escaping symlink in the volume.
    let plant = container(&pod, "initContainerStatuses", "plant");
    assert_eq!(plant["state"]["terminated"]["exitCode"], 0, "{plant}");
    let link = k.data.join("pods").join(uid(&pod)).join("volumes/data/esc");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "{} is not the planted symlink",
        link.display()
    );
    assert_never_ran(&k, &pod, &["reader-oci", "reader-wasm"]);
    assert_not_escaped(&marker);
    let logs = k.logs("esc-wasm", "reader-oci").await + &k.logs("esc-wasm", "reader-wasm").await;
    assert!(!logs.contains("root:"), "host shadow leaked: {logs}");
    let events = k.events_for("esc-wasm").await;
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .unwrap_or("")
            .contains("subPath \"esc\"")),
        "no event names the subPath: {events:?}"
    );
    let out = k.cli(&["delete", "pod", "esc-wasm"]);
    assert!(out.status.success());
    k.wait_gone("esc-wasm", 30).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn busybox_planted_symlink_subpath_does_not_reach_host_root() {
    let k = Kapsel::start();
    let marker = marker(&k, "esc-oci");
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: esc-oci
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  volumes:
  - name: data
    emptyDir: {{}}
  initContainers:
  - name: plant
    image: {BUSYBOX}
    command: ["ln", "-s", "/", "/vol/esc"]
    volumeMounts:
    - {{name: data, mountPath: /vol}}
  containers:
  - name: reader-oci
    image: {BUSYBOX}
    command: ["sh", "-c", "cat /host/etc/shadow; touch /host/tmp/{marker}; sleep 3600"]
    volumeMounts:
    - {{name: data, mountPath: /host, subPath: esc}}
"#
    );
    k.apply("esc-oci", &yaml);
    let pod = k
        .wait_pod("esc-oci", 60, |p| refused_for_symlink(p, "reader-oci"))
        .await;
    let plant = container(&pod, "initContainerStatuses", "plant");
    assert_eq!(plant["state"]["terminated"]["exitCode"], 0, "{plant}");
    let link = k.data.join("pods").join(uid(&pod)).join("volumes/data/esc");
    assert_eq!(std::fs::read_link(&link).unwrap(), PathBuf::from("/"));
    assert_never_ran(&k, &pod, &["reader-oci"]);
    assert_not_escaped(&marker);
    let logs = k.logs("esc-oci", "reader-oci").await;
    assert!(!logs.contains("root:"), "host shadow leaked: {logs}");
    let out = k.cli(&["delete", "pod", "esc-oci"]);
    assert!(out.status.success());
    k.wait_gone("esc-oci", 30).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_subpath_works_for_wasm_and_docker_and_leaves_no_mount() {
    let k = Kapsel::start();
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: nested
spec:
  restartPolicy: OnFailure
  terminationGracePeriodSeconds: 1
  volumes:
  - name: data
    emptyDir: {{}}
  initContainers:
  - name: writer
    image: {files}
    args: ["write", "/sub/hello", "hi-from-wasm"]
    volumeMounts:
    - {{name: data, mountPath: /sub, subPath: a/b}}
  containers:
  - name: oci
    image: {BUSYBOX}
    command: ["sh", "-c", "cat /sub/hello; echo; cat /all/a/b/hello; echo; echo oci > /sub/from-oci; echo done; sleep 3600"]
    volumeMounts:
    - {{name: data, mountPath: /sub, subPath: a/b}}
    - {{name: data, mountPath: /all}}
  - name: wasm
    image: {files}
    args: ["ls", "/sub"]
    volumeMounts:
    - {{name: data, mountPath: /sub, subPath: a/b}}
"#,
        files = fixture("files/files.wasm"),
    );
    k.apply("nested", &yaml);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = k.logs("nested", "oci").await;
        if logs.contains("done") {
            assert_eq!(
                logs.matches("hi-from-wasm").count(),
                2,
                "the sub-path and the volume disagree: {logs}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "oci never ran: {logs}\n{:?}",
            k.pod("nested").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pod = k
        .wait_pod("nested", 30, |p| {
            container(p, "containerStatuses", "wasm")["state"]["terminated"]["exitCode"] == 0
        })
        .await;
    assert_eq!(phase(&pod), "Running");
    let ls = k.logs("nested", "wasm").await;
    assert!(ls.contains("hello"), "{ls}");
    let vol = k.data.join("pods").join(uid(&pod)).join("volumes/data/a/b");
    assert_eq!(
        std::fs::read_to_string(vol.join("from-oci")).unwrap(),
        "oci\n"
    );
    // The container got a node-private bind mount, not a path inside the volume.
    let pod_dir = k.data.join("pods").join(uid(&pod));
    let mounted = mounts_under(&pod_dir);
    assert!(
        !mounted.is_empty() && mounted.iter().all(|m| m.contains("/volume-subpaths/data/")),
        "expected sub-path bind mounts under {}: {mounted:?}",
        pod_dir.display()
    );
    let out = k.cli(&["delete", "pod", "nested"]);
    assert!(out.status.success());
    k.wait_gone("nested", 30).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pod_dir.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!pod_dir.exists(), "pod directory left behind");
    let left = mounts_under(&k.data);
    assert!(left.is_empty(), "mounts left under the data dir: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_dir_over_its_size_limit_evicts_the_pod() {
    let k = Kapsel::start_with(&["--volume-check-interval", "300ms"]);
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: hog
spec:
  restartPolicy: Always
  volumes:
  - name: scratch
    emptyDir:
      sizeLimit: 1Mi
  containers:
  - name: fill
    image: {BUSYBOX}
    command: ["sh", "-c", "dd if=/dev/zero of=/scratch/big bs=1M count=50; echo filled; sleep 3600"]
    volumeMounts:
    - {{name: scratch, mountPath: /scratch}}
"#
    );
    k.apply("hog", &yaml);
    let pod = k
        .wait_pod("hog", 90, |p| {
            phase(p) == "Failed" && p["status"]["reason"] == "Evicted"
        })
        .await;
    assert_eq!(
        pod["status"]["message"],
        "Usage of EmptyDir volume \"scratch\" exceeds the limit \"1Mi\"."
    );
    // Its container was stopped (and is not restarted: the pod is over).
    let pod = k
        .wait_pod("hog", 30, |p| {
            container(p, "containerStatuses", "fill")["state"]["terminated"].is_object()
        })
        .await;
    let uid = uid(&pod);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = std::process::Command::new("docker")
            .args(["ps", "-q", "--filter", "status=running", "--filter"])
            .arg(format!("label=io.kapsel.pod.uid={uid}"))
            .output()
            .unwrap();
        let running = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // The infra container may go last; no member of the pod may still run.
        let members: Vec<&str> = running.lines().collect();
        let mut app_running = false;
        for id in &members {
            let o = std::process::Command::new("docker")
                .args([
                    "inspect",
                    "-f",
                    "{{index .Config.Labels \"io.kapsel.container\"}}",
                    id,
                ])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&o.stdout).trim() == "fill" {
                app_running = true;
            }
        }
        if !app_running {
            break;
        }
        assert!(Instant::now() < deadline, "container fill still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = k.events_for("hog").await;
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "Evicted" && e["type"] == "Warning"),
        "no Evicted event: {events:?}"
    );
    // Still Failed/Evicted a moment later: the node does not start it again.
    let again = k.pod("hog").await.unwrap();
    assert_eq!(phase(&again), "Failed");
    assert_eq!(
        container(&again, "containerStatuses", "fill")["restartCount"],
        container(&pod, "containerStatuses", "fill")["restartCount"]
    );
    let out = k.cli(&["delete", "pod", "hog"]);
    assert!(out.status.success());
    k.wait_gone("hog", 30).await;
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn data_directory_is_private_to_the_node() {
    let mut k = Kapsel::start();
    // A data directory left world-readable (an older version, a careless mkdir) is tightened.
    k.kill9();
    for d in ["", "store", "pods", "cache"] {
        let p = k.data.join(d);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let db = k.data.join("store/kapsel.redb");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    k.restart();
    let yaml = crate::common::pod_yaml("talk", &fixture("quick.wat"), &[], "Never", "");
    k.apply("talk", &yaml);
    let pod = k.wait_pod("talk", 30, |p| phase(p) == "Succeeded").await;
    let log = k.data.join("pods").join(uid(&pod)).join("logs/main.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("ok")
    {
        assert!(Instant::now() < deadline, "no log at {}", log.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(mode(&k.data), 0o700, "data dir");
    for d in ["store", "pods", "cache"] {
        assert_eq!(mode(&k.data.join(d)), 0o700, "{d}");
    }
    assert_eq!(mode(&db), 0o600, "store database");
    assert_eq!(mode(&log), 0o600, "log file");
    // No file the node wrote (outside pod volumes) is readable by group or others.
    let mut stack = vec![k.data.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                if p.file_name().unwrap() != "volumes" {
                    stack.push(p);
                }
            } else if m.is_file() && p.extension().map(|x| x != "yaml").unwrap_or(true) {
                assert_eq!(
                    m.permissions().mode() & 0o077,
                    0,
                    "{} is readable by others",
                    p.display()
                );
            }
        }
    }
}
