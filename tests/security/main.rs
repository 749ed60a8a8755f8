//! Security and robustness tests (issue 12): each module performs an attack or an abuse as a
//! pod, a web page or a careless user would, against a real `kapsel serve`, and shows it fails.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod churn;
mod controlplane;
mod fs;
mod gitsync;
mod wasm;
