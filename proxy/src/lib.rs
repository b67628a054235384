//! Weft's data plane: an L4/L7 proxy for sidecars and gateways.
//!
//! [`Proxy::start`] takes a validated [`config::Config`], binds every
//! listener and the admin server, and serves until [`Proxy::shutdown`].
//! The binary (`main.rs`) only parses flags, builds the worker and control
//! runtimes and calls this.

pub mod config;
pub mod drain;
pub mod telemetry;

mod admin;
mod cluster;
mod http;
mod listener;
mod resilience;
mod stack;
mod tcp;

/// Hot-path building blocks, public only so that the criterion
/// micro-benchmarks in `benches/` can measure them. Not a stable API.
#[doc(hidden)]
pub mod hotpath {
    pub use crate::cluster::Balancer;
    pub use crate::http::headers::{
        add_forwarded, apply as apply_header_ops, ensure_request_id, is_upgrade_request,
        strip_hop_by_hop,
    };
    pub use crate::http::router::{RequestParts, RouteTable};
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use arc_swap::ArcSwap;

use crate::cluster::ClusterRegistry;
use crate::config::{Config, ListenerKind};
use crate::drain::Drain;
use crate::telemetry::{AccessLog, Metrics};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener's address could not be bound.
    #[error("listener {listener:?}: cannot bind {address}")]
    Bind {
        /// Listener name (`admin` for the admin server).
        listener: String,
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The access log could not be opened.
    #[error("access log: cannot open")]
    AccessLog(#[source] std::io::Error),
}

/// Addresses the proxy actually bound (port 0 resolved).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BoundAddresses {
    /// The admin server, if configured.
    pub admin: Option<SocketAddr>,
    /// Each listener by name, in configuration order.
    pub listeners: Vec<(String, SocketAddr)>,
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    drain: Drain,
    /// Long-lived cluster state that later snapshots reconcile against.
    _registry: ClusterRegistry,
    addresses: BoundAddresses,
    drain_timeout: std::time::Duration,
}

impl Proxy {
    /// Binds and starts serving. Call it on the worker runtime (listeners
    /// and connections run where this is polled); `control` runs the admin
    /// server and DNS refresh.
    pub async fn start(
        config: Config,
        control: tokio::runtime::Handle,
    ) -> Result<Self, StartError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let access_log = config
            .access_log
            .as_ref()
            .map(AccessLog::start)
            .transpose()
            .map_err(StartError::AccessLog)?;
        let registry = ClusterRegistry::new(metrics.clone(), control.clone());
        let drain = Drain::new();

        let mut bound = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            let socket = tokio::net::TcpListener::bind(listener.address)
                .await
                .map_err(|source| StartError::Bind {
                    listener: listener.name.to_string(),
                    address: listener.address,
                    source,
                })?;
            let address = socket.local_addr().map_err(|source| StartError::Bind {
                listener: listener.name.to_string(),
                address: listener.address,
                source,
            })?;
            bound.push((socket, address));
        }
        let admin_socket = match config.admin {
            Some(address) => {
                let bind = |source| StartError::Bind {
                    listener: "admin".into(),
                    address,
                    source,
                };
                let socket = std::net::TcpListener::bind(address).map_err(bind)?;
                socket.set_nonblocking(true).map_err(bind)?;
                let local = socket.local_addr().map_err(bind)?;
                Some((socket, local))
            }
            None => None,
        };

        let snapshot = stack::build(config.clone(), &registry, &metrics, access_log.as_ref()).await;
        let shared = Arc::new(ArcSwap::from_pointee(snapshot));
        let addresses = BoundAddresses {
            admin: admin_socket.as_ref().map(|(_, a)| *a),
            listeners: config
                .listeners
                .iter()
                .zip(&bound)
                .map(|(l, (_, a))| (l.name.to_string(), *a))
                .collect(),
        };
        for (index, ((socket, address), listener)) in
            bound.into_iter().zip(&config.listeners).enumerate()
        {
            let kind = match listener.kind {
                ListenerKind::Http { .. } => "http",
                ListenerKind::Tcp { .. } => "tcp",
            };
            tracing::info!(listener = %listener.name, %address, kind, "listening");
            drain.spawn(listener::accept_loop(
                socket,
                index,
                shared.clone(),
                drain.clone(),
                listener.max_connections,
            ));
        }
        let ready = Arc::new(AtomicBool::new(false));
        if let Some((socket, address)) = admin_socket {
            tracing::info!(%address, "admin listening");
            let state = admin::AdminState {
                shared,
                metrics,
                ready: ready.clone(),
                drain: drain.clone(),
                listeners: Arc::new(addresses.listeners.clone()),
            };
            control.spawn(admin::serve(socket, state));
        }
        ready.store(true, Relaxed);
        Ok(Self {
            drain,
            addresses,
            drain_timeout: config.drain_timeout,
            _registry: registry,
        })
    }

    /// What was bound.
    pub fn addresses(&self) -> &BoundAddresses {
        &self.addresses
    }

    /// Drains: readiness turns false, listeners stop accepting, connections
    /// close gracefully; waits at most the configured drain timeout.
    /// Returns the number of tasks still running at the deadline.
    pub async fn shutdown(self) -> usize {
        tracing::info!(timeout = ?self.drain_timeout, "draining");
        self.drain.signal();
        let remaining = self.drain.wait(self.drain_timeout).await;
        if remaining > 0 {
            tracing::warn!(remaining, "drain deadline passed; closing what remains");
        } else {
            tracing::info!("drained");
        }
        remaining
    }
}
