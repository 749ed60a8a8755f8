//! The `coordination.k8s.io/v1 Lease` kind: a small object a node renews as its heartbeat
//! (one per node, in the `kube-node-lease` namespace, named after the node), so the control
//! plane can tell a live node from a silent one without rewriting the whole Node.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::meta::ObjectMeta;

/// The namespace of node heartbeats, as in Kubernetes.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Lease {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: LeaseSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_transitions: Option<i64>,
}

impl Lease {
    /// A node's Lease, held by the node, renewed now.
    pub fn for_node(node: &str, duration_seconds: i64) -> Lease {
        let now = Utc::now();
        Lease {
            api_version: "coordination.k8s.io/v1".into(),
            kind: "Lease".into(),
            metadata: ObjectMeta {
                name: node.to_string(),
                namespace: Some(NODE_LEASE_NAMESPACE.into()),
                ..Default::default()
            },
            spec: LeaseSpec {
                holder_identity: Some(node.to_string()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(now),
                renew_time: Some(now),
                lease_transitions: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_and_round_trips() {
        let l = Lease::for_node("n1", 40);
        let v = serde_json::to_value(&l).unwrap();
        assert_eq!(v["spec"]["holderIdentity"], "n1");
        assert_eq!(v["metadata"]["namespace"], "kube-node-lease");
        let back: Lease = serde_json::from_value(v).unwrap();
        assert_eq!(back, l);
        let bad = serde_json::json!({"spec": {"holder": "x"}});
        let e = serde_json::from_value::<Lease>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holder"), "{e}");
    }
}
