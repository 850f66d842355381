//! Outgoing TCP connections of the tunnel: made from inside a pod's netns and marked as the
//! tunnel's own.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use tokio::net::{TcpSocket, TcpStream};

use crate::netns::Netns;

/// The mark on every socket the tunnel opens (ztunnel's value), so that iptables rules in a pod
/// can tell the tunnel's own connections from the app's (`--capture iptables`).
pub const TUNNEL_SOCKET_MARK: u32 = 0x539;

/// A TCP connection from a socket created inside `netns` (so its packets leave through the
/// pod's own interface). The tunnel is not in the pod's cgroup, so its connect() is not captured.
pub async fn connect_tcp(netns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let socket = netns.socket(socket2::Domain::for_address(addr))?;
    socket
        .set_mark(TUNNEL_SOCKET_MARK)
        .context("setting SO_MARK on a tunnel socket")?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("connect to {addr} timed out after {timeout:?}"))?
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
