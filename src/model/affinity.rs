//! Where a pod may and would rather run, as Kubernetes' `spec.affinity` and
//! `spec.topologySpreadConstraints`: node affinity (required terms ORed, their expressions
//! ANDed; weighted preferred terms), pod anti-affinity (required and preferred, per topology
//! domain) and topology spread constraints. The types decode strictly; [`validate_affinity`]
//! and [`validate_spread`] name the field of every problem. The scheduler's plugins
//! (`sched::spread`) evaluate them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::deployment::LabelSelector;
use super::validate::FieldError;

/// The label every node carries with its own name.
pub const LABEL_HOSTNAME: &str = "kubernetes.io/hostname";
pub const LABEL_OS: &str = "kubernetes.io/os";
pub const LABEL_ARCH: &str = "kubernetes.io/arch";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Affinity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_affinity: Option<NodeAffinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_anti_affinity: Option<PodAntiAffinity>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeAffinity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_during_scheduling_ignored_during_execution: Option<NodeSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_during_scheduling_ignored_during_execution: Vec<PreferredSchedulingTerm>,
}

/// Terms ORed together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSelector {
    #[serde(default)]
    pub node_selector_terms: Vec<NodeSelectorTerm>,
}

/// Requirements ANDed together; an empty term matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSelectorTerm {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<NodeSelectorRequirement>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_fields: Vec<NodeSelectorRequirement>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSelectorRequirement {
    pub key: String,
    pub operator: NodeSelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeSelectorOperator {
    #[default]
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreferredSchedulingTerm {
    pub weight: i32,
    pub preference: NodeSelectorTerm,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodAntiAffinity {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_during_scheduling_ignored_during_execution: Vec<PodAffinityTerm>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_during_scheduling_ignored_during_execution: Vec<WeightedPodAffinityTerm>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodAffinityTerm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<LabelSelector>,
    /// Namespaces the selector looks in (empty: the pod's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    pub topology_key: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedPodAffinityTerm {
    pub weight: i32,
    pub pod_affinity_term: PodAffinityTerm,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum WhenUnsatisfiable {
    #[default]
    DoNotSchedule,
    ScheduleAnyway,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TopologySpreadConstraint {
    pub max_skew: i32,
    pub topology_key: String,
    pub when_unsatisfiable: WhenUnsatisfiable,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_domains: Option<i32>,
    /// Do the pod's nodeSelector/required node affinity limit the domains counted
    /// (default Honor)?
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_affinity_policy: Option<NodeInclusionPolicy>,
    /// Do node taints the pod does not tolerate exclude domains (default Ignore)?
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_taints_policy: Option<NodeInclusionPolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeInclusionPolicy {
    Honor,
    Ignore,
}

/// A node's value for `key`: its label, or its name for `kubernetes.io/hostname` on a node
/// registered before the label existed.
pub fn node_label<'a>(
    name: &'a str,
    labels: &'a BTreeMap<String, String>,
    key: &str,
) -> Option<&'a str> {
    labels
        .get(key)
        .map(String::as_str)
        .or_else(|| (key == LABEL_HOSTNAME).then_some(name))
}

impl NodeSelectorRequirement {
    fn matches(&self, have: Option<&str>) -> bool {
        use NodeSelectorOperator::*;
        match self.operator {
            In => have.is_some_and(|v| self.values.iter().any(|x| x == v)),
            NotIn => !have.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Exists => have.is_some(),
            DoesNotExist => have.is_none(),
            Gt | Lt => {
                let (Some(have), Some(want)) = (
                    have.and_then(|v| v.parse::<i64>().ok()),
                    self.values.first().and_then(|v| v.parse::<i64>().ok()),
                ) else {
                    return false;
                };
                if self.operator == Gt {
                    have > want
                } else {
                    have < want
                }
            }
        }
    }
}

impl NodeSelectorTerm {
    /// Every requirement holds for the node (`metadata.name` is the only field).
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        if self.match_expressions.is_empty() && self.match_fields.is_empty() {
            return false;
        }
        self.match_expressions
            .iter()
            .all(|r| r.matches(node_label(name, labels, &r.key)))
            && self
                .match_fields
                .iter()
                .all(|r| r.matches((r.key == "metadata.name").then_some(name)))
    }
}

impl NodeSelector {
    /// Some term matches.
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector_terms
            .iter()
            .any(|t| t.matches(name, labels))
    }
}

impl PodAffinityTerm {
    /// Does `labels` (of a pod in `ns`) match this term, for a pod in `own_ns`?
    pub fn selects(&self, own_ns: &str, ns: &str, labels: &BTreeMap<String, String>) -> bool {
        let in_ns = if self.namespaces.is_empty() {
            ns == own_ns
        } else {
            self.namespaces.iter().any(|n| n == ns)
        };
        // A null selector matches no pod.
        in_ns
            && self
                .label_selector
                .as_ref()
                .is_some_and(|s| s.matches(labels))
    }
}

fn ferr(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn validate_label_key(key: &str, field: &str, errs: &mut Vec<FieldError>) {
    if let Err(e) = super::validate::check_label_key(key) {
        errs.push(ferr(field, format!("Invalid value: {key:?}: {e}")));
    }
}

fn validate_selector(s: &LabelSelector, field: &str, errs: &mut Vec<FieldError>) {
    for (i, r) in s.match_expressions.iter().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        validate_label_key(&r.key, &format!("{f}.key"), errs);
        match r.operator.as_str() {
            "In" | "NotIn" if r.values.is_empty() => errs.push(ferr(
                format!("{f}.values"),
                "Required value: must be specified when `operator` is 'In' or 'NotIn'",
            )),
            "Exists" | "DoesNotExist" if !r.values.is_empty() => errs.push(ferr(
                format!("{f}.values"),
                "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            o => errs.push(ferr(
                format!("{f}.operator"),
                format!("Unsupported value: {o:?}: supported values: \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""),
            )),
        }
    }
}

fn validate_term(t: &NodeSelectorTerm, field: &str, errs: &mut Vec<FieldError>) {
    use NodeSelectorOperator::*;
    for (group, list, is_field) in [
        ("matchExpressions", &t.match_expressions, false),
        ("matchFields", &t.match_fields, true),
    ] {
        for (i, r) in list.iter().enumerate() {
            let f = format!("{field}.{group}[{i}]");
            if is_field {
                if r.key != "metadata.name" {
                    errs.push(ferr(
                        format!("{f}.key"),
                        format!(
                            "Unsupported value: {:?}: supported values: \"metadata.name\"",
                            r.key
                        ),
                    ));
                }
                if !matches!(r.operator, In | NotIn) || r.values.len() != 1 {
                    errs.push(ferr(
                        format!("{f}.values"),
                        "Required value: must be only one value when `operator` is 'In' or 'NotIn' for node field selector",
                    ));
                }
                continue;
            }
            validate_label_key(&r.key, &format!("{f}.key"), errs);
            match r.operator {
                In | NotIn if r.values.is_empty() => errs.push(ferr(
                    format!("{f}.values"),
                    "Required value: must be specified when `operator` is 'In' or 'NotIn'",
                )),
                Exists | DoesNotExist if !r.values.is_empty() => errs.push(ferr(
                    format!("{f}.values"),
                    "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                )),
                Gt | Lt if r.values.len() != 1 || r.values[0].parse::<i64>().is_err() => {
                    errs.push(ferr(
                        format!("{f}.values"),
                        "Invalid value: must be a single integer when `operator` is 'Gt' or 'Lt'",
                    ))
                }
                _ => {}
            }
        }
    }
}

fn validate_weight(w: i32, field: &str, errs: &mut Vec<FieldError>) {
    if !(1..=100).contains(&w) {
        errs.push(ferr(
            field,
            format!("Invalid value: {w}: must be in the range 1-100"),
        ));
    }
}

fn validate_pod_term(t: &PodAffinityTerm, field: &str, errs: &mut Vec<FieldError>) {
    if t.topology_key.is_empty() {
        errs.push(ferr(
            format!("{field}.topologyKey"),
            "Required value: can not be empty",
        ));
    } else {
        validate_label_key(&t.topology_key, &format!("{field}.topologyKey"), errs);
    }
    if let Some(s) = &t.label_selector {
        validate_selector(s, &format!("{field}.labelSelector"), errs);
    }
    for (i, ns) in t.namespaces.iter().enumerate() {
        if !super::validate::is_dns_label(ns) {
            errs.push(ferr(
                format!("{field}.namespaces[{i}]"),
                format!("Invalid value: {ns:?}"),
            ));
        }
    }
}

/// `spec.affinity`.
pub fn validate_affinity(a: &Affinity, errs: &mut Vec<FieldError>) {
    if let Some(na) = &a.node_affinity {
        let f = "spec.affinity.nodeAffinity";
        if let Some(req) = &na.required_during_scheduling_ignored_during_execution {
            let f = format!("{f}.requiredDuringSchedulingIgnoredDuringExecution");
            if req.node_selector_terms.is_empty() {
                errs.push(ferr(
                    format!("{f}.nodeSelectorTerms"),
                    "Required value: must have at least one node selector term",
                ));
            }
            for (i, t) in req.node_selector_terms.iter().enumerate() {
                validate_term(t, &format!("{f}.nodeSelectorTerms[{i}]"), errs);
            }
        }
        for (i, p) in na
            .preferred_during_scheduling_ignored_during_execution
            .iter()
            .enumerate()
        {
            let f = format!("{f}.preferredDuringSchedulingIgnoredDuringExecution[{i}]");
            validate_weight(p.weight, &format!("{f}.weight"), errs);
            validate_term(&p.preference, &format!("{f}.preference"), errs);
        }
    }
    if let Some(pa) = &a.pod_anti_affinity {
        let f = "spec.affinity.podAntiAffinity";
        for (i, t) in pa
            .required_during_scheduling_ignored_during_execution
            .iter()
            .enumerate()
        {
            validate_pod_term(
                t,
                &format!("{f}.requiredDuringSchedulingIgnoredDuringExecution[{i}]"),
                errs,
            );
        }
        for (i, w) in pa
            .preferred_during_scheduling_ignored_during_execution
            .iter()
            .enumerate()
        {
            let f = format!("{f}.preferredDuringSchedulingIgnoredDuringExecution[{i}]");
            validate_weight(w.weight, &format!("{f}.weight"), errs);
            validate_pod_term(&w.pod_affinity_term, &format!("{f}.podAffinityTerm"), errs);
        }
    }
}

/// `spec.topologySpreadConstraints`.
pub fn validate_spread(cs: &[TopologySpreadConstraint], errs: &mut Vec<FieldError>) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, c) in cs.iter().enumerate() {
        let f = format!("spec.topologySpreadConstraints[{i}]");
        if c.max_skew <= 0 {
            errs.push(ferr(
                format!("{f}.maxSkew"),
                format!("Invalid value: {}: must be greater than zero", c.max_skew),
            ));
        }
        if c.topology_key.is_empty() {
            errs.push(ferr(
                format!("{f}.topologyKey"),
                "Required value: can not be empty",
            ));
        } else {
            validate_label_key(&c.topology_key, &format!("{f}.topologyKey"), errs);
        }
        if let Some(m) = c.min_domains {
            if m <= 0 {
                errs.push(ferr(
                    format!("{f}.minDomains"),
                    format!("Invalid value: {m}: must be greater than zero"),
                ));
            } else if c.when_unsatisfiable != WhenUnsatisfiable::DoNotSchedule {
                errs.push(ferr(
                    format!("{f}.minDomains"),
                    "Invalid value: can only use minDomains if whenUnsatisfiable=DoNotSchedule",
                ));
            }
        }
        if let Some(s) = &c.label_selector {
            validate_selector(s, &format!("{f}.labelSelector"), errs);
        }
        if !seen.insert((c.topology_key.clone(), c.when_unsatisfiable)) {
            errs.push(ferr(
                format!("{f}.{{topologyKey, whenUnsatisfiable}}"),
                format!(
                    "Duplicate value: {{{:?}, {:?}}}",
                    c.topology_key, c.when_unsatisfiable
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: NodeSelectorOperator, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: op,
            values: values.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn node_selector_operators() {
        use NodeSelectorOperator::*;
        let l = labels(&[("zone", "a"), ("cores", "8")]);
        let term = |r: NodeSelectorRequirement| NodeSelectorTerm {
            match_expressions: vec![r],
            match_fields: vec![],
        };
        assert!(term(req("zone", In, &["a", "b"])).matches("n", &l));
        assert!(!term(req("zone", In, &["b"])).matches("n", &l));
        assert!(term(req("zone", NotIn, &["b"])).matches("n", &l));
        assert!(term(req("gpu", NotIn, &["x"])).matches("n", &l));
        assert!(term(req("zone", Exists, &[])).matches("n", &l));
        assert!(!term(req("gpu", Exists, &[])).matches("n", &l));
        assert!(term(req("gpu", DoesNotExist, &[])).matches("n", &l));
        assert!(term(req("cores", Gt, &["4"])).matches("n", &l));
        assert!(!term(req("cores", Gt, &["8"])).matches("n", &l));
        assert!(term(req("cores", Lt, &["9"])).matches("n", &l));
        assert!(!term(req("zone", Lt, &["9"])).matches("n", &l));
        // The hostname label falls back to the node's name.
        assert!(term(req(LABEL_HOSTNAME, In, &["n"])).matches("n", &l));
        let by_name = NodeSelectorTerm {
            match_expressions: vec![],
            match_fields: vec![req("metadata.name", In, &["n"])],
        };
        assert!(by_name.matches("n", &l));
        assert!(!by_name.matches("m", &l));
        // Empty terms match nothing; terms are ORed, requirements ANDed.
        assert!(!NodeSelectorTerm::default().matches("n", &l));
        let sel = NodeSelector {
            node_selector_terms: vec![
                NodeSelectorTerm {
                    match_expressions: vec![req("zone", In, &["b"]), req("cores", Exists, &[])],
                    match_fields: vec![],
                },
                term(req("zone", In, &["a"])),
            ],
        };
        assert!(sel.matches("n", &l));
        assert!(!sel.matches("n", &labels(&[("zone", "b")])));
    }

    #[test]
    fn strict_decoding_and_validation_name_the_field() {
        let e = serde_json::from_str::<Affinity>(
            r#"{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpresions":[]}]}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("matchExpresions"), "{e}");
        let e =
            serde_json::from_str::<NodeSelectorRequirement>(r#"{"key":"a","operator":"Within"}"#)
                .unwrap_err()
                .to_string();
        assert!(e.contains("Within"), "{e}");

        let a: Affinity = serde_json::from_str(
            r#"{"nodeAffinity":{
                "requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[
                    {"matchExpressions":[{"key":"zone","operator":"In"},{"key":"c","operator":"Gt","values":["x"]}],
                     "matchFields":[{"key":"metadata.labels","operator":"In","values":["a"]}]}]},
                "preferredDuringSchedulingIgnoredDuringExecution":[{"weight":0,"preference":{}}]},
               "podAntiAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":[{"topologyKey":""}]}}"#,
        )
        .unwrap();
        let mut errs = Vec::new();
        validate_affinity(&a, &mut errs);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        let t = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]";
        assert!(
            fields.contains(&format!("{t}.matchExpressions[0].values").as_str()),
            "{fields:?}"
        );
        assert!(
            fields.contains(&format!("{t}.matchExpressions[1].values").as_str()),
            "{fields:?}"
        );
        assert!(
            fields.contains(&format!("{t}.matchFields[0].key").as_str()),
            "{fields:?}"
        );
        assert!(fields.contains(
            &"spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight"
        ));
        assert!(fields.contains(
            &"spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey"
        ));

        let cs: Vec<TopologySpreadConstraint> = serde_json::from_str(
            r#"[{"maxSkew":0,"topologyKey":"kubernetes.io/hostname","whenUnsatisfiable":"ScheduleAnyway","minDomains":2}]"#,
        )
        .unwrap();
        let mut errs = Vec::new();
        validate_spread(&cs, &mut errs);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.topologySpreadConstraints[0].maxSkew",
                "spec.topologySpreadConstraints[0].minDomains"
            ]
        );
        let e = serde_json::from_str::<TopologySpreadConstraint>(
            r#"{"maxSkew":1,"topologyKey":"k","whenUnsatisfiable":"Maybe"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("Maybe"), "{e}");
    }

    #[test]
    fn pod_terms_select_in_their_namespaces() {
        let t = PodAffinityTerm {
            label_selector: Some(LabelSelector {
                match_labels: labels(&[("app", "web")]),
                match_expressions: vec![],
            }),
            namespaces: vec![],
            topology_key: LABEL_HOSTNAME.into(),
        };
        let web = labels(&[("app", "web")]);
        assert!(t.selects("default", "default", &web));
        assert!(!t.selects("default", "other", &web));
        assert!(!t.selects("default", "default", &labels(&[("app", "db")])));
        let none = PodAffinityTerm {
            label_selector: None,
            ..t
        };
        assert!(!none.selects("default", "default", &web));
    }
}
