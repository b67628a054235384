//! The mesh's certificate authority: one CA per trust domain, whose key
//! never leaves the control plane, issuing X.509-SVIDs (certificates whose
//! one URI SAN is a SPIFFE ID).
//!
//! The CA is created on first use under a state directory (`ca.pem`, and
//! `ca.key` with mode 0600 in a 0700 directory), or given by the operator
//! (`--ca-cert FILE --ca-key FILE`, a root or an intermediate whose file
//! holds its chain). The trust domain is the CA certificate's own URI SAN
//! (`spiffe://<trust-domain>`), so a CA never signs for another domain.
//!
//! `weft-cp cert issue` uses it today for clients and sidecars configured
//! from files; the identity service that signs proxies' CSRs builds on it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// The longest certificate `issue` signs.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// A new root CA's lifetime.
const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long before now, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA could not be loaded, created or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key did not parse, or signing failed.
    #[error("{path}: {message}")]
    Invalid {
        /// The file (or what was being made).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The SPIFFE ID is malformed or of another trust domain, or a CSR
    /// asks for an identity it may not hold.
    #[error("{0}")]
    Identity(String),
    /// A CSR does not parse or its signature does not verify.
    #[error("the CSR is not valid: {0}")]
    Csr(String),
}

/// A loaded CA.
#[derive(Debug)]
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and its chain (PEM), the trust bundle clients
    /// and proxies verify against.
    bundle_pem: String,
    trust_domain: String,
}

/// A certificate issued by the CA, with its fresh key.
#[derive(Debug)]
pub struct Issued {
    /// The leaf, then the CA's chain (PEM).
    pub chain_pem: String,
    /// The private key (PEM). Written 0600; never logged.
    pub key_pem: String,
    /// When it expires.
    pub not_after: SystemTime,
}

impl Ca {
    /// Loads the CA from `state_dir`, or creates one for `trust_domain`
    /// there on first use. An existing CA of another trust domain is an
    /// error, never silently replaced.
    pub fn load_or_create(state_dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let cert_path = state_dir.join("ca.pem");
        let key_path = state_dir.join("ca.key");
        if cert_path.exists() || key_path.exists() {
            let ca = Self::from_files(&cert_path, &key_path)?;
            if ca.trust_domain != trust_domain {
                return Err(CaError::Identity(format!(
                    "{}: the CA there is for trust domain {:?}, not {trust_domain:?}",
                    state_dir.display(),
                    ca.trust_domain
                )));
            }
            return Ok(ca);
        }
        if !is_trust_domain(trust_domain) {
            return Err(CaError::Identity(format!(
                "{trust_domain:?} is not a trust domain (lower-case letters, digits, '-', '.', '_')"
            )));
        }
        create_private_dir(state_dir)?;
        let key = KeyPair::generate().map_err(|e| invalid(&key_path, &e))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| invalid(&cert_path, &e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "weft");
        name.push(DnType::CommonName, format!("weft mesh CA {trust_domain}"));
        params.distinguished_name = name;
        let uri = format!("spiffe://{trust_domain}");
        params.subject_alt_names = vec![SanType::URI(
            uri.try_into().map_err(|e| invalid(&cert_path, &e))?,
        )];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_TTL).into();
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(|e| invalid(&cert_path, &e))?;
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(trust_domain, path = %state_dir.display(), "certificate authority created");
        Ok(Self {
            issuer: Issuer::new(params, key),
            bundle_pem: cert.pem(),
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// Loads a CA the operator gives: `cert` holds the CA certificate
    /// first, then its chain up to the root (for an intermediate); `key`
    /// its private key.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let bundle_pem = read(cert)?;
        let key_pem = read(key)?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| invalid(key, &e))?;
        let first = pem_blocks(&bundle_pem)
            .next()
            .ok_or_else(|| CaError::Invalid {
                path: cert.to_owned(),
                message: "holds no PEM certificate".into(),
            })?;
        let trust_domain = trust_domain_of(&first).map_err(|message| CaError::Invalid {
            path: cert.to_owned(),
            message,
        })?;
        check_key_matches(&first, &key_pair).map_err(|message| CaError::Invalid {
            path: key.to_owned(),
            message,
        })?;
        let issuer = Issuer::from_ca_cert_pem(&first, key_pair).map_err(|e| invalid(cert, &e))?;
        Ok(Self {
            issuer,
            bundle_pem,
            trust_domain,
        })
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// SHA-256 (lower-case hex) of the CA certificate that signs: what a
    /// trust bundle names as its `signer` while this CA signs.
    pub fn signer(&self) -> String {
        pem_blocks(&self.bundle_pem)
            .next()
            .and_then(|pem| {
                let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
                Some(sha256_hex(&block.contents))
            })
            .unwrap_or_default()
    }

    /// The trust bundle (PEM).
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The root of the CA's chain (PEM): what peers trust. For a CA the
    /// control plane created, the CA itself; for an operator's
    /// intermediate, the last certificate of its file.
    pub fn root_pem(&self) -> String {
        pem_blocks(&self.bundle_pem)
            .last()
            .unwrap_or_else(|| self.bundle_pem.clone())
    }

    /// Issues an X.509-SVID for `spiffe_id` with a fresh key: exactly one
    /// URI SAN, no subject, client and server authentication, valid for
    /// `ttl` (at most [`MAX_TTL`]). `dns_names` are added as DNS SANs, for
    /// clients that verify a host name (curl, browsers) rather than the
    /// SPIFFE ID.
    pub fn issue(
        &self,
        spiffe_id: &str,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<Issued, CaError> {
        let what = PathBuf::from(spiffe_id);
        let key = KeyPair::generate().map_err(|e| invalid(&what, &e))?;
        let (params, not_after) = self.leaf_params(spiffe_id, dns_names, ttl)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| invalid(&what, &e))?;
        let mut chain_pem = cert.pem();
        chain_pem.push_str(&self.bundle_pem);
        Ok(Issued {
            chain_pem,
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    /// Signs a proxy's CSR (PEM) for `spiffe_id`, the identity the caller
    /// may hold. The CSR's signature must verify (the caller holds the
    /// key), and it must ask for exactly that identity: one URI SAN and no
    /// other name. Nothing else of the CSR is used: the certificate's
    /// extensions, lifetime and serial are the CA's, as in [`Ca::issue`].
    /// Returns the chain (leaf first, PEM) and its expiry.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        ttl: Duration,
    ) -> Result<(String, SystemTime), CaError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                SanType::DnsName(name) => format!("DNS:{}", name.as_str()),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [spiffe_id] {
            return Err(CaError::Identity(format!(
                "the CSR asks for {asked:?}; this caller may hold {spiffe_id:?} only"
            )));
        }
        let (params, not_after) = self.leaf_params(spiffe_id, &[], ttl)?;
        let signed = rcgen::CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(|e| invalid(Path::new(spiffe_id), &e))?;
        let mut chain_pem = signed.pem();
        chain_pem.push_str(&self.bundle_pem);
        Ok((chain_pem, not_after))
    }

    /// The parameters of an X.509-SVID for `spiffe_id`, valid from a
    /// minute ago for `ttl`.
    fn leaf_params(
        &self,
        spiffe_id: &str,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(CertificateParams, SystemTime), CaError> {
        let domain = weft_proxy::config::spiffe_trust_domain(spiffe_id).ok_or_else(|| {
            CaError::Identity(format!(
                "{spiffe_id:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)"
            ))
        })?;
        if domain != self.trust_domain {
            return Err(CaError::Identity(format!(
                "{spiffe_id:?} is in trust domain {domain:?}; this CA signs for {:?} only",
                self.trust_domain
            )));
        }
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(CaError::Identity(format!(
                "ttl {} is out of range (1s to {})",
                humantime::format_duration(ttl),
                humantime::format_duration(MAX_TTL)
            )));
        }
        let what = PathBuf::from(spiffe_id);
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| invalid(&what, &e))?;
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            spiffe_id
                .to_owned()
                .try_into()
                .map_err(|e| invalid(&what, &e))?,
        )];
        for name in dns_names {
            if !weft_proxy::config::is_valid_domain(name) || name.starts_with('*') {
                return Err(CaError::Identity(format!("{name:?} is not a DNS name")));
            }
            params.subject_alt_names.push(SanType::DnsName(
                name.clone().try_into().map_err(|e| invalid(&what, &e))?,
            ));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_after = now + ttl;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        Ok((params, not_after))
    }
}

/// Writes an issued certificate to `dir`: `cert.pem` (leaf and chain),
/// `key.pem` (0600) and `ca.pem` (the trust bundle). Returns the paths.
pub fn write_issued(dir: &Path, issued: &Issued, ca: &Ca) -> Result<[PathBuf; 3], CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let bundle = dir.join("ca.pem");
    write_file(&key, issued.key_pem.as_bytes(), 0o600)?;
    write_file(&cert, issued.chain_pem.as_bytes(), 0o644)?;
    write_file(&bundle, ca.bundle_pem().as_bytes(), 0o644)?;
    Ok([cert, key, bundle])
}

/// One certificate of a PEM file, as `weft-cp cert inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Subject DN (empty for an X.509-SVID).
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// URI SANs (an SVID has one, its SPIFFE ID).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Serial number, hex.
    pub serial: String,
    /// Validity, RFC 3339.
    pub not_before: String,
    /// Validity, RFC 3339.
    pub not_after: String,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
}

/// Summarises every certificate in a PEM text; keys are skipped (and
/// never shown).
pub fn inspect(pem: &str) -> Result<Vec<Summary>, String> {
    let mut out = Vec::new();
    for (i, block) in pem_blocks(pem).enumerate() {
        let (_, parsed) = x509_parser::pem::parse_x509_pem(block.as_bytes())
            .map_err(|e| format!("certificate {}: {e}", i + 1))?;
        let cert = parsed
            .parse_x509()
            .map_err(|e| format!("certificate {}: {e}", i + 1))?;
        let (mut uris, mut dns_names) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        dns_names.push((*dns).to_owned());
                    }
                    _ => {}
                }
            }
        }
        let time = |t: x509_parser::time::ASN1Time| {
            let system = SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0));
            humantime::format_rfc3339_seconds(system).to_string()
        };
        out.push(Summary {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            uris,
            dns_names,
            serial: cert.raw_serial_as_string(),
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
            is_ca: cert.is_ca(),
        });
    }
    if out.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(out)
}

/// SHA-256 of `bytes`, lower-case hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// Whether `key` is the private key of the certificate `cert_pem`: a CA
/// file replaced by halves (the certificate renamed into place before the
/// key) must not sign certificates nobody can verify.
fn check_key_matches(cert_pem: &str, key: &KeyPair) -> Result<(), String> {
    use rcgen::PublicKeyData as _;
    let (_, block) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| format!("certificate: {e}"))?;
    let cert = block
        .parse_x509()
        .map_err(|e| format!("certificate: {e}"))?;
    if cert.public_key().raw == key.subject_public_key_info().as_slice() {
        Ok(())
    } else {
        Err("is not the key of the CA certificate".into())
    }
}

/// The certificate blocks of a PEM text, each with its armour.
pub(crate) fn pem_blocks(pem: &str) -> impl Iterator<Item = String> + '_ {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    pem.match_indices(BEGIN).filter_map(move |(start, _)| {
        let end = pem[start..].find(END)? + start + END.len();
        Some(format!("{}\n", &pem[start..end]))
    })
}

/// The trust domain of a CA certificate: its `spiffe://<domain>` URI SAN.
fn trust_domain_of(pem: &str) -> Result<String, String> {
    let summary = inspect(pem)?;
    let first = summary.first().ok_or("no certificate")?;
    if !first.is_ca {
        return Err("is not a CA certificate".into());
    }
    first
        .uris
        .iter()
        .find_map(|uri| uri.strip_prefix("spiffe://").filter(|d| is_trust_domain(d)))
        .map(str::to_owned)
        .ok_or_else(|| {
            "has no spiffe://<trust-domain> URI SAN naming the domain it signs for".into()
        })
}

fn is_trust_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

fn random_serial() -> SerialNumber {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    // Serials are unpredictable, as the CA/Browser baseline asks of
    // public CAs; should the system generator fail, a weaker one still
    // gives unique serials.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        fastrand::fill(&mut bytes);
    }
    // Positive, as DER integers for serials must be.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn invalid(path: &Path, error: &dyn std::fmt::Display) -> CaError {
    CaError::Invalid {
        path: path.to_owned(),
        message: error.to_string(),
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |source| CaError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)
}

/// Writes a secret file (mode 0600), replacing any file there.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_file(path, contents, 0o600)
}

/// Writes a secret file (mode 0600) in `dir`, created 0700 if missing.
pub(crate) fn write_secret(dir: &Path, path: &Path, contents: &[u8]) -> Result<(), CaError> {
    create_private_dir(dir)?;
    write_file(path, contents, 0o600)
}

/// Writes a new file with `mode`; an existing file is replaced only by
/// writing a fresh one beside it and renaming, so that a key is never
/// readable with a wider mode, even for a moment.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_ca_is_created_once_and_reloaded_with_its_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let ca = Ca::load_or_create(&state, "example.org").unwrap();
        assert_eq!(ca.trust_domain(), "example.org");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state.join("ca.key")), 0o600);
        assert_eq!(mode(&state), 0o700);
        let again = Ca::load_or_create(&state, "example.org").unwrap();
        assert_eq!(
            again.bundle_pem(),
            ca.bundle_pem(),
            "the same CA, not a new one"
        );
        let other = Ca::load_or_create(&state, "other.org").unwrap_err();
        assert!(other.to_string().contains("not \"other.org\""), "{other}");
    }

    #[test]
    fn issued_certificates_are_svids_of_the_cas_domain_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "example.org").unwrap();
        let id = "spiffe://example.org/ns/shop/sa/web";
        let issued = ca
            .issue(
                id,
                &["web.shop.example.org".to_owned()],
                Duration::from_secs(3600),
            )
            .unwrap();
        let certs = inspect(&issued.chain_pem).unwrap();
        assert_eq!(certs.len(), 2, "leaf then CA");
        assert_eq!(certs[0].uris, [id]);
        assert_eq!(certs[0].dns_names, ["web.shop.example.org"]);
        assert_eq!(certs[0].subject, "");
        assert!(!certs[0].is_ca);
        assert_eq!(certs[0].issuer, certs[1].subject);
        assert!(certs[1].is_ca);
        assert!(issued.key_pem.contains("PRIVATE KEY"));
        let refused = |id: &str, ttl: u64| {
            ca.issue(id, &[], Duration::from_secs(ttl))
                .unwrap_err()
                .to_string()
        };
        assert!(
            refused("spiffe://other.org/ns/a/sa/b", 60)
                .contains("this CA signs for \"example.org\" only")
        );
        assert!(refused("https://example.org/x", 60).contains("is not a SPIFFE ID"));
        assert!(refused(id, 0).contains("out of range"));
    }

    fn csr(sans: Vec<SanType>, is_ca: bool) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        if is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_csr_is_signed_for_the_callers_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "example.org").unwrap();
        let id = "spiffe://example.org/ns/shop/sa/web";
        let uri = |id: &str| SanType::URI(id.to_owned().try_into().unwrap());
        // Asking to be a CA is ignored: the certificate's extensions are
        // the CA's own choice.
        let (chain, not_after) = ca
            .sign_csr(&csr(vec![uri(id)], true), id, Duration::from_secs(600))
            .unwrap();
        let certs = inspect(&chain).unwrap();
        assert_eq!(certs[0].uris, [id]);
        assert!(!certs[0].is_ca);
        assert_eq!(certs[0].issuer, certs[1].subject);
        assert!(not_after > SystemTime::now() + Duration::from_secs(590));
        let refused = |sans: Vec<SanType>| {
            ca.sign_csr(&csr(sans, false), id, Duration::from_secs(600))
                .unwrap_err()
                .to_string()
        };
        let other = "spiffe://example.org/ns/shop/sa/admin";
        assert!(refused(vec![uri(other)]).contains("may hold"));
        assert!(refused(vec![uri(id), uri(other)]).contains("may hold"));
        assert!(refused(vec![]).contains("may hold"));
        assert!(
            refused(vec![
                uri(id),
                SanType::DnsName("web.example.org".try_into().unwrap())
            ])
            .contains("DNS:web.example.org")
        );
        let garbage = ca
            .sign_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                id,
                Duration::from_secs(60),
            )
            .unwrap_err();
        assert!(
            garbage.to_string().contains("the CSR is not valid"),
            "{garbage}"
        );
    }

    #[test]
    fn an_operator_ca_from_files_signs_for_its_domain() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path(), "corp.example").unwrap();
        let ca = Ca::from_files(&dir.path().join("ca.pem"), &dir.path().join("ca.key")).unwrap();
        assert_eq!(ca.trust_domain(), "corp.example");
        let out = dir.path().join("out");
        let issued = ca
            .issue("spiffe://corp.example/job", &[], Duration::from_secs(60))
            .unwrap();
        let [cert, key, bundle] = write_issued(&out, &issued, &ca).unwrap();
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(cert.exists() && bundle.exists());
        let missing =
            Ca::from_files(&dir.path().join("nope.pem"), &dir.path().join("ca.key")).unwrap_err();
        assert!(missing.to_string().contains("nope.pem"), "{missing}");
    }
}
