//! Per-connection recording: each connection task owns a [`Recorder`]
//! (histograms and counters, no sharing), and the runner merges them when the
//! run ends.

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use super::plan::Timing;
use super::progress::Counter;
use super::report::{ErrorCounts, LatencySummary, RequestCounts};

/// Highest latency the histograms resolve, in microseconds (60 s); longer
/// values are clamped to it.
const HISTOGRAM_MAX_MICROS: u64 = 60_000_000;

/// Significant decimal digits the histograms keep (0.1 % value error).
const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;

/// A send later than this against its schedule counts as late.
pub(crate) const LATE_SEND: Duration = Duration::from_millis(10);

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Response read in full: 1xx–3xx status (and gRPC status 0), or the
    /// TCP buffer echoed back.
    Ok,
    /// Response read in full with a 4xx status.
    Status4xx,
    /// Response read in full with a 5xx status.
    Status5xx,
    /// gRPC response read in full with a non-zero `grpc-status`.
    GrpcStatus,
    /// The connection could not be opened (refused, failed or timed out).
    Connect,
    /// No full response before the request's timeout.
    Timeout,
    /// The connection was reset or the peer broke the protocol.
    ResetOrProtocol,
    /// Still in flight when the run's grace period ran out.
    Unfinished,
}

impl Outcome {
    /// Whether a response was read in full (the latency is recorded).
    fn is_completed(self) -> bool {
        matches!(
            self,
            Self::Ok | Self::Status4xx | Self::Status5xx | Self::GrpcStatus
        )
    }
}

/// One connection's measurements.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// From the latency start (intended time when backlogged) to the end.
    latency: Histogram<u64>,
    /// From the actual send to the end.
    service_time: Histogram<u64>,
    pub(crate) requests: RequestCounts,
    pub(crate) errors: ErrorCounts,
    pub(crate) max_lag: Duration,
    pub(crate) max_idle_lag: Duration,
    pub(crate) late_sends: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    pub(crate) connections_opened: u64,
    /// Of those, TLS connections that resumed a session.
    pub(crate) tls_resumed: u64,
    /// When the last measured request completed.
    pub(crate) last_completion: Option<Instant>,
    progress: Arc<Counter>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_MICROS, HISTOGRAM_SIGNIFICANT_DIGITS)
        .expect("the histogram bounds are constant and valid")
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl Recorder {
    /// An empty recorder reporting progress to `progress`.
    pub(crate) fn new(progress: Arc<Counter>) -> Self {
        Self {
            latency: histogram(),
            service_time: histogram(),
            requests: RequestCounts::default(),
            errors: ErrorCounts::default(),
            max_lag: Duration::ZERO,
            max_idle_lag: Duration::ZERO,
            late_sends: 0,
            bytes_sent: 0,
            bytes_received: 0,
            connections_opened: 0,
            tls_resumed: 0,
            last_completion: None,
            progress,
        }
    }

    /// Records a request sent with `timing` that ended at `end` with
    /// `outcome`. Only requests in the measured window count.
    pub(crate) fn record(&mut self, timing: &Timing, end: Instant, outcome: Outcome) {
        self.progress.add(outcome != Outcome::Ok);
        let is_completed = outcome.is_completed();
        if !timing.is_measured {
            return;
        }
        self.requests.sent += 1;
        self.max_lag = self.max_lag.max(timing.lag);
        if timing.is_idle_lag {
            self.max_idle_lag = self.max_idle_lag.max(timing.lag);
        }
        if timing.lag > LATE_SEND {
            self.late_sends += 1;
        }
        if is_completed {
            self.requests.completed += 1;
            self.last_completion = self.last_completion.max(Some(end));
            self.latency
                .saturating_record(micros(end.saturating_duration_since(timing.start)));
            self.service_time
                .saturating_record(micros(end.saturating_duration_since(timing.sent)));
        }
        match outcome {
            Outcome::Ok => self.requests.ok += 1,
            Outcome::Status4xx => self.errors.status_4xx += 1,
            Outcome::Status5xx => self.errors.status_5xx += 1,
            Outcome::GrpcStatus => self.errors.grpc_status += 1,
            Outcome::Connect => self.errors.connect += 1,
            Outcome::Timeout => self.errors.timeout += 1,
            Outcome::ResetOrProtocol => self.errors.reset_or_protocol += 1,
            Outcome::Unfinished => self.requests.unfinished += 1,
        }
    }

    /// Records bytes moved by a measured TCP request that completed.
    pub(crate) fn record_bytes(&mut self, timing: &Timing, sent: u64, received: u64) {
        if timing.is_measured {
            self.bytes_sent += sent;
            self.bytes_received += received;
        }
    }

    /// Records a connection opened for a request with `timing`, and
    /// whether its TLS handshake resumed a session.
    pub(crate) fn record_connection(&mut self, timing: &Timing, is_tls_resumed: bool) {
        if timing.is_measured {
            self.connections_opened += 1;
            self.tls_resumed += u64::from(is_tls_resumed);
        }
    }

    /// Adds `other`'s measurements to this one's.
    pub(crate) fn merge(&mut self, other: &Self) {
        self.latency
            .add(&other.latency)
            .expect("every recorder's histograms have the same bounds");
        self.service_time
            .add(&other.service_time)
            .expect("every recorder's histograms have the same bounds");
        self.requests.add(&other.requests);
        self.errors.add(&other.errors);
        self.max_lag = self.max_lag.max(other.max_lag);
        self.max_idle_lag = self.max_idle_lag.max(other.max_idle_lag);
        self.late_sends += other.late_sends;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.connections_opened += other.connections_opened;
        self.tls_resumed += other.tls_resumed;
        self.last_completion = self.last_completion.max(other.last_completion);
    }

    /// Percentiles of the coordinated-omission-corrected latency.
    pub(crate) fn latency(&self) -> LatencySummary {
        summarize(&self.latency)
    }

    /// Percentiles of the service time (actual send to end).
    pub(crate) fn service_time(&self) -> LatencySummary {
        summarize(&self.service_time)
    }
}

fn summarize(histogram: &Histogram<u64>) -> LatencySummary {
    if histogram.is_empty() {
        return LatencySummary::default();
    }
    LatencySummary {
        count: histogram.len(),
        mean_us: histogram.mean(),
        p50_us: histogram.value_at_quantile(0.50),
        p90_us: histogram.value_at_quantile(0.90),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
    }
}
