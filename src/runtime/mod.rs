//! The node side: the node agent that reconciles pods bound to this node, pod workers, the
//! executor trait with its WASM and Docker implementations, the pod sandbox (network
//! namespaces), logs, volumes, restart back-off and container probes.

pub mod agent;
pub mod backoff;
pub mod docker;
pub mod executor;
pub mod logs;
pub mod probe;
pub mod sandbox;
pub mod volumes;
pub mod wasm;
pub mod worker;
