//! `weft-bench otlp-receiver`: the collector of a tracing benchmark. It
//! accepts OTLP trace exports over gRPC (HTTP/2, `TraceService/Export`)
//! and OTLP/HTTP (`POST`), reads each body and answers success without
//! decoding it, so that the collector costs the machine as little as
//! possible (a decoding collector on the load generator's core would make
//! the generator side the bottleneck). `benches/scripts/*.sh` substitute
//! its address for `@COLLECTOR@`. For a receiver that decodes and keeps
//! spans, see `weft_cp::otlp`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// `weft-bench otlp-receiver` flags.
#[derive(Debug, clap::Args)]
pub struct OtlpArgs {
    /// OTLP/gRPC address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4317")]
    pub grpc: SocketAddr,
    /// OTLP/HTTP address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4318")]
    pub http: SocketAddr,
}

#[derive(Debug, Default)]
struct Counts {
    exports: AtomicU64,
    bytes: AtomicU64,
}

/// Receives until SIGINT or SIGTERM, then prints what arrived.
pub fn run(args: &OtlpArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let grpc = TcpListener::bind(args.grpc)
            .await
            .context("binding --grpc")?;
        let http = TcpListener::bind(args.http)
            .await
            .context("binding --http")?;
        println!(
            "http://{} http://{}/v1/traces",
            grpc.local_addr()?,
            http.local_addr()?
        );
        let counts = Arc::new(Counts::default());
        tokio::spawn(accept(grpc, counts.clone(), true));
        tokio::spawn(accept(http, counts.clone(), false));
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        eprintln!(
            "received {} exports, {} bytes",
            counts.exports.load(Relaxed),
            counts.bytes.load(Relaxed)
        );
        anyhow::Ok(())
    })
}

async fn accept(listener: TcpListener, counts: Arc<Counts>, grpc: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let counts = counts.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let counts = counts.clone();
                async move {
                    let size = request
                        .into_body()
                        .collect()
                        .await
                        .map_or(0, |body| body.to_bytes().len());
                    counts.exports.fetch_add(1, Relaxed);
                    counts.bytes.fetch_add(size as u64, Relaxed);
                    let mut response = Response::new(Full::new(Bytes::new()));
                    let headers = response.headers_mut();
                    if grpc {
                        // A trailers-only answer: status in the headers.
                        headers
                            .insert("content-type", HeaderValue::from_static("application/grpc"));
                        headers.insert("grpc-status", HeaderValue::from_static("0"));
                    } else {
                        headers.insert(
                            "content-type",
                            HeaderValue::from_static("application/x-protobuf"),
                        );
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let io = TokioIo::new(stream);
            if grpc {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            }
        });
    }
}
