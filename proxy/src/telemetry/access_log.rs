//! The access log: one JSON object per line, written by a dedicated thread.
//!
//! The request path only moves an [`AccessRecord`] (cheap clones of header
//! values and URI parts) into a bounded channel with `try_send`; when the
//! writer falls behind, records are dropped and counted, never waited for.
//! Formatting and I/O happen on the writer thread.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Uri};
use serde::Serialize;

use crate::config::AccessLogTarget;

/// Records queued at most; beyond this the log drops (and counts).
const QUEUE_CAPACITY: usize = 8192;
/// How long the writer pauses after each write (see `AccessLog::start`).
const WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// One finished request.
#[derive(Debug)]
pub struct AccessRecord {
    /// When the request's headers arrived.
    pub start: SystemTime,
    /// Listener name.
    pub listener: Arc<str>,
    /// Route name (`None` when no route matched).
    pub route: Option<Arc<str>>,
    /// Request method.
    pub method: Method,
    /// Request URI (authority and path).
    pub uri: Uri,
    /// Host header, when the URI has no authority.
    pub host: Option<HeaderValue>,
    /// HTTP version of the client.
    pub version: http::Version,
    /// Response status.
    pub status: u16,
    /// The proxy's reason for an error response (`""` when none).
    pub flag: &'static str,
    /// The upstream endpoint, if one was chosen.
    pub upstream: Option<SocketAddr>,
    /// Response body bytes sent.
    pub bytes_sent: u64,
    /// Request to end of response.
    pub duration: Duration,
    /// The `x-request-id`.
    pub request_id: Option<HeaderValue>,
    /// The client's address.
    pub peer: SocketAddr,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    listener: &'a str,
    route: &'a str,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    protocol: &'a str,
    status: u16,
    #[serde(skip_serializing_if = "str::is_empty")]
    flag: &'a str,
    upstream: Option<String>,
    bytes_sent: u64,
    duration_ms: f64,
    request_id: &'a str,
    peer: String,
}

impl AccessRecord {
    fn to_json(&self) -> String {
        let authority = self
            .uri
            .authority()
            .map(http::uri::Authority::as_str)
            .or_else(|| self.host.as_ref().and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        let line = Line {
            time: humantime::format_rfc3339_millis(self.start).to_string(),
            listener: &self.listener,
            route: self.route.as_deref().unwrap_or(""),
            method: self.method.as_str(),
            authority,
            path: self
                .uri
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str),
            protocol: match self.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            status: self.status,
            flag: self.flag,
            upstream: self.upstream.map(|a| a.to_string()),
            bytes_sent: self.bytes_sent,
            duration_ms: self.duration.as_secs_f64() * 1000.0,
            request_id: self
                .request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            peer: self.peer.to_string(),
        };
        serde_json::to_string(&line).unwrap_or_default()
    }
}

/// The access-log sink. Cloning shares the one writer.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: SyncSender<AccessRecord>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens the target and starts the writer thread.
    pub fn start(target: &AccessLogTarget) -> std::io::Result<Self> {
        let mut out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::Stderr => Box::new(std::io::stderr()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (tx, rx) = mpsc::sync_channel::<AccessRecord>(QUEUE_CAPACITY);
        std::thread::Builder::new()
            .name("weft-access-log".into())
            .spawn(move || {
                let mut buf = std::io::BufWriter::with_capacity(64 * 1024, &mut out);
                // Block for one record, then take whatever else is queued before
                // flushing, so a burst costs one write.
                while let Ok(record) = rx.recv() {
                    let mut write = |r: &AccessRecord| writeln!(buf, "{}", r.to_json());
                    let mut ok = write(&record).is_ok();
                    while let Ok(more) = rx.try_recv() {
                        ok &= write(&more).is_ok();
                    }
                    if !(ok && buf.flush().is_ok()) {
                        tracing::warn!("access log write failed");
                    }
                    // PERF: without this pause the writer drained the queue
                    // faster than requests filled it and went back to
                    // waiting, so every request woke it: a context switch
                    // per request on the proxy's core (perf: 15 % of
                    // weft-full's time in wake-ups and task switches). A
                    // line now waits at most this long, and a busy proxy
                    // wakes the writer about 100 times a second.
                    std::thread::park_timeout(WRITE_INTERVAL);
                }
            })?;
        Ok(Self {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Queues a record without blocking; drops it when the queue is full.
    pub fn log(&self, record: AccessRecord) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Records dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_renders_as_one_json_line() {
        let record = AccessRecord {
            start: SystemTime::UNIX_EPOCH,
            listener: "web".into(),
            route: Some("api".into()),
            method: Method::GET,
            uri: Uri::from_static("/a?b=1"),
            host: Some(HeaderValue::from_static("example.com")),
            version: http::Version::HTTP_11,
            status: 503,
            flag: "upstream_connect_failure",
            upstream: Some("127.0.0.1:9".parse().unwrap()),
            bytes_sent: 12,
            duration: Duration::from_micros(1500),
            request_id: Some(HeaderValue::from_static("abc")),
            peer: "127.0.0.1:5555".parse().unwrap(),
        };
        let json: serde_json::Value = serde_json::from_str(&record.to_json()).unwrap();
        assert_eq!(json["authority"], "example.com");
        assert_eq!(json["path"], "/a?b=1");
        assert_eq!(json["status"], 503);
        assert_eq!(json["flag"], "upstream_connect_failure");
        assert_eq!(json["upstream"], "127.0.0.1:9");
        assert_eq!(json["duration_ms"], 1.5);
        assert_eq!(json["time"], "1970-01-01T00:00:00.000Z");
    }
}
