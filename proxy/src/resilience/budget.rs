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

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Buckets in a window.
const BUCKETS: usize = 10;

/// One cluster's budget.
///
/// PERF: every request deposits, from every worker, so the buckets are
/// atomics rather than a ring behind a lock. Each bucket holds a count in
/// its low 32 bits and, in its high 32, the number of the bucket-wide
/// stretch of time it counts (its tag); a bucket with an old tag is reset
/// by whoever writes to it first.
#[derive(Debug, Default)]
pub(crate) struct RetryBudget {
    /// The bucket width, in nanoseconds, that the tags were counted in.
    width: AtomicU64,
    requests: [AtomicU64; BUCKETS],
    retries: [AtomicU64; BUCKETS],
}

const COUNT: u64 = u32::MAX as u64;

/// Adds one to the bucket's count for `tag`, starting it over if it holds
/// an older stretch of time.
fn add(bucket: &AtomicU64, tag: u64) {
    let _ = bucket.fetch_update(Relaxed, Relaxed, |value| {
        Some(if value >> 32 == tag {
            (value & COUNT).saturating_add(1).min(COUNT) | (tag << 32)
        } else {
            (tag << 32) | 1
        })
    });
}

/// Takes back one that [`add`] put in for `tag`.
fn undo(bucket: &AtomicU64, tag: u64) {
    let _ = bucket.fetch_update(Relaxed, Relaxed, |value| {
        (value >> 32 == tag && value & COUNT > 0).then(|| value - 1)
    });
}

/// The counts of the buckets within the window that ends with `tag`.
fn sum(buckets: &[AtomicU64; BUCKETS], tag: u64) -> u64 {
    buckets
        .iter()
        .map(|bucket| bucket.load(Relaxed))
        .filter(|value| tag.wrapping_sub(value >> 32) & COUNT < BUCKETS as u64)
        .map(|value| value & COUNT)
        .sum()
}

impl RetryBudget {
    /// The tag of `now` (nanoseconds, [`crate::clock::nanos`]) for a
    /// `window`, and the bucket it falls in.
    fn tag(&self, now: u64, window: Duration) -> (u64, usize) {
        // Buckets are at least 1 ns wide; a window of u64::MAX ns is
        // 584 years.
        let width = (u64::try_from(window.as_nanos()).unwrap_or(u64::MAX) / BUCKETS as u64).max(1);
        // Read first: a write on every request would bounce the line
        // between workers.
        if self.width.load(Relaxed) != width && self.width.swap(width, Relaxed) != width {
            // A new window (or the first use): the counts start over.
            for bucket in self.requests.iter().chain(&self.retries) {
                bucket.store(0, Relaxed);
            }
        }
        let tag = (now / width) & COUNT;
        // The remainder is below BUCKETS.
        #[allow(clippy::cast_possible_truncation)]
        (tag, (tag % BUCKETS as u64) as usize)
    }

    /// Counts a request.
    pub(crate) fn deposit(&self, now: u64, window: Duration) {
        let (tag, index) = self.tag(now, window);
        add(&self.requests[index], tag);
    }

    /// Takes one retry out of the budget, if it allows one: retries in the
    /// window stay within `ratio` of the requests plus `min_per_second`
    /// per second of the window. The retry is counted first and taken
    /// back if it does not fit, so retries decided at once on several
    /// workers cannot overdraw the budget together.
    pub(crate) fn try_withdraw(
        &self,
        now: u64,
        window: Duration,
        ratio: f64,
        min_per_second: u32,
    ) -> bool {
        let (tag, index) = self.tag(now, window);
        let requests = sum(&self.requests, tag);
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let allowed = (requests as f64 * ratio) as u64
            + (f64::from(min_per_second) * window.as_secs_f64()) as u64;
        add(&self.retries[index], tag);
        if sum(&self.retries, tag) <= allowed {
            true
        } else {
            undo(&self.retries[index], tag);
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
        let now = 7_000_000_000;
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
        let now = 7_000_000_000;
        budget.deposit(now, WINDOW);
        let granted = (0..50)
            .filter(|_| budget.try_withdraw(now, WINDOW, 0.2, 2))
            .count();
        assert_eq!(granted, 20, "2 per second over 10 s");
    }

    #[test]
    fn old_buckets_leave_the_window() {
        let budget = RetryBudget::default();
        let start: u64 = 7_000_000_000;
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
        let later = start + 5_000_000_000;
        assert!(!budget.try_withdraw(later, WINDOW, 0.5, 0));
        // A whole window later everything has left: no requests, no
        // retries, no budget but the floor.
        let much_later = start + 11_000_000_000;
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

    #[test]
    fn workers_withdrawing_at_once_never_overdraw() {
        let budget = std::sync::Arc::new(RetryBudget::default());
        let now = 7_000_000_000;
        for _ in 0..1000 {
            budget.deposit(now, WINDOW);
        }
        let granted: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let budget = budget.clone();
                    scope.spawn(move || {
                        (0..200)
                            .filter(|_| budget.try_withdraw(now, WINDOW, 0.1, 0))
                            .count()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(granted, 100, "10 % of 1000, however the workers raced");
    }
}
