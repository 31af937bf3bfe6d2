//! The gRPC server's accepted connections, each under a read-idle deadline: a connection whose
//! peer sends nothing for [`ServeOptions::idle_timeout`] is closed. This covers a peer that
//! opens a TCP connection and never sends the HTTP/2 preface (or a TLS ClientHello), which
//! hyper would otherwise keep forever. Live HTTP/2 peers are never idle that long: the server
//! pings a quiet connection every third of the timeout, and every peer must answer a ping.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Settings of the gRPC listener that are not security.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// A connection whose peer sends no byte for this long is closed (a silent TCP connection,
    /// a stalled handshake). The server's HTTP/2 keepalive pings a quiet connection at a third
    /// of it, so live peers always answer in time.
    pub idle_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// How long a connection may stay silent by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

impl ServeOptions {
    /// The server's HTTP/2 keepalive interval: well inside the idle timeout, so that a live
    /// peer's ping answer arrives before the deadline (at least 100 ms).
    pub fn keepalive_interval(&self) -> Duration {
        (self.idle_timeout / 3).max(Duration::from_millis(100))
    }
}

/// The accepted connections of `listener` (TCP_NODELAY set), each under `idle`.
pub(super) fn incoming(
    listener: TcpListener,
    idle: Duration,
) -> impl Stream<Item = io::Result<IdleDeadline>> {
    futures::stream::unfold(listener, move |listener| async move {
        let next = listener.accept().await.map(|(stream, _)| {
            // Nagle would hold the second small write of each response for the peer's
            // delayed ACK (~40 ms per round): small RPCs need TCP_NODELAY.
            let _ = stream.set_nodelay(true);
            IdleDeadline::new(stream, idle)
        });
        if next.is_err() {
            // Out of descriptors or a similar transient failure: do not spin on it.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some((next, listener))
    })
}

/// A TCP stream whose reads fail with `TimedOut` once the peer has sent nothing for `idle`.
pub(super) struct IdleDeadline {
    inner: TcpStream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl IdleDeadline {
    fn new(inner: TcpStream, idle: Duration) -> IdleDeadline {
        IdleDeadline {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl AsyncRead for IdleDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer sent nothing for {:?}", self.idle),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for IdleDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for IdleDeadline {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}
