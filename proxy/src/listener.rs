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

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::drain::Drain;
use crate::stack::{ListenerSnapshot, Shared};
use crate::telemetry::ListenerMetrics;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes asked for by each read while the protocol is being detected.
const DETECT_READ_BYTES: usize = 4096;

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("listener {listener:?}: cannot bind {address}")]
pub struct BindError {
    /// Listener name (`admin` for the admin server).
    pub listener: String,
    /// The configured address.
    pub address: SocketAddr,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// Binds a listening socket the way every Weft listener is bound:
/// `SO_REUSEADDR` (a listener re-created at the same address must not wait
/// for old connections' `TIME_WAIT`), a 1024-connection accept queue,
/// non-blocking.
pub(crate) fn bind(name: &str, address: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    let error = |source| BindError {
        listener: name.to_owned(),
        address,
        source,
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(error)?;
    socket.set_reuse_address(true).map_err(error)?;
    socket.bind(&address.into()).map_err(error)?;
    socket.listen(1024).map_err(error)?;
    socket.set_nonblocking(true).map_err(error)?;
    Ok(socket.into())
}

/// What identifies a listening socket across configurations: its address,
/// and for port 0 (any free port) also the listener's name, since two
/// listeners may both ask for port 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SocketKey {
    address: SocketAddr,
    name: Option<Arc<str>>,
}

impl SocketKey {
    fn of(listener: &crate::config::Listener) -> Self {
        Self {
            address: listener.address,
            name: (listener.address.port() == 0).then(|| listener.name.clone()),
        }
    }
}

/// A listening socket with its accept loop.
#[derive(Debug)]
struct Running {
    slot: usize,
    bound: SocketAddr,
    limit: Arc<Semaphore>,
    max_connections: u32,
    /// Signalled when a configuration no longer has this listener: the
    /// accept loop ends and its connections close gracefully.
    drain: Drain,
}

/// The proxy's listening sockets, reconciled with each configuration.
///
/// A listener keeps its socket (and its open connections) as long as a
/// configuration has a listener at the same address, whatever else changed:
/// renaming it, changing its routes or limits, even switching it between
/// HTTP and TCP, never closes the socket. A listener that disappears stops
/// accepting and its connections close gracefully (HTTP/1 `connection:
/// close`, HTTP/2 GOAWAY). Each socket gets a slot number, never reused, by
/// which its connections find the listener in the current snapshot.
#[derive(Debug, Default)]
pub(crate) struct ListenerSet {
    running: HashMap<SocketKey, Running>,
    next_slot: usize,
}

/// The sockets a configuration needs, bound but not yet serving: applying
/// it cannot fail any more. Dropping it closes the new sockets.
#[derive(Debug)]
pub(crate) struct ListenerPlan {
    /// Slot and bound address of each listener, in configuration order.
    pub(crate) slots: Vec<(usize, SocketAddr)>,
    new: Vec<(SocketKey, usize, std::net::TcpListener, SocketAddr, u32)>,
    kept: Vec<SocketKey>,
}

impl ListenerSet {
    /// Binds every listener of `listeners` that has no socket yet. Nothing
    /// changes for running listeners until [`ListenerSet::commit`].
    pub(crate) fn prepare(
        &mut self,
        listeners: &[crate::config::Listener],
    ) -> Result<ListenerPlan, Vec<BindError>> {
        let mut plan = ListenerPlan {
            slots: Vec::with_capacity(listeners.len()),
            new: Vec::new(),
            kept: Vec::new(),
        };
        let mut errors = Vec::new();
        let mut next_slot = self.next_slot;
        for listener in listeners {
            let key = SocketKey::of(listener);
            if let Some(running) = self.running.get(&key) {
                plan.slots.push((running.slot, running.bound));
                plan.kept.push(key);
                continue;
            }
            let bound = bind(&listener.name, listener.address).and_then(|socket| {
                let address = socket.local_addr().map_err(|source| BindError {
                    listener: listener.name.to_string(),
                    address: listener.address,
                    source,
                })?;
                Ok((socket, address))
            });
            match bound {
                Ok((socket, address)) => {
                    plan.slots.push((next_slot, address));
                    plan.new
                        .push((key, next_slot, socket, address, listener.max_connections));
                    next_slot += 1;
                }
                Err(error) => errors.push(error),
            }
        }
        if errors.is_empty() {
            self.next_slot = next_slot;
            Ok(plan)
        } else {
            Err(errors)
        }
    }

    /// Starts the plan's new listeners on `runtime`, stops the listeners it
    /// does not keep, and updates connection limits. Call it right after
    /// publishing the snapshot built from the plan's slots.
    pub(crate) fn commit(
        &mut self,
        plan: ListenerPlan,
        listeners: &[crate::config::Listener],
        shared: &Shared,
        drain: &Drain,
        runtime: &tokio::runtime::Handle,
    ) {
        let limits: HashMap<SocketKey, u32> = listeners
            .iter()
            .map(|l| (SocketKey::of(l), l.max_connections))
            .collect();
        let kept: std::collections::HashSet<SocketKey> = plan.kept.into_iter().collect();
        self.running.retain(|key, running| {
            if kept.contains(key) {
                return true;
            }
            tracing::info!(address = %running.bound, "listener removed; draining its connections");
            running.drain.signal();
            false
        });
        for (key, running) in &mut self.running {
            let Some(&max) = limits.get(key) else {
                continue;
            };
            if max > running.max_connections {
                running
                    .limit
                    .add_permits((max - running.max_connections) as usize);
            } else if max < running.max_connections {
                // Only permits not in use can be withdrawn now; connections
                // over the new limit finish normally.
                running
                    .limit
                    .forget_permits((running.max_connections - max) as usize);
            }
            running.max_connections = max;
        }
        for (key, slot, socket, bound, max_connections) in plan.new {
            tracing::info!(address = %bound, slot, "listening");
            let limit = Arc::new(Semaphore::new(max_connections as usize));
            let listener_drain = drain.child();
            drain.spawn_on(
                accept_loop(
                    socket,
                    slot,
                    shared.clone(),
                    listener_drain.clone(),
                    limit.clone(),
                ),
                runtime,
            );
            self.running.insert(
                key,
                Running {
                    slot,
                    bound,
                    limit,
                    max_connections,
                    drain: listener_drain,
                },
            );
        }
    }
}

/// Runs one listener's accept loop until its drain signal.
async fn accept_loop(
    listener: std::net::TcpListener,
    index: usize,
    shared: Shared,
    drain: Drain,
    limit: Arc<Semaphore>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, slot = index, "listener setup failed");
            return;
        }
    };
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
    // PERF: one read takes the whole of a typical request head, so that
    // hyper finds it already read; reading just the 24 bytes that decide
    // the protocol cost a second read system call on every new connection
    // (see benches/RESULTS.md). The buffer goes once hyper has taken its
    // bytes.
    let mut buffer = BytesMut::with_capacity(DETECT_READ_BYTES);
    let read = async {
        loop {
            let n = stream.read_buf(&mut buffer).await.ok()?;
            if n == 0 {
                return None;
            }
            let len = buffer.len().min(H2_PREFACE.len());
            if buffer[..len] != H2_PREFACE[..len] {
                return Some(Protocol::Http1);
            }
            if len == H2_PREFACE.len() {
                return Some(Protocol::Http2);
            }
        }
    };
    let protocol = tokio::time::timeout(deadline, read).await.ok()??;
    metrics
        .bytes_received
        .fetch_add(buffer.len() as u64, Relaxed);
    // The first request's head began with the bytes just read.
    state.on_read();
    let prefix = buffer.freeze();
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
            if this.prefix.is_empty() {
                // An empty slice would still hold the whole buffer.
                this.prefix = Bytes::new();
            }
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
