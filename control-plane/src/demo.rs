//! `weft-cp demo`: a whole mesh on loopback, for a first look.
//!
//! It serves a mesh directory (`config/demo/` when run from the
//! repository, otherwise the copy built into this binary), starts one small
//! application per workload ([`app`]), one `weft-proxy` sidecar process per
//! workload and one `weft-proxy` process per gateway, all configured only
//! over xDS; then prints what to try, and a live line of traffic through the
//! gateway until Ctrl-C, when every child process is stopped.
//!
//! The operator's token (the admin API, `weft-cp status`) and each proxy's
//! node token (`weft-cp token issue`; the control plane accepts nothing
//! else from proxies) live in files only the user can read (mode 0600),
//! created fresh and removed when the demo ends, whether by `--duration`,
//! Ctrl-C/SIGTERM (at any point: the signals are watched before the file
//! exists) or an error. Only SIGKILL leaves it behind. The scratch
//! directory, with the proxies' logs, is kept and its path printed.

mod app;
mod waterfall;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::mesh::{self, Mesh};
use crate::serve::{ControlPlane, ServeOptions};
use crate::xds::Auth;

/// The demo mesh built into the binary, for runs outside the repository.
const EMBEDDED: [(&str, &str); 8] = [
    ("mesh.yaml", include_str!("../../config/demo/mesh.yaml")),
    (
        "services.yaml",
        include_str!("../../config/demo/services.yaml"),
    ),
    ("echo.yaml", include_str!("../../config/demo/echo.yaml")),
    ("ledger.yaml", include_str!("../../config/demo/ledger.yaml")),
    (
        "ingress.yaml",
        include_str!("../../config/demo/ingress.yaml"),
    ),
    (
        "policies.yaml",
        include_str!("../../config/demo/policies.yaml"),
    ),
    (
        "backend-authz.rego",
        include_str!("../../config/demo/backend-authz.rego"),
    ),
    (
        "backend-authz_test.rego",
        include_str!("../../config/demo/backend-authz_test.rego"),
    ),
];

/// The demo's failure to watch: this workload's application answers 503
/// to one request in [`FLAKY_EVERY`]; the backend service's `retries`
/// (services.yaml) keep its callers from seeing it.
const FLAKY_WORKLOAD: &str = "backend-v2";
const FLAKY_EVERY: u64 = 4;
/// Another failure to watch: this workload's application is down (503 to
/// everything) for [`OUTAGE`] of every [`OUTAGE_PERIOD`]; outlier detection
/// (services.yaml) ejects it and retries send its calls to its peer.
const OUTAGE_WORKLOAD: &str = "backend-v1b";
const OUTAGE_PERIOD: Duration = Duration::from_secs(30);
const OUTAGE: Duration = Duration::from_secs(8);

/// How long a proxy may take to start and receive its configuration.
/// How often the demo's proxies push their metrics to its receiver.
const DEMO_METRICS_INTERVAL: Duration = Duration::from_secs(2);
const PROXY_START_TIMEOUT: Duration = Duration::from_secs(30);

/// `weft-cp demo` flags.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The mesh directory. Default: `config/demo` if it exists here,
    /// otherwise the demo mesh built into weft-cp.
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// The weft-proxy binary. Default: next to weft-cp; when run through
    /// `cargo run`, it is built (or found up to date) first.
    #[arg(long, value_name = "FILE")]
    pub proxy_binary: Option<PathBuf>,
    /// The control plane's xDS address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15900")]
    pub xds: SocketAddr,
    /// The control plane's admin address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15901")]
    pub admin: SocketAddr,
    /// Where the demo receives its proxies' spans (OTLP over gRPC): the
    /// demo mesh's `tracing.collector` (mesh.yaml) names this address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15902")]
    pub otlp: SocketAddr,
    /// Background requests per second through the first gateway route
    /// (0: none; at most 1000).
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u64).range(crate::flags::DEMO_RATE))]
    pub rate: u64,
    /// Stop after this long instead of waiting for Ctrl-C (1s to 30days).
    #[arg(long, value_name = "DURATION", value_parser = crate::flags::demo_duration)]
    pub duration: Option<Duration>,
}

/// A started `weft-proxy`.
#[derive(Debug)]
struct ProxyChild {
    node: String,
    role: String,
    admin: SocketAddr,
    child: Child,
    /// Its node token, removed when the demo ends.
    _token: SecretFile,
}

/// A file holding a secret: created only if absent (never through an
/// existing file or link), readable by its owner only, removed on drop.
#[derive(Debug)]
pub struct SecretFile {
    path: PathBuf,
}

impl SecretFile {
    /// Creates `path` with mode 0600 and writes `contents`.
    ///
    /// # Errors
    ///
    /// When the file exists already or cannot be written.
    pub fn create(path: PathBuf, contents: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        // From here on, the file is removed whatever happens.
        let secret = Self { path };
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        Ok(secret)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "weft-cp: cannot remove the token file {}: {error}",
                self.path.display()
            );
        }
    }
}

/// Runs the demo until Ctrl-C (or `--duration`).
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    weft_proxy::cli::init_logging(Some("warn")).context("logging")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // Watched before the token file exists, so that Ctrl-C at any
        // point ends the demo through the code that removes it.
        let stop_requested = watch_stop_signals()?;
        let scratch = std::env::temp_dir().join(format!("weft-demo-{}", std::process::id()));
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&scratch)
                .with_context(|| format!("creating {}", scratch.display()))?;
        }
        let dir = mesh_dir(args, &scratch)?;
        let proxy = proxy_binary(args)?;
        // From the system's CSPRNG: the token guards the admin API.
        let mut secret = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
        let token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let token_file = SecretFile::create(scratch.join("token"), &token)
            .with_context(|| format!("creating the token file in {}", scratch.display()))?;
        let mesh = mesh::load_dir(&dir).map_err(|errors| {
            anyhow::anyhow!("{}: the demo mesh does not load:\n{errors}", dir.display())
        })?;
        let result = demo(
            args,
            &dir,
            &mesh,
            &proxy,
            &token,
            token_file.path(),
            &scratch,
            &stop_requested,
        )
        .await;
        drop(token_file);
        result
    })
}

/// Cancelled on the first SIGINT or SIGTERM. The handlers are installed
/// before this returns.
fn watch_stop_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let stop = CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        cancel.cancel();
    });
    Ok(stop)
}

#[allow(clippy::too_many_arguments)]
async fn demo(
    args: &DemoArgs,
    dir: &Path,
    mesh: &Mesh,
    proxy: &Path,
    token: &str,
    token_file: &Path,
    scratch: &Path,
    stop_requested: &CancellationToken,
) -> anyhow::Result<()> {
    let control_plane = ControlPlane::start(ServeOptions {
        config_dir: dir.to_owned(),
        xds_addr: args.xds,
        admin_addr: args.admin,
        auth: Auth::token(token),
        poll_interval: crate::watch::DEFAULT_POLL_INTERVAL,
        drain_timeout: Duration::from_secs(2),
        allow_empty: false,
        limits: crate::xds::XdsLimits::default(),
        ca: Some(crate::serve::CaSource::StateDir(scratch.join("ca"))),
        trust_bundle: None,
        svid_ttl: crate::serve::DEFAULT_SVID_TTL,
        // Proxies present node tokens; the mesh-wide token is the
        // operator's (weft-cp status).
        node_tokens_dir: Some(scratch.join("ca")),
        require_node_tokens: true,
    });
    let control_plane = tokio::select! {
        started = control_plane => started.context("starting the control plane")?,
        () = stop_requested.cancelled() => anyhow::bail!("interrupted while starting"),
    };
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let result = async {
        // Bound before the proxies start, so that no span is refused.
        let receiver = match mesh.tracing() {
            Some(_) => Some(
                crate::otlp::Receiver::bind(args.otlp, SocketAddr::from(([127, 0, 0, 1], 0)))
                    .await
                    .with_context(|| format!("binding the span receiver at {}", args.otlp))?,
            ),
            None => None,
        };
        start_apps(mesh, &stop, &tasks).await?;
        let mut proxies = Vec::new();
        let metrics_to = receiver.as_ref().map(crate::otlp::Receiver::grpc_url);
        let started = tokio::select! {
            started = start_proxies(
                mesh,
                args.xds,
                proxy,
                scratch,
                metrics_to.as_deref(),
                &mut proxies,
            ) => started,
            () = stop_requested.cancelled() => Err(anyhow::anyhow!("interrupted while starting the proxies")),
        };
        let outcome = match started {
            Ok(()) => {
                let mut observed = match &receiver {
                    Some(receiver) => trace_one_request(mesh, receiver, scratch).await,
                    None => None,
                };
                if mesh.istio_metrics().is_some()
                    && let Some(graph) = istio_graph(&proxies).await
                {
                    observed.get_or_insert_with(String::new).push_str(&graph);
                }
                if let Some(receiver) = &receiver {
                    let _ = write!(
                        observed.get_or_insert_with(String::new),
                        "\nEvery proxy also pushes its metrics over OTLP to {} every {} s (metrics_export in \
                         its bootstrap, {}/<node>.bootstrap.yaml); the live line counts the proxies heard from.\n",
                        receiver.grpc_url(),
                        DEMO_METRICS_INTERVAL.as_secs(),
                        scratch.display(),
                    );
                }
                print_banner(args, mesh, &proxies, token_file, dir, scratch, observed.as_deref());
                let drawing = receiver.as_ref().map(|r| (r, scratch.join("trace.svg")));
                traffic(args, mesh, &proxies, drawing.as_ref(), stop_requested).await;
                Ok(())
            }
            Err(error) => Err(error),
        };
        stop_proxies(&mut proxies).await;
        outcome
    }
    .await;
    stop.cancel();
    tasks.close();
    control_plane.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    println!("\nstopped; logs are in {}", scratch.display());
    result
}

/// The mesh directory: the flag, `config/demo`, or the embedded copy
/// written to `scratch`.
fn mesh_dir(args: &DemoArgs, scratch: &Path) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.config_dir {
        return Ok(dir.clone());
    }
    let local = PathBuf::from("config/demo");
    if local.join("services.yaml").is_file() {
        return Ok(local);
    }
    let dir = scratch.join("mesh");
    std::fs::create_dir_all(&dir)?;
    for (name, text) in EMBEDDED {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))?;
    }
    Ok(dir)
}

/// The weft-proxy binary: the flag, or the one next to this executable
/// (built first when cargo runs us, so that it is never stale).
fn proxy_binary(args: &DemoArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.proxy_binary {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe().context("finding weft-cp's own path")?;
    let dir = exe.parent().context("weft-cp's directory")?;
    if let Some(cargo) = std::env::var_os("CARGO") {
        println!("building weft-proxy (up to date after the first run)...");
        let mut build = std::process::Command::new(cargo);
        build.args([
            "build",
            "--quiet",
            "-p",
            "weft-proxy",
            "--bin",
            "weft-proxy",
        ]);
        if dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().context("running cargo build")?;
        anyhow::ensure!(status.success(), "building weft-proxy failed");
    }
    let path = dir.join("weft-proxy");
    anyhow::ensure!(
        path.is_file(),
        "{} not found; build it with `cargo build --release --bin weft-proxy` or pass --proxy-binary",
        path.display()
    );
    Ok(path)
}

async fn start_apps(
    mesh: &Mesh,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<()> {
    let tcp_services: std::collections::BTreeSet<&str> = mesh
        .services()
        .iter()
        .filter(|s| s.spec.protocol.as_deref() == Some("tcp"))
        .map(|s| s.spec.name.as_str())
        .collect();
    for service in mesh.services() {
        let service = &service.spec;
        for workload in &service.workloads {
            let address: SocketAddr = workload
                .app
                .parse()
                .with_context(|| format!("workload {}: app address", workload.name))?;
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("binding {}'s application at {address}", workload.name))?;
            let outbound = workload
                .outbound
                .as_deref()
                .map(str::parse)
                .transpose()
                .with_context(|| format!("workload {}: outbound address", workload.name))?;
            let app = Arc::new(app::App {
                service: service.name.clone(),
                workload: workload.name.clone(),
                version: workload.version.clone(),
                is_http2: service.protocol.as_deref() == Some("http2"),
                is_tcp: service.protocol.as_deref() == Some("tcp"),
                outbound,
                // HTTP callees through the outbound listener, TCP ones each
                // through its own port.
                calls: service
                    .calls
                    .iter()
                    .filter(|callee| !tcp_services.contains(callee.as_str()))
                    .cloned()
                    .collect(),
                tcp_calls: workload
                    .tcp_outbound
                    .iter()
                    .map(|(callee, address)| {
                        let address = address.parse().with_context(|| {
                            format!("workload {}: tcp_outbound.{callee}", workload.name)
                        })?;
                        anyhow::Ok((callee.clone(), address))
                    })
                    .collect::<anyhow::Result<_>>()?,
                fail_every: (workload.name == FLAKY_WORKLOAD).then_some(FLAKY_EVERY),
                outage: (workload.name == OUTAGE_WORKLOAD).then(|| app::Outage {
                    // The first outage a while after the start, once the
                    // mesh is up and the live line is running.
                    since: tokio::time::Instant::now() + OUTAGE_PERIOD / 2,
                    period: OUTAGE_PERIOD,
                    down: OUTAGE,
                }),
                served: std::sync::atomic::AtomicU64::new(0),
            });
            tasks.spawn(app::serve(listener, app, stop.clone(), tasks.clone()));
        }
    }
    Ok(())
}

async fn start_proxies(
    mesh: &Mesh,
    xds: SocketAddr,
    binary: &Path,
    scratch: &Path,
    metrics_to: Option<&str>,
    proxies: &mut Vec<ProxyChild>,
) -> anyhow::Result<()> {
    // Each proxy proves its own node, and only that, with a node token.
    let tokens = crate::xds::NodeTokens::load_or_create(&scratch.join("ca"))?;
    let mut nodes = Vec::new();
    for service in mesh.services() {
        for workload in &service.spec.workloads {
            nodes.push((
                workload.name.clone(),
                Some(service.spec.name.clone()),
                format!("sidecar of {}", service.spec.name),
            ));
        }
    }
    for gateway in mesh.gateways() {
        nodes.push((gateway.spec.name.clone(), None, "gateway".to_owned()));
    }
    for (node, service, role) in nodes {
        let log = scratch.join(format!("{node}.log"));
        let token = SecretFile::create(scratch.join(format!("{node}.token")), &tokens.issue(&node))
            .with_context(|| format!("writing the node token of {node}"))?;
        let mut command = tokio::process::Command::new(binary);
        command
            .args(["--xds", &xds.to_string(), "--node-id", &node])
            .arg("--token-file")
            .arg(token.path())
            .args([
                "--admin",
                "127.0.0.1:0",
                "--print-addresses",
                "--concurrency",
                "1",
                // The demo's processes stop together: no one to tell.
                "--drain-delay",
                "0s",
                // Proxies must not outlive a demo that is killed.
                "--exit-with-parent",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true);
        if let Some(service) = &service {
            command.args(["--service", service]);
        }
        if let Some(collector) = metrics_to {
            // The proxy's own settings (its bootstrap, as an injector would
            // write it): its metrics pushed to the demo's receiver too.
            let bootstrap = scratch.join(format!("{node}.bootstrap.yaml"));
            std::fs::write(
                &bootstrap,
                format!(
                    "metrics_export:\n  collector: {collector}\n  interval: {}s\n  service_name: {}\n  resource_attributes: {{ service.instance.id: {node} }}\n",
                    DEMO_METRICS_INTERVAL.as_secs(),
                    service.as_deref().unwrap_or(&node),
                ),
            )
            .with_context(|| format!("writing {}", bootstrap.display()))?;
            command.arg("--config").arg(bootstrap);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(PROXY_START_TIMEOUT, lines.next_line())
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .with_context(|| format!("{node} did not start; see {}", log.display()))?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let printed: serde_json::Value = serde_json::from_str(&line)?;
        let admin = printed["admin"]
            .as_str()
            .context("admin address printed")?
            .parse()?;
        proxies.push(ProxyChild {
            node,
            role,
            admin,
            child,
            _token: token,
        });
    }
    let deadline = Instant::now() + PROXY_START_TIMEOUT;
    for proxy in proxies.iter() {
        loop {
            let ready = app::get(proxy.admin, "admin", "/ready", &[])
                .await
                .is_ok_and(|(status, _, _)| status.is_success());
            if ready {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not become ready; see {}",
                proxy.node,
                scratch.join(format!("{}.log", proxy.node)).display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// One request the demo suggests: a gateway route's URL and headers.
struct Suggestion {
    address: SocketAddr,
    path: String,
    headers: Vec<(String, String)>,
    what: String,
    /// The service the route sends to.
    service: String,
}

fn suggestions(mesh: &Mesh) -> Vec<Suggestion> {
    let mut out = Vec::new();
    for gateway in mesh.gateways() {
        for listener in &gateway.spec.listeners {
            let Ok(address) = listener.address.parse::<SocketAddr>() else {
                continue;
            };
            for route in &listener.routes {
                let matcher = route.matcher.as_ref();
                let path = matcher
                    .and_then(|m| m.prefix.clone().or_else(|| m.exact.clone()))
                    .unwrap_or_else(|| "/".to_owned());
                let headers: Vec<(String, String)> = matcher
                    .and_then(|m| m.headers.as_ref())
                    .map(|hs| {
                        hs.iter()
                            .filter_map(|h| Some((h.name.clone(), h.exact.clone()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                let target = match (&route.version, &route.split) {
                    (Some(version), _) => format!("{} version {version} only", route.service),
                    (None, Some(split)) => format!(
                        "{} split {}",
                        route.service,
                        split
                            .iter()
                            .map(|(v, w)| format!("{v}:{w}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                    (None, None) => format!("every {} workload", route.service),
                };
                out.push(Suggestion {
                    address,
                    path,
                    headers,
                    what: format!("route {:?} -> {target}", route.name),
                    service: route.service.clone(),
                });
            }
        }
    }
    out
}

/// Sends one request through the gateway's route to `frontend` (else the
/// first plain route) with a sampled trace context of its own, collects
/// the spans every hop exports, and returns them as a waterfall (also
/// written as `trace.svg` in `scratch`). `None` when no span arrived.
async fn trace_one_request(
    mesh: &Mesh,
    receiver: &crate::otlp::Receiver,
    scratch: &Path,
) -> Option<String> {
    let candidates: Vec<Suggestion> = suggestions(mesh)
        .into_iter()
        .filter(|s| s.headers.is_empty())
        .collect();
    let target = candidates
        .iter()
        .find(|s| s.service == "frontend")
        .or_else(|| candidates.first())?;
    let (trace_id, span_id) = app::random_ids();
    let traceparent = format!("00-{trace_id}-{span_id}-01");
    let status = app::get(
        target.address,
        "demo",
        &target.path,
        &[("traceparent", &traceparent)],
    )
    .await
    .map_or_else(|e| e.to_string(), |(status, _, _)| status.to_string());
    // Hops export every 200 ms (mesh.yaml): done once nothing new has
    // come for a while.
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let spans = loop {
        let (spans, _) = receiver
            .wait_for(Duration::from_millis(600), |spans| {
                spans.iter().filter(|s| s.trace_id == trace_id).count() > seen
            })
            .await;
        let ours: Vec<_> = spans
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        if (ours.len() == seen && seen > 0) || tokio::time::Instant::now() >= deadline {
            break ours;
        }
        seen = ours.len();
    };
    if spans.is_empty() {
        return None;
    }
    let rows = waterfall::rows(&spans);
    let title = format!(
        "GET {} ({status}), trace {trace_id}: {} spans",
        target.path,
        spans.len()
    );
    let svg_path = scratch.join("trace.svg");
    let written = std::fs::write(&svg_path, waterfall::svg(&rows, &title)).is_ok();
    let mut out = format!("\nOne request's trace, as its hops reported it: {title}\n");
    out.push_str(&waterfall::text(&rows));
    if written {
        let _ = writeln!(out, "  (also drawn in {})", svg_path.display());
        let _ = writeln!(
            out,
            "  Every later `curl http://{}{}` is drawn there in its place (the file is rewritten within a second).",
            target.address, target.path
        );
    }
    Some(out)
}

/// The calls every sidecar has seen so far, from the callee's side of
/// Istio's `istio_requests_total` (`reporter="destination"`): who called
/// whom, with what status, how often. `None` before any call.
async fn istio_graph(proxies: &[ProxyChild]) -> Option<String> {
    let mut edges: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    let mut admin = None;
    for p in proxies {
        let Ok((_, _, text)) = app::get(p.admin, "admin", "/metrics", &[]).await else {
            continue;
        };
        for line in text.lines() {
            // Requests by response code; TCP connections as `tcp`.
            let (labels, tcp) = match line.strip_prefix("istio_requests_total{") {
                Some(labels) => (labels, false),
                None => match line.strip_prefix("istio_tcp_connections_opened_total{") {
                    Some(labels) => (labels, true),
                    None => continue,
                },
            };
            if label(labels, "reporter") != Some("destination") {
                continue;
            }
            let count: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let key = ["source_workload", "destination_workload", "response_code"]
                .map(|name| label(labels, name).unwrap_or("?").to_owned());
            let [source, destination, mut code] = key;
            if tcp {
                "tcp".clone_into(&mut code);
            }
            *edges.entry((source, destination, code)).or_default() += count;
            admin.get_or_insert(p.admin);
        }
    }
    let admin = admin?;
    let mut out = String::from(
        "
Calls so far, from Istio's standard metrics (istio_requests_total and, as tcp, \
istio_tcp_connections_opened_total; reporter=\"destination\"):\n",
    );
    for ((source, destination, code), count) in &edges {
        let _ = writeln!(out, "  {source:>12} -> {destination:<12} {code}  x{count}");
    }
    let _ = writeln!(
        out,
        "  curl -s http://{admin}/metrics | grep '^istio_requests_total'   # Istio's dashboards and alerts read these"
    );
    Some(out)
}

/// The value of label `name` in a series' label text (values without
/// escaped quotes, as the mesh's names are).
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels
        .split(',')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix("=\""))?;
    start.split('"').next()
}

#[allow(clippy::too_many_arguments)]
fn print_banner(
    args: &DemoArgs,
    mesh: &Mesh,
    proxies: &[ProxyChild],
    token_file: &Path,
    dir: &Path,
    scratch: &Path,
    observed: Option<&str>,
) {
    println!(
        "\nWeft demo mesh is up: control plane + {} proxies, all configured over xDS.\n",
        proxies.len()
    );
    println!("Try (through the ingress gateway):");
    for s in suggestions(mesh) {
        let headers: String = s
            .headers
            .iter()
            .map(|(n, v)| format!("-H '{n}: {v}' "))
            .collect();
        println!("  curl -s {headers}http://{}{}", s.address, s.path);
        println!("      # {}", s.what);
    }
    for gateway in mesh.gateways() {
        for listener in &gateway.spec.listeners {
            let (Some(service), Ok(address)) = (
                listener.service.as_deref(),
                listener.address.parse::<SocketAddr>(),
            ) else {
                continue;
            };
            println!(
                "  bash -c 'exec 3<>/dev/tcp/{}/{}; echo balance >&3; head -1 <&3'",
                address.ip(),
                address.port()
            );
            println!(
                "      # tcp listener {:?} -> every {service} workload",
                listener.name
            );
        }
    }
    println!("\nProxies (admin: /config_dump /clusters /metrics /ready):");
    for p in proxies {
        println!(
            "  {:<12} {:<22} http://{}/config_dump",
            p.node, p.role, p.admin
        );
    }
    if let Some(domain) = mesh.trust_domain() {
        let inbound = mesh
            .services()
            .iter()
            .flat_map(|s| s.spec.workloads.iter().map(move |w| (&s.spec, w)))
            .find(|(s, _)| s.protocol.is_none() || s.protocol.as_deref() == Some("http1"));
        println!(
            "\nMutual TLS on every sidecar hop (trust domain {domain}); each app shows its caller's SPIFFE ID."
        );
        if let Some((service, workload)) = inbound {
            let ca = scratch.join("ca");
            let client = scratch.join("client");
            println!(
                "  Call the {} sidecar directly with a certificate of your own:",
                service.name
            );
            println!(
                "  weft-cp cert issue --state-dir {} --spiffe-id spiffe://{domain}/ns/default/sa/cli --out {}",
                ca.display(),
                client.display()
            );
            println!(
                "  curl -sk --cert {0}/cert.pem --key {0}/key.pem https://{1}/",
                client.display(),
                workload.inbound
            );
            println!(
                "      # -k: curl cannot check a SPIFFE ID; the sidecar still checks yours (try without --cert)"
            );
        }
    }
    // TCP services, through a caller's sidecar port for each.
    for service in mesh.services() {
        for workload in &service.spec.workloads {
            for (callee, address) in &workload.tcp_outbound {
                let Ok(address) = address.parse::<SocketAddr>() else {
                    continue;
                };
                println!(
                    "\n{callee} is a TCP service; {}'s application reaches it on its sidecar's port {address}:",
                    workload.name
                );
                println!(
                    "  bash -c 'exec 3<>/dev/tcp/{}/{}; echo balance >&3; head -1 <&3'",
                    address.ip(),
                    address.port()
                );
                println!(
                    "      # one line back from {callee}'s application, over mutual TLS between the sidecars"
                );
            }
        }
    }
    if mesh
        .services()
        .iter()
        .any(|s| s.spec.workloads.iter().any(|w| w.name == FLAKY_WORKLOAD))
    {
        println!(
            "\nA failure to watch: {FLAKY_WORKLOAD}'s application answers 503 to one request in {FLAKY_EVERY}."
        );
        println!(
            "  The backend service's `retries` ({}/services.yaml) send each failed attempt again: the live line",
            dir.display()
        );
        println!(
            "  shows `failed 0` and counts `retried`. Remove `retries` there and the failures reach the callers."
        );
    }
    if mesh
        .services()
        .iter()
        .any(|s| s.spec.workloads.iter().any(|w| w.name == OUTAGE_WORKLOAD))
    {
        println!(
            "An outage to watch: {OUTAGE_WORKLOAD} is down {}s of every {}s. Outlier detection takes it out of",
            OUTAGE.as_secs(),
            OUTAGE_PERIOD.as_secs()
        );
        println!(
            "  rotation (`ejections` on the live line, `/clusters` on a caller's sidecar) and retries hide its failures."
        );
        println!(
            "Chaos on purpose: uncomment `fault:` under the backend service in {}/services.yaml and save;",
            dir.display()
        );
        println!(
            "  every caller then fails and delays a share of its calls to backend: the live line counts `faults`."
        );
    }
    for policy in mesh.policies() {
        let guarded: Vec<&str> = mesh
            .services()
            .iter()
            .filter(|s| s.spec.policy.as_ref() == Some(&policy.spec.spec.name))
            .map(|s| s.spec.name.as_str())
            .collect();
        if guarded.is_empty() {
            continue;
        }
        println!(
            "\nPolicy {:?} ({}) guards {}: its sidecars check every call (every connection, for TCP) in-process.",
            policy.spec.spec.name,
            policy.file,
            guarded.join(", ")
        );
        if let Some(s) = suggestions(mesh)
            .into_iter()
            .find(|s| s.headers.is_empty() && guarded.contains(&s.service.as_str()))
        {
            println!("  curl -si -X DELETE http://{}{}", s.address, s.path);
            println!(
                "      # 403 from the {} sidecar: the policy refuses DELETE (`denied` on the live line)",
                guarded.join("/")
            );
        }
    }
    if let Some(observed) = observed {
        print!("{observed}");
    }
    println!("\nControl plane:");
    println!(
        "  weft-cp status --admin {} --token-file {}",
        args.admin,
        token_file.display()
    );
    println!(
        "  edit {}/*.yaml or *.rego (e.g. the backend split): proxies get the change within a second",
        dir.display()
    );
    println!("  logs: {}", scratch.display());
    println!("\nCtrl-C stops everything.\n");
}

/// Sends `--rate` requests per second through the first suggested route
/// and prints a line of figures every second.
async fn traffic(
    args: &DemoArgs,
    mesh: &Mesh,
    proxies: &[ProxyChild],
    drawing: Option<&(&crate::otlp::Receiver, PathBuf)>,
    stop_requested: &CancellationToken,
) {
    let end = args.duration.map(|d| tokio::time::Instant::now() + d);
    let until_end = async {
        match end {
            Some(end) => tokio::time::sleep_until(end).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_end);
    // Traffic through a split shows it live; otherwise the first route.
    let candidates: Vec<Suggestion> = suggestions(mesh)
        .into_iter()
        .filter(|s| s.headers.is_empty())
        .collect();
    let split = candidates.iter().position(|s| s.what.contains(" split "));
    let target = candidates.into_iter().nth(split.unwrap_or(0));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // `--rate` is at most 1,000 (flags::DEMO_RATE), so the period is at
    // least a millisecond: never zero, which would panic the interval.
    let period = Duration::from_secs(1) / u32::try_from(args.rate.max(1)).unwrap_or(1_000);
    let mut send = tokio::time::interval(period);
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let (mut sent, mut ok, mut failed, mut last_sent) = (0u64, 0u64, 0u64, 0u64);
    let (results, mut completed) = tokio::sync::mpsc::channel::<Result<Option<String>, ()>>(64);
    // The trace drawn last: its id and how many spans it had.
    let mut drawn: Option<(String, usize)> = None;
    loop {
        tokio::select! {
            () = stop_requested.cancelled() => return,
            () = &mut until_end => return,
            _ = send.tick(), if args.rate > 0 && target.is_some() => {
                if let Some(target) = &target {
                    let (address, path, results) = (target.address, target.path.clone(), results.clone());
                    sent += 1;
                    tokio::spawn(async move {
                        let outcome = match app::get(address, "demo", &path, &[]).await {
                            Ok((status, version, _)) if status.is_success() => Ok(version),
                            _ => Err(()),
                        };
                        let _ = results.send(outcome).await;
                    });
                }
            }
            Some(outcome) = completed.recv() => match outcome {
                Ok(version) => {
                    ok += 1;
                    *versions.entry(version.unwrap_or_else(|| "-".into())).or_default() += 1;
                }
                Err(()) => failed += 1,
            },
            _ = tick.tick() => {
                if let Some((receiver, svg)) = drawing {
                    drawn = redraw_latest(receiver, svg, drawn);
                }
                let mut ready = 0;
                for p in proxies {
                    if app::get(p.admin, "admin", "/ready", &[]).await.is_ok_and(|(s, _, _)| s.is_success()) {
                        ready += 1;
                    }
                }
                let total: u64 = versions.values().sum();
                let split: String = versions
                    .iter()
                    .map(|(v, n)| format!("{v} {:.0}%", 100.0 * *n as f64 / total.max(1) as f64))
                    .collect::<Vec<_>>()
                    .join(", ");
                let route = target.as_ref().map_or("", |t| t.path.as_str());
                let (mut retried, mut ejections, mut faults, mut denied) = (0.0, 0.0, 0.0, 0.0);
                for p in proxies {
                    if let Ok((_, _, text)) = app::get(p.admin, "admin", "/metrics", &[]).await {
                        // The series of one family whose labels include `label`.
                        let sum = |prefix: &str, label: &str| {
                            text.lines()
                                .filter(|l| l.starts_with(prefix) && l.contains(label))
                                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                                .sum::<f64>()
                        };
                        retried += sum("weft_upstream_retries_total{", "");
                        ejections += sum("weft_upstream_outlier_ejections_total{", "");
                        faults += sum("weft_http_faults_injected_total{", "");
                        denied += sum("weft_policy_decisions_total{", "result=\"deny\"");
                    }
                }
                let pushing = drawing
                    .map(|(receiver, _)| format!(" | metrics pushed by {}", receiver.metrics().len()))
                    .unwrap_or_default();
                print!(
                    "\r{} req/s to {route} | ok {ok} failed {failed} retried {retried} ejections {ejections} faults {faults} denied {denied} | answered by: {split} | proxies ready {ready}/{}{pushing}   ",
                    sent - last_sent,
                    proxies.len()
                );
                let _ = std::io::stdout().flush();
                last_sent = sent;
            }
        }
    }
}

/// Draws the latest recorded `/frontend/` request (the gateway's server
/// span of its `frontend` route) into `svg`, when it is a new trace or more
/// of its spans have arrived since `drawn`. Returns what is drawn now.
fn redraw_latest(
    receiver: &crate::otlp::Receiver,
    svg: &Path,
    drawn: Option<(String, usize)>,
) -> Option<(String, usize)> {
    let spans = receiver.latest_trace(|s| {
        s.kind == "server"
            && s.parent_span_id.is_empty()
            && s.attribute("weft.route") == Some("frontend")
    });
    let Some(root) = spans.first() else {
        return drawn;
    };
    let now = (root.trace_id.clone(), spans.len());
    if drawn.as_ref() == Some(&now) {
        return drawn;
    }
    let title = format!(
        "the latest GET /frontend/ (trace {}): {} spans",
        now.0,
        spans.len()
    );
    let _ = std::fs::write(svg, waterfall::svg(&waterfall::rows(&spans), &title));
    Some(now)
}

/// SIGTERM to every proxy (they drain), then waits a little and kills what
/// remains.
async fn stop_proxies(proxies: &mut [ProxyChild]) {
    for proxy in proxies.iter() {
        if let Some(pid) = proxy.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for proxy in proxies.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(5), proxy.child.wait())
            .await
            .is_err()
        {
            let _ = proxy.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn secret_file_is_owner_only_never_reused_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let secret = SecretFile::create(path.clone(), "s3cret").unwrap();
        let metadata = std::fs::metadata(&path).unwrap();
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "s3cret");
        // An existing file (or a link planted there) is never written.
        let error = SecretFile::create(path.clone(), "other").unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "s3cret");
        drop(secret);
        assert!(!path.exists());
    }
}
