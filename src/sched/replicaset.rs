//! The ReplicaSet reconciler: keeps `spec.replicas` pods of the template alive. Missing pods
//! are created in slow-start batches (1, 2, 4, … as Kubernetes' ReplicaSet controller: a
//! template that cannot work fails after one pod, not thousands), at most [`BURST_REPLICAS`]
//! per sync (the sync then requeues itself, so one large ReplicaSet never holds a worker for
//! long; the next sync goes on at the batch size reached, and only a failure, or a new
//! scale-up, starts the slow start again). Before each batch the ReplicaSet is read again: once it is deleted, replaced or
//! scaled down, creation stops at once; a failed create stops the sync too (it is retried).
//! Surplus pods are deleted gracefully, least valuable
//! first (unscheduled, pending, not ready, restarting, newest), as Kubernetes ranks them; pods
//! that are terminating or finished do not count and finished ones are removed, so a deleted
//! or failed pod is replaced at once. Writes `status` (replicas, ready, available after
//! `minReadySeconds`). A ReplicaSet that is gone has its pods deleted, as are pods whose
//! controlling ReplicaSet reference names a uid that no longer exists (created by a sync that
//! raced with the owner's deletion): the orphan collection, also bounded per sync.

use std::cmp::Reverse;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use serde_json::Value;

use super::controllers::{ControllerError, Ctx, Requeue};
use super::view::{controller_of, PodView};
use crate::api::pods::delete_pod;
use crate::events::Recorder;
use crate::model::deployment::{ReplicaSet, ReplicaSetStatus};
use crate::model::meta::{ObjectMeta, OwnerReference};
use crate::model::pod::{PodPhase, PodStatus};
use crate::model::taint::add_default_tolerations;
use crate::model::{Kind, Pod};
use crate::store::{object_rv, StoreError};

/// Pod creations or deletions in flight at once, per ReplicaSet.
const BURST: usize = 128;
/// Most pods one sync creates or deletes (Kubernetes' `burstReplicas`); the rest are left to
/// the next sync, which is queued at once.
pub const BURST_REPLICAS: usize = 500;
/// The first slow-start batch; each successful batch doubles the next.
const SLOW_START_INITIAL_BATCH: usize = 1;

pub async fn sync(ctx: &Ctx, ns: &str, name: &str) -> Result<Requeue, ControllerError> {
    let store = &ctx.store;
    let Some(obj) = store.get(Kind::ReplicaSet, ns, name)? else {
        return collect_orphans(ctx, ns, name).await;
    };
    let rs: ReplicaSet = serde_json::from_value((*obj).clone())?;
    let uid = rs.metadata.uid.clone().unwrap_or_default();
    let (all, _) = store.list(Kind::Pod, Some(ns))?;
    let mut pods: Vec<PodView> = Vec::new();
    // Left by an earlier ReplicaSet of the same name (deleted and re-created).
    let mut stale: Vec<String> = Vec::new();
    for p in all.iter().filter_map(PodView::of) {
        if p.owner_uid == uid {
            pods.push(p);
        } else if !p.terminating
            && matches!(controller_of(&p.obj), Some(("ReplicaSet", owner, _)) if owner == name)
        {
            stale.push(p.name.clone());
        }
    }
    drop(all);
    let stale_left = stale.len() > BURST_REPLICAS;
    stale.truncate(BURST_REPLICAS);
    delete_pods(ctx, ns, &stale).await?;
    let rs_ref = Recorder::obj_ref("ReplicaSet", &rs.metadata);

    // Finished pods (a pod of a ReplicaSet should never finish) make way for new ones.
    for p in pods.iter().filter(|p| p.finished && !p.terminating) {
        match delete_pod(&**store, ns, &p.name, Some(0)).await {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut active: Vec<&PodView> = pods.iter().filter(|p| p.active()).collect();
    let want = rs.replicas().max(0) as usize;
    let mut created = 0usize;
    // More to do than one sync may: look again right after this one.
    let mut again = stale_left;
    if active.len() < want {
        let diff = want - active.len();
        if diff > BURST_REPLICAS {
            again = true;
        }

        let limit = diff.min(BURST_REPLICAS);
        let mut names: Vec<String> = Vec::new();
        let mut failure: Option<StoreError> = None;
        // A ReplicaSet whose last batches all succeeded goes on where it left off; the slow
        // start begins again only after a failure (or for a new scale-up).
        let mut batch = ctx
            .slow_start
            .lock()
            .unwrap()
            .get(&uid)
            .copied()
            .unwrap_or(SLOW_START_INITIAL_BATCH);
        let mut owner_gone = false;
        while created < limit {
            // Is the owner still there, and does it still want these pods?
            let Some(still_wanted) = wanted_now(ctx, ns, name, &uid)? else {
                // Deleted or replaced: stop, and look again at once (collecting what this
                // sync created meanwhile).
                owner_gone = true;
                break;
            };
            let n = still_wanted
                .saturating_sub(active.len() + created)
                .min(limit - created)
                .min(batch);
            if n == 0 {
                again = stale_left;
                break;
            }
            let results: Vec<Result<String, StoreError>> =
                futures::stream::iter((0..n).map(|_| create_pod(ctx, &rs)).collect::<Vec<_>>())
                    .buffer_unordered(BURST)
                    .collect()
                    .await;
            for r in results {
                match r {
                    Ok(n) => {
                        names.push(n);
                        created += 1;
                    }
                    Err(e) => failure = Some(e),
                }
            }
            if failure.is_some() {
                break;
            }
            batch = (batch * 2).min(BURST_REPLICAS);
        }
        {
            let mut slow = ctx.slow_start.lock().unwrap();
            if failure.is_some() || owner_gone || !again {
                slow.remove(&uid);
            } else {
                slow.insert(uid.clone(), batch);
            }
        }
        if !names.is_empty() {
            ctx.recorder.normal(
                rs_ref.clone(),
                "SuccessfulCreate",
                summary("Created", &names.iter().collect::<Vec<_>>()),
            );
        }
        if owner_gone {
            return Ok(Some(Duration::ZERO));
        }
        if let Some(e) = failure {
            ctx.recorder.warning(
                rs_ref.clone(),
                "FailedCreate",
                format!("Error creating pods: {e}"),
            );
            if !matches!(e, StoreError::AlreadyExists { .. }) {
                return Err(ControllerError::Store(StoreError::Backend(e.to_string())));
            }
            again = true;
        }
    } else if active.len() > want {
        let n = (active.len() - want).min(BURST_REPLICAS);
        again |= active.len() - want > n;
        // Least valuable first, as Kubernetes' ActivePods ordering.
        active.sort_by_key(|p| {
            (
                p.scheduled,
                match p.phase.as_str() {
                    "Pending" => 0,
                    "Unknown" => 1,
                    _ => 2,
                },
                p.ready(),
                Reverse(p.restarts),
                Reverse(p.created),
            )
        });
        let victims: Vec<String> = active.drain(..n).map(|p| p.name.clone()).collect();
        let results: Vec<Result<Value, StoreError>> = futures::stream::iter(
            victims
                .iter()
                .map(|v| delete_pod(&**store, ns, v, None))
                .collect::<Vec<_>>(),
        )
        .buffer_unordered(BURST)
        .collect()
        .await;
        ctx.recorder.normal(
            rs_ref.clone(),
            "SuccessfulDelete",
            summary("Deleted", &victims.iter().collect::<Vec<_>>()),
        );
        for r in results {
            match r {
                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    // Status, from what is left.
    let now = Utc::now();
    let min_ready = rs.spec.min_ready_seconds.unwrap_or(0) as i64;
    let status = ReplicaSetStatus {
        replicas: (active.len() + created) as i32,
        ready_replicas: active.iter().filter(|p| p.ready()).count() as i32,
        available_replicas: active
            .iter()
            .filter(|p| p.available(min_ready, now))
            .count() as i32,
        observed_generation: rs.metadata.generation.unwrap_or(1),
    };
    let requeue = active
        .iter()
        .filter_map(|p| p.available_at(min_ready, now))
        .min()
        .map(|t| (t - now).to_std().unwrap_or_default());
    let requeue = if again { Some(Duration::ZERO) } else { requeue };
    if rs.status.as_ref() != Some(&status) {
        let mut next = rs.clone();
        next.status = Some(status);
        store
            .update(Kind::ReplicaSet, serde_json::to_value(&next)?)
            .await?;
    }
    Ok(requeue)
}

fn summary(verb: &str, names: &[&String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(|s| s.as_str()).collect();
    if names.len() == 1 {
        format!("{verb} pod: {}", shown[0])
    } else if names.len() <= 5 {
        format!("{verb} {} pods: {}", names.len(), shown.join(", "))
    } else {
        format!(
            "{verb} {} pods: {}, and {} more",
            names.len(),
            shown.join(", "),
            names.len() - 5
        )
    }
}

/// Create one pod from the template, named `<replicaset>-<5 random characters>`.
async fn create_pod(ctx: &Ctx, rs: &ReplicaSet) -> Result<String, StoreError> {
    for _ in 0..3 {
        let suffix = random_suffix();
        let t = &rs.spec.template;
        let pod = Pod {
            api_version: "v1".into(),
            kind: "Pod".into(),
            metadata: ObjectMeta {
                name: format!("{}-{suffix}", rs.metadata.name),
                namespace: Some(rs.metadata.ns().to_string()),
                uid: Some(uuid::Uuid::new_v4().to_string()),
                creation_timestamp: Some(Utc::now()),
                labels: t.metadata.labels.clone(),
                annotations: t.metadata.annotations.clone(),
                owner_references: vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "ReplicaSet".into(),
                    name: rs.metadata.name.clone(),
                    uid: rs.metadata.uid.clone().unwrap_or_default(),
                    controller: Some(true),
                }],
                ..Default::default()
            },
            spec: {
                let mut spec = t.spec.clone();
                add_default_tolerations(&mut spec.tolerations, ctx.default_toleration_seconds);
                spec
            },
            status: Some(PodStatus {
                phase: PodPhase::Pending,
                ..Default::default()
            }),
        };
        let v = serde_json::to_value(&pod).map_err(|e| StoreError::Backend(e.to_string()))?;
        match ctx.store.create(Kind::Pod, v).await {
            Ok(_) => return Ok(pod.metadata.name),
            Err(StoreError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::AlreadyExists {
        kind: "Pod",
        name: format!("{}-*", rs.metadata.name),
    })
}

/// Five characters from Kubernetes' alphabet for generated names (no vowels, no look-alikes).
fn random_suffix() -> String {
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = u128::from_le_bytes(*uuid::Uuid::new_v4().as_bytes());
    (0..5)
        .map(|_| {
            let c = ALPHA[(n % ALPHA.len() as u128) as usize] as char;
            n /= ALPHA.len() as u128;
            c
        })
        .collect()
}

/// The ReplicaSet `name`'s current desired replicas, read from the store; `None` when it no
/// longer exists as the object `uid` (deleted, being deleted, or replaced by a namesake).
fn wanted_now(ctx: &Ctx, ns: &str, name: &str, uid: &str) -> Result<Option<usize>, StoreError> {
    let Some(cur) = ctx.store.get(Kind::ReplicaSet, ns, name)? else {
        return Ok(None);
    };
    let md = &cur["metadata"];
    if md["uid"].as_str().unwrap_or_default() != uid || !md["deletionTimestamp"].is_null() {
        return Ok(None);
    }
    let replicas = cur["spec"]["replicas"].as_i64().unwrap_or(1).max(0);
    Ok(Some(replicas as usize))
}

/// Delete pods (gracefully), [`BURST`] at a time; pods already gone or changed are skipped.
async fn delete_pods(ctx: &Ctx, ns: &str, names: &[String]) -> Result<(), ControllerError> {
    let results: Vec<Result<Value, StoreError>> = futures::stream::iter(
        names
            .iter()
            .map(|p| delete_pod(&*ctx.store, ns, p, None))
            .collect::<Vec<_>>(),
    )
    .buffer_unordered(BURST)
    .collect()
    .await;
    for r in results {
        match r {
            Ok(_) | Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The ReplicaSet `name` is gone: delete the pods it controlled, [`BURST_REPLICAS`] per sync
/// (the sync is queued again while more are left).
async fn collect_orphans(ctx: &Ctx, ns: &str, name: &str) -> Result<Requeue, ControllerError> {
    let (all, _) = ctx.store.list(Kind::Pod, Some(ns))?;
    let mut orphans: Vec<String> = all
        .iter()
        .filter(|p| {
            matches!(controller_of(p), Some(("ReplicaSet", owner, _)) if owner == name)
                && p["metadata"]["deletionTimestamp"].is_null()
        })
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    drop(all);
    let more = orphans.len() > BURST_REPLICAS;
    orphans.truncate(BURST_REPLICAS);
    delete_pods(ctx, ns, &orphans).await?;
    Ok(more.then_some(Duration::ZERO))
}

/// Delete a ReplicaSet (its pods follow through [`collect_orphans`]).
pub async fn delete_replica_set(ctx: &Ctx, rs: &Value) -> Result<(), ControllerError> {
    let ns = rs["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = rs["metadata"]["name"].as_str().unwrap_or_default();
    match ctx
        .store
        .delete(Kind::ReplicaSet, ns, name, object_rv(rs))
        .await
    {
        Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
