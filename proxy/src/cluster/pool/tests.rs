//! The pool against real upstream sockets on loopback: reuse, giving a
//! connection back only once its response was read to the end, bounded
//! redials, and who is blamed for a broken request body.

use std::sync::atomic::AtomicUsize;

use http::Uri;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

fn settings() -> PoolSettings {
    PoolSettings {
        cluster: "test".into(),
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        max_idle: 8,
        metrics: Arc::new(ClusterMetrics::default()),
        tls: None,
        max_connections: 1024,
        max_pending: 1024,
    }
}

/// What a test upstream does with each connection it accepts.
#[derive(Clone, Copy)]
enum Upstream {
    /// Answers every request on the connection with `body`.
    Serve { body: &'static [u8] },
    /// Closes the connection at once.
    Close,
}

/// Starts an upstream; returns its address and a count of the connections
/// it accepted.
async fn upstream(behaviour: Upstream) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Relaxed);
            let Upstream::Serve { body } = behaviour else {
                drop(stream);
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request head (and no body) per exchange.
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                    if stream.write_all(head.as_bytes()).await.is_err()
                        || stream.write_all(body).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A real downstream request body: a request sent through an in-process
/// hyper server, whose handler hands the request over. `raw` is what the
/// client writes after the request line and Host.
async fn downstream_request(raw: &'static [u8]) -> Request<RequestBody> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(req);
            }
            // Never answers: the test holds the request.
            std::future::pending::<Result<Response<http_body_util::Empty<Bytes>>, hyper::Error>>()
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), service)
            .await;
    });
    let mut client = client;
    client.write_all(raw).await.unwrap();
    // The client half stays open for the test's life.
    tokio::spawn(async move {
        let mut sink = [0u8; 1024];
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let req = rx.await.unwrap();
    let mut req = req.map(|body| RequestBody::new(crate::body::ClientBody::H2 { body }));
    *req.uri_mut() = Uri::from_static("/");
    req
}

async fn get() -> Request<RequestBody> {
    downstream_request(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await
}

#[tokio::test]
async fn a_connection_goes_back_to_the_pool_only_once_its_response_is_read() {
    let (addr, accepted) = upstream(Upstream::Serve { body: b"hello" }).await;
    let endpoint = Arc::new(Endpoint::new(addr, 1, settings()));
    for _ in 0..3 {
        let response = endpoint
            .send(get().await, Wire::Http1, endpoint.begin(), None)
            .await
            .unwrap();
        assert_eq!(endpoint.idle_connections(), 0, "taken while in use");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        assert_eq!(endpoint.idle_connections(), 1, "given back at the end");
    }
    assert_eq!(accepted.load(Relaxed), 1, "one connection served all three");
    assert_eq!(endpoint.active(), 0);
    assert_eq!(endpoint.total(), 3);
}

#[tokio::test]
async fn an_upgrade_goes_out_on_a_pooled_connections_socket_which_is_not_pooled_again() {
    let (addr, accepted) = upstream(Upstream::Serve { body: b"hello" }).await;
    let endpoint = Arc::new(Endpoint::new(addr, 1, settings()));
    let response = endpoint
        .send(get().await, Wire::Http1, endpoint.begin(), None)
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(endpoint.idle_connections(), 1);
    // Sent by hyper's client, on the idle connection's socket; this
    // upstream declines to upgrade and answers as usual.
    let upgrade = downstream_request(
        b"GET / HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    )
    .await;
    let response = endpoint
        .send(upgrade, Wire::Http1, endpoint.begin(), None)
        .await
        .unwrap();
    assert_eq!(endpoint.idle_connections(), 0);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello");
    assert_eq!(accepted.load(Relaxed), 1, "the pooled socket was used");
    assert_eq!(
        endpoint.idle_connections(),
        0,
        "hyper's connection is not pooled again"
    );
}

#[tokio::test]
async fn a_response_dropped_before_its_end_takes_its_connection_with_it() {
    let (addr, accepted) = upstream(Upstream::Serve {
        body: &[b'x'; 256 * 1024],
    })
    .await;
    let endpoint = Arc::new(Endpoint::new(addr, 1, settings()));
    let response = endpoint
        .send(get().await, Wire::Http1, endpoint.begin(), None)
        .await
        .unwrap();
    drop(response);
    assert_eq!(endpoint.idle_connections(), 0);
    let response = endpoint
        .send(get().await, Wire::Http1, endpoint.begin(), None)
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 256 * 1024);
    assert_eq!(
        accepted.load(Relaxed),
        2,
        "the unread connection was not reused"
    );
}

#[tokio::test]
async fn an_upstream_that_closes_every_connection_gets_a_bounded_number_of_dials() {
    let (addr, accepted) = upstream(Upstream::Close).await;
    let endpoint = Arc::new(Endpoint::new(addr, 1, settings()));
    let result = endpoint
        .send(get().await, Wire::Http1, endpoint.begin(), None)
        .await;
    assert!(
        matches!(result, Err(ProxyError::UpstreamReset { .. })),
        "{result:?}"
    );
    let dials = accepted.load(Relaxed);
    assert!(
        (1..=MAX_FRESH_CONNECTION_FAILURES as usize).contains(&dials),
        "{dials} dials"
    );
}

#[tokio::test]
async fn a_broken_downstream_body_is_blamed_on_the_client() {
    let (addr, _) = upstream(Upstream::Serve { body: b"unused" }).await;
    let endpoint = Arc::new(Endpoint::new(addr, 1, settings()));
    let mut req = downstream_request(
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    )
    .await;
    *req.method_mut() = http::Method::POST;
    let result = endpoint
        .send(req, Wire::Http1, endpoint.begin(), None)
        .await;
    match result {
        Err(error @ ProxyError::DownstreamBody { .. }) => {
            assert_eq!(error.origin(), crate::error::Origin::Downstream);
            assert_eq!(error.status(), http::StatusCode::BAD_REQUEST);
        }
        other => panic!("expected the client's fault, got {other:?}"),
    }
    assert_eq!(
        endpoint.idle_connections(),
        0,
        "a half-sent request's connection is not reused"
    );
}

#[tokio::test]
async fn a_refused_connect_is_counted_and_safe_to_retry() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let endpoint = Arc::new(Endpoint::new(addr, 1, settings()));
    let result = endpoint
        .send(get().await, Wire::Http1, endpoint.begin(), None)
        .await;
    let error = result.unwrap_err();
    assert!(
        matches!(error, ProxyError::UpstreamConnect { .. }),
        "{error:?}"
    );
    assert_eq!(error.retry_safety(), crate::error::RetrySafety::NotSent);
    assert_eq!(endpoint.connect_failures(), 1);
}

#[tokio::test]
async fn beyond_max_connections_a_request_waits_for_the_connection_and_beyond_max_pending_is_refused()
 {
    let (addr, accepted) = upstream(Upstream::Serve { body: b"hello" }).await;
    let settings = PoolSettings {
        max_connections: 1,
        max_pending: 1,
        ..settings()
    };
    let metrics = settings.metrics.clone();
    let endpoint = Arc::new(Endpoint::new(addr, 1, settings));
    // The first response holds the only connection until its body is read.
    let first = endpoint
        .send(get().await, Wire::Http1, endpoint.begin(), None)
        .await
        .unwrap();
    assert_eq!(metrics.connections_held.load(Relaxed), 1);
    let waiting = {
        let endpoint = endpoint.clone();
        let req = get().await;
        tokio::spawn(async move {
            endpoint
                .send(req, Wire::Http1, endpoint.begin(), None)
                .await
        })
    };
    while metrics.requests_pending.load(Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    // One waits already: the next is refused at once.
    let refused = endpoint
        .send(get().await, Wire::Http1, endpoint.begin(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, ProxyError::Overflow { .. }),
        "{refused:?}"
    );
    assert_eq!(metrics.pending_overflows.load(Relaxed), 1);
    // The first body read to its end gives the connection back, to the
    // waiting request.
    first.into_body().collect().await.unwrap();
    let second = waiting.await.unwrap().unwrap();
    assert_eq!(
        second.into_body().collect().await.unwrap().to_bytes(),
        "hello"
    );
    assert_eq!(accepted.load(Relaxed), 1, "one connection served both");
    assert_eq!(metrics.requests_pending.load(Relaxed), 0);
    assert_eq!(metrics.connections_overflow.load(Relaxed), 2);
}
