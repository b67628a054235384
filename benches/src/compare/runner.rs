//! One comparison from start to report: the echo, the targets, the memory
//! scenarios on fresh processes, then the load runs interleaved across the
//! targets, round after round.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use http::Uri;
use tracing::{debug, info, warn};

use super::config::{CompareConfig, Scenario, TargetKind};
use super::driver::{self, Driver, ExternalDrivers, ToolRun};
use super::handshake::{self, ClientMaterial, HandshakeCerts, HandshakeKind};
use super::idle;
use super::proxies::Programs;
use super::proxies::{
    Endpoints, Limits, ProxyProcess, SidecarHop, StartContext, Upstream, WEFT_NOT_BUILT,
};
use super::report::{
    CompareReport, IdleSummary, LoadRow, LoadRun, MemoryRow, RowSummary, RunKind, Settings,
    TargetStatus, median, median_u64,
};
use super::system::{self, SHORT_COMMAND_TIMEOUT};
use crate::echo::{EchoOptions, EchoServer, TcpEchoServer};
use crate::load::{self, LoadConfig, LoadMode, Protocol};

/// Streams per h2 connection kept in flight in the h2 and gRPC runs.
const H2_STREAMS: usize = 4;

/// Connections of the TCP run.
const TCP_CONNECTIONS: usize = 4;

/// Bytes echoed per TCP round trip.
const TCP_BUFFER_BYTES: usize = 64 * 1024;

/// The `body64k` request body.
const BODY_BYTES: usize = 64 * 1024;

/// The gRPC payload.
const GRPC_PAYLOAD_BYTES: usize = 128;

/// File descriptors kept spare beyond the idle connections.
const SPARE_FILES: u64 = 2048;

/// The fixed rate keeps the best peer's proxy core this busy: rate =
/// `TARGET_BUSY` / its CPU seconds per request in the closed loop.
const TARGET_BUSY: f64 = 0.6;

/// Without any proxy CPU figure, the fixed rate is this fraction of
/// direct's closed-loop throughput.
const RATE_FRACTION: f64 = 0.5;

/// How long the echo may take to drain at the end.
const ECHO_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A one-minute load average above this before the run means other work
/// shares the machine.
const BUSY_LOAD_AVERAGE: f64 = 1.0;

/// Runs the comparison `config` describes on the current (multi-thread)
/// Tokio runtime and reports it. The echo upstream and the load generator
/// run in this process; proxies are child processes placed per
/// [`CompareConfig::placement`].
///
/// # Errors
///
/// When the configuration is invalid, the work directory cannot be created
/// or the echo cannot bind. Targets that cannot start and runs that fail are
/// recorded in the report instead.
pub async fn run(config: &CompareConfig) -> anyhow::Result<CompareReport> {
    config.validate()?;
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("creating {}", config.work_dir.display()))?;
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let scenarios = config.scenarios_in_order();
    let targets = config.targets_in_order();
    let mut notes = Vec::new();
    let load_at_start = system::load_average();
    if let Some(busy) = load_at_start.as_deref().filter(|load| {
        load.split_whitespace()
            .next()
            .and_then(|one_minute| one_minute.parse::<f64>().ok())
            .is_some_and(|one_minute| one_minute > BUSY_LOAD_AVERAGE)
    }) {
        warn!(
            load_average = busy,
            "the machine is busy; figures will be noisy"
        );
        println!("warning: the machine is busy (load average {busy}); figures will be noisy");
    }

    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let echo = EchoServer::bind(EchoOptions::new(loopback).with_name("echo"))
        .await
        .context("starting the echo upstream")?;
    let tcp_echo = TcpEchoServer::bind(loopback)
        .await
        .context("starting the TCP echo upstream")?;
    let upstream = Upstream {
        http: echo.local_addr(),
        tcp: tcp_echo.local_addr(),
    };

    let programs = if targets.iter().any(|target| target.is_reference()) {
        Programs::discover(&config.tools).await
    } else {
        Programs {
            nginx: Err("not requested".to_owned()),
            haproxy: Err("not requested".to_owned()),
            nginx_stream: Err("not requested".to_owned()),
        }
    };
    let drivers = if config.external_drivers {
        ExternalDrivers::discover(&config.tools)
    } else {
        ExternalDrivers::disabled("the built-in generator was asked for (--builtin-driver)")
    };
    let idle_connections = if scenarios.contains(&Scenario::Idle) {
        ensure_open_files(config.idle_connections, &config.tools, &mut notes).await
    } else {
        0
    };
    let statuses: Vec<TargetStatus> = targets
        .iter()
        .map(|&target| target_status(target, config, &programs, &scenarios))
        .collect();
    for status in &statuses {
        if let Some(reason) = &status.skip_reason {
            warn!(target = status.target.name(), reason, "target skipped");
            println!("skipping {}: {reason}", status.target.name());
        }
    }
    let versions = versions(config, &programs, &drivers).await;

    // The handshake scenarios' certificates, and the generator's client
    // material; without them those runs are skipped with the reason.
    let handshake_certs = if scenarios.iter().any(|s| s.is_handshake()) {
        let dir = config.work_dir.join("handshake-certs");
        Some(
            HandshakeCerts::create(&dir)
                .and_then(|certs| Ok((ClientMaterial::load(&certs)?, certs)))
                .map_err(|err| format!("making the handshake certificates failed: {err:#}")),
        )
    } else {
        None
    };
    if let Some(Err(reason)) = &handshake_certs {
        warn!(reason, "handshake scenarios skipped");
    }
    let (client_material, certs) = match &handshake_certs {
        Some(Ok((material, certs))) => (Some(material), Some(certs)),
        _ => (None, None),
    };

    let h2_connections = (config.connections.get() / H2_STREAMS).max(1);
    let mut report = CompareReport {
        started_at,
        command: None,
        machine: system::machine(),
        versions,
        placement: config.placement.clone(),
        settings: Settings {
            scenarios: scenarios.clone(),
            duration_seconds: config.duration.as_secs_f64(),
            warmup_seconds: config.warmup.as_secs_f64(),
            rounds: config.rounds.get(),
            connections: config.connections.get(),
            h2_connections,
            h2_streams: H2_STREAMS,
            idle_connections,
            rate_per_second: config.rate,
            settle_seconds: config.settle.as_secs_f64(),
            idle_pause_seconds: config.idle_pause.as_secs_f64(),
        },
        targets: statuses,
        memory: Vec::new(),
        runs: Vec::new(),
        weft_full_not_built: WEFT_NOT_BUILT.iter().map(|&f| f.to_owned()).collect(),
        goals: Vec::new(),
        notes,
    };

    let ctx = StartContext {
        placement: &config.placement,
        weft_bin: &config.weft_bin,
        programs: &programs,
        upstream,
        work_dir: &config.work_dir,
        limits: Limits {
            connections: 4 * config.connections.get() + 64,
            open_files: open_files(),
        },
        handshake: certs,
    };
    // Memory is measured as configured for the other load runs, without
    // the handshake scenarios' TLS listeners.
    let memory_ctx = StartContext {
        handshake: None,
        ..ctx
    };
    // The `idle` scenario's processes must hold its connections too.
    let idle_ctx = StartContext {
        limits: Limits {
            connections: ctx.limits.connections + idle_connections,
            ..ctx.limits
        },
        ..memory_ctx
    };

    let memory_scenarios: Vec<Scenario> = scenarios
        .iter()
        .copied()
        .filter(|s| s.is_memory())
        .collect();
    if !memory_scenarios.is_empty() {
        report.memory = memory(
            config,
            (&memory_ctx, &idle_ctx),
            &report.targets,
            &memory_scenarios,
            idle_connections,
        )
        .await;
    }

    let load_scenarios: Vec<Scenario> = scenarios
        .iter()
        .copied()
        .filter(|s| !s.is_memory())
        .collect();
    if !load_scenarios.is_empty() {
        let mut running = start_all(&ctx, upstream, &mut report.targets).await;
        for scenario in load_scenarios {
            for spec in specs(scenario, config, h2_connections) {
                let spec = match spec {
                    Spec::Run(spec) => spec,
                    Spec::FixedRate => match fixed_rate(config, &report) {
                        Ok((rate, basis)) => {
                            info!(rate, basis, "fixed rate chosen");
                            println!("http1-rate: {rate:.0} req/s ({basis})");
                            report.settings.rate_per_second = Some(rate);
                            let mut spec = http1_rate(config, rate);
                            spec.rate_basis = Some(basis);
                            spec
                        }
                        Err(reason) => {
                            report.runs.push(skipped_run(
                                "http1-rate",
                                "HTTP/1.1 keep-alive GET at a fixed rate",
                                scenario,
                                RunKind::FixedRate,
                                reason,
                            ));
                            continue;
                        }
                    },
                };
                if let (Some(_), Some(Err(reason))) = (spec.handshake, &handshake_certs) {
                    report.runs.push(skipped_run(
                        &spec.id,
                        &spec.title,
                        scenario,
                        spec.kind,
                        reason.clone(),
                    ));
                    continue;
                }
                let (driver, fallback) = choose_driver(&spec, &drivers);
                if let Some(reason) = fallback {
                    let note = format!(
                        "{}: {reason}; driven by weft-bench's built-in generator instead",
                        spec.id
                    );
                    warn!(run = spec.id, reason, "external driver unavailable");
                    println!("{note}");
                    report.notes.push(note);
                }
                if let Some(note) = whole_seconds_note(&spec.id, driver.driver(), config) {
                    println!("{note}");
                    report.notes.push(note);
                }
                let run = execute(
                    &spec,
                    driver,
                    config,
                    (&mut running, &report.targets),
                    client_material,
                )
                .await;
                report.runs.push(run);
            }
        }
        drop(running);
    }

    // Bounded: a drain that does not finish is cut short by the drop.
    let drain = async {
        echo.shutdown().await;
        tcp_echo.shutdown().await;
    };
    if tokio::time::timeout(ECHO_DRAIN_TIMEOUT, drain)
        .await
        .is_err()
    {
        warn!(timeout = ?ECHO_DRAIN_TIMEOUT, "echo drain timed out");
    }
    if let (Some(start), Some(end)) = (load_at_start, system::load_average()) {
        report.notes.push(format!(
            "load average (1, 5, 15 min) before the run: {start}; after it: {end}. The run \
             itself keeps about two cores busy; a higher figure before it means other work \
             shared the machine"
        ));
    }
    report.evaluate_goals();
    Ok(report)
}

/// Whether `target` can run, and how it is configured.
fn target_status(
    target: TargetKind,
    config: &CompareConfig,
    programs: &Programs,
    scenarios: &[Scenario],
) -> TargetStatus {
    let missing_weft = || {
        (!config.weft_bin.exists()).then(|| {
            format!(
                "{} not found: build it with `cargo build --release -p weft-proxy` or pass --weft-bin",
                config.weft_bin.display()
            )
        })
    };
    let (skip_reason, description) = match target {
        TargetKind::Direct => (None, "the echo upstream, no proxy".to_owned()),
        TargetKind::Weft => (
            missing_weft(),
            "weft-proxy --concurrency 1: one HTTP listener, one route, one cluster \
             (`protocol: downstream`), plus a TCP listener"
                .to_owned(),
        ),
        TargetKind::WeftFull => (
            missing_weft(),
            "weft-proxy --concurrency 1 with 3 virtual hosts, the matching route 5th after \
             header, regex, exact and rewrite routes, request and response header rules, a 5 s \
             route timeout, a retry policy (2 retries of gateway errors, 2 s per try, the \
             default budget), the default circuit breakers, outlier detection, active HTTP \
             health checks, idle fault injection, rate limits never reached, a Rego policy \
             (methods allowed by the route), tracing (trace context on every request, 1 % \
             of traces exported over OTLP/gRPC to a receiver in the bench process), Istio's standard metrics, `via`, \
             header limits, a JSON access log to a file, the admin server (metrics); its \
             clients speak \
             cleartext, so TLS and mTLS are measured in weft-s2s-mtls"
                .to_owned(),
        ),
        TargetKind::WeftSidecars | TargetKind::WeftSidecarsMtls => {
            let placement = match &config.placement.proxy_cpus {
                Some(cpus) => format!("both pinned to CPU {cpus} (`taskset -c {cpus}`)"),
                None => "both unpinned, like the other proxies of this run".to_owned(),
            };
            (
                missing_weft(),
                format!(
                    "two weft-proxy processes, each --concurrency 1, {placement}: the client \
                     sidecar (outbound listener, one route, one cluster (`protocol: \
                     downstream`) to the server sidecar) and the server sidecar (inbound \
                     listener, one route, one cluster (`protocol: downstream`) to the echo), \
                     plus TCP listeners chained the same way; the hop between them is {}. Proxy \
                     CPU and RSS are the two processes' sums",
                    SidecarHop::describe(target)
                ),
            )
        }
        TargetKind::Nginx => (
            programs.nginx.as_ref().err().cloned(),
            "nginx, worker_processes 1, upstream keepalive 64, proxy_buffering and \
             proxy_request_buffering off, access_log off"
                .to_owned(),
        ),
        TargetKind::Haproxy => (
            programs.haproxy.as_ref().err().cloned(),
            "HAProxy, nbthread 1, http-reuse always, no logging".to_owned(),
        ),
    };
    let description = match handshake_listeners(target) {
        Some(listeners) if scenarios.iter().any(|s| s.is_handshake()) => {
            format!(
                "{description}; for the handshake runs, two more HTTP/1.1 listeners proxying to \
                 the echo like the cleartext one, TLS 1.3 only with the same ECDSA P-256 \
                 certificate and key files (mesh CA from weft_cp::ca): {listeners}"
            )
        }
        _ => description,
    };
    TargetStatus {
        target,
        skip_reason,
        description,
    }
}

/// How `target` terminates TLS in the handshake runs (`None`: it does not).
fn handshake_listeners(target: TargetKind) -> Option<&'static str> {
    match target {
        TargetKind::Weft => Some(
            "`tls` (server-only; rustls's default stateful session cache of 256 sessions, 2 \
             TLS 1.3 tickets per connection) and `mtls` (`client_ca_file`, client certificate \
             required, `allowed_identities` the client's SPIFFE ID; no resumption, by design)",
        ),
        TargetKind::Nginx => Some(
            "server-only (`ssl_session_tickets on`, `ssl_session_cache shared:10m`) and \
             mutual (`ssl_verify_client on`, `ssl_client_certificate` the mesh CA, tickets and \
             session cache off and `ssl_conf_command NumTickets 0`, as weft allows no \
             resumption with client certificates and sends no ticket)",
        ),
        TargetKind::Haproxy => Some(
            "`bind ... ssl crt` server-only (tickets and session cache on, the defaults) and \
             mutual (`ca-file` the mesh CA, `verify required`, `no-tls-tickets`; HAProxy 2.6 \
             still sends TLS 1.3 session-cache tickets there)",
        ),
        TargetKind::Direct
        | TargetKind::WeftFull
        | TargetKind::WeftSidecars
        | TargetKind::WeftSidecarsMtls => None,
    }
}

/// Versions of the programs involved.
async fn versions(
    config: &CompareConfig,
    programs: &Programs,
    drivers: &ExternalDrivers,
) -> BTreeMap<String, String> {
    let mut versions = BTreeMap::new();
    versions.insert(
        "weft-bench".to_owned(),
        format!("weft-bench {}", env!("CARGO_PKG_VERSION")),
    );
    if config.weft_bin.exists()
        && let Some(line) = system::version_line(&config.weft_bin, "--version").await
    {
        versions.insert("weft-proxy".to_owned(), line);
    }
    if let Ok(nginx) = &programs.nginx
        && let Some(line) = system::version_line(nginx, "-v").await
    {
        versions.insert("nginx".to_owned(), line);
    }
    if let Ok(haproxy) = &programs.haproxy
        && let Some(line) = system::version_line(haproxy, "-v").await
    {
        versions.insert("haproxy".to_owned(), line);
    }
    // wrk has no version flag: `-v` prints its version and usage, and exits 1.
    if let Ok(wrk) = &drivers.wrk
        && let Some(line) = system::version_line(wrk, "-v").await
    {
        let version = line.split(" Copyright").next().unwrap_or(&line).to_owned();
        versions.insert("wrk".to_owned(), version);
    }
    if let Ok(h2load) = &drivers.h2load
        && let Some(line) = system::version_line(h2load, "--version").await
    {
        versions.insert("h2load".to_owned(), line);
    }
    versions
}

/// Makes room for `wanted` idle connections in this process and, by
/// inheritance, the proxies it starts: two descriptors per connection
/// (HAProxy reserves a client and a server side for each) plus spares.
/// Raises `RLIMIT_NOFILE` with `prlimit` when needed, or returns a smaller
/// count (with a note) when it cannot.
async fn ensure_open_files(wanted: usize, tools: &super::Tools, notes: &mut Vec<String>) -> usize {
    let needed = 2 * wanted as u64 + SPARE_FILES;
    let Some((soft, hard)) = system::open_files_limit() else {
        return wanted;
    };
    if soft.is_none_or(|soft| soft >= needed) {
        return wanted;
    }
    let new_hard = match hard {
        Some(hard) if hard < needed && system::is_root() => needed,
        Some(hard) => hard,
        None => needed,
    };
    if let Some(prlimit) = system::find_program("prlimit", tools.search_path.as_deref()) {
        let pid = std::process::id().to_string();
        // Raising the hard limit needs CAP_SYS_RESOURCE, even for root; if
        // that fails, raise the soft limit as far as the hard one allows.
        for (new_soft, new_hard) in [
            (needed.min(new_hard), new_hard),
            (needed.min(hard.unwrap_or(needed)), hard.unwrap_or(needed)),
        ] {
            let limit = format!("--nofile={new_soft}:{new_hard}");
            match system::run_command(
                &prlimit,
                ["--pid", pid.as_str(), limit.as_str()],
                SHORT_COMMAND_TIMEOUT,
            )
            .await
            {
                Ok((status, _, _)) if status.success() => break,
                Ok((status, _, stderr)) => {
                    debug!(%status, stderr = stderr.trim(), limit, "prlimit failed");
                }
                Err(err) => debug!(error = %format!("{err:#}"), limit, "prlimit failed"),
            }
        }
    }
    let soft = open_files();
    if soft >= needed {
        notes.push(format!(
            "raised the open-files limit to {soft} (prlimit) for {wanted} idle connections"
        ));
        return wanted;
    }
    let reduced = usize::try_from(soft.saturating_sub(SPARE_FILES) / 2).unwrap_or(0);
    let note = format!(
        "idle connections reduced from {wanted} to {reduced}: the open-files limit is {soft} \
         and could not be raised (HAProxy reserves two descriptors per connection)"
    );
    warn!(wanted, reduced, "idle connections reduced");
    println!("{note}");
    notes.push(note);
    reduced
}

/// The current soft limit on open files (a large number when unlimited).
fn open_files() -> u64 {
    system::open_files_limit()
        .and_then(|(soft, _)| soft)
        .unwrap_or(1 << 20)
}

/// A target started for the load runs.
#[derive(Debug)]
struct Running {
    target: TargetKind,
    endpoints: Endpoints,
    /// The processes accounted (none for direct; both sidecars for
    /// weft-s2s).
    pids: Vec<u32>,
    proxy: Option<ProxyProcess>,
}

/// Starts every available target once for all load runs. A proxy that
/// cannot start is marked skipped in `statuses`.
async fn start_all(
    ctx: &StartContext<'_>,
    upstream: Upstream,
    statuses: &mut [TargetStatus],
) -> Vec<Running> {
    let mut running = Vec::new();
    for status in statuses.iter_mut().filter(|s| s.skip_reason.is_none()) {
        if status.target == TargetKind::Direct {
            running.push(Running {
                target: TargetKind::Direct,
                endpoints: Endpoints::direct(upstream),
                pids: Vec::new(),
                proxy: None,
            });
            continue;
        }
        match ProxyProcess::start(status.target, ctx, 0).await {
            Ok(proxy) => running.push(Running {
                target: status.target,
                endpoints: proxy.endpoints.clone(),
                pids: proxy.accounted_pids(),
                proxy: Some(proxy),
            }),
            Err(err) => {
                let reason = format!("failed to start: {err:#}");
                warn!(target = status.target.name(), reason, "target skipped");
                println!("skipping {}: {reason}", status.target.name());
                status.skip_reason = Some(reason);
            }
        }
    }
    running
}

/// What one load run sends.
#[derive(Debug)]
struct RunSpec {
    id: String,
    scenario: Scenario,
    kind: RunKind,
    title: String,
    protocol: Protocol,
    mode: LoadMode,
    connections: usize,
    streams: usize,
    body_size_bytes: usize,
    is_new_connection_per_request: bool,
    /// The handshake runs: TLS on every (new) connection.
    handshake: Option<HandshakeKind>,
    /// How the open-loop rate was chosen.
    rate_basis: Option<String>,
}

/// A scenario's runs, in order.
#[derive(Debug)]
enum Spec {
    Run(RunSpec),
    /// The `http1` fixed-rate run, whose rate depends on the closed-loop one.
    FixedRate,
}

fn specs(scenario: Scenario, config: &CompareConfig, h2_connections: usize) -> Vec<Spec> {
    let connections = config.connections.get();
    let closed = |id: &str, title: String, protocol, connections, streams, body_size_bytes| {
        Spec::Run(RunSpec {
            id: id.to_owned(),
            scenario,
            kind: RunKind::Max,
            title,
            protocol,
            mode: LoadMode::ClosedLoop,
            connections,
            streams,
            body_size_bytes,
            is_new_connection_per_request: false,
            handshake: None,
            rate_basis: None,
        })
    };
    match scenario {
        Scenario::Http1 => vec![
            closed(
                "http1-max",
                format!("HTTP/1.1 keep-alive GET, no body, closed loop, {connections} connections"),
                Protocol::Http1,
                connections,
                1,
                0,
            ),
            Spec::FixedRate,
        ],
        Scenario::H2 => vec![closed(
            "h2-max",
            format!(
                "h2c GET, no body, closed loop, {h2_connections} connections x {H2_STREAMS} streams"
            ),
            Protocol::Http2,
            h2_connections,
            H2_STREAMS,
            0,
        )],
        Scenario::Grpc => vec![closed(
            "grpc-max",
            format!(
                "gRPC unary ({GRPC_PAYLOAD_BYTES} B payload) over h2c, closed loop, \
                 {h2_connections} connections x {H2_STREAMS} streams"
            ),
            Protocol::Grpc,
            h2_connections,
            H2_STREAMS,
            GRPC_PAYLOAD_BYTES,
        )],
        Scenario::Body64k => vec![closed(
            "body64k-max",
            format!(
                "HTTP/1.1 keep-alive POST of 64 KiB, echoed, closed loop, {connections} connections"
            ),
            Protocol::Http1,
            connections,
            1,
            BODY_BYTES,
        )],
        Scenario::Tcp => vec![closed(
            "tcp-max",
            format!(
                "TCP, 64 KiB written and echoed per round trip, closed loop, {TCP_CONNECTIONS} connections"
            ),
            Protocol::Tcp,
            TCP_CONNECTIONS,
            1,
            TCP_BUFFER_BYTES,
        )],
        Scenario::Newconn => vec![Spec::Run(RunSpec {
            id: "newconn-max".to_owned(),
            scenario,
            kind: RunKind::Max,
            title: format!(
                "HTTP/1.1 GET, no body, a new connection per request, closed loop, \
                 {connections} connections at a time"
            ),
            protocol: Protocol::Http1,
            mode: LoadMode::ClosedLoop,
            connections,
            streams: 1,
            body_size_bytes: 0,
            is_new_connection_per_request: true,
            handshake: None,
            rate_basis: None,
        })],
        Scenario::Handshake | Scenario::HandshakeResume => handshake::kinds(scenario)
            .iter()
            .map(|&kind| {
                Spec::Run(RunSpec {
                    id: kind.run_id().to_owned(),
                    scenario,
                    kind: RunKind::Max,
                    title: format!(
                        "{}: a new connection per HTTP/1.1 GET (no body), closed loop, \
                         {connections} connections at a time",
                        kind.describe()
                    ),
                    protocol: Protocol::Http1,
                    mode: LoadMode::ClosedLoop,
                    connections,
                    streams: 1,
                    body_size_bytes: 0,
                    is_new_connection_per_request: true,
                    handshake: Some(kind),
                    rate_basis: None,
                })
            })
            .collect(),
        Scenario::Idle | Scenario::IdleRss => Vec::new(),
    }
}

fn http1_rate(config: &CompareConfig, rate: f64) -> RunSpec {
    let connections = config.connections.get();
    RunSpec {
        id: "http1-rate".to_owned(),
        scenario: Scenario::Http1,
        kind: RunKind::FixedRate,
        title: format!(
            "HTTP/1.1 keep-alive GET, open loop at {rate:.0} req/s, {connections} connections \
             (latency corrected for coordinated omission)"
        ),
        protocol: Protocol::Http1,
        mode: LoadMode::OpenLoop {
            rate_per_second: rate,
        },
        connections,
        streams: 1,
        body_size_bytes: 0,
        is_new_connection_per_request: false,
        handshake: None,
        rate_basis: None,
    }
}

/// The fixed rate and how it was chosen: `--rate`; else the rate that
/// keeps the best peer's (nginx's or HAProxy's) proxy core
/// [`TARGET_BUSY`] busy, from its CPU per request in the closed-loop
/// HTTP/1.1 run; else the same from the cheapest proxy measured; else half
/// direct's closed-loop throughput.
pub(super) fn fixed_rate(
    config: &CompareConfig,
    report: &CompareReport,
) -> Result<(f64, String), String> {
    if let Some(rate) = config.rate {
        return Ok((rate, "given with --rate".to_owned()));
    }
    let Some(max) = report.run("http1-max") else {
        return Err("no closed-loop HTTP/1.1 run to derive a rate from; pass --rate".to_owned());
    };
    let driver = |target: TargetKind| {
        max.rows
            .iter()
            .find(|row| row.target == target)
            .map_or("?", |row| row.driver.name())
    };
    let busy_percent = TARGET_BUSY * 100.0;
    let peer = max
        .best_reference(|s| s.cpu_us_per_request, true)
        .filter(|&(_, cpu)| cpu > 0.0);
    let cheapest_proxy = || {
        max.rows
            .iter()
            .filter(|row| row.target != TargetKind::Direct && !row.target.is_proxy_chain())
            .filter_map(|row| Some((row.target, row.median?.cpu_us_per_request?)))
            .filter(|&(_, cpu)| cpu > 0.0)
            .reduce(|best, candidate| {
                if candidate.1 < best.1 {
                    candidate
                } else {
                    best
                }
            })
    };
    let from_cpu = |(target, cpu_us): (TargetKind, f64), whose: &str| {
        let rate = (TARGET_BUSY / (cpu_us / 1e6)).round().max(1.0);
        let mut basis = format!(
            "{TARGET_BUSY} / {whose} proxy CPU per request in http1-max ({} {cpu_us:.1} µs, \
             driven by {}), so that its core is about {busy_percent:.0} % busy",
            target.name(),
            driver(target),
        );
        // A rate above what the target served in the closed loop cannot
        // be what keeps its core 60 % busy: the core was shared or the
        // generator ran short there.
        let served = max
            .summary(target)
            .map(|s| s.throughput_per_second)
            .filter(|&t| t > 0.0 && t < rate);
        match served {
            Some(served) => {
                let _ = write!(
                    basis,
                    "; capped at the {served:.0} req/s {} served in the closed loop, below the \
                     {rate:.0} req/s that figure gives (its core was not saturated there)",
                    target.name()
                );
                (served.round().max(1.0), basis)
            }
            None => (rate, basis),
        }
    };
    if let Some(peer) = peer {
        return Ok(from_cpu(peer, "the best peer's (nginx/HAProxy)"));
    }
    if let Some(proxy) = cheapest_proxy() {
        return Ok(from_cpu(
            proxy,
            "the lowest (no nginx or HAProxy was measured)",
        ));
    }
    max.summary(TargetKind::Direct)
        .map(|s| s.throughput_per_second)
        .filter(|&t| t > 0.0)
        .map(|direct| {
            (
                (direct * RATE_FRACTION).round().max(1.0),
                format!(
                    "no proxy CPU was measured: {RATE_FRACTION} x direct's closed-loop \
                     throughput ({direct:.0} req/s, driven by {})",
                    driver(TargetKind::Direct)
                ),
            )
        })
        .ok_or_else(|| "no target completed a closed-loop HTTP/1.1 request; pass --rate".to_owned())
}

/// The driver of `spec`'s rounds: wrk for `http1-max`, h2load for
/// `h2-max` when installed (else the built-in generator, and why), the
/// built-in generator for every other run.
fn choose_driver<'a>(
    spec: &RunSpec,
    drivers: &'a ExternalDrivers,
) -> (DriverChoice<'a>, Option<String>) {
    let external = match spec.id.as_str() {
        "http1-max" => Some((Driver::Wrk, &drivers.wrk)),
        "h2-max" => Some((Driver::H2load, &drivers.h2load)),
        _ => None,
    };
    match external {
        Some((driver, Ok(program))) => (DriverChoice::External { driver, program }, None),
        Some((_, Err(reason))) => (DriverChoice::BuiltIn, Some(reason.clone())),
        None => (DriverChoice::BuiltIn, None),
    }
}

/// wrk takes whole seconds: what the runs it drives last when the
/// configured duration or warm-up has a fraction.
pub(super) fn whole_seconds_note(
    id: &str,
    driver: Driver,
    config: &CompareConfig,
) -> Option<String> {
    let fractional = |d: std::time::Duration| d.subsec_nanos() != 0;
    if driver != Driver::Wrk || (!fractional(config.duration) && !fractional(config.warmup)) {
        return None;
    }
    let warmup = if config.warmup.is_zero() {
        "no warm-up".to_owned()
    } else {
        format!("a {} s warm-up run", driver::wrk_seconds(config.warmup))
    };
    Some(format!(
        "{id}: wrk counts whole seconds, so its runs last {} s after {warmup}",
        driver::wrk_seconds(config.duration)
    ))
}

/// Who drives a run.
#[derive(Clone, Copy, Debug)]
enum DriverChoice<'a> {
    BuiltIn,
    External {
        driver: Driver,
        program: &'a std::path::Path,
    },
}

impl DriverChoice<'_> {
    fn driver(self) -> Driver {
        match self {
            Self::BuiltIn => Driver::WeftBench,
            Self::External { driver, .. } => driver,
        }
    }
}

fn skipped_run(
    id: &str,
    title: &str,
    scenario: Scenario,
    kind: RunKind,
    reason: String,
) -> LoadRun {
    warn!(scenario = scenario.name(), reason, "run skipped");
    println!("skipping {id}: {reason}");
    LoadRun {
        id: id.to_owned(),
        scenario,
        kind,
        title: title.to_owned(),
        rate_per_second: None,
        rate_basis: None,
        skip_reason: Some(reason),
        rows: Vec::new(),
    }
}

/// Runs `spec` against every target, interleaved, for every round. The
/// handshake runs build a fresh TLS client from `tls` for each round.
async fn execute(
    spec: &RunSpec,
    driver: DriverChoice<'_>,
    config: &CompareConfig,
    (running, statuses): (&mut [Running], &[TargetStatus]),
    tls: Option<&ClientMaterial>,
) -> LoadRun {
    let mut rows: Vec<LoadRow> = statuses
        .iter()
        .map(|status| {
            let endpoint_skip = running
                .iter()
                .find(|r| r.target == status.target)
                .and_then(|r| endpoint(spec, &r.endpoints).err());
            LoadRow {
                target: status.target,
                driver: driver.driver(),
                skip_reason: status.skip_reason.clone().or(endpoint_skip),
                rounds: Vec::new(),
                tool_rounds: Vec::new(),
                failures: Vec::new(),
                median: None,
            }
        })
        .collect();
    for row in rows.iter().filter(|row| row.skip_reason.is_some()) {
        let reason = row.skip_reason.as_deref().unwrap_or_default();
        if statuses
            .iter()
            .any(|s| s.target == row.target && s.skip_reason.is_none())
        {
            println!("skipping {} for {}: {reason}", row.target.name(), spec.id);
        }
    }
    for round in 1..=config.rounds.get() {
        for row in rows.iter_mut().filter(|row| row.skip_reason.is_none()) {
            let Some(target) = running.iter_mut().find(|r| r.target == row.target) else {
                continue;
            };
            if let Some(proxy) = target.proxy.as_mut()
                && !proxy.is_running()
            {
                row.failures.push(format!(
                    "round {round}: the proxy is no longer running; its log:\n{}",
                    proxy.log_tail()
                ));
                continue;
            }
            let Ok(addr) = endpoint(spec, &target.endpoints) else {
                continue;
            };
            if let DriverChoice::External { driver, program } = driver {
                let tool_run = ToolRun {
                    driver,
                    program,
                    url: format!("http://{addr}/"),
                    connections: spec.connections,
                    streams: spec.streams,
                    warmup: config.warmup,
                    duration: config.duration,
                    pids: &target.pids,
                };
                match driver::run_tool(&tool_run, &config.placement).await {
                    Ok(round_report) => {
                        info!(
                            run = spec.id,
                            target = row.target.name(),
                            round,
                            driver = driver.name(),
                            throughput = format!("{:.0}", round_report.output.requests_per_second),
                            cpu_us_per_request = ?round_report.process.as_ref().and_then(|p| p.cpu_us_per_request),
                            errors = round_report.output.errors.total(),
                            "run finished"
                        );
                        row.tool_rounds.push(round_report);
                    }
                    Err(err) => {
                        warn!(run = spec.id, target = row.target.name(), round, error = %format!("{err:#}"), "run failed");
                        row.failures.push(format!("round {round}: {err:#}"));
                    }
                }
                continue;
            }
            let mut load_config = load_config(spec, config, addr, &target.pids);
            if let Some(kind) = spec.handshake {
                match tls.map(|material| material.client(kind)) {
                    Some(Ok(client)) => load_config.tls = Some(client),
                    Some(Err(err)) => {
                        row.failures.push(format!("round {round}: {err:#}"));
                        continue;
                    }
                    None => {
                        row.failures
                            .push(format!("round {round}: no TLS client material"));
                        continue;
                    }
                }
            }
            match load::run(&load_config).await {
                Ok(report) => {
                    info!(
                        run = spec.id,
                        target = row.target.name(),
                        round,
                        throughput = format!("{:.0}", report.throughput_per_second),
                        p99_us = report.latency.p99_us,
                        cpu_us_per_request = ?report.process.as_ref().and_then(|p| p.cpu_us_per_request),
                        errors = report.errors.total(),
                        "run finished"
                    );
                    row.rounds.push(report);
                }
                Err(err) => {
                    warn!(run = spec.id, target = row.target.name(), round, error = %format!("{err:#}"), "run failed");
                    row.failures.push(format!("round {round}: {err:#}"));
                }
            }
        }
    }
    let load_cpus = config.placement.load_cpu_count();
    for row in &mut rows {
        row.median = RowSummary::of_row(row, load_cpus, spec.kind);
    }
    LoadRun {
        id: spec.id.clone(),
        scenario: spec.scenario,
        kind: spec.kind,
        title: spec.title.clone(),
        rate_per_second: match spec.mode {
            LoadMode::OpenLoop { rate_per_second } => Some(rate_per_second),
            LoadMode::ClosedLoop => None,
        },
        rate_basis: spec.rate_basis.clone(),
        skip_reason: None,
        rows,
    }
}

/// The address a target serves `spec`'s traffic on, or why it has none.
fn endpoint(spec: &RunSpec, endpoints: &Endpoints) -> Result<SocketAddr, String> {
    match spec.handshake {
        Some(kind) if kind.is_mutual() => return endpoints.mtls.clone(),
        Some(_) => return endpoints.tls.clone(),
        None => {}
    }
    match spec.protocol {
        Protocol::Http1 => Ok(endpoints.http1),
        Protocol::Http2 | Protocol::Grpc => Ok(endpoints.h2),
        Protocol::Tcp => endpoints.tcp.clone(),
    }
}

fn load_config(
    spec: &RunSpec,
    config: &CompareConfig,
    addr: SocketAddr,
    pids: &[u32],
) -> LoadConfig {
    let scheme = if spec.protocol == Protocol::Tcp {
        "tcp"
    } else {
        "http"
    };
    let target: Uri = format!("{scheme}://{addr}/")
        .parse()
        .unwrap_or_else(|_| Uri::from_static("http://127.0.0.1/"));
    let mut load = LoadConfig::new(target, spec.protocol, spec.mode);
    load.connections = NonZeroUsize::new(spec.connections).unwrap_or(NonZeroUsize::MIN);
    load.streams_per_connection = NonZeroUsize::new(spec.streams).unwrap_or(NonZeroUsize::MIN);
    load.duration = config.duration;
    load.warmup = config.warmup;
    load.body_size_bytes = spec.body_size_bytes;
    load.new_connection_per_request = spec.is_new_connection_per_request;
    load.pids = pids.to_vec();
    load
}

/// The memory scenarios: a fresh process per target and round.
async fn memory(
    config: &CompareConfig,
    contexts: (&StartContext<'_>, &StartContext<'_>),
    statuses: &[TargetStatus],
    scenarios: &[Scenario],
    idle_connections: usize,
) -> Vec<MemoryRow> {
    let with_rss = scenarios.contains(&Scenario::IdleRss);
    let with_idle = scenarios.contains(&Scenario::Idle);
    let mut rows: Vec<MemoryRow> = statuses
        .iter()
        .map(|status| MemoryRow {
            target: status.target,
            skip_reason: match status.target {
                TargetKind::Direct => Some(
                    "the echo runs inside weft-bench: there is no proxy process to measure"
                        .to_owned(),
                ),
                _ => status.skip_reason.clone(),
            },
            idle_rss_bytes: Vec::new(),
            idle_rss_median_bytes: None,
            master_rss_bytes: None,
            idle: with_idle.then(IdleSummary::default),
            failures: Vec::new(),
        })
        .collect();
    for round in 1..=config.rounds.get() {
        for row in rows.iter_mut().filter(|row| row.skip_reason.is_none()) {
            let round_result = async {
                if with_rss {
                    idle_rss_round(config, contexts.0, row, round).await?;
                }
                if with_idle {
                    idle_round(config, contexts.1, row, round, idle_connections).await?;
                }
                anyhow::Ok(())
            };
            if let Err(err) = round_result.await {
                warn!(target = row.target.name(), round, error = %format!("{err:#}"), "memory round failed");
                row.failures.push(format!("round {round}: {err:#}"));
            }
        }
    }
    for row in &mut rows {
        row.idle_rss_median_bytes = median_u64(&row.idle_rss_bytes);
        if let Some(idle) = &mut row.idle {
            let per: Vec<f64> = idle
                .rounds
                .iter()
                .filter(|round| round.opened > 0)
                .map(|round| round.per_connection_bytes)
                .collect();
            idle.per_connection_median_bytes = median(&per);
            let marginal: Vec<f64> = idle
                .rounds
                .iter()
                .filter_map(|round| round.marginal_per_connection_bytes)
                .collect();
            idle.marginal_per_connection_median_bytes = median(&marginal);
        }
    }
    rows
}

/// `idle-rss`: a fresh process's resident memory after the settle time,
/// configured as for the load runs.
async fn idle_rss_round(
    config: &CompareConfig,
    ctx: &StartContext<'_>,
    row: &mut MemoryRow,
    round: usize,
) -> anyhow::Result<()> {
    let proxy = ProxyProcess::start(row.target, ctx, round).await?;
    tokio::time::sleep(config.settle).await;
    let rss = system::rss_bytes_sum(&proxy.accounted_pids()).await?;
    row.idle_rss_bytes.push(rss);
    if let Some(master) = proxy.master_pid {
        row.master_rss_bytes = system::rss_bytes(master).await.ok();
    }
    info!(
        target = row.target.name(),
        round,
        rss_kib = rss / 1024,
        "idle rss"
    );
    Ok(())
}

/// `idle`: a fresh process sized for the connections, then
/// [`idle::measure`].
async fn idle_round(
    config: &CompareConfig,
    ctx: &StartContext<'_>,
    row: &mut MemoryRow,
    round: usize,
    idle_connections: usize,
) -> anyhow::Result<()> {
    let Some(idle) = row.idle.as_mut() else {
        return Ok(());
    };
    let proxy = ProxyProcess::start(row.target, ctx, 100 + round).await?;
    let measured = idle::measure(
        proxy.endpoints.http1,
        idle_connections,
        &proxy.accounted_pids(),
        config.idle_pause,
    )
    .await?;
    info!(
        target = row.target.name(),
        round,
        opened = measured.opened,
        per_connection_bytes = format!("{:.0}", measured.per_connection_bytes),
        "idle connections"
    );
    idle.rounds.push(measured);
    Ok(())
}
