//! The shutdown signal every task holds, and the tracker that lets the
//! process wait for them.
//!
//! `Drain` is cheap to clone. Listener accept loops and downstream
//! connection tasks are spawned through it, so that shutdown can (1) tell
//! them to stop (`signal`), then (2) wait for them to finish, bounded by the
//! drain deadline (`wait`). Upstream connection tasks live as long as their
//! pools and are not waited for: they end with the process.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The process-wide drain signal and task tracker.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    /// A new, untriggered drain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a tracked task on the current runtime.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Spawns a tracked task on `runtime` (listeners are started from the
    /// control runtime but accept on the workers).
    pub fn spawn_on<F>(
        &self,
        task: F,
        runtime: &tokio::runtime::Handle,
    ) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn_on(task, runtime)
    }

    /// A drain for one part of the process (a listener): signalled with the
    /// process or on its own, its tasks tracked with the process's.
    pub fn child(&self) -> Self {
        Self {
            token: self.token.child_token(),
            tracker: self.tracker.clone(),
        }
    }

    /// Resolves once shutdown has begun. Cancel safe.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// Resolves `timeout` after shutdown has begun: what still runs then
    /// is cut (streams that have no graceful close, such as TCP).
    pub async fn deadline(&self, timeout: Duration) {
        self.cancelled().await;
        tokio::time::sleep(timeout).await;
    }

    /// True once shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Begins shutdown: listeners stop accepting, connections close
    /// gracefully.
    pub fn signal(&self) {
        self.token.cancel();
    }

    /// Waits for every tracked task, at most `deadline`. Returns the number
    /// of tasks still running when the deadline passed (0 = clean drain).
    pub async fn wait(&self, deadline: Duration) -> usize {
        self.tracker.close();
        match tokio::time::timeout(deadline, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}

/// A hyper executor that spawns HTTP/2 stream tasks through the drain
/// tracker, so that no task is fire-and-forget.
#[derive(Debug, Clone)]
pub(crate) struct TrackedExecutor(pub(crate) Drain);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        drop(self.0.spawn(future));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_reports_tasks_that_outlive_the_deadline() {
        let drain = Drain::new();
        let d = drain.clone();
        drain.spawn(async move { d.cancelled().await });
        drain.spawn(std::future::pending::<()>());
        drain.signal();
        assert_eq!(drain.wait(Duration::from_secs(1)).await, 1);
    }

    #[tokio::test]
    async fn a_child_drains_alone_or_with_its_parent() {
        let parent = Drain::new();
        let first = parent.child();
        let second = parent.child();
        first.signal();
        assert!(first.is_draining());
        assert!(!parent.is_draining() && !second.is_draining());
        parent.signal();
        assert!(second.is_draining());
    }
}
