//! The proxy's configuration: the serde spec users write (`spec`), the
//! validated model (`model`) and the one validator that turns the first
//! into the second. `weft-proxy --check-config`, `weft-cp validate` and the
//! proxy itself all go through [`Config::from_yaml`] / `TryFrom`.
//!
//! Invariants callers rely on: a [`Config`] only exists if it is valid —
//! names are unique, every reference (listener → route config, route →
//! cluster) resolves, and every limit is within range.

mod model;
pub mod proto;
mod spec;
pub(crate) mod tls;
mod validate;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

pub use model::*;
pub use spec::*;
pub use validate::compile_policy;
#[cfg(test)]
use validate::parse_endpoint_address;

/// Whether `name` is a valid resource name (listener, route configuration,
/// route, cluster, ...): non-empty, ASCII letters, digits and `- _ . : /`.
/// For other tools (the control plane's mesh model) that check names with
/// the validator's own rule.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && validate::is_valid_name(name)
}

/// The trust domain of a SPIFFE ID (`spiffe://<trust-domain>/<path>`);
/// `None` when `id` is not one.
pub fn spiffe_trust_domain(id: &str) -> Option<&str> {
    if !tls::is_spiffe_id(id) {
        return None;
    }
    id.strip_prefix("spiffe://")?.split('/').next()
}

/// The SPIFFE ID and expiry of an X.509-SVID (DER): `None` unless it has
/// exactly one URI SAN and that is a SPIFFE ID (as the X.509-SVID
/// specification requires, and as the proxy's listeners check).
pub fn svid_identity(der: &[u8]) -> Option<(Arc<str>, std::time::SystemTime)> {
    match tls::leaf_facts(der) {
        Ok((Some(id), not_after)) => Some((id, not_after)),
        _ => None,
    }
}

/// Whether `domain` is a valid virtual-host domain: `*`, `*.suffix` or a
/// host name, without a port.
pub fn is_valid_domain(domain: &str) -> bool {
    validate::parse_domain(domain).is_some()
}

/// One problem found while validating: which resource, which field, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Resource kind: `listener`, `route_config`, `cluster`, ...
    pub kind: &'static str,
    /// Resource name.
    pub resource: String,
    /// Field path inside the resource, e.g. `virtual_hosts[0].routes[2].cluster`.
    pub field: String,
    /// What is wrong, with the offending value.
    pub message: String,
    /// The field names a resource of another kind that does not exist.
    /// Over xDS such an error can be transient (the resource may be on its
    /// way in the next response), so the client waits briefly before
    /// rejecting.
    pub is_unresolved_reference: bool,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?}: {}: {}",
            self.kind, self.resource, self.field, self.message
        )
    }
}

/// Every problem found in one configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ConfigError>);

impl fmt::Display for ValidationErrors {
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

/// Why a configuration file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML of the expected shape.
    #[error("{origin}: {source}")]
    Syntax {
        /// The file (or `<inline>`).
        origin: String,
        /// The parser's error, with its field path and line.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// The file parsed but failed validation.
    #[error("{origin}: invalid configuration:\n{errors}")]
    Invalid {
        /// The file (or `<inline>`).
        origin: String,
        /// Every problem found.
        errors: ValidationErrors,
    },
}

impl Config {
    /// A configuration with nothing in it: no admin, listeners or clusters.
    pub fn empty() -> Self {
        Config::try_from(BootstrapSpec::default())
            .expect("the empty configuration is valid (unit-tested)")
    }

    /// The workload identities (SPIFFE IDs) the listeners and clusters
    /// present, whose certificates the control plane signs.
    pub fn workload_identities(&self) -> std::collections::BTreeSet<Arc<str>> {
        let listeners = self
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref()?.workload_identity.clone());
        let clusters = self
            .clusters
            .iter()
            .filter_map(|c| c.tls.as_ref()?.workload_identity().cloned());
        listeners.chain(clusters).collect()
    }

    /// Parses and validates a YAML document. `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, LoadError> {
        let spec: BootstrapSpec =
            serde_yaml_ng::from_str(text).map_err(|source| LoadError::Syntax {
                origin: origin.to_owned(),
                source,
            })?;
        let mut config = Config::try_from(spec).map_err(|errors| LoadError::Invalid {
            origin: origin.to_owned(),
            errors,
        })?;
        config.source = Arc::from(origin);
        Ok(config)
    }

    /// Reads, parses and validates a YAML file. Blocking: call it before
    /// the runtime starts or from `spawn_blocking`.
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: origin.clone(),
            source,
        })?;
        Self::from_yaml(&text, &origin)
    }

    /// The configuration behind `weft-proxy --listen A --upstream B,C`: one
    /// HTTP listener routing everything to one round-robin cluster.
    pub fn reverse_proxy(
        listen: &str,
        upstreams: &[String],
        admin: Option<&str>,
        admin_token_file: Option<&str>,
    ) -> Result<Self, LoadError> {
        let spec = BootstrapSpec {
            admin: admin.map(|address| AdminSpec {
                address: address.to_owned(),
                token_file: admin_token_file.map(str::to_owned),
            }),
            listeners: vec![ListenerSpec {
                name: "http".into(),
                address: listen.to_owned(),
                protocol: None,
                route_config: Some("default".into()),
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
                preserve_request_id: None,
                tls: None,
                rate_limit: None,
                fault: None,
                tracing: None,
                istio_metrics: None,
                policy: None,
            }],
            route_configs: vec![RouteConfigSpec {
                name: "default".into(),
                virtual_hosts: vec![VirtualHostSpec {
                    name: "all".into(),
                    domains: vec!["*".into()],
                    routes: vec![RouteSpec {
                        retry_policy: None,
                        fault: None,
                        rate_limit: None,
                        stream_idle_timeout: None,
                        policy: None,
                        name: Some("all".into()),
                        matcher: None,
                        cluster: Some("upstream".into()),
                        weighted_clusters: None,
                        direct_response: None,
                        prefix_rewrite: None,
                        host_rewrite: None,
                        timeout: None,
                        request_headers: None,
                        response_headers: None,
                    }],
                }],
            }],
            clusters: vec![ClusterSpec {
                outlier_detection: None,
                health_check: None,
                circuit_breakers: None,
                name: "upstream".into(),
                protocol: None,
                lb: None,
                connect_timeout: None,
                dns_refresh: None,
                pool: None,
                endpoints: upstreams
                    .iter()
                    .map(|a| EndpointSpec {
                        address: a.clone(),
                        weight: None,
                    })
                    .collect(),
                tls: None,
            }],
            ..BootstrapSpec::default()
        };
        let mut config = Config::try_from(spec).map_err(|errors| LoadError::Invalid {
            origin: "command line".into(),
            errors,
        })?;
        config.source = Arc::from("command line");
        Ok(config)
    }
}

#[cfg(test)]
mod tests;
