//! The load generator: drives HTTP/1.1, h2c, gRPC or opaque TCP traffic at a
//! loopback target and reports throughput, errors and latency.
//!
//! # Model
//!
//! - **Open loop** (the default, like wrk2 and fortio): request `i` of a run
//!   has an intended send time `start + i / rate`, whatever happened before
//!   it. The connections share one schedule: a free connection takes the next
//!   slot. When every connection is busy, the slot waits, and its latency is
//!   counted from its intended time, so a stall of the target shows up as high
//!   latency for every request that should have been sent during it
//!   (coordinated omission is corrected). A request whose connection was
//!   idle is sent at the timer tick before it is due (Tokio's timers have
//!   1 ms granularity and never fire early, so waiting for the exact time
//!   would make every request up to 1 ms late) and counted from its actual
//!   send. If the runtime wakes late anyway, that lateness is the
//!   generator's, not the target's: it is reported as schedule lag instead.
//! - **Closed loop** (`--max`): each connection (each stream slot over h2)
//!   sends back to back; latency is counted from the actual send.
//!
//! Latency runs to the end of the response body (or of the echoed buffer in
//! TCP mode). Every request also records its *service time* (actual send to
//! end), the uncorrected view.
//!
//! # Invariants callers rely on
//!
//! - Only loopback targets are used: the host must resolve to 127.0.0.0/8 or
//!   `::1` only, else [`run`] fails with [`TargetError::NotLoopback`] before
//!   any connection is opened. The resolved address is the one connected to.
//! - A run is bounded: no request is started after the warm-up plus the
//!   measured duration; requests still in flight then get [`GRACE`] and are
//!   counted as unfinished; every connect and request has a timeout.
//! - The hot path takes no lock: each connection records into its own
//!   histograms and counters, merged when the run ends. The only shared
//!   write is the open loop's slot counter (one atomic add per request).
//!
//! The CLI (`weft-bench load`) is [`LoadArgs`] + [`run_cli`]; in-process
//! callers build a [`LoadConfig`] and await [`run`].

mod cli;
mod config;
mod driver;
mod http;
mod plan;
pub(crate) mod process;
mod progress;
mod record;
mod report;
mod runner;
mod target;
mod tcp;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use cli::{LoadArgs, run_cli};
pub use config::{LoadConfig, LoadMode, Protocol, TlsClient};
pub use report::{
    ErrorCounts, LatencySummary, LoadReport, LoopKind, ProcessUsage, RequestCounts,
    ScheduleSummary, TcpSummary,
};
pub use runner::run;
pub use target::TargetError;

/// How long requests still in flight when the run's duration ends may take
/// before they are abandoned and counted as unfinished.
pub const GRACE: Duration = Duration::from_secs(2);

/// Default timeout of one connect and of one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default cap on the requests one h2 connection keeps in flight.
pub const DEFAULT_STREAMS_PER_CONNECTION: usize = 100;

/// Default buffer echoed per round trip in TCP mode.
pub const DEFAULT_TCP_BUFFER_BYTES: usize = 16 * 1024;
