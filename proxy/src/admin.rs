//! The admin HTTP server: readiness, liveness, metrics, config and cluster
//! state. It runs on the control runtime, apart from the workers, so a
//! scrape never competes with requests, and it keeps answering during the
//! drain (with `/ready` at 503) so orchestrators see the drain.
//!
//! The admin address should be loopback or otherwise protected: it reveals
//! configuration.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;

use crate::drain::Drain;
use crate::stack::Shared;
use crate::telemetry::Metrics;

/// What the admin server reads.
#[derive(Debug, Clone)]
pub(crate) struct AdminState {
    pub(crate) shared: Shared,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) ready: Arc<AtomicBool>,
    /// The shutdown signal arrived (the drain may not have started yet).
    pub(crate) stopping: Arc<AtomicBool>,
    pub(crate) drain: Drain,
    /// The xDS client's state, when configuration comes over xDS.
    pub(crate) xds_status: Arc<std::sync::Mutex<Option<serde_json::Value>>>,
    /// The access log, whose dropped lines `/metrics` reports.
    pub(crate) access_log: Option<crate::telemetry::AccessLog>,
    /// The policy decision log, for its drop counter.
    pub(crate) decision_log: Option<crate::policy::DecisionLog>,
    /// `authorization: Bearer <token>` every request but `/ready` and
    /// `/live` must carry, when set.
    pub(crate) token: Option<Arc<[u8]>>,
    /// Workload certificates and trust bundles.
    pub(crate) identities: Arc<crate::identity::Identities>,
}

/// Admin connections served at once; more wait in the accept queue. An
/// operator's tools and a scraper need a handful; the bound keeps a
/// misbehaving client from taking the process's file descriptors.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Serves admin connections until the process exits.
pub(crate) async fn serve(listener: std::net::TcpListener, state: AdminState) {
    serve_with_limit(listener, state, MAX_ADMIN_CONNECTIONS).await;
}

/// Admin connection tasks are not part of the drain: the admin server keeps
/// answering while the proxy drains (a scraper's keep-alive connection
/// would otherwise hold the drain to its deadline), and ends with the
/// process.
async fn serve_with_limit(listener: std::net::TcpListener, state: AdminState, limit: usize) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "admin listener setup failed");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(limit));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return; // the semaphore is never closed
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, or a connection reset before
                // accept: back off rather than spin.
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Whether the request carries `authorization: Bearer <token>`, compared
/// in constant time (no early exit on the first differing byte).
fn presents(req: &Request<Incoming>, token: &[u8]) -> bool {
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    constant_time_eq(given, token)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    let path = req.uri().path();
    if let Some(token) = &state.token
        && path != "/ready"
        && path != "/live"
        && !presents(req, token)
    {
        let mut response = text(StatusCode::UNAUTHORIZED, "bearer token required\n".into());
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    match path {
        "/ready" => {
            // Not ready, and why: an orchestrator's probe only needs the
            // status; an operator reads the body.
            let not_ready = if state.drain.is_draining() || state.stopping.load(Relaxed) {
                Some("draining".to_owned())
            } else if !state.ready.load(Relaxed) {
                Some("no complete configuration from the control plane yet".to_owned())
            } else if state.shared.load().config.listeners.is_empty() {
                Some("the configuration has no listeners".to_owned())
            } else {
                // Mesh mTLS cannot serve without its certificate.
                state.identities.not_ready_reason()
            };
            match not_ready {
                None => text(StatusCode::OK, "ready\n".into()),
                Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
            }
        }
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/metrics" => {
            // OpenMetrics when the scraper asks for it (Prometheus does for
            // exemplars): counter families without `_total`, exemplars,
            // `# EOF`.
            let format = if req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")))
            {
                crate::telemetry::Format::OpenMetrics
            } else {
                crate::telemetry::Format::Prometheus
            };
            let mut body = exposition(
                &state.metrics,
                &state.identities,
                state.access_log.as_ref(),
                state.decision_log.as_ref(),
                format,
            );
            let content_type = match format {
                crate::telemetry::Format::OpenMetrics => {
                    body = crate::telemetry::openmetrics_families(&body);
                    body.push_str("# EOF\n");
                    "application/openmetrics-text; version=1.0.0; charset=utf-8"
                }
                crate::telemetry::Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            };
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(content_type),
            );
            response
        }
        "/config_dump" => {
            let snapshot = state.shared.load();
            let xds = state
                .xds_status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            json(&serde_json::json!({
                "source": &*snapshot.config.source,
                "xds": xds,
                "config": &*snapshot.config.spec,
            }))
        }
        "/listeners" => json(
            &state
                .shared
                .load()
                .bound
                .iter()
                .map(|(name, addr)| {
                    serde_json::json!({ "name": &**name, "address": addr.to_string() })
                })
                .collect::<Vec<_>>(),
        ),
        "/clusters" => json(&clusters(state)),
        "/certs" => json(&certs(&state.identities, &state.shared.load().config)),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /ready /live /metrics /config_dump /listeners /clusters /certs\n"
                .into(),
        ),
    }
}

#[derive(Serialize)]
struct ClusterView {
    name: String,
    protocol: String,
    lb: String,
    /// The circuit breakers: limits and what is in flight now.
    circuit_breakers: BreakersView,
    endpoints: Vec<EndpointView>,
}

#[derive(Serialize)]
struct BreakersView {
    max_requests: u32,
    requests_active: i64,
    max_retries: u32,
    retries_active: i64,
    max_connections: u32,
    /// HTTP connections open or opening.
    connections_active: i64,
    remaining_connections: i64,
    max_pending_requests: u32,
    /// Requests waiting for a connection.
    pending_requests: i64,
    remaining_pending_requests: i64,
}

#[derive(Serialize)]
struct EndpointView {
    address: String,
    weight: u32,
    /// `healthy`; `unhealthy` (failing active health checks) or `unknown`
    /// (not probed yet), with `health_check` configured; or `ejected` by
    /// outlier detection.
    health: &'static str,
    /// The last health probe's outcome (`ok`, `status 503`, `connect
    /// refused`, `timeout`, ...), with `health_check` configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_check: Option<String>,
    /// How much longer an ejected endpoint stays out.
    #[serde(skip_serializing_if = "Option::is_none")]
    ejected_for_ms: Option<u64>,
    /// Times outlier detection has ejected it.
    ejections: u32,
    active_requests: u64,
    requests_total: u64,
    connect_failures: u64,
    idle_connections: usize,
}

fn clusters(state: &AdminState) -> Vec<ClusterView> {
    use crate::cluster::health::Status;
    let snapshot = state.shared.load();
    let now = crate::cluster::outlier::now();
    let mut names: Vec<_> = snapshot.clusters.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| snapshot.clusters.get(name))
        .map(|cluster| ClusterView {
            name: cluster.config.name.to_string(),
            protocol: cluster.config.protocol.as_str().to_owned(),
            lb: cluster.config.lb.as_str().to_owned(),
            circuit_breakers: {
                let metrics = cluster.metrics();
                let held = metrics
                    .connections_held
                    .load(std::sync::atomic::Ordering::Relaxed);
                let pending = metrics
                    .requests_pending
                    .load(std::sync::atomic::Ordering::Relaxed);
                let max_connections = cluster.config.max_connections;
                let max_pending_requests = cluster.config.max_pending_requests;
                BreakersView {
                    max_connections,
                    connections_active: held,
                    remaining_connections: (i64::from(max_connections) - held).max(0),
                    max_pending_requests,
                    pending_requests: pending,
                    remaining_pending_requests: (i64::from(max_pending_requests) - pending).max(0),
                    max_requests: cluster.config.max_requests,
                    requests_active: metrics
                        .requests_active
                        .load(std::sync::atomic::Ordering::Relaxed),
                    max_retries: cluster.config.max_retries,
                    retries_active: metrics
                        .retries_active
                        .load(std::sync::atomic::Ordering::Relaxed),
                }
            },
            endpoints: cluster
                .endpoints()
                .endpoints
                .iter()
                .map(|e| EndpointView {
                    address: e.addr.to_string(),
                    weight: e.weight,
                    // Failing active checks says more than an ejection.
                    health: match e.health.status() {
                        status @ (Status::Unhealthy | Status::Unknown)
                            if cluster.config.health_check.is_some() =>
                        {
                            status.as_str()
                        }
                        _ if e.outlier.is_ejected(now) => "ejected",
                        _ => "healthy",
                    },
                    last_check: cluster
                        .config
                        .health_check
                        .as_ref()
                        .and_then(|_| e.health.last_check())
                        .map(|last| last.to_string()),
                    ejected_for_ms: e
                        .outlier
                        .ejected_for(now)
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    ejections: e.outlier.ejections(),
                    active_requests: e.active(),
                    requests_total: e.total(),
                    connect_failures: e.connect_failures(),
                    idle_connections: e.idle_connections(),
                })
                .collect(),
        })
        .collect()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
    }
}

/// `/certs`: the workload certificates held (identity, serial, validity;
/// never a key), the trust bundles, and the certificates listeners serve
/// from files.
fn certs(
    identities: &crate::identity::Identities,
    config: &crate::config::Config,
) -> serde_json::Value {
    let time = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let now = std::time::SystemTime::now();
    let served: Vec<serde_json::Value> = config
        .listeners
        .iter()
        .filter_map(|listener| Some((listener, listener.tls.as_ref()?)))
        .flat_map(|(listener, tls)| {
            tls.certificates.iter().map(move |cert| {
                let leaf = cert.key.cert.first().and_then(|der| {
                    let (_, parsed) = x509_parser::parse_x509_certificate(der).ok()?;
                    let not_after = std::time::UNIX_EPOCH
                        + std::time::Duration::from_secs(
                            u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0),
                        );
                    Some((
                        parsed.subject().to_string(),
                        parsed.raw_serial_as_string(),
                        not_after,
                    ))
                });
                serde_json::json!({
                    "listener": &*listener.name,
                    "cert_file": &*cert.cert_file,
                    "subject": leaf.as_ref().map(|l| l.0.clone()),
                    "spiffe_id": cert.spiffe_id.as_deref(),
                    "serial": leaf.as_ref().map(|l| l.1.clone()),
                    "not_after": leaf.as_ref().map(|l| time(l.2)),
                    "expired": leaf.as_ref().map(|l| l.2 <= now),
                })
            })
        })
        .collect();
    serde_json::json!({
        "listener_certificates": served,
        "workload_certificates": identities.all_svids().iter().map(|svid| serde_json::json!({
            "spiffe_id": &*svid.spiffe_id,
            "serial": svid.serial,
            "not_before": time(svid.not_before),
            "not_after": time(svid.not_after),
            "expired": svid.not_after <= now,
            "signer": svid.signer,
        })).collect::<Vec<_>>(),
        "wanted": identities.wanted().iter().map(|id| id.to_string()).collect::<Vec<_>>(),
        "trust_bundles": identities.all_bundles().iter().map(|bundle| serde_json::json!({
            "trust_domain": &*bundle.trust_domain,
            "roots": bundle.subjects,
            "signer": bundle.signer,
        })).collect::<Vec<_>>(),
    })
}

/// The identity series of `/metrics`.
/// Every series `/metrics` shows (and `metrics_export` pushes), in
/// `format` (OpenMetrics's families and `# EOF` are the caller's).
pub(crate) fn exposition(
    metrics: &Metrics,
    identities: &crate::identity::Identities,
    access_log: Option<&crate::telemetry::AccessLog>,
    decision_log: Option<&crate::policy::DecisionLog>,
    format: crate::telemetry::Format,
) -> String {
    // Series of removed resources go once the last connection or request
    // that used them has ended (which may be after the configuration
    // change that removed them).
    metrics.prune();
    let mut body = metrics.render_as(format);
    body.push_str(&identity_metrics(identities));
    for (name, what, dropped) in [
        (
            "weft_access_log",
            "Access-log",
            access_log.map(|log| log.dropped()),
        ),
        (
            "weft_policy_decision_log",
            "Decision-log",
            decision_log.map(|log| log.dropped()),
        ),
    ] {
        if let Some(dropped) = dropped {
            body.push_str(&format!(
                "# HELP {name}_dropped_total {what} lines dropped because the writer was behind.\n\
                 # TYPE {name}_dropped_total counter\n\
                 {name}_dropped_total {dropped}\n"
            ));
        }
    }
    body
}

fn identity_metrics(identities: &crate::identity::Identities) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "# HELP weft_identity_certificate_expiry_seconds Unix time at which a workload certificate expires.\n\
         # TYPE weft_identity_certificate_expiry_seconds gauge\n",
    );
    for svid in identities.all_svids() {
        let expiry = svid
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let _ = writeln!(
            out,
            "weft_identity_certificate_expiry_seconds{{identity=\"{}\"}} {expiry}",
            crate::telemetry::escape_label(&svid.spiffe_id)
        );
    }
    let _ = write!(
        out,
        "# HELP weft_identity_renewals_total Workload certificates signed by the control plane and installed.\n\
         # TYPE weft_identity_renewals_total counter\n\
         weft_identity_renewals_total {}\n\
         # HELP weft_identity_renewal_failures_total Signing attempts that failed (and were retried).\n\
         # TYPE weft_identity_renewal_failures_total counter\n\
         weft_identity_renewal_failures_total {}\n",
        identities.renewals.load(Relaxed),
        identities.renewal_failures.load(Relaxed),
    );
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use arc_swap::ArcSwap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use std::collections::HashMap;

    use super::*;

    #[test]
    fn tokens_compare_whole() {
        let cases: [(&[u8], &[u8], bool); 6] = [
            (b"secret", b"secret", true),
            (b"secret", b"secreT", false),
            (b"secre", b"secret", false),
            (b"secret!", b"secret", false),
            (b"", b"secret", false),
            (b"xsecret", b"secret", false),
        ];
        for (given, token, want) in cases {
            assert_eq!(constant_time_eq(given, token), want, "{given:?}");
        }
    }
    use crate::config::Config;

    async fn state() -> AdminState {
        let metrics = Arc::new(Metrics::new());
        let config = Arc::new(Config::from_yaml("listeners: []", "test").unwrap());
        let snapshot = crate::stack::build(
            config,
            &[],
            HashMap::new(),
            &metrics,
            &crate::identity::Identities::new(),
            &crate::stack::Logs::default(),
            None,
        );
        AdminState {
            shared: Arc::new(ArcSwap::from_pointee(snapshot)),
            metrics,
            ready: Arc::new(AtomicBool::new(true)),
            stopping: Arc::new(AtomicBool::new(false)),
            access_log: None,
            decision_log: None,
            token: None,
            drain: Drain::new(),
            xds_status: Arc::new(std::sync::Mutex::new(None)),
            identities: crate::identity::Identities::new(),
        }
    }

    /// Sends `GET /live` and returns the first bytes of the answer.
    async fn live(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET /live HTTP/1.1\r\nhost: admin\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        stream.read_exact(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    }

    #[tokio::test]
    async fn connections_over_the_limit_wait_for_a_free_slot() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve_with_limit(listener, state().await, 2));
        let mut first = TcpStream::connect(address).await.unwrap();
        let mut second = TcpStream::connect(address).await.unwrap();
        assert_eq!(live(&mut first).await, "HTTP/1.1 200");
        assert_eq!(live(&mut second).await, "HTTP/1.1 200");
        let mut third = TcpStream::connect(address).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(300), live(&mut third)).await;
        assert!(waited.is_err(), "served beyond the limit");
        drop(first);
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 12];
            third.read_exact(&mut buf).await.unwrap();
            String::from_utf8_lossy(&buf).into_owned()
        })
        .await
        .unwrap();
        assert_eq!(answer, "HTTP/1.1 200");
    }
}
