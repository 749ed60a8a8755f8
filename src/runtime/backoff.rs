//! Kubernetes-style restart back-off: 10 s doubling to 5 min, reset after 10 min of running.
//! The numbers are configurable (tests use milliseconds).

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct BackoffConfig {
    pub initial: Duration,
    pub max: Duration,
    /// A run at least this long resets the back-off.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

/// Back-off state of one container.
#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: BackoffConfig,
    next: Duration,
}

impl Backoff {
    pub fn new(cfg: BackoffConfig) -> Self {
        Backoff {
            cfg,
            next: cfg.initial,
        }
    }

    /// The delay before the next restart, given how long the last run lasted.
    pub fn next_delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.cfg.reset_after {
            self.next = self.cfg.initial;
        }
        let d = self.next.min(self.cfg.max);
        self.next = (self.next * 2).min(self.cfg.max);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets() {
        let mut b = Backoff::new(BackoffConfig::default());
        let short = Duration::from_secs(1);
        let got: Vec<u64> = (0..7).map(|_| b.next_delay(short).as_secs()).collect();
        assert_eq!(got, vec![10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(b.next_delay(Duration::from_secs(601)).as_secs(), 10);
        assert_eq!(b.next_delay(short).as_secs(), 20);
    }
}
