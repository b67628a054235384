//! The xDS server: Envoy's aggregated discovery service, state of the world
//! ([`sotw`]) and incremental ([`delta`]), served from one
//! [`SnapshotCache`], plus the admin HTTP API ([`crate::admin`]) that
//! reports on it.
//!
//! What it owns: the listening sockets, every connection and stream task
//! (tracked by one `TaskTracker`, all holding one drain token), the
//! connection registry behind `/status`, and the counters behind
//! `/metrics`. What it leaves to others: building snapshots (the mesh
//! module calls [`SnapshotCache::set`]).
//!
//! Wire behaviour:
//! - gRPC over cleartext HTTP/2 with prior knowledge; tonic's generated
//!   service is served by hyper directly.
//! - Every RPC must carry `authorization: Bearer <token>` ([`Auth`]), else it
//!   fails `UNAUTHENTICATED` before reaching the service.
//! - The first request of a stream must name a node with an id
//!   (`INVALID_ARGUMENT`). A node id the mesh does not know is refused
//!   (`PERMISSION_DENIED`, naming the id): it would get no configuration,
//!   and a proxy that waits for one is a proxy misconfigured.
//! - A node's service is the mesh's, never the proxy's: its claim
//!   (`Node.cluster`, the proxy's `--service`) must be exactly the service
//!   the mesh gives the node, or none for a gateway, else the stream is
//!   refused (`PERMISSION_DENIED`), at admission and again whenever the
//!   mesh changes. So a proxy that omits `--service` gets no workload's
//!   configuration. With a shared bootstrap token this is a consistency
//!   check, not an identity: a proxy holding the token can still name any
//!   node and its service.
//! - At most [`XdsLimits::max_connections`] connections at once: one more
//!   is closed as soon as it is accepted, and counted, while the others
//!   keep working. A new connection must complete the HTTP/2 handshake and
//!   open an authenticated stream within [`XdsLimits::handshake_timeout`],
//!   else it is closed: a peer that connects and sends nothing (or only
//!   refused requests) cannot hold a connection slot.
//! - Type URLs other than [`crate::resources::TYPE_URLS`] are ignored with a
//!   debug log: the server never invents a resource type, and a client
//!   waiting for one falls back on its own initial-fetch timeout. Keeping no
//!   state for them also bounds a stream's memory whatever a client asks.
//! - Each stream has its own task and a bounded response queue: a slow
//!   client delays only itself.
//!
//! Long-lived streams have no read deadline of their own: an idle stream is
//! normal. Dead peers are found by HTTP/2 keep-alive pings, which close the
//! connection when unanswered.

mod auth;
mod delta;
mod identity;
mod registry;
mod sotw;
mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codegen::Service as _;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, debug, info, warn};
use weft_proto::envoy::config::core::v3::Node;
use weft_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use weft_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use weft_proto::identity::v1::identity_service_server::IdentityServiceServer;

use self::auth::Caller;
pub use self::auth::{Auth, BootstrapToken, NodeTokens};
pub use self::identity::{IdentityOptions, MIN_TTL};
use self::registry::Registry;
pub use self::tls::{XdsTls, control_plane_id};
use crate::cache::{NodeWatch, SnapshotCache};
use crate::resources::{NodeResources, TYPE_URLS};
use crate::status::{Protocol, ProxyStatus, StatusReport};

/// Responses queued per stream before its task waits for the client. A
/// push is at most one response per type, so this holds a full push.
const RESPONSE_QUEUE: usize = 4;
/// How long a new stream may take to send its first request.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request accepted: requests carry names and error messages,
/// never resources.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// A proxy speaks one ADS stream at a time; a few more allow overlap while
/// it reconnects.
const H2_MAX_CONCURRENT_STREAMS: u32 = 4;
/// Flow-control windows: requests are small, so the receive side needs
/// little. Kept modest to bound memory per connection.
const H2_STREAM_WINDOW_BYTES: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW_BYTES: u32 = 128 * 1024;
/// Bytes hyper buffers per stream for sending before it waits for the
/// client's window.
const H2_MAX_SEND_BUF_BYTES: usize = 64 * 1024;
const H2_MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Dead-peer detection for long-lived, mostly idle streams.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Node ids longer than this are refused: they are stored per stream.
const MAX_NODE_ID_BYTES: usize = 512;
/// NACK messages longer than this are truncated before being stored.
const MAX_NACK_MESSAGE_BYTES: usize = 1024;

/// Connection limits of the xDS server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdsLimits {
    /// Connections open at once; more are closed when accepted.
    pub max_connections: usize,
    /// How long a new connection may take to send the HTTP/2 preface and
    /// open its first authenticated stream.
    pub handshake_timeout: Duration,
}

impl XdsLimits {
    /// The default connection cap. A proxy holds one connection; about
    /// 40 KiB of control-plane memory each (`weft-bench xds`,
    /// benches/RESULTS.md) makes 10,000 about 400 MiB, and the bench's
    /// 5,000 proxies fit with room to reconnect.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
    /// The default handshake deadline: a proxy sends its preface, SETTINGS
    /// and first request in one round trip, so 10 s is generous even across
    /// a loaded network, while a silent peer is gone quickly.
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
}

impl Default for XdsLimits {
    fn default() -> Self {
        Self {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// How to start a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Where proxies connect (gRPC, h2c); port 0 picks a free port.
    pub xds_addr: SocketAddr,
    /// Where the admin API listens (HTTP/1.1); port 0 picks a free port.
    pub admin_addr: SocketAddr,
    /// Who may call the xDS and admin APIs.
    pub auth: Auth,
    /// The snapshots to serve.
    pub cache: SnapshotCache,
    /// How long [`Server::shutdown`] waits for connections to close before
    /// dropping them.
    pub drain_timeout: Duration,
    /// Connection cap and handshake deadline.
    pub limits: XdsLimits,
    /// The CA behind the identity service; without one, signing requests
    /// fail `FAILED_PRECONDITION`.
    pub identity: Option<IdentityOptions>,
    /// Per-node tokens, accepted beside `auth`'s on the xDS and identity
    /// APIs.
    pub node_tokens: Option<NodeTokens>,
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listening socket could not be bound.
    #[error("binding the {what} address {addr}")]
    Bind {
        /// `xds` or `admin`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running xDS and admin server on the current Tokio runtime.
///
/// Dropping it without [`Server::shutdown`] stops accepting but leaves
/// established streams to end on their own.
#[derive(Debug)]
pub struct Server {
    xds_addr: SocketAddr,
    admin_addr: SocketAddr,
    shared: Arc<Shared>,
    drain_timeout: Duration,
}

impl Server {
    /// Binds both addresses and starts serving.
    ///
    /// # Errors
    ///
    /// When an address cannot be bound.
    pub async fn start(options: ServerOptions) -> Result<Self, ServerError> {
        let bind = |what: &'static str, addr: SocketAddr| async move {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { what, addr, source })?;
            let local =
                listener
                    .local_addr()
                    .map_err(|source| ServerError::Bind { what, addr, source })?;
            Ok::<_, ServerError>((listener, local))
        };
        let (xds_listener, xds_addr) = bind("xds", options.xds_addr).await?;
        let (admin_listener, admin_addr) = bind("admin", options.admin_addr).await?;
        if matches!(options.auth, Auth::Insecure) {
            warn!("xds and admin APIs accept unauthenticated clients (insecure)");
        }
        let shared = Arc::new(Shared {
            cache: options.cache,
            auth: options.auth,
            registry: Arc::new(Registry::default()),
            metrics: Metrics::default(),
            nonce: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            drain: CancellationToken::new(),
            abort: CancellationToken::new(),
            connections: Arc::new(Semaphore::new(options.limits.max_connections)),
            limits: options.limits,
            identity: options.identity,
            node_tokens: options.node_tokens,
        });
        shared.tasks.spawn(
            accept_xds(xds_listener, Arc::clone(&shared))
                .instrument(tracing::info_span!("xds", listener = %xds_addr)),
        );
        shared.tasks.spawn(
            crate::admin::serve(admin_listener, Arc::clone(&shared))
                .instrument(tracing::info_span!("admin", listener = %admin_addr)),
        );
        info!(xds = %xds_addr, admin = %admin_addr, "control plane listening");
        Ok(Self {
            xds_addr,
            admin_addr,
            shared,
            drain_timeout: options.drain_timeout,
        })
    }

    /// The bound xDS address.
    pub fn xds_addr(&self) -> SocketAddr {
        self.xds_addr
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The cache the server serves from.
    pub fn cache(&self) -> &SnapshotCache {
        &self.shared.cache
    }

    /// The status report `/status` serves.
    pub fn status(&self) -> StatusReport {
        self.shared.status_report()
    }

    /// Drains: `/ready` turns 503, accepting stops, every stream ends
    /// (`UNAVAILABLE`, so that proxies reconnect elsewhere) and every
    /// connection gets a GOAWAY. What is still open after the drain timeout
    /// is dropped.
    pub async fn shutdown(self) {
        info!("control plane draining");
        self.shared.drain.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(self.drain_timeout, self.shared.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.shared.tasks.len(),
                "drain timed out; closing what remains"
            );
            self.shared.abort.cancel();
            self.shared.tasks.wait().await;
        }
        info!("control plane stopped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Without a shutdown, at least stop accepting and end the streams.
        self.shared.drain.cancel();
    }
}

/// Counters behind `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) responses_sent: AtomicU64,
    pub(crate) acks: AtomicU64,
    pub(crate) nacks: AtomicU64,
    pub(crate) unauthenticated: AtomicU64,
    pub(crate) unknown_nodes: AtomicU64,
    pub(crate) service_mismatches: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) handshake_timeouts: AtomicU64,
    pub(crate) certificates_issued: AtomicU64,
    pub(crate) csr_refused: AtomicU64,
    pub(crate) tls_refused: AtomicU64,
    pub(crate) token_node_mismatches: AtomicU64,
}

/// State shared by every connection, stream and the admin API.
#[derive(Debug)]
pub(crate) struct Shared {
    cache: SnapshotCache,
    auth: Auth,
    registry: Arc<Registry>,
    metrics: Metrics,
    nonce: AtomicU64,
    tasks: TaskTracker,
    /// Cancelled when draining starts.
    drain: CancellationToken,
    /// Cancelled when the drain deadline passes.
    abort: CancellationToken,
    /// One permit per open xDS connection.
    connections: Arc<Semaphore>,
    limits: XdsLimits,
    identity: Option<IdentityOptions>,
    node_tokens: Option<NodeTokens>,
}

impl Shared {
    /// A nonce never used before by this server.
    fn next_nonce(&self) -> String {
        (self.nonce.fetch_add(1, Ordering::Relaxed) + 1).to_string()
    }

    pub(crate) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub(crate) fn drain(&self) -> &CancellationToken {
        &self.drain
    }

    pub(crate) fn abort(&self) -> &CancellationToken {
        &self.abort
    }

    pub(crate) fn is_ready(&self) -> bool {
        !self.drain.is_cancelled()
    }

    /// Checks a request's `authorization` header; counts and logs failures
    /// (never the header's value).
    pub(crate) fn authorize(&self, headers: &http::HeaderMap, peer: SocketAddr) -> bool {
        match self.auth.check(headers) {
            Ok(()) => true,
            Err(reason) => {
                self.metrics.unauthenticated.fetch_add(1, Ordering::Relaxed);
                warn!(peer.addr = %peer, reason = reason.as_str(), "request refused: unauthenticated");
                false
            }
        }
    }

    /// Who an xDS or identity request's token proves the caller to be;
    /// counts and logs failures (never the token).
    fn identify(&self, headers: &http::HeaderMap, peer: SocketAddr) -> Option<Caller> {
        match auth::identify(&self.auth, self.node_tokens.as_ref(), headers) {
            Ok(caller) => Some(caller),
            Err(reason) => {
                self.metrics.unauthenticated.fetch_add(1, Ordering::Relaxed);
                warn!(peer.addr = %peer, reason = reason.as_str(), "request refused: unauthenticated");
                None
            }
        }
    }

    /// Whether `caller` may act as `node_id`: a node token only for its
    /// own node, the mesh-wide token unless node tokens are required.
    pub(super) fn check_caller(
        &self,
        caller: Option<&Caller>,
        node_id: &str,
    ) -> Result<(), Status> {
        let refuse = |message: String| {
            self.metrics
                .token_node_mismatches
                .fetch_add(1, Ordering::Relaxed);
            warn!(node = node_id, reason = %message, "request refused: the caller's credentials do not prove this node");
            Err(Status::permission_denied(message))
        };
        match caller {
            Some(Caller::Node(node)) if **node != *node_id => {
                refuse(format!("the token is for node {node:?}, not {node_id:?}"))
            }
            Some(Caller::Workload(id)) => match self.cache.identity(node_id) {
                Some(Some(mesh)) if *mesh == **id => Ok(()),
                Some(Some(mesh)) => refuse(format!(
                    "the client certificate is for {id}; node {node_id:?} is {mesh}"
                )),
                _ => refuse(format!(
                    "the client certificate is for {id}; node {node_id:?} has no identity in the mesh"
                )),
            },
            Some(Caller::Operator) | None
                if self.node_tokens.as_ref().is_some_and(|t| t.require) =>
            {
                refuse(
                    "this control plane accepts node tokens only (issue one with weft-cp token issue)"
                        .to_owned(),
                )
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn status_report(&self) -> StatusReport {
        StatusReport {
            mesh_generation: self.cache.generation(),
            config_error: match (self.cache.config_error(), self.cache.trust_error()) {
                (Some(mesh), Some(trust)) => Some(format!("{mesh}\n{trust}")),
                (mesh, trust) => mesh.or(trust),
            },
            proxies: self.registry.snapshot(),
        }
    }

    /// The Prometheus text exposition of the counters.
    pub(crate) fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let open_connections = self
            .limits
            .max_connections
            .saturating_sub(self.connections.available_permits());
        let rows: [(&str, &str, &str, u64); 15] = [
            (
                "weft_cp_connected_proxies",
                "gauge",
                "xDS streams currently open.",
                self.registry.len() as u64,
            ),
            (
                "weft_cp_mesh_generation",
                "gauge",
                "Mesh snapshots applied.",
                self.cache.generation(),
            ),
            (
                "weft_cp_xds_responses_total",
                "counter",
                "xDS responses sent.",
                m.responses_sent.load(Ordering::Relaxed),
            ),
            (
                "weft_cp_xds_acks_total",
                "counter",
                "xDS responses acknowledged.",
                m.acks.load(Ordering::Relaxed),
            ),
            (
                "weft_cp_xds_nacks_total",
                "counter",
                "xDS responses rejected.",
                m.nacks.load(Ordering::Relaxed),
            ),
            (
                "weft_cp_unauthenticated_requests_total",
                "counter",
                "Requests refused for a missing or wrong token.",
                m.unauthenticated.load(Ordering::Relaxed),
            ),
            (
                "weft_cp_unknown_node_streams_total",
                "counter",
                "xDS streams refused because the mesh does not know their node id.",
                m.unknown_nodes.load(Ordering::Relaxed),
            ),
            (
                "weft_cp_service_mismatch_streams_total",
                "counter",
                "xDS streams refused or ended because the proxy's service claim disagrees with the mesh.",
                m.service_mismatches.load(Ordering::Relaxed),
            ),
            (
                "weft_cp_xds_connections",
                "gauge",
                "xDS connections currently open.",
                open_connections as u64,
            ),
            (
                "weft_cp_xds_connections_refused_total",
                "counter",
                "xDS connections closed at accept because the connection cap was reached.",
                m.connections_refused.load(Ordering::Relaxed),
            ),
            (
                "weft_cp_xds_handshake_timeouts_total",
                "counter",
                "xDS connections closed for not opening an authenticated stream within the handshake deadline.",
                m.handshake_timeouts.load(Ordering::Relaxed),
            ),
            (
                "weft_cp_certificates_issued_total",
                "counter",
                "Workload certificates signed by the identity service.",
                m.certificates_issued.load(Ordering::Relaxed),
            ),
            (
                "weft_cp_csr_refused_total",
                "counter",
                "Certificate signing requests refused (unknown node, another identity, invalid CSR, no CA).",
                m.csr_refused.load(Ordering::Relaxed),
            ),
            (
                "weft_cp_node_token_refusals_total",
                "counter",
                "xDS streams and signing requests refused because the node token or client certificate is for another node, or node tokens are required.",
                m.token_node_mismatches.load(Ordering::Relaxed),
            ),
            (
                "weft_cp_xds_tls_refused_total",
                "counter",
                "xDS connections refused in TLS: failed handshake, no client certificate of the mesh, or a certificate without exactly one SPIFFE ID.",
                m.tls_refused.load(Ordering::Relaxed),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The peer address, put in each request's extensions for the service.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);

async fn accept_xds(listener: TcpListener, shared: Arc<Shared>) {
    let service = Services {
        ads: AggregatedDiscoveryServiceServer::new(AdsService {
            shared: Arc::clone(&shared),
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES),
        identity: IdentityServiceServer::new(identity::Signer {
            shared: Arc::clone(&shared),
            options: shared.identity.clone(),
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES),
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(H2_CONNECTION_WINDOW_BYTES)
        .max_send_buf_size(H2_MAX_SEND_BUF_BYTES)
        .max_header_list_size(H2_MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    let builder = Arc::new(builder);
    // Whether the last connection was refused for the cap: the warning is
    // logged once per episode, not once per connection of a flood.
    let mut is_at_capacity = false;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.drain.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = Arc::clone(&shared.connections).try_acquire_owned() else {
                    // Closed at once (dropping the socket): the peer sees
                    // the connection end before any HTTP/2 frame.
                    shared
                        .metrics
                        .connections_refused
                        .fetch_add(1, Ordering::Relaxed);
                    if is_at_capacity {
                        debug!(peer.addr = %peer, "xds connection refused: connection cap reached");
                    } else {
                        warn!(
                            peer.addr = %peer,
                            max_connections = shared.limits.max_connections,
                            "xds connection cap reached; refusing new connections"
                        );
                        is_at_capacity = true;
                    }
                    drop(stream);
                    continue;
                };
                is_at_capacity = false;
                shared.tasks.spawn(
                    serve_xds_connection(
                        stream,
                        peer,
                        Arc::clone(&shared),
                        service.clone(),
                        Arc::clone(&builder),
                        permit,
                    )
                    .instrument(tracing::debug_span!("conn", peer.addr = %peer)),
                );
            }
            Err(error) => {
                warn!(error = %error, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    () = shared.drain.cancelled() => return,
                }
            }
        }
    }
}

async fn serve_xds_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    service: Services,
    builder: Arc<hyper::server::conn::http2::Builder<TokioExecutor>>,
    // Held until the connection ends: its slot under the cap.
    _permit: OwnedSemaphorePermit,
) {
    if let Err(error) = stream.set_nodelay(true) {
        debug!(error = %error, "setting TCP_NODELAY failed");
    }
    // The handshake deadline covers TLS too: a peer holds a slot for at
    // most this long without opening an authenticated stream.
    let handshake_deadline = tokio::time::sleep(shared.limits.handshake_timeout);
    let mut handshake_deadline = std::pin::pin!(handshake_deadline);
    let accepted = tokio::select! {
        accepted = accept_transport(stream, &shared) => accepted,
        () = handshake_deadline.as_mut() => {
            shared.metrics.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            debug!("xds connection closed: no TLS handshake within the handshake deadline");
            return;
        }
    };
    let (io, workload) = match accepted {
        Ok(accepted) => accepted,
        Err(reason) => {
            shared.metrics.tls_refused.fetch_add(1, Ordering::Relaxed);
            warn!(peer.addr = %peer, %reason, "xds connection refused");
            return;
        }
    };
    // Set by the first authenticated request: the handshake is complete.
    let is_established = Arc::new(AtomicBool::new(false));
    let handler_shared = Arc::clone(&shared);
    let handler_established = Arc::clone(&is_established);
    let handler_workload = workload.as_ref().map(|w| w.spiffe_id.clone());
    let handler = service_fn(move |mut request: http::Request<Incoming>| {
        let shared = Arc::clone(&handler_shared);
        let is_established = Arc::clone(&handler_established);
        let workload = handler_workload.clone();
        let mut service = service.clone();
        async move {
            // A client certificate proves the caller; without one, the
            // bearer token does.
            let caller = match workload {
                Some(id) => Caller::Workload(id),
                None => match shared.identify(request.headers(), peer) {
                    Some(caller) => caller,
                    None => {
                        let status = Status::unauthenticated("missing or wrong bearer token");
                        return Ok::<_, Infallible>(status.into_http());
                    }
                },
            };
            is_established.store(true, Ordering::Relaxed);
            request.extensions_mut().insert(PeerAddr(peer));
            request.extensions_mut().insert(caller);
            if request.uri().path().starts_with(IDENTITY_PATH) {
                service.identity.call(request).await
            } else {
                service.ads.call(request).await
            }
        }
    });
    // No connection outlives the client certificate that opened it: at its
    // expiry the connection is closed gracefully, and the proxy reconnects
    // with its renewed one.
    let expiry = workload.as_ref().map_or(Duration::MAX, |w| {
        w.not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
    });
    let expiry = tokio::time::sleep(expiry.min(Duration::from_secs(400 * 24 * 3600)));
    let mut expiry = std::pin::pin!(expiry);
    let mut is_expiring = false;
    // The connection future makes no progress without bytes from the peer,
    // and hyper has no deadline for the preface: the handshake deadline
    // bounds how long a peer can hold a slot without opening a stream.
    let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(io), handler));
    let mut is_past_handshake = false;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            () = expiry.as_mut(), if !is_expiring => {
                is_expiring = true;
                debug!("xds connection closing: the client certificate expired");
                conn.as_mut().graceful_shutdown();
            }
            () = handshake_deadline.as_mut(), if !is_past_handshake => {
                if is_established.load(Ordering::Relaxed) {
                    is_past_handshake = true;
                    continue;
                }
                shared.metrics.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                debug!(
                    timeout = ?shared.limits.handshake_timeout,
                    "xds connection closed: no authenticated stream within the handshake deadline"
                );
                // Dropping the connection closes the socket.
                return;
            }
            () = shared.drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    result = conn.as_mut() => break result,
                    () = shared.abort.cancelled() => return,
                }
            }
        }
    };
    if let Err(error) = result {
        debug!(error = %error, "xds connection closed with an error");
    }
}

/// Either side of the xDS port: cleartext, or TLS with a verified client.
trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Transport for T {}

/// Tells TLS from cleartext by the first byte, and completes the TLS
/// handshake; a TLS client must present a certificate of the mesh with
/// exactly one SPIFFE ID.
async fn accept_transport(
    stream: TcpStream,
    shared: &Shared,
) -> Result<(Box<dyn Transport>, Option<tls::PeerIdentity>), String> {
    /// The first byte of a TLS handshake record.
    const TLS_HANDSHAKE: u8 = 0x16;
    let mut first = [0_u8; 1];
    let read = stream
        .peek(&mut first)
        .await
        .map_err(|e| format!("reading: {e}"))?;
    if read == 0 || first[0] != TLS_HANDSHAKE {
        return Ok((Box::new(stream), None));
    }
    let Some(tls) = shared
        .identity
        .as_ref()
        .and_then(|identity| identity.xds_tls.as_ref())
    else {
        return Err("a TLS client, but this control plane has no CA to serve TLS with".into());
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
    let stream = acceptor
        .accept(stream)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let (_, session) = stream.get_ref();
    let identity = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(tls::peer_identity)
        .ok_or("the client certificate does not carry exactly one SPIFFE ID")?;
    Ok((Box::new(stream), Some(identity)))
}

/// The gRPC services of the xDS port, chosen by path.
#[derive(Debug, Clone)]
struct Services {
    ads: AggregatedDiscoveryServiceServer<AdsService>,
    identity: IdentityServiceServer<identity::Signer>,
}

/// The path prefix of the identity service's methods.
const IDENTITY_PATH: &str = "/weft.identity.v1.IdentityService/";

/// The tonic service: admits a stream, then hands it to its own task.
#[derive(Debug)]
struct AdsService {
    shared: Arc<Shared>,
}

type ResponseStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request.extensions().get::<PeerAddr>().map(|p| p.0);
        let caller = request.extensions().get::<Caller>().cloned();
        let mut inbound = request.into_inner();
        let first = first_request(&mut inbound).await?;
        let (node_id, claimed, watch) = admit(&self.shared, first.node.as_ref(), caller.as_ref())?;
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let span = tracing::info_span!("ads", node = %node_id, protocol = "sotw");
        let identity = workload_identity(caller.as_ref());
        let stream = self.start_stream(node_id, claimed, &watch, Protocol::Sotw, peer, identity);
        self.shared.tasks.spawn(
            serve_stream(sotw::Sotw::new(stream), watch, inbound, first, tx).instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.extensions().get::<PeerAddr>().map(|p| p.0);
        let caller = request.extensions().get::<Caller>().cloned();
        let mut inbound = request.into_inner();
        let first = first_request(&mut inbound).await?;
        let (node_id, claimed, watch) = admit(&self.shared, first.node.as_ref(), caller.as_ref())?;
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let span = tracing::info_span!("ads", node = %node_id, protocol = "delta");
        let identity = workload_identity(caller.as_ref());
        let stream = self.start_stream(node_id, claimed, &watch, Protocol::Delta, peer, identity);
        self.shared.tasks.spawn(
            serve_stream(delta::Delta::new(stream), watch, inbound, first, tx).instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl AdsService {
    fn start_stream(
        &self,
        node_id: String,
        claimed_service: Option<String>,
        watch: &NodeWatch,
        protocol: Protocol,
        peer: Option<SocketAddr>,
        identity: Option<String>,
    ) -> StreamContext {
        info!(node = %node_id, protocol = protocol.as_str(), identity, "proxy connected");
        let registration = self.shared.registry.register(ProxyStatus {
            node_id: node_id.clone(),
            service: watch.service(),
            protocol,
            peer,
            identity,
            connected_since_unix: unix_now(),
            types: std::collections::BTreeMap::new(),
        });
        StreamContext {
            shared: Arc::clone(&self.shared),
            node_id,
            claimed_service,
            registration,
        }
    }
}

/// The SPIFFE ID a caller proved with a client certificate.
fn workload_identity(caller: Option<&Caller>) -> Option<String> {
    match caller {
        Some(Caller::Workload(id)) => Some(id.to_string()),
        _ => None,
    }
}

/// What a stream task needs besides its protocol state.
#[derive(Debug)]
struct StreamContext {
    shared: Arc<Shared>,
    node_id: String,
    /// The service the proxy said it runs for (`Node.cluster`; `None`: no
    /// service, a gateway): checked again whenever the mesh changes.
    claimed_service: Option<String>,
    registration: registry::Registration,
}

impl StreamContext {
    fn sent(&self, type_url: &str, version: &str) {
        self.shared
            .metrics
            .responses_sent
            .fetch_add(1, Ordering::Relaxed);
        self.registration.sent(type_url, version);
    }

    fn acked(&self, type_url: &str, version: &str) {
        self.shared.metrics.acks.fetch_add(1, Ordering::Relaxed);
        debug!(type_url, version, "ack");
        self.registration.acked(type_url, version);
    }

    fn nacked(&self, type_url: &str, version: &str, error: &str) {
        self.shared.metrics.nacks.fetch_add(1, Ordering::Relaxed);
        let error = truncate(error, MAX_NACK_MESSAGE_BYTES);
        warn!(node = %self.node_id, type_url, version, error, "proxy rejected configuration");
        self.registration
            .nacked(type_url, version, error, unix_now());
    }

    fn next_nonce(&self) -> String {
        self.shared.next_nonce()
    }

    fn drain(&self) -> &CancellationToken {
        &self.shared.drain
    }
}

impl Drop for StreamContext {
    fn drop(&mut self) {
        info!(node = %self.node_id, "proxy disconnected");
    }
}

fn truncate(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A message type with a `Node` on a stream's first request.
trait FirstRequest: Default + Send + 'static {}
impl FirstRequest for DiscoveryRequest {}
impl FirstRequest for DeltaDiscoveryRequest {}

/// Reads a stream's first request under a deadline.
async fn first_request<T: FirstRequest>(inbound: &mut Streaming<T>) -> Result<T, Status> {
    match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.message()).await {
        Err(_) => Err(Status::deadline_exceeded(
            "no discovery request within the first-request deadline",
        )),
        Ok(Err(status)) => Err(status),
        Ok(Ok(None)) => Err(Status::invalid_argument(
            "the stream ended before its first request",
        )),
        Ok(Ok(Some(request))) => Ok(request),
    }
}

/// Checks a node's service claim (`Node.cluster`; `None` when empty)
/// against the service the mesh gives the node now: they must be equal,
/// `None` meaning a gateway. A node the mesh no longer has is not checked
/// (its streams are served nothing; see [`admit`] for new streams).
fn check_service(
    shared: &Shared,
    node_id: &str,
    claimed: Option<&str>,
    watch: &NodeWatch,
) -> Result<(), Status> {
    if !watch.is_known_now() {
        return Ok(());
    }
    let message = match (watch.service(), claimed) {
        (service, claimed) if service.as_deref() == claimed => return Ok(()),
        (Some(service), Some(claimed)) => {
            format!("node {node_id:?} belongs to service {service:?} in the mesh, not {claimed:?}")
        }
        (Some(service), None) => format!(
            "node {node_id:?} belongs to service {service:?} in the mesh, and the proxy claims no service (start it with --service {service})"
        ),
        (None, claimed) => format!(
            "node {node_id:?} is a gateway in the mesh, with no service, not a workload of {:?} (start it without --service)",
            claimed.unwrap_or_default()
        ),
    };
    shared
        .metrics
        .service_mismatches
        .fetch_add(1, Ordering::Relaxed);
    warn!(node = ?node_id, claimed, "proxy refused: service claim disagrees with the mesh");
    Err(Status::permission_denied(message))
}

/// Admits a stream's node: it must have an id the mesh knows, and claim
/// exactly the service the mesh gives it. Returns the id, the claim and
/// the node's watch.
fn admit(
    shared: &Shared,
    node: Option<&Node>,
    caller: Option<&Caller>,
) -> Result<(String, Option<String>, NodeWatch), Status> {
    let Some(node) = node.filter(|n| !n.id.is_empty()) else {
        return Err(Status::invalid_argument(
            "the first request of a stream must carry a node with an id",
        ));
    };
    if node.id.len() > MAX_NODE_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "node id longer than {MAX_NODE_ID_BYTES} bytes"
        )));
    }
    shared.check_caller(caller, &node.id)?;
    let watch = shared.cache.watch(&node.id);
    if !watch.is_known() {
        shared.metrics.unknown_nodes.fetch_add(1, Ordering::Relaxed);
        warn!(node = ?node.id, "proxy refused: node id unknown to the mesh");
        return Err(Status::permission_denied(format!(
            "node id {:?} is unknown to the mesh: no workload or gateway has this name",
            node.id
        )));
    }
    let claimed = Some(node.cluster.clone()).filter(|c| !c.is_empty());
    check_service(shared, &node.id, claimed.as_deref(), &watch)?;
    Ok((node.id.clone(), claimed, watch))
}

/// Ends a stream with `status`. Waits for room in the response queue (a
/// dropped status would end the stream as if it had succeeded), but not
/// past the server's abort.
async fn end_with<T>(tx: &mpsc::Sender<Result<T, Status>>, ctx: &StreamContext, status: Status) {
    tokio::select! {
        _ = tx.send(Err(status)) => {}
        () = ctx.shared.abort.cancelled() => {}
    }
}

/// `UNAVAILABLE` tells a proxy to reconnect (to another replica, or to
/// this one when it is back).
fn draining() -> Status {
    Status::unavailable("control plane draining")
}

/// What differs between the two discovery protocols: how a request
/// changes the stream's state, and what to send for the node's current
/// resources. [`serve_stream`] drives either.
trait StreamProtocol {
    type Request;
    type Response;

    /// The stream's shared context (drain signal, registry entry).
    fn context(&self) -> &StreamContext;

    /// Applies a request (subscription, ACK or NACK); an error ends the
    /// stream with that status.
    fn on_request(&mut self, request: Self::Request) -> Result<(), Status>;

    /// The next response owed to the client for `resources`, if any.
    fn next_response(&mut self, resources: &NodeResources) -> Option<Self::Response>;
}

/// Serves one stream until the client leaves or the server drains: after
/// each request or change of the node's resources, sends every response
/// the protocol owes, then waits for the next event.
async fn serve_stream<P: StreamProtocol>(
    mut stream: P,
    mut watch: NodeWatch,
    mut inbound: Streaming<P::Request>,
    first: P::Request,
    tx: mpsc::Sender<Result<P::Response, Status>>,
) {
    let mut request = Some(first);
    loop {
        if let Some(request) = request.take()
            && let Err(status) = stream.on_request(request)
        {
            end_with(&tx, stream.context(), status).await;
            return;
        }
        let resources = watch.current();
        let ctx = stream.context();
        if let Err(status) = check_service(
            &ctx.shared,
            &ctx.node_id,
            ctx.claimed_service.as_deref(),
            &watch,
        ) {
            end_with(&tx, ctx, status).await;
            return;
        }
        while let Some(response) = stream.next_response(&resources) {
            tokio::select! {
                sent = tx.send(Ok(response)) => if sent.is_err() { return },
                () = stream.context().drain().cancelled() => return end_with(&tx, stream.context(), draining()).await,
            }
        }
        drop(resources);
        tokio::select! {
            () = stream.context().drain().cancelled() => return end_with(&tx, stream.context(), draining()).await,
            message = inbound.message() => match message {
                Ok(Some(next)) => request = Some(next),
                Ok(None) => return,
                Err(status) => {
                    debug!(code = ?status.code(), "stream read failed");
                    return;
                }
            },
            changed = watch.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

/// The index in [`TYPE_URLS`] of a request's type: `None` for a type this
/// server does not serve (ignored), an error for a request naming none.
fn type_index(type_url: &str) -> Result<Option<usize>, Status> {
    if type_url.is_empty() {
        return Err(Status::invalid_argument(
            "requests on an aggregated stream must name a type_url",
        ));
    }
    let index = TYPE_URLS.iter().position(|t| *t == type_url);
    if index.is_none() {
        debug!(type_url, "unknown type url ignored");
    }
    Ok(index)
}
