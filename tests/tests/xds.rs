//! Proxies configured over xDS by an in-process control plane whose
//! resources each test sets directly: traffic served from xDS alone, NACKs
//! with the last good configuration kept, long streams across many updates,
//! and authentication.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use futures_util::StreamExt;
use weft_proto::config::v1 as pb;
use weft_proto::echo::v1::EchoRequest;
use weft_tests::xds::{TOKEN, TestCp};
use weft_tests::*;

fn listener(name: &str) -> pb::Listener {
    pb::Listener {
        name: name.into(),
        address: "127.0.0.1:0".into(),
        route_config: Some("main".into()),
        ..pb::Listener::default()
    }
}

/// One route for every request, to `cluster`, with a `timeout` that tests
/// vary to make a new version.
fn routes(cluster: &str, timeout_ms: i32) -> pb::RouteConfiguration {
    pb::RouteConfiguration {
        name: "main".into(),
        virtual_hosts: vec![pb::VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![pb::Route {
                name: Some("all".into()),
                cluster: Some(cluster.into()),
                timeout: Some(weft_proto::prost_types::Duration {
                    seconds: 30,
                    nanos: timeout_ms * 1_000_000,
                }),
                ..pb::Route::default()
            }],
        }],
    }
}

fn cluster(name: &str, endpoint: SocketAddr, protocol: &str) -> pb::Cluster {
    pb::Cluster {
        name: name.into(),
        protocol: Some(protocol.into()),
        endpoints: vec![pb::Endpoint {
            address: endpoint.to_string(),
            weight: None,
        }],
        ..pb::Cluster::default()
    }
}

async fn served_by(addr: SocketAddr) -> String {
    let response = http1_request(addr, get(addr, "/")).await.unwrap();
    header(&response, "x-echo-server").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_configured_only_over_xds_serves_traffic() {
    let echo = echo("from-xds").await;
    let cp = TestCp::start().await.unwrap();
    cp.set(
        "gw",
        vec![listener("web")],
        vec![routes("echo", 0)],
        vec![cluster("echo", echo.local_addr(), "http1")],
    );
    let proxy = ProxyProcess::start_xds(cp.xds_addr(), "gw", Some(TOKEN))
        .await
        .unwrap();
    let web = proxy.bound_listener("web").await.unwrap();
    assert_eq!(served_by(web).await, "from-xds");

    // The config dump says where the configuration came from, per type.
    assert!(cp.wait_converged("gw").await);
    let (_, dump) = proxy.admin_get("/config_dump").await.unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["source"], format!("xds {}", cp.xds_addr()));
    assert_eq!(dump["xds"]["connected"], true);
    for type_url in [
        pb::CLUSTER_TYPE_URL,
        pb::ROUTE_CONFIGURATION_TYPE_URL,
        pb::LISTENER_TYPE_URL,
    ] {
        assert_eq!(
            dump["xds"]["types"][type_url]["version"].as_str(),
            cp.acked("gw", type_url).as_deref(),
            "{type_url}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_resource_is_nacked_and_the_last_good_config_keeps_serving() {
    let echo = echo("good").await;
    let cp = TestCp::start().await.unwrap();
    let good = cluster("echo", echo.local_addr(), "http1");
    cp.set(
        "gw",
        vec![listener("web")],
        vec![routes("echo", 0)],
        vec![good.clone()],
    );
    let proxy = ProxyProcess::start_xds(cp.xds_addr(), "gw", Some(TOKEN))
        .await
        .unwrap();
    let web = proxy.bound_listener("web").await.unwrap();
    assert!(cp.wait_converged("gw").await);
    let good_version = cp.acked("gw", pb::CLUSTER_TYPE_URL).unwrap();

    let bad = pb::Cluster {
        lb: Some("fastest".into()),
        ..good
    };
    cp.set(
        "gw",
        vec![listener("web")],
        vec![routes("echo", 0)],
        vec![bad],
    );
    let nacked = eventually(DEADLINE, || async {
        cp.status().proxies.iter().any(|p| {
            p.types[pb::CLUSTER_TYPE_URL]
                .last_nack
                .as_ref()
                .is_some_and(|n| n.error.contains("cluster \"echo\": lb"))
        })
    })
    .await;
    assert!(
        nacked,
        "the control plane records the NACK: {:?}",
        cp.status()
    );
    assert_eq!(
        cp.acked("gw", pb::CLUSTER_TYPE_URL),
        Some(good_version),
        "the ACKed version is still the good one"
    );
    assert_eq!(served_by(web).await, "good");
    let (_, dump) = proxy.admin_get("/config_dump").await.unwrap();
    assert!(dump.contains("fastest"), "the proxy shows the NACK: {dump}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_grpc_stream_survives_a_hundred_updates_on_a_pool_that_is_kept() {
    let echo = echo("grpc").await;
    let cp = TestCp::start().await.unwrap();
    let set = |version: i32| {
        cp.set(
            "gw",
            vec![listener("web")],
            vec![routes("echo", version)],
            vec![cluster("echo", echo.local_addr(), "http2")],
        );
    };
    set(0);
    let proxy = ProxyProcess::start_xds(cp.xds_addr(), "gw", Some(TOKEN))
        .await
        .unwrap();
    let web = proxy.bound_listener("web").await.unwrap();
    let mut client = echo_client(web).await.unwrap();
    let (outbound, queue) = tokio::sync::mpsc::channel(4);
    let mut inbound = client
        .bidi_stream(tokio_stream_from(queue))
        .await
        .unwrap()
        .into_inner();
    let mut exchange = async |i: u32| {
        outbound
            .send(EchoRequest {
                payload: format!("m{i}").into(),
                ..EchoRequest::default()
            })
            .await
            .unwrap();
        let reply = tokio::time::timeout(DEADLINE, inbound.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply.payload, format!("m{i}").as_bytes());
    };
    exchange(0).await;
    for update in 1..=100 {
        set(update);
        assert!(cp.wait_converged("gw").await, "update {update} applied");
        if update % 10 == 0 {
            exchange(update as u32).await;
        }
    }
    // The cluster never changed, so its endpoint state (request counts,
    // connections) is the one from before the updates.
    let connections = proxy
        .metric("weft_upstream_connections_total{cluster=\"echo\"}")
        .await;
    assert_eq!(connections, 1.0, "one upstream connection for everything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_refused() {
    let cp = TestCp::start().await.unwrap();
    cp.set("gw", vec![], vec![], vec![]);
    let proxy = ProxyProcess::start_xds_unready(cp.xds_addr(), "gw", Some("wrong"))
        .await
        .unwrap();
    let refused = eventually(DEADLINE, || async {
        let log = proxy.log();
        log.contains("control plane refused this proxy") && log.contains("Unauthenticated")
    })
    .await;
    assert!(refused, "the proxy is refused: {}", proxy.log());
    assert!(cp.status().proxies.is_empty());
    let (status, _) = proxy.admin_get("/ready").await.unwrap();
    assert_eq!(status, 503, "without configuration the proxy is not ready");
}

fn tokio_stream_from<T: Send + 'static>(
    mut queue: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| queue.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_xds_a_bootstrap_file_gives_only_the_proxys_own_settings() {
    let dir = TempDir::new().unwrap();
    let bootstrap = dir.path().join("bootstrap.yaml");
    std::fs::write(
        &bootstrap,
        "listeners:\n  - { name: web, address: \"127.0.0.1:0\", route_config: main }\n",
    )
    .unwrap();
    let output = tokio::process::Command::new(proxy_binary())
        .args(["--xds", "127.0.0.1:1", "--node-id", "gw", "--config"])
        .arg(&bootstrap)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("come from the control plane"), "{stderr}");

    // Admin and the access log from the file; everything else over xDS.
    let echo = echo("logged").await;
    let cp = TestCp::start().await.unwrap();
    cp.set(
        "gw",
        vec![listener("web")],
        vec![routes("echo", 0)],
        vec![cluster("echo", echo.local_addr(), "http1")],
    );
    let log = dir.path().join("access.log");
    std::fs::write(
        &bootstrap,
        format!(
            "admin: {{ address: \"127.0.0.1:0\" }}\naccess_log: {{ path: \"{}\" }}\n",
            log.display()
        ),
    )
    .unwrap();
    let xds = cp.xds_addr().to_string();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let proxy = ProxyProcess::start_with_args(&[
        "--xds",
        &xds,
        "--node-id",
        "gw",
        "--token-file",
        token.to_str().unwrap(),
        "--config",
        bootstrap.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let web = proxy.bound_listener("web").await.unwrap();
    assert_eq!(served_by(web).await, "logged");
    let logged = eventually(DEADLINE, || async {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("\"listener\":\"web\""))
    })
    .await;
    assert!(
        logged,
        "the access log from the bootstrap file records xDS traffic"
    );
}

#[tokio::test]
async fn one_push_is_announced_once() {
    let echo = echo("announce").await;
    let cp = TestCp::start().await.unwrap();
    cp.set(
        "gw",
        vec![listener("web")],
        vec![routes("echo", 0)],
        vec![cluster("echo", echo.local_addr(), "http1")],
    );
    let proxy = ProxyProcess::start_xds(cp.xds_addr(), "gw", Some(TOKEN))
        .await
        .unwrap();
    let applied = || proxy.log().matches("configuration applied").count();
    // Three responses (clusters, routes, listeners), one line at info; the
    // per-apply lines are at debug ("DEBUG" in the test's log level).
    let announced = |n: usize| {
        let proxy = &proxy;
        async move {
            eventually(DEADLINE, || async {
                proxy
                    .log()
                    .lines()
                    .filter(|l| l.contains("INFO") && l.contains("configuration applied"))
                    .count()
                    == n
            })
            .await
        }
    };
    assert!(announced(1).await, "{}", proxy.log());
    assert!(
        applied() >= 3,
        "each apply is logged at debug: {}",
        proxy.log()
    );
    // A push that changes every type: one more line.
    cp.set(
        "gw",
        vec![listener("web")],
        vec![routes("echo", 1)],
        vec![cluster("echo", echo.local_addr(), "http2")],
    );
    assert!(announced(2).await, "{}", proxy.log());
}

#[tokio::test]
async fn metrics_of_removed_clusters_and_routes_go_away() {
    let echo = echo("prune").await;
    let cp = TestCp::start().await.unwrap();
    cp.set(
        "gw",
        vec![listener("web")],
        vec![routes("old", 0)],
        vec![cluster("old", echo.local_addr(), "http1")],
    );
    let proxy = ProxyProcess::start_xds(cp.xds_addr(), "gw", Some(TOKEN))
        .await
        .unwrap();
    let web = proxy.bound_listener("web").await.unwrap();
    assert_eq!(served_by(web).await, "prune");
    let metrics = || async { proxy.admin_get("/metrics").await.unwrap().1 };
    assert!(metrics().await.contains("cluster=\"old\""));
    cp.set(
        "gw",
        vec![listener("web")],
        vec![routes("new", 0)],
        vec![cluster("new", echo.local_addr(), "http1")],
    );
    assert!(cp.wait_converged("gw").await);
    assert_eq!(served_by(web).await, "prune");
    let pruned = eventually(DEADLINE, || async {
        let text = metrics().await;
        text.contains("cluster=\"new\"") && !text.contains("cluster=\"old\"")
    })
    .await;
    assert!(pruned, "{}", metrics().await);
}
