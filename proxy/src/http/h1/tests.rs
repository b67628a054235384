use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::*;

type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

const LIMITS: Limits = Limits {
    max_head: 8192,
    max_headers: 100,
};

/// A connected pair: the client's socket and the server's end.
async fn pair() -> (TcpStream, DownstreamIo) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, DownstreamIo::plain_for_test(server))
}

fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// What the echo handler saw of a request.
fn describe(req: &Request<IncomingBody>) -> String {
    format!("{} {} {:?}", req.method(), req.uri(), req.version())
}

/// Answers every request with its method, target and version, then its
/// body as read (or the body's error), counting the requests it saw.
async fn echo(req: Request<IncomingBody>) -> Result<Response<TestBody>, Infallible> {
    let seen = describe(&req);
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            let mut response = Response::new(full(format!("body error: {error}")));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(response);
        }
    };
    let mut text = seen.into_bytes();
    text.push(b'|');
    text.extend_from_slice(&body);
    Ok(Response::new(full(text)))
}

/// How a served connection ended.
struct Ended {
    result: Result<(), Failure>,
    io: Option<(DownstreamIo, bool)>,
}

/// Serves `io` with `handler`; `calls` counts the requests made.
fn serve<H, Fut>(io: DownstreamIo, limits: Limits, handler: H) -> tokio::task::JoinHandle<Ended>
where
    H: Fn(Request<IncomingBody>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<TestBody>, Infallible>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut server = Server::new(io, limits, handler);
        let result = std::future::poll_fn(|cx| server.poll(cx)).await;
        // As the connection's caller does: the socket closes unless an
        // upgrade took it.
        let io = match server.into_io() {
            Some((io, true)) => Some((io, true)),
            Some((mut io, false)) => {
                let _ = io.shutdown().await;
                None
            }
            None => None,
        };
        Ended { result, io }
    })
}

/// Reads until the client's socket closes.
async fn read_to_close(client: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until `text` has arrived.
async fn read_until(client: &mut TcpStream, text: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains(text) {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "waited for {text:?}, got {:?}",
                    String::from_utf8_lossy(&out)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "closed before {text:?}: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn pipelined_keep_alive_requests_are_answered_in_order() {
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, echo);
    client
        .write_all(
            b"GET /one HTTP/1.1\r\nhost: a\r\n\r\n\
              POST /two?q=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc\
              GET /three HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let out = read_to_close(&mut client).await;
    let one = out.find("GET /one HTTP/1.1|").unwrap();
    let two = out.find("POST /two?q=1 HTTP/1.1|abc").unwrap();
    let three = out.find("GET /three HTTP/1.1|").unwrap();
    assert!(one < two && two < three, "{out}");
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{out}");
    // Only the last response, to a client that asked to close, says so.
    assert_eq!(out.matches("connection: close\r\n").count(), 1, "{out}");
    assert!(served.await.unwrap().result.is_ok());
}

#[tokio::test]
async fn a_connection_waits_for_its_next_request_holding_no_buffer() {
    use crate::wire::spare;
    let (mut client, io) = pair().await;
    let before = spare::kept();
    // A response with a header: its map is the one given back.
    let served = serve(io, LIMITS, |req| async {
        let mut response = echo(req).await?;
        let served = HeaderValue::from_static("yes");
        response.headers_mut().insert("x-served", served);
        Ok(response)
    });
    for path in ["/one", "/two"] {
        client
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_until(&mut client, &format!("GET {path} HTTP/1.1|")).await;
        // The response is written by the poll that then gives the
        // buffers back: on this one thread, before the client reads it.
        assert_eq!(
            spare::kept(),
            (before.0 + 1, before.1 + 1),
            "after {path}: the connection's buffers and its future's box are given back"
        );
    }
    drop(client);
    assert!(served.await.unwrap().result.is_ok());
}

#[tokio::test]
async fn connections_take_each_others_buffers_and_keep_a_pipelined_request() {
    let (mut one, io) = pair().await;
    let served_one = serve(io, LIMITS, echo);
    let (mut two, io) = pair().await;
    let served_two = serve(io, LIMITS, echo);
    one.write_all(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut one, "GET /a HTTP/1.1|").await;
    // The second connection reads with the buffers the first gave back.
    two.write_all(b"POST /b HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nxyz")
        .await
        .unwrap();
    read_until(&mut two, "POST /b HTTP/1.1|xyz").await;
    // Two requests in one write: the second is in the read buffer when
    // the first's response is done, so the buffer stays with its
    // connection, and the second is answered.
    one.write_all(
        b"GET /c HTTP/1.1\r\nhost: a\r\n\r\nPOST /d HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nok",
    )
    .await
    .unwrap();
    let out = read_until(&mut one, "POST /d HTTP/1.1|ok").await;
    assert!(out.contains("GET /c HTTP/1.1|"), "{out}");
    // A body larger than the read buffer's first size grows it; the
    // connection goes on with what it is given next.
    let big = "x".repeat(40 * 1024);
    two.write_all(
        format!(
            "POST /e HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n{big}",
            big.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    read_until(&mut two, &format!("POST /e HTTP/1.1|{big}")).await;
    for client in [&mut one, &mut two] {
        client
            .write_all(b"GET /f HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let out = read_to_close(client).await;
        assert!(out.contains("GET /f HTTP/1.1|"), "{out}");
    }
    assert!(served_one.await.unwrap().result.is_ok());
    assert!(served_two.await.unwrap().result.is_ok());
}

#[tokio::test]
async fn bodies_are_read_whole_with_the_head_or_streamed_and_chunks_decoded() {
    let (mut client, io) = pair().await;
    let streamed = Arc::new(AtomicUsize::new(0));
    let seen = streamed.clone();
    let served = serve(io, LIMITS, move |req: Request<IncomingBody>| {
        if matches!(req.body(), IncomingBody::Streaming(..)) {
            seen.fetch_add(1, Ordering::Relaxed);
        }
        echo(req)
    });
    // A body that came with its head is a slice of it, not a stream.
    client
        .write_all(b"PUT /small HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello")
        .await
        .unwrap();
    read_until(&mut client, "|hello").await;
    assert_eq!(streamed.load(Ordering::Relaxed), 0);
    // One that arrives later streams.
    client
        .write_all(b"PUT /later HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n01234")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.write_all(b"56789").await.unwrap();
    read_until(&mut client, "|0123456789").await;
    assert_eq!(streamed.load(Ordering::Relaxed), 1);
    // Chunks, with an extension, split across writes, then trailers.
    client
        .write_all(b"POST /chunks HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n3;ext=1\r\nabc\r\n")
        .await
        .unwrap();
    client
        .write_all(b"2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, "|abcde").await;
    drop(client);
    assert!(served.await.unwrap().result.is_ok());
}

/// Sends `request` on a new connection: what came back, whether the
/// handler was called, and how the connection ended.
async fn one_shot(request: &[u8], limits: Limits) -> (String, usize, Ended) {
    let (mut client, io) = pair().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let served = serve(io, limits, move |req| {
        counted.fetch_add(1, Ordering::Relaxed);
        echo(req)
    });
    client.write_all(request).await.unwrap();
    let out = read_to_close(&mut client).await;
    let ended = served.await.unwrap();
    (out, calls.load(Ordering::Relaxed), ended)
}

#[tokio::test]
async fn framing_a_client_gets_wrong_is_400_before_anything_is_forwarded() {
    let cases: &[(&str, &[u8])] = &[
        (
            "content-length beside transfer-encoding",
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "transfer-encoding not ending in chunked",
            b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
        ),
        (
            "transfer-encoding in HTTP/1.0",
            b"POST / HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "a signed content-length",
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: +3\r\n\r\nabc",
        ),
        (
            "conflicting content-lengths",
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        ),
        (
            "conflicting values in one content-length",
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3, 4\r\n\r\nabcd",
        ),
        (
            "a space before the colon",
            b"GET / HTTP/1.1\r\nhost : a\r\n\r\n",
        ),
        ("HTTP/2 on an HTTP/1 line", b"GET / HTTP/2.0\r\nhost: a\r\n\r\n"),
        ("a bare LF inside the request line", b"GET /\n HTTP/1.1\r\n\r\n"),
        (
            "a control character in a value",
            b"GET / HTTP/1.1\r\nhost: a\x01b\r\n\r\n",
        ),
    ];
    for (case, request) in cases {
        let (out, calls, ended) = one_shot(request, LIMITS).await;
        assert!(
            out.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{case}: {out}"
        );
        assert!(out.contains("connection: close\r\n"), "{case}: {out}");
        assert_eq!(calls, 0, "{case}: reached the handler");
        assert!(
            matches!(ended.result, Err(Failure::Rejected { status: 400, .. })),
            "{case}"
        );
    }
    // Repeated equal lengths are one length.
    let (out, calls, _) = one_shot(
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc",
        LIMITS,
    )
    .await;
    assert!(out.contains("|abc"), "{out}");
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn heads_past_the_limits_are_431() {
    let limits = Limits {
        max_head: 1024,
        max_headers: 4,
    };
    let mut many = b"GET / HTTP/1.1\r\nhost: a\r\n".to_vec();
    for i in 0..4 {
        many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let (out, calls, ended) = one_shot(&many, limits).await;
    assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    assert_eq!(calls, 0);
    assert!(matches!(
        ended.result,
        Err(Failure::Rejected { status: 431, .. })
    ));
    // A target longer than a URI can be.
    let mut target = b"GET /".to_vec();
    target.extend(std::iter::repeat_n(b'a', usize::from(u16::MAX)));
    target.extend_from_slice(b" HTTP/1.1\r\nhost: a\r\n\r\n");
    let (out, calls, _) = one_shot(
        &target,
        Limits {
            max_head: 128 * 1024,
            max_headers: 4,
        },
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{out}");
    assert_eq!(calls, 0);
    // A head still unfinished at the size limit.
    let mut long = b"GET / HTTP/1.1\r\nhost: a\r\nx-long: ".to_vec();
    long.extend(std::iter::repeat_n(b'v', 2000));
    let (out, calls, _) = one_shot(&long, limits).await;
    assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    assert_eq!(calls, 0);
}

/// A response whose body has no length known in advance.
fn streamed(parts: &[&'static str]) -> TestBody {
    let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = parts
        .iter()
        .map(|part| Ok(http_body::Frame::data(Bytes::from_static(part.as_bytes()))))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
}

#[tokio::test]
async fn responses_are_framed_by_length_by_chunks_or_by_the_close() {
    async fn stream_answer(_: Request<IncomingBody>) -> Result<Response<TestBody>, Infallible> {
        Ok(Response::new(streamed(&["ab", "cde"])))
    }
    // HTTP/1.1: chunked, and the connection stays.
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, stream_answer);
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut client, "0\r\n\r\n").await;
    assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
    assert!(
        out.ends_with("\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
        "{out}"
    );
    assert!(!out.contains("content-length"), "{out}");
    drop(client);
    assert!(served.await.unwrap().result.is_ok());
    // HTTP/1.0 cannot read chunks: the body ends with the connection.
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, stream_answer);
    client
        .write_all(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let out = read_to_close(&mut client).await;
    assert!(out.ends_with("connection: close\r\n\r\nabcde"), "{out}");
    assert!(!out.contains("transfer-encoding"), "{out}");
    assert!(served.await.unwrap().result.is_ok());
    // A known length is sent as such, whatever the handler's header says.
    let (out, _, _) = one_shot(
        b"GET /x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        LIMITS,
    )
    .await;
    assert!(out.contains("content-length: 16\r\n"), "{out}");
}

#[tokio::test]
async fn head_204_and_304_responses_have_no_body() {
    async fn answer(req: Request<IncomingBody>) -> Result<Response<TestBody>, Infallible> {
        let status = match req.uri().path() {
            "/204" => StatusCode::NO_CONTENT,
            "/304" => StatusCode::NOT_MODIFIED,
            _ => StatusCode::OK,
        };
        let mut response = Response::new(full("not sent"));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("1234"));
        Ok(response)
    }
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, answer);
    client
        .write_all(
            b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\n\
              GET /204 HTTP/1.1\r\nhost: a\r\n\r\n\
              GET /304 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let out = read_to_close(&mut client).await;
    assert!(!out.contains("not sent"), "{out}");
    let heads: Vec<&str> = out.split("\r\n\r\n").filter(|h| !h.is_empty()).collect();
    assert_eq!(heads.len(), 3, "{out}");
    // HEAD and 304 say how long the body would have been; 204 has none.
    assert!(heads[0].starts_with("HTTP/1.1 200 OK") && heads[0].contains("content-length: 1234"));
    assert!(
        heads[1].starts_with("HTTP/1.1 204 No Content") && !heads[1].contains("content-length")
    );
    assert!(
        heads[2].starts_with("HTTP/1.1 304 Not Modified")
            && heads[2].contains("content-length: 1234")
    );
    assert!(served.await.unwrap().result.is_ok());
}

#[tokio::test]
async fn http_1_0_keeps_the_connection_only_when_asked() {
    let (out, calls, _) = one_shot(b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n", LIMITS).await;
    assert_eq!(calls, 1, "{out}");
    assert!(out.contains("connection: close\r\n"), "{out}");
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, echo);
    client
        .write_all(b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut client, "HTTP/1.0|").await;
    assert!(out.contains("connection: keep-alive\r\n"), "{out}");
    client.write_all(b"GET /b HTTP/1.0\r\n\r\n").await.unwrap();
    let out = read_to_close(&mut client).await;
    assert!(out.contains("GET /b HTTP/1.0|"), "{out}");
    assert!(served.await.unwrap().result.is_ok());
}

#[tokio::test]
async fn a_response_saying_close_ends_the_connection() {
    async fn answer(_: Request<IncomingBody>) -> Result<Response<TestBody>, Infallible> {
        let mut response = Response::new(full("bye"));
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        Ok(response)
    }
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, answer);
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET /next HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let out = read_to_close(&mut client).await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 1, "{out}");
    assert_eq!(out.matches("connection: close").count(), 1, "{out}");
    assert!(served.await.unwrap().result.is_ok());
}

#[tokio::test]
async fn continue_is_sent_when_the_body_is_first_read_and_never_after_an_answer() {
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, echo);
    client
        .write_all(
            b"PUT / HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
        )
        .await
        .unwrap();
    let out = read_until(&mut client, "HTTP/1.1 100 Continue\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 100 Continue\r\n\r\n"), "{out}");
    client.write_all(b"ok").await.unwrap();
    read_until(&mut client, "|ok").await;
    drop(client);
    assert!(served.await.unwrap().result.is_ok());
    // A handler that answers without reading: no 100, and the unsent body
    // means the connection cannot be reused.
    async fn refuse(_: Request<IncomingBody>) -> Result<Response<TestBody>, Infallible> {
        let mut response = Response::new(full("no"));
        *response.status_mut() = StatusCode::FORBIDDEN;
        Ok(response)
    }
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, refuse);
    client
        .write_all(
            b"PUT / HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
        )
        .await
        .unwrap();
    let out = read_to_close(&mut client).await;
    assert!(out.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{out}");
    assert!(!out.contains("100 Continue"), "{out}");
    assert!(out.contains("connection: close\r\n"), "{out}");
    assert!(served.await.unwrap().result.is_ok());
}

#[tokio::test]
async fn an_unread_body_is_skipped_when_it_is_all_here() {
    async fn ignore(req: Request<IncomingBody>) -> Result<Response<TestBody>, Infallible> {
        Ok(Response::new(full(describe(&req))))
    }
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, ignore);
    // The first body is read with its head; the second is chunked (a
    // stream) but all in the buffer by the time its answer is written.
    client
        .write_all(
            b"POST /a HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nxyz\
              POST /b HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n1\r\nq\r\n0\r\n\r\n\
              GET /c HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let out = read_to_close(&mut client).await;
    assert!(
        out.contains("POST /a") && out.contains("POST /b") && out.contains("GET /c"),
        "{out}"
    );
    assert!(served.await.unwrap().result.is_ok());
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_request() {
    struct Dropped(mpsc::UnboundedSender<()>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, move |_req| {
        let guard = Dropped(tx.clone());
        async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok(Response::new(full("")))
        }
    });
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the request's future is dropped");
    assert!(served.await.unwrap().result.is_ok());
}

#[tokio::test]
async fn a_broken_chunk_fails_the_body_and_the_connection_with_it() {
    let (out, calls, ended) = one_shot(
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\nhost: a\r\n\r\n",
        LIMITS,
    )
    .await;
    assert_eq!(calls, 1, "{out}");
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert!(out.contains("body error"), "{out}");
    assert!(out.contains("connection: close\r\n"), "{out}");
    assert!(ended.result.is_ok());
}

#[tokio::test]
async fn shutdown_ends_a_waiting_connection_and_gives_the_socket_back() {
    let (mut client, io) = pair().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        let mut server = Server::new(io, LIMITS, echo);
        let mut rx = std::pin::pin!(rx);
        let mut asked = false;
        let result = std::future::poll_fn(|cx| {
            if !asked && rx.as_mut().poll(cx).is_ready() {
                asked = true;
                server.shutdown();
            }
            server.poll(cx)
        })
        .await;
        (result, server.into_io())
    });
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, "HTTP/1.1|").await;
    tx.send(()).unwrap();
    let (result, io) = served.await.unwrap();
    assert!(result.is_ok());
    let (_io, upgraded) = io.expect("the socket comes back");
    assert!(!upgraded);
}

#[tokio::test]
async fn a_101_hands_over_the_socket_with_what_followed_it() {
    async fn switch(_: Request<IncomingBody>) -> Result<Response<TestBody>, Infallible> {
        let mut response = Response::new(full(""));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        Ok(response)
    }
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, switch);
    client
        .write_all(
            b"GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\nframe",
        )
        .await
        .unwrap();
    let out = read_until(&mut client, "\r\n\r\n").await;
    assert!(
        out.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{out}"
    );
    assert!(
        out.contains("connection: upgrade\r\n") && out.contains("upgrade: websocket\r\n"),
        "{out}"
    );
    let ended = served.await.unwrap();
    assert!(ended.result.is_ok());
    let (mut io, upgraded) = ended.io.expect("the socket comes back");
    assert!(upgraded);
    let mut rest = [0u8; 5];
    tokio::io::AsyncReadExt::read_exact(&mut io, &mut rest)
        .await
        .unwrap();
    assert_eq!(&rest, b"frame");
}

#[tokio::test]
async fn a_date_is_added_only_when_absent() {
    let (out, _, _) = one_shot(
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        LIMITS,
    )
    .await;
    assert_eq!(out.matches("date: ").count(), 1, "{out}");
    async fn dated(_: Request<IncomingBody>) -> Result<Response<TestBody>, Infallible> {
        let mut response = Response::new(full(""));
        response.headers_mut().insert(
            header::DATE,
            HeaderValue::from_static("Tue, 01 Dec 2026 00:00:00 GMT"),
        );
        Ok(response)
    }
    let (mut client, io) = pair().await;
    let _served = serve(io, LIMITS, dated);
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let out = read_to_close(&mut client).await;
    assert_eq!(out.matches("date: ").count(), 1, "{out}");
    assert!(
        out.contains("date: Tue, 01 Dec 2026 00:00:00 GMT\r\n"),
        "{out}"
    );
}

#[tokio::test]
async fn a_body_kept_past_its_exchange_reads_nothing_of_the_next_request() {
    let (keep_tx, mut keep_rx) = mpsc::unbounded_channel::<IncomingBody>();
    let (mut client, io) = pair().await;
    let served = serve(io, LIMITS, move |req: Request<IncomingBody>| {
        let keep = keep_tx.clone();
        async move {
            let seen = describe(&req);
            if req.uri().path() == "/keep" {
                // Answered (and the rest of the body skipped) while the
                // body is held elsewhere.
                let _ = keep.send(req.into_body());
                return Ok(Response::new(full(seen)));
            }
            echo(req).await
        }
    });
    client
        .write_all(b"POST /keep HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n1\r\nk\r\n0\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, "/keep HTTP/1.1").await;
    let mut stale = keep_rx.recv().await.unwrap();
    client
        .write_all(b"POST /next HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        matches!(stale.frame().await, Some(Err(_)) | None),
        "a stale body yields nothing"
    );
    client.write_all(b"next").await.unwrap();
    read_until(&mut client, "|next").await;
    drop(client);
    assert!(served.await.unwrap().result.is_ok());
}

#[test]
fn mangled_heads_are_refused_or_parsed_never_a_panic() {
    let seeds: &[&[u8]] = &[
        b"GET /a?b=c HTTP/1.1\r\nhost: a\r\nx-y: z\r\n\r\n",
        b"POST http://h:1/p HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\n\r\nabc",
        b"PUT / HTTP/1.0\r\ntransfer-encoding: chunked\r\ncontent-length: 1, 1\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
    ];
    let limits = Limits {
        max_head: 96,
        max_headers: 3,
    };
    let mut rng = fastrand::Rng::with_seed(9);
    let mut names = Vec::new();
    for _ in 0..20_000 {
        let mut bytes = seeds[rng.usize(..seeds.len())].to_vec();
        for _ in 0..rng.usize(1..4) {
            let at = rng.usize(..bytes.len());
            match rng.u8(..4) {
                0 => bytes[at] = rng.u8(..),
                1 => bytes.truncate(at),
                2 => bytes.insert(at, [b'\r', b'\n', b':', b' ', b',', 0x7f][rng.usize(..6)]),
                _ => {
                    bytes.remove(at);
                }
            }
            if bytes.is_empty() {
                bytes.push(b'G');
            }
        }
        let mut read = BytesMut::from(&bytes[..]);
        let mut spare = None;
        if let Ok(Some(head)) = parse_head(&mut read, limits, &mut names, &mut spare) {
            // A head that parsed took exactly its bytes off the buffer.
            assert!(read.len() < bytes.len());
            assert!(head.headers.len() <= limits.max_headers);
        }
    }
}

#[tokio::test]
async fn large_chunks_written_in_pieces_keep_their_framing() {
    const FRAME: usize = 40 * 1024;
    const FRAMES: usize = 8;
    let (mut client, io) = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // Small socket buffers: the server's writes stop part way through
        // its large frames and resume later.
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(4096)
            .unwrap();
        (client, DownstreamIo::plain_for_test(server))
    };
    let served = serve(io, LIMITS, |_req| async {
        let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = (0..FRAMES)
            .map(|i| {
                #[allow(clippy::cast_possible_truncation)]
                let byte = b'a' + i as u8;
                Ok(http_body::Frame::data(Bytes::from(vec![byte; FRAME])))
            })
            .collect();
        Ok(Response::new(
            StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync(),
        ))
    });
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut rest = &out[head_end..];
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            assert_eq!(rest, b"\r\n");
            break;
        }
        body.extend_from_slice(&rest[..size]);
        assert_eq!(&rest[size..size + 2], b"\r\n", "a chunk ends with CRLF");
        rest = &rest[size + 2..];
    }
    assert_eq!(body.len(), FRAME * FRAMES);
    for (i, frame) in body.chunks(FRAME).enumerate() {
        #[allow(clippy::cast_possible_truncation)]
        let byte = b'a' + i as u8;
        assert!(frame.iter().all(|&b| b == byte));
    }
    assert!(served.await.unwrap().result.is_ok());
}
