//! `weft-proxy`: parses flags, builds the runtimes, starts the proxy and
//! waits for SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use weft_proxy::Proxy;
use weft_proxy::config::Config;

/// Weft's L4/L7 proxy.
#[derive(Debug, Parser)]
#[command(name = "weft-proxy", version, about)]
struct Args {
    /// Run from this YAML configuration file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "check_config"])]
    config: Option<PathBuf>,
    /// Validate this configuration file and exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Quick reverse proxy: listen here (with --upstream).
    #[arg(long, value_name = "ADDR", requires = "upstream")]
    listen: Option<String>,
    /// Quick reverse proxy: round-robin over these upstreams.
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        requires = "listen"
    )]
    upstream: Vec<String>,
    /// Quick reverse proxy: serve the admin API here.
    #[arg(long, value_name = "ADDR", requires = "listen")]
    admin: Option<String>,
    /// Worker threads for the data plane.
    #[arg(long, value_name = "N", default_value_t = 2)]
    concurrency: usize,
    /// Log filter (overrides RUST_LOG), e.g. `info` or `weft_proxy=debug`.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Print the bound addresses as one JSON line on stdout once serving.
    #[arg(long)]
    print_addresses: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_level.as_deref());
    if let Some(path) = &args.check_config {
        return match Config::from_file(path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(1)
            }
        };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weft-proxy: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let config = match (&args.config, &args.listen) {
        (Some(path), _) => Config::from_file(path)?,
        (None, Some(listen)) => {
            Config::reverse_proxy(listen, &args.upstream, args.admin.as_deref())?
        }
        (None, None) => {
            anyhow::bail!("nothing to run: pass --config FILE or --listen ADDR --upstream ADDR")
        }
    };
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    // Admin, DNS and other control work run apart from the workers.
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("weft-control")
        .enable_all()
        .build()
        .context("building the control runtime")?;
    let workers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.concurrency)
        .thread_name("weft-worker")
        .enable_all()
        .build()
        .context("building the worker runtime")?;
    let proxy = workers.block_on(Proxy::start(config, control.handle().clone()))?;
    if args.print_addresses {
        println!(
            "{}",
            serde_json::to_string(proxy.addresses()).context("encoding addresses")?
        );
    }
    workers.block_on(async {
        shutdown_signal().await;
        proxy.shutdown().await;
    });
    workers.shutdown_timeout(std::time::Duration::from_millis(100));
    control.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the proxy");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::try_new(f),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    }
    .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
