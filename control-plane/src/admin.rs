//! The control plane's admin HTTP API, on its own address (HTTP/1.1, one
//! request per connection):
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /status` | JSON [`crate::status::StatusReport`]: mesh generation, last config error, connected proxies |
//! | `GET /metrics` | Prometheus text: `weft_cp_*` counters and gauges |
//! | `GET /ready` | `200 ready`, or `503 draining` once shutdown began |
//!
//! `/status` and `/metrics` require the same bearer token as xDS (they
//! expose the mesh's state) unless the server is insecure. `/ready` does
//! not: it reveals nothing, and orchestrators' probes carry no token.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument as _, debug, warn};

use crate::xds::Shared;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the admin API until the server drains.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.drain().cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                shared.tasks().spawn(
                    serve_connection(stream, peer, Arc::clone(&shared))
                        .instrument(tracing::debug_span!("conn", peer.addr = %peer)),
                );
            }
            Err(error) => {
                warn!(error = %error, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    () = shared.drain().cancelled() => return,
                }
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let handler_shared = Arc::clone(&shared);
    let handler = service_fn(move |request: Request<Incoming>| {
        let response = handle(&handler_shared, &request, peer);
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false);
    let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), handler));
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shared.drain().cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                () = shared.abort().cancelled() => return,
            }
        }
    };
    if let Err(error) = result {
        debug!(error = %error, "admin connection closed with an error");
    }
}

fn handle(shared: &Shared, request: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match request.uri().path() {
        "/ready" => {
            if shared.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
        }
        "/status" | "/metrics" if !shared.authorize(request.headers(), peer) => {
            let mut response = text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
        "/status" => match serde_json::to_vec_pretty(&shared.status_report()) {
            Ok(json) => body(StatusCode::OK, "application/json", json.into()),
            Err(error) => {
                warn!(error = %error, "encoding the status failed");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "status encoding failed\n",
                )
            }
        },
        "/metrics" => body(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics_text().into(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, message: &'static str) -> Response<Full<Bytes>> {
    body(status, "text/plain", Bytes::from_static(message.as_bytes()))
}

fn body(status: StatusCode, content_type: &'static str, bytes: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
