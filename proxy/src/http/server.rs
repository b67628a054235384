//! Serving one downstream HTTP connection, and the per-request path up to
//! the route's stack: limits, connection telemetry, routing, header rules,
//! weighted split, upgrades, and recording the outcome.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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
use crate::listener::{ConnState, ConnectionGuard, Protocol, detect};
use crate::stack::{
    HttpListener, ListenerSnapshot, PathRewrite, PreparedAction, PreparedRoute, Shared,
};
use crate::telemetry::{AccessRecord, RequestMetrics};

/// hyper's HTTP/1 read buffer never goes below this.
const MIN_H1_BUFFER: usize = 8192;
/// hyper's HTTP/1 header count limit when none is set.
const HYPER_DEFAULT_MAX_HEADERS: u32 = 100;
/// The codec's hard ceiling on HTTP/1 header count.
const MAX_H1_HEADERS: usize = 10_000;
/// Deadline checks never run closer together than this.
const MIN_CHECK: Duration = Duration::from_millis(10);

/// Per-connection state shared by the connection's requests.
#[derive(Debug)]
struct Connection {
    index: usize,
    peer: SocketAddr,
    peer_ip: HeaderValue,
    shared: Shared,
    drain: Drain,
    state: Arc<ConnState>,
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
    let state = Arc::new(ConnState::new(true));
    let detected = detect(
        stream,
        settings.header_read_timeout,
        listener.metrics.clone(),
        state.clone(),
    )
    .await;
    let Some((io, protocol)) = detected else {
        return;
    };
    if protocol == Protocol::Http2 {
        // HTTP/2 frames between streams are not request heads.
        state.stop_tracking_heads();
    }
    let conn = Arc::new(Connection {
        index,
        peer,
        peer_ip: HeaderValue::try_from(peer.ip().to_string())
            .expect("an IP address is a valid header value"),
        shared,
        drain: drain.clone(),
        state,
    });
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| handle(conn.clone(), req))
    };
    let io = TokioIo::new(io);
    let deadlines = (settings.header_read_timeout, settings.idle_timeout);
    match protocol {
        Protocol::Http1 => {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                // The header deadline is ours (see `ConnState`): hyper's
                // would also cut idle keep-alive connections.
                .header_read_timeout(None)
                // Our own checks answer 431 with a body and the cause; the
                // codec's limits (somewhat larger) are the hard stop behind.
                .max_buf_size(
                    (settings.max_request_headers_bytes as usize + 4096).max(MIN_H1_BUFFER),
                );
            // PERF: a limit other than hyper's default (100) moves hyper's
            // header index arrays from the stack to two 6.4 KB heap
            // allocations per request (dhat, benches/RESULTS.md); so the
            // codec keeps its default unless the listener allows more.
            if settings.max_request_headers > HYPER_DEFAULT_MAX_HEADERS {
                builder.max_headers((settings.max_request_headers as usize).min(MAX_H1_HEADERS));
            }
            let connection = builder.serve_connection(io, service).with_upgrades();
            drive(connection, &conn, deadlines, |c| c.graceful_shutdown()).await;
        }
        Protocol::Http2 => {
            let mut builder =
                hyper::server::conn::http2::Builder::new(TrackedExecutor(drain.clone()));
            builder
                .timer(TokioTimer::new())
                .max_concurrent_streams(settings.max_concurrent_streams)
                .max_header_list_size(settings.max_request_headers_bytes);
            let connection = builder.serve_connection(io, service);
            drive(connection, &conn, deadlines, |c| c.graceful_shutdown()).await;
        }
    }
}

/// Polls a connection to completion and keeps its deadlines:
/// - a request head that started arriving more than the header timeout ago
///   drops the connection (slowloris);
/// - a connection with nothing in flight for the idle timeout, or the drain
///   signal, gets a graceful close (HTTP/2 GOAWAY, HTTP/1.1 close after the
///   in-flight response) and is polled until it finishes; the process-wide
///   drain deadline bounds that.
async fn drive<C, E>(
    connection: C,
    conn: &Connection,
    (header_timeout, idle_timeout): (Duration, Duration),
    shutdown: fn(Pin<&mut C>),
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut connection = std::pin::pin!(connection);
    let check_every = header_timeout.min(idle_timeout);
    let wake = tokio::time::sleep(check_every);
    let mut wake = std::pin::pin!(wake);
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
            () = wake.as_mut() => {
                let now = Instant::now();
                let next = if let Some(head) = conn.state.head_started() {
                    if now >= head + header_timeout {
                        tracing::debug!(peer.addr = %conn.peer, "request header timeout");
                        return;
                    }
                    head + header_timeout
                } else if let Some(idle) = conn.state.idle_since() {
                    if now >= idle + idle_timeout && !closing {
                        tracing::debug!(peer.addr = %conn.peer, "idle timeout");
                        closing = true;
                        shutdown(connection.as_mut());
                    }
                    (idle + idle_timeout).max(now).min(now + check_every)
                } else {
                    now + check_every
                };
                wake.as_mut().reset(tokio::time::Instant::from_std(next.max(now + MIN_CHECK)));
            }
        }
    }
}

/// What a request's telemetry learns on its way through.
#[derive(Debug, Default)]
struct Outcome {
    route: Option<Arc<str>>,
    metrics: Option<Arc<RequestMetrics>>,
    upstream: Option<SocketAddr>,
    request_id: Option<HeaderValue>,
}

/// Handles one request; never fails (errors become responses).
async fn handle(
    conn: Arc<Connection>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    let request = conn.state.begin_request();
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
                duration: Duration::ZERO,
                request_id: None,
                peer: conn.peer,
            }),
        )
    });
    let mut outcome = Outcome::default();
    let (mut response, status, flag) =
        match route_and_forward(&conn, &listener, req, &mut outcome).await {
            Ok(response) => {
                let status = response.status();
                (response, status, "")
            }
            Err(error) => {
                tracing::debug!(peer.addr = %conn.peer, %error, "request failed");
                outcome.upstream = outcome.upstream.or(error.endpoint());
                // Metrics count the error's status even when a gRPC caller
                // sees HTTP 200 with a grpc-status.
                (to_response(&error, is_grpc), error.status(), error.flag())
            }
        };
    let access = log.map(|(log, mut record)| {
        record.route = outcome.route.clone().unwrap_or_else(|| Arc::from(""));
        record.status = response.status().as_u16();
        record.flag = flag;
        record.upstream = outcome.upstream;
        record.request_id = outcome.request_id;
        (log, record)
    });
    let metrics = outcome.metrics.unwrap_or_else(|| listener.unrouted.clone());
    response.body_mut().set_finish(Finish {
        start,
        status,
        metrics,
        access,
        request: Some(request),
    });
    Ok(response)
}

async fn route_and_forward(
    conn: &Connection,
    listener: &HttpListener,
    mut req: Request<Incoming>,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, ProxyError> {
    let settings = &listener.config;
    if req.headers().len() > settings.max_request_headers as usize
        || headers::header_list_size(req.headers()) > settings.max_request_headers_bytes as usize
    {
        return Err(ProxyError::HeadersTooLarge);
    }
    let authority = authority(&req)?;
    let host = authority
        .to_str()
        .map_err(|_| ProxyError::Malformed("host is not visible ASCII"))?;
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
            .ok_or(ProxyError::NoRoute)?
    };
    outcome.route = Some(route.name.clone());
    let mut service = match &route.action {
        PreparedAction::Direct {
            status,
            body,
            metrics,
        } => {
            outcome.metrics = Some(metrics.clone());
            let mut response = Response::new(ResponseBody::full(body.clone()));
            *response.status_mut() = *status;
            headers::apply(&route.response_headers, response.headers_mut());
            return Ok(response);
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
            outcome.metrics = Some(target.metrics.clone());
            target.service.clone()
        }
    };

    // Prepare the upstream request. The route's own rules run before the
    // proxy's, so a route that removes `x-forwarded-for` (not trusting the
    // client's) still gets the client's address appended.
    let is_upgrade =
        req.version() == Version::HTTP_11 && headers::is_upgrade_request(req.headers());
    let downstream_upgrade = is_upgrade.then(|| hyper::upgrade::on(&mut req));
    let via = if req.version() == Version::HTTP_2 {
        &listener.via_h2
    } else {
        &listener.via_h1
    };
    {
        let h = req.headers_mut();
        headers::strip_hop_by_hop(h, is_upgrade);
        headers::apply(&route.request_headers, h);
        headers::add_forwarded(h, &conn.peer_ip);
        if let Some(via) = via {
            h.append(header::VIA, via.clone());
        }
        h.insert(
            header::HOST,
            route.host_rewrite.clone().unwrap_or(authority),
        );
        let request_id = headers::ensure_request_id(h);
        // Cloning a generated id costs an allocation; only the log needs it.
        if listener.access_log.is_some() {
            outcome.request_id = Some(request_id.clone());
        }
    }
    *req.uri_mut() = Uri::from(rewrite_path(req.uri(), route.rewrite.as_ref())?);

    let response = service.call(req).await?;
    outcome.upstream = Some(response.body().endpoint());
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
    Ok(response)
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
