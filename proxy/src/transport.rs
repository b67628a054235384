//! The transport seam: the byte streams connections run on, and what is
//! known of the peer at the other end.
//!
//! Every downstream and upstream connection is a [`Stream`]: plain TCP, or
//! TLS (rustls) terminated or originated here, with what the peer's
//! certificate proved kept beside it ([`PeerCert`]). The HTTP server and
//! client take any [`Stream`], and the L4 forwarder asks for the raw TCP
//! socket only for its buffer-free fast path.
//!
//! [`detect`] finds the HTTP version a cleartext connection speaks from its
//! first bytes: the HTTP/2 connection preface means HTTP/2 (prior
//! knowledge), anything else HTTP/1.x. (Under TLS, ALPN says.)
//! [`DownstreamIo`] is a downstream connection as the HTTP server reads it:
//! the bytes read during detection replayed first, bytes counted
//! both ways, and the reads reported to [`ConnState`], which keeps what the
//! connection's deadlines need.
//!
//! This module depends only on `telemetry` (for byte counters).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

mod sys;

use crate::telemetry::ListenerMetrics;
use crate::tls::PeerCheck;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes asked for by each read while the protocol is being detected.
const DETECT_READ_BYTES: usize = 4096;

/// The HTTP version a downstream connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

/// A connection's byte stream.
#[derive(Debug)]
pub(crate) enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS terminated here. Boxed: rustls's connection state is large and
    /// most connections are plain.
    TlsServer(Box<tokio_rustls::server::TlsStream<sys::Socket>>),
    /// TLS originated here, to an upstream.
    TlsClient(Box<tokio_rustls::client::TlsStream<sys::Socket>>),
}

impl Stream {
    /// The connection's local address (this proxy's end).
    pub(crate) fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Self::Tcp(stream) => stream.local_addr().ok(),
            Self::TlsServer(tls) => tls.get_ref().0.tcp().local_addr().ok(),
            Self::TlsClient(tls) => tls.get_ref().0.tcp().local_addr().ok(),
        }
    }

    /// The raw TCP socket, when the stream is plain TCP: the L4 forwarder
    /// then moves bytes with no buffer held between reads.
    pub(crate) fn as_tcp_mut(&mut self) -> Option<&mut TcpStream> {
        match self {
            Self::Tcp(stream) => Some(stream),
            Self::TlsServer(_) | Self::TlsClient(_) => None,
        }
    }

    /// The raw TCP socket of a plain stream, taken out of it (to start
    /// TLS on it).
    pub(crate) fn into_tcp(self) -> Option<TcpStream> {
        match self {
            Self::Tcp(stream) => Some(stream),
            Self::TlsServer(_) | Self::TlsClient(_) => None,
        }
    }

    /// Ready when the peer has sent more (true) or closed (false); holds
    /// no buffer and, being a poll, adds nothing to the waiting future.
    pub(crate) fn poll_wait_for_data(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut probe = [0u8; 1];
        let socket = match self {
            Self::Tcp(stream) => stream,
            // Bytes on the socket; rustls may also hold decrypted ones, so
            // TLS connections are never parked (see `http::server`).
            Self::TlsServer(stream) => stream.get_ref().0.tcp(),
            Self::TlsClient(stream) => stream.get_ref().0.tcp(),
        };
        socket
            .poll_peek(cx, &mut ReadBuf::new(&mut probe))
            .map(|peeked| matches!(peeked, Ok(n) if n > 0))
    }

    /// Opens a plain TCP connection with `TCP_NODELAY` (small requests and
    /// responses must not wait for Nagle).
    ///
    /// Cancel safety: cancel safe.
    pub(crate) async fn connect(address: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(address).await?;
        let _ = stream.set_nodelay(true);
        Ok(Self::Tcp(stream))
    }

    /// Originates TLS on a plain stream, verifying the server as `config`
    /// says; `server_name` is sent as SNI (`None`: the address stands in,
    /// and no SNI is sent).
    ///
    /// Cancel safety: cancel safe (the stream is dropped).
    /// For a TLS client stream: when the server's certificate expires.
    pub(crate) fn server_not_after(&self) -> Option<std::time::SystemTime> {
        let Self::TlsClient(stream) = self else {
            return None;
        };
        let leaf = stream.get_ref().1.peer_certificates()?.first()?;
        crate::config::tls::not_after(leaf)
    }

    pub(crate) async fn start_tls(
        self,
        config: &Arc<rustls::ClientConfig>,
        server_name: Option<&rustls_pki_types::ServerName<'static>>,
        address: SocketAddr,
    ) -> io::Result<Self> {
        let Self::Tcp(tcp) = self else {
            return Err(io::Error::other("TLS over TLS is not supported"));
        };
        let name = server_name
            .cloned()
            .unwrap_or_else(|| rustls_pki_types::ServerName::IpAddress(address.ip().into()));
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        // Boxed: the handshake's state is large and rare next to a request.
        let stream = Box::pin(connector.connect(name, sys::Socket::new(tcp))).await?;
        Ok(Self::TlsClient(Box::new(stream)))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => sys::poll_read::<{ sys::PLAIN }>(stream, cx, buf),
            Self::TlsServer(stream) => Pin::new(&mut **stream).poll_read(cx, buf),
            Self::TlsClient(stream) => Pin::new(&mut **stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(stream) => sys::poll_write::<{ sys::PLAIN }>(stream, cx, data),
            Self::TlsServer(stream) => Pin::new(&mut **stream).poll_write(cx, data),
            Self::TlsClient(stream) => Pin::new(&mut **stream).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(stream) => sys::poll_write_vectored::<{ sys::PLAIN }>(stream, cx, bufs),
            Self::TlsServer(stream) => Pin::new(&mut **stream).poll_write_vectored(cx, bufs),
            Self::TlsClient(stream) => Pin::new(&mut **stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(stream) => stream.is_write_vectored(),
            Self::TlsServer(stream) => stream.is_write_vectored(),
            Self::TlsClient(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Self::TlsServer(stream) => Pin::new(&mut **stream).poll_flush(cx),
            Self::TlsClient(stream) => Pin::new(&mut **stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::TlsServer(stream) => Pin::new(&mut **stream).poll_shutdown(cx),
            Self::TlsClient(stream) => Pin::new(&mut **stream).poll_shutdown(cx),
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
    // the HTTP codec finds it already read; reading just the 24 bytes that
    // decide the protocol cost a second read system call on every new
    // connection (see benches/RESULTS.md). The buffer goes once the codec
    // has taken its bytes.
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
            stream: Stream::Tcp(stream),
            prefix,
            metrics,
            state,
            peer: None,
        },
        protocol,
    ))
}

/// Completes a TLS handshake within `deadline` and checks the client's
/// certificate as the listener says. `None` when the handshake failed,
/// timed out or the client was refused (counted; the connection is then
/// dropped).
async fn handshake(
    stream: TcpStream,
    config: &Arc<rustls::ServerConfig>,
    tls: &crate::config::ListenerTls,
    deadline: Duration,
    metrics: &ListenerMetrics,
) -> Option<(Stream, Option<Box<PeerCert>>)> {
    // Boxed: the handshake's state (rustls's connection and buffers) would
    // otherwise sit in every connection's task, TLS or not.
    let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
    let handshake = Box::pin(acceptor.accept(sys::Socket::new(stream)));
    let stream = match tokio::time::timeout(deadline, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            metrics.tls_handshake_failures.fetch_add(1, Relaxed);
            tracing::debug!(%error, "tls handshake failed");
            return None;
        }
        Err(_) => {
            metrics.tls_handshake_failures.fetch_add(1, Relaxed);
            tracing::debug!("tls handshake timed out");
            return None;
        }
    };
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first);
    let peer = match crate::tls::check_peer(tls, leaf) {
        PeerCheck::Anonymous => None,
        PeerCheck::Verified(identity, not_after) => Some(Box::new(PeerCert {
            identity,
            not_after,
        })),
        PeerCheck::Refused(reason) => {
            metrics.tls_peer_refused.fetch_add(1, Relaxed);
            tracing::debug!(reason, "tls client refused");
            return None;
        }
    };
    Some((Stream::TlsServer(Box::new(stream)), peer))
}

/// Completes a TLS handshake within `deadline`; the protocol is what ALPN
/// chose (`h2`, else HTTP/1.1). `None` when the handshake failed or timed
/// out (counted; the connection is then dropped).
pub(crate) async fn accept_tls(
    stream: TcpStream,
    config: &Arc<rustls::ServerConfig>,
    tls: &crate::config::ListenerTls,
    deadline: Duration,
    metrics: Arc<ListenerMetrics>,
    state: Arc<ConnState>,
) -> Option<(DownstreamIo, Protocol)> {
    let (stream, peer) = handshake(stream, config, tls, deadline, &metrics).await?;
    let protocol = match &stream {
        Stream::TlsServer(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => Protocol::Http2,
        _ => Protocol::Http1,
    };
    Some((
        DownstreamIo {
            stream,
            prefix: Bytes::new(),
            metrics,
            state,
            peer,
        },
        protocol,
    ))
}

/// An opaque (L4) connection on a listener that terminates TLS: the
/// handshake within `deadline`, or with a permissive listener plaintext
/// too, told apart by the first byte ([`opens_with_tls`]). The
/// stream and what the client's certificate proved; `None` when the
/// connection is refused (counted) or sent nothing in time.
pub(crate) async fn accept_opaque(
    stream: TcpStream,
    config: &Arc<rustls::ServerConfig>,
    tls: &crate::config::ListenerTls,
    deadline: Duration,
    metrics: &ListenerMetrics,
) -> Option<(Stream, Option<Box<PeerCert>>)> {
    if tls.permissive && !opens_with_tls(&stream, deadline).await? {
        return Some((Stream::Tcp(stream), None));
    }
    handshake(stream, config, tls, deadline, metrics).await
}

/// The content type of a TLS handshake record: a ClientHello's first byte.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A downstream connection: replays the bytes read for detection, then
/// reads the socket; counts bytes both ways.
#[derive(Debug)]
pub(crate) struct DownstreamIo {
    stream: Stream,
    /// Bytes already read from the socket that the next reader must see
    /// first (detection bytes, or what the HTTP codec had buffered when it
    /// let go).
    prefix: Bytes,
    metrics: Arc<ListenerMetrics>,
    state: Arc<ConnState>,
    /// What the client's certificate proved (mutual TLS); boxed, as most
    /// connections have none.
    peer: Option<Box<PeerCert>>,
}

/// What a client's verified certificate says.
#[derive(Debug)]
pub(crate) struct PeerCert {
    /// Its SPIFFE ID, if any.
    pub(crate) identity: Option<Arc<str>>,
    /// When it expires.
    pub(crate) not_after: std::time::SystemTime,
}

/// A permissive listener: TLS and plaintext on one port, told apart by the
/// client's first byte ([`opens_with_tls`]).
pub(crate) async fn accept_permissive(
    stream: TcpStream,
    config: &Arc<rustls::ServerConfig>,
    tls: &crate::config::ListenerTls,
    deadline: Duration,
    metrics: Arc<ListenerMetrics>,
    state: Arc<ConnState>,
) -> Option<(DownstreamIo, Protocol)> {
    if opens_with_tls(&stream, deadline).await? {
        accept_tls(stream, config, tls, deadline, metrics, state).await
    } else {
        detect(stream, deadline, metrics, state).await
    }
}

/// Whether a client opens with TLS: its first byte is a TLS handshake
/// record's (content type 22), looked at without consuming it. `None` when
/// it sent nothing within `deadline`, or closed.
async fn opens_with_tls(stream: &TcpStream, deadline: Duration) -> Option<bool> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) => Some(first[0] == TLS_HANDSHAKE_RECORD),
        _ => None,
    }
}

impl DownstreamIo {
    /// Whether the connection is TLS.
    pub(crate) fn is_tls(&self) -> bool {
        !matches!(self.stream, Stream::Tcp(_))
    }

    /// The connection's local address (this proxy's end).
    pub(crate) fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.local_addr()
    }

    /// The client's verified SPIFFE ID, when it presented one.
    pub(crate) fn peer_identity(&self) -> Option<&Arc<str>> {
        self.peer.as_ref()?.identity.as_ref()
    }

    /// When the client's certificate expires, when it presented one.
    pub(crate) fn peer_not_after(&self) -> Option<std::time::SystemTime> {
        self.peer.as_ref().map(|peer| peer.not_after)
    }

    /// A plain TCP connection with counters of its own, for tests.
    #[cfg(test)]
    pub(crate) fn plain_for_test(stream: TcpStream) -> Self {
        Self {
            stream: Stream::Tcp(stream),
            prefix: Bytes::new(),
            metrics: Arc::default(),
            state: Arc::new(ConnState::new(true)),
            peer: None,
        }
    }

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

    /// Whether [`Self::poll_read_ready`] tells when a read will find
    /// something: a plain connection with nothing put back. A TLS one may
    /// hold decrypted bytes that the socket's readiness does not show.
    pub(crate) fn waits_without_buffer(&self) -> bool {
        self.prefix.is_empty() && matches!(self.stream, Stream::Tcp(_))
    }

    /// Ready when a read may find bytes (or the end of the stream); at
    /// once unless [`Self::waits_without_buffer`]. Holds no buffer and
    /// makes no system call while readiness is unknown.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.stream {
            Stream::Tcp(stream) if self.waits_without_buffer() => stream.poll_read_ready(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// Ready when the client has sent more (true) or closed the
    /// connection (false); holds no buffer.
    pub(crate) fn poll_wait_for_data(&self, cx: &mut Context<'_>) -> Poll<bool> {
        if !self.prefix.is_empty() {
            return Poll::Ready(true);
        }
        self.stream.poll_wait_for_data(cx)
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

/// What a connection's deadlines need to know: requests in flight, when
/// the last one finished, and when the bytes of a not-yet-parsed request
/// head began to arrive.
///
/// The header timeout starts at the first byte of a request head (not
/// while a keep-alive connection waits for its next request), the idle
/// timeout when the last response ends.
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
            born: crate::clock::coarse_now(),
            track_heads: std::sync::atomic::AtomicBool::new(track_heads),
            in_flight: AtomicU32::new(0),
            started: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            last_done_ms: AtomicU64::new(1),
        }
    }

    fn now_ms(&self) -> u64 {
        let elapsed = crate::clock::coarse_now().saturating_duration_since(self.born);
        u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn instant(&self, ms: u64) -> Instant {
        self.born + Duration::from_millis(ms.saturating_sub(1))
    }

    pub(crate) fn on_read(&self) {
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
