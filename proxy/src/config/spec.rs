//! The serde shapes users write (YAML). Nothing here is validated beyond
//! its syntax: `model.rs` turns a spec into the typed runtime model and
//! reports every problem with the resource and field that caused it.
//!
//! Enum-like fields are plain strings on purpose, so that a bad value is
//! reported by the validator with the resource's name, not by serde with a
//! line number only.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A whole proxy configuration file.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapSpec {
    /// The admin HTTP server (readiness, metrics, config dump).
    #[serde(default)]
    pub admin: Option<AdminSpec>,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    /// How long listeners keep accepting after SIGTERM/SIGINT, with
    /// `/ready` already at 503, before the drain starts.
    #[serde(default, with = "humantime_serde")]
    pub drain_delay: Option<Duration>,
    /// JSON-lines access log.
    #[serde(default)]
    pub access_log: Option<AccessLogSpec>,
    /// JSON-lines log of policy decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_log: Option<DecisionLogSpec>,
    /// The proxy's metrics pushed to an OTLP collector, beside `/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_export: Option<MetricsExportSpec>,
    /// Sockets the proxy accepts on.
    #[serde(default)]
    pub listeners: Vec<ListenerSpec>,
    /// Named routing tables that HTTP listeners refer to.
    #[serde(default)]
    pub route_configs: Vec<RouteConfigSpec>,
    /// Upstream services.
    #[serde(default)]
    pub clusters: Vec<ClusterSpec>,
    /// The roots of trust domains whose workloads this proxy verifies
    /// (federation with another domain, or the mesh's own bundle as the
    /// control plane pushes it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_bundles: Vec<TrustBundleSpec>,
    /// Rego policies that routes and listeners name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicySpec>,
}

/// One TLS passthrough route of a TCP listener.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SniRouteSpec {
    /// `example.com`, `*.example.com` or `*`.
    pub server_names: Vec<String>,
    /// Where the connection goes.
    pub cluster: String,
}

/// The roots of one trust domain: peers whose SPIFFE ID names this domain
/// are verified against them and nothing else.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustBundleSpec {
    /// The trust domain (`example.org` of `spiffe://example.org/...`).
    pub trust_domain: String,
    /// A PEM file of its CA certificates (re-read when it changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Or the certificates themselves, PEM (as the control plane sends
    /// them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roots_pem: Option<String>,
    /// SHA-256 (hex) of the CA certificate that signs this domain's new
    /// certificates: a held certificate from another CA is renewed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

/// The admin server.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSpec {
    /// `IP:PORT`; port 0 picks a free port.
    pub address: String,
    /// A file holding a bearer token every admin request but `/ready` and
    /// `/live` must present.
    #[serde(default)]
    pub token_file: Option<String>,
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSpec {
    /// `stdout`, `stderr` or a file path (appended to).
    pub path: String,
    /// Lines laid out as this text with `{field}` placeholders, instead of
    /// JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// Where policy decisions are logged, and what is left out.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionLogSpec {
    /// `stdout`, `stderr` or a file path (appended to).
    pub path: String,
    /// Request headers whose values are replaced by `[REDACTED]`, besides
    /// the default ones (`authorization`, `proxy-authorization`, `cookie`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact_headers: Option<Vec<String>>,
    /// Log allowed requests too (default true); false logs only denials,
    /// audit denials and errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_allowed: Option<bool>,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    /// Unique name, used in metrics and logs.
    pub name: String,
    /// `IP:PORT`; port 0 picks a free port.
    pub address: String,
    /// `http` (HTTP/1.1 and HTTP/2 detected per connection) or `tcp`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// HTTP listeners: the route configuration to route with.
    #[serde(default)]
    pub route_config: Option<String>,
    /// TCP listeners: the cluster to forward connections to (with
    /// `sni_routes`, those no route takes).
    #[serde(default)]
    pub cluster: Option<String>,
    /// TCP listeners: TLS passed through unterminated, to a cluster chosen
    /// by the ClientHello's server name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni_routes: Option<Vec<SniRouteSpec>>,
    /// Connections above this wait in the kernel's accept queue.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Deadline for a client to send a request's headers (and, on a new
    /// connection, its first bytes).
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    /// A connection with no request in flight is closed after this.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Limit on the total size of a request's headers.
    #[serde(default)]
    pub max_request_headers_bytes: Option<u32>,
    /// Limit on the number of request headers.
    #[serde(default)]
    pub max_request_headers: Option<u32>,
    /// HTTP/2: concurrent streams per connection.
    #[serde(default)]
    pub max_concurrent_streams: Option<u32>,
    /// When set, `via: <protocol> <via>` is appended to requests and
    /// responses.
    #[serde(default)]
    pub via: Option<String>,
    /// How many proxies in front are trusted to have set
    /// `x-forwarded-for`, `x-forwarded-proto` and `x-request-id`.
    #[serde(default)]
    pub xff_num_trusted_hops: Option<u32>,
    /// Keep a client-sent `x-request-id` even with no trusted hop.
    #[serde(default)]
    pub preserve_request_id: Option<bool>,
    /// HTTP listeners: terminate TLS with these certificates.
    #[serde(default)]
    pub tls: Option<ListenerTlsSpec>,
    /// HTTP listeners: the policy every request must pass, before routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// HTTP listeners: a request rate limit for the whole listener (and
    /// per client), applied before routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// TCP listeners: faults injected into connections (chaos testing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<TcpFaultSpec>,
    /// HTTP listeners: spans exported over OTLP, trace context propagated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
    /// Istio's standard metrics (`istio_requests_total`, ...) for this
    /// listener's traffic, beside Weft's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio_metrics: Option<IstioMetricsSpec>,
}

/// Istio's standard metrics on a listener (see config/README.md,
/// `istio_metrics`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IstioMetricsSpec {
    /// `destination` (the callee's proxy: a sidecar's inbound listener) or
    /// `source` (the caller's: an outbound listener or a gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporter: Option<String>,
    /// The workload this proxy stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<IstioWorkloadSpec>,
    /// The `source_cluster` / `destination_cluster` label of this proxy's
    /// workload and of the peers listed here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// `reporter: destination`: callers by the SPIFFE ID they prove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<BTreeMap<String, IstioWorkloadSpec>>,
    /// `reporter: source`: callees by cluster name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destinations: Option<BTreeMap<String, IstioWorkloadSpec>>,
    /// Series kept at most; requests beyond are folded into one series
    /// (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_series: Option<u32>,
}

/// A workload's labels in Istio's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IstioWorkloadSpec {
    /// `*_workload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `*_workload_namespace` (and `destination_service_namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `*_app` and `*_canonical_service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// `*_version` and `*_canonical_revision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `destination_service`: the host callers address it by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// A listener's tracing (see config/README.md, `tracing`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSpec {
    /// The OTLP collector's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<String>,
    /// `grpc` (the default) or `http` (OTLP/HTTP, protobuf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Sent with every export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    /// An `https://` collector's CA certificates (PEM; default: the
    /// system's bundle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Share of new traces sampled, 0 to 100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_percent: Option<f64>,
    /// Record a failed request's spans even when it is not sampled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub always_sample_errors: Option<bool>,
    /// The resource's `service.name` (default `weft-proxy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// More resource attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_attributes: Option<BTreeMap<String, String>>,
    /// Spans waiting for export at most (default 2048).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued_spans: Option<u32>,
    /// Spans per export at most (default 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_export_batch: Option<u32>,
    /// A partial batch waits at most this long (default 1s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub flush_interval: Option<Duration>,
    /// An export taking longer fails (default 5s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub export_timeout: Option<Duration>,
}

/// Metrics pushed over OTLP (see config/README.md, `metrics_export`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsExportSpec {
    /// The OTLP collector's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<String>,
    /// `grpc` (the default) or `http` (OTLP/HTTP, protobuf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Sent with every export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    /// An `https://` collector's CA certificates (PEM; default: the
    /// system's bundle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The resource's `service.name` (default `weft-proxy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// More resource attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_attributes: Option<BTreeMap<String, String>>,
    /// Time between exports (default 60s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    /// An export taking longer fails (default 5s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub export_timeout: Option<Duration>,
}

/// A Rego policy (see config/README.md, `policies`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Unique among policies; routes and listeners name it.
    pub name: String,
    /// Rego files, read when the configuration is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rego_files: Option<Vec<String>>,
    /// Or Rego text inline (a module of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rego: Option<String>,
    /// Or Rego modules inline, each with the name its errors carry (how
    /// policies arrive over xDS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules: Option<Vec<RegoModuleSpec>>,
    /// The policy's `data` document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Or a JSON file holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// The rule evaluated (default `data.envoy.authz.allow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// `v1` (default) or `v0` (Rego before OPA 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rego_version: Option<String>,
    /// `enforce` (default) or `audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// On an evaluation error: `deny` (default) or `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<String>,
}

/// One Rego module given inline.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegoModuleSpec {
    /// What errors call it, e.g. the file it came from.
    pub name: String,
    /// The Rego text.
    pub rego: String,
}

/// Local token buckets: `requests_per_second` refills, `burst` is the most
/// a bucket holds. Either or both of the shared bucket and `per_client`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// One bucket for every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Default: `requests_per_second` rounded up (one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// A bucket for each client: its SPIFFE ID when it proved one,
    /// otherwise its IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_client: Option<ClientRateLimitSpec>,
}

/// A token bucket for each client.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRateLimitSpec {
    /// Each client's refill rate.
    pub requests_per_second: f64,
    /// Default: `requests_per_second` rounded up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Clients tracked at once (default 10000); see config/README.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_clients: Option<u32>,
}

/// Faults injected into a route's requests (chaos testing).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// Hold requests before sending them on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelaySpec>,
    /// Answer requests with an error instead of sending them on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbortSpec>,
    /// Only requests with these headers get faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<HeaderMatchSpec>>,
    /// Only requests from callers that proved one of these SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identities: Option<Vec<String>>,
    /// Requests may ask for a fault with `x-weft-fault-delay` (ms),
    /// `x-weft-fault-abort` (HTTP status) or `x-weft-fault-abort-grpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_header_faults: Option<bool>,
    /// Faults in progress at once (default 1024); beyond, requests pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_active: Option<u32>,
}

/// An injected delay.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelaySpec {
    /// How long (required).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub duration: Option<Duration>,
    /// Share of requests delayed, 0 to 100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

/// An injected error.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbortSpec {
    /// The HTTP status answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// The gRPC status gRPC callers get (a number, or a name such as
    /// `unavailable`); default: mapped from `http_status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// Share of requests aborted, 0 to 100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

/// Faults injected into a TCP listener's connections.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpFaultSpec {
    /// Hold connections before connecting upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelaySpec>,
    /// Reset this share of connections (0 to 100) at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_percent: Option<f64>,
    /// Faults in progress at once (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_active: Option<u32>,
}

/// TLS termination on a listener.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsSpec {
    /// Certificates, chosen by the client's SNI; the first without
    /// `server_names` (else the first) serves clients that send none or
    /// an unknown name. Not with `workload_identity`.
    #[serde(default)]
    pub certificates: Vec<TlsCertificateSpec>,
    /// Mesh mTLS (strict): serve this SPIFFE ID's certificate, which the
    /// proxy keeps signed by the control plane (`--xds` only), and require
    /// a client certificate that chains to the mesh's trust bundle of the
    /// trust domain its SPIFFE ID names.
    #[serde(default)]
    pub workload_identity: Option<String>,
    /// `"1.2"` (the default) or `"1.3"`.
    #[serde(default)]
    pub min_version: Option<String>,
    /// `strict` (the default: TLS only) or `permissive` (TLS and plaintext
    /// on one port, told apart by the first byte; for migrating to mTLS).
    #[serde(default)]
    pub mode: Option<String>,
    /// PEM file of the CAs that sign client certificates (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<String>,
    /// With `client_ca_file`: refuse clients without a certificate
    /// (default true).
    #[serde(default)]
    pub require_client_certificate: Option<bool>,
    /// With `client_ca_file`: the SPIFFE IDs allowed to connect (empty:
    /// any the CAs signed).
    #[serde(default)]
    pub allowed_identities: Vec<String>,
}

/// A certificate chain and its private key, from PEM files.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertificateSpec {
    /// PEM file: the certificate, then its intermediates.
    pub cert_file: String,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// SNI names this certificate serves (`example.com`, `*.example.com`).
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// A named routing table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfigSpec {
    /// Unique name that listeners refer to.
    pub name: String,
    /// Virtual hosts, chosen by the request's host.
    pub virtual_hosts: Vec<VirtualHostSpec>,
}

/// A set of routes for some hosts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHostSpec {
    /// Unique within its route configuration.
    pub name: String,
    /// `example.com`, `*.example.com` or `*`.
    pub domains: Vec<String>,
    /// Tried in order; the first match wins.
    pub routes: Vec<RouteSpec>,
}

/// One route: a match and what to do with matching requests.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Unique within its virtual host; a metrics label.
    #[serde(default)]
    pub name: Option<String>,
    /// What requests this route takes; absent matches everything.
    #[serde(default, rename = "match")]
    pub matcher: Option<RouteMatchSpec>,
    /// Send to this cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Or split across clusters by weight.
    #[serde(default)]
    pub weighted_clusters: Option<Vec<WeightedClusterSpec>>,
    /// Or answer directly.
    #[serde(default)]
    pub direct_response: Option<DirectResponseSpec>,
    /// Replace the matched path prefix (or the whole exact path).
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Replace the host / `:authority` sent upstream.
    #[serde(default)]
    pub host_rewrite: Option<String>,
    /// Whole-request deadline; `0s` disables it.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Headers changed on the way to the upstream.
    #[serde(default)]
    pub request_headers: Option<HeaderOpsSpec>,
    /// Headers changed on the way back to the client.
    #[serde(default)]
    pub response_headers: Option<HeaderOpsSpec>,
    /// Send failed attempts again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RetryPolicySpec>,
    /// A response whose upstream sends nothing for this long is cut (and
    /// no response headers for this long fail the request); `0s` or
    /// unset: none.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub stream_idle_timeout: Option<Duration>,
    /// The policy this route's requests must pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Inject delays and errors (chaos testing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultSpec>,
    /// Local request rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
}

/// When and how a route sends a failed request again.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicySpec {
    /// How many times a request may be sent again (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_retries: Option<u32>,
    /// What is retried: `5xx`, `gateway_error`, `connect_failure`,
    /// `reset`, `retriable_status_codes` (default `[gateway_error]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<String>>,
    /// With `retriable_status_codes`: these statuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retriable_status_codes: Option<Vec<u16>>,
    /// gRPC statuses retried (`unavailable`, `resource_exhausted`, ...),
    /// read from a trailers-only response's `grpc-status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retriable_grpc_statuses: Option<Vec<String>>,
    /// Deadline of each attempt; the route's `timeout` bounds them all.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// First backoff ceiling (default 25ms); doubles per retry.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff_base: Option<Duration>,
    /// Largest backoff ceiling (default 250ms).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff_max: Option<Duration>,
    /// Retry methods that are not idempotent (POST, PATCH) too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_non_idempotent: Option<bool>,
    /// The largest request body kept to be sent again (default 65536);
    /// a larger one is sent once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u32>,
    /// Retries allowed beyond the requests themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudgetSpec>,
}

/// A retry budget: retries may add at most `ratio` of the requests, plus
/// `min_per_second`, over the last `window`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetSpec {
    /// Default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
    /// Default 10s.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
}

/// Request matching criteria; all given criteria must hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatchSpec {
    /// The path starts with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// The path is exactly this (query excluded).
    #[serde(default)]
    pub exact: Option<String>,
    /// The whole path matches this regular expression.
    #[serde(default)]
    pub regex: Option<String>,
    /// The method is one of these.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Each header condition holds.
    #[serde(default)]
    pub headers: Option<Vec<HeaderMatchSpec>>,
    /// The caller proved one of these SPIFFE IDs (`spiffe://td/path`, or
    /// `spiffe://td/prefix/*`) with its client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identities: Option<Vec<String>>,
}

/// One header condition.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchSpec {
    /// Header name (case-insensitive).
    pub name: String,
    /// The value equals this.
    #[serde(default)]
    pub exact: Option<String>,
    /// The value matches this regular expression (whole value).
    #[serde(default)]
    pub regex: Option<String>,
    /// The header is present (`true`) or absent (`false`).
    #[serde(default)]
    pub present: Option<bool>,
}

/// One target of a weighted split.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedClusterSpec {
    /// Cluster name.
    pub cluster: String,
    /// Relative weight.
    pub weight: u32,
}

/// A response the proxy makes itself.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseSpec {
    /// HTTP status code.
    pub status: u16,
    /// Response body.
    #[serde(default)]
    pub body: Option<String>,
}

/// Header changes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOpsSpec {
    /// Replace (or create) these headers.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append these values, keeping existing ones.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove these headers.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// An upstream service.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Unique name that routes and listeners refer to.
    pub name: String,
    /// `http1` (default), `http2` or `downstream` (the client's protocol).
    #[serde(default)]
    pub protocol: Option<String>,
    /// `round_robin` (default), `random` or `least_request`.
    #[serde(default)]
    pub lb: Option<String>,
    /// Deadline for a TCP connect to an endpoint.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// How often DNS endpoints are re-resolved.
    #[serde(default, with = "humantime_serde")]
    pub dns_refresh: Option<Duration>,
    /// Upstream connection pool settings.
    #[serde(default)]
    pub pool: Option<PoolSpec>,
    /// The endpoints.
    pub endpoints: Vec<EndpointSpec>,
    /// TLS to the endpoints.
    #[serde(default)]
    pub tls: Option<ClusterTlsSpec>,
    /// Passive health checking: eject endpoints that keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Limits beyond which requests and retries are refused at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breakers: Option<CircuitBreakersSpec>,
    /// Active health checking: probe each endpoint on an interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
}

/// Active health checks of a cluster's endpoints: exactly one of `http`,
/// `tcp` and `grpc`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// An HTTP/1.1 `GET` whose status must be expected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheckSpec>,
    /// A connection (and TLS handshake, for a TLS cluster) that succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthCheckSpec>,
    /// `grpc.health.v1.Health/Check` answering `SERVING`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcHealthCheckSpec>,
    /// Time between two probes of an endpoint (default 5s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    /// Up to this much is added at random to each interval (default a
    /// tenth of the interval).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval_jitter: Option<Duration>,
    /// A probe not answered within this fails (default 1s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Passed probes in a row that make an unhealthy endpoint healthy
    /// (default 2; one until the endpoint has passed once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    /// Failed probes in a row that make a healthy endpoint unhealthy
    /// (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
}

/// An HTTP health check.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHealthCheckSpec {
    /// The path (and query) requested.
    pub path: String,
    /// The `host` header sent (default: the cluster's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Statuses that pass: codes (`204`) or inclusive ranges (`"200-299"`);
    /// empty: 200-299.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "statuses"
    )]
    pub expected_statuses: Vec<String>,
}

/// A TCP health check (no settings).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpHealthCheckSpec {}

/// A gRPC health check.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcHealthCheckSpec {
    /// The service name asked about (default empty: the whole server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The `:authority` sent (default: the cluster's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// Reads a list of statuses written as numbers or strings.
fn statuses<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Status {
        Code(u64),
        Text(String),
    }
    let list = Vec::<Status>::deserialize(deserializer)?;
    Ok(list
        .into_iter()
        .map(|s| match s {
            Status::Code(code) => code.to_string(),
            Status::Text(text) => text,
        })
        .collect())
}

/// A cluster's circuit breakers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakersSpec {
    /// Requests in flight to the cluster at once (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Retries in flight (or waiting their backoff) at once (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Upstream connections open or opening at once, over all endpoints
    /// (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection beyond `max_connections` at once
    /// (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
}

/// Ejects an endpoint after consecutive failures, for a time that grows
/// with each ejection.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    /// Any 5xx response or upstream failure, in a row (default 5; 0
    /// disables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    /// 502, 503, 504 or an upstream failure (connect, reset, timeout), in a
    /// row (default 5; 0 disables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// The first ejection's length (default 30s); the n-th lasts n times
    /// as long.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_ejection_time: Option<Duration>,
    /// The longest ejection (default 300s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_ejection_time: Option<Duration>,
    /// At most this share of the endpoints ejected at once (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// Below this share of endpoints not ejected, balance across all of
    /// them (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u32>,
    /// Ejects endpoints whose success rate is far below the others'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<SuccessRateSpec>,
}

/// Success-rate outlier detection (Envoy's): every `interval`, among the
/// endpoints that served at least `request_volume` requests in it, those
/// whose success rate is below `mean - stdev_factor / 1000 * stdev` are
/// ejected.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SuccessRateSpec {
    /// How often rates are computed, over the requests since (default 10s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    /// Endpoints with enough requests needed to compare at all (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_hosts: Option<u32>,
    /// Requests in the interval for an endpoint to count (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_volume: Option<u32>,
    /// Standard deviations below the mean, times 1000 (default 1900: 1.9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdev_factor: Option<u32>,
}

/// TLS (and mutual TLS) to a cluster's endpoints.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTlsSpec {
    /// PEM file of the CAs that sign the endpoints' certificates. Not with
    /// `workload_identity` (the mesh's trust bundle is used).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Mesh mTLS: present this SPIFFE ID's certificate, which the proxy
    /// keeps signed by the control plane (`--xds` only), and verify the
    /// endpoints' `server_identity` against the mesh's trust bundle.
    #[serde(default)]
    pub workload_identity: Option<String>,
    /// Mutual TLS: this proxy's certificate chain (PEM).
    #[serde(default)]
    pub cert_file: Option<String>,
    /// Mutual TLS: its private key (PEM).
    #[serde(default)]
    pub key_file: Option<String>,
    /// The SPIFFE ID every endpoint must prove.
    #[serde(default)]
    pub server_identity: Option<String>,
    /// The DNS name every endpoint's certificate must carry (also SNI).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Per-endpoint connection pool settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// An idle upstream connection is closed after this.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// At most this many idle HTTP/1.1 connections are kept per endpoint.
    #[serde(default)]
    pub max_idle_per_endpoint: Option<u32>,
}

/// One endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// `IP:PORT` or `HOSTNAME:PORT` (resolved, and re-resolved, by DNS).
    pub address: String,
    /// Relative load-balancing weight (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
}
