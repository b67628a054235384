//! Weft's control plane: reads the mesh's desired state, builds each
//! proxy's resources, and streams them over xDS.
//!
//! - [`mesh`]: the mesh model (a directory of YAML files), its validation
//!   and the per-node resource builder.
//! - [`watch`]: polls a mesh directory and reports each new snapshot (or
//!   why a change was rejected).
//! - [`resources`]: the resources one proxy should have, versioned by
//!   content; the value every other module passes around.
//! - [`cache`]: the latest mesh snapshot, with a per-node change signal.
//! - [`xds`]: the aggregated discovery service (state of the world and
//!   delta), its authentication, and the server's lifecycle.
//! - `admin`: the admin HTTP API (`/status`, `/metrics`, `/ready`), started
//!   by [`xds::Server`].
//! - [`status`]: the status report's types, its client and its table.
//! - [`serve`]: `weft-cp serve`, the server fed by a watched directory.
//! - [`demo`]: `weft-cp demo`, a whole mesh on loopback.

mod admin;
pub mod cache;
pub mod demo;
pub mod mesh;
pub mod resources;
pub mod serve;
pub mod status;
pub mod watch;
pub mod xds;

/// Logs to stderr with `filter` (or `RUST_LOG`, or `info`).
pub fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::try_new(f),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    }
    .unwrap_or_else(|_| EnvFilter::new("info"));
    // A second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the control plane");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
