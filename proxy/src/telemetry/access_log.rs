//! The access log: one JSON object per line, written by a dedicated thread.
//!
//! The request path only moves an [`AccessRecord`] (cheap clones of header
//! values and URI parts) into a bounded channel with `try_send`; when the
//! writer falls behind, records are dropped and counted, never waited for.
//! Formatting and I/O happen on the writer thread.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Uri};

use crate::config::AccessLogTarget;

/// Records queued at most; beyond this the log drops (and counts).
const QUEUE_CAPACITY: usize = 8192;
/// How long the writer pauses after each write (see `AccessLog::start`).
const WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

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
    /// The SPIFFE ID the client proved with its certificate (mutual TLS).
    pub peer_identity: Option<Arc<str>>,
    /// Attempts sent upstream, when a retry policy sent more than one (0
    /// or 1: not written).
    pub attempts: u32,
    /// The trace and this proxy's server span, on a listener that traces
    /// (written as `trace_id` and `span_id`, sampled or not).
    pub trace: Option<(u128, u64)>,
}

impl AccessRecord {
    /// Appends the record as one JSON object on one line, newline
    /// included. Field order is fixed; `flag` appears only when set,
    /// `upstream` is `null` when no endpoint was chosen, and
    /// `duration_ms` has microsecond resolution.
    ///
    /// PERF: written field by field straight into the writer's buffer.
    /// Through serde_json and a `String` per line and per address the
    /// writer spent about 2.3 µs of weft-full's one core per request
    /// (perf), in one burst per write interval; see benches/RESULTS.md
    /// (`cargo bench -p weft-bench --bench hotpath -- access_log`) for the
    /// figures before and after.
    pub fn write_line(&self, out: &mut impl Write) -> std::io::Result<()> {
        let authority = self
            .uri
            .authority()
            .map(http::uri::Authority::as_str)
            .or_else(|| self.host.as_ref().and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        let path = self
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let protocol = match self.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        let request_id = self
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        write!(
            out,
            "{{\"time\":\"{}\",\"listener\":",
            humantime::format_rfc3339_millis(self.start)
        )?;
        json_string(out, &self.listener)?;
        out.write_all(b",\"route\":")?;
        json_string(out, self.route.as_deref().unwrap_or(""))?;
        out.write_all(b",\"method\":")?;
        json_string(out, self.method.as_str())?;
        out.write_all(b",\"authority\":")?;
        json_string(out, authority)?;
        out.write_all(b",\"path\":")?;
        json_string(out, path)?;
        write!(
            out,
            ",\"protocol\":\"{protocol}\",\"status\":{}",
            self.status
        )?;
        if !self.flag.is_empty() {
            out.write_all(b",\"flag\":")?;
            json_string(out, self.flag)?;
        }
        match self.upstream {
            // An address's text needs no escaping.
            Some(upstream) => write!(out, ",\"upstream\":\"{upstream}\"")?,
            None => out.write_all(b",\"upstream\":null")?,
        }
        let micros = self.duration.as_micros();
        write!(
            out,
            ",\"bytes_sent\":{},\"duration_ms\":{}.{:03},\"request_id\":",
            self.bytes_sent,
            micros / 1000,
            micros % 1000
        )?;
        json_string(out, request_id)?;
        write!(out, ",\"peer\":\"{}\"", self.peer)?;
        if let Some(id) = &self.peer_identity {
            out.write_all(b",\"peer_identity\":")?;
            json_string(out, id)?;
        }
        if self.attempts > 1 {
            write!(out, ",\"attempts\":{}", self.attempts)?;
        }
        if let Some((trace_id, span_id)) = self.trace {
            write!(
                out,
                ",\"trace_id\":\"{trace_id:032x}\",\"span_id\":\"{span_id:016x}\""
            )?;
        }
        out.write_all(b"}\n")
    }
}

/// Writes `text` as a JSON string: quoted, with `"`, `\\` and control
/// characters escaped. Most values need no escape and go out in one write.
fn json_string(out: &mut impl Write, text: &str) -> std::io::Result<()> {
    out.write_all(b"\"")?;
    let bytes = text.as_bytes();
    // No early exit, so that the check compiles to a vectorised scan.
    let needs_escape = |byte: u8| byte < 0x20 || byte == b'"' || byte == b'\\' || byte == 0x7f;
    if !bytes
        .iter()
        .fold(false, |any, &byte| any | needs_escape(byte))
    {
        out.write_all(bytes)?;
        return out.write_all(b"\"");
    }
    let mut start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..0x20 | 0x7f => {
                out.write_all(&bytes[start..index])?;
                write!(out, "\\u{byte:04x}")?;
                start = index + 1;
                continue;
            }
            _ => continue,
        };
        out.write_all(&bytes[start..index])?;
        out.write_all(escape)?;
        start = index + 1;
    }
    out.write_all(&bytes[start..])?;
    out.write_all(b"\"")
}

/// A record a [`LineLog`] writes: one line, newline included.
pub trait LogLine: Send + 'static {
    /// How lines are laid out (the writer thread holds it).
    type Format: Send + 'static;
    /// Appends the line to `out`.
    fn write_line(&self, format: &Self::Format, out: &mut impl Write) -> std::io::Result<()>;
}

impl LogLine for AccessRecord {
    /// JSON when `None`.
    type Format = Option<Arc<AccessTemplate>>;

    fn write_line(&self, format: &Self::Format, out: &mut impl Write) -> std::io::Result<()> {
        match format {
            None => AccessRecord::write_line(self, out),
            Some(template) => template.write(self, out),
        }
    }
}

/// The access log's fields, by the names the JSON lines and templates use.
const FIELDS: [&str; 19] = [
    "time",
    "listener",
    "route",
    "method",
    "authority",
    "path",
    "protocol",
    "status",
    "flag",
    "upstream",
    "bytes_sent",
    "duration_ms",
    "request_id",
    "peer",
    "peer_identity",
    "attempts",
    "trace_id",
    "span_id",
    "duration_us",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// One of [`FIELDS`].
    Field(&'static str),
}

/// A line layout of the user's: text with `{field}` placeholders (`{{` and
/// `}}` for braces), parsed once; an absent value is written as `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessTemplate {
    pieces: Vec<Piece>,
}

impl AccessTemplate {
    /// Parses `text`; an unknown field or an unclosed brace is an error
    /// that names it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    let Some(field) = FIELDS.iter().find(|f| **f == name) else {
                        return Err(format!(
                            "unknown field {{{name}}} (known: {})",
                            FIELDS.join(", ")
                        ));
                    };
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Field(field));
                }
                '}' => return Err("a lone `}` (write `}}` for a brace)".into()),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Field(_))) {
            return Err("names no field".into());
        }
        Ok(Self { pieces })
    }

    /// Writes `record` as one line.
    fn write(&self, record: &AccessRecord, out: &mut impl Write) -> std::io::Result<()> {
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.write_all(text.as_bytes())?,
                Piece::Field(field) => record.write_field(field, out)?,
            }
        }
        out.write_all(b"\n")
    }
}

impl AccessRecord {
    /// One field as template text: unquoted, `-` when absent.
    fn write_field(&self, field: &str, out: &mut impl Write) -> std::io::Result<()> {
        let or_dash = |text: &str| if text.is_empty() { "-" } else { text }.to_owned();
        let text = match field {
            "time" => humantime::format_rfc3339_millis(self.start).to_string(),
            "listener" => self.listener.to_string(),
            "route" => or_dash(self.route.as_deref().unwrap_or("")),
            "method" => self.method.to_string(),
            "authority" => or_dash(
                self.uri
                    .authority()
                    .map(http::uri::Authority::as_str)
                    .or_else(|| self.host.as_ref().and_then(|h| h.to_str().ok()))
                    .unwrap_or(""),
            ),
            "path" => self
                .uri
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str)
                .to_owned(),
            "protocol" => match self.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            }
            .to_owned(),
            "status" => self.status.to_string(),
            "flag" => or_dash(self.flag),
            "upstream" => self.upstream.map_or_else(|| "-".into(), |u| u.to_string()),
            "bytes_sent" => self.bytes_sent.to_string(),
            "duration_ms" => {
                let micros = self.duration.as_micros();
                format!("{}.{:03}", micros / 1000, micros % 1000)
            }
            "duration_us" => self.duration.as_micros().to_string(),
            "request_id" => or_dash(
                self.request_id
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
            ),
            "peer" => self.peer.to_string(),
            "peer_identity" => or_dash(self.peer_identity.as_deref().unwrap_or("")),
            "attempts" => self.attempts.max(1).to_string(),
            "trace_id" => self
                .trace
                .map_or_else(|| "-".into(), |(trace, _)| format!("{trace:032x}")),
            "span_id" => self
                .trace
                .map_or_else(|| "-".into(), |(_, span)| format!("{span:016x}")),
            _ => "-".into(),
        };
        // A client's text (path, authority) must not break the line.
        if text.bytes().any(|b| b.is_ascii_control()) {
            let clean: String = text
                .chars()
                .map(|c| if c.is_ascii_control() { '?' } else { c })
                .collect();
            out.write_all(clean.as_bytes())
        } else {
            out.write_all(text.as_bytes())
        }
    }
}

/// The access-log sink.
pub type AccessLog = LineLog<AccessRecord>;

impl AccessLog {
    /// Opens the target and starts the access log's writer thread: JSON
    /// lines, or `template`'s.
    pub fn start(
        target: &AccessLogTarget,
        template: Option<Arc<AccessTemplate>>,
    ) -> std::io::Result<Self> {
        Self::start_named(target, template, "weft-access-log")
    }
}

/// A log of one line per record, written by a thread of its own (the
/// access log, the policy decision log). Cloning shares the one writer.
///
/// PERF: the queue is an unbounded channel bounded by a counter, not a
/// bounded channel: the bounded one allocates and initialises all of its
/// slots up front, 8192 records of about 350 bytes, which was 2.8 MiB of a
/// weft-full proxy's resident memory at rest (10.1 MiB against 7.3,
/// benches/RESULTS.md).
/// The list-based channel holds only what is queued.
#[derive(Debug)]
pub struct LineLog<R> {
    tx: Sender<R>,
    /// Records sent and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    dropped: Arc<AtomicU64>,
    /// Set to have the writer open its file again before its next write.
    reopen: Arc<AtomicBool>,
}

impl<R> Clone for LineLog<R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            queued: self.queued.clone(),
            capacity: self.capacity,
            dropped: self.dropped.clone(),
            reopen: self.reopen.clone(),
        }
    }
}

/// Opens a log's target: a file is created if missing and appended to.
fn open_target(target: &AccessLogTarget) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match target {
        AccessLogTarget::Stdout => Box::new(std::io::stdout()),
        AccessLogTarget::Stderr => Box::new(std::io::stderr()),
        AccessLogTarget::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
    })
}

impl<R: LogLine> LineLog<R> {
    /// Opens the target and starts the writer thread, named `thread`.
    pub fn start_named(
        target: &AccessLogTarget,
        format: R::Format,
        thread: &str,
    ) -> std::io::Result<Self> {
        let out = open_target(target)?;
        let (log, rx) = Self::queue(QUEUE_CAPACITY);
        let queued = log.queued.clone();
        let reopen = log.reopen.clone();
        let target = target.clone();
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                let mut buf = std::io::BufWriter::with_capacity(64 * 1024, out);
                // Block for one record, then take whatever else is queued before
                // flushing, so a burst costs one write.
                while let Ok(record) = rx.recv() {
                    // Rotation: the file was moved away and SIGHUP sent;
                    // the next lines go to a new file at the same path.
                    if reopen.swap(false, Relaxed) {
                        match open_target(&target) {
                            Ok(out) => {
                                let _ = buf.flush();
                                buf = std::io::BufWriter::with_capacity(64 * 1024, out);
                            }
                            Err(error) => {
                                tracing::warn!(%error, "log reopen failed; writing to the file held open");
                            }
                        }
                    }
                    let mut ok = true;
                    for record in std::iter::once(record).chain(rx.try_iter()) {
                        queued.fetch_sub(1, Relaxed);
                        ok &= record.write_line(&format, &mut buf).is_ok();
                    }
                    if !(ok && buf.flush().is_ok()) {
                        tracing::warn!("log write failed");
                    }
                    // PERF: without this pause the writer drained the queue
                    // faster than requests filled it and went back to
                    // waiting, so every request woke it: a context switch
                    // per request on the proxy's core (perf: 15 % of
                    // weft-full's time in wake-ups and task switches). A
                    // line now waits at most this long, and a busy proxy
                    // wakes the writer at most 1,000 times a second. At
                    // 10 ms each batch (about 400 lines at 40k req/s) held
                    // the proxy's one core long enough to show in the p99:
                    // weft-full at --max, 1.2-1.6 ms at 10 ms, 0.6-0.9 ms
                    // at 2 ms, 0.6-0.7 ms at 1 ms, the same CPU per request
                    // (benches/RESULTS.md).
                    std::thread::park_timeout(WRITE_INTERVAL);
                }
            })?;
        Ok(log)
    }
}

impl<R> LineLog<R> {
    /// A sink holding at most `capacity` queued records, and the receiving
    /// end its writer reads.
    fn queue(capacity: usize) -> (Self, Receiver<R>) {
        let (tx, rx) = mpsc::channel();
        let log = Self {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            capacity,
            dropped: Arc::new(AtomicU64::new(0)),
            reopen: Arc::new(AtomicBool::new(false)),
        };
        (log, rx)
    }

    /// Has the writer open its target again before its next line (after a
    /// rotation moved the file away).
    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
    }

    /// A sink and its queue's receiving end, without a writer thread.
    #[cfg(test)]
    pub(crate) fn queue_for_tests(capacity: usize) -> (Self, Receiver<R>) {
        Self::queue(capacity)
    }

    /// Queues a record without blocking; drops it when the queue is full.
    pub fn log(&self, record: R) {
        // Relaxed: the bound is a memory cap, not an exact count.
        if self.queued.fetch_add(1, Relaxed) >= self.capacity || self.tx.send(record).is_err() {
            self.queued.fetch_sub(1, Relaxed);
            self.dropped.fetch_add(1, Relaxed);
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

    fn record() -> AccessRecord {
        AccessRecord {
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
            peer_identity: Some("spiffe://example.org/ns/a/sa/\"web\"".into()),
            attempts: 3,
            trace: Some((
                0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
                0xb7ad_6b71_6920_3331,
            )),
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_takes_records_again_once_drained() {
        let (log, rx) = AccessLog::queue(2);
        for _ in 0..3 {
            log.log(record());
        }
        assert_eq!(log.dropped(), 1);
        // What the writer takes frees its place (the writer decrements).
        rx.recv().unwrap();
        log.queued.fetch_sub(1, Relaxed);
        log.log(record());
        assert_eq!(log.dropped(), 1);
        assert_eq!(rx.try_iter().count(), 2);
        // With the writer gone, records are dropped, not queued.
        drop(rx);
        log.queued.store(0, Relaxed);
        log.log(record());
        assert_eq!(log.dropped(), 2);
        assert_eq!(log.queued.load(Relaxed), 0);
    }

    #[test]
    fn record_renders_as_one_json_line() {
        let record = record();
        let mut out = Vec::new();
        record.write_line(&mut out).unwrap();
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(out.ends_with(b"\n"));
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["authority"], "example.com");
        assert_eq!(json["path"], "/a?b=1");
        assert_eq!(json["status"], 503);
        assert_eq!(json["flag"], "upstream_connect_failure");
        assert_eq!(json["upstream"], "127.0.0.1:9");
        assert_eq!(json["duration_ms"], 1.5);
        assert_eq!(json["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(json["peer"], "127.0.0.1:5555");
        assert_eq!(
            json["peer_identity"],
            "spiffe://example.org/ns/a/sa/\"web\""
        );
        assert_eq!(json["request_id"], "abc");
        assert_eq!(json["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(json["span_id"], "b7ad6b7169203331");
    }

    #[test]
    fn a_template_lays_out_named_fields_and_dashes_for_absent_ones() {
        let template = AccessTemplate::parse(
            "{time} {method} {authority}{path} {status} {flag} {upstream} {duration_ms}ms \
             attempts={attempts} trace={trace_id} {{x}}",
        )
        .unwrap();
        let mut out = Vec::new();
        LogLine::write_line(&record(), &Some(Arc::new(template)), &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1970-01-01T00:00:00.000Z GET example.com/a?b=1 503 upstream_connect_failure \
             127.0.0.1:9 1.500ms attempts=3 trace=0af7651916cd43dd8448eb211c80319c {x}\n"
        );
        let mut bare = record();
        bare.flag = "";
        bare.upstream = None;
        bare.trace = None;
        bare.route = None;
        // A client's host may hold a tab: it must not split the field.
        bare.uri = Uri::from_static("/p");
        bare.host = Some(HeaderValue::from_static("evil\thost"));
        let template =
            AccessTemplate::parse("{route} {flag} {upstream} {span_id} {authority}").unwrap();
        let mut out = Vec::new();
        LogLine::write_line(&bare, &Some(Arc::new(template)), &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "- - - - evil?host\n");
        // JSON without a template.
        let mut out = Vec::new();
        LogLine::write_line(&record(), &None, &mut out).unwrap();
        assert!(out.starts_with(b"{\"time\""));

        for (bad, expected) in [
            ("{status} {bogus}", "unknown field {bogus}"),
            ("status }", "a lone `}`"),
            ("just text", "names no field"),
        ] {
            let error = AccessTemplate::parse(bad).unwrap_err();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    #[test]
    fn strings_are_escaped_and_read_back_unchanged() {
        for text in [
            "",
            "plain",
            "quote \" and backslash \\",
            "line\nbreak\r\ttab",
            "control \u{1} \u{1f} \u{7f}",
            "unicode é ✓ 🦀",
            "\"\"\\",
        ] {
            let mut out = Vec::new();
            json_string(&mut out, text).unwrap();
            let back: String = serde_json::from_slice(&out)
                .unwrap_or_else(|e| panic!("{text:?} -> {:?}: {e}", String::from_utf8_lossy(&out)));
            assert_eq!(back, text);
        }
    }

    #[test]
    fn a_record_without_flag_or_upstream_omits_the_flag_and_has_a_null_upstream() {
        let record = AccessRecord {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            listener: "web".into(),
            route: None,
            method: Method::POST,
            uri: Uri::from_static("http://api.example.com/p%22ath?q=\\"),
            host: None,
            version: http::Version::HTTP_2,
            status: 404,
            flag: "",
            upstream: None,
            bytes_sent: 0,
            duration: Duration::from_nanos(2_345_678),
            request_id: None,
            peer: "[::1]:5555".parse().unwrap(),
            peer_identity: None,
            attempts: 0,
            trace: None,
        };
        let mut out = Vec::new();
        record.write_line(&mut out).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(json["route"], "");
        assert_eq!(json["method"], "POST");
        assert_eq!(json["authority"], "api.example.com");
        assert_eq!(json["protocol"], "HTTP/2");
        assert!(json.get("flag").is_none(), "{json}");
        assert!(json["upstream"].is_null());
        assert_eq!(json["duration_ms"], 2.345);
        assert_eq!(json["request_id"], "");
        assert_eq!(json["peer"], "[::1]:5555");
        assert!(json.get("peer_identity").is_none());
    }
}
