//! The node side: the node agent that reconciles pods bound to this node, pod workers, the
//! executor trait and its WASM implementation, logs, volumes and restart back-off.

pub mod agent;
pub mod backoff;
pub mod executor;
pub mod logs;
pub mod volumes;
pub mod wasm;
pub mod worker;
