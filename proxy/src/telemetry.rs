//! Metrics, the access log and distributed tracing.
//!
//! Metric handles are `Arc`s of plain atomics, created (or found again) by
//! name when a snapshot is built and held by the snapshot, so the request
//! path bumps counters without any lookup. The registry keeps every handle
//! it created, so counters survive configuration changes, and renders the
//! Prometheus text format on scrape (on the control runtime).

pub(crate) mod access_log;
pub(crate) mod istio;
mod metrics;
pub(crate) mod metrics_export;
pub(crate) mod trace;

pub use access_log::{AccessLog, AccessRecord, AccessTemplate};
pub(crate) use metrics::escape as escape_label;
pub use metrics::{
    ClusterMetrics, Format, Histogram, ListenerMetrics, Metrics, PolicyMetrics, RequestMetrics,
    openmetrics_families,
};
pub use trace::export::TraceMetrics;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// Counts a listener's open connections while alive.
#[derive(Debug)]
pub(crate) struct ConnectionGuard(Arc<ListenerMetrics>);

impl ConnectionGuard {
    pub(crate) fn new(metrics: Arc<ListenerMetrics>) -> Self {
        metrics.connections_total.fetch_add(1, Relaxed);
        metrics.connections_active.fetch_add(1, Relaxed);
        Self(metrics)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Relaxed);
    }
}
