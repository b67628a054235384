//! The control-plane client: subscribes to listeners, route configurations
//! and clusters over one aggregated discovery stream (Envoy's ADS, state of
//! the world), applies what validates, ACKs and NACKs, and keeps the last
//! good configuration serving whatever happens to the control plane.
//!
//! It runs on the control runtime, apart from the workers. The decisions
//! (what to apply, ACK or NACK) are in [`state`], without sockets; this
//! module owns the connection: connect with a deadline, authenticate with a
//! bearer token, open the stream, and on any failure reconnect after a
//! jittered exponential backoff. A reconnecting client names the versions
//! it runs, so a control plane with nothing newer sends nothing.

mod state;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;
use weft_proto::envoy::config::core::v3::Node;
use weft_proto::envoy::service::discovery::v3::DiscoveryRequest;
use weft_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;

use crate::ConfigHandle;
use crate::config::BootstrapSpec;
use crate::drain::Drain;
use state::{Step, XdsState};

/// Deadline for the TCP connect and HTTP/2 handshake to the control plane.
/// A push's applies are announced once, this long after the last of them.
const ANNOUNCE_AFTER: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// mTLS handshakes with the control plane that may fail in a row before a
/// proxy holding a certificate falls back to its bootstrap token over
/// cleartext once: a control plane restarted with a CA it did not keep
/// must not strand its proxies until their certificates expire.
pub(crate) const TLS_FAILURES_BEFORE_TOKEN: u32 = 3;
/// First reconnect delay; doubles per failed attempt up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// HTTP/2 pings find a control plane that vanished without closing.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests queued for the stream (ACKs, NACKs); the loop never has more
/// than one response's worth outstanding.
const REQUEST_QUEUE: usize = 16;

/// How to reach the control plane and who this proxy is.
#[derive(Debug, Clone)]
pub struct XdsOptions {
    /// The control plane's xDS address, `HOST:PORT` (an `http://` prefix is
    /// accepted).
    pub server: String,
    /// This proxy's node id.
    pub node_id: String,
    /// The service this proxy runs for (`Node.cluster`), if any.
    pub service: Option<String>,
    /// The bearer token sent with the stream.
    pub token: Option<String>,
    /// The proxy's own settings, merged into every configuration received.
    pub bootstrap: BootstrapSpec,
}

/// Why one connection to the control plane ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    #[error("{0:?} is not a HOST:PORT address")]
    BadAddress(String),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    #[error("HTTP/2 handshake failed")]
    Handshake(#[source] hyper::Error),
    #[error("mTLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("the token is not a valid header value")]
    Token,
    #[error("stream failed")]
    Grpc(#[from] tonic::Status),
    #[error("the control plane closed the stream")]
    Closed,
}

/// Runs the client until the proxy drains: connects, streams, reconnects.
pub async fn run(options: XdsOptions, handle: ConfigHandle) {
    let drain = handle.drain();
    let source = match server_authority(&options.server) {
        Some(authority) => format!("xds {authority}"),
        None => format!("xds {}", options.server),
    };
    let mut state = XdsState::new(options.bootstrap.clone(), source);
    let node = Node {
        id: options.node_id.clone(),
        cluster: options.service.clone().unwrap_or_default(),
        metadata: None,
        user_agent_name: "weft-proxy".into(),
    };
    let mut attempt: u32 = 0;
    // mTLS handshakes with the control plane that failed in a row.
    let mut tls_failures: u32 = 0;
    loop {
        let mut received = false;
        let allow_tls = tls_failures < TLS_FAILURES_BEFORE_TOKEN;
        let result = tokio::select! {
            result = stream(&options, &node, &mut state, &handle, &mut received, allow_tls) => result,
            () = drain.cancelled() => return,
        };
        // Any other outcome (a cleartext attempt included) starts the
        // count over: the next attempt tries mTLS again.
        tls_failures = match &result {
            Err(StreamError::Tls(_)) => tls_failures.saturating_add(1),
            _ => 0,
        };
        if tls_failures == TLS_FAILURES_BEFORE_TOKEN {
            tracing::warn!(
                server = %options.server,
                "mTLS to the control plane keeps failing (a new CA it did not keep?); the next attempt proves this proxy with its token over cleartext"
            );
        }
        publish(&handle, &options, &state, false);
        if received {
            attempt = 0;
        }
        let delay = backoff(attempt);
        attempt = attempt.saturating_add(1);
        match result {
            Ok(()) => {}
            // Refused: an operator must fix the token or the node's
            // identity; retrying (slowly) picks up a fixed control plane.
            Err(StreamError::Grpc(status))
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                tracing::error!(
                    server = %options.server,
                    code = ?status.code(),
                    message = status.message(),
                    retry_in = ?delay,
                    "control plane refused this proxy"
                );
            }
            Err(error) => tracing::warn!(
                server = %options.server,
                error = %crate::error::chain(&error),
                retry_in = ?delay,
                "control plane stream ended; serving the last good configuration"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = drain.cancelled() => return,
        }
    }
}

/// One connection's life: connect, subscribe, handle responses until the
/// stream ends. `received` turns true on the first response (the backoff
/// then starts over).
async fn stream(
    options: &XdsOptions,
    node: &Node,
    state: &mut XdsState,
    handle: &ConfigHandle,
    received: &mut bool,
    allow_tls: bool,
) -> Result<(), StreamError> {
    let authority = server_authority(&options.server)
        .ok_or_else(|| StreamError::BadAddress(options.server.clone()))?;
    let identities = handle.identities();
    let mut svids = identities.subscribe_svids();
    let tls = crate::identity::control_plane_tls(&identities).filter(|_| allow_tls);
    let is_mtls = tls.is_some();
    let channel = tokio::time::timeout(
        CONNECT_TIMEOUT,
        connect(authority.as_str(), tls, &handle.drain()),
    )
    .await
    .map_err(|_| StreamError::ConnectTimeout)??;
    let origin = http::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query("/")
        .build()
        .map_err(|_| StreamError::BadAddress(options.server.clone()))?;
    let mut client = AggregatedDiscoveryServiceClient::with_origin(channel, origin);

    let (requests, queue) = mpsc::channel::<DiscoveryRequest>(REQUEST_QUEUE);
    for request in state.initial_requests(node) {
        // The queue is empty and larger than the number of types.
        let _ = requests.try_send(request);
    }
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(queue));
    if let Some(token) = &options.token {
        let value = tonic::metadata::MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| StreamError::Token)?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut responses =
        tokio::time::timeout(CONNECT_TIMEOUT, client.stream_aggregated_resources(request))
            .await
            .map_err(|_| StreamError::ConnectTimeout)??
            .into_inner();
    tracing::info!(server = %options.server, node = %options.node_id, mtls = is_mtls, "control plane stream open");
    publish(handle, options, state, true);
    // When to say at info that configuration was applied: once a burst of
    // responses (one push is one per resource type) has settled.
    let mut announce: Option<Instant> = None;
    loop {
        let deadline = state.warming_deadline();
        let message = tokio::select! {
            message = responses.message() => message?,
            () = sleep_until(deadline) => {
                send(&requests, state.warming_expired()).await?;
                publish(handle, options, state, true);
                continue;
            }
            // The first certificate arrived: the stream moves to mTLS (a
            // reconnect that names the versions it runs, so nothing is
            // resent).
            changed = svids.changed(), if !is_mtls => {
                if changed.is_ok() && crate::identity::control_plane_tls(&identities).is_some() {
                    tracing::info!(server = %options.server, "reconnecting to the control plane over mTLS");
                    return Ok(());
                }
                continue;
            }
            () = sleep_until(announce) => {
                announce = None;
                let config = handle.current_config();
                tracing::info!(
                    server = %options.server,
                    listeners = config.listeners.len(),
                    route_configs = config.route_configs.len(),
                    clusters = config.clusters.len(),
                    "configuration applied"
                );
                continue;
            }
        };
        let Some(response) = message else {
            return Err(StreamError::Closed);
        };
        *received = true;
        tracing::debug!(type_url = %response.type_url, version = %response.version_info, "configuration received");
        // Validation (regular expressions, Rego, certificate files) is
        // CPU work: off the control thread, which serves the admin API and
        // the other streams meanwhile.
        let step = match state.receive(response) {
            None => Step::Send(Vec::new()),
            Some(candidate) => {
                match tokio::task::spawn_blocking(move || candidate.validate()).await {
                    Ok((index, validated)) => state.judge(index, validated, Instant::now()),
                    Err(error) => match error.try_into_panic() {
                        Ok(panic) => std::panic::resume_unwind(panic),
                        // The runtime is shutting down.
                        Err(_) => return Err(StreamError::Closed),
                    },
                }
            }
        };
        let replies = match step {
            Step::Send(replies) => replies,
            Step::Apply(config) => match handle.apply(*config).await {
                Ok(_) => {
                    announce = Some(Instant::now() + ANNOUNCE_AFTER);
                    let acks = state.applied();
                    if state.is_complete() {
                        handle.set_ready();
                    }
                    acks
                }
                Err(error) => state.rejected(&error.to_string()),
            },
        };
        send(&requests, replies).await?;
        publish(handle, options, state, true);
    }
}

async fn send(
    requests: &mpsc::Sender<DiscoveryRequest>,
    replies: Vec<DiscoveryRequest>,
) -> Result<(), StreamError> {
    for reply in replies {
        requests
            .send(reply)
            .await
            .map_err(|_| StreamError::Closed)?;
    }
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

fn publish(handle: &ConfigHandle, options: &XdsOptions, state: &XdsState, connected: bool) {
    handle.set_xds_status(serde_json::json!({
        "server": options.server,
        "node": options.node_id,
        "service": options.service,
        "connected": connected,
        "types": state.status(),
    }));
}

/// The control plane's `HOST:PORT` from `--xds` (`http://HOST:PORT/` is
/// accepted too); `None` if it is not one.
pub fn server_authority(server: &str) -> Option<http::uri::Authority> {
    let address = server
        .strip_prefix("http://")
        .unwrap_or(server)
        .trim_end_matches('/');
    address
        .parse::<http::uri::Authority>()
        .ok()
        .filter(|authority| authority.port().is_some())
}

/// The wait before reconnect attempt `attempt` (see [`crate::rng::backoff`]).
fn backoff(attempt: u32) -> Duration {
    crate::rng::backoff(INITIAL_BACKOFF, MAX_BACKOFF, attempt)
}

/// The task that drives one connection to the control plane.
type ConnectionTask = Pin<Box<dyn std::future::Future<Output = Result<(), hyper::Error>> + Send>>;

/// A tonic channel over one hyper HTTP/2 connection: what tonic's
/// generated clients need, without tonic's own transport. The caller opens
/// the connection (and drives its connection task).
#[derive(Debug, Clone)]
pub struct GrpcChannel(pub hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<Request<tonic::body::Body>> for GrpcChannel {
    type Response = Response<Incoming>;
    type Error = hyper::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<Incoming>, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// Opens the HTTP/2 connection to the control plane: over mutual TLS with
/// `tls` (see [`crate::identity::control_plane_tls`]), else cleartext.
pub(crate) async fn connect(
    address: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    drain: &Drain,
) -> Result<GrpcChannel, StreamError> {
    // Resolves the name and tries each address in turn.
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(StreamError::Connect)?;
    let _ = stream.set_nodelay(true);
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let (sender, connection) = match tls {
        Some(config) => {
            // The control plane is verified by its SPIFFE ID, not a name.
            let name = rustls_pki_types::ServerName::try_from("weft-control-plane")
                .map_err(|_| StreamError::BadAddress(address.to_owned()))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(StreamError::Tls)?;
            let (sender, connection) = builder
                .handshake(TokioIo::new(stream))
                .await
                .map_err(StreamError::Handshake)?;
            (sender, Box::pin(connection) as ConnectionTask)
        }
        None => {
            let (sender, connection) = builder
                .handshake(TokioIo::new(stream))
                .await
                .map_err(StreamError::Handshake)?;
            (sender, Box::pin(connection) as ConnectionTask)
        }
    };
    // The connection task ends when the client (and so the sender) is
    // dropped, at the latest when the proxy drains.
    drain.spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "control plane connection closed");
        }
    });
    Ok(GrpcChannel(sender))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_capped() {
        for attempt in 0..40 {
            let delay = backoff(attempt);
            let full = INITIAL_BACKOFF
                .saturating_mul(1 << attempt.min(16))
                .min(MAX_BACKOFF);
            assert!(
                delay >= full / 2 && delay <= full,
                "attempt {attempt}: {delay:?}"
            );
        }
        assert!(backoff(30) <= MAX_BACKOFF);
    }

    #[test]
    fn server_addresses_accept_a_scheme_and_need_a_port() {
        let authority = |s: &str| server_authority(s).map(|a| a.to_string());
        assert_eq!(
            authority("http://127.0.0.1:1/").as_deref(),
            Some("127.0.0.1:1")
        );
        assert_eq!(authority("cp:18000").as_deref(), Some("cp:18000"));
        assert_eq!(authority("cp"), None);
        assert_eq!(authority("cp:18000/path"), None);
    }
}
