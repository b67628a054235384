//! The validator: `TryFrom<BootstrapSpec> for Config`. It collects every
//! problem, each naming the resource kind, its name, the field path and the
//! offending value, and it holds every default, once.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;

use super::model::*;
use super::spec::{
    BootstrapSpec, ClusterSpec, ClusterTlsSpec, HeaderMatchSpec, HeaderOpsSpec, HealthCheckSpec,
    ListenerSpec, ListenerTlsSpec, RetryPolicySpec, RouteConfigSpec, RouteSpec, TrustBundleSpec,
};
use super::{ConfigError, ValidationErrors};

mod faults;
mod istio;
mod policy;
mod tracing;

pub use policy::compile_policy;

/// More proxies in front than this is a configuration mistake.
const MAX_TRUSTED_HOPS: u32 = 16;
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Long enough for an orchestrator's endpoint controller and a load
/// balancer to see `/ready` at 503 and stop sending (Istio's default
/// termination drain is 5 s too).
const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
const MAX_DRAIN_DELAY: Duration = Duration::from_secs(300);
const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Envoy's default too: large enough for real cookies, small enough that a
/// flood of connections cannot pin much memory.
const DEFAULT_MAX_REQUEST_HEADERS_BYTES: u32 = 60 * 1024;
const DEFAULT_MAX_REQUEST_HEADERS: u32 = 100;
const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(30);
const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const DEFAULT_MAX_IDLE_PER_ENDPOINT: u32 = 256;
/// Headers count and byte size have a hard ceiling so a typo cannot turn a
/// limit off.
const MAX_HEADERS_BYTES_CEILING: u32 = 1024 * 1024;

/// Collects problems while validating one resource.
struct Checker<'a> {
    kind: &'static str,
    resource: String,
    errors: &'a mut Vec<ConfigError>,
}

impl Checker<'_> {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            kind: self.kind,
            resource: self.resource.clone(),
            field: field.into(),
            message: message.into(),
            is_unresolved_reference: false,
        });
    }

    /// A reference to a resource of another kind that does not exist.
    fn unresolved(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.error(field, message);
        if let Some(error) = self.errors.last_mut() {
            error.is_unresolved_reference = true;
        }
    }
}

impl TryFrom<BootstrapSpec> for Config {
    type Error = ValidationErrors;

    fn try_from(spec: BootstrapSpec) -> Result<Self, Self::Error> {
        let mut errors = Vec::new();

        let admin = spec.admin.as_ref().and_then(|admin| {
            let mut check = Checker {
                kind: "admin",
                resource: "admin".into(),
                errors: &mut errors,
            };
            parse_socket_addr(&mut check, "address", &admin.address)
        });
        let admin_token = spec.admin.as_ref().and_then(|admin| {
            let path = admin.token_file.as_ref()?;
            let mut check = Checker {
                kind: "admin",
                resource: "admin".into(),
                errors: &mut errors,
            };
            match crate::cli::read_token(std::path::Path::new(path)) {
                Ok(token) => Some(AdminToken(token.into())),
                Err(error) => {
                    let reason = std::error::Error::source(&error)
                        .map_or_else(|| error.to_string(), |cause| format!("{error}: {cause}"));
                    check.error("token_file", reason);
                    None
                }
            }
        });
        let access_log = spec
            .access_log
            .as_ref()
            .and_then(|log| match log.path.as_str() {
                "" => {
                    let mut check = Checker {
                        kind: "access_log",
                        resource: "access_log".into(),
                        errors: &mut errors,
                    };
                    check.error(
                        "path",
                        "must not be empty (use stdout, stderr or a file path)",
                    );
                    None
                }
                "stdout" => Some(AccessLogTarget::Stdout),
                "stderr" => Some(AccessLogTarget::Stderr),
                path => Some(AccessLogTarget::File(path.into())),
            });
        let access_log_template = spec
            .access_log
            .as_ref()
            .and_then(|log| log.template.as_deref())
            .and_then(|text| match crate::telemetry::AccessTemplate::parse(text) {
                Ok(template) => Some(Arc::new(template)),
                Err(reason) => {
                    let mut check = Checker {
                        kind: "access_log",
                        resource: "access_log".into(),
                        errors: &mut errors,
                    };
                    check.error("template", reason);
                    None
                }
            });
        let metrics_export = spec.metrics_export.as_ref().and_then(|export| {
            let mut check = Checker {
                kind: "metrics_export",
                resource: "metrics_export".into(),
                errors: &mut errors,
            };
            tracing::validate_metrics_export(&mut check, export).map(Arc::new)
        });
        let decision_log = spec.decision_log.as_ref().and_then(|log| {
            let mut check = Checker {
                kind: "decision_log",
                resource: "decision_log".into(),
                errors: &mut errors,
            };
            let target = match log.path.as_str() {
                "" => {
                    check.error(
                        "path",
                        "must not be empty (use stdout, stderr or a file path)",
                    );
                    return None;
                }
                "stdout" => AccessLogTarget::Stdout,
                "stderr" => AccessLogTarget::Stderr,
                path => AccessLogTarget::File(path.into()),
            };
            let mut redact_headers: Vec<String> = super::DEFAULT_REDACTED_HEADERS
                .iter()
                .map(|h| (*h).to_owned())
                .collect();
            for (i, name) in log.redact_headers.iter().flatten().enumerate() {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    check.error(
                        format!("redact_headers[{i}]"),
                        format!("{name:?} is not a header name"),
                    );
                    continue;
                }
                let name = name.to_ascii_lowercase();
                if !redact_headers.contains(&name) {
                    redact_headers.push(name);
                }
            }
            Some(super::DecisionLogSettings {
                target,
                redact_headers,
                include_allowed: log.include_allowed.unwrap_or(true),
            })
        });

        let clusters: Vec<Arc<Cluster>> = spec
            .clusters
            .iter()
            .filter_map(|c| validate_cluster(c, &mut errors))
            .map(Arc::new)
            .collect();
        let cluster_names: HashSet<&str> = spec.clusters.iter().map(|c| c.name.as_str()).collect();
        let route_names: HashSet<&str> =
            spec.route_configs.iter().map(|r| r.name.as_str()).collect();
        let route_configs: Vec<Arc<RouteConfig>> = spec
            .route_configs
            .iter()
            .filter_map(|r| validate_route_config(r, &cluster_names, &mut errors))
            .map(Arc::new)
            .collect();
        let listeners: Vec<Listener> = spec
            .listeners
            .iter()
            .filter_map(|l| validate_listener(l, &route_names, &cluster_names, &mut errors))
            .collect();

        let policies = policy::validate_policies(&spec, &mut errors);
        let trust_bundles: Vec<_> = spec
            .trust_bundles
            .iter()
            .filter_map(|b| validate_trust_bundle(b, &mut errors))
            .collect();
        check_unique(
            &mut errors,
            "trust_bundle",
            spec.trust_bundles.iter().map(|b| b.trust_domain.as_str()),
        );
        check_unique(
            &mut errors,
            "cluster",
            spec.clusters.iter().map(|c| c.name.as_str()),
        );
        check_unique(
            &mut errors,
            "route_config",
            spec.route_configs.iter().map(|r| r.name.as_str()),
        );
        check_unique(
            &mut errors,
            "listener",
            spec.listeners.iter().map(|l| l.name.as_str()),
        );
        // Addresses that could not all be bound: the same one twice, a
        // wildcard beside a specific address of its family on the same
        // port (the kernel refuses the second bind), or the admin server's.
        let mut taken: Vec<(SocketAddr, String)> = Vec::new();
        if let Some(admin) = admin
            && admin.port() != 0
        {
            taken.push((admin, "the admin server".to_owned()));
        }
        for listener in &listeners {
            let address = listener.address;
            if address.port() == 0 {
                continue;
            }
            if let Some((_, owner)) = taken
                .iter()
                .find(|(other, _)| addresses_clash(*other, address))
            {
                errors.push(ConfigError {
                    kind: "listener",
                    resource: listener.name.to_string(),
                    field: "address".into(),
                    message: format!("{address} clashes with {owner}"),
                    is_unresolved_reference: false,
                });
            }
            taken.push((
                address,
                format!("listener {:?} ({address})", &*listener.name),
            ));
        }

        let drain_delay = spec.drain_delay.unwrap_or(DEFAULT_DRAIN_DELAY);
        if drain_delay > MAX_DRAIN_DELAY {
            errors.push(ConfigError {
                kind: "bootstrap",
                resource: "drain_delay".into(),
                field: "drain_delay".into(),
                message: format!(
                    "{} is longer than {}",
                    humantime::format_duration(drain_delay),
                    humantime::format_duration(MAX_DRAIN_DELAY)
                ),
                is_unresolved_reference: false,
            });
        }
        if !errors.is_empty() {
            return Err(ValidationErrors(errors));
        }
        Ok(Config {
            spec: Arc::new(spec.clone()),
            source: Arc::from("inline"),
            admin,
            admin_token,
            drain_timeout: spec.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            drain_delay,
            access_log,
            access_log_template,
            decision_log,
            metrics_export,
            listeners,
            route_configs,
            clusters,
            trust_bundles,
            policies,
        })
    }
}

/// A trust domain's roots, from a file or inline, parsed.
fn validate_trust_bundle(
    spec: &TrustBundleSpec,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<crate::identity::TrustBundle>> {
    let mut check = Checker {
        kind: "trust_bundle",
        resource: spec.trust_domain.clone(),
        errors,
    };
    if !super::tls::is_spiffe_id(&format!("spiffe://{}/_", spec.trust_domain)) {
        check.error(
            "trust_domain",
            format!(
                "{:?} is not a trust domain (lower-case letters, digits, '-', '.', '_')",
                spec.trust_domain
            ),
        );
        return None;
    }
    let (field, pem) = match (&spec.ca_file, &spec.roots_pem) {
        (Some(path), None) => match std::fs::read_to_string(path) {
            Ok(pem) => ("ca_file", pem),
            Err(error) => {
                check.error("ca_file", format!("{path:?}: {error}"));
                return None;
            }
        },
        (None, Some(pem)) => ("roots_pem", pem.clone()),
        _ => {
            check.error("ca_file", "set exactly one of ca_file and roots_pem");
            return None;
        }
    };
    if let Some(signer) = &spec.signer
        && (signer.len() != 64 || !signer.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        check.error("signer", format!("{signer:?} is not a SHA-256 in hex"));
        return None;
    }
    match crate::identity::TrustBundle::from_pem(&spec.trust_domain, &pem) {
        Ok(bundle) => Some(Arc::new(
            bundle.with_signer(spec.signer.as_deref().map(str::to_ascii_lowercase)),
        )),
        Err(message) => {
            check.error(field, message);
            None
        }
    }
}

/// Whether two sockets on one host cannot both be bound: the same port and
/// either the same address, or a wildcard and an address it covers
/// (`0.0.0.0` covers IPv4; `[::]`, dual-stack as the proxy binds it, covers
/// both families).
fn addresses_clash(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: SocketAddr, other: SocketAddr| {
        wild.ip().is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

fn check_unique<'a>(
    errors: &mut Vec<ConfigError>,
    kind: &'static str,
    names: impl Iterator<Item = &'a str>,
) {
    let mut seen = HashSet::new();
    for name in names {
        if !seen.insert(name) {
            errors.push(ConfigError {
                kind,
                resource: name.to_owned(),
                field: "name".into(),
                message: "duplicate name".into(),
                is_unresolved_reference: false,
            });
        }
    }
}

fn parse_socket_addr(check: &mut Checker<'_>, field: &str, value: &str) -> Option<SocketAddr> {
    match value.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            check.error(
                field,
                format!("invalid socket address {value:?} (expected IP:PORT)"),
            );
            None
        }
    }
}

/// The resource-name rule: ASCII letters, digits and `- _ . : /`.
pub(super) fn is_valid_name(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
}

fn check_name(check: &mut Checker<'_>, field: &str, name: &str) {
    if name.is_empty() {
        check.error(field, "must not be empty");
    } else if !is_valid_name(name) {
        check.error(
            field,
            format!("{name:?} may only contain ASCII letters, digits and - _ . : /"),
        );
    }
}

fn validate_listener(
    spec: &ListenerSpec,
    route_names: &HashSet<&str>,
    cluster_names: &HashSet<&str>,
    errors: &mut Vec<ConfigError>,
) -> Option<Listener> {
    let before = errors.len();
    let mut check = Checker {
        kind: "listener",
        resource: spec.name.clone(),
        errors,
    };
    check_name(&mut check, "name", &spec.name);
    let address = parse_socket_addr(&mut check, "address", &spec.address);
    let kind = match spec.protocol.as_deref().unwrap_or("http") {
        "http" => {
            if spec.cluster.is_some() {
                check.error(
                    "cluster",
                    "only tcp listeners name a cluster; http listeners use route_config",
                );
            }
            if spec.sni_routes.is_some() {
                check.error("sni_routes", "applies to tcp listeners only");
            }
            if spec.fault.is_some() {
                check.error(
                    "fault",
                    "applies to tcp listeners only; an http listener's faults go on its routes",
                );
            }
            match spec.route_config.as_deref() {
                None => {
                    check.error("route_config", "required for an http listener");
                    None
                }
                Some(name) if !route_names.contains(name) => {
                    check.unresolved("route_config", format!("unknown route_config {name:?}"));
                    None
                }
                Some(name) => Some(ListenerKind::Http {
                    route_config: name.into(),
                }),
            }
        }
        "tcp" => {
            if spec.route_config.is_some() {
                check.error("route_config", "only http listeners use a route_config");
            }
            // Settings that only mean something for HTTP must not sit on a
            // TCP listener looking as if they protected it.
            let http_only = [
                ("header_read_timeout", spec.header_read_timeout.is_some()),
                (
                    "max_request_headers_bytes",
                    spec.max_request_headers_bytes.is_some(),
                ),
                ("max_request_headers", spec.max_request_headers.is_some()),
                (
                    "max_concurrent_streams",
                    spec.max_concurrent_streams.is_some(),
                ),
                ("via", spec.via.is_some()),
                ("xff_num_trusted_hops", spec.xff_num_trusted_hops.is_some()),
                ("preserve_request_id", spec.preserve_request_id.is_some()),
                ("rate_limit", spec.rate_limit.is_some()),
            ];
            for (field, set) in http_only {
                if set {
                    check.error(field, "applies to http listeners only");
                }
            }
            let mut sni_routes = Vec::new();
            let mut routes_ok = true;
            for (i, route) in spec.sni_routes.iter().flatten().enumerate() {
                let at = format!("sni_routes[{i}]");
                let mut server_names = Vec::new();
                if route.server_names.is_empty() {
                    check.error(format!("{at}.server_names"), "must list at least one name");
                    routes_ok = false;
                }
                for (j, name) in route.server_names.iter().enumerate() {
                    match parse_domain(&name.to_ascii_lowercase()) {
                        Some(parsed) => server_names.push(parsed),
                        None => {
                            check.error(
                                format!("{at}.server_names[{j}]"),
                                format!(
                                    "invalid server name {name:?} (expected host, *.suffix or *)"
                                ),
                            );
                            routes_ok = false;
                        }
                    }
                }
                if !cluster_names.contains(route.cluster.as_str()) {
                    check.unresolved(
                        format!("{at}.cluster"),
                        format!("unknown cluster {:?}", route.cluster),
                    );
                    routes_ok = false;
                }
                sni_routes.push(SniRoute {
                    server_names,
                    cluster: route.cluster.as_str().into(),
                });
            }
            if spec.sni_routes.is_some() && spec.tls.is_some() {
                check.error(
                    "sni_routes",
                    "routes TLS passthrough by the ClientHello; a listener with tls terminates TLS instead (set one of them)",
                );
                routes_ok = false;
            }
            if spec.sni_routes.as_ref().is_some_and(Vec::is_empty) {
                check.error(
                    "sni_routes",
                    "must list at least one route (omit it to forward every connection to cluster)",
                );
                routes_ok = false;
            }
            let cluster = match spec.cluster.as_deref() {
                None if sni_routes.is_empty() => {
                    check.error("cluster", "required for a tcp listener (or sni_routes)");
                    None
                }
                None => Some(None),
                Some(name) if !cluster_names.contains(name) => {
                    check.unresolved("cluster", format!("unknown cluster {name:?}"));
                    None
                }
                Some(name) => Some(Some(Arc::from(name))),
            };
            match cluster {
                Some(cluster) if routes_ok => Some(ListenerKind::Tcp {
                    cluster,
                    sni_routes,
                }),
                _ => None,
            }
        }
        other => {
            check.error(
                "protocol",
                format!("unknown value {other:?} (expected http, tcp)"),
            );
            None
        }
    };
    let max_request_headers_bytes = spec
        .max_request_headers_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_HEADERS_BYTES);
    if !(1024..=MAX_HEADERS_BYTES_CEILING).contains(&max_request_headers_bytes) {
        check.error(
            "max_request_headers_bytes",
            format!(
                "{max_request_headers_bytes} is out of range (1024..={MAX_HEADERS_BYTES_CEILING})"
            ),
        );
    }
    let max_request_headers = spec
        .max_request_headers
        .unwrap_or(DEFAULT_MAX_REQUEST_HEADERS);
    if !(1..=10_000).contains(&max_request_headers) {
        check.error(
            "max_request_headers",
            format!("{max_request_headers} is out of range (1..=10000)"),
        );
    }
    let max_connections = spec.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        check.error("max_connections", "must be at least 1");
    }
    let max_concurrent_streams = spec
        .max_concurrent_streams
        .unwrap_or(DEFAULT_MAX_CONCURRENT_STREAMS);
    if max_concurrent_streams == 0 {
        check.error("max_concurrent_streams", "must be at least 1");
    }
    let header_read_timeout = spec
        .header_read_timeout
        .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT);
    if header_read_timeout.is_zero() {
        check.error("header_read_timeout", "must be greater than zero");
    }
    let idle_timeout = spec.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
    if idle_timeout.is_zero() {
        check.error("idle_timeout", "must be greater than zero");
    }
    if let Some(via) = &spec.via
        && (via.is_empty() || HeaderValue::from_str(via).is_err())
    {
        check.error("via", format!("{via:?} is not a valid header value"));
    }
    let xff_num_trusted_hops = spec.xff_num_trusted_hops.unwrap_or(0);
    if xff_num_trusted_hops > MAX_TRUSTED_HOPS {
        check.error(
            "xff_num_trusted_hops",
            format!("{xff_num_trusted_hops} is out of range (0..={MAX_TRUSTED_HOPS})"),
        );
    }
    let tls = spec
        .tls
        .as_ref()
        .and_then(|tls| listener_tls(tls, &mut check))
        .map(Arc::new);
    let rate_limit = match spec.protocol.as_deref() {
        Some("tcp") => None,
        _ => spec
            .rate_limit
            .as_ref()
            .and_then(|limit| faults::validate_rate_limit(&mut check, "rate_limit", limit)),
    };
    // HTTP listeners trace each request; TCP listeners each connection.
    let tracing = spec
        .tracing
        .as_ref()
        .and_then(|tracing| tracing::validate_tracing(&mut check, "tracing", tracing));
    let istio_metrics = spec
        .istio_metrics
        .as_ref()
        .and_then(|istio| {
            istio::validate_istio_metrics(&mut check, "istio_metrics", istio, cluster_names)
        })
        .map(Arc::new);
    let fault = match spec.protocol.as_deref() {
        Some("tcp") => spec
            .fault
            .as_ref()
            .and_then(|fault| faults::validate_tcp_fault(&mut check, "fault", fault)),
        _ => None,
    };
    if errors.len() > before {
        return None;
    }
    Some(Listener {
        name: spec.name.as_str().into(),
        address: address?,
        kind: kind?,
        max_connections,
        header_read_timeout,
        idle_timeout,
        max_request_headers_bytes,
        max_request_headers,
        max_concurrent_streams,
        via: spec.via.as_deref().map(Arc::from),
        xff_num_trusted_hops,
        preserve_request_id: spec.preserve_request_id.unwrap_or(false),
        tls,
        policy: spec.policy.as_deref().map(Arc::from),
        rate_limit,
        fault,
        tracing,
        istio_metrics,
    })
}

/// Loads a listener's certificates and keys; every problem names its field
/// and file.
fn listener_tls(spec: &ListenerTlsSpec, check: &mut Checker<'_>) -> Option<ListenerTls> {
    let min_version = match spec.min_version.as_deref() {
        None | Some("1.2") => TlsVersion::Tls12,
        Some("1.3") => TlsVersion::Tls13,
        Some(other) => {
            check.error(
                "tls.min_version",
                format!("unknown value {other:?} (expected \"1.2\", \"1.3\")"),
            );
            TlsVersion::Tls12
        }
    };
    let permissive = match spec.mode.as_deref() {
        None | Some("strict") => false,
        Some("permissive") => true,
        Some(other) => {
            check.error(
                "tls.mode",
                format!("unknown value {other:?} (expected strict, permissive)"),
            );
            false
        }
    };
    let workload_identity = spec
        .workload_identity
        .as_deref()
        .and_then(|id| spiffe_field(check, "tls.workload_identity", id));
    match (&spec.workload_identity, spec.certificates.is_empty()) {
        (None, true) => check.error(
            "tls.certificates",
            "must list at least one certificate (or set workload_identity)",
        ),
        (Some(_), false) => check.error(
            "tls.certificates",
            "not with workload_identity (the control plane signs its certificate)",
        ),
        _ => {}
    }
    let mut certificates = Vec::new();
    for (i, cert) in spec.certificates.iter().enumerate() {
        let at = format!("tls.certificates[{i}]");
        let mut server_names = Vec::new();
        for (j, name) in cert.server_names.iter().enumerate() {
            match parse_domain(&name.to_ascii_lowercase()) {
                Some(DomainMatch::Any) | None => check.error(
                    format!("{at}.server_names[{j}]"),
                    format!("invalid server name {name:?} (expected host or *.suffix)"),
                ),
                Some(domain) => server_names.push(domain),
            }
        }
        match super::tls::load_certified_key(&cert.cert_file, &cert.key_file) {
            Ok(key) => {
                let spiffe_id = key
                    .end_entity_cert()
                    .ok()
                    .and_then(|leaf| super::tls::spiffe_id(leaf).ok().flatten());
                certificates.push(TlsCertificate {
                    key: Arc::new(key),
                    server_names,
                    cert_file: cert.cert_file.as_str().into(),
                    spiffe_id,
                });
            }
            Err(super::tls::LoadKeyError { field, message }) => {
                check.error(format!("{at}.{field}"), message);
            }
        }
    }
    let mut allowed_identities = Vec::new();
    for (i, id) in spec.allowed_identities.iter().enumerate() {
        if let Some(id) = spiffe_field(check, &format!("tls.allowed_identities[{i}]"), id) {
            allowed_identities.push(id);
        }
    }
    let clients = match (&spec.client_ca_file, &workload_identity) {
        (Some(_), Some(_)) => {
            check.error(
                "tls.client_ca_file",
                "not with workload_identity (clients are verified against the mesh's trust bundle)",
            );
            None
        }
        (None, Some(_)) => {
            if spec.require_client_certificate == Some(false) {
                check.error(
                    "tls.require_client_certificate",
                    "mesh mTLS always requires a client certificate",
                );
            }
            Some(ClientVerification {
                roots: ClientRoots::Mesh,
                allowed_identities,
            })
        }
        (Some(path), None) => match super::tls::load_roots(path) {
            Ok(roots) => {
                let required = spec.require_client_certificate.unwrap_or(true);
                match super::tls::client_verifier(roots, required) {
                    Ok(verifier) => Some(ClientVerification {
                        roots: ClientRoots::Files(verifier),
                        allowed_identities,
                    }),
                    Err(message) => {
                        check.error("tls.client_ca_file", format!("{path:?}: {message}"));
                        None
                    }
                }
            }
            Err(message) => {
                check.error("tls.client_ca_file", message);
                None
            }
        },
        (None, None) => {
            if spec.require_client_certificate.is_some() {
                check.error("tls.require_client_certificate", "needs client_ca_file");
            }
            if !spec.allowed_identities.is_empty() {
                check.error(
                    "tls.allowed_identities",
                    "needs client_ca_file or workload_identity",
                );
            }
            None
        }
    };
    Some(ListenerTls {
        certificates,
        workload_identity,
        min_version,
        permissive,
        clients,
    })
}

fn validate_route_config(
    spec: &RouteConfigSpec,
    cluster_names: &HashSet<&str>,
    errors: &mut Vec<ConfigError>,
) -> Option<RouteConfig> {
    let before = errors.len();
    let mut check = Checker {
        kind: "route_config",
        resource: spec.name.clone(),
        errors,
    };
    check_name(&mut check, "name", &spec.name);
    let mut vhost_names = HashSet::new();
    let mut all_domains = HashSet::new();
    let mut virtual_hosts = Vec::with_capacity(spec.virtual_hosts.len());
    for (vi, vhost) in spec.virtual_hosts.iter().enumerate() {
        let at = format!("virtual_hosts[{vi}]");
        check_name(&mut check, &format!("{at}.name"), &vhost.name);
        if !vhost_names.insert(vhost.name.as_str()) {
            check.error(
                format!("{at}.name"),
                format!("duplicate virtual host {:?}", vhost.name),
            );
        }
        if vhost.domains.is_empty() {
            check.error(format!("{at}.domains"), "must list at least one domain");
        }
        let mut domains = Vec::with_capacity(vhost.domains.len());
        for (di, domain) in vhost.domains.iter().enumerate() {
            let field = format!("{at}.domains[{di}]");
            let lower = domain.to_ascii_lowercase();
            if !all_domains.insert(lower.clone()) {
                check.error(
                    &field,
                    format!("domain {domain:?} is claimed by more than one virtual host"),
                );
            }
            match parse_domain(&lower) {
                Some(d) => domains.push(d),
                None => check.error(
                    &field,
                    format!(
                        "invalid domain {domain:?} (expected host, *.suffix or *, without a port)"
                    ),
                ),
            }
        }
        let mut route_names = HashSet::new();
        let mut routes = Vec::with_capacity(vhost.routes.len());
        for (ri, route) in vhost.routes.iter().enumerate() {
            let at = format!("{at}.routes[{ri}]");
            let name: Arc<str> = match &route.name {
                Some(name) => {
                    check_name(&mut check, &format!("{at}.name"), name);
                    name.as_str().into()
                }
                None => format!("{}/{ri}", vhost.name).into(),
            };
            if !route_names.insert(name.clone()) {
                check.error(format!("{at}.name"), format!("duplicate route {name:?}"));
            }
            if let Some(route) = validate_route(&mut check, &at, name, route, cluster_names) {
                routes.push(route);
            }
        }
        virtual_hosts.push(VirtualHost {
            name: vhost.name.as_str().into(),
            domains,
            routes,
        });
    }
    if errors.len() > before {
        return None;
    }
    Some(RouteConfig {
        name: spec.name.as_str().into(),
        virtual_hosts,
    })
}

pub(super) fn parse_domain(domain: &str) -> Option<DomainMatch> {
    if domain == "*" {
        return Some(DomainMatch::Any);
    }
    let (suffix, host) = match domain.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, domain),
    };
    // Ports are not part of a domain: the router ignores the request's
    // port, so `example.com:8080` could never match.
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        && !host.starts_with('.');
    match (valid, suffix) {
        (false, _) => None,
        (true, true) => Some(DomainMatch::Suffix(format!(".{host}").into())),
        (true, false) => Some(DomainMatch::Exact(host.into())),
    }
}

fn is_standard_method(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::CONNECT,
        Method::OPTIONS,
        Method::TRACE,
        Method::PATCH,
    ]
    .contains(method)
}

fn compile_anchored(check: &mut Checker<'_>, field: &str, pattern: &str) -> Option<Regex> {
    // Anchored so that `/users/[0-9]+` cannot also match `/admin/users/1`;
    // the size limit bounds the memory and time one pattern can take.
    match regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
    {
        Ok(re) => Some(re),
        Err(e) => {
            check.error(field, format!("invalid regex {pattern:?}: {e}"));
            None
        }
    }
}

fn validate_route(
    check: &mut Checker<'_>,
    at: &str,
    name: Arc<str>,
    spec: &RouteSpec,
    cluster_names: &HashSet<&str>,
) -> Option<Route> {
    let before = check.errors.len();
    let m = spec.matcher.clone().unwrap_or_default();
    let path = match (&m.prefix, &m.exact, &m.regex) {
        (None, None, None) => Some(PathMatch::Prefix("/".into())),
        (Some(p), None, None) => check_path(check, &format!("{at}.match.prefix"), p)
            .then(|| PathMatch::Prefix(p.as_str().into())),
        (None, Some(p), None) => check_path(check, &format!("{at}.match.exact"), p)
            .then(|| PathMatch::Exact(p.as_str().into())),
        (None, None, Some(re)) => {
            compile_anchored(check, &format!("{at}.match.regex"), re).map(PathMatch::Regex)
        }
        _ => {
            check.error(
                format!("{at}.match"),
                "set at most one of prefix, exact, regex",
            );
            None
        }
    };
    let mut methods = Vec::new();
    for (i, method) in m.methods.iter().flatten().enumerate() {
        let upper = method.to_ascii_uppercase();
        match Method::from_bytes(method.as_bytes()) {
            // Methods are case-sensitive (RFC 9110 §9.1): `get` is not GET.
            Ok(_)
                if upper != *method
                    && Method::from_bytes(upper.as_bytes())
                        .is_ok_and(|m| is_standard_method(&m)) =>
            {
                check.error(
                    format!("{at}.match.methods[{i}]"),
                    format!("{method:?} never matches; methods are case-sensitive (did you mean {upper:?}?)"),
                );
            }
            Ok(m) if !method.is_empty() => methods.push(m),
            _ => check.error(
                format!("{at}.match.methods[{i}]"),
                format!("invalid method {method:?}"),
            ),
        }
    }
    let source_identities = validate_identity_matches(
        check,
        &format!("{at}.match.source_identities"),
        m.source_identities.as_deref().unwrap_or_default(),
    );
    let mut headers = Vec::new();
    for (i, header) in m.headers.iter().flatten().enumerate() {
        if let Some(h) = validate_header_match(check, &format!("{at}.match.headers[{i}]"), header) {
            headers.push(h);
        }
    }

    let action = match (
        &spec.cluster,
        &spec.weighted_clusters,
        &spec.direct_response,
    ) {
        (Some(cluster), None, None) => {
            if cluster_names.contains(cluster.as_str()) {
                Some(RouteAction::Cluster(cluster.as_str().into()))
            } else {
                check.unresolved(
                    format!("{at}.cluster"),
                    format!("unknown cluster {cluster:?}"),
                );
                None
            }
        }
        (None, Some(split), None) => {
            let mut targets = Vec::with_capacity(split.len());
            for (i, target) in split.iter().enumerate() {
                if !cluster_names.contains(target.cluster.as_str()) {
                    check.unresolved(
                        format!("{at}.weighted_clusters[{i}].cluster"),
                        format!("unknown cluster {:?}", target.cluster),
                    );
                }
                targets.push((Arc::from(target.cluster.as_str()), target.weight));
            }
            let total: u64 = targets.iter().map(|(_, w)| u64::from(*w)).sum();
            if targets.is_empty() || total == 0 {
                check.error(
                    format!("{at}.weighted_clusters"),
                    "needs at least one cluster with a weight above 0",
                );
            } else if total > u64::from(u32::MAX) {
                check.error(
                    format!("{at}.weighted_clusters"),
                    "weights add up to more than 4294967295",
                );
            }
            Some(RouteAction::Weighted(targets))
        }
        (None, None, Some(direct)) => match StatusCode::from_u16(direct.status) {
            Ok(status) if (200..=599).contains(&direct.status) => Some(RouteAction::Direct {
                status,
                body: Bytes::from(direct.body.clone().unwrap_or_default()),
            }),
            _ => {
                check.error(
                    format!("{at}.direct_response.status"),
                    format!("invalid status {} (expected 200..=599)", direct.status),
                );
                None
            }
        },
        _ => {
            check.error(
                at,
                "set exactly one of cluster, weighted_clusters, direct_response",
            );
            None
        }
    };

    if let Some(rewrite) = &spec.prefix_rewrite {
        if matches!(path, Some(PathMatch::Regex(_))) {
            check.error(
                format!("{at}.prefix_rewrite"),
                "cannot rewrite a regex match; use prefix or exact",
            );
        }
        check_path(check, &format!("{at}.prefix_rewrite"), rewrite);
    }
    let host_rewrite = spec.host_rewrite.as_deref().and_then(|host| {
        let parsed = host
            .parse::<http::uri::Authority>()
            .ok()
            .and_then(|_| HeaderValue::from_str(host).ok());
        if parsed.is_none() {
            check.error(
                format!("{at}.host_rewrite"),
                format!("invalid host {host:?}"),
            );
        }
        parsed
    });
    let request_headers = validate_header_ops(
        check,
        &format!("{at}.request_headers"),
        spec.request_headers.as_ref(),
    );
    let response_headers = validate_header_ops(
        check,
        &format!("{at}.response_headers"),
        spec.response_headers.as_ref(),
    );
    let timeout = match spec.timeout {
        None => Some(DEFAULT_ROUTE_TIMEOUT),
        Some(t) if t.is_zero() => None,
        Some(t) => Some(t),
    };
    let retry = spec
        .retry_policy
        .as_ref()
        .and_then(|policy| validate_retry_policy(check, &format!("{at}.retry_policy"), policy));
    let fault = spec
        .fault
        .as_ref()
        .and_then(|fault| faults::validate_fault(check, &format!("{at}.fault"), fault));
    let rate_limit = spec
        .rate_limit
        .as_ref()
        .and_then(|limit| faults::validate_rate_limit(check, &format!("{at}.rate_limit"), limit));
    if spec.direct_response.is_some() && spec.retry_policy.is_some() {
        check.error(
            format!("{at}.retry_policy"),
            "a direct response is never retried",
        );
    }
    if check.errors.len() > before {
        return None;
    }
    Some(Route {
        name,
        matcher: RouteMatch {
            path: path?,
            methods,
            headers,
            source_identities,
        },
        action: action?,
        prefix_rewrite: spec.prefix_rewrite.as_deref().map(Box::from),
        host_rewrite,
        timeout,
        request_headers,
        response_headers,
        retry: retry.map(Arc::new),
        stream_idle_timeout: spec.stream_idle_timeout.filter(|t| !t.is_zero()),
        policy: spec.policy.as_deref().map(Arc::from),
        fault: fault.map(Arc::new),
        rate_limit,
    })
}

/// Defaults: two retries of gateway errors, 25 ms to 250 ms of backoff, a
/// budget of 20 % of the requests plus 10 per second over 10 s (as
/// Linkerd's), bodies up to 64 KiB kept.
fn validate_retry_policy(
    check: &mut Checker<'_>,
    at: &str,
    spec: &RetryPolicySpec,
) -> Option<RetryPolicy> {
    let before = check.errors.len();
    let num_retries = spec.num_retries.unwrap_or(DEFAULT_NUM_RETRIES);
    if num_retries > MAX_NUM_RETRIES {
        check.error(
            format!("{at}.num_retries"),
            format!("{num_retries} is more than {MAX_NUM_RETRIES}"),
        );
    }
    let mut policy = RetryPolicy {
        num_retries,
        on_5xx: false,
        on_gateway_error: false,
        on_connect_failure: false,
        on_reset: false,
        statuses: Vec::new(),
        grpc_statuses: Vec::new(),
        per_try_timeout: spec.per_try_timeout,
        backoff_base: spec.backoff_base.unwrap_or(Duration::from_millis(25)),
        backoff_max: spec.backoff_max.unwrap_or(Duration::from_millis(250)),
        retry_non_idempotent: spec.retry_non_idempotent.unwrap_or(false),
        max_body_bytes: spec.max_body_bytes.unwrap_or(64 * 1024) as usize,
        budget_ratio: 0.2,
        budget_min_per_second: 10,
        budget_window: Duration::from_secs(10),
    };
    let default_on = ["gateway_error".to_owned()];
    let mut wants_statuses = false;
    for (i, on) in spec
        .retry_on
        .as_deref()
        .unwrap_or(&default_on)
        .iter()
        .enumerate()
    {
        match on.as_str() {
            "5xx" => policy.on_5xx = true,
            "gateway_error" => policy.on_gateway_error = true,
            "connect_failure" => policy.on_connect_failure = true,
            "reset" => policy.on_reset = true,
            "retriable_status_codes" => wants_statuses = true,
            other => check.error(
                format!("{at}.retry_on[{i}]"),
                format!("unknown value {other:?} (expected 5xx, gateway_error, connect_failure, reset, retriable_status_codes)"),
            ),
        }
    }
    for (i, code) in spec.retriable_status_codes.iter().flatten().enumerate() {
        match StatusCode::from_u16(*code) {
            Ok(status) if (400..=599).contains(code) => policy.statuses.push(status),
            _ => check.error(
                format!("{at}.retriable_status_codes[{i}]"),
                format!("{code} is not an error status (400..=599)"),
            ),
        }
    }
    if wants_statuses != spec.retriable_status_codes.is_some() {
        check.error(
            format!("{at}.retriable_status_codes"),
            "set it together with retry_on: [retriable_status_codes]",
        );
    }
    for (i, name) in spec.retriable_grpc_statuses.iter().flatten().enumerate() {
        match grpc_code(name) {
            Some(code) => policy.grpc_statuses.push(code),
            None => check.error(
                format!("{at}.retriable_grpc_statuses[{i}]"),
                format!("unknown gRPC status {name:?} (expected cancelled, deadline_exceeded, internal, resource_exhausted or unavailable)"),
            ),
        }
    }
    if spec.per_try_timeout.is_some_and(|t| t.is_zero()) {
        check.error(format!("{at}.per_try_timeout"), "must be above 0");
    }
    if policy.backoff_base.is_zero() || policy.backoff_max < policy.backoff_base {
        check.error(
            format!("{at}.backoff_base"),
            "must be above 0 and at most backoff_max",
        );
    }
    if policy.backoff_max > Duration::from_secs(60) {
        check.error(format!("{at}.backoff_max"), "is longer than 1m");
    }
    if policy.max_body_bytes > 16 * 1024 * 1024 {
        check.error(format!("{at}.max_body_bytes"), "is more than 16777216");
    }
    if let Some(budget) = &spec.budget {
        if let Some(ratio) = budget.ratio {
            if (0.0..=10.0).contains(&ratio) {
                policy.budget_ratio = ratio;
            } else {
                check.error(format!("{at}.budget.ratio"), "must be within 0..=10");
            }
        }
        policy.budget_min_per_second = budget.min_per_second.unwrap_or(10);
        if let Some(window) = budget.window {
            if (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&window) {
                policy.budget_window = window;
            } else {
                check.error(format!("{at}.budget.window"), "must be within 1s..=1h");
            }
        }
    }
    (check.errors.len() == before).then_some(policy)
}

/// Default retries of a route with a `retry_policy`.
const DEFAULT_NUM_RETRIES: u32 = 2;
/// Most retries of one request.
const MAX_NUM_RETRIES: u32 = 10;

/// The gRPC status codes worth retrying, by their canonical names.
fn grpc_code(name: &str) -> Option<u8> {
    Some(match name {
        "cancelled" => 1,
        "deadline_exceeded" => 4,
        "resource_exhausted" => 8,
        "internal" => 13,
        "unavailable" => 14,
        _ => return None,
    })
}

/// Conditions on the caller's SPIFFE ID: exact, or `spiffe://td/path/*`
/// for every ID under a path.
fn validate_identity_matches(
    check: &mut Checker<'_>,
    at: &str,
    ids: &[String],
) -> Vec<IdentityMatch> {
    let mut source_identities = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let field = format!("{at}[{i}]");
        // `spiffe://td/path/*`: every ID under the path (kept with its `/`).
        let prefix = id.strip_suffix('*').filter(|p| p.ends_with('/'));
        let base = prefix.unwrap_or(id);
        if base.contains('*') {
            check.error(
                field,
                format!("{id:?}: a wildcard is allowed only as the whole last segment (spiffe://<trust-domain>/<path>/*)"),
            );
        } else if let Some(prefix) = prefix {
            if spiffe_field(check, &field, &format!("{prefix}x")).is_some() {
                source_identities.push(IdentityMatch::Prefix(Arc::from(prefix)));
            }
        } else if let Some(id) = spiffe_field(check, &field, id) {
            source_identities.push(IdentityMatch::Exact(id));
        }
    }
    source_identities
}

/// A gRPC status code by number (`14`) or canonical name (`unavailable`).
fn grpc_code_number(value: &str) -> Option<u8> {
    const NAMES: [&str; 17] = [
        "ok",
        "cancelled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
    ];
    if let Ok(code) = value.parse::<u8>() {
        return (usize::from(code) < NAMES.len()).then_some(code);
    }
    let lower = value.to_ascii_lowercase();
    NAMES
        .iter()
        .position(|name| *name == lower)
        .and_then(|i| u8::try_from(i).ok())
}

fn check_path(check: &mut Checker<'_>, field: &str, path: &str) -> bool {
    let ok = path.starts_with('/')
        && http::uri::PathAndQuery::try_from(path).is_ok()
        && !path.contains('?');
    if !ok {
        check.error(
            field,
            format!("invalid path {path:?} (must start with / and have no query)"),
        );
    }
    ok
}

fn validate_header_match(
    check: &mut Checker<'_>,
    at: &str,
    spec: &HeaderMatchSpec,
) -> Option<HeaderMatch> {
    let name = parse_header_name(check, &format!("{at}.name"), &spec.name);
    let kind = match (&spec.exact, &spec.regex, spec.present) {
        (Some(value), None, None) => match HeaderValue::from_str(value) {
            Ok(v) => Some(HeaderMatchKind::Exact(v)),
            Err(_) => {
                check.error(
                    format!("{at}.exact"),
                    format!("invalid header value {value:?}"),
                );
                None
            }
        },
        (None, Some(re), None) => {
            compile_anchored(check, &format!("{at}.regex"), re).map(HeaderMatchKind::Regex)
        }
        (None, None, Some(present)) => Some(HeaderMatchKind::Present(present)),
        _ => {
            check.error(at, "set exactly one of exact, regex, present");
            None
        }
    };
    Some(HeaderMatch {
        name: name?,
        kind: kind?,
    })
}

fn parse_header_name(check: &mut Checker<'_>, field: &str, name: &str) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(n) if !name.starts_with(':') => Some(n),
        _ => {
            check.error(field, format!("invalid header name {name:?}"));
            None
        }
    }
}

/// Headers the proxy manages itself; a route may not set or remove them,
/// since that would break framing or the connection.
fn is_protected_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "transfer-encoding"
            | "content-length"
            | "host"
            | "upgrade"
            | "keep-alive"
            | "te"
            | "proxy-connection"
    )
}

fn validate_header_ops(
    check: &mut Checker<'_>,
    at: &str,
    spec: Option<&HeaderOpsSpec>,
) -> HeaderOps {
    let Some(spec) = spec else {
        return HeaderOps::default();
    };
    let mut ops = HeaderOps::default();
    let pairs =
        |check: &mut Checker<'_>, which: &str, map: &std::collections::BTreeMap<String, String>| {
            let mut out = Vec::with_capacity(map.len());
            for (name, value) in map {
                let field = format!("{at}.{which}.{name}");
                let Some(header) = parse_header_name(check, &field, name) else {
                    continue;
                };
                if is_protected_header(&header) {
                    check.error(
                        &field,
                        format!("{name:?} is managed by the proxy and cannot be changed"),
                    );
                    continue;
                }
                match HeaderValue::from_str(value) {
                    Ok(v) => out.push((header, v)),
                    Err(_) => check.error(&field, format!("invalid header value {value:?}")),
                }
            }
            out
        };
    ops.set = pairs(check, "set", &spec.set);
    ops.add = pairs(check, "add", &spec.add);
    for (i, name) in spec.remove.iter().enumerate() {
        let field = format!("{at}.remove[{i}]");
        if let Some(header) = parse_header_name(check, &field, name) {
            if is_protected_header(&header) {
                check.error(
                    &field,
                    format!("{name:?} is managed by the proxy and cannot be removed"),
                );
            } else {
                ops.remove.push(header);
            }
        }
    }
    ops
}

fn validate_cluster(spec: &ClusterSpec, errors: &mut Vec<ConfigError>) -> Option<Cluster> {
    let before = errors.len();
    let mut check = Checker {
        kind: "cluster",
        resource: spec.name.clone(),
        errors,
    };
    check_name(&mut check, "name", &spec.name);
    let protocol = match spec.protocol.as_deref().unwrap_or("http1") {
        "http1" => Some(UpstreamProtocol::Http1),
        "http2" => Some(UpstreamProtocol::Http2),
        "downstream" => Some(UpstreamProtocol::Downstream),
        "auto" => Some(UpstreamProtocol::Auto),
        other => {
            check.error(
                "protocol",
                format!("unknown value {other:?} (expected http1, http2, downstream, auto)"),
            );
            None
        }
    };
    let lb = match spec.lb.as_deref().unwrap_or("round_robin") {
        "round_robin" => Some(LbPolicy::RoundRobin),
        "random" => Some(LbPolicy::Random),
        "least_request" => Some(LbPolicy::LeastRequest),
        other => {
            check.error(
                "lb",
                format!("unknown value {other:?} (expected round_robin, random, least_request)"),
            );
            None
        }
    };
    let connect_timeout = spec.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    if connect_timeout.is_zero() {
        check.error("connect_timeout", "must be greater than zero");
    }
    let dns_refresh = spec.dns_refresh.unwrap_or(DEFAULT_DNS_REFRESH);
    if dns_refresh < Duration::from_millis(100) {
        check.error("dns_refresh", "must be at least 100ms");
    }
    let pool = spec.pool.clone().unwrap_or_default();
    let pool_idle_timeout = pool.idle_timeout.unwrap_or(DEFAULT_POOL_IDLE_TIMEOUT);
    if pool_idle_timeout.is_zero() {
        check.error("pool.idle_timeout", "must be greater than zero");
    }
    if spec.endpoints.is_empty() {
        check.error("endpoints", "must list at least one endpoint");
    }
    let mut endpoints = Vec::with_capacity(spec.endpoints.len());
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        let weight = endpoint.weight.unwrap_or(1);
        if !(1..=1_000_000).contains(&weight) {
            check.error(
                format!("endpoints[{i}].weight"),
                format!("{weight} is out of range (1..=1000000)"),
            );
        }
        match parse_endpoint_address(&endpoint.address) {
            Some(address) if endpoints.iter().any(|e: &Endpoint| e.address == address) => check
                .error(
                    format!("endpoints[{i}].address"),
                    format!(
                        "{:?} is listed twice (give one entry a larger weight instead)",
                        endpoint.address
                    ),
                ),
            Some(address) => endpoints.push(Endpoint { address, weight }),
            None => check.error(
                format!("endpoints[{i}].address"),
                format!(
                    "invalid address {:?} (expected IP:PORT or HOST:PORT)",
                    endpoint.address
                ),
            ),
        }
    }
    let outlier = spec.outlier_detection.as_ref().and_then(|o| {
        let before = check.errors.len();
        let outlier = OutlierDetection {
            consecutive_5xx: o.consecutive_5xx.unwrap_or(5),
            consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(5),
            base_ejection_time: o.base_ejection_time.unwrap_or(Duration::from_secs(30)),
            max_ejection_time: o.max_ejection_time.unwrap_or(Duration::from_secs(300)),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(50),
            panic_threshold: o.panic_threshold.unwrap_or(50),
            success_rate: o.success_rate.as_ref().map(|r| SuccessRate {
                interval: r.interval.unwrap_or(Duration::from_secs(10)),
                // Envoy's defaults.
                minimum_hosts: r.minimum_hosts.unwrap_or(5),
                request_volume: r.request_volume.unwrap_or(100),
                stdev_factor: r.stdev_factor.unwrap_or(1900),
            }),
        };
        if let Some(rate) = &outlier.success_rate {
            if rate.interval < Duration::from_millis(10) {
                check.error(
                    "outlier_detection.success_rate.interval",
                    "must be at least 10ms",
                );
            }
            for (field, value) in [
                ("minimum_hosts", rate.minimum_hosts),
                ("request_volume", rate.request_volume),
            ] {
                if value == 0 {
                    check.error(
                        format!("outlier_detection.success_rate.{field}"),
                        "must be at least 1",
                    );
                }
            }
        }
        if outlier.base_ejection_time.is_zero()
            || outlier.max_ejection_time < outlier.base_ejection_time
        {
            check.error(
                "outlier_detection.base_ejection_time",
                "must be above 0 and at most max_ejection_time",
            );
        }
        for (field, value) in [
            ("max_ejection_percent", outlier.max_ejection_percent),
            ("panic_threshold", outlier.panic_threshold),
        ] {
            if value > 100 {
                check.error(
                    format!("outlier_detection.{field}"),
                    format!("{value} is more than 100"),
                );
            }
        }
        (check.errors.len() == before).then_some(outlier)
    });
    let health_check = spec
        .health_check
        .as_ref()
        .and_then(|h| validate_health_check(&mut check, &spec.name, h));
    if spec
        .circuit_breakers
        .as_ref()
        .is_some_and(|b| b.max_connections == Some(0))
    {
        check.error("circuit_breakers.max_connections", "must be at least 1");
    }
    let tls = spec
        .tls
        .as_ref()
        .and_then(|tls| cluster_tls(tls, &mut check))
        .map(Arc::new);
    if errors.len() > before {
        return None;
    }
    let breakers = spec.circuit_breakers.clone().unwrap_or_default();
    Some(Cluster {
        tls,
        outlier,
        health_check,
        // Envoy's defaults.
        max_requests: breakers.max_requests.unwrap_or(1024),
        max_retries: breakers.max_retries.unwrap_or(3),
        max_connections: breakers.max_connections.unwrap_or(1024),
        max_pending_requests: breakers.max_pending_requests.unwrap_or(1024),
        name: spec.name.as_str().into(),
        protocol: protocol?,
        lb: lb?,
        connect_timeout,
        dns_refresh,
        pool_idle_timeout,
        max_idle_per_endpoint: pool
            .max_idle_per_endpoint
            .unwrap_or(DEFAULT_MAX_IDLE_PER_ENDPOINT),
        endpoints,
    })
}

/// A cluster's `health_check`; `None` (reported) when invalid.
fn validate_health_check(
    check: &mut Checker<'_>,
    cluster: &str,
    spec: &HealthCheckSpec,
) -> Option<HealthCheck> {
    let before = check.errors.len();
    let kinds = [spec.http.is_some(), spec.tcp.is_some(), spec.grpc.is_some()];
    if kinds.iter().filter(|&&k| k).count() != 1 {
        check.error("health_check", "set exactly one of http, tcp and grpc");
    }
    let interval = spec.interval.unwrap_or(Duration::from_secs(5));
    if interval < Duration::from_millis(10) {
        check.error("health_check.interval", "must be at least 10ms");
    }
    let timeout = spec.timeout.unwrap_or(Duration::from_secs(1));
    if timeout.is_zero() {
        check.error("health_check.timeout", "must be greater than zero");
    }
    let healthy_threshold = spec.healthy_threshold.unwrap_or(2);
    let unhealthy_threshold = spec.unhealthy_threshold.unwrap_or(3);
    for (field, value) in [
        ("healthy_threshold", healthy_threshold),
        ("unhealthy_threshold", unhealthy_threshold),
    ] {
        if value == 0 {
            check.error(format!("health_check.{field}"), "must be at least 1");
        }
    }
    let kind = if let Some(http) = &spec.http {
        let path = match http::uri::PathAndQuery::try_from(http.path.as_str()) {
            Ok(path) if http.path.starts_with('/') => Some(path),
            _ => {
                check.error(
                    "health_check.http.path",
                    format!("{:?} is not an absolute path", http.path),
                );
                None
            }
        };
        let host = http.host.as_deref().unwrap_or(cluster);
        let host = HeaderValue::from_str(host)
            .map_err(|_| {
                check.error(
                    "health_check.http.host",
                    format!("invalid header value {host:?}"),
                );
            })
            .ok();
        let mut expected_statuses = Vec::with_capacity(http.expected_statuses.len());
        for (i, text) in http.expected_statuses.iter().enumerate() {
            match parse_status_range(text) {
                Some(range) => expected_statuses.push(range),
                None => check.error(
                    format!("health_check.http.expected_statuses[{i}]"),
                    format!("{text:?} is not a status (100-599) or a range such as \"200-299\""),
                ),
            }
        }
        if expected_statuses.is_empty() {
            expected_statuses.push((200, 299));
        }
        path.zip(host).map(|(path, host)| HealthCheckKind::Http {
            path,
            host,
            expected_statuses,
        })
    } else if let Some(grpc) = &spec.grpc {
        let authority = grpc.authority.as_deref().unwrap_or(cluster);
        let authority = http::uri::Authority::try_from(authority)
            .map_err(|_| {
                check.error(
                    "health_check.grpc.authority",
                    format!("{authority:?} is not a valid authority"),
                );
            })
            .ok();
        authority.map(|authority| HealthCheckKind::Grpc {
            service: grpc.service.as_deref().unwrap_or("").into(),
            authority,
        })
    } else {
        Some(HealthCheckKind::Tcp)
    };
    if check.errors.len() > before {
        return None;
    }
    Some(HealthCheck {
        kind: kind?,
        interval,
        interval_jitter: spec.interval_jitter.unwrap_or(interval / 10),
        timeout,
        healthy_threshold,
        unhealthy_threshold,
    })
}

/// `"204"` or `"200-299"` (inclusive), within 100..=599.
fn parse_status_range(text: &str) -> Option<(u16, u16)> {
    let (start, end) = match text.split_once('-') {
        Some((start, end)) => (start.trim().parse().ok()?, end.trim().parse().ok()?),
        None => {
            let code = text.trim().parse().ok()?;
            (code, code)
        }
    };
    ((100..=599).contains(&start) && (start..=599).contains(&end)).then_some((start, end))
}

/// Loads a cluster's TLS files; every problem names its field and file.
fn cluster_tls(spec: &ClusterTlsSpec, check: &mut Checker<'_>) -> Option<ClusterTls> {
    let workload_identity = spec
        .workload_identity
        .as_deref()
        .and_then(|id| spiffe_field(check, "tls.workload_identity", id));
    let roots = match (&spec.ca_file, &spec.workload_identity) {
        (Some(path), None) => super::tls::load_roots(path)
            .map_err(|message| check.error("tls.ca_file", message))
            .ok()
            .map(Some),
        (None, Some(_)) => Some(None),
        (Some(_), Some(_)) => {
            check.error(
                "tls.ca_file",
                "not with workload_identity (endpoints are verified against the mesh's trust bundle)",
            );
            None
        }
        (None, None) => {
            check.error(
                "tls.ca_file",
                "required (or set workload_identity for mesh mTLS)",
            );
            None
        }
    };
    let client_cert = match (&spec.cert_file, &spec.key_file) {
        (Some(_), _) | (_, Some(_)) if spec.workload_identity.is_some() => {
            check.error(
                "tls.cert_file",
                "not with workload_identity (the control plane signs its certificate)",
            );
            None
        }
        (Some(cert), Some(key)) => match super::tls::load_certified_key(cert, key) {
            Ok(key) => Some(ClientCert::File(Arc::new(key))),
            Err(super::tls::LoadKeyError { field, message }) => {
                check.error(format!("tls.{field}"), message);
                None
            }
        },
        (None, None) => workload_identity.map(ClientCert::Workload),
        (Some(_), None) => {
            check.error("tls.key_file", "required with cert_file");
            None
        }
        (None, Some(_)) => {
            check.error("tls.cert_file", "required with key_file");
            None
        }
    };
    let server = match (&spec.server_identity, &spec.server_name) {
        (Some(id), None) => {
            spiffe_field(check, "tls.server_identity", id).map(ServerIdentity::Spiffe)
        }
        (None, Some(_)) if spec.workload_identity.is_some() => {
            check.error(
                "tls.server_name",
                "mesh mTLS verifies a SPIFFE ID: set server_identity instead",
            );
            None
        }
        (None, Some(name)) => match rustls_pki_types::ServerName::try_from(name.clone()) {
            Ok(name) => Some(ServerIdentity::DnsName(name)),
            Err(_) => {
                check.error("tls.server_name", format!("{name:?} is not a DNS name"));
                None
            }
        },
        (Some(_), Some(_)) => {
            check.error("tls", "set server_identity or server_name, not both");
            None
        }
        (None, None) => {
            check.error(
                "tls",
                "set server_identity (a SPIFFE ID) or server_name (a DNS name): what the endpoints must prove",
            );
            None
        }
    };
    let files: Vec<Arc<str>> = [
        spec.ca_file.as_ref(),
        spec.cert_file.as_ref(),
        spec.key_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|f| Arc::from(f.as_str()))
    .collect();
    let (roots, server) = (roots?, server?);
    let verifier = match (roots, &server) {
        (Some(roots), _) => UpstreamVerifier::Files(
            super::tls::server_verifier(Arc::new(roots), &server)
                .map_err(|message| {
                    check.error("tls.ca_file", format!("{:?}: {message}", spec.ca_file))
                })
                .ok()?,
        ),
        (None, ServerIdentity::Spiffe(id)) => UpstreamVerifier::Mesh(id.clone()),
        // Reported above: mesh mTLS verifies a SPIFFE ID.
        (None, ServerIdentity::DnsName(_)) => return None,
    };
    let fingerprint = {
        use std::hash::{Hash as _, Hasher as _};
        // Read again after loading: a file replaced in between makes the
        // next check see a change, never miss one.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for file in &files {
            std::fs::read(&**file).unwrap_or_default().hash(&mut hasher);
        }
        hasher.finish()
    };
    Some(ClusterTls {
        client_cert,
        server,
        verifier,
        files,
        fingerprint,
    })
}

/// A SPIFFE ID field; reports the field when it is not one.
fn spiffe_field(check: &mut Checker<'_>, field: &str, id: &str) -> Option<Arc<str>> {
    if super::tls::is_spiffe_id(id) {
        Some(Arc::from(id))
    } else {
        check.error(
            field,
            format!("{id:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)"),
        );
        None
    }
}

/// `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT` with a DNS-shaped host.
pub(crate) fn parse_endpoint_address(address: &str) -> Option<EndpointAddress> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Some(EndpointAddress::Socket(addr));
    }
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    (valid_host && port != 0).then(|| EndpointAddress::Dns {
        host: host.to_ascii_lowercase().into(),
        port,
    })
}
