//! Validation of OTLP export: a listener's tracing and the proxy's metrics
//! export.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};

use super::Checker;
use super::faults::percent;
use std::collections::BTreeMap;

use crate::config::model::{
    CollectorTls, MetricsExport, OtlpEndpoint, OtlpProtocol, TraceExport, Tracing,
};
use crate::config::spec::{MetricsExportSpec, TracingSpec};

/// Spans waiting for export, by default (OpenTelemetry's default).
const DEFAULT_MAX_QUEUED_SPANS: u32 = 2048;
/// The largest queue a listener may ask for (a span is about 300 bytes).
const MAX_QUEUED_SPANS: u32 = 1 << 20;
/// Spans per export, by default (OpenTelemetry's default).
const DEFAULT_MAX_EXPORT_BATCH: u32 = 512;
/// A partial batch's wait, by default.
const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// An export's deadline, by default.
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Where OTLP/HTTP collectors take traces.
const HTTP_TRACES_PATH: &str = "/v1/traces";
/// Where OTLP/HTTP collectors take metrics.
const HTTP_METRICS_PATH: &str = "/v1/metrics";
/// Time between metric exports, by default (OpenTelemetry's default).
const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(60);
/// The shortest time between metric exports (each renders every series).
const MIN_METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// The OTLP fields tracing and metrics export share, as written.
pub(super) struct EndpointSpec<'a> {
    pub(super) collector: Option<&'a str>,
    pub(super) protocol: Option<&'a str>,
    pub(super) headers: Option<&'a BTreeMap<String, String>>,
    pub(super) ca_file: Option<&'a str>,
    pub(super) service_name: Option<&'a str>,
    pub(super) resource_attributes: Option<&'a BTreeMap<String, String>>,
    pub(super) export_timeout: Option<Duration>,
}

/// Where systems keep their CA bundle (Debian and Alpine, Fedora and RHEL,
/// others).
const SYSTEM_CA_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Loads an `https://` collector's roots: `ca_file`, else the system's
/// bundle.
fn collector_tls(
    check: &mut Checker<'_>,
    field: &str,
    ca_file: Option<&str>,
) -> Option<CollectorTls> {
    let path = match ca_file {
        Some(path) => path,
        None => match SYSTEM_CA_BUNDLES
            .iter()
            .find(|path| std::path::Path::new(path).is_file())
        {
            Some(path) => path,
            None => {
                check.error(
                    field,
                    "required for an https:// collector: no system CA bundle was found",
                );
                return None;
            }
        },
    };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) => {
            check.error(field, format!("cannot read {path:?}: {error}"));
            return None;
        }
    };
    match super::super::tls::load_roots(path) {
        Ok(roots) => Some(CollectorTls {
            ca_file: path.into(),
            roots: std::sync::Arc::new(roots),
            fingerprint: {
                use std::hash::{Hash as _, Hasher as _};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut hasher);
                hasher.finish()
            },
        }),
        Err(reason) => {
            check.error(field, reason);
            None
        }
    }
}

/// `name` under `at` (`at.name`; just `name` when `at` is empty).
fn field(at: &str, name: &str) -> String {
    if at.is_empty() {
        name.to_owned()
    } else {
        format!("{at}.{name}")
    }
}

/// Checks an OTLP collector's settings (fields under `at`); `http_path` is
/// where OTLP/HTTP takes this signal.
pub(super) fn validate_endpoint(
    check: &mut Checker<'_>,
    at: &str,
    spec: &EndpointSpec<'_>,
    http_path: &str,
) -> Option<OtlpEndpoint> {
    let protocol = match spec.protocol {
        None | Some("grpc") => Some(OtlpProtocol::Grpc),
        Some("http") => Some(OtlpProtocol::HttpProtobuf),
        Some(other) => {
            check.error(
                field(at, "protocol"),
                format!("{other:?} is not one of grpc, http"),
            );
            None
        }
    };
    let collector = match (spec.collector, protocol) {
        (None, _) => {
            check.error(field(at, "collector"), "required");
            None
        }
        (Some(url), Some(protocol)) => collector(check, at, url, protocol, http_path),
        (Some(_), None) => None,
    };
    let mut headers = Vec::new();
    for (name, value) in spec.headers.into_iter().flatten() {
        // gRPC metadata keys are lower case; HTTP header names are
        // case-insensitive, so one rule serves both transports.
        let valid_name = HeaderName::from_bytes(name.as_bytes()).is_ok()
            && !name.bytes().any(|b| b.is_ascii_uppercase())
            && !name.ends_with("-bin");
        if !valid_name {
            check.error(
                field(at, &format!("headers.{name}")),
                "is not a lower-case header name",
            );
        } else if HeaderValue::from_str(value).is_err() {
            check.error(
                field(at, &format!("headers.{name}")),
                "is not a valid header value",
            );
        } else {
            headers.push((name.clone(), value.clone()));
        }
    }
    let service_name = spec.service_name.unwrap_or("weft-proxy");
    if service_name.is_empty() {
        check.error(field(at, "service_name"), "must not be empty");
    }
    let resource_attributes: Vec<(String, String)> = spec
        .resource_attributes
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if resource_attributes.iter().any(|(k, _)| k.is_empty()) {
        check.error(field(at, "resource_attributes"), "a key must not be empty");
    }
    let export_timeout = spec.export_timeout.unwrap_or(DEFAULT_EXPORT_TIMEOUT);
    if export_timeout.is_zero() {
        check.error(field(at, "export_timeout"), "must be greater than zero");
    }
    let tls = match (&collector, spec.ca_file) {
        (Some(url), ca_file) if url.starts_with("https://") => {
            collector_tls(check, &field(at, "ca_file"), ca_file)
        }
        (_, Some(_)) => {
            check.error(field(at, "ca_file"), "only for an https:// collector");
            None
        }
        _ => None,
    };
    Some(OtlpEndpoint {
        tls,
        collector: collector?,
        protocol: protocol?,
        headers,
        service_name: service_name.to_owned(),
        resource_attributes,
        export_timeout,
    })
}

/// Checks `tracing` (at field `at`) and builds its model.
pub(super) fn validate_tracing(
    check: &mut Checker<'_>,
    at: &str,
    spec: &TracingSpec,
) -> Option<Tracing> {
    let endpoint = validate_endpoint(
        check,
        at,
        &EndpointSpec {
            collector: spec.collector.as_deref(),
            protocol: spec.protocol.as_deref(),
            headers: spec.headers.as_ref(),
            ca_file: spec.ca_file.as_deref(),
            service_name: spec.service_name.as_deref(),
            resource_attributes: spec.resource_attributes.as_ref(),
            export_timeout: spec.export_timeout,
        },
        HTTP_TRACES_PATH,
    );
    let sample = percent(check, &format!("{at}.sample_percent"), spec.sample_percent);
    let max_queued_spans = spec.max_queued_spans.unwrap_or(DEFAULT_MAX_QUEUED_SPANS);
    if !(1..=MAX_QUEUED_SPANS).contains(&max_queued_spans) {
        check.error(
            format!("{at}.max_queued_spans"),
            format!("{max_queued_spans} is out of range (1..={MAX_QUEUED_SPANS})"),
        );
    }
    let max_export_batch = spec.max_export_batch.unwrap_or(DEFAULT_MAX_EXPORT_BATCH);
    if max_export_batch == 0 || max_export_batch > max_queued_spans {
        check.error(
            format!("{at}.max_export_batch"),
            format!("{max_export_batch} is out of range (1..=max_queued_spans)"),
        );
    }
    let flush_interval = spec.flush_interval.unwrap_or(DEFAULT_FLUSH_INTERVAL);
    if flush_interval.is_zero() {
        check.error(format!("{at}.flush_interval"), "must be greater than zero");
    }
    Some(Tracing {
        export: std::sync::Arc::new(TraceExport {
            endpoint: endpoint?,
            max_queued_spans,
            max_export_batch,
            flush_interval,
        }),
        sample: sample?,
        always_sample_errors: spec.always_sample_errors.unwrap_or(false),
    })
}

/// Checks `metrics_export` and builds its model.
pub(super) fn validate_metrics_export(
    check: &mut Checker<'_>,
    spec: &MetricsExportSpec,
) -> Option<MetricsExport> {
    let endpoint = validate_endpoint(
        check,
        "",
        &EndpointSpec {
            collector: spec.collector.as_deref(),
            protocol: spec.protocol.as_deref(),
            headers: spec.headers.as_ref(),
            ca_file: spec.ca_file.as_deref(),
            service_name: spec.service_name.as_deref(),
            resource_attributes: spec.resource_attributes.as_ref(),
            export_timeout: spec.export_timeout,
        },
        HTTP_METRICS_PATH,
    );
    let interval = spec.interval.unwrap_or(DEFAULT_METRICS_INTERVAL);
    if interval < MIN_METRICS_INTERVAL {
        check.error(
            "interval",
            format!("{interval:?} is shorter than {MIN_METRICS_INTERVAL:?}"),
        );
    }
    Some(MetricsExport {
        endpoint: endpoint?,
        interval,
    })
}

/// The collector's URL, checked for its transport: `http://host:port` for
/// gRPC; for HTTP the signal's path is added when the URL has none.
fn collector(
    check: &mut Checker<'_>,
    at: &str,
    url: &str,
    protocol: OtlpProtocol,
    http_path: &str,
) -> Option<String> {
    let field = field(at, "collector");
    let Ok(uri) = url.parse::<Uri>() else {
        check.error(field, format!("{url:?} is not a URL"));
        return None;
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        check.error(
            field,
            format!("{url:?} must be an http:// or https:// URL with a host"),
        );
        return None;
    }
    let path = uri.path();
    match protocol {
        OtlpProtocol::Grpc if path != "/" && !path.is_empty() => {
            check.error(
                field,
                format!("{url:?}: a gRPC collector is a host and port, without a path"),
            );
            None
        }
        OtlpProtocol::Grpc => Some(url.trim_end_matches('/').to_owned()),
        OtlpProtocol::HttpProtobuf if path == "/" || path.is_empty() => {
            Some(format!("{}{http_path}", url.trim_end_matches('/')))
        }
        OtlpProtocol::HttpProtobuf => Some(url.to_owned()),
    }
}
