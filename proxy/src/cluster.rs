//! Clusters: endpoints, load balancing, connection pools and DNS.
//!
//! A [`ClusterState`] is long-lived: it is kept in the [`ClusterRegistry`]
//! by name and survives a configuration change that leaves its cluster
//! unchanged, keeping its pools and counters; a change that leaves the way
//! endpoints are reached alone (endpoints added or removed, another load
//! balancer) keeps the pools of the endpoints that remain. Its endpoint set
//! changes on its own (DNS re-resolution), so it sits behind its own
//! `ArcSwap`; one `load` gives a consistent set and its prepared balancer.

mod h1;
pub(crate) mod health;
mod lb;
pub(crate) mod outlier;
mod pool;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version, header};

pub(crate) use pool::{Endpoint, UpstreamBody, UpstreamBodyError, Wire};

use crate::body::RequestBody;
use crate::config::{Cluster, EndpointAddress, UpstreamProtocol};
use crate::error::ProxyError;
use crate::identity::Identities;
use crate::rng::with_thread_rng;
use crate::telemetry::Metrics;
use crate::telemetry::trace::{Kind, OpenSpan, SpanRecord};
pub use lb::Balancer;
use pool::PoolSettings;

/// A resolved endpoint set with its prepared balancer.
#[derive(Debug)]
pub(crate) struct EndpointSet {
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
    balancer: Balancer,
}

/// A cluster's long-lived state.
#[derive(Debug)]
pub(crate) struct ClusterState {
    pub(crate) config: Arc<Cluster>,
    settings: PoolSettings,
    set: ArcSwap<EndpointSet>,
    /// The last good resolution of each endpoint (index-aligned with
    /// `config.endpoints`; empty for literal addresses).
    dns_cache: Mutex<Vec<Vec<SocketAddr>>>,
    /// Every route's retries to this cluster draw on it; kept across
    /// configuration changes.
    pub(crate) retry_budget: Arc<crate::resilience::RetryBudget>,
    /// The latest end of any endpoint's ejection ([`outlier::now`]): while
    /// it is past, no endpoint is ejected and picks take the fast path.
    ejected_until: Arc<std::sync::atomic::AtomicU64>,
}

impl ClusterState {
    /// A cluster's state. When `previous` (the same cluster's state under
    /// the last configuration) reaches its endpoints the same way (protocol,
    /// connect timeout, pool settings), the endpoints still listed keep
    /// their connection pools and counters: a mesh's most frequent change,
    /// a workload added or removed, then costs no reconnects.
    fn new(
        config: Arc<Cluster>,
        metrics: &Metrics,
        identities: &Arc<Identities>,
        previous: Option<&ClusterState>,
    ) -> Self {
        let settings = PoolSettings::new(&config, metrics.cluster(&config.name), identities);
        settings.metrics.health_checked.store(
            config.health_check.is_some(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let inherited = previous
            .filter(|p| reaches_endpoints_alike(&p.config, &config))
            .map(|p| p.set.load_full());
        let retry_budget = previous.map_or_else(Arc::default, |p| p.retry_budget.clone());
        let ejected_until = previous.map_or_else(Arc::default, |p| p.ejected_until.clone());
        let state = Self {
            retry_budget,
            ejected_until,
            settings,
            set: ArcSwap::new(inherited.unwrap_or_else(|| Arc::new(EndpointSet::empty(config.lb)))),
            dns_cache: Mutex::new(vec![Vec::new(); config.endpoints.len()]),
            config,
        };
        // Literal addresses are usable at once; DNS names join on resolve.
        let literal: Vec<(SocketAddr, u32)> = state
            .config
            .endpoints
            .iter()
            .filter_map(|e| match e.address {
                EndpointAddress::Socket(addr) => Some((addr, e.weight)),
                EndpointAddress::Dns { .. } => None,
            })
            .collect();
        state.publish(literal);
        state
    }

    /// True when some endpoint is a DNS name.
    pub(crate) fn has_dns(&self) -> bool {
        self.config
            .endpoints
            .iter()
            .any(|e| matches!(e.address, EndpointAddress::Dns { .. }))
    }

    /// The current endpoint set.
    pub(crate) fn endpoints(&self) -> arc_swap::Guard<Arc<EndpointSet>> {
        self.set.load()
    }

    /// Re-resolves DNS endpoints and publishes the new set. A name that
    /// fails to resolve keeps the addresses it last resolved to.
    pub(crate) async fn resolve(&self) {
        let previous = self
            .dns_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut cache = previous.clone();
        let mut resolved = Vec::new();
        for (i, endpoint) in self.config.endpoints.iter().enumerate() {
            match &endpoint.address {
                EndpointAddress::Socket(addr) => resolved.push((*addr, endpoint.weight)),
                EndpointAddress::Dns { host, port } => {
                    let lookup = tokio::net::lookup_host((&**host, *port));
                    match tokio::time::timeout(DNS_TIMEOUT, lookup).await {
                        Ok(Ok(addrs)) => cache[i] = addrs.collect(),
                        Ok(Err(error)) => {
                            tracing::warn!(cluster = %self.config.name, %host, %error, "dns resolution failed; keeping last addresses");
                        }
                        Err(_) => {
                            tracing::warn!(cluster = %self.config.name, %host, timeout = ?DNS_TIMEOUT, "dns resolution timed out; keeping last addresses");
                        }
                    }
                    resolved.extend(cache[i].iter().map(|a| (*a, endpoint.weight)));
                }
            }
        }
        *self
            .dns_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = cache;
        let resolved = merge(resolved);
        let current = self.set.load();
        let unchanged = resolved.len() == current.endpoints.len()
            && resolved
                .iter()
                .zip(&current.endpoints)
                .all(|((a, w), e)| *a == e.addr && *w == e.weight);
        if !unchanged {
            tracing::info!(cluster = %self.config.name, endpoints = resolved.len(), "endpoints updated");
            self.publish(resolved);
        }
    }

    fn publish(&self, addrs: Vec<(SocketAddr, u32)>) {
        let addrs = merge(addrs);
        let current = self.set.load();
        // Reuse endpoints (and their pools) that are still there.
        let endpoints: Vec<Arc<Endpoint>> = addrs
            .into_iter()
            .map(|(addr, weight)| {
                current
                    .endpoints
                    .iter()
                    .find(|e| e.addr == addr && e.weight == weight)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(addr, weight, self.settings.clone())))
            })
            .collect();
        let balancer = Balancer::new(self.config.lb, endpoints.iter().map(|e| e.weight).collect());
        self.set.store(Arc::new(EndpointSet {
            endpoints,
            balancer,
        }));
    }

    /// The cluster's counters.
    pub(crate) fn metrics(&self) -> Arc<crate::telemetry::ClusterMetrics> {
        self.settings.metrics.clone()
    }

    /// Picks an endpoint with the balancer, preferring one not in `avoid`
    /// (those a retried request already failed on): a few picks, then
    /// whatever the balancer gives.
    fn pick_avoiding(&self, avoid: &[SocketAddr]) -> Result<Arc<Endpoint>, ProxyError> {
        let mut endpoint = self.pick()?;
        for _ in 0..3 {
            if !avoid.contains(&endpoint.addr) {
                break;
            }
            endpoint = self.pick()?;
        }
        Ok(endpoint)
    }

    /// Picks an endpoint with the cluster's balancer, skipping those that
    /// fail their active health checks or are ejected (outlier detection),
    /// unless too few are left (the panic threshold): then all are used.
    pub(crate) fn pick(&self) -> Result<Arc<Endpoint>, ProxyError> {
        let set = self.set.load();
        let pick = |rng: &mut fastrand::Rng| set.balancer.pick(rng, |i| set.endpoints[i].active());
        let checked = self.config.health_check.is_some();
        let outlier = self.config.outlier.as_ref();
        let chosen = with_thread_rng(|rng| {
            let first = pick(rng)?;
            if !checked && outlier.is_none() {
                return Some(first);
            }
            // No clock read until something has been ejected.
            let hint = match outlier {
                Some(_) => self
                    .ejected_until
                    .load(std::sync::atomic::Ordering::Relaxed),
                None => 0,
            };
            let now = if hint == 0 { 0 } else { outlier::now() };
            let ejections = hint > now;
            let usable = |i: usize| {
                let endpoint = &set.endpoints[i];
                (!checked || endpoint.health.is_healthy())
                    && !(ejections && endpoint.outlier.is_ejected(now))
            };
            if usable(first) {
                return Some(first);
            }
            let total = set.endpoints.len();
            let healthy = (0..total).filter(|&i| usable(i)).count();
            let threshold = outlier.map_or(DEFAULT_PANIC_THRESHOLD, |o| o.panic_threshold);
            if outlier::is_panic(threshold, healthy, total) {
                // Too few left: every endpoint takes traffic.
                return Some(first);
            }
            for _ in 0..3 {
                let i = pick(rng)?;
                if usable(i) {
                    return Some(i);
                }
            }
            // A usable one at random, without allocating.
            (0..total).filter(|&i| usable(i)).nth(rng.usize(..healthy))
        });
        chosen
            .map(|i| set.endpoints[i].clone())
            .ok_or_else(|| ProxyError::NoHealthyEndpoint {
                cluster: self.config.name.clone(),
            })
    }

    /// Forwards one HTTP request. The request arrives normalised by the
    /// router: origin-form URI and a `host` header carrying the authority.
    async fn forward(
        self: Arc<Self>,
        mut req: Request<RequestBody>,
        per_try: Option<tokio::time::Instant>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let (endpoint, attempt) = match req
            .extensions()
            .get::<crate::resilience::retry::TriedEndpoints>()
        {
            Some(tried) => (self.pick_avoiding(&tried.0)?, tried.0.len() + 1),
            None => (self.pick()?, 1),
        };
        // Each attempt is a client span of its own: its id is the parent
        // the upstream sees.
        let traced = req.body_mut().take_trace().map(|outbound| {
            let propagation = outbound.attempt();
            // What a span needs, only when one may be recorded.
            let head = outbound.tracer.may_record(&outbound.context).then(|| {
                (
                    crate::clock::unix_nanos_of(std::time::Instant::now()),
                    req.method().clone(),
                )
            });
            (outbound, propagation, head)
        });
        let Some(guard) = endpoint.begin_request(self.config.max_requests) else {
            self.settings
                .metrics
                .overflows
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ProxyError::Overflow {
                cluster: self.config.name.clone(),
            });
        };
        let wire = match (self.config.protocol, req.version()) {
            (UpstreamProtocol::Http2, _) | (UpstreamProtocol::Downstream, Version::HTTP_2) => {
                Wire::Http2
            }
            // An upgrade (WebSocket) needs HTTP/1.1's 101; everything
            // else shares one multiplexed connection.
            (UpstreamProtocol::Auto, _) if !req.headers().contains_key(header::UPGRADE) => {
                Wire::Http2
            }
            _ => Wire::Http1,
        };
        match wire {
            Wire::Http1 => *req.version_mut() = Version::HTTP_11,
            Wire::Http2 => {
                // HTTP/2 carries the authority in `:authority`; a `host`
                // header beside it must not disagree (RFC 9113 §8.3.1).
                let host = req.headers_mut().remove(header::HOST);
                let authority = host.and_then(|h| Authority::try_from(h.as_bytes()).ok());
                let mut parts = std::mem::take(req.uri_mut()).into_parts();
                parts.scheme = Some(Scheme::HTTP);
                parts.authority =
                    Some(authority.unwrap_or_else(|| Authority::from_static("localhost")));
                if parts.path_and_query.is_none() {
                    parts.path_and_query = Some(PathAndQuery::from_static("/"));
                }
                *req.uri_mut() =
                    Uri::from_parts(parts).map_err(|_| ProxyError::Malformed("request target"))?;
                *req.version_mut() = Version::HTTP_2;
            }
        }
        // PERF: the send is pinned where it is made; the per-try timeout
        // polls it there rather than taking it in (a copy of the whole
        // future).
        let propagation = traced.as_ref().map(|(_, propagation, _)| *propagation);
        let mut send = std::pin::pin!(endpoint.send(req, wire, guard, propagation));
        let mut result = match per_try {
            None => send.await,
            Some(deadline) => crate::clock::before(deadline, send.as_mut())
                .await
                .unwrap_or(Err(ProxyError::AttemptTimeout {
                    endpoint: endpoint.addr,
                })),
        };
        if let Some(config) = &self.config.outlier {
            self.observe(config, &endpoint, &result);
        }
        if let Some((outbound, propagation, Some((start, method)))) = traced {
            let (status, flag) = match &result {
                Ok(response) => (response.status().as_u16(), ""),
                Err(error) => (0, error.flag()),
            };
            if outbound.tracer.records(&outbound.context, status) {
                let context = &outbound.context;
                let mut span = SpanRecord::new(
                    Kind::Client,
                    context,
                    propagation.span_id(),
                    context.span_id,
                    start,
                    method,
                );
                span.peer = Some(endpoint.addr);
                span.version = match wire {
                    Wire::Http2 => Version::HTTP_2,
                    Wire::Http1 => Version::HTTP_11,
                };
                span.status = status;
                span.flag = flag;
                span.cluster = Some(self.config.name.clone());
                span.attempt = u32::try_from(attempt).unwrap_or(u32::MAX);
                let open = OpenSpan::new(outbound.tracer.clone(), span);
                // A response keeps its attempt's span open until its body
                // is over; a failed attempt's ends now.
                if let Ok(response) = &mut result {
                    response.body_mut().set_span(open);
                }
            }
        }
        result
    }

    /// Passes one outcome to the endpoint's outlier record, ejecting it
    /// when a threshold is crossed and the cluster's cap allows.
    fn observe(
        &self,
        config: &crate::config::OutlierDetection,
        endpoint: &Arc<Endpoint>,
        result: &Result<Response<UpstreamBody>, ProxyError>,
    ) {
        use outlier::Observation;
        let observation = match result {
            Ok(response) => match response.status() {
                http::StatusCode::BAD_GATEWAY
                | http::StatusCode::SERVICE_UNAVAILABLE
                | http::StatusCode::GATEWAY_TIMEOUT => Observation::GatewayError,
                status if status.is_server_error() => Observation::ServerError,
                _ => Observation::Success,
            },
            Err(error)
                if error.origin() == crate::error::Origin::Upstream
                    && error.endpoint() == Some(endpoint.addr) =>
            {
                Observation::GatewayError
            }
            // The client's fault, or a local decision: says nothing of
            // the endpoint.
            Err(_) => return,
        };
        self.record(config, endpoint, observation);
    }

    /// Passes a TCP listener's connect to `endpoint` to its outlier record
    /// (when the cluster has outlier detection): a refused or timed-out
    /// connect, or a failed TLS handshake, is a gateway error; a connect
    /// that succeeded, a success. What the stream then carries is opaque.
    pub(crate) fn observe_connect(&self, endpoint: &Arc<Endpoint>, connected: bool) {
        if let Some(config) = &self.config.outlier {
            let observation = if connected {
                outlier::Observation::Success
            } else {
                outlier::Observation::GatewayError
            };
            self.record(config, endpoint, observation);
        }
    }

    fn record(
        &self,
        config: &crate::config::OutlierDetection,
        endpoint: &Arc<Endpoint>,
        observation: outlier::Observation,
    ) {
        let may_eject = |now| {
            let set = self.set.load();
            let ejected = set
                .endpoints
                .iter()
                .filter(|e| e.outlier.is_ejected(now))
                .count();
            ejected < outlier::max_ejected(config, set.endpoints.len())
        };
        if let Some(until) = endpoint
            .outlier
            .observe(config, observation, outlier::now, may_eject)
        {
            self.ejected_until
                .fetch_max(until, std::sync::atomic::Ordering::Relaxed);
            self.settings
                .metrics
                .outlier_ejections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                cluster = %self.config.name,
                endpoint = %endpoint.addr,
                ejected_for = ?endpoint.outlier.ejected_for(outlier::now()),
                ejections = endpoint.outlier.ejections(),
                "endpoint ejected: consecutive failures (outlier detection)"
            );
        }
    }
}

impl ClusterState {
    /// Compares the endpoints' success rates over the window since the
    /// last sweep and ejects the outliers, lowest rate first, while the
    /// cluster's cap allows.
    fn sweep_success_rate(&self) {
        let Some(config) = &self.config.outlier else {
            return;
        };
        let Some(rate) = &config.success_rate else {
            return;
        };
        let set = self.set.load();
        let windows: Vec<(u64, u64)> = set
            .endpoints
            .iter()
            .map(|e| e.outlier.take_window())
            .collect();
        let now = outlier::now();
        let cap = outlier::max_ejected(config, set.endpoints.len());
        for i in outlier::success_rate_outliers(rate, &windows) {
            let endpoint = &set.endpoints[i];
            let ejected = set
                .endpoints
                .iter()
                .filter(|e| e.outlier.is_ejected(now))
                .count();
            if ejected >= cap {
                break;
            }
            if endpoint.outlier.is_ejected(now) {
                continue;
            }
            let until = endpoint.outlier.eject(config, now);
            self.ejected_until
                .fetch_max(until, std::sync::atomic::Ordering::Relaxed);
            let metrics = &self.settings.metrics;
            for counter in [
                &metrics.outlier_ejections,
                &metrics.outlier_success_rate_ejections,
            ] {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let (successes, total) = windows[i];
            tracing::warn!(
                cluster = %self.config.name,
                endpoint = %endpoint.addr,
                successes,
                requests = total,
                ejected_for = ?endpoint.outlier.ejected_for(now),
                ejections = endpoint.outlier.ejections(),
                "endpoint ejected: success rate far below the others' (outlier detection)"
            );
        }
    }
}

/// Whether endpoints built for `a` serve `b` unchanged: same protocol,
/// connect timeout, pool and TLS settings and connection limits (the load balancer and the
/// endpoint list may differ). A connection verified for one server
/// identity never carries a request meant for another.
fn reaches_endpoints_alike(a: &Cluster, b: &Cluster) -> bool {
    a.protocol == b.protocol
        && a.connect_timeout == b.connect_timeout
        && a.pool_idle_timeout == b.pool_idle_timeout
        && a.max_idle_per_endpoint == b.max_idle_per_endpoint
        && a.tls == b.tls
        && a.max_connections == b.max_connections
        && a.max_pending_requests == b.max_pending_requests
}

/// Sorts by address and merges duplicates (two names resolving to one
/// address) by adding their weights.
fn merge(mut addrs: Vec<(SocketAddr, u32)>) -> Vec<(SocketAddr, u32)> {
    addrs.sort_unstable();
    let mut merged: Vec<(SocketAddr, u32)> = Vec::with_capacity(addrs.len());
    for (addr, weight) in addrs {
        match merged.last_mut() {
            Some((last, total)) if *last == addr => *total = total.saturating_add(weight),
            _ => merged.push((addr, weight)),
        }
    }
    merged
}

impl EndpointSet {
    fn empty(policy: crate::config::LbPolicy) -> Self {
        Self {
            endpoints: Vec::new(),
            balancer: Balancer::new(policy, Vec::new()),
        }
    }
}

/// The tower service at the bottom of every route's stack.
#[derive(Debug, Clone)]
pub(crate) struct ClusterService {
    state: Arc<ClusterState>,
    /// The route's per-try timeout: each attempt's deadline, blamed on the
    /// endpoint it went to (outlier detection counts it, a retry avoids
    /// it).
    per_try_timeout: Option<Duration>,
}

impl ClusterService {
    pub(crate) fn new(state: Arc<ClusterState>) -> Self {
        Self {
            state,
            per_try_timeout: None,
        }
    }

    /// Gives every request sent through this service `timeout`.
    pub(crate) fn with_per_try_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.per_try_timeout = timeout;
        self
    }
}

impl tower::Service<Request<RequestBody>> for ClusterService {
    type Response = Response<UpstreamBody>;
    type Error = ProxyError;
    type Future = Forwarding;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        // The deadline counts from the call: a first attempt's is the
        // request's start (see `clock`).
        let deadline = self
            .per_try_timeout
            .map(|timeout| crate::clock::tokio_now() + timeout);
        Forwarding::new(self.state.clone().forward(req, deadline))
    }
}

type Forwarded = Result<Response<UpstreamBody>, ProxyError>;

/// A request's attempt on its way to the cluster, in a box that is kept,
/// emptied, by the thread when the attempt is over, for the next one.
///
/// PERF: the attempt's future (about 3 KiB: the endpoint's exchange is
/// in it) is boxed, so that the route's layers move a pointer; a box
/// allocated for each request was, after the response's header map, the
/// proxy's only allocation per HTTP/1.1 request, and one large enough that
/// glibc served it from its bins, not its per-thread cache
/// (benches/RESULTS.md).
pub(crate) struct Forwarding(Option<Pin<Box<dyn Slot>>>);

/// An attempt's future in its box, or the box emptied: what
/// [`Forwarding`] holds, of the one type `ClusterState::forward` returns.
trait Slot: Send {
    fn poll_slot(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Forwarded>;
    /// Moves the future in `future` (an `Option` of this slot's type)
    /// into the emptied slot; false when it is of another type.
    fn fill(self: Pin<&mut Self>, future: &mut dyn std::any::Any) -> bool;
    /// Drops the future in place.
    fn empty(self: Pin<&mut Self>);
}

impl<F> Slot for Option<F>
where
    F: Future<Output = Forwarded> + Send + 'static,
{
    fn poll_slot(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Forwarded> {
        match self.as_pin_mut() {
            Some(future) => future.poll(cx),
            // Emptied only as its `Forwarding` is dropped.
            None => Poll::Pending,
        }
    }

    fn fill(mut self: Pin<&mut Self>, future: &mut dyn std::any::Any) -> bool {
        match future.downcast_mut::<Self>() {
            Some(future) => {
                self.set(future.take());
                true
            }
            None => false,
        }
    }

    fn empty(mut self: Pin<&mut Self>) {
        self.set(None);
    }
}

/// The most emptied boxes a thread keeps: as many attempts as its
/// connections had in flight at once, up to this (about 190 KiB).
const KEPT_SLOTS: usize = 64;

thread_local! {
    static KEPT: crate::kept::Kept<Pin<Box<dyn Slot>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Forwarding {
    fn new<F>(future: F) -> Self
    where
        F: Future<Output = Forwarded> + Send + 'static,
    {
        let mut future = Some(future);
        if let Some(mut slot) = crate::kept::take(&KEPT) {
            if slot.as_mut().fill(&mut future) {
                return Self(Some(slot));
            }
            // A box for another type of future: kept for that one.
            crate::kept::keep(&KEPT, slot, KEPT_SLOTS);
        }
        Self(Some(Box::pin(future)))
    }

    /// How many emptied boxes this thread keeps.
    #[cfg(test)]
    fn kept() -> usize {
        KEPT.with(|kept| kept.borrow().len())
    }
}

impl Future for Forwarding {
    type Output = Forwarded;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Forwarded> {
        match self.0.as_mut() {
            Some(slot) => slot.as_mut().poll_slot(cx),
            None => Poll::Pending,
        }
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let Some(mut slot) = self.0.take() else {
            return;
        };
        // What the attempt holds (a connection, a guard) goes now, as it
        // would with the box.
        slot.as_mut().empty();
        crate::kept::keep(&KEPT, slot, KEPT_SLOTS);
    }
}

impl std::fmt::Debug for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarding").finish_non_exhaustive()
    }
}

/// Cluster state by name, reconciled on each snapshot build.
#[derive(Debug)]
pub(crate) struct ClusterRegistry {
    clusters: Mutex<HashMap<Arc<str>, Arc<ClusterState>>>,
    metrics: Arc<Metrics>,
    /// Workload certificates and trust bundles for mesh mTLS.
    identities: Arc<Identities>,
    /// Where DNS refresh tasks run (the control runtime).
    control: tokio::runtime::Handle,
}

impl ClusterRegistry {
    pub(crate) fn new(
        metrics: Arc<Metrics>,
        identities: Arc<Identities>,
        control: tokio::runtime::Handle,
    ) -> Self {
        Self {
            clusters: Mutex::new(HashMap::new()),
            metrics,
            identities,
            control,
        }
    }

    /// The state for each configured cluster, reusing the state of every
    /// cluster whose configuration did not change. New DNS clusters are
    /// resolved (each name within [`DNS_TIMEOUT`]) before this returns, so a
    /// snapshot never starts with a needlessly empty set. Nothing changes
    /// until [`ClusterRegistry::commit`]; so this runs before the caller
    /// takes any lock that the data path or another apply would wait on.
    pub(crate) async fn prepare(&self, configs: &[Arc<Cluster>]) -> PreparedClusters {
        let mut fresh = Vec::new();
        let states: HashMap<Arc<str>, Arc<ClusterState>> = {
            let current = self.clusters.lock().unwrap_or_else(PoisonError::into_inner);
            configs
                .iter()
                .map(|config| {
                    let previous = current.get(&config.name);
                    let state = match previous {
                        Some(state) if *state.config == **config => state.clone(),
                        _ => {
                            let state = Arc::new(ClusterState::new(
                                config.clone(),
                                &self.metrics,
                                &self.identities,
                                previous.map(|p| &**p),
                            ));
                            fresh.push(state.clone());
                            state
                        }
                    };
                    (config.name.clone(), state)
                })
                .collect()
        };
        for state in &fresh {
            if state.has_dns() {
                state.resolve().await;
            }
        }
        PreparedClusters { states, fresh }
    }

    /// Makes prepared cluster states the registry's, starts the background
    /// work of the new ones (DNS refresh, idle-connection sweeps) and forgets
    /// the clusters that are gone. Returns the states by name.
    pub(crate) fn commit(
        &self,
        prepared: PreparedClusters,
    ) -> HashMap<Arc<str>, Arc<ClusterState>> {
        for state in &prepared.fresh {
            if state.has_dns() {
                self.control.spawn(refresh_dns(Arc::downgrade(state)));
            }
            self.control.spawn(expire_idle(Arc::downgrade(state)));
            if state.config.health_check.is_some() {
                self.control.spawn(health::run(Arc::downgrade(state)));
            }
            if success_rate_interval(state).is_some() {
                self.control
                    .spawn(sweep_success_rate(Arc::downgrade(state)));
            }
        }
        *self.clusters.lock().unwrap_or_else(PoisonError::into_inner) = prepared.states.clone();
        prepared.states
    }
}

/// Cluster states prepared for a configuration, not yet the registry's.
#[derive(Debug)]
pub(crate) struct PreparedClusters {
    states: HashMap<Arc<str>, Arc<ClusterState>>,
    /// The states created for this configuration (the rest are reused).
    fresh: Vec<Arc<ClusterState>>,
}

/// How long one name may take to resolve. A resolver that hangs must not
/// hold up a configuration change (nor, on refresh, the cluster's next
/// refresh): the name keeps its last addresses and is tried again.
pub(crate) const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// The panic threshold of a health-checked cluster without outlier
/// detection (whose `panic_threshold` applies otherwise), as Envoy's.
const DEFAULT_PANIC_THRESHOLD: u32 = 50;

/// The idle-connection sweep never runs more often than this.
const MIN_EXPIRE_PERIOD: Duration = Duration::from_millis(100);

/// Closes a cluster's expired idle upstream connections every half pool
/// idle timeout (so a connection is closed at most 1.5 idle timeouts after
/// its last use), until the cluster is dropped.
async fn expire_idle(state: Weak<ClusterState>) {
    loop {
        let Some(period) = state
            .upgrade()
            .map(|s| (s.config.pool_idle_timeout / 2).max(MIN_EXPIRE_PERIOD))
        else {
            return;
        };
        tokio::time::sleep(period).await;
        let Some(state) = state.upgrade() else { return };
        let closed: usize = state
            .endpoints()
            .endpoints
            .iter()
            .map(|e| e.expire_idle())
            .sum();
        if closed > 0 {
            tracing::debug!(cluster = %state.config.name, closed, "idle upstream connections closed");
        }
    }
}

fn success_rate_interval(state: &ClusterState) -> Option<Duration> {
    Some(
        state
            .config
            .outlier
            .as_ref()?
            .success_rate
            .as_ref()?
            .interval,
    )
}

/// Compares success rates every `success_rate.interval` until the cluster
/// is dropped.
async fn sweep_success_rate(state: Weak<ClusterState>) {
    loop {
        let Some(period) = state.upgrade().as_deref().and_then(success_rate_interval) else {
            return;
        };
        tokio::time::sleep(period).await;
        let Some(state) = state.upgrade() else { return };
        state.sweep_success_rate();
    }
}

/// Re-resolves a cluster's names every `dns_refresh` until the cluster is
/// dropped (a configuration change replaced or removed it).
async fn refresh_dns(state: Weak<ClusterState>) {
    loop {
        let Some(period) = state.upgrade().map(|s| s.config.dns_refresh) else {
            return;
        };
        tokio::time::sleep(period).await;
        let Some(state) = state.upgrade() else { return };
        state.resolve().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Counts its drops.
    struct Dropped(Arc<std::sync::atomic::AtomicUsize>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn attempt(
        drops: &Arc<std::sync::atomic::AtomicUsize>,
    ) -> impl Future<Output = Forwarded> + Send + 'static {
        let dropped = Dropped(drops.clone());
        async move {
            let _dropped = dropped;
            tokio::task::yield_now().await;
            Err(ProxyError::NoRoute)
        }
    }

    fn address(forwarding: &Forwarding) -> Option<*const ()> {
        forwarding
            .0
            .as_ref()
            .map(|slot| std::ptr::from_ref::<dyn Slot>(&**slot).cast::<()>())
    }

    #[tokio::test]
    async fn an_attempt_s_box_is_kept_when_it_ends_and_filled_by_the_next() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let drops = Arc::new(AtomicUsize::new(0));
        let first = Forwarding::new(attempt(&drops));
        let boxed = address(&first);
        assert!(matches!(first.await, Err(ProxyError::NoRoute)));
        assert_eq!(drops.load(Relaxed), 1);
        assert_eq!(Forwarding::kept(), 1, "emptied and kept");

        let second = Forwarding::new(attempt(&drops));
        assert_eq!(Forwarding::kept(), 0);
        assert_eq!(address(&second), boxed, "the same box");
        // Dropped before it ends (a timeout, a client gone): what it held
        // goes at once, and the box is kept.
        drop(second);
        assert_eq!(drops.load(Relaxed), 2);
        assert_eq!(Forwarding::kept(), 1);

        // A future of another type gets a box of its own.
        let other = Forwarding::new(async { Err(ProxyError::NoRoute) });
        assert_ne!(address(&other), boxed);
        assert_eq!(Forwarding::kept(), 1, "the kept box waits for its type");
        assert!(other.await.is_err());
        assert_eq!(Forwarding::kept(), 2);
    }

    fn clusters(yaml: &str) -> Vec<Arc<Cluster>> {
        let text = format!("listeners: []\nclusters:\n{yaml}");
        Config::from_yaml(&text, "test").unwrap().clusters
    }

    #[test]
    fn duplicate_addresses_merge_and_add_their_weights() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let cases = [
            (vec![], vec![]),
            (vec![(b, 1), (a, 2)], vec![(a, 2), (b, 1)]),
            (vec![(a, 1), (b, 1), (a, 3)], vec![(a, 4), (b, 1)]),
            (vec![(a, u32::MAX), (a, 1)], vec![(a, u32::MAX)]),
        ];
        for (input, want) in cases {
            assert_eq!(merge(input.clone()), want, "{input:?}");
        }
    }

    #[tokio::test]
    async fn prepared_clusters_change_nothing_until_committed() {
        let metrics = Arc::new(Metrics::new());
        let registry = ClusterRegistry::new(
            metrics,
            crate::identity::Identities::new(),
            tokio::runtime::Handle::current(),
        );
        let first = clusters("  - { name: app, endpoints: [{ address: \"127.0.0.1:1\" }] }");
        let committed = registry.commit(registry.prepare(&first).await);
        let changed = clusters("  - { name: app, endpoints: [{ address: \"127.0.0.1:2\" }] }");
        let prepared = registry.prepare(&changed).await;
        assert!(!Arc::ptr_eq(&prepared.states["app"], &committed["app"]));
        // Not committed: preparing the first configuration again reuses
        // its state, as if the change had never been seen.
        let again = registry.prepare(&first).await;
        assert!(Arc::ptr_eq(&again.states["app"], &committed["app"]));
        assert!(again.fresh.is_empty());
    }

    #[tokio::test]
    async fn picks_skip_unhealthy_endpoints_above_the_panic_threshold() {
        let registry = ClusterRegistry::new(
            Arc::new(Metrics::new()),
            crate::identity::Identities::new(),
            tokio::runtime::Handle::current(),
        );
        // An interval long enough that the test drives every verdict.
        let config = clusters(
            "  - name: app
    endpoints: [{ address: \"127.0.0.1:1\" }, { address: \"127.0.0.1:2\" }, { address: \"127.0.0.1:3\" }]
    health_check: { tcp: {}, interval: 1h, unhealthy_threshold: 1 }",
        );
        let state = ClusterState::new(
            config[0].clone(),
            &registry.metrics,
            &registry.identities,
            None,
        );
        let check = state.config.health_check.clone().unwrap();
        let set = state.endpoints();
        let picked = |n: usize| -> std::collections::BTreeSet<SocketAddr> {
            (0..n).map(|_| state.pick().unwrap().addr).collect()
        };
        // All unknown: below the panic threshold, everyone takes traffic.
        assert_eq!(picked(30).len(), 3);
        for (i, endpoint) in set.endpoints.iter().enumerate() {
            let outcome = if i == 2 {
                health::Outcome::Failure("status 503".into())
            } else {
                health::Outcome::Success
            };
            endpoint.health.record(&check, &outcome);
        }
        let picks = picked(60);
        assert_eq!(picks.len(), 2, "{picks:?}");
        assert!(!picks.contains(&set.endpoints[2].addr));
        // One healthy of three is below 50 %: all are used again.
        set.endpoints[1]
            .health
            .record(&check, &health::Outcome::Timeout);
        assert_eq!(picked(30).len(), 3);
    }

    #[tokio::test]
    async fn a_sweep_ejects_the_endpoint_whose_success_rate_stands_out() {
        let registry = ClusterRegistry::new(
            Arc::new(Metrics::new()),
            crate::identity::Identities::new(),
            tokio::runtime::Handle::current(),
        );
        let config = clusters(
            "  - name: app
    endpoints: [{ address: \"127.0.0.1:1\" }, { address: \"127.0.0.1:2\" }, { address: \"127.0.0.1:3\" }, { address: \"127.0.0.1:4\" }, { address: \"127.0.0.1:5\" }]
    outlier_detection: { consecutive_5xx: 0, consecutive_gateway_errors: 0, success_rate: { request_volume: 10, interval: 1h } }",
        );
        let state = registry.commit(registry.prepare(&config).await)["app"].clone();
        let outlier = state.config.outlier.unwrap();
        let set = state.endpoints();
        for (i, endpoint) in set.endpoints.iter().enumerate() {
            // The last endpoint fails one request in two.
            for n in 0..20 {
                let observation = if i == 4 && n % 2 == 0 {
                    outlier::Observation::ServerError
                } else {
                    outlier::Observation::Success
                };
                endpoint
                    .outlier
                    .observe(&outlier, observation, || 0, |_| true);
            }
        }
        state.sweep_success_rate();
        let now = outlier::now();
        assert!(set.endpoints[4].outlier.is_ejected(now));
        assert_eq!(
            set.endpoints
                .iter()
                .filter(|e| e.outlier.is_ejected(now))
                .count(),
            1
        );
        assert_eq!(
            state
                .metrics()
                .outlier_success_rate_ejections
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        for _ in 0..20 {
            assert_ne!(state.pick().unwrap().addr, set.endpoints[4].addr);
        }
        // The window started over: the next sweep has nothing to compare.
        state.sweep_success_rate();
        assert_eq!(set.endpoints[4].outlier.ejections(), 1);
    }

    #[tokio::test]
    async fn a_cluster_with_no_endpoint_answers_no_healthy_endpoint() {
        let metrics = Arc::new(Metrics::new());
        let registry = ClusterRegistry::new(
            metrics,
            crate::identity::Identities::new(),
            tokio::runtime::Handle::current(),
        );
        let config = clusters("  - { name: app, endpoints: [{ address: \"127.0.0.1:1\" }] }");
        let state = registry.commit(registry.prepare(&config).await)["app"].clone();
        state.publish(Vec::new());
        let error = state.pick().unwrap_err();
        assert!(
            matches!(error, ProxyError::NoHealthyEndpoint { .. }),
            "{error:?}"
        );
        assert_eq!(error.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    }
}
