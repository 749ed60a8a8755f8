//! The object model: Kubernetes-shaped kinds (Pod, Node, Event, Deployment, ReplicaSet, Lease), their quantities and validation.
//! Types are strict (`deny_unknown_fields`) so a typo in a manifest is an error naming the field.

pub mod affinity;
pub mod deployment;
pub mod event;
pub mod lease;
pub mod meta;
pub mod node;
pub mod pod;
pub mod quantity;
pub mod taint;
pub mod validate;

pub use deployment::{Deployment, ReplicaSet};
pub use event::{Event, ObjectReference};
pub use lease::Lease;
pub use meta::{ObjectMeta, TypeMeta};
pub use node::Node;
pub use pod::{Container, ContainerState, ContainerStatus, Pod, PodPhase, PodStatus};

/// The kinds the API serves, with their REST resource names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Node,
    Event,
    Deployment,
    ReplicaSet,
    Lease,
}

impl Kind {
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Node => "nodes",
            Kind::Event => "events",
            Kind::Deployment => "deployments",
            Kind::ReplicaSet => "replicasets",
            Kind::Lease => "leases",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Node => "Node",
            Kind::Event => "Event",
            Kind::Deployment => "Deployment",
            Kind::ReplicaSet => "ReplicaSet",
            Kind::Lease => "Lease",
        }
    }
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }
    pub fn from_resource(s: &str) -> Option<Kind> {
        match s {
            "pods" | "pod" | "po" => Some(Kind::Pod),
            "nodes" | "node" | "no" => Some(Kind::Node),
            "events" | "event" | "ev" => Some(Kind::Event),
            "deployments" | "deployment" | "deploy" => Some(Kind::Deployment),
            "replicasets" | "replicaset" | "rs" => Some(Kind::ReplicaSet),
            "leases" | "lease" => Some(Kind::Lease),
            _ => None,
        }
    }
    pub const ALL: [Kind; 6] = [
        Kind::Pod,
        Kind::Node,
        Kind::Event,
        Kind::Deployment,
        Kind::ReplicaSet,
        Kind::Lease,
    ];
    /// `v1` or `apps/v1`.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Deployment | Kind::ReplicaSet => "apps/v1",
            Kind::Lease => "coordination.k8s.io/v1",
            _ => "v1",
        }
    }
}
