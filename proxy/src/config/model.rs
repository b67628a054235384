//! The validated runtime model: typed fields only (durations, header names,
//! compiled regexes, socket addresses), so nothing downstream re-parses
//! strings. `validate.rs` builds it from the spec and holds every default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;

use super::spec::BootstrapSpec;

/// A whole, validated proxy configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The spec this was validated from, as written (for `/config_dump`).
    pub spec: Arc<BootstrapSpec>,
    /// Where it came from: a file path, `command line`, or `inline`.
    pub source: Arc<str>,
    /// Admin server address, if any.
    pub admin: Option<SocketAddr>,
    /// The admin API's bearer token, if one is required (never logged).
    pub admin_token: Option<AdminToken>,
    /// Drain deadline on shutdown.
    pub drain_timeout: Duration,
    /// How long listeners keep accepting after the shutdown signal, with
    /// readiness already false, before the drain starts.
    pub drain_delay: Duration,
    /// Access log destination, if any.
    pub access_log: Option<AccessLogTarget>,
    /// The access log's line layout, when not JSON.
    pub access_log_template: Option<Arc<crate::telemetry::AccessTemplate>>,
    /// The policy decision log, if any.
    pub decision_log: Option<DecisionLogSettings>,
    /// Metrics pushed over OTLP, if any.
    pub metrics_export: Option<Arc<MetricsExport>>,
    /// Listeners in file order.
    pub listeners: Vec<Listener>,
    /// Route configurations in file order.
    pub route_configs: Vec<Arc<RouteConfig>>,
    /// Clusters in file order.
    pub clusters: Vec<Arc<Cluster>>,
    /// Trust bundles, one per trust domain.
    pub trust_bundles: Vec<Arc<crate::identity::TrustBundle>>,
    /// Compiled policies, by name.
    pub policies: Vec<Arc<crate::policy::CompiledPolicy>>,
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A file, appended to.
    File(std::path::PathBuf),
}

/// The policy decision log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionLogSettings {
    /// Where lines go.
    pub target: AccessLogTarget,
    /// Lower-case header names whose values are redacted.
    pub redact_headers: Vec<String>,
    /// Whether allowed requests are logged.
    pub include_allowed: bool,
}

/// Headers always redacted in the decision log.
pub const DEFAULT_REDACTED_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

/// A secret bearer token. Its `Debug` shows no part of it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub Arc<str>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// A validated listener.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Unique name.
    pub name: Arc<str>,
    /// Bind address.
    pub address: SocketAddr,
    /// HTTP or TCP, with what each needs.
    pub kind: ListenerKind,
    /// Concurrent connection limit.
    pub max_connections: u32,
    /// Deadline for request headers.
    pub header_read_timeout: Duration,
    /// Idle connection deadline.
    pub idle_timeout: Duration,
    /// Limit on request header bytes.
    pub max_request_headers_bytes: u32,
    /// Limit on request header count.
    pub max_request_headers: u32,
    /// HTTP/2 concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// Pseudonym for the `via` header.
    pub via: Option<Arc<str>>,
    /// Proxies in front trusted to have set the forwarding headers.
    pub xff_num_trusted_hops: u32,
    /// Keep a client-sent `x-request-id` even with no trusted hop.
    pub preserve_request_id: bool,
    /// TLS termination, when configured.
    pub tls: Option<Arc<ListenerTls>>,
    /// HTTP: the policy every request must pass, before routing.
    pub policy: Option<Arc<str>>,
    /// HTTP: the listener's request rate limit, before routing.
    pub rate_limit: Option<RateLimit>,
    /// TCP: faults injected into connections.
    pub fault: Option<TcpFault>,
    /// HTTP: spans exported and trace context propagated.
    pub tracing: Option<Tracing>,
    /// Istio's standard metrics for this listener's traffic.
    pub istio_metrics: Option<Arc<IstioMetrics>>,
}

/// Istio's standard metrics on a listener: which side reports, and the
/// workloads its labels name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioMetrics {
    /// The side of the call this listener sees.
    pub reporter: IstioReporter,
    /// The workload this proxy stands for.
    pub workload: IstioWorkload,
    /// The cluster label of this workload and of the listed peers.
    pub cluster_id: Option<String>,
    /// `Destination`: callers by SPIFFE ID.
    pub sources: BTreeMap<String, IstioWorkload>,
    /// `Source`: callees by cluster name.
    pub destinations: BTreeMap<String, IstioWorkload>,
    /// Series kept at most.
    pub max_series: u32,
}

/// Which side of a call a listener reports, in Istio's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IstioReporter {
    /// The caller's proxy (an outbound listener, a gateway).
    Source,
    /// The callee's proxy (a sidecar's inbound listener).
    Destination,
}

/// A workload as Istio's labels name it; an absent value is `unknown`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IstioWorkload {
    /// `*_workload`.
    pub name: Option<String>,
    /// `*_workload_namespace`.
    pub namespace: Option<String>,
    /// `*_app`, `*_canonical_service`.
    pub app: Option<String>,
    /// `*_version`, `*_canonical_revision`.
    pub version: Option<String>,
    /// `destination_service`.
    pub service: Option<String>,
}

/// A listener's tracing: where its spans go and which requests are
/// sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// The exporter; listeners with equal settings share one.
    pub export: Arc<TraceExport>,
    /// Share of new traces sampled.
    pub sample: Percent,
    /// Failed requests (5xx) are recorded even when not sampled.
    pub always_sample_errors: bool,
}

/// How spans are exported.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceExport {
    /// Where and as what.
    pub endpoint: OtlpEndpoint,
    /// Spans waiting for export at most.
    pub max_queued_spans: u32,
    /// Spans per export at most.
    pub max_export_batch: u32,
    /// A partial batch waits at most this long.
    pub flush_interval: Duration,
}

/// An OTLP collector and what this proxy tells it about itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OtlpEndpoint {
    /// The collector's URL (for HTTP, with the path exports are POSTed
    /// to).
    pub collector: String,
    /// The OTLP transport.
    pub protocol: OtlpProtocol,
    /// Sent with every export, sorted by name.
    pub headers: Vec<(String, String)>,
    /// The resource's `service.name`.
    pub service_name: String,
    /// More resource attributes, sorted by key.
    pub resource_attributes: Vec<(String, String)>,
    /// An export taking longer fails.
    pub export_timeout: Duration,
    /// An `https://` collector's roots.
    pub tls: Option<CollectorTls>,
}

/// The CA certificates an `https://` collector is verified against.
#[derive(Debug, Clone)]
pub struct CollectorTls {
    /// Where they came from.
    pub ca_file: Arc<str>,
    pub roots: Arc<rustls::RootCertStore>,
    /// A hash of the file when loaded: a changed bundle is a change.
    pub fingerprint: u64,
}

impl PartialEq for CollectorTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file && self.fingerprint == other.fingerprint
    }
}

impl Eq for CollectorTls {}

impl std::hash::Hash for CollectorTls {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.ca_file.hash(state);
        self.fingerprint.hash(state);
    }
}

/// The proxy's metrics pushed to an OTLP collector, beside `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MetricsExport {
    /// Where and as what.
    pub endpoint: OtlpEndpoint,
    /// Time between exports.
    pub interval: Duration,
}

/// OTLP's transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OtlpProtocol {
    /// gRPC (tonic).
    Grpc,
    /// HTTP with protobuf bodies.
    HttpProtobuf,
}

/// Local rate limits: a bucket shared by every request, one per client,
/// or both (a request needs a token from each).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// The shared bucket.
    pub shared: Option<TokenBucket>,
    /// Each client's bucket.
    pub per_client: Option<TokenBucket>,
    /// Clients tracked at once.
    pub max_clients: u32,
}

/// A token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    /// Tokens added per second.
    pub per_second: f64,
    /// The most the bucket holds (at least 1).
    pub burst: u32,
}

/// Faults injected into a route's requests.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Hold requests this long, for this share of them.
    pub delay: Option<(Duration, Percent)>,
    /// Answer this share of requests with an error.
    pub abort: Option<(FaultAbort, Percent)>,
    /// Only requests with these headers get faults.
    pub headers: Vec<HeaderMatch>,
    /// Only requests from these callers; empty: any caller.
    pub source_identities: Vec<IdentityMatch>,
    /// Requests may ask for faults with `x-weft-fault-*` headers.
    pub allow_header_faults: bool,
    /// Faults in progress at once; beyond, requests pass untouched.
    pub max_active: u32,
}

/// The error an abort fault answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultAbort {
    /// HTTP status.
    pub status: StatusCode,
    /// The `grpc-status` gRPC callers get.
    pub grpc_status: u8,
}

/// The gRPC status a gRPC caller gets for an HTTP status the proxy
/// answers (grpc/doc/http-grpc-status-mapping.md).
pub fn grpc_status_for_http(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// A share of requests, in millionths (0 to 1_000_000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent(pub u32);

impl Percent {
    /// Every request.
    pub const ALL: Self = Self(1_000_000);

    /// Whether a uniform draw `x` in `0..1_000_000` falls in the share.
    pub fn hit(self, x: u32) -> bool {
        x < self.0
    }
}

/// Faults injected into a TCP listener's connections.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpFault {
    /// Hold connections this long before connecting upstream.
    pub delay: Option<(Duration, Percent)>,
    /// Reset this share of connections at once.
    pub reset: Option<Percent>,
    /// Faults in progress at once.
    pub max_active: u32,
}

/// A listener's TLS termination, its files loaded and checked.
#[derive(Debug)]
pub struct ListenerTls {
    /// Certificates in configuration order (empty with a workload
    /// identity).
    pub certificates: Vec<TlsCertificate>,
    /// Mesh mTLS: serve this SPIFFE ID's certificate, signed by the
    /// control plane and rotated by the proxy, and verify clients against
    /// the mesh's trust bundles.
    pub workload_identity: Option<Arc<str>>,
    /// The oldest protocol version accepted.
    pub min_version: TlsVersion,
    /// Plaintext clients are served too, told apart by their first byte
    /// (a TLS handshake record or not): for migrating to mTLS.
    pub permissive: bool,
    /// Mutual TLS: how client certificates are verified.
    pub clients: Option<ClientVerification>,
}

/// A listener's verification of client certificates.
#[derive(Debug)]
pub struct ClientVerification {
    /// What client chains are verified against.
    pub roots: ClientRoots,
    /// SPIFFE IDs allowed to connect; empty allows any.
    pub allowed_identities: Vec<Arc<str>>,
}

/// What a listener verifies client chains against.
#[derive(Debug)]
pub enum ClientRoots {
    /// The listener's CAs (`client_ca_file`); the verifier also refuses
    /// clients without a certificate when one is required.
    Files(Arc<dyn rustls::server::danger::ClientCertVerifier>),
    /// The mesh's trust bundle of the trust domain the client's SPIFFE ID
    /// names; a certificate is required.
    Mesh,
}

/// A loaded certificate chain with its signing key.
#[derive(Debug)]
pub struct TlsCertificate {
    /// The chain and key, as rustls serves them. (The key is never
    /// printed: rustls's signing keys show only their algorithm.)
    pub key: Arc<rustls::sign::CertifiedKey>,
    /// SNI names it serves; empty for the default certificate.
    pub server_names: Vec<DomainMatch>,
    /// Where the chain came from, for logs and `/config_dump`.
    pub cert_file: Arc<str>,
    /// The SPIFFE ID the certificate carries, if any.
    pub spiffe_id: Option<Arc<str>>,
}

/// TLS protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 (and 1.3).
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// What a listener does with its connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerKind {
    /// HTTP/1.1 and HTTP/2, routed by this route configuration.
    Http {
        /// Route configuration name.
        route_config: Arc<str>,
    },
    /// Opaque TCP forwarded to a cluster.
    Tcp {
        /// The cluster (with `sni_routes`: of connections no route takes;
        /// none: they are closed).
        cluster: Option<Arc<str>>,
        /// TLS passthrough: the first route whose names match the
        /// ClientHello's SNI takes the connection.
        sni_routes: Vec<SniRoute>,
    },
}

/// A TLS passthrough route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    /// Server names.
    pub server_names: Vec<DomainMatch>,
    /// Cluster name.
    pub cluster: Arc<str>,
}

impl SniRoute {
    /// Whether `sni` (lower-case) is one of the route's names.
    pub fn matches(&self, sni: &str) -> bool {
        self.server_names.iter().any(|name| match name {
            DomainMatch::Exact(host) => **host == *sni,
            DomainMatch::Suffix(suffix) => sni.ends_with(&**suffix),
            DomainMatch::Any => true,
        })
    }
}

/// A named routing table.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Unique name.
    pub name: Arc<str>,
    /// Virtual hosts in file order.
    pub virtual_hosts: Vec<VirtualHost>,
}

/// Routes for a set of domains.
#[derive(Debug, Clone)]
pub struct VirtualHost {
    /// Name, unique within the route configuration.
    pub name: Arc<str>,
    /// Domains served.
    pub domains: Vec<DomainMatch>,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
}

/// How a virtual host claims a host name. Names are stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainMatch {
    /// `example.com`
    Exact(Box<str>),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(Box<str>),
    /// `*`
    Any,
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Name (defaults to `<vhost>/<index>`).
    pub name: Arc<str>,
    /// Match criteria.
    pub matcher: RouteMatch,
    /// What to do.
    pub action: RouteAction,
    /// Path rewrite.
    pub prefix_rewrite: Option<Box<str>>,
    /// Host rewrite.
    pub host_rewrite: Option<HeaderValue>,
    /// Whole-request deadline; `None` disables it.
    pub timeout: Option<Duration>,
    /// Changes to request headers.
    pub request_headers: HeaderOps,
    /// Changes to response headers.
    pub response_headers: HeaderOps,
    /// Retries of failed attempts, if the route has them.
    pub retry: Option<Arc<RetryPolicy>>,
    /// The policy its requests must pass.
    pub policy: Option<Arc<str>>,
    /// A response idle this long is cut; `None`: never.
    pub stream_idle_timeout: Option<Duration>,
    /// Injected faults.
    pub fault: Option<Arc<Fault>>,
    /// The route's request rate limit.
    pub rate_limit: Option<RateLimit>,
}

/// Passive health checking of a cluster's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Consecutive 5xx (or upstream failures) that eject; 0: never.
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors that eject; 0: never.
    pub consecutive_gateway_errors: u32,
    /// The n-th ejection lasts n times this, up to `max_ejection_time`.
    pub base_ejection_time: Duration,
    /// See `base_ejection_time`.
    pub max_ejection_time: Duration,
    /// At most this percentage of the endpoints ejected at once (at least
    /// one endpoint of two or more).
    pub max_ejection_percent: u32,
    /// Below this percentage of endpoints not ejected, all are used.
    pub panic_threshold: u32,
    /// Success-rate ejection, if configured.
    pub success_rate: Option<SuccessRate>,
}

/// Success-rate outlier detection's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuccessRate {
    /// How often rates are compared (over the requests since the last time).
    pub interval: Duration,
    /// Endpoints with `request_volume` requests needed to compare at all.
    pub minimum_hosts: u32,
    /// Requests in an interval for an endpoint to be compared.
    pub request_volume: u32,
    /// Ejects below `mean - stdev_factor / 1000 * stdev`.
    pub stdev_factor: u32,
}

/// Active health checking of a cluster's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What a probe is.
    pub kind: HealthCheckKind,
    /// Time between two probes of an endpoint.
    pub interval: Duration,
    /// Up to this much is added at random to each interval.
    pub interval_jitter: Duration,
    /// A probe not answered within this fails.
    pub timeout: Duration,
    /// Passed probes in a row that make an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// Failed probes in a row that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
}

/// What one health probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckKind {
    /// `GET path` over HTTP/1.1; passes on an expected status.
    Http {
        /// Path and query.
        path: http::uri::PathAndQuery,
        /// The `host` header.
        host: HeaderValue,
        /// Inclusive ranges of passing statuses.
        expected_statuses: Vec<(u16, u16)>,
    },
    /// A connection (and TLS handshake, for a TLS cluster).
    Tcp,
    /// `grpc.health.v1.Health/Check` over HTTP/2; passes on `SERVING`.
    Grpc {
        /// The service asked about (empty: the server).
        service: Arc<str>,
        /// The `:authority` sent.
        authority: http::uri::Authority,
    },
}

/// When and how a route sends a failed request again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub num_retries: u32,
    /// Any 5xx response is retried.
    pub on_5xx: bool,
    /// 502, 503 and 504 responses are retried.
    pub on_gateway_error: bool,
    /// Failures before the request was sent (connect, TLS, handshake).
    pub on_connect_failure: bool,
    /// Resets and attempt timeouts, after the request may have been seen.
    pub on_reset: bool,
    /// These statuses are retried.
    pub statuses: Vec<StatusCode>,
    /// These gRPC status codes are retried.
    pub grpc_statuses: Vec<u8>,
    /// Each attempt's deadline.
    pub per_try_timeout: Option<Duration>,
    /// Full-jitter exponential backoff: ceilings from `backoff_base`,
    /// doubling, up to `backoff_max`.
    pub backoff_base: Duration,
    /// See `backoff_base`.
    pub backoff_max: Duration,
    /// POST and PATCH (and other non-idempotent methods) are retried too.
    pub retry_non_idempotent: bool,
    /// Request bodies up to this size are kept to be sent again.
    pub max_body_bytes: usize,
    /// Retries allowed: `ratio` of the requests plus `min_per_second`,
    /// over `window`.
    pub budget_ratio: f64,
    /// See `budget_ratio`.
    pub budget_min_per_second: u32,
    /// See `budget_ratio`.
    pub budget_window: Duration,
}

/// Match criteria; all must hold.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    /// Path condition.
    pub path: PathMatch,
    /// Allowed methods; empty allows all.
    pub methods: Vec<Method>,
    /// Header conditions.
    pub headers: Vec<HeaderMatch>,
    /// The caller's SPIFFE ID is one of these; empty allows any caller
    /// (with or without an identity).
    pub source_identities: Vec<IdentityMatch>,
}

/// A condition on the caller's SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMatch {
    /// Exactly this ID.
    Exact(Arc<str>),
    /// Any ID under this path (written `spiffe://td/prefix/*`; kept with
    /// its final `/`).
    Prefix(Arc<str>),
}

impl IdentityMatch {
    /// Whether `id` satisfies the condition.
    pub fn matches(&self, id: &str) -> bool {
        match self {
            Self::Exact(want) => **want == *id,
            Self::Prefix(prefix) => id.starts_with(&**prefix),
        }
    }
}

/// A path condition (the query string is never part of the path).
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Starts with.
    Prefix(Box<str>),
    /// Equals.
    Exact(Box<str>),
    /// Whole path matches (anchored).
    Regex(Regex),
}

/// A header condition.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Header name.
    pub name: HeaderName,
    /// The test.
    pub kind: HeaderMatchKind,
}

impl HeaderMatch {
    /// Whether `headers` satisfy the condition.
    pub fn matches(&self, headers: &http::HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        match &self.kind {
            HeaderMatchKind::Present(present) => values.next().is_some() == *present,
            HeaderMatchKind::Exact(want) => values.any(|v| v == want),
            HeaderMatchKind::Regex(re) => values.any(|v| v.to_str().is_ok_and(|s| re.is_match(s))),
        }
    }
}

/// The test a header condition applies.
#[derive(Debug, Clone)]
pub enum HeaderMatchKind {
    /// Some value equals this.
    Exact(HeaderValue),
    /// Some value matches this (anchored).
    Regex(Regex),
    /// Present (`true`) or absent (`false`).
    Present(bool),
}

/// What a route does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAction {
    /// Forward to one cluster.
    Cluster(Arc<str>),
    /// Forward to one of several clusters, by weight.
    Weighted(Vec<(Arc<str>, u32)>),
    /// Answer directly.
    Direct {
        /// Status code.
        status: StatusCode,
        /// Body.
        body: Bytes,
    },
}

/// Header changes, applied remove, then set, then add.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    /// Replace.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Append.
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Remove.
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// A validated cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Unique name.
    pub name: Arc<str>,
    /// Upstream HTTP protocol.
    pub protocol: UpstreamProtocol,
    /// Load-balancing policy.
    pub lb: LbPolicy,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// DNS re-resolution period.
    pub dns_refresh: Duration,
    /// Idle upstream connections are closed after this.
    pub pool_idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per endpoint.
    pub max_idle_per_endpoint: u32,
    /// Endpoints in file order.
    pub endpoints: Vec<Endpoint>,
    /// TLS to the endpoints, when configured.
    pub tls: Option<Arc<ClusterTls>>,
    /// Passive health checking, if configured.
    pub outlier: Option<OutlierDetection>,
    /// Active health checking, if configured.
    pub health_check: Option<HealthCheck>,
    /// Requests in flight at once; more are refused (503).
    pub max_requests: u32,
    /// Retries in flight at once; more are not sent.
    pub max_retries: u32,
    /// HTTP upstream connections open or opening at once; a request that
    /// needs one more waits (pending).
    pub max_connections: u32,
    /// Requests pending at once; more are refused (503).
    pub max_pending_requests: u32,
}

/// TLS to a cluster's endpoints, its files loaded.
#[derive(Debug)]
pub struct ClusterTls {
    /// Mutual TLS: the certificate this proxy presents.
    pub client_cert: Option<ClientCert>,
    /// What every endpoint must prove.
    pub server: ServerIdentity,
    /// How an endpoint's chain is verified.
    pub verifier: UpstreamVerifier,
    /// The files, by which two configurations compare.
    pub files: Vec<Arc<str>>,
    /// A hash of the files' contents when loaded: a renewed certificate
    /// under the same path is a change (new connections use it).
    pub fingerprint: u64,
}

impl PartialEq for ClusterTls {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
            && self.fingerprint == other.fingerprint
            && self.server == other.server
            && self.workload_identity() == other.workload_identity()
    }
}

impl ClusterTls {
    /// The workload identity presented, if the client certificate is one.
    pub fn workload_identity(&self) -> Option<&Arc<str>> {
        match &self.client_cert {
            Some(ClientCert::Workload(id)) => Some(id),
            _ => None,
        }
    }
}

/// How a cluster verifies its endpoints' certificates.
#[derive(Debug)]
pub enum UpstreamVerifier {
    /// Against the cluster's CAs (`ca_file`), for its `server` identity.
    Files(Arc<dyn rustls::client::danger::ServerCertVerifier>),
    /// Against the mesh's trust bundle of this SPIFFE ID's trust domain,
    /// for this SPIFFE ID (`workload_identity` with `server_identity`).
    Mesh(Arc<str>),
}

/// The certificate a proxy presents to a cluster's endpoints.
#[derive(Debug)]
pub enum ClientCert {
    /// Loaded from `cert_file` and `key_file`.
    File(Arc<rustls::sign::CertifiedKey>),
    /// The current certificate of this workload identity, signed by the
    /// control plane.
    Workload(Arc<str>),
}

impl Eq for ClusterTls {}

/// The identity an upstream endpoint must prove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerIdentity {
    /// A SPIFFE ID (its certificate's one URI SAN); DNS names are ignored.
    Spiffe(Arc<str>),
    /// A DNS name in its certificate, verified as a browser would; also
    /// sent as SNI.
    DnsName(rustls_pki_types::ServerName<'static>),
}

/// Which HTTP version the proxy speaks to a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 (prior knowledge), multiplexed.
    Http2,
    /// Whatever the client spoke.
    Downstream,
    /// HTTP/2, multiplexed, for every request but upgrades (WebSocket),
    /// which take HTTP/1.1: how sidecars talk to each other over mTLS
    /// (ALPN `h2` or `http/1.1` per connection).
    Auto,
}

impl UpstreamProtocol {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Downstream => "downstream",
            Self::Auto => "auto",
        }
    }
}

/// Load-balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// Weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
    /// Power of two choices by active requests per weight.
    LeastRequest,
}

impl LbPolicy {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::Random => "random",
            Self::LeastRequest => "least_request",
        }
    }
}

/// A configured endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Where it is.
    pub address: EndpointAddress,
    /// Relative weight, at least 1.
    pub weight: u32,
}

/// An endpoint's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddress {
    /// A literal socket address.
    Socket(SocketAddr),
    /// A host name resolved by DNS (every address it resolves to is an
    /// endpoint with this weight).
    Dns {
        /// Host name.
        host: Box<str>,
        /// Port.
        port: u16,
    },
}

impl std::fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(addr) => write!(f, "{addr}"),
            Self::Dns { host, port } => write!(f, "{host}:{port}"),
        }
    }
}
