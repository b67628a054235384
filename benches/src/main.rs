//! `weft-bench`: the bench harness's command line.
//!
//! Only parses flags, sets up logging (stderr; `RUST_LOG` filters, `info` by
//! default) and hands each subcommand to its library module, which builds
//! its own runtime (worker counts differ per subcommand). Stdout is kept for
//! the subcommands' machine-readable output.

use std::io::IsTerminal as _;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Weft's bench harness.
#[derive(Debug, Parser)]
#[command(name = "weft-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the echo upstream: HTTP/1.1, h2c, gRPC and upgrades on one port,
    /// and optionally an opaque TCP echo.
    Echo(weft_bench::echo::EchoArgs),
    /// Generate HTTP/1.1, h2c, gRPC or TCP load against a loopback target
    /// and report throughput, errors and latency.
    Load(weft_bench::load::LoadArgs),
    /// Compare direct, weft, nginx and HAProxy on the same scenarios and
    /// report tables, JSON and latency charts.
    Compare(weft_bench::compare::CompareArgs),
    /// Measure the control plane: push convergence time and memory per
    /// connected proxy, with N simulated proxies on ADS.
    Xds(weft_bench::xds::XdsArgs),
    /// Receive and count OTLP spans (gRPC and HTTP/protobuf): the collector
    /// of a tracing benchmark.
    OtlpReceiver(weft_bench::otlp::OtlpArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Echo(args) => weft_bench::echo::run(&args),
        Command::Load(args) => weft_bench::load::run_cli(&args),
        Command::Compare(args) => weft_bench::compare::run_cli(&args),
        Command::Xds(args) => weft_bench::xds::run_cli(&args),
        Command::OtlpReceiver(args) => weft_bench::otlp::run(&args),
    }
}
