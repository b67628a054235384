//! Mutual TLS on the xDS port. A proxy that holds a workload certificate
//! connects with it; the port tells TLS from cleartext by the first byte
//! (a TLS record starts with 0x16, an HTTP/2 preface with `P`), so
//! proxies still bootstrapping with a token share it.
//!
//! The control plane serves a certificate of its own, for
//! [`control_plane_id`], signed by the mesh's CA and re-issued at half life
//! or when the CA changes. A client certificate is required and verified
//! against the current trust bundle; its SPIFFE ID (exactly one URI SAN)
//! then proves the caller: such a caller may act only as a node the mesh
//! gives that identity. No session is resumed: every connection proves a
//! current certificate, and none outlives it (the connection is closed at
//! its expiry).

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::authority::{Authority, Trust};
use crate::ca::CaError;

/// The longest the control plane's own certificate lives.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

pub use weft_proxy::identity::control_plane_id;

/// The verified identity of a client certificate.
#[derive(Debug, Clone)]
pub(crate) struct PeerIdentity {
    pub(crate) spiffe_id: Arc<str>,
    pub(crate) not_after: SystemTime,
}

/// The server side of the xDS port's TLS, kept current.
#[derive(Debug)]
pub struct XdsTls {
    authority: Arc<Authority>,
    state: RwLock<Serving>,
    /// Serialises re-issuing.
    refresh: Mutex<()>,
}

#[derive(Debug)]
struct Serving {
    config: Arc<rustls::ServerConfig>,
    /// The trust it was built from.
    trust: Arc<Trust>,
    renew_at: SystemTime,
}

impl XdsTls {
    /// Issues the serving certificate from `authority`'s CA.
    pub fn new(authority: Arc<Authority>) -> Result<Self, CaError> {
        let trust = authority.current();
        let serving = build(&authority, trust)?;
        Ok(Self {
            authority,
            state: RwLock::new(serving),
            refresh: Mutex::new(()),
        })
    }

    /// The configuration for the next connection.
    pub(crate) fn config(&self) -> Arc<rustls::ServerConfig> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .config
            .clone()
    }

    /// Re-issues the serving certificate and reloads the bundle when the
    /// CA or bundle changed or the certificate is past half life.
    /// Blocking (signs).
    pub fn refresh_if_due(&self) -> Result<(), CaError> {
        let _guard = self.refresh.lock().unwrap_or_else(PoisonError::into_inner);
        let trust = self.authority.current();
        let due = {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            !Arc::ptr_eq(&state.trust, &trust) || SystemTime::now() >= state.renew_at
        };
        if due {
            let serving = build(&self.authority, trust)?;
            *self.state.write().unwrap_or_else(PoisonError::into_inner) = serving;
        }
        Ok(())
    }
}

fn build(authority: &Authority, trust: Arc<Trust>) -> Result<Serving, CaError> {
    let what = std::path::PathBuf::from("the xDS port's certificate");
    let invalid = |message: String| CaError::Invalid {
        path: what.clone(),
        message,
    };
    let id = control_plane_id(authority.trust_domain());
    let issued = trust.ca.issue(&id, &[], SERVING_TTL)?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .map_err(|e| invalid(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    let bundle: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(trust.bundle_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(e.to_string()))?;
    roots.add_parsable_certificates(bundle);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| invalid(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| invalid(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Every connection proves a current client certificate.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    let now = SystemTime::now();
    let life = issued.not_after.duration_since(now).unwrap_or_default();
    Ok(Serving {
        config: Arc::new(config),
        trust,
        renew_at: now + life / 2,
    })
}

/// The SPIFFE ID and expiry of a verified client certificate: exactly one
/// URI SAN, a SPIFFE ID; `None` otherwise (the proxy's own rule).
pub(crate) fn peer_identity(certificate: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let (spiffe_id, not_after) = weft_proxy::config::svid_identity(certificate)?;
    Some(PeerIdentity {
        spiffe_id,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::CaSource;

    #[test]
    fn the_serving_certificate_follows_the_ca_and_names_the_control_plane() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Arc::new(
            Authority::load(CaSource::StateDir(dir.path().into()), None, "example.org").unwrap(),
        );
        let tls = XdsTls::new(authority.clone()).unwrap();
        let first = tls.config();
        tls.refresh_if_due().unwrap();
        assert!(Arc::ptr_eq(&first, &tls.config()), "nothing was due");
        assert_eq!(first.alpn_protocols, [b"h2".to_vec()]);

        let issued = authority
            .current()
            .ca
            .issue(
                "spiffe://example.org/ns/a/sa/web",
                &[],
                Duration::from_secs(60),
            )
            .unwrap();
        let leaf = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let peer = peer_identity(&leaf).unwrap();
        assert_eq!(&*peer.spiffe_id, "spiffe://example.org/ns/a/sa/web");
        assert!(peer.not_after > SystemTime::now());
        assert_eq!(
            control_plane_id("example.org"),
            "spiffe://example.org/weft/control-plane"
        );
    }
}
