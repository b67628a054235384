//! Validation of a listener's Istio metrics settings.

use std::collections::{BTreeMap, HashSet};

use super::Checker;
use crate::config::model::{IstioMetrics, IstioReporter, IstioWorkload};
use crate::config::spec::{IstioMetricsSpec, IstioWorkloadSpec};

/// Series per listener by default: a sidecar's callers or callees times
/// the response codes and flags they see.
const DEFAULT_MAX_SERIES: u32 = 1000;
/// The most a listener may ask for (each series is about 1 KiB).
const MAX_SERIES: u32 = 100_000;
/// The longest label value taken from configuration.
const MAX_LABEL_BYTES: usize = 253;

/// Checks `istio_metrics` (at field `at`) and builds its model.
/// `clusters` are the configuration's cluster names.
pub(super) fn validate_istio_metrics(
    check: &mut Checker<'_>,
    at: &str,
    spec: &IstioMetricsSpec,
    clusters: &HashSet<&str>,
) -> Option<IstioMetrics> {
    let reporter = match spec.reporter.as_deref() {
        Some("source") => Some(IstioReporter::Source),
        Some("destination") => Some(IstioReporter::Destination),
        Some(other) => {
            check.error(
                format!("{at}.reporter"),
                format!("{other:?} is not one of source, destination"),
            );
            None
        }
        None => {
            check.error(format!("{at}.reporter"), "required: source or destination");
            None
        }
    };
    let own = workload(
        check,
        &format!("{at}.workload"),
        spec.workload
            .as_ref()
            .unwrap_or(&IstioWorkloadSpec::default()),
    );
    if let Some(id) = &spec.cluster_id {
        label(check, &format!("{at}.cluster_id"), id);
    }
    let mut sources = BTreeMap::new();
    for (id, peer) in spec.sources.iter().flatten() {
        let field = format!("{at}.sources.{id}");
        if reporter == Some(IstioReporter::Source) {
            check.error(
                &field,
                "sources name callers: only with reporter: destination",
            );
        } else if !super::super::tls::is_spiffe_id(id) {
            check.error(
                &field,
                format!("{id:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)"),
            );
        }
        sources.insert(id.clone(), workload(check, &field, peer));
    }
    let mut destinations = BTreeMap::new();
    for (cluster, peer) in spec.destinations.iter().flatten() {
        let field = format!("{at}.destinations.{cluster}");
        if reporter == Some(IstioReporter::Destination) {
            check.error(
                &field,
                "destinations name callees: only with reporter: source",
            );
        } else if !clusters.contains(cluster.as_str()) {
            check.unresolved(&field, format!("unknown cluster {cluster:?}"));
        }
        destinations.insert(cluster.clone(), workload(check, &field, peer));
    }
    let max_series = spec.max_series.unwrap_or(DEFAULT_MAX_SERIES);
    if !(1..=MAX_SERIES).contains(&max_series) {
        check.error(
            format!("{at}.max_series"),
            format!("{max_series} is out of range (1..={MAX_SERIES})"),
        );
    }
    Some(IstioMetrics {
        reporter: reporter?,
        workload: own,
        cluster_id: spec.cluster_id.clone(),
        sources,
        destinations,
        max_series,
    })
}

fn workload(check: &mut Checker<'_>, at: &str, spec: &IstioWorkloadSpec) -> IstioWorkload {
    for (field, value) in [
        ("name", &spec.name),
        ("namespace", &spec.namespace),
        ("app", &spec.app),
        ("version", &spec.version),
        ("service", &spec.service),
    ] {
        if let Some(value) = value {
            label(check, &format!("{at}.{field}"), value);
        }
    }
    IstioWorkload {
        name: spec.name.clone(),
        namespace: spec.namespace.clone(),
        app: spec.app.clone(),
        version: spec.version.clone(),
        service: spec.service.clone(),
    }
}

/// A label value from configuration: printable, not empty, not long.
fn label(check: &mut Checker<'_>, field: &str, value: &str) {
    if value.is_empty() || value.len() > MAX_LABEL_BYTES || value.chars().any(char::is_control) {
        check.error(
            field,
            format!("{value:?} must be 1..={MAX_LABEL_BYTES} bytes without control characters"),
        );
    }
}
