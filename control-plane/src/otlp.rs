//! A small OTLP receiver: it takes the spans proxies export, over gRPC
//! (`TraceService/Export`) or HTTP/protobuf (`POST /v1/traces`), and keeps
//! the latest ones in memory; and their metrics (`MetricsService/Export`,
//! `POST /v1/metrics`), keeping each exporter's latest export. `weft-cp demo` uses it to show a
//! request's trace without a tracing backend; the end-to-end tests use it
//! as their collector. Bound with [`Receiver::bind_counting`] it decodes
//! nothing and only counts (the collector of a tracing benchmark, which
//! must cost the machine little).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};
use tower::Service;

/// Spans kept at most; older ones are forgotten first.
const MAX_SPANS: usize = 20_000;
/// The largest HTTP export body taken.
const MAX_BODY: usize = 16 << 20;

/// A span as received, flattened: hex ids, attributes as text.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// The exporter's `service.name`.
    pub service: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; empty for a trace's root.
    pub parent_span_id: String,
    pub name: String,
    /// `server`, `client`, `internal`, `producer`, `consumer` or
    /// `unspecified`.
    pub kind: &'static str,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// Attribute values as text (strings unquoted).
    pub attributes: BTreeMap<String, String>,
    /// Event names, in order.
    pub events: Vec<String>,
    /// The span's status is an error.
    pub is_error: bool,
}

/// A metric point as received: for a sum or a gauge its value, for a
/// histogram its count.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedPoint {
    /// The metric's name.
    pub name: String,
    /// `sum`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// Attribute values as text.
    pub attributes: BTreeMap<String, String>,
    pub value: f64,
}

impl ReceivedSpan {
    /// An attribute's value, if the span has it.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// How long the span took.
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_unix_nanos.saturating_sub(self.start_unix_nanos))
    }
}

#[derive(Debug, Default)]
struct State {
    /// Only count exports: decode and keep nothing.
    counting: bool,
    spans: Mutex<VecDeque<ReceivedSpan>>,
    /// Export requests received (gRPC and HTTP).
    exports: std::sync::atomic::AtomicU64,
    /// Their bodies' bytes, counting only.
    bytes: std::sync::atomic::AtomicU64,
    /// The `x-*` headers (gRPC: metadata) exports came with, latest last.
    headers: Mutex<BTreeMap<String, String>>,
    /// Each exporter's latest metrics, by its `service.name` and
    /// `service.instance.id`.
    metrics: Mutex<BTreeMap<(String, String), Vec<ReceivedPoint>>>,
    arrived: Notify,
}

impl State {
    fn note_headers(&self, headers: &http::HeaderMap) {
        let mut seen = self.headers.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, value) in headers {
            if name.as_str().starts_with("x-")
                && let Ok(value) = value.to_str()
            {
                seen.insert(name.as_str().to_owned(), value.to_owned());
            }
        }
    }

    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    if spans.len() == MAX_SPANS {
                        spans.pop_front();
                    }
                    spans.push_back(ReceivedSpan {
                        service: service.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        kind: match span.kind {
                            1 => "internal",
                            2 => "server",
                            3 => "client",
                            4 => "producer",
                            5 => "consumer",
                            _ => "unspecified",
                        },
                        name: span.name,
                        start_unix_nanos: span.start_time_unix_nano,
                        end_unix_nanos: span.end_time_unix_nano,
                        attributes: attributes(&span.attributes),
                        events: span.events.into_iter().map(|e| e.name).collect(),
                        // STATUS_CODE_ERROR
                        is_error: span.status.is_some_and(|s| s.code == 2),
                    });
                }
            }
        }
        drop(spans);
        self.exports
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.arrived.notify_waiters();
    }

    fn take_metrics(&self, request: ExportMetricsServiceRequest) {
        let mut latest = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        for resource in request.resource_metrics {
            let resource_attributes = resource
                .resource
                .as_ref()
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let key = ["service.name", "service.instance.id"]
                .map(|k| resource_attributes.get(k).cloned().unwrap_or_default());
            let mut points = Vec::new();
            for scope in resource.scope_metrics {
                for metric in scope.metrics {
                    let number = |p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint| {
                        match p.value {
                            Some(number_data_point::Value::AsInt(i)) => i as f64,
                            Some(number_data_point::Value::AsDouble(d)) => d,
                            None => 0.0,
                        }
                    };
                    let (kind, found): (_, Vec<_>) = match &metric.data {
                        Some(metric::Data::Sum(sum)) => (
                            "sum",
                            sum.data_points
                                .iter()
                                .map(|p| (attributes(&p.attributes), number(p)))
                                .collect(),
                        ),
                        Some(metric::Data::Gauge(gauge)) => (
                            "gauge",
                            gauge
                                .data_points
                                .iter()
                                .map(|p| (attributes(&p.attributes), number(p)))
                                .collect(),
                        ),
                        Some(metric::Data::Histogram(histogram)) => (
                            "histogram",
                            histogram
                                .data_points
                                .iter()
                                .map(|p| (attributes(&p.attributes), p.count as f64))
                                .collect(),
                        ),
                        _ => continue,
                    };
                    points.extend(found.into_iter().map(|(attributes, value)| ReceivedPoint {
                        name: metric.name.clone(),
                        kind,
                        attributes,
                        value,
                    }));
                }
            }
            latest.insert((key[0].clone(), key[1].clone()), points);
        }
        drop(latest);
        self.exports
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.arrived.notify_waiters();
    }
}

#[derive(Debug, Clone)]
struct GrpcMetrics(Arc<State>);

#[tonic::async_trait]
impl MetricsService for GrpcMetrics {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0
            .note_headers(&request.metadata().clone().into_headers());
        self.0.take_metrics(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[derive(Debug, Clone)]
struct Grpc(Arc<State>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .note_headers(&request.metadata().clone().into_headers());
        self.0.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The receiver: a gRPC port and an HTTP port on loopback (or wherever
/// bound); serves until dropped.
#[derive(Debug)]
pub struct Receiver {
    grpc: SocketAddr,
    http: SocketAddr,
    state: Arc<State>,
    _stop: DropGuard,
}

impl Receiver {
    /// Binds both ports (port 0 picks free ones) and starts serving.
    pub async fn bind(grpc: SocketAddr, http: SocketAddr) -> std::io::Result<Self> {
        Self::start(grpc, http, false).await
    }

    /// Binds both ports and answers every export with success after
    /// reading its body, decoding nothing: [`Receiver::exports`] and
    /// [`Receiver::bytes`] count them, [`Receiver::spans`] stays empty.
    pub async fn bind_counting(grpc: SocketAddr, http: SocketAddr) -> std::io::Result<Self> {
        Self::start(grpc, http, true).await
    }

    async fn start(grpc: SocketAddr, http: SocketAddr, counting: bool) -> std::io::Result<Self> {
        let grpc_listener = TcpListener::bind(grpc).await?;
        let http_listener = TcpListener::bind(http).await?;
        let state = Arc::new(State {
            counting,
            ..State::default()
        });
        let stop = CancellationToken::new();
        let receiver = Self {
            grpc: grpc_listener.local_addr()?,
            http: http_listener.local_addr()?,
            state: state.clone(),
            _stop: stop.clone().drop_guard(),
        };
        tokio::spawn(serve(grpc_listener, state.clone(), true, stop.clone()));
        tokio::spawn(serve(http_listener, state, false, stop));
        Ok(receiver)
    }

    /// The gRPC collector's URL (`http://ADDR`).
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The HTTP collector's URL (`http://ADDR/v1/traces`).
    pub fn http_url(&self) -> String {
        format!("http://{}/v1/traces", self.http)
    }

    /// The spans received so far (the latest [`MAX_SPANS`]).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.state
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The `x-*` headers (gRPC metadata) exports came with; a later value
    /// replaces an earlier one.
    pub fn headers(&self) -> BTreeMap<String, String> {
        self.state
            .headers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The spans of the latest trace whose root `matches` (a root: a span
    /// whose parent is not among the received ones, or that has none),
    /// without copying any other span.
    pub fn latest_trace(&self, matches: impl Fn(&ReceivedSpan) -> bool) -> Vec<ReceivedSpan> {
        let spans = self
            .state
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(root) = spans.iter().rev().find(|s| matches(s)) else {
            return Vec::new();
        };
        let trace = root.trace_id.clone();
        spans
            .iter()
            .filter(|s| s.trace_id == trace)
            .cloned()
            .collect()
    }

    /// The latest metrics of each exporter, by its `service.name` and
    /// `service.instance.id`.
    pub fn metrics(&self) -> BTreeMap<(String, String), Vec<ReceivedPoint>> {
        self.state
            .metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Bytes of the export bodies counted ([`Receiver::bind_counting`]).
    pub fn bytes(&self) -> u64 {
        self.state.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Export requests received.
    pub fn exports(&self) -> u64 {
        self.state
            .exports
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `done` holds for the spans received, or `timeout`
    /// passes; returns the spans either way and whether `done` held.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> (Vec<ReceivedSpan>, bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.state.arrived.notified();
            let spans = self.spans();
            if done(&spans) {
                return (spans, true);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                let spans = self.spans();
                let held = done(&spans);
                return (spans, held);
            }
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<State>, grpc: bool, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let state = state.clone();
        let stop = stop.clone();
        let traces = TraceServiceServer::new(Grpc(state.clone()));
        let metrics = MetricsServiceServer::new(GrpcMetrics(state.clone()));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                let (mut traces, mut metrics) = (traces.clone(), metrics.clone());
                async move {
                    let response = if state.counting {
                        any(count(&state, request, grpc).await)
                    } else if grpc
                        && request
                            .uri()
                            .path()
                            .starts_with("/opentelemetry.proto.collector.metrics.")
                    {
                        any(metrics.call(request).await?)
                    } else if grpc {
                        any(traces.call(request).await?)
                    } else {
                        any(http_export(&state, request).await)
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let io = TokioIo::new(stream);
            if grpc {
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service);
                tokio::select! {
                    _ = connection => {}
                    () = stop.cancelled() => {}
                }
            } else {
                let connection =
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service);
                tokio::select! {
                    _ = connection => {}
                    () = stop.cancelled() => {}
                }
            }
        });
    }
}

/// Any of the answers' bodies.
type AnyBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn any<B>(response: Response<B>) -> Response<AnyBody>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    response.map(|body| body.map_err(Into::into).boxed_unsync())
}

/// An export counted, not decoded: success (gRPC: a trailers-only answer,
/// its status in the headers).
async fn count(state: &State, request: Request<Incoming>, grpc: bool) -> Response<Full<Bytes>> {
    use std::sync::atomic::Ordering::Relaxed;
    let size = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_or(0, |body| body.to_bytes().len());
    state.exports.fetch_add(1, Relaxed);
    state.bytes.fetch_add(size as u64, Relaxed);
    let mut response = Response::new(Full::new(Bytes::new()));
    let headers = response.headers_mut();
    if grpc {
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", http::HeaderValue::from_static("0"));
    } else {
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
    }
    response
}

/// OTLP/HTTP with protobuf bodies.
async fn http_export(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let answer = |status: StatusCode, body: Bytes| {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        response
    };
    let metrics = match (request.method(), request.uri().path()) {
        (&http::Method::POST, "/v1/traces") => false,
        (&http::Method::POST, "/v1/metrics") => true,
        _ => return answer(StatusCode::NOT_FOUND, Bytes::new()),
    };
    state.note_headers(request.headers());
    let Ok(body) = Limited::new(request.into_body(), MAX_BODY).collect().await else {
        return answer(StatusCode::PAYLOAD_TOO_LARGE, Bytes::new());
    };
    if metrics {
        return match ExportMetricsServiceRequest::decode(body.to_bytes()) {
            Ok(export) => {
                state.take_metrics(export);
                let response = ExportMetricsServiceResponse {
                    partial_success: None,
                };
                answer(StatusCode::OK, response.encode_to_vec().into())
            }
            Err(_) => answer(StatusCode::BAD_REQUEST, Bytes::new()),
        };
    }
    match ExportTraceServiceRequest::decode(body.to_bytes()) {
        Ok(export) => {
            state.take(export);
            let response = ExportTraceServiceResponse {
                partial_success: None,
            };
            answer(StatusCode::OK, response.encode_to_vec().into())
        }
        Err(_) => answer(StatusCode::BAD_REQUEST, Bytes::new()),
    }
}
