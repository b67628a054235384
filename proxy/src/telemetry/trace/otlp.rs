//! OTLP's trace protobuf (`opentelemetry/proto/collector/trace/v1`),
//! written straight from span records: each span by the worker that ends
//! it ([`SpanWriter`]), a batch of written spans wrapped in its resource and
//! scope by the exporter ([`Encoder`]), in place.
//!
//! PERF: through `opentelemetry-otlp` a span became `SpanData`, then OTLP's
//! prost messages (grouped by resource and scope, every attribute a
//! `String`), then bytes: about 70,000 instructions per request at 100 %
//! sampling (callgrind, benches/RESULTS.md). Written here, field by field,
//! with the lengths of small messages computed before they are written and
//! the resource and scope encoded once, a span costs a few thousand.

use std::fmt::Write as _;

use super::{Kind, L4, SpanRecord};

/// Protobuf wire types.
pub(crate) const VARINT: u8 = 0;
pub(crate) const FIXED64: u8 = 1;
pub(crate) const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// `Span.flags`: the W3C sampled flag, and "whether the parent is remote"
/// known (bit 8) and set (bit 9).
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

#[inline]
pub(crate) fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[inline]
fn varint_len(value: u64) -> usize {
    // 1 byte per 7 bits, at least one.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
pub(crate) fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire)));
}

#[inline]
pub(crate) fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    tag(out, field, LEN);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

pub(crate) fn fixed64_field(out: &mut Vec<u8>, field: u32, value: u64) {
    tag(out, field, FIXED64);
    out.extend_from_slice(&value.to_le_bytes());
}

/// An address as text, IPv4 without the formatting machinery.
fn ip_text(out: &mut String, ip: std::net::IpAddr) {
    out.clear();
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// An attribute value.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value<'a> {
    Str(&'a str),
    Int(i64),
}

/// `KeyValue { key = 1; AnyValue value = 2 }` as field `field`, its
/// lengths computed first so that it is written in one pass.
pub(crate) fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: Value<'_>) {
    let any = match value {
        Value::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
        // `int_value` (3) is an int64: negative values take ten bytes.
        Value::Int(i) => 1 + varint_len(i as u64),
    };
    let len = 1 + varint_len(key.len() as u64) + key.len() + 1 + varint_len(any as u64) + any;
    tag(out, field, LEN);
    varint(out, len as u64);
    bytes_field(out, 1, key.as_bytes());
    tag(out, 2, LEN);
    varint(out, any as u64);
    match value {
        Value::Str(s) => bytes_field(out, 1, s.as_bytes()),
        Value::Int(i) => {
            tag(out, 3, VARINT);
            varint(out, i as u64);
        }
    }
}

/// A span attribute's key as it is written: `KeyValue.key` (field 1),
/// tag, length and text, then the tag of `KeyValue.value` (field 2).
/// Built at compile time by [`key!`].
const fn key_block<const N: usize>(key: &str) -> [u8; N] {
    let text = key.as_bytes();
    assert!(text.len() < 0x80 && N == text.len() + 3, "a short key");
    let mut block = [0; N];
    block[0] = 1 << 3 | LEN;
    block[1] = text.len() as u8;
    let mut i = 0;
    while i < text.len() {
        block[2 + i] = text[i];
        i += 1;
    }
    block[N - 1] = 2 << 3 | LEN;
    block
}

/// The written form of a span attribute's key ([`key_block`]), a constant.
macro_rules! key {
    ($key:literal) => {{
        const BLOCK: &[u8; $key.len() + 3] = &key_block::<{ $key.len() + 3 }>($key);
        BLOCK
    }};
}

/// A string attribute for each of the optional values given, by key.
macro_rules! optional_attributes {
    ($out:expr, $($key:literal => $value:expr),* $(,)?) => {
        $(
            if let Some(value) = $value {
                attribute($out, key!($key), Value::Str(value));
            }
        )*
    };
}

/// A span's attribute (`Span.attributes`, field 9): `key` as [`key!`]
/// wrote it, and `value`.
///
/// PERF: the key's bytes are written at compile time and copied in one
/// piece, and each length is known before it is written: about half the
/// instructions of [`key_value`] (which the twenty attributes of a
/// request's two spans spent about 3,400 in).
#[inline]
fn attribute<const N: usize>(out: &mut Vec<u8>, key: &[u8; N], value: Value<'_>) {
    // PERF: almost every attribute is short: its three lengths take a byte
    // each, and the attribute goes out in four copies, two of them of a
    // few bytes, instead of a push and a varint loop per field. The
    // attributes of a request's two spans took 2,412 instructions, 1,055
    // so (callgrind, benches/RESULTS.md).
    if let Value::Str(s) = value
        && key.len() + 3 + s.len() < 0x80
    {
        let any = 2 + s.len();
        let len = key.len() + 1 + any;
        out.reserve(2 + len);
        out.extend_from_slice(&[9 << 3 | LEN, len as u8]);
        out.extend_from_slice(key);
        out.extend_from_slice(&[any as u8, 1 << 3 | LEN, s.len() as u8]);
        out.extend_from_slice(s.as_bytes());
        return;
    }
    if let Value::Int(i) = value {
        // The value's length, its tag and its varint (at most ten bytes).
        let mut tail = [0; 12];
        tail[1] = 3 << 3 | VARINT;
        let mut n = 2;
        let mut v = i as u64;
        while v >= 0x80 {
            tail[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        tail[n] = v as u8;
        n += 1;
        tail[0] = (n - 1) as u8;
        let len = key.len() + n;
        if len < 0x80 {
            out.reserve(2 + len);
            out.extend_from_slice(&[9 << 3 | LEN, len as u8]);
            out.extend_from_slice(key);
            out.extend_from_slice(&tail[..n]);
            return;
        }
    }
    let any = match value {
        Value::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
        Value::Int(i) => 1 + varint_len(i as u64),
    };
    let len = key.len() + varint_len(any as u64) + any;
    out.reserve(2 + len);
    out.push(9 << 3 | LEN);
    varint(out, len as u64);
    out.extend_from_slice(key);
    varint(out, any as u64);
    match value {
        Value::Str(s) => {
            out.push(1 << 3 | LEN);
            varint(out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
        Value::Int(i) => {
            out.push(3 << 3 | VARINT);
            varint(out, i as u64);
        }
    }
}

/// A `Resource` (`service.name` and `attributes`) and the proxy's
/// `InstrumentationScope`, each as field 1 of its container
/// (`ResourceSpans` / `ResourceMetrics`, `ScopeSpans` / `ScopeMetrics`),
/// tag and all.
pub(crate) fn resource_and_scope(
    service_name: &str,
    attributes: &[(String, String)],
) -> (Vec<u8>, Vec<u8>) {
    let mut resource_body = Vec::new();
    key_value(
        &mut resource_body,
        1,
        "service.name",
        Value::Str(service_name),
    );
    for (key, value) in attributes {
        if key != "service.name" {
            key_value(&mut resource_body, 1, key, Value::Str(value));
        }
    }
    let mut resource = Vec::new();
    bytes_field(&mut resource, 1, &resource_body);
    let mut scope_body = Vec::new();
    bytes_field(&mut scope_body, 1, b"weft-proxy");
    bytes_field(&mut scope_body, 2, env!("CARGO_PKG_VERSION").as_bytes());
    let mut scope = Vec::new();
    bytes_field(&mut scope, 1, &scope_body);
    (resource, scope)
}

/// Wraps batches of written spans as `ExportTraceServiceRequest`s, in
/// place.
///
/// PERF: a batch's spans are written after [`Encoder::room`] bytes left
/// free at the start of its buffer, and the message's head (the lengths,
/// the resource and the scope, and gRPC's frame header) is written into
/// the end of that room: the spans are not copied again on their way to
/// the socket. Copying each batch three times (into the encoder, into the
/// message, into gRPC's frame) was 1,900 of the 12,000 instructions tracing
/// added to a request at 100 % sampling, and more in time than in
/// instructions, a batch being larger than the core's cache
/// (benches/RESULTS.md).
#[derive(Debug)]
pub(crate) struct Encoder {
    /// `ResourceSpans.resource` (field 1), tag and all.
    resource: Vec<u8>,
    /// `ScopeSpans.scope` (field 1), tag and all.
    scope: Vec<u8>,
}

/// gRPC's frame header: a compression flag and the message's length.
pub(crate) const GRPC_HEADER: usize = 5;

/// The most bytes a length takes as a varint.
const MAX_VARINT: usize = 10;

impl Encoder {
    /// An encoder for spans of `service_name` with more resource
    /// `attributes`.
    pub(crate) fn new(service_name: &str, attributes: &[(String, String)]) -> Self {
        let (resource, scope) = resource_and_scope(service_name, attributes);
        Self { resource, scope }
    }

    /// The bytes to leave before a batch's first span: the most the
    /// message's head and gRPC's frame header take.
    pub(crate) fn room(&self) -> usize {
        GRPC_HEADER + 2 * (1 + MAX_VARINT) + self.resource.len() + self.scope.len()
    }

    /// Writes the head of one `ExportTraceServiceRequest` whose spans (as
    /// [`SpanWriter::write`] wrote them) follow the first
    /// [`Encoder::room`] bytes of `batch`, at the end of that room, and a
    /// gRPC frame header (uncompressed, the message's length) before it.
    /// Returns where the frame header starts: the message follows it, to
    /// the end of `batch`.
    pub(crate) fn wrap(&self, batch: &mut [u8]) -> usize {
        let room = self.room();
        let spans = batch.len().saturating_sub(room);
        let scope_spans = self.scope.len() + spans;
        let resource_spans = self.resource.len() + 1 + varint_len(scope_spans as u64) + scope_spans;
        let mut head = Vec::with_capacity(room);
        head.extend_from_slice(&[0; GRPC_HEADER]);
        tag(&mut head, 1, LEN);
        varint(&mut head, resource_spans as u64);
        head.extend_from_slice(&self.resource);
        tag(&mut head, 2, LEN);
        varint(&mut head, scope_spans as u64);
        head.extend_from_slice(&self.scope);
        let message = head.len() - GRPC_HEADER + spans;
        // A message past gRPC's 4 GiB limit has a truncated length here;
        // the queue's bound keeps batches far below it.
        head[1..GRPC_HEADER].copy_from_slice(&(message as u32).to_be_bytes());
        let start = room - head.len();
        batch[start..room].copy_from_slice(&head);
        start
    }
}

/// The proxy's own decision (a fault, a policy denial, a rate limit, an
/// upstream failure) as an event at the span's end: `Event { time = 1;
/// name = 2; attributes = 3 }`, in `Span.events` (field 11).
fn flag_event(out: &mut Vec<u8>, span: &SpanRecord) {
    let mut event = Vec::with_capacity(64);
    fixed64_field(&mut event, 1, span.end);
    bytes_field(&mut event, 2, span.flag.as_bytes());
    key_value(&mut event, 3, "weft.response_flag", Value::Str(span.flag));
    bytes_field(out, 11, &event);
}

/// A failed span's status, `Status { message = 2; code = 3 (ERROR = 2) }`
/// in `Span.status` (field 15), with `message` (the `error.type`).
fn error_status(out: &mut Vec<u8>, message: &[u8]) {
    let len = 1 + varint_len(message.len() as u64) + message.len() + 2;
    tag(out, 15, LEN);
    varint(out, len as u64);
    bytes_field(out, 2, message);
    tag(out, 3, VARINT);
    out.push(2);
}

/// Writes spans as OTLP, with scratch space kept from one span to the
/// next.
#[derive(Debug, Default)]
pub(crate) struct SpanWriter {
    /// Text of an address, or an error type.
    text: String,
    /// The last peer address written for each kind of span (server,
    /// client) and its text.
    ///
    /// PERF: a sidecar's spans mostly name the same few addresses (its
    /// application, a gateway, a handful of endpoints); writing an IPv4
    /// address's text each time took about 140 instructions a span.
    peers: [(Option<std::net::IpAddr>, String); 2],
}

/// The bytes a span's length takes when written in place: a span of
/// 128 bytes to 16 KiB (every HTTP span with its short attributes).
const SPAN_LENGTH: usize = 2;

/// Writes, into the [`SPAN_LENGTH`] bytes left at `at`, the length of
/// what follows them to the end of `into`; a length of another size
/// takes its own and moves what follows.
fn write_length(into: &mut Vec<u8>, at: usize) {
    let len = into.len() - at - SPAN_LENGTH;
    if (0x80..0x4000).contains(&len) {
        into[at] = (len as u8) | 0x80;
        into[at + 1] = (len >> 7) as u8;
    } else {
        let mut length = Vec::with_capacity(MAX_VARINT);
        varint(&mut length, len as u64);
        into.splice(at..at + SPAN_LENGTH, length);
    }
}

impl SpanWriter {
    /// Appends `span` to `into` as `ScopeSpans.spans` (field 2), tag and
    /// length included: what [`Encoder::wrap`] wraps.
    ///
    /// PERF: the span is written where it goes, after room for a
    /// two-byte length filled in once the span is written (and moved in
    /// the rare case its length takes another size), rather than into
    /// scratch space and copied: one pass over its bytes, not two, and
    /// about 110 instructions fewer a traced request (callgrind).
    pub(crate) fn write(&mut self, span: &SpanRecord, into: &mut Vec<u8>) {
        tag(into, 2, LEN);
        let at = into.len();
        into.extend_from_slice(&[0; SPAN_LENGTH]);
        match &span.l4 {
            Some(l4) => self.encode_l4(span, l4, into),
            None => self.encode(span, into),
        }
        write_length(into, at);
    }

    /// Writes an HTTP span's fields into `out`.
    fn encode(&mut self, span: &SpanRecord, out: &mut Vec<u8>) {
        bytes_field(out, 1, &span.trace_id.to_be_bytes());
        bytes_field(out, 2, &span.span_id.to_be_bytes());
        if span.parent_id != 0 {
            bytes_field(out, 4, &span.parent_id.to_be_bytes());
        }
        // Name: `<METHOD> <route>` (server), `<METHOD> <cluster>` (client).
        let method = span.method.as_str();
        let what = match span.kind {
            Kind::Server => span.route.as_deref(),
            Kind::Client => span.cluster.as_deref(),
        };
        tag(out, 5, LEN);
        match what {
            Some(what) => {
                varint(out, (method.len() + 1 + what.len()) as u64);
                out.extend_from_slice(method.as_bytes());
                out.push(b' ');
                out.extend_from_slice(what.as_bytes());
            }
            None => {
                varint(out, method.len() as u64);
                out.extend_from_slice(method.as_bytes());
            }
        }
        tag(out, 6, VARINT);
        out.push(match span.kind {
            Kind::Server => 2,
            Kind::Client => 3,
        });
        fixed64_field(out, 7, span.start);
        fixed64_field(out, 8, span.end);

        attribute(out, key!("http.request.method"), Value::Str(method));
        if span.status != 0 {
            attribute(
                out,
                key!("http.response.status_code"),
                Value::Int(i64::from(span.status)),
            );
        }
        let version = match span.version {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        attribute(out, key!("network.protocol.version"), Value::Str(version));
        if let Some(path) = &span.path {
            attribute(out, key!("url.path"), Value::Str(path.path()));
        }
        if let Some(authority) = span.authority.as_ref().and_then(|a| a.to_str().ok()) {
            let host = crate::wire::host_of(authority);
            attribute(out, key!("server.address"), Value::Str(host));
        }
        if let Some(peer) = span.peer {
            let slot = match span.kind {
                Kind::Server => 0,
                Kind::Client => 1,
            };
            let (last, text) = &mut self.peers[slot];
            if *last != Some(peer.ip()) {
                ip_text(text, peer.ip());
                *last = Some(peer.ip());
            }
            let ip = Value::Str(text.as_str());
            // One name per fact: the client's address (its port is an
            // ephemeral one), the endpoint's address and port.
            match span.kind {
                Kind::Server => attribute(out, key!("network.peer.address"), ip),
                Kind::Client => {
                    attribute(out, key!("server.address"), ip);
                    attribute(out, key!("server.port"), Value::Int(i64::from(peer.port())));
                }
            }
        }
        // The route is the server span's (its client spans are its
        // children).
        let route = if span.kind == Kind::Server {
            &span.route
        } else {
            &None
        };
        optional_attributes!(out,
            "weft.listener" => &span.listener,
            "weft.route" => route,
            "weft.cluster" => &span.cluster,
            "weft.peer.identity" => &span.peer_identity,
        );
        if let Some(id) = span.request_id.as_ref().and_then(|v| v.to_str().ok()) {
            attribute(out, key!("weft.request_id"), Value::Str(id));
        }
        if span.kind == Kind::Client {
            attribute(
                out,
                key!("weft.attempt"),
                Value::Int(i64::from(span.attempt)),
            );
            if span.attempt > 1 {
                attribute(
                    out,
                    key!("http.request.resend_count"),
                    Value::Int(i64::from(span.attempt - 1)),
                );
            }
        }
        // Server spans fail on 5xx only (a 4xx is the client's); client
        // spans on any error status, or no response at all.
        let failed = match span.kind {
            Kind::Server => span.status >= 500 || span.status == 0,
            Kind::Client => span.status >= 400 || span.status == 0,
        };
        if !span.flag.is_empty() {
            attribute(out, key!("weft.response_flag"), Value::Str(span.flag));
        }
        if failed {
            self.text.clear();
            if span.flag.is_empty() {
                let _ = write!(self.text, "{}", span.status);
            } else {
                self.text.push_str(span.flag);
            }
            attribute(out, key!("error.type"), Value::Str(&self.text));
        }
        if !span.flag.is_empty() {
            flag_event(out, span);
        }
        if failed {
            error_status(out, self.text.as_bytes());
        }
        let mut flags = FLAG_SAMPLED | FLAG_HAS_IS_REMOTE;
        if span.parent_remote {
            flags |= FLAG_IS_REMOTE;
        }
        tag(out, 16, FIXED32);
        out.extend_from_slice(&flags.to_le_bytes());
    }

    /// A TCP listener's connection: named `tcp <cluster>`, a server span,
    /// with the network attributes and the bytes moved each way.
    fn encode_l4(&mut self, span: &SpanRecord, l4: &L4, out: &mut Vec<u8>) {
        bytes_field(out, 1, &span.trace_id.to_be_bytes());
        bytes_field(out, 2, &span.span_id.to_be_bytes());
        // Name: `tcp <cluster>`, written in place.
        let cluster = span.cluster.as_deref().unwrap_or("");
        tag(out, 5, LEN);
        if cluster.is_empty() {
            varint(out, 3);
            out.extend_from_slice(b"tcp");
        } else {
            varint(out, (4 + cluster.len()) as u64);
            out.extend_from_slice(b"tcp ");
            out.extend_from_slice(cluster.as_bytes());
        }
        tag(out, 6, VARINT);
        out.push(2);
        fixed64_field(out, 7, span.start);
        fixed64_field(out, 8, span.end);
        attribute(out, key!("network.transport"), Value::Str("tcp"));
        if let Some(peer) = span.peer {
            ip_text(&mut self.text, peer.ip());
            attribute(
                out,
                key!("network.peer.address"),
                Value::Str(self.text.as_str()),
            );
            attribute(
                out,
                key!("network.peer.port"),
                Value::Int(i64::from(peer.port())),
            );
        }
        if let Some(upstream) = l4.upstream {
            ip_text(&mut self.text, upstream.ip());
            attribute(out, key!("server.address"), Value::Str(self.text.as_str()));
            attribute(
                out,
                key!("server.port"),
                Value::Int(i64::from(upstream.port())),
            );
        }
        if let Some(server_name) = &l4.server_name {
            attribute(out, key!("tls.client.server_name"), Value::Str(server_name));
        }
        optional_attributes!(out,
            "weft.listener" => &span.listener,
            "weft.cluster" => &span.cluster,
            "weft.peer.identity" => &span.peer_identity,
        );
        let count = |bytes: u64| Value::Int(i64::try_from(bytes).unwrap_or(i64::MAX));
        attribute(out, key!("weft.bytes_received"), count(l4.received));
        attribute(out, key!("weft.bytes_sent"), count(l4.sent));
        if !span.flag.is_empty() {
            attribute(out, key!("weft.response_flag"), Value::Str(span.flag));
            attribute(out, key!("error.type"), Value::Str(span.flag));
            flag_event(out, span);
            error_status(out, span.flag.as_bytes());
        }
        tag(out, 16, FIXED32);
        out.extend_from_slice(&(FLAG_SAMPLED | FLAG_HAS_IS_REMOTE).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use prost::Message as _;

    use super::*;
    use crate::config::Percent;
    use crate::telemetry::trace::Context;

    /// What the workers and the exporter's task do with a batch of spans:
    /// the message, decoded, after checking gRPC's frame header.
    fn export(encoder: &Encoder, spans: &[&SpanRecord]) -> ExportTraceServiceRequest {
        let mut batch = vec![0; encoder.room()];
        for span in spans {
            SpanWriter::default().write(span, &mut batch);
        }
        let start = encoder.wrap(&mut batch);
        let framed = &batch[start..];
        assert_eq!(framed[0], 0, "not compressed");
        let len = u32::from_be_bytes(framed[1..GRPC_HEADER].try_into().unwrap()) as usize;
        assert_eq!(len, framed.len() - GRPC_HEADER);
        ExportTraceServiceRequest::decode(&framed[GRPC_HEADER..]).unwrap()
    }

    #[test]
    fn an_attribute_with_its_key_written_at_compile_time_is_the_same_key_value() {
        let long = "x".repeat(300);
        // Around the lengths where the short form ends (the whole
        // attribute's length past one byte) and where the value's own
        // lengths grow a byte.
        let edges: Vec<String> = [100, 101, 102, 103, 104, 124, 125, 126, 127, 128]
            .iter()
            .map(|&n| "y".repeat(n))
            .collect();
        for value in edges.iter().map(|s| Value::Str(s)).chain([
            Value::Str(""),
            Value::Str("GET"),
            Value::Str(&long),
            Value::Int(0),
            Value::Int(127),
            Value::Int(128),
            Value::Int(200),
            Value::Int(65535),
            Value::Int(-1),
            Value::Int(i64::MAX),
        ]) {
            let (mut ours, mut general) = (Vec::new(), Vec::new());
            super::attribute(&mut ours, key!("http.request.method"), value);
            key_value(&mut general, 9, "http.request.method", value);
            assert_eq!(ours, general, "{value:?}");
        }
    }

    fn attribute(
        span: &opentelemetry_proto::tonic::trace::v1::Span,
        key: &str,
    ) -> Option<any_value::Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone()?.value)
    }

    fn text(value: &str) -> Option<any_value::Value> {
        Some(any_value::Value::StringValue(value.to_owned()))
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        let mut out = String::new();
        for ip in [
            "0.0.0.0",
            "10.1.2.3",
            "127.0.0.1",
            "192.168.100.255",
            "::1",
            "fe80::1:2",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            ip_text(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn varints_take_seven_bits_a_byte() {
        for (value, len) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (u64::MAX, 10),
        ] {
            let mut out = Vec::new();
            varint(&mut out, value);
            assert_eq!(out.len(), len, "{value}");
            assert_eq!(varint_len(value), len, "{value}");
        }
    }

    #[test]
    fn spans_decode_as_otlp_with_every_field_and_attribute() {
        let context = Context {
            trace_id: 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
            span_id: 0x00f0_67aa_0ba9_02b7,
            parent_id: 0xb7ad_6b71_6920_3331,
            sampled: true,
            format: super::super::Format::W3c,
            present: super::super::Present::default(),
        };
        let start = 1_700_000_000_123_456_789;
        let mut server = SpanRecord::new(
            Kind::Server,
            &context,
            context.span_id,
            context.parent_id,
            start,
            http::Method::GET,
        );
        server.end = start + 1_500_000;
        server.path = Some(http::uri::PathAndQuery::from_static("/shop/cart?id=7"));
        server.authority = Some(http::HeaderValue::from_static("shop.example:8080"));
        server.peer = Some("10.1.2.3:5555".parse().unwrap());
        server.version = http::Version::HTTP_2;
        server.status = 503;
        server.flag = "fault_abort";
        server.listener = Some("ingress".into());
        server.route = Some("cart".into());
        server.peer_identity = Some("spiffe://example.org/ns/a/sa/web".into());
        server.request_id = Some(http::HeaderValue::from_static("abc"));
        let mut client = SpanRecord::new(
            Kind::Client,
            &context,
            0x1234,
            context.span_id,
            start,
            http::Method::POST,
        );
        client.end = start + 900_000;
        client.peer = Some("127.0.0.1:9001".parse().unwrap());
        client.status = 200;
        client.route = Some("cart".into());
        client.cluster = Some("carts".into());
        client.attempt = 2;

        let encoder = Encoder::new(
            "gateway",
            &[("deployment.environment".into(), "test".into())],
        );
        let request = export(&encoder, &[&server, &client]);

        assert_eq!(request.resource_spans.len(), 1);
        let resource = &request.resource_spans[0];
        let resource_attributes = &resource.resource.as_ref().unwrap().attributes;
        assert_eq!(resource_attributes[0].key, "service.name");
        assert_eq!(
            resource_attributes[0].value.clone().unwrap().value,
            text("gateway")
        );
        assert_eq!(resource_attributes[1].key, "deployment.environment");
        let scope = &resource.scope_spans[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "weft-proxy");
        assert_eq!(scope.spans.len(), 2);

        let span = &scope.spans[0];
        assert_eq!(span.trace_id, context.trace_id.to_be_bytes());
        assert_eq!(span.span_id, context.span_id.to_be_bytes());
        assert_eq!(span.parent_span_id, context.parent_id.to_be_bytes());
        assert_eq!(span.name, "GET cart");
        assert_eq!(span.kind, 2);
        assert_eq!(span.start_time_unix_nano, 1_700_000_000_123_456_789);
        assert_eq!(span.end_time_unix_nano, 1_700_000_000_124_956_789);
        assert_eq!(span.flags, 0x301, "sampled, parent remote");
        for (key, value) in [
            ("http.request.method", text("GET")),
            (
                "http.response.status_code",
                Some(any_value::Value::IntValue(503)),
            ),
            ("network.protocol.version", text("2")),
            ("url.path", text("/shop/cart")),
            ("server.address", text("shop.example")),
            ("network.peer.address", text("10.1.2.3")),
            ("weft.listener", text("ingress")),
            ("weft.route", text("cart")),
            (
                "weft.peer.identity",
                text("spiffe://example.org/ns/a/sa/web"),
            ),
            ("weft.request_id", text("abc")),
            ("weft.response_flag", text("fault_abort")),
            ("error.type", text("fault_abort")),
        ] {
            assert_eq!(attribute(span, key), value, "{key}");
        }
        assert_eq!(span.events.len(), 1);
        assert_eq!(span.events[0].name, "fault_abort");
        assert_eq!(span.events[0].time_unix_nano, span.end_time_unix_nano);
        let status = span.status.as_ref().unwrap();
        assert_eq!((status.code, status.message.as_str()), (2, "fault_abort"));

        let span = &scope.spans[1];
        assert_eq!(span.name, "POST carts");
        assert_eq!(span.kind, 3);
        assert_eq!(span.parent_span_id, context.span_id.to_be_bytes());
        assert_eq!(span.flags, 0x101, "sampled, parent local");
        assert_eq!(attribute(span, "server.address"), text("127.0.0.1"));
        assert_eq!(
            attribute(span, "server.port"),
            Some(any_value::Value::IntValue(9001))
        );
        assert_eq!(
            attribute(span, "weft.attempt"),
            Some(any_value::Value::IntValue(2))
        );
        assert_eq!(
            attribute(span, "http.request.resend_count"),
            Some(any_value::Value::IntValue(1))
        );
        assert_eq!(attribute(span, "weft.cluster"), text("carts"));
        assert_eq!(attribute(span, "weft.route"), None, "the parent's");
        assert_eq!(
            attribute(span, "network.peer.address"),
            None,
            "server.address"
        );
        assert_eq!(attribute(span, "error.type"), None);
        assert!(span.status.is_none());
        assert!(span.events.is_empty());

        // A new trace's root has no parent, in a batch of its own.
        let root = Context::begin(None, Percent::ALL);
        let record = SpanRecord::new(
            Kind::Server,
            &root,
            root.span_id,
            0,
            start,
            http::Method::GET,
        );
        let request = export(&encoder, &[&record]);
        let spans = &request.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), 1);
        assert!(spans[0].parent_span_id.is_empty());
        assert_eq!(spans[0].name, "GET");
        assert_eq!(spans[0].flags, 0x101);
    }

    #[test]
    fn a_length_written_in_place_takes_the_bytes_its_size_needs() {
        for size in [0, 5, 0x7f, 0x80, 300, 0x3fff, 0x4000, 20_000] {
            let body: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let mut into = vec![0xaa];
            into.extend_from_slice(&[0; SPAN_LENGTH]);
            into.extend_from_slice(&body);
            write_length(&mut into, 1);
            let mut expected = vec![0xaa];
            varint(&mut expected, size as u64);
            expected.extend_from_slice(&body);
            assert_eq!(into, expected, "{size}");
        }
    }

    #[test]
    fn spans_of_every_length_are_written_in_place_and_decode() {
        let context = Context::begin(None, Percent::ALL);
        let encoder = Encoder::new("gateway", &[]);
        let span_of = |path: Option<String>| {
            let mut span = SpanRecord::new(Kind::Server, &context, 7, 0, 1, http::Method::GET);
            span.status = 200;
            span.path = path.map(|p| http::uri::PathAndQuery::try_from(p).unwrap());
            span
        };
        // The usual two bytes of length, and past 16 KiB (three), one
        // after the other in a batch.
        let usual = span_of(Some("/cart".into()));
        let long_path = format!("/{}", "a".repeat(20_000));
        let long = span_of(Some(long_path.clone()));
        let mut batch = vec![0; encoder.room()];
        let mut writer = SpanWriter::default();
        for span in [&usual, &long, &usual] {
            writer.write(span, &mut batch);
        }
        let start = encoder.wrap(&mut batch);
        let request = ExportTraceServiceRequest::decode(&batch[start + GRPC_HEADER..]).unwrap();
        let spans = &request.resource_spans[0].scope_spans[0].spans;
        let paths: Vec<_> = spans
            .iter()
            .map(|span| attribute(span, "url.path"))
            .collect();
        assert_eq!(paths, [text("/cart"), text(&long_path), text("/cart")]);
    }
}
