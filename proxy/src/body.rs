//! The request body on its way upstream.
//!
//! [`RequestBody`] streams the client's body to the upstream and marks its
//! errors as the client's: when the client's framing breaks (an invalid
//! chunk size, a body shorter than its `content-length`) or the client goes
//! away mid-body, the upstream client library reports a failed request
//! whose cause is a [`DownstreamBodyError`]. The cluster finds it by type
//! (never by message) and answers 400 blaming the client, not the
//! upstream; the upstream connection, having seen a partial body, is not
//! reused.
//!
//! Close to a leaf module (it knows the wire's body and the trace context
//! it carries, nothing of the path): the HTTP server builds the body, the
//! cluster sends it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::telemetry::trace::Outbound;
use crate::wire::IncomingBody;
use pin_project_lite::pin_project;

/// The client's request body failed.
#[derive(Debug, thiserror::Error)]
#[error("downstream request body")]
pub(crate) struct DownstreamBodyError(#[source] pub(crate) crate::error::BoxError);

impl DownstreamBodyError {
    /// Finds a downstream body failure among an error's causes.
    pub(crate) fn find(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut cause = Some(error);
        while let Some(error) = cause {
            if error.is::<Self>() {
                return true;
            }
            cause = error.source();
        }
        false
    }
}

pin_project! {
    /// The client's request body, as its connection's protocol reads it.
    #[derive(Debug)]
    #[project = ClientBodyProj]
    pub(crate) enum ClientBody {
        /// HTTP/2 (hyper's server).
        H2 { #[pin] body: Incoming },
        /// HTTP/1.1 (the proxy's own server).
        H1 { #[pin] body: IncomingBody },
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = DownstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DownstreamBodyError>>> {
        match self.project() {
            ClientBodyProj::H2 { body } => body
                .poll_frame(cx)
                .map_err(|error| DownstreamBodyError(error.into())),
            ClientBodyProj::H1 { body } => body
                .poll_frame(cx)
                .map_err(|error| DownstreamBodyError(error.into())),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::H2 { body } => body.is_end_stream(),
            Self::H1 { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::H2 { body } => body.size_hint(),
            Self::H1 { body } => body.size_hint(),
        }
    }
}

pin_project! {
    /// A request body as the proxy sends it upstream: the client's stream,
    /// or a copy of a body read whole (up to a bound) so that it can be
    /// sent again by a retry, or the bytes read before the bound followed
    /// by the rest of the stream.
    #[derive(Debug)]
    #[project = RequestBodyProj]
    pub(crate) enum RequestBody {
        Streaming { #[pin] body: ClientBody, counted: Counted, trace: Trace },
        // Trailers boxed: rare, and a map inline would make every request
        // 88 bytes larger to move through each layer.
        Replay { data: Option<Bytes>, trailers: Option<Box<http::HeaderMap>>, trace: Trace },
        Prefixed { prefix: std::collections::VecDeque<Bytes>, #[pin] rest: ClientBody, counted: Counted, trace: Trace },
    }
}

/// The trace a request's attempts continue, when spans may be recorded
/// for them: it travels with the body, from the connection's part of the
/// path to the cluster, which takes it for the attempt's client span.
///
/// PERF: carried in the request's extensions, it cost a map, its table
/// and a box allocated per traced request, and a hashed insert and
/// removal. Boxed here (8 bytes in every request), it costs one
/// allocation, and a traced request 560 fewer instructions (callgrind,
/// benches/RESULTS.md).
type Trace = Option<Box<Outbound>>;

impl RequestBody {
    /// Streams the client's body.
    pub(crate) fn new(body: ClientBody) -> Self {
        Self::Streaming {
            body,
            counted: None,
            trace: None,
        }
    }

    /// Streams the client's body, adding what is read from the client to
    /// `counted` (once, however often a retry sends it).
    pub(crate) fn counted(body: ClientBody, counted: Arc<ReadCount>) -> Self {
        Self::Streaming {
            body,
            counted: Some(counted),
            trace: None,
        }
    }

    /// A body already read whole.
    fn replay(replayable: &Replayable) -> Self {
        Self::Replay {
            data: Some(replayable.data.clone()).filter(|d| !d.is_empty()),
            trailers: replayable.trailers.clone(),
            trace: None,
        }
    }

    fn trace_mut(&mut self) -> &mut Trace {
        match self {
            Self::Streaming { trace, .. }
            | Self::Replay { trace, .. }
            | Self::Prefixed { trace, .. } => trace,
        }
    }

    /// Gives the request's attempts `trace` to continue.
    pub(crate) fn set_trace(&mut self, trace: Trace) {
        *self.trace_mut() = trace;
    }

    /// Takes the trace the request's attempt continues.
    pub(crate) fn take_trace(&mut self) -> Trace {
        self.trace_mut().take()
    }

    /// The trace the request's attempts continue.
    pub(crate) fn trace(&self) -> Option<&Outbound> {
        match self {
            Self::Streaming { trace, .. }
            | Self::Replay { trace, .. }
            | Self::Prefixed { trace, .. } => trace.as_deref(),
        }
    }
}

/// A request body read whole, to be sent once per attempt.
#[derive(Debug, Clone, Default)]
pub(crate) struct Replayable {
    data: Bytes,
    trailers: Option<Box<http::HeaderMap>>,
}

impl Replayable {
    /// A body for one more attempt.
    pub(crate) fn body(&self) -> RequestBody {
        RequestBody::replay(self)
    }
}

/// `body` as a [`Replayable`] without reading anything, when it is whole
/// already: no body at all (most requests), or one read before. Any other
/// body comes back as it was. (A body's trace is not kept: take it first.)
// The body comes back as it went in: boxing it would allocate per request.
#[allow(clippy::result_large_err)]
pub(crate) fn ready_for_replay(body: RequestBody) -> Result<Replayable, RequestBody> {
    match body {
        RequestBody::Replay { data, trailers, .. } => Ok(Replayable {
            data: data.unwrap_or_default(),
            trailers,
        }),
        RequestBody::Streaming { body, .. } if body.is_end_stream() => Ok(Replayable::default()),
        other => Err(other),
    }
}

/// A copy of `body` to send again, when it is whole already: no body at
/// all (most requests), or one read before. The body itself stays where
/// it is, to be sent first.
pub(crate) fn replayable_now(body: &RequestBody) -> Option<Replayable> {
    match body {
        RequestBody::Replay { data, trailers, .. } => Some(Replayable {
            data: data.clone().unwrap_or_default(),
            trailers: trailers.clone(),
        }),
        RequestBody::Streaming { body, .. } if body.is_end_stream() => Some(Replayable::default()),
        RequestBody::Streaming { .. } | RequestBody::Prefixed { .. } => None,
    }
}

/// Reads `body` whole if it fits in `limit` bytes: then it can be sent
/// again. A larger body gives back what was read followed by the rest of
/// the stream, to be sent once. A body the client breaks is an error (the
/// client's). (A body's trace is not kept: take it first.)
pub(crate) async fn read_for_replay(
    body: RequestBody,
    limit: usize,
) -> Result<Result<Replayable, RequestBody>, DownstreamBodyError> {
    use http_body_util::BodyExt as _;
    let (mut incoming, counted) = match ready_for_replay(body) {
        Ok(replayable) => return Ok(Ok(replayable)),
        Err(RequestBody::Streaming { body, counted, .. }) => (body, counted),
        Err(other) => return Ok(Err(other)),
    };
    if incoming
        .size_hint()
        .lower()
        .try_into()
        .is_ok_and(|lower: usize| lower > limit)
    {
        return Ok(Err(RequestBody::Streaming {
            body: incoming,
            counted,
            trace: None,
        }));
    }
    let mut chunks = std::collections::VecDeque::new();
    let mut total = 0_usize;
    let mut trailers = None;
    while let Some(frame) = incoming.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => {
                total += data.len();
                count(&counted, &data);
                chunks.push_back(data);
                if total > limit {
                    return Ok(Err(RequestBody::Prefixed {
                        prefix: chunks,
                        rest: incoming,
                        counted,
                        trace: None,
                    }));
                }
            }
            Err(frame) => {
                if let Ok(fields) = frame.into_trailers() {
                    trailers = Some(Box::new(fields));
                }
            }
        }
    }
    let data = if chunks.len() == 1 {
        chunks.pop_front().unwrap_or_default()
    } else {
        let mut joined = bytes::BytesMut::with_capacity(total);
        for chunk in chunks {
            joined.extend_from_slice(&chunk);
        }
        joined.freeze()
    };
    Ok(Ok(Replayable { data, trailers }))
}

/// Where what is read from the client is counted, when it is.
type Counted = Option<Arc<ReadCount>>;

fn count(counted: &Counted, data: &Bytes) {
    if let Some(counted) = counted {
        counted.add(data);
    }
}

/// What is counted of a client's body as it is read: its bytes and, for a
/// gRPC request, its messages.
#[derive(Debug, Default)]
pub(crate) struct ReadCount {
    bytes: AtomicU64,
    /// `None` unless the request is gRPC. A body is read by one task at a
    /// time, so the lock is never contended.
    messages: Option<std::sync::Mutex<Messages>>,
}

impl ReadCount {
    /// A count for a body; `grpc` counts its messages too.
    pub(crate) fn new(grpc: bool) -> Self {
        Self {
            bytes: AtomicU64::new(0),
            messages: grpc.then(|| std::sync::Mutex::new(Messages::default())),
        }
    }

    fn add(&self, data: &[u8]) {
        self.bytes.fetch_add(data.len() as u64, Relaxed);
        if let Some(messages) = &self.messages {
            messages
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .feed(data);
        }
    }

    /// The bytes read so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    /// The whole gRPC messages read so far (0 for another request).
    pub(crate) fn messages(&self) -> u64 {
        self.messages.as_ref().map_or(0, |messages| {
            messages
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .complete()
        })
    }
}

/// Counts gRPC messages in a stream's bytes as they pass, however its
/// frames split them: each message is a flag byte, a 4-byte big-endian
/// length and that many bytes (gRPC over HTTP/2, "Length-Prefixed-Message").
/// A message counts once its last byte has passed.
#[derive(Debug, Default, Clone)]
pub(crate) struct Messages {
    /// Bytes of the current message's 5-byte prefix seen so far.
    prefix_seen: u8,
    /// Its length, as the prefix's bytes arrive.
    length: u32,
    /// Bytes of the current message's payload still to come.
    payload_left: u64,
    complete: u64,
}

impl Messages {
    /// Takes the next bytes of the stream.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= n as u64;
                data = &data[n..];
                if self.payload_left == 0 {
                    self.complete += 1;
                }
                continue;
            }
            let byte = data[0];
            data = &data[1..];
            // Byte 0 is the compression flag; 1 to 4 the length.
            if self.prefix_seen > 0 {
                self.length = self.length << 8 | u32::from(byte);
            }
            self.prefix_seen += 1;
            if self.prefix_seen == 5 {
                self.payload_left = u64::from(self.length);
                self.prefix_seen = 0;
                self.length = 0;
                if self.payload_left == 0 {
                    self.complete += 1;
                }
            }
        }
    }

    /// The whole messages seen.
    pub(crate) fn complete(&self) -> u64 {
        self.complete
    }
}

/// A frame read from the client, its bytes counted.
fn counting(
    polled: Poll<Option<Result<Frame<Bytes>, DownstreamBodyError>>>,
    counted: &Counted,
) -> Poll<Option<Result<Frame<Bytes>, DownstreamBodyError>>> {
    if let Poll::Ready(Some(Ok(frame))) = &polled
        && let Some(data) = frame.data_ref()
    {
        count(counted, data);
    }
    polled
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = DownstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DownstreamBodyError>>> {
        match self.project() {
            RequestBodyProj::Streaming { body, counted, .. } => {
                counting(body.poll_frame(cx), counted)
            }
            RequestBodyProj::Replay { data, trailers, .. } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
            RequestBodyProj::Prefixed {
                prefix,
                rest,
                counted,
                ..
            } => match prefix.pop_front() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => counting(rest.poll_frame(cx), counted),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Streaming { body, .. } => body.is_end_stream(),
            Self::Replay { data, trailers, .. } => data.is_none() && trailers.is_none(),
            Self::Prefixed { prefix, rest, .. } => prefix.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Streaming { body, .. } => body.size_hint(),
            Self::Replay { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Self::Prefixed { prefix, rest, .. } => {
                let buffered: u64 = prefix.iter().map(|d| d.len() as u64).sum();
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(buffered));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(buffered));
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] Box<dyn std::error::Error + Send + Sync>);

    /// A gRPC message: flag 0, big-endian length, payload.
    fn message(payload: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(payload);
        framed
    }

    #[test]
    fn grpc_messages_are_counted_however_the_frames_split_them() {
        let stream: Vec<u8> = [
            message(b"hello"),
            message(b""),
            message(&[7; 300]),
            message(b"x"),
        ]
        .concat();
        // Whole, byte by byte, and in every split into two.
        let mut whole = Messages::default();
        whole.feed(&stream);
        assert_eq!(whole.complete(), 4);
        let mut bytewise = Messages::default();
        for byte in &stream {
            bytewise.feed(std::slice::from_ref(byte));
        }
        assert_eq!(bytewise.complete(), 4);
        for at in 0..=stream.len() {
            let mut split = Messages::default();
            split.feed(&stream[..at]);
            split.feed(&stream[at..]);
            assert_eq!(split.complete(), 4, "split at {at}");
        }
        // A message counts once its last byte has passed; a prefix alone
        // does not.
        let mut partial = Messages::default();
        partial.feed(&message(&[1; 10])[..14]);
        assert_eq!(partial.complete(), 0);
        partial.feed(&[1]);
        assert_eq!(partial.complete(), 1);
        partial.feed(&[0, 0, 0]);
        assert_eq!(partial.complete(), 1);
        // A length too large to ever arrive is just never complete.
        let mut huge = Messages::default();
        huge.feed(&[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        assert_eq!(huge.complete(), 0);
    }

    #[test]
    fn a_read_count_counts_messages_only_for_grpc() {
        let data = message(b"abc");
        let grpc = ReadCount::new(true);
        grpc.add(&data);
        assert_eq!((grpc.bytes(), grpc.messages()), (8, 1));
        let http = ReadCount::new(false);
        http.add(&data);
        assert_eq!((http.bytes(), http.messages()), (8, 0));
    }

    #[test]
    fn unrelated_errors_are_not_blamed_on_the_client() {
        let io = std::io::Error::other("unrelated");
        assert!(!DownstreamBodyError::find(&io));
        let wrapped = Wrapper(Box::new(Wrapper(Box::new(io))));
        assert!(!DownstreamBodyError::find(&wrapped));
    }
}
