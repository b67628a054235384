//! `weft-bench otlp-receiver`: the collector of a tracing benchmark. It
//! accepts OTLP trace exports over gRPC and OTLP/HTTP and answers success
//! without decoding them (`weft_cp::otlp::Receiver::bind_counting`), so that
//! the collector costs the machine little: a decoding collector on the load
//! generator's core would make the generator side the bottleneck.
//! `benches/scripts/*.sh` substitute its address for `@COLLECTOR@`.

use std::net::SocketAddr;

use anyhow::Context as _;

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
        let receiver = weft_cp::otlp::Receiver::bind_counting(args.grpc, args.http)
            .await
            .context("binding the receiver")?;
        println!("{} {}", receiver.grpc_url(), receiver.http_url());
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        eprintln!(
            "received {} exports, {} bytes",
            receiver.exports(),
            receiver.bytes()
        );
        anyhow::Ok(())
    })
}
