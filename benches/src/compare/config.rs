//! What a comparison runs: [`CompareConfig`], with the [`Scenario`]s and
//! [`TargetKind`]s to choose from.

use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Placement;

/// A traffic pattern measured against every target.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// HTTP/1.1 keep-alive GETs without a body: closed loop for throughput
    /// and CPU per request, then an open loop at a fixed rate for latency.
    Http1,
    /// Cleartext HTTP/2 (prior knowledge) GETs, multiplexed.
    H2,
    /// Unary gRPC calls over h2c.
    Grpc,
    /// HTTP/1.1 keep-alive POSTs of 64 KiB, echoed back.
    Body64k,
    /// HTTP/1.1 with a new connection per request.
    Newconn,
    /// New TLS 1.3 connections with client certificates (mutual TLS),
    /// each making a full handshake (no resumption: weft allows none with
    /// client certificates) and one HTTP/1.1 GET.
    Handshake,
    /// New server-only TLS 1.3 connections, each making one HTTP/1.1 GET:
    /// once with every handshake full, once resuming sessions.
    HandshakeResume,
    /// Opaque TCP through a TCP listener: 64 KiB echoed per round trip.
    Tcp,
    /// Memory per idle keep-alive connection (RSS growth over N
    /// connections that made one request each).
    Idle,
    /// Resident memory of each proxy after start, before any traffic.
    IdleRss,
}

impl Scenario {
    /// Every scenario, in the order they run.
    pub const ALL: [Self; 10] = [
        Self::IdleRss,
        Self::Idle,
        Self::Http1,
        Self::H2,
        Self::Grpc,
        Self::Body64k,
        Self::Newconn,
        Self::Handshake,
        Self::HandshakeResume,
        Self::Tcp,
    ];

    /// The scenario's command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2 => "h2",
            Self::Grpc => "grpc",
            Self::Body64k => "body64k",
            Self::Newconn => "newconn",
            Self::Handshake => "handshake",
            Self::HandshakeResume => "handshake-resume",
            Self::Tcp => "tcp",
            Self::Idle => "idle",
            Self::IdleRss => "idle-rss",
        }
    }

    /// Whether the scenario measures memory on fresh processes rather than
    /// load through the shared ones.
    pub fn is_memory(self) -> bool {
        matches!(self, Self::Idle | Self::IdleRss)
    }

    /// Whether the scenario measures TLS handshakes (and needs the
    /// targets' TLS listeners).
    pub fn is_handshake(self) -> bool {
        matches!(self, Self::Handshake | Self::HandshakeResume)
    }
}

/// Something traffic is sent to.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// The echo upstream itself, no proxy: the baseline.
    Direct,
    /// `weft-proxy` with one HTTP listener, one route, one cluster (and a
    /// TCP listener for the `tcp` scenario).
    Weft,
    /// `weft-proxy` with every feature built today configured.
    WeftFull,
    /// Two `weft-proxy` processes chained as a mesh runs them: the client
    /// sidecar's outbound listener routes to the server sidecar's inbound
    /// listener, which routes to the echo. Each is configured as `weft`.
    /// The hop between them is cleartext.
    #[serde(rename = "weft-s2s")]
    #[value(name = "weft-s2s")]
    WeftSidecars,
    /// `weft-s2s` with mutual TLS on the HTTP hop between the sidecars, as
    /// a mesh runs it: SPIFFE certificates from the mesh CA (ECDSA P-256),
    /// each side verifying the other's identity, TLS 1.3.
    #[serde(rename = "weft-s2s-mtls")]
    #[value(name = "weft-s2s-mtls")]
    WeftSidecarsMtls,
    /// nginx, one worker.
    Nginx,
    /// HAProxy, one thread.
    Haproxy,
}

impl TargetKind {
    /// Every target, in the order runs interleave.
    pub const ALL: [Self; 7] = [
        Self::Direct,
        Self::Weft,
        Self::WeftFull,
        Self::WeftSidecars,
        Self::WeftSidecarsMtls,
        Self::Nginx,
        Self::Haproxy,
    ];

    /// The target's command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Weft => "weft",
            Self::WeftFull => "weft-full",
            Self::WeftSidecars => "weft-s2s",
            Self::WeftSidecarsMtls => "weft-s2s-mtls",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
        }
    }

    /// Whether this is one of the reference proxies (nginx, HAProxy) that
    /// ratios are taken against. `weft-s2s` never is: it is two proxies.
    pub fn is_reference(self) -> bool {
        matches!(self, Self::Nginx | Self::Haproxy)
    }

    /// Whether this is a weft configuration.
    pub fn is_weft(self) -> bool {
        matches!(
            self,
            Self::Weft | Self::WeftFull | Self::WeftSidecars | Self::WeftSidecarsMtls
        )
    }

    /// Whether traffic crosses more than one proxy process (whose CPU and
    /// memory are then summed).
    pub fn is_proxy_chain(self) -> bool {
        matches!(self, Self::WeftSidecars | Self::WeftSidecarsMtls)
    }
}

/// Where third-party programs (nginx, haproxy, taskset, prlimit, apt-get)
/// are looked for, and whether missing proxies may be installed.
#[derive(Clone, Debug)]
pub struct Tools {
    /// Directories searched, in `PATH` syntax; `None`: the process's
    /// `PATH`.
    pub search_path: Option<OsString>,
    /// Try `apt-get install -y nginx-light libnginx-mod-stream haproxy` when a reference proxy
    /// is missing. Honoured only when running as root and `CI` is unset.
    pub allow_install: bool,
}

impl Tools {
    /// The process's `PATH`, installing allowed (subject to root and `CI`).
    pub fn system() -> Self {
        Self {
            search_path: None,
            allow_install: true,
        }
    }

    /// No third-party program at all: nginx and HAProxy are skipped.
    pub fn none() -> Self {
        Self {
            search_path: Some(OsString::new()),
            allow_install: false,
        }
    }
}

/// A comparison's parameters. Build one with [`CompareConfig::new`] and
/// adjust the public fields.
#[derive(Clone, Debug)]
pub struct CompareConfig {
    /// Scenarios to run (run in [`Scenario::ALL`] order whatever the order
    /// here).
    pub scenarios: Vec<Scenario>,
    /// Targets to measure (interleaved in [`TargetKind::ALL`] order).
    pub targets: Vec<TargetKind>,
    /// Measured window of each load run.
    pub duration: Duration,
    /// Unrecorded load before each load run's window.
    pub warmup: Duration,
    /// Rounds: each load run is repeated this many times per target,
    /// interleaved, and medians are reported.
    pub rounds: NonZeroUsize,
    /// The open-loop rate of the `http1` fixed-rate run; `None`: 0.6 / the
    /// best peer's (nginx's or HAProxy's) CPU seconds per request in the
    /// closed-loop run, so that its core is about 60 % busy.
    pub rate: Option<f64>,
    /// HTTP/1.1 connections (h2 and gRPC use a quarter of them, with 4
    /// streams each, for the same requests in flight).
    pub connections: NonZeroUsize,
    /// Idle keep-alive connections opened by the `idle` scenario (reduced,
    /// with a note, when file descriptors are short).
    pub idle_connections: usize,
    /// `idle-rss`: how long a new process is left to settle before its
    /// memory is read.
    pub settle: Duration,
    /// `idle`: the pause after the warm connection and after each batch of
    /// 500 connections (weft parks a connection idle for a second).
    pub idle_pause: Duration,
    /// The `weft-proxy` executable.
    pub weft_bin: PathBuf,
    /// Where third-party programs are found.
    pub tools: Tools,
    /// CPU placement of the proxies (the current process is already placed).
    pub placement: Placement,
    /// Drive `http1-max` with wrk and `h2-max` with h2load when they are
    /// found (on [`CompareConfig::tools`]' search path); `false`: the
    /// built-in generator drives every run.
    pub external_drivers: bool,
    /// Directory for generated configs, logs and access logs (created).
    pub work_dir: PathBuf,
}

impl CompareConfig {
    /// Every scenario against every target: 3 rounds of 5 s after 1 s of
    /// warm-up, 16 connections, 10,000 idle connections opened with 1.5 s
    /// pauses, the system's tools, unpinned.
    pub fn new(weft_bin: PathBuf, work_dir: PathBuf) -> Self {
        Self {
            scenarios: Scenario::ALL.to_vec(),
            targets: TargetKind::ALL.to_vec(),
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            rounds: NonZeroUsize::new(3).expect("3 is not zero"),
            rate: None,
            connections: NonZeroUsize::new(16).expect("16 is not zero"),
            idle_connections: 10_000,
            settle: Duration::from_secs(1),
            idle_pause: Duration::from_millis(1500),
            weft_bin,
            tools: Tools::system(),
            placement: Placement::unpinned("not requested"),
            external_drivers: true,
            work_dir,
        }
    }

    /// Checks what the types do not.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.scenarios.is_empty(), "no scenario selected");
        anyhow::ensure!(!self.targets.is_empty(), "no target selected");
        anyhow::ensure!(!self.duration.is_zero(), "duration must not be zero");
        if let Some(rate) = self.rate {
            anyhow::ensure!(
                rate.is_finite() && rate > 0.0,
                "rate must be a positive number of requests per second, got {rate}"
            );
        }
        Ok(())
    }

    /// The selected scenarios, deduplicated, in run order.
    pub(crate) fn scenarios_in_order(&self) -> Vec<Scenario> {
        Scenario::ALL
            .into_iter()
            .filter(|scenario| self.scenarios.contains(scenario))
            .collect()
    }

    /// The selected targets, deduplicated, in interleaving order.
    pub(crate) fn targets_in_order(&self) -> Vec<TargetKind> {
        TargetKind::ALL
            .into_iter()
            .filter(|target| self.targets.contains(target))
            .collect()
    }
}
