//! Admin endpoints, metrics, the access log and the graceful drain.

// Helpers outside #[test] functions unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use weft_tests::*;

fn config(echo: std::net::SocketAddr, extra: &str) -> String {
    one_route_config(echo, "http1", &format!("drain_timeout: 5s\n{extra}"))
}

#[tokio::test]
async fn admin_reports_readiness_config_clusters_and_metrics() {
    let echo = echo("a").await;
    let proxy = ProxyProcess::start(&config(echo.local_addr(), ""))
        .await
        .unwrap();
    let web = proxy.listener("web");
    assert_eq!(
        proxy.admin_get("/ready").await.unwrap(),
        (200, "ready\n".into())
    );
    assert_eq!(proxy.admin_get("/live").await.unwrap().0, 200);
    assert_eq!(proxy.admin_get("/nope").await.unwrap().0, 404);

    for status in ["200", "201", "503"] {
        let mut req = get(web, "/x");
        req.headers_mut()
            .insert("x-echo-status", status.parse().unwrap());
        body_bytes(http1_request(web, req).await.unwrap())
            .await
            .unwrap();
    }
    let series = |class: &str| {
        format!(
            "weft_http_requests_total{{listener=\"web\",route=\"all\",cluster=\"echo\",status_class=\"{class}\"}}"
        )
    };
    assert!(
        eventually(DEADLINE, || async {
            proxy.metric(&series("2xx")).await == 2.0
        })
        .await
    );
    assert_eq!(proxy.metric(&series("5xx")).await, 1.0);
    assert_eq!(
        proxy
            .metric("weft_http_request_duration_seconds_count{listener=\"web\",route=\"all\",cluster=\"echo\"}")
            .await,
        3.0
    );
    assert!(
        proxy
            .metric("weft_downstream_connections_total{listener=\"web\"}")
            .await
            >= 3.0
    );
    assert!(
        proxy
            .metric("weft_downstream_received_bytes_total{listener=\"web\"}")
            .await
            > 0.0
    );

    let (_, dump) = proxy.admin_get("/config_dump").await.unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["config"]["clusters"][0]["name"], "echo");
    assert!(dump["source"].as_str().unwrap().ends_with("proxy.yaml"));

    let (_, clusters) = proxy.admin_get("/clusters").await.unwrap();
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let endpoint = &clusters[0]["endpoints"][0];
    assert_eq!(endpoint["address"], echo.local_addr().to_string());
    assert_eq!(endpoint["requests_total"], 3);
    assert_eq!(endpoint["health"], "healthy");

    let (_, listeners) = proxy.admin_get("/listeners").await.unwrap();
    assert!(listeners.contains(&web.to_string()), "{listeners}");
}

#[tokio::test]
async fn access_log_writes_one_json_line_per_request() {
    let echo = echo("a").await;
    let dir = TempDir::new().unwrap();
    let log = dir.path().join("access.log");
    let config = config(
        echo.local_addr(),
        &format!("access_log: {{ path: \"{}\" }}", log.display()),
    )
    .replace(
        "route_config: main }",
        "route_config: main, preserve_request_id: true }",
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let web = proxy.listener("web");
    let mut req = request(web, "POST", "/logged?q=1", Bytes::from_static(b"12345"));
    req.headers_mut()
        .insert("x-request-id", "req-1".parse().unwrap());
    body_bytes(http1_request(web, req).await.unwrap())
        .await
        .unwrap();
    let line = {
        let mut line = String::new();
        let found = eventually(DEADLINE, || {
            line = std::fs::read_to_string(&log).unwrap_or_default();
            std::future::ready(line.ends_with('\n'))
        })
        .await;
        assert!(found, "no access log line");
        line
    };
    let entry: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(entry["method"], "POST");
    assert_eq!(entry["path"], "/logged?q=1");
    assert_eq!(entry["authority"], web.to_string());
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["route"], "all");
    assert_eq!(entry["upstream"], echo.local_addr().to_string());
    assert_eq!(entry["bytes_sent"], 5);
    let (_, metrics) = proxy.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("weft_access_log_dropped_total 0\n"),
        "{metrics}"
    );
    assert_eq!(entry["request_id"], "req-1");
    assert!(entry["duration_ms"].as_f64().unwrap() >= 0.0);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let echo = echo("a").await;
    let mut proxy = ProxyProcess::start(&config(echo.local_addr(), ""))
        .await
        .unwrap();
    let web = proxy.listener("web");
    // An in-flight request the upstream holds for a while.
    let mut sender = http1_connect::<Full<Bytes>>(web).await.unwrap();
    let mut req = get(web, "/slow");
    req.headers_mut()
        .insert("x-echo-delay-ms", "700".parse().unwrap());
    let in_flight = tokio::spawn(sender.send_request(req));
    assert!(
        eventually(DEADLINE, || async {
            proxy
                .admin_get("/clusters")
                .await
                .is_ok_and(|(_, body)| body.contains("\"active_requests\": 1"))
        })
        .await
    );
    proxy.terminate();
    // Readiness turns false while draining.
    assert!(
        eventually(DEADLINE, || async {
            proxy.admin_get("/ready").await.is_ok_and(|(s, _)| s == 503)
        })
        .await
    );
    // The in-flight request completes, told to close its connection.
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "connection"), "close");
    // And the process exits cleanly.
    assert_eq!(proxy.wait().await.unwrap(), Some(0));
    assert!(
        tokio::net::TcpStream::connect(web).await.is_err(),
        "listener closed after drain"
    );
}

#[tokio::test]
async fn http2_clients_get_goaway_on_drain() {
    let echo = echo("a").await;
    let mut proxy = ProxyProcess::start(&config(echo.local_addr(), ""))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let mut sender = http2_connect::<Full<Bytes>>(web).await.unwrap();
    let mut req = http::Request::get("http://a/slow")
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.headers_mut()
        .insert("x-echo-delay-ms", "700".parse().unwrap());
    let in_flight = tokio::spawn(sender.send_request(req));
    assert!(
        eventually(DEADLINE, || async {
            proxy
                .admin_get("/clusters")
                .await
                .is_ok_and(|(_, body)| body.contains("\"active_requests\": 1"))
        })
        .await
    );
    proxy.terminate();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    // After GOAWAY the connection takes no new streams.
    assert!(eventually(DEADLINE, || std::future::ready(sender.is_closed())).await);
    assert_eq!(proxy.wait().await.unwrap(), Some(0));
}

fn deadlines_config(echo: std::net::SocketAddr, header: &str, idle: &str) -> String {
    config(echo, "").replace(
        "route_config: main }",
        &format!("route_config: main, header_read_timeout: {header}, idle_timeout: {idle} }}"),
    )
}

#[tokio::test]
async fn idle_keep_alive_connection_outlives_the_header_timeout_and_resumes_after_parking() {
    let echo = echo("a").await;
    let proxy = ProxyProcess::start(&deadlines_config(echo.local_addr(), "200ms", "30s"))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let mut sender = http1_connect::<Full<Bytes>>(web).await.unwrap();
    body_bytes(sender.send_request(get(web, "/")).await.unwrap())
        .await
        .unwrap();
    // Waiting is the behaviour under test: an idle keep-alive connection
    // must not be taken for a slow request head, and after a second of
    // silence it is parked (hyper's buffers released) and must resume.
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    sender.ready().await.unwrap();
    let response = sender.send_request(get(web, "/")).await.unwrap();
    assert_eq!(response.status(), 200);
}

/// Sends one keep-alive GET on a new connection to `addr` and reads until
/// the proxy closes it: what came back, how long after the request the
/// close came, and whether it was a clean close (not a reset).
async fn request_then_wait_for_close(addr: std::net::SocketAddr) -> (String, Duration, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut read = Vec::new();
    let clean = loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .expect("closed within the deadline")
        {
            Ok(0) => break true,
            Ok(n) => read.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (
        String::from_utf8_lossy(&read).into_owned(),
        started.elapsed(),
        clean,
    )
}

#[tokio::test]
async fn idle_connection_is_closed_after_the_idle_timeout() {
    let echo = echo("a").await;
    let proxy = ProxyProcess::start(&deadlines_config(echo.local_addr(), "5s", "300ms"))
        .await
        .unwrap();
    let (response, elapsed, _) = request_then_wait_for_close(proxy.listener("web")).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        elapsed >= Duration::from_millis(250),
        "closed before the idle timeout"
    );
}

#[tokio::test]
async fn parked_connection_is_closed_at_the_idle_timeout() {
    let echo = echo("a").await;
    // Idle for a second, the connection parks; its idle timeout then runs
    // out while it is parked.
    let proxy = ProxyProcess::start(&deadlines_config(echo.local_addr(), "5s", "1500ms"))
        .await
        .unwrap();
    let (response, elapsed, clean) = request_then_wait_for_close(proxy.listener("web")).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        elapsed >= Duration::from_millis(1400),
        "closed before the idle timeout"
    );
    assert!(clean, "closed with a reset, not a clean close");
}

#[tokio::test]
async fn streaming_response_is_not_cut_by_the_idle_timeout() {
    use http_body_util::BodyExt;
    const SIZE: usize = 8 * 1024 * 1024;
    let echo = echo("a").await;
    let proxy = ProxyProcess::start(&deadlines_config(echo.local_addr(), "5s", "200ms"))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let mut req = get(web, "/download");
    req.headers_mut()
        .insert("x-echo-body-size", SIZE.to_string().parse().unwrap());
    let response = http1_request(web, req).await.unwrap();
    let mut body = response.into_body();
    let mut received = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .map_or(0, |d| d.len());
    // A slow reader: the response is in flight, not idle.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    while let Some(frame) = tokio::time::timeout(DEADLINE, body.frame()).await.unwrap() {
        received += frame.unwrap().into_data().map_or(0, |d| d.len());
    }
    assert_eq!(received, SIZE);
}

/// One worker runs on tokio's current-thread scheduler (the data plane on
/// the main thread): HTTP/1.1 and HTTP/2 are served, a configuration from
/// the admin side reaches it, and it drains and exits cleanly.
#[tokio::test]
async fn a_single_worker_proxy_serves_both_protocols_and_drains() {
    let echo = echo("single").await;
    let upstream = echo.local_addr().to_string();
    let mut proxy = ProxyProcess::start_with_args(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--admin",
        "127.0.0.1:0",
        "--concurrency",
        "1",
    ])
    .await
    .unwrap();
    let web = proxy.listener("http");
    // SIGHUP has no configuration to reload here (it reopens the logs),
    // and must not kill the proxy.
    hang_up(&proxy).await;
    for _ in 0..3 {
        let response = http1_request(web, get(web, "/one")).await.unwrap();
        assert_eq!(response.status(), 200);
        let req = http::Request::builder()
            .uri(format!("http://{web}/two"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = http2_request(web, req).await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let (status, _) = proxy.admin_get("/ready").await.unwrap();
    assert_eq!(status, 200);
    proxy.terminate();
    assert_eq!(proxy.wait().await.unwrap(), Some(0));
}

/// SIGTERM makes `/ready` 503 at once while listeners keep accepting for
/// the drain delay, so that traffic routed by readiness stops before the
/// port closes; then the drain runs and the process exits.
#[tokio::test]
async fn during_the_drain_delay_not_ready_but_still_serving() {
    let echo = echo("delay").await;
    let upstream = echo.local_addr().to_string();
    let mut proxy = ProxyProcess::start_with_args(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--admin",
        "127.0.0.1:0",
        "--drain-delay",
        "3s",
    ])
    .await
    .unwrap();
    let web = proxy.listener("http");
    proxy.terminate();
    assert!(
        eventually(DEADLINE, || async {
            proxy
                .admin_get("/ready")
                .await
                .is_ok_and(|(status, body)| status == 503 && body == "draining\n")
        })
        .await
    );
    // A new connection, after readiness went false, is still served.
    let response = http1_request(web, get(web, "/late")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(proxy.wait().await.unwrap(), Some(0));
    assert!(
        proxy
            .log()
            .contains("not ready; still accepting before the drain"),
        "{}",
        proxy.log()
    );
}

/// Log rotation: the access log file is moved away and SIGHUP sent; the
/// proxy writes the next lines to a new file at the configured path, and
/// none is lost.
#[tokio::test]
async fn sighup_reopens_a_rotated_access_log() {
    let echo = echo("rotated").await;
    let dir = TempDir::new().unwrap();
    let log = dir.path().join("access.log");
    let config = one_route_config(
        echo.local_addr(),
        "http1",
        &format!("access_log: {{ path: \"{}\" }}", log.display()),
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let web = proxy.listener("web");
    let lines = |path: &std::path::Path| {
        std::fs::read_to_string(path).map_or(0, |text| text.lines().count())
    };
    let response = http1_request(web, get(web, "/before")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(eventually(DEADLINE, || async { lines(&log) == 1 }).await);

    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // Once the signal is handled, the writer opens the path again before
    // its next line.
    hang_up(&proxy).await;
    let response = http1_request(web, get(web, "/after")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        eventually(DEADLINE, || async { lines(&log) == 1 }).await,
        "a new file at the configured path"
    );
    let after = std::fs::read_to_string(&log).unwrap();
    assert!(after.contains("\"path\":\"/after\""), "{after}");
    let before = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(before.lines().count(), 1);
    assert!(before.contains("\"path\":\"/before\""), "{before}");
}

/// Sends SIGHUP and waits until the proxy says it reopened its logs.
async fn hang_up(proxy: &ProxyProcess) {
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status();
    assert!(
        eventually(DEADLINE, || async {
            proxy.log().contains("SIGHUP: log files reopened")
        })
        .await,
        "{}",
        proxy.log()
    );
}
