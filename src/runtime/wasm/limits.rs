//! Per-instance resource limits: a memory cap that turns into `OOMKilled`, and table caps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use wasmtime::ResourceLimiter;

use crate::model::quantity::format_bytes;

/// Limits one guest. `oom_at` records the size a growth was refused at (0 = never).
pub struct GuestLimits {
    pub memory_limit: Option<u64>,
    pub oom_at: Arc<AtomicU64>,
}

/// The error a refused growth traps with; recognised when classifying the exit.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} exceeded: the guest tried to grow a linear memory to {desired}")]
pub struct MemoryLimitExceeded {
    pub limit: String,
    pub desired: String,
}

impl ResourceLimiter for GuestLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let _ = current;
        if let Some(limit) = self.memory_limit {
            if desired as u64 > limit {
                self.oom_at.store(desired as u64, Ordering::SeqCst);
                return Err(MemoryLimitExceeded {
                    limit: format_bytes(limit),
                    desired: format_bytes(desired as u64),
                }
                .into());
            }
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 10_000_000)
    }
}
