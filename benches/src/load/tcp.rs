//! TCP connection tasks: each request writes the prepared buffer to an echo
//! and reads the same number of bytes back (both directions at once, so a
//! buffer larger than the socket buffers cannot deadlock). With a new
//! connection per request, each request also connects, half-closes after
//! writing and drops the connection once the echo is read.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::driver::Context;
use super::plan::Timing;
use super::record::{Outcome, Recorder};

/// One TCP connection's task, until the plan runs out of slots.
pub(crate) async fn run_tcp(
    ctx: Arc<Context>,
    buffer: Bytes,
    mut stream: Option<TcpStream>,
    is_new_connection_per_request: bool,
    mut recorder: Recorder,
) -> Recorder {
    let mut echoed = vec![0u8; buffer.len()];
    while let Some(slot) = ctx.plan.next_slot() {
        let timing = ctx.plan.wait(slot).await;
        if is_new_connection_per_request {
            stream = None;
        }
        let open = match stream.as_mut() {
            Some(open) => open,
            None => match ctx.connect().await {
                Ok(opened) => {
                    recorder.record_connection(&timing, false);
                    stream.insert(opened)
                }
                Err(outcome) => {
                    recorder.record(&timing, Instant::now(), outcome);
                    ctx.back_off_after_connect_failure().await;
                    continue;
                }
            },
        };
        let outcome = round_trip(
            &ctx,
            open,
            &buffer,
            &mut echoed,
            is_new_connection_per_request,
            &timing,
        )
        .await;
        let end = Instant::now();
        if outcome == Outcome::Ok {
            recorder.record_bytes(&timing, buffer.len() as u64, echoed.len() as u64);
        } else {
            stream = None;
        }
        recorder.record(&timing, end, outcome);
    }
    recorder
}

/// Writes `buffer` and reads as many bytes back into `echoed`, bounded by
/// the request's deadline.
///
/// Cancel safety: not cancel safe (the stream is left mid-exchange); callers
/// drop the stream after a failure.
async fn round_trip(
    ctx: &Context,
    stream: &mut TcpStream,
    buffer: &[u8],
    echoed: &mut [u8],
    is_half_close: bool,
    timing: &Timing,
) -> Outcome {
    let deadline = ctx.plan.deadline(timing.sent, ctx.timeout);
    let (mut reader, mut writer) = stream.split();
    let write = async {
        writer.write_all(buffer).await?;
        if is_half_close {
            writer.shutdown().await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let read = reader.read_exact(echoed);
    match tokio::time::timeout_at(deadline, async { tokio::try_join!(write, read) }).await {
        Ok(Ok(_)) => Outcome::Ok,
        Ok(Err(err)) => {
            debug!(error = %err, "tcp round trip failed");
            Outcome::ResetOrProtocol
        }
        Err(_) if deadline >= ctx.plan.hard_stop => Outcome::Unfinished,
        Err(_) => Outcome::Timeout,
    }
}
