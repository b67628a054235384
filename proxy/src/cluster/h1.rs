//! An HTTP/1.1 client connection of our own, on `httparse`, for the pool's
//! ordinary requests (upgrades and HTTP/2 stay with hyper).
//!
//! PERF: hyper's client runs every connection in a task of its own and
//! hands each request to it over a channel, and each response back over
//! another; its parse builds the response through a general dispatcher,
//! and its read buffer is reallocated per response because the header
//! values still point into it. Under callgrind that connection task was a
//! third of the proxy's instructions per request (benches/RESULTS.md). Here
//! the request's own task writes the request and reads the response on
//! the pooled connection: no task, no channel, no wake-up between tasks.
//! The response's header values and small bodies are slices of the read
//! buffer; they are gone by the time the connection reads its next
//! response (no read ahead), so the buffer is then whole again and reused,
//! where hyper's client read ahead while they were held and took a new
//! buffer per response.
//!
//! What this owns of HTTP/1.1's framing (RFC 9112), each rule tested below:
//! - Requests: origin-form target; `content-length` when the body's length
//!   is known (from the body, else the client's header), `transfer-encoding:
//!   chunked` when it is not, neither for a body known to be empty; a body
//!   longer or shorter than its declared length fails the request. Trailers
//!   go out only with chunked framing.
//! - Responses: 1xx heads other than 101 are skipped; a response to HEAD,
//!   and a 204 or 304, has no body whatever its headers say; otherwise
//!   chunked (as the last transfer coding), else `content-length` (every
//!   value the same, digits only), else the body runs to the connection's
//!   close. A 101, a `transfer-encoding` in an HTTP/1.0 response, an
//!   invalid or conflicting length, a head over [`MAX_HEAD`] bytes or
//!   [`MAX_HEADERS`] headers, a broken chunk: the response is refused (a
//!   protocol error, blamed on the upstream).
//! - Reuse: only after an HTTP/1.1 response without `connection: close`,
//!   framed by length or chunks, read to its end, with the whole request
//!   written and no stray byte after the response. Anything else closes the
//!   connection.
//! - The request body is written while the response is awaited and read
//!   (a server may answer early, or stream its answer while it reads).

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::BoxError;
use crate::telemetry::trace::Propagation;
pub(crate) use crate::wire::Error;
use crate::wire::{
    COALESCE_BELOW, Chunked, Collected, Decoder, Framing, Next, READ_CHUNK, Upload, has_token,
    parse_length, write_length,
};

/// The largest response head (status line and headers) accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most headers a response head, or a chunked body's trailers, may have.
pub(crate) const MAX_HEADERS: usize = 100;

/// The largest header map, in headers, a connection keeps for its next
/// response.
const MAX_SPARE_MAP: usize = 64;

/// A request that failed: why, and the request itself when not one byte
/// of it was written (so it may go out on another connection as it is).
#[derive(Debug)]
pub(crate) struct SendError<B> {
    pub(crate) error: Error,
    pub(crate) unsent: Option<Request<B>>,
}

/// One HTTP/1.1 connection to an upstream, with the state of the exchange
/// it carries.
///
/// PERF: boxed once per connection and reused by every exchange on it: the
/// response body that owns it during an exchange is one pointer, and no
/// request allocates for it.
#[derive(Debug)]
pub(crate) struct Connection<T, B>(Box<State<T, B>>);

#[derive(Debug)]
struct State<T, B> {
    io: T,
    read: BytesMut,
    /// A response head's names and where their values are, while it is
    /// parsed (kept for its room).
    names: Vec<(HeaderName, usize, usize)>,
    /// Room to ask for before the next read (see [`MAX_READ`]).
    read_size: usize,
    write: Vec<u8>,
    /// Bytes of `write` already written.
    written: usize,
    /// The request's head, until its response head arrives: handed back
    /// with the body when not one byte went out.
    parts: Option<http::request::Parts>,
    /// The last request's header map, emptied: the next response head's
    /// headers are parsed into it.
    ///
    /// PERF: the response's map, written downstream, is kept by the
    /// client's connection for its next request, whose map comes back
    /// here: neither side allocates one per request. A map made for each
    /// response head was one allocation of 1,248 bytes and one of 64
    /// (glibc serves the larger from its bins, not its per-thread cache).
    spare_map: Option<HeaderMap>,
    /// `None` once the request is written whole (or its writing failed).
    upload: Option<Upload<B>>,
    sent_any: bool,
    /// The request could not be written whole (the server may have
    /// answered early and stopped reading): the response is still awaited,
    /// and the connection is not reused.
    upload_failed: Option<Error>,
    decoder: Decoder,
    keep_alive: bool,
}

impl<T, B> Connection<T, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(io: T) -> Self {
        Self(Box::new(State {
            io,
            read: BytesMut::new(),
            names: Vec::new(),
            read_size: READ_CHUNK,
            write: Vec::new(),
            written: 0,
            parts: None,
            spare_map: None,
            upload: None,
            sent_any: false,
            upload_failed: None,
            decoder: Decoder::Done,
            keep_alive: false,
        }))
    }

    /// Whether the idle connection is unusable: the server closed it, or
    /// sent something unasked. Looks at what the runtime already knows of
    /// the socket; when nothing arrived, no system call is made.
    pub(crate) fn is_closed(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        // Ready: the end of the stream, a stray byte, or an error.
        Pin::new(&mut self.0.io)
            .poll_read(&mut cx, &mut buf)
            .is_ready()
    }

    /// The byte stream, when nothing is buffered on it (an idle connection
    /// handed to another protocol driver).
    pub(crate) fn into_io(self) -> Option<T> {
        let state = *self.0;
        state.read.is_empty().then_some(state.io)
    }

    /// Sends `req` and waits for its response head. The response's body
    /// owns the connection until it is read to its end; then
    /// [`ResponseBody::take_connection`] gives it back for reuse.
    ///
    /// Cancel safety: dropping the future drops the connection.
    ///
    /// `trace`, when given, is written with the head (and any header of
    /// its names in the request's map left out).
    pub(crate) async fn send(
        mut self,
        req: Request<B>,
        trace: Option<&Propagation>,
    ) -> Result<Response<ResponseBody<T, B>>, SendError<B>> {
        let (parts, body) = req.into_parts();
        let state = &mut *self.0;
        let head_only = parts.method == Method::HEAD;
        state.write.clear();
        state.written = 0;
        state.sent_any = false;
        state.upload_failed = None;
        let framing = encode_head(&mut state.write, &parts, &body, trace);
        state.upload = Some(Upload::new(body, framing));
        state.parts = Some(parts);
        let head = poll_fn(|cx| self.0.poll_head(cx)).await;
        let state = &mut *self.0;
        let parts = state.parts.take();
        let head = match head {
            Ok(head) => head,
            Err(error) => {
                let unsent = match (parts, state.upload.take()) {
                    (Some(parts), Some(upload)) if !state.sent_any && !upload.touched => {
                        Some(Request::from_parts(parts, upload.body))
                    }
                    _ => None,
                };
                return Err(SendError { error, unsent });
            }
        };
        // A map grown past the usual size is not kept with the connection.
        if let Some(http::request::Parts { mut headers, .. }) = parts
            && headers.capacity() <= MAX_SPARE_MAP
        {
            headers.clear();
            state.spare_map = Some(headers);
        }
        let decoder = head.framing(head_only).map_err(|error| SendError {
            error,
            unsent: None,
        })?;
        state.keep_alive = head.keep_alive && head.reusable_framing(&decoder);
        state.decoder = decoder;
        let mut response = Response::new(ResponseBody { conn: None });
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        if let Some(reason) = head.reason {
            response.extensions_mut().insert(reason);
        }
        response.body_mut().conn = Some(self);
        Ok(response)
    }
}

/// Writes the request line and headers, with the framing headers this
/// connection decides and the trace context, into `out`.
fn encode_head<B: Body>(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    body: &B,
    trace: Option<&Propagation>,
) -> Framing {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    match parts.uri.path_and_query() {
        Some(target) if !target.as_str().is_empty() => {
            out.extend_from_slice(target.as_str().as_bytes());
        }
        _ => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut declared = None;
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH {
            declared = parse_length(value.as_bytes());
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            // Decided here, not by the client.
            continue;
        }
        if trace.is_some_and(|trace| trace.writes(name)) {
            // The proxy's own, below.
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(trace) = trace {
        trace.write_lines(out);
    }
    let framing = if body.is_end_stream() {
        // No body: say so only where the client did (a POST with an
        // empty body keeps its `content-length: 0`).
        if declared.is_some() {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::Length(0)
    } else if let Some(length) = body.size_hint().exact().or(declared) {
        write_length(out, length);
        Framing::Length(length)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    out.extend_from_slice(b"\r\n");
    framing
}

impl<T: AsyncRead + AsyncWrite + Unpin, B> State<T, B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Writes what it can of the request; `Ready(Ok)` once it is written
    /// whole.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            while self.written < self.write.len() {
                let n = std::task::ready!(
                    Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..])
                )
                .map_err(Error::Io)?;
                if n == 0 {
                    return Poll::Ready(Err(Error::Io(io::ErrorKind::WriteZero.into())));
                }
                self.written += n;
                self.sent_any = true;
            }
            self.write.clear();
            self.written = 0;
            let Some(upload) = &mut self.upload else {
                return Poll::Ready(Ok(()));
            };
            // The head went first, so `sent_any` is already set.
            std::task::ready!(upload.poll_write_held(&mut self.io, cx)).map_err(Error::Io)?;
            if upload.end_queued {
                self.upload = None;
                return Poll::Ready(Ok(()));
            }
            match upload.collect(&mut self.write, cx)? {
                Collected::More => {}
                Collected::Pending => return Poll::Pending,
            }
        }
    }

    /// Advances the request's writing, if it is not done; a failure to
    /// write after some of it went out is kept (the response may still
    /// come) and ends the writing.
    fn poll_upload_in_background(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        if self.upload.is_none() {
            return Ok(());
        }
        match self.poll_upload(cx) {
            Poll::Ready(Ok(())) | Poll::Pending => Ok(()),
            Poll::Ready(Err(error)) => {
                if !self.sent_any || matches!(error, Error::RequestBody(_)) {
                    return Err(error);
                }
                self.upload = None;
                self.upload_failed = Some(error);
                Ok(())
            }
        }
    }

    /// Writes the request and reads up to the end of the response head.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Head, Error>> {
        loop {
            if let Err(error) = self.poll_upload_in_background(cx) {
                return Poll::Ready(Err(error));
            }
            if !self.read.is_empty() {
                match parse_head(&mut self.read, &mut self.names, &mut self.spare_map) {
                    Ok(Some(head)) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
                        return Poll::Ready(Err(Error::Malformed(
                            "101 to a request not upgrading",
                        )));
                    }
                    // 100 Continue, 103 Early Hints: the final head follows.
                    Ok(Some(head)) if head.status.is_informational() => continue,
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(error) => return Poll::Ready(Err(error)),
                }
            }
            match std::task::ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(self.upload_failed.take().unwrap_or(Error::Closed)));
                }
                Ok(_) => {}
                Err(error) => {
                    return Poll::Ready(Err(self.upload_failed.take().unwrap_or(Error::Io(error))));
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin, B> State<T, B> {
    /// Reads more of the response into the read buffer; `Ok(0)` at the end
    /// of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        crate::wire::poll_fill(&mut self.io, &mut self.read, &mut self.read_size, cx)
    }
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    keep_alive: bool,
    /// The reason phrase, when not the status's usual one: passed on as
    /// the server said it.
    reason: Option<hyper::ext::ReasonPhrase>,
    framing: Framed,
}

/// Parses a response head at the start of `read` and takes it off;
/// `None` when more bytes are needed.
fn parse_head(
    read: &mut BytesMut,
    scratch: &mut Vec<(HeaderName, usize, usize)>,
    spare_map: &mut Option<HeaderMap>,
) -> Result<Option<Head>, Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        read,
        &mut slots,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if read.len() >= MAX_HEAD => {
            return Err(Error::Malformed("response head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Malformed("too many response headers"));
        }
        Err(_) => return Err(Error::Malformed("invalid response head")),
    };
    if len > MAX_HEAD {
        return Err(Error::Malformed("response head too large"));
    }
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Error::Malformed("invalid status"))?;
    let reason = response
        .reason
        .filter(|reason| !reason.is_empty() && Some(*reason) != status.canonical_reason())
        .and_then(|reason| hyper::ext::ReasonPhrase::try_from(reason.as_bytes()).ok());
    let version = if response.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let base = read.as_ptr() as usize;
    let mut keep_alive = version == Version::HTTP_11;
    let mut framing = Framed::default();
    scratch.clear();
    for parsed in response.headers.iter() {
        let name = HeaderName::from_bytes(parsed.name.as_bytes())
            .map_err(|_| Error::Malformed("invalid header name"))?;
        // PERF: the framing headers are read here, in the one pass over
        // the head, not looked up in the map afterwards.
        if name == header::CONNECTION && has_token(parsed.value, b"close") {
            keep_alive = false;
        } else if name == header::TRANSFER_ENCODING {
            framing.note_coding(parsed.value);
        } else if name == header::CONTENT_LENGTH {
            framing.note_length(parsed.value);
        }
        let start = parsed.value.as_ptr() as usize - base;
        scratch.push((name, start, parsed.value.len()));
    }
    // The values are slices of the head, split off the read buffer: once
    // they are dropped (the response's head is written downstream before
    // its body is read to the end), the buffer is whole again and the next
    // read reuses it; nothing is allocated per response.
    let block = read.split_to(len).freeze();
    // Room for what the proxy adds on the way back (`via`), and then for
    // the next request read on the downstream connection, which reuses
    // this map.
    let mut headers = match spare_map.take() {
        Some(mut map) => {
            map.reserve(scratch.len() + 4);
            map
        }
        None => HeaderMap::with_capacity(scratch.len() + 4),
    };
    for (name, start, len) in scratch.drain(..) {
        let value = HeaderValue::from_maybe_shared(block.slice(start..start + len))
            .map_err(|_| Error::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        keep_alive,
        reason,
        framing,
    }))
}

/// What a response head's framing headers said.
#[derive(Debug, Default)]
struct Framed {
    /// `transfer-encoding` was there; whether its last coding is chunked.
    chunked: Option<bool>,
    /// `content-length` was there.
    has_length: bool,
    /// Its value (every one the same), or why it is invalid.
    length: Option<Result<u64, &'static str>>,
}

impl Framed {
    fn note_coding(&mut self, value: &[u8]) {
        // The last header's last coding is the one that frames the body.
        let last = value.rsplit(|&b| b == b',').next().unwrap_or(value);
        self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
    }

    fn note_length(&mut self, value: &[u8]) {
        self.has_length = true;
        for part in value.split(|&b| b == b',') {
            let parsed = parse_length(part.trim_ascii()).ok_or("invalid content-length");
            self.length = Some(match (self.length, parsed) {
                (Some(Err(why)), _) | (_, Err(why)) => Err(why),
                (Some(Ok(seen)), Ok(n)) if seen != n => Err("conflicting content-length"),
                (_, Ok(n)) => Ok(n),
            });
        }
    }
}

impl Head {
    /// How the body that follows this head is framed.
    fn framing(&self, head_only: bool) -> Result<Decoder, Error> {
        if head_only
            || self.status == StatusCode::NO_CONTENT
            || self.status == StatusCode::NOT_MODIFIED
        {
            return Ok(Decoder::Length(0));
        }
        if let Some(chunked) = self.framing.chunked {
            if self.version == Version::HTTP_10 {
                return Err(Error::Malformed(
                    "transfer-encoding in an HTTP/1.0 response",
                ));
            }
            return Ok(if chunked {
                Decoder::Chunked(Chunked::Size)
            } else {
                Decoder::Eof
            });
        }
        match self.framing.length {
            None => Ok(Decoder::Eof),
            Some(Ok(length)) => Ok(Decoder::Length(length)),
            Some(Err(why)) => Err(Error::Malformed(why)),
        }
    }

    /// Whether the body's framing lets the connection carry another
    /// exchange after it (a length or chunks; not a body ended by close,
    /// nor a `content-length` beside `transfer-encoding`).
    fn reusable_framing(&self, decoder: &Decoder) -> bool {
        match decoder {
            Decoder::Eof => false,
            Decoder::Chunked(_) => !self.framing.has_length,
            Decoder::Length(_) | Decoder::Done => true,
        }
    }
}

/// A response's body, read from its connection; the connection goes back
/// for reuse through [`ResponseBody::take_connection`] once the exchange
/// is over and the connection fit for another.
#[derive(Debug)]
pub(crate) struct ResponseBody<T, B> {
    /// Always there until taken back.
    conn: Option<Connection<T, B>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin, B> ResponseBody<T, B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// The connection, when the exchange is over and it may carry another:
    /// the response read to its end and fit for reuse, the request written
    /// whole, nothing more on the wire.
    pub(crate) fn take_connection(&mut self) -> Option<Connection<T, B>> {
        let state = &self.conn.as_ref()?.0;
        if !state.keep_alive
            || !matches!(state.decoder, Decoder::Done | Decoder::Length(0))
            || state.upload.is_some()
            || state.upload_failed.is_some()
            || !state.read.is_empty()
        {
            return None;
        }
        let mut conn = self.conn.take()?;
        let state = &mut *conn.0;
        // An idle connection keeps a buffer for the next small response,
        // not the room a large body grew; nor a large request's.
        if state.read.capacity() > 2 * READ_CHUNK {
            state.read = BytesMut::new();
        }
        state.read_size = READ_CHUNK;
        if state.write.capacity() > 2 * COALESCE_BELOW {
            state.write = Vec::new();
        }
        Some(conn)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin, B> State<T, B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// The response body's next frame.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        // The rest of the request goes out while the response comes in.
        if let Err(error) = self.poll_upload_in_background(cx) {
            // The client's body broke under a response already on its way:
            // the response ends here, and the connection with it.
            self.decoder = Decoder::Done;
            self.keep_alive = false;
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            match self.decoder.next(&mut self.read) {
                Ok(Next::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(Next::End) => return Poll::Ready(None),
                Ok(Next::More) => {}
                Err(error) => {
                    self.decoder = Decoder::Done;
                    self.keep_alive = false;
                    return Poll::Ready(Some(Err(error)));
                }
            }
            match std::task::ready!(self.poll_fill(cx)) {
                Ok(0) if matches!(self.decoder, Decoder::Eof) => {
                    self.decoder = Decoder::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.decoder = Decoder::Done;
                    self.keep_alive = false;
                    return Poll::Ready(Some(Err(Error::Closed)));
                }
                Ok(_) => {}
                Err(error) => {
                    self.decoder = Decoder::Done;
                    self.keep_alive = false;
                    return Poll::Ready(Some(Err(Error::Io(error))));
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin, B> Body for ResponseBody<T, B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match &mut self.get_mut().conn {
            Some(conn) => conn.0.poll_data(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn
            .as_ref()
            .is_none_or(|conn| matches!(conn.0.decoder, Decoder::Done | Decoder::Length(0)))
    }

    fn size_hint(&self) -> SizeHint {
        let Some(conn) = &self.conn else {
            return SizeHint::with_exact(0);
        };
        match conn.0.decoder {
            Decoder::Length(left) => SizeHint::with_exact(left),
            Decoder::Done => SizeHint::with_exact(0),
            Decoder::Chunked(_) | Decoder::Eof => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
