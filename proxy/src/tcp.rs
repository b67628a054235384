//! L4 forwarding: pick an endpoint, connect, copy bytes both ways.
//!
//! A TCP connection is not cut by the drain signal (there is no graceful
//! close for an opaque stream); it runs until either side closes or the
//! process's drain deadline passes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::net::TcpStream;

use crate::drain::Drain;
use crate::listener::ConnectionGuard;
use crate::stack::TcpListener;

/// Forwards one accepted connection to the listener's cluster.
pub(crate) async fn proxy(
    mut downstream: TcpStream,
    peer: SocketAddr,
    listener: Arc<TcpListener>,
    _drain: Drain,
) {
    let _guard = ConnectionGuard::new(listener.metrics.clone());
    let endpoint = match listener.cluster.pick() {
        Ok(endpoint) => endpoint,
        Err(error) => {
            tracing::debug!(listener = %listener.config.name, peer.addr = %peer, %error, "tcp connection refused");
            return;
        }
    };
    let _active = endpoint.begin();
    let mut upstream = match endpoint.connect().await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(listener = %listener.config.name, peer.addr = %peer, %error, "tcp upstream connect failed");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((from_client, to_client)) => {
            listener
                .metrics
                .bytes_received
                .fetch_add(from_client, Relaxed);
            listener.metrics.bytes_sent.fetch_add(to_client, Relaxed);
        }
        Err(error) => {
            tracing::debug!(listener = %listener.config.name, peer.addr = %peer, %error, "tcp connection ended with an error");
        }
    }
}
