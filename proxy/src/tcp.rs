//! L4 forwarding: pick an endpoint, connect, copy bytes both ways; and
//! [`splice`], the drain-bounded copy that TCP listeners and upgraded HTTP
//! connections (WebSocket) share.
//!
//! An opaque stream is not cut by the drain signal (there is no graceful
//! close for it); it runs until either side closes or the drain timeout
//! passes after the signal (the process's, or its listener's when a
//! configuration removed the listener).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::drain::Drain;
use crate::listener::ConnectionGuard;
use crate::stack::TcpListener;

/// Bytes buffered per direction of a forwarded connection.
///
/// PERF: `weft-bench compare --scenario tcp` (64 KiB echoed per round
/// trip, 3 rounds): tokio's default 8 KiB gave 606 MB/s at 106.8 µs of
/// proxy CPU per round trip; 32 KiB gives 739 MB/s at 80.3 µs, and 64 KiB
/// no more (742 MB/s, 77.7 µs). nginx and HAProxy buffer 16 KiB per
/// direction; these buffers live as long as the connection.
const TCP_BUFFER_BYTES: usize = 32 * 1024;

/// Forwards one accepted connection to the listener's cluster.
pub(crate) async fn proxy(
    mut downstream: TcpStream,
    peer: SocketAddr,
    listener: Arc<TcpListener>,
    drain: Drain,
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
    let Some(copied) = splice(
        &mut downstream,
        &mut upstream,
        TCP_BUFFER_BYTES,
        &drain,
        listener.drain_timeout,
    )
    .await
    else {
        tracing::debug!(listener = %listener.config.name, peer.addr = %peer, "drain timeout; closing tcp connection");
        return;
    };
    match copied {
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

/// Copies bytes both ways, with `buffer_bytes` buffered per direction,
/// until either side closes (the byte counts each way) or `drain_timeout`
/// has passed since the drain signal (`None`).
pub(crate) async fn splice<A, B>(
    a: &mut A,
    b: &mut B,
    buffer_bytes: usize,
    drain: &Drain,
    drain_timeout: std::time::Duration,
) -> Option<std::io::Result<(u64, u64)>>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let copy = tokio::io::copy_bidirectional_with_sizes(a, b, buffer_bytes, buffer_bytes);
    let drained = async {
        drain.cancelled().await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        copied = copy => Some(copied),
        () = drained => None,
    }
}
