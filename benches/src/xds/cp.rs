//! The control plane under test: a `weft-cp serve` child process on
//! loopback ports chosen by the OS, its admin `/status`, and its CPU time
//! and resident set from `/proc`.
//!
//! The process is started through the [`Placement`] (pinned when the bench
//! pins), logs at `warn` to a file in the scratch directory (so that
//! logging N connections is not what is measured), and is killed when
//! dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};

use super::client::TYPE_URLS;
use crate::compare::Placement;

/// Bound on the control plane's start (it builds every node's resources
/// before it prints its addresses).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on one `/status` request, connect to end of body.
const STATUS_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `weft-cp serve`. Killed when dropped.
#[derive(Debug)]
pub(super) struct CpProcess {
    child: tokio::process::Child,
    pub(super) pid: u32,
    pub(super) xds: SocketAddr,
    pub(super) admin: SocketAddr,
    token: String,
    log: PathBuf,
}

/// The parts of `/status` the bench checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct StatusSummary {
    pub(super) mesh_generation: u64,
    pub(super) config_error: Option<String>,
    pub(super) proxies: usize,
    /// Proxies for which every subscribed type has a version sent and the
    /// same version ACKed.
    pub(super) settled: usize,
}

impl CpProcess {
    /// Starts `binary serve` on `mesh`, with its token file and log in
    /// `scratch`, and reads back its addresses.
    pub(super) async fn start(
        binary: &Path,
        placement: &Placement,
        mesh: &Path,
        scratch: &Path,
        token: &str,
    ) -> anyhow::Result<Self> {
        let token_file = scratch.join("token");
        tokio::fs::write(&token_file, token)
            .await
            .with_context(|| format!("writing {}", token_file.display()))?;
        let log = scratch.join("weft-cp.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = placement
            .proxy_command(binary)
            .arg("serve")
            .arg("--config-dir")
            .arg(mesh)
            .args(["--xds", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--token-file")
            .arg(&token_file)
            .args(["--print-addresses", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} serve", binary.display()))?;
        let pid = child.id().context("the control plane exited at once")?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            outcome => {
                let log_text = tokio::fs::read_to_string(&log).await.unwrap_or_default();
                bail!(
                    "{} serve printed no addresses ({}); its log:\n{log_text}",
                    binary.display(),
                    match outcome {
                        Err(_) => format!("nothing within {START_TIMEOUT:?}"),
                        Ok(Ok(_)) => "stdout closed".to_owned(),
                        Ok(Err(err)) => err.to_string(),
                    }
                )
            }
        };
        let printed: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("parsing the printed addresses {line:?}"))?;
        let address = |key: &str| -> anyhow::Result<SocketAddr> {
            printed[key]
                .as_str()
                .with_context(|| format!("no {key} address in {line:?}"))?
                .parse()
                .with_context(|| format!("the {key} address in {line:?}"))
        };
        Ok(Self {
            pid,
            xds: address("xds")?,
            admin: address("admin")?,
            token: token.to_owned(),
            log,
            child,
        })
    }

    /// The bearer token it requires.
    pub(super) fn token(&self) -> &str {
        &self.token
    }

    /// Whether the process is still running.
    pub(super) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of its log, for error messages.
    pub(super) async fn log_tail(&self) -> String {
        let text = tokio::fs::read_to_string(&self.log)
            .await
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills the process and waits for it.
    pub(super) async fn stop(mut self) {
        if let Err(err) = self.child.kill().await {
            tracing::warn!(pid = self.pid, error = %err, "killing weft-cp failed");
        }
    }

    /// `GET /status`, summarised.
    pub(super) async fn status(&self) -> anyhow::Result<StatusSummary> {
        let body = weft_cp::status::fetch_json(self.admin, Some(&self.token), STATUS_TIMEOUT)
            .await
            .context("GET /status")?;
        parse_status(&body)
    }
}

/// Summarises a `/status` JSON body (`weft_cp::status::StatusReport`).
pub(super) fn parse_status(body: &[u8]) -> anyhow::Result<StatusSummary> {
    let report = weft_cp::status::parse(body).context("parsing /status")?;
    let settled = report
        .proxies
        .iter()
        .filter(|proxy| {
            TYPE_URLS.iter().all(|type_url| {
                proxy.types.get(*type_url).is_some_and(|state| {
                    state.sent_version.is_some() && state.sent_version == state.acked_version
                })
            })
        })
        .count();
    Ok(StatusSummary {
        mesh_generation: report.mesh_generation,
        config_error: report.config_error,
        proxies: report.proxies.len(),
        settled,
    })
}
