//! Istio's standard metrics from a proxy configured in YAML: what each
//! request and connection adds, as a scraper reads it from `/metrics`.
//! (Mesh labels and mutual TLS identities: `control_plane.rs`'s demo test.)

// Helpers outside #[test] functions unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use futures_util::stream;
use http_body_util::StreamBody;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_tests::*;

/// An address where nothing listens.
async fn closed_port() -> std::net::SocketAddr {
    unused_address()
}

/// The value of the one sample of `name` whose labels include all of
/// `labels`; panics (showing the text) when none or several match.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    let found: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}:\n{text}");
    found[0].rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn each_request_is_counted_with_its_sizes_status_and_flag() {
    let echo = echo("a").await;
    let dead = closed_port().await;
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: web
    address: "127.0.0.1:0"
    route_config: main
    istio_metrics:
      reporter: source
      workload: {{ name: web-v1, namespace: shop, app: web, version: v1 }}
      cluster_id: east
      destinations:
        echo: {{ name: echo-v2, namespace: shop, app: echo, version: v2, service: echo.shop }}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - {{ name: dead, match: {{ prefix: /dead }}, cluster: dead }}
          - {{ name: all, cluster: echo }}
clusters:
  - {{ name: echo, endpoints: [{{ address: "{echo}" }}] }}
  - {{ name: dead, endpoints: [{{ address: "{dead}" }}] }}
"#,
        echo = echo.local_addr()
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let web = proxy.listener("web");

    // A streamed (chunked) body of 3 x 100 bytes: counted as it is read,
    // without a content-length to go by.
    let chunks = (0..3).map(|_| {
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![b'x'; 100])))
    });
    let body = StreamBody::new(stream::iter(chunks));
    let post = http::Request::builder()
        .method("POST")
        .uri("/upload")
        .header(http::header::HOST, web.to_string())
        .body(body)
        .unwrap();
    let response = http1_request(web, post).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(body_bytes(response).await.unwrap().len(), 300, "echoed");
    let response = http1_request(web, get(web, "/dead")).await.unwrap();
    assert_eq!(response.status(), 503);
    body_bytes(response).await.unwrap();

    let (_, text) = proxy.admin_get("/metrics").await.unwrap();
    let ok = [
        r#"reporter="source""#,
        r#"source_workload="web-v1""#,
        r#"source_canonical_revision="v1""#,
        r#"source_cluster="east""#,
        r#"destination_workload="echo-v2""#,
        r#"destination_service="echo.shop""#,
        r#"destination_service_name="echo""#,
        r#"destination_cluster="east""#,
        r#"request_protocol="http""#,
        r#"response_code="200""#,
        r#"response_flags="-""#,
    ];
    assert_eq!(sample(&text, "istio_requests_total", &ok), 1.0);
    assert_eq!(sample(&text, "istio_request_bytes_sum", &ok), 300.0);
    assert_eq!(sample(&text, "istio_response_bytes_sum", &ok), 300.0);
    assert_eq!(
        sample(
            &text,
            "istio_request_bytes_bucket",
            &[&ok[..], &[r#"le="100""#]].concat()
        ),
        0.0
    );
    assert_eq!(
        sample(
            &text,
            "istio_request_bytes_bucket",
            &[&ok[..], &[r#"le="1000""#]].concat()
        ),
        1.0
    );
    // The refused connect: 503 with Envoy's flag for it, to a cluster the
    // configuration does not describe (named after the cluster).
    let failed = [
        r#"destination_workload="unknown""#,
        r#"destination_service="dead""#,
        r#"destination_cluster="unknown""#,
        r#"response_code="503""#,
        r#"response_flags="UF""#,
    ];
    assert_eq!(sample(&text, "istio_requests_total", &failed), 1.0);
    assert_eq!(
        sample(&text, "istio_request_duration_milliseconds_count", &failed),
        1.0
    );
    // Weft's own series are still there.
    assert!(text.contains("weft_http_requests_total{"), "{text}");
}

#[tokio::test]
async fn a_tcp_connection_is_counted_opened_closed_and_by_its_bytes() {
    let tcp_echo = TcpEchoServer::bind(loopback0()).await.unwrap();
    let config = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: raw
    address: "127.0.0.1:0"
    protocol: tcp
    cluster: db
    istio_metrics: {{ reporter: destination, workload: {{ name: db, service: db.data }} }}
clusters:
  - {{ name: db, endpoints: [{{ address: "{}" }}] }}
"#,
        tcp_echo.local_addr()
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let mut stream = TcpStream::connect(proxy.listener("raw")).await.unwrap();
    stream.write_all(&[7; 1234]).await.unwrap();
    let mut back = vec![0; 1234];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    let labels = [
        r#"reporter="destination""#,
        r#"source_principal="unknown""#,
        r#"destination_workload="db""#,
        r#"destination_service="db.data""#,
        r#"request_protocol="tcp""#,
        r#"connection_security_policy="none""#,
    ];
    // Bytes count as they move (the proxy counts a write once it returns,
    // which may be just after the client has read it); the close when it
    // happens.
    let counted = |text: &str, name: &str| sample(text, name, &labels);
    assert!(
        eventually(DEADLINE, || async {
            let (_, text) = proxy.admin_get("/metrics").await.unwrap();
            counted(&text, "istio_tcp_sent_bytes_total") == 1234.0
        })
        .await
    );
    let (_, open) = proxy.admin_get("/metrics").await.unwrap();
    assert_eq!(counted(&open, "istio_tcp_connections_opened_total"), 1.0);
    assert_eq!(counted(&open, "istio_tcp_connections_closed_total"), 0.0);
    assert_eq!(counted(&open, "istio_tcp_received_bytes_total"), 1234.0);
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let closed = r#"istio_tcp_connections_closed_total"#;
    assert!(
        eventually(DEADLINE, || async {
            let (_, text) = proxy.admin_get("/metrics").await.unwrap();
            sample(&text, closed, &labels) == 1.0
        })
        .await
    );
}

#[tokio::test]
async fn series_past_the_cap_are_folded_and_counted() {
    let echo = echo("a").await;
    let config = one_route_config(echo.local_addr(), "http1", "").replace(
        "route_config: main }",
        "route_config: main, istio_metrics: { reporter: destination, max_series: 2 } }",
    );
    assert!(config.contains("max_series: 2"), "{config}");
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let web = proxy.listener("web");
    // The echo server answers with the status a request asks for: four
    // statuses, four series wanted, two kept.
    for status in [200, 201, 202, 203] {
        let mut req = get(web, "/");
        req.headers_mut()
            .insert("x-echo-status", status.to_string().parse().unwrap());
        let response = http1_request(web, req).await.unwrap();
        assert_eq!(response.status(), status);
        body_bytes(response).await.unwrap();
    }
    let (_, text) = proxy.admin_get("/metrics").await.unwrap();
    let series = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .count();
    assert_eq!(series, 3, "two and the folded one:\n{text}");
    assert_eq!(
        sample(&text, "istio_requests_total", &[r#"response_code="other""#]),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            "weft_metrics_folded_total",
            &[r#"metric="istio_requests_total""#]
        ),
        2.0
    );
}

#[tokio::test]
async fn grpc_calls_count_the_messages_each_way() {
    use futures_util::StreamExt as _;
    use weft_proto::echo::v1::EchoRequest;
    let echo = echo("g").await;
    let config = one_route_config(echo.local_addr(), "downstream", "").replace(
        "route_config: main }",
        "route_config: main, istio_metrics: { reporter: source, \
         workload: { name: web-v1, namespace: shop } } }",
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let mut client = echo_client(proxy.listener("web")).await.unwrap();
    let request = |payload: &str| EchoRequest {
        payload: payload.as_bytes().to_vec().into(),
        count: 4,
        status_code: 0,
    };
    // Three messages up, one down.
    let uploads = stream::iter(["a", "bb", "ccc"].map(request));
    let reply = client.client_stream(uploads).await.unwrap();
    assert_eq!(&reply.get_ref().payload[..], b"abbccc");
    // One up, four down.
    let mut replies = client
        .server_stream(request("s"))
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    while let Some(reply) = replies.next().await {
        reply.unwrap();
        received += 1;
    }
    assert_eq!(received, 4);
    // A call's series is recorded as its response ends: wait for both.
    let grpc = [r#"request_protocol="grpc""#, r#"grpc_response_status="0""#];
    let recorded = async {
        loop {
            let (_, text) = proxy.admin_get("/metrics").await.unwrap();
            if text.contains(grpc[0]) && sample(&text, "istio_requests_total", &grpc) >= 2.0 {
                break text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    let text = tokio::time::timeout(DEADLINE, recorded)
        .await
        .expect("both calls recorded");
    assert_eq!(sample(&text, "istio_requests_total", &grpc), 2.0);
    assert_eq!(sample(&text, "istio_request_messages_total", &grpc), 4.0);
    assert_eq!(sample(&text, "istio_response_messages_total", &grpc), 5.0);
}
