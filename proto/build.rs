//! Compiles every `.proto` file under `proto/` into prost messages and tonic
//! clients and servers.
//!
//! The compiler is `protox`, written in Rust, so that building the workspace
//! needs no system `protoc`. New proto packages (the xDS API) are picked up by
//! dropping their files under `proto/`; imports resolve relative to it, and the
//! well-known types (`google/protobuf/*.proto`) ship with protox and map to
//! `prost-types`.

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

    let mut config = tonic_prost_build::Config::new();
    // Every message implements `prost::Name`, whose type URL is the one xDS
    // puts in `google.protobuf.Any` (`type.googleapis.com/<full name>`).
    config
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com");
    tonic_prost_build::configure()
        // `bytes` fields become `bytes::Bytes`: payloads are cloned by
        // reference count instead of copied.
        .bytes(".")
        // Map fields become `BTreeMap`s, which encode in key order: the same
        // message always encodes to the same bytes, so a version derived from
        // a resource's encoding only changes when the resource does.
        .btree_map(".")
        // Callers bring their own channel (any tower service); the crate does
        // not pull in tonic's transport.
        .build_transport(false)
        .compile_fds_with_config(fds, config)?;
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
