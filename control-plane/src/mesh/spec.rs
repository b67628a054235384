//! The serde shapes of a mesh directory's files. Nothing here is checked
//! beyond its syntax; `validate` reports every problem with its file,
//! resource and field.
//!
//! As in the proxy's spec, enum-like fields (`protocol`, `lb`) are plain
//! strings so that a bad value is reported with the resource that holds it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weft_proxy::config::RouteMatchSpec;

/// One file of a mesh directory. Both lists are optional.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeshFileSpec {
    /// The mesh's SPIFFE trust domain (`example.org`). With one, every
    /// workload and gateway has an identity,
    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`, whose
    /// certificate the control plane's CA signs, and calls between
    /// sidecars use mutual TLS (see `mtls`). Set in at most one file.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Services and their workloads.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Ingress gateways.
    #[serde(default)]
    pub gateways: Vec<GatewaySpec>,
    /// Rego policies (the proxy's `policies`; `rego_files` and `data_file`
    /// name files in the mesh directory). Services, gateway listeners and
    /// gateway routes name them in `policy`.
    #[serde(default)]
    pub policies: Vec<weft_proxy::config::PolicySpec>,
    /// Distributed tracing for every proxy of the mesh (the proxy's
    /// listener `tracing`, without `service_name`: each sidecar reports as
    /// its service, each gateway as itself). Set in at most one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<weft_proxy::config::TracingSpec>,
    /// Istio's standard metrics on every listener of the mesh, labelled
    /// from the mesh's services, workloads and identities. Set in at most
    /// one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio_metrics: Option<MeshIstioMetricsSpec>,
}

/// The mesh's Istio metrics: what is not derived from the mesh.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeshIstioMetricsSpec {
    /// The `source_cluster` / `destination_cluster` label of every
    /// workload (default `unknown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// Series per listener at most (the proxy's default, 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_series: Option<u32>,
}

/// A service: a name callers use as the host, and the workloads serving it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// DNS label (`[a-z0-9-]`, at most 63 characters); callers send it as
    /// the `Host`.
    pub name: String,
    /// How the application speaks: `http1` (default), `http2` (gRPC) or
    /// `tcp` (an opaque byte stream: a database, a broker), which its
    /// workloads' sidecars take on a TCP inbound listener and callers
    /// reach on their workloads' `tcp_outbound` listeners. Routes,
    /// retries, timeouts, faults and rate limits are HTTP's.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Default whole-request deadline for calls to this service.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Retries of calls to this service (the proxy's `retry_policy`),
    /// applied by every caller's sidecar and gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<weft_proxy::config::RetryPolicySpec>,
    /// Passive health checking of its workloads (the proxy's
    /// `outlier_detection`), in every caller's clusters for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<weft_proxy::config::OutlierDetectionSpec>,
    /// Limits of its callers' clusters for it (the proxy's
    /// `circuit_breakers`; its defaults otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breakers: Option<weft_proxy::config::CircuitBreakersSpec>,
    /// Faults injected into calls to this service (the proxy's route
    /// `fault`), by every caller's sidecar and gateway, on every route
    /// that sets none of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<weft_proxy::config::FaultSpec>,
    /// Faults injected into connections to a `tcp` service (the proxy's
    /// TCP listener `fault`: resets and delays), by every caller's sidecar
    /// and gateway on its TCP listener for the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_fault: Option<weft_proxy::config::TcpFaultSpec>,
    /// A request rate limit on each of its workloads' inbound listeners
    /// (the proxy's listener `rate_limit`; `per_client` buckets are per
    /// caller identity under mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<weft_proxy::config::RateLimitSpec>,
    /// The policy every call to its workloads must pass, checked by each
    /// workload's sidecar on its inbound listener (where the caller's
    /// identity is known under mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Callers cut a response from it that sends nothing for this long
    /// (the proxy's route `stream_idle_timeout`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub stream_idle_timeout: Option<Duration>,
    /// Active health checks of its workloads (the proxy's `health_check`),
    /// run by every caller's sidecar and gateway against the workloads'
    /// inbound ports, over the mesh's mutual TLS when it has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<weft_proxy::config::HealthCheckSpec>,
    /// Deadline for a TCP connect to one of its workloads.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// `round_robin` (default), `random` or `least_request`.
    #[serde(default)]
    pub lb: Option<String>,
    /// The instances of the service, each with its own sidecar.
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Services this service may call through its sidecars.
    #[serde(default)]
    pub calls: Vec<String>,
    /// How calls to this service are routed; first match wins. Empty: every
    /// request goes to every workload.
    #[serde(default)]
    pub routes: Vec<ServiceRouteSpec>,
    /// The namespace part of its identity (default `default`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The service-account part of its identity (default: the service's
    /// name).
    #[serde(default)]
    pub service_account: Option<String>,
    /// Inbound mutual TLS, with a `trust_domain`: `strict` (the default:
    /// only callers with a certificate from the mesh's CA), `permissive`
    /// (plaintext callers too, for migrating; mesh callers still use
    /// mTLS) or `disable` (cleartext).
    #[serde(default)]
    pub mtls: Option<String>,
}

/// One instance of a service and its sidecar.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// The node id of the workload's sidecar proxy; unique across the mesh.
    pub name: String,
    /// Label that routes select (`version:`, `split:`).
    #[serde(default)]
    pub version: Option<String>,
    /// `IP:PORT` of the application; the inbound listener forwards here.
    pub app: String,
    /// `IP:PORT` of the sidecar's inbound listener; the mesh sends this
    /// workload's traffic here.
    pub inbound: String,
    /// `IP:PORT` of the sidecar's outbound listener, where the application
    /// calls other services with `Host: <service>`. Without it the sidecar
    /// has no outbound listener.
    #[serde(default)]
    pub outbound: Option<String>,
    /// For each `tcp` service this workload's service calls, the `IP:PORT`
    /// of a listener of its sidecar where the application connects to
    /// reach that service (a TCP service has no `Host` to route by, so
    /// each gets a port of its own).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tcp_outbound: BTreeMap<String, String>,
}

/// One route of a service, applied by every caller's sidecar.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRouteSpec {
    /// Unique within the service; a metrics label.
    pub name: String,
    /// Which requests the route takes (the proxy's match); absent matches
    /// everything.
    #[serde(default, rename = "match")]
    pub matcher: Option<RouteMatchSpec>,
    /// Send to the workloads of this version.
    #[serde(default)]
    pub version: Option<String>,
    /// Or split across versions by weight. Neither: every workload.
    #[serde(default)]
    pub split: Option<BTreeMap<String, u32>>,
    /// Overrides the service's `timeout`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Replace the matched path prefix (or the whole exact path).
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Faults injected on this route (overrides the service's `fault`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<weft_proxy::config::FaultSpec>,
}

/// An ingress gateway: a proxy of its own, in front of the mesh.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    /// The node id of the gateway proxy; unique across the mesh.
    pub name: String,
    /// Its HTTP listeners.
    pub listeners: Vec<GatewayListenerSpec>,
    /// The namespace part of its identity (default `default`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The service-account part of its identity (default: its name).
    #[serde(default)]
    pub service_account: Option<String>,
}

/// One listener of a gateway: HTTP, routed by `routes`, or TCP, every
/// connection to one `tcp` service.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayListenerSpec {
    /// Unique within the gateway.
    pub name: String,
    /// `IP:PORT`; port 0 picks a free port.
    pub address: String,
    /// `http` (default) or `tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// HTTP: first match wins.
    #[serde(default)]
    pub routes: Vec<GatewayRouteSpec>,
    /// TCP: the `tcp` service every connection goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// A request rate limit for the whole listener (the proxy's listener
    /// `rate_limit`), before routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<weft_proxy::config::RateLimitSpec>,
    /// The policy every request must pass, before routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// One route of a gateway listener.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRouteSpec {
    /// Unique within the listener; a metrics label.
    pub name: String,
    /// Request hosts this route applies to: `example.com`, `*.example.com`
    /// or `*` (default `["*"]`).
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    /// Which requests the route takes; absent matches everything.
    #[serde(default, rename = "match")]
    pub matcher: Option<RouteMatchSpec>,
    /// The service to send to.
    pub service: String,
    /// Only to the workloads of this version.
    #[serde(default)]
    pub version: Option<String>,
    /// Or split across versions by weight. Neither: every workload.
    #[serde(default)]
    pub split: Option<BTreeMap<String, u32>>,
    /// Overrides the service's `timeout`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Replace the matched path prefix (or the whole exact path).
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Replace the host sent to the service.
    #[serde(default)]
    pub host_rewrite: Option<String>,
    /// Faults injected on this route (overrides the service's `fault`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<weft_proxy::config::FaultSpec>,
    /// The route's request rate limit (the proxy's route `rate_limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<weft_proxy::config::RateLimitSpec>,
    /// The policy the route's requests must pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}
