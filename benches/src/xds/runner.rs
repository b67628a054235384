//! Runs the benchmark: per proxy count, a fresh mesh, a fresh control
//! plane, N clients, then the rounds (see the module docs of
//! [`xds`](super)).

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::client::{self, ClientContext, ROUTE_TYPE, Tracker};
use super::cp::{CpProcess, StatusSummary};
use super::report::{PushCounts, RoundResult, XdsReport, XdsRow, median};
use super::{limits, mesh};
use crate::compare::Placement;
use crate::load::process;

/// The route timeout of the generated mesh before the first round, in
/// seconds; round `r` sets `INITIAL_TIMEOUT_SECONDS + r`.
const INITIAL_TIMEOUT_SECONDS: u64 = 5;

/// How often the runner looks at what the clients recorded. Times are taken
/// from the clients' own timestamps, so this only delays noticing.
const CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// How often `/status` is polled while waiting for it.
const STATUS_INTERVAL: Duration = Duration::from_millis(100);

/// Bound on the clients' shutdown once cancelled.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// The `weft-cp` binary.
    pub cp_binary: PathBuf,
    /// Proxy counts, measured in this order.
    pub proxies: Vec<usize>,
    /// Mesh changes per proxy count.
    pub rounds: NonZeroUsize,
    /// Where the control plane runs (the caller pins this process).
    pub placement: Placement,
    /// Clients connecting at once.
    pub connect_concurrency: NonZeroUsize,
    /// Bound on the initial convergence and on each round.
    pub converge_timeout: Duration,
    /// Window over which the idle control plane's CPU is measured.
    pub idle_window: Duration,
    /// Worker threads of the runtime the caller runs this on (reported).
    pub client_threads: usize,
    /// Whether to try raising the open-files limit with `prlimit`.
    pub raise_open_files_limit: bool,
}

impl XdsConfig {
    /// Defaults: 1, 100, 1,000 and 5,000 proxies, 3 rounds, unpinned.
    pub fn new(cp_binary: PathBuf) -> Self {
        Self {
            cp_binary,
            proxies: vec![1, 100, 1000, 5000],
            rounds: NonZeroUsize::new(3).expect("3 is not zero"),
            placement: Placement::unpinned("not asked"),
            connect_concurrency: NonZeroUsize::new(64).expect("64 is not zero"),
            converge_timeout: Duration::from_secs(60),
            idle_window: Duration::from_secs(1),
            client_threads: 1,
            raise_open_files_limit: true,
        }
    }
}

/// Measures every proxy count in turn.
pub async fn run(config: &XdsConfig) -> anyhow::Result<XdsReport> {
    anyhow::ensure!(
        config.cp_binary.is_file(),
        "no weft-cp binary at {}",
        config.cp_binary.display()
    );
    let open_files_limit = if config.raise_open_files_limit {
        tokio::task::spawn_blocking(limits::raise_open_files_limit)
            .await
            .context("the limit task panicked")?
    } else {
        crate::compare::system::open_files_limit().and_then(|(soft, _)| soft)
    };
    let ticks_per_second = process::clock_ticks_per_second().await as f64;
    let mut report = XdsReport {
        cp_binary: config.cp_binary.display().to_string(),
        rounds: config.rounds.get(),
        placement: config.placement.description.clone(),
        client_threads: config.client_threads,
        open_files_limit,
        rows: Vec::new(),
    };
    for &proxies in &config.proxies {
        let row = if proxies == 0 || proxies > mesh::MAX_WORKLOADS {
            XdsRow {
                proxies,
                skipped: Some(format!("proxy counts are 1..={}", mesh::MAX_WORKLOADS)),
                ..XdsRow::default()
            }
        } else if let Some(reason) = limits::skip_reason(proxies, open_files_limit) {
            warn!(proxies, reason, "skipping");
            XdsRow {
                proxies,
                skipped: Some(reason),
                ..XdsRow::default()
            }
        } else {
            info!(proxies, "measuring");
            measure(config, proxies, ticks_per_second)
                .await
                .with_context(|| format!("measuring {proxies} proxies"))?
        };
        report.rows.push(row);
    }
    Ok(report)
}

/// CPU time of `/proc/PID` (or `/proc/self`) in milliseconds.
async fn cpu_ms(proc_path: &str, ticks_per_second: f64) -> Option<f64> {
    process::cpu_ticks(proc_path)
        .await
        .ok()
        .map(|ticks| ticks as f64 * 1000.0 / ticks_per_second)
}

fn elapsed_ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

async fn measure(
    config: &XdsConfig,
    proxies: usize,
    ticks_per_second: f64,
) -> anyhow::Result<XdsRow> {
    let scratch = tempfile::Builder::new()
        .prefix("weft-bench-xds-")
        .tempdir()
        .context("creating a scratch directory")?;
    let mesh_dir = scratch.path().join("mesh");
    mesh::write(&mesh_dir, proxies, INITIAL_TIMEOUT_SECONDS).await?;
    let token = format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let mut cp = CpProcess::start(
        &config.cp_binary,
        &config.placement,
        &mesh_dir,
        scratch.path(),
        &token,
    )
    .await?;
    let result = measure_with(config, proxies, ticks_per_second, &mut cp, &mesh_dir).await;
    if result.is_err() && !cp.is_running() {
        let tail = cp.log_tail().await;
        cp.stop().await;
        return result.with_context(|| format!("weft-cp exited; its log ends:\n{tail}"));
    }
    cp.stop().await;
    result
}

async fn measure_with(
    config: &XdsConfig,
    proxies: usize,
    ticks_per_second: f64,
    cp: &mut CpProcess,
    mesh_dir: &std::path::Path,
) -> anyhow::Result<XdsRow> {
    let cp_proc = format!("/proc/{}", cp.pid);
    let mut row = XdsRow {
        proxies,
        ..XdsRow::default()
    };

    // The mesh must be loaded before anything is measured.
    let loaded = wait_status(cp, config.converge_timeout, |status| {
        status.mesh_generation >= 1
    })
    .await?;
    if let Some(error) = &loaded.config_error {
        anyhow::bail!("weft-cp rejected the generated mesh: {error}");
    }

    // Idle: the watcher's polling, with no client.
    let idle_before = cpu_ms(&cp_proc, ticks_per_second).await;
    let idle_start = Instant::now();
    tokio::time::sleep(config.idle_window).await;
    let idle_after = cpu_ms(&cp_proc, ticks_per_second).await;
    row.cp_idle_cpu_ms_per_s = idle_before
        .zip(idle_after)
        .map(|(before, after)| (after - before) / idle_start.elapsed().as_secs_f64());
    row.rss_empty_bytes = crate::compare::system::rss_bytes(cp.pid).await.ok();

    // Connect every client and wait for the initial ACKs.
    let tracker = Arc::new(Tracker::new(proxies));
    let cancel = CancellationToken::new();
    let context = ClientContext {
        xds: cp.xds,
        authorization: format!("Bearer {}", cp.token())
            .parse()
            .context("the token as a header value")?,
        tracker: Arc::clone(&tracker),
        connecting: Arc::new(Semaphore::new(config.connect_concurrency.get())),
        cancel: cancel.clone(),
    };
    let client_cpu_before = cpu_ms("/proc/self", ticks_per_second).await;
    let start = Instant::now();
    let mut clients = JoinSet::new();
    for (index, workload) in mesh::workloads(proxies).into_iter().enumerate() {
        clients.spawn(client::run(index, workload, context.clone()));
    }
    let deadline = start + config.converge_timeout;
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    let (acked, last) = loop {
        ticker.tick().await;
        let (acked, last) = tracker.initial();
        if acked == proxies
            || Instant::now() >= deadline
            || tracker.failure_count() + acked >= proxies
        {
            break (acked, last);
        }
    };
    row.initially_acked = acked;
    row.initial_convergence_ms = last
        .filter(|_| acked == proxies)
        .map(|last| elapsed_ms(start, last));
    row.client_cpu_initial_ms = cpu_ms("/proc/self", ticks_per_second)
        .await
        .zip(client_cpu_before)
        .map(|(after, before)| after - before);
    row.rss_connected_bytes = crate::compare::system::rss_bytes(cp.pid).await.ok();
    if acked < proxies {
        row.errors.push(format!(
            "only {acked} of {proxies} nodes ACKed all types within {:?}",
            config.converge_timeout
        ));
    } else {
        row.kib_per_proxy = row
            .rss_empty_bytes
            .zip(row.rss_connected_bytes)
            .map(|(empty, connected)| (connected as f64 - empty as f64) / 1024.0 / proxies as f64);
        match wait_status(cp, config.converge_timeout, |status| {
            status.proxies >= proxies && status.settled >= proxies
        })
        .await
        {
            Ok(status) => row.status_proxies = Some(status.proxies),
            Err(err) => row.errors.push(format!("{err:#}")),
        }

        for round in 1..=config.rounds.get() {
            let timeout_seconds = INITIAL_TIMEOUT_SECONDS + round as u64;
            let result = run_round(
                config,
                proxies,
                ticks_per_second,
                cp,
                mesh_dir,
                &tracker,
                timeout_seconds,
            )
            .await?;
            if !result.converged {
                row.errors.push(format!(
                    "round {round}: {} of {proxies} nodes ACKed the change within {:?}",
                    result.nodes_updated, config.converge_timeout
                ));
            }
            row.rounds.push(result);
        }
        row.rss_after_rounds_bytes = crate::compare::system::rss_bytes(cp.pid).await.ok();
    }

    cancel.cancel();
    let shutdown = async { while clients.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, shutdown)
        .await
        .is_err()
    {
        warn!("clients did not stop in time; aborting them");
        clients.abort_all();
    }
    let (failures, dropped) = tracker.problems();
    row.errors.extend(failures);
    if dropped > 0 {
        row.errors
            .push(format!("{dropped} responses went unlogged (log full)"));
    }

    let converged: Vec<&RoundResult> = row.rounds.iter().filter(|r| r.converged).collect();
    row.median_write_to_last_ack_ms = median(converged.iter().map(|r| r.write_to_last_ack_ms));
    row.median_write_to_first_push_ms = median(converged.iter().map(|r| r.write_to_first_push_ms));
    row.median_first_push_to_last_ack_ms =
        median(converged.iter().map(|r| r.first_push_to_last_ack_ms));
    row.median_cp_cpu_ms = median(converged.iter().map(|r| r.cp_cpu_ms));
    row.median_client_cpu_ms = median(converged.iter().map(|r| r.client_cpu_ms));
    Ok(row)
}

async fn run_round(
    config: &XdsConfig,
    proxies: usize,
    ticks_per_second: f64,
    cp: &CpProcess,
    mesh_dir: &std::path::Path,
    tracker: &Tracker,
    timeout_seconds: u64,
) -> anyhow::Result<RoundResult> {
    let cp_proc = format!("/proc/{}", cp.pid);
    let before = tracker.route_versions();
    let cp_before = cpu_ms(&cp_proc, ticks_per_second).await;
    let client_before = cpu_ms("/proc/self", ticks_per_second).await;
    let written = mesh::set_shared_timeout(mesh_dir, timeout_seconds).await?;
    let deadline = written + config.converge_timeout;
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    let updated = loop {
        ticker.tick().await;
        let updated = tracker.routes_changed(&before);
        if updated == proxies || Instant::now() >= deadline {
            break updated;
        }
    };
    let cp_after = cpu_ms(&cp_proc, ticks_per_second).await;
    let client_after = cpu_ms("/proc/self", ticks_per_second).await;
    let converged = updated == proxies;
    // The server's own view: nothing it sent is left unacknowledged (a
    // type other than routes that changed would show here).
    let status_settled = converged
        && wait_status(cp, config.converge_timeout, |status| {
            status.proxies >= proxies && status.settled >= proxies
        })
        .await
        .is_ok();

    let events = tracker.events_since(written);
    let mut pushes = PushCounts::default();
    for event in &events {
        match event.type_index {
            0 => pushes.clusters += 1,
            ROUTE_TYPE => pushes.routes += 1,
            _ => pushes.listeners += 1,
        }
    }
    let first_push = events.iter().map(|event| event.received).min();
    let last_ack = events.iter().map(|event| event.acked).max();
    let result = RoundResult {
        converged,
        nodes_updated: updated,
        status_settled,
        write_to_first_push_ms: first_push.map(|first| elapsed_ms(written, first)),
        write_to_last_ack_ms: last_ack
            .filter(|_| converged)
            .map(|last| elapsed_ms(written, last)),
        first_push_to_last_ack_ms: first_push
            .zip(last_ack)
            .filter(|_| converged)
            .map(|(first, last)| elapsed_ms(first, last)),
        cp_cpu_ms: cp_before.zip(cp_after).map(|(b, a)| a - b),
        client_cpu_ms: client_before.zip(client_after).map(|(b, a)| a - b),
        pushes,
    };
    info!(
        proxies,
        timeout_seconds,
        converged,
        write_to_last_ack_ms = ?result.write_to_last_ack_ms,
        first_push_to_last_ack_ms = ?result.first_push_to_last_ack_ms,
        "round done"
    );
    Ok(result)
}

/// Polls `/status` until `done` holds, bounded by `timeout`.
async fn wait_status(
    cp: &CpProcess,
    timeout: Duration,
    done: impl Fn(&StatusSummary) -> bool,
) -> anyhow::Result<StatusSummary> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match cp.status().await {
            Ok(status) if done(&status) => return Ok(status),
            Ok(status) => format!("{status:?}"),
            Err(err) => format!("{err:#}"),
        };
        if Instant::now() >= deadline {
            anyhow::bail!(
                "/status did not reach the expected state within {timeout:?}; last: {last}"
            );
        }
        tokio::time::sleep(STATUS_INTERVAL).await;
    }
}
