//! What a comparison measured: [`CompareReport`] (serialised as the JSON
//! output), the per-row medians over rounds and the goals check.
//!
//! Latencies are microseconds, memory bytes, rates per second. A median of
//! an even number of rounds is the mean of the two middle values.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::driver::{Driver, ToolRound};
use super::handshake::HandshakeKind;
use super::{Placement, Scenario, TargetKind};
use crate::load::LoadReport;

/// A core this busy or more (CPU time over wall time) counts as saturated.
pub(crate) const SATURATED_BUSY: f64 = 0.9;

/// Everything one comparison measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompareReport {
    /// When the run started (RFC 3339, UTC).
    pub started_at: String,
    /// The command line, when run from the CLI.
    pub command: Option<String>,
    /// The machine it ran on.
    pub machine: Machine,
    /// Versions of the programs involved (`weft-proxy`, nginx, HAProxy,
    /// `weft-bench`), by name.
    pub versions: BTreeMap<String, String>,
    /// Where proxies and the generator ran.
    pub placement: Placement,
    /// The effective settings.
    pub settings: Settings,
    /// Each target requested, and whether it ran.
    pub targets: Vec<TargetStatus>,
    /// Memory scenarios (`idle-rss`, `idle`), one row per target.
    pub memory: Vec<MemoryRow>,
    /// Load runs, in the order they ran.
    pub runs: Vec<LoadRun>,
    /// Features `weft-full` would configure but that weft does not have yet.
    pub weft_full_not_built: Vec<String>,
    /// The performance goals, checked against this run's figures.
    pub goals: Vec<Goal>,
    /// Anything else the reader should know (reduced counts, fallbacks).
    pub notes: Vec<String>,
}

/// The machine a comparison ran on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// CPUs the weft-bench process may use (after pinning).
    pub cores: usize,
    /// CPUs online on the machine.
    pub online_cpus: usize,
    /// `MemTotal`.
    pub memory_bytes: Option<u64>,
    /// Kernel release.
    pub kernel: Option<String>,
    /// Distribution (`PRETTY_NAME` of `/etc/os-release`).
    pub os: Option<String>,
}

/// The settings a comparison ran with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    /// Scenarios run, in order.
    pub scenarios: Vec<Scenario>,
    /// Measured window of each load run, in seconds.
    pub duration_seconds: f64,
    /// Warm-up before each window, in seconds.
    pub warmup_seconds: f64,
    /// Rounds per load run and target.
    pub rounds: usize,
    /// HTTP/1.1 connections.
    pub connections: usize,
    /// h2 and gRPC connections.
    pub h2_connections: usize,
    /// h2 and gRPC streams kept in flight per connection (closed loop).
    pub h2_streams: usize,
    /// Idle connections opened per target and round (`idle`).
    pub idle_connections: usize,
    /// The `http1` fixed rate, once known.
    pub rate_per_second: Option<f64>,
    /// How long memory settled before it was read (`idle-rss`), in seconds.
    pub settle_seconds: f64,
    /// `idle`: the pause after each batch of connections, in seconds.
    pub idle_pause_seconds: f64,
}

/// A requested target and whether it ran.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetStatus {
    /// The target.
    pub target: TargetKind,
    /// Why it did not run at all (`None`: it ran).
    pub skip_reason: Option<String>,
    /// How it is configured, in words.
    pub description: String,
}

/// Whether a load run is closed or open loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// Closed loop: throughput and CPU per request.
    Max,
    /// Open loop at a fixed rate: latency.
    FixedRate,
}

/// One load run of one scenario across targets.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadRun {
    /// Short id, used in file names (`http1-max`, `http1-rate`).
    pub id: String,
    /// The scenario.
    pub scenario: Scenario,
    /// Closed or open loop.
    pub kind: RunKind,
    /// What was sent, in words.
    pub title: String,
    /// The open-loop rate.
    pub rate_per_second: Option<f64>,
    /// How the open-loop rate was chosen, in words.
    #[serde(default)]
    pub rate_basis: Option<String>,
    /// Why the whole run was skipped.
    pub skip_reason: Option<String>,
    /// One row per target.
    pub rows: Vec<LoadRow>,
}

/// One target's rounds of a load run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadRow {
    /// The target.
    pub target: TargetKind,
    /// The load generator that drove it (reports written before drivers
    /// were recorded: the built-in one).
    #[serde(default)]
    pub driver: Driver,
    /// Why this target was not measured.
    pub skip_reason: Option<String>,
    /// The full report of every round the built-in generator ran.
    pub rounds: Vec<LoadReport>,
    /// Every round wrk or h2load ran.
    #[serde(default)]
    pub tool_rounds: Vec<ToolRound>,
    /// Rounds that could not run, with the reason.
    pub failures: Vec<String>,
    /// Medians over `rounds` (absent when none ran).
    pub median: Option<RowSummary>,
}

/// Medians of a row's rounds (totals where noted). Latency figures a
/// driver does not give are absent (h2load: no percentiles; wrk: no
/// p99.9).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RowSummary {
    /// Rounds summarised.
    pub rounds: usize,
    /// Completed requests, summed over rounds.
    pub completed_total: u64,
    /// Failed or unfinished requests, summed over rounds.
    pub errors_total: u64,
    /// Completed requests per second.
    pub throughput_per_second: f64,
    /// TCP: MB (10^6 bytes) echoed per second.
    pub mb_per_second: Option<f64>,
    /// Mean latency, µs.
    #[serde(default)]
    pub mean_us: Option<f64>,
    /// Latency percentiles, µs (corrected for coordinated omission in open
    /// loop).
    pub p50_us: Option<f64>,
    /// 90th percentile, µs.
    pub p90_us: Option<f64>,
    /// 99th percentile, µs.
    pub p99_us: Option<f64>,
    /// 99.9th percentile, µs.
    pub p999_us: Option<f64>,
    /// Maximum, µs.
    pub max_us: Option<f64>,
    /// Proxy CPU time per completed request, µs (not for `direct`).
    pub cpu_us_per_request: Option<f64>,
    /// Peak resident memory of the proxy during the window.
    pub rss_peak_bytes: Option<u64>,
    /// The proxy's CPU time over the wall time: 1.0 is one core saturated
    /// (weft-s2s: both sidecars, which share one core when pinned).
    #[serde(default)]
    pub proxy_core_busy: Option<f64>,
    /// CPU time of what runs on the load CPUs (the generator and the echo
    /// upstream) over the wall time times those CPUs.
    #[serde(default)]
    pub generator_core_busy: Option<f64>,
    /// A closed-loop row whose proxy core was under
    /// 90 % busy: the generator, not the proxy, set the pace.
    #[serde(default)]
    pub is_generator_bound: bool,
}

/// One round's figures, whichever driver produced it.
#[derive(Clone, Copy, Debug, Default)]
struct RoundFigures {
    completed: u64,
    errors: u64,
    throughput: f64,
    mb_per_second: Option<f64>,
    mean_us: Option<f64>,
    p50_us: Option<f64>,
    p90_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
    max_us: Option<f64>,
    cpu_us_per_request: Option<f64>,
    rss_peak_bytes: Option<u64>,
    proxy_core_busy: Option<f64>,
    generator_core_busy: Option<f64>,
}

impl RoundFigures {
    fn of_load(report: &LoadReport, load_cpus: usize) -> Self {
        // CPU is read until the last measured request completed, which
        // is also the time the throughput is taken over (longer than the
        // window when the generator fell behind).
        let wall = if report.throughput_per_second > 0.0 && report.requests.completed > 0 {
            report.requests.completed as f64 / report.throughput_per_second
        } else {
            report.duration_seconds
        };
        let busy = |cpu: f64, cores: usize| (wall > 0.0).then(|| cpu / (wall * cores as f64));
        let latency = &report.latency;
        let has_latency = latency.count > 0;
        let us = |value: u64| has_latency.then_some(value as f64);
        Self {
            completed: report.requests.completed,
            errors: report.errors.total() + report.requests.unfinished,
            throughput: report.throughput_per_second,
            mb_per_second: report.tcp.map(|t| t.received_mb_per_second),
            mean_us: has_latency.then_some(latency.mean_us),
            p50_us: us(latency.p50_us),
            p90_us: us(latency.p90_us),
            p99_us: us(latency.p99_us),
            p999_us: us(latency.p999_us),
            max_us: us(latency.max_us),
            cpu_us_per_request: report.process.as_ref().and_then(|p| p.cpu_us_per_request),
            rss_peak_bytes: report.process.as_ref().map(|p| p.rss_peak_bytes),
            proxy_core_busy: report.process.as_ref().and_then(|p| busy(p.cpu_seconds, 1)),
            generator_core_busy: report
                .generator_cpu_seconds
                .and_then(|cpu| busy(cpu, load_cpus.max(1))),
        }
    }

    fn of_tool(round: &ToolRound) -> Self {
        let wall = round.wall_seconds;
        let busy = |cpu: f64, cores: usize| (wall > 0.0).then(|| cpu / (wall * cores as f64));
        let output = &round.output;
        let latency = &output.latency;
        Self {
            completed: output.completed,
            errors: output.errors.total() + output.requests.saturating_sub(output.completed),
            throughput: output.requests_per_second,
            mb_per_second: None,
            mean_us: latency.mean_us,
            p50_us: latency.p50_us,
            p90_us: latency.p90_us,
            p99_us: latency.p99_us,
            p999_us: None,
            max_us: latency.max_us,
            cpu_us_per_request: round.process.as_ref().and_then(|p| p.cpu_us_per_request),
            rss_peak_bytes: round.process.as_ref().map(|p| p.rss_peak_bytes),
            proxy_core_busy: round.process.as_ref().and_then(|p| busy(p.cpu_seconds, 1)),
            generator_core_busy: round.generator_cpu_seconds.and_then(|tool| {
                busy(
                    tool + round.echo_cpu_seconds.unwrap_or(0.0),
                    round.load_cpus.max(1),
                )
            }),
        }
    }
}

/// Memory of one target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryRow {
    /// The target.
    pub target: TargetKind,
    /// Why it was not measured.
    pub skip_reason: Option<String>,
    /// `idle-rss`: resident memory after start and the settle time, one
    /// value per round (fresh process each round).
    pub idle_rss_bytes: Vec<u64>,
    /// Median of `idle_rss_bytes`.
    pub idle_rss_median_bytes: Option<u64>,
    /// nginx: the master process's resident memory (the worker is the
    /// measured process).
    pub master_rss_bytes: Option<u64>,
    /// `idle`: memory per idle keep-alive connection.
    pub idle: Option<IdleSummary>,
    /// Rounds that failed, with the reason.
    pub failures: Vec<String>,
}

/// Memory per idle connection over rounds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdleSummary {
    /// Each round's measurement.
    pub rounds: Vec<IdleRound>,
    /// Median bytes per connection (overall).
    pub per_connection_median_bytes: Option<f64>,
    /// Median marginal bytes per connection (second half).
    pub marginal_per_connection_median_bytes: Option<f64>,
}

/// One round of the `idle` scenario.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdleRound {
    /// Connections opened and held (each made one request).
    pub opened: usize,
    /// Resident memory with one warm connection open.
    pub rss_before_bytes: u64,
    /// Resident memory with all of them open, after the last pause.
    pub rss_after_bytes: u64,
    /// `(after - before) / opened`.
    pub per_connection_bytes: f64,
    /// Growth over the second half of the connections divided by their
    /// number: the steady-state cost once earlier connections have settled.
    pub marginal_per_connection_bytes: Option<f64>,
    /// Why fewer connections than asked were opened.
    pub error: Option<String>,
}

/// A performance goal and how this run's figures compare.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Goal {
    /// The goal, in words.
    pub goal: String,
    /// The weft target it is checked for.
    pub target: TargetKind,
    /// Weft's figure.
    pub value: Option<f64>,
    /// The reference figure (what weft's is compared with).
    pub reference: Option<f64>,
    /// `value / reference`, where a ratio is the goal's measure.
    pub ratio: Option<f64>,
    /// Whether the goal is met (`None`: not measured).
    pub met: Option<bool>,
    /// The figures in words.
    pub detail: String,
}

/// The median of `values` (`None` when empty). NaNs sort last.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The median of integer values, rounded down.
pub(crate) fn median_u64(values: &[u64]) -> Option<u64> {
    let as_f64: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    median(&as_f64).map(|m| m as u64)
}

impl RowSummary {
    /// Medians of a row, whichever driver ran its rounds.
    pub(crate) fn of_row(row: &LoadRow, load_cpus: usize, kind: RunKind) -> Option<Self> {
        let figures: Vec<RoundFigures> = row
            .rounds
            .iter()
            .map(|round| RoundFigures::of_load(round, load_cpus))
            .chain(row.tool_rounds.iter().map(RoundFigures::of_tool))
            .collect();
        Self::of_figures(&figures, kind)
    }

    fn of_figures(rounds: &[RoundFigures], kind: RunKind) -> Option<Self> {
        if rounds.is_empty() {
            return None;
        }
        let of = |f: fn(&RoundFigures) -> Option<f64>| {
            median(&rounds.iter().filter_map(f).collect::<Vec<_>>())
        };
        let rss: Vec<u64> = rounds.iter().filter_map(|r| r.rss_peak_bytes).collect();
        let proxy_core_busy = of(|r| r.proxy_core_busy);
        Some(Self {
            rounds: rounds.len(),
            completed_total: rounds.iter().map(|r| r.completed).sum(),
            errors_total: rounds.iter().map(|r| r.errors).sum(),
            throughput_per_second: of(|r| Some(r.throughput)).unwrap_or(0.0),
            mb_per_second: of(|r| r.mb_per_second),
            mean_us: of(|r| r.mean_us),
            p50_us: of(|r| r.p50_us),
            p90_us: of(|r| r.p90_us),
            p99_us: of(|r| r.p99_us),
            p999_us: of(|r| r.p999_us),
            max_us: of(|r| r.max_us),
            cpu_us_per_request: of(|r| r.cpu_us_per_request),
            rss_peak_bytes: median_u64(&rss),
            proxy_core_busy,
            generator_core_busy: of(|r| r.generator_core_busy),
            is_generator_bound: kind == RunKind::Max
                && proxy_core_busy.is_some_and(|busy| busy < SATURATED_BUSY),
        })
    }

    /// Handshakes (connections) per second of proxy CPU: the inverse of
    /// the proxy CPU per request, as each request of a handshake run opens
    /// its own connection.
    pub fn handshakes_per_core_second(&self) -> Option<f64> {
        self.cpu_us_per_request
            .filter(|&cpu| cpu > 0.0)
            .map(|cpu| 1e6 / cpu)
    }

    /// Which core saturated, in words: `proxy`, `generator`, `both`,
    /// `neither`, or `—` when not measured.
    pub fn saturated(&self) -> &'static str {
        let proxy = self.proxy_core_busy.map(|b| b >= SATURATED_BUSY);
        let generator = self.generator_core_busy.map(|b| b >= SATURATED_BUSY);
        match (proxy, generator) {
            (Some(true), Some(true)) => "both",
            (Some(true), _) => "proxy",
            (_, Some(true)) => "generator",
            (Some(false), _) | (_, Some(false)) => "neither",
            (None, None) => "—",
        }
    }
}

impl LoadRow {
    /// The share of the connections opened for measured requests that
    /// resumed a TLS session, over every round (`None` without TLS).
    pub fn tls_resumed_fraction(&self) -> Option<f64> {
        let (resumed, opened) = self
            .rounds
            .iter()
            .filter_map(|round| {
                Some((
                    round.tls_resumed_connections?,
                    round.http_connections_opened?,
                ))
            })
            .fold((0, 0), |(r, o), (resumed, opened)| {
                (r + resumed, o + opened)
            });
        (opened > 0).then(|| resumed as f64 / opened as f64)
    }
}

impl LoadRun {
    /// The median summary of `target`'s row, if it ran.
    pub fn summary(&self, target: TargetKind) -> Option<&RowSummary> {
        self.rows
            .iter()
            .find(|row| row.target == target)
            .and_then(|row| row.median.as_ref())
    }

    /// The best value of `metric` among the reference proxies (nginx,
    /// HAProxy) that ran: the lowest when `lower_is_better`, else the
    /// highest.
    pub fn best_reference(
        &self,
        metric: impl Fn(&RowSummary) -> Option<f64>,
        lower_is_better: bool,
    ) -> Option<(TargetKind, f64)> {
        self.rows
            .iter()
            .filter(|row| row.target.is_reference())
            .filter_map(|row| Some((row.target, metric(row.median.as_ref()?)?)))
            .reduce(|best, candidate| {
                let is_better = if lower_is_better {
                    candidate.1 < best.1
                } else {
                    candidate.1 > best.1
                };
                if is_better { candidate } else { best }
            })
    }
}

impl CompareReport {
    /// The load run with this id (`http1-max`, `h2-max`, ...).
    pub fn run(&self, id: &str) -> Option<&LoadRun> {
        self.runs.iter().find(|run| run.id == id)
    }

    /// The memory row of `target`.
    pub fn memory_of(&self, target: TargetKind) -> Option<&MemoryRow> {
        self.memory.iter().find(|row| row.target == target)
    }

    /// Checks the performance goals for each weft target that ran and
    /// stores them in [`CompareReport::goals`].
    pub(crate) fn evaluate_goals(&mut self) {
        let mut goals = Vec::new();
        let measured = |kind: TargetKind| {
            self.targets
                .iter()
                .any(|status| status.target == kind && status.skip_reason.is_none())
        };
        // Goals are per proxy: weft-s2s, two proxies in series, is only
        // the reference of its mTLS twin below.
        for target in [TargetKind::Weft, TargetKind::WeftFull] {
            if !self
                .targets
                .iter()
                .any(|status| status.target == target && status.skip_reason.is_none())
            {
                continue;
            }
            goals.push(self.cpu_goal("http1-max", target, None, 0.7));
            goals.push(self.added_p99_goal(target));
            goals.push(self.cpu_goal("h2-max", target, Some(TargetKind::Haproxy), 0.8));
            goals.push(self.memory_goal(target, false));
            goals.push(self.memory_goal(target, true));
        }
        // Handshakes: only plain weft terminates TLS for clients, and the
        // goals appear only when a handshake scenario ran.
        for kind in HandshakeKind::ALL {
            let run_id = kind.run_id();
            if self.run(run_id).is_some() && measured(TargetKind::Weft) {
                goals.push(self.handshake_goal(run_id, TargetKind::Weft));
            }
        }
        // The mesh hop's security has a price too: the mTLS pair against
        // the cleartext pair, per keep-alive request.
        if measured(TargetKind::WeftSidecarsMtls) && measured(TargetKind::WeftSidecars) {
            goals.push(self.cpu_goal(
                "http1-max",
                TargetKind::WeftSidecarsMtls,
                Some(TargetKind::WeftSidecars),
                1.25,
            ));
        }
        self.goals = goals;
    }

    /// Weft's CPU per request against `reference` (or the best reference
    /// proxy) in `run_id`, as a ratio that must not exceed `max_ratio`.
    fn cpu_goal(
        &self,
        run_id: &str,
        target: TargetKind,
        reference: Option<TargetKind>,
        max_ratio: f64,
    ) -> Goal {
        let label = if run_id.starts_with("h2") {
            "h2c"
        } else {
            "HTTP/1.1 keep-alive"
        };
        let against = reference.map_or("the best of nginx/HAProxy", TargetKind::name);
        let goal =
            format!("{label}: proxy CPU per request ≤ {max_ratio}x {against} at one proxy core");
        let run = self.run(run_id);
        let value = run
            .and_then(|run| run.summary(target))
            .and_then(|s| s.cpu_us_per_request);
        let reference = run.and_then(|run| match reference {
            Some(kind) => run
                .summary(kind)
                .and_then(|s| s.cpu_us_per_request)
                .map(|v| (kind, v)),
            None => run.best_reference(|s| s.cpu_us_per_request, true),
        });
        match (value, reference) {
            (Some(value), Some((kind, reference))) if reference > 0.0 => {
                let ratio = value / reference;
                Goal {
                    goal,
                    target,
                    value: Some(value),
                    reference: Some(reference),
                    ratio: Some(ratio),
                    met: Some(ratio <= max_ratio),
                    detail: format!(
                        "{value:.1} µs vs {} {reference:.1} µs = {ratio:.2}x (goal {max_ratio}x: \
                         {:.1} µs, {:.0} % less than now)",
                        kind.name(),
                        reference * max_ratio,
                        (1.0 - reference * max_ratio / value).max(0.0) * 100.0,
                    ),
                }
            }
            _ => unmeasured(goal, target, value),
        }
    }

    /// Weft's handshakes per second of proxy CPU in `run_id` against
    /// nginx's, which they must at least equal.
    fn handshake_goal(&self, run_id: &str, target: TargetKind) -> Goal {
        let goal = format!("{run_id}: handshakes per proxy core-second ≥ nginx's");
        let run = self.run(run_id);
        let summary = |kind: TargetKind| run.and_then(|run| run.summary(kind));
        let value = summary(target).and_then(RowSummary::handshakes_per_core_second);
        let reference = summary(TargetKind::Nginx).and_then(RowSummary::handshakes_per_core_second);
        match (value, reference) {
            (Some(value), Some(reference)) if reference > 0.0 => {
                let ratio = value / reference;
                let bound: Vec<&str> = [target, TargetKind::Nginx]
                    .into_iter()
                    .filter(|&kind| summary(kind).is_some_and(|s| s.is_generator_bound))
                    .map(TargetKind::name)
                    .collect();
                let mut detail = format!(
                    "{value:.0} vs nginx {reference:.0} handshakes per proxy core-second = \
                     {ratio:.2}x"
                );
                if !bound.is_empty() {
                    detail.push_str(&format!(
                        " (generator-bound: {}; its proxy core was not saturated)",
                        bound.join(", ")
                    ));
                }
                Goal {
                    goal,
                    target,
                    value: Some(value),
                    reference: Some(reference),
                    ratio: Some(ratio),
                    met: Some(ratio >= 1.0),
                    detail,
                }
            }
            _ => unmeasured(goal, target, value),
        }
    }

    /// Weft's added p99 at the fixed rate against the best reference's.
    fn added_p99_goal(&self, target: TargetKind) -> Goal {
        let goal = "HTTP/1.1 at a fixed rate: added p99 latency no worse than nginx's or HAProxy's"
            .to_owned();
        let Some(run) = self.run("http1-rate") else {
            return unmeasured(goal, target, None);
        };
        let direct = run
            .summary(TargetKind::Direct)
            .and_then(|s| s.p99_us)
            .unwrap_or(0.0);
        let value = run
            .summary(target)
            .and_then(|s| s.p99_us)
            .map(|p99| p99 - direct);
        let reference = run.best_reference(|s| s.p99_us.map(|p99| p99 - direct), true);
        match (value, reference) {
            (Some(value), Some((kind, reference))) => Goal {
                goal,
                target,
                value: Some(value),
                reference: Some(reference),
                ratio: (reference > 0.0).then(|| value / reference),
                met: Some(value <= reference),
                detail: format!(
                    "+{:.3} ms vs {} +{:.3} ms over direct's p99 at {:.0} req/s",
                    value / 1000.0,
                    kind.name(),
                    reference / 1000.0,
                    run.rate_per_second.unwrap_or(0.0),
                ),
            },
            _ => unmeasured(goal, target, value),
        }
    }

    /// Idle RSS under 8 MiB, or memory per idle connection under 8 KiB.
    fn memory_goal(&self, target: TargetKind, is_per_connection: bool) -> Goal {
        let row = self.memory_of(target);
        let marginal = row
            .and_then(|r| r.idle.as_ref())
            .and_then(|idle| idle.marginal_per_connection_median_bytes);
        let (goal, value, limit, unit, scale) = if is_per_connection {
            (
                "memory per idle keep-alive connection < 8 KiB",
                row.and_then(|r| r.idle.as_ref())
                    .and_then(|idle| idle.per_connection_median_bytes),
                8.0 * 1024.0,
                "KiB",
                1024.0,
            )
        } else {
            (
                "idle RSS after start < 8 MiB",
                row.and_then(|r| r.idle_rss_median_bytes).map(|b| b as f64),
                8.0 * 1024.0 * 1024.0,
                "MiB",
                1024.0 * 1024.0,
            )
        };
        match value {
            Some(value) => Goal {
                goal: goal.to_owned(),
                target,
                value: Some(value),
                reference: Some(limit),
                ratio: Some(value / limit),
                met: Some(value < limit),
                detail: match marginal.filter(|_| is_per_connection) {
                    Some(marginal) => format!(
                        "{:.2} {unit} overall, {:.2} {unit} marginal (limit {:.0} {unit})",
                        value / scale,
                        marginal / scale,
                        limit / scale
                    ),
                    None => format!(
                        "{:.2} {unit} (limit {:.0} {unit})",
                        value / scale,
                        limit / scale
                    ),
                },
            },
            None => unmeasured(goal.to_owned(), target, None),
        }
    }
}

fn unmeasured(goal: String, target: TargetKind, value: Option<f64>) -> Goal {
    Goal {
        goal,
        target,
        value,
        reference: None,
        ratio: None,
        met: None,
        detail: "not measured in this run (scenario or reference proxy missing)".to_owned(),
    }
}
