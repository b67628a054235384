//! The scenario runner end to end through its library API: the echo, real
//! `weft-proxy` processes (one for `weft`, two chained for `weft-s2s`) and
//! the load generator on loopback, with tiny durations. nginx and HAProxy are hidden from the runner (an empty search
//! path, installing disabled), so they are skipped with a reason whether
//! or not this machine has them. No assertion is about timing.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use weft_bench::compare::{self, CompareConfig, Driver, Scenario, TargetKind, Tools};

/// Bound on the whole run (it takes a few seconds).
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The `weft-proxy` binary of this build profile, built on first use so
/// that the test never runs a stale one.
fn proxy_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        // Test executables live in target/<profile>/deps/.
        let exe = std::env::current_exe().expect("the test knows its own path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executables live in target/<profile>/deps");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build.args([
            "build",
            "--quiet",
            "-p",
            "weft-proxy",
            "--bin",
            "weft-proxy",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building weft-proxy failed");
        let path = profile_dir.join("weft-proxy");
        assert!(path.exists(), "{} missing after build", path.display());
        path
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_reports_direct_weft_and_sidecars_and_skips_missing_proxies() {
    let weft = tokio::task::spawn_blocking(|| proxy_binary().to_path_buf())
        .await
        .expect("the build task finishes");
    let work = tempfile::tempdir().expect("a scratch directory");
    let mut config = CompareConfig::new(weft, work.path().join("work"));
    config.scenarios = vec![
        Scenario::Http1,
        Scenario::Tcp,
        Scenario::IdleRss,
        Scenario::Idle,
    ];
    config.targets = vec![
        TargetKind::Direct,
        TargetKind::Weft,
        TargetKind::WeftSidecars,
        TargetKind::WeftSidecarsMtls,
        TargetKind::Nginx,
        TargetKind::Haproxy,
    ];
    config.duration = Duration::from_millis(300);
    config.warmup = Duration::from_millis(50);
    config.rounds = std::num::NonZeroUsize::MIN;
    config.connections = std::num::NonZeroUsize::new(4).expect("not zero");
    config.idle_connections = 20;
    config.settle = Duration::from_millis(100);
    config.idle_pause = Duration::from_millis(100);
    config.tools = Tools::none();

    let report = tokio::time::timeout(TEST_TIMEOUT, compare::run(&config))
        .await
        .expect("the comparison finishes in time")
        .expect("the comparison runs");

    for status in &report.targets {
        println!(
            "{}: {}",
            status.target.name(),
            status.skip_reason.as_deref().unwrap_or("measured")
        );
    }
    for skipped in [TargetKind::Nginx, TargetKind::Haproxy] {
        let status = report
            .targets
            .iter()
            .find(|status| status.target == skipped)
            .expect("every requested target has a status");
        let reason = status.skip_reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("not found"),
            "{} should be skipped with a reason, got {reason:?}",
            skipped.name()
        );
    }

    let ids: Vec<&str> = report.runs.iter().map(|run| run.id.as_str()).collect();
    assert_eq!(ids, ["http1-max", "http1-rate", "tcp-max"]);
    for run in &report.runs {
        assert_eq!(run.skip_reason, None, "{} skipped", run.id);
        for target in [
            TargetKind::Direct,
            TargetKind::Weft,
            TargetKind::WeftSidecars,
            TargetKind::WeftSidecarsMtls,
        ] {
            let row = run
                .rows
                .iter()
                .find(|row| row.target == target)
                .unwrap_or_else(|| panic!("{}: no row for {}", run.id, target.name()));
            assert!(row.failures.is_empty(), "{}: {:?}", run.id, row.failures);
            let summary = row
                .median
                .unwrap_or_else(|| panic!("{}: {} not measured", run.id, target.name()));
            assert!(
                summary.completed_total > 0,
                "{}: {} completed nothing",
                run.id,
                target.name()
            );
            assert_eq!(summary.errors_total, 0, "{}: {}", run.id, target.name());
            // Proxy CPU is accounted for the proxies, never for direct;
            // for weft-s2s, over both sidecars.
            assert_eq!(
                summary.cpu_us_per_request.is_some(),
                target != TargetKind::Direct,
                "{}: {}",
                run.id,
                target.name()
            );
            let pids = row.rounds[0]
                .process
                .as_ref()
                .map_or(0, |process| process.pids.len());
            let expected_pids = match target {
                TargetKind::Direct => 0,
                TargetKind::WeftSidecars | TargetKind::WeftSidecarsMtls => 2,
                _ => 1,
            };
            assert_eq!(pids, expected_pids, "{}: {}", run.id, target.name());
        }
        for skipped in [TargetKind::Nginx, TargetKind::Haproxy] {
            let row = run
                .rows
                .iter()
                .find(|row| row.target == skipped)
                .expect("skipped targets keep a row");
            assert!(row.skip_reason.is_some() && row.median.is_none());
        }
    }
    // The mTLS pair is held against the cleartext pair.
    let mtls_goal = report
        .goals
        .iter()
        .find(|goal| goal.target == TargetKind::WeftSidecarsMtls)
        .expect("a goal for the mTLS pair");
    assert!(
        mtls_goal.goal.contains("1.25x weft-s2s"),
        "{}",
        mtls_goal.goal
    );
    assert!(mtls_goal.ratio.is_some(), "{}", mtls_goal.detail);
    let rate = report.run("http1-rate").and_then(|run| run.rate_per_second);
    assert!(rate.is_some_and(|rate| rate >= 1.0), "{rate:?}");
    // With an empty search path wrk is not found: the built-in generator
    // drives every run, and the notes say why.
    assert!(
        report
            .runs
            .iter()
            .flat_map(|run| &run.rows)
            .all(|row| row.driver == Driver::WeftBench && row.tool_rounds.is_empty())
    );
    assert!(
        report
            .notes
            .iter()
            .any(|note| note.starts_with("http1-max: wrk is not installed")),
        "{:?}",
        report.notes
    );

    for target in [TargetKind::Weft, TargetKind::WeftSidecars] {
        let memory = report.memory_of(target).expect("a memory row");
        assert!(memory.failures.is_empty(), "{:?}", memory.failures);
        assert!(memory.idle_rss_median_bytes.is_some_and(|rss| rss > 0));
        let idle = memory.idle.as_ref().expect("the idle scenario ran");
        assert_eq!(idle.rounds.len(), 1);
        assert_eq!(idle.rounds[0].opened, 20, "{:?}", idle.rounds[0].error);
    }
    assert!(
        report
            .memory_of(TargetKind::Direct)
            .is_some_and(|row| row.skip_reason.is_some())
    );

    let markdown = compare::render_markdown(&report);
    assert!(markdown.contains("| weft |"), "{markdown}");
    assert!(markdown.contains("| weft-s2s |"), "{markdown}");
    assert!(markdown.contains("nginx not found"), "{markdown}");
    let svg = compare::latency_svg(&report.runs[1]).expect("the chart draws");
    assert!(svg.is_some_and(|svg| svg.contains("weft-s2s")));
}

/// wrk and h2load, when this machine has them on PATH, drive the
/// closed-loop HTTP/1.1 and h2c runs against direct and weft; the
/// fixed-rate run stays with the built-in generator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_drives_closed_loops_with_wrk_and_h2load_when_installed() {
    let on_path = |program: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
    };
    if !on_path("wrk") || !on_path("h2load") {
        println!("wrk or h2load is not installed: nothing to check");
        return;
    }
    let weft = tokio::task::spawn_blocking(|| proxy_binary().to_path_buf())
        .await
        .expect("the build task finishes");
    let work = tempfile::tempdir().expect("a scratch directory");
    let mut config = CompareConfig::new(weft, work.path().join("work"));
    config.scenarios = vec![Scenario::Http1, Scenario::H2];
    config.targets = vec![TargetKind::Direct, TargetKind::Weft];
    // wrk counts whole seconds.
    config.duration = Duration::from_secs(1);
    config.warmup = Duration::ZERO;
    config.rounds = std::num::NonZeroUsize::MIN;
    config.connections = std::num::NonZeroUsize::new(4).expect("not zero");
    config.tools = Tools {
        search_path: None,
        allow_install: false,
    };

    let report = tokio::time::timeout(TEST_TIMEOUT, compare::run(&config))
        .await
        .expect("the comparison finishes in time")
        .expect("the comparison runs");

    for (id, driver) in [
        ("http1-max", Driver::Wrk),
        ("http1-rate", Driver::WeftBench),
        ("h2-max", Driver::H2load),
    ] {
        let run = report.run(id).unwrap_or_else(|| panic!("no {id} run"));
        for row in &run.rows {
            let name = row.target.name();
            assert!(row.failures.is_empty(), "{id}: {name}: {:?}", row.failures);
            assert_eq!(row.driver, driver, "{id}: {name}");
            let summary = row
                .median
                .unwrap_or_else(|| panic!("{id}: {name} not measured"));
            assert!(summary.completed_total > 0, "{id}: {name}");
            assert_eq!(summary.errors_total, 0, "{id}: {name}");
            assert_eq!(
                summary.proxy_core_busy.is_some(),
                row.target == TargetKind::Weft,
                "{id}: {name}"
            );
            if driver != Driver::WeftBench {
                let round = &row.tool_rounds[0];
                assert!(round.generator_cpu_seconds.is_some(), "{id}: {name}");
                assert!(summary.generator_core_busy.is_some(), "{id}: {name}");
                assert_eq!(
                    round.process.as_ref().map(|p| p.pids.len()),
                    (row.target == TargetKind::Weft).then_some(1),
                    "{id}: {name}"
                );
            }
        }
    }
    let rate = report.run("http1-rate").expect("the fixed-rate run");
    assert!(
        rate.rate_basis
            .as_deref()
            .is_some_and(|basis| basis.contains("weft")),
        "{:?}",
        rate.rate_basis
    );
    let markdown = compare::render_markdown(&report);
    assert!(markdown.contains("| weft | wrk |"), "{markdown}");
    assert!(markdown.contains("| weft | h2load |"), "{markdown}");
}

/// The handshake scenarios against weft alone: a new TLS connection per
/// request, with a client certificate on the mutual-TLS listener, and
/// sessions resumed only in the resumption run. Direct has no TLS
/// listener and is skipped with the reason; without nginx the goals are
/// unmeasured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_measures_tls_handshakes_on_weft() {
    let weft = tokio::task::spawn_blocking(|| proxy_binary().to_path_buf())
        .await
        .expect("the build task finishes");
    let work = tempfile::tempdir().expect("a scratch directory");
    let mut config = CompareConfig::new(weft, work.path().join("work"));
    config.scenarios = vec![Scenario::Handshake, Scenario::HandshakeResume];
    config.targets = vec![TargetKind::Direct, TargetKind::Weft, TargetKind::Nginx];
    config.duration = Duration::from_millis(300);
    config.warmup = Duration::from_millis(100);
    config.rounds = std::num::NonZeroUsize::MIN;
    config.connections = std::num::NonZeroUsize::new(2).expect("not zero");
    config.tools = Tools::none();

    let report = tokio::time::timeout(TEST_TIMEOUT, compare::run(&config))
        .await
        .expect("the comparison finishes in time")
        .expect("the comparison runs");

    let ids: Vec<&str> = report.runs.iter().map(|run| run.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "handshake-mtls-max",
            "handshake-tls-max",
            "handshake-resume-max"
        ]
    );
    for run in &report.runs {
        let id = &run.id;
        assert_eq!(run.skip_reason, None, "{id} skipped");
        let weft = run
            .rows
            .iter()
            .find(|row| row.target == TargetKind::Weft)
            .expect("a weft row");
        assert!(weft.failures.is_empty(), "{id}: {:?}", weft.failures);
        let summary = weft.median.unwrap_or_else(|| panic!("{id}: not measured"));
        assert!(summary.completed_total > 0, "{id}");
        assert_eq!(summary.errors_total, 0, "{id}");
        assert!(
            summary.handshakes_per_core_second().is_some(),
            "{id}: no proxy CPU"
        );
        // Every measured request opened its own connection.
        let round = &weft.rounds[0];
        assert_eq!(
            round.http_connections_opened,
            Some(round.requests.completed),
            "{id}"
        );
        let resumed = weft.tls_resumed_fraction().expect("TLS connections");
        if id == "handshake-resume-max" {
            assert!(resumed > 0.0, "{id}: nothing resumed");
        } else {
            assert_eq!(resumed, 0.0, "{id}: resumed {resumed}");
        }
        let direct = run
            .rows
            .iter()
            .find(|row| row.target == TargetKind::Direct)
            .expect("direct keeps a row");
        assert!(
            direct
                .skip_reason
                .as_deref()
                .is_some_and(|reason| reason.contains("cleartext only")),
            "{id}: {:?}",
            direct.skip_reason
        );
    }
    let handshake_goals: Vec<_> = report
        .goals
        .iter()
        .filter(|goal| goal.goal.contains("handshakes"))
        .collect();
    assert_eq!(handshake_goals.len(), 3);
    assert!(handshake_goals.iter().all(|goal| goal.met.is_none()));
    let markdown = compare::render_markdown(&report);
    assert!(
        markdown.contains("handshakes per proxy core-second"),
        "{markdown}"
    );
}
