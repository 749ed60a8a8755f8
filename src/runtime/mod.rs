//! The node side: the node agent that reconciles pods bound to this node, pod workers, the
//! executor trait with its WASM and Docker implementations, the pod sandbox (network
//! namespaces), logs, volumes, restart back-off and container probes; the node API (logs,
//! adapter metrics, built-in status, exec) and the agent's tunnel that carries it to the API
//! server.

pub mod agent;
pub mod backoff;
pub mod docker;
pub mod executor;
pub mod logs;
pub mod nodeapi;
pub mod probe;
pub mod residency;
pub mod sandbox;
pub mod tunnel;
pub mod volumes;
pub mod wasm;
pub mod worker;
