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
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::authority::Authority;

use crate::cache::{SnapshotCache, SnapshotRefused};
use crate::mesh::MeshErrors;
use crate::watch::{self, MeshUpdate, WatchHandle};
use crate::xds::{Auth, IdentityOptions, Server, ServerError, ServerOptions, XdsLimits};

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
    /// Where the CA that signs workload certificates comes from; needed
    /// when the mesh has a `trust_domain`.
    pub ca: Option<CaSource>,
    /// The trust bundle pushed to proxies, when it is more than the CA's
    /// root (`--trust-bundle`; during a CA rotation).
    pub trust_bundle: Option<PathBuf>,
    /// The lifetime of workload certificates (and the longest a proxy may
    /// ask for).
    pub svid_ttl: Duration,
    /// Accept per-node tokens (`weft-cp token issue`), whose key lives in
    /// this state directory.
    pub node_tokens_dir: Option<PathBuf>,
    /// Refuse the mesh-wide token on the xDS and identity APIs.
    pub require_node_tokens: bool,
}

/// Where the control plane's CA comes from.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// Created on first start in this state directory, for the mesh's
    /// trust domain, and loaded from it afterwards.
    StateDir(PathBuf),
    /// An operator's CA: its certificate (then its chain) and key.
    Files {
        /// The CA certificate file.
        cert: PathBuf,
        /// The CA key file.
        key: PathBuf,
    },
}

/// The default lifetime of workload certificates.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(24 * 3600);

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
    /// The mesh has a trust domain but there is no CA for it.
    #[error(
        "{dir}: the mesh's trust_domain {trust_domain:?} needs a CA: pass --state-dir DIR (created there on first start) or --ca-cert FILE --ca-key FILE"
    )]
    NoCa {
        /// The directory.
        dir: String,
        /// The mesh's trust domain.
        trust_domain: String,
    },
    /// The CA could not be loaded or created, or signs for another domain.
    #[error("certificate authority")]
    Ca(#[from] crate::ca::CaError),
}

/// A running control plane: the server and the directory watcher.
#[derive(Debug)]
pub struct ControlPlane {
    server: Server,
    watcher: WatchHandle,
    /// Polls the CA and trust bundle files.
    trust_reload: Option<tokio::task::JoinHandle<()>>,
}

impl ControlPlane {
    /// Loads the directory, starts serving it, and starts watching it.
    pub async fn start(options: ServeOptions) -> Result<Self, ServeError> {
        let cache = SnapshotCache::new();
        // The trust domain the CA signs for, once known: a mesh change to
        // another one is rejected (a new domain needs a new CA).
        let pinned_domain: Arc<OnceLock<Option<String>>> = Arc::new(OnceLock::new());
        let watched_domain = Arc::clone(&pinned_domain);
        // The watcher's first poll is the initial load: it decides whether
        // the control plane starts. Later updates replace the snapshot or
        // record why they were rejected.
        let (first_tx, first_rx) =
            tokio::sync::oneshot::channel::<Result<(usize, Option<String>), ServeError>>();
        let mut first = Some(first_tx);
        let updates = cache.clone();
        let allow_empty = options.allow_empty;
        let dir = options.config_dir.display().to_string();
        let watched_dir = dir.clone();
        let watcher = watch::spawn(
            options.config_dir.clone(),
            options.poll_interval,
            move |update| match update {
                MeshUpdate::Loaded(snapshot)
                    if watched_domain
                        .get()
                        .is_some_and(|pinned| *pinned != snapshot.trust_domain) =>
                {
                    let message = format!(
                        "{watched_dir}: trust_domain {:?} differs from {:?}, which this control plane started with; \
                         changing the trust domain needs a restart (and a CA for it)",
                        snapshot.trust_domain,
                        watched_domain.get().cloned().flatten(),
                    );
                    tracing::warn!(%message, "mesh change rejected; serving the last good state");
                    updates.set_config_error(Some(message));
                }
                MeshUpdate::Loaded(snapshot) => {
                    let nodes = snapshot.nodes.len();
                    let domain = snapshot.trust_domain.clone();
                    let applied = if allow_empty {
                        updates.set(snapshot);
                        Ok(())
                    } else {
                        updates.set_checked(snapshot)
                    };
                    match (applied, first.take()) {
                        (Ok(()), Some(first)) => {
                            let _ = watched_domain.set(domain.clone());
                            let _ = first.send(Ok((nodes, domain)));
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
        let trust_domain = match first_rx.await {
            Ok(Ok((nodes, trust_domain))) => {
                tracing::info!(%dir, nodes, trust_domain, "mesh loaded");
                trust_domain
            }
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(ServeError::Watch(std::io::Error::other(
                    "the directory watcher stopped before its first load",
                )));
            }
        };
        let authority = load_ca(
            &dir,
            options.ca.as_ref(),
            options.trust_bundle.as_ref(),
            trust_domain.as_deref(),
        )?
        .map(Arc::new);
        let xds_tls = match &authority {
            Some(authority) => Some(Arc::new(crate::xds::XdsTls::new(Arc::clone(authority))?)),
            None => None,
        };
        let trust_reload = authority.as_ref().map(|authority| {
            cache.set_trust_bundle(authority.trust_bundle());
            tokio::spawn(reload_trust(
                Arc::clone(authority),
                xds_tls.clone(),
                cache.clone(),
                options.poll_interval,
            ))
        });
        let identity = authority.map(|authority| IdentityOptions {
            authority,
            ttl: options.svid_ttl,
            xds_tls,
        });
        let node_tokens = match &options.node_tokens_dir {
            Some(dir) => {
                let mut tokens = crate::xds::NodeTokens::load_or_create(dir)?;
                tokens.require = options.require_node_tokens;
                Some(tokens)
            }
            None => None,
        };
        let server = Server::start(ServerOptions {
            xds_addr: options.xds_addr,
            admin_addr: options.admin_addr,
            auth: options.auth,
            cache,
            drain_timeout: options.drain_timeout,
            limits: options.limits,
            identity,
            node_tokens,
        })
        .await?;
        Ok(Self {
            server,
            watcher,
            trust_reload,
        })
    }

    /// The server (addresses, cache, status).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Stops watching, then drains the server.
    pub async fn shutdown(self) {
        drop(self.watcher);
        if let Some(task) = self.trust_reload {
            task.abort();
        }
        self.server.shutdown().await;
    }
}

/// The CA for the mesh's trust domain: loaded or created from the state
/// directory, or the operator's (which must sign for that domain).
/// Without a trust domain there is nothing to sign (an operator's CA is
/// still checked, so that a typo is found now).
fn load_ca(
    dir: &str,
    source: Option<&CaSource>,
    bundle: Option<&PathBuf>,
    trust_domain: Option<&str>,
) -> Result<Option<Authority>, ServeError> {
    let ca = match (source, trust_domain) {
        (None, None) => return Ok(None),
        (None, Some(domain)) => {
            return Err(ServeError::NoCa {
                dir: dir.to_owned(),
                trust_domain: domain.to_owned(),
            });
        }
        (Some(CaSource::StateDir(_)), None) => {
            tracing::warn!(%dir, "the mesh has no trust_domain: workloads have no identity and calls are cleartext");
            return Ok(None);
        }
        (Some(source @ CaSource::StateDir(_)), Some(domain)) => {
            Authority::load(source.clone(), bundle.cloned(), domain)?
        }
        (Some(source @ CaSource::Files { cert, key }), domain) => {
            let ca = crate::ca::Ca::from_files(cert, key)?;
            if let Some(domain) = domain
                && ca.trust_domain() != domain
            {
                return Err(crate::ca::CaError::Identity(format!(
                    "{}: the CA signs for trust domain {:?}, the mesh's is {domain:?}",
                    cert.display(),
                    ca.trust_domain()
                ))
                .into());
            }
            let Some(domain) = domain else {
                tracing::warn!(%dir, "the mesh has no trust_domain: workloads have no identity and calls are cleartext");
                return Ok(None);
            };
            Authority::load(source.clone(), bundle.cloned(), domain)?
        }
    };
    tracing::info!(
        trust_domain = ca.trust_domain(),
        signer = %ca.current().signer,
        "certificate authority loaded"
    );
    Ok(Some(ca))
}

/// Applies changes of the CA and trust bundle files, checked every
/// `interval`: a new bundle (or signer) reaches every proxy with an
/// identity; a change that does not load is logged and shown in
/// `/status`, and the last good state keeps serving.
async fn reload_trust(
    authority: Arc<Authority>,
    xds_tls: Option<Arc<crate::xds::XdsTls>>,
    cache: SnapshotCache,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let checked = Arc::clone(&authority);
        let tls = xds_tls.clone();
        let reloaded = tokio::task::spawn_blocking(move || {
            let changed = checked.reload_if_changed();
            // The xDS port's own certificate follows the CA, and is
            // re-issued at half life.
            if let Some(Err(error)) = tls.map(|tls| tls.refresh_if_due()) {
                tracing::error!(%error, "cannot re-issue the xDS port's certificate");
            }
            changed
        });
        match reloaded.await {
            Ok(Ok(true)) => cache.set_trust_bundle(authority.trust_bundle()),
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                let message = format!("certificate authority: {error}");
                tracing::error!(%message, "CA or trust bundle change refused; the last good one keeps serving");
                cache.set_trust_error(Some(message));
            }
            Err(error) => {
                tracing::error!(%error, "the CA reload task failed; CA and trust bundle changes are no longer picked up");
                return;
            }
        }
    }
}
