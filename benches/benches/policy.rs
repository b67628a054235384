//! Criterion benchmarks of one policy decision as the request path makes
//! it (the OPA-Envoy input built from the request, then evaluated on the
//! thread's prepared engine): an allow-all policy, role-based access with
//! 100 grants over method, path and caller (written as 100 rules, and as
//! grants in the policy's data, the configurations wrk-compare.sh runs),
//! and a check of a header and a JWT's claims (HS256, verified). Each is
//! evaluated every time; the `cached` cases show the decision cache.
//!
//! Run: `cargo bench -p weft-bench --bench policy`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use weft_proxy::config::Config;
use weft_proxy::policy::{Caller, CompiledPolicy, FailureMode, Mode, Module, evaluate_request};

fn compile(rego: String, query: &str) -> CompiledPolicy {
    CompiledPolicy::compile(
        "bench",
        &[Module {
            name: "bench.rego".into(),
            text: rego,
        }],
        None,
        query,
        false,
        Mode::Enforce,
        FailureMode::Deny,
    )
    .expect("the bench policy compiles")
}

fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "backend")
        .header("user-agent", "wrk")
        .header("x-request-id", "5f0c6a8e-2a51-4b8e-9d51-0c9b6c2f1e77")
        .header("x-forwarded-proto", "http");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("a valid request")
}

/// The policy of one of wrk-compare.sh's configurations
/// (`benches/scripts/weft-rbac-*.yaml`), so that the whole-proxy run and
/// this one measure the same policy.
fn policy_of(file: &str) -> Arc<CompiledPolicy> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .expect("the bench configuration is readable")
        .replace("@PORT@", "0")
        .replace("@UPSTREAM@", "127.0.0.1:1");
    let config = Config::from_yaml(&text, file).expect("the bench configuration is valid");
    config.policies[0].clone()
}

/// HS256, secret `weft-bench-secret`, claims `sub: alice`, `role: admin`,
/// `aud: weft`, expiring in 2100.
const TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsInJvbGUiOiJhZG1pbiIsImF1ZCI6IndlZnQiLCJleHAiOjQxMDI0NDQ4MDB9.saoHnFJXL0cyFZoJh0WHDrytC0vKIs4dflAIRjg8osQ";

const JWT_POLICY: &str = r#"
package envoy.authz
import rego.v1
default allow := false
token := t if {
    [_, t] := split(input.attributes.request.http.headers.authorization, " ")
}
claims := payload if {
    [valid, _, payload] := io.jwt.decode_verify(token, {"secret": "weft-bench-secret", "aud": "weft", "time": time.now_ns()})
    valid
}
allow if {
    input.attributes.request.http.headers["x-tenant"] == "acme"
    claims.role == "admin"
    glob.match("/api/*", ["/"], input.attributes.request.http.path)
}
"#;

fn decisions(c: &mut Criterion) {
    let source: SocketAddr = "10.0.0.7:41000".parse().expect("an address");
    // Each caller is one connection, whose part of the input is built once.
    let source = Caller::new(source, None);
    let mut group = c.benchmark_group("policy_decision");
    group.throughput(Throughput::Elements(1));

    let allow_all = compile(
        "package envoy.authz\nimport rego.v1\ndefault allow := true\n".into(),
        "data.envoy.authz.allow",
    );
    let req = request("GET", "/svc1/items?limit=10", &[]);
    assert_eq!(evaluate_request(&allow_all, &req, &source, false), Ok(true));
    group.bench_function("allow_all", |b| {
        b.iter(|| evaluate_request(&allow_all, black_box(&req), &source, false));
    });

    // 100 grants of (method, path prefix, caller); the caller is the
    // principal, else the address. wrk's loopback caller is the last grant.
    let loopback: SocketAddr = "127.0.0.1:41000".parse().expect("an address");
    let loopback = Caller::new(loopback, None);
    let last = request("GET", "/items", &[]);
    for (label, file) in [
        ("rbac_100_rules", "weft-rbac-rules.yaml"),
        ("rbac_100_grants_in_data", "weft-rbac-data.yaml"),
    ] {
        let rbac = policy_of(file);
        assert!(rbac.runs_on_vm(), "{file}");
        if label == "rbac_100_rules" {
            assert!(rbac.indexes_rules(), "{file}");
        }
        assert_eq!(evaluate_request(&rbac, &last, &loopback, false), Ok(true));
        group.bench_function(format!("{label}/allowed_by_the_last"), |b| {
            b.iter(|| evaluate_request(&rbac, black_box(&last), &loopback, false));
        });
        assert_eq!(evaluate_request(&rbac, &last, &source, false), Ok(false));
        group.bench_function(format!("{label}/denied"), |b| {
            b.iter(|| evaluate_request(&rbac, black_box(&last), &source, false));
        });
        // The same decision again, from the thread's decision cache (the
        // input is still built: the key is read from it).
        assert!(rbac.caches_decisions(), "{file}");
        group.bench_function(format!("{label}/cached"), |b| {
            b.iter(|| evaluate_request(&rbac, black_box(&last), &loopback, true));
        });
        // Paths the cache has not seen: 10,000 distinct ones, more than it
        // keeps, so every decision is evaluated (with the cache's cost).
        let many: Vec<_> = (0..10_000)
            .map(|i| request("GET", &format!("/svc{}/items/{i}", i % 100), &[]))
            .collect();
        let mut next = many.iter().cycle();
        group.bench_function(format!("{label}/distinct_paths"), |b| {
            b.iter(|| {
                let req = next.next().expect("a cycle never ends");
                evaluate_request(&rbac, black_box(req), &loopback, true)
            });
        });
    }

    // The same 100 grants with the caller read from the input itself: each
    // rule is nothing but conditions the index reads, so none is run.
    let mut rego = String::from("package envoy.authz\nimport rego.v1\ndefault allow := false\n");
    for i in 0..99 {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        rego.push_str(&format!(
            "allow if {{\n  input.attributes.request.http.method == \"{method}\"\n  \
             startswith(input.attributes.request.http.path, \"/svc{i}/\")\n  \
             input.attributes.source.principal == \"spiffe://weft.local/ns/default/sa/caller{i}\"\n}}\n"
        ));
    }
    rego.push_str(
        "allow if {\n  input.attributes.request.http.method == \"GET\"\n  \
         startswith(input.attributes.request.http.path, \"/\")\n  \
         input.attributes.source.address.socketAddress.address == \"127.0.0.1\"\n}\n",
    );
    let input_rules = compile(rego, "data.envoy.authz.allow");
    assert!(input_rules.indexes_rules());
    assert_eq!(
        evaluate_request(&input_rules, &last, &loopback, false),
        Ok(true)
    );
    group.bench_function("rbac_100_input_rules/allowed_by_the_last", |b| {
        b.iter(|| evaluate_request(&input_rules, black_box(&last), &loopback, false));
    });
    assert_eq!(
        evaluate_request(&input_rules, &last, &source, false),
        Ok(false)
    );
    group.bench_function("rbac_100_input_rules/denied", |b| {
        b.iter(|| evaluate_request(&input_rules, black_box(&last), &source, false));
    });

    let jwt = compile(JWT_POLICY.into(), "data.envoy.authz.allow");
    let bearer = format!("Bearer {TOKEN}");
    let with_token = request(
        "GET",
        "/api/orders",
        &[("authorization", &bearer), ("x-tenant", "acme")],
    );
    assert_eq!(
        evaluate_request(&jwt, &with_token, &source, false),
        Ok(true)
    );
    group.bench_function("jwt_hs256_and_header", |b| {
        b.iter(|| evaluate_request(&jwt, black_box(&with_token), &source, false));
    });
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
