//! HTTP/1.1 upgrades (WebSocket or any other token): answer
//! `101 Switching Protocols`, then echo raw bytes on the upgraded connection
//! until the client closes it.
//!
//! No WebSocket framing is parsed: frames the client sends come back
//! byte for byte, which is what a proxy test needs to check that the tunnel
//! is transparent.

use http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, UPGRADE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::{Instrument as _, debug};

use super::body::EchoBody;
use super::tasks::Tasks;
use super::tcp::echo_until_eof;

/// The GUID RFC 6455 section 1.3 appends to `Sec-WebSocket-Key`.
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Whether a `connection` header value lists the `upgrade` token.
pub(crate) fn has_upgrade_token(connection: &HeaderValue) -> bool {
    connection
        .as_bytes()
        .split(|&b| b == b',')
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}

/// Answers an upgrade request with `101` and spawns the echo of the upgraded
/// connection. `headers` already holds the echo's informational headers.
pub(crate) fn accept(
    on_upgrade: OnUpgrade,
    upgrade: HeaderValue,
    websocket_key: Option<&HeaderValue>,
    mut headers: HeaderMap,
    tasks: &Tasks,
) -> Response<EchoBody> {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, upgrade);
    if let Some(key) = websocket_key {
        headers.insert(SEC_WEBSOCKET_ACCEPT, websocket_accept(key.as_bytes()));
    }

    let stop = tasks.clone();
    tasks.spawn(
        async move {
            tokio::select! {
                () = echo_upgraded(on_upgrade) => {}
                () = stop.draining() => debug!("upgraded connection closed by shutdown"),
            }
        }
        .instrument(tracing::debug_span!("upgraded")),
    );

    let mut response = Response::new(EchoBody::Empty);
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = headers;
    response
}

async fn echo_upgraded(on_upgrade: OnUpgrade) {
    match on_upgrade.await {
        Ok(upgraded) => match echo_until_eof(TokioIo::new(upgraded)).await {
            Ok(bytes) => debug!(bytes, "upgraded connection closed"),
            Err(err) => debug!(error = %err, "upgraded connection failed"),
        },
        Err(err) => debug!(error = %err, "upgrade failed"),
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 section 4.2.2):
/// base64 of the SHA-1 of the key followed by the protocol's GUID.
pub(crate) fn websocket_accept(key: &[u8]) -> HeaderValue {
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key);
    sha1.update(WEBSOCKET_GUID);
    let encoded = base64(&sha1.digest().bytes());
    HeaderValue::from_str(&encoded).expect("base64 output is a valid header value")
}

/// Standard base64 with padding (RFC 4648 section 4).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for group in input.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> shift & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_matches_rfc_6455_example() {
        let accept = websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let cases: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in cases {
            assert_eq!(base64(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn upgrade_token_is_found_in_lists_case_insensitively() {
        let cases = [
            ("upgrade", true),
            ("Upgrade", true),
            ("keep-alive, Upgrade", true),
            ("keep-alive,upgrade ", true),
            ("keep-alive", false),
            ("upgrades", false),
            ("", false),
        ];
        for (value, expected) in cases {
            let value = HeaderValue::from_static(value);
            assert_eq!(has_upgrade_token(&value), expected, "connection: {value:?}");
        }
    }
}
