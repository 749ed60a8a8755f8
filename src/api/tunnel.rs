//! The server's end of the node tunnels, and the way the API reaches a node's
//! [node API](crate::runtime::nodeapi).
//!
//! `GET /v1-kapsel/connect` (`Upgrade: kapsel-tunnel`) on the cluster listener: a node,
//! authenticated by its client certificate, hands the server a connection on which the
//! server speaks HTTP/2 as the client (see [`crate::runtime::tunnel`]). The [`NodeLinks`]
//! registry keeps one tunnel per node name — the name in the certificate, so a node can
//! register only its own; a newer connection replaces an older one — and forgets it when the
//! connection ends. The embedded node of `kapsel serve` has no tunnel: its node API is called
//! in-process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::ServiceExt;

use super::authz::Peer;
use super::error::ApiError;
use super::AppState;
use crate::runtime::tunnel::{CONNECT_PATH, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, PROTOCOL};

/// The nodes the API can reach: the embedded one in-process, the others through their tunnels.
pub struct NodeLinks {
    /// The embedded node's name (`serve --node-name`).
    pub local_name: String,
    /// The embedded node's API, set once the node has started.
    pub local: OnceLock<Router>,
    tunnels: Mutex<HashMap<String, (u64, SendRequest<Body>)>>,
    next_id: AtomicU64,
}

impl NodeLinks {
    pub fn new(local_name: &str) -> Arc<NodeLinks> {
        Arc::new(NodeLinks {
            local_name: local_name.to_string(),
            local: OnceLock::new(),
            tunnels: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Is `node` the embedded node (or is the pod not bound to any node yet)?
    pub fn is_local(&self, node: Option<&str>) -> bool {
        match node {
            None | Some("") => true,
            Some(n) => n == self.local_name,
        }
    }

    /// Does `node` have a tunnel (or is it the embedded node)?
    pub fn reachable(&self, node: &str) -> bool {
        self.is_local(Some(node)) || self.tunnels.lock().unwrap().contains_key(node)
    }

    /// Names of the nodes with an open tunnel.
    pub fn connected(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tunnels.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }

    /// Send `req` (path and query of the node API) to `node`; the response streams.
    pub async fn call(
        &self,
        node: &str,
        req: axum::http::Request<Body>,
    ) -> Result<Response, ApiError> {
        if self.is_local(Some(node)) {
            let Some(local) = self.local.get().cloned() else {
                return Err(ApiError::Unavailable(format!(
                    "node {node:?} is starting; try again"
                )));
            };
            return local
                .oneshot(req)
                .await
                .map_err(|e| ApiError::Internal(e.to_string()));
        }
        let sender = self
            .tunnels
            .lock()
            .unwrap()
            .get(node)
            .map(|(_, s)| s.clone());
        let Some(mut sender) = sender else {
            return Err(ApiError::Unavailable(format!(
                "node {node:?} has no tunnel to the API server (is its agent running and joined over the cluster listener?)"
            )));
        };
        let (mut parts, body) = req.into_parts();
        // HTTP/2 wants an absolute URI (`:scheme` and `:authority`).
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = format!("http://{node}{pq}")
            .parse()
            .map_err(|e| ApiError::BadRequest(format!("node API path: {e}")))?;
        sender
            .ready()
            .await
            .map_err(|e| ApiError::BadGateway(format!("node {node:?} tunnel: {e}")))?;
        let resp = sender
            .send_request(axum::http::Request::from_parts(parts, body))
            .await
            .map_err(|e| ApiError::BadGateway(format!("node {node:?} tunnel: {e}")))?;
        Ok(resp.map(Body::new))
    }

    fn register(&self, node: &str, sender: SendRequest<Body>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.tunnels
            .lock()
            .unwrap()
            .insert(node.to_string(), (id, sender));
        id
    }

    fn unregister(&self, node: &str, id: u64) {
        let mut m = self.tunnels.lock().unwrap();
        if m.get(node).map(|(i, _)| *i) == Some(id) {
            m.remove(node);
        }
    }
}

/// The tunnel's route (served on both listeners; only an authenticated node gets through).
pub fn routes() -> Router<AppState> {
    Router::new().route(CONNECT_PATH, axum::routing::get(connect))
}

async fn connect(State(s): State<AppState>, mut req: Request) -> Response {
    let Some(Peer::Node(node)) = req.extensions().get::<Peer>().cloned() else {
        return ApiError::Unauthorized(
            "the node tunnel is for nodes joined over the cluster listener (present the node's client certificate)"
                .into(),
        )
        .into_response();
    };
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(PROTOCOL));
    if !wants {
        return ApiError::BadRequest(format!("Upgrade: {PROTOCOL} is required")).into_response();
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let links = s.nodes.clone();
    let cancel = s.shutdown.clone();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(node, error = %e, "node tunnel upgrade failed");
                return;
            }
        };
        let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let (sender, conn) = match b.handshake(upgraded).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(node, error = %e, "node tunnel handshake failed");
                return;
            }
        };
        let id = links.register(&node, sender);
        tracing::info!(node, "node tunnel connected");
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::info!(node, error = %e, "node tunnel ended");
            },
            _ = cancel.cancelled() => {}
        }
        links.unregister(&node, id);
        tracing::info!(node, "node tunnel closed");
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty())
        .expect("static response")
}
