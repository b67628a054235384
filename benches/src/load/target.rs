//! Turns a target URL into the one loopback address a run connects to.
//!
//! This is the only place a target host is resolved, and it refuses any host
//! that resolves to something other than loopback (127.0.0.0/8, `::1`): load
//! is only ever sent to this machine. Callers connect to [`Target::addr`]
//! and never resolve the name again.

use std::net::{IpAddr, SocketAddr};

use http::Uri;
use http::uri::{Authority, PathAndQuery};

use super::Protocol;

/// Why a target cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The URL's scheme does not match the protocol.
    #[error("target {target}: expected a {expected}:// URL for {protocol}")]
    Scheme {
        /// The target as given.
        target: String,
        /// The scheme the protocol needs.
        expected: &'static str,
        /// The protocol asked for.
        protocol: &'static str,
    },
    /// The URL has no host.
    #[error("target {target}: no host")]
    NoHost {
        /// The target as given.
        target: String,
    },
    /// A `tcp://` URL has no port.
    #[error("target {target}: no port")]
    NoPort {
        /// The target as given.
        target: String,
    },
    /// The host could not be resolved.
    #[error("target {target}: cannot resolve {host}")]
    Resolve {
        /// The target as given.
        target: String,
        /// The host looked up.
        host: String,
        /// Why resolution failed.
        #[source]
        source: std::io::Error,
    },
    /// The host resolved to no address at all.
    #[error("target {target}: {host} resolved to no address")]
    NoAddress {
        /// The target as given.
        target: String,
        /// The host looked up.
        host: String,
    },
    /// The host resolved to an address outside loopback.
    #[error(
        "target {target}: {host} resolves to {addr}, which is not a loopback address \
         (only 127.0.0.0/8 and ::1 may be load-tested here)"
    )]
    NotLoopback {
        /// The target as given.
        target: String,
        /// The host looked up.
        host: String,
        /// The first non-loopback address it resolved to.
        addr: IpAddr,
    },
}

/// A resolved, checked target.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// The loopback address connected to.
    pub(crate) addr: SocketAddr,
    /// `host[:port]` as written in the URL, sent as `host` / `:authority`.
    pub(crate) authority: Authority,
    /// The path and query requested (`/` when the URL has none).
    pub(crate) path: PathAndQuery,
}

impl Target {
    /// Checks the URL against `protocol`, resolves its host and keeps the
    /// first address, provided that every address is loopback.
    pub(crate) async fn resolve(uri: &Uri, protocol: Protocol) -> Result<Self, TargetError> {
        let target = uri.to_string();
        let (expected, default_port) = match protocol {
            Protocol::Tcp => ("tcp", None),
            Protocol::Http1 | Protocol::Http2 | Protocol::Grpc => ("http", Some(80)),
        };
        if uri.scheme_str() != Some(expected) {
            return Err(TargetError::Scheme {
                target,
                expected,
                protocol: protocol.label(),
            });
        }
        let Some(authority) = uri.authority().cloned() else {
            return Err(TargetError::NoHost { target });
        };
        // Brackets around an IPv6 literal are URL syntax, not part of the host.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(TargetError::NoHost { target });
        }
        let Some(port) = authority.port_u16().or(default_port) else {
            return Err(TargetError::NoPort { target });
        };
        let resolved = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map(Iterator::collect::<Vec<SocketAddr>>);
        let addrs = match resolved {
            Ok(addrs) => addrs,
            Err(source) => {
                return Err(TargetError::Resolve {
                    target,
                    host,
                    source,
                });
            }
        };
        let addr = check_loopback(&addrs).map_err(|error| match error {
            None => TargetError::NoAddress {
                target: target.clone(),
                host: host.clone(),
            },
            Some(addr) => TargetError::NotLoopback {
                target: target.clone(),
                host: host.clone(),
                addr,
            },
        })?;
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Ok(Self {
            addr,
            authority,
            path,
        })
    }
}

/// The first address, when all are loopback. Otherwise the first
/// non-loopback address, or `None` when there is no address.
pub(crate) fn check_loopback(addrs: &[SocketAddr]) -> Result<SocketAddr, Option<IpAddr>> {
    if let Some(bad) = addrs
        .iter()
        .map(SocketAddr::ip)
        .find(|ip| !ip.to_canonical().is_loopback())
    {
        return Err(Some(bad));
    }
    addrs.first().copied().ok_or(None)
}
