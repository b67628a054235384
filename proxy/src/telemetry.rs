//! Metrics and the access log.
//!
//! Metric handles are `Arc`s of plain atomics, created (or found again) by
//! name when a snapshot is built and held by the snapshot, so the request
//! path bumps counters without any lookup. The registry keeps every handle
//! it created, so counters survive configuration changes, and renders the
//! Prometheus text format on scrape (on the control runtime).

pub(crate) mod access_log;
mod metrics;

pub use access_log::{AccessLog, AccessRecord};
pub use metrics::{ClusterMetrics, Histogram, ListenerMetrics, Metrics, RequestMetrics};
