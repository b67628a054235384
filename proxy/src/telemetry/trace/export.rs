//! Span export: a bounded queue per exporter, drained in batches by a task
//! on the control runtime that sends them over gRPC (`TraceService/Export`,
//! HTTP/2) or OTLP/HTTP (`POST`, protobuf body).
//!
//! The request path writes an ended span as OTLP protobuf
//! ([`super::otlp`]) and appends the bytes to the queue: a full queue drops the span
//! and counts it, it never blocks or grows. Listeners with equal export
//! settings share one exporter; it stops (after sending what it holds)
//! when no listener uses it any more.
//!
//! PERF: each span is written by the worker that ends it, into its batch's
//! buffer, which the exporter's task takes; the task only writes the
//! message's head into the room left for it before the spans
//! ([`Encoder::wrap`]) and sends the buffer as it is.
//! When the task wrote whole batches, its bursts of work on the control
//! thread took turns on a saturated worker's core in the middle of
//! requests, and each span's memory, allocated by a worker, was freed by
//! the control thread: wrk's p99 with every request traced was 1.5-1.6x
//! that without tracing at saturation, against 1.26-1.38x now, and 1.20x
//! against 1.12x at a fixed 15,000 requests a second (benches/RESULTS.md).
//!
//! PERF: the OpenTelemetry SDK's exporter (`opentelemetry-otlp`) was used
//! at first; at 100 % sampling its conversions and encoding cost more than
//! the request itself (benches/RESULTS.md). The wire format is the same.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::sync::Notify;

use super::SpanRecord;
use super::otlp::{Encoder, GRPC_HEADER, SpanWriter};
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

thread_local! {
    /// Each worker's scratch space for writing a span before its length
    /// is known.
    static WRITER: RefCell<SpanWriter> = RefCell::default();
}

/// One exporter's queue: what the request path sends spans to.
#[derive(Debug)]
pub(crate) struct Queue {
    shared: Arc<Shared>,
    metrics: Arc<TraceMetrics>,
}

/// What the request path and the exporter's task share.
#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    /// The bytes a batch leaves before its first span, for the message's
    /// head ([`Encoder::room`]).
    room: usize,
    /// How many spans `pending` holds, as last written under its lock:
    /// read without the lock, so that a span the full queue would drop is
    /// not written first.
    queued: AtomicUsize,
    /// The most spans pending: more are dropped.
    capacity: usize,
    /// A full batch: the task sends it without waiting for the interval.
    batch: usize,
    /// A full batch is pending, or the queue is closed.
    wake: Notify,
}

/// Spans written and not yet taken by the exporter's task.
#[derive(Debug, Default)]
struct Pending {
    /// Batches of at most `Shared::batch` spans; only the last may have
    /// room for more.
    batches: Vec<Batch>,
    /// Spans in `batches`.
    spans: usize,
    /// The size of the last batch filled: the next one's buffer is
    /// allocated as large, so that it does not grow (and copy) span by span.
    filled: usize,
    /// Buffers of batches sent, emptied, for the next batches (at most
    /// [`SPARE_BUFFERS`]).
    spare: Vec<Vec<u8>>,
    /// Every sender is gone: the task sends what is left and stops.
    closed: bool,
}

/// One export's spans, one after the other as [`SpanWriter::write`] wrote
/// them, after `Shared::room` bytes left free.
#[derive(Debug)]
struct Batch {
    bytes: Vec<u8>,
    spans: usize,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A span is pending, or the queue is closed.
    fn has_work(&self) -> bool {
        let pending = self.pending();
        pending.spans > 0 || pending.closed
    }

    /// Keeps a sent batch's buffer, emptied, for a batch to come.
    fn give_back(&self, buffer: Vec<u8>) {
        let mut pending = self.pending();
        if pending.spare.len() < SPARE_BUFFERS {
            pending.spare.push(buffer);
            return;
        }
        // Freed without the lock.
        drop(pending);
        drop(buffer);
    }
}

/// The most sent batches' buffers kept for reuse: one per export in flight
/// and one being filled.
///
/// PERF: a batch's buffer (150 KiB for 512 spans) was allocated by the
/// worker and freed by the exporter: the worker's writes into it fell on
/// memory not in the cache, some of it on pages mapped again (about 2 page
/// faults per 100 traced requests under wrk, none once kept), and each
/// allocation that large had glibc first merge the small chunks freed
/// since the last (`malloc_consolidate`) (benches/RESULTS.md).
const SPARE_BUFFERS: usize = MAX_IN_FLIGHT + 1;

/// Room for spans in the first batch's buffer, before a full batch's size
/// is known: it grows from there.
const FIRST_SPANS: usize = 4096;

impl Queue {
    /// Queues a span, or drops and counts it when the queue is full.
    ///
    /// PERF: the span is written here, by the worker, into its batch's
    /// buffer: no allocation per span (one per batch), and none
    /// freed on another thread per span (glibc then takes the allocating
    /// thread's arena lock, which the worker needs for its own
    /// allocations). The task is woken once per full batch, not per span
    /// (a partial batch waits for its timer).
    pub(crate) fn send(&self, span: &SpanRecord) {
        // The collector is slow or down and the queue full: drop the span
        // without taking the lock. (Racing with the exporter's take, at
        // worst the lock is taken to find the queue full, or a span is
        // dropped while room has just been made.)
        if self.shared.queued.load(Relaxed) >= self.shared.capacity {
            self.metrics.spans_dropped.fetch_add(1, Relaxed);
            return;
        }
        let queued = WRITER.with_borrow_mut(|writer| {
            let mut pending = self.shared.pending();
            if pending.spans >= self.shared.capacity {
                return None;
            }
            let pending = &mut *pending;
            let batch = match pending.batches.last_mut() {
                Some(last) if last.spans < self.shared.batch => last,
                _ => {
                    let room = self.shared.room;
                    let mut bytes = pending.spare.pop().unwrap_or_else(|| {
                        Vec::with_capacity(pending.filled.max(room + FIRST_SPANS))
                    });
                    bytes.resize(room, 0);
                    pending.batches.push(Batch { bytes, spans: 0 });
                    let last = pending.batches.len() - 1;
                    &mut pending.batches[last]
                }
            };
            writer.write(span, &mut batch.bytes);
            batch.spans += 1;
            if batch.spans == self.shared.batch {
                pending.filled = batch.bytes.len();
            }
            pending.spans += 1;
            self.shared.queued.store(pending.spans, Relaxed);
            Some(pending.spans)
        });
        match queued {
            None => {
                self.metrics.spans_dropped.fetch_add(1, Relaxed);
            }
            Some(queued) if queued == self.shared.batch => self.shared.wake.notify_one(),
            Some(_) => {}
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.shared.pending().closed = true;
        self.shared.wake.notify_one();
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
        let room = Encoder::new(
            &export.endpoint.service_name,
            &export.endpoint.resource_attributes,
        )
        .room();
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            room,
            queued: AtomicUsize::new(0),
            capacity: usize::try_from(export.max_queued_spans)
                .unwrap_or(usize::MAX)
                .max(1),
            batch: usize::try_from(export.max_export_batch)
                .unwrap_or(usize::MAX)
                .max(1),
            wake: Notify::new(),
        });
        let queue = Arc::new(Queue {
            shared: shared.clone(),
            metrics: self.metrics.clone(),
        });
        live.insert(export.clone(), Arc::downgrade(&queue));
        self.control
            .spawn(run(export.clone(), shared, self.metrics.clone()));
        queue
    }
}

/// Exports in flight at once, each on a connection of its own.
///
/// PERF: one export at a time waits for the collector's answer before the
/// next batch goes: about 58 batches of 512 a second against a collector on
/// a busy core, so a saturated worker's spans (90,000 a second) were mostly
/// dropped (benches/RESULTS.md).
const MAX_IN_FLIGHT: usize = 4;

/// An exporter's task: batches of at most `max_export_batch` spans, a
/// partial batch sent after `flush_interval`, up to [`MAX_IN_FLIGHT`]
/// exports at a time; ends when every queue sender is gone and the last
/// batch is sent.
async fn run(export: Arc<TraceExport>, shared: Arc<Shared>, metrics: Arc<TraceMetrics>) {
    let endpoint = &export.endpoint;
    let encoder = Encoder::new(&endpoint.service_name, &endpoint.resource_attributes);
    let mut idle: Vec<Client> = Vec::new();
    let mut in_flight = tokio::task::JoinSet::<Client>::new();
    let mut taken = Vec::new();
    loop {
        // A full batch (or the queue's end) wakes the task; what is
        // pending goes after the interval.
        //
        // PERF: a wake-up by each batch's first span as well cost one
        // more context switch per batch, on a saturated worker's own core
        // when the proxy runs on one.
        let waits = {
            let pending = shared.pending();
            pending.spans < shared.batch && !pending.closed
        };
        if waits {
            tokio::select! {
                () = tokio::time::sleep(export.flush_interval) => {}
                // A notification sent since the check is kept for this
                // wait: none is missed.
                () = shared.wake.notified() => {}
            }
            if !shared.has_work() {
                continue;
            }
        }
        let closed = {
            let mut pending = shared.pending();
            std::mem::swap(&mut pending.batches, &mut taken);
            pending.spans = 0;
            shared.queued.store(0, Relaxed);
            pending.closed
        };
        for Batch { mut bytes, spans } in taken.drain(..) {
            // A client that is free, or the first one to be.
            while idle.is_empty() && in_flight.len() >= MAX_IN_FLIGHT {
                if let Some(Ok(done)) = in_flight.join_next().await {
                    idle.push(done);
                }
            }
            let mut client = idle
                .pop()
                .unwrap_or_else(|| Client::new(endpoint, GRPC_PATH));
            let start = encoder.wrap(&mut bytes);
            let message = Message::framed(bytes, start);
            let count = spans as u64;
            let (metrics, export, shared) = (metrics.clone(), export.clone(), shared.clone());
            in_flight.spawn(async move {
                let endpoint = &export.endpoint;
                match client.export(&message, endpoint.export_timeout).await {
                    Ok(()) => {
                        metrics.spans_exported.fetch_add(count, Relaxed);
                    }
                    Err(error) => {
                        tracing::debug!(collector = %endpoint.collector, %error, spans = count, "trace export failed");
                        metrics.exports_failed.fetch_add(1, Relaxed);
                        metrics.spans_failed.fetch_add(count, Relaxed);
                    }
                }
                if let Some(buffer) = message.into_buffer() {
                    shared.give_back(buffer);
                }
                client
            });
        }
        if closed {
            // What is in flight goes out before the task ends.
            while in_flight.join_next().await.is_some() {}
            break;
        }
    }
}

/// The first wait before an export is sent again.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between attempts.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// The longest `retry-after` honoured (the export's timeout bounds it too).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Why one attempt failed, and whether OTLP says to try again.
#[derive(Debug)]
struct Failure {
    message: String,
    retryable: bool,
    /// The collector's `retry-after`, in seconds.
    retry_after: Option<Duration>,
}

impl Failure {
    fn retryable(message: String) -> Self {
        Self {
            message,
            retryable: true,
            retry_after: None,
        }
    }

    fn fatal(message: String) -> Self {
        Self {
            message,
            retryable: false,
            retry_after: None,
        }
    }
}

/// A `retry-after` of whole seconds (an HTTP date is not honoured).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// gRPC's method path for OTLP traces.
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// The most of a collector's answer read.
const MAX_RESPONSE: usize = 64 * 1024;

/// An export's body: an OTLP message after gRPC's frame header (sent
/// over gRPC with it, over OTLP/HTTP without).
#[derive(Debug, Clone)]
pub(crate) struct Message {
    framed: Bytes,
}

impl Message {
    /// The message that follows the frame header at `start` in `buffer`,
    /// to its end, as [`Encoder::wrap`] left it: not copied.
    fn framed(buffer: Vec<u8>, start: usize) -> Self {
        Self {
            framed: Bytes::from(buffer).slice(start..),
        }
    }

    /// `encoded`, copied after a frame header of its own.
    pub(crate) fn copied(encoded: &[u8]) -> Self {
        let mut framed = Vec::with_capacity(GRPC_HEADER + encoded.len());
        framed.push(0);
        // Past gRPC's 4 GiB limit the export fails ("too large").
        let len = u32::try_from(encoded.len()).unwrap_or(u32::MAX);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(encoded);
        Self {
            framed: Bytes::from(framed),
        }
    }

    /// The buffer the message was written in, emptied, unless the
    /// connection still holds part of it.
    fn into_buffer(self) -> Option<Vec<u8>> {
        let mut buffer = self.framed.try_into_mut().ok()?;
        buffer.clear();
        Some(buffer.into())
    }

    /// The message, without its frame header.
    fn unframed(&self) -> Bytes {
        self.framed.slice(GRPC_HEADER.min(self.framed.len())..)
    }
}

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
    /// An `https://` collector: the client's TLS settings and the name its
    /// certificate must carry.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// The URL says `https`.
    secure: bool,
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
        let secure = url.scheme_str() == Some("https");
        let authority = url.authority().map_or_else(String::new, |a| {
            if a.port().is_some() {
                a.as_str().to_owned()
            } else {
                format!("{}:{}", a.as_str(), if secure { 443 } else { 80 })
            }
        });
        // Validation loaded the roots of every https:// collector.
        let tls = endpoint.tls.as_ref().filter(|_| secure).and_then(|tls| {
            let host = url.host()?.trim_start_matches('[').trim_end_matches(']');
            let server_name = ServerName::try_from(host.to_owned()).ok()?;
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .ok()?
            .with_root_certificates(tls.roots.clone())
            .with_no_client_auth();
            config.alpn_protocols = vec![match endpoint.protocol {
                OtlpProtocol::Grpc => b"h2".to_vec(),
                OtlpProtocol::HttpProtobuf => b"http/1.1".to_vec(),
            }];
            Some((Arc::new(config), server_name))
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
            tls,
            secure,
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
        match &self.tls {
            // Never plaintext to an https:// collector.
            None if self.secure => Err(format!(
                "{}: no TLS settings for an https:// collector",
                self.authority
            )),
            Some((config, server_name)) => {
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(server_name.clone(), stream)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", self.authority))?;
                self.handshake(TokioIo::new(stream)).await
            }
            None => self.handshake(TokioIo::new(stream)).await,
        }
    }

    async fn handshake<I>(&self, io: I) -> Result<Connection, String>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
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

    /// Sends one export request (`message`, encoded), again after a
    /// failure OTLP calls retryable (the collector unreachable or
    /// overloaded: a failed connection, gRPC `UNAVAILABLE`,
    /// `RESOURCE_EXHAUSTED` and the like, HTTP 429, 502, 503, 504), after
    /// an exponential backoff with jitter (or the collector's
    /// `retry-after`), until `timeout` has passed since the first attempt.
    /// Any other failure ends it at once.
    pub(crate) async fn export(
        &mut self,
        message: &Message,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut attempt = 0;
        loop {
            let failure = match tokio::time::timeout_at(deadline, self.send(message)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(failure)) => failure,
                Err(_elapsed) => {
                    self.reset();
                    return Err(format!("no answer within {timeout:?}"));
                }
            };
            self.reset();
            if !failure.retryable {
                return Err(failure.message);
            }
            let wait = failure
                .retry_after
                .unwrap_or_else(|| crate::rng::backoff(RETRY_FIRST, RETRY_MAX, attempt));
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(failure.message);
            }
            tracing::debug!(error = %failure.message, ?wait, "OTLP export failed; retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Sends one export request (`message`, encoded), once.
    async fn send(&mut self, message: &Message) -> Result<(), Failure> {
        let usable = match &self.connection {
            Some(Connection::Http2(sender)) => !sender.is_closed(),
            Some(Connection::Http1(sender)) => !sender.is_closed(),
            None => false,
        };
        if !usable {
            self.connection = Some(self.connect().await.map_err(Failure::retryable)?);
        }
        let mut request = match self.protocol {
            OtlpProtocol::Grpc => {
                if message.framed.len().saturating_sub(GRPC_HEADER) > u32::MAX as usize {
                    return Err(Failure::fatal("batch too large".into()));
                }
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let uri = format!("{scheme}://{}{}", self.authority, self.grpc_path);
                let mut request = Request::post(uri).body(Full::new(message.framed.clone()));
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
                let mut request = Request::post(path).body(Full::new(message.unframed()));
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
        .map_err(|e| Failure::fatal(format!("building the request: {e}")))?;
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        let response = match &mut self.connection {
            Some(Connection::Http2(sender)) => sender.send_request(request).await,
            Some(Connection::Http1(sender)) => sender.send_request(request).await,
            None => return Err(Failure::retryable("no connection".into())),
        }
        .map_err(|e| Failure::retryable(format!("sending: {e}")))?;
        let status = response.status();
        let (parts, body) = response.into_parts();
        let collected = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| Failure::retryable(format!("reading the answer: {e}")))?;
        if !status.is_success() {
            // OTLP/HTTP: these mean "later"; anything else is final.
            let retryable = matches!(status.as_u16(), 429 | 502 | 503 | 504);
            return Err(Failure {
                message: format!("the collector answered {status}"),
                retryable,
                retry_after: retry_after(&parts.headers),
            });
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
                    // OTLP's retryable codes: CANCELLED (1), DEADLINE_EXCEEDED
                    // (4), RESOURCE_EXHAUSTED (8), ABORTED (10), OUT_OF_RANGE
                    // (11), UNAVAILABLE (14), DATA_LOSS (15).
                    let retryable =
                        matches!(code, b"1" | b"4" | b"8" | b"10" | b"11" | b"14" | b"15");
                    return Err(Failure {
                        message: format!(
                            "grpc-status {}: {message}",
                            String::from_utf8_lossy(code)
                        ),
                        retryable,
                        retry_after: None,
                    });
                }
                None => return Err(Failure::fatal("no grpc-status in the answer".into())),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    /// An OTLP/HTTP collector answering the statuses of `answers` in turn
    /// (then 200), counting the exports it saw.
    async fn collector(answers: Vec<(u16, Option<&'static str>)>) -> (String, Arc<AtomicU32>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicU32::new(0));
        let counted = seen.clone();
        let answers = Arc::new(answers);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (seen, answers) = (counted.clone(), answers.clone());
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let (seen, answers) = (seen.clone(), answers.clone());
                        async move {
                            let _ = request.into_body().collect().await;
                            let n = seen.fetch_add(1, Relaxed) as usize;
                            let (status, retry_after) =
                                answers.get(n).copied().unwrap_or((200, None));
                            let mut response = http::Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            if let Some(after) = retry_after {
                                response.headers_mut().insert(
                                    http::header::RETRY_AFTER,
                                    HeaderValue::from_static(after),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (format!("http://{address}/v1/metrics"), seen)
    }

    fn endpoint(collector: String) -> OtlpEndpoint {
        OtlpEndpoint {
            collector,
            protocol: OtlpProtocol::HttpProtobuf,
            headers: Vec::new(),
            service_name: "test".into(),
            resource_attributes: Vec::new(),
            export_timeout: Duration::from_secs(5),
            tls: None,
        }
    }

    fn client(collector: String) -> Client {
        Client::new(&endpoint(collector), GRPC_PATH)
    }

    #[tokio::test]
    async fn an_overloaded_collector_is_tried_again_until_it_takes_the_export() {
        let (url, seen) = collector(vec![(503, Some("0")), (429, None), (502, None)]).await;
        let mut client = client(url);
        client
            .export(&Message::copied(b"batch"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(seen.load(Relaxed), 4, "three refusals, then accepted");
    }

    #[tokio::test]
    async fn a_refused_export_is_not_sent_again() {
        let (url, seen) = collector(vec![(400, None)]).await;
        let mut client = client(url);
        let error = client
            .export(&Message::copied(b"batch"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(error.contains("400"), "{error}");
        assert_eq!(seen.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn retries_stop_at_the_export_timeout() {
        // `retry-after: 30` is longer than the timeout: no second attempt.
        let (url, seen) = collector(vec![(503, Some("30"))]).await;
        let mut client = client(url);
        let started = tokio::time::Instant::now();
        let error = client
            .export(&Message::copied(b"batch"), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(error.contains("503"), "{error}");
        assert_eq!(seen.load(Relaxed), 1);
        assert!(started.elapsed() < Duration::from_secs(2));
        // An unreachable collector: retried until the timeout, then failed.
        let dead = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let mut client = self::client(format!("http://{dead}/v1/metrics"));
        let error = client
            .export(&Message::copied(b"batch"), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(error.contains("connecting"), "{error}");
    }

    /// Waits (10 s at most) until `count` spans are exported.
    async fn exported(
        metrics: &TraceMetrics,
        count: u64,
    ) -> Result<(), tokio::time::error::Elapsed> {
        tokio::time::timeout(Duration::from_secs(10), async {
            while metrics.spans_exported.load(Relaxed) < count {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    fn span() -> SpanRecord {
        let context = super::super::Context::begin(None, crate::config::Percent::ALL);
        SpanRecord::new(
            super::super::Kind::Server,
            &context,
            context.span_id,
            0,
            crate::clock::unix_nanos_now(),
            http::Method::GET,
        )
    }

    /// A queue of at most `capacity` spans, exported in batches of `batch`
    /// (and after an hour) to a collector: the queue, the counters and the
    /// collector's count of exports.
    async fn queue(capacity: u32, batch: u32) -> (Arc<Queue>, Arc<TraceMetrics>, Arc<AtomicU32>) {
        let (url, seen) = collector(Vec::new()).await;
        let metrics = Arc::new(TraceMetrics::default());
        let exporters = Exporters::new(tokio::runtime::Handle::current(), metrics.clone());
        let export = Arc::new(TraceExport {
            endpoint: endpoint(url),
            max_queued_spans: capacity,
            max_export_batch: batch,
            flush_interval: Duration::from_secs(3600),
        });
        (exporters.queue(&export), metrics, seen)
    }

    #[tokio::test]
    async fn spans_past_the_queue_are_dropped_and_what_waits_goes_out_in_batches() {
        let (queue, metrics, seen) = queue(200, 64).await;
        // The exporter's task has not run yet (one thread, no await).
        for _ in 0..250 {
            queue.send(&span());
        }
        assert_eq!(metrics.spans_dropped.load(Relaxed), 50);
        // The last sender gone, what waits is sent without the interval.
        drop(queue);
        exported(&metrics, 200)
            .await
            .expect("the queued spans are exported");
        assert_eq!(seen.load(Relaxed), 4, "batches of 64, 64, 64 and 8");
        assert_eq!(metrics.spans_exported.load(Relaxed), 200);
    }

    #[tokio::test]
    async fn a_full_batch_goes_out_without_waiting_for_the_flush() {
        let (queue, metrics, seen) = queue(1000, 100).await;
        for _ in 0..100 {
            queue.send(&span());
        }
        exported(&metrics, 100)
            .await
            .expect("a full batch is exported before the flush interval");
        assert_eq!(seen.load(Relaxed), 1, "one export of 100 spans");
    }

    #[tokio::test]
    async fn a_sent_batch_s_buffer_is_filled_again() {
        let (queue, metrics, seen) = queue(1000, 100).await;
        for _ in 0..100 {
            queue.send(&span());
        }
        exported(&metrics, 100).await.expect("the first batch");
        // Given back once the export's task has its answer.
        let spare = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(buffer) = queue.shared.pending().spare.first() {
                    return (buffer.as_ptr(), buffer.capacity(), buffer.len());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the sent batch's buffer comes back");
        let filled = queue.shared.pending().filled;
        assert_eq!(spare.2, 0, "emptied");
        assert!(spare.1 >= filled, "as large as the batch it held");
        queue.send(&span());
        {
            let pending = queue.shared.pending();
            assert!(pending.spare.is_empty(), "the next batch took it");
            assert_eq!(
                pending.batches[0].bytes.as_ptr(),
                spare.0,
                "the same memory"
            );
        }
        for _ in 1..100 {
            queue.send(&span());
        }
        exported(&metrics, 200).await.expect("the second batch");
        assert_eq!(seen.load(Relaxed), 2);
    }
}
