use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use weft_proto::config::v1 as pb;
use weft_proxy::config::proto::{bootstrap_from_resources, unpack};
use weft_proxy::config::{BootstrapSpec, ClusterSpec, RouteConfigSpec, RouteSpec};

use super::*;
use crate::resources::NodeResources;

fn files(sources: &[(&str, &str)]) -> Vec<SourceFile> {
    sources
        .iter()
        .map(|(name, text)| SourceFile {
            name: (*name).into(),
            text: (*text).to_owned(),
        })
        .collect()
}

fn errors(sources: &[(&str, &str)]) -> Vec<String> {
    let result = Mesh::parse(&files(sources)).and_then(|mesh| mesh.snapshot());
    match result {
        Ok(_) => Vec::new(),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

fn snapshot(sources: &[(&str, &str)]) -> MeshSnapshot {
    match Mesh::parse(&files(sources)).and_then(|mesh| mesh.snapshot()) {
        Ok(snapshot) => snapshot,
        Err(errors) => panic!("unexpected errors:\n{errors}"),
    }
}

/// A node's resources back as the proxy's spec, for readable assertions.
fn node_spec(resources: &NodeResources) -> BootstrapSpec {
    fn all<M: weft_proto::prost::Name + Default>(resources: &NodeResources, url: &str) -> Vec<M> {
        resources.types[url]
            .resources
            .values()
            .map(|r| unpack(&r.resource).unwrap())
            .collect()
    }
    bootstrap_from_resources(
        all::<pb::Listener>(resources, pb::LISTENER_TYPE_URL),
        all::<pb::RouteConfiguration>(resources, pb::ROUTE_CONFIGURATION_TYPE_URL),
        all::<pb::Cluster>(resources, pb::CLUSTER_TYPE_URL),
        all::<pb::Policy>(resources, pb::POLICY_TYPE_URL),
    )
    .unwrap()
}

fn node(snapshot: &MeshSnapshot, id: &str) -> BootstrapSpec {
    let entry = snapshot
        .nodes
        .get(id)
        .unwrap_or_else(|| panic!("no node {id:?} in {:?}", snapshot.nodes.keys()));
    node_spec(&entry.resources)
}

fn cluster_names(spec: &BootstrapSpec) -> Vec<&str> {
    spec.clusters.iter().map(|c| c.name.as_str()).collect()
}

fn cluster<'a>(spec: &'a BootstrapSpec, name: &str) -> &'a ClusterSpec {
    spec.clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name:?}"))
}

fn route_config<'a>(spec: &'a BootstrapSpec, name: &str) -> &'a RouteConfigSpec {
    spec.route_configs
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no route config {name:?}"))
}

fn endpoints(cluster: &ClusterSpec) -> Vec<&str> {
    cluster
        .endpoints
        .iter()
        .map(|e| e.address.as_str())
        .collect()
}

fn weights(route: &RouteSpec) -> Vec<(&str, u32)> {
    route
        .weighted_clusters
        .iter()
        .flatten()
        .map(|w| (w.cluster.as_str(), w.weight))
        .collect()
}

const CANARY: &str = r#"
services:
  - name: web
    workloads:
      - { name: web-1, app: "127.0.0.1:9001", inbound: "127.0.0.1:9101", outbound: "127.0.0.1:9201" }
    calls: [api]
  - name: api
    protocol: http2
    timeout: 5s
    workloads:
      - { name: api-a, version: v1, app: "127.0.0.1:9002", inbound: "127.0.0.1:9102" }
      - { name: api-b, version: v1, app: "127.0.0.1:9003", inbound: "127.0.0.1:9103" }
      - { name: api-c, version: v2, app: "127.0.0.1:9004", inbound: "127.0.0.1:9104" }
    routes:
      - name: canary
        match: { prefix: /, headers: [{ name: x-canary, exact: "1" }] }
        version: v2
      - name: default
        split: { v1: 90, v2: 10 }
        timeout: 2s
"#;

#[test]
fn invalid_meshes_name_file_resource_and_field() {
    let ok_service = r#"
services:
  - name: api
    workloads:
      - { name: api-1, version: v1, app: "127.0.0.1:9011", inbound: "127.0.0.1:9102" }
      - { name: api-2, version: v2, app: "127.0.0.1:9003", inbound: "127.0.0.1:9103" }
"#;
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "a caller identity where no caller has one",
            r#"
services:
  - name: web
    workloads: [{ name: web-1, app: "127.0.0.1:9001", inbound: "127.0.0.1:9101" }]
    routes:
      - { name: r0, match: { source_identities: ["spiffe://x.org/ns/a/sa/b"] } }
"#,
            &[
                r#"m.yaml: service "web": routes[0].match.source_identities: never matches here: these routes run where the caller has no certificate (use a proxy configuration for an mTLS listener)"#,
            ],
        ),
        (
            "unknown version in a split",
            r#"
services:
  - name: web
    workloads: [{ name: web-1, app: "127.0.0.1:9001", inbound: "127.0.0.1:9101" }]
    routes:
      - { name: r0, version: v1 }
      - { name: r1, split: { v1: 1, v3: 1 } }
"#,
            &[
                r#"m.yaml: service "web": routes[0].version: unknown version "v1" (workloads have no versions)"#,
                r#"m.yaml: service "web": routes[1].split.v1: unknown version "v1" (workloads have no versions)"#,
                r#"m.yaml: service "web": routes[1].split.v3: unknown version "v3" (workloads have no versions)"#,
            ],
        ),
        (
            "unknown service in calls and gateway routes",
            r#"
services:
  - name: web
    workloads: [{ name: web-1, app: "127.0.0.1:9001", inbound: "127.0.0.1:9101", outbound: "127.0.0.1:9201" }]
    calls: [api, nope, api]
gateways:
  - name: gw
    listeners:
      - name: http
        address: 127.0.0.1:9000
        routes:
          - { name: a, service: nope }
          - { name: b, service: api, version: v3 }
          - { name: c, service: api, split: { v1: 0, v2: 0 } }
          - { name: d, service: api, version: v1, split: { v1: 1 } }
          - { name: e, service: api, hosts: ["api.example.com:80", "*.ok.com", "*"] }
          - { name: e, service: api, hosts: [] }
"#,
            &[
                r#"m.yaml: service "web": calls[1]: unknown service "nope""#,
                r#"m.yaml: service "web": calls[2]: "api" is listed twice"#,
                r#"m.yaml: gateway "gw": listeners[0].routes[0].service: unknown service "nope""#,
                r#"m.yaml: gateway "gw": listeners[0].routes[1].version: unknown version "v3" (workloads have v1, v2)"#,
                r#"m.yaml: gateway "gw": listeners[0].routes[2].split: weights sum to 0 (at least one must be positive)"#,
                r#"m.yaml: gateway "gw": listeners[0].routes[3]: set version or split, not both"#,
                r#"m.yaml: gateway "gw": listeners[0].routes[4].hosts[0]: invalid host "api.example.com:80" (expected host, *.suffix or *, without a port)"#,
                r#"m.yaml: gateway "gw": listeners[0].routes[5].name: duplicate route "e""#,
                r#"m.yaml: gateway "gw": listeners[0].routes[5].hosts: must list at least one host (omit it for any host)"#,
            ],
        ),
        (
            "bad names, values and addresses",
            r#"
services:
  - name: Web_1
    protocol: grpc
    lb: fastest
    connect_timeout: 0s
    workloads:
      - { name: w, version: "V1", app: "localhost:9001", inbound: "0.0.0.0:9101", outbound: "127.0.0.1:x" }
      - { name: w2, app: "127.0.0.1:0", inbound: "127.0.0.1:0" }
  - name: empty
    workloads: []
"#,
            &[
                r#"m.yaml: service "Web_1": name: invalid name "Web_1" (expected 1-63 lowercase letters, digits or '-', not starting or ending with '-')"#,
                r#"m.yaml: service "Web_1": protocol: unknown value "grpc" (expected http1, http2, tcp)"#,
                r#"m.yaml: service "Web_1": lb: unknown value "fastest" (expected round_robin, random, least_request)"#,
                r#"m.yaml: service "Web_1": connect_timeout: must be greater than zero"#,
                r#"m.yaml: service "Web_1": workloads[0].version: invalid name "V1""#,
                r#"m.yaml: service "Web_1": workloads[0].app: invalid socket address "localhost:9001" (expected IP:PORT)"#,
                r#"m.yaml: service "Web_1": workloads[0].inbound: 0.0.0.0:9101: callers connect to this address, so it must not be unspecified"#,
                r#"m.yaml: service "Web_1": workloads[0].outbound: invalid socket address "127.0.0.1:x" (expected IP:PORT)"#,
                r#"m.yaml: service "Web_1": workloads[1].app: 127.0.0.1:0: port 0 is not allowed here (proxies connect to this address)"#,
                r#"m.yaml: service "Web_1": workloads[1].inbound: 127.0.0.1:0: port 0 is not allowed here (proxies connect to this address)"#,
                r#"m.yaml: service "empty": workloads: a service needs at least one workload"#,
            ],
        ),
        (
            "duplicates across files name both files",
            r#"
services:
  - name: api
    workloads: [{ name: api-1, app: "127.0.0.1:9004", inbound: "127.0.0.1:9102" }]
gateways:
  - name: api-2
    listeners:
      - name: http
        address: 127.0.0.1:9011
        routes: [{ name: all, service: api }]
      - name: http
        address: 0.0.0.0:9011
        routes: [{ name: all, service: api }]
"#,
            &[
                r#"m.yaml: service "api": name: duplicate service name (also defined in a.yaml)"#,
                r#"m.yaml: service "api": workloads[0].name: node id "api-1" is already used by a workload of service "api" (a.yaml)"#,
                r#"m.yaml: service "api": workloads[0].inbound: 127.0.0.1:9102 is already used by service "api" workloads[0].inbound (a.yaml)"#,
                r#"m.yaml: gateway "api-2": name: node id "api-2" is already used by a workload of service "api" (a.yaml)"#,
                r#"m.yaml: gateway "api-2": listeners[1].name: duplicate listener "http""#,
                r#"m.yaml: gateway "api-2": listeners[1].address: 0.0.0.0:9011 is already used by gateway "api-2" listeners[0].address (m.yaml)"#,
                r#"a.yaml: service "api": workloads[0].app: 127.0.0.1:9011 is a listener of gateway "api-2" listeners[0].address (m.yaml)"#,
            ],
        ),
        (
            "unknown fields are syntax errors with the file",
            r#"
services:
  - name: web
    workloads: [{ name: web-1, app: "127.0.0.1:9001", inbound: "127.0.0.1:9101", outbnd: x }]
"#,
            &["m.yaml: services[0].workloads[0]: unknown field `outbnd`"],
        ),
        (
            "what only the proxy checks is reported per node",
            r#"
services:
  - name: web
    workloads: [{ name: web-1, app: "127.0.0.1:9001", inbound: "127.0.0.1:9101", outbound: "127.0.0.1:9201" }]
    calls: [web]
    routes:
      - { name: bad, match: { prefix: nope } }
"#,
            &[
                r#"m.yaml: node "web-1": route_config "outbound": virtual_hosts[0].routes[0].match.prefix:"#,
            ],
        ),
    ];
    for (what, yaml, expected) in cases {
        // a.yaml is read first: duplicates are reported in the later file.
        let got = errors(&[("a.yaml", ok_service), ("m.yaml", yaml)]);
        for want in *expected {
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "{what}: missing {want:?} in:\n{}",
                got.join("\n")
            );
        }
        assert_eq!(got.len(), expected.len(), "{what}:\n{}", got.join("\n"));
    }
}

#[test]
fn calling_itself_and_empty_files_are_allowed() {
    let snapshot = snapshot(&[
        ("empty.yaml", "# nothing yet\n"),
        (
            "m.yaml",
            r#"
services:
  - name: cache
    workloads: [{ name: cache-1, app: "127.0.0.1:9001", inbound: "127.0.0.1:9101", outbound: "127.0.0.1:9201" }]
    calls: [cache]
"#,
        ),
    ]);
    let spec = node(&snapshot, "cache-1");
    assert_eq!(cluster_names(&spec), ["cache", "local_app"]);
}

#[test]
fn sidecar_gets_inbound_outbound_and_only_the_clusters_its_routes_use() {
    let snapshot = snapshot(&[("m.yaml", CANARY)]);
    assert_eq!(
        snapshot.nodes.keys().collect::<Vec<_>>(),
        ["api-a", "api-b", "api-c", "web-1"]
    );
    assert_eq!(snapshot.nodes["web-1"].service.as_deref(), Some("web"));
    assert_eq!(snapshot.nodes["api-c"].service.as_deref(), Some("api"));

    let web = node(&snapshot, "web-1");
    let listeners: Vec<(&str, &str, Option<&str>)> = web
        .listeners
        .iter()
        .map(|l| {
            (
                l.name.as_str(),
                l.address.as_str(),
                l.route_config.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        listeners,
        [
            ("inbound", "127.0.0.1:9101", Some("inbound")),
            ("outbound", "127.0.0.1:9201", Some("outbound")),
        ]
    );
    // The whole service is not referenced by any route: no `api` cluster.
    assert_eq!(cluster_names(&web), ["api.v1", "api.v2", "local_app"]);
    assert_eq!(
        endpoints(cluster(&web, "api.v1")),
        ["127.0.0.1:9102", "127.0.0.1:9103"]
    );
    assert_eq!(endpoints(cluster(&web, "api.v2")), ["127.0.0.1:9104"]);
    assert_eq!(
        cluster(&web, "api.v1").protocol.as_deref(),
        Some("http2"),
        "callers speak the callee's protocol"
    );
    assert_eq!(endpoints(cluster(&web, "local_app")), ["127.0.0.1:9001"]);

    let outbound = route_config(&web, "outbound");
    assert_eq!(outbound.virtual_hosts.len(), 1);
    let api = &outbound.virtual_hosts[0];
    assert_eq!(api.domains, ["api"]);
    let [canary, default] = api.routes.as_slice() else {
        panic!("two routes expected: {:?}", api.routes);
    };
    // A header-matched version route.
    assert_eq!(canary.name.as_deref(), Some("canary"));
    assert_eq!(canary.cluster.as_deref(), Some("api.v2"));
    let headers = canary.matcher.as_ref().unwrap().headers.as_ref().unwrap();
    assert_eq!(headers[0].name, "x-canary");
    assert_eq!(
        canary.timeout,
        Some(Duration::from_secs(5)),
        "service timeout"
    );
    // A split becomes a weighted route over subset clusters.
    assert_eq!(weights(default), [("api.v1", 90), ("api.v2", 10)]);
    assert_eq!(default.cluster, None);
    assert_eq!(
        default.timeout,
        Some(Duration::from_secs(2)),
        "route timeout"
    );

    // The callee's sidecar: inbound only, to its app, in its protocol.
    let api_c = node(&snapshot, "api-c");
    assert_eq!(api_c.listeners.len(), 1);
    assert_eq!(cluster_names(&api_c), ["local_app"]);
    assert_eq!(
        cluster(&api_c, "local_app").protocol.as_deref(),
        Some("http2")
    );
    assert_eq!(endpoints(cluster(&api_c, "local_app")), ["127.0.0.1:9004"]);
    let inbound = route_config(&api_c, "inbound");
    assert_eq!(inbound.virtual_hosts[0].domains, ["*"]);
    assert_eq!(
        inbound.virtual_hosts[0].routes[0].cluster.as_deref(),
        Some("local_app")
    );
}

#[test]
fn a_service_without_routes_gets_one_route_to_every_workload() {
    let yaml = CANARY.replace("calls: [api]", "calls: [web]");
    let snapshot = snapshot(&[("m.yaml", &yaml)]);
    let web = node(&snapshot, "web-1");
    assert_eq!(cluster_names(&web), ["local_app", "web"]);
    let vhost = &route_config(&web, "outbound").virtual_hosts[0];
    assert_eq!(vhost.routes.len(), 1);
    assert_eq!(vhost.routes[0].cluster.as_deref(), Some("web"));
    assert_eq!(vhost.routes[0].matcher, None);
}

#[test]
fn gateway_routes_keep_first_match_order_across_hosts() {
    let gateway = r#"
gateways:
  - name: gw
    listeners:
      - name: http
        address: 127.0.0.1:9000
        routes:
          - { name: admin, hosts: [admin.example.com], match: { prefix: /admin/ }, service: web }
          - { name: v2, hosts: ["*.example.com"], match: { prefix: /v2/ }, service: api, version: v2, prefix_rewrite: / }
          - { name: rest, service: api, split: { v1: 3, v2: 1 }, timeout: 1s }
"#;
    let snapshot = snapshot(&[("a.yaml", CANARY), ("b.yaml", gateway)]);
    assert_eq!(snapshot.nodes["gw"].service, None);
    let gw = node(&snapshot, "gw");
    assert_eq!(gw.listeners.len(), 1);
    assert_eq!(gw.listeners[0].address, "127.0.0.1:9000");
    // A gateway believes nothing its clients say about themselves; a
    // sidecar keeps the request ids its callers propagate.
    assert_eq!(gw.listeners[0].xff_num_trusted_hops, None);
    assert_eq!(gw.listeners[0].preserve_request_id, None);
    let web = node(&snapshot, "web-1");
    assert!(
        web.listeners
            .iter()
            .all(|l| l.preserve_request_id == Some(true) && l.xff_num_trusted_hops.is_none()),
        "{:?}",
        web.listeners
    );
    assert_eq!(cluster_names(&gw), ["api.v1", "api.v2", "web"]);
    let vhosts: BTreeMap<&str, Vec<&str>> = route_config(&gw, "http")
        .virtual_hosts
        .iter()
        .map(|v| {
            (
                v.domains[0].as_str(),
                v.routes
                    .iter()
                    .map(|r| r.name.as_deref().unwrap())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        vhosts,
        BTreeMap::from([
            ("*", vec!["rest"]),
            ("*.example.com", vec!["v2", "rest"]),
            ("admin.example.com", vec!["admin", "v2", "rest"]),
        ])
    );
    let rest = &route_config(&gw, "http").virtual_hosts[0].routes[0];
    assert_eq!(weights(rest), [("api.v1", 3), ("api.v2", 1)]);
    assert_eq!(rest.timeout, Some(Duration::from_secs(1)));
}

#[test]
fn host_patterns_cover_what_the_proxy_would_route_to_a_virtual_host() {
    let cases = [
        ("*", "a.com", true),
        ("a.com", "a.com", true),
        ("a.com", "b.com", false),
        ("*.com", "a.com", true),
        ("*.com", "*.a.com", true),
        ("*.a.com", "*.com", false),
        ("*.a.com", "a.com", false),
        ("*.a.com", "xa.com", false),
        ("a.com", "*", false),
    ];
    for (pattern, domain, want) in cases {
        assert_eq!(
            build::covers(pattern, domain),
            want,
            "{pattern} vs {domain}"
        );
    }
}

#[test]
fn building_twice_gives_identical_resources() {
    let first = snapshot(&[("m.yaml", CANARY)]);
    let second = snapshot(&[("m.yaml", CANARY)]);
    for (id, entry) in &first.nodes {
        assert_eq!(*entry.resources, *second.nodes[id].resources, "{id}");
    }
    // A change to one service changes its callers, not unrelated nodes.
    let changed = snapshot(&[("m.yaml", &CANARY.replace("v1: 90", "v1: 80"))]);
    assert_ne!(
        *changed.nodes["web-1"].resources,
        *first.nodes["web-1"].resources
    );
    assert_eq!(
        *changed.nodes["api-a"].resources,
        *first.nodes["api-a"].resources
    );
}

#[test]
fn demo_mesh_validates_and_builds_every_node() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo");
    let snapshot = match build_dir(&dir) {
        Ok(snapshot) => snapshot,
        Err(errors) => panic!("config/demo is invalid:\n{errors}"),
    };
    assert_eq!(
        snapshot.nodes.keys().collect::<Vec<_>>(),
        [
            "backend-v1",
            "backend-v1b",
            "backend-v2",
            "echo-1",
            "frontend-1",
            "ingress",
            "ledger-1"
        ]
    );
    let frontend = node(&snapshot, "frontend-1");
    let listeners: Vec<&str> = frontend.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(listeners, ["inbound", "outbound", "outbound.ledger"]);
    assert_eq!(
        cluster_names(&frontend),
        ["backend.v1", "backend.v2", "echo", "ledger", "local_app"]
    );
    assert!(cluster(&frontend, "ledger").tls.is_some());
    let ledger = node(&snapshot, "ledger-1");
    assert_eq!(ledger.listeners[0].protocol.as_deref(), Some("tcp"));
    assert_eq!(
        ledger.listeners[0].policy.as_deref(),
        Some("ledger-callers")
    );
    let hosts: Vec<&str> = route_config(&frontend, "outbound")
        .virtual_hosts
        .iter()
        .map(|v| v.domains[0].as_str())
        .collect();
    assert_eq!(hosts, ["backend", "echo"]);
    assert_eq!(
        cluster(&frontend, "echo").protocol.as_deref(),
        Some("http2")
    );
    // The backend service's resilience reaches its callers: retries on
    // every route to it, outlier detection on its clusters.
    let backend_routes = &route_config(&frontend, "outbound").virtual_hosts[0].routes;
    assert!(
        backend_routes
            .iter()
            .all(|r| r.retry_policy.as_ref().and_then(|p| p.num_retries) == Some(2))
    );
    assert_eq!(
        cluster(&frontend, "backend.v2")
            .outlier_detection
            .as_ref()
            .and_then(|o| o.consecutive_gateway_errors),
        Some(5)
    );
    let health = cluster(&frontend, "backend.v1").health_check.as_ref();
    assert_eq!(
        health
            .and_then(|h| h.http.as_ref())
            .map(|h| h.path.as_str()),
        Some("/healthz")
    );
    assert!(cluster(&frontend, "echo").health_check.is_none());

    assert_eq!(
        endpoints(cluster(&frontend, "backend.v1")).len(),
        2,
        "backend-v1b beside backend-v1: one can be ejected"
    );
    for id in [
        "backend-v1",
        "backend-v1b",
        "backend-v2",
        "echo-1",
        "ledger-1",
    ] {
        let spec = node(&snapshot, id);
        assert_eq!(spec.listeners.len(), 1, "{id}");
        assert_eq!(cluster_names(&spec), ["local_app"], "{id}");
    }

    let ingress = node(&snapshot, "ingress");
    assert_eq!(ingress.listeners[0].address, "127.0.0.1:15000");
    assert_eq!(
        cluster_names(&ingress),
        ["backend.v1", "backend.v2", "frontend", "ledger"]
    );
    assert_eq!(ingress.listeners[1].protocol.as_deref(), Some("tcp"));
    assert_eq!(ingress.listeners[1].cluster.as_deref(), Some("ledger"));
    let routes: Vec<(&str, Option<&str>)> = route_config(&ingress, "http").virtual_hosts[0]
        .routes
        .iter()
        .map(|r| (r.name.as_deref().unwrap(), r.prefix_rewrite.as_deref()))
        .collect();
    assert_eq!(
        routes,
        [
            ("frontend", Some("/")),
            ("backend-canary", Some("/")),
            ("backend", Some("/")),
        ]
    );
}

#[test]
fn only_visible_yaml_and_policy_files_are_mesh_files() {
    let cases = [
        ("a.yaml", true),
        ("a.yml", true),
        ("a.yaml~", false),
        (".a.yaml.swp", false),
        (".#a.yaml", false),
        // What policies name: Rego modules and JSON data.
        ("a.json", true),
        ("a.rego", true),
        (".a.rego.swp", false),
        ("a.rego~", false),
        ("a.txt", false),
    ];
    for (name, want) in cases {
        assert_eq!(is_mesh_file(Path::new(name)), want, "{name}");
    }
}

const MTLS_MESH: &str = r#"
trust_domain: example.org
services:
  - name: web
    namespace: shop
    calls: [api, legacy]
    workloads:
      - { name: web-1, app: "127.0.0.1:8080", inbound: "127.0.0.1:15001", outbound: "127.0.0.1:15002" }
  - name: api
    service_account: api-runner
    workloads:
      - { name: api-1, app: "127.0.0.1:8081", inbound: "127.0.0.1:15011" }
  - name: legacy
    mtls: disable
    workloads:
      - { name: legacy-1, app: "127.0.0.1:8082", inbound: "127.0.0.1:15021" }
gateways:
  - name: edge
    listeners:
      - name: http
        address: "127.0.0.1:0"
        routes: [{ name: api, service: api }]
"#;

#[test]
fn a_trust_domain_gives_every_node_an_identity_and_mtls_between_sidecars() {
    let snapshot = snapshot(&[("mesh.yaml", MTLS_MESH)]);
    assert_eq!(snapshot.trust_domain.as_deref(), Some("example.org"));
    let identity = |node: &str| snapshot.nodes[node].identity.clone().unwrap();
    assert_eq!(identity("web-1"), "spiffe://example.org/ns/shop/sa/web");
    assert_eq!(
        identity("api-1"),
        "spiffe://example.org/ns/default/sa/api-runner"
    );
    assert_eq!(identity("edge"), "spiffe://example.org/ns/default/sa/edge");

    // Inbound: strict mTLS with the workload's own identity, unless the
    // service opts out.
    let api = node(&snapshot, "api-1");
    let inbound = api.listeners.iter().find(|l| l.name == "inbound").unwrap();
    let tls = inbound.tls.as_ref().unwrap();
    assert_eq!(
        tls.workload_identity.as_deref(),
        Some("spiffe://example.org/ns/default/sa/api-runner")
    );
    assert!(tls.certificates.is_empty() && tls.client_ca_file.is_none());
    let legacy = node(&snapshot, "legacy-1");
    assert!(legacy.listeners.iter().all(|l| l.tls.is_none()));
    // Local hops stay cleartext: the app cluster and the outbound listener.
    let web = node(&snapshot, "web-1");
    assert!(cluster(&web, "local_app").tls.is_none());
    assert!(
        web.listeners
            .iter()
            .find(|l| l.name == "outbound")
            .unwrap()
            .tls
            .is_none()
    );

    // Outbound: the caller's identity, the callee's expected.
    let to_api = cluster(&web, "api").tls.as_ref().unwrap();
    assert_eq!(
        to_api.workload_identity.as_deref(),
        Some("spiffe://example.org/ns/shop/sa/web")
    );
    assert_eq!(
        to_api.server_identity.as_deref(),
        Some("spiffe://example.org/ns/default/sa/api-runner")
    );
    assert!(to_api.ca_file.is_none());
    assert!(cluster(&web, "legacy").tls.is_none());
    let edge = node(&snapshot, "edge");
    assert_eq!(
        cluster(&edge, "api")
            .tls
            .as_ref()
            .unwrap()
            .workload_identity
            .as_deref(),
        Some("spiffe://example.org/ns/default/sa/edge")
    );

    // Without a trust domain nothing changes: no identity, no TLS.
    let plain = MTLS_MESH
        .replace("trust_domain: example.org\n", "")
        .replace("    mtls: disable\n", "");
    let snapshot = super::tests::snapshot(&[("mesh.yaml", &plain)]);
    assert!(snapshot.nodes.values().all(|n| n.identity.is_none()));
    assert!(
        node(&snapshot, "api-1")
            .listeners
            .iter()
            .all(|l| l.tls.is_none())
    );
}

#[test]
fn identity_fields_are_checked() {
    let bad = MTLS_MESH
        .replace("namespace: shop", "namespace: Shop")
        .replace("mtls: disable", "mtls: sometimes");
    let found = errors(&[("mesh.yaml", &bad)]);
    assert!(
        found
            .iter()
            .any(|e| e.contains("service \"web\": namespace: invalid name \"Shop\"")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|e| e.contains("service \"legacy\": mtls: unknown value \"sometimes\"")),
        "{found:?}"
    );
    let no_domain = MTLS_MESH
        .replace("trust_domain: example.org\n", "")
        .replace("mtls: disable", "mtls: strict");
    let found = errors(&[("mesh.yaml", &no_domain)]);
    assert!(
        found
            .iter()
            .any(|e| e.contains("mtls: strict needs the mesh's trust_domain")),
        "{found:?}"
    );
    assert!(
        !found.iter().any(|e| e.contains("service \"web\": mtls")),
        "{found:?}"
    );
    let found = errors(&[
        ("a.yaml", MTLS_MESH),
        ("b.yaml", "trust_domain: other.org\n"),
    ]);
    assert!(
        found.iter().any(|e| e.starts_with("b.yaml: mesh \"trust_domain\": trust_domain: \"other.org\" disagrees with \"example.org\" set in a.yaml")),
        "{found:?}"
    );
    let found = errors(&[(
        "a.yaml",
        &MTLS_MESH.replace("trust_domain: example.org", "trust_domain: Example.org"),
    )]);
    assert!(
        found
            .iter()
            .any(|e| e.contains("invalid trust domain \"Example.org\"")),
        "{found:?}"
    );
}

#[test]
fn faults_and_rate_limits_reach_callers_inbound_listeners_and_gateways() {
    let yaml = r#"
services:
  - name: web
    workloads: [{ name: web-1, app: "127.0.0.1:9001", inbound: "127.0.0.1:9101", outbound: "127.0.0.1:9201" }]
    calls: [api]
  - name: api
    fault: { abort: { http_status: 503, percent: 5 } }
    stream_idle_timeout: 1m
    rate_limit: { per_client: { requests_per_second: 50 } }
    workloads: [{ name: api-1, app: "127.0.0.1:9011", inbound: "127.0.0.1:9102" }]
    routes:
      - { name: slow, match: { prefix: /slow }, fault: { delay: { duration: 1s } } }
      - { name: rest }
gateways:
  - name: gw
    listeners:
      - name: http
        address: 127.0.0.1:9000
        rate_limit: { requests_per_second: 1000 }
        routes:
          - { name: api, service: api, rate_limit: { requests_per_second: 10 } }
"#;
    let snapshot = snapshot(&[("m.yaml", yaml)]);
    // Callers inject the service's faults; a route's own replaces them.
    let web = node(&snapshot, "web-1");
    let routes = &route_config(&web, "outbound").virtual_hosts[0].routes;
    let delay = routes[0].fault.as_ref().and_then(|f| f.delay.as_ref());
    assert_eq!(delay.and_then(|d| d.duration), Some(Duration::from_secs(1)));
    assert!(routes[0].fault.as_ref().unwrap().abort.is_none());
    assert!(
        routes
            .iter()
            .all(|r| r.stream_idle_timeout == Some(Duration::from_secs(60)))
    );
    let abort = routes[1].fault.as_ref().and_then(|f| f.abort.as_ref());
    assert_eq!(abort.and_then(|a| a.http_status), Some(503));
    // Each workload's inbound listener enforces the service's limit.
    let api = node(&snapshot, "api-1");
    let inbound = api.listeners.iter().find(|l| l.name == "inbound").unwrap();
    assert_eq!(
        inbound
            .rate_limit
            .as_ref()
            .and_then(|l| l.per_client.as_ref())
            .map(|c| c.requests_per_second),
        Some(50.0)
    );
    let gw = node(&snapshot, "gw");
    assert_eq!(
        gw.listeners[0]
            .rate_limit
            .as_ref()
            .and_then(|l| l.requests_per_second),
        Some(1000.0)
    );
    let route = &route_config(&gw, "http").virtual_hosts[0].routes[0];
    assert_eq!(
        route
            .rate_limit
            .as_ref()
            .and_then(|l| l.requests_per_second),
        Some(10.0)
    );
    assert!(
        route
            .fault
            .as_ref()
            .and_then(|f| f.abort.as_ref())
            .is_some()
    );

    // A bad fault is reported with its file and field.
    let bad = yaml.replace("percent: 5", "percent: 500");
    let errors = errors(&[("m.yaml", &bad)]);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("m.yaml") && e.contains("fault.abort.percent")),
        "{errors:?}"
    );
}

const POLICY_MESH: &str = r#"
services:
  - name: frontend
    workloads:
      - { name: frontend-1, app: "127.0.0.1:9101", inbound: "127.0.0.1:9201", outbound: "127.0.0.1:9301" }
    calls: [backend]
  - name: backend
    policy: backend-authz
    workloads:
      - { name: backend-1, app: "127.0.0.1:9102", inbound: "127.0.0.1:9202" }
gateways:
  - name: gw
    listeners:
      - name: http
        address: "127.0.0.1:9000"
        policy: edge
        routes:
          - { name: backend, service: backend, policy: backend-authz }
policies:
  - name: backend-authz
    rego_files: [backend-authz.rego]
    data_file: callers.json
  - name: edge
    rego: |
      package envoy.authz
      default allow := true
"#;

const BACKEND_REGO: &str = "package envoy.authz\n\
    default allow := false\n\
    allow if input.attributes.source.principal in data.callers\n";

const BACKEND_TESTS: &str = "package envoy.authz_test\n\
    import data.envoy.authz\n\
    test_known_caller if authz.allow with input as {\"attributes\": {\"source\": {\"principal\": \"a\"}}}\n\
    test_unknown_caller if authz.allow with input as {\"attributes\": {\"source\": {\"principal\": \"z\"}}}\n";

fn policy_files(rego: &str) -> Vec<(&'static str, String)> {
    vec![
        ("dir/mesh.yaml", POLICY_MESH.to_owned()),
        ("dir/backend-authz.rego", rego.to_owned()),
        ("dir/backend-authz_test.rego", BACKEND_TESTS.to_owned()),
        ("dir/callers.json", r#"{"callers": ["a", "b"]}"#.to_owned()),
    ]
}

fn as_sources<'a>(files: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    files.iter().map(|(n, t)| (*n, t.as_str())).collect()
}

#[test]
fn policies_are_inlined_and_sent_only_to_the_nodes_that_name_them() {
    let files = policy_files(BACKEND_REGO);
    let snapshot = snapshot(&as_sources(&files));

    let backend = node(&snapshot, "backend-1");
    let inbound = backend
        .listeners
        .iter()
        .find(|l| l.name == "inbound")
        .unwrap();
    assert_eq!(inbound.policy.as_deref(), Some("backend-authz"));
    assert_eq!(backend.policies.len(), 1);
    let policy = &backend.policies[0];
    assert_eq!(policy.name, "backend-authz");
    assert_eq!(policy.rego_files, None);
    assert_eq!(policy.data_file, None);
    let modules = policy.modules.as_deref().unwrap();
    assert_eq!(modules.len(), 1);
    assert_eq!(modules[0].name, "dir/backend-authz.rego");
    assert_eq!(modules[0].rego, BACKEND_REGO);
    assert_eq!(
        policy.data,
        Some(serde_json::json!({ "callers": ["a", "b"] }))
    );

    let gateway = node(&snapshot, "gw");
    assert_eq!(gateway.listeners[0].policy.as_deref(), Some("edge"));
    let routes = &gateway.route_configs[0].virtual_hosts[0].routes;
    assert_eq!(routes[0].policy.as_deref(), Some("backend-authz"));
    let mut names: Vec<&str> = gateway.policies.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["backend-authz", "edge"]);

    // frontend names no policy: it is sent none.
    assert!(node(&snapshot, "frontend-1").policies.is_empty());
}

#[test]
fn policy_unit_tests_run_against_the_policy() {
    let files = policy_files(BACKEND_REGO);
    let mesh = Mesh::parse(&self::files(&as_sources(&files))).unwrap();
    let reports = mesh.run_policy_tests();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].policy, "backend-authz");
    let outcomes = reports[0].outcomes.as_ref().unwrap();
    let results: Vec<(&str, bool)> = outcomes
        .iter()
        .map(|o| (o.rule.as_str(), o.passed()))
        .collect();
    assert_eq!(
        results,
        [
            ("data.envoy.authz_test.test_known_caller", true),
            ("data.envoy.authz_test.test_unknown_caller", false),
        ]
    );
}

#[test]
fn broken_or_missing_policies_are_reported_with_file_resource_and_line() {
    // Rego that does not parse: the YAML file, the policy, and the Rego
    // file's line.
    let files = policy_files("package envoy.authz\nallow if {\n");
    let found = errors(&as_sources(&files));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("dir/mesh.yaml: policy \"backend-authz\": rego: ")
            && found[0].contains("dir/backend-authz.rego:3"),
        "{found:?}"
    );

    // A file that is not there, one outside the directory, and a
    // reference to no policy.
    let mesh = POLICY_MESH
        .replace("[backend-authz.rego]", "[missing.rego, ../etc/x.rego]")
        .replace("policy: edge", "policy: nowhere");
    let found = errors(&[("dir/mesh.yaml", &mesh)]);
    assert!(
        found.contains(
            &"dir/mesh.yaml: policy \"backend-authz\": rego_files[0]: \"missing.rego\": no such file in the mesh directory"
                .to_owned()
        ),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|e| e.contains("rego_files[1]") && e.contains("no directories")),
        "{found:?}"
    );
    assert!(
        found.contains(
            &"dir/mesh.yaml: gateway \"gw\": listeners[0].policy: unknown policy \"nowhere\""
                .to_owned()
        ),
        "{found:?}"
    );
    assert!(
        found.iter().any(|e| e.contains("data_file")),
        "callers.json is missing too: {found:?}"
    );
}

#[test]
fn mesh_tracing_reaches_every_listener_as_its_service_or_gateway() {
    let tracing = "tracing: { collector: \"http://127.0.0.1:4317\", sample_percent: 5, resource_attributes: { deployment.environment: staging } }\n";
    let traced = snapshot(&[("mesh.yaml", MTLS_MESH), ("tracing.yaml", tracing)]);
    for (node_id, service) in [("web-1", "web"), ("api-1", "api"), ("edge", "edge")] {
        let spec = node(&traced, node_id);
        assert!(!spec.listeners.is_empty());
        for listener in &spec.listeners {
            let tracing = listener.tracing.as_ref().unwrap();
            assert_eq!(tracing.collector.as_deref(), Some("http://127.0.0.1:4317"));
            assert_eq!(tracing.sample_percent, Some(5.0));
            assert_eq!(tracing.service_name.as_deref(), Some(service), "{node_id}");
            let attributes = tracing.resource_attributes.as_ref().unwrap();
            assert_eq!(attributes["service.instance.id"], node_id);
            assert_eq!(attributes["deployment.environment"], "staging");
        }
    }
    // Without it, nothing traces.
    let plain = snapshot(&[("mesh.yaml", MTLS_MESH)]);
    assert!(
        node(&plain, "web-1")
            .listeners
            .iter()
            .all(|l| l.tracing.is_none())
    );

    // Set twice, or with a service name, or invalid: refused, naming the
    // file and field.
    let twice = errors(&[
        ("a.yaml", MTLS_MESH),
        ("b.yaml", tracing),
        ("c.yaml", tracing),
    ]);
    assert!(
        twice
            .iter()
            .any(|e| e.contains("c.yaml") && e.contains("already set in b.yaml")),
        "{twice:?}"
    );
    let named = errors(&[
        ("a.yaml", MTLS_MESH),
        (
            "b.yaml",
            "tracing: { collector: \"http://c:4317\", service_name: x }\n",
        ),
    ]);
    assert!(
        named
            .iter()
            .any(|e| e.contains("b.yaml") && e.contains("tracing.service_name")),
        "{named:?}"
    );
    let invalid = errors(&[
        ("a.yaml", MTLS_MESH),
        ("b.yaml", "tracing: { collector: \"ftp://c:4317\" }\n"),
    ]);
    assert!(
        invalid
            .iter()
            .any(|e| e.contains("tracing.collector")
                && e.contains("must be an http:// or https:// URL")),
        "{invalid:?}"
    );
}

#[test]
fn mesh_istio_metrics_label_each_listener_from_the_mesh() {
    let istio = "istio_metrics: { cluster_id: east, max_series: 50 }\n";
    let labelled = snapshot(&[("mesh.yaml", MTLS_MESH), ("istio.yaml", istio)]);
    let listener = |node_id: &str, name: &str| {
        node(&labelled, node_id)
            .listeners
            .into_iter()
            .find(|l| l.name == name)
            .and_then(|l| l.istio_metrics)
            .unwrap_or_else(|| panic!("{node_id}/{name} has istio_metrics"))
    };
    // A sidecar's inbound listener reports as the callee, knowing every
    // caller of the mesh by its identity.
    let inbound = listener("api-1", "inbound");
    assert_eq!(inbound.reporter.as_deref(), Some("destination"));
    assert_eq!(inbound.cluster_id.as_deref(), Some("east"));
    assert_eq!(inbound.max_series, Some(50));
    let own = inbound.workload.unwrap();
    assert_eq!(own.name.as_deref(), Some("api"));
    assert_eq!(own.namespace.as_deref(), Some("default"));
    assert_eq!(own.service.as_deref(), Some("api.default"));
    let sources = inbound.sources.unwrap();
    let web = &sources["spiffe://example.org/ns/shop/sa/web"];
    assert_eq!(
        (web.name.as_deref(), web.namespace.as_deref()),
        (Some("web"), Some("shop"))
    );
    assert_eq!(
        sources["spiffe://example.org/ns/default/sa/edge"]
            .app
            .as_deref(),
        Some("edge")
    );
    // Outbound listeners and gateways report as the caller, knowing the
    // clusters they call.
    let outbound = listener("web-1", "outbound");
    assert_eq!(outbound.reporter.as_deref(), Some("source"));
    let destinations = outbound.destinations.unwrap();
    assert_eq!(
        destinations.keys().collect::<Vec<_>>(),
        ["api", "legacy"],
        "only the clusters the node has"
    );
    assert_eq!(destinations["api"].service.as_deref(), Some("api.default"));
    let gateway = listener("edge", "http");
    assert_eq!(gateway.reporter.as_deref(), Some("source"));
    assert_eq!(gateway.workload.unwrap().name.as_deref(), Some("edge"));
    // Every node's configuration passes the proxy's validation (snapshot
    // would have failed otherwise); a bad setting is reported per node.
    let invalid = errors(&[
        ("a.yaml", MTLS_MESH),
        ("b.yaml", "istio_metrics: { max_series: 0 }\n"),
    ]);
    assert!(
        invalid
            .iter()
            .any(|e| e.contains("istio_metrics.max_series: 0 is out of range")),
        "{invalid:?}"
    );
    let twice = errors(&[("a.yaml", MTLS_MESH), ("b.yaml", istio), ("c.yaml", istio)]);
    assert!(
        twice
            .iter()
            .any(|e| e.contains("c.yaml") && e.contains("already set in b.yaml")),
        "{twice:?}"
    );
    // Without it, no listener reports Istio's metrics.
    let plain = snapshot(&[("mesh.yaml", MTLS_MESH)]);
    assert!(
        node(&plain, "web-1")
            .listeners
            .iter()
            .all(|l| l.istio_metrics.is_none())
    );
}

#[test]
fn versions_name_istio_workloads() {
    let mesh = r#"
services:
  - name: shop
    workloads:
      - { name: shop-a, version: v1, app: "127.0.0.1:8080", inbound: "127.0.0.1:15001" }
      - { name: shop-b, version: v2, app: "127.0.0.1:8081", inbound: "127.0.0.1:15002" }
  - name: cart
    calls: [shop]
    workloads:
      - { name: cart-1, version: v3, app: "127.0.0.1:8082", inbound: "127.0.0.1:15003", outbound: "127.0.0.1:15004" }
    routes: []
istio_metrics: {}
"#;
    let labelled = snapshot(&[("mesh.yaml", mesh)]);
    let inbound = node(&labelled, "shop-b")
        .listeners
        .into_iter()
        .find(|l| l.name == "inbound")
        .and_then(|l| l.istio_metrics)
        .unwrap();
    let own = inbound.workload.unwrap();
    assert_eq!(
        (own.name.as_deref(), own.version.as_deref()),
        (Some("shop-v2"), Some("v2"))
    );
    let outbound = node(&labelled, "cart-1")
        .listeners
        .into_iter()
        .find(|l| l.name == "outbound")
        .and_then(|l| l.istio_metrics)
        .unwrap();
    assert_eq!(outbound.workload.unwrap().name.as_deref(), Some("cart-v3"));
    // The whole service: its workloads disagree on a version, so none.
    let shop = &outbound.destinations.unwrap()["shop"];
    assert_eq!(
        (shop.name.as_deref(), shop.version.as_deref()),
        (Some("shop"), None)
    );
}

const TCP_MESH: &str = r#"
trust_domain: example.org
tracing: { collector: "http://127.0.0.1:4317" }
istio_metrics: {}
services:
  - name: web
    calls: [api, ledger]
    workloads:
      - name: web-1
        app: "127.0.0.1:8080"
        inbound: "127.0.0.1:15001"
        outbound: "127.0.0.1:15002"
        tcp_outbound: { ledger: "127.0.0.1:15432" }
  - name: api
    workloads:
      - { name: api-1, app: "127.0.0.1:8081", inbound: "127.0.0.1:15011" }
  - name: ledger
    protocol: tcp
    policy: ledger-callers
    health_check: { tcp: {}, interval: 5s }
    tcp_fault: { reset_percent: 10 }
    workloads:
      - { name: ledger-1, app: "127.0.0.1:5432", inbound: "127.0.0.1:15021" }
      - { name: ledger-2, app: "127.0.0.1:5433", inbound: "127.0.0.1:15022" }
policies:
  - name: ledger-callers
    rego: |
      package ledger
      import rego.v1
      default allow := false
      allow if input.attributes.source.principal == "spiffe://example.org/ns/default/sa/web"
    query: data.ledger.allow
"#;

#[test]
fn a_tcp_service_is_reached_over_mutual_tls_on_a_port_of_its_own() {
    let snapshot = snapshot(&[("mesh.yaml", TCP_MESH)]);

    // The callee's sidecar: a TCP inbound listener terminating mTLS with
    // its identity, to the application, with the service's policy.
    let ledger = node(&snapshot, "ledger-1");
    assert!(ledger.route_configs.is_empty());
    let inbound = ledger
        .listeners
        .iter()
        .find(|l| l.name == "inbound")
        .unwrap();
    assert_eq!(inbound.protocol.as_deref(), Some("tcp"));
    assert_eq!(inbound.cluster.as_deref(), Some("local_app"));
    assert_eq!(inbound.policy.as_deref(), Some("ledger-callers"));
    assert_eq!(
        inbound.tls.as_ref().unwrap().workload_identity.as_deref(),
        Some("spiffe://example.org/ns/default/sa/ledger")
    );
    assert!(inbound.preserve_request_id.is_none());
    assert!(inbound.tracing.is_some());
    let istio = inbound.istio_metrics.as_ref().unwrap();
    assert_eq!(istio.reporter.as_deref(), Some("destination"));
    assert_eq!(cluster(&ledger, "local_app").protocol, None);
    assert_eq!(endpoints(cluster(&ledger, "local_app")), ["127.0.0.1:5432"]);

    // The caller's sidecar: a TCP listener of its own for the ledger, to
    // every ledger workload over mTLS expecting the ledger's identity; no
    // HTTP virtual host for it.
    let web = node(&snapshot, "web-1");
    let to_ledger = web
        .listeners
        .iter()
        .find(|l| l.name == "outbound.ledger")
        .unwrap();
    assert_eq!(to_ledger.protocol.as_deref(), Some("tcp"));
    assert_eq!(to_ledger.address, "127.0.0.1:15432");
    assert_eq!(to_ledger.cluster.as_deref(), Some("ledger"));
    // The service's connection faults are its callers'.
    assert_eq!(
        to_ledger.fault.as_ref().and_then(|f| f.reset_percent),
        Some(10.0)
    );
    assert!(inbound.fault.is_none());
    assert_eq!(
        to_ledger
            .istio_metrics
            .as_ref()
            .unwrap()
            .reporter
            .as_deref(),
        Some("source")
    );
    let ledger_cluster = cluster(&web, "ledger");
    assert_eq!(
        endpoints(ledger_cluster),
        ["127.0.0.1:15021", "127.0.0.1:15022"]
    );
    assert_eq!(ledger_cluster.protocol, None, "not switched to h2");
    assert!(ledger_cluster.health_check.is_some());
    let tls = ledger_cluster.tls.as_ref().unwrap();
    assert_eq!(
        tls.server_identity.as_deref(),
        Some("spiffe://example.org/ns/default/sa/ledger")
    );
    assert_eq!(
        tls.workload_identity.as_deref(),
        Some("spiffe://example.org/ns/default/sa/web")
    );
    let outbound = route_config(&web, "outbound");
    let hosts: Vec<&str> = outbound
        .virtual_hosts
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(hosts, ["api"]);
    // The HTTP callee keeps its multiplexed mesh hop.
    assert_eq!(cluster(&web, "api").protocol.as_deref(), Some("auto"));
}

#[test]
fn tcp_services_refuse_what_only_http_has() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "    policy: ledger-callers\n",
            "    policy: ledger-callers\n    retries: { num_retries: 2 }\n    timeout: 1s\n",
            "service \"ledger\": retries: applies to http1 and http2 services only",
        ),
        (
            "    policy: ledger-callers\n",
            "    policy: ledger-callers\n    routes: [{ name: r }]\n",
            "service \"ledger\": routes: applies to http1 and http2 services only",
        ),
        (
            "health_check: { tcp: {}, interval: 5s }",
            "health_check: { http: { path: / }, interval: 5s }",
            "service \"ledger\": health_check: a tcp service's workloads can only be checked with tcp",
        ),
        (
            "tcp_outbound: { ledger: \"127.0.0.1:15432\" }",
            "tcp_outbound: { api: \"127.0.0.1:15432\" }",
            "service \"web\": workloads[0].tcp_outbound.api: service \"api\" speaks http1; the application calls it through outbound with Host: api",
        ),
        (
            "calls: [api, ledger]",
            "calls: [api]",
            "service \"web\": workloads[0].tcp_outbound.ledger: \"ledger\" is not in this service's calls",
        ),
        (
            "tcp_outbound: { ledger: \"127.0.0.1:15432\" }",
            "tcp_outbound: { ledger: \"127.0.0.1:15002\" }",
            "service \"web\": workloads[0].tcp_outbound.ledger: 127.0.0.1:15002 is already used by service \"web\" workloads[0].outbound",
        ),
        (
            "    tcp_fault: { reset_percent: 10 }\n",
            "    fault: { abort: { http_status: 503, percent: 10 } }\n",
            "service \"ledger\": fault: applies to http1 and http2 services only (a tcp service's connections take tcp_fault)",
        ),
        (
            "  - name: api\n",
            "  - name: api\n    tcp_fault: { reset_percent: 10 }\n",
            "service \"api\": tcp_fault: applies to tcp services only",
        ),
        (
            "tcp_fault: { reset_percent: 10 }",
            "tcp_fault: { reset_percent: 140 }",
            "node \"web-1\": listener \"outbound.ledger\": fault.reset_percent",
        ),
        (
            "    protocol: tcp\n",
            "    protocol: udp\n",
            "service \"ledger\": protocol: unknown value \"udp\" (expected http1, http2, tcp)",
        ),
    ];
    for (from, to, want) in cases {
        assert!(TCP_MESH.contains(from), "{from}");
        let mesh = TCP_MESH.replace(from, to);
        let found = errors(&[("mesh.yaml", &mesh)]);
        assert!(
            found
                .iter()
                .any(|e| e.starts_with(&format!("mesh.yaml: {want}"))),
            "{want}\n{found:#?}"
        );
    }
    // A gateway's routes are HTTP.
    let mesh = format!(
        "{TCP_MESH}gateways:\n  - name: edge\n    listeners:\n      - name: http\n        address: \"127.0.0.1:0\"\n        routes: [{{ name: db, service: ledger }}]\n"
    );
    let found = errors(&[("mesh.yaml", &mesh)]);
    assert!(
        found.iter().any(|e| e.contains(
            "gateway \"edge\": listeners[0].routes[0].service: service \"ledger\" speaks tcp"
        )),
        "{found:#?}"
    );
}

#[test]
fn a_gateway_tcp_listener_forwards_every_connection_to_its_tcp_service() {
    let mesh = format!(
        "{TCP_MESH}gateways:\n  - name: edge\n    listeners:\n      - {{ name: db, address: \"127.0.0.1:16432\", protocol: tcp, service: ledger, policy: ledger-callers }}\n      - {{ name: http, address: \"127.0.0.1:0\", routes: [{{ name: api, service: api }}] }}\n"
    );
    let snapshot = snapshot(&[("mesh.yaml", &mesh)]);
    let edge = node(&snapshot, "edge");
    let db = edge.listeners.iter().find(|l| l.name == "db").unwrap();
    assert_eq!(db.protocol.as_deref(), Some("tcp"));
    assert_eq!(db.cluster.as_deref(), Some("ledger"));
    assert_eq!(db.policy.as_deref(), Some("ledger-callers"));
    assert_eq!(db.fault.as_ref().and_then(|f| f.reset_percent), Some(10.0));
    assert!(
        db.tls.is_none(),
        "the gateway's clients are outside the mesh"
    );
    let routes: Vec<&str> = edge.route_configs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(routes, ["http"]);
    let ledger = cluster(&edge, "ledger");
    assert_eq!(
        ledger.tls.as_ref().unwrap().server_identity.as_deref(),
        Some("spiffe://example.org/ns/default/sa/ledger")
    );
    assert_eq!(ledger.protocol, None);

    let cases: &[(&str, &str)] = &[
        ("protocol: tcp, service: ledger", "protocol: tcp"),
        (
            "protocol: tcp, service: ledger",
            "protocol: tcp, service: api",
        ),
        (
            "protocol: tcp, service: ledger",
            "protocol: tcp, service: ledger, routes: [{ name: r, service: ledger }]",
        ),
        (
            "protocol: tcp, service: ledger",
            "protocol: udp, service: ledger",
        ),
        (
            "routes: [{ name: api, service: api }]",
            "routes: [{ name: api, service: api }], service: api",
        ),
    ];
    let wants = [
        "gateway \"edge\": listeners[0].service: required for a tcp listener",
        "gateway \"edge\": listeners[0].service: service \"api\" speaks http1; a tcp listener forwards to tcp services",
        "gateway \"edge\": listeners[0].routes: applies to http listeners only",
        "gateway \"edge\": listeners[0].protocol: unknown value \"udp\" (expected http, tcp)",
        "gateway \"edge\": listeners[1].service: applies to tcp listeners only",
    ];
    for ((from, to), want) in cases.iter().zip(wants) {
        assert!(mesh.contains(from), "{from}");
        let broken = mesh.replace(from, to);
        let found = errors(&[("mesh.yaml", &broken)]);
        assert!(
            found
                .iter()
                .any(|e| e.starts_with(&format!("mesh.yaml: {want}"))),
            "{want}\n{found:#?}"
        );
    }
}
