//! Accept loops, connection limits and protocol detection.
//!
//! A listener is bound once; each accepted connection is handed to the
//! HTTP server (`http::server`) or the L4 forwarder (`tcp`) according to
//! the listener's kind in the current snapshot. For HTTP listeners the
//! first bytes decide the protocol: the HTTP/2 connection preface means
//! HTTP/2 (prior knowledge), anything else HTTP/1.x. The bytes read to
//! decide are replayed to the protocol's parser by [`DownstreamIo`], which
//! also counts the connection's bytes.
//!
//! Invariants: at most `max_connections` connections per listener are
//! served at once (more wait in the kernel's accept queue); every
//! connection task is tracked by the drain.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::drain::Drain;
use crate::stack::{ListenerSnapshot, Shared};
use crate::telemetry::ListenerMetrics;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

/// Runs one listener's accept loop until the drain signal.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    index: usize,
    shared: Shared,
    drain: Drain,
    max_connections: u32,
) {
    let limit = Arc::new(Semaphore::new(max_connections as usize));
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return, // the semaphore is never closed
            },
            () = drain.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors or a connection reset before
                    // accept: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = drain.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let snapshot = shared.load_full();
        let conn_drain = drain.clone();
        match snapshot.listener(index) {
            Some(ListenerSnapshot::Http(http)) => {
                let http = http.clone();
                let shared = shared.clone();
                drain.spawn(async move {
                    let _permit = permit;
                    crate::http::server::serve(stream, peer, index, http, shared, conn_drain).await;
                });
            }
            Some(ListenerSnapshot::Tcp(tcp)) => {
                let tcp = tcp.clone();
                drain.spawn(async move {
                    let _permit = permit;
                    crate::tcp::proxy(stream, peer, tcp, conn_drain).await;
                });
            }
            None => {}
        }
    }
}

/// Reads until the protocol is known, within `deadline`. `None` when the
/// client sent nothing useful in time (the connection is then dropped).
pub(crate) async fn detect(
    mut stream: TcpStream,
    deadline: Duration,
    metrics: Arc<ListenerMetrics>,
    state: Arc<ConnState>,
) -> Option<(DownstreamIo, Protocol)> {
    let mut prefix = [0u8; 24];
    let mut len = 0;
    let read = async {
        loop {
            let n = stream.read(&mut prefix[len..]).await.ok()?;
            if n == 0 {
                return None;
            }
            len += n;
            if prefix[..len] != H2_PREFACE[..len] {
                return Some(Protocol::Http1);
            }
            if len == H2_PREFACE.len() {
                return Some(Protocol::Http2);
            }
        }
    };
    let protocol = tokio::time::timeout(deadline, read).await.ok()??;
    metrics.bytes_received.fetch_add(len as u64, Relaxed);
    // The first request's head began with the bytes just read.
    state.on_read();
    let prefix = Bytes::copy_from_slice(&prefix[..len]);
    Some((
        DownstreamIo {
            stream,
            prefix,
            metrics,
            state,
        },
        protocol,
    ))
}

/// A downstream connection: replays the bytes read for detection, then
/// reads the socket; counts bytes both ways.
#[derive(Debug)]
pub(crate) struct DownstreamIo {
    stream: TcpStream,
    /// Bytes already read from the socket that the next reader must see
    /// first (detection bytes, or what hyper had buffered when it let go).
    prefix: Bytes,
    metrics: Arc<ListenerMetrics>,
    state: Arc<ConnState>,
}

impl DownstreamIo {
    /// Puts bytes back in front of the stream.
    pub(crate) fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if self.prefix.is_empty() {
            self.prefix = bytes;
            return;
        }
        let mut joined = Vec::with_capacity(bytes.len() + self.prefix.len());
        joined.extend_from_slice(&bytes);
        joined.extend_from_slice(&self.prefix);
        self.prefix = joined.into();
    }

    /// Waits until the client sends more, without holding a buffer.
    /// Returns false when the client closed the connection instead.
    ///
    /// Cancel safety: cancel safe (it only waits for readiness).
    pub(crate) async fn wait_for_data(&self) -> bool {
        if !self.prefix.is_empty() {
            return true;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.peek(&mut probe).await, Ok(n) if n > 0)
    }
}

impl AsyncRead for DownstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if polled.is_ready() && read > 0 {
            this.metrics.bytes_received.fetch_add(read as u64, Relaxed);
            this.state.on_read();
        }
        polled
    }
}

impl AsyncWrite for DownstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.metrics.bytes_sent.fetch_add(n as u64, Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.metrics.bytes_sent.fetch_add(n as u64, Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Counts a listener's open connections while alive.
#[derive(Debug)]
pub(crate) struct ConnectionGuard(Arc<ListenerMetrics>);

impl ConnectionGuard {
    pub(crate) fn new(metrics: Arc<ListenerMetrics>) -> Self {
        metrics.connections_total.fetch_add(1, Relaxed);
        metrics.connections_active.fetch_add(1, Relaxed);
        Self(metrics)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Relaxed);
    }
}

/// What a connection's deadlines need to know: requests in flight, when
/// the last one finished, and when the bytes of a not-yet-parsed request
/// head began to arrive.
///
/// hyper's own HTTP/1 header timer also runs while a keep-alive connection
/// waits for its next request, which would close idle keep-alive
/// connections after the header timeout; so the proxy keeps these deadlines
/// itself: the header timeout starts at the first byte of a request head,
/// the idle timeout when the last response ends.
#[derive(Debug)]
pub(crate) struct ConnState {
    born: Instant,
    /// Track request heads (HTTP/1 only: HTTP/2 frames between streams are
    /// not request heads).
    track_heads: std::sync::atomic::AtomicBool,
    in_flight: AtomicU32,
    started: AtomicU64,
    /// Milliseconds since `born` (+1; 0 = none).
    head_started_ms: AtomicU64,
    last_done_ms: AtomicU64,
}

impl ConnState {
    pub(crate) fn new(track_heads: bool) -> Self {
        Self {
            born: Instant::now(),
            track_heads: std::sync::atomic::AtomicBool::new(track_heads),
            in_flight: AtomicU32::new(0),
            started: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            last_done_ms: AtomicU64::new(1),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn instant(&self, ms: u64) -> Instant {
        self.born + Duration::from_millis(ms.saturating_sub(1))
    }

    fn on_read(&self) {
        if self.track_heads.load(Relaxed)
            && self.in_flight.load(Relaxed) == 0
            && self.head_started_ms.load(Relaxed) == 0
        {
            self.head_started_ms.store(self.now_ms(), Relaxed);
        }
    }

    /// Stops the header deadline (once the protocol turned out HTTP/2).
    pub(crate) fn stop_tracking_heads(&self) {
        self.track_heads.store(false, Relaxed);
        self.head_started_ms.store(0, Relaxed);
    }

    /// A request's head was parsed; it is in flight until the guard drops
    /// (when its response body has been sent or abandoned).
    pub(crate) fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Relaxed);
        self.started.fetch_add(1, Relaxed);
        self.head_started_ms.store(0, Relaxed);
        RequestGuard(self.clone())
    }

    /// When the bytes of an unparsed request head began to arrive.
    pub(crate) fn head_started(&self) -> Option<Instant> {
        match self.head_started_ms.load(Relaxed) {
            0 => None,
            ms => Some(self.instant(ms)),
        }
    }

    /// Since when the connection has had nothing to do; `None` when busy.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Relaxed) > 0 || self.head_started_ms.load(Relaxed) != 0 {
            return None;
        }
        Some(self.instant(self.last_done_ms.load(Relaxed)))
    }
}

/// Marks a request in flight on its connection.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.last_done_ms.store(self.0.now_ms(), Relaxed);
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}
