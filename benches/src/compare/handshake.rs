//! The handshake scenarios (`handshake`, `handshake-resume`): the
//! certificates every TLS listener serves, the kinds of handshake measured,
//! and the generator's TLS clients.
//!
//! # What it owns
//!
//! - [`HandshakeCerts`]: one mesh CA (made by `weft_cp::ca`, as for
//!   `weft-s2s-mtls`), one server certificate and one client certificate,
//!   all ECDSA P-256. weft, nginx and HAProxy serve the same certificate
//!   and key files, so the key type and chain are the same for all.
//! - [`HandshakeKind`]: mutual TLS with every handshake full, server-only
//!   TLS with every handshake full, and server-only TLS resuming sessions.
//! - [`ClientMaterial`]: what the generator's rustls clients are built from,
//!   loaded once; [`ClientMaterial::client`] builds a fresh client (with an
//!   empty session cache) for each round. The clients do not verify the
//!   server's certificate or signature, as h2load and `openssl s_time` do
//!   not: with ECDSA P-256 two signature checks cost a client more than the
//!   server's one signature, and the generator has one core to match the
//!   proxy's. The servers' work is the same either way (the mutual-TLS
//!   servers do verify the client's certificate).
//!
//! # What it leaves to others
//!
//! The listeners themselves are rendered by `proxies` (weft's `tls` and
//! `mtls` listeners, nginx's `ssl` servers, HAProxy's `ssl` binds); the
//! connections are made by [`load`](crate::load) with a new connection per
//! request.
//!
//! # Invariants callers rely on
//!
//! - Every handshake is TLS 1.3 (the servers are configured for 1.3 only,
//!   and so is the client) with ALPN `http/1.1`.
//! - Resumption is the client's choice: the server-only listeners allow it
//!   on every target, and only the [`HandshakeKind::Resumed`] client offers
//!   it. The mutual-TLS listeners allow none (weft refuses resumption with
//!   client certificates by design; nginx and HAProxy are configured
//!   without session tickets), and their client never offers it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::proxies::MeshCerts;
use crate::load::TlsClient;

/// The DNS name in the server certificate, which the generator sends as
/// SNI (every listener serves its one certificate whatever the name), so
/// that a verifying client (curl, `openssl s_client -verify_hostname`)
/// can check it by hand.
pub(crate) const SERVER_NAME: &str = "echo.bench.weft.local";

/// Certificate files of the handshake scenarios' listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HandshakeCerts {
    mesh: MeshCerts,
    /// HAProxy's `crt`: the server chain followed by its key.
    haproxy_pem: PathBuf,
}

impl HandshakeCerts {
    /// A fresh mesh CA in `dir/ca`, a server certificate (its SPIFFE ID and
    /// [`SERVER_NAME`]) and a client certificate, and HAProxy's combined
    /// file.
    pub(crate) fn create(dir: &Path) -> anyhow::Result<Self> {
        let mesh = MeshCerts::create(dir, &[SERVER_NAME.to_owned()])?;
        let mut combined = std::fs::read(mesh.server_cert())
            .with_context(|| format!("reading {}", mesh.server_cert().display()))?;
        combined.extend(
            std::fs::read(mesh.server_key())
                .with_context(|| format!("reading {}", mesh.server_key().display()))?,
        );
        let haproxy_pem = dir.join("server").join("haproxy.pem");
        weft_cp::ca::write_private_file(&haproxy_pem, &combined)?;
        Ok(Self { mesh, haproxy_pem })
    }

    /// The CA bundle that signs both certificates.
    pub(crate) fn ca(&self) -> &Path {
        self.mesh.ca()
    }

    /// The server certificate chain (leaf, then the CA).
    pub(crate) fn server_cert(&self) -> &Path {
        self.mesh.server_cert()
    }

    /// The server certificate's key.
    pub(crate) fn server_key(&self) -> &Path {
        self.mesh.server_key()
    }

    /// The server chain and key in one file (HAProxy).
    pub(crate) fn haproxy_pem(&self) -> &Path {
        &self.haproxy_pem
    }
}

/// The handshakes a run makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HandshakeKind {
    /// Mutual TLS: the client presents its certificate, every handshake is
    /// full.
    Mutual,
    /// Server-only TLS, every handshake full (the client never offers a
    /// session).
    Full,
    /// Server-only TLS, the client resuming sessions from its cache
    /// (TLS 1.3 PSK with ECDHE) whenever it holds a ticket.
    Resumed,
}

impl HandshakeKind {
    /// Every kind, in run order.
    pub(crate) const ALL: [Self; 3] = [Self::Mutual, Self::Full, Self::Resumed];

    /// Whether the client presents a certificate (and the mutual-TLS
    /// listeners are used).
    pub(crate) fn is_mutual(self) -> bool {
        self == Self::Mutual
    }

    /// The load run's id.
    pub(crate) fn run_id(self) -> &'static str {
        match self {
            Self::Mutual => "handshake-mtls-max",
            Self::Full => "handshake-tls-max",
            Self::Resumed => "handshake-resume-max",
        }
    }

    /// The handshake in words, for the run's title.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Mutual => {
                "mutual TLS 1.3 (ECDSA P-256, client certificate required and verified), \
                 full handshakes (no resumption)"
            }
            Self::Full => {
                "server-only TLS 1.3 (ECDSA P-256), full handshakes (client offers no session)"
            }
            Self::Resumed => {
                "server-only TLS 1.3 (ECDSA P-256), resumed handshakes (client offers a \
                 session ticket from the last connections)"
            }
        }
    }
}

/// The kinds of handshake a scenario measures, in run order.
pub(crate) fn kinds(scenario: super::Scenario) -> &'static [HandshakeKind] {
    match scenario {
        super::Scenario::Handshake => &[HandshakeKind::Mutual],
        super::Scenario::HandshakeResume => &[HandshakeKind::Full, HandshakeKind::Resumed],
        _ => &[],
    }
}

/// What the generator's TLS clients are built from: the client
/// certificate, read once.
#[derive(Debug)]
pub(crate) struct ClientMaterial {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ClientMaterial {
    /// Reads the client certificate and key of `certs`.
    pub(crate) fn load(certs: &HandshakeCerts) -> anyhow::Result<Self> {
        let client_cert = certs.mesh.client_cert();
        let chain = CertificateDer::pem_file_iter(client_cert)
            .with_context(|| format!("reading {}", client_cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", client_cert.display()))?;
        let client_key = certs.mesh.client_key();
        let key = PrivateKeyDer::from_pem_file(client_key)
            .with_context(|| format!("reading {}", client_key.display()))?;
        Ok(Self { chain, key })
    }

    /// A fresh TLS 1.3 client for `kind`, with ALPN `http/1.1` and its own
    /// session cache (so that nothing is resumed across rounds or
    /// targets). It does not check the server (see the module docs).
    pub(crate) fn client(&self, kind: HandshakeKind) -> anyhow::Result<TlsClient> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let unchecked = Arc::new(UncheckedServer(Arc::clone(&provider)));
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("the ring provider supports TLS 1.3")?
            .dangerous()
            .with_custom_certificate_verifier(unchecked);
        let mut config = if kind.is_mutual() {
            builder
                .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
                .context("the client certificate and key do not match")?
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if kind != HandshakeKind::Resumed {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(TlsClient {
            config: Arc::new(config),
            server_name: ServerName::try_from(SERVER_NAME)
                .context("the server name is a DNS name")?,
        })
    }
}

/// Accepts any server certificate and handshake signature: the load
/// generator's CPU goes into making handshakes, not checking them. It
/// offers the provider's signature schemes, as a verifying client would.
#[derive(Debug)]
struct UncheckedServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for UncheckedServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
