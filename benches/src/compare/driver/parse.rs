//! Parsers of what `wrk --latency` and `h2load` print. Each returns a
//! [`ToolOutput`] or an error naming the line it could not find or read;
//! none panics on any input.

use anyhow::{Context as _, anyhow, bail};

use super::{ToolLatency, ToolOutput};

/// Parses the report `wrk --latency` prints on stdout.
///
/// Required: the `N requests in D, ...` line and `Requests/sec:`. Read
/// when present: the `Latency` thread-stats line (mean, sd, max), the
/// `Latency Distribution` percentiles (50, 75, 90, 99), `Socket errors:`
/// and `Non-2xx or 3xx responses:` (wrk omits both when zero).
pub(crate) fn parse_wrk(text: &str) -> anyhow::Result<ToolOutput> {
    let mut output = ToolOutput::default();
    let mut requests_line = None;
    let mut rate_line = None;
    let mut in_distribution = false;
    for line in text.lines().map(str::trim) {
        if line == "Latency Distribution" {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            if let Some((percent, value)) = line.split_once('%') {
                let value = duration_us(value.trim())
                    .with_context(|| format!("wrk latency percentile line {line:?}"))?;
                match percent.trim() {
                    "50" => output.latency.p50_us = Some(value),
                    "75" => output.latency.p75_us = Some(value),
                    "90" => output.latency.p90_us = Some(value),
                    "99" => output.latency.p99_us = Some(value),
                    _ => {}
                }
                continue;
            }
            in_distribution = false;
        }
        if let Some(rest) = line.strip_prefix("Latency ") {
            // `Latency   291.45us  407.94us   5.97ms   97.69%`: avg, stdev, max.
            let words: Vec<&str> = rest.split_whitespace().collect();
            let [mean, sd, max, ..] = words.as_slice() else {
                bail!("wrk latency line {line:?}: expected avg, stdev and max");
            };
            output.latency.mean_us = Some(duration_us(mean).context("wrk latency average")?);
            output.latency.sd_us = Some(duration_us(sd).context("wrk latency stdev")?);
            output.latency.max_us = Some(duration_us(max).context("wrk latency max")?);
        } else if line.contains(" requests in ") {
            requests_line = Some(line);
        } else if let Some(rest) = line.strip_prefix("Requests/sec:") {
            rate_line = Some(rest.trim());
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            output.errors.connect = socket_error(rest, "connect")?;
            output.errors.read = socket_error(rest, "read")?;
            output.errors.write = socket_error(rest, "write")?;
            output.errors.timeout = socket_error(rest, "timeout")?;
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            output.errors.non_2xx_3xx = rest
                .trim()
                .parse()
                .with_context(|| format!("wrk line {line:?}"))?;
        }
    }
    let line = requests_line.ok_or_else(|| anyhow!("no `N requests in D` line in wrk's output"))?;
    // `106484 requests in 2.00s, 20.21MB read`
    let mut words = line.split_whitespace();
    output.requests = words
        .next()
        .and_then(|count| count.parse().ok())
        .with_context(|| format!("wrk line {line:?}: no request count"))?;
    let duration = words
        .nth(2)
        .map(|d| d.trim_end_matches(','))
        .with_context(|| format!("wrk line {line:?}: no duration"))?;
    output.duration_seconds =
        duration_us(duration).with_context(|| format!("wrk line {line:?}"))? / 1e6;
    let rate = rate_line.ok_or_else(|| anyhow!("no `Requests/sec:` line in wrk's output"))?;
    output.requests_per_second = rate
        .parse()
        .with_context(|| format!("wrk `Requests/sec: {rate}`"))?;
    output.completed = output.requests;
    output.succeeded = output.requests.saturating_sub(output.errors.non_2xx_3xx);
    Ok(output)
}

/// `connect 0, read 4, write 38953, timeout 0`: the count after `name`.
fn socket_error(list: &str, name: &str) -> anyhow::Result<u64> {
    list.split(',')
        .map(str::trim)
        .find_map(|item| item.strip_prefix(name))
        .and_then(|count| count.trim().parse().ok())
        .with_context(|| format!("wrk `Socket errors:{list}`: no {name} count"))
}

/// Parses what `h2load` prints.
///
/// Required: `finished in D, R req/s, ...` and `requests: ...`. Read when
/// present: `status codes: ...` and `time for request:` (min, max, mean,
/// sd; h2load gives no percentiles).
pub(crate) fn parse_h2load(text: &str) -> anyhow::Result<ToolOutput> {
    let mut output = ToolOutput::default();
    let mut finished = false;
    let mut requests = false;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // `3.00s, 57159.00 req/s, 893.20KB/s`
            let mut parts = rest.split(',').map(str::trim);
            let duration = parts.next().unwrap_or_default();
            output.duration_seconds =
                duration_us(duration).with_context(|| format!("h2load line {line:?}"))? / 1e6;
            output.requests_per_second = parts
                .next()
                .and_then(|rate| rate.strip_suffix(" req/s"))
                .and_then(|rate| rate.parse().ok())
                .with_context(|| format!("h2load line {line:?}: no req/s"))?;
            finished = true;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            // `114318 total, 114318 started, 114318 done, 114318 succeeded,
            // 0 failed, 0 errored, 0 timeout`
            let count = |name: &str| {
                counted(rest, name).with_context(|| format!("h2load line {line:?}: no {name}"))
            };
            output.requests = count("total")?;
            output.completed = count("done")?;
            output.succeeded = count("succeeded")?;
            output.errors.failed = count("failed")?;
            output.errors.errored = count("errored")?;
            output.errors.timeout = count("timeout")?;
            requests = true;
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            let count = |name: &str| {
                counted(rest, name).with_context(|| format!("h2load line {line:?}: no {name}"))
            };
            output.errors.status_4xx = Some(count("4xx")?);
            output.errors.status_5xx = Some(count("5xx")?);
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let [min, max, mean, sd, ..] = words.as_slice() else {
                bail!("h2load line {line:?}: expected min, max, mean and sd");
            };
            let latency = ToolLatency {
                min_us: Some(duration_us(min).context("h2load request time min")?),
                max_us: Some(duration_us(max).context("h2load request time max")?),
                mean_us: Some(duration_us(mean).context("h2load request time mean")?),
                sd_us: Some(duration_us(sd).context("h2load request time sd")?),
                ..ToolLatency::default()
            };
            // h2load prints zeros when nothing completed.
            if output.completed > 0 || latency.max_us.is_some_and(|max| max > 0.0) {
                output.latency = latency;
            }
        }
    }
    if !finished {
        bail!("no `finished in` line in h2load's output");
    }
    if !requests {
        bail!("no `requests:` line in h2load's output");
    }
    Ok(output)
}

/// `114318 total, 0 failed, ...`: the count before `name`.
fn counted(list: &str, name: &str) -> Option<u64> {
    list.split(',').find_map(|item| {
        let (count, label) = item.trim().split_once(' ')?;
        (label.trim() == name).then(|| count.parse().ok())?
    })
}

/// A duration as wrk and h2load print them (`236.00us`, `2.59ms`,
/// `2.00s`, `1.50m`, `1.00h`), in microseconds.
pub(crate) fn duration_us(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e'))
        .ok_or_else(|| anyhow!("duration {text:?} has no unit"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("duration {text:?}: not a number"))?;
    let scale = match unit {
        "ns" => 1e-3,
        "us" | "µs" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("duration {text:?}: unknown unit {unit:?}"),
    };
    anyhow::ensure!(
        value.is_finite() && value >= 0.0,
        "duration {text:?} is negative or not finite"
    );
    Ok(value * scale)
}
