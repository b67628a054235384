//! The metrics registry and its Prometheus text exposition.
//!
//! Names follow `weft_<area>_<name>_<unit>`; labels are bounded (listener,
//! route, cluster, status class), never a raw path or address.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::istio::IstioMetrics;
use http::StatusCode;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS_SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram. Buckets are stored non-cumulatively (one atomic
/// increment per observation) and summed up when rendered.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_SECONDS.len() + 1],
    sum_nanos: AtomicU64,
    /// The latest traced observation of each bucket, for OpenMetrics
    /// exemplars; allocated with the first.
    exemplars: Mutex<Option<Box<Exemplars>>>,
}

type Exemplars = [Option<Exemplar>; BUCKETS_SECONDS.len() + 1];

/// An observation and the trace it belongs to.
#[derive(Debug, Clone, Copy)]
struct Exemplar {
    trace_id: u128,
    span_id: u64,
    seconds: f64,
    /// When, in nanoseconds from the Unix epoch.
    at: u64,
}

fn bucket_of(seconds: f64) -> usize {
    BUCKETS_SECONDS
        .iter()
        .position(|&le| seconds <= le)
        .unwrap_or(BUCKETS_SECONDS.len())
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let index = bucket_of(value.as_secs_f64());
        self.buckets[index].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(value.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Keeps an observation already recorded with [`Histogram::observe`]
    /// as its bucket's exemplar: the request of trace `trace_id`, whose
    /// span (this proxy's) is `span_id`, observed `at` (the span's end,
    /// already read: no clock reading here). Only recorded (sampled)
    /// traces are kept, so the lock is taken for those only.
    pub fn keep_exemplar(&self, value: Duration, trace_id: u128, span_id: u64, at: u64) {
        let seconds = value.as_secs_f64();
        let mut exemplars = self
            .exemplars
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let exemplars =
            exemplars.get_or_insert_with(|| Box::new([None; BUCKETS_SECONDS.len() + 1]));
        exemplars[bucket_of(seconds)] = Some(Exemplar {
            trace_id,
            span_id,
            seconds,
            at,
        });
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, format: Format) {
        let exemplars = match format {
            Format::OpenMetrics => *self
                .exemplars
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_deref()
                .unwrap_or(&[None; BUCKETS_SECONDS.len() + 1]),
            Format::Prometheus => [None; BUCKETS_SECONDS.len() + 1],
        };
        let exemplar = |out: &mut String, i: usize| {
            if let Some(e) = exemplars[i] {
                let at = e.at as f64 / 1e9;
                let _ = write!(
                    out,
                    " # {{trace_id=\"{:032x}\",span_id=\"{:016x}\"}} {} {at:.3}",
                    e.trace_id, e.span_id, e.seconds
                );
            }
            out.push('\n');
        };
        let mut cumulative = 0;
        for (i, le) in BUCKETS_SECONDS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = write!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            exemplar(out, i);
        }
        cumulative += self.buckets[BUCKETS_SECONDS.len()].load(Relaxed);
        let _ = write!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        exemplar(out, BUCKETS_SECONDS.len());
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Per (listener, route, cluster) request counters.
#[derive(Debug, Default)]
pub struct RequestMetrics {
    by_class: [AtomicU64; 5],
    /// Time from request headers received to response body finished.
    pub duration: Histogram,
    /// Requests held by a delay fault.
    pub faults_delayed: AtomicU64,
    /// Requests answered by an abort fault.
    pub faults_aborted: AtomicU64,
    /// Faults not injected because `max_active` were in progress.
    pub faults_overflow: AtomicU64,
    /// Requests refused by the route's rate limit.
    pub rate_limited: AtomicU64,
    /// Responses cut because the upstream sent nothing for the route's
    /// `stream_idle_timeout`.
    pub stream_idle_timeouts: AtomicU64,
}

impl RequestMetrics {
    /// Records one finished request.
    pub fn record(&self, status: StatusCode, duration: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Relaxed);
        self.duration.observe(duration);
    }

    /// Requests counted with this status class (1..=5).
    pub fn count(&self, class: usize) -> u64 {
        self.by_class
            .get(class.wrapping_sub(1))
            .map_or(0, |c| c.load(Relaxed))
    }
}

/// Per-listener connection and byte counters.
#[derive(Debug, Default)]
pub struct ListenerMetrics {
    /// Open downstream connections.
    pub connections_active: AtomicI64,
    /// Accepted downstream connections.
    pub connections_total: AtomicU64,
    /// Bytes read from clients.
    pub bytes_received: AtomicU64,
    /// Bytes written to clients.
    pub bytes_sent: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: AtomicU64,
    /// TLS clients refused for their identity (malformed, or not allowed).
    pub tls_peer_refused: AtomicU64,
    /// Connections closed because the client's certificate expired.
    pub tls_peer_expired: AtomicU64,
    /// TLS passthrough connections closed without a route: no ClientHello,
    /// or a server name no route takes and no default cluster.
    pub sni_unrouted: AtomicU64,
    /// Requests the HTTP/1 parser rejected as malformed (answered 400).
    pub rejected_malformed: AtomicU64,
    /// Requests the HTTP/1 parser rejected as too large (answered 431,
    /// or 414 for a request target past 64 KiB).
    pub rejected_too_large: AtomicU64,
    /// HTTP requests refused by the listener's rate limit.
    pub rate_limited: AtomicU64,
    /// TCP connections reset by a fault.
    pub faults_reset: AtomicU64,
    /// TCP connections held by a delay fault.
    pub faults_delayed: AtomicU64,
    /// TCP faults not injected because `max_active` were in progress.
    pub faults_overflow: AtomicU64,
    /// Requests by the SPIFFE ID the client proved, for the first
    /// [`MAX_SOURCES`] identities; the rest under `other`.
    sources: Mutex<BTreeMap<Arc<str>, Arc<AtomicU64>>>,
    /// Connections counted under `other` because the identity series were
    /// at their cap.
    sources_folded: AtomicU64,
}

/// Distinct caller identities counted per listener: a gateway that takes
/// client certificates from outside the mesh cannot grow `/metrics`
/// without bound.
pub(crate) const MAX_SOURCES: usize = 1024;

impl ListenerMetrics {
    /// The request counter of callers proving `identity` on this
    /// listener; looked up once per connection.
    pub fn source(&self, identity: &Arc<str>) -> Arc<AtomicU64> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(counter) = sources.get(identity) {
            return counter.clone();
        }
        let key = if sources.len() < MAX_SOURCES {
            identity.clone()
        } else {
            self.sources_folded.fetch_add(1, Relaxed);
            Arc::from("other")
        };
        sources.entry(key).or_default().clone()
    }
}

/// Per-cluster upstream counters.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// Failed or timed-out connection attempts.
    pub connect_failures: AtomicU64,
    /// Open upstream connections.
    pub connections_active: AtomicI64,
    /// Upstream connections opened.
    pub connections_total: AtomicU64,
    /// Requests sent upstream.
    pub requests_total: AtomicU64,
    /// Attempts sent again by a route's retry policy.
    pub retries: AtomicU64,
    /// Retries not sent because the cluster's retry budget was spent.
    pub retries_budget_exhausted: AtomicU64,
    /// Endpoints ejected by outlier detection.
    pub outlier_ejections: AtomicU64,
    /// Of those, ejected for their success rate.
    pub outlier_success_rate_ejections: AtomicU64,
    /// HTTP requests in flight to the cluster (circuit breaker).
    pub requests_active: AtomicI64,
    /// Requests refused because `max_requests` were in flight.
    pub overflows: AtomicU64,
    /// Retries in flight or waiting their backoff (circuit breaker).
    pub retries_active: AtomicI64,
    /// Retries not sent because `max_retries` were in flight.
    pub retries_overflow: AtomicU64,
    /// HTTP upstream connections open or opening (circuit breaker).
    pub connections_held: AtomicI64,
    /// Requests that needed a new connection beyond `max_connections`.
    pub connections_overflow: AtomicU64,
    /// Requests waiting for a connection (circuit breaker).
    pub requests_pending: AtomicI64,
    /// Requests refused because `max_pending_requests` were waiting.
    pub pending_overflows: AtomicU64,
    /// Wakes pending requests when a connection closes or goes idle.
    pub connection_released: tokio::sync::Notify,
    /// The cluster has active health checks (its health series are shown).
    pub health_checked: std::sync::atomic::AtomicBool,
    /// Health probes that passed.
    pub health_checks_success: AtomicU64,
    /// Health probes that failed (refused, bad status, not serving).
    pub health_checks_failure: AtomicU64,
    /// Health probes not answered within the timeout.
    pub health_checks_timeout: AtomicU64,
    /// Endpoints whose last health verdict is healthy.
    pub endpoints_healthy: AtomicI64,
}

/// Per-policy decision counters.
#[derive(Debug, Default)]
pub struct PolicyMetrics {
    /// Requests the policy allowed.
    pub allowed: AtomicU64,
    /// Requests the policy denied (enforce mode).
    pub denied: AtomicU64,
    /// Requests the policy would have denied (audit mode; allowed).
    pub audit_denied: AtomicU64,
    /// Evaluations that failed (the policy's failure mode decided).
    pub errors: AtomicU64,
    /// Decisions answered from the decision cache.
    pub cache_hits: AtomicU64,
    /// Time per evaluation, input building included.
    pub duration: Histogram,
}

impl PolicyMetrics {
    /// Records one evaluation's time.
    pub fn observe(&self, duration: Duration) {
        self.duration.observe(duration);
    }
}

type RequestKey = (Arc<str>, Arc<str>, Arc<str>);

/// A gauge or counter series: name, type, help, and how to read it.
type Series<M> = (&'static str, &'static str, &'static str, fn(&M) -> i64);

/// A counter's value as a series reads it.
fn counter(count: &AtomicU64) -> i64 {
    i64::try_from(count.load(Relaxed)).unwrap_or(i64::MAX)
}

#[derive(Debug, Default)]
struct Registry {
    requests: BTreeMap<RequestKey, Arc<RequestMetrics>>,
    listeners: BTreeMap<Arc<str>, Arc<ListenerMetrics>>,
    clusters: BTreeMap<Arc<str>, Arc<ClusterMetrics>>,
    policies: BTreeMap<Arc<str>, Arc<PolicyMetrics>>,
    /// Istio's metrics, by listener.
    istio: BTreeMap<Arc<str>, Arc<IstioMetrics>>,
}

/// The registry. Handles are looked up by name only while a snapshot is
/// built; scrapes read the atomics.
#[derive(Debug, Default)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Configuration files reloaded and applied (`--config`).
    pub config_reloads: AtomicU64,
    /// Configuration reloads refused (the last good configuration kept).
    pub config_reload_failures: AtomicU64,
    /// Span export, all exporters together.
    pub trace: Arc<super::TraceMetrics>,
    /// Metric exports the collector accepted (`metrics_export`).
    pub metric_exports: AtomicU64,
    /// Metric exports that failed.
    pub metric_export_failures: AtomicU64,
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding this lock cannot leave the maps half-updated
        // (each operation is one insert), so a poisoned lock is still usable.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The request counters for a listener/route/cluster triple (cluster is
    /// empty for direct responses and errors before a cluster is chosen).
    pub fn request(
        &self,
        listener: &Arc<str>,
        route: &Arc<str>,
        cluster: &Arc<str>,
    ) -> Arc<RequestMetrics> {
        self.registry()
            .requests
            .entry((listener.clone(), route.clone(), cluster.clone()))
            .or_default()
            .clone()
    }

    /// The counters of a listener.
    pub fn listener(&self, name: &Arc<str>) -> Arc<ListenerMetrics> {
        self.registry()
            .listeners
            .entry(name.clone())
            .or_default()
            .clone()
    }

    /// Forgets the series nothing uses any more: a handle only the registry
    /// holds belongs to a listener, route or cluster that no snapshot,
    /// connection or request in flight refers to. Called after each
    /// configuration change and before each scrape, so that `/metrics` does
    /// not list removed resources forever; a resource added again starts from zero (as a
    /// restarted process would, which Prometheus's `rate()` handles).
    /// Returns how many series were removed.
    pub fn prune(&self) -> usize {
        let mut registry = self.registry();
        let before = registry.requests.len() + registry.listeners.len() + registry.clusters.len();
        registry.requests.retain(|_, m| Arc::strong_count(m) > 1);
        registry.listeners.retain(|_, m| Arc::strong_count(m) > 1);
        registry.clusters.retain(|_, m| Arc::strong_count(m) > 1);
        registry.policies.retain(|_, m| Arc::strong_count(m) > 1);
        registry.istio.retain(|_, m| Arc::strong_count(m) > 1);
        before - (registry.requests.len() + registry.listeners.len() + registry.clusters.len())
    }

    /// A listener's Istio metrics: the same handle while its settings
    /// and identity stay the same, else a new one (its series' labels
    /// change).
    pub(crate) fn istio(
        &self,
        listener: &Arc<str>,
        settings: &Arc<crate::config::IstioMetrics>,
        own_principal: Option<Arc<str>>,
    ) -> Arc<IstioMetrics> {
        let mut registry = self.registry();
        if let Some(existing) = registry.istio.get(listener)
            && existing.settings == *settings
            && existing.own_principal() == own_principal.as_deref()
        {
            return existing.clone();
        }
        let metrics = Arc::new(IstioMetrics::new(settings.clone(), own_principal));
        registry.istio.insert(listener.clone(), metrics.clone());
        metrics
    }

    /// The counters of a policy.
    pub fn policy(&self, name: &Arc<str>) -> Arc<PolicyMetrics> {
        self.registry()
            .policies
            .entry(name.clone())
            .or_default()
            .clone()
    }

    /// The counters of a cluster.
    pub fn cluster(&self, name: &Arc<str>) -> Arc<ClusterMetrics> {
        self.registry()
            .clusters
            .entry(name.clone())
            .or_default()
            .clone()
    }

    /// Renders the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        self.render_as(Format::Prometheus)
    }

    /// Renders the series in `format`. OpenMetrics's differs from
    /// Prometheus's in counter family names (without `_total`, which their
    /// samples keep), exemplars, and the `# EOF` the caller appends after
    /// any series of its own (see [`openmetrics_families`]).
    pub fn render_as(&self, format: Format) -> String {
        let registry = self.registry();
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP weft_http_requests_total HTTP requests by listener, route, cluster and status class.\n");
        out.push_str("# TYPE weft_http_requests_total counter\n");
        for ((listener, route, cluster), m) in &registry.requests {
            for class in 1..=5 {
                let _ = writeln!(
                    out,
                    "weft_http_requests_total{{listener=\"{}\",route=\"{}\",cluster=\"{}\",status_class=\"{class}xx\"}} {}",
                    escape(listener),
                    escape(route),
                    escape(cluster),
                    m.count(class)
                );
            }
        }
        out.push_str("# HELP weft_http_request_duration_seconds Time from request headers to the end of the response.\n");
        out.push_str("# TYPE weft_http_request_duration_seconds histogram\n");
        for ((listener, route, cluster), m) in &registry.requests {
            let labels = format!(
                "listener=\"{}\",route=\"{}\",cluster=\"{}\"",
                escape(listener),
                escape(route),
                escape(cluster)
            );
            m.duration.render(
                &mut out,
                "weft_http_request_duration_seconds",
                &labels,
                format,
            );
        }
        // Faults and rate limits: only the series that counted something
        // (most routes have neither).
        out.push_str("# HELP weft_http_faults_injected_total Requests delayed or aborted by a route's fault injection.\n");
        out.push_str("# TYPE weft_http_faults_injected_total counter\n");
        for ((listener, route, cluster), m) in &registry.requests {
            for (fault, count) in [("delay", &m.faults_delayed), ("abort", &m.faults_aborted)] {
                let count = count.load(Relaxed);
                if count > 0 {
                    let _ = writeln!(
                        out,
                        "weft_http_faults_injected_total{{listener=\"{}\",route=\"{}\",cluster=\"{}\",fault=\"{fault}\"}} {count}",
                        escape(listener),
                        escape(route),
                        escape(cluster),
                    );
                }
            }
        }
        for (name, help, read) in [
            (
                "weft_http_faults_overflow_total",
                "Faults not injected because the route's max_active were in progress.",
                (|m| m.faults_overflow.load(Relaxed)) as fn(&RequestMetrics) -> u64,
            ),
            (
                "weft_http_rate_limited_total",
                "Requests answered 429 by the route's rate limit.",
                |m| m.rate_limited.load(Relaxed),
            ),
            (
                "weft_http_stream_idle_timeouts_total",
                "Responses cut because the upstream sent nothing for the route's stream_idle_timeout.",
                |m| m.stream_idle_timeouts.load(Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((listener, route, cluster), m) in &registry.requests {
                let count = read(m);
                if count > 0 {
                    let _ = writeln!(
                        out,
                        "{name}{{listener=\"{}\",route=\"{}\",cluster=\"{}\"}} {count}",
                        escape(listener),
                        escape(route),
                        escape(cluster),
                    );
                }
            }
        }
        let listener_series: [Series<ListenerMetrics>; 12] = [
            (
                "weft_downstream_rate_limited_total",
                "counter",
                "HTTP requests answered 429 by the listener's rate limit.",
                |m| counter(&m.rate_limited),
            ),
            (
                "weft_downstream_faults_reset_total",
                "counter",
                "TCP connections reset by the listener's fault injection.",
                |m| counter(&m.faults_reset),
            ),
            (
                "weft_downstream_faults_delayed_total",
                "counter",
                "TCP connections delayed by the listener's fault injection.",
                |m| counter(&m.faults_delayed),
            ),
            (
                "weft_downstream_faults_overflow_total",
                "counter",
                "TCP faults not injected because the listener's max_active were in progress.",
                |m| counter(&m.faults_overflow),
            ),
            (
                "weft_downstream_connections_active",
                "gauge",
                "Open client connections.",
                |m| m.connections_active.load(Relaxed),
            ),
            (
                "weft_downstream_connections_total",
                "counter",
                "Accepted client connections.",
                |m| counter(&m.connections_total),
            ),
            (
                "weft_downstream_received_bytes_total",
                "counter",
                "Bytes read from clients.",
                |m| counter(&m.bytes_received),
            ),
            (
                "weft_downstream_sent_bytes_total",
                "counter",
                "Bytes written to clients.",
                |m| counter(&m.bytes_sent),
            ),
            (
                "weft_downstream_tls_handshake_failures_total",
                "counter",
                "TLS handshakes with clients that failed or timed out.",
                |m| counter(&m.tls_handshake_failures),
            ),
            (
                "weft_downstream_tls_peer_refused_total",
                "counter",
                "TLS clients refused for their certificate's identity.",
                |m| counter(&m.tls_peer_refused),
            ),
            (
                "weft_downstream_tls_peer_expired_total",
                "counter",
                "Client connections closed because the client's certificate expired.",
                |m| counter(&m.tls_peer_expired),
            ),
            (
                "weft_downstream_tls_passthrough_unrouted_total",
                "counter",
                "TLS passthrough connections closed without a route (no ClientHello, or a server name no route takes).",
                |m| counter(&m.sni_unrouted),
            ),
        ];
        for (name, kind, help, read) in listener_series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (listener, m) in &registry.listeners {
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\"}} {}",
                    escape(listener),
                    read(m)
                );
            }
        }
        out.push_str("# HELP weft_http_requests_by_source_total HTTP requests on mutual-TLS connections, by listener and the SPIFFE ID the client proved.\n");
        out.push_str("# TYPE weft_http_requests_by_source_total counter\n");
        for (listener, m) in &registry.listeners {
            let sources = m.sources.lock().unwrap_or_else(PoisonError::into_inner);
            for (source, count) in sources.iter() {
                let _ = writeln!(
                    out,
                    "weft_http_requests_by_source_total{{listener=\"{}\",source_identity=\"{}\"}} {}",
                    escape(listener),
                    escape(source),
                    counter(count)
                );
            }
        }
        out.push_str("# HELP weft_metrics_folded_total Connections or requests counted under a label value `other` because their metric was at its cap of series (the label and metric named).\n");
        out.push_str("# TYPE weft_metrics_folded_total counter\n");
        let sources = registry.listeners.iter().map(|(listener, m)| {
            let folded = m.sources_folded.load(Relaxed);
            (
                listener,
                "weft_http_requests_by_source_total",
                "source_identity",
                folded,
            )
        });
        let istio = registry.istio.iter().map(|(listener, m)| {
            (
                listener,
                "istio_requests_total",
                "series",
                m.folded.load(Relaxed),
            )
        });
        for (listener, metric, label, folded) in sources.chain(istio) {
            if folded > 0 {
                let _ = writeln!(
                    out,
                    "weft_metrics_folded_total{{listener=\"{}\",metric=\"{metric}\",label=\"{label}\"}} {folded}",
                    escape(listener),
                );
            }
        }
        counter_by(
            &mut out,
            (
                "weft_downstream_rejected_requests_total",
                "Requests the HTTP parser rejected before routing, by reason.",
            ),
            ("listener", "reason"),
            &registry.listeners,
            |m| {
                Some([
                    ("malformed", &m.rejected_malformed),
                    ("too_large", &m.rejected_too_large),
                ])
            },
        );
        let cluster_series: [Series<ClusterMetrics>; 16] = [
            (
                "weft_upstream_connect_failures_total",
                "counter",
                "Failed upstream connection attempts.",
                |m| counter(&m.connect_failures),
            ),
            (
                "weft_upstream_connections_active",
                "gauge",
                "Open upstream connections.",
                |m| m.connections_active.load(Relaxed),
            ),
            (
                "weft_upstream_connections_total",
                "counter",
                "Upstream connections opened.",
                |m| counter(&m.connections_total),
            ),
            (
                "weft_upstream_requests_total",
                "counter",
                "Requests sent upstream.",
                |m| counter(&m.requests_total),
            ),
            (
                "weft_upstream_retries_total",
                "counter",
                "Attempts sent again by a route's retry policy.",
                |m| counter(&m.retries),
            ),
            (
                "weft_upstream_retries_budget_exhausted_total",
                "counter",
                "Retries not sent because the cluster's retry budget was spent.",
                |m| counter(&m.retries_budget_exhausted),
            ),
            (
                "weft_upstream_outlier_ejections_total",
                "counter",
                "Endpoints ejected by outlier detection (consecutive failures or success rate).",
                |m| counter(&m.outlier_ejections),
            ),
            (
                "weft_upstream_outlier_success_rate_ejections_total",
                "counter",
                "Endpoints ejected by outlier detection for a success rate far below the others'.",
                |m| counter(&m.outlier_success_rate_ejections),
            ),
            (
                "weft_upstream_requests_active",
                "gauge",
                "HTTP requests in flight to the cluster (against circuit_breakers.max_requests).",
                |m| m.requests_active.load(Relaxed),
            ),
            (
                "weft_upstream_overflow_total",
                "counter",
                "Requests refused at once (503 upstream_overflow): max_requests were in flight.",
                |m| counter(&m.overflows),
            ),
            (
                "weft_upstream_retries_active",
                "gauge",
                "Retries in flight or waiting their backoff (against circuit_breakers.max_retries).",
                |m| m.retries_active.load(Relaxed),
            ),
            (
                "weft_upstream_retries_overflow_total",
                "counter",
                "Retries not sent because max_retries were in flight.",
                |m| counter(&m.retries_overflow),
            ),
            (
                "weft_upstream_connections_held",
                "gauge",
                "HTTP upstream connections open or opening (against circuit_breakers.max_connections).",
                |m| m.connections_held.load(Relaxed),
            ),
            (
                "weft_upstream_connections_overflow_total",
                "counter",
                "Requests that needed a new connection while max_connections were held (they waited, or were refused).",
                |m| counter(&m.connections_overflow),
            ),
            (
                "weft_upstream_requests_pending",
                "gauge",
                "Requests waiting for an upstream connection (against circuit_breakers.max_pending_requests).",
                |m| m.requests_pending.load(Relaxed),
            ),
            (
                "weft_upstream_pending_overflow_total",
                "counter",
                "Requests refused at once (503 upstream_overflow): max_pending_requests were waiting.",
                |m| counter(&m.pending_overflows),
            ),
        ];
        for (name, kind, help, read) in cluster_series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (cluster, m) in &registry.clusters {
                let _ = writeln!(out, "{name}{{cluster=\"{}\"}} {}", escape(cluster), read(m));
            }
        }
        counter_by(
            &mut out,
            (
                "weft_policy_decisions_total",
                "Policy decisions by policy and result.",
            ),
            ("policy", "result"),
            &registry.policies,
            |m| {
                Some([
                    ("allow", &m.allowed),
                    ("deny", &m.denied),
                    ("audit_deny", &m.audit_denied),
                    ("error", &m.errors),
                ])
            },
        );
        let _ = writeln!(
            out,
            "# HELP weft_policy_cache_hits_total Policy decisions answered from the decision cache.\n# TYPE weft_policy_cache_hits_total counter"
        );
        for (policy, m) in &registry.policies {
            let _ = writeln!(
                out,
                "weft_policy_cache_hits_total{{policy=\"{}\"}} {}",
                escape(policy),
                m.cache_hits.load(Relaxed)
            );
        }
        out.push_str("# HELP weft_policy_evaluation_seconds Time per policy evaluation, input building included.\n");
        out.push_str("# TYPE weft_policy_evaluation_seconds histogram\n");
        for (policy, m) in &registry.policies {
            let labels = format!("policy=\"{}\"", escape(policy));
            m.duration
                .render(&mut out, "weft_policy_evaluation_seconds", &labels, format);
        }
        counter_by(
            &mut out,
            (
                "weft_upstream_health_checks_total",
                "Active health probes by cluster and result.",
            ),
            ("cluster", "result"),
            &registry.clusters,
            |m| {
                m.health_checked.load(Relaxed).then_some([
                    ("success", &m.health_checks_success),
                    ("failure", &m.health_checks_failure),
                    ("timeout", &m.health_checks_timeout),
                ])
            },
        );
        out.push_str("# HELP weft_upstream_endpoints_healthy Endpoints passing their active health checks.\n");
        out.push_str("# TYPE weft_upstream_endpoints_healthy gauge\n");
        for (cluster, m) in &registry.clusters {
            if m.health_checked.load(Relaxed) {
                let _ = writeln!(
                    out,
                    "weft_upstream_endpoints_healthy{{cluster=\"{}\"}} {}",
                    escape(cluster),
                    m.endpoints_healthy.load(Relaxed)
                );
            }
        }
        let _ = write!(
            out,
            "# HELP weft_config_reloads_total Configuration file reloads applied.\n\
             # TYPE weft_config_reloads_total counter\n\
             weft_config_reloads_total {}\n\
             # HELP weft_config_reload_failures_total Configuration file reloads refused (the last good configuration kept serving).\n\
             # TYPE weft_config_reload_failures_total counter\n\
             weft_config_reload_failures_total {}\n",
            self.config_reloads.load(Relaxed),
            self.config_reload_failures.load(Relaxed),
        );
        let trace = &self.trace;
        let _ = write!(
            out,
            "# HELP weft_trace_spans_total Spans by what became of them: exported, dropped (export queue full) or failed (lost with a failed export).\n\
             # TYPE weft_trace_spans_total counter\n\
             weft_trace_spans_total{{result=\"exported\"}} {}\n\
             weft_trace_spans_total{{result=\"dropped\"}} {}\n\
             weft_trace_spans_total{{result=\"failed\"}} {}\n\
             # HELP weft_trace_export_failures_total Span exports that failed (collector unreachable, refused or too slow).\n\
             # TYPE weft_trace_export_failures_total counter\n\
             weft_trace_export_failures_total {}\n",
            trace.spans_exported.load(Relaxed),
            trace.spans_dropped.load(Relaxed),
            trace.spans_failed.load(Relaxed),
            trace.exports_failed.load(Relaxed),
        );
        let _ = write!(
            out,
            "# HELP weft_metrics_exports_total Metric exports over OTLP, by result (metrics_export).\n\
             # TYPE weft_metrics_exports_total counter\n\
             weft_metrics_exports_total{{result=\"ok\"}} {}\n\
             weft_metrics_exports_total{{result=\"failed\"}} {}\n",
            self.metric_exports.load(Relaxed),
            self.metric_export_failures.load(Relaxed),
        );
        if !registry.istio.is_empty() {
            super::istio::render(&mut out, registry.istio.values().map(|m| &**m));
        }
        out
    }
}

/// The exposition formats of `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text, version 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text (`application/openmetrics-text`).
    OpenMetrics,
}

/// Rewrites Prometheus text's counter families for OpenMetrics: a counter
/// `x_total`'s `# HELP` and `# TYPE` name the family `x` (its samples keep
/// `x_total`). Everything else is the same in both formats.
pub fn openmetrics_families(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let lines: Vec<&str> = text.lines().collect();
    // A counter's family: its name without `_total`, when this line or the
    // next is its `# TYPE`.
    fn counter_family<'a>(next: &[&str], name: &'a str) -> Option<&'a str> {
        let family = name.strip_suffix("_total")?;
        let declared = format!("# TYPE {name} counter");
        next.iter()
            .take(2)
            .any(|l| *l == declared)
            .then_some(family)
    }
    for (i, line) in lines.iter().enumerate() {
        let counter_family = |name| counter_family(&lines[i..], name);
        let rewritten = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
            .and_then(|rest| {
                let (name, tail) = rest.split_once(' ')?;
                let family = counter_family(name)?;
                Some(format!("{} {family} {tail}", &line[..6]))
            });
        match rewritten {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Escapes a label value (names are validated, but be safe).
pub(crate) fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if value.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        value.into()
    }
}

/// Writes a counter family labelled by resource (`key`) and by one more
/// label whose values each have a counter; `values` gives them, or `None`
/// to leave a resource out.
fn counter_by<M, const N: usize>(
    out: &mut String,
    (name, help): (&str, &str),
    (key, label): (&str, &str),
    resources: &BTreeMap<Arc<str>, Arc<M>>,
    values: impl Fn(&M) -> Option<[(&'static str, &AtomicU64); N]>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (resource, m) in resources {
        for (value, count) in values(m).into_iter().flatten() {
            let _ = writeln!(
                out,
                "{name}{{{key}=\"{}\",{label}=\"{value}\"}} {}",
                escape(resource),
                count.load(Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_counted_by_identity_up_to_a_cap() {
        let listener = ListenerMetrics::default();
        let web: Arc<str> = "spiffe://example.org/ns/a/sa/web".into();
        listener.source(&web).fetch_add(1, Relaxed);
        listener.source(&web).fetch_add(1, Relaxed);
        for i in 1..MAX_SOURCES + 10 {
            listener.source(&Arc::from(format!("spiffe://example.org/ns/a/sa/{i}")));
        }
        let sources = listener.sources.lock().unwrap();
        assert_eq!(sources.len(), MAX_SOURCES + 1, "the cap, and `other`");
        assert_eq!(sources[&web].load(Relaxed), 2);
        assert!(sources.contains_key("other"));
        drop(sources);
        // 1034 identities, 1024 series: ten folded, and each fold counted.
        assert_eq!(listener.sources_folded.load(Relaxed), 10);
    }

    #[test]
    fn series_nothing_holds_are_pruned_and_the_rest_kept() {
        let metrics = Metrics::new();
        let (l, r, c) = (Arc::from("web"), Arc::from("api"), Arc::from("users"));
        let kept = metrics.request(&l, &r, &c);
        kept.record(http::StatusCode::OK, std::time::Duration::from_millis(1));
        let _listener = metrics.listener(&l);
        drop(metrics.request(&l, &Arc::from("gone"), &c));
        drop(metrics.cluster(&Arc::from("gone")));
        assert_eq!(metrics.prune(), 2);
        let text = metrics.render();
        assert!(!text.contains("gone"), "{text}");
        assert!(text.contains("route=\"api\""), "{text}");
        // A kept handle still counts into the same series.
        assert!(Arc::ptr_eq(&kept, &metrics.request(&l, &r, &c)));
        assert_eq!(metrics.prune(), 0);
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_shows_exemplars() {
        let metrics = Metrics::new();
        let (l, r, c) = (Arc::from("web"), Arc::from("api"), Arc::from("users"));
        let m = metrics.request(&l, &r, &c);
        m.record(http::StatusCode::OK, Duration::from_millis(3));
        m.duration.keep_exemplar(
            Duration::from_millis(3),
            0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
            0xb7,
            crate::clock::unix_nanos_now(),
        );
        let prometheus = metrics.render();
        assert!(
            !prometheus.contains(" # {"),
            "no exemplars in 0.0.4: {prometheus}"
        );
        let open = openmetrics_families(&metrics.render_as(Format::OpenMetrics));
        assert!(
            open.contains("# TYPE weft_http_requests counter\n"),
            "{open}"
        );
        assert!(
            open.contains("# HELP weft_http_requests HTTP requests"),
            "{open}"
        );
        assert!(
            open.contains("\nweft_http_requests_total{listener=\"web\""),
            "{open}"
        );
        assert!(open.contains("# TYPE weft_http_request_duration_seconds histogram\n"));
        let bucket = open
            .lines()
            .find(|l| {
                l.starts_with("weft_http_request_duration_seconds_bucket{")
                    && l.contains("le=\"0.005\"")
            })
            .unwrap();
        assert!(
            bucket.starts_with(
                "weft_http_request_duration_seconds_bucket{listener=\"web\",route=\"api\",cluster=\"users\",le=\"0.005\"} 1 # {trace_id=\"0af7651916cd43dd8448eb211c80319c\",span_id=\"00000000000000b7\"} 0.003 "
            ),
            "{bucket}"
        );
        // Only the bucket the observation fell in has one.
        assert_eq!(open.matches(" # {trace_id=").count(), 1, "{open}");
        // Gauges keep their names.
        let _ = metrics.listener(&l);
        let open = openmetrics_families(&metrics.render_as(Format::OpenMetrics));
        assert!(
            open.contains("# TYPE weft_downstream_connections_active gauge"),
            "{open}"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_when_rendered() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"", Format::Prometheus);
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
    }

    #[test]
    fn handles_survive_lookups_and_render_by_label() {
        let metrics = Metrics::new();
        let (l, r, c): (Arc<str>, Arc<str>, Arc<str>) =
            ("web".into(), "api".into(), "users".into());
        metrics
            .request(&l, &r, &c)
            .record(StatusCode::OK, Duration::from_millis(1));
        metrics
            .request(&l, &r, &c)
            .record(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(1));
        assert!(Arc::ptr_eq(
            &metrics.request(&l, &r, &c),
            &metrics.request(&l, &r, &c)
        ));
        let text = metrics.render();
        assert!(text.contains(
            "weft_http_requests_total{listener=\"web\",route=\"api\",cluster=\"users\",status_class=\"2xx\"} 1"
        ));
        assert!(text.contains(
            "weft_http_requests_total{listener=\"web\",route=\"api\",cluster=\"users\",status_class=\"5xx\"} 1"
        ));
        assert_eq!(escape("a\"b"), "a\\\"b");
    }
}
