//! Cheap read-only views of stored pods for the controllers: the few fields a reconcile needs
//! (owner, readiness, phase, termination), read straight from the stored JSON without
//! deserializing whole pods, so that a reconcile over 1,000 pods stays well under a
//! millisecond per pod.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

/// The controlling owner of an object (`ownerReferences[]` with `controller: true`, or the
/// only one).
pub fn controller_of(obj: &Value) -> Option<(&str, &str, &str)> {
    let refs = obj["metadata"]["ownerReferences"].as_array()?;
    let r = refs
        .iter()
        .find(|r| r["controller"].as_bool() == Some(true))
        .or_else(|| (refs.len() == 1).then(|| &refs[0]))?;
    Some((r["kind"].as_str()?, r["name"].as_str()?, r["uid"].as_str()?))
}

#[derive(Debug, Clone)]
pub struct PodView {
    pub name: String,
    pub owner_uid: String,
    pub created: Option<DateTime<Utc>>,
    pub terminating: bool,
    /// Succeeded or Failed: never runs again.
    pub finished: bool,
    pub scheduled: bool,
    pub phase: String,
    /// The `Ready` condition is True, and since when.
    pub ready_since: Option<DateTime<Utc>>,
    pub restarts: i64,
    /// A container is waiting in `CrashLoopBackOff`, or was killed after failing a probe.
    pub crash_looping: bool,
    pub obj: Arc<Value>,
}

impl PodView {
    pub fn of(obj: &Arc<Value>) -> Option<PodView> {
        let (kind, _, uid) = controller_of(obj)?;
        if kind != "ReplicaSet" {
            return None;
        }
        let md = &obj["metadata"];
        let st = &obj["status"];
        let phase = st["phase"].as_str().unwrap_or("Pending").to_string();
        let ready_since = st["conditions"].as_array().and_then(|cs| {
            cs.iter()
                .find(|c| c["type"] == "Ready" && c["status"] == "True")
                .map(|c| {
                    c["lastTransitionTime"]
                        .as_str()
                        .and_then(|t| t.parse().ok())
                        .unwrap_or_else(Utc::now)
                })
        });
        let statuses = st["containerStatuses"].as_array();
        let restarts = statuses
            .map(|cs| cs.iter().filter_map(|c| c["restartCount"].as_i64()).sum())
            .unwrap_or(0);
        let crash_looping = statuses
            .map(|cs| {
                cs.iter()
                    .any(|c| c["state"]["waiting"]["reason"] == "CrashLoopBackOff")
            })
            .unwrap_or(false);
        Some(PodView {
            name: md["name"].as_str().unwrap_or_default().to_string(),
            owner_uid: uid.to_string(),
            created: md["creationTimestamp"]
                .as_str()
                .and_then(|t| t.parse().ok()),
            terminating: !md["deletionTimestamp"].is_null(),
            finished: matches!(phase.as_str(), "Succeeded" | "Failed"),
            scheduled: obj["spec"]["nodeName"].is_string(),
            phase,
            ready_since,
            restarts,
            crash_looping,
            obj: obj.clone(),
        })
    }

    /// Counts toward a ReplicaSet's replicas.
    pub fn active(&self) -> bool {
        !self.terminating && !self.finished
    }

    pub fn ready(&self) -> bool {
        self.active() && self.ready_since.is_some()
    }

    /// Ready for at least `min_ready` seconds at `now`.
    pub fn available(&self, min_ready: i64, now: DateTime<Utc>) -> bool {
        match (self.active(), self.ready_since) {
            (true, Some(t)) => min_ready <= 0 || (now - t).num_milliseconds() >= min_ready * 1000,
            _ => false,
        }
    }

    /// When a ready pod becomes available (for requeueing), if it is not yet.
    pub fn available_at(&self, min_ready: i64, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let t = self.ready_since?;
        let at = t + chrono::Duration::seconds(min_ready);
        (self.active() && min_ready > 0 && at > now).then_some(at)
    }
}
