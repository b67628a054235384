//! SVG charts: latency percentile curves, one per target, of one load run.
//!
//! Drawn with plotters' SVG backend alone. Without its `ttf` feature
//! plotters lays text out with a built-in size estimate and the SVG holds
//! plain `<text>` elements, so no system font is read when drawing: the
//! viewer renders the text. The x axis has one evenly spaced step per
//! percentile (p50, p90, p99, p99.9: each a tenfold smaller tail, as on
//! HdrHistogram's log-of-nines axis, with p50 pulled in one step) plus the
//! maximum; the y axis is logarithmic.

use plotters::prelude::*;

use super::TargetKind;
use super::report::LoadRun;

/// Labels of the x axis's five points.
const PERCENTILES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

/// Chart size in pixels.
const SIZE: (u32, u32) = (820, 500);

/// The colour a target is drawn in, the same in every chart.
fn colour(target: TargetKind) -> RGBColor {
    match target {
        TargetKind::Direct => RGBColor(120, 120, 120),
        TargetKind::Weft => RGBColor(31, 119, 180),
        TargetKind::WeftFull => RGBColor(148, 103, 189),
        TargetKind::WeftSidecars => RGBColor(23, 190, 207),
        TargetKind::WeftSidecarsMtls => RGBColor(188, 189, 34),
        TargetKind::Nginx => RGBColor(44, 160, 44),
        TargetKind::Haproxy => RGBColor(214, 39, 40),
    }
}

/// An SVG document with the latency percentiles (medians over rounds) of
/// every target measured in `run`, or `None` when none was.
///
/// # Errors
///
/// When plotters fails to draw (it writes to a string, so only on a bug).
pub fn latency_svg(run: &LoadRun) -> anyhow::Result<Option<String>> {
    // A driver that gives no percentile (h2load) draws no curve; one
    // that gives some (wrk: no p99.9) draws the points it has.
    let curves: Vec<(TargetKind, Vec<(f64, f64)>)> = run
        .rows
        .iter()
        .filter_map(|row| {
            let m = row.median.as_ref()?;
            let points: Vec<(f64, f64)> = [m.p50_us, m.p90_us, m.p99_us, m.p999_us, m.max_us]
                .iter()
                .enumerate()
                .filter_map(|(i, us)| Some((i as f64, (us.as_ref()? / 1000.0).max(0.001))))
                .collect();
            (points.len() >= 2).then_some((row.target, points))
        })
        .collect();
    if curves.is_empty() {
        return Ok(None);
    }
    let values = curves
        .iter()
        .flat_map(|(_, points)| points.iter().map(|&(_, ms)| ms));
    // plotters labels a log axis from the first power of ten inside it:
    // start just below one (rounding must not push it above), so that the
    // lowest decade is labelled.
    let lowest = values.clone().fold(f64::INFINITY, f64::min);
    let low = 10f64.powf(lowest.log10().floor()) * 0.99;
    let high = values.fold(0.0, f64::max) * 1.5;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let caption = match run.rate_per_second {
            Some(rate) => format!("{}: latency at {rate:.0} req/s", run.id),
            None => format!("{}: latency, closed loop", run.id),
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.25f64..4.25f64, (low..high).log_scale())
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .x_labels(5)
            .x_label_formatter(&|x| {
                let nearest = x.round();
                if (x - nearest).abs() < 1e-6 && (0.0..=4.0).contains(&nearest) {
                    PERCENTILES[nearest as usize].to_owned()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| tick_label(*y))
            .x_desc("percentile (median over rounds)")
            .y_desc("latency, ms (log scale)")
            .label_style(("sans-serif", 14))
            // Minor lines of a log axis pile up into grey bands; ticks suffice.
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(draw_error)?;
        for (target, points) in &curves {
            let colour = colour(*target);
            let line = points.iter().copied();
            chart
                .draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))
                .map_err(draw_error)?
                .label(target.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
                });
            chart
                .draw_series(line.map(|point| Circle::new(point, 3, colour.filled())))
                .map_err(draw_error)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(Some(svg))
}

/// A y-axis value in ms without float noise: `0.2`, `1.5`, `10`.
fn tick_label(ms: f64) -> String {
    let text = format!("{ms:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn draw_error<E>(err: DrawingAreaErrorKind<E>) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    anyhow::Error::new(err).context("drawing the latency chart")
}
