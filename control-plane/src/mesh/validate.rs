//! Mesh-level validation: the rules that span resources and files (unique
//! names and node ids, references between services, versions, address
//! collisions) and the values the builder relies on. What the proxy checks
//! anyway in each node's configuration (route matches, rewrites) is left to
//! the proxy's validator, which `build` runs on every node.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::spec::{GatewaySpec, ServiceSpec};
use super::{Located, Mesh, MeshError, MeshErrors};

/// Service protocols: HTTP as the proxy's cluster `protocol` spells it,
/// and `tcp` for services the mesh forwards as opaque streams.
pub(super) const PROTOCOLS: [&str; 3] = ["http1", "http2", "tcp"];
/// The protocol of services that are not HTTP.
pub(super) const TCP: &str = "tcp";
const LB_POLICIES: [&str; 3] = ["round_robin", "random", "least_request"];
/// Inbound mutual TLS modes of a service.
const MTLS_MODES: [&str; 3] = ["strict", "permissive", "disable"];

/// Collects problems of one resource.
struct Report<'a> {
    errors: &'a mut Vec<MeshError>,
    file: &'a Arc<str>,
    kind: &'static str,
    name: &'a str,
}

impl Report<'_> {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(MeshError::Invalid {
            file: self.file.clone(),
            kind: self.kind,
            name: self.name.to_owned(),
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Who holds a listener address, for collision messages.
struct Bound {
    addr: SocketAddr,
    owner: String,
}

/// Mesh-wide state gathered while checking resources one by one.
#[derive(Default)]
struct Registry {
    /// Node id -> "workload of service \"x\" (file)" / "gateway (file)".
    node_ids: HashMap<String, String>,
    listeners: Vec<Bound>,
    apps: Vec<(SocketAddr, Arc<str>, String, String)>,
}

impl Registry {
    fn claim_node(&mut self, report: &mut Report<'_>, field: &str, id: &str, owner: String) {
        match self.node_ids.get(id) {
            Some(previous) => report.error(
                field,
                format!("node id {id:?} is already used by {previous}"),
            ),
            None => {
                self.node_ids.insert(id.to_owned(), owner);
            }
        }
    }

    fn bind(&mut self, report: &mut Report<'_>, field: &str, addr: SocketAddr, owner: String) {
        // Port 0 picks a free port, so it never collides.
        if addr.port() == 0 {
            return;
        }
        if let Some(previous) = self.listeners.iter().find(|b| collides(b.addr, addr)) {
            report.error(
                field,
                format!("{addr} is already used by {}", previous.owner),
            );
            return;
        }
        self.listeners.push(Bound { addr, owner });
    }
}

/// Two listeners cannot both bind when their ports are equal and their IPs
/// are equal or one of them is the unspecified address of the same family.
fn collides(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

pub(super) fn validate(mesh: &Mesh) -> Result<(), MeshErrors> {
    let mut errors = Vec::new();
    let mut registry = Registry::default();

    // Services by name (the first definition wins for reference checks),
    // and the versions their workloads declare.
    let mut services: BTreeMap<&str, &Located<ServiceSpec>> = BTreeMap::new();
    for service in &mesh.services {
        services
            .entry(service.spec.name.as_str())
            .or_insert(service);
    }
    let versions: BTreeMap<&str, BTreeSet<&str>> = services
        .iter()
        .map(|(name, s)| {
            let versions = s
                .spec
                .workloads
                .iter()
                .filter_map(|w| w.version.as_deref())
                .collect();
            (*name, versions)
        })
        .collect();

    let protocols: BTreeMap<&str, Option<&str>> = services
        .iter()
        .map(|(name, s)| (*name, s.spec.protocol.as_deref()))
        .collect();

    if let Some(domain) = &mesh.trust_domain {
        let valid = !domain.spec.is_empty()
            && domain.spec.len() <= 255
            && domain
                .spec
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !valid {
            errors.push(MeshError::Invalid {
                file: domain.file.clone(),
                kind: "mesh",
                name: "trust_domain".into(),
                field: "trust_domain".into(),
                message: format!(
                    "invalid trust domain {:?} (expected lowercase letters, digits, '-', '.', '_')",
                    domain.spec
                ),
            });
        }
    }
    let has_identities = mesh.trust_domain.is_some();

    let mut first_file: HashMap<(&str, &str), &Arc<str>> = HashMap::new();
    for service in &mesh.services {
        let mut report = Report {
            errors: &mut errors,
            file: &service.file,
            kind: "service",
            name: &service.spec.name,
        };
        if let Some(file) = first_file.get(&("service", service.spec.name.as_str())) {
            report.error(
                "name",
                format!("duplicate service name (also defined in {file})"),
            );
        } else {
            first_file.insert(("service", &service.spec.name), &service.file);
        }
        check_service(
            &mut report,
            &service.spec,
            &versions,
            &protocols,
            &mut registry,
        );
        check_identity(
            &mut report,
            service.spec.namespace.as_deref(),
            service.spec.service_account.as_deref(),
        );
        if let Some(mode) = &service.spec.mtls {
            if !MTLS_MODES.contains(&mode.as_str()) {
                report.error(
                    "mtls",
                    format!("unknown value {mode:?} (expected strict, permissive, disable)"),
                );
            } else if mode != "disable" && !has_identities {
                report.error(
                    "mtls",
                    format!(
                        "{mode} needs the mesh's trust_domain (workloads have no identity without one)"
                    ),
                );
            }
        }
    }
    for gateway in &mesh.gateways {
        let mut report = Report {
            errors: &mut errors,
            file: &gateway.file,
            kind: "gateway",
            name: &gateway.spec.name,
        };
        if let Some(file) = first_file.get(&("gateway", gateway.spec.name.as_str())) {
            report.error(
                "name",
                format!("duplicate gateway name (also defined in {file})"),
            );
        } else {
            first_file.insert(("gateway", &gateway.spec.name), &gateway.file);
        }
        check_gateway(
            &mut report,
            &gateway.spec,
            &versions,
            &protocols,
            &mut registry,
        );
        check_identity(
            &mut report,
            gateway.spec.namespace.as_deref(),
            gateway.spec.service_account.as_deref(),
        );
    }

    // An application address that is also a listener would make a proxy
    // forward to itself.
    let apps = std::mem::take(&mut registry.apps);
    for (addr, file, name, field) in apps {
        if let Some(bound) = registry.listeners.iter().find(|b| collides(b.addr, addr)) {
            errors.push(MeshError::Invalid {
                file,
                kind: "service",
                name,
                field,
                message: format!("{addr} is a listener of {}", bound.owner),
            });
        }
    }

    super::policy::check_references(mesh, &mut errors);

    if errors.is_empty() {
        Ok(())
    } else {
        Err(MeshErrors(errors))
    }
}

fn check_service(
    report: &mut Report<'_>,
    spec: &ServiceSpec,
    versions: &BTreeMap<&str, BTreeSet<&str>>,
    protocols: &BTreeMap<&str, Option<&str>>,
    registry: &mut Registry,
) {
    check_label(report, "name", &spec.name);
    if let Some(protocol) = &spec.protocol
        && !PROTOCOLS.contains(&protocol.as_str())
    {
        report.error(
            "protocol",
            format!("unknown value {protocol:?} (expected http1, http2, tcp)"),
        );
    }
    if spec.protocol.as_deref() == Some(TCP) {
        check_tcp_service(report, spec);
    } else if spec.tcp_fault.is_some() {
        report.error(
            "tcp_fault",
            "applies to tcp services only (an http service's calls take fault)",
        );
    }
    if let Some(lb) = &spec.lb
        && !LB_POLICIES.contains(&lb.as_str())
    {
        report.error(
            "lb",
            format!("unknown value {lb:?} (expected round_robin, random, least_request)"),
        );
    }
    if spec.connect_timeout.is_some_and(|t| t == Duration::ZERO) {
        report.error("connect_timeout", "must be greater than zero");
    }
    if spec.workloads.is_empty() {
        report.error("workloads", "a service needs at least one workload");
    }
    let file = report.file.clone();
    for (i, workload) in spec.workloads.iter().enumerate() {
        let at = format!("workloads[{i}]");
        let owner = |field: &str| format!("service {:?} {at}.{field} ({file})", spec.name,);
        check_label(report, &format!("{at}.name"), &workload.name);
        registry.claim_node(
            report,
            &format!("{at}.name"),
            &workload.name,
            format!("a workload of service {:?} ({file})", spec.name),
        );
        if let Some(version) = &workload.version {
            check_label(report, &format!("{at}.version"), version);
        }
        if let Some(app) = parse_addr(report, &format!("{at}.app"), &workload.app, true) {
            registry
                .apps
                .push((app, file.clone(), spec.name.clone(), format!("{at}.app")));
        }
        if let Some(inbound) = parse_addr(report, &format!("{at}.inbound"), &workload.inbound, true)
        {
            if inbound.ip().is_unspecified() {
                report.error(
                    format!("{at}.inbound"),
                    format!(
                        "{inbound}: callers connect to this address, so it must not be unspecified"
                    ),
                );
            }
            registry.bind(report, &format!("{at}.inbound"), inbound, owner("inbound"));
        }
        if let Some(outbound) = &workload.outbound
            && let Some(addr) = parse_addr(report, &format!("{at}.outbound"), outbound, false)
        {
            registry.bind(report, &format!("{at}.outbound"), addr, owner("outbound"));
        }
        for (callee, address) in &workload.tcp_outbound {
            let field = format!("{at}.tcp_outbound.{callee}");
            if !spec.calls.contains(callee) {
                report.error(&field, format!("{callee:?} is not in this service's calls"));
            } else if let Some(protocol) = protocols.get(callee.as_str())
                && *protocol != Some(TCP)
            {
                report.error(
                    &field,
                    format!(
                        "service {callee:?} speaks {}; the application calls it through outbound with Host: {callee}",
                        protocol.unwrap_or("http1")
                    ),
                );
            }
            if let Some(addr) = parse_addr(report, &field, address, false) {
                registry.bind(
                    report,
                    &field,
                    addr,
                    owner(&format!("tcp_outbound.{callee}")),
                );
            }
        }
    }

    // Calling itself is allowed: replicas of one service may talk to each
    // other (a cache ring, leader forwarding).
    let mut called = HashSet::new();
    for (i, callee) in spec.calls.iter().enumerate() {
        if !versions.contains_key(callee.as_str()) {
            report.error(format!("calls[{i}]"), format!("unknown service {callee:?}"));
        } else if !called.insert(callee.as_str()) {
            report.error(format!("calls[{i}]"), format!("{callee:?} is listed twice"));
        }
    }

    let own_versions = versions.get(spec.name.as_str());
    let mut route_names = HashSet::new();
    for (i, route) in spec.routes.iter().enumerate() {
        let at = format!("routes[{i}]");
        check_route_name(report, &format!("{at}.name"), &route.name);
        check_no_source_match(report, &at, route.matcher.as_ref());
        if !route_names.insert(route.name.as_str()) {
            report.error(
                format!("{at}.name"),
                format!("duplicate route {:?}", route.name),
            );
        }
        if let Some(versions) = own_versions {
            check_target(
                report,
                &at,
                route.version.as_deref(),
                route.split.as_ref(),
                versions,
            );
        }
    }
}

fn check_gateway(
    report: &mut Report<'_>,
    spec: &GatewaySpec,
    versions: &BTreeMap<&str, BTreeSet<&str>>,
    protocols: &BTreeMap<&str, Option<&str>>,
    registry: &mut Registry,
) {
    check_label(report, "name", &spec.name);
    let file = report.file.clone();
    registry.claim_node(report, "name", &spec.name, format!("a gateway ({file})"));
    if spec.listeners.is_empty() {
        report.error("listeners", "a gateway needs at least one listener");
    }
    let mut listener_names = HashSet::new();
    for (li, listener) in spec.listeners.iter().enumerate() {
        let at = format!("listeners[{li}]");
        check_route_name(report, &format!("{at}.name"), &listener.name);
        if !listener_names.insert(listener.name.as_str()) {
            report.error(
                format!("{at}.name"),
                format!("duplicate listener {:?}", listener.name),
            );
        }
        if let Some(addr) = parse_addr(report, &format!("{at}.address"), &listener.address, false) {
            registry.bind(
                report,
                &format!("{at}.address"),
                addr,
                format!("gateway {:?} {at}.address ({file})", spec.name),
            );
        }
        match listener.protocol.as_deref() {
            None | Some("http") => {
                if listener.service.is_some() {
                    report.error(
                        format!("{at}.service"),
                        "applies to tcp listeners only; an http listener sends by its routes",
                    );
                }
            }
            Some(TCP) => {
                if !listener.routes.is_empty() {
                    report.error(
                        format!("{at}.routes"),
                        "applies to http listeners only; a tcp listener sends every connection to its service",
                    );
                }
                if listener.rate_limit.is_some() {
                    report.error(format!("{at}.rate_limit"), "applies to http listeners only");
                }
                match listener.service.as_deref() {
                    None => report.error(format!("{at}.service"), "required for a tcp listener"),
                    Some(service) => match protocols.get(service) {
                        None => report.error(
                            format!("{at}.service"),
                            format!("unknown service {service:?}"),
                        ),
                        Some(protocol) if *protocol != Some(TCP) => report.error(
                            format!("{at}.service"),
                            format!(
                                "service {service:?} speaks {}; a tcp listener forwards to tcp services",
                                protocol.unwrap_or("http1")
                            ),
                        ),
                        Some(_) => {}
                    },
                }
            }
            Some(other) => report.error(
                format!("{at}.protocol"),
                format!("unknown value {other:?} (expected http, tcp)"),
            ),
        }
        let mut route_names = HashSet::new();
        for (ri, route) in listener.routes.iter().enumerate() {
            let at = format!("{at}.routes[{ri}]");
            check_route_name(report, &format!("{at}.name"), &route.name);
            check_no_source_match(report, &at, route.matcher.as_ref());
            if !route_names.insert(route.name.as_str()) {
                report.error(
                    format!("{at}.name"),
                    format!("duplicate route {:?}", route.name),
                );
            }
            if let Some(hosts) = &route.hosts {
                if hosts.is_empty() {
                    report.error(
                        format!("{at}.hosts"),
                        "must list at least one host (omit it for any host)",
                    );
                }
                for (hi, host) in hosts.iter().enumerate() {
                    if !weft_proxy::config::is_valid_domain(host) {
                        report.error(
                            format!("{at}.hosts[{hi}]"),
                            format!(
                                "invalid host {host:?} (expected host, *.suffix or *, without a port)"
                            ),
                        );
                    }
                }
            }
            match versions.get(route.service.as_str()) {
                None => report.error(
                    format!("{at}.service"),
                    format!("unknown service {:?}", route.service),
                ),
                Some(_) if protocols.get(route.service.as_str()) == Some(&Some(TCP)) => {
                    report.error(
                        format!("{at}.service"),
                        format!(
                            "service {:?} speaks tcp; a gateway's routes are HTTP",
                            route.service
                        ),
                    );
                }
                Some(versions) => check_target(
                    report,
                    &at,
                    route.version.as_deref(),
                    route.split.as_ref(),
                    versions,
                ),
            }
        }
    }
}

/// A `tcp` service has no requests: what shapes requests cannot be set,
/// and its health check can only be a connect.
fn check_tcp_service(report: &mut Report<'_>, spec: &ServiceSpec) {
    let http_only = [
        ("routes", !spec.routes.is_empty()),
        ("retries", spec.retries.is_some()),
        ("timeout", spec.timeout.is_some()),
        ("rate_limit", spec.rate_limit.is_some()),
        ("stream_idle_timeout", spec.stream_idle_timeout.is_some()),
    ];
    for (field, set) in http_only {
        if set {
            report.error(field, "applies to http1 and http2 services only");
        }
    }
    if spec.fault.is_some() {
        report.error(
            "fault",
            "applies to http1 and http2 services only (a tcp service's connections take tcp_fault)",
        );
    }
    if let Some(check) = &spec.health_check
        && check.tcp.is_none()
    {
        report.error(
            "health_check",
            "a tcp service's workloads can only be checked with tcp (a connect)",
        );
    }
}

/// Checks a route's `version` / `split` against the target's versions.
fn check_target(
    report: &mut Report<'_>,
    at: &str,
    version: Option<&str>,
    split: Option<&BTreeMap<String, u32>>,
    versions: &BTreeSet<&str>,
) {
    let known = || {
        if versions.is_empty() {
            "workloads have no versions".to_owned()
        } else {
            format!(
                "workloads have {}",
                versions.iter().copied().collect::<Vec<_>>().join(", ")
            )
        }
    };
    if version.is_some() && split.is_some() {
        report.error(at, "set version or split, not both");
    }
    if let Some(version) = version
        && !versions.contains(version)
    {
        report.error(
            format!("{at}.version"),
            format!("unknown version {version:?} ({})", known()),
        );
    }
    if let Some(split) = split {
        for name in split.keys() {
            if !versions.contains(name.as_str()) {
                report.error(
                    format!("{at}.split.{name}"),
                    format!("unknown version {name:?} ({})", known()),
                );
            }
        }
        let total: u64 = split.values().map(|w| u64::from(*w)).sum();
        if total == 0 {
            report.error(
                format!("{at}.split"),
                "weights sum to 0 (at least one must be positive)",
            );
        } else if total > u64::from(u32::MAX) {
            report.error(
                format!("{at}.split"),
                format!("weights sum to {total} (at most {})", u32::MAX),
            );
        }
    }
}

/// Names that become node ids, cluster names and host names: one DNS label.
fn check_label(report: &mut Report<'_>, field: &str, value: &str) {
    let valid = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if !valid {
        report.error(
            field,
            format!(
                "invalid name {value:?} (expected 1-63 lowercase letters, digits or '-', not starting or ending with '-')"
            ),
        );
    }
}

/// The parts of a SPIFFE ID path: lowercase labels.
fn check_identity(report: &mut Report<'_>, namespace: Option<&str>, service_account: Option<&str>) {
    if let Some(namespace) = namespace {
        check_label(report, "namespace", namespace);
    }
    if let Some(account) = service_account {
        check_label(report, "service_account", account);
    }
}

/// Route and listener names follow the proxy's resource-name rule.
/// Service routes run in the callers' sidecars, whose client is the local
/// application, and gateway listeners take clients without certificates:
/// neither knows a caller identity, so a condition on one would never hold.
fn check_no_source_match(
    report: &mut Report<'_>,
    at: &str,
    matcher: Option<&weft_proxy::config::RouteMatchSpec>,
) {
    if matcher.is_some_and(|m| m.source_identities.is_some()) {
        report.error(
            format!("{at}.match.source_identities"),
            "never matches here: these routes run where the caller has no certificate (use a proxy configuration for an mTLS listener)",
        );
    }
}

fn check_route_name(report: &mut Report<'_>, field: &str, value: &str) {
    if !weft_proxy::config::is_valid_name(value) {
        report.error(
            field,
            format!("invalid name {value:?} (expected ASCII letters, digits and - _ . : / only)"),
        );
    }
}

fn parse_addr(
    report: &mut Report<'_>,
    field: &str,
    value: &str,
    needs_port: bool,
) -> Option<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(addr) if needs_port && addr.port() == 0 => {
            report.error(
                field,
                format!("{value}: port 0 is not allowed here (proxies connect to this address)"),
            );
            None
        }
        Ok(addr) => Some(addr),
        Err(_) => {
            report.error(
                field,
                format!("invalid socket address {value:?} (expected IP:PORT)"),
            );
            None
        }
    }
}
