//! Verification keys for the JWT builtins, read as OPA reads them, and the
//! signature checks each JWS algorithm makes with them (ring).
//!
//! A key argument is a PEM block (an X.509 certificate, a SubjectPublicKeyInfo
//! `PUBLIC KEY`, or a PKCS #1 `RSA PUBLIC KEY`) or a JSON Web Key or key set.
//! A key that cannot be read is an error; a key of the wrong type for an
//! algorithm verifies nothing (`Check::Invalid`), as in OPA. What ring cannot
//! check (P-521, ES512, RSA outside 2048..=8192 bits) is `Check::Unsupported`,
//! which the builtins turn into an error rather than a quiet `false`.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_DSA, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::{PublicKey as ParsedKey, RSAPublicKey};
use x509_parser::x509::SubjectPublicKeyInfo;

use super::base64url;

/// id-X25519 (RFC 8410), which Go parses as a key that signs nothing.
const OID_X25519: x509_parser::der_parser::Oid<'static> =
    x509_parser::der_parser::oid!(1.3.101.110);

/// Why a key argument could not be read. No variant quotes key material.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("failed to decode the PEM block")]
    Pem,
    #[error("extra data after a PEM certificate block")]
    ExtraPemData,
    #[error("failed to extract a key from a PEM block of type {label:?}")]
    PemType { label: String },
    #[error("failed to parse a PEM certificate: {source}")]
    Certificate {
        #[source]
        source: x509_parser::error::X509Error,
    },
    #[error("failed to parse a PEM public key: {reason}")]
    PublicKey { reason: &'static str },
    #[error("failed to parse a JWK key (set): {reason}")]
    Jwk { reason: &'static str },
    #[error("failed to parse a JWK key (set): {source}")]
    JwkJson {
        #[source]
        source: serde_json::Error,
    },
}

/// The JWS algorithms OPA knows (`tokenAlgorithms` in `topdown/tokens.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Hs256,
    Hs384,
    Hs512,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    Es512,
    EdDsa,
}

impl Algorithm {
    /// The algorithm a JOSE `alg` names, if OPA knows it.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "HS256" => Self::Hs256,
            "HS384" => Self::Hs384,
            "HS512" => Self::Hs512,
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "ES512" => Self::Es512,
            "EdDSA" => Self::EdDsa,
            _ => return None,
        })
    }

    /// Its JOSE name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Hs384 => "HS384",
            Self::Hs512 => "HS512",
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Ps256 => "PS256",
            Self::Ps384 => "PS384",
            Self::Ps512 => "PS512",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Es512 => "ES512",
            Self::EdDsa => "EdDSA",
        }
    }
}

/// What a signature check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    Valid,
    /// The signature does not verify, or the key is of another type.
    Invalid,
    /// OPA would check this, ring cannot: the builtins report an error.
    Unsupported(&'static str),
}

/// How an ECDSA signature is split into r and s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EcdsaLayout {
    /// `io.jwt.verify_es*`: OPA takes the two halves, whatever their length.
    Halves,
    /// `io.jwt.decode_verify`: exactly twice the curve's field size, as
    /// RFC 7518 section 3.4 and OPA's JWS library require.
    Fixed,
}

/// The curve of an ECDSA key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Curve {
    P256,
    P384,
    P521,
}

impl Curve {
    fn field_len(self) -> usize {
        match self {
            Self::P256 => 32,
            Self::P384 => 48,
            Self::P521 => 66,
        }
    }
}

/// A public key (or a JWK's shared secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PublicKey {
    /// Big-endian modulus and exponent, without leading zeros.
    Rsa {
        modulus: Vec<u8>,
        exponent: Vec<u8>,
    },
    /// An uncompressed SEC 1 point.
    Ec {
        curve: Curve,
        point: Vec<u8>,
    },
    Ed25519(Vec<u8>),
    /// A JWK `oct` key.
    Secret(Vec<u8>),
    /// A key no JWS algorithm takes (DSA, X25519, OKP curves other than
    /// Ed25519): it verifies nothing, as in OPA.
    Other,
}

/// One key of a certificate, PEM key or JWK set, with the JWK's `alg` and
/// `kid` (OPA's `verificationKey`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VerificationKey {
    pub(crate) key: PublicKey,
    /// The JWK's `alg`; `None` for PEM keys and JWKs without one.
    pub(crate) alg: Option<Algorithm>,
    /// The JWK's `kid`; empty when it has none.
    pub(crate) kid: String,
}

impl PublicKey {
    /// Checks `signature` over `message` with this key under `alg`.
    pub(crate) fn check(
        &self,
        alg: Algorithm,
        message: &[u8],
        signature: &[u8],
        layout: EcdsaLayout,
    ) -> Check {
        use Algorithm::{
            EdDsa, Es256, Es384, Es512, Hs256, Hs384, Hs512, Ps256, Ps384, Ps512, Rs256, Rs384,
            Rs512,
        };
        match (alg, self) {
            (Hs256 | Hs384 | Hs512, Self::Secret(secret)) => {
                verify_hmac(alg, secret, message, signature)
            }
            (Rs256 | Rs384 | Rs512 | Ps256 | Ps384 | Ps512, Self::Rsa { modulus, exponent }) => {
                verify_rsa(alg, modulus, exponent, message, signature)
            }
            (Es256 | Es384 | Es512, Self::Ec { curve, point }) => {
                verify_ecdsa(alg, *curve, point, message, signature, layout)
            }
            (EdDsa, Self::Ed25519(key)) => to_check(
                UnparsedPublicKey::new(&signature::ED25519, key).verify(message, signature),
            ),
            _ => Check::Invalid,
        }
    }
}

fn to_check(result: Result<(), ring::error::Unspecified>) -> Check {
    if result.is_ok() {
        Check::Valid
    } else {
        Check::Invalid
    }
}

/// HMAC with `alg`'s hash, compared in constant time.
pub(crate) fn verify_hmac(alg: Algorithm, secret: &[u8], message: &[u8], tag: &[u8]) -> Check {
    let hash = match alg {
        Algorithm::Hs256 => ring::hmac::HMAC_SHA256,
        Algorithm::Hs384 => ring::hmac::HMAC_SHA384,
        Algorithm::Hs512 => ring::hmac::HMAC_SHA512,
        _ => return Check::Invalid,
    };
    to_check(ring::hmac::verify(
        &ring::hmac::Key::new(hash, secret),
        message,
        tag,
    ))
}

fn verify_rsa(
    alg: Algorithm,
    modulus: &[u8],
    exponent: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Check {
    // ring's bounds. Go accepts keys from 1024 bits; a shorter key is
    // reported rather than quietly failing every token.
    let bits = modulus.first().map_or(0, |first| {
        (modulus.len().saturating_sub(1)) * 8 + (8 - first.leading_zeros() as usize)
    });
    if bits < 2048 {
        return Check::Unsupported("an RSA key shorter than 2048 bits");
    }
    if bits > 8192 {
        return Check::Unsupported("an RSA key longer than 8192 bits");
    }
    // PSS: ring takes the salt length equal to the hash length (RFC 7518
    // section 3.5). OPA's io.jwt.verify_ps* also accepts other salt lengths.
    let params = match alg {
        Algorithm::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
        Algorithm::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
        Algorithm::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
        _ => return Check::Invalid,
    };
    let key = RsaPublicKeyComponents {
        n: modulus,
        e: exponent,
    };
    to_check(key.verify(params, message, signature))
}

fn verify_ecdsa(
    alg: Algorithm,
    curve: Curve,
    point: &[u8],
    message: &[u8],
    signature: &[u8],
    layout: EcdsaLayout,
) -> Check {
    // Go hashes with the algorithm's hash whatever the curve, so ES256 with
    // a P-384 key verifies there; ring has those pairs in ASN.1 form only,
    // hence the re-encoding below.
    let verifier = match (curve, alg) {
        (Curve::P521, _) => return Check::Unsupported("an ECDSA P-521 key"),
        (_, Algorithm::Es512) => return Check::Unsupported("ES512"),
        (Curve::P256, Algorithm::Es256) => &signature::ECDSA_P256_SHA256_ASN1,
        (Curve::P256, Algorithm::Es384) => &signature::ECDSA_P256_SHA384_ASN1,
        (Curve::P384, Algorithm::Es256) => &signature::ECDSA_P384_SHA256_ASN1,
        (Curve::P384, Algorithm::Es384) => &signature::ECDSA_P384_SHA384_ASN1,
        _ => return Check::Invalid,
    };
    let field_len = curve.field_len();
    let (r, s) = match layout {
        EcdsaLayout::Fixed if signature.len() != 2 * field_len => return Check::Invalid,
        EcdsaLayout::Fixed | EcdsaLayout::Halves => signature.split_at(signature.len() / 2),
    };
    let Some(der) = ecdsa_der(r, s, field_len) else {
        return Check::Invalid;
    };
    to_check(UnparsedPublicKey::new(verifier, point).verify(message, &der))
}

/// r and s as the DER `SEQUENCE { INTEGER, INTEGER }` ring reads; `None`
/// when either is longer than the field (it cannot be below the order).
fn ecdsa_der(r: &[u8], s: &[u8], field_len: usize) -> Option<Vec<u8>> {
    let (r, s) = (strip_leading_zeros(r), strip_leading_zeros(s));
    if r.len() > field_len || s.len() > field_len {
        return None;
    }
    let mut body = Vec::with_capacity(2 * (field_len + 3));
    for int in [r, s] {
        // A positive INTEGER needs a zero byte before a high bit, and zero
        // is one zero byte.
        let pad = int.first().is_none_or(|b| b & 0x80 != 0);
        body.push(0x02);
        body.push(u8::try_from(int.len() + usize::from(pad)).ok()?);
        if pad {
            body.push(0);
        }
        body.extend_from_slice(int);
    }
    // At most 2 * (2 + 67) bytes: the short length form.
    let mut der = vec![0x30, u8::try_from(body.len()).ok().filter(|n| *n < 0x80)?];
    der.extend_from_slice(&body);
    Some(der)
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.get(zeros..).unwrap_or_default()
}

/// Key arguments parsed on this thread, by their text, at most.
const PARSED_KEYS: usize = 32;

/// [`parse`], remembered per thread: a policy passes the same keys (its
/// data, a JWKS file's text) on every call, and reading a certificate and
/// building its public key costs far more than the signature check.
/// Bounded: past [`PARSED_KEYS`] texts it starts over. Failures are not
/// kept (they are cheap to find again, and rare).
pub(crate) fn parse_cached(text: &str) -> Result<std::rc::Rc<[VerificationKey]>, KeyError> {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::rc::Rc;
    thread_local! {
        static PARSED: RefCell<HashMap<Box<str>, Rc<[VerificationKey]>>> =
            RefCell::new(HashMap::new());
    }
    if let Some(keys) = PARSED.with(|parsed| parsed.borrow().get(text).cloned()) {
        return Ok(keys);
    }
    let keys: Rc<[VerificationKey]> = parse(text)?.into();
    PARSED.with(|parsed| {
        let mut parsed = parsed.borrow_mut();
        if parsed.len() >= PARSED_KEYS {
            parsed.clear();
        }
        parsed.insert(text.into(), keys.clone());
    });
    Ok(keys)
}

/// Reads a key argument: a PEM block if the text has one, else a JWK or
/// JWK set (OPA's `getKeysFromCertOrJWK`).
pub(crate) fn parse(text: &str) -> Result<Vec<VerificationKey>, KeyError> {
    let Some((label, der)) = pem_block(text)? else {
        return parse_jwk_set(text);
    };
    let key = match label {
        "CERTIFICATE" => {
            let (rest, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
                let source = match e {
                    x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
                    x509_parser::nom::Err::Incomplete(_) => {
                        x509_parser::error::X509Error::InvalidCertificate
                    }
                };
                KeyError::Certificate { source }
            })?;
            if !rest.is_empty() {
                return Err(KeyError::Certificate {
                    source: x509_parser::error::X509Error::InvalidCertificate,
                });
            }
            spki_key(cert.public_key(), true)?
        }
        "PUBLIC KEY" => {
            let (rest, spki) =
                SubjectPublicKeyInfo::from_der(&der).map_err(|_| KeyError::PublicKey {
                    reason: "not a SubjectPublicKeyInfo",
                })?;
            if !rest.is_empty() {
                return Err(KeyError::PublicKey {
                    reason: "trailing data",
                });
            }
            spki_key(&spki, false)?
        }
        // PKCS #1, which OPA does not read: accepted for keys exported by
        // `openssl rsa -RSAPublicKey_out`.
        "RSA PUBLIC KEY" => {
            let (rest, key) = RSAPublicKey::from_der(&der).map_err(|_| KeyError::PublicKey {
                reason: "not a PKCS #1 RSAPublicKey",
            })?;
            if !rest.is_empty() {
                return Err(KeyError::PublicKey {
                    reason: "trailing data",
                });
            }
            rsa_key(key.modulus, key.exponent).ok_or(KeyError::PublicKey {
                reason: "an empty RSA modulus or exponent",
            })?
        }
        other => {
            return Err(KeyError::PemType {
                label: other.chars().take(40).collect(),
            });
        }
    };
    Ok(vec![VerificationKey {
        key,
        alg: None,
        kid: String::new(),
    }])
}

/// The first PEM block of `text`: its label and decoded contents, or `None`
/// when there is no `-----BEGIN ` at all. Only whitespace may follow it.
fn pem_block(text: &str) -> Result<Option<(&str, Vec<u8>)>, KeyError> {
    const BEGIN: &str = "-----BEGIN ";
    const STANDARD: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    let Some((_, after)) = text.split_once(BEGIN) else {
        return Ok(None);
    };
    let (label, after) = after.split_once("-----").ok_or(KeyError::Pem)?;
    let (line_end, after) = after.split_once('\n').ok_or(KeyError::Pem)?;
    if !line_end.trim().is_empty() || label.is_empty() {
        return Err(KeyError::Pem);
    }
    let end = format!("-----END {label}-----");
    let (body, trailer) = after.split_once(end.as_str()).ok_or(KeyError::Pem)?;
    if !trailer.trim().is_empty() {
        return Err(KeyError::ExtraPemData);
    }
    let body: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let der = STANDARD.decode(body).map_err(|_| KeyError::Pem)?;
    Ok(Some((label, der)))
}

/// The key of a SubjectPublicKeyInfo. In a certificate a key type Go does
/// not know is kept (it verifies nothing); as a `PUBLIC KEY` it is an error,
/// as `x509.ParsePKIXPublicKey` makes it.
fn spki_key(spki: &SubjectPublicKeyInfo<'_>, in_certificate: bool) -> Result<PublicKey, KeyError> {
    let oid = &spki.algorithm.algorithm;
    if *oid == OID_PKCS1_RSAENCRYPTION {
        let Ok(ParsedKey::RSA(key)) = spki.parsed() else {
            return Err(KeyError::PublicKey {
                reason: "an invalid RSA key",
            });
        };
        return rsa_key(key.modulus, key.exponent).ok_or(KeyError::PublicKey {
            reason: "an empty RSA modulus or exponent",
        });
    }
    let bits: &[u8] = spki.subject_public_key.as_ref();
    if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve_oid = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let curve = match curve_oid {
            Some(c) if c == OID_EC_P256 => Curve::P256,
            Some(c) if c == OID_NIST_EC_P384 => Curve::P384,
            Some(c) if c == OID_NIST_EC_P521 => Curve::P521,
            _ => {
                return Err(KeyError::PublicKey {
                    reason: "an unsupported elliptic curve",
                });
            }
        };
        return ec_key(curve, bits.to_vec()).ok_or(KeyError::PublicKey {
            reason: "an invalid elliptic curve point",
        });
    }
    if *oid == OID_SIG_ED25519 {
        if bits.len() != signature::ED25519_PUBLIC_KEY_LEN {
            return Err(KeyError::PublicKey {
                reason: "an invalid Ed25519 key",
            });
        }
        return Ok(PublicKey::Ed25519(bits.to_vec()));
    }
    if in_certificate || *oid == OID_KEY_TYPE_DSA || *oid == OID_X25519 {
        return Ok(PublicKey::Other);
    }
    Err(KeyError::PublicKey {
        reason: "an unknown public key algorithm",
    })
}

fn rsa_key(modulus: &[u8], exponent: &[u8]) -> Option<PublicKey> {
    let (modulus, exponent) = (strip_leading_zeros(modulus), strip_leading_zeros(exponent));
    if modulus.is_empty() || exponent.is_empty() {
        return None;
    }
    Some(PublicKey::Rsa {
        modulus: modulus.to_vec(),
        exponent: exponent.to_vec(),
    })
}

/// An uncompressed point of the curve's size (what Go's x509 accepts);
/// whether it is on the curve is ring's check, at verification.
fn ec_key(curve: Curve, point: Vec<u8>) -> Option<PublicKey> {
    let uncompressed = point.first() == Some(&0x04) && point.len() == 1 + 2 * curve.field_len();
    uncompressed.then_some(PublicKey::Ec { curve, point })
}

/// A JWK (`{"kty": ...}`) or a JWK set (`{"keys": [...]}`). Keys whose
/// `alg` OPA does not know are skipped, as OPA skips them.
fn parse_jwk_set(text: &str) -> Result<Vec<VerificationKey>, KeyError> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|source| KeyError::JwkJson { source })?;
    let object = json.as_object().ok_or(KeyError::Jwk {
        reason: "not a JSON object",
    })?;
    let jwks = match object.get("keys") {
        Some(keys) => keys
            .as_array()
            .ok_or(KeyError::Jwk {
                reason: "\"keys\" is not an array",
            })?
            .iter()
            .collect(),
        None => vec![&json],
    };
    let mut keys = Vec::with_capacity(jwks.len());
    for jwk in jwks {
        if let Some(key) = parse_jwk(jwk)? {
            keys.push(key);
        }
    }
    Ok(keys)
}

fn parse_jwk(jwk: &serde_json::Value) -> Result<Option<VerificationKey>, KeyError> {
    let jwk = jwk.as_object().ok_or(KeyError::Jwk {
        reason: "a key is not a JSON object",
    })?;
    let text = |name: &str, reason: &'static str| -> Result<Option<&str>, KeyError> {
        match jwk.get(name) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(KeyError::Jwk { reason }),
        }
    };
    let bytes = |name: &str, reason: &'static str| -> Result<Vec<u8>, KeyError> {
        let value = text(name, reason)?.ok_or(KeyError::Jwk { reason })?;
        jwk_base64(value).ok_or(KeyError::Jwk { reason })
    };
    let kid = text("kid", "\"kid\" is not a string")?
        .unwrap_or_default()
        .to_owned();
    let alg = match text("alg", "\"alg\" is not a string")? {
        None | Some("") => None,
        Some(name) => match Algorithm::from_name(name) {
            Some(alg) => Some(alg),
            None => return Ok(None),
        },
    };
    let key = match text("kty", "\"kty\" is not a string")? {
        Some("RSA") => rsa_key(
            &bytes("n", "an invalid RSA \"n\"")?,
            &bytes("e", "an invalid RSA \"e\"")?,
        )
        .ok_or(KeyError::Jwk {
            reason: "an empty RSA modulus or exponent",
        })?,
        Some("EC") => {
            let curve = match text("crv", "\"crv\" is not a string")? {
                Some("P-256") => Curve::P256,
                Some("P-384") => Curve::P384,
                Some("P-521") => Curve::P521,
                _ => {
                    return Err(KeyError::Jwk {
                        reason: "an unsupported EC \"crv\"",
                    });
                }
            };
            let x = bytes("x", "an invalid EC \"x\"")?;
            let y = bytes("y", "an invalid EC \"y\"")?;
            let len = curve.field_len();
            if x.len() > len || y.len() > len {
                return Err(KeyError::Jwk {
                    reason: "an EC coordinate longer than its curve's",
                });
            }
            // Coordinates are left-padded to the field size.
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            for coordinate in [x, y] {
                point.resize(point.len() + len - coordinate.len(), 0);
                point.extend_from_slice(&coordinate);
            }
            ec_key(curve, point).ok_or(KeyError::Jwk {
                reason: "an invalid EC point",
            })?
        }
        Some("OKP") => match text("crv", "\"crv\" is not a string")? {
            Some("Ed25519") => {
                let x = bytes("x", "an invalid OKP \"x\"")?;
                if x.len() != signature::ED25519_PUBLIC_KEY_LEN {
                    return Err(KeyError::Jwk {
                        reason: "an invalid Ed25519 key",
                    });
                }
                PublicKey::Ed25519(x)
            }
            _ => PublicKey::Other,
        },
        Some("oct") => PublicKey::Secret(bytes("k", "an invalid oct \"k\"")?),
        Some(_) => {
            return Err(KeyError::Jwk {
                reason: "an unsupported \"kty\"",
            });
        }
        None => {
            return Err(KeyError::Jwk {
                reason: "a key without \"kty\"",
            });
        }
    };
    Ok(Some(VerificationKey { key, alg, kid }))
}

/// JWK members are base64url; like OPA's JWK library, standard base64 is
/// accepted too.
fn jwk_base64(text: &str) -> Option<Vec<u8>> {
    const STANDARD: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    base64url(text).ok().or_else(|| STANDARD.decode(text).ok())
}
