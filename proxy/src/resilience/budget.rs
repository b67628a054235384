//! The retry budget: retries may add at most a ratio of the requests, plus
//! a small floor per second, over a sliding window (as Linkerd's budget,
//! and unlike Envoy's, on by default). A retry is counted the moment it is
//! scheduled, before its backoff: retries waiting to be sent cannot escape
//! the count, so a failing upstream never sees a retry storm however many
//! requests fail at once.
//!
//! The window is ten buckets; each request deposits into the current one
//! and each retry withdraws. Kept per cluster, so every route to a cluster
//! draws on one budget, and it survives configuration changes.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Buckets in a window.
const BUCKETS: usize = 10;

/// One cluster's budget.
#[derive(Debug, Default)]
pub(crate) struct RetryBudget {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    /// Requests and retries per bucket.
    requests: [u64; BUCKETS],
    retries: [u64; BUCKETS],
    /// The bucket now written, and when it started.
    current: usize,
    started: Option<Instant>,
    /// The window the buckets were sized for.
    window: Duration,
}

impl Ring {
    /// Moves to the bucket of `now`, clearing those passed over.
    fn advance(&mut self, now: Instant, window: Duration) {
        let width = window / BUCKETS as u32;
        if self.window != window || width.is_zero() {
            // A new window (or the first use): start over.
            *self = Ring {
                window,
                started: Some(now),
                ..Ring::default()
            };
            return;
        }
        let Some(started) = self.started else {
            self.started = Some(now);
            return;
        };
        let passed = now.saturating_duration_since(started).as_nanos() / width.as_nanos();
        if passed == 0 {
            return;
        }
        let steps = usize::try_from(passed).unwrap_or(usize::MAX).min(BUCKETS);
        for _ in 0..steps {
            self.current = (self.current + 1) % BUCKETS;
            self.requests[self.current] = 0;
            self.retries[self.current] = 0;
        }
        let advanced = u32::try_from(passed).unwrap_or(u32::MAX);
        self.started = Some(started + width.saturating_mul(advanced));
        if steps == BUCKETS {
            self.started = Some(now);
        }
    }
}

impl RetryBudget {
    /// Counts a request.
    pub(crate) fn deposit(&self, now: Instant, window: Duration) {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.advance(now, window);
        let current = ring.current;
        ring.requests[current] += 1;
    }

    /// Takes one retry out of the budget, if it allows one: retries in the
    /// window stay within `ratio` of the requests plus `min_per_second`
    /// per second of the window.
    pub(crate) fn try_withdraw(
        &self,
        now: Instant,
        window: Duration,
        ratio: f64,
        min_per_second: u32,
    ) -> bool {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.advance(now, window);
        let requests: u64 = ring.requests.iter().sum();
        let retries: u64 = ring.retries.iter().sum();
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let allowed = (requests as f64 * ratio) as u64
            + (f64::from(min_per_second) * window.as_secs_f64()) as u64;
        if retries < allowed {
            let current = ring.current;
            ring.retries[current] += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    #[test]
    fn retries_stay_within_the_ratio_plus_the_floor() {
        let budget = RetryBudget::default();
        let now = Instant::now();
        for _ in 0..1000 {
            budget.deposit(now, WINDOW);
        }
        // 20 % of 1000, plus 1 per second over 10 s.
        let granted = (0..1000)
            .filter(|_| budget.try_withdraw(now, WINDOW, 0.2, 1))
            .count();
        assert_eq!(granted, 210);
    }

    #[test]
    fn the_floor_lets_a_quiet_service_retry() {
        let budget = RetryBudget::default();
        let now = Instant::now();
        budget.deposit(now, WINDOW);
        let granted = (0..50)
            .filter(|_| budget.try_withdraw(now, WINDOW, 0.2, 2))
            .count();
        assert_eq!(granted, 20, "2 per second over 10 s");
    }

    #[test]
    fn old_buckets_leave_the_window() {
        let budget = RetryBudget::default();
        let start = Instant::now();
        for _ in 0..100 {
            budget.deposit(start, WINDOW);
        }
        assert_eq!(
            (0..100)
                .filter(|_| budget.try_withdraw(start, WINDOW, 0.5, 0))
                .count(),
            50
        );
        // Half a window later the same retries still count, and nothing
        // new was deposited.
        let later = start + WINDOW / 2;
        assert!(!budget.try_withdraw(later, WINDOW, 0.5, 0));
        // A whole window later everything has left: no requests, no
        // retries, no budget but the floor.
        let much_later = start + WINDOW + Duration::from_secs(1);
        assert!(!budget.try_withdraw(much_later, WINDOW, 0.5, 0));
        for _ in 0..10 {
            budget.deposit(much_later, WINDOW);
        }
        assert_eq!(
            (0..10)
                .filter(|_| budget.try_withdraw(much_later, WINDOW, 0.5, 0))
                .count(),
            5
        );
    }
}
