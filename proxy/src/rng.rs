//! The per-thread random number generator behind load-balancer picks,
//! weighted splits and generated request ids: no lock, no allocation, and
//! not for secrets. A leaf module: it depends on nothing in the crate.

use std::cell::RefCell;

thread_local! {
    static RNG: RefCell<fastrand::Rng> = RefCell::new(fastrand::Rng::new());
}

/// Runs `f` with this thread's random number generator.
pub(crate) fn with_thread_rng<T>(f: impl FnOnce(&mut fastrand::Rng) -> T) -> T {
    RNG.with(|rng| f(&mut rng.borrow_mut()))
}
