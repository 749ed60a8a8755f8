//! `/api/v1/nodes`: nodes register themselves; users list, read, cordon (PUT) and delete them.

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
use crate::model::validate::validate_object_name;
use crate::model::{Kind, Node};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/nodes", get(list).post(create))
        .route(
            "/api/v1/nodes/{name}",
            get(read).put(replace).delete(delete),
        )
}

async fn list(State(s): State<AppState>, Query(q): Query<ListQuery>) -> Result<Response, ApiError> {
    list_or_watch(&s, Kind::Node, None, q)
}

async fn read(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    get_one(&s, Kind::Node, "", &name).map(Json)
}

fn check(node: &Node) -> Result<(), ApiError> {
    let mut errs = Vec::new();
    validate_object_name(&node.metadata.name, "metadata.name", &mut errs);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            kind: "Node".into(),
            name: node.metadata.name.clone(),
            errors: errs,
        })
    }
}

async fn create(
    State(s): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut node: Node = decode(&body)?;
    node.api_version = "v1".into();
    node.kind = "Node".into();
    node.metadata.namespace = None;
    check(&node)?;
    node.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
    node.metadata.creation_timestamp = Some(Utc::now());
    let v = serde_json::to_value(&node).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        Json(s.store.create(Kind::Node, v).await?),
    ))
}

async fn replace(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let mut node: Node = decode(&body)?;
    if node.metadata.name != name {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            node.metadata.name
        )));
    }
    check(&node)?;
    let cur: Node = serde_json::from_value(get_one(&s, Kind::Node, "", &name)?)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    node.metadata.uid = cur.metadata.uid;
    node.metadata.creation_timestamp = cur.metadata.creation_timestamp;
    node.api_version = "v1".into();
    node.kind = "Node".into();
    let v = serde_json::to_value(&node).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(s.store.update(Kind::Node, v).await?))
}

async fn delete(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.store.delete(Kind::Node, "", &name, None).await?))
}
