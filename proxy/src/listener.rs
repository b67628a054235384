//! Accept loops, connection limits and protocol detection.
//!
//! A listener is bound once; each accepted connection is handed to the
//! HTTP server (`http::server`) or the L4 forwarder (`tcp`) according to
//! the listener's kind in the current snapshot. (Which HTTP version a
//! connection speaks is the transport's to find out, `transport::detect`:
//! from the first bytes in cleartext, from ALPN under TLS.)
//!
//! Invariants: at most `max_connections` connections per listener are
//! served at once (more wait in the kernel's accept queue); every
//! connection task is tracked by the drain.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::drain::Drain;
use crate::stack::{ListenerSnapshot, Shared};
use crate::telemetry::ConnectionGuard;
use crate::transport::Stream;

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("listener {listener:?}: cannot bind {address}")]
pub struct BindError {
    /// Listener name (`admin` for the admin server).
    pub listener: String,
    /// The configured address.
    pub address: SocketAddr,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// Binds a listening socket the way every Weft listener is bound:
/// `SO_REUSEADDR` (a listener re-created at the same address must not wait
/// for old connections' `TIME_WAIT`), a 1024-connection accept queue,
/// non-blocking.
pub(crate) fn bind(name: &str, address: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    let error = |source| BindError {
        listener: name.to_owned(),
        address,
        source,
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(error)?;
    socket.set_reuse_address(true).map_err(error)?;
    socket.bind(&address.into()).map_err(error)?;
    socket.listen(1024).map_err(error)?;
    socket.set_nonblocking(true).map_err(error)?;
    Ok(socket.into())
}

/// What identifies a listening socket across configurations: its address,
/// and for port 0 (any free port) also the listener's name, since two
/// listeners may both ask for port 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SocketKey {
    address: SocketAddr,
    name: Option<Arc<str>>,
}

impl SocketKey {
    fn of(listener: &crate::config::Listener) -> Self {
        Self {
            address: listener.address,
            name: (listener.address.port() == 0).then(|| listener.name.clone()),
        }
    }
}

/// A listening socket with its accept loop.
#[derive(Debug)]
struct Running {
    slot: usize,
    bound: SocketAddr,
    limit: Arc<Semaphore>,
    max_connections: u32,
    /// Signalled when a configuration no longer has this listener: the
    /// accept loop ends and its connections close gracefully.
    drain: Drain,
}

/// The proxy's listening sockets, reconciled with each configuration.
///
/// A listener keeps its socket (and its open connections) as long as a
/// configuration has a listener at the same address, whatever else changed:
/// renaming it, changing its routes or limits, even switching it between
/// HTTP and TCP, never closes the socket. A listener that disappears stops
/// accepting and its connections close gracefully (HTTP/1 `connection:
/// close`, HTTP/2 GOAWAY). Each socket gets a slot number, never reused, by
/// which its connections find the listener in the current snapshot.
#[derive(Debug, Default)]
pub(crate) struct ListenerSet {
    running: HashMap<SocketKey, Running>,
    next_slot: usize,
}

/// The sockets a configuration needs, bound but not yet serving: applying
/// it cannot fail any more. Dropping it closes the new sockets.
#[derive(Debug)]
pub(crate) struct ListenerPlan {
    /// Slot and bound address of each listener, in configuration order.
    pub(crate) slots: Vec<(usize, SocketAddr)>,
    new: Vec<(SocketKey, usize, std::net::TcpListener, SocketAddr, u32)>,
    kept: Vec<SocketKey>,
}

impl ListenerSet {
    /// Binds every listener of `listeners` that has no socket yet. Nothing
    /// changes for running listeners until [`ListenerSet::commit`].
    pub(crate) fn prepare(
        &mut self,
        listeners: &[crate::config::Listener],
    ) -> Result<ListenerPlan, Vec<BindError>> {
        let mut plan = ListenerPlan {
            slots: Vec::with_capacity(listeners.len()),
            new: Vec::new(),
            kept: Vec::new(),
        };
        let mut errors = Vec::new();
        let mut next_slot = self.next_slot;
        for listener in listeners {
            let key = SocketKey::of(listener);
            if let Some(running) = self.running.get(&key) {
                plan.slots.push((running.slot, running.bound));
                plan.kept.push(key);
                continue;
            }
            let bound = bind(&listener.name, listener.address).and_then(|socket| {
                let address = socket.local_addr().map_err(|source| BindError {
                    listener: listener.name.to_string(),
                    address: listener.address,
                    source,
                })?;
                Ok((socket, address))
            });
            match bound {
                Ok((socket, address)) => {
                    plan.slots.push((next_slot, address));
                    plan.new
                        .push((key, next_slot, socket, address, listener.max_connections));
                    next_slot += 1;
                }
                Err(error) => errors.push(error),
            }
        }
        if errors.is_empty() {
            self.next_slot = next_slot;
            Ok(plan)
        } else {
            Err(errors)
        }
    }

    /// Starts the plan's new listeners on `runtime`, stops the listeners it
    /// does not keep, and updates connection limits. Call it right after
    /// publishing the snapshot built from the plan's slots.
    pub(crate) fn commit(
        &mut self,
        plan: ListenerPlan,
        listeners: &[crate::config::Listener],
        shared: &Shared,
        drain: &Drain,
        runtime: &tokio::runtime::Handle,
    ) {
        let limits: HashMap<SocketKey, u32> = listeners
            .iter()
            .map(|l| (SocketKey::of(l), l.max_connections))
            .collect();
        let kept: std::collections::HashSet<SocketKey> = plan.kept.into_iter().collect();
        self.running.retain(|key, running| {
            if kept.contains(key) {
                return true;
            }
            tracing::info!(address = %running.bound, "listener removed; draining its connections");
            running.drain.signal();
            false
        });
        for (key, running) in &mut self.running {
            let Some(&max) = limits.get(key) else {
                continue;
            };
            if max > running.max_connections {
                running
                    .limit
                    .add_permits((max - running.max_connections) as usize);
            } else if max < running.max_connections {
                // Only permits not in use can be withdrawn now; connections
                // over the new limit finish normally.
                running
                    .limit
                    .forget_permits((running.max_connections - max) as usize);
            }
            running.max_connections = max;
        }
        for (key, slot, socket, bound, max_connections) in plan.new {
            tracing::info!(address = %bound, slot, "listening");
            let limit = Arc::new(Semaphore::new(max_connections as usize));
            let listener_drain = drain.child();
            drain.spawn_on(
                accept_loop(
                    socket,
                    slot,
                    shared.clone(),
                    listener_drain.clone(),
                    limit.clone(),
                ),
                runtime,
            );
            self.running.insert(
                key,
                Running {
                    slot,
                    bound,
                    limit,
                    max_connections,
                    drain: listener_drain,
                },
            );
        }
    }
}

/// The `conn` span (at debug) every connection's task runs in; `peer.id`
/// is recorded once a TLS client proved its SPIFFE ID.
fn connection_span(listener: &str, peer: SocketAddr) -> tracing::Span {
    tracing::debug_span!("conn", listener, peer.addr = %peer, peer.id = tracing::field::Empty)
}

/// Runs one listener's accept loop until its drain signal.
async fn accept_loop(
    listener: std::net::TcpListener,
    index: usize,
    shared: Shared,
    drain: Drain,
    limit: Arc<Semaphore>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, slot = index, "listener setup failed");
            return;
        }
    };
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return, // the semaphore is never closed
            },
            () = drain.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors or a connection reset before
                    // accept: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = drain.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let snapshot = shared.load_full();
        let conn_drain = drain.clone();
        match snapshot.listener(index) {
            Some(ListenerSnapshot::Http(http)) => {
                let span = connection_span(&http.config.name, peer);
                let held = (permit, ConnectionGuard::new(http.metrics.clone()));
                // The connection's future is spawned as it is, not awaited
                // in a block that would keep a second copy of it (see
                // `serve`).
                let serving = crate::http::server::serve(
                    stream,
                    peer,
                    index,
                    http.clone(),
                    shared.clone(),
                    conn_drain,
                    held,
                );
                drain.spawn(serving.instrument(span));
            }
            Some(ListenerSnapshot::Tcp(tcp)) => {
                let span = connection_span(&tcp.config.name, peer);
                let held = (permit, ConnectionGuard::new(tcp.metrics.clone()));
                let proxying =
                    crate::tcp::proxy(Stream::Tcp(stream), peer, tcp.clone(), conn_drain, held);
                drain.spawn(proxying.instrument(span));
            }
            None => {}
        }
    }
}
