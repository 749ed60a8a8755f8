//! CPU limits by time slicing. Guests yield to the executor at every epoch tick; this wrapper
//! measures how long each poll of the guest ran and, once the guest used its quota of the
//! current period (`limits.cpu` × 100 ms, as CFS does), parks it until the period ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::time::Sleep;

/// Drives the engines' epoch, but only while some guest is executing: an idle node (even one
/// full of guests blocked in sleep) costs no wake-ups.
pub struct EpochTicker {
    executing: AtomicUsize,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl EpochTicker {
    /// Start the ticker thread; it increments every engine's epoch each `tick` while needed.
    pub fn start(
        engines: Vec<wasmtime::Engine>,
        tick: Duration,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::io::Result<Arc<Self>> {
        let t = Arc::new(EpochTicker {
            executing: AtomicUsize::new(0),
            thread: std::sync::OnceLock::new(),
        });
        let me = t.clone();
        let handle = std::thread::Builder::new()
            .name("kapsel-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if me.executing.load(Ordering::Acquire) == 0 {
                        std::thread::park_timeout(Duration::from_secs(1));
                        continue;
                    }
                    std::thread::sleep(tick);
                    for e in &engines {
                        e.increment_epoch();
                    }
                }
            })?;
        let _ = t.thread.set(handle.thread().clone());
        Ok(t)
    }

    fn enter(&self) {
        if self.executing.fetch_add(1, Ordering::AcqRel) == 0 {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
    }

    fn exit(&self) {
        self.executing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The accounting period (the CFS default).
pub const PERIOD: Duration = Duration::from_millis(100);

pin_project_lite::pin_project! {
    /// A guest future limited to `millicpu`/1000 of one CPU.
    pub struct Throttled<F> {
        #[pin]
        inner: F,
        quota: Option<Duration>,
        period_start: Instant,
        used: Duration,
        #[pin]
        parked: Option<Sleep>,
        ticker: Arc<EpochTicker>,
    }
}

impl<F> Throttled<F> {
    pub fn new(inner: F, millicpu: Option<u64>, ticker: Arc<EpochTicker>) -> Self {
        Throttled {
            ticker,
            inner,
            quota: millicpu.map(|m| PERIOD.mul_f64(m as f64 / 1000.0)),
            period_start: Instant::now(),
            used: Duration::ZERO,
            parked: None,
        }
    }
}

impl<F: Future> Future for Throttled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        if let Some(sleep) = this.parked.as_mut().as_pin_mut() {
            if sleep.poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.parked.set(None);
        }
        let ticker = this.ticker.clone();
        let Some(quota) = *this.quota else {
            ticker.enter();
            let out = this.inner.poll(cx);
            ticker.exit();
            return out;
        };
        let start = Instant::now();
        if start.duration_since(*this.period_start) >= PERIOD {
            *this.period_start = start;
            *this.used = Duration::ZERO;
        }
        ticker.enter();
        let out = this.inner.poll(cx);
        ticker.exit();
        *this.used += start.elapsed();
        if out.is_pending() && *this.used >= quota {
            let resume = *this.period_start + PERIOD;
            // Carry over overuse into the next period so the long-run share is right.
            *this.used -= quota;
            *this.period_start = resume;
            this.parked.set(Some(tokio::time::sleep_until(
                tokio::time::Instant::from_std(resume),
            )));
            if let Some(sleep) = this.parked.as_mut().as_pin_mut() {
                let _ = sleep.poll(cx);
            }
        }
        out
    }
}
