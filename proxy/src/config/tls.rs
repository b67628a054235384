//! Loading certificate chains, private keys and CA bundles from PEM files
//! into the model, with errors that name the field and the file; and the
//! SPIFFE ID a certificate carries (X.509-SVID: exactly one URI SAN).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// Why a certificate and key could not be loaded.
#[derive(Debug)]
pub(super) struct LoadKeyError {
    /// `cert_file` or `key_file`.
    pub(super) field: &'static str,
    pub(super) message: String,
}

/// Reads a PEM chain (leaf first) and its PEM private key, and checks that
/// they belong together.
pub(super) fn load_certified_key(
    cert_file: &str,
    key_file: &str,
) -> Result<CertifiedKey, LoadKeyError> {
    let error = |field, message: String| LoadKeyError { field, message };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| error("cert_file", format!("cannot read {cert_file:?}: {e}")))?;
    if chain.is_empty() {
        return Err(error(
            "cert_file",
            format!("{cert_file:?} holds no PEM certificate"),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        error(
            "key_file",
            format!("cannot read a private key from {key_file:?}: {e}"),
        )
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        error(
            "key_file",
            format!("{key_file:?}: unsupported private key: {e}"),
        )
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        error(
            "key_file",
            format!("{key_file:?} does not match the certificate in {cert_file:?}: {e}"),
        )
    })?;
    Ok(certified)
}

/// Reads a PEM bundle of CA certificates.
pub(super) fn load_roots(path: &str) -> Result<rustls::RootCertStore, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("cannot read {path:?}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if ignored > 0 {
        return Err(format!(
            "{path:?}: {ignored} certificate(s) are not valid CA certificates"
        ));
    }
    if added == 0 {
        return Err(format!("{path:?} holds no PEM certificate"));
    }
    Ok(roots)
}

/// The verifier of client certificates signed by `roots`; `required`
/// refuses clients without one.
pub(super) fn client_verifier(
    roots: rustls::RootCertStore,
    required: bool,
) -> Result<std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider,
    );
    let builder = if required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder.build().map_err(|e| e.to_string())
}

/// The verifier of an upstream's certificate for `server`, against
/// `roots`.
pub(super) fn server_verifier(
    roots: Arc<rustls::RootCertStore>,
    server: &crate::config::ServerIdentity,
) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    match server {
        crate::config::ServerIdentity::Spiffe(id) => {
            Ok(Arc::new(SpiffeServerVerifier::new(roots, id.clone())))
        }
        crate::config::ServerIdentity::DnsName(_) => {
            let verifier =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| e.to_string())?;
            Ok(verifier)
        }
    }
}

/// Where a verifier finds the roots of a trust domain.
pub(crate) trait TrustRoots: std::fmt::Debug + Send + Sync {
    /// The roots that may sign certificates of `trust_domain`.
    fn roots(&self, trust_domain: &str) -> Option<Arc<rustls::RootCertStore>>;
}

/// A cluster's own CAs (`ca_file`): the same roots whatever the domain.
impl TrustRoots for Arc<rustls::RootCertStore> {
    fn roots(&self, _trust_domain: &str) -> Option<Arc<rustls::RootCertStore>> {
        Some(self.clone())
    }
}

/// Verifies an upstream's chain against the roots of the expected
/// identity's trust domain (a cluster's CAs, or the mesh's bundle) and its
/// SPIFFE ID (its one URI SAN) against that identity; DNS names play no
/// part (X.509-SVIDs need not carry any).
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier<R> {
    roots: R,
    expected: Arc<str>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl<R> SpiffeServerVerifier<R> {
    pub(crate) fn new(roots: R, expected: Arc<str>) -> Self {
        Self {
            roots,
            expected,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }
}

impl<R: TrustRoots> ServerCertVerifier for SpiffeServerVerifier<R> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let domain = crate::config::spiffe_trust_domain(&self.expected).unwrap_or_default();
        let roots = self
            .roots
            .roots(domain)
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match spiffe_id(end_entity) {
            Ok(Some(id)) if *id == *self.expected => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
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
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// True for `spiffe://<trust-domain>/<path>`.
pub(crate) fn is_spiffe_id(id: &str) -> bool {
    id.strip_prefix("spiffe://").is_some_and(|rest| {
        rest.split_once('/').is_some_and(|(domain, path)| {
            !domain.is_empty()
                && !path.is_empty()
                && domain
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
                && path
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
        })
    })
}

/// Why a certificate's identity is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum IdentityError {
    /// The certificate could not be parsed.
    #[error("certificate does not parse")]
    Unparsable,
    /// More than one URI SAN: an X.509-SVID has exactly one.
    #[error("certificate has more than one URI SAN")]
    SeveralUris,
    /// The URI SAN is not a SPIFFE ID.
    #[error("certificate's URI SAN is not a SPIFFE ID")]
    NotSpiffe,
}

/// When a certificate expires; `None` if it does not parse.
pub(crate) fn not_after(der: &[u8]) -> Option<std::time::SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(expiry(&cert))
}

fn expiry(cert: &x509_parser::certificate::X509Certificate<'_>) -> std::time::SystemTime {
    let seconds = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds)
}

/// The SPIFFE ID of a certificate: `None` when it has no URI SAN.
pub(crate) fn spiffe_id(der: &[u8]) -> Result<Option<std::sync::Arc<str>>, IdentityError> {
    leaf_facts(der).map(|(id, _)| id)
}

/// A leaf's SPIFFE ID (as [`spiffe_id`]) and expiry, from one parse.
pub(crate) fn leaf_facts(
    der: &[u8],
) -> Result<(Option<std::sync::Arc<str>>, std::time::SystemTime), IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::Unparsable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparsable)?;
    let mut uris = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let Some(uri) = uris.next() else {
        return Ok((None, expiry(&cert)));
    };
    if uris.next().is_some() {
        return Err(IdentityError::SeveralUris);
    }
    if !is_spiffe_id(uri) {
        return Err(IdentityError::NotSpiffe);
    }
    Ok((Some(uri.into()), expiry(&cert)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["a.example".to_owned()]).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn spiffe_ids_are_exactly_one_uri_san() {
        let one = cert_with_uris(&["spiffe://example.org/ns/a/sa/b"]);
        assert_eq!(
            spiffe_id(&one).unwrap().as_deref(),
            Some("spiffe://example.org/ns/a/sa/b")
        );
        assert_eq!(spiffe_id(&cert_with_uris(&[])).unwrap(), None);
        let two = cert_with_uris(&["spiffe://example.org/a", "spiffe://example.org/b"]);
        assert_eq!(spiffe_id(&two), Err(IdentityError::SeveralUris));
        let https = cert_with_uris(&["https://example.org/a"]);
        assert_eq!(spiffe_id(&https), Err(IdentityError::NotSpiffe));
        assert_eq!(
            spiffe_id(b"not a certificate"),
            Err(IdentityError::Unparsable)
        );
    }

    #[test]
    fn spiffe_id_syntax() {
        let cases = [
            ("spiffe://example.org/ns/default/sa/web", true),
            ("spiffe://td-1.local/x", true),
            ("spiffe://example.org", false),
            ("spiffe://example.org/", false),
            ("spiffe:///ns/a", false),
            ("spiffe://Example.org/a", false),
            ("spiffe://example.org/a?b", false),
            ("https://example.org/a", false),
        ];
        for (id, valid) in cases {
            assert_eq!(is_spiffe_id(id), valid, "{id}");
        }
    }
}
