//! Pure parts of the xDS benchmark: the generated mesh, `/status`
//! parsing, medians and the open-files check. The end-to-end run against a
//! real control plane is in `benches/tests/xds.rs`.

use std::collections::HashSet;

use super::cp::{StatusSummary, parse_status};
use super::limits::skip_reason;
use super::mesh::{self, SHARED_SERVICE};
use super::report::median;

#[test]
fn workload_addresses_are_distinct_loopback_addresses() {
    let ips: HashSet<_> = (0..20_000).map(mesh::workload_ip).collect();
    assert_eq!(ips.len(), 20_000);
    assert!(ips.iter().all(|ip| ip.is_loopback() && ip.octets()[3] != 0));
}

#[test]
fn workload_zero_is_the_shared_service_and_the_rest_spread_over_apps() {
    let one = mesh::workloads(1);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].service, SHARED_SERVICE);
    let many = mesh::workloads(10);
    let services: HashSet<_> = many.iter().map(|w| w.service.as_str()).collect();
    assert_eq!(services.len(), 1 + mesh::APP_SERVICES);
    let three = mesh::workloads(3);
    assert_eq!(three[1].service, "app-0");
    assert_eq!(three[2].service, "app-1");
}

#[tokio::test]
async fn generated_mesh_lists_every_workload_once_and_edits_only_the_timeout() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    mesh::write(dir.path(), 10, 5)
        .await
        .expect("the mesh is written");
    let mut text = String::new();
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .expect("readable")
        .map(|entry| entry.expect("an entry").file_name())
        .collect();
    files.sort();
    for file in &files {
        text.push_str(&std::fs::read_to_string(dir.path().join(file)).expect("readable"));
    }
    for index in 0..10 {
        assert_eq!(
            text.matches(&format!("name: w{index},")).count(),
            1,
            "w{index}"
        );
    }
    assert_eq!(text.matches("calls: [shared]").count(), 5);
    let before = std::fs::read_to_string(dir.path().join("shared.yaml")).expect("readable");
    assert!(before.contains("timeout: 5s"));
    mesh::set_shared_timeout(dir.path(), 6)
        .await
        .expect("rewritten");
    let after = std::fs::read_to_string(dir.path().join("shared.yaml")).expect("readable");
    assert_eq!(after, before.replace("timeout: 5s", "timeout: 6s"));
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("readable").count(),
        files.len(),
        "no temporary file is left behind"
    );
}

#[test]
fn status_counts_proxies_with_everything_acked() {
    let body = br#"{"mesh_generation": 3, "config_error": null, "proxies": [
      {"node_id": "w0", "service": null, "protocol": "sotw", "peer": null, "connected_since_unix": 1, "types": {
        "type.googleapis.com/weft.config.v1.Cluster": {"acked_version": "a", "sent_version": "a"},
        "type.googleapis.com/weft.config.v1.RouteConfiguration": {"acked_version": "b", "sent_version": "b"},
        "type.googleapis.com/weft.config.v1.Listener": {"acked_version": "c", "sent_version": "c"}}},
      {"node_id": "w1", "service": null, "protocol": "sotw", "peer": null, "connected_since_unix": 1, "types": {
        "type.googleapis.com/weft.config.v1.Cluster": {"acked_version": "a", "sent_version": "a"},
        "type.googleapis.com/weft.config.v1.RouteConfiguration": {"acked_version": "b", "sent_version": "b2"},
        "type.googleapis.com/weft.config.v1.Listener": {"acked_version": "c", "sent_version": "c"}}}
    ]}"#;
    assert_eq!(
        parse_status(body).expect("parses"),
        StatusSummary {
            mesh_generation: 3,
            config_error: None,
            proxies: 2,
            settled: 1,
        }
    );
    assert!(parse_status(b"{}").is_err());
}

#[test]
fn median_of_present_values() {
    let cases: [(&[Option<f64>], Option<f64>); 5] = [
        (&[], None),
        (&[None], None),
        (&[Some(3.0), None, Some(1.0), Some(2.0)], Some(2.0)),
        (&[Some(4.0), Some(1.0), Some(2.0), Some(3.0)], Some(2.5)),
        (&[Some(7.0)], Some(7.0)),
    ];
    for (values, expected) in cases {
        assert_eq!(median(values.iter().copied()), expected, "{values:?}");
    }
}

#[test]
fn proxy_counts_that_do_not_fit_the_open_files_limit_are_skipped() {
    assert_eq!(skip_reason(5000, None), None);
    assert_eq!(skip_reason(5000, Some(20_000)), None);
    let reason = skip_reason(5000, Some(1024)).expect("does not fit");
    assert!(reason.contains("1024"), "{reason}");
}
