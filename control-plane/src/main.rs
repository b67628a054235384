//! `weft-cp`: the control plane's command line. `validate` checks proxy
//! configuration files with the proxy's own validator; `status` shows what
//! a running control plane serves and what each proxy acknowledged.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft_cp::status;
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
    /// Check proxy configuration files (or every .yaml/.yml file in a
    /// directory) and report each problem with its resource and field.
    Validate {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
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

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Validate { paths } => validate(&paths),
        Command::Status {
            admin,
            token_file,
            json,
        } => match show_status(admin, token_file.as_deref(), json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::from(1)
            }
        },
    }
}

fn show_status(
    admin: SocketAddr,
    token_file: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    let token = token_file
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))
                .map(|token| token.trim().to_owned())
        })
        .transpose()?;
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
        print!("{}", status::render_table(&report));
    }
    Ok(())
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                        .collect();
                    found.sort();
                    files.extend(found);
                }
                Err(error) => {
                    eprintln!("{}: {error}", path.display());
                    return ExitCode::from(1);
                }
            }
        } else {
            files.push(path.clone());
        }
    }
    let mut failed = 0;
    for file in &files {
        match Config::from_file(file) {
            Ok(_) => println!("{}: ok", file.display()),
            Err(error) => {
                failed += 1;
                eprintln!("{error}");
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} file(s) invalid", files.len());
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
