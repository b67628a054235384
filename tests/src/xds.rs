//! Control planes for end-to-end tests: [`TestCp`], an in-process xDS
//! server whose resources a test sets directly (so that it can serve what
//! `weft-cp`'s mesh builder never would, such as an invalid cluster), and
//! [`CpProcess`], a real `weft-cp serve` process on a mesh directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use weft_cp::cache::SnapshotCache;
use weft_cp::resources::{MeshSnapshot, NodeEntry, NodeResources};
use weft_cp::status::{StatusReport, TypeStatus};
use weft_cp::xds::{Auth, Server, ServerOptions};
use weft_proto::config::v1 as pb;

use crate::{DEADLINE, TempDir, cp_binary, eventually, loopback0};

/// The bearer token test control planes require.
pub const TOKEN: &str = "test-token-5b1f0c";

/// An in-process control plane serving resources set by the test.
#[derive(Debug)]
pub struct TestCp {
    server: Server,
    cache: SnapshotCache,
}

impl TestCp {
    /// Starts on loopback ports chosen by the OS, requiring [`TOKEN`].
    pub async fn start() -> anyhow::Result<Self> {
        let cache = SnapshotCache::new();
        let server = Server::start(ServerOptions {
            xds_addr: loopback0(),
            admin_addr: loopback0(),
            auth: Auth::token(TOKEN),
            cache: cache.clone(),
            drain_timeout: std::time::Duration::from_secs(1),
            limits: weft_cp::xds::XdsLimits::default(),
            identity: None,
            node_tokens: None,
        })
        .await?;
        Ok(Self { server, cache })
    }

    /// Where proxies connect.
    pub fn xds_addr(&self) -> SocketAddr {
        self.server.xds_addr()
    }

    /// Serves these resources to node `node` (and nothing to any other).
    pub fn set(
        &self,
        node: &str,
        listeners: Vec<pb::Listener>,
        routes: Vec<pb::RouteConfiguration>,
        clusters: Vec<pb::Cluster>,
    ) {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            node.to_owned(),
            NodeEntry {
                service: None,
                identity: None,
                resources: Arc::new(NodeResources::new(listeners, routes, clusters)),
            },
        );
        self.cache.set(MeshSnapshot {
            nodes,
            trust_domain: None,
        });
    }

    /// What the control plane knows of `node`'s `type_url`, if connected.
    fn type_status(&self, node: &str, type_url: &str) -> Option<TypeStatus> {
        self.server
            .status()
            .proxies
            .into_iter()
            .find(|p| p.node_id == node)?
            .types
            .remove(type_url)
    }

    /// The version `node` last ACKed for `type_url`, if it is connected.
    pub fn acked(&self, node: &str, type_url: &str) -> Option<String> {
        self.type_status(node, type_url)?.acked_version
    }

    /// The version the control plane last sent `node` for `type_url`.
    pub fn sent(&self, node: &str, type_url: &str) -> Option<String> {
        self.type_status(node, type_url)?.sent_version
    }

    /// Waits until `node` has ACKed everything sent to it.
    pub async fn wait_converged(&self, node: &str) -> bool {
        eventually(DEADLINE, || async {
            let types = [
                pb::CLUSTER_TYPE_URL,
                pb::ROUTE_CONFIGURATION_TYPE_URL,
                pb::LISTENER_TYPE_URL,
            ];
            types.iter().all(|t| {
                let sent = self.sent(node, t);
                sent.is_some() && sent == self.acked(node, t)
            })
        })
        .await
    }

    /// The server's status report.
    pub fn status(&self) -> StatusReport {
        self.server.status()
    }
}

/// A `weft-cp serve` process. Killed when dropped.
#[derive(Debug)]
pub struct CpProcess {
    child: tokio::process::Child,
    /// The xDS address.
    pub xds: SocketAddr,
    /// The admin address.
    pub admin: SocketAddr,
    log: PathBuf,
    scratch: TempDir,
}

impl CpProcess {
    /// Serves the mesh in `dir` on ports chosen by the OS.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_at(dir, loopback0(), loopback0()).await
    }

    /// Serves the mesh in `dir` on the given addresses (to restart a
    /// control plane where its proxies expect it).
    pub async fn start_at(dir: &Path, xds: SocketAddr, admin: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with_args(dir, xds, admin, &[]).await
    }

    /// Like [`CpProcess::start_at`], with more `weft-cp serve` flags.
    pub async fn start_with_args(
        dir: &Path,
        xds: SocketAddr,
        admin: SocketAddr,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn(dir, xds, admin, extra_args, TempDir::new()?).await
    }

    /// Kills the control plane and starts it again at the same addresses
    /// with the same state directory, less its CA: a new CA is created,
    /// which the proxies' certificates and bundles know nothing of (node
    /// tokens stay valid).
    pub async fn restart_with_new_ca(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.kill().await;
        for file in ["ca.pem", "ca.key"] {
            std::fs::remove_file(self.state_dir().join(file))?;
        }
        let scratch = std::mem::replace(&mut self.scratch, TempDir::new()?);
        *self = Self::spawn(dir, self.xds, self.admin, &[], scratch).await?;
        Ok(())
    }

    async fn spawn(
        dir: &Path,
        xds: SocketAddr,
        admin: SocketAddr,
        extra_args: &[&str],
        scratch: TempDir,
    ) -> anyhow::Result<Self> {
        let token = scratch.path().join("token");
        std::fs::write(&token, TOKEN)?;
        let log = scratch.path().join("cp.log");
        let mut child = tokio::process::Command::new(cp_binary())
            .arg("serve")
            .arg("--config-dir")
            .arg(dir)
            .args(["--xds", &xds.to_string(), "--admin", &admin.to_string()])
            .arg("--token-file")
            .arg(&token)
            // Where the CA of a mesh with a trust domain is created.
            .arg("--state-dir")
            .arg(scratch.path().join("state"))
            .args(extra_args)
            .args(["--print-addresses", "--log-level", "weft_cp=debug,info"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("spawning weft-cp")?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = match tokio::time::timeout(DEADLINE, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            _ => bail!(
                "weft-cp printed no addresses; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let printed: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("parsing {line:?}"))?;
        let address = |key: &str| -> anyhow::Result<SocketAddr> {
            Ok(printed[key]
                .as_str()
                .with_context(|| format!("{key} address printed"))?
                .parse()?)
        };
        Ok(Self {
            xds: address("xds")?,
            admin: address("admin")?,
            child,
            log,
            scratch,
        })
    }

    /// The status report from the admin API.
    pub async fn status(&self) -> anyhow::Result<StatusReport> {
        let json = weft_cp::status::fetch_json(self.admin, Some(TOKEN), DEADLINE).await?;
        Ok(weft_cp::status::parse(&json)?)
    }

    /// The version `node` last ACKed for `type_url`.
    pub async fn acked(&self, node: &str, type_url: &str) -> Option<String> {
        self.status()
            .await
            .ok()?
            .proxies
            .iter()
            .find(|p| p.node_id == node)?
            .types
            .get(type_url)?
            .acked_version
            .clone()
    }

    /// Kills the process and waits for it to exit.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The state directory (`--state-dir`), where the mesh's CA lives.
    pub fn state_dir(&self) -> PathBuf {
        self.scratch.path().join("state")
    }

    /// A series' value from the admin API's `/metrics` (0 if absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let request = http::Request::get("/metrics")
            .header(http::header::HOST, self.admin.to_string())
            .header(http::header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new());
        let Ok(request) = request else { return 0.0 };
        let Ok(response) = crate::http1_request(self.admin, request).await else {
            return 0.0;
        };
        let text = crate::body_bytes(response).await.unwrap_or_default();
        String::from_utf8_lossy(&text)
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}
