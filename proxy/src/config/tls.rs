//! Loading certificate chains and private keys from PEM files into the
//! model, with errors that name the field and the file.

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
