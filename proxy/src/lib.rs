//! Weft's data plane: an L4/L7 proxy for sidecars and gateways.
//!
//! [`Proxy::start`] takes a validated [`config::Config`], binds every
//! listener and the admin server, and serves until [`Proxy::shutdown`].
//! The binary (`main.rs`) only parses flags, builds the worker and control
//! runtimes and calls this.

pub mod cli;
pub mod config;
pub mod drain;
pub mod identity;
pub mod reload;
pub mod telemetry;
pub mod xds;

mod admin;
mod body;
mod clock;
mod cluster;
mod error;
mod fault;
mod http;
mod kept;
mod listener;
mod made;
pub mod policy;
mod resilience;
mod rng;
mod stack;
mod tcp;
mod tls;
mod transport;
mod wire;

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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::cluster::ClusterRegistry;
use crate::config::Config;
use crate::drain::Drain;
use crate::identity::Identities;
use crate::listener::ListenerSet;
use crate::telemetry::{AccessLog, Metrics};

pub use crate::listener::BindError;

/// Marks the calling thread as a worker's: it keeps its requests' deadline
/// timers for the next requests instead of making one each. Call it on
/// each thread of the worker runtime (its `on_thread_start`), or on the
/// thread that drives a current-thread worker runtime, and on no other: a
/// timer belongs to the runtime it was made on, and the thread must run
/// that runtime alone for the rest of its life.
pub fn worker_thread_started() {
    clock::keep_timers();
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Listener (or admin) addresses could not be bound.
    #[error("{}", display_all(.0))]
    Bind(Vec<BindError>),
    /// The access log could not be opened.
    #[error("access log: cannot open")]
    AccessLog(#[source] std::io::Error),
    /// The policy decision log could not be opened.
    #[error("decision log: cannot open")]
    DecisionLog(#[source] std::io::Error),
    /// The runtime shut down while the proxy was starting.
    #[error("shutting down")]
    ShuttingDown,
}

/// Why a new configuration was not applied; the previous one keeps
/// serving.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// New listeners could not be bound (an address in use, say).
    #[error("{}", display_all(.0))]
    Bind(Vec<BindError>),
    /// The process is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

fn display_all(errors: &[BindError]) -> String {
    errors
        .iter()
        .map(|e| match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
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
    handle: ConfigHandle,
    addresses: BoundAddresses,
    drain_timeout: std::time::Duration,
    drain_delay: std::time::Duration,
}

/// Applies new configurations to a running proxy; cheap to clone. The xDS
/// client holds one.
#[derive(Debug, Clone)]
pub struct ConfigHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: stack::Shared,
    /// Long-lived cluster state that each snapshot reconciles against.
    registry: ClusterRegistry,
    metrics: Arc<Metrics>,
    access_log: Option<AccessLog>,
    /// The policy decision log, if configured (at start; not reloaded).
    decision_log: Option<policy::DecisionLog>,
    /// Span exporters, shared by listeners with equal settings.
    traces: Arc<telemetry::trace::Exporters>,
    /// The metrics exporter of the configuration serving, if it has one.
    metrics_export: Mutex<Option<telemetry::metrics_export::MetricsExporter>>,
    /// What it exports: the `/metrics` text.
    render: telemetry::metrics_export::Render,
    /// Where the exporter runs.
    control: tokio::runtime::Handle,
    /// The start of every exported series.
    started: std::time::SystemTime,
    /// Held across a whole apply (binding, building, publishing), so that
    /// applies never interleave.
    listeners: tokio::sync::Mutex<ListenerSet>,
    drain: Drain,
    /// Where listeners accept and connections run.
    workers: tokio::runtime::Handle,
    ready: Arc<AtomicBool>,
    /// Set by the shutdown signal, before the drain delay: `/ready` says
    /// `draining` while listeners still accept.
    stopping: Arc<AtomicBool>,
    /// What the xDS client reports for `/config_dump`, if it runs.
    xds_status: Arc<Mutex<Option<serde_json::Value>>>,
    /// Workload certificates and trust bundles (mesh mTLS).
    identities: Arc<Identities>,
}

/// When the proxy reports ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// As soon as the configuration given to [`Proxy::start`] serves.
    Immediate,
    /// Once [`ConfigHandle::set_ready`] is called (by the xDS client, after
    /// its first complete configuration).
    Deferred,
}

impl Inner {
    /// Runs the exporter `settings` asks for: the running one when they
    /// are unchanged, a new one when they changed, none without.
    fn export_metrics(&self, settings: Option<&Arc<config::MetricsExport>>) {
        let mut running = self
            .metrics_export
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (running.as_ref(), settings) {
            (Some(exporter), Some(settings)) if exporter.settings == *settings => {}
            (_, None) => *running = None,
            (_, Some(settings)) => {
                *running = Some(telemetry::metrics_export::MetricsExporter::start(
                    &self.control,
                    settings.clone(),
                    self.render.clone(),
                    self.metrics.clone(),
                    self.started,
                ));
            }
        }
    }
}

impl Proxy {
    /// Binds and starts serving `config`. Call it on the worker runtime
    /// (listeners and connections run where this is polled); `control` runs
    /// the admin server, DNS refresh and configuration work.
    pub async fn start(
        config: Config,
        control: tokio::runtime::Handle,
        readiness: Readiness,
    ) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let access_log = config
            .access_log
            .as_ref()
            .map(|target| AccessLog::start(target, config.access_log_template.clone()))
            .transpose()
            .map_err(StartError::AccessLog)?;
        let decision_log = config
            .decision_log
            .as_ref()
            .map(policy::DecisionLog::start)
            .transpose()
            .map_err(StartError::DecisionLog)?;
        let identities = Identities::new();
        let registry = ClusterRegistry::new(metrics.clone(), identities.clone(), control.clone());
        let drain = Drain::new();
        let admin_socket = match config.admin {
            Some(address) => {
                let bound = listener::bind("admin", address).and_then(|socket| {
                    let local = socket.local_addr().map_err(|source| BindError {
                        listener: "admin".into(),
                        address,
                        source,
                    })?;
                    Ok((socket, local))
                });
                Some(bound.map_err(|error| StartError::Bind(vec![error]))?)
            }
            None => None,
        };
        let empty = Arc::new(Config::empty());
        let snapshot = stack::build(
            empty,
            &[],
            HashMap::new(),
            &metrics,
            &identities,
            &stack::Logs::default(),
            None,
        );
        let stopping = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        // What `metrics_export` pushes: what `/metrics` shows.
        let render = {
            let (metrics, identities) = (metrics.clone(), identities.clone());
            let (access_log, decision_log) = (access_log.clone(), decision_log.clone());
            telemetry::metrics_export::Render(Arc::new(move || {
                admin::exposition(
                    &metrics,
                    &identities,
                    access_log.as_ref(),
                    decision_log.as_ref(),
                    telemetry::Format::Prometheus,
                )
            }))
        };
        let handle = ConfigHandle {
            inner: Arc::new(Inner {
                shared: Arc::new(ArcSwap::from_pointee(snapshot)),
                registry,
                metrics: metrics.clone(),
                access_log,
                decision_log: decision_log.clone(),
                traces: Arc::new(telemetry::trace::Exporters::new(
                    control.clone(),
                    metrics.trace.clone(),
                )),
                metrics_export: Mutex::new(None),
                render,
                control: control.clone(),
                started: std::time::SystemTime::now(),
                listeners: tokio::sync::Mutex::new(ListenerSet::default()),
                drain: drain.clone(),
                workers: tokio::runtime::Handle::current(),
                ready: ready.clone(),
                stopping: stopping.clone(),
                xds_status: Arc::new(Mutex::new(None)),
                identities: identities.clone(),
            }),
        };
        let drain_timeout = config.drain_timeout;
        let drain_delay = config.drain_delay;
        let source = config.source.clone();
        let admin_token = config.admin_token.clone();
        let counts = (
            config.listeners.len(),
            config.route_configs.len(),
            config.clusters.len(),
        );
        tokio::spawn(clock::keep_a_timer_pending());
        let listeners = match handle.apply(config).await {
            Ok(listeners) => listeners,
            Err(ApplyError::Bind(errors)) => return Err(StartError::Bind(errors)),
            Err(ApplyError::ShuttingDown) => return Err(StartError::ShuttingDown),
        };
        if readiness == Readiness::Immediate {
            tracing::info!(
                %source,
                listeners = counts.0,
                route_configs = counts.1,
                clusters = counts.2,
                "configuration applied"
            );
        }
        let admin_address = admin_socket.as_ref().map(|(_, address)| *address);
        if let Some((socket, address)) = admin_socket {
            tracing::info!(%address, "admin listening");
            if !address.ip().is_loopback() {
                // /config_dump, /clusters and /metrics tell an attacker a
                // great deal; beyond loopback, a token is the least.
                tracing::warn!(
                    %address,
                    token = admin_token.is_some(),
                    "admin API reachable beyond loopback; set admin.token_file (or --admin-token-file)"
                );
            }
            let state = admin::AdminState {
                shared: handle.inner.shared.clone(),
                metrics,
                ready: ready.clone(),
                stopping,
                drain,
                xds_status: handle.inner.xds_status.clone(),
                token: admin_token.map(|t| Arc::from(t.0.as_bytes())),
                identities: identities.clone(),
                access_log: handle.inner.access_log.clone(),
                decision_log,
            };
            control.spawn(admin::serve(socket, state));
        }
        if readiness == Readiness::Immediate {
            ready.store(true, Relaxed);
        }
        Ok(Self {
            addresses: BoundAddresses {
                admin: admin_address,
                listeners,
            },
            handle,
            drain_timeout,
            drain_delay,
        })
    }
    /// What was bound at start.
    pub fn addresses(&self) -> &BoundAddresses {
        &self.addresses
    }

    /// A handle that applies new configurations.
    pub fn handle(&self) -> ConfigHandle {
        self.handle.clone()
    }

    /// Drains: readiness turns false at once; listeners keep accepting for
    /// the drain delay (so that an orchestrator that routes by readiness
    /// stops sending before the port closes); then listeners stop
    /// accepting and connections close gracefully, for at most the drain
    /// timeout. Returns the number of tasks still running at the deadline.
    pub async fn shutdown(self) -> usize {
        let inner = &self.handle.inner;
        inner.stopping.store(true, Relaxed);
        if !self.drain_delay.is_zero() {
            tracing::info!(delay = ?self.drain_delay, "not ready; still accepting before the drain");
            tokio::time::sleep(self.drain_delay).await;
        }
        tracing::info!(timeout = ?self.drain_timeout, "draining");
        let drain = &inner.drain;
        drain.signal();
        let remaining = drain.wait(self.drain_timeout).await;
        if remaining > 0 {
            tracing::warn!(remaining, "drain deadline passed; closing what remains");
        } else {
            tracing::info!("drained");
        }
        remaining
    }
}

impl ConfigHandle {
    /// Applies a validated configuration: binds listeners that are new,
    /// builds a snapshot (reusing the state of unchanged clusters),
    /// publishes it, then starts the new listeners and drains the removed
    /// ones. In-flight requests finish on the snapshot they started with,
    /// and open connections stay open on listeners that remain.
    ///
    /// Opens the access and decision log files again (SIGHUP, after a
    /// rotation moved them away): each writer does so before its next line.
    pub fn reopen_logs(&self) {
        if let Some(log) = &self.inner.access_log {
            log.reopen();
        }
        if let Some(log) = &self.inner.decision_log {
            log.reopen();
        }
    }

    /// Only the data-plane resources (listeners, route configurations,
    /// clusters) change; `admin`, `access_log` and `drain_timeout` keep
    /// their values from the start. On error nothing changed. Returns each
    /// listener's name and bound address.
    pub async fn apply(&self, config: Config) -> Result<Vec<(String, SocketAddr)>, ApplyError> {
        let inner = &*self.inner;
        // Resolving new DNS names (bounded by `cluster::DNS_TIMEOUT`) happens
        // before the listener lock: a slow resolver holds up this change
        // only, not the next one's binding nor anything else behind the lock.
        let clusters = inner.registry.prepare(&config.clusters).await;
        let mut listeners = inner.listeners.lock().await;
        let plan = listeners
            .prepare(&config.listeners)
            .map_err(ApplyError::Bind)?;
        let config = Arc::new(config);
        let clusters = inner.registry.commit(clusters);
        // Building is CPU work (route tables, regexes, every route's stack):
        // off the control runtime's thread, so that a large configuration
        // does not stall the admin server or the xDS stream.
        let snapshot = {
            let config = config.clone();
            let slots = plan.slots.clone();
            let metrics = inner.metrics.clone();
            let logs = stack::Logs {
                access: inner.access_log.clone(),
                decisions: inner.decision_log.clone(),
                traces: Some(inner.traces.clone()),
            };
            let identities = inner.identities.clone();
            // Listeners are locked: no other change can publish meanwhile.
            let previous = inner.shared.load_full();
            let build = move || {
                stack::build(
                    config,
                    &slots,
                    clusters,
                    &metrics,
                    &identities,
                    &logs,
                    Some(&previous),
                )
            };
            match tokio::task::spawn_blocking(build).await {
                Ok(snapshot) => snapshot,
                Err(error) => match error.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    Err(_) => return Err(ApplyError::ShuttingDown),
                },
            }
        };
        let bound = snapshot
            .bound
            .iter()
            .map(|(name, address)| (name.to_string(), *address))
            .collect();
        inner
            .identities
            .set_configured_bundles(&config.trust_bundles);
        inner.shared.store(Arc::new(snapshot));
        listeners.commit(
            plan,
            &config.listeners,
            &inner.shared,
            &inner.drain,
            &inner.workers,
        );
        inner.identities.set_wanted(config.workload_identities());
        inner.export_metrics(config.metrics_export.as_ref());
        let pruned = inner.metrics.prune();
        if pruned > 0 {
            tracing::debug!(pruned, "metric series of removed resources dropped");
        }
        // One xDS push is several applies (clusters, then routes, then
        // listeners): the xDS client says once at info that a push landed.
        tracing::debug!(
            source = %config.source,
            listeners = config.listeners.len(),
            route_configs = config.route_configs.len(),
            clusters = config.clusters.len(),
            "configuration applied"
        );
        Ok(bound)
    }

    /// The configuration now serving.
    pub(crate) fn current_config(&self) -> Arc<Config> {
        self.inner.shared.load().config.clone()
    }

    /// The proxy's metrics.
    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// The workload certificates and trust bundles this proxy holds.
    pub fn identities(&self) -> Arc<Identities> {
        self.inner.identities.clone()
    }

    /// Marks the proxy ready (`/ready` answers 200 unless draining).
    pub fn set_ready(&self) {
        self.inner.ready.store(true, Relaxed);
    }

    /// Publishes the xDS client's state for `/config_dump`.
    pub(crate) fn set_xds_status(&self, status: serde_json::Value) {
        *self
            .inner
            .xds_status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(status);
    }

    /// The process's drain signal.
    pub fn drain(&self) -> Drain {
        self.inner.drain.clone()
    }
}
