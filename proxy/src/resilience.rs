//! Resilience layers: the route timeout (here) and retries with a budget
//! ([`retry`], [`budget`]). (Circuit breaking and rate limits land here
//! too, one layer each.)
//!
//! The route timeout bounds the time from the request entering the route's
//! stack to the upstream's response headers. It does not cut a response
//! body that is already streaming: long downloads and gRPC streams are
//! bounded by idle timeouts instead.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;

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
    /// `None` disables the timeout.
    pub(crate) fn new(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }
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

impl<S, R> tower::Service<R> for Timeout<S>
where
    S: tower::Service<R, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            sleep: self.timeout.map(tokio::time::sleep),
        }
    }
}

pin_project! {
    /// The future of [`Timeout`].
    #[derive(Debug)]
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
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
        if let Some(sleep) = this.sleep.as_pin_mut() {
            ready!(sleep.poll(cx));
            return Poll::Ready(Err(ProxyError::UpstreamTimeout));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    #[tokio::test(start_paused = true)]
    async fn slow_inner_service_times_out() {
        let slow = tower::service_fn(|()| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, ProxyError>(())
        });
        let mut svc = TimeoutLayer::new(Some(Duration::from_secs(1))).layer(slow);
        let result = svc.ready().await.unwrap().call(()).await;
        assert!(matches!(result, Err(ProxyError::UpstreamTimeout)));
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_timeout_waits() {
        let slow = tower::service_fn(|()| async {
            tokio::time::sleep(Duration::from_secs(100)).await;
            Ok::<_, ProxyError>(7)
        });
        let mut svc = TimeoutLayer::new(None).layer(slow);
        assert_eq!(svc.ready().await.unwrap().call(()).await.unwrap(), 7);
    }
}
