//! The cluster routes: `GET /cacerts` (the CA PEM whose sha256 a join token carries),
//! `POST /v1-kapsel/join` (a join token as bearer + a node name and CSR → the node's client
//! certificate; a name bound to another key → 403), and the token admin
//! `GET|POST /v1-kapsel/tokens`, `DELETE /v1-kapsel/tokens/{id}` (for the local user on the
//! loopback API; the node authorizer keeps nodes away from them). All answer 400 on a server
//! started without `--cluster-listen`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::{decode, AppState};
use crate::pki::nodes::Binding;
use crate::pki::{Cluster, ClusterMetrics, JoinToken};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/cacerts", get(cacerts))
        .route(crate::pki::join::JOIN_PATH, post(join))
        .route("/v1-kapsel/tokens", get(list_tokens).post(create_token))
        .route("/v1-kapsel/tokens/{id}", delete(delete_token))
}

fn cluster(s: &AppState) -> Result<&Arc<Cluster>, ApiError> {
    s.cluster.as_ref().ok_or_else(|| {
        ApiError::BadRequest(
            "this server has no cluster listener: start `kapsel serve` with --cluster-listen ADDR"
                .into(),
        )
    })
}

async fn cacerts(State(s): State<AppState>) -> Result<Response, ApiError> {
    let c = cluster(&s)?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        c.ca.pem().to_string(),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JoinRequest {
    node_name: String,
    csr: String,
}

async fn join(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let c = cluster(&s)?;
    let m = &c.metrics;
    let unauthorized = |why: &str| {
        ClusterMetrics::inc(&m.join_unauthorized);
        tracing::warn!(reason = why, "join refused");
        ApiError::Unauthorized(format!("join refused: {why}"))
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("no bearer token"))?;
    let token: JoinToken = token
        .parse()
        .map_err(|_| unauthorized("not a join token"))?;
    if token.ca_hash.as_deref().is_some_and(|h| h != c.ca.hash()) {
        return Err(unauthorized("the token is for another cluster CA"));
    }
    if !c.tokens.verify(&token.id, &token.secret) {
        return Err(unauthorized("unknown, expired or deleted token"));
    }
    let req: JoinRequest = decode(&body)?;
    if !crate::model::validate::is_dns_subdomain(&req.node_name) {
        return Err(ApiError::BadRequest(format!(
            "nodeName: {:?} is not a valid node name (a DNS subdomain: lower-case letters, digits, '-' and '.')",
            req.node_name
        )));
    }
    let (cert, key_hash) =
        c.ca.sign_node(&req.node_name, &req.csr)
            .map_err(|e| ApiError::BadRequest(format!("csr: {e}")))?;
    match c
        .nodes
        .bind(&req.node_name, &key_hash)
        .map_err(|e| ApiError::Internal(e.to_string()))?
    {
        Binding::Taken => {
            ClusterMetrics::inc(&m.join_forbidden);
            tracing::warn!(node = %req.node_name, token = %token.id, "join refused: node name held by another key");
            return Err(ApiError::Forbidden(format!(
                "node name {:?} is already held by another node's key; choose another --node-name",
                req.node_name
            )));
        }
        Binding::New | Binding::Same => {}
    }
    ClusterMetrics::inc(&m.join_accepted);
    tracing::info!(node = %req.node_name, token = %token.id, "node joined");
    Ok(Json(
        json!({"nodeName": req.node_name, "certificate": cert}),
    ))
}

async fn list_tokens(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let c = cluster(&s)?;
    let items: Vec<Value> = c
        .tokens
        .list()
        .into_iter()
        .map(|t| {
            json!({
                "id": t.id,
                "description": t.description,
                "created": t.created,
                "expires": t.expires,
            })
        })
        .collect();
    Ok(Json(json!({"kind": "JoinTokenList", "items": items})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateToken {
    #[serde(default)]
    description: String,
    /// Seconds until the token expires; 0 or absent: never.
    #[serde(default)]
    ttl_seconds: u64,
}

async fn create_token(
    State(s): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let c = cluster(&s)?;
    let req: CreateToken = if body.iter().all(u8::is_ascii_whitespace) {
        CreateToken::default()
    } else {
        decode(&body)?
    };
    let ttl = (req.ttl_seconds > 0).then(|| std::time::Duration::from_secs(req.ttl_seconds));
    let (id, secret) = c
        .tokens
        .create(&req.description, ttl)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let expires =
        ttl.map(|d| chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or_default());
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": id,
            "token": c.join_token(&id, &secret),
            "description": req.description,
            "expires": expires,
        })),
    ))
}

async fn delete_token(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = cluster(&s)?;
    if !c
        .tokens
        .delete(&id)
        .map_err(|e| ApiError::Internal(e.to_string()))?
    {
        return Err(ApiError::NotFound {
            kind: "token".into(),
            name: id,
        });
    }
    Ok(Json(
        json!({"kind": "Status", "status": "Success", "details": {"name": id}}),
    ))
}
