//! The HTTP API (axum): Kubernetes-shaped paths for Pods, Nodes, Events, Deployments,
//! ReplicaSets and Leases, list/watch,
//! `Status` errors, `/healthz` and `/metrics`. One file per resource kind; the shared list,
//! get, watch and delete-options machinery lives here. [`guard`] refuses browser-borne and
//! DNS-rebinding requests before routing; [`listener`] is the TCP front (connection cap,
//! header-read timeout, drain on shutdown; TLS for the cluster listener). [`cluster`] serves the
//! CA, the join endpoint and join tokens; [`tunnel`] accepts the agents' tunnels and reaches a
//! pod's node (logs, adapter metrics, built-in status, exec); [`authz`] authenticates and
//! authorizes nodes on the cluster listener ([`cluster_router`]). [`modules`] serves the module store.

pub mod authz;
pub mod cluster;
pub mod deployments;
pub mod error;
pub mod events;
pub mod exec;
pub mod guard;
pub mod leases;
pub mod listener;
pub mod modules;
pub mod nodes;
pub mod pods;
pub mod podwatch;
pub mod tunnel;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use self::error::ApiError;
use crate::model::meta::selector_matches;
use crate::model::Kind;
use crate::runtime::logs::Logs;
use crate::store::{Store, WatchEvent, WatchFrom};

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// This node's container logs (the API serves `/log` for the embedded node).
    pub logs: Logs,
    /// Fires on shutdown: ends long-lived responses (watches, `logs -f`) so the server can drain.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The cluster CA, tokens and node bindings (`serve --cluster-listen`), else `None`.
    pub cluster: Option<Arc<crate::pki::Cluster>>,
    /// `tolerationSeconds` of the not-ready/unreachable tolerations admission adds to pods.
    pub default_toleration_seconds: i64,
    /// The content-addressed module store ([`modules`]), else `None`.
    pub modules: Option<Arc<crate::modules::ModuleStore>>,
    /// The nodes' APIs: the embedded node in-process, agents through their tunnels.
    pub nodes: Arc<tunnel::NodeLinks>,
    /// Pod events routed to the watches of the node they are bound to.
    pub pods_by_node: Arc<podwatch::PodsByNode>,
}

/// Query parameters of list, watch, get and delete.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    pub watch: Option<String>,
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
    pub resource_version: Option<String>,
    pub grace_period_seconds: Option<i64>,
}

impl ListQuery {
    fn is_watch(&self) -> bool {
        matches!(self.watch.as_deref(), Some("true") | Some("1") | Some(""))
    }
}

/// The API's routes behind the request guard.
pub fn router(state: AppState, guard: guard::RequestGuard) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route(
            "/version",
            get(|| async {
                Json(json!({"gitVersion": concat!("kapsel-", env!("CARGO_PKG_VERSION"))}))
            }),
        )
        .merge(pods::routes())
        .merge(deployments::routes())
        .merge(nodes::routes())
        .merge(events::routes())
        .merge(cluster::routes())
        .merge(leases::routes())
        .merge(modules::routes())
        .merge(tunnel::routes())
        .fallback(|| async {
            ApiError::NotFound {
                kind: "path".into(),
                name: "the server could not find the requested resource".into(),
            }
        })
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(guard),
            guard::middleware,
        ))
        .with_state(state)
}

/// The cluster listener's router: the same API behind the node authorizer ([`authz`]); the
/// `Host` check is off (nodes reach the server by any of its names, and are authenticated).
pub fn cluster_router(state: AppState) -> Router {
    let open = guard::RequestGuard::new(std::net::SocketAddr::from(([0, 0, 0, 0], 0)), &[]);
    router(state.clone(), open).layer(axum::middleware::from_fn_with_state(
        state,
        authz::middleware,
    ))
}

/// How many times a DELETE without an explicit precondition re-reads and retries when the
/// object changed between its read and its write (a node or controller updating status).
pub const DELETE_RETRIES: u32 = 32;

/// What a DELETE may carry: `?gracePeriodSeconds=` and `?resourceVersion=` in the query, or a
/// `DeleteOptions` body (`gracePeriodSeconds`, `preconditions.resourceVersion`); the body wins.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    /// Delete only at this resourceVersion (409 `Conflict` otherwise). Without it a DELETE
    /// never fails because the object changed meanwhile.
    pub resource_version: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteOptionsBody {
    grace_period_seconds: Option<i64>,
    preconditions: Option<PreconditionsBody>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreconditionsBody {
    resource_version: Option<String>,
}

fn parse_rv(field: &str, rv: &str) -> Result<u64, ApiError> {
    rv.parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "{field}: invalid resourceVersion {rv:?} (a decimal number)"
        ))
    })
}

impl DeleteOptions {
    /// From the query and an optional JSON body.
    pub fn parse(q: &ListQuery, body: &[u8]) -> Result<Self, ApiError> {
        let mut o = DeleteOptions {
            grace_period_seconds: q.grace_period_seconds,
            resource_version: match q.resource_version.as_deref() {
                None | Some("") => None,
                Some(rv) => Some(parse_rv("resourceVersion", rv)?),
            },
        };
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(o);
        }
        let b: DeleteOptionsBody = serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("invalid DeleteOptions: {e}")))?;
        if b.grace_period_seconds.is_some() {
            o.grace_period_seconds = b.grace_period_seconds;
        }
        if let Some(rv) = b.preconditions.and_then(|p| p.resource_version) {
            o.resource_version = Some(parse_rv("preconditions.resourceVersion", &rv)?);
        }
        Ok(o)
    }
}

/// Decode a JSON body into a strict type: 400 with serde's message (names unknown fields).
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid object: {e}")))
}

fn field_selector_matches(sel: &str, obj: &Value) -> bool {
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v, neg) = if let Some((k, v)) = term.split_once("!=") {
            (k, v, true)
        } else if let Some((k, v)) = term.split_once("==") {
            (k, v, false)
        } else if let Some((k, v)) = term.split_once('=') {
            (k, v, false)
        } else {
            return true;
        };
        let mut cur = obj;
        for part in k.trim().split('.') {
            cur = &cur[part];
        }
        let have = cur.as_str().unwrap_or("");
        (have == v.trim()) != neg
    })
}

fn matches(q: &ListQuery, obj: &Value) -> bool {
    if let Some(sel) = &q.label_selector {
        let labels: std::collections::BTreeMap<String, String> =
            serde_json::from_value(obj["metadata"]["labels"].clone()).unwrap_or_default();
        if !selector_matches(sel, &labels) {
            return false;
        }
    }
    if let Some(sel) = &q.field_selector {
        if !field_selector_matches(sel, obj) {
            return false;
        }
    }
    true
}

/// GET on a collection: a `List`, or with `?watch=true` a stream of newline-delimited events.
pub fn list_or_watch(
    state: &AppState,
    kind: Kind,
    ns: Option<&str>,
    q: ListQuery,
) -> Result<Response, ApiError> {
    if q.is_watch() {
        let from = match q.resource_version.as_deref() {
            None | Some("") | Some("0") => WatchFrom::Current,
            Some(rv) => WatchFrom::Revision(
                rv.parse()
                    .map_err(|_| ApiError::BadRequest(format!("invalid resourceVersion {rv:?}")))?,
            ),
        };
        // One node's pods: routed to this watch alone (registered before the snapshot).
        let routed = match kind {
            Kind::Pod => podwatch::PodsByNode::selected_node(q.field_selector.as_deref())
                .map(|node| state.pods_by_node.register(node)),
            _ => None,
        };
        let w = state.store.watch(kind, ns, from)?;
        let q = Arc::new(q);
        let initial = futures::stream::iter(w.initial.clone());
        let kind_w = w.kind;
        let ns_w = w.namespace.clone();
        let after = w.after;
        let wanted = move |ev: &WatchEvent| {
            ev.kind == kind_w
                && ev.rv > after
                && ns_w.as_deref().map(|n| ev.namespace() == n).unwrap_or(true)
        };
        let live: futures::stream::BoxStream<'static, WatchEvent> = match routed {
            // A routed watch too slow to keep up is ended by the router.
            Some(rx) => tokio_stream::wrappers::ReceiverStream::new(rx)
                .filter(move |ev| futures::future::ready(wanted(ev)))
                .boxed(),
            None => tokio_stream::wrappers::BroadcastStream::new(w.live)
                // A watcher too slow to keep up is ended; the client re-lists (like 410 Gone).
                .take_while(|r| futures::future::ready(r.is_ok()))
                .filter_map(move |r| futures::future::ready(r.ok().filter(|ev| wanted(ev))))
                .boxed(),
        };
        let q2 = q.clone();
        let stream = initial
            .chain(live)
            .take_until(state.shutdown.clone().cancelled_owned())
            .filter(move |ev| futures::future::ready(matches(&q2, &ev.object)))
            .map(|ev| {
                let mut line =
                    serde_json::to_vec(&json!({"type": ev.type_, "object": &*ev.object}))
                        .unwrap_or_default();
                line.push(b'\n');
                Ok::<_, std::io::Error>(bytes::Bytes::from(line))
            });
        return Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header("Transfer-Encoding", "chunked")
            .body(Body::from_stream(stream))
            .unwrap());
    }
    let (items, rv) = state.store.list(kind, ns)?;
    let items: Vec<&Value> = items
        .iter()
        .map(|a| &**a)
        .filter(|o| matches(&q, o))
        .collect();
    Ok(Json(json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    }))
    .into_response())
}

/// GET of one object.
pub fn get_one(state: &AppState, kind: Kind, ns: &str, name: &str) -> Result<Value, ApiError> {
    state
        .store
        .get(kind, ns, name)?
        .map(|o| (*o).clone())
        .ok_or_else(|| ApiError::NotFound {
            kind: kind.name().to_lowercase() + "s",
            name: name.to_string(),
        })
}

async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    let mut out = String::new();
    let (pods, rv) = state.store.list(Kind::Pod, None).unwrap_or_default();
    let mut phases: std::collections::BTreeMap<String, u64> =
        ["Pending", "Running", "Succeeded", "Failed"]
            .iter()
            .map(|p| (p.to_string(), 0))
            .collect();
    for p in &pods {
        let ph = p["status"]["phase"]
            .as_str()
            .unwrap_or("Pending")
            .to_string();
        *phases.entry(ph).or_default() += 1;
    }
    out.push_str("# HELP kapsel_pods Pods by phase.\n# TYPE kapsel_pods gauge\n");
    for (ph, n) in phases {
        out.push_str(&format!("kapsel_pods{{phase=\"{ph}\"}} {n}\n"));
    }
    let nodes = state
        .store
        .list(Kind::Node, None)
        .map(|(n, _)| n.len())
        .unwrap_or(0);
    out.push_str("# HELP kapsel_nodes Registered nodes.\n# TYPE kapsel_nodes gauge\n");
    out.push_str(&format!("kapsel_nodes {nodes}\n"));
    out.push_str("# HELP kapsel_store_revision Newest committed store revision.\n# TYPE kapsel_store_revision counter\n");
    out.push_str(&format!("kapsel_store_revision {rv}\n"));
    out.push_str(&format!(
        "# HELP kapsel_build_info Build information.\n# TYPE kapsel_build_info gauge\nkapsel_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    ));
    if let Some(c) = &state.cluster {
        out.push_str(&c.metrics.render());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
