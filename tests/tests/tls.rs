//! TLS termination on HTTP listeners: certificates from PEM files chosen by
//! SNI, HTTP/1.1 or HTTP/2 by ALPN, `x-forwarded-proto: https`, failed
//! handshakes counted, bad files named in the error, and curl interop.

// Helpers outside #[test] functions unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_tests::*;

/// A test CA and the leaf certificates it signed, written as PEM files.
struct Pki {
    dir: TempDir,
    ca_der: CertificateDer<'static>,
    /// DER of each leaf, by file stem.
    leaves: Vec<(String, CertificateDer<'static>)>,
}

impl Pki {
    fn new(leaves: &[(&str, &[&str])]) -> Self {
        Self::with_uris(leaves, &[])
    }

    /// `clients`: (file stem, URI SANs) of client certificates.
    fn with_uris(leaves: &[(&str, &[&str])], clients: &[(&str, &[&str])]) -> Self {
        Self::with_client_life(leaves, clients, None)
    }

    /// As [`Pki::with_uris`]; client certificates expire `life` from now
    /// when given.
    fn with_client_life(
        leaves: &[(&str, &[&str])],
        clients: &[(&str, &[&str])],
        life: Option<std::time::Duration>,
    ) -> Self {
        let dir = TempDir::new().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "weft test ca");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut written = Vec::new();
        for (stem, names) in leaves {
            let key = rcgen::KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            let cert = rcgen::CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(dir.path().join(format!("{stem}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{stem}.key")), key.serialize_pem()).unwrap();
            written.push(((*stem).to_owned(), cert.der().clone()));
        }
        for (stem, uris) in clients {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            if let Some(life) = life {
                let now = std::time::SystemTime::now();
                params.not_before = (now - std::time::Duration::from_secs(60)).into();
                params.not_after = (now + life).into();
            }
            for uri in *uris {
                params
                    .subject_alt_names
                    .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
            }
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join(format!("{stem}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{stem}.key")), key.serialize_pem()).unwrap();
            written.push(((*stem).to_owned(), cert.der().clone()));
        }
        Self {
            dir,
            ca_der: ca.der().clone(),
            leaves: written,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn leaf(&self, stem: &str) -> &CertificateDer<'static> {
        &self.leaves.iter().find(|(s, _)| s == stem).unwrap().1
    }

    fn client(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        self.client_as(alpn, None)
    }

    /// A client presenting the certificate `stem` (from `other`'s CA when
    /// given), trusting this CA.
    fn client_as(
        &self,
        alpn: &[&[u8]],
        identity: Option<(&Pki, &str)>,
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((pki, stem)) => {
                use rustls_pki_types::pem::PemObject;
                let chain = vec![pki.leaf(stem).clone()];
                let key = rustls_pki_types::PrivateKeyDer::from_pem_file(
                    pki.path(&format!("{stem}.key")),
                )
                .unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

fn tls_config(pki: &Pki, echo: SocketAddr) -> String {
    let tls = format!(
        r#", tls: {{ certificates: [
        {{ cert_file: "{api}", key_file: "{api_key}", server_names: [api.example.com] }},
        {{ cert_file: "{wild}", key_file: "{wild_key}", server_names: ["*.example.com"] }},
        {{ cert_file: "{default}", key_file: "{default_key}" }} ] }} }}"#,
        api = pki.path("api.pem"),
        api_key = pki.path("api.key"),
        wild = pki.path("wild.pem"),
        wild_key = pki.path("wild.key"),
        default = pki.path("default.pem"),
        default_key = pki.path("default.key"),
    );
    one_route_config(echo, "http1", "")
        .replace("route_config: main }", &format!("route_config: main{tls}"))
}

fn standard_pki() -> Pki {
    Pki::new(&[
        ("api", &["api.example.com"]),
        ("wild", &["*.example.com"]),
        ("default", &["default.test"]),
    ])
}

async fn tls_connect(
    pki: &Pki,
    addr: SocketAddr,
    server_name: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    pki.client(alpn).connect(name, tcp).await.unwrap()
}

fn request(authority: &str, version: http::Version) -> http::Request<Full<Bytes>> {
    let uri = match version {
        http::Version::HTTP_2 => format!("https://{authority}/tls"),
        _ => "/tls".to_owned(),
    };
    let mut builder = http::Request::builder()
        .uri(uri)
        .version(version)
        .header("x-echo-headers", "1")
        // A client's claim is not believed: the connection says https.
        .header("x-forwarded-proto", "http");
    if version != http::Version::HTTP_2 {
        builder = builder.header(http::header::HOST, authority);
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn tls_listeners_serve_http1_and_http2_by_alpn_with_certificates_chosen_by_sni() {
    let pki = standard_pki();
    let echo = echo("tls").await;
    let proxy = ProxyProcess::start(&tls_config(&pki, echo.local_addr()))
        .await
        .unwrap();
    let web = proxy.listener("web");

    // HTTP/1.1 over TLS.
    let stream = tls_connect(&pki, web, "api.example.com", &[b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let served = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(&served, pki.leaf("api"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(request("api.example.com", http::Version::HTTP_11))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-echo-req-x-forwarded-proto"), "https");

    // HTTP/2 over TLS, chosen by ALPN; a wildcard name.
    let stream = tls_connect(&pki, web, "www.example.com", &[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        &stream.get_ref().1.peer_certificates().unwrap()[0],
        pki.leaf("wild")
    );
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(request("www.example.com", http::Version::HTTP_2))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(header(&response, "x-echo-req-x-forwarded-proto"), "https");

    // An unknown name gets the default certificate (which does not match
    // it, so a verifying client refuses; a client asking for the default
    // name is served).
    let tcp = TcpStream::connect(web).await.unwrap();
    let name = ServerName::try_from("unknown.org").unwrap();
    assert!(pki.client(&[]).connect(name, tcp).await.is_err());
    let stream = tls_connect(&pki, web, "default.test", &[]).await;
    assert_eq!(
        &stream.get_ref().1.peer_certificates().unwrap()[0],
        pki.leaf("default")
    );

    // `/certs` shows what each listener serves (never a key).
    let (status, certs) = proxy.admin_get("/certs").await.unwrap();
    assert_eq!(status, 200);
    assert!(!certs.contains("PRIVATE KEY"));
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    let served = certs["listener_certificates"].as_array().unwrap();
    assert_eq!(served.len(), 3, "{certs}");
    assert_eq!(served[0]["listener"], "web");
    assert_eq!(served[0]["cert_file"], pki.path("api.pem").as_str());
    assert_eq!(served[0]["expired"], false);
    assert!(served[0]["serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(served[0]["not_after"].as_str().is_some());
}

#[tokio::test]
async fn plaintext_to_a_tls_listener_is_refused_and_counted() {
    let pki = standard_pki();
    let echo = echo("tls").await;
    let proxy = ProxyProcess::start(&tls_config(&pki, echo.local_addr()))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let mut stream = TcpStream::connect(web).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out)).await;
    // The proxy closes (after a TLS alert at most); never an HTTP answer.
    assert!(read.is_ok(), "the connection is closed");
    assert!(
        !String::from_utf8_lossy(&out).contains("HTTP/1.1"),
        "{out:?}"
    );
    assert!(
        eventually(DEADLINE, || async {
            proxy
                .metric("weft_downstream_tls_handshake_failures_total{listener=\"web\"}")
                .await
                == 1.0
        })
        .await
    );
}

#[tokio::test]
async fn curl_trusts_the_listener_through_the_test_ca() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: curl is not installed");
        return;
    }
    let pki = standard_pki();
    let echo = echo("tls").await;
    let proxy = ProxyProcess::start(&tls_config(&pki, echo.local_addr()))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let resolve = format!("api.example.com:{}:127.0.0.1", web.port());
    let url = format!("https://api.example.com:{}/curl", web.port());
    let ca = pki.path("ca.pem");
    let output = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ])
        .args(["--cacert", &ca, "--resolve", &resolve, &url])
        .output()
        .await
        .unwrap();
    let written = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{written} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(written.starts_with("200 "), "{written}");
}

fn check_config(path: &Path) -> (bool, String) {
    let output = std::process::Command::new(proxy_binary())
        .arg("--check-config")
        .arg(path)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn unreadable_or_mismatched_key_files_are_named_in_the_error() {
    let pki = standard_pki();
    let echo: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let file = pki.dir.path().join("proxy.yaml");

    let missing = tls_config(&pki, echo).replace(&pki.path("api.key"), "/nonexistent/api.key");
    std::fs::write(&file, missing).unwrap();
    let (ok, stderr) = check_config(&file);
    assert!(!ok);
    assert!(
        stderr.contains(r#"listener "web": tls.certificates[0].key_file: cannot read a private key from "/nonexistent/api.key""#),
        "{stderr}"
    );

    let swapped = tls_config(&pki, echo).replace(&pki.path("api.key"), &pki.path("wild.key"));
    std::fs::write(&file, swapped).unwrap();
    let (ok, stderr) = check_config(&file);
    assert!(!ok);
    assert!(
        stderr.contains(r#"listener "web": tls.certificates[0].key_file:"#)
            && stderr.contains("does not match the certificate"),
        "{stderr}"
    );

    std::fs::write(&file, tls_config(&pki, echo)).unwrap();
    let (ok, stderr) = check_config(&file);
    assert!(ok, "{stderr}");
}

const CLIENT_ID: &str = "spiffe://weft.test/ns/default/sa/client";

fn mtls_pki() -> Pki {
    Pki::with_uris(
        &[("server", &["api.example.com"])],
        &[
            ("client", &[CLIENT_ID]),
            ("other", &["spiffe://weft.test/ns/default/sa/other"]),
            (
                "twice",
                &[CLIENT_ID, "spiffe://weft.test/ns/default/sa/other"],
            ),
        ],
    )
}

fn mtls_config(pki: &Pki, echo: SocketAddr, extra: &str) -> String {
    let tls = format!(
        r#", tls: {{ certificates: [{{ cert_file: "{cert}", key_file: "{key}" }}], client_ca_file: "{ca}"{extra} }} }}"#,
        cert = pki.path("server.pem"),
        key = pki.path("server.key"),
        ca = pki.path("ca.pem"),
    );
    one_route_config(echo, "http1", "")
        .replace("route_config: main }", &format!("route_config: main{tls}"))
}

/// Sends one HTTP/1.1 request over mutual TLS as `stem`; `Err` when the
/// connection is refused.
async fn mtls_get(
    pki: &Pki,
    web: SocketAddr,
    identity: Option<(&Pki, &str)>,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let tcp = TcpStream::connect(web).await.unwrap();
    let name = ServerName::try_from("api.example.com").unwrap();
    let stream = pki
        .client_as(&[b"http/1.1"], identity)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = request("api.example.com", http::Version::HTTP_11);
    // A client cannot claim an identity for itself.
    req.headers_mut().insert(
        "x-forwarded-client-cert",
        "URI=spiffe://weft.test/ns/x/sa/admin".parse().unwrap(),
    );
    tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn mutual_tls_passes_the_clients_spiffe_id_and_refuses_the_rest() {
    let pki = mtls_pki();
    let stranger = Pki::with_uris(&[], &[("client", &[CLIENT_ID])]);
    let echo = echo("mtls").await;
    let proxy = ProxyProcess::start(&mtls_config(&pki, echo.local_addr(), ""))
        .await
        .unwrap();
    let web = proxy.listener("web");

    let response = mtls_get(&pki, web, Some((&pki, "client"))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-echo-req-x-forwarded-client-cert"),
        format!("URI={CLIENT_ID}"),
        "set by the proxy, never the client's own"
    );

    // No certificate, or one from a CA the listener does not trust: the
    // handshake fails and is counted.
    assert!(mtls_get(&pki, web, None).await.is_err());
    assert!(
        mtls_get(&pki, web, Some((&stranger, "client")))
            .await
            .is_err()
    );
    assert!(
        eventually(DEADLINE, || async {
            proxy
                .metric("weft_downstream_tls_handshake_failures_total{listener=\"web\"}")
                .await
                == 2.0
        })
        .await
    );

    // Two URI SANs is not an X.509-SVID: refused after the handshake.
    assert!(mtls_get(&pki, web, Some((&pki, "twice"))).await.is_err());
    assert_eq!(
        proxy
            .metric("weft_downstream_tls_peer_refused_total{listener=\"web\"}")
            .await,
        1.0
    );
}

/// A server certificate and a client certificate (`CLIENT_ID`) that
/// expires in 2 to 3 s (X.509 times have a resolution of one second), made
/// once the proxy is built, so that its seconds are not spent on that.
async fn expiring_client_pki() -> Pki {
    tokio::task::spawn_blocking(proxy_binary).await.unwrap();
    Pki::with_client_life(
        &[("server", &["api.example.com"])],
        &[("client", &[CLIENT_ID])],
        Some(std::time::Duration::from_secs(3)),
    )
}

#[tokio::test]
async fn a_connection_is_closed_when_the_clients_certificate_expires() {
    let pki = expiring_client_pki().await;
    let echo = echo("expiry").await;
    let proxy = ProxyProcess::start(&mtls_config(&pki, echo.local_addr(), ""))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let tcp = TcpStream::connect(web).await.unwrap();
    let stream = pki
        .client_as(&[b"http/1.1"], Some((&pki, "client")))
        .connect(ServerName::try_from("api.example.com").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(conn);
    let started = std::time::Instant::now();
    let response = sender
        .send_request(request("api.example.com", http::Version::HTTP_11))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    // The keep-alive connection is idle, well within its idle timeout; the
    // proxy closes it when the certificate expires, not before.
    let closed = tokio::time::timeout(DEADLINE, connection).await;
    closed_at_expiry(&proxy, "web", closed.is_ok(), started).await;
    // A new connection with the expired certificate is refused (once the
    // second of its expiry has passed: validity includes that second).
    assert!(
        eventually(DEADLINE, || async {
            mtls_get(&pki, web, Some((&pki, "client"))).await.is_err()
        })
        .await
    );
}

#[tokio::test]
async fn allowed_identities_admit_only_the_listed_callers() {
    let pki = mtls_pki();
    let echo = echo("mtls").await;
    let extra = format!(r#", allowed_identities: ["{CLIENT_ID}"]"#);
    let proxy = ProxyProcess::start(&mtls_config(&pki, echo.local_addr(), &extra))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let response = mtls_get(&pki, web, Some((&pki, "client"))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(mtls_get(&pki, web, Some((&pki, "other"))).await.is_err());
    assert_eq!(
        proxy
            .metric("weft_downstream_tls_peer_refused_total{listener=\"web\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_route_can_match_the_callers_spiffe_id_and_the_access_log_names_it() {
    let pki = mtls_pki();
    let echo = echo("mtls").await;
    let log = TempDir::new().unwrap();
    let log_path = log.path().join("access.log");
    let config = mtls_config(&pki, echo.local_addr(), "")
        .replace(
            "routes: [{ name: all, cluster: echo }]",
            &format!(
                "routes: [{{ name: client-only, match: {{ source_identities: [\"{CLIENT_ID}\"] }}, \
                 direct_response: {{ status: 200, body: \"hello client\" }} }}, \
                 {{ name: all, cluster: echo }}]"
            ),
        )
        .replace(
            "admin: {",
            &format!(
                "access_log: {{ path: \"{}\" }}\nadmin: {{",
                log_path.display()
            ),
        );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let web = proxy.listener("web");
    let response = mtls_get(&pki, web, Some((&pki, "client"))).await.unwrap();
    assert_eq!(body_bytes(response).await.unwrap(), "hello client");
    // Another caller takes the next route; a forged header changes nothing.
    let response = mtls_get(&pki, web, Some((&pki, "other"))).await.unwrap();
    assert_eq!(header(&response, "x-echo-server"), "mtls");
    let logged = eventually(DEADLINE, || async {
        std::fs::read_to_string(&log_path)
            .is_ok_and(|text| text.lines().filter(|l| l.contains("peer_identity")).count() == 2)
    })
    .await;
    assert!(logged, "{:?}", std::fs::read_to_string(&log_path));
    let text = std::fs::read_to_string(&log_path).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["route"], "client-only");
    assert_eq!(first["peer_identity"], CLIENT_ID);
    // Counted by caller.
    let series = |id: &str| {
        format!("weft_http_requests_by_source_total{{listener=\"web\",source_identity=\"{id}\"}}")
    };
    assert_eq!(proxy.metric(&series(CLIENT_ID)).await, 1.0);
    assert_eq!(
        proxy
            .metric(&series("spiffe://weft.test/ns/default/sa/other"))
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_client_sent_forwarded_client_cert_never_reaches_the_upstream() {
    let echo = echo("plain").await;
    let proxy = ProxyProcess::start(&one_route_config(echo.local_addr(), "http1", ""))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let mut req = get(web, "/");
    req.headers_mut()
        .insert("x-echo-headers", "1".parse().unwrap());
    req.headers_mut().insert(
        "x-forwarded-client-cert",
        "URI=spiffe://weft.test/ns/x/sa/admin".parse().unwrap(),
    );
    let response = http1_request(web, req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-echo-req-x-forwarded-client-cert"), "");
}

const SERVER_ID: &str = "spiffe://weft.test/ns/default/sa/api";

/// Two proxies on the mesh hop: `outbound` (plain listener, a cluster
/// over mutual TLS) -> `inbound` (mutual TLS listener) -> echo.
async fn mesh_hop(
    pki: &Pki,
    echo: SocketAddr,
    protocol: &str,
    verify: &str,
) -> (ProxyProcess, ProxyProcess) {
    hop_with_server_cert(pki, echo, protocol, verify, "api-svid").await
}

/// As [`mesh_hop`], the inbound serving the certificate `server_cert`.
async fn hop_with_server_cert(
    pki: &Pki,
    echo: SocketAddr,
    protocol: &str,
    verify: &str,
    server_cert: &str,
) -> (ProxyProcess, ProxyProcess) {
    let inbound_tls = format!(
        r#", tls: {{ certificates: [{{ cert_file: "{cert}", key_file: "{key}" }}], client_ca_file: "{ca}" }} }}"#,
        cert = pki.path(&format!("{server_cert}.pem")),
        key = pki.path(&format!("{server_cert}.key")),
        ca = pki.path("ca.pem"),
    );
    let inbound = one_route_config(echo, "http1", "").replace(
        "route_config: main }",
        &format!("route_config: main{inbound_tls}"),
    );
    let inbound = ProxyProcess::start(&inbound).await.unwrap();
    let hop = inbound.listener("web");
    let outbound = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - {{ name: web, address: "127.0.0.1:0", route_config: main }}
route_configs:
  - name: main
    virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ name: all, cluster: api }}] }}]
clusters:
  - name: api
    protocol: {protocol}
    endpoints: [{{ address: "{hop}" }}]
    tls: {{ ca_file: "{ca}", cert_file: "{cert}", key_file: "{key}", {verify} }}
"#,
        ca = pki.path("ca.pem"),
        cert = pki.path("client.pem"),
        key = pki.path("client.key"),
    );
    let outbound = ProxyProcess::start(&outbound).await.unwrap();
    (outbound, inbound)
}

fn hop_pki() -> Pki {
    Pki::with_uris(
        &[("api", &["api.example.com"])],
        &[("client", &[CLIENT_ID]), ("api-svid", &[SERVER_ID])],
    )
}

#[tokio::test]
async fn a_cluster_over_mutual_tls_verifies_the_servers_spiffe_id_and_proves_its_own() {
    let pki = hop_pki();
    let echo = echo("hop").await;
    for protocol in ["http1", "http2"] {
        let verify = format!(r#"server_identity: "{SERVER_ID}""#);
        let (outbound, _inbound) = mesh_hop(&pki, echo.local_addr(), protocol, &verify).await;
        let web = outbound.listener("web");
        let mut req = get(web, "/hop");
        req.headers_mut()
            .insert("x-echo-headers", "1".parse().unwrap());
        let response = http1_request(web, req).await.unwrap();
        assert_eq!(response.status(), 200, "{protocol}");
        assert_eq!(
            header(&response, "x-echo-req-x-forwarded-client-cert"),
            format!("By={SERVER_ID};URI={CLIENT_ID}"),
            "{protocol}"
        );
    }
}

#[tokio::test]
async fn an_upstream_with_another_identity_is_refused_with_503() {
    let pki = hop_pki();
    let echo = echo("hop").await;
    let verify = r#"server_identity: "spiffe://weft.test/ns/default/sa/someone-else""#;
    let (outbound, _inbound) = mesh_hop(&pki, echo.local_addr(), "http1", verify).await;
    let web = outbound.listener("web");
    let response = http1_request(web, get(web, "/")).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "x-weft-error"), "upstream_tls_failure");
    assert_eq!(
        outbound
            .metric("weft_upstream_connect_failures_total{cluster=\"api\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_cluster_can_verify_a_dns_name_instead() {
    let pki = hop_pki();
    let echo = echo("hop").await;
    let verify = r#"server_name: api.example.com"#;
    let (outbound, _inbound) =
        hop_with_server_cert(&pki, echo.local_addr(), "http1", verify, "api").await;
    let web = outbound.listener("web");
    let response = http1_request(web, get(web, "/")).await.unwrap();
    assert_eq!(response.status(), 200);
    // The same server is refused under a name its certificate lacks.
    let verify = r#"server_name: db.example.com"#;
    let (outbound, _inbound) =
        hop_with_server_cert(&pki, echo.local_addr(), "http1", verify, "api").await;
    let web = outbound.listener("web");
    let response = http1_request(web, get(web, "/")).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "x-weft-error"), "upstream_tls_failure");
}

/// Runs `weft-cp cert issue` into `state/<stem>`.
fn cp_issue(state: &Path, id: &str, stem: &str, dns: Option<&str>) -> std::path::PathBuf {
    let out = state.join(stem);
    let mut command = std::process::Command::new(cp_binary());
    command
        .args(["cert", "issue", "--ttl", "1h", "--spiffe-id", id])
        .arg("--state-dir")
        .arg(state.join("ca"))
        .arg("--out")
        .arg(&out);
    if let Some(dns) = dns {
        command.args(["--dns-name", dns]);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

#[tokio::test]
async fn certificates_from_weft_cp_secure_a_hop_and_serve_curl_and_openssl() {
    let scratch = TempDir::new().unwrap();
    let state = scratch.path();
    let api = cp_issue(state, SERVER_ID, "api", Some("api.weft.test"));
    let client = cp_issue(state, CLIENT_ID, "client", None);
    let file = |dir: &Path, name: &str| dir.join(name).display().to_string();
    let echo = echo("cp-certs").await;
    let inbound_tls = format!(
        r#", tls: {{ certificates: [{{ cert_file: "{}", key_file: "{}" }}], client_ca_file: "{}" }} }}"#,
        file(&api, "cert.pem"),
        file(&api, "key.pem"),
        file(&api, "ca.pem"),
    );
    let inbound = one_route_config(echo.local_addr(), "http1", "").replace(
        "route_config: main }",
        &format!("route_config: main{inbound_tls}"),
    );
    let inbound = ProxyProcess::start(&inbound).await.unwrap();
    let hop = inbound.listener("web");
    let outbound = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners: [{{ name: web, address: "127.0.0.1:0", route_config: main }}]
route_configs:
  - name: main
    virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ name: all, cluster: api }}] }}]
clusters:
  - name: api
    protocol: http2
    endpoints: [{{ address: "{hop}" }}]
    tls: {{ ca_file: "{}", cert_file: "{}", key_file: "{}", server_identity: "{SERVER_ID}" }}
"#,
        file(&client, "ca.pem"),
        file(&client, "cert.pem"),
        file(&client, "key.pem"),
    );
    let outbound = ProxyProcess::start(&outbound).await.unwrap();
    let web = outbound.listener("web");
    let mut req = get(web, "/");
    req.headers_mut()
        .insert("x-echo-headers", "1".parse().unwrap());
    let response = http1_request(web, req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-echo-req-x-forwarded-client-cert"),
        format!("By={SERVER_ID};URI={CLIENT_ID}")
    );

    // curl, as the client certificate's holder, by the DNS name.
    let curl = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--cacert", &file(&client, "ca.pem")])
        .args([
            "--cert",
            &file(&client, "cert.pem"),
            "--key",
            &file(&client, "key.pem"),
        ])
        .args([
            "--resolve",
            &format!("api.weft.test:{}:127.0.0.1", hop.port()),
        ])
        .arg(format!("https://api.weft.test:{}/", hop.port()))
        .output()
        .await;
    match curl {
        Err(error) => eprintln!("skipped the curl check: {error}"),
        Ok(output) => assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "200",
            "{}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }

    // openssl s_client completes the mutual handshake and verifies the chain.
    let s_client = tokio::process::Command::new("openssl")
        .args(["s_client", "-brief", "-connect", &hop.to_string()])
        .args(["-CAfile", &file(&client, "ca.pem")])
        .args([
            "-cert",
            &file(&client, "cert.pem"),
            "-key",
            &file(&client, "key.pem"),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match s_client {
        Err(error) => eprintln!("skipped the openssl check: {error}"),
        Ok(output) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(text.contains("Verification: OK"), "{text}");
            assert!(text.contains("TLSv1.3"), "{text}");
        }
    }
}

/// Replaces `to` with `from`'s bytes as certificate tools do: written
/// beside, then renamed over.
fn replace_file(from: &str, to: &str) {
    let temporary = format!("{to}.new");
    std::fs::copy(from, &temporary).unwrap();
    std::fs::rename(&temporary, to).unwrap();
}

#[tokio::test]
async fn a_renewed_certificate_file_is_served_without_a_restart_and_a_bad_one_is_refused() {
    let pki = Pki::new(&[
        ("server", &["api.example.com"]),
        ("renewed", &["api.example.com"]),
    ]);
    let echo = echo("reload").await;
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("weft.yaml");
    let tls = format!(
        r#", tls: {{ certificates: [{{ cert_file: "{cert}", key_file: "{key}" }}] }} }}"#,
        cert = pki.path("server.pem"),
        key = pki.path("server.key"),
    );
    std::fs::write(
        &config,
        one_route_config(echo.local_addr(), "http1", "")
            .replace("route_config: main }", &format!("route_config: main{tls}")),
    )
    .unwrap();
    let proxy = ProxyProcess::start_with_args(&[
        "--config",
        config.to_str().unwrap(),
        "--reload-interval",
        "100ms",
    ])
    .await
    .unwrap();
    let web = proxy.listener("web");
    let served = || async {
        let stream = tls_connect(&pki, web, "api.example.com", &[b"http/1.1"]).await;
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    assert_eq!(&served().await, pki.leaf("server"));

    // The renewed certificate and key replace the old files: new
    // handshakes get it, with no restart and no SIGHUP.
    replace_file(&pki.path("renewed.key"), &pki.path("server.key"));
    replace_file(&pki.path("renewed.pem"), &pki.path("server.pem"));
    let renewed = eventually(DEADLINE, || async {
        &served().await == pki.leaf("renewed")
    })
    .await;
    assert!(renewed, "{}", proxy.log());
    assert!(proxy.metric("weft_config_reloads_total").await >= 1.0);

    // A key that does not match is refused, named, and the last good
    // certificate keeps serving.
    let failures = proxy.metric("weft_config_reload_failures_total").await;
    std::fs::write(
        dir.path().join("stray.key"),
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    replace_file(
        dir.path().join("stray.key").to_str().unwrap(),
        &pki.path("server.key"),
    );
    let refused = eventually(DEADLINE, || async {
        proxy.metric("weft_config_reload_failures_total").await > failures
    })
    .await;
    assert!(refused, "{}", proxy.log());
    assert!(
        proxy.log().contains("does not match the certificate"),
        "{}",
        proxy.log()
    );
    assert_eq!(&served().await, pki.leaf("renewed"));
}

// Multi-threaded: the echo upstreams live in this process and must answer
// while curl runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listeners_pass_tls_through_to_the_cluster_its_sni_names() {
    let pki = standard_pki();
    let (echo_a, echo_b) = (echo("a").await, echo("b").await);
    // Two TLS backends (weft proxies terminating TLS), each before its echo.
    let backend_a = ProxyProcess::start(&tls_config(&pki, echo_a.local_addr()))
        .await
        .unwrap();
    let backend_b = ProxyProcess::start(&tls_config(&pki, echo_b.local_addr()))
        .await
        .unwrap();
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: edge
    address: "127.0.0.1:0"
    protocol: tcp
    sni_routes:
      - {{ server_names: [api.example.com], cluster: a }}
      - {{ server_names: ["*.example.com"], cluster: b }}
clusters:
  - {{ name: a, endpoints: [{{ address: "{a}" }}] }}
  - {{ name: b, endpoints: [{{ address: "{b}" }}] }}
"#,
        a = backend_a.listener("web"),
        b = backend_b.listener("web"),
    );
    let edge = ProxyProcess::start(&config).await.unwrap();
    let addr = edge.listener("edge");

    for (name, leaf, server) in [
        ("api.example.com", "api", "a"),
        ("www.example.com", "wild", "b"),
    ] {
        // The certificate is the backend's: the edge did not terminate.
        let stream = tls_connect(&pki, addr, name, &[b"http/1.1"]).await;
        assert_eq!(
            &stream.get_ref().1.peer_certificates().unwrap()[0],
            pki.leaf(leaf)
        );
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let response = sender
            .send_request(request(name, http::Version::HTTP_11))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-echo-server"), server);
    }

    // curl agrees, through the edge, verifying the backend's certificate.
    let output = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg("--cacert")
        .arg(pki.path("ca.pem"))
        .arg("--resolve")
        .arg(format!("www.example.com:{}:127.0.0.1", addr.port()))
        .arg(format!("https://www.example.com:{}/", addr.port()))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "200",
        "{output:?}\n{}",
        edge.log()
    );

    // A name no route takes, and a client that does not speak TLS: closed
    // and counted.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("other.org").unwrap();
    assert!(pki.client(&[]).connect(name, tcp).await.is_err());
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, plain.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?} {rest:?}");
    assert_eq!(
        edge.metric("weft_downstream_tls_passthrough_unrouted_total{listener=\"edge\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn spans_and_metrics_reach_an_https_collector_verified_by_its_ca() {
    // The collector: the test's OTLP receiver behind a weft TLS listener
    // per transport (h2 for gRPC, HTTP/1.1 for OTLP/HTTP), its certificate
    // for `localhost` from the test CA.
    let pki = Pki::new(&[("collector", &["localhost"])]);
    let receiver = weft_cp::otlp::Receiver::bind(loopback0(), loopback0())
        .await
        .unwrap();
    let receiver_address = |url: String| {
        url.trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    };
    let tls = format!(
        r#"tls: {{ certificates: [{{ cert_file: "{}", key_file: "{}" }}] }}"#,
        pki.path("collector.pem"),
        pki.path("collector.key")
    );
    let front = ProxyProcess::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - {{ name: grpc, address: "127.0.0.1:0", route_config: grpc, {tls} }}
  - {{ name: http, address: "127.0.0.1:0", route_config: http, {tls} }}
route_configs:
  - {{ name: grpc, virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ name: all, cluster: otlp-grpc }}] }}] }}
  - {{ name: http, virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ name: all, cluster: otlp-http }}] }}] }}
clusters:
  - {{ name: otlp-grpc, protocol: http2, endpoints: [{{ address: "{}" }}] }}
  - {{ name: otlp-http, protocol: http1, endpoints: [{{ address: "{}" }}] }}
"#,
        receiver_address(receiver.grpc_url()),
        receiver_address(receiver.http_url()),
    ))
    .await
    .unwrap();
    let echo = echo("a").await;
    let ca = pki.path("ca.pem");
    let exporting = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
metrics_export:
  collector: "https://localhost:{grpc}"
  ca_file: "{ca}"
  interval: 1s
  service_name: secure-metrics
listeners:
  - name: web
    address: "127.0.0.1:0"
    route_config: main
    tracing: {{ collector: "https://localhost:{http}", protocol: http, ca_file: "{ca}", service_name: secure-spans, flush_interval: 20ms }}
route_configs:
  - {{ name: main, virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ name: all, cluster: echo }}] }}] }}
clusters:
  - {{ name: echo, endpoints: [{{ address: "{echo}" }}] }}
"#,
        grpc = front.listener("grpc").port(),
        http = front.listener("http").port(),
        echo = echo.local_addr(),
    );
    let proxy = ProxyProcess::start(&exporting).await.unwrap();
    let web = proxy.listener("web");
    let response = http1_request(web, get(web, "/")).await.unwrap();
    assert_eq!(response.status(), 200);
    let (spans, arrived) = receiver
        .wait_for(DEADLINE, |spans| {
            spans.iter().any(|s| s.service == "secure-spans")
        })
        .await;
    assert!(arrived, "{spans:?}");
    assert!(
        eventually(DEADLINE, || async {
            receiver
                .metrics()
                .keys()
                .any(|(service, _)| service == "secure-metrics")
        })
        .await
    );

    // A collector whose certificate the configured CA did not sign gets
    // nothing: the export fails, it is never sent in the clear.
    let other = Pki::new(&[("unused", &["localhost"])]);
    let untrusted = exporting.replace(&ca, &other.path("ca.pem"));
    let proxy = ProxyProcess::start(&untrusted).await.unwrap();
    assert!(
        eventually(DEADLINE, || async {
            proxy
                .metric(r#"weft_metrics_exports_total{result="failed"}"#)
                .await
                >= 1.0
        })
        .await
    );
    assert_eq!(
        proxy
            .metric(r#"weft_metrics_exports_total{result="ok"}"#)
            .await,
        0.0
    );
}

/// A TLS server on loopback that echoes each connection's bytes until the
/// client closes, with the `stem` certificate of `pki`.
async fn tls_echo(pki: &Pki, stem: &str) -> SocketAddr {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(pki.path(&format!("{stem}.pem")))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key =
        rustls_pki_types::PrivateKeyDer::from_pem_file(pki.path(&format!("{stem}.key"))).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut read, mut write) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_tcp_listener_to_a_tls_cluster_counts_the_bytes_inside_the_tls() {
    let pki = standard_pki();
    let upstream = tls_echo(&pki, "api").await;
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - {{ name: raw, address: "127.0.0.1:0", protocol: tcp, cluster: api }}
clusters:
  - name: api
    endpoints: [{{ address: "{upstream}" }}]
    tls: {{ ca_file: "{ca}", server_name: api.example.com }}
"#,
        ca = pki.path("ca.pem"),
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let mut stream = TcpStream::connect(proxy.listener("raw")).await.unwrap();
    stream.write_all(&[7; 5000]).await.unwrap();
    let mut back = vec![0; 5000];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, [7; 5000]);
    // The bytes the client and the proxy exchanged, not the TLS records the
    // proxy wrote upstream; counted as they move.
    let sent = r#"weft_downstream_sent_bytes_total{listener="raw"}"#;
    let received = r#"weft_downstream_received_bytes_total{listener="raw"}"#;
    assert!(
        eventually(DEADLINE, || async { proxy.metric(sent).await == 5000.0 }).await,
        "{sent}"
    );
    assert_eq!(proxy.metric(received).await, 5000.0);
}

/// Sends an HTTP/1.1 request over TLS to a TCP listener as `identity` and
/// reads to the end; `Err` when the handshake fails.
async fn opaque_exchange(
    pki: &Pki,
    addr: SocketAddr,
    identity: Option<(&Pki, &str)>,
) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("api.example.com").unwrap();
    let mut stream = pki
        .client_as(&[], identity)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let exchange = async {
        stream
            .write_all(b"GET /l4 HTTP/1.1\r\nhost: db\r\nconnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        std::io::Result::Ok(answer)
    };
    // A refused connection may also end in a reset: nothing came back.
    Ok(tokio::time::timeout(DEADLINE, exchange)
        .await
        .map_err(|_| "timed out".to_owned())?
        .unwrap_or_default())
}

#[tokio::test]
async fn a_tcp_listener_terminates_mutual_tls_and_its_policy_and_metrics_see_the_client() {
    let pki = mtls_pki();
    let echo = echo("tcp-mtls").await;
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
policies:
  - name: only-client
    rego: |
      package l4id
      import rego.v1
      default allow := false
      allow if input.attributes.source.principal == "{CLIENT_ID}"
    query: data.l4id.allow
listeners:
  - name: db
    address: "127.0.0.1:0"
    protocol: tcp
    cluster: echo
    policy: only-client
    tls: {{ certificates: [{{ cert_file: "{cert}", key_file: "{key}" }}], client_ca_file: "{ca}" }}
    istio_metrics: {{ reporter: destination, workload: {{ name: db, service: db.data }} }}
  - name: migrating
    address: "127.0.0.1:0"
    protocol: tcp
    cluster: echo
    tls: {{ certificates: [{{ cert_file: "{cert}", key_file: "{key}" }}], client_ca_file: "{ca}", mode: permissive }}
clusters:
  - {{ name: echo, endpoints: [{{ address: "{echo}" }}] }}
"#,
        cert = pki.path("server.pem"),
        key = pki.path("server.key"),
        ca = pki.path("ca.pem"),
        echo = echo.local_addr(),
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let db = proxy.listener("db");

    // The client the policy names: its bytes go through the TLS both ways.
    let answer = opaque_exchange(&pki, db, Some((&pki, "client")))
        .await
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // Another identity from the same CA completes the handshake; the
    // policy refuses it before anything reaches the upstream.
    let served = echo.requests_served();
    let refused = opaque_exchange(&pki, db, Some((&pki, "other")))
        .await
        .unwrap();
    assert!(refused.is_empty(), "{}", String::from_utf8_lossy(&refused));
    assert_eq!(echo.requests_served(), served);

    // No certificate, or plaintext: no handshake, counted. (Under TLS 1.3
    // the client may finish its part before the proxy refuses it.)
    let anonymous = opaque_exchange(&pki, db, None).await;
    assert!(anonymous.as_ref().is_ok_and(Vec::is_empty) || anonymous.is_err());
    let mut plain = TcpStream::connect(db).await.unwrap();
    plain
        .write_all(b"GET /l4 HTTP/1.1\r\nhost: db\r\n\r\n")
        .await
        .unwrap();
    // At most a TLS alert comes back.
    let mut alert = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, plain.read_to_end(&mut alert)).await;
    assert!(!alert.starts_with(b"HTTP"), "{alert:?}");
    assert_eq!(echo.requests_served(), served);
    let failures = r#"weft_downstream_tls_handshake_failures_total{listener="db"}"#;
    assert!(
        eventually(DEADLINE, || async { proxy.metric(failures).await == 2.0 }).await,
        "{failures}"
    );
    for (series, want) in [
        (
            r#"weft_policy_decisions_total{policy="only-client",result="allow"}"#,
            1.0,
        ),
        (
            r#"weft_policy_decisions_total{policy="only-client",result="deny"}"#,
            1.0,
        ),
    ] {
        assert_eq!(proxy.metric(series).await, want, "{series}");
    }
    // A permissive listener serves plaintext clients and TLS ones on one
    // port, told apart by the first byte.
    let migrating = proxy.listener("migrating");
    let mut plain = TcpStream::connect(migrating).await.unwrap();
    plain
        .write_all(b"GET /l4 HTTP/1.1\r\nhost: db\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, plain.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let answer = opaque_exchange(&pki, migrating, Some((&pki, "client")))
        .await
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");

    // Istio's destination reporter names the caller its certificate proved.
    let (_, text) = proxy.admin_get("/metrics").await.unwrap();
    let opened = text
        .lines()
        .find(|line| {
            line.starts_with("istio_tcp_connections_opened_total{")
                && line.contains(&format!("source_principal=\"{CLIENT_ID}\""))
        })
        .unwrap_or_else(|| panic!("no series for the client:\n{text}"));
    assert!(
        opened.contains("connection_security_policy=\"mutual_tls\""),
        "{opened}"
    );
    assert!(opened.ends_with(" 1"), "{opened}");
}

#[tokio::test]
async fn a_tcp_connection_is_closed_when_the_clients_certificate_expires() {
    let pki = expiring_client_pki().await;
    // An upstream that echoes, and never closes on its own.
    let upstream = TcpEchoServer::bind(loopback0()).await.unwrap();
    let upstream_addr = upstream.local_addr();
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: db
    address: "127.0.0.1:0"
    protocol: tcp
    cluster: echo
    tls: {{ certificates: [{{ cert_file: "{cert}", key_file: "{key}" }}], client_ca_file: "{ca}" }}
clusters:
  - {{ name: echo, endpoints: [{{ address: "{upstream_addr}" }}] }}
"#,
        cert = pki.path("server.pem"),
        key = pki.path("server.key"),
        ca = pki.path("ca.pem"),
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let tcp = TcpStream::connect(proxy.listener("db")).await.unwrap();
    let mut stream = pki
        .client_as(&[], Some((&pki, "client")))
        .connect(ServerName::try_from("api.example.com").unwrap(), tcp)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    stream.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    // Nothing more is sent: the connection stays well within its idle
    // timeout, and the proxy closes it when the certificate expires.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await;
    closed_at_expiry(&proxy, "db", closed.is_ok(), started).await;
}

/// A connection `closed` (or not) by the proxy, started at `started` with
/// a client certificate valid for about a second: it was closed, not before
/// the certificate expired, and counted on `listener`.
async fn closed_at_expiry(
    proxy: &ProxyProcess,
    listener: &str,
    closed: bool,
    started: std::time::Instant,
) {
    assert!(closed, "still open after {:?}", started.elapsed());
    let after = started.elapsed();
    assert!(
        after >= std::time::Duration::from_secs(1),
        "closed after {after:?}, before the certificate expired"
    );
    let series = format!("weft_downstream_tls_peer_expired_total{{listener=\"{listener}\"}}");
    assert_eq!(proxy.metric(&series).await, 1.0);
}
