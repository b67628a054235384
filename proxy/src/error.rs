//! The proxy's request error: what ended a request without an upstream
//! response, typed by who failed and whether the request may be sent again.
//!
//! This module is a leaf: the cluster, the resilience layers and the HTTP
//! server all use it, and it uses none of them. What the client sees for
//! each error (status, body, `grpc-status`) is decided in one place,
//! `http::error::to_response`; the access log's flag and the metrics'
//! status come from the same value, so the three never disagree. Nothing
//! here, or anywhere, parses error messages.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;

/// The cause of an error, as whichever client library reported it.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Who failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The client sent something we cannot serve.
    Downstream,
    /// The upstream failed or was unreachable.
    Upstream,
    /// Our configuration or a local limit decided.
    Local,
}

/// Whether a failed request may be sent again (by a retry, or to another
/// endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetrySafety {
    /// Nothing reached the upstream: sending again is always safe.
    NotSent,
    /// The upstream may have seen and acted on the request: only an
    /// idempotent request may be sent again.
    MaybeProcessed,
    /// Sending again cannot help (the client's fault, a local decision,
    /// the request's deadline spent).
    Never,
}

/// Everything that can end a request without an upstream response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// No virtual host or route matched.
    #[error("no route matched")]
    NoRoute,
    /// The request is not valid HTTP for a proxy (e.g. HTTP/1.1 without
    /// Host, or with two).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The request headers exceed the listener's limit.
    #[error("request headers too large")]
    HeadersTooLarge,
    /// The client's request body broke its framing (an invalid chunk size,
    /// say) or the client went away while sending it.
    #[error("downstream request body failed")]
    DownstreamBody {
        /// The endpoint the body was being sent to (none: it was being
        /// read to be replayable).
        endpoint: Option<SocketAddr>,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The cluster has no endpoint to send to.
    #[error("no healthy endpoint in cluster {cluster}")]
    NoHealthyEndpoint {
        /// Cluster name.
        cluster: Arc<str>,
    },
    /// Connecting to the endpoint failed.
    #[error("connect to {endpoint} in cluster {cluster} failed")]
    UpstreamConnect {
        /// Cluster name.
        cluster: Arc<str>,
        /// Endpoint address.
        endpoint: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake with the endpoint failed (its certificate was not
    /// trusted, or not for the identity the cluster expects).
    #[error("tls with {endpoint} in cluster {cluster} failed")]
    UpstreamTls {
        /// Cluster name.
        cluster: Arc<str>,
        /// Endpoint address.
        endpoint: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the endpoint took longer than the connect timeout.
    #[error("connect to {endpoint} in cluster {cluster} timed out")]
    ConnectTimeout {
        /// Cluster name.
        cluster: Arc<str>,
        /// Endpoint address.
        endpoint: SocketAddr,
    },
    /// The HTTP handshake with the endpoint failed (no request was sent).
    #[error("handshake with {endpoint} failed")]
    UpstreamHandshake {
        /// Endpoint address.
        endpoint: SocketAddr,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// The upstream reset the connection or broke the protocol.
    #[error("upstream {endpoint} failed")]
    UpstreamReset {
        /// Endpoint address.
        endpoint: SocketAddr,
        /// False when the request provably never left the proxy (an
        /// HTTP/1.1 connection found closed, an HTTP/2 stream refused).
        request_sent: bool,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The route's timeout elapsed before the response headers arrived.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// One attempt's timeout (`retry_policy.per_try_timeout`) elapsed
    /// before its response headers arrived.
    #[error("upstream {endpoint} attempt timed out")]
    AttemptTimeout {
        /// The endpoint the attempt went to.
        endpoint: SocketAddr,
    },
    /// The cluster's circuit breaker is open: `max_requests` requests are
    /// in flight already, or the request needed a new connection beyond
    /// `max_connections` and `max_pending_requests` are waiting already.
    #[error("cluster {cluster} is at its limit of requests in flight or pending")]
    Overflow {
        /// Cluster name.
        cluster: Arc<str>,
    },
}

impl ProxyError {
    /// The HTTP status the client gets (and the metrics count).
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::Malformed(_) | Self::DownstreamBody { .. } => StatusCode::BAD_REQUEST,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::NoHealthyEndpoint { .. }
            | Self::UpstreamConnect { .. }
            | Self::UpstreamTls { .. }
            | Self::ConnectTimeout { .. }
            | Self::Overflow { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamHandshake { .. } | Self::UpstreamReset { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout | Self::AttemptTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short, stable name: the `x-weft-error` value and access-log flag.
    pub(crate) fn flag(&self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::Malformed(_) => "malformed_request",
            Self::HeadersTooLarge => "headers_too_large",
            Self::DownstreamBody { .. } => "downstream_body_error",
            Self::NoHealthyEndpoint { .. } => "no_healthy_endpoint",
            Self::UpstreamConnect { .. } => "upstream_connect_failure",
            Self::UpstreamTls { .. } => "upstream_tls_failure",
            Self::ConnectTimeout { .. } => "upstream_connect_timeout",
            Self::UpstreamHandshake { .. } => "upstream_protocol_error",
            Self::UpstreamReset { .. } => "upstream_reset",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::AttemptTimeout { .. } => "upstream_per_try_timeout",
            Self::Overflow { .. } => "upstream_overflow",
        }
    }

    /// Who failed.
    pub(crate) fn origin(&self) -> Origin {
        match self {
            Self::NoRoute | Self::Overflow { .. } => Origin::Local,
            Self::Malformed(_) | Self::HeadersTooLarge | Self::DownstreamBody { .. } => {
                Origin::Downstream
            }
            Self::NoHealthyEndpoint { .. }
            | Self::UpstreamConnect { .. }
            | Self::UpstreamTls { .. }
            | Self::ConnectTimeout { .. }
            | Self::UpstreamHandshake { .. }
            | Self::UpstreamReset { .. }
            | Self::UpstreamTimeout
            | Self::AttemptTimeout { .. } => Origin::Upstream,
        }
    }

    /// Whether the request may be sent again.
    pub(crate) fn retry_safety(&self) -> RetrySafety {
        match self {
            Self::NoHealthyEndpoint { .. }
            | Self::UpstreamConnect { .. }
            | Self::UpstreamTls { .. }
            | Self::ConnectTimeout { .. }
            | Self::UpstreamHandshake { .. }
            | Self::UpstreamReset {
                request_sent: false,
                ..
            } => RetrySafety::NotSent,
            Self::UpstreamReset {
                request_sent: true, ..
            }
            | Self::AttemptTimeout { .. } => RetrySafety::MaybeProcessed,
            Self::NoRoute
            | Self::Malformed(_)
            | Self::HeadersTooLarge
            | Self::DownstreamBody { .. }
            | Self::UpstreamTimeout
            // Retrying into a full cluster only adds load.
            | Self::Overflow { .. } => RetrySafety::Never,
        }
    }

    /// The endpoint involved, when one had been chosen.
    pub(crate) fn endpoint(&self) -> Option<SocketAddr> {
        match self {
            Self::UpstreamConnect { endpoint, .. }
            | Self::UpstreamTls { endpoint, .. }
            | Self::ConnectTimeout { endpoint, .. }
            | Self::UpstreamHandshake { endpoint, .. }
            | Self::UpstreamReset { endpoint, .. }
            | Self::AttemptTimeout { endpoint }
            | Self::DownstreamBody {
                endpoint: Some(endpoint),
                ..
            } => Some(*endpoint),
            Self::DownstreamBody { endpoint: None, .. } | Self::Overflow { .. } => None,
            Self::NoRoute
            | Self::Malformed(_)
            | Self::HeadersTooLarge
            | Self::NoHealthyEndpoint { .. }
            | Self::UpstreamTimeout => None,
        }
    }
}

/// An error and its causes, `: `-separated, for one log field.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_says_who_failed_and_whether_a_retry_is_safe() {
        let endpoint: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let cases = [
            (ProxyError::NoRoute, Origin::Local, RetrySafety::Never),
            (
                ProxyError::Malformed("x"),
                Origin::Downstream,
                RetrySafety::Never,
            ),
            (
                ProxyError::HeadersTooLarge,
                Origin::Downstream,
                RetrySafety::Never,
            ),
            (
                ProxyError::NoHealthyEndpoint {
                    cluster: "c".into(),
                },
                Origin::Upstream,
                RetrySafety::NotSent,
            ),
            (
                ProxyError::UpstreamConnect {
                    cluster: "c".into(),
                    endpoint,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                },
                Origin::Upstream,
                RetrySafety::NotSent,
            ),
            (
                ProxyError::ConnectTimeout {
                    cluster: "c".into(),
                    endpoint,
                },
                Origin::Upstream,
                RetrySafety::NotSent,
            ),
            (
                ProxyError::UpstreamTimeout,
                Origin::Upstream,
                RetrySafety::Never,
            ),
            (
                ProxyError::AttemptTimeout {
                    endpoint: SocketAddr::from(([127, 0, 0, 1], 1)),
                },
                Origin::Upstream,
                RetrySafety::MaybeProcessed,
            ),
        ];
        for (error, origin, safety) in cases {
            assert_eq!(error.origin(), origin, "{error}");
            assert_eq!(error.retry_safety(), safety, "{error}");
        }
    }
}
