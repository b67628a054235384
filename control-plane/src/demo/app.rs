//! The demo's applications: one small HTTP server per workload that says
//! who answered (service, workload, version) and, for a service that calls
//! others, calls each of them through its sidecar's outbound listener (a
//! TCP service through its `tcp_outbound` port), so that one request shows
//! the whole path through the mesh; and for a TCP service, a server of
//! lines. Also the plain HTTP/1.1 client the demo uses.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the demo waits for any one HTTP exchange.
pub(crate) const HTTP_TIMEOUT: Duration = Duration::from_secs(3);

/// What one demo application is.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) service: String,
    pub(crate) workload: String,
    pub(crate) version: Option<String>,
    /// Serve HTTP/2 (prior knowledge) rather than HTTP/1.1.
    pub(crate) is_http2: bool,
    /// Speak lines over TCP rather than HTTP (a `tcp` service).
    pub(crate) is_tcp: bool,
    /// Its sidecar's outbound listener and the services it calls there.
    pub(crate) outbound: Option<SocketAddr>,
    pub(crate) calls: Vec<String>,
    /// The TCP services it calls, each at its sidecar's port for it.
    pub(crate) tcp_calls: Vec<(String, SocketAddr)>,
    /// A failure to watch: every this many requests is answered 503.
    pub(crate) fail_every: Option<u64>,
    /// A scheduled outage: 503 to everything while it lasts.
    pub(crate) outage: Option<Outage>,
    /// Requests answered so far.
    pub(crate) served: std::sync::atomic::AtomicU64,
}

/// Down for `down` at the start of every `period` from `since` on.
#[derive(Debug)]
pub(crate) struct Outage {
    pub(crate) since: tokio::time::Instant,
    pub(crate) period: Duration,
    pub(crate) down: Duration,
}

impl Outage {
    fn is_down(&self, now: tokio::time::Instant) -> bool {
        if now < self.since {
            return false;
        }
        let period = self.period.as_nanos().max(1);
        let into = now.saturating_duration_since(self.since).as_nanos() % period;
        into < self.down.as_nanos()
    }
}

/// Serves `app` on `listener` until `stop`.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors: back off instead of spinning.
                    tracing::warn!(workload = %app.workload, %error, "demo application accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let is_http2 = app.is_http2;
        let app = app.clone();
        let stop = stop.clone();
        if app.is_tcp {
            tasks.spawn(async move {
                tokio::select! {
                    () = answer_lines(stream, &app) => {}
                    () = stop.cancelled() => {}
                }
            });
            continue;
        }
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(answer(&app, &request).await) }
            });
            let io = TokioIo::new(stream);
            if is_http2 {
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service);
                tokio::select! {
                    _ = connection => {}
                    () = stop.cancelled() => {}
                }
            } else {
                let connection =
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service);
                tokio::select! {
                    _ = connection => {}
                    () = stop.cancelled() => {}
                }
            }
        });
    }
}

async fn answer(app: &App, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    // Health checks (the backend service's `health_check`) find every
    // workload healthy and do not shift which requests fail on purpose.
    if request.uri().path() == "/healthz" {
        return Response::new(Full::new(Bytes::from_static(b"ok\n")));
    }
    let version = app.version.as_deref().unwrap_or("-");
    let served = app
        .served
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    if let Some(outage) = &app.outage
        && outage.is_down(tokio::time::Instant::now())
    {
        let mut response = Response::new(Full::new(Bytes::from(format!(
            "{} (workload {}): down on purpose ({}s of every {}s)\n",
            app.service,
            app.workload,
            outage.down.as_secs(),
            outage.period.as_secs()
        ))));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return response;
    }
    if let Some(every) = app.fail_every
        && served.is_multiple_of(every)
    {
        let mut response = Response::new(Full::new(Bytes::from(format!(
            "{} (workload {}): a failure on purpose, one request in {every}\n",
            app.service, app.workload
        ))));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return response;
    }
    // The caller's identity, as its sidecar proved it over mutual TLS and
    // this workload's sidecar passed it on.
    let caller = request
        .headers()
        .get("x-forwarded-client-cert")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .split(';')
                .find_map(|part| part.strip_prefix("URI="))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "no client certificate".to_owned());
    let mut body = format!(
        "{} (workload {}, version {version}) answered {} {} (caller: {caller})\n",
        app.service,
        app.workload,
        request.method(),
        request.uri().path()
    );
    if let Some(outbound) = app.outbound {
        // An application in a traced mesh passes its request's trace
        // context on to the calls it makes for it, so that the calls join
        // the request's trace (as Istio and Linkerd ask of applications).
        let context: Vec<(&str, &str)> = ["traceparent", "tracestate"]
            .into_iter()
            .filter_map(|name| {
                let value = request.headers().get(name)?.to_str().ok()?;
                Some((name, value))
            })
            .collect();
        for callee in &app.calls {
            let line = match get(outbound, callee, "/", &context).await {
                Ok((status, _, text)) => format!(
                    "  -> {callee}: {status} {}",
                    text.lines().next().unwrap_or("")
                ),
                Err(error) => format!("  -> {callee}: failed: {error}"),
            };
            body.push_str(&line);
            body.push('\n');
        }
    }
    for (callee, address) in &app.tcp_calls {
        let asked = format!("balance for {}", request.uri().path());
        let line = match tcp_line(*address, &asked).await {
            Ok(answer) => format!("  -> {callee}: {answer}"),
            Err(error) => format!("  -> {callee}: failed: {error}"),
        };
        body.push_str(&line);
        body.push('\n');
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-demo-service", app.service.as_str()),
        ("x-demo-workload", app.workload.as_str()),
        ("x-demo-version", version),
    ] {
        if let Ok(value) = http::HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
    }
    response
}

/// The most bytes of one line a TCP demo application reads.
const MAX_LINE: usize = 1024;

/// A TCP service's application: answers each line with one line that says
/// who answered, until the client closes (or sends a line too long).
async fn answer_lines(stream: TcpStream, app: &App) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read.take(64 * MAX_LINE as u64)).lines();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(HTTP_TIMEOUT, lines.next_line()).await {
        if line.len() > MAX_LINE {
            return;
        }
        app.served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let answer = format!(
            "{} (workload {}) answered {:?} over tcp\n",
            app.service,
            app.workload,
            line.trim()
        );
        if write.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// One line sent to a TCP service over a new connection and the one line
/// it answered.
pub(crate) async fn tcp_line(address: SocketAddr, line: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = TcpStream::connect(address).await?;
        stream.write_all(format!("{line}\n").as_bytes()).await?;
        let mut answer = String::new();
        tokio::io::BufReader::new(stream.take(MAX_LINE as u64))
            .read_line(&mut answer)
            .await?;
        if answer.is_empty() {
            anyhow::bail!("the connection closed without an answer");
        }
        anyhow::Ok(answer.trim_end().to_owned())
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))?
}

/// A new trace id (32 hex digits) and span id (16), for a request the
/// demo starts a trace with.
pub(crate) fn random_ids() -> (String, String) {
    let high = fastrand::u64(1..);
    (
        format!("{high:016x}{:016x}", fastrand::u64(..)),
        format!("{:016x}", fastrand::u64(1..)),
    )
}

/// One HTTP/1.1 GET over a new connection: status, `x-demo-workload` (who
/// answered, if a demo application did) and the body as text.
pub(crate) async fn get(
    address: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(StatusCode, Option<String>, String)> {
    let exchange = async {
        let stream = TcpStream::connect(address).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let mut builder = Request::get(path).header(http::header::HOST, host);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Empty::<Bytes>::new())?;
        // The connection task ends when `sender` is dropped below.
        tokio::spawn(connection);
        let response = sender.send_request(request).await?;
        let status = response.status();
        let version = response
            .headers()
            .get("x-demo-workload")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, version, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_repeats_on_its_schedule() {
        let start = tokio::time::Instant::now();
        let outage = Outage {
            since: start + Duration::from_secs(15),
            period: Duration::from_secs(30),
            down: Duration::from_secs(8),
        };
        let at = |s: u64| outage.is_down(start + Duration::from_secs(s));
        assert!(!at(0) && !at(14));
        assert!(at(15) && at(22));
        assert!(!at(23) && !at(44));
        assert!(at(45) && at(52) && !at(53));
    }
}
