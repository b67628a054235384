//! HTTP/1.1 and HTTP/2 framing rules the proxy enforces (RFC 9112,
//! RFC 9113): malformed requests are the client's fault, answered with 400
//! (or 431), counted, logged, and never forwarded.

// Helpers outside #[test] functions unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use weft_tests::*;

/// Sends raw bytes on a new connection and reads until the proxy closes
/// it (every answer here closes the connection).
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

async fn proxy_to_echo(top: &str) -> (ProxyProcess, weft_tests::EchoServer) {
    let echo = echo("conformance").await;
    let proxy = ProxyProcess::start(&one_route_config(echo.local_addr(), "http1", top))
        .await
        .unwrap();
    (proxy, echo)
}

#[tokio::test]
async fn a_broken_chunked_body_is_400_blamed_on_the_client() {
    let (proxy, _echo) = proxy_to_echo("").await;
    let web = proxy.listener("web");
    for chunk_size in ["zz", "FFFFFFFFFFFFFFFFFFFF"] {
        let request = format!(
            "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n{chunk_size}\r\nhello\r\n0\r\n\r\n"
        );
        let response = raw(web, request.as_bytes()).await;
        assert!(
            status_line(&response).starts_with("HTTP/1.1 400"),
            "{chunk_size}: {response}"
        );
        assert!(
            response.contains("x-weft-error: downstream_body_error"),
            "{response}"
        );
    }
    // Nothing was counted against the upstream, which still serves.
    let response = http1_request(web, get(web, "/")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        proxy
            .metric("weft_http_requests_total{listener=\"web\",route=\"all\",cluster=\"echo\",status_class=\"5xx\"}")
            .await,
        0.0
    );
    assert_eq!(
        proxy
            .metric("weft_http_requests_total{listener=\"web\",route=\"all\",cluster=\"echo\",status_class=\"4xx\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn two_host_lines_or_a_host_with_whitespace_are_400() {
    let (proxy, _echo) = proxy_to_echo("").await;
    let web = proxy.listener("web");
    let requests: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\tb\r\n\r\n",
    ];
    for request in requests {
        let response = raw(web, request).await;
        assert!(
            status_line(&response).starts_with("HTTP/1.1 400"),
            "{request:?}: {response}"
        );
        assert!(
            response.contains("x-weft-error: malformed_request"),
            "{response}"
        );
    }
}

/// An upstream that answers every request `200 ok` and reports each
/// request head it read.
async fn recording_upstream() -> (SocketAddr, mpsc::Receiver<String>) {
    let listener = TcpListener::bind(loopback0()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (heads, received) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let heads = heads.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = heads
                    .send(String::from_utf8_lossy(&head).into_owned())
                    .await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    (addr, received)
}

#[tokio::test]
async fn an_h2c_upgrade_is_never_forwarded() {
    let (upstream, mut heads) = recording_upstream().await;
    let proxy = ProxyProcess::start(&one_route_config(upstream, "http1", ""))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let mut req = get(web, "/");
    let headers = req.headers_mut();
    headers.insert("connection", "Upgrade, HTTP2-Settings".parse().unwrap());
    headers.insert("upgrade", "h2c".parse().unwrap());
    headers.insert(
        "http2-settings",
        "AAMAAABkAAQCAAAAAAIAAAAA".parse().unwrap(),
    );
    let response = http1_request(web, req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(body_bytes(response).await.unwrap(), "ok");
    let head = tokio::time::timeout(DEADLINE, heads.recv())
        .await
        .unwrap()
        .unwrap()
        .to_ascii_lowercase();
    assert!(!head.contains("upgrade"), "{head}");
    assert!(!head.contains("http2-settings"), "{head}");
}

#[tokio::test]
async fn http2_headers_over_the_limit_are_431_not_a_refused_stream() {
    let echo = echo("conformance").await;
    let config = one_route_config(echo.local_addr(), "http1", "").replace(
        "route_config: main }",
        "route_config: main, max_request_headers_bytes: 4096 }",
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let web = proxy.listener("web");
    let req = http::Request::builder()
        .uri(format!("http://{web}/"))
        .header("x-big", "a".repeat(5000))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = http2_request(web, req).await.unwrap();
    assert_eq!(response.status(), 431);
    assert_eq!(header(&response, "x-weft-error"), "headers_too_large");
}

#[tokio::test]
async fn requests_the_parser_rejects_are_counted_and_logged() {
    let scratch = TempDir::new().unwrap();
    let log = scratch.path().join("access.log");
    let (proxy, _echo) =
        proxy_to_echo(&format!("access_log: {{ path: \"{}\" }}", log.display())).await;
    let web = proxy.listener("web");
    let malformed: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked, x\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nx-folded: a\r\n b\r\n\r\n",
        b"G\0T / HTTP/1.1\r\nhost: a\r\n\r\n",
    ];
    for request in malformed {
        let response = raw(web, request).await;
        assert!(
            status_line(&response).starts_with("HTTP/1.1 400"),
            "{request:?}: {response}"
        );
    }
    let mut too_many = b"GET / HTTP/1.1\r\nhost: a\r\n".to_vec();
    for i in 0..200 {
        too_many.extend_from_slice(format!("x-h{i}: 1\r\n").as_bytes());
    }
    too_many.extend_from_slice(b"\r\n");
    let response = raw(web, &too_many).await;
    assert!(
        status_line(&response).starts_with("HTTP/1.1 431"),
        "{response}"
    );
    let rejected = |reason: &'static str| {
        let proxy = &proxy;
        async move {
            proxy
                .metric(&format!(
                    "weft_downstream_rejected_requests_total{{listener=\"web\",reason=\"{reason}\"}}"
                ))
                .await
        }
    };
    assert_eq!(rejected("malformed").await, 4.0);
    assert_eq!(rejected("too_large").await, 1.0);
    let logged = eventually(DEADLINE, || async {
        std::fs::read_to_string(&log).is_ok_and(|text| text.lines().count() == 5)
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged, "access log: {text}");
    assert_eq!(
        text.matches("\"flag\":\"malformed_request\"").count(),
        4,
        "{text}"
    );
    assert_eq!(text.matches("\"status\":431").count(), 1, "{text}");
}
