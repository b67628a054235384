//! Istio's standard metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`, `istio_tcp_*`), with Istio's names and labels,
//! so that Istio's dashboards and alerts work on a Weft mesh unchanged.
//!
//! A listener with `istio_metrics` reports one side of each call: the
//! callee's (`reporter="destination"`, a sidecar's inbound listener: the
//! caller is known by the SPIFFE ID it proved) or the caller's
//! (`reporter="source"`, an outbound listener or a gateway: the callee is
//! the cluster the request went to). Every label value comes from
//! configuration or from a verified identity, never from a request; the
//! series of a listener are capped (`max_series`), and what comes past the
//! cap is counted in one series whose labels say `other`.
//!
//! The other party's labels (a caller, or a cluster) are rendered once,
//! when the party is first seen, and numbered; a request then finds its
//! series by a number packed from the party's, the status, the gRPC
//! status, the flag and the protocol.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::metrics::escape;
use crate::config::{IstioMetrics as Settings, IstioReporter, IstioWorkload};

/// `istio_request_duration_milliseconds`'s buckets (Envoy's defaults, which
/// Istio keeps).
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// The size histograms' buckets: powers of ten, 1 B to 1 GB.
const SIZE_BUCKETS: [f64; 10] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Weft's response flags and Envoy's short codes for them, which Istio's
/// `response_flags` label carries. Index 0 is "no flag".
const FLAGS: [(&str, &str); 20] = [
    ("", "-"),
    ("no_route", "NR"),
    ("malformed_request", "DPE"),
    ("headers_too_large", "DPE"),
    ("downstream_body_error", "DPE"),
    ("no_healthy_endpoint", "UH"),
    ("upstream_connect_failure", "UF"),
    ("upstream_tls_failure", "UF"),
    ("upstream_connect_timeout", "UF"),
    ("upstream_protocol_error", "UPE"),
    ("upstream_reset", "UR"),
    ("upstream_timeout", "UT"),
    ("upstream_per_try_timeout", "UT"),
    ("upstream_overflow", "UO"),
    ("fault_delay", "DI"),
    ("fault_abort", "FI"),
    ("policy_denied", "UAEX"),
    ("rate_limited", "RL"),
    ("stream_idle_timeout", "SI"),
    ("other", "-"),
];

/// A flag's index in [`FLAGS`]; an unknown flag is "other".
fn flag_index(flag: &str) -> usize {
    if flag.is_empty() {
        return 0;
    }
    FLAGS
        .iter()
        .position(|(name, _)| *name == flag)
        .unwrap_or(FLAGS.len() - 1)
}

/// What a request's series says about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http,
    Grpc,
    Tcp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Grpc => "grpc",
            Self::Tcp => "tcp",
        }
    }
}

/// A series' key: party (32 bits), status (10), gRPC status (5, 31 for
/// none), flag (5), protocol (2).
fn key(party: u32, status: u16, grpc_status: Option<u8>, flag: usize, protocol: Protocol) -> u64 {
    let grpc = u64::from(grpc_status.map_or(31, |s| s.min(30)));
    u64::from(party)
        | (u64::from(status.min(1023)) << 32)
        | (grpc << 42)
        | ((flag as u64) << 47)
        | ((protocol as u64) << 52)
}

/// The key every request past the cap counts under.
const FOLDED: u64 = u64::MAX;

/// A histogram with fixed bounds; the sum is kept in integer units
/// (microseconds or bytes).
#[derive(Debug)]
struct Buckets<const N: usize> {
    counts: [AtomicU64; N],
    above: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Default for Buckets<N> {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            above: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Buckets<N> {
    /// Counts `value` (in the bounds' unit) and adds `units` to the sum.
    fn observe(&self, bounds: &[f64; N], value: f64, units: u64) {
        match bounds.iter().position(|&le| value <= le) {
            Some(i) => self.counts[i].fetch_add(1, Relaxed),
            None => self.above.fetch_add(1, Relaxed),
        };
        self.sum.fetch_add(units, Relaxed);
    }

    /// Writes the series; `scale` turns the sum's units into the bounds'.
    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64; N], scale: f64) {
        let mut cumulative = 0;
        for (count, le) in self.counts.iter().zip(bounds) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.above.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.sum.load(Relaxed) as f64 * scale;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// One HTTP series: its labels, rendered once, and its counters.
#[derive(Debug, Default)]
struct HttpSeries {
    labels: String,
    requests: AtomicU64,
    duration: Buckets<19>,
    request_bytes: Buckets<10>,
    response_bytes: Buckets<10>,
    request_messages: AtomicU64,
    response_messages: AtomicU64,
}

/// One TCP series.
#[derive(Debug, Default)]
pub(crate) struct TcpSeries {
    labels: String,
    opened: AtomicU64,
    closed: AtomicU64,
    /// Bytes read from the client and sent upstream.
    pub(crate) received: AtomicU64,
    /// Bytes read from the upstream and sent to the client.
    pub(crate) sent: AtomicU64,
}

/// An open TCP connection's series: counts the close when dropped.
#[derive(Debug)]
pub(crate) struct TcpConnection(Arc<TcpSeries>);

impl std::ops::Deref for TcpConnection {
    type Target = TcpSeries;

    fn deref(&self) -> &TcpSeries {
        &self.0
    }
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        self.0.closed.fetch_add(1, Relaxed);
    }
}

/// The other party of a call, as its labels were rendered.
#[derive(Debug)]
struct Party {
    /// Everything from `reporter` to `destination_cluster`.
    labels: String,
    /// `connection_security_policy`.
    security: &'static str,
}

/// Hashes a packed series key: one multiplication, its high half folded
/// into the low (where the table takes its bucket), instead of SipHash
/// on every request. The keys come from configuration and verified
/// identities (numbered parties), not from what a client chooses.
#[derive(Debug, Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let mixed = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = mixed ^ (mixed >> 32);
    }
}

type Series<T> = HashMap<u64, Arc<T>, std::hash::BuildHasherDefault<KeyHasher>>;

#[derive(Debug, Default)]
struct Table {
    /// Parties by caller identity or callee cluster.
    by_name: HashMap<Arc<str>, u32>,
    parties: Vec<Party>,
    http: Series<HttpSeries>,
    tcp: Series<TcpSeries>,
}

/// A listener's Istio metrics.
#[derive(Debug)]
pub(crate) struct IstioMetrics {
    pub(crate) settings: Arc<Settings>,
    /// The SPIFFE ID this listener proves to its callers, if any
    /// (`destination_principal` of a destination reporter).
    own_principal: Option<Arc<str>>,
    table: Mutex<Table>,
    /// Requests and connections counted in the folded series.
    pub(crate) folded: AtomicU64,
}

/// What a finished request adds to its series.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    pub(crate) party: u32,
    pub(crate) status: u16,
    pub(crate) grpc_status: Option<u8>,
    pub(crate) protocol: Protocol,
    pub(crate) flag: &'static str,
    pub(crate) duration: Duration,
    pub(crate) request_bytes: u64,
    pub(crate) response_bytes: u64,
    /// gRPC messages the client sent and the response carried.
    pub(crate) request_messages: u64,
    pub(crate) response_messages: u64,
}

const UNKNOWN: &str = "unknown";

/// The namespace a SPIFFE ID of Istio's shape names
/// (`spiffe://<td>/ns/<namespace>/sa/<account>`).
fn spiffe_namespace(id: &str) -> Option<&str> {
    let path = id.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut parts = path.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("ns"), Some(namespace), Some("sa")) if !namespace.is_empty() => Some(namespace),
        _ => None,
    }
}

/// Writes one side's workload labels (`prefix` is `source` or
/// `destination`). `known` marks a workload the configuration describes,
/// whose cluster is `cluster_id`.
fn workload_labels(
    out: &mut String,
    prefix: &str,
    workload: &IstioWorkload,
    principal: Option<&str>,
    fallback_namespace: Option<&str>,
    cluster: &str,
) {
    let text = |v: &Option<String>| v.as_deref().unwrap_or(UNKNOWN).to_owned();
    let name = text(&workload.name);
    let namespace = workload
        .namespace
        .as_deref()
        .or(fallback_namespace)
        .unwrap_or(UNKNOWN);
    let app = text(&workload.app);
    let version = text(&workload.version);
    let canonical_service = workload
        .app
        .as_deref()
        .or(workload.name.as_deref())
        .unwrap_or(UNKNOWN);
    let canonical_revision = workload.version.as_deref().unwrap_or("latest");
    let _ = write!(
        out,
        ",{prefix}_workload=\"{}\",{prefix}_workload_namespace=\"{}\",{prefix}_principal=\"{}\",\
         {prefix}_app=\"{}\",{prefix}_version=\"{}\",{prefix}_canonical_service=\"{}\",\
         {prefix}_canonical_revision=\"{}\",{prefix}_cluster=\"{}\"",
        escape(&name),
        escape(namespace),
        escape(principal.unwrap_or(UNKNOWN)),
        escape(&app),
        escape(&version),
        escape(canonical_service),
        escape(canonical_revision),
        escape(cluster),
    );
}

/// `destination_service`, `destination_service_name` and
/// `destination_service_namespace`.
fn service_labels(out: &mut String, service: &str, namespace: &str) {
    let name = service.split('.').next().unwrap_or(service);
    let _ = write!(
        out,
        ",destination_service=\"{}\",destination_service_name=\"{}\",destination_service_namespace=\"{}\"",
        escape(service),
        escape(name),
        escape(namespace),
    );
}

impl IstioMetrics {
    /// A listener's metrics; `own_principal` is the identity its TLS
    /// proves, if any.
    pub(crate) fn new(settings: Arc<Settings>, own_principal: Option<Arc<str>>) -> Self {
        Self {
            settings,
            own_principal,
            table: Mutex::new(Table::default()),
            folded: AtomicU64::new(0),
        }
    }

    /// The identity the listener proves, as its labels name it.
    pub(crate) fn own_principal(&self) -> Option<&str> {
        self.own_principal.as_deref()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Each change is one insert: a poisoned table is still whole.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cluster_id(&self) -> &str {
        self.settings.cluster_id.as_deref().unwrap_or(UNKNOWN)
    }

    /// A destination reporter's caller: the SPIFFE ID it proved, if any.
    /// Looked up once per connection.
    pub(crate) fn caller(&self, identity: Option<&Arc<str>>) -> u32 {
        let name: Arc<str> = identity.cloned().unwrap_or_else(|| Arc::from(""));
        self.party(name, || {
            let settings = &self.settings;
            let listed = identity.and_then(|id| settings.sources.get(&**id));
            let mut labels = String::from("reporter=\"destination\"");
            workload_labels(
                &mut labels,
                "source",
                listed.unwrap_or(&IstioWorkload::default()),
                identity.map(|id| &**id),
                identity.and_then(|id| spiffe_namespace(id)),
                if listed.is_some() {
                    self.cluster_id()
                } else {
                    UNKNOWN
                },
            );
            let own = &settings.workload;
            workload_labels(
                &mut labels,
                "destination",
                own,
                self.own_principal.as_deref(),
                None,
                self.cluster_id(),
            );
            service_labels(
                &mut labels,
                own.service.as_deref().unwrap_or(UNKNOWN),
                own.namespace.as_deref().unwrap_or(UNKNOWN),
            );
            Party {
                labels,
                // A caller that proved an identity came over mutual TLS.
                security: if identity.is_some() {
                    "mutual_tls"
                } else {
                    "none"
                },
            }
        })
    }

    /// A source reporter's callee: a cluster (`""` for a direct
    /// response), with the identities its TLS presents and expects.
    /// Looked up once per snapshot.
    pub(crate) fn callee(
        &self,
        cluster: &Arc<str>,
        own_identity: Option<&str>,
        server_identity: Option<&str>,
    ) -> u32 {
        self.party(cluster.clone(), || {
            let settings = &self.settings;
            let listed = settings.destinations.get(&**cluster);
            let mut labels = String::from("reporter=\"source\"");
            workload_labels(
                &mut labels,
                "source",
                &settings.workload,
                own_identity,
                None,
                self.cluster_id(),
            );
            let callee = listed.cloned().unwrap_or_default();
            workload_labels(
                &mut labels,
                "destination",
                &callee,
                server_identity,
                server_identity.and_then(spiffe_namespace),
                if listed.is_some() {
                    self.cluster_id()
                } else {
                    UNKNOWN
                },
            );
            let service = callee
                .service
                .as_deref()
                .or((!cluster.is_empty()).then_some(&**cluster))
                .unwrap_or(UNKNOWN);
            let namespace = callee
                .namespace
                .as_deref()
                .or(server_identity.and_then(spiffe_namespace))
                .unwrap_or(UNKNOWN);
            service_labels(&mut labels, service, namespace);
            Party {
                labels,
                // Istio's source reporter does not say.
                security: UNKNOWN,
            }
        })
    }

    /// Numbers a party, rendering its labels the first time. Past the
    /// cap, every new party is the folded one.
    fn party(&self, name: Arc<str>, labels: impl FnOnce() -> Party) -> u32 {
        let mut table = self.table();
        if let Some(&index) = table.by_name.get(&name) {
            return index;
        }
        if table.parties.len() >= self.settings.max_series as usize {
            return u32::MAX;
        }
        let index = table.parties.len() as u32;
        table.parties.push(labels());
        table.by_name.insert(name, index);
        index
    }

    /// The labels of a new series, or `None` past the cap.
    fn series_labels(
        &self,
        table: &Table,
        party: u32,
        protocol: Protocol,
        response: Option<(u16, Option<u8>)>,
        flag: usize,
    ) -> Option<String> {
        let count = table.http.len() + table.tcp.len();
        if count >= self.settings.max_series as usize {
            return None;
        }
        let party = table.parties.get(party as usize)?;
        let mut labels = party.labels.clone();
        let _ = write!(labels, ",request_protocol=\"{}\"", protocol.as_str());
        if let Some((status, grpc)) = response {
            let _ = write!(
                labels,
                ",response_code=\"{status}\",grpc_response_status=\""
            );
            if let Some(grpc) = grpc {
                let _ = write!(labels, "{grpc}");
            }
            labels.push('"');
        }
        let _ = write!(
            labels,
            ",response_flags=\"{}\",connection_security_policy=\"{}\"",
            FLAGS[flag].1, party.security
        );
        Some(labels)
    }

    /// The labels of the folded series.
    fn folded_labels(&self, protocol: Protocol) -> String {
        let reporter = match self.settings.reporter {
            IstioReporter::Source => "source",
            IstioReporter::Destination => "destination",
        };
        let mut labels = format!("reporter=\"{reporter}\"");
        for side in ["source", "destination"] {
            for label in [
                "workload",
                "workload_namespace",
                "principal",
                "app",
                "version",
                "canonical_service",
                "canonical_revision",
                "cluster",
            ] {
                let _ = write!(labels, ",{side}_{label}=\"other\"");
            }
        }
        labels.push_str(",destination_service=\"other\",destination_service_name=\"other\",destination_service_namespace=\"other\"");
        let _ = write!(labels, ",request_protocol=\"{}\"", protocol.as_str());
        if protocol != Protocol::Tcp {
            labels.push_str(",response_code=\"other\",grpc_response_status=\"other\"");
        }
        labels.push_str(",response_flags=\"other\",connection_security_policy=\"other\"");
        labels
    }

    /// Counts a finished HTTP request.
    pub(crate) fn record(&self, request: &Request) {
        let flag = flag_index(request.flag);
        let key = key(
            request.party,
            request.status,
            request.grpc_status,
            flag,
            request.protocol,
        );
        let series = {
            let mut table = self.table();
            match table.http.get(&key) {
                Some(series) => series.clone(),
                None => {
                    let labels = self.series_labels(
                        &table,
                        request.party,
                        request.protocol,
                        Some((request.status, request.grpc_status)),
                        flag,
                    );
                    let (key, labels) = match labels {
                        Some(labels) => (key, labels),
                        None => {
                            self.folded.fetch_add(1, Relaxed);
                            (FOLDED, self.folded_labels(request.protocol))
                        }
                    };
                    table
                        .http
                        .entry(key)
                        .or_insert_with(|| {
                            Arc::new(HttpSeries {
                                labels,
                                ..HttpSeries::default()
                            })
                        })
                        .clone()
                }
            }
        };
        series.requests.fetch_add(1, Relaxed);
        let micros = u64::try_from(request.duration.as_micros()).unwrap_or(u64::MAX);
        series.duration.observe(
            &DURATION_BUCKETS_MS,
            request.duration.as_secs_f64() * 1e3,
            micros,
        );
        series.request_bytes.observe(
            &SIZE_BUCKETS,
            request.request_bytes as f64,
            request.request_bytes,
        );
        series.response_bytes.observe(
            &SIZE_BUCKETS,
            request.response_bytes as f64,
            request.response_bytes,
        );
        if request.request_messages > 0 {
            series
                .request_messages
                .fetch_add(request.request_messages, Relaxed);
        }
        if request.response_messages > 0 {
            series
                .response_messages
                .fetch_add(request.response_messages, Relaxed);
        }
    }

    /// Counts an opened TCP connection; the series counts its bytes as
    /// they move and its close.
    pub(crate) fn tcp_opened(&self, party: u32) -> TcpConnection {
        let key = key(party, 0, None, 0, Protocol::Tcp);
        let series = {
            let mut table = self.table();
            match table.tcp.get(&key) {
                Some(series) => series.clone(),
                None => {
                    let (key, labels) =
                        match self.series_labels(&table, party, Protocol::Tcp, None, 0) {
                            Some(labels) => (key, labels),
                            None => {
                                self.folded.fetch_add(1, Relaxed);
                                (FOLDED, self.folded_labels(Protocol::Tcp))
                            }
                        };
                    table
                        .tcp
                        .entry(key)
                        .or_insert_with(|| {
                            Arc::new(TcpSeries {
                                labels,
                                ..TcpSeries::default()
                            })
                        })
                        .clone()
                }
            }
        };
        series.opened.fetch_add(1, Relaxed);
        TcpConnection(series)
    }
}

/// Renders every listener's Istio series, one family at a time.
pub(crate) fn render<'a>(out: &mut String, listeners: impl Iterator<Item = &'a IstioMetrics>) {
    let tables: Vec<_> = listeners.map(IstioMetrics::table).collect();
    counter(
        out,
        "istio_requests_total",
        "Requests, with Istio's standard labels.",
        tables
            .iter()
            .flat_map(|t| t.http.values())
            .map(|s| (&*s.labels, &s.requests)),
    );
    out.push_str("# HELP istio_request_duration_milliseconds Time from request headers to the end of the response, in milliseconds.\n");
    out.push_str("# TYPE istio_request_duration_milliseconds histogram\n");
    for table in &tables {
        for series in table.http.values() {
            series.duration.render(
                out,
                "istio_request_duration_milliseconds",
                &series.labels,
                &DURATION_BUCKETS_MS,
                1e-3,
            );
        }
    }
    for (name, help, read) in [
        (
            "istio_request_bytes",
            "Request body sizes, in bytes.",
            (|s| &s.request_bytes) as fn(&HttpSeries) -> &Buckets<10>,
        ),
        (
            "istio_response_bytes",
            "Response body sizes, in bytes.",
            |s| &s.response_bytes,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for table in &tables {
            for series in table.http.values() {
                read(series).render(out, name, &series.labels, &SIZE_BUCKETS, 1.0);
            }
        }
    }
    // Only series that carried gRPC messages (gRPC calls, or a folded
    // series a gRPC call was folded into) have message counts.
    let with_messages = |series: &&Arc<HttpSeries>| {
        series.request_messages.load(Relaxed) > 0 || series.response_messages.load(Relaxed) > 0
    };
    for (name, help, read) in [
        (
            "istio_request_messages_total",
            "gRPC messages sent by clients.",
            (|s| &s.request_messages) as fn(&HttpSeries) -> &AtomicU64,
        ),
        (
            "istio_response_messages_total",
            "gRPC messages sent to clients.",
            |s| &s.response_messages,
        ),
    ] {
        let series = tables
            .iter()
            .flat_map(|t| t.http.values().filter(with_messages));
        counter(out, name, help, series.map(|s| (&*s.labels, read(s))));
    }
    for (name, help, read) in [
        (
            "istio_tcp_connections_opened_total",
            "TCP connections opened.",
            (|s| &s.opened) as fn(&TcpSeries) -> &AtomicU64,
        ),
        (
            "istio_tcp_connections_closed_total",
            "TCP connections closed.",
            |s| &s.closed,
        ),
        (
            "istio_tcp_received_bytes_total",
            "Bytes received from clients on TCP connections.",
            |s| &s.received,
        ),
        (
            "istio_tcp_sent_bytes_total",
            "Bytes sent to clients on TCP connections.",
            |s| &s.sent,
        ),
    ] {
        let series = tables.iter().flat_map(|t| t.tcp.values());
        counter(out, name, help, series.map(|s| (&*s.labels, read(s))));
    }
}

/// One counter family: its help, its type and a sample per series.
fn counter<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    samples: impl Iterator<Item = (&'a str, &'a AtomicU64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {}", value.load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, app: &str, version: Option<&str>) -> IstioWorkload {
        IstioWorkload {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            app: Some(app.into()),
            version: version.map(Into::into),
            service: Some(format!("{app}.shop")),
        }
    }

    fn settings(reporter: IstioReporter, max_series: u32) -> Arc<Settings> {
        Arc::new(Settings {
            reporter,
            workload: workload("backend-v1", "backend", Some("v1")),
            cluster_id: Some("east".into()),
            sources: [(
                "spiffe://mesh.local/ns/shop/sa/frontend".to_owned(),
                workload("frontend", "frontend", None),
            )]
            .into(),
            destinations: [(
                "backend.v1".to_owned(),
                workload("backend-v1", "backend", Some("v1")),
            )]
            .into(),
            max_series,
        })
    }

    fn request(party: u32, status: u16, flag: &'static str) -> Request {
        Request {
            party,
            status,
            grpc_status: None,
            protocol: Protocol::Http,
            flag,
            duration: Duration::from_micros(2500),
            request_bytes: 10,
            response_bytes: 1200,
            request_messages: 0,
            response_messages: 0,
        }
    }

    fn rendered(metrics: &IstioMetrics) -> String {
        let mut out = String::new();
        render(&mut out, std::iter::once(metrics));
        out
    }

    /// The value of the first sample of `name` whose labels include every
    /// one of `labels`.
    fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
        text.lines()
            .filter(|line| line.starts_with(&format!("{name}{{")))
            .find(|line| labels.iter().all(|l| line.contains(l)))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn a_destination_reporter_names_a_listed_caller_and_itself() {
        let metrics = IstioMetrics::new(
            settings(IstioReporter::Destination, 100),
            Some("spiffe://mesh.local/ns/shop/sa/backend".into()),
        );
        let caller: Arc<str> = "spiffe://mesh.local/ns/shop/sa/frontend".into();
        let party = metrics.caller(Some(&caller));
        assert_eq!(metrics.caller(Some(&caller)), party, "numbered once");
        metrics.record(&request(party, 200, ""));
        metrics.record(&request(party, 200, ""));
        metrics.record(&request(party, 503, "upstream_connect_failure"));
        let text = rendered(&metrics);
        let ok = [
            "reporter=\"destination\"",
            "source_workload=\"frontend\"",
            "source_workload_namespace=\"shop\"",
            "source_principal=\"spiffe://mesh.local/ns/shop/sa/frontend\"",
            "source_canonical_service=\"frontend\"",
            "source_canonical_revision=\"latest\"",
            "source_cluster=\"east\"",
            "destination_workload=\"backend-v1\"",
            "destination_principal=\"spiffe://mesh.local/ns/shop/sa/backend\"",
            "destination_version=\"v1\"",
            "destination_service=\"backend.shop\"",
            "destination_service_name=\"backend\"",
            "destination_service_namespace=\"shop\"",
            "request_protocol=\"http\"",
            "response_code=\"200\"",
            "grpc_response_status=\"\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ];
        assert_eq!(sample(&text, "istio_requests_total", &ok), Some(2.0));
        let failed = ["response_code=\"503\"", "response_flags=\"UF\""];
        assert_eq!(sample(&text, "istio_requests_total", &failed), Some(1.0));
        // 2.5 ms falls in the 5 ms bucket, not the 1 ms one.
        let bucket = |le: &str| {
            let le = format!("le=\"{le}\"");
            sample(
                &text,
                "istio_request_duration_milliseconds_bucket",
                &["response_code=\"200\"", &le],
            )
        };
        assert_eq!(bucket("1"), Some(0.0));
        assert_eq!(bucket("5"), Some(2.0));
        assert_eq!(
            sample(
                &text,
                "istio_request_duration_milliseconds_sum",
                &["response_code=\"200\""]
            ),
            Some(5.0)
        );
        // 1200 response bytes: above 1000, within 10000.
        let size = |le: &str| {
            let le = format!("le=\"{le}\"");
            sample(
                &text,
                "istio_response_bytes_bucket",
                &["response_code=\"200\"", &le],
            )
        };
        assert_eq!((size("1000"), size("10000")), (Some(0.0), Some(2.0)));
        assert_eq!(
            sample(&text, "istio_request_bytes_sum", &["response_code=\"200\""]),
            Some(20.0)
        );
    }

    #[test]
    fn grpc_calls_count_their_messages_and_http_series_have_none() {
        let metrics = IstioMetrics::new(settings(IstioReporter::Destination, 100), None);
        let party = metrics.caller(None);
        metrics.record(&request(party, 200, ""));
        for (sent, received) in [(3, 1), (1, 4)] {
            metrics.record(&Request {
                protocol: Protocol::Grpc,
                grpc_status: Some(0),
                request_messages: sent,
                response_messages: received,
                ..request(party, 200, "")
            });
        }
        let text = rendered(&metrics);
        let grpc = ["request_protocol=\"grpc\"", "grpc_response_status=\"0\""];
        assert_eq!(sample(&text, "istio_requests_total", &grpc), Some(2.0));
        assert_eq!(
            sample(&text, "istio_request_messages_total", &grpc),
            Some(4.0)
        );
        assert_eq!(
            sample(&text, "istio_response_messages_total", &grpc),
            Some(5.0)
        );
        let http = ["request_protocol=\"http\""];
        assert_eq!(sample(&text, "istio_requests_total", &http), Some(1.0));
        assert_eq!(sample(&text, "istio_request_messages_total", &http), None);
        assert!(text.contains("# TYPE istio_request_messages_total counter"));
    }

    #[test]
    fn an_unlisted_caller_is_known_by_its_identity_and_a_plaintext_one_not_at_all() {
        let metrics = IstioMetrics::new(settings(IstioReporter::Destination, 100), None);
        let stranger: Arc<str> = "spiffe://other.org/ns/ops/sa/cron".into();
        let party = metrics.caller(Some(&stranger));
        metrics.record(&request(party, 200, ""));
        let plaintext = metrics.caller(None);
        metrics.record(&request(plaintext, 404, "no_route"));
        let text = rendered(&metrics);
        let stranger = [
            "source_workload=\"unknown\"",
            "source_workload_namespace=\"ops\"",
            "source_principal=\"spiffe://other.org/ns/ops/sa/cron\"",
            "source_cluster=\"unknown\"",
            "destination_principal=\"unknown\"",
            "connection_security_policy=\"mutual_tls\"",
        ];
        assert_eq!(sample(&text, "istio_requests_total", &stranger), Some(1.0));
        let plaintext = [
            "source_principal=\"unknown\"",
            "source_workload_namespace=\"unknown\"",
            "response_flags=\"NR\"",
            "connection_security_policy=\"none\"",
        ];
        assert_eq!(sample(&text, "istio_requests_total", &plaintext), Some(1.0));
    }

    #[test]
    fn a_source_reporter_names_the_cluster_it_called() {
        let metrics = IstioMetrics::new(settings(IstioReporter::Source, 100), None);
        let listed = metrics.callee(
            &"backend.v1".into(),
            Some("spiffe://mesh.local/ns/shop/sa/frontend"),
            Some("spiffe://mesh.local/ns/shop/sa/backend"),
        );
        let unlisted = metrics.callee(&"legacy".into(), None, None);
        let direct = metrics.callee(&"".into(), None, None);
        let mut grpc = request(listed, 200, "");
        grpc.protocol = Protocol::Grpc;
        grpc.grpc_status = Some(14);
        metrics.record(&grpc);
        metrics.record(&request(unlisted, 200, ""));
        metrics.record(&request(direct, 200, ""));
        let text = rendered(&metrics);
        let listed = [
            "reporter=\"source\"",
            "source_workload=\"backend-v1\"",
            "source_principal=\"spiffe://mesh.local/ns/shop/sa/frontend\"",
            "destination_workload=\"backend-v1\"",
            "destination_principal=\"spiffe://mesh.local/ns/shop/sa/backend\"",
            "destination_cluster=\"east\"",
            "request_protocol=\"grpc\"",
            "grpc_response_status=\"14\"",
            "connection_security_policy=\"unknown\"",
        ];
        assert_eq!(sample(&text, "istio_requests_total", &listed), Some(1.0));
        let unlisted = [
            "destination_workload=\"unknown\"",
            "destination_service=\"legacy\"",
            "destination_service_name=\"legacy\"",
            "destination_cluster=\"unknown\"",
        ];
        assert_eq!(sample(&text, "istio_requests_total", &unlisted), Some(1.0));
        let direct = ["destination_service=\"unknown\""];
        assert_eq!(sample(&text, "istio_requests_total", &direct), Some(1.0));
    }

    #[test]
    fn series_past_the_cap_are_folded_into_one_and_counted() {
        let metrics = IstioMetrics::new(settings(IstioReporter::Destination, 2), None);
        let party = metrics.caller(None);
        for status in [200, 201, 202, 203, 204] {
            metrics.record(&request(party, status, ""));
        }
        // Parties are capped too: the third identity is folded.
        for i in 0..3 {
            let id: Arc<str> = format!("spiffe://mesh.local/ns/a/sa/s{i}").into();
            let party = metrics.caller(Some(&id));
            metrics.record(&request(party, 200, ""));
        }
        let text = rendered(&metrics);
        let series = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .count();
        assert_eq!(series, 3, "two kept and the folded one:\n{text}");
        let folded = ["source_workload=\"other\"", "response_code=\"other\""];
        let in_folded = sample(&text, "istio_requests_total", &folded);
        assert_eq!(in_folded, Some(6.0));
        assert_eq!(metrics.folded.load(Relaxed), 6);
    }

    #[test]
    fn a_tcp_connection_is_opened_counted_and_closed() {
        let metrics = IstioMetrics::new(settings(IstioReporter::Source, 10), None);
        let party = metrics.callee(&"backend.v1".into(), None, None);
        let connection = metrics.tcp_opened(party);
        connection.received.fetch_add(5, Relaxed);
        connection.sent.fetch_add(7, Relaxed);
        let open = rendered(&metrics);
        let labels = ["request_protocol=\"tcp\"", "response_flags=\"-\""];
        assert_eq!(
            sample(&open, "istio_tcp_connections_opened_total", &labels),
            Some(1.0)
        );
        assert_eq!(
            sample(&open, "istio_tcp_connections_closed_total", &labels),
            Some(0.0)
        );
        drop(connection);
        let closed = rendered(&metrics);
        assert_eq!(
            sample(&closed, "istio_tcp_connections_closed_total", &labels),
            Some(1.0)
        );
        assert_eq!(
            sample(&closed, "istio_tcp_received_bytes_total", &labels),
            Some(5.0)
        );
        assert_eq!(
            sample(&closed, "istio_tcp_sent_bytes_total", &labels),
            Some(7.0)
        );
        assert!(!closed.contains("response_code"), "no status on TCP series");
    }

    #[test]
    fn flags_become_envoy_codes() {
        assert_eq!(FLAGS[flag_index("")].1, "-");
        assert_eq!(FLAGS[flag_index("upstream_overflow")].1, "UO");
        assert_eq!(FLAGS[flag_index("fault_abort")].1, "FI");
        assert_eq!(FLAGS[flag_index("policy_denied")].1, "UAEX");
        assert_eq!(FLAGS[flag_index("rate_limited")].1, "RL");
        assert_eq!(FLAGS[flag_index("something_new")].0, "other");
    }

    #[test]
    fn namespaces_come_from_istio_shaped_ids_only() {
        assert_eq!(spiffe_namespace("spiffe://td/ns/shop/sa/x"), Some("shop"));
        assert_eq!(spiffe_namespace("spiffe://td/workload/x"), None);
        assert_eq!(spiffe_namespace("spiffe://td/ns//sa/x"), None);
        assert_eq!(spiffe_namespace("https://td/ns/shop/sa/x"), None);
    }
}
