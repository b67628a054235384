//! Routing through a real proxy: every match kind, weighted splits, load
//! balancing, rewrites, header rules and direct responses.

// Helpers outside #[test] functions unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper::body::Incoming;
use weft_tests::*;

struct Mesh {
    proxy: ProxyProcess,
    _echoes: Vec<EchoServer>,
}

impl Mesh {
    /// Starts echo servers named `names` and a proxy whose config is
    /// `template` with `{name}` replaced by each server's address.
    async fn start(names: &[&str], template: &str) -> Self {
        let mut config = template.to_owned();
        let mut echoes = Vec::new();
        for name in names {
            let server = echo(name).await;
            config = config.replace(&format!("{{{name}}}"), &server.local_addr().to_string());
            echoes.push(server);
        }
        Self {
            proxy: ProxyProcess::start(&config).await.unwrap(),
            _echoes: echoes,
        }
    }

    fn web(&self) -> SocketAddr {
        self.proxy.listener("web")
    }

    async fn send(
        &self,
        host: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> http::Response<Incoming> {
        let mut req: Request<Full<Bytes>> = request(self.web(), method, path, Bytes::new());
        req.headers_mut().insert("host", host.parse().unwrap());
        for (name, value) in headers {
            req.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        http1_request(self.web(), req).await.unwrap()
    }

    /// Which echo server answered (or the status and weft error).
    async fn who(&self, host: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
        let response = self.send(host, method, path, headers).await;
        match header(&response, "x-echo-server") {
            "" => format!(
                "{} {}",
                response.status().as_u16(),
                header(&response, "x-weft-error")
            ),
            name => name.to_owned(),
        }
    }
}

const MATCHING: &str = r#"
admin: { address: "127.0.0.1:0" }
listeners:
  - { name: web, address: "127.0.0.1:0", route_config: main }
route_configs:
  - name: main
    virtual_hosts:
      - name: api
        domains: ["api.example.com"]
        routes:
          - { name: exact, match: { exact: /exact }, cluster: exact }
          - { name: regex, match: { regex: "/items/[0-9]+" }, cluster: regex }
          - { name: method, match: { prefix: /m, methods: [DELETE] }, cluster: method }
          - { name: header-exact, match: { prefix: /h, headers: [{ name: x-env, exact: canary }] }, cluster: header }
          - { name: header-regex, match: { prefix: /h, headers: [{ name: x-user, regex: "admin-[a-z]+" }] }, cluster: header }
          - { name: header-absent, match: { prefix: /h, headers: [{ name: x-env, present: false }] }, cluster: absent }
          - { name: prefix, match: { prefix: /p }, cluster: prefix }
      - name: wildcard
        domains: ["*.example.com"]
        routes: [{ name: wildcard, cluster: suffix }]
      - name: fallback
        domains: ["*"]
        routes: [{ name: fallback, match: { prefix: /only-here }, cluster: any }]
clusters:
  - { name: exact, endpoints: [{ address: "{exact}" }] }
  - { name: regex, endpoints: [{ address: "{regex}" }] }
  - { name: method, endpoints: [{ address: "{method}" }] }
  - { name: header, endpoints: [{ address: "{header}" }] }
  - { name: absent, endpoints: [{ address: "{absent}" }] }
  - { name: prefix, endpoints: [{ address: "{prefix}" }] }
  - { name: suffix, endpoints: [{ address: "{suffix}" }] }
  - { name: any, endpoints: [{ address: "{any}" }] }
"#;

#[tokio::test]
async fn every_match_kind_routes_to_its_cluster() {
    let mesh = Mesh::start(
        &[
            "exact", "regex", "method", "header", "absent", "prefix", "suffix", "any",
        ],
        MATCHING,
    )
    .await;
    let api = "api.example.com";
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        (api, "GET", "/exact", &[], "exact"),
        (api, "GET", "/exact?q=1", &[], "exact"),
        (api, "GET", "/exact/more", &[], "404 no_route"),
        (api, "GET", "/items/12", &[], "regex"),
        (api, "GET", "/items/abc", &[], "404 no_route"),
        (api, "DELETE", "/m", &[], "method"),
        (api, "GET", "/m", &[], "404 no_route"),
        (api, "GET", "/h", &[("x-env", "canary")], "header"),
        (
            api,
            "GET",
            "/h",
            &[("x-env", "prod"), ("x-user", "admin-bob")],
            "header",
        ),
        (api, "GET", "/h", &[("x-env", "prod")], "404 no_route"),
        (api, "GET", "/h", &[], "absent"),
        (api, "GET", "/p/anything", &[], "prefix"),
        ("API.EXAMPLE.COM:8080", "GET", "/p", &[], "prefix"),
        ("www.example.com", "GET", "/whatever", &[], "suffix"),
        ("example.org", "GET", "/only-here/x", &[], "any"),
        ("example.org", "GET", "/elsewhere", &[], "404 no_route"),
    ];
    for (host, method, path, headers, want) in cases {
        assert_eq!(
            mesh.who(host, method, path, headers).await,
            *want,
            "{method} {host}{path} {headers:?}"
        );
    }
}

#[tokio::test]
async fn weighted_split_follows_weights_within_tolerance() {
    let mesh = Mesh::start(
        &["stable", "canary"],
        r#"
admin: { address: "127.0.0.1:0" }
listeners: [{ name: web, address: "127.0.0.1:0", route_config: main }]
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: split
            weighted_clusters: [{ cluster: stable, weight: 80 }, { cluster: canary, weight: 20 }]
clusters:
  - { name: stable, endpoints: [{ address: "{stable}" }] }
  - { name: canary, endpoints: [{ address: "{canary}" }] }
"#,
    )
    .await;
    const N: usize = 1000;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut sender = http1_connect::<Full<Bytes>>(mesh.web()).await.unwrap();
    for _ in 0..N {
        sender.ready().await.unwrap();
        let response = sender.send_request(get(mesh.web(), "/")).await.unwrap();
        *counts
            .entry(header(&response, "x-echo-server").to_owned())
            .or_default() += 1;
        body_bytes(response).await.unwrap();
    }
    // Binomial(1000, 0.2): sd = 12.6; +-6 sd keeps a false failure below
    // one in a hundred million runs.
    let canary = counts.get("canary").copied().unwrap_or(0);
    assert!((124..=276).contains(&canary), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), N);
    let metric = mesh
        .proxy
        .metric("weft_http_requests_total{listener=\"web\",route=\"split\",cluster=\"canary\",status_class=\"2xx\"}")
        .await;
    assert_eq!(metric as usize, canary);
}

#[tokio::test]
async fn load_balancers_distribute_across_endpoints() {
    let mesh = Mesh::start(
        &["a", "b", "c", "d", "e"],
        r#"
admin: { address: "127.0.0.1:0" }
listeners: [{ name: web, address: "127.0.0.1:0", route_config: main }]
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - { name: rr, match: { prefix: /rr }, cluster: rr }
          - { name: random, match: { prefix: /random }, cluster: random }
          - { name: lr, match: { prefix: /lr }, cluster: lr }
clusters:
  - name: rr
    endpoints: [{ address: "{a}", weight: 2 }, { address: "{b}" }, { address: "{c}" }]
  - name: random
    lb: random
    endpoints: [{ address: "{d}", weight: 3 }, { address: "{e}" }]
  - name: lr
    lb: least_request
    endpoints: [{ address: "{a}" }, { address: "{b}" }]
"#,
    )
    .await;
    let tally = |path: &'static str, n: usize| {
        let mesh = &mesh;
        async move {
            let mut counts: HashMap<String, usize> = HashMap::new();
            let mut sender = http1_connect::<Full<Bytes>>(mesh.web()).await.unwrap();
            for _ in 0..n {
                sender.ready().await.unwrap();
                let response = sender.send_request(get(mesh.web(), path)).await.unwrap();
                *counts
                    .entry(header(&response, "x-echo-server").to_owned())
                    .or_default() += 1;
                body_bytes(response).await.unwrap();
            }
            counts
        }
    };
    let rr = tally("/rr", 400).await;
    assert_eq!(
        (rr["a"], rr["b"], rr["c"]),
        (200, 100, 100),
        "weighted round robin is exact: {rr:?}"
    );
    let random = tally("/random", 1000).await;
    // Binomial(1000, 0.25): sd = 13.7, tolerance 6 sd.
    assert!((168..=332).contains(&random["e"]), "{random:?}");
    // With one request at a time both endpoints are idle at each pick, so
    // least-request spreads the load over both.
    let lr = tally("/lr", 200).await;
    assert_eq!(lr.len(), 2, "{lr:?}");
}

#[tokio::test]
async fn rewrites_header_rules_and_direct_responses() {
    let mesh = Mesh::start(
        &["app"],
        r#"
admin: { address: "127.0.0.1:0" }
listeners: [{ name: web, address: "127.0.0.1:0", route_config: main, via: weft-test }]
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: health
            match: { exact: /healthz }
            direct_response: { status: 200, body: "all good" }
            response_headers: { set: { x-direct: "1" } }
          - name: api
            match: { prefix: /api/ }
            prefix_rewrite: /v2/
            host_rewrite: internal.svc
            cluster: app
            request_headers:
              set: { x-route: api }
              add: { x-added: one }
              remove: [x-internal]
            response_headers:
              set: { x-served-by: weft }
              remove: [x-echo-method]
clusters:
  - { name: app, endpoints: [{ address: "{app}" }] }
"#,
    )
    .await;
    let direct = mesh.send("any", "GET", "/healthz", &[]).await;
    assert_eq!(direct.status(), 200);
    assert_eq!(header(&direct, "x-direct"), "1");
    assert_eq!(body_bytes(direct).await.unwrap(), "all good");

    let response = mesh
        .send(
            "public.example.com",
            "GET",
            "/api/users?id=7",
            &[
                ("x-echo-headers", "1"),
                ("x-internal", "secret"),
                ("x-forwarded-for", "203.0.113.9"),
                ("connection", "x-hop"),
                ("x-hop", "drop me"),
            ],
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-echo-path"), "/v2/users?id=7");
    assert_eq!(header(&response, "x-echo-host"), "internal.svc");
    assert_eq!(header(&response, "x-echo-req-x-route"), "api");
    assert_eq!(header(&response, "x-echo-req-x-added"), "one");
    assert_eq!(
        header(&response, "x-echo-req-x-internal"),
        "",
        "removed by the route"
    );
    assert_eq!(
        header(&response, "x-echo-req-x-hop"),
        "",
        "named in connection: hop-by-hop"
    );
    assert_eq!(
        header(&response, "x-echo-req-x-forwarded-for"),
        "127.0.0.1",
        "no hop in front is trusted: the client's own value is dropped"
    );
    assert_eq!(header(&response, "x-echo-req-x-forwarded-proto"), "http");
    assert_eq!(
        header(&response, "x-echo-req-x-request-id").len(),
        36,
        "a request id is generated"
    );
    assert_eq!(header(&response, "x-served-by"), "weft");
    assert_eq!(
        header(&response, "x-echo-method"),
        "",
        "removed from the response"
    );
    assert_eq!(header(&response, "via"), "1.1 weft-test");

    let kept = mesh
        .send(
            "a",
            "GET",
            "/api/x",
            &[("x-echo-headers", "1"), ("x-request-id", "given")],
        )
        .await;
    let replaced = header(&kept, "x-echo-req-x-request-id");
    assert_ne!(replaced, "given", "a client's request id is not trusted");
    assert_eq!(replaced.len(), 36);
}

#[tokio::test]
async fn forwarding_headers_are_trusted_only_from_the_configured_hops() {
    let mesh = Mesh::start(
        &["app"],
        r#"
admin: { address: "127.0.0.1:0" }
listeners:
  - { name: web, address: "127.0.0.1:0", route_config: main, xff_num_trusted_hops: 1 }
route_configs:
  - name: main
    virtual_hosts: [{ name: all, domains: ["*"], routes: [{ name: all, cluster: app }] }]
clusters:
  - { name: app, endpoints: [{ address: "{app}" }] }
"#,
    )
    .await;
    let response = mesh
        .send(
            "a",
            "GET",
            "/",
            &[
                ("x-echo-headers", "1"),
                ("x-forwarded-for", "198.51.100.1, 203.0.113.9"),
                ("x-forwarded-proto", "https"),
                ("x-request-id", "from-the-edge"),
            ],
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-echo-req-x-forwarded-for"),
        "203.0.113.9, 127.0.0.1",
        "the trusted hop's entry is kept, what came before it is not"
    );
    assert_eq!(header(&response, "x-echo-req-x-forwarded-proto"), "https");
    assert_eq!(
        header(&response, "x-echo-req-x-request-id"),
        "from-the-edge"
    );
}

#[tokio::test]
async fn dns_endpoints_are_resolved_and_served() {
    let server = echo("named").await;
    let port = server.local_addr().port();
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners: [{{ name: web, address: "127.0.0.1:0", route_config: main }}]
route_configs:
  - name: main
    virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ name: all, cluster: named }}] }}]
clusters:
  - {{ name: named, dns_refresh: 1s, endpoints: [{{ address: "localhost:{port}" }}] }}
"#
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let (_, clusters) = proxy.admin_get("/clusters").await.unwrap();
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let addresses: Vec<String> = clusters[0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        addresses.contains(&format!("127.0.0.1:{port}")),
        "localhost resolved to {addresses:?}"
    );
    // Where localhost also resolves to ::1 (where nothing listens), only
    // the address set is checked.
    if addresses.len() == 1 {
        let web = proxy.listener("web");
        let response = http1_request(web, get(web, "/")).await.unwrap();
        assert_eq!(header(&response, "x-echo-server"), "named");
    }
}
