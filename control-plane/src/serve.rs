//! `weft-cp serve`: the xDS server fed by a watched mesh directory.
//!
//! The directory must load when the control plane starts (there is no last
//! good state to fall back to yet). After that, every change the watcher
//! sees is validated as a whole: a valid one replaces every node's
//! resources (and reaches the proxies whose resources changed), an invalid
//! one is logged and shown in `/status`, and the last good snapshot keeps
//! being served.
//!
//! An empty mesh, or a change that would remove every listener of a proxy
//! connected now, is refused the same way (and logged at `error`: an
//! operator must act), unless [`ServeOptions::allow_empty`] says it is
//! meant. Both are what an unmounted volume or a bad deploy looks like, and
//! applying them would tear the mesh's listeners down within a second. At
//! start, an empty mesh stops the control plane from starting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cache::{SnapshotCache, SnapshotRefused};
use crate::mesh::MeshErrors;
use crate::watch::{self, MeshUpdate, WatchHandle};
use crate::xds::{Auth, Server, ServerError, ServerOptions, XdsLimits};

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
    /// Apply an empty mesh, or a change that removes every listener of a
    /// connected proxy, instead of refusing it (`--allow-empty`).
    pub allow_empty: bool,
    /// Connection limits and deadlines of the xDS server.
    pub limits: XdsLimits,
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
    /// The mesh loads but is refused (see [`ServeOptions::allow_empty`]).
    #[error("{dir}: {reason}; refusing to start (pass --allow-empty to serve it anyway)")]
    Refused {
        /// The directory.
        dir: String,
        /// Why.
        reason: SnapshotRefused,
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
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<usize, ServeError>>();
        let mut first = Some(first_tx);
        let updates = cache.clone();
        let allow_empty = options.allow_empty;
        let dir = options.config_dir.display().to_string();
        let watched_dir = dir.clone();
        let watcher = watch::spawn(
            options.config_dir.clone(),
            options.poll_interval,
            move |update| match update {
                MeshUpdate::Loaded(snapshot) => {
                    let nodes = snapshot.nodes.len();
                    let applied = if allow_empty {
                        updates.set(snapshot);
                        Ok(())
                    } else {
                        updates.set_checked(snapshot)
                    };
                    match (applied, first.take()) {
                        (Ok(()), Some(first)) => {
                            let _ = first.send(Ok(nodes));
                        }
                        (Ok(()), None) => {}
                        (Err(reason), Some(first)) => {
                            let _ = first.send(Err(ServeError::Refused {
                                dir: watched_dir.clone(),
                                reason,
                            }));
                        }
                        (Err(reason), None) => {
                            tracing::error!(
                                dir = %watched_dir,
                                %reason,
                                hint = "start weft-cp serve with --allow-empty if this is meant",
                                "mesh change refused; serving the last good state"
                            );
                            updates.set_config_error(Some(format!(
                                "{watched_dir}: {reason} (refused; start weft-cp serve with --allow-empty if this is meant)"
                            )));
                        }
                    }
                }
                MeshUpdate::Rejected(errors) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(Err(ServeError::Mesh {
                            dir: watched_dir.clone(),
                            errors,
                        }));
                        return;
                    }
                    tracing::warn!(%errors, "mesh change rejected; serving the last good state");
                    updates.set_config_error(Some(errors.to_string()));
                }
            },
        )
        .map_err(ServeError::Watch)?;
        match first_rx.await {
            Ok(Ok(nodes)) => tracing::info!(%dir, nodes, "mesh loaded"),
            Ok(Err(error)) => return Err(error),
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
            limits: options.limits,
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
