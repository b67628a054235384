//! The xDS server end to end: an in-process server on loopback port 0 and
//! tonic clients over real HTTP/2 connections.

// Test helpers outside `#[test]` functions unwrap too: a failure is the
// test's failure.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use weft_proxy::xds::GrpcChannel;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};
use weft_cp::cache::SnapshotCache;
use weft_cp::resources::{MeshSnapshot, NodeEntry, NodeResources};
use weft_cp::status::{self, Protocol, StatusReport};
use weft_cp::xds::{Auth, Server, ServerOptions, XdsLimits};
use weft_proto::config::v1 as pb;
use weft_proto::envoy::config::core::v3::Node;
use weft_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use weft_proto::google::rpc;
use weft_proto::prost::Message as _;

const DEADLINE: Duration = Duration::from_secs(5);
const TOKEN: &str = "test-token";
const CLUSTERS: &str = pb::CLUSTER_TYPE_URL;
const ROUTES: &str = pb::ROUTE_CONFIGURATION_TYPE_URL;
const LISTENERS: &str = pb::LISTENER_TYPE_URL;

// ---- fixtures -------------------------------------------------------------

fn cluster(name: &str, address: &str) -> pb::Cluster {
    pb::Cluster {
        name: name.into(),
        endpoints: vec![pb::Endpoint {
            address: address.into(),
            weight: None,
        }],
        ..pb::Cluster::default()
    }
}

fn route(name: &str) -> pb::RouteConfiguration {
    pb::RouteConfiguration {
        name: name.into(),
        ..pb::RouteConfiguration::default()
    }
}

fn listener(name: &str, address: &str) -> pb::Listener {
    pb::Listener {
        name: name.into(),
        address: address.into(),
        ..pb::Listener::default()
    }
}

/// Clusters as (name, address), route names, listeners as (name, address).
fn resources(
    clusters: &[(&str, &str)],
    routes: &[&str],
    listeners: &[(&str, &str)],
) -> Arc<NodeResources> {
    Arc::new(NodeResources::new(
        listeners.iter().map(|(n, a)| listener(n, a)).collect(),
        routes.iter().map(|n| route(n)).collect(),
        clusters.iter().map(|(n, a)| cluster(n, a)).collect(),
    ))
}

fn mesh(nodes: &[(&str, Option<&str>, Arc<NodeResources>)]) -> MeshSnapshot {
    MeshSnapshot {
        nodes: nodes
            .iter()
            .map(|(id, service, resources)| {
                (
                    (*id).to_owned(),
                    NodeEntry {
                        service: service.map(str::to_owned),
                        identity: None,
                        resources: Arc::clone(resources),
                    },
                )
            })
            .collect(),
        trust_domain: None,
    }
}

fn version(resources: &NodeResources, type_url: &str) -> String {
    resources.get(type_url).unwrap().version.clone()
}

/// The service a fixture node claims: workloads are named
/// `<service>-<n>` (`web-1` claims `web`); other names claim none.
fn claim(node_id: &str) -> &str {
    node_id
        .rsplit_once('-')
        .filter(|(_, n)| n.bytes().all(|b| b.is_ascii_digit()))
        .map_or("", |(service, _)| service)
}

fn node(id: &str, service: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        cluster: service.into(),
        ..Node::default()
    })
}

fn loopback0() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

async fn start(auth: Auth, snapshot: MeshSnapshot) -> Server {
    let cache = SnapshotCache::new();
    cache.set(snapshot);
    Server::start(ServerOptions {
        xds_addr: loopback0(),
        admin_addr: loopback0(),
        auth,
        cache,
        drain_timeout: DEADLINE,
        limits: XdsLimits::default(),
        identity: None,
        node_tokens: None,
    })
    .await
    .expect("server starts")
}

async fn start_default(snapshot: MeshSnapshot) -> Server {
    start(Auth::token(TOKEN), snapshot).await
}

/// Polls `condition` until it holds or the deadline passes.
async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---- a gRPC client over one hyper HTTP/2 connection ----------------------

/// Connects to `addr` with HTTP/2 prior knowledge.
async fn connect_h2(addr: SocketAddr) -> GrpcChannel {
    let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let (sender, conn) = tokio::time::timeout(
        DEADLINE,
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
    )
    .await
    .unwrap()
    .unwrap();
    tokio::spawn(conn);
    GrpcChannel(sender)
}

async fn client(addr: SocketAddr) -> AggregatedDiscoveryServiceClient<GrpcChannel> {
    let origin: http::Uri = format!("http://{addr}").parse().unwrap();
    AggregatedDiscoveryServiceClient::with_origin(connect_h2(addr).await, origin)
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// A state-of-the-world stream.
struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    async fn open(
        addr: SocketAddr,
        token: Option<&str>,
        first: DiscoveryRequest,
    ) -> Result<Self, tonic::Status> {
        let mut client = client(addr).await;
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let request = with_token(ReceiverStream::new(rx), token);
        let response = tokio::time::timeout(DEADLINE, client.stream_aggregated_resources(request))
            .await
            .expect("the server answers in time")?;
        Ok(Self {
            tx,
            rx: response.into_inner(),
        })
    }

    async fn subscribe(addr: SocketAddr, node_id: &str, type_url: &str) -> Self {
        Self::open(
            addr,
            Some(TOKEN),
            request(node(node_id, claim(node_id)), type_url, "", "", &[]),
        )
        .await
        .expect("stream admitted")
    }

    async fn send(&self, request: DiscoveryRequest) {
        self.tx.send(request).await.unwrap();
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(DEADLINE, self.rx.message())
            .await
            .expect("a response in time")
            .expect("the stream is healthy")
            .expect("the stream is open")
    }

    async fn ack(&self, response: &DiscoveryResponse) {
        self.send(request(
            None,
            &response.type_url,
            &response.version_info,
            &response.nonce,
            &[],
        ))
        .await;
    }
}

fn request(
    node: Option<Node>,
    type_url: &str,
    version: &str,
    nonce: &str,
    names: &[&str],
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node,
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        error_detail: None,
    }
}

fn names_in(response: &DiscoveryResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|any| match any.type_url.as_str() {
            CLUSTERS => pb::Cluster::decode(any.value.as_slice()).unwrap().name,
            ROUTES => {
                pb::RouteConfiguration::decode(any.value.as_slice())
                    .unwrap()
                    .name
            }
            LISTENERS => pb::Listener::decode(any.value.as_slice()).unwrap().name,
            other => panic!("unexpected type {other}"),
        })
        .collect()
}

/// A delta stream.
struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    async fn open(addr: SocketAddr, first: DeltaDiscoveryRequest) -> Self {
        Self::try_open(addr, first).await.expect("stream admitted")
    }

    async fn try_open(
        addr: SocketAddr,
        first: DeltaDiscoveryRequest,
    ) -> Result<Self, tonic::Status> {
        let mut client = client(addr).await;
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let request = with_token(ReceiverStream::new(rx), Some(TOKEN));
        let response = tokio::time::timeout(DEADLINE, client.delta_aggregated_resources(request))
            .await
            .unwrap()?;
        Ok(Self {
            tx,
            rx: response.into_inner(),
        })
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.tx.send(request).await.unwrap();
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(DEADLINE, self.rx.message())
            .await
            .expect("a response in time")
            .expect("the stream is healthy")
            .expect("the stream is open")
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..DeltaDiscoveryRequest::default()
        })
        .await;
    }
}

fn delta_names(response: &DeltaDiscoveryResponse) -> BTreeSet<String> {
    response.resources.iter().map(|r| r.name.clone()).collect()
}

fn proxy_types(server: &Server, node_id: &str) -> Option<BTreeMap<String, status::TypeStatus>> {
    server
        .status()
        .proxies
        .into_iter()
        .find(|p| p.node_id == node_id)
        .map(|p| p.types)
}

// ---- state of the world ---------------------------------------------------

fn web_v1() -> Arc<NodeResources> {
    resources(
        &[("backend", "10.0.0.1:80"), ("db", "10.0.0.2:5432")],
        &["main"],
        &[("in", "0.0.0.0:8080")],
    )
}

#[tokio::test]
async fn sotw_subscribe_gets_version_nonce_and_resources_and_ack_is_recorded() {
    let web = web_v1();
    let server = start_default(mesh(&[("web-1", Some("web"), Arc::clone(&web))])).await;
    let mut stream = Sotw::subscribe(server.xds_addr(), "web-1", CLUSTERS).await;
    let response = stream.recv().await;
    assert_eq!(response.type_url, CLUSTERS);
    assert_eq!(response.version_info, version(&web, CLUSTERS));
    assert!(!response.nonce.is_empty());
    assert_eq!(names_in(&response), ["backend", "db"]);

    stream.ack(&response).await;
    let expected = version(&web, CLUSTERS);
    assert!(
        eventually(|| {
            proxy_types(&server, "web-1")
                .and_then(|t| t.get(CLUSTERS).cloned())
                .is_some_and(|t| t.acked_version.as_deref() == Some(expected.as_str()))
        })
        .await
    );
    let report = server.status();
    assert_eq!(report.proxies.len(), 1);
    assert_eq!(report.proxies[0].protocol, Protocol::Sotw);
    assert_eq!(report.proxies[0].service.as_deref(), Some("web"));
    assert!(report.proxies[0].peer.is_some());

    drop(stream);
    assert!(
        eventually(|| server.status().proxies.is_empty()).await,
        "disconnect unregisters"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn sotw_changes_push_only_changed_types_in_cluster_route_listener_order() {
    let web = web_v1();
    let other = resources(&[("x", "10.0.0.9:80")], &[], &[]);
    let server = start_default(mesh(&[
        ("web-1", Some("web"), Arc::clone(&web)),
        ("other-1", Some("other"), Arc::clone(&other)),
    ]))
    .await;
    let mut stream = Sotw::subscribe(server.xds_addr(), "web-1", LISTENERS).await;
    let first = stream.recv().await;
    stream.ack(&first).await;
    stream.send(request(None, CLUSTERS, "", "", &[])).await;
    let clusters = stream.recv().await;
    stream.ack(&clusters).await;
    stream.send(request(None, ROUTES, "", "", &[])).await;
    let routes = stream.recv().await;
    stream.ack(&routes).await;
    assert_eq!(
        [&first.type_url, &clusters.type_url, &routes.type_url],
        [LISTENERS, CLUSTERS, ROUTES]
    );

    // Another node changes: web-1 is not woken.
    let other2 = resources(&[("x", "10.0.0.10:80")], &[], &[]);
    server.cache().set(mesh(&[
        ("web-1", Some("web"), Arc::clone(&web)),
        ("other-1", Some("other"), Arc::clone(&other2)),
    ]));
    // Listener and cluster change, routes do not: cluster first, then
    // listener, and nothing else (the next response after them belongs to
    // the third change).
    let web2 = resources(
        &[("backend", "10.0.0.1:81"), ("db", "10.0.0.2:5432")],
        &["main"],
        &[("in", "0.0.0.0:8081")],
    );
    server.cache().set(mesh(&[
        ("web-1", Some("web"), Arc::clone(&web2)),
        ("other-1", Some("other"), Arc::clone(&other2)),
    ]));
    let a = stream.recv().await;
    let b = stream.recv().await;
    assert_eq!(
        [a.type_url.as_str(), b.type_url.as_str()],
        [CLUSTERS, LISTENERS]
    );
    assert_eq!(a.version_info, version(&web2, CLUSTERS));
    assert_eq!(b.version_info, version(&web2, LISTENERS));
    stream.ack(&a).await;
    stream.ack(&b).await;
    let web3 = resources(
        &[("backend", "10.0.0.1:81"), ("db", "10.0.0.2:5432")],
        &["main", "admin"],
        &[("in", "0.0.0.0:8081")],
    );
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web3))]));
    let c = stream.recv().await;
    assert_eq!(c.type_url, ROUTES);
    assert_eq!(names_in(&c), ["admin", "main"]);
    server.shutdown().await;
}

#[tokio::test]
async fn sotw_nack_is_recorded_and_the_same_version_is_not_resent() {
    let web = web_v1();
    let server = start_default(mesh(&[("web-1", Some("web"), Arc::clone(&web))])).await;
    let mut stream = Sotw::subscribe(server.xds_addr(), "web-1", CLUSTERS).await;
    let v1 = stream.recv().await;
    stream.ack(&v1).await;
    stream.send(request(None, LISTENERS, "", "", &[])).await;
    let listeners = stream.recv().await;
    stream.ack(&listeners).await;

    let web2 = resources(&[("backend", "bad")], &["main"], &[("in", "0.0.0.0:8080")]);
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web2))]));
    let v2 = stream.recv().await;
    assert_eq!(v2.version_info, version(&web2, CLUSTERS));
    let mut nack = request(None, CLUSTERS, &v1.version_info, &v2.nonce, &[]);
    nack.error_detail = Some(rpc::Status {
        code: i32::from(Code::InvalidArgument),
        message: "cluster \"backend\": endpoints[0].address: invalid".into(),
        details: vec![],
    });
    stream.send(nack).await;

    // Only the listener changes now: the listener comes, the NACKed
    // clusters are not sent again.
    let web3 = resources(&[("backend", "bad")], &["main"], &[("in", "0.0.0.0:9090")]);
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web3))]));
    let next = stream.recv().await;
    assert_eq!(next.type_url, LISTENERS);

    assert!(
        eventually(|| {
            proxy_types(&server, "web-1")
                .and_then(|t| t.get(CLUSTERS).cloned())
                .is_some_and(|t| {
                    t.acked_version.as_deref() == Some(v1.version_info.as_str())
                        && t.last_nack.as_ref().is_some_and(|n| {
                            n.version == v2.version_info && n.error.contains("endpoints[0].address")
                        })
                })
        })
        .await
    );
    // A fix is sent.
    let web4 = resources(
        &[("backend", "10.0.0.1:80")],
        &["main"],
        &[("in", "0.0.0.0:9090")],
    );
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web4))]));
    let fixed = stream.recv().await;
    assert_eq!(fixed.type_url, CLUSTERS);
    assert_eq!(fixed.version_info, version(&web4, CLUSTERS));
    server.shutdown().await;
}

#[tokio::test]
async fn sotw_resource_names_filter_and_stale_nonce_is_ignored() {
    let web = web_v1();
    let server = start_default(mesh(&[("web-1", Some("web"), Arc::clone(&web))])).await;
    let mut stream = Sotw::open(
        server.xds_addr(),
        Some(TOKEN),
        request(node("web-1", "web"), CLUSTERS, "", "", &["db", "missing"]),
    )
    .await
    .unwrap();
    let first = stream.recv().await;
    assert_eq!(names_in(&first), ["db"]);

    // A change arrives before the client answers the first response.
    let web2 = resources(
        &[("backend", "10.0.0.1:80"), ("db", "10.0.0.3:5432")],
        &["main"],
        &[],
    );
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web2))]));
    let second = stream.recv().await;
    assert_ne!(first.nonce, second.nonce);
    // The client's answer to the first (now stale) response, asking for
    // other names, is ignored...
    stream
        .send(request(
            None,
            CLUSTERS,
            &first.version_info,
            &first.nonce,
            &["backend"],
        ))
        .await;
    // ...while its answer to the latest one changes the names.
    stream
        .send(request(
            None,
            CLUSTERS,
            &second.version_info,
            &second.nonce,
            &["backend", "db"],
        ))
        .await;
    let third = stream.recv().await;
    assert_eq!(names_in(&third), ["backend", "db"]);
    assert_eq!(third.version_info, second.version_info);
    server.shutdown().await;
}

#[tokio::test]
async fn sotw_reconnect_with_current_version_gets_nothing_until_a_change() {
    let web = web_v1();
    let server = start_default(mesh(&[("web-1", Some("web"), Arc::clone(&web))])).await;
    let current = version(&web, CLUSTERS);
    let mut stream = Sotw::open(
        server.xds_addr(),
        Some(TOKEN),
        request(node("web-1", "web"), CLUSTERS, &current, "", &[]),
    )
    .await
    .unwrap();
    // The reconnect is recorded as running the current version.
    assert!(
        eventually(|| {
            proxy_types(&server, "web-1")
                .and_then(|t| t.get(CLUSTERS).cloned())
                .is_some_and(|t| t.acked_version.as_deref() == Some(current.as_str()))
        })
        .await
    );
    let web2 = resources(
        &[("backend", "10.0.0.1:81")],
        &["main"],
        &[("in", "0.0.0.0:8080")],
    );
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web2))]));
    // The first response is the change: nothing was sent on reconnect.
    let response = stream.recv().await;
    assert_eq!(response.version_info, version(&web2, CLUSTERS));
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_node_is_refused_with_its_id_and_counted() {
    let server = start_default(mesh(&[("web-1", Some("web"), web_v1())])).await;
    let sotw = Sotw::open(
        server.xds_addr(),
        Some(TOKEN),
        request(node("newcomer", ""), CLUSTERS, "", "", &[]),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(sotw.code(), Code::PermissionDenied);
    assert!(
        sotw.message()
            .contains("node id \"newcomer\" is unknown to the mesh"),
        "{}",
        sotw.message()
    );
    let delta = Delta::try_open(
        server.xds_addr(),
        delta_subscribe(Some("web-2"), CLUSTERS, &[]),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(delta.code(), Code::PermissionDenied);
    assert!(delta.message().contains("\"web-2\""), "{}", delta.message());
    assert!(server.status().proxies.is_empty());
    let (_, metrics) = admin_get(server.admin_addr(), "/metrics", Some(TOKEN)).await;
    assert!(
        metrics.contains("weft_cp_unknown_node_streams_total 2\n"),
        "{metrics}"
    );
    // Once the mesh has the node, it is admitted.
    server.cache().set(mesh(&[
        ("web-1", Some("web"), web_v1()),
        (
            "newcomer",
            None,
            resources(&[("api", "10.0.0.5:80")], &[], &[]),
        ),
    ]));
    let mut stream = Sotw::subscribe(server.xds_addr(), "newcomer", CLUSTERS).await;
    assert_eq!(names_in(&stream.recv().await), ["api"]);
    server.shutdown().await;
}

// ---- admission --------------------------------------------------------------

#[tokio::test]
async fn missing_or_wrong_token_is_unauthenticated() {
    let server = start_default(mesh(&[("web-1", Some("web"), web_v1())])).await;
    for token in [None, Some("wrong")] {
        let result = Sotw::open(
            server.xds_addr(),
            token,
            request(node("web-1", "web"), CLUSTERS, "", "", &[]),
        )
        .await;
        let status = result.err().expect("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }
    // Insecure servers accept anyone.
    let insecure = start(Auth::Insecure, mesh(&[("web-1", Some("web"), web_v1())])).await;
    let mut stream = Sotw::open(
        insecure.xds_addr(),
        None,
        request(node("web-1", "web"), CLUSTERS, "", "", &[]),
    )
    .await
    .unwrap();
    stream.recv().await;
    server.shutdown().await;
    insecure.shutdown().await;
}

#[tokio::test]
async fn first_request_without_node_or_with_another_service_is_refused() {
    let server = start_default(mesh(&[("web-1", Some("web"), web_v1())])).await;
    let no_node = Sotw::open(
        server.xds_addr(),
        Some(TOKEN),
        request(None, CLUSTERS, "", "", &[]),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(no_node.code(), Code::InvalidArgument);

    let impostor = Sotw::open(
        server.xds_addr(),
        Some(TOKEN),
        request(node("web-1", "payments"), CLUSTERS, "", "", &[]),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(impostor.code(), Code::PermissionDenied);
    assert!(impostor.message().contains("web"), "{}", impostor.message());
    // Naming the right service is fine.
    let mut ok = Sotw::open(
        server.xds_addr(),
        Some(TOKEN),
        request(node("web-1", "web"), CLUSTERS, "", "", &[]),
    )
    .await
    .unwrap();
    ok.recv().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_node_s_service_comes_from_the_mesh_and_a_missing_claim_is_refused() {
    let server = start_default(mesh(&[
        ("web-1", Some("web"), web_v1()),
        ("gw", None, web_v1()),
    ]))
    .await;
    let open = |id: &'static str, claimed: &'static str| {
        Sotw::open(
            server.xds_addr(),
            Some(TOKEN),
            request(node(id, claimed), CLUSTERS, "", "", &[]),
        )
    };
    // A workload's sidecar that claims no service gets nothing of it.
    let unclaimed = open("web-1", "").await.err().expect("refused");
    assert_eq!(unclaimed.code(), Code::PermissionDenied);
    assert!(
        unclaimed.message().contains("claims no service")
            && unclaimed.message().contains("--service web"),
        "{}",
        unclaimed.message()
    );
    // A gateway is not a workload of any service.
    let posing = open("gw", "web").await.err().expect("refused");
    assert_eq!(posing.code(), Code::PermissionDenied);
    assert!(
        posing.message().contains("\"gw\" is a gateway"),
        "{}",
        posing.message()
    );
    let delta = Delta::try_open(
        server.xds_addr(),
        DeltaDiscoveryRequest {
            node: node("web-1", ""),
            type_url: CLUSTERS.into(),
            ..DeltaDiscoveryRequest::default()
        },
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(delta.code(), Code::PermissionDenied);
    let (_, metrics) = admin_get(server.admin_addr(), "/metrics", Some(TOKEN)).await;
    assert!(
        metrics.contains("weft_cp_service_mismatch_streams_total 3\n"),
        "{metrics}"
    );
    // A gateway that claims nothing is admitted, and the status shows each
    // node's service from the mesh.
    let mut gateway = open("gw", "").await.unwrap();
    gateway.recv().await;
    let mut sidecar = open("web-1", "web").await.unwrap();
    sidecar.recv().await;
    let services: BTreeMap<String, Option<String>> = server
        .status()
        .proxies
        .into_iter()
        .map(|p| (p.node_id, p.service))
        .collect();
    assert_eq!(
        services,
        BTreeMap::from([
            ("gw".to_owned(), None),
            ("web-1".to_owned(), Some("web".to_owned()))
        ])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_claimed_service_is_checked_again_when_the_mesh_changes() {
    let server = start_default(mesh(&[("web-1", Some("web"), web_v1())])).await;
    let mut stream = Sotw::subscribe(server.xds_addr(), "web-1", CLUSTERS).await;
    let first = stream.recv().await;
    stream.ack(&first).await;
    // The mesh then gives the node to another service: the stream ends
    // refused instead of receiving that service's configuration.
    server
        .cache()
        .set(mesh(&[("web-1", Some("payments"), web_v1())]));
    let ended = tokio::time::timeout(DEADLINE, stream.rx.message())
        .await
        .expect("the stream ends in time");
    let status = ended.expect_err("the stream ends with an error");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("payments"),
        "{}",
        status.message()
    );
    server.shutdown().await;
}

// ---- delta ------------------------------------------------------------------

fn delta_subscribe(node_id: Option<&str>, type_url: &str, names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node_id.and_then(|id| node(id, claim(id))),
        type_url: type_url.into(),
        resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..DeltaDiscoveryRequest::default()
    }
}

#[tokio::test]
async fn delta_initial_state_changes_and_removals() {
    let web = web_v1();
    let server = start_default(mesh(&[("web-1", Some("web"), Arc::clone(&web))])).await;
    let mut stream = Delta::open(
        server.xds_addr(),
        delta_subscribe(Some("web-1"), CLUSTERS, &[]),
    )
    .await;
    let initial = stream.recv().await;
    assert_eq!(
        delta_names(&initial),
        BTreeSet::from(["backend".into(), "db".into()])
    );
    let clusters = web.get(CLUSTERS).unwrap();
    for resource in &initial.resources {
        assert_eq!(resource.version, clusters.resources[&resource.name].version);
    }
    assert!(initial.removed_resources.is_empty());
    stream.ack(&initial).await;

    // backend changes, db disappears, cache appears.
    let web2 = resources(
        &[("backend", "10.0.0.1:81"), ("cache", "10.0.0.4:6379")],
        &["main"],
        &[("in", "0.0.0.0:8080")],
    );
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web2))]));
    let update = stream.recv().await;
    assert_eq!(
        delta_names(&update),
        BTreeSet::from(["backend".into(), "cache".into()])
    );
    assert_eq!(update.removed_resources, ["db"]);
    stream.ack(&update).await;
    assert!(
        eventually(|| {
            proxy_types(&server, "web-1")
                .and_then(|t| t.get(CLUSTERS).cloned())
                .is_some_and(|t| {
                    t.acked_version.as_deref() == Some(version(&web2, CLUSTERS).as_str())
                })
        })
        .await
    );
    assert_eq!(server.status().proxies[0].protocol, Protocol::Delta);
    server.shutdown().await;
}

#[tokio::test]
async fn delta_subscribe_and_unsubscribe_by_name() {
    let web = web_v1();
    let server = start_default(mesh(&[("web-1", Some("web"), Arc::clone(&web))])).await;
    let mut stream = Delta::open(
        server.xds_addr(),
        delta_subscribe(Some("web-1"), CLUSTERS, &["db"]),
    )
    .await;
    let first = stream.recv().await;
    assert_eq!(delta_names(&first), BTreeSet::from(["db".into()]));
    stream.ack(&first).await;
    stream
        .send(delta_subscribe(None, CLUSTERS, &["backend"]))
        .await;
    let second = stream.recv().await;
    assert_eq!(delta_names(&second), BTreeSet::from(["backend".into()]));
    stream.ack(&second).await;
    stream
        .send(DeltaDiscoveryRequest {
            type_url: CLUSTERS.into(),
            resource_names_unsubscribe: vec!["db".into()],
            ..DeltaDiscoveryRequest::default()
        })
        .await;
    // Requests are handled in order: the answer to a new type's first
    // request proves the unsubscription was applied.
    stream.send(delta_subscribe(None, ROUTES, &[])).await;
    assert_eq!(stream.recv().await.type_url, ROUTES);
    // db changes: the client no longer wants it; backend changes: sent.
    let web2 = resources(
        &[("backend", "10.0.0.1:81"), ("db", "10.0.0.2:1")],
        &["main"],
        &[("in", "0.0.0.0:8080")],
    );
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web2))]));
    let third = stream.recv().await;
    assert_eq!(delta_names(&third), BTreeSet::from(["backend".into()]));
    assert!(third.removed_resources.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn delta_initial_resource_versions_avoid_resending() {
    let web = web_v1();
    let server = start_default(mesh(&[("web-1", Some("web"), Arc::clone(&web))])).await;
    let clusters = web.get(CLUSTERS).unwrap();
    let mut first = delta_subscribe(Some("web-1"), CLUSTERS, &[]);
    first.initial_resource_versions = BTreeMap::from([
        (
            "backend".to_owned(),
            clusters.resources["backend"].version.clone(),
        ),
        ("db".to_owned(), "old".to_owned()),
        ("gone".to_owned(), "v0".to_owned()),
    ]);
    let mut stream = Delta::open(server.xds_addr(), first).await;
    let response = stream.recv().await;
    assert_eq!(delta_names(&response), BTreeSet::from(["db".into()]));
    assert_eq!(response.removed_resources, ["gone"]);
    server.shutdown().await;
}

#[tokio::test]
async fn delta_nack_holds_the_version_and_a_fix_resends_what_was_rejected() {
    let web = web_v1();
    let server = start_default(mesh(&[("web-1", Some("web"), Arc::clone(&web))])).await;
    let mut stream = Delta::open(
        server.xds_addr(),
        delta_subscribe(Some("web-1"), CLUSTERS, &[]),
    )
    .await;
    let initial = stream.recv().await;
    stream.ack(&initial).await;
    stream.send(delta_subscribe(None, LISTENERS, &[])).await;
    let listeners = stream.recv().await;
    stream.ack(&listeners).await;

    // backend and db change together; the proxy rejects the whole response.
    let web2 = resources(
        &[("backend", "bad"), ("db", "10.0.0.2:1")],
        &["main"],
        &[("in", "0.0.0.0:8080")],
    );
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web2))]));
    let rejected = stream.recv().await;
    assert_eq!(delta_names(&rejected).len(), 2);
    stream
        .send(DeltaDiscoveryRequest {
            type_url: CLUSTERS.into(),
            response_nonce: rejected.nonce.clone(),
            error_detail: Some(rpc::Status {
                code: i32::from(Code::InvalidArgument),
                message: "cluster \"backend\": bad address".into(),
                details: vec![],
            }),
            ..DeltaDiscoveryRequest::default()
        })
        .await;
    assert!(
        eventually(|| {
            proxy_types(&server, "web-1").is_some_and(|t| t[CLUSTERS].last_nack.is_some())
        })
        .await
    );
    // A listener change: only the listener is sent.
    let web3 = resources(
        &[("backend", "bad"), ("db", "10.0.0.2:1")],
        &["main"],
        &[("in", "0.0.0.0:9")],
    );
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web3))]));
    assert_eq!(stream.recv().await.type_url, LISTENERS);
    // The fix: backend, and db again (the proxy never applied it).
    let web4 = resources(
        &[("backend", "10.0.0.1:82"), ("db", "10.0.0.2:1")],
        &["main"],
        &[("in", "0.0.0.0:9")],
    );
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web4))]));
    let fixed = stream.recv().await;
    assert_eq!(fixed.type_url, CLUSTERS);
    assert_eq!(
        delta_names(&fixed),
        BTreeSet::from(["backend".into(), "db".into()])
    );
    let types = proxy_types(&server, "web-1").unwrap();
    let nack = types[CLUSTERS].last_nack.clone().unwrap();
    assert_eq!(nack.version, version(&web2, CLUSTERS));
    assert!(nack.error.contains("bad address"));
    server.shutdown().await;
}

#[tokio::test]
async fn sotw_and_delta_clients_end_in_the_same_state() {
    let web = web_v1();
    let server = start_default(mesh(&[("web-1", Some("web"), Arc::clone(&web))])).await;
    let mut sotw = Sotw::subscribe(server.xds_addr(), "web-1", CLUSTERS).await;
    let mut delta = Delta::open(
        server.xds_addr(),
        delta_subscribe(Some("web-1"), CLUSTERS, &[]),
    )
    .await;
    let mut sotw_state: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut delta_state: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let apply_sotw = |state: &mut BTreeMap<String, Vec<u8>>, response: &DiscoveryResponse| {
        state.clear();
        for any in &response.resources {
            let name = pb::Cluster::decode(any.value.as_slice()).unwrap().name;
            state.insert(name, any.value.clone());
        }
    };
    let apply_delta = |state: &mut BTreeMap<String, Vec<u8>>, response: &DeltaDiscoveryResponse| {
        for name in &response.removed_resources {
            state.remove(name);
        }
        for resource in &response.resources {
            state.insert(
                resource.name.clone(),
                resource.resource.clone().unwrap().value,
            );
        }
    };
    let r = sotw.recv().await;
    apply_sotw(&mut sotw_state, &r);
    sotw.ack(&r).await;
    let r = delta.recv().await;
    apply_delta(&mut delta_state, &r);
    delta.ack(&r).await;
    assert_eq!(sotw_state, delta_state);

    let web2 = resources(
        &[("backend", "10.0.0.1:81"), ("cache", "10.0.0.4:6379")],
        &["main"],
        &[],
    );
    server
        .cache()
        .set(mesh(&[("web-1", Some("web"), Arc::clone(&web2))]));
    let r = sotw.recv().await;
    apply_sotw(&mut sotw_state, &r);
    let r = delta.recv().await;
    apply_delta(&mut delta_state, &r);
    assert_eq!(sotw_state, delta_state);
    assert_eq!(sotw_state.keys().collect::<Vec<_>>(), ["backend", "cache"]);
    server.shutdown().await;
}

// ---- admin --------------------------------------------------------------------

async fn admin_get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (http::StatusCode, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut builder = http::Request::get(path).header(http::header::HOST, addr.to_string());
    if let Some(token) = token {
        builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = builder
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn admin_status_metrics_and_ready() {
    let web = web_v1();
    let server = start_default(mesh(&[("web-1", Some("web"), Arc::clone(&web))])).await;
    server
        .cache()
        .set_config_error(Some("mesh/web.yaml: unknown field".into()));
    let mut stream = Sotw::subscribe(server.xds_addr(), "web-1", CLUSTERS).await;
    let response = stream.recv().await;
    stream.ack(&response).await;
    assert!(
        eventually(|| {
            proxy_types(&server, "web-1").is_some_and(|t| t[CLUSTERS].acked_version.is_some())
        })
        .await
    );
    let admin = server.admin_addr();

    let (code, _) = admin_get(admin, "/status", None).await;
    assert_eq!(code, http::StatusCode::UNAUTHORIZED);
    let (code, _) = admin_get(admin, "/metrics", Some("wrong")).await;
    assert_eq!(code, http::StatusCode::UNAUTHORIZED);
    let (code, body) = admin_get(admin, "/ready", None).await;
    assert_eq!((code, body.as_str()), (http::StatusCode::OK, "ready\n"));

    let (code, body) = admin_get(admin, "/status", Some(TOKEN)).await;
    assert_eq!(code, http::StatusCode::OK);
    let report: StatusReport = serde_json::from_str(&body).unwrap();
    assert_eq!(report.mesh_generation, 1);
    assert_eq!(
        report.config_error.as_deref(),
        Some("mesh/web.yaml: unknown field")
    );
    assert_eq!(report.proxies.len(), 1);
    assert_eq!(report.proxies[0].node_id, "web-1");
    assert_eq!(
        report.proxies[0].types[CLUSTERS].acked_version.as_deref(),
        Some(response.version_info.as_str())
    );
    // The CLI's client reads the same thing.
    let fetched = status::fetch_json(admin, Some(TOKEN), DEADLINE)
        .await
        .unwrap();
    assert_eq!(status::parse(&fetched).unwrap(), report);
    let table = status::render_table(&report, 0);
    assert!(table.contains("web-1"), "{table}");

    let (code, metrics) = admin_get(admin, "/metrics", Some(TOKEN)).await;
    assert_eq!(code, http::StatusCode::OK);
    assert!(
        metrics.contains("weft_cp_connected_proxies 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_cp_xds_responses_total 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("weft_cp_xds_acks_total 1\n"), "{metrics}");
    assert!(metrics.contains("weft_cp_xds_nacks_total 0\n"), "{metrics}");
    assert!(
        metrics.contains("weft_cp_unauthenticated_requests_total 2\n"),
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn status_fetch_fails_clearly_when_unreachable() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind(loopback0()).unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let error = status::fetch_json(addr, None, DEADLINE).await.unwrap_err();
    assert!(error.to_string().contains("cannot connect"), "{error}");
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() {
    let server = start_default(mesh(&[("web-1", Some("web"), web_v1())])).await;
    let mut stream = Sotw::subscribe(server.xds_addr(), "web-1", CLUSTERS).await;
    stream.recv().await;
    tokio::time::timeout(DEADLINE, server.shutdown())
        .await
        .unwrap();
    let end = tokio::time::timeout(DEADLINE, stream.rx.message())
        .await
        .unwrap();
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
}

// ---- connection limits --------------------------------------------------------

async fn start_limited(limits: XdsLimits) -> Server {
    let cache = SnapshotCache::new();
    cache.set(mesh(&[
        ("web-1", Some("web"), web_v1()),
        ("other-1", Some("other"), web_v1()),
    ]));
    Server::start(ServerOptions {
        xds_addr: loopback0(),
        admin_addr: loopback0(),
        auth: Auth::token(TOKEN),
        cache,
        drain_timeout: DEADLINE,
        limits,
        identity: None,
        node_tokens: None,
    })
    .await
    .expect("server starts")
}

/// Reads until the server closes the connection; `false` if it is still
/// open at the deadline.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buffer = [0_u8; 256];
    let until_closed = async {
        // The server may send its SETTINGS first.
        while let Ok(read) = stream.read(&mut buffer).await {
            if read == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(DEADLINE, until_closed).await.is_ok()
}

/// Polls the admin `/metrics` until `line` appears.
async fn metrics_show(server: &Server, line: &str) -> bool {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (_, metrics) = admin_get(server.admin_addr(), "/metrics", Some(TOKEN)).await;
        if metrics.contains(line) {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            eprintln!("{metrics}");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_handshake_deadline() {
    let server = start_limited(XdsLimits {
        handshake_timeout: Duration::from_millis(200),
        ..XdsLimits::default()
    })
    .await;
    // A proxy's connection, opened first: its deadline passes before the
    // silent one's.
    let mut stream = Sotw::subscribe(server.xds_addr(), "web-1", CLUSTERS).await;
    let first = stream.recv().await;
    stream.ack(&first).await;

    let mut silent = TcpStream::connect(server.xds_addr()).await.unwrap();
    assert!(
        closed_by_server(&mut silent).await,
        "a silent connection is closed"
    );
    assert!(metrics_show(&server, "weft_cp_xds_handshake_timeouts_total 1\n").await);

    // The established stream outlived its own deadline and still works.
    let web2 = resources(&[("backend", "10.0.0.1:81")], &["main"], &[]);
    server.cache().set(mesh(&[
        ("web-1", Some("web"), Arc::clone(&web2)),
        ("other-1", Some("other"), web_v1()),
    ]));
    assert_eq!(stream.recv().await.version_info, version(&web2, CLUSTERS));
    server.shutdown().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_while_the_others_keep_working() {
    let server = start_limited(XdsLimits {
        max_connections: 2,
        ..XdsLimits::default()
    })
    .await;
    let mut web = Sotw::subscribe(server.xds_addr(), "web-1", CLUSTERS).await;
    web.recv().await;
    let mut other = Sotw::subscribe(server.xds_addr(), "other-1", CLUSTERS).await;
    other.recv().await;

    let mut third = TcpStream::connect(server.xds_addr()).await.unwrap();
    assert!(
        closed_by_server(&mut third).await,
        "a connection over the cap is closed"
    );
    assert!(metrics_show(&server, "weft_cp_xds_connections_refused_total 1\n").await);
    assert!(metrics_show(&server, "weft_cp_xds_connections 2\n").await);

    // Both admitted connections keep receiving pushes.
    let next = resources(&[("backend", "10.0.0.1:81")], &["main"], &[]);
    server.cache().set(mesh(&[
        ("web-1", Some("web"), Arc::clone(&next)),
        ("other-1", Some("other"), Arc::clone(&next)),
    ]));
    assert_eq!(web.recv().await.version_info, version(&next, CLUSTERS));
    assert_eq!(other.recv().await.version_info, version(&next, CLUSTERS));

    // A connection that ends frees its slot.
    drop(other);
    assert!(metrics_show(&server, "weft_cp_xds_connections 1\n").await);
    let mut again = Sotw::subscribe(server.xds_addr(), "other-1", CLUSTERS).await;
    again.recv().await;
    server.shutdown().await;
}
