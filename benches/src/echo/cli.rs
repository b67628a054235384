//! `weft-bench echo`: runs the echo servers until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use anyhow::Context as _;
use tracing::{info, warn};

use super::{EchoOptions, EchoServer, TcpEchoServer};

/// How long shutdown waits for in-flight requests before closing what
/// remains.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Flags of `weft-bench echo`.
#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// Address for HTTP/1.1, h2c, gRPC and upgrades (port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Also run an opaque TCP echo on this address.
    #[arg(long, value_name = "ADDR")]
    pub tcp: Option<SocketAddr>,
    /// Name sent in `x-echo-server` (default: the bound HTTP address).
    #[arg(long)]
    pub name: Option<String>,
    /// Worker threads (default: the number of cores).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<NonZeroUsize>,
}

/// Runs the echo servers on a runtime of `--concurrency` workers until
/// SIGINT or SIGTERM. Prints one line per listener to stdout:
/// `echo listening on http://ADDR`, then `echo listening on tcp://ADDR`.
///
/// # Errors
///
/// When the runtime cannot be built, an address cannot be bound or the
/// signal handlers cannot be installed.
pub fn run(args: &EchoArgs) -> anyhow::Result<()> {
    let workers = args
        .concurrency
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("building the echo runtime")?;
    runtime.block_on(serve(args, workers))
}

async fn serve(args: &EchoArgs, workers: usize) -> anyhow::Result<()> {
    // Before the addresses are printed, so that a SIGTERM sent as soon as
    // they are read drains rather than kills.
    let mut shutdown = ShutdownSignal::install()?;
    let http = EchoServer::bind(EchoOptions {
        listen: args.listen,
        name: args.name.clone(),
    })
    .await?;
    println!("echo listening on http://{}", http.local_addr());
    let tcp = match args.tcp {
        Some(addr) => {
            let tcp = TcpEchoServer::bind(addr).await?;
            println!("echo listening on tcp://{}", tcp.local_addr());
            Some(tcp)
        }
        None => None,
    };
    info!(
        http = %http.local_addr(),
        tcp = ?tcp.as_ref().map(TcpEchoServer::local_addr),
        name = http.name(),
        workers,
        "echo started"
    );

    shutdown.recv().await;
    info!("echo draining");
    let drain = async {
        http.shutdown().await;
        if let Some(tcp) = tcp {
            tcp.shutdown().await;
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        warn!(timeout = ?DRAIN_TIMEOUT, "drain timed out; closing remaining connections");
    }
    info!("echo stopped");
    Ok(())
}

/// SIGINT and SIGTERM, watched from [`ShutdownSignal::install`] on.
struct ShutdownSignal {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Completes at the next SIGINT or SIGTERM.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
