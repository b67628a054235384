//! One request of the echo server: gRPC delegation, knobs, upgrades and the
//! plain echo.
//!
//! The fast path (no knob) reads each request header once, copies no header
//! and streams the request body straight back as the response body; its only
//! allocations are the response header map and the `x-echo-path` value.

use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::header::{
    CONNECTION, CONTENT_TYPE, EXPECT, HOST, InvalidHeaderValue, SEC_WEBSOCKET_KEY, TRAILER, UPGRADE,
};
use http::request::Parts;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tonic::codegen::Service as _;

use super::body::EchoBody;
use super::grpc::{self, GrpcHealthService, GrpcService};
use super::tasks::Tasks;
use super::upgrade;

static SERVER: HeaderName = HeaderName::from_static(super::X_ECHO_SERVER);
static METHOD: HeaderName = HeaderName::from_static(super::X_ECHO_METHOD);
static PATH: HeaderName = HeaderName::from_static(super::X_ECHO_PATH);
static ECHO_HOST: HeaderName = HeaderName::from_static(super::X_ECHO_HOST);
static VERSION: HeaderName = HeaderName::from_static(super::X_ECHO_VERSION);
static FAILED: HeaderName = HeaderName::from_static(super::X_ECHO_FAILED);

/// gRPC paths of the health service.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// State shared by every connection of one echo server.
#[derive(Debug)]
pub(crate) struct State {
    server_header: HeaderValue,
    requests: AtomicU64,
    /// Requests seen carrying `x-echo-fail-every`.
    fail_every_seen: AtomicU64,
    grpc: GrpcService,
    health: GrpcHealthService,
    /// Cleared by [`super::EchoServer::set_healthy`].
    healthy: Arc<AtomicBool>,
    tasks: Tasks,
}

impl State {
    pub(crate) fn new(name: &Arc<str>, tasks: Tasks) -> Result<Self, InvalidHeaderValue> {
        let healthy = Arc::new(AtomicBool::new(true));
        Ok(Self {
            health: grpc::health_service(Arc::clone(&healthy)),
            healthy,
            server_header: HeaderValue::from_str(name)?,
            requests: AtomicU64::new(0),
            fail_every_seen: AtomicU64::new(0),
            grpc: grpc::service(Arc::clone(name)),
            tasks,
        })
    }

    pub(crate) fn requests_served(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub(crate) fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    async fn grpc(&self, request: Request<Incoming>) -> Response<EchoBody> {
        // The generated services are cheap clones (an `Arc` and a few
        // settings) and always ready.
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            return match self.health.clone().call(request).await {
                Ok(response) => response.map(EchoBody::Grpc),
                Err(never) => match never {},
            };
        }
        match self.grpc.clone().call(request).await {
            Ok(response) => response.map(EchoBody::Grpc),
            Err(never) => match never {},
        }
    }
}

/// Why a request gets no response: hyper then drops an HTTP/1.1
/// connection, or resets an HTTP/2 stream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandleError {
    /// `x-echo-reset` asked for no response.
    #[error("reset requested by x-echo-reset")]
    ResetRequested,
    /// The request body failed before the response started.
    #[error("reading the request body failed")]
    Body(#[source] hyper::Error),
}

/// Answers one request.
pub(crate) async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<EchoBody>, HandleError> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let (mut parts, mut body) = request.into_parts();
    let scan = Scan::new(&parts.headers);
    if scan.is_grpc() {
        return Ok(state.grpc(Request::from_parts(parts, body)).await);
    }

    let mut headers = info_headers(&state, &parts, scan.host);
    if parts.uri.path() == super::ECHO_HEALTH_PATH && !state.healthy.load(Ordering::Relaxed) {
        return Ok(respond(
            StatusCode::SERVICE_UNAVAILABLE,
            headers,
            EchoBody::Empty,
        ));
    }
    let knobs = match Knobs::parse(&scan) {
        Ok(knobs) => knobs,
        Err(InvalidKnob(knob)) => {
            let message = format!("invalid value for {knob}\n");
            return Ok(respond(
                StatusCode::BAD_REQUEST,
                headers,
                EchoBody::full(message),
            ));
        }
    };

    if let Some(delay) = knobs.delay {
        tokio::time::sleep(delay).await;
    }
    if knobs.reset {
        return Err(HandleError::ResetRequested);
    }
    if knobs.echo_headers {
        echo_request_headers(&parts.headers, &mut headers);
    }
    if let Some(every) = knobs.fail_every {
        let seen = state.fail_every_seen.fetch_add(1, Ordering::Relaxed) + 1;
        if seen.is_multiple_of(every) {
            headers.insert(FAILED.clone(), HeaderValue::from_static("1"));
            return Ok(respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                headers,
                EchoBody::Empty,
            ));
        }
    }

    if let (Some(upgrade), Some(connection)) = (scan.upgrade, scan.connection)
        && parts.version <= Version::HTTP_11
        && upgrade::has_upgrade_token(connection)
        && let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>()
    {
        return Ok(upgrade::accept(
            on_upgrade,
            upgrade.clone(),
            scan.websocket_key,
            headers,
            &state.tasks,
        ));
    }

    let body = if let Some(len) = knobs.body_size {
        EchoBody::generated(len)
    } else {
        if let Some(content_type) = scan.content_type {
            headers.insert(CONTENT_TYPE, content_type.clone());
        }
        if let Some(trailer) = scan.trailer {
            // HTTP/1.1 sends only the trailer fields the response declares
            // (and only to a client that sent `te: trailers`).
            headers.insert(TRAILER, trailer.clone());
        }
        if scan.expects_continue() {
            // hyper sends `100 Continue` when the body is first polled, but
            // only while no response has been sent: read the first frame
            // before answering, or the client would never send the body.
            let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            match first.transpose() {
                Ok(first) => EchoBody::Echo { first, body },
                Err(err) => return Err(HandleError::Body(err)),
            }
        } else {
            EchoBody::echo(body)
        }
    };
    Ok(respond(
        knobs.status.unwrap_or(StatusCode::OK),
        headers,
        body,
    ))
}

fn respond(status: StatusCode, headers: HeaderMap, body: EchoBody) -> Response<EchoBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// The headers every plain HTTP response carries.
fn info_headers(state: &State, parts: &Parts, host: Option<&HeaderValue>) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(8);
    headers.insert(SERVER.clone(), state.server_header.clone());
    headers.insert(METHOD.clone(), method_value(&parts.method));
    headers.insert(PATH.clone(), path_value(&parts.uri));
    if let Some(host) = host.cloned().or_else(|| authority_value(&parts.uri)) {
        headers.insert(ECHO_HOST.clone(), host);
    }
    headers.insert(VERSION.clone(), version_value(parts.version));
    headers
}

fn method_value(method: &Method) -> HeaderValue {
    // Standard methods come from static strings: no allocation.
    match method.as_str() {
        "GET" => HeaderValue::from_static("GET"),
        "POST" => HeaderValue::from_static("POST"),
        "PUT" => HeaderValue::from_static("PUT"),
        "DELETE" => HeaderValue::from_static("DELETE"),
        "HEAD" => HeaderValue::from_static("HEAD"),
        "OPTIONS" => HeaderValue::from_static("OPTIONS"),
        "PATCH" => HeaderValue::from_static("PATCH"),
        "CONNECT" => HeaderValue::from_static("CONNECT"),
        "TRACE" => HeaderValue::from_static("TRACE"),
        // An extension method is a token, always a valid header value.
        other => HeaderValue::from_str(other).unwrap_or_else(|_| HeaderValue::from_static("?")),
    }
}

fn path_value(uri: &Uri) -> HeaderValue {
    let path = uri.path_and_query().map_or("", |pq| pq.as_str());
    // A parsed path holds only visible ASCII, always a valid header value.
    HeaderValue::from_str(path).unwrap_or_else(|_| HeaderValue::from_static("?"))
}

fn authority_value(uri: &Uri) -> Option<HeaderValue> {
    uri.authority()
        .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
}

fn version_value(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "?",
    })
}

/// Copies each request header named `x-*`, and the trace context
/// headers (`traceparent`, `tracestate`, `b3`), into the response as
/// `x-echo-req-<name>`. Only runs when asked for: it allocates per header.
fn echo_request_headers(request: &HeaderMap, response: &mut HeaderMap) {
    for (name, value) in request {
        let traced = matches!(name.as_str(), "traceparent" | "tracestate" | "b3");
        if !name.as_str().starts_with("x-") && !traced {
            continue;
        }
        let echoed = format!("{}{}", super::X_ECHO_REQ_PREFIX, name.as_str());
        if let Ok(echoed) = HeaderName::from_bytes(echoed.as_bytes()) {
            response.append(echoed, value.clone());
        }
    }
}

/// The request headers the echo reads, found in one pass over the map.
#[derive(Debug, Default)]
struct Scan<'a> {
    content_type: Option<&'a HeaderValue>,
    host: Option<&'a HeaderValue>,
    connection: Option<&'a HeaderValue>,
    expect: Option<&'a HeaderValue>,
    trailer: Option<&'a HeaderValue>,
    upgrade: Option<&'a HeaderValue>,
    websocket_key: Option<&'a HeaderValue>,
    status: Option<&'a HeaderValue>,
    delay_ms: Option<&'a HeaderValue>,
    body_size: Option<&'a HeaderValue>,
    fail_every: Option<&'a HeaderValue>,
    reset: Option<&'a HeaderValue>,
    echo_headers: Option<&'a HeaderValue>,
}

impl<'a> Scan<'a> {
    fn new(headers: &'a HeaderMap) -> Self {
        let mut scan = Scan::default();
        // The first value of each header wins; standard names compare as
        // enum tags, so only custom names cost a string comparison.
        for (name, value) in headers {
            let slot = if name == CONTENT_TYPE {
                &mut scan.content_type
            } else if name == HOST {
                &mut scan.host
            } else if name == CONNECTION {
                &mut scan.connection
            } else if name == TRAILER {
                &mut scan.trailer
            } else if name == EXPECT {
                &mut scan.expect
            } else if name == UPGRADE {
                &mut scan.upgrade
            } else if name == SEC_WEBSOCKET_KEY {
                &mut scan.websocket_key
            } else {
                match name.as_str() {
                    super::X_ECHO_STATUS => &mut scan.status,
                    super::X_ECHO_DELAY_MS => &mut scan.delay_ms,
                    super::X_ECHO_BODY_SIZE => &mut scan.body_size,
                    super::X_ECHO_FAIL_EVERY => &mut scan.fail_every,
                    super::X_ECHO_RESET => &mut scan.reset,
                    super::X_ECHO_HEADERS => &mut scan.echo_headers,
                    _ => continue,
                }
            };
            slot.get_or_insert(value);
        }
        scan
    }

    fn expects_continue(&self) -> bool {
        self.expect
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    }

    fn is_grpc(&self) -> bool {
        self.content_type
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
    }
}

/// The knobs of one request, parsed.
#[derive(Debug, Default)]
struct Knobs {
    status: Option<StatusCode>,
    delay: Option<Duration>,
    body_size: Option<u64>,
    fail_every: Option<u64>,
    reset: bool,
    echo_headers: bool,
}

/// A knob header whose value does not parse; names the header.
#[derive(Debug)]
struct InvalidKnob(&'static str);

impl Knobs {
    fn parse(scan: &Scan<'_>) -> Result<Self, InvalidKnob> {
        let status = number::<u16>(scan.status, super::X_ECHO_STATUS)?
            .map(|code| match StatusCode::from_u16(code) {
                Ok(status) if (200..=599).contains(&code) => Ok(status),
                _ => Err(InvalidKnob(super::X_ECHO_STATUS)),
            })
            .transpose()?;
        let fail_every = number::<u64>(scan.fail_every, super::X_ECHO_FAIL_EVERY)?;
        if fail_every == Some(0) {
            return Err(InvalidKnob(super::X_ECHO_FAIL_EVERY));
        }
        Ok(Self {
            status,
            delay: number(scan.delay_ms, super::X_ECHO_DELAY_MS)?.map(Duration::from_millis),
            body_size: number(scan.body_size, super::X_ECHO_BODY_SIZE)?,
            fail_every,
            reset: flag(scan.reset, super::X_ECHO_RESET)?,
            echo_headers: flag(scan.echo_headers, super::X_ECHO_HEADERS)?,
        })
    }
}

fn number<T: FromStr>(
    value: Option<&HeaderValue>,
    knob: &'static str,
) -> Result<Option<T>, InvalidKnob> {
    value
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or(InvalidKnob(knob))
        })
        .transpose()
}

fn flag(value: Option<&HeaderValue>, knob: &'static str) -> Result<bool, InvalidKnob> {
    match value.map(|v| v.as_bytes().trim_ascii()) {
        None => Ok(false),
        Some(b"1" | b"true") => Ok(true),
        Some(b"0" | b"false") => Ok(false),
        Some(_) => Err(InvalidKnob(knob)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|&(name, value)| {
                (
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn knobs_parse_valid_values() {
        let map = headers(&[
            ("x-echo-status", "503"),
            ("x-echo-delay-ms", " 25 "),
            ("x-echo-body-size", "1073741824"),
            ("x-echo-fail-every", "3"),
            ("x-echo-reset", "true"),
            ("x-echo-headers", "1"),
        ]);
        let knobs = Knobs::parse(&Scan::new(&map)).unwrap();
        assert_eq!(knobs.status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(knobs.delay, Some(Duration::from_millis(25)));
        assert_eq!(knobs.body_size, Some(1 << 30));
        assert_eq!(knobs.fail_every, Some(3));
        assert!(knobs.reset);
        assert!(knobs.echo_headers);
    }

    #[test]
    fn knobs_reject_invalid_values_naming_the_knob() {
        let cases = [
            ("x-echo-status", "abc"),
            ("x-echo-status", "99"),
            ("x-echo-status", "600"),
            ("x-echo-delay-ms", "-1"),
            ("x-echo-body-size", "1k"),
            ("x-echo-fail-every", "0"),
            ("x-echo-reset", "yes"),
            ("x-echo-headers", "2"),
        ];
        for (name, value) in cases {
            let map = headers(&[(name, value)]);
            let err = Knobs::parse(&Scan::new(&map)).unwrap_err();
            assert_eq!(err.0, name, "{name}: {value}");
        }
    }

    #[test]
    fn no_knob_means_plain_echo() {
        let map = headers(&[("content-type", "text/plain"), ("x-other", "1")]);
        let scan = Scan::new(&map);
        assert!(!scan.is_grpc());
        let knobs = Knobs::parse(&scan).unwrap();
        assert!(knobs.status.is_none() && knobs.delay.is_none() && knobs.body_size.is_none());
        assert!(knobs.fail_every.is_none() && !knobs.reset && !knobs.echo_headers);
    }

    #[test]
    fn grpc_is_detected_by_content_type_prefix() {
        for (content_type, expected) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/json", false),
        ] {
            let map = headers(&[("content-type", content_type)]);
            assert_eq!(Scan::new(&map).is_grpc(), expected, "{content_type}");
        }
    }
}
