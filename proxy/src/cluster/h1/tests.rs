//! The HTTP/1.1 client's framing rules, one test each, against a scripted
//! server on the other end of an in-memory pipe: the test reads exactly
//! what the client wrote and answers with exact bytes.

use std::collections::VecDeque;

use http_body_util::{BodyExt, Empty, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio::sync::mpsc;

use super::*;

fn pipe<B>() -> (Connection<DuplexStream, B>, DuplexStream)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (client, server) = duplex(256 * 1024);
    (Connection::new(client), server)
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "upstream")
        .body(Empty::new())
        .unwrap()
}

/// Reads from the server side until `end` has been seen; returns it all.
async fn read_until(server: &mut DuplexStream, end: &[u8]) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(end.len()).any(|w| w == end) {
        let n = server.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "client closed; got {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// A body of unknown length, fed by the test.
#[derive(Debug)]
struct ChannelBody(mpsc::UnboundedReceiver<Result<Frame<Bytes>, std::io::Error>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.get_mut().0.poll_recv(cx)
    }
}

/// Reads a response body to its end: its data and trailers.
async fn read_body<B>(
    body: &mut ResponseBody<DuplexStream, B>,
) -> Result<(Vec<u8>, Option<HeaderMap>), Error>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(bytes) => data.extend_from_slice(&bytes),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    Ok((data, trailers))
}

/// Sends `req`; the server reads its head and answers `response`. Returns
/// the client's result and the request's bytes.
async fn try_exchange<B>(
    conn: Connection<DuplexStream, B>,
    server: &mut DuplexStream,
    req: Request<B>,
    response: &[u8],
) -> (
    Result<Response<ResponseBody<DuplexStream, B>>, SendError<B>>,
    Vec<u8>,
)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let send = conn.send(req, None);
    let serve = async {
        let request = read_until(server, b"\r\n\r\n").await;
        // The client may stop reading once it has refused the head.
        let _ = server.write_all(response).await;
        request
    };
    tokio::join!(send, serve)
}

async fn exchange<B>(
    conn: Connection<DuplexStream, B>,
    server: &mut DuplexStream,
    req: Request<B>,
    response: &[u8],
) -> (Response<ResponseBody<DuplexStream, B>>, Vec<u8>)
where
    B: Body<Data = Bytes> + Unpin + std::fmt::Debug,
    B::Error: Into<BoxError>,
{
    let (response, request) = try_exchange(conn, server, req, response).await;
    (response.unwrap(), request)
}

/// As [`try_exchange`], and the server then closes the connection.
async fn answer_and_close<B>(
    conn: Connection<DuplexStream, B>,
    mut server: DuplexStream,
    req: Request<B>,
    response: &[u8],
) -> Result<Response<ResponseBody<DuplexStream, B>>, SendError<B>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let send = conn.send(req, None);
    let serve = async move {
        read_until(&mut server, b"\r\n\r\n").await;
        let _ = server.write_all(response).await;
    };
    tokio::join!(send, serve).0
}

#[tokio::test]
async fn the_trace_context_goes_out_with_the_head_in_place_of_any_in_the_map() {
    use crate::config::Percent;
    use crate::telemetry::trace::{Context, Format, Propagation};

    let mut context = Context::begin(None, Percent::ALL);
    context.trace_id = 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c;
    for (format, lines) in [
        (
            Format::W3c,
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-00000000000000b7-01\r\n",
        ),
        (
            Format::B3,
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-00000000000000b7-01\r\n\
             b3: 0af7651916cd43dd8448eb211c80319c-00000000000000b7-1\r\n",
        ),
    ] {
        context.format = format;
        let (conn, mut server) = pipe();
        // A route's header rule may have put either name in the map: the
        // proxy's own context is what goes out, once.
        let req = Request::get("/")
            .header("host", "upstream")
            .header(
                "traceparent",
                "00-11111111111111111111111111111111-2222222222222222-01",
            )
            .header("b3", "1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let propagation = Propagation::new(context, 0xb7);
        let send = conn.send(req, Some(&propagation));
        let serve = async {
            let request = read_until(&mut server, b"\r\n\r\n").await;
            server
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            request
        };
        let (response, request) = tokio::join!(send, serve);
        assert_eq!(response.unwrap().status(), StatusCode::NO_CONTENT);
        let b3 = if format == Format::B3 {
            ""
        } else {
            "b3: 1\r\n"
        };
        assert_eq!(
            String::from_utf8(request).unwrap(),
            format!("GET / HTTP/1.1\r\nhost: upstream\r\n{b3}{lines}\r\n")
        );
    }
}

#[tokio::test]
async fn a_get_goes_out_in_origin_form_without_framing_headers_and_the_connection_is_reused() {
    let (conn, mut server) = pipe();
    let req = Request::get("http://upstream/a/b?c=d")
        .header("host", "upstream")
        .header("x-one", "1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (mut response, request) = exchange(
        conn,
        &mut server,
        req,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: yes\r\n\r\nhello",
    )
    .await;
    assert_eq!(
        request,
        b"GET /a/b?c=d HTTP/1.1\r\nhost: upstream\r\nx-one: 1\r\n\r\n"
    );
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_11);
    assert_eq!(response.headers()["x-up"], "yes");
    // The usual reason phrase is not kept; another one is.
    assert!(
        response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .is_none()
    );
    assert_eq!(response.body().size_hint().exact(), Some(5));
    let (data, _) = read_body(response.body_mut()).await.unwrap();
    assert_eq!(data, b"hello");
    assert!(response.body().is_end_stream());
    let conn = response.body_mut().take_connection().expect("reusable");

    // The same connection carries the next exchange.
    let (mut response, request) = exchange(
        conn,
        &mut server,
        get("/next"),
        b"HTTP/1.1 204 Nothing Here\r\n\r\n",
    )
    .await;
    assert!(request.starts_with(b"GET /next HTTP/1.1\r\n"));
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| r.as_bytes()),
        Some(&b"Nothing Here"[..])
    );
    assert!(response.body().is_end_stream());
    assert!(response.body_mut().take_connection().is_some());
}

#[tokio::test]
async fn a_body_of_known_length_gets_content_length_and_one_of_unknown_length_is_chunked_with_trailers()
 {
    let (conn, mut server) = pipe();
    let req = Request::post("/upload")
        .header("host", "upstream")
        // The client's framing is not trusted: the body's length is sent.
        .header("transfer-encoding", "chunked")
        .body(Full::new(Bytes::from_static(b"0123456789")))
        .unwrap();
    let send = conn.send(req, None);
    let serve = async {
        let request = read_until(&mut server, b"0123456789").await;
        server
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        request
    };
    let (response, request) = tokio::join!(send, serve);
    assert_eq!(
        request,
        b"POST /upload HTTP/1.1\r\nhost: upstream\r\ncontent-length: 10\r\n\r\n0123456789"
    );
    let mut response = response.unwrap();
    assert!(response.body_mut().take_connection().is_some());

    let (conn, mut server) = pipe();
    let (tx, rx) = mpsc::unbounded_channel();
    let req = Request::post("/stream")
        .header("host", "upstream")
        .body(ChannelBody(rx))
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
        .unwrap();
    let big = Bytes::from(vec![b'x'; COALESCE_BELOW + 1]);
    tx.send(Ok(Frame::data(big.clone()))).unwrap();
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("42"));
    tx.send(Ok(Frame::trailers(trailers))).unwrap();
    drop(tx);
    let send = conn.send(req, None);
    let serve = async {
        let request = read_until(&mut server, b"x-checksum: 42\r\n\r\n").await;
        server
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        request
    };
    let (response, request) = tokio::join!(send, serve);
    let mut expected =
        b"POST /stream HTTP/1.1\r\nhost: upstream\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"
            .to_vec();
    expected.extend_from_slice(format!("{:x}\r\n", big.len()).as_bytes());
    expected.extend_from_slice(&big);
    expected.extend_from_slice(b"\r\n0\r\nx-checksum: 42\r\n\r\n");
    assert_eq!(request, expected);
    assert!(response.unwrap().body_mut().take_connection().is_some());
}

#[tokio::test]
async fn a_declared_length_is_kept_and_a_body_that_breaks_it_fails_as_the_clients() {
    // An empty POST keeps its `content-length: 0`.
    let (conn, mut server) = pipe();
    let req = Request::post("/")
        .header("host", "upstream")
        .header("content-length", "0")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (_, request) = exchange(
        conn,
        &mut server,
        req,
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(
        request,
        b"POST / HTTP/1.1\r\nhost: upstream\r\ncontent-length: 0\r\n\r\n"
    );

    // A stream that declares 10 bytes and ends after 3.
    let (conn, _server) = pipe();
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
        .unwrap();
    drop(tx);
    let req = Request::post("/")
        .header("host", "upstream")
        .header("content-length", "10")
        .body(ChannelBody(rx))
        .unwrap();
    let error = conn.send(req, None).await.unwrap_err();
    assert!(matches!(error.error, Error::RequestBody(_)), "{error:?}");
    // Its body was read: it cannot be handed back to go out again.
    assert!(error.unsent.is_none());

    // A body that fails mid-way is the client's failure too.
    let (conn, _server) = pipe();
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Err(std::io::Error::other("client went away")))
        .unwrap();
    let req = Request::post("/")
        .header("host", "upstream")
        .body(ChannelBody(rx))
        .unwrap();
    let error = conn.send(req, None).await.unwrap_err();
    assert!(matches!(error.error, Error::RequestBody(_)), "{error:?}");
}

#[tokio::test]
async fn informational_heads_are_skipped_and_a_101_unasked_for_is_refused() {
    let (conn, mut server) = pipe();
    let (response, _) = exchange(
        conn,
        &mut server,
        get("/"),
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!response.headers().contains_key("link"));

    let (conn, mut server) = pipe();
    let (result, _) = try_exchange(
        conn,
        &mut server,
        get("/"),
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
    )
    .await;
    assert!(matches!(result.unwrap_err().error, Error::Malformed(_)));
}

#[tokio::test]
async fn responses_without_a_body_ignore_their_framing_headers() {
    for (req, head) in [
        (
            Request::head("/")
                .header("host", "u")
                .body(Empty::<Bytes>::new())
                .unwrap(),
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"[..],
        ),
        (
            get("/"),
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 1000\r\n\r\n",
        ),
        (
            get("/"),
            b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n",
        ),
    ] {
        let (conn, mut server) = pipe();
        let (mut response, _) = exchange(conn, &mut server, req, head).await;
        assert!(response.body().is_end_stream());
        assert_eq!(read_body(response.body_mut()).await.unwrap().0, b"");
        assert!(response.body_mut().take_connection().is_some());
    }
}

#[tokio::test]
async fn a_chunked_response_is_decoded_with_its_extensions_and_trailers() {
    let (conn, mut server) = pipe();
    let (mut response, _) = exchange(
        conn,
        &mut server,
        get("/"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5;name=value\r\nhello\r\nA \r\n0123456789\r\n0\r\ngrpc-status: 0\r\n\r\n",
    )
    .await;
    let (data, trailers) = read_body(response.body_mut()).await.unwrap();
    assert_eq!(data, b"hello0123456789");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    assert!(response.body_mut().take_connection().is_some());

    // Chunks split across reads.
    let (conn, mut server) = pipe();
    let send = conn.send(get("/"), None);
    let serve = async {
        read_until(&mut server, b"\r\n\r\n").await;
        for part in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1"[..],
            b"0\r\n0123456789",
            b"abcdef\r",
            b"\n0\r",
            b"\n\r\n",
        ] {
            server.write_all(part).await.unwrap();
            tokio::task::yield_now().await;
        }
    };
    let (response, ()) = tokio::join!(send, serve);
    let mut response = response.unwrap();
    let (data, trailers) = read_body(response.body_mut()).await.unwrap();
    assert_eq!(data, b"0123456789abcdef");
    assert!(trailers.is_none());
    assert!(response.body_mut().take_connection().is_some());
}

#[tokio::test]
async fn a_broken_chunked_body_fails_and_its_connection_is_not_reused() {
    for body in [
        &b"zz\r\nhello\r\n0\r\n\r\n"[..],
        b"5\r\nhelloXX0\r\n\r\n",
        b"11111111111111111\r\n",
        b"5 x\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
    ] {
        let (conn, mut server) = pipe();
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let (mut response, _) = exchange(conn, &mut server, get("/"), &[head, body].concat()).await;
        let result = read_body(response.body_mut()).await;
        assert!(
            matches!(result, Err(Error::Malformed(_))),
            "{:?}: {result:?}",
            String::from_utf8_lossy(body)
        );
        assert!(response.body_mut().take_connection().is_none());
    }
}

#[tokio::test]
async fn a_body_without_length_runs_to_the_close_and_takes_the_connection() {
    let (conn, server) = pipe();
    let response = answer_and_close(
        conn,
        server,
        get("/"),
        b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
    )
    .await;
    let mut response = response.unwrap();
    assert!(!response.body().is_end_stream());
    assert_eq!(
        read_body(response.body_mut()).await.unwrap().0,
        b"until the end"
    );
    assert!(response.body_mut().take_connection().is_none());
}

#[tokio::test]
async fn content_length_must_be_digits_and_agree_with_itself() {
    for (head, expect) in [
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok"[..],
            Ok(()),
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok",
            Ok(()),
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            Err(()),
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok", Err(())),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0x2\r\n\r\nok", Err(())),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            Err(()),
        ),
        (
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            Err(()),
        ),
    ] {
        let (conn, mut server) = pipe();
        let (response, _) = try_exchange(conn, &mut server, get("/"), head).await;
        match (response, expect) {
            (Ok(mut response), Ok(())) => {
                assert_eq!(read_body(response.body_mut()).await.unwrap().0, b"ok");
            }
            (Err(error), Err(())) => assert!(matches!(error.error, Error::Malformed(_))),
            (response, _) => panic!(
                "{:?}: {:?}",
                String::from_utf8_lossy(head),
                response.map(|r| r.status())
            ),
        }
    }
}

#[tokio::test]
async fn only_a_clean_http11_keep_alive_exchange_leaves_a_reusable_connection() {
    for (head, reusable) in [
        (&b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..], true),
        (
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
        // Chunked wins over a length beside it, but the connection goes.
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            false,
        ),
        // A stray byte after the response.
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok!", false),
    ] {
        let (conn, mut server) = pipe();
        let (mut response, _) = exchange(conn, &mut server, get("/"), head).await;
        assert_eq!(read_body(response.body_mut()).await.unwrap().0, b"ok");
        assert_eq!(
            response.body_mut().take_connection().is_some(),
            reusable,
            "{:?}",
            String::from_utf8_lossy(head)
        );
    }
}

#[tokio::test]
async fn a_head_too_large_or_with_too_many_headers_is_refused() {
    let mut huge = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
    huge.resize(MAX_HEAD + 10, b'a');
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    for head in [
        huge,
        many,
        b"HTTP/1.1 2000 OK\r\n\r\n".to_vec(),
        b"garbage\r\n\r\n".to_vec(),
    ] {
        let (conn, mut server) = pipe();
        let (result, _) = try_exchange(conn, &mut server, get("/"), &head).await;
        assert!(
            matches!(
                result.as_ref().map(|_| ()).map_err(|e| &e.error),
                Err(Error::Malformed(_))
            ),
            "{:?}",
            result.map(|r| r.status())
        );
    }
}

#[tokio::test]
async fn an_early_answer_ends_the_upload_and_the_connection() {
    let (conn, mut server) = pipe();
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
        .unwrap();
    let req = Request::post("/")
        .header("host", "upstream")
        .body(ChannelBody(rx))
        .unwrap();
    let (mut response, _) = exchange(
        conn,
        &mut server,
        req,
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(response.body().is_end_stream());
    // The request was not written whole: the connection cannot be reused.
    assert!(response.body_mut().take_connection().is_none());
    drop(tx);
}

#[tokio::test]
async fn the_request_body_keeps_going_out_while_the_response_streams_back() {
    // An echo server that answers before the request body is over.
    let (conn, mut server) = pipe();
    let (tx, rx) = mpsc::unbounded_channel();
    let req = Request::post("/echo")
        .header("host", "upstream")
        .body(ChannelBody(rx))
        .unwrap();
    let (mut response, _) = exchange(
        conn,
        &mut server,
        req,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await;
    for word in ["one", "two"] {
        tx.send(Ok(Frame::data(Bytes::from(word)))).unwrap();
        let client = response.body_mut().frame();
        let echo = async {
            let chunk = read_until(&mut server, word.as_bytes()).await;
            assert!(String::from_utf8_lossy(&chunk).contains(&format!("3\r\n{word}")));
            server
                .write_all(format!("3\r\n{word}\r\n").as_bytes())
                .await
                .unwrap();
        };
        let (frame, ()) = tokio::join!(client, echo);
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), word);
    }
    drop(tx);
    let client = read_body(response.body_mut());
    let end = async {
        read_until(&mut server, b"0\r\n\r\n").await;
        server.write_all(b"0\r\n\r\n").await.unwrap();
    };
    let (rest, ()) = tokio::join!(client, end);
    assert_eq!(rest.unwrap().0, b"");
    assert!(response.body_mut().take_connection().is_some());
}

#[tokio::test]
async fn a_connection_closed_while_idle_is_seen_and_a_request_it_refused_comes_back_whole() {
    let (mut conn, server) = pipe::<Empty<Bytes>>();
    assert!(!conn.is_closed());
    drop(server);
    assert!(conn.is_closed());

    // The write fails before a byte went out: the request is handed back.
    let (conn, server) = pipe();
    drop(server);
    let error = conn.send(get("/again"), None).await.unwrap_err();
    let unsent = error.unsent.expect("nothing was written");
    assert_eq!(unsent.uri(), "/again");
    assert_eq!(unsent.headers()["host"], "upstream");
}

#[tokio::test]
async fn a_response_cut_short_is_an_error() {
    // Before the head is whole.
    let (conn, server) = pipe();
    let result = answer_and_close(conn, server, get("/"), b"HTTP/1.1 200 OK\r\ncont").await;
    let error = result.unwrap_err();
    assert!(matches!(error.error, Error::Closed));
    assert!(error.unsent.is_none(), "the request was written");

    // In the body.
    let (conn, server) = pipe();
    let response = answer_and_close(
        conn,
        server,
        get("/"),
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
    )
    .await;
    let mut response = response.unwrap();
    assert!(matches!(
        read_body(response.body_mut()).await,
        Err(Error::Closed)
    ));
    assert!(response.body_mut().take_connection().is_none());
}

#[tokio::test]
async fn large_bodies_come_whole_across_many_reads() {
    let (conn, mut server) = pipe();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let send = conn.send(get("/"), None);
    let expected = body.clone();
    let serve = async move {
        read_until(&mut server, b"\r\n\r\n").await;
        server
            .write_all(
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes(),
            )
            .await
            .unwrap();
        for piece in body.chunks(7_000) {
            server.write_all(piece).await.unwrap();
        }
        server
    };
    let (response, _server) = tokio::join!(send, serve);
    let mut response = response.unwrap();
    let mut frames = VecDeque::new();
    let mut got = Vec::new();
    while let Some(frame) = response.body_mut().frame().await {
        let data = frame.unwrap().into_data().unwrap();
        got.extend_from_slice(&data);
        frames.push_back(data.len());
    }
    assert_eq!(got, expected);
    assert!(frames.len() > 1);
    assert!(response.body_mut().take_connection().is_some());
}

/// On one connection, a request with `extra` more headers than usual, then
/// a usual one answered with `second`: the first request's map's capacity,
/// the first response's and the second response.
async fn after_a_request_with(
    extra: usize,
    second: &[u8],
) -> (
    usize,
    usize,
    Response<ResponseBody<DuplexStream, Empty<Bytes>>>,
) {
    let (conn, mut server) = pipe();
    let mut req = get("/first");
    for i in 0..extra {
        req.headers_mut().insert(
            HeaderName::try_from(format!("x-{i}")).unwrap(),
            HeaderValue::from_static("v"),
        );
    }
    let grown = req.headers().capacity();
    let (mut first, _) = exchange(
        conn,
        &mut server,
        req,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let conn = first.body_mut().take_connection().expect("reusable");
    let (response, _) = exchange(conn, &mut server, get("/second"), second).await;
    (grown, first.headers().capacity(), response)
}

#[tokio::test]
async fn a_response_head_is_read_into_the_map_of_the_request_before_it() {
    let (grown, first, second) = after_a_request_with(
        40,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Up: yes\r\n\r\n",
    )
    .await;
    assert!(grown >= 41);
    // The first response on a connection gets a map of its own, sized for
    // its head.
    assert!(first < grown);
    // The second is read into the first request's map, emptied.
    assert_eq!(second.headers().capacity(), grown);
    assert_eq!(second.headers().len(), 2);
    assert_eq!(second.headers()["x-up"], "yes");
    assert_eq!(second.headers()[header::CONTENT_LENGTH], "0");
}

#[tokio::test]
async fn a_request_map_grown_past_the_usual_size_is_not_kept() {
    let (grown, _, second) = after_a_request_with(
        MAX_SPARE_MAP,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(grown > MAX_SPARE_MAP);
    assert!(second.headers().capacity() <= MAX_SPARE_MAP);
}
