//! The client seam: how the node agent and the event recorder reach the cluster's objects.
//! Nothing on a node touches the store; it holds an `Arc<dyn Client>` and does get / create /
//! replace / replace-status / delete / watch through it, as a kubelet does through client-go.
//!
//! Backends:
//! - [`local::LocalClient`]: in-process, over the server's own store. The embedded node of
//!   `kapsel serve` and `kapsel up` uses it, so single-node speed stays what it was.
//! - [`http::HttpClient`]: the API over HTTP, with a bearer token: what `kapsel agent` uses.
//!
//! Both also serve WASM modules by digest ([`Client::get_module`]).
//!
//! Rules the node may rely on from every backend: a write with a `resourceVersion` is
//! compare-and-swap (a stale one is [`ClientError::Conflict`]); a watch delivers every change
//! after its initial list, in order, or says [`WatchItem::Resync`] when it fell behind, after
//! which the caller lists again. Controllers must not rely on seeing their own writes at once.

pub mod http;
pub mod local;

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde_json::Value;

use crate::model::Kind;
use crate::modules::Digest;
use crate::store::{StoreError, WatchEvent};

pub use local::LocalClient;

/// Why a request through the seam failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// The object changed since it was read (a stale `resourceVersion`): read again, retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The server refused the request as not allowed for this identity.
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("invalid: {0}")]
    Invalid(String),
    /// The server could not be reached or failed; worth retrying later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The backend is shutting down.
    #[error("the client is closed")]
    Closed,
    #[error("store: {0}")]
    Store(#[source] StoreError),
}

impl From<StoreError> for ClientError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { kind, name } => ClientError::NotFound { kind, name },
            StoreError::AlreadyExists { kind, name } => ClientError::AlreadyExists { kind, name },
            e @ StoreError::Conflict { .. } => ClientError::Conflict(e.to_string()),
            StoreError::Closed => ClientError::Closed,
            e => ClientError::Store(e),
        }
    }
}

/// Which objects a watch wants besides kind and namespace (a field selector).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Selector {
    #[default]
    Everything,
    /// `spec.nodeName=NAME`: the pods bound to one node.
    NodeName(String),
}

impl Selector {
    pub fn matches(&self, obj: &Value) -> bool {
        match self {
            Selector::Everything => true,
            Selector::NodeName(n) => obj["spec"]["nodeName"].as_str() == Some(n.as_str()),
        }
    }
}

/// One item of a live watch.
#[derive(Debug, Clone)]
pub enum WatchItem {
    Event(WatchEvent),
    /// Changes were missed (the watcher fell behind): list again.
    Resync,
}

/// A watch through the seam: the current objects, then every change after them. The stream
/// ends when the backend closes.
pub struct ClientWatch {
    pub initial: Vec<WatchEvent>,
    pub live: BoxStream<'static, WatchItem>,
}

/// Object access for the node and the event recorder. Objects are JSON, as on the wire.
#[async_trait]
pub trait Client: Send + Sync + 'static {
    async fn get(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
    ) -> Result<Option<Arc<Value>>, ClientError>;
    async fn create(&self, kind: Kind, obj: Value) -> Result<Value, ClientError>;
    /// Replace an object; compare-and-swap on its `metadata.resourceVersion` when set.
    async fn replace(&self, kind: Kind, obj: Value) -> Result<Value, ClientError>;
    /// Replace an object's status (the `/status` subresource); compare-and-swap as `replace`.
    async fn replace_status(&self, kind: Kind, obj: Value) -> Result<Value, ClientError>;
    /// Remove an object now (no grace period), if it is still at `rv` when given.
    async fn delete(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        rv: Option<u64>,
    ) -> Result<(), ClientError>;
    async fn watch(
        &self,
        kind: Kind,
        ns: Option<&str>,
        selector: Selector,
    ) -> Result<ClientWatch, ClientError>;
    /// A WASM module's bytes by digest, from the control plane's module store
    /// ([`crate::modules`]). The caller verifies the digest while it reads. A backend without
    /// a module store answers [`ClientError::NotFound`].
    async fn get_module(&self, digest: &Digest) -> Result<ModuleBody, ClientError> {
        Err(ClientError::NotFound {
            kind: "module",
            name: digest.to_string(),
        })
    }
}

/// A module's bytes as they arrive, and its size when the server said it.
pub struct ModuleBody {
    pub size: Option<u64>,
    pub stream: BoxStream<'static, Result<bytes::Bytes, std::io::Error>>,
}
