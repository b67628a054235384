use std::time::Duration;

use super::*;

const VALID: &str = r#"
admin: { address: "127.0.0.1:0" }
drain_timeout: 3s
listeners:
  - name: web
    address: 127.0.0.1:0
    route_config: main
  - name: db
    address: 127.0.0.1:0
    protocol: tcp
    cluster: pg
route_configs:
  - name: main
    virtual_hosts:
      - name: api
        domains: ["api.example.com", "*.example.com"]
        routes:
          - name: users
            match: { prefix: /users, methods: [GET], headers: [{ name: x-env, exact: canary }] }
            cluster: users
            prefix_rewrite: /v2/users
            timeout: 2s
            request_headers: { set: { x-a: "1" }, add: { x-b: "2" }, remove: [x-c] }
          - match: { regex: "/items/[0-9]+" }
            weighted_clusters: [{ cluster: users, weight: 9 }, { cluster: pg, weight: 1 }]
          - match: { exact: /health }
            direct_response: { status: 200, body: ok }
            timeout: 0s
clusters:
  - name: users
    protocol: http2
    lb: least_request
    endpoints: [{ address: "127.0.0.1:8081", weight: 3 }, { address: "users.svc.local:80" }]
  - name: pg
    endpoints: [{ address: "[::1]:5432" }]
"#;

#[test]
fn valid_config_builds_the_model_with_defaults() {
    let config = Config::from_yaml(VALID, "test").unwrap();
    assert_eq!(config.listeners.len(), 2);
    assert_eq!(config.drain_timeout, std::time::Duration::from_secs(3));
    assert_eq!(
        config.listeners[0].kind,
        ListenerKind::Http {
            route_config: "main".into()
        }
    );
    assert_eq!(config.listeners[0].max_request_headers, 100);
    let vhost = &config.route_configs[0].virtual_hosts[0];
    assert_eq!(vhost.domains[1], DomainMatch::Suffix(".example.com".into()));
    assert_eq!(&*vhost.routes[1].name, "api/1");
    assert!(vhost.routes[2].timeout.is_none());
    assert_eq!(
        vhost.routes[0].timeout,
        Some(std::time::Duration::from_secs(2))
    );
    let users = &config.clusters[0];
    assert_eq!(users.protocol, UpstreamProtocol::Http2);
    assert_eq!(users.lb, LbPolicy::LeastRequest);
    assert_eq!(
        users.endpoints[1].address,
        EndpointAddress::Dns {
            host: "users.svc.local".into(),
            port: 80
        }
    );
    assert_eq!(config.clusters[1].lb, LbPolicy::RoundRobin);
}

fn errors_of(yaml: &str) -> Vec<String> {
    match Config::from_yaml(yaml, "test") {
        Err(LoadError::Invalid { errors, .. }) => {
            errors.0.iter().map(ToString::to_string).collect()
        }
        Err(other) => vec![other.to_string()],
        Ok(_) => vec![],
    }
}

#[test]
fn invalid_values_name_resource_and_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "lb: least_request",
            "lb: fastest",
            r#"cluster "users": lb: unknown value "fastest" (expected round_robin, random, least_request)"#,
        ),
        (
            "protocol: http2",
            "protocol: http3",
            r#"cluster "users": protocol: unknown value "http3""#,
        ),
        (
            "cluster: users\n            prefix_rewrite",
            "cluster: nope\n            prefix_rewrite",
            r#"route_config "main": virtual_hosts[0].routes[0].cluster: unknown cluster "nope""#,
        ),
        (
            "route_config: main",
            "route_config: other",
            r#"listener "web": route_config: unknown route_config "other""#,
        ),
        (
            r#"regex: "/items/[0-9]+""#,
            r#"regex: "/items/[0-9+""#,
            r#"route_config "main": virtual_hosts[0].routes[1].match.regex: invalid regex"#,
        ),
        (
            r#"address: "127.0.0.1:8081""#,
            r#"address: "127.0.0.1:99999""#,
            r#"cluster "users": endpoints[0].address: invalid address"#,
        ),
        (
            "methods: [GET]",
            "methods: [\"G T\"]",
            r#"match.methods[0]: invalid method"#,
        ),
        (
            "{ name: x-env, exact: canary }",
            "{ name: x-env, exact: canary, present: true }",
            "match.headers[0]: set exactly one of exact, regex, present",
        ),
        (
            "status: 200",
            "status: 42",
            "direct_response.status: invalid status 42",
        ),
        (
            "{ cluster: users, weight: 9 }, { cluster: pg, weight: 1 }",
            "{ cluster: users, weight: 0 }",
            "weighted_clusters: needs at least one cluster with a weight above 0",
        ),
        (
            "set: { x-a: \"1\" }",
            "set: { content-length: \"1\" }",
            "request_headers.set.content-length: \"content-length\" is managed by the proxy",
        ),
        (
            "address: 127.0.0.1:0\n    route_config",
            "address: localhost\n    route_config",
            r#"listener "web": address: invalid socket address"#,
        ),
        (
            "protocol: tcp",
            "protocol: udp",
            r#"listener "db": protocol: unknown value "udp""#,
        ),
    ];
    for (from, to, want) in cases {
        assert!(
            VALID.contains(from),
            "test case pattern {from:?} not in the base config"
        );
        let errors = errors_of(&VALID.replacen(from, to, 1));
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "replacing {from:?} with {to:?}: want {want:?}, got {errors:#?}"
        );
    }
}

#[test]
fn unknown_fields_are_rejected_with_their_path() {
    let err = Config::from_yaml(
        &VALID.replace("lb: least_request", "lb: least_request\n    lbb: x"),
        "f.yaml",
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("unknown field `lbb`"), "{text}");
    assert!(text.contains("clusters[0]"), "{text}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let yaml = VALID
        .replace("lb: least_request", "lb: nope")
        .replace("protocol: tcp", "protocol: udp");
    assert_eq!(errors_of(&yaml).len(), 2, "{:#?}", errors_of(&yaml));
}

#[test]
fn duplicates_are_rejected() {
    let yaml = VALID.replace("name: pg\n    endpoints", "name: users\n    endpoints");
    let errors = errors_of(&yaml);
    assert!(
        errors
            .iter()
            .any(|e| e.contains(r#"cluster "users": name: duplicate name"#)),
        "{errors:#?}"
    );
    let yaml = VALID.replace(
        r#"["api.example.com", "*.example.com"]"#,
        r#"["api.example.com", "API.example.com"]"#,
    );
    assert!(
        errors_of(&yaml)
            .iter()
            .any(|e| e.contains("claimed by more than one virtual host"))
    );
}

#[test]
fn endpoint_addresses_parse() {
    let cases = [
        ("127.0.0.1:80", true),
        ("[::1]:80", true),
        ("svc.default.cluster.local:8080", true),
        ("localhost:1", true),
        ("localhost", false),
        ("host:0", false),
        ("bad host:80", false),
        (":80", false),
        ("a..b:80", false),
    ];
    for (address, ok) in cases {
        assert_eq!(parse_endpoint_address(address).is_some(), ok, "{address}");
    }
}

#[test]
fn reverse_proxy_shorthand_is_valid() {
    let config = Config::reverse_proxy(
        "127.0.0.1:0",
        &["127.0.0.1:1".into(), "127.0.0.1:2".into()],
        None,
        None,
    )
    .unwrap();
    assert_eq!(config.clusters[0].endpoints.len(), 2);
    let err = Config::reverse_proxy("127.0.0.1:0", &["nope".into()], None, None).unwrap_err();
    assert!(err.to_string().contains("endpoints[0].address"), "{err}");
}

#[test]
fn rules_found_by_review_are_enforced() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "status: 200",
            "status: 700",
            "direct_response.status: invalid status 700",
        ),
        (
            r#"["api.example.com", "*.example.com"]"#,
            r#"["api.example.com:8080", "*.example.com"]"#,
            "without a port",
        ),
        (
            "methods: [GET]",
            "methods: [get]",
            r#""get" never matches; methods are case-sensitive (did you mean "GET"?)"#,
        ),
        (
            "cluster: pg\nroute_configs",
            "cluster: pg\n    via: weft\nroute_configs",
            r#"listener "db": via: applies to http listeners only"#,
        ),
        (
            r#"[{ address: "127.0.0.1:8081", weight: 3 }, { address: "users.svc.local:80" }]"#,
            r#"[{ address: "127.0.0.1:8081", weight: 3 }, { address: "127.0.0.1:8081" }]"#,
            "endpoints[1].address: \"127.0.0.1:8081\" is listed twice",
        ),
        (
            "- name: api\n",
            "- name: \"bad name\"\n",
            "virtual_hosts[0].name: \"bad name\" may only contain",
        ),
        (
            "- name: users\n            match",
            "- name: \"no spaces\"\n            match",
            "routes[0].name: \"no spaces\" may only contain",
        ),
    ];
    for (from, to, want) in cases {
        assert!(
            VALID.contains(from),
            "test case pattern {from:?} not in the base config"
        );
        let errors = errors_of(&VALID.replacen(from, to, 1));
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "replacing {from:?} with {to:?}: want {want:?}, got {errors:#?}"
        );
    }
}

#[test]
fn the_empty_configuration_is_valid() {
    let config = Config::empty();
    assert!(config.listeners.is_empty() && config.clusters.is_empty());
    assert!(config.admin.is_none());
}

#[test]
fn addresses_that_cannot_all_be_bound_are_rejected() {
    let config = |admin: &str, a: &str, b: &str| {
        format!(
            "admin: {{ address: \"{admin}\" }}\nlisteners:\n  - {{ name: a, address: \"{a}\", protocol: tcp, cluster: c }}\n  - {{ name: b, address: \"{b}\", protocol: tcp, cluster: c }}\nclusters: [{{ name: c, endpoints: [{{ address: \"127.0.0.1:1\" }}] }}]\n"
        )
    };
    let cases = [
        (
            "127.0.0.1:0",
            "127.0.0.1:9000",
            "127.0.0.1:9000",
            Some(
                r#"listener "b": address: 127.0.0.1:9000 clashes with listener "a" (127.0.0.1:9000)"#,
            ),
        ),
        (
            "127.0.0.1:0",
            "0.0.0.0:9000",
            "127.0.0.1:9000",
            Some(
                r#"listener "b": address: 127.0.0.1:9000 clashes with listener "a" (0.0.0.0:9000)"#,
            ),
        ),
        (
            "127.0.0.1:0",
            "127.0.0.1:9000",
            "[::]:9000",
            Some(r#"listener "b": address: [::]:9000 clashes with listener "a" (127.0.0.1:9000)"#),
        ),
        (
            "127.0.0.1:9000",
            "127.0.0.1:9000",
            "127.0.0.1:9001",
            Some(r#"listener "a": address: 127.0.0.1:9000 clashes with the admin server"#),
        ),
        ("127.0.0.1:0", "0.0.0.0:9000", "[::1]:9000", None),
        ("127.0.0.1:0", "127.0.0.1:9000", "127.0.0.2:9000", None),
        ("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", None),
    ];
    for (admin, a, b, want) in cases {
        let result = Config::from_yaml(&config(admin, a, b), "t");
        match want {
            None => assert!(result.is_ok(), "{admin} {a} {b}: {:?}", result.err()),
            Some(message) => {
                let error = result.unwrap_err().to_string();
                assert!(error.contains(message), "{admin} {a} {b}: {error}");
            }
        }
    }
}

#[test]
fn drain_delay_defaults_to_five_seconds_and_is_bounded() {
    let config = Config::from_yaml("listeners: []", "t").unwrap();
    assert_eq!(config.drain_delay, Duration::from_secs(5));
    let config = Config::from_yaml("drain_delay: 0s\nlisteners: []", "t").unwrap();
    assert_eq!(config.drain_delay, Duration::ZERO);
    let error = Config::from_yaml("drain_delay: 10m\nlisteners: []", "t")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("drain_delay: 10m is longer than 5m"),
        "{error}"
    );
}

#[test]
fn tls_passthrough_routes_are_checked() {
    let base = |listener: &str| {
        format!(
            "clusters: [{{ name: a, endpoints: [{{ address: \"127.0.0.1:1\" }}] }}]\n\
             listeners: [{listener}]\n"
        )
    };
    let ok = base(
        "{ name: edge, address: \"127.0.0.1:0\", protocol: tcp, \
         sni_routes: [{ server_names: [API.example.com, \"*.example.org\"], cluster: a }] }",
    );
    let config = Config::from_yaml(&ok, "test").unwrap();
    let ListenerKind::Tcp {
        cluster,
        sni_routes,
    } = &config.listeners[0].kind
    else {
        panic!("a tcp listener")
    };
    assert!(cluster.is_none());
    assert!(
        sni_routes[0].matches("api.example.com"),
        "names are lower-cased"
    );
    assert!(sni_routes[0].matches("www.example.org"));
    assert!(!sni_routes[0].matches("example.org"));

    for (listener, want) in [
        (
            "{ name: edge, address: \"127.0.0.1:0\", protocol: tcp, sni_routes: [] }",
            r#"listener "edge": sni_routes: must list at least one route"#,
        ),
        (
            "{ name: edge, address: \"127.0.0.1:0\", protocol: tcp, sni_routes: [{ server_names: [\"a:443\"], cluster: a }] }",
            r#"listener "edge": sni_routes[0].server_names[0]: invalid server name "a:443""#,
        ),
        (
            "{ name: edge, address: \"127.0.0.1:0\", protocol: tcp, sni_routes: [{ server_names: [a.com], cluster: nope }] }",
            r#"listener "edge": sni_routes[0].cluster: unknown cluster "nope""#,
        ),
        (
            "{ name: edge, address: \"127.0.0.1:0\", route_config: r, sni_routes: [{ server_names: [a.com], cluster: a }] }",
            r#"listener "edge": sni_routes: applies to tcp listeners only"#,
        ),
        (
            "{ name: edge, address: \"127.0.0.1:0\", protocol: tcp, tls: { workload_identity: \"spiffe://a/ns/b/sa/c\" }, \
             sni_routes: [{ server_names: [a.com], cluster: a }] }",
            r#"listener "edge": sni_routes: routes TLS passthrough by the ClientHello; a listener with tls terminates"#,
        ),
    ] {
        let errors = errors_of(&base(listener));
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "{listener}: {errors:?}"
        );
    }
}

#[test]
fn health_checks_take_their_defaults_and_name_bad_fields() {
    let base = "  - name: pg\n    endpoints: [{ address: \"[::1]:5432\" }]";
    assert!(VALID.contains(base));
    let with = |extra: &str| VALID.replacen(base, &format!("{base}\n    {extra}"), 1);
    let config = Config::from_yaml(
        &with(r#"health_check: { http: { path: /healthz, expected_statuses: [204, "300-399"] } }"#),
        "test",
    )
    .unwrap();
    let check = config.clusters[1].health_check.clone().unwrap();
    assert_eq!(check.interval, Duration::from_secs(5));
    assert_eq!(check.interval_jitter, Duration::from_millis(500));
    assert_eq!(check.timeout, Duration::from_secs(1));
    assert_eq!((check.healthy_threshold, check.unhealthy_threshold), (2, 3));
    assert_eq!(
        check.kind,
        HealthCheckKind::Http {
            path: http::uri::PathAndQuery::from_static("/healthz"),
            host: http::HeaderValue::from_static("pg"),
            expected_statuses: vec![(204, 204), (300, 399)],
        }
    );
    let config = Config::from_yaml(&with("health_check: { grpc: {} }"), "test").unwrap();
    assert!(matches!(
        config.clusters[1].health_check.as_ref().unwrap().kind,
        HealthCheckKind::Grpc { ref service, .. } if service.is_empty()
    ));

    let cases = [
        (
            "health_check: { interval: 1s }",
            r#"cluster "pg": health_check: set exactly one of http, tcp and grpc"#,
        ),
        (
            "health_check: { tcp: {}, grpc: {} }",
            "health_check: set exactly one",
        ),
        (
            "health_check: { tcp: {}, interval: 1ms }",
            "health_check.interval: must be at least 10ms",
        ),
        (
            "health_check: { tcp: {}, timeout: 0s }",
            "health_check.timeout: must be greater than zero",
        ),
        (
            "health_check: { tcp: {}, unhealthy_threshold: 0 }",
            "health_check.unhealthy_threshold: must be at least 1",
        ),
        (
            "health_check: { http: { path: healthz } }",
            r#"health_check.http.path: "healthz" is not an absolute path"#,
        ),
        (
            r#"health_check: { http: { path: /h, expected_statuses: ["299-200"] } }"#,
            "health_check.http.expected_statuses[0]: \"299-200\" is not a status",
        ),
        (
            "health_check: { http: { path: /h, expected_statuses: [600] } }",
            "health_check.http.expected_statuses[0]",
        ),
        ("health_check: { tcp: { port: 1 } }", "unknown field `port`"),
        (
            "circuit_breakers: { max_connections: 0 }",
            "circuit_breakers.max_connections: must be at least 1",
        ),
        (
            "outlier_detection: { success_rate: { request_volume: 0 } }",
            "outlier_detection.success_rate.request_volume: must be at least 1",
        ),
    ];
    for (extra, want) in cases {
        let errors = errors_of(&with(extra));
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{extra}: want {want:?}, got {errors:#?}"
        );
    }
}

#[test]
fn a_policy_is_compiled_once_per_version() {
    let yaml = |rule: &str| {
        format!(
            r#"
policies:
  - name: p
    rego: |
      package envoy.authz
      import rego.v1
      default allow := {rule}
"#
        )
    };
    let first = Config::from_yaml(&yaml("true"), "a.yaml").unwrap();
    let again = Config::from_yaml(&yaml("true"), "b.yaml").unwrap();
    assert!(
        Arc::ptr_eq(&first.policies[0], &again.policies[0]),
        "an unchanged policy is not compiled again"
    );
    let changed = Config::from_yaml(&yaml("false"), "c.yaml").unwrap();
    assert!(!Arc::ptr_eq(&first.policies[0], &changed.policies[0]));
    assert_ne!(first.policies[0].version, changed.policies[0].version);
}

#[test]
fn tracing_settings_are_checked_and_defaulted() {
    let with = |tracing: &str| {
        VALID.replace(
            "    route_config: main\n  - name: db",
            &format!("    route_config: main\n    tracing: {tracing}\n  - name: db"),
        )
    };
    let config = Config::from_yaml(
        &with(r#"{ collector: "http://127.0.0.1:4318", protocol: http, sample_percent: 1 }"#),
        "test",
    )
    .unwrap();
    let tracing = config.listeners[0].tracing.as_ref().unwrap();
    assert_eq!(
        tracing.export.endpoint.collector,
        "http://127.0.0.1:4318/v1/traces"
    );
    assert_eq!(tracing.export.endpoint.protocol, OtlpProtocol::HttpProtobuf);
    assert_eq!(tracing.export.endpoint.service_name, "weft-proxy");
    assert_eq!(tracing.export.max_queued_spans, 2048);
    assert_eq!(tracing.sample, Percent(10_000));
    assert!(!tracing.always_sample_errors);

    let cases: &[(&str, &str)] = &[
        ("{ protocol: grpc }", "tracing.collector: required"),
        (
            r#"{ collector: "ftp://collector:4317" }"#,
            "must be an http:// or https:// URL with a host",
        ),
        (
            r#"{ collector: "https://collector:4317", ca_file: /nonexistent/ca.pem }"#,
            "tracing.ca_file: cannot read \"/nonexistent/ca.pem\"",
        ),
        (
            r#"{ collector: "http://collector:4317/v1/traces" }"#,
            "a gRPC collector is a host and port, without a path",
        ),
        (
            r#"{ collector: "http://c:4317", protocol: thrift }"#,
            r#"tracing.protocol: "thrift" is not one of grpc, http"#,
        ),
        (
            r#"{ collector: "http://c:4317", sample_percent: 101 }"#,
            "tracing.sample_percent: 101 is not a percentage (0 to 100)",
        ),
        (
            r#"{ collector: "http://c:4317", headers: { X-Token: a } }"#,
            "tracing.headers.X-Token: is not a lower-case header name",
        ),
        (
            r#"{ collector: "http://c:4317", max_export_batch: 5000 }"#,
            "tracing.max_export_batch: 5000 is out of range (1..=max_queued_spans)",
        ),
    ];
    for (tracing, expected) in cases {
        let errors = errors_of(&with(tracing));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(r#"listener "web": "#) && e.contains(expected)),
            "{tracing}: {errors:?}"
        );
    }
    // TCP listeners trace too (a span per connection), checked alike.
    let tcp = VALID.replace(
        "    protocol: tcp\n",
        "    protocol: tcp\n    tracing: { collector: \"http://c:4317\" }\n",
    );
    assert_eq!(errors_of(&tcp), Vec::<String>::new());
    let tcp = VALID.replace(
        "    protocol: tcp\n",
        "    protocol: tcp\n    tracing: { collector: \"http://c:4317\", sample_percent: 101 }\n",
    );
    assert!(
        errors_of(&tcp)
            .iter()
            .any(|e| e.starts_with(r#"listener "db": "#)
                && e.contains("tracing.sample_percent: 101 is not a percentage")),
        "{:?}",
        errors_of(&tcp)
    );
}

#[test]
fn metrics_export_is_checked_and_defaulted() {
    let with = |export: &str| format!("metrics_export: {export}\n{VALID}");
    let config = Config::from_yaml(
        &with(r#"{ collector: "http://127.0.0.1:4318", protocol: http }"#),
        "test",
    )
    .unwrap();
    let export = config.metrics_export.as_ref().unwrap();
    assert_eq!(
        export.endpoint.collector,
        "http://127.0.0.1:4318/v1/metrics"
    );
    assert_eq!(export.endpoint.protocol, OtlpProtocol::HttpProtobuf);
    assert_eq!(export.endpoint.service_name, "weft-proxy");
    assert_eq!(export.interval, std::time::Duration::from_secs(60));
    let cases: &[(&str, &str)] = &[
        (
            "{ interval: 5s }",
            "metrics_export \"metrics_export\": collector: required",
        ),
        (
            r#"{ collector: "http://c:4317", ca_file: /etc/ca.pem }"#,
            "metrics_export \"metrics_export\": ca_file: only for an https:// collector",
        ),
        (
            r#"{ collector: "http://c:4317", interval: 100ms }"#,
            "interval: 100ms is shorter than 1s",
        ),
        (
            r#"{ collector: "http://c:4317", headers: { "bad name": x } }"#,
            "headers.bad name: is not a lower-case header name",
        ),
    ];
    for (export, expected) in cases {
        let errors = errors_of(&with(export));
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{export}: {errors:?}"
        );
    }
}

#[test]
fn istio_metrics_settings_are_checked() {
    let with = |istio: &str| {
        VALID.replace(
            "    route_config: main\n  - name: db",
            &format!("    route_config: main\n    istio_metrics: {istio}\n  - name: db"),
        )
    };
    let config = Config::from_yaml(
        &with(
            r#"{ reporter: source, workload: { name: web, app: web }, destinations: { users: { service: users.shop } } }"#,
        ),
        "test",
    )
    .unwrap();
    let istio = config.listeners[0].istio_metrics.as_ref().unwrap();
    assert_eq!(istio.reporter, IstioReporter::Source);
    assert_eq!(istio.max_series, 1000);
    assert_eq!(istio.workload.app.as_deref(), Some("web"));
    assert_eq!(
        istio.destinations["users"].service.as_deref(),
        Some("users.shop")
    );

    let cases: &[(&str, &str)] = &[
        (
            "{}",
            "istio_metrics.reporter: required: source or destination",
        ),
        (
            "{ reporter: both }",
            r#"istio_metrics.reporter: "both" is not one of source, destination"#,
        ),
        (
            "{ reporter: source, destinations: { nowhere: {} } }",
            r#"istio_metrics.destinations.nowhere: unknown cluster "nowhere""#,
        ),
        (
            r#"{ reporter: source, sources: { "spiffe://a/ns/b/sa/c": {} } }"#,
            "only with reporter: destination",
        ),
        (
            "{ reporter: destination, sources: { frontend: {} } }",
            r#"istio_metrics.sources.frontend: "frontend" is not a SPIFFE ID"#,
        ),
        (
            "{ reporter: destination, destinations: { users: {} } }",
            "only with reporter: source",
        ),
        (
            r#"{ reporter: destination, workload: { name: "" } }"#,
            "istio_metrics.workload.name: \"\" must be 1..=253 bytes",
        ),
        (
            "{ reporter: destination, max_series: 0 }",
            "istio_metrics.max_series: 0 is out of range (1..=100000)",
        ),
    ];
    for (istio, expected) in cases {
        let errors = errors_of(&with(istio));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(r#"listener "web": "#) && e.contains(expected)),
            "{istio}: {errors:?}"
        );
    }
}

#[test]
fn an_access_log_template_is_parsed_once_and_checked() {
    let with = |log: &str| format!("access_log: {log}\n{VALID}");
    let config = Config::from_yaml(
        &with(r#"{ path: stdout, template: "{method} {path} {status} {trace_id}" }"#),
        "test",
    )
    .unwrap();
    assert!(config.access_log_template.is_some());
    let errors = errors_of(&with(r#"{ path: stdout, template: "{method} {bogus}" }"#));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("access_log") && e.contains("template: unknown field {bogus}")),
        "{errors:?}"
    );
}
