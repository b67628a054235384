//! Span export: a bounded queue per exporter, drained in batches by a task
//! on the control runtime that encodes them as OTLP protobuf ([`super::otlp`])
//! and sends them over gRPC (`TraceService/Export`, HTTP/2) or OTLP/HTTP
//! (`POST`, protobuf body).
//!
//! The request path only `try_send`s a [`SpanRecord`]: a full queue drops
//! the span and counts it, it never blocks or grows. Listeners with equal
//! export settings share one exporter; it stops (after sending what it
//! holds) when no listener uses it any more.
//!
//! PERF: the OpenTelemetry SDK's exporter (`opentelemetry-otlp`) was used
//! at first; at 100 % sampling its conversions and encoding cost more than
//! the request itself (benches/RESULTS.md). The wire format is the same.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{Notify, mpsc};

use super::SpanRecord;
use super::otlp::Encoder;
use crate::config::{OtlpEndpoint, OtlpProtocol, TraceExport};

/// Counters of every exporter together.
#[derive(Debug, Default)]
pub struct TraceMetrics {
    /// Spans the collector accepted.
    pub spans_exported: AtomicU64,
    /// Spans dropped because the exporter's queue was full.
    pub spans_dropped: AtomicU64,
    /// Spans lost with a failed export.
    pub spans_failed: AtomicU64,
    /// Exports that failed (collector down, refused, timed out).
    pub exports_failed: AtomicU64,
}

/// One exporter's queue: what the request path sends spans to.
#[derive(Debug)]
pub(crate) struct Queue {
    sender: mpsc::Sender<SpanRecord>,
    metrics: Arc<TraceMetrics>,
    batch: Arc<Batch>,
}

/// What the request path and the exporter's task share besides the
/// channel: when a batch's worth is waiting.
#[derive(Debug)]
struct Batch {
    /// Spans in the channel (roughly: the task subtracts what it takes).
    queued: AtomicUsize,
    /// A full batch waits.
    size: usize,
    full: Notify,
}

impl Queue {
    /// Queues a span, or drops and counts it when the queue is full.
    ///
    /// PERF: the exporter's task is woken once per batch (by the first
    /// span, and by the one that fills a batch), not per span: a wake is a
    /// cross-thread notification, and the control thread may be parked.
    pub(crate) fn send(&self, span: SpanRecord) {
        if self.sender.try_send(span).is_err() {
            self.metrics.spans_dropped.fetch_add(1, Relaxed);
        } else if self.batch.queued.fetch_add(1, Relaxed) + 1 == self.batch.size {
            self.batch.full.notify_one();
        }
    }
}

/// The live exporters, by their settings.
#[derive(Debug)]
pub(crate) struct Exporters {
    control: tokio::runtime::Handle,
    metrics: Arc<TraceMetrics>,
    live: Mutex<HashMap<Arc<TraceExport>, Weak<Queue>>>,
}

impl Exporters {
    /// Exporters whose tasks run on `control`.
    pub(crate) fn new(control: tokio::runtime::Handle, metrics: Arc<TraceMetrics>) -> Self {
        Self {
            control,
            metrics,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The queue of the exporter for `export`: the running one when a
    /// listener already uses these settings, else a new one.
    pub(crate) fn queue(&self, export: &Arc<TraceExport>) -> Arc<Queue> {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.retain(|_, queue| queue.strong_count() > 0);
        if let Some(queue) = live.get(export).and_then(Weak::upgrade) {
            return queue;
        }
        let capacity = usize::try_from(export.max_queued_spans).unwrap_or(usize::MAX);
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let batch = Arc::new(Batch {
            queued: AtomicUsize::new(0),
            size: usize::try_from(export.max_export_batch)
                .unwrap_or(usize::MAX)
                .max(1),
            full: Notify::new(),
        });
        let queue = Arc::new(Queue {
            sender,
            metrics: self.metrics.clone(),
            batch: batch.clone(),
        });
        live.insert(export.clone(), Arc::downgrade(&queue));
        self.control
            .spawn(run(export.clone(), receiver, batch, self.metrics.clone()));
        queue
    }
}

/// An exporter's task: batches of at most `max_export_batch` spans, a
/// partial batch sent after `flush_interval`, one export at a time; ends
/// when every queue sender is gone and the last batch is sent.
async fn run(
    export: Arc<TraceExport>,
    mut receiver: mpsc::Receiver<SpanRecord>,
    shared: Arc<Batch>,
    metrics: Arc<TraceMetrics>,
) {
    let endpoint = &export.endpoint;
    let mut encoder = Encoder::new(&endpoint.service_name, &endpoint.resource_attributes);
    let mut client = Client::new(endpoint, GRPC_PATH);
    let max = usize::try_from(export.max_export_batch)
        .unwrap_or(usize::MAX)
        .max(1);
    let mut body = Vec::new();
    let mut open = true;
    while open {
        // The first span of a batch wakes the task; then it waits, not
        // woken by each span, for the interval or a full batch.
        let Some(first) = receiver.recv().await else {
            break;
        };
        encoder.push(&first);
        if shared.queued.load(Relaxed) < max {
            tokio::select! {
                () = tokio::time::sleep(export.flush_interval) => {}
                () = shared.full.notified() => {}
            }
        }
        while encoder.len() < max {
            match receiver.try_recv() {
                Ok(span) => encoder.push(&span),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        shared.queued.fetch_sub(encoder.len(), Relaxed);
        let count = encoder.len() as u64;
        encoder.finish(&mut body);
        let sent = tokio::time::timeout(endpoint.export_timeout, client.send(&body)).await;
        match sent {
            Ok(Ok(())) => {
                metrics.spans_exported.fetch_add(count, Relaxed);
            }
            Ok(Err(error)) => {
                client.reset();
                tracing::debug!(collector = %endpoint.collector, %error, spans = count, "trace export failed");
                metrics.exports_failed.fetch_add(1, Relaxed);
                metrics.spans_failed.fetch_add(count, Relaxed);
            }
            Err(_elapsed) => {
                client.reset();
                tracing::debug!(collector = %endpoint.collector, spans = count, "trace export timed out");
                metrics.exports_failed.fetch_add(1, Relaxed);
                metrics.spans_failed.fetch_add(count, Relaxed);
            }
        }
    }
}

/// gRPC's method path for OTLP traces.
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// The most of a collector's answer read.
const MAX_RESPONSE: usize = 64 * 1024;

/// A connection to the collector, opened on first use and again after a
/// failure.
#[derive(Debug)]
pub(crate) struct Client {
    protocol: OtlpProtocol,
    /// gRPC: the export method's path.
    grpc_path: &'static str,
    /// The collector's URL (HTTP: its path is where spans are POSTed).
    url: Uri,
    /// `host:port`, for connecting.
    authority: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    connection: Option<Connection>,
}

#[derive(Debug)]
enum Connection {
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
}

impl Client {
    /// A client of `endpoint`, calling `grpc_path` over gRPC (OTLP/HTTP
    /// posts to the collector URL's path).
    pub(crate) fn new(endpoint: &OtlpEndpoint, grpc_path: &'static str) -> Self {
        // Validation checked the URL and the headers.
        let url: Uri = endpoint.collector.parse().unwrap_or_default();
        let authority = url.authority().map_or_else(String::new, |a| {
            if a.port().is_some() {
                a.as_str().to_owned()
            } else {
                format!("{}:80", a.as_str())
            }
        });
        let headers = endpoint
            .headers
            .iter()
            .filter_map(|(name, value)| {
                Some((
                    HeaderName::from_bytes(name.as_bytes()).ok()?,
                    HeaderValue::from_str(value).ok()?,
                ))
            })
            .collect();
        Self {
            protocol: endpoint.protocol,
            grpc_path,
            url,
            authority,
            headers,
            connection: None,
        }
    }

    /// Forgets the connection (after a failure): the next export opens a
    /// new one.
    pub(crate) fn reset(&mut self) {
        self.connection = None;
    }

    async fn connect(&self) -> Result<Connection, String> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.authority))?;
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        match self.protocol {
            OtlpProtocol::Grpc => {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
                tokio::spawn(connection);
                Ok(Connection::Http2(sender))
            }
            OtlpProtocol::HttpProtobuf => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
                tokio::spawn(connection);
                Ok(Connection::Http1(sender))
            }
        }
    }

    /// Sends one export request (`message`, encoded).
    pub(crate) async fn send(&mut self, message: &[u8]) -> Result<(), String> {
        let usable = match &self.connection {
            Some(Connection::Http2(sender)) => !sender.is_closed(),
            Some(Connection::Http1(sender)) => !sender.is_closed(),
            None => false,
        };
        if !usable {
            self.connection = Some(self.connect().await?);
        }
        let mut request = match self.protocol {
            OtlpProtocol::Grpc => {
                // A gRPC message: not compressed, its length, the bytes.
                let mut framed = Vec::with_capacity(5 + message.len());
                framed.push(0);
                let len = u32::try_from(message.len()).map_err(|_| "batch too large")?;
                framed.extend_from_slice(&len.to_be_bytes());
                framed.extend_from_slice(message);
                let uri = format!("http://{}{}", self.authority, self.grpc_path);
                let mut request = Request::post(uri).body(Full::new(Bytes::from(framed)));
                if let Ok(request) = &mut request {
                    let headers = request.headers_mut();
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/grpc"),
                    );
                    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
                }
                request
            }
            OtlpProtocol::HttpProtobuf => {
                let path = self
                    .url
                    .path_and_query()
                    .map_or("/", http::uri::PathAndQuery::as_str);
                let mut request =
                    Request::post(path).body(Full::new(Bytes::copy_from_slice(message)));
                if let Ok(request) = &mut request {
                    let headers = request.headers_mut();
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/x-protobuf"),
                    );
                    if let Ok(host) = HeaderValue::from_str(&self.authority) {
                        headers.insert(http::header::HOST, host);
                    }
                }
                request
            }
        }
        .map_err(|e| format!("building the request: {e}"))?;
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        let response = match &mut self.connection {
            Some(Connection::Http2(sender)) => sender.send_request(request).await,
            Some(Connection::Http1(sender)) => sender.send_request(request).await,
            None => return Err("no connection".into()),
        }
        .map_err(|e| format!("sending: {e}"))?;
        let status = response.status();
        let (parts, body) = response.into_parts();
        let collected = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if !status.is_success() {
            return Err(format!("the collector answered {status}"));
        }
        if self.protocol == OtlpProtocol::Grpc {
            // `grpc-status` in the trailers, or in the headers of a
            // trailers-only answer.
            let trailers = collected.trailers();
            let grpc = trailers
                .and_then(|t| t.get("grpc-status"))
                .or_else(|| parts.headers.get("grpc-status"));
            match grpc.map(HeaderValue::as_bytes) {
                Some(b"0") => {}
                Some(code) => {
                    let message = trailers
                        .and_then(|t| t.get("grpc-message"))
                        .or_else(|| parts.headers.get("grpc-message"))
                        .and_then(|m| m.to_str().ok())
                        .unwrap_or("");
                    return Err(format!(
                        "grpc-status {}: {message}",
                        String::from_utf8_lossy(code)
                    ));
                }
                None => return Err("no grpc-status in the answer".into()),
            }
        }
        Ok(())
    }
}
