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
use weft_cp::xds::Auth;
use weft_cp::{mesh, status};
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
    /// A file holding the bootstrap token proxies and operators present.
    #[arg(long, value_name = "FILE", required_unless_present = "insecure")]
    token_file: Option<PathBuf>,
    /// Accept every client without a token (local experiments only).
    #[arg(long, conflicts_with = "token_file")]
    insecure: bool,
    /// How often the directory is checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
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
        Command::Validate { paths } => validate(&paths),
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

fn validate(paths: &[PathBuf]) -> ExitCode {
    let mut failed = 0;
    for path in paths {
        let ok = if path.is_dir() {
            validate_mesh(path)
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

fn validate_mesh(dir: &Path) -> bool {
    let built = mesh::load_dir(dir).and_then(|mesh| {
        let snapshot = mesh.snapshot()?;
        Ok((mesh, snapshot))
    });
    match built {
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
