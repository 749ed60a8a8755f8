//! The event recorder: how the scheduler, the controllers and the node agent record their
//! decisions as `v1 Event` objects (`kapsel describe` shows them). Repeats of the same (object,
//! reason, message) bump `count` instead of piling up; [`Recorder::warning_latest`] keeps one
//! event per (object, reason) carrying the latest message (as `FailedScheduling`). Writes are
//! fire-and-forget so a decision never waits on them, and they are rate-limited as Kubernetes'
//! event correlator does: a token bucket per involved object and reason (a burst, then one write per
//! interval; further repeats are dropped), a bound on writes in flight, and a bound on events
//! waiting to be written (over it, new events are dropped), so no component can turn a storm
//! of decisions into a storm of store writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::client::{Client, ClientError, LocalClient};
use crate::model::event::EventSource;
use crate::model::{Event, Kind, ObjectMeta, ObjectReference, Pod};
use crate::store::Store;

/// Events one object may record at once for one reason...
const BURST_PER_OBJECT: f64 = 25.0;
/// ...and then one per this interval (Kubernetes: 25, then one per 5 minutes).
const REFILL_PER_OBJECT: Duration = Duration::from_secs(10);
/// Objects whose buckets are tracked (older full ones are forgotten first).
const TRACKED_OBJECTS: usize = 4096;
/// Events waiting to be written; more are dropped.
const MAX_PENDING: usize = 4096;
/// Event writes in flight at once.
const WRITES_IN_FLIGHT: usize = 32;

#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Inner>,
}

struct Inner {
    client: Arc<dyn Client>,
    component: String,
    host: Option<String>,
    buckets: Mutex<HashMap<String, Bucket>>,
    pending: AtomicUsize,
    writes: Arc<Semaphore>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let earned = now.duration_since(self.at).as_secs_f64() / REFILL_PER_OBJECT.as_secs_f64();
        self.tokens = (self.tokens + earned).min(BURST_PER_OBJECT);
        self.at = now;
    }
}

/// How an event is named, and so what it is folded into.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fold {
    /// Same object, reason and message: one event, its count bumped.
    Identical,
    /// Same object and reason: one event, count bumped, message replaced by the latest.
    Reason,
}

impl Recorder {
    /// A recorder writing straight into the server's store (the control plane's components).
    pub fn new(store: Arc<dyn Store>, component: &str, host: Option<String>) -> Self {
        Self::with_client(LocalClient::shared(store), component, host)
    }

    /// A recorder writing through the client seam (the node agent).
    pub fn with_client(client: Arc<dyn Client>, component: &str, host: Option<String>) -> Self {
        Recorder {
            inner: Arc::new(Inner {
                client,
                component: component.to_string(),
                host,
                buckets: Mutex::new(HashMap::new()),
                pending: AtomicUsize::new(0),
                writes: Arc::new(Semaphore::new(WRITES_IN_FLIGHT)),
            }),
        }
    }

    pub fn pod_ref(pod: &Pod) -> ObjectReference {
        ObjectReference {
            kind: "Pod".into(),
            namespace: pod.ns().to_string(),
            name: pod.name().to_string(),
            uid: pod.uid().to_string(),
            field_path: None,
        }
    }

    /// A reference to any object by kind and metadata.
    pub fn obj_ref(kind: &str, meta: &ObjectMeta) -> ObjectReference {
        ObjectReference {
            kind: kind.into(),
            namespace: meta.ns().to_string(),
            name: meta.name.clone(),
            uid: meta.uid.clone().unwrap_or_default(),
            field_path: None,
        }
    }

    pub fn normal(&self, obj: ObjectReference, reason: &str, message: String) {
        self.emit(obj, "Normal", reason, message, Fold::Identical);
    }

    pub fn warning(&self, obj: ObjectReference, reason: &str, message: String) {
        self.emit(obj, "Warning", reason, message, Fold::Identical);
    }

    /// A warning kept as one event per (object, reason): a new message replaces the old one
    /// and bumps the count (`FailedScheduling`: the reasons change as nodes come and go).
    pub fn warning_latest(&self, obj: ObjectReference, reason: &str, message: String) {
        self.emit(obj, "Warning", reason, message, Fold::Reason);
    }

    /// Take a token from the (object, reason) bucket; false when it has none left.
    fn allow(&self, obj: &ObjectReference, reason: &str) -> bool {
        let key = if obj.uid.is_empty() {
            format!("{}/{}/{}/{reason}", obj.kind, obj.namespace, obj.name)
        } else {
            format!("{}/{reason}", obj.uid)
        };
        let now = Instant::now();
        let mut buckets = self.inner.buckets.lock().unwrap();
        if buckets.len() >= TRACKED_OBJECTS && !buckets.contains_key(&key) {
            // A bucket that has refilled is the same as no bucket.
            buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < BURST_PER_OBJECT
            });
            if buckets.len() >= TRACKED_OBJECTS {
                // Still full of busy objects: forget the ones that were quiet the longest.
                let mut ats: Vec<Instant> = buckets.values().map(|b| b.at).collect();
                ats.sort();
                let cut = ats[ats.len() / 2];
                buckets.retain(|_, b| b.at > cut);
            }
        }
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: BURST_PER_OBJECT,
            at: now,
        });
        b.refill(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn emit(&self, obj: ObjectReference, type_: &str, reason: &str, message: String, fold: Fold) {
        if !self.allow(&obj, reason) {
            tracing::debug!(object = %obj.name, reason, "event dropped: too many for this object");
            return;
        }
        let inner = &self.inner;
        if inner.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            inner.pending.fetch_sub(1, Ordering::SeqCst);
            tracing::debug!(object = %obj.name, reason, "event dropped: too many waiting");
            return;
        }
        let this = self.clone();
        let type_ = type_.to_string();
        let reason = reason.to_string();
        tokio::spawn(async move {
            let permit = this.inner.writes.clone().acquire_owned().await;
            if permit.is_ok() {
                if let Err(e) = this.record(obj, &type_, &reason, message, fold).await {
                    tracing::debug!(error = %e, "event not recorded");
                }
            }
            this.inner.pending.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Create the event or bump the count of an identical one. Awaitable for tests.
    pub async fn write(
        &self,
        obj: ObjectReference,
        type_: &str,
        reason: &str,
        message: String,
    ) -> Result<(), ClientError> {
        self.record(obj, type_, reason, message, Fold::Identical)
            .await
    }

    async fn record(
        &self,
        obj: ObjectReference,
        type_: &str,
        reason: &str,
        message: String,
        fold: Fold,
    ) -> Result<(), ClientError> {
        let client = &self.inner.client;
        let ns = if obj.namespace.is_empty() {
            "default".to_string()
        } else {
            obj.namespace.clone()
        };
        let mut h = Sha256::new();
        h.update(obj.uid.as_bytes());
        h.update(reason.as_bytes());
        if fold == Fold::Identical {
            h.update(message.as_bytes());
        }
        let name = format!("{}.{}", obj.name, &hex::encode(h.finalize())[..16]);
        let now = Utc::now();
        for _ in 0..5 {
            if let Some(existing) = client.get(Kind::Event, &ns, &name).await? {
                let mut ev: Event = match serde_json::from_value((*existing).clone()) {
                    Ok(e) => e,
                    Err(_) => return Ok(()),
                };
                ev.count += 1;
                ev.last_timestamp = Some(now);
                ev.message = message.clone();
                ev.type_ = type_.to_string();
                match client
                    .replace(Kind::Event, serde_json::to_value(&ev).unwrap())
                    .await
                {
                    Err(ClientError::Conflict(_)) | Err(ClientError::NotFound { .. }) => continue,
                    r => return r.map(|_| ()),
                }
            }
            let ev = Event {
                api_version: "v1".into(),
                kind: "Event".into(),
                metadata: ObjectMeta {
                    name: name.clone(),
                    namespace: Some(ns.clone()),
                    uid: Some(uuid::Uuid::new_v4().to_string()),
                    creation_timestamp: Some(now),
                    ..Default::default()
                },
                involved_object: obj.clone(),
                reason: reason.to_string(),
                message: message.clone(),
                type_: type_.to_string(),
                count: 1,
                first_timestamp: Some(now),
                last_timestamp: Some(now),
                source: Some(EventSource {
                    component: self.inner.component.clone(),
                    host: self.inner.host.clone(),
                }),
            };
            match client
                .create(Kind::Event, serde_json::to_value(&ev).unwrap())
                .await
            {
                Err(ClientError::AlreadyExists { .. }) => continue,
                r => return r.map(|_| ()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb::RedbStore;

    fn obj(uid: &str) -> ObjectReference {
        ObjectReference {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: format!("p-{uid}"),
            uid: uid.into(),
            field_path: None,
        }
    }

    #[test]
    fn an_object_gets_a_burst_then_is_limited() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let r = Recorder::new(store, "test", None);
        let allowed = (0..100).filter(|_| r.allow(&obj("a"), "BackOff")).count();
        assert_eq!(allowed, BURST_PER_OBJECT as usize);
        // Another object, or another reason, has its own bucket.
        assert!(r.allow(&obj("b"), "BackOff"));
        assert!(r.allow(&obj("a"), "Started"));
        // Many objects: the tracked set stays bounded.
        for i in 0..(3 * TRACKED_OBJECTS) {
            r.allow(&obj(&i.to_string()), "BackOff");
        }
        assert!(r.inner.buckets.lock().unwrap().len() <= TRACKED_OBJECTS);
    }

    #[tokio::test]
    async fn one_event_per_object_and_reason_keeps_the_latest_message() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let r = Recorder::new(store.clone(), "test", None);
        for msg in [
            "0/0 nodes are available.",
            "0/1 nodes are available: x.",
            "0/1 nodes are available: x.",
        ] {
            r.record(
                obj("u1"),
                "Warning",
                "FailedScheduling",
                msg.into(),
                Fold::Reason,
            )
            .await
            .unwrap();
        }
        let (evs, _) = store.list(Kind::Event, Some("default")).unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0]["count"], 3);
        assert_eq!(evs[0]["message"], "0/1 nodes are available: x.");
    }
}
