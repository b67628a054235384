//! Fault injection (chaos testing): the [`Fault`] layer delays a share of a
//! route's requests and answers a share with an error instead of sending
//! them on; [`TcpFaults`] delays or resets a TCP listener's connections.
//!
//! Faults may be limited to requests with given headers or from given
//! callers, and a route may let requests ask for faults themselves
//! (`x-weft-fault-delay: <ms>`, `x-weft-fault-abort: <status>`,
//! `x-weft-fault-abort-grpc: <code>`): a test can then fail exactly the
//! requests it sends. At most `max_active` faults are in progress at once;
//! past that, requests pass untouched (and are counted), so a long delay
//! on a busy route cannot pile up requests without bound.
//!
//! A route without faults pays nothing: the layer is a pass-through.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use pin_project_lite::pin_project;

use crate::config::{self, FaultAbort, Percent, TcpFault};
use crate::error::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::error::{Decision, is_grpc, local_reply};
use crate::resilience::rate_limit::Client;
use crate::telemetry::{ListenerMetrics, RequestMetrics};

/// Asks for a delay of this many milliseconds.
pub(crate) static DELAY_HEADER: HeaderName = HeaderName::from_static("x-weft-fault-delay");
/// Asks for this HTTP status instead of the upstream's answer.
pub(crate) static ABORT_HEADER: HeaderName = HeaderName::from_static("x-weft-fault-abort");
/// Asks for this gRPC status instead of the upstream's answer.
pub(crate) static ABORT_GRPC_HEADER: HeaderName =
    HeaderName::from_static("x-weft-fault-abort-grpc");
/// The longest delay a request may ask for.
const MAX_HEADER_DELAY: Duration = Duration::from_secs(60);

/// What to do to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) delay: Option<Duration>,
    pub(crate) abort: Option<FaultAbort>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }
}

/// A draw for a percentage: uniform in `0..1_000_000`.
fn draw() -> u32 {
    crate::rng::with_thread_rng(|rng| rng.u32(..1_000_000))
}

/// Decides a request's faults: the route's own, each for its share of
/// requests (`draw` gives the dice), and those the request asks for when
/// the route allows it.
pub(crate) fn plan(
    fault: &config::Fault,
    headers: &HeaderMap,
    caller: Option<&str>,
    mut draw: impl FnMut() -> u32,
) -> Plan {
    if !fault.headers.iter().all(|h| h.matches(headers)) {
        return Plan::default();
    }
    if !fault.source_identities.is_empty()
        && !caller.is_some_and(|id| fault.source_identities.iter().any(|m| m.matches(id)))
    {
        return Plan::default();
    }
    let mut plan = Plan {
        delay: fault
            .delay
            .and_then(|(delay, percent)| percent.hit(draw()).then_some(delay)),
        abort: fault
            .abort
            .and_then(|(abort, percent)| percent.hit(draw()).then_some(abort)),
    };
    if fault.allow_header_faults {
        let number = |name: &HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(ms) = number(&DELAY_HEADER) {
            plan.delay = Some(Duration::from_millis(ms).min(MAX_HEADER_DELAY));
        }
        let grpc = number(&ABORT_GRPC_HEADER)
            .and_then(|code| u8::try_from(code).ok())
            .filter(|code| *code <= 16);
        let status = number(&ABORT_HEADER)
            .and_then(|code| u16::try_from(code).ok())
            .filter(|code| (200..=599).contains(code))
            .and_then(|code| StatusCode::from_u16(code).ok());
        match (status, grpc) {
            (Some(status), grpc) => {
                plan.abort = Some(FaultAbort {
                    status,
                    grpc_status: grpc.unwrap_or_else(|| config::grpc_status_for_http(status)),
                });
            }
            (None, Some(grpc)) => {
                plan.abort = Some(FaultAbort {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    grpc_status: grpc,
                });
            }
            (None, None) => {}
        }
    }
    plan
}

/// A route's faults and the count of those in progress, shared by the
/// route's targets.
#[derive(Debug)]
pub(crate) struct RouteFaults {
    pub(crate) config: Arc<config::Fault>,
    active: AtomicU32,
}

impl RouteFaults {
    pub(crate) fn new(config: Arc<config::Fault>) -> Self {
        Self {
            config,
            active: AtomicU32::new(0),
        }
    }
}

/// Holds one of `max` fault slots until dropped.
#[derive(Debug)]
struct ActiveFault<'a>(&'a AtomicU32);

impl<'a> ActiveFault<'a> {
    fn try_new(active: &'a AtomicU32, max: u32) -> Option<Self> {
        let before = active.fetch_add(1, Relaxed);
        if before >= max {
            active.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Self(active))
    }
}

impl Drop for ActiveFault<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A route target's faults and the counters they feed.
#[derive(Debug)]
pub(crate) struct Faulting {
    pub(crate) faults: Arc<RouteFaults>,
    pub(crate) metrics: Arc<RequestMetrics>,
}

/// Builds [`Fault`] services.
#[derive(Debug, Clone)]
pub(crate) struct FaultLayer {
    state: Option<Arc<Faulting>>,
}

impl FaultLayer {
    /// `None`: no faults, a pass-through.
    pub(crate) fn new(state: Option<Arc<Faulting>>) -> Self {
        Self { state }
    }
}

impl<S> tower::Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Fault<S> {
        Fault {
            inner,
            state: self.state.clone(),
        }
    }
}

/// Injects the route's faults, then passes the request on (unless it was
/// aborted).
#[derive(Debug, Clone)]
pub(crate) struct Fault<S> {
    inner: S,
    state: Option<Arc<Faulting>>,
}

type BoxedResponse =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send>>;

impl<S, B> tower::Service<Request<B>> for Fault<S>
where
    S: tower::Service<Request<B>, Response = Response<ResponseBody>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = FaultFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(state) = &self.state else {
            return FaultFuture::Inner {
                inner: self.inner.call(req),
            };
        };
        let caller = req.extensions().get::<Client>().and_then(Client::identity);
        let plan = plan(&state.faults.config, req.headers(), caller, draw);
        if plan.is_empty() {
            return FaultFuture::Inner {
                inner: self.inner.call(req),
            };
        }
        let is_grpc = is_grpc(req.headers());
        let Some(delay) = plan.delay else {
            // An abort alone is over at once.
            let Some(_active) =
                ActiveFault::try_new(&state.faults.active, state.faults.config.max_active)
            else {
                state.metrics.faults_overflow.fetch_add(1, Relaxed);
                return FaultFuture::Inner {
                    inner: self.inner.call(req),
                };
            };
            state.metrics.faults_aborted.fetch_add(1, Relaxed);
            return FaultFuture::Done {
                response: plan.abort.map(|abort| Box::new(aborted(abort, is_grpc))),
            };
        };
        // The service that was made ready goes with the request; this one
        // keeps a clone (tower's rule for calling after a delay).
        let state = state.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        FaultFuture::Boxed {
            inner: Box::pin(async move {
                let faults = &state.faults;
                let Some(active) = ActiveFault::try_new(&faults.active, faults.config.max_active)
                else {
                    state.metrics.faults_overflow.fetch_add(1, Relaxed);
                    return inner.call(req).await;
                };
                state.metrics.faults_delayed.fetch_add(1, Relaxed);
                tokio::time::sleep(delay).await;
                drop(active);
                if let Some(abort) = plan.abort {
                    state.metrics.faults_aborted.fetch_add(1, Relaxed);
                    return Ok(aborted(abort, is_grpc));
                }
                let mut response = inner.call(req).await?;
                let status = response.status();
                response.extensions_mut().insert(Decision {
                    flag: "fault_delay",
                    status,
                });
                Ok(response)
            }),
        }
    }
}

/// The answer of an abort fault.
fn aborted(abort: FaultAbort, is_grpc: bool) -> Response<ResponseBody> {
    local_reply(
        abort.status,
        abort.grpc_status,
        "fault_abort",
        "fault injected\n",
        is_grpc,
    )
}

pin_project! {
    /// The future of [`Fault`].
    #[project = FaultProj]
    pub(crate) enum FaultFuture<F> {
        Inner { #[pin] inner: F },
        // Boxed: see `RateLimitFuture`.
        Done { response: Option<Box<Response<ResponseBody>>> },
        Boxed { inner: BoxedResponse },
    }
}

impl<F> Future for FaultFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            FaultProj::Inner { inner } => inner.poll(cx),
            FaultProj::Boxed { inner } => inner.as_mut().poll(cx),
            FaultProj::Done { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(*response)),
                // Polled again after completing: answered, not a panic.
                None => Poll::Ready(Err(ProxyError::NoRoute)),
            },
        }
    }
}

/// A TCP listener's faults, decided per connection.
#[derive(Debug)]
pub(crate) struct TcpFaults {
    config: TcpFault,
    active: AtomicU32,
}

/// What happens to one TCP connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TcpPlan {
    /// Forward as usual.
    Pass,
    /// Reset the client's connection at once.
    Reset,
    /// Wait this long before connecting upstream.
    Delay(Duration),
}

impl TcpFaults {
    pub(crate) fn new(config: TcpFault) -> Self {
        Self {
            config,
            active: AtomicU32::new(0),
        }
    }

    /// Decides a connection's fault and, for a delay, waits it out (within
    /// the cap on faults in progress). Returns whether to reset.
    pub(crate) async fn apply(&self, metrics: &ListenerMetrics) -> bool {
        match self.plan(draw) {
            TcpPlan::Pass => false,
            TcpPlan::Reset => {
                metrics.faults_reset.fetch_add(1, Relaxed);
                true
            }
            TcpPlan::Delay(delay) => {
                let Some(_active) = ActiveFault::try_new(&self.active, self.config.max_active)
                else {
                    metrics.faults_overflow.fetch_add(1, Relaxed);
                    return false;
                };
                metrics.faults_delayed.fetch_add(1, Relaxed);
                tokio::time::sleep(delay).await;
                false
            }
        }
    }

    fn plan(&self, mut draw: impl FnMut() -> u32) -> TcpPlan {
        if self.config.reset.is_some_and(|p: Percent| p.hit(draw())) {
            return TcpPlan::Reset;
        }
        match self.config.delay {
            Some((delay, percent)) if percent.hit(draw()) => TcpPlan::Delay(delay),
            _ => TcpPlan::Pass,
        }
    }
}

#[cfg(test)]
mod tests;
