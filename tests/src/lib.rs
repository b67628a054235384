//! End-to-end test support: start `weft-proxy` as a real process on
//! loopback ports chosen by the OS, read back what it bound, wait for
//! `/ready`, and talk to it with real clients. Echo upstreams come from
//! `weft-bench` and run in-process.
//!
//! Each test reads as the behaviour it checks; everything about processes,
//! ports and readiness lives here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

pub use weft_bench::echo::{EchoOptions, EchoServer, TcpEchoServer};

pub mod xds;

/// Generous bound for anything that should take milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The `weft-proxy` binary, built on first use so that a test run never
/// executes a stale one.
pub fn proxy_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_binary("weft-proxy", "weft-proxy"))
}

/// The `weft-cp` binary, built on first use.
pub fn cp_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_binary("weft-cp", "weft-cp"))
}

fn build_binary(package: &str, bin: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--quiet", "-p", package, "--bin", bin]);
    // `cargo test` gives this process the test crate's CARGO_PKG_*,
    // CARGO_MANIFEST_DIR and the like. Build scripts that declare them
    // (ring's does) would see them change between the two cargo
    // invocations and rebuild everything above them, twice per test run.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let keep = ["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_INCREMENTAL"].contains(&name)
            || [
                "CARGO_BUILD_",
                "CARGO_PROFILE_",
                "CARGO_REGISTRIES_",
                "CARGO_NET_",
                "CARGO_TERM_",
            ]
            .iter()
            .any(|prefix| name.starts_with(prefix));
        if name.starts_with("CARGO_") && !keep {
            build.env_remove(name);
        }
    }
    // The same profile as this test, so that the binary `cargo test` has
    // already built for the proxy's own integration tests is reused
    // instead of being built again.
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    } else {
        build.args(["--profile", "test"]);
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building {bin} failed");
    let path = profile_dir.join(bin);
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

/// A `weft-proxy` process. Killed when dropped.
#[derive(Debug)]
pub struct ProxyProcess {
    child: tokio::process::Child,
    /// The admin server's address.
    pub admin: SocketAddr,
    listeners: HashMap<String, SocketAddr>,
    dir: TempDir,
}

impl ProxyProcess {
    /// Starts a proxy from a YAML configuration and waits until `/ready`.
    /// The configuration should bind every listener and the admin server
    /// to `127.0.0.1:0`.
    pub async fn start(config: &str) -> anyhow::Result<Self> {
        let dir = TempDir::new()?;
        let path = dir.path().join("proxy.yaml");
        std::fs::write(&path, config)?;
        Self::spawn(&["--config".as_ref(), path.as_os_str()], dir).await
    }

    /// Like [`ProxyProcess::start`], without waiting for readiness (for a
    /// configuration that is not meant to become ready).
    pub async fn start_unready(config: &str) -> anyhow::Result<Self> {
        let dir = TempDir::new()?;
        let path = dir.path().join("proxy.yaml");
        std::fs::write(&path, config)?;
        Self::launch(&["--config".as_ref(), path.as_os_str()], dir).await
    }

    /// Starts a proxy with raw arguments (plus `--print-addresses`).
    pub async fn start_with_args(args: &[&str]) -> anyhow::Result<Self> {
        let dir = TempDir::new()?;
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        Self::spawn(&args, dir).await
    }

    /// Like [`ProxyProcess::start_with_args`], without waiting for
    /// readiness.
    pub async fn start_with_args_unready(args: &[&str]) -> anyhow::Result<Self> {
        let dir = TempDir::new()?;
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        Self::launch(&args, dir).await
    }

    /// Starts a proxy configured by the control plane at `xds` as node
    /// `node`, and waits until it is ready (its first configuration
    /// applied).
    pub async fn start_xds(
        xds: SocketAddr,
        node: &str,
        token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let proxy = Self::start_xds_unready(xds, node, token).await?;
        proxy.wait_ready().await?;
        Ok(proxy)
    }

    /// Like [`ProxyProcess::start_xds`], without waiting for readiness.
    pub async fn start_xds_unready(
        xds: SocketAddr,
        node: &str,
        token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let dir = TempDir::new()?;
        let xds = xds.to_string();
        let mut args: Vec<std::ffi::OsString> = vec![
            "--xds".into(),
            xds.into(),
            "--node-id".into(),
            node.into(),
            "--admin".into(),
            "127.0.0.1:0".into(),
        ];
        if let Some(token) = token {
            let path = dir.path().join("token");
            std::fs::write(&path, token)?;
            args.extend(["--token-file".into(), path.into_os_string()]);
        }
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        Self::launch(&args, dir).await
    }

    async fn spawn(args: &[&std::ffi::OsStr], dir: TempDir) -> anyhow::Result<Self> {
        let proxy = Self::launch(args, dir).await?;
        proxy.wait_ready().await?;
        Ok(proxy)
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let ready = eventually(DEADLINE, || async {
            self.admin_get("/ready").await.is_ok_and(|(s, _)| s == 200)
        })
        .await;
        anyhow::ensure!(ready, "proxy never became ready; log:\n{}", self.log());
        Ok(())
    }

    /// A listener's address as the proxy reports it now (`/listeners`);
    /// for listeners that came over xDS.
    pub async fn bound_listener(&self, name: &str) -> Option<SocketAddr> {
        let (_, body) = self.admin_get("/listeners").await.ok()?;
        let listeners: serde_json::Value = serde_json::from_str(&body).ok()?;
        listeners
            .as_array()?
            .iter()
            .find_map(|l| (l["name"] == name).then(|| l["address"].as_str()?.parse().ok())?)
    }

    async fn launch(args: &[&std::ffi::OsStr], dir: TempDir) -> anyhow::Result<Self> {
        let log = std::fs::File::create(dir.path().join("proxy.log"))?;
        // Tests drain at once unless they ask for a delay.
        let delay: &[&str] = if args.iter().any(|a| *a == "--drain-delay") {
            &[]
        } else {
            &["--drain-delay", "0s"]
        };
        let mut child = tokio::process::Command::new(proxy_binary())
            .args(args)
            .args(delay)
            .args(["--print-addresses", "--log-level", "weft_proxy=debug,info"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawning weft-proxy")?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = match tokio::time::timeout(DEADLINE, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            _ => {
                let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default();
                bail!("weft-proxy printed no addresses; its log:\n{log}");
            }
        };
        // Keep draining stdout (the access log may go there) so the proxy
        // never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let printed: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("parsing {line:?}"))?;
        let admin = printed["admin"]
            .as_str()
            .context("admin address printed")?
            .parse()?;
        let mut listeners = HashMap::new();
        for entry in printed["listeners"]
            .as_array()
            .context("listeners printed")?
        {
            let name = entry[0].as_str().context("listener name")?.to_owned();
            let addr = entry[1].as_str().context("listener address")?.parse()?;
            listeners.insert(name, addr);
        }
        Ok(Self {
            child,
            admin,
            listeners,
            dir,
        })
    }

    /// A listener's bound address.
    pub fn listener(&self, name: &str) -> SocketAddr {
        *self
            .listeners
            .get(name)
            .unwrap_or_else(|| panic!("no listener named {name:?}"))
    }

    /// GETs an admin path; returns status and body.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let response = http1_request(self.admin, get(self.admin, path)).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// The value of one Prometheus series (exact label set), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await.unwrap_or_default();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends SIGTERM (begins the drain).
    pub fn terminate(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait(&mut self) -> anyhow::Result<Option<i32>> {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .context("proxy did not exit")??;
        Ok(status.code())
    }

    /// The proxy's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// A file in the proxy's scratch directory (e.g. for an access log).
    pub fn scratch_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new() -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "weft-e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `condition` until it holds or `deadline` passes (10 ms apart).
pub async fn eventually<F, Fut>(deadline: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts an in-process echo upstream named `name` on a free port.
pub async fn echo(name: &str) -> EchoServer {
    EchoServer::bind(EchoOptions::new(loopback0()).with_name(name))
        .await
        .expect("echo server binds")
}

/// A loopback address nothing listens on, for a listener a configuration
/// names before it starts, or an endpoint every connect to is refused.
///
/// Taken below the ephemeral port range (which every `:0` bind draws
/// from), so that a process or socket bound later cannot be given the
/// same port; checked free when chosen.
pub fn unused_address() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    loop {
        let n = NEXT.fetch_add(1, Relaxed);
        let port = u16::try_from(20_000 + seed.wrapping_add(n) % 12_000).unwrap_or(20_000);
        if let Ok(socket) = std::net::TcpListener::bind(("127.0.0.1", port))
            && let Ok(address) = socket.local_addr()
        {
            return address;
        }
    }
}

/// `127.0.0.1:0`.
pub fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A GET request for `path` with `host: addr`.
pub fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    request(addr, "GET", path, Bytes::new())
}

/// A request with a body and `host: addr`.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(Full::new(body))
        .expect("test requests are well-formed")
}

/// Sends one request over a new HTTP/1.1 connection.
pub async fn http1_request<B>(
    addr: SocketAddr,
    req: Request<B>,
) -> anyhow::Result<Response<Incoming>>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut sender = http1_connect(addr).await?;
    Ok(tokio::time::timeout(DEADLINE, sender.send_request(req)).await??)
}

/// Opens an HTTP/1.1 client connection.
pub async fn http1_connect<B>(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<B>>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    Ok(sender)
}

/// Opens an HTTP/2 (prior knowledge) client connection.
pub async fn http2_connect<B>(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<B>>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one request over a new HTTP/2 connection; the URI must be
/// absolute (`http://host/path`).
pub async fn http2_request<B>(
    addr: SocketAddr,
    req: Request<B>,
) -> anyhow::Result<Response<Incoming>>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut sender = http2_connect(addr).await?;
    Ok(tokio::time::timeout(DEADLINE, sender.send_request(req)).await??)
}

/// Reads a response body to the end.
pub async fn body_bytes(response: Response<Incoming>) -> anyhow::Result<Bytes> {
    Ok(
        tokio::time::timeout(DEADLINE, response.into_body().collect())
            .await??
            .to_bytes(),
    )
}

/// A header's value as a string ("" when absent).
pub fn header<'a>(response: &'a Response<Incoming>, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Opens a TCP connection to `addr`, sends a request and asserts that the
/// proxy refuses it: a reset (at the connect, if it arrives before the
/// connect is seen to complete, or at the read) or a close with nothing
/// sent back.
pub async fn assert_connection_refused(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let reset = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionReset;
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(e) if reset(&e) => return,
        Err(e) => panic!("connect to {addr}: {e}"),
    };
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let read = stream.read(&mut buf).await;
    assert!(
        matches!(&read, Err(e) if reset(e)) || matches!(read, Ok(0)),
        "{read:?}"
    );
}

pub use weft_proxy::xds::GrpcChannel;

/// A tonic echo client over a [`GrpcChannel`] to `addr`.
pub async fn echo_client(
    addr: SocketAddr,
) -> anyhow::Result<weft_proto::echo::v1::echo_client::EchoClient<GrpcChannel>> {
    let origin: http::Uri = format!("http://{addr}").parse()?;
    Ok(weft_proto::echo::v1::echo_client::EchoClient::with_origin(
        GrpcChannel(http2_connect(addr).await?),
        origin,
    ))
}

/// The smallest proxy configuration: admin and one HTTP listener `web` on
/// port 0, one route `all` for every host and path, to one cluster `echo`
/// at `echo` speaking `protocol` upstream. `top` is spliced in at the top
/// level (e.g. `drain_timeout: 5s`); listener fields can be added by
/// replacing `route_config: main }`.
pub fn one_route_config(echo: SocketAddr, protocol: &str, top: &str) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
{top}
listeners:
  - {{ name: web, address: "127.0.0.1:0", route_config: main }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ name: all, cluster: echo }}]
clusters:
  - name: echo
    protocol: {protocol}
    endpoints: [{{ address: "{echo}" }}]
"#
    )
}
