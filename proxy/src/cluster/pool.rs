//! One endpoint and its upstream connection pool.
//!
//! HTTP/1.1: idle connections wait in a LIFO stack (the most recently used
//! is the least likely to have been closed by the server); a connection goes
//! back only after its response body has been read to the end, so a taken
//! connection is never mid-response. Entries older than the idle timeout are
//! discarded when the stack is touched, and by the cluster's periodic
//! [`Endpoint::expire_idle`] when it is not. A request that fails on a reused
//! connection *before it was written* (the server closed it while idle) is
//! sent again on a fresh connection; nothing that reached the server is
//! resent.
//!
//! HTTP/1.1 requests are written and their responses read by the request's
//! own task, with the client in [`super::h1`]; an upgrade (WebSocket) goes
//! through hyper's client, on a pooled connection's socket or a new one,
//! and its connection is not pooled again.
//!
//! HTTP/2: one multiplexed connection per endpoint, replaced when it closes.
//!
//! Upstream connection tasks (HTTP/2, upgrades) are owned by their senders:
//! a task ends when the pool drops its sender or the peer closes. They are
//! not part of the drain (they end with the process once downstream work
//! is done).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::{DownstreamBodyError, RequestBody};
use crate::config::Cluster;
use crate::error::ProxyError;
use crate::telemetry::ClusterMetrics;
use crate::telemetry::trace::{OpenSpan, Propagation};
use crate::tls::UpstreamTls;
use crate::transport::Stream;

/// Freshly dialled HTTP/1.1 connections that may turn out closed before
/// one request is given up: an upstream that accepts and at once closes
/// gets a 502, not a dialling loop.
const MAX_FRESH_CONNECTION_FAILURES: u32 = 3;

/// Pool settings, from the cluster's config.
#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    pub(crate) cluster: Arc<str>,
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_idle: usize,
    pub(crate) metrics: Arc<ClusterMetrics>,
    /// TLS to the endpoints, prepared once per cluster state.
    pub(crate) tls: Option<Arc<UpstreamTls>>,
    /// HTTP connections open or opening at once, over the cluster.
    pub(crate) max_connections: u32,
    /// Requests waiting for a connection at once, over the cluster.
    pub(crate) max_pending: u32,
}

impl PoolSettings {
    pub(crate) fn new(
        cluster: &Cluster,
        metrics: Arc<ClusterMetrics>,
        identities: &Arc<crate::identity::Identities>,
    ) -> Self {
        Self {
            cluster: cluster.name.clone(),
            connect_timeout: cluster.connect_timeout,
            idle_timeout: cluster.pool_idle_timeout,
            max_idle: cluster.max_idle_per_endpoint as usize,
            metrics,
            tls: cluster
                .tls
                .as_deref()
                .map(|tls| Arc::new(UpstreamTls::new(tls, identities))),
            max_connections: cluster.max_connections,
            max_pending: cluster.max_pending_requests,
        }
    }
}

/// Which HTTP version to speak to the endpoint for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    Http1,
    Http2,
}

/// An HTTP/1.1 connection of the pool's, and what keeps it counted.
#[derive(Debug)]
struct PooledH1 {
    conn: H1Connection,
    open: OpenConnection,
    /// Not reused from then on (see [`Retire`]).
    retire: Retire,
}

type H1Connection = super::h1::Connection<Stream, RequestBody>;

#[derive(Debug)]
struct IdleH1 {
    pooled: PooledH1,
    since: Instant,
}

/// An endpoint: its address, weight, load and connections.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    /// Requests (or TCP connections) in flight; read by least-request.
    active: AtomicU64,
    /// Requests sent, for `/clusters`.
    total: AtomicU64,
    /// Connect failures, for `/clusters`.
    connect_failures: AtomicU64,
    settings: PoolSettings,
    idle_h1: Mutex<Vec<IdleH1>>,
    h2: Mutex<Option<(http2::SendRequest<RequestBody>, Retire)>>,
    /// Held while the multiplexed connection is being made.
    h2_connecting: tokio::sync::Mutex<()>,
    /// Passive health: consecutive failures and ejection.
    pub(crate) outlier: super::outlier::OutlierState,
    /// Active health: the probes' verdict.
    pub(crate) health: super::health::HealthState,
}

impl Endpoint {
    pub(crate) fn new(addr: SocketAddr, weight: u32, settings: PoolSettings) -> Self {
        Self {
            addr,
            weight,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            settings,
            idle_h1: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
            outlier: super::outlier::OutlierState::default(),
            health: super::health::HealthState::default(),
        }
    }

    /// In-flight requests.
    pub(crate) fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }

    /// Requests sent so far.
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// Failed connection attempts so far.
    pub(crate) fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Relaxed)
    }

    /// Idle HTTP/1.1 connections now pooled.
    pub(crate) fn idle_connections(&self) -> usize {
        self.idle_h1
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Marks one TCP connection in flight until the guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Relaxed);
        self.total.fetch_add(1, Relaxed);
        ActiveGuard(self.clone(), false)
    }

    /// Marks one HTTP request in flight, on the endpoint and against its
    /// cluster's `max_requests`, until the guard drops; `None` (nothing
    /// counted) when the cluster is at its limit.
    pub(crate) fn begin_request(self: &Arc<Self>, max_requests: u32) -> Option<ActiveGuard> {
        let cluster = &self.settings.metrics.requests_active;
        if cluster.fetch_add(1, Relaxed) >= i64::from(max_requests) {
            cluster.fetch_sub(1, Relaxed);
            return None;
        }
        self.active.fetch_add(1, Relaxed);
        self.total.fetch_add(1, Relaxed);
        Some(ActiveGuard(self.clone(), true))
    }

    /// When a connection just opened must stop taking new requests: a
    /// little before the first of its two certificates expires.
    fn retire_of(&self, stream: &Stream) -> Retire {
        let Some(tls) = &self.settings.tls else {
            return Retire(None);
        };
        let first = match (stream.server_not_after(), tls.client_not_after()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Retire(first.map(|not_after| {
            let left = not_after
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO);
            Instant::now() + left.saturating_sub(RETIRE_BEFORE_EXPIRY)
        }))
    }

    /// Opens a connection (and, for a TLS cluster, completes the handshake,
    /// offering `wire`'s ALPN), all within the connect timeout.
    pub(crate) async fn connect(&self, wire: Wire) -> Result<Stream, ProxyError> {
        let metrics = &self.settings.metrics;
        match self.probe_connect(wire).await {
            Ok(stream) => {
                metrics.connections_total.fetch_add(1, Relaxed);
                Ok(stream)
            }
            Err(error) => {
                metrics.connect_failures.fetch_add(1, Relaxed);
                self.connect_failures.fetch_add(1, Relaxed);
                tracing::debug!(cluster = %self.settings.cluster, endpoint = %self.addr, %error, "upstream connect failed");
                Err(error)
            }
        }
    }

    /// Connects as [`Endpoint::connect`] does, counting nothing: health
    /// probes reach the endpoint the way requests do (same TLS, same
    /// identity checks) without moving the request path's counters.
    pub(crate) async fn probe_connect(&self, wire: Wire) -> Result<Stream, ProxyError> {
        let connect = async {
            let stream =
                Stream::connect(self.addr)
                    .await
                    .map_err(|source| ProxyError::UpstreamConnect {
                        cluster: self.settings.cluster.clone(),
                        endpoint: self.addr,
                        source,
                    })?;
            let Some(tls) = &self.settings.tls else {
                return Ok(stream);
            };
            let config = match wire {
                Wire::Http1 => &tls.http1,
                Wire::Http2 => &tls.http2,
            };
            stream
                .start_tls(config, tls.server_name.as_ref(), self.addr)
                .await
                .map_err(|source| ProxyError::UpstreamTls {
                    cluster: self.settings.cluster.clone(),
                    endpoint: self.addr,
                    source,
                })
        };
        match tokio::time::timeout(self.settings.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::ConnectTimeout {
                cluster: self.settings.cluster.clone(),
                endpoint: self.addr,
            }),
        }
    }

    /// Sends one request and returns the response with a body that gives
    /// the connection back to the pool when read to the end.
    ///
    /// Cancel safety: dropping the future drops the request and, at worst,
    /// one connection; the pool stays consistent.
    ///
    /// `trace` is the attempt's trace context, written into the request
    /// as its wire allows.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
        wire: Wire,
        guard: ActiveGuard,
        trace: Option<Propagation>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        self.settings.metrics.requests_total.fetch_add(1, Relaxed);
        match wire {
            Wire::Http1 => self.send_h1(req, guard, trace).await,
            Wire::Http2 => {
                if let Some(trace) = trace {
                    trace.insert(req.headers_mut());
                }
                self.send_h2(req, guard).await
            }
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
        guard: ActiveGuard,
        trace: Option<Propagation>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        if req.headers().contains_key(http::header::UPGRADE)
            || req.method() == http::Method::CONNECT
        {
            if let Some(trace) = trace {
                trace.insert(req.headers_mut());
            }
            // Boxed: upgrades are few, and hyper's client state would sit
            // in every request's future.
            return Box::pin(self.send_upgrade(req, guard)).await;
        }
        let mut reuse = true;
        loop {
            let idle = || reuse.then(|| self.take_idle()).flatten();
            let (pooled, reused) = match self.connection_or_slot(idle).await? {
                Acquired::Existing(pooled) => (pooled, true),
                // Boxed: a connect's state (TCP, TLS) would otherwise sit in
                // every request's future, and be copied with it, though most
                // requests find a pooled connection.
                Acquired::Slot(slot) => (Box::pin(self.connect_h1(slot)).await?, false),
            };
            let PooledH1 { conn, open, retire } = pooled;
            match conn.send(req, trace.as_ref()).await {
                Ok(response) => {
                    let back = GiveBack {
                        endpoint: self.clone(),
                        open,
                        retire,
                    };
                    return Ok(response.map(|body| UpstreamBody::h1(body, back, guard)));
                }
                // Not written: the server had closed the idle connection.
                Err(super::h1::SendError {
                    unsent: Some(unsent),
                    ..
                }) if reused => {
                    req = unsent;
                    reuse = false;
                }
                Err(super::h1::SendError { error, unsent }) => {
                    return Err(self.h1_error(error, unsent.is_none()));
                }
            }
        }
    }

    /// The error for a request that failed on an HTTP/1.1 connection: the
    /// client's when its own body broke, else the upstream's.
    fn h1_error(&self, error: super::h1::Error, request_sent: bool) -> ProxyError {
        match error {
            super::h1::Error::RequestBody(source) => ProxyError::DownstreamBody {
                endpoint: Some(self.addr),
                source,
            },
            error => ProxyError::UpstreamReset {
                endpoint: self.addr,
                request_sent,
                source: error.into(),
            },
        }
    }

    /// Sends an upgrade request (or CONNECT) with hyper's client, which
    /// hands the upgraded connection to the tunnel; its connection is not
    /// pooled again.
    async fn send_upgrade(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        guard: ActiveGuard,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let mut fresh_failures = 0;
        loop {
            // An idle connection's socket serves as well as a new one.
            let idle = || {
                let PooledH1 { conn, open, .. } = self.take_idle()?;
                Some((conn.into_io()?, open))
            };
            let (stream, open, reused) = match self.connection_or_slot(idle).await? {
                Acquired::Existing((stream, open)) => (stream, open, true),
                Acquired::Slot(slot) => {
                    let stream = self.connect(Wire::Http1).await?;
                    (stream, OpenConnection::new(slot), false)
                }
            };
            let (mut sender, conn) = http1::Builder::new()
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|source| self.handshake_failed(source))?;
            spawn_connection(open, async move {
                // Errors here are reported to the request that saw them.
                let _ = conn.with_upgrades().await;
            });
            if let Err(source) = sender.ready().await {
                // A pooled connection closed while idle: take another. A
                // fresh one that is closed already is the upstream's doing;
                // give up after a few rather than dial forever.
                if !reused {
                    fresh_failures += 1;
                    if fresh_failures >= MAX_FRESH_CONNECTION_FAILURES {
                        return Err(self.reset(source, true));
                    }
                }
                continue;
            }
            return match sender.send_request(req).await {
                Ok(response) => Ok(response.map(|body| UpstreamBody::hyper(body, guard))),
                Err(source) => Err(self.reset(source, false)),
            };
        }
    }

    /// The error for a request that failed on a connection to this
    /// endpoint: the client's when its own body broke, else the upstream's.
    fn reset(&self, source: hyper::Error, request_unsent: bool) -> ProxyError {
        if DownstreamBodyError::find(&source) {
            return ProxyError::DownstreamBody {
                endpoint: Some(self.addr),
                source: source.into(),
            };
        }
        ProxyError::UpstreamReset {
            endpoint: self.addr,
            request_sent: !request_unsent,
            source: source.into(),
        }
    }

    fn take_idle(&self) -> Option<PooledH1> {
        let mut idle = self.idle_h1.lock().unwrap_or_else(PoisonError::into_inner);
        let now = crate::clock::coarse_now();
        while let Some(mut entry) = idle.pop() {
            if now.saturating_duration_since(entry.since) < self.settings.idle_timeout
                && !entry.pooled.retire.is_due()
                && !entry.pooled.conn.is_closed()
            {
                return Some(entry.pooled);
            }
        }
        None
    }

    /// Closes the idle HTTP/1.1 connections that have outlived the pool's
    /// idle timeout (or that the server has closed); returns how many were
    /// dropped. Run periodically, so that a pool nobody uses does not hold
    /// its connections (and the upstream's) forever.
    pub(crate) fn expire_idle(&self) -> usize {
        let mut idle = self.idle_h1.lock().unwrap_or_else(PoisonError::into_inner);
        let before = idle.len();
        let now = crate::clock::coarse_now();
        idle.retain_mut(|e| {
            now.saturating_duration_since(e.since) < self.settings.idle_timeout
                && !e.pooled.retire.is_due()
                && !e.pooled.conn.is_closed()
        });
        before - idle.len()
    }

    fn give_back(&self, pooled: PooledH1) {
        if pooled.retire.is_due() {
            return;
        }
        let mut idle = self.idle_h1.lock().unwrap_or_else(PoisonError::into_inner);
        // The oldest entries are at the front; drop the expired ones.
        let now = crate::clock::coarse_now();
        let expired = idle
            .iter()
            .take_while(|e| now.saturating_duration_since(e.since) >= self.settings.idle_timeout)
            .count();
        idle.drain(..expired);
        if idle.len() < self.settings.max_idle {
            idle.push(IdleH1 { pooled, since: now });
            drop(idle);
            self.wake_pending();
        }
    }

    /// A usable connection from `existing`, else a slot against the
    /// cluster's `max_connections` to open one. When none is free, the
    /// request waits (pending, at most `max_pending_requests` of them over
    /// the cluster) until a connection closes or goes idle; beyond that it
    /// is refused at once. Cancel safe: a dropped wait leaves the queue.
    async fn connection_or_slot<T>(
        &self,
        mut existing: impl FnMut() -> Option<T>,
    ) -> Result<Acquired<T>, ProxyError> {
        if let Some(found) = existing() {
            return Ok(Acquired::Existing(found));
        }
        if let Some(slot) = self.try_slot() {
            return Ok(Acquired::Slot(slot));
        }
        let metrics = &self.settings.metrics;
        metrics.connections_overflow.fetch_add(1, Relaxed);
        if metrics.requests_pending.fetch_add(1, SeqCst) >= i64::from(self.settings.max_pending) {
            metrics.requests_pending.fetch_sub(1, SeqCst);
            metrics.pending_overflows.fetch_add(1, Relaxed);
            return Err(ProxyError::Overflow {
                cluster: self.settings.cluster.clone(),
            });
        }
        let _pending = PendingGuard(metrics.clone());
        loop {
            // Registered before looking again: a release in between wakes
            // this wait instead of being missed.
            let released = metrics.connection_released.notified();
            let mut released = std::pin::pin!(released);
            released.as_mut().enable();
            if let Some(found) = existing() {
                return Ok(Acquired::Existing(found));
            }
            if let Some(slot) = self.try_slot() {
                return Ok(Acquired::Slot(slot));
            }
            released.await;
        }
    }

    /// A TCP listener's connection to this endpoint, held against the
    /// cluster's `max_connections` (and shown among its open connections)
    /// until dropped; `None`, counted as an overflow, when every slot is
    /// taken: the connection is refused rather than queued.
    pub(crate) fn hold_tcp_connection(&self) -> Option<TcpConnection> {
        match self.try_slot() {
            Some(slot) => Some(TcpConnection {
                _open: OpenConnection::new(slot),
            }),
            None => {
                self.settings
                    .metrics
                    .connections_overflow
                    .fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// One slot against the cluster's `max_connections`, if one is free.
    fn try_slot(&self) -> Option<ConnectionSlot> {
        let held = &self.settings.metrics.connections_held;
        if held.fetch_add(1, SeqCst) >= i64::from(self.settings.max_connections) {
            held.fetch_sub(1, SeqCst);
            return None;
        }
        Some(ConnectionSlot(self.settings.metrics.clone()))
    }

    /// Wakes the requests waiting for a connection, if any.
    fn wake_pending(&self) {
        wake_pending(&self.settings.metrics);
    }

    async fn connect_h1(&self, slot: ConnectionSlot) -> Result<PooledH1, ProxyError> {
        let stream = self.connect(Wire::Http1).await?;
        let retire = self.retire_of(&stream);
        Ok(PooledH1 {
            conn: H1Connection::new(stream),
            open: OpenConnection::new(slot),
            retire,
        })
    }

    async fn send_h2(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        guard: ActiveGuard,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let mut sender = match self.shared_h2() {
            Some(sender) => sender,
            // Boxed: the connect's state would otherwise sit in every
            // request's future (see `send_h1`).
            None => Box::pin(self.open_shared_h2()).await?,
        };
        sender
            .ready()
            .await
            .map_err(|source| self.reset(source, true))?;
        match sender.send_request(req).await {
            Ok(response) => Ok(response.map(|body| UpstreamBody::hyper(body, guard))),
            Err(source) => Err(self.reset(source, false)),
        }
    }

    /// Opens the multiplexed connection, or waits for the request that is
    /// opening it and shares it.
    async fn open_shared_h2(
        self: &Arc<Self>,
    ) -> Result<http2::SendRequest<RequestBody>, ProxyError> {
        // One connect at a time: requests that arrive while the connection
        // is being made wait for it and share it, instead of each opening
        // its own.
        let _connecting = self.h2_connecting.lock().await;
        Ok(match self.connection_or_slot(|| self.shared_h2()).await? {
            Acquired::Existing(sender) => sender,
            Acquired::Slot(slot) => {
                // A retired connection finishes its streams and closes when
                // the last sender is gone.
                let (sender, retire) = self.connect_h2(slot).await?;
                *self.h2.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((sender.clone(), retire));
                sender
            }
        })
    }

    /// The multiplexed connection, if one is open and not due to retire.
    fn shared_h2(&self) -> Option<http2::SendRequest<RequestBody>> {
        match &*self.h2.lock().unwrap_or_else(PoisonError::into_inner) {
            Some((sender, retire)) if !sender.is_closed() && !retire.is_due() => {
                Some(sender.clone())
            }
            _ => None,
        }
    }

    async fn connect_h2(
        &self,
        slot: ConnectionSlot,
    ) -> Result<(http2::SendRequest<RequestBody>, Retire), ProxyError> {
        let stream = self.connect(Wire::Http2).await?;
        let retire = self.retire_of(&stream);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| self.handshake_failed(source))?;
        spawn_connection(OpenConnection::new(slot), async move {
            let _ = conn.await;
        });
        Ok((sender, retire))
    }

    fn handshake_failed(&self, source: hyper::Error) -> ProxyError {
        ProxyError::UpstreamHandshake {
            endpoint: self.addr,
            source,
        }
    }
}

/// Runs a hyper connection's task, which keeps the connection counted
/// until it ends.
fn spawn_connection(
    open: OpenConnection,
    conn: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        conn.await;
        drop(open);
    });
}

/// What [`Endpoint::connection_or_slot`] found.
enum Acquired<T> {
    /// A connection to use.
    Existing(T),
    /// Leave to open one.
    Slot(ConnectionSlot),
}

/// One connection open or opening, against the cluster's
/// `max_connections`, until dropped.
#[derive(Debug)]
struct ConnectionSlot(Arc<ClusterMetrics>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections_held.fetch_sub(1, SeqCst);
        wake_pending(&self.0);
    }
}

/// A TCP listener's upstream connection, held against the cluster's
/// `max_connections` until dropped.
#[derive(Debug)]
pub(crate) struct TcpConnection {
    _open: OpenConnection,
}

/// One open connection: its slot against `max_connections` and its place
/// in the open-connections gauge, until dropped.
#[derive(Debug)]
struct OpenConnection(ConnectionSlot);

impl OpenConnection {
    fn new(slot: ConnectionSlot) -> Self {
        slot.0.connections_active.fetch_add(1, Relaxed);
        Self(slot)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.0.connections_active.fetch_sub(1, Relaxed);
    }
}

/// One request waiting for a connection, until dropped.
#[derive(Debug)]
struct PendingGuard(Arc<ClusterMetrics>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.requests_pending.fetch_sub(1, SeqCst);
    }
}

/// Wakes the cluster's pending requests, if any: they look for an idle
/// connection or a free slot again. Costs one atomic load when nobody
/// waits (a connection going idle is per request).
fn wake_pending(metrics: &ClusterMetrics) {
    if metrics.requests_pending.load(SeqCst) > 0 {
        metrics.connection_released.notify_waiters();
    }
}

/// Keeps an endpoint's in-flight count up while a request or tunnel lives
/// (and, for an HTTP request, its cluster's: the circuit breaker's).
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Endpoint>, bool);

impl ActiveGuard {
    /// The endpoint's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.0.addr
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
        if self.1 {
            self.0
                .settings
                .metrics
                .requests_active
                .fetch_sub(1, Relaxed);
        }
    }
}

#[derive(Debug)]
struct GiveBack {
    endpoint: Arc<Endpoint>,
    open: OpenConnection,
    retire: Retire,
}

impl GiveBack {
    fn give(self, conn: H1Connection) {
        self.endpoint.give_back(PooledH1 {
            conn,
            open: self.open,
            retire: self.retire,
        });
    }
}

/// How long before a certificate of a pooled TLS connection expires the
/// pool stops giving it new requests: the peer closes the connection at
/// the expiry (as this proxy does), and a request sent into that close
/// would fail.
const RETIRE_BEFORE_EXPIRY: Duration = Duration::from_secs(1);

/// When a pooled connection stops taking new requests (`None`: never).
#[derive(Debug, Clone, Copy)]
struct Retire(Option<Instant>);

impl Retire {
    fn is_due(self) -> bool {
        self.0.is_some_and(|at| Instant::now() >= at)
    }
}

/// An upstream response body. Returns its HTTP/1.1 connection to the
/// pool once read to the end, and holds the endpoint's in-flight count
/// until dropped.
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    body: Upstream,
    guard: ActiveGuard,
    /// The attempt's client span, when it is recorded: it ends when the
    /// body is dropped (a failed attempt's response dropped for a retry,
    /// else the answer's body over), unless taken to end later.
    span: Option<OpenSpan>,
}

#[derive(Debug)]
enum Upstream {
    /// HTTP/2, or an upgrade's response: hyper's.
    Hyper(Incoming),
    /// HTTP/1.1: ours, with what puts its connection back in the pool.
    H1 {
        body: super::h1::ResponseBody<Stream, RequestBody>,
        back: Option<GiveBack>,
    },
}

impl UpstreamBody {
    fn hyper(body: Incoming, guard: ActiveGuard) -> Self {
        Self {
            body: Upstream::Hyper(body),
            guard,
            span: None,
        }
    }

    fn h1(
        body: super::h1::ResponseBody<Stream, RequestBody>,
        back: GiveBack,
        guard: ActiveGuard,
    ) -> Self {
        Self {
            body: Upstream::H1 {
                body,
                back: Some(back),
            },
            guard,
            span: None,
        }
    }

    /// The endpoint that answered.
    pub(crate) fn endpoint(&self) -> SocketAddr {
        self.guard.addr()
    }

    /// Gives the body its attempt's client span.
    pub(crate) fn set_span(&mut self, span: OpenSpan) {
        self.span = Some(span);
    }

    /// Takes the attempt's client span out, for whoever ends it.
    pub(crate) fn take_span(&mut self) -> Option<OpenSpan> {
        self.span.take()
    }

    /// Gives the connection back once the exchange is over, if it may
    /// carry another.
    fn give_back_if_done(&mut self) {
        if let Upstream::H1 { body, back } = &mut self.body
            && body.is_end_stream()
            && let Some(conn) = body.take_connection()
            && let Some(back) = back.take()
        {
            back.give(conn);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves unread bytes on the
        // connection: it cannot be reused, so it is closed instead.
        self.give_back_if_done();
    }
}

/// Why an upstream response body stopped short.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamBodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    H1(#[from] super::h1::Error),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        let this = self.get_mut();
        match &mut this.body {
            Upstream::Hyper(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(UpstreamBodyError::Hyper))),
            Upstream::H1 { body, .. } => {
                let polled = Pin::new(body).poll_frame(cx);
                this.give_back_if_done();
                polled.map(|frame| frame.map(|f| f.map_err(UpstreamBodyError::H1)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Upstream::Hyper(body) => body.is_end_stream(),
            Upstream::H1 { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Upstream::Hyper(body) => body.size_hint(),
            Upstream::H1 { body, .. } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests;
