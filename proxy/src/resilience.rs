//! Resilience layers: the route timeout (here) and retries with a budget
//! ([`retry`], [`budget`]). (Circuit breaking and rate limits land here
//! too, one layer each.)
//!
//! The route timeout bounds the time from the request entering the route's
//! stack to the upstream's response headers; a gRPC caller's
//! `grpc-timeout` shortens it, and so does the route's stream idle
//! timeout (no response at all is idleness too). It does not cut a
//! response body that is already streaming: long downloads and gRPC
//! streams are bounded by the stream idle timeout instead
//! (`http::body::ResponseBody`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;

use crate::clock::Deadline;
use crate::error::ProxyError;

pub(crate) mod budget;
pub(crate) mod rate_limit;
pub(crate) mod retry;

pub(crate) use budget::RetryBudget;
pub(crate) use retry::{Retry, RetryLayer, Retrying};

/// Builds [`Timeout`] services.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimeoutLayer {
    timeout: Option<Duration>,
}

impl TimeoutLayer {
    /// `None` disables the timeout (a `grpc-timeout` still applies).
    pub(crate) fn new(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }
}

/// The deadline a gRPC caller sent (`grpc-timeout`: at most 8 digits and
/// a unit, `H`, `M`, `S`, `m`, `u` or `n`); `None` when absent or
/// malformed (a malformed one is ignored, as gRPC servers do).
pub(crate) fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    // PERF: a static name, not a string parsed into one on every request.
    static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
    let value = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<S> tower::Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// Fails a request with [`ProxyError::UpstreamTimeout`] when the inner
/// service has not answered within the deadline.
#[derive(Debug, Clone)]
pub(crate) struct Timeout<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S, B> tower::Service<http::Request<B>> for Timeout<S>
where
    S: tower::Service<http::Request<B>, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let timeout = match grpc_timeout(req.headers()) {
            Some(asked) => Some(self.timeout.map_or(asked, |t| t.min(asked))),
            None => self.timeout,
        };
        ResponseFuture {
            inner: self.inner.call(req),
            deadline: timeout.map(|t| Deadline::at(crate::clock::tokio_now() + t)),
        }
    }
}

pin_project! {
    /// The future of [`Timeout`].
    #[derive(Debug)]
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        deadline: Option<Deadline>,
    }
}

impl<F, T> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, ProxyError>>,
{
    type Output = Result<T, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result);
        }
        if let Some(deadline) = this.deadline {
            ready!(deadline.poll_elapsed(cx));
            return Poll::Ready(Err(ProxyError::UpstreamTimeout));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    fn slow(
        wait: Duration,
    ) -> impl tower::Service<http::Request<()>, Response = u8, Error = ProxyError, Future: Send>
    {
        tower::service_fn(move |_: http::Request<()>| async move {
            tokio::time::sleep(wait).await;
            Ok::<_, ProxyError>(7)
        })
    }

    fn grpc(timeout: &'static str) -> http::Request<()> {
        http::Request::builder()
            .header("grpc-timeout", timeout)
            .body(())
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn slow_inner_service_times_out() {
        let mut svc =
            TimeoutLayer::new(Some(Duration::from_secs(1))).layer(slow(Duration::from_secs(10)));
        let result = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await;
        assert!(matches!(result, Err(ProxyError::UpstreamTimeout)));
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_timeout_waits() {
        let mut svc = TimeoutLayer::new(None).layer(slow(Duration::from_secs(100)));
        let answer = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await;
        assert_eq!(answer.unwrap(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_timeout_shortens_the_deadline_but_never_lengthens_it() {
        let start = tokio::time::Instant::now();
        let mut svc =
            TimeoutLayer::new(Some(Duration::from_secs(5))).layer(slow(Duration::from_secs(10)));
        let result = svc.ready().await.unwrap().call(grpc("200m")).await;
        assert!(matches!(result, Err(ProxyError::UpstreamTimeout)));
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        let start = tokio::time::Instant::now();
        let result = svc.ready().await.unwrap().call(grpc("1H")).await;
        assert!(matches!(result, Err(ProxyError::UpstreamTimeout)));
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // Without a route timeout, the caller's deadline is the deadline.
        let mut svc = TimeoutLayer::new(None).layer(slow(Duration::from_secs(10)));
        let result = svc.ready().await.unwrap().call(grpc("3S")).await;
        assert!(matches!(result, Err(ProxyError::UpstreamTimeout)));
    }

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        let parse = |v: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", http::HeaderValue::from_static(v));
            grpc_timeout(&h)
        };
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", " 1S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
