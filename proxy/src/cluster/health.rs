//! Active health checking: each endpoint of a cluster with a `health_check`
//! is probed on an interval (HTTP `GET`, TCP connect, or gRPC
//! `grpc.health.v1.Health/Check`) by one background task per cluster, on the
//! control runtime, off the request path. Probes connect the way requests
//! do ([`Endpoint::probe_connect`]): a TLS cluster's probes complete the
//! same (mutual) TLS handshake and verify the same identity.
//!
//! An endpoint's status lives on the endpoint, so it survives a
//! configuration change with its pool. A new endpoint is `unknown`, which
//! the balancer treats as not healthy; its first probe decides at once
//! (passed: healthy, failed: unhealthy), and so does the first it ever
//! passes; later ones go through the thresholds ([`next`]).
//! A cluster whose endpoints are all unknown (just configured) is below any
//! panic threshold, so it balances across all of them until the first
//! round of probes comes back, a few milliseconds later: nothing is
//! refused while the proxy starts, and an endpoint that joins a serving
//! cluster gets traffic only once it has passed a probe (Envoy's choice).

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http::{Request, header};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use weft_proto::grpc::health::v1::health_check_response::ServingStatus;
use weft_proto::grpc::health::v1::{HealthCheckRequest, HealthCheckResponse};
use weft_proto::prost::Message as _;

use super::{ClusterState, Endpoint, Wire};
use crate::config::{HealthCheck, HealthCheckKind};
use crate::error::ProxyError;

/// An endpoint's active-health status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Not probed yet.
    Unknown,
    /// Passing.
    Healthy,
    /// Failing.
    Unhealthy,
}

impl Status {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Healthy,
            2 => Self::Unhealthy,
            _ => Self::Unknown,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::Healthy => 1,
            Self::Unhealthy => 2,
        }
    }

    /// As `/clusters` shows it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Passed.
    Success,
    /// Failed, and why (`status 503`, `connect refused`, ...).
    Failure(String),
    /// Not answered within the timeout.
    Timeout,
}

impl Outcome {
    fn passed(&self) -> bool {
        matches!(self, Self::Success)
    }

    fn describe(&self) -> Arc<str> {
        match self {
            Self::Success => "ok".into(),
            Self::Failure(why) => why.as_str().into(),
            Self::Timeout => "timeout".into(),
        }
    }
}

/// Results in a row that count toward a transition.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Streak {
    successes: u32,
    failures: u32,
    /// Some probe has passed.
    passed_once: bool,
}

/// The state machine: the status after one probe. A first probe decides
/// at once, and so does the first that passes (an endpoint that was not
/// up yet when first probed has no failing history to confirm: a start
/// order race must not keep it out for `healthy_threshold` intervals);
/// then `unhealthy_threshold` failures in a row make a healthy endpoint
/// unhealthy and `healthy_threshold` successes in a row make an unhealthy
/// one healthy.
pub(crate) fn next(
    status: Status,
    streak: Streak,
    passed: bool,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
) -> (Status, Streak) {
    let first_pass = passed && !streak.passed_once;
    let streak = if passed {
        Streak {
            successes: streak.successes.saturating_add(1),
            failures: 0,
            passed_once: true,
        }
    } else {
        Streak {
            successes: 0,
            failures: streak.failures.saturating_add(1),
            ..streak
        }
    };
    let status = match status {
        Status::Unknown if passed => Status::Healthy,
        Status::Unknown => Status::Unhealthy,
        Status::Healthy if streak.failures >= unhealthy_threshold => Status::Unhealthy,
        Status::Unhealthy if first_pass || streak.successes >= healthy_threshold => Status::Healthy,
        unchanged => unchanged,
    };
    (status, streak)
}

/// One endpoint's active-health record.
#[derive(Debug, Default)]
pub(crate) struct HealthState {
    /// [`Status`] as a byte: what the balancer reads.
    status: AtomicU8,
    record: Mutex<Record>,
}

#[derive(Debug, Default)]
struct Record {
    streak: Streak,
    /// The last probe's outcome, for `/clusters`.
    last: Option<Arc<str>>,
}

impl HealthState {
    /// The current status.
    pub(crate) fn status(&self) -> Status {
        Status::from_u8(self.status.load(Relaxed))
    }

    /// Whether the balancer may pick the endpoint (when the cluster is
    /// health checked).
    pub(crate) fn is_healthy(&self) -> bool {
        self.status.load(Relaxed) == Status::Healthy.as_u8()
    }

    /// The last probe's outcome (`ok`, `status 503`, `timeout`, ...).
    pub(crate) fn last_check(&self) -> Option<Arc<str>> {
        self.record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last
            .clone()
    }

    /// Records one probe; returns the new status when it changed.
    pub(super) fn record(&self, config: &HealthCheck, outcome: &Outcome) -> Option<Status> {
        let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        let before = self.status();
        let (after, streak) = next(
            before,
            record.streak,
            outcome.passed(),
            config.healthy_threshold,
            config.unhealthy_threshold,
        );
        record.streak = streak;
        record.last = Some(outcome.describe());
        self.status.store(after.as_u8(), Relaxed);
        (after != before).then_some(after)
    }
}

/// Probes a cluster's endpoints every interval (plus jitter) until the
/// cluster state is dropped (the cluster was removed or replaced; its
/// successor, which keeps the endpoints, runs its own task). The first
/// round runs at once.
pub(crate) async fn run(state: Weak<ClusterState>) {
    loop {
        let Some((config, endpoints, metrics, cluster)) = state.upgrade().and_then(|s| {
            let config = s.config.health_check.clone()?;
            Some((
                config,
                s.endpoints().endpoints.clone(),
                s.metrics(),
                s.config.name.clone(),
            ))
        }) else {
            return;
        };
        let probes = endpoints.iter().map(|e| probe(&config, e));
        let outcomes = futures_util::future::join_all(probes).await;
        let mut healthy = 0;
        for (endpoint, outcome) in endpoints.iter().zip(&outcomes) {
            let counter = match outcome {
                Outcome::Success => &metrics.health_checks_success,
                Outcome::Failure(_) => &metrics.health_checks_failure,
                Outcome::Timeout => &metrics.health_checks_timeout,
            };
            counter.fetch_add(1, Relaxed);
            if let Some(status) = endpoint.health.record(&config, outcome) {
                match status {
                    Status::Unhealthy => tracing::warn!(
                        %cluster, endpoint = %endpoint.addr, last_check = %outcome.describe(),
                        "endpoint unhealthy (active health check)"
                    ),
                    _ => tracing::info!(
                        %cluster, endpoint = %endpoint.addr, status = status.as_str(),
                        "endpoint healthy (active health check)"
                    ),
                }
            }
            healthy += i64::from(endpoint.health.is_healthy());
        }
        metrics.endpoints_healthy.store(healthy, Relaxed);
        drop(endpoints);
        let jitter = crate::rng::with_thread_rng(|rng| {
            let max = u64::try_from(config.interval_jitter.as_micros()).unwrap_or(u64::MAX);
            Duration::from_micros(rng.u64(..=max))
        });
        tokio::time::sleep(config.interval + jitter).await;
    }
}

/// Runs one probe within the timeout.
pub(crate) async fn probe(config: &HealthCheck, endpoint: &Endpoint) -> Outcome {
    let attempt = async {
        match &config.kind {
            HealthCheckKind::Tcp => endpoint
                .probe_connect(Wire::Http1)
                .await
                .map(drop)
                .map_err(|e| connect_failure(&e)),
            HealthCheckKind::Http {
                path,
                host,
                expected_statuses,
            } => {
                let status = http_status(endpoint, path, host).await?;
                let code = status.as_u16();
                if expected_statuses
                    .iter()
                    .any(|&(lo, hi)| (lo..=hi).contains(&code))
                {
                    Ok(())
                } else {
                    Err(format!("status {code}"))
                }
            }
            HealthCheckKind::Grpc { service, authority } => {
                grpc_check(endpoint, service, authority).await
            }
        }
    };
    match tokio::time::timeout(config.timeout, attempt).await {
        Ok(Ok(())) => Outcome::Success,
        Ok(Err(why)) => Outcome::Failure(why),
        Err(_) => Outcome::Timeout,
    }
}

/// Why a probe's connection failed, in a few words.
fn connect_failure(error: &ProxyError) -> String {
    match error {
        ProxyError::UpstreamConnect { source, .. } => match source.kind() {
            std::io::ErrorKind::ConnectionRefused => "connect refused".to_owned(),
            _ => format!("connect failed: {source}"),
        },
        ProxyError::ConnectTimeout { .. } => "connect timeout".to_owned(),
        ProxyError::UpstreamTls { source, .. } => format!("tls failed: {source}"),
        other => other.to_string(),
    }
}

/// `GET path` on a new HTTP/1.1 connection; the response's status.
async fn http_status(
    endpoint: &Endpoint,
    path: &http::uri::PathAndQuery,
    host: &http::HeaderValue,
) -> Result<http::StatusCode, String> {
    let stream = endpoint
        .probe_connect(Wire::Http1)
        .await
        .map_err(|e| connect_failure(&e))?;
    let (mut sender, conn) = http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake failed: {e}"))?;
    // The connection ends when the sender is dropped, with this probe.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = Request::get(path.as_str())
        .header(header::HOST, host)
        .header(header::USER_AGENT, USER_AGENT)
        .header(header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    Ok(response.status())
}

const USER_AGENT: &str = "weft-health-check";

/// The largest health response read: the protocol's answer is 2 bytes.
const MAX_GRPC_RESPONSE: usize = 1024;

/// `grpc.health.v1.Health/Check` on a new HTTP/2 connection.
async fn grpc_check(
    endpoint: &Endpoint,
    service: &str,
    authority: &http::uri::Authority,
) -> Result<(), String> {
    let stream = endpoint
        .probe_connect(Wire::Http2)
        .await
        .map_err(|e| connect_failure(&e))?;
    let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake failed: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let message = HealthCheckRequest {
        service: service.to_owned(),
    }
    .encode_to_vec();
    let mut body = BytesMut::with_capacity(5 + message.len());
    body.put_u8(0);
    body.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    body.put_slice(&message);
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(authority.clone())
        .path_and_query("/grpc.health.v1.Health/Check")
        .build()
        .map_err(|e| format!("request: {e}"))?;
    let request = Request::post(uri)
        .version(http::Version::HTTP_2)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, USER_AGENT)
        .body(Full::new(body.freeze()))
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("status {}", response.status().as_u16()));
    }
    let (parts, body) = response.into_parts();
    let collected = http_body_util::Limited::new(body, MAX_GRPC_RESPONSE)
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?;
    // A trailers-only answer carries `grpc-status` in the headers.
    let grpc_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .map(|v| v.as_bytes().to_vec());
    match grpc_status.as_deref() {
        Some(b"0") => {}
        Some(code) => {
            return Err(format!("grpc-status {}", String::from_utf8_lossy(code)));
        }
        None => return Err("no grpc-status".to_owned()),
    }
    let mut data = collected.to_bytes();
    if data.len() < 5 || data[0] != 0 {
        return Err("malformed response".to_owned());
    }
    data.advance(5);
    let response =
        HealthCheckResponse::decode(data).map_err(|_| "malformed response".to_owned())?;
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(status) => Err(status.as_str_name().to_owned()),
        Err(_) => Err(format!("serving status {}", response.status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_probe_decides_then_thresholds_do() {
        let (h, u) = (2, 3);
        // Unknown: one result decides either way.
        assert_eq!(
            next(Status::Unknown, Streak::default(), false, h, u).0,
            Status::Unhealthy
        );
        let mut state = next(Status::Unknown, Streak::default(), true, h, u);
        assert_eq!(state.0, Status::Healthy);
        // Healthy: two failures and a success start over; three in a row
        // turn it unhealthy.
        for passed in [false, false, true, false, false] {
            state = next(state.0, state.1, passed, h, u);
            assert_eq!(state.0, Status::Healthy);
        }
        state = next(state.0, state.1, false, h, u);
        assert_eq!(state.0, Status::Unhealthy);
        // Unhealthy: a success, a failure, then two successes.
        for (passed, want) in [
            (true, Status::Unhealthy),
            (false, Status::Unhealthy),
            (true, Status::Unhealthy),
            (true, Status::Healthy),
        ] {
            state = next(state.0, state.1, passed, h, u);
            assert_eq!(state.0, want);
        }
    }

    #[test]
    fn an_endpoint_that_never_passed_is_healthy_at_its_first_pass() {
        let (h, u) = (3, 3);
        // Not up yet when first probed: failing, then up.
        let mut state = (Status::Unknown, Streak::default());
        for (passed, want) in [
            (false, Status::Unhealthy),
            (false, Status::Unhealthy),
            (true, Status::Healthy),
            (false, Status::Healthy),
            (false, Status::Healthy),
            (false, Status::Unhealthy),
            // Now it has a history: three passes to come back.
            (true, Status::Unhealthy),
            (true, Status::Unhealthy),
            (true, Status::Healthy),
        ] {
            state = next(state.0, state.1, passed, h, u);
            assert_eq!(state.0, want);
        }
    }

    #[test]
    fn thresholds_of_one_flip_at_each_change() {
        let mut state = (Status::Healthy, Streak::default());
        for (passed, want) in [
            (false, Status::Unhealthy),
            (false, Status::Unhealthy),
            (true, Status::Healthy),
            (true, Status::Healthy),
            (false, Status::Unhealthy),
        ] {
            state = next(state.0, state.1, passed, 1, 1);
            assert_eq!(state.0, want);
        }
    }

    #[test]
    fn records_keep_the_last_outcome_and_report_changes() {
        let config = HealthCheck {
            kind: HealthCheckKind::Tcp,
            interval: Duration::from_secs(1),
            interval_jitter: Duration::ZERO,
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        };
        let health = HealthState::default();
        assert_eq!(health.status(), Status::Unknown);
        assert!(!health.is_healthy());
        assert_eq!(
            health.record(&config, &Outcome::Success),
            Some(Status::Healthy)
        );
        assert_eq!(
            health.record(&config, &Outcome::Failure("status 503".into())),
            None
        );
        assert_eq!(health.last_check().as_deref(), Some("status 503"));
        assert_eq!(
            health.record(&config, &Outcome::Timeout),
            Some(Status::Unhealthy)
        );
        assert_eq!(health.last_check().as_deref(), Some("timeout"));
        assert!(!health.is_healthy());
    }
}
