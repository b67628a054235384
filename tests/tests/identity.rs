//! Mesh identity end to end: `weft-cp serve` with a trust domain signs each
//! sidecar's certificate (the key made on the proxy, from a CSR); sidecars
//! call each other over strict mutual TLS; the callee's application learns
//! the caller's SPIFFE ID; whatever lacks a mesh certificate is refused and
//! counted; a CSR for an identity the node may not hold is refused; and
//! certificates rotate under traffic without a failed request.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use weft_proto::identity::v1::SignRequest;
use weft_proto::identity::v1::identity_service_client::IdentityServiceClient;
use weft_tests::xds::{CpProcess, TOKEN};
use weft_tests::*;

const DOMAIN: &str = "test.weft.local";

fn id(account: &str) -> String {
    format!("spiffe://{DOMAIN}/ns/default/sa/{account}")
}

/// An address nothing listens on now (the sidecar binds it next).
/// `alpha` calls `beta`; each workload has a real sidecar.
struct Mesh {
    cp: CpProcess,
    alpha: ProxyProcess,
    beta: ProxyProcess,
    /// alpha's outbound listener: its application calls beta here.
    alpha_out: SocketAddr,
    /// beta's inbound listener: strict mTLS.
    beta_in: SocketAddr,
    _dir: TempDir,
    _apps: [EchoServer; 2],
}

/// `weft-cp token issue` for `node`, into `out`.
fn issue_node_token(cp: &CpProcess, node: &str, out: &std::path::Path) {
    let output = std::process::Command::new(cp_binary())
        .args(["token", "issue", "--node-id", node, "--state-dir"])
        .arg(cp.state_dir())
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

async fn sidecar(cp: &CpProcess, node: &str, service: &str, dir: &TempDir) -> ProxyProcess {
    let token = dir.path().join(format!("{node}.token"));
    if cp.state_dir().join("node-token.key").exists() {
        // The control plane takes node tokens: each sidecar proves its own
        // node.
        issue_node_token(cp, node, &token);
    } else {
        std::fs::write(&token, TOKEN).unwrap();
    }
    let xds = cp.xds.to_string();
    let token = token.to_str().unwrap();
    let args = [
        "--xds",
        &xds,
        "--node-id",
        node,
        "--service",
        service,
        "--admin",
        "127.0.0.1:0",
        "--token-file",
        token,
    ];
    ProxyProcess::start_with_args(&args).await.unwrap()
}

impl Mesh {
    /// `beta` is spliced into the beta service's definition.
    async fn start(cp_args: &[&str], beta: &str) -> Self {
        let alpha_app = echo("alpha-app").await;
        let beta_app = echo("beta-app").await;
        let (alpha_in, alpha_out, beta_in) = (unused_address(), unused_address(), unused_address());
        let dir = TempDir::new().unwrap();
        std::fs::write(
            dir.path().join("mesh.yaml"),
            format!(
                r#"
trust_domain: {DOMAIN}
services:
  - name: alpha
    calls: [beta]
    workloads:
      - {{ name: alpha-1, app: "{}", inbound: "{alpha_in}", outbound: "{alpha_out}" }}
  - name: beta
{beta}    workloads:
      - {{ name: beta-1, app: "{}", inbound: "{beta_in}" }}
"#,
                alpha_app.local_addr(),
                beta_app.local_addr(),
            ),
        )
        .unwrap();
        let cp = CpProcess::start_with_args(dir.path(), loopback0(), loopback0(), cp_args)
            .await
            .unwrap();
        if cp_args.contains(&"--require-node-tokens") {
            assert!(cp.state_dir().join("node-token.key").exists());
        }
        // Ready means configured and holding a certificate.
        let beta = sidecar(&cp, "beta-1", "beta", &dir).await;
        let alpha = sidecar(&cp, "alpha-1", "alpha", &dir).await;
        Mesh {
            cp,
            alpha,
            beta,
            alpha_out,
            beta_in,
            _dir: dir,
            _apps: [alpha_app, beta_app],
        }
    }

    /// What alpha's application does: call beta through its sidecar.
    async fn call_beta(&self, forged_cert_header: Option<&str>) -> anyhow::Result<(u16, String)> {
        let mut request = http::Request::get("/hello")
            .header(http::header::HOST, "beta")
            .header("x-echo-headers", "1");
        if let Some(forged) = forged_cert_header {
            request = request.header("x-forwarded-client-cert", forged);
        }
        let response = http1_request(
            self.alpha_out,
            request.body(http_body_util::Empty::<bytes::Bytes>::new())?,
        )
        .await?;
        let status = response.status().as_u16();
        let cert = header(&response, "x-echo-req-x-forwarded-client-cert").to_owned();
        Ok((status, cert))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_call_each_other_over_mtls_with_certificates_from_the_control_plane() {
    let mesh = Mesh::start(&[], "").await;
    // The callee's application sees who called: the header is the
    // sidecar's, whatever the caller's application sent.
    let expected = format!("By={};URI={}", id("beta"), id("alpha"));
    for forged in [
        None,
        Some("URI=spiffe://test.weft.local/ns/default/sa/admin"),
    ] {
        let (status, cert) = mesh.call_beta(forged).await.unwrap();
        assert_eq!(status, 200, "{}", mesh.alpha.log());
        assert_eq!(cert, expected);
    }

    // Each sidecar holds the certificate for its own identity only, with
    // the CA's bundle, and says so (never a key).
    let (status, certs) = mesh.beta.admin_get("/certs").await.unwrap();
    assert_eq!(status, 200);
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(
        certs["workload_certificates"][0]["spiffe_id"],
        id("beta").as_str()
    );
    assert_eq!(certs["trust_bundles"][0]["trust_domain"], DOMAIN);
    assert!(!certs.to_string().contains("PRIVATE KEY"));
    assert_eq!(mesh.beta.metric("weft_identity_renewals_total").await, 1.0);
    assert_eq!(
        mesh.cp.metric("weft_cp_certificates_issued_total").await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_mesh_listener_refuses_clients_without_a_mesh_certificate() {
    let mesh = Mesh::start(&[], "").await;
    let failures = "weft_downstream_tls_handshake_failures_total{listener=\"inbound\"}";
    let before = mesh.beta.metric(failures).await;

    // Plaintext HTTP: the TLS handshake fails, nothing reaches the app.
    assert!(
        http1_request(mesh.beta_in, get(mesh.beta_in, "/"))
            .await
            .is_err()
    );

    // TLS without a client certificate, and with one from another CA for
    // the right trust domain: refused.
    let curl = |extra: &[&str]| {
        let mut command = std::process::Command::new("curl");
        command
            .args([
                "-sk",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
            ])
            .args(extra)
            .arg(format!("https://{}/", mesh.beta_in));
        command.output().unwrap()
    };
    let anonymous = curl(&[]);
    assert!(!anonymous.status.success(), "{anonymous:?}");
    let stranger = TempDir::new().unwrap();
    let foreign_ca = TempDir::new().unwrap();
    let issue_as = |spiffe_id: &str, state: &std::path::Path, out: &std::path::Path| {
        let output = std::process::Command::new(cp_binary())
            .args(["cert", "issue", "--spiffe-id", spiffe_id, "--state-dir"])
            .arg(state)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
    };
    let issue = |state: &std::path::Path, out: &std::path::Path| issue_as(&id("cli"), state, out);
    issue(&foreign_ca.path().join("state"), stranger.path());
    let pem = |dir: &TempDir, name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let foreign = curl(&[
        "--cert",
        &pem(&stranger, "cert.pem"),
        "--key",
        &pem(&stranger, "key.pem"),
    ]);
    assert!(!foreign.status.success(), "{foreign:?}");
    // Another trust domain's certificate is never judged by this domain's
    // bundle: refused.
    let elsewhere = TempDir::new().unwrap();
    let other_ca = TempDir::new().unwrap();
    issue_as(
        "spiffe://other.example/ns/default/sa/cli",
        &other_ca.path().join("state"),
        elsewhere.path(),
    );
    let other_domain = curl(&[
        "--cert",
        &pem(&elsewhere, "cert.pem"),
        "--key",
        &pem(&elsewhere, "key.pem"),
    ]);
    assert!(!other_domain.status.success(), "{other_domain:?}");

    // A certificate from the mesh's own CA (`weft-cp cert issue`, as a
    // job or an operator would get one) is let in, and the application
    // sees its identity.
    let client = TempDir::new().unwrap();
    issue(&mesh.cp.state_dir(), client.path());
    let output = std::process::Command::new("curl")
        .args([
            "-sk",
            "-H",
            "x-echo-headers: 1",
            "-D",
            "-",
            "-o",
            "/dev/null",
        ])
        .args([
            "--cert",
            &pem(&client, "cert.pem"),
            "--key",
            &pem(&client, "key.pem"),
        ])
        .arg(format!("https://{}/", mesh.beta_in))
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&output.stdout).to_ascii_lowercase();
    assert!(headers.starts_with("http/"), "{output:?}");
    assert!(headers.contains(" 200"), "{headers}");
    assert!(
        headers.contains(&format!(
            "x-echo-req-x-forwarded-client-cert: by={};uri={}",
            id("beta"),
            id("cli")
        )),
        "{headers}"
    );

    let after = mesh.beta.metric(failures).await;
    assert!(after >= before + 4.0, "before {before}, after {after}");
}

/// A signing request over the xDS port, as a proxy sends it.
async fn sign(cp: &CpProcess, node: &str, spiffe_id: &str) -> Result<String, tonic::Status> {
    sign_with(cp, TOKEN, node, spiffe_id).await
}

async fn sign_with(
    cp: &CpProcess,
    token: &str,
    node: &str,
    spiffe_id: &str,
) -> Result<String, tonic::Status> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        spiffe_id.to_owned().try_into().unwrap(),
    )];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let origin: http::Uri = format!("http://{}", cp.xds).parse().unwrap();
    let mut client = IdentityServiceClient::with_origin(
        GrpcChannel(http2_connect(cp.xds).await.unwrap()),
        origin,
    );
    let mut request = tonic::Request::new(SignRequest {
        node_id: node.to_owned(),
        csr_pem: csr,
        ttl: None,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client
        .sign(request)
        .await
        .map(|answer| answer.into_inner().cert_chain_pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_for_an_identity_the_node_may_not_hold_is_refused() {
    let mesh = Mesh::start(&[], "").await;
    // The node's own identity is signed.
    let chain = sign(&mesh.cp, "alpha-1", &id("alpha")).await.unwrap();
    assert!(chain.contains("BEGIN CERTIFICATE"));
    // Another service's identity, an unknown node, another trust domain.
    let cases = [
        (
            "alpha-1",
            id("beta"),
            tonic::Code::PermissionDenied,
            "may hold",
        ),
        (
            "nobody",
            id("alpha"),
            tonic::Code::PermissionDenied,
            "not in the mesh",
        ),
        (
            "alpha-1",
            "spiffe://other.example/ns/default/sa/alpha".to_owned(),
            tonic::Code::PermissionDenied,
            "may hold",
        ),
    ];
    for (node, asked, code, message) in cases {
        let refused = sign(&mesh.cp, node, &asked).await.unwrap_err();
        assert_eq!(refused.code(), code, "{node} {asked}: {refused:?}");
        assert!(refused.message().contains(message), "{refused:?}");
    }
    assert_eq!(mesh.cp.metric("weft_cp_csr_refused_total").await, 3.0);
    assert!(
        mesh.cp.log().contains("certificate signing refused"),
        "{}",
        mesh.cp.log()
    );
    // Without the bootstrap token, nothing is signed.
    let origin: http::Uri = format!("http://{}", mesh.cp.xds).parse().unwrap();
    let mut client = IdentityServiceClient::with_origin(
        GrpcChannel(http2_connect(mesh.cp.xds).await.unwrap()),
        origin,
    );
    let refused = client
        .sign(SignRequest {
            node_id: "alpha-1".into(),
            csr_pem: String::new(),
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_without_a_failed_request() {
    // Five-second certificates: each sidecar renews every 2 to 3 s.
    let mesh = Arc::new(Mesh::start(&["--svid-ttl", "5s"], "").await);
    let started = std::time::Instant::now();
    let first = mesh.beta.admin_get("/certs").await.unwrap().1;
    let renewed = eventually(std::time::Duration::from_secs(20), || {
        let mesh = mesh.clone();
        async move {
            // Requests keep flowing (new connections and pooled ones)
            // while both sides rotate.
            for _ in 0..5 {
                let (status, cert) = mesh.call_beta(None).await.unwrap();
                assert_eq!(
                    status,
                    200,
                    "BETA:\n{}\nALPHA:\n{}",
                    mesh.beta.log(),
                    mesh.alpha.log()
                );
                assert!(cert.ends_with(&id("alpha")), "{cert}");
            }
            mesh.beta.metric("weft_identity_renewals_total").await >= 3.0
                && mesh.alpha.metric("weft_identity_renewals_total").await >= 3.0
        }
    })
    .await;
    assert!(renewed, "{}", mesh.beta.log());
    let now = mesh.beta.admin_get("/certs").await.unwrap().1;
    let serial = |certs: &str| {
        let certs: serde_json::Value = serde_json::from_str(certs).unwrap();
        certs["workload_certificates"][0]["serial"].clone()
    };
    assert_ne!(serial(&first), serial(&now), "a new certificate serves");
    // Renewal waits for about half the remaining life (2 to 3 s here),
    // never a tight loop: at most one per 2 s, plus the first.
    let renewals = mesh.beta.metric("weft_identity_renewals_total").await;
    let bound = 2.0 + started.elapsed().as_secs_f64() / 2.0;
    assert!(
        renewals <= bound,
        "{renewals} renewals in {:?}",
        started.elapsed()
    );
    assert_eq!(
        mesh.beta
            .metric("weft_identity_renewal_failures_total")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissive_listener_serves_mesh_callers_over_mtls_and_plaintext_clients() {
    let mesh = Mesh::start(&[], "    mtls: permissive\n").await;
    // Sidecars still call over mTLS, and the callee learns who called.
    let (status, cert) = mesh.call_beta(None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(cert, format!("By={};URI={}", id("beta"), id("alpha")));
    // A plaintext client on the same port is served, with no identity:
    // a forged one is removed.
    let mut request = get(mesh.beta_in, "/");
    let headers = request.headers_mut();
    headers.insert("x-echo-headers", "1".parse().unwrap());
    headers.insert(
        "x-forwarded-client-cert",
        format!("URI={}", id("admin")).parse().unwrap(),
    );
    let response = http1_request(mesh.beta_in, request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-echo-req-x-forwarded-client-cert"), "");
    assert_eq!(header(&response, "x-echo-req-x-forwarded-proto"), "http");
    // TLS without a certificate is still refused: permissive means mTLS
    // or plaintext, never anonymous TLS.
    let anonymous = std::process::Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "--max-time", "5"])
        .arg(format!("https://{}/", mesh.beta_in))
        .output()
        .unwrap();
    assert!(!anonymous.status.success(), "{anonymous:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_tokens_prove_one_node_and_the_mesh_wide_token_can_be_refused() {
    let mesh = Mesh::start(&["--require-node-tokens"], "").await;
    // The mesh works with node tokens.
    let (status, cert) = mesh.call_beta(None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(cert, format!("By={};URI={}", id("beta"), id("alpha")));

    let dir = TempDir::new().unwrap();
    let alpha_token_file = dir.path().join("alpha.token");
    issue_node_token(&mesh.cp, "alpha-1", &alpha_token_file);
    let alpha_token = std::fs::read_to_string(&alpha_token_file).unwrap();
    let alpha_token = alpha_token.trim();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&alpha_token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // alpha-1's token signs alpha's identity only, never beta's node.
    assert!(
        sign_with(&mesh.cp, alpha_token, "alpha-1", &id("alpha"))
            .await
            .is_ok()
    );
    let refused = sign_with(&mesh.cp, alpha_token, "beta-1", &id("beta"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused
            .message()
            .contains("the token is for node \"alpha-1\""),
        "{refused:?}"
    );
    // The mesh-wide token no longer serves proxies...
    let refused = sign(&mesh.cp, "alpha-1", &id("alpha")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("node tokens only"),
        "{refused:?}"
    );

    // ... nor does a stolen token let a proxy pose as another node.
    let args = [
        "--xds",
        &mesh.cp.xds.to_string(),
        "--node-id",
        "beta-1",
        "--service",
        "beta",
        "--admin",
        "127.0.0.1:0",
        "--token-file",
        alpha_token_file.to_str().unwrap(),
    ];
    let impostor = ProxyProcess::start_with_args_unready(&args).await.unwrap();
    let refused = eventually(DEADLINE, || async {
        impostor.log().contains("the token is for node")
    })
    .await;
    assert!(refused, "{}", impostor.log());
    assert_eq!(impostor.admin_get("/ready").await.unwrap().0, 503);
    assert!(mesh.cp.metric("weft_cp_node_token_refusals_total").await >= 3.0);

    // A node token is not an operator's: the admin API refuses it.
    let request = http::Request::get("/status")
        .header(http::header::HOST, mesh.cp.admin.to_string())
        .header(http::header::AUTHORIZATION, format!("Bearer {alpha_token}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = http1_request(mesh.cp.admin, request).await.unwrap();
    assert_eq!(response.status(), 401);
}

/// Writes `contents` to `path` in one step (a rename), as a config
/// management tool would.
fn replace_file(path: &std::path::Path, contents: &[u8]) {
    let next = path.with_extension("next");
    std::fs::write(&next, contents).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// A sidecar's `/certs`, parsed.
async fn certs_of(proxy: &ProxyProcess) -> serde_json::Value {
    let (status, body) = proxy.admin_get("/certs").await.unwrap();
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_reaches_every_sidecar_over_xds_without_a_failed_request() {
    // Two CAs of the mesh's trust domain; the old one signs first.
    let cas = TempDir::new().unwrap();
    let old = weft_cp::ca::Ca::load_or_create(&cas.path().join("old"), DOMAIN).unwrap();
    let new = weft_cp::ca::Ca::load_or_create(&cas.path().join("new"), DOMAIN).unwrap();
    let (live_cert, live_key) = (cas.path().join("ca.pem"), cas.path().join("ca.key"));
    let bundle = cas.path().join("bundle.pem");
    let read = |dir: &str, file: &str| std::fs::read(cas.path().join(dir).join(file)).unwrap();
    replace_file(&live_cert, &read("old", "ca.pem"));
    replace_file(&live_key, &read("old", "ca.key"));
    replace_file(&bundle, old.root_pem().as_bytes());
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let (cert_arg, key_arg, bundle_arg) = (path(&live_cert), path(&live_key), path(&bundle));
    let mesh = Arc::new(
        Mesh::start(
            &[
                "--ca-cert",
                &cert_arg,
                "--ca-key",
                &key_arg,
                "--trust-bundle",
                &bundle_arg,
                "--poll-interval",
                "100ms",
            ],
            "",
        )
        .await,
    );
    for proxy in [&mesh.alpha, &mesh.beta] {
        let certs = certs_of(proxy).await;
        assert_eq!(certs["workload_certificates"][0]["signer"], old.signer());
        assert_eq!(certs["trust_bundles"][0]["signer"], old.signer());
    }

    // Requests flow through the whole rotation, on pooled connections and
    // new ones.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = tokio::spawn({
        let (mesh, stop) = (mesh.clone(), stop.clone());
        async move {
            let (mut ok, mut failed) = (0_u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok < 100_000 {
                match mesh.call_beta(None).await {
                    Ok((200, _)) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }
    });
    let all_sidecars = |check: fn(&serde_json::Value, &str) -> bool, value: String| {
        let mesh = mesh.clone();
        move || {
            let (mesh, value) = (mesh.clone(), value.clone());
            async move {
                check(&certs_of(&mesh.alpha).await, &value)
                    && check(&certs_of(&mesh.beta).await, &value)
            }
        }
    };
    let roots = |certs: &serde_json::Value, count: &str| {
        certs["trust_bundles"][0]["roots"].as_array().map(Vec::len) == count.parse::<usize>().ok()
    };
    let signed_by = |certs: &serde_json::Value, signer: &str| {
        certs["workload_certificates"][0]["signer"] == signer
            && certs["trust_bundles"][0]["signer"] == signer
    };
    let deadline = std::time::Duration::from_secs(20);

    // 1. The new root is trusted beside the old one.
    replace_file(&bundle, (old.root_pem() + &new.root_pem()).as_bytes());
    assert!(
        eventually(deadline, all_sidecars(roots, "2".into())).await,
        "{}",
        mesh.beta.log()
    );
    // 2. The new CA signs: every sidecar renews at once (the certificates
    //    are a day long; half life is far away).
    replace_file(&live_key, &read("new", "ca.key"));
    replace_file(&live_cert, &read("new", "ca.pem"));
    assert!(
        eventually(deadline, all_sidecars(signed_by, new.signer())).await,
        "{}\n{}",
        mesh.beta.log(),
        mesh.cp.log()
    );
    // 3. The old root is removed.
    replace_file(&bundle, new.root_pem().as_bytes());
    assert!(
        eventually(deadline, all_sidecars(roots, "1".into())).await,
        "{}",
        mesh.beta.log()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(ok > 10, "{ok} requests");
    assert_eq!(
        mesh.alpha
            .metric("weft_identity_renewal_failures_total")
            .await,
        0.0
    );

    // The old CA's certificates are no longer trusted: a client with one
    // is refused; one from the new CA is let in.
    let client = |ca: &weft_cp::ca::Ca| {
        let dir = TempDir::new().unwrap();
        let issued = ca
            .issue(&id("cli"), &[], std::time::Duration::from_secs(600))
            .unwrap();
        weft_cp::ca::write_issued(dir.path(), &issued, ca).unwrap();
        dir
    };
    let curl = |dir: &TempDir| {
        std::process::Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["--max-time", "5", "--cert"])
            .arg(dir.path().join("cert.pem"))
            .arg("--key")
            .arg(dir.path().join("key.pem"))
            .arg(format!("https://{}/", mesh.beta_in))
            .output()
            .unwrap()
    };
    let (old_client, new_client) = (client(&old), client(&new));
    let refused = curl(&old_client);
    assert!(!refused.status.success(), "{refused:?}");
    let admitted = curl(&new_client);
    assert_eq!(String::from_utf8_lossy(&admitted.stdout), "200");
}

/// Accepts the server's certificate unverified: the test checks the
/// identity it names itself, after the handshake.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A CSR for `spiffe_id` sent over mTLS to the xDS port with the
/// certificate in `dir` (`cert.pem`, `key.pem`) and no token; returns the
/// SPIFFE ID the control plane's own certificate names, and the answer.
async fn sign_over_mtls(
    cp: &CpProcess,
    dir: &std::path::Path,
    node: &str,
    spiffe_id: &str,
) -> (String, Result<String, tonic::Status>) {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_file_iter(dir.join("cert.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(cp.xds).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("weft-cp").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let server_leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, server) = x509_parser::parse_x509_certificate(&server_leaf).unwrap();
    let names = &server
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    let server_id = match &names[..] {
        [x509_parser::extensions::GeneralName::URI(uri)] => (*uri).to_owned(),
        other => panic!("the control plane's certificate names {other:?}"),
    };
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        spiffe_id.to_owned().try_into().unwrap(),
    )];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let origin: http::Uri = format!("http://{}", cp.xds).parse().unwrap();
    let mut client = IdentityServiceClient::with_origin(GrpcChannel(sender), origin);
    let answer = client
        .sign(SignRequest {
            node_id: node.to_owned(),
            csr_pem: csr,
            ttl: None,
        })
        .await
        .map(|answer| answer.into_inner().cert_chain_pem);
    (server_id, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_certified_a_sidecar_talks_to_the_control_plane_over_mtls_as_its_node() {
    // Node tokens are required: over cleartext nothing but a node's own
    // token is accepted.
    let mesh = Mesh::start(&["--require-node-tokens"], "").await;
    // Both sidecars moved their xDS streams to mTLS with their certificate,
    // and the control plane knows each by its identity.
    let on_mtls = eventually(std::time::Duration::from_secs(10), || async {
        let Ok(status) = mesh.cp.status().await else {
            return false;
        };
        let identity = |node: &str| {
            status
                .proxies
                .iter()
                .find(|p| p.node_id == node)
                .and_then(|p| p.identity.clone())
        };
        identity("alpha-1") == Some(id("alpha")) && identity("beta-1") == Some(id("beta"))
    })
    .await;
    assert!(
        on_mtls,
        "{:?}\n{}",
        mesh.cp.status().await,
        mesh.alpha.log()
    );
    // Requests still flow.
    assert_eq!(mesh.call_beta(None).await.unwrap().0, 200);

    // A certificate proves its node only: alpha's certificate renews
    // alpha, without a token, and may not act as beta.
    let alpha = TempDir::new().unwrap();
    let output = std::process::Command::new(cp_binary())
        .args(["cert", "issue", "--spiffe-id", &id("alpha"), "--state-dir"])
        .arg(mesh.cp.state_dir())
        .arg("--out")
        .arg(alpha.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let refusals = mesh.cp.metric("weft_cp_node_token_refusals_total").await;
    let (server_id, renewed) =
        sign_over_mtls(&mesh.cp, alpha.path(), "alpha-1", &id("alpha")).await;
    assert_eq!(server_id, format!("spiffe://{DOMAIN}/weft/control-plane"));
    assert!(renewed.unwrap().contains("BEGIN CERTIFICATE"));
    let (_, as_beta) = sign_over_mtls(&mesh.cp, alpha.path(), "beta-1", &id("beta")).await;
    let status = as_beta.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(&id("alpha")), "{status:?}");
    assert_eq!(
        mesh.cp.metric("weft_cp_node_token_refusals_total").await,
        refusals + 1.0
    );

    // A TLS client without a certificate is refused at the handshake.
    let before = mesh.cp.metric("weft_cp_xds_tls_refused_total").await;
    let output = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &mesh.cp.xds.to_string(), "-brief"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let _ = output;
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            mesh.cp.metric("weft_cp_xds_tls_refused_total").await > before
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_from_the_application_crosses_the_mesh_hop_as_multiplexed_http2() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = Arc::new(Mesh::start(&[], "").await);
    let connections = "weft_downstream_connections_total{listener=\"inbound\"}";
    let before = mesh.beta.metric(connections).await;
    // Twenty HTTP/1.1 requests at once, each on its own connection from
    // the application: one mTLS connection carries them all to beta.
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let mesh = mesh.clone();
            tokio::spawn(async move { mesh.call_beta(None).await.unwrap() })
        })
        .collect();
    for call in calls {
        let (status, cert) = call.await.unwrap();
        assert_eq!(status, 200);
        assert!(cert.ends_with(&id("alpha")), "{cert}");
    }
    let opened = mesh.beta.metric(connections).await - before;
    assert!(
        (1.0..=2.0).contains(&opened),
        "{opened} connections for 20 concurrent requests"
    );
    let (_, clusters) = mesh.alpha.admin_get("/clusters").await.unwrap();
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    assert_eq!(clusters[0]["protocol"], "auto", "{clusters}");

    // An upgrade still takes HTTP/1.1 across the hop, end to end.
    let mut stream = tokio::net::TcpStream::connect(mesh.alpha_out)
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: beta\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(DEADLINE, stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let message = b"\x81\x05hello";
    stream.write_all(message).await.unwrap();
    let mut back = [0_u8; 7];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_recover_from_a_control_plane_restarted_with_a_new_ca() {
    let mut mesh = Mesh::start(&[], "").await;
    assert_eq!(mesh.call_beta(None).await.unwrap().0, 200);
    let first_signer = certs_of(&mesh.beta).await["trust_bundles"][0]["signer"].clone();
    // The control plane comes back where the sidecars expect it, with a
    // fresh state directory: a new CA, which their certificates and
    // bundles know nothing of. mTLS to it fails; after a few attempts they
    // prove themselves with their tokens again, get the new bundle, and
    // re-sign.
    let dir = mesh._dir.path().to_owned();
    mesh.cp.restart_with_new_ca(&dir).await.unwrap();
    let recovered = eventually(std::time::Duration::from_secs(60), || async {
        let signer = certs_of(&mesh.beta).await["workload_certificates"][0]["signer"].clone();
        let alpha = certs_of(&mesh.alpha).await["workload_certificates"][0]["signer"].clone();
        signer != first_signer
            && alpha == signer
            && mesh
                .call_beta(None)
                .await
                .is_ok_and(|(status, _)| status == 200)
    })
    .await;
    assert!(
        recovered,
        "ALPHA:\n{}\nCP:\n{}",
        mesh.alpha.log(),
        mesh.cp.log()
    );
}

/// Sends one HTTP/1.1 request as opaque bytes over a plain connection to
/// `addr` and reads to the end: what a TCP client of the mesh does.
async fn raw_exchange(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /ledger HTTP/1.1\r\nhost: ledger\r\nconnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_service_is_called_over_mutual_tls_from_a_port_of_the_callers_sidecar() {
    let alpha_app = echo("alpha-app").await;
    // The ledger speaks bytes; an HTTP echo stands in for it, as opaque.
    let ledger_app = echo("ledger-app").await;
    let (alpha_in, alpha_tcp, ledger_in) = (unused_address(), unused_address(), unused_address());
    let dir = TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        format!(
            r#"
trust_domain: {DOMAIN}
istio_metrics: {{}}
services:
  - name: alpha
    calls: [ledger]
    workloads:
      - name: alpha-1
        app: "{}"
        inbound: "{alpha_in}"
        tcp_outbound: {{ ledger: "{alpha_tcp}" }}
  - name: ledger
    protocol: tcp
    workloads:
      - {{ name: ledger-1, app: "{}", inbound: "{ledger_in}" }}
"#,
            alpha_app.local_addr(),
            ledger_app.local_addr(),
        ),
    )
    .unwrap();
    let cp = CpProcess::start_with_args(dir.path(), loopback0(), loopback0(), &[])
        .await
        .unwrap();
    let ledger = sidecar(&cp, "ledger-1", "ledger", &dir).await;
    let alpha = sidecar(&cp, "alpha-1", "alpha", &dir).await;

    // The application's connection crosses the mesh hop inside mTLS.
    let answer = raw_exchange(alpha_tcp).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}\n{}",
        String::from_utf8_lossy(&answer),
        alpha.log()
    );
    assert_eq!(ledger_app.requests_served(), 1);

    // Both sidecars count the connection; the callee's names the caller's
    // proven identity.
    let (_, text) = ledger.admin_get("/metrics").await.unwrap();
    let opened = text
        .lines()
        .find(|line| {
            line.starts_with("istio_tcp_connections_opened_total{")
                && line.contains(&format!("source_principal=\"{}\"", id("alpha")))
        })
        .unwrap_or_else(|| panic!("no series for alpha:\n{text}"));
    assert!(opened.contains("source_workload=\"alpha\""), "{opened}");
    assert!(
        opened.contains("connection_security_policy=\"mutual_tls\""),
        "{opened}"
    );
    assert!(
        eventually(DEADLINE, || async {
            alpha
                .metric(r#"weft_downstream_received_bytes_total{listener="outbound.ledger"}"#)
                .await
                > 0.0
        })
        .await
    );

    // Straight to the ledger's sidecar without a mesh certificate: refused
    // before the application sees a byte.
    let refused = raw_exchange(ledger_in).await.unwrap_or_default();
    assert!(!refused.starts_with(b"HTTP"), "{refused:?}");
    assert_eq!(ledger_app.requests_served(), 1);
    assert!(
        eventually(DEADLINE, || async {
            ledger
                .metric(r#"weft_downstream_tls_handshake_failures_total{listener="inbound"}"#)
                .await
                == 1.0
        })
        .await
    );
}
