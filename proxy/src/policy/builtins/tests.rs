use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair as _};
use x509_parser::prelude::FromDer as _;

use super::*;

/// Calls `builtin` the way a policy does: a module compiled after
/// [`register`], the arguments passed through `input`.
fn call(builtin: &str, args: &[Value]) -> Result<Value, String> {
    let mut engine = regorus::Engine::new();
    register(&mut engine, true).unwrap();
    let params: Vec<String> = (0..args.len()).map(|i| format!("input[{i}]")).collect();
    engine
        .add_policy(
            "call.rego".to_owned(),
            format!("package call\nresult := {builtin}({})\n", params.join(", ")),
        )
        .unwrap();
    engine.set_input(Value::from(args.to_vec()));
    engine
        .eval_rule("data.call.result".to_owned())
        .map_err(|e| e.to_string())
}

fn s(text: &str) -> Value {
    Value::from(text)
}

fn json(text: &str) -> Value {
    Value::from_json_str(text).unwrap()
}

const TRUE: Result<Value, String> = Ok(Value::Bool(true));
const FALSE: Result<Value, String> = Ok(Value::Bool(false));

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWS of `header` and `payload` (JSON text), signed by `sign`.
fn token(header: &str, payload: &str, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let signature = sign(input.as_bytes());
    format!("{input}.{}", b64(signature))
}

fn header(alg: &str, extra: &str) -> String {
    format!(r#"{{"alg":"{alg}","typ":"JWT"{extra}}}"#)
}

fn hmac(alg: ring::hmac::Algorithm, secret: &[u8]) -> impl FnOnce(&[u8]) -> Vec<u8> {
    move |message| {
        ring::hmac::sign(&ring::hmac::Key::new(alg, secret), message)
            .as_ref()
            .to_vec()
    }
}

/// An HS256 token signed with "secret", as in OPA's Envoy tutorial.
fn hs256(payload: &str) -> String {
    token(
        &header("HS256", ""),
        payload,
        hmac(ring::hmac::HMAC_SHA256, b"secret"),
    )
}

/// The same token with another payload (its signature kept).
fn with_payload(jwt: &str, payload: &str) -> String {
    let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
    parts[1] = b64(payload);
    parts.join(".")
}

/// The same token with one bit of its signature flipped.
fn with_flipped_signature(jwt: &str) -> String {
    let (input, signature) = jwt.rsplit_once('.').unwrap();
    let mut signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
    signature[0] ^= 1;
    format!("{input}.{}", b64(signature))
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|line| std::str::from_utf8(line).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn self_signed(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::new(vec!["jwt.test".to_owned()])
        .unwrap()
        .self_signed(key)
        .unwrap()
        .pem()
}

const RSA_A: &str = include_str!("testdata/rsa-2048-a.pem");
const RSA_B: &str = include_str!("testdata/rsa-2048-b.pem");
const RSA_1024_PUBLIC: &str = include_str!("testdata/rsa-1024-public.pem");

struct RsaKey {
    pair: sig::RsaKeyPair,
    rcgen: rcgen::KeyPair,
}

impl RsaKey {
    fn new(pem: &str) -> Self {
        let rcgen = rcgen::KeyPair::from_pem(pem).unwrap();
        let pair = sig::RsaKeyPair::from_pkcs8(&rcgen.serialize_der()).unwrap();
        Self { pair, rcgen }
    }

    fn signer(&self, padding: &'static dyn sig::RsaEncoding) -> impl FnOnce(&[u8]) -> Vec<u8> {
        move |message| {
            let mut signature = vec![0; self.pair.public().modulus_len()];
            self.pair
                .sign(padding, &SystemRandom::new(), message, &mut signature)
                .unwrap();
            signature
        }
    }

    fn pkcs1_pem(&self) -> String {
        pem("RSA PUBLIC KEY", self.pair.public().as_ref())
    }

    fn jwk(&self, extra: &str) -> String {
        let public = sig::RsaPublicKeyComponents::<Vec<u8>>::from(self.pair.public());
        format!(
            r#"{{"kty":"RSA","n":"{}","e":"{}"{extra}}}"#,
            b64(&public.n),
            b64(&public.e)
        )
    }
}

struct EcKey {
    pair: sig::EcdsaKeyPair,
    rcgen: rcgen::KeyPair,
    crv: &'static str,
}

impl EcKey {
    fn new(
        rcgen_alg: &'static rcgen::SignatureAlgorithm,
        ring_alg: &'static sig::EcdsaSigningAlgorithm,
        crv: &'static str,
    ) -> Self {
        let rcgen = rcgen::KeyPair::generate_for(rcgen_alg).unwrap();
        let pair =
            sig::EcdsaKeyPair::from_pkcs8(ring_alg, &rcgen.serialize_der(), &SystemRandom::new())
                .unwrap();
        Self { pair, rcgen, crv }
    }

    fn p256() -> Self {
        Self::new(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            "P-256",
        )
    }

    fn p384() -> Self {
        Self::new(
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
            "P-384",
        )
    }

    fn signer(&self) -> impl FnOnce(&[u8]) -> Vec<u8> {
        move |message| {
            self.pair
                .sign(&SystemRandom::new(), message)
                .unwrap()
                .as_ref()
                .to_vec()
        }
    }

    fn jwk(&self, extra: &str) -> String {
        let point = self.pair.public_key().as_ref();
        let (x, y) = point[1..].split_at((point.len() - 1) / 2);
        format!(
            r#"{{"kty":"EC","crv":"{}","x":"{}","y":"{}"{extra}}}"#,
            self.crv,
            b64(x),
            b64(y)
        )
    }
}

// --- OPA's documented examples ---------------------------------------------

/// Alice's token from OPA's Envoy tutorial (docs "Tutorial: Standalone
/// Envoy"), HS256 with the secret "secret"; `exp` is 2041-01-05.
const ALICE: &str = "eyJhbGciOiAiSFMyNTYiLCAidHlwIjogIkpXVCJ9.eyJleHAiOiAyMjQxMDgxNTM5LCAibmJmIjogMTUxNDg1MTEzOSwgInJvbGUiOiAiZ3Vlc3QiLCAic3ViIjogIllXeHBZMlU9In0.Uk5hgUqMuUfDLvBLnlXMD0-X53aM_Hlziqg3vhOsCc8";

#[test]
fn the_envoy_tutorial_token_decodes_and_verifies_with_its_secret() {
    // The tutorial's token carries {"exp": 2241081539, "nbf": 1514851139,
    // "role": "guest", "sub": "YWxpY2U="} (base64 of "alice").
    let header = json(r#"{"alg": "HS256", "typ": "JWT"}"#);
    let payload =
        json(r#"{"exp": 2241081539, "nbf": 1514851139, "role": "guest", "sub": "YWxpY2U="}"#);
    let signature = "524e61814a8cb947c32ef04b9e55cc0f4f97e7768cfc79738aa837be13ac09cf";
    assert_eq!(
        call("io.jwt.decode", &[s(ALICE)]),
        Ok(Value::from(vec![
            header.clone(),
            payload.clone(),
            s(signature)
        ]))
    );
    assert_eq!(call("io.jwt.verify_hs256", &[s(ALICE), s("secret")]), TRUE);
    assert_eq!(call("io.jwt.verify_hs256", &[s(ALICE), s("Secret")]), FALSE);
    assert_eq!(
        call(
            "io.jwt.decode_verify",
            &[s(ALICE), json(r#"{"secret": "secret"}"#)]
        ),
        Ok(Value::from(vec![Value::Bool(true), header, payload]))
    );
}

/// The token of OPA's "Token Verification Examples" (builtins reference,
/// tokens), ES256 with {"iss": "xxx", "nbf": 1444478400}.
const OPA_ES256_TOKEN: &str = "eyJ0eXAiOiAiSldUIiwgImFsZyI6ICJFUzI1NiJ9.eyJuYmYiOiAxNDQ0NDc4NDAwLCAiaXNzIjogInh4eCJ9.lArczfN-pIL8oUU-7PU83u-zfXougXBZj6drFeKFsPEoVhy9WAyiZlRshYqjTSXdaw8yw2L-ovt4zTUZb2PWMg";

/// Its key as the example's JWK set.
const OPA_JWKS: &str = r#"{
    "keys": [{
        "kty":"EC",
        "crv":"P-256",
        "x":"z8J91ghFy5o6f2xZ4g8LsLH7u2wEpT2ntj8loahnlsE",
        "y":"7bdeXLH61KrGWRdh7ilnbcGQACxykaPKfmBccTHIOUo"
    }]
}"#;

/// And as the example's (expired, which OPA does not check) certificate.
const OPA_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBcDCCARagAwIBAgIJAMZmuGSIfvgzMAoGCCqGSM49BAMCMBMxETAPBgNVBAMM
CHdoYXRldmVyMB4XDTE4MDgxMDE0Mjg1NFoXDTE4MDkwOTE0Mjg1NFowEzERMA8G
A1UEAwwId2hhdGV2ZXIwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATPwn3WCEXL
mjp/bFniDwuwsfu7bASlPae2PyWhqGeWwe23Xlyx+tSqxlkXYe4pZ23BkAAscpGj
yn5gXHExyDlKo1MwUTAdBgNVHQ4EFgQUElRjSoVgKjUqY5AXz2o74cLzzS8wHwYD
VR0jBBgwFoAUElRjSoVgKjUqY5AXz2o74cLzzS8wDwYDVR0TAQH/BAUwAwEB/zAK
BggqhkjOPQQDAgNIADBFAiEA4yQ/88ZrUX68c6kOe9G11u8NUaUzd8pLOtkKhniN
OHoCIHmNX37JOqTcTzGn2u9+c8NlnvZ0uDvsd1BmKPaUmjmm
-----END CERTIFICATE-----";

#[test]
fn opas_es256_examples_verify_with_the_documented_certificate_and_jwks() {
    // The examples' results: `result.verify` is true, `result.payload` the
    // decoded token and `result.check` (its iss is "xxx") true; with
    // `io.jwt.decode_verify(es256_token, {"cert": ..., "iss": "xxx"})` the
    // result is [true, header, payload].
    let header = json(r#"{"alg": "ES256", "typ": "JWT"}"#);
    let payload = json(r#"{"iss": "xxx", "nbf": 1444478400}"#);
    let signature = "940adccdf37ea482fca1453eecf53cdeefb37d7a2e8170598fa76b15e285b0f1\
                     28561cbd580ca266546c858aa34d25dd6b0f32c362fea2fb78cd35196f63d632";
    assert_eq!(
        call("io.jwt.decode", &[s(OPA_ES256_TOKEN)]),
        Ok(Value::from(vec![
            header.clone(),
            payload.clone(),
            s(signature)
        ]))
    );
    for key in [OPA_CERT, OPA_JWKS] {
        assert_eq!(
            call("io.jwt.verify_es256", &[s(OPA_ES256_TOKEN), s(key)]),
            TRUE
        );
        let constraints =
            Value::from_json_str(&serde_json::json!({"cert": key, "iss": "xxx"}).to_string())
                .unwrap();
        assert_eq!(
            call("io.jwt.decode_verify", &[s(OPA_ES256_TOKEN), constraints]),
            Ok(Value::from(vec![
                Value::Bool(true),
                header.clone(),
                payload.clone()
            ]))
        );
        let other_issuer =
            Value::from_json_str(&serde_json::json!({"cert": key, "iss": "yyy"}).to_string())
                .unwrap();
        assert_eq!(
            call("io.jwt.decode_verify", &[s(OPA_ES256_TOKEN), other_issuer]),
            Ok(unverified())
        );
    }
}

#[test]
fn opas_sign_raw_example_verifies_with_the_plain_secret() {
    // OPA's round-trip example: io.jwt.encode_sign_raw(`{"alg":"HS256",
    // "typ":"JWT"}`, `{}`, `{"kty":"oct","k":"Zm9v"}`) ("Zm9v" is "foo"),
    // then io.jwt.verify_hs256(token, "foo") is true and
    // io.jwt.decode_verify(token, {"secret": "foo"}) is
    // [true, {"alg": "HS256", "typ": "JWT"}, {}]. The token below is that
    // signature, computed apart (Python's hmac).
    let jwt =
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.e30.Duw7jWmGY54yEu6kcqd2w1TKp1EspzboBnx8EeMc-z0";
    assert_eq!(call("io.jwt.verify_hs256", &[s(jwt), s("foo")]), TRUE);
    assert_eq!(
        call(
            "io.jwt.decode_verify",
            &[s(jwt), json(r#"{"secret": "foo"}"#)]
        ),
        Ok(json(r#"[true, {"alg": "HS256", "typ": "JWT"}, {}]"#))
    );
    // The JWK form of the same secret, through `cert`.
    let cert = Value::from_json_str(
        &serde_json::json!({"cert": r#"{"kty":"oct","k":"Zm9v"}"#}).to_string(),
    )
    .unwrap();
    assert_eq!(
        call("io.jwt.decode_verify", &[s(jwt), cert]),
        Ok(json(r#"[true, {"alg": "HS256", "typ": "JWT"}, {}]"#))
    );
}

// --- Signatures, by algorithm family ---------------------------------------

#[test]
fn hmac_tokens_verify_with_their_secret_and_algorithm_only() {
    let cases = [
        ("io.jwt.verify_hs256", "HS256", ring::hmac::HMAC_SHA256),
        ("io.jwt.verify_hs384", "HS384", ring::hmac::HMAC_SHA384),
        ("io.jwt.verify_hs512", "HS512", ring::hmac::HMAC_SHA512),
    ];
    for (builtin, alg, hash) in cases {
        let jwt = token(
            &header(alg, ""),
            r#"{"sub":"alice"}"#,
            hmac(hash, b"s3cr3t"),
        );
        assert_eq!(call(builtin, &[s(&jwt), s("s3cr3t")]), TRUE, "{alg}");
        let tampered = with_payload(&jwt, r#"{"sub":"admin"}"#);
        assert_eq!(call(builtin, &[s(&tampered), s("s3cr3t")]), FALSE, "{alg}");
        let forged = with_flipped_signature(&jwt);
        assert_eq!(call(builtin, &[s(&forged), s("s3cr3t")]), FALSE, "{alg}");
        assert_eq!(call(builtin, &[s(&jwt), s("s3cr3t ")]), FALSE, "{alg}");
        for (other, _, _) in cases.iter().filter(|(b, _, _)| *b != builtin) {
            assert_eq!(
                call(other, &[s(&jwt), s("s3cr3t")]),
                FALSE,
                "{other} on {alg}"
            );
        }
    }
}

#[test]
fn rsa_tokens_verify_with_a_certificate_public_keys_and_a_jwk() {
    let key = RsaKey::new(RSA_A);
    let other = RsaKey::new(RSA_B);
    let forms = [
        ("certificate", self_signed(&key.rcgen)),
        ("SPKI", key.rcgen.public_key_pem()),
        ("PKCS #1", key.pkcs1_pem()),
        ("JWK", key.jwk("")),
        ("JWK set", format!(r#"{{"keys":[{}]}}"#, key.jwk(""))),
    ];
    let others = [self_signed(&other.rcgen), other.jwk("")];
    let cases: [(&str, &str, &'static dyn sig::RsaEncoding); 6] = [
        ("io.jwt.verify_rs256", "RS256", &sig::RSA_PKCS1_SHA256),
        ("io.jwt.verify_rs384", "RS384", &sig::RSA_PKCS1_SHA384),
        ("io.jwt.verify_rs512", "RS512", &sig::RSA_PKCS1_SHA512),
        ("io.jwt.verify_ps256", "PS256", &sig::RSA_PSS_SHA256),
        ("io.jwt.verify_ps384", "PS384", &sig::RSA_PSS_SHA384),
        ("io.jwt.verify_ps512", "PS512", &sig::RSA_PSS_SHA512),
    ];
    for (builtin, alg, padding) in cases {
        let jwt = token(&header(alg, ""), r#"{"sub":"alice"}"#, key.signer(padding));
        let tampered = with_payload(&jwt, r#"{"sub":"admin"}"#);
        let forged = with_flipped_signature(&jwt);
        for (form, cert) in &forms {
            assert_eq!(call(builtin, &[s(&jwt), s(cert)]), TRUE, "{alg} {form}");
            assert_eq!(
                call(builtin, &[s(&tampered), s(cert)]),
                FALSE,
                "{alg} {form}"
            );
            assert_eq!(call(builtin, &[s(&forged), s(cert)]), FALSE, "{alg} {form}");
        }
        for cert in &others {
            assert_eq!(call(builtin, &[s(&jwt), s(cert)]), FALSE, "{alg} other key");
        }
        // Another algorithm (padding or hash) does not verify it.
        for (other_builtin, _, _) in cases.iter().filter(|(b, _, _)| *b != builtin) {
            let cert = &forms[0].1;
            assert_eq!(
                call(other_builtin, &[s(&jwt), s(cert)]),
                FALSE,
                "{other_builtin} on {alg}"
            );
        }
        // Nor does an ECDSA builtin (the key is of another type).
        assert_eq!(
            call("io.jwt.verify_es256", &[s(&jwt), s(&forms[0].1)]),
            FALSE
        );
    }
}

#[test]
fn ecdsa_tokens_verify_with_a_certificate_a_public_key_and_a_jwk() {
    for (builtin, alg, key, other) in [
        ("io.jwt.verify_es256", "ES256", EcKey::p256(), EcKey::p256()),
        ("io.jwt.verify_es384", "ES384", EcKey::p384(), EcKey::p384()),
    ] {
        let jwt = token(&header(alg, ""), r#"{"sub":"alice"}"#, key.signer());
        let tampered = with_payload(&jwt, r#"{"sub":"admin"}"#);
        let forged = with_flipped_signature(&jwt);
        let forms = [
            ("certificate", self_signed(&key.rcgen)),
            ("SPKI", key.rcgen.public_key_pem()),
            ("JWK", key.jwk("")),
        ];
        for (form, cert) in &forms {
            assert_eq!(call(builtin, &[s(&jwt), s(cert)]), TRUE, "{alg} {form}");
            assert_eq!(
                call(builtin, &[s(&tampered), s(cert)]),
                FALSE,
                "{alg} {form}"
            );
            assert_eq!(call(builtin, &[s(&forged), s(cert)]), FALSE, "{alg} {form}");
        }
        for cert in [self_signed(&other.rcgen), other.jwk("")] {
            assert_eq!(
                call(builtin, &[s(&jwt), s(&cert)]),
                FALSE,
                "{alg} other key"
            );
        }
        let cert = &forms[0].1;
        for other_builtin in ["io.jwt.verify_es256", "io.jwt.verify_es384"] {
            if other_builtin != builtin {
                // The other hash: not this token's signature.
                assert_eq!(call(other_builtin, &[s(&jwt), s(cert)]), FALSE);
            }
        }
        assert_eq!(call("io.jwt.verify_rs256", &[s(&jwt), s(cert)]), FALSE);
        assert_eq!(call("io.jwt.verify_hs256", &[s(&jwt), s(cert)]), FALSE);
    }
}

#[test]
fn eddsa_tokens_verify_with_a_certificate_a_public_key_and_a_jwk() {
    let rcgen = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let pair = sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&rcgen.serialize_der()).unwrap();
    let jwt = token(&header("EdDSA", ""), r#"{"sub":"alice"}"#, |m| {
        pair.sign(m).as_ref().to_vec()
    });
    let jwk = format!(
        r#"{{"kty":"OKP","crv":"Ed25519","x":"{}"}}"#,
        b64(pair.public_key())
    );
    for cert in [self_signed(&rcgen), rcgen.public_key_pem(), jwk] {
        assert_eq!(call("io.jwt.verify_eddsa", &[s(&jwt), s(&cert)]), TRUE);
        let tampered = with_payload(&jwt, r#"{"sub":"admin"}"#);
        assert_eq!(
            call("io.jwt.verify_eddsa", &[s(&tampered), s(&cert)]),
            FALSE
        );
        assert_eq!(call("io.jwt.verify_es256", &[s(&jwt), s(&cert)]), FALSE);
        let constraints = serde_json::json!({ "cert": cert }).to_string();
        assert_eq!(
            call("io.jwt.decode_verify", &[s(&jwt), json(&constraints)]),
            Ok(Value::from(vec![
                Value::Bool(true),
                json(&header("EdDSA", "")),
                json(r#"{"sub":"alice"}"#)
            ]))
        );
    }
}

#[test]
fn a_jwk_set_is_searched_by_kid_then_by_alg() {
    let key = RsaKey::new(RSA_A);
    let other = RsaKey::new(RSA_B);
    let set = format!(
        r#"{{"keys":[{},{}]}}"#,
        other.jwk(r#","kid":"a""#),
        key.jwk(r#","kid":"b""#)
    );
    let signed = |kid: &str| {
        token(
            &header("RS256", kid),
            r#"{"sub":"alice"}"#,
            key.signer(&sig::RSA_PKCS1_SHA256),
        )
    };
    let verify = |jwt: &str, set: &str| call("io.jwt.verify_rs256", &[s(jwt), s(set)]);
    assert_eq!(verify(&signed(r#","kid":"b""#), &set), TRUE, "its kid");
    // A matching kid alone is tried, as in OPA, even if another key would do.
    assert_eq!(verify(&signed(r#","kid":"a""#), &set), FALSE, "another kid");
    assert_eq!(verify(&signed(""), &set), TRUE, "no kid: every key");
    assert_eq!(verify(&signed(r#","kid":"z""#), &set), TRUE, "unknown kid");
    // A key's alg, when it has one, must be the token's.
    let jwt = signed("");
    let with_alg =
        |alg: &str| format!(r#"{{"keys":[{}]}}"#, key.jwk(&format!(r#","alg":"{alg}""#)));
    assert_eq!(verify(&jwt, &with_alg("RS256")), TRUE);
    assert_eq!(verify(&jwt, &with_alg("RS384")), FALSE);
    // Keys for algorithms OPA does not know are skipped.
    assert_eq!(verify(&jwt, &with_alg("RSA-OAEP")), FALSE);
    assert_eq!(verify(&jwt, r#"{"keys":[]}"#), FALSE);
    // decode_verify chooses the same way.
    let constraints = |cert: &str| json(&serde_json::json!({ "cert": cert }).to_string());
    let valid = |jwt: &str, cert: &str| {
        call("io.jwt.decode_verify", &[s(jwt), constraints(cert)])
            .map(|result| result.as_array().unwrap().get(0).unwrap().clone())
    };
    assert_eq!(valid(&signed(r#","kid":"b""#), &set), TRUE);
    assert_eq!(valid(&signed(r#","kid":"a""#), &set), FALSE);
    assert_eq!(valid(&signed(""), &set), TRUE);
    assert_eq!(valid(&jwt, &with_alg("RS384")), FALSE);
}

#[test]
fn a_key_ring_cannot_check_is_an_error_not_false() {
    let key = RsaKey::new(RSA_A);
    let jwt = token(
        &header("RS256", ""),
        "{}",
        key.signer(&sig::RSA_PKCS1_SHA256),
    );
    let error = call("io.jwt.verify_rs256", &[s(&jwt), s(RSA_1024_PUBLIC)]).unwrap_err();
    assert!(error.contains("shorter than 2048 bits"), "{error}");
    // In a set, the key that verifies wins; if none does, the one that could
    // not be checked makes it an error.
    let der = STANDARD
        .decode(
            RSA_1024_PUBLIC
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&der).unwrap();
    let Ok(x509_parser::public_key::PublicKey::RSA(short)) = spki.parsed() else {
        panic!("not an RSA key");
    };
    let short = format!(
        r#"{{"kty":"RSA","n":"{}","e":"{}"}}"#,
        b64(short.modulus),
        b64(short.exponent)
    );
    let set = format!(r#"{{"keys":[{short},{}]}}"#, key.jwk(""));
    assert_eq!(call("io.jwt.verify_rs256", &[s(&jwt), s(&set)]), TRUE);
    let set = format!(r#"{{"keys":[{short},{}]}}"#, RsaKey::new(RSA_B).jwk(""));
    assert!(call("io.jwt.verify_rs256", &[s(&jwt), s(&set)]).is_err());
    // P-521 and ES512.
    let p521 = format!(
        r#"{{"kty":"EC","crv":"P-521","x":"{}","y":"{}"}}"#,
        b64([1; 66]),
        b64([2; 66])
    );
    let es512 = token(&header("ES512", ""), "{}", |_| vec![1; 132]);
    let error = call("io.jwt.verify_es256", &[s(&es512), s(&p521)]).unwrap_err();
    assert!(error.contains("P-521"), "{error}");
    let p256 = EcKey::p256().jwk("");
    let constraints = json(&serde_json::json!({ "cert": p256 }).to_string());
    let error = call("io.jwt.decode_verify", &[s(&es512), constraints]).unwrap_err();
    assert!(error.contains("ES512"), "{error}");
}

// --- decode_verify's constraints -------------------------------------------

fn decode_verify(jwt: &str, constraints: &str) -> Result<Value, String> {
    call("io.jwt.decode_verify", &[s(jwt), json(constraints)])
}

/// Whether decode_verify found the token valid (checking the result's
/// shape on the way).
fn is_valid(jwt: &str, constraints: &str) -> bool {
    let result = decode_verify(jwt, constraints).unwrap();
    let parts = result.as_array().unwrap();
    assert_eq!(parts.len(), 3);
    match parts.get(0).unwrap() {
        Value::Bool(true) => true,
        Value::Bool(false) => {
            assert_eq!(result, unverified(), "an invalid token's result");
            false
        }
        other => panic!("valid is {other}"),
    }
}

/// `time` constraints are nanoseconds; claims are seconds.
fn at(seconds: u64) -> String {
    format!(
        r#"{{"secret": "secret", "time": {}}}"#,
        seconds * 1_000_000_000
    )
}

#[test]
fn decode_verify_checks_exp_and_nbf_against_time() {
    let jwt = hs256(r#"{"nbf": 1500000000, "exp": 1600000000}"#);
    assert!(is_valid(&jwt, &at(1_500_000_000)), "at nbf");
    assert!(is_valid(&jwt, &at(1_599_999_999)), "just before exp");
    assert!(!is_valid(&jwt, &at(1_600_000_000)), "at exp");
    assert!(!is_valid(&jwt, &at(1_700_000_000)), "after exp");
    assert!(!is_valid(&jwt, &at(1_499_999_999)), "before nbf");
    assert!(is_valid(&jwt, r#"{"secret": "secret", "time": 1.55e18}"#));
    // Fractional claims compare as numbers.
    let jwt = hs256(r#"{"exp": 1600000000.5}"#);
    assert!(is_valid(&jwt, &at(1_600_000_000)));
    assert!(!is_valid(&jwt, &at(1_600_000_001)));
    // Without `time`, the clock: the tutorial's token expires in 2041.
    assert!(is_valid(ALICE, r#"{"secret": "secret"}"#));
    assert!(!is_valid(
        &hs256(r#"{"exp": 1}"#),
        r#"{"secret": "secret"}"#
    ));
    assert!(!is_valid(
        &hs256(r#"{"nbf": 4102444800}"#),
        r#"{"secret": "secret"}"#
    ));
    // A token without exp or nbf has no time limit.
    assert!(is_valid(&hs256("{}"), &at(0)));
}

#[test]
fn decode_verify_checks_iss_aud_and_alg() {
    let with_iss = hs256(r#"{"iss": "https://issuer.test"}"#);
    let iss = |value: &str| format!(r#"{{"secret": "secret", "iss": "{value}"}}"#);
    assert!(is_valid(&with_iss, &iss("https://issuer.test")));
    assert!(!is_valid(&with_iss, &iss("https://other.test")));
    assert!(
        !is_valid(&hs256("{}"), &iss("https://issuer.test")),
        "no iss"
    );
    assert!(
        !is_valid(&hs256(r#"{"iss": 7}"#), &iss("7")),
        "not a string"
    );
    assert!(is_valid(&with_iss, r#"{"secret": "secret"}"#), "any issuer");

    let aud = |value: &str| format!(r#"{{"secret": "secret", "aud": "{value}"}}"#);
    let one = hs256(r#"{"aud": "api"}"#);
    let many = hs256(r#"{"aud": ["web", "api"]}"#);
    assert!(is_valid(&one, &aud("api")));
    assert!(!is_valid(&one, &aud("web")));
    assert!(is_valid(&many, &aud("api")));
    assert!(!is_valid(&many, &aud("admin")));
    assert!(!is_valid(&hs256(r#"{"aud": 7}"#), &aud("7")));
    // As OPA documents: without an `aud` constraint, the claim must be absent.
    assert!(!is_valid(&one, r#"{"secret": "secret"}"#));
    assert!(!is_valid(&hs256("{}"), &aud("api")));

    let jwt = hs256("{}");
    assert!(is_valid(&jwt, r#"{"secret": "secret", "alg": "HS256"}"#));
    assert!(!is_valid(&jwt, r#"{"secret": "secret", "alg": "HS384"}"#));
    assert!(!is_valid(&jwt, r#"{"secret": "not it"}"#));
    assert_eq!(
        decode_verify(&hs256(r#"{"sub": "alice"}"#), r#"{"secret": "secret"}"#),
        Ok(json(
            r#"[true, {"alg": "HS256", "typ": "JWT"}, {"sub": "alice"}]"#
        ))
    );
}

#[test]
fn decode_verify_refuses_alg_none_and_unknown_critical_headers() {
    let none = token(r#"{"alg":"none"}"#, "{}", |_| Vec::new());
    assert!(!is_valid(&none, r#"{"secret": "secret"}"#));
    let no_alg = token(
        r#"{"typ":"JWT"}"#,
        "{}",
        hmac(ring::hmac::HMAC_SHA256, b"secret"),
    );
    assert!(!is_valid(&no_alg, r#"{"secret": "secret"}"#));
    let critical = |header: &str| token(header, "{}", hmac(ring::hmac::HMAC_SHA256, b"secret"));
    assert!(!is_valid(
        &critical(r#"{"alg":"HS256","crit":["exp"],"exp":1}"#),
        r#"{"secret": "secret"}"#
    ));
    assert!(is_valid(
        &critical(r#"{"alg":"HS256","crit":["alg"]}"#),
        r#"{"secret": "secret"}"#
    ));
    assert!(
        decode_verify(
            &critical(r#"{"alg":"HS256","crit":[]}"#),
            r#"{"secret": "secret"}"#
        )
        .is_err()
    );
    assert!(
        decode_verify(
            &critical(r#"{"alg":"HS256","crit":"x"}"#),
            r#"{"secret": "secret"}"#
        )
        .is_err()
    );
}

#[test]
fn decode_verify_with_a_public_key_refuses_tokens_hmac_signed_with_it() {
    // The classic algorithm confusion: an HS256 token whose "secret" is the
    // issuer's public key text.
    let key = RsaKey::new(RSA_A);
    let public = key.rcgen.public_key_pem();
    let jwt = token(
        &header("HS256", ""),
        r#"{"role":"admin"}"#,
        hmac(ring::hmac::HMAC_SHA256, public.as_bytes()),
    );
    let cert = serde_json::json!({ "cert": public }).to_string();
    assert!(!is_valid(&jwt, &cert));
    assert_eq!(call("io.jwt.verify_rs256", &[s(&jwt), s(&public)]), FALSE);
    let secret = serde_json::json!({ "secret": public }).to_string();
    assert!(is_valid(&jwt, &secret), "the token itself is well formed");
    // The key's own tokens, checked with the algorithm of their header.
    let rs384 = token(
        &header("RS384", ""),
        "{}",
        key.signer(&sig::RSA_PKCS1_SHA384),
    );
    assert!(is_valid(&rs384, &cert));
    assert!(!is_valid(
        &rs384,
        &serde_json::json!({ "cert": public, "alg": "RS256" }).to_string()
    ));
}

#[test]
fn decode_verify_rejects_bad_constraints() {
    let jwt = hs256("{}");
    for (constraints, message) in [
        (r#"{}"#, "no key constraint"),
        (r#"{"secret": ""}"#, "no key constraint"),
        (
            r#"{"secret": "secret", "cert": "{\"keys\":[]}"}"#,
            "duplicate key constraints",
        ),
        (
            r#"{"secret": "secret", "exp": 1}"#,
            "unknown token validation constraint: exp",
        ),
        (r#"{"secret": 7}"#, "secret constraint: must be a string"),
        (r#"{"cert": 7}"#, "cert constraint: must be a string"),
        (r#"{"cert": "nonsense"}"#, "failed to parse a JWK key (set)"),
        (
            r#"{"secret": "secret", "time": -1}"#,
            "must not be negative",
        ),
        (
            r#"{"secret": "secret", "time": "now"}"#,
            "time constraint: must be a number",
        ),
        (
            r#"{"secret": "secret", "alg": 256}"#,
            "alg constraint: must be a string",
        ),
        (r#""secret""#, "operand 2 must be an object"),
    ] {
        let error = decode_verify(&jwt, constraints).unwrap_err();
        assert!(error.contains(message), "{constraints}: {error}");
    }
    // A claim of the wrong type, in a token that verifies.
    for (payload, message) in [
        (r#"{"exp": "tomorrow"}"#, "exp value must be a number"),
        (r#"{"nbf": null}"#, "nbf value must be a number"),
    ] {
        let error = decode_verify(&hs256(payload), r#"{"secret": "secret"}"#).unwrap_err();
        assert!(error.contains(message), "{payload}: {error}");
    }
}

#[test]
fn nested_tokens_are_decoded_and_verified_at_each_level() {
    let inner = hs256(r#"{"sub": "alice"}"#);
    let outer = |inner: &str, secret: &[u8]| {
        token(
            r#"{"alg":"HS256","cty":"JWT"}"#,
            inner,
            hmac(ring::hmac::HMAC_SHA256, secret),
        )
    };
    let inner_decoded = call("io.jwt.decode", &[s(&inner)]).unwrap();
    assert_eq!(
        call("io.jwt.decode", &[s(&outer(&inner, b"secret"))]),
        Ok(inner_decoded.clone())
    );
    // jwt.io quotes a nested token; decode trims the quotes.
    let quoted = outer(&format!("\"{inner}\""), b"x");
    assert_eq!(call("io.jwt.decode", &[s(&quoted)]), Ok(inner_decoded));
    assert_eq!(
        decode_verify(&outer(&inner, b"secret"), r#"{"secret": "secret"}"#),
        Ok(json(
            r#"[true, {"alg": "HS256", "typ": "JWT"}, {"sub": "alice"}]"#
        ))
    );
    assert!(!is_valid(
        &outer(&inner, b"other"),
        r#"{"secret": "secret"}"#
    ));
    let forged_inner = with_flipped_signature(&inner);
    assert!(!is_valid(
        &outer(&forged_inner, b"secret"),
        r#"{"secret": "secret"}"#
    ));
}

// --- Malformed input ---------------------------------------------------------

#[test]
fn malformed_tokens_are_errors() {
    let key = RsaKey::new(RSA_A);
    let cert = key.rcgen.public_key_pem();
    let signed = |header: &str, payload: &str| {
        let input = format!("{header}.{payload}");
        let tag = hmac(ring::hmac::HMAC_SHA256, b"secret")(input.as_bytes());
        format!("{input}.{}", b64(tag))
    };
    let e30 = b64("{}");
    let hs = b64(header("HS256", ""));
    // (token, what the error says; whether io.jwt.verify_hs256, which reads
    // only the signature, fails too)
    let cases = [
        (String::new(), "no period separators", true),
        ("abc".to_owned(), "no period separators", true),
        ("a.b".to_owned(), "3 sections, found 2", true),
        ("a.b.c.d".to_owned(), "3 sections, found 4", true),
        ("..".to_owned(), "header: invalid JSON", false),
        (signed("!!!", &e30), "header had invalid encoding", false),
        (
            signed(&b64("not json"), &e30),
            "header: invalid JSON",
            false,
        ),
        (
            signed(&b64("[1]"), &e30),
            "header: decoded JSON type was not an Object",
            false,
        ),
        (
            signed(&b64(r#"{"alg":"HS256","enc":"A128GCM"}"#), &e30),
            "JWE",
            false,
        ),
        (
            format!("{hs}.{e30}.a"),
            "signature had invalid encoding",
            true,
        ),
        (
            format!("{hs}.{e30}.@@@@"),
            "signature had invalid encoding",
            true,
        ),
        (
            format!("{hs}.{e30}.YWJj="),
            "signature had invalid encoding",
            true,
        ),
    ];
    for (jwt, message, hs_fails) in &cases {
        let calls = [
            call("io.jwt.decode", &[s(jwt)]),
            call("io.jwt.verify_rs256", &[s(jwt), s(&cert)]),
            call(
                "io.jwt.decode_verify",
                &[s(jwt), json(r#"{"secret": "secret"}"#)],
            ),
        ];
        for result in calls {
            let error = result.unwrap_err();
            assert!(error.contains(message), "{jwt:?}: {error}");
        }
        let hs = call("io.jwt.verify_hs256", &[s(jwt), s("secret")]);
        assert_eq!(hs.is_err(), *hs_fails, "{jwt:?}: {hs:?}");
    }
    // A payload that is not a JSON object, in a token that verifies.
    for payload in [b64("[]"), b64("nope"), "e30$".to_owned()] {
        let jwt = signed(&hs, &payload);
        assert!(call("io.jwt.decode", &[s(&jwt)]).is_err(), "{payload}");
        assert!(
            decode_verify(&jwt, r#"{"secret": "secret"}"#).is_err(),
            "{payload}"
        );
        assert_eq!(call("io.jwt.verify_hs256", &[s(&jwt), s("secret")]), TRUE);
    }
    // A header member of the wrong type: io.jwt.decode does not read them.
    let jwt = signed(&b64(r#"{"alg":1}"#), &e30);
    assert!(call("io.jwt.decode", &[s(&jwt)]).is_ok());
    for result in [
        call("io.jwt.verify_rs256", &[s(&jwt), s(&cert)]),
        call(
            "io.jwt.decode_verify",
            &[s(&jwt), json(r#"{"secret": "secret"}"#)],
        ),
    ] {
        let error = result.unwrap_err();
        assert!(error.contains("alg: must be a string"), "{error}");
    }
    // Operands of the wrong type.
    let error = call("io.jwt.decode", &[Value::from(7u64)]).unwrap_err();
    assert!(error.contains("operand 1 must be a string"), "{error}");
    let error = call("io.jwt.verify_hs256", &[s(ALICE), Value::Null]).unwrap_err();
    assert!(error.contains("operand 2 must be a string"), "{error}");
}

#[test]
fn malformed_keys_are_errors() {
    let key = RsaKey::new(RSA_A);
    let jwt = token(
        &header("RS256", ""),
        "{}",
        key.signer(&sig::RSA_PKCS1_SHA256),
    );
    let cert = self_signed(&key.rcgen);
    let private = RSA_A.to_owned();
    for (text, message) in [
        (String::new(), "JWK"),
        ("not a key".to_owned(), "JWK"),
        ("[1, 2]".to_owned(), "not a JSON object"),
        (r#"{"keys": 5}"#.to_owned(), "not an array"),
        (r#"{"keys": [7]}"#.to_owned(), "not a JSON object"),
        (
            r#"{"n": "AQAB", "e": "AQAB"}"#.to_owned(),
            "without \"kty\"",
        ),
        (r#"{"kty": "RSA", "e": "AQAB"}"#.to_owned(), "RSA \"n\""),
        (
            r#"{"kty": "RSA", "n": "!!", "e": "AQAB"}"#.to_owned(),
            "RSA \"n\"",
        ),
        (
            r#"{"kty": "EC", "crv": "P-192", "x": "AQ", "y": "AQ"}"#.to_owned(),
            "crv",
        ),
        (r#"{"kty": "XYZ"}"#.to_owned(), "kty"),
        (
            r#"{"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": 7}"#.to_owned(),
            "kid",
        ),
        (
            "-----BEGIN CERTIFICATE-----\nZZZZ\n-----END CERTIFICATE-----\n".to_owned(),
            "certificate",
        ),
        (
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_owned(),
            "PEM",
        ),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n".to_owned(), "PEM"),
        (format!("{cert}{cert}"), "extra data"),
        (private, "PRIVATE KEY"),
        (pem("PUBLIC KEY", b"\x30\x00"), "public key"),
        (pem("RSA PUBLIC KEY", b"\x30\x03\x02\x01\x00"), "public key"),
    ] {
        for builtin in ["io.jwt.verify_rs256", "io.jwt.verify_es256"] {
            let error = call(builtin, &[s(&jwt), s(&text)]).unwrap_err();
            assert!(error.contains(message), "{text:?}: {error}");
        }
        let constraints = serde_json::json!({ "cert": text }).to_string();
        assert!(decode_verify(&jwt, &constraints).is_err(), "{text:?}");
    }
}

#[test]
fn base64url_is_read_padded_or_not_as_opa_reads_it() {
    let (input, signature) = ALICE.rsplit_once('.').unwrap();
    // 43 characters: one `=` of padding.
    let padded = format!("{input}.{signature}=");
    assert_eq!(
        call("io.jwt.verify_hs256", &[s(&padded), s("secret")]),
        TRUE
    );
    for wrong in [
        format!("{input}.{signature}=="),
        format!("{input}.{signature}=a"),
    ] {
        assert!(call("io.jwt.verify_hs256", &[s(&wrong), s("secret")]).is_err());
    }
    assert_eq!(base64url("YWI=").unwrap(), b"ab");
    assert_eq!(base64url("YWI").unwrap(), b"ab");
    assert!(base64url("YW=").is_err());
    assert_eq!(base64url("_-8").unwrap(), [0xff, 0xef]);
}

#[test]
fn random_and_mutated_tokens_never_panic_nor_verify() {
    let seed = fastrand::u64(..);
    println!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let key = EcKey::p256();
    let jwks = s(&format!(r#"{{"keys":[{}]}}"#, key.jwk("")));
    let cert = s(&self_signed(&key.rcgen));
    let secret = json(r#"{"secret": "secret", "aud": "api"}"#);
    let valid = hs256(r#"{"sub": "alice", "aud": "api", "exp": 4102444800}"#);
    let alphabet: Vec<char> = "eyJAQB019-_.=\"{}".chars().collect();
    for round in 0..3000 {
        let jwt = if round % 2 == 0 {
            // A random token.
            let len = rng.usize(0..60);
            (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect()
        } else {
            // The valid token with one character of its header or payload
            // replaced: the signed text changed, so it must not verify.
            let mut chars: Vec<char> = valid.chars().collect();
            let dot = valid.rfind('.').unwrap();
            let at = rng.usize(..dot);
            let replacement = alphabet[rng.usize(..alphabet.len())];
            if chars[at] == replacement {
                continue;
            }
            chars[at] = replacement;
            chars.into_iter().collect::<String>()
        };
        let jwt = s(&jwt);
        let _ = decode(std::slice::from_ref(&jwt));
        for result in [
            verify_with_secret(Algorithm::Hs256, &[jwt.clone(), s("secret")]),
            verify_with_key(Algorithm::Es256, &[jwt.clone(), jwks.clone()]),
            verify_with_key(Algorithm::Rs256, &[jwt.clone(), cert.clone()]),
        ] {
            assert!(
                !matches!(result, Ok(Value::Bool(true))),
                "seed {seed}: {jwt}"
            );
        }
        if let Ok(result) = super::decode_verify(&[jwt.clone(), secret.clone()]) {
            assert_eq!(result, unverified(), "seed {seed}: {jwt}");
        }
    }
    // The unmodified token does verify.
    assert_eq!(
        verify_with_secret(Algorithm::Hs256, &[s(&valid), s("secret")]).unwrap(),
        Value::Bool(true)
    );
}

#[test]
fn outside_strict_mode_a_failing_builtin_is_undefined_as_in_opa() {
    let mut engine = regorus::Engine::new();
    register(&mut engine, false).unwrap();
    engine
        .add_policy(
            "lenient.rego".to_owned(),
            "package lenient\n\
             default valid := false\n\
             valid if io.jwt.decode_verify(input.token, {\"secret\": \"secret\"})[0]\n\
             decoded := io.jwt.decode(input.token)\n"
                .to_owned(),
        )
        .unwrap();
    engine.set_input(json(r#"{"token": "not a token"}"#));
    assert_eq!(
        engine.eval_rule("data.lenient.decoded".to_owned()).unwrap(),
        Value::Undefined
    );
    assert_eq!(
        engine.eval_rule("data.lenient.valid".to_owned()).unwrap(),
        Value::Bool(false)
    );
}

#[test]
fn a_key_argument_is_parsed_once_per_thread_and_a_bad_one_every_time() {
    let first = keys::parse_cached(OPA_CERT).unwrap();
    let again = keys::parse_cached(OPA_CERT).unwrap();
    assert!(
        std::rc::Rc::ptr_eq(&first, &again),
        "the same keys, not parsed again"
    );
    assert_eq!(first.len(), 1);
    let jwks = keys::parse_cached(OPA_JWKS).unwrap();
    assert!(!std::rc::Rc::ptr_eq(&first, &jwks), "keyed on the text");
    // Both spellings verify OPA's example token, from the cache as before.
    for key in [OPA_CERT, OPA_JWKS] {
        for _ in 0..2 {
            assert_eq!(
                call("io.jwt.verify_es256", &[s(OPA_ES256_TOKEN), s(key)]),
                Ok(Value::Bool(true))
            );
        }
    }
    assert!(keys::parse_cached("not a key").is_err());
    assert!(
        keys::parse_cached("not a key").is_err(),
        "failures are not kept"
    );
}
