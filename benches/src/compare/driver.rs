//! Who generates the load of a run: `wrk` for the closed-loop HTTP/1.1
//! run (`http1-max`), `h2load` for the closed-loop h2c run (`h2-max`) when
//! they are installed, else the built-in generator ([`load`](crate::load)),
//! which also drives every other run.
//!
//! Why: the built-in generator tops out below what a proxy's core can
//! serve (46k req/s direct where wrk reached 59k on the same machine), so
//! its closed-loop figures measured the generator, not the proxy. wrk and
//! h2load are the generators users trust.
//!
//! An external tool runs pinned to the load CPUs (`taskset -c`, per the
//! [`Placement`]), one thread per load CPU, with the same connections
//! (and h2 streams) as the built-in one. The warm-up is a separate,
//! unmeasured run of the same tool. Over the measured run the runner reads
//! `/proc/PID/stat` of the proxies, of the tool and of itself (the echo
//! upstream) before the tool starts and once it has exited (a zombie still
//! reports its CPU time; it is reaped after), so that every CPU figure
//! covers the same wall time as the tool's request count.

mod parse;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;

use super::Placement;
use super::config::Tools;
use super::system;
use crate::load::ProcessUsage;
use crate::load::process;

pub(crate) use parse::{parse_h2load, parse_wrk};

/// How often the tool's process is checked for having exited (and RSS
/// sampled) while it runs.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How often it is checked once its duration is over.
const END_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// How long a tool may run beyond its duration before it is killed.
const OVERRUN: Duration = Duration::from_secs(15);

/// The load generator that produced a row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Driver {
    /// `wrk` (HTTP/1.1).
    Wrk,
    /// `h2load` (nghttp2; h2c).
    H2load,
    /// The built-in generator (`weft-bench load`).
    #[default]
    WeftBench,
}

impl Driver {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Wrk => "wrk",
            Self::H2load => "h2load",
            Self::WeftBench => "weft-bench",
        }
    }
}

/// What wrk or h2load reported, parsed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolOutput {
    /// Requests counted (wrk: `N requests`; h2load: `total`).
    pub requests: u64,
    /// Requests with a complete response (h2load: `done`; wrk: all).
    pub completed: u64,
    /// Requests with a 2xx or 3xx response.
    pub succeeded: u64,
    /// The run's length as the tool reports it, in seconds (h2load's
    /// includes its own warm-up, none here).
    pub duration_seconds: f64,
    /// Requests per second as the tool reports it.
    pub requests_per_second: f64,
    /// Latency, where the tool gives it.
    pub latency: ToolLatency,
    /// Failures, as the tool counts them.
    pub errors: ToolErrors,
}

/// Latency from the tool (wrk: mean, sd, max and p50/p75/p90/p99 with
/// `--latency`; h2load: min, max, mean and sd of the request time), µs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolLatency {
    /// Mean.
    pub mean_us: Option<f64>,
    /// Standard deviation.
    pub sd_us: Option<f64>,
    /// Minimum.
    pub min_us: Option<f64>,
    /// Maximum.
    pub max_us: Option<f64>,
    /// Median.
    pub p50_us: Option<f64>,
    /// 75th percentile.
    pub p75_us: Option<f64>,
    /// 90th percentile.
    pub p90_us: Option<f64>,
    /// 99th percentile.
    pub p99_us: Option<f64>,
}

/// Failures as the tool counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolErrors {
    /// wrk: connect errors.
    pub connect: u64,
    /// wrk: read errors.
    pub read: u64,
    /// wrk: write errors.
    pub write: u64,
    /// wrk and h2load: timeouts.
    pub timeout: u64,
    /// wrk: responses with a status outside 2xx and 3xx.
    pub non_2xx_3xx: u64,
    /// h2load: failed requests, including non-2xx/3xx responses.
    pub failed: u64,
    /// h2load: requests that failed before a response.
    pub errored: u64,
    /// h2load: 4xx responses.
    pub status_4xx: Option<u64>,
    /// h2load: 5xx responses.
    pub status_5xx: Option<u64>,
}

impl ToolErrors {
    /// Failed requests: wrk's socket errors plus its non-2xx/3xx
    /// responses; h2load's `failed` (which includes `errored` and
    /// non-2xx/3xx responses) plus its timeouts.
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout + self.non_2xx_3xx + self.failed
    }
}

/// One round of a run driven by wrk or h2load.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ToolRound {
    /// wrk or h2load.
    pub driver: Driver,
    /// The measured command line.
    pub command: String,
    /// Its parsed output.
    pub output: ToolOutput,
    /// Wall time from just before the tool started until it had exited, s.
    pub wall_seconds: f64,
    /// The proxies' CPU over that time (`cpu_us_per_request` per
    /// completed request) and RSS before, after and peak (sampled every
    /// 100 ms); `None` for direct.
    pub process: Option<ProcessUsage>,
    /// CPU seconds the tool used.
    pub generator_cpu_seconds: Option<f64>,
    /// CPU seconds the weft-bench process (the echo upstream, on the same
    /// CPUs as the tool) used.
    pub echo_cpu_seconds: Option<f64>,
    /// Load CPUs the tool and the echo shared.
    pub load_cpus: usize,
}

/// wrk and h2load, or why each cannot be used.
#[derive(Clone, Debug)]
pub(crate) struct ExternalDrivers {
    pub(crate) wrk: Result<PathBuf, String>,
    pub(crate) h2load: Result<PathBuf, String>,
}

impl ExternalDrivers {
    /// Looks for `wrk` and `h2load` where `tools` says.
    pub(crate) fn discover(tools: &Tools) -> Self {
        let find = |program: &str, package: &str| {
            system::find_program(program, tools.search_path.as_deref())
                .ok_or_else(|| format!("{program} is not installed (apt-get install -y {package})"))
        };
        Self {
            wrk: find("wrk", "wrk"),
            h2load: find("h2load", "nghttp2-client"),
        }
    }

    /// None: every run uses the built-in generator; `reason` says why.
    pub(crate) fn disabled(reason: &str) -> Self {
        Self {
            wrk: Err(reason.to_owned()),
            h2load: Err(reason.to_owned()),
        }
    }
}

/// What an external tool is asked to do.
#[derive(Clone, Debug)]
pub(crate) struct ToolRun<'a> {
    pub(crate) driver: Driver,
    pub(crate) program: &'a Path,
    /// `http://127.0.0.1:PORT/`.
    pub(crate) url: String,
    pub(crate) connections: usize,
    /// h2load: streams per connection.
    pub(crate) streams: usize,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    /// The proxies to account (none for direct).
    pub(crate) pids: &'a [u32],
}

/// Whole seconds for wrk, which takes no fraction: `duration` rounded up,
/// at least one.
pub(crate) fn wrk_seconds(duration: Duration) -> u64 {
    let whole = duration.as_secs();
    let seconds = if duration.subsec_nanos() > 0 {
        whole + 1
    } else {
        whole
    };
    seconds.max(1)
}

/// The tool's arguments for a run of `duration`.
pub(crate) fn tool_args(
    driver: Driver,
    url: &str,
    connections: usize,
    streams: usize,
    threads: usize,
    duration: Duration,
) -> Vec<String> {
    let threads = threads.clamp(1, connections.max(1));
    match driver {
        Driver::Wrk => vec![
            format!("-t{threads}"),
            format!("-c{connections}"),
            format!("-d{}s", wrk_seconds(duration)),
            "--latency".to_owned(),
            url.to_owned(),
        ],
        Driver::H2load => vec![
            format!("-t{threads}"),
            format!("-c{connections}"),
            format!("-m{streams}"),
            format!("-D{}ms", duration.as_millis().max(1)),
            url.to_owned(),
        ],
        Driver::WeftBench => Vec::new(),
    }
}

/// Runs `run`'s warm-up (unmeasured), then its measured run, and reports
/// the measured one.
///
/// # Errors
///
/// When the tool cannot start, exits with a failure, overruns its duration
/// by [`OVERRUN`] or prints something that does not parse; when a proxy's
/// `/proc` entry cannot be read.
pub(crate) async fn run_tool(
    run: &ToolRun<'_>,
    placement: &Placement,
) -> anyhow::Result<ToolRound> {
    let threads = placement.load_cpu_count();
    if !run.warmup.is_zero() {
        let args = tool_args(
            run.driver,
            &run.url,
            run.connections,
            run.streams,
            threads,
            run.warmup,
        );
        Measured::run(run.driver, run.program, &args, run.warmup, &[], placement)
            .await
            .with_context(|| format!("{} warm-up", run.driver.name()))?;
    }
    let args = tool_args(
        run.driver,
        &run.url,
        run.connections,
        run.streams,
        threads,
        run.duration,
    );
    let measured = Measured::run(
        run.driver,
        run.program,
        &args,
        run.duration,
        run.pids,
        placement,
    )
    .await?;
    let output = match run.driver {
        Driver::Wrk => parse_wrk(&measured.stdout),
        Driver::H2load => parse_h2load(&measured.stdout),
        Driver::WeftBench => bail!("the built-in generator is not an external tool"),
    }
    .and_then(|output| completed_some(run.driver, output))
    .with_context(|| {
        format!(
            "parsing the output of `{}`:\n{}",
            measured.command,
            measured.stdout.trim_end()
        )
    })?;
    let process = measured.process.map(|mut usage| {
        usage.cpu_us_per_request =
            (output.completed > 0).then(|| usage.cpu_seconds * 1e6 / output.completed as f64);
        usage
    });
    Ok(ToolRound {
        driver: run.driver,
        command: measured.command,
        output,
        wall_seconds: measured.wall_seconds,
        process,
        generator_cpu_seconds: measured.generator_cpu_seconds,
        echo_cpu_seconds: measured.echo_cpu_seconds,
        load_cpus: threads,
    })
}

/// `output`, unless no request completed: h2load exits successfully
/// when it could not connect at all, and a round of nothing is no figure.
pub(crate) fn completed_some(driver: Driver, output: ToolOutput) -> anyhow::Result<ToolOutput> {
    if output.completed == 0 {
        bail!(
            "{} completed no request ({} failed; could it connect?)",
            driver.name(),
            output.errors.total()
        );
    }
    Ok(output)
}

/// One run of a tool with its CPU accounting.
#[derive(Debug)]
struct Measured {
    command: String,
    stdout: String,
    wall_seconds: f64,
    process: Option<ProcessUsage>,
    generator_cpu_seconds: Option<f64>,
    echo_cpu_seconds: Option<f64>,
}

impl Measured {
    async fn run(
        driver: Driver,
        program: &Path,
        args: &[String],
        duration: Duration,
        pids: &[u32],
        placement: &Placement,
    ) -> anyhow::Result<Self> {
        let name = driver.name();
        let ticks_per_second = process::clock_ticks_per_second().await as f64;
        let seconds = |ticks: u64| ticks as f64 / ticks_per_second;
        let paths: Vec<String> = pids.iter().map(|pid| format!("/proc/{pid}")).collect();
        let proxies_before = if paths.is_empty() {
            None
        } else {
            Some(
                process::sample_all(&paths)
                    .await
                    .with_context(|| format!("reading /proc of the proxies {pids:?}"))?,
            )
        };
        let echo_before = process::cpu_ticks("/proc/self").await.ok();

        let mut command = placement.generator_command(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let shown = format!("{} {}", placement.generator_prefix(program), args.join(" "));
        let started = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("starting `{shown}`"))?;
        let pid = child
            .id()
            .with_context(|| format!("`{shown}` exited before its pid was read"))?;
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);

        // Until the tool is a zombie: its CPU time is final then, and the
        // proxies' is read at the same moment.
        let tool_path = format!("/proc/{pid}");
        let deadline = started + duration + OVERRUN;
        let mut generator_ticks = None;
        let mut peak_rss = proxies_before.map_or(0, |(_, rss)| rss);
        loop {
            let stat = tokio::fs::read_to_string(format!("{tool_path}/stat")).await;
            let Ok(stat) = stat else {
                // Reaped by someone else, or gone: no CPU figure.
                break;
            };
            generator_ticks = process::parse_cpu_ticks(&stat).or(generator_ticks);
            if process_state(&stat) == Some('Z') {
                break;
            }
            if Instant::now() >= deadline {
                bail!("`{shown}` ran longer than {:?}; killed", duration + OVERRUN);
            }
            if !paths.is_empty()
                && let Ok((_, rss)) = process::sample_all(&paths).await
            {
                peak_rss = peak_rss.max(rss);
            }
            let interval = if started.elapsed() >= duration {
                END_POLL_INTERVAL
            } else {
                POLL_INTERVAL
            };
            tokio::time::sleep(interval).await;
        }
        let proxies_after =
            if paths.is_empty() {
                None
            } else {
                Some(process::sample_all(&paths).await.with_context(|| {
                    format!("reading /proc of the proxies {pids:?} after {name}")
                })?)
            };
        let echo_after = process::cpu_ticks("/proc/self").await.ok();
        let wall_seconds = started.elapsed().as_secs_f64();

        let status = tokio::time::timeout(OVERRUN, child.wait())
            .await
            .with_context(|| format!("`{shown}` did not exit"))?
            .with_context(|| format!("waiting for `{shown}`"))?;
        let stdout = match stdout {
            Some(task) => task.await.context("reading the tool's stdout")?,
            None => String::new(),
        };
        let stderr = match stderr {
            Some(task) => task.await.context("reading the tool's stderr")?,
            None => String::new(),
        };
        if !status.success() {
            bail!(
                "`{shown}` failed ({status}): {}",
                [stderr.trim(), stdout.trim()]
                    .iter()
                    .find(|text| !text.is_empty())
                    .unwrap_or(&"no output")
            );
        }
        let process = match (proxies_before, proxies_after) {
            (Some((cpu_before, rss_before)), Some((cpu_after, rss_after))) => Some(ProcessUsage {
                pids: pids.to_vec(),
                cpu_seconds: seconds(cpu_after.saturating_sub(cpu_before)),
                cpu_us_per_request: None,
                rss_before_bytes: rss_before,
                rss_peak_bytes: peak_rss.max(rss_after),
                rss_after_bytes: rss_after,
            }),
            _ => None,
        };
        Ok(Self {
            command: shown,
            stdout,
            wall_seconds,
            process,
            generator_cpu_seconds: generator_ticks.map(seconds),
            echo_cpu_seconds: match (echo_before, echo_after) {
                (Some(before), Some(after)) => Some(seconds(after.saturating_sub(before))),
                _ => None,
            },
        })
    }
}

/// Reads a child's pipe to the end on a task (lossy UTF-8).
fn drain(
    mut pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        // A read error leaves what was read so far.
        let _ = pipe.read_to_end(&mut bytes).await;
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The state letter (field 3) of a `/proc/PID/stat` line.
pub(crate) fn process_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}
