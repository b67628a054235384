//! Validation of a listener's tracing settings.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};

use super::Checker;
use super::faults::percent;
use crate::config::model::{OtlpProtocol, TraceExport, Tracing};
use crate::config::spec::TracingSpec;

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

/// Checks `tracing` (at field `at`) and builds its model.
pub(super) fn validate_tracing(
    check: &mut Checker<'_>,
    at: &str,
    spec: &TracingSpec,
) -> Option<Tracing> {
    let protocol = match spec.protocol.as_deref() {
        None | Some("grpc") => Some(OtlpProtocol::Grpc),
        Some("http") => Some(OtlpProtocol::HttpProtobuf),
        Some(other) => {
            check.error(
                format!("{at}.protocol"),
                format!("{other:?} is not one of grpc, http"),
            );
            None
        }
    };
    let collector = match (&spec.collector, protocol) {
        (None, _) => {
            check.error(format!("{at}.collector"), "required");
            None
        }
        (Some(url), Some(protocol)) => collector(check, at, url, protocol),
        (Some(_), None) => None,
    };
    let mut headers = Vec::new();
    for (name, value) in spec.headers.iter().flatten() {
        // gRPC metadata keys are lower case; HTTP header names are
        // case-insensitive, so one rule serves both transports.
        let valid_name = HeaderName::from_bytes(name.as_bytes()).is_ok()
            && !name.bytes().any(|b| b.is_ascii_uppercase())
            && !name.ends_with("-bin");
        if !valid_name {
            check.error(
                format!("{at}.headers.{name}"),
                "is not a lower-case header name",
            );
        } else if HeaderValue::from_str(value).is_err() {
            check.error(
                format!("{at}.headers.{name}"),
                "is not a valid header value",
            );
        } else {
            headers.push((name.clone(), value.clone()));
        }
    }
    let sample = percent(check, &format!("{at}.sample_percent"), spec.sample_percent);
    let service_name = spec.service_name.as_deref().unwrap_or("weft-proxy");
    if service_name.is_empty() {
        check.error(format!("{at}.service_name"), "must not be empty");
    }
    let resource_attributes: Vec<(String, String)> = spec
        .resource_attributes
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if resource_attributes.iter().any(|(k, _)| k.is_empty()) {
        check.error(
            format!("{at}.resource_attributes"),
            "a key must not be empty",
        );
    }
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
    let export_timeout = spec.export_timeout.unwrap_or(DEFAULT_EXPORT_TIMEOUT);
    if export_timeout.is_zero() {
        check.error(format!("{at}.export_timeout"), "must be greater than zero");
    }
    Some(Tracing {
        export: std::sync::Arc::new(TraceExport {
            collector: collector?,
            protocol: protocol?,
            headers,
            service_name: service_name.to_owned(),
            resource_attributes,
            max_queued_spans,
            max_export_batch,
            flush_interval,
            export_timeout,
        }),
        sample: sample?,
        always_sample_errors: spec.always_sample_errors.unwrap_or(false),
    })
}

/// The collector's URL, checked for its transport: `http://host:port` for
/// gRPC; for HTTP the traces path is added when the URL has none.
fn collector(
    check: &mut Checker<'_>,
    at: &str,
    url: &str,
    protocol: OtlpProtocol,
) -> Option<String> {
    let field = format!("{at}.collector");
    let Ok(uri) = url.parse::<Uri>() else {
        check.error(field, format!("{url:?} is not a URL"));
        return None;
    };
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        // TLS to the collector is not built in: a collector is usually a
        // local agent; one further away is reached through a TCP listener
        // or a mesh cluster with mTLS.
        check.error(
            field,
            format!("{url:?} must be an http:// URL with a host (https is not supported)"),
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
            Some(format!("{}{HTTP_TRACES_PATH}", url.trim_end_matches('/')))
        }
        OtlpProtocol::HttpProtobuf => Some(url.to_owned()),
    }
}
