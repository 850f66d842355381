//! HTTP/2 PINGs: how both ends of an HBONE connection notice a peer that stopped answering (a
//! crashed host, a dropped NAT mapping, a client holding streams on purpose) while its TCP
//! connection still looks open. Without them such a connection, its streams and the sockets
//! they hold to apps would stay until TCP gave up, which may be never for an idle stream.

use std::time::Duration;

use h2::{Ping, PingPong};

/// Sends one PING and waits for its answer; says why the peer counts as gone if it does not
/// answer within `timeout`.
pub async fn ping(ping_pong: &mut PingPong, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
        Ok(Ok(_pong)) => Ok(()),
        Ok(Err(e)) => Err(format!("ping failed: {e}")),
        Err(_) => Err(format!("ping not answered within {timeout:?}")),
    }
}

/// PINGs every `interval`; resolves with the reason once a PING goes unanswered. Never
/// resolves when h2 gave no PingPong (it is taken once per connection).
pub async fn until_unanswered(
    ping_pong: Option<PingPong>,
    interval: Duration,
    timeout: Duration,
) -> String {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        if let Err(why) = ping(&mut ping_pong, timeout).await {
            return why;
        }
    }
}
