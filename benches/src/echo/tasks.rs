//! The tasks one echo server spawns, and the two ways they stop.
//!
//! Every accept loop, connection and upgraded stream is spawned through
//! [`Tasks`], so one handle can stop them all: `drain` asks them to finish
//! (stop accepting, graceful connection shutdown, close echo streams), and
//! `abort` stops them where they are. Aborting implies draining: the drain
//! token is a child of the abort token.

use std::future::Future;

use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

/// Spawns and stops one server's tasks. Clones share the same tasks.
#[derive(Clone, Debug)]
pub(crate) struct Tasks {
    abort: CancellationToken,
    drain: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    pub(crate) fn new() -> Self {
        let abort = CancellationToken::new();
        let drain = abort.child_token();
        Self {
            abort,
            drain,
            tracker: TaskTracker::new(),
        }
    }

    /// Spawns `task` on the current runtime; it is awaited by [`Self::drain`].
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // The handle is not needed: the tracker waits for the task and the
        // tokens stop it.
        drop(self.tracker.spawn(task));
    }

    /// A guard that aborts every task when dropped (held by the server
    /// handle, not by the tasks themselves).
    pub(crate) fn abort_on_drop(&self) -> DropGuard {
        self.abort.clone().drop_guard()
    }

    /// Completes once draining (or aborting) has begun.
    ///
    /// Cancel safety: cancel safe.
    pub(crate) async fn draining(&self) {
        self.drain.cancelled().await;
    }

    /// Completes once aborting has begun.
    ///
    /// Cancel safety: cancel safe.
    pub(crate) async fn aborting(&self) {
        self.abort.cancelled().await;
    }

    /// Asks every task to finish and waits until all have.
    pub(crate) async fn drain(&self) {
        self.drain.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
