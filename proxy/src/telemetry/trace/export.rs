//! Span export: a bounded queue per exporter, drained in batches by a task
//! on the control runtime that sends them with `opentelemetry-otlp` (gRPC
//! or HTTP/protobuf).
//!
//! The request path only `try_send`s a [`SpanRecord`]: a full queue drops
//! the span and counts it, it never blocks or grows. Listeners with equal
//! export settings share one exporter; it stops (after sending what it
//! holds) when no listener uses it any more.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use tokio::sync::mpsc;

use super::{Kind, SpanRecord};
use crate::config::{OtlpProtocol, TraceExport};

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
}

impl Queue {
    /// Queues a span, or drops and counts it when the queue is full.
    pub(crate) fn send(&self, span: SpanRecord) {
        if self.sender.try_send(span).is_err() {
            self.metrics.spans_dropped.fetch_add(1, Relaxed);
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
        let queue = Arc::new(Queue {
            sender,
            metrics: self.metrics.clone(),
        });
        live.insert(export.clone(), Arc::downgrade(&queue));
        self.control
            .spawn(run(export.clone(), receiver, self.metrics.clone()));
        queue
    }
}

/// An exporter's task: batches of at most `max_export_batch` spans, a
/// partial batch sent after `flush_interval`, one export at a time; ends
/// when every queue sender is gone and the last batch is sent.
async fn run(
    export: Arc<TraceExport>,
    mut receiver: mpsc::Receiver<SpanRecord>,
    metrics: Arc<TraceMetrics>,
) {
    let exporter = match build(&export) {
        Ok(exporter) => exporter,
        Err(error) => {
            // Validation checked the URL and headers; this is unexpected.
            tracing::warn!(collector = %export.collector, %error, "trace exporter failed to start; spans are dropped");
            while let Some(_span) = receiver.recv().await {
                metrics.spans_failed.fetch_add(1, Relaxed);
            }
            return;
        }
    };
    let scope = InstrumentationScope::builder("weft-proxy")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let max = usize::try_from(export.max_export_batch)
        .unwrap_or(usize::MAX)
        .max(1);
    let mut batch = Vec::with_capacity(max);
    let mut open = true;
    while open {
        if receiver.recv_many(&mut batch, max).await == 0 {
            break;
        }
        let deadline = tokio::time::Instant::now() + export.flush_interval;
        while batch.len() < max {
            let wanted = max - batch.len();
            match tokio::time::timeout_at(deadline, receiver.recv_many(&mut batch, wanted)).await {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(_) => {}
                Err(_elapsed) => break,
            }
        }
        let count = batch.len() as u64;
        let spans = batch
            .drain(..)
            .map(|span| to_span_data(span, &scope))
            .collect();
        match exporter.export(spans).await {
            Ok(()) => {
                metrics.spans_exported.fetch_add(count, Relaxed);
            }
            Err(error) => {
                tracing::debug!(collector = %export.collector, %error, spans = count, "trace export failed");
                metrics.exports_failed.fetch_add(1, Relaxed);
                metrics.spans_failed.fetch_add(count, Relaxed);
            }
        }
    }
}

/// The OTLP exporter for `export`, its resource set. Must run inside the
/// runtime (the gRPC channel connects lazily on it).
fn build(export: &TraceExport) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let mut exporter = match export.protocol {
        OtlpProtocol::Grpc => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            for (name, value) in &export.headers {
                let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes())
                    .map_err(|e| format!("header {name}: {e}"))?;
                let value = value.parse().map_err(|e| format!("header {name}: {e}"))?;
                metadata.insert(key, value);
            }
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&export.collector)
                .with_timeout(export.export_timeout)
                .with_metadata(metadata)
                .build()
        }
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(&export.collector)
            .with_timeout(export.export_timeout)
            .with_headers(export.headers.iter().cloned().collect())
            .build(),
    }
    .map_err(|e| e.to_string())?;
    let resource = Resource::builder_empty()
        .with_service_name(export.service_name.clone())
        .with_attributes(
            export
                .resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    exporter.set_resource(&resource);
    Ok(exporter)
}

fn text(value: &str) -> Value {
    Value::from(value.to_owned())
}

fn shared(value: Arc<str>) -> Value {
    Value::String(value.into())
}

/// A record as OTLP span data, with the HTTP semantic-convention
/// attributes (and Weft's own under `weft.`).
fn to_span_data(span: SpanRecord, scope: &InstrumentationScope) -> SpanData {
    let mut attributes = Vec::with_capacity(14);
    attributes.push(KeyValue::new(
        "http.request.method",
        text(span.method.as_str()),
    ));
    if span.status != 0 {
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(span.status),
        ));
    }
    let version = match span.version {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        _ => "1.1",
    };
    attributes.push(KeyValue::new("network.protocol.version", version));
    if let Some(path) = &span.path {
        attributes.push(KeyValue::new("url.path", text(path.path())));
        attributes.push(KeyValue::new("url.scheme", "http"));
    }
    if let Some(authority) = span.authority.as_ref().and_then(|a| a.to_str().ok()) {
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(host, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    host
                } else {
                    authority
                }
            });
        attributes.push(KeyValue::new("server.address", text(host)));
    }
    if let Some(peer) = span.peer {
        attributes.push(KeyValue::new("network.peer.address", peer.ip().to_string()));
        attributes.push(KeyValue::new("network.peer.port", i64::from(peer.port())));
        match span.kind {
            Kind::Server => {
                attributes.push(KeyValue::new("client.address", peer.ip().to_string()));
            }
            Kind::Client => {
                attributes.push(KeyValue::new("server.address", peer.ip().to_string()));
                attributes.push(KeyValue::new("server.port", i64::from(peer.port())));
            }
        }
    }
    if let Some(listener) = span.listener {
        attributes.push(KeyValue::new("weft.listener", shared(listener)));
    }
    let name = match (span.kind, &span.route, &span.cluster) {
        (Kind::Server, Some(route), _) => format!("{} {route}", span.method),
        (Kind::Client, _, Some(cluster)) => format!("{} {cluster}", span.method),
        _ => span.method.to_string(),
    };
    if let Some(route) = span.route {
        attributes.push(KeyValue::new("weft.route", shared(route)));
    }
    if let Some(cluster) = span.cluster {
        attributes.push(KeyValue::new("weft.cluster", shared(cluster)));
    }
    if let Some(identity) = span.peer_identity {
        attributes.push(KeyValue::new("weft.peer.identity", shared(identity)));
    }
    if let Some(id) = span.request_id.as_ref().and_then(|v| v.to_str().ok()) {
        attributes.push(KeyValue::new("weft.request_id", text(id)));
    }
    if span.kind == Kind::Client {
        attributes.push(KeyValue::new("weft.attempt", i64::from(span.attempt)));
        if span.attempt > 1 {
            attributes.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(span.attempt - 1),
            ));
        }
    }
    let mut events = SpanEvents::default();
    if !span.flag.is_empty() {
        attributes.push(KeyValue::new("weft.response_flag", span.flag));
        // The proxy's own decision (a fault, a policy denial, a rate
        // limit, an upstream failure) is an event at the span's end.
        events.events.push(opentelemetry::trace::Event::new(
            span.flag,
            span.end,
            vec![KeyValue::new("weft.response_flag", span.flag)],
            0,
        ));
    }
    // Server spans fail on 5xx only (a 4xx is the client's); client spans
    // on any error status or no response at all.
    let failed = match span.kind {
        Kind::Server => span.status >= 500 || span.status == 0,
        Kind::Client => span.status >= 400 || span.status == 0,
    };
    if failed {
        let error = if span.flag.is_empty() {
            Cow::Owned(span.status.to_string())
        } else {
            Cow::Borrowed(span.flag)
        };
        attributes.push(KeyValue::new("error.type", error.clone().into_owned()));
    }
    let status = if failed {
        Status::error(if span.flag.is_empty() {
            format!("status {}", span.status)
        } else {
            span.flag.to_owned()
        })
    } else {
        Status::Unset
    };
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(span.trace_id.to_be_bytes()),
            SpanId::from_bytes(span.span_id.to_be_bytes()),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::from_bytes(span.parent_id.to_be_bytes()),
        parent_span_is_remote: span.parent_remote,
        span_kind: match span.kind {
            Kind::Server => SpanKind::Server,
            Kind::Client => SpanKind::Client,
        },
        name: Cow::Owned(name),
        start_time: span.start,
        end_time: span.end,
        attributes,
        dropped_attributes_count: 0,
        events,
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}
