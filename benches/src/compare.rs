//! The scenario runner (`weft-bench compare`): the same traffic through no
//! proxy, weft, nginx and HAProxy on loopback, reported side by side.
//!
//! # What it owns
//!
//! - Starting the targets ([`TargetKind`]): the in-process echo upstream
//!   (`direct`), `weft-proxy` with a plain and a full-featured
//!   configuration, and nginx and HAProxy when they are installed. Each proxy
//!   runs one worker (`--concurrency 1`, `worker_processes 1`, `nbthread 1`)
//!   with upstream keep-alive, on loopback ports chosen at run time, and is
//!   killed when the runner drops it (its whole process group, so nginx's
//!   worker goes too).
//! - Running the [`Scenario`]s: each load run goes through
//!   [`load::run`](crate::load::run) in-process, interleaved across targets
//!   (A B C A B C ...) for [`CompareConfig::rounds`]; medians are reported.
//!   The closed-loop HTTP/1.1 and h2c runs are driven by `wrk` and `h2load`
//!   instead when they are installed (see `driver`), pinned to the load
//!   CPUs; every row names its [`Driver`] and says how busy the proxy's
//!   core and the load CPUs were.
//!   Memory scenarios start a fresh process per target and round.
//! - The handshake scenarios (`handshake`: mutual TLS, full handshakes;
//!   `handshake-resume`: server-only TLS with every handshake full, then
//!   resuming sessions): weft, nginx and HAProxy get TLS 1.3 listeners with
//!   the same ECDSA P-256 certificate (see `handshake`), and the built-in
//!   generator opens a new TLS connection per HTTP/1.1 request. Their
//!   primary figure is handshakes per second of proxy CPU.
//! - The [`CompareReport`]: every per-round load report plus medians, as
//!   JSON, a markdown table with ratios to direct and to the best of
//!   nginx/HAProxy, and SVG latency-percentile charts.
//!
//! # What it leaves to others
//!
//! Pinning the current process to the load CPUs happens once, before a
//! runtime exists: the CLI does it ([`Placement::pin_current_process`]);
//! library callers pass a [`Placement`] (usually
//! [`Placement::unpinned`]). Load generation, latency correction and
//! `/proc` accounting are [`load`](crate::load)'s; the echo upstream is
//! [`echo`](crate::echo)'s.
//!
//! # Invariants callers rely on
//!
//! - Traffic goes to 127.0.0.1 only, and every load run is bounded by its
//!   warm-up plus duration plus [`load::GRACE`](crate::load::GRACE).
//! - Starting a process, opening an idle connection and installing a
//!   package each have a timeout; nothing sleeps a thread.
//! - A target that cannot run is not an error: its rows carry the reason,
//!   which is also logged. [`run`] fails only when nothing can be measured
//!   at all (no echo) or the configuration is invalid.

mod chart;
mod cli;
mod config;
mod driver;
mod handshake;
mod idle;
mod markdown;
mod placement;
mod proxies;
mod report;
mod runner;
pub(crate) mod system;

#[cfg(test)]
mod tests;

pub use chart::latency_svg;
pub use cli::{CompareArgs, run_cli};
pub use config::{CompareConfig, Scenario, TargetKind, Tools};
pub use driver::{Driver, ToolErrors, ToolLatency, ToolOutput, ToolRound};
pub use markdown::render_markdown;
pub use placement::Placement;
pub use report::{
    CompareReport, Goal, IdleRound, IdleSummary, LoadRow, LoadRun, Machine, MemoryRow, RowSummary,
    RunKind, Settings, TargetStatus,
};
pub use runner::run;
