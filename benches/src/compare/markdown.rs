//! The markdown rendering of a [`CompareReport`]: setup, one table per
//! load run (absolute medians, ratio to direct, ratio to the best of
//! nginx/HAProxy), the memory table, the goals and everything skipped.
//!
//! "×best" is always the row's value over the better of nginx's and
//! HAProxy's: above 1 means more requests per second (throughput), or more
//! CPU, latency or memory (the others) than the better reference. A chain
//! of proxies (weft-s2s) is never the reference; its rows compare the pair
//! with one proxy, and the report says so.

use std::fmt::Write as _;

use super::report::{CompareReport, LoadRun, MemoryRow, RowSummary, RunKind, SATURATED_BUSY};
use super::{Scenario, TargetKind};

const MIB: f64 = 1024.0 * 1024.0;

/// Renders `report` as a markdown document.
pub fn render_markdown(report: &CompareReport) -> String {
    let mut out = String::new();
    setup(&mut out, report);
    if !report.memory.is_empty() {
        memory(&mut out, report);
    }
    for run in &report.runs {
        load_run(&mut out, run);
    }
    goals(&mut out, report);
    if !report.weft_full_not_built.is_empty() {
        let _ = writeln!(out, "## Not built in weft yet\n");
        let _ = writeln!(
            out,
            "`weft-full` configures every feature weft has today; these have no configuration \
             yet and are not part of its figures: {}.\n",
            report.weft_full_not_built.join(", ")
        );
    }
    if !report.notes.is_empty() {
        let _ = writeln!(out, "## Notes\n");
        for note in &report.notes {
            let _ = writeln!(out, "- {note}");
        }
        out.push('\n');
    }
    out
}

fn setup(out: &mut String, report: &CompareReport) {
    let _ = writeln!(out, "# weft-bench compare ({})\n", report.started_at);
    if let Some(command) = &report.command {
        let _ = writeln!(out, "Command: `{command}`\n");
    }
    let machine = &report.machine;
    let _ = writeln!(
        out,
        "Machine: {} ({} CPUs online), {}, Linux {}, {}.",
        machine.cpu_model.as_deref().unwrap_or("unknown CPU"),
        machine.online_cpus,
        machine
            .memory_bytes
            .map_or("unknown memory".to_owned(), |b| format!(
                "{:.0} GiB",
                b as f64 / (1024.0 * MIB)
            )),
        machine.kernel.as_deref().unwrap_or("?"),
        machine.os.as_deref().unwrap_or("unknown OS"),
    );
    let versions: Vec<&str> = report.versions.values().map(String::as_str).collect();
    let _ = writeln!(out, "Versions: {}.\n", versions.join("; "));
    let _ = writeln!(out, "Placement: {}.\n", report.placement.description);
    let settings = &report.settings;
    let _ = writeln!(
        out,
        "Each load run: {:.1} s measured after {:.1} s of warm-up; {} round(s), interleaved \
         across targets (A B C A B C ...); the tables show medians over rounds (errors: the \
         total). Latency is to the end of the response body; proxy CPU is the proxy process's \
         utime+stime over the window divided by the requests completed; RSS is its peak during \
         the window.\n",
        settings.duration_seconds, settings.warmup_seconds, settings.rounds,
    );
    let _ = writeln!(
        out,
        "Drivers: each row names the load generator that produced it. `wrk` (HTTP/1.1) and \
         `h2load` (h2c) drive the closed-loop runs they can when installed, pinned to the load \
         CPUs with the same connections (and streams) as the built-in generator, after a \
         separate unmeasured warm-up run; their latency is what they report (wrk: \
         p50/p90/p99 and max, no p99.9; h2load: mean and max only). `weft-bench` is the \
         built-in generator. \"proxy busy\" is the proxy's CPU time over the wall time (100 % = \
         its core saturated); \"gen busy\" is the CPU time of the generator and the echo \
         upstream, which share the load CPUs, over the wall time times those CPUs. A \
         closed-loop row whose proxy was under {:.0} % busy is marked generator-bound: the \
         generator, not the proxy, set its pace, so its throughput and CPU per request say \
         little about the proxy; when neither core saturated, other work on the machine most \
         likely took CPU time from both.\n",
        SATURATED_BUSY * 100.0
    );
    if report
        .targets
        .iter()
        .any(|status| status.target.is_proxy_chain())
    {
        let _ = writeln!(
            out,
            "weft-s2s (and weft-s2s-mtls) is two proxies in series, so its proxy CPU and RSS \
             are the sums over both sidecars (the cost of a mesh hop pair, to be set against \
             two Envoys or linkerd-proxies), and its ×best compares that pair with one nginx or \
             HAProxy. It is never the best reference itself; its one goal holds the mTLS pair \
             against the cleartext pair.\n"
        );
    }
    let _ = writeln!(out, "| target | configuration | status |");
    let _ = writeln!(out, "| --- | --- | --- |");
    for status in &report.targets {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            status.target.name(),
            status.description,
            status
                .skip_reason
                .as_deref()
                .map_or("measured".to_owned(), |reason| format!(
                    "skipped: {}",
                    one_line(reason)
                )),
        );
    }
    out.push('\n');
}

fn memory(out: &mut String, report: &CompareReport) {
    let settings = &report.settings;
    let has_idle = settings.scenarios.contains(&Scenario::Idle);
    let names: Vec<String> = settings
        .scenarios
        .iter()
        .filter(|scenario| scenario.is_memory())
        .map(|scenario| format!("`{}`", scenario.name()))
        .collect();
    let _ = writeln!(out, "## Memory ({})\n", names.join(", "));
    let _ = write!(out, "A fresh process per target, scenario and round.");
    if settings.scenarios.contains(&Scenario::IdleRss) {
        let _ = write!(
            out,
            " Idle RSS: `VmRSS` {:.1} s after start, before any traffic, configured as for the \
             load runs (nginx: the worker; weft-s2s: both sidecars, summed).",
            settings.settle_seconds
        );
    }
    if has_idle {
        let _ = write!(
            out,
            " Per idle connection: RSS growth over {} keep-alive connections opened one after \
             another in batches of {}, each after one GET, held open, with a {:.1} s pause after \
             each batch (as `benches/scripts/idle-connections.py` does): overall, and marginal \
             over the second half (the steady-state cost); weft-s2s: both sidecars' RSS, \
             summed.",
            settings.idle_connections,
            super::idle::BATCH,
            settings.idle_pause_seconds
        );
    }
    out.push_str("\n\n");
    let _ = writeln!(
        out,
        "| target | idle RSS MiB | ×best | per idle connection KiB | ×best | marginal KiB | ×best |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
    let best_rss = best_memory(&report.memory, |row| {
        row.idle_rss_median_bytes.map(|b| b as f64)
    });
    let best_idle = best_memory(&report.memory, |row| {
        row.idle.as_ref()?.per_connection_median_bytes
    });
    let best_marginal = best_memory(&report.memory, |row| {
        row.idle.as_ref()?.marginal_per_connection_median_bytes
    });
    for row in report.memory.iter().filter(|row| row.skip_reason.is_none()) {
        let rss = row.idle_rss_median_bytes.map(|b| b as f64);
        let idle = row
            .idle
            .as_ref()
            .and_then(|idle| idle.per_connection_median_bytes);
        let marginal = row
            .idle
            .as_ref()
            .and_then(|idle| idle.marginal_per_connection_median_bytes);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.target.name(),
            rss.map_or(dash(), |b| format!("{:.2}", b / MIB)),
            ratio(rss, best_rss),
            idle.map_or(dash(), |b| format!("{:.2}", b / 1024.0)),
            ratio(idle, best_idle),
            marginal.map_or(dash(), |b| format!("{:.2}", b / 1024.0)),
            ratio(marginal, best_marginal),
        );
    }
    out.push('\n');
    for row in &report.memory {
        if let Some(reason) = &row.skip_reason {
            let _ = writeln!(
                out,
                "- {}: not measured ({})",
                row.target.name(),
                one_line(reason)
            );
        }
        if let Some(master) = row.master_rss_bytes {
            let _ = writeln!(
                out,
                "- {}: the master process holds another {:.2} MiB",
                row.target.name(),
                master as f64 / MIB
            );
        }
        if let Some(up_front) = up_front_per_connection(row, settings.idle_connections) {
            let _ = writeln!(
                out,
                "- {}: sized for the idle connections, it starts {:.2} KiB per connection larger \
                 (connection tables allocated up front), which the growth above leaves out",
                row.target.name(),
                up_front / 1024.0
            );
        }
        for failure in &row.failures {
            let _ = writeln!(out, "- {}: {}", row.target.name(), one_line(failure));
        }
        for round in row.idle.iter().flat_map(|idle| &idle.rounds) {
            if let Some(error) = &round.error {
                let _ = writeln!(
                    out,
                    "- {}: only {} idle connections: {}",
                    row.target.name(),
                    round.opened,
                    one_line(error)
                );
            }
        }
    }
    out.push('\n');
}

/// Bytes per idle connection a process sized for the `idle` scenario holds
/// before any of them is open, over the one sized for the load runs
/// (`idle-rss`), when that exceeds 0.1 KiB.
fn up_front_per_connection(row: &MemoryRow, connections: usize) -> Option<f64> {
    let idle_rss = row.idle_rss_median_bytes? as f64;
    let before: Vec<f64> = row
        .idle
        .as_ref()?
        .rounds
        .iter()
        .map(|round| round.rss_before_bytes as f64)
        .collect();
    let per_connection = (super::report::median(&before)? - idle_rss) / connections.max(1) as f64;
    (per_connection > 0.1 * 1024.0).then_some(per_connection)
}

fn best_memory(rows: &[MemoryRow], metric: impl Fn(&MemoryRow) -> Option<f64>) -> Option<f64> {
    rows.iter()
        .filter(|row| row.target.is_reference())
        .filter_map(metric)
        .reduce(f64::min)
}

fn load_run(out: &mut String, run: &LoadRun) {
    let _ = writeln!(out, "## {}: {}\n", run.id, run.title);
    if let Some(reason) = &run.skip_reason {
        let _ = writeln!(out, "Skipped: {}\n", one_line(reason));
        return;
    }
    if let (Some(rate), Some(basis)) = (run.rate_per_second, &run.rate_basis) {
        let _ = writeln!(out, "Rate: {rate:.0} req/s, {}.\n", one_line(basis));
    }
    let is_tcp = run.scenario == Scenario::Tcp;
    let throughput = |s: &RowSummary| {
        if is_tcp {
            s.mb_per_second
        } else {
            Some(s.throughput_per_second)
        }
    };
    let unit = if is_tcp { "MB/s" } else { "req/s" };
    let _ = writeln!(
        out,
        "| target | driver | {unit} | ×direct | ×best | errors | mean ms | p50 ms | p90 ms | \
         p99 ms | p99.9 ms | p99 over direct ms | proxy CPU µs/req | CPU ×best | peak RSS MiB | \
         proxy busy | gen busy | saturated |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | \
         --- | --- | --- | --- |"
    );
    let direct = run.summary(TargetKind::Direct);
    let best_throughput = run.best_reference(throughput, false).map(|(_, v)| v);
    let best_cpu = run
        .best_reference(|s| s.cpu_us_per_request, true)
        .map(|(_, v)| v);
    for row in &run.rows {
        let Some(summary) = &row.median else {
            continue;
        };
        let value = throughput(summary);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | \
             {} | {} |",
            row.target.name(),
            row.driver.name(),
            value.map_or(dash(), |v| format!("{v:.0}")),
            ratio(value, direct.and_then(throughput)),
            ratio(value, best_throughput),
            summary.errors_total,
            ms(summary.mean_us),
            ms(summary.p50_us),
            ms(summary.p90_us),
            ms(summary.p99_us),
            ms(summary.p999_us),
            match (direct.and_then(|d| d.p99_us), summary.p99_us) {
                (Some(direct), Some(p99)) if row.target != TargetKind::Direct => {
                    format!("{:+.3}", (p99 - direct) / 1000.0)
                }
                _ => dash(),
            },
            summary
                .cpu_us_per_request
                .map_or(dash(), |cpu| format!("{cpu:.1}")),
            ratio(summary.cpu_us_per_request, best_cpu),
            summary
                .rss_peak_bytes
                .map_or(dash(), |b| format!("{:.1}", b as f64 / MIB)),
            busy(summary.proxy_core_busy),
            busy(summary.generator_core_busy),
            if summary.is_generator_bound {
                format!("{}; **generator-bound**", summary.saturated())
            } else {
                summary.saturated().to_owned()
            },
        );
    }
    out.push('\n');
    if run.scenario.is_handshake() {
        handshakes(out, run);
    }
    let bound: Vec<&str> = run
        .rows
        .iter()
        .filter(|row| row.median.is_some_and(|m| m.is_generator_bound))
        .map(|row| row.target.name())
        .collect();
    if !bound.is_empty() {
        let _ = writeln!(
            out,
            "- generator-bound (proxy core under {:.0} % busy in a closed loop): {}",
            SATURATED_BUSY * 100.0,
            bound.join(", ")
        );
    }
    if run.kind == RunKind::FixedRate {
        let behind: Vec<&str> = run
            .rows
            .iter()
            .filter(|row| {
                row.rounds
                    .iter()
                    .any(|r| r.schedule.is_some_and(|s| s.is_behind()))
            })
            .map(|row| row.target.name())
            .collect();
        if !behind.is_empty() {
            let _ = writeln!(
                out,
                "- the generator fell behind its schedule for: {} (some requests were sent \
                 more than 10 ms late)",
                behind.join(", ")
            );
        }
    }
    for row in &run.rows {
        if let Some(reason) = &row.skip_reason {
            let _ = writeln!(
                out,
                "- {}: skipped ({})",
                row.target.name(),
                one_line(reason)
            );
        }
        for failure in &row.failures {
            let _ = writeln!(out, "- {}: {}", row.target.name(), one_line(failure));
        }
    }
    out.push('\n');
}

/// A handshake run's primary figure: handshakes per second of proxy CPU
/// (each request opened its own connection), against nginx and the best
/// of nginx/HAProxy, and how many handshakes resumed a session.
fn handshakes(out: &mut String, run: &LoadRun) {
    let _ = writeln!(
        out,
        "Handshakes per proxy core-second = 1 / proxy CPU per request: each request made its own \
         connection and TLS handshake, so this is what one fully busy proxy core would sustain. \
         \"resumed\" is the share of measured connections whose handshake resumed a session.\n"
    );
    let _ = writeln!(
        out,
        "| target | driver | handshakes/s | handshakes per proxy core-second | ×nginx | ×best | \
         resumed | proxy busy | gen busy |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let per_core = |s: &RowSummary| s.handshakes_per_core_second();
    let nginx = run.summary(TargetKind::Nginx).and_then(per_core);
    let best = run.best_reference(per_core, false).map(|(_, v)| v);
    for row in &run.rows {
        let Some(summary) = &row.median else {
            continue;
        };
        let value = per_core(summary);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            row.target.name(),
            row.driver.name(),
            summary.throughput_per_second,
            value.map_or(dash(), |v| format!("{v:.0}")),
            ratio(value, nginx),
            ratio(value, best),
            row.tls_resumed_fraction()
                .map_or(dash(), |f| format!("{:.0} %", f * 100.0)),
            busy(summary.proxy_core_busy),
            busy(summary.generator_core_busy),
        );
    }
    out.push('\n');
}

fn goals(out: &mut String, report: &CompareReport) {
    if report.goals.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Goals\n");
    let _ = writeln!(out, "| target | goal | this run | met |");
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    for goal in &report.goals {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            goal.target.name(),
            goal.goal,
            goal.detail,
            match goal.met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "—",
            }
        );
    }
    out.push('\n');
}

fn ratio(value: Option<f64>, reference: Option<f64>) -> String {
    match (value, reference) {
        (Some(value), Some(reference)) if reference > 0.0 => format!("{:.2}", value / reference),
        _ => dash(),
    }
}

fn busy(fraction: Option<f64>) -> String {
    fraction.map_or(dash(), |f| format!("{:.0} %", f * 100.0))
}

fn ms(micros: Option<f64>) -> String {
    micros.map_or(dash(), |micros| format!("{:.3}", micros / 1000.0))
}

fn dash() -> String {
    "—".to_owned()
}

/// A reason fit for a table cell or a bullet: first line, no pipes.
fn one_line(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default();
    let mut line = first.replace('|', "/");
    if text.lines().nth(1).is_some() {
        line.push_str(" …");
    }
    line
}
