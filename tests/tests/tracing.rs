//! Distributed tracing end to end: three proxies in a row (a gateway and
//! two sidecars) export their spans to an in-process OTLP receiver (gRPC
//! and HTTP/protobuf); the spans form one trace with the right parents,
//! an incoming `traceparent` or B3 context is continued, the sampling
//! decision travels, and a dead collector costs no request.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use weft_cp::otlp::{ReceivedSpan, Receiver};
use weft_tests::*;

const WAIT: Duration = Duration::from_secs(10);

/// One proxy: listener `web` to cluster `next` at `upstream`, tracing to
/// `collector` as `service`, with `extra` tracing fields.
fn hop(
    upstream: SocketAddr,
    service: &str,
    collector: &str,
    protocol: &str,
    extra: &str,
) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: web
    address: "127.0.0.1:0"
    route_config: main
    xff_num_trusted_hops: 1
    tracing: {{ collector: "{collector}", protocol: {protocol}, service_name: {service}, flush_interval: 20ms{extra} }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ name: {service}-route, cluster: next }}]
clusters:
  - name: next
    endpoints: [{{ address: "{upstream}" }}]
"#
    )
}

async fn receiver() -> Receiver {
    Receiver::bind(loopback0(), loopback0()).await.unwrap()
}

fn by_id(spans: &[ReceivedSpan]) -> HashMap<&str, &ReceivedSpan> {
    spans.iter().map(|s| (s.span_id.as_str(), s)).collect()
}

fn find<'a>(spans: &'a [ReceivedSpan], service: &str, kind: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.service == service && s.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} span from {service}: {spans:#?}"))
}

#[tokio::test]
async fn a_request_through_a_gateway_and_two_sidecars_is_one_trace() {
    let echo = echo("backend-app").await;
    let otlp = receiver().await;
    // The backend's sidecar exports over HTTP/protobuf, the others over
    // gRPC.
    let backend = ProxyProcess::start(&hop(
        echo.local_addr(),
        "backend",
        &otlp.http_url(),
        "http",
        ", headers: { x-http-key: h1 }",
    ))
    .await
    .unwrap();
    let frontend = ProxyProcess::start(&hop(
        backend.listener("web"),
        "frontend",
        &otlp.grpc_url(),
        "grpc",
        "",
    ))
    .await
    .unwrap();
    let gateway = ProxyProcess::start(&hop(
        frontend.listener("web"),
        "gateway",
        &otlp.grpc_url(),
        "grpc",
        ", resource_attributes: { deployment.environment: test }, headers: { x-grpc-key: g1 }",
    ))
    .await
    .unwrap();

    let mut req = get(gateway.listener("web"), "/shop/cart?id=7");
    req.headers_mut()
        .insert("x-echo-headers", "1".parse().unwrap());
    let response = http1_request(gateway.listener("web"), req).await.unwrap();
    assert_eq!(response.status(), 200);
    let upstream_parent = header(&response, "x-echo-req-traceparent").to_owned();

    let (spans, complete) = otlp.wait_for(WAIT, |spans| spans.len() >= 6).await;
    assert!(complete, "six spans expected: {spans:#?}");
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let trace = &spans[0].trace_id;
    assert!(spans.iter().all(|s| &s.trace_id == trace), "{spans:#?}");

    // Each hop's server span is the child of the previous hop's client
    // span; each client span the child of its own hop's server span.
    let ids = by_id(&spans);
    let root = find(&spans, "gateway", "server");
    assert_eq!(root.parent_span_id, "", "the gateway starts the trace");
    let mut parent = root;
    for (service, first) in [("gateway", true), ("frontend", false), ("backend", false)] {
        let server = find(&spans, service, "server");
        if !first {
            assert_eq!(ids[server.parent_span_id.as_str()].kind, "client");
            assert_eq!(server.parent_span_id, parent.span_id, "{service}");
        }
        let client = find(&spans, service, "client");
        assert_eq!(client.parent_span_id, server.span_id, "{service}");
        // The server span covers its client span.
        assert!(
            server.start_unix_nanos <= client.start_unix_nanos,
            "{service}"
        );
        assert!(server.end_unix_nanos >= client.end_unix_nanos, "{service}");
        parent = client;
    }
    // The application saw the last client span as its parent.
    assert_eq!(
        upstream_parent,
        format!(
            "00-{trace}-{}-01",
            find(&spans, "backend", "client").span_id
        )
    );

    // Semantic-convention attributes and Weft's own.
    let server = find(&spans, "gateway", "server");
    assert_eq!(server.attribute("http.request.method"), Some("GET"));
    assert_eq!(server.attribute("url.path"), Some("/shop/cart"));
    assert_eq!(server.attribute("http.response.status_code"), Some("200"));
    assert_eq!(server.attribute("network.peer.address"), Some("127.0.0.1"));
    assert_eq!(server.attribute("server.address"), Some("127.0.0.1"));
    assert_eq!(server.attribute("weft.route"), Some("gateway-route"));
    assert_eq!(server.attribute("weft.listener"), Some("web"));
    assert!(server.attribute("weft.request_id").is_some());
    assert_eq!(server.name, "GET gateway-route");
    let client = find(&spans, "frontend", "client");
    assert_eq!(client.attribute("weft.cluster"), Some("next"));
    assert_eq!(client.attribute("weft.attempt"), Some("1"));
    assert_eq!(
        client.attribute("server.port"),
        Some(backend.listener("web").port().to_string().as_str())
    );
    assert!(!spans.iter().any(|s| s.is_error));
    // Each exporter sent its configured headers (gRPC metadata, HTTP).
    let headers = otlp.headers();
    assert_eq!(headers.get("x-grpc-key").map(String::as_str), Some("g1"));
    assert_eq!(headers.get("x-http-key").map(String::as_str), Some("h1"));

    for proxy in [&gateway, &frontend, &backend] {
        assert!(
            eventually(WAIT, || async {
                proxy
                    .metric("weft_trace_spans_total{result=\"exported\"}")
                    .await
                    == 2.0
            })
            .await
        );
        assert_eq!(
            proxy
                .metric("weft_trace_spans_total{result=\"dropped\"}")
                .await,
            0.0
        );
    }
}

#[tokio::test]
async fn an_incoming_context_is_continued_and_its_sampling_decision_kept() {
    let echo = echo("app").await;
    let otlp = receiver().await;
    let dir = TempDir::new().unwrap();
    let log = dir.path().join("access.log");
    let config = format!(
        "access_log: {{ path: \"{}\" }}\n{}",
        log.display(),
        hop(echo.local_addr(), "edge", &otlp.grpc_url(), "grpc", "")
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let addr = proxy.listener("web");
    let send = |headers: &'static [(&'static str, &'static str)]| async move {
        let mut req = get(addr, "/");
        req.headers_mut()
            .insert("x-echo-headers", "1".parse().unwrap());
        for (name, value) in headers {
            req.headers_mut().insert(*name, value.parse().unwrap());
        }
        let response = http1_request(addr, req).await.unwrap();
        assert_eq!(response.status(), 200);
        let echoed = |name: &str| {
            response
                .headers()
                .get(format!("x-echo-req-{name}"))
                .map(|v| v.to_str().unwrap().to_owned())
        };
        (
            echoed("traceparent"),
            echoed("tracestate"),
            echoed("b3"),
            echoed("x-b3-traceid"),
        )
    };

    // W3C, sampled, with vendor state.
    let (parent, state, _, _) = send(&[
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("tracestate", "congo=t61rcWkgMzE"),
    ])
    .await;
    let parent = parent.unwrap();
    assert!(
        parent.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && parent.ends_with("-01"),
        "{parent}"
    );
    assert_ne!(&parent[36..52], "b7ad6b7169203331", "the proxy's own span");
    assert_eq!(state.as_deref(), Some("congo=t61rcWkgMzE"));
    let (spans, _) = otlp.wait_for(WAIT, |spans| spans.len() >= 2).await;
    let server = find(&spans, "edge", "server");
    assert_eq!(server.trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(server.parent_span_id, "b7ad6b7169203331");

    // B3 single header: continued, and passed on in both formats.
    let (parent, _, b3, _) =
        send(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]).await;
    assert!(
        parent
            .unwrap()
            .starts_with("00-80f198ee56343ba864fe8b2a57d3eff7-")
    );
    assert!(b3.unwrap().starts_with("80f198ee56343ba864fe8b2a57d3eff7-"));
    // B3 multi header, not sampled: the decision travels, nothing is
    // recorded, and the client's headers do not reach the upstream.
    let (parent, _, _, multi) = send(&[
        ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
        ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ("x-b3-sampled", "0"),
    ])
    .await;
    let parent = parent.unwrap();
    assert!(
        parent.starts_with("00-463ac35c9f6413ad48485a3953bb6124-") && parent.ends_with("-00"),
        "{parent}"
    );
    assert_eq!(multi, None);
    // A W3C context not sampled.
    send(&[(
        "traceparent",
        "00-11111111111111111111111111111111-2222222222222222-00",
    )])
    .await;

    let (spans, _) = otlp.wait_for(WAIT, |spans| spans.len() >= 4).await;
    // Give a wrongly recorded span time to arrive: the exporter flushes
    // every 20 ms; the counter says when everything queued has gone.
    assert!(
        eventually(WAIT, || async {
            proxy
                .metric("weft_trace_spans_total{result=\"exported\"}")
                .await
                == 4.0
        })
        .await
    );
    let spans = otlp.spans().into_iter().chain(spans).collect::<Vec<_>>();
    assert!(
        !spans
            .iter()
            .any(|s| s.trace_id.starts_with("463ac35c") || s.trace_id.starts_with("11111111")),
        "an unsampled trace was recorded: {spans:#?}"
    );

    // The access log names each request's trace and server span, sampled
    // or not.
    assert!(
        eventually(WAIT, || async {
            std::fs::read_to_string(&log).is_ok_and(|l| l.lines().count() == 4)
        })
        .await
    );
    let lines = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(lines[0]["span_id"], server.span_id.as_str());
    assert_eq!(lines[2]["trace_id"], "463ac35c9f6413ad48485a3953bb6124");

    // Metrics point at traces: asked for OpenMetrics, the request-duration
    // histogram carries a recorded trace as a bucket's exemplar.
    let mut scrape = get(proxy.admin, "/metrics");
    scrape.headers_mut().insert(
        "accept",
        "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
            .parse()
            .unwrap(),
    );
    let response = http1_request(proxy.admin, scrape).await.unwrap();
    assert!(
        header(&response, "content-type")
            .starts_with("application/openmetrics-text; version=1.0.0")
    );
    let text = String::from_utf8(body_bytes(response).await.unwrap().to_vec()).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE weft_trace_spans counter\n"), "{text}");
    let exemplars: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("weft_http_request_duration_seconds_bucket{")
                && l.contains(" # {trace_id=\"")
        })
        .collect();
    assert!(
        exemplars.iter().any(
            |l| l.contains("trace_id=\"0af7651916cd43dd8448eb211c80319c\"")
                || l.contains("trace_id=\"80f198ee56343ba864fe8b2a57d3eff7\"")
        ),
        "{text}"
    );
    // Unsampled traces are never exemplars; the plain format has none.
    assert!(!text.contains("463ac35c9f6413ad48485a3953bb6124"), "{text}");
    let (_, plain) = proxy.admin_get("/metrics").await.unwrap();
    assert!(!plain.contains(" # {"), "{plain}");
    assert!(!plain.contains("# EOF"), "{plain}");
}

#[tokio::test]
async fn new_traces_are_sampled_by_ratio_and_errors_always_when_asked() {
    let echo = echo("app").await;
    let otlp = receiver().await;
    let proxy = ProxyProcess::start(&hop(
        echo.local_addr(),
        "edge",
        &otlp.grpc_url(),
        "grpc",
        ", sample_percent: 25, always_sample_errors: true",
    ))
    .await
    .unwrap();
    let addr = proxy.listener("web");
    let mut sender = http1_connect(addr).await.unwrap();
    const REQUESTS: usize = 400;
    for _ in 0..REQUESTS {
        let response = sender.send_request(get(addr, "/")).await.unwrap();
        assert_eq!(response.status(), 200);
        body_bytes(response).await.unwrap();
    }
    // An error is recorded though new traces are sampled at 25 %.
    for _ in 0..5 {
        let mut req = get(addr, "/");
        req.headers_mut()
            .insert("x-echo-status", "503".parse().unwrap());
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.status(), 503);
        body_bytes(response).await.unwrap();
    }
    let (spans, _) = otlp
        .wait_for(WAIT, |spans| {
            spans
                .iter()
                .filter(|s| {
                    s.kind == "server" && s.attribute("http.response.status_code") == Some("503")
                })
                .count()
                == 5
        })
        .await;
    let errors = spans
        .iter()
        .filter(|s| s.attribute("http.response.status_code") == Some("503"))
        .count();
    assert_eq!(errors, 10, "a server and a client span per error");
    assert!(spans.iter().filter(|s| s.is_error).count() == 10);
    let ok = spans
        .iter()
        .filter(|s| s.kind == "server" && s.attribute("http.response.status_code") == Some("200"))
        .count();
    // Binomial(400, 0.25): mean 100, standard deviation 8.7; five of them
    // either side.
    assert!((57..=143).contains(&ok), "{ok} of {REQUESTS} sampled");
}

#[tokio::test]
async fn a_dead_collector_costs_no_request_and_its_spans_are_counted() {
    let echo = echo("app").await;
    // A collector that takes connections into its backlog and never
    // answers: every export waits out its timeout while spans keep coming.
    let black_hole = std::net::TcpListener::bind(loopback0()).unwrap();
    let dead = black_hole.local_addr().unwrap();
    let proxy = ProxyProcess::start(&hop(
        echo.local_addr(),
        "edge",
        &format!("http://{dead}"),
        "grpc",
        ", max_queued_spans: 16, max_export_batch: 16, export_timeout: 200ms",
    ))
    .await
    .unwrap();
    let addr = proxy.listener("web");
    let mut sender = http1_connect(addr).await.unwrap();
    const REQUESTS: usize = 300;
    for _ in 0..REQUESTS {
        let response = sender.send_request(get(addr, "/")).await.unwrap();
        assert_eq!(response.status(), 200);
        body_bytes(response).await.unwrap();
    }
    // Every span is accounted for: dropped at the full queue, or lost with
    // a failed export; none exported.
    let spans = 2.0 * REQUESTS as f64;
    assert!(
        eventually(WAIT, || async {
            proxy
                .metric("weft_trace_spans_total{result=\"dropped\"}")
                .await
                + proxy
                    .metric("weft_trace_spans_total{result=\"failed\"}")
                    .await
                == spans
        })
        .await,
        "{}",
        proxy.admin_get("/metrics").await.unwrap().1
    );
    assert!(
        proxy
            .metric("weft_trace_spans_total{result=\"dropped\"}")
            .await
            > 0.0
    );
    assert!(proxy.metric("weft_trace_export_failures_total").await >= 1.0);
    assert_eq!(
        proxy
            .metric("weft_trace_spans_total{result=\"exported\"}")
            .await,
        0.0
    );
    drop(black_hole);
}

#[tokio::test]
async fn each_retry_is_a_client_span_of_its_own() {
    let echo = echo("app").await;
    let otlp = receiver().await;
    let config = hop(echo.local_addr(), "edge", &otlp.grpc_url(), "grpc", "").replace(
        "routes: [{ name: edge-route, cluster: next }]",
        "routes: [{ name: edge-route, cluster: next, retry_policy: { retry_on: [5xx], num_retries: 2, backoff_base: 1ms, backoff_max: 2ms } }]",
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let addr = proxy.listener("web");
    let mut req = get(addr, "/");
    // Every request fails: three attempts, then the last 500 goes back.
    req.headers_mut()
        .insert("x-echo-fail-every", "1".parse().unwrap());
    let response = http1_request(addr, req).await.unwrap();
    assert_eq!(response.status(), 500);

    let (spans, complete) = otlp.wait_for(WAIT, |spans| spans.len() >= 4).await;
    assert!(complete, "{spans:#?}");
    let server = find(&spans, "edge", "server");
    assert!(server.is_error);
    let mut attempts: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == "client").collect();
    attempts.sort_by_key(|s| s.attribute("weft.attempt").map(str::to_owned));
    assert_eq!(attempts.len(), 3, "{spans:#?}");
    for (n, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt.parent_span_id, server.span_id);
        assert_eq!(
            attempt.attribute("weft.attempt"),
            Some((n + 1).to_string().as_str())
        );
        assert_eq!(attempt.attribute("http.response.status_code"), Some("500"));
        let resends = (n > 0).then(|| n.to_string());
        assert_eq!(
            attempt.attribute("http.request.resend_count"),
            resends.as_deref()
        );
        assert!(attempt.is_error);
    }
    // Three different span ids: each attempt told its upstream its own.
    let mut ids: Vec<&str> = attempts.iter().map(|s| s.span_id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3);
}

#[tokio::test]
async fn http1_and_http2_upstreams_are_told_the_attempt_s_span_or_an_unsampled_trace() {
    let echo = echo("app").await;
    let otlp = receiver().await;
    for protocol in ["http1", "http2"] {
        for sampled in [true, false] {
            let extra = if sampled { "" } else { ", sample_percent: 0" };
            let config = hop(echo.local_addr(), "edge", &otlp.grpc_url(), "grpc", extra).replace(
                "  - name: next\n",
                &format!("  - name: next\n    protocol: {protocol}\n"),
            );
            let proxy = ProxyProcess::start(&config).await.unwrap();
            let addr = proxy.listener("web");
            let mut req = get(addr, "/");
            req.headers_mut()
                .insert("x-echo-headers", "1".parse().unwrap());
            let response = http1_request(addr, req).await.unwrap();
            assert_eq!(response.status(), 200);
            let echoed = |name: &str| {
                response
                    .headers()
                    .get_all(format!("x-echo-req-{name}"))
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            };
            let traceparents = echoed("traceparent");
            assert_eq!(traceparents.len(), 1, "{protocol}: {traceparents:?}");
            let traceparent = &traceparents[0];
            assert_eq!(traceparent.len(), 55, "{traceparent}");
            let (trace_id, parent) = (&traceparent[3..35], &traceparent[36..52]);
            assert_ne!(parent, "0000000000000000");
            if sampled {
                assert!(traceparent.ends_with("-01"), "{traceparent}");
                let (spans, complete) = otlp
                    .wait_for(WAIT, |spans| {
                        spans
                            .iter()
                            .any(|s| s.trace_id == trace_id && s.kind == "client")
                    })
                    .await;
                assert!(complete, "{protocol}: {spans:#?}");
                let client = spans
                    .iter()
                    .find(|s| s.trace_id == trace_id && s.kind == "client")
                    .unwrap();
                // The upstream's parent is the attempt's own span.
                assert_eq!(client.span_id, parent, "{protocol}");
                let version = if protocol == "http2" { "2" } else { "1.1" };
                assert_eq!(client.attribute("network.protocol.version"), Some(version));
            } else {
                // Nothing recorded; the decision still travels.
                assert!(traceparent.ends_with("-00"), "{traceparent}");
            }
        }
    }
}

/// The client spans of the server span `server`, by attempt number.
fn attempts_of<'a>(spans: &'a [ReceivedSpan], server: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    let mut attempts: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == "client" && s.parent_span_id == server.span_id)
        .collect();
    attempts.sort_by_key(|s| s.attribute("weft.attempt").map(str::to_owned));
    attempts
}

#[tokio::test]
async fn a_body_read_for_retries_or_too_large_for_them_keeps_the_request_s_trace() {
    let echo = echo("app").await;
    let otlp = receiver().await;
    let config = hop(echo.local_addr(), "edge", &otlp.grpc_url(), "grpc", "").replace(
        "routes: [{ name: edge-route, cluster: next }]",
        "routes: [{ name: edge-route, cluster: next, retry_policy: { retry_on: [5xx], num_retries: 2, backoff_base: 1ms, backoff_max: 2ms, max_body_bytes: 8 } }]",
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let addr = proxy.listener("web");
    // A body that fits the bound is read before the first attempt, and
    // sent again by each retry; one larger goes once.
    for (path, body, tries) in [("/small", "small", 3), ("/large", "larger than eight", 1)] {
        // PUT: idempotent, so retried.
        let mut req = request(addr, "PUT", path, bytes::Bytes::from(body));
        req.headers_mut()
            .insert("x-echo-fail-every", "1".parse().unwrap());
        let response = http1_request(addr, req).await.unwrap();
        assert_eq!(response.status(), 500, "{path}");
        let server_of = |spans: &[ReceivedSpan]| {
            spans
                .iter()
                .find(|s| s.kind == "server" && s.attribute("url.path") == Some(path))
                .cloned()
        };
        let (spans, complete) = otlp
            .wait_for(WAIT, |spans| {
                server_of(spans).is_some_and(|server| attempts_of(spans, &server).len() >= tries)
            })
            .await;
        assert!(complete, "{path}: {spans:#?}");
        let server = server_of(&spans).unwrap();
        let attempts = attempts_of(&spans, &server);
        assert_eq!(attempts.len(), tries, "{path}: {spans:#?}");
        for (n, attempt) in attempts.iter().enumerate() {
            assert_eq!(attempt.trace_id, server.trace_id);
            assert_eq!(
                attempt.attribute("weft.attempt"),
                Some((n + 1).to_string().as_str())
            );
        }
    }
}

#[tokio::test]
async fn a_counting_receiver_accepts_both_transports_without_decoding() {
    let echo = echo("app").await;
    let sink = Receiver::bind_counting(loopback0(), loopback0())
        .await
        .unwrap();
    for (url, protocol) in [(sink.grpc_url(), "grpc"), (sink.http_url(), "http")] {
        let proxy = ProxyProcess::start(&hop(echo.local_addr(), "edge", &url, protocol, ""))
            .await
            .unwrap();
        let addr = proxy.listener("web");
        for _ in 0..5 {
            let response = http1_request(addr, get(addr, "/")).await.unwrap();
            assert_eq!(response.status(), 200);
        }
        assert!(
            eventually(WAIT, || async {
                proxy
                    .metric("weft_trace_spans_total{result=\"exported\"}")
                    .await
                    == 10.0
            })
            .await,
            "{protocol}: {}",
            proxy.admin_get("/metrics").await.unwrap().1
        );
    }
    assert!(sink.exports() >= 2);
    assert!(sink.bytes() > 0);
    assert!(sink.spans().is_empty(), "nothing decoded or kept");
}

/// A proxy exporting its metrics every second to `collector` over
/// `protocol`, one route to `upstream`.
fn metrics_exporting(upstream: SocketAddr, collector: &str, protocol: &str) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
metrics_export:
  collector: "{collector}"
  protocol: {protocol}
  interval: 1s
  service_name: edge
  resource_attributes: {{ service.instance.id: edge-1 }}
  headers: {{ x-tenant: blue }}
listeners:
  - {{ name: web, address: "127.0.0.1:0", route_config: main }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ name: all, cluster: echo }}]
clusters:
  - {{ name: echo, endpoints: [{{ address: "{upstream}" }}] }}
"#
    )
}

#[tokio::test]
async fn metrics_are_pushed_over_otlp_grpc_and_http_as_scraped() {
    let echo = echo("a").await;
    let receiver = receiver().await;
    for (protocol, collector) in [
        ("grpc", receiver.grpc_url()),
        (
            "http",
            format!(
                "http://{}",
                receiver
                    .http_url()
                    .trim_start_matches("http://")
                    .trim_end_matches("/v1/traces")
            ),
        ),
    ] {
        let proxy =
            ProxyProcess::start(&metrics_exporting(echo.local_addr(), &collector, protocol))
                .await
                .unwrap();
        let web = proxy.listener("web");
        for _ in 0..3 {
            let response = http1_request(web, get(web, "/")).await.unwrap();
            body_bytes(response).await.unwrap();
        }
        // The next export (one second apart) carries the three requests,
        // as a monotonic sum named without `_total`, with the scrape's
        // labels as attributes.
        let requests = |points: &[weft_cp::otlp::ReceivedPoint]| {
            points
                .iter()
                .find(|p| {
                    p.name == "weft_http_requests"
                        && p.attributes.get("status_class").map(String::as_str) == Some("2xx")
                        && p.attributes.get("route").map(String::as_str) == Some("all")
                })
                .map(|p| (p.kind, p.value))
        };
        let key = ("edge".to_owned(), "edge-1".to_owned());
        assert!(
            eventually(WAIT, || async {
                receiver
                    .metrics()
                    .get(&key)
                    .and_then(|points| requests(points))
                    == Some(("sum", 3.0))
            })
            .await,
            "{protocol}: {:?}",
            receiver.metrics().get(&key)
        );
        let points = receiver.metrics().remove(&key).unwrap();
        let histogram = points
            .iter()
            .find(|p| {
                p.name == "weft_http_request_duration_seconds"
                    && p.attributes.get("route").map(String::as_str) == Some("all")
            })
            .unwrap();
        assert_eq!((histogram.kind, histogram.value), ("histogram", 3.0));
        assert!(
            points
                .iter()
                .any(|p| p.name == "weft_upstream_connections_active" && p.kind == "gauge"),
            "{points:?}"
        );
        assert_eq!(
            receiver.headers().get("x-tenant").map(String::as_str),
            Some("blue")
        );
        // The export is counted where the scrape shows it.
        assert!(
            eventually(WAIT, || async {
                proxy
                    .metric(r#"weft_metrics_exports_total{result="ok"}"#)
                    .await
                    >= 1.0
            })
            .await
        );
    }
}

#[tokio::test]
async fn a_dead_metrics_collector_is_counted_and_costs_no_request() {
    let echo = echo("a").await;
    let dead = {
        let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
        listener.local_addr().unwrap()
    };
    let proxy = ProxyProcess::start(&metrics_exporting(
        echo.local_addr(),
        &format!("http://{dead}"),
        "grpc",
    ))
    .await
    .unwrap();
    let web = proxy.listener("web");
    assert!(
        eventually(WAIT, || async {
            proxy
                .metric(r#"weft_metrics_exports_total{result="failed"}"#)
                .await
                >= 1.0
        })
        .await
    );
    let response = http1_request(web, get(web, "/")).await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn each_tcp_connection_is_a_span_with_its_bytes_and_failure() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = TcpEchoServer::bind(loopback0()).await.unwrap();
    let upstream_addr = upstream.local_addr();
    let closed_addr = unused_address();
    let otlp = receiver().await;
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: db
    address: "127.0.0.1:0"
    protocol: tcp
    cluster: db
    tracing: {{ collector: "{collector}", protocol: grpc, service_name: edge, flush_interval: 20ms }}
  - name: gone
    address: "127.0.0.1:0"
    protocol: tcp
    cluster: gone
    tracing: {{ collector: "{collector}", protocol: grpc, service_name: edge, flush_interval: 20ms }}
clusters:
  - name: db
    endpoints: [{{ address: "{upstream_addr}" }}]
  - name: gone
    endpoints: [{{ address: "{closed_addr}" }}]
"#,
        collector = otlp.grpc_url()
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let mut client = tokio::net::TcpStream::connect(proxy.listener("db"))
        .await
        .unwrap();
    client.write_all(b"0123456789").await.unwrap();
    let mut back = [0u8; 10];
    client.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"0123456789");
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    drop(client);
    let mut refused = tokio::net::TcpStream::connect(proxy.listener("gone"))
        .await
        .unwrap();
    let _ = refused.read_to_end(&mut Vec::new()).await;

    let (spans, complete) = otlp.wait_for(WAIT, |spans| spans.len() >= 2).await;
    assert!(complete, "{spans:#?}");
    let moved = spans
        .iter()
        .find(|s| s.name == "tcp db")
        .unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(moved.kind, "server");
    assert!(moved.parent_span_id.is_empty());
    assert!(!moved.is_error);
    assert_eq!(moved.attribute("network.transport"), Some("tcp"));
    assert_eq!(moved.attribute("weft.listener"), Some("db"));
    assert_eq!(moved.attribute("weft.cluster"), Some("db"));
    assert_eq!(moved.attribute("weft.bytes_received"), Some("10"));
    assert_eq!(moved.attribute("weft.bytes_sent"), Some("10"));
    assert_eq!(moved.attribute("network.peer.address"), Some("127.0.0.1"));
    assert_eq!(
        moved.attribute("server.port"),
        Some(upstream_addr.port().to_string().as_str())
    );
    assert!(moved.end_unix_nanos >= moved.start_unix_nanos);
    let failed = spans
        .iter()
        .find(|s| s.name == "tcp gone")
        .unwrap_or_else(|| panic!("{spans:#?}"));
    assert!(failed.is_error);
    assert_eq!(
        failed.attribute("weft.response_flag"),
        Some("upstream_connect_failure")
    );
    assert_eq!(failed.events, vec!["upstream_connect_failure".to_owned()]);
    assert_eq!(failed.attribute("weft.bytes_received"), Some("0"));
}
