//! The echo servers on loopback, driven by hyper and tonic clients and raw
//! sockets. No test sleeps: each awaits the server, bounded by `within`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::channel::Channel;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use weft_proto::echo::v1::EchoRequest;
use weft_proto::echo::v1::echo_client::EchoClient;

use super::*;

const TEST_TIMEOUT: Duration = Duration::from_secs(20);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn within<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out")
}

async fn echo() -> EchoServer {
    EchoServer::bind(EchoOptions::default()).await.unwrap()
}

async fn h1<B>(addr: SocketAddr) -> http1::SendRequest<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

async fn h2<B>(addr: SocketAddr) -> http2::SendRequest<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// A request with a small body, built from header pairs.
fn request(uri: &str, headers: &[(&str, &str)], body: &'static str) -> Request<Full<Bytes>> {
    let mut builder = Request::post(uri);
    for &(name, value) in headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn collect(response: Response<Incoming>) -> (http::response::Parts, Bytes) {
    let (parts, body) = response.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

fn header<'a>(parts: &'a http::response::Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).map(|v| v.to_str().unwrap())
}

/// Counts a response body's bytes without holding them, and checks they
/// follow the generated `a..z` pattern.
async fn count_generated(mut body: Incoming) -> u64 {
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            for (i, &byte) in data.iter().enumerate() {
                let offset = total + i as u64;
                assert_eq!(byte, b'a' + (offset % 26) as u8, "byte {offset}");
            }
            total += data.len() as u64;
        }
    }
    total
}

#[tokio::test]
async fn h1_echoes_body_and_describes_request() {
    within(async {
        let server = echo().await;
        let mut client = h1(server.local_addr()).await;
        let req = request(
            "/some/path?q=1&r=2",
            &[
                ("host", "svc.test"),
                ("content-type", "text/plain"),
                ("x-foo", "bar"),
            ],
            "hello echo",
        );
        let (parts, body) = collect(client.send_request(req).await.unwrap()).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body, "hello echo");
        assert_eq!(header(&parts, X_ECHO_SERVER), Some(server.name()));
        assert_eq!(server.name(), server.local_addr().to_string());
        assert_eq!(header(&parts, X_ECHO_METHOD), Some("POST"));
        assert_eq!(header(&parts, X_ECHO_PATH), Some("/some/path?q=1&r=2"));
        assert_eq!(header(&parts, X_ECHO_HOST), Some("svc.test"));
        assert_eq!(header(&parts, X_ECHO_VERSION), Some("HTTP/1.1"));
        assert_eq!(header(&parts, "content-type"), Some("text/plain"));
        assert_eq!(header(&parts, "content-length"), Some("10"));
        // Request headers are echoed only on request.
        assert_eq!(header(&parts, "x-echo-req-x-foo"), None);
    })
    .await;
}

#[tokio::test]
async fn h2c_echoes_body_with_prior_knowledge() {
    within(async {
        let server = EchoServer::bind(EchoOptions::default().with_name("upstream-a"))
            .await
            .unwrap();
        let mut client = h2(server.local_addr()).await;
        let req = request(
            "http://svc.test/h2/path?x=y",
            &[("content-type", "application/json")],
            "{\"h2\":true}",
        );
        let (parts, body) = collect(client.send_request(req).await.unwrap()).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body, "{\"h2\":true}");
        assert_eq!(header(&parts, X_ECHO_SERVER), Some("upstream-a"));
        assert_eq!(header(&parts, X_ECHO_PATH), Some("/h2/path?x=y"));
        assert_eq!(header(&parts, X_ECHO_HOST), Some("svc.test"));
        assert_eq!(header(&parts, X_ECHO_VERSION), Some("HTTP/2.0"));
        assert_eq!(header(&parts, "content-type"), Some("application/json"));
    })
    .await;
}

#[tokio::test]
async fn status_knob_sets_status_and_bad_values_are_rejected() {
    within(async {
        let server = echo().await;
        let mut client = h1(server.local_addr()).await;
        let req = request("/", &[("host", "h"), (X_ECHO_STATUS, "503")], "body");
        let (parts, body) = collect(client.send_request(req).await.unwrap()).await;
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "body");

        let req = request("/", &[("host", "h"), (X_ECHO_STATUS, "abc")], "body");
        let (parts, body) = collect(client.send_request(req).await.unwrap()).await;
        assert_eq!(parts.status, StatusCode::BAD_REQUEST);
        assert_eq!(body, "invalid value for x-echo-status\n");
    })
    .await;
}

#[tokio::test]
async fn delay_knob_waits_before_answering() {
    within(async {
        let server = echo().await;
        let mut client = h2(server.local_addr()).await;
        let start = Instant::now();
        let req = request("http://h/", &[(X_ECHO_DELAY_MS, "100")], "late");
        let (parts, body) = collect(client.send_request(req).await.unwrap()).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body, "late");
        // Only a lower bound: tests never assert how fast something is.
        assert!(start.elapsed() >= Duration::from_millis(100));
    })
    .await;
}

#[tokio::test]
async fn body_size_knob_streams_generated_bytes_over_h1_and_h2() {
    within(async {
        let server = echo().await;
        let size: u64 = 8 * 1024 * 1024 + 3;
        let size_header = size.to_string();

        let mut client = h1(server.local_addr()).await;
        let req = request(
            "/",
            &[("host", "h"), (X_ECHO_BODY_SIZE, &size_header)],
            "ignored",
        );
        let (parts, body) = client.send_request(req).await.unwrap().into_parts();
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(header(&parts, "content-length"), Some(size_header.as_str()));
        assert_eq!(count_generated(body).await, size);

        let mut client = h2(server.local_addr()).await;
        let req = request("http://h/", &[(X_ECHO_BODY_SIZE, &size_header)], "");
        let (parts, body) = client.send_request(req).await.unwrap().into_parts();
        assert_eq!(header(&parts, "content-length"), Some(size_header.as_str()));
        assert_eq!(count_generated(body).await, size);

        let req = request("http://h/", &[(X_ECHO_BODY_SIZE, "0")], "ignored");
        let (parts, body) = collect(client.send_request(req).await.unwrap()).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert!(body.is_empty());
    })
    .await;
}

#[tokio::test]
async fn fail_every_knob_fails_every_nth_request_carrying_it() {
    within(async {
        let server = echo().await;
        let mut client = h1(server.local_addr()).await;
        let mut statuses = Vec::new();
        for _ in 0..6 {
            let req = request("/", &[("host", "h"), (X_ECHO_FAIL_EVERY, "3")], "x");
            let (parts, _) = collect(client.send_request(req).await.unwrap()).await;
            let failed = header(&parts, X_ECHO_FAILED) == Some("1");
            assert_eq!(failed, parts.status == StatusCode::INTERNAL_SERVER_ERROR);
            statuses.push(parts.status.as_u16());
            // Requests without the knob do not shift the pattern.
            let req = request("/", &[("host", "h")], "x");
            let (parts, _) = collect(client.send_request(req).await.unwrap()).await;
            assert_eq!(parts.status, StatusCode::OK);
        }
        assert_eq!(statuses, [200, 200, 500, 200, 200, 500]);
        assert_eq!(server.requests_served(), 12);
    })
    .await;
}

#[tokio::test]
async fn header_echo_knob_copies_x_headers_only() {
    within(async {
        let server = echo().await;
        let mut client = h2(server.local_addr()).await;
        let req = request(
            "http://h/",
            &[
                (X_ECHO_HEADERS, "1"),
                ("x-foo", "a"),
                ("x-bar", "b"),
                ("x-bar", "c"),
                ("accept", "text/plain"),
            ],
            "",
        );
        let (parts, _) = collect(client.send_request(req).await.unwrap()).await;
        assert_eq!(header(&parts, "x-echo-req-x-foo"), Some("a"));
        let bars: Vec<_> = parts.headers.get_all("x-echo-req-x-bar").iter().collect();
        assert_eq!(bars, ["b", "c"]);
        assert_eq!(header(&parts, "x-echo-req-x-echo-headers"), Some("1"));
        assert_eq!(header(&parts, "x-echo-req-accept"), None);
    })
    .await;
}

#[tokio::test]
async fn reset_knob_drops_h1_connection() {
    within(async {
        let server = echo().await;
        let mut client = h1(server.local_addr()).await;
        let req = request("/", &[("host", "h"), (X_ECHO_RESET, "1")], "");
        let err = client.send_request(req).await.unwrap_err();
        assert!(err.is_incomplete_message() || err.is_closed(), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn reset_knob_resets_h2_stream_and_keeps_connection() {
    within(async {
        let server = echo().await;
        let mut client = h2(server.local_addr()).await;
        let req = request("http://h/", &[(X_ECHO_RESET, "1")], "");
        let err = client.send_request(req).await.unwrap_err();
        assert!(!err.is_closed(), "{err:?}");
        let req = request("http://h/", &[], "still here");
        let (parts, body) = collect(client.send_request(req).await.unwrap()).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body, "still here");
    })
    .await;
}

/// Sends a chunk and reads it back before the request body has ended: the
/// echo streams rather than buffering the upload.
async fn echo_streams_before_request_ends<S>(send: S)
where
    S: AsyncFnOnce(Request<Channel<Bytes>>) -> Response<Incoming>,
{
    let (mut tx, body) = Channel::<Bytes>::new(1);
    tx.send_data(Bytes::from_static(b"first")).await.unwrap();
    let mut response = send(
        Request::post("http://h/")
            .header("host", "h")
            .body(body)
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let frame = response.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first");
    tx.send_data(Bytes::from_static(b"second")).await.unwrap();
    let frame = response.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "second");
    drop(tx);
    // HTTP/2 may close the stream with an empty DATA frame, echoed as is.
    let rest = response.into_body().collect().await.unwrap().to_bytes();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn h1_echo_streams_before_request_ends() {
    within(async {
        let server = echo().await;
        let mut client = h1(server.local_addr()).await;
        echo_streams_before_request_ends(async |req| client.send_request(req).await.unwrap()).await;
    })
    .await;
}

#[tokio::test]
async fn h2_echo_streams_before_request_ends() {
    within(async {
        let server = echo().await;
        let mut client = h2(server.local_addr()).await;
        echo_streams_before_request_ends(async |req| client.send_request(req).await.unwrap()).await;
    })
    .await;
}

/// Uploads `total` bytes in chunks while reading the echo concurrently.
async fn echo_large_upload<S>(total: usize, send: S)
where
    S: AsyncFnOnce(Request<Channel<Bytes>>) -> Response<Incoming>,
{
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let (mut tx, body) = Channel::<Bytes>::new(4);
    let uploader = tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let len = chunk.len().min(total - sent);
            tx.send_data(chunk.slice(..len)).await.unwrap();
            sent += len;
        }
    });
    let response = send(
        Request::post("http://h/")
            .header("host", "h")
            .body(body)
            .unwrap(),
    )
    .await;
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            assert!(data.iter().all(|&b| b == 7));
            received += data.len();
        }
    }
    uploader.await.unwrap();
    assert_eq!(received, total);
}

#[tokio::test]
async fn large_uploads_echo_over_h1_and_h2() {
    within(async {
        let server = echo().await;
        let total = 16 * 1024 * 1024 + 5;
        let mut client = h1(server.local_addr()).await;
        echo_large_upload(total, async |req| client.send_request(req).await.unwrap()).await;
        let mut client = h2(server.local_addr()).await;
        echo_large_upload(total, async |req| client.send_request(req).await.unwrap()).await;
    })
    .await;
}

#[tokio::test]
async fn h2_request_trailers_come_back_as_response_trailers() {
    within(async {
        let server = echo().await;
        let mut client = h2(server.local_addr()).await;
        let (mut tx, body) = Channel::<Bytes>::new(2);
        tx.send_data(Bytes::from_static(b"data")).await.unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        tx.send_trailers(trailers).await.unwrap();
        drop(tx);
        let response = client
            .send_request(Request::post("http://h/").body(body).unwrap())
            .await
            .unwrap();
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("response trailers");
        assert_eq!(trailers.get("x-checksum").unwrap(), "abc");
        assert_eq!(collected.to_bytes(), "data");
    })
    .await;
}

#[tokio::test]
async fn h1_request_trailers_come_back_when_declared_and_accepted() {
    within(async {
        let server = echo().await;
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        stream
            .write_all(
                b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\
                  te: trailers\r\ntrailer: x-checksum\r\n\r\n\
                  4\r\ndata\r\n0\r\nx-checksum: abc\r\n\r\n",
            )
            .await
            .unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        let expected = b"4\r\ndata\r\n0\r\nx-checksum: abc\r\n\r\n";
        let mut body = vec![0u8; expected.len()];
        stream.read_exact(&mut body).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(expected)
        );
    })
    .await;
}

/// Reads from `stream` until `buf` ends with the blank line closing a head.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "eof in head");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test]
async fn expect_100_continue_gets_continue_before_the_body_is_sent() {
    within(async {
        let server = echo().await;
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        stream
            .write_all(
                b"POST /upload HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\
                  expect: 100-continue\r\n\r\n",
            )
            .await
            .unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 100 Continue\r\n"), "{head}");
        stream.write_all(b"hello").await.unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        let mut body = [0u8; 5];
        stream.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"hello");
    })
    .await;
}

#[tokio::test]
async fn websocket_upgrade_switches_protocols_and_echoes_bytes() {
    within(async {
        let server = echo().await;
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        stream
            .write_all(
                b"GET /chat HTTP/1.1\r\nhost: h\r\nconnection: keep-alive, Upgrade\r\n\
                  upgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                  sec-websocket-version: 13\r\n\r\n",
            )
            .await
            .unwrap();
        let head = read_head(&mut stream).await.to_ascii_lowercase();
        assert!(
            head.starts_with("http/1.1 101 switching protocols\r\n"),
            "{head}"
        );
        assert!(head.contains("upgrade: websocket\r\n"), "{head}");
        assert!(head.contains("connection: upgrade\r\n"), "{head}");
        assert!(
            head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
            "{head}"
        );

        for message in [&b"\x81\x05hello"[..], &[0xAB; 40_000][..]] {
            stream.write_all(message).await.unwrap();
            let mut back = vec![0u8; message.len()];
            stream.read_exact(&mut back).await.unwrap();
            assert_eq!(back, message);
        }
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    })
    .await;
}

/// A tonic channel over one hyper h2 connection, so the tests need no
/// tonic transport.
#[derive(Clone, Debug)]
struct H2Channel(http2::SendRequest<tonic::body::Body>);

impl tower::Service<Request<tonic::body::Body>> for H2Channel {
    type Response = Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

async fn grpc_client(server: &EchoServer) -> EchoClient<H2Channel> {
    let sender = h2(server.local_addr()).await;
    EchoClient::with_origin(H2Channel(sender), Uri::from_static("http://echo.test"))
}

fn message(payload: &'static str) -> EchoRequest {
    EchoRequest {
        payload: Bytes::from_static(payload.as_bytes()),
        ..EchoRequest::default()
    }
}

#[tokio::test]
async fn grpc_unary_and_server_and_client_streams_share_the_port() {
    within(async {
        let server = EchoServer::bind(EchoOptions::default().with_name("grpc-echo"))
            .await
            .unwrap();
        let mut client = grpc_client(&server).await;

        let reply = client.unary(message("ping")).await.unwrap().into_inner();
        assert_eq!(reply.payload, "ping");
        assert_eq!(reply.server, "grpc-echo");

        let request = EchoRequest {
            count: 3,
            ..message("many")
        };
        let replies: Vec<_> = client
            .server_stream(request)
            .await
            .unwrap()
            .into_inner()
            .map(|reply| reply.unwrap().payload)
            .collect()
            .await;
        assert_eq!(replies, ["many", "many", "many"]);

        let parts = stream::iter([message("a"), message("b"), message("c")]);
        let reply = client.client_stream(parts).await.unwrap().into_inner();
        assert_eq!(reply.payload, "abc");

        let failing = EchoRequest {
            status_code: tonic::Code::NotFound as u32,
            ..message("x")
        };
        let status = client.unary(failing).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);

        // The same port still serves plain HTTP.
        let mut http = h1(server.local_addr()).await;
        let (parts, body) = collect(http.send_request(request_plain()).await.unwrap()).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body, "plain");
        assert_eq!(server.requests_served(), 5);
    })
    .await;
}

fn request_plain() -> Request<Full<Bytes>> {
    request("/", &[("host", "h")], "plain")
}

#[tokio::test]
async fn grpc_bidi_stream_answers_each_message_as_it_arrives() {
    within(async {
        let server = echo().await;
        let mut client = grpc_client(&server).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
        let outbound = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let mut inbound = client.bidi_stream(outbound).await.unwrap().into_inner();
        for payload in ["one", "two", "three"] {
            tx.send(message(payload)).await.unwrap();
            let reply = inbound.message().await.unwrap().expect("a reply");
            assert_eq!(reply.payload, payload);
            assert_eq!(reply.server, server.name());
        }
        tx.send(EchoRequest {
            status_code: tonic::Code::Unavailable as u32,
            ..message("stop")
        })
        .await
        .unwrap();
        let status = inbound.message().await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    })
    .await;
}

#[tokio::test]
async fn tcp_echo_returns_bytes_until_eof() {
    within(async {
        let server = TcpEchoServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (mut read, mut write) = stream.split();
        let writer = async {
            write.write_all(&payload).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let reader = read.read_to_end(&mut back);
        let ((), read) = tokio::join!(writer, reader);
        read.unwrap();
        assert_eq!(back, payload);
        assert_eq!(server.connections_served(), 1);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    within(async {
        let server = echo().await;
        let addr = server.local_addr();
        let mut client = h1(addr).await;
        let (parts, _) = collect(client.send_request(request_plain()).await.unwrap()).await;
        assert_eq!(parts.status, StatusCode::OK);
        drop(client);
        server.shutdown().await;
        TcpStream::connect(addr).await.unwrap_err();
    })
    .await;
}

#[tokio::test]
async fn dropping_the_server_closes_open_connections() {
    within(async {
        let server = echo().await;
        let tcp = TcpEchoServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let mut http_stream = TcpStream::connect(server.local_addr()).await.unwrap();
        let mut tcp_stream = TcpStream::connect(tcp.local_addr()).await.unwrap();
        // Make sure both connections are being served before dropping.
        tcp_stream.write_all(b"x").await.unwrap();
        tcp_stream.read_exact(&mut [0u8; 1]).await.unwrap();
        http_stream
            .write_all(b"GET / HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        read_head(&mut http_stream).await;
        drop(server);
        drop(tcp);
        // EOF (or a reset) rather than a hang.
        let mut rest = Vec::new();
        let _ = http_stream.read_to_end(&mut rest).await;
        let _ = tcp_stream.read_to_end(&mut rest).await;
    })
    .await;
}

#[tokio::test]
async fn empty_get_is_echoed_with_empty_body() {
    within(async {
        let server = echo().await;
        let mut client = h2(server.local_addr()).await;
        let req = Request::get("http://h/ping")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let (parts, body) = collect(client.send_request(req).await.unwrap()).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(header(&parts, X_ECHO_METHOD), Some("GET"));
        assert!(body.is_empty());
    })
    .await;
}
