//! The opaque TCP echo: every byte a client sends comes back, until it
//! closes its side; then the server closes its own.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::DropGuard;
use tracing::{Instrument as _, debug, warn};

use super::tasks::Tasks;

/// Size of the buffer each echoed connection reads into.
const ECHO_BUFFER_LEN: usize = 16 * 1024;

/// How long the accept loop backs off after a failed accept (such as running
/// out of file descriptors), so that it does not spin.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Copies everything read from `io` back into it until EOF, then shuts down
/// the write side. Returns the number of bytes echoed.
///
/// Cancel safety: not cancel safe (bytes read but not yet written back are
/// lost); callers only cancel it to close the connection.
pub(crate) async fn echo_until_eof<S>(mut io: S) -> io::Result<u64>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; ECHO_BUFFER_LEN];
    let mut total = 0u64;
    loop {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        io.write_all(&buf[..n]).await?;
        total += n as u64;
    }
    io.shutdown().await?;
    Ok(total)
}

/// An opaque TCP echo server running on the current Tokio runtime.
///
/// Dropping the handle closes the listener and every connection at once;
/// [`TcpEchoServer::shutdown`] does the same but waits until they are gone.
#[derive(Debug)]
pub struct TcpEchoServer {
    local_addr: SocketAddr,
    connections: Arc<AtomicU64>,
    tasks: Tasks,
    _abort: DropGuard,
}

impl TcpEchoServer {
    /// Binds `addr` (port 0 picks a free port) and starts accepting.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding tcp echo on {addr}"))?;
        let local_addr = listener
            .local_addr()
            .context("reading the tcp echo's bound address")?;
        let tasks = Tasks::new();
        let connections = Arc::new(AtomicU64::new(0));
        tasks.spawn(
            accept_loop(listener, tasks.clone(), Arc::clone(&connections))
                .instrument(tracing::info_span!("tcp_echo", listener = %local_addr)),
        );
        Ok(Self {
            local_addr,
            connections,
            _abort: tasks.abort_on_drop(),
            tasks,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections accepted so far.
    pub fn connections_served(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Stops accepting, closes every connection and waits until all tasks
    /// have ended.
    pub async fn shutdown(self) {
        self.tasks.drain().await;
    }
}

async fn accept_loop(listener: TcpListener, tasks: Tasks, connections: Arc<AtomicU64>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tasks.draining() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %err, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    () = tasks.draining() => return,
                }
            }
        };
        connections.fetch_add(1, Ordering::Relaxed);
        let stop = tasks.clone();
        tasks.spawn(
            async move {
                tokio::select! {
                    () = serve(stream) => {}
                    () = stop.draining() => debug!("connection closed by shutdown"),
                }
            }
            .instrument(tracing::debug_span!("conn", peer.addr = %peer)),
        );
    }
}

async fn serve(stream: TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(error = %err, "setting TCP_NODELAY failed");
    }
    match echo_until_eof(stream).await {
        Ok(bytes) => debug!(bytes, "connection closed"),
        Err(err) => debug!(error = %err, "connection failed"),
    }
}
