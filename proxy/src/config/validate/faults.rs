//! Validation of fault injection and rate limits (routes and listeners).

use std::time::Duration;

use http::StatusCode;

use super::{Checker, grpc_code_number, validate_header_match, validate_identity_matches};
use crate::config::model::{
    Fault, FaultAbort, Percent, RateLimit, TcpFault, TokenBucket, grpc_status_for_http,
};
use crate::config::spec::{FaultDelaySpec, FaultSpec, RateLimitSpec, TcpFaultSpec};

/// Faults in progress at once, by default: enough for any test, few
/// enough that a delay fault cannot pile up unbounded requests.
const DEFAULT_MAX_ACTIVE_FAULTS: u32 = 1024;
/// The longest injected delay: a fault is a test, not an outage.
const MAX_FAULT_DELAY: Duration = Duration::from_secs(3600);
/// Clients a per-client rate limit tracks at once, by default.
const DEFAULT_MAX_CLIENTS: u32 = 10_000;
/// The most clients a per-client rate limit may track (about 64 bytes
/// each).
const MAX_CLIENTS: u32 = 1_000_000;
/// The fastest refill a bucket may have.
const MAX_RATE: f64 = 1e9;

/// A percentage field (0 to 100, default 100) in millionths.
pub(super) fn percent(check: &mut Checker<'_>, field: &str, value: Option<f64>) -> Option<Percent> {
    let value = value.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&value) {
        check.error(field, format!("{value} is not a percentage (0 to 100)"));
        return None;
    }
    // In range, so the product fits a u32.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some(Percent((value * 10_000.0).round() as u32))
}

fn delay(check: &mut Checker<'_>, at: &str, spec: &FaultDelaySpec) -> Option<(Duration, Percent)> {
    let duration = match spec.duration {
        None => {
            check.error(format!("{at}.duration"), "required");
            None
        }
        Some(d) if d.is_zero() || d > MAX_FAULT_DELAY => {
            check.error(
                format!("{at}.duration"),
                format!("{d:?} is out of range (more than zero, at most 1h)"),
            );
            None
        }
        Some(d) => Some(d),
    };
    let percent = percent(check, &format!("{at}.percent"), spec.percent);
    Some((duration?, percent?))
}

fn max_active(check: &mut Checker<'_>, at: &str, value: Option<u32>) -> u32 {
    let max = value.unwrap_or(DEFAULT_MAX_ACTIVE_FAULTS);
    if max == 0 {
        check.error(format!("{at}.max_active"), "must be at least 1");
    }
    max
}

/// A route's `fault`.
pub(super) fn validate_fault(check: &mut Checker<'_>, at: &str, spec: &FaultSpec) -> Option<Fault> {
    let before = check.errors.len();
    let delay = spec
        .delay
        .as_ref()
        .and_then(|d| delay(check, &format!("{at}.delay"), d));
    let abort = spec.abort.as_ref().and_then(|abort| {
        let at = format!("{at}.abort");
        let status = match abort.http_status {
            None => {
                check.error(format!("{at}.http_status"), "required");
                None
            }
            Some(code) => match StatusCode::from_u16(code) {
                Ok(status) if (200..=599).contains(&code) => Some(status),
                _ => {
                    check.error(
                        format!("{at}.http_status"),
                        format!("{code} is not an HTTP status (200 to 599)"),
                    );
                    None
                }
            },
        };
        let grpc = match (&abort.grpc_status, status) {
            (Some(name), _) => {
                let code = grpc_code_number(name);
                if code.is_none() {
                    check.error(
                        format!("{at}.grpc_status"),
                        format!(
                            "{name:?} is not a gRPC status (0 to 16, or a name such as unavailable)"
                        ),
                    );
                }
                code
            }
            (None, Some(status)) => Some(grpc_status_for_http(status)),
            (None, None) => None,
        };
        let percent = percent(check, &format!("{at}.percent"), abort.percent);
        Some((
            FaultAbort {
                status: status?,
                grpc_status: grpc?,
            },
            percent?,
        ))
    });
    let allow_header_faults = spec.allow_header_faults.unwrap_or(false);
    if spec.delay.is_none() && spec.abort.is_none() && !allow_header_faults {
        check.error(
            at,
            "set delay, abort or allow_header_faults: true; a fault without any does nothing",
        );
    }
    let mut headers = Vec::new();
    for (i, header) in spec.headers.iter().flatten().enumerate() {
        if let Some(h) = validate_header_match(check, &format!("{at}.headers[{i}]"), header) {
            headers.push(h);
        }
    }
    let source_identities = validate_identity_matches(
        check,
        &format!("{at}.source_identities"),
        spec.source_identities.as_deref().unwrap_or_default(),
    );
    let max_active = max_active(check, at, spec.max_active);
    if check.errors.len() > before {
        return None;
    }
    Some(Fault {
        delay,
        abort,
        headers,
        source_identities,
        allow_header_faults,
        max_active,
    })
}

/// A TCP listener's `fault`.
pub(super) fn validate_tcp_fault(
    check: &mut Checker<'_>,
    at: &str,
    spec: &TcpFaultSpec,
) -> Option<TcpFault> {
    let before = check.errors.len();
    let delay = spec
        .delay
        .as_ref()
        .and_then(|d| delay(check, &format!("{at}.delay"), d));
    let reset = spec
        .reset_percent
        .and_then(|p| percent(check, &format!("{at}.reset_percent"), Some(p)));
    if spec.delay.is_none() && spec.reset_percent.is_none() {
        check.error(
            at,
            "set delay or reset_percent; a fault without any does nothing",
        );
    }
    let max_active = max_active(check, at, spec.max_active);
    if check.errors.len() > before {
        return None;
    }
    Some(TcpFault {
        delay,
        reset,
        max_active,
    })
}

fn bucket(check: &mut Checker<'_>, at: &str, rate: f64, burst: Option<u32>) -> Option<TokenBucket> {
    if !(rate > 0.0 && rate <= MAX_RATE) {
        check.error(
            format!("{at}.requests_per_second"),
            format!("{rate} is out of range (more than 0, at most 1e9)"),
        );
        return None;
    }
    // A second's worth by default, and never less than one request.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let default_burst = rate.ceil().max(1.0) as u32;
    let burst = burst.unwrap_or(default_burst);
    if burst == 0 {
        check.error(format!("{at}.burst"), "must be at least 1");
        return None;
    }
    Some(TokenBucket {
        per_second: rate,
        burst,
    })
}

/// A route's or listener's `rate_limit`.
pub(super) fn validate_rate_limit(
    check: &mut Checker<'_>,
    at: &str,
    spec: &RateLimitSpec,
) -> Option<RateLimit> {
    let before = check.errors.len();
    let shared = match (spec.requests_per_second, spec.burst) {
        (Some(rate), burst) => bucket(check, at, rate, burst),
        (None, Some(_)) => {
            check.error(format!("{at}.burst"), "needs requests_per_second");
            None
        }
        (None, None) => None,
    };
    let mut max_clients = DEFAULT_MAX_CLIENTS;
    let per_client = spec.per_client.as_ref().and_then(|client| {
        let at = format!("{at}.per_client");
        max_clients = client.max_clients.unwrap_or(DEFAULT_MAX_CLIENTS);
        if max_clients == 0 || max_clients > MAX_CLIENTS {
            check.error(
                format!("{at}.max_clients"),
                format!("{max_clients} is out of range (1..={MAX_CLIENTS})"),
            );
        }
        bucket(check, &at, client.requests_per_second, client.burst)
    });
    if spec.requests_per_second.is_none() && spec.per_client.is_none() {
        check.error(
            at,
            "set requests_per_second, per_client or both; a rate limit without either does nothing",
        );
    }
    if check.errors.len() > before {
        return None;
    }
    Some(RateLimit {
        shared,
        per_client,
        max_clients,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn errors(route_extra: &str) -> String {
        let yaml = format!(
            r#"
listeners: [{{ name: web, address: "127.0.0.1:0", route_config: rc }}]
route_configs:
  - name: rc
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - {{ name: r, cluster: c, {route_extra} }}
clusters: [{{ name: c, endpoints: [{{ address: "127.0.0.1:1" }}] }}]
"#
        );
        match Config::from_yaml(&yaml, "test.yaml") {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn faults_and_limits_validate_with_their_defaults() {
        let yaml = r#"
listeners:
  - { name: web, address: "127.0.0.1:0", route_config: rc, rate_limit: { per_client: { requests_per_second: 2.5 } } }
  - { name: raw, address: "127.0.0.1:0", protocol: tcp, cluster: c, fault: { reset_percent: 12.5 } }
route_configs:
  - name: rc
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: r
            cluster: c
            fault: { delay: { duration: 50ms, percent: 10 }, abort: { http_status: 503 } }
            rate_limit: { requests_per_second: 100 }
clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:1" }] }]
"#;
        let config = Config::from_yaml(yaml, "test.yaml").unwrap();
        let route = &config.route_configs[0].virtual_hosts[0].routes[0];
        let fault = route.fault.as_deref().unwrap();
        assert_eq!(fault.delay.unwrap().0, std::time::Duration::from_millis(50));
        assert_eq!(fault.delay.unwrap().1.0, 100_000);
        let (abort, percent) = fault.abort.unwrap();
        assert_eq!((abort.status.as_u16(), abort.grpc_status), (503, 14));
        assert_eq!(percent, crate::config::Percent::ALL);
        assert_eq!(fault.max_active, 1024);
        let limit = route.rate_limit.as_ref().unwrap();
        let shared = limit.shared.unwrap();
        assert_eq!((shared.per_second, shared.burst), (100.0, 100));
        assert!(limit.per_client.is_none());
        let listener = config.listeners[0].rate_limit.as_ref().unwrap();
        assert_eq!(listener.per_client.unwrap().burst, 3);
        assert_eq!(listener.max_clients, 10_000);
        let tcp = config.listeners[1].fault.as_ref().unwrap();
        assert_eq!(tcp.reset.unwrap().0, 125_000);
    }

    #[test]
    fn bad_faults_and_limits_name_their_field() {
        let cases = [
            ("fault: {}", "routes[0].fault"),
            ("fault: { delay: { percent: 5 } }", "fault.delay.duration"),
            (
                "fault: { delay: { duration: 1s, percent: 101 } }",
                "fault.delay.percent",
            ),
            (
                "fault: { abort: { http_status: 99 } }",
                "fault.abort.http_status",
            ),
            (
                "fault: { abort: { http_status: 503, grpc_status: bogus } }",
                "fault.abort.grpc_status",
            ),
            (
                "fault: { abort: { http_status: 503 }, max_active: 0 }",
                "fault.max_active",
            ),
            (
                "fault: { abort: { http_status: 503 }, source_identities: [\"nope\"] }",
                "fault.source_identities[0]",
            ),
            ("rate_limit: {}", "routes[0].rate_limit"),
            (
                "rate_limit: { requests_per_second: 0 }",
                "rate_limit.requests_per_second",
            ),
            (
                "rate_limit: { requests_per_second: 5, burst: 0 }",
                "rate_limit.burst",
            ),
            ("rate_limit: { burst: 5 }", "rate_limit.burst"),
            (
                "rate_limit: { per_client: { requests_per_second: 1, max_clients: 0 } }",
                "rate_limit.per_client.max_clients",
            ),
        ];
        for (extra, field) in cases {
            let message = errors(extra);
            assert!(message.contains(field), "{extra}: {message}");
            assert!(message.contains("test.yaml"), "{extra}: {message}");
        }
    }
}
