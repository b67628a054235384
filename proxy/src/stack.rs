//! The one place where the L7 and L4 stacks are assembled from a
//! configuration, and the snapshot that holds them.
//!
//! A [`Snapshot`] is immutable and published with one `ArcSwap::store`.
//! Everything the request path needs is prepared here: route tables with
//! compiled matchers, each route's service stack, metric handles, header
//! values. Long-lived state (cluster pools, counters) comes from registries
//! keyed by name, so an unchanged cluster keeps its connections.
//!
//! An HTTP request flows, in the order this file builds it:
//!
//! ```text
//! connection (http::server: limits, Host, the proxy's header rules,
//!             telemetry and the access log, errors -> responses)
//!   -> router (http::router::RouteTable::select, pure)
//!   -> weighted split (PreparedRoute::pick, pure)
//!   -> route stack (route_service): route rules -> timeout
//!   -> backend: cluster (load balancer -> endpoint pool -> upstream)
//!               or a direct response, answered locally
//! ```
//!
//! A layer may answer locally (a direct response today; a fault abort, a
//! policy deny, a rate limit later): that is a response, not an error.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode, header};
use pin_project_lite::pin_project;
use tower::{Service, ServiceBuilder};

use crate::body::RequestBody;
#[cfg(test)]
use crate::cluster::ClusterRegistry;
use crate::cluster::{ClusterService, ClusterState};
use crate::config::{self, Config, ListenerKind, PathMatch, RouteAction};
use crate::error::ProxyError;
use crate::fault::{Fault, FaultLayer, Faulting, RouteFaults, TcpFaults};
use crate::http::body::ResponseBody;
use crate::http::headers;
use crate::http::route::{Direct, PathRewrite, RouteRules, Rules, RulesLayer};
use crate::http::router::RouteTable;
use crate::identity::Identities;
use crate::policy::{Enforcing, Policy, PolicyLayer};
use crate::resilience::rate_limit::{Limited, Limiter, Limiters, RateLimit, RateLimitLayer};
use crate::resilience::{Retry, RetryLayer, Retrying, Timeout, TimeoutLayer};
use crate::telemetry::istio::IstioMetrics;
use crate::telemetry::trace::{Exporters, Tracer};
use crate::telemetry::{AccessLog, ListenerMetrics, Metrics, RequestMetrics};
use crate::tls::Carries;

/// The published snapshot, shared by every listener.
pub(crate) type Shared = Arc<ArcSwap<Snapshot>>;

/// A route's service stack ([`route_service`]).
///
/// PERF: every route has the same stack (a layer a route does not use is a
/// pass-through), so the type is named rather than erased with
/// `BoxCloneSyncService`, whose clone and call cost two allocations per
/// request (dhat: 17 -> 12 allocations per proxied request together with
/// the header-count and request-id changes, benches/RESULTS.md).
pub(crate) type RouteService = Policy<Fault<RateLimit<Rules<Timeout<Retry<Backend>>>>>>;

/// Everything the data plane needs for one configuration.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) config: Arc<Config>,
    /// By listener slot (`listener::ListenerSet`); `None` for the slots of
    /// listeners this configuration does not have.
    listeners: Vec<Option<ListenerSnapshot>>,
    /// Each listener's bound address, in configuration order.
    pub(crate) bound: Vec<(Arc<str>, std::net::SocketAddr)>,
    pub(crate) clusters: HashMap<Arc<str>, Arc<ClusterState>>,
    /// Rate limit buckets, taken over by the next snapshot where its limits
    /// are the same.
    limiters: Limiters,
}

impl Snapshot {
    /// The listener serving the socket in `slot`, if this configuration
    /// still has one there.
    pub(crate) fn listener(&self, slot: usize) -> Option<&ListenerSnapshot> {
        self.listeners.get(slot)?.as_ref()
    }
}

/// A listener's prepared state.
#[derive(Debug, Clone)]
pub(crate) enum ListenerSnapshot {
    Http(Arc<HttpListener>),
    Tcp(Arc<TcpListener>),
}

/// An HTTP listener's prepared state.
#[derive(Debug)]
pub(crate) struct HttpListener {
    pub(crate) config: config::Listener,
    /// The HTTP/1 codec's limits, as the listener's set them.
    pub(crate) h1: crate::http::h1::Limits,
    /// TLS termination, when the listener has it.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) table: RouteTable<Arc<PreparedRoute>>,
    pub(crate) via_h1: Option<HeaderValue>,
    pub(crate) via_h2: Option<HeaderValue>,
    /// Counts requests that matched no route (or failed before routing).
    pub(crate) unrouted: Arc<RequestMetrics>,
    pub(crate) metrics: Arc<ListenerMetrics>,
    pub(crate) access_log: Option<AccessLog>,
    /// The listener's rate limit, before routing.
    pub(crate) rate_limit: Option<Arc<Limiter>>,
    /// The listener's policy, before routing.
    pub(crate) policy: Option<Arc<Enforcing>>,
    /// Trace context and spans, when the listener traces.
    pub(crate) tracer: Option<Arc<Tracer>>,
    /// Istio's standard metrics, when the listener reports them.
    pub(crate) istio: Option<IstioListener>,
}

/// A listener's Istio metrics.
#[derive(Debug)]
pub(crate) struct IstioListener {
    pub(crate) metrics: Arc<IstioMetrics>,
    /// A source reporter's party for requests no cluster answered (no
    /// route, a direct response).
    pub(crate) no_cluster: u32,
}

/// A source reporter's party for requests to `cluster`: its labels name
/// the identities the cluster's TLS presents and expects.
fn istio_callee(istio: &IstioMetrics, cluster: &ClusterState) -> u32 {
    let tls = cluster.config.tls.as_deref();
    let server = tls.and_then(|tls| match &tls.server {
        config::ServerIdentity::Spiffe(id) => Some(&**id),
        config::ServerIdentity::DnsName(_) => None,
    });
    istio.callee(
        &cluster.config.name,
        tls.and_then(|tls| tls.workload_identity()).map(|id| &**id),
        server,
    )
}

/// A TCP listener's prepared state.
#[derive(Debug)]
pub(crate) struct TcpListener {
    pub(crate) config: config::Listener,
    /// TLS termination (mutual TLS in the mesh), when the listener has
    /// it; what is inside is forwarded as it is.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Where connections go (with SNI routes: those no route takes).
    pub(crate) cluster: Option<Arc<ClusterState>>,
    /// TLS passthrough routes, first match wins.
    pub(crate) sni_routes: Vec<(config::SniRoute, Arc<ClusterState>)>,
    pub(crate) metrics: Arc<ListenerMetrics>,
    /// How long a connection may outlive the drain signal.
    pub(crate) drain_timeout: std::time::Duration,
    /// Faults injected into connections.
    pub(crate) faults: Option<Arc<TcpFaults>>,
    /// The policy every connection must pass (source and destination
    /// only).
    pub(crate) policy: Option<Arc<Enforcing>>,
    /// Istio's standard metrics, when the listener reports them.
    pub(crate) istio: Option<TcpIstio>,
    /// A span per connection, when the listener traces.
    pub(crate) tracer: Option<Arc<Tracer>>,
}

/// A TCP listener's Istio metrics, with each connection's party numbered
/// when the snapshot is built where it can be.
#[derive(Debug)]
pub(crate) struct TcpIstio {
    pub(crate) metrics: Arc<IstioMetrics>,
    /// A source reporter's party per cluster.
    parties: Vec<(Arc<ClusterState>, u32)>,
    /// A destination reporter's party for clients that prove no identity.
    anonymous: Option<u32>,
}

impl TcpIstio {
    fn new(metrics: Arc<IstioMetrics>, clusters: &[&Arc<ClusterState>]) -> Self {
        let destination = metrics.settings.reporter == config::IstioReporter::Destination;
        let parties = if destination {
            Vec::new()
        } else {
            clusters
                .iter()
                .map(|cluster| ((*cluster).clone(), istio_callee(&metrics, cluster)))
                .collect()
        };
        let anonymous = destination.then(|| metrics.caller(None));
        Self {
            metrics,
            parties,
            anonymous,
        }
    }

    /// The party of a connection to `cluster` from a client that proved
    /// `caller` (mutual TLS): a destination reporter's labels name the
    /// caller, a source reporter's the cluster (one of the listener's; any
    /// other would count in the folded series).
    pub(crate) fn party(&self, cluster: &Arc<ClusterState>, caller: Option<&Arc<str>>) -> u32 {
        match (self.anonymous, caller) {
            (Some(_), Some(caller)) => self.metrics.caller(Some(caller)),
            (Some(anonymous), None) => anonymous,
            (None, _) => self
                .parties
                .iter()
                .find(|(c, _)| Arc::ptr_eq(c, cluster))
                .map_or(u32::MAX, |(_, party)| *party),
        }
    }
}

/// A route, ready to serve: its stack for each cluster of its split.
#[derive(Debug)]
pub(crate) struct PreparedRoute {
    pub(crate) name: Arc<str>,
    /// One unless a weighted split; never empty.
    targets: Vec<Target>,
    total_weight: u64,
    /// False for a direct response: nothing is sent upstream.
    pub(crate) forwards: bool,
    /// The route's stack needs to know the client (per-client rate limit,
    /// faults for some callers): the connection attaches it to requests.
    pub(crate) needs_client: bool,
    /// The route has a policy: the connection attaches who is on each end.
    pub(crate) needs_peers: bool,
}

impl PreparedRoute {
    /// The target this request goes to. The weighted split is decided once
    /// per request, before the route's stack runs (as Envoy's weighted
    /// clusters are), so that a retry stays within the chosen cluster.
    pub(crate) fn pick(&self) -> &Target {
        if self.targets.len() == 1 {
            return &self.targets[0];
        }
        let x = crate::rng::with_thread_rng(|rng| rng.u64(..self.total_weight));
        &self.targets[split_index(&self.targets, x)]
    }
}

/// The target whose cumulative weight range holds `x` (in
/// `0..total_weight`).
fn split_index(targets: &[Target], x: u64) -> usize {
    targets
        .partition_point(|t| t.cumulative_weight <= x)
        .min(targets.len() - 1)
}

/// One cluster a route forwards to (or its direct response), with the
/// route's stack in front of it.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) service: RouteService,
    pub(crate) metrics: Arc<RequestMetrics>,
    /// A source reporter's party for this cluster (Istio metrics).
    pub(crate) istio_party: Option<u32>,
    /// Running weight sum up to and including this target.
    cumulative_weight: u64,
}

/// A route's stack, top to bottom in request order (`ServiceBuilder` wraps
/// its first layer outermost).
fn route_service(
    route: &config::Route,
    shared: &RouteShared,
    metrics: &Arc<RequestMetrics>,
    retrying: Option<Arc<Retrying>>,
    backend: Backend,
) -> RouteService {
    let faulting = shared.faults.as_ref().map(|faults| {
        Arc::new(Faulting {
            faults: faults.clone(),
            metrics: metrics.clone(),
        })
    });
    let limited = shared.limiter.as_ref().map(|limiter| {
        Arc::new(Limited {
            limiter: limiter.clone(),
            metrics: metrics.clone(),
        })
    });
    let kept_by_retry = retrying.as_ref().is_some_and(|r| r.route_timeout.is_some());
    ServiceBuilder::new()
        .layer(PolicyLayer::new(shared.policy.clone())) // Rego: 403 / PERMISSION_DENIED on deny
        .layer(FaultLayer::new(faulting)) // delays and aborts injected (chaos)
        .layer(RateLimitLayer::new(limited)) // 429 when the route's buckets are empty
        .layer(RulesLayer::new(shared.rules.clone())) // route header rules, host and path rewrites
        .layer(TimeoutLayer::new(
            route_timeout(route).filter(|_| !kept_by_retry),
        )) // request to response headers, retries included (or kept by the retry layer)
        .layer(RetryLayer::new(retrying)) // failed attempts sent again, within the budget
        .service(backend) // cluster (lb -> pool -> upstream), or a direct response
}

/// The deadline from a request to its response headers: the route
/// timeout, shortened by the stream idle timeout (no response headers at
/// all is idleness too).
fn route_timeout(route: &config::Route) -> Option<std::time::Duration> {
    match (route.timeout, route.stream_idle_timeout) {
        (Some(t), Some(idle)) => Some(t.min(idle)),
        (t, idle) => t.or(idle),
    }
}

/// What a route's targets share: its rules, faults and rate limit.
struct RouteShared {
    policy: Option<Arc<Enforcing>>,
    rules: Arc<RouteRules>,
    faults: Option<Arc<RouteFaults>>,
    limiter: Option<Arc<Limiter>>,
}

/// The bottom of a route's stack: a cluster, or the route's own answer.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    /// Load balancer -> endpoint pool -> upstream; the response body cut
    /// when it idles for `idle` (the route's `stream_idle_timeout`).
    Cluster {
        cluster: ClusterService,
        idle: Option<std::time::Duration>,
    },
    /// A direct response, answered locally.
    Direct(Direct),
}

impl Service<Request<RequestBody>> for Backend {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = BackendFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        match self {
            Self::Cluster { cluster, .. } => cluster.poll_ready(cx),
            Self::Direct(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<RequestBody>) -> BackendFuture {
        match self {
            Self::Cluster { cluster, idle } => {
                // The connection's rules left `upgrade` only on a real
                // upgrade request.
                let is_upgrade = req.headers().contains_key(header::UPGRADE);
                BackendFuture::Upstream {
                    inner: cluster.call(req),
                    is_upgrade,
                    idle: *idle,
                }
            }
            // PERF: the answer is made when polled; a response held here
            // would make every route's future (most of which go upstream)
            // hundreds of bytes larger, and each layer moves it.
            Self::Direct(direct) => BackendFuture::Local {
                direct: Some(direct.clone()),
            },
        }
    }
}

type ClusterFuture = <ClusterService as Service<Request<RequestBody>>>::Future;

pin_project! {
    /// The future of [`Backend`].
    #[project = BackendProj]
    pub(crate) enum BackendFuture {
        Upstream { #[pin] inner: ClusterFuture, is_upgrade: bool, idle: Option<std::time::Duration> },
        Local { direct: Option<Direct> },
    }
}

impl Future for BackendFuture {
    type Output = Result<Response<ResponseBody>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BackendProj::Upstream {
                inner,
                is_upgrade,
                idle,
            } => {
                let (mut parts, body) = ready!(inner.poll(cx))?.into_parts();
                let upgraded = *is_upgrade && parts.status == StatusCode::SWITCHING_PROTOCOLS;
                headers::strip_hop_by_hop(&mut parts.headers, upgraded);
                let mut body = ResponseBody::upstream(body);
                // An upgraded connection is bounded by the listener's idle
                // timeout instead.
                if let Some(idle) = *idle
                    && !upgraded
                {
                    body.set_idle_timeout(idle);
                }
                Poll::Ready(Ok(Response::from_parts(parts, body)))
            }
            BackendProj::Local { direct } => Poll::Ready(Ok(direct
                .take()
                .expect("a local answer is polled once")
                .respond())),
        }
    }
}

/// The logs requests are written to, started once with the proxy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Logs {
    pub(crate) access: Option<AccessLog>,
    pub(crate) decisions: Option<crate::policy::DecisionLog>,
    /// Span exporters (none: listeners do not trace).
    pub(crate) traces: Option<Arc<Exporters>>,
}

/// Builds a snapshot: CPU work only (route tables, every route's stack,
/// metric handles), no I/O. `slots` gives each listener's socket slot and
/// bound address, in configuration order; `clusters` the cluster states
/// prepared for `config` (`ClusterRegistry::prepare`, then `commit`).
pub(crate) fn build(
    config: Arc<Config>,
    slots: &[(usize, std::net::SocketAddr)],
    clusters: HashMap<Arc<str>, Arc<ClusterState>>,
    metrics: &Metrics,
    identities: &Arc<Identities>,
    logs: &Logs,
    previous: Option<&Snapshot>,
) -> Snapshot {
    let access_log = logs.access.as_ref();
    let limiters = Limiters::default();
    let previous_limiters = previous.map(|p| &p.limiters);
    let enforcing = |name: &Option<Arc<str>>| {
        let name = name.as_ref()?;
        let policy = config.policies.iter().find(|p| p.name == *name)?;
        Some(Arc::new(Enforcing {
            policy: policy.clone(),
            metrics: metrics.policy(name),
            log: logs.decisions.clone(),
        }))
    };
    let cluster = |name: &str| {
        clusters
            .get(name)
            .cloned()
            .expect("validation guarantees that cluster references resolve")
    };
    let empty: Arc<str> = Arc::from("");
    let prepared = config.listeners.iter().map(|listener| {
        let listener_metrics = metrics.listener(&listener.name);
        match &listener.kind {
            ListenerKind::Tcp {
                cluster: name,
                sni_routes,
            } => {
                let default = name.as_deref().map(cluster);
                let sni_routes: Vec<_> = sni_routes
                    .iter()
                    .map(|route| (route.clone(), cluster(&route.cluster)))
                    .collect();
                let istio = listener.istio_metrics.as_ref().map(|istio| {
                    let clusters: Vec<_> = default
                        .iter()
                        .chain(sni_routes.iter().map(|(_, c)| c))
                        .collect();
                    let own = listener
                        .tls
                        .as_ref()
                        .and_then(|tls| tls.workload_identity.clone());
                    TcpIstio::new(metrics.istio(&listener.name, istio, own), &clusters)
                });
                ListenerSnapshot::Tcp(Arc::new(TcpListener {
                    config: listener.clone(),
                    tls: listener
                        .tls
                        .as_deref()
                        .map(|tls| crate::tls::server_config(tls, identities, Carries::Opaque)),
                    cluster: default,
                    sni_routes,
                    metrics: listener_metrics,
                    drain_timeout: config.drain_timeout,
                    faults: listener
                        .fault
                        .as_ref()
                        .map(|fault| Arc::new(TcpFaults::new(fault.clone()))),
                    policy: enforcing(&listener.policy),
                    istio,
                    tracer: tracer(listener, logs),
                }))
            }
            ListenerKind::Http { route_config } => {
                let routes = config
                    .route_configs
                    .iter()
                    .find(|r| r.name == *route_config)
                    .expect("validation guarantees that route_config references resolve");
                let istio = listener.istio_metrics.as_ref().map(|istio| {
                    let own = listener
                        .tls
                        .as_ref()
                        .and_then(|tls| tls.workload_identity.clone());
                    let metrics = metrics.istio(&listener.name, istio, own);
                    let no_cluster = match istio.reporter {
                        config::IstioReporter::Source => metrics.callee(&empty, None, None),
                        config::IstioReporter::Destination => 0,
                    };
                    IstioListener {
                        metrics,
                        no_cluster,
                    }
                });
                // Only a source reporter's party follows the cluster.
                let callees = istio
                    .as_ref()
                    .map(|istio| &istio.metrics)
                    .filter(|m| m.settings.reporter == config::IstioReporter::Source);
                let table = RouteTable::new(routes, |vhost, route| {
                    let limiter = route.rate_limit.as_ref().map(|limit| {
                        let key = format!("route/{}/{}/{}", listener.name, vhost.name, route.name);
                        limiters.get(previous_limiters, key, limit)
                    });
                    Arc::new(prepare_route(
                        route,
                        &listener.name,
                        metrics,
                        &cluster,
                        limiter,
                        enforcing(&route.policy),
                        callees.map(|m| &**m),
                    ))
                });
                let via = |version: &str| {
                    listener
                        .via
                        .as_ref()
                        .and_then(|via| HeaderValue::try_from(format!("{version} {via}")).ok())
                };
                let tls = listener
                    .tls
                    .as_deref()
                    .map(|tls| crate::tls::server_config(tls, identities, Carries::Http));
                ListenerSnapshot::Http(Arc::new(HttpListener {
                    config: listener.clone(),
                    h1: h1_codec(listener),
                    tls,
                    table,
                    via_h1: via("1.1"),
                    via_h2: via("2"),
                    unrouted: metrics.request(&listener.name, &empty, &empty),
                    metrics: listener_metrics,
                    access_log: access_log.cloned(),
                    policy: enforcing(&listener.policy),
                    rate_limit: listener.rate_limit.as_ref().map(|limit| {
                        let key = format!("listener/{}", listener.name);
                        limiters.get(previous_limiters, key, limit)
                    }),
                    tracer: tracer(listener, logs),
                    istio,
                }))
            }
        }
    });
    let slot_count = slots.iter().map(|(slot, _)| slot + 1).max().unwrap_or(0);
    let mut listeners = vec![None; slot_count];
    for ((slot, _), listener) in slots.iter().zip(prepared) {
        listeners[*slot] = Some(listener);
    }
    let bound = config
        .listeners
        .iter()
        .zip(slots)
        .map(|(listener, (_, address))| (listener.name.clone(), *address))
        .collect();
    Snapshot {
        config,
        listeners,
        bound,
        clusters,
        limiters,
    }
}

/// A listener's tracer, when it traces and its exporter is running.
fn tracer(listener: &config::Listener, logs: &Logs) -> Option<Arc<Tracer>> {
    let (tracing, exporters) = listener.tracing.as_ref().zip(logs.traces.as_ref())?;
    Some(Arc::new(Tracer {
        sample: tracing.sample,
        always_sample_errors: tracing.always_sample_errors,
        queue: exporters.queue(&tracing.export),
    }))
}

/// The HTTP/1 head size limit never goes below this.
const MIN_H1_HEAD: usize = 8192;
/// The codec's hard ceiling on HTTP/1 header count.
const MAX_H1_HEADERS: usize = 10_000;

/// The HTTP/1 server codec's limits for a listener's connections: our own
/// checks answer 431 with a body and the cause; the codec's limits
/// (somewhat larger) are the hard stop behind them.
fn h1_codec(listener: &config::Listener) -> crate::http::h1::Limits {
    crate::http::h1::Limits {
        max_head: (listener.max_request_headers_bytes as usize + 4096).max(MIN_H1_HEAD),
        max_headers: (listener.max_request_headers as usize).clamp(100, MAX_H1_HEADERS),
    }
}

fn prepare_route(
    route: &config::Route,
    listener: &Arc<str>,
    metrics: &Metrics,
    cluster: &impl Fn(&str) -> Arc<ClusterState>,
    limiter: Option<Arc<Limiter>>,
    policy: Option<Arc<Enforcing>>,
    istio_callees: Option<&IstioMetrics>,
) -> PreparedRoute {
    let rewrite = route
        .prefix_rewrite
        .as_ref()
        .map(|replacement| match &route.matcher.path {
            PathMatch::Prefix(prefix) => PathRewrite::Prefix {
                matched: prefix.len(),
                replacement: replacement.clone(),
            },
            PathMatch::Exact(_) | PathMatch::Regex(_) => PathRewrite::Whole(replacement.clone()),
        });
    let needs_client = limiter.as_ref().is_some_and(|l| l.per_client())
        || route
            .fault
            .as_ref()
            .is_some_and(|f| !f.source_identities.is_empty());
    let needs_peers = policy.is_some();
    let shared = RouteShared {
        policy,
        rules: Arc::new(RouteRules {
            rewrite,
            host_rewrite: route.host_rewrite.clone(),
            request_headers: route.request_headers.clone(),
            response_headers: route.response_headers.clone(),
        }),
        faults: route
            .fault
            .as_ref()
            .map(|fault| Arc::new(RouteFaults::new(fault.clone()))),
        limiter,
    };
    let forward = |name: &Arc<str>, cumulative_weight: u64| {
        let state = cluster(name);
        let retrying = route.retry.as_ref().map(|policy| {
            Arc::new(Retrying {
                policy: policy.clone(),
                budget: state.retry_budget.clone(),
                metrics: state.metrics(),
                max_retries: state.config.max_retries,
                route_timeout: route_timeout(route).filter(|&t| Retrying::keeps(policy, Some(t))),
            })
        });
        let metrics = metrics.request(listener, &route.name, name);
        let istio_party = istio_callees.map(|istio| istio_callee(istio, &state));
        Target {
            service: route_service(
                route,
                &shared,
                &metrics,
                retrying,
                Backend::Cluster {
                    cluster: ClusterService::new(state).with_per_try_timeout(
                        route
                            .retry
                            .as_ref()
                            .and_then(|policy| policy.per_try_timeout),
                    ),
                    idle: route.stream_idle_timeout,
                },
            ),
            metrics,
            istio_party,
            cumulative_weight,
        }
    };
    let (targets, total_weight) = match &route.action {
        RouteAction::Cluster(name) => (vec![forward(name, 1)], 1),
        RouteAction::Weighted(split) => {
            let mut total = 0;
            let targets = split
                .iter()
                .filter(|(_, weight)| *weight > 0)
                .map(|(name, weight)| {
                    total += u64::from(*weight);
                    forward(name, total)
                })
                .collect();
            (targets, total)
        }
        RouteAction::Direct { status, body } => {
            let direct = Backend::Direct(Direct::new(*status, body.clone()));
            let metrics = metrics.request(listener, &route.name, &Arc::from(""));
            let target = Target {
                service: route_service(route, &shared, &metrics, None, direct),
                metrics,
                istio_party: None,
                cumulative_weight: 1,
            };
            (vec![target], 1)
        }
    };
    PreparedRoute {
        name: route.name.clone(),
        forwards: !matches!(route.action, RouteAction::Direct { .. }),
        needs_client,
        needs_peers,
        targets,
        total_weight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
listeners:
  - { name: web, address: "127.0.0.1:0", route_config: main }
  - { name: raw, address: "127.0.0.1:0", protocol: tcp, cluster: app }
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - { name: split, weighted_clusters: [{ cluster: app, weight: 1 }, { cluster: other, weight: 0 }, { cluster: other, weight: 3 }] }
clusters:
  - { name: app, endpoints: [{ address: "127.0.0.1:1" }] }
  - { name: other, endpoints: [{ address: "127.0.0.1:2" }] }
"#;

    async fn snapshot(registry: &ClusterRegistry, metrics: &Metrics, yaml: &str) -> Snapshot {
        let config = Arc::new(Config::from_yaml(yaml, "test").unwrap());
        let slots: Vec<_> = (0..config.listeners.len())
            .map(|slot| (slot, "127.0.0.1:1".parse().unwrap()))
            .collect();
        let clusters = registry.commit(registry.prepare(&config.clusters).await);
        build(
            config,
            &slots,
            clusters,
            metrics,
            &Identities::new(),
            &Logs::default(),
            None,
        )
    }

    #[tokio::test]
    async fn weighted_targets_skip_zero_weights_and_accumulate() {
        let metrics = Arc::new(Metrics::new());
        let registry = ClusterRegistry::new(
            metrics.clone(),
            Identities::new(),
            tokio::runtime::Handle::current(),
        );
        let snapshot = snapshot(&registry, &metrics, CONFIG).await;
        let Some(ListenerSnapshot::Http(http)) = snapshot.listener(0) else {
            panic!("listener 0 is http")
        };
        let headers = http::HeaderMap::new();
        let parts = crate::http::router::RequestParts {
            host: "a",
            method: &http::Method::GET,
            path: "/",
            headers: &headers,
            source: None,
        };
        let route = http.table.select(&parts).unwrap();
        assert!(route.forwards);
        assert_eq!(route.total_weight, 4);
        assert_eq!(
            route
                .targets
                .iter()
                .map(|t| t.cumulative_weight)
                .collect::<Vec<_>>(),
            [1, 4]
        );
        // x in 0..4: 0 goes to the first target, 1..=3 to the second.
        let picks: Vec<usize> = (0..4).map(|x| split_index(&route.targets, x)).collect();
        assert_eq!(picks, [0, 1, 1, 1]);
        assert!(matches!(
            snapshot.listener(1),
            Some(ListenerSnapshot::Tcp(_))
        ));
    }

    #[tokio::test]
    async fn unchanged_clusters_keep_their_state_across_snapshots() {
        let metrics = Arc::new(Metrics::new());
        let registry = ClusterRegistry::new(
            metrics.clone(),
            Identities::new(),
            tokio::runtime::Handle::current(),
        );
        let first = snapshot(&registry, &metrics, CONFIG).await;
        let changed = CONFIG.replace("127.0.0.1:2", "127.0.0.1:3");
        let second = snapshot(&registry, &metrics, &changed).await;
        assert!(
            Arc::ptr_eq(&first.clusters["app"], &second.clusters["app"]),
            "app is unchanged"
        );
        assert!(
            !Arc::ptr_eq(&first.clusters["other"], &second.clusters["other"]),
            "other changed"
        );
    }

    #[tokio::test]
    async fn endpoints_that_stay_keep_their_pools_when_a_cluster_changes() {
        let metrics = Arc::new(Metrics::new());
        let registry = ClusterRegistry::new(
            metrics.clone(),
            Identities::new(),
            tokio::runtime::Handle::current(),
        );
        let first = snapshot(&registry, &metrics, CONFIG).await;
        let endpoint = |s: &Snapshot, cluster: &str, address: &str| {
            s.clusters[cluster]
                .endpoints()
                .endpoints
                .iter()
                .find(|e| e.addr.to_string() == address)
                .cloned()
        };
        // A workload joins `app`, and its balancer changes.
        let scaled = CONFIG.replace(
            r#"{ name: app, endpoints: [{ address: "127.0.0.1:1" }] }"#,
            r#"{ name: app, lb: random, endpoints: [{ address: "127.0.0.1:1" }, { address: "127.0.0.1:4" }] }"#,
        );
        let second = snapshot(&registry, &metrics, &scaled).await;
        let kept = endpoint(&first, "app", "127.0.0.1:1").unwrap();
        assert!(Arc::ptr_eq(
            &kept,
            &endpoint(&second, "app", "127.0.0.1:1").unwrap()
        ));
        assert!(endpoint(&second, "app", "127.0.0.1:4").is_some());
        // A new connect timeout means new connections: nothing is kept.
        let slower = scaled.replace("lb: random,", "lb: random, connect_timeout: 9s,");
        let third = snapshot(&registry, &metrics, &slower).await;
        assert!(!Arc::ptr_eq(
            &kept,
            &endpoint(&third, "app", "127.0.0.1:1").unwrap()
        ));
    }

    /// Idle connections must stay cheap: the per-connection task is the
    /// future of `http::server::serve`, measured here before it is polled,
    /// and it is what a parked connection holds. (What runs only while the
    /// connection is active is boxed and measured by the benches.)
    #[tokio::test]
    async fn connection_future_stays_small() {
        let metrics = Arc::new(Metrics::new());
        let registry = ClusterRegistry::new(
            metrics.clone(),
            Identities::new(),
            tokio::runtime::Handle::current(),
        );
        let snapshot = Arc::new(snapshot(&registry, &metrics, CONFIG).await);
        let Some(ListenerSnapshot::Http(http)) = snapshot.listener(0).cloned() else {
            panic!("listener 0 is http")
        };
        let Some(ListenerSnapshot::Tcp(tcp)) = snapshot.listener(1).cloned() else {
            panic!("listener 1 is tcp")
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let peer = client.local_addr().unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let shared: Shared = Arc::new(ArcSwap::new(snapshot));
        let drain = crate::drain::Drain::new();
        let future = crate::http::server::serve(server, peer, 0, http, shared, drain, ());
        let size = std::mem::size_of_val(&future);
        // PERF: 3.7 KiB while hyper's connection state lived inline; boxed
        // (and released while a connection is parked) 1.4 KiB, and an idle
        // connection cost 3.2 KiB instead of 25.5 (benches/RESULTS.md).
        // With detection and hyper's connection boxed, the HTTP/1 loop
        // written out in `serve` (no argument copied twice) and the parked
        // wait polled by hand (no peek future), it is 376 bytes, and the
        // spawned task 640 with its wrappers.
        assert!(size <= 400, "connection future is {size} bytes");

        // A TCP listener's connection: 5,776 bytes while the TLS
        // passthrough's ClientHello read (and its 4 KiB chunk) sat inline,
        // 960 with it boxed.
        let (server, _) = {
            let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            listener.accept().await.unwrap()
        };
        let future = crate::tcp::proxy(
            crate::transport::Stream::Tcp(server),
            peer,
            tcp,
            crate::drain::Drain::new(),
            (),
        );
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1024, "TCP connection future is {size} bytes");
    }

    /// Every request's future passes through each layer of its route's
    /// stack, and each layer moves it: a local answer (a direct response,
    /// a deny, a 429, an abort) and what a retry keeps are boxed, so that
    /// it stays the size of what goes upstream.
    #[test]
    fn a_route_future_stays_small() {
        type Future<S> = <S as Service<Request<RequestBody>>>::Future;
        // PERF: 1,008 bytes with the local answers and the retry's saved
        // request inline (memcpy was 5 % of a request's instructions).
        let size = std::mem::size_of::<Future<RouteService>>();
        // The retry's state beside its first attempt (its copy of the
        // request boxed and reused) adds 80 bytes and saves an allocation.
        assert!(size <= 256, "a route's future is {size} bytes");
        let retry = std::mem::size_of::<Future<Retry<Backend>>>();
        assert!(retry <= 144, "a retry's future is {retry} bytes");
    }
}
