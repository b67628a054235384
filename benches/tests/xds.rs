//! `weft-bench xds` end to end through its library API, tiny: a real
//! `weft-cp serve` process, 1 and then 10 simulated proxies, one mesh change
//! each. The figures are checked for sanity (everyone ACKed, nothing
//! negative), never against timing goals.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_bench::xds::{self, XdsConfig};

/// Bound on the whole run (it takes a few seconds).
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds `weft-cp` in this test's profile (`--profile test` for a debug
/// test build, so that the binary other tests built is reused) and returns
/// its path.
fn cp_binary() -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--quiet", "-p", "weft-cp", "--bin", "weft-cp"]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    } else {
        build.args(["--profile", "test"]);
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building weft-cp failed");
    let path = profile_dir.join("weft-cp");
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_bench_converges_with_one_and_ten_proxies() {
    let binary = tokio::task::spawn_blocking(cp_binary)
        .await
        .expect("the build task finishes");
    let mut config = XdsConfig::new(binary);
    config.proxies = vec![1, 10];
    config.rounds = NonZeroUsize::MIN;
    config.idle_window = Duration::from_millis(100);
    config.converge_timeout = Duration::from_secs(20);
    config.raise_open_files_limit = false;

    let report = tokio::time::timeout(TEST_TIMEOUT, xds::run(&config))
        .await
        .expect("the run finishes in time")
        .expect("the run works");
    println!("{}", xds::render_markdown(&report));

    assert_eq!(report.rows.len(), 2);
    for row in &report.rows {
        let n = row.proxies;
        assert_eq!(row.skipped, None);
        assert!(row.errors.is_empty(), "{n}: {:?}", row.errors);
        assert_eq!(row.initially_acked, n);
        assert_eq!(row.status_proxies, Some(n));
        assert!(row.initial_convergence_ms.is_some_and(|ms| ms >= 0.0));
        assert!(row.rss_empty_bytes.is_some_and(|b| b > 0));
        assert!(row.rss_connected_bytes.is_some_and(|b| b > 0));
        assert!(row.kib_per_proxy.is_some());
        assert_eq!(row.rounds.len(), 1);
        let round = &row.rounds[0];
        assert!(round.converged && round.status_settled, "{n}: {round:?}");
        assert_eq!(round.nodes_updated, n);
        assert!(round.pushes.routes >= n, "{n}: {round:?}");
        let write_to_first = round.write_to_first_push_ms.expect("a push arrived");
        let write_to_last = round.write_to_last_ack_ms.expect("converged");
        let fan_out = round.first_push_to_last_ack_ms.expect("converged");
        assert!(write_to_first >= 0.0 && fan_out >= 0.0);
        assert!(write_to_last >= write_to_first && write_to_last >= fan_out);
        assert!(round.cp_cpu_ms.is_some_and(|ms| ms >= 0.0));
        assert!(round.client_cpu_ms.is_some_and(|ms| ms >= 0.0));
        assert_eq!(row.median_write_to_last_ack_ms, Some(write_to_last));
    }
}
