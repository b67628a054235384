//! Simulated proxies: one TCP connection, one HTTP/2 connection and one ADS
//! stream each, as a real sidecar holds; every response is ACKed at once.
//!
//! Each client is one task driving both its HTTP/2 connection and its
//! stream. What the clients see goes to a shared [`Tracker`]: per node and
//! type the last ACKed version, and a log of every response (when it was
//! received and when its ACK was queued on the stream). The tracker's lock
//! is held only to record or read, never across an await.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use weft_proxy::xds::GrpcChannel;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use weft_proto::config::v1 as pb;
use weft_proto::envoy::config::core::v3::Node;
use weft_proto::envoy::service::discovery::v3::DiscoveryRequest;
use weft_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;

use super::mesh::Workload;

/// The subscribed types, in the order the requests are sent.
pub(super) const TYPE_URLS: [&str; 3] = [
    pb::CLUSTER_TYPE_URL,
    pb::ROUTE_CONFIGURATION_TYPE_URL,
    pb::LISTENER_TYPE_URL,
];

/// Index of the route type in [`TYPE_URLS`]: the type every round changes.
pub(super) const ROUTE_TYPE: usize = 1;

/// Bound on the TCP connect, the HTTP/2 handshake and the stream's
/// response headers, each.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Cap on the response log; a control plane that pushes far more than the
/// rounds need cannot exhaust the generator's memory.
const MAX_EVENTS: usize = 4_000_000;

/// Requests a client may queue on its stream before the server reads them.
const REQUEST_QUEUE: usize = 8;

/// One response a client received and ACKed.
#[derive(Clone, Copy, Debug)]
pub(super) struct Event {
    pub(super) type_index: usize,
    pub(super) received: Instant,
    pub(super) acked: Instant,
}

#[derive(Debug, Default)]
struct TrackerState {
    /// Per node, per type: the last version ACKed.
    acked: Vec<[Option<String>; 3]>,
    /// Per node, per type: when the first ACK was queued.
    first_acked: Vec<[Option<Instant>; 3]>,
    events: Vec<Event>,
    dropped_events: usize,
    /// Clients that ended before being told to, with why.
    failures: Vec<String>,
    /// Every failure, including those whose message was not kept.
    failed_total: usize,
}

/// What every client saw.
#[derive(Debug)]
pub(super) struct Tracker {
    state: Mutex<TrackerState>,
}

impl Tracker {
    pub(super) fn new(nodes: usize) -> Self {
        Self {
            state: Mutex::new(TrackerState {
                acked: vec![Default::default(); nodes],
                first_acked: vec![[None; 3]; nodes],
                ..TrackerState::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        // A panic while recording leaves consistent data behind (each
        // update is a single assignment or push).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, node: usize, type_index: usize, version: String, event: Event) {
        let mut state = self.lock();
        state.acked[node][type_index] = Some(version);
        let first = &mut state.first_acked[node][type_index];
        if first.is_none() {
            *first = Some(event.acked);
        }
        if state.events.len() < MAX_EVENTS {
            state.events.push(event);
        } else {
            state.dropped_events += 1;
        }
    }

    fn fail(&self, message: String) {
        let mut state = self.lock();
        state.failed_total += 1;
        if state.failures.len() < 100 {
            state.failures.push(message);
        } else if state.failures.len() == 100 {
            state.failures.push("(later failures not kept)".to_owned());
        }
    }

    /// How many nodes have ACKed all three types, and the latest of the
    /// first ACKs among them.
    pub(super) fn initial(&self) -> (usize, Option<Instant>) {
        let state = self.lock();
        let mut complete = 0;
        let mut last = None;
        for firsts in &state.first_acked {
            if firsts.iter().all(Option::is_some) {
                complete += 1;
                last = firsts.iter().flatten().copied().chain(last).max();
            }
        }
        (complete, last)
    }

    /// The route version each node has ACKed.
    pub(super) fn route_versions(&self) -> Vec<Option<String>> {
        self.lock()
            .acked
            .iter()
            .map(|types| types[ROUTE_TYPE].clone())
            .collect()
    }

    /// How many nodes have ACKed a route version other than `before`'s.
    pub(super) fn routes_changed(&self, before: &[Option<String>]) -> usize {
        self.lock()
            .acked
            .iter()
            .zip(before)
            .filter(|(types, old)| types[ROUTE_TYPE].is_some() && &types[ROUTE_TYPE] != *old)
            .count()
    }

    /// The responses received at or after `since`.
    pub(super) fn events_since(&self, since: Instant) -> Vec<Event> {
        self.lock()
            .events
            .iter()
            .filter(|event| event.received >= since)
            .copied()
            .collect()
    }

    /// The first failures (at most 100) and how many responses went
    /// unlogged.
    pub(super) fn problems(&self) -> (Vec<String>, usize) {
        let state = self.lock();
        (state.failures.clone(), state.dropped_events)
    }

    pub(super) fn failure_count(&self) -> usize {
        self.lock().failed_total
    }
}

/// What a client needs besides its node.
#[derive(Clone, Debug)]
pub(super) struct ClientContext {
    pub(super) xds: SocketAddr,
    pub(super) authorization: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    pub(super) tracker: Arc<Tracker>,
    /// Limits how many clients are connecting at once (a permit is held
    /// until the stream is open), so that the accept backlog never
    /// overflows.
    pub(super) connecting: Arc<Semaphore>,
    pub(super) cancel: CancellationToken,
}

/// Runs node `index` until cancelled or the server ends its stream; a
/// failure is recorded in the tracker.
pub(super) async fn run(index: usize, workload: Workload, context: ClientContext) {
    let cancel = context.cancel.clone();
    let tracker = Arc::clone(&context.tracker);
    tokio::select! {
        () = cancel.cancelled() => {}
        result = session(index, &workload, context) => {
            let message = match result {
                Ok(()) => "the server ended the stream".to_owned(),
                Err(err) => format!("{err:#}"),
            };
            tracker.fail(format!("node {}: {message}", workload.node_id));
        }
    }
}

async fn session(index: usize, workload: &Workload, context: ClientContext) -> anyhow::Result<()> {
    let permit = Arc::clone(&context.connecting)
        .acquire_owned()
        .await
        .context("the connect limiter closed")?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(context.xds))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connecting to {}", context.xds))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let (sender, connection) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
    )
    .await
    .context("HTTP/2 handshake timed out")?
    .context("HTTP/2 handshake")?;
    let mut connection = pin!(connection);
    let mut stream = pin!(ads(index, workload, sender, permit, &context));
    tokio::select! {
        result = &mut connection => {
            result.context("HTTP/2 connection")?;
            anyhow::bail!("the HTTP/2 connection closed")
        }
        result = &mut stream => result,
    }
}

async fn ads(
    index: usize,
    workload: &Workload,
    sender: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
    permit: tokio::sync::OwnedSemaphorePermit,
    context: &ClientContext,
) -> anyhow::Result<()> {
    let (requests, outbound) = mpsc::channel::<DiscoveryRequest>(REQUEST_QUEUE);
    for (position, type_url) in TYPE_URLS.iter().enumerate() {
        let node = (position == 0).then(|| Node {
            id: workload.node_id.clone(),
            cluster: workload.service.clone(),
            user_agent_name: "weft-bench".to_owned(),
            ..Node::default()
        });
        requests
            .send(DiscoveryRequest {
                node,
                type_url: (*type_url).to_owned(),
                ..DiscoveryRequest::default()
            })
            .await
            .context("queueing a subscription")?;
    }
    let outbound = futures_util::stream::unfold(outbound, |mut outbound| async move {
        outbound.recv().await.map(|request| (request, outbound))
    });
    let mut request = tonic::Request::new(outbound);
    request
        .metadata_mut()
        .insert("authorization", context.authorization.clone());
    let origin: http::Uri = format!("http://{}", context.xds)
        .parse()
        .context("the xDS address as a URI")?;
    let mut client = AggregatedDiscoveryServiceClient::with_origin(GrpcChannel(sender), origin);
    let mut inbound =
        tokio::time::timeout(CONNECT_TIMEOUT, client.stream_aggregated_resources(request))
            .await
            .context("opening the ADS stream timed out")?
            .context("opening the ADS stream")?
            .into_inner();
    drop(permit);
    while let Some(response) = inbound.message().await.context("reading a response")? {
        let received = Instant::now();
        let type_index = TYPE_URLS
            .iter()
            .position(|url| *url == response.type_url)
            .with_context(|| format!("response of unsubscribed type {:?}", response.type_url))?;
        let version = response.version_info;
        requests
            .send(DiscoveryRequest {
                version_info: version.clone(),
                type_url: response.type_url,
                response_nonce: response.nonce,
                ..DiscoveryRequest::default()
            })
            .await
            .context("queueing an ACK")?;
        let acked = Instant::now();
        context.tracker.record(
            index,
            type_index,
            version,
            Event {
                type_index,
                received,
                acked,
            },
        );
    }
    Ok(())
}
