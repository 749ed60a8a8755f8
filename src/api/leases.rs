//! `/apis/coordination.k8s.io/v1/.../leases`: node heartbeats (and, later, leader election).
//! Nodes create and renew their Lease in `kube-node-lease`; the node lifecycle controller
//! reads them. List, watch, get, create, replace (compare-and-swap on `resourceVersion`) and
//! delete, as for the other kinds.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::Value;

use super::error::ApiError;
use super::{decode, get_one, list_or_watch, AppState, ListQuery};
use crate::model::validate::{validate_object_name, FieldError};
use crate::model::{Kind, Lease};

const BASE: &str = "/apis/coordination.k8s.io/v1";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{BASE}/leases"), get(list_all))
        .route(
            &format!("{BASE}/namespaces/{{ns}}/leases"),
            get(list).post(create),
        )
        .route(
            &format!("{BASE}/namespaces/{{ns}}/leases/{{name}}"),
            get(read).put(replace).delete(delete),
        )
}

async fn list_all(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_or_watch(&s, Kind::Lease, None, q)
}

async fn list(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_or_watch(&s, Kind::Lease, Some(&ns), q)
}

async fn read(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    get_one(&s, Kind::Lease, &ns, &name).map(Json)
}

fn check(lease: &mut Lease, ns: &str) -> Result<(), ApiError> {
    lease.api_version = "coordination.k8s.io/v1".into();
    lease.kind = "Lease".into();
    let mut errs = Vec::new();
    match lease.metadata.namespace.as_deref() {
        Some(n) if n != ns => errs.push(FieldError {
            field: "metadata.namespace".into(),
            message: format!(
                "Invalid value: {n:?}: does not match the namespace on the URL ({ns})"
            ),
        }),
        _ => lease.metadata.namespace = Some(ns.to_string()),
    }
    validate_object_name(&lease.metadata.name, "metadata.name", &mut errs);
    if let Some(d) = lease.spec.lease_duration_seconds {
        if d <= 0 {
            errs.push(FieldError {
                field: "spec.leaseDurationSeconds".into(),
                message: format!("Invalid value: {d}: must be greater than 0"),
            });
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            kind: "Lease".into(),
            name: lease.metadata.name.clone(),
            errors: errs,
        })
    }
}

async fn create(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut lease: Lease = decode(&body)?;
    check(&mut lease, &ns)?;
    if lease.metadata.resource_version.is_some() {
        return Err(ApiError::BadRequest(
            "metadata.resourceVersion: must not be set on create".into(),
        ));
    }
    lease.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
    lease.metadata.creation_timestamp = Some(Utc::now());
    let v = serde_json::to_value(&lease).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        Json(s.store.create(Kind::Lease, v).await?),
    ))
}

async fn replace(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let mut lease: Lease = decode(&body)?;
    if lease.metadata.name != name {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            lease.metadata.name
        )));
    }
    check(&mut lease, &ns)?;
    let cur: Lease = serde_json::from_value(get_one(&s, Kind::Lease, &ns, &name)?)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    lease.metadata.uid = cur.metadata.uid;
    lease.metadata.creation_timestamp = cur.metadata.creation_timestamp;
    let v = serde_json::to_value(&lease).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(s.store.update(Kind::Lease, v).await?))
}

async fn delete(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.store.delete(Kind::Lease, &ns, &name, None).await?))
}
