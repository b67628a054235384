//! `weft-cp serve` and `weft-cp demo` as real processes: a mesh directory's
//! changes reach the proxies, a bad change is rejected with the last good
//! state kept, proxies ride out a control-plane restart, and the demo runs.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use weft_tests::xds::{CpProcess, TOKEN};
use weft_tests::*;

/// Two services whose only workloads are reached at the echo servers
/// (standing in for their sidecars), and a gateway on port 0.
fn services(alpha: SocketAddr, beta: SocketAddr) -> String {
    format!(
        r#"
services:
  - name: alpha
    workloads:
      - {{ name: alpha-1, app: "127.0.0.1:1", inbound: "{alpha}" }}
  - name: beta
    workloads:
      - {{ name: beta-1, app: "127.0.0.1:2", inbound: "{beta}" }}
"#
    )
}

fn gateway(service: &str) -> String {
    format!(
        r#"
gateways:
  - name: gw
    listeners:
      - name: http
        address: "127.0.0.1:0"
        routes:
          - {{ name: all, service: {service} }}
"#
    )
}

/// Replaces a file atomically, as editors and config management do.
fn write(dir: &Path, name: &str, text: &str) {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, dir.join(name)).unwrap();
}

async fn served_by(addr: SocketAddr) -> Option<String> {
    let response = http1_request(addr, get(addr, "/")).await.ok()?;
    (response.status() == 200).then(|| header(&response, "x-echo-server").to_owned())
}

struct Mesh {
    dir: TempDir,
    cp: CpProcess,
    proxy: ProxyProcess,
    web: SocketAddr,
    _echoes: [EchoServer; 2],
}

impl Mesh {
    async fn start() -> Self {
        let alpha = echo("alpha").await;
        let beta = echo("beta").await;
        let dir = TempDir::new().unwrap();
        write(
            dir.path(),
            "services.yaml",
            &services(alpha.local_addr(), beta.local_addr()),
        );
        write(dir.path(), "gateway.yaml", &gateway("alpha"));
        let cp = CpProcess::start(dir.path()).await.unwrap();
        let proxy = ProxyProcess::start_xds(cp.xds, "gw", Some(TOKEN))
            .await
            .unwrap();
        let web = proxy.bound_listener("http").await.unwrap();
        Self {
            dir,
            cp,
            proxy,
            web,
            _echoes: [alpha, beta],
        }
    }

    async fn routes_to(&self, name: &str) -> bool {
        eventually(DEADLINE, || async {
            served_by(self.web).await.as_deref() == Some(name)
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_file_change_reaches_the_proxy_and_changes_routing() {
    let mesh = Mesh::start().await;
    assert_eq!(served_by(mesh.web).await.as_deref(), Some("alpha"));
    write(mesh.dir.path(), "gateway.yaml", &gateway("beta"));
    assert!(mesh.routes_to("beta").await, "cp log:\n{}", mesh.cp.log());
    let status = mesh.cp.status().await.unwrap();
    assert_eq!(status.proxies.len(), 1);
    assert_eq!(status.proxies[0].node_id, "gw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_mesh_change_is_rejected_and_the_last_good_state_kept() {
    let mesh = Mesh::start().await;
    write(mesh.dir.path(), "gateway.yaml", &gateway("gamma"));
    let rejected = eventually(DEADLINE, || async {
        mesh.cp
            .status()
            .await
            .ok()
            .and_then(|s| s.config_error)
            .is_some_and(|e| e.contains("gateway.yaml") && e.contains("\"gamma\""))
    })
    .await;
    assert!(
        rejected,
        "status shows the rejection; cp log:\n{}",
        mesh.cp.log()
    );
    assert_eq!(served_by(mesh.web).await.as_deref(), Some("alpha"));

    // `weft-cp validate` reports the same problem and fails.
    let output = std::process::Command::new(cp_binary())
        .arg("validate")
        .arg(mesh.dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("gateway.yaml") && stderr.contains("gamma"),
        "{stderr}"
    );

    // Fixed, it is applied and the error clears.
    write(mesh.dir.path(), "gateway.yaml", &gateway("beta"));
    assert!(mesh.routes_to("beta").await);
    assert_eq!(mesh.cp.status().await.unwrap().config_error, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_serving_through_a_control_plane_restart() {
    let mut mesh = Mesh::start().await;
    let (xds, admin) = (mesh.cp.xds, mesh.cp.admin);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, ok, failed, web) = (stop.clone(), ok.clone(), failed.clone(), mesh.web);
        tokio::spawn(async move {
            // Bounded in count as well as by the test's own steps.
            for _ in 0..100_000 {
                if stop.load(Relaxed) {
                    break;
                }
                match served_by(web).await {
                    Some(_) => ok.fetch_add(1, Relaxed),
                    None => failed.fetch_add(1, Relaxed),
                };
            }
        })
    };
    let before = ok.load(Relaxed);
    assert!(eventually(DEADLINE, || async { ok.load(Relaxed) > before + 20 }).await);

    mesh.cp.kill().await;
    let during = ok.load(Relaxed);
    assert!(eventually(DEADLINE, || async { ok.load(Relaxed) > during + 50 }).await);

    // A change made while the control plane was down reaches the proxy
    // once it is back (the proxy reconnects with backoff).
    write(mesh.dir.path(), "gateway.yaml", &gateway("beta"));
    mesh.cp = CpProcess::start_at(mesh.dir.path(), xds, admin)
        .await
        .unwrap();
    assert!(
        mesh.routes_to("beta").await,
        "proxy log:\n{}",
        mesh.proxy.log()
    );
    stop.store(true, Relaxed);
    traffic.await.unwrap();
    assert_eq!(failed.load(Relaxed), 0, "no request failed");
    assert!(ok.load(Relaxed) > 70);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_a_mesh_end_to_end_and_ctrl_c_stops_every_process() {
    // The demo mesh uses fixed ports (config/demo): skip if they are taken.
    let gateway: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    if std::net::TcpListener::bind(gateway).is_err() {
        eprintln!("skipped: {gateway} (the demo gateway's port) is in use");
        return;
    }
    let mut demo = tokio::process::Command::new(cp_binary())
        .args(["demo", "--rate", "5", "--duration", "60s", "--proxy-binary"])
        .arg(proxy_binary())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut admins = Vec::new();
    let mut token_file = None;
    let mut banner = Vec::new();
    let up = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            banner.push(line.clone());
            if let Some((_, path)) = line.split_once(" --token-file ") {
                token_file = Some(std::path::PathBuf::from(path.trim()));
            }
            if let Some(url) = line
                .split_whitespace()
                .find(|w| w.starts_with("http://") && w.ends_with("/config_dump"))
            {
                let address = url
                    .trim_start_matches("http://")
                    .trim_end_matches("/config_dump");
                admins.push(address.parse::<SocketAddr>().unwrap());
            }
            if line.starts_with("Ctrl-C stops everything") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(up.ok(), Some(true), "the demo prints its banner");
    assert_eq!(admins.len(), 7, "six sidecars and a gateway");
    // The banner draws one request's trace: the gateway, the frontend's
    // sidecar, its application's calls out through its sidecar, and the
    // backend's and echo's sidecars, as one tree (each hop indented under
    // the span that called it).
    let banner = banner.join("\n");
    let waterfall: Vec<&str> = banner
        .lines()
        .skip_while(|l| !l.starts_with("One request's trace"))
        .skip(1)
        .take_while(|l| l.starts_with("  ") && l.contains('|'))
        .collect();
    let rows: Vec<&str> = waterfall.iter().map(|l| l.trim_start()).collect();
    for expected in [
        "ingress server GET frontend",
        "ingress client GET frontend",
        "frontend server GET",
        "frontend client GET",
        "backend server GET",
        "echo server GET",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(expected)),
            "{expected:?} missing:\n{banner}"
        );
    }
    assert!(waterfall[0].starts_with("  ingress server"), "{banner}");
    assert!(
        waterfall
            .iter()
            .any(|l| l.starts_with(&format!("{}backend server", " ".repeat(14)))),
        "backend's server span sits six levels under the gateway's (gateway, \
         frontend inbound, frontend outbound, each a server and a client span):\n{banner}"
    );
    // Then who called whom, from Istio's standard metrics on each callee's
    // sidecar (demo/mesh.yaml turns them on).
    for edge in [
        "ingress -> frontend",
        "frontend -> backend-v",
        "frontend -> echo",
    ] {
        assert!(
            banner
                .lines()
                .skip_while(|l| !l.starts_with("Calls so far, from Istio's standard metrics"))
                .any(|l| l.trim_start().starts_with(edge) && l.contains(" 200 ")),
            "{edge:?} missing:\n{banner}"
        );
    }
    // The ledger is a TCP service: its connections are counted too.
    assert!(
        banner
            .lines()
            .skip_while(|l| !l.starts_with("Calls so far, from Istio's standard metrics"))
            .any(|l| l.trim_start().starts_with("frontend -> ledger") && l.contains(" tcp ")),
        "frontend -> ledger (tcp) missing:\n{banner}"
    );
    let frontend_admin: SocketAddr = banner
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("frontend-1 "))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
        .and_then(|url| {
            url.trim_start_matches("http://")
                .trim_end_matches("/config_dump")
                .parse()
                .ok()
        })
        .expect("the banner lists frontend-1's admin address");
    let svg = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("(also drawn in "))
        .and_then(|l| l.strip_suffix(')'))
        .expect("the banner names the SVG");
    assert!(std::fs::read_to_string(svg).unwrap().starts_with("<svg"));
    let svg = std::path::PathBuf::from(svg);
    // The bootstrap token is readable by its owner only.
    let token_file = token_file.expect("the banner names the token file");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{}", token_file.display());
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    // gateway -> frontend sidecar -> frontend app -> its outbound sidecar
    // listener -> backend and echo sidecars -> their apps.
    let response = http1_request(gateway, get(gateway, "/frontend/hello"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = String::from_utf8(body_bytes(response).await.unwrap().to_vec()).unwrap();
    assert!(body.starts_with("frontend (workload frontend-1"), "{body}");
    assert!(
        body.contains("-> backend: 200 OK backend (workload backend-v"),
        "{body}"
    );
    assert!(
        body.contains("-> echo: 200 OK echo (workload echo-1"),
        "{body}"
    );
    // The gateway's TCP listener reaches the ledger too (its policy lets
    // the gateway's identity in).
    let ledger_line = async {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect("127.0.0.1:15001").await?;
        stream.write_all(b"balance from outside\n").await?;
        let mut line = String::new();
        tokio::io::BufReader::new(stream)
            .read_line(&mut line)
            .await?;
        std::io::Result::Ok(line)
    };
    let line = tokio::time::timeout(DEADLINE, ledger_line)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        line,
        "ledger (workload ledger-1) answered \"balance from outside\" over tcp\n"
    );
    // The frontend's application also asked the ledger, a TCP service,
    // on its sidecar's port for it (over mutual TLS between sidecars).
    assert!(
        body.contains(
            "-> ledger: ledger (workload ledger-1) answered \"balance for /hello\" over tcp"
        ),
        "{body}"
    );
    // That request, traced from the gateway on, replaces the drawing.
    assert!(
        eventually(DEADLINE, || async {
            std::fs::read_to_string(&svg)
                .is_ok_and(|t| t.contains("the latest GET /frontend/") && t.contains("echo server"))
        })
        .await,
        "{}",
        std::fs::read_to_string(&svg).unwrap_or_default()
    );
    // The frontend's sidecar reports both sides in Istio's terms: as the
    // callee of the gateway (over mutual TLS, the caller known by the
    // identity it proved) and as the caller of backend and echo.
    let metrics = http1_request(frontend_admin, get(frontend_admin, "/metrics"))
        .await
        .unwrap();
    let metrics = String::from_utf8(body_bytes(metrics).await.unwrap().to_vec()).unwrap();
    let series = |labels: &[&str]| {
        metrics
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .any(|l| labels.iter().all(|label| l.contains(label)))
    };
    assert!(
        series(&[
            r#"reporter="destination""#,
            r#"source_workload="ingress""#,
            r#"source_principal="spiffe://demo.weft.local/ns/default/sa/ingress""#,
            r#"destination_workload="frontend""#,
            r#"destination_principal="spiffe://demo.weft.local/ns/default/sa/frontend""#,
            r#"destination_service="frontend.default""#,
            r#"response_code="200""#,
            r#"connection_security_policy="mutual_tls""#,
            r#"source_cluster="demo""#,
        ]),
        "{metrics}"
    );
    assert!(
        series(&[
            r#"reporter="source""#,
            r#"source_workload="frontend""#,
            r#"destination_service="echo.default""#,
            r#"destination_principal="spiffe://demo.weft.local/ns/default/sa/echo""#,
            r#"response_flags="-""#,
        ]),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE istio_request_duration_milliseconds histogram"),
        "{metrics}"
    );
    // Each proxy also pushes its metrics to the demo's receiver, as its
    // bootstrap says: the sidecar counts the exports the receiver took.
    assert!(
        banner.contains("Every proxy also pushes its metrics over OTLP"),
        "{banner}"
    );
    let exported = r#"weft_metrics_exports_total{result="ok"} "#;
    assert!(
        eventually(DEADLINE, || async {
            let Ok(response) = http1_request(frontend_admin, get(frontend_admin, "/metrics")).await
            else {
                return false;
            };
            let text = String::from_utf8(body_bytes(response).await.unwrap().to_vec()).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix(exported))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|v| v >= 1.0)
        })
        .await,
        "no metrics export from frontend-1"
    );
    // Every hop is mutual TLS with certificates from the control plane:
    // each application names the caller its sidecar verified.
    assert!(
        body.lines().next().unwrap().ends_with(
            "answered GET /hello (caller: spiffe://demo.weft.local/ns/default/sa/ingress)"
        ),
        "{body}"
    );
    assert_eq!(
        body.matches("(caller: spiffe://demo.weft.local/ns/default/sa/frontend)")
            .count(),
        2,
        "{body}"
    );
    // The demo's policy (policies.yaml, backend-authz.rego): backend's
    // sidecars refuse DELETE, with the decision's body and headers.
    let response = http1_request(
        gateway,
        request(gateway, "DELETE", "/backend/items", bytes::Bytes::new()),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(header(&response, "x-weft-error"), "policy_denied");
    assert_eq!(header(&response, "x-denied-by"), "backend-authz");
    let body = body_bytes(response).await.unwrap();
    assert_eq!(&body[..], b"backend does not accept DELETE\n");
    let mut canary = get(gateway, "/backend/x");
    canary
        .headers_mut()
        .insert("x-canary", "1".parse().unwrap());
    let response = http1_request(gateway, canary).await.unwrap();
    assert_eq!(header(&response, "x-demo-workload"), "backend-v2");
    // backend-v2 fails one request in four on purpose; the backend
    // service's retries hide it from every caller.
    for _ in 0..12 {
        let mut canary = get(gateway, "/backend/x");
        canary
            .headers_mut()
            .insert("x-canary", "1".parse().unwrap());
        let response = http1_request(gateway, canary).await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let mut retried = 0.0;
    for admin in &admins {
        let response = http1_request(*admin, get(*admin, "/metrics"))
            .await
            .unwrap();
        let text = String::from_utf8(body_bytes(response).await.unwrap().to_vec()).unwrap();
        retried += text
            .lines()
            .filter(|l| l.starts_with("weft_upstream_retries_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    assert!(retried >= 3.0, "{retried} retries");
    // The callers of backend probe its workloads (GET /healthz through
    // their sidecars, over mutual TLS) and find them healthy.
    let probed = eventually(DEADLINE, || async {
        let mut healthy = 0.0;
        for admin in &admins {
            let Ok(response) = http1_request(*admin, get(*admin, "/metrics")).await else {
                continue;
            };
            let text = String::from_utf8(body_bytes(response).await.unwrap().to_vec()).unwrap();
            healthy += text
                .lines()
                .filter(|l| l.starts_with("weft_upstream_endpoints_healthy{cluster=\"backend.v"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        // frontend and ingress each reach backend.v1 and backend.v2.
        healthy >= 4.0
    })
    .await;
    if !probed {
        let mut views = String::new();
        for admin in &admins {
            if let Ok(response) = http1_request(*admin, get(*admin, "/clusters")).await {
                views.push_str(&String::from_utf8_lossy(
                    &body_bytes(response).await.unwrap(),
                ));
                views.push('\n');
            }
        }
        panic!("backend's workloads are not all seen healthy:\n{views}");
    }

    let _ = std::process::Command::new("kill")
        .args(["-INT", &demo.id().unwrap().to_string()])
        .status();
    let status = tokio::time::timeout(DEADLINE, demo.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        !token_file.exists(),
        "{} is removed at exit",
        token_file.display()
    );
    for address in admins.into_iter().chain([gateway]) {
        assert!(
            tokio::net::TcpStream::connect(address).await.is_err(),
            "{address} is closed"
        );
    }
}

/// Runs `weft-cp status` against `cp` and returns its table.
fn status_table(cp: &CpProcess, dir: &Path) -> String {
    let token = dir.join(".token");
    std::fs::write(&token, TOKEN).unwrap();
    let output = std::process::Command::new(cp_binary())
        .args(["status", "--admin", &cp.admin.to_string(), "--token-file"])
        .arg(&token)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_mesh_directory_is_refused_and_the_gateway_keeps_its_listener() {
    let mesh = Mesh::start().await;
    // Every mesh file moved away, as an unmounted volume would look.
    let away = TempDir::new().unwrap();
    for name in ["services.yaml", "gateway.yaml"] {
        std::fs::rename(mesh.dir.path().join(name), away.path().join(name)).unwrap();
    }
    let refused = eventually(DEADLINE, || async {
        mesh.cp
            .status()
            .await
            .ok()
            .and_then(|s| s.config_error)
            .is_some_and(|e| e.contains("the mesh is empty") && e.contains("--allow-empty"))
    })
    .await;
    assert!(
        refused,
        "status shows the refusal; cp log:\n{}",
        mesh.cp.log()
    );
    assert!(
        mesh.cp
            .log()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("mesh change refused")),
        "logged at error:\n{}",
        mesh.cp.log()
    );
    let table = status_table(&mesh.cp, away.path());
    assert!(table.contains("config error: "), "{table}");
    assert!(table.contains("the mesh is empty"), "{table}");
    assert_eq!(served_by(mesh.web).await.as_deref(), Some("alpha"));
    assert_eq!(mesh.proxy.bound_listener("http").await, Some(mesh.web));

    // Back in place, the mesh is served again and the error clears.
    std::fs::rename(
        away.path().join("services.yaml"),
        mesh.dir.path().join("services.yaml"),
    )
    .unwrap();
    std::fs::rename(
        away.path().join("gateway.yaml"),
        mesh.dir.path().join("gateway.yaml"),
    )
    .unwrap();
    let cleared = eventually(DEADLINE, || async {
        mesh.cp
            .status()
            .await
            .is_ok_and(|s| s.config_error.is_none())
    })
    .await;
    assert!(cleared, "cp log:\n{}", mesh.cp.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_connected_gateway_is_refused_unless_allowed() {
    let mesh = Mesh::start().await;
    std::fs::remove_file(mesh.dir.path().join("gateway.yaml")).unwrap();
    let refused = eventually(DEADLINE, || async {
        mesh.cp
            .status()
            .await
            .ok()
            .and_then(|s| s.config_error)
            .is_some_and(|e| e.contains("removes every listener of connected proxies: node \"gw\""))
    })
    .await;
    assert!(refused, "cp log:\n{}", mesh.cp.log());
    assert_eq!(served_by(mesh.web).await.as_deref(), Some("alpha"));

    // With --allow-empty, the operator means it: the gateway is emptied.
    let allowed = CpProcess::start_with_args(
        mesh.dir.path(),
        loopback0(),
        loopback0(),
        &["--allow-empty"],
    )
    .await
    .unwrap();
    write(mesh.dir.path(), "gateway.yaml", &gateway("alpha"));
    let proxy = ProxyProcess::start_xds(allowed.xds, "gw", Some(TOKEN))
        .await
        .unwrap();
    let web = proxy.bound_listener("http").await.unwrap();
    assert_eq!(served_by(web).await.as_deref(), Some("alpha"));
    std::fs::remove_file(mesh.dir.path().join("gateway.yaml")).unwrap();
    let removed = eventually(DEADLINE, || async {
        proxy.bound_listener("http").await.is_none()
    })
    .await;
    assert!(removed, "cp log:\n{}", allowed.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_to_start_on_an_empty_directory_unless_allowed() {
    let dir = TempDir::new().unwrap();
    // Bounded and killed on drop: a control plane that wrongly starts must
    // fail the test, not hang it.
    let output = tokio::process::Command::new(cp_binary())
        .args([
            "serve",
            "--insecure",
            "--xds",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--config-dir",
        ])
        .arg(dir.path())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(DEADLINE, output)
        .await
        .expect("weft-cp exits at once")
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&dir.path().display().to_string())
            && stderr.contains("the mesh is empty")
            && stderr.contains("--allow-empty"),
        "{stderr}"
    );
    let cp = CpProcess::start_with_args(dir.path(), loopback0(), loopback0(), &["--allow-empty"])
        .await
        .unwrap();
    assert_eq!(cp.status().await.unwrap().mesh_generation, 1);

    let validate = |allow: bool| {
        let mut command = std::process::Command::new(cp_binary());
        command.arg("validate").arg(dir.path());
        if allow {
            command.arg("--allow-empty");
        }
        command.output().unwrap()
    };
    let refused = validate(false);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no services and no gateways"));
    assert!(validate(true).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_an_unknown_node_id_or_without_its_service_is_refused() {
    let mesh = Mesh::start().await;
    let stranger = ProxyProcess::start_xds_unready(mesh.cp.xds, "stranger", Some(TOKEN))
        .await
        .unwrap();
    // `alpha-1` is a workload of `alpha`: without `--service alpha` it
    // gets nothing.
    let unclaimed = ProxyProcess::start_xds_unready(mesh.cp.xds, "alpha-1", Some(TOKEN))
        .await
        .unwrap();
    let refused = eventually(DEADLINE, || async {
        let stranger = stranger.log();
        let unclaimed = unclaimed.log();
        stranger.contains("control plane refused this proxy")
            && stranger.contains("stranger")
            && stranger.contains("is unknown to the mesh")
            && unclaimed.contains("control plane refused this proxy")
            && unclaimed.contains("claims no service")
    })
    .await;
    assert!(
        refused,
        "stranger:\n{}\nunclaimed:\n{}",
        stranger.log(),
        unclaimed.log()
    );
    let status = mesh.cp.status().await.unwrap();
    assert_eq!(status.proxies.len(), 1, "only the gateway: {status:?}");
    assert!(
        mesh.cp
            .log()
            .contains("proxy refused: node id unknown to the mesh")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_closes_an_xds_connection_that_sends_nothing() {
    use tokio::io::AsyncReadExt as _;
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "services.yaml",
        &services(
            "127.0.0.1:11".parse().unwrap(),
            "127.0.0.1:12".parse().unwrap(),
        ),
    );
    let cp = CpProcess::start_with_args(
        dir.path(),
        loopback0(),
        loopback0(),
        &[
            "--xds-handshake-timeout",
            "200ms",
            "--max-xds-connections",
            "8",
        ],
    )
    .await
    .unwrap();
    let mut silent = tokio::net::TcpStream::connect(cp.xds).await.unwrap();
    let mut buffer = [0_u8; 256];
    let closed = tokio::time::timeout(DEADLINE, async {
        while let Ok(read) = silent.read(&mut buffer).await {
            if read == 0 {
                break;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the silent connection is closed; cp log:\n{}",
        cp.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_flag_values_are_refused_and_help_matches_behaviour() {
    // Every command would fail or stay on loopback port 0 even if a flag
    // were accepted, and is killed at the deadline rather than hanging.
    let run = async |args: &[&str]| {
        let output = tokio::process::Command::new(cp_binary())
            .args(args)
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(DEADLINE, output)
            .await
            .unwrap_or_else(|_| panic!("weft-cp {args:?} exits at once"))
            .unwrap()
    };
    let serve = [
        "serve",
        "--config-dir",
        "/nonexistent",
        "--xds",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    let demo = [
        "demo",
        "--config-dir",
        "/nonexistent",
        "--proxy-binary",
        "/nonexistent",
        "--xds",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    let cases: [(&[&str], &[&str], &str); 6] = [
        (
            &serve,
            &["--insecure", "--poll-interval", "0s"],
            "'--poll-interval <DURATION>': \"0s\" is out of range: expected 10ms to 1h",
        ),
        (
            &serve,
            &["--insecure", "--xds-handshake-timeout", "0s"],
            "\"0s\" is out of range: expected 100ms to 5m",
        ),
        (
            &serve,
            &["--insecure", "--max-xds-connections", "0"],
            "--max-xds-connections",
        ),
        (&demo, &["--duration", "0s"], "expected 1s to 30days"),
        (&demo, &["--rate", "4294967295"], "--rate"),
        (&serve, &[], "<--token-file <FILE>|--insecure>"),
    ];
    for (command, flags, expected) in cases {
        let args: Vec<&str> = command.iter().chain(flags).copied().collect();
        let output = run(&args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // The help advertises what exists: the certificate authority is the
    // `cert` command, and the help says so only there.
    let help = String::from_utf8(run(&["--help"]).await.stdout).unwrap();
    assert_eq!(help.matches("certificate authority").count(), 1, "{help}");
    assert!(
        help.contains("cert      Certificates from the mesh's certificate authority"),
        "{help}"
    );
    let serve_help = String::from_utf8(run(&["serve", "--help"]).await.stdout).unwrap();
    assert!(
        serve_help.contains(
            "Usage: weft-cp serve [OPTIONS] --config-dir <DIR> <--token-file <FILE>|--insecure>"
        ),
        "{serve_help}"
    );
}
