//! Resource accounting from Linux's `/proc`: CPU time and resident memory of
//! the processes under test (`--pid`, repeatable) and CPU time of the
//! generator itself, over the measured window.
//!
//! Several processes are accounted as one: a pair of sidecars, say, whose
//! cost per request is that of the hop pair. CPU time is the sum of their
//! `utime + stime`; resident memory is the sum of their `VmRSS` read in the
//! same sampling pass, so the peak is the peak of the sum.
//!
//! CPU time is `utime + stime` from `/proc/PID/stat`, in clock ticks. The
//! tick rate is `sysconf(_SC_CLK_TCK)`, which the kernel also hands every
//! process in its auxiliary vector (`AT_CLKTCK`); it is read from
//! `/proc/self/auxv` so that no libc call (and no `unsafe`) is needed, and
//! assumed to be 100 (Linux's `USER_HZ` on every mainstream architecture) if
//! that fails. Memory is `VmRSS` from `/proc/PID/status`, sampled every
//! 100 ms for the peak. Files are read with `tokio::fs` (off the workers).

use std::io;
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;
use tracing::warn;

use super::report::ProcessUsage;

/// How often the resident set size is sampled for its peak.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// `AT_CLKTCK` in the auxiliary vector (see `getauxval(3)`).
const AT_CLKTCK: usize = 17;

/// Clock ticks per second assumed when the auxiliary vector is unreadable.
const DEFAULT_CLOCK_TICKS_PER_SECOND: u64 = 100;

/// What the watcher measured over the window.
#[derive(Clone, Debug, Default)]
pub(crate) struct Watched {
    /// The processes under test, if any were given and all could be read
    /// throughout. `cpu_us_per_request` is left for the caller to fill.
    pub(crate) process: Option<ProcessUsage>,
    /// CPU seconds the generator used.
    pub(crate) generator_cpu_seconds: Option<f64>,
}

/// Fails unless `/proc/PID/stat` and `/proc/PID/status` are readable for
/// every pid.
pub(crate) async fn check(pids: &[u32]) -> anyhow::Result<()> {
    for pid in pids {
        let path = format!("/proc/{pid}");
        cpu_ticks(&path)
            .await
            .with_context(|| format!("--pid {pid}: reading {path}/stat"))?;
        rss_bytes(&path)
            .await
            .with_context(|| format!("--pid {pid}: reading {path}/status"))?;
    }
    Ok(())
}

/// Samples `pids` (none: only the generator) from `measure_start` until
/// `done` resolves (when the last measured request has completed, so that
/// the CPU time covers the same requests as the count it is divided by)
/// and returns the usage.
///
/// Cancel safety: cancel safe (it only reads files and sleeps), but then
/// measures nothing.
pub(crate) async fn watch(
    pids: &[u32],
    measure_start: Instant,
    done: tokio::sync::oneshot::Receiver<()>,
) -> Watched {
    let ticks_per_second = clock_ticks_per_second().await as f64;
    let paths: Vec<String> = pids.iter().map(|pid| format!("/proc/{pid}")).collect();
    tokio::time::sleep_until(measure_start).await;

    let generator_before = cpu_ticks("/proc/self").await.ok();
    let mut before = None;
    if !paths.is_empty() {
        match sample_all(&paths).await {
            Ok(sampled) => before = Some(sampled),
            Err(err) => warn!(?pids, error = %err, "cannot read the processes under test"),
        }
    }
    let mut peak_rss = before.map_or(0, |(_, rss)| rss);
    let mut ticks =
        tokio::time::interval_at(measure_start + RSS_SAMPLE_INTERVAL, RSS_SAMPLE_INTERVAL);
    let mut done = done;
    loop {
        tokio::select! {
            // Sent, or the sender dropped: either way the run is over.
            _ = &mut done => break,
            _ = ticks.tick() => {
                if before.is_some()
                    && let Ok(rss) = rss_sum(&paths).await
                {
                    peak_rss = peak_rss.max(rss);
                }
            }
        }
    }

    let generator_cpu_seconds = match (generator_before, cpu_ticks("/proc/self").await.ok()) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before) as f64 / ticks_per_second),
        _ => None,
    };
    let process = match before {
        Some((cpu_before, rss_before)) => match sample_all(&paths).await {
            Ok((cpu_after, rss_after)) => Some(ProcessUsage {
                pids: pids.to_vec(),
                cpu_seconds: cpu_after.saturating_sub(cpu_before) as f64 / ticks_per_second,
                cpu_us_per_request: None,
                rss_before_bytes: rss_before,
                rss_peak_bytes: peak_rss.max(rss_after),
                rss_after_bytes: rss_after,
            }),
            Err(err) => {
                warn!(?pids, error = %err, "the processes under test could not be read after the run");
                None
            }
        },
        None => None,
    };
    Watched {
        process,
        generator_cpu_seconds,
    }
}

/// CPU ticks and resident bytes of every process at `paths`, summed.
pub(crate) async fn sample_all(paths: &[String]) -> io::Result<(u64, u64)> {
    let mut cpu = 0;
    let mut rss = 0;
    for path in paths {
        let (ticks, bytes) = sample(path).await?;
        cpu += ticks;
        rss += bytes;
    }
    Ok((cpu, rss))
}

/// Resident bytes of every process at `paths`, summed.
async fn rss_sum(paths: &[String]) -> io::Result<u64> {
    let mut sum = 0;
    for path in paths {
        sum += rss_bytes(path).await?;
    }
    Ok(sum)
}

pub(crate) async fn sample(path: &str) -> io::Result<(u64, u64)> {
    Ok((cpu_ticks(path).await?, rss_bytes(path).await?))
}

/// `utime + stime` of the process at `path` (`/proc/PID`), in clock ticks.
pub(crate) async fn cpu_ticks(path: &str) -> io::Result<u64> {
    let stat = tokio::fs::read_to_string(format!("{path}/stat")).await?;
    parse_cpu_ticks(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected format of {path}/stat"),
        )
    })
}

/// Parses `utime` (field 14) plus `stime` (field 15) of a `/proc/PID/stat`
/// line. The command name (field 2) is parenthesised and may contain spaces
/// and parentheses, so fields are counted after its last `)`.
pub(crate) fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first one after the name.
    let mut fields = after_name.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` of the process at `path` (`/proc/PID`), in bytes.
async fn rss_bytes(path: &str) -> io::Result<u64> {
    let status = tokio::fs::read_to_string(format!("{path}/status")).await?;
    parse_rss_bytes(&status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no VmRSS in {path}/status"),
        )
    })
}

/// Parses the `VmRSS:  1234 kB` line of `/proc/PID/status`.
pub(crate) fn parse_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

/// `sysconf(_SC_CLK_TCK)`, read from the auxiliary vector.
pub(crate) async fn clock_ticks_per_second() -> u64 {
    match tokio::fs::read("/proc/self/auxv").await {
        Ok(auxv) => parse_auxv_clock_ticks(&auxv).unwrap_or(DEFAULT_CLOCK_TICKS_PER_SECOND),
        Err(_) => DEFAULT_CLOCK_TICKS_PER_SECOND,
    }
}

/// Finds `AT_CLKTCK` in an auxiliary vector: native-endian `(type, value)`
/// pairs of machine words.
pub(crate) fn parse_auxv_clock_ticks(auxv: &[u8]) -> Option<u64> {
    const WORD: usize = size_of::<usize>();
    auxv.chunks_exact(2 * WORD).find_map(|pair| {
        let key = usize::from_ne_bytes(pair[..WORD].try_into().ok()?);
        let value = usize::from_ne_bytes(pair[WORD..].try_into().ok()?);
        (key == AT_CLKTCK && value > 0).then_some(value as u64)
    })
}
