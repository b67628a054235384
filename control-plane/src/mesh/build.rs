//! The per-node resource builder: turns a validated [`Mesh`] into each
//! proxy's listeners, route configurations and clusters, as proxy spec
//! structs, checks each node's whole configuration with the proxy's
//! validator, and converts it to protos.
//!
//! Names a node receives:
//! - sidecar: listeners `inbound` (and `outbound`), route configurations of
//!   the same names, cluster `local_app` (the application; `_` cannot occur
//!   in a service name, so it never collides), and per called service a
//!   cluster `<service>` (every workload's inbound address) and
//!   `<service>.<version>` subsets, only those its routes use. A `tcp`
//!   service's `inbound` is a TCP listener (no route configuration), and
//!   each TCP service a workload calls gets a TCP listener
//!   `outbound.<service>` at its `tcp_outbound` address.
//! - gateway: one listener and one route configuration per gateway
//!   listener, named after it, and the service clusters its routes use; a
//!   `tcp` gateway listener is a TCP listener to its service's cluster,
//!   with no route configuration.
//!
//! Everything is built in a fixed order from sorted maps, so the same mesh
//! always gives byte-identical resources and therefore identical versions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use weft_proto::config::v1 as pb;
use weft_proxy::config::{
    BootstrapSpec, ClusterSpec, ClusterTlsSpec, Config, EndpointSpec, IstioMetricsSpec,
    IstioWorkloadSpec, ListenerSpec, ListenerTlsSpec, PolicySpec, RouteConfigSpec, RouteMatchSpec,
    RouteSpec, TracingSpec, VirtualHostSpec, WeightedClusterSpec,
};

use super::spec::{
    GatewayListenerSpec, GatewayRouteSpec, GatewaySpec, MeshIstioMetricsSpec, ServiceSpec,
    WorkloadSpec,
};
use super::validate::TCP;
use super::{Mesh, MeshError, MeshErrors};
use crate::resources::{MeshSnapshot, NodeEntry, NodeResources};

/// The sidecar's cluster for its own application.
pub(super) const LOCAL_APP_CLUSTER: &str = "local_app";
/// Sidecar listener and route configuration names.
pub(super) const INBOUND: &str = "inbound";
/// Sidecar listener and route configuration names.
pub(super) const OUTBOUND: &str = "outbound";

/// Where a route sends requests.
enum Target<'a> {
    /// Every workload of the service.
    All,
    /// The workloads of one version.
    Version(&'a str),
    /// Weighted across versions.
    Split(&'a BTreeMap<String, u32>),
}

impl<'a> Target<'a> {
    fn new(version: Option<&'a str>, split: Option<&'a BTreeMap<String, u32>>) -> Self {
        match (version, split) {
            (Some(version), _) => Target::Version(version),
            (None, Some(split)) => Target::Split(split),
            (None, None) => Target::All,
        }
    }
}

/// One node's configuration while it is being assembled.
#[derive(Default)]
struct NodeSpec {
    listeners: Vec<ListenerSpec>,
    route_configs: Vec<RouteConfigSpec>,
    clusters: BTreeMap<String, ClusterSpec>,
    /// The policies its listeners and routes name.
    policies: BTreeMap<String, PolicySpec>,
    /// The mesh's trust domain, if it has identities.
    trust_domain: Option<String>,
    /// This node's own SPIFFE ID (with a trust domain).
    identity: Option<String>,
}

/// The SPIFFE ID of a service account.
fn spiffe_id(trust_domain: &str, namespace: Option<&str>, service_account: &str) -> String {
    format!(
        "spiffe://{trust_domain}/ns/{}/sa/{service_account}",
        namespace.unwrap_or(DEFAULT_NAMESPACE)
    )
}

/// The namespace of services and gateways that name none.
const DEFAULT_NAMESPACE: &str = "default";

/// A service's identity, if the mesh has a trust domain.
fn service_identity(trust_domain: Option<&str>, service: &ServiceSpec) -> Option<String> {
    trust_domain.map(|domain| {
        spiffe_id(
            domain,
            service.namespace.as_deref(),
            service.service_account.as_deref().unwrap_or(&service.name),
        )
    })
}

/// Whether calls to `service` use mutual TLS: the mesh has identities and
/// the service does not disable it.
fn uses_mtls(trust_domain: Option<&str>, service: &ServiceSpec) -> bool {
    trust_domain.is_some() && service.mtls.as_deref() != Some("disable")
}

impl NodeSpec {
    fn new(trust_domain: Option<&str>, identity: Option<String>) -> Self {
        Self {
            trust_domain: trust_domain.map(str::to_owned),
            identity,
            ..Self::default()
        }
    }

    /// Points `route` at `target` of `service`, adding the clusters it needs.
    fn target(&mut self, route: &mut RouteSpec, service: &ServiceSpec, target: &Target<'_>) {
        match target {
            Target::All => route.cluster = Some(self.service_cluster(service, None)),
            Target::Version(version) => {
                route.cluster = Some(self.service_cluster(service, Some(version)));
            }
            Target::Split(split) => {
                route.weighted_clusters = Some(
                    split
                        .iter()
                        .map(|(version, weight)| WeightedClusterSpec {
                            cluster: self.service_cluster(service, Some(version)),
                            weight: *weight,
                        })
                        .collect(),
                );
            }
        }
    }

    /// Attaches (once) the policy `name` to this node and returns its
    /// name, for a listener's or route's `policy`.
    fn policy(&mut self, name: Option<&String>, policies: &Policies<'_>) -> Option<String> {
        let name = name?;
        // Validation guarantees every reference resolves.
        if let Some(policy) = policies.get(name.as_str()) {
            self.policies
                .entry(name.clone())
                .or_insert_with(|| (*policy).clone());
        }
        Some(name.clone())
    }

    /// Adds (once) the cluster of a service's workloads, or of one version
    /// of them, and returns its name.
    fn service_cluster(&mut self, service: &ServiceSpec, version: Option<&str>) -> String {
        let name = match version {
            Some(version) => format!("{}.{version}", service.name),
            None => service.name.clone(),
        };
        self.clusters.entry(name.clone()).or_insert_with(|| {
            let endpoints = service
                .workloads
                .iter()
                .filter(|w| version.is_none() || w.version.as_deref() == version)
                .map(|w| EndpointSpec {
                    address: w.inbound.clone(),
                    weight: None,
                })
                .collect();
            let mut spec = cluster(name.clone(), service, endpoints);
            spec.outlier_detection
                .clone_from(&service.outlier_detection);
            spec.circuit_breakers.clone_from(&service.circuit_breakers);
            spec.health_check.clone_from(&service.health_check);
            // Mutual TLS to the service's sidecars: this node's certificate,
            // and theirs must prove the service's identity.
            let domain = self.trust_domain.as_deref();
            if uses_mtls(domain, service) {
                spec.tls = Some(ClusterTlsSpec {
                    workload_identity: self.identity.clone(),
                    server_identity: service_identity(domain, service),
                    ..ClusterTlsSpec::default()
                });
                // HTTP/1.1 from the application crosses the mesh hop as
                // multiplexed HTTP/2 (ALPN h2), and back to HTTP/1.1 at
                // the callee's sidecar; upgrades keep HTTP/1.1.
                if !is_tcp(service) && matches!(spec.protocol.as_deref(), None | Some("http1")) {
                    spec.protocol = Some("auto".into());
                }
            }
            spec
        });
        name
    }

    fn finish(
        self,
        file: &Arc<str>,
        node: &str,
        errors: &mut Vec<MeshError>,
    ) -> Option<NodeResources> {
        let spec = BootstrapSpec {
            listeners: self.listeners,
            route_configs: self.route_configs,
            clusters: self.clusters.into_values().collect(),
            policies: self.policies.into_values().collect(),
            ..BootstrapSpec::default()
        };
        if let Err(rejected) = Config::try_from(spec.clone()) {
            errors.extend(rejected.0.into_iter().map(|error| MeshError::Node {
                file: file.clone(),
                node: node.to_owned(),
                error,
            }));
            return None;
        }
        Some(
            NodeResources::new(
                spec.listeners.iter().map(pb::Listener::from).collect(),
                spec.route_configs
                    .iter()
                    .map(pb::RouteConfiguration::from)
                    .collect(),
                spec.clusters.iter().map(pb::Cluster::from).collect(),
            )
            .with_policies(spec.policies.iter().map(pb::Policy::from).collect()),
        )
    }
}

/// The mesh's policies by name, their files inlined.
type Policies<'a> = BTreeMap<&'a str, &'a PolicySpec>;

pub(super) fn snapshot(mesh: &Mesh) -> Result<MeshSnapshot, MeshErrors> {
    let services: BTreeMap<&str, &ServiceSpec> = mesh
        .services
        .iter()
        .map(|s| (s.spec.name.as_str(), &s.spec))
        .collect();
    let policies: Policies<'_> = mesh
        .policies
        .iter()
        .map(|p| (p.spec.spec.name.as_str(), &p.spec.spec))
        .collect();
    let mut errors = Vec::new();
    let mut snapshot = MeshSnapshot {
        trust_domain: mesh.trust_domain().map(str::to_owned),
        ..MeshSnapshot::default()
    };
    let domain = mesh.trust_domain();
    let istio = mesh
        .istio_metrics()
        .map(|settings| IstioLabels::new(mesh, settings));
    for service in &mesh.services {
        let identity = service_identity(domain, &service.spec);
        for workload in &service.spec.workloads {
            let mut node = sidecar(
                &service.spec,
                workload,
                &services,
                &policies,
                domain,
                identity.clone(),
            );
            traced(
                &mut node,
                mesh.tracing(),
                &service.spec.name,
                &workload.name,
            );
            if let Some(istio) = &istio {
                istio.label(
                    &mut node,
                    &service_workload(&service.spec, workload.version.as_deref()),
                );
            }
            if let Some(resources) = node.finish(&service.file, &workload.name, &mut errors) {
                snapshot.nodes.insert(
                    workload.name.clone(),
                    NodeEntry {
                        service: Some(service.spec.name.clone()),
                        identity: identity.clone(),
                        resources: Arc::new(resources),
                    },
                );
            }
        }
    }
    for gateway in &mesh.gateways {
        let identity = domain.map(|domain| {
            spiffe_id(
                domain,
                gateway.spec.namespace.as_deref(),
                gateway
                    .spec
                    .service_account
                    .as_deref()
                    .unwrap_or(&gateway.spec.name),
            )
        });
        let mut node = NodeSpec::new(domain, identity.clone());
        for listener in &gateway.spec.listeners {
            gateway_listener(&mut node, listener, &services, &policies);
        }
        traced(
            &mut node,
            mesh.tracing(),
            &gateway.spec.name,
            &gateway.spec.name,
        );
        if let Some(istio) = &istio {
            istio.label(&mut node, &gateway_workload(&gateway.spec));
        }
        if let Some(resources) = node.finish(&gateway.file, &gateway.spec.name, &mut errors) {
            snapshot.nodes.insert(
                gateway.spec.name.clone(),
                NodeEntry {
                    service: None,
                    identity,
                    resources: Arc::new(resources),
                },
            );
        }
    }
    if errors.is_empty() {
        Ok(snapshot)
    } else {
        Err(MeshErrors(errors))
    }
}

/// A service's workloads of one version (all of them, for `None`) as
/// Istio's labels name a workload: `<service>-<version>`, like one
/// Kubernetes Deployment per version.
fn service_workload(service: &ServiceSpec, version: Option<&str>) -> IstioWorkloadSpec {
    let namespace = service
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_owned();
    IstioWorkloadSpec {
        name: Some(match version {
            Some(version) => format!("{}-{version}", service.name),
            None => service.name.clone(),
        }),
        service: Some(format!("{}.{namespace}", service.name)),
        namespace: Some(namespace),
        app: Some(service.name.clone()),
        version: version.map(str::to_owned),
    }
}

/// A gateway as Istio's labels name a workload: its name, as workload and
/// app.
fn gateway_workload(gateway: &GatewaySpec) -> IstioWorkloadSpec {
    IstioWorkloadSpec {
        name: Some(gateway.name.clone()),
        namespace: Some(
            gateway
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
        ),
        app: Some(gateway.name.clone()),
        version: None,
        service: None,
    }
}

/// The one version every workload of `service` has, if they agree.
fn only_version(service: &ServiceSpec) -> Option<&str> {
    let first = service.workloads.first()?.version.as_deref()?;
    service
        .workloads
        .iter()
        .all(|w| w.version.as_deref() == Some(first))
        .then_some(first)
}

/// What the mesh's Istio metrics say about every party: callers by
/// identity, callees by cluster name.
struct IstioLabels {
    settings: MeshIstioMetricsSpec,
    /// Each service's and gateway's identity (with a trust domain). A
    /// service account shared by several services is named after the
    /// first.
    sources: BTreeMap<String, IstioWorkloadSpec>,
    /// Each service's clusters: `<service>` and `<service>.<version>`.
    destinations: BTreeMap<String, IstioWorkloadSpec>,
}

impl IstioLabels {
    fn new(mesh: &Mesh, settings: &MeshIstioMetricsSpec) -> Self {
        let domain = mesh.trust_domain();
        let mut sources = BTreeMap::new();
        let mut destinations = BTreeMap::new();
        for service in mesh.services() {
            let service = &service.spec;
            if let Some(identity) = service_identity(domain, service) {
                sources
                    .entry(identity)
                    .or_insert_with(|| service_workload(service, only_version(service)));
            }
            destinations.insert(
                service.name.clone(),
                service_workload(service, only_version(service)),
            );
            let versions: BTreeSet<&str> = service
                .workloads
                .iter()
                .filter_map(|w| w.version.as_deref())
                .collect();
            for version in versions {
                destinations.insert(
                    format!("{}.{version}", service.name),
                    service_workload(service, Some(version)),
                );
            }
        }
        for gateway in mesh.gateways() {
            let gateway = &gateway.spec;
            if let Some(domain) = domain {
                let identity = spiffe_id(
                    domain,
                    gateway.namespace.as_deref(),
                    gateway.service_account.as_deref().unwrap_or(&gateway.name),
                );
                sources
                    .entry(identity)
                    .or_insert_with(|| gateway_workload(gateway));
            }
        }
        Self {
            settings: settings.clone(),
            sources,
            destinations,
        }
    }

    /// Sets Istio metrics on every listener of a node standing for `own`:
    /// a sidecar's inbound listener reports as the destination, with the
    /// mesh's callers; every other listener as the source, with the
    /// clusters the node has.
    fn label(&self, node: &mut NodeSpec, own: &IstioWorkloadSpec) {
        for listener in &mut node.listeners {
            let inbound = listener.name == INBOUND;
            let spec = if inbound {
                IstioMetricsSpec {
                    reporter: Some("destination".into()),
                    sources: Some(self.sources.clone()).filter(|s| !s.is_empty()),
                    ..IstioMetricsSpec::default()
                }
            } else {
                let destinations: BTreeMap<_, _> = node
                    .clusters
                    .keys()
                    .filter_map(|name| Some((name.clone(), self.destinations.get(name)?.clone())))
                    .collect();
                IstioMetricsSpec {
                    reporter: Some("source".into()),
                    destinations: Some(destinations).filter(|d| !d.is_empty()),
                    ..IstioMetricsSpec::default()
                }
            };
            listener.istio_metrics = Some(IstioMetricsSpec {
                workload: Some(own.clone()),
                cluster_id: self.settings.cluster_id.clone(),
                max_series: self.settings.max_series,
                ..spec
            });
        }
    }
}

/// Sets the mesh's tracing on every listener of a node: its spans report
/// as `service` (`service.name`) from `node` (`service.instance.id`).
fn traced(node: &mut NodeSpec, tracing: Option<&TracingSpec>, service: &str, node_id: &str) {
    let Some(tracing) = tracing else {
        return;
    };
    let mut attributes = tracing.resource_attributes.clone().unwrap_or_default();
    attributes.insert("service.instance.id".into(), node_id.into());
    let spec = TracingSpec {
        service_name: Some(service.into()),
        resource_attributes: Some(attributes),
        ..tracing.clone()
    };
    for listener in &mut node.listeners {
        listener.tracing = Some(spec.clone());
    }
}

fn sidecar(
    service: &ServiceSpec,
    workload: &WorkloadSpec,
    services: &BTreeMap<&str, &ServiceSpec>,
    policies: &Policies<'_>,
    trust_domain: Option<&str>,
    identity: Option<String>,
) -> NodeSpec {
    let mut node = NodeSpec::new(trust_domain, identity.clone());
    let mut inbound = if is_tcp(service) {
        tcp_listener(INBOUND, &workload.inbound, LOCAL_APP_CLUSTER)
    } else {
        let mut http = http_listener(INBOUND, &workload.inbound, Side::Sidecar);
        http.rate_limit.clone_from(&service.rate_limit);
        http
    };
    inbound.policy = node.policy(service.policy.as_ref(), policies);
    if uses_mtls(trust_domain, service) {
        // Strict: only callers with a certificate from the mesh's CA;
        // permissive: plaintext callers too (while they migrate). Callers'
        // sidecars use mTLS either way.
        inbound.tls = Some(ListenerTlsSpec {
            workload_identity: identity,
            mode: (service.mtls.as_deref() == Some("permissive")).then(|| "permissive".into()),
            ..ListenerTlsSpec::default()
        });
    }
    let inbound_is_http = inbound.cluster.is_none();
    node.listeners.push(inbound);
    if inbound_is_http {
        node.route_configs.push(inbound_routes());
    }
    node.clusters.insert(
        LOCAL_APP_CLUSTER.into(),
        cluster(
            LOCAL_APP_CLUSTER.into(),
            service,
            vec![EndpointSpec {
                address: workload.app.clone(),
                weight: None,
            }],
        ),
    );

    if let Some(outbound) = &workload.outbound {
        let mut virtual_hosts = Vec::new();
        for callee in &service.calls {
            // Validation guarantees every callee exists.
            let Some(callee) = services.get(callee.as_str()) else {
                continue;
            };
            if is_tcp(callee) {
                continue;
            }
            virtual_hosts.push(callee_routes(&mut node, callee));
        }
        node.listeners
            .push(http_listener(OUTBOUND, outbound, Side::Sidecar));
        node.route_configs.push(RouteConfigSpec {
            name: OUTBOUND.into(),
            virtual_hosts,
        });
    }

    // Each TCP service called gets a listener of its own.
    for (callee, address) in &workload.tcp_outbound {
        // Validation guarantees it is a called TCP service.
        let Some(callee) = services.get(callee.as_str()) else {
            continue;
        };
        let cluster = node.service_cluster(callee, None);
        let mut listener = tcp_listener(&format!("{OUTBOUND}.{}", callee.name), address, &cluster);
        listener.fault.clone_from(&callee.tcp_fault);
        node.listeners.push(listener);
    }
    node
}

/// The inbound listener's routes: every request to the application.
fn inbound_routes() -> RouteConfigSpec {
    RouteConfigSpec {
        name: INBOUND.into(),
        virtual_hosts: vec![VirtualHostSpec {
            name: "local".into(),
            // Whatever host the caller used, the request is for this app.
            domains: vec!["*".into()],
            routes: vec![RouteSpec {
                // The caller's proxy (sidecar or gateway) enforces the
                // route's deadline; a second one here could only cut a
                // request short that the caller allowed to run longer.
                timeout: Some(Duration::ZERO),
                cluster: Some(LOCAL_APP_CLUSTER.into()),
                ..route(LOCAL_APP_CLUSTER, None)
            }],
        }],
    }
}

/// A caller's virtual host for an HTTP service: the service's routes,
/// or one route to every workload.
fn callee_routes(node: &mut NodeSpec, callee: &ServiceSpec) -> VirtualHostSpec {
    let mut routes = Vec::new();
    if callee.routes.is_empty() {
        let mut spec = route("default", None);
        spec.timeout = callee.timeout;
        spec.retry_policy.clone_from(&callee.retries);
        spec.fault.clone_from(&callee.fault);
        spec.stream_idle_timeout = callee.stream_idle_timeout;
        node.target(&mut spec, callee, &Target::All);
        routes.push(spec);
    }
    for r in &callee.routes {
        let mut spec = route(&r.name, r.matcher.clone());
        spec.timeout = r.timeout.or(callee.timeout);
        spec.retry_policy.clone_from(&callee.retries);
        spec.fault = r.fault.clone().or_else(|| callee.fault.clone());
        spec.stream_idle_timeout = callee.stream_idle_timeout;
        spec.prefix_rewrite.clone_from(&r.prefix_rewrite);
        let target = Target::new(r.version.as_deref(), r.split.as_ref());
        node.target(&mut spec, callee, &target);
        routes.push(spec);
    }
    VirtualHostSpec {
        name: callee.name.clone(),
        domains: vec![callee.name.clone()],
        routes,
    }
}

fn gateway_listener(
    node: &mut NodeSpec,
    listener: &GatewayListenerSpec,
    services: &BTreeMap<&str, &ServiceSpec>,
    policies: &Policies<'_>,
) {
    if listener.protocol.as_deref() == Some(TCP) {
        // Validation guarantees a tcp service.
        let Some(service) = listener.service.as_deref().and_then(|s| services.get(s)) else {
            return;
        };
        let cluster = node.service_cluster(service, None);
        let mut spec = tcp_listener(&listener.name, &listener.address, &cluster);
        spec.policy = node.policy(listener.policy.as_ref(), policies);
        spec.fault.clone_from(&service.tcp_fault);
        node.listeners.push(spec);
        return;
    }
    // The proxy picks a virtual host by the request's host first, then the
    // first matching route within it. To keep the gateway's "first route
    // that matches host and request wins" across routes with different
    // hosts, every distinct host pattern gets a virtual host holding, in
    // order, every route whose hosts cover it.
    let hosts: Vec<BTreeSet<String>> = listener.routes.iter().map(route_hosts).collect();
    let domains: BTreeSet<&String> = hosts.iter().flatten().collect();
    let mut virtual_hosts = Vec::new();
    for domain in domains {
        let mut routes = Vec::new();
        for (r, patterns) in listener.routes.iter().zip(&hosts) {
            if !patterns.iter().any(|p| covers(p, domain)) {
                continue;
            }
            let Some(service) = services.get(r.service.as_str()) else {
                continue;
            };
            routes.push(gateway_route(node, r, service, policies));
        }
        virtual_hosts.push(VirtualHostSpec {
            name: virtual_host_name(domain),
            domains: vec![domain.clone()],
            routes,
        });
    }
    let mut spec = http_listener(&listener.name, &listener.address, Side::Gateway);
    spec.rate_limit.clone_from(&listener.rate_limit);
    spec.policy = node.policy(listener.policy.as_ref(), policies);
    node.listeners.push(spec);
    node.route_configs.push(RouteConfigSpec {
        name: listener.name.clone(),
        virtual_hosts,
    });
}

fn gateway_route(
    node: &mut NodeSpec,
    r: &GatewayRouteSpec,
    service: &ServiceSpec,
    policies: &Policies<'_>,
) -> RouteSpec {
    let mut spec = route(&r.name, r.matcher.clone());
    spec.policy = node.policy(r.policy.as_ref(), policies);
    spec.timeout = r.timeout.or(service.timeout);
    spec.retry_policy.clone_from(&service.retries);
    spec.fault = r.fault.clone().or_else(|| service.fault.clone());
    spec.stream_idle_timeout = service.stream_idle_timeout;
    spec.rate_limit.clone_from(&r.rate_limit);
    spec.prefix_rewrite.clone_from(&r.prefix_rewrite);
    spec.host_rewrite.clone_from(&r.host_rewrite);
    let target = Target::new(r.version.as_deref(), r.split.as_ref());
    node.target(&mut spec, service, &target);
    spec
}

/// A route's host patterns, lower-cased (hosts compare case-insensitively).
fn route_hosts(route: &GatewayRouteSpec) -> BTreeSet<String> {
    match &route.hosts {
        None => BTreeSet::from(["*".to_owned()]),
        Some(hosts) => hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}

/// Whether every request host that the proxy would route to the virtual
/// host `domain` also matches `pattern`.
pub(super) fn covers(pattern: &str, domain: &str) -> bool {
    if pattern == domain || pattern == "*" {
        return true;
    }
    let Some(suffix) = pattern.strip_prefix("*.") else {
        return false;
    };
    // `*.example.com` covers `a.example.com` and `*.a.example.com`, and
    // `*.example.com` itself (handled above), but not `example.com`.
    let name = domain.strip_prefix("*.").unwrap_or(domain);
    name.strip_suffix(suffix)
        .is_some_and(|rest| rest.ends_with('.'))
}

/// Virtual host names follow the proxy's resource-name rule, which has no
/// `*`.
fn virtual_host_name(domain: &str) -> String {
    match domain {
        "*" => "any".into(),
        _ => match domain.strip_prefix("*.") {
            Some(suffix) => format!("suffix:{suffix}"),
            None => format!("host:{domain}"),
        },
    }
}

/// Whose listener: what it may believe of its clients differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// A sidecar's inbound or outbound listener: its clients are other
    /// sidecars and the local application, which propagate the id of the
    /// request they serve, so a client's `x-request-id` is kept.
    Sidecar,
    /// A gateway listener faces clients outside the mesh: nothing they
    /// send about themselves is believed (the proxy's defaults).
    Gateway,
}

fn http_listener(name: &str, address: &str, side: Side) -> ListenerSpec {
    ListenerSpec {
        name: name.into(),
        address: address.into(),
        protocol: None,
        route_config: Some(name.into()),
        cluster: None,
        sni_routes: None,
        max_connections: None,
        header_read_timeout: None,
        idle_timeout: None,
        max_request_headers_bytes: None,
        max_request_headers: None,
        max_concurrent_streams: None,
        via: None,
        xff_num_trusted_hops: None,
        preserve_request_id: (side == Side::Sidecar).then_some(true),
        tls: None,
        rate_limit: None,
        fault: None,
        tracing: None,
        istio_metrics: None,
        policy: None,
    }
}

/// A TCP listener forwarding every connection to `cluster`.
fn tcp_listener(name: &str, address: &str, cluster: &str) -> ListenerSpec {
    ListenerSpec {
        protocol: Some(TCP.into()),
        route_config: None,
        cluster: Some(cluster.into()),
        preserve_request_id: None,
        ..http_listener(name, address, Side::Gateway)
    }
}

/// Whether a service speaks TCP rather than HTTP.
fn is_tcp(service: &ServiceSpec) -> bool {
    service.protocol.as_deref() == Some(TCP)
}

fn route(name: &str, matcher: Option<RouteMatchSpec>) -> RouteSpec {
    RouteSpec {
        name: Some(name.into()),
        matcher,
        cluster: None,
        weighted_clusters: None,
        direct_response: None,
        prefix_rewrite: None,
        host_rewrite: None,
        timeout: None,
        request_headers: None,
        response_headers: None,
        retry_policy: None,
        fault: None,
        rate_limit: None,
        stream_idle_timeout: None,
        policy: None,
    }
}

fn cluster(name: String, service: &ServiceSpec, endpoints: Vec<EndpointSpec>) -> ClusterSpec {
    ClusterSpec {
        name,
        // A TCP service's clusters serve TCP listeners, which forward
        // bytes whatever the cluster's HTTP protocol says.
        protocol: service.protocol.clone().filter(|p| p != TCP),
        lb: service.lb.clone(),
        connect_timeout: service.connect_timeout,
        dns_refresh: None,
        pool: None,
        endpoints,
        tls: None,
        outlier_detection: None,
        circuit_breakers: None,
        health_check: None,
    }
}
