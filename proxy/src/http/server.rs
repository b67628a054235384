//! Serving one downstream HTTP connection, and the per-request path up to
//! the route's stack: limits, connection telemetry, routing, header rules,
//! weighted split, upgrades, and recording the outcome.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Request, Response, Uri, Version, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower::Service;
use tracing::Instrument;

use super::body::{self, Finish, IstioFinish, ResponseBody};
use super::error::{Decision, is_grpc, to_response};
use super::h1;
use super::headers;
use super::router::RequestParts;
use crate::body::{ClientBody, RequestBody};
use crate::config::IstioReporter;
use crate::drain::{Drain, TrackedExecutor};
use crate::error::ProxyError;
use crate::policy::{self, Peers, RequestPeers};
use crate::resilience::rate_limit::{Client, HeldBucket, limited};
use crate::stack::{HttpListener, ListenerSnapshot, PreparedRoute, Shared};
use crate::tcp::Ended;
use crate::telemetry::istio::{self, IstioMetrics};
use crate::telemetry::trace::{self, Context, Kind, OpenSpan, Outbound, SpanRecord, Tracer};
use crate::telemetry::{AccessRecord, ListenerMetrics, RequestMetrics};
use crate::transport::{ConnState, DownstreamIo, Protocol, accept_permissive, accept_tls, detect};

/// Deadline checks never run closer together than this.
const MIN_CHECK: Duration = Duration::from_millis(10);

/// Per-connection state shared by the connection's requests.
#[derive(Debug)]
struct Connection {
    index: usize,
    peer: SocketAddr,
    peer_ip: HeaderValue,
    /// TLS terminated on this connection.
    is_tls: bool,
    /// `x-forwarded-client-cert` for a client that proved a SPIFFE ID.
    client_cert: Option<HeaderValue>,
    /// The SPIFFE ID the client proved (mutual TLS): for routing and the
    /// access log.
    peer_id: Option<Arc<str>>,
    /// Both ends of the connection, for policy input: made by the first
    /// request a policy decides (most connections meet none).
    peers: std::sync::OnceLock<Arc<Peers>>,
    /// This end's address, for `peers`.
    local: Option<SocketAddr>,
    /// This end's SPIFFE ID (the listener's workload identity), for `peers`.
    own_identity: Option<Arc<str>>,
    /// Who the client is, for per-client limits and source conditions:
    /// its SPIFFE ID, else its IP address.
    client: Client,
    /// Its bucket in the listener's per-client rate limit.
    client_bucket: HeldBucket,
    /// Its request counter on this listener.
    source_requests: Option<Arc<std::sync::atomic::AtomicU64>>,
    shared: Shared,
    drain: Drain,
    state: Arc<ConnState>,
    /// The upstream side of an upgrade answered with 101, waiting for the
    /// connection to hand its socket over.
    upgrade: std::sync::Mutex<Option<hyper::upgrade::OnUpgrade>>,
    /// When the client's certificate expires (mutual TLS).
    peer_expiry: Option<Instant>,
    /// The listener's counters.
    metrics: Arc<ListenerMetrics>,
    /// The listener's deadlines as they were when the client connected.
    deadlines: Deadlines,
    /// A destination reporter's Istio party for this client, numbered by
    /// the listener's metrics as they were when it connected.
    istio_caller: Option<(Arc<IstioMetrics>, u32)>,
}

impl Connection {
    /// The client's Istio party in `metrics` (numbered once per
    /// connection, again only after a configuration change).
    fn istio_caller(&self, metrics: &Arc<IstioMetrics>) -> u32 {
        match &self.istio_caller {
            Some((numbered, party)) if Arc::ptr_eq(numbered, metrics) => *party,
            _ => metrics.caller(self.peer_id.as_ref()),
        }
    }

    /// Both ends of the connection, for policy input.
    fn peers(&self) -> &Arc<Peers> {
        self.peers.get_or_init(|| {
            Arc::new(Peers::new(
                self.peer,
                self.peer_id.clone(),
                self.local,
                self.own_identity.clone(),
            ))
        })
    }

    fn take_upgrade(&self) -> Option<hyper::upgrade::OnUpgrade> {
        self.upgrade
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// Serves one accepted connection until it closes, drains or idles out.
///
/// The returned future is the connection's task for as long as the
/// connection lives, so it holds only what a parked connection needs (the
/// socket, the connection's shared state, a timer): the larger states
/// (protocol detection or the TLS handshake, the HTTP codec's state and
/// its deadlines) are boxed and live only while they run. Thousands of idle
/// keep-alive connections then cost little more than their sockets.
///
/// `held` is what the connection holds while it lives (its place under the
/// listener's connection limit, its count): dropped when it ends.
pub(crate) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    index: usize,
    listener: Arc<HttpListener>,
    shared: Shared,
    drain: Drain,
    held: impl Send + 'static,
) -> impl Future<Output = ()> + Send {
    let opening = Box::pin(open(stream, peer, index, listener, shared, drain));
    // The HTTP/1 loop is written here rather than in a function of its
    // own: an async function keeps a second copy of an argument it takes
    // by value, and the socket is the largest thing a parked connection
    // holds.
    async move {
        // Captured (not moved into a local, which would copy it), so
        // dropped as the connection ends.
        let _ = &held;
        let Some((mut io, protocol, conn, listener)) = opening.await else {
            return;
        };
        if protocol == Protocol::Http2 {
            Box::pin(serve_h2(io, &conn, &listener.config)).await;
            return;
        }
        loop {
            let Some(idle) = Box::pin(serve_h1_until_idle(io, &conn, listener.h1)).await else {
                return;
            };
            io = idle;
            if !park(&io, &conn).await {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
                return;
            }
        }
    }
}

/// Detects the protocol (terminating TLS first when the listener has it)
/// and builds the connection's shared state.
async fn open(
    stream: TcpStream,
    peer: SocketAddr,
    index: usize,
    listener: Arc<HttpListener>,
    shared: Shared,
    drain: Drain,
) -> Option<(DownstreamIo, Protocol, Arc<Connection>, Arc<HttpListener>)> {
    let settings = &listener.config;
    let state = Arc::new(ConnState::new(true));
    let deadline = settings.header_read_timeout;
    let metrics = listener.metrics.clone();
    let (io, protocol) = match (&listener.tls, settings.tls.as_deref()) {
        // Boxed: only permissive listeners take this path, and its state
        // would otherwise sit in every connection's setup.
        (Some(server), Some(tls)) if tls.permissive => {
            Box::pin(accept_permissive(
                stream,
                server,
                tls,
                deadline,
                metrics,
                state.clone(),
            ))
            .await
        }
        (Some(server), Some(tls)) => {
            accept_tls(stream, server, tls, deadline, metrics, state.clone()).await
        }
        _ => detect(stream, deadline, metrics, state.clone()).await,
    }?;
    if let Some(id) = io.peer_identity()
        && tracing::level_enabled!(tracing::Level::DEBUG)
    {
        tracing::Span::current().record("peer.id", &**id);
    }
    if protocol == Protocol::Http2 {
        // HTTP/2 frames between streams are not request heads.
        state.stop_tracking_heads();
    }
    let conn = Arc::new(Connection {
        index,
        peer,
        // The connection must not outlive the client's certificate: at its
        // expiry the connection is closed gracefully (see `drive`).
        peer_expiry: io.peer_not_after().map(crate::clock::instant_of),
        metrics: listener.metrics.clone(),
        is_tls: io.is_tls(),
        peer_id: io.peer_identity().cloned(),
        peers: std::sync::OnceLock::new(),
        local: io.local_addr(),
        own_identity: settings
            .tls
            .as_ref()
            .and_then(|tls| tls.workload_identity.clone()),
        client: io
            .peer_identity()
            .map_or(Client::Ip(peer.ip()), |id| Client::Identity(id.clone())),
        client_bucket: HeldBucket::default(),
        source_requests: io.peer_identity().map(|id| listener.metrics.source(id)),
        istio_caller: listener
            .istio
            .as_ref()
            .filter(|istio| istio.metrics.settings.reporter == IstioReporter::Destination)
            .map(|istio| {
                let party = istio.metrics.caller(io.peer_identity());
                (istio.metrics.clone(), party)
            }),
        client_cert: io
            .peer_identity()
            .and_then(|peer| headers::client_cert_value(settings.tls.as_deref(), peer)),
        peer_ip: HeaderValue::try_from(peer.ip().to_string())
            .expect("an IP address is a valid header value"),
        shared,
        drain,
        state,
        upgrade: std::sync::Mutex::new(None),
        deadlines: Deadlines {
            header: settings.header_read_timeout,
            idle: settings.idle_timeout,
        },
    });
    Some((io, protocol, conn, listener))
}

/// Serves h2 on a connection until it closes, drains or idles out.
async fn serve_h2(io: DownstreamIo, conn: &Arc<Connection>, settings: &crate::config::Listener) {
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let span = request_span(&req);
            // PERF: boxed. hyper runs each stream in a task of its own,
            // and the request's future (about 2 KiB) was copied whole
            // into hyper's stream future, the drain's tracking wrapper and
            // tokio's task on the way.
            Box::pin(handle(conn.clone(), req.map(|body| ClientBody::H2 { body })).instrument(span))
        })
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TrackedExecutor(conn.drain.clone()));
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        // The codec's limit is twice the listener's: a request over the
        // listener's limit reaches `route_and_forward` and is answered 431
        // with a body, as for HTTP/1.1. At the codec's own limit h2 refuses
        // the stream (REFUSED_STREAM), which clients take as an invitation
        // to retry.
        .max_header_list_size(settings.max_request_headers_bytes.saturating_mul(2));
    let mut connection = std::pin::pin!(builder.serve_connection(TokioIo::new(io), service));
    drive(
        &mut connection,
        |c, cx| c.as_mut().poll(cx).map_err(Failed::from_hyper),
        |c| c.as_mut().graceful_shutdown(),
        conn,
        None,
    )
    .await;
}

/// An HTTP/1 connection that has been idle this long is parked: its read
/// and write buffers are released and the socket is watched with no buffer
/// at all until the client speaks again. Long enough that a busy
/// keep-alive connection never parks.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// Serves HTTP/1 requests until the connection ends (`None`) or idles long
/// enough to park: then the socket comes back (`Some`), to be served again
/// with fresh buffers when bytes arrive (see `serve`). A gateway holding
/// tens of thousands of idle keep-alive connections cannot afford buffers
/// for each. The same hand-back serves upgrades: the client side of a
/// tunnel is the socket returned after the 101 is written.
async fn serve_h1_until_idle(
    io: DownstreamIo,
    conn: &Arc<Connection>,
    limits: h1::Limits,
) -> Option<DownstreamIo> {
    let make = {
        let conn = conn.clone();
        move |req: Request<crate::wire::IncomingBody>| {
            let span = request_span(&req);
            handle(conn.clone(), req.map(|body| ClientBody::H1 { body })).instrument(span)
        }
    };
    let mut server = h1::Server::new(io, limits, make);
    let ending = drive(
        &mut server,
        |c, cx| c.poll(cx).map_err(Failed::from_h1),
        h1::Server::shutdown,
        conn,
        // A TLS connection is not parked: rustls may hold decrypted bytes
        // that a wait on the socket would not see.
        (!conn.is_tls).then_some(PARK_AFTER),
    )
    .await;
    if ending == Ending::Dropped {
        return None;
    }
    let (mut io, upgraded) = server.into_io()?;
    if let Some(upstream) = conn.take_upgrade()
        && upgraded
    {
        // Boxed: few connections are upgraded, and a tunnel's copy state
        // would otherwise make every connection's state larger.
        Box::pin(tunnel(io, upstream, conn)).await;
        return None;
    }
    if ending == Ending::Parked && !upgraded {
        return Some(io);
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
    None
}

/// Waits, holding no buffer, until a parked connection's client sends
/// again (true), or it closes, idles out or the drain begins (false).
///
/// Polled by hand rather than through `select!` over a peek future: the
/// wait is what a parked connection's task holds, and a peek future alone
/// is larger than the timer and the drain signal together.
async fn park(io: &DownstreamIo, conn: &Connection) -> bool {
    let idle_since = conn.state.idle_since().unwrap_or_else(Instant::now);
    let idle_end = tokio::time::sleep_until(tokio::time::Instant::from_std(
        idle_since + conn.deadlines.idle,
    ));
    let drained = conn.drain.cancelled();
    let mut idle_end = std::pin::pin!(idle_end);
    let mut drained = std::pin::pin!(drained);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(more) = io.poll_wait_for_data(cx) {
            return Poll::Ready(more);
        }
        if idle_end.as_mut().poll(cx).is_ready() || drained.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        Poll::Pending
    })
    .await
}

/// A connection's two deadlines.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    header: Duration,
    idle: Duration,
}

/// How [`drive`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The connection finished (client closed, drain, idle timeout, error).
    Closed,
    /// The connection finished because it was asked to park.
    Parked,
    /// Abandoned mid-request (header timeout); drop it.
    Dropped,
}

/// Polls a connection to completion and keeps its deadlines:
/// - a request head that started arriving more than the header timeout ago
///   drops the connection (slowloris);
/// - a connection with nothing in flight for the idle timeout, or the drain
///   signal, gets a graceful close (HTTP/2 GOAWAY, HTTP/1.1 close after the
///   in-flight response) and is polled until it finishes;
/// - after the drain signal (the process's, or its listener's when a
///   configuration removed the listener), a connection still open after
///   the drain timeout is closed;
/// - with `park_after`, a connection idle that long is asked to finish so
///   that its caller can park it.
async fn drive<C>(
    connection: &mut C,
    poll: fn(&mut C, &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Failed>>,
    shutdown: fn(&mut C),
    conn: &Connection,
    park_after: Option<Duration>,
) -> Ending {
    let deadlines = conn.deadlines;
    let check_every = deadlines
        .header
        .min(deadlines.idle)
        .min(park_after.unwrap_or(Duration::MAX));
    let first_wake = conn
        .peer_expiry
        .map_or(Instant::now() + check_every, |expiry| {
            expiry.min(Instant::now() + check_every)
        });
    let wake = tokio::time::sleep_until(tokio::time::Instant::from_std(first_wake));
    let mut wake = std::pin::pin!(wake);
    let mut closing = false;
    let mut parking = false;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        tokio::select! {
            result = std::future::poll_fn(|cx| poll(connection, cx)) => {
                if let Err(failed) = result {
                    match failed {
                        Failed::Rejected { status } => rejected(conn, status),
                        Failed::Other(error) => {
                            tracing::debug!(peer.addr = %conn.peer, %error, "connection ended with an error");
                        }
                    }
                    return Ending::Dropped;
                }
                return if parking && !closing { Ending::Parked } else { Ending::Closed };
            }
            () = conn.drain.cancelled(), if drain_deadline.is_none() => {
                let deadline = Instant::now() + conn.shared.load().config.drain_timeout;
                drain_deadline = Some(deadline);
                if !closing {
                    closing = true;
                    shutdown(connection);
                }
                if wake.deadline().into_std() > deadline {
                    wake.as_mut().reset(tokio::time::Instant::from_std(deadline));
                }
            }
            () = wake.as_mut() => {
                let now = Instant::now();
                if drain_deadline.is_some_and(|deadline| now >= deadline) {
                    tracing::debug!(peer.addr = %conn.peer, "drain timeout; closing");
                    return Ending::Dropped;
                }
                // Trust ends with the client's certificate: no new request
                // on this connection (GOAWAY, or close after the request
                // in flight); the client reconnects with its new one.
                if let Some(expiry) = conn.peer_expiry
                    && now >= expiry
                    && !closing
                {
                    tracing::debug!(peer.addr = %conn.peer, "client certificate expired; closing");
                    conn.metrics
                        .tls_peer_expired
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    closing = true;
                    shutdown(connection);
                }
                let next = if let Some(head) = conn.state.head_started() {
                    if now >= head + deadlines.header {
                        tracing::debug!(peer.addr = %conn.peer, "request header timeout");
                        return Ending::Dropped;
                    }
                    head + deadlines.header
                } else if let Some(idle) = conn.state.idle_since() {
                    if now >= idle + deadlines.idle && !closing {
                        tracing::debug!(peer.addr = %conn.peer, "idle timeout");
                        closing = true;
                        shutdown(connection);
                    } else if let Some(park) = park_after
                        && now >= idle + park
                        && !closing
                        && !parking
                    {
                        parking = true;
                        shutdown(connection);
                    }
                    (idle + deadlines.idle).max(now).min(now + check_every)
                } else {
                    now + check_every
                };
                let next = drain_deadline.map_or(next, |deadline| next.min(deadline));
                let next = match conn.peer_expiry {
                    Some(expiry) if !closing && expiry > now => next.min(expiry),
                    _ => next,
                };
                wake.as_mut().reset(tokio::time::Instant::from_std(next.max(now + MIN_CHECK)));
            }
        }
    }
}

/// How a connection's protocol driver failed.
#[derive(Debug)]
enum Failed {
    /// A request the parser rejected, answered with `status` (400; 414
    /// or 431 when too large); the connection closes.
    Rejected {
        status: u16,
    },
    Other(crate::error::BoxError),
}

impl Failed {
    fn from_hyper(error: hyper::Error) -> Self {
        if error.is_parse() {
            Self::Rejected {
                status: if error.is_parse_too_large() { 431 } else { 400 },
            }
        } else {
            Self::Other(error.into())
        }
    }

    fn from_h1(failure: h1::Failure) -> Self {
        match failure {
            h1::Failure::Rejected { status, why } => {
                tracing::debug!(why, status, "request rejected");
                Self::Rejected { status }
            }
            other => Self::Other(other.into()),
        }
    }
}

/// Records a request the HTTP/1 parser rejected (answered with `status`:
/// 400, or 414 / 431 when too large; the connection closes): counted by
/// reason and written to the access log with the status the client got,
/// since no request reached [`handle`].
fn rejected(conn: &Connection, status: u16) {
    let snapshot = conn.shared.load();
    let Some(ListenerSnapshot::Http(listener)) = snapshot.listener(conn.index) else {
        return;
    };
    let (counter, flag) = if status == 400 {
        (&listener.metrics.rejected_malformed, "malformed_request")
    } else {
        (&listener.metrics.rejected_too_large, "headers_too_large")
    };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(log) = &listener.access_log {
        log.log(AccessRecord {
            start: SystemTime::now(),
            listener: listener.config.name.clone(),
            route: None,
            // Nothing of the request could be trusted: `-` and `*` stand
            // for the method and target that did not parse.
            method: http::Method::from_bytes(b"-").unwrap_or_default(),
            uri: Uri::from_static("*"),
            host: None,
            version: Version::HTTP_11,
            status,
            flag,
            upstream: None,
            bytes_sent: 0,
            duration: Duration::ZERO,
            request_id: None,
            peer: conn.peer,
            peer_identity: conn.peer_id.clone(),
            attempts: 0,
            trace: None,
        });
    }
}

/// The `req` span (at debug): method and path now, route and request id
/// once known. Disabled, it costs a check of the level filter; the fields
/// are not even formatted.
fn request_span<B>(req: &Request<B>) -> tracing::Span {
    tracing::debug_span!(
        "req",
        method = %req.method(),
        path = req.uri().path(),
        route = tracing::field::Empty,
        request_id = tracing::field::Empty,
    )
}

/// What a request's telemetry learns on its way through.
#[derive(Debug, Default)]
struct Outcome {
    route: Option<Arc<str>>,
    metrics: Option<Arc<RequestMetrics>>,
    upstream: Option<SocketAddr>,
    request_id: Option<HeaderValue>,
    /// Attempts sent (retries plus one), when more than one.
    attempts: u32,
    /// A source reporter's Istio party: the cluster's.
    istio_party: Option<u32>,
    /// The request body's bytes, counted when the listener reports Istio
    /// metrics.
    request_read: Option<Arc<crate::body::ReadCount>>,
}

/// Handles one request; never fails (errors become responses).
async fn handle(
    conn: Arc<Connection>,
    req: Request<ClientBody>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    let request = conn.state.begin_request();
    let listener = match conn.shared.load().listener(conn.index) {
        Some(ListenerSnapshot::Http(listener)) => listener.clone(),
        // The listener's kind cannot change under an open connection.
        _ => return Ok(to_response(&ProxyError::NoRoute, false)),
    };
    let is_grpc = is_grpc(req.headers());
    let trace = listener.tracer.as_ref().map(|tracer| {
        let context = Context::of_request(req.headers(), tracer.sample);
        (tracer, context)
    });
    // What the server span needs, kept only when it may be recorded.
    let span_head = trace
        .as_ref()
        .filter(|(tracer, context)| tracer.may_record(context))
        .map(|_| {
            (
                crate::clock::unix_nanos_of(start),
                req.method().clone(),
                req.uri().clone(),
                req.headers().get(header::HOST).cloned(),
                req.version(),
            )
        });
    let log = listener.access_log.as_ref().map(|log| {
        (
            log.clone(),
            Box::new(AccessRecord {
                start: crate::clock::wall_of(start),
                listener: listener.config.name.clone(),
                route: None,
                method: req.method().clone(),
                uri: req.uri().clone(),
                host: req.headers().get(header::HOST).cloned(),
                version: req.version(),
                status: 0,
                flag: "",
                upstream: None,
                bytes_sent: 0,
                duration: Duration::ZERO,
                request_id: None,
                peer: conn.peer,
                peer_identity: conn.peer_id.clone(),
                attempts: 0,
                trace: trace.map(|(_, context)| (context.trace_id, context.span_id)),
            }),
        )
    });
    let mut outcome = Outcome {
        // A request without a body (most) needs no counter.
        request_read: listener
            .istio
            .as_ref()
            .filter(|_| !http_body::Body::is_end_stream(req.body()))
            .map(|_| Arc::new(crate::body::ReadCount::new(is_grpc))),
        ..Outcome::default()
    };
    let mut client_span = None;
    let (mut response, status, flag) =
        match route_and_forward(&conn, &listener, req, &mut outcome, trace, start).await {
            Ok(mut response) => {
                if trace.is_some() {
                    client_span = response.body_mut().take_client_span();
                }
                // A layer's decision (a fault, a rate limit) names itself.
                match response.extensions().get::<Decision>().copied() {
                    Some(decision) => (response, decision.status, decision.flag),
                    None => {
                        let status = response.status();
                        (response, status, "")
                    }
                }
            }
            Err(error) => {
                tracing::debug!(peer.addr = %conn.peer, %error, "request failed");
                outcome.upstream = outcome.upstream.or(error.endpoint());
                // Metrics count the error's status even when a gRPC caller
                // sees HTTP 200 with a grpc-status.
                (to_response(&error, is_grpc), error.status(), error.flag())
            }
        };
    // The span first: it copies what the access record then moves.
    let span = match (trace, span_head) {
        (Some((tracer, context)), Some((start, method, uri, host, version)))
            if tracer.records(&context, status.as_u16()) =>
        {
            let mut span = SpanRecord::new(
                Kind::Server,
                &context,
                context.span_id,
                context.parent_id,
                start,
                method,
            );
            span.authority = uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .or(host);
            span.path = uri.into_parts().path_and_query;
            span.peer = Some(conn.peer);
            span.version = version;
            span.status = status.as_u16();
            span.flag = flag;
            span.listener = Some(listener.config.name.clone());
            span.route.clone_from(&outcome.route);
            span.peer_identity = conn.peer_id.clone();
            span.request_id.clone_from(&outcome.request_id);
            Some(OpenSpan::new(tracer.clone(), span))
        }
        _ => None,
    };
    let access = log.map(|(log, mut record)| {
        record.route = outcome.route.clone();
        record.status = response.status().as_u16();
        record.flag = flag;
        record.upstream = outcome.upstream;
        record.request_id = outcome.request_id;
        record.attempts = outcome.attempts;
        (log, record)
    });
    let istio = listener.istio.as_ref().map(|istio| IstioFinish {
        party: match istio.metrics.settings.reporter {
            IstioReporter::Destination => conn.istio_caller(&istio.metrics),
            IstioReporter::Source => outcome.istio_party.unwrap_or(istio.no_cluster),
        },
        metrics: istio.metrics.clone(),
        status: response.status(),
        protocol: if is_grpc {
            istio::Protocol::Grpc
        } else {
            istio::Protocol::Http
        },
        // A trailers-only answer (an error) carries it in its headers.
        grpc_status: is_grpc
            .then(|| body::grpc_status(response.headers()))
            .flatten(),
        flag,
        request_read: outcome.request_read.take(),
        response_messages: is_grpc.then(crate::body::Messages::default),
    });
    let metrics = outcome.metrics.unwrap_or_else(|| listener.unrouted.clone());
    response.body_mut().set_finish(Finish {
        start,
        status,
        metrics,
        access,
        request: Some(request),
        span,
        client_span,
        istio,
    });
    Ok(response)
}

/// The connection's part of a request: limits and Host, routing and the
/// weighted split, the proxy's own header rules; then the route's stack
/// (`stack::route_service`) does the rest.
async fn route_and_forward(
    conn: &Connection,
    listener: &HttpListener,
    mut req: Request<ClientBody>,
    outcome: &mut Outcome,
    trace: Option<(&Arc<Tracer>, Context)>,
    start: Instant,
) -> Result<Response<ResponseBody>, ProxyError> {
    let settings = &listener.config;
    if let Some(requests) = &conn.source_requests {
        requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if req.headers().len() > settings.max_request_headers as usize
        || headers::header_list_size(req.headers()) > settings.max_request_headers_bytes as usize
    {
        return Err(ProxyError::HeadersTooLarge);
    }
    // PERF: the layers that read the time on the way down (rate limits,
    // the retry budget, timeouts) take the request's start instead of
    // reading the clock each; given back before the first await.
    let held = crate::clock::hold(start);
    if let Some(limiter) = &listener.rate_limit
        && let Err(wait) = limiter.check_held(&conn.client, &conn.client_bucket)
    {
        listener
            .metrics
            .rate_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(limited(wait, is_grpc(req.headers())));
    }
    if let Some(enforcing) = &listener.policy
        && let policy::Outcome::Deny(response) =
            policy::check(enforcing, &req, conn.peers(), conn.is_tls)
    {
        return Ok(*response);
    }
    let authority = authority(&req)?;
    let host = authority
        .to_str()
        .map_err(|_| ProxyError::Malformed("host is not visible ASCII"))?;
    let route: Arc<PreparedRoute> = {
        let parts = RequestParts {
            host,
            method: req.method(),
            path: req.uri().path(),
            headers: req.headers(),
            source: conn.peer_id.as_deref(),
        };
        listener
            .table
            .select(&parts)
            .cloned()
            .ok_or(ProxyError::NoRoute)?
    };
    outcome.route = Some(route.name.clone());
    if tracing::level_enabled!(tracing::Level::DEBUG) {
        tracing::Span::current().record("route", &*route.name);
    }
    if route.needs_client {
        req.extensions_mut().insert(conn.client.clone());
    }
    if route.needs_peers {
        req.extensions_mut().insert(RequestPeers {
            peers: conn.peers().clone(),
            is_tls: conn.is_tls,
        });
    }
    let target = route.pick();
    outcome.metrics = Some(target.metrics.clone());
    outcome.istio_party = target.istio_party;
    let mut service = target.service.clone();

    // The proxy's own header rules; the route's stack applies the route's
    // rules after these, so a route has the last word.
    // An `h2c` upgrade is never forwarded: an upstream that accepted it
    // would tunnel the client past routing and policy (h2c smuggling). The
    // request is served as plain HTTP/1.1 instead, as nginx does.
    let is_upgrade = req.version() == Version::HTTP_11
        && headers::is_upgrade_request(req.headers())
        && !headers::upgrade_names_h2c(req.headers());
    let via = if req.version() == Version::HTTP_2 {
        &listener.via_h2
    } else {
        &listener.via_h1
    };
    let mut outbound = None;
    if route.forwards {
        let h = req.headers_mut();
        // With the client's `x-forwarded-client-cert`: only this proxy
        // says who the client proved to be.
        headers::strip_for_upstream(h, is_upgrade);
        headers::add_forwarded(h, &conn.peer_ip, settings.xff_num_trusted_hops, conn.is_tls);
        if let Some(client_cert) = &conn.client_cert {
            h.insert(
                headers::X_FORWARDED_CLIENT_CERT.clone(),
                client_cert.clone(),
            );
        }
        if let Some(via) = via {
            h.append(header::VIA, via.clone());
        }
        h.insert(header::HOST, authority);
        let keep_id = settings.preserve_request_id || settings.xff_num_trusted_hops > 0;
        let request_id = headers::ensure_request_id(h, keep_id);
        if tracing::level_enabled!(tracing::Level::DEBUG) {
            let id = request_id.to_str().unwrap_or("");
            tracing::Span::current().record("request_id", id);
        }
        let may_record = trace.is_some_and(|(tracer, context)| tracer.may_record(&context));
        // Cloning a generated id costs an allocation; only the log and a
        // recorded span need it.
        if listener.access_log.is_some() || may_record {
            outcome.request_id = Some(request_id.clone());
        }
        if let Some((tracer, context)) = trace {
            // The client's trace headers go; the proxy writes its own into
            // each attempt, with the attempt's client span as the parent
            // when one may be recorded (`Outbound::attempt`).
            trace::strip_incoming(h, &context);
            outbound = Some(Box::new(Outbound {
                context,
                tracer: tracer.clone(),
            }));
        }
    }

    let mut req = match &outcome.request_read {
        Some(counted) => req.map(|body| RequestBody::counted(body, counted.clone())),
        None => req.map(RequestBody::new),
    };
    req.body_mut().set_trace(outbound);
    let response = service.call(req);
    drop(held);
    let mut response = response.await?;
    outcome.upstream = response.body().endpoint();
    if let Some(attempts) = response
        .extensions()
        .get::<crate::resilience::retry::Attempts>()
    {
        outcome.attempts = attempts.0;
    }
    if outcome.upstream.is_none() {
        // Answered locally (a direct response): no `via`, no upgrade.
        return Ok(response);
    }
    if let Some(via) = via {
        response.headers_mut().append(header::VIA, via.clone());
    }
    if is_upgrade && response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        // The connection task joins the two sides once the codec has
        // written the 101 and handed the client's socket back
        // (`serve_h1_until_idle`).
        let upstream = hyper::upgrade::on(&mut response);
        *conn
            .upgrade
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(upstream);
    }
    Ok(response)
}

/// The request's authority: the URI's (HTTP/2, absolute-form) or `host`.
///
/// RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without
/// Host, with more than one Host line, or with an invalid Host.
fn authority<B>(req: &Request<B>) -> Result<HeaderValue, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::Malformed("more than one host header"));
    }
    if let Some(authority) = req.uri().authority() {
        return HeaderValue::from_str(authority.as_str())
            .map_err(|_| ProxyError::Malformed("invalid authority"));
    }
    match host {
        Some(host) if headers::is_valid_host(host.as_bytes()) => Ok(host.clone()),
        Some(_) => Err(ProxyError::Malformed("invalid host")),
        // HTTP/1.0 clients may omit Host.
        None if req.version() == Version::HTTP_10 => Ok(HeaderValue::from_static("")),
        None => Err(ProxyError::Malformed("missing host")),
    }
}

/// Copies bytes between an upgraded client and upstream until either side
/// closes, no byte moves for the listener's idle timeout, the drain
/// timeout passes after the drain signal (as for TCP listeners), or the
/// client's certificate expires.
async fn tunnel(
    mut downstream: DownstreamIo,
    upstream: hyper::upgrade::OnUpgrade,
    conn: &Connection,
) {
    let idle_timeout = conn.deadlines.idle;
    let peer = conn.peer;
    let Ok(upstream) = upstream.await else {
        tracing::debug!(peer.addr = %peer, "upgrade did not complete");
        return;
    };
    let mut upstream = TokioIo::new(upstream);
    let drain_timeout = conn.shared.load().config.drain_timeout;
    // Upgraded connections (WebSocket) are often many and quiet: tokio's
    // default 8 KiB per direction rather than the TCP listeners' 32 KiB.
    let buffer_bytes = 8 * 1024;
    match crate::tcp::splice(
        &mut downstream,
        &mut upstream,
        buffer_bytes,
        idle_timeout,
        &conn.drain,
        drain_timeout,
        conn.peer_expiry.map(tokio::time::Instant::from_std),
    )
    .await
    {
        Ok(Ended::Closed) => {}
        Ok(Ended::Expired) => {
            conn.metrics
                .tls_peer_expired
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(peer.addr = %peer, "the client's certificate expired; closing upgraded connection");
        }
        Err(error) => {
            tracing::debug!(peer.addr = %peer, %error, "upgraded connection ended with an error");
        }
        Ok(Ended::Drained) => {
            tracing::debug!(peer.addr = %peer, "drain timeout; closing upgraded connection");
        }
        Ok(Ended::Idle) => {
            tracing::debug!(peer.addr = %peer, "idle timeout; closing upgraded connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn request_spans_carry_method_path_and_route_and_are_off_unless_debug() {
        let req = Request::builder().uri("/x?q=1").body(()).unwrap();
        let quiet = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(quiet, || {
            assert!(request_span(&req).is_disabled());
        });
        let capture = Capture::default();
        let writer = capture.clone();
        let verbose = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(verbose, || {
            let span = request_span(&req);
            let _entered = span.enter();
            tracing::Span::current().record("route", "api");
            tracing::debug!("inside");
        });
        let out = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        assert!(
            out.contains("req{method=GET path=\"/x\" route=\"api\"}"),
            "{out}"
        );
    }
}
