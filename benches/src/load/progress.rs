//! The one-line progress report on stderr, and the per-connection counters
//! it reads.
//!
//! Each connection bumps its own [`Counter`], padded to its own cache lines
//! so that connections on different cores never contend; the progress task
//! only reads them.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the progress line is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Requests one connection has finished (warm-up included), and how many of
/// them failed.
#[derive(Debug, Default)]
// PERF: 128 bytes keeps two connections' counters off the same (or the
// adjacent, prefetched) cache line.
#[repr(align(128))]
pub(crate) struct Counter {
    finished: AtomicU64,
    failed: AtomicU64,
}

impl Counter {
    /// Counts one finished request. Only the owning connection writes.
    pub(crate) fn add(&self, is_failed: bool) {
        // Relaxed: a statistic read approximately by the progress task.
        self.finished.fetch_add(1, Ordering::Relaxed);
        if is_failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn totals(counters: &[Arc<Counter>]) -> (u64, u64) {
    counters.iter().fold((0, 0), |(finished, failed), counter| {
        (
            finished + counter.finished.load(Ordering::Relaxed),
            failed + counter.failed.load(Ordering::Relaxed),
        )
    })
}

/// Redraws `elapsed / total, requests, rate, failures` on stderr every
/// second until `stop` is cancelled, then clears the line.
///
/// Cancel safety: cancel safe, but the line is then left on screen.
pub(crate) async fn show(
    counters: Vec<Arc<Counter>>,
    start: Instant,
    total: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval_at(start + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
    let mut previous = 0;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => break,
        }
        let (finished, failed) = totals(&counters);
        let rate = (finished - previous) as f64 / PROGRESS_INTERVAL.as_secs_f64();
        previous = finished;
        let elapsed = start.elapsed().min(total);
        // Progress is terminal output, not a log: it is overwritten in place.
        let mut stderr = std::io::stderr().lock();
        let _ = write!(
            stderr,
            "\r\x1b[2K{:.0}/{:.0} s  {finished} requests  {rate:.0} req/s  {failed} failed",
            elapsed.as_secs_f64(),
            total.as_secs_f64(),
        );
        let _ = stderr.flush();
    }
    let mut stderr = std::io::stderr().lock();
    let _ = write!(stderr, "\r\x1b[2K");
    let _ = stderr.flush();
}
