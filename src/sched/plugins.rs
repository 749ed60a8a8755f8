//! Filter and score plugins of the scheduling pipeline. A filter says why a node cannot take a
//! pod; a score ranks the nodes that can. Multi-node placement reuses the same pipeline.

use crate::model::affinity::node_label;
use crate::model::pod::Pod;
use crate::model::quantity::{parse_bytes, parse_millicpu};
use crate::model::taint::{untolerated, Taint, TaintEffect, TAINT_UNSCHEDULABLE};
use crate::model::Node;

/// What a pod asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requests {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl Requests {
    /// Sum of the app containers' requests; init containers run first, so the max of each
    /// init container counts, as in Kubernetes. A limit without a request counts as the request.
    pub fn of(pod: &Pod) -> Self {
        let one = |c: &crate::model::Container| {
            let r = c.resources.as_ref();
            let get = |k: &str| {
                r.and_then(|r| r.requests.get(k).or_else(|| r.limits.get(k)))
                    .map(|q| q.as_string())
            };
            Requests {
                cpu_millis: get("cpu")
                    .and_then(|q| parse_millicpu(&q).ok())
                    .unwrap_or(0),
                memory_bytes: get("memory")
                    .and_then(|q| parse_bytes(&q).ok())
                    .unwrap_or(0),
            }
        };
        let mut sum = Requests::default();
        for c in &pod.spec.containers {
            let r = one(c);
            sum.cpu_millis += r.cpu_millis;
            sum.memory_bytes += r.memory_bytes;
        }
        for c in &pod.spec.init_containers {
            let r = one(c);
            sum.cpu_millis = sum.cpu_millis.max(r.cpu_millis);
            sum.memory_bytes = sum.memory_bytes.max(r.memory_bytes);
        }
        sum
    }
}

/// A node and what is already placed on it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node: std::sync::Arc<Node>,
    pub requested: Requests,
    pub pods: u64,
}

impl NodeInfo {
    pub fn allocatable(&self) -> (u64, u64, u64) {
        let empty = Default::default();
        let a = self
            .node
            .status
            .as_ref()
            .map(|s| &s.allocatable)
            .unwrap_or(&empty);
        (
            a.get("cpu")
                .and_then(|q| parse_millicpu(q).ok())
                .unwrap_or(0),
            a.get("memory")
                .and_then(|q| parse_bytes(q).ok())
                .unwrap_or(0),
            a.get("pods").and_then(|q| q.parse().ok()).unwrap_or(110),
        )
    }
    pub fn runtimes(&self) -> &[String] {
        self.node
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.runtimes.as_slice())
            .unwrap_or_default()
    }
}

/// Reasons a node was filtered out; counted into the FailedScheduling message.
pub trait Filter: Send + Sync {
    fn name(&self) -> &'static str;
    fn filter(&self, pod: &Pod, req: &Requests, node: &NodeInfo) -> Result<(), String>;
}

pub trait Score: Send + Sync {
    /// 0..=100, higher is better.
    fn score(&self, pod: &Pod, req: &Requests, node: &NodeInfo) -> i64;
}

pub struct NodeReady;
impl Filter for NodeReady {
    fn name(&self) -> &'static str {
        "NodeReady"
    }
    fn filter(&self, pod: &Pod, _: &Requests, n: &NodeInfo) -> Result<(), String> {
        // A cordoned node takes only pods that tolerate its unschedulable taint (Kubernetes'
        // NodeUnschedulable plugin).
        let cordon = Taint::new(TAINT_UNSCHEDULABLE, TaintEffect::NoSchedule);
        if n.node.spec.unschedulable == Some(true)
            && !pod.spec.tolerations.iter().any(|t| t.tolerates(&cordon))
        {
            return Err("node(s) were unschedulable".into());
        }
        if !n.node.is_ready() {
            return Err("node(s) were not ready".into());
        }
        Ok(())
    }
}

/// The pod's `nodeSelector` holds for the node.
fn node_selector_matches(pod: &Pod, node: &Node) -> bool {
    let (name, labels) = (&node.metadata.name, &node.metadata.labels);
    pod.spec
        .node_selector
        .iter()
        .all(|(k, v)| node_label(name, labels, k) == Some(v.as_str()))
}

/// The pod's required node affinity (if any) holds for the node.
fn required_affinity_matches(pod: &Pod, node: &Node) -> bool {
    pod.spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_none_or(|req| req.matches(&node.metadata.name, &node.metadata.labels))
}

/// Both the `nodeSelector` and the required node affinity hold (the nodes whose topology
/// domains a spread constraint counts).
pub fn node_matches_selectors(pod: &Pod, node: &Node) -> bool {
    node_selector_matches(pod, node) && required_affinity_matches(pod, node)
}

pub struct NodeSelector;
impl Filter for NodeSelector {
    fn name(&self) -> &'static str {
        "NodeSelector"
    }
    fn filter(&self, pod: &Pod, _: &Requests, n: &NodeInfo) -> Result<(), String> {
        if !node_selector_matches(pod, &n.node) {
            return Err("node(s) didn't match Pod's node selector".into());
        }
        Ok(())
    }
}

/// `affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution` (the preferred
/// terms are scored in `spread`, normalized over the nodes).
pub struct NodeAffinity;
impl Filter for NodeAffinity {
    fn name(&self) -> &'static str {
        "NodeAffinity"
    }
    fn filter(&self, pod: &Pod, _: &Requests, n: &NodeInfo) -> Result<(), String> {
        if !required_affinity_matches(pod, &n.node) {
            return Err("node(s) didn't match Pod's node affinity".into());
        }
        Ok(())
    }
}

/// WASM images need the `wasm` runtime, OCI images the `oci` runtime.
pub struct NodeRuntime;
impl Filter for NodeRuntime {
    fn name(&self) -> &'static str {
        "NodeRuntime"
    }
    fn filter(&self, pod: &Pod, _: &Requests, n: &NodeInfo) -> Result<(), String> {
        let rts = n.runtimes();
        let needs_oci = pod
            .spec
            .containers
            .iter()
            .chain(pod.spec.init_containers.iter())
            .any(|c| !c.is_wasm() && !c.image.starts_with("builtin/"));
        let needs_wasm = pod
            .spec
            .containers
            .iter()
            .chain(pod.spec.init_containers.iter())
            .any(|c| c.is_wasm());
        if needs_oci && !rts.iter().any(|r| r == "oci") {
            return Err("node(s) cannot run OCI containers (no Docker)".into());
        }
        if needs_wasm && !rts.iter().any(|r| r == "wasm") {
            return Err("node(s) cannot run WASM modules".into());
        }
        Ok(())
    }
}

/// A node's `NoSchedule` and `NoExecute` taints keep off the pods that do not tolerate them.
pub struct TaintToleration;
impl Filter for TaintToleration {
    fn name(&self) -> &'static str {
        "TaintToleration"
    }
    fn filter(&self, pod: &Pod, _: &Requests, n: &NodeInfo) -> Result<(), String> {
        let tols = &pod.spec.tolerations;
        let taints = &n.node.spec.taints;
        let first = untolerated(taints, tols, TaintEffect::NoSchedule)
            .chain(untolerated(taints, tols, TaintEffect::NoExecute))
            // Cordoning is NodeReady's to report.
            .find(|t| t.key != TAINT_UNSCHEDULABLE);
        match first {
            Some(t) => {
                let v = t
                    .value
                    .as_deref()
                    .map(|v| format!("={v}"))
                    .unwrap_or_default();
                Err(format!(
                    "node(s) had untolerated taint {{{}{v}: {:?}}}",
                    t.key, t.effect
                ))
            }
            None => Ok(()),
        }
    }
}

/// A node with `PreferNoSchedule` taints the pod does not tolerate ranks below every node
/// without.
pub struct TaintPreference;
impl Score for TaintPreference {
    fn score(&self, pod: &Pod, _: &Requests, n: &NodeInfo) -> i64 {
        let bad = untolerated(
            &n.node.spec.taints,
            &pod.spec.tolerations,
            TaintEffect::PreferNoSchedule,
        )
        .count();
        if bad == 0 {
            200
        } else {
            0
        }
    }
}

/// Prefer the node holding fewer pods, so replicas spread over the nodes (the scheduler
/// counts the pods it has just placed too).
pub struct FewestPods;
impl Score for FewestPods {
    fn score(&self, _: &Pod, _: &Requests, n: &NodeInfo) -> i64 {
        100 / (1 + n.pods as i64)
    }
}

pub struct NodeResourcesFit;
impl Filter for NodeResourcesFit {
    fn name(&self) -> &'static str {
        "NodeResourcesFit"
    }
    fn filter(&self, _: &Pod, req: &Requests, n: &NodeInfo) -> Result<(), String> {
        let (cpu, mem, pods) = n.allocatable();
        if n.pods + 1 > pods {
            return Err("Too many pods".into());
        }
        if req.cpu_millis > 0 && n.requested.cpu_millis + req.cpu_millis > cpu {
            return Err("Insufficient cpu".into());
        }
        if req.memory_bytes > 0 && n.requested.memory_bytes + req.memory_bytes > mem {
            return Err("Insufficient memory".into());
        }
        Ok(())
    }
}

/// Prefer the node with the most room left (spreads load).
pub struct LeastAllocated;
impl Score for LeastAllocated {
    fn score(&self, _: &Pod, req: &Requests, n: &NodeInfo) -> i64 {
        let (cpu, mem, _) = n.allocatable();
        let free = |total: u64, used: u64| -> i64 {
            if total == 0 {
                return 0;
            }
            ((total.saturating_sub(used) as f64 / total as f64) * 100.0) as i64
        };
        (free(cpu, n.requested.cpu_millis + req.cpu_millis)
            + free(mem, n.requested.memory_bytes + req.memory_bytes))
            / 2
    }
}

/// The default pipeline.
pub fn default_filters() -> Vec<Box<dyn Filter>> {
    vec![
        Box::new(NodeReady),
        Box::new(NodeSelector),
        Box::new(NodeAffinity),
        Box::new(TaintToleration),
        Box::new(NodeRuntime),
        Box::new(NodeResourcesFit),
    ]
}

pub fn default_scores() -> Vec<Box<dyn Score>> {
    vec![
        Box::new(LeastAllocated),
        Box::new(FewestPods),
        Box::new(TaintPreference),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::node::{NodeCondition, NodeInfo as NI, NodeStatus};
    use crate::model::pod::{Container, Quantity, Resources};

    fn node(mem: &str, runtimes: &[&str]) -> NodeInfo {
        let mut n = Node::default();
        n.metadata.name = "n1".into();
        let mut alloc = std::collections::BTreeMap::new();
        alloc.insert("cpu".into(), "2000m".into());
        alloc.insert("memory".into(), mem.into());
        alloc.insert("pods".into(), "10".into());
        n.status = Some(NodeStatus {
            allocatable: alloc.clone(),
            capacity: alloc,
            conditions: vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }],
            node_info: Some(NI {
                runtimes: runtimes.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        });
        NodeInfo {
            node: std::sync::Arc::new(n),
            requested: Requests::default(),
            pods: 0,
        }
    }

    fn pod(image: &str, mem: &str) -> Pod {
        let mut p = Pod::default();
        let mut r = Resources::default();
        r.requests
            .insert("memory".into(), Quantity::Str(mem.into()));
        p.spec.containers.push(Container {
            name: "c".into(),
            image: image.into(),
            resources: Some(r),
            ..Default::default()
        });
        p
    }

    #[test]
    fn resources_fit_and_runtime() {
        let n = node("1Gi", &["wasm"]);
        let p = pod("a.wasm", "512Mi");
        let req = Requests::of(&p);
        assert!(NodeResourcesFit.filter(&p, &req, &n).is_ok());
        let big = pod("a.wasm", "2Gi");
        assert_eq!(
            NodeResourcesFit.filter(&big, &Requests::of(&big), &n),
            Err("Insufficient memory".into())
        );
        let oci = pod("busybox", "1Mi");
        assert!(NodeRuntime.filter(&oci, &req, &n).is_err());
        assert!(NodeRuntime.filter(&p, &req, &n).is_ok());
    }

    #[test]
    fn taints_filter_and_rank() {
        use crate::model::taint::{Toleration, TolerationOperator};
        let mut n = node("1Gi", &["wasm"]);
        std::sync::Arc::make_mut(&mut n.node)
            .spec
            .taints
            .push(Taint::parse("dedicated=gpu:NoSchedule").unwrap());
        let mut p = pod("a.wasm", "1Mi");
        let r = Requests::of(&p);
        let e = TaintToleration.filter(&p, &r, &n).unwrap_err();
        assert!(e.contains("dedicated=gpu"), "{e}");
        p.spec.tolerations.push(Toleration {
            key: Some("dedicated".into()),
            operator: Some(TolerationOperator::Equal),
            value: Some("gpu".into()),
            ..Default::default()
        });
        assert!(TaintToleration.filter(&p, &r, &n).is_ok());
        // PreferNoSchedule never filters; it ranks.
        let mut soft = node("1Gi", &["wasm"]);
        std::sync::Arc::make_mut(&mut soft.node)
            .spec
            .taints
            .push(Taint::parse("slow:PreferNoSchedule").unwrap());
        let plain = pod("a.wasm", "1Mi");
        assert!(TaintToleration.filter(&plain, &r, &soft).is_ok());
        assert!(TaintPreference.score(&plain, &r, &soft) < TaintPreference.score(&plain, &r, &n));
        // Cordoned: refused unless tolerated.
        let mut c = node("1Gi", &["wasm"]);
        std::sync::Arc::make_mut(&mut c.node).spec.unschedulable = Some(true);
        assert!(NodeReady.filter(&plain, &r, &c).is_err());
        let mut tolerant = pod("a.wasm", "1Mi");
        tolerant.spec.tolerations.push(Toleration {
            operator: Some(TolerationOperator::Exists),
            ..Default::default()
        });
        assert!(NodeReady.filter(&tolerant, &r, &c).is_ok());
    }

    #[test]
    fn least_allocated_prefers_emptier() {
        let a = node("1Gi", &["wasm"]);
        let mut b = node("1Gi", &["wasm"]);
        b.requested.memory_bytes = 512 << 20;
        let p = pod("a.wasm", "1Mi");
        let r = Requests::of(&p);
        assert!(LeastAllocated.score(&p, &r, &a) > LeastAllocated.score(&p, &r, &b));
    }
}
