//! Retries: a failed attempt is sent again, to another endpoint when there
//! is one, after a jittered backoff, while the route's policy, the request
//! and the cluster's budget allow.
//!
//! What may be sent again:
//! - only idempotent methods, unless the route says otherwise, and never an
//!   upgrade;
//! - only a body read whole within the policy's bound (64 KiB by default):
//!   a larger or still-streaming body is sent once, unretried;
//! - only a failure the policy names (`retry_on`) and whose cause allows it
//!   ([`RetrySafety`]): a failure before the request left the proxy always,
//!   one after it only for a request that may be repeated, a local decision
//!   or the client's own fault never.
//!
//! Every attempt carries `x-weft-attempt-count` (the proxy's, never the
//! client's), has the policy's per-try timeout, and prefers an endpoint the
//! request has not failed on yet. A retry is counted in the cluster's
//! [`RetryBudget`] when it is scheduled; once the budget is spent the last
//! failure goes back to the client. `Retry-After` (in seconds) replaces the
//! backoff when it is at most [`MAX_RETRY_AFTER`]; a longer one is not
//! waited for.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use pin_project_lite::pin_project;
use tower::{Service, ServiceExt};

use super::budget::RetryBudget;
use crate::body::{RequestBody, read_for_replay};
use crate::config::RetryPolicy;
use crate::error::{ProxyError, RetrySafety};
use crate::http::body::ResponseBody;
use crate::telemetry::ClusterMetrics;

/// The attempt number the upstream sees (1 for the first).
pub(crate) static ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-weft-attempt-count");

/// The longest `Retry-After` waited for before a retry.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The endpoints a request has failed on; the cluster avoids them when it
/// can.
#[derive(Debug, Clone, Default)]
pub(crate) struct TriedEndpoints(pub(crate) Vec<SocketAddr>);

/// How many attempts a response took, for the access log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempts(pub(crate) u32);

/// A route's retries toward one cluster.
#[derive(Debug)]
pub(crate) struct Retrying {
    pub(crate) policy: Arc<RetryPolicy>,
    pub(crate) budget: Arc<RetryBudget>,
    pub(crate) metrics: Arc<ClusterMetrics>,
    /// The cluster's circuit breaker: retries in flight at once.
    pub(crate) max_retries: u32,
}

/// Holds one of the cluster's `max_retries` from scheduling a retry to
/// its attempt's outcome.
#[derive(Debug)]
struct RetryInFlight(Arc<ClusterMetrics>);

impl RetryInFlight {
    fn take(metrics: &Arc<ClusterMetrics>, max: u32) -> Option<Self> {
        let active = &metrics.retries_active;
        if active.fetch_add(1, Relaxed) >= i64::from(max) {
            active.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Self(metrics.clone()))
    }
}

impl Drop for RetryInFlight {
    fn drop(&mut self) {
        self.0.retries_active.fetch_sub(1, Relaxed);
    }
}

/// Builds [`Retry`] services.
#[derive(Debug, Clone)]
pub(crate) struct RetryLayer {
    retrying: Option<Arc<Retrying>>,
}

impl RetryLayer {
    /// `None`: requests pass through, sent once.
    pub(crate) fn new(retrying: Option<Arc<Retrying>>) -> Self {
        Self { retrying }
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            retrying: self.retrying.clone(),
        }
    }
}

/// Sends failed attempts again (see the module).
#[derive(Debug, Clone)]
pub(crate) struct Retry<S> {
    inner: S,
    retrying: Option<Arc<Retrying>>,
}

type Boxed = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send>>;

impl<S> Service<Request<RequestBody>> for Retry<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = RetryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        match &self.retrying {
            None => {
                // Set by the proxy only.
                req.headers_mut().remove(&ATTEMPT_COUNT);
                RetryFuture::Once {
                    inner: self.inner.call(req),
                }
            }
            Some(retrying) => RetryFuture::Retrying {
                inner: Box::pin(retry(self.inner.clone(), retrying.clone(), req)),
            },
        }
    }
}

pin_project! {
    /// The future of [`Retry`].
    #[project = RetryProj]
    pub(crate) enum RetryFuture<F> {
        Once { #[pin] inner: F },
        Retrying { inner: Boxed },
    }
}

impl<F> Future for RetryFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, ProxyError>>,
{
    type Output = Result<Response<ResponseBody>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RetryProj::Once { inner } => inner.poll(cx),
            RetryProj::Retrying { inner } => inner.as_mut().poll(cx),
        }
    }
}

/// Idempotent methods (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

async fn retry<S>(
    mut inner: S,
    retrying: Arc<Retrying>,
    req: Request<RequestBody>,
) -> Result<Response<ResponseBody>, ProxyError>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = ProxyError>,
{
    let policy = &retrying.policy;
    retrying
        .budget
        .deposit(tokio::time::Instant::now(), policy.budget_window);
    let (mut parts, body) = req.into_parts();
    parts.headers.remove(&ATTEMPT_COUNT);
    let eligible = (policy.retry_non_idempotent || is_idempotent(&parts.method))
        && !parts.headers.contains_key(header::UPGRADE);
    let body = if eligible {
        match read_for_replay(body, policy.max_body_bytes).await {
            Ok(Ok(replayable)) => Ok(replayable),
            Ok(Err(streaming)) => Err(streaming),
            Err(error) => {
                return Err(ProxyError::DownstreamBody {
                    endpoint: None,
                    source: error.0,
                });
            }
        }
    } else {
        Err(body)
    };
    let replayable = match body {
        Ok(replayable) => replayable,
        Err(body) => {
            // Sent once.
            let mut req = Request::from_parts(parts, body);
            req.headers_mut()
                .insert(&ATTEMPT_COUNT, HeaderValue::from_static("1"));
            return attempt(&mut inner, req, policy.per_try_timeout).await;
        }
    };
    let mut tried = TriedEndpoints::default();
    let mut attempts: u32 = 0;
    let mut in_flight: Option<RetryInFlight> = None;
    loop {
        attempts += 1;
        let mut req = Request::new(replayable.body());
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        req.headers_mut()
            .insert(&ATTEMPT_COUNT, attempt_value(attempts));
        if !tried.0.is_empty() {
            req.extensions_mut().insert(tried.clone());
        }
        let outcome = attempt(&mut inner, req, policy.per_try_timeout).await;
        // A retried attempt is over: its place under `max_retries` frees.
        drop(in_flight.take());
        let Some(failed_on) = retryable(policy, &outcome) else {
            return with_attempts(outcome, attempts);
        };
        if attempts > policy.num_retries {
            return with_attempts(outcome, attempts);
        }
        let retry_after = match &outcome {
            Ok(response) => retry_after(response),
            Err(_) => None,
        };
        let wait = match retry_after {
            Some(wait) if wait > MAX_RETRY_AFTER => return with_attempts(outcome, attempts),
            Some(wait) => wait,
            None => backoff(policy, attempts),
        };
        let Some(slot) = RetryInFlight::take(&retrying.metrics, retrying.max_retries) else {
            retrying.metrics.retries_overflow.fetch_add(1, Relaxed);
            tracing::debug!(attempts, "max_retries in flight; the failure goes back");
            return with_attempts(outcome, attempts);
        };
        if !retrying.budget.try_withdraw(
            tokio::time::Instant::now(),
            policy.budget_window,
            policy.budget_ratio,
            policy.budget_min_per_second,
        ) {
            retrying
                .metrics
                .retries_budget_exhausted
                .fetch_add(1, Relaxed);
            tracing::debug!(attempts, "retry budget spent; the failure goes back");
            return with_attempts(outcome, attempts);
        }
        retrying.metrics.retries.fetch_add(1, Relaxed);
        in_flight = Some(slot);
        if let Some(endpoint) = failed_on {
            tried.0.push(endpoint);
        }
        // The failed response's body is dropped (its connection closed)
        // before the next attempt.
        drop(outcome);
        tokio::time::sleep(wait).await;
    }
}

/// The header value of attempt `n`: static for every count a policy
/// allows (at most 11 attempts), so that no attempt allocates for it.
fn attempt_value(n: u32) -> HeaderValue {
    const COUNTS: [&str; 11] = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"];
    match COUNTS.get(n.saturating_sub(1) as usize) {
        Some(count) => HeaderValue::from_static(count),
        None => HeaderValue::from(n),
    }
}

/// The deadline of one attempt, for the cluster to keep: it knows which
/// endpoint the attempt went to, so a timed-out attempt is blamed on that
/// endpoint (outlier detection counts it, the next attempt avoids it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PerTryTimeout(pub(crate) Duration);

/// One attempt, with the per-try timeout handed to the cluster.
async fn attempt<S>(
    inner: &mut S,
    mut req: Request<RequestBody>,
    timeout: Option<Duration>,
) -> Result<Response<ResponseBody>, ProxyError>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = ProxyError>,
{
    if let Some(timeout) = timeout {
        req.extensions_mut().insert(PerTryTimeout(timeout));
    }
    inner.ready().await?.call(req).await
}

fn with_attempts(
    outcome: Result<Response<ResponseBody>, ProxyError>,
    attempts: u32,
) -> Result<Response<ResponseBody>, ProxyError> {
    outcome.map(|mut response| {
        if attempts > 1 {
            response.extensions_mut().insert(Attempts(attempts));
        }
        response
    })
}

/// Whether the policy retries this outcome: `Some(endpoint it failed on,
/// if known)` when it does.
fn retryable(
    policy: &RetryPolicy,
    outcome: &Result<Response<ResponseBody>, ProxyError>,
) -> Option<Option<SocketAddr>> {
    match outcome {
        Ok(response) => {
            let status = response.status();
            let gateway = matches!(
                status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            );
            let by_status = (policy.on_5xx && status.is_server_error())
                || (policy.on_gateway_error && gateway)
                || policy.statuses.contains(&status);
            let by_grpc = !policy.grpc_statuses.is_empty()
                && response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse::<u8>().ok())
                    .is_some_and(|code| policy.grpc_statuses.contains(&code));
            (by_status || by_grpc).then(|| response.body().endpoint())
        }
        Err(ProxyError::NoHealthyEndpoint { .. }) => None,
        Err(error) => {
            let allowed = match error.retry_safety() {
                RetrySafety::Never => false,
                RetrySafety::NotSent => {
                    policy.on_5xx
                        || policy.on_gateway_error
                        || policy.on_connect_failure
                        || policy.on_reset
                }
                RetrySafety::MaybeProcessed => {
                    policy.on_5xx || policy.on_gateway_error || policy.on_reset
                }
            };
            allowed.then(|| error.endpoint())
        }
    }
}

/// `Retry-After` in seconds (an HTTP date is not waited for).
fn retry_after(response: &Response<ResponseBody>) -> Option<Duration> {
    let value = response.headers().get(header::RETRY_AFTER)?;
    let seconds: u64 = value.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

/// Full jitter: a random wait below a ceiling that doubles per retry from
/// `backoff_base` up to `backoff_max`.
fn backoff(policy: &RetryPolicy, attempts: u32) -> Duration {
    let ceiling = policy
        .backoff_base
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(policy.backoff_max);
    ceiling.mul_f64(crate::rng::with_thread_rng(|rng| rng.f64()))
}

#[cfg(test)]
mod tests;
