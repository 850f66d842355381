//! How the tunnel reaches an upstream: a `protocol: TCP` workload gets plain TCP from inside the
//! source pod's netns; a `protocol: HBONE` workload gets an HBONE tunnel (mTLS + HTTP/2 CONNECT)
//! to its port 15008, also from inside the source pod's netns.

use std::{net::SocketAddr, time::Duration};

use ambit_abi::HBONE_PORT;
use anyhow::{Context as _, Result};
use tokio::net::{TcpSocket, TcpStream};

use super::ProxyContext;
use crate::{
    config::Protocol,
    hbone::client::{Tunnel, TunnelRequest},
    netns::Netns,
    state::{Upstream, WorkloadInfo},
};

pub enum UpstreamConnection {
    Tcp(TcpStream),
    Hbone(Tunnel),
}

/// The pod a captured outbound connection comes from.
pub struct Source<'a> {
    pub workload: &'a WorkloadInfo,
    pub netns: &'a Netns,
    /// The app's address as the mesh sees it: the pod's IP and the app's port.
    pub addr: SocketAddr,
}

pub async fn connect(
    ctx: &ProxyContext,
    source: &Source<'_>,
    upstream: &Upstream,
) -> Result<UpstreamConnection> {
    match upstream.workload.protocol {
        Protocol::Tcp => Ok(UpstreamConnection::Tcp(
            connect_tcp(source.netns, upstream.addr, ctx.connect_timeout).await?,
        )),
        Protocol::Hbone => {
            let expected = ctx.state.borrow().expected_identities(upstream);
            let tunnel = ctx
                .hbone
                .open(TunnelRequest {
                    netns: source.netns,
                    source: source.workload.identity(),
                    expected,
                    hbone_addr: SocketAddr::new(upstream.addr.ip(), HBONE_PORT),
                    target: upstream.addr,
                    client_addr: source.addr,
                    service_host: upstream.service.as_ref().map(|s| s.hostname.clone()),
                    baggage: source.workload.baggage(),
                })
                .await?;
            Ok(UpstreamConnection::Hbone(tunnel))
        }
    }
}

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
