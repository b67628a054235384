//! The `idle` scenario: memory per idle keep-alive connection, as
//! `benches/scripts/idle-connections.py` measures it.
//!
//! One warm connection first (pools and allocators settle), then the
//! resident memory of the proxy is read. Connections are then opened in
//! batches of [`BATCH`], one after another within a batch; each sends one
//! `GET` and reads the response head, and all are held open. After each
//! batch the runner pauses, so that a proxy that releases an idle
//! connection's buffers (weft parks HTTP/1 connections idle for a second)
//! can do so and reuse that memory for the next batch. The growth divided
//! by the connections opened is the overall figure; the growth over the
//! second half divided by its connections is the marginal (steady-state)
//! one. Connections are opened sequentially so that the proxy reuses one
//! upstream connection and only client-side state grows.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::report::IdleRound;
use super::system;

/// Connections opened between two pauses.
pub(crate) const BATCH: usize = 500;

/// Timeout of one connect plus its request.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on opening all the connections of one round, on top of the
/// pauses.
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);

/// A response head longer than this is refused.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Measures memory per idle connection of processes `pids` (summed: a
/// chain of proxies counts as one) serving HTTP/1.1
/// on `addr`, pausing `pause` after the warm connection and after each
/// batch.
///
/// # Errors
///
/// When the warm connection fails or the process's memory cannot be read.
/// A later connection failing ends the round early: the figures are then
/// over the connections opened, and [`IdleRound::error`] says why.
pub(crate) async fn measure(
    addr: SocketAddr,
    count: usize,
    pids: &[u32],
    pause: Duration,
) -> anyhow::Result<IdleRound> {
    let mut held = Vec::with_capacity(count + 1);
    held.push(
        open_one(addr)
            .await
            .context("the warm-up connection failed")?,
    );
    tokio::time::sleep(pause).await;
    let rss_before = system::rss_bytes_sum(pids).await?;
    let batches = u32::try_from(count.div_ceil(BATCH)).unwrap_or(u32::MAX);
    let deadline = Instant::now() + ROUND_TIMEOUT + pause.saturating_mul(batches);
    let mut error = None;
    let mut half = None;
    'batches: while held.len() - 1 < count {
        let batch = BATCH.min(count - (held.len() - 1));
        for _ in 0..batch {
            let opened = held.len() - 1;
            if Instant::now() >= deadline {
                error = Some(format!("stopped after {opened} connections: time ran out"));
                break 'batches;
            }
            match open_one(addr).await {
                Ok(stream) => held.push(stream),
                Err(err) => {
                    error = Some(format!("connection {} failed: {err:#}", opened + 1));
                    break 'batches;
                }
            }
        }
        tokio::time::sleep(pause).await;
        let opened = held.len() - 1;
        if half.is_none() && opened >= count / 2 && opened < count {
            half = Some((opened, system::rss_bytes_sum(pids).await?));
        }
    }
    let opened = held.len() - 1;
    if error.is_some() {
        tokio::time::sleep(pause).await;
    }
    let rss_after = system::rss_bytes_sum(pids).await?;
    drop(held);
    let per_connection = |rss_from: u64, connections: usize| {
        (connections > 0).then(|| rss_after.saturating_sub(rss_from) as f64 / connections as f64)
    };
    Ok(IdleRound {
        opened,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        per_connection_bytes: per_connection(rss_before, opened).unwrap_or(0.0),
        marginal_per_connection_bytes: half
            .and_then(|(half_opened, half_rss)| per_connection(half_rss, opened - half_opened)),
        error,
    })
}

/// Opens a connection, sends one `GET /` and reads the response head.
async fn open_one(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.context("connect")?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        let request = format!("GET / HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .context("sending the request")?;
        let mut head = Vec::with_capacity(512);
        let mut buffer = [0u8; 1024];
        loop {
            let read = stream
                .read(&mut buffer)
                .await
                .context("reading the response")?;
            if read == 0 {
                bail!("closed before a response");
            }
            head.extend_from_slice(&buffer[..read]);
            if head.windows(4).any(|window| window == b"\r\n\r\n") {
                break;
            }
            if head.len() > MAX_HEAD_BYTES {
                bail!("response head over {MAX_HEAD_BYTES} bytes");
            }
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            let status_line = head.split(|&b| b == b'\r').next().unwrap_or_default();
            bail!("answered {:?}", String::from_utf8_lossy(status_line));
        }
        anyhow::Ok(stream)
    };
    tokio::time::timeout(CONNECTION_TIMEOUT, exchange)
        .await
        .with_context(|| format!("no response within {CONNECTION_TIMEOUT:?}"))?
}
