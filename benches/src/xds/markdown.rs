//! The markdown rendering of an [`XdsReport`]: the summary table (one row
//! per proxy count), the per-round details, the goals and the problems.

use std::fmt::Write as _;

use super::report::{XdsReport, XdsRow};

const MIB: f64 = 1024.0 * 1024.0;

/// Proxies at which the convergence goal is checked.
const GOAL_PROXIES: usize = 1000;
/// Goal: write → last ACK at [`GOAL_PROXIES`], in milliseconds.
const GOAL_CONVERGENCE_MS: f64 = 1000.0;
/// Goal: control-plane memory per connected proxy, in KiB.
const GOAL_KIB_PER_PROXY: f64 = 50.0;

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "—".to_owned(), |v| format!("{v:.0}"))
}

fn mib(value: Option<u64>) -> String {
    value.map_or_else(|| "—".to_owned(), |v| format!("{:.1}", v as f64 / MIB))
}

/// Renders `report` as markdown.
pub fn render_markdown(report: &XdsReport) -> String {
    let mut out = String::new();
    let limit = report
        .open_files_limit
        .map_or_else(|| "unlimited".to_owned(), |l| l.to_string());
    let _ = writeln!(
        out,
        "weft-cp: `{}`; {} round(s) per proxy count; placement: {}; generator: {} runtime \
         thread(s); open-files limit {limit}.\n",
        report.cp_binary, report.rounds, report.placement, report.client_threads
    );
    let _ = writeln!(
        out,
        "| proxies | all ACKed | initial convergence ms | push: write → last ACK ms | push: first \
         push → last ACK ms | cp RSS empty MiB | cp RSS with N MiB | KiB per proxy | cp CPU per \
         push ms | generator CPU per push ms |"
    );
    let _ = writeln!(
        out,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in &report.rows {
        if let Some(reason) = &row.skipped {
            let _ = writeln!(
                out,
                "| {} | skipped: {reason} | | | | | | | | |",
                row.proxies
            );
            continue;
        }
        let all_acked = row.initially_acked == row.proxies
            && row.rounds.iter().all(|round| round.converged)
            && row.errors.is_empty();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.proxies,
            if all_acked { "yes" } else { "NO" },
            ms(row.initial_convergence_ms),
            ms(row.median_write_to_last_ack_ms),
            ms(row.median_first_push_to_last_ack_ms),
            mib(row.rss_empty_bytes),
            mib(row.rss_connected_bytes),
            row.kib_per_proxy
                .map_or_else(|| "—".to_owned(), |v| format!("{v:.1}")),
            ms(row.median_cp_cpu_ms),
            ms(row.median_client_cpu_ms),
        );
    }
    out.push('\n');
    details(&mut out, report);
    goals(&mut out, report);
    problems(&mut out, report);
    out
}

fn details(out: &mut String, report: &XdsReport) {
    let _ = writeln!(
        out,
        "| proxies | round | nodes updated | write → first push ms | write → last ACK ms | first \
         push → last ACK ms | cp CPU ms | generator CPU ms | pushes (clusters/routes/listeners) \
         | /status settled |"
    );
    let _ = writeln!(
        out,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    );
    for row in report.rows.iter().filter(|row| row.skipped.is_none()) {
        for (index, round) in row.rounds.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {}/{}/{} | {} |",
                row.proxies,
                index + 1,
                round.nodes_updated,
                ms(round.write_to_first_push_ms),
                ms(round.write_to_last_ack_ms),
                ms(round.first_push_to_last_ack_ms),
                ms(round.cp_cpu_ms),
                ms(round.client_cpu_ms),
                round.pushes.clusters,
                round.pushes.routes,
                round.pushes.listeners,
                if round.status_settled { "yes" } else { "no" },
            );
        }
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "| proxies | /status proxies | cp RSS after rounds MiB | cp idle CPU ms/s (watcher) | \
         generator CPU, connect + initial ms |"
    );
    let _ = writeln!(out, "| ---: | ---: | ---: | ---: | ---: |");
    for row in report.rows.iter().filter(|row| row.skipped.is_none()) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.proxies,
            row.status_proxies
                .map_or_else(|| "—".to_owned(), |p| p.to_string()),
            mib(row.rss_after_rounds_bytes),
            row.cp_idle_cpu_ms_per_s
                .map_or_else(|| "—".to_owned(), |v| format!("{v:.1}")),
            ms(row.client_cpu_initial_ms),
        );
    }
    out.push('\n');
}

fn goals(out: &mut String, report: &XdsReport) {
    let at_goal = report
        .rows
        .iter()
        .find(|row| row.proxies == GOAL_PROXIES && row.skipped.is_none());
    let _ = writeln!(out, "Goals:\n");
    match at_goal {
        Some(row) => {
            let verdict = |value: Option<f64>, goal: f64| match value {
                Some(v) if v < goal => "met",
                Some(_) => "NOT met",
                None => "not measured",
            };
            let _ = writeln!(
                out,
                "- {GOAL_PROXIES} proxies converge in under {GOAL_CONVERGENCE_MS:.0} ms: write → \
                 last ACK {} ms ({}); first push → last ACK {} ms ({}).",
                ms(row.median_write_to_last_ack_ms),
                verdict(row.median_write_to_last_ack_ms, GOAL_CONVERGENCE_MS),
                ms(row.median_first_push_to_last_ack_ms),
                verdict(row.median_first_push_to_last_ack_ms, GOAL_CONVERGENCE_MS),
            );
        }
        None => {
            let _ = writeln!(
                out,
                "- {GOAL_PROXIES} proxies converge in under {GOAL_CONVERGENCE_MS:.0} ms: not \
                 measured in this run."
            );
        }
    }
    let per_proxy: Vec<&XdsRow> = report
        .rows
        .iter()
        .filter(|row| row.kib_per_proxy.is_some() && row.proxies >= 100)
        .collect();
    if per_proxy.is_empty() {
        let _ = writeln!(
            out,
            "- Under {GOAL_KIB_PER_PROXY:.0} KiB of control-plane memory per connected proxy: \
             not measured with 100 proxies or more."
        );
    } else {
        let figures: Vec<String> = per_proxy
            .iter()
            .map(|row| {
                let kib = row.kib_per_proxy.unwrap_or(f64::NAN);
                format!(
                    "{kib:.1} KiB at {} ({})",
                    row.proxies,
                    if kib < GOAL_KIB_PER_PROXY {
                        "met"
                    } else {
                        "NOT met"
                    }
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "- Under {GOAL_KIB_PER_PROXY:.0} KiB of control-plane memory per connected proxy: {}.",
            figures.join(", ")
        );
    }
    out.push('\n');
}

fn problems(out: &mut String, report: &XdsReport) {
    let with_errors: Vec<&XdsRow> = report
        .rows
        .iter()
        .filter(|row| !row.errors.is_empty())
        .collect();
    if with_errors.is_empty() {
        return;
    }
    let _ = writeln!(out, "Problems:\n");
    for row in with_errors {
        for error in &row.errors {
            let _ = writeln!(out, "- {} proxies: {error}", row.proxies);
        }
    }
    out.push('\n');
}
