use std::sync::atomic::AtomicU64;

use http::HeaderValue;
use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::config::{Config, IdentityMatch};

fn route_fault(yaml_fault: &str) -> config::Fault {
    let yaml = format!(
        r#"
listeners: [{{ name: web, address: "127.0.0.1:0", route_config: rc }}]
route_configs:
  - name: rc
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ name: r, cluster: c, fault: {yaml_fault} }}]
clusters: [{{ name: c, endpoints: [{{ address: "127.0.0.1:1" }}] }}]
"#
    );
    let config = Config::from_yaml(&yaml, "test").unwrap();
    let route = &config.route_configs[0].virtual_hosts[0].routes[0];
    (**route.fault.as_ref().unwrap()).clone()
}

/// Uniform draws in `0..1_000_000`, the same on every run.
fn seeded_draws() -> impl FnMut() -> u32 {
    let mut rng = fastrand::Rng::with_seed(7);
    move || rng.u32(..1_000_000)
}

#[test]
fn configured_faults_hit_their_share_of_requests() {
    let fault = route_fault(
        "{ delay: { duration: 10ms, percent: 25 }, abort: { http_status: 503, percent: 10 } }",
    );
    let headers = HeaderMap::new();
    let mut draw = seeded_draws();
    let (mut delayed, mut aborted) = (0, 0);
    for _ in 0..10_000 {
        let plan = plan(&fault, &headers, None, &mut draw);
        delayed += usize::from(plan.delay.is_some());
        aborted += usize::from(plan.abort.is_some());
    }
    // 10 000 draws: each share within about three standard deviations.
    assert!((2_370..=2_630).contains(&delayed), "{delayed}");
    assert!((910..=1_090).contains(&aborted), "{aborted}");
}

#[test]
fn faults_apply_only_to_matching_requests_and_callers() {
    let fault = route_fault(
        r#"{ abort: { http_status: 500 }, headers: [{ name: x-chaos, exact: "on" }], source_identities: ["spiffe://td/ns/frontend"] }"#,
    );
    let mut headers = HeaderMap::new();
    let frontend = Some("spiffe://td/ns/frontend");
    assert!(plan(&fault, &headers, frontend, || 0).is_empty());
    headers.insert("x-chaos", HeaderValue::from_static("on"));
    assert!(plan(&fault, &headers, None, || 0).is_empty());
    assert!(plan(&fault, &headers, Some("spiffe://td/ns/other"), || 0).is_empty());
    let hit = plan(&fault, &headers, frontend, || 0);
    assert_eq!(hit.abort.unwrap().status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(fault.source_identities.len(), 1);
    assert!(matches!(
        fault.source_identities[0],
        IdentityMatch::Exact(_)
    ));
}

#[test]
fn requests_ask_for_faults_only_where_the_route_allows_it() {
    let mut headers = HeaderMap::new();
    headers.insert(&DELAY_HEADER, HeaderValue::from_static("250"));
    headers.insert(&ABORT_HEADER, HeaderValue::from_static("429"));
    let closed = route_fault("{ delay: { duration: 1s, percent: 0 } }");
    assert!(plan(&closed, &headers, None, || 999_999).is_empty());

    let open = route_fault("{ allow_header_faults: true }");
    let asked = plan(&open, &headers, None, || 999_999);
    assert_eq!(asked.delay, Some(Duration::from_millis(250)));
    let abort = asked.abort.unwrap();
    assert_eq!((abort.status.as_u16(), abort.grpc_status), (429, 14));

    // A gRPC status alone; junk and out-of-range values are ignored.
    let mut headers = HeaderMap::new();
    headers.insert(&ABORT_GRPC_HEADER, HeaderValue::from_static("8"));
    headers.insert(&DELAY_HEADER, HeaderValue::from_static("soon"));
    let asked = plan(&open, &headers, None, || 0);
    assert_eq!(asked.delay, None);
    assert_eq!(asked.abort.unwrap().grpc_status, 8);
    headers.insert(&ABORT_GRPC_HEADER, HeaderValue::from_static("17"));
    headers.insert(&ABORT_HEADER, HeaderValue::from_static("99"));
    assert!(plan(&open, &headers, None, || 0).is_empty());
    // A huge delay is capped.
    let mut headers = HeaderMap::new();
    headers.insert(&DELAY_HEADER, HeaderValue::from_static("99999999999"));
    assert_eq!(
        plan(&open, &headers, None, || 0).delay,
        Some(MAX_HEADER_DELAY)
    );
}

fn faulting(fault: config::Fault) -> Arc<Faulting> {
    Arc::new(Faulting {
        faults: Arc::new(RouteFaults::new(Arc::new(fault))),
        metrics: Arc::new(RequestMetrics::default()),
    })
}

type Upstream = tower::util::BoxCloneSyncService<Request<()>, Response<ResponseBody>, ProxyError>;

fn upstream(calls: Arc<AtomicU64>) -> Upstream {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_req: Request<()>| {
        calls.fetch_add(1, Relaxed);
        async { Ok::<_, ProxyError>(Response::new(ResponseBody::empty())) }
    }))
}

#[tokio::test(start_paused = true)]
async fn an_abort_answers_locally_and_a_delay_holds_the_request() {
    let calls = Arc::new(AtomicU64::new(0));
    let state = faulting(route_fault("{ abort: { http_status: 503 } }"));
    let mut svc = FaultLayer::new(Some(state.clone())).layer(upstream(calls.clone()));
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["x-weft-error"], "fault_abort");
    assert_eq!(
        response.extensions().get::<Decision>().unwrap().flag,
        "fault_abort"
    );
    assert_eq!(calls.load(Relaxed), 0, "an aborted request is not sent");
    assert_eq!(state.metrics.faults_aborted.load(Relaxed), 1);

    let grpc = Request::builder()
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let response = svc.ready().await.unwrap().call(grpc).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "14");

    let state = faulting(route_fault("{ delay: { duration: 2s } }"));
    let mut svc = FaultLayer::new(Some(state.clone())).layer(upstream(calls.clone()));
    let start = tokio::time::Instant::now();
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.extensions().get::<Decision>().unwrap().flag,
        "fault_delay"
    );
    assert_eq!(calls.load(Relaxed), 1);
    assert_eq!(state.metrics.faults_delayed.load(Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn faults_beyond_max_active_pass_untouched() {
    let calls = Arc::new(AtomicU64::new(0));
    let state = faulting(route_fault("{ delay: { duration: 10s }, max_active: 2 }"));
    let svc = FaultLayer::new(Some(state.clone())).layer(upstream(calls.clone()));
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move { svc.ready().await.unwrap().call(Request::new(())).await })
        })
        .collect();
    // The three requests past the cap go straight through.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls.load(Relaxed), 3);
    assert_eq!(state.metrics.faults_overflow.load(Relaxed), 3);
    assert_eq!(state.metrics.faults_delayed.load(Relaxed), 2);
    for request in requests {
        request.await.unwrap().unwrap();
    }
    assert_eq!(calls.load(Relaxed), 5);
    assert_eq!(state.faults.active.load(Relaxed), 0, "slots are given back");
}

#[test]
fn a_tcp_fault_resets_or_delays_its_share() {
    let faults = TcpFaults::new(TcpFault {
        delay: Some((Duration::from_millis(5), Percent(500_000))),
        reset: Some(Percent(100_000)),
        max_active: 8,
    });
    let mut draw = seeded_draws();
    let (mut resets, mut delays) = (0, 0);
    for _ in 0..10_000 {
        match faults.plan(&mut draw) {
            TcpPlan::Reset => resets += 1,
            TcpPlan::Delay(_) => delays += 1,
            TcpPlan::Pass => {}
        }
    }
    assert!((910..=1_090).contains(&resets), "{resets}");
    // Half of the connections not reset.
    assert!((4_350..=4_650).contains(&delays), "{delays}");
}
