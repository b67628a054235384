//! What a load run does: [`LoadConfig`], the validated input of
//! [`run`](super::run), built by the CLI or by in-process callers.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Uri};
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};

use super::{DEFAULT_STREAMS_PER_CONNECTION, DEFAULT_TCP_BUFFER_BYTES, DEFAULT_TIMEOUT};

/// The protocol spoken to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive: one request at a time per connection.
    Http1,
    /// Cleartext HTTP/2 with prior knowledge: requests multiplexed on each
    /// connection, up to [`LoadConfig::streams_per_connection`] in flight.
    Http2,
    /// Unary calls of `weft.echo.v1.Echo/Unary` over cleartext HTTP/2.
    Grpc,
    /// Opaque TCP against an echo: each request writes a buffer and reads it
    /// back.
    Tcp,
}

impl Protocol {
    /// A short human name (`HTTP/1.1`, `h2c`, `gRPC`, `TCP`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Http1 => "HTTP/1.1",
            Self::Http2 => "h2c",
            Self::Grpc => "gRPC",
            Self::Tcp => "TCP",
        }
    }
}

/// How requests are paced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoadMode {
    /// Requests are scheduled at this constant aggregate rate (requests per
    /// second, finite and positive) across all connections; latency is
    /// corrected for coordinated omission.
    OpenLoop {
        /// Requests per second across all connections.
        rate_per_second: f64,
    },
    /// Each connection (each stream slot over h2) sends back to back, to
    /// find peak throughput.
    ClosedLoop,
}

/// TLS on HTTP/1.1 connections: the client configuration and the name
/// the server's certificate is verified against (and sent as SNI).
///
/// Whether sessions are resumed is the configuration's: its session cache
/// ([`rustls::ClientConfig::resumption`]) is shared by every connection of
/// the run, so a fresh configuration per run keeps runs (and targets on
/// the same name) from resuming each other's sessions.
#[derive(Clone, Debug)]
pub struct TlsClient {
    /// rustls client configuration (ALPN, client certificate, resumption).
    pub config: Arc<rustls::ClientConfig>,
    /// The name verified in the server's certificate.
    pub server_name: ServerName<'static>,
}

/// A load run's parameters. Build one with [`LoadConfig::new`] and adjust
/// the public fields.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// `http://HOST[:PORT][/PATH]`, or `tcp://HOST:PORT` for
    /// [`Protocol::Tcp`]. The host must resolve to loopback addresses only.
    pub target: Uri,
    /// The protocol spoken.
    pub protocol: Protocol,
    /// Open or closed loop.
    pub mode: LoadMode,
    /// Connections opened to the target.
    pub connections: NonZeroUsize,
    /// Length of the measured window.
    pub duration: Duration,
    /// Load sent before the measured window, not recorded (same
    /// connections, same pacing).
    pub warmup: Duration,
    /// Timeout of each connect and of each request (send to end of body).
    pub timeout: Duration,
    /// HTTP: POST a body of this many bytes (0: GET without a body). gRPC:
    /// the payload size. TCP: the buffer echoed per request (must be > 0).
    pub body_size_bytes: usize,
    /// Extra request headers (HTTP and gRPC). A `host`, `content-type` or
    /// `te` given here replaces the default one.
    pub headers: HeaderMap,
    /// h2 and gRPC: requests kept in flight per connection at most.
    pub streams_per_connection: NonZeroUsize,
    /// TCP: open a new connection for every request (reports connections
    /// per second).
    pub new_connection_per_request: bool,
    /// HTTP/1.1 only: speak TLS on every connection (each new connection
    /// makes a TLS handshake before its first request).
    pub tls: Option<TlsClient>,
    /// Account the CPU time and memory of these processes (the proxy under
    /// test, or a chain of proxies, summed) over the measured window. Linux
    /// only (reads `/proc`).
    pub pids: Vec<u32>,
    /// Print a one-line progress report on stderr every second.
    pub show_progress: bool,
}

impl LoadConfig {
    /// A config for `target` with the defaults: one connection, 10 s, no
    /// warm-up, [`DEFAULT_TIMEOUT`], GET without a body (TCP: a
    /// [`DEFAULT_TCP_BUFFER_BYTES`] buffer), [`DEFAULT_STREAMS_PER_CONNECTION`],
    /// cleartext, no process accounting, no progress line.
    pub fn new(target: Uri, protocol: Protocol, mode: LoadMode) -> Self {
        Self {
            target,
            protocol,
            mode,
            connections: NonZeroUsize::MIN,
            duration: Duration::from_secs(10),
            warmup: Duration::ZERO,
            timeout: DEFAULT_TIMEOUT,
            body_size_bytes: if protocol == Protocol::Tcp {
                DEFAULT_TCP_BUFFER_BYTES
            } else {
                0
            },
            headers: HeaderMap::new(),
            streams_per_connection: NonZeroUsize::new(DEFAULT_STREAMS_PER_CONNECTION)
                .expect("the default stream cap is not zero"),
            new_connection_per_request: false,
            tls: None,
            pids: Vec::new(),
            show_progress: false,
        }
    }

    /// Checks what the types do not: a finite positive rate, a non-zero
    /// duration and timeout, a TCP buffer, options that fit the protocol.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if let LoadMode::OpenLoop { rate_per_second } = self.mode {
            anyhow::ensure!(
                rate_per_second.is_finite() && rate_per_second > 0.0,
                "rate must be a positive number of requests per second, got {rate_per_second}"
            );
        }
        anyhow::ensure!(!self.duration.is_zero(), "duration must not be zero");
        anyhow::ensure!(!self.timeout.is_zero(), "timeout must not be zero");
        anyhow::ensure!(
            self.tls.is_none() || self.protocol == Protocol::Http1,
            "TLS is supported for HTTP/1.1 only"
        );
        if self.protocol == Protocol::Tcp {
            anyhow::ensure!(
                self.body_size_bytes > 0,
                "TCP mode needs a buffer of at least one byte"
            );
            anyhow::ensure!(
                self.headers.is_empty(),
                "headers are meaningless in TCP mode"
            );
        } else {
            anyhow::ensure!(
                !self.new_connection_per_request || self.protocol == Protocol::Http1,
                "a new connection per request is supported for HTTP/1.1 and TCP, not HTTP/2 or gRPC"
            );
        }
        Ok(())
    }
}
