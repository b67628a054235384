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

/// Per-node bootstrap tokens: `weft-node-v1.<node id>.<MAC>`, where the MAC
/// is HMAC-SHA256 of the node id under a key kept in the control plane's
/// state directory (`node-token.key`, 32 random bytes, mode 0600). A node
/// token proves one node (its workload or gateway, and so the identity the
/// mesh gives it) and nothing else: it is refused for another node id and
/// on the admin API. Issued by `weft-cp token issue`.
#[derive(Clone)]
pub struct NodeTokens {
    key: Arc<ring::hmac::Key>,
    /// Refuse the mesh-wide token on the xDS and identity APIs.
    pub require: bool,
}

/// The token prefix; it names the format's version.
const NODE_TOKEN_PREFIX: &str = "weft-node-v1.";
/// The key file in the state directory.
const NODE_TOKEN_KEY_FILE: &str = "node-token.key";

impl NodeTokens {
    /// Loads the key from `state_dir`, or creates it there (0600, in a
    /// 0700 directory) on first use.
    pub fn load_or_create(state_dir: &std::path::Path) -> Result<Self, crate::ca::CaError> {
        let path = state_dir.join(NODE_TOKEN_KEY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = vec![0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                    .map_err(|_| crate::ca::CaError::Invalid {
                        path: path.clone(),
                        message: "the system's random source failed".into(),
                    })?;
                crate::ca::write_secret(state_dir, &path, &bytes)?;
                bytes
            }
            Err(source) => return Err(crate::ca::CaError::Io { path, source }),
        };
        if bytes.len() != 32 {
            return Err(crate::ca::CaError::Invalid {
                path,
                message: format!("expected 32 bytes, found {}", bytes.len()),
            });
        }
        Ok(Self {
            key: Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes)),
            require: false,
        })
    }

    /// The token of `node_id`.
    pub fn issue(&self, node_id: &str) -> String {
        let tag = ring::hmac::sign(&self.key, node_id.as_bytes());
        let mac: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("{NODE_TOKEN_PREFIX}{node_id}.{mac}")
    }

    /// The node a token proves, if it is one of ours.
    fn verify(&self, token: &[u8]) -> Option<Arc<str>> {
        let token = std::str::from_utf8(token).ok()?;
        let (node, mac) = token.strip_prefix(NODE_TOKEN_PREFIX)?.rsplit_once('.')?;
        if node.is_empty() || mac.len() != 64 {
            return None;
        }
        let mac: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(mac.get(2 * i..2 * i + 2)?, 16).ok())
            .collect::<Option<_>>()?;
        // Constant time.
        ring::hmac::verify(&self.key, node.as_bytes(), &mac).ok()?;
        Some(node.into())
    }
}

impl fmt::Debug for NodeTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTokens")
            .field("key", &"<redacted>")
            .field("require", &self.require)
            .finish()
    }
}

/// Who a request's token proves the caller to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// The mesh-wide token (or `--insecure`): an operator, or a proxy that
    /// may name any node.
    Operator,
    /// A node token: this node only.
    Node(Arc<str>),
    /// A client certificate on the xDS port (mTLS): only a node the mesh
    /// gives this SPIFFE ID.
    Workload(Arc<str>),
}

/// Checks a request's bearer token against the mesh-wide token, then the
/// node tokens.
pub(crate) fn identify(
    auth: &Auth,
    nodes: Option<&NodeTokens>,
    headers: &http::HeaderMap,
) -> Result<Caller, AuthFailure> {
    let operator = auth.check(headers);
    if operator.is_ok() {
        return Ok(Caller::Operator);
    }
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().split_at_checked(7))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|(_, token)| token);
    match (nodes, token) {
        (Some(nodes), Some(token)) => nodes
            .verify(token)
            .map(Caller::Node)
            .ok_or(AuthFailure::WrongToken),
        _ => operator.map(|()| Caller::Operator),
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
    fn node_tokens_prove_one_node() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = NodeTokens::load_or_create(dir.path()).unwrap();
        let token = tokens.issue("web-1");
        assert!(token.starts_with("weft-node-v1.web-1."), "{token}");
        let auth = Auth::token("mesh-wide");
        let bearer = |t: &str| headers(Some(&format!("Bearer {t}")));
        assert_eq!(
            identify(&auth, Some(&tokens), &bearer(&token)),
            Ok(Caller::Node("web-1".into()))
        );
        assert_eq!(
            identify(&auth, Some(&tokens), &bearer("mesh-wide")),
            Ok(Caller::Operator)
        );
        // Another node's name with this MAC, a flipped MAC, or a token
        // from another key are refused.
        let forged = token.replace("web-1", "web-2");
        let mut flipped = token.clone();
        flipped.pop();
        flipped.push(if token.ends_with('0') { '1' } else { '0' });
        let other = NodeTokens::load_or_create(tempfile::tempdir().unwrap().path())
            .unwrap()
            .issue("web-1");
        for bad in [forged, flipped, other, "weft-node-v1.web-1.zz".to_owned()] {
            assert_eq!(
                identify(&auth, Some(&tokens), &bearer(&bad)),
                Err(AuthFailure::WrongToken),
                "{bad}"
            );
        }
        // Without node tokens configured, only the mesh-wide token works.
        assert_eq!(
            identify(&auth, None, &bearer(&token)),
            Err(AuthFailure::WrongToken)
        );
        // The key survives a restart, and is private.
        let again = NodeTokens::load_or_create(dir.path()).unwrap();
        assert_eq!(again.issue("web-1"), token);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(NODE_TOKEN_KEY_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert!(!format!("{tokens:?}").contains(&token[20..]));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let auth = Auth::token("s3cret");
        assert!(!format!("{auth:?}").contains("s3cret"));
    }
}
