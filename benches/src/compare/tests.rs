//! Unit tests of the runner's pure parts: `/proc` parsing, medians and
//! ratios, the generated proxy configurations (weft's are checked by
//! weft's own validator), the goals, the markdown and the chart.

use std::net::SocketAddr;
use std::path::Path;

use super::driver::Driver;
use super::handshake;
use super::proxies::{self, Limits, ReferencePorts, Upstream};
use super::report::{self, LoadRow, LoadRun, MemoryRow, RowSummary, RunKind};
use super::runner;
use super::system;
use super::*;
use crate::load::{
    ErrorCounts, LatencySummary, LoadReport, LoopKind, ProcessUsage, Protocol, RequestCounts,
};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn upstream() -> Upstream {
    Upstream {
        http: addr(40001),
        tcp: addr(40002),
    }
}

/// A load report with the given throughput, p99 and proxy CPU per request.
fn load_report(throughput: f64, p99_us: u64, cpu_us: Option<f64>) -> LoadReport {
    let latency = LatencySummary {
        count: 100,
        mean_us: p99_us as f64 / 2.0,
        p50_us: p99_us / 4,
        p90_us: p99_us / 2,
        p99_us,
        p999_us: p99_us * 2,
        max_us: p99_us * 3,
    };
    LoadReport {
        target: "http://127.0.0.1:1/".to_owned(),
        address: "127.0.0.1:1".to_owned(),
        protocol: Protocol::Http1,
        mode: LoopKind::ClosedLoop,
        rate_per_second: None,
        connections: 16,
        streams_per_connection: None,
        body_size_bytes: 0,
        duration_seconds: 1.0,
        warmup_seconds: 0.0,
        requests: RequestCounts {
            sent: 100,
            completed: 100,
            ok: 100,
            unfinished: 0,
        },
        throughput_per_second: throughput,
        errors: ErrorCounts {
            status_5xx: 1,
            ..ErrorCounts::default()
        },
        latency,
        service_time: latency,
        schedule: None,
        tcp: None,
        process: cpu_us.map(|cpu| ProcessUsage {
            pids: vec![1],
            cpu_seconds: cpu * 100.0 / 1e6,
            cpu_us_per_request: Some(cpu),
            rss_before_bytes: 5 << 20,
            rss_peak_bytes: 6 << 20,
            rss_after_bytes: 6 << 20,
        }),
        generator_cpu_seconds: None,
        http_connections_opened: None,
        tls_resumed_connections: None,
    }
}

fn row(target: TargetKind, rounds: Vec<LoadReport>) -> LoadRow {
    let mut row = LoadRow {
        target,
        driver: Driver::WeftBench,
        skip_reason: None,
        rounds,
        tool_rounds: Vec::new(),
        failures: Vec::new(),
        median: None,
    };
    row.median = RowSummary::of_row(&row, 1, RunKind::Max);
    row
}

fn run(id: &str, scenario: Scenario, kind: RunKind, mut rows: Vec<LoadRow>) -> LoadRun {
    for row in &mut rows {
        row.median = RowSummary::of_row(row, 1, kind);
    }
    LoadRun {
        id: id.to_owned(),
        scenario,
        kind,
        title: "test".to_owned(),
        rate_per_second: (kind == RunKind::FixedRate).then_some(1000.0),
        rate_basis: None,
        skip_reason: None,
        rows,
    }
}

fn memory_row(target: TargetKind, rss_mib: u64, per_connection: f64) -> MemoryRow {
    MemoryRow {
        target,
        skip_reason: None,
        idle_rss_bytes: vec![rss_mib << 20],
        idle_rss_median_bytes: Some(rss_mib << 20),
        master_rss_bytes: None,
        idle: Some(IdleSummary {
            rounds: Vec::new(),
            per_connection_median_bytes: Some(per_connection),
            marginal_per_connection_median_bytes: Some(per_connection / 2.0),
        }),
        failures: Vec::new(),
    }
}

/// A report where weft spends 20 µs per HTTP/1.1 request against nginx's
/// 30 and HAProxy's 25 (0.8x the best), and 30 µs per h2 request against
/// HAProxy's 40 (0.75x).
fn sample_report() -> CompareReport {
    let http1 = run(
        "http1-max",
        Scenario::Http1,
        RunKind::Max,
        vec![
            row(TargetKind::Direct, vec![load_report(40_000.0, 1_000, None)]),
            row(
                TargetKind::Weft,
                vec![
                    load_report(30_000.0, 2_000, Some(19.0)),
                    load_report(31_000.0, 2_100, Some(20.0)),
                    load_report(29_000.0, 9_000, Some(40.0)),
                ],
            ),
            row(
                TargetKind::Nginx,
                vec![load_report(28_000.0, 3_000, Some(30.0))],
            ),
            row(
                TargetKind::Haproxy,
                vec![load_report(29_500.0, 2_500, Some(25.0))],
            ),
        ],
    );
    let rate = run(
        "http1-rate",
        Scenario::Http1,
        RunKind::FixedRate,
        vec![
            row(TargetKind::Direct, vec![load_report(1000.0, 500, None)]),
            row(TargetKind::Weft, vec![load_report(1000.0, 800, Some(30.0))]),
            row(
                TargetKind::Nginx,
                vec![load_report(1000.0, 1_500, Some(35.0))],
            ),
            row(
                TargetKind::Haproxy,
                vec![load_report(1000.0, 700, Some(33.0))],
            ),
        ],
    );
    let h2 = run(
        "h2-max",
        Scenario::H2,
        RunKind::Max,
        vec![
            row(
                TargetKind::Weft,
                vec![load_report(10_000.0, 3_000, Some(30.0))],
            ),
            row(
                TargetKind::Haproxy,
                vec![load_report(10_000.0, 3_000, Some(40.0))],
            ),
        ],
    );
    let mut nginx_skipped = row(TargetKind::Nginx, Vec::new());
    nginx_skipped.skip_reason = Some("no stream | module".to_owned());
    let tcp = run("tcp-max", Scenario::Tcp, RunKind::Max, vec![nginx_skipped]);
    let mut report = CompareReport {
        started_at: "2026-01-01T00:00:00Z".to_owned(),
        command: Some("weft-bench compare".to_owned()),
        machine: system::machine(),
        versions: [("weft-proxy".to_owned(), "weft-proxy 0.1.0".to_owned())].into(),
        placement: Placement::unpinned("test"),
        settings: Settings {
            scenarios: Scenario::ALL.to_vec(),
            duration_seconds: 1.0,
            warmup_seconds: 0.0,
            rounds: 3,
            connections: 16,
            h2_connections: 4,
            h2_streams: 4,
            idle_connections: 100,
            rate_per_second: Some(1000.0),
            settle_seconds: 1.0,
            idle_pause_seconds: 1.5,
        },
        targets: [
            TargetKind::Direct,
            TargetKind::Weft,
            TargetKind::Nginx,
            TargetKind::Haproxy,
        ]
        .into_iter()
        .map(|target| TargetStatus {
            target,
            skip_reason: None,
            description: target.name().to_owned(),
        })
        .collect(),
        memory: vec![
            memory_row(TargetKind::Weft, 5, 20.0 * 1024.0),
            {
                let mut nginx = memory_row(TargetKind::Nginx, 5, 512.0);
                if let Some(idle) = nginx.idle.as_mut() {
                    idle.rounds.push(IdleRound {
                        opened: 100,
                        rss_before_bytes: (5 << 20) + 40_960,
                        rss_after_bytes: (5 << 20) + 40_960 + 51_200,
                        per_connection_bytes: 512.0,
                        marginal_per_connection_bytes: Some(500.0),
                        error: None,
                    });
                }
                nginx
            },
            memory_row(TargetKind::Haproxy, 15, 1100.0),
        ],
        runs: vec![http1, rate, h2, tcp],
        weft_full_not_built: vec!["retries".to_owned()],
        goals: Vec::new(),
        notes: vec!["a note".to_owned()],
    };
    report.evaluate_goals();
    report
}

#[test]
fn proc_text_is_parsed() {
    let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                  Max cpu time              unlimited            unlimited            seconds\n\
                  Max open files            1024                 524288               files\n";
    assert_eq!(
        system::parse_open_files_limit(limits),
        Some((Some(1024), Some(524_288)))
    );
    let unlimited = "Max open files            unlimited            unlimited            files\n";
    assert_eq!(
        system::parse_open_files_limit(unlimited),
        Some((None, None))
    );
    assert_eq!(system::parse_open_files_limit("nothing"), None);

    let stat = "4242 (nginx: worker (x)) S 4241 4241 4241 0 -1 4194624 0 0 0 0 1 2";
    assert_eq!(system::parse_parent_pid(stat), Some(4241));
    assert_eq!(system::parse_parent_pid("garbage"), None);

    assert_eq!(system::parse_cpu_list("0-1"), Some(vec![0, 1]));
    assert_eq!(system::parse_cpu_list("0,2-3,7"), Some(vec![0, 2, 3, 7]));
    assert_eq!(system::parse_cpu_list("3-1"), None);
    assert_eq!(system::parse_cpu_list("x"), None);

    let status = "Name:\tweft-proxy\nVmRSS:\t    5432 kB\n";
    assert_eq!(system::parse_status_kib(status, "VmRSS:"), Some(5432));
    assert_eq!(system::parse_status_kib("VmRSS: 12 MB", "VmRSS:"), None);
}

#[test]
fn medians_of_odd_even_and_empty_sets() {
    assert_eq!(report::median(&[]), None);
    assert_eq!(report::median(&[3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(report::median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    assert_eq!(report::median_u64(&[10, 30, 20]), Some(20));
}

#[test]
fn row_summary_takes_medians_and_sums_errors() {
    let report = sample_report();
    let weft = report
        .run("http1-max")
        .and_then(|run| run.summary(TargetKind::Weft))
        .copied()
        .expect("weft measured");
    assert_eq!(weft.rounds, 3);
    assert_eq!(weft.completed_total, 300);
    assert_eq!(weft.errors_total, 3);
    assert_eq!(weft.throughput_per_second, 30_000.0);
    assert_eq!(weft.p99_us, Some(2_100.0));
    assert_eq!(weft.cpu_us_per_request, Some(20.0));
    assert_eq!(weft.rss_peak_bytes, Some(6 << 20));
    assert_eq!(
        RowSummary::of_row(&row(TargetKind::Weft, Vec::new()), 1, RunKind::Max),
        None
    );
}

#[test]
fn best_reference_picks_the_better_of_nginx_and_haproxy() {
    let report = sample_report();
    let run = report.run("http1-max").expect("http1-max");
    assert_eq!(
        run.best_reference(|s| s.cpu_us_per_request, true),
        Some((TargetKind::Haproxy, 25.0))
    );
    assert_eq!(
        run.best_reference(|s| Some(s.throughput_per_second), false),
        Some((TargetKind::Haproxy, 29_500.0))
    );
    // Direct and weft never count as references.
    assert_eq!(
        run.best_reference(|s| s.p99_us, true),
        Some((TargetKind::Haproxy, 2_500.0))
    );
}

#[test]
fn goals_are_checked_against_this_runs_figures() {
    let report = sample_report();
    let goals: Vec<(&str, Option<bool>)> = report
        .goals
        .iter()
        .map(|goal| (goal.goal.as_str(), goal.met))
        .collect();
    assert_eq!(goals.len(), 5, "{goals:?}");
    // 20 µs against HAProxy's 25: 0.8x, above 0.7x.
    assert_eq!(report.goals[0].ratio, Some(0.8));
    assert_eq!(report.goals[0].met, Some(false));
    // +0.3 ms against HAProxy's +0.2 ms.
    assert_eq!(report.goals[1].met, Some(false));
    assert_eq!(report.goals[1].value, Some(300.0));
    assert_eq!(report.goals[1].reference, Some(200.0));
    // 30 µs against HAProxy's 40: 0.75x, within 0.8x.
    assert_eq!(report.goals[2].met, Some(true));
    // 5 MiB idle: met; 20 KiB per connection: not.
    assert_eq!(report.goals[3].met, Some(true));
    assert_eq!(report.goals[4].met, Some(false));
}

/// `sample_report` with weft-s2s measured in http1-max and in memory,
/// with figures better than either reference so that any leak into "best"
/// would show.
fn report_with_sidecars() -> CompareReport {
    let mut report = sample_report();
    report.targets.push(TargetStatus {
        target: TargetKind::WeftSidecars,
        skip_reason: None,
        description: "two sidecars".to_owned(),
    });
    let http1 = report
        .runs
        .iter_mut()
        .find(|run| run.id == "http1-max")
        .expect("http1-max");
    http1.rows.push(row(
        TargetKind::WeftSidecars,
        vec![load_report(35_000.0, 1_200, Some(10.0))],
    ));
    report
        .memory
        .push(memory_row(TargetKind::WeftSidecars, 1, 100.0));
    report.evaluate_goals();
    report
}

#[test]
fn sidecar_chain_is_never_the_reference_and_has_no_goals() {
    let report = report_with_sidecars();
    let run = report.run("http1-max").expect("http1-max");
    assert_eq!(
        run.best_reference(|s| s.cpu_us_per_request, true),
        Some((TargetKind::Haproxy, 25.0))
    );
    assert_eq!(
        run.best_reference(|s| Some(s.throughput_per_second), false),
        Some((TargetKind::Haproxy, 29_500.0))
    );
    assert_eq!(report.goals.len(), 5);
    assert!(
        report
            .goals
            .iter()
            .all(|goal| goal.target == TargetKind::Weft)
    );

    let markdown = render_markdown(&report);
    // Its own row, with ratios against the single proxies: 35000 req/s =
    // 0.88x direct, 1.19x HAProxy; 10 µs = 0.40x HAProxy's CPU.
    assert!(
        markdown.contains("| weft-s2s | weft-bench | 35000 | 0.88 | 1.19 | 1 |"),
        "{markdown}"
    );
    assert!(markdown.contains("| 10.0 | 0.40 | 6.0 |"), "{markdown}");
    // The memory table's best is still nginx's 5 MiB and 0.5 KiB.
    assert!(
        markdown.contains("| weft-s2s | 1.00 | 0.20 | 0.10 | 0.20 |"),
        "{markdown}"
    );
    assert!(
        markdown.contains("weft-s2s (and weft-s2s-mtls) is two proxies in series"),
        "{markdown}"
    );
    // Without weft-s2s the note is not there.
    assert!(!render_markdown(&sample_report()).contains("two proxies in series"));
}

#[test]
fn goals_without_references_are_unmeasured() {
    let mut report = sample_report();
    report.runs.retain(|run| run.id != "h2-max");
    report.memory.clear();
    report.evaluate_goals();
    assert_eq!(report.goals[2].met, None);
    assert_eq!(report.goals[3].met, None);
    assert_eq!(report.goals[4].met, None);
}

#[test]
fn markdown_has_ratios_skips_and_goals() {
    let markdown = render_markdown(&sample_report());
    // weft's row of http1-max: 30000 req/s = 0.75x direct, 1.02x the best
    // reference (HAProxy's 29500); 20 µs = 0.80x HAProxy's CPU; its core
    // busy for 100 requests at 31,000 req/s, 20 µs each: 62 %.
    assert!(
        markdown.contains(
            "| weft | weft-bench | 30000 | 0.75 | 1.02 | 3 | 1.050 | 0.525 | 1.050 | 2.100 | \
             4.200 | +1.100 | 20.0 | 0.80 | 6.0 | 62 % | — | neither; **generator-bound** |"
        ),
        "{markdown}"
    );
    assert!(
        markdown.contains("| direct | weft-bench | 40000 | 1.00 |"),
        "{markdown}"
    );
    assert!(
        markdown.contains("- nginx: skipped (no stream / module)"),
        "{markdown}"
    );
    assert!(
        markdown.contains("| weft | 5.00 | 1.00 | 20.00 | 40.00 | 10.00 | 40.00 |"),
        "{markdown}"
    );
    assert!(
        markdown.contains("- nginx: sized for the idle connections, it starts 0.40 KiB"),
        "{markdown}"
    );
    assert!(!markdown.contains("- weft: sized"), "{markdown}");
    assert!(markdown.contains("## Goals"), "{markdown}");
    assert!(
        markdown.contains("not part of its figures: retries"),
        "{markdown}"
    );
    assert!(markdown.contains("- a note"), "{markdown}");
}

#[test]
fn chart_draws_a_curve_per_measured_target() {
    let report = sample_report();
    let svg = latency_svg(report.run("http1-rate").expect("http1-rate"))
        .expect("drawn")
        .expect("something to draw");
    assert!(svg.starts_with("<svg"), "{svg}");
    for name in [
        "direct",
        "weft",
        "nginx",
        "haproxy",
        "p99.9",
        "latency at 1000 req/s",
    ] {
        assert!(svg.contains(name), "{name} missing from the chart");
    }
    let nothing = run("x", Scenario::Tcp, RunKind::Max, Vec::new());
    assert!(latency_svg(&nothing).expect("drawn").is_none());
}

const COLLECTOR: &str = "http://127.0.0.1:4317";

#[test]
fn weft_configs_pass_weft_validation() {
    for kind in [TargetKind::Weft, TargetKind::WeftFull] {
        let yaml = proxies::weft_config(
            kind,
            upstream(),
            Path::new("/tmp/a \"b\"/access.log"),
            None,
            COLLECTOR,
        );
        if let Err(err) = weft_proxy::config::Config::from_yaml(&yaml, kind.name()) {
            panic!("{} config rejected: {err}\n{yaml}", kind.name());
        }
    }
}

#[test]
fn sidecar_configs_chain_and_pass_weft_validation() {
    let hop = &proxies::SidecarHop::Cleartext;
    let server = proxies::server_sidecar_config(upstream(), hop);
    let inbound = Upstream {
        http: addr(42001),
        tcp: addr(42002),
    };
    let client = proxies::client_sidecar_config(inbound, hop);
    for (name, yaml) in [("server", &server), ("client", &client)] {
        if let Err(err) = weft_proxy::config::Config::from_yaml(yaml, name) {
            panic!("{name} sidecar config rejected: {err}\n{yaml}");
        }
        // Configured as plain weft: one HTTP and one TCP listener, one
        // route, `protocol: downstream` on the HTTP cluster only.
        assert_eq!(yaml.matches("\n  - name: ").count(), 5, "{yaml}");
        assert_eq!(yaml.matches("protocol: downstream").count(), 1, "{yaml}");
        assert_eq!(yaml.matches("protocol: tcp").count(), 1, "{yaml}");
        assert!(!yaml.contains("admin:") && !yaml.contains("access_log:"));
    }
    // The server sidecar's inbound listeners lead to the echo...
    for expected in [
        "name: inbound\n",
        "name: inbound-tcp\n",
        "cluster: local-app-tcp",
        "address: 127.0.0.1:40001",
        "address: 127.0.0.1:40002",
    ] {
        assert!(server.contains(expected), "{expected:?} missing:\n{server}");
    }
    // ...and the client sidecar's outbound listeners to those listeners.
    for expected in [
        "name: outbound\n",
        "name: outbound-tcp\n",
        "address: 127.0.0.1:42001",
        "address: 127.0.0.1:42002",
    ] {
        assert!(client.contains(expected), "{expected:?} missing:\n{client}");
    }
    assert!(!client.contains("127.0.0.1:4000"), "{client}");
    // Cleartext: nothing about TLS on either side of the hop.
    assert!(!server.contains("tls") && !client.contains("tls"));
}

#[test]
fn the_mtls_hop_is_mutual_tls_with_spiffe_identities_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let hop = proxies::SidecarHop::mtls(dir.path()).unwrap();
    let server = proxies::server_sidecar_config(upstream(), &hop);
    let inbound = Upstream {
        http: addr(42001),
        tcp: addr(42002),
    };
    let client = proxies::client_sidecar_config(inbound, &hop);
    // The files exist, so validation loads and checks every key and CA.
    let server_config = weft_proxy::config::Config::from_yaml(&server, "server")
        .unwrap_or_else(|e| panic!("{e}\n{server}"));
    let client_config = weft_proxy::config::Config::from_yaml(&client, "client")
        .unwrap_or_else(|e| panic!("{e}\n{client}"));
    // TLS on the HTTP hop only: one listener, one cluster.
    let listener_tls: Vec<_> = server_config
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref())
        .collect();
    assert_eq!(listener_tls.len(), 1);
    assert!(
        listener_tls[0].clients.is_some(),
        "client certificates required"
    );
    let cluster_tls: Vec<_> = client_config
        .clusters
        .iter()
        .filter_map(|c| c.tls.as_ref())
        .collect();
    assert_eq!(cluster_tls.len(), 1);
    assert!(cluster_tls[0].client_cert.is_some());
    assert!(
        server.contains("allowed_identities: [\"spiffe://bench.weft.local/ns/default/sa/client\"]")
    );
    assert!(client.contains("server_identity: \"spiffe://bench.weft.local/ns/default/sa/echo\""));
}

#[test]
fn reference_configs_name_every_port() {
    let ports = ReferencePorts {
        http1: addr(41001),
        h2: addr(41002),
        tcp: addr(41003),
        tls: addr(41004),
        mtls: addr(41005),
    };
    let limits = Limits {
        connections: 10_000,
        open_files: 65_536,
    };
    let nginx = proxies::nginx_config(Path::new("/tmp/n"), upstream(), ports, None, limits, None);
    assert!(nginx.contains("worker_processes 1;"), "{nginx}");
    assert!(nginx.contains("listen 127.0.0.1:41001;"), "{nginx}");
    assert!(nginx.contains("listen 127.0.0.1:41002 http2;"), "{nginx}");
    assert!(nginx.contains("keepalive 64;"), "{nginx}");
    assert!(nginx.contains("worker_connections 21024;"), "{nginx}");
    assert!(nginx.contains("worker_rlimit_nofile 65536;"), "{nginx}");
    assert!(!nginx.contains("stream {"), "no stream module: {nginx}");
    let module = Some(std::path::PathBuf::from("/m/ngx_stream_module.so"));
    let with_stream = proxies::nginx_config(
        Path::new("/tmp/n"),
        upstream(),
        ports,
        Some(&module),
        limits,
        None,
    );
    assert!(with_stream.starts_with("load_module /m/ngx_stream_module.so;"));
    assert!(
        with_stream.contains("proxy_pass 127.0.0.1:40002;"),
        "{with_stream}"
    );

    let haproxy = proxies::haproxy_config(upstream(), ports, limits, None);
    for expected in [
        "maxconn 11024",
        "nbthread 1",
        "bind 127.0.0.1:41001\n",
        "bind 127.0.0.1:41002 proto h2",
        "bind 127.0.0.1:41003",
        "server echo 127.0.0.1:40001 proto h2",
        "server echo 127.0.0.1:40002",
        "http-reuse always",
    ] {
        assert!(
            haproxy.contains(expected),
            "{expected:?} missing:\n{haproxy}"
        );
    }
}

#[test]
fn connection_limits_fit_the_open_files_limit() {
    // (connections, open files) -> (HAProxy maxconn, nginx worker_connections)
    let cases = [
        ((128, 20_000), (1_152, 1_280)),
        ((10_128, 65_536), (11_152, 21_280)),
        // Short of descriptors: HAProxy gets half (client and server side),
        // nginx what is left.
        ((10_128, 20_000), (9_872, 19_936)),
    ];
    for ((connections, open_files), expected) in cases {
        let limits = Limits {
            connections,
            open_files,
        };
        assert_eq!(
            (limits.haproxy_maxconn(), limits.nginx_worker_connections()),
            expected,
            "{limits:?}"
        );
    }
}

#[test]
fn scenario_and_target_names_match_the_cli() {
    use clap::ValueEnum as _;
    for scenario in Scenario::ALL {
        let value = scenario.to_possible_value().expect("listed");
        assert_eq!(value.get_name(), scenario.name());
    }
    for target in TargetKind::ALL {
        let value = target.to_possible_value().expect("listed");
        assert_eq!(value.get_name(), target.name());
    }
    let json = serde_json::to_string(&Scenario::IdleRss).expect("serialises");
    assert_eq!(json, "\"idle-rss\"");
}

#[test]
fn missing_programs_are_not_found() {
    assert_eq!(system::find_program("nginx", Some("".as_ref())), None);
    assert!(system::find_program("sh", Some("/bin:/usr/bin".as_ref())).is_some());
}

/// A wrk or h2load round: `requests` in 1 s of wall time, the proxy using
/// `proxy_cpu` s and the tool (plus the echo) `generator_cpu` s.
fn tool_round(
    driver: Driver,
    requests: u64,
    proxy_cpu: Option<f64>,
    generator_cpu: f64,
) -> ToolRound {
    let latency = match driver {
        Driver::Wrk => ToolLatency {
            mean_us: Some(300.0),
            sd_us: Some(40.0),
            max_us: Some(5_000.0),
            p50_us: Some(250.0),
            p75_us: Some(280.0),
            p90_us: Some(340.0),
            p99_us: Some(2_000.0),
            min_us: None,
        },
        _ => ToolLatency {
            mean_us: Some(255.0),
            sd_us: Some(143.0),
            min_us: Some(22.0),
            max_us: Some(4_560.0),
            ..ToolLatency::default()
        },
    };
    ToolRound {
        driver,
        command: format!("{} ...", driver.name()),
        output: ToolOutput {
            requests,
            completed: requests,
            succeeded: requests - 2,
            duration_seconds: 1.0,
            requests_per_second: requests as f64,
            latency,
            errors: ToolErrors {
                non_2xx_3xx: 2,
                ..ToolErrors::default()
            },
        },
        wall_seconds: 1.0,
        process: proxy_cpu.map(|cpu| ProcessUsage {
            pids: vec![1],
            cpu_seconds: cpu,
            cpu_us_per_request: Some(cpu * 1e6 / requests as f64),
            rss_before_bytes: 5 << 20,
            rss_peak_bytes: 6 << 20,
            rss_after_bytes: 6 << 20,
        }),
        generator_cpu_seconds: Some(generator_cpu * 0.75),
        echo_cpu_seconds: Some(generator_cpu * 0.25),
        load_cpus: 1,
    }
}

fn tool_row(target: TargetKind, driver: Driver, rounds: Vec<ToolRound>) -> LoadRow {
    let mut row = LoadRow {
        target,
        driver,
        skip_reason: None,
        rounds: Vec::new(),
        tool_rounds: rounds,
        failures: Vec::new(),
        median: None,
    };
    row.median = RowSummary::of_row(&row, 1, RunKind::Max);
    row
}

#[test]
fn tool_rounds_give_busy_fractions_and_flag_a_generator_bound_proxy() {
    // weft's core 60 % busy while wrk's was saturated: generator-bound.
    let weft = tool_row(
        TargetKind::Weft,
        Driver::Wrk,
        vec![tool_round(Driver::Wrk, 50_000, Some(0.6), 1.0)],
    );
    let summary = weft.median.expect("a round ran");
    assert_eq!(summary.throughput_per_second, 50_000.0);
    assert_eq!(summary.errors_total, 2);
    assert_eq!(summary.proxy_core_busy, Some(0.6));
    assert_eq!(summary.generator_core_busy, Some(1.0));
    assert_eq!(summary.cpu_us_per_request, Some(12.0));
    assert_eq!(summary.p99_us, Some(2_000.0));
    assert_eq!(summary.p999_us, None);
    assert!(summary.is_generator_bound);
    assert_eq!(summary.saturated(), "generator");

    // nginx's core saturated: not generator-bound.
    let nginx = tool_row(
        TargetKind::Nginx,
        Driver::Wrk,
        vec![
            tool_round(Driver::Wrk, 60_000, Some(0.95), 0.7),
            tool_round(Driver::Wrk, 62_000, Some(0.97), 0.8),
            tool_round(Driver::Wrk, 61_000, Some(0.99), 0.75),
        ],
    );
    let summary = nginx.median.expect("rounds ran");
    assert_eq!(summary.rounds, 3);
    assert_eq!(summary.throughput_per_second, 61_000.0);
    assert_eq!(summary.proxy_core_busy, Some(0.97));
    assert!(!summary.is_generator_bound);
    assert_eq!(summary.saturated(), "proxy");

    // h2load gives no percentiles: only mean and max; direct has no proxy.
    let direct = tool_row(
        TargetKind::Direct,
        Driver::H2load,
        vec![tool_round(Driver::H2load, 57_000, None, 0.92)],
    );
    let summary = direct.median.expect("a round ran");
    assert_eq!((summary.p50_us, summary.mean_us), (None, Some(255.0)));
    assert_eq!(summary.max_us, Some(4_560.0));
    assert_eq!(summary.proxy_core_busy, None);
    assert!(!summary.is_generator_bound);
    assert_eq!(summary.saturated(), "generator");

    // The markdown names each row's driver and flags the bound row.
    let mut report = sample_report();
    report.runs[0] = run(
        "http1-max",
        Scenario::Http1,
        RunKind::Max,
        vec![
            tool_row(
                TargetKind::Direct,
                Driver::Wrk,
                vec![tool_round(Driver::Wrk, 70_000, None, 1.0)],
            ),
            weft,
            nginx,
        ],
    );
    report.runs[2] = run("h2-max", Scenario::H2, RunKind::Max, vec![direct]);
    let markdown = render_markdown(&report);
    assert!(
        markdown.contains(
            "| weft | wrk | 50000 | 0.71 | 0.82 | 2 | 0.300 | 0.250 | 0.340 | 2.000 | — | \
             +0.000 | 12.0 | 0.76 | 6.0 | 60 % | 100 % | generator; **generator-bound** |"
        ),
        "{markdown}"
    );
    assert!(
        markdown.contains("| nginx | wrk | 61000 |")
            && markdown.contains("| 97 % | 75 % | proxy |"),
        "{markdown}"
    );
    assert!(
        markdown.contains("| direct | h2load | 57000 | 1.00 | — | 2 | 0.255 | — | — | — | — |"),
        "{markdown}"
    );
    assert!(
        markdown.contains("- generator-bound (proxy core under 90 % busy in a closed loop): weft"),
        "{markdown}"
    );
    // h2load's row draws no curve; wrk's rows still chart.
    assert!(latency_svg(&report.runs[2]).expect("draws").is_none());
    assert!(latency_svg(&report.runs[0]).expect("draws").is_some());

    // The JSON keeps the driver and the tool's rounds, and old reports
    // without them still load (as the built-in generator's).
    let json = serde_json::to_string(&report).expect("serialises");
    let back: CompareReport = serde_json::from_str(&json).expect("parses back");
    assert_eq!(back.runs[0].rows[1].driver, Driver::Wrk);
    assert_eq!(back.runs[0].rows[1].tool_rounds.len(), 1);
    let mut value: serde_json::Value = serde_json::from_str(&json).expect("json");
    if let Some(row) = value
        .pointer_mut("/runs/0/rows/1")
        .and_then(|r| r.as_object_mut())
    {
        row.remove("driver");
        row.remove("tool_rounds");
    }
    let old: CompareReport = serde_json::from_value(value).expect("an older report loads");
    assert_eq!(old.runs[0].rows[1].driver, Driver::WeftBench);
}

#[test]
fn fixed_rate_keeps_the_best_peer_60_percent_busy() {
    let dir = Path::new("/nonexistent");
    let config = CompareConfig::new(dir.join("weft-proxy"), dir.to_path_buf());
    let mut report = sample_report();
    // HAProxy's 25 µs per request is the best peer's: 0.6 / 25 µs.
    let (rate, basis) = runner::fixed_rate(&config, &report).expect("a rate");
    assert_eq!(rate, 24_000.0);
    assert!(
        basis.contains("best peer") && basis.contains("haproxy 25.0 µs"),
        "{basis}"
    );
    assert!(basis.contains("driven by weft-bench"), "{basis}");

    // Without a peer, the cheapest proxy measured (weft's 20 µs).
    for run in &mut report.runs {
        run.rows.retain(|row| !row.target.is_reference());
    }
    let (rate, basis) = runner::fixed_rate(&config, &report).expect("a rate");
    assert_eq!(rate, 30_000.0);
    assert!(basis.contains("no nginx or HAProxy"), "{basis}");

    // Without any proxy CPU, half of direct's throughput.
    for run in &mut report.runs {
        run.rows.retain(|row| row.target == TargetKind::Direct);
    }
    let (rate, basis) = runner::fixed_rate(&config, &report).expect("a rate");
    assert_eq!(rate, 20_000.0);
    assert!(basis.contains("direct"), "{basis}");

    // --rate wins; no closed-loop run is an error.
    let mut given = config.clone();
    given.rate = Some(123.0);
    assert_eq!(
        runner::fixed_rate(&given, &report).map(|(rate, _)| rate),
        Ok(123.0)
    );
    report.runs.retain(|run| run.id != "http1-max");
    assert!(runner::fixed_rate(&config, &report).is_err());
}

#[test]
fn fixed_rate_is_capped_at_what_the_peer_served() {
    let dir = Path::new("/nonexistent");
    let config = CompareConfig::new(dir.join("weft-proxy"), dir.to_path_buf());
    let mut report = sample_report();
    // HAProxy served 29,500 req/s at 25 µs; at 40 µs, 0.6 / 40 µs = 15,000
    // is below that and stands; at 10 µs, 60,000 is capped.
    let max = &mut report.runs[0];
    max.rows.retain(|row| row.target != TargetKind::Nginx);
    let haproxy = max
        .rows
        .iter_mut()
        .find(|row| row.target == TargetKind::Haproxy)
        .and_then(|row| row.median.as_mut())
        .expect("haproxy ran");
    haproxy.cpu_us_per_request = Some(10.0);
    let (rate, basis) = runner::fixed_rate(&config, &report).expect("a rate");
    assert_eq!(rate, 29_500.0);
    assert!(
        basis.contains("capped at the 29500 req/s haproxy served"),
        "{basis}"
    );
}

#[test]
fn fractional_seconds_under_wrk_are_noted() {
    let dir = Path::new("/nonexistent");
    let mut config = CompareConfig::new(dir.join("weft-proxy"), dir.to_path_buf());
    // 5 s after 1 s: whole seconds already.
    assert_eq!(
        runner::whole_seconds_note("http1-max", Driver::Wrk, &config),
        None
    );
    config.duration = std::time::Duration::from_millis(1500);
    config.warmup = std::time::Duration::from_millis(200);
    assert_eq!(
        runner::whole_seconds_note("http1-max", Driver::Wrk, &config).as_deref(),
        Some("http1-max: wrk counts whole seconds, so its runs last 2 s after a 1 s warm-up run")
    );
    // h2load and the built-in generator take fractions.
    assert_eq!(
        runner::whole_seconds_note("h2-max", Driver::H2load, &config),
        None
    );
    assert_eq!(
        runner::whole_seconds_note("grpc-max", Driver::WeftBench, &config),
        None
    );
}

/// A handshake run: weft spends `weft_cpu` µs of proxy CPU per handshake,
/// nginx 50 and HAProxy 80; weft's rounds resumed `resumed` of 100
/// connections.
fn handshake_run(kind: handshake::HandshakeKind, weft_cpu: f64, resumed: u64) -> LoadRun {
    let with_connections = |mut report: LoadReport, resumed: u64| {
        report.http_connections_opened = Some(100);
        report.tls_resumed_connections = Some(resumed);
        report
    };
    let scenario = if kind.is_mutual() {
        Scenario::Handshake
    } else {
        Scenario::HandshakeResume
    };
    run(
        kind.run_id(),
        scenario,
        RunKind::Max,
        vec![
            row(
                TargetKind::Weft,
                vec![with_connections(
                    load_report(10_000.0, 2_000, Some(weft_cpu)),
                    resumed,
                )],
            ),
            row(
                TargetKind::Nginx,
                vec![with_connections(
                    load_report(9_000.0, 2_000, Some(50.0)),
                    resumed,
                )],
            ),
            row(
                TargetKind::Haproxy,
                vec![with_connections(
                    load_report(8_000.0, 2_000, Some(80.0)),
                    resumed,
                )],
            ),
        ],
    )
}

#[test]
fn handshake_goals_hold_weft_per_core_against_nginx() {
    use handshake::HandshakeKind;
    let mut report = sample_report();
    // No handshake run, no handshake goal.
    assert!(
        report
            .goals
            .iter()
            .all(|goal| !goal.goal.contains("handshakes"))
    );
    report.runs.extend([
        handshake_run(HandshakeKind::Mutual, 40.0, 0),
        handshake_run(HandshakeKind::Full, 62.5, 0),
        handshake_run(HandshakeKind::Resumed, 50.0, 90),
    ]);
    report.evaluate_goals();
    let handshake_goals: Vec<&Goal> = report
        .goals
        .iter()
        .filter(|goal| goal.goal.contains("handshakes per proxy core-second"))
        .collect();
    assert_eq!(handshake_goals.len(), 3, "{handshake_goals:?}");
    // 40 µs: 25000 per core-second against nginx's 20000 = 1.25x, met;
    // 62.5 µs: 16000 = 0.8x, not met; 50 µs: equal, met.
    let figures: Vec<(Option<f64>, Option<f64>, Option<bool>)> = handshake_goals
        .iter()
        .map(|goal| (goal.value, goal.ratio, goal.met))
        .collect();
    assert_eq!(
        figures,
        [
            (Some(25_000.0), Some(1.25), Some(true)),
            (Some(16_000.0), Some(0.8), Some(false)),
            (Some(20_000.0), Some(1.0), Some(true)),
        ]
    );
    assert!(handshake_goals[0].goal.starts_with("handshake-mtls-max: "));
    // The rows' proxies were 40 % to 62 % busy: generator-bound, and the
    // goal says so.
    assert!(
        handshake_goals[0]
            .detail
            .contains("generator-bound: weft, nginx"),
        "{}",
        handshake_goals[0].detail
    );

    let markdown = render_markdown(&report);
    assert!(
        markdown.contains("| target | driver | handshakes/s | handshakes per proxy core-second |"),
        "{markdown}"
    );
    // weft: 25000 per core-second, 1.25x nginx, and nginx (20000) is the
    // best of the two references (HAProxy: 12500).
    assert!(
        markdown.contains("| weft | weft-bench | 10000 | 25000 | 1.25 | 1.25 | 0 % |"),
        "{markdown}"
    );
    assert!(
        markdown.contains("| haproxy | weft-bench | 8000 | 12500 | 0.62 | 0.62 | 90 % |"),
        "{markdown}"
    );
    // Other runs have no handshake table.
    assert_eq!(
        markdown
            .matches("handshakes per proxy core-second |")
            .count(),
        3
    );
}

#[test]
fn handshake_listeners_are_tls_13_with_the_same_certificate_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let certs = handshake::HandshakeCerts::create(dir.path()).unwrap();
    // weft: the files exist, so validation loads every key and CA.
    let yaml = proxies::weft_config(
        TargetKind::Weft,
        upstream(),
        Path::new("/tmp/access.log"),
        Some(&certs),
        COLLECTOR,
    );
    let config = weft_proxy::config::Config::from_yaml(&yaml, "weft")
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let tls = |name: &str| {
        config
            .listeners
            .iter()
            .find(|l| &*l.name == name)
            .and_then(|l| l.tls.as_ref())
            .unwrap_or_else(|| panic!("no TLS listener {name}:\n{yaml}"))
    };
    assert!(tls("tls").clients.is_none(), "server-only");
    assert!(
        tls("mtls").clients.is_some(),
        "client certificates required"
    );
    assert_eq!(yaml.matches("min_version: \"1.3\"").count(), 2, "{yaml}");
    // weft-full never gets them.
    let full = proxies::weft_config(
        TargetKind::WeftFull,
        upstream(),
        Path::new("/tmp/access.log"),
        Some(&certs),
        COLLECTOR,
    );
    assert!(!full.contains("tls:"), "{full}");

    let ports = ReferencePorts {
        http1: addr(41001),
        h2: addr(41002),
        tcp: addr(41003),
        tls: addr(41004),
        mtls: addr(41005),
    };
    let limits = Limits {
        connections: 100,
        open_files: 65_536,
    };
    let cert = certs.server_cert().display().to_string();
    let key = certs.server_key().display().to_string();
    let ca = certs.ca().display().to_string();
    assert!(yaml.contains(&format!("{cert:?}")) && yaml.contains(&format!("{key:?}")));
    let nginx = proxies::nginx_config(
        Path::new("/tmp/n"),
        upstream(),
        ports,
        None,
        limits,
        Some(&certs),
    );
    for expected in [
        "listen 127.0.0.1:41004 ssl;".to_owned(),
        "listen 127.0.0.1:41005 ssl;".to_owned(),
        format!("ssl_certificate {cert};"),
        format!("ssl_certificate_key {key};"),
        format!("ssl_client_certificate {ca};"),
        "ssl_verify_client on;".to_owned(),
        "ssl_session_tickets off;".to_owned(),
        "ssl_conf_command NumTickets 0;".to_owned(),
    ] {
        assert!(nginx.contains(&expected), "{expected:?} missing:\n{nginx}");
    }
    assert_eq!(nginx.matches("ssl_protocols TLSv1.3;").count(), 2);
    // The TLS servers are inside `http { }`, which closes once, last.
    assert!(nginx.trim_end().ends_with("}\n}"), "{nginx}");
    let haproxy = proxies::haproxy_config(upstream(), ports, limits, Some(&certs));
    let combined = certs.haproxy_pem().display().to_string();
    for expected in [
        format!("bind 127.0.0.1:41004 ssl crt {combined} ssl-min-ver TLSv1.3 alpn http/1.1\n"),
        format!(
            "bind 127.0.0.1:41005 ssl crt {combined} ssl-min-ver TLSv1.3 alpn http/1.1 ca-file \
             {ca} verify required no-tls-tickets\n"
        ),
    ] {
        assert!(
            haproxy.contains(&expected),
            "{expected:?} missing:\n{haproxy}"
        );
    }
    // HAProxy's file is the server chain, then its key.
    let pem = std::fs::read_to_string(certs.haproxy_pem()).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    assert!(pem.contains("PRIVATE KEY-----"));
    // Without certificates, no TLS anywhere.
    let plain = proxies::weft_config(
        TargetKind::Weft,
        upstream(),
        Path::new("/a"),
        None,
        COLLECTOR,
    );
    assert!(!plain.contains("tls"), "{plain}");
    let nginx = proxies::nginx_config(Path::new("/n"), upstream(), ports, None, limits, None);
    assert!(!nginx.contains("ssl"), "{nginx}");
    let haproxy = proxies::haproxy_config(upstream(), ports, limits, None);
    assert!(!haproxy.contains("ssl"), "{haproxy}");
}

#[test]
fn handshake_clients_present_a_certificate_only_for_mutual_tls() {
    use handshake::HandshakeKind;
    let dir = tempfile::tempdir().unwrap();
    let certs = handshake::HandshakeCerts::create(dir.path()).unwrap();
    let material = handshake::ClientMaterial::load(&certs).unwrap();
    for kind in HandshakeKind::ALL {
        let client = material.client(kind).unwrap();
        assert_eq!(
            client.config.client_auth_cert_resolver.has_certs(),
            kind.is_mutual(),
            "{kind:?}"
        );
        assert_eq!(client.config.alpn_protocols, [b"http/1.1".to_vec()]);
        assert_eq!(
            client.server_name.to_str(),
            handshake::SERVER_NAME,
            "{kind:?}"
        );
    }
    // Each client has its own session cache: a second one is a new
    // configuration.
    let first = material.client(HandshakeKind::Resumed).unwrap();
    let second = material.client(HandshakeKind::Resumed).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&first.config, &second.config));
    assert_eq!(
        handshake::kinds(Scenario::HandshakeResume),
        [HandshakeKind::Full, HandshakeKind::Resumed]
    );
    assert_eq!(
        handshake::kinds(Scenario::Handshake),
        [HandshakeKind::Mutual]
    );
    assert!(handshake::kinds(Scenario::Newconn).is_empty());
}
