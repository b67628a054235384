//! The control plane's status report: what `GET /status` on the admin
//! address returns, how `weft-cp status` fetches it, and how it is rendered
//! as a table.
//!
//! The report types are plain serde values shared by the server (which
//! fills them from its connection registry) and the CLI (which parses
//! them); rendering is a pure function, tested without sockets.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

/// The whole status report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// How many mesh snapshots the control plane has applied.
    pub mesh_generation: u64,
    /// Why the latest mesh change was rejected, if it was (the previous
    /// snapshot is still served).
    pub config_error: Option<String>,
    /// Every connected xDS stream, oldest first.
    pub proxies: Vec<ProxyStatus>,
}

/// The xDS protocol variant a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// State of the world (`StreamAggregatedResources`).
    Sotw,
    /// Incremental (`DeltaAggregatedResources`).
    Delta,
}

impl Protocol {
    /// The protocol's short name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sotw => "sotw",
            Self::Delta => "delta",
        }
    }
}

/// One connected xDS stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// The node id the proxy sent.
    pub node_id: String,
    /// The node's service according to the mesh (none for gateways and
    /// unknown nodes).
    pub service: Option<String>,
    /// Which protocol the stream speaks.
    pub protocol: Protocol,
    /// The proxy's address as seen by the control plane.
    pub peer: Option<SocketAddr>,
    /// The SPIFFE ID of the client certificate the stream's connection
    /// was opened with (mTLS); none for a token over cleartext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// When the stream was opened, in seconds since the Unix epoch.
    pub connected_since_unix: u64,
    /// Per type URL the proxy subscribed to.
    pub types: BTreeMap<String, TypeStatus>,
}

/// The state of one type URL on one stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TypeStatus {
    /// The last version the proxy acknowledged.
    pub acked_version: Option<String>,
    /// The last version sent to the proxy.
    pub sent_version: Option<String>,
    /// The proxy's last rejection of this type.
    pub last_nack: Option<NackStatus>,
}

/// A rejected response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NackStatus {
    /// The version the proxy rejected.
    pub version: String,
    /// The proxy's error message.
    pub error: String,
    /// When, in seconds since the Unix epoch.
    pub at_unix: u64,
}

/// Why the status could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No connection to the admin address.
    #[error("cannot connect to the control plane's admin address {addr}")]
    Connect {
        /// The admin address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The admin address did not answer in time.
    #[error("the control plane at {addr} did not answer within {timeout:?}")]
    Timeout {
        /// The admin address.
        addr: SocketAddr,
        /// The deadline.
        timeout: Duration,
    },
    /// HTTP failed.
    #[error("HTTP request to {addr} failed")]
    Http {
        /// The admin address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// The request could not be built (a token that is not a valid header
    /// value).
    #[error("invalid request (is the token a single line of visible characters?)")]
    Request(#[source] http::Error),
    /// The control plane refused the request.
    #[error("the control plane answered {status}{hint}")]
    Status {
        /// The HTTP status.
        status: http::StatusCode,
        /// A hint for the operator.
        hint: &'static str,
    },
    /// The body is not a status report.
    #[error("the control plane's status is not valid JSON")]
    Decode(#[source] serde_json::Error),
}

/// Fetches `GET /status` from the admin address and returns the raw JSON.
///
/// # Errors
///
/// When the admin address is unreachable, slow (`timeout` bounds each
/// step), refuses the token or answers something other than 200.
pub async fn fetch_json(
    addr: SocketAddr,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Bytes, FetchError> {
    let deadline = |_| FetchError::Timeout { addr, timeout };
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(deadline)?
        .map_err(|source| FetchError::Connect { addr, source })?;
    let (mut sender, conn) = tokio::time::timeout(
        timeout,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(deadline)?
    .map_err(|source| FetchError::Http { addr, source })?;
    let request = async move {
        let mut builder =
            http::Request::get("/status").header(http::header::HOST, addr.to_string());
        if let Some(token) = token {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = builder
            .body(Empty::<Bytes>::new())
            .map_err(FetchError::Request)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| FetchError::Http { addr, source })?;
        let status = response.status();
        if status != http::StatusCode::OK {
            let hint = if status == http::StatusCode::UNAUTHORIZED {
                " (pass the bootstrap token with --token-file)"
            } else {
                ""
            };
            return Err(FetchError::Status { status, hint });
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|source| FetchError::Http { addr, source })?;
        Ok(body.to_bytes())
    };
    // The connection future ends when the request is done and the sender is
    // dropped; both run concurrently on this task under one deadline.
    let joined = async {
        let (result, _) = tokio::join!(request, conn);
        result
    };
    tokio::time::timeout(timeout, joined)
        .await
        .map_err(deadline)?
}

/// Parses a status report.
///
/// # Errors
///
/// When `json` is not a status report.
pub fn parse(json: &[u8]) -> Result<StatusReport, FetchError> {
    serde_json::from_slice(json).map_err(FetchError::Decode)
}

/// Renders a report as a human-readable table: a header with the mesh
/// generation and config error, then one row per proxy.
/// `now_unix` (seconds since the Unix epoch) turns timestamps into ages.
pub fn render_table(report: &StatusReport, now_unix: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "mesh generation: {}", report.mesh_generation);
    match &report.config_error {
        Some(error) => {
            let _ = writeln!(
                out,
                "config error: {error} (serving the last good snapshot)"
            );
        }
        None => out.push_str("config error: none\n"),
    }
    let _ = writeln!(out, "connected proxies: {}", report.proxies.len());
    if report.proxies.is_empty() {
        return out;
    }
    out.push('\n');
    let header = [
        "NODE",
        "SERVICE",
        "PROTO",
        "UP",
        "CLUSTERS",
        "ROUTES",
        "LISTENERS",
        "LAST NACK",
    ];
    let mut rows: Vec<[String; 8]> = Vec::with_capacity(report.proxies.len());
    for proxy in &report.proxies {
        let acked = |suffix: &str| {
            proxy
                .types
                .iter()
                .find(|(type_url, _)| type_url.ends_with(suffix))
                .and_then(|(_, status)| status.acked_version.clone())
                .unwrap_or_else(|| "-".to_owned())
        };
        let nack = proxy
            .types
            .iter()
            .filter_map(|(type_url, status)| status.last_nack.as_ref().map(|n| (type_url, n)))
            .max_by_key(|(_, nack)| nack.at_unix)
            .map_or_else(
                || "-".to_owned(),
                |(type_url, nack)| {
                    let short = type_url.rsplit('.').next().unwrap_or(type_url);
                    format!(
                        "{short} {} {} ago: {}",
                        nack.version,
                        age(now_unix, nack.at_unix),
                        nack.error
                    )
                },
            );
        rows.push([
            proxy.node_id.clone(),
            proxy.service.clone().unwrap_or_else(|| "-".to_owned()),
            proxy.protocol.as_str().to_owned(),
            age(now_unix, proxy.connected_since_unix),
            acked(".Cluster"),
            acked(".RouteConfiguration"),
            acked(".Listener"),
            nack,
        ]);
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.zip(widths).enumerate() {
            if i + 1 == header.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// A compact age: `42s`, `7m`, `3h`, `2d`.
fn age(now_unix: u64, then_unix: u64) -> String {
    let seconds = now_unix.saturating_sub(then_unix);
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3_600 => format!("{}m", seconds / 60),
        3_600..86_400 => format!("{}h", seconds / 3_600),
        _ => format!("{}d", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_each_proxy_with_acks_and_nacks() {
        let mut types = BTreeMap::new();
        types.insert(
            "type.googleapis.com/weft.config.v1.Cluster".to_owned(),
            TypeStatus {
                acked_version: Some("c1".into()),
                sent_version: Some("c2".into()),
                last_nack: Some(NackStatus {
                    version: "c2".into(),
                    error: "cluster \"x\": bad".into(),
                    at_unix: 1_700_000_100,
                }),
            },
        );
        types.insert(
            "type.googleapis.com/weft.config.v1.Listener".to_owned(),
            TypeStatus {
                acked_version: Some("l1".into()),
                ..TypeStatus::default()
            },
        );
        let report = StatusReport {
            mesh_generation: 7,
            config_error: Some("mesh.yaml: oops".into()),
            proxies: vec![ProxyStatus {
                node_id: "web-1".into(),
                service: Some("web".into()),
                protocol: Protocol::Delta,
                peer: None,
                identity: None,
                connected_since_unix: 1_700_000_000,
                types,
            }],
        };
        let table = render_table(&report, 1_700_000_190);
        let expected = "\
mesh generation: 7
config error: mesh.yaml: oops (serving the last good snapshot)
connected proxies: 1

NODE   SERVICE  PROTO  UP  CLUSTERS  ROUTES  LISTENERS  LAST NACK
web-1  web      delta  3m  c1        -       l1         Cluster c2 1m ago: cluster \"x\": bad
";
        assert_eq!(table, expected);
        // The JSON round-trips.
        let json = serde_json::to_vec(&report).unwrap();
        assert_eq!(parse(&json).unwrap(), report);
    }

    #[test]
    fn table_without_proxies_has_no_rows() {
        let table = render_table(&StatusReport::default(), 0);
        assert_eq!(
            table,
            "mesh generation: 0\nconfig error: none\nconnected proxies: 0\n"
        );
    }
}
