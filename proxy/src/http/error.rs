//! Proxy errors and the one function that turns them into what the client
//! sees. The same value gives the response status, the `x-weft-error`
//! header, the access log's flag and the metrics' status class, so the
//! three never disagree. Nothing here parses error messages.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};

use super::body::ResponseBody;

/// The response header naming why the proxy answered itself.
pub(crate) static ERROR_HEADER: HeaderName = HeaderName::from_static("x-weft-error");

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

/// Everything that can end a request without an upstream response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// No virtual host or route matched.
    #[error("no route matched")]
    NoRoute,
    /// The request is not valid HTTP for a proxy (e.g. HTTP/1.1 without Host).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The request headers exceed the listener's limit.
    #[error("request headers too large")]
    HeadersTooLarge,
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
    /// Connecting to the endpoint took longer than the connect timeout.
    #[error("connect to {endpoint} in cluster {cluster} timed out")]
    ConnectTimeout {
        /// Cluster name.
        cluster: Arc<str>,
        /// Endpoint address.
        endpoint: SocketAddr,
    },
    /// The HTTP handshake with the endpoint failed.
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
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// The route's timeout elapsed before the response headers arrived.
    #[error("upstream timed out")]
    UpstreamTimeout,
}

impl ProxyError {
    /// The HTTP status the client gets.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::NoHealthyEndpoint { .. }
            | Self::UpstreamConnect { .. }
            | Self::ConnectTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamHandshake { .. } | Self::UpstreamReset { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short, stable name: the `x-weft-error` value and access-log flag.
    pub(crate) fn flag(&self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::Malformed(_) => "malformed_request",
            Self::HeadersTooLarge => "headers_too_large",
            Self::NoHealthyEndpoint { .. } => "no_healthy_endpoint",
            Self::UpstreamConnect { .. } => "upstream_connect_failure",
            Self::ConnectTimeout { .. } => "upstream_connect_timeout",
            Self::UpstreamHandshake { .. } => "upstream_protocol_error",
            Self::UpstreamReset { .. } => "upstream_reset",
            Self::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// Who failed.
    pub(crate) fn origin(&self) -> Origin {
        match self {
            Self::NoRoute => Origin::Local,
            Self::Malformed(_) | Self::HeadersTooLarge => Origin::Downstream,
            Self::NoHealthyEndpoint { .. }
            | Self::UpstreamConnect { .. }
            | Self::ConnectTimeout { .. }
            | Self::UpstreamHandshake { .. }
            | Self::UpstreamReset { .. }
            | Self::UpstreamTimeout => Origin::Upstream,
        }
    }

    /// The endpoint involved, when one had been chosen.
    pub(crate) fn endpoint(&self) -> Option<SocketAddr> {
        match self {
            Self::UpstreamConnect { endpoint, .. }
            | Self::ConnectTimeout { endpoint, .. }
            | Self::UpstreamHandshake { endpoint, .. }
            | Self::UpstreamReset { endpoint, .. } => Some(*endpoint),
            _ => None,
        }
    }

    /// The gRPC status for gRPC callers (grpc/doc/http-grpc-status-mapping).
    fn grpc_status(&self) -> &'static str {
        match self {
            Self::NoRoute => "12",                              // UNIMPLEMENTED
            Self::Malformed(_) | Self::HeadersTooLarge => "13", // INTERNAL
            Self::UpstreamTimeout => "4",                       // DEADLINE_EXCEEDED
            _ => "14",                                          // UNAVAILABLE
        }
    }

    fn body(&self) -> &'static str {
        match self {
            Self::NoRoute => "no route matched this request\n",
            Self::Malformed(_) => "malformed request\n",
            Self::HeadersTooLarge => "request headers too large\n",
            Self::NoHealthyEndpoint { .. } => "no healthy upstream\n",
            Self::UpstreamConnect { .. } | Self::ConnectTimeout { .. } => {
                "upstream connect error\n"
            }
            Self::UpstreamHandshake { .. } | Self::UpstreamReset { .. } => {
                "upstream reset or protocol error\n"
            }
            Self::UpstreamTimeout => "upstream request timeout\n",
        }
    }
}

/// Turns a proxy error into the client's response. gRPC callers
/// (`content-type: application/grpc*`) get a trailers-only response with
/// HTTP 200 and the matching `grpc-status`, as gRPC clients expect.
pub(crate) fn to_response(error: &ProxyError, is_grpc: bool) -> Response<ResponseBody> {
    let flag = HeaderValue::from_static(error.flag());
    if is_grpc {
        let mut response = Response::new(ResponseBody::empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static(error.grpc_status()));
        headers.insert("grpc-message", HeaderValue::from_static(error.flag()));
        headers.insert(ERROR_HEADER.clone(), flag);
        return response;
    }
    let mut response = Response::new(ResponseBody::full(Bytes::from_static(
        error.body().as_bytes(),
    )));
    *response.status_mut() = error.status();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(ERROR_HEADER.clone(), flag);
    if error.origin() == Origin::Downstream {
        // After a malformed request the connection's framing is suspect.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// True when the request is gRPC.
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_status_flag_and_grpc_status() {
        let endpoint: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let cases = [
            (ProxyError::NoRoute, 404, "no_route", "12"),
            (ProxyError::Malformed("x"), 400, "malformed_request", "13"),
            (ProxyError::HeadersTooLarge, 431, "headers_too_large", "13"),
            (
                ProxyError::NoHealthyEndpoint {
                    cluster: "c".into(),
                },
                503,
                "no_healthy_endpoint",
                "14",
            ),
            (
                ProxyError::UpstreamConnect {
                    cluster: "c".into(),
                    endpoint,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                },
                503,
                "upstream_connect_failure",
                "14",
            ),
            (
                ProxyError::ConnectTimeout {
                    cluster: "c".into(),
                    endpoint,
                },
                503,
                "upstream_connect_timeout",
                "14",
            ),
            (ProxyError::UpstreamTimeout, 504, "upstream_timeout", "4"),
        ];
        for (error, status, flag, grpc) in cases {
            let response = to_response(&error, false);
            assert_eq!(response.status().as_u16(), status, "{error}");
            assert_eq!(response.headers()[&ERROR_HEADER], flag);
            let response = to_response(&error, true);
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()["grpc-status"], grpc, "{error}");
        }
    }
}
