//! `weft-bench otlp-receiver`: an OTLP trace receiver (gRPC and
//! HTTP/protobuf) that accepts and counts spans, as the collector of a
//! tracing benchmark (`benches/scripts/*.sh` substitute its address for
//! `@COLLECTOR@`). It keeps the latest spans in memory only.

use std::net::SocketAddr;

use anyhow::Context as _;

/// `weft-bench otlp-receiver` flags.
#[derive(Debug, clap::Args)]
pub struct OtlpArgs {
    /// OTLP/gRPC address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4317")]
    pub grpc: SocketAddr,
    /// OTLP/HTTP address (`POST /v1/traces`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4318")]
    pub http: SocketAddr,
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
        let receiver = weft_cp::otlp::Receiver::bind(args.grpc, args.http)
            .await
            .context("binding the receiver")?;
        println!("{} {}", receiver.grpc_url(), receiver.http_url());
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        eprintln!(
            "received {} exports, the last {} spans kept",
            receiver.exports(),
            receiver.spans().len()
        );
        anyhow::Ok(())
    })
}
