use super::*;

/// The OPA-Envoy input document for an HTTP request.
fn http_input<B>(req: &Request<B>, peers: &Peers, is_tls: bool) -> Value {
    HttpRequest { req, peers, is_tls }.build()
}

/// The input document for a TCP connection.
fn connection_input(peers: &Peers) -> Value {
    Connection(peers).build()
}

fn compile(rego: &str) -> CompiledPolicy {
    compile_with(rego, DEFAULT_QUERY, false, Mode::Enforce, FailureMode::Deny).unwrap()
}

fn compile_with(
    rego: &str,
    query: &str,
    v0: bool,
    mode: Mode,
    failure_mode: FailureMode,
) -> Result<CompiledPolicy, String> {
    let modules = [Module {
        name: "authz.rego".into(),
        text: rego.into(),
    }];
    CompiledPolicy::compile("authz", &modules, None, query, v0, mode, failure_mode)
}

fn peers(principal: Option<&str>) -> Peers {
    Peers::new(
        "10.1.2.3:40000".parse().unwrap(),
        principal.map(Arc::from),
        Some("127.0.0.1:15201".parse().unwrap()),
        Some(Arc::from("spiffe://td/ns/default/sa/backend")),
    )
}

fn request(method: &str, target: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(target)
        .header("host", "backend")
        .header("x-request-id", "r-1")
        .header("User-Agent", "curl/8")
        .body(())
        .unwrap()
}

fn decide(policy: &CompiledPolicy, req: &Request<()>, principal: Option<&str>) -> Verdict {
    policy
        .evaluate(&http_input(req, &peers(principal), false))
        .unwrap()
}

/// In the style of OPA-Envoy's examples: method, path and the caller's
/// SPIFFE ID.
const RBAC: &str = r#"
package envoy.authz

import rego.v1

default allow := false

allow if {
    input.attributes.request.http.method == "GET"
    input.parsed_path[0] == "items"
    startswith(input.attributes.source.principal, "spiffe://td/ns/default/sa/")
}

allow if {
    input.attributes.source.principal == "spiffe://td/ns/default/sa/admin"
    input.attributes.request.http.method != "DELETE"
}
"#;

#[test]
fn a_boolean_policy_allows_and_denies_by_method_path_and_principal() {
    let policy = compile(RBAC);
    let frontend = Some("spiffe://td/ns/default/sa/frontend");
    assert!(decide(&policy, &request("GET", "/items/7"), frontend).allowed);
    assert!(!decide(&policy, &request("POST", "/items/7"), frontend).allowed);
    assert!(!decide(&policy, &request("GET", "/admin"), frontend).allowed);
    assert!(!decide(&policy, &request("GET", "/items/7"), None).allowed);
    let admin = Some("spiffe://td/ns/default/sa/admin");
    assert!(decide(&policy, &request("PUT", "/anything"), admin).allowed);
    assert!(!decide(&policy, &request("DELETE", "/anything"), admin).allowed);
}

#[test]
fn the_input_has_the_opa_envoy_shape() {
    let policy = compile_with(
        r#"
package probe
import rego.v1
out := {
    "port": input.attributes.source.address.socketAddress.portValue,
    "ip": input.attributes.source.address.socketAddress.address,
    "dest": input.attributes.destination.principal,
    "path": input.attributes.request.http.path,
    "host": input.attributes.request.http.host,
    "ua": input.attributes.request.http.headers["user-agent"],
    "method": input.attributes.request.http.headers[":method"],
    "id": input.attributes.request.http.id,
    "parsed_path": input.parsed_path,
    "q": input.parsed_query.q,
}
"#,
        "data.probe.out",
        false,
        Mode::Enforce,
        FailureMode::Deny,
    )
    .unwrap();
    let input = http_input(
        &request("GET", "/a%20b/c?q=1&q=two+words"),
        &peers(None),
        false,
    );
    let value = policy.engine.tap_eval(input, "data.probe.out");
    let expect = serde_json::json!({
        "port": 40000,
        "ip": "10.1.2.3",
        "dest": "spiffe://td/ns/default/sa/backend",
        "path": "/a%20b/c?q=1&q=two+words",
        "host": "backend",
        "ua": "curl/8",
        "method": "GET",
        "id": "r-1",
        "parsed_path": ["a b", "c"],
        "q": ["1", "two words"],
    });
    assert_eq!(value, Value::from(expect));
}

trait TapEval {
    fn tap_eval(&self, input: Value, rule: &str) -> Value;
}

impl TapEval for regorus::Engine {
    fn tap_eval(&self, input: Value, rule: &str) -> Value {
        let mut engine = self.clone();
        engine.set_input(input);
        engine.eval_rule(rule.to_owned()).unwrap()
    }
}

#[test]
fn a_decision_object_sets_status_headers_and_body() {
    let policy = compile(
        r#"
package envoy.authz
import rego.v1
default allow := {"allowed": false, "http_status": 401, "headers": {"www-authenticate": "Bearer"}, "body": "log in first", "reason": "no token"}
allow := {"allowed": true} if input.attributes.request.http.headers.authorization
"#,
    );
    let verdict = decide(&policy, &request("GET", "/"), None);
    assert!(!verdict.allowed);
    assert_eq!(verdict.status, Some(StatusCode::UNAUTHORIZED));
    assert_eq!(verdict.body.as_deref(), Some("log in first"));
    assert_eq!(verdict.reason.as_deref(), Some("no token"));
    let response = denied(Some(&verdict), false);
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_eq!(response.headers()["x-weft-error"], "policy_denied");
    let grpc = denied(Some(&verdict), true);
    assert_eq!(grpc.headers()["grpc-status"], "16");
    let plain = denied(None, true);
    assert_eq!(plain.headers()["grpc-status"], "7", "PERMISSION_DENIED");

    let mut authorized = request("GET", "/");
    authorized
        .headers_mut()
        .insert("authorization", HeaderValue::from_static("Bearer x"));
    assert!(decide(&policy, &authorized, None).allowed);
}

#[test]
fn rego_v0_policies_compile_when_asked_for() {
    let v0 = r#"
package envoy.authz
default allow = false
allow { input.attributes.request.http.method == "GET" }
"#;
    assert!(compile_with(v0, DEFAULT_QUERY, false, Mode::Enforce, FailureMode::Deny).is_err());
    let policy = compile_with(v0, DEFAULT_QUERY, true, Mode::Enforce, FailureMode::Deny).unwrap();
    assert!(decide(&policy, &request("GET", "/"), None).allowed);
}

#[test]
fn invalid_rego_names_its_file_and_line() {
    let error = compile_with(
        "package envoy.authz\nimport rego.v1\n\nallow if {\n  input.x ==\n}\n",
        DEFAULT_QUERY,
        false,
        Mode::Enforce,
        FailureMode::Deny,
    )
    .unwrap_err();
    assert!(error.contains("authz.rego"), "{error}");
    assert!(error.contains(":6:") || error.contains(":5:"), "{error}");
    let error = compile_with(RBAC, "allow", false, Mode::Enforce, FailureMode::Deny).unwrap_err();
    assert!(error.contains("must name a rule"), "{error}");
}

#[test]
fn audit_mode_allows_what_it_would_deny_and_errors_follow_the_failure_mode() {
    let metrics = Arc::new(PolicyMetrics::default());
    let enforcing = |policy: CompiledPolicy| Enforcing {
        policy: Arc::new(policy),
        metrics: metrics.clone(),
        log: None,
    };
    let audit = compile_with(RBAC, DEFAULT_QUERY, false, Mode::Audit, FailureMode::Deny).unwrap();
    let req = request("DELETE", "/items/1");
    assert!(matches!(
        check(&enforcing(audit), &req, &peers(None), false),
        Outcome::Allow
    ));
    assert_eq!(metrics.audit_denied.load(Relaxed), 1);

    // A rule that fails at evaluation (a conflict between two values).
    let broken = r#"
package envoy.authz
import rego.v1
allow := true if input.attributes.request.http.method == "GET"
allow := false if input.attributes.request.http.host == "backend"
"#;
    for (failure_mode, allowed) in [(FailureMode::Deny, false), (FailureMode::Allow, true)] {
        let policy =
            compile_with(broken, DEFAULT_QUERY, false, Mode::Enforce, failure_mode).unwrap();
        let outcome = check(
            &enforcing(policy),
            &request("GET", "/"),
            &peers(None),
            false,
        );
        assert_eq!(
            matches!(outcome, Outcome::Allow),
            allowed,
            "{failure_mode:?}"
        );
    }
    assert_eq!(metrics.errors.load(Relaxed), 2);
}

#[test]
fn each_compilation_has_its_own_engine_on_a_thread() {
    let allow_all = compile("package envoy.authz\nimport rego.v1\nallow := true\n");
    let deny_all = compile("package envoy.authz\nimport rego.v1\nallow := false\n");
    let req = request("GET", "/");
    for _ in 0..3 {
        assert!(decide(&allow_all, &req, None).allowed);
        assert!(!decide(&deny_all, &req, None).allowed);
    }
}

#[test]
fn decisions_reach_the_decision_log_with_secrets_redacted() {
    use crate::telemetry::access_log::LogLine as _;
    let settings = crate::config::DecisionLogSettings {
        target: crate::config::AccessLogTarget::Stderr,
        redact_headers: vec!["authorization".into(), "cookie".into()],
        include_allowed: false,
    };
    let (log, records) = DecisionLog::for_tests(&settings);
    let state = Enforcing {
        policy: Arc::new(compile(RBAC)),
        metrics: Arc::new(PolicyMetrics::default()),
        log: Some(log),
    };
    let mut denied = request("DELETE", "/items/1");
    denied
        .headers_mut()
        .insert("authorization", HeaderValue::from_static("Bearer s3cret"));
    assert!(matches!(
        check(
            &state,
            &request("GET", "/items"),
            &peers(Some("spiffe://td/ns/default/sa/web")),
            false
        ),
        Outcome::Allow
    ));
    assert!(matches!(
        check(&state, &denied, &peers(None), false),
        Outcome::Deny(_)
    ));
    // Allowed requests are left out (include_allowed: false).
    let lines: Vec<serde_json::Value> = records
        .try_iter()
        .map(|record| {
            let mut line = Vec::new();
            record.write_line(&(), &mut line).unwrap();
            serde_json::from_slice(&line).unwrap()
        })
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["result"], "deny");
    assert_eq!(line["policy"], "authz");
    assert_eq!(line["request_id"], "r-1");
    let http = &line["input"]["attributes"]["request"]["http"];
    assert_eq!(http["method"], "DELETE");
    assert_eq!(http["headers"]["authorization"], "[REDACTED]");
    assert_eq!(http["headers"]["user-agent"], "curl/8");
}

/// OPA's Envoy tutorial policy, as shipped in `config/policies`.
const ENVOY_PRIMER: &str = include_str!("../../../config/policies/envoy-primer.rego");

/// The tutorial's bearer tokens (HS256, secret "secret"): Alice is a guest,
/// Bob ("sub": "Ym9i", base64 of "bob") an admin. Both expire in 2041.
const ALICE_TOKEN: &str = "eyJhbGciOiAiSFMyNTYiLCAidHlwIjogIkpXVCJ9.eyJleHAiOiAyMjQxMDgxNTM5LCAibmJmIjogMTUxNDg1MTEzOSwgInJvbGUiOiAiZ3Vlc3QiLCAic3ViIjogIllXeHBZMlU9In0.Uk5hgUqMuUfDLvBLnlXMD0-X53aM_Hlziqg3vhOsCc8";
const BOB_TOKEN: &str = "eyJhbGciOiAiSFMyNTYiLCAidHlwIjogIkpXVCJ9.eyJleHAiOiAyMjQxMDgxNTM5LCAibmJmIjogMTUxNDg1MTEzOSwgInJvbGUiOiAiYWRtaW4iLCAic3ViIjogIlltOWkifQ.5qsm7rRTvqFHAgiB6evX0a_hWnGbWquZC0HImVQPQo8";

#[test]
fn opas_envoy_tutorial_policy_runs_unchanged_on_its_bearer_tokens() {
    let policy = compile(ENVOY_PRIMER);
    let bearer = |method: &str, path: &str, token: &str| {
        let mut req = request(method, path);
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        req
    };
    // The tutorial: both may list people.
    assert!(decide(&policy, &bearer("GET", "/people", ALICE_TOKEN), None).allowed);
    assert!(decide(&policy, &bearer("GET", "/people", BOB_TOKEN), None).allowed);
    // Elsewhere, without a token, or with a token the secret did not sign:
    // denied.
    assert!(!decide(&policy, &bearer("GET", "/admin", BOB_TOKEN), None).allowed);
    assert!(!decide(&policy, &request("GET", "/people"), None).allowed);
    let (signed, _) = BOB_TOKEN.rsplit_once('.').unwrap();
    let forged = format!("{signed}.{}", ALICE_TOKEN.rsplit_once('.').unwrap().1);
    assert!(!decide(&policy, &bearer("GET", "/people", &forged), None).allowed);
    // Creating people: never Alice; Bob, unless the name is his own. The
    // proxy sends no body yet, so the test adds OPA-Envoy's `parsed_body`.
    let post = |token: &str, firstname: &str| {
        let mut input = http_input(&bearer("POST", "/people", token), &peers(None), false);
        let body = Value::from(serde_json::json!({ "firstname": firstname, "lastname": "Bar" }));
        input
            .as_object_mut()
            .unwrap()
            .insert(Value::from("parsed_body"), body);
        policy.evaluate(&input).unwrap().allowed
    };
    assert!(!post(ALICE_TOKEN, "Foo"));
    assert!(post(BOB_TOKEN, "Foo"));
    assert!(!post(BOB_TOKEN, "Bob"));
    assert!(!decide(&policy, &bearer("POST", "/people", BOB_TOKEN), None).allowed);
    // A token that is not a JWT: io.jwt.decode_verify's error makes
    // `token` undefined, as OPA evaluates by default, so the request is
    // denied (not an evaluation error), even by a policy whose failure mode
    // would allow it.
    let garbage = http_input(&bearer("GET", "/people", "not-a-jwt"), &peers(None), false);
    assert!(!policy.evaluate(&garbage).unwrap().allowed);
    let lenient = compile_with(
        ENVOY_PRIMER,
        DEFAULT_QUERY,
        false,
        Mode::Enforce,
        FailureMode::Allow,
    )
    .unwrap();
    assert!(!lenient.evaluate(&garbage).unwrap().allowed);
}

#[test]
fn a_connection_input_has_source_and_destination_only() {
    let input = connection_input(&peers(Some("spiffe://td/ns/default/sa/web")));
    let expect = serde_json::json!({
        "attributes": {
            "source": {
                "address": { "socketAddress": { "address": "10.1.2.3", "portValue": 40000 } },
                "principal": "spiffe://td/ns/default/sa/web",
            },
            "destination": {
                "address": { "socketAddress": { "address": "127.0.0.1", "portValue": 15201 } },
                "principal": "spiffe://td/ns/default/sa/backend",
            },
        },
    });
    assert_eq!(input, Value::from(expect));
}

/// The virtual machine and the interpreter give the same decision for
/// the same policy and input (the interpreter is authoritative; a policy
/// whose decisions differ there would be a regorus bug this catches).
#[test]
fn the_virtual_machine_decides_as_the_interpreter_does() {
    let decision_object = r#"
package envoy.authz
import rego.v1
default allow := {"allowed": false, "http_status": 401, "body": "no"}
allow := {"allowed": true, "headers": {"x-user": name}} if {
    name := input.attributes.request.http.headers["x-user"]
    name in {"ann", "bob"}
}
"#;
    let query_params = r#"
package envoy.authz
import rego.v1
default allow := false
allow if {
    some tenant in input.parsed_query.tenant
    startswith(tenant, "acme")
    count(input.parsed_path) >= 2
    net.cidr_contains("10.0.0.0/8", input.attributes.source.address.socketAddress.address)
}
"#;
    let mut rbac_100 =
        String::from("package envoy.authz\nimport rego.v1\ndefault allow := false\n");
    for i in 0..100 {
        rbac_100.push_str(&format!(
            "allow if {{\n  input.attributes.request.http.method == \"GET\"\n  startswith(input.attributes.request.http.path, \"/svc{i}/\")\n}}\n"
        ));
    }
    let mut user = request("GET", "/svc42/items?tenant=acme-1&tenant=other");
    user.headers_mut()
        .insert("x-user", HeaderValue::from_static("bob"));
    let requests = [
        request("GET", "/items/1"),
        request("DELETE", "/items/1"),
        request("GET", "/svc99/x"),
        request("POST", "/svc3/x?tenant=zeta"),
        user,
    ];
    for rego in [RBAC, decision_object, query_params, rbac_100.as_str()] {
        let policy = compile(rego);
        assert!(policy.runs_on_vm(), "{rego}");
        for req in &requests {
            for principal in [None, Some("spiffe://td/ns/default/sa/frontend")] {
                let input = http_input(req, &peers(principal), false);
                let interpreted =
                    Verdict::from_value(&policy.engine.tap_eval(input.clone(), DEFAULT_QUERY))
                        .unwrap();
                let decided = policy.evaluate(&input).unwrap();
                assert_eq!(
                    decided,
                    interpreted,
                    "{} {}\n{rego}",
                    req.method(),
                    req.uri()
                );
            }
        }
    }
}

#[test]
fn cached_decisions_follow_the_key_and_never_outlive_their_policy() {
    let allow_get = compile(RBAC);
    assert!(allow_get.caches_decisions());
    let req = request("GET", "/items/1");
    let frontend = Some("spiffe://td/ns/default/sa/frontend");
    let peers_of = peers(frontend);
    let source = |req| HttpRequest {
        req,
        peers: &peers_of,
        is_tls: false,
    };
    let first = allow_get.evaluate_from(&source(&req));
    let again = allow_get.evaluate_from(&source(&req));
    assert!(!first.cached, "the first decision is evaluated");
    assert!(again.cached, "the same key is answered from the cache");
    assert!(
        again.input.is_none(),
        "a cached decision on a key read from the request builds no document"
    );
    assert_eq!(first.result, again.result);
    // Another method is another key, and another decision.
    let delete_request = request("DELETE", "/items/1");
    let delete = allow_get.evaluate_from(&source(&delete_request));
    assert!(!delete.cached);
    assert_ne!(
        delete.result.unwrap().allowed,
        first.result.unwrap().allowed
    );

    // The same policy changed (a new version) never sees the old decision.
    let posts_only = compile(&RBAC.replacen("\"GET\"", "\"POST\"", 1));
    let after = posts_only.evaluate_from(&source(&req));
    assert!(!after.cached, "a new version starts with an empty cache");
    assert!(
        !after.result.unwrap().allowed,
        "and decides by its own rules"
    );

    // A policy that reads the clock is never cached.
    let clocked = compile(
        "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if time.now_ns() > 0\n",
    );
    assert!(!clocked.caches_decisions());
}

/// Every path a cache key can hold reads, from the request directly, what
/// the built document holds there: a key read one way matches a decision
/// stored under a key read the other way.
#[test]
fn values_read_from_the_request_are_those_of_the_document() {
    let req = Request::builder()
        .method("PUT")
        .uri("/a%2Fb/c?x=1&y=2&x=3")
        .header("host", "api.example.com")
        .header("x-env", "canary")
        .header("accept", "text/html")
        .header("accept", "application/json")
        .header("x-request-id", "r-1")
        .body(())
        .unwrap();
    let peers = peers(Some("spiffe://td/ns/default/sa/frontend"));
    let source = HttpRequest {
        req: &req,
        peers: &peers,
        is_tls: true,
    };
    let document = source.build();
    let paths: &[&[&str]] = &[
        &["attributes", "request", "http", "method"],
        &["attributes", "request", "http", "path"],
        &["attributes", "request", "http", "host"],
        &["attributes", "request", "http", "scheme"],
        &["attributes", "request", "http", "protocol"],
        &["attributes", "request", "http", "headers", "x-env"],
        &["attributes", "request", "http", "headers", "accept"],
        &["attributes", "request", "http", "headers", "absent"],
        &["attributes", "request", "http", "headers", "X-Env"],
        &["attributes", "request", "http", "headers", ":method"],
        &["attributes", "request", "http", "headers", ":path"],
        &["attributes", "request", "http", "headers", ":authority"],
        &["attributes", "request", "http", "headers", ":scheme"],
        &["attributes", "source"],
        &["attributes", "source", "principal"],
        &[
            "attributes",
            "source",
            "address",
            "socketAddress",
            "portValue",
        ],
        &["attributes", "destination"],
        &["attributes", "destination", "principal"],
        &["parsed_path"],
        &["parsed_query"],
        &["parsed_query", "x"],
    ];
    for path in paths {
        let path = cache::CachePath::new(path.iter().map(|s| Value::from(*s)).collect());
        let direct = source.at(&path).expect("read from the request");
        assert_eq!(direct, descend(&document, &path.path), "{path:?}");
    }
    // What cannot be read directly is left to the document.
    for path in [
        &["attributes", "request", "http", "headers"][..],
        &["attributes", "request", "http", "id"],
        &["attributes"],
    ] {
        let path = cache::CachePath::new(path.iter().map(|s| Value::from(*s)).collect());
        assert!(source.at(&path).is_none(), "{path:?}");
    }
    let connection = Connection(&peers);
    let document = connection.build();
    for path in [
        &["attributes", "source"][..],
        &["attributes", "destination", "address"],
    ] {
        let path = cache::CachePath::new(path.iter().map(|s| Value::from(*s)).collect());
        assert_eq!(connection.at(&path), Some(descend(&document, &path.path)));
    }
}

/// A policy that reads a peer's whole object keys on the connection, not
/// on the object: hits on the same connection, a miss on a new one.
#[test]
fn a_peer_object_in_the_key_is_the_connection() {
    let policy = compile(
        "package envoy.authz\nimport rego.v1\ndefault allow := false\n\
         allow if object.get(input.attributes.source, \"principal\", \"\") != \"\"\n",
    );
    assert!(policy.caches_decisions());
    let req = request("GET", "/");
    let frontend = Some("spiffe://td/ns/default/sa/frontend");
    let first_connection = peers(frontend);
    let source = |peers| HttpRequest {
        req: &req,
        peers,
        is_tls: false,
    };
    let path = cache::CachePath::new(["attributes", "source"].map(Value::from).to_vec());
    assert!(matches!(
        source(&first_connection).key_part(0, &path),
        Some(cache::KeyPart::Connection { .. })
    ));
    assert!(!policy.evaluate_from(&source(&first_connection)).cached);
    let again = policy.evaluate_from(&source(&first_connection));
    assert!(again.cached && again.result.unwrap().allowed);
    // Equal peers on another connection: evaluated (and right) again.
    let second_connection = peers(frontend);
    let other = policy.evaluate_from(&source(&second_connection));
    assert!(!other.cached && other.result.unwrap().allowed);
    let anonymous = peers(None);
    assert!(
        !policy
            .evaluate_from(&source(&anonymous))
            .result
            .unwrap()
            .allowed
    );
}

/// The decision `policy` makes on each request for each caller, and the
/// interpreter's (authoritative) decision on the same input.
fn decisions_match_the_interpreter(policy: &CompiledPolicy, rego: &str, requests: &[Request<()>]) {
    for req in requests {
        for principal in [
            None,
            Some("spiffe://td/ns/default/sa/caller3"),
            Some("spiffe://td/ns/default/sa/admin"),
        ] {
            let input = http_input(req, &peers(principal), false);
            let interpreted =
                Verdict::from_value(&policy.engine.tap_eval(input.clone(), DEFAULT_QUERY));
            let decided = policy.evaluate(&input);
            assert_eq!(
                decided,
                interpreted,
                "{} {} {principal:?}\n{rego}",
                req.method(),
                req.uri()
            );
        }
    }
}

/// A policy of many grants, one `allow` each, in the style of the
/// benchmark's: method, path prefix and the caller.
fn grants(count: usize) -> String {
    let mut rego = String::from(
        "package envoy.authz\nimport rego.v1\ndefault allow := false\n\
         caller := object.get(input.attributes.source, \"principal\", \"anonymous\")\n",
    );
    for i in 0..count {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        rego.push_str(&format!(
            "allow if {{\n  input.attributes.request.http.method == \"{method}\"\n  \
             startswith(input.attributes.request.http.path, \"/svc{i}/\")\n  \
             caller == \"spiffe://td/ns/default/sa/caller{i}\"\n}}\n"
        ));
    }
    rego
}

#[test]
fn many_grants_are_indexed_and_only_those_that_can_hold_are_evaluated() {
    let rego = grants(100);
    let policy = compile(&rego);
    assert!(policy.indexes_rules());
    let index = policy.program.as_ref().unwrap().index.as_ref().unwrap();
    assert_eq!(index.len(), 100);
    let input = |method: &str, path: &str| http_input(&request(method, path), &peers(None), false);
    // Method and prefix leave one grant; `caller`, a rule, is not read.
    assert_eq!(
        index.candidates(&input("POST", "/svc3/orders")),
        Some(vec![3])
    );
    assert_eq!(
        index.candidates(&input("GET", "/svc3/orders")),
        Some(vec![])
    );
    // `/svc1/` is a prefix of `/svc10/`... but not of `/svc1x`.
    assert_eq!(index.candidates(&input("POST", "/svc11/x")), Some(vec![11]));
    assert_eq!(index.candidates(&input("GET", "/other")), Some(vec![]));
    // `caller`'s condition is not the index's: each grant is run.
    assert!(!index.whole(3));
    let requests = [
        request("POST", "/svc3/orders"),
        request("GET", "/svc3/orders"),
        request("GET", "/svc4/x"),
        request("POST", "/svc99/x?y=1"),
        request("DELETE", "/svc3/x"),
        request("GET", "/"),
    ];
    decisions_match_the_interpreter(&policy, &rego, &requests);
    // Caller 3, on its grant, is allowed; on another's, not.
    let verdict = |method: &str, path: &str| {
        decide(
            &policy,
            &request(method, path),
            Some("spiffe://td/ns/default/sa/caller3"),
        )
        .allowed
    };
    assert!(verdict("POST", "/svc3/orders"));
    assert!(!verdict("POST", "/svc5/orders"));
    assert!(!verdict("GET", "/svc3/orders"));
}

#[test]
fn conditions_the_index_cannot_trust_are_not_read() {
    // Through an import; under `not`; beside a condition the index does
    // not read; on a local name; on the caller.
    let rego = r#"
package envoy.authz
import rego.v1
import input.attributes.request.http as http_request
default allow := false
allow if {
    http_request.method == "GET"
    http_request.path == "/a"
}
allow if {
    not http_request.method == "GET"
    input.attributes.request.http.path == "/b"
}
allow if {
    count(input.parsed_path) == 1
    input.attributes.request.http.path == "/c"
}
allow if {
    some request in [{"method": "PATCH"}]
    request.method == "PATCH"
    input.attributes.request.http.path == "/d"
}
allow if {
    input.attributes.source.principal == "spiffe://td/ns/default/sa/admin"
}
allow if {
    http_request.method in {"PUT", "PATCH"}
    input.attributes.request.http.path == "/e"
}
"#;
    let policy = compile(rego);
    assert!(policy.indexes_rules());
    let index = policy.program.as_ref().unwrap().index.as_ref().unwrap();
    let input = |method: &str, path: &str, principal: Option<&str>| {
        http_input(&request(method, path), &peers(principal), false)
    };
    assert_eq!(index.candidates(&input("GET", "/a", None)), Some(vec![0]));
    assert_eq!(index.candidates(&input("POST", "/a", None)), Some(vec![]));
    assert_eq!(
        index.candidates(&input("DELETE", "/b", None)),
        Some(vec![1])
    );
    // Only the path is read of the third and fourth.
    assert_eq!(index.candidates(&input("GET", "/e", None)), Some(vec![]));
    assert_eq!(index.candidates(&input("PATCH", "/e", None)), Some(vec![5]));
    assert_eq!(index.candidates(&input("GET", "/c", None)), Some(vec![2]));
    assert_eq!(index.candidates(&input("GET", "/d", None)), Some(vec![3]));
    assert_eq!(
        index.candidates(&input("GET", "/z", Some("spiffe://td/ns/default/sa/admin"))),
        Some(vec![4])
    );
    // Those made of conditions only are decided without being run, and
    // when they decide (or nothing can hold), no input document is built.
    let whole: Vec<bool> = (0..6).map(|n| index.whole(n)).collect();
    assert_eq!(whole, [true, false, false, false, true, true]);
    let caller = peers(None);
    for (method, path, allowed, built) in [
        ("GET", "/a", true, false),
        ("POST", "/a", false, false),
        ("DELETE", "/b", true, true),
    ] {
        let req = request(method, path);
        let source = HttpRequest {
            req: &req,
            peers: &caller,
            is_tls: false,
        };
        let evaluated = policy.evaluate_from(&source);
        assert_eq!(
            evaluated.result.unwrap().allowed,
            allowed,
            "{method} {path}"
        );
        assert_eq!(evaluated.input.is_some(), built, "{method} {path}");
    }
    let requests = [
        request("GET", "/a"),
        request("POST", "/a"),
        request("DELETE", "/b"),
        request("GET", "/b"),
        request("GET", "/c"),
        request("PATCH", "/d"),
        request("GET", "/d"),
        request("GET", "/z"),
        request("PUT", "/e"),
        request("PATCH", "/e"),
        request("GET", "/e"),
    ];
    decisions_match_the_interpreter(&policy, rego, &requests);

    // A body that declares an imported name again reads its own, not the
    // input (regorus's virtual machine refuses such a policy today; the
    // index would not read it either), and `with` changes what a
    // condition reads.
    let shadowed = r#"
package envoy.authz
import rego.v1
import input.attributes.request.http as http_request
default allow := false
allow if {
    some http_request in [{"method": "PATCH"}]
    http_request.method == "PATCH"
}
allow if {
    input.attributes.request.http.method == "PUT" with input.attributes.request.http.method as "PUT"
}
allow if http_request.method == "GET"
"#;
    let mut engine = regorus::Engine::new();
    engine
        .add_policy("authz.rego".into(), shadowed.into())
        .unwrap();
    let indexed = index::RuleIndex::build(engine.get_modules(), DEFAULT_QUERY).unwrap();
    assert_eq!(indexed.entry_points.len(), 3);
    assert_eq!(
        indexed.index.candidates(&input("POST", "/", None)),
        Some(vec![0, 1])
    );
}

#[test]
fn policies_the_index_would_change_get_none() {
    let unindexed = [
        // No default: undefined is not the index's to give.
        "package envoy.authz\nimport rego.v1\nallow if input.attributes.request.http.method == \"GET\"\n",
        // A definition whose value is not `true`.
        "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow := \"maybe\" if input.attributes.request.http.method == \"GET\"\n",
        // An `else`.
        "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if {\n input.attributes.request.http.method == \"GET\"\n} else := false\n",
        // A decision object.
        "package envoy.authz\nimport rego.v1\ndefault allow := {\"allowed\": false}\nallow := {\"allowed\": true} if input.attributes.request.http.method == \"GET\"\n",
        // No definition with a condition.
        "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if count(input.parsed_path) > 1\n",
        // A name of the copies' in the policy.
        "package envoy.authz\nimport rego.v1\ndefault allow := false\n__weft_index_0 := 1\nallow if input.attributes.request.http.method == \"GET\"\n",
    ];
    for rego in unindexed {
        let policy = compile(rego);
        assert!(!policy.indexes_rules(), "{rego}");
        decisions_match_the_interpreter(
            &policy,
            rego,
            &[request("GET", "/a/b"), request("POST", "/a")],
        );
    }
    // A query on another rule than the one with the definitions.
    let rego = "package envoy.authz\nimport rego.v1\ndefault allow := false\n\
                allow if input.attributes.request.http.method == \"GET\"\nresult := {\"allowed\": allow}\n";
    let policy = compile_with(
        rego,
        "data.envoy.authz.result",
        false,
        Mode::Enforce,
        FailureMode::Deny,
    )
    .unwrap();
    assert!(!policy.indexes_rules());
    // Rego v0, with `allow { ... }` heads, is indexed like v1.
    let v0 = "package envoy.authz\ndefault allow = false\nallow {\n input.attributes.request.http.method == \"GET\"\n}\nallow = true {\n input.attributes.request.http.method == \"PUT\"\n}\n";
    let policy = compile_with(v0, DEFAULT_QUERY, true, Mode::Enforce, FailureMode::Deny).unwrap();
    assert!(policy.indexes_rules());
    decisions_match_the_interpreter(
        &policy,
        v0,
        &[
            request("GET", "/"),
            request("PUT", "/"),
            request("POST", "/"),
        ],
    );
}

#[test]
fn a_value_of_a_type_the_index_does_not_test_leaves_the_decision_to_the_policy() {
    let rego = "package envoy.authz\nimport rego.v1\ndefault allow := false\n\
                allow if startswith(input.user, \"ad\")\nallow if input.level == 3\n";
    let policy = compile(rego);
    assert!(policy.indexes_rules());
    // Both definitions are conditions only: the index decides every
    // request, and no cache is kept.
    assert!(!policy.caches_decisions());
    let index = policy.program.as_ref().unwrap().index.as_ref().unwrap();
    let number = Value::from(serde_json::json!({"user": 7, "level": 3}));
    assert_eq!(index.candidates(&number), None);
    assert!(policy.evaluate(&number).unwrap().allowed);
    for (input, allowed) in [
        (serde_json::json!({"user": "admin"}), true),
        (serde_json::json!({"user": "bob", "level": 3}), true),
        (serde_json::json!({"user": "bob", "level": 3.0}), true),
        (serde_json::json!({"user": "bob", "level": "3"}), false),
        (serde_json::json!({}), false),
    ] {
        let input = Value::from(input);
        let interpreted =
            Verdict::from_value(&policy.engine.tap_eval(input.clone(), DEFAULT_QUERY)).unwrap();
        assert_eq!(interpreted.allowed, allowed, "{input}");
        assert_eq!(policy.evaluate(&input).unwrap(), interpreted);
    }
}
