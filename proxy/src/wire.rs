//! HTTP/1.1 on the wire, as both sides of the proxy speak it: the framing
//! of bodies (RFC 9112 §6-7), read and written, shared by the upstream
//! client (`cluster::h1`) and the downstream server (`http::h1`); and the
//! server's connection state that a request body reads from while the
//! connection writes the response.
//!
//! A body is framed by `content-length` or by chunks; chunked bodies are
//! decoded with extensions (ignored), trailers and split reads, and any
//! malformed chunk is refused. Data up to [`COALESCE_BELOW`] is copied
//! into the write buffer so that it leaves with its head (or its chunk's
//! framing) in one write; larger data is written as it is.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame};

use crate::error::BoxError;

/// The most headers a chunked body's trailers may have.
const MAX_TRAILER_HEADERS: usize = 100;
/// Room asked for before a read, at first: enough for most heads and
/// small bodies.
pub(crate) const READ_CHUNK: usize = 8 * 1024;
/// The most room asked for before a read. Reads that fill the room double
/// it up to this (a large body then takes a few large reads, not many
/// small ones); reads that use under a quarter of it halve it.
pub(crate) const MAX_READ: usize = 128 * 1024;
/// Body data up to this size is copied into the write buffer, to leave
/// with the head (or the chunk's framing) in one write.
pub(crate) const COALESCE_BELOW: usize = 16 * 1024;
/// The longest chunk-size line (extensions included) accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The largest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The upstream closed the connection before the response was whole.
    #[error("connection closed before the response was complete")]
    Closed,
    /// Reading or writing the connection failed.
    #[error("connection i/o failed")]
    Io(#[source] io::Error),
    /// The response broke HTTP/1.1's rules.
    #[error("invalid response: {0}")]
    Malformed(&'static str),
    /// The request's body failed (the client's fault, or the client left).
    #[error("request body failed")]
    RequestBody(#[source] BoxError),
}

/// How a request's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `content-length`: this many bytes are still to come.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Neither: the body ends where the connection does (a response to an
    /// HTTP/1.0 client whose length is not known in advance).
    Close,
}

/// The host of an authority or `host` header value (`host [":" port]`,
/// RFC 9110 §7.2): without its port, an IPv6 literal with its brackets.
///
/// PERF: scans back over the port's digits instead of `rsplit_once(':')`
/// (a reverse character search, about 160 instructions a call); the
/// router and each traced request's server span call it.
pub(crate) fn host_of(authority: &str) -> &str {
    let bytes = authority.as_bytes();
    if bytes.first() == Some(&b'[') {
        // "[::1]:8080" -> "[::1]"
        return match bytes.iter().position(|&b| b == b']') {
            Some(end) => &authority[..end + 1],
            None => authority,
        };
    }
    let digits = bytes
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    match bytes.len().checked_sub(digits + 1) {
        Some(colon) if bytes[colon] == b':' => &authority[..colon],
        _ => authority,
    }
}

pub(crate) fn write_length(out: &mut Vec<u8>, length: u64) {
    out.extend_from_slice(b"content-length: ");
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut left = length;
    loop {
        at -= 1;
        // A digit: below 10.
        #[allow(clippy::cast_possible_truncation)]
        {
            digits[at] = b'0' + (left % 10) as u8;
        }
        left /= 10;
        if left == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// A decimal `content-length` value: digits only, no sign, no overflow.
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    let mut length: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        length = length * 10 + u64::from(b - b'0');
    }
    Some(length)
}

/// The request body still to write.
#[derive(Debug)]
pub(crate) struct Upload<B> {
    pub(crate) body: B,
    framing: Framing,
    /// A large data frame, written as it is (not copied) after the write
    /// buffer, and then `suffix` (a chunk's closing CRLF).
    pub(crate) data: Bytes,
    pub(crate) suffix: &'static [u8],
    /// The body's end (and a chunked body's last chunk) is in the write
    /// buffer: once that is written, the request is whole.
    pub(crate) end_queued: bool,
    /// The body was polled: the request can no longer be handed back whole.
    pub(crate) touched: bool,
}

impl<B> Upload<B> {
    /// Writes the large frame held aside, then its suffix, to `io`.
    pub(crate) fn poll_write_held<W>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>>
    where
        W: tokio::io::AsyncWrite + Unpin + ?Sized,
    {
        while !self.data.is_empty() {
            let n = std::task::ready!(Pin::new(&mut *io).poll_write(cx, &self.data))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.data.advance(n);
        }
        while !self.suffix.is_empty() {
            let n = std::task::ready!(Pin::new(&mut *io).poll_write(cx, self.suffix))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.suffix = &self.suffix[n..];
        }
        Poll::Ready(Ok(()))
    }
}

/// What [`Upload::collect`] left to write.
pub(crate) enum Collected {
    /// Bytes (or a large frame) are ready to be written.
    More,
    /// Nothing to write until the body has more.
    Pending,
}

impl<B> Upload<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(body: B, framing: Framing) -> Self {
        Self {
            body,
            framing,
            data: Bytes::new(),
            suffix: b"",
            end_queued: false,
            touched: false,
        }
    }

    /// Moves the body's ready frames into `out` (small ones copied, with
    /// their chunk framing) until a large frame, the end, or `Pending`.
    pub(crate) fn collect(
        &mut self,
        out: &mut Vec<u8>,
        cx: &mut Context<'_>,
    ) -> Result<Collected, Error> {
        if self.framing == Framing::Length(0) && self.body.is_end_stream() {
            self.end_queued = true;
            return Ok(Collected::More);
        }
        loop {
            if out.len() >= COALESCE_BELOW {
                return Ok(Collected::More);
            }
            self.touched = true;
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(error))) => return Err(Error::RequestBody(error.into())),
                Poll::Ready(None) => {
                    match self.framing {
                        Framing::Chunked => write_last_chunk(out, None),
                        Framing::Length(0) | Framing::Close => {}
                        Framing::Length(_) => {
                            return Err(Error::RequestBody(
                                "request body shorter than its content-length".into(),
                            ));
                        }
                    }
                    self.end_queued = true;
                    return Ok(Collected::More);
                }
                Poll::Pending if out.is_empty() => return Ok(Collected::Pending),
                Poll::Pending => return Ok(Collected::More),
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if self.framing == Framing::Chunked
                        && let Ok(trailers) = frame.into_trailers()
                    {
                        write_last_chunk(out, Some(&trailers));
                        self.end_queued = true;
                        return Ok(Collected::More);
                    }
                    // Trailers cannot follow a body framed by its length.
                    continue;
                }
            };
            if data.is_empty() {
                continue;
            }
            let len = data.len() as u64;
            match &mut self.framing {
                Framing::Length(left) => {
                    if len > *left {
                        return Err(Error::RequestBody(
                            "request body longer than its content-length".into(),
                        ));
                    }
                    *left -= len;
                }
                Framing::Chunked => write_chunk_size(out, len),
                Framing::Close => {}
            }
            let chunked = self.framing == Framing::Chunked;
            if data.len() < COALESCE_BELOW {
                out.extend_from_slice(&data);
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
            } else {
                self.data = data;
                self.suffix = if chunked { b"\r\n" } else { b"" };
                return Ok(Collected::More);
            }
        }
    }
}

pub(crate) fn write_chunk_size(out: &mut Vec<u8>, len: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut left = len;
    loop {
        at -= 1;
        // A hex digit: the low four bits.
        #[allow(clippy::cast_possible_truncation)]
        {
            digits[at] = HEX[(left & 0xf) as usize];
        }
        left >>= 4;
        if left == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk, the trailers if any, and the blank line that ends a
/// chunked body.
pub(crate) fn write_last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a comma-separated header value lists `token` (any case).
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// How a body is read.
#[derive(Debug)]
pub(crate) enum Decoder {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// Up to the connection's end (responses only).
    Eof,
    /// Read whole.
    Done,
}

/// What the read buffer holds of a body.
pub(crate) enum Next {
    Frame(Frame<Bytes>),
    /// The body is over (for [`Decoder::Eof`], only the end of the stream
    /// says so).
    End,
    /// More bytes are needed.
    More,
}

impl Decoder {
    /// The body's next frame from what `read` holds, taken off it.
    pub(crate) fn next(&mut self, read: &mut BytesMut) -> Result<Next, Error> {
        match self {
            Self::Done | Self::Length(0) => Ok(Next::End),
            Self::Length(left) => {
                if read.is_empty() {
                    return Ok(Next::More);
                }
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(read.len());
                *left -= n as u64;
                Ok(Next::Frame(Frame::data(take(read, n))))
            }
            Self::Eof => {
                if read.is_empty() {
                    return Ok(Next::More);
                }
                let n = read.len();
                Ok(Next::Frame(Frame::data(take(read, n))))
            }
            Self::Chunked(state) => match decode_chunked(state, read)? {
                Step::Frame(frame) => {
                    if frame.is_trailers() {
                        *self = Self::Done;
                    }
                    Ok(Next::Frame(frame))
                }
                Step::Done => {
                    *self = Self::Done;
                    Ok(Next::End)
                }
                Step::More => Ok(Next::More),
            },
        }
    }
}

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data: this many bytes are left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailers, or the blank line.
    Trailers,
}

/// One step of a chunked body's decoding.
pub(crate) enum Step {
    Frame(Frame<Bytes>),
    /// More bytes are needed.
    More,
    Done,
}

/// Decodes what `read` holds of a chunked body.
pub(crate) fn decode_chunked(state: &mut Chunked, read: &mut BytesMut) -> Result<Step, Error> {
    loop {
        match *state {
            Chunked::Size => {
                let Some(lf) = read.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                    if read.len() >= MAX_CHUNK_LINE {
                        return Err(Error::Malformed("chunk-size line too long"));
                    }
                    return Ok(Step::More);
                };
                let size = parse_chunk_size(&read[..lf])?;
                read.advance(lf + 1);
                *state = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(left) => {
                if read.is_empty() {
                    return Ok(Step::More);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(read.len());
                let data = take(read, n);
                let left = left - n as u64;
                *state = if left == 0 {
                    Chunked::DataEnd
                } else {
                    Chunked::Data(left)
                };
                return Ok(Step::Frame(Frame::data(data)));
            }
            Chunked::DataEnd => {
                if read.len() < 2 {
                    return Ok(Step::More);
                }
                if &read[..2] != b"\r\n" {
                    return Err(Error::Malformed("chunk data not followed by CRLF"));
                }
                read.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers => {
                if read.starts_with(b"\r\n") {
                    read.advance(2);
                    return Ok(Step::Done);
                }
                if read.len() < 2 {
                    return Ok(Step::More);
                }
                let mut slots = [httparse::EMPTY_HEADER; MAX_TRAILER_HEADERS];
                let (len, trailers) = match httparse::parse_headers(read, &mut slots) {
                    Ok(httparse::Status::Complete((len, parsed))) => {
                        let mut trailers = HeaderMap::with_capacity(parsed.len());
                        for parsed in parsed {
                            let name = HeaderName::from_bytes(parsed.name.as_bytes())
                                .map_err(|_| Error::Malformed("invalid trailer name"))?;
                            let value = HeaderValue::from_bytes(parsed.value)
                                .map_err(|_| Error::Malformed("invalid trailer value"))?;
                            trailers.append(name, value);
                        }
                        (len, trailers)
                    }
                    Ok(httparse::Status::Partial) if read.len() >= MAX_TRAILERS => {
                        return Err(Error::Malformed("trailers too large"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(Step::More),
                    Err(_) => return Err(Error::Malformed("invalid trailers")),
                };
                // The trailers' blank line is read with them: the body is
                // over (the caller marks it so).
                read.advance(len);
                return Ok(Step::Frame(Frame::trailers(trailers)));
            }
        }
    }
}

/// A chunk-size line (without its LF): hex digits, then optional
/// extensions (ignored), then CR.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Error> {
    const BAD: Error = Error::Malformed("invalid chunk size");
    let line = line.strip_suffix(b"\r").ok_or(BAD)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(BAD);
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        // A hex digit's value: below 16.
        #[allow(clippy::cast_lossless)]
        let value = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => b - b'A' + 10,
        };
        size = (size << 4) | u64::from(value);
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty()
        && (rest[0] != b';' || rest.iter().any(|&b| b.is_ascii_control() && b != b'\t'))
    {
        return Err(BAD);
    }
    Ok(size)
}

/// Takes `n` bytes off the front of the read buffer, without a copy.
pub(crate) fn take(read: &mut BytesMut, n: usize) -> Bytes {
    read.split_to(n).freeze()
}

/// Reads more from `io` into `read`, with room for `read_size` bytes, and
/// adapts `read_size` to what came (see [`MAX_READ`]); `Ok(0)` at the end
/// of the stream.
pub(crate) fn poll_fill<T: tokio::io::AsyncRead + Unpin>(
    io: &mut T,
    read: &mut BytesMut,
    read_size: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if read.capacity() - read.len() < *read_size / 2 {
        read.reserve(*read_size);
    }
    let n = std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, read))?;
    if n >= *read_size {
        *read_size = (*read_size * 2).min(MAX_READ);
    } else if n < *read_size / 4 {
        *read_size = (*read_size / 2).max(READ_CHUNK);
    }
    Poll::Ready(Ok(n))
}

/// What this thread's downstream HTTP/1.1 connections hold only while
/// they serve a request.
///
/// PERF: a keep-alive connection waits for its next request holding no
/// buffer. When a response is done and nothing of the next request has
/// arrived, the connection gives back its read and write buffers, its
/// spare header map and the box of its requests' future as one [`Kit`];
/// the next connection on this thread whose client sends takes one. Idle
/// connections then cost their socket and task from the first idle
/// moment, not only once parked (benches/RESULTS.md); a busy connection
/// pays one push and one pop. At most [`KITS`] are kept, and no buffer
/// grown past the usual size.
pub(crate) mod spare {
    use std::any::Any;
    use std::cell::RefCell;

    use bytes::BytesMut;
    use http::HeaderMap;

    /// The most kits kept per thread.
    const KITS: usize = 32;
    /// The largest read buffer kept (a large body's reads grow theirs).
    const MAX_READ_KEPT: usize = 2 * super::READ_CHUNK;
    /// The largest write buffer kept.
    const MAX_WRITE_KEPT: usize = 8 * 1024;
    /// The largest header map kept, in headers.
    const MAX_MAP_KEPT: usize = 64;

    /// A connection's buffers between requests.
    #[derive(Default)]
    pub(crate) struct Kit {
        /// Empty.
        pub(crate) read: BytesMut,
        /// Empty.
        pub(crate) write: Vec<u8>,
        /// Empty.
        pub(crate) map: Option<HeaderMap>,
        /// A slot with the box that held a request's future, emptied, of
        /// whatever type the server that gave it runs.
        pub(crate) future_box: Option<Box<dyn Any + Send>>,
    }

    thread_local! {
        static KEPT: crate::kept::Kept<Kit> = const { RefCell::new(Vec::new()) };
    }

    /// A kit, or an empty one (whose buffers are made as they are needed).
    pub(crate) fn take() -> Kit {
        crate::kept::take(&KEPT).unwrap_or_default()
    }

    /// Gives back a kit; what was grown past the usual size, or is not
    /// empty, is dropped.
    pub(crate) fn give(mut kit: Kit) {
        if !kit.read.is_empty() || kit.read.capacity() > MAX_READ_KEPT {
            kit.read = BytesMut::new();
        }
        if kit.write.capacity() > MAX_WRITE_KEPT {
            kit.write = Vec::new();
        }
        kit.write.clear();
        if kit
            .map
            .as_ref()
            .is_some_and(|map| !map.is_empty() || map.capacity() > MAX_MAP_KEPT)
        {
            kit.map = None;
        }
        crate::kept::keep(&KEPT, kit, KITS);
    }

    /// How many kits this thread keeps now, and how many of them have
    /// room in each buffer and a future's box.
    #[cfg(test)]
    pub(crate) fn kept() -> (usize, usize) {
        KEPT.with(|kept| {
            let kept = kept.borrow();
            let whole = kept.iter().filter(|kit| {
                kit.read.capacity() > 0
                    && kit.write.capacity() > 0
                    && kit.map.is_some()
                    && kit.future_box.is_some()
            });
            (kept.len(), whole.count())
        })
    }
}

/// A downstream HTTP/1.1 connection's socket and read buffer, shared by
/// the connection (which reads request heads and writes responses) and the
/// request body being read (which reads the rest of the request while the
/// response may already be on its way: HTTP/1.1 is full duplex).
#[derive(Debug)]
pub(crate) struct Wire {
    pub(crate) io: crate::transport::DownstreamIo,
    pub(crate) read: BytesMut,
    /// Room to ask for before the next read (see [`MAX_READ`]).
    read_size: usize,
    /// The current request's body: what is left of it.
    pub(crate) body: Decoder,
    /// The client asked to be told to go on (`expect: 100-continue`) and
    /// no response has started: the body's first read says `100 Continue`.
    pub(crate) expects_continue: bool,
    /// Bytes of an interim `100 Continue` still to write.
    pub(crate) interim: &'static [u8],
    /// The request body broke (its framing, or the client left): the
    /// connection carries no further request.
    pub(crate) broken: bool,
    /// Counts the request bodies read from the wire: a body kept past its
    /// exchange reads nothing of the next request's.
    pub(crate) generation: u64,
}

/// The interim response that tells a client to send its body.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Wire {
    pub(crate) fn new(io: crate::transport::DownstreamIo) -> Self {
        Self {
            io,
            read: BytesMut::new(),
            read_size: READ_CHUNK,
            body: Decoder::Done,
            expects_continue: false,
            interim: b"",
            broken: false,
            generation: 0,
        }
    }

    /// Reads more from the client into the read buffer; `Ok(0)` at the
    /// end of the stream.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_fill(&mut self.io, &mut self.read, &mut self.read_size, cx)
    }

    /// Writes what is left of an interim response.
    pub(crate) fn poll_interim(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.interim.is_empty() {
            let n = std::task::ready!(tokio::io::AsyncWrite::poll_write(
                Pin::new(&mut self.io),
                cx,
                self.interim
            ))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.interim = &self.interim[n..];
        }
        tokio::io::AsyncWrite::poll_flush(Pin::new(&mut self.io), cx)
    }

    /// The request body's next frame.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            match self.body.next(&mut self.read) {
                Ok(Next::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(Next::End) => return Poll::Ready(None),
                Ok(Next::More) => {}
                Err(error) => return Poll::Ready(Some(Err(self.break_body(error)))),
            }
            if std::mem::take(&mut self.expects_continue) {
                self.interim = CONTINUE;
            }
            if let Err(error) = std::task::ready!(self.poll_interim(cx)) {
                return Poll::Ready(Some(Err(self.break_body(Error::Io(error)))));
            }
            match std::task::ready!(self.poll_fill(cx)) {
                Ok(0) => return Poll::Ready(Some(Err(self.break_body(Error::Closed)))),
                Ok(_) => {}
                Err(error) => return Poll::Ready(Some(Err(self.break_body(Error::Io(error))))),
            }
        }
    }

    fn break_body(&mut self, error: Error) -> Error {
        self.body = Decoder::Done;
        self.broken = true;
        error
    }
}

/// A request body read from a downstream HTTP/1.1 connection.
#[derive(Debug)]
pub(crate) enum IncomingBody {
    /// None, or read to its end.
    Empty,
    /// Read whole with the head (a small body that came with it): a slice
    /// of the read buffer.
    Whole(Bytes),
    /// Read from the connection as the upstream side asks for it; the
    /// number is the body's generation on the wire.
    Streaming(std::sync::Arc<std::sync::Mutex<Wire>>, u64),
}

impl Body for IncomingBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        match this {
            Self::Empty => Poll::Ready(None),
            Self::Whole(data) => {
                let data = std::mem::take(data);
                *this = Self::Empty;
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Self::Streaming(wire, generation) => {
                let mut wire = wire
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let polled = if wire.generation == *generation {
                    wire.poll_body(cx)
                } else {
                    // Its exchange is over; what the wire holds now is not
                    // this body's.
                    Poll::Ready(Some(Err(Error::Closed)))
                };
                drop(wire);
                if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
                    *this = Self::Empty;
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Empty)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Empty => http_body::SizeHint::with_exact(0),
            Self::Whole(data) => http_body::SizeHint::with_exact(data.len() as u64),
            Self::Streaming(wire, generation) => {
                let wire = wire
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match wire.body {
                    _ if wire.generation != *generation => http_body::SizeHint::default(),
                    Decoder::Length(left) => http_body::SizeHint::with_exact(left),
                    Decoder::Done | Decoder::Eof => http_body::SizeHint::with_exact(0),
                    Decoder::Chunked(_) => http_body::SizeHint::default(),
                }
            }
        }
    }
}
