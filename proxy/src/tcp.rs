//! L4 forwarding: pick an endpoint, connect, move bytes both ways; and
//! [`splice`], the drain- and idle-bounded copy that upgraded HTTP
//! connections (WebSocket) use.
//!
//! A TCP listener's connection is forwarded by [`Forward`], which holds no
//! buffer while the connection is quiet: it waits for the socket to become
//! readable, borrows a buffer for the bytes that are there, and gives it
//! back once they are written. A sidecar in front of a database pool or a
//! message broker keeps thousands of quiet connections open; each then
//! costs its task and its sockets, not 64 KiB of buffers. Bytes are counted
//! as they move, so `/metrics` shows a long-lived connection's traffic
//! before it closes. A connection on which no byte has moved either way
//! for the listener's `idle_timeout` is closed.
//!
//! An opaque stream is not cut by the drain signal (there is no graceful
//! close for it); it runs until either side closes, it idles out, or the
//! drain timeout passes after the signal (the process's, or its listener's
//! when a configuration removed the listener).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::{Instant, Sleep};

use crate::drain::Drain;
use crate::stack::TcpListener;
use crate::telemetry::istio::TcpSeries;
use crate::telemetry::trace::ConnectionSpan;
use crate::transport::{PeerCert, Stream, accept_opaque};

/// The most bytes moved per read, per direction.
///
/// PERF: `weft-bench compare --scenario tcp` (64 KiB echoed per round
/// trip, 3 rounds): tokio's default 8 KiB gave 606 MB/s at 106.8 µs of
/// proxy CPU per round trip; 32 KiB gives 739 MB/s at 80.3 µs, and 64 KiB
/// no more (742 MB/s, 77.7 µs). nginx and HAProxy buffer 16 KiB per
/// direction. The buffer is held only while bytes are in flight.
const TCP_BUFFER_BYTES: usize = 32 * 1024;

/// Marks the connection's span, if it has one, failed for `flag`.
fn fail(span: &mut Option<Box<ConnectionSpan>>, flag: &'static str) {
    if let Some(span) = span {
        span.fail(flag);
    }
}

/// Makes dropping `downstream` send RST rather than FIN (a zero linger): a
/// connection refused outright.
fn reset_on_close(downstream: &mut Stream) {
    if let Some(client) = downstream.as_tcp_mut() {
        let _ = socket2::SockRef::from(&*client).set_linger(Some(Duration::ZERO));
    }
}

/// Forwards one accepted connection to the listener's cluster.
///
/// `held` is what the connection holds while it lives (its place under the
/// listener's connection limit, its count): dropped when it ends.
pub(crate) async fn proxy(
    mut downstream: Stream,
    peer: SocketAddr,
    listener: Arc<TcpListener>,
    drain: Drain,
    held: impl Send + 'static,
) {
    let _held = held;
    let name = &listener.config.name;
    // Ends (and is queued) when the connection does, on every way out.
    let mut span = listener
        .tracer
        .as_ref()
        .and_then(|tracer| ConnectionSpan::begin(tracer, peer, name));
    if let Some(faults) = &listener.faults
        && faults.apply(&listener.metrics).await
    {
        tracing::debug!(listener = %name, peer.addr = %peer, "fault: connection reset");
        fail(&mut span, "fault_abort");
        reset_on_close(&mut downstream);
        return;
    }
    // TLS terminated here (the mesh's mutual TLS): the client's
    // certificate names it for the policy, the metrics and the span, and
    // the connection ends when that certificate expires.
    let mut client: Option<Box<PeerCert>> = None;
    if let (Some(server), Some(tls)) = (&listener.tls, listener.config.tls.as_deref()) {
        let Some(plain) = downstream.into_tcp() else {
            return;
        };
        let Some((stream, cert)) = Box::pin(accept_opaque(
            plain,
            server,
            tls,
            TLS_HANDSHAKE_TIMEOUT,
            &listener.metrics,
        ))
        .await
        else {
            fail(&mut span, "downstream_tls_failure");
            return;
        };
        downstream = stream;
        client = cert;
    }
    let caller = client.as_ref().and_then(|cert| cert.identity.as_ref());
    if let Some(span) = &mut span {
        span.record.peer_identity = caller.cloned();
    }
    if let Some(policy) = &listener.policy {
        let own = listener
            .config
            .tls
            .as_ref()
            .and_then(|tls| tls.workload_identity.clone());
        let peers = crate::policy::Peers::new(peer, caller.cloned(), downstream.local_addr(), own);
        if !crate::policy::check_connection(policy, &peers) {
            tracing::debug!(listener = %name, peer.addr = %peer, "connection denied by policy");
            fail(&mut span, "policy_denied");
            reset_on_close(&mut downstream);
            return;
        }
    }
    // TLS passthrough: the ClientHello's server name picks the cluster;
    // its bytes are replayed to the upstream before anything else.
    let (cluster, hello) = if listener.sni_routes.is_empty() {
        (listener.cluster.clone(), Vec::new())
    } else {
        let Some(client) = downstream.as_tcp_mut() else {
            return;
        };
        // Boxed: the read holds a 4 KiB chunk, which would otherwise stay
        // in the connection's task for as long as the connection lives.
        let (hello, server_name) = match Box::pin(tokio::time::timeout(
            CLIENT_HELLO_TIMEOUT,
            read_client_hello(client),
        ))
        .await
        {
            Ok(Ok(read)) => read,
            Ok(Err(error)) => {
                tracing::debug!(listener = %name, peer.addr = %peer, %error, "tls passthrough: no ClientHello");
                listener.metrics.sni_unrouted.fetch_add(1, Relaxed);
                fail(&mut span, "malformed_request");
                return;
            }
            Err(_) => {
                tracing::debug!(listener = %name, peer.addr = %peer, "tls passthrough: no ClientHello in time");
                listener.metrics.sni_unrouted.fetch_add(1, Relaxed);
                fail(&mut span, "malformed_request");
                return;
            }
        };
        if let (Some(span), Some(server_name)) = (&mut span, &server_name) {
            span.l4().server_name = Some(server_name.as_str().into());
        }
        let routed = server_name.as_deref().and_then(|sni| {
            listener
                .sni_routes
                .iter()
                .find(|(route, _)| route.matches(sni))
                .map(|(_, cluster)| cluster.clone())
        });
        tracing::debug!(listener = %name, peer.addr = %peer, sni = ?server_name, routed = routed.is_some(), "tls passthrough");
        (routed.or_else(|| listener.cluster.clone()), hello)
    };
    let Some(cluster) = cluster else {
        listener.metrics.sni_unrouted.fetch_add(1, Relaxed);
        tracing::debug!(listener = %name, peer.addr = %peer, "tls passthrough: no route for this server name; closing");
        fail(&mut span, "no_route");
        return;
    };
    if let Some(span) = &mut span {
        span.record.cluster = Some(cluster.config.name.clone());
    }
    let endpoint = match cluster.pick() {
        Ok(endpoint) => endpoint,
        Err(error) => {
            tracing::debug!(listener = %name, peer.addr = %peer, %error, "tcp connection refused");
            fail(&mut span, error.flag());
            return;
        }
    };
    let _active = endpoint.begin();
    // The cluster's `max_connections` bounds its TCP connections too.
    let Some(_held) = endpoint.hold_tcp_connection() else {
        tracing::debug!(listener = %name, peer.addr = %peer, "tcp connection refused: the cluster's max_connections are all held");
        fail(&mut span, "upstream_overflow");
        reset_on_close(&mut downstream);
        return;
    };
    // An L4 stream offers HTTP/1.1 in ALPN if the cluster is TLS; what it
    // carries is opaque to the proxy either way.
    let connected = endpoint.connect(crate::cluster::Wire::Http1).await;
    cluster.observe_connect(&endpoint, connected.is_ok());
    let mut upstream = match connected {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(listener = %name, peer.addr = %peer, %error, "tcp upstream connect failed");
            fail(&mut span, error.flag());
            return;
        }
    };
    if let Some(span) = &mut span {
        span.l4().upstream = Some(endpoint.addr);
    }
    let metrics = &listener.metrics;
    // Counted as opened once the upstream answered, closed when dropped.
    let istio = listener
        .istio
        .as_ref()
        .map(|istio| istio.metrics.tcp_opened(istio.party(&cluster, caller)));
    if !hello.is_empty() {
        use tokio::io::AsyncWriteExt as _;
        if let Err(error) = upstream.write_all(&hello).await {
            tracing::debug!(listener = %name, peer.addr = %peer, %error, "tls passthrough: upstream write failed");
            fail(&mut span, "upstream_reset");
            return;
        }
        if let Some(span) = &mut span {
            span.l4().received += hello.len() as u64;
        }
        metrics
            .bytes_received
            .fetch_add(hello.len() as u64, Relaxed);
        if let Some(istio) = &istio {
            istio.received.fetch_add(hello.len() as u64, Relaxed);
        }
    }
    let idle_timeout = listener.config.idle_timeout;
    let ended =
        if let (Some(client), Some(server)) = (downstream.as_tcp_mut(), upstream.as_tcp_mut()) {
            let counters = Counters {
                from_client: &metrics.bytes_received,
                to_client: &metrics.bytes_sent,
                istio: istio.as_deref(),
            };
            let mut forward = std::pin::pin!(Forward::new(client, server, counters, idle_timeout));
            let ended = tokio::select! {
                ended = forward.as_mut() => ended,
                () = drain.deadline(listener.drain_timeout) => Ok(Ended::Drained),
            };
            if let Some(span) = &mut span {
                let (received, sent) = forward.bytes();
                let l4 = span.l4();
                l4.received += received;
                l4.sent += sent;
            }
            ended
        } else {
            // A TLS side cannot wait for readiness without a buffer: copy
            // through buffers held for the connection's life.
            let counters = Counters {
                from_client: &metrics.bytes_received,
                to_client: &metrics.bytes_sent,
                istio: istio.as_deref(),
            };
            let limits = Limits {
                buffer_bytes: TCP_BUFFER_BYTES,
                idle_timeout,
                drain: &drain,
                drain_timeout: listener.drain_timeout,
                until: client
                    .as_ref()
                    .map(|cert| Instant::from_std(crate::clock::instant_of(cert.not_after))),
            };
            // Boxed: the copy's buffers are on the heap anyway, and the
            // plain connection's future stays small.
            let (ended, (received, sent)) = Box::pin(splice_counted(
                &mut downstream,
                &mut upstream,
                &limits,
                Some(counters),
            ))
            .await;
            if let Some(span) = &mut span {
                let l4 = span.l4();
                l4.received += received;
                l4.sent += sent;
            }
            ended
        };
    match ended {
        Ok(Ended::Closed) => {}
        Ok(Ended::Idle) => {
            tracing::debug!(listener = %name, peer.addr = %peer, "idle timeout; closing tcp connection");
        }
        Ok(Ended::Drained) => {
            tracing::debug!(listener = %name, peer.addr = %peer, "drain timeout; closing tcp connection");
        }
        Ok(Ended::Expired) => {
            listener.metrics.tls_peer_expired.fetch_add(1, Relaxed);
            tracing::debug!(listener = %name, peer.addr = %peer, "the client's certificate expired; closing tcp connection");
        }
        Err(error) => {
            tracing::debug!(listener = %name, peer.addr = %peer, %error, "tcp connection ended with an error");
            fail(&mut span, "upstream_reset");
        }
    }
}

/// How long a client of a TLS-terminating TCP listener has to complete its
/// handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a passthrough client has to send its ClientHello.
const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes read looking for a ClientHello (a handshake message is
/// at most 16 MiB in theory; real ones, post-quantum key shares included,
/// fit in a few KiB).
const CLIENT_HELLO_MAX_BYTES: usize = 64 * 1024;

/// Why no server name could be read.
#[derive(Debug, thiserror::Error)]
enum HelloError {
    #[error("reading: {0}")]
    Io(#[from] io::Error),
    #[error("the client closed before its ClientHello was complete")]
    Closed,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(rustls::Error),
    #[error("the ClientHello is larger than {CLIENT_HELLO_MAX_BYTES} bytes")]
    TooLarge,
}

/// Reads a TLS ClientHello (rustls parses it; nothing is answered) and
/// returns the bytes read, to be replayed upstream, and the server name
/// (lower-case), if the client sent one.
async fn read_client_hello(
    client: &mut TcpStream,
) -> Result<(Vec<u8>, Option<String>), HelloError> {
    use tokio::io::AsyncReadExt as _;
    let mut acceptor = rustls::server::Acceptor::default();
    let mut read = Vec::new();
    let mut chunk = [0_u8; 4096];
    loop {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(HelloError::Closed);
        }
        read.extend_from_slice(&chunk[..n]);
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            if acceptor.read_tls(&mut fresh)? == 0 {
                return Err(HelloError::TooLarge);
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let name = accepted
                    .client_hello()
                    .server_name()
                    .map(str::to_ascii_lowercase);
                return Ok((read, name));
            }
            Ok(None) if read.len() > CLIENT_HELLO_MAX_BYTES => return Err(HelloError::TooLarge),
            Ok(None) => {}
            Err((error, _)) => return Err(HelloError::NotTls(error)),
        }
    }
}

/// Where [`Forward`] counts the bytes it has written, per direction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counters<'a> {
    /// Bytes read from the client and written upstream.
    pub(crate) from_client: &'a AtomicU64,
    /// Bytes read from the upstream and written to the client.
    pub(crate) to_client: &'a AtomicU64,
    /// The connection's Istio series, which counts them too.
    pub(crate) istio: Option<&'a TcpSeries>,
}

/// How a forwarded connection or a [`splice`] ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Both sides closed their sending half, and each close was passed on.
    Closed,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// The drain timeout passed after the drain signal.
    Drained,
    /// The client's certificate expired (a [`Limits::until`]).
    Expired,
}

/// Moves bytes between a client and an upstream socket until both have
/// closed their sending half (each close is passed on to the other side as
/// a half-close), one fails, or the connection idles out.
///
/// Cancel safety: dropping it drops whatever bytes it had read and not yet
/// written; the caller then closes both sockets.
#[derive(Debug)]
pub(crate) struct Forward<'a> {
    to_upstream: Half<'a>,
    to_client: Half<'a>,
    counters: Counters<'a>,
    /// When a byte last moved.
    last_activity: Instant,
    idle: IdleDeadline,
}

impl<'a> Forward<'a> {
    pub(crate) fn new(
        client: &'a mut TcpStream,
        upstream: &'a mut TcpStream,
        counters: Counters<'a>,
        idle_timeout: Duration,
    ) -> Self {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        Self {
            to_upstream: Half::new(client_read, upstream_write),
            to_client: Half::new(upstream_read, client_write),
            counters,
            last_activity: Instant::now(),
            idle: IdleDeadline::new(idle_timeout),
        }
    }

    /// Bytes written so far: from the client upstream, and back.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (self.to_upstream.total, self.to_client.total)
    }

    /// Buffers held now (0 while no bytes are in flight).
    #[cfg(test)]
    fn buffers_held(&self) -> usize {
        usize::from(self.to_upstream.buffer.is_some())
            + usize::from(self.to_client.buffer.is_some())
    }
}

impl Future for Forward<'_> {
    type Output = io::Result<Ended>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut moved = false;
        let istio = this.counters.istio;
        let up = this.to_upstream.poll_transfer(
            cx,
            (this.counters.from_client, istio.map(|s| &s.received)),
            &mut moved,
        )?;
        let down = this.to_client.poll_transfer(
            cx,
            (this.counters.to_client, istio.map(|s| &s.sent)),
            &mut moved,
        )?;
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Ok(Ended::Closed));
        }
        if moved {
            this.last_activity = Instant::now();
        }
        ready!(this.idle.poll_expired(cx, this.last_activity));
        Poll::Ready(Ok(Ended::Idle))
    }
}

/// A deadline `timeout` after the last activity. The timer is pushed out
/// when it fires, not re-armed on every byte.
#[derive(Debug)]
struct IdleDeadline {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleDeadline {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Ready once `timeout` has passed since `last_activity`.
    fn poll_expired(&mut self, cx: &mut Context<'_>, last_activity: Instant) -> Poll<()> {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let deadline = last_activity + self.timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// One direction: reads from one socket, writes to the other.
#[derive(Debug)]
struct Half<'a> {
    from: ReadHalf<'a>,
    to: WriteHalf<'a>,
    /// Read and not yet written: `buffer[written..]`. `None` while the
    /// direction waits for bytes.
    buffer: Option<Vec<u8>>,
    written: usize,
    /// The source closed its sending half.
    is_eof: bool,
    /// The close was passed on: this direction is finished.
    is_done: bool,
    /// Bytes written so far.
    total: u64,
}

impl<'a> Half<'a> {
    fn new(from: ReadHalf<'a>, to: WriteHalf<'a>) -> Self {
        Self {
            from,
            to,
            buffer: None,
            written: 0,
            is_eof: false,
            is_done: false,
            total: 0,
        }
    }

    /// Moves what can be moved now. Ready once the source's close has been
    /// passed on; sets `moved` when any byte was read or written.
    fn poll_transfer(
        &mut self,
        cx: &mut Context<'_>,
        (counter, also): (&AtomicU64, Option<&AtomicU64>),
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        if self.is_done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(buffer) = &self.buffer
                && self.written < buffer.len()
            {
                let to: &TcpStream = self.to.as_ref();
                ready!(to.poll_write_ready(cx))?;
                match to.try_write(&buffer[self.written..]) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.written += n;
                        self.total += n as u64;
                        counter.fetch_add(n as u64, Relaxed);
                        if let Some(also) = also {
                            also.fetch_add(n as u64, Relaxed);
                        }
                        *moved = true;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => return Poll::Ready(Err(error)),
                }
                continue;
            }
            if self.is_eof {
                self.buffer = None;
                ready!(Pin::new(&mut self.to).poll_shutdown(cx))?;
                self.is_done = true;
                return Poll::Ready(Ok(()));
            }
            // Everything read has been written: wait for more without
            // holding a buffer.
            let from: &TcpStream = self.from.as_ref();
            if from.poll_read_ready(cx)?.is_pending() {
                self.buffer = None;
                return Poll::Pending;
            }
            let buffer = self
                .buffer
                .get_or_insert_with(|| Vec::with_capacity(TCP_BUFFER_BYTES));
            buffer.clear();
            self.written = 0;
            match from.try_read_buf(buffer) {
                Ok(0) => self.is_eof = true,
                Ok(_) => *moved = true,
                // The readiness was stale; the next poll registers again.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

/// Copies bytes both ways, with `buffer_bytes` buffered per direction,
/// until either side closes, no byte has been read from either side for
/// `idle_timeout`, `drain_timeout` has passed since the drain signal, or
/// `until` (the client's certificate expires).
/// For streams other than two `TcpStream`s (an upgraded HTTP connection),
/// whose buffers live as long as the copy.
pub(crate) async fn splice<A, B>(
    a: &mut A,
    b: &mut B,
    buffer_bytes: usize,
    idle_timeout: Duration,
    drain: &Drain,
    drain_timeout: Duration,
    until: Option<Instant>,
) -> io::Result<Ended>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let limits = Limits {
        buffer_bytes,
        idle_timeout,
        drain,
        drain_timeout,
        until,
    };
    splice_counted(a, b, &limits, None).await.0
}

/// What bounds a [`splice`].
pub(crate) struct Limits<'a> {
    pub(crate) buffer_bytes: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) drain: &'a Drain,
    pub(crate) drain_timeout: Duration,
    /// When the copy must end whatever moves (the client's certificate
    /// expires).
    pub(crate) until: Option<Instant>,
}

/// A [`splice`] between a client (`client`) and an upstream (`upstream`)
/// that counts the bytes written each way, as [`Forward`] does, in
/// `counters` when given; also returns them (from the client, to the
/// client).
pub(crate) async fn splice_counted<A, B>(
    client: &mut A,
    upstream: &mut B,
    limits: &Limits<'_>,
    counters: Option<Counters<'_>>,
) -> (io::Result<Ended>, (u64, u64))
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let activity = Activity {
        start: Instant::now(),
        last_read_nanos: AtomicU64::new(0),
    };
    let mut a = Watched {
        io: client,
        activity: &activity,
        written: 0,
        counters: counters.map(|c| (c.to_client, c.istio.map(|s| &s.sent))),
    };
    let mut b = Watched {
        io: upstream,
        activity: &activity,
        written: 0,
        counters: counters.map(|c| (c.from_client, c.istio.map(|s| &s.received))),
    };
    let ended = {
        let copy = tokio::io::copy_bidirectional_with_sizes(
            &mut a,
            &mut b,
            limits.buffer_bytes,
            limits.buffer_bytes,
        );
        let mut idle = IdleDeadline::new(limits.idle_timeout);
        tokio::select! {
            copied = copy => copied.map(|_| Ended::Closed),
            () = std::future::poll_fn(|cx| idle.poll_expired(cx, activity.last_read())) => Ok(Ended::Idle),
            () = limits.drain.deadline(limits.drain_timeout) => Ok(Ended::Drained),
            () = until(limits.until) => Ok(Ended::Expired),
        }
    };
    (ended, (b.written, a.written))
}

/// Ready at `at`; never without one.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When a [`splice`] last read a byte, shared by its two sides.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Nanoseconds from `start` to the last read that returned bytes.
    last_read_nanos: AtomicU64,
}

impl Activity {
    fn record(&self) {
        // One task polls both sides, so the last store is the latest read.
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_read_nanos.store(nanos, Relaxed);
    }

    fn last_read(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_read_nanos.load(Relaxed))
    }
}

/// A stream that records each read that returned bytes, and counts the
/// bytes written to it.
struct Watched<'a, T: ?Sized> {
    io: &'a mut T,
    activity: &'a Activity,
    written: u64,
    /// The listener's counter and the connection's Istio series' for the
    /// bytes written here.
    counters: Option<(&'a AtomicU64, Option<&'a AtomicU64>)>,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Watched<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.record();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            let n = n as u64;
            this.written += n;
            if let Some((counter, istio)) = this.counters {
                counter.fetch_add(n, Relaxed);
                if let Some(istio) = istio {
                    istio.fetch_add(n, Relaxed);
                }
            }
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connect, listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    #[derive(Default)]
    struct Counted {
        from_client: AtomicU64,
        to_client: AtomicU64,
    }

    impl Counted {
        fn counters(&self) -> Counters<'_> {
            Counters {
                from_client: &self.from_client,
                to_client: &self.to_client,
                istio: None,
            }
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Asserts that `seconds` (and less than one more) passed since `start`
    /// on the paused clock.
    fn assert_ended_at(start: Instant, seconds: u64) {
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(seconds) && elapsed < Duration::from_secs(seconds + 1),
            "ended after {elapsed:?}"
        );
    }

    #[tokio::test]
    async fn bytes_move_both_ways_and_each_close_is_passed_on() {
        let (mut client, mut client_side) = pair().await;
        let (mut upstream_side, mut upstream) = pair().await;
        let counted = Counted::default();
        let forward = Forward::new(
            &mut client_side,
            &mut upstream_side,
            counted.counters(),
            HOUR,
        );
        let request: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let apps = async {
            client.write_all(&request).await.unwrap();
            client.shutdown().await.unwrap();
            let mut received = Vec::new();
            upstream.read_to_end(&mut received).await.unwrap();
            assert_eq!(
                received, request,
                "the upstream sees the client's bytes, then its close"
            );
            // The upstream may still answer after the client's half-close.
            upstream.write_all(b"answer").await.unwrap();
            upstream.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, b"answer");
        };
        let (ended, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(forward, apps)
        })
        .await
        .unwrap();
        assert_eq!(ended.unwrap(), Ended::Closed);
        assert_eq!(counted.from_client.load(Relaxed), 200_000);
        assert_eq!(counted.to_client.load(Relaxed), 6);
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_buffer_and_counts_bytes_as_they_move() {
        let (mut client, mut client_side) = pair().await;
        let (mut upstream_side, mut upstream) = pair().await;
        let counted = Counted::default();
        let mut forward = pin!(Forward::new(
            &mut client_side,
            &mut upstream_side,
            counted.counters(),
            HOUR,
        ));
        for round in 1..=3u64 {
            client.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            tokio::select! {
                ended = forward.as_mut() => panic!("forwarding ended: {ended:?}"),
                read = upstream.read_exact(&mut buf) => { read.unwrap(); }
            }
            upstream.write_all(b"pong").await.unwrap();
            tokio::select! {
                ended = forward.as_mut() => panic!("forwarding ended: {ended:?}"),
                read = client.read_exact(&mut buf) => { read.unwrap(); }
            }
            assert_eq!(&buf, b"pong");
            // Everything read has been written, so the poll that wrote it
            // went on to wait for more with no buffer.
            assert_eq!(forward.buffers_held(), 0, "round {round}");
            assert_eq!(counted.from_client.load(Relaxed), 4 * round);
            assert_eq!(counted.to_client.load(Relaxed), 4 * round);
        }
        // The client's close is passed on; the direction it closed keeps
        // no buffer while the other stays open.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::select! {
            ended = forward.as_mut() => panic!("forwarding ended: {ended:?}"),
            read = upstream.read_to_end(&mut rest) => { read.unwrap(); }
        }
        assert!(rest.is_empty());
        assert_eq!(forward.buffers_held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_closed_after_the_idle_timeout_counted_from_its_last_byte() {
        let (mut client, mut client_side) = pair().await;
        let (mut upstream_side, mut upstream) = pair().await;
        let counted = Counted::default();
        let idle_timeout = Duration::from_secs(30);
        let start = Instant::now();
        let mut forward = pin!(Forward::new(
            &mut client_side,
            &mut upstream_side,
            counted.counters(),
            idle_timeout,
        ));
        // A byte at 20 s moves the deadline to 50 s.
        let traffic = async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            client.write_all(b"x").await.unwrap();
            let mut buf = [0u8; 1];
            upstream.read_exact(&mut buf).await.unwrap();
        };
        tokio::select! {
            ended = forward.as_mut() => panic!("ended before the traffic: {ended:?}"),
            () = traffic => {}
        }
        assert_eq!(forward.await.unwrap(), Ended::Idle);
        assert_ended_at(start, 50);
    }

    #[tokio::test(start_paused = true)]
    async fn a_splice_is_cut_after_the_idle_timeout_from_its_last_read() {
        let (mut client, mut client_side) = tokio::io::duplex(1024);
        let (mut upstream_side, mut upstream) = tokio::io::duplex(1024);
        let drain = Drain::new();
        let start = Instant::now();
        let mut splice = pin!(splice(
            &mut client_side,
            &mut upstream_side,
            1024,
            Duration::from_secs(30),
            &drain,
            Duration::from_secs(10),
            None,
        ));
        // A byte each way at 20 s moves the cut to 50 s.
        let traffic = async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            let mut buf = [0u8; 1];
            client.write_all(b"x").await.unwrap();
            upstream.read_exact(&mut buf).await.unwrap();
            upstream.write_all(b"y").await.unwrap();
            client.read_exact(&mut buf).await.unwrap();
        };
        tokio::select! {
            ended = splice.as_mut() => panic!("ended before the traffic: {ended:?}"),
            () = traffic => {}
        }
        assert_eq!(splice.await.unwrap(), Ended::Idle);
        assert_ended_at(start, 50);
    }

    #[tokio::test]
    async fn a_counted_splice_counts_what_it_writes_each_way() {
        // Pipes that hold everything sent, so that the client may finish
        // writing before the upstream reads.
        let (mut client, mut client_side) = tokio::io::duplex(64 * 1024);
        let (mut upstream_side, mut upstream) = tokio::io::duplex(64 * 1024);
        let drain = Drain::new();
        let counted = Counted::default();
        let limits = Limits {
            buffer_bytes: 512,
            idle_timeout: Duration::from_secs(60),
            drain: &drain,
            drain_timeout: Duration::from_secs(10),
            until: None,
        };
        let splice = splice_counted(
            &mut client_side,
            &mut upstream_side,
            &limits,
            Some(counted.counters()),
        );
        let traffic = async {
            // More than a buffer's worth up, a few bytes down, then closes.
            let up = vec![7u8; 5_000];
            client.write_all(&up).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, up);
            upstream.write_all(b"answer").await.unwrap();
            upstream.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"answer");
        };
        let ((ended, moved), ()) = tokio::join!(splice, traffic);
        assert_eq!(ended.unwrap(), Ended::Closed);
        assert_eq!(moved, (5_000, 6));
        assert_eq!(counted.from_client.load(Relaxed), 5_000);
        assert_eq!(counted.to_client.load(Relaxed), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_splice_ends_when_the_clients_certificate_expires() {
        let (mut client, mut client_side) = tokio::io::duplex(1024);
        let (mut upstream_side, mut upstream) = tokio::io::duplex(1024);
        let drain = Drain::new();
        let start = Instant::now();
        let splice = splice(
            &mut client_side,
            &mut upstream_side,
            1024,
            Duration::from_secs(3600),
            &drain,
            Duration::from_secs(10),
            Some(start + Duration::from_secs(40)),
        );
        // Bytes keep moving: only the expiry ends it.
        let traffic = async {
            let mut buf = [0u8; 1];
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                client.write_all(b"x").await.unwrap();
                upstream.read_exact(&mut buf).await.unwrap();
            }
        };
        let ended = tokio::select! {
            ended = splice => ended,
            () = traffic => panic!("the splice outlived the certificate"),
        };
        assert_eq!(ended.unwrap(), Ended::Expired);
        assert_ended_at(start, 40);
    }

    #[tokio::test(start_paused = true)]
    async fn a_splice_is_cut_at_the_drain_timeout_after_the_signal() {
        let (_client, mut client_side) = tokio::io::duplex(1024);
        let (mut upstream_side, _upstream) = tokio::io::duplex(1024);
        let drain = Drain::new();
        let start = Instant::now();
        let splice = splice(
            &mut client_side,
            &mut upstream_side,
            1024,
            Duration::from_secs(3600),
            &drain,
            Duration::from_secs(10),
            None,
        );
        let signal = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drain.signal();
        };
        let (ended, ()) = tokio::join!(splice, signal);
        assert_eq!(ended.unwrap(), Ended::Drained);
        assert_eq!(start.elapsed().as_secs(), 15);
    }

    #[tokio::test]
    async fn a_reset_upstream_ends_forwarding_with_an_error() {
        let (_client, mut client_side) = pair().await;
        let (mut upstream_side, upstream) = pair().await;
        let counted = Counted::default();
        let forward = Forward::new(
            &mut client_side,
            &mut upstream_side,
            counted.counters(),
            HOUR,
        );
        // Linger 0 makes the close a reset.
        socket2::SockRef::from(&upstream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(upstream);
        let ended = tokio::time::timeout(Duration::from_secs(10), forward)
            .await
            .unwrap();
        assert!(ended.is_err(), "{ended:?}");
    }
}
