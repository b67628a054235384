//! What Weft's binaries (`weft-proxy`, `weft-cp`) share: logging setup,
//! the shutdown signal and reading a bootstrap-token file.

use std::path::{Path, PathBuf};

/// A `--log-level` (or `RUST_LOG`) filter that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {reason} (e.g. info, or weft_proxy=debug,info)")]
pub struct InvalidLogFilter {
    /// The filter as given.
    pub filter: String,
    /// The parser's reason.
    pub reason: String,
}

/// Logs to stderr with `filter` (or else `RUST_LOG`, or else `info`). An
/// invalid filter is an error, never a silent `info`. Colours only when
/// stderr is a terminal. A second call keeps the first setup.
pub fn init_logging(filter: Option<&str>) -> Result<(), InvalidLogFilter> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let given = filter
        .map(str::to_owned)
        .or_else(|| std::env::var(EnvFilter::DEFAULT_ENV).ok())
        .unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::builder()
        .parse(&given)
        .map_err(|error| InvalidLogFilter {
            reason: error.to_string(),
            filter: given,
        })?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
    Ok(())
}

/// SIGTERM and SIGINT, watched from the moment [`ShutdownSignal::install`]
/// returns. Install it before announcing the process as started (printing
/// its addresses, answering readiness): a signal that arrives before the
/// handler exists takes the default action and kills the process without
/// a drain.
#[derive(Debug)]
pub struct ShutdownSignal {
    terminate: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignal {
    /// Installs the handlers. Must run inside a Tokio runtime. A signal
    /// that cannot be watched is logged, and the other one still is.
    pub fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let watch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(stream) => Some(stream),
            Err(error) => {
                tracing::warn!(%error, "cannot watch {name}");
                None
            }
        };
        Self {
            terminate: watch(SignalKind::terminate(), "SIGTERM"),
            interrupt: watch(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// Resolves at the next SIGTERM or SIGINT (never, if neither could be
    /// watched).
    pub async fn recv(&mut self) {
        async fn next(signal: Option<&mut tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    if signal.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = next(self.terminate.as_mut()) => {}
            () = next(self.interrupt.as_mut()) => {}
        }
    }
}

/// Why a token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read the token file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file holds nothing but whitespace.
    #[error("{}: the token file is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// Reads a bootstrap token: the whole file, surrounding whitespace removed.
/// Blocking.
pub fn read_token(path: &Path) -> Result<String, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}
