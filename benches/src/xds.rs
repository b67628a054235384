//! The control-plane benchmark (`weft-bench xds`): how long a real
//! `weft-cp serve` process takes to push a mesh change to N connected
//! proxies, and how much memory each connected proxy costs it.
//!
//! # Method
//!
//! For each proxy count N:
//!
//! 1. A mesh directory is generated ([`mesh`]) with N workloads: workload 0
//!    belongs to the service `shared`, the others to a few `app-K`
//!    services, and every service calls `shared`. Only `shared.yaml` holds
//!    the route timeout the rounds edit, so one file change changes the
//!    outbound route configuration of every node.
//! 2. `weft-cp serve` starts on `127.0.0.1:0` with a token file; its
//!    resident set (`VmRSS`) is sampled with no client connected.
//! 3. N simulated proxies ([`client`]) connect, each over its own TCP
//!    connection, HTTP/2 connection and one ADS stream (state of the world,
//!    wildcard subscriptions to clusters, routes and listeners), and ACK
//!    every response. Once every node has ACKed all three types, the
//!    resident set is sampled again: (with N − empty) / N is the memory per
//!    connected proxy.
//! 4. Each round rewrites `shared.yaml` with a new timeout (written to a
//!    hidden temporary file, then renamed over it). The clock starts just
//!    before the rename; the round ends when every node has ACKed a new
//!    route version and the control plane's `/status` shows nothing sent
//!    but unacknowledged. Reported: write → last ACK (includes the
//!    watcher's poll interval, up to 250 ms), write → first push, first
//!    push → last ACK (the fan-out alone), the control plane's CPU time
//!    and the generator's own CPU time.
//!
//! # Invariants callers rely on
//!
//! - Everything runs on loopback; the mesh's workload addresses are only
//!   named, never bound.
//! - Every wait is bounded ([`XdsConfig::converge_timeout`] and fixed
//!   timeouts on connects and admin requests); a run that does not
//!   converge is reported as such, not waited for forever.
//! - Each simulated proxy holds one file descriptor in this process and
//!   about one in the control plane. A proxy count that does not fit the
//!   open-files limit is skipped with the reason in its row.
//! - The control plane is killed (it and its clients dropped) before the
//!   next proxy count starts.

mod cli;
mod client;
mod cp;
mod limits;
mod markdown;
mod mesh;
mod report;
mod runner;

#[cfg(test)]
mod tests;

pub use cli::{XdsArgs, run_cli};
pub use markdown::render_markdown;
pub use report::{PushCounts, RoundResult, XdsReport, XdsRow};
pub use runner::{XdsConfig, run};
