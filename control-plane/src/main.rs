//! `weft-cp`: the control plane's command line. `serve` streams a mesh
//! directory's configuration to proxies over xDS; `validate` checks mesh
//! directories and proxy configuration files with the proxy's own
//! validator; `status` shows what a running control plane serves and what
//! each proxy acknowledged; `demo` runs a whole mesh on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft_cp::serve::{ControlPlane, ServeOptions};
use weft_cp::xds::{Auth, XdsLimits};
use weft_cp::{flags, mesh, status};
use weft_proxy::config::Config;

/// How long `status` waits for each step of its request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Weft's control plane.
#[derive(Debug, Parser)]
#[command(name = "weft-cp", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check mesh directories and proxy configuration files, and report
    /// every problem with its file, resource and field.
    ///
    /// A directory is a mesh: its *.yaml/*.yml files (not recursive) hold
    /// services and gateways; it is checked as a whole, including each
    /// node's generated proxy configuration. A file is one proxy
    /// configuration, as `weft-proxy --check-config` reads it.
    Validate {
        /// Mesh directories and/or proxy configuration files.
        #[arg(required = true, value_name = "DIR|FILE")]
        paths: Vec<PathBuf>,
        /// Accept a mesh directory with no services and no gateways (as
        /// `serve --allow-empty` would serve it).
        #[arg(long)]
        allow_empty: bool,
    },
    /// Serve a mesh directory to proxies over xDS, pushing every valid
    /// change to the proxies it affects.
    Serve(ServeArgs),
    /// Run a whole mesh on loopback: the control plane with config/demo,
    /// echo services with weft-proxy sidecars, and an ingress gateway.
    Demo(weft_cp::demo::DemoArgs),
    /// Show a running control plane's mesh generation, last config error
    /// and connected proxies with what each acknowledged or rejected.
    Status {
        /// The control plane's admin address (host:port).
        #[arg(long)]
        admin: SocketAddr,
        /// A file holding the bootstrap token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `weft-cp serve` flags.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("auth").required(true).args(["token_file", "insecure"])))]
struct ServeArgs {
    /// The mesh directory (its *.yaml/*.yml files), watched for changes.
    #[arg(long, value_name = "DIR")]
    config_dir: PathBuf,
    /// Where proxies connect (gRPC over h2c).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18000")]
    xds: SocketAddr,
    /// Where the admin API (status, metrics, readiness) listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18001")]
    admin: SocketAddr,
    /// A file holding the bootstrap token proxies and operators present
    /// (this or --insecure).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Accept every client without a token (local experiments only; this
    /// or --token-file).
    #[arg(long)]
    insecure: bool,
    /// How often the directory is checked for changes (10ms to 1h).
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = flags::poll_interval)]
    poll_interval: Duration,
    /// Serve an empty mesh, and apply changes that remove every listener
    /// of a connected proxy. Without it both are refused (logged, shown in
    /// `status`) and the last good state is kept: they are what an
    /// unmounted volume or a bad deploy looks like.
    #[arg(long)]
    allow_empty: bool,
    /// xDS connections open at once; more are closed when accepted.
    #[arg(long, value_name = "N", default_value_t = XdsLimits::DEFAULT_MAX_CONNECTIONS as u64, value_parser = clap::value_parser!(u64).range(flags::MAX_CONNECTIONS))]
    max_xds_connections: u64,
    /// How long a new xDS connection may take to send the HTTP/2 preface
    /// and open its first authenticated stream (100ms to 5m).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = flags::handshake_timeout)]
    xds_handshake_timeout: Duration,
    /// Print the bound addresses as one JSON line on stdout once serving.
    #[arg(long)]
    print_addresses: bool,
    /// Log filter (overrides RUST_LOG), e.g. `info` or `weft_cp=debug`.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Validate { paths, allow_empty } => validate(&paths, allow_empty),
        Command::Serve(args) => exit(serve(&args)),
        Command::Demo(args) => exit(weft_cp::demo::run(&args)),
        Command::Status {
            admin,
            token_file,
            json,
        } => exit(show_status(admin, token_file.as_deref(), json)),
    }
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weft-cp: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    weft_proxy::cli::init_logging(args.log_level.as_deref());
    let auth = match &args.token_file {
        Some(path) => Auth::token(weft_proxy::cli::read_token(path)?),
        None => Auth::Insecure,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weft-cp")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let control_plane = ControlPlane::start(ServeOptions {
            config_dir: args.config_dir.clone(),
            xds_addr: args.xds,
            admin_addr: args.admin,
            auth,
            poll_interval: args.poll_interval,
            drain_timeout: Duration::from_secs(5),
            allow_empty: args.allow_empty,
            limits: XdsLimits {
                max_connections: usize::try_from(args.max_xds_connections)
                    .context("--max-xds-connections does not fit this platform")?,
                handshake_timeout: args.xds_handshake_timeout,
            },
        })
        .await?;
        if args.print_addresses {
            let server = control_plane.server();
            println!(
                "{}",
                serde_json::json!({
                    "xds": server.xds_addr().to_string(),
                    "admin": server.admin_addr().to_string(),
                })
            );
        }
        weft_proxy::cli::shutdown_signal().await;
        control_plane.shutdown().await;
        anyhow::Ok(())
    })
}

fn show_status(
    admin: SocketAddr,
    token_file: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    let token = token_file.map(weft_proxy::cli::read_token).transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let body = runtime
        .block_on(status::fetch_json(admin, token.as_deref(), STATUS_TIMEOUT))
        .with_context(|| format!("fetching the status from {admin}"))?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
    } else {
        let report = status::parse(&body).context("reading the status")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        print!("{}", status::render_table(&report, now));
    }
    Ok(())
}

fn validate(paths: &[PathBuf], allow_empty: bool) -> ExitCode {
    let mut failed = 0;
    for path in paths {
        let ok = if path.is_dir() {
            validate_mesh(path, allow_empty)
        } else {
            validate_proxy_file(path)
        };
        if !ok {
            failed += 1;
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} path(s) invalid", paths.len());
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn validate_mesh(dir: &Path, allow_empty: bool) -> bool {
    let built = mesh::load_dir(dir).and_then(|mesh| {
        let snapshot = mesh.snapshot()?;
        Ok((mesh, snapshot))
    });
    match built {
        Ok((_, snapshot)) if snapshot.nodes.is_empty() && !allow_empty => {
            eprintln!(
                "{}: invalid mesh:\nno services and no gateways (weft-cp serve refuses an empty mesh unless --allow-empty)",
                dir.display()
            );
            false
        }
        Ok((mesh, snapshot)) => {
            println!(
                "{}: ok ({} service(s), {} gateway(s), {} node(s))",
                dir.display(),
                mesh.services().len(),
                mesh.gateways().len(),
                snapshot.nodes.len()
            );
            true
        }
        Err(errors) => {
            eprintln!("{}: invalid mesh:\n{errors}", dir.display());
            false
        }
    }
}

fn validate_proxy_file(file: &Path) -> bool {
    match Config::from_file(file) {
        Ok(_) => {
            println!("{}: ok", file.display());
            true
        }
        Err(error) => {
            eprintln!("{error}");
            false
        }
    }
}
