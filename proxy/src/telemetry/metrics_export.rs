//! Metrics pushed over OTLP, beside the `/metrics` pull endpoint: every
//! `interval`, the series `/metrics` shows are sent to a collector as an
//! `ExportMetricsServiceRequest` (gRPC `MetricsService/Export`, or an
//! OTLP/HTTP POST to `/v1/metrics`).
//!
//! One renderer serves both: the exporter reads the Prometheus text
//! `/metrics` would answer and maps it as OpenTelemetry's Prometheus
//! compatibility rules do: a counter becomes a monotonic cumulative sum
//! named without `_total`, a gauge a gauge, a histogram an explicit-bucket
//! cumulative histogram (OTLP counts per bucket where Prometheus counts up
//! to each bound). Labels become attributes. Every point starts at the
//! proxy's start. The work runs on the control runtime, once per interval,
//! never on the request path.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use super::Metrics;
use super::trace::export::{Client, Message};
use super::trace::otlp::{
    LEN, VARINT, Value, bytes_field, fixed64_field, key_value, resource_and_scope, tag, varint,
};
use crate::config::MetricsExport;

/// gRPC's method path for OTLP metrics.
const GRPC_PATH: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
/// `AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE`.
const CUMULATIVE: u64 = 2;

/// A family's kind, from its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A series' labels, in order.
type Labels = Vec<(String, String)>;

/// One histogram series: its labels (without `le`), cumulative counts up
/// to each bound, the `+Inf` count and the sum.
#[derive(Debug, Default, PartialEq)]
struct HistogramPoint {
    labels: Labels,
    bounds: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

/// A metric family as the text exposition shows it.
#[derive(Debug, PartialEq)]
struct Family {
    name: String,
    help: String,
    kind: Kind,
    /// Counters and gauges.
    points: Vec<(Labels, f64)>,
    histograms: Vec<HistogramPoint>,
}

/// A sample line's name, labels and value; `None` for a line that is not
/// one.
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    let (name, rest) = match line.find('{') {
        Some(open) => (&line[..open], &line[open + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some((name, Vec::new(), value.trim().parse().ok()?));
        }
    };
    let mut labels = Vec::new();
    let mut chars = rest.char_indices();
    let mut key = String::new();
    let end = loop {
        let (i, c) = chars.next()?;
        match c {
            '}' => break i,
            ',' => {}
            '=' => {
                if chars.next()?.1 != '"' {
                    return None;
                }
                let mut value = String::new();
                loop {
                    match chars.next()?.1 {
                        '"' => break,
                        '\\' => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        other => value.push(other),
                    }
                }
                labels.push((std::mem::take(&mut key), value));
            }
            other => key.push(other),
        }
    };
    // An OpenMetrics exemplar (`# {...}`) would follow the value; the
    // Prometheus text has none.
    let value = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// Reads the Prometheus text this proxy writes into families, in order.
fn parse(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    let mut help = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').map_or("", |(_, h)| h).to_owned();
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let Some((name, kind)) = rest.split_once(' ') else {
                continue;
            };
            let kind = match kind {
                "counter" => Kind::Counter,
                "gauge" => Kind::Gauge,
                "histogram" => Kind::Histogram,
                _ => continue,
            };
            families.push(Family {
                name: name.to_owned(),
                help: std::mem::take(&mut help),
                kind,
                points: Vec::new(),
                histograms: Vec::new(),
            });
            continue;
        }
        let Some((name, mut labels, value)) = sample(line) else {
            continue;
        };
        let Some(family) = families.last_mut() else {
            continue;
        };
        match family.kind {
            Kind::Counter | Kind::Gauge if name == family.name => {
                family.points.push((labels, value));
            }
            Kind::Histogram => {
                let Some(part) = name.strip_prefix(family.name.as_str()) else {
                    continue;
                };
                let le = labels
                    .iter()
                    .position(|(k, _)| k == "le")
                    .map(|i| labels.remove(i).1);
                let point = match family.histograms.iter().position(|h| h.labels == labels) {
                    Some(i) => &mut family.histograms[i],
                    None => {
                        family.histograms.push(HistogramPoint {
                            labels,
                            ..HistogramPoint::default()
                        });
                        let last = family.histograms.len() - 1;
                        &mut family.histograms[last]
                    }
                };
                match (part, le.as_deref()) {
                    ("_bucket", Some("+Inf")) => point.count = value as u64,
                    ("_bucket", Some(le)) => {
                        if let Ok(le) = le.parse() {
                            point.bounds.push((le, value as u64));
                        }
                    }
                    ("_sum", None) => point.sum = value,
                    ("_count", None) => point.count = value as u64,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    families
}

/// A number data point's value: an integer when it is one.
fn number(out: &mut Vec<u8>, value: f64) {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        // `as_int` (6), sfixed64.
        fixed64_field(out, 6, value as i64 as u64);
    } else {
        // `as_double` (4).
        fixed64_field(out, 4, value.to_bits());
    }
}

fn attributes(out: &mut Vec<u8>, field: u32, labels: &[(String, String)]) {
    for (key, value) in labels {
        key_value(out, field, key, Value::Str(value));
    }
}

/// Encodes `families` as an `ExportMetricsServiceRequest` into `out`.
fn encode(
    families: &[Family],
    resource: &[u8],
    scope: &[u8],
    start: u64,
    now: u64,
    out: &mut Vec<u8>,
) {
    let mut scope_metrics = scope.to_vec();
    let mut metric = Vec::new();
    let mut data = Vec::new();
    let mut point = Vec::new();
    for family in families {
        if family.points.is_empty() && family.histograms.is_empty() {
            continue;
        }
        data.clear();
        match family.kind {
            Kind::Counter | Kind::Gauge => {
                for (labels, value) in &family.points {
                    point.clear();
                    attributes(&mut point, 7, labels);
                    fixed64_field(&mut point, 2, start);
                    fixed64_field(&mut point, 3, now);
                    number(&mut point, *value);
                    bytes_field(&mut data, 1, &point);
                }
                if family.kind == Kind::Counter {
                    tag(&mut data, 2, VARINT);
                    varint(&mut data, CUMULATIVE);
                    tag(&mut data, 3, VARINT);
                    varint(&mut data, 1);
                }
            }
            Kind::Histogram => {
                for histogram in &family.histograms {
                    point.clear();
                    attributes(&mut point, 9, &histogram.labels);
                    fixed64_field(&mut point, 2, start);
                    fixed64_field(&mut point, 3, now);
                    fixed64_field(&mut point, 4, histogram.count);
                    fixed64_field(&mut point, 5, histogram.sum.to_bits());
                    // Per-bucket counts (the last above every bound), packed.
                    let mut below = 0;
                    tag(&mut point, 6, LEN);
                    varint(&mut point, 8 * (histogram.bounds.len() as u64 + 1));
                    for &(_, cumulative) in &histogram.bounds {
                        point.extend_from_slice(&cumulative.saturating_sub(below).to_le_bytes());
                        below = cumulative;
                    }
                    point.extend_from_slice(&histogram.count.saturating_sub(below).to_le_bytes());
                    tag(&mut point, 7, LEN);
                    varint(&mut point, 8 * histogram.bounds.len() as u64);
                    for &(le, _) in &histogram.bounds {
                        point.extend_from_slice(&le.to_bits().to_le_bytes());
                    }
                    bytes_field(&mut data, 1, &point);
                }
                tag(&mut data, 2, VARINT);
                varint(&mut data, CUMULATIVE);
            }
        }
        metric.clear();
        let name = match family.kind {
            Kind::Counter => family.name.strip_suffix("_total").unwrap_or(&family.name),
            Kind::Gauge | Kind::Histogram => &family.name,
        };
        bytes_field(&mut metric, 1, name.as_bytes());
        bytes_field(&mut metric, 2, family.help.as_bytes());
        let field = match family.kind {
            Kind::Gauge => 5,
            Kind::Counter => 7,
            Kind::Histogram => 9,
        };
        bytes_field(&mut metric, field, &data);
        bytes_field(&mut scope_metrics, 2, &metric);
    }
    let mut resource_metrics = resource.to_vec();
    bytes_field(&mut resource_metrics, 2, &scope_metrics);
    out.clear();
    bytes_field(out, 1, &resource_metrics);
}

/// The running exporter; dropping it stops the export.
#[derive(Debug)]
pub(crate) struct MetricsExporter {
    pub(crate) settings: Arc<MetricsExport>,
    task: tokio::task::AbortHandle,
}

impl Drop for MetricsExporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the exporter sends: the `/metrics` text, rendered on demand.
#[derive(Clone)]
pub(crate) struct Render(pub(crate) Arc<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for Render {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Render(..)")
    }
}

impl MetricsExporter {
    /// Starts exporting on `control` what `render` returns, every
    /// `settings.interval`; counts in `metrics`.
    pub(crate) fn start(
        control: &tokio::runtime::Handle,
        settings: Arc<MetricsExport>,
        render: Render,
        metrics: Arc<Metrics>,
        started: SystemTime,
    ) -> Self {
        let task = control
            .spawn(run(settings.clone(), render, metrics, started))
            .abort_handle();
        Self { settings, task }
    }
}

async fn run(
    settings: Arc<MetricsExport>,
    render: Render,
    metrics: Arc<Metrics>,
    started: SystemTime,
) {
    let endpoint = &settings.endpoint;
    let (resource, scope) =
        resource_and_scope(&endpoint.service_name, &endpoint.resource_attributes);
    let mut client = Client::new(endpoint, GRPC_PATH);
    let mut body = Vec::new();
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: wait one interval before the first export.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let families = parse(&(render.0)());
        encode(
            &families,
            &resource,
            &scope,
            crate::clock::unix_nanos(started),
            crate::clock::unix_nanos_now(),
            &mut body,
        );
        // Retries end before the next export is due.
        let timeout = endpoint.export_timeout.min(settings.interval);
        match client.export(&Message::copied(&body), timeout).await {
            Ok(()) => {
                metrics.metric_exports.fetch_add(1, Relaxed);
            }
            Err(error) => {
                metrics.metric_export_failures.fetch_add(1, Relaxed);
                tracing::debug!(collector = %endpoint.collector, %error, "metrics export failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
    use prost::Message as _;

    use super::*;

    const TEXT: &str = "\
# HELP weft_http_requests_total HTTP requests.
# TYPE weft_http_requests_total counter
weft_http_requests_total{listener=\"web\",route=\"a \\\"quoted\\\" name\",status_class=\"2xx\"} 7
weft_http_requests_total{listener=\"web\",route=\"b\",status_class=\"5xx\"} 1
# HELP weft_upstream_connections_active Open upstream connections.
# TYPE weft_upstream_connections_active gauge
weft_upstream_connections_active{cluster=\"echo\"} 3
# HELP weft_http_request_duration_seconds Duration.
# TYPE weft_http_request_duration_seconds histogram
weft_http_request_duration_seconds_bucket{listener=\"web\",le=\"0.001\"} 2
weft_http_request_duration_seconds_bucket{listener=\"web\",le=\"0.01\"} 5
weft_http_request_duration_seconds_bucket{listener=\"web\",le=\"+Inf\"} 6
weft_http_request_duration_seconds_sum{listener=\"web\"} 0.5
weft_http_request_duration_seconds_count{listener=\"web\"} 6
# HELP weft_config_reloads_total Reloads.
# TYPE weft_config_reloads_total counter
weft_config_reloads_total 0
# HELP weft_empty_total Nothing yet.
# TYPE weft_empty_total counter
";

    #[test]
    fn the_text_exposition_is_read_into_families() {
        let families = parse(TEXT);
        let names: Vec<_> = families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "weft_http_requests_total",
                "weft_upstream_connections_active",
                "weft_http_request_duration_seconds",
                "weft_config_reloads_total",
                "weft_empty_total",
            ]
        );
        assert_eq!(families[0].help, "HTTP requests.");
        assert_eq!(families[0].points[0].0[1].1, "a \"quoted\" name");
        assert_eq!(families[0].points[0].1, 7.0);
        let histogram = &families[2].histograms[0];
        assert_eq!(
            histogram.labels,
            [("listener".to_owned(), "web".to_owned())]
        );
        assert_eq!(histogram.bounds, [(0.001, 2), (0.01, 5)]);
        assert_eq!((histogram.count, histogram.sum), (6, 0.5));
        assert_eq!(families[3].points, [(Vec::new(), 0.0)]);
    }

    #[test]
    fn families_become_otlp_metrics_a_collector_decodes() {
        let (resource, scope) = resource_and_scope("sidecar", &[("k".into(), "v".into())]);
        let mut body = Vec::new();
        encode(&parse(TEXT), &resource, &scope, 100, 200, &mut body);
        let request = ExportMetricsServiceRequest::decode(body.as_slice()).unwrap();
        let resource_metrics = &request.resource_metrics[0];
        let attributes = &resource_metrics.resource.as_ref().unwrap().attributes;
        assert_eq!(attributes[0].key, "service.name");
        assert_eq!(
            attributes[0].value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("sidecar".into()))
        );
        let scope = &resource_metrics.scope_metrics[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "weft-proxy");
        let metrics = &scope.metrics;
        // The empty family is left out.
        let names: Vec<_> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "weft_http_requests",
                "weft_upstream_connections_active",
                "weft_http_request_duration_seconds",
                "weft_config_reloads",
            ]
        );
        let Some(metric::Data::Sum(sum)) = &metrics[0].data else {
            panic!("a counter is a sum: {:?}", metrics[0]);
        };
        assert!(sum.is_monotonic);
        assert_eq!(sum.aggregation_temporality, 2);
        let point = &sum.data_points[0];
        assert_eq!(
            (point.start_time_unix_nano, point.time_unix_nano),
            (100, 200)
        );
        assert_eq!(point.value, Some(number_data_point::Value::AsInt(7)));
        assert_eq!(point.attributes.len(), 3);
        assert_eq!(point.attributes[1].key, "route");
        assert_eq!(
            point.attributes[1].value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("a \"quoted\" name".into()))
        );
        assert_eq!(metrics[0].description, "HTTP requests.");
        let Some(metric::Data::Gauge(gauge)) = &metrics[1].data else {
            panic!("a gauge: {:?}", metrics[1]);
        };
        assert_eq!(
            gauge.data_points[0].value,
            Some(number_data_point::Value::AsInt(3))
        );
        let Some(metric::Data::Histogram(histogram)) = &metrics[2].data else {
            panic!("a histogram: {:?}", metrics[2]);
        };
        assert_eq!(histogram.aggregation_temporality, 2);
        let point = &histogram.data_points[0];
        assert_eq!(point.count, 6);
        assert_eq!(point.sum, Some(0.5));
        assert_eq!(point.explicit_bounds, [0.001, 0.01]);
        // Per bucket, not cumulative: 2 up to 1 ms, 3 more up to 10 ms,
        // 1 above.
        assert_eq!(point.bucket_counts, [2, 3, 1]);
    }

    #[test]
    fn a_fraction_is_a_double() {
        let mut out = Vec::new();
        number(&mut out, 0.25);
        assert_eq!(out[0], 4 << 3 | 1);
        out.clear();
        number(&mut out, -3.0);
        assert_eq!(out[0], 6 << 3 | 1);
        assert_eq!(i64::from_le_bytes(out[1..9].try_into().unwrap()), -3);
    }
}
