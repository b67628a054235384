//! What a thread keeps, emptied, for its next request: buffers and boxes
//! that would otherwise be freed by one request and allocated again by
//! the next (a connection's kit, an attempt's box, a request's copy for a
//! retry). Each kind has a thread-local stack of its own, bounded.
//!
//! Reached with `try_with` and `try_borrow_mut`: while its thread is
//! ending, or if a stack is already borrowed, nothing is kept or taken;
//! a thing is freed, never lost into a panic.

use std::cell::RefCell;
use std::thread::LocalKey;

/// A thread's stack of kept things of one kind.
pub(crate) type Kept<T> = RefCell<Vec<T>>;

/// The thing kept last, if any.
pub(crate) fn take<T: 'static>(kept: &'static LocalKey<Kept<T>>) -> Option<T> {
    kept.try_with(|kept| kept.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten()
}

/// Keeps `thing` unless `most` are kept already; then it is freed.
pub(crate) fn keep<T: 'static>(kept: &'static LocalKey<Kept<T>>, thing: T, most: usize) {
    let mut thing = Some(thing);
    let _ = kept.try_with(|kept| {
        if let Ok(mut kept) = kept.try_borrow_mut()
            && kept.len() < most
        {
            kept.extend(thing.take());
        }
    });
    // Not kept: freed outside the borrow.
    drop(thing);
}
