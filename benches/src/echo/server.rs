//! The echo server's lifecycle: bind, accept, serve each connection with
//! hyper's automatic HTTP/1.1-or-h2c builder, shut down.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::DropGuard;
use tracing::{Instrument as _, debug, warn};

use super::handler::{self, State};
use super::tasks::Tasks;
use super::tcp::ACCEPT_BACKOFF;

/// Streams one h2 connection may carry at once. Far above hyper's default
/// (200) so that the upstream is never what limits an h2 load test.
const H2_MAX_CONCURRENT_STREAMS: u32 = 10_000;

/// How to start an [`EchoServer`].
#[derive(Clone, Debug)]
pub struct EchoOptions {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Name sent in `x-echo-server` and in gRPC responses; defaults to the
    /// bound address.
    pub name: Option<String>,
}

impl Default for EchoOptions {
    /// Loopback, any free port, named after the bound address.
    fn default() -> Self {
        Self::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }
}

impl EchoOptions {
    /// Options listening on `listen`, named after the bound address.
    pub fn new(listen: SocketAddr) -> Self {
        Self { listen, name: None }
    }

    /// Sets the name the server answers with.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// A running echo server (HTTP/1.1, h2c, gRPC and upgrades on one port) on
/// the current Tokio runtime. See the [module docs](super) for what it
/// answers.
///
/// Dropping the handle closes the listener and every connection at once;
/// [`EchoServer::shutdown`] drains instead.
#[derive(Debug)]
pub struct EchoServer {
    local_addr: SocketAddr,
    name: Arc<str>,
    state: Arc<State>,
    tasks: Tasks,
    _abort: DropGuard,
}

impl EchoServer {
    /// Binds `options.listen` and starts serving.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound, or the name is not a valid header
    /// value.
    pub async fn bind(options: EchoOptions) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("binding echo on {}", options.listen))?;
        let local_addr = listener
            .local_addr()
            .context("reading the echo's bound address")?;
        let name: Arc<str> = match options.name {
            Some(name) => name.into(),
            None => local_addr.to_string().into(),
        };
        let tasks = Tasks::new();
        let state = Arc::new(
            State::new(&name, tasks.clone())
                .with_context(|| format!("echo name {name:?} is not a valid header value"))?,
        );
        tasks.spawn(
            accept_loop(listener, Arc::clone(&state), Arc::new(connection_builder()))
                .instrument(tracing::info_span!("echo", listener = %local_addr)),
        );
        Ok(Self {
            local_addr,
            name,
            state,
            _abort: tasks.abort_on_drop(),
            tasks,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The name the server answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests answered or being answered so far, of every kind (HTTP,
    /// gRPC, upgrades).
    pub fn requests_served(&self) -> u64 {
        self.state.requests_served()
    }

    /// Sets what health checks see: while unhealthy, [`super::ECHO_HEALTH_PATH`]
    /// answers `503` and gRPC `Health/Check` answers `NOT_SERVING`.
    pub fn set_healthy(&self, healthy: bool) {
        self.state.set_healthy(healthy);
    }

    /// Stops accepting, lets in-flight requests finish (HTTP/2 connections
    /// get a GOAWAY, HTTP/1.1 ones close after their current response),
    /// closes upgraded connections, and waits until every task has ended.
    /// Bound it with a timeout: dropping the future aborts what remains.
    pub async fn shutdown(self) {
        self.tasks.drain().await;
    }
}

fn connection_builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    // The timer enables hyper's header read timeout (30 s by default).
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        // `x-echo-reset` resets streams on purpose; a reset-heavy test must
        // not have its connection closed as abusive.
        .max_local_error_reset_streams(None);
    builder
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    builder: Arc<Builder<TokioExecutor>>,
) {
    let tasks = state.tasks().clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tasks.draining() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %err, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    () = tasks.draining() => return,
                }
            }
        };
        tasks.spawn(
            serve_connection(stream, Arc::clone(&state), Arc::clone(&builder))
                .instrument(tracing::debug_span!("conn", peer.addr = %peer)),
        );
    }
}

async fn serve_connection(
    stream: TcpStream,
    state: Arc<State>,
    builder: Arc<Builder<TokioExecutor>>,
) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(error = %err, "setting TCP_NODELAY failed");
    }
    let tasks = state.tasks().clone();
    let service = service_fn(move |request| handler::handle(Arc::clone(&state), request));
    let mut conn =
        std::pin::pin!(builder.serve_connection_with_upgrades(TokioIo::new(stream), service));
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = tasks.draining() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                () = tasks.aborting() => return,
            }
        }
    };
    if let Err(err) = result {
        debug!(error = %err, "connection closed with an error");
    }
}
