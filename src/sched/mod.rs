//! Scheduling and controllers: the scheduler and its filter/score pipeline; the controller
//! manager (watch → de-duplicating work queue → bounded workers) with the Deployment and
//! ReplicaSet reconcilers; the node lifecycle controller (heartbeats, taints, evictions).

pub mod controllers;
pub mod deployment;
pub mod nodelifecycle;
pub mod plugins;
pub mod replicaset;
pub mod scheduler;
pub mod spread;
pub mod view;
pub mod workqueue;
