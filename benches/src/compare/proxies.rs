//! The proxies under test: finding or installing them, writing equivalent
//! configurations, starting them on loopback ports and stopping them.
//!
//! Every proxy runs one worker with upstream keep-alive and streams bodies
//! in both directions (nginx: `proxy_buffering off`,
//! `proxy_request_buffering off`, so that 64 KiB bodies never touch its
//! temp files):
//!
//! | target | HTTP/1.1 | h2c and gRPC | TCP |
//! | --- | --- | --- | --- |
//! | weft | one listener (h1 and h2c by preface), one route, cluster `protocol: downstream` | same listener; h2 upstream | `protocol: tcp` listener |
//! | weft-full | as weft, behind several virtual hosts and routes, with header rules, a route timeout, a retry policy (budget, per-try timeout), the default circuit breakers (as every cluster has), outlier detection (consecutive gateway errors and success rate), active HTTP health checks, idle fault injection (0 %), route and per-client listener rate limits never reached, a Rego policy on the route every request takes, tracing (trace context on every request, 1 % of traces exported over OTLP/gRPC to a receiver in the bench process), Istio's standard metrics (reporter source), `via`, an access-log file and the admin server (metrics) | same | same |
//! | weft-s2s | two weft processes, each configured as weft: the client sidecar's `outbound` listener routes to a cluster holding the server sidecar's `inbound` listener, which routes to the echo (both clusters `protocol: downstream`) | same chain; h2 on both upstream hops | `outbound-tcp` -> `inbound-tcp` -> echo |
//! | nginx | `proxy_pass` to an upstream with `keepalive 64` | a `listen ... http2` server: `proxy_pass` (HTTP/1.1 upstream: nginx has no h2 upstream) and `grpc_pass` for gRPC | `stream` module, if installed |
//! | HAProxy | `mode http`, `http-reuse always` | a `proto h2` frontend to a `proto h2` server | `mode tcp` |
//!
//! For the handshake scenarios, weft (plain), nginx and HAProxy also get
//! two HTTP/1.1 listeners that proxy like the cleartext one: server-only
//! TLS 1.3 and mutual TLS 1.3, with the same certificate and key files
//! ([`HandshakeCerts`]); the others have none (see [`no_tls_listener`]).
//!
//! weft binds port 0 and reports its ports (`--print-addresses`); nginx
//! and HAProxy get free ports picked just before they start (bind port 0,
//! read, release) and are retried with new ports if they fail to start.
//! Each proxy runs in its own process group and the whole group is killed
//! when its [`ProxyProcess`] is dropped.
//!
//! weft-s2s starts the server sidecar first (it binds port 0 like weft),
//! then the client sidecar configured with the server sidecar's reported
//! addresses. Both are pinned like every proxy and run `--concurrency 1`.
//! The hop between them is rendered by [`SidecarHop`] alone, so securing it
//! with mTLS is a change there and nowhere else.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::handshake::HandshakeCerts;
use super::system::{self, SHORT_COMMAND_TIMEOUT};
use super::{Placement, TargetKind, Tools};

/// How long a proxy may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How often readiness is probed while a proxy starts.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// Attempts at starting nginx or HAProxy (a picked port may be taken in
/// between by someone else).
const START_ATTEMPTS: usize = 3;

/// How long `apt-get install` may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Features a complete weft configuration would have but that weft does
/// not implement yet (no configuration field exists for them).
pub(crate) const WEFT_NOT_BUILT: [&str; 0] = [];

/// The echo upstream's addresses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Upstream {
    /// HTTP/1.1, h2c and gRPC.
    pub(crate) http: SocketAddr,
    /// Opaque TCP echo.
    pub(crate) tcp: SocketAddr,
}

/// Where a target serves each kind of traffic.
#[derive(Clone, Debug)]
pub(crate) struct Endpoints {
    /// HTTP/1.1.
    pub(crate) http1: SocketAddr,
    /// h2c and gRPC.
    pub(crate) h2: SocketAddr,
    /// Opaque TCP, or why there is none.
    pub(crate) tcp: Result<SocketAddr, String>,
    /// HTTP/1.1 over server-only TLS (the handshake scenarios), or why
    /// there is none.
    pub(crate) tls: Result<SocketAddr, String>,
    /// HTTP/1.1 over mutual TLS (the handshake scenarios), or why there is
    /// none.
    pub(crate) mtls: Result<SocketAddr, String>,
}

impl Endpoints {
    /// The echo itself.
    pub(crate) fn direct(upstream: Upstream) -> Self {
        let no_tls = no_tls_listener(TargetKind::Direct, true);
        Self {
            http1: upstream.http,
            h2: upstream.http,
            tcp: Ok(upstream.tcp),
            tls: Err(no_tls.clone()),
            mtls: Err(no_tls),
        }
    }
}

/// Why `kind` has no TLS listener (`has_certs`: a handshake scenario asked
/// for them).
pub(crate) fn no_tls_listener(kind: TargetKind, has_certs: bool) -> String {
    if !has_certs {
        return "no handshake scenario was selected".to_owned();
    }
    match kind {
        TargetKind::Direct => "the echo upstream speaks cleartext only".to_owned(),
        TargetKind::WeftFull => {
            "TLS listeners are configured on plain weft only (the handshake costs the same)"
                .to_owned()
        }
        TargetKind::WeftSidecars | TargetKind::WeftSidecarsMtls => {
            "clients reach the client sidecar in cleartext (the mTLS hop's handshakes are \
             made once per pooled connection); handshakes are measured on plain weft"
                .to_owned()
        }
        TargetKind::Weft | TargetKind::Nginx | TargetKind::Haproxy => {
            "its TLS listeners are missing".to_owned()
        }
    }
}

/// The third-party proxies found (or why not), and nginx's stream module.
#[derive(Clone, Debug)]
pub(crate) struct Programs {
    pub(crate) nginx: Result<PathBuf, String>,
    pub(crate) haproxy: Result<PathBuf, String>,
    /// How nginx gets its `stream` module: `Ok(None)` built in,
    /// `Ok(Some(path))` a dynamic module to load, `Err` why there is none.
    pub(crate) nginx_stream: Result<Option<PathBuf>, String>,
}

impl Programs {
    /// Finds nginx (and its stream module) and HAProxy; if one is missing,
    /// installs them with `apt-get` when `tools` allow it, the process runs
    /// as root and `CI` is unset.
    pub(crate) async fn discover(tools: &Tools) -> Self {
        let search = tools.search_path.as_deref();
        let mut nginx = system::find_program("nginx", search);
        let mut haproxy = system::find_program("haproxy", search);
        let has_stream = match &nginx {
            Some(path) => stream_module(path).await.is_ok(),
            None => false,
        };
        let mut install_note = "installing is disabled".to_owned();
        if (nginx.is_none() || haproxy.is_none() || !has_stream) && tools.allow_install {
            if std::env::var_os("CI").is_some() {
                install_note = "not installing under CI".to_owned();
            } else if !system::is_root() {
                install_note = "not root, so not installing".to_owned();
            } else {
                install_note = install(search).await;
                nginx = system::find_program("nginx", search);
                haproxy = system::find_program("haproxy", search);
            }
        }
        let missing = |program: &str| {
            format!(
                "{program} not found on PATH ({install_note}; apt-get install -y nginx-light libnginx-mod-stream haproxy)"
            )
        };
        let nginx = nginx.ok_or_else(|| missing("nginx"));
        let nginx_stream = match &nginx {
            Ok(path) => stream_module(path).await,
            Err(_) => Err("nginx is missing".to_owned()),
        };
        Self {
            nginx,
            haproxy: haproxy.ok_or_else(|| missing("haproxy")),
            nginx_stream,
        }
    }
}

/// Runs `apt-get install -y nginx-light libnginx-mod-stream haproxy`;
/// returns what happened.
async fn install(search: Option<&OsStr>) -> String {
    let Some(apt) = system::find_program("apt-get", search) else {
        return "apt-get not found".to_owned();
    };
    info!("installing nginx-light, its stream module and haproxy");
    let child = tokio::process::Command::new(apt)
        .args([
            "install",
            "-y",
            "-q",
            "nginx-light",
            "libnginx-mod-stream",
            "haproxy",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let output = match child {
        Ok(child) => tokio::time::timeout(INSTALL_TIMEOUT, child.wait_with_output()).await,
        Err(err) => return format!("apt-get could not run: {err}"),
    };
    match output {
        Ok(Ok(output)) if output.status.success() => "installed with apt-get".to_owned(),
        Ok(Ok(output)) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().last().unwrap_or_default();
            warn!(status = %output.status, "apt-get install failed");
            format!("apt-get install failed ({}: {last})", output.status)
        }
        Ok(Err(err)) => format!("apt-get install failed: {err}"),
        Err(_) => format!("apt-get install ran longer than {INSTALL_TIMEOUT:?}"),
    }
}

/// Whether nginx has the `stream` module: built in, loadable, or missing.
async fn stream_module(nginx: &Path) -> Result<Option<PathBuf>, String> {
    let (_, stdout, stderr) = system::run_command(nginx, ["-V"], SHORT_COMMAND_TIMEOUT)
        .await
        .map_err(|err| format!("nginx -V failed: {err:#}"))?;
    let flags = format!("{stdout}{stderr}");
    if flags.split_whitespace().any(|flag| flag == "--with-stream") {
        return Ok(None);
    }
    if !flags.contains("--with-stream=dynamic") {
        return Err("nginx is built without the stream module".to_owned());
    }
    let modules = flags
        .split_whitespace()
        .find_map(|flag| flag.strip_prefix("--modules-path="))
        .unwrap_or("/usr/lib/nginx/modules");
    let module = Path::new(modules).join("ngx_stream_module.so");
    if module.exists() {
        Ok(Some(module))
    } else {
        Err(format!(
            "nginx's stream module is not installed ({} missing; apt-get install \
             libnginx-mod-stream)",
            module.display()
        ))
    }
}

/// How many connections a proxy must hold, and the open-files limit it
/// inherits (it cannot be raised: the runner raised its own as far as it
/// could).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Client connections held at once.
    pub(crate) connections: usize,
    /// `RLIMIT_NOFILE` of the proxies.
    pub(crate) open_files: u64,
}

impl Limits {
    /// HAProxy's `maxconn`: room for the connections, within the
    /// descriptors (HAProxy reserves two per connection, client and
    /// server, and refuses to start beyond its limit).
    pub(crate) fn haproxy_maxconn(self) -> u64 {
        (self.connections as u64 + 1024).min(self.open_files.saturating_sub(256) / 2)
    }

    /// nginx's `worker_connections` (client and upstream connections both
    /// count, and each takes ~0.4 KiB allocated at start), within the
    /// descriptors.
    pub(crate) fn nginx_worker_connections(self) -> u64 {
        (2 * self.connections as u64 + 1024).min(self.open_files.saturating_sub(64))
    }
}

/// What every proxy start needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StartContext<'a> {
    pub(crate) placement: &'a Placement,
    pub(crate) weft_bin: &'a Path,
    pub(crate) programs: &'a Programs,
    pub(crate) upstream: Upstream,
    pub(crate) work_dir: &'a Path,
    /// Connections each proxy must be able to hold (sizes nginx's and
    /// HAProxy's connection limits).
    pub(crate) limits: Limits,
    /// The handshake scenarios' certificates: when present, weft, nginx
    /// and HAProxy also get a server-only and a mutual-TLS listener.
    pub(crate) handshake: Option<&'a HandshakeCerts>,
}

/// A running proxy. Its process group is killed on drop.
#[derive(Debug)]
pub(crate) struct ProxyProcess {
    /// The process that serves traffic (nginx: the worker), for CPU and
    /// memory accounting.
    pub(crate) pid: u32,
    /// nginx: the master process.
    pub(crate) master_pid: Option<u32>,
    /// Where it serves.
    pub(crate) endpoints: Endpoints,
    child: tokio::process::Child,
    pgid: Option<u32>,
    log: PathBuf,
    /// weft-s2s: the server sidecar this (client) sidecar forwards to,
    /// stopped with it.
    next_hop: Option<Box<ProxyProcess>>,
    /// weft-full: the OTLP receiver its spans go to.
    collector: Option<weft_cp::otlp::Receiver>,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            system::kill_process_group(pgid);
        }
        // `kill_on_drop` reaps the child itself.
    }
}

impl ProxyProcess {
    /// Starts proxy `kind` (not `direct`); `instance` keeps file names apart.
    pub(crate) async fn start(
        kind: TargetKind,
        ctx: &StartContext<'_>,
        instance: usize,
    ) -> anyhow::Result<Self> {
        let name = format!("{}-{instance}", kind.name());
        let started = match kind {
            TargetKind::Weft | TargetKind::WeftFull => start_weft(kind, ctx, &name).await,
            TargetKind::WeftSidecars => start_sidecars(ctx, &name, &SidecarHop::Cleartext).await,
            TargetKind::WeftSidecarsMtls => {
                let hop = SidecarHop::mtls(ctx.work_dir).context("making the mesh certificates")?;
                start_sidecars(ctx, &name, &hop).await
            }
            TargetKind::Nginx | TargetKind::Haproxy => {
                let mut last_error = None;
                for attempt in 1..=START_ATTEMPTS {
                    match start_reference(kind, ctx, &name).await {
                        Ok(proxy) => return Ok(proxy),
                        Err(err) => {
                            debug!(proxy = kind.name(), attempt, error = %format!("{err:#}"), "start failed");
                            last_error = Some(err);
                        }
                    }
                }
                Err(last_error.unwrap_or_else(|| anyhow::anyhow!("never attempted")))
            }
            TargetKind::Direct => bail!("direct is not a proxy"),
        };
        let proxy = started?;
        info!(proxy = kind.name(), pids = ?proxy.accounted_pids(), "proxy started");
        Ok(proxy)
    }

    /// The processes whose CPU and memory are the target's: the serving
    /// process, then (weft-s2s) the server sidecar.
    pub(crate) fn accounted_pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid];
        if let Some(next) = &self.next_hop {
            pids.extend(next.accounted_pids());
        }
        pids
    }

    /// The proxy's log (stderr, and nginx's error log), for error messages;
    /// weft-s2s: both sidecars' logs.
    pub(crate) fn log_tail(&self) -> String {
        match &self.next_hop {
            None => tail(&self.log),
            Some(next) => format!(
                "{}:\n{}\n{}:\n{}",
                self.log.display(),
                tail(&self.log),
                next.log.display(),
                next.log_tail()
            ),
        }
    }

    /// Whether the process (weft-s2s: both processes) is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
            && self.next_hop.as_mut().is_none_or(|next| next.is_running())
    }
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

fn base_command(
    ctx: &StartContext<'_>,
    program: &Path,
    log: &Path,
) -> anyhow::Result<tokio::process::Command> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut command = ctx.placement.proxy_command(program);
    command
        .stdin(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        // Its own group: dropping the proxy kills nginx's worker too, and a
        // terminal's Ctrl-C reaches only the runner, which then cleans up.
        .process_group(0);
    Ok(command)
}

async fn start_weft(
    kind: TargetKind,
    ctx: &StartContext<'_>,
    name: &str,
) -> anyhow::Result<ProxyProcess> {
    let access_log = ctx.work_dir.join(format!("{name}-access.log"));
    let tls = ctx.handshake.filter(|_| kind == TargetKind::Weft);
    // weft-full's spans go to an OTLP receiver in this process (gRPC on
    // loopback), as they would to a node-local collector.
    let collector = match kind {
        TargetKind::WeftFull => Some(
            weft_cp::otlp::Receiver::bind(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                SocketAddr::from(([127, 0, 0, 1], 0)),
            )
            .await
            .context("binding the OTLP receiver")?,
        ),
        _ => None,
    };
    let collector_url = collector
        .as_ref()
        .map_or_else(String::new, weft_cp::otlp::Receiver::grpc_url);
    let config = weft_config(kind, ctx.upstream, &access_log, tls, &collector_url);
    let mut proxy = spawn_weft(
        ctx,
        name,
        &config,
        ("http", "tcp"),
        tls.map(|_| ("tls", "mtls")),
    )
    .await?;
    proxy.collector = collector;
    if tls.is_none() {
        let reason = no_tls_listener(kind, ctx.handshake.is_some());
        proxy.endpoints.tls = Err(reason.clone());
        proxy.endpoints.mtls = Err(reason);
    }
    Ok(proxy)
}

/// weft-s2s: the server sidecar, then the client sidecar pointed at it.
/// The returned process is the client sidecar (where traffic enters); it
/// owns the server sidecar.
async fn start_sidecars(
    ctx: &StartContext<'_>,
    name: &str,
    hop: &SidecarHop,
) -> anyhow::Result<ProxyProcess> {
    let server = spawn_weft(
        ctx,
        &format!("{name}-server"),
        &server_sidecar_config(ctx.upstream, hop),
        ("inbound", "inbound-tcp"),
        None,
    )
    .await
    .context("starting the server sidecar")?;
    let inbound = Upstream {
        http: server.endpoints.http1,
        tcp: server
            .endpoints
            .tcp
            .clone()
            .map_err(|reason| anyhow::anyhow!("{reason}"))?,
    };
    let mut client = spawn_weft(
        ctx,
        &format!("{name}-client"),
        &client_sidecar_config(inbound, hop),
        ("outbound", "outbound-tcp"),
        None,
    )
    .await
    .context("starting the client sidecar")?;
    let reason = no_tls_listener(TargetKind::WeftSidecars, ctx.handshake.is_some());
    client.endpoints.tls = Err(reason.clone());
    client.endpoints.mtls = Err(reason);
    client.next_hop = Some(Box::new(server));
    Ok(client)
}

/// Starts `weft-proxy --concurrency 1` with `config` (written to
/// `NAME.yaml`) and reads back where its HTTP and TCP listeners (named
/// `listeners`) and its server-only and mutual TLS listeners (named
/// `tls_listeners`, if any) bound.
async fn spawn_weft(
    ctx: &StartContext<'_>,
    name: &str,
    config: &str,
    listeners: (&str, &str),
    tls_listeners: Option<(&str, &str)>,
) -> anyhow::Result<ProxyProcess> {
    anyhow::ensure!(
        ctx.weft_bin.exists(),
        "{} not found: build it with `cargo build --release -p weft-proxy` or pass --weft-bin",
        ctx.weft_bin.display()
    );
    let config_path = ctx.work_dir.join(format!("{name}.yaml"));
    std::fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let log = ctx.work_dir.join(format!("{name}.log"));
    let mut command = base_command(ctx, ctx.weft_bin, &log)?;
    command
        .arg("--config")
        .arg(&config_path)
        .args([
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            "--print-addresses",
        ])
        .stdout(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", ctx.weft_bin.display()))?;
    let pid = child.id().context("weft-proxy exited at once")?;
    let stdout = child.stdout.take().context("stdout is piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        _ => bail!(
            "weft-proxy printed no addresses within {START_TIMEOUT:?}; its log:\n{}",
            tail(&log)
        ),
    };
    // Nothing else is printed, but never let a full pipe block the proxy.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let printed: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("parsing {line:?}"))?;
    let listener = |wanted: &str| -> anyhow::Result<SocketAddr> {
        printed["listeners"]
            .as_array()
            .and_then(|listeners| {
                listeners
                    .iter()
                    .find(|entry| entry[0].as_str() == Some(wanted))
            })
            .and_then(|entry| entry[1].as_str())
            .with_context(|| format!("no listener {wanted:?} in {line}"))?
            .parse()
            .with_context(|| format!("listener {wanted:?} in {line}"))
    };
    let http = listener(listeners.0)?;
    let tcp = listener(listeners.1)?;
    let (tls, mtls) = match tls_listeners {
        Some((tls, mtls)) => (Ok(listener(tls)?), Ok(listener(mtls)?)),
        None => {
            let reason = "no TLS listener configured".to_owned();
            (Err(reason.clone()), Err(reason))
        }
    };
    Ok(ProxyProcess {
        pid,
        master_pid: None,
        endpoints: Endpoints {
            http1: http,
            h2: http,
            tcp: Ok(tcp),
            tls,
            mtls,
        },
        child,
        pgid: Some(pid),
        log,
        next_hop: None,
        collector: None,
    })
}

/// How the hop between weft-s2s's two sidecars is secured. It renders the
/// only fields that differ: those of the server sidecar's inbound HTTP
/// listener and of the client sidecar's HTTP cluster that points at it.
/// (TCP listeners do not terminate TLS: the TCP hop stays cleartext.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SidecarHop {
    /// Cleartext HTTP (h2 with prior knowledge for h2c and gRPC) and TCP.
    Cleartext,
    /// Mutual TLS with SPIFFE identities from a mesh CA, as `weft-cp`'s
    /// mesh runs it (files here, as the control plane is not part of the
    /// measured path).
    Mtls(MeshCerts),
}

/// Certificate files for the mTLS hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MeshCerts {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// The identities of the two sidecars (and of the handshake scenarios'
/// server and client).
const SERVER_ID: &str = "spiffe://bench.weft.local/ns/default/sa/echo";
pub(crate) const CLIENT_ID: &str = "spiffe://bench.weft.local/ns/default/sa/client";

impl MeshCerts {
    /// A fresh mesh CA in `dir/ca` (ECDSA P-256, as every key `weft_cp::ca`
    /// makes), a server certificate for [`SERVER_ID`] (plus `server_dns_names`,
    /// for clients that verify a host name) and a client certificate for
    /// [`CLIENT_ID`].
    pub(crate) fn create(dir: &Path, server_dns_names: &[String]) -> anyhow::Result<Self> {
        let ca = weft_cp::ca::Ca::load_or_create(&dir.join("ca"), "bench.weft.local")?;
        let ttl = Duration::from_secs(24 * 3600);
        let [server_cert, server_key, bundle] = weft_cp::ca::write_issued(
            &dir.join("server"),
            &ca.issue(SERVER_ID, server_dns_names, ttl)?,
            &ca,
        )?;
        let [client_cert, client_key, _] =
            weft_cp::ca::write_issued(&dir.join("client"), &ca.issue(CLIENT_ID, &[], ttl)?, &ca)?;
        Ok(Self {
            ca: bundle,
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }

    /// The CA bundle (PEM).
    pub(crate) fn ca(&self) -> &Path {
        &self.ca
    }

    /// The server's chain: leaf, then the CA (PEM).
    pub(crate) fn server_cert(&self) -> &Path {
        &self.server_cert
    }

    /// The server's key (PKCS#8 PEM).
    pub(crate) fn server_key(&self) -> &Path {
        &self.server_key
    }

    /// The client's chain: leaf, then the CA (PEM).
    pub(crate) fn client_cert(&self) -> &Path {
        &self.client_cert
    }

    /// The client's key (PKCS#8 PEM).
    pub(crate) fn client_key(&self) -> &Path {
        &self.client_key
    }
}

impl SidecarHop {
    /// A fresh mesh CA in `dir/ca` and a certificate for each sidecar.
    pub(crate) fn mtls(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self::Mtls(MeshCerts::create(dir, &[])?))
    }

    /// Extra fields of the inbound HTTP listener (indented as a list
    /// entry's fields, each line ending in a newline).
    fn inbound_listener_fields(&self) -> String {
        match self {
            Self::Cleartext => String::new(),
            Self::Mtls(certs) => format!(
                "    tls:\n      certificates:\n        - {{ cert_file: {:?}, key_file: {:?} }}\n      \
                 min_version: \"1.3\"\n      client_ca_file: {:?}\n      allowed_identities: [{CLIENT_ID:?}]\n",
                certs.server_cert, certs.server_key, certs.ca
            ),
        }
    }

    /// Extra fields of the HTTP cluster whose endpoint is the server
    /// sidecar.
    fn to_server_cluster_fields(&self) -> String {
        match self {
            Self::Cleartext => String::new(),
            Self::Mtls(certs) => format!(
                "    tls:\n      ca_file: {:?}\n      cert_file: {:?}\n      key_file: {:?}\n      \
                 server_identity: {SERVER_ID:?}\n",
                certs.ca, certs.client_cert, certs.client_key
            ),
        }
    }

    /// The hop in words, for the report.
    pub(crate) fn describe(kind: TargetKind) -> &'static str {
        match kind {
            TargetKind::WeftSidecarsMtls => {
                "mutual TLS 1.3 on the HTTP hop (ECDSA P-256 SPIFFE certificates from a mesh CA, \
                 each side checking the other's identity; ALPN h2 for h2c and gRPC, http/1.1 \
                 otherwise), the TCP hop cleartext"
            }
            _ => "cleartext",
        }
    }
}

/// weft-s2s's server sidecar: `inbound` (HTTP) and `inbound-tcp` listeners
/// to the local app, the echo; otherwise as plain weft.
pub(crate) fn server_sidecar_config(app: Upstream, hop: &SidecarHop) -> String {
    let listener_fields = hop.inbound_listener_fields();
    format!(
        "# weft-bench compare: weft-s2s, the server-side sidecar (mesh -> local app).
listeners:
  - name: inbound
    address: 127.0.0.1:0
    route_config: inbound
{listener_fields}  - name: inbound-tcp
    address: 127.0.0.1:0
    protocol: tcp
    cluster: local-app-tcp

route_configs:
  - name: inbound
    virtual_hosts:
      - name: local
        domains: [\"*\"]
        routes:
          - name: local_app
            cluster: local-app

clusters:
  - name: local-app
    # The caller's protocol, as for plain weft: h2 for h2c and gRPC.
    protocol: downstream
    endpoints:
      - address: {http}
  - name: local-app-tcp
    endpoints:
      - address: {tcp}
",
        http = app.http,
        tcp = app.tcp,
    )
}

/// weft-s2s's client sidecar: `outbound` (HTTP) and `outbound-tcp`
/// listeners the app calls, routing to the server sidecar's `inbound`
/// listeners; otherwise as plain weft.
pub(crate) fn client_sidecar_config(inbound: Upstream, hop: &SidecarHop) -> String {
    let cluster_fields = hop.to_server_cluster_fields();
    format!(
        "# weft-bench compare: weft-s2s, the client-side sidecar (app -> mesh).
listeners:
  - name: outbound
    address: 127.0.0.1:0
    route_config: outbound
  - name: outbound-tcp
    address: 127.0.0.1:0
    protocol: tcp
    cluster: echo-tcp

route_configs:
  - name: outbound
    virtual_hosts:
      # A mesh's outbound virtual host matches the service's name; the
      # load generator sends `Host: 127.0.0.1:PORT`, so match every host
      # as plain weft does.
      - name: echo
        domains: [\"*\"]
        routes:
          - name: echo
            cluster: echo

clusters:
  # The server sidecar's inbound listeners.
  - name: echo
    protocol: downstream
    endpoints:
      - address: {http}
{cluster_fields}  - name: echo-tcp
    endpoints:
      - address: {tcp}
",
        http = inbound.http,
        tcp = inbound.tcp,
    )
}

/// weft's configuration: plain (one route) or full (every feature built).
/// With `tls`, plain weft also gets the handshake scenarios' listeners:
/// `tls` (server-only) and `mtls` (client certificates required), routed
/// like `http`.
pub(crate) fn weft_config(
    kind: TargetKind,
    upstream: Upstream,
    access_log: &Path,
    tls: Option<&HandshakeCerts>,
    collector: &str,
) -> String {
    let clusters = format!(
        "clusters:
  - name: echo
    # HTTP/2 upstream for h2c and gRPC clients, pooled HTTP/1.1 otherwise.
    protocol: downstream
    endpoints:
      - address: {http}
  - name: echo-tcp
    endpoints:
      - address: {tcp}
",
        http = upstream.http,
        tcp = upstream.tcp,
    );
    let tcp_listener = "  - name: tcp
    address: 127.0.0.1:0
    protocol: tcp
    cluster: echo-tcp
";
    if kind != TargetKind::WeftFull {
        let tls_listeners = tls.map_or_else(String::new, weft_tls_listeners);
        return format!(
            "# weft-bench compare: plain weft, one HTTP listener, one route, one cluster.
listeners:
  - name: http
    address: 127.0.0.1:0
    route_config: main
{tcp_listener}{tls_listeners}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - name: all
            cluster: echo

{clusters}"
        );
    }
    // Passive and active health checking on the cluster every request
    // goes to (the echo answers `GET /healthz` with 200; one probe per
    // endpoint every 5 s, off the request path).
    let clusters = clusters.replacen(
        "    protocol: downstream\n",
        "    protocol: downstream\n    outlier_detection: { consecutive_gateway_errors: 5, success_rate: {} }\n    \
         health_check: { http: { path: /healthz }, interval: 5s }\n",
        1,
    );
    // Requests for 127.0.0.1:PORT/ reach the last route of the `bench`
    // virtual host, after a header match, a regex match, an exact match and
    // a prefix rewrite have been tried and failed.
    // A JSON string is a valid YAML scalar, whatever the path holds.
    let access_log = serde_json::to_string(&access_log.to_string_lossy())
        .unwrap_or_else(|_| "access.log".to_owned());
    format!(
        "# weft-bench compare: every feature weft has today.
admin:
  address: 127.0.0.1:0
access_log:
  path: {access_log}
# Evaluated in-process on every request of the `all` route: which methods
# it takes (every client of the bench sends one of them).
policies:
  - name: methods
    rego: |
      package envoy.authz
      default allow := false
      allow if input.attributes.request.http.method in {{\"GET\", \"HEAD\", \"POST\"}}
listeners:
  - name: http
    address: 127.0.0.1:0
    route_config: main
    via: weft-bench
    header_read_timeout: 5s
    idle_timeout: 10m
    max_request_headers_bytes: 32768
    # Configured, never reached: a bucket per client IP costs its lookup.
    rate_limit:
      per_client: {{ requests_per_second: 100000000, burst: 100000000 }}
    # Every request gets trace context and a span id; 1 % of new traces
    # (Istio's default) are recorded and exported over OTLP/gRPC.
    tracing:
      collector: {collector:?}
      sample_percent: 1
      service_name: weft-full
    # Istio's standard metrics beside Weft's own, as the caller's proxy
    # reports them.
    istio_metrics:
      reporter: source
      workload: {{ name: weft-full, namespace: bench, app: weft-full }}
      destinations:
        echo: {{ name: echo, namespace: bench, app: echo, service: echo.bench }}
{tcp_listener}    istio_metrics: {{ reporter: source }}
route_configs:
  - name: main
    virtual_hosts:
      - name: api
        domains: [\"api.example.com\", \"*.api.example.com\"]
        routes:
          - name: api-items
            match: {{ prefix: /items/ }}
            cluster: echo
      - name: www
        domains: [\"www.example.com\", \"example.com\"]
        routes:
          - name: static
            cluster: echo
            host_rewrite: static.internal
      - name: bench
        domains: [\"*\"]
        routes:
          - name: canary
            match:
              prefix: /
              headers:
                - name: x-canary
                  exact: \"1\"
            cluster: echo
          - name: item
            match:
              regex: \"/items/[0-9]+\"
              methods: [GET, HEAD]
            cluster: echo
          - name: health
            match: {{ exact: /healthz }}
            direct_response:
              status: 200
              body: \"ok\\n\"
          - name: legacy
            match: {{ prefix: /api/v1/ }}
            prefix_rewrite: /v2/
            cluster: echo
          - name: all
            match: {{ prefix: / }}
            cluster: echo
            policy: methods
            timeout: 5s
            retry_policy:
              retry_on: [gateway_error]
              num_retries: 2
              per_try_timeout: 2s
            # Configured, idle: every request is drawn for and passes.
            fault:
              delay: {{ duration: 1s, percent: 0 }}
              abort: {{ http_status: 503, percent: 0 }}
            rate_limit: {{ requests_per_second: 100000000, burst: 100000000 }}
            request_headers:
              remove: [x-internal-user]
              set:
                x-gateway: weft
              add:
                x-bench: \"1\"
            response_headers:
              remove: [server]
              add:
                x-content-type-options: nosniff

{clusters}"
    )
}

/// The handshake scenarios' listeners on plain weft: TLS 1.3 only, the
/// same certificate; `mtls` requires a client certificate of the mesh CA
/// and allows the bench client's identity, as a mesh's inbound listener
/// does. weft resumes no session where client certificates are used.
fn weft_tls_listeners(certs: &HandshakeCerts) -> String {
    let certificate = format!(
        "      certificates:\n        - {{ cert_file: {:?}, key_file: {:?} }}\n      \
         min_version: \"1.3\"\n",
        certs.server_cert(),
        certs.server_key()
    );
    format!(
        "  - name: tls
    address: 127.0.0.1:0
    route_config: main
    tls:
{certificate}  - name: mtls
    address: 127.0.0.1:0
    route_config: main
    tls:
{certificate}      client_ca_file: {ca:?}
      allowed_identities: [{CLIENT_ID:?}]
",
        ca = certs.ca(),
    )
}

/// Picks `count` distinct free loopback ports (bound together, then
/// released for the proxy to take).
fn free_ports(count: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("picking free loopback ports")?;
    listeners
        .iter()
        .map(|listener| listener.local_addr().context("reading a picked port"))
        .collect()
}

/// Ports of nginx or HAProxy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReferencePorts {
    pub(crate) http1: SocketAddr,
    pub(crate) h2: SocketAddr,
    pub(crate) tcp: SocketAddr,
    /// The handshake scenarios' server-only TLS listener.
    pub(crate) tls: SocketAddr,
    /// The handshake scenarios' mutual-TLS listener.
    pub(crate) mtls: SocketAddr,
}

async fn start_reference(
    kind: TargetKind,
    ctx: &StartContext<'_>,
    name: &str,
) -> anyhow::Result<ProxyProcess> {
    let picked = free_ports(5)?;
    let ports = ReferencePorts {
        http1: picked[0],
        h2: picked[1],
        tcp: picked[2],
        tls: picked[3],
        mtls: picked[4],
    };
    let log = ctx.work_dir.join(format!("{name}.log"));
    let (mut command, tcp) = match kind {
        TargetKind::Nginx => {
            let nginx = ctx
                .programs
                .nginx
                .as_ref()
                .map_err(|r| anyhow::anyhow!("{r}"))?;
            let dir = ctx.work_dir.join(name);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let config = nginx_config(
                &dir,
                ctx.upstream,
                ports,
                ctx.programs.nginx_stream.as_ref().ok(),
                ctx.limits,
                ctx.handshake,
            );
            let config_path = dir.join("nginx.conf");
            std::fs::write(&config_path, config)
                .with_context(|| format!("writing {}", config_path.display()))?;
            let mut command = base_command(ctx, nginx, &log)?;
            command
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(&log)
                .arg("-c")
                .arg(&config_path)
                .stdout(Stdio::null());
            let tcp = match &ctx.programs.nginx_stream {
                Ok(_) => Ok(ports.tcp),
                Err(reason) => Err(reason.clone()),
            };
            (command, tcp)
        }
        TargetKind::Haproxy => {
            let haproxy = ctx
                .programs
                .haproxy
                .as_ref()
                .map_err(|r| anyhow::anyhow!("{r}"))?;
            let config_path = ctx.work_dir.join(format!("{name}.cfg"));
            std::fs::write(
                &config_path,
                haproxy_config(ctx.upstream, ports, ctx.limits, ctx.handshake),
            )
            .with_context(|| format!("writing {}", config_path.display()))?;
            let mut command = base_command(ctx, haproxy, &log)?;
            command
                .arg("-db")
                .arg("-f")
                .arg(&config_path)
                .stdout(Stdio::null());
            (command, Ok(ports.tcp))
        }
        TargetKind::Direct
        | TargetKind::Weft
        | TargetKind::WeftFull
        | TargetKind::WeftSidecars
        | TargetKind::WeftSidecarsMtls => {
            bail!("{} is not a reference proxy", kind.name())
        }
    };
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", kind.name()))?;
    let master = child
        .id()
        .with_context(|| format!("{} exited at once", kind.name()))?;
    let mut probes = vec![ports.http1, ports.h2];
    if let Ok(tcp) = tcp {
        probes.push(tcp);
    }
    let (tls, mtls) = if ctx.handshake.is_some() {
        probes.extend([ports.tls, ports.mtls]);
        (Ok(ports.tls), Ok(ports.mtls))
    } else {
        let reason = no_tls_listener(kind, false);
        (Err(reason.clone()), Err(reason))
    };
    let deadline = Instant::now() + START_TIMEOUT;
    wait_listening(&mut child, &probes, deadline)
        .await
        .with_context(|| format!("{} did not start; its log:\n{}", kind.name(), tail(&log)))?;
    let (pid, master_pid) = if kind == TargetKind::Nginx {
        (nginx_worker(master, deadline).await?, Some(master))
    } else {
        (master, None)
    };
    Ok(ProxyProcess {
        pid,
        master_pid,
        endpoints: Endpoints {
            http1: ports.http1,
            h2: ports.h2,
            tcp,
            tls,
            mtls,
        },
        child,
        pgid: Some(master),
        log,
        next_hop: None,
        collector: None,
    })
}

/// Waits until every address accepts a connection, failing if the process
/// exits or `deadline` passes.
async fn wait_listening(
    child: &mut tokio::process::Child,
    addrs: &[SocketAddr],
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        if let Some(status) = child.try_wait().context("checking the process")? {
            bail!("exited with {status}");
        }
        let mut all_up = true;
        for addr in addrs {
            let connect = tokio::net::TcpStream::connect(addr);
            if !matches!(
                tokio::time::timeout(PROBE_INTERVAL * 10, connect).await,
                Ok(Ok(_))
            ) {
                all_up = false;
                break;
            }
        }
        if all_up {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("not listening on {addrs:?} within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// The single worker of nginx master `master`.
async fn nginx_worker(master: u32, deadline: Instant) -> anyhow::Result<u32> {
    loop {
        if let Some(&worker) = system::children_of(master).await.first() {
            return Ok(worker);
        }
        if Instant::now() >= deadline {
            bail!("nginx master {master} has no worker process");
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// nginx's configuration (`dir` holds its pid and temp paths). With
/// `tls`, two more servers proxy like the HTTP/1.1 one: a server-only TLS
/// one with session tickets and a session cache, and a mutual-TLS one
/// (`ssl_verify_client on`) without either, as weft allows no resumption
/// with client certificates. Without `NumTickets 0`, OpenSSL would still
/// send two (useless) TLS 1.3 tickets per connection there; weft sends
/// none.
pub(crate) fn nginx_config(
    dir: &Path,
    upstream: Upstream,
    ports: ReferencePorts,
    stream: Option<&Option<PathBuf>>,
    limits: Limits,
    tls: Option<&HandshakeCerts>,
) -> String {
    let dir = dir.display();
    let worker_connections = limits.nginx_worker_connections();
    let mut config = String::new();
    if let Some(Some(module)) = stream {
        let _ = writeln!(config, "load_module {};", module.display());
    }
    let location = "proxy_pass http://echo;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
      proxy_request_buffering off;";
    let _ = write!(
        config,
        "# weft-bench compare: nginx, one worker, upstream keep-alive, streaming bodies.
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
worker_rlimit_nofile {nofile};
events {{ worker_connections {worker_connections}; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  client_max_body_size 16m;
  upstream echo {{ server {echo}; keepalive 64; keepalive_requests 1000000; }}
  upstream echo_grpc {{ server {echo}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen {h1};
    location / {{
      {location}
    }}
  }}
  server {{
    listen {h2} http2;
    location / {{
      {location}
    }}
    location /weft.echo.v1.Echo/ {{
      grpc_pass grpc://echo_grpc;
    }}
  }}
",
        nofile = limits.open_files,
        echo = upstream.http,
        h1 = ports.http1,
        h2 = ports.h2,
    );
    if let Some(certs) = tls {
        let certificate = format!(
            "ssl_certificate {};
    ssl_certificate_key {};
    ssl_protocols TLSv1.3;",
            certs.server_cert().display(),
            certs.server_key().display()
        );
        let _ = write!(
            config,
            "  server {{
    listen {tls} ssl;
    {certificate}
    ssl_session_cache shared:weft_bench:10m;
    ssl_session_tickets on;
    location / {{
      {location}
    }}
  }}
  server {{
    listen {mtls} ssl;
    {certificate}
    ssl_verify_client on;
    ssl_client_certificate {ca};
    ssl_verify_depth 2;
    ssl_session_cache off;
    ssl_session_tickets off;
    ssl_conf_command NumTickets 0;
    location / {{
      {location}
    }}
  }}
",
            tls = ports.tls,
            mtls = ports.mtls,
            ca = certs.ca().display(),
        );
    }
    config.push_str("}\n");
    if stream.is_some() {
        let _ = write!(
            config,
            "stream {{
  server {{
    listen {tcp};
    proxy_pass {echo_tcp};
  }}
}}
",
            tcp = ports.tcp,
            echo_tcp = upstream.tcp,
        );
    }
    config
}

/// HAProxy's configuration. With `tls`, two more frontends lead to the
/// HTTP/1.1 backend: server-only TLS (session tickets and cache on, the
/// defaults) and mutual TLS (`verify required`, `no-tls-tickets`).
pub(crate) fn haproxy_config(
    upstream: Upstream,
    ports: ReferencePorts,
    limits: Limits,
    tls: Option<&HandshakeCerts>,
) -> String {
    let tls_frontends = tls.map_or_else(String::new, |certs| {
        let bind = format!(
            "ssl crt {} ssl-min-ver TLSv1.3 alpn http/1.1",
            certs.haproxy_pem().display()
        );
        format!(
            "frontend fe_tls
  bind {tls} {bind}
  default_backend be_h1
frontend fe_mtls
  bind {mtls} {bind} ca-file {ca} verify required no-tls-tickets
  default_backend be_h1
",
            tls = ports.tls,
            mtls = ports.mtls,
            ca = certs.ca().display(),
        )
    });
    format!(
        "# weft-bench compare: HAProxy, one thread, upstream keep-alive.
global
  nbthread 1
  maxconn {maxconn}
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout http-keep-alive 600s
  option http-keep-alive
frontend fe_h1
  bind {h1}
  default_backend be_h1
frontend fe_h2
  bind {h2} proto h2
  default_backend be_h2
backend be_h1
  http-reuse always
  server echo {echo}
backend be_h2
  http-reuse always
  server echo {echo} proto h2
frontend fe_tcp
  mode tcp
  bind {tcp}
  default_backend be_tcp
backend be_tcp
  mode tcp
  server echo {echo_tcp}
{tls_frontends}",
        maxconn = limits.haproxy_maxconn(),
        h1 = ports.http1,
        h2 = ports.h2,
        tcp = ports.tcp,
        echo = upstream.http,
        echo_tcp = upstream.tcp,
    )
}
