//! Chaos end to end: faults injected on purpose hit their configured share,
//! rate limits admit their configured rate, and with retries and outlier
//! detection on, a cluster of three endpoints in which one dies, one
//! stalls or one flaps serves every idempotent request.
//!
//! The upstreams here are small hyper servers whose behaviour the test
//! switches while load runs (the echo server's knobs are per request; these
//! are per endpoint).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_tests::*;

/// How an [`Upstream`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// 200 at once.
    Healthy = 0,
    /// 200 after two seconds.
    Stalled = 1,
    /// 503 at once.
    Failing = 2,
    /// 200 and a first chunk of body at once, then nothing.
    StuckBody = 3,
}

/// A response body: whole, or one chunk and then silence.
enum TestBody {
    Full(Option<Bytes>),
    Stuck { sent: bool },
}

impl http_body::Body for TestBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        match &mut *self {
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(http_body::Frame::data(d)))),
            Self::Stuck { sent: true } => Poll::Pending,
            Self::Stuck { sent } => {
                *sent = true;
                Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                    b"first",
                )))))
            }
        }
    }
}

/// An HTTP/1.1 upstream whose behaviour the test switches.
struct Upstream {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    mode: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let mode = Arc::new(AtomicU8::new(Mode::Healthy as u8));
        let task = {
            let (served, mode) = (served.clone(), mode.clone());
            tokio::spawn(async move {
                // Connections live in this set: aborting the accept task
                // drops it, which kills every connection (a dead process).
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (served, mode) = (served.clone(), mode.clone());
                    connections.spawn(async move {
                        let service = service_fn(move |_req| {
                            let (served, mode) = (served.clone(), mode.clone());
                            async move {
                                served.fetch_add(1, Relaxed);
                                let ok = || TestBody::Full(Some(Bytes::from_static(b"ok")));
                                let (status, body) = match mode.load(Relaxed) {
                                    1 => {
                                        tokio::time::sleep(Duration::from_secs(2)).await;
                                        (200, ok())
                                    }
                                    2 => (503, ok()),
                                    3 => (200, TestBody::Stuck { sent: false }),
                                    _ => (200, ok()),
                                };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder().status(status).body(body).unwrap(),
                                )
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        Self {
            addr,
            served,
            mode,
            task,
        }
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Relaxed);
    }

    /// Stops accepting and drops every connection, as a killed process.
    fn kill(&self) {
        self.task.abort();
    }

    fn served(&self) -> u64 {
        self.served.load(Relaxed)
    }
}

/// A proxy with one route (`route_extra` added to it) to `endpoints`, and
/// `cluster_extra` added to the cluster.
async fn proxy(endpoints: &[SocketAddr], route_extra: &str, cluster_extra: &str) -> ProxyProcess {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect();
    ProxyProcess::start(&format!(
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
            cluster: app
            {route_extra}
clusters:
  - name: app
    endpoints: [{endpoints}]
    {cluster_extra}
"#,
        endpoints = endpoints.join(", ")
    ))
    .await
    .unwrap()
}

/// Retries of everything an endpoint can do wrong, short per-try timeouts,
/// and outlier detection that ejects after three gateway errors.
const RESILIENT_ROUTE: &str = "retry_policy: { retry_on: [gateway_error, connect_failure, reset], num_retries: 3, per_try_timeout: 250ms, backoff_base: 5ms, backoff_max: 20ms, budget: { ratio: 1.0, min_per_second: 1000 } }";
const EJECTING_CLUSTER: &str = "outlier_detection: { consecutive_gateway_errors: 3, base_ejection_time: 30s }\n    circuit_breakers: { max_retries: 64 }";
/// Retries in flight are capped at 3 by default (as Envoy's are): more
/// clients than that retrying at once need a higher cap.
const RETRY_ROOM: &str = "circuit_breakers: { max_retries: 64 }";

/// Sends `total` GETs from `clients` concurrent keep-alive clients; calls
/// `midway` once after a third of them. Returns the statuses that were
/// not 200 (with the error for requests that got no response).
async fn load(web: SocketAddr, clients: usize, total: usize, midway: impl FnOnce()) -> Vec<String> {
    let sent = Arc::new(AtomicU64::new(0));
    let total = total as u64;
    let (third_tx, third_rx) = tokio::sync::oneshot::channel::<()>();
    let third_tx = Arc::new(std::sync::Mutex::new(Some(third_tx)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (sent, third_tx) = (sent.clone(), third_tx.clone());
        tasks.spawn(async move {
            let mut failures = Vec::new();
            let mut sender = http1_connect::<Full<Bytes>>(web).await.unwrap();
            loop {
                let n = sent.fetch_add(1, Relaxed);
                if n >= total {
                    return failures;
                }
                if n == total / 3
                    && let Some(tx) = third_tx.lock().unwrap().take()
                {
                    let _ = tx.send(());
                }
                let sent = match sender.ready().await {
                    Ok(()) => sender.send_request(get(web, "/api")).await,
                    Err(error) => Err(error),
                };
                match sent {
                    Ok(response) if response.status() == 200 => {
                        let _ = body_bytes(response).await;
                    }
                    Ok(response) => failures.push(format!(
                        "{} {}",
                        response.status(),
                        header(&response, "x-weft-error")
                    )),
                    Err(error) => {
                        failures.push(format!("no response: {error}"));
                        sender = http1_connect::<Full<Bytes>>(web).await.unwrap();
                    }
                }
            }
        });
    }
    if tokio::time::timeout(DEADLINE, third_rx).await.is_ok() {
        midway();
    }
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        failures.extend(result.unwrap());
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_mid_load_costs_no_request() {
    let upstreams = [
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    ];
    let addrs: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    let proxy = proxy(&addrs, RESILIENT_ROUTE, EJECTING_CLUSTER).await;
    let failures = load(proxy.listener("web"), 4, 600, || upstreams[0].kill()).await;
    assert!(failures.is_empty(), "{failures:?}");
    // The dead endpoint got traffic before it died, the others after.
    assert!(upstreams[0].served() > 0);
    assert!(upstreams[1].served() + upstreams[2].served() >= 400);
    let ejections = proxy
        .metric("weft_upstream_outlier_ejections_total{cluster=\"app\"}")
        .await;
    assert!(ejections >= 1.0, "the dead endpoint is ejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_endpoint_is_timed_out_and_retried_elsewhere() {
    let upstreams = [
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    ];
    upstreams[1].set(Mode::Stalled);
    let addrs: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    let proxy = proxy(&addrs, RESILIENT_ROUTE, EJECTING_CLUSTER).await;
    let start = Instant::now();
    let failures = load(proxy.listener("web"), 4, 300, || {}).await;
    assert!(failures.is_empty(), "{failures:?}");
    // Three per-try timeouts eject the stalled endpoint: few requests
    // wait for it, and none for long.
    assert!(upstreams[1].served() <= 10, "{}", upstreams[1].served());
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert!(
        proxy
            .metric("weft_upstream_retries_total{cluster=\"app\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_endpoint_costs_no_request() {
    let upstreams = [
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    ];
    let addrs: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    // No ejection: the flapping endpoint keeps its share, and retries
    // alone hide its failures.
    let proxy = proxy(&addrs, RESILIENT_ROUTE, RETRY_ROOM).await;
    let web = proxy.listener("web");
    let flapping = &upstreams[2];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flapper = {
        let (mode, stop) = (flapping.mode.clone(), stop.clone());
        tokio::spawn(async move {
            let mut failing = false;
            while !stop.load(Relaxed) {
                failing = !failing;
                let next = if failing {
                    Mode::Failing
                } else {
                    Mode::Healthy
                };
                mode.store(next as u8, Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let failures = load(web, 4, 600, || {}).await;
    stop.store(true, Relaxed);
    flapper.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(flapping.served() > 0);
    assert!(
        proxy
            .metric("weft_upstream_retries_total{cluster=\"app\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn the_route_timeout_fires_within_tolerance() {
    let upstream = Upstream::start().await;
    upstream.set(Mode::Stalled);
    let proxy = proxy(&[upstream.addr], "timeout: 300ms", "").await;
    let web = proxy.listener("web");
    let start = Instant::now();
    let response = http1_request(web, get(web, "/api")).await.unwrap();
    let took = start.elapsed();
    assert_eq!(response.status(), 504);
    assert_eq!(header(&response, "x-weft-error"), "upstream_timeout");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(900),
        "{took:?}"
    );
    // A gRPC caller's shorter `grpc-timeout` wins, and it gets
    // DEADLINE_EXCEEDED.
    let grpc = http::Request::builder()
        .uri("/api")
        .header(http::header::HOST, "x")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "100m")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let start = Instant::now();
    let response = http1_request(web, grpc).await.unwrap();
    let took = start.elapsed();
    assert_eq!(header(&response, "grpc-status"), "4");
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(290),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_stream_idle_timeout_cuts_a_response_that_stops_moving() {
    use http_body_util::BodyExt;
    let upstream = Upstream::start().await;
    upstream.set(Mode::StuckBody);
    let proxy = proxy(
        &[upstream.addr],
        "timeout: 0s\n            stream_idle_timeout: 300ms",
        "",
    )
    .await;
    let web = proxy.listener("web");
    let start = Instant::now();
    let response = http1_request(web, get(web, "/api")).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "first");
    // Then nothing: the proxy ends the response rather than hold it open.
    let end = tokio::time::timeout(DEADLINE, body.frame()).await.unwrap();
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let counted = eventually(DEADLINE, || async {
        proxy
            .metric("weft_http_stream_idle_timeouts_total{listener=\"web\",route=\"api\",cluster=\"app\"}")
            .await
            == 1.0
    })
    .await;
    assert!(counted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborts_and_delays_hit_their_configured_share() {
    let upstream = Upstream::start().await;
    let proxy = proxy(
        &[upstream.addr],
        "fault: { abort: { http_status: 503, percent: 20 }, delay: { duration: 20ms, percent: 10 } }",
        "",
    )
    .await;
    let web = proxy.listener("web");
    let mut sender = http1_connect::<Full<Bytes>>(web).await.unwrap();
    let (mut aborted, mut slow) = (0u32, 0u32);
    let n = 400;
    for _ in 0..n {
        let start = Instant::now();
        sender.ready().await.unwrap();
        let response = sender.send_request(get(web, "/api")).await.unwrap();
        let took = start.elapsed();
        match response.status().as_u16() {
            200 => {}
            503 => {
                assert_eq!(header(&response, "x-weft-error"), "fault_abort");
                aborted += 1;
            }
            other => panic!("unexpected status {other}"),
        }
        let _ = body_bytes(response).await;
        if took >= Duration::from_millis(20) {
            slow += 1;
        }
    }
    // 400 requests: 20 % aborted is 80 (sd 8), 10 % delayed is 40 (sd 6);
    // bounds at about five standard deviations.
    assert!((40..=120).contains(&aborted), "{aborted} aborted");
    let delayed = proxy
        .metric("weft_http_faults_injected_total{listener=\"web\",route=\"api\",cluster=\"app\",fault=\"delay\"}")
        .await;
    assert!((10.0..=70.0).contains(&delayed), "{delayed} delayed");
    // Every delayed request took at least the delay (a slow machine may
    // add others).
    assert!(f64::from(slow) >= delayed, "{slow} slow, {delayed} delayed");
    let counted = proxy
        .metric("weft_http_faults_injected_total{listener=\"web\",route=\"api\",cluster=\"app\",fault=\"abort\"}")
        .await;
    assert_eq!(counted, f64::from(aborted));
    // Aborted requests never reached the upstream.
    assert_eq!(upstream.served(), u64::from(n - aborted));
}

#[tokio::test]
async fn requests_ask_for_faults_only_on_routes_that_allow_it() {
    let echo = echo("e").await;
    let proxy = ProxyProcess::start(&format!(
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
          - {{ name: chaos, match: {{ prefix: /chaos }}, cluster: echo, fault: {{ allow_header_faults: true }} }}
          - {{ name: plain, cluster: echo }}
clusters:
  - {{ name: echo, endpoints: [{{ address: "{}" }}] }}
"#,
        echo.local_addr()
    ))
    .await
    .unwrap();
    let web = proxy.listener("web");
    let ask = |path: &str| {
        http::Request::builder()
            .uri(path)
            .header(http::header::HOST, "x")
            .header("x-weft-fault-abort", "418")
            .header("x-weft-fault-delay", "50")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let start = Instant::now();
    let response = http1_request(web, ask("/chaos")).await.unwrap();
    assert_eq!(response.status(), 418);
    assert_eq!(header(&response, "x-weft-error"), "fault_abort");
    assert!(start.elapsed() >= Duration::from_millis(50));
    let response = http1_request(web, ask("/plain")).await.unwrap();
    assert_eq!(response.status(), 200, "the route does not allow it");
    assert_eq!(echo.requests_served(), 1);
}

#[tokio::test]
async fn a_route_rate_limit_admits_its_rate_and_says_when_to_retry() {
    let upstream = Upstream::start().await;
    let proxy = proxy(
        &[upstream.addr],
        "rate_limit: { requests_per_second: 50, burst: 5 }",
        "",
    )
    .await;
    let web = proxy.listener("web");
    let mut sender = http1_connect::<Full<Bytes>>(web).await.unwrap();
    let start = Instant::now();
    let (mut admitted, mut limited) = (0u32, 0u32);
    // Asking as fast as one connection can for a bounded 1.5 s.
    while start.elapsed() < Duration::from_millis(1500) {
        sender.ready().await.unwrap();
        let response = sender.send_request(get(web, "/api")).await.unwrap();
        match response.status().as_u16() {
            200 => admitted += 1,
            429 => {
                assert_eq!(header(&response, "retry-after"), "1");
                assert_eq!(header(&response, "x-weft-error"), "rate_limited");
                limited += 1;
            }
            other => panic!("unexpected status {other}"),
        }
        let _ = body_bytes(response).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The burst plus 50 per second: never more, and (the client asking
    // far faster) not much less.
    let allowed = 5.0 + 50.0 * elapsed;
    assert!(
        f64::from(admitted) <= allowed + 1.0,
        "{admitted} > {allowed}"
    );
    assert!(
        f64::from(admitted) >= allowed * 0.8,
        "{admitted} < {allowed}"
    );
    assert!(limited > 0);
    assert_eq!(
        proxy
            .metric("weft_http_rate_limited_total{listener=\"web\",route=\"api\",cluster=\"app\"}")
            .await,
        f64::from(limited)
    );
}

/// One HTTP/1.1 GET from a chosen loopback address; the status code.
async fn get_from(source: [u8; 4], web: SocketAddr) -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let mut stream = socket.connect(web).await.unwrap();
    stream
        .write_all(b"GET /api HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_per_client_limit_on_a_listener_limits_each_client_alone() {
    let upstream = Upstream::start().await;
    let proxy = ProxyProcess::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: web
    address: "127.0.0.1:0"
    route_config: main
    rate_limit: {{ per_client: {{ requests_per_second: 0.01, burst: 3 }} }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ name: api, cluster: app }}]
clusters:
  - {{ name: app, endpoints: [{{ address: "{}" }}] }}
"#,
        upstream.addr
    ))
    .await
    .unwrap();
    let web = proxy.listener("web");
    let mut first = Vec::new();
    for _ in 0..5 {
        first.push(get_from([127, 0, 0, 1], web).await);
    }
    assert_eq!(first, [200, 200, 200, 429, 429]);
    // Another client address has its own bucket.
    let mut second = Vec::new();
    for _ in 0..4 {
        second.push(get_from([127, 0, 0, 2], web).await);
    }
    assert_eq!(second, [200, 200, 200, 429]);
    assert_eq!(
        proxy
            .metric("weft_downstream_rate_limited_total{listener=\"web\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn tcp_faults_reset_or_delay_connections() {
    let echo = echo("tcp").await;
    let config = |fault: &str| {
        format!(
            r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - {{ name: raw, address: "127.0.0.1:0", protocol: tcp, cluster: echo, fault: {fault} }}
clusters:
  - {{ name: echo, endpoints: [{{ address: "{}" }}] }}
"#,
            echo.local_addr()
        )
    };
    let proxy = ProxyProcess::start(&config("{ reset_percent: 100 }"))
        .await
        .unwrap();
    let raw = proxy.listener("raw");
    for _ in 0..3 {
        assert_connection_refused(raw).await;
    }
    assert_eq!(
        proxy
            .metric("weft_downstream_faults_reset_total{listener=\"raw\"}")
            .await,
        3.0
    );
    assert_eq!(echo.requests_served(), 0);

    let proxy = ProxyProcess::start(&config("{ delay: { duration: 200ms } }"))
        .await
        .unwrap();
    let raw = proxy.listener("raw");
    let start = Instant::now();
    let response = http1_request(raw, get(raw, "/")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(
        proxy
            .metric("weft_downstream_faults_delayed_total{listener=\"raw\"}")
            .await,
        1.0
    );
}
