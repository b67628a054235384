//! The load generator against in-process servers on loopback: the echo
//! servers, and a small hyper server with scripted behaviour. Each server is
//! bound before the load starts, so no test waits for readiness; every test
//! is bounded by `within`. Timing assertions are loose on purpose (a loaded
//! two-core machine runs these).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::http::{HeaderMap, HeaderValue, Request, Response, Uri};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use super::process::{parse_auxv_clock_ticks, parse_cpu_ticks, parse_rss_bytes, sample_all};
use super::target::{Target, check_loopback};
use super::*;
use crate::echo::{
    EchoOptions, EchoServer, TcpEchoServer, X_ECHO_DELAY_MS, X_ECHO_RESET, X_ECHO_STATUS,
};

const TEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn within<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out")
}

async fn echo() -> EchoServer {
    EchoServer::bind(EchoOptions::default()).await.unwrap()
}

fn http_uri(addr: SocketAddr) -> Uri {
    format!("http://{addr}/").parse().unwrap()
}

fn open_loop(target: Uri, protocol: Protocol, rate: f64, duration: Duration) -> LoadConfig {
    let mut config = LoadConfig::new(
        target,
        protocol,
        LoadMode::OpenLoop {
            rate_per_second: rate,
        },
    );
    config.duration = duration;
    config
}

fn connections(count: usize) -> NonZeroUsize {
    NonZeroUsize::new(count).unwrap()
}

fn header(name: &'static str, value: &'static str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(name, HeaderValue::from_static(value));
    headers
}

/// Every measured request is accounted for exactly once.
fn assert_accounted(report: &LoadReport) {
    let requests = report.requests;
    let errors = report.errors;
    assert_eq!(
        requests.sent,
        requests.completed
            + requests.unfinished
            + errors.connect
            + errors.timeout
            + errors.reset_or_protocol,
        "{report:#?}"
    );
    assert_eq!(
        requests.completed,
        requests.ok + errors.status_4xx + errors.status_5xx + errors.grpc_status,
        "{report:#?}"
    );
    assert_eq!(report.latency.count, requests.completed);
}

/// What the scripted server does.
#[derive(Clone, Copy, Debug)]
enum Script {
    /// Answers at once, except the `nth` request (counting from 1), which
    /// waits `stall` first.
    StallNth { nth: u64, stall: Duration },
    /// Answers every request after `delay`.
    Delay(Duration),
    /// Answers every request as a trailers-only gRPC failure (`grpc-status:
    /// 5`).
    GrpcNotFound,
}

async fn scripted(
    script: Script,
    count: Arc<AtomicU64>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let nth = count.fetch_add(1, Ordering::Relaxed) + 1;
    match script {
        Script::StallNth {
            nth: stalled,
            stall,
        } if nth == stalled => {
            tokio::time::sleep(stall).await;
        }
        Script::StallNth { .. } => {}
        Script::Delay(delay) => tokio::time::sleep(delay).await,
        Script::GrpcNotFound => {
            let mut response = Response::new(Full::new(Bytes::new()));
            let headers = response.headers_mut();
            headers.insert("content-type", HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from_static("5"));
            return Ok(response);
        }
    }
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// Starts the scripted server on loopback (HTTP/1.1 and h2c); it lives as
/// long as the test's runtime.
async fn scripted_server(script: Script) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let service =
                    service_fn(move |_: Request<Incoming>| scripted(script, Arc::clone(&count)));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_measures_server_delay_at_the_scheduled_rate() {
    within(async {
        let server = echo().await;
        let mut config = open_loop(
            http_uri(server.local_addr()),
            Protocol::Http1,
            200.0,
            Duration::from_secs(1),
        );
        config.connections = connections(4);
        config.headers = header(X_ECHO_DELAY_MS, "10");
        let report = run(&config).await.unwrap();

        assert_accounted(&report);
        assert_eq!(report.errors.total(), 0, "{report:#?}");
        // The schedule holds exactly 200 slots in 1 s at 200/s.
        assert_eq!(report.requests.sent, 200, "{report:#?}");
        assert!(report.requests.completed >= 195, "{report:#?}");
        let p50 = report.latency.p50_us;
        assert!((9_000..=20_000).contains(&p50), "p50 {p50} us: {report:#?}");
        assert!(report.schedule.is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_and_grpc_open_loops_complete_without_errors() {
    within(async {
        let server = echo().await;
        for protocol in [Protocol::Http2, Protocol::Grpc] {
            let mut config = open_loop(
                http_uri(server.local_addr()),
                protocol,
                200.0,
                Duration::from_millis(500),
            );
            config.connections = connections(2);
            config.body_size_bytes = 100;
            let report = run(&config).await.unwrap();

            assert_accounted(&report);
            assert_eq!(report.errors.total(), 0, "{protocol:?}: {report:#?}");
            assert_eq!(report.requests.sent, 100, "{protocol:?}: {report:#?}");
            assert_eq!(report.requests.ok, 100, "{protocol:?}: {report:#?}");
            assert_eq!(report.streams_per_connection, Some(100));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_is_charged_to_every_request_scheduled_during_it() {
    within(async {
        // One connection at 100/s: request 20 stalls for 500 ms, so about
        // 50 requests are due while the connection is stuck.
        let addr = scripted_server(Script::StallNth {
            nth: 20,
            stall: Duration::from_millis(500),
        })
        .await;
        let config = open_loop(
            http_uri(addr),
            Protocol::Http1,
            100.0,
            Duration::from_millis(1500),
        );
        let report = run(&config).await.unwrap();

        assert_accounted(&report);
        assert_eq!(report.errors.total(), 0, "{report:#?}");
        assert_eq!(report.requests.sent, 150, "{report:#?}");
        // Corrected: the requests that waited behind the stall are slow.
        assert!(report.latency.p90_us >= 200_000, "{report:#?}");
        assert!(report.latency.p99_us >= 300_000, "{report:#?}");
        // Uncorrected, only the stalled request itself was slow.
        assert!(report.service_time.p90_us < 100_000, "{report:#?}");
        assert!(report.service_time.max_us >= 400_000, "{report:#?}");
        let schedule = report.schedule.unwrap();
        assert!(schedule.is_behind(), "{report:#?}");
        assert!(schedule.max_lag_us >= 400_000, "{report:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_sends_back_to_back() {
    within(async {
        let server = echo().await;
        for (protocol, streams) in [(Protocol::Http1, 1), (Protocol::Http2, 8)] {
            let mut config = LoadConfig::new(
                http_uri(server.local_addr()),
                protocol,
                LoadMode::ClosedLoop,
            );
            config.connections = connections(4);
            config.duration = Duration::from_secs(1);
            config.streams_per_connection = connections(streams);
            let report = run(&config).await.unwrap();

            assert_accounted(&report);
            assert_eq!(report.errors.total(), 0, "{protocol:?}: {report:#?}");
            assert!(
                report.requests.completed > 1000,
                "{protocol:?}: {report:#?}"
            );
            assert!(report.schedule.is_none());
            assert!(report.rate_per_second.is_none());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_classified_by_kind() {
    within(async {
        let server = echo().await;
        let target = http_uri(server.local_addr());
        let duration = Duration::from_millis(500);

        let mut config = open_loop(target.clone(), Protocol::Http1, 100.0, duration);
        config.headers = header(X_ECHO_STATUS, "503");
        let report = run(&config).await.unwrap();
        assert_accounted(&report);
        assert_eq!(report.requests.sent, 50);
        assert_eq!(report.errors.status_5xx, 50, "{report:#?}");
        assert_eq!(report.requests.completed, 50, "{report:#?}");
        assert_eq!(report.requests.ok, 0);

        config.headers = header(X_ECHO_STATUS, "404");
        let report = run(&config).await.unwrap();
        assert_eq!(report.errors.status_4xx, 50, "{report:#?}");

        config.headers = header(X_ECHO_RESET, "1");
        let report = run(&config).await.unwrap();
        assert_accounted(&report);
        assert_eq!(report.errors.reset_or_protocol, 50, "{report:#?}");
        assert_eq!(report.requests.completed, 0);

        let grpc = scripted_server(Script::GrpcNotFound).await;
        let config = open_loop(http_uri(grpc), Protocol::Grpc, 100.0, duration);
        let report = run(&config).await.unwrap();
        assert_accounted(&report);
        assert_eq!(report.errors.grpc_status, 50, "{report:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_count_as_connect_errors() {
    within(async {
        // Bind, then close: nothing listens on the port any more.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        for mode in [
            LoadMode::OpenLoop {
                rate_per_second: 100.0,
            },
            LoadMode::ClosedLoop,
        ] {
            let mut config = LoadConfig::new(http_uri(addr), Protocol::Http1, mode);
            config.duration = Duration::from_millis(300);
            config.connections = connections(2);
            let report = run(&config).await.unwrap();
            assert_accounted(&report);
            assert!(report.requests.sent > 0, "{report:#?}");
            assert_eq!(report.errors.connect, report.requests.sent, "{report:#?}");
            assert_eq!(report.requests.completed, 0);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_responses_time_out_and_the_run_still_ends() {
    within(async {
        let addr = scripted_server(Script::Delay(Duration::from_secs(5))).await;

        let mut config = open_loop(
            http_uri(addr),
            Protocol::Http1,
            20.0,
            Duration::from_millis(500),
        );
        config.timeout = Duration::from_millis(100);
        let report = run(&config).await.unwrap();
        assert_accounted(&report);
        assert!(report.errors.timeout >= 5, "{report:#?}");
        assert_eq!(report.requests.completed, 0);

        // Requests still in flight when the grace period runs out are
        // unfinished, not timeouts.
        let mut config = open_loop(
            http_uri(addr),
            Protocol::Http2,
            20.0,
            Duration::from_millis(200),
        );
        config.timeout = Duration::from_secs(10);
        let started = std::time::Instant::now();
        let report = run(&config).await.unwrap();
        assert!(started.elapsed() < GRACE + Duration::from_secs(2));
        assert_accounted(&report);
        assert_eq!(report.requests.unfinished, 4, "{report:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmup_requests_are_not_recorded() {
    within(async {
        let server = echo().await;
        let mut config = open_loop(
            http_uri(server.local_addr()),
            Protocol::Http1,
            100.0,
            Duration::from_millis(500),
        );
        config.warmup = Duration::from_millis(300);
        let report = run(&config).await.unwrap();
        assert_eq!(report.requests.sent, 50, "{report:#?}");
        assert_eq!(report.requests.ok, 50, "{report:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_moves_bytes_both_ways() {
    within(async {
        let server = TcpEchoServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let target: Uri = format!("tcp://{}", server.local_addr()).parse().unwrap();

        let mut config = LoadConfig::new(target.clone(), Protocol::Tcp, LoadMode::ClosedLoop);
        config.duration = Duration::from_millis(500);
        config.connections = connections(2);
        let report = run(&config).await.unwrap();
        assert_accounted(&report);
        assert_eq!(report.errors.total(), 0, "{report:#?}");
        let tcp = report.tcp.unwrap();
        assert!(tcp.bytes_sent > 0, "{report:#?}");
        assert_eq!(tcp.bytes_received, tcp.bytes_sent);
        assert_eq!(
            tcp.bytes_sent,
            report.requests.completed * DEFAULT_TCP_BUFFER_BYTES as u64
        );
        assert!(tcp.sent_mb_per_second > 0.0 && tcp.received_mb_per_second > 0.0);
        assert_eq!(
            tcp.connections_opened, 0,
            "connections opened before the run"
        );

        let mut config = open_loop(target, Protocol::Tcp, 100.0, Duration::from_millis(500));
        config.new_connection_per_request = true;
        config.body_size_bytes = 1000;
        let report = run(&config).await.unwrap();
        assert_accounted(&report);
        assert_eq!(report.errors.total(), 0, "{report:#?}");
        let tcp = report.tcp.unwrap();
        assert_eq!(tcp.connections_opened, 50, "{report:#?}");
        assert!(tcp.connections_per_second > 0.0);
        assert_eq!(tcp.bytes_received, 50 * 1000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_new_connection_mode_opens_one_connection_per_request() {
    within(async {
        let server = echo().await;
        let mut config = open_loop(
            http_uri(server.local_addr()),
            Protocol::Http1,
            100.0,
            Duration::from_millis(500),
        );
        config.new_connection_per_request = true;
        let report = run(&config).await.unwrap();
        assert_accounted(&report);
        assert_eq!(report.errors.total(), 0, "{report:#?}");
        assert_eq!(report.requests.ok, 50, "{report:#?}");
        assert_eq!(report.http_connections_opened, Some(50));
        assert!(report.to_string().contains("50 opened, one per request"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_accounting_reads_the_process() {
    within(async {
        let server = echo().await;
        let mut config = open_loop(
            http_uri(server.local_addr()),
            Protocol::Http1,
            100.0,
            Duration::from_millis(300),
        );
        // The test process itself is the "proxy": it serves the echo.
        config.pids = vec![std::process::id()];
        let report = run(&config).await.unwrap();
        let process = report.process.clone().unwrap();
        assert_eq!(process.pids, [std::process::id()]);
        assert!(process.cpu_seconds >= 0.0);
        assert!(process.cpu_us_per_request.is_some());
        assert!(process.rss_before_bytes > 0);
        assert!(process.rss_peak_bytes >= process.rss_before_bytes);
        assert!(process.rss_peak_bytes >= process.rss_after_bytes);
        assert!(report.generator_cpu_seconds.is_some());

        config.pids = vec![std::process::id(), u32::MAX];
        let err = run(&config).await.unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("--pid {}", u32::MAX)),
            "{err:#}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_set_accounting_sums_the_processes() {
    within(async {
        // A second process whose memory does not move: `sleep`.
        let Some(sleep) = ["/bin/sleep", "/usr/bin/sleep"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists())
        else {
            println!("skipped: no sleep program");
            return;
        };
        let mut child = tokio::process::Command::new(sleep)
            .arg("60")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let child_pid = child.id().unwrap();
        let child_status = tokio::fs::read_to_string(format!("/proc/{child_pid}/status"))
            .await
            .unwrap();
        let child_rss = parse_rss_bytes(&child_status).unwrap();

        let server = echo().await;
        let mut config = open_loop(
            http_uri(server.local_addr()),
            Protocol::Http1,
            100.0,
            Duration::from_millis(300),
        );
        config.pids = vec![std::process::id(), child_pid];
        let report = run(&config).await.unwrap();
        let process = report.process.clone().unwrap();
        assert_eq!(process.pids, [std::process::id(), child_pid]);
        assert!(process.cpu_us_per_request.is_some());
        // This process alone is larger than `sleep`; the sum is larger
        // than both.
        assert!(process.rss_before_bytes > 2 * child_rss, "{process:?}");
        assert!(process.rss_peak_bytes >= process.rss_after_bytes);
        assert!(
            report
                .to_string()
                .contains(&format!("pids {} + {child_pid}:", std::process::id())),
            "{report}"
        );
        child.kill().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn proc_samples_of_several_processes_are_summed() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, utime, stime, rss_kib) in [("a", 250, 75, 1000), ("b", 40, 2, 24)] {
        let path = dir.path().join(name);
        std::fs::create_dir(&path).unwrap();
        std::fs::write(
            path.join("stat"),
            format!("7 (weft proxy) S 1 7 7 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0 5\n"),
        )
        .unwrap();
        std::fs::write(
            path.join("status"),
            format!("Name:\tweft-proxy\nVmRSS:\t  {rss_kib} kB\n"),
        )
        .unwrap();
        paths.push(path.to_string_lossy().into_owned());
    }
    assert_eq!(
        sample_all(&paths).await.unwrap(),
        (250 + 75 + 40 + 2, (1000 + 24) * 1024)
    );
    assert_eq!(sample_all(&paths[1..]).await.unwrap(), (42, 24 * 1024));
    assert_eq!(sample_all(&[]).await.unwrap(), (0, 0));
    // One unreadable process fails the whole sample rather than
    // under-counting.
    paths.push(dir.path().join("gone").to_string_lossy().into_owned());
    assert!(sample_all(&paths).await.is_err());
}

#[tokio::test]
async fn non_loopback_targets_are_refused_before_any_traffic() {
    within(async {
        // Literal addresses are checked without a lookup, and `run` checks
        // before it opens anything.
        for target in [
            "http://10.0.0.1:80/",
            "http://192.168.1.10/",
            "http://[2001:db8::1]:80/",
        ] {
            let uri: Uri = target.parse().unwrap();
            let err = Target::resolve(&uri, Protocol::Http1).await.unwrap_err();
            assert!(
                matches!(err, TargetError::NotLoopback { .. }),
                "{target}: {err}"
            );
            assert!(err.to_string().contains("loopback"), "{err}");

            let config = open_loop(uri, Protocol::Http1, 10.0, Duration::from_millis(100));
            let err = run(&config).await.unwrap_err();
            assert!(
                matches!(
                    err.downcast_ref::<TargetError>(),
                    Some(TargetError::NotLoopback { .. })
                ),
                "{err:#}"
            );
        }

        let uri: Uri = "tcp://10.0.0.1:9000".parse().unwrap();
        let err = Target::resolve(&uri, Protocol::Tcp).await.unwrap_err();
        assert!(matches!(err, TargetError::NotLoopback { .. }), "{err}");

        for target in [
            "http://127.0.0.1:8080/x?y=1",
            "http://127.8.9.10/",
            "http://[::1]:80/",
        ] {
            let uri: Uri = target.parse().unwrap();
            let resolved = Target::resolve(&uri, Protocol::Http1).await.unwrap();
            assert!(resolved.addr.ip().is_loopback(), "{target}");
        }
        let uri: Uri = "http://127.0.0.1:8080/x?y=1".parse().unwrap();
        let resolved = Target::resolve(&uri, Protocol::Http1).await.unwrap();
        assert_eq!(resolved.path.as_str(), "/x?y=1");
        assert_eq!(resolved.authority.as_str(), "127.0.0.1:8080");
    })
    .await;
}

#[tokio::test]
async fn targets_must_match_the_protocol() {
    within(async {
        let cases = [
            ("tcp://127.0.0.1:9000", Protocol::Http1),
            ("https://127.0.0.1/", Protocol::Http2),
            ("http://127.0.0.1:9000/", Protocol::Tcp),
        ];
        for (target, protocol) in cases {
            let uri: Uri = target.parse().unwrap();
            let err = Target::resolve(&uri, protocol).await.unwrap_err();
            assert!(matches!(err, TargetError::Scheme { .. }), "{target}: {err}");
        }
        let uri: Uri = "tcp://127.0.0.1".parse().unwrap();
        let err = Target::resolve(&uri, Protocol::Tcp).await.unwrap_err();
        assert!(matches!(err, TargetError::NoPort { .. }), "{err}");
    })
    .await;
}

#[test]
fn loopback_check_table() {
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    // (resolved addresses, the address kept or the offending address)
    type Case<'a> = (&'a [&'a str], Result<&'a str, Option<&'a str>>);
    let cases: [Case<'_>; 6] = [
        (&["127.0.0.1:80"], Ok("127.0.0.1:80")),
        (&["127.255.0.3:80", "[::1]:80"], Ok("127.255.0.3:80")),
        (&["[::ffff:127.0.0.1]:80"], Ok("[::ffff:127.0.0.1]:80")),
        (&["10.0.0.1:80"], Err(Some("10.0.0.1"))),
        (
            &["127.0.0.1:80", "192.168.0.1:80"],
            Err(Some("192.168.0.1")),
        ),
        (&[], Err(None)),
    ];
    for (addrs, expected) in cases {
        let addrs: Vec<SocketAddr> = addrs.iter().map(|s| addr(s)).collect();
        let expected = expected
            .map(addr)
            .map_err(|bad| bad.map(|ip| ip.parse().unwrap()));
        assert_eq!(check_loopback(&addrs), expected, "{addrs:?}");
    }
}

#[test]
fn proc_files_are_parsed() {
    // Field 2 may contain spaces and parentheses.
    let stat = "1234 (weft (proxy) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 \
                4 0 12345 1000000 500 18446744073709551615";
    assert_eq!(parse_cpu_ticks(stat), Some(325));
    assert_eq!(parse_cpu_ticks("garbage"), None);

    let status = "Name:\tweft-proxy\nVmPeak:\t  20000 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
    assert_eq!(parse_rss_bytes(status), Some(12345 * 1024));
    assert_eq!(parse_rss_bytes("Name:\tx\n"), None);

    let word = size_of::<usize>();
    let mut auxv = Vec::new();
    for (key, value) in [(6usize, 4096usize), (17, 250), (0, 0)] {
        auxv.extend_from_slice(&key.to_ne_bytes());
        auxv.extend_from_slice(&value.to_ne_bytes());
    }
    assert_eq!(auxv.len(), 6 * word);
    assert_eq!(parse_auxv_clock_ticks(&auxv), Some(250));
    assert_eq!(parse_auxv_clock_ticks(&auxv[..2 * word]), None);
}

#[derive(Debug, Parser)]
struct TestCli {
    #[command(flatten)]
    load: LoadArgs,
}

fn parse_cli(args: &[&str]) -> Result<LoadArgs, clap::Error> {
    TestCli::try_parse_from(std::iter::once("load").chain(args.iter().copied())).map(|cli| cli.load)
}

#[test]
fn cli_flags_become_a_config() {
    let args = parse_cli(&[
        "--target",
        "http://127.0.0.1:8080/p",
        "--rate",
        "2500",
        "--duration",
        "5s",
        "--warmup",
        "500ms",
        "--connections",
        "16",
        "--http2",
        "--body-size",
        "64",
        "--header",
        "x-a: 1",
        "--header",
        "x-a:2",
        "--pid",
        "42",
        "--pid",
        "43",
    ])
    .unwrap();
    let config = args.to_config();
    assert_eq!(config.protocol, Protocol::Http2);
    assert_eq!(
        config.mode,
        LoadMode::OpenLoop {
            rate_per_second: 2500.0
        }
    );
    assert_eq!(config.duration, Duration::from_secs(5));
    assert_eq!(config.warmup, Duration::from_millis(500));
    assert_eq!(config.connections.get(), 16);
    assert_eq!(config.body_size_bytes, 64);
    assert_eq!(config.pids, [42, 43]);
    let values: Vec<_> = config.headers.get_all("x-a").iter().collect();
    assert_eq!(values, ["1", "2"]);

    let config = parse_cli(&["--target", "tcp://127.0.0.1:9", "--tcp", "--max"])
        .unwrap()
        .to_config();
    assert_eq!(config.protocol, Protocol::Tcp);
    assert_eq!(config.mode, LoadMode::ClosedLoop);
    assert_eq!(config.body_size_bytes, DEFAULT_TCP_BUFFER_BYTES);

    let config = parse_cli(&["--target", "http://127.0.0.1/", "--max", "--grpc"])
        .unwrap()
        .to_config();
    assert_eq!(config.protocol, Protocol::Grpc);

    for bad in [
        &["--target", "http://127.0.0.1/"][..],
        &["--target", "http://127.0.0.1/", "--rate", "10", "--max"],
        &["--target", "http://127.0.0.1/", "--rate", "0"],
        &["--target", "http://127.0.0.1/", "--rate", "-5"],
        &[
            "--target",
            "http://127.0.0.1/",
            "--max",
            "--header",
            "no-colon",
        ],
        &[
            "--target",
            "http://127.0.0.1/",
            "--max",
            "--http2",
            "--new-connection",
        ],
        &["--target", "tcp://127.0.0.1:9", "--max", "--tcp", "--http2"],
        &[
            "--target",
            "http://127.0.0.1/",
            "--max",
            "--duration",
            "soon",
        ],
    ] {
        assert!(parse_cli(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn invalid_configs_are_rejected() {
    let target: Uri = "http://127.0.0.1/".parse().unwrap();
    let mut config = open_loop(
        target.clone(),
        Protocol::Http1,
        f64::NAN,
        Duration::from_secs(1),
    );
    assert!(config.validate().is_err());
    config.mode = LoadMode::ClosedLoop;
    assert!(config.validate().is_ok());
    config.duration = Duration::ZERO;
    assert!(config.validate().is_err());

    let mut config = LoadConfig::new(target.clone(), Protocol::Http2, LoadMode::ClosedLoop);
    config.new_connection_per_request = true;
    assert!(config.validate().is_err());
    config.protocol = Protocol::Http1;
    assert!(config.validate().is_ok());
    // TLS is for HTTP/1.1 only.
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.tls = Some(super::TlsClient {
        config: std::sync::Arc::new(client),
        server_name: rustls_pki_types::ServerName::try_from("localhost").unwrap(),
    });
    assert!(config.validate().is_ok());
    config.protocol = Protocol::Http2;
    config.new_connection_per_request = false;
    assert!(config.validate().is_err());

    let mut config = LoadConfig::new(target, Protocol::Tcp, LoadMode::ClosedLoop);
    config.body_size_bytes = 0;
    assert!(config.validate().is_err());
}

#[test]
fn report_serialises_to_one_json_object_and_back() {
    let report = LoadReport {
        target: "http://127.0.0.1:1/".to_owned(),
        address: "127.0.0.1:1".to_owned(),
        protocol: Protocol::Http2,
        mode: LoopKind::OpenLoop,
        rate_per_second: Some(10.0),
        connections: 2,
        streams_per_connection: Some(100),
        body_size_bytes: 0,
        duration_seconds: 1.0,
        warmup_seconds: 0.0,
        requests: RequestCounts {
            sent: 10,
            completed: 9,
            ok: 8,
            unfinished: 1,
        },
        throughput_per_second: 9.0,
        errors: ErrorCounts {
            status_5xx: 1,
            ..ErrorCounts::default()
        },
        latency: LatencySummary::default(),
        service_time: LatencySummary::default(),
        schedule: Some(ScheduleSummary::default()),
        tcp: None,
        process: None,
        generator_cpu_seconds: None,
        http_connections_opened: None,
        tls_resumed_connections: None,
    };
    let json = serde_json::to_string(&report).unwrap();
    assert!(!json.contains('\n'));
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["protocol"], "http2");
    assert_eq!(value["mode"], "open_loop");
    assert_eq!(value["errors"]["status_5xx"], 1);
    let back: LoadReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back.requests, report.requests);

    let text = report.to_string();
    assert!(text.contains("5xx 1"), "{text}");
    assert!(text.contains("on schedule"), "{text}");
}

#[test]
fn process_usage_reads_a_pid_set_and_the_older_single_pid() {
    let usage = ProcessUsage {
        pids: vec![7, 8],
        cpu_seconds: 0.5,
        ..ProcessUsage::default()
    };
    let json = serde_json::to_value(&usage).unwrap();
    assert_eq!(json["pids"], serde_json::json!([7, 8]));
    let back: ProcessUsage = serde_json::from_value(json).unwrap();
    assert_eq!(back, usage);

    let older = r#"{"pid":7,"cpu_seconds":0.5,"cpu_us_per_request":null,
        "rss_before_bytes":0,"rss_peak_bytes":0,"rss_after_bytes":0}"#;
    let back: ProcessUsage = serde_json::from_str(older).unwrap();
    assert_eq!(back.pids, [7]);
}
