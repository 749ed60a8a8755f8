//! The `apps/v1` Deployment and ReplicaSet kinds: a Deployment declares a pod template and a
//! replica count; each version of its template is a ReplicaSet (a *revision*) that owns pods.
//! Also: label selectors, int-or-percent values, the rollout strategies (RollingUpdate,
//! Recreate, and Kapsel's Canary), and the validation of both kinds.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::meta::ObjectMeta;
use super::pod::{Pod, PodSpec, RestartPolicy};
use super::validate::{validate_object_name, validate_pod, FieldError};

/// `deployment.kubernetes.io/revision` on a Deployment and its ReplicaSets.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
/// The label every pod and ReplicaSet of a revision carries.
pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
/// On a ReplicaSet whose rollout completed once: a revision that is known to work, the
/// target of automatic rollbacks and canary aborts.
pub const COMPLETE_ANNOTATION: &str = "deployment.kapsel.io/complete";
/// `kubernetes.io/change-cause`, shown by `rollout history`.
pub const CHANGE_CAUSE_ANNOTATION: &str = "kubernetes.io/change-cause";
/// Set by `kapsel rollout promote` (or by the controller on auto-promotion, or when going back
/// to an earlier template): the `pod-template-hash` of the template that is promoted.
pub const PROMOTED_ANNOTATION: &str = "deployment.kapsel.io/promoted-revision";
/// Set by an automatic rollback (or a canary abort by the controller): the `generation` whose
/// template failed and was rolled back. `kapsel rollout status` fails when the generation it
/// watches is rolled back.
pub const ROLLED_BACK_GENERATION_ANNOTATION: &str = "deployment.kapsel.io/rolled-back-generation";
/// Beside it: what failed and where the Deployment went back to, for people.
pub const ROLLBACK_MESSAGE_ANNOTATION: &str = "deployment.kapsel.io/rollback-message";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Deployment {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DeploymentSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeploymentStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default)]
    pub selector: LabelSelector,
    #[serde(default)]
    pub template: PodTemplateSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<DeploymentStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ready_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_history_limit: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Kapsel extension (Nomad's `auto_revert`): a rollout that misses its progress deadline,
    /// or a canary that fails, goes back to the last revision that was complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rollback: Option<bool>,
}

impl DeploymentSpec {
    pub fn replicas(&self) -> i32 {
        self.replicas.unwrap_or(1)
    }
    pub fn strategy_type(&self) -> StrategyType {
        self.strategy
            .as_ref()
            .and_then(|s| s.type_)
            .unwrap_or(StrategyType::RollingUpdate)
    }
    pub fn progress_deadline(&self) -> i64 {
        self.progress_deadline_seconds.unwrap_or(600) as i64
    }
    pub fn min_ready(&self) -> i64 {
        self.min_ready_seconds.unwrap_or(0).max(0) as i64
    }
    pub fn history_limit(&self) -> usize {
        self.revision_history_limit.unwrap_or(10).max(0) as usize
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodTemplateSpec {
    #[serde(default)]
    pub metadata: TemplateMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

/// The metadata a pod template may carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateMeta {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// `matchLabels` and `matchExpressions`, as in Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let have = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => have.map(|v| r.values.contains(v)).unwrap_or(false),
                    "NotIn" => have.map(|v| !r.values.contains(v)).unwrap_or(true),
                    "Exists" => have.is_some(),
                    "DoesNotExist" => have.is_none(),
                    _ => false,
                }
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StrategyType {
    RollingUpdate,
    Recreate,
    /// Kapsel: move some replicas to the new template, pause, then promote or abort.
    Canary,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentStrategy {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<StrategyType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_update: Option<RollingUpdate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RollingUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_surge: Option<IntOrPercent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrPercent>,
}

/// The canary strategy (Nomad's `canary`, `auto_promote`, `auto_revert`): `replicas` pods of a
/// new template run beside the old ones; the rollout waits until it is promoted (by
/// `kapsel rollout promote`, or automatically when `autoPromote` and every canary has been
/// ready, without a restart, for `healthySeconds`), then continues as a rolling update. `rollout abort`
/// (or, with `spec.autoRollback`, a canary that misses the progress deadline) goes back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Canary {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<IntOrPercent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_promote: Option<bool>,
    /// How long every canary must have been ready, without a restart, before it counts as
    /// healthy for `autoPromote` (Nomad's `min_healthy_time`; default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_surge: Option<IntOrPercent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrPercent>,
}

/// `3` or `"25%"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrPercent {
    Int(i64),
    Str(String),
}

impl IntOrPercent {
    /// Resolve against `total`; percentages round up or down. Errors name what is wrong.
    pub fn resolve(&self, total: i32, round_up: bool) -> Result<i32, String> {
        match self {
            IntOrPercent::Int(n) if *n >= 0 && *n <= i32::MAX as i64 => Ok(*n as i32),
            IntOrPercent::Int(n) => Err(format!(
                "Invalid value: {n}: must be greater than or equal to 0"
            )),
            IntOrPercent::Str(s) => {
                let Some(p) = s.strip_suffix('%') else {
                    return Err(format!(
                        "Invalid value: {s:?}: must be an integer or a percentage (e.g. \"25%\")"
                    ));
                };
                let p: i64 = p.trim().parse().map_err(|_| {
                    format!(
                        "Invalid value: {s:?}: must be an integer or a percentage (e.g. \"25%\")"
                    )
                })?;
                if p < 0 {
                    return Err(format!(
                        "Invalid value: {s:?}: must be greater than or equal to 0"
                    ));
                }
                let v = p * total as i64;
                Ok(if round_up { (v + 99) / 100 } else { v / 100 } as i32)
            }
        }
    }
    fn percent(&self) -> Option<i64> {
        match self {
            IntOrPercent::Str(s) => s.strip_suffix('%').and_then(|p| p.trim().parse().ok()),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentStatus {
    #[serde(default)]
    pub observed_generation: i64,
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub updated_replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub available_replicas: i32,
    #[serde(default)]
    pub unavailable_replicas: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<DeploymentCondition>,
    /// Kapsel: the canary of the newest revision, while one is waiting for promotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanaryStatus {
    pub revision: i64,
    /// The canary's `pod-template-hash`: what `rollout promote` records as promoted.
    #[serde(default)]
    pub pod_template_hash: String,
    pub desired: i32,
    pub ready: i32,
    pub promoted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<DateTime<Utc>>,
}

impl DeploymentStatus {
    pub fn condition(&self, t: &str) -> Option<&DeploymentCondition> {
        self.conditions.iter().find(|c| c.type_ == t)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicaSet {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ReplicaSetSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ReplicaSetStatus>,
}

impl ReplicaSet {
    pub fn revision(&self) -> i64 {
        revision_of(&self.metadata)
    }
    pub fn replicas(&self) -> i32 {
        self.spec.replicas.unwrap_or(1)
    }
}

/// The revision annotation of an object (0 when absent).
pub fn revision_of(meta: &ObjectMeta) -> i64 {
    meta.annotations
        .get(REVISION_ANNOTATION)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicaSetSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default)]
    pub selector: LabelSelector,
    #[serde(default)]
    pub template: PodTemplateSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ready_seconds: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicaSetStatus {
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub available_replicas: i32,
    #[serde(default)]
    pub observed_generation: i64,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Validate the selector and pod template shared by both kinds (`field` is `spec`).
fn validate_template(
    selector: &LabelSelector,
    template: &PodTemplateSpec,
    name: &str,
    errs: &mut Vec<FieldError>,
) {
    if selector.is_empty() {
        errs.push(err(
            "spec.selector",
            "Required value: a selector with matchLabels or matchExpressions",
        ));
    }
    for (i, r) in selector.match_expressions.iter().enumerate() {
        let f = format!("spec.selector.matchExpressions[{i}]");
        match r.operator.as_str() {
            "In" | "NotIn" if r.values.is_empty() => errs.push(err(
                format!("{f}.values"),
                "Required value: must be specified when `operator` is 'In' or 'NotIn'",
            )),
            "Exists" | "DoesNotExist" if !r.values.is_empty() => errs.push(err(
                format!("{f}.values"),
                "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            o => errs.push(err(
                format!("{f}.operator"),
                format!("Unsupported value: {o:?}: supported values: \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""),
            )),
        }
    }
    if !selector.is_empty() && !selector.matches(&template.metadata.labels) {
        errs.push(err(
            "spec.template.metadata.labels",
            format!(
                "Invalid value: {:?}: `selector` does not match template `labels`",
                template.metadata.labels
            ),
        ));
    }
    match template.spec.restart_policy {
        None | Some(RestartPolicy::Always) => {}
        Some(p) => errs.push(err(
            "spec.template.spec.restartPolicy",
            format!("Unsupported value: \"{p:?}\": supported values: \"Always\""),
        )),
    }
    // The template must be a valid pod (its name is generated from the owner's).
    let pod = Pod {
        api_version: "v1".into(),
        kind: "Pod".into(),
        metadata: ObjectMeta {
            name: format!(
                "{}-0000000000-00000",
                if name.is_empty() { "x" } else { name }
            ),
            labels: template.metadata.labels.clone(),
            annotations: template.metadata.annotations.clone(),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    };
    for e in validate_pod(&pod) {
        if e.field.starts_with("metadata.name") {
            continue;
        }
        let field = if let Some(rest) = e.field.strip_prefix("spec") {
            format!("spec.template.spec{rest}")
        } else {
            format!("spec.template.{}", e.field)
        };
        errs.push(FieldError {
            field,
            message: e.message,
        });
    }
}

fn validate_int_or_percent(
    v: &Option<IntOrPercent>,
    field: &str,
    max100: bool,
    errs: &mut Vec<FieldError>,
) {
    if let Some(v) = v {
        if let Err(m) = v.resolve(100, true) {
            errs.push(err(field, m));
        } else if max100 && v.percent().map(|p| p > 100).unwrap_or(false) {
            errs.push(err(
                field,
                format!("Invalid value: {v:?}: must not be greater than 100%"),
            ));
        }
    }
}

fn validate_surge_unavailable(
    surge: &Option<IntOrPercent>,
    unavail: &Option<IntOrPercent>,
    f: &str,
    errs: &mut Vec<FieldError>,
) {
    validate_int_or_percent(surge, &format!("{f}.maxSurge"), false, errs);
    validate_int_or_percent(unavail, &format!("{f}.maxUnavailable"), true, errs);
    let zero = |v: &Option<IntOrPercent>, dflt: bool| match v {
        None => dflt,
        Some(v) => v.resolve(100, true).map(|n| n == 0).unwrap_or(false),
    };
    if zero(surge, false) && zero(unavail, false) {
        errs.push(err(
            format!("{f}.maxUnavailable"),
            "Invalid value: 0: may not be 0 when `maxSurge` is 0",
        ));
    }
}

/// Validate a Deployment for create or update. Returns every problem found.
pub fn validate_deployment(d: &Deployment) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if !d.api_version.is_empty() && d.api_version != "apps/v1" {
        errs.push(err(
            "apiVersion",
            format!(
                "Unsupported value: {:?}: supported values: \"apps/v1\"",
                d.api_version
            ),
        ));
    }
    validate_object_name(&d.metadata.name, "metadata.name", &mut errs);
    if d.metadata.name.len() > 52 {
        errs.push(err(
            "metadata.name",
            "Invalid value: must be no more than 52 characters (pod names add a suffix)",
        ));
    }
    let s = &d.spec;
    if s.replicas() < 0 {
        errs.push(err(
            "spec.replicas",
            format!(
                "Invalid value: {}: must be greater than or equal to 0",
                s.replicas()
            ),
        ));
    }
    for (v, f) in [
        (s.min_ready_seconds, "spec.minReadySeconds"),
        (s.revision_history_limit, "spec.revisionHistoryLimit"),
    ] {
        if let Some(v) = v {
            if v < 0 {
                errs.push(err(
                    f,
                    format!("Invalid value: {v}: must be greater than or equal to 0"),
                ));
            }
        }
    }
    if let Some(p) = s.progress_deadline_seconds {
        if p <= 0 {
            errs.push(err(
                "spec.progressDeadlineSeconds",
                format!("Invalid value: {p}: must be greater than 0"),
            ));
        } else if (p as i64) <= s.min_ready() {
            errs.push(err(
                "spec.progressDeadlineSeconds",
                format!("Invalid value: {p}: must be greater than minReadySeconds"),
            ));
        }
    }
    validate_template(&s.selector, &s.template, &d.metadata.name, &mut errs);
    if let Some(st) = &s.strategy {
        let t = st.type_.unwrap_or(StrategyType::RollingUpdate);
        if let Some(ru) = &st.rolling_update {
            if t != StrategyType::RollingUpdate {
                errs.push(err(
                    "spec.strategy.rollingUpdate",
                    format!("Forbidden: may not be specified when strategy `type` is '{t:?}'"),
                ));
            } else {
                validate_surge_unavailable(
                    &ru.max_surge,
                    &ru.max_unavailable,
                    "spec.strategy.rollingUpdate",
                    &mut errs,
                );
            }
        }
        if let Some(c) = &st.canary {
            if t != StrategyType::Canary {
                errs.push(err(
                    "spec.strategy.canary",
                    format!("Forbidden: may not be specified when strategy `type` is '{t:?}'"),
                ));
            } else {
                validate_int_or_percent(
                    &c.replicas,
                    "spec.strategy.canary.replicas",
                    true,
                    &mut errs,
                );
                if let Some(IntOrPercent::Int(0)) = c.replicas {
                    errs.push(err(
                        "spec.strategy.canary.replicas",
                        "Invalid value: 0: must be at least 1",
                    ));
                }
                if let Some(h) = c.healthy_seconds {
                    if h < 0 {
                        errs.push(err(
                            "spec.strategy.canary.healthySeconds",
                            format!("Invalid value: {h}: must be greater than or equal to 0"),
                        ));
                    }
                }
                validate_surge_unavailable(
                    &c.max_surge,
                    &c.max_unavailable,
                    "spec.strategy.canary",
                    &mut errs,
                );
            }
        }
    }
    errs
}

/// Validate a ReplicaSet (created by users or by the Deployment controller).
pub fn validate_replica_set(rs: &ReplicaSet) -> Vec<FieldError> {
    let mut errs = Vec::new();
    validate_object_name(&rs.metadata.name, "metadata.name", &mut errs);
    if rs.replicas() < 0 {
        errs.push(err(
            "spec.replicas",
            "Invalid value: must be greater than or equal to 0",
        ));
    }
    validate_template(
        &rs.spec.selector,
        &rs.spec.template,
        &rs.metadata.name,
        &mut errs,
    );
    errs
}

/// A stable, short hash of a pod template (the `pod-template-hash` label): FNV-1a over the
/// template's canonical JSON (keys sorted by serde_json's map), as 10 lowercase alphanumerics.
pub fn template_hash(t: &PodTemplateSpec) -> String {
    let mut t = t.clone();
    t.metadata.labels.remove(TEMPLATE_HASH_LABEL);
    let bytes = serde_json::to_vec(&t).unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut out = String::with_capacity(10);
    for _ in 0..10 {
        out.push(ALPHA[(h % ALPHA.len() as u64) as usize] as char);
        h /= ALPHA.len() as u64;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(yaml: &str) -> Deployment {
        serde_norway::from_str(yaml).unwrap()
    }

    const GOOD: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 3\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: c, image: a.wasm}]\n";

    #[test]
    fn good_deployment_is_valid() {
        assert_eq!(validate_deployment(&deploy(GOOD)), vec![]);
    }

    #[test]
    fn selector_must_match_template_labels() {
        let d = deploy(&GOOD.replace("{matchLabels: {app: web}}", "{matchLabels: {app: db}}"));
        let e = validate_deployment(&d);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].field, "spec.template.metadata.labels");
        assert!(e[0].message.contains("does not match"));
    }

    #[test]
    fn strategy_values_are_checked() {
        let d = deploy(&format!(
            "{GOOD}  strategy:\n    type: RollingUpdate\n    rollingUpdate: {{maxSurge: 0, maxUnavailable: 0}}\n"
        ));
        let e = validate_deployment(&d);
        assert_eq!(e[0].field, "spec.strategy.rollingUpdate.maxUnavailable");
        let d = deploy(&format!(
            "{GOOD}  strategy:\n    rollingUpdate: {{maxSurge: \"x%\", maxUnavailable: \"150%\"}}\n"
        ));
        let fields: Vec<_> = validate_deployment(&d)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.strategy.rollingUpdate.maxSurge",
                "spec.strategy.rollingUpdate.maxUnavailable"
            ]
        );
        let d = deploy(&format!(
            "{GOOD}  strategy:\n    type: Recreate\n    rollingUpdate: {{maxSurge: 1}}\n"
        ));
        assert_eq!(
            validate_deployment(&d)[0].field,
            "spec.strategy.rollingUpdate"
        );
        let d = deploy(&format!(
            "{GOOD}  strategy:\n    type: Canary\n    canary: {{replicas: 0}}\n"
        ));
        assert_eq!(
            validate_deployment(&d)[0].field,
            "spec.strategy.canary.replicas"
        );
        assert!(serde_norway::from_str::<Deployment>(&format!(
            "{GOOD}  strategy:\n    type: Blue\n"
        ))
        .is_err());
    }

    #[test]
    fn template_errors_are_prefixed() {
        let d = deploy(&GOOD.replace("image: a.wasm", "image: \"\""));
        let e = validate_deployment(&d);
        assert!(
            e.iter()
                .any(|e| e.field.starts_with("spec.template.spec.containers[0]")),
            "{e:?}"
        );
        let d = deploy(&GOOD.replace("    spec:\n", "    spec:\n      restartPolicy: Never\n"));
        assert_eq!(
            validate_deployment(&d)[0].field,
            "spec.template.spec.restartPolicy"
        );
    }

    #[test]
    fn percentages_round_like_kubernetes() {
        let p = IntOrPercent::Str("25%".into());
        assert_eq!(p.resolve(5, true).unwrap(), 2);
        assert_eq!(p.resolve(5, false).unwrap(), 1);
        assert_eq!(IntOrPercent::Int(3).resolve(5, false).unwrap(), 3);
        assert!(IntOrPercent::Str("abc".into()).resolve(5, true).is_err());
    }

    #[test]
    fn template_hash_is_stable_and_sensitive() {
        let a = deploy(GOOD).spec.template;
        let mut b = a.clone();
        assert_eq!(template_hash(&a), template_hash(&b));
        b.metadata
            .labels
            .insert(TEMPLATE_HASH_LABEL.into(), "zzz".into());
        assert_eq!(template_hash(&a), template_hash(&b));
        b.spec.containers[0].image = "b.wasm".into();
        assert_ne!(template_hash(&a), template_hash(&b));
        assert_eq!(template_hash(&a).len(), 10);
    }

    #[test]
    fn selectors_with_expressions() {
        let s = LabelSelector {
            match_labels: [("app".to_string(), "web".to_string())].into(),
            match_expressions: vec![SelectorRequirement {
                key: "tier".into(),
                operator: "In".into(),
                values: vec!["a".into(), "b".into()],
            }],
        };
        let l: BTreeMap<String, String> = [("app", "web"), ("tier", "b")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert!(s.matches(&l));
        let l2: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        assert!(!s.matches(&l2));
    }
}
