//! The HTTP client the CLI talks to a server with; server `Status` errors become one-line
//! messages.

use reqwest::{Method, StatusCode};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the Kapsel server at {url}: {source} (is `kapsel serve` running? set --server or KAPSEL_SERVER)")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{message}")]
    Api {
        code: u16,
        reason: String,
        message: String,
    },
    #[error("unexpected response from server: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
    pub fn reason(&self) -> &str {
        match self {
            ClientError::Api { reason, .. } => reason,
            _ => "",
        }
    }
}

#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str) -> Self {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("http client"),
        }
    }

    /// The underlying HTTP client (raw uploads: `cli::modules`).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let url = self.url(path);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if !status.is_success() {
            return Err(api_error(status, &v));
        }
        Ok(v)
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request(Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.request(Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.request(Method::PUT, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.request(Method::DELETE, path, None).await
    }

    /// A streaming GET (logs, watches).
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp.bytes().await.unwrap_or_default();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(api_error(status, &v));
        }
        Ok(resp)
    }
}

pub(crate) fn api_error(status: StatusCode, v: &Value) -> ClientError {
    ClientError::Api {
        code: status.as_u16(),
        reason: v["reason"].as_str().unwrap_or("").to_string(),
        message: v["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("server answered {status}")),
    }
}

/// API path of a namespaced or cluster-scoped resource.
pub fn path_for(resource: &str, ns: &str, name: Option<&str>) -> String {
    let base = match resource {
        "nodes" => "/api/v1/nodes".to_string(),
        "deployments" | "replicasets" => format!("/apis/apps/v1/namespaces/{ns}/{resource}"),
        r => format!("/api/v1/namespaces/{ns}/{r}"),
    };
    match name {
        Some(n) => format!("{base}/{n}"),
        None => base,
    }
}
