//! Serving one downstream HTTP connection, and the per-request path up to
//! the route's stack: limits, connection telemetry, routing, header rules,
//! weighted split, upgrades, and recording the outcome.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Instant, SystemTime};

use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower::Service;

use super::body::{Finish, ResponseBody};
use super::error::{ProxyError, is_grpc, to_response};
use super::headers;
use super::router::RequestParts;
use crate::drain::{Drain, TrackedExecutor};
use crate::listener::{ConnectionGuard, Protocol, detect};
use crate::stack::{
    HttpListener, ListenerSnapshot, PathRewrite, PreparedAction, PreparedRoute, Shared,
};
use crate::telemetry::AccessRecord;

/// hyper's HTTP/1 read buffer never goes below this.
const MIN_H1_BUFFER: usize = 8192;

/// Per-connection state shared by the connection's requests.
#[derive(Debug)]
struct Connection {
    index: usize,
    peer: SocketAddr,
    peer_ip: HeaderValue,
    shared: Shared,
    drain: Drain,
    /// Requests started, and in flight, for the idle timeout.
    started: AtomicU64,
    in_flight: AtomicU32,
}

/// Serves one accepted connection until it closes, drains or idles out.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    index: usize,
    listener: Arc<HttpListener>,
    shared: Shared,
    drain: Drain,
) {
    let _guard = ConnectionGuard::new(listener.metrics.clone());
    let settings = &listener.config;
    let Some((io, protocol)) = detect(
        stream,
        settings.header_read_timeout,
        listener.metrics.clone(),
    )
    .await
    else {
        return;
    };
    let conn = Arc::new(Connection {
        index,
        peer,
        peer_ip: HeaderValue::try_from(peer.ip().to_string())
            .expect("an IP address is a valid header value"),
        shared,
        drain: drain.clone(),
        started: AtomicU64::new(0),
        in_flight: AtomicU32::new(0),
    });
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| handle(conn.clone(), req))
    };
    let io = TokioIo::new(io);
    let idle_timeout = settings.idle_timeout;
    match protocol {
        Protocol::Http1 => {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_read_timeout)
                // Our own check answers 431 with a body; hyper's buffer limit
                // (slightly larger) is the hard stop behind it.
                .max_buf_size(
                    (settings.max_request_headers_bytes as usize + 4096).max(MIN_H1_BUFFER),
                )
                .max_headers(settings.max_request_headers as usize);
            let connection = builder.serve_connection(io, service).with_upgrades();
            drive(connection, &conn, idle_timeout, |c| c.graceful_shutdown()).await;
        }
        Protocol::Http2 => {
            let mut builder =
                hyper::server::conn::http2::Builder::new(TrackedExecutor(drain.clone()));
            builder
                .timer(TokioTimer::new())
                .max_concurrent_streams(settings.max_concurrent_streams)
                .max_header_list_size(settings.max_request_headers_bytes);
            let connection = builder.serve_connection(io, service);
            drive(connection, &conn, idle_timeout, |c| c.graceful_shutdown()).await;
        }
    }
}

/// Polls a connection to completion; on drain or idle timeout, asks it to
/// finish gracefully (HTTP/2 GOAWAY, HTTP/1.1 `connection: close` on the
/// in-flight response) and keeps polling until it does. The process-wide
/// drain deadline bounds that last wait.
async fn drive<C, E>(
    connection: C,
    conn: &Connection,
    idle_timeout: std::time::Duration,
    shutdown: fn(std::pin::Pin<&mut C>),
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut connection = std::pin::pin!(connection);
    let mut last_started = 0;
    let idle = tokio::time::sleep(idle_timeout);
    let mut idle = std::pin::pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(peer.addr = %conn.peer, %error, "connection ended with an error");
                }
                return;
            }
            () = conn.drain.cancelled(), if !closing => {
                closing = true;
                shutdown(connection.as_mut());
            }
            () = idle.as_mut(), if !closing => {
                // Idle means: nothing in flight and nothing started since
                // the last check, so a connection closes after one to two
                // idle timeouts of silence.
                let started = conn.started.load(Relaxed);
                if conn.in_flight.load(Relaxed) == 0 && started == last_started {
                    closing = true;
                    shutdown(connection.as_mut());
                } else {
                    last_started = started;
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                }
            }
        }
    }
}

/// Keeps the connection's in-flight count while a request is handled.
struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Handles one request; never fails (errors become responses).
async fn handle(
    conn: Arc<Connection>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    conn.started.fetch_add(1, Relaxed);
    conn.in_flight.fetch_add(1, Relaxed);
    let _in_flight = InFlight(&conn.in_flight);
    let listener = match conn.shared.load().listener(conn.index) {
        Some(ListenerSnapshot::Http(listener)) => listener.clone(),
        // The listener's kind cannot change under an open connection.
        _ => return Ok(to_response(&ProxyError::NoRoute, false)),
    };
    let is_grpc = is_grpc(req.headers());
    let log = listener.access_log.as_ref().map(|log| {
        (
            log.clone(),
            Box::new(AccessRecord {
                start: SystemTime::now(),
                listener: listener.config.name.clone(),
                route: Arc::from(""),
                method: req.method().clone(),
                uri: req.uri().clone(),
                host: req.headers().get(header::HOST).cloned(),
                version: req.version(),
                status: 0,
                flag: "",
                upstream: None,
                bytes_sent: 0,
                duration: std::time::Duration::ZERO,
                request_id: None,
                peer: conn.peer,
            }),
        )
    });
    let (mut response, route, metrics, flag, upstream, request_id) =
        match route_and_forward(&conn, &listener, req).await {
            Ok(done) => done,
            Err((error, route, metrics)) => {
                tracing::debug!(peer.addr = %conn.peer, %error, "request failed");
                (
                    to_response(&error, is_grpc),
                    route,
                    metrics,
                    error.flag(),
                    None,
                    None,
                )
            }
        };
    let metrics = metrics.unwrap_or_else(|| listener.unrouted.clone());
    let access = log.map(|(log, mut record)| {
        record.route = route.unwrap_or_else(|| Arc::from(""));
        record.status = response.status().as_u16();
        record.flag = flag;
        record.upstream = upstream;
        record.request_id = request_id;
        (log, record)
    });
    let status = response.status();
    response.body_mut().set_finish(Finish {
        start,
        status,
        metrics,
        access,
    });
    Ok(response)
}

type Routed = (
    Response<ResponseBody>,
    Option<Arc<str>>,
    Option<Arc<crate::telemetry::RequestMetrics>>,
    &'static str,
    Option<SocketAddr>,
    Option<HeaderValue>,
);
type Failed = (
    ProxyError,
    Option<Arc<str>>,
    Option<Arc<crate::telemetry::RequestMetrics>>,
);

async fn route_and_forward(
    conn: &Connection,
    listener: &HttpListener,
    mut req: Request<Incoming>,
) -> Result<Routed, Failed> {
    let settings = &listener.config;
    if req.headers().len() > settings.max_request_headers as usize
        || headers::header_list_size(req.headers()) > settings.max_request_headers_bytes as usize
    {
        return Err((ProxyError::HeadersTooLarge, None, None));
    }
    let authority = authority(&req).map_err(|e| (e, None, None))?;
    let host = authority.to_str().map_err(|_| {
        (
            ProxyError::Malformed("host is not visible ASCII"),
            None,
            None,
        )
    })?;
    let route: Arc<PreparedRoute> = {
        let parts = RequestParts {
            host,
            method: req.method(),
            path: req.uri().path(),
            headers: req.headers(),
        };
        listener
            .table
            .select(&parts)
            .cloned()
            .ok_or((ProxyError::NoRoute, None, None))?
    };
    let route_name = Some(route.name.clone());
    let (service, metrics) = match &route.action {
        PreparedAction::Direct {
            status,
            body,
            metrics,
        } => {
            let mut response = Response::new(ResponseBody::full(body.clone()));
            *response.status_mut() = *status;
            headers::apply(&route.response_headers, response.headers_mut());
            return Ok((response, route_name, Some(metrics.clone()), "", None, None));
        }
        PreparedAction::Forward {
            targets,
            total_weight,
        } => {
            let target = if targets.len() == 1 {
                &targets[0]
            } else {
                let x = crate::cluster::with_thread_rng(|rng| rng.u64(..*total_weight));
                let i = targets.partition_point(|t| t.cumulative_weight <= x);
                &targets[i.min(targets.len() - 1)]
            };
            (target.service.clone(), target.metrics.clone())
        }
    };

    // Prepare the upstream request.
    let is_upgrade =
        req.version() == Version::HTTP_11 && headers::is_upgrade_request(req.headers());
    let downstream_upgrade = is_upgrade.then(|| hyper::upgrade::on(&mut req));
    let version = req.version();
    let via = if version == Version::HTTP_2 {
        &listener.via_h2
    } else {
        &listener.via_h1
    };
    let request_id = {
        let h = req.headers_mut();
        headers::strip_hop_by_hop(h, is_upgrade);
        headers::add_forwarded(h, &conn.peer_ip);
        if let Some(via) = via {
            h.append(header::VIA, via.clone());
        }
        headers::apply(&route.request_headers, h);
        let host = route.host_rewrite.clone().unwrap_or(authority);
        h.insert(header::HOST, host);
        headers::ensure_request_id(h)
    };
    let path_and_query = rewrite_path(req.uri(), route.rewrite.as_ref())
        .map_err(|e| (e, route_name.clone(), Some(metrics.clone())))?;
    *req.uri_mut() = Uri::from(path_and_query);

    let mut service = service;
    let response = service
        .call(req)
        .await
        .map_err(|e| (e, route_name.clone(), Some(metrics.clone())))?;
    let upstream = response.body().endpoint();
    let (mut parts, body) = response.into_parts();
    let upgraded = parts.status == http::StatusCode::SWITCHING_PROTOCOLS;
    headers::strip_hop_by_hop(&mut parts.headers, upgraded && is_upgrade);
    headers::apply(&route.response_headers, &mut parts.headers);
    if let Some(via) = via {
        parts.headers.append(header::VIA, via.clone());
    }
    let mut response = Response::from_parts(parts, ResponseBody::upstream(body));
    if upgraded && let Some(downstream) = downstream_upgrade {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        conn.drain
            .spawn(tunnel(downstream, upstream_upgrade, conn.peer));
    }
    Ok((
        response,
        route_name,
        Some(metrics),
        "",
        Some(upstream),
        Some(request_id),
    ))
}

/// The request's authority: the URI's (HTTP/2, absolute-form) or `host`.
fn authority(req: &Request<Incoming>) -> Result<HeaderValue, ProxyError> {
    if let Some(authority) = req.uri().authority() {
        return HeaderValue::from_str(authority.as_str())
            .map_err(|_| ProxyError::Malformed("invalid authority"));
    }
    match req.headers().get(header::HOST) {
        Some(host) => Ok(host.clone()),
        // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request
        // without Host. HTTP/1.0 clients may omit it.
        None if req.version() == Version::HTTP_10 => Ok(HeaderValue::from_static("")),
        None => Err(ProxyError::Malformed("missing host")),
    }
}

/// The path and query to send upstream.
fn rewrite_path(uri: &Uri, rewrite: Option<&PathRewrite>) -> Result<PathAndQuery, ProxyError> {
    let original = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let Some(rewrite) = rewrite else {
        return Ok(original);
    };
    let path = original.path();
    let new_path = match rewrite {
        PathRewrite::Prefix {
            matched,
            replacement,
        } => {
            let rest = path.get(*matched..).unwrap_or("");
            // Literal replacement, as Envoy does, except that a "//" at
            // the seam collapses to one slash.
            if replacement.ends_with('/') && rest.starts_with('/') {
                format!("{}{}", replacement, &rest[1..])
            } else {
                format!("{replacement}{rest}")
            }
        }
        PathRewrite::Whole(replacement) => replacement.to_string(),
    };
    let new_path = if new_path.is_empty() {
        "/".to_owned()
    } else {
        new_path
    };
    let full = match original.query() {
        Some(query) => format!("{new_path}?{query}"),
        None => new_path,
    };
    PathAndQuery::try_from(full).map_err(|_| ProxyError::Malformed("rewritten path"))
}

/// Copies bytes between an upgraded client and upstream until either side
/// closes.
async fn tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    peer: SocketAddr,
) {
    let (Ok(downstream), Ok(upstream)) = (downstream.await, upstream.await) else {
        tracing::debug!(peer.addr = %peer, "upgrade did not complete");
        return;
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        tracing::debug!(peer.addr = %peer, %error, "upgraded connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rewrites_join_cleanly_and_keep_the_query() {
        let prefix = |matched: &str, replacement: &str| PathRewrite::Prefix {
            matched: matched.len(),
            replacement: replacement.into(),
        };
        let cases = [
            ("/api/users?x=1", prefix("/api", "/v2"), "/v2/users?x=1"),
            ("/api/users", prefix("/api/", "/"), "/users"),
            ("/api", prefix("/api", "/"), "/"),
            ("/api/users", prefix("/api", "/v2/"), "/v2/users"),
            ("/apiusers", prefix("/api", "/v2"), "/v2users"),
            ("/old", PathRewrite::Whole("/new".into()), "/new"),
            ("/old?q", PathRewrite::Whole("/new".into()), "/new?q"),
        ];
        for (uri, rewrite, want) in cases {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(
                rewrite_path(&uri, Some(&rewrite)).unwrap().as_str(),
                want,
                "{uri}"
            );
        }
    }
}
