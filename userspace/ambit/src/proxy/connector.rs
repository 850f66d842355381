//! How the tunnel reaches an upstream: a `protocol: TCP` workload gets plain TCP from inside the
//! source pod's netns; a `protocol: HBONE` workload gets an HBONE tunnel (mTLS + HTTP/2 CONNECT)
//! to its port 15008, and a destination behind a waypoint an HBONE tunnel to the waypoint, both
//! also from inside the source pod's netns.

use std::net::SocketAddr;

use anyhow::Result;
use tokio::net::TcpStream;

use super::ProxyContext;
use crate::{
    config::Protocol,
    hbone::client::{Tunnel, TunnelRequest},
    netns::Netns,
    socket::connect_tcp,
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
    match upstream.protocol {
        Protocol::Tcp => Ok(UpstreamConnection::Tcp(
            connect_tcp(source.netns, upstream.addr, ctx.connect_timeout).await?,
        )),
        Protocol::Hbone => {
            let tunnel = ctx
                .hbone
                .open(TunnelRequest {
                    netns: source.netns,
                    source: source.workload.identity(),
                    expected: upstream.expected_identities.clone(),
                    hbone_addr: upstream.tunnel_addr,
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
