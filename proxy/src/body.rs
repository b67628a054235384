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
//! A leaf module: the HTTP server builds the body, the cluster sends it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

/// The client's request body failed.
#[derive(Debug, thiserror::Error)]
#[error("downstream request body")]
pub(crate) struct DownstreamBodyError(#[source] pub(crate) hyper::Error);

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
    /// A request body as the proxy sends it upstream: the client's stream,
    /// or a copy of a body read whole (up to a bound) so that it can be
    /// sent again by a retry, or the bytes read before the bound followed
    /// by the rest of the stream.
    #[derive(Debug)]
    #[project = RequestBodyProj]
    pub(crate) enum RequestBody {
        Streaming { #[pin] body: Incoming, counted: Counted },
        Replay { data: Option<Bytes>, trailers: Option<http::HeaderMap> },
        Prefixed { prefix: std::collections::VecDeque<Bytes>, #[pin] rest: Incoming, counted: Counted },
    }
}

impl RequestBody {
    /// Streams the client's body.
    pub(crate) fn new(body: Incoming) -> Self {
        Self::Streaming {
            body,
            counted: None,
        }
    }

    /// Streams the client's body, adding the bytes read from the client
    /// to `counted` (once, however often a retry sends them).
    pub(crate) fn counted(body: Incoming, counted: Arc<AtomicU64>) -> Self {
        Self::Streaming {
            body,
            counted: Some(counted),
        }
    }

    /// A body already read whole.
    fn replay(replayable: &Replayable) -> Self {
        Self::Replay {
            data: Some(replayable.data.clone()).filter(|d| !d.is_empty()),
            trailers: replayable.trailers.clone(),
        }
    }
}

/// A request body read whole, to be sent once per attempt.
#[derive(Debug, Clone, Default)]
pub(crate) struct Replayable {
    data: Bytes,
    trailers: Option<http::HeaderMap>,
}

impl Replayable {
    /// A body for one more attempt.
    pub(crate) fn body(&self) -> RequestBody {
        RequestBody::replay(self)
    }
}

/// `body` as a [`Replayable`] without reading anything, when it is whole
/// already: no body at all (most requests), or one read before. Any other
/// body comes back as it was.
// The body comes back as it went in: boxing it would allocate per request.
#[allow(clippy::result_large_err)]
pub(crate) fn ready_for_replay(body: RequestBody) -> Result<Replayable, RequestBody> {
    match body {
        RequestBody::Replay { data, trailers } => Ok(Replayable {
            data: data.unwrap_or_default(),
            trailers,
        }),
        RequestBody::Streaming { body, .. } if body.is_end_stream() => Ok(Replayable::default()),
        other => Err(other),
    }
}

/// Reads `body` whole if it fits in `limit` bytes: then it can be sent
/// again. A larger body gives back what was read followed by the rest of
/// the stream, to be sent once. A body the client breaks is an error (the
/// client's).
pub(crate) async fn read_for_replay(
    body: RequestBody,
    limit: usize,
) -> Result<Result<Replayable, RequestBody>, DownstreamBodyError> {
    use http_body_util::BodyExt as _;
    let (mut incoming, counted) = match ready_for_replay(body) {
        Ok(replayable) => return Ok(Ok(replayable)),
        Err(RequestBody::Streaming { body, counted }) => (body, counted),
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
        }));
    }
    let mut chunks = std::collections::VecDeque::new();
    let mut total = 0_usize;
    let mut trailers = None;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(DownstreamBodyError)?;
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
                    }));
                }
            }
            Err(frame) => {
                if let Ok(fields) = frame.into_trailers() {
                    trailers = Some(fields);
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

/// Where the bytes read from the client are counted, when they are.
type Counted = Option<Arc<AtomicU64>>;

fn count(counted: &Counted, data: &Bytes) {
    if let Some(counted) = counted {
        counted.fetch_add(data.len() as u64, Relaxed);
    }
}

/// A frame read from the client, its bytes counted.
fn counting(
    polled: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
    counted: &Counted,
) -> Poll<Option<Result<Frame<Bytes>, DownstreamBodyError>>> {
    if let Poll::Ready(Some(Ok(frame))) = &polled
        && let Some(data) = frame.data_ref()
    {
        count(counted, data);
    }
    polled.map_err(DownstreamBodyError)
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = DownstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DownstreamBodyError>>> {
        match self.project() {
            RequestBodyProj::Streaming { body, counted } => counting(body.poll_frame(cx), counted),
            RequestBodyProj::Replay { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            RequestBodyProj::Prefixed {
                prefix,
                rest,
                counted,
            } => match prefix.pop_front() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => counting(rest.poll_frame(cx), counted),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Streaming { body, .. } => body.is_end_stream(),
            Self::Replay { data, trailers } => data.is_none() && trailers.is_none(),
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

    #[test]
    fn unrelated_errors_are_not_blamed_on_the_client() {
        let io = std::io::Error::other("unrelated");
        assert!(!DownstreamBodyError::find(&io));
        let wrapped = Wrapper(Box::new(Wrapper(Box::new(io))));
        assert!(!DownstreamBodyError::find(&wrapped));
    }
}
