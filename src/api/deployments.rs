//! `/apis/apps/v1/.../deployments` and `.../replicasets`: create (defaulting + validation),
//! get, list/watch, replace (generation bumped on spec changes, selector immutable), the
//! `status` and `scale` subresources, and delete (the controllers then remove what the object
//! owned).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::pods::default_pod;
use super::{decode, get_one, list_or_watch, AppState, DeleteOptions, ListQuery};
use crate::model::deployment::{
    validate_deployment, validate_replica_set, Deployment, DeploymentStrategy, IntOrPercent,
    LabelSelector, ReplicaSet, RollingUpdate, StrategyType,
};
use crate::model::meta::ObjectMeta;
use crate::model::validate::FieldError;
use crate::model::{Kind, Pod};
use crate::store::StoreError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/apis/apps/v1/deployments", get(list_all::<Deployment>))
        .route(
            "/apis/apps/v1/namespaces/{ns}/deployments",
            get(list::<Deployment>).post(create::<Deployment>),
        )
        .route(
            "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
            get(read::<Deployment>)
                .put(replace::<Deployment>)
                .delete(delete::<Deployment>),
        )
        .route(
            "/apis/apps/v1/namespaces/{ns}/deployments/{name}/status",
            get(read::<Deployment>).put(replace_status::<Deployment>),
        )
        .route(
            "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
            get(read_scale::<Deployment>).put(replace_scale::<Deployment>),
        )
        .route("/apis/apps/v1/replicasets", get(list_all::<ReplicaSet>))
        .route(
            "/apis/apps/v1/namespaces/{ns}/replicasets",
            get(list::<ReplicaSet>).post(create::<ReplicaSet>),
        )
        .route(
            "/apis/apps/v1/namespaces/{ns}/replicasets/{name}",
            get(read::<ReplicaSet>)
                .put(replace::<ReplicaSet>)
                .delete(delete::<ReplicaSet>),
        )
        .route(
            "/apis/apps/v1/namespaces/{ns}/replicasets/{name}/status",
            get(read::<ReplicaSet>).put(replace_status::<ReplicaSet>),
        )
        .route(
            "/apis/apps/v1/namespaces/{ns}/replicasets/{name}/scale",
            get(read_scale::<ReplicaSet>).put(replace_scale::<ReplicaSet>),
        )
}

/// What the handlers need of Deployments and ReplicaSets.
pub trait Workload: Serialize + DeserializeOwned + Clone + Send + 'static {
    const KIND: Kind;
    fn meta(&self) -> &ObjectMeta;
    fn meta_mut(&mut self) -> &mut ObjectMeta;
    fn spec_value(&self) -> Value;
    fn selector(&self) -> &LabelSelector;
    fn replicas_mut(&mut self) -> &mut Option<i32>;
    fn defaults(&mut self);
    fn validate(&self) -> Vec<FieldError>;
    /// Copy the status of `other` into `self`.
    fn take_status(&mut self, other: &Self);
    fn status_replicas(&self) -> i32;
}

fn default_template(spec: &mut crate::model::pod::PodSpec) {
    let mut p = Pod {
        spec: std::mem::take(spec),
        ..Default::default()
    };
    default_pod(&mut p);
    *spec = p.spec;
}

/// The accessors both kinds implement the same way (same field names).
macro_rules! workload_fields {
    () => {
        fn meta(&self) -> &ObjectMeta {
            &self.metadata
        }
        fn meta_mut(&mut self) -> &mut ObjectMeta {
            &mut self.metadata
        }
        fn spec_value(&self) -> Value {
            serde_json::to_value(&self.spec).unwrap_or_default()
        }
        fn selector(&self) -> &LabelSelector {
            &self.spec.selector
        }
        fn replicas_mut(&mut self) -> &mut Option<i32> {
            &mut self.spec.replicas
        }
        fn take_status(&mut self, other: &Self) {
            self.status = other.status.clone();
        }
        fn status_replicas(&self) -> i32 {
            self.status.as_ref().map(|s| s.replicas).unwrap_or(0)
        }
    };
}

impl Workload for Deployment {
    const KIND: Kind = Kind::Deployment;
    workload_fields!();
    fn defaults(&mut self) {
        self.api_version = "apps/v1".into();
        self.kind = "Deployment".into();
        let s = &mut self.spec;
        s.replicas.get_or_insert(1);
        s.revision_history_limit.get_or_insert(10);
        s.progress_deadline_seconds.get_or_insert(600);
        let st = s.strategy.get_or_insert_with(DeploymentStrategy::default);
        let t = *st.type_.get_or_insert(StrategyType::RollingUpdate);
        if t == StrategyType::RollingUpdate {
            let ru = st.rolling_update.get_or_insert_with(RollingUpdate::default);
            ru.max_surge.get_or_insert(IntOrPercent::Str("25%".into()));
            ru.max_unavailable
                .get_or_insert(IntOrPercent::Str("25%".into()));
        }
        if t == StrategyType::Canary {
            let c = st.canary.get_or_insert_with(Default::default);
            c.replicas.get_or_insert(IntOrPercent::Int(1));
            c.auto_promote.get_or_insert(false);
            c.healthy_seconds.get_or_insert(10);
            c.max_surge.get_or_insert(IntOrPercent::Str("25%".into()));
            c.max_unavailable
                .get_or_insert(IntOrPercent::Str("25%".into()));
        }
        default_template(&mut s.template.spec);
    }
    fn validate(&self) -> Vec<FieldError> {
        validate_deployment(self)
    }
}

impl Workload for ReplicaSet {
    const KIND: Kind = Kind::ReplicaSet;
    workload_fields!();
    fn defaults(&mut self) {
        self.api_version = "apps/v1".into();
        self.kind = "ReplicaSet".into();
        self.spec.replicas.get_or_insert(1);
        default_template(&mut self.spec.template.spec);
    }
    fn validate(&self) -> Vec<FieldError> {
        validate_replica_set(self)
    }
}

fn invalid<W: Workload>(w: &W, errors: Vec<FieldError>) -> ApiError {
    ApiError::Invalid {
        kind: W::KIND.name().into(),
        name: w.meta().name.clone(),
        errors,
    }
}

fn internal(e: serde_json::Error) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn check_namespace(meta: &mut ObjectMeta, ns: &str) -> Result<(), ApiError> {
    match &meta.namespace {
        Some(n) if n != ns => Err(ApiError::BadRequest(format!(
            "the namespace of the provided object ({n}) does not match the namespace sent on the request ({ns})"
        ))),
        _ => {
            meta.namespace = Some(ns.to_string());
            Ok(())
        }
    }
}

async fn list_all<W: Workload>(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_or_watch(&s, W::KIND, None, q)
}

async fn list<W: Workload>(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_or_watch(&s, W::KIND, Some(&ns), q)
}

async fn read<W: Workload>(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    get_one(&s, W::KIND, &ns, &name).map(Json)
}

async fn create<W: Workload>(
    State(s): State<AppState>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut w: W = decode(&body)?;
    check_namespace(w.meta_mut(), &ns)?;
    if w.meta().resource_version.is_some() {
        return Err(ApiError::BadRequest(
            "metadata.resourceVersion: must not be set on create".into(),
        ));
    }
    w.defaults();
    let errs = w.validate();
    if !errs.is_empty() {
        return Err(invalid(&w, errs));
    }
    let m = w.meta_mut();
    m.uid = Some(uuid::Uuid::new_v4().to_string());
    m.creation_timestamp = Some(Utc::now());
    m.deletion_timestamp = None;
    m.generation = Some(1);
    let mut v = serde_json::to_value(&w).map_err(internal)?;
    v.as_object_mut().map(|o| o.remove("status"));
    Ok((StatusCode::CREATED, Json(s.store.create(W::KIND, v).await?)))
}

/// PUT: the spec and labels/annotations change (generation + 1 when the spec does); the
/// status is kept; the selector is immutable, as in `apps/v1`.
async fn replace<W: Workload>(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let mut w: W = decode(&body)?;
    check_namespace(w.meta_mut(), &ns)?;
    if w.meta().name != name {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            w.meta().name
        )));
    }
    let cur: W = serde_json::from_value(get_one(&s, W::KIND, &ns, &name)?).map_err(internal)?;
    w.defaults();
    let mut errs = w.validate();
    if w.selector() != cur.selector() {
        errs.push(FieldError {
            field: "spec.selector".into(),
            message: "Invalid value: field is immutable".into(),
        });
    }
    if !errs.is_empty() {
        return Err(invalid(&w, errs));
    }
    let changed = w.spec_value() != cur.spec_value();
    let rv = w.meta().resource_version.clone();
    let (labels, annotations) = (w.meta().labels.clone(), w.meta().annotations.clone());
    let mut next = w;
    *next.meta_mut() = ObjectMeta {
        labels,
        annotations,
        resource_version: rv.or(cur.meta().resource_version.clone()),
        generation: Some(cur.meta().generation.unwrap_or(1) + changed as i64),
        ..cur.meta().clone()
    };
    next.take_status(&cur);
    let v = serde_json::to_value(&next).map_err(internal)?;
    Ok(Json(s.store.update(W::KIND, v).await?))
}

async fn replace_status<W: Workload>(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let w: W = decode(&body)?;
    let cur: W = serde_json::from_value(get_one(&s, W::KIND, &ns, &name)?).map_err(internal)?;
    let mut next = cur.clone();
    next.take_status(&w);
    next.meta_mut().resource_version = w
        .meta()
        .resource_version
        .clone()
        .or(cur.meta().resource_version.clone());
    let v = serde_json::to_value(&next).map_err(internal)?;
    Ok(Json(s.store.update(W::KIND, v).await?))
}

fn scale_of<W: Workload>(w: &mut W) -> Value {
    let replicas = w.replicas_mut().unwrap_or(1);
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": w.meta().name,
            "namespace": w.meta().ns(),
            "uid": w.meta().uid,
            "resourceVersion": w.meta().resource_version,
        },
        "spec": {"replicas": replicas},
        "status": {"replicas": w.status_replicas()},
    })
}

async fn read_scale<W: Workload>(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let mut w: W = serde_json::from_value(get_one(&s, W::KIND, &ns, &name)?).map_err(internal)?;
    Ok(Json(scale_of(&mut w)))
}

/// How often an unconditional scale is retried after a concurrent write.
const SCALE_RETRIES: u32 = 20;

/// PUT `/scale` with `{"spec": {"replicas": N}}` (an `autoscaling/v1 Scale`).
async fn replace_scale<W: Workload>(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: Value = decode(&body)?;
    let n = body["spec"]["replicas"]
        .as_i64()
        .ok_or_else(|| ApiError::Invalid {
            kind: "Scale".into(),
            name: name.clone(),
            errors: vec![FieldError {
                field: "spec.replicas".into(),
                message: "Required value: an integer".into(),
            }],
        })?;
    if !(0..=i32::MAX as i64).contains(&n) {
        return Err(ApiError::Invalid {
            kind: "Scale".into(),
            name,
            errors: vec![FieldError {
                field: "spec.replicas".into(),
                message: format!("Invalid value: {n}: must be greater than or equal to 0"),
            }],
        });
    }
    // With a resourceVersion the scale happens only at that version (409 otherwise); without
    // one it is unconditional, as in Kubernetes: a write between the read and the update (the
    // controllers writing status) is retried on a fresh read.
    let precondition = body["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string);
    let mut attempt = 0;
    loop {
        let cur_v = get_one(&s, W::KIND, &ns, &name)?;
        let mut w: W = serde_json::from_value(cur_v.clone()).map_err(internal)?;
        if let Some(rv) = &precondition {
            w.meta_mut().resource_version = Some(rv.clone());
        }
        if *w.replicas_mut() == Some(n as i32) {
            return Ok(Json(scale_of(&mut w)));
        }
        *w.replicas_mut() = Some(n as i32);
        let g = w.meta().generation.unwrap_or(1) + 1;
        w.meta_mut().generation = Some(g);
        let v = serde_json::to_value(&w).map_err(internal)?;
        match s.store.update(W::KIND, v).await {
            Ok(stored) => {
                let mut w: W = serde_json::from_value(stored).map_err(internal)?;
                return Ok(Json(scale_of(&mut w)));
            }
            Err(StoreError::Conflict { .. })
                if precondition.is_none() && attempt < SCALE_RETRIES =>
            {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(u64::from(attempt))).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// DELETE: removes the object at once (the controllers then remove what it owned). Only an
/// explicit precondition (`?resourceVersion=` or a `DeleteOptions` body's
/// `preconditions.resourceVersion`) can make it fail with 409: without one the delete is
/// unconditional, so a concurrent write (the controllers updating status) cannot fail it.
async fn delete<W: Workload>(
    State(s): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<ListQuery>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let opts = DeleteOptions::parse(&q, &body)?;
    get_one(&s, W::KIND, &ns, &name)?;
    Ok(Json(
        s.store
            .delete(W::KIND, &ns, &name, opts.resource_version)
            .await?,
    ))
}
