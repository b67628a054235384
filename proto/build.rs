//! Compiles every `.proto` file under `proto/` into prost messages and tonic
//! clients and servers.
//!
//! The compiler is `protox`, written in Rust, so that building the workspace
//! needs no system `protoc`. New proto packages (the xDS API) are picked up by
//! dropping their files under `proto/`; imports resolve relative to it.

use std::path::{Path, PathBuf};
use std::{fs, io};

const PROTO_ROOT: &str = "proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(PROTO_ROOT);
    let mut files = Vec::new();
    collect_protos(root, &mut files)?;
    // Sorted so that the generated code does not depend on directory order.
    files.sort();

    // Re-run when any file or directory below the root changes (a new
    // `.proto` file changes its directory's mtime).
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let fds = protox::compile(&files, [root])?;
    tonic_prost_build::configure()
        // `bytes` fields become `bytes::Bytes`: payloads are cloned by
        // reference count instead of copied.
        .bytes(".")
        // Callers bring their own channel (any tower service); the crate does
        // not pull in tonic's transport.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}

/// Appends every `.proto` file below `dir` to `out`, recursively.
fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
