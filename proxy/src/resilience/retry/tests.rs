use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::BodyExt;

use super::*;

/// What the fake upstream does for one attempt.
enum Step {
    Status(StatusCode),
    StatusWith(StatusCode, &'static str, &'static str),
    Fail(fn() -> ProxyError),
    Slow(Duration, StatusCode),
}

/// Answers each attempt with the next step, recording what it was sent.
#[derive(Clone)]
struct Upstream {
    steps: Arc<Mutex<VecDeque<Step>>>,
    /// Each attempt's deadline, as the route's cluster service has it.
    per_try: Option<Duration>,
    seen: Arc<Mutex<Vec<(String, Bytes)>>>,
}

impl Upstream {
    fn new(steps: Vec<Step>) -> Self {
        Self {
            steps: Arc::new(Mutex::new(steps.into())),
            per_try: None,
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<(String, Bytes)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Service<Request<RequestBody>> for Upstream {
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = Boxed;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Boxed {
        let step = self.steps.lock().unwrap().pop_front();
        let seen = self.seen.clone();
        // As the cluster does, the upstream keeps the attempt's deadline.
        let per_try = self.per_try;
        Box::pin(async move {
            let attempt = req
                .headers()
                .get(&ATTEMPT_COUNT)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock().unwrap().push((attempt, body));
            let respond = |status| {
                let mut response = Response::new(ResponseBody::empty());
                *response.status_mut() = status;
                response
            };
            match step.expect("no more steps") {
                Step::Status(status) => Ok(respond(status)),
                Step::StatusWith(status, name, value) => {
                    let mut response = respond(status);
                    response.headers_mut().insert(
                        HeaderName::from_static(name),
                        HeaderValue::from_static(value),
                    );
                    Ok(response)
                }
                Step::Fail(error) => Err(error()),
                Step::Slow(wait, status) => match per_try {
                    Some(deadline) if deadline < wait => {
                        tokio::time::sleep(deadline).await;
                        Err(ProxyError::AttemptTimeout {
                            endpoint: SocketAddr::from(([127, 0, 0, 1], 1)),
                        })
                    }
                    _ => {
                        tokio::time::sleep(wait).await;
                        Ok(respond(status))
                    }
                },
            }
        })
    }
}

fn policy(edit: impl FnOnce(&mut RetryPolicy)) -> RetryPolicy {
    let mut policy = RetryPolicy {
        num_retries: 2,
        on_5xx: false,
        on_gateway_error: true,
        on_connect_failure: false,
        on_reset: false,
        statuses: Vec::new(),
        grpc_statuses: Vec::new(),
        per_try_timeout: None,
        backoff_base: Duration::from_millis(25),
        backoff_max: Duration::from_millis(250),
        retry_non_idempotent: false,
        max_body_bytes: 64 * 1024,
        budget_ratio: 0.2,
        budget_min_per_second: 10,
        budget_window: Duration::from_secs(10),
    };
    edit(&mut policy);
    policy
}

struct Harness {
    service: Retry<Upstream>,
    upstream: Upstream,
    metrics: Arc<ClusterMetrics>,
}

fn harness(policy: RetryPolicy, steps: Vec<Step>) -> Harness {
    harness_with(policy, steps, None)
}

fn harness_with(policy: RetryPolicy, steps: Vec<Step>, route_timeout: Option<Duration>) -> Harness {
    let mut upstream = Upstream::new(steps);
    upstream.per_try = policy.per_try_timeout;
    let metrics = Arc::new(ClusterMetrics::default());
    let retrying = Arc::new(Retrying {
        policy: Arc::new(policy),
        budget: Arc::default(),
        metrics: metrics.clone(),
        max_retries: 3,
        route_timeout,
    });
    let service = tower::Layer::layer(&RetryLayer::new(Some(retrying)), upstream.clone());
    Harness {
        service,
        upstream,
        metrics,
    }
}

fn request(method: Method, body: &'static [u8]) -> Request<RequestBody> {
    let mut req = Request::new(RequestBody::Replay {
        data: Some(Bytes::from_static(body)).filter(|b| !b.is_empty()),
        trailers: None,
        trace: None,
    });
    *req.method_mut() = method;
    // A client cannot set the count.
    req.headers_mut()
        .insert(&ATTEMPT_COUNT, HeaderValue::from_static("7"));
    req
}

async fn send(harness: &mut Harness, req: Request<RequestBody>) -> Result<StatusCode, ProxyError> {
    harness
        .service
        .ready()
        .await?
        .call(req)
        .await
        .map(|r| r.status())
}

#[tokio::test(start_paused = true)]
async fn a_gateway_error_is_sent_again_with_the_same_body_and_a_counted_attempt() {
    let mut h = harness(
        policy(|_| {}),
        vec![
            Step::Status(StatusCode::SERVICE_UNAVAILABLE),
            Step::Status(StatusCode::OK),
        ],
    );
    let status = send(&mut h, request(Method::PUT, b"payload"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let seen = h.upstream.seen();
    assert_eq!(
        seen,
        [
            ("1".to_owned(), Bytes::from_static(b"payload")),
            ("2".to_owned(), Bytes::from_static(b"payload")),
        ]
    );
    assert_eq!(h.metrics.retries.load(Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn only_what_the_policy_names_and_the_method_allows_is_retried() {
    // POST is not idempotent.
    let mut h = harness(
        policy(|_| {}),
        vec![Step::Status(StatusCode::SERVICE_UNAVAILABLE)],
    );
    let status = send(&mut h, request(Method::POST, b"x")).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.upstream.seen().len(), 1);
    assert_eq!(h.upstream.seen()[0].0, "1");

    // A 500 is not a gateway error; with `5xx` it is retried.
    let mut h = harness(
        policy(|_| {}),
        vec![Step::Status(StatusCode::INTERNAL_SERVER_ERROR)],
    );
    assert_eq!(
        send(&mut h, request(Method::GET, b"")).await.unwrap(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let mut h = harness(
        policy(|p| p.on_5xx = true),
        vec![
            Step::Status(StatusCode::INTERNAL_SERVER_ERROR),
            Step::Status(StatusCode::OK),
        ],
    );
    assert_eq!(
        send(&mut h, request(Method::GET, b"")).await.unwrap(),
        StatusCode::OK
    );

    // Chosen statuses, and a gRPC status in a trailers-only response.
    let mut h = harness(
        policy(|p| {
            p.on_gateway_error = false;
            p.statuses = vec![StatusCode::CONFLICT];
            p.grpc_statuses = vec![14];
        }),
        vec![
            Step::Status(StatusCode::CONFLICT),
            Step::StatusWith(StatusCode::OK, "grpc-status", "14"),
            Step::StatusWith(StatusCode::OK, "grpc-status", "0"),
        ],
    );
    assert_eq!(
        send(&mut h, request(Method::GET, b"")).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(h.upstream.seen().len(), 3);

    // A connect failure never reached the upstream: retried. The route's
    // deadline spent: never.
    let mut h = harness(
        policy(|_| {}),
        vec![
            Step::Fail(|| ProxyError::ConnectTimeout {
                cluster: "c".into(),
                endpoint: "127.0.0.1:1".parse().unwrap(),
            }),
            Step::Status(StatusCode::OK),
        ],
    );
    assert_eq!(
        send(&mut h, request(Method::GET, b"")).await.unwrap(),
        StatusCode::OK
    );
    let mut h = harness(
        policy(|_| {}),
        vec![Step::Fail(|| ProxyError::UpstreamTimeout)],
    );
    assert!(matches!(
        send(&mut h, request(Method::GET, b"")).await,
        Err(ProxyError::UpstreamTimeout)
    ));
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_the_limit_and_when_the_budget_is_spent() {
    let mut h = harness(
        policy(|_| {}),
        (0..5)
            .map(|_| Step::Status(StatusCode::BAD_GATEWAY))
            .collect(),
    );
    assert_eq!(
        send(&mut h, request(Method::GET, b"")).await.unwrap(),
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(h.upstream.seen().len(), 3, "the first and two retries");

    let mut h = harness(
        policy(|p| {
            p.budget_ratio = 0.0;
            p.budget_min_per_second = 0;
        }),
        vec![Step::Status(StatusCode::BAD_GATEWAY)],
    );
    assert_eq!(
        send(&mut h, request(Method::GET, b"")).await.unwrap(),
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(h.upstream.seen().len(), 1);
    assert_eq!(h.metrics.retries_budget_exhausted.load(Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_and_the_per_try_timeout_are_honoured() {
    let mut h = harness(
        policy(|p| p.per_try_timeout = Some(Duration::from_secs(1))),
        vec![
            Step::Slow(Duration::from_secs(5), StatusCode::OK),
            Step::StatusWith(StatusCode::SERVICE_UNAVAILABLE, "retry-after", "3"),
            Step::Status(StatusCode::OK),
        ],
    );
    let start = tokio::time::Instant::now();
    assert_eq!(
        send(&mut h, request(Method::GET, b"")).await.unwrap(),
        StatusCode::OK
    );
    let took = start.elapsed();
    // 1 s for the timed-out attempt, a backoff of at most 25 ms, 3 s of
    // Retry-After.
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_millis(4100),
        "{took:?}"
    );

    // A Retry-After past the cap is not waited for: the response goes back.
    let mut h = harness(
        policy(|_| {}),
        vec![Step::StatusWith(
            StatusCode::SERVICE_UNAVAILABLE,
            "retry-after",
            "3600",
        )],
    );
    assert_eq!(
        send(&mut h, request(Method::GET, b"")).await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(h.upstream.seen().len(), 1);
}

#[tokio::test]
async fn without_a_policy_a_request_passes_once_and_a_client_count_is_removed() {
    let upstream = Upstream::new(vec![Step::Status(StatusCode::SERVICE_UNAVAILABLE)]);
    let mut service = tower::Layer::layer(&RetryLayer::new(None), upstream.clone());
    let status = service
        .ready()
        .await
        .unwrap()
        .call(request(Method::GET, b""))
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.seen(), [(String::new(), Bytes::new())]);
}

#[test]
fn backoff_is_jittered_below_a_doubling_ceiling() {
    let policy = policy(|_| {});
    for attempts in 1..10 {
        let ceiling =
            Duration::from_millis(25 * (1 << (attempts - 1))).min(Duration::from_millis(250));
        let wait = backoff(&policy, attempts);
        assert!(wait <= ceiling, "{attempts}: {wait:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn no_retry_beyond_the_clusters_retries_in_flight() {
    let mut h = harness(policy(|_| {}), vec![Step::Status(StatusCode::BAD_GATEWAY)]);
    // Three retries of other requests are in flight already.
    h.metrics.retries_active.store(3, Relaxed);
    assert_eq!(
        send(&mut h, request(Method::GET, b"")).await.unwrap(),
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(h.upstream.seen().len(), 1);
    assert_eq!(h.metrics.retries_overflow.load(Relaxed), 1);
    assert_eq!(h.metrics.retries_active.load(Relaxed), 3, "nothing leaked");

    // Below the cap a retry takes a place and gives it back.
    let mut h = harness(
        policy(|_| {}),
        vec![
            Step::Status(StatusCode::BAD_GATEWAY),
            Step::Status(StatusCode::OK),
        ],
    );
    assert_eq!(
        send(&mut h, request(Method::GET, b"")).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(h.metrics.retries_active.load(Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_route_timeout_kept_by_the_retry_layer_bounds_the_retries() {
    // Per-try 1 s within a route timeout of 1.5 s: the first attempt times
    // out on its own deadline and is retried; the retry is cut at the
    // route's deadline, counted from the request.
    let policy = policy(|p| p.per_try_timeout = Some(Duration::from_secs(1)));
    assert!(Retrying::keeps(&policy, Some(Duration::from_millis(1500))));
    assert!(!Retrying::keeps(&policy, Some(Duration::from_millis(500))));
    assert!(!Retrying::keeps(&policy, None));
    let mut h = harness_with(
        policy.clone(),
        vec![
            Step::Slow(Duration::from_secs(5), StatusCode::OK),
            Step::Slow(Duration::from_secs(5), StatusCode::OK),
        ],
        Some(Duration::from_millis(1500)),
    );
    let start = tokio::time::Instant::now();
    let outcome = send(&mut h, request(Method::GET, b"")).await;
    assert!(
        matches!(outcome, Err(ProxyError::UpstreamTimeout)),
        "{outcome:?}"
    );
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    assert_eq!(
        h.upstream.seen().len(),
        2,
        "the first attempt and one retry"
    );

    // One that succeeds at once takes no timer but its attempt's.
    let mut h = harness_with(
        policy,
        vec![Step::Status(StatusCode::OK)],
        Some(Duration::from_millis(1500)),
    );
    assert_eq!(
        send(&mut h, request(Method::GET, b"")).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
}

#[test]
fn a_saved_head_comes_back_as_it_was() {
    let mut headers = http::HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("backend"));
    headers.append("x-multi", HeaderValue::from_static("one"));
    headers.append("x-multi", HeaderValue::from_static("two"));
    let mut secret = HeaderValue::from_static("Bearer abc");
    secret.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, secret);
    // obs-text and an empty value are valid field values.
    headers.insert("x-latin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
    headers.insert("x-empty", HeaderValue::from_static(""));
    let long = "v".repeat(10_000);
    headers.insert(header::COOKIE, HeaderValue::from_str(&long).unwrap());
    let order = |map: &http::HeaderMap| {
        map.iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect::<Vec<_>>()
    };

    for (method, uri) in [
        (Method::GET, "/a/b?c=d&e"),
        (Method::PUT, "https://example.com:8443/x?y"),
        (Method::OPTIONS, "*"),
        (Method::from_bytes(b"PURGE").unwrap(), "http://h/"),
    ] {
        let uri: http::Uri = uri.parse().unwrap();
        let mut saved = SavedHead::default();
        assert!(saved.save(&method, &uri, &headers));
        let restored = saved
            .restore(RequestBody::Replay {
                data: None,
                trailers: None,
                trace: None,
            })
            .unwrap();
        assert_eq!(restored.method(), method);
        assert_eq!(restored.uri(), &uri);
        assert_eq!(restored.headers(), &headers);
        assert_eq!(order(restored.headers()), order(&headers));
        assert!(restored.headers()[header::AUTHORIZATION].is_sensitive());
        assert!(!restored.headers()[header::HOST].is_sensitive());
    }

    let uri = http::Uri::from_static("/");
    let mut empty = SavedHead::default();
    assert!(empty.save(&Method::HEAD, &uri, &http::HeaderMap::new()));
    let restored = empty
        .restore(RequestBody::Replay {
            data: None,
            trailers: None,
            trace: None,
        })
        .unwrap();
    assert_eq!(restored.method(), Method::HEAD);
    assert!(restored.headers().is_empty());
}

#[test]
fn a_kept_copy_is_reused_by_the_next_request_and_a_large_one_is_not() {
    let mut req = request(Method::GET, b"body");
    req.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("backend"));
    let spare = || SPARE.with_borrow(Vec::len);
    let before = spare();
    let first = Saved::keep(&req, Replayable::default()).unwrap();
    let copy: *const Saved = first.0.as_deref().unwrap();
    let buffer = first.0.as_ref().unwrap().head.bytes.as_ptr();
    drop(first);
    assert_eq!(spare(), before + 1);

    let second = Saved::keep(&req, Replayable::default()).unwrap();
    let saved = second.0.as_deref().unwrap();
    assert!(std::ptr::eq(saved, copy));
    assert_eq!(saved.head.bytes.as_ptr(), buffer);
    assert_eq!(spare(), before);
    // What the first request left is gone: the copy is the second's.
    let again = saved.request(2, &TriedEndpoints::default()).unwrap();
    assert_eq!(again.headers()[header::HOST], "backend");
    assert_eq!(again.headers()[&ATTEMPT_COUNT], "2");
    assert_eq!(again.headers().len(), 2);
    drop(second);

    req.headers_mut().insert(
        header::COOKIE,
        HeaderValue::from_str(&"v".repeat(8000)).unwrap(),
    );
    let large = Saved::keep(&req, Replayable::default()).unwrap();
    let kept = spare();
    drop(large);
    assert_eq!(spare(), kept);
}
