//! Resilience end to end: retries hide failing attempts from the client,
//! only where the policy and the method allow, and the retry budget bounds
//! what a failing upstream receives, counted at the upstream; endpoints
//! that fail their active health checks or misbehave are taken out of
//! rotation.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http_body_util::Full;
use weft_tests::*;

/// One route to the echo server with `retry` as its retry policy.
fn config(echo: std::net::SocketAddr, retry: &str, access_log: &std::path::Path) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
access_log: {{ path: "{log}" }}
listeners:
  - {{ name: web, address: "127.0.0.1:0", route_config: main }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: api
            cluster: echo
            retry_policy: {retry}
clusters:
  - name: echo
    endpoints: [{{ address: "{echo}" }}]
"#,
        log = access_log.display()
    )
}

fn request(
    web: std::net::SocketAddr,
    method: &str,
    knobs: &[(&str, &str)],
    body: &'static str,
) -> http::Request<Full<Bytes>> {
    let mut builder = http::Request::builder()
        .method(method)
        .uri("/api")
        .header(http::header::HOST, web.to_string())
        .header("x-echo-headers", "1")
        // Only the proxy counts attempts.
        .header("x-weft-attempt-count", "9");
    for (name, value) in knobs {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test]
async fn retries_hide_failed_attempts_for_idempotent_requests_only() {
    let echo = echo("flaky").await;
    let dir = TempDir::new().unwrap();
    let log = dir.path().join("access.log");
    let proxy = ProxyProcess::start(&config(
        echo.local_addr(),
        "{ retry_on: [5xx], num_retries: 2 }",
        &log,
    ))
    .await
    .unwrap();
    let web = proxy.listener("web");
    // Every second request carrying the knob fails with 500: each failed
    // attempt is sent again, with its body, and the client sees none.
    let fail_every = [("x-echo-fail-every", "2")];
    let mut attempts = Vec::new();
    for _ in 0..10 {
        let response = http1_request(web, request(web, "PUT", &fail_every, "payload"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        attempts.push(header(&response, "x-echo-req-x-weft-attempt-count").to_owned());
        assert_eq!(body_bytes(response).await.unwrap(), "payload");
    }
    // The knob's counter: requests 2, 4, 6 ... fail, so the first answer
    // succeeds at once, the second at its second attempt, and so on.
    assert_eq!(attempts[0], "1");
    assert!(attempts.iter().any(|a| a == "2"), "{attempts:?}");
    assert!(
        attempts.iter().all(|a| a == "1" || a == "2"),
        "{attempts:?}"
    );
    // Each answer at a second attempt is one retry.
    let retried = attempts.iter().filter(|a| *a == "2").count();
    assert_eq!(
        proxy
            .metric("weft_upstream_retries_total{cluster=\"echo\"}")
            .await,
        retried as f64
    );

    // POST is not idempotent: its failure goes back to the client.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let response = http1_request(web, request(web, "POST", &fail_every, "x"))
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 500]);

    // The access log says how many attempts a retried request took.
    let logged = eventually(DEADLINE, || async {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("\"attempts\":2"))
    })
    .await;
    assert!(logged, "{:?}", std::fs::read_to_string(&log));
}

#[tokio::test]
async fn the_budget_bounds_what_a_failing_upstream_receives() {
    let echo = echo("down").await;
    let dir = TempDir::new().unwrap();
    let proxy = ProxyProcess::start(&config(
        echo.local_addr(),
        "{ num_retries: 3, budget: { ratio: 0.2, min_per_second: 0 } }",
        &dir.path().join("access.log"),
    ))
    .await
    .unwrap();
    let web = proxy.listener("web");
    let before = echo.requests_served();
    let sent = 100;
    for _ in 0..sent {
        let response = http1_request(web, request(web, "GET", &[("x-echo-status", "503")], ""))
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
    }
    // Without a budget, 400 attempts; with it, at most 20 % more than the
    // requests.
    let received = echo.requests_served() - before;
    assert!(
        received > sent && received <= sent + sent / 5,
        "{received} requests at the upstream for {sent}"
    );
    assert!(
        proxy
            .metric("weft_upstream_retries_budget_exhausted_total{cluster=\"echo\"}")
            .await
            >= 70.0
    );
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_retries_hide_its_failures() {
    let (a, b) = (echo("a").await, echo("b").await);
    // An address nothing listens on: every connect is refused.
    let dead = unused_address();
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - {{ name: web, address: "127.0.0.1:0", route_config: main }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: api
            cluster: pool
            retry_policy: {{ retry_on: [gateway_error], num_retries: 2 }}
clusters:
  - name: pool
    endpoints: [{{ address: "{a}" }}, {{ address: "{b}" }}, {{ address: "{dead}" }}]
    outlier_detection: {{ consecutive_gateway_errors: 2, base_ejection_time: 60s }}
"#,
        a = a.local_addr(),
        b = b.local_addr(),
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let web = proxy.listener("web");
    for _ in 0..30 {
        let response = http1_request(web, get(web, "/")).await.unwrap();
        assert_eq!(response.status(), 200, "retries hide the dead endpoint");
    }
    // Two refused connects ejected it; none since.
    assert_eq!(
        proxy
            .metric("weft_upstream_outlier_ejections_total{cluster=\"pool\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("weft_upstream_connect_failures_total{cluster=\"pool\"}")
            .await,
        2.0
    );
    let (_, clusters) = proxy.admin_get("/clusters").await.unwrap();
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let endpoints = clusters[0]["endpoints"].as_array().unwrap();
    let dead_view = endpoints
        .iter()
        .find(|e| e["address"] == dead.to_string().as_str())
        .unwrap();
    assert_eq!(dead_view["health"], "ejected", "{clusters}");
    assert!(dead_view["ejected_for_ms"].as_u64().unwrap() > 50_000);
    assert_eq!(dead_view["ejections"], 1);
    assert!(
        endpoints
            .iter()
            .filter(|e| e["health"] == "healthy")
            .count()
            == 2
    );
}

#[tokio::test]
async fn a_tcp_listener_ejects_an_endpoint_whose_connects_fail() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let live = echo("tcp-live").await;
    let dead = unused_address();
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - {{ name: db, address: "127.0.0.1:0", protocol: tcp, cluster: pool }}
clusters:
  - name: pool
    lb: round_robin
    endpoints: [{{ address: "{live}" }}, {{ address: "{dead}" }}]
    outlier_detection: {{ consecutive_gateway_errors: 2, base_ejection_time: 60s }}
"#,
        live = live.local_addr(),
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let db = proxy.listener("db");
    // One connection's exchange: true when the upstream answered.
    let exchange = || async move {
        let mut stream = tokio::net::TcpStream::connect(db).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: db\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer)).await;
        answer.starts_with(b"HTTP/1.1 200")
    };
    let mut refused = 0;
    for _ in 0..20 {
        if !exchange().await {
            refused += 1;
        }
    }
    // The dead endpoint took two connections (round robin: every other
    // one) before it was ejected; every one since went to the live one.
    assert_eq!(refused, 2);
    assert_eq!(
        proxy
            .metric("weft_upstream_outlier_ejections_total{cluster=\"pool\"}")
            .await,
        1.0
    );
    let dead_view = endpoint_view(&proxy, dead).await;
    assert_eq!(dead_view["health"], "ejected", "{dead_view}");
}

#[tokio::test]
async fn a_tcp_listener_holds_its_connections_against_the_clusters_max_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = echo("tcp-limited").await;
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - {{ name: db, address: "127.0.0.1:0", protocol: tcp, cluster: pool }}
clusters:
  - name: pool
    endpoints: [{{ address: "{}" }}]
    circuit_breakers: {{ max_connections: 1 }}
"#,
        echo.local_addr(),
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let db = proxy.listener("db");
    // A keep-alive exchange on the first connection: it holds the slot.
    let request = b"GET / HTTP/1.1\r\nhost: db\r\n\r\n";
    let mut first = tokio::net::TcpStream::connect(db).await.unwrap();
    first.write_all(request).await.unwrap();
    let mut head = [0u8; 12];
    first.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // A second one is refused at once, not queued: reset, which may
    // reach the client while its connect completes.
    let mut answer = Vec::new();
    if let Ok(mut second) = tokio::net::TcpStream::connect(db).await {
        let _ = second.write_all(request).await;
        let _ = tokio::time::timeout(DEADLINE, second.read_to_end(&mut answer)).await;
    }
    assert!(answer.is_empty(), "{answer:?}");
    assert_eq!(
        proxy
            .metric("weft_upstream_connections_overflow_total{cluster=\"pool\"}")
            .await,
        1.0
    );
    assert_eq!(echo.requests_served(), 1);
    // The first one closed, its slot is free again.
    drop(first);
    assert!(
        eventually(DEADLINE, || async {
            proxy
                .metric("weft_upstream_connections_active{cluster=\"pool\"}")
                .await
                == 0.0
        })
        .await
    );
    let mut third = tokio::net::TcpStream::connect(db).await.unwrap();
    third.write_all(request).await.unwrap();
    third.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cluster_sheds_load_at_once_with_503_upstream_overflow() {
    let echo = echo("slow").await;
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - {{ name: web, address: "127.0.0.1:0", route_config: main }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ name: api, cluster: echo }}]
clusters:
  - name: echo
    endpoints: [{{ address: "{echo}" }}]
    circuit_breakers: {{ max_requests: 2 }}
"#,
        echo = echo.local_addr()
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let web = proxy.listener("web");
    // Five at once, each held 1 s by the upstream: two are in flight, the
    // other three are refused without waiting.
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn(async move {
                let response =
                    http1_request(web, request(web, "GET", &[("x-echo-delay-ms", "1000")], ""))
                        .await
                        .unwrap();
                (
                    response.status().as_u16(),
                    header(&response, "x-weft-error").to_owned(),
                    std::time::Instant::now(),
                )
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.unwrap());
    }
    let refused: Vec<_> = outcomes.iter().filter(|(s, _, _)| *s == 503).collect();
    assert_eq!(refused.len(), 3, "{outcomes:?}");
    for (_, flag, at) in &refused {
        assert_eq!(flag, "upstream_overflow");
        assert!(at.duration_since(started) < std::time::Duration::from_millis(900));
    }
    assert_eq!(outcomes.iter().filter(|(s, _, _)| *s == 200).count(), 2);
    assert_eq!(
        proxy
            .metric("weft_upstream_overflow_total{cluster=\"echo\"}")
            .await,
        3.0
    );
    // Nothing is in flight any more, and /clusters says so.
    let (_, clusters) = proxy.admin_get("/clusters").await.unwrap();
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    assert_eq!(clusters[0]["circuit_breakers"]["max_requests"], 2);
    assert_eq!(clusters[0]["circuit_breakers"]["requests_active"], 0);
}

/// A cluster `pool` over `endpoints`, with `extra` (YAML lines at the
/// cluster's indentation) added, behind one route.
fn pool_config(endpoints: &[std::net::SocketAddr], extra: &str) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect();
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - {{ name: web, address: "127.0.0.1:0", route_config: main }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ name: api, cluster: pool }}]
clusters:
  - name: pool
    endpoints: [{endpoints}]
{extra}
"#,
        endpoints = endpoints.join(", ")
    )
}

/// The `/clusters` entry of the endpoint at `addr` in the first cluster.
async fn endpoint_view(proxy: &ProxyProcess, addr: std::net::SocketAddr) -> serde_json::Value {
    let (_, clusters) = proxy.admin_get("/clusters").await.unwrap();
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    clusters[0]["endpoints"]
        .as_array()
        .and_then(|endpoints| {
            endpoints
                .iter()
                .find(|e| e["address"] == addr.to_string().as_str())
                .cloned()
        })
        .unwrap_or_default()
}

/// Waits until `/clusters` shows `health` (and `last_check`) for `addr`.
async fn await_health(
    proxy: &ProxyProcess,
    addr: std::net::SocketAddr,
    health: &str,
    last_check: &str,
) {
    let reached = eventually(DEADLINE, || async {
        let view = endpoint_view(proxy, addr).await;
        view["health"] == health && view["last_check"] == last_check
    })
    .await;
    assert!(
        reached,
        "{addr}: want {health} ({last_check}), have {}",
        endpoint_view(proxy, addr).await
    );
}

/// The servers that answered `count` requests through `web`.
async fn answered_by(web: std::net::SocketAddr, count: usize) -> Vec<String> {
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        let response = http1_request(web, get(web, "/")).await.unwrap();
        assert_eq!(response.status(), 200);
        names.push(header(&response, "x-echo-server").to_owned());
    }
    names
}

#[tokio::test]
async fn an_endpoint_failing_its_http_health_check_gets_no_traffic_until_it_recovers() {
    let (a, b) = (echo("a").await, echo("b").await);
    let proxy = ProxyProcess::start(&pool_config(
        &[a.local_addr(), b.local_addr()],
        "    health_check: { http: { path: /healthz }, interval: 50ms, healthy_threshold: 2, unhealthy_threshold: 2 }",
    ))
    .await
    .unwrap();
    let web = proxy.listener("web");
    await_health(&proxy, b.local_addr(), "healthy", "ok").await;
    // Two failed probes in a row take it out.
    b.set_healthy(false);
    await_health(&proxy, b.local_addr(), "unhealthy", "status 503").await;
    await_health(&proxy, a.local_addr(), "healthy", "ok").await;
    let names = answered_by(web, 20).await;
    assert!(names.iter().all(|n| n == "a"), "{names:?}");
    assert_eq!(
        proxy
            .metric("weft_upstream_endpoints_healthy{cluster=\"pool\"}")
            .await,
        1.0
    );
    assert!(
        proxy
            .metric("weft_upstream_health_checks_total{cluster=\"pool\",result=\"failure\"}")
            .await
            >= 1.0
    );

    // Recovered: two passed probes in a row bring it back into rotation.
    b.set_healthy(true);
    await_health(&proxy, b.local_addr(), "healthy", "ok").await;
    let names = answered_by(web, 20).await;
    assert!(names.iter().any(|n| n == "b"), "{names:?}");
    assert!(names.iter().any(|n| n == "a"), "{names:?}");
    let healthy = eventually(DEADLINE, || async {
        proxy
            .metric("weft_upstream_endpoints_healthy{cluster=\"pool\"}")
            .await
            == 2.0
    })
    .await;
    assert!(healthy);
    // Probes are not requests: the request path's counters did not move.
    assert_eq!(
        proxy
            .metric("weft_upstream_requests_total{cluster=\"pool\"}")
            .await,
        40.0
    );
}

#[tokio::test]
async fn grpc_and_tcp_health_checks_say_why_an_endpoint_is_out() {
    let (a, b) = (echo("a").await, echo("b").await);
    b.set_healthy(false);
    // An address nothing listens on: every connect is refused.
    let dead = unused_address();
    // gRPC: `b` answers NOT_SERVING; one healthy endpoint of three is
    // enough with a panic threshold of 0.
    let proxy = ProxyProcess::start(&pool_config(
        &[a.local_addr(), b.local_addr(), dead],
        "    health_check: { grpc: {}, interval: 50ms, unhealthy_threshold: 1 }\n    outlier_detection: { panic_threshold: 0 }",
    ))
    .await
    .unwrap();
    let web = proxy.listener("web");
    await_health(&proxy, b.local_addr(), "unhealthy", "NOT_SERVING").await;
    await_health(&proxy, dead, "unhealthy", "connect refused").await;
    await_health(&proxy, a.local_addr(), "healthy", "ok").await;
    let names = answered_by(web, 12).await;
    assert!(names.iter().all(|n| n == "a"), "{names:?}");
    b.set_healthy(true);
    await_health(&proxy, b.local_addr(), "healthy", "ok").await;

    // TCP: a connection is all it takes.
    let proxy = ProxyProcess::start(&pool_config(
        &[a.local_addr(), dead],
        "    health_check: { tcp: {}, interval: 50ms }",
    ))
    .await
    .unwrap();
    let web = proxy.listener("web");
    await_health(&proxy, dead, "unhealthy", "connect refused").await;
    await_health(&proxy, a.local_addr(), "healthy", "ok").await;
    let names = answered_by(web, 10).await;
    assert!(names.iter().all(|n| n == "a"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_connections_wait_and_beyond_max_pending_are_refused() {
    let echo = echo("slow").await;
    let proxy = ProxyProcess::start(&pool_config(
        &[echo.local_addr()],
        "    circuit_breakers: { max_connections: 1, max_pending_requests: 1 }",
    ))
    .await
    .unwrap();
    let web = proxy.listener("web");
    // Three at once, each held 500 ms by the upstream, over one upstream
    // connection: one is sent, one waits for that connection, the third
    // is refused without waiting.
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(async move {
                let response =
                    http1_request(web, request(web, "GET", &[("x-echo-delay-ms", "500")], ""))
                        .await
                        .unwrap();
                (
                    response.status().as_u16(),
                    header(&response, "x-weft-error").to_owned(),
                    started.elapsed(),
                )
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.unwrap());
    }
    outcomes.sort_by_key(|(_, _, at)| *at);
    let (status, flag, at) = &outcomes[0];
    assert_eq!(
        (*status, flag.as_str()),
        (503, "upstream_overflow"),
        "{outcomes:?}"
    );
    assert!(*at < std::time::Duration::from_millis(450), "{outcomes:?}");
    // The waiting one went after the first, on the same connection.
    assert_eq!(outcomes[1].0, 200, "{outcomes:?}");
    assert_eq!(outcomes[2].0, 200, "{outcomes:?}");
    assert!(
        outcomes[2].2 >= std::time::Duration::from_millis(1000),
        "{outcomes:?}"
    );
    for (series, want) in [
        (
            "weft_upstream_pending_overflow_total{cluster=\"pool\"}",
            1.0,
        ),
        (
            "weft_upstream_connections_overflow_total{cluster=\"pool\"}",
            2.0,
        ),
        ("weft_upstream_connections_total{cluster=\"pool\"}", 1.0),
        ("weft_upstream_requests_pending{cluster=\"pool\"}", 0.0),
        ("weft_upstream_connections_held{cluster=\"pool\"}", 1.0),
    ] {
        assert_eq!(proxy.metric(series).await, want, "{series}");
    }
    let (_, clusters) = proxy.admin_get("/clusters").await.unwrap();
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let breakers = &clusters[0]["circuit_breakers"];
    assert_eq!(breakers["max_connections"], 1, "{breakers}");
    assert_eq!(breakers["connections_active"], 1, "{breakers}");
    assert_eq!(breakers["remaining_connections"], 0, "{breakers}");
    assert_eq!(breakers["max_pending_requests"], 1, "{breakers}");
    assert_eq!(breakers["remaining_pending_requests"], 1, "{breakers}");
}
