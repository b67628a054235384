//! Bootstrap-token authentication for the xDS and admin APIs.
//!
//! Every request carries `authorization: Bearer <token>`; the token is
//! compared in constant time (for a given length), and neither the token
//! nor the header is ever logged or printed (`Debug` redacts it).

use std::fmt;
use std::sync::Arc;

/// Who may call the control plane's APIs.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Requests must carry this bearer token.
    Token(BootstrapToken),
    /// Every request is accepted. Only for tests and local demos: it must be
    /// asked for explicitly.
    Insecure,
}

impl Auth {
    /// Requests must carry `token`.
    pub fn token(token: impl Into<String>) -> Self {
        Self::Token(BootstrapToken::new(token))
    }

    /// Whether `headers` satisfy this policy.
    pub(crate) fn check(&self, headers: &http::HeaderMap) -> Result<(), AuthFailure> {
        let Self::Token(expected) = self else {
            return Ok(());
        };
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(AuthFailure::Missing);
        };
        let value = value.as_bytes();
        // The scheme is case-insensitive (RFC 9110 section 11.1).
        let Some((scheme, token)) = value.split_at_checked(7) else {
            return Err(AuthFailure::NotBearer);
        };
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return Err(AuthFailure::NotBearer);
        }
        if constant_time_eq(token, expected.0.as_bytes()) {
            Ok(())
        } else {
            Err(AuthFailure::WrongToken)
        }
    }
}

/// A bootstrap token; its `Debug` output is redacted.
#[derive(Clone)]
pub struct BootstrapToken(Arc<str>);

impl BootstrapToken {
    /// Wraps a token (surrounding whitespace, such as a token file's final
    /// newline, is removed).
    pub fn new(token: impl Into<String>) -> Self {
        let token: String = token.into();
        Self(token.trim().into())
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BootstrapToken(<redacted>)")
    }
}

/// Why a request was refused; names no secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    Missing,
    NotBearer,
    WrongToken,
}

impl AuthFailure {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing authorization header",
            Self::NotBearer => "authorization is not a bearer token",
            Self::WrongToken => "wrong token",
        }
    }
}

/// Compares without an early exit on the first differing byte, so the time
/// taken does not reveal how much of a guess was right. Only the length may
/// leak, which a fixed-size random token makes worthless.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: Option<&str>) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        if let Some(value) = value {
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn bearer_token_checks() {
        let auth = Auth::token("s3cret\n");
        let cases = [
            (Some("Bearer s3cret"), Ok(())),
            (Some("bearer s3cret"), Ok(())),
            (None, Err(AuthFailure::Missing)),
            (Some("Basic s3cret"), Err(AuthFailure::NotBearer)),
            (Some("Bear"), Err(AuthFailure::NotBearer)),
            (Some("Bearer s3cre"), Err(AuthFailure::WrongToken)),
            (Some("Bearer s3cret2"), Err(AuthFailure::WrongToken)),
        ];
        for (value, expected) in cases {
            assert_eq!(auth.check(&headers(value)), expected, "{value:?}");
        }
        assert_eq!(Auth::Insecure.check(&headers(None)), Ok(()));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let auth = Auth::token("s3cret");
        assert!(!format!("{auth:?}").contains("s3cret"));
    }
}
