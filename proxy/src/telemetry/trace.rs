//! Distributed tracing: the trace context a request arrives with (W3C
//! Trace Context, or B3 in its single- and multi-header forms), the
//! sampling decision, the context written to each upstream attempt, and
//! the spans handed to the exporter ([`export`]).
//!
//! A request on a listener with tracing gets a server span; each attempt
//! sent upstream gets a client span, its child, whose id is the parent the
//! upstream sees in `traceparent`. Spans are recorded only when the trace
//! is sampled (or, with `always_sample_errors`, when the request failed):
//! a request that is not costs two random ids and a header.

pub(crate) mod export;
pub(crate) mod otlp;

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method, Version};

use crate::config::Percent;

pub(crate) use export::{Exporters, Queue};

/// W3C Trace Context.
pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C Trace Context: vendor state, passed on unchanged.
pub(crate) static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// B3, single header.
static B3: HeaderName = HeaderName::from_static("b3");
static X_B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
static X_B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
static X_B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
static X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// How the caller propagated its context; the upstream gets the same
/// (plus `traceparent` always).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `traceparent` (or no context at all).
    W3c,
    /// `b3` or `x-b3-*`.
    B3,
}

/// The trace context a request arrived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Incoming {
    /// The trace and the caller's span, when the caller sent them (B3 may
    /// send a sampling decision alone).
    pub(crate) ids: Option<(u128, u64)>,
    /// The caller's sampling decision, when it made one.
    pub(crate) sampled: Option<bool>,
    pub(crate) format: Format,
}

/// Which trace context headers a request carries, one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Present(u8);

impl Present {
    const TRACEPARENT: u8 = 1;
    const TRACESTATE: u8 = 2;
    const B3: u8 = 4;
    const B3_MULTI: u8 = 8;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

/// Finds the trace context headers in one pass over the header names.
///
/// PERF: most requests carry none; a pass over their few names costs less
/// than the six hashed lookups (and eight removals) that would find out.
fn scan(headers: &HeaderMap) -> Present {
    let mut bits = 0;
    for name in headers.keys() {
        bits |= match name.as_str() {
            "traceparent" => Present::TRACEPARENT,
            "tracestate" => Present::TRACESTATE,
            "b3" => Present::B3,
            other if other.starts_with("x-b3-") => Present::B3_MULTI,
            _ => 0,
        };
    }
    Present(bits)
}

/// Reads the request's trace context: `traceparent` if valid, else B3
/// (single header, then multi); an invalid context counts as none.
#[cfg(test)]
fn extract(headers: &HeaderMap) -> Option<Incoming> {
    extract_present(headers, scan(headers))
}

fn extract_present(headers: &HeaderMap, present: Present) -> Option<Incoming> {
    if present.has(Present::TRACEPARENT)
        && let Some((trace, span, sampled)) = headers
            .get(&TRACEPARENT)
            .and_then(|v| parse_traceparent(v.as_bytes()))
    {
        return Some(Incoming {
            ids: Some((trace, span)),
            sampled: Some(sampled),
            format: Format::W3c,
        });
    }
    if present.has(Present::B3)
        && let Some(single) = headers.get(&B3)
    {
        return parse_b3_single(single.as_bytes());
    }
    if present.has(Present::B3_MULTI) {
        return parse_b3_multi(headers);
    }
    None
}

/// `version-traceid-parentid-flags`, lower-case hex (W3C Trace Context
/// §3.2). Version 00 is exactly 55 bytes; a later version may append
/// fields after a `-`; `ff` is invalid, as are all-zero ids.
fn parse_traceparent(value: &[u8]) -> Option<(u128, u64, bool)> {
    if value.len() < 55 {
        return None;
    }
    let version = lower_hex(&value[0..2])?;
    let valid_length = match version {
        0xff => false,
        0 => value.len() == 55,
        _ => value.len() == 55 || value[55] == b'-',
    };
    if !valid_length || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace = lower_hex(&value[3..35])?;
    let span = u64::try_from(lower_hex(&value[36..52])?).ok()?;
    let flags = lower_hex(&value[53..55])?;
    (trace != 0 && span != 0).then_some((trace, span, flags & 1 == 1))
}

/// `{trace}-{span}[-{sampling}[-{parent}]]` or a sampling state alone
/// (`0`, `1`, `d`).
fn parse_b3_single(value: &[u8]) -> Option<Incoming> {
    let mut fields = value.split(|&b| b == b'-');
    let first = fields.next()?;
    let Some(span) = fields.next() else {
        return Some(Incoming {
            ids: None,
            sampled: Some(b3_sampling(first)?),
            format: Format::B3,
        });
    };
    let trace = b3_trace_id(first)?;
    let span = b3_span_id(span)?;
    let sampled = match fields.next() {
        Some(state) => Some(b3_sampling(state)?),
        None => None,
    };
    if let Some(parent) = fields.next() {
        b3_span_id(parent)?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(Incoming {
        ids: Some((trace, span)),
        sampled,
        format: Format::B3,
    })
}

fn parse_b3_multi(headers: &HeaderMap) -> Option<Incoming> {
    let debug = headers
        .get(&X_B3_FLAGS)
        .is_some_and(|v| v.as_bytes() == b"1");
    let sampled = match headers.get(&X_B3_SAMPLED).map(HeaderValue::as_bytes) {
        _ if debug => Some(true),
        Some(b"1" | b"true") => Some(true),
        Some(b"0" | b"false") => Some(false),
        _ => None,
    };
    let ids = match (headers.get(&X_B3_TRACE_ID), headers.get(&X_B3_SPAN_ID)) {
        (Some(trace), Some(span)) => {
            Some((b3_trace_id(trace.as_bytes())?, b3_span_id(span.as_bytes())?))
        }
        _ => None,
    };
    if ids.is_none() && sampled.is_none() {
        return None;
    }
    Some(Incoming {
        ids,
        sampled,
        format: Format::B3,
    })
}

/// A B3 trace id: 16 or 32 hex digits (a 64-bit id is the low half).
fn b3_trace_id(value: &[u8]) -> Option<u128> {
    if value.len() != 16 && value.len() != 32 {
        return None;
    }
    any_hex(value).filter(|&id| id != 0)
}

fn b3_span_id(value: &[u8]) -> Option<u64> {
    if value.len() != 16 {
        return None;
    }
    any_hex(value)
        .and_then(|id| u64::try_from(id).ok())
        .filter(|&id| id != 0)
}

fn b3_sampling(value: &[u8]) -> Option<bool> {
    match value {
        b"1" | b"d" => Some(true),
        b"0" => Some(false),
        _ => None,
    }
}

/// Lower-case hex only (as W3C Trace Context requires), up to 32 digits.
fn lower_hex(digits: &[u8]) -> Option<u128> {
    if digits.iter().any(u8::is_ascii_uppercase) {
        return None;
    }
    any_hex(digits)
}

fn any_hex(digits: &[u8]) -> Option<u128> {
    if digits.is_empty() || digits.len() > 32 {
        return None;
    }
    digits.iter().try_fold(0u128, |acc, &d| {
        let nibble = char::from(d).to_digit(16)?;
        Some(acc << 4 | u128::from(nibble))
    })
}

/// A random id that is not zero (zero means "none" on the wire).
fn random_id(rng: &mut fastrand::Rng) -> u64 {
    loop {
        let id = rng.u64(..);
        if id != 0 {
            return id;
        }
    }
}

/// A request's place in its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Context {
    pub(crate) trace_id: u128,
    /// This proxy's server span.
    pub(crate) span_id: u64,
    /// The caller's span; 0 when this request starts the trace.
    pub(crate) parent_id: u64,
    pub(crate) sampled: bool,
    pub(crate) format: Format,
    /// The trace headers the client sent (removed before forwarding).
    pub(crate) present: Present,
}

impl Context {
    /// The context of a request with `headers`: continued from the trace
    /// context it carries, if valid; else a new trace, sampled by `sample`.
    pub(crate) fn of_request(headers: &HeaderMap, sample: Percent) -> Self {
        let present = scan(headers);
        let incoming = if present == Present::default() {
            None
        } else {
            extract_present(headers, present)
        };
        Self {
            present,
            ..Self::begin(incoming, sample)
        }
    }

    /// The context of a request that arrived with `incoming`: parent-based
    /// sampling, with `sample` deciding for new traces.
    pub(crate) fn begin(incoming: Option<Incoming>, sample: Percent) -> Self {
        crate::rng::with_thread_rng(|rng| {
            let (trace_id, parent_id) = match incoming.and_then(|i| i.ids) {
                Some(ids) => ids,
                None => (
                    u128::from(random_id(rng)) << 64 | u128::from(rng.u64(..)),
                    0,
                ),
            };
            let sampled = match incoming.and_then(|i| i.sampled) {
                Some(sampled) => sampled,
                None => sample.hit(rng.u32(..1_000_000)),
            };
            Self {
                trace_id,
                span_id: random_id(rng),
                parent_id,
                sampled,
                format: incoming.map_or(Format::W3c, |i| i.format),
                present: Present::default(),
            }
        })
    }

    /// `traceparent` naming `span_id` as the upstream's parent.
    pub(crate) fn traceparent(&self, span_id: u64) -> HeaderValue {
        // Not cut from the arena: each attempt gets its own, never a clone,
        // and a value of its own costs fewer instructions than a cut one.
        HeaderValue::from_bytes(&self.traceparent_text(span_id))
            .expect("hex digits and dashes are a valid header value")
    }

    /// [`Context::traceparent`]'s text.
    ///
    /// PERF: written digit by digit; `format!` of a `u128` in hex cost
    /// about 2,400 instructions a request (callgrind), this about 200.
    fn traceparent_text(&self, span_id: u64) -> [u8; 55] {
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
        text[3..35].copy_from_slice(&crate::made::hex_u128(self.trace_id));
        text[36..52].copy_from_slice(&crate::made::hex_u64(span_id));
        text[54] = b'0' + u8::from(self.sampled);
        text
    }

    /// `b3` (single header) naming `span_id`, for callers that sent B3.
    pub(crate) fn b3(&self, span_id: u64) -> HeaderValue {
        HeaderValue::from_bytes(&self.b3_text(span_id))
            .expect("hex digits and dashes are a valid header value")
    }

    fn b3_text(&self, span_id: u64) -> [u8; 51] {
        let mut text = *b"00000000000000000000000000000000-0000000000000000-0";
        text[0..32].copy_from_slice(&crate::made::hex_u128(self.trace_id));
        text[33..49].copy_from_slice(&crate::made::hex_u64(span_id));
        text[50] = b'0' + u8::from(self.sampled);
        text
    }
}

/// Removes every trace context header the client sent: the proxy writes
/// its own to each upstream attempt. `tracestate` stays when the caller's
/// `traceparent` was valid (its vendors' state belongs to that trace).
pub(crate) fn strip_incoming(headers: &mut HeaderMap, context: &Context) {
    let present = context.present;
    if present.has(Present::TRACEPARENT) {
        headers.remove(&TRACEPARENT);
    }
    if present.has(Present::TRACESTATE) && (context.format != Format::W3c || context.parent_id == 0)
    {
        headers.remove(&TRACESTATE);
    }
    if present.has(Present::B3) {
        headers.remove(&B3);
    }
    if present.has(Present::B3_MULTI) {
        for name in [
            &X_B3_TRACE_ID,
            &X_B3_SPAN_ID,
            &X_B3_PARENT_SPAN_ID,
            &X_B3_SAMPLED,
            &X_B3_FLAGS,
        ] {
            headers.remove(name);
        }
    }
}

/// What the cluster needs to trace an upstream attempt: carried by the
/// request's body ([`crate::body::RequestBody::set_trace`]), set by the
/// connection's part of the path for every request of a traced listener.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    pub(crate) context: Context,
    pub(crate) tracer: Arc<Tracer>,
}

impl Outbound {
    /// The context an attempt sends upstream: with a new span id, the
    /// attempt's client span, when spans of the trace may be recorded;
    /// else with the proxy's server span (never exported) standing as the
    /// upstream's parent, so that no id is drawn.
    pub(crate) fn attempt(&self) -> Propagation {
        let parent = if self.tracer.may_record(&self.context) {
            crate::rng::with_thread_rng(random_id)
        } else {
            self.context.span_id
        };
        Propagation {
            context: self.context,
            parent,
        }
    }
}

/// The trace context written into one upstream attempt: the request's
/// trace, naming `parent` as the upstream's parent span.
///
/// PERF: an HTTP/1.1 upstream gets it as header lines written with the
/// request's head ([`Propagation::write_lines`]), not as values in its
/// header map: a value made, checked and allocated, and a hashed insert,
/// cost about 620 instructions a sampled request, 350 an unsampled one,
/// which now carries its context in the body too (callgrind).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Propagation {
    context: Context,
    parent: u64,
}

impl Propagation {
    #[cfg(test)]
    pub(crate) fn new(context: Context, parent: u64) -> Self {
        Self { context, parent }
    }

    /// The id the upstream sees as its parent: the attempt's client span.
    pub(crate) fn span_id(&self) -> u64 {
        self.parent
    }

    /// Writes the context into an upstream request's headers (HTTP/2,
    /// and upgrades, which hyper writes), replacing any already there.
    pub(crate) fn insert(&self, headers: &mut HeaderMap) {
        headers.insert(&TRACEPARENT, self.context.traceparent(self.parent));
        if self.context.format == Format::B3 {
            headers.insert(&B3, self.context.b3(self.parent));
        }
    }

    /// Whether a header of this name is one [`Propagation::write_lines`]
    /// writes: one already in the request's map is not sent beside it.
    pub(crate) fn writes(&self, name: &HeaderName) -> bool {
        *name == TRACEPARENT || (self.context.format == Format::B3 && *name == B3)
    }

    /// Writes the context as HTTP/1.1 header lines, each ending in CRLF.
    pub(crate) fn write_lines(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"traceparent: ");
        out.extend_from_slice(&self.context.traceparent_text(self.parent));
        out.extend_from_slice(b"\r\n");
        if self.context.format == Format::B3 {
            out.extend_from_slice(b"b3: ");
            out.extend_from_slice(&self.context.b3_text(self.parent));
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// A span still open: it ends, and is queued, when it is dropped. The
/// request's server span ends with its response body. A client span rides
/// on its attempt's response to the connection's part of the path, which
/// keeps it as long, so that it covers the upstream's body too; an attempt
/// whose response is dropped (a retry follows) ends there.
#[derive(Debug)]
pub(crate) struct OpenSpan {
    open: Box<Open>,
}

#[derive(Debug)]
struct Open {
    tracer: Arc<Tracer>,
    span: Option<SpanRecord>,
}

impl OpenSpan {
    pub(crate) fn new(tracer: Arc<Tracer>, span: SpanRecord) -> Self {
        Self {
            open: Box::new(Open {
                tracer,
                span: Some(span),
            }),
        }
    }

    /// The span's trace and its own id.
    pub(crate) fn ids(&self) -> Option<(u128, u64)> {
        self.open.span.as_ref().map(|s| (s.trace_id, s.span_id))
    }

    /// Ends the span at `end` (a time the caller read anyway) rather than
    /// when it is dropped.
    pub(crate) fn end_at(mut self, end: u64) {
        if let Some(mut span) = self.open.span.take() {
            span.end = end;
            self.open.tracer.queue.send(&span);
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(mut span) = self.span.take() {
            span.end = crate::clock::unix_nanos_now();
            self.tracer.queue.send(&span);
        }
    }
}

/// A listener's tracer: its sampling and its exporter's queue.
#[derive(Debug)]
pub(crate) struct Tracer {
    pub(crate) sample: Percent,
    pub(crate) always_sample_errors: bool,
    pub(crate) queue: Arc<Queue>,
}

impl Tracer {
    /// Whether a span of a request in `context` may be recorded: what it
    /// needs is kept only then.
    pub(crate) fn may_record(&self, context: &Context) -> bool {
        context.sampled || self.always_sample_errors
    }

    /// Whether a span of a request in `context` that ended with `status`
    /// (0: no response) is recorded.
    pub(crate) fn records(&self, context: &Context, status: u16) -> bool {
        context.sampled || (self.always_sample_errors && (status == 0 || status >= 500))
    }
}

/// Server (a downstream request) or client (an upstream attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Server,
    Client,
}

/// One finished span, as the request path hands it to the exporter. Cheap
/// to fill (reference counts and copies); turned into OTLP attributes on
/// the exporter's task.
#[derive(Debug)]
pub(crate) struct SpanRecord {
    pub(crate) kind: Kind,
    pub(crate) trace_id: u128,
    pub(crate) span_id: u64,
    /// 0 for a trace's root.
    pub(crate) parent_id: u64,
    /// The parent is the caller's span (a server span with a parent).
    pub(crate) parent_remote: bool,
    /// Nanoseconds from the Unix epoch ([`crate::clock::unix_nanos_of`]).
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) method: Method,
    /// Server: the request path (without its query).
    pub(crate) path: Option<http::uri::PathAndQuery>,
    /// Server: the authority the client asked for.
    pub(crate) authority: Option<HeaderValue>,
    /// Server: the client's address; client: the endpoint's.
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) version: Version,
    /// Response status; 0 when none came.
    pub(crate) status: u16,
    /// Why the proxy answered or failed (`""` when it did not).
    pub(crate) flag: &'static str,
    pub(crate) listener: Option<Arc<str>>,
    pub(crate) route: Option<Arc<str>>,
    pub(crate) cluster: Option<Arc<str>>,
    /// The SPIFFE ID the client proved (server spans).
    pub(crate) peer_identity: Option<Arc<str>>,
    /// Client spans: the attempt's number, from 1.
    pub(crate) attempt: u32,
    /// Server spans: the `x-request-id`.
    pub(crate) request_id: Option<HeaderValue>,
    /// A TCP listener's connection (an L4 span: no method, path or
    /// status).
    pub(crate) l4: Option<Box<L4>>,
}

/// What an L4 span says of its connection.
#[derive(Debug, Default)]
pub(crate) struct L4 {
    /// Bytes from the client, written upstream; and back.
    pub(crate) received: u64,
    pub(crate) sent: u64,
    /// The endpoint the connection went to.
    pub(crate) upstream: Option<SocketAddr>,
    /// The ClientHello's server name (TLS passthrough).
    pub(crate) server_name: Option<Arc<str>>,
}

/// A TCP listener's connection span: a trace of its own (nothing in an
/// opaque stream can carry a context), sampled by the listener's ratio,
/// and queued when dropped, as the connection ends.
#[derive(Debug)]
pub(crate) struct ConnectionSpan {
    tracer: Arc<Tracer>,
    context: Context,
    pub(crate) record: SpanRecord,
}

impl ConnectionSpan {
    /// A span for a connection from `peer` accepted now, when the tracer
    /// may record it. Boxed: it lives in the connection's task, which
    /// most connections' (untraced) should not pay for.
    pub(crate) fn begin(
        tracer: &Arc<Tracer>,
        peer: SocketAddr,
        listener: &Arc<str>,
    ) -> Option<Box<Self>> {
        let context = Context::begin(None, tracer.sample);
        if !tracer.may_record(&context) {
            return None;
        }
        let mut record = SpanRecord::new(
            Kind::Server,
            &context,
            context.span_id,
            0,
            crate::clock::unix_nanos_now(),
            Method::default(),
        );
        record.peer = Some(peer);
        record.listener = Some(listener.clone());
        record.l4 = Some(Box::default());
        Some(Box::new(Self {
            tracer: tracer.clone(),
            context,
            record,
        }))
    }

    /// Marks the connection failed (or cut) by the proxy, with the access
    /// log's flag for why.
    pub(crate) fn fail(&mut self, flag: &'static str) {
        self.record.flag = flag;
    }

    /// The L4 part of the record.
    pub(crate) fn l4(&mut self) -> &mut L4 {
        self.record.l4.get_or_insert_with(Box::default)
    }
}

impl Drop for ConnectionSpan {
    fn drop(&mut self) {
        // An L4 span has no status: one the proxy failed counts as an
        // error, for "always sample errors".
        let status = if self.record.flag.is_empty() { 200 } else { 0 };
        if self.tracer.records(&self.context, status) {
            self.record.end = crate::clock::unix_nanos_now();
            self.tracer.queue.send(&self.record);
        }
    }
}

impl SpanRecord {
    /// A span with its ids and times; the rest empty.
    pub(crate) fn new(
        kind: Kind,
        context: &Context,
        span_id: u64,
        parent_id: u64,
        start: u64,
        method: Method,
    ) -> Self {
        Self {
            kind,
            trace_id: context.trace_id,
            span_id,
            parent_id,
            parent_remote: kind == Kind::Server && parent_id != 0,
            start,
            // Set when the span ends.
            end: start,
            method,
            path: None,
            authority: None,
            peer: None,
            version: Version::HTTP_11,
            status: 0,
            flag: "",
            listener: None,
            route: None,
            cluster: None,
            peer_identity: None,
            attempt: 0,
            request_id: None,
            l4: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    const TRACE: u128 = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736;
    const SPAN: u64 = 0x00f0_67aa_0ba9_02b7;

    #[test]
    fn traceparent_is_read_as_the_w3c_specification_examples_give_it() {
        let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            extract(&headers(&[("traceparent", sampled)])),
            Some(Incoming {
                ids: Some((TRACE, SPAN)),
                sampled: Some(true),
                format: Format::W3c
            })
        );
        let not_sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(
            extract(&headers(&[("traceparent", not_sampled)])).and_then(|i| i.sampled),
            Some(false)
        );
        // A later version may append fields; its known ones are read.
        let future =
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        assert_eq!(
            extract(&headers(&[("traceparent", future)])).and_then(|i| i.ids),
            Some((TRACE, SPAN))
        );
    }

    #[test]
    fn an_invalid_traceparent_counts_as_none() {
        for bad in [
            // Version ff, zero ids, upper case, version 00 with extra.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(extract(&headers(&[("traceparent", bad)])), None, "{bad}");
        }
    }

    #[test]
    fn b3_is_accepted_in_single_and_multi_header_forms() {
        let single = "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-05e3ac9a4f6e3b90";
        assert_eq!(
            extract(&headers(&[("b3", single)])),
            Some(Incoming {
                ids: Some((TRACE, SPAN)),
                sampled: Some(true),
                format: Format::B3
            })
        );
        // A 64-bit trace id is the low half; no sampling state: undecided.
        let short = extract(&headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7")])).unwrap();
        assert_eq!(short.ids, Some((0xa3ce_929d_0e0e_4736, SPAN)));
        assert_eq!(short.sampled, None);
        // A decision alone: "do not sample", or debug.
        assert_eq!(
            extract(&headers(&[("b3", "0")])),
            Some(Incoming {
                ids: None,
                sampled: Some(false),
                format: Format::B3
            })
        );
        assert_eq!(
            extract(&headers(&[("b3", "d")])).and_then(|i| i.sampled),
            Some(true)
        );
        assert_eq!(extract(&headers(&[("b3", "x-y-z")])), None);
        let multi = headers(&[
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "0"),
        ]);
        assert_eq!(
            extract(&multi),
            Some(Incoming {
                ids: Some((TRACE, SPAN)),
                sampled: Some(false),
                format: Format::B3
            })
        );
        let debug = headers(&[
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
        ]);
        assert_eq!(extract(&debug).and_then(|i| i.sampled), Some(true));
        // traceparent wins over B3 when both came.
        let both = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("b3", "0"),
        ]);
        assert_eq!(extract(&both).map(|i| i.format), Some(Format::W3c));
    }

    #[test]
    fn a_continued_trace_keeps_its_id_and_decision_and_a_new_one_samples_by_ratio() {
        let incoming = extract(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]));
        let context = Context::begin(incoming, Percent::ALL);
        assert_eq!(context.trace_id, TRACE);
        assert_eq!(context.parent_id, SPAN);
        assert!(!context.sampled, "the caller's decision wins over 100%");
        assert_ne!(context.span_id, 0);
        let header = context.traceparent(0x1234);
        assert_eq!(
            header,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000001234-00"
        );
        assert!(parse_traceparent(header.as_bytes()).is_some());

        // New traces at 25 %: within five standard deviations of 2500 in
        // 10,000 (the thread's generator, seeded here).
        crate::rng::with_thread_rng(|rng| rng.seed(7));
        let sampled = (0..10_000)
            .filter(|_| Context::begin(None, Percent(250_000)).sampled)
            .count();
        assert!((2283..=2717).contains(&sampled), "{sampled}");
        let fresh = Context::begin(None, Percent(0));
        assert_eq!(fresh.parent_id, 0);
        assert!(!fresh.sampled);
        assert_ne!(
            fresh.trace_id >> 64,
            0,
            "a new trace id has 128 random bits"
        );
    }

    #[test]
    fn the_clients_headers_are_replaced_by_the_proxys_own() {
        let mut map = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=1"),
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("b3", "0"),
        ]);
        let context = Context::of_request(&map, Percent::ALL);
        strip_incoming(&mut map, &context);
        assert_eq!(map.len(), 1, "{map:?}");
        assert_eq!(map["tracestate"], "vendor=1");
        // Vendor state without a valid traceparent is dropped.
        let mut map = headers(&[("tracestate", "vendor=1"), ("b3", "1")]);
        let context = Context::of_request(&map, Percent::ALL);
        strip_incoming(&mut map, &context);
        assert!(map.is_empty(), "{map:?}");
        assert_eq!(
            context.b3(0x1234),
            format!("{:032x}-0000000000001234-1", context.trace_id).as_str()
        );
    }
}
