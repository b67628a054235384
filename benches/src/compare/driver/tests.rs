//! The wrk and h2load parsers against output captured from wrk 4.1.0 and
//! h2load (nghttp2 1.52.0) run against `weft-bench echo` on loopback.

use std::time::Duration;

use super::*;

/// `wrk -t1 -c16 -d2s --latency` against `weft-bench echo` on loopback.
const WRK: &str = r#"Running 2s test @ http://127.0.0.1:18999/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   291.45us  407.94us   5.97ms   97.69%
    Req/Sec    53.54k     7.08k   64.70k    75.00%
  Latency Distribution
     50%  236.00us
     75%  289.00us
     90%  340.00us
     99%    2.59ms
  106484 requests in 2.00s, 20.21MB read
Requests/sec:  53132.26
Transfer/sec:     10.08MB
"#;

/// The same with `-H 'x-echo-status: 503'`: every response a 503.
const WRK_503: &str = r#"Running 1s test @ http://127.0.0.1:18999/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   749.78us    1.33ms   8.40ms   84.99%
    Req/Sec    31.67k     8.65k   49.61k    80.00%
  Latency Distribution
     50%   67.00us
     75%    0.86ms
     90%    2.82ms
     99%    5.60ms
  31764 requests in 1.01s, 6.54MB read
  Non-2xx or 3xx responses: 31764
Requests/sec:  31395.67
Transfer/sec:      6.47MB
"#;

/// The same with the echo killed half way through.
const WRK_SOCKET_ERRORS: &str = r#"Running 2s test @ http://127.0.0.1:18999/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   566.45us    1.29ms  11.16ms   88.34%
    Req/Sec    26.41k     9.79k   41.49k    81.82%
  Latency Distribution
     50%   61.00us
     75%  101.00us
     90%    2.18ms
     99%    6.31ms
  28867 requests in 2.00s, 5.48MB read
  Socket errors: connect 0, read 4, write 38953, timeout 0
Requests/sec:  14408.11
Transfer/sec:      2.73MB
"#;

/// `h2load -c4 -m4 -t1 -D2s --warm-up-time=1s` against `weft-bench echo`.
const H2LOAD: &str = r#"starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 1s of warm-up time and 2s of main duration for measurements.
Warm-up started for thread #0.
progress: 25% of clients started
progress: 50% of clients started
progress: 75% of clients started
progress: 100% of clients started
Application protocol: h2c
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 3.00s, 57159.00 req/s, 893.20KB/s
requests: 114318 total, 114318 started, 114318 done, 114318 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 114318 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.74MB (1829272) total, 1.10MB (1157964) headers (space savings 95.24%), 0B (0) data
                     min         max         mean         sd        +/- sd
time for request:       22us      4.56ms       255us       143us    77.89%
time for connect:        0us         0us         0us         0us     0.00%
time to 1st byte:        0us         0us         0us         0us     0.00%
req/s           :   14239.24    14323.99    14289.30       40.13    75.00%
"#;

/// `h2load -c2 -m2 -t1 -D1s -H 'x-echo-status: 404'`: every response a 404.
const H2LOAD_404: &str = r#"starting benchmark...
spawning thread #0: 2 total client(s). Timing-based test with 0s of warm-up time and 1s of main duration for measurements.
Warm-up started for thread #0.
progress: 50% of clients started
progress: 100% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 1.01s, 26204.00 req/s, 409.81KB/s
requests: 26204 total, 26208 started, 26204 done, 0 succeeded, 26204 failed, 0 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 26204 4xx, 0 5xx
traffic: 409.81KB (419644) total, 179.39KB (183698) headers (space savings 95.23%), 0B (0) data
                     min         max         mean         sd        +/- sd
time for request:       23us      7.62ms       142us       454us    98.25%
time for connect:      101us       139us       120us        26us   100.00%
time to 1st byte:      596us       613us       604us        12us   100.00%
req/s           :   13022.75    13086.05    13054.40       44.76   100.00%
"#;

/// `h2load -c2 -m2 -t1 -D1s` against a closed port (h2load exits 0).
const H2LOAD_REFUSED: &str = r#"starting benchmark...
spawning thread #0: 2 total client(s). Timing-based test with 0s of warm-up time and 1s of main duration for measurements.
Warm-up started for thread #0.
progress: 50% of clients started
progress: 100% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 1.00s, 0.00 req/s, 0B/s
requests: 0 total, 0 started, 0 done, 0 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 0B (0) total, 0B (0) headers (space savings 0.00%), 0B (0) data
                     min         max         mean         sd        +/- sd
time for request:        0us         0us         0us         0us     0.00%
time for connect:        0us         0us         0us         0us     0.00%
time to 1st byte:        0us         0us         0us         0us     0.00%
req/s           :       0.00        0.00        0.00        0.00   100.00%
"#;
#[test]
fn wrk_output_is_parsed() {
    let out = parse_wrk(WRK).expect("wrk's output parses");
    assert_eq!(out.requests, 106_484);
    assert_eq!(out.completed, 106_484);
    assert_eq!(out.succeeded, 106_484);
    assert!((out.duration_seconds - 2.0).abs() < 1e-9);
    assert!((out.requests_per_second - 53_132.26).abs() < 1e-6);
    let latency = out.latency;
    assert_eq!(latency.mean_us, Some(291.45));
    assert_eq!(latency.sd_us, Some(407.94));
    assert_eq!(latency.max_us, Some(5970.0));
    assert_eq!(latency.p50_us, Some(236.0));
    assert_eq!(latency.p75_us, Some(289.0));
    assert_eq!(latency.p90_us, Some(340.0));
    assert_eq!(latency.p99_us, Some(2590.0));
    assert_eq!(latency.min_us, None);
    assert_eq!(out.errors, ToolErrors::default());
    assert_eq!(out.errors.total(), 0);
}

#[test]
fn wrk_errors_are_counted() {
    let out = parse_wrk(WRK_503).expect("parses");
    assert_eq!(out.errors.non_2xx_3xx, 31_764);
    assert_eq!(out.succeeded, 0);
    assert_eq!(out.errors.total(), 31_764);
    assert_eq!(out.latency.p75_us, Some(860.0));

    let out = parse_wrk(WRK_SOCKET_ERRORS).expect("parses");
    assert_eq!(
        (
            out.errors.connect,
            out.errors.read,
            out.errors.write,
            out.errors.timeout
        ),
        (0, 4, 38_953, 0)
    );
    assert_eq!(out.requests, 28_867);
    assert_eq!(out.errors.total(), 38_957);
}

#[test]
fn h2load_output_is_parsed() {
    let out = parse_h2load(H2LOAD).expect("h2load's output parses");
    assert_eq!(out.requests, 114_318);
    assert_eq!(out.completed, 114_318);
    assert_eq!(out.succeeded, 114_318);
    // `finished in` includes h2load's own warm-up; req/s does not.
    assert!((out.duration_seconds - 3.0).abs() < 1e-9);
    assert!((out.requests_per_second - 57_159.0).abs() < 1e-6);
    let latency = out.latency;
    assert_eq!(latency.min_us, Some(22.0));
    assert_eq!(latency.max_us, Some(4560.0));
    assert_eq!(latency.mean_us, Some(255.0));
    assert_eq!(latency.sd_us, Some(143.0));
    assert_eq!(latency.p50_us, None);
    assert_eq!(out.errors.status_4xx, Some(0));
    assert_eq!(out.errors.total(), 0);
}

#[test]
fn h2load_failures_are_counted() {
    let out = parse_h2load(H2LOAD_404).expect("parses");
    assert_eq!(out.succeeded, 0);
    assert_eq!(out.errors.failed, 26_204);
    assert_eq!(out.errors.status_4xx, Some(26_204));
    assert_eq!(out.errors.status_5xx, Some(0));
    assert_eq!(out.errors.total(), 26_204);

    let out = parse_h2load(H2LOAD_REFUSED).expect("parses");
    assert_eq!((out.requests, out.completed), (0, 0));
    assert_eq!(out.requests_per_second, 0.0);
    assert_eq!(out.latency, ToolLatency::default());
    // h2load exits 0 when it cannot connect: a round of nothing fails.
    let err = completed_some(Driver::H2load, out).expect_err("nothing completed");
    assert!(
        err.to_string().contains("h2load completed no request"),
        "{err}"
    );
    let out = parse_h2load(H2LOAD).expect("parses");
    assert!(completed_some(Driver::H2load, out).is_ok());
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let inputs = [
        "",
        "unable to connect to 127.0.0.1:18998 Connection refused",
        "Running 2s test @ http://127.0.0.1:1/\n  12 requests in",
        "  12 requests in 2.00s, 1MB read\nRequests/sec: lots",
        "  12 requests in 2.00parsecs, 1MB read\nRequests/sec: 6.0",
        "  Latency 1us\n  12 requests in 2.00s\nRequests/sec: 6.0",
        "  Latency Distribution\n     50%  fast\n",
        "  Socket errors: connect x, read 0\n",
        "finished in 1.00s, many req/s\nrequests: 1 total",
        "finished in 1.00s, 1.00 req/s\n",
        "finished in 1.00s, 1.00 req/s\nrequests: 1 total, 1 started",
        "finished in 1.00s, 1.00 req/s\nrequests: 1 total, 1 started, 1 done, 1 succeeded, \
         0 failed, 0 errored, 0 timeout\ntime for request: 1us",
        "finished in é, 1.00 req/s",
        "\u{0}\u{ff}))) requests in Requests/sec: %%",
    ];
    for input in inputs {
        assert!(parse_wrk(input).is_err(), "wrk accepted {input:?}");
        assert!(parse_h2load(input).is_err(), "h2load accepted {input:?}");
    }
    // Truncated captures fail too.
    for cut in [WRK.len() / 2, 10] {
        assert!(parse_wrk(&WRK[..cut]).is_err());
    }
    let cut = H2LOAD
        .find("requests:")
        .expect("the sample has a requests line");
    assert!(parse_h2load(&H2LOAD[..cut]).is_err());
}

#[test]
fn durations_take_the_tools_units() {
    for (text, us) in [
        ("236.00us", 236.0),
        ("2.59ms", 2590.0),
        ("2.00s", 2e6),
        ("1.50m", 90e6),
        ("1.00h", 3600e6),
        ("0us", 0.0),
    ] {
        assert_eq!(parse::duration_us(text).expect(text), us, "{text}");
    }
    for text in ["", "12", "ms", "1.2.3ms", "-1s", "3parsecs", "NaNs"] {
        assert!(parse::duration_us(text).is_err(), "{text}");
    }
}

#[test]
fn tool_arguments_match_the_built_in_runs() {
    let url = "http://127.0.0.1:9/";
    assert_eq!(
        tool_args(Driver::Wrk, url, 16, 1, 1, Duration::from_millis(2500)),
        ["-t1", "-c16", "-d3s", "--latency", url]
    );
    assert_eq!(
        tool_args(Driver::H2load, url, 4, 4, 3, Duration::from_secs(2)),
        ["-t3", "-c4", "-m4", "-D2000ms", url]
    );
    // Never more threads than connections.
    assert_eq!(
        tool_args(Driver::H2load, url, 1, 4, 8, Duration::from_millis(200))[0],
        "-t1"
    );
    assert_eq!(wrk_seconds(Duration::from_millis(200)), 1);
    assert_eq!(wrk_seconds(Duration::from_secs(5)), 5);
}

#[test]
fn process_state_is_read_after_the_name() {
    assert_eq!(
        process_state("123 (wrk) Z 1 123 123 0 -1 4194560 0 0 0 0 5 7 0 0"),
        Some('Z')
    );
    assert_eq!(process_state("9 (a) b) (c) R 1"), Some('R'));
    assert_eq!(process_state("no name"), None);
}

#[test]
fn missing_tools_are_reasons() {
    let drivers = ExternalDrivers::discover(&Tools::none());
    let reason = drivers.wrk.expect_err("no wrk on an empty path");
    assert!(reason.contains("wrk is not installed"), "{reason}");
    assert!(drivers.h2load.is_err());
}
