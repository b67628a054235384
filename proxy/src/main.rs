//! `weft-proxy`: parses flags, builds the runtimes, starts the proxy and
//! waits for SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use weft_proxy::config::{AdminSpec, BootstrapSpec, Config};
use weft_proxy::xds::XdsOptions;
use weft_proxy::{Proxy, Readiness};

/// Weft's L4/L7 proxy.
#[derive(Debug, Parser)]
#[command(name = "weft-proxy", version, about)]
struct Args {
    /// Run from this YAML configuration file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "check_config"])]
    config: Option<PathBuf>,
    /// Validate this configuration file and exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Quick reverse proxy: listen here (with --upstream).
    #[arg(long, value_name = "ADDR", requires = "upstream")]
    listen: Option<String>,
    /// Quick reverse proxy: round-robin over these upstreams.
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        requires = "listen"
    )]
    upstream: Vec<String>,
    /// Serve the admin API here (quick reverse proxy and --xds modes).
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// How long listeners keep accepting after SIGTERM, with /ready at 503,
    /// before the drain starts (overrides the file's drain_delay; default
    /// 5s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    drain_delay: Option<std::time::Duration>,
    /// With --config: how often the file and the TLS files it names are
    /// checked for changes, which are then validated and applied (0s: only
    /// on SIGHUP; at most 1h).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    reload_interval: std::time::Duration,
    /// With --admin: a file holding the bearer token every admin request
    /// but /ready and /live must present.
    #[arg(long, value_name = "FILE", requires = "admin")]
    admin_token_file: Option<String>,
    /// Take listeners, routes and clusters from this control plane
    /// (`HOST:PORT`). `--config`, if given, then holds only the proxy's own
    /// settings (admin, access_log, decision_log, metrics_export,
    /// drain_timeout).
    #[arg(
        long,
        value_name = "ADDR",
        requires = "node_id",
        conflicts_with = "listen"
    )]
    xds: Option<String>,
    /// This proxy's node id, as the control plane knows it (with --xds).
    #[arg(long, value_name = "ID", requires = "xds")]
    node_id: Option<String>,
    /// The service this proxy runs beside (with --xds).
    #[arg(long, value_name = "NAME", requires = "xds")]
    service: Option<String>,
    /// A file holding the bearer token for the control plane (with --xds).
    #[arg(long, value_name = "FILE", requires = "xds")]
    token_file: Option<PathBuf>,
    /// Worker threads for the data plane.
    #[arg(long, value_name = "N", default_value_t = 2)]
    concurrency: usize,
    /// Log filter (overrides RUST_LOG), e.g. `info` or `weft_proxy=debug`.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Print the bound addresses as one JSON line on stdout once serving.
    #[arg(long)]
    print_addresses: bool,
    /// Drain and exit when the process that started this one exits, even
    /// if it was killed (for supervisors such as `weft-cp demo`).
    #[arg(long)]
    exit_with_parent: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(error) = weft_proxy::cli::init_logging(args.log_level.as_deref()) {
        eprintln!("weft-proxy: --log-level: {error}");
        return ExitCode::from(2);
    }
    if let Some(path) = &args.check_config {
        return match Config::from_file(path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                // With its causes: "cannot read f.yaml: No such file ...".
                let mut message = error.to_string();
                let mut cause = std::error::Error::source(&error);
                while let Some(error) = cause {
                    message.push_str(&format!(": {error}"));
                    cause = error.source();
                }
                eprintln!("{message}");
                ExitCode::from(1)
            }
        };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weft-proxy: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let xds = args
        .xds
        .as_ref()
        .map(|server| xds_options(args, server))
        .transpose()?;
    let mut config = match (&xds, &args.config, &args.listen) {
        (Some(options), _, _) => Config::try_from(options.bootstrap.clone())
            .map_err(|errors| anyhow::anyhow!("invalid bootstrap:\n{errors}"))?,
        (None, Some(path), _) => {
            anyhow::ensure!(
                args.admin.is_none(),
                "--admin goes with --listen or --xds; with --config, set admin in the file"
            );
            Config::from_file(path)?
        }
        (None, None, Some(listen)) => Config::reverse_proxy(
            listen,
            &args.upstream,
            args.admin.as_deref(),
            args.admin_token_file.as_deref(),
        )?,
        (None, None, None) => {
            anyhow::bail!(
                "nothing to run: pass --config FILE, --listen ADDR --upstream ADDR, or --xds ADDR --node-id ID"
            )
        }
    };
    if xds.is_none()
        && let Some(id) = config.workload_identities().first()
    {
        anyhow::bail!(
            "workload_identity {id:?}: its certificate is signed by the control plane; \
             run with --xds (files: use certificates / cert_file and key_file)"
        );
    }
    if let Some(delay) = args.drain_delay {
        anyhow::ensure!(
            delay <= std::time::Duration::from_secs(300),
            "--drain-delay: at most 5m"
        );
        config.drain_delay = delay;
    }
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(
        args.reload_interval <= std::time::Duration::from_secs(3600),
        "--reload-interval: at most 1h"
    );
    // Admin, DNS and other control work run apart from the workers.
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("weft-control")
        .enable_all()
        .build()
        .context("building the control runtime")?;
    // One worker: tokio's current-thread scheduler on this thread, which
    // drives the data plane inside `block_on` below. It skips the
    // multi-thread scheduler's work-stealing queues and cross-thread
    // wake-ups, which a single worker never needs.
    let workers = if args.concurrency == 1 {
        // This thread runs the workers' runtime and no other.
        weft_proxy::worker_thread_started();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.concurrency)
            .thread_name("weft-worker")
            .on_thread_start(weft_proxy::worker_thread_started)
            .enable_all()
            .build()
    }
    .context("building the worker runtime")?;
    let readiness = if xds.is_some() {
        Readiness::Deferred
    } else {
        Readiness::Immediate
    };
    // Before the listeners open: from then on a SIGTERM must drain.
    let mut shutdown = {
        let _runtime = workers.enter();
        weft_proxy::cli::ShutdownSignal::install()
    };
    let proxy = workers.block_on(Proxy::start(config, control.handle().clone(), readiness))?;
    let reload_file = args.config.clone().filter(|_| xds.is_none());
    if let Some(options) = xds {
        // Keeps the workload identities the pushed configuration uses
        // signed by the control plane's identity service.
        let rotation = weft_proxy::identity::RotationOptions {
            server: options.server.clone(),
            node_id: options.node_id.clone(),
            token: options.token.clone(),
            ttl: None,
        };
        let handle = proxy.handle();
        control.spawn(weft_proxy::identity::rotate(
            rotation,
            handle.identities(),
            handle.drain(),
        ));
        control.spawn(weft_proxy::xds::run(options, handle));
    }
    if let Some(path) = reload_file {
        // A changed file (or SIGHUP) is validated and applied; a bad one
        // is logged and the last good configuration keeps serving.
        control.spawn(weft_proxy::reload::watch(
            path,
            proxy.handle(),
            args.reload_interval,
        ));
    } else {
        // Nothing to reload (the control plane, or the command line, gives
        // the configuration): SIGHUP, which operators send out of habit and
        // log rotation sends on purpose, reopens the logs and must not kill
        // the proxy by its default action.
        // Registered before the addresses are printed, so that no SIGHUP
        // can arrive unhandled.
        let hangup = {
            let _runtime = control.enter();
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        };
        match hangup {
            Ok(mut hangup) => {
                let handle = proxy.handle();
                control.spawn(async move {
                    while hangup.recv().await.is_some() {
                        // No configuration file to reload; log files are
                        // reopened (after a rotation).
                        handle.reopen_logs();
                        tracing::info!("SIGHUP: log files reopened");
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "cannot handle SIGHUP"),
        }
    }
    if args.print_addresses {
        println!(
            "{}",
            serde_json::to_string(proxy.addresses()).context("encoding addresses")?
        );
    }
    let parent = args
        .exit_with_parent
        .then(std::os::unix::process::parent_id);
    workers.block_on(async {
        tokio::select! {
            () = shutdown.recv() => {}
            () = parent_exit(parent) => tracing::info!("parent process exited"),
        }
        proxy.shutdown().await;
    });
    workers.shutdown_timeout(std::time::Duration::from_millis(100));
    control.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}

/// The xDS client's settings: the bootstrap (from `--config` and
/// `--admin`), the node, and the token.
fn xds_options(args: &Args, server: &str) -> anyhow::Result<XdsOptions> {
    anyhow::ensure!(
        weft_proxy::xds::server_authority(server).is_some(),
        "--xds {server:?}: expected the control plane's HOST:PORT"
    );
    let mut bootstrap = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let spec: BootstrapSpec = match serde_yaml_ng::from_str(&text) {
                Ok(spec) => spec,
                // The loader reports syntax errors with their path and line.
                Err(_) => {
                    return Err(Config::from_file(path).err().map_or_else(
                        || anyhow::anyhow!("{}: cannot be parsed", path.display()),
                        anyhow::Error::from,
                    ));
                }
            };
            anyhow::ensure!(
                spec.listeners.is_empty()
                    && spec.route_configs.is_empty()
                    && spec.clusters.is_empty(),
                "{}: with --xds, listeners, route_configs and clusters come from the control plane; \
                 the file may only set the proxy's own settings (admin, access_log, decision_log, \
                 metrics_export, drain_timeout)",
                path.display()
            );
            spec
        }
        None => BootstrapSpec::default(),
    };
    if let Some(admin) = &args.admin {
        bootstrap.admin = Some(AdminSpec {
            address: admin.clone(),
            token_file: args.admin_token_file.clone(),
        });
    }
    let token = match &args.token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))?;
            let token = token.trim().to_owned();
            anyhow::ensure!(
                !token.is_empty(),
                "{}: the token file is empty",
                path.display()
            );
            Some(token)
        }
        None => None,
    };
    Ok(XdsOptions {
        server: server.to_owned(),
        node_id: args.node_id.clone().unwrap_or_default(),
        service: args.service.clone(),
        token,
        bootstrap,
    })
}

/// Resolves once this process is no longer the child of `parent` (it was
/// re-parented because the parent exited); never when `parent` is `None`.
async fn parent_exit(parent: Option<u32>) {
    let Some(parent) = parent else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    while std::os::unix::process::parent_id() == parent {
        tick.tick().await;
    }
}
