//! The time as the request path reads it: once per request.
//!
//! Several layers want the time while a request is handed down the stack:
//! the rate limits (token buckets), the retry budget and the route's
//! deadline, the per-try timeout. Each reading is a `clock_gettime` and a
//! subtraction; a request that meets every layer would read the clock four
//! times within a few microseconds. Instead the connection holds the time
//! its request started at ([`hold`]) while it calls the stack, and the
//! layers' `call`s take that ([`tokio_now`], [`nanos`]). Anywhere else (a retry
//! after a backoff, a timer, a unit test) nothing is held and the clock is
//! read.
//!
//! The hold is per thread and is given back before the request's future is
//! first awaited: it can never be seen by another request.

use std::cell::Cell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

thread_local! {
    static HELD: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
}

/// Where [`nanos`] count from: the first reading.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// The held time, or tokio's clock (which a test may have paused).
pub(crate) fn tokio_now() -> tokio::time::Instant {
    HELD.get()
        .map_or_else(tokio::time::Instant::now, |(at, _)| {
            tokio::time::Instant::from_std(at)
        })
}

/// [`tokio_now`] in nanoseconds since the first reading: the clock of token
/// buckets and ejections.
pub(crate) fn nanos() -> u64 {
    HELD.get()
        .map_or_else(|| since_epoch(Instant::now()), |(_, nanos)| nanos)
}

/// Holds `at` as the time on this thread until the guard is dropped.
///
/// The guard is neither `Send` nor `Sync`: kept across an `.await`, it
/// would make the future `!Send`, which the proxy's spawned tasks cannot
/// be, so such a mistake does not compile.
pub(crate) fn hold(at: Instant) -> Held {
    Held {
        previous: HELD.replace(Some((at, since_epoch(at)))),
        _not_send: PhantomData,
    }
}

/// The hold of [`hold`]; dropping it restores what was held before.
#[must_use = "the time is held only while the guard lives"]
pub(crate) struct Held {
    previous: Option<(Instant, u64)>,
    _not_send: PhantomData<*const ()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.set(self.previous.take());
    }
}

/// How far ahead [`keep_a_timer_pending`] keeps its timer.
const PENDING_TIMER: Duration = Duration::from_millis(100);

/// Keeps one timer pending on the runtime's timer driver, forever.
///
/// PERF: tokio wakes its I/O driver (an eventfd write, and one more
/// `epoll_wait` round) whenever a timer is set that expires before every
/// timer the driver saw when it last parked, even when the thread that
/// sets it is the one that would be woken. After a burst of requests is
/// answered no timer is left, so the next request's per-try or route
/// timeout was such a timer: 0.4 wake-ups per request with h2c under
/// callgrind (benches/RESULTS.md). With a timer never more than 100 ms
/// away, a timeout of 100 ms or more never wakes the driver; this costs
/// ten wake-ups a second.
pub(crate) async fn keep_a_timer_pending() {
    let mut tick = tokio::time::interval(PENDING_TIMER);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

thread_local! {
    /// This thread's last reading of both clocks, for [`unix_nanos_of`]:
    /// an instant and the Unix time at it.
    static WALL: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
}

/// How far from its thread's last reading of both clocks an instant is
/// turned into a wall-clock time by adding the difference; further, the
/// clocks are read again. A step of the system clock (set by hand, or by
/// NTP) shows within this; a slew changes both clocks alike.
const WALL_READING: Duration = Duration::from_secs(1);

/// Nanoseconds from the Unix epoch to `time` (0 for a time before it,
/// `u64::MAX` for one past 2554).
pub(crate) fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// [`unix_nanos`] of now, for a time not read beside an `Instant`.
pub(crate) fn unix_nanos_now() -> u64 {
    unix_nanos(SystemTime::now())
}

/// The wall-clock time of `at`, an instant the caller read anyway (when a
/// request started, when its response ended), in nanoseconds from the
/// Unix epoch: what OTLP spans carry.
///
/// PERF: a span's start and end are wall-clock times; reading the system
/// clock for each beside the monotonic reading the request path makes
/// anyway cost 3 `clock_gettime`s a traced request, about 40 ns each on
/// this machine class (a virtual machine's clock). An instant within a
/// second of the thread's reading takes one subtraction: done in
/// `SystemTime` arithmetic (two saturating differences and a checked sum
/// each, and the epoch's subtraction as the span was written) a traced
/// request's span times took about 630 instructions, now about 230
/// (callgrind).
pub(crate) fn unix_nanos_of(at: Instant) -> u64 {
    if let Some((instant, nanos)) = WALL.get() {
        // Below a second, the difference is its nanoseconds; a system
        // clock set past 2554 reads `u64::MAX`, and stays there.
        if let Some(ahead) = at.checked_duration_since(instant)
            && ahead < WALL_READING
        {
            return nanos.saturating_add(u64::from(ahead.subsec_nanos()));
        }
        if let Some(behind) = instant.checked_duration_since(at)
            && behind < WALL_READING
        {
            return nanos.saturating_sub(u64::from(behind.subsec_nanos()));
        }
    }
    let now = Instant::now();
    let nanos = unix_nanos_now();
    WALL.set(Some((now, nanos)));
    let apart = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    match at.checked_duration_since(now) {
        Some(ahead) => nanos.saturating_add(apart(ahead)),
        None => nanos.saturating_sub(apart(now - at)),
    }
}

/// [`unix_nanos_of`] as a `SystemTime`.
pub(crate) fn wall_of(at: Instant) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_nanos(unix_nanos_of(at))
}

/// The instant a wall-clock time falls at (now, for one already past):
/// when a certificate's `not_after` comes, for a deadline.
pub(crate) fn instant_of(time: std::time::SystemTime) -> Instant {
    let left = time
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + left
}

thread_local! {
    /// This thread's reading of the monotonic clock and, beside it, of the
    /// coarse one, for [`coarse_now`].
    static COARSE: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
}

/// The coarse clock's reading: the monotonic clock as of the kernel's
/// last tick.
#[allow(unsafe_code)]
fn coarse_reading() -> Duration {
    let mut at = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes the reading into the `timespec` it is
    // given, which lives across the call. It fails only for an unknown
    // clock (Linux has had this one since 2.6.32); `at` then stays zero.
    let _ = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut at) };
    Duration::new(
        u64::try_from(at.tv_sec).unwrap_or(0),
        u32::try_from(at.tv_nsec).unwrap_or(0),
    )
}

/// The time, to within the kernel's tick (1-10 ms), for bookkeeping that
/// needs no more: when a pooled connection went idle, when a request head
/// began to arrive or a response ended (the idle and header timeouts,
/// which are seconds).
///
/// PERF: `Instant::now` costs about 24 ns on this machine class (a virtual
/// machine's clock: a time-stamp counter read and scaled); the coarse
/// clock is a value the kernel updates each tick, read without either.
/// The pool's idle bookkeeping and a connection's deadlines read the
/// clock four times a request (benches/RESULTS.md). Both clocks run at
/// the same rate (the coarse one is the monotonic clock sampled at each
/// tick), so the difference between two coarse readings is added to an
/// instant read beside the first.
pub(crate) fn coarse_now() -> Instant {
    let coarse = coarse_reading();
    if let Some((instant, at)) = COARSE.get() {
        return instant + coarse.saturating_sub(at);
    }
    let anchor = (Instant::now(), coarse);
    COARSE.set(Some(anchor));
    anchor.0
}

thread_local! {
    /// Whether this thread keeps its deadline timers ([`keep_timers`]).
    static KEEPS_TIMERS: Cell<bool> = const { Cell::new(false) };
    /// The deadline timers this thread keeps, each still set for the
    /// deadline of the request that held it last.
    static TIMERS: crate::kept::Kept<Pin<Box<tokio::time::Sleep>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The most deadline timers a thread keeps.
const TIMERS_KEPT: usize = 64;

/// Makes this thread keep the timers of requests' deadlines for the next
/// requests ([`Deadline`]).
///
/// Only for a thread that runs one runtime, and only that runtime, for
/// the rest of its life (a worker's): a timer belongs to the runtime it
/// was made on.
pub(crate) fn keep_timers() {
    KEEPS_TIMERS.set(true);
}

/// A request's deadline: a timer made or taken when the request starts,
/// polled while it waits.
///
/// PERF: a timer made for each request (the route's timeout) looked up
/// the runtime and took a reference to it, was inserted into the timer
/// wheel under its lock on first poll and removed under it when dropped:
/// about 1.2 % of the proxy's CPU under `wrk -c32` (benches/RESULTS.md). A
/// worker's thread keeps its requests' timers instead ([`keep_timers`]),
/// still registered. A kept timer set for an earlier time than the new
/// deadline (the usual case: the previous request's deadline) is left as
/// it is; when it fires before the deadline it is moved to the deadline
/// then, once per timeout period rather than once a request. A kept timer
/// firing while no request holds it may wake the task that polled it
/// last, once, for nothing.
#[derive(Debug)]
pub(crate) struct Deadline {
    at: tokio::time::Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Deadline {
    /// A timer that fires at `at`.
    pub(crate) fn at(at: tokio::time::Instant) -> Self {
        let kept = if KEEPS_TIMERS.get() {
            crate::kept::take(&TIMERS)
        } else {
            None
        };
        let sleep = match kept {
            Some(mut sleep) => {
                // Set later than this deadline: it would fire too late.
                if sleep.deadline() > at {
                    sleep.as_mut().reset(at);
                }
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        };
        Self {
            at,
            sleep: Some(sleep),
        }
    }

    /// Ready once the deadline has passed.
    pub(crate) fn poll_elapsed(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let Some(sleep) = &mut self.sleep else {
            return std::task::Poll::Ready(());
        };
        loop {
            std::task::ready!(sleep.as_mut().poll(cx));
            if sleep.deadline() >= self.at {
                return std::task::Poll::Ready(());
            }
            // A kept timer's earlier time came: on to this deadline.
            sleep.as_mut().reset(self.at);
        }
    }
}

/// `future`'s output, or `None` if `at` comes first. The future is polled
/// where its caller pinned it (not moved in: some are kilobytes), on a
/// [`Deadline`]'s timer.
pub(crate) async fn before<F: Future>(
    at: tokio::time::Instant,
    mut future: Pin<&mut F>,
) -> Option<F::Output> {
    let mut deadline = Deadline::at(at);
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(output));
        }
        std::task::ready!(deadline.poll_elapsed(cx));
        std::task::Poll::Ready(None)
    })
    .await
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if KEEPS_TIMERS.get()
            && let Some(sleep) = self.sleep.take()
        {
            crate::kept::keep(&TIMERS, sleep, TIMERS_KEPT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instant_becomes_the_wall_clock_time_it_was_read_at() {
        let before = SystemTime::now();
        let at = Instant::now();
        let after = SystemTime::now();
        let wall = wall_of(at);
        // Within the clocks' reading of each other (a few microseconds).
        let slack = Duration::from_millis(5);
        assert!(wall + slack >= before && wall <= after + slack);
        // Instants before and after the reading, near and far from it.
        for offset in [1, 999, 1_000, 5_000, 3_600_000] {
            let offset = Duration::from_millis(offset);
            let later = wall_of(at + offset);
            let earlier = wall_of(at.checked_sub(offset).unwrap_or(at));
            let span = later.duration_since(earlier).unwrap();
            let expected = (at + offset) - at.checked_sub(offset).unwrap_or(at);
            assert!(span.abs_diff(expected) < slack, "{offset:?}: {span:?}");
        }
    }

    #[test]
    fn a_wall_clock_past_what_nanoseconds_hold_stays_at_the_most_not_a_panic() {
        let at = Instant::now();
        // A system clock read as `u64::MAX` (set past 2554), or near it.
        WALL.set(Some((at, u64::MAX - 10)));
        assert_eq!(unix_nanos_of(at + Duration::from_millis(1)), u64::MAX);
        assert_eq!(unix_nanos_of(at), u64::MAX - 10);
        WALL.set(None);
    }

    #[test]
    fn the_coarse_clock_keeps_to_the_monotonic_one_within_a_tick() {
        // A tick is at most 10 ms (HZ=100); allow for a slow test host.
        let slack = Duration::from_millis(50);
        let first = coarse_now();
        let start = Instant::now();
        let mut last = first;
        while start.elapsed() < Duration::from_millis(30) {
            let now = coarse_now();
            assert!(now >= last, "the coarse clock went back");
            last = now;
        }
        let fine = Instant::now();
        let coarse = coarse_now();
        assert!(coarse.max(fine) - coarse.min(fine) < slack);
        assert!(coarse > first);
        // Another thread has its own reading to start from, and agrees.
        let other = std::thread::spawn(coarse_now).join().unwrap();
        let fine = Instant::now();
        assert!(other.max(fine) - other.min(fine) < slack);
    }

    /// Unmarks the thread and frees its kept timers (before the test's
    /// runtime goes), also when the test fails.
    struct KeepingTimers;

    impl Drop for KeepingTimers {
        fn drop(&mut self) {
            KEEPS_TIMERS.set(false);
            TIMERS.with_borrow_mut(Vec::clear);
        }
    }

    fn kept_timers() -> Vec<*const tokio::time::Sleep> {
        TIMERS.with_borrow(|kept| kept.iter().map(|sleep| &raw const **sleep).collect())
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_timer_is_taken_by_the_next_deadline_and_fires_at_it() {
        let _keeping = KeepingTimers;
        keep_timers();
        let first = Deadline::at(tokio::time::Instant::now() + Duration::from_secs(15));
        let first_timer = &raw const **first.sleep.as_ref().unwrap();
        drop(first);
        assert_eq!(kept_timers(), [first_timer]);
        // The next deadline, shorter than the kept timer's, gets the timer
        // and fires at its own time.
        let mut next = Deadline::at(tokio::time::Instant::now() + Duration::from_secs(2));
        assert!(kept_timers().is_empty());
        assert_eq!(&raw const **next.sleep.as_ref().unwrap(), first_timer);
        let started = tokio::time::Instant::now();
        std::future::poll_fn(|cx| next.poll_elapsed(cx)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        drop(next);
        // Once fired, a later deadline still gets the kept timer and waits
        // its whole time.
        let mut last = Deadline::at(tokio::time::Instant::now() + Duration::from_secs(30));
        assert_eq!(&raw const **last.sleep.as_ref().unwrap(), first_timer);
        let waiting = std::future::poll_fn(|cx| last.poll_elapsed(cx));
        assert!(
            tokio::time::timeout(Duration::from_secs(29), waiting)
                .await
                .is_err()
        );
        std::future::poll_fn(|cx| last.poll_elapsed(cx)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(32));
        drop(last);
        // A timer kept while still set: the next, later deadline leaves it
        // set where it was, and it fires at the deadline, not before.
        let mut early = Deadline::at(tokio::time::Instant::now() + Duration::from_secs(5));
        assert!(
            futures_util::poll!(std::future::poll_fn(|cx| early.poll_elapsed(cx))).is_pending()
        );
        drop(early);
        let mut later = Deadline::at(tokio::time::Instant::now() + Duration::from_secs(8));
        assert_eq!(
            later.sleep.as_ref().unwrap().deadline(),
            started + Duration::from_secs(37),
            "left where it was"
        );
        std::future::poll_fn(|cx| later.poll_elapsed(cx)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(40));
    }

    #[tokio::test]
    async fn a_thread_not_marked_keeps_no_timer() {
        let deadline = Deadline::at(tokio::time::Instant::now() + Duration::from_secs(1));
        drop(deadline);
        assert!(kept_timers().is_empty());
    }

    #[test]
    fn a_hold_is_seen_until_it_is_dropped() {
        let at = Instant::now() + Duration::from_secs(3600);
        {
            let _held = hold(at);
            assert_eq!(tokio_now().into_std(), at);
            assert_eq!(nanos(), since_epoch(at));
            assert!(nanos() >= 3_599_000_000_000);
        }
        assert!(tokio_now().into_std() < at);
        assert!(nanos() < 3_599_000_000_000);
    }

    #[test]
    fn holds_nest_and_are_per_thread() {
        let outer = Instant::now() + Duration::from_secs(10);
        let inner = outer + Duration::from_secs(10);
        let _outer = hold(outer);
        {
            let _inner = hold(inner);
            assert_eq!(tokio_now().into_std(), inner);
            let other = std::thread::spawn(|| tokio_now().into_std())
                .join()
                .unwrap();
            assert!(other < outer, "another thread reads its own clock");
        }
        assert_eq!(tokio_now().into_std(), outer);
    }
}
