//! Conversions between the YAML spec (`spec`) and Weft's xDS resources
//! (`weft.config.v1` in `weft-proto`), both ways, in one place; and the
//! packing of those resources in `google.protobuf.Any`.
//!
//! The protos mirror the spec field by field, so a conversion moves values
//! and checks nothing that the validator checks: a set of resources received
//! over xDS becomes a [`BootstrapSpec`] ([`bootstrap_from_resources`]) and
//! goes through the one validator, `Config::try_from`, like a YAML file.
//! Proto to spec fails only where the proto can hold a value the spec cannot:
//! a negative, non-canonical or over-long `Duration`, or a direct response
//! status above 65535. Those errors name the resource kind, its name and the
//! field path, as the validator's do.
//!
//! Guarantees: spec → proto → spec gives back the same spec, except that an
//! empty `methods` or `headers` list in a match comes back unset (both mean
//! "no condition"), and a duration longer than the protobuf limit of 10,000
//! years comes back as that limit. Proto → spec → proto gives back the same
//! proto for every proto that converts. Unset optional fields stay unset
//! both ways, so defaults keep being applied by the validator only.

use std::fmt;
use std::time::Duration;

use weft_proto::config::v1 as pb;
use weft_proto::prost::{self, Name};
use weft_proto::prost_types;

use super::spec::{
    BootstrapSpec, CircuitBreakersSpec, ClientRateLimitSpec, ClusterSpec, ClusterTlsSpec,
    DirectResponseSpec, EndpointSpec, FaultAbortSpec, FaultDelaySpec, FaultSpec,
    GrpcHealthCheckSpec, HeaderMatchSpec, HeaderOpsSpec, HealthCheckSpec, HttpHealthCheckSpec,
    IstioMetricsSpec, IstioWorkloadSpec, ListenerSpec, ListenerTlsSpec, OutlierDetectionSpec,
    PolicySpec, PoolSpec, RateLimitSpec, RegoModuleSpec, RetryBudgetSpec, RetryPolicySpec,
    RouteConfigSpec, RouteMatchSpec, RouteSpec, SniRouteSpec, SuccessRateSpec, TcpFaultSpec,
    TcpHealthCheckSpec, TlsCertificateSpec, TracingSpec, TrustBundleSpec, VirtualHostSpec,
    WeightedClusterSpec,
};
use super::{ConfigError, ValidationErrors};
use std::collections::BTreeMap;

pub use weft_proto::config::v1::{
    CLUSTER_TYPE_URL, LISTENER_TYPE_URL, POLICY_TYPE_URL, ROUTE_CONFIGURATION_TYPE_URL,
};

/// The largest `google.protobuf.Duration`: the protobuf definition limits
/// seconds to ±315,576,000,000 (about 10,000 years).
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;
const MAX_DURATION_NANOS: i32 = 999_999_999;

/// A value a proto field can hold but the spec cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    /// A `Duration` below zero.
    #[error("negative duration")]
    NegativeDuration,
    /// A `Duration` whose seconds exceed the protobuf limit (10,000 years).
    #[error("duration of {seconds}s exceeds the protobuf limit of {MAX_DURATION_SECONDS}s")]
    DurationTooLong {
        /// The seconds received.
        seconds: i64,
    },
    /// A `Duration` whose nanos are out of range or of a different sign
    /// than its seconds.
    #[error(
        "invalid duration ({seconds}s, {nanos}ns): nanos must be within ±999999999 and share the sign of seconds"
    )]
    NonCanonicalDuration {
        /// The seconds received.
        seconds: i64,
        /// The nanoseconds received.
        nanos: i32,
    },
    /// An HTTP status code that does not fit in 16 bits.
    #[error("status {0} is out of range (at most 65535)")]
    StatusOutOfRange(u32),
    /// A JSON text field that does not parse.
    #[error("invalid JSON at line {line}, column {column}")]
    Json {
        /// Where the parser stopped.
        line: usize,
        /// Where the parser stopped.
        column: usize,
    },
}

/// One field of one resource that the spec cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {resource:?}: {field}: {value}")]
pub struct ConversionError {
    /// Resource kind, as the validator names it: `listener`, `route_config`
    /// or `cluster`.
    pub kind: &'static str,
    /// Resource name.
    pub resource: String,
    /// Field path inside the resource, e.g. `virtual_hosts[0].routes[2].timeout`.
    pub field: String,
    /// What is wrong with the value.
    pub value: InvalidValue,
}

/// Every field, of every resource converted, that the spec cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConversionErrors(pub Vec<ConversionError>);

impl fmt::Display for ConversionErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// Conversion errors read like the validator's, so that the xDS client
/// reports both kinds of rejection (log and NACK) the same way.
impl From<ConversionErrors> for ValidationErrors {
    fn from(errors: ConversionErrors) -> Self {
        ValidationErrors(
            errors
                .0
                .into_iter()
                .map(|error| ConfigError {
                    kind: error.kind,
                    resource: error.resource,
                    field: error.field,
                    message: error.value.to_string(),
                    is_unresolved_reference: false,
                })
                .collect(),
        )
    }
}

/// Why a `google.protobuf.Any` could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The `Any` holds another message type than the one expected.
    #[error("unexpected type URL {actual:?} (expected {expected:?})")]
    UnexpectedTypeUrl {
        /// The type URL of the message expected.
        expected: String,
        /// The type URL found in the `Any`.
        actual: String,
    },
    /// The type URL matched but the bytes are not a valid message of it.
    #[error("cannot decode {type_url}")]
    Decode {
        /// The type URL of the message.
        type_url: String,
        /// The decoder's error.
        #[source]
        source: prost::DecodeError,
    },
}

/// Packs a message in a `google.protobuf.Any` under its type URL
/// (`type.googleapis.com/<package>.<Message>`).
pub fn pack<M: Name>(message: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// Unpacks a `google.protobuf.Any` that must hold an `M`.
///
/// As in protobuf's own `Any` handling, only the type name after the URL's
/// last `/` is compared, so a peer using another domain than
/// `type.googleapis.com` is understood.
pub fn unpack<M: Name + Default>(any: &prost_types::Any) -> Result<M, UnpackError> {
    let matches = any
        .type_url
        .rsplit_once('/')
        .is_some_and(|(_, name)| name == M::full_name());
    if !matches {
        return Err(UnpackError::UnexpectedTypeUrl {
            expected: M::type_url(),
            actual: any.type_url.clone(),
        });
    }
    M::decode(any.value.as_slice()).map_err(|source| UnpackError::Decode {
        type_url: any.type_url.clone(),
        source,
    })
}

/// Builds the spec of a set of resources received over xDS, to be checked
/// by `Config::try_from`. Fails with every field, of every resource, that
/// the spec cannot hold.
///
/// Only the xDS-served parts are filled in: `admin`, `drain_timeout`,
/// `drain_delay` and `access_log` belong to the proxy's local bootstrap, and
/// the caller copies them in before validating.
pub fn bootstrap_from_resources(
    listeners: Vec<pb::Listener>,
    routes: Vec<pb::RouteConfiguration>,
    clusters: Vec<pb::Cluster>,
    policies: Vec<pb::Policy>,
) -> Result<BootstrapSpec, ConversionErrors> {
    let mut errors = Vec::new();
    let listeners = collect(listeners, &mut errors);
    let route_configs = collect(routes, &mut errors);
    let clusters = collect(clusters, &mut errors);
    let policies = collect(policies, &mut errors);
    if errors.is_empty() {
        Ok(BootstrapSpec {
            listeners,
            route_configs,
            clusters,
            policies,
            ..BootstrapSpec::default()
        })
    } else {
        Err(ConversionErrors(errors))
    }
}

/// A trust bundle as pushed: its roots inline, the signer when named.
impl From<pb::TrustBundle> for TrustBundleSpec {
    fn from(bundle: pb::TrustBundle) -> Self {
        Self {
            trust_domain: bundle.trust_domain,
            ca_file: None,
            roots_pem: Some(bundle.roots_pem),
            signer: Some(bundle.signer).filter(|s| !s.is_empty()),
        }
    }
}

/// A policy travels with its modules and data inline: whoever reads
/// `rego_files` and `data_file` (the control plane, from its mesh
/// directory) puts their contents in `modules` and `data` first; a spec
/// that still names files sends none of them.
impl From<&PolicySpec> for pb::Policy {
    fn from(spec: &PolicySpec) -> Self {
        let inline = spec.rego.iter().map(|rego| pb::RegoModule {
            name: format!("{}.rego", spec.name),
            text: rego.clone(),
        });
        pb::Policy {
            name: spec.name.clone(),
            modules: spec
                .modules
                .iter()
                .flatten()
                .map(|m| pb::RegoModule {
                    name: m.name.clone(),
                    text: m.rego.clone(),
                })
                .chain(inline)
                .collect(),
            data_json: spec
                .data
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            query: spec.query.clone().unwrap_or_default(),
            rego_version: spec.rego_version.clone().unwrap_or_default(),
            mode: spec.mode.clone().unwrap_or_default(),
            failure_mode: spec.failure_mode.clone().unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::Policy> for PolicySpec {
    type Error = ConversionErrors;

    fn try_from(policy: pb::Policy) -> Result<Self, Self::Error> {
        let mut check = Checker::new("policy", &policy.name);
        let data = if policy.data_json.is_empty() {
            None
        } else {
            match serde_json::from_str(&policy.data_json) {
                Ok(value) => Some(value),
                Err(error) => {
                    let (line, column) = (error.line(), error.column());
                    check.error("data_json".into(), InvalidValue::Json { line, column });
                    None
                }
            }
        };
        let text = |s: String| Some(s).filter(|s| !s.is_empty());
        check.finish(PolicySpec {
            name: policy.name,
            rego_files: None,
            rego: None,
            modules: Some(
                policy
                    .modules
                    .into_iter()
                    .map(|m| RegoModuleSpec {
                        name: m.name,
                        rego: m.text,
                    })
                    .collect(),
            ),
            data,
            data_file: None,
            query: text(policy.query),
            rego_version: text(policy.rego_version),
            mode: text(policy.mode),
            failure_mode: text(policy.failure_mode),
        })
    }
}

/// Converts every resource, keeping the successes and gathering the errors.
fn collect<P, S>(resources: Vec<P>, errors: &mut Vec<ConversionError>) -> Vec<S>
where
    S: TryFrom<P, Error = ConversionErrors>,
{
    let mut specs = Vec::with_capacity(resources.len());
    for resource in resources {
        match S::try_from(resource) {
            Ok(spec) => specs.push(spec),
            Err(ConversionErrors(found)) => errors.extend(found),
        }
    }
    specs
}

/// Collects problems while converting one resource.
struct Checker {
    kind: &'static str,
    resource: String,
    errors: Vec<ConversionError>,
}

impl Checker {
    fn new(kind: &'static str, resource: &str) -> Self {
        Self {
            kind,
            resource: resource.to_owned(),
            errors: Vec::new(),
        }
    }

    fn error(&mut self, field: String, value: InvalidValue) {
        self.errors.push(ConversionError {
            kind: self.kind,
            resource: self.resource.clone(),
            field,
            value,
        });
    }

    /// Converts an optional duration; an invalid one is reported and
    /// becomes unset (the whole resource is rejected anyway).
    fn duration(
        &mut self,
        field: impl FnOnce() -> String,
        value: Option<prost_types::Duration>,
    ) -> Option<Duration> {
        match duration_from_proto(value?) {
            Ok(duration) => Some(duration),
            Err(invalid) => {
                self.error(field(), invalid);
                None
            }
        }
    }

    fn finish<T>(self, value: T) -> Result<T, ConversionErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConversionErrors(self.errors))
        }
    }
}

/// A spec duration as a proto one. Durations beyond the protobuf limit
/// (10,000 years) saturate at it: no deadline that long ever fires.
fn duration_to_proto(duration: Duration) -> prost_types::Duration {
    let seconds = i64::try_from(duration.as_secs()).unwrap_or(i64::MAX);
    if seconds > MAX_DURATION_SECONDS {
        return prost_types::Duration {
            seconds: MAX_DURATION_SECONDS,
            nanos: MAX_DURATION_NANOS,
        };
    }
    prost_types::Duration {
        seconds,
        // Below one billion, so it fits.
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(MAX_DURATION_NANOS),
    }
}

/// A proto duration as a spec one. Only canonical, non-negative durations
/// within the protobuf limit are accepted: normalising a malformed one would
/// guess at what the sender meant.
fn duration_from_proto(duration: prost_types::Duration) -> Result<Duration, InvalidValue> {
    let prost_types::Duration { seconds, nanos } = duration;
    let non_canonical = InvalidValue::NonCanonicalDuration { seconds, nanos };
    if !(-MAX_DURATION_NANOS..=MAX_DURATION_NANOS).contains(&nanos)
        || (seconds < 0 && nanos > 0)
        || (seconds > 0 && nanos < 0)
    {
        return Err(non_canonical);
    }
    if seconds < 0 || nanos < 0 {
        return Err(InvalidValue::NegativeDuration);
    }
    if seconds > MAX_DURATION_SECONDS {
        return Err(InvalidValue::DurationTooLong { seconds });
    }
    match (u64::try_from(seconds), u32::try_from(nanos)) {
        (Ok(seconds), Ok(nanos)) => Ok(Duration::new(seconds, nanos)),
        _ => Err(non_canonical),
    }
}

/// An optional list: empty means unset.
fn non_empty<T>(items: Vec<T>) -> Option<Vec<T>> {
    if items.is_empty() { None } else { Some(items) }
}

impl From<&ListenerSpec> for pb::Listener {
    fn from(spec: &ListenerSpec) -> Self {
        pb::Listener {
            name: spec.name.clone(),
            address: spec.address.clone(),
            protocol: spec.protocol.clone(),
            route_config: spec.route_config.clone(),
            cluster: spec.cluster.clone(),
            max_connections: spec.max_connections,
            header_read_timeout: spec.header_read_timeout.map(duration_to_proto),
            idle_timeout: spec.idle_timeout.map(duration_to_proto),
            max_request_headers_bytes: spec.max_request_headers_bytes,
            max_request_headers: spec.max_request_headers,
            max_concurrent_streams: spec.max_concurrent_streams,
            via: spec.via.clone(),
            xff_num_trusted_hops: spec.xff_num_trusted_hops,
            preserve_request_id: spec.preserve_request_id,
            sni_routes: spec
                .sni_routes
                .iter()
                .flatten()
                .map(|r| pb::SniRoute {
                    server_names: r.server_names.clone(),
                    cluster: r.cluster.clone(),
                })
                .collect(),
            tls: spec.tls.as_ref().map(|tls| pb::ListenerTls {
                certificates: tls
                    .certificates
                    .iter()
                    .map(|c| pb::TlsCertificate {
                        cert_file: c.cert_file.clone(),
                        key_file: c.key_file.clone(),
                        server_names: c.server_names.clone(),
                    })
                    .collect(),
                min_version: tls.min_version.clone(),
                client_ca_file: tls.client_ca_file.clone(),
                require_client_certificate: tls.require_client_certificate,
                allowed_identities: tls.allowed_identities.clone(),
                workload_identity: tls.workload_identity.clone(),
                mode: tls.mode.clone(),
            }),
            policy: spec.policy.clone(),
            rate_limit: spec.rate_limit.as_ref().map(rate_limit_to_proto),
            fault: spec.fault.as_ref().map(|fault| pb::TcpFault {
                delay: fault.delay.as_ref().map(delay_to_proto),
                reset_percent: fault.reset_percent,
                max_active: fault.max_active,
            }),
            tracing: spec.tracing.as_ref().map(tracing_to_proto),
            istio_metrics: spec.istio_metrics.as_ref().map(istio_to_proto),
        }
    }
}

fn tracing_to_proto(spec: &TracingSpec) -> pb::Tracing {
    pb::Tracing {
        collector: spec.collector.clone().unwrap_or_default(),
        protocol: spec.protocol.clone(),
        headers: spec
            .headers
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        sample_percent: spec.sample_percent,
        always_sample_errors: spec.always_sample_errors,
        service_name: spec.service_name.clone(),
        resource_attributes: spec
            .resource_attributes
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        max_queued_spans: spec.max_queued_spans,
        max_export_batch: spec.max_export_batch,
        flush_interval: spec.flush_interval.map(duration_to_proto),
        export_timeout: spec.export_timeout.map(duration_to_proto),
        ca_file: spec.ca_file.clone(),
    }
}

fn istio_workload_to_proto(spec: &IstioWorkloadSpec) -> pb::IstioWorkload {
    pb::IstioWorkload {
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
        app: spec.app.clone(),
        version: spec.version.clone(),
        service: spec.service.clone(),
    }
}

fn istio_workload_from_proto(workload: pb::IstioWorkload) -> IstioWorkloadSpec {
    IstioWorkloadSpec {
        name: workload.name,
        namespace: workload.namespace,
        app: workload.app,
        version: workload.version,
        service: workload.service,
    }
}

fn istio_to_proto(spec: &IstioMetricsSpec) -> pb::IstioMetrics {
    let peers = |peers: &Option<BTreeMap<String, IstioWorkloadSpec>>| {
        peers
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), istio_workload_to_proto(v)))
            .collect()
    };
    pb::IstioMetrics {
        reporter: spec.reporter.clone().unwrap_or_default(),
        workload: spec.workload.as_ref().map(istio_workload_to_proto),
        cluster_id: spec.cluster_id.clone(),
        sources: peers(&spec.sources),
        destinations: peers(&spec.destinations),
        max_series: spec.max_series,
    }
}

fn istio_from_proto(istio: pb::IstioMetrics) -> IstioMetricsSpec {
    let peers = |peers: BTreeMap<String, pb::IstioWorkload>| {
        Some(
            peers
                .into_iter()
                .map(|(k, v)| (k, istio_workload_from_proto(v)))
                .collect::<BTreeMap<_, _>>(),
        )
        .filter(|p| !p.is_empty())
    };
    IstioMetricsSpec {
        reporter: Some(istio.reporter).filter(|r| !r.is_empty()),
        workload: istio.workload.map(istio_workload_from_proto),
        cluster_id: istio.cluster_id,
        sources: peers(istio.sources),
        destinations: peers(istio.destinations),
        max_series: istio.max_series,
    }
}

fn tracing_from_proto(check: &mut Checker, tracing: pb::Tracing) -> TracingSpec {
    TracingSpec {
        collector: Some(tracing.collector).filter(|c| !c.is_empty()),
        protocol: tracing.protocol,
        headers: Some(tracing.headers.into_iter().collect())
            .filter(|h: &BTreeMap<_, _>| !h.is_empty()),
        sample_percent: tracing.sample_percent,
        always_sample_errors: tracing.always_sample_errors,
        service_name: tracing.service_name,
        resource_attributes: Some(tracing.resource_attributes.into_iter().collect())
            .filter(|h: &BTreeMap<_, _>| !h.is_empty()),
        max_queued_spans: tracing.max_queued_spans,
        max_export_batch: tracing.max_export_batch,
        flush_interval: check.duration(|| "tracing.flush_interval".into(), tracing.flush_interval),
        export_timeout: check.duration(|| "tracing.export_timeout".into(), tracing.export_timeout),
        ca_file: tracing.ca_file,
    }
}

impl TryFrom<pb::Listener> for ListenerSpec {
    type Error = ConversionErrors;

    fn try_from(listener: pb::Listener) -> Result<Self, Self::Error> {
        let mut check = Checker::new("listener", &listener.name);
        let header_read_timeout = check.duration(
            || "header_read_timeout".into(),
            listener.header_read_timeout,
        );
        let idle_timeout = check.duration(|| "idle_timeout".into(), listener.idle_timeout);
        let fault = listener.fault.map(|fault| TcpFaultSpec {
            delay: fault
                .delay
                .map(|d| delay_from_proto(&mut check, "fault.delay", d)),
            reset_percent: fault.reset_percent,
            max_active: fault.max_active,
        });
        let tracing = listener
            .tracing
            .map(|tracing| tracing_from_proto(&mut check, tracing));
        check.finish(ListenerSpec {
            name: listener.name,
            address: listener.address,
            protocol: listener.protocol,
            route_config: listener.route_config,
            cluster: listener.cluster,
            max_connections: listener.max_connections,
            header_read_timeout,
            idle_timeout,
            max_request_headers_bytes: listener.max_request_headers_bytes,
            max_request_headers: listener.max_request_headers,
            max_concurrent_streams: listener.max_concurrent_streams,
            via: listener.via,
            xff_num_trusted_hops: listener.xff_num_trusted_hops,
            preserve_request_id: listener.preserve_request_id,
            sni_routes: non_empty(
                listener
                    .sni_routes
                    .into_iter()
                    .map(|r| SniRouteSpec {
                        server_names: r.server_names,
                        cluster: r.cluster,
                    })
                    .collect(),
            ),
            tls: listener.tls.map(|tls| ListenerTlsSpec {
                certificates: tls
                    .certificates
                    .into_iter()
                    .map(|c| TlsCertificateSpec {
                        cert_file: c.cert_file,
                        key_file: c.key_file,
                        server_names: c.server_names,
                    })
                    .collect(),
                min_version: tls.min_version,
                client_ca_file: tls.client_ca_file,
                require_client_certificate: tls.require_client_certificate,
                allowed_identities: tls.allowed_identities,
                workload_identity: tls.workload_identity,
                mode: tls.mode,
            }),
            policy: listener.policy,
            rate_limit: listener.rate_limit.map(rate_limit_from_proto),
            fault,
            tracing,
            istio_metrics: listener.istio_metrics.map(istio_from_proto),
        })
    }
}

impl From<&RouteConfigSpec> for pb::RouteConfiguration {
    fn from(spec: &RouteConfigSpec) -> Self {
        pb::RouteConfiguration {
            name: spec.name.clone(),
            virtual_hosts: spec
                .virtual_hosts
                .iter()
                .map(|vhost| pb::VirtualHost {
                    name: vhost.name.clone(),
                    domains: vhost.domains.clone(),
                    routes: vhost.routes.iter().map(route_to_proto).collect(),
                })
                .collect(),
        }
    }
}

fn route_to_proto(spec: &RouteSpec) -> pb::Route {
    pb::Route {
        name: spec.name.clone(),
        r#match: spec.matcher.as_ref().map(|m| pb::RouteMatch {
            prefix: m.prefix.clone(),
            exact: m.exact.clone(),
            regex: m.regex.clone(),
            methods: m.methods.clone().unwrap_or_default(),
            source_identities: m.source_identities.clone().unwrap_or_default(),
            headers: m
                .headers
                .iter()
                .flatten()
                .map(header_match_to_proto)
                .collect(),
        }),
        cluster: spec.cluster.clone(),
        weighted_clusters: spec
            .weighted_clusters
            .as_ref()
            .map(|targets| pb::WeightedClusters {
                clusters: targets
                    .iter()
                    .map(|t| pb::WeightedCluster {
                        cluster: t.cluster.clone(),
                        weight: t.weight,
                    })
                    .collect(),
            }),
        direct_response: spec
            .direct_response
            .as_ref()
            .map(|direct| pb::DirectResponse {
                status: u32::from(direct.status),
                body: direct.body.clone(),
            }),
        prefix_rewrite: spec.prefix_rewrite.clone(),
        host_rewrite: spec.host_rewrite.clone(),
        timeout: spec.timeout.map(duration_to_proto),
        request_headers: spec.request_headers.as_ref().map(header_ops_to_proto),
        response_headers: spec.response_headers.as_ref().map(header_ops_to_proto),
        retry_policy: spec.retry_policy.as_ref().map(retry_to_proto),
        fault: spec.fault.as_ref().map(fault_to_proto),
        rate_limit: spec.rate_limit.as_ref().map(rate_limit_to_proto),
        stream_idle_timeout: spec.stream_idle_timeout.map(duration_to_proto),
        policy: spec.policy.clone(),
    }
}

fn header_match_to_proto(h: &HeaderMatchSpec) -> pb::HeaderMatch {
    pb::HeaderMatch {
        name: h.name.clone(),
        exact: h.exact.clone(),
        regex: h.regex.clone(),
        present: h.present,
    }
}

fn header_match_from_proto(h: pb::HeaderMatch) -> HeaderMatchSpec {
    HeaderMatchSpec {
        name: h.name,
        exact: h.exact,
        regex: h.regex,
        present: h.present,
    }
}

fn delay_to_proto(spec: &FaultDelaySpec) -> pb::FaultDelay {
    pb::FaultDelay {
        duration: spec.duration.map(duration_to_proto),
        percent: spec.percent,
    }
}

fn delay_from_proto(check: &mut Checker, at: &str, delay: pb::FaultDelay) -> FaultDelaySpec {
    FaultDelaySpec {
        duration: check.duration(|| format!("{at}.duration"), delay.duration),
        percent: delay.percent,
    }
}

fn fault_to_proto(spec: &FaultSpec) -> pb::Fault {
    pb::Fault {
        delay: spec.delay.as_ref().map(delay_to_proto),
        abort: spec.abort.as_ref().map(|abort| pb::FaultAbort {
            http_status: abort.http_status.map(u32::from),
            grpc_status: abort.grpc_status.clone(),
            percent: abort.percent,
        }),
        headers: spec
            .headers
            .iter()
            .flatten()
            .map(header_match_to_proto)
            .collect(),
        source_identities: spec.source_identities.clone().unwrap_or_default(),
        allow_header_faults: spec.allow_header_faults,
        max_active: spec.max_active,
    }
}

fn fault_from_proto(check: &mut Checker, at: &str, fault: pb::Fault) -> FaultSpec {
    FaultSpec {
        delay: fault
            .delay
            .map(|d| delay_from_proto(check, &format!("{at}.fault.delay"), d)),
        abort: fault.abort.map(|abort| FaultAbortSpec {
            // A status past u16 becomes 0, which the validator refuses.
            http_status: abort.http_status.map(|s| u16::try_from(s).unwrap_or(0)),
            grpc_status: abort.grpc_status,
            percent: abort.percent,
        }),
        headers: non_empty(
            fault
                .headers
                .into_iter()
                .map(header_match_from_proto)
                .collect(),
        ),
        source_identities: non_empty(fault.source_identities),
        allow_header_faults: fault.allow_header_faults,
        max_active: fault.max_active,
    }
}

fn rate_limit_to_proto(spec: &RateLimitSpec) -> pb::RateLimit {
    pb::RateLimit {
        requests_per_second: spec.requests_per_second,
        burst: spec.burst,
        per_client: spec.per_client.as_ref().map(|c| pb::ClientRateLimit {
            requests_per_second: c.requests_per_second,
            burst: c.burst,
            max_clients: c.max_clients,
        }),
    }
}

fn rate_limit_from_proto(limit: pb::RateLimit) -> RateLimitSpec {
    RateLimitSpec {
        requests_per_second: limit.requests_per_second,
        burst: limit.burst,
        per_client: limit.per_client.map(|c| ClientRateLimitSpec {
            requests_per_second: c.requests_per_second,
            burst: c.burst,
            max_clients: c.max_clients,
        }),
    }
}

fn retry_to_proto(spec: &RetryPolicySpec) -> pb::RetryPolicy {
    pb::RetryPolicy {
        num_retries: spec.num_retries,
        retry_on: spec.retry_on.clone().unwrap_or_default(),
        retriable_status_codes: spec
            .retriable_status_codes
            .iter()
            .flatten()
            .map(|c| u32::from(*c))
            .collect(),
        retriable_grpc_statuses: spec.retriable_grpc_statuses.clone().unwrap_or_default(),
        per_try_timeout: spec.per_try_timeout.map(duration_to_proto),
        backoff_base: spec.backoff_base.map(duration_to_proto),
        backoff_max: spec.backoff_max.map(duration_to_proto),
        retry_non_idempotent: spec.retry_non_idempotent,
        max_body_bytes: spec.max_body_bytes,
        budget: spec.budget.as_ref().map(|b| pb::RetryBudget {
            ratio: b.ratio,
            min_per_second: b.min_per_second,
            window: b.window.map(duration_to_proto),
        }),
    }
}

fn retry_from_proto(check: &mut Checker, at: &str, retry: pb::RetryPolicy) -> RetryPolicySpec {
    let field = |name: &str| format!("{at}.retry_policy.{name}");
    let per_try_timeout = check.duration(|| field("per_try_timeout"), retry.per_try_timeout);
    let backoff_base = check.duration(|| field("backoff_base"), retry.backoff_base);
    let backoff_max = check.duration(|| field("backoff_max"), retry.backoff_max);
    // A code past u16 becomes 0, which the validator names as no status.
    let statuses = retry
        .retriable_status_codes
        .into_iter()
        .map(|code| u16::try_from(code).unwrap_or(0))
        .collect();
    let budget = retry.budget.map(|b| RetryBudgetSpec {
        ratio: b.ratio,
        min_per_second: b.min_per_second,
        window: check.duration(|| field("budget.window"), b.window),
    });
    RetryPolicySpec {
        num_retries: retry.num_retries,
        retry_on: non_empty(retry.retry_on),
        retriable_status_codes: non_empty(statuses),
        retriable_grpc_statuses: non_empty(retry.retriable_grpc_statuses),
        per_try_timeout,
        backoff_base,
        backoff_max,
        retry_non_idempotent: retry.retry_non_idempotent,
        max_body_bytes: retry.max_body_bytes,
        budget,
    }
}

fn header_ops_to_proto(spec: &HeaderOpsSpec) -> pb::HeaderOps {
    pb::HeaderOps {
        set: spec.set.clone(),
        add: spec.add.clone(),
        remove: spec.remove.clone(),
    }
}

impl TryFrom<pb::RouteConfiguration> for RouteConfigSpec {
    type Error = ConversionErrors;

    fn try_from(config: pb::RouteConfiguration) -> Result<Self, Self::Error> {
        let mut check = Checker::new("route_config", &config.name);
        let virtual_hosts = config
            .virtual_hosts
            .into_iter()
            .enumerate()
            .map(|(vi, vhost)| VirtualHostSpec {
                name: vhost.name,
                domains: vhost.domains,
                routes: vhost
                    .routes
                    .into_iter()
                    .enumerate()
                    .map(|(ri, route)| route_from_proto(&mut check, vi, ri, route))
                    .collect(),
            })
            .collect();
        check.finish(RouteConfigSpec {
            name: config.name,
            virtual_hosts,
        })
    }
}

fn route_from_proto(check: &mut Checker, vi: usize, ri: usize, route: pb::Route) -> RouteSpec {
    let at = || format!("virtual_hosts[{vi}].routes[{ri}]");
    let direct_response = route.direct_response.map(|direct| DirectResponseSpec {
        status: u16::try_from(direct.status).unwrap_or_else(|_| {
            check.error(
                format!("{}.direct_response.status", at()),
                InvalidValue::StatusOutOfRange(direct.status),
            );
            0
        }),
        body: direct.body,
    });
    let timeout = check.duration(|| format!("{}.timeout", at()), route.timeout);
    let stream_idle_timeout = check.duration(
        || format!("{}.stream_idle_timeout", at()),
        route.stream_idle_timeout,
    );
    RouteSpec {
        stream_idle_timeout,
        policy: route.policy,
        name: route.name,
        matcher: route.r#match.map(|m| RouteMatchSpec {
            prefix: m.prefix,
            exact: m.exact,
            regex: m.regex,
            methods: non_empty(m.methods),
            source_identities: non_empty(m.source_identities),
            headers: non_empty(m.headers.into_iter().map(header_match_from_proto).collect()),
        }),
        cluster: route.cluster,
        weighted_clusters: route.weighted_clusters.map(|split| {
            split
                .clusters
                .into_iter()
                .map(|t| WeightedClusterSpec {
                    cluster: t.cluster,
                    weight: t.weight,
                })
                .collect()
        }),
        direct_response,
        prefix_rewrite: route.prefix_rewrite,
        host_rewrite: route.host_rewrite,
        timeout,
        request_headers: route.request_headers.map(header_ops_from_proto),
        response_headers: route.response_headers.map(header_ops_from_proto),
        retry_policy: route
            .retry_policy
            .map(|retry| retry_from_proto(check, &at(), retry)),
        fault: route
            .fault
            .map(|fault| fault_from_proto(check, &at(), fault)),
        rate_limit: route.rate_limit.map(rate_limit_from_proto),
    }
}

fn header_ops_from_proto(ops: pb::HeaderOps) -> HeaderOpsSpec {
    HeaderOpsSpec {
        set: ops.set,
        add: ops.add,
        remove: ops.remove,
    }
}

impl From<&ClusterSpec> for pb::Cluster {
    fn from(spec: &ClusterSpec) -> Self {
        pb::Cluster {
            name: spec.name.clone(),
            protocol: spec.protocol.clone(),
            lb: spec.lb.clone(),
            connect_timeout: spec.connect_timeout.map(duration_to_proto),
            dns_refresh: spec.dns_refresh.map(duration_to_proto),
            pool: spec.pool.as_ref().map(|pool| pb::Pool {
                idle_timeout: pool.idle_timeout.map(duration_to_proto),
                max_idle_per_endpoint: pool.max_idle_per_endpoint,
            }),
            endpoints: spec
                .endpoints
                .iter()
                .map(|endpoint| pb::Endpoint {
                    address: endpoint.address.clone(),
                    weight: endpoint.weight,
                })
                .collect(),
            circuit_breakers: spec.circuit_breakers.as_ref().map(|b| pb::CircuitBreakers {
                max_requests: b.max_requests,
                max_retries: b.max_retries,
                max_connections: b.max_connections,
                max_pending_requests: b.max_pending_requests,
            }),
            outlier_detection: spec
                .outlier_detection
                .as_ref()
                .map(|o| pb::OutlierDetection {
                    consecutive_5xx: o.consecutive_5xx,
                    consecutive_gateway_errors: o.consecutive_gateway_errors,
                    base_ejection_time: o.base_ejection_time.map(duration_to_proto),
                    max_ejection_time: o.max_ejection_time.map(duration_to_proto),
                    max_ejection_percent: o.max_ejection_percent,
                    panic_threshold: o.panic_threshold,
                    success_rate: o.success_rate.as_ref().map(|r| pb::SuccessRate {
                        interval: r.interval.map(duration_to_proto),
                        minimum_hosts: r.minimum_hosts,
                        request_volume: r.request_volume,
                        stdev_factor: r.stdev_factor,
                    }),
                }),
            health_check: spec.health_check.as_ref().map(|h| pb::HealthCheck {
                http: h.http.as_ref().map(|http| pb::HttpHealthCheck {
                    path: http.path.clone(),
                    host: http.host.clone(),
                    expected_statuses: http.expected_statuses.clone(),
                }),
                tcp: h.tcp.as_ref().map(|_| pb::TcpHealthCheck {}),
                grpc: h.grpc.as_ref().map(|grpc| pb::GrpcHealthCheck {
                    service: grpc.service.clone(),
                    authority: grpc.authority.clone(),
                }),
                interval: h.interval.map(duration_to_proto),
                interval_jitter: h.interval_jitter.map(duration_to_proto),
                timeout: h.timeout.map(duration_to_proto),
                healthy_threshold: h.healthy_threshold,
                unhealthy_threshold: h.unhealthy_threshold,
            }),
            tls: spec.tls.as_ref().map(|tls| pb::ClusterTls {
                ca_file: tls.ca_file.clone().unwrap_or_default(),
                workload_identity: tls.workload_identity.clone(),
                cert_file: tls.cert_file.clone(),
                key_file: tls.key_file.clone(),
                server_identity: tls.server_identity.clone(),
                server_name: tls.server_name.clone(),
            }),
        }
    }
}

impl TryFrom<pb::Cluster> for ClusterSpec {
    type Error = ConversionErrors;

    fn try_from(cluster: pb::Cluster) -> Result<Self, Self::Error> {
        let mut check = Checker::new("cluster", &cluster.name);
        let connect_timeout = check.duration(|| "connect_timeout".into(), cluster.connect_timeout);
        let dns_refresh = check.duration(|| "dns_refresh".into(), cluster.dns_refresh);
        let pool = cluster.pool.map(|pool| PoolSpec {
            idle_timeout: check.duration(|| "pool.idle_timeout".into(), pool.idle_timeout),
            max_idle_per_endpoint: pool.max_idle_per_endpoint,
        });
        let outlier_detection = cluster.outlier_detection.map(|o| OutlierDetectionSpec {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway_errors: o.consecutive_gateway_errors,
            base_ejection_time: check.duration(
                || "outlier_detection.base_ejection_time".into(),
                o.base_ejection_time,
            ),
            max_ejection_time: check.duration(
                || "outlier_detection.max_ejection_time".into(),
                o.max_ejection_time,
            ),
            max_ejection_percent: o.max_ejection_percent,
            panic_threshold: o.panic_threshold,
            success_rate: o.success_rate.map(|r| SuccessRateSpec {
                interval: check.duration(
                    || "outlier_detection.success_rate.interval".into(),
                    r.interval,
                ),
                minimum_hosts: r.minimum_hosts,
                request_volume: r.request_volume,
                stdev_factor: r.stdev_factor,
            }),
        });
        let health_check = cluster.health_check.map(|h| HealthCheckSpec {
            http: h.http.map(|http| HttpHealthCheckSpec {
                path: http.path,
                host: http.host,
                expected_statuses: http.expected_statuses,
            }),
            tcp: h.tcp.map(|_| TcpHealthCheckSpec {}),
            grpc: h.grpc.map(|grpc| GrpcHealthCheckSpec {
                service: grpc.service,
                authority: grpc.authority,
            }),
            interval: check.duration(|| "health_check.interval".into(), h.interval),
            interval_jitter: check
                .duration(|| "health_check.interval_jitter".into(), h.interval_jitter),
            timeout: check.duration(|| "health_check.timeout".into(), h.timeout),
            healthy_threshold: h.healthy_threshold,
            unhealthy_threshold: h.unhealthy_threshold,
        });
        check.finish(ClusterSpec {
            name: cluster.name,
            protocol: cluster.protocol,
            lb: cluster.lb,
            connect_timeout,
            dns_refresh,
            pool,
            endpoints: cluster
                .endpoints
                .into_iter()
                .map(|endpoint| EndpointSpec {
                    address: endpoint.address,
                    weight: endpoint.weight,
                })
                .collect(),
            outlier_detection,
            health_check,
            circuit_breakers: cluster.circuit_breakers.map(|b| CircuitBreakersSpec {
                max_requests: b.max_requests,
                max_retries: b.max_retries,
                max_connections: b.max_connections,
                max_pending_requests: b.max_pending_requests,
            }),
            tls: cluster.tls.map(|tls| ClusterTlsSpec {
                ca_file: Some(tls.ca_file).filter(|f| !f.is_empty()),
                workload_identity: tls.workload_identity,
                cert_file: tls.cert_file,
                key_file: tls.key_file,
                server_identity: tls.server_identity,
                server_name: tls.server_name,
            }),
        })
    }
}

#[cfg(test)]
mod tests;
