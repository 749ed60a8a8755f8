//! The API layer's error enum and its one mapping to HTTP: a Kubernetes `Status` object with
//! 400 / 401 / 403 / 404 / 409 / 410 / 413 / 415 / 422 / 500 / 502 / 503. Internal details are logged, not leaked.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::model::validate::FieldError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{kind} {name:?} not found")]
    NotFound { kind: String, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: String, name: String },
    #[error("Operation cannot be fulfilled on {kind} {name:?}: {message}")]
    Conflict {
        kind: String,
        name: String,
        message: String,
    },
    #[error("{kind} {name:?} is invalid: {}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", "))]
    Invalid {
        kind: String,
        name: String,
        errors: Vec<FieldError>,
    },
    #[error("{0}")]
    Gone(String),
    /// No (valid) credentials on the cluster listener, or a bad join token.
    #[error("{0}")]
    Unauthorized(String),
    /// Refused before routing: a browser-origin or DNS-rebinding request (see `api::guard`).
    #[error("{0}")]
    Forbidden(String),
    /// A body above the size the API accepts (a module upload).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A write whose body is not in a media type the API parses.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The pod's node cannot be reached (no tunnel, or it is starting).
    #[error("{0}")]
    Unavailable(String),
    /// The pod's node failed to answer through its tunnel.
    #[error("{0}")]
    BadGateway(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "NotFound"),
            ApiError::AlreadyExists { .. } => (StatusCode::CONFLICT, "AlreadyExists"),
            ApiError::Conflict { .. } => (StatusCode::CONFLICT, "Conflict"),
            ApiError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid"),
            ApiError::Gone(_) => (StatusCode::GONE, "Expired"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden"),
            ApiError::PayloadTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge")
            }
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType")
            }
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            ApiError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "BadGateway"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
        }
    }

    /// The `Status` body.
    pub fn status_json(&self) -> serde_json::Value {
        let (code, reason) = self.code();
        let mut details = serde_json::Map::new();
        match self {
            ApiError::NotFound { kind, name }
            | ApiError::AlreadyExists { kind, name }
            | ApiError::Conflict { kind, name, .. } => {
                details.insert("kind".into(), json!(kind.to_lowercase() + "s"));
                details.insert("name".into(), json!(name));
            }
            ApiError::Invalid { kind, name, errors } => {
                details.insert("kind".into(), json!(kind));
                details.insert("name".into(), json!(name));
                details.insert(
                    "causes".into(),
                    json!(errors
                        .iter()
                        .map(|e| json!({"reason": "FieldValueInvalid", "field": e.field, "message": e.message}))
                        .collect::<Vec<_>>()),
                );
            }
            _ => {}
        }
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": reason,
            "details": details,
            "code": code.as_u16(),
        })
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists { kind, name } => ApiError::AlreadyExists {
                kind: kind.into(),
                name,
            },
            StoreError::NotFound { kind, name } => ApiError::NotFound {
                kind: kind.into(),
                name,
            },
            e @ StoreError::Conflict { .. } => {
                let (kind, name) = match &e {
                    StoreError::Conflict { kind, name, .. } => (kind.to_string(), name.clone()),
                    _ => unreachable!(),
                };
                ApiError::Conflict {
                    kind,
                    name,
                    message: e.to_string(),
                }
            }
            StoreError::Gone(rv) => ApiError::Gone(format!(
                "too old resource version: {rv}; list again and watch from the list's resourceVersion"
            )),
            StoreError::NoName => ApiError::Invalid {
                kind: "object".into(),
                name: String::new(),
                errors: vec![FieldError {
                    field: "metadata.name".into(),
                    message: "Required value: name or generateName is required".into(),
                }],
            },
            e @ (StoreError::Backend(_) | StoreError::Closed) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<crate::modules::ModuleError> for ApiError {
    fn from(e: crate::modules::ModuleError) -> Self {
        use crate::modules::ModuleError as M;
        match e {
            M::InvalidDigest(_) | M::HashMismatch { .. } | M::Body(_) => {
                ApiError::BadRequest(e.to_string())
            }
            M::TooLarge { .. } => ApiError::PayloadTooLarge(e.to_string()),
            M::NotFound(d) => ApiError::NotFound {
                kind: "module".into(),
                name: d.to_string(),
            },
            M::Io(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal API error");
        }
        let (code, _) = self.code();
        (code, Json(self.status_json())).into_response()
    }
}
