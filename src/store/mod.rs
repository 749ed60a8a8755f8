//! Object storage: the [`Store`] trait every backend implements, watch events, and store errors.
//!
//! A store keeps JSON objects by (kind, namespace, name), stamps each write with a cluster-wide,
//! monotonically increasing `resourceVersion`, rejects stale writes, and feeds watches from
//! committed writes only. [`redb::RedbStore`] is the embedded, crash-safe default; the trait is
//! shaped like etcd's model (revisions, compare-and-swap, watch from a revision) so an etcd
//! backend can sit behind it.

pub mod redb;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::model::Kind;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("the object has been modified: {kind} {name:?} is at resourceVersion {current}, the write was based on {given}; read it again and retry")]
    Conflict {
        kind: &'static str,
        name: String,
        current: u64,
        given: u64,
    },
    #[error("resourceVersion {0} is too old to watch from; list again")]
    Gone(u64),
    #[error("object has no metadata.name")]
    NoName,
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("the store is shutting down")]
    Closed,
}

/// ADDED / MODIFIED / DELETED, as in a Kubernetes watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One committed change.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub type_: EventType,
    pub kind: Kind,
    pub rv: u64,
    /// The object after the change (for DELETED: its last state, stamped with the delete's rv).
    pub object: Arc<Value>,
}

impl WatchEvent {
    pub fn namespace(&self) -> &str {
        self.object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
    }
}

/// A watch: events replayed from history (or synthesized from the current state), then live.
pub struct Watch {
    pub initial: Vec<WatchEvent>,
    pub live: broadcast::Receiver<WatchEvent>,
    /// Only events of this kind are of interest (the receiver sees all kinds).
    pub kind: Kind,
    pub namespace: Option<String>,
    /// Events at or below this revision were already delivered in `initial`.
    pub after: u64,
}

impl Watch {
    /// Does a live event belong to this watch?
    pub fn wants(&self, ev: &WatchEvent) -> bool {
        ev.kind == self.kind
            && ev.rv > self.after
            && self
                .namespace
                .as_deref()
                .map(|ns| ev.namespace() == ns)
                .unwrap_or(true)
    }
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchFrom {
    /// ADDED for every existing object, then live changes (Kubernetes' "no resourceVersion").
    Current,
    /// Every change after this revision (410 Gone if it is older than the retained history).
    Revision(u64),
}

/// Storage of API objects. Implementations must be safe to share between tasks.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Create; fails with `AlreadyExists`. Returns the stored object (with its resourceVersion).
    async fn create(&self, kind: Kind, obj: Value) -> Result<Value, StoreError>;
    /// Replace. When the object carries `metadata.resourceVersion`, it must match the stored one.
    async fn update(&self, kind: Kind, obj: Value) -> Result<Value, StoreError>;
    /// Delete, optionally only at a given resourceVersion. Returns the last state.
    async fn delete(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        precondition_rv: Option<u64>,
    ) -> Result<Value, StoreError>;
    fn get(&self, kind: Kind, ns: &str, name: &str) -> Result<Option<Arc<Value>>, StoreError>;
    /// Every object of a kind (in one namespace or all), and the revision the list is at.
    fn list(&self, kind: Kind, ns: Option<&str>) -> Result<(Vec<Arc<Value>>, u64), StoreError>;
    fn watch(&self, kind: Kind, ns: Option<&str>, from: WatchFrom) -> Result<Watch, StoreError>;
    /// The newest committed revision.
    fn revision(&self) -> u64;
}

/// (namespace, name) of a JSON object.
pub fn object_key(obj: &Value) -> Result<(String, String), StoreError> {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if name.is_empty() {
        return Err(StoreError::NoName);
    }
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
    Ok((ns.to_string(), name.to_string()))
}

/// The resourceVersion written in an object, if any.
pub fn object_rv(obj: &Value) -> Option<u64> {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
}
