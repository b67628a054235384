//! `weft-bench compare`: flags, CPU placement, the runtime, and the
//! outputs (`report.json`, `report.md`, `latency-<run>.svg`, and the
//! markdown on stdout).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tracing::info;

use super::{
    CompareConfig, CompareReport, Placement, Scenario, TargetKind, Tools, latency_svg,
    render_markdown, run,
};

/// Flags of `weft-bench compare`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Starts the echo upstream in this process and each proxy under test as a child \
process on loopback ports chosen at run time, one worker each, pinned to CPU 0 \
(this process moves to the other CPUs) when the machine has two or more; weft-s2s \
is two chained weft-proxy processes, both on that CPU, accounted together. Load \
runs interleave the targets round after round; tables show medians. nginx and \
HAProxy are used when on PATH; when missing, `apt-get install -y nginx-light \
libnginx-mod-stream haproxy` is tried if running as root outside CI, else they are skipped with the \
reason. http1-max is driven by wrk and h2-max by h2load when they are on PATH (pinned to the \
load CPUs), else by the built-in generator, which drives every other run. The handshake \
scenarios (handshake, handshake-resume) give weft, nginx and HAProxy TLS 1.3 listeners with one \
ECDSA P-256 certificate and open a new TLS connection per request.")]
pub struct CompareArgs {
    /// Scenario to run, repeatable (default: all).
    #[arg(long = "scenario", value_name = "NAME", value_enum)]
    pub scenarios: Vec<Scenario>,
    /// Target to measure, repeatable (default: all).
    #[arg(long = "target", value_name = "NAME", value_enum)]
    pub targets: Vec<TargetKind>,
    /// Output directory (default: target/compare/<timestamp>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Measured window of each load run [default: 5s; --quick: 1s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Warm-up before each load run [default: 1s; --quick: 200ms].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Rounds of every load run per target, interleaved [default: 3;
    /// --quick: 1].
    #[arg(long, value_name = "N")]
    pub rounds: Option<NonZeroUsize>,
    /// Rate of the HTTP/1.1 fixed-rate run, requests per second (default:
    /// 0.6 / the best of nginx's and HAProxy's CPU seconds per request in
    /// http1-max, so that its core is about 60 % busy).
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// HTTP/1.1 connections (h2 and gRPC: a quarter, 4 streams each).
    #[arg(long, value_name = "C", default_value = "16")]
    pub connections: NonZeroUsize,
    /// Idle connections of the `idle` scenario [default: 10000; --quick:
    /// 1000].
    #[arg(long, value_name = "N")]
    pub idle_connections: Option<usize>,
    /// Pause after each batch of 500 idle connections, so that idle
    /// connections can settle (weft parks them after a second) [default:
    /// 1.5s].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub idle_pause: Option<Duration>,
    /// The weft-proxy executable (default: weft-proxy next to this one).
    #[arg(long, value_name = "PATH")]
    pub weft_bin: Option<PathBuf>,
    /// A quick look: 1 round of 1 s, 1000 idle connections (explicit flags
    /// still win).
    #[arg(long)]
    pub quick: bool,
    /// Do not pin anything to CPUs.
    #[arg(long)]
    pub no_pin: bool,
    /// Never try to install nginx or HAProxy.
    #[arg(long)]
    pub no_install: bool,
    /// Drive every run with the built-in generator, even where wrk
    /// (http1-max) or h2load (h2-max) is installed.
    #[arg(long)]
    pub builtin_driver: bool,
    /// Run nothing: render report.md and the charts again from this
    /// report.json (into --out, default: the file's directory).
    #[arg(long, value_name = "FILE")]
    pub render: Option<PathBuf>,
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|err| err.to_string())
}

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "expected a positive number of requests per second, got {value:?}"
        )),
    }
}

/// Runs `weft-bench compare`: places this process, runs the comparison on
/// a runtime sized to the CPUs left to it, writes the outputs and prints
/// the markdown report to stdout.
///
/// # Errors
///
/// When weft-proxy cannot be found, the output cannot be written, the
/// runtime cannot be built, the run is interrupted (Ctrl-C) or fails (see
/// [`run`](super::run)).
pub fn run_cli(args: &CompareArgs) -> anyhow::Result<()> {
    if let Some(json) = &args.render {
        let text =
            std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let report: CompareReport =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
        let out = match (&args.out, json.parent()) {
            (Some(out), _) => out.clone(),
            (None, Some(dir)) => dir.to_path_buf(),
            (None, None) => PathBuf::from("."),
        };
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        return write_outputs(&report, &out, false);
    }
    let exe = std::env::current_exe().context("locating weft-bench")?;
    let weft_bin = match &args.weft_bin {
        Some(path) => path.clone(),
        None => exe.with_file_name("weft-proxy"),
    };
    anyhow::ensure!(
        weft_bin.exists(),
        "weft-proxy not found at {}: build it with `cargo build --release -p weft-proxy` \
         (or pass --weft-bin PATH)",
        weft_bin.display()
    );
    let out = match &args.out {
        Some(out) => out.clone(),
        None => default_out_dir(&exe),
    };
    // Absolute: nginx resolves relative paths against its prefix (its own
    // work directory), not against ours.
    let out = std::path::absolute(&out).with_context(|| format!("resolving {}", out.display()))?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let mut config = CompareConfig::new(weft_bin, out.join("work"));
    if !args.scenarios.is_empty() {
        config.scenarios.clone_from(&args.scenarios);
    }
    if !args.targets.is_empty() {
        config.targets.clone_from(&args.targets);
    }
    if args.quick {
        config.duration = Duration::from_secs(1);
        config.warmup = Duration::from_millis(200);
        config.rounds = NonZeroUsize::MIN;
        config.idle_connections = 1000;
    }
    config.duration = args.duration.unwrap_or(config.duration);
    config.warmup = args.warmup.unwrap_or(config.warmup);
    config.rounds = args.rounds.unwrap_or(config.rounds);
    config.idle_connections = args.idle_connections.unwrap_or(config.idle_connections);
    config.idle_pause = args.idle_pause.unwrap_or(config.idle_pause);
    config.rate = args.rate;
    config.external_drivers = !args.builtin_driver;
    config.connections = args.connections;
    config.tools = Tools {
        search_path: None,
        allow_install: !args.no_install,
    };
    // Before the runtime exists, so that its threads inherit the affinity.
    config.placement = if args.no_pin {
        Placement::unpinned("--no-pin")
    } else {
        Placement::pin_current_process(None)
    };
    println!("placement: {}", config.placement.description);

    let workers = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("building the compare runtime")?;
    let mut report = runtime.block_on(async {
        tokio::select! {
            report = run(&config) => report,
            // Dropping the run kills every proxy it started.
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    })?;
    report.command = Some(std::env::args().collect::<Vec<_>>().join(" "));
    write_outputs(&report, &out, true)
}

/// Writes `report.md`, the charts and (with `with_json`) `report.json`
/// into `out`, and prints the markdown.
fn write_outputs(report: &CompareReport, out: &Path, with_json: bool) -> anyhow::Result<()> {
    let markdown = render_markdown(report);
    write(&out.join("report.md"), &markdown)?;
    if with_json {
        let json = serde_json::to_string_pretty(report).context("serialising the report")?;
        write(&out.join("report.json"), &json)?;
    }
    for load_run in &report.runs {
        if let Some(svg) = latency_svg(load_run)? {
            write(&out.join(format!("latency-{}.svg", load_run.id)), &svg)?;
        }
    }
    println!("{markdown}");
    println!("written to {}", out.display());
    info!(out = %out.display(), "compare finished");
    Ok(())
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// `target/compare/<UTC timestamp>`, where `target` is the Cargo target
/// directory this executable was built in (else `./target`).
fn default_out_dir(exe: &Path) -> PathBuf {
    let target = exe
        .parent()
        .and_then(Path::parent)
        .filter(|dir| dir.join("CACHEDIR.TAG").exists())
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf);
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(':', "-");
    target.join("compare").join(stamp)
}
