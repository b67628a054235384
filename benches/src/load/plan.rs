//! A run's timeline and pacing: when requests are due, which ones are
//! measured, and the deadlines that bound every request.
//!
//! The open loop's schedule is one atomic counter shared by every
//! connection: slot `i` is due at `start + i / rate`, and the schedule ends
//! at the first slot due at or after the end of the measured window, so the
//! number of requests in a run is bounded by `rate × (warmup + duration)`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{GRACE, LoadMode};

/// Tokio's timers fire on 1 ms ticks, never early, so sleeping until a slot
/// would send it up to 1 ms late (and, at high rates, late enough to be
/// taken for a busy connection). Sleeping until this long before it instead
/// sends each request within the millisecond before it is due.
const TIMER_GRANULARITY: Duration = Duration::from_millis(1);

/// The timeline of one run.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The schedule's origin: the warm-up starts here.
    start: Instant,
    /// Requests due (open loop) or sent (closed loop) from here on are
    /// recorded.
    pub(crate) measure_start: Instant,
    /// No request starts at or after this instant.
    pub(crate) end: Instant,
    /// Requests still in flight now are abandoned as unfinished.
    pub(crate) hard_stop: Instant,
    pacing: Pacing,
}

#[derive(Debug)]
enum Pacing {
    Open {
        next_slot: AtomicU64,
        nanos_per_slot: f64,
    },
    Closed,
}

/// A request slot a connection took: when it is due.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    intended: Instant,
    /// The connection took the slot after it was due: it was busy (or the
    /// generator was late), so the wait counts as latency.
    is_backlogged: bool,
}

/// When one request was due and sent, and where its latency starts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    /// Latency is measured from here: the intended time for a backlogged
    /// slot, else the actual send.
    pub(crate) start: Instant,
    /// When the request was actually sent (service time starts here).
    pub(crate) sent: Instant,
    /// How late the send was against the schedule (zero in closed loop).
    pub(crate) lag: Duration,
    /// Whether the lag happened while the connection was idle (timer or
    /// generator lateness, not counted as latency).
    pub(crate) is_idle_lag: bool,
    /// Whether the request falls in the measured window.
    pub(crate) is_measured: bool,
}

impl Slot {
    /// When to send the slot's request: up to [`TIMER_GRANULARITY`] before
    /// it is due, at the timer tick that precedes it.
    pub(crate) fn send_at(self) -> Instant {
        self.intended
            .checked_sub(TIMER_GRANULARITY)
            .unwrap_or(self.intended)
    }
}

impl Plan {
    /// A plan whose warm-up (or, without one, measured window) starts at
    /// `start`.
    pub(crate) fn new(
        start: Instant,
        mode: LoadMode,
        warmup: Duration,
        duration: Duration,
    ) -> Self {
        let measure_start = start + warmup;
        let end = measure_start + duration;
        let pacing = match mode {
            LoadMode::OpenLoop { rate_per_second } => Pacing::Open {
                next_slot: AtomicU64::new(0),
                nanos_per_slot: 1e9 / rate_per_second,
            },
            LoadMode::ClosedLoop => Pacing::Closed,
        };
        Self {
            start,
            measure_start,
            end,
            hard_stop: end + GRACE,
            pacing,
        }
    }

    /// Whether requests follow a schedule (open loop).
    pub(crate) fn is_open_loop(&self) -> bool {
        matches!(self.pacing, Pacing::Open { .. })
    }

    /// Takes the next slot, or `None` once the schedule (or, in closed loop,
    /// the run) is over. After `None`, every later call returns `None`.
    pub(crate) fn next_slot(&self) -> Option<Slot> {
        let now = Instant::now();
        match &self.pacing {
            Pacing::Open {
                next_slot,
                nanos_per_slot,
            } => {
                // Relaxed: the counter only hands out distinct numbers; it
                // orders nothing else.
                let index = next_slot.fetch_add(1, Ordering::Relaxed);
                let offset = Duration::from_nanos((index as f64 * nanos_per_slot) as u64);
                let intended = self.start + offset;
                (intended < self.end).then_some(Slot {
                    intended,
                    is_backlogged: now > intended,
                })
            }
            Pacing::Closed => (now < self.end).then_some(Slot {
                intended: now,
                is_backlogged: false,
            }),
        }
    }

    /// Waits until `slot` may be sent (see [`Slot::send_at`]; not at all if
    /// it is due) and returns its timing, sent now.
    ///
    /// Cancel safety: cancel safe (it only sleeps).
    pub(crate) async fn wait(&self, slot: Slot) -> Timing {
        let send_at = slot.send_at();
        if Instant::now() < send_at {
            tokio::time::sleep_until(send_at).await;
        }
        self.timing(slot, Instant::now())
    }

    /// The timing of `slot` sent at `sent` (no earlier than
    /// [`Slot::send_at`]).
    pub(crate) fn timing(&self, slot: Slot, sent: Instant) -> Timing {
        let lag = sent.saturating_duration_since(slot.intended);
        Timing {
            start: if slot.is_backlogged {
                slot.intended
            } else {
                sent
            },
            sent,
            lag,
            is_idle_lag: !slot.is_backlogged,
            is_measured: slot.intended >= self.measure_start,
        }
    }

    /// The deadline of a request sent at `sent` with `timeout`: the timeout,
    /// cut short by the hard stop.
    pub(crate) fn deadline(&self, sent: Instant, timeout: Duration) -> Instant {
        (sent + timeout).min(self.hard_stop)
    }
}
