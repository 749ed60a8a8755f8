//! `/api/v1/.../events`: the record of decisions, listed and watched (`kapsel describe`).

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
use crate::model::{Event, Kind};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/events", get(list_all))
        .route("/api/v1/namespaces/{ns}/events", get(list).post(create))
        .route(
            "/api/v1/namespaces/{ns}/events/{name}",
            get(read).delete(delete),
        )
}

async fn list_all(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_or_watch(&s, Kind::Event, None, q)
}

async fn list(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_or_watch(&s, Kind::Event, Some(&ns), q)
}

async fn read(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    get_one(&s, Kind::Event, &ns, &name).map(Json)
}

async fn create(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut ev: Event = decode(&body)?;
    ev.api_version = "v1".into();
    ev.kind = "Event".into();
    ev.metadata.namespace = Some(ns);
    if ev.metadata.name.is_empty() {
        ev.metadata.name = format!(
            "{}.{}",
            ev.involved_object.name,
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
    }
    ev.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
    ev.metadata.creation_timestamp = Some(Utc::now());
    let v = serde_json::to_value(&ev).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        Json(s.store.create(Kind::Event, v).await?),
    ))
}

async fn delete(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.store.delete(Kind::Event, &ns, &name, None).await?))
}
