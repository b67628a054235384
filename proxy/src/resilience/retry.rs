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
//! client's), has the policy's per-try timeout (kept by the route's
//! cluster service, which knows which endpoint to blame), and prefers an
//! endpoint the request has not failed on yet. A retry is counted in the cluster's
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
use crate::body::{Replayable, RequestBody, read_for_replay, replayable_now};
use crate::config::RetryPolicy;
use crate::error::{ProxyError, RetrySafety};
use crate::http::body::ResponseBody;
use crate::telemetry::ClusterMetrics;
use crate::telemetry::trace::Outbound;

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
    /// The route timeout, when this layer keeps it rather than the
    /// [`Timeout`](super::Timeout) layer above: see [`Retrying::keeps`].
    pub(crate) route_timeout: Option<Duration>,
}

impl Retrying {
    /// Whether a route timeout of `route_timeout` can be kept by the retry
    /// layer: when every attempt has a per-try timeout no longer than it,
    /// a first attempt always ends before the route's deadline, and only
    /// a retried request needs a timer of its own.
    ///
    /// PERF: a request that succeeds at once then takes one timer (its
    /// attempt's) instead of two.
    pub(crate) fn keeps(policy: &RetryPolicy, route_timeout: Option<Duration>) -> bool {
        matches!((policy.per_try_timeout, route_timeout), (Some(per_try), Some(route)) if per_try <= route)
    }
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

type Outcome = Result<Response<ResponseBody>, ProxyError>;
type Boxed = Pin<Box<dyn Future<Output = Outcome> + Send>>;

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
    type Future = RetryFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        let Some(retrying) = &self.retrying else {
            // Set by the proxy only. (Every attempt of a retried route has
            // its count inserted, which replaces what the client sent.)
            req.headers_mut().remove(&ATTEMPT_COUNT);
            return RetryFuture::Once {
                inner: self.inner.call(req),
            };
        };
        let policy = &retrying.policy;
        retrying
            .budget
            .deposit(crate::clock::nanos(), policy.budget_window);
        let deadline = retrying
            .route_timeout
            .map(|timeout| crate::clock::tokio_now() + timeout);
        let eligible = (policy.retry_non_idempotent || is_idempotent(req.method()))
            && !req.headers().contains_key(header::UPGRADE);
        if !eligible {
            first_attempt(&mut req);
            return RetryFuture::Once {
                inner: self.inner.call(req),
            };
        }
        // PERF: the common case (no body, or one read already) sends its
        // first attempt without boxing or waiting, and without taking the
        // request apart; only a failure the policy retries moves on to the
        // boxed retry loop.
        let Some(replayable) = replayable_now(req.body()) else {
            // A body still to come is read (up to the bound) first.
            return RetryFuture::Retrying {
                inner: Box::pin(within(
                    deadline,
                    read_then_retry(self.inner.clone(), retrying.clone(), req, deadline),
                )),
            };
        };
        let Some(saved) = Saved::keep(&req, replayable) else {
            // Too large to keep: sent once.
            first_attempt(&mut req);
            return RetryFuture::Once {
                inner: self.inner.call(req),
            };
        };
        first_attempt(&mut req);
        RetryFuture::First {
            inner: self.inner.call(req),
            // PERF: the copy itself is boxed (`Kept`), so that every
            // layer above moves a future only a little larger than the
            // attempt's.
            rest: Some(Rest {
                service: self.inner.clone(),
                retrying: retrying.clone(),
                saved,
                deadline,
            }),
        }
    }
}

/// Makes `req` a first attempt: its count set (in place of any the client
/// sent).
fn first_attempt(req: &mut Request<RequestBody>) {
    req.headers_mut()
        .insert(&ATTEMPT_COUNT, HeaderValue::from_static("1"));
}

/// What a request needs to be sent again.
#[derive(Debug, Default)]
struct Saved {
    head: SavedHead,
    version: http::Version,
    body: Replayable,
    /// The trace each attempt continues (its own client span).
    trace: Option<Outbound>,
}

impl Saved {
    /// What `req`, whose body is `body`, needs to be sent again; `None`
    /// when its head is too large to save.
    fn keep(req: &Request<RequestBody>, body: Replayable) -> Option<Kept> {
        let mut kept = Kept(Some(crate::kept::take(&SPARE).unwrap_or_default()));
        let saved = kept.0.as_deref_mut()?;
        if !saved.head.save(req.method(), req.uri(), req.headers()) {
            return None;
        }
        saved.version = req.version();
        saved.body = body;
        saved.trace = req.body().trace().cloned();
        Some(kept)
    }

    /// The request of attempt `n`; `None` if the saved head does not read
    /// back (it cannot: it was a request's).
    fn request(&self, n: u32, tried: &TriedEndpoints) -> Option<Request<RequestBody>> {
        let mut req = self.head.restore(self.body.body())?;
        *req.version_mut() = self.version;
        req.headers_mut().insert(&ATTEMPT_COUNT, attempt_value(n));
        if !tried.0.is_empty() {
            req.extensions_mut().insert(tried.clone());
        }
        req.body_mut()
            .set_trace(self.trace.as_ref().map(|trace| Box::new(trace.clone())));
        Some(req)
    }
}

/// A request's [`Saved`] copy, in a box that goes back to the thread's
/// spares when it is dropped ([`SPARE`]), emptied but with its buffer.
///
/// PERF: the thread's next request takes it back: keeping a request for a
/// retry then allocates nothing, neither the box nor the buffer, and
/// frees nothing.
#[derive(Debug)]
struct Kept(Option<Box<Saved>>);

thread_local! {
    /// Copies of requests that were dropped, for the next ones. (Boxes:
    /// the box itself is what is reused.)
    #[allow(clippy::vec_box)]
    static SPARE: crate::kept::Kept<Box<Saved>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Spare copies kept per thread, each with a buffer of at most
/// [`SPARE_CAPACITY`] bytes: about 136 KiB at most.
const SPARE_COPIES: usize = 32;
const SPARE_CAPACITY: usize = 4096;

impl Drop for Kept {
    fn drop(&mut self) {
        let Some(mut saved) = self.0.take() else {
            return;
        };
        if saved.head.bytes.capacity() > SPARE_CAPACITY {
            return;
        }
        saved.head.bytes.clear();
        saved.body = Replayable::default();
        saved.trace = None;
        // At the thread's exit the spares are gone: the copy is freed.
        crate::kept::keep(&SPARE, saved, SPARE_COPIES);
    }
}

/// A request's method, URI and headers, kept for a retry as bytes in one
/// buffer: the lengths of the method and of the URI's scheme, authority
/// and path (each empty when absent) as little-endian `u32`s, then those
/// four; then for each header in order its name's length and its value's
/// (`u32`s; the value's top bit marks a sensitive value), the name and the
/// value.
///
/// PERF: a clone of the URI and of each name and value (`Bytes`) costs a
/// reference count through a vtable for each, at the copy and again at
/// the drop, for a request that is almost never retried. The bytes cost
/// less to copy, nothing to drop, and are parsed again only for a retry.
#[derive(Debug, Default)]
struct SavedHead {
    bytes: Vec<u8>,
    headers: usize,
}

/// Marks a sensitive value in its saved length.
const SENSITIVE: u32 = 1 << 31;

impl SavedHead {
    /// Saves a request's head in place of what was saved; `false` when it
    /// is too long to record (2 GiB; far over any limit the proxy
    /// accepts).
    // Lengths are cast down unchecked, then checked at once: none is over
    // the whole, which is under 2 GiB.
    #[allow(clippy::cast_possible_truncation)]
    fn save(&mut self, method: &Method, uri: &http::Uri, headers: &http::HeaderMap) -> bool {
        let bytes = &mut self.bytes;
        bytes.clear();
        // Most parts, names and values together fit in 64 bytes.
        bytes.reserve(64 * (headers.len() + 1));
        let parts = [
            method.as_str(),
            uri.scheme_str().unwrap_or_default(),
            uri.authority().map_or("", http::uri::Authority::as_str),
            uri.path_and_query()
                .map_or("", http::uri::PathAndQuery::as_str),
        ];
        let mut lengths = [0; 16];
        for (length, part) in lengths.chunks_exact_mut(4).zip(parts) {
            length.copy_from_slice(&(part.len() as u32).to_le_bytes());
        }
        bytes.extend_from_slice(&lengths);
        // (An origin-form request has neither scheme nor authority.)
        for part in parts.iter().filter(|part| !part.is_empty()) {
            bytes.extend_from_slice(part.as_bytes());
        }
        for (name, value) in headers {
            let name = name.as_str().as_bytes();
            let value_bytes = value.as_bytes();
            let flag = if value.is_sensitive() { SENSITIVE } else { 0 };
            let lengths =
                u64::from(name.len() as u32) | u64::from(value_bytes.len() as u32 | flag) << 32;
            bytes.extend_from_slice(&lengths.to_le_bytes());
            bytes.extend_from_slice(name);
            bytes.extend_from_slice(value_bytes);
        }
        self.headers = headers.len();
        bytes.len() < SENSITIVE as usize
    }

    /// A request with the saved method, URI and headers (in their order),
    /// and `body`.
    fn restore(&self, body: RequestBody) -> Option<Request<RequestBody>> {
        let (lengths, mut rest) = self.bytes.split_first_chunk::<16>()?;
        let mut lengths = lengths.chunks_exact(4);
        let mut part = || {
            let (len, _) = take_u32(lengths.next()?)?;
            let (part, tail) = rest.split_at_checked(len as usize)?;
            rest = tail;
            Some(part)
        };
        let method = Method::from_bytes(part()?).ok()?;
        let (scheme, authority, path) = (part()?, part()?, part()?);
        let mut uri = http::uri::Parts::default();
        uri.scheme = (!scheme.is_empty())
            .then(|| http::uri::Scheme::try_from(scheme))
            .transpose()
            .ok()?;
        uri.authority = (!authority.is_empty())
            .then(|| http::uri::Authority::try_from(authority))
            .transpose()
            .ok()?;
        uri.path_and_query = (!path.is_empty())
            .then(|| http::uri::PathAndQuery::try_from(path))
            .transpose()
            .ok()?;
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = http::Uri::from_parts(uri).ok()?;
        let into = req.headers_mut();
        into.reserve(self.headers + 1);
        while let Some((name_len, tail)) = take_u32(rest)
            && let Some((value_len, tail)) = take_u32(tail)
        {
            let sensitive = value_len & SENSITIVE != 0;
            let (name_len, value_len) = (name_len as usize, (value_len & !SENSITIVE) as usize);
            let (name, tail) = tail.split_at_checked(name_len)?;
            let (value, tail) = tail.split_at_checked(value_len)?;
            rest = tail;
            let name = HeaderName::from_bytes(name).ok()?;
            let mut value = HeaderValue::from_bytes(value).ok()?;
            value.set_sensitive(sensitive);
            into.append(name, value);
        }
        Some(req)
    }
}

/// A little-endian `u32` from the front of `bytes`, and what follows it.
fn take_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (head, tail) = bytes.split_first_chunk::<4>()?;
    Some((u32::from_le_bytes(*head), tail))
}

/// What the retry loop takes over once a first attempt has failed.
struct Rest<S> {
    service: S,
    retrying: Arc<Retrying>,
    saved: Kept,
    /// The route's deadline, when this layer keeps it.
    deadline: Option<tokio::time::Instant>,
}

/// `future`, failed with [`ProxyError::UpstreamTimeout`] at `deadline`.
async fn within(
    deadline: Option<tokio::time::Instant>,
    future: impl Future<Output = Outcome>,
) -> Outcome {
    let Some(deadline) = deadline else {
        return future.await;
    };
    crate::clock::before(deadline, std::pin::pin!(future))
        .await
        .unwrap_or(Err(ProxyError::UpstreamTimeout))
}

pin_project! {
    /// The future of [`Retry`].
    #[project = RetryProj]
    pub(crate) enum RetryFuture<S, F> {
        // No retries: one attempt.
        Once { #[pin] inner: F },
        // The first attempt of a request that may be retried.
        First { #[pin] inner: F, rest: Option<Rest<S>> },
        // Reading the body, or retrying.
        Retrying { inner: Boxed },
    }
}

impl<S, F> Future for RetryFuture<S, F>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = ProxyError>
        + Send
        + 'static,
    S::Future: Send,
    F: Future<Output = Outcome>,
{
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        loop {
            let next = match self.as_mut().project() {
                RetryProj::Once { inner } => return inner.poll(cx),
                RetryProj::Retrying { inner } => return inner.as_mut().poll(cx),
                RetryProj::First { inner, rest } => {
                    // PERF: what was polled is returned as it is unless it
                    // is retried: taking the outcome out of the `Poll` and
                    // wrapping it in a new one copied it once more.
                    let polled = inner.poll(cx);
                    let Poll::Ready(outcome) = &polled else {
                        return Poll::Pending;
                    };
                    let Some(rest) =
                        rest.take_if(|kept| retryable(&kept.retrying.policy, outcome).is_some())
                    else {
                        return polled;
                    };
                    // (Ready: seen above.)
                    let Poll::Ready(outcome) = polled else {
                        return Poll::Pending;
                    };
                    RetryFuture::Retrying {
                        inner: Box::pin(within(rest.deadline, retry_after(rest, outcome))),
                    }
                }
            };
            self.set(next);
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

/// Reads the body up to the policy's bound, then sends the request,
/// retrying it if the body fitted, once if it did not.
async fn read_then_retry<S>(
    mut service: S,
    retrying: Arc<Retrying>,
    req: Request<RequestBody>,
    deadline: Option<tokio::time::Instant>,
) -> Outcome
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = ProxyError>,
{
    let policy = &retrying.policy;
    let (parts, mut body) = req.into_parts();
    let trace = body.take_trace();
    let body = match read_for_replay(body, policy.max_body_bytes).await {
        Ok(Ok(replayable)) => replayable,
        Ok(Err(mut streaming)) => {
            // Sent once.
            streaming.set_trace(trace);
            let mut req = Request::from_parts(parts, streaming);
            first_attempt(&mut req);
            return service.ready().await?.call(req).await;
        }
        Err(error) => {
            return Err(ProxyError::DownstreamBody {
                endpoint: None,
                source: error.0,
            });
        }
    };
    let mut req = Request::from_parts(parts, body.body());
    req.body_mut().set_trace(trace);
    let Some(saved) = Saved::keep(&req, body) else {
        // Too large to keep: sent once.
        first_attempt(&mut req);
        return service.ready().await?.call(req).await;
    };
    first_attempt(&mut req);
    let outcome = attempt(&mut service, req).await;
    retry_after(
        Rest {
            service,
            retrying: retrying.clone(),
            saved,
            deadline,
        },
        outcome,
    )
    .await
}

/// Retries after a first attempt's `outcome`, while the policy, the
/// cluster's `max_retries` and its budget allow.
async fn retry_after<S>(rest: Rest<S>, mut outcome: Outcome) -> Outcome
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = ProxyError>,
{
    let Rest {
        mut service,
        retrying,
        saved,
        deadline: _,
    } = rest;
    let policy = &retrying.policy;
    let mut tried = TriedEndpoints::default();
    let mut attempts: u32 = 1;
    let mut in_flight: Option<RetryInFlight> = None;
    loop {
        // A retried attempt is over: its place under `max_retries` frees.
        drop(in_flight.take());
        let Some(failed_on) = retryable(policy, &outcome) else {
            return with_attempts(outcome, attempts);
        };
        if attempts > policy.num_retries {
            return with_attempts(outcome, attempts);
        }
        let retry_after = match &outcome {
            Ok(response) => retry_after_header(response),
            Err(_) => None,
        };
        let wait = match retry_after {
            Some(wait) if wait > MAX_RETRY_AFTER => return with_attempts(outcome, attempts),
            Some(wait) => wait,
            None => backoff(policy, attempts),
        };
        if let Some(endpoint) = failed_on {
            tried.0.push(endpoint);
        }
        let next = saved
            .0
            .as_deref()
            .and_then(|saved| saved.request(attempts + 1, &tried));
        let Some(next) = next else {
            return with_attempts(outcome, attempts);
        };
        let Some(slot) = RetryInFlight::take(&retrying.metrics, retrying.max_retries) else {
            retrying.metrics.retries_overflow.fetch_add(1, Relaxed);
            tracing::debug!(attempts, "max_retries in flight; the failure goes back");
            return with_attempts(outcome, attempts);
        };
        if !retrying.budget.try_withdraw(
            crate::clock::nanos(),
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
        // The failed response's body is dropped (its connection closed)
        // before the next attempt.
        drop(outcome);
        tokio::time::sleep(wait).await;
        attempts += 1;
        outcome = attempt(&mut service, next).await;
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

/// One attempt.
async fn attempt<S>(inner: &mut S, req: Request<RequestBody>) -> Outcome
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = ProxyError>,
{
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
fn retry_after_header(response: &Response<ResponseBody>) -> Option<Duration> {
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
