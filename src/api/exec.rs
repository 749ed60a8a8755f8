//! `/api/v1/namespaces/{ns}/pods/{name}/exec`: a command in a pod's OCI container, as
//! Kubernetes serves it: a WebSocket with subprotocol `v5.channel.k8s.io` (or `v4`), query
//! `command=..&command=..&container=&stdin=&stdout=&stderr=&tty=`. Each binary message is a
//! channel byte and data: 0 stdin, 1 stdout, 2 stderr, 3 the closing `Status` (with the exit
//! code), 4 terminal resizes; v5's `[255, 0]` closes stdin. The request is validated here
//! (pod, container, OCI, running, node reachable) before the upgrade, so mistakes are plain 4xx
//! / 503 answers; the stream itself is relayed to the pod's node API
//! ([`crate::runtime::nodeapi`]): in-process for the embedded node, through its tunnel for an
//! agent.

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures::{SinkExt, StreamExt};

use super::error::ApiError;
use super::{get_one, AppState};
use crate::model::pod::is_wasm_image;
use crate::model::{Kind, Pod};
use crate::runtime::nodeapi::{
    encode_frame, exec_failure, ExecQuery, FrameDecoder, CH_CLOSE, CH_RESIZE, CH_STATUS, CH_STDIN,
};

/// The subprotocols spoken, preferred first.
pub const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

pub async fn exec(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let q = ExecQuery::parse(raw.as_deref()).map_err(ApiError::BadRequest)?;
    let pod: Pod = serde_json::from_value(get_one(&s, Kind::Pod, &ns, &name)?)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let names: Vec<&str> = pod
        .spec
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    let c = match q.container.as_deref() {
        Some(c) => pod
            .spec
            .containers
            .iter()
            .find(|x| x.name == c)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "container {c} is not valid for pod {name}; choose one of: [{}]",
                    names.join(" ")
                ))
            })?,
        None if pod.spec.containers.len() == 1 => &pod.spec.containers[0],
        None => {
            return Err(ApiError::BadRequest(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )))
        }
    };
    if is_wasm_image(&c.image) || c.image.starts_with("builtin/") {
        return Err(ApiError::BadRequest(format!(
            "exec is for OCI containers: container {:?} runs {} (WASM modules and built-ins have no shell to exec into)",
            c.name, c.image
        )));
    }
    let phase = pod.phase();
    if !matches!(phase, crate::model::pod::PodPhase::Running) {
        return Err(ApiError::BadRequest(format!(
            "cannot exec into a container in a pod that is not running; pod {name} is {phase:?}"
        )));
    }
    let node = pod.spec.node_name.clone().unwrap_or_default();
    if !s.nodes.reachable(&node) {
        return Err(ApiError::Unavailable(format!(
            "node {node:?} has no tunnel to the API server (is its agent running and joined over the cluster listener?)"
        )));
    }
    let ws = ws.map_err(|e| {
        ApiError::BadRequest(format!(
            "exec is a WebSocket (subprotocol {}): {e}",
            PROTOCOLS[0]
        ))
    })?;
    let path = format!(
        "/exec/{}/{}?{}",
        pod.uid(),
        c.name,
        ExecQuery {
            container: None,
            ..q
        }
        .to_query()
    );
    Ok(ws
        .protocols(PROTOCOLS)
        .on_upgrade(move |socket| relay(s, node, path, socket)))
}

async fn send_status(ws: &mut futures::stream::SplitSink<WebSocket, Message>, status: &[u8]) {
    let mut m = vec![CH_STATUS];
    m.extend_from_slice(status);
    let _ = ws.send(Message::Binary(Bytes::from(m))).await;
    let _ = ws.send(Message::Close(None)).await;
}

/// Relay one exec between the client's WebSocket and the node API's framed streams.
async fn relay(s: AppState, node: String, path: String, socket: WebSocket) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    // Bounded both ways: a slow side holds the other back instead of filling memory.
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let req = axum::http::Request::post(path)
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(body_rx),
        ))
        .expect("valid node API request");
    let resp = match s.nodes.call(&node, req).await {
        Ok(r) => r,
        Err(e) => {
            let st = serde_json::to_vec(&e.status_json()).unwrap_or_default();
            return send_status(&mut ws_tx, &st).await;
        }
    };
    if resp.status() != StatusCode::OK {
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        let msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        let st = serde_json::to_vec(&exec_failure(&msg)).unwrap_or_default();
        return send_status(&mut ws_tx, &st).await;
    }
    let upstream = tokio::spawn(async move {
        while let Some(Ok(m)) = ws_rx.next().await {
            let data = match m {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            let Some((&ch, rest)) = data.split_first() else {
                continue;
            };
            if !matches!(ch, CH_STDIN | CH_RESIZE | CH_CLOSE) {
                continue;
            }
            if body_tx.send(Ok(encode_frame(ch, rest))).await.is_err() {
                break;
            }
        }
    });
    let mut frames = FrameDecoder::default();
    let mut body = resp.into_body().into_data_stream();
    let mut ended = false;
    'out: while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { break };
        let Ok(fs) = frames.push(&chunk) else { break };
        for (ch, data) in fs {
            let mut m = Vec::with_capacity(1 + data.len());
            m.push(ch);
            m.extend_from_slice(&data);
            if ws_tx.send(Message::Binary(Bytes::from(m))).await.is_err() {
                break 'out;
            }
            if ch == CH_STATUS {
                ended = true;
                break 'out;
            }
        }
    }
    upstream.abort();
    if ended {
        let _ = ws_tx.send(Message::Close(None)).await;
    } else {
        let st = serde_json::to_vec(&exec_failure(&format!(
            "the exec stream from node {node:?} ended without a status"
        )))
        .unwrap_or_default();
        send_status(&mut ws_tx, &st).await;
    }
}
