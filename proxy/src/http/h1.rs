//! Downstream HTTP/1.1 connections, served by a codec of our own on
//! `httparse` (HTTP/2 stays with hyper).
//!
//! PERF: hyper's server dispatcher was about a third of the proxy's
//! instructions per request (benches/RESULTS.md): a general state machine
//! around every read and write, a read buffer reallocated per request
//! because header values still pointed into it while it read ahead, and
//! the request body behind a channel. Here the connection's task parses a
//! head, calls the request's future, writes the response; the request's
//! header values and a small body that came with the head are slices of
//! the read buffer, which is whole again (and reused) by the next request;
//! a larger body is read from the socket by whoever consumes it, through
//! the connection's [`Wire`].
//!
//! What this owns of HTTP/1.1 (RFC 9112), each rule tested in `h1/tests.rs`:
//! - Request heads: HTTP/1.0 and 1.1 only; at most the listener's header
//!   count and head size (431 past them, before a byte is forwarded); a
//!   head `httparse` refuses, an invalid method, target, header name or
//!   value: 400. Either way the connection closes after the answer.
//! - Request bodies: `transfer-encoding` must end in `chunked` and is
//!   refused in HTTP/1.0 and beside `content-length` (request smuggling
//!   hides in that disagreement; RFC 9112 §6.1 lets a server refuse it);
//!   `content-length` must be digits, every value the same. A body is read
//!   only as the upstream side asks for it; `expect: 100-continue` is
//!   answered when it first does. A body not read to its end by the time
//!   its response is written (an early answer) is skipped if the rest is
//!   already here, else the connection closes.
//! - Responses: `content-length` when the body's length is known, chunked
//!   when it is not (close-delimited for HTTP/1.0 clients); none for 1xx
//!   and 204; the head alone for HEAD and 304 (whose `content-length` is
//!   passed on as given); `date` when absent; `connection: close` when the
//!   connection ends after it. A 101 hands the socket to the caller after
//!   its head (an upgrade).
//! - Keep-alive: HTTP/1.1 unless either side says `close`; HTTP/1.0 only
//!   with `connection: keep-alive`. Pipelined requests are answered in
//!   order. A client that closes while its response is awaited cancels it.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::AsyncWrite;

use crate::error::BoxError;
use crate::transport::DownstreamIo;
use crate::wire::{
    Chunked, Collected, Decoder, Error, Framing, IncomingBody, Next, Upload, Wire, has_token,
    parse_length, take, write_length,
};

/// Header slots on the stack, enough for the default limit.
const STACK_HEADERS: usize = 100;
/// The longest request target accepted (what `http::Uri` can hold).
const MAX_TARGET: usize = u16::MAX as usize - 1;
/// Headers the proxy may add to a request on its way upstream.
const ADDED_HEADERS: usize = 8;

/// A listener's limits on request heads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The largest head (request line and headers), in bytes.
    pub(crate) max_head: usize,
    /// The most header lines.
    pub(crate) max_headers: usize,
}

/// Why a connection ended before its client closed it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// The request could not be parsed; it was answered 400 (or 431 when
    /// too large) and the connection closes.
    #[error("request rejected: {why}")]
    Rejected {
        /// 400, 414 (a target too long) or 431 (a head too large).
        status: u16,
        why: &'static str,
    },
    #[error("connection i/o failed")]
    Io(#[source] io::Error),
    /// The response's body failed after its head was written: the
    /// connection is cut so that the client sees the response incomplete.
    #[error("response body failed")]
    Body(#[source] BoxError),
}

/// One downstream HTTP/1.1 connection.
pub(crate) struct Server<M, F, B> {
    wire: Arc<Mutex<Wire>>,
    make: M,
    /// The request's future while it runs.
    ///
    /// PERF: its box is reused by each request rather than made per
    /// request. Between requests it waits with the connection's buffers
    /// in a kit (`crate::wire::spare`), for whichever connection on this
    /// thread reads next.
    serving: KeptBox<F>,
    phase: Phase<B>,
    ex: Exchange,
}

enum Phase<B> {
    /// Waiting for, or reading, a request head.
    Head,
    /// The request's future runs.
    Serving,
    /// The response goes out (`None`: its head only).
    Writing(Option<Upload<B>>),
    /// A rejection goes out, then the connection ends with the failure.
    Rejecting(Option<Failure>),
    /// The connection is over; with `upgraded`, its socket is the
    /// caller's.
    Done,
}

/// The box of a request's future, kept between requests.
type KeptBox<F> = Option<Pin<Box<Option<F>>>>;

/// What the connection knows of the exchange in progress, and its own
/// settings.
struct Exchange {
    limits: Limits,
    write: Vec<u8>,
    written: usize,
    /// A graceful close was asked: no request after the one in flight.
    closing: bool,
    keep_alive: bool,
    head_only: bool,
    http10: bool,
    /// A 101 was written: the socket now carries another protocol.
    upgraded: bool,
    /// Names and value positions of a head being parsed (kept for room).
    names: Vec<(HeaderName, usize, usize)>,
    /// The last response's header map, emptied: the next request's map,
    /// with its room.
    spare: Option<HeaderMap>,
    /// A slot holding a kept box for the next request's future (a
    /// `KeptBox<F>`; see `crate::wire::spare`).
    future_box: Option<Box<dyn Any + Send>>,
}

impl<M, F, B> Server<M, F, B>
where
    M: FnMut(Request<IncomingBody>) -> F,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(io: DownstreamIo, limits: Limits, make: M) -> Self {
        Self {
            wire: Arc::new(Mutex::new(Wire::new(io))),
            make,
            serving: None,
            phase: Phase::Head,
            ex: Exchange {
                limits,
                write: Vec::new(),
                written: 0,
                closing: false,
                keep_alive: true,
                head_only: false,
                http10: false,
                upgraded: false,
                names: Vec::new(),
                spare: None,
                future_box: None,
            },
        }
    }

    /// Drops the request's future, keeping its box.
    fn end_serving(&mut self) {
        if let Some(serving) = &mut self.serving {
            serving.set(None);
        }
    }

    /// Asks the connection to end gracefully: now if it waits for a
    /// request, else after the response in flight (which says `connection:
    /// close`, if its head is not written yet).
    pub(crate) fn shutdown(&mut self) {
        self.ex.closing = true;
    }

    /// The socket, with whatever the client sent that was not read as a
    /// request yet, once the connection is over (for parking or an
    /// upgrade); `None` if a request body still holds it.
    pub(crate) fn into_io(self) -> Option<(DownstreamIo, bool)> {
        let upgraded = self.ex.upgraded;
        let wire = Arc::try_unwrap(self.wire)
            .ok()?
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let mut io = wire.io;
        io.unread(wire.read.freeze());
        Some((io, upgraded))
    }

    /// Serves requests until the connection ends: `Ok` when the client
    /// closed, a graceful close completed or an upgrade took the socket.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        loop {
            match &mut self.phase {
                Phase::Head => {
                    let polled = {
                        let mut wire = self.wire.lock().unwrap_or_else(PoisonError::into_inner);
                        poll_head(&mut self.ex, &mut wire, &self.wire, cx)
                    };
                    match std::task::ready!(polled) {
                        Ok(Some(request)) => {
                            let future = (self.make)(request);
                            let serving = self.serving.take().or_else(|| {
                                self.ex
                                    .future_box
                                    .as_mut()?
                                    .downcast_mut::<KeptBox<F>>()?
                                    .take()
                            });
                            self.serving = Some(match serving {
                                Some(mut serving) => {
                                    serving.set(Some(future));
                                    serving
                                }
                                None => Box::pin(Some(future)),
                            });
                            self.phase = Phase::Serving;
                        }
                        Ok(None) => {
                            self.phase = Phase::Done;
                            return Poll::Ready(Ok(()));
                        }
                        Err(failure) => {
                            self.ex.write.clear();
                            self.ex.written = 0;
                            self.ex.write.extend_from_slice(match failure {
                                Failure::Rejected { status: 431, .. } => {
                                    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                }
                                Failure::Rejected { status: 414, .. } => {
                                    b"HTTP/1.1 414 URI Too Long\r\n"
                                }
                                _ => b"HTTP/1.1 400 Bad Request\r\n",
                            });
                            self.ex
                                .write
                                .extend_from_slice(b"connection: close\r\ncontent-length: 0\r\n");
                            write_date(&mut self.ex.write);
                            self.ex.write.extend_from_slice(b"\r\n");
                            self.phase = Phase::Rejecting(Some(failure));
                        }
                    }
                }
                Phase::Serving => {
                    let Some(serving) = self.serving.as_mut().and_then(|s| s.as_mut().as_pin_mut())
                    else {
                        self.phase = Phase::Done;
                        continue;
                    };
                    if let Poll::Ready(Ok(response)) = serving.poll(cx) {
                        self.end_serving();
                        let mut wire = self.wire.lock().unwrap_or_else(PoisonError::into_inner);
                        // Too late to tell the client to send its body.
                        wire.expects_continue = false;
                        // A body that broke, or that no one will read and
                        // has not all arrived, leaves the connection unfit
                        // for another request: the response says so.
                        let unread =
                            Arc::strong_count(&self.wire) == 1 && !finish_request_body(&mut wire);
                        if wire.broken || unread {
                            self.ex.keep_alive = false;
                        }
                        drop(wire);
                        let upload = start_response(&mut self.ex, response);
                        self.phase = Phase::Writing(upload);
                        continue;
                    }
                    let mut wire = self.wire.lock().unwrap_or_else(PoisonError::into_inner);
                    if client_left(&mut wire, cx) {
                        // The request is cancelled with its future.
                        drop(wire);
                        self.end_serving();
                        self.phase = Phase::Done;
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
                Phase::Writing(upload) => {
                    let polled = poll_response(&mut self.ex, &self.wire, upload, cx);
                    if let Err(failure) = std::task::ready!(polled) {
                        self.phase = Phase::Done;
                        return Poll::Ready(Err(failure));
                    }
                    // The response's body (and what it held of the
                    // exchange) goes before the next request is read.
                    self.phase = Phase::Done;
                    let mut wire = self.wire.lock().unwrap_or_else(PoisonError::into_inner);
                    if self.ex.upgraded {
                        return Poll::Ready(Ok(()));
                    }
                    if !finish_request_body(&mut wire) {
                        self.ex.keep_alive = false;
                    }
                    if !self.ex.keep_alive || self.ex.closing {
                        return Poll::Ready(Ok(()));
                    }
                    // Nothing of the next request yet: wait for it
                    // holding no buffer.
                    if wire.read.is_empty() && wire.io.waits_without_buffer() {
                        // The future's box goes in a slot that goes with
                        // the kit, made once.
                        let mut slot = match self.ex.future_box.take() {
                            Some(slot) if slot.is::<KeptBox<F>>() => slot,
                            _ => Box::new(KeptBox::<F>::None),
                        };
                        if let Some(kept) = slot.downcast_mut::<KeptBox<F>>() {
                            *kept = self.serving.take();
                        }
                        crate::wire::spare::give(crate::wire::spare::Kit {
                            read: std::mem::take(&mut wire.read),
                            write: std::mem::take(&mut self.ex.write),
                            map: self.ex.spare.take(),
                            future_box: Some(slot),
                        });
                    }
                    self.phase = Phase::Head;
                }
                Phase::Rejecting(failure) => {
                    let written = {
                        let mut wire = self.wire.lock().unwrap_or_else(PoisonError::into_inner);
                        poll_write_buffer(&mut self.ex, &mut wire, cx)
                    };
                    std::task::ready!(written).ok();
                    let failure = failure.take();
                    self.phase = Phase::Done;
                    return Poll::Ready(failure.map_or(Ok(()), Err));
                }
                Phase::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Reads and parses the next request head; `None` when the client closed
/// between requests, or the connection was asked to close and no request
/// has begun.
fn poll_head(
    ex: &mut Exchange,
    wire: &mut Wire,
    shared: &Arc<Mutex<Wire>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Request<IncomingBody>>, Failure>> {
    loop {
        if !wire.read.is_empty() {
            if let Some(head) = parse_head(&mut wire.read, ex.limits, &mut ex.names, &mut ex.spare)?
            {
                return Poll::Ready(Ok(Some(begin_request(ex, wire, shared, head))));
            }
        } else if ex.closing {
            return Poll::Ready(Ok(None));
        }
        if wire.read.is_empty() && wire.read.capacity() == 0 && wire.io.waits_without_buffer() {
            // Between requests: wait for the client holding no buffer.
            std::task::ready!(wire.io.poll_read_ready(cx)).map_err(Failure::Io)?;
            let kit = crate::wire::spare::take();
            wire.read = kit.read;
            if ex.write.capacity() == 0 {
                ex.write = kit.write;
            }
            if ex.spare.is_none() {
                ex.spare = kit.map;
            }
            if ex.future_box.is_none() {
                ex.future_box = kit.future_box;
            }
        }
        match std::task::ready!(wire.poll_fill(cx)) {
            // The client closed: between requests that is the end; within
            // a head, there is no request to answer.
            Ok(0) => return Poll::Ready(Ok(None)),
            Ok(_) => {}
            Err(error) => return Poll::Ready(Err(Failure::Io(error))),
        }
    }
}

/// A parsed request head.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    keep_alive: bool,
    expects_continue: bool,
    body: Decoder,
}

fn rejected(why: &'static str) -> Failure {
    Failure::Rejected { status: 400, why }
}

fn too_large(why: &'static str) -> Failure {
    Failure::Rejected { status: 431, why }
}

/// Parses a request head at the start of `read` and takes it off; `None`
/// when more bytes are needed.
fn parse_head(
    read: &mut BytesMut,
    limits: Limits,
    names: &mut Vec<(HeaderName, usize, usize)>,
    spare: &mut Option<HeaderMap>,
) -> Result<Option<Head>, Failure> {
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if limits.max_headers <= STACK_HEADERS {
        &mut stack[..limits.max_headers]
    } else {
        heap.resize_with(limits.max_headers, MaybeUninit::uninit);
        &mut heap
    };
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(read, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if read.len() >= limits.max_head => {
            return Err(too_large("request head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(too_large("too many headers")),
        Err(_) => return Err(rejected("invalid request head")),
    };
    if len > limits.max_head {
        return Err(too_large("request head too large"));
    }
    let method = request
        .method
        .and_then(|method| Method::from_bytes(method.as_bytes()).ok())
        .ok_or_else(|| rejected("invalid method"))?;
    let version = if request.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let target = request.path.unwrap_or("");
    if target.len() > MAX_TARGET {
        return Err(Failure::Rejected {
            status: 414,
            why: "request target too long",
        });
    }
    let base = read.as_ptr() as usize;
    let target_at = target.as_ptr() as usize - base;
    let target_len = target.len();
    let mut keep_alive = version == Version::HTTP_11;
    let mut expects_continue = false;
    let mut chunked = None;
    let mut length: Option<u64> = None;
    let mut has_length = false;
    names.clear();
    for parsed in request.headers.iter() {
        let name = HeaderName::from_bytes(parsed.name.as_bytes())
            .map_err(|_| rejected("invalid header name"))?;
        if name == header::CONTENT_LENGTH {
            has_length = true;
            for part in parsed.value.split(|&b| b == b',') {
                let n = parse_length(part.trim_ascii())
                    .ok_or_else(|| rejected("invalid content-length"))?;
                if length.is_some_and(|seen| seen != n) {
                    return Err(rejected("conflicting content-length"));
                }
                length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            // The last coding of the last line frames the body.
            let last = parsed.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            if has_token(parsed.value, b"close") {
                keep_alive = false;
            } else if version == Version::HTTP_10 && has_token(parsed.value, b"keep-alive") {
                keep_alive = true;
            }
        } else if name == header::EXPECT {
            expects_continue = parsed.value.eq_ignore_ascii_case(b"100-continue");
        }
        let start = parsed.value.as_ptr() as usize - base;
        names.push((name, start, parsed.value.len()));
    }
    let body = match (chunked, length) {
        (Some(_), _) if version == Version::HTTP_10 => {
            return Err(rejected("transfer-encoding in an HTTP/1.0 request"));
        }
        (Some(_), _) if has_length => {
            return Err(rejected("both transfer-encoding and content-length"));
        }
        (Some(true), _) => Decoder::Chunked(Chunked::Size),
        (Some(false), _) => return Err(rejected("transfer-encoding not ending in chunked")),
        (None, Some(length)) => Decoder::Length(length),
        (None, None) => Decoder::Length(0),
    };
    // The head's values (and its target) are slices of the read buffer:
    // gone by the time the next head is read, so the buffer is then whole
    // again and reused.
    let block = read.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(block.slice(target_at..target_at + target_len))
        .map_err(|_| rejected("invalid request target"))?;
    // Room for the headers the proxy adds (forwarding, request id, trace
    // context, via), so that adding them does not grow the map.
    // (The last response's map is reused when it has the room: growing it
    // would cost more than a new one.)
    let room = names.len() + ADDED_HEADERS;
    let mut headers = match spare.take() {
        Some(map) if map.capacity() >= room => map,
        _ => HeaderMap::with_capacity(room),
    };
    for (name, start, len) in names.drain(..) {
        let value = HeaderValue::from_maybe_shared(block.slice(start..start + len))
            .map_err(|_| rejected("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        method,
        uri,
        version,
        headers,
        keep_alive,
        expects_continue,
        body,
    }))
}

/// The request for a parsed head, with its body: empty, read whole with
/// the head, or to be read from the connection.
fn begin_request(
    ex: &mut Exchange,
    wire: &mut Wire,
    shared: &Arc<Mutex<Wire>>,
    head: Head,
) -> Request<IncomingBody> {
    ex.keep_alive = head.keep_alive;
    ex.head_only = head.method == Method::HEAD;
    ex.http10 = head.version == Version::HTTP_10;
    let body = match head.body {
        Decoder::Length(0) => {
            wire.body = Decoder::Done;
            IncomingBody::Empty
        }
        Decoder::Length(length) if wire.read.len() as u64 >= length => {
            wire.body = Decoder::Done;
            // Within the buffer's length: a usize.
            #[allow(clippy::cast_possible_truncation)]
            IncomingBody::Whole(take(&mut wire.read, length as usize))
        }
        decoder => {
            wire.body = decoder;
            wire.expects_continue = head.expects_continue && head.version == Version::HTTP_11;
            wire.generation = wire.generation.wrapping_add(1);
            IncomingBody::Streaming(shared.clone(), wire.generation)
        }
    };
    let mut request = Request::new(body);
    *request.method_mut() = head.method;
    *request.uri_mut() = head.uri;
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers;
    request
}

/// Whether the client closed the connection while its response is
/// awaited. Looks only when the request has been read whole and nothing
/// else waits in the buffer (a pipelined request is read later); what
/// arrives meanwhile stays in the buffer.
fn client_left(wire: &mut Wire, cx: &mut Context<'_>) -> bool {
    if !matches!(wire.body, Decoder::Done) || !wire.read.is_empty() {
        return false;
    }
    matches!(wire.poll_fill(cx), Poll::Ready(Ok(0) | Err(_)))
}

/// Writes the response's head into the write buffer and returns what will
/// write its body (`None`: the head alone).
fn start_response<B>(ex: &mut Exchange, response: Response<B>) -> Option<Upload<B>>
where
    B: Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = response.into_parts();
    let out = &mut ex.write;
    out.clear();
    ex.written = 0;
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // An upgrade: its headers as they are, then the other protocol.
        write_headers(out, &parts.headers);
        out.extend_from_slice(b"\r\n");
        ex.upgraded = true;
        return None;
    }
    // A body is never sent for these; HEAD and 304 keep the length the
    // full response would have had.
    let bodiless = status.is_informational() || status == StatusCode::NO_CONTENT;
    let head_only = ex.head_only || status == StatusCode::NOT_MODIFIED;
    let mut declared = None;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH {
            if head_only && !bodiless {
                write_header(out, name, value);
            } else {
                declared = parse_length(value.as_bytes());
            }
            continue;
        }
        if name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            // Framing and the connection's fate are this side's to say.
            if name == header::CONNECTION && has_token(value.as_bytes(), b"close") {
                ex.keep_alive = false;
            }
            continue;
        }
        has_date |= name == header::DATE;
        write_header(out, name, value);
    }
    if !has_date {
        write_date(out);
    }
    let framing = if bodiless || head_only {
        None
    } else if body.is_end_stream() {
        out.extend_from_slice(b"content-length: 0\r\n");
        Some(Framing::Length(0))
    } else if let Some(length) = body.size_hint().exact().or(declared) {
        write_length(out, length);
        Some(Framing::Length(length))
    } else if !ex.http10 {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Some(Framing::Chunked)
    } else {
        ex.keep_alive = false;
        Some(Framing::Close)
    };
    if !ex.keep_alive || ex.closing {
        ex.keep_alive = false;
        out.extend_from_slice(b"connection: close\r\n");
    } else if ex.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    parts.headers.clear();
    ex.spare = Some(parts.headers);
    framing.map(|framing| Upload::new(body, framing))
}

fn write_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        write_header(out, name, value);
    }
}

fn write_header(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes the response, head and body; `Ready(Ok)` once it is all written
/// and flushed. What the body has ready is gathered before each write, so
/// that a small response leaves in one write, head and body together.
///
/// The wire is locked only to write: the response's body, polled between
/// writes, may read the request's body from the same wire (an upstream
/// that streams its answer while it reads).
fn poll_response<B>(
    ex: &mut Exchange,
    shared: &Mutex<Wire>,
    upload: &mut Option<Upload<B>>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Failure>>
where
    B: Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    loop {
        let mut waiting = false;
        // Gathered only once the large frame before (and its chunk's
        // closing CRLF) is all written: the bytes go out in order.
        if let Some(body) = upload.as_mut()
            && body.data.is_empty()
            && body.suffix.is_empty()
            && !body.end_queued
        {
            match body.collect(&mut ex.write, cx) {
                Ok(Collected::More) => {}
                Ok(Collected::Pending) => waiting = true,
                Err(Error::RequestBody(error)) => return Poll::Ready(Err(Failure::Body(error))),
                Err(error) => return Poll::Ready(Err(Failure::Body(error.into()))),
            }
        }
        if upload
            .as_ref()
            .is_some_and(|body| body.end_queued && body.data.is_empty() && body.suffix.is_empty())
        {
            // The body is over and what is left of it is in the write
            // buffer: it ends now, so that the request is accounted for
            // (metrics, access log, span) before the client can see the
            // response's last byte.
            *upload = None;
        }
        let mut wire = shared.lock().unwrap_or_else(PoisonError::into_inner);
        // An interim `100 Continue` half written goes first.
        std::task::ready!(wire.poll_interim(cx)).map_err(Failure::Io)?;
        std::task::ready!(poll_write_buffer(ex, &mut wire, cx))?;
        let Some(upload) = upload.as_mut() else {
            return flush(&mut wire, cx);
        };
        std::task::ready!(upload.poll_write_held(&mut wire.io, cx)).map_err(Failure::Io)?;
        if upload.end_queued {
            return flush(&mut wire, cx);
        }
        if waiting {
            // Nothing more for now: what was written goes out.
            std::task::ready!(flush(&mut wire, cx))?;
            return Poll::Pending;
        }
    }
}

fn flush(wire: &mut Wire, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
    Pin::new(&mut wire.io).poll_flush(cx).map_err(Failure::Io)
}

/// Writes the write buffer out.
fn poll_write_buffer(
    ex: &mut Exchange,
    wire: &mut Wire,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Failure>> {
    while ex.written < ex.write.len() {
        let n = std::task::ready!(Pin::new(&mut wire.io).poll_write(cx, &ex.write[ex.written..]))
            .map_err(Failure::Io)?;
        if n == 0 {
            return Poll::Ready(Err(Failure::Io(io::ErrorKind::WriteZero.into())));
        }
        ex.written += n;
    }
    ex.write.clear();
    ex.written = 0;
    Poll::Ready(Ok(()))
}

/// Skips what is left of the request's body when it is already in the
/// read buffer; false when some of it has not arrived (or it broke), and
/// the connection cannot read another request.
fn finish_request_body(wire: &mut Wire) -> bool {
    wire.expects_continue = false;
    if matches!(wire.body, Decoder::Eof) {
        wire.body = Decoder::Done;
    }
    loop {
        match wire.body.next(&mut wire.read) {
            Ok(Next::Frame(_)) => {}
            Ok(Next::End) => {
                wire.body = Decoder::Done;
                return !wire.broken;
            }
            Ok(Next::More) | Err(_) => return false,
        }
    }
}

/// Writes a `date` header, formatted at most once a second per thread.
fn write_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second || date.1.is_empty() {
            *date = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests;
