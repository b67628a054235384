//! Header rules every proxied request and response follows: hop-by-hop
//! headers removed (RFC 9110 §7.6.1), `x-forwarded-for`,
//! `x-forwarded-proto` and `x-request-id` set as far as the listener trusts
//! the proxies in front of it (a client's own values are never trusted),
//! `via` appended when configured, and each route's own rules.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::HeaderOps;
use crate::made;

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static X_FORWARDED_CLIENT_CERT: HeaderName =
    HeaderName::from_static("x-forwarded-client-cert");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// Only meaningful beside an `h2c` upgrade, which is never forwarded.
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
static HTTP: HeaderValue = HeaderValue::from_static("http");
static HTTPS: HeaderValue = HeaderValue::from_static("https");
static UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");

/// Removes connection-specific headers. With `keep_upgrade` (an HTTP/1.1
/// upgrade being forwarded), `upgrade` stays and `connection: upgrade` is
/// restored, since the upstream must see the upgrade request.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    strip(headers, keep_upgrade);
}

/// [`strip_hop_by_hop`] for a request on its way upstream, and the
/// client's `x-forwarded-client-cert`: only this proxy says who the client
/// proved to be.
pub(crate) fn strip_for_upstream(headers: &mut HeaderMap, keep_upgrade: bool) {
    if strip(headers, keep_upgrade).client_cert {
        headers.remove(&X_FORWARDED_CLIENT_CERT);
    }
}

fn strip(headers: &mut HeaderMap, keep_upgrade: bool) -> HopByHop {
    // PERF: one pass over the names finds the hop-by-hop headers present;
    // removing an absent one would still hash its name and probe the map
    // (`cargo bench --bench hotpath -- request_headers`, benches/RESULTS.md).
    let mut present = HopByHop::default();
    for name in headers.keys() {
        present.note(name);
    }
    if present.connection {
        // Headers the sender listed in `connection` are hop-by-hop too.
        if let Some(connection) = headers.get(header::CONNECTION).cloned() {
            for token in connection.to_str().unwrap_or("").split(',') {
                let token = token.trim();
                // `keep-alive` is removed below anyway, and parsing it would
                // allocate (it is not one of http's predefined names).
                if token.is_empty()
                    || ["upgrade", "close", "keep-alive"]
                        .iter()
                        .any(|t| token.eq_ignore_ascii_case(t))
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                    && !is_end_to_end_essential(&name)
                {
                    headers.remove(name);
                }
            }
        }
        headers.remove(header::CONNECTION);
    }
    if present.keep_alive {
        headers.remove(&KEEP_ALIVE);
    }
    if present.proxy_connection {
        headers.remove(&PROXY_CONNECTION);
    }
    if present.http2_settings {
        headers.remove(&HTTP2_SETTINGS);
    }
    if present.transfer_encoding {
        headers.remove(header::TRANSFER_ENCODING);
    }
    // `te: trailers` is how gRPC says it understands trailers; anything
    // else in `te` is about this hop only.
    if present.te
        && headers
            .get(header::TE)
            .is_some_and(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, UPGRADE.clone());
    } else if present.upgrade {
        headers.remove(header::UPGRADE);
    }
    present
}

/// Which of the fixed hop-by-hop headers a map holds (and whether it
/// holds `x-forwarded-client-cert`).
#[derive(Debug, Default)]
struct HopByHop {
    connection: bool,
    keep_alive: bool,
    proxy_connection: bool,
    http2_settings: bool,
    transfer_encoding: bool,
    te: bool,
    upgrade: bool,
    client_cert: bool,
}

impl HopByHop {
    fn note(&mut self, name: &HeaderName) {
        // Predefined names compare as enum values; the custom ones by bytes.
        if name == header::CONNECTION {
            self.connection = true;
        } else if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
        } else if name == header::TE {
            self.te = true;
        } else if name == header::UPGRADE {
            self.upgrade = true;
        } else if name == KEEP_ALIVE {
            self.keep_alive = true;
        } else if name == PROXY_CONNECTION {
            self.proxy_connection = true;
        } else if name == HTTP2_SETTINGS {
            self.http2_settings = true;
        } else if name == X_FORWARDED_CLIENT_CERT {
            self.client_cert = true;
        }
    }
}

/// True when `upgrade` offers `h2c` (HTTP/2 over cleartext, RFC 7540
/// §3.2; removed from HTTP/2 by RFC 9113).
pub(crate) fn upgrade_names_h2c(headers: &HeaderMap) -> bool {
    headers.get_all(header::UPGRADE).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
    })
}

/// True for a Host value that can be a URI authority (RFC 3986 §3.2):
/// reg-name or IP-literal characters and a port. Whitespace, `/`, `@`,
/// `?`, `#` and controls are not: such a Host is malformed, never a name
/// that merely matches no route.
pub(crate) fn is_valid_host(host: &[u8]) -> bool {
    host.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
            )
    })
}

/// A client cannot make the proxy drop these by listing them in
/// `connection`.
fn is_end_to_end_essential(name: &HeaderName) -> bool {
    name == header::HOST
        || name == header::CONTENT_LENGTH
        || name == header::CONTENT_TYPE
        || name == header::TE
}

/// True for an HTTP/1.1 upgrade request (`connection: upgrade` plus an
/// `upgrade` header).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Sets the forwarding headers for a listener that trusts `trusted_hops`
/// proxies in front of it (Envoy's `xff_num_trusted_hops`).
///
/// `x-forwarded-for`: the last `trusted_hops` entries the client sent are
/// kept (each was appended by a trusted proxy; the first of them is the
/// client's address as that proxy saw it), anything before them (what the
/// client claimed) is dropped, and the peer's address is appended. With no
/// trusted hop it is just the peer's address.
///
/// `x-forwarded-proto`: with no trusted hop, the scheme of this connection
/// (`https` when `is_tls`);
/// otherwise a trusted proxy's value is kept.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    peer_ip: &HeaderValue,
    trusted_hops: u32,
    is_tls: bool,
) {
    let kept = if trusted_hops == 0 {
        None
    } else {
        trusted_entries(headers, trusted_hops)
    };
    match kept {
        Some(kept) => {
            let mut value = Vec::with_capacity(kept.len() + 2 + peer_ip.len());
            value.extend_from_slice(&kept);
            value.extend_from_slice(b", ");
            value.extend_from_slice(peer_ip.as_bytes());
            match HeaderValue::from_bytes(&value) {
                Ok(value) => headers.insert(X_FORWARDED_FOR.clone(), value),
                Err(_) => headers.insert(X_FORWARDED_FOR.clone(), peer_ip.clone()),
            };
        }
        None => {
            headers.insert(X_FORWARDED_FOR.clone(), peer_ip.clone());
        }
    }
    if trusted_hops == 0 || !headers.contains_key(&X_FORWARDED_PROTO) {
        let scheme = if is_tls { &HTTPS } else { &HTTP };
        headers.insert(X_FORWARDED_PROTO.clone(), scheme.clone());
    }
}

/// The last `hops` comma-separated entries of every `x-forwarded-for`
/// line, joined with ", "; `None` when there are none.
fn trusted_entries(headers: &HeaderMap, hops: u32) -> Option<Vec<u8>> {
    let lines = headers.get_all(&X_FORWARDED_FOR);
    let mut entries: Vec<&[u8]> = lines
        .iter()
        .flat_map(|line| line.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|entry| !entry.is_empty())
        .collect();
    let skip = entries.len().saturating_sub(hops as usize);
    entries.drain(..skip);
    if entries.is_empty() {
        return None;
    }
    Some(entries.join(&b", "[..]))
}

/// The `x-forwarded-client-cert` value for a client that proved `peer`
/// (Envoy's format: `By=<this proxy's SPIFFE ID>;URI=<the client's>`;
/// `By` only when the listener's workload identity or default certificate
/// gives one).
/// Built once per connection.
pub(crate) fn client_cert_value(
    tls: Option<&crate::config::ListenerTls>,
    peer: &str,
) -> Option<HeaderValue> {
    let own = tls.and_then(|tls| {
        if let Some(own) = &tls.workload_identity {
            return Some(own.clone());
        }
        let default = tls
            .certificates
            .iter()
            .find(|c| c.server_names.is_empty())
            .or_else(|| tls.certificates.first())?;
        default.spiffe_id.clone()
    });
    let value = match own {
        Some(own) => format!("By={own};URI={peer}"),
        None => format!("URI={peer}"),
    };
    HeaderValue::try_from(value).ok()
}

/// Returns the request's `x-request-id`: the one it carries when `keep`
/// (a trusted hop set it, or the listener preserves client ids), else a
/// new random (UUIDv4 shaped) one.
pub fn ensure_request_id(headers: &mut HeaderMap, keep: bool) -> &HeaderValue {
    // One lookup of the name, whichever way it goes.
    match headers.entry(X_REQUEST_ID.clone()) {
        header::Entry::Occupied(mut sent) => {
            if !keep {
                // Every value the client sent goes.
                sent.insert(random_request_id());
            }
            sent.into_mut()
        }
        header::Entry::Vacant(none) => none.insert(random_request_id()),
    }
}

fn random_request_id() -> HeaderValue {
    let (hi, lo) = crate::rng::with_thread_rng(|rng| (rng.u64(..), rng.u64(..)));
    let bits = (u128::from(hi) << 64 | u128::from(lo)) & !(0xF000u128 << 64) & !(0xC000u128 << 48);
    let digits = made::hex_u128(bits | (0x4000u128 << 64) | (0x8000u128 << 48));
    // UUID groups: 8, 4, 4, 4 and 12 digits.
    let mut out = [b'-'; 36];
    out[0..8].copy_from_slice(&digits[0..8]);
    out[9..13].copy_from_slice(&digits[8..12]);
    out[14..18].copy_from_slice(&digits[12..16]);
    out[19..23].copy_from_slice(&digits[16..20]);
    out[24..36].copy_from_slice(&digits[20..32]);
    made::value(&out)
}

/// Applies a route's header rules: remove, then set, then add.
pub fn apply(ops: &HeaderOps, headers: &mut HeaderMap) {
    for name in &ops.remove {
        headers.remove(name);
    }
    for (name, value) in &ops.set {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &ops.add {
        headers.append(name.clone(), value.clone());
    }
}

/// Sum of header name and value bytes, as HTTP/2's header list size counts
/// them (plus 32 per entry, RFC 9113 §6.5.2).
pub(crate) fn header_list_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn host_values_are_authorities_or_malformed() {
        let valid = [
            "example.com",
            "example.com:8080",
            "127.0.0.1:80",
            "[::1]:8443",
            "xn--bcher-kva.example",
            "a_b.internal",
            "",
        ];
        for host in valid {
            assert!(is_valid_host(host.as_bytes()), "{host:?}");
        }
        let invalid = [
            "exa mple.com",
            "example.com\t",
            "a/b",
            "user@example.com",
            "example.com?x",
            "example.com#x",
            "a\"b",
            "a\\b",
        ];
        for host in invalid {
            assert!(!is_valid_host(host.as_bytes()), "{host:?}");
        }
    }

    #[test]
    fn h2c_is_found_in_any_upgrade_token() {
        let cases = [
            (&[("upgrade", "h2c")][..], true),
            (&[("upgrade", "websocket, H2C")][..], true),
            (&[("upgrade", "websocket"), ("upgrade", " h2c ")][..], true),
            (&[("upgrade", "websocket")][..], false),
            (&[("upgrade", "h2")][..], false),
            (&[][..], false),
        ];
        for (pairs, want) in cases {
            assert_eq!(upgrade_names_h2c(&map(pairs)), want, "{pairs:?}");
        }
    }

    #[test]
    fn http2_settings_never_travels_upstream() {
        let mut h = map(&[("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("x-keep", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn a_clients_forwarded_client_cert_goes_only_on_the_way_upstream() {
        let headers = [
            ("x-forwarded-client-cert", "by=forged"),
            ("connection", "close"),
            ("x-forwarded-client-cert", "uri=forged"),
            ("x-keep", "1"),
        ];
        let mut request = map(&headers);
        strip_for_upstream(&mut request, false);
        assert_eq!(request.len(), 1, "{request:?}");
        assert!(request.contains_key("x-keep"));
        // A response's is the upstream's to send.
        let mut response = map(&headers);
        strip_hop_by_hop(&mut response, false);
        assert_eq!(
            response.get_all("x-forwarded-client-cert").iter().count(),
            2
        );
    }

    #[test]
    fn te_trailers_and_upgrades_survive() {
        let mut h = map(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade_request(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarding_headers_trust_only_the_configured_hops() {
        let ip = HeaderValue::from_static("10.0.0.2");
        type Sent = &'static [(&'static str, &'static str)];
        // (client-sent headers, trusted hops, x-forwarded-for, x-forwarded-proto)
        let cases: [(Sent, u32, &str, &str); 8] = [
            (&[], 0, "10.0.0.2", "http"),
            (
                &[
                    ("x-forwarded-for", "1.2.3.4"),
                    ("x-forwarded-proto", "https"),
                ],
                0,
                "10.0.0.2",
                "http",
            ),
            (
                &[("x-forwarded-for", "1.2.3.4")],
                1,
                "1.2.3.4, 10.0.0.2",
                "http",
            ),
            (
                &[
                    ("x-forwarded-for", "6.6.6.6, 1.2.3.4"),
                    ("x-forwarded-proto", "https"),
                ],
                1,
                "1.2.3.4, 10.0.0.2",
                "https",
            ),
            (
                &[
                    ("x-forwarded-for", "6.6.6.6,1.2.3.4"),
                    ("x-forwarded-for", "5.5.5.5"),
                ],
                2,
                "1.2.3.4, 5.5.5.5, 10.0.0.2",
                "http",
            ),
            (
                &[("x-forwarded-for", "1.2.3.4")],
                3,
                "1.2.3.4, 10.0.0.2",
                "http",
            ),
            (&[("x-forwarded-for", " , ")], 1, "10.0.0.2", "http"),
            (&[("x-forwarded-proto", "https")], 1, "10.0.0.2", "https"),
        ];
        for (sent, hops, xff, proto) in cases {
            let mut h = map(sent);
            add_forwarded(&mut h, &ip, hops, false);
            assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1, "{sent:?}");
            assert_eq!(h["x-forwarded-for"], xff, "{sent:?} {hops}");
            assert_eq!(h["x-forwarded-proto"], proto, "{sent:?} {hops}");
        }
    }

    #[test]
    fn request_id_is_kept_or_generated_as_uuid_v4() {
        let mut h = map(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut h, true), "abc");
        assert_ne!(ensure_request_id(&mut h, false), "abc");
        assert_eq!(h.get_all("x-request-id").iter().count(), 1);
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h, true).clone();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4", "{s}");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        assert_ne!(ensure_request_id(&mut HeaderMap::new(), false), id);
        // Every id the client sent is replaced.
        let mut h = map(&[("x-request-id", "a"), ("x-request-id", "b")]);
        assert_eq!(h.get_all("x-request-id").iter().count(), 2);
        let id = ensure_request_id(&mut h, false).clone();
        assert_eq!(h.get_all("x-request-id").iter().collect::<Vec<_>>(), [&id]);
    }

    #[test]
    fn request_ids_cut_from_the_arena_stay_distinct_across_chunks() {
        let ids: Vec<HeaderValue> = (0..300).map(|_| random_request_id()).collect();
        let distinct: std::collections::HashSet<&[u8]> =
            ids.iter().map(HeaderValue::as_bytes).collect();
        assert_eq!(distinct.len(), 300);
        for id in &ids {
            let id = id.to_str().unwrap();
            assert_eq!(id.len(), 36);
            assert_eq!(&id[14..15], "4", "version 4: {id}");
            for dash in [8, 13, 18, 23] {
                assert_eq!(&id[dash..=dash], "-", "{id}");
            }
            assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        }
    }
}
