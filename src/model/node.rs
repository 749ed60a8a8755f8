//! The `v1 Node` kind: a machine that runs pods, its capacity and whether it is ready.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::meta::ObjectMeta;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NodeSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unschedulable: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<super::taint::Taint>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeStatus {
    /// `cpu` (cores), `memory` (bytes, as a quantity), `pods`.
    #[serde(default)]
    pub capacity: BTreeMap<String, String>,
    #[serde(default)]
    pub allocatable: BTreeMap<String, String>,
    #[serde(default)]
    pub conditions: Vec<NodeCondition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_info: Option<NodeInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub type_: String,
    pub address: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeInfo {
    #[serde(default)]
    pub kubelet_version: String,
    #[serde(default)]
    pub container_runtime_version: String,
    #[serde(default)]
    pub operating_system: String,
    #[serde(default)]
    pub architecture: String,
    /// Runtimes this node runs: `wasm`, and `oci` when Docker is reachable.
    #[serde(default)]
    pub runtimes: Vec<String>,
}

impl Node {
    /// The `Ready` condition, if the node has one.
    pub fn ready_condition(&self) -> Option<&NodeCondition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
    }

    /// `Ready`, `NotReady` (also when unknown), with `,SchedulingDisabled` when cordoned: the
    /// STATUS column of `get nodes`.
    pub fn status_text(&self) -> String {
        let mut s = if self.is_ready() { "Ready" } else { "NotReady" }.to_string();
        if self.spec.unschedulable == Some(true) {
            s.push_str(",SchedulingDisabled");
        }
        s
    }

    pub fn is_ready(&self) -> bool {
        self.status
            .as_ref()
            .map(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
            .unwrap_or(false)
    }
}

/// Set on a node that runs no OCI containers (no Docker): OCI pods are never bound to it.
pub const LABEL_WASM_ONLY: &str = "kapsel.io/wasm-only";

/// Labels under `kubernetes.io`/`k8s.io` a node may set on itself (Kubernetes' kubelet
/// label allow-list, as the NodeRestriction admission plugin enforces it).
const NODE_SETTABLE: &[&str] = &[
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "node.kubernetes.io/instance-type",
];

/// May a node set the label `key` on its own Node? Not under `node-restriction.kubernetes.io/`
/// (reserved for administrators, so they can steer workloads to nodes that cannot label
/// themselves), nor under `kubernetes.io/` or `k8s.io/` (and their subdomains) except the
/// well-known ones and the `kubelet.kubernetes.io/` and `node.kubernetes.io/` prefixes.
pub fn node_may_set_label(key: &str) -> Result<(), String> {
    let Some((prefix, _)) = key.split_once('/') else {
        return Ok(());
    };
    if prefix == "node-restriction.kubernetes.io" {
        return Err(format!(
            "label {key:?}: the node-restriction.kubernetes.io/ prefix is reserved for administrators"
        ));
    }
    let restricted = ["kubernetes.io", "k8s.io"]
        .iter()
        .any(|d| prefix == *d || prefix.ends_with(&format!(".{d}")));
    if !restricted
        || NODE_SETTABLE.contains(&key)
        || prefix == "kubelet.kubernetes.io"
        || prefix == "node.kubernetes.io"
    {
        return Ok(());
    }
    Err(format!(
        "label {key:?}: a node may not set labels under kubernetes.io/ or k8s.io/ other than the well-known ones ({})",
        NODE_SETTABLE.join(", ")
    ))
}

/// Kubernetes' names for this machine's OS and architecture (Go's `GOOS`/`GOARCH`).
pub fn this_os_arch() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        a => a,
    };
    (std::env::consts::OS, arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_settable_labels() {
        for ok in [
            "app",
            "example.com/zone",
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
            "node.kubernetes.io/exclude-from-external-load-balancers",
            "kubelet.kubernetes.io/x",
            "kapsel.io/wasm-only",
        ] {
            assert!(node_may_set_label(ok).is_ok(), "{ok}");
        }
        for bad in [
            "node-restriction.kubernetes.io/trusted",
            "kubernetes.io/role",
            "k8s.io/x",
            "foo.kubernetes.io/x",
            "node-role.kubernetes.io/control-plane",
        ] {
            assert!(node_may_set_label(bad).is_err(), "{bad}");
        }
    }
}
