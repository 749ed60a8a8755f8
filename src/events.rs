//! The event recorder: how the scheduler, the controllers and the node agent record their decisions as `v1 Event`
//! objects (`kapsel describe` shows them). Repeats of the same (object, reason, message) bump
//! `count` instead of piling up; writes are fire-and-forget so a decision never waits on them.

use std::sync::Arc;

use chrono::Utc;
use sha2::{Digest, Sha256};

use crate::model::event::EventSource;
use crate::model::{Event, Kind, ObjectMeta, ObjectReference, Pod};
use crate::store::{Store, StoreError};

#[derive(Clone)]
pub struct Recorder {
    store: Arc<dyn Store>,
    component: String,
    host: Option<String>,
}

impl Recorder {
    pub fn new(store: Arc<dyn Store>, component: &str, host: Option<String>) -> Self {
        Recorder {
            store,
            component: component.to_string(),
            host,
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
        self.emit(obj, "Normal", reason, message);
    }

    pub fn warning(&self, obj: ObjectReference, reason: &str, message: String) {
        self.emit(obj, "Warning", reason, message);
    }

    fn emit(&self, obj: ObjectReference, type_: &str, reason: &str, message: String) {
        let this = self.clone();
        let type_ = type_.to_string();
        let reason = reason.to_string();
        tokio::spawn(async move {
            if let Err(e) = this.write(obj, &type_, &reason, message).await {
                tracing::debug!(error = %e, "event not recorded");
            }
        });
    }

    /// Create the event or bump the count of an identical one. Awaitable for tests.
    pub async fn write(
        &self,
        obj: ObjectReference,
        type_: &str,
        reason: &str,
        message: String,
    ) -> Result<(), StoreError> {
        let ns = if obj.namespace.is_empty() {
            "default".to_string()
        } else {
            obj.namespace.clone()
        };
        let mut h = Sha256::new();
        h.update(obj.uid.as_bytes());
        h.update(reason.as_bytes());
        h.update(message.as_bytes());
        let name = format!("{}.{}", obj.name, &hex::encode(h.finalize())[..16]);
        let now = Utc::now();
        for _ in 0..5 {
            if let Some(existing) = self.store.get(Kind::Event, &ns, &name)? {
                let mut ev: Event = match serde_json::from_value((*existing).clone()) {
                    Ok(e) => e,
                    Err(_) => return Ok(()),
                };
                ev.count += 1;
                ev.last_timestamp = Some(now);
                match self
                    .store
                    .update(Kind::Event, serde_json::to_value(&ev).unwrap())
                    .await
                {
                    Err(StoreError::Conflict { .. }) | Err(StoreError::NotFound { .. }) => continue,
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
                    component: self.component.clone(),
                    host: self.host.clone(),
                }),
            };
            match self
                .store
                .create(Kind::Event, serde_json::to_value(&ev).unwrap())
                .await
            {
                Err(StoreError::AlreadyExists { .. }) => continue,
                r => return r.map(|_| ()),
            }
        }
        Ok(())
    }
}
