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
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpStream;

use super::client::TYPE_URLS;
use crate::compare::Placement;

/// Bound on the control plane's start (it builds every node's resources
/// before it prints its addresses).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on one `/status` request, connect to end of body.
const STATUS_TIMEOUT: Duration = Duration::from_secs(20);

/// Cap on the `/status` body (5,000 proxies take about 2 MB).
const MAX_STATUS_BYTES: usize = 256 * 1024 * 1024;

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
        let body = tokio::time::timeout(STATUS_TIMEOUT, get_status(self.admin, &self.token))
            .await
            .context("GET /status timed out")??;
        parse_status(&body)
    }
}

async fn get_status(admin: SocketAddr, token: &str) -> anyhow::Result<Bytes> {
    let stream = TcpStream::connect(admin)
        .await
        .with_context(|| format!("connecting to the admin address {admin}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("admin HTTP/1.1 handshake")?;
    let request = http::Request::get("/status")
        .header(http::header::HOST, admin.to_string())
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())
        .context("building the /status request")?;
    let exchange = async {
        let response = sender.send_request(request).await.context("GET /status")?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_STATUS_BYTES)
            .collect()
            .await
            .map_err(|err| anyhow::anyhow!("reading the /status body: {err}"))?
            .to_bytes();
        anyhow::ensure!(status.is_success(), "GET /status answered {status}");
        Ok(body)
    };
    let mut connection = std::pin::pin!(connection);
    let mut exchange = std::pin::pin!(exchange);
    tokio::select! {
        body = &mut exchange => body,
        // A connection the server closes after the response ends here
        // first; what it delivered is still read from the exchange.
        result = &mut connection => {
            result.context("admin connection")?;
            exchange.await
        }
    }
}

/// Summarises a `/status` JSON body.
pub(super) fn parse_status(body: &[u8]) -> anyhow::Result<StatusSummary> {
    let json: serde_json::Value = serde_json::from_slice(body).context("parsing /status JSON")?;
    let proxies = json["proxies"]
        .as_array()
        .context("/status has no proxies list")?;
    let settled = proxies
        .iter()
        .filter(|proxy| {
            TYPE_URLS.iter().all(|type_url| {
                let state = &proxy["types"][*type_url];
                let sent = state["sent_version"].as_str();
                sent.is_some() && sent == state["acked_version"].as_str()
            })
        })
        .count();
    Ok(StatusSummary {
        mesh_generation: json["mesh_generation"]
            .as_u64()
            .context("/status has no mesh_generation")?,
        config_error: json["config_error"].as_str().map(str::to_owned),
        proxies: proxies.len(),
        settled,
    })
}
