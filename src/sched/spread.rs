//! The scheduler plugins that look at other pods: `topologySpreadConstraints` (Kubernetes'
//! PodTopologySpread), `podAntiAffinity` (InterPodAffinity, the anti half) and the weighted
//! preferred node affinity, whose scores are normalized over the nodes.
//!
//! They count pods per topology domain, so the cost is kept out of the per-node loop: a pass
//! of the scheduler keeps one [`Counts`], which counts the placed pods that a (namespaces,
//! label selector) pair matches per node once, the first time a pod asks, and is then kept up
//! to date as the pass binds pods (so a batch sees the pods bound earlier in it). Each pod with
//! such rules gets a [`PodPlan`] before its nodes are filtered: per node, whether it is
//! refused and why, and its score, all computed in O(nodes) from those counts. Pods without
//! them cost nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::plugins::{node_matches_selectors, NodeInfo, Requests};
use crate::model::affinity::{node_label, NodeInclusionPolicy, WhenUnsatisfiable};
use crate::model::deployment::LabelSelector;
use crate::model::taint::{untolerated, TaintEffect};
use crate::model::Pod;

/// A pod holding a place on a node.
#[derive(Debug, Clone)]
pub struct PlacedPod {
    pub node: String,
    pub req: Requests,
    pub ns: String,
    pub labels: Arc<BTreeMap<String, String>>,
}

impl PlacedPod {
    pub fn of(pod: &Pod, node: &str) -> Self {
        PlacedPod {
            node: node.to_string(),
            req: Requests::of(pod),
            ns: pod.ns().to_string(),
            labels: Arc::new(pod.metadata.labels.clone()),
        }
    }
}

/// Which pods a rule counts: a label selector in some namespaces.
#[derive(Debug, Clone, PartialEq)]
struct Scope {
    namespaces: Vec<String>,
    selector: LabelSelector,
}

impl Scope {
    fn key(&self) -> String {
        format!(
            "{}|{}",
            self.namespaces.join(","),
            serde_json::to_string(&self.selector).unwrap_or_default()
        )
    }
    fn matches(&self, ns: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespaces.iter().any(|n| n == ns) && self.selector.matches(labels)
    }
}

/// Matching pods per node, per scope, for one scheduling pass.
#[derive(Default)]
pub struct Counts {
    scopes: HashMap<String, (Scope, HashMap<String, usize>)>,
}

impl Counts {
    fn per_node(
        &mut self,
        scope: &Scope,
        placed: &HashMap<String, PlacedPod>,
    ) -> &HashMap<String, usize> {
        &self
            .scopes
            .entry(scope.key())
            .or_insert_with(|| {
                let mut m: HashMap<String, usize> = HashMap::new();
                for p in placed.values() {
                    if scope.matches(&p.ns, &p.labels) {
                        *m.entry(p.node.clone()).or_default() += 1;
                    }
                }
                (scope.clone(), m)
            })
            .1
    }

    /// A pod was just placed on `node` in this pass.
    pub fn on_bind(&mut self, ns: &str, labels: &BTreeMap<String, String>, node: &str) {
        for (scope, m) in self.scopes.values_mut() {
            if scope.matches(ns, labels) {
                *m.entry(node.to_string()).or_default() += 1;
            }
        }
    }
}

/// What the pod's pod-counting rules say about each node (indexed like the node infos).
#[derive(Debug, Default)]
pub struct PodPlan {
    /// Why a node is refused, if it is.
    pub refused: Vec<Option<&'static str>>,
    /// Added to the node's score.
    pub score: Vec<i64>,
}

/// Kubernetes' default plugin weight for these scores.
const WEIGHT: i64 = 2;

pub const REASON_SPREAD: &str = "node(s) didn't match pod topology spread constraints";
pub const REASON_SPREAD_LABEL: &str =
    "node(s) didn't match pod topology spread constraints (missing required label)";
pub const REASON_ANTI: &str = "node(s) didn't match pod anti-affinity rules";

/// Does the pod have rules this module evaluates?
pub fn has_rules(pod: &Pod) -> bool {
    !pod.spec.topology_spread_constraints.is_empty()
        || pod.spec.affinity.as_ref().is_some_and(|a| {
            a.pod_anti_affinity.is_some()
                || a.node_affinity.as_ref().is_some_and(|n| {
                    !n.preferred_during_scheduling_ignored_during_execution
                        .is_empty()
                })
        })
}

/// Scale raw scores to 0..=100 over the nodes (higher raw is better).
fn normalize(raw: &[i64], out: &mut [i64]) {
    let (Some(&min), Some(&max)) = (raw.iter().min(), raw.iter().max()) else {
        return;
    };
    if max == min {
        return;
    }
    for (o, r) in out.iter_mut().zip(raw) {
        *o += WEIGHT * 100 * (r - min) / (max - min);
    }
}

/// Sum `per_node` over the domains of `key` among `eligible` nodes: domain → count (every
/// eligible domain present, maybe with 0).
fn domain_counts<'a>(
    infos: &'a [NodeInfo],
    eligible: &[bool],
    key: &str,
    per_node: &HashMap<String, usize>,
) -> HashMap<&'a str, usize> {
    let mut d: HashMap<&str, usize> = HashMap::new();
    for (i, info) in infos.iter().enumerate() {
        if !eligible[i] {
            continue;
        }
        let name = info.node.metadata.name.as_str();
        if let Some(v) = node_label(name, &info.node.metadata.labels, key) {
            *d.entry(v).or_default() += per_node.get(name).copied().unwrap_or(0);
        }
    }
    d
}

/// Evaluate the pod's spread constraints, anti-affinity and preferred node affinity.
pub fn plan(
    pod: &Pod,
    infos: &[NodeInfo],
    placed: &HashMap<String, PlacedPod>,
    counts: &mut Counts,
) -> PodPlan {
    let n = infos.len();
    let mut plan = PodPlan {
        refused: vec![None; n],
        score: vec![0; n],
    };
    let own_ns = pod.ns().to_string();
    let labels = &pod.metadata.labels;
    // Domains count only nodes the pod could go to by its node selector and required node
    // affinity (Kubernetes' nodeAffinityPolicy: Honor).
    let by_selectors: Vec<bool> = infos
        .iter()
        .map(|i| node_matches_selectors(pod, &i.node))
        .collect();
    let tolerated: Vec<bool> = infos
        .iter()
        .map(|i| {
            let tols = &pod.spec.tolerations;
            let taints = &i.node.spec.taints;
            untolerated(taints, tols, TaintEffect::NoSchedule)
                .chain(untolerated(taints, tols, TaintEffect::NoExecute))
                .next()
                .is_none()
        })
        .collect();

    for c in &pod.spec.topology_spread_constraints {
        let honor_affinity = c.node_affinity_policy != Some(NodeInclusionPolicy::Ignore);
        let honor_taints = c.node_taints_policy == Some(NodeInclusionPolicy::Honor);
        let eligible: Vec<bool> = (0..n)
            .map(|i| (!honor_affinity || by_selectors[i]) && (!honor_taints || tolerated[i]))
            .collect();
        let scope = Scope {
            namespaces: vec![own_ns.clone()],
            selector: c.label_selector.clone().unwrap_or_default(),
        };
        // A null selector matches no pod: every domain counts 0.
        let empty = HashMap::new();
        let per_node = if c.label_selector.is_some() {
            counts.per_node(&scope, placed)
        } else {
            &empty
        };
        let domains = domain_counts(infos, &eligible, &c.topology_key, per_node);
        let self_match = usize::from(c.label_selector.as_ref().is_some_and(|s| s.matches(labels)));
        let mut min = domains.values().copied().min().unwrap_or(0);
        if c.min_domains
            .is_some_and(|m| (domains.len() as i64) < m as i64)
        {
            min = 0;
        }
        let hard = c.when_unsatisfiable == WhenUnsatisfiable::DoNotSchedule;
        let mut raw = vec![0i64; n];
        let max = domains.values().copied().max().unwrap_or(0) as i64;
        for (i, info) in infos.iter().enumerate() {
            let name = info.node.metadata.name.as_str();
            match node_label(name, &info.node.metadata.labels, &c.topology_key) {
                None => {
                    if hard {
                        plan.refused[i].get_or_insert(REASON_SPREAD_LABEL);
                    }
                    // Soft: the worst score.
                    raw[i] = -(max + 1);
                }
                Some(d) => {
                    let cnt = domains.get(d).copied().unwrap_or(0);
                    if hard && (cnt + self_match) as i64 - min as i64 > c.max_skew as i64 {
                        plan.refused[i].get_or_insert(REASON_SPREAD);
                    }
                    raw[i] = -(cnt as i64);
                }
            }
        }
        if !hard {
            normalize(&raw, &mut plan.score);
        }
    }

    let anti = pod
        .spec
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref());
    if let Some(anti) = anti {
        let terms = anti
            .required_during_scheduling_ignored_during_execution
            .iter()
            .map(|t| (None, t))
            .chain(
                anti.preferred_during_scheduling_ignored_during_execution
                    .iter()
                    .map(|w| (Some(w.weight as i64), &w.pod_affinity_term)),
            );
        let mut raw = vec![0i64; n];
        let mut soft = false;
        let all = vec![true; n];
        for (weight, t) in terms {
            let Some(sel) = &t.label_selector else {
                continue;
            };
            let scope = Scope {
                namespaces: if t.namespaces.is_empty() {
                    vec![own_ns.clone()]
                } else {
                    t.namespaces.clone()
                },
                selector: sel.clone(),
            };
            let per_node = counts.per_node(&scope, placed);
            let domains = domain_counts(infos, &all, &t.topology_key, per_node);
            for (i, info) in infos.iter().enumerate() {
                let name = info.node.metadata.name.as_str();
                let Some(d) = node_label(name, &info.node.metadata.labels, &t.topology_key) else {
                    continue;
                };
                let cnt = domains.get(d).copied().unwrap_or(0) as i64;
                match weight {
                    None if cnt > 0 => {
                        plan.refused[i].get_or_insert(REASON_ANTI);
                    }
                    None => {}
                    Some(w) => {
                        soft = true;
                        raw[i] -= w * cnt;
                    }
                }
            }
        }
        if soft {
            normalize(&raw, &mut plan.score);
        }
    }

    let preferred = pod
        .spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .map(|a| &a.preferred_during_scheduling_ignored_during_execution[..])
        .unwrap_or_default();
    if !preferred.is_empty() {
        let raw: Vec<i64> = infos
            .iter()
            .map(|info| {
                let node = &info.node;
                preferred
                    .iter()
                    .filter(|p| {
                        p.preference
                            .matches(&node.metadata.name, &node.metadata.labels)
                    })
                    .map(|p| p.weight as i64)
                    .sum()
            })
            .collect();
        // Kubernetes scales by the best node's sum (0 stays 0).
        let max = raw.iter().copied().max().unwrap_or(0);
        if max > 0 {
            for (o, r) in plan.score.iter_mut().zip(&raw) {
                *o += WEIGHT * 100 * r / max;
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::affinity::{
        Affinity, NodeAffinity, NodeSelectorOperator, NodeSelectorRequirement, NodeSelectorTerm,
        PodAffinityTerm, PodAntiAffinity, PreferredSchedulingTerm, TopologySpreadConstraint,
        WeightedPodAffinityTerm, LABEL_HOSTNAME,
    };
    use crate::model::Node;

    fn info(name: &str, zone: Option<&str>) -> NodeInfo {
        let mut n = Node::default();
        n.metadata.name = name.into();
        if let Some(z) = zone {
            n.metadata.labels.insert("zone".into(), z.into());
        }
        NodeInfo {
            node: std::sync::Arc::new(n),
            requested: Requests::default(),
            pods: 0,
        }
    }

    fn app(v: &str) -> BTreeMap<String, String> {
        [("app".to_string(), v.to_string())].into_iter().collect()
    }

    fn sel(v: &str) -> LabelSelector {
        LabelSelector {
            match_labels: app(v),
            match_expressions: vec![],
        }
    }

    fn pod(v: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = "p".into();
        p.metadata.labels = app(v);
        p
    }

    fn placed(list: &[(&str, &str)]) -> HashMap<String, PlacedPod> {
        list.iter()
            .enumerate()
            .map(|(i, (node, a))| {
                (
                    format!("u{i}"),
                    PlacedPod {
                        node: node.to_string(),
                        req: Requests::default(),
                        ns: "default".into(),
                        labels: Arc::new(app(a)),
                    },
                )
            })
            .collect()
    }

    fn spread(key: &str, skew: i32, when: WhenUnsatisfiable) -> TopologySpreadConstraint {
        TopologySpreadConstraint {
            max_skew: skew,
            topology_key: key.into(),
            when_unsatisfiable: when,
            label_selector: Some(sel("web")),
            min_domains: None,
            node_affinity_policy: None,
            node_taints_policy: None,
        }
    }

    #[test]
    fn spread_refuses_the_fuller_domain_and_counts_this_pass() {
        let infos = vec![
            info("a", Some("z1")),
            info("b", Some("z1")),
            info("c", Some("z2")),
        ];
        // z1 holds 2 web pods (and a db pod that does not count), z2 none.
        let placed = placed(&[("a", "web"), ("b", "web"), ("c", "db")]);
        let mut p = pod("web");
        p.spec.topology_spread_constraints.push(spread(
            "zone",
            1,
            WhenUnsatisfiable::DoNotSchedule,
        ));
        let mut counts = Counts::default();
        let plan = plan(&p, &infos, &placed, &mut counts);
        assert_eq!(
            plan.refused,
            [Some(REASON_SPREAD), Some(REASON_SPREAD), None]
        );
        // Bind two to c in this pass: z1 (2) and z2 (2), so all are open; a third to c and z2
        // is full.
        counts.on_bind("default", &app("web"), "c");
        counts.on_bind("default", &app("web"), "c");
        let plan2 = super::plan(&p, &infos, &placed, &mut counts);
        assert_eq!(plan2.refused, [None, None, None]);
        counts.on_bind("default", &app("web"), "c");
        let plan3 = super::plan(&p, &infos, &placed, &mut counts);
        assert_eq!(plan3.refused, [None, None, Some(REASON_SPREAD)]);
        // Other namespaces do not count.
        counts.on_bind("other", &app("web"), "a");
        assert_eq!(
            super::plan(&p, &infos, &placed, &mut counts).refused,
            plan3.refused
        );
    }

    #[test]
    fn spread_by_hostname_missing_labels_min_domains_and_soft() {
        let infos = vec![info("a", Some("z1")), info("b", None)];
        let placed = placed(&[("a", "web")]);
        let mut p = pod("web");
        p.spec.topology_spread_constraints.push(spread(
            LABEL_HOSTNAME,
            1,
            WhenUnsatisfiable::DoNotSchedule,
        ));
        let mut counts = Counts::default();
        // Hostname: a=1, b=0 → a would make skew 2.
        let pl = plan(&p, &infos, &placed, &mut counts);
        assert_eq!(pl.refused, [Some(REASON_SPREAD), None]);
        // Zone: b has no zone label.
        p.spec.topology_spread_constraints =
            vec![spread("zone", 1, WhenUnsatisfiable::DoNotSchedule)];
        let pl = plan(&p, &infos, &placed, &mut counts);
        assert_eq!(pl.refused, [None, Some(REASON_SPREAD_LABEL)]);
        // minDomains 2 with one zone: the global minimum is 0, so a (1+1-0 > 1) is refused.
        p.spec.topology_spread_constraints[0].min_domains = Some(2);
        let pl = plan(&p, &infos, &placed, &mut counts);
        assert_eq!(pl.refused[0], Some(REASON_SPREAD));
        // A tainted node's domain counts, unless nodeTaintsPolicy is Honor.
        p.spec.topology_spread_constraints =
            vec![spread(LABEL_HOSTNAME, 1, WhenUnsatisfiable::DoNotSchedule)];
        let mut tainted = infos.clone();
        std::sync::Arc::make_mut(&mut tainted[1].node)
            .spec
            .taints
            .push(crate::model::taint::Taint::parse("k:NoSchedule").unwrap());
        let pl = plan(&p, &tainted, &placed, &mut counts);
        assert_eq!(pl.refused[0], Some(REASON_SPREAD));
        p.spec.topology_spread_constraints[0].node_taints_policy = Some(NodeInclusionPolicy::Honor);
        let pl = plan(&p, &tainted, &placed, &mut counts);
        assert_eq!(pl.refused[0], None);
        // ScheduleAnyway never refuses; it ranks the emptier host higher.
        p.spec.topology_spread_constraints =
            vec![spread(LABEL_HOSTNAME, 1, WhenUnsatisfiable::ScheduleAnyway)];
        let pl = plan(&p, &infos, &placed, &mut counts);
        assert_eq!(pl.refused, [None, None]);
        assert!(pl.score[1] > pl.score[0], "{:?}", pl.score);
    }

    #[test]
    fn anti_affinity_required_and_preferred() {
        let infos = vec![
            info("a", Some("z1")),
            info("b", Some("z1")),
            info("c", Some("z2")),
        ];
        let placed = placed(&[("a", "web")]);
        let term = |key: &str| PodAffinityTerm {
            label_selector: Some(sel("web")),
            namespaces: vec![],
            topology_key: key.into(),
        };
        let mut p = pod("web");
        p.spec.affinity = Some(Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                required_during_scheduling_ignored_during_execution: vec![term(LABEL_HOSTNAME)],
                preferred_during_scheduling_ignored_during_execution: vec![],
            }),
            ..Default::default()
        });
        let mut counts = Counts::default();
        assert_eq!(
            plan(&p, &infos, &placed, &mut counts).refused,
            [Some(REASON_ANTI), None, None]
        );
        // By zone, b shares a's zone.
        p.spec
            .affinity
            .as_mut()
            .unwrap()
            .pod_anti_affinity
            .as_mut()
            .unwrap()
            .required_during_scheduling_ignored_during_execution = vec![term("zone")];
        assert_eq!(
            plan(&p, &infos, &placed, &mut counts).refused,
            [Some(REASON_ANTI), Some(REASON_ANTI), None]
        );
        // Preferred: ranks, never refuses.
        let anti = p
            .spec
            .affinity
            .as_mut()
            .unwrap()
            .pod_anti_affinity
            .as_mut()
            .unwrap();
        anti.required_during_scheduling_ignored_during_execution
            .clear();
        anti.preferred_during_scheduling_ignored_during_execution = vec![WeightedPodAffinityTerm {
            weight: 50,
            pod_affinity_term: term(LABEL_HOSTNAME),
        }];
        let pl = plan(&p, &infos, &placed, &mut counts);
        assert_eq!(pl.refused, [None, None, None]);
        assert!(
            pl.score[0] < pl.score[1] && pl.score[1] == pl.score[2],
            "{:?}",
            pl.score
        );
    }

    #[test]
    fn preferred_node_affinity_scores_by_weight() {
        let infos = vec![
            info("a", Some("z1")),
            info("b", Some("z2")),
            info("c", None),
        ];
        let pref = |zone: &str, w: i32| PreferredSchedulingTerm {
            weight: w,
            preference: NodeSelectorTerm {
                match_expressions: vec![NodeSelectorRequirement {
                    key: "zone".into(),
                    operator: NodeSelectorOperator::In,
                    values: vec![zone.into()],
                }],
                match_fields: vec![],
            },
        };
        let mut p = pod("web");
        p.spec.affinity = Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: None,
                preferred_during_scheduling_ignored_during_execution: vec![
                    pref("z1", 10),
                    pref("z2", 80),
                ],
            }),
            ..Default::default()
        });
        assert!(has_rules(&p));
        let pl = plan(&p, &infos, &HashMap::new(), &mut Counts::default());
        assert_eq!(pl.score, [WEIGHT * 100 * 10 / 80, WEIGHT * 100, 0]);
        assert!(!has_rules(&pod("web")));
    }
}
