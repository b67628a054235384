//! Workload identity: the X.509-SVIDs this proxy holds (its key made here,
//! its certificate signed by the control plane) and the trust bundles it
//! verifies peers against, one per trust domain.
//!
//! [`Identities`] is shared by the data plane (rustls asks it for the
//! current certificate at every handshake and for the bundle at every
//! verification, so a rotation or a new bundle takes effect at the next
//! handshake, without touching open connections) and by the rotation task
//! ([`rotate`]), which keeps every identity the configuration uses signed:
//! renewed at about half life with jitter, retried with backoff while the
//! control plane is away, the current certificate kept until then.
//!
//! A peer's chain is verified only against the bundle of the trust domain
//! its SPIFFE ID names: a certificate of domain A is never accepted on the
//! strength of B's roots.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

mod rotate;

pub use rotate::{RotationOptions, rotate};

/// A certificate this proxy holds for one SPIFFE ID.
#[derive(Debug)]
pub struct Svid {
    /// The chain (leaf first) and the signing key, as rustls serves them.
    /// The key is never printed: rustls's keys show only their algorithm.
    pub key: Arc<CertifiedKey>,
    /// The identity (the leaf's one URI SAN).
    pub spiffe_id: Arc<str>,
    /// The leaf's serial number, hex.
    pub serial: String,
    /// Validity of the leaf.
    pub not_before: SystemTime,
    /// Validity of the leaf.
    pub not_after: SystemTime,
    /// SHA-256 (hex) of the CA certificate that signed it, when the
    /// control plane said.
    pub signer: Option<String>,
}

/// The roots of one trust domain.
#[derive(Debug)]
pub struct TrustBundle {
    /// The trust domain (`example.org` of `spiffe://example.org/...`).
    pub trust_domain: Arc<str>,
    roots: Arc<rustls::RootCertStore>,
    /// Verifies client chains against `roots` (a certificate required).
    client: Arc<dyn ClientCertVerifier>,
    /// Subjects of the roots, for `/certs`.
    pub subjects: Vec<String>,
    /// SHA-256 (hex) of the CA certificate that signs this domain's new
    /// certificates, when known.
    pub signer: Option<String>,
}

impl TrustBundle {
    /// Parses a PEM bundle of CA certificates for `trust_domain`.
    pub fn from_pem(trust_domain: &str, pem: &str) -> Result<Self, String> {
        use rustls_pki_types::pem::PemObject;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("trust bundle: {e}"))?;
        let mut subjects = Vec::new();
        for cert in &certs {
            if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) {
                subjects.push(parsed.subject().to_string());
            }
        }
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err("trust bundle: no CA certificate".into());
        }
        let roots = Arc::new(roots);
        let client =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| format!("trust bundle: {e}"))?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            roots,
            client,
            subjects,
            signer: None,
        })
    }

    /// The same roots, naming the CA that signs now.
    pub fn with_signer(self, signer: Option<String>) -> Self {
        Self { signer, ..self }
    }
}

/// The identities this proxy holds and the bundles it trusts.
#[derive(Debug, Default)]
pub struct Identities {
    svids: RwLock<HashMap<Arc<str>, Arc<Svid>>>,
    /// Bundles the configuration gives (pushed by the control plane, or
    /// federation): they win over those received with a certificate.
    configured: RwLock<HashMap<Arc<str>, Arc<TrustBundle>>>,
    /// Bundles received with a certificate, for domains the configuration
    /// gives none.
    bundles: RwLock<HashMap<Arc<str>, Arc<TrustBundle>>>,
    /// Bumped when the configured bundles change; renewal tasks watch it
    /// for a new signer.
    bundles_changed: tokio::sync::watch::Sender<u64>,
    /// Bumped when a certificate is installed; the xDS client watches it to
    /// move its stream to mTLS.
    svids_changed: tokio::sync::watch::Sender<u64>,
    /// The identities the configuration uses; the rotation task watches it.
    wanted: tokio::sync::watch::Sender<BTreeSet<Arc<str>>>,
    /// Certificates signed and installed.
    pub(crate) renewals: std::sync::atomic::AtomicU64,
    /// Signings that failed (and were retried).
    pub(crate) renewal_failures: std::sync::atomic::AtomicU64,
}

impl Identities {
    /// An empty store.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The current certificate for `spiffe_id`, if one is held and has not
    /// expired.
    pub fn svid(&self, spiffe_id: &str) -> Option<Arc<Svid>> {
        let svid = self
            .svids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(spiffe_id)
            .cloned()?;
        (svid.not_after > SystemTime::now()).then_some(svid)
    }

    /// Every certificate held, expired ones included, sorted by identity.
    pub fn all_svids(&self) -> Vec<Arc<Svid>> {
        let mut all: Vec<_> = self
            .svids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        all
    }

    /// Every trust bundle in use, sorted by trust domain.
    pub fn all_bundles(&self) -> Vec<Arc<TrustBundle>> {
        let configured = self
            .configured
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = configured.values().cloned().collect();
        all.extend(
            self.bundles
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .filter(|b| !configured.contains_key(&b.trust_domain))
                .cloned(),
        );
        all.sort_by(|a, b| a.trust_domain.cmp(&b.trust_domain));
        all
    }

    /// The bundle of `trust_domain`: the configuration's, else the one
    /// received with a certificate.
    pub fn bundle(&self, trust_domain: &str) -> Option<Arc<TrustBundle>> {
        let configured = self
            .configured
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(trust_domain)
            .cloned();
        configured.or_else(|| {
            self.bundles
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(trust_domain)
                .cloned()
        })
    }

    /// Replaces the configuration's bundles (a newly applied
    /// configuration's); the next handshake verifies against them.
    pub fn set_configured_bundles(&self, bundles: &[Arc<TrustBundle>]) {
        let next: HashMap<Arc<str>, Arc<TrustBundle>> = bundles
            .iter()
            .map(|b| (b.trust_domain.clone(), b.clone()))
            .collect();
        let mut configured = self
            .configured
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let changed = configured.len() != next.len()
            || next
                .iter()
                .any(|(domain, b)| configured.get(domain).is_none_or(|c| !Arc::ptr_eq(c, b)));
        *configured = next;
        drop(configured);
        if changed {
            self.bundles_changed
                .send_modify(|generation| *generation += 1);
        }
    }

    /// Installs a certificate; the next handshake serves it.
    pub fn install_svid(&self, svid: Svid) {
        let svid = Arc::new(svid);
        self.svids
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(svid.spiffe_id.clone(), svid);
        self.svids_changed
            .send_modify(|generation| *generation += 1);
    }

    /// Wakes when a certificate is installed.
    pub(crate) fn subscribe_svids(&self) -> tokio::sync::watch::Receiver<u64> {
        self.svids_changed.subscribe()
    }

    /// Installs (or replaces) a trust domain's bundle.
    pub fn install_bundle(&self, bundle: TrustBundle) {
        self.bundles
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(bundle.trust_domain.clone(), Arc::new(bundle));
    }

    /// Records the identities a newly applied configuration uses; the
    /// rotation task starts on new ones. Certificates of identities no
    /// longer used are dropped.
    pub fn set_wanted(&self, wanted: BTreeSet<Arc<str>>) {
        self.svids
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| wanted.contains(id));
        self.wanted.send_if_modified(|current| {
            let changed = *current != wanted;
            *current = wanted;
            changed
        });
    }

    /// The identities the configuration uses.
    pub fn wanted(&self) -> BTreeSet<Arc<str>> {
        self.wanted.borrow().clone()
    }

    /// Why mesh mTLS cannot serve now, if it cannot: an identity the
    /// configuration uses has no valid certificate yet (or it expired), or
    /// its trust domain has no bundle.
    pub fn not_ready_reason(&self) -> Option<String> {
        let now = SystemTime::now();
        for id in self.wanted.borrow().iter() {
            let svid = self
                .svids
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(id)
                .cloned();
            match svid {
                None => return Some(format!("no certificate yet for {id}")),
                Some(svid) if svid.not_after <= now => {
                    return Some(format!("the certificate for {id} has expired"));
                }
                Some(_) => {}
            }
            let domain = crate::config::spiffe_trust_domain(id).unwrap_or_default();
            if self.bundle(domain).is_none() {
                return Some(format!("no trust bundle for {domain}"));
            }
        }
        None
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<BTreeSet<Arc<str>>> {
        self.wanted.subscribe()
    }

    fn subscribe_bundles(&self) -> tokio::sync::watch::Receiver<u64> {
        self.bundles_changed.subscribe()
    }

    /// Whether the certificate held for `spiffe_id` came from another CA
    /// than the one its domain's bundle says signs now: a CA rotation is
    /// under way and the certificate should be renewed now.
    fn signed_by_old_ca(&self, spiffe_id: &str) -> bool {
        let Some(svid) = self.svid(spiffe_id) else {
            return false;
        };
        let domain = crate::config::spiffe_trust_domain(spiffe_id).unwrap_or_default();
        match (
            self.bundle(domain).and_then(|b| b.signer.clone()),
            &svid.signer,
        ) {
            (Some(now), Some(held)) => now != *held,
            _ => false,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves (and presents, as a client) the current certificate of one
/// identity. Without one, the handshake fails: mesh mTLS never falls back
/// to no certificate.
#[derive(Debug)]
pub(crate) struct WorkloadCert {
    pub(crate) identities: Arc<Identities>,
    pub(crate) spiffe_id: Arc<str>,
}

impl WorkloadCert {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let svid = self.identities.svid(&self.spiffe_id);
        if svid.is_none() {
            tracing::debug!(identity = %self.spiffe_id, "no valid certificate to present");
        }
        svid.map(|svid| svid.key.clone())
    }
}

impl rustls::server::ResolvesServerCert for WorkloadCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for WorkloadCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The trust domain named by a leaf's SPIFFE ID; the chain is verified
/// against that domain's bundle only.
fn peer_domain(end_entity: &CertificateDer<'_>) -> Result<Arc<str>, rustls::Error> {
    let refused = || {
        rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
    };
    let id = crate::config::tls::spiffe_id(end_entity)
        .map_err(|_| refused())?
        .ok_or_else(refused)?;
    crate::config::spiffe_trust_domain(&id)
        .map(Arc::from)
        .ok_or_else(refused)
}

/// Verifies mesh clients: a certificate is required, its chain must lead
/// to the bundle of the trust domain its SPIFFE ID names.
#[derive(Debug)]
pub(crate) struct MeshClientVerifier {
    pub(crate) identities: Arc<Identities>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl MeshClientVerifier {
    pub(crate) fn new(identities: Arc<Identities>) -> Self {
        Self {
            identities,
            provider: provider(),
        }
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let domain = peer_domain(end_entity)?;
        let bundle = self
            .identities
            .bundle(&domain)
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        bundle
            .client
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The mesh's bundles, per trust domain, as a server verifier reads them
/// at each handshake.
impl crate::config::tls::TrustRoots for Arc<Identities> {
    fn roots(&self, trust_domain: &str) -> Option<Arc<rustls::RootCertStore>> {
        self.bundle(trust_domain).map(|bundle| bundle.roots.clone())
    }
}

/// The control plane's SPIFFE ID in `trust_domain`, which a proxy checks
/// before it trusts the xDS port with its certificate. Its path is not of
/// the `ns/<namespace>/sa/<account>` shape, so no workload can hold it.
pub fn control_plane_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/weft/control-plane")
}

/// How to reach the control plane over mutual TLS: with the current
/// certificate of the first identity this proxy holds a valid one for,
/// verifying the control plane's identity in that domain against the
/// domain's bundle. `None` while no certificate is held (the bootstrap
/// token over cleartext proves the proxy then).
pub(crate) fn control_plane_tls(identities: &Arc<Identities>) -> Option<Arc<rustls::ClientConfig>> {
    let spiffe_id = identities
        .wanted()
        .into_iter()
        .find(|id| identities.svid(id).is_some())?;
    let domain = crate::config::spiffe_trust_domain(&spiffe_id)?;
    identities.bundle(domain)?;
    let verifier = crate::config::tls::SpiffeServerVerifier::new(
        identities.clone(),
        Arc::from(control_plane_id(domain)),
    );
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(WorkloadCert {
            identities: identities.clone(),
            spiffe_id,
        }));
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Every connection proves the current certificate.
    config.resumption = rustls::client::Resumption::disabled();
    Some(Arc::new(config))
}

/// When to renew a certificate received at `start` and valid until
/// `not_after`: at half its remaining life, moved by up to a tenth of it
/// either way (`jitter` in [0, 1)), so that proxies issued together do not
/// renew together.
pub(crate) fn renew_at(start: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let life = not_after.duration_since(start).unwrap_or(Duration::ZERO);
    let spread = life.mul_f64(0.2 * jitter.clamp(0.0, 1.0));
    start + life.mul_f64(0.4) + spread
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_lands_between_forty_and_sixty_percent_of_the_life() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(1000);
        assert_eq!(renew_at(start, end, 0.0), start + Duration::from_secs(400));
        assert_eq!(renew_at(start, end, 0.5), start + Duration::from_secs(500));
        let late = renew_at(start, end, 0.999_999);
        assert!(late < start + Duration::from_secs(600) && late > start + Duration::from_secs(599));
        // A certificate whose clock runs backwards renews at once.
        assert_eq!(renew_at(end, start, 0.5), end);
    }

    #[test]
    fn readiness_needs_a_valid_certificate_and_a_bundle_for_each_wanted_identity() {
        let identities = Identities::new();
        assert_eq!(identities.not_ready_reason(), None);
        let id: Arc<str> = "spiffe://example.org/ns/a/sa/web".into();
        identities.set_wanted(BTreeSet::from([id.clone()]));
        assert_eq!(
            identities.not_ready_reason().as_deref(),
            Some("no certificate yet for spiffe://example.org/ns/a/sa/web")
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
        let svid = |not_after: SystemTime| Svid {
            key: Arc::new(CertifiedKey::new(vec![ca.der().clone()], signing.clone())),
            spiffe_id: id.clone(),
            serial: "01".into(),
            not_before: SystemTime::now(),
            not_after,
            signer: None,
        };
        identities.install_svid(svid(SystemTime::now() - Duration::from_secs(1)));
        assert!(
            identities.svid(&id).is_none(),
            "an expired certificate is never served"
        );
        assert_eq!(
            identities.not_ready_reason().as_deref(),
            Some("the certificate for spiffe://example.org/ns/a/sa/web has expired")
        );
        identities.install_svid(svid(SystemTime::now() + Duration::from_secs(600)));
        assert_eq!(
            identities.not_ready_reason().as_deref(),
            Some("no trust bundle for example.org")
        );
        identities.install_bundle(TrustBundle::from_pem("example.org", &ca.pem()).unwrap());
        assert_eq!(identities.not_ready_reason(), None);
        // An identity the configuration stops using is forgotten.
        identities.set_wanted(BTreeSet::new());
        assert!(identities.all_svids().is_empty());
    }
}
