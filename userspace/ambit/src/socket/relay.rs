//! Copies bytes both ways until both directions are done. An EOF on one side is passed on as a
//! shutdown of the other side's write half, so half-closed connections work end to end. A
//! failure on either side resets both (`reset_on_close`).

use std::time::Instant;

use tokio::{io, net::TcpStream};

/// Buffer per direction: large enough that a bulk flow needs few syscalls per byte.
const BUFFER: usize = 128 * 1024;

pub struct Transferred {
    /// Bytes from the downstream (the connecting side) to the upstream.
    pub sent: u64,
    /// Bytes from the upstream back to the downstream.
    pub received: u64,
    pub duration: std::time::Duration,
}

pub async fn relay(
    mut downstream: TcpStream,
    mut upstream: TcpStream,
) -> (Transferred, io::Result<()>) {
    let start = Instant::now();
    let result =
        io::copy_bidirectional_with_sizes(&mut downstream, &mut upstream, BUFFER, BUFFER).await;
    let (sent, received, result) = match result {
        Ok((sent, received)) => (sent, received, Ok(())),
        Err(e) => {
            reset_on_close(&downstream);
            reset_on_close(&upstream);
            (0, 0, Err(e))
        }
    };
    (
        Transferred {
            sent,
            received,
            duration: start.elapsed(),
        },
        result,
    )
}

/// Makes closing `socket` send a reset instead of an orderly close (SO_LINGER 0): for a
/// connection that failed, so that its app cannot take a cut-off stream for a complete one.
pub fn reset_on_close(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO));
}
