//! Copies bytes both ways until both directions are done. An EOF on one side is passed on as a
//! shutdown of the other side's write half, so half-closed connections work end to end.

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
        Err(e) => (0, 0, Err(e)),
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
