//! The Grafana dashboard and the Prometheus alert rules in deploy/grafana
//! parse, and every metric they query is one a running proxy exports.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use weft_tests::*;

fn deploy(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `expr` string anywhere in a JSON or YAML document.
fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The `weft_*` names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("weft_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_metrics_the_proxy_exports() {
    let dashboard: serde_json::Value = serde_json::from_str(&deploy("weft-mesh.json")).unwrap();
    assert_eq!(dashboard["uid"], "weft-mesh");
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
    }
    let alerts: serde_json::Value = serde_yaml_ng::from_str(&deploy("weft-alerts.yaml")).unwrap();
    let rules: Vec<&serde_json::Value> = alerts["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert!(rules.len() >= 8);
    for rule in &rules {
        assert!(
            rule["alert"].is_string() && rule["expr"].is_string(),
            "{rule}"
        );
        assert!(rule["labels"]["severity"].is_string(), "{rule}");
    }
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    exprs(&alerts, &mut queries);
    let queried: BTreeSet<String> = queries.iter().flat_map(|e| metric_names(e)).collect();
    assert!(queried.len() >= 20, "{queried:?}");

    // A proxy with every kind of series: routes, a health-checked cluster,
    // a policy, tracing, an access log.
    let echo = echo("app").await;
    let dir = TempDir::new().unwrap();
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
access_log: {{ path: "{log}" }}
decision_log: {{ path: "{decisions}" }}
policies:
  - name: open
    rego: |
      package envoy.authz
      default allow := true
listeners:
  - name: web
    address: "127.0.0.1:0"
    route_config: main
    policy: open
    tracing: {{ collector: "http://127.0.0.1:9", sample_percent: 0 }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: all
            cluster: echo
            fault: {{ abort: {{ http_status: 503, percent: 0 }} }}
            rate_limit: {{ requests_per_second: 1000000 }}
            retry_policy: {{ retry_on: [5xx], num_retries: 1 }}
clusters:
  - name: echo
    health_check: {{ http: {{ path: /healthz }}, interval: 1s }}
    outlier_detection: {{ consecutive_5xx: 5 }}
    endpoints: [{{ address: "{echo}" }}]
"#,
        log = dir.path().join("access.log").display(),
        decisions = dir.path().join("decisions.log").display(),
        echo = echo.local_addr(),
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let response = http1_request(proxy.listener("web"), get(proxy.listener("web"), "/"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, text) = proxy.admin_get("/metrics").await.unwrap();
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split(' ');
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            exported.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    let missing: Vec<&String> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nexported: {exported:?}"
    );
}
