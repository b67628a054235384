//! The per-thread random number generator behind load-balancer picks,
//! weighted splits, generated request ids and retry jitter: no lock, no
//! allocation, and not for secrets. A leaf module: it depends on nothing in
//! the crate.

use std::cell::RefCell;

thread_local! {
    static RNG: RefCell<fastrand::Rng> = RefCell::new(fastrand::Rng::new());
}

/// Runs `f` with this thread's random number generator.
pub(crate) fn with_thread_rng<T>(f: impl FnOnce(&mut fastrand::Rng) -> T) -> T {
    RNG.with(|rng| f(&mut rng.borrow_mut()))
}

/// Exponential backoff with equal jitter: the delay doubles from `first`
/// per failed `attempt` up to `max`, and half of it is random, so that
/// clients cut off together do not return together.
pub(crate) fn backoff(
    first: std::time::Duration,
    max: std::time::Duration,
    attempt: u32,
) -> std::time::Duration {
    let capped = first.saturating_mul(1 << attempt.min(16)).min(max);
    let half = capped / 2;
    half + half.mul_f64(with_thread_rng(|rng| rng.f64()))
}
