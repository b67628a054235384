//! What clients see when something is wrong: each error has its status, a
//! short body and an `x-weft-error` header; nothing hangs or crashes.

// Helpers outside #[test] functions unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_tests::*;

fn config(endpoint: &str, listener_extra: &str) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - {{ name: web, address: "127.0.0.1:0", route_config: main {listener_extra} }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - {{ name: slow, match: {{ prefix: /slow }}, cluster: app, timeout: 300ms }}
          - {{ name: all, match: {{ prefix: / }}, cluster: app }}
clusters:
  - {{ name: app, connect_timeout: 5s, endpoints: [{{ address: "{endpoint}" }}] }}
"#
    )
}

/// An address where nothing listens.
async fn closed_port() -> String {
    unused_address().to_string()
}

#[tokio::test]
async fn unreachable_upstream_is_503_without_waiting_for_the_connect_timeout() {
    let proxy = ProxyProcess::start(&config(&closed_port().await, ""))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let started = Instant::now();
    let response = http1_request(web, get(web, "/")).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        header(&response, "x-weft-error"),
        "upstream_connect_failure"
    );
    assert_eq!(
        body_bytes(response).await.unwrap(),
        "upstream connect error\n"
    );
    // A refused connection fails at once; only a timeout would take 5 s.
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        proxy
            .metric("weft_upstream_connect_failures_total{cluster=\"app\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn slow_upstream_is_504_after_the_route_timeout() {
    let echo = echo("slow").await;
    let proxy = ProxyProcess::start(&config(&echo.local_addr().to_string(), ""))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let mut req = get(web, "/slow");
    req.headers_mut()
        .insert("x-echo-delay-ms", "5000".parse().unwrap());
    let response = http1_request(web, req).await.unwrap();
    assert_eq!(response.status(), 504);
    assert_eq!(header(&response, "x-weft-error"), "upstream_timeout");
}

#[tokio::test]
async fn upstream_reset_is_502() {
    let echo = echo("reset").await;
    let proxy = ProxyProcess::start(&config(&echo.local_addr().to_string(), ""))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let mut req = get(web, "/");
    req.headers_mut()
        .insert("x-echo-reset", "1".parse().unwrap());
    let response = http1_request(web, req).await.unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(header(&response, "x-weft-error"), "upstream_reset");
}

#[tokio::test]
async fn grpc_callers_get_a_grpc_status() {
    let proxy = ProxyProcess::start(&config(&closed_port().await, ""))
        .await
        .unwrap();
    let mut client = echo_client(proxy.listener("web")).await.unwrap();
    let status = client
        .unary(weft_proto::echo::v1::EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let echo = echo("x").await;
    let proxy = ProxyProcess::start(&config(&echo.local_addr().to_string(), ""))
        .await
        .unwrap();
    // HTTP/1.1 without Host (RFC 9112 §3.2).
    let head = exchange(proxy.listener("web"), b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(head.contains("x-weft-error: malformed_request"), "{head}");
    // Not HTTP at all.
    let head = exchange(proxy.listener("web"), b"HELLO THERE\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // Conflicting framing.
    let head = exchange(
        proxy.listener("web"),
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // Both framings at once (request smuggling): refused, not guessed.
    let head = exchange(
        proxy.listener("web"),
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(!head.contains("HTTP/1.1 200"), "{head}");
    // The proxy is still serving.
    let web = proxy.listener("web");
    assert_eq!(
        http1_request(web, get(web, "/")).await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let echo = echo("x").await;
    let proxy = ProxyProcess::start(&config(
        &echo.local_addr().to_string(),
        ", max_request_headers_bytes: 4096, max_request_headers: 20",
    ))
    .await
    .unwrap();
    let web = proxy.listener("web");
    // Over the limit: our answer, with the cause named.
    let mut req = get(web, "/");
    req.headers_mut()
        .insert("x-big", "a".repeat(5000).parse().unwrap());
    let response = http1_request(web, req).await.unwrap();
    assert_eq!(response.status(), 431);
    assert_eq!(header(&response, "x-weft-error"), "headers_too_large");
    // Far over: the parser's hard stop, still 431.
    let mut req = get(web, "/");
    req.headers_mut()
        .insert("x-huge", "a".repeat(64 * 1024).parse().unwrap());
    let head = match http1_request(web, req).await {
        Ok(response) => response.status().as_u16(),
        Err(error) => panic!("expected a 431 response, got {error}"),
    };
    assert_eq!(head, 431);
    // Too many headers.
    let mut req = get(web, "/");
    for i in 0..30 {
        req.headers_mut().insert(
            http::HeaderName::try_from(format!("x-h{i}")).unwrap(),
            "1".parse().unwrap(),
        );
    }
    assert_eq!(http1_request(web, req).await.unwrap().status(), 431);
    // Over HTTP/2 as well.
    let mut req = http::Request::get("http://a/")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    req.headers_mut()
        .insert("x-big", "a".repeat(5000).parse().unwrap());
    let status = match http2_request(web, req).await {
        Ok(response) => response.status().as_u16(),
        Err(error) => panic!("expected a 431 response over h2, got {error}"),
    };
    assert_eq!(status, 431);
}

#[tokio::test]
async fn slowloris_connections_are_closed_after_the_header_timeout() {
    let echo = echo("x").await;
    let proxy = ProxyProcess::start(&config(
        &echo.local_addr().to_string(),
        ", header_read_timeout: 300ms",
    ))
    .await
    .unwrap();
    // Half a request, then silence.
    let mut slow = TcpStream::connect(proxy.listener("web")).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .unwrap();
    assert_closed(&mut slow).await;
    // Nothing at all.
    let mut silent = TcpStream::connect(proxy.listener("web")).await.unwrap();
    assert_closed(&mut silent).await;
    // Other clients are unaffected.
    let web = proxy.listener("web");
    assert_eq!(
        http1_request(web, get(web, "/")).await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn invalid_config_file_is_refused_with_resource_and_field() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        config("127.0.0.1:1", "").replace("prefix: /slow", "prefix: slow"),
    )
    .unwrap();
    let output = tokio::process::Command::new(proxy_binary())
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            r#"route_config "main": virtual_hosts[0].routes[0].match.prefix: invalid path "slow""#
        ),
        "{stderr}"
    );
    std::fs::write(&path, "listeners: [ {").unwrap();
    let output = tokio::process::Command::new(proxy_binary())
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("bad.yaml"));
}

/// Writes raw bytes and reads the response head.
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .unwrap()
        {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out)
        .to_lowercase()
        .replacen("http/1.1", "HTTP/1.1", 1)
}

async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {DEADLINE:?}"),
            Ok(Ok(0) | Err(_)) => return,
            // hyper may answer 408 before closing; read on to the close.
            Ok(Ok(_)) => {}
        }
    }
}
