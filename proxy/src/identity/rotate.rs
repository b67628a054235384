//! Keeps every identity the configuration uses signed by the control
//! plane's identity service: a fresh key made here (it never leaves the
//! proxy), a CSR for the identity, the certificate and trust bundle
//! installed; renewed at about half life; retried with a jittered backoff
//! while the control plane is away, the current certificate serving until
//! it expires.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use weft_proto::identity::v1::SignRequest;
use weft_proto::identity::v1::identity_service_client::IdentityServiceClient;

use super::{Identities, Svid, TrustBundle, renew_at};
use crate::drain::Drain;

/// First retry delay after a failed signing; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Deadline for one signing: connect, handshake and the call.
const SIGN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where certificates come from.
#[derive(Debug, Clone)]
pub struct RotationOptions {
    /// The control plane's `HOST:PORT`.
    pub server: String,
    /// This proxy's node id; the control plane maps it to its identity.
    pub node_id: String,
    /// The bearer token.
    pub token: Option<String>,
    /// The lifetime asked for; `None` takes the control plane's default.
    pub ttl: Option<Duration>,
}

/// Why one signing failed.
#[derive(Debug, thiserror::Error)]
enum SignError {
    #[error("{0:?} is not a HOST:PORT address")]
    BadAddress(String),
    #[error("timed out")]
    Timeout,
    #[error("cannot reach the control plane: {0}")]
    Connect(String),
    #[error("the token is not a valid header value")]
    Token,
    #[error("refused: {code:?}: {message}", code = .0.code(), message = .0.message())]
    Refused(tonic::Status),
    #[error("making the key or CSR: {0}")]
    Key(String),
    #[error("the control plane's answer is not usable: {0}")]
    Answer(String),
}

/// Runs until the drain: starts keeping each identity in
/// [`Identities::wanted`] signed, and stops for those no longer wanted.
pub async fn rotate(options: RotationOptions, identities: Arc<Identities>, drain: Drain) {
    let mut wanted = identities.subscribe();
    let mut tasks: HashMap<Arc<str>, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let now_wanted = wanted.borrow_and_update().clone();
        tasks.retain(|id, task| {
            let keep = now_wanted.contains(id);
            if !keep {
                task.abort();
            }
            keep
        });
        for id in now_wanted {
            tasks.entry(id.clone()).or_insert_with(|| {
                drain.spawn(keep_signed(
                    options.clone(),
                    id,
                    identities.clone(),
                    drain.clone(),
                ))
            });
        }
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() { break },
            () = drain.cancelled() => break,
        }
    }
    for task in tasks.into_values() {
        task.abort();
    }
}

async fn keep_signed(
    options: RotationOptions,
    spiffe_id: Arc<str>,
    identities: Arc<Identities>,
    drain: Drain,
) {
    let mut failures: u32 = 0;
    let mut bundles = identities.subscribe_bundles();
    loop {
        // After a few failures in a row the bootstrap token proves the
        // proxy again (a control plane whose CA changed refuses the
        // current certificate).
        let allow_tls = failures < crate::xds::TLS_FAILURES_BEFORE_TOKEN;
        let result = match tokio::time::timeout(
            SIGN_TIMEOUT,
            sign(&options, &spiffe_id, &identities, allow_tls, &drain),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(SignError::Timeout),
        };
        let wait = match result {
            Ok((svid, bundle)) => {
                failures = 0;
                identities.renewals.fetch_add(1, Relaxed);
                // From now, not from `not_before`: the CA backdates that by a
                // minute for slow clocks, which would make a short-lived
                // certificate due for renewal the moment it arrives.
                let renew = renew_at(SystemTime::now(), svid.not_after, fastrand::f64());
                tracing::info!(
                    identity = %spiffe_id,
                    serial = %svid.serial,
                    expires = %humantime::format_rfc3339_seconds(svid.not_after),
                    renew = %humantime::format_rfc3339_seconds(renew),
                    "workload certificate installed"
                );
                identities.install_bundle(bundle);
                identities.install_svid(svid);
                renew
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            }
            Err(error) => {
                identities.renewal_failures.fetch_add(1, Relaxed);
                let delay = retry_delay(failures);
                failures = failures.saturating_add(1);
                match identities.svid(&spiffe_id) {
                    Some(current) => tracing::warn!(
                        identity = %spiffe_id,
                        %error,
                        retry_in = ?delay,
                        expires = %humantime::format_rfc3339_seconds(current.not_after),
                        "cannot renew the workload certificate; the current one keeps serving"
                    ),
                    None => tracing::error!(
                        identity = %spiffe_id,
                        %error,
                        retry_in = ?delay,
                        "no valid workload certificate: mesh mTLS with this identity cannot serve"
                    ),
                }
                delay
            }
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                () = drain.cancelled() => return,
                changed = bundles.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if identities.signed_by_old_ca(&spiffe_id) {
                        // A CA rotation: a new CA signs now. Renew within
                        // a second, spread so that a whole mesh does not
                        // ask at the same instant.
                        let spread = Duration::from_millis(fastrand::u64(0..1000));
                        tracing::info!(
                            identity = %spiffe_id,
                            "the trust domain has a new signing CA; renewing the workload certificate"
                        );
                        tokio::select! {
                            () = tokio::time::sleep(spread) => break,
                            () = drain.cancelled() => return,
                        }
                    }
                }
            }
        }
    }
}

/// The wait after `failures` failed signings in a row.
fn retry_delay(failures: u32) -> Duration {
    crate::rng::backoff(FIRST_RETRY, MAX_RETRY, failures)
}

/// One signing: a new key, a CSR, the call, the answer checked.
async fn sign(
    options: &RotationOptions,
    spiffe_id: &Arc<str>,
    identities: &Arc<Identities>,
    allow_tls: bool,
    drain: &Drain,
) -> Result<(Svid, TrustBundle), SignError> {
    let (csr_pem, key_der) = make_csr(spiffe_id)?;
    let authority = crate::xds::server_authority(&options.server)
        .ok_or_else(|| SignError::BadAddress(options.server.clone()))?;
    // Renewals are proved by the current certificate (mTLS); the first
    // signing by the bootstrap token.
    let tls = super::control_plane_tls(identities).filter(|_| allow_tls);
    let channel = crate::xds::connect(authority.as_str(), tls, drain)
        .await
        .map_err(|e| SignError::Connect(e.to_string()))?;
    let origin = http::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query("/")
        .build()
        .map_err(|_| SignError::BadAddress(options.server.clone()))?;
    let mut client = IdentityServiceClient::with_origin(channel, origin);
    let mut request = tonic::Request::new(SignRequest {
        node_id: options.node_id.clone(),
        csr_pem,
        ttl: options
            .ttl
            .and_then(|ttl| weft_proto::prost_types::Duration::try_from(ttl).ok()),
    });
    if let Some(token) = &options.token {
        let value = tonic::metadata::MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| SignError::Token)?;
        request.metadata_mut().insert("authorization", value);
    }
    let answer = client
        .sign(request)
        .await
        .map_err(SignError::Refused)?
        .into_inner();
    let (mut svid, bundle) = accept(
        spiffe_id,
        &answer.cert_chain_pem,
        &answer.trust_bundle_pem,
        &key_der,
    )?;
    svid.signer = Some(answer.signer.to_ascii_lowercase()).filter(|s| !s.is_empty());
    Ok((svid, bundle))
}

/// A fresh key (ECDSA P-256) and a CSR whose one SAN is `spiffe_id`.
fn make_csr(spiffe_id: &str) -> Result<(String, Vec<u8>), SignError> {
    let key_error = |e: rcgen::Error| SignError::Key(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(key_error)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(key_error)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        spiffe_id.to_owned().try_into().map_err(key_error)?,
    )];
    let csr = params.serialize_request(&key).map_err(key_error)?;
    Ok((csr.pem().map_err(key_error)?, key.serialize_der()))
}

/// Checks the signed chain (its identity, its key, its validity) and the
/// bundle, and pairs the chain with the key.
fn accept(
    spiffe_id: &Arc<str>,
    chain_pem: &str,
    bundle_pem: &str,
    key_der: &[u8],
) -> Result<(Svid, TrustBundle), SignError> {
    let answer = |message: String| SignError::Answer(message);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| answer(format!("certificate chain: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| answer("no certificate".into()))?;
    match crate::config::tls::spiffe_id(leaf) {
        Ok(Some(id)) if id == *spiffe_id => {}
        other => {
            return Err(answer(format!(
                "the certificate is not for {spiffe_id}: {other:?}"
            )));
        }
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| answer(format!("certificate: {e}")))?;
    let time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let not_before = time(parsed.validity().not_before);
    let not_after = time(parsed.validity().not_after);
    let serial = parsed.raw_serial_as_string();
    if not_after <= SystemTime::now() {
        return Err(answer("the certificate has already expired".into()));
    }
    let key = rustls_pki_types::PrivateKeyDer::try_from(key_der.to_vec())
        .map_err(|e| SignError::Key(e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| SignError::Key(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| answer(format!("the certificate is not for this proxy's key: {e}")))?;
    let domain = crate::config::spiffe_trust_domain(spiffe_id).unwrap_or_default();
    let bundle = TrustBundle::from_pem(domain, bundle_pem).map_err(answer)?;
    Ok((
        Svid {
            key: Arc::new(certified),
            spiffe_id: spiffe_id.clone(),
            serial,
            not_before,
            not_after,
            signer: None,
        },
        bundle,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a function that signs a CSR with it, as the control plane
    /// does.
    fn ca() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (rcgen::Issuer::new(params, key), cert.pem())
    }

    fn signed_for(
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        key: &rcgen::KeyPair,
        id: &str,
    ) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.to_owned().try_into().unwrap())];
        params.signed_by(key, issuer).unwrap().pem()
    }

    #[test]
    fn a_signed_answer_is_checked_before_it_is_installed() {
        let id: Arc<str> = "spiffe://example.org/ns/a/sa/web".into();
        let (csr_pem, key_der) = make_csr(&id).unwrap();
        assert!(csr_pem.contains("CERTIFICATE REQUEST"));
        let key = rcgen::KeyPair::try_from(key_der.as_slice()).unwrap();
        let (issuer, bundle) = ca();
        let chain = signed_for(&issuer, &key, &id);
        let (svid, trust) = accept(&id, &chain, &bundle, &key_der).unwrap();
        assert_eq!(svid.spiffe_id, id);
        assert!(svid.not_after > SystemTime::now());
        assert_eq!(&*trust.trust_domain, "example.org");
        // Another identity, another key, or garbage are refused.
        let other = signed_for(&issuer, &key, "spiffe://example.org/ns/a/sa/admin");
        assert!(accept(&id, &other, &bundle, &key_der).is_err());
        let stranger = rcgen::KeyPair::generate().unwrap();
        let theirs = signed_for(&issuer, &stranger, &id);
        let error = accept(&id, &theirs, &bundle, &key_der).unwrap_err();
        assert!(
            error.to_string().contains("not for this proxy's key"),
            "{error}"
        );
        assert!(accept(&id, "", &bundle, &key_der).is_err());
        assert!(accept(&id, &chain, "", &key_der).is_err());
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        for failures in 0..20 {
            let delay = retry_delay(failures);
            assert!(delay <= MAX_RETRY, "{failures}: {delay:?}");
            assert!(delay >= FIRST_RETRY / 2);
        }
        assert!(retry_delay(10) >= MAX_RETRY / 2);
    }
}
