//! What a run measured: [`LoadReport`], serialisable as one JSON object
//! (`--json`) and printable as a human summary ([`fmt::Display`]).
//!
//! Latencies are integer microseconds; rates are per second; "MB" is 10^6
//! bytes.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{LoadMode, Protocol};

/// Everything one load run measured over its measured window.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadReport {
    /// The target URL.
    pub target: String,
    /// The address connected to.
    pub address: String,
    /// The protocol spoken.
    pub protocol: Protocol,
    /// Open or closed loop.
    pub mode: LoopKind,
    /// The scheduled rate (open loop only).
    pub rate_per_second: Option<f64>,
    /// Connections used.
    pub connections: usize,
    /// h2 and gRPC: the cap on requests in flight per connection.
    pub streams_per_connection: Option<usize>,
    /// Request body (HTTP), payload (gRPC) or echoed buffer (TCP) size.
    pub body_size_bytes: usize,
    /// Length of the measured window, in seconds.
    pub duration_seconds: f64,
    /// Length of the unrecorded warm-up before it, in seconds.
    pub warmup_seconds: f64,
    /// What happened to the measured requests.
    pub requests: RequestCounts,
    /// Completed requests per second: over the measured window or, when the
    /// last measured request completed after it (the generator fell
    /// behind), until that completion.
    pub throughput_per_second: f64,
    /// Failures by kind.
    pub errors: ErrorCounts,
    /// Latency corrected for coordinated omission (open loop: from the
    /// intended send time when the request had to wait for a connection),
    /// of completed requests.
    pub latency: LatencySummary,
    /// Service time (from the actual send), of completed requests: the
    /// uncorrected view.
    pub service_time: LatencySummary,
    /// How well the generator kept its schedule (open loop only).
    pub schedule: Option<ScheduleSummary>,
    /// Bytes and connections (TCP mode only).
    pub tcp: Option<TcpSummary>,
    /// HTTP/1.1 with a new connection per request: connections opened for
    /// measured requests.
    #[serde(default)]
    pub http_connections_opened: Option<u64>,
    /// HTTP/1.1 over TLS with a new connection per request: how many of
    /// the connections opened for measured requests resumed a TLS session
    /// (the others made a full handshake).
    #[serde(default)]
    pub tls_resumed_connections: Option<u64>,
    /// Resources of the processes given with `--pid`, summed.
    pub process: Option<ProcessUsage>,
    /// CPU time the generator itself used during the measured window, in
    /// seconds (Linux only).
    pub generator_cpu_seconds: Option<f64>,
}

/// Counts of measured requests. `sent = completed + unfinished +
/// errors.connect + errors.timeout + errors.reset_or_protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Requests attempted (due or sent in the measured window).
    pub sent: u64,
    /// Responses read in full, whatever their status.
    pub completed: u64,
    /// Completed with a 1xx–3xx status (and gRPC status 0).
    pub ok: u64,
    /// Still in flight when the grace period after the run ran out.
    pub unfinished: u64,
}

impl RequestCounts {
    pub(crate) fn add(&mut self, other: &Self) {
        self.sent += other.sent;
        self.completed += other.completed;
        self.ok += other.ok;
        self.unfinished += other.unfinished;
    }
}

/// Failed measured requests, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    /// The connection could not be opened (refused, failed, timed out).
    pub connect: u64,
    /// No full response within the timeout.
    pub timeout: u64,
    /// Completed with a 4xx status.
    pub status_4xx: u64,
    /// Completed with a 5xx status.
    pub status_5xx: u64,
    /// Connection reset, or the peer broke the protocol (including a gRPC
    /// response without `grpc-status`).
    pub reset_or_protocol: u64,
    /// gRPC call completed with a non-zero `grpc-status`.
    pub grpc_status: u64,
}

impl ErrorCounts {
    pub(crate) fn add(&mut self, other: &Self) {
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.status_4xx += other.status_4xx;
        self.status_5xx += other.status_5xx;
        self.reset_or_protocol += other.reset_or_protocol;
        self.grpc_status += other.grpc_status;
    }

    /// All failures.
    pub fn total(&self) -> u64 {
        self.connect
            + self.timeout
            + self.status_4xx
            + self.status_5xx
            + self.reset_or_protocol
            + self.grpc_status
    }
}

/// Percentiles of a latency histogram, in microseconds (3 significant
/// digits; values over 60 s are clamped to 60 s). All zero when nothing
/// completed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
}

/// How late requests were sent against the open-loop schedule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSummary {
    /// The largest delay between a request's intended and actual send, for
    /// any reason (every connection busy, or the generator late).
    pub max_lag_us: u64,
    /// The largest such delay on a connection that was idle when the
    /// request was due: the generator's own lateness (timer granularity,
    /// CPU shortage), not counted as latency.
    pub max_idle_lag_us: u64,
    /// Requests sent more than 10 ms after their intended time.
    pub late_sends: u64,
}

impl ScheduleSummary {
    /// Whether the generator fell behind its schedule (some request was
    /// sent more than 10 ms late).
    pub fn is_behind(&self) -> bool {
        self.late_sends > 0
    }
}

/// Bytes and connections of a TCP run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpSummary {
    /// Bytes written by completed measured requests.
    pub bytes_sent: u64,
    /// Bytes read back by completed measured requests.
    pub bytes_received: u64,
    /// `bytes_sent` per second (over the same time as the throughput), in
    /// MB (10^6 bytes).
    pub sent_mb_per_second: f64,
    /// `bytes_received` per second, in MB (10^6 bytes).
    pub received_mb_per_second: f64,
    /// Connections opened during the measured window.
    pub connections_opened: u64,
    /// `connections_opened` per second.
    pub connections_per_second: f64,
}

/// CPU and memory of the processes under test over the measured window,
/// summed over the processes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessUsage {
    /// The process ids, in the order given. Reports written when one
    /// process was accounted have a single `pid` instead, read as a set of
    /// one.
    #[serde(alias = "pid", deserialize_with = "one_or_many_pids")]
    pub pids: Vec<u32>,
    /// User plus system CPU time used, in seconds.
    pub cpu_seconds: f64,
    /// `cpu_seconds` per completed request, in microseconds.
    pub cpu_us_per_request: Option<f64>,
    /// Resident set size when the window started.
    pub rss_before_bytes: u64,
    /// Highest resident set size sampled (every 100 ms) during the window.
    pub rss_peak_bytes: u64,
    /// Resident set size when the window ended.
    pub rss_after_bytes: u64,
}

/// `pids` as a list, or as the single number older reports hold.
fn one_or_many_pids<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Pids {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Pids::deserialize(deserializer)? {
        Pids::One(pid) => vec![pid],
        Pids::Many(pids) => pids,
    })
}

/// `pid 12` or `pids 12 + 34` (the figures after it are sums).
fn pid_list(pids: &[u32]) -> String {
    match pids {
        [pid] => format!("pid {pid}"),
        _ => {
            let listed: Vec<String> = pids.iter().map(u32::to_string).collect();
            format!("pids {}", listed.join(" + "))
        }
    }
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count == 0 {
            return write!(f, "no completed requests");
        }
        write!(
            f,
            "mean {:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms",
            self.mean_us / 1000.0,
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
        )
    }
}

impl fmt::Display for ErrorCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total() == 0 {
            return write!(f, "none");
        }
        let kinds = [
            ("connect", self.connect),
            ("timeout", self.timeout),
            ("4xx", self.status_4xx),
            ("5xx", self.status_5xx),
            ("reset/protocol", self.reset_or_protocol),
            ("grpc-status", self.grpc_status),
        ];
        let mut first = true;
        for (name, count) in kinds.into_iter().filter(|&(_, count)| count > 0) {
            if !first {
                write!(f, ", ")?;
            }
            first = false;
            write!(f, "{name} {count}")?;
        }
        Ok(())
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pacing = match self.rate_per_second {
            Some(rate) => format!("open loop at {rate} req/s"),
            None => "closed loop (--max)".to_owned(),
        };
        let streams = self
            .streams_per_connection
            .map(|streams| format!(" x {streams} streams"))
            .unwrap_or_default();
        writeln!(
            f,
            "target        {} ({}, {}, {} connection{}{streams}, {pacing})",
            self.target,
            self.address,
            self.protocol.label(),
            self.connections,
            if self.connections == 1 { "" } else { "s" },
        )?;
        writeln!(
            f,
            "window        {:.2} s measured after {:.2} s warm-up",
            self.duration_seconds, self.warmup_seconds
        )?;
        writeln!(
            f,
            "requests      {} completed ({} ok), {} sent, {} unfinished",
            self.requests.completed, self.requests.ok, self.requests.sent, self.requests.unfinished
        )?;
        writeln!(f, "throughput    {:.1} req/s", self.throughput_per_second)?;
        writeln!(f, "errors        {}", self.errors)?;
        let latency_label = if self.rate_per_second.is_some() {
            "latency       (corrected for coordinated omission)"
        } else {
            "latency       (from the actual send)"
        };
        writeln!(f, "{latency_label}")?;
        writeln!(f, "              {}", self.latency)?;
        if self.rate_per_second.is_some() {
            writeln!(f, "service time  (from the actual send, uncorrected)")?;
            writeln!(f, "              {}", self.service_time)?;
        }
        if let Some(schedule) = &self.schedule {
            write!(
                f,
                "schedule      max lag {:.3} ms (idle connections: {:.3} ms)",
                ms(schedule.max_lag_us),
                ms(schedule.max_idle_lag_us)
            )?;
            if schedule.is_behind() {
                writeln!(
                    f,
                    "\n              BEHIND SCHEDULE: {} requests were sent more than 10 ms late \
                     (all connections busy, or the generator short of CPU); \
                     the achieved rate may be below the requested one",
                    schedule.late_sends
                )?;
            } else {
                writeln!(f, ", on schedule")?;
            }
        }
        if let Some(tcp) = &self.tcp {
            writeln!(
                f,
                "tcp           sent {:.1} MB/s, received {:.1} MB/s, {} connections opened ({:.1}/s)",
                tcp.sent_mb_per_second,
                tcp.received_mb_per_second,
                tcp.connections_opened,
                tcp.connections_per_second
            )?;
        }
        if let Some(opened) = self.http_connections_opened {
            writeln!(f, "connections   {opened} opened, one per request")?;
        }
        if let Some(process) = &self.process {
            let per_request = process
                .cpu_us_per_request
                .map(|us| format!(" ({us:.1} us/request)"))
                .unwrap_or_default();
            writeln!(
                f,
                "process       {}: cpu {:.2} s{per_request}; rss {:.1} MiB before, {:.1} MiB peak, {:.1} MiB after",
                pid_list(&process.pids),
                process.cpu_seconds,
                mib(process.rss_before_bytes),
                mib(process.rss_peak_bytes),
                mib(process.rss_after_bytes),
            )?;
        }
        if let Some(cpu) = self.generator_cpu_seconds {
            writeln!(f, "generator     cpu {cpu:.2} s")?;
        }
        Ok(())
    }
}

/// Whether a run was paced (the report's side of [`LoadMode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoopKind {
    /// Scheduled at a constant rate.
    OpenLoop,
    /// Back to back (`--max`).
    ClosedLoop,
}

impl From<LoadMode> for LoopKind {
    fn from(mode: LoadMode) -> Self {
        match mode {
            LoadMode::OpenLoop { .. } => Self::OpenLoop,
            LoadMode::ClosedLoop => Self::ClosedLoop,
        }
    }
}
