//! Reads and writes on a TCP socket as direct system calls.
//!
//! PERF: tokio's `TcpStream` reads and writes through glibc's `recv` and
//! `send`. In a process with more than one thread (every proxy: a control
//! runtime beside the workers) glibc makes each of them a cancellation
//! point and wraps the system call in two atomic read-modify-writes of the
//! thread's cancellation state: about 1.2 % of the proxy's CPU under
//! `wrk -c32`, four calls a request (benches/RESULTS.md). glibc skips that
//! in a single-threaded process (an nginx worker; HAProxy with `nbthread
//! 1`). Here the calls are made with rustix, which issues the system call
//! itself, for plain TCP streams and under TLS ([`Socket`]).
//!
//! Readiness stays tokio's: a call is made only while the socket is
//! marked ready, and a call that would block clears the mark
//! ([`TcpStream::try_io`]). As tokio does, a read or write that moved
//! fewer bytes than asked also clears it: the socket was drained (or its
//! send buffer filled), and asking again at once would be a wasted call
//! that fails with `EAGAIN`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustix::net::{RecvFlags, SendFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A TCP socket read and written with these calls: what TLS runs on.
#[derive(Debug)]
pub(crate) struct Socket(TcpStream);

impl Socket {
    pub(super) fn new(stream: TcpStream) -> Self {
        Self(stream)
    }

    pub(super) fn tcp(&self) -> &TcpStream {
        &self.0
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_read::<UNDER_TLS>(&self.0, cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_write::<UNDER_TLS>(&self.0, cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        poll_write_vectored::<UNDER_TLS>(&self.0, cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Whether a call that moved `done` of `asked` bytes left the socket
/// drained (read) or full (write).
fn short(done: usize, asked: usize) -> bool {
    done > 0 && done < asked
}

/// The callers of the calls below, each given its own copy of them.
///
/// PERF: called from two places (plain streams, and TLS's socket), one
/// copy of a call was no longer inlined into the plain stream's read and
/// write: about 100 instructions a request more (callgrind).
pub(super) const PLAIN: u8 = 0;
const UNDER_TLS: u8 = 1;

/// Reads what the socket holds into `buf`'s unfilled part (nothing read at
/// the end of the stream).
#[allow(unsafe_code)]
pub(super) fn poll_read<const CALLER: u8>(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        // SAFETY: `recv` only writes into the slice, never de-initializes
        // a byte of it.
        let unfilled = unsafe { buf.unfilled_mut() };
        let asked = unfilled.len();
        let mut read = 0;
        let called = stream.try_io(Interest::READABLE, || {
            let ((filled, _), _) = rustix::net::recv(stream, &mut *unfilled, RecvFlags::empty())?;
            read = filled.len();
            if short(read, asked) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match called {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock && read > 0 => {}
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(error) => return Poll::Ready(Err(error)),
        }
        // SAFETY: `recv` wrote (initialized) the first `read` bytes of the
        // unfilled part.
        unsafe { buf.assume_init(read) };
        buf.advance(read);
        return Poll::Ready(Ok(()));
    }
}

/// Writes what the socket's send buffer takes of `data`. `MSG_NOSIGNAL`:
/// a peer that closed is an error, not a `SIGPIPE`.
pub(super) fn poll_write<const CALLER: u8>(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    data: &[u8],
) -> Poll<io::Result<usize>> {
    poll_written(stream, cx, data.len(), || {
        rustix::net::send(stream, data, SendFlags::NOSIGNAL)
    })
}

/// Writes what the socket's send buffer takes of `bufs`, in order.
pub(super) fn poll_write_vectored<const CALLER: u8>(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let asked = bufs.iter().map(|buf| buf.len()).sum();
    poll_written(stream, cx, asked, || {
        rustix::net::sendmsg(
            stream,
            bufs,
            &mut rustix::net::SendAncillaryBuffer::default(),
            SendFlags::NOSIGNAL,
        )
    })
}

fn poll_written(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    asked: usize,
    mut call: impl FnMut() -> rustix::io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        let mut written = 0;
        let called = stream.try_io(Interest::WRITABLE, || {
            written = call()?;
            if short(written, asked) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match called {
            Ok(()) => return Poll::Ready(Ok(written)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock && written > 0 => {
                return Poll::Ready(Ok(written));
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(error) => return Poll::Ready(Err(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    async fn read(stream: &TcpStream, into: &mut [u8]) -> usize {
        let mut buf = ReadBuf::new(into);
        poll_fn(|cx| poll_read::<PLAIN>(stream, cx, &mut buf))
            .await
            .unwrap();
        buf.filled().len()
    }

    #[tokio::test]
    async fn bytes_written_are_read_in_order_and_the_end_reads_nothing() {
        let (client, server) = pair().await;
        let n = poll_fn(|cx| poll_write::<PLAIN>(&client, cx, b"hello "))
            .await
            .unwrap();
        assert_eq!(n, 6);
        let bufs = [io::IoSlice::new(b"wor"), io::IoSlice::new(b"ld")];
        let n = poll_fn(|cx| poll_write_vectored::<PLAIN>(&client, cx, &bufs))
            .await
            .unwrap();
        assert_eq!(n, 5);
        let mut got = Vec::new();
        let mut chunk = [0u8; 64];
        while got.len() < 11 {
            let n = read(&server, &mut chunk).await;
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, b"hello world");
        drop(client);
        assert_eq!(read(&server, &mut chunk).await, 0);
    }

    #[tokio::test]
    async fn a_short_read_waits_for_more_and_a_read_fills_at_most_the_buffer() {
        let (client, server) = pair().await;
        poll_fn(|cx| poll_write::<PLAIN>(&client, cx, b"abcdef"))
            .await
            .unwrap();
        let mut small = [0u8; 4];
        assert_eq!(read(&server, &mut small).await, 4);
        assert_eq!(&small, b"abcd");
        let mut rest = [0u8; 64];
        assert_eq!(read(&server, &mut rest).await, 2);
        assert_eq!(&rest[..2], b"ef");
        // Drained: the next read waits until the peer sends again.
        let mut next = std::pin::pin!(read(&server, &mut rest));
        assert!(futures_util::poll!(next.as_mut()).is_pending());
        poll_fn(|cx| poll_write::<PLAIN>(&client, cx, b"g"))
            .await
            .unwrap();
        assert_eq!(next.await, 1);
    }

    #[tokio::test]
    async fn a_write_to_a_closed_peer_is_an_error_not_a_signal() {
        let (client, server) = pair().await;
        drop(server);
        let chunk = [7u8; 64 * 1024];
        let mut failed = None;
        for _ in 0..64 {
            match poll_fn(|cx| poll_write::<PLAIN>(&client, cx, &chunk)).await {
                Ok(_) => tokio::task::yield_now().await,
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
        }
        let error = failed.expect("writes to a closed peer fail");
        assert!(matches!(
            error.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ));
    }
}
