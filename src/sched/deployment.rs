//! The Deployment reconciler: one ReplicaSet per template revision, sized by the strategy.
//!
//! - **RollingUpdate**: Kubernetes' algorithm — the new ReplicaSet grows while the total stays
//!   within `replicas + maxSurge`; old ReplicaSets shrink (their unhealthy pods first) while
//!   the available pods stay at or above `replicas - maxUnavailable`. Availability is read
//!   from the pods themselves (Ready for `minReadySeconds`), capped by each ReplicaSet's size.
//! - **Recreate**: old ReplicaSets go to 0, and once their pods are gone the new one scales up.
//! - **Canary** (Kapsel): `canary.replicas` pods of the new template run beside the old ones
//!   until the revision is promoted (`rollout promote`, or `autoPromote` once every canary is
//!   available); then it proceeds as a rolling update. A canary that crash-loops or misses the
//!   progress deadline is aborted when `autoRollback` is set.
//!
//! Progress is tracked as Kubernetes does, in the `Progressing` condition: any gain in updated,
//! ready or available replicas (or loss of old ones) refreshes it, except readiness that a pod
//! of the new revision regains after a restart (a crash loop is no progress); `progressDeadlineSeconds`
//! without progress marks it `ProgressDeadlineExceeded`, and with `spec.autoRollback` the
//! template goes back to the previous revision. `rollout undo` works by writing an old
//! template back: its ReplicaSet is found by the template hash and becomes the newest
//! revision. Old ReplicaSets beyond `revisionHistoryLimit` are deleted. Every decision is an
//! event on the Deployment.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::controllers::{ControllerError, Ctx, Requeue};
use super::replicaset::delete_replica_set;
use super::view::{controller_of, PodView};
use crate::events::Recorder;
use crate::model::deployment::{
    template_hash, CanaryStatus, Deployment, DeploymentCondition, DeploymentStatus, IntOrPercent,
    LabelSelector, ReplicaSet, ReplicaSetSpec, StrategyType, CHANGE_CAUSE_ANNOTATION,
    COMPLETE_ANNOTATION, PROMOTED_ANNOTATION, REVISION_ANNOTATION, ROLLBACK_MESSAGE_ANNOTATION,
    ROLLED_BACK_GENERATION_ANNOTATION, TEMPLATE_HASH_LABEL,
};
use crate::model::meta::{ObjectMeta, OwnerReference};
use crate::model::{Kind, ObjectReference};
use crate::store::StoreError;

/// One ReplicaSet of the Deployment and what its pods say.
struct Rs {
    rs: ReplicaSet,
    /// `spec.replicas` as this reconcile leaves it.
    size: i32,
    active: i32,
    ready: i32,
    available: i32,
    /// Of `ready` and `available`: pods that have restarted. A crash-looping pod is ready for
    /// a moment after each restart; that is not progress of a rollout.
    ready_restarted: i32,
    available_restarted: i32,
    /// Pods still present, terminating ones included.
    present: usize,
    /// A pod is crash-looping or has restarted more than once.
    crash_looping: bool,
    /// Every active pod is ready, with no restarts: since when (the latest pod's readiness).
    healthy_since: Option<DateTime<Utc>>,
    hash: String,
}

impl Rs {
    /// Available pods, never more than the ReplicaSet is meant to keep.
    fn avail(&self) -> i32 {
        self.available.min(self.size)
    }
}

pub async fn sync(ctx: &Ctx, ns: &str, name: &str) -> Result<Requeue, ControllerError> {
    let store = &ctx.store;
    let (all_rs, _) = store.list(Kind::ReplicaSet, Some(ns))?;
    let Some(obj) = store.get(Kind::Deployment, ns, name)? else {
        return collect_orphans(ctx, &all_rs, name, None).await;
    };
    let d: Deployment = serde_json::from_value((*obj).clone())?;
    let uid = d.metadata.uid.clone().unwrap_or_default();
    collect_orphans(ctx, &all_rs, name, Some(&uid)).await?;
    let dref = Recorder::obj_ref("Deployment", &d.metadata);
    let now = Utc::now();
    let min_ready = d.spec.min_ready();

    // The ReplicaSets it owns, and their pods.
    let (all_pods, _) = store.list(Kind::Pod, Some(ns))?;
    let mut pods_by_owner: HashMap<String, Vec<PodView>> = HashMap::new();
    for p in all_pods.iter().filter_map(PodView::of) {
        pods_by_owner
            .entry(p.owner_uid.clone())
            .or_default()
            .push(p);
    }
    let mut next_avail: Option<DateTime<Utc>> = None;
    let mut sets: Vec<Rs> = Vec::new();
    for o in all_rs.iter() {
        if !matches!(controller_of(o), Some(("Deployment", _, u)) if u == uid) {
            continue;
        }
        let rs: ReplicaSet = serde_json::from_value((**o).clone())?;
        let pods = pods_by_owner
            .remove(rs.metadata.uid.as_deref().unwrap_or_default())
            .unwrap_or_default();
        for p in &pods {
            if let Some(t) = p.available_at(min_ready, now) {
                next_avail = Some(next_avail.map_or(t, |n: DateTime<Utc>| n.min(t)));
            }
        }
        sets.push(Rs {
            size: rs.replicas(),
            active: pods.iter().filter(|p| p.active()).count() as i32,
            ready: pods.iter().filter(|p| p.ready()).count() as i32,
            available: pods.iter().filter(|p| p.available(min_ready, now)).count() as i32,
            ready_restarted: pods.iter().filter(|p| p.ready() && p.restarts > 0).count() as i32,
            available_restarted: pods
                .iter()
                .filter(|p| p.available(min_ready, now) && p.restarts > 0)
                .count() as i32,
            present: pods.len(),
            crash_looping: pods
                .iter()
                .any(|p| p.active() && (p.crash_looping || p.restarts >= 2)),
            healthy_since: {
                let active: Vec<&PodView> = pods.iter().filter(|p| p.active()).collect();
                if !active.is_empty() && active.iter().all(|p| p.ready() && p.restarts == 0) {
                    active.iter().filter_map(|p| p.ready_since).max()
                } else {
                    None
                }
            },
            hash: template_hash(&rs.spec.template),
            rs,
        });
    }
    sets.sort_by_key(|s| (s.rs.revision(), s.rs.metadata.creation_timestamp));

    let hash = template_hash(&d.spec.template);
    let max_rev = sets.iter().map(|s| s.rs.revision()).max().unwrap_or(0);
    let paused = d.spec.paused.unwrap_or(false);
    let mut new_idx = sets.iter().position(|s| s.hash == hash);
    let mut created_new = false;
    if !paused {
        match new_idx {
            None => {
                let rs = create_new_rs(ctx, &d, &hash, max_rev + 1).await?;
                sets.push(Rs {
                    size: 0,
                    active: 0,
                    ready: 0,
                    available: 0,
                    ready_restarted: 0,
                    available_restarted: 0,
                    present: 0,
                    crash_looping: false,
                    healthy_since: None,
                    hash: hash.clone(),
                    rs,
                });
                new_idx = Some(sets.len() - 1);
                created_new = true;
            }
            Some(i) if sets[i].rs.revision() < max_rev => {
                // An old template is back (undo, rollback, an aborted canary): it becomes the
                // newest revision. Going back to a revision that once completed is never
                // canaried: it is marked promoted first. One that never completed (an aborted
                // canary applied again) goes through the canary again.
                if d.spec.strategy_type() == StrategyType::Canary
                    && is_complete(&sets[i].rs)
                    && d.metadata.annotations.get(PROMOTED_ANNOTATION) != Some(&hash)
                {
                    let mut nd = d.clone();
                    nd.metadata
                        .annotations
                        .insert(PROMOTED_ANNOTATION.into(), hash.clone());
                    store
                        .update(Kind::Deployment, serde_json::to_value(&nd)?)
                        .await?;
                    return Ok(Some(Duration::ZERO));
                }
                let mut rs = sets[i].rs.clone();
                rs.metadata
                    .annotations
                    .insert(REVISION_ANNOTATION.into(), (max_rev + 1).to_string());
                let stored = store
                    .update(Kind::ReplicaSet, serde_json::to_value(&rs)?)
                    .await?;
                sets[i].rs = serde_json::from_value(stored)?;
                created_new = true;
            }
            _ => {}
        }
    }
    let Some(ni) = new_idx else {
        // Paused before the first revision existed: nothing to size.
        return write_status(ctx, &d, None, &sets, now, false, None)
            .await
            .map(|_| None);
    };
    let mut new = sets.remove(ni);
    let mut olds = sets;
    let new_rev = new.rs.revision();
    let replicas = d.spec.replicas();

    // Canary: has this revision been promoted?
    let strategy = d.spec.strategy_type();
    let mut canary_status = None;
    let mut canary_failed = false;
    let olds_live = olds.iter().any(|o| o.size > 0 || o.present > 0);
    let mut promoted = d.metadata.annotations.get(PROMOTED_ANNOTATION) == Some(&hash);
    if strategy == StrategyType::Canary && !promoted && !olds_live && !paused {
        promoted = true; // a first rollout has nothing to compare against
    }

    let mut scales: Vec<(usize, i32)> = Vec::new(); // (index in olds or usize::MAX for new, size)
    if paused && !olds.iter().any(|o| o.size > 0) && new.size != replicas {
        // A paused Deployment still scales (its rollout does not move).
        scales.push((usize::MAX, replicas));
    }
    if !paused {
        match strategy {
            StrategyType::Recreate => {
                let mut any = false;
                for (i, o) in olds.iter().enumerate() {
                    if o.size > 0 {
                        scales.push((i, 0));
                        any = true;
                    }
                }
                if !any && olds.iter().all(|o| o.present == 0) && new.size != replicas {
                    scales.push((usize::MAX, replicas));
                }
            }
            StrategyType::RollingUpdate => {
                let ru = d
                    .spec
                    .strategy
                    .as_ref()
                    .and_then(|s| s.rolling_update.clone())
                    .unwrap_or_default();
                rolling(
                    replicas,
                    ru.max_surge.as_ref(),
                    ru.max_unavailable.as_ref(),
                    &new,
                    &olds,
                    &mut scales,
                );
            }
            StrategyType::Canary => {
                let c = d
                    .spec
                    .strategy
                    .as_ref()
                    .and_then(|s| s.canary.clone())
                    .unwrap_or_default();
                let want = if replicas == 0 {
                    0
                } else {
                    c.replicas
                        .as_ref()
                        .unwrap_or(&IntOrPercent::Int(1))
                        .resolve(replicas, true)
                        .unwrap_or(1)
                        .clamp(1, replicas)
                };
                if !promoted {
                    if new.size != want {
                        scales.push((usize::MAX, want));
                    }
                    // Canaries of templates replaced before promotion go: only the stable
                    // revision (the newest that completed, or was promoted: its completion
                    // may not be recorded yet) runs beside this canary.
                    let last_promoted = d.metadata.annotations.get(PROMOTED_ANNOTATION);
                    if let Some(stable) = olds
                        .iter()
                        .filter(|o| is_complete(&o.rs) || last_promoted == Some(&o.hash))
                        .map(|o| o.rs.revision())
                        .max()
                    {
                        for (i, o) in olds.iter().enumerate() {
                            if o.rs.revision() > stable && o.size > 0 {
                                scales.push((i, 0));
                            }
                        }
                    }
                    let ready = new.available.min(want);
                    let healthy_for =
                        chrono::Duration::seconds(c.healthy_seconds.unwrap_or(10) as i64);
                    if c.auto_promote.unwrap_or(false)
                        && ready >= want
                        && new.active == want
                        && !new.crash_looping
                    {
                        if let Some(since) = new.healthy_since {
                            if now - since >= healthy_for {
                                promote(
                                    ctx,
                                    &d,
                                    new_rev,
                                    &hash,
                                    &dref,
                                    &format!(
                                        "every canary has been ready for {}s without a restart",
                                        healthy_for.num_seconds()
                                    ),
                                )
                                .await?;
                                return Ok(Some(Duration::ZERO));
                            }
                            let t = since + healthy_for;
                            next_avail = Some(next_avail.map_or(t, |n| n.min(t)));
                        }
                    }
                    canary_failed = new.crash_looping;
                    canary_status = Some(CanaryStatus {
                        revision: new_rev,
                        pod_template_hash: hash.clone(),
                        desired: want,
                        ready,
                        promoted: false,
                    });
                } else {
                    rolling(
                        replicas,
                        c.max_surge.as_ref(),
                        c.max_unavailable.as_ref(),
                        &new,
                        &olds,
                        &mut scales,
                    );
                }
            }
        }
    }

    // The new ReplicaSet counts availability with the Deployment's current minReadySeconds.
    if new.rs.spec.min_ready_seconds != d.spec.min_ready_seconds {
        let mut rs = new.rs.clone();
        rs.spec.min_ready_seconds = d.spec.min_ready_seconds;
        let stored = store
            .update(Kind::ReplicaSet, serde_json::to_value(&rs)?)
            .await?;
        new.rs = serde_json::from_value(stored)?;
    }

    // Apply the sizes.
    for (i, size) in scales {
        let target = if i == usize::MAX {
            &mut new
        } else {
            &mut olds[i]
        };
        scale(ctx, &dref, target, size).await?;
    }

    // Old revisions beyond the history limit.
    let limit = d.spec.history_limit();
    let mut idle: Vec<&Rs> = olds
        .iter()
        .filter(|o| o.size == 0 && o.present == 0)
        .collect();
    if idle.len() > limit {
        idle.sort_by_key(|o| o.rs.revision());
        for o in &idle[..idle.len() - limit] {
            delete_replica_set(ctx, &serde_json::to_value(&o.rs)?).await?;
        }
    }

    let requeue = write_status(
        ctx,
        &d,
        Some(&new),
        &olds,
        now,
        created_new,
        canary_status.map(|c| (c, canary_failed)),
    )
    .await?;
    let avail_in = next_avail.map(|t| (t - now).to_std().unwrap_or_default());
    Ok(match (requeue, avail_in) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// Kubernetes' rolling-update step: the sizes to give the new and old ReplicaSets.
fn rolling(
    replicas: i32,
    max_surge: Option<&IntOrPercent>,
    max_unavailable: Option<&IntOrPercent>,
    new: &Rs,
    olds: &[Rs],
    scales: &mut Vec<(usize, i32)>,
) {
    let (surge, unav) = surge_unavailable(replicas, max_surge, max_unavailable);
    let old_total: i32 = olds.iter().map(|o| o.size).sum();
    let mut new_size = new.size;
    if new.size < replicas {
        let room = replicas + surge - (new.size + old_total);
        new_size += room.max(0).min(replicas - new.size);
    } else if new.size > replicas {
        new_size = replicas;
    }
    if new_size != new.size {
        scales.push((usize::MAX, new_size));
    }
    if old_total == 0 {
        return;
    }
    let min_available = replicas - unav;
    let new_available = new.available.min(new_size);
    let new_unavailable = new_size - new_available;
    let max_scaled_down = new_size + old_total - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return;
    }
    let mut sizes: Vec<i32> = olds.iter().map(|o| o.size).collect();
    // Old pods that are not available go first (oldest revision first).
    let mut cleaned = 0;
    for (i, o) in olds.iter().enumerate() {
        if cleaned >= max_scaled_down {
            break;
        }
        let n = (o.size - o.avail()).max(0).min(max_scaled_down - cleaned);
        sizes[i] -= n;
        cleaned += n;
    }
    // Then available ones, as long as enough stay available.
    let available: i32 = new_available
        + olds
            .iter()
            .zip(&sizes)
            .map(|(o, s)| o.available.min(*s))
            .sum::<i32>();
    let mut down = (available - min_available).max(0);
    for s in sizes.iter_mut() {
        if down == 0 {
            break;
        }
        let n = (*s).min(down);
        *s -= n;
        down -= n;
    }
    for (i, o) in olds.iter().enumerate() {
        if sizes[i] != o.size {
            scales.push((i, sizes[i]));
        }
    }
}

/// maxSurge rounds up, maxUnavailable down; both 0 would deadlock, so unavailable becomes 1.
fn surge_unavailable(
    replicas: i32,
    max_surge: Option<&IntOrPercent>,
    max_unavailable: Option<&IntOrPercent>,
) -> (i32, i32) {
    let pct25 = IntOrPercent::Str("25%".into());
    let surge = max_surge
        .unwrap_or(&pct25)
        .resolve(replicas, true)
        .unwrap_or(1);
    let mut unav = max_unavailable
        .unwrap_or(&pct25)
        .resolve(replicas, false)
        .unwrap_or(0)
        .min(replicas);
    if surge == 0 && unav == 0 {
        unav = 1;
    }
    (surge, unav)
}

async fn scale(
    ctx: &Ctx,
    dref: &ObjectReference,
    t: &mut Rs,
    size: i32,
) -> Result<(), ControllerError> {
    let mut rs = t.rs.clone();
    let from = rs.replicas();
    rs.spec.replicas = Some(size);
    rs.metadata.generation = Some(rs.metadata.generation.unwrap_or(1) + 1);
    let stored = ctx
        .store
        .update(Kind::ReplicaSet, serde_json::to_value(&rs)?)
        .await?;
    t.rs = serde_json::from_value(stored)?;
    t.size = size;
    let dir = if size > from { "up" } else { "down" };
    ctx.recorder.normal(
        dref.clone(),
        "ScalingReplicaSet",
        format!(
            "Scaled {dir} replica set {} from {from} to {size}",
            rs.metadata.name
        ),
    );
    Ok(())
}

async fn create_new_rs(
    ctx: &Ctx,
    d: &Deployment,
    hash: &str,
    revision: i64,
) -> Result<ReplicaSet, ControllerError> {
    let mut template = d.spec.template.clone();
    template
        .metadata
        .labels
        .insert(TEMPLATE_HASH_LABEL.into(), hash.into());
    let mut selector: LabelSelector = d.spec.selector.clone();
    selector
        .match_labels
        .insert(TEMPLATE_HASH_LABEL.into(), hash.into());
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(REVISION_ANNOTATION.to_string(), revision.to_string());
    if let Some(c) = d.metadata.annotations.get(CHANGE_CAUSE_ANNOTATION) {
        annotations.insert(CHANGE_CAUSE_ANNOTATION.to_string(), c.clone());
    }
    let name = format!("{}-{hash}", d.metadata.name);
    let rs = ReplicaSet {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        metadata: ObjectMeta {
            name: name.clone(),
            namespace: Some(d.metadata.ns().to_string()),
            uid: Some(uuid::Uuid::new_v4().to_string()),
            creation_timestamp: Some(Utc::now()),
            generation: Some(1),
            labels: template.metadata.labels.clone(),
            annotations,
            owner_references: vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: d.metadata.name.clone(),
                uid: d.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
            }],
            ..Default::default()
        },
        spec: ReplicaSetSpec {
            replicas: Some(0),
            selector,
            template,
            min_ready_seconds: d.spec.min_ready_seconds,
        },
        status: None,
    };
    match ctx
        .store
        .create(Kind::ReplicaSet, serde_json::to_value(&rs)?)
        .await
    {
        Ok(v) => Ok(serde_json::from_value(v)?),
        Err(StoreError::AlreadyExists { .. }) => {
            Err(ControllerError::Store(StoreError::Backend(format!(
                "replicaset {name:?} exists but is not owned by deployment {:?}",
                d.metadata.name
            ))))
        }
        Err(e) => Err(e.into()),
    }
}

/// Record that the canary of `revision` is promoted (the rollout continues).
async fn promote(
    ctx: &Ctx,
    d: &Deployment,
    revision: i64,
    hash: &str,
    dref: &ObjectReference,
    why: &str,
) -> Result<(), ControllerError> {
    let mut nd = d.clone();
    nd.metadata
        .annotations
        .insert(PROMOTED_ANNOTATION.into(), hash.to_string());
    ctx.store
        .update(Kind::Deployment, serde_json::to_value(&nd)?)
        .await?;
    ctx.recorder.normal(
        dref.clone(),
        "CanaryPromoted",
        format!("Promoted the canary of revision {revision}: {why}"),
    );
    Ok(())
}

/// Did this revision's rollout complete once?
fn is_complete(rs: &ReplicaSet) -> bool {
    rs.metadata.annotations.contains_key(COMPLETE_ANNOTATION)
}

/// Put the template of the last revision that worked back (automatic rollback).
async fn rollback(
    ctx: &Ctx,
    d: &Deployment,
    new_rev: i64,
    olds: &[Rs],
    dref: &ObjectReference,
    reason: &str,
    why: &str,
) -> Result<(), ControllerError> {
    // The newest earlier revision that once completed; else simply the one before.
    let earlier = || olds.iter().filter(|o| o.rs.revision() < new_rev);
    let Some(prev) = earlier()
        .filter(|o| is_complete(&o.rs))
        .max_by_key(|o| o.rs.revision())
        .or_else(|| earlier().max_by_key(|o| o.rs.revision()))
    else {
        ctx.recorder.warning(
            dref.clone(),
            "RollbackSkipped",
            format!("Revision {new_rev} failed ({why}) and there is no earlier revision to roll back to"),
        );
        return Ok(());
    };
    let mut t = prev.rs.spec.template.clone();
    t.metadata.labels.remove(TEMPLATE_HASH_LABEL);
    let mut nd = d.clone();
    nd.spec.template = t;
    let failed_generation = d.metadata.generation.unwrap_or(1);
    nd.metadata.generation = Some(failed_generation + 1);
    let message = format!(
        "Rolled back deployment {} from revision {new_rev} to revision {}: {why}",
        d.metadata.name,
        prev.rs.revision()
    );
    // What `rollout status` of the failed generation reports.
    nd.metadata.annotations.insert(
        ROLLED_BACK_GENERATION_ANNOTATION.into(),
        failed_generation.to_string(),
    );
    nd.metadata
        .annotations
        .insert(ROLLBACK_MESSAGE_ANNOTATION.into(), message.clone());
    ctx.store
        .update(Kind::Deployment, serde_json::to_value(&nd)?)
        .await?;
    ctx.recorder.warning(dref.clone(), reason, message);
    Ok(())
}

fn set_condition(
    conds: &mut Vec<DeploymentCondition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    now: DateTime<Utc>,
    touch: bool,
) {
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let same = c.status == status
                && c.reason.as_deref() == Some(reason)
                && c.message.as_deref() == Some(&message);
            if c.status != status {
                c.last_transition_time = Some(now);
            }
            if !same || touch {
                c.last_update_time = Some(now);
            }
            c.status = status.into();
            c.reason = Some(reason.into());
            c.message = Some(message);
        }
        None => conds.push(DeploymentCondition {
            type_: type_.into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(message),
            last_update_time: Some(now),
            last_transition_time: Some(now),
        }),
    }
}

/// Compute and write the status (and the revision annotation); detect progress, deadlines,
/// failed canaries, and roll back when asked to. Returns when to look again.
async fn write_status(
    ctx: &Ctx,
    d: &Deployment,
    new: Option<&Rs>,
    olds: &[Rs],
    now: DateTime<Utc>,
    created_new: bool,
    canary: Option<(CanaryStatus, bool)>,
) -> Result<Requeue, ControllerError> {
    let dref = Recorder::obj_ref("Deployment", &d.metadata);
    let replicas = d.spec.replicas();
    let all = || new.into_iter().chain(olds.iter());
    let st_replicas: i32 = all().map(|r| r.active).sum();
    let updated = new.map(|n| n.active).unwrap_or(0);
    let ready: i32 = all().map(|r| r.ready).sum();
    let available: i32 = all().map(|r| r.available).sum();
    let prev = d.status.clone().unwrap_or_default();
    let mut conds = prev.conditions.clone();

    let strategy = d.spec.strategy.as_ref();
    let max_unav = match d.spec.strategy_type() {
        StrategyType::Recreate => 0,
        StrategyType::RollingUpdate => {
            let ru = strategy.and_then(|s| s.rolling_update.as_ref());
            surge_unavailable(
                replicas,
                ru.and_then(|r| r.max_surge.as_ref()),
                ru.and_then(|r| r.max_unavailable.as_ref()),
            )
            .1
        }
        StrategyType::Canary => {
            let c = strategy.and_then(|s| s.canary.as_ref());
            surge_unavailable(
                replicas,
                c.and_then(|r| r.max_surge.as_ref()),
                c.and_then(|r| r.max_unavailable.as_ref()),
            )
            .1
        }
    };
    let avail_ok = available >= replicas - max_unav;
    set_condition(
        &mut conds,
        "Available",
        if avail_ok { "True" } else { "False" },
        if avail_ok {
            "MinimumReplicasAvailable"
        } else {
            "MinimumReplicasUnavailable"
        },
        if avail_ok {
            "Deployment has minimum availability.".into()
        } else {
            "Deployment does not have minimum availability.".into()
        },
        now,
        false,
    );

    let mut requeue = None;
    let mut failed: Option<(&str, String)> = None;
    let mut mark_complete = None;
    let new_rev = new.map(|n| n.rs.revision()).unwrap_or(0);
    if let Some(n) = new {
        let rs_name = &n.rs.metadata.name;
        let quoted = format!("ReplicaSet {rs_name:?}");
        let cur = conds.iter().find(|c| c.type_ == "Progressing").cloned();
        let refers_to_new = cur
            .as_ref()
            .and_then(|c| c.message.as_deref())
            .map(|m| m.starts_with(&quoted))
            .unwrap_or(false);
        let complete = updated == replicas
            && st_replicas == replicas
            && available >= replicas
            && n.size == replicas
            && olds.iter().all(|o| o.present == 0 && o.size == 0);
        // A rollout (re)starting from a settled state (complete, paused, a canary waiting)
        // starts its deadline now, not from when that state was reached.
        let settled = !matches!(
            cur.as_ref().and_then(|c| c.reason.as_deref()),
            Some("ReplicaSetUpdated" | "NewReplicaSetCreated" | "ProgressDeadlineExceeded")
        );
        let progressed = created_new
            || !refers_to_new
            || settled
            || updated > prev.updated_replicas
            // (Pods of the new revision ready again after a restart do not count: a release
            // that crash-loops would otherwise never reach its deadline.)
            || ready - n.ready_restarted > prev.ready_replicas
            || available - n.available_restarted > prev.available_replicas
            || (prev.replicas - prev.updated_replicas) > (st_replicas - updated);
        let canary_waiting = canary
            .as_ref()
            .map(|(c, _)| c.ready >= c.desired)
            .unwrap_or(false);
        let deadline = chrono::Duration::seconds(d.spec.progress_deadline());
        if d.spec.paused.unwrap_or(false) {
            set_condition(
                &mut conds,
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                format!("{quoted} is paused."),
                now,
                false,
            );
        } else if complete {
            if !is_complete(&n.rs) {
                mark_complete = Some(n.rs.clone());
            }
            set_condition(
                &mut conds,
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                format!("{quoted} has successfully progressed."),
                now,
                false,
            );
        } else if canary_waiting {
            set_condition(
                &mut conds,
                "Progressing",
                "True",
                "CanaryWaitingForPromotion",
                format!("{quoted} canary is available; waiting for `kapsel rollout promote`."),
                now,
                false,
            );
        } else if progressed {
            set_condition(
                &mut conds,
                "Progressing",
                "True",
                if created_new {
                    "NewReplicaSetCreated"
                } else {
                    "ReplicaSetUpdated"
                },
                format!("{quoted} is progressing."),
                now,
                true,
            );
            requeue = deadline.to_std().ok();
        } else if cur.as_ref().and_then(|c| c.reason.as_deref()) == Some("ProgressDeadlineExceeded")
        {
            // Stays failed until it progresses or a new rollout starts. A rollback that did not
            // get written (a conflict, a restart) is tried again.
            failed = Some((
                "DeploymentRollback",
                format!("revision {new_rev} missed its progress deadline"),
            ));
        } else {
            let since = cur.and_then(|c| c.last_update_time).unwrap_or(now);
            if now - since >= deadline {
                set_condition(
                    &mut conds,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    format!("{quoted} has timed out progressing."),
                    now,
                    false,
                );
                ctx.recorder.warning(
                    dref.clone(),
                    "ProgressDeadlineExceeded",
                    format!(
                        "Deployment {} has timed out progressing: revision {new_rev} ({rs_name}) made no progress for {}s",
                        d.metadata.name,
                        d.spec.progress_deadline()
                    ),
                );
                failed = Some((
                    "DeploymentRollback",
                    format!(
                        "revision {new_rev} missed its progress deadline of {}s",
                        d.spec.progress_deadline()
                    ),
                ));
            } else {
                requeue = (since + deadline - now).to_std().ok();
            }
        }
        if let Some((c, true)) = &canary {
            if failed.is_none() {
                failed = Some((
                    "CanaryAborted",
                    format!("a canary of revision {} is crash-looping", c.revision),
                ));
            }
        }
    }

    let status = DeploymentStatus {
        observed_generation: d.metadata.generation.unwrap_or(1),
        replicas: st_replicas,
        updated_replicas: updated,
        ready_replicas: ready,
        available_replicas: available,
        unavailable_replicas: (new.map(|n| n.size).unwrap_or(0)
            + olds.iter().map(|o| o.size).sum::<i32>()
            - available)
            .max(0),
        conditions: conds,
        canary: canary.map(|(c, _)| c),
    };
    let mut nd = d.clone();
    if new_rev > 0 {
        nd.metadata
            .annotations
            .insert(REVISION_ANNOTATION.into(), new_rev.to_string());
    }
    nd.status = Some(status);
    if nd != *d {
        let stored = ctx
            .store
            .update(Kind::Deployment, serde_json::to_value(&nd)?)
            .await?;
        nd = serde_json::from_value(stored)?;
    }
    if let Some(mut rs) = mark_complete {
        // This revision works: the target of later automatic rollbacks and canary aborts.
        rs.metadata
            .annotations
            .insert(COMPLETE_ANNOTATION.into(), "true".into());
        ctx.store
            .update(Kind::ReplicaSet, serde_json::to_value(&rs)?)
            .await?;
    }
    if let Some((reason, why)) = failed {
        if d.spec.auto_rollback.unwrap_or(false) {
            rollback(ctx, &nd, new_rev, olds, &dref, reason, &why).await?;
            return Ok(Some(Duration::ZERO));
        }
    }
    Ok(requeue)
}

/// Delete the ReplicaSets controlled by a Deployment `name` that no longer exists (or by an
/// earlier Deployment of that name: `uid` is the current one's).
async fn collect_orphans(
    ctx: &Ctx,
    all_rs: &[std::sync::Arc<serde_json::Value>],
    name: &str,
    uid: Option<&str>,
) -> Result<Requeue, ControllerError> {
    for rs in all_rs {
        if let Some(("Deployment", owner, owner_uid)) = controller_of(rs) {
            if owner == name && uid.map(|u| u != owner_uid).unwrap_or(true) {
                delete_replica_set(ctx, rs).await?;
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ReplicaSet of `size` with `available` available pods (all active).
    fn rs(size: i32, available: i32) -> Rs {
        Rs {
            rs: ReplicaSet::default(),
            size,
            active: size,
            ready: available,
            available,
            ready_restarted: 0,
            available_restarted: 0,
            present: size as usize,
            crash_looping: false,
            healthy_since: None,
            hash: String::new(),
        }
    }

    fn step(replicas: i32, surge: i64, unav: i64, new: &Rs, olds: &[Rs]) -> (i32, Vec<i32>) {
        let mut scales = vec![];
        rolling(
            replicas,
            Some(&IntOrPercent::Int(surge)),
            Some(&IntOrPercent::Int(unav)),
            new,
            olds,
            &mut scales,
        );
        let mut new_size = new.size;
        let mut old_sizes: Vec<i32> = olds.iter().map(|o| o.size).collect();
        for (i, n) in scales {
            if i == usize::MAX {
                new_size = n;
            } else {
                old_sizes[i] = n;
            }
        }
        (new_size, old_sizes)
    }

    #[test]
    fn max_unavailable_0_surges_one_at_a_time() {
        // Start: 5 old, all available.
        assert_eq!(step(5, 1, 0, &rs(0, 0), &[rs(5, 5)]), (1, vec![5]));
        // The new pod is not available yet: nothing old goes.
        assert_eq!(step(5, 1, 0, &rs(1, 0), &[rs(5, 5)]), (1, vec![5]));
        // It is: one old pod goes, and no more than that.
        assert_eq!(step(5, 1, 0, &rs(1, 1), &[rs(5, 5)]), (1, vec![4]));
        assert_eq!(step(5, 1, 0, &rs(1, 1), &[rs(4, 4)]), (2, vec![4]));
        // The end.
        assert_eq!(step(5, 1, 0, &rs(5, 5), &[rs(1, 1)]), (5, vec![0]));
    }

    #[test]
    fn a_never_available_version_stops_at_max_surge() {
        for _ in 0..3 {
            assert_eq!(step(5, 1, 0, &rs(1, 0), &[rs(5, 5)]), (1, vec![5]));
        }
        // With maxUnavailable 1 it may take one old pod, never more.
        assert_eq!(step(5, 1, 1, &rs(2, 0), &[rs(4, 4)]), (2, vec![4]));
    }

    #[test]
    fn unavailable_old_pods_go_first_and_the_floor_holds() {
        // 3 of the 5 old pods are broken: as many go as the budget of unavailable pods
        // allows (replicas - maxUnavailable = 4 must be kept as pods), broken ones first,
        // and no available one.
        let (new, olds) = step(5, 0, 1, &rs(0, 0), &[rs(5, 2)]);
        assert_eq!(new, 0);
        assert_eq!(olds, vec![4]);
        let (new, olds) = step(5, 0, 3, &rs(0, 0), &[rs(5, 2)]);
        assert_eq!(new, 0);
        assert_eq!(olds, vec![2]);
        // Several old revisions: the oldest shrinks first.
        let (_, olds) = step(4, 1, 1, &rs(1, 1), &[rs(2, 2), rs(2, 2)]);
        assert_eq!(olds, vec![0, 2]);
    }

    #[test]
    fn scaling_without_a_rollout() {
        assert_eq!(step(1000, 250, 250, &rs(0, 0), &[]), (1000, vec![]));
        assert_eq!(step(2, 1, 0, &rs(6, 6), &[]), (2, vec![]));
    }

    #[test]
    fn both_zero_means_one_unavailable() {
        assert_eq!(
            surge_unavailable(4, Some(&IntOrPercent::Int(0)), Some(&IntOrPercent::Int(0))),
            (0, 1)
        );
        assert_eq!(surge_unavailable(4, None, None), (1, 1));
        assert_eq!(
            surge_unavailable(10, Some(&IntOrPercent::Str("25%".into())), None),
            (3, 2)
        );
    }
}
