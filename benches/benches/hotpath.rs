//! Criterion micro-benchmarks of the request path's pure functions: route
//! matching, load-balancer picks, header handling and the snapshot load.
//!
//! Run: `cargo bench -p weft-bench --bench hotpath`. Compare a change with
//! `-- --save-baseline main` before it and `-- --baseline main` after.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use weft_proxy::config::{Config, LbPolicy};
use weft_proxy::hotpath::{
    Balancer, RequestParts, RouteTable, add_forwarded, apply_header_ops, ensure_request_id,
    strip_hop_by_hop,
};
use weft_proxy::telemetry::AccessRecord;

/// A route configuration with `n` routes in one virtual host: mostly
/// prefixes, every tenth an exact path, every twenty-fifth a regex, every
/// seventh with a header condition; plus a few other virtual hosts.
fn routes_yaml(n: usize) -> String {
    let mut routes = String::new();
    for i in 0..n {
        let matcher = if i % 25 == 24 {
            format!("{{ regex: \"/svc{i}/items/[0-9]+\" }}")
        } else if i % 10 == 9 {
            format!("{{ exact: /svc{i}/health }}")
        } else if i % 7 == 6 {
            format!("{{ prefix: /svc{i}/, headers: [{{ name: x-canary, exact: \"1\" }}] }}")
        } else {
            format!("{{ prefix: /svc{i}/ }}")
        };
        routes.push_str(&format!(
            "          - {{ name: r{i}, match: {matcher}, cluster: c }}\n"
        ));
    }
    format!(
        r#"
clusters: [{{ name: c, endpoints: [{{ address: "127.0.0.1:1" }}] }}]
route_configs:
  - name: rc
    virtual_hosts:
      - {{ name: other1, domains: ["a.example.com"], routes: [{{ cluster: c }}] }}
      - {{ name: other2, domains: ["*.internal"], routes: [{{ cluster: c }}] }}
      - name: main
        domains: ["api.example.com"]
        routes:
{routes}"#
    )
}

fn route_match(c: &mut Criterion) {
    let config = Config::from_yaml(&routes_yaml(100), "bench").expect("the bench config is valid");
    let table = RouteTable::new(&config.route_configs[0], |_, route| route.name.clone());
    let headers = HeaderMap::new();
    let mut group = c.benchmark_group("route_match_100_routes");
    group.throughput(Throughput::Elements(1));
    for (label, path) in [
        ("first", "/svc0/x"),
        ("middle", "/svc50/x"),
        ("last_regex", "/svc99/items/7"),
        ("miss", "/nope"),
    ] {
        group.bench_function(label, |b| {
            b.iter(|| {
                let parts = RequestParts {
                    host: "api.example.com",
                    method: &Method::GET,
                    path: black_box(path),
                    headers: &headers,
                    source: None,
                };
                black_box(table.select(&parts).is_some())
            });
        });
    }
    group.finish();
}

fn lb_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("lb_pick_16_endpoints");
    group.throughput(Throughput::Elements(1));
    let active: Vec<u64> = (0..16).map(|i| i % 5).collect();
    for (label, policy, weights) in [
        ("round_robin", LbPolicy::RoundRobin, vec![1; 16]),
        (
            "round_robin_weighted",
            LbPolicy::RoundRobin,
            (1..=16).collect(),
        ),
        ("random_weighted", LbPolicy::Random, (1..=16).collect()),
        ("least_request", LbPolicy::LeastRequest, vec![1; 16]),
    ] {
        let balancer = Balancer::new(policy, weights);
        let mut rng = fastrand::Rng::with_seed(7);
        group.bench_function(label, |b| {
            b.iter(|| black_box(balancer.pick(&mut rng, |i| active[i])))
        });
    }
    group.finish();
}

fn header_handling(c: &mut Criterion) {
    let mut request = HeaderMap::new();
    for (name, value) in [
        ("host", "api.example.com"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, br"),
        ("content-type", "application/json"),
        ("content-length", "42"),
        ("connection", "keep-alive"),
        ("authorization", "Bearer abc.def.ghi"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
    ] {
        request.insert(name, HeaderValue::from_static(value));
    }
    let config = Config::from_yaml(
        r#"
clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:1" }] }]
route_configs:
  - name: rc
    virtual_hosts:
      - name: v
        domains: ["*"]
        routes:
          - cluster: c
            request_headers: { set: { x-route: api }, add: { x-added: one }, remove: [x-internal] }
"#,
        "bench",
    )
    .expect("the bench config is valid");
    let ops = &config.route_configs[0].virtual_hosts[0].routes[0].request_headers;
    let peer = HeaderValue::from_static("10.1.2.3");
    let mut group = c.benchmark_group("request_headers");
    group.throughput(Throughput::Elements(1));
    group.bench_function("proxy_rules_and_route_ops", |b| {
        b.iter_batched_ref(
            || request.clone(),
            |headers| {
                strip_hop_by_hop(headers, false);
                apply_header_ops(ops, headers);
                add_forwarded(headers, &peer, 0, false);
                black_box(ensure_request_id(headers, false).len())
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn access_log_line(c: &mut Criterion) {
    let record = AccessRecord {
        start: std::time::SystemTime::now(),
        listener: "http".into(),
        route: Some("all".into()),
        method: http::Method::GET,
        uri: http::Uri::from_static("/api/v1/items/42?expand=owner"),
        host: Some(HeaderValue::from_static("api.example.com")),
        version: http::Version::HTTP_11,
        status: 200,
        flag: "",
        upstream: Some(([127, 0, 0, 1], 8080).into()),
        bytes_sent: 1234,
        duration: std::time::Duration::from_micros(1534),
        request_id: Some(HeaderValue::from_static(
            "6f1c2e0a-4b7d-4e8f-9a3b-2c1d0e9f8a7b",
        )),
        peer: ([10, 1, 2, 3], 54321).into(),
        peer_identity: None,
        attempts: 0,
        trace: None,
    };
    let mut out = Vec::with_capacity(64 * 1024);
    let mut group = c.benchmark_group("access_log");
    group.throughput(Throughput::Elements(1));
    group.bench_function("json_line", |b| {
        b.iter(|| {
            out.clear();
            record
                .write_line(&mut out)
                .expect("writing to a Vec cannot fail");
            black_box(out.len())
        })
    });
    group.finish();
}

fn snapshot_load(c: &mut Criterion) {
    let shared = arc_swap::ArcSwap::from_pointee(vec![1u64; 64]);
    let mut group = c.benchmark_group("snapshot");
    group.throughput(Throughput::Elements(1));
    group.bench_function("load", |b| b.iter(|| black_box(shared.load()[7])));
    group.bench_function("load_full", |b| {
        b.iter(|| black_box(Arc::clone(&shared.load_full())))
    });
    group.finish();
}

criterion_group!(
    hotpath,
    route_match,
    lb_pick,
    header_handling,
    access_log_line,
    snapshot_load
);
criterion_main!(hotpath);
