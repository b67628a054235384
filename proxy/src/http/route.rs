//! What a route does to a request on its own account, as layers of the
//! route's stack (`stack::route_service`): its header rules and rewrites
//! ([`Rules`]), and the answers it gives without an upstream
//! ([`Direct`]). Both are prepared when the snapshot is built; per request
//! they apply prepared header values and, for a rewrite, build one path.
//!
//! The proxy's own header rules (hop-by-hop headers, forwarding headers,
//! `via`, the request id) are the connection's, applied before routing by
//! `http::server`; a route's rules run after them and have the last word.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use pin_project_lite::pin_project;

use super::body::ResponseBody;
use super::headers;
use crate::config::HeaderOps;
use crate::error::ProxyError;

/// A route's rules, prepared.
#[derive(Debug)]
pub(crate) struct RouteRules {
    pub(crate) rewrite: Option<PathRewrite>,
    pub(crate) host_rewrite: Option<HeaderValue>,
    pub(crate) request_headers: HeaderOps,
    pub(crate) response_headers: HeaderOps,
}

/// How a route rewrites the path.
#[derive(Debug)]
pub(crate) enum PathRewrite {
    /// Replace the first `matched` bytes (the matched prefix).
    Prefix {
        matched: usize,
        replacement: Box<str>,
    },
    /// Replace the whole path (an exact match).
    Whole(Box<str>),
}

/// Builds [`Rules`] services.
#[derive(Debug, Clone)]
pub(crate) struct RulesLayer {
    rules: Arc<RouteRules>,
}

impl RulesLayer {
    pub(crate) fn new(rules: Arc<RouteRules>) -> Self {
        Self { rules }
    }
}

impl<S> tower::Layer<S> for RulesLayer {
    type Service = Rules<S>;

    fn layer(&self, inner: S) -> Rules<S> {
        Rules {
            inner,
            rules: self.rules.clone(),
        }
    }
}

/// Applies a route's request rules (header operations, host and path
/// rewrites) on the way in, and its response header operations to the
/// response on the way out. Error answers are the proxy's, not the
/// route's: they pass untouched.
#[derive(Debug, Clone)]
pub(crate) struct Rules<S> {
    inner: S,
    rules: Arc<RouteRules>,
}

impl<S, B> tower::Service<Request<B>> for Rules<S>
where
    S: tower::Service<Request<B>, Response = Response<ResponseBody>, Error = ProxyError>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let rules = &*self.rules;
        headers::apply(&rules.request_headers, req.headers_mut());
        if let Some(host) = &rules.host_rewrite {
            req.headers_mut().insert(header::HOST, host.clone());
        }
        if let Some(rewrite) = &rules.rewrite {
            match rewrite_path(req.uri(), rewrite) {
                Ok(path) => *req.uri_mut() = Uri::from(path),
                Err(error) => return ResponseFuture::failed(error),
            }
        }
        ResponseFuture {
            state: State::Called {
                inner: self.inner.call(req),
                rules: self.rules.clone(),
            },
        }
    }
}

pin_project! {
    /// The future of [`Rules`].
    #[derive(Debug)]
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Called { #[pin] inner: F, rules: Arc<RouteRules> },
        Failed { error: Option<ProxyError> },
    }
}

impl<F> ResponseFuture<F> {
    fn failed(error: ProxyError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, ProxyError>>,
{
    type Output = Result<Response<ResponseBody>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { inner, rules } => {
                let mut response = ready!(inner.poll(cx))?;
                headers::apply(&rules.response_headers, response.headers_mut());
                Poll::Ready(Ok(response))
            }
            StateProj::Failed { error } => Poll::Ready(Err(error
                .take()
                .expect("a failed rules future is polled once"))),
        }
    }
}

/// A route's direct response: answered locally, as a response (not an
/// error), with no upstream.
#[derive(Debug, Clone)]
pub(crate) struct Direct {
    status: StatusCode,
    body: Bytes,
}

impl Direct {
    pub(crate) fn new(status: StatusCode, body: Bytes) -> Self {
        Self { status, body }
    }

    /// The response, at once.
    pub(crate) fn respond(&self) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::full(self.body.clone()));
        *response.status_mut() = self.status;
        response
    }
}

/// The path and query to send upstream.
fn rewrite_path(uri: &Uri, rewrite: &PathRewrite) -> Result<PathAndQuery, ProxyError> {
    let original = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let path = original.path();
    let new_path = match rewrite {
        PathRewrite::Prefix {
            matched,
            replacement,
        } => {
            let rest = path.get(*matched..).unwrap_or("");
            // Literal replacement, as Envoy does, except that a "//" at
            // the seam collapses to one slash.
            if replacement.ends_with('/') && rest.starts_with('/') {
                format!("{}{}", replacement, &rest[1..])
            } else {
                format!("{replacement}{rest}")
            }
        }
        PathRewrite::Whole(replacement) => replacement.to_string(),
    };
    let new_path = if new_path.is_empty() {
        "/".to_owned()
    } else {
        new_path
    };
    let full = match original.query() {
        Some(query) => format!("{new_path}?{query}"),
        None => new_path,
    };
    PathAndQuery::try_from(full).map_err(|_| ProxyError::Malformed("rewritten path"))
}

#[cfg(test)]
mod tests {
    use http::HeaderName;
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    fn ops(set: &[(&'static str, &'static str)], remove: &[&'static str]) -> HeaderOps {
        HeaderOps {
            set: set
                .iter()
                .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
                .collect(),
            add: Vec::new(),
            remove: remove.iter().map(|k| HeaderName::from_static(k)).collect(),
        }
    }

    /// An inner service that answers with what it received: the path in
    /// `x-path`, the host in `x-host`, and every `x-` request header.
    fn mirror() -> impl tower::Service<
        Request<()>,
        Response = Response<ResponseBody>,
        Error = ProxyError,
        Future = impl Future<Output = Result<Response<ResponseBody>, ProxyError>>,
    > + Clone {
        tower::service_fn(|req: Request<()>| async move {
            let mut response = Response::new(ResponseBody::empty());
            let h = response.headers_mut();
            for (name, value) in req.headers() {
                if name.as_str().starts_with("x-") {
                    h.append(name.clone(), value.clone());
                }
            }
            h.insert("x-path", req.uri().to_string().parse().unwrap());
            if let Some(host) = req.headers().get(header::HOST) {
                h.insert("x-host", host.clone());
            }
            Ok(response)
        })
    }

    #[tokio::test]
    async fn route_rules_rewrite_the_request_and_the_response_and_have_the_last_word() {
        let rules = Arc::new(RouteRules {
            rewrite: Some(PathRewrite::Prefix {
                matched: "/api".len(),
                replacement: "/v2".into(),
            }),
            host_rewrite: Some(HeaderValue::from_static("internal.svc")),
            request_headers: ops(&[("x-forwarded-proto", "https")], &["x-secret"]),
            response_headers: ops(&[("x-served-by", "weft")], &["x-path"]),
        });
        let mut svc = RulesLayer::new(rules).layer(mirror());
        let req = Request::builder()
            .uri("/api/users?id=7")
            .header(header::HOST, "public.example.com")
            .header("x-forwarded-proto", "http")
            .header("x-secret", "1")
            .body(())
            .unwrap();
        let response = svc.ready().await.unwrap().call(req).await.unwrap();
        let h = response.headers();
        assert_eq!(h["x-host"], "internal.svc");
        assert_eq!(h["x-forwarded-proto"], "https", "the route's set wins");
        assert!(!h.contains_key("x-secret"));
        assert!(!h.contains_key("x-path"), "response rules ran");
        assert_eq!(h["x-served-by"], "weft");
    }

    #[tokio::test]
    async fn error_answers_pass_route_rules_untouched() {
        let rules = Arc::new(RouteRules {
            rewrite: None,
            host_rewrite: None,
            request_headers: HeaderOps::default(),
            response_headers: ops(&[("x-served-by", "weft")], &[]),
        });
        let failing = tower::service_fn(|_: Request<()>| async {
            Err::<Response<ResponseBody>, _>(ProxyError::UpstreamTimeout)
        });
        let mut svc = RulesLayer::new(rules).layer(failing);
        let result = svc.ready().await.unwrap().call(Request::new(())).await;
        assert!(matches!(result, Err(ProxyError::UpstreamTimeout)));
    }

    #[test]
    fn a_direct_response_is_a_response() {
        let direct = Direct::new(StatusCode::IM_A_TEAPOT, Bytes::from_static(b"short"));
        let response = direct.respond();
        assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(response.body().endpoint(), None);
    }

    #[test]
    fn path_rewrites_join_cleanly_and_keep_the_query() {
        let prefix = |matched: &str, replacement: &str| PathRewrite::Prefix {
            matched: matched.len(),
            replacement: replacement.into(),
        };
        let cases = [
            ("/api/users?x=1", prefix("/api", "/v2"), "/v2/users?x=1"),
            ("/api/users", prefix("/api/", "/"), "/users"),
            ("/api", prefix("/api", "/"), "/"),
            ("/api/users", prefix("/api", "/v2/"), "/v2/users"),
            ("/apiusers", prefix("/api", "/v2"), "/v2users"),
            ("/old", PathRewrite::Whole("/new".into()), "/new"),
            ("/old?q", PathRewrite::Whole("/new".into()), "/new?q"),
        ];
        for (uri, rewrite, want) in cases {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(
                rewrite_path(&uri, &rewrite).unwrap().as_str(),
                want,
                "{uri}"
            );
        }
    }
}
