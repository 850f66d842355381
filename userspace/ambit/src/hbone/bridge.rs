//! Moves bytes between a TCP stream and an HTTP/2 stream, both ways, respecting HTTP/2 flow
//! control. An EOF from the TCP side ends the HTTP/2 stream (END_STREAM), and the end of the
//! HTTP/2 stream shuts down the TCP write side: half-close crosses the tunnel. A failure (the
//! CONNECT refused, the stream reset, either side broken) resets the TCP side instead.

use std::{
    future::{poll_fn, Future},
    pin::pin,
    time::Instant,
};

use bytes::{Bytes, BytesMut};
use futures::{
    future::{select, Either},
    FutureExt as _,
};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

use crate::socket::relay::{reset_on_close, Transferred};

/// Read size from the TCP side, per connection: it starts small, so that an idle or chatty
/// connection holds little memory, and doubles each time a read fills it, up to
/// `MAX_READ_CHUNK`. Each read becomes one DATA frame. 256 KiB measured best for bulk flows
/// here (`cargo xtask bench`, single stream: 64 KiB −15 %, 1 MiB −15 %, CPU per GiB alike).
const FIRST_READ_CHUNK: usize = 16 * 1024;
const MAX_READ_CHUNK: usize = 256 * 1024;

/// How a bridge ended badly.
#[derive(Debug)]
pub enum BridgeError {
    /// The server did not accept the CONNECT (its answer, or no answer): nothing was delivered.
    Refused(anyhow::Error),
    /// Either side failed while bytes were moving.
    Io(std::io::Error),
}

impl std::fmt::Display for BridgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BridgeError::Refused(e) => write!(f, "{e:#}"),
            BridgeError::Io(e) => e.fmt(f),
        }
    }
}

/// Bridges `tcp` and an HTTP/2 stream. `recv` is the stream's receiving half, still to come on
/// the client (the server's answer to the CONNECT: see `client::Tunnel`); the TCP side's
/// bytes go out meanwhile.
pub async fn bridge(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: impl Future<Output = anyhow::Result<RecvStream>>,
) -> (Transferred, Result<(), BridgeError>) {
    let start = Instant::now();
    let (read, mut write) = tcp.into_split();
    let (mut sent, mut received) = (0, 0);
    let result = {
        let up = pin!(async {
            tcp_to_h2(read, send, &mut sent)
                .await
                .map_err(BridgeError::Io)
        });
        let down = pin!(async {
            let recv = recv.await.map_err(BridgeError::Refused)?;
            h2_to_tcp(recv, &mut write, &mut received)
                .await
                .map_err(BridgeError::Io)
        });
        // Each direction runs until it ends (half-close), but an error in one ends the other:
        // once the stream is reset, a direction waiting on an app that neither sends, closes
        // nor reads would otherwise hold the app's socket and this task forever (measured in
        // tests/abuse.rs: one fd per such stream, never released).
        match select(down, up).await {
            Either::Left((Ok(()), up)) => up.await,
            Either::Right((Ok(()), down)) => down.await,
            Either::Left((Err(e), _)) => Err(e),
            // A refusal ends the stream too (the server's END_STREAM, then its reset), and `up`
            // can see that end first: the connection task runs on another worker and may take
            // in the answer and the reset between the polls of `down` and `up`. The answer is
            // then already there, and a refusal must be reported as the refusal it is.
            Either::Right((Err(e), down)) => match down.now_or_never() {
                Some(Err(refused @ BridgeError::Refused(_))) => Err(refused),
                _ => Err(e),
            },
        }
    };
    if result.is_err() {
        // Refused, or cut off midway: the app may have sent bytes that never arrived, or be
        // missing some of the answer, so it must not see an orderly close (FIN) but a reset.
        // (`forget`: dropping the write half would send a FIN first; the socket closes, with
        // the reset, when the read half is gone too, which it already is.)
        reset_on_close(write.as_ref());
        write.forget();
    }
    (
        Transferred {
            sent,
            received,
            duration: start.elapsed(),
        },
        result,
    )
}

async fn tcp_to_h2(
    from: OwnedReadHalf,
    mut to: SendStream<Bytes>,
    total: &mut u64,
) -> std::io::Result<()> {
    let result = copy_tcp_to_h2(from, &mut to, total).await;
    if result.is_err() {
        // The TCP side failed (reset): cancel the stream so the peer's side ends too.
        to.send_reset(h2::Reason::CANCEL);
    }
    result
}

async fn copy_tcp_to_h2(
    mut from: OwnedReadHalf,
    to: &mut SendStream<Bytes>,
    total: &mut u64,
) -> std::io::Result<()> {
    let mut chunk = FIRST_READ_CHUNK;
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(chunk);
        // While waiting on the app, watch the stream too: a reset (by the peer, or by h2 for a
        // peer that broke flow control) or the connection's end must end this direction even
        // if the app never sends again.
        let n = tokio::select! {
            read = from.read_buf(&mut buf) => read?,
            reset = poll_fn(|cx| to.poll_reset(cx)) => {
                let why = match reset {
                    Ok(reason) => format!("HTTP/2 stream reset: {reason}"),
                    Err(e) => format!("HTTP/2 stream ended: {e}"),
                };
                return Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, why));
            }
        };
        if n >= chunk {
            chunk = (chunk * 2).min(MAX_READ_CHUNK);
        }
        if n == 0 {
            // Half-close: END_STREAM with no data.
            to.send_data(Bytes::new(), true).map_err(h2_to_io)?;
            return Ok(());
        }
        *total += n as u64;
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            to.reserve_capacity(data.len());
            let granted = poll_fn(|cx| to.poll_capacity(cx))
                .await
                .ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "HTTP/2 stream closed")
                })?
                .map_err(h2_to_io)?;
            let chunk = data.split_to(granted.min(data.len()));
            to.send_data(chunk, false).map_err(h2_to_io)?;
        }
    }
}

async fn h2_to_tcp(
    mut from: RecvStream,
    to: &mut OwnedWriteHalf,
    total: &mut u64,
) -> std::io::Result<()> {
    while let Some(chunk) = from.data().await {
        let chunk = chunk.map_err(h2_to_io)?;
        to.write_all(&chunk).await?;
        *total += chunk.len() as u64;
        // Give the window back only once the bytes are written: backpressure end to end.
        let _ = from.flow_control().release_capacity(chunk.len());
    }
    to.shutdown().await
}

fn h2_to_io(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        return e.into_io().unwrap();
    }
    std::io::Error::other(e)
}
