//! `kapsel up`: like `docker compose up`. Starts an embedded control plane + node, applies the
//! manifests, shows each pod becoming ready, streams every container's log prefixed with
//! `pod/container |`, and exits when every pod has finished (0 if all succeeded) — or on
//! Ctrl-C / SIGTERM, or when its output is closed (`kapsel up | head`), after stopping every
//! pod, with 0. The node's own progress (compiling a module, pulling an image) comes from the
//! pods' events and is shown on stderr beside the pod states.
//!
//! Status lines go to stderr and logs to stdout; neither a closed stderr nor a closed stdout
//! may skip the shutdown path (a panic in `eprintln!` would leave containers behind), so
//! nothing here prints with a panicking macro.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::client::Client;
use super::manifest;
use crate::model::{Kind, Pod, PodPhase};
use crate::server::{Server, ServerConfig};
use crate::store::WatchFrom;

/// A status line on stderr; a closed stderr is not an error worth dying for.
fn say(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "kapsel: {line}");
}

pub async fn run(
    file: &Path,
    listen: &str,
    data_dir: Option<PathBuf>,
    max_pods: u64,
    api: &super::ApiOpts,
    wasm_default_memory_limit: Option<u64>,
    ns: &str,
) -> Result<i32> {
    let manifests = manifest::load(file)?;
    if manifests.is_empty() {
        bail!("{}: no objects found", file.display());
    }
    let tmp;
    let dir_given = data_dir.is_some();
    let dir = match data_dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new().prefix("kapsel-up-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    // Its own node name: `up` removes leftover containers of its node at start, and must never
    // touch those of a `kapsel serve` running on the same machine.
    let mut cfg = ServerConfig::new(
        listen,
        dir.clone(),
        &format!("{}-up", super::default_node_name()),
    );
    cfg.max_pods = max_pods;
    api.apply(&mut cfg);
    cfg.wasm_default_memory_limit = wasm_default_memory_limit;
    // A temporary data directory would recompile every module on every run: share the user's.
    if !dir_given {
        cfg.module_cache_dir = crate::server::user_module_cache();
    }
    let server = Server::start(cfg).await.with_context(|| {
        format!(
            "starting the embedded control plane (use --listen 127.0.0.1:0 if {listen} is taken)"
        )
    })?;
    say(format_args!(
        "control plane + node up at http://{} (data: {})",
        server.addr,
        dir.display()
    ));
    let client = Client::new(&format!("http://{}", server.addr));

    let mut watch = server.store.watch(Kind::Pod, None, WatchFrom::Current)?;
    // The node's progress (compiling, pulling) arrives as the pods' events.
    let mut events = server.store.watch(Kind::Event, None, WatchFrom::Current)?;
    let applied = super::apply(&client, &manifests, ns, say).await;
    if let Err(e) = applied {
        server.shutdown();
        server.wait().await;
        return Err(e);
    }
    let wanted: HashSet<(String, String)> = manifests
        .iter()
        .filter(|m| m.kind == "Pod")
        .map(|m| {
            (
                m.namespace.clone().unwrap_or_else(|| ns.to_string()),
                m.name.clone(),
            )
        })
        .collect();
    // Pods of the Deployments applied are shown and followed too (their ReplicaSets are
    // named `<deployment>-<hash>`); with a Deployment, `up` runs until stopped.
    let deployments: HashSet<(String, String)> = manifests
        .iter()
        .filter(|m| m.kind == "Deployment")
        .map(|m| {
            (
                m.namespace.clone().unwrap_or_else(|| ns.to_string()),
                m.name.clone(),
            )
        })
        .collect();
    let of_deployment = |pod: &Pod| {
        pod.metadata.owner_references.iter().any(|o| {
            o.kind == "ReplicaSet"
                && o.name
                    .rsplit_once('-')
                    .map(|(d, _)| deployments.contains(&(pod.ns().to_string(), d.to_string())))
                    .unwrap_or(false)
        })
    };

    let mut last: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut phases: BTreeMap<(String, String), PodPhase> = BTreeMap::new();
    let mut following: HashSet<(String, String, String)> = HashSet::new();
    let mut log_tasks = tokio::task::JoinSet::new();
    let signal = super::shutdown_signal();
    tokio::pin!(signal);
    let mut interrupted = false;
    let mut pending = std::mem::take(&mut watch.initial);
    // Cancelled by a log follower whose stdout is gone (`| head` exited).
    let output_closed = CancellationToken::new();
    let mut seen_uids: HashSet<String> = HashSet::new();
    let mut progress: Vec<serde_json::Value> = Vec::new();
    loop {
        for ev in pending.drain(..) {
            if ev.kind == Kind::Event {
                progress.push((*ev.object).clone());
                continue;
            }
            let Ok(pod) = serde_json::from_value::<Pod>((*ev.object).clone()) else {
                continue;
            };
            let key = (pod.ns().to_string(), pod.name().to_string());
            if !wanted.contains(&key) && !of_deployment(&pod) {
                continue;
            }
            if ev.type_ == crate::store::EventType::Deleted {
                say(format_args!("pod/{} deleted", pod.name()));
                last.remove(&key);
                continue;
            }
            let line = summary(&pod);
            if last.get(&key) != Some(&line) {
                say(format_args!("pod/{} {line}", pod.name()));
                last.insert(key.clone(), line);
            }
            phases.insert(key.clone(), pod.phase());
            seen_uids.insert(pod.uid().to_string());
            for c in pod
                .spec
                .init_containers
                .iter()
                .chain(pod.spec.containers.iter())
            {
                let k = (key.0.clone(), key.1.clone(), c.name.clone());
                if following.insert(k) {
                    let client = client.clone();
                    let (ns, name, cname) = (key.0.clone(), key.1.clone(), c.name.clone());
                    let closed = output_closed.clone();
                    log_tasks.spawn(async move {
                        if follow(&client, &ns, &name, &cname).await.is_err() {
                            closed.cancel();
                        }
                    });
                }
            }
        }
        // Node progress of the pods shown: compiling, pulling (Normal events of those reasons).
        progress.retain(|e| {
            let uid = e["involvedObject"]["uid"].as_str().unwrap_or_default();
            if !seen_uids.contains(uid) {
                // Its pod may not be shown yet: keep the event a few seconds.
                return progress_is_young(e);
            }
            let reason = e["reason"].as_str().unwrap_or_default();
            if matches!(
                reason,
                "Compiling" | "Compiled" | "Pulling" | "Pulled" | "Preparing"
            ) {
                say(format_args!(
                    "pod/{} {}",
                    e["involvedObject"]["name"].as_str().unwrap_or_default(),
                    e["message"].as_str().unwrap_or_default()
                ));
            }
            false
        });
        if !wanted.is_empty()
            && deployments.is_empty()
            && wanted
                .iter()
                .all(|k| phases.get(k).map(|p| p.is_terminal()).unwrap_or(false))
        {
            break;
        }
        tokio::select! {
            ev = watch.live.recv() => match ev {
                Ok(ev) => if watch.wants(&ev) { pending.push(ev) },
                Err(RecvError::Lagged(_)) => {
                    watch = server.store.watch(Kind::Pod, None, WatchFrom::Current)?;
                    pending = std::mem::take(&mut watch.initial);
                }
                Err(RecvError::Closed) => break,
            },
            ev = events.live.recv() => match ev {
                Ok(ev) => if events.wants(&ev) { pending.push(ev) },
                // Progress lines are best effort: a lagging reader just skips some.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            },
            _ = &mut signal => { interrupted = true; break; }
            _ = output_closed.cancelled() => { interrupted = true; break; }
        }
    }
    if interrupted {
        if output_closed.is_cancelled() {
            say("output closed; stopping every pod…");
        } else {
            say("stopping every pod…");
        }
        log_tasks.abort_all();
        server.shutdown();
        server.wait().await;
        say("stopped");
        return Ok(0);
    }
    // Every pod finished: let the log followers drain, then stop.
    let drain = async { while log_tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
    server.shutdown();
    server.wait().await;
    let failed: Vec<&(String, String)> = phases
        .iter()
        .filter(|(k, p)| wanted.contains(*k) && **p == PodPhase::Failed)
        .map(|(k, _)| k)
        .collect();
    if failed.is_empty() {
        say("all pods succeeded");
        Ok(0)
    } else {
        for (_, n) in &failed {
            say(format_args!("pod/{n} failed"));
        }
        Ok(1)
    }
}

/// `Running (1/1 ready)`, `Pending: main ContainerCreating`, `Succeeded`.
fn summary(pod: &Pod) -> String {
    let st = pod.status.clone().unwrap_or_default();
    let ready = st.container_statuses.iter().filter(|c| c.ready).count();
    let mut s = format!("{:?}", st.phase);
    if st.phase == PodPhase::Running {
        s.push_str(&format!(" ({ready}/{} ready)", pod.spec.containers.len()));
    }
    let reason = super::output::pod_status(pod);
    if reason != format!("{:?}", st.phase) {
        s.push_str(&format!(": {reason}"));
        if let Some(m) = st
            .container_statuses
            .iter()
            .chain(st.init_container_statuses.iter())
            .find_map(|c| {
                c.state
                    .waiting
                    .as_ref()
                    .and_then(|w| w.message.clone())
                    .or_else(|| c.state.terminated.as_ref().and_then(|t| t.message.clone()))
            })
        {
            s.push_str(&format!(" — {}", m.lines().next().unwrap_or("")));
        }
    }
    s
}

/// Follow one container's log onto stdout; `Err` when stdout is closed.
async fn follow(client: &Client, ns: &str, pod: &str, container: &str) -> std::io::Result<()> {
    let path = format!("/api/v1/namespaces/{ns}/pods/{pod}/log?follow=true&container={container}");
    let Ok(resp) = client.stream(&path).await else {
        return Ok(());
    };
    let prefix = format!("{pod}/{container} | ");
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut out = tokio::io::stdout();
    while let Some(Ok(chunk)) = body.next().await {
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let mut o = prefix.clone().into_bytes();
            o.extend_from_slice(&line);
            out.write_all(&o).await?;
        }
        out.flush().await?;
    }
    if !buf.is_empty() {
        let mut o = prefix.into_bytes();
        o.extend_from_slice(&buf);
        o.push(b'\n');
        out.write_all(&o).await?;
        out.flush().await?;
    }
    Ok(())
}

/// Events about pods not (yet) shown are kept for a few seconds, then dropped.
fn progress_is_young(e: &serde_json::Value) -> bool {
    e["lastTimestamp"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| chrono::Utc::now().signed_duration_since(t) < chrono::Duration::seconds(10))
        .unwrap_or(false)
}
