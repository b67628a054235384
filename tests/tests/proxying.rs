//! Traffic through the proxy: every protocol combination, gRPC, large
//! bodies, upgrades and opaque TCP.

// Helpers outside #[test] functions unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_proto::echo::v1::EchoRequest;
use weft_tests::*;

fn config(echo: std::net::SocketAddr, protocol: &str) -> String {
    one_route_config(echo, protocol, "")
}

#[tokio::test]
async fn http1_to_http1_streams_body_and_keeps_path() {
    let echo = echo("a").await;
    let proxy = ProxyProcess::start(&config(echo.local_addr(), "http1"))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let response = http1_request(
        web,
        request(web, "POST", "/hello?x=1", Bytes::from_static(b"ping")),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-echo-version"), "HTTP/1.1");
    assert_eq!(header(&response, "x-echo-path"), "/hello?x=1");
    assert_eq!(header(&response, "x-echo-server"), "a");
    assert_eq!(body_bytes(response).await.unwrap(), "ping");
}

#[tokio::test]
async fn keep_alive_connection_serves_many_requests_over_pooled_upstreams() {
    let echo = echo("a").await;
    let proxy = ProxyProcess::start(&config(echo.local_addr(), "http1"))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let mut sender = http1_connect::<Full<Bytes>>(web).await.unwrap();
    for i in 0..50 {
        sender.ready().await.unwrap();
        let response = sender
            .send_request(request(web, "POST", "/", Bytes::from(format!("n{i}"))))
            .await
            .unwrap();
        assert_eq!(body_bytes(response).await.unwrap(), format!("n{i}"));
    }
    // Sequential requests reuse one upstream connection.
    assert_eq!(
        proxy
            .metric("weft_upstream_connections_total{cluster=\"echo\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn pooled_connections_unused_for_the_idle_timeout_are_closed_without_traffic() {
    let echo = echo("a").await;
    let config = config(echo.local_addr(), "http1").replace(
        "    protocol: http1\n",
        "    protocol: http1\n    pool: { idle_timeout: 300ms }\n",
    );
    assert!(config.contains("idle_timeout: 300ms"), "{config}");
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let web = proxy.listener("web");
    let active = r#"weft_upstream_connections_active{cluster="echo"}"#;
    let response = http1_request(web, get(web, "/")).await.unwrap();
    body_bytes(response).await.unwrap();
    let returned = std::time::Instant::now();
    assert_eq!(proxy.metric(active).await, 1.0);
    // Nothing uses the pool again: the sweep closes the connection.
    assert!(
        eventually(DEADLINE, || async { proxy.metric(active).await == 0.0 }).await,
        "the idle upstream connection is still open"
    );
    assert!(
        returned.elapsed() >= Duration::from_millis(300),
        "closed {:?} after its last use",
        returned.elapsed()
    );
    // The next request opens a new one.
    let response = http1_request(web, get(web, "/")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        proxy
            .metric(r#"weft_upstream_connections_total{cluster="echo"}"#)
            .await,
        2.0
    );
}

#[tokio::test]
async fn http2_client_to_http1_upstream_carries_the_authority_as_host() {
    let echo = echo("a").await;
    let proxy = ProxyProcess::start(&config(echo.local_addr(), "http1"))
        .await
        .unwrap();
    let req = Request::post("http://example.com/h2")
        .body(Full::new(Bytes::from_static(b"two")))
        .unwrap();
    let response = http2_request(proxy.listener("web"), req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-echo-version"), "HTTP/1.1");
    assert_eq!(header(&response, "x-echo-host"), "example.com");
    assert_eq!(body_bytes(response).await.unwrap(), "two");
}

#[tokio::test]
async fn http1_client_to_http2_upstream() {
    let echo = echo("a").await;
    let proxy = ProxyProcess::start(&config(echo.local_addr(), "http2"))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let mut req = request(web, "PUT", "/up", Bytes::from_static(b"one"));
    req.headers_mut()
        .insert("host", "api.example.com".parse().unwrap());
    let response = http1_request(web, req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-echo-version"), "HTTP/2.0");
    assert_eq!(header(&response, "x-echo-host"), "api.example.com");
    assert_eq!(header(&response, "x-echo-method"), "PUT");
    assert_eq!(body_bytes(response).await.unwrap(), "one");
}

#[tokio::test]
async fn downstream_protocol_is_mirrored_upstream() {
    let echo = echo("a").await;
    let proxy = ProxyProcess::start(&config(echo.local_addr(), "downstream"))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let h1 = http1_request(web, get(web, "/")).await.unwrap();
    assert_eq!(header(&h1, "x-echo-version"), "HTTP/1.1");
    let req = Request::get("http://x/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let h2 = http2_request(web, req).await.unwrap();
    assert_eq!(header(&h2, "x-echo-version"), "HTTP/2.0");
}

#[tokio::test]
async fn grpc_unary_and_status_pass_through() {
    let echo = echo("g").await;
    let proxy = ProxyProcess::start(&config(echo.local_addr(), "http2"))
        .await
        .unwrap();
    let mut client = echo_client(proxy.listener("web")).await.unwrap();
    let reply = client
        .unary(EchoRequest {
            payload: b"hi".to_vec().into(),
            count: 0,
            status_code: 0,
        })
        .await
        .unwrap();
    assert_eq!(&reply.get_ref().payload[..], b"hi");
    assert_eq!(reply.get_ref().server, "g");
    let status = client
        .unary(EchoRequest {
            payload: Bytes::new(),
            count: 0,
            status_code: 5,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn grpc_bidirectional_and_server_streams_pass_through() {
    let echo = echo("g").await;
    let proxy = ProxyProcess::start(&config(echo.local_addr(), "downstream"))
        .await
        .unwrap();
    let mut client = echo_client(proxy.listener("web")).await.unwrap();
    let outbound = futures_util::stream::iter((0..100u32).map(|i| EchoRequest {
        payload: format!("m{i}").into_bytes().into(),
        count: 0,
        status_code: 0,
    }));
    let mut inbound = client.bidi_stream(outbound).await.unwrap().into_inner();
    let mut seen = 0;
    while let Some(message) = inbound.next().await {
        assert_eq!(message.unwrap().payload, format!("m{seen}").into_bytes());
        seen += 1;
    }
    assert_eq!(seen, 100);
    let mut stream = client
        .server_stream(EchoRequest {
            payload: b"s".to_vec().into(),
            count: 7,
            status_code: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut count = 0;
    while let Some(message) = stream.next().await {
        message.unwrap();
        count += 1;
    }
    assert_eq!(count, 7);
    let uploads = futures_util::stream::iter(["a", "b", "c"].map(|p| EchoRequest {
        payload: p.as_bytes().to_vec().into(),
        count: 0,
        status_code: 0,
    }));
    let joined = client.client_stream(uploads).await.unwrap();
    assert_eq!(&joined.get_ref().payload[..], b"abc");
}

#[tokio::test]
async fn hundred_megabytes_stream_both_ways_with_bounded_proxy_memory() {
    const CHUNK: usize = 64 * 1024;
    const TOTAL: usize = 100 * 1024 * 1024;
    let echo = echo("big").await;
    let proxy = ProxyProcess::start(&config(echo.local_addr(), "http1"))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let body = StreamBody::new(futures_util::stream::iter((0..TOTAL / CHUNK).map(
        move |_| Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk.clone())),
    )));
    let req = Request::post("/upload")
        .header("host", "big")
        .body(body)
        .unwrap();
    let response = http1_request(web, req).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .unwrap()
    {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len();
        }
    }
    assert_eq!(received, TOTAL);
    let peak = proxy.peak_rss_kib();
    // The whole body is 100 MiB; a streaming proxy holds a few buffers.
    assert!(peak > 0 && peak < 64 * 1024, "proxy peak RSS {peak} KiB");
}

#[tokio::test]
async fn websocket_upgrade_tunnels_bytes_both_ways_until_idle() {
    let echo = echo("ws").await;
    let idle_timeout = Duration::from_millis(500);
    let config = config(echo.local_addr(), "http1").replace(
        "route_config: main }",
        "route_config: main, idle_timeout: 500ms }",
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let mut stream = TcpStream::connect(proxy.listener("web")).await.unwrap();
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    for message in [&b"\x81\x05hello"[..], &b"\x81\x03bye"[..]] {
        stream.write_all(message).await.unwrap();
        let mut back = vec![0; message.len()];
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, message);
    }
    // A quiet tunnel is closed after the listener's idle timeout.
    assert_closed_when_idle(&mut stream, std::time::Instant::now(), idle_timeout).await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body() {
    let echo = echo("c").await;
    let proxy = ProxyProcess::start(&config(echo.local_addr(), "http1"))
        .await
        .unwrap();
    let mut stream = TcpStream::connect(proxy.listener("web")).await.unwrap();
    stream
        .write_all(
            b"POST /c HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let interim = read_head(&mut stream).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream.write_all(b"hello").await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn chunked_request_body_is_forwarded() {
    let echo = echo("c").await;
    let proxy = ProxyProcess::start(&config(echo.local_addr(), "http1"))
        .await
        .unwrap();
    let mut stream = TcpStream::connect(proxy.listener("web")).await.unwrap();
    stream
        .write_all(b"POST /c HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = Vec::new();
    // The echo streams the body back chunk by chunk, to the last chunk.
    while !body.ends_with(b"0\r\n\r\n") {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed before the body: {:?}",
            String::from_utf8_lossy(&body)
        );
        body.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("hello") && text.contains(" world"),
        "{text:?}"
    );
}

#[tokio::test]
async fn connections_over_the_limit_wait_for_a_free_slot() {
    let echo = echo("c").await;
    let config = config(echo.local_addr(), "http1").replace(
        "route_config: main }",
        "route_config: main, max_connections: 1 }",
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let web = proxy.listener("web");
    let mut first = http1_connect::<Full<Bytes>>(web).await.unwrap();
    assert_eq!(
        first.send_request(get(web, "/")).await.unwrap().status(),
        200
    );
    // The second connection is accepted by the kernel but not served while
    // the first holds the only slot.
    let mut second = TcpStream::connect(web).await.unwrap();
    second
        .write_all(b"GET / HTTP/1.1\r\nHost: c\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let waited = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(waited.is_err(), "served beyond max_connections");
    drop(first);
    let head = read_head(&mut second).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn tcp_listener_forwards_opaque_bytes() {
    let tcp_echo = TcpEchoServer::bind(loopback0()).await.unwrap();
    let proxy = ProxyProcess::start(&tcp_config(tcp_echo.local_addr(), ""))
        .await
        .unwrap();
    let mut stream = TcpStream::connect(proxy.listener("raw")).await.unwrap();
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(&payload).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let receive = read.read_to_end(&mut back);
    let ((), received) = tokio::time::timeout(DEADLINE, async { tokio::join!(send, receive) })
        .await
        .unwrap();
    received.unwrap();
    assert_eq!(back, payload);
}

#[tokio::test]
async fn tcp_connection_counts_bytes_while_open_and_closes_after_the_idle_timeout() {
    let tcp_echo = TcpEchoServer::bind(loopback0()).await.unwrap();
    let idle_timeout = Duration::from_millis(300);
    let config = tcp_config(tcp_echo.local_addr(), ", idle_timeout: 300ms");
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let mut stream = TcpStream::connect(proxy.listener("raw")).await.unwrap();
    stream.write_all(b"0123456789").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"0123456789");
    let last_byte = std::time::Instant::now();
    // Counted as they moved, not when the connection closes.
    assert_eq!(
        proxy
            .metric(r#"weft_downstream_received_bytes_total{listener="raw"}"#)
            .await,
        10.0
    );
    assert_eq!(
        proxy
            .metric(r#"weft_downstream_sent_bytes_total{listener="raw"}"#)
            .await,
        10.0
    );
    // Nothing moves now: the proxy closes the connection.
    assert_closed_when_idle(&mut stream, last_byte, idle_timeout).await;
}

#[tokio::test]
async fn quick_reverse_proxy_mode_round_robins_without_a_config_file() {
    let (a, b) = (echo("a").await, echo("b").await);
    let upstreams = format!("{},{}", a.local_addr(), b.local_addr());
    let proxy = ProxyProcess::start_with_args(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstreams,
        "--admin",
        "127.0.0.1:0",
    ])
    .await
    .unwrap();
    let web = proxy.listener("http");
    let mut names = Vec::new();
    for _ in 0..4 {
        let response = http1_request(web, get(web, "/")).await.unwrap();
        names.push(header(&response, "x-echo-server").to_owned());
    }
    names.sort();
    assert_eq!(names, ["a", "a", "b", "b"]);
}

/// A TCP listener `raw` forwarding to `backend`; `listener_fields` adds to
/// the listener's flow mapping (`", idle_timeout: 1s"`).
fn tcp_config(backend: std::net::SocketAddr, listener_fields: &str) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - {{ name: raw, address: "127.0.0.1:0", protocol: tcp, cluster: backend{listener_fields} }}
clusters:
  - {{ name: backend, endpoints: [{{ address: "{backend}" }}] }}
"#
    )
}

/// Waits for the proxy to close a connection on which nothing moves, and
/// checks that nothing more arrived and that the close came no sooner than
/// `idle_timeout` after `last_byte`. A close (EOF) and a reset both count.
async fn assert_closed_when_idle(
    stream: &mut TcpStream,
    last_byte: std::time::Instant,
    idle_timeout: Duration,
) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty(), "{rest:?} {read:?}");
    assert!(
        last_byte.elapsed() >= idle_timeout,
        "closed {:?} after the last byte",
        last_byte.elapsed()
    );
}

/// Reads one response head (up to the blank line).
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n == 1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}
