//! `weft-cp serve`: the xDS server fed by a watched mesh directory.
//!
//! The directory must load when the control plane starts (there is no last
//! good state to fall back to yet). After that, every change the watcher
//! sees is validated as a whole: a valid one replaces every node's
//! resources (and reaches the proxies whose resources changed), an invalid
//! one is logged and shown in `/status`, and the last good snapshot keeps
//! being served.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cache::SnapshotCache;
use crate::mesh::MeshErrors;
use crate::watch::{self, MeshUpdate, WatchHandle};
use crate::xds::{Auth, Server, ServerError, ServerOptions};

/// How to start a [`ControlPlane`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The mesh directory.
    pub config_dir: PathBuf,
    /// Where proxies connect.
    pub xds_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// Who may call the APIs.
    pub auth: Auth,
    /// How often the directory is checked for changes.
    pub poll_interval: Duration,
    /// How long shutdown waits for streams to end.
    pub drain_timeout: Duration,
}

/// Why the control plane did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The mesh directory does not load.
    #[error("{dir}: the mesh does not load:\n{errors}")]
    Mesh {
        /// The directory.
        dir: String,
        /// Every problem.
        errors: MeshErrors,
    },
    /// The server could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The watcher thread could not start.
    #[error("cannot start the directory watcher")]
    Watch(#[source] std::io::Error),
}

/// A running control plane: the server and the directory watcher.
#[derive(Debug)]
pub struct ControlPlane {
    server: Server,
    watcher: WatchHandle,
}

impl ControlPlane {
    /// Loads the directory, starts serving it, and starts watching it.
    pub async fn start(options: ServeOptions) -> Result<Self, ServeError> {
        let cache = SnapshotCache::new();
        // The watcher's first poll is the initial load: it decides whether
        // the control plane starts. Later updates replace the snapshot or
        // record why they were rejected.
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<usize, MeshErrors>>();
        let mut first = Some(first_tx);
        let updates = cache.clone();
        let watcher = watch::spawn(
            options.config_dir.clone(),
            options.poll_interval,
            move |update| match update {
                MeshUpdate::Loaded(snapshot) => {
                    let nodes = snapshot.nodes.len();
                    updates.set(snapshot);
                    if let Some(first) = first.take() {
                        let _ = first.send(Ok(nodes));
                    }
                }
                MeshUpdate::Rejected(errors) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(Err(errors));
                        return;
                    }
                    tracing::warn!(%errors, "mesh change rejected; serving the last good state");
                    updates.set_config_error(Some(errors.to_string()));
                }
            },
        )
        .map_err(ServeError::Watch)?;
        let dir = options.config_dir.display().to_string();
        match first_rx.await {
            Ok(Ok(nodes)) => tracing::info!(%dir, nodes, "mesh loaded"),
            Ok(Err(errors)) => return Err(ServeError::Mesh { dir, errors }),
            Err(_) => {
                return Err(ServeError::Watch(std::io::Error::other(
                    "the directory watcher stopped before its first load",
                )));
            }
        }
        let server = Server::start(ServerOptions {
            xds_addr: options.xds_addr,
            admin_addr: options.admin_addr,
            auth: options.auth,
            cache,
            drain_timeout: options.drain_timeout,
        })
        .await?;
        Ok(Self { server, watcher })
    }

    /// The server (addresses, cache, status).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Stops watching, then drains the server.
    pub async fn shutdown(self) {
        drop(self.watcher);
        self.server.shutdown().await;
    }
}
