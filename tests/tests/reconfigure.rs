//! Applying configurations to a running proxy (what the xDS client does on
//! every accepted update), in-process: routing changes reach open
//! connections, a removed listener drains, and a configuration that cannot
//! be applied changes nothing.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use weft_proxy::config::Config;
use weft_proxy::{ApplyError, Proxy, Readiness};
use weft_tests::*;

fn config(listeners: &[(&str, &str)], echo: SocketAddr) -> Config {
    let listeners: String = listeners
        .iter()
        .map(|(name, address)| {
            format!("  - {{ name: {name}, address: \"{address}\", route_config: main }}\n")
        })
        .collect();
    let yaml = format!(
        r#"
listeners:
{listeners}
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes: [{{ name: all, cluster: echo }}]
clusters:
  - {{ name: echo, endpoints: [{{ address: "{echo}" }}] }}
"#
    );
    Config::from_yaml(&yaml, "test").unwrap()
}

async fn served_by(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    addr: SocketAddr,
) -> String {
    tokio::time::timeout(DEADLINE, sender.ready())
        .await
        .unwrap()
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, sender.send_request(get(addr, "/")))
        .await
        .unwrap()
        .unwrap();
    let server = header(&response, "x-echo-server").to_owned();
    // Read to the end so that the connection can carry the next request.
    body_bytes(response).await.unwrap();
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_changes_reach_open_connections_and_removed_listeners_drain() {
    let one = echo("one").await;
    let two = echo("two").await;
    let proxy = Proxy::start(
        config(&[("web", "127.0.0.1:0")], one.local_addr()),
        tokio::runtime::Handle::current(),
        Readiness::Immediate,
    )
    .await
    .unwrap();
    let handle = proxy.handle();
    let web = proxy.addresses().listeners[0].1;
    let mut connection = http1_connect(web).await.unwrap();
    assert_eq!(served_by(&mut connection, web).await, "one");

    // Same listener, new cluster endpoint: the open connection follows.
    let bound = handle
        .apply(config(&[("web", "127.0.0.1:0")], two.local_addr()))
        .await
        .unwrap();
    assert_eq!(bound, [("web".to_owned(), web)], "the socket is kept");
    assert_eq!(served_by(&mut connection, web).await, "two");

    // An address that is taken: nothing changes, the old config serves.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let error = handle
        .apply(config(
            &[("web", "127.0.0.1:0"), ("more", taken_addr.as_str())],
            one.local_addr(),
        ))
        .await
        .unwrap_err();
    let ApplyError::Bind(errors) = &error else {
        panic!("expected a bind error, got {error}");
    };
    assert_eq!(errors.len(), 1);
    assert!(error.to_string().contains("\"more\""), "{error}");
    assert_eq!(served_by(&mut connection, web).await, "two");

    // The listener goes away: the open connection is closed once idle,
    // and the port no longer accepts.
    handle
        .apply(config(&[("other", "127.0.0.1:0")], one.local_addr()))
        .await
        .unwrap();
    let open = &connection;
    let closed = eventually(DEADLINE, || async move { open.is_closed() }).await;
    assert!(closed, "the removed listener's idle connection closes");
    let refused = eventually(DEADLINE, || async {
        tokio::net::TcpStream::connect(web).await.is_err()
    })
    .await;
    assert!(refused, "the removed listener stops accepting");
    assert_eq!(proxy.shutdown().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_listeners_busy_connections_end_at_the_drain_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let http_echo = echo("slow").await;
    let tcp_echo = TcpEchoServer::bind(loopback0()).await.unwrap();
    let yaml = |with_listeners: bool| {
        let listeners = if with_listeners {
            r#"
  - { name: web, address: "127.0.0.1:0", route_config: main }
  - { name: raw, address: "127.0.0.1:0", protocol: tcp, cluster: raw }"#
        } else {
            " []"
        };
        format!(
            r#"
drain_timeout: 300ms
listeners:{listeners}
route_configs:
  - name: main
    virtual_hosts:
      - {{ name: all, domains: ["*"], routes: [{{ name: all, cluster: echo }}] }}
clusters:
  - {{ name: echo, endpoints: [{{ address: "{}" }}] }}
  - {{ name: raw, endpoints: [{{ address: "{}" }}] }}
"#,
            http_echo.local_addr(),
            tcp_echo.local_addr()
        )
    };
    let proxy = Proxy::start(
        Config::from_yaml(&yaml(true), "test").unwrap(),
        tokio::runtime::Handle::current(),
        Readiness::Immediate,
    )
    .await
    .unwrap();
    let addresses = proxy.addresses().listeners.clone();
    let (web, raw) = (addresses[0].1, addresses[1].1);

    let mut tcp = tokio::net::TcpStream::connect(raw).await.unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tcp.read_exact(&mut echoed).await.unwrap();
    let mut slow = get(web, "/");
    slow.headers_mut()
        .insert("x-echo-delay-ms", "60000".parse().unwrap());
    let mut sender = http1_connect(web).await.unwrap();
    let in_flight = tokio::spawn(async move { sender.send_request(slow).await });
    let arrived = eventually(DEADLINE, || async { http_echo.requests_served() == 1 }).await;
    assert!(arrived, "the slow request reached the echo");

    proxy
        .handle()
        .apply(Config::from_yaml(&yaml(false), "test").unwrap())
        .await
        .unwrap();
    // Both are cut once the 300 ms drain timeout has passed, long before
    // the slow response would come.
    let read = tokio::time::timeout(DEADLINE, tcp.read(&mut echoed)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    let response = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert!(
        response.is_err(),
        "the in-flight request is cut: {response:?}"
    );
    proxy.shutdown().await;
}
