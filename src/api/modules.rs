//! The module store's HTTP face (see [`crate::modules`]):
//!
//! - `PUT /v1-kapsel/modules/sha256:<hex>`: the body is the module's bytes
//!   (`Content-Type: application/octet-stream` or `application/wasm`); 201 when stored, 200 when
//!   it was already there, 400 when the bytes do not hash to the digest, 413 above the size cap.
//! - `GET` / `HEAD /v1-kapsel/modules/sha256:<hex>`: the bytes (404 `Status` naming the digest).
//! - `GET /v1-kapsel/modules`: a `ModuleList` (digest, size, time stored).
//!
//! Users (the loopback API) may do all of it; a node on the cluster listener may only read a
//! module by digest ([`super::authz`]).

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::modules::{Digest, ModuleStore};

/// The collection path.
pub const MODULES_PATH: &str = "/v1-kapsel/modules";

pub fn routes() -> Router<AppState> {
    Router::new().route(MODULES_PATH, get(list)).route(
        "/v1-kapsel/modules/{digest}",
        get(read).put(upload).layer(DefaultBodyLimit::disable()),
    )
}

/// Is this the path of one module (where raw uploads go)?
pub fn is_upload_path(path: &str) -> bool {
    path.strip_prefix(MODULES_PATH)
        .and_then(|r| r.strip_prefix('/'))
        .map(|d| !d.is_empty() && !d.contains('/'))
        .unwrap_or(false)
}

/// The media types of a module upload.
pub fn is_module_media_type(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/octet-stream" || essence == "application/wasm"
}

fn store(s: &AppState) -> Result<&ModuleStore, ApiError> {
    s.modules
        .as_deref()
        .ok_or_else(|| ApiError::Internal("this server has no module store".into()))
}

async fn upload(
    State(s): State<AppState>,
    Path(digest): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let d = Digest::parse(&digest)?;
    let (created, size) = store(&s)?.put(&d, body.into_data_stream()).await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        code,
        Json(json!({"kind": "Module", "apiVersion": "kapsel.io/v1", "digest": d.to_string(), "size": size})),
    )
        .into_response())
}

async fn read(State(s): State<AppState>, Path(digest): Path<String>) -> Result<Response, ApiError> {
    let d = Digest::parse(&digest)?;
    let (size, file) = store(&s)?.open_module(&d).await?;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .header(header::ETAG, format!("\"{d}\""))
        .body(Body::from_stream(
            tokio_util::io::ReaderStream::with_capacity(file, 256 << 10),
        ))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

async fn list(State(s): State<AppState>) -> Result<Response, ApiError> {
    let items: Vec<_> = store(&s)?
        .list()?
        .into_iter()
        .map(|m| {
            json!({
                "digest": m.digest.to_string(),
                "size": m.size,
                "stored": chrono::DateTime::<chrono::Utc>::from(m.modified).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            })
        })
        .collect();
    Ok(
        Json(json!({"kind": "ModuleList", "apiVersion": "kapsel.io/v1", "items": items}))
            .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_paths_and_types() {
        assert!(is_upload_path("/v1-kapsel/modules/sha256:ab"));
        assert!(!is_upload_path("/v1-kapsel/modules"));
        assert!(!is_upload_path("/v1-kapsel/modules/"));
        assert!(!is_upload_path("/v1-kapsel/modules/a/b"));
        assert!(!is_upload_path("/api/v1/pods"));
        assert!(is_module_media_type("application/octet-stream"));
        assert!(is_module_media_type("Application/WASM; x=y"));
        assert!(!is_module_media_type("text/plain"));
    }
}
