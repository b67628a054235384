//! `weft-cp`: the control plane's command line. For now it validates mesh
//! directories and proxy configuration files; `serve`, `status` and `demo`
//! arrive with the xDS server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weft_cp::mesh;
use weft_proxy::config::Config;

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Validate { paths } => validate(&paths),
    }
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
