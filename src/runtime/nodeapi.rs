//! The node API: what the API server asks a node about the pods it runs, as the kubelet's
//! own HTTP API does. A small axum router served on every stream of the agent's tunnel
//! ([`super::tunnel`]) and, for the embedded node of `kapsel serve`, called in-process:
//!
//! - `GET /containerLogs/{ns}/{pod}/{uid}/{container}?tailLines=N&follow=true`: the container's
//!   log (404 when it has none yet); a follow streams until the pod ends;
//! - `GET /adapterMetrics/{ns}/{pod}`: the latest values of the pod's metrics adapters;
//! - `GET /builtins/{ns}/{pod}`: the own status of the pod's built-in pattern containers;
//! - `POST /exec/{uid}/{container}?command=..&stdin=&tty=`: a command in a running OCI
//!   container (`docker exec`). Both bodies are streams of [frames](encode_frame) on the
//!   Kubernetes exec channels: the request carries stdin (0) and resizes (4), the response
//!   stdout (1), stderr (2) and, last, the status (3: a `meta/v1` `Status` with the exit code).
//!
//! The node trusts its caller: only the API server reaches it (through the tunnel the node
//! itself opened, after verifying the server's certificate), and the API server authorizes.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::BoxFuture;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::docker::DockerExecutor;
use super::logs::Logs;
use crate::client::Client;
use crate::model::Kind;

/// Kubernetes' exec channels.
pub const CH_STDIN: u8 = 0;
pub const CH_STDOUT: u8 = 1;
pub const CH_STDERR: u8 = 2;
pub const CH_STATUS: u8 = 3;
pub const CH_RESIZE: u8 = 4;
/// `v5.channel.k8s.io`'s close signal: `[255, channel]` closes that channel (stdin's EOF).
pub const CH_CLOSE: u8 = 255;

/// Largest frame accepted on an exec stream.
const MAX_FRAME: usize = 1 << 20;

/// What the node API's handlers share.
#[derive(Clone)]
pub struct NodeApi {
    pub logs: Logs,
    /// To see whether a followed pod has ended (the node's client seam).
    pub client: Arc<dyn Client>,
    /// Exec's Docker Engine (`None`: a WASM-only node).
    pub docker: Option<Arc<DockerExecutor>>,
    /// Ends long-lived responses (log follows, execs) when the node stops.
    pub shutdown: CancellationToken,
}

/// Why a node API request failed: a `Status` with the code.
#[derive(Debug, thiserror::Error)]
pub enum NodeApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
}

impl IntoResponse for NodeApiError {
    fn into_response(self) -> Response {
        let (code, reason) = match &self {
            NodeApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            NodeApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            NodeApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
        };
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.to_string(), "reason": reason,
            "code": code.as_u16()});
        (code, Json(body)).into_response()
    }
}

/// The node API's routes.
pub fn router(api: NodeApi) -> Router {
    Router::new()
        .route(
            "/containerLogs/{ns}/{pod}/{uid}/{container}",
            get(container_logs),
        )
        .route("/adapterMetrics/{ns}/{pod}", get(adapter_metrics))
        .route("/builtins/{ns}/{pod}", get(builtins))
        .route("/exec/{uid}/{container}", post(exec))
        .with_state(api)
}

/// `{"items": [{"container", "metric", "labels", "value"}]}` of this process's adapters.
pub fn adapter_metrics_json(ns: &str, pod: &str) -> Value {
    let items: Vec<Value> = crate::patterns::adapter::pod_values(ns, pod)
        .into_iter()
        .map(|(c, m, l, v)| {
            json!({"container": c, "metric": m, "labels": l,
                "value": if v.is_finite() { json!(v) } else { json!(v.to_string()) }})
        })
        .collect();
    json!({ "items": items })
}

/// `{"CONTAINER": {"kind", "fields": [{"name", "value"}]}}` of this process's built-ins.
pub fn builtins_json(ns: &str, pod: &str) -> Value {
    let mut out = serde_json::Map::new();
    for (container, kind, lines) in crate::patterns::pod_builtins(ns, pod) {
        let fields: Vec<Value> = lines
            .into_iter()
            .map(|(n, v)| json!({"name": n, "value": v}))
            .collect();
        out.insert(container, json!({"kind": kind, "fields": fields}));
    }
    Value::Object(out)
}

async fn adapter_metrics(Path((ns, pod)): Path<(String, String)>) -> Json<Value> {
    Json(adapter_metrics_json(&ns, &pod))
}

async fn builtins(Path((ns, pod)): Path<(String, String)>) -> Json<Value> {
    Json(builtins_json(&ns, &pod))
}

/// Has the pod `uid` ended for good (gone, replaced, or Succeeded/Failed)?
pub type DoneCheck = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// A followed log: `head`, then what the container writes after `offset`, until `done` says
/// the pod has ended (checked whenever the log is idle) or `stop` fires.
pub fn follow_body(
    logs: Logs,
    uid: String,
    container: String,
    head: Vec<u8>,
    offset: u64,
    done: DoneCheck,
    stop: CancellationToken,
) -> Body {
    let mut rx = logs.stream(&uid, &container).subscribe();
    rx.borrow_and_update();
    let first = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) });
    let rest = futures::stream::unfold(Some((offset, rx)), move |state| {
        let (logs, uid, container, done) =
            (logs.clone(), uid.clone(), container.clone(), done.clone());
        async move {
            let (mut offset, mut rx) = state?;
            loop {
                let (buf, next) = logs.read_from(&uid, &container, offset);
                offset = next;
                if !buf.is_empty() {
                    return Some((Ok(Bytes::from(buf)), Some((offset, rx))));
                }
                if done().await {
                    let (buf, _) = logs.read_from(&uid, &container, offset);
                    return (!buf.is_empty()).then(|| (Ok(Bytes::from(buf)), None));
                }
                let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
            }
        }
    });
    Body::from_stream(first.chain(rest).take_until(stop.cancelled_owned()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    follow: Option<bool>,
    tail_lines: Option<usize>,
}

async fn container_logs(
    State(api): State<NodeApi>,
    Path((ns, pod, uid, container)): Path<(String, String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Result<Response, NodeApiError> {
    let follow = q.follow.unwrap_or(false);
    if !follow && !api.logs.path(&uid, &container).exists() {
        return Err(NodeApiError::NotFound(format!(
            "container {container:?} of pod {pod:?} has no log on this node"
        )));
    }
    let (head, offset) = api.logs.read(&uid, &container, q.tail_lines);
    let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !follow {
        return Ok((text, head).into_response());
    }
    let client = api.client.clone();
    let uid_done = uid.clone();
    let done: DoneCheck = Arc::new(move || {
        let (client, ns, pod, uid) = (client.clone(), ns.clone(), pod.clone(), uid_done.clone());
        Box::pin(async move {
            match client.get(Kind::Pod, &ns, &pod).await {
                Ok(Some(p)) => {
                    p["metadata"]["uid"].as_str() != Some(uid.as_str())
                        || matches!(
                            p["status"]["phase"].as_str(),
                            Some("Succeeded") | Some("Failed")
                        )
                }
                Ok(None) => true,
                // The control plane unreachable: keep following.
                Err(_) => false,
            }
        })
    });
    let body = follow_body(
        api.logs.clone(),
        uid,
        container,
        head,
        offset,
        done,
        api.shutdown.clone(),
    );
    Ok((text, body).into_response())
}

/// One exec frame: `[channel][length: u32 big-endian][data]`.
pub fn encode_frame(channel: u8, data: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(5 + data.len());
    b.push(channel);
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    Bytes::from(b)
}

/// Splits a byte stream into exec frames.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Add bytes; the complete frames now in the buffer, or an error for an oversized one.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            if self.buf.len() < 5 {
                return Ok(out);
            }
            let len =
                u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
            if len > MAX_FRAME {
                return Err(format!(
                    "exec frame of {len} bytes exceeds {MAX_FRAME} bytes"
                ));
            }
            if self.buf.len() < 5 + len {
                return Ok(out);
            }
            let ch = self.buf[0];
            let data = self.buf[5..5 + len].to_vec();
            self.buf.drain(..5 + len);
            out.push((ch, data));
        }
    }
}

/// The `Status` exec ends with: success, or failure with the exit code as Kubernetes
/// reports it (`NonZeroExitCode`, cause `ExitCode`).
pub fn exec_status(exit_code: i64) -> Value {
    if exit_code == 0 {
        return json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
    }
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("command terminated with non-zero exit code: {exit_code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": exit_code.to_string()}]}})
}

/// An exec that failed before or while running (not the command's own exit code).
pub fn exec_failure(message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": "InternalError", "code": 500})
}

/// The exit code in an exec `Status` (`None`: the exec itself failed).
pub fn exit_code_of(status: &Value) -> Option<i64> {
    if status["status"] == "Success" {
        return Some(0);
    }
    if status["reason"] != "NonZeroExitCode" {
        return None;
    }
    status["details"]["causes"]
        .as_array()?
        .iter()
        .find(|c| c["reason"] == "ExitCode")?["message"]
        .as_str()?
        .parse()
        .ok()
}

/// The query of an exec, as Kubernetes spells it (`command` repeated, one per argument).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExecQuery {
    pub command: Vec<String>,
    pub container: Option<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl ExecQuery {
    /// Parse `command=..&command=..&container=&stdin=&stdout=&stderr=&tty=`; unknown keys and
    /// bad booleans are errors naming the key.
    pub fn parse(query: Option<&str>) -> Result<ExecQuery, String> {
        let url = reqwest::Url::parse(&format!("http://x/?{}", query.unwrap_or("")))
            .map_err(|e| format!("invalid query: {e}"))?;
        let mut q = ExecQuery {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let flag = |k: &str, v: &str| match v {
            "true" | "1" | "" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(format!("{k}: invalid boolean {v:?} (true or false)")),
        };
        for (k, v) in url.query_pairs() {
            match &*k {
                "command" => q.command.push(v.into_owned()),
                "container" => q.container = Some(v.into_owned()).filter(|c| !c.is_empty()),
                "stdin" => q.stdin = flag(&k, &v)?,
                "stdout" => q.stdout = flag(&k, &v)?,
                "stderr" => q.stderr = flag(&k, &v)?,
                "tty" => q.tty = flag(&k, &v)?,
                "input" | "output" => {}
                other => return Err(format!("unknown exec parameter {other:?}")),
            }
        }
        if q.command.is_empty() {
            return Err("command: Required value: at least one command argument".into());
        }
        Ok(q)
    }

    /// Back to a query string (the container is in the node API's path, not here).
    pub fn to_query(&self) -> String {
        let mut s = url_pairs(self.command.iter().map(|c| ("command", c.as_str())));
        for (k, v) in [
            ("stdin", self.stdin),
            ("stdout", self.stdout),
            ("stderr", self.stderr),
            ("tty", self.tty),
        ] {
            s.push_str(&format!("&{k}={v}"));
        }
        s
    }
}

fn url_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut u = reqwest::Url::parse("http://x/").expect("static URL");
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
    }
    u.query().unwrap_or("").to_string()
}

async fn exec(
    State(api): State<NodeApi>,
    Path((uid, container)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, NodeApiError> {
    let q = ExecQuery::parse(raw.as_deref()).map_err(NodeApiError::BadRequest)?;
    let Some(docker) = api.docker.clone() else {
        return Err(NodeApiError::BadRequest(
            "exec is for OCI containers, and this node runs no Docker".into(),
        ));
    };
    let id = docker
        .running_pod_containers(&uid)
        .await
        .map_err(|e| NodeApiError::Unavailable(e.to_string()))?
        .into_iter()
        .find(|c| c.name == container)
        .map(|c| c.id)
        .ok_or_else(|| {
            NodeApiError::NotFound(format!(
                "container {container:?} is not running on this node"
            ))
        })?;
    let d = docker
        .docker()
        .await
        .map_err(|e| NodeApiError::Unavailable(e.to_string()))?;
    let created = d
        .create_exec(
            &id,
            bollard::exec::CreateExecOptions {
                attach_stdin: Some(q.stdin),
                attach_stdout: Some(q.stdout),
                attach_stderr: Some(q.stderr),
                tty: Some(q.tty),
                cmd: Some(q.command.clone()),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| NodeApiError::Unavailable(format!("creating the exec: {e}")))?;
    let started = d
        .start_exec(
            &created.id,
            Some(bollard::exec::StartExecOptions {
                detach: false,
                tty: q.tty,
                ..Default::default()
            }),
        )
        .await
        .map_err(|e| NodeApiError::Unavailable(format!("starting the exec: {e}")))?;
    let bollard::exec::StartExecResults::Attached { mut output, input } = started else {
        return Err(NodeApiError::Unavailable("the exec did not attach".into()));
    };
    // Bounded: a slow reader holds the command's output back, not the node's memory.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let exec_id = created.id.clone();
    // stdin and resizes, from the request body.
    let stdin_task = {
        let d = d.clone();
        let exec_id = exec_id.clone();
        let want_stdin = q.stdin;
        tokio::spawn(async move {
            let mut input = want_stdin.then_some(input);
            let mut frames = FrameDecoder::default();
            let mut body = body.into_data_stream();
            while let Some(Ok(chunk)) = body.next().await {
                let Ok(fs) = frames.push(&chunk) else { break };
                for (ch, data) in fs {
                    match ch {
                        CH_STDIN => {
                            if let Some(w) = input.as_mut() {
                                if w.write_all(&data).await.is_err() {
                                    input = None;
                                }
                            }
                        }
                        CH_CLOSE if data.first() == Some(&CH_STDIN) => {
                            if let Some(mut w) = input.take() {
                                let _ = w.shutdown().await;
                            }
                        }
                        CH_RESIZE => {
                            let v: Value = serde_json::from_slice(&data).unwrap_or_default();
                            if let (Some(w), Some(h)) = (v["Width"].as_u64(), v["Height"].as_u64())
                            {
                                let _ = d
                                    .resize_exec(
                                        &exec_id,
                                        bollard::exec::ResizeExecOptions {
                                            width: w as u16,
                                            height: h as u16,
                                        },
                                    )
                                    .await;
                            }
                        }
                        _ => {}
                    }
                }
            }
            // The caller went away or closed stdin: the command sees its EOF.
            if let Some(mut w) = input.take() {
                let _ = w.shutdown().await;
            }
        })
    };
    let stop = api.shutdown.clone();
    tokio::spawn(async move {
        use bollard::container::LogOutput;
        loop {
            let item = tokio::select! {
                i = output.next() => i,
                _ = stop.cancelled() => break,
            };
            let Some(item) = item else { break };
            let frame = match item {
                Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                    encode_frame(CH_STDOUT, &message)
                }
                Ok(LogOutput::StdErr { message }) => encode_frame(CH_STDERR, &message),
                Ok(LogOutput::StdIn { .. }) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "exec output ended");
                    break;
                }
            };
            if tx.send(Ok(frame)).await.is_err() {
                stdin_task.abort();
                return;
            }
        }
        stdin_task.abort();
        // The stream ends when the process does; its exit code may lag a moment behind.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            match d.inspect_exec(&exec_id).await {
                Ok(info) if info.running != Some(true) && info.exit_code.is_some() => {
                    break exec_status(info.exit_code.unwrap_or_default());
                }
                Ok(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Ok(_) => break exec_failure("the command's exit code never appeared"),
                Err(e) => break exec_failure(&format!("inspecting the exec: {e}")),
            }
        };
        let _ = tx
            .send(Ok(encode_frame(
                CH_STATUS,
                &serde_json::to_vec(&status).unwrap_or_default(),
            )))
            .await;
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_split_anywhere() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode_frame(CH_STDOUT, b"hello"));
        wire.extend_from_slice(&encode_frame(CH_STATUS, b"{}"));
        wire.extend_from_slice(&encode_frame(CH_STDERR, b""));
        for cut in 0..wire.len() {
            let mut d = FrameDecoder::default();
            let mut got = d.push(&wire[..cut]).unwrap();
            got.extend(d.push(&wire[cut..]).unwrap());
            assert_eq!(
                got,
                vec![
                    (CH_STDOUT, b"hello".to_vec()),
                    (CH_STATUS, b"{}".to_vec()),
                    (CH_STDERR, vec![])
                ],
                "cut at {cut}"
            );
        }
        let mut d = FrameDecoder::default();
        let mut huge = vec![CH_STDIN];
        huge.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(d.push(&huge).unwrap_err().contains("exceeds"));
    }

    #[test]
    fn exec_query_as_kubernetes_spells_it() {
        let q = ExecQuery::parse(Some(
            "command=sh&command=-c&command=echo%20a%26b&container=c1&stdin=true&tty=false",
        ))
        .unwrap();
        assert_eq!(q.command, ["sh", "-c", "echo a&b"]);
        assert_eq!(q.container.as_deref(), Some("c1"));
        assert!(q.stdin && q.stdout && q.stderr && !q.tty);
        let back = ExecQuery::parse(Some(&q.to_query())).unwrap();
        assert_eq!(back.command, q.command);
        assert!(back.stdin);
        assert!(ExecQuery::parse(Some("container=x"))
            .unwrap_err()
            .starts_with("command:"));
        assert!(ExecQuery::parse(Some("command=ls&tty=maybe"))
            .unwrap_err()
            .starts_with("tty:"));
        assert!(ExecQuery::parse(Some("command=ls&bogus=1"))
            .unwrap_err()
            .contains("bogus"));
    }

    #[test]
    fn exit_codes_in_status() {
        assert_eq!(exit_code_of(&exec_status(0)), Some(0));
        assert_eq!(exit_code_of(&exec_status(3)), Some(3));
        assert_eq!(exit_code_of(&exec_failure("boom")), None);
    }
}
