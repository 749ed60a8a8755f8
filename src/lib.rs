//! # Kapsel — a pod runtime and orchestrator
//!
//! WebAssembly modules (in-process, wasmtime) and OCI containers in one pod, with an embedded
//! control plane. A manifest flows: CLI → [`api`] → [`store`] → [`sched`] binds it to a node →
//! [`runtime`]'s node agent runs it → status flows back through the store.
//!
//! ## Layout
//! - [`model`]: the Kubernetes-shaped object types (Pod, Node, Event, Deployment, ReplicaSet),
//!   quantities, validation.
//! - [`store`]: the `Store` trait (revisions, compare-and-swap, watch) and its embedded redb
//!   backend with group commit; watch history per kind, bounded by count and bytes.
//! - [`api`]: the axum HTTP API — one file per resource kind, errors mapped to `Status` once;
//!   `api::guard` (Host / Origin / content-type checks against cross-site requests) and
//!   `api::listener` (accept loop with a connection cap and a header-read timeout);
//!   `api::podwatch` (pod events routed to the watches of the node they are bound to).
//! - [`sched`]: the scheduler and its filter/score plugin pipeline; the controller manager
//!   (watch → de-duplicating work queue → workers) with the Deployment (rolling update,
//!   recreate, canary, progress deadline, rollback) and ReplicaSet reconcilers.
//! - [`runtime`]: the node agent, pod workers, the executor trait, the WASM executor (with
//!   `runtime::wasm::limits`: one memory budget per guest), logs, volumes (subPaths opened
//!   beneath their volume and bind-mounted from the handle; emptyDir size limits), restart
//!   back-off.
//! - [`client`]: the seam between the node and the objects (get / create / replace /
//!   replace-status / delete / watch with a field selector); `client::local` is the in-process
//!   backend the embedded node uses. Nothing in [`runtime`] touches the store.
//! - [`events`]: the event recorder used by the scheduler and the node agent.
//! - [`modules`]: content-addressed WASM modules (`sha256:<hex>`): the server's module store,
//!   verified streaming writes, the `modules.kapsel.io/<container>` pod annotation.
//! - [`pki`]: the cluster CA, join tokens (`K10<CA sha256>::<id>.<secret>`), node-name
//!   bindings, TLS configurations, and the agent's side of joining.
//! - [`server`]: `kapsel serve` — wires the parts together, owns startup and shutdown.
//! - [`cli`]: the `kapsel` command line (client commands, manifests, tables, `up`).
//! - [`patterns`]: built-in pattern components run natively in a pod's sandbox: git-sync
//!   (the sidecar, `patterns::gitsync`) and the Redis ambassador (`patterns::redis`: RESP
//!   framing, command table, topology and Sentinel, sessions, multiplexed upstreams, TLS
//!   upstream connections) and the metrics adapter (`patterns::adapter`: StatsD with
//!   statsd_exporter mapping files, JSON / Prometheus / file sources, the registry). One flag
//!   parser for all three (`patterns::flags`, clap with the container's env), and one registry
//!   of their live status for `kapsel describe pod`.

pub mod api;
pub mod cli;
pub mod client;
pub mod events;
pub mod model;
pub mod modules;
pub mod patterns;
pub mod pki;
pub mod runtime;
pub mod sched;
pub mod server;
pub mod store;
