//! How the tunnel reaches an upstream. A `protocol: TCP` workload gets plain TCP from inside the
//! source pod's netns; HBONE (mTLS + HTTP/2 CONNECT to port 15008) slots in here as a second
//! connector.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context as _, Result};
use tokio::net::{TcpSocket, TcpStream};

use crate::{config::Protocol, netns::Netns, state::Upstream};

/// Opens the upstream connection for a captured connection from the pod in `netns`.
pub async fn connect(netns: &Netns, upstream: &Upstream, timeout: Duration) -> Result<TcpStream> {
    match upstream.workload.protocol {
        Protocol::Tcp => connect_tcp(netns, upstream.addr, timeout).await,
        // Fail closed: never send a connection meant for the HBONE tunnel in plaintext.
        Protocol::Hbone => bail!(
            "workload {} speaks HBONE, which this build does not tunnel yet; refusing rather \
             than sending plaintext",
            upstream.workload.key
        ),
    }
}

/// A TCP connection from a socket created inside `netns` (so its packets leave through the
/// pod's own interface). The tunnel is not in the pod's cgroup, so its connect() is not captured.
pub async fn connect_tcp(netns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let socket = netns.socket(socket2::Domain::for_address(addr))?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .with_context(|| format!("connect to {addr} timed out after {timeout:?}"))?
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
