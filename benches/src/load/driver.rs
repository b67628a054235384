//! What every connection task shares: the plan, the target address, the
//! timeouts, TLS, and the background tasks that drive hyper connections.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::TlsClient;
use super::plan::Plan;
use super::record::Outcome;

/// How long a closed-loop connection waits after a failed connect before it
/// tries again, so that a refused target is not hammered in a tight loop.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);

/// Shared, read-only state of the connection tasks of one run.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) plan: Plan,
    /// The checked loopback address.
    pub(crate) addr: SocketAddr,
    /// Timeout of a connect and of a request.
    pub(crate) timeout: Duration,
    /// TLS on HTTP/1.1 connections.
    pub(crate) tls: Option<TlsClient>,
    pub(crate) background: Background,
}

impl Context {
    /// Opens a TCP connection with `TCP_NODELAY`, bounded by the connect
    /// timeout and the hard stop.
    ///
    /// Cancel safety: cancel safe.
    pub(crate) async fn connect(&self) -> Result<TcpStream, Outcome> {
        connect(
            self.addr,
            self.plan.deadline(Instant::now(), self.timeout),
            self.plan.hard_stop,
        )
        .await
    }

    /// After a failed connect in closed loop, waits a little (never past the
    /// end of the run).
    pub(crate) async fn back_off_after_connect_failure(&self) {
        if !self.plan.is_open_loop() {
            tokio::time::sleep_until((Instant::now() + CONNECT_BACKOFF).min(self.plan.end)).await;
        }
    }
}

/// Opens a TCP connection to `addr` with `TCP_NODELAY` before `deadline`.
/// Fails with [`Outcome::Unfinished`] when the deadline is the hard stop,
/// else [`Outcome::Connect`].
///
/// Cancel safety: cancel safe.
pub(crate) async fn connect(
    addr: SocketAddr,
    deadline: Instant,
    hard_stop: Instant,
) -> Result<TcpStream, Outcome> {
    match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            if let Err(err) = stream.set_nodelay(true) {
                debug!(error = %err, "setting TCP_NODELAY failed");
            }
            Ok(stream)
        }
        Ok(Err(err)) => {
            debug!(error = %err, "connect failed");
            Err(Outcome::Connect)
        }
        Err(_) if deadline >= hard_stop => Err(Outcome::Unfinished),
        Err(_) => {
            debug!("connect timed out");
            Err(Outcome::Connect)
        }
    }
}

/// The hyper connection futures of one run. They end on their own once
/// every sender is dropped; [`Background::close`] stops what remains.
#[derive(Clone, Debug, Default)]
pub(crate) struct Background {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Background {
    /// Drives `connection` until it ends or the run closes.
    pub(crate) fn spawn<F>(&self, connection: F)
    where
        F: Future + Send + 'static,
    {
        let stop = self.stop.clone();
        // The tracker awaits the task and the token stops it: the handle is
        // not needed.
        drop(self.tracker.spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        }));
    }

    /// A guard that stops every connection when dropped (when a run is
    /// abandoned half-way).
    pub(crate) fn close_on_drop(&self) -> DropGuard {
        self.stop.clone().drop_guard()
    }

    /// Stops every connection and waits until their tasks have ended.
    pub(crate) async fn close(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
