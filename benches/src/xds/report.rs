//! What `weft-bench xds` reports: one [`XdsRow`] per proxy count, each
//! with its [`RoundResult`]s and their medians. Times are milliseconds,
//! memory is bytes (KiB per proxy aside), CPU is milliseconds of
//! `utime + stime` (clock-tick resolution, usually 10 ms).

use serde::{Deserialize, Serialize};

/// The whole run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct XdsReport {
    /// The `weft-cp` binary measured.
    pub cp_binary: String,
    /// Rounds per proxy count.
    pub rounds: usize,
    /// Where the control plane and the generator ran.
    pub placement: String,
    /// Worker threads of the generator's runtime.
    pub client_threads: usize,
    /// The open-files limit the run had (`None`: unlimited).
    pub open_files_limit: Option<u64>,
    /// One row per proxy count, in the order asked.
    pub rows: Vec<XdsRow>,
}

/// One proxy count.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct XdsRow {
    /// Simulated proxies.
    pub proxies: usize,
    /// Why this count was not measured (then nothing else is set).
    pub skipped: Option<String>,
    /// Nodes that ACKed all three types after connecting.
    pub initially_acked: usize,
    /// First connect to the last node's first ACK of its last type.
    pub initial_convergence_ms: Option<f64>,
    /// Proxies `/status` listed once all had connected.
    pub status_proxies: Option<usize>,
    /// Control-plane RSS with the mesh loaded and no client.
    pub rss_empty_bytes: Option<u64>,
    /// Control-plane RSS once every client had ACKed.
    pub rss_connected_bytes: Option<u64>,
    /// Control-plane RSS after the rounds.
    pub rss_after_rounds_bytes: Option<u64>,
    /// (connected − empty) / proxies, in KiB.
    pub kib_per_proxy: Option<f64>,
    /// Control-plane CPU per second with no client and no change (the
    /// directory watcher's polling), measured before the clients connect.
    pub cp_idle_cpu_ms_per_s: Option<f64>,
    /// Generator CPU while connecting and waiting for the initial ACKs.
    pub client_cpu_initial_ms: Option<f64>,
    /// Every round.
    pub rounds: Vec<RoundResult>,
    /// Median over converged rounds: file rename → last ACK.
    pub median_write_to_last_ack_ms: Option<f64>,
    /// Median: file rename → first response received.
    pub median_write_to_first_push_ms: Option<f64>,
    /// Median: first response received → last ACK.
    pub median_first_push_to_last_ack_ms: Option<f64>,
    /// Median control-plane CPU per round.
    pub median_cp_cpu_ms: Option<f64>,
    /// Median generator CPU per round.
    pub median_client_cpu_ms: Option<f64>,
    /// What went wrong (client failures, a round that did not converge).
    pub errors: Vec<String>,
}

/// One mesh change.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundResult {
    /// Every node ACKed a new route version in time.
    pub converged: bool,
    /// Nodes that ACKed a new route version.
    pub nodes_updated: usize,
    /// `/status` showed every proxy's sent versions ACKed afterwards.
    pub status_settled: bool,
    /// File rename → first response received by any client.
    pub write_to_first_push_ms: Option<f64>,
    /// File rename → last ACK.
    pub write_to_last_ack_ms: Option<f64>,
    /// First response received → last ACK.
    pub first_push_to_last_ack_ms: Option<f64>,
    /// Control-plane CPU from just before the rename to convergence.
    pub cp_cpu_ms: Option<f64>,
    /// Generator CPU over the same window.
    pub client_cpu_ms: Option<f64>,
    /// Responses received in the round, per type.
    pub pushes: PushCounts,
}

/// Responses received, per type.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PushCounts {
    /// Cluster responses.
    pub clusters: usize,
    /// Route configuration responses.
    pub routes: usize,
    /// Listener responses.
    pub listeners: usize,
}

/// The median of the values present (the mean of the middle two for an
/// even count).
pub(super) fn median(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().flatten().collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        f64::midpoint(values[middle - 1], values[middle])
    } else {
        values[middle]
    })
}
