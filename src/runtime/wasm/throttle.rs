//! CPU limits by time slicing. Guests yield to the executor at every epoch tick; this wrapper
//! measures how long each poll of the guest ran and, once the guest used its quota of the
//! current period (`limits.cpu` × 100 ms, as CFS does), parks it until the period ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

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
    }
}

impl<F> Throttled<F> {
    pub fn new(inner: F, millicpu: Option<u64>) -> Self {
        Throttled {
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
        let Some(quota) = *this.quota else {
            return this.inner.poll(cx);
        };
        let start = Instant::now();
        if start.duration_since(*this.period_start) >= PERIOD {
            *this.period_start = start;
            *this.used = Duration::ZERO;
        }
        let out = this.inner.poll(cx);
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
