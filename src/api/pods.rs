//! `/api/v1/.../pods`: create (defaulting + validation), get, list/watch, replace, status,
//! graceful delete, container logs, and the status of built-in pattern containers.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::{decode, get_one, list_or_watch, AppState, DeleteOptions, ListQuery, DELETE_RETRIES};
use crate::model::pod::{PodPhase, PodStatus, PullPolicy, RestartPolicy};
use crate::model::validate::{validate_pod, FieldError};
use crate::model::{Kind, Pod};
use crate::store::{object_rv, Store, StoreError};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/pods", get(list_all))
        .route("/api/v1/namespaces/{ns}/pods", get(list).post(create))
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}",
            get(read).put(replace).delete(delete),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/status",
            get(read).put(replace_status),
        )
        .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(log))
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/metrics",
            get(adapter_metrics),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/builtins",
            get(builtins),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/exec",
            get(super::exec::exec).post(super::exec::exec),
        )
}

/// The own status of the pod's running built-in pattern containers, from the pod's node, for
/// `kapsel describe pod`: `{"CONTAINER": {"kind": "git-sync", "fields": [{"name", "value"}]}}`
/// (`{}` when none runs; 404 for an unknown pod).
async fn builtins(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let pod = get_one(&s, Kind::Pod, &ns, &name)?;
    match remote_node(&s, &pod) {
        None => Ok(Json(crate::runtime::nodeapi::builtins_json(&ns, &name)).into_response()),
        Some(node) => node_get(&s, &node, &format!("/builtins/{ns}/{name}")).await,
    }
}

/// The latest values of the pod's `builtin/metrics-adapter` containers, from the pod's node,
/// for controllers and people: `{"items": [{"container", "metric", "labels", "value"}]}`.
async fn adapter_metrics(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let pod = get_one(&s, Kind::Pod, &ns, &name)?;
    match remote_node(&s, &pod) {
        None => Ok(Json(crate::runtime::nodeapi::adapter_metrics_json(&ns, &name)).into_response()),
        Some(node) => node_get(&s, &node, &format!("/adapterMetrics/{ns}/{name}")).await,
    }
}

/// The pod's node when it is not the embedded one (which is read in-process, as ever).
fn remote_node(s: &AppState, pod: &Value) -> Option<String> {
    let node = pod["spec"]["nodeName"].as_str();
    (!s.nodes.is_local(node)).then(|| node.unwrap_or_default().to_string())
}

/// A GET on a remote node's API, its answer passed on.
async fn node_get(s: &AppState, node: &str, path: &str) -> Result<Response, ApiError> {
    let req = axum::http::Request::get(path)
        .body(Body::empty())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    s.nodes.call(node, req).await
}

async fn list_all(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_or_watch(&s, Kind::Pod, None, q)
}

async fn list(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_or_watch(&s, Kind::Pod, Some(&ns), q)
}

async fn read(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    get_one(&s, Kind::Pod, &ns, &name).map(Json)
}

fn check_namespace(pod: &mut Pod, ns: &str) -> Result<(), ApiError> {
    match &pod.metadata.namespace {
        Some(n) if n != ns => Err(ApiError::BadRequest(format!(
            "the namespace of the provided object ({n}) does not match the namespace sent on the request ({ns})"
        ))),
        _ => {
            pod.metadata.namespace = Some(ns.to_string());
            Ok(())
        }
    }
}

/// Fill in what Kubernetes defaults, so stored pods are explicit.
pub fn default_pod(pod: &mut Pod) {
    pod.api_version = "v1".into();
    pod.kind = "Pod".into();
    if pod.spec.restart_policy.is_none() {
        pod.spec.restart_policy = Some(RestartPolicy::Always);
    }
    if pod.spec.termination_grace_period_seconds.is_none() {
        pod.spec.termination_grace_period_seconds = Some(30);
    }
    for c in pod
        .spec
        .containers
        .iter_mut()
        .chain(pod.spec.init_containers.iter_mut())
    {
        if c.image_pull_policy.is_none() && !c.is_wasm() {
            let latest = !c.image.contains(':') || c.image.ends_with(":latest");
            c.image_pull_policy = Some(if latest {
                PullPolicy::Always
            } else {
                PullPolicy::IfNotPresent
            });
        }
    }
}

fn invalid(pod: &Pod, errors: Vec<FieldError>) -> ApiError {
    ApiError::Invalid {
        kind: "Pod".into(),
        name: pod.metadata.name.clone(),
        errors,
    }
}

async fn create(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut pod: Pod = decode(&body)?;
    check_namespace(&mut pod, &ns)?;
    if pod.metadata.name.is_empty() {
        if let Some(g) = &pod.metadata.generate_name {
            let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].to_string();
            pod.metadata.name = format!("{g}{suffix}");
        }
    }
    if pod.metadata.resource_version.is_some() {
        return Err(ApiError::BadRequest(
            "metadata.resourceVersion: must not be set on create".into(),
        ));
    }
    default_pod(&mut pod);
    crate::model::taint::add_default_tolerations(
        &mut pod.spec.tolerations,
        s.default_toleration_seconds,
    );
    let errs = validate_pod(&pod);
    if !errs.is_empty() {
        return Err(invalid(&pod, errs));
    }
    pod.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
    pod.metadata.creation_timestamp = Some(Utc::now());
    pod.metadata.deletion_timestamp = None;
    pod.status = Some(PodStatus {
        phase: PodPhase::Pending,
        ..Default::default()
    });
    let v = serde_json::to_value(&pod).map_err(|e| ApiError::Internal(e.to_string()))?;
    let stored = s.store.create(Kind::Pod, v).await?;
    Ok((StatusCode::CREATED, Json(stored)))
}

/// PUT: labels and annotations may change; the spec of a pod is immutable, as in Kubernetes
/// (except that an unbound pod may be bound by setting `spec.nodeName`).
async fn replace(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let mut pod: Pod = decode(&body)?;
    check_namespace(&mut pod, &ns)?;
    if pod.metadata.name != name {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            pod.metadata.name
        )));
    }
    let cur: Pod = serde_json::from_value(get_one(&s, Kind::Pod, &ns, &name)?)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    default_pod(&mut pod);
    crate::model::taint::keep_default_tolerations(&mut pod.spec.tolerations, &cur.spec.tolerations);
    let mut want_spec = pod.spec.clone();
    if cur.spec.node_name.is_some() && want_spec.node_name.is_none() {
        want_spec.node_name = cur.spec.node_name.clone();
    }
    let mut cmp = cur.spec.clone();
    cmp.node_name = want_spec.node_name.clone();
    if cmp != want_spec
        || (cur.spec.node_name.is_some() && want_spec.node_name != cur.spec.node_name)
    {
        return Err(invalid(
            &pod,
            vec![FieldError {
                field: "spec".into(),
                message: "Forbidden: pod updates may not change fields other than labels, annotations and an unset spec.nodeName; delete and re-create the pod".into(),
            }],
        ));
    }
    let mut next = cur.clone();
    next.spec = want_spec;
    next.metadata.labels = pod.metadata.labels;
    next.metadata.annotations = pod.metadata.annotations;
    next.metadata.resource_version = pod
        .metadata
        .resource_version
        .or(cur.metadata.resource_version.clone());
    let v = serde_json::to_value(&next).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(s.store.update(Kind::Pod, v).await?))
}

async fn replace_status(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let pod: Pod = decode(&body)?;
    let cur: Pod = serde_json::from_value(get_one(&s, Kind::Pod, &ns, &name)?)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut next = cur.clone();
    next.status = pod.status;
    next.metadata.resource_version = pod
        .metadata
        .resource_version
        .or(cur.metadata.resource_version.clone());
    let v = serde_json::to_value(&next).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(s.store.update(Kind::Pod, v).await?))
}

/// DELETE: a pod running on a node is deleted gracefully — marked with `deletionTimestamp`,
/// stopped by its node agent, then removed. Unbound or finished pods, and
/// `gracePeriodSeconds=0`, are removed at once (the node agent then stops what is left).
/// Only an explicit precondition (`?resourceVersion=` or `preconditions.resourceVersion` in a
/// `DeleteOptions` body) can make it fail with 409.
async fn delete(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<ListQuery>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let opts = DeleteOptions::parse(&q, &body)?;
    get_one(&s, Kind::Pod, &ns, &name)?;
    Ok(Json(
        delete_pod_with(
            &*s.store,
            &ns,
            &name,
            opts.grace_period_seconds,
            opts.resource_version,
        )
        .await?,
    ))
}

/// Delete a pod as Kubernetes does: a pod running on a node is marked with
/// `deletionTimestamp`, stopped by its node agent, then removed. Unbound or finished pods, and
/// a grace period of 0, are removed at once (the node agent then stops what is left). Used by
/// the API and by the controllers. A concurrent write (status, binding) does not fail it: it
/// re-reads and retries.
pub async fn delete_pod(
    store: &dyn Store,
    ns: &str,
    name: &str,
    grace_period_seconds: Option<i64>,
) -> Result<Value, StoreError> {
    delete_pod_with(store, ns, name, grace_period_seconds, None).await
}

/// [`delete_pod`] with an optional explicit precondition: with `precondition_rv` the delete
/// happens only at that resourceVersion (`Conflict` otherwise, never retried); without it, a
/// `Conflict` caused by a write between the read and the delete is retried on a fresh read,
/// up to [`DELETE_RETRIES`] times.
pub async fn delete_pod_with(
    store: &dyn Store,
    ns: &str,
    name: &str,
    grace_period_seconds: Option<i64>,
    precondition_rv: Option<u64>,
) -> Result<Value, StoreError> {
    let mut attempt = 0;
    loop {
        match delete_pod_once(store, ns, name, grace_period_seconds, precondition_rv).await {
            Err(StoreError::Conflict { .. })
                if precondition_rv.is_none() && attempt < DELETE_RETRIES =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(10)))).await;
            }
            r => return r,
        }
    }
}

async fn delete_pod_once(
    store: &dyn Store,
    ns: &str,
    name: &str,
    grace_period_seconds: Option<i64>,
    precondition_rv: Option<u64>,
) -> Result<Value, StoreError> {
    let cur_v = store
        .get(Kind::Pod, ns, name)?
        .ok_or_else(|| StoreError::NotFound {
            kind: "Pod",
            name: name.to_string(),
        })?;
    let cur_rv = object_rv(&cur_v);
    if let Some(given) = precondition_rv {
        if Some(given) != cur_rv {
            return Err(StoreError::Conflict {
                kind: "Pod",
                name: name.to_string(),
                current: cur_rv.unwrap_or(0),
                given,
            });
        }
    }
    let mut cur: Pod = serde_json::from_value((*cur_v).clone())
        .map_err(|e| StoreError::Backend(format!("stored pod {name}: {e}")))?;
    let force = grace_period_seconds == Some(0);
    let active = cur.spec.node_name.is_some() && !cur.phase().is_terminal();
    if force || !active {
        return store.delete(Kind::Pod, ns, name, cur_rv).await;
    }
    if cur.metadata.deletion_timestamp.is_some() {
        return Ok((*cur_v).clone());
    }
    cur.metadata.deletion_timestamp = Some(Utc::now());
    cur.metadata.deletion_grace_period_seconds = Some(
        grace_period_seconds
            .or(cur.spec.termination_grace_period_seconds)
            .unwrap_or(30),
    );
    let v = serde_json::to_value(&cur).map_err(|e| StoreError::Backend(e.to_string()))?;
    store.update(Kind::Pod, v).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogQuery {
    pub container: Option<String>,
    pub follow: Option<bool>,
    pub tail_lines: Option<usize>,
}

async fn log(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let pod: Pod = serde_json::from_value(get_one(&s, Kind::Pod, &ns, &name)?)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let names: Vec<&str> = pod
        .spec
        .init_containers
        .iter()
        .chain(pod.spec.containers.iter())
        .map(|c| c.name.as_str())
        .collect();
    let container = match q.container.as_deref() {
        Some(c) if names.contains(&c) => c.to_string(),
        Some(c) => {
            return Err(ApiError::BadRequest(format!(
                "container {c} is not valid for pod {name}; choose one of: [{}]",
                names.join(" ")
            )))
        }
        None if pod.spec.containers.len() == 1 => pod.spec.containers[0].name.clone(),
        None => {
            return Err(ApiError::BadRequest(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )))
        }
    };
    let uid = pod.uid().to_string();
    let node = pod.spec.node_name.clone().unwrap_or_default();
    let remote = !s.nodes.is_local(Some(&node));
    let mut missing = remote;
    if remote {
        let mut path = format!("/containerLogs/{ns}/{name}/{uid}/{container}?");
        if let Some(n) = q.tail_lines {
            path.push_str(&format!("tailLines={n}&"));
        }
        if q.follow.unwrap_or(false) {
            path.push_str("follow=true");
        }
        let resp = node_get(&s, &node, &path).await?;
        if resp.status() != StatusCode::NOT_FOUND {
            return Ok(resp);
        }
    } else {
        missing = !s.logs.path(&uid, &container).exists();
    }
    if missing {
        let waiting = pod
            .status
            .as_ref()
            .and_then(|st| {
                st.container_statuses
                    .iter()
                    .chain(st.init_container_statuses.iter())
                    .find(|c| c.name == container)
            })
            .and_then(|c| c.state.waiting.clone());
        if let Some(w) = waiting {
            if !q.follow.unwrap_or(false) {
                return Err(ApiError::BadRequest(format!(
                    "container {container:?} in pod {name:?} is waiting to start: {}",
                    w.reason.unwrap_or_default()
                )));
            }
        }
    }
    if remote {
        // The node has no log for it (yet): empty, as a local container's would be.
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "").into_response());
    }
    let (head, offset) = s.logs.read(&uid, &container, q.tail_lines);
    let uid_done = uid.clone();
    if !q.follow.unwrap_or(false) {
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], head).into_response());
    }
    let store = s.store.clone();
    let done: crate::runtime::nodeapi::DoneCheck = std::sync::Arc::new(move || {
        // Stop following when the pod is gone or finished for good.
        let done = match store.get(Kind::Pod, &ns, &name) {
            Ok(Some(p)) => {
                p["metadata"]["uid"].as_str() != Some(uid_done.as_str())
                    || matches!(
                        p["status"]["phase"].as_str(),
                        Some("Succeeded") | Some("Failed")
                    )
            }
            _ => true,
        };
        Box::pin(futures::future::ready(done))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(crate::runtime::nodeapi::follow_body(
            s.logs.clone(),
            uid,
            container,
            head,
            offset,
            done,
            s.shutdown.clone(),
        ))
        .unwrap())
}
