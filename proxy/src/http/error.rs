//! The one function that turns a proxy error (`crate::error`) into what
//! the client sees: status, body, `x-weft-error`, and for gRPC callers a
//! trailers-only response with the matching `grpc-status`.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};

use super::body::ResponseBody;
use crate::error::{Origin, ProxyError};

/// The response header naming why the proxy answered itself.
pub(crate) static ERROR_HEADER: HeaderName = HeaderName::from_static("x-weft-error");

/// The gRPC status for gRPC callers (grpc/doc/http-grpc-status-mapping).
fn grpc_status(error: &ProxyError) -> &'static str {
    match error {
        ProxyError::NoRoute => "12", // UNIMPLEMENTED
        ProxyError::Malformed(_)
        | ProxyError::HeadersTooLarge
        | ProxyError::DownstreamBody { .. } => "13", // INTERNAL
        ProxyError::UpstreamTimeout | ProxyError::AttemptTimeout { .. } => "4", // DEADLINE_EXCEEDED
        _ => "14",                   // UNAVAILABLE
    }
}

fn body(error: &ProxyError) -> &'static str {
    match error {
        ProxyError::NoRoute => "no route matched this request\n",
        ProxyError::Malformed(_) | ProxyError::DownstreamBody { .. } => "malformed request\n",
        ProxyError::HeadersTooLarge => "request headers too large\n",
        ProxyError::NoHealthyEndpoint { .. } => "no healthy upstream\n",
        ProxyError::Overflow { .. } => {
            "upstream overflow: too many requests in flight or pending\n"
        }
        ProxyError::UpstreamConnect { .. } | ProxyError::ConnectTimeout { .. } => {
            "upstream connect error\n"
        }
        ProxyError::UpstreamTls { .. } => "upstream tls error\n",
        ProxyError::UpstreamHandshake { .. } | ProxyError::UpstreamReset { .. } => {
            "upstream reset or protocol error\n"
        }
        ProxyError::UpstreamTimeout | ProxyError::AttemptTimeout { .. } => {
            "upstream request timeout\n"
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
        headers.insert("grpc-status", HeaderValue::from_static(grpc_status(error)));
        headers.insert("grpc-message", HeaderValue::from_static(error.flag()));
        headers.insert(ERROR_HEADER.clone(), flag);
        return response;
    }
    let mut response = Response::new(ResponseBody::full(Bytes::from_static(
        body(error).as_bytes(),
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

/// Set on a response a layer answered itself (a fault abort, a rate
/// limit), or on one it changed (a delay): the access log's flag, and the
/// status the metrics count (a gRPC caller's HTTP 200 carries the status
/// of the decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    /// The access log's flag (`x-weft-error` on a local answer).
    pub(crate) flag: &'static str,
    /// What the metrics count.
    pub(crate) status: StatusCode,
}

/// A response the proxy makes itself for a local decision: `status` with
/// `body` and `x-weft-error: flag`, or for a gRPC caller a trailers-only
/// response with `grpc_status`. The [`Decision`] rides along for the
/// access log and the metrics.
pub(crate) fn local_reply(
    status: StatusCode,
    grpc_status: u8,
    flag: &'static str,
    body: &'static str,
    is_grpc: bool,
) -> Response<ResponseBody> {
    let mut response = if is_grpc {
        let mut response = Response::new(ResponseBody::empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(u16::from(grpc_status)));
        headers.insert("grpc-message", HeaderValue::from_static(flag));
        response
    } else {
        let mut response = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    };
    response
        .headers_mut()
        .insert(ERROR_HEADER.clone(), HeaderValue::from_static(flag));
    response.extensions_mut().insert(Decision { flag, status });
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
    use std::net::SocketAddr;

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
            (
                ProxyError::UpstreamTls {
                    cluster: "c".into(),
                    endpoint,
                    source: std::io::Error::other("bad certificate"),
                },
                503,
                "upstream_tls_failure",
                "14",
            ),
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
