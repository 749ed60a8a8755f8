//! Per-guest resource limits: one memory budget for the whole guest (every linear memory and
//! every table of every core instance in its store), which turns into `OOMKilled`, and caps on
//! how many instances, memories and tables a guest may create.
//!
//! A guest is one wasmtime `Store`: a core module's single instance, or all the core instances
//! of a component. wasmtime asks the store's [`ResourceLimiter`] before it creates a memory or
//! a table (`current` = 0, `desired` = the declared minimum, for the pooling and the on-demand
//! allocator alike) and before every growth, so keeping a running total here sees all of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use wasmtime::ResourceLimiter;

use crate::model::quantity::format_bytes;

/// Bytes charged per table element, whatever the element type. wasmtime stores a `funcref`
/// as one pointer (8 bytes) and a continuation reference as two (16 bytes); the limiter is not
/// told the type, so every element is charged the larger size and no table kind is undercounted.
pub const TABLE_ELEMENT_BYTES: u64 = 16;

/// Largest table of a guest without a memory limit (its budget governs otherwise).
pub const MAX_TABLE_ELEMENTS_UNLIMITED: usize = 10_000_000;

/// Most core instances one guest's store may create (a component's core modules, shims and
/// adapters included; componentize-py components use about a dozen).
pub const MAX_INSTANCES: usize = 256;
/// Most linear memories per guest (multi-memory modules and components' several core modules).
pub const MAX_MEMORIES: usize = 32;
/// Most tables per guest.
pub const MAX_TABLES: usize = 256;

/// Limits one guest. `oom_at` records the total a growth was refused at (0 = never).
pub struct GuestLimits {
    /// The budget for all linear memories and tables of the guest, in bytes (None: unlimited).
    pub memory_limit: Option<u64>,
    pub oom_at: Arc<AtomicU64>,
    /// Bytes granted so far: linear memories at their byte size plus tables at
    /// [`TABLE_ELEMENT_BYTES`] per element.
    used: u64,
}

impl GuestLimits {
    pub fn new(memory_limit: Option<u64>, oom_at: Arc<AtomicU64>) -> Self {
        GuestLimits {
            memory_limit,
            oom_at,
            used: 0,
        }
    }

    /// Bytes the guest's memories and tables take now.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Grant `extra` bytes or trap with [`MemoryLimitExceeded`].
    fn charge(&mut self, extra: u64, what: &'static str, desired: String) -> wasmtime::Result<()> {
        let total = self.used.saturating_add(extra);
        if let Some(limit) = self.memory_limit {
            if total > limit {
                self.oom_at.store(total, Ordering::SeqCst);
                return Err(MemoryLimitExceeded {
                    limit: format_bytes(limit),
                    total: format_bytes(total),
                    what,
                    desired,
                }
                .into());
            }
        }
        self.used = total;
        Ok(())
    }
}

/// The error a refused growth traps with; recognised when classifying the exit.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} exceeded: the guest's linear memories and tables would total {total} (growing a {what} to {desired})")]
pub struct MemoryLimitExceeded {
    pub limit: String,
    pub total: String,
    pub what: &'static str,
    pub desired: String,
}

// A growth wasmtime refuses after the limiter allowed it (an mmap failure) stays counted: the
// limiter is not told which growth failed, so it errs on the side of the budget. Growth beyond
// a memory's or table's declared maximum is refused here, uncounted, as wasm requires
// (`memory.grow` / `table.grow` return -1).
impl ResourceLimiter for GuestLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        let extra = (desired as u64).saturating_sub(current as u64);
        self.charge(extra, "linear memory", format_bytes(desired as u64))?;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|m| desired > m)
            || (self.memory_limit.is_none() && desired > MAX_TABLE_ELEMENTS_UNLIMITED)
        {
            return Ok(false);
        }
        let extra = (desired as u64)
            .saturating_sub(current as u64)
            .saturating_mul(TABLE_ELEMENT_BYTES);
        self.charge(extra, "table", format!("{desired} elements"))?;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        tracing::debug!(error = %error, used = self.used, "a guest's linear memory could not grow");
        Ok(())
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        tracing::debug!(error = %error, used = self.used, "a guest's table could not grow");
        Ok(())
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(limit: Option<u64>) -> GuestLimits {
        GuestLimits::new(limit, Arc::new(AtomicU64::new(0)))
    }

    #[test]
    fn memories_and_tables_share_one_budget() {
        let mut l = limits(Some(100 << 20));
        // Two memories created (current 0) and grown: the sum counts, not each one.
        assert!(l.memory_growing(0, 40 << 20, None).unwrap());
        assert!(l.memory_growing(0, 40 << 20, None).unwrap());
        assert_eq!(l.used(), 80 << 20);
        assert!(l.memory_growing(40 << 20, 50 << 20, None).unwrap());
        assert_eq!(l.used(), 90 << 20);
        // A table of 1 Mi elements is 16 MiB: over the budget.
        let e = l.table_growing(0, 1 << 20, None).unwrap_err();
        assert!(e.downcast_ref::<MemoryLimitExceeded>().is_some());
        assert_eq!(l.oom_at.load(Ordering::SeqCst), (90 << 20) + (16 << 20));
        assert_eq!(l.used(), 90 << 20, "a refused growth is not counted");
        assert!(l.table_growing(0, 1000, None).unwrap());
        assert_eq!(l.used(), (90 << 20) + 16_000);
        let e = l.memory_growing(50 << 20, 61 << 20, None).unwrap_err();
        assert!(e.to_string().contains("limit of 100Mi"), "{e}");
    }

    #[test]
    fn growth_past_the_declared_maximum_fails_uncounted() {
        let mut l = limits(Some(1 << 20));
        assert!(!l.memory_growing(0, 2 << 20, Some(1 << 16)).unwrap());
        assert!(!l.table_growing(0, 10, Some(5)).unwrap());
        assert_eq!(l.used(), 0);
        assert_eq!(l.oom_at.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn without_a_limit_only_counts() {
        let mut l = limits(None);
        assert!(l.memory_growing(0, 3 << 30, None).unwrap());
        assert!(l.table_growing(0, 10_000_000, None).unwrap());
        assert_eq!(l.used(), (3 << 30) + 160_000_000);
        assert!(!l.table_growing(10_000_000, 10_000_001, None).unwrap());
    }
}
