//! The response body type the proxy hands to hyper: either the upstream's
//! streamed body or a small body the proxy made itself (errors, direct
//! responses). An enum, not a boxed trait object, so no allocation per
//! response. It counts the bytes it yields and, when dropped (finished or
//! abandoned), records the request's metrics and access-log line once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::cluster::UpstreamBody;
use crate::telemetry::istio::{self, IstioMetrics, Protocol};
use crate::telemetry::trace::OpenSpan;
use crate::telemetry::{AccessLog, AccessRecord, RequestMetrics};

/// What to record when the response is over.
#[derive(Debug)]
pub(crate) struct Finish {
    pub(crate) start: Instant,
    pub(crate) status: http::StatusCode,
    pub(crate) metrics: std::sync::Arc<RequestMetrics>,
    pub(crate) access: Option<(AccessLog, Box<AccessRecord>)>,
    /// Keeps the request in flight on its connection until the response
    /// is over (the idle timeout must not fire mid-stream).
    pub(crate) request: Option<crate::transport::RequestGuard>,
    /// The request's server span, when it is recorded; it ends with the
    /// response.
    pub(crate) span: Option<OpenSpan>,
    /// The answering attempt's client span, ended (dropped) with the body.
    pub(crate) client_span: Option<OpenSpan>,
    /// The request's Istio series, when the listener reports them.
    pub(crate) istio: Option<IstioFinish>,
}

/// What Istio's series of a request need at its end.
#[derive(Debug)]
pub(crate) struct IstioFinish {
    pub(crate) metrics: std::sync::Arc<IstioMetrics>,
    /// The other party of the call, numbered by `metrics`.
    pub(crate) party: u32,
    /// The status sent to the client.
    pub(crate) status: http::StatusCode,
    pub(crate) protocol: Protocol,
    /// From the response's headers, or its trailers once they pass.
    pub(crate) grpc_status: Option<u8>,
    pub(crate) flag: &'static str,
    /// The request body's bytes (and gRPC messages), counted as they are
    /// read (`None`: the request had no body).
    pub(crate) request_read: Option<std::sync::Arc<crate::body::ReadCount>>,
    /// The response's gRPC messages, counted as they pass (`None`: not a
    /// gRPC call).
    pub(crate) response_messages: Option<crate::body::Messages>,
}

/// A `grpc-status` value (0..=16 and beyond, as sent).
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<u8> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

impl Finish {
    fn done(self, bytes_sent: u64) {
        // The request stops counting as in flight with this.
        let _request = self.request;
        let now = std::time::Instant::now();
        let duration = now.saturating_duration_since(self.start);
        self.metrics.record(self.status, duration);
        if let Some((log, mut record)) = self.access {
            record.bytes_sent = bytes_sent;
            record.duration = duration;
            log.log(*record);
        }
        // The client span ends first, as the upstream's body did, then
        // the server span, both now.
        let end = self
            .span
            .is_some()
            .then(|| crate::clock::unix_nanos_of(now));
        if let (Some(client), Some(end)) = (self.client_span, end) {
            client.end_at(end);
        }
        if let Some(istio) = self.istio {
            istio.metrics.record(&istio::Request {
                party: istio.party,
                status: istio.status.as_u16(),
                grpc_status: istio.grpc_status,
                protocol: istio.protocol,
                flag: istio.flag,
                duration,
                request_bytes: istio.request_read.as_ref().map_or(0, |read| read.bytes()),
                response_bytes: bytes_sent,
                request_messages: istio
                    .request_read
                    .as_ref()
                    .map_or(0, |read| read.messages()),
                response_messages: istio
                    .response_messages
                    .as_ref()
                    .map_or(0, crate::body::Messages::complete),
            });
        }
        if let (Some(span), Some(end)) = (self.span, end) {
            if let Some((trace_id, span_id)) = span.ids() {
                // The request-duration histogram points at the trace.
                self.metrics
                    .duration
                    .keep_exemplar(duration, trace_id, span_id, end);
            }
            span.end_at(end);
        }
    }
}

pin_project! {
    #[project = InnerProj]
    #[derive(Debug)]
    enum Inner {
        Upstream { #[pin] body: UpstreamBody },
        Full { data: Option<Bytes> },
    }
}

/// Why a response body stopped short.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// The upstream's body failed (reset, protocol error).
    #[error(transparent)]
    Upstream(#[from] crate::cluster::UpstreamBodyError),
    /// Nothing came from the upstream for the route's
    /// `stream_idle_timeout`.
    #[error("no response data for the stream idle timeout")]
    StreamIdleTimeout,
}

/// A response body's idle deadline: it runs while the body waits for the
/// upstream, from the first wait after each frame.
///
/// PERF: armed lazily. A body that never waits (a small response, read
/// with its headers) takes no timer and no clock read, and a streaming one
/// reads the clock once per wait rather than once per frame.
#[derive(Debug)]
struct Idle {
    timeout: Duration,
    /// Made on the first wait.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The deadline is set for the current wait.
    waiting: bool,
}

pin_project! {
    /// The proxy's response body.
    #[derive(Debug)]
    pub(crate) struct ResponseBody {
        #[pin]
        inner: Inner,
        sent: u64,
        finish: Option<Finish>,
        // The route's stream idle timeout, when it has one.
        idle: Option<Idle>,
    }

    impl PinnedDrop for ResponseBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(finish) = this.finish.take() {
                finish.done(*this.sent);
            }
        }
    }
}

impl ResponseBody {
    /// A body the proxy made.
    pub(crate) fn full(data: Bytes) -> Self {
        let data = (!data.is_empty()).then_some(data);
        Self {
            inner: Inner::Full { data },
            sent: 0,
            finish: None,
            idle: None,
        }
    }

    /// No body.
    pub(crate) fn empty() -> Self {
        Self {
            inner: Inner::Full { data: None },
            sent: 0,
            finish: None,
            idle: None,
        }
    }

    /// The upstream's body, streamed.
    pub(crate) fn upstream(body: UpstreamBody) -> Self {
        Self {
            inner: Inner::Upstream { body },
            sent: 0,
            finish: None,
            idle: None,
        }
    }

    /// Ends the body with an error when no frame arrives for `timeout`
    /// (one timer, reset by each frame).
    pub(crate) fn set_idle_timeout(&mut self, timeout: Duration) {
        self.idle = Some(Idle {
            timeout,
            sleep: None,
            waiting: false,
        });
    }

    /// The endpoint that answered, for an upstream's body; `None` for a
    /// body the proxy made.
    pub(crate) fn endpoint(&self) -> Option<std::net::SocketAddr> {
        match &self.inner {
            Inner::Upstream { body } => Some(body.endpoint()),
            Inner::Full { .. } => None,
        }
    }

    /// The upstream attempt's client span, taken out of the body.
    pub(crate) fn take_client_span(&mut self) -> Option<OpenSpan> {
        match &mut self.inner {
            Inner::Upstream { body } => body.take_span(),
            Inner::Full { .. } => None,
        }
    }

    /// Records `finish` when this body is dropped.
    pub(crate) fn set_finish(&mut self, finish: Finish) {
        self.finish = Some(finish);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = match this.inner.project() {
            InnerProj::Upstream { body } => body.poll_frame(cx),
            InnerProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        };
        if let Some(idle) = this.idle {
            if polled.is_pending() && !idle.waiting {
                idle.waiting = true;
                let deadline = tokio::time::Instant::now() + idle.timeout;
                match &mut idle.sleep {
                    Some(sleep) => sleep.as_mut().reset(deadline),
                    None => idle.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
            }
            match &polled {
                Poll::Ready(Some(Ok(_))) => idle.waiting = false,
                Poll::Pending
                    if idle
                        .sleep
                        .as_mut()
                        .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready()) =>
                {
                    *this.idle = None;
                    if let Some(finish) = this.finish {
                        finish
                            .metrics
                            .stream_idle_timeouts
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Some((_, record)) = &mut finish.access {
                            record.flag = "stream_idle_timeout";
                        }
                        if let Some(istio) = &mut finish.istio {
                            istio.flag = "stream_idle_timeout";
                        }
                    }
                    return Poll::Ready(Some(Err(BodyError::StreamIdleTimeout)));
                }
                _ => {}
            }
        }
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                *this.sent += data.len() as u64;
                if let Some(messages) = this
                    .finish
                    .as_mut()
                    .and_then(|f| f.istio.as_mut())
                    .and_then(|istio| istio.response_messages.as_mut())
                {
                    messages.feed(data);
                }
            } else if let Some(trailers) = frame.trailers_ref()
                && let Some(istio) = this.finish.as_mut().and_then(|f| f.istio.as_mut())
            {
                istio.grpc_status = grpc_status(trailers).or(istio.grpc_status);
            }
        }
        polled.map(|frame| frame.map(|result| result.map_err(BodyError::Upstream)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream { body } => body.is_end_stream(),
            Inner::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream { body } => body.size_hint(),
            Inner::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::BodyExt;

    use super::*;
    use crate::telemetry::Metrics;

    fn finish(metrics: &Arc<RequestMetrics>, status: http::StatusCode) -> Finish {
        Finish {
            start: Instant::now(),
            status,
            metrics: metrics.clone(),
            access: None,
            span: None,
            client_span: None,
            request: None,
            istio: None,
        }
    }

    #[tokio::test]
    async fn a_body_records_its_request_once_when_read_to_the_end() {
        let registry = Metrics::new();
        let metrics = registry.request(&"l".into(), &"r".into(), &"c".into());
        let mut body = ResponseBody::full(Bytes::from_static(b"twelve bytes"));
        body.set_finish(finish(&metrics, http::StatusCode::OK));
        assert_eq!(body.size_hint().exact(), Some(12));
        let read = body.collect().await.unwrap().to_bytes();
        assert_eq!(read, "twelve bytes");
        assert_eq!(metrics.count(2), 1);
        assert_eq!(metrics.count(5), 0);
    }

    #[test]
    fn an_abandoned_body_still_records_its_request() {
        let registry = Metrics::new();
        let metrics = registry.request(&"l".into(), &"r".into(), &"c".into());
        let mut body = ResponseBody::empty();
        assert!(body.is_end_stream());
        body.set_finish(finish(&metrics, http::StatusCode::BAD_GATEWAY));
        drop(body);
        assert_eq!(metrics.count(5), 1);
    }
}
