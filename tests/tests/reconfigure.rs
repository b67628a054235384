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
    let response = tokio::time::timeout(DEADLINE, sender.send_request(get(addr, "/")))
        .await
        .unwrap()
        .unwrap();
    header(&response, "x-echo-server").to_owned()
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
    let ApplyError::Bind(errors) = &error;
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
