//! rustls configurations built from the model: what a TLS listener serves
//! (certificates chosen by SNI, ALPN `h2` and `http/1.1`, TLS 1.2+ with
//! rustls's modern cipher suites and the ring crypto provider).
//!
//! Built once per snapshot, off the request path; a handshake only looks
//! the client's server name up in a prepared table. Mesh mTLS (SPIFFE
//! identities, client certificates, upstream TLS) builds on this.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::config::{
    ClientCert, ClientRoots, ClusterTls, DomainMatch, ListenerTls, ServerIdentity, TlsVersion,
    UpstreamVerifier,
};
use crate::identity::{Identities, MeshClientVerifier, WorkloadCert};

/// The ALPN protocols an HTTP listener offers, most preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// What a TLS listener carries, for ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carries {
    /// HTTP: `h2` and `http/1.1` are offered.
    Http,
    /// An opaque stream (a TCP listener): no protocol is negotiated, and
    /// whatever a client offers is not refused.
    Opaque,
}

/// The server configuration of a TLS listener. A workload identity's
/// certificate and the mesh's trust bundles are read from `identities` at
/// each handshake.
pub(crate) fn server_config(
    tls: &ListenerTls,
    identities: &Arc<Identities>,
    carries: Carries,
) -> Arc<rustls::ServerConfig> {
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("the ring provider supports TLS 1.2 and 1.3");
    let builder = match &tls.clients {
        Some(clients) => builder.with_client_cert_verifier(match &clients.roots {
            ClientRoots::Files(verifier) => verifier.clone(),
            ClientRoots::Mesh => Arc::new(MeshClientVerifier::new(identities.clone())),
        }),
        None => builder.with_no_client_auth(),
    };
    let resolver: Arc<dyn ResolvesServerCert> = match &tls.workload_identity {
        Some(id) => Arc::new(WorkloadCert {
            identities: identities.clone(),
            spiffe_id: id.clone(),
        }),
        None => Arc::new(SniResolver::new(tls)),
    };
    let mut config = builder.with_cert_resolver(resolver);
    if carries == Carries::Http {
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    }
    if tls.clients.is_some() {
        // No resumption with client certificates: a resumed session
        // carries the client certificate of the session it resumes, so a
        // client that renewed its certificate would still be seen with
        // the old one, and closed at that one's expiry. Every connection
        // proves its current certificate.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Arc::new(config)
}

/// The client side of TLS to a cluster's endpoints, prepared once per
/// cluster state: one configuration per ALPN offer, so that a pooled
/// connection speaks the protocol its pool expects.
#[derive(Debug)]
pub(crate) struct UpstreamTls {
    /// ALPN `http/1.1` (and for L4 forwarding, none needed).
    pub(crate) http1: Arc<rustls::ClientConfig>,
    /// ALPN `h2`.
    pub(crate) http2: Arc<rustls::ClientConfig>,
    /// The name verified and sent as SNI; `None` for a SPIFFE identity
    /// (no SNI; the endpoint's address stands in for rustls).
    pub(crate) server_name: Option<ServerName<'static>>,
    /// The certificate this proxy presents, to know when it expires.
    client_cert: Option<PresentedCert>,
}

/// The client certificate a cluster's connections present.
#[derive(Debug)]
enum PresentedCert {
    /// From files: its expiry is fixed.
    File(Option<std::time::SystemTime>),
    /// A workload identity: whatever certificate is current.
    Workload(Arc<Identities>, Arc<str>),
}

impl UpstreamTls {
    /// When the client certificate a connection opened now presents
    /// expires: the server will close the connection then (as this proxy
    /// does), so the pool stops reusing it shortly before.
    pub(crate) fn client_not_after(&self) -> Option<std::time::SystemTime> {
        match self.client_cert.as_ref()? {
            PresentedCert::File(not_after) => *not_after,
            PresentedCert::Workload(identities, id) => {
                identities.svid(id).map(|svid| svid.not_after)
            }
        }
    }
}

impl UpstreamTls {
    pub(crate) fn new(tls: &ClusterTls, identities: &Arc<Identities>) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match &tls.verifier {
            UpstreamVerifier::Files(verifier) => verifier.clone(),
            UpstreamVerifier::Mesh(id) => Arc::new(crate::config::tls::SpiffeServerVerifier::new(
                identities.clone(),
                id.clone(),
            )),
        };
        let config = |alpn: &[u8]| {
            let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .expect("the ring provider supports TLS 1.2 and 1.3")
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone());
            let mut config = match &tls.client_cert {
                Some(ClientCert::File(cert)) => builder.with_client_cert_resolver(Arc::new(
                    rustls::sign::SingleCertAndKey::from(cert.clone()),
                )),
                Some(ClientCert::Workload(id)) => {
                    builder.with_client_cert_resolver(Arc::new(WorkloadCert {
                        identities: identities.clone(),
                        spiffe_id: id.clone(),
                    }))
                }
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = vec![alpn.to_vec()];
            if tls.client_cert.is_some() {
                // As on the server side: every connection presents the
                // current certificate, never a resumed session's.
                config.resumption = rustls::client::Resumption::disabled();
            }
            Arc::new(config)
        };
        Self {
            http1: config(b"http/1.1"),
            http2: config(b"h2"),
            server_name: match &tls.server {
                ServerIdentity::DnsName(name) => Some(name.clone()),
                ServerIdentity::Spiffe(_) => None,
            },
            client_cert: tls.client_cert.as_ref().map(|cert| match cert {
                ClientCert::File(key) => PresentedCert::File(
                    key.end_entity_cert()
                        .ok()
                        .and_then(|leaf| crate::config::tls::not_after(leaf)),
                ),
                ClientCert::Workload(id) => PresentedCert::Workload(identities.clone(), id.clone()),
            }),
        }
    }
}

/// What a TLS listener learned of its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerCheck {
    /// No client certificate (none asked for, or optional and not sent).
    Anonymous,
    /// A verified certificate with this SPIFFE ID (or none in it), which
    /// expires then.
    Verified(Option<Arc<str>>, std::time::SystemTime),
    /// Refused: the certificate's identity is malformed or not allowed.
    Refused(&'static str),
}

/// Checks a verified client certificate's identity against the
/// listener's rules. The chain was verified during the handshake.
pub(crate) fn check_peer(tls: &ListenerTls, leaf: Option<&CertificateDer<'_>>) -> PeerCheck {
    let Some(leaf) = leaf else {
        return PeerCheck::Anonymous;
    };
    let (id, not_after) = match crate::config::tls::leaf_facts(leaf) {
        Ok(facts) => facts,
        Err(crate::config::tls::IdentityError::SeveralUris) => {
            return PeerCheck::Refused("several URI SANs");
        }
        Err(_) => return PeerCheck::Refused("malformed identity"),
    };
    let allowed = tls
        .clients
        .as_ref()
        .map_or(&[][..], |c| &c.allowed_identities[..]);
    if !allowed.is_empty() && !id.as_ref().is_some_and(|id| allowed.contains(id)) {
        return PeerCheck::Refused("identity not allowed");
    }
    PeerCheck::Verified(id, not_after)
}

/// Chooses a certificate by the client's server name: an exact name, then
/// the longest `*.suffix`, then the default.
#[derive(Debug)]
pub(crate) struct SniResolver {
    exact: HashMap<Box<str>, Arc<CertifiedKey>>,
    /// `(".example.com", key)`, longest suffix first.
    suffixes: Vec<(Box<str>, Arc<CertifiedKey>)>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    fn new(tls: &ListenerTls) -> Self {
        let mut exact = HashMap::new();
        let mut suffixes = Vec::new();
        for cert in &tls.certificates {
            for name in &cert.server_names {
                match name {
                    DomainMatch::Exact(host) => {
                        exact
                            .entry(host.clone())
                            .or_insert_with(|| cert.key.clone());
                    }
                    DomainMatch::Suffix(suffix) => {
                        suffixes.push((suffix.clone(), cert.key.clone()))
                    }
                    DomainMatch::Any => {}
                }
            }
        }
        suffixes.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        let default = tls
            .certificates
            .iter()
            .find(|c| c.server_names.is_empty())
            .or_else(|| tls.certificates.first())
            .map(|c| c.key.clone());
        Self {
            exact,
            suffixes,
            default,
        }
    }

    /// The certificate for `server_name` (lower case, as rustls gives it).
    fn choose(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = server_name {
            if let Some(key) = self.exact.get(name) {
                return Some(key.clone());
            }
            // `*.example.com` covers `a.example.com`, not `example.com`.
            if let Some((_, key)) = self
                .suffixes
                .iter()
                .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(&**suffix))
            {
                return Some(key.clone());
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(name) if name.bytes().any(|b| b.is_ascii_uppercase()) => {
                self.choose(Some(&name.to_ascii_lowercase()))
            }
            name => self.choose(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsCertificate;

    fn key(name: &str) -> Arc<CertifiedKey> {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let der = rustls_pki_types::PrivateKeyDer::try_from(signing_key.serialize_der()).unwrap();
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
        Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing))
    }

    fn cert(key: &Arc<CertifiedKey>, names: &[&str]) -> TlsCertificate {
        TlsCertificate {
            key: key.clone(),
            server_names: names
                .iter()
                .map(|n| match n.strip_prefix('*') {
                    Some(suffix) => DomainMatch::Suffix(suffix.into()),
                    None => DomainMatch::Exact((*n).into()),
                })
                .collect(),
            cert_file: "test.pem".into(),
            spiffe_id: None,
        }
    }

    #[test]
    fn sni_picks_exact_then_longest_suffix_then_the_default() {
        let (api, wild, deep, fallback) = (
            key("api.example.com"),
            key("*.example.com"),
            key("*.eu.example.com"),
            key("default"),
        );
        let tls = ListenerTls {
            certificates: vec![
                cert(&api, &["api.example.com"]),
                cert(&wild, &["*.example.com"]),
                cert(&fallback, &[]),
                cert(&deep, &["*.eu.example.com"]),
            ],
            workload_identity: None,
            min_version: TlsVersion::Tls12,
            permissive: false,
            clients: None,
        };
        let resolver = SniResolver::new(&tls);
        let cases = [
            (Some("api.example.com"), &api),
            (Some("www.example.com"), &wild),
            (Some("a.eu.example.com"), &deep),
            (Some("example.com"), &fallback),
            (Some("other.org"), &fallback),
            (None, &fallback),
        ];
        for (name, want) in cases {
            let got = resolver.choose(name).unwrap();
            assert!(Arc::ptr_eq(&got, want), "{name:?}");
        }
        // With no certificate lacking names, the first is the default.
        let tls = ListenerTls {
            certificates: vec![cert(&api, &["api.example.com"])],
            workload_identity: None,
            min_version: TlsVersion::Tls13,
            permissive: false,
            clients: None,
        };
        let got = SniResolver::new(&tls).choose(Some("x.org")).unwrap();
        assert!(Arc::ptr_eq(&got, &api));
        let config = server_config(&tls, &Identities::new(), Carries::Http);
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
