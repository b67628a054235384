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
    /// A request body as the proxy sends it upstream.
    #[derive(Debug)]
    pub(crate) struct RequestBody {
        #[pin]
        body: Incoming,
    }
}

impl RequestBody {
    /// Streams the client's body.
    pub(crate) fn new(body: Incoming) -> Self {
        Self { body }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = DownstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DownstreamBodyError>>> {
        self.project()
            .body
            .poll_frame(cx)
            .map_err(DownstreamBodyError)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
