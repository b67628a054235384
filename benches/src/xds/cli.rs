//! `weft-bench xds`: flags, CPU placement, the runtime, and the outputs
//! (markdown or JSON on stdout; `report.md` and `report.json` with
//! `--out`).

use std::num::NonZeroUsize;
use std::path::PathBuf;

use anyhow::Context as _;

use super::{XdsConfig, render_markdown, run};
use crate::compare::Placement;

/// Flags of `weft-bench xds`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
For each proxy count, generates a mesh directory, starts `weft-cp serve` on it \
(pinned to CPU 0 when the machine has two or more; this process moves to the \
others), connects that many simulated proxies over ADS (one TCP connection and \
stream each) and rewrites one mesh file per round. Reports initial and push \
convergence, control-plane memory per connected proxy and CPU per push.")]
pub struct XdsArgs {
    /// Proxy counts, comma separated.
    #[arg(
        long,
        value_name = "N,..",
        value_delimiter = ',',
        default_value = "1,100,1000,5000"
    )]
    pub proxies: Vec<usize>,
    /// Mesh changes per proxy count (medians are reported).
    #[arg(long, value_name = "R", default_value = "3")]
    pub rounds: NonZeroUsize,
    /// The weft-cp binary (default: `weft-cp` beside this executable).
    #[arg(long, value_name = "PATH")]
    pub cp: Option<PathBuf>,
    /// Print the JSON report instead of markdown.
    #[arg(long)]
    pub json: bool,
    /// Also write `report.md` and `report.json` into this directory.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Do not pin the control plane and this process to separate CPUs.
    #[arg(long)]
    pub no_pin: bool,
    /// Clients connecting at once.
    #[arg(long, value_name = "C", default_value = "64")]
    pub connect_concurrency: NonZeroUsize,
}

/// Runs `weft-bench xds`.
pub fn run_cli(args: &XdsArgs) -> anyhow::Result<()> {
    let cp_binary = match &args.cp {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("finding this executable")?
            .with_file_name("weft-cp"),
    };
    anyhow::ensure!(
        cp_binary.is_file(),
        "no weft-cp at {} (build it with `cargo build --release -p weft-cp` or pass --cp)",
        cp_binary.display()
    );
    // Before the runtime exists, so that its threads inherit the affinity.
    let mut placement = if args.no_pin {
        Placement::unpinned("--no-pin")
    } else {
        Placement::pin_current_process(None)
    };
    if let (Some(cp_cpus), Some(client_cpus)) = (&placement.proxy_cpus, &placement.load_cpus) {
        placement.description = format!(
            "weft-cp pinned to CPU {cp_cpus} (`taskset -c {cp_cpus}`, all its threads); the \
             simulated proxies run in the weft-bench process, pinned to CPU {client_cpus} \
             (`taskset -a -p -c {client_cpus}` on itself)"
        );
    }
    let client_threads = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .enable_all()
        .build()
        .context("building the runtime")?;
    let mut config = XdsConfig::new(cp_binary);
    config.proxies.clone_from(&args.proxies);
    config.rounds = args.rounds;
    config.placement = placement;
    config.connect_concurrency = args.connect_concurrency;
    config.client_threads = client_threads;
    let report = runtime.block_on(run(&config))?;
    let markdown = render_markdown(&report);
    let json = serde_json::to_string_pretty(&report).context("serialising the report")?;
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        std::fs::write(out.join("report.md"), &markdown)
            .with_context(|| format!("writing {}/report.md", out.display()))?;
        std::fs::write(out.join("report.json"), &json)
            .with_context(|| format!("writing {}/report.json", out.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{markdown}");
    }
    Ok(())
}
