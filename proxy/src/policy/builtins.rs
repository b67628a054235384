//! OPA's JSON Web Token builtins (`io.jwt.*`) as regorus extensions, so that
//! policies written for OPA-Envoy that check bearer tokens run unchanged.
//! regorus has no `io.jwt` builtins and no crypto; these check signatures
//! with ring and read certificates and public keys with x509-parser.
//!
//! [`register`] adds them to an engine before its policies; engines cloned
//! from it (one per worker thread) share them. Semantics, result shapes and
//! error cases are OPA's (`topdown/tokens.go`): a malformed token, key or
//! constraints object is an error; a signature that does not verify is
//! `false`, or `[false, {}, {}]` from `io.jwt.decode_verify`. Where ring
//! cannot check what OPA checks (ES512, P-521 keys, RSA keys outside
//! 2048..=8192 bits) the call is an error rather than a quiet `false`.
//!
//! Tokens come from requests and are untrusted: nothing here unwraps, indexes
//! at positions they set or recurses on them, and no error quotes a token or
//! a key.

mod keys;

use std::borrow::Cow;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use regorus::Value;

use keys::{Algorithm, Check, EcdsaLayout, KeyError, VerificationKey};

/// Adds `io.jwt.decode`, `io.jwt.decode_verify`, `io.jwt.verify_hs256/384/512`,
/// `io.jwt.verify_rs256/384/512`, `io.jwt.verify_ps256/384/512`,
/// `io.jwt.verify_es256/384` and `io.jwt.verify_eddsa` to `engine`.
///
/// regorus's extensions return `anyhow::Result`, so this is where each
/// [`JwtError`] becomes an `anyhow::Error`.
///
/// `strict`: whether a builtin's error fails the evaluation. Policies run
/// with `false`, as OPA evaluates by default: the failing call is
/// undefined, so `io.jwt.decode_verify` of a malformed token leaves the
/// rules that need it undefined (a deny, whatever the policy's failure
/// mode) instead of failing the evaluation. `true` shows the errors (tests,
/// OPA's `--strict-builtin-errors`).
pub(crate) fn register(engine: &mut regorus::Engine, strict: bool) -> Result<(), String> {
    let mut add = |path: &str, nargs: u8, extension: Box<dyn regorus::Extension>| {
        let extension: Box<dyn regorus::Extension> = if strict {
            extension
        } else {
            let mut inner = extension;
            let name = path.to_owned();
            Box::new(move |args: Vec<Value>| -> anyhow::Result<Value> {
                match inner(args) {
                    Ok(value) => Ok(value),
                    Err(error) => {
                        tracing::debug!(builtin = %name, %error, "builtin error; the call is undefined");
                        Ok(Value::Undefined)
                    }
                }
            })
        };
        engine
            .add_extension(path.to_owned(), nargs, extension)
            .map_err(|e| format!("builtin {path}: {e}"))
    };
    add(
        "io.jwt.decode",
        1,
        Box::new(|args: Vec<Value>| -> anyhow::Result<Value> { Ok(decode(&args)?) }),
    )?;
    add(
        "io.jwt.decode_verify",
        2,
        Box::new(|args: Vec<Value>| -> anyhow::Result<Value> { Ok(decode_verify(&args)?) }),
    )?;
    for (path, alg) in [
        ("io.jwt.verify_hs256", Algorithm::Hs256),
        ("io.jwt.verify_hs384", Algorithm::Hs384),
        ("io.jwt.verify_hs512", Algorithm::Hs512),
    ] {
        add(
            path,
            2,
            Box::new(move |args: Vec<Value>| -> anyhow::Result<Value> {
                Ok(verify_with_secret(alg, &args)?)
            }),
        )?;
    }
    for (path, alg) in [
        ("io.jwt.verify_rs256", Algorithm::Rs256),
        ("io.jwt.verify_rs384", Algorithm::Rs384),
        ("io.jwt.verify_rs512", Algorithm::Rs512),
        ("io.jwt.verify_ps256", Algorithm::Ps256),
        ("io.jwt.verify_ps384", Algorithm::Ps384),
        ("io.jwt.verify_ps512", Algorithm::Ps512),
        ("io.jwt.verify_es256", Algorithm::Es256),
        ("io.jwt.verify_es384", Algorithm::Es384),
        ("io.jwt.verify_eddsa", Algorithm::EdDsa),
    ] {
        add(
            path,
            2,
            Box::new(move |args: Vec<Value>| -> anyhow::Result<Value> {
                Ok(verify_with_key(alg, &args)?)
            }),
        )?;
    }
    Ok(())
}

/// Why a JWT builtin failed; regorus reports it with the call's location
/// (its `Display` only, so each message carries its cause).
#[derive(Debug, thiserror::Error)]
enum JwtError {
    #[error("operand {position} must be a string")]
    NotAString { position: u8 },
    #[error("operand 2 must be an object")]
    ConstraintsNotAnObject,
    #[error("encoded JWT had no period separators")]
    NoPeriodSeparators,
    #[error("encoded JWT must have 3 sections, found {found}")]
    WrongSectionCount { found: usize },
    #[error("JWT {part} had invalid encoding: {source}")]
    InvalidEncoding {
        part: Part,
        #[source]
        source: base64::DecodeError,
    },
    #[error("JWT {part}: invalid JSON: {source}")]
    InvalidJson {
        part: Part,
        #[source]
        source: serde_json::Error,
    },
    #[error("JWT {part}: decoded JSON type was not an Object")]
    NotAnObject { part: Part },
    #[error("JWT is a JWE object, which is not supported")]
    Jwe,
    #[error("JWT header {field}: {problem}")]
    BadHeaderField {
        field: &'static str,
        problem: &'static str,
    },
    #[error("unknown token validation constraint: {name}")]
    UnknownConstraint { name: String },
    #[error("{name} constraint: must be a {expected}")]
    BadConstraint {
        name: &'static str,
        expected: &'static str,
    },
    #[error("token time constraint: must not be negative")]
    NegativeTime,
    #[error("duplicate key constraints")]
    DuplicateKeyConstraints,
    #[error("no key constraint")]
    NoKeyConstraint,
    #[error("{claim} value must be a number")]
    ClaimNotANumber { claim: &'static str },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("verifying with {0} is not supported")]
    Unsupported(&'static str),
}

/// A section of a compact JWS.
#[derive(Debug, Clone, Copy)]
enum Part {
    Header,
    Payload,
    Signature,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Header => "header",
            Self::Payload => "payload",
            Self::Signature => "signature",
        })
    }
}

/// `io.jwt.decode(jwt)`: `[header, payload, signature as hex]`, without
/// verifying anything. A nested token (`cty: JWT`) is decoded instead of its
/// envelope, its surrounding quotes trimmed as OPA does.
fn decode(args: &[Value]) -> Result<Value, JwtError> {
    let mut jwt = Cow::Borrowed(string_arg(args, 1)?);
    loop {
        let token = split(&jwt)?;
        let header = decode_header(&token)?;
        let payload = decode_part(Part::Payload, token.payload)?;
        if let Some(cty) = field(&header, "cty") {
            let Value::String(cty) = cty else {
                return Err(JwtError::BadHeaderField {
                    field: "cty",
                    problem: "must be a string",
                });
            };
            if cty.as_ref() == "JWT" {
                // Each round reads a strictly shorter string: the payload
                // decoded from base64 is shorter than its text.
                let inner = String::from_utf8_lossy(&payload);
                jwt = Cow::Owned(inner.trim_matches(['"', '\'']).to_owned());
                continue;
            }
        }
        let payload = json_object(Part::Payload, &payload)?;
        let signature = decode_part(Part::Signature, token.signature)?;
        return Ok(Value::from(vec![
            header,
            payload,
            Value::from(hex(&signature)),
        ]));
    }
}

/// `io.jwt.verify_hs256/384/512(jwt, secret)`: the HMAC, compared in constant
/// time. As in OPA the header is not read at all.
fn verify_with_secret(alg: Algorithm, args: &[Value]) -> Result<Value, JwtError> {
    let jwt = string_arg(args, 1)?;
    let secret = string_arg(args, 2)?;
    let token = split(jwt)?;
    let signature = decode_part(Part::Signature, token.signature)?;
    let check = keys::verify_hmac(
        alg,
        secret.as_bytes(),
        token.signing_input.as_bytes(),
        &signature,
    );
    Ok(Value::Bool(check == Check::Valid))
}

/// `io.jwt.verify_{rs,ps,es}*` and `io.jwt.verify_eddsa(jwt, certificate)`:
/// checks the signature with the builtin's algorithm, whatever the header's
/// `alg` says (OPA's behaviour); a JWK set's keys are chosen by `kid`/`alg`.
fn verify_with_key(alg: Algorithm, args: &[Value]) -> Result<Value, JwtError> {
    let token = split(string_arg(args, 1)?)?;
    let keys = keys::parse_cached(string_arg(args, 2)?)?;
    let signature = decode_part(Part::Signature, token.signature)?;
    let header = decode_header(&token)?;
    let fields = HeaderFields::parse(&header)?;
    let verified = check_keys(
        &keys,
        &fields,
        alg,
        token.signing_input.as_bytes(),
        &signature,
        EcdsaLayout::Halves,
    )?;
    Ok(Value::Bool(verified))
}

/// OPA's choice of keys: the key whose `kid` is the token's, alone, if there
/// is one; otherwise each key whose `alg`, if it has one, is the token's.
fn check_keys(
    keys: &[VerificationKey],
    fields: &HeaderFields<'_>,
    alg: Algorithm,
    message: &[u8],
    signature: &[u8],
    layout: EcdsaLayout,
) -> Result<bool, JwtError> {
    let check = |key: &VerificationKey| key.key.check(alg, message, signature, layout);
    if !fields.kid.is_empty()
        && let Some(key) = keys.iter().find(|key| key.kid == fields.kid)
    {
        return match check(key) {
            Check::Valid => Ok(true),
            Check::Invalid => Ok(false),
            Check::Unsupported(what) => Err(JwtError::Unsupported(what)),
        };
    }
    let mut unsupported = None;
    for key in keys
        .iter()
        .filter(|key| key.alg.is_none_or(|a| a.name() == fields.alg))
    {
        match check(key) {
            Check::Valid => return Ok(true),
            Check::Invalid => {}
            Check::Unsupported(what) => unsupported = Some(what),
        }
    }
    // A key OPA might have verified with: not knowing is not `false`.
    unsupported.map_or(Ok(false), |what| Err(JwtError::Unsupported(what)))
}

/// `io.jwt.decode_verify(jwt, constraints)`: `[true, header, payload]` when
/// the signature verifies and the claims meet the constraints, else
/// `[false, {}, {}]`.
fn decode_verify(args: &[Value]) -> Result<Value, JwtError> {
    let constraints = Constraints::parse(args.get(1))?;
    let mut jwt = Cow::Borrowed(string_arg(args, 1)?);
    // RFC 7519 section 7.2, once per level of nesting.
    let (header, payload) = loop {
        let token = split(&jwt)?;
        let header = decode_header(&token)?;
        let fields = HeaderFields::parse(&header)?;
        if !fields.is_valid() {
            return Ok(unverified());
        }
        if !constraints.alg.is_empty() && constraints.alg != fields.alg {
            return Ok(unverified());
        }
        let signature = decode_part(Part::Signature, token.signature)?;
        if !constraints.verify(&fields, token.signing_input.as_bytes(), &signature)? {
            return Ok(unverified());
        }
        let payload = decode_part(Part::Payload, token.payload)?;
        if fields.cty.eq_ignore_ascii_case("JWT") {
            // Shorter each round, as in `decode`.
            jwt = Cow::Owned(String::from_utf8_lossy(&payload).into_owned());
            continue;
        }
        break (header, payload);
    };
    let payload = json_object(Part::Payload, &payload)?;
    // Registered claims (RFC 7519 section 4.1), in OPA's order.
    if !constraints.iss.is_empty()
        && !matches!(field(&payload, "iss"), Some(Value::String(iss)) if iss.as_ref() == constraints.iss)
    {
        return Ok(unverified());
    }
    // Without an `aud` constraint a token must not name an audience.
    let audience_ok = match field(&payload, "aud") {
        Some(aud) => audience_matches(aud, &constraints.aud),
        None => constraints.aud.is_empty(),
    };
    if !audience_ok {
        return Ok(unverified());
    }
    let now = Value::from(constraints.time_ns / 1e9);
    if let Some(exp) = field(&payload, "exp") {
        if !matches!(exp, Value::Number(_)) {
            return Err(JwtError::ClaimNotANumber { claim: "exp" });
        }
        if now >= *exp {
            return Ok(unverified());
        }
    }
    if let Some(nbf) = field(&payload, "nbf") {
        if !matches!(nbf, Value::Number(_)) {
            return Err(JwtError::ClaimNotANumber { claim: "nbf" });
        }
        if now < *nbf {
            return Ok(unverified());
        }
    }
    Ok(Value::from(vec![Value::Bool(true), header, payload]))
}

fn unverified() -> Value {
    Value::from(vec![
        Value::Bool(false),
        Value::new_object(),
        Value::new_object(),
    ])
}

fn audience_matches(aud: &Value, expected: &str) -> bool {
    match aud {
        Value::String(aud) => aud.as_ref() == expected,
        Value::Array(list) => list
            .iter()
            .any(|aud| matches!(aud, Value::String(aud) if aud.as_ref() == expected)),
        _ => false,
    }
}

/// `io.jwt.decode_verify`'s constraints object. An empty string is an
/// absent constraint, as in OPA.
#[derive(Debug)]
struct Constraints {
    /// `cert`: the keys of a certificate, PEM key or JWK set.
    keys: Option<std::rc::Rc<[VerificationKey]>>,
    secret: String,
    alg: String,
    iss: String,
    aud: String,
    /// `time` in nanoseconds since the epoch, else the clock's.
    time_ns: f64,
}

impl Constraints {
    fn parse(value: Option<&Value>) -> Result<Self, JwtError> {
        let Some(Value::Object(object)) = value else {
            return Err(JwtError::ConstraintsNotAnObject);
        };
        let mut constraints = Self {
            keys: None,
            secret: String::new(),
            alg: String::new(),
            iss: String::new(),
            aud: String::new(),
            time_ns: 0.0,
        };
        let mut time_ns = None;
        for (name, value) in object.iter() {
            let string = |name: &'static str| match value {
                Value::String(s) => Ok(s.as_ref()),
                _ => Err(JwtError::BadConstraint {
                    name,
                    expected: "string",
                }),
            };
            let Value::String(name) = name else {
                return Err(JwtError::UnknownConstraint {
                    name: name.to_string().chars().take(64).collect(),
                });
            };
            match name.as_ref() {
                "cert" => constraints.keys = Some(keys::parse_cached(string("cert")?)?),
                "secret" => string("secret")?.clone_into(&mut constraints.secret),
                "alg" => string("alg")?.clone_into(&mut constraints.alg),
                "iss" => string("iss")?.clone_into(&mut constraints.iss),
                "aud" => string("aud")?.clone_into(&mut constraints.aud),
                "time" => time_ns = Some(time_constraint(value)?),
                other => {
                    return Err(JwtError::UnknownConstraint {
                        name: other.chars().take(64).collect(),
                    });
                }
            }
        }
        constraints.time_ns = time_ns.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |since| since.as_nanos() as f64)
        });
        match (constraints.keys.is_some(), !constraints.secret.is_empty()) {
            (true, true) => Err(JwtError::DuplicateKeyConstraints),
            (false, false) => Err(JwtError::NoKeyConstraint),
            _ => Ok(constraints),
        }
    }

    /// Checks the signature with the header's algorithm: against the `cert`
    /// keys, or the `secret` for the HMAC algorithms. An algorithm OPA does
    /// not know (`none` included) verifies nothing.
    fn verify(
        &self,
        fields: &HeaderFields<'_>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<bool, JwtError> {
        let Some(alg) = Algorithm::from_name(fields.alg) else {
            return Ok(false);
        };
        match &self.keys {
            Some(keys) => check_keys(keys, fields, alg, message, signature, EcdsaLayout::Fixed),
            None => Ok(
                keys::verify_hmac(alg, self.secret.as_bytes(), message, signature) == Check::Valid,
            ),
        }
    }
}

/// A number of nanoseconds, as a float (OPA compares claims in floats).
fn time_constraint(value: &Value) -> Result<f64, JwtError> {
    let not_a_number = JwtError::BadConstraint {
        name: "time",
        expected: "number",
    };
    if !matches!(value, Value::Number(_)) {
        return Err(not_a_number);
    }
    // Through the decimal text: `as_f64` refuses integers past 2^53, which
    // every time after 1970-04-15 is in nanoseconds.
    let time = value
        .to_string()
        .parse::<f64>()
        .ok()
        .filter(|t| t.is_finite())
        .ok_or(not_a_number)?;
    if time < 0.0 {
        return Err(JwtError::NegativeTime);
    }
    Ok(time)
}

/// The header members OPA reads (`parseTokenHeader`); absent is empty.
#[derive(Debug, Default)]
struct HeaderFields<'a> {
    alg: &'a str,
    kid: &'a str,
    cty: &'a str,
    crit: Vec<&'a str>,
    /// Members other than `alg`, `kid`, `typ`, `cty` and `crit`.
    unknown: Vec<&'a str>,
}

impl<'a> HeaderFields<'a> {
    fn parse(header: &'a Value) -> Result<Self, JwtError> {
        let mut fields = Self::default();
        let Value::Object(object) = header else {
            return Ok(fields);
        };
        for (name, value) in object.iter() {
            let Value::String(name) = name else { continue };
            let string = |field: &'static str| match value {
                Value::String(s) => Ok(s.as_ref()),
                _ => Err(JwtError::BadHeaderField {
                    field,
                    problem: "must be a string",
                }),
            };
            match name.as_ref() {
                "alg" => fields.alg = string("alg")?,
                "kid" => fields.kid = string("kid")?,
                "typ" => {
                    string("typ")?;
                }
                "cty" => fields.cty = string("cty")?,
                "crit" => {
                    let Value::Array(list) = value else {
                        return Err(JwtError::BadHeaderField {
                            field: "crit",
                            problem: "must be a list",
                        });
                    };
                    // OPA stops reading at the first member that is not a
                    // string.
                    fields.crit = list
                        .iter()
                        .map_while(|member| match member {
                            Value::String(s) => Some(s.as_ref()),
                            _ => None,
                        })
                        .collect();
                    if fields.crit.is_empty() {
                        return Err(JwtError::BadHeaderField {
                            field: "crit",
                            problem: "must be a nonempty list",
                        });
                    }
                }
                other => fields.unknown.push(other),
            }
        }
        Ok(fields)
    }

    /// RFC 7515: `alg` is required (4.1.1), and a critical member this code
    /// does not understand invalidates the token (4.1.11).
    fn is_valid(&self) -> bool {
        !self.alg.is_empty() && !self.unknown.iter().any(|name| self.crit.contains(name))
    }
}

/// A compact JWS cut at its two dots (OPA's `decodeJWT`).
#[derive(Debug)]
struct Token<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
    /// `header.payload`, what the signature covers.
    signing_input: &'a str,
}

fn split(jwt: &str) -> Result<Token<'_>, JwtError> {
    if !jwt.contains('.') {
        return Err(JwtError::NoPeriodSeparators);
    }
    let found = jwt.split('.').count();
    let parts = jwt.rsplit_once('.').and_then(|(signing_input, signature)| {
        let (header, payload) = signing_input.split_once('.')?;
        Some(Token {
            header,
            payload,
            signature,
            signing_input,
        })
    });
    match parts {
        Some(token) if found == 3 => Ok(token),
        _ => Err(JwtError::WrongSectionCount { found }),
    }
}

/// base64url as OPA reads it: padded if the text ends with `=`, unpadded
/// otherwise (RFC 7515 appendix C), non-zero trailing bits accepted as Go's
/// decoder accepts them.
fn base64url(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    const PADDED: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
    );
    const UNPADDED: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::RequireNone),
    );
    if text.ends_with('=') {
        PADDED.decode(text)
    } else {
        UNPADDED.decode(text)
    }
}

fn decode_part(part: Part, text: &str) -> Result<Vec<u8>, JwtError> {
    base64url(text).map_err(|source| JwtError::InvalidEncoding { part, source })
}

/// A JSON object. Invalid UTF-8 becomes U+FFFD and a repeated member keeps
/// its last value, as Go's decoder does.
fn json_object(part: Part, bytes: &[u8]) -> Result<Value, JwtError> {
    let text = String::from_utf8_lossy(bytes);
    let value: Value =
        serde_json::from_str(&text).map_err(|source| JwtError::InvalidJson { part, source })?;
    match value {
        Value::Object(_) => Ok(value),
        _ => Err(JwtError::NotAnObject { part }),
    }
}

/// The decoded JOSE header, which must not be a JWE's.
fn decode_header(token: &Token<'_>) -> Result<Value, JwtError> {
    let header = json_object(Part::Header, &decode_part(Part::Header, token.header)?)?;
    if field(&header, "enc").is_some() {
        return Err(JwtError::Jwe);
    }
    Ok(header)
}

fn field<'v>(object: &'v Value, name: &str) -> Option<&'v Value> {
    match object {
        Value::Object(object) => object.get(&Value::from(name)),
        _ => None,
    }
}

fn string_arg(args: &[Value], position: u8) -> Result<&str, JwtError> {
    match args.get(usize::from(position.saturating_sub(1))) {
        Some(Value::String(s)) => Ok(s),
        _ => Err(JwtError::NotAString { position }),
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        for nibble in [byte >> 4, byte & 0x0f] {
            text.push(char::from(DIGITS[usize::from(nibble)]));
        }
    }
    text
}

#[cfg(test)]
mod tests;
