//! `weft-bench load`: flags, the runtime, and the printed report.

use std::io::IsTerminal as _;
use std::num::NonZeroUsize;
use std::time::Duration;

use anyhow::Context as _;
use http::Uri;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::{
    DEFAULT_STREAMS_PER_CONNECTION, DEFAULT_TCP_BUFFER_BYTES, LoadConfig, LoadMode, Protocol, run,
};

/// Flags of `weft-bench load`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Only loopback targets are allowed: the host must resolve to 127.0.0.0/8 or ::1 \
only, and anything else is refused before a connection is opened.

Open loop (--rate): request i is due at start + i/RATE, whichever connection is \
free takes it, and its latency counts from that intended time when it had to \
wait for a connection (coordinated omission corrected). --max sends back to \
back instead.")]
pub struct LoadArgs {
    /// Target: http://HOST[:PORT][/PATH], or tcp://HOST:PORT with --tcp.
    /// HOST must resolve to loopback addresses only (127.0.0.0/8, ::1).
    #[arg(long, value_name = "URL")]
    pub target: Uri,
    /// Open loop: requests per second across all connections.
    #[arg(
        long,
        value_name = "R",
        required_unless_present = "max",
        conflicts_with = "max",
        value_parser = parse_rate
    )]
    pub rate: Option<f64>,
    /// Closed loop: every connection (h2: every stream slot) sends back to
    /// back, to find peak throughput.
    #[arg(long)]
    pub max: bool,
    /// Length of the measured window (e.g. 10s, 500ms, 1m).
    #[arg(long, value_name = "D", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unrecorded load sent first, on the same connections.
    #[arg(long, value_name = "D", default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Connections to open.
    #[arg(long, value_name = "C", default_value = "1")]
    pub connections: NonZeroUsize,
    /// Speak cleartext HTTP/2 with prior knowledge (h2c).
    #[arg(long, conflicts_with = "tcp")]
    pub http2: bool,
    /// Call weft.echo.v1.Echo/Unary over h2c (implies --http2).
    #[arg(long, conflicts_with = "tcp")]
    pub grpc: bool,
    /// Opaque TCP against an echo: each request writes a buffer and reads
    /// it back; reports MB/s.
    #[arg(long)]
    pub tcp: bool,
    /// HTTP/1.1 and TCP: open a new connection for every request (the
    /// client closes it after the response); reports connections opened.
    #[arg(long, conflicts_with_all = ["http2", "grpc"])]
    pub new_connection: bool,
    /// HTTP: POST a body of N bytes (default: GET, no body). gRPC: the
    /// payload size. TCP: the buffer size (default 16384).
    #[arg(long, value_name = "N")]
    pub body_size: Option<usize>,
    /// Extra request header, repeatable.
    #[arg(long = "header", value_name = "NAME: VALUE", value_parser = parse_header)]
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Timeout of each connect and of each request.
    #[arg(long, value_name = "D", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// h2/gRPC: requests in flight per connection at most (closed loop: kept
    /// in flight).
    #[arg(long, value_name = "N", default_value_t = NonZeroUsize::new(DEFAULT_STREAMS_PER_CONNECTION).expect("non-zero default"))]
    pub streams: NonZeroUsize,
    /// Account CPU time and memory of this process (the proxy under test)
    /// over the measured window (Linux /proc). Repeat it for a chain of
    /// proxies: their CPU times and resident memory are summed.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Print the report as one JSON object instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Worker threads of the generator (default: the number of cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,
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

fn parse_header(value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let Some((name, header_value)) = value.split_once(':') else {
        return Err(format!("expected 'name: value', got {value:?}"));
    };
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|err| format!("header name {:?}: {err}", name.trim()))?;
    let header_value = HeaderValue::from_str(header_value.trim())
        .map_err(|err| format!("header {name}: {err}"))?;
    Ok((name, header_value))
}

impl LoadArgs {
    /// The run these flags describe.
    pub fn to_config(&self) -> LoadConfig {
        let protocol = if self.tcp {
            Protocol::Tcp
        } else if self.grpc {
            Protocol::Grpc
        } else if self.http2 {
            Protocol::Http2
        } else {
            Protocol::Http1
        };
        let mode = match self.rate {
            Some(rate_per_second) if !self.max => LoadMode::OpenLoop { rate_per_second },
            _ => LoadMode::ClosedLoop,
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            headers.append(name, value.clone());
        }
        let mut config = LoadConfig::new(self.target.clone(), protocol, mode);
        config.connections = self.connections;
        config.duration = self.duration;
        config.warmup = self.warmup;
        config.timeout = self.timeout;
        config.body_size_bytes = self.body_size.unwrap_or(if self.tcp {
            DEFAULT_TCP_BUFFER_BYTES
        } else {
            0
        });
        config.headers = headers;
        config.streams_per_connection = self.streams;
        config.new_connection_per_request = self.new_connection;
        config.pids.clone_from(&self.pids);
        config.show_progress = std::io::stderr().is_terminal();
        config
    }
}

/// Runs `weft-bench load` on a runtime of `--threads` workers and prints
/// the report to stdout: the summary, or one JSON object with `--json`.
///
/// # Errors
///
/// When the runtime cannot be built or the run fails (see
/// [`run`](super::run)).
pub fn run_cli(args: &LoadArgs) -> anyhow::Result<()> {
    let config = args.to_config();
    let workers = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("building the load runtime")?;
    let report = runtime.block_on(run(&config))?;
    if args.json {
        let json = serde_json::to_string(&report).context("serialising the report")?;
        println!("{json}");
    } else {
        print!("{report}");
    }
    Ok(())
}
