//! One load run from start to report: check the target, open the
//! connections, start the clock, run a task per connection, merge.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::future::join_all;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument as _, info};

use super::driver::{Background, Context};
use super::http::{self, RequestTemplate};
use super::plan::Plan;
use super::process::{self, Watched};
use super::progress::{self, Counter};
use super::record::Recorder;
use super::report::{LoadReport, ScheduleSummary, TcpSummary};
use super::target::Target;
use super::{LoadConfig, LoadMode, Protocol, tcp};

/// Runs the load `config` describes against its target on the current
/// Tokio runtime (use a multi-thread one: connection tasks are spread over
/// its workers) and reports what the measured window saw.
///
/// Connections are opened before the clock starts; a connection that cannot
/// be opened then is retried by its first request, which counts a connect
/// error if it fails again.
///
/// # Errors
///
/// When the config is invalid, the target is not a loopback address
/// ([`TargetError`](super::TargetError)), a `--pid` process cannot be
/// read, or a connection task panics. Failed requests are not errors: they
/// are counted in the report.
pub async fn run(config: &LoadConfig) -> anyhow::Result<LoadReport> {
    config.validate()?;
    let target = Target::resolve(&config.target, config.protocol).await?;
    process::check(&config.pids).await?;
    let template = match config.protocol {
        Protocol::Tcp => None,
        _ => Some(Arc::new(RequestTemplate::new(config, &target)?)),
    };
    let connections = config.connections.get();
    info!(
        target = %config.target,
        addr = %target.addr,
        protocol = config.protocol.label(),
        connections,
        "load starting"
    );

    let background = Background::default();
    let _close_background = background.close_on_drop();
    // A context for the initial connects; the real one gets the plan once
    // they are done, so that connecting is not part of the schedule.
    let connect_ctx = Context {
        plan: Plan::new(
            Instant::now(),
            LoadMode::ClosedLoop,
            config.warmup,
            config.duration,
        ),
        addr: target.addr,
        timeout: config.timeout,
        tls: config.tls.clone(),
        background: background.clone(),
    };
    let initial = open_initial(&connect_ctx, config).await;

    let start = Instant::now();
    let ctx = Arc::new(Context {
        plan: Plan::new(start, config.mode, config.warmup, config.duration),
        ..connect_ctx
    });
    let counters: Vec<Arc<Counter>> = (0..connections).map(|_| Arc::default()).collect();
    let stop_progress = tokio_util::sync::CancellationToken::new();
    let mut helpers = JoinSet::new();
    if config.show_progress {
        helpers.spawn(progress::show(
            counters.clone(),
            start,
            config.warmup + config.duration,
            stop_progress.clone(),
        ));
    }

    let mut tasks = JoinSet::new();
    for (index, (counter, connection)) in counters.iter().zip(initial).enumerate() {
        let recorder = Recorder::new(Arc::clone(counter));
        let span = tracing::debug_span!("load_conn", index);
        let ctx = Arc::clone(&ctx);
        match connection {
            Initial::H1(sender) => spawn(
                &mut tasks,
                http::run_h1(
                    ctx,
                    template_of(template.as_ref()),
                    sender,
                    config.new_connection_per_request,
                    recorder,
                ),
                span,
            ),
            Initial::H2(sender) => spawn(
                &mut tasks,
                http::run_h2(
                    ctx,
                    template_of(template.as_ref()),
                    sender,
                    config.streams_per_connection.get(),
                    recorder,
                ),
                span,
            ),
            Initial::Tcp(stream) => spawn(
                &mut tasks,
                tcp::run_tcp(
                    ctx,
                    tcp_buffer(config.body_size_bytes),
                    stream,
                    config.new_connection_per_request,
                    recorder,
                ),
                span,
            ),
        }
    }

    let (collected, done) = tokio::sync::oneshot::channel();
    let collect = async {
        let mut total = Recorder::new(Arc::default());
        while let Some(joined) = tasks.join_next().await {
            total.merge(&joined.context("a load connection task failed")?);
        }
        let _ = collected.send(());
        anyhow::Ok(total)
    };
    let watch = process::watch(&config.pids, ctx.plan.measure_start, done);
    let (total, watched) = tokio::join!(collect, watch);
    stop_progress.cancel();
    while helpers.join_next().await.is_some() {}
    background.close().await;
    let total = total?;

    let report = report(config, &target, &total, ctx.plan.measure_start, watched);
    info!(
        completed = report.requests.completed,
        throughput = report.throughput_per_second,
        errors = report.errors.total(),
        "load finished"
    );
    Ok(report)
}

/// A connection opened before the clock starts (or `None` if that failed).
enum Initial {
    H1(Option<hyper::client::conn::http1::SendRequest<http::RequestBody>>),
    H2(Option<hyper::client::conn::http2::SendRequest<http::RequestBody>>),
    Tcp(Option<tokio::net::TcpStream>),
}

/// Opens every connection at once.
async fn open_initial(ctx: &Context, config: &LoadConfig) -> Vec<Initial> {
    let count = config.connections.get();
    match config.protocol {
        // Each request opens its own connection.
        Protocol::Http1 if config.new_connection_per_request => {
            (0..count).map(|_| Initial::H1(None)).collect()
        }
        Protocol::Http1 => join_all((0..count).map(|_| http::connect_h1(ctx)))
            .await
            .into_iter()
            .map(|opened| Initial::H1(opened.ok().map(|(sender, _)| sender)))
            .collect(),
        Protocol::Http2 | Protocol::Grpc => join_all((0..count).map(|_| http::connect_h2(ctx)))
            .await
            .into_iter()
            .map(|opened| Initial::H2(opened.ok()))
            .collect(),
        // Each request opens its own connection.
        Protocol::Tcp if config.new_connection_per_request => {
            (0..count).map(|_| Initial::Tcp(None)).collect()
        }
        Protocol::Tcp => join_all((0..count).map(|_| ctx.connect()))
            .await
            .into_iter()
            .map(|opened| Initial::Tcp(opened.ok()))
            .collect(),
    }
}

fn template_of(template: Option<&Arc<RequestTemplate>>) -> Arc<RequestTemplate> {
    Arc::clone(template.expect("HTTP protocols always prepare a request template"))
}

fn tcp_buffer(len: usize) -> Bytes {
    Bytes::from(vec![b'w'; len])
}

fn spawn<F>(tasks: &mut JoinSet<Recorder>, task: F, span: tracing::Span)
where
    F: Future<Output = Recorder> + Send + 'static,
{
    tasks.spawn(task.instrument(span));
}

fn report(
    config: &LoadConfig,
    target: &Target,
    total: &Recorder,
    measure_start: Instant,
    watched: Watched,
) -> LoadReport {
    let seconds = config.duration.as_secs_f64();
    let completed = total.requests.completed;
    // A generator that fell behind completes measured requests after the
    // window: rates are over the time they really took.
    let elapsed = seconds.max(total.last_completion.map_or(0.0, |last| {
        last.saturating_duration_since(measure_start).as_secs_f64()
    }));
    let (rate_per_second, schedule) = match config.mode {
        LoadMode::OpenLoop { rate_per_second } => (
            Some(rate_per_second),
            Some(ScheduleSummary {
                max_lag_us: micros(total.max_lag),
                max_idle_lag_us: micros(total.max_idle_lag),
                late_sends: total.late_sends,
            }),
        ),
        LoadMode::ClosedLoop => (None, None),
    };
    let tcp = (config.protocol == Protocol::Tcp).then(|| TcpSummary {
        bytes_sent: total.bytes_sent,
        bytes_received: total.bytes_received,
        sent_mb_per_second: total.bytes_sent as f64 / 1e6 / elapsed,
        received_mb_per_second: total.bytes_received as f64 / 1e6 / elapsed,
        connections_opened: total.connections_opened,
        connections_per_second: total.connections_opened as f64 / elapsed,
    });
    let process = watched.process.map(|mut usage| {
        usage.cpu_us_per_request =
            (completed > 0).then(|| usage.cpu_seconds * 1e6 / completed as f64);
        usage
    });
    LoadReport {
        target: config.target.to_string(),
        address: target.addr.to_string(),
        protocol: config.protocol,
        mode: config.mode.into(),
        rate_per_second,
        connections: config.connections.get(),
        streams_per_connection: matches!(config.protocol, Protocol::Http2 | Protocol::Grpc)
            .then_some(config.streams_per_connection.get()),
        body_size_bytes: config.body_size_bytes,
        duration_seconds: seconds,
        warmup_seconds: config.warmup.as_secs_f64(),
        requests: total.requests,
        throughput_per_second: completed as f64 / elapsed,
        errors: total.errors,
        latency: total.latency(),
        service_time: total.service_time(),
        schedule,
        tcp,
        process,
        generator_cpu_seconds: watched.generator_cpu_seconds,
        http_connections_opened: (config.protocol == Protocol::Http1
            && config.new_connection_per_request)
            .then_some(total.connections_opened),
        tls_resumed_connections: (config.tls.is_some() && config.new_connection_per_request)
            .then_some(total.tls_resumed),
    }
}

fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
