//! The controller manager: watches Deployments, ReplicaSets and Pods in the store and feeds a
//! de-duplicating work queue ([`super::workqueue`]) that a bounded pool of workers drains,
//! running the level-triggered reconcilers ([`super::deployment`], [`super::replicaset`]).
//! A pod's change wakes its ReplicaSet and that ReplicaSet's Deployment; a ReplicaSet's change
//! wakes its Deployment; all paced by the cost of their last reconcile (see
//! [`super::workqueue::WorkQueue::add_paced`]). Reconcilers read the store's in-memory state, so they always see
//! their own writes; a write that loses a race (409) is retried by requeueing. Objects whose
//! owner is gone are deleted (garbage collection by `ownerReferences`). While nothing changes,
//! nothing runs: there is no periodic resync.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::view::controller_of;
use super::workqueue::WorkQueue;
use crate::events::Recorder;
use crate::model::Kind;
use crate::store::{Store, StoreError, WatchEvent, WatchFrom};

/// Errors of a reconcile; the key is retried.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("decoding a stored object: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Reconciles in a namespace of fewer pods than this are never paced.
const PACE_MIN_PODS: usize = 1000;

/// What the queue holds: the object to reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Deployment(String, String),
    ReplicaSet(String, String),
}

/// What reconcilers share.
pub struct Ctx {
    pub store: Arc<dyn Store>,
    pub recorder: Recorder,
    pub queue: Arc<WorkQueue<Key>>,
    /// `tolerationSeconds` of the not-ready/unreachable tolerations new pods get.
    pub default_toleration_seconds: i64,
    /// ReplicaSets (by uid) in the middle of a scale-up: the slow-start batch size reached.
    pub slow_start: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// A reconcile's verdict: done, or look again after a while (a deadline or `minReadySeconds`
/// that will pass with no event to announce it).
pub type Requeue = Option<Duration>;

pub struct Controllers {
    ctx: Arc<Ctx>,
    workers: usize,
}

impl Controllers {
    pub fn new(store: Arc<dyn Store>) -> Self {
        let recorder = Recorder::new(store.clone(), "deployment-controller", None);
        Controllers {
            ctx: Arc::new(Ctx {
                store,
                recorder,
                queue: WorkQueue::new(),
                default_toleration_seconds: super::nodelifecycle::LifecycleConfig::default()
                    .default_toleration_seconds,
                slow_start: Default::default(),
            }),
            workers: 4,
        }
    }

    /// The `tolerationSeconds` of the default tolerations pods of ReplicaSets get.
    pub fn with_default_toleration_seconds(mut self, secs: i64) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.default_toleration_seconds = secs;
        }
        self
    }

    pub async fn run(self, cancel: CancellationToken) {
        let tracker = TaskTracker::new();
        for _ in 0..self.workers {
            let ctx = self.ctx.clone();
            tracker.spawn(async move {
                while let Some(k) = ctx.queue.get().await {
                    let t0 = std::time::Instant::now();
                    let r = match &k {
                        Key::Deployment(ns, name) => super::deployment::sync(&ctx, ns, name).await,
                        Key::ReplicaSet(ns, name) => super::replicaset::sync(&ctx, ns, name).await,
                    };
                    match r {
                        Ok(Some(after)) => ctx.queue.add_after(k.clone(), after),
                        Ok(None) => {}
                        Err(ControllerError::Store(StoreError::Conflict { .. })) => {
                            ctx.queue.add_after(k.clone(), Duration::from_millis(20))
                        }
                        Err(ControllerError::Store(StoreError::Closed)) => {}
                        Err(e) => {
                            tracing::warn!(key = ?k, error = %e, "reconcile failed; retrying");
                            ctx.queue.add_after(k.clone(), Duration::from_millis(500));
                        }
                    }
                    // Only reconciles over many pods are paced: a small Deployment reacts
                    // at once whatever the machine's load.
                    let took = t0.elapsed();
                    let big = took >= super::workqueue::PACE_MIN_COST && {
                        let ns = match &k {
                            Key::Deployment(ns, _) | Key::ReplicaSet(ns, _) => ns,
                        };
                        ctx.store
                            .list(Kind::Pod, Some(ns))
                            .map(|(pods, _)| pods.len() >= PACE_MIN_PODS)
                            .unwrap_or(false)
                    };
                    ctx.queue.record_cost(&k, big.then_some(took));
                    ctx.queue.done(&k);
                }
            });
        }
        tracker.close();
        loop {
            match self.watch(&cancel).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "controllers restarting their watches");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = cancel.cancelled() => break,
                    }
                }
            }
        }
        self.ctx.queue.shutdown();
        tracker.wait().await;
    }

    /// Watch the three kinds and route every change to the keys it concerns. Returns `Err` when
    /// a watch fell behind (the caller lists and watches again: every object is requeued).
    async fn watch(&self, cancel: &CancellationToken) -> Result<(), String> {
        let store = &self.ctx.store;
        let mut dw = store
            .watch(Kind::Deployment, None, WatchFrom::Current)
            .map_err(|e| e.to_string())?;
        let mut rw = store
            .watch(Kind::ReplicaSet, None, WatchFrom::Current)
            .map_err(|e| e.to_string())?;
        let mut pw = store
            .watch(Kind::Pod, None, WatchFrom::Current)
            .map_err(|e| e.to_string())?;
        for ev in dw
            .initial
            .iter()
            .chain(rw.initial.iter())
            .chain(pw.initial.iter())
        {
            self.route(ev);
        }
        dw.initial.clear();
        rw.initial.clear();
        pw.initial.clear();
        loop {
            tokio::select! {
                ev = dw.live.recv() => match ev {
                    Ok(ev) => if dw.wants(&ev) { self.route(&ev) },
                    Err(RecvError::Lagged(_)) => return Err("deployment watch lagged".into()),
                    Err(RecvError::Closed) => return Ok(()),
                },
                ev = rw.live.recv() => match ev {
                    Ok(ev) => if rw.wants(&ev) { self.route(&ev) },
                    Err(RecvError::Lagged(_)) => return Err("replicaset watch lagged".into()),
                    Err(RecvError::Closed) => return Ok(()),
                },
                ev = pw.live.recv() => match ev {
                    Ok(ev) => if pw.wants(&ev) { self.route(&ev) },
                    Err(RecvError::Lagged(_)) => return Err("pod watch lagged".into()),
                    Err(RecvError::Closed) => return Ok(()),
                },
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }

    /// Every key is added paced: a reconcile over thousands of pods (whose every status write
    /// wakes it, as does its own status write) rests between runs; a cheap one runs at once.
    fn route(&self, ev: &WatchEvent) {
        let q = &self.ctx.queue;
        let ns = ev.namespace().to_string();
        let name = ev.object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match ev.kind {
            Kind::Deployment => q.add_paced(Key::Deployment(ns, name)),
            Kind::ReplicaSet => {
                if let Some(("Deployment", owner, _)) = controller_of(&ev.object) {
                    q.add_paced(Key::Deployment(ns.clone(), owner.to_string()));
                }
                q.add_paced(Key::ReplicaSet(ns, name));
            }
            Kind::Pod => {
                let Some(("ReplicaSet", rs, _)) = controller_of(&ev.object) else {
                    return;
                };
                if let Ok(Some(rs_obj)) = self.ctx.store.get(Kind::ReplicaSet, &ns, rs) {
                    if let Some(("Deployment", owner, _)) = controller_of(&rs_obj) {
                        q.add_paced(Key::Deployment(ns.clone(), owner.to_string()));
                    }
                }
                q.add_paced(Key::ReplicaSet(ns, rs.to_string()));
            }
            _ => {}
        }
    }
}
