//! A cap on open client connections (`--max-connections`): each accepted
//! connection holds a permit until it closes; one accepted while none is
//! free is closed at once (counted in `picket_connections_refused_total`),
//! so a flood of idle or stalled connections cannot take the process's file
//! descriptors and memory from the callers already connected. Per
//! connection, `--max-concurrent-streams` bounds the calls and HTTP/2
//! keep-alive pings drop peers that stopped answering.
//!
//! Written here because tonic's server has per-connection limits only; the
//! wrapper just carries the permit and delegates the I/O.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// A connection holding one of the permits; the permit goes back when it
/// is dropped (the connection closed).
pub struct Limited<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
}

impl<IO> Drop for Limited<IO> {
    fn drop(&mut self) {
        metrics::gauge!("picket_connections_open").decrement(1.0);
    }
}

/// Admits the connections of `incoming` while fewer than `max` are open;
/// closes the others as they arrive.
pub fn limit<S, IO, E>(incoming: S, max: usize) -> impl Stream<Item = Result<Limited<IO>, E>>
where
    S: Stream<Item = Result<IO, E>>,
{
    let permits = Arc::new(Semaphore::new(max.max(1)));
    incoming.filter_map(move |accepted| {
        let permits = permits.clone();
        async move {
            match accepted {
                Err(e) => Some(Err(e)),
                Ok(io) => match permits.try_acquire_owned() {
                    Ok(permit) => {
                        metrics::gauge!("picket_connections_open").increment(1.0);
                        Some(Ok(Limited {
                            io,
                            _permit: permit,
                        }))
                    }
                    Err(_) => {
                        metrics::counter!("picket_connections_refused_total").increment(1);
                        tracing::warn!(
                            max_connections = max,
                            "connection closed: --max-connections are open"
                        );
                        drop(io);
                        None
                    }
                },
            }
        }
    })
}

impl<IO: Connected> Connected for Limited<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
