//! The shutdown signal every task holds, and the tracker that lets the
//! process wait for them.
//!
//! `Drain` is cheap to clone. Listener accept loops and downstream
//! connection tasks are spawned through it, so that shutdown can (1) tell
//! them to stop (`signal`), then (2) wait for them to finish, bounded by the
//! drain deadline (`wait`). Upstream connection tasks live as long as their
//! pools and are not waited for: they end with the process.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio_util::task::TaskTracker;

/// The process-wide drain signal and task tracker.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    signal: Arc<Signal>,
    tracker: TaskTracker,
}

/// One drain signal: set once, never cleared; setting it sets its
/// children's.
///
/// PERF: every downstream connection's task polls its drain signal each
/// time it is woken, several times a request. The signal is a flag read
/// with one atomic load, and a waiting future that has registered its
/// task's waker does not register it again ([`Cancelled`]). A
/// `tokio_util` `CancellationToken` took a mutex for each check and its
/// future a second one: about 1 % of the proxy's CPU under `wrk -c32`
/// (benches/RESULTS.md).
#[derive(Debug, Default)]
struct Signal {
    set: AtomicBool,
    notify: Notify,
    /// The children still alive; taken when the signal is set.
    children: Mutex<Vec<Weak<Signal>>>,
}

impl Signal {
    fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    fn set(&self) {
        if self.set.swap(true, Ordering::AcqRel) {
            return;
        }
        self.notify.notify_waiters();
        // Taken after the flag is set: a child made from now on sees the
        // flag (under this lock) instead of joining the list.
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(PoisonError::into_inner));
        for child in children.iter().filter_map(Weak::upgrade) {
            child.set();
        }
    }

    fn child(&self) -> Arc<Self> {
        let child = Arc::new(Self::default());
        let mut children = self.children.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_set() {
            child.set.store(true, Ordering::Release);
        } else {
            children.retain(|child| child.strong_count() > 0);
            children.push(Arc::downgrade(&child));
        }
        child
    }
}

pin_project! {
    /// Resolves once its drain signal is set ([`Drain::cancelled`]).
    /// Cancel safe.
    #[derive(Debug)]
    pub struct Cancelled<'a> {
        signal: &'a Signal,
        // Made with the future, before the flag is first read: a signal
        // set after that wakes it even if it was not yet polled.
        #[pin]
        notified: Notified<'a>,
        // The waker the notification will wake.
        registered: Option<Waker>,
    }
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.signal.is_set() {
            return Poll::Ready(());
        }
        if this
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        if this.notified.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
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
            signal: self.signal.child(),
            tracker: self.tracker.clone(),
        }
    }

    /// Resolves once shutdown has begun. Cancel safe.
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled {
            signal: &self.signal,
            notified: self.signal.notify.notified(),
            registered: None,
        }
    }

    /// Resolves `timeout` after shutdown has begun: what still runs then
    /// is cut (streams that have no graceful close, such as TCP).
    pub async fn deadline(&self, timeout: Duration) {
        self.cancelled().await;
        tokio::time::sleep(timeout).await;
    }

    /// True once shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.signal.is_set()
    }

    /// Begins shutdown: listeners stop accepting, connections close
    /// gracefully.
    pub fn signal(&self) {
        self.signal.set();
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
        // A child made after its parent was signalled starts signalled.
        assert!(parent.child().is_draining());
    }

    #[tokio::test]
    async fn a_waiting_task_is_woken_by_its_own_signal_or_its_parent_s() {
        let parent = Drain::new();
        let child = parent.child();
        let grandchild = child.child();
        let waiting = |drain: &Drain| {
            let drain = drain.clone();
            tokio::spawn(async move { drain.cancelled().await })
        };
        let (on_parent, on_child, on_grandchild) =
            (waiting(&parent), waiting(&child), waiting(&grandchild));
        // Each has registered and is waiting.
        tokio::task::yield_now().await;
        assert!(!on_parent.is_finished() && !on_child.is_finished());
        parent.signal();
        on_child.await.unwrap();
        on_grandchild.await.unwrap();
        on_parent.await.unwrap();
    }

    #[tokio::test]
    async fn a_future_polled_again_by_its_task_still_sees_the_signal() {
        let drain = Drain::new();
        let mut cancelled = std::pin::pin!(drain.cancelled());
        // Polled twice by the same task: the second poll takes the fast
        // path; the signal still wakes and ends it.
        assert!(futures_util::poll!(cancelled.as_mut()).is_pending());
        assert!(futures_util::poll!(cancelled.as_mut()).is_pending());
        let signaller = drain.clone();
        tokio::spawn(async move { signaller.signal() });
        tokio::time::timeout(Duration::from_secs(10), cancelled)
            .await
            .unwrap();
        // One made after the signal is ready at once.
        assert!(futures_util::poll!(std::pin::pin!(drain.cancelled())).is_ready());
    }
}
