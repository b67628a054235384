//! One request's trace as a waterfall: each span a bar on a shared time
//! axis, children under their parent, for the terminal and as an SVG.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::otlp::ReceivedSpan;

/// Columns of the terminal bar.
const BAR: usize = 40;

/// A span placed in the waterfall.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    /// Nesting depth (a root is 0).
    pub(crate) depth: usize,
    /// Who recorded it (`service.name`).
    pub(crate) service: String,
    /// `server` or `client`.
    pub(crate) kind: &'static str,
    pub(crate) name: String,
    /// Start, in nanoseconds after the trace's first start.
    pub(crate) offset: u64,
    pub(crate) duration: u64,
    pub(crate) status: String,
    pub(crate) is_error: bool,
}

/// The spans of one trace in tree order: each root (a span whose parent
/// is not among them), then its children by start time, depth first.
pub(crate) fn rows(spans: &[ReceivedSpan]) -> Vec<Row> {
    let Some(first) = spans.iter().map(|s| s.start_unix_nanos).min() else {
        return Vec::new();
    };
    let ids: HashMap<&str, &ReceivedSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut children: HashMap<&str, Vec<&ReceivedSpan>> = HashMap::new();
    let mut roots = Vec::new();
    for span in spans {
        if ids.contains_key(span.parent_span_id.as_str()) {
            children
                .entry(span.parent_span_id.as_str())
                .or_default()
                .push(span);
        } else {
            roots.push(span);
        }
    }
    let by_start = |a: &&ReceivedSpan, b: &&ReceivedSpan| {
        a.start_unix_nanos
            .cmp(&b.start_unix_nanos)
            // A server span before the client span it starts with.
            .then(b.end_unix_nanos.cmp(&a.end_unix_nanos))
    };
    roots.sort_by(by_start);
    for list in children.values_mut() {
        list.sort_by(by_start);
    }
    let mut out = Vec::with_capacity(spans.len());
    let mut stack: Vec<(&ReceivedSpan, usize)> = roots.into_iter().rev().map(|s| (s, 0)).collect();
    while let Some((span, depth)) = stack.pop() {
        out.push(Row {
            depth,
            service: span.service.clone(),
            kind: span.kind,
            name: span.name.clone(),
            offset: span.start_unix_nanos.saturating_sub(first),
            duration: span.end_unix_nanos.saturating_sub(span.start_unix_nanos),
            status: span
                .attribute("http.response.status_code")
                .unwrap_or("-")
                .to_owned(),
            is_error: span.is_error,
        });
        if let Some(list) = children.get(span.span_id.as_str()) {
            stack.extend(list.iter().rev().map(|s| (*s, depth + 1)));
        }
    }
    out
}

fn total(rows: &[Row]) -> u64 {
    rows.iter()
        .map(|r| r.offset + r.duration)
        .max()
        .unwrap_or(0)
        .max(1)
}

fn millis(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

/// The waterfall as terminal lines: label, bar, duration and status.
pub(crate) fn text(rows: &[Row]) -> String {
    let total = total(rows);
    let labels: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}{} {} {}",
                "  ".repeat(r.depth),
                r.service,
                r.kind,
                r.name
            )
        })
        .collect();
    let width = labels.iter().map(String::len).max().unwrap_or(0);
    let mut out = String::new();
    for (row, label) in rows.iter().zip(&labels) {
        // Integer arithmetic: a bar covers the columns its span overlaps,
        // at least one.
        let scale = |nanos: u64| usize::try_from(nanos * BAR as u64 / total).unwrap_or(BAR);
        let start = scale(row.offset).min(BAR - 1);
        let end = scale(row.offset + row.duration).clamp(start + 1, BAR);
        let bar: String = (0..BAR)
            .map(|i| if (start..end).contains(&i) { '#' } else { '.' })
            .collect();
        let _ = writeln!(
            out,
            "  {label:<width$}  |{bar}| {:>8.2} ms  {}{}",
            millis(row.duration),
            row.status,
            if row.is_error { "  error" } else { "" }
        );
    }
    out
}

/// The waterfall as an SVG document.
pub(crate) fn svg(rows: &[Row], title: &str) -> String {
    const LABEL: u64 = 380;
    const CHART: u64 = 560;
    const ROW: u64 = 22;
    const TOP: u64 = 40;
    let total = total(rows);
    let height = TOP + ROW * rows.len() as u64 + 30;
    let width = LABEL + CHART + 120;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="#ffffff"/><text x="10" y="22" font-size="14">{}</text>"##,
        escape(title)
    );
    for (i, row) in rows.iter().enumerate() {
        let y = TOP + ROW * i as u64;
        let x = LABEL + row.offset * CHART / total;
        let w = (row.duration * CHART / total).max(1);
        let colour = match (row.is_error, row.kind) {
            (true, _) => "#d9534f",
            (false, "server") => "#337ab7",
            _ => "#5cb85c",
        };
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}">{} {} {}</text><rect x="{x}" y="{}" width="{w}" height="14" fill="{colour}"/><text x="{}" y="{}">{:.2} ms {}</text>"#,
            10 + 14 * row.depth,
            y + 12,
            escape(&row.service),
            row.kind,
            escape(&row.name),
            y + 1,
            x + w + 6,
            y + 12,
            millis(row.duration),
            escape(&row.status)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{LABEL}" y="{}">0 ms</text><text x="{}" y="{}" text-anchor="end">{:.2} ms</text>"#,
        height - 10,
        LABEL + CHART,
        height - 10,
        millis(total)
    );
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn span(
        service: &str,
        kind: &'static str,
        id: &str,
        parent: &str,
        start: u64,
        end: u64,
    ) -> ReceivedSpan {
        ReceivedSpan {
            service: service.into(),
            trace_id: "t".into(),
            span_id: id.into(),
            parent_span_id: parent.into(),
            name: format!("GET {service}"),
            kind,
            start_unix_nanos: start,
            end_unix_nanos: end,
            attributes: BTreeMap::from([("http.response.status_code".into(), "200".into())]),
            events: Vec::new(),
            is_error: false,
        }
    }

    #[test]
    fn spans_nest_under_their_parents_in_start_order() {
        // Out of order on purpose, as exports from several proxies arrive.
        let spans = vec![
            span("backend", "server", "e", "d", 3_000_000, 5_000_000),
            span("gateway", "client", "b", "a", 1_000_000, 9_000_000),
            span("frontend", "client", "d", "c", 2_500_000, 5_500_000),
            span("gateway", "server", "a", "remote", 1_000_000, 10_000_000),
            span("frontend", "server", "c", "b", 2_000_000, 8_000_000),
            span("frontend", "client", "f", "c", 6_000_000, 7_000_000),
        ];
        let rows = rows(&spans);
        let order: Vec<(usize, &str, &str)> = rows
            .iter()
            .map(|r| (r.depth, r.service.as_str(), r.kind))
            .collect();
        assert_eq!(
            order,
            [
                (0, "gateway", "server"),
                (1, "gateway", "client"),
                (2, "frontend", "server"),
                (3, "frontend", "client"),
                (4, "backend", "server"),
                (3, "frontend", "client"),
            ]
        );
        assert_eq!(rows[0].offset, 0);
        assert_eq!(rows[4].offset, 2_000_000);

        let text = text(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6);
        // The root spans the whole axis; the backend's server span covers
        // 2 to 4 ms of 9 ms: columns 8 to 17 of 40.
        assert!(
            lines[0].contains(&format!("|{}|", "#".repeat(40))),
            "{text}"
        );
        let backend = format!("|{}{}{}|", ".".repeat(8), "#".repeat(9), ".".repeat(23));
        assert!(lines[4].contains(&backend), "{text}");
        assert!(lines[4].contains("2.00 ms  200"), "{text}");

        let svg = svg(&rows, "GET /frontend/ <trace>");
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<rect").count(), 7, "background and six bars");
        assert!(svg.contains("&lt;trace&gt;"));
    }
}
