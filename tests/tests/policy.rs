//! Rego policies end to end: a route's and a listener's policy allow and
//! deny real requests, a decision object shapes the denial, audit mode
//! only counts, and a broken policy is refused with its file and line.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use bytes::Bytes;
use http_body_util::Full;
use weft_tests::*;

/// In the style of OPA-Envoy's examples: reads may list and read items,
/// nobody deletes, and the health check is open.
const AUTHZ: &str = r#"
package envoy.authz

import rego.v1

default allow := false

allow if {
    input.attributes.request.http.method in {"GET", "HEAD"}
    input.parsed_path[0] == "items"
}

allow if input.attributes.request.http.path == "/healthz"
"#;

/// A decision object: 401 and a challenge without a token.
const TOKEN: &str = r#"
package envoy.authz

import rego.v1

default allow := {"allowed": false, "http_status": 401, "headers": {"www-authenticate": "Bearer realm=\"weft\""}, "body": "token required\n"}

allow := {"allowed": true} if startswith(input.attributes.request.http.headers.authorization, "Bearer ")
"#;

fn config(dir: &Path, echo: std::net::SocketAddr) -> String {
    std::fs::write(dir.join("authz.rego"), AUTHZ).unwrap();
    std::fs::write(dir.join("token.rego"), TOKEN).unwrap();
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
decision_log: {{ path: "{dir}/decisions.log", include_allowed: false, redact_headers: [X-Api-Key] }}
policies:
  - name: authz
    rego_files: ["{dir}/authz.rego"]
  - name: token
    rego_files: ["{dir}/token.rego"]
  - name: authz-audit
    rego_files: ["{dir}/authz.rego"]
    mode: audit
  - name: edge
    rego: |
      package edge
      import rego.v1
      default allow := true
      allow := false if input.attributes.request.http.headers["x-blocked"]
    query: data.edge.allow
listeners:
  - {{ name: web, address: "127.0.0.1:0", route_config: main, policy: edge }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - {{ name: token, match: {{ prefix: /token }}, cluster: echo, policy: token }}
          - {{ name: audit, match: {{ prefix: /audit }}, cluster: echo, policy: authz-audit }}
          - {{ name: api, cluster: echo, policy: authz }}
clusters:
  - {{ name: echo, endpoints: [{{ address: "{echo}" }}] }}
"#,
        dir = dir.display()
    )
}

fn send(
    web: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> http::Request<Full<Bytes>> {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "api");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let _ = web;
    builder.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn policies_allow_and_deny_requests_on_routes_and_listeners() {
    let echo = echo("app").await;
    let dir = TempDir::new().unwrap();
    let proxy = ProxyProcess::start(&config(dir.path(), echo.local_addr()))
        .await
        .unwrap();
    let web = proxy.listener("web");
    let status = |response: &http::Response<hyper::body::Incoming>| response.status().as_u16();

    let allowed = http1_request(web, send(web, "GET", "/items/7", &[]))
        .await
        .unwrap();
    assert_eq!(status(&allowed), 200);
    let secrets = [
        ("authorization", "Bearer leak-me"),
        ("x-api-key", "key-leak-me"),
    ];
    let denied = http1_request(web, send(web, "DELETE", "/items/7", &secrets))
        .await
        .unwrap();
    assert_eq!(status(&denied), 403);
    assert_eq!(header(&denied, "x-weft-error"), "policy_denied");
    assert_eq!(body_bytes(denied).await.unwrap(), "denied by policy\n");
    let served = echo.requests_served();
    assert_eq!(served, 1, "a denied request never reaches the upstream");

    // The decision object's status, headers and body.
    let challenged = http1_request(web, send(web, "GET", "/token", &[]))
        .await
        .unwrap();
    assert_eq!(status(&challenged), 401);
    assert_eq!(
        header(&challenged, "www-authenticate"),
        "Bearer realm=\"weft\""
    );
    assert_eq!(body_bytes(challenged).await.unwrap(), "token required\n");
    let with_token = http1_request(
        web,
        send(web, "GET", "/token", &[("authorization", "Bearer abc")]),
    )
    .await
    .unwrap();
    assert_eq!(status(&with_token), 200);

    // Audit mode: what would be denied passes, and is counted.
    let audited = http1_request(web, send(web, "DELETE", "/audit/1", &[]))
        .await
        .unwrap();
    assert_eq!(status(&audited), 200);

    // The listener's policy runs before routing, for every route.
    let blocked = http1_request(web, send(web, "GET", "/items/1", &[("x-blocked", "1")]))
        .await
        .unwrap();
    assert_eq!(status(&blocked), 403);

    // gRPC callers get PERMISSION_DENIED.
    let grpc = http1_request(
        web,
        send(
            web,
            "POST",
            "/items.Items/Delete",
            &[("content-type", "application/grpc")],
        ),
    )
    .await
    .unwrap();
    assert_eq!(header(&grpc, "grpc-status"), "7");

    let count = |policy: &'static str, result: &'static str| {
        let series =
            format!("weft_policy_decisions_total{{policy=\"{policy}\",result=\"{result}\"}}");
        let proxy = &proxy;
        async move { proxy.metric(&series).await }
    };
    assert_eq!(count("authz", "allow").await, 1.0);
    assert_eq!(count("authz", "deny").await, 2.0);
    assert_eq!(count("token", "deny").await, 1.0);
    assert_eq!(count("authz-audit", "audit_deny").await, 1.0);
    assert_eq!(count("edge", "deny").await, 1.0);
    assert_eq!(echo.requests_served(), 3);

    // The decision log: one line per denial (allowed requests left out),
    // secrets redacted.
    let log = dir.path().join("decisions.log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    // authz denies DELETE and the gRPC call, token the request without
    // one, the audit route would deny, and the listener's policy blocks one.
    let complete = eventually(DEADLINE, || async { read().lines().count() == 5 }).await;
    let text = read();
    assert!(complete, "{text}");
    assert!(!text.contains("leak-me"), "{text}");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let delete = &lines[0];
    assert_eq!(delete["policy"], "authz");
    assert_eq!(delete["result"], "deny");
    assert_eq!(
        delete["input"]["attributes"]["request"]["http"]["method"],
        "DELETE"
    );
    let headers = &delete["input"]["attributes"]["request"]["http"]["headers"];
    assert_eq!(headers["authorization"], "[REDACTED]");
    assert_eq!(headers["x-api-key"], "[REDACTED]");
    assert_eq!(headers["host"], "api");
    assert!(
        lines
            .iter()
            .any(|l| l["policy"] == "authz-audit" && l["result"] == "audit_deny")
    );
    assert!(
        lines
            .iter()
            .all(|l| l["decision_id"].as_str().is_some_and(|id| id.len() == 36))
    );
}

#[test]
fn a_broken_policy_is_refused_with_its_file_and_line() {
    let dir = TempDir::new().unwrap();
    let rego = dir.path().join("broken.rego");
    std::fs::write(
        &rego,
        "package envoy.authz\nimport rego.v1\n\nallow if {\n  input.x ==\n}\n",
    )
    .unwrap();
    let file = dir.path().join("weft.yaml");
    std::fs::write(
        &file,
        format!(
            "policies:\n  - name: broken\n    rego_files: [\"{}\"]\nlisteners: []\n",
            rego.display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(proxy_binary())
        .arg("--check-config")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("policy \"broken\""), "{stderr}");
    assert!(stderr.contains("broken.rego:"), "{stderr}");
}

/// A mesh directory whose gateway route names a policy kept in a Rego
/// file beside the YAML.
fn mesh(dir: &Path, echo: std::net::SocketAddr, rego: &str) {
    let write = |name: &str, text: &str| {
        let temporary = dir.join(format!(".{name}.tmp"));
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, dir.join(name)).unwrap();
    };
    write("gw-authz.rego", rego);
    write(
        "mesh.yaml",
        &format!(
            r#"
services:
  - name: alpha
    workloads:
      - {{ name: alpha-1, app: "127.0.0.1:1", inbound: "{echo}" }}
gateways:
  - name: gw
    listeners:
      - name: http
        address: "127.0.0.1:0"
        routes:
          - {{ name: all, service: alpha, policy: gw-authz }}
policies:
  - name: gw-authz
    rego_files: [gw-authz.rego]
"#
        ),
    );
}

const NO_DELETE: &str = "package envoy.authz\n\
    default allow := false\n\
    allow if input.attributes.request.http.method != \"DELETE\"\n";
const NO_POST: &str = "package envoy.authz\n\
    default allow := false\n\
    allow if input.attributes.request.http.method != \"POST\"\n";

async fn status_of(addr: std::net::SocketAddr, method: &str) -> u16 {
    http1_request(addr, request(addr, method, "/", Bytes::new()))
        .await
        .map_or(0, |r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_from_the_mesh_directory_is_pushed_hot_swapped_and_a_broken_one_refused() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use weft_tests::xds::{CpProcess, TOKEN};

    let upstream = echo("alpha").await;
    let dir = TempDir::new().unwrap();
    mesh(dir.path(), upstream.local_addr(), NO_DELETE);
    let cp = CpProcess::start(dir.path()).await.unwrap();
    let proxy = ProxyProcess::start_xds(cp.xds, "gw", Some(TOKEN))
        .await
        .unwrap();
    let web = proxy.bound_listener("http").await.unwrap();
    assert_eq!(status_of(web, "GET").await, 200);
    assert_eq!(status_of(web, "DELETE").await, 403);

    // Reads keep flowing while the policy is replaced: none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn({
        let (stop, failed, sent) = (stop.clone(), failed.clone(), sent.clone());
        async move {
            let mut send = http1_connect::<Full<Bytes>>(web).await.unwrap();
            // Bounded: at most 20,000 requests or until told to stop.
            for _ in 0..20_000 {
                if stop.load(Relaxed) {
                    break;
                }
                let ok = match send.send_request(get(web, "/")).await {
                    Ok(response) => response.status() == 200 && body_bytes(response).await.is_ok(),
                    Err(_) => false,
                };
                sent.fetch_add(1, Relaxed);
                if !ok {
                    failed.fetch_add(1, Relaxed);
                }
            }
        }
    });
    mesh(dir.path(), upstream.local_addr(), NO_POST);
    let swapped = eventually(DEADLINE, || async {
        status_of(web, "DELETE").await == 200 && status_of(web, "POST").await == 403
    })
    .await;
    assert!(swapped, "the new policy applies; cp log:\n{}", cp.log());
    stop.store(true, Relaxed);
    load.await.unwrap();
    assert!(sent.load(Relaxed) > 0);
    assert_eq!(failed.load(Relaxed), 0, "of {} reads", sent.load(Relaxed));

    // A policy that does not compile is refused by the control plane,
    // naming the file and line; the proxy keeps the last good one.
    mesh(
        dir.path(),
        upstream.local_addr(),
        "package envoy.authz\nallow if {\n",
    );
    let refused = eventually(DEADLINE, || async {
        cp.status()
            .await
            .ok()
            .and_then(|s| s.config_error)
            .is_some_and(|e| e.contains("gw-authz.rego:3") && e.contains("mesh.yaml"))
    })
    .await;
    assert!(refused, "cp log:\n{}", cp.log());
    let denials = "weft_policy_decisions_total{policy=\"gw-authz\",result=\"deny\"}";
    let before = proxy.metric(denials).await;
    assert_eq!(status_of(web, "POST").await, 403);
    assert_eq!(status_of(web, "GET").await, 200);
    assert_eq!(proxy.metric(denials).await, before + 1.0);
}

/// Allows connections from loopback to any port; sees no request (an L4
/// input has source and destination only).
const L4_LOCAL: &str = r#"
package l4
import rego.v1
default allow := false
allow if {
    input.attributes.source.address.socketAddress.address == "127.0.0.1"
    input.attributes.source.address.socketAddress.portValue > 0
    input.attributes.destination.address.socketAddress.portValue > 0
    not input.attributes.request
}
"#;

#[tokio::test]
async fn a_tcp_listener_policy_decides_on_source_and_destination_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = echo("tcp").await;
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("l4.rego"), L4_LOCAL).unwrap();
    let proxy = ProxyProcess::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
policies:
  - {{ name: l4-local, rego_files: ["{dir}/l4.rego"], query: data.l4.allow }}
  - name: l4-remote
    rego: |
      package l4remote
      import rego.v1
      default allow := false
      allow if input.attributes.source.address.socketAddress.address == "10.9.9.9"
    query: data.l4remote.allow
listeners:
  - {{ name: open, address: "127.0.0.1:0", protocol: tcp, cluster: echo, policy: l4-local }}
  - {{ name: closed, address: "127.0.0.1:0", protocol: tcp, cluster: echo, policy: l4-remote }}
clusters:
  - {{ name: echo, endpoints: [{{ address: "{echo}" }}] }}
"#,
        dir = dir.path().display(),
        echo = echo.local_addr()
    ))
    .await
    .unwrap();

    // Allowed: bytes go through both ways.
    let mut stream = tokio::net::TcpStream::connect(proxy.listener("open"))
        .await
        .unwrap();
    stream
        .write_all(b"GET /l4 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // Denied: the connection is reset before anything reaches the upstream.
    let served = echo.requests_served();
    assert_connection_refused(proxy.listener("closed")).await;
    assert_eq!(echo.requests_served(), served);

    for (series, want) in [
        (
            "weft_policy_decisions_total{policy=\"l4-local\",result=\"allow\"}",
            1.0,
        ),
        (
            "weft_policy_decisions_total{policy=\"l4-remote\",result=\"deny\"}",
            1.0,
        ),
    ] {
        assert_eq!(proxy.metric(series).await, want, "{series}");
    }
}
