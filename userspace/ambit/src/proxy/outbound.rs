//! Outbound: connections an enrolled pod's app made to a mesh destination, redirected by
//! `ambit_connect4/6` to this listener. The original destination is looked up in the kernel's
//! `ORIGINAL_DESTINATIONS` map, keyed by this netns and the app's address and port.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{anyhow, Context as _, Result};
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    connector::{self, Source, UpstreamConnection},
    ProxyContext,
};
use crate::{
    config::Protocol,
    datapath::Capture,
    drain::Tracked,
    hbone::{
        bridge::{bridge, BridgeError},
        client::is_tls_failure,
    },
    netns::Netns,
    observability::{ConnectionRecord, Opened, Outcome, Peer, Reporter, ResponseFlag},
    socket::{accept, relay},
    state::{State, Unresolved},
};

pub struct Outbound {
    ctx: Arc<ProxyContext>,
    pod: String,
    netns: Arc<Netns>,
}

impl Outbound {
    pub fn new(ctx: Arc<ProxyContext>, pod: String, netns: Arc<Netns>) -> Self {
        Self { ctx, pod, netns }
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr) -> Result<()> {
        let original = match self.ctx.capture {
            Capture::Ebpf => self
                .ctx
                .original_destinations
                .lookup(self.netns.cookie(), peer)
                .ok_or_else(|| anyhow!("no original destination recorded for {peer}"))?,
            Capture::Iptables => iptables_original_destination(&stream)
                .with_context(|| format!("SO_ORIGINAL_DST of the connection from {peer}"))?,
        };
        let (upstream, source_workload) = {
            let state = self.ctx.state.borrow();
            let source_workload = state
                .workloads
                .get(&self.pod)
                .cloned()
                .ok_or_else(|| anyhow!("pod {} is no longer a workload", self.pod))?;
            (
                state.resolve(original, Some(&source_workload)),
                source_workload,
            )
        };
        let upstream = match upstream {
            Ok(upstream) => upstream,
            // Captured although outside the mesh (every destination is captured while the
            // kernel's map of mesh destinations is full): on, in plaintext, as without the mesh.
            Err(Unresolved::NotInMesh(dst)) => State::passthrough(dst),
            Err(e) => {
                // Nothing to connect to (or a waypoint that cannot be found: never go around
                // it): the app learns by a reset, as from a refused connect.
                relay::reset_on_close(&stream);
                return Err(anyhow!(e));
            }
        };
        // At debug, as ztunnel's "connection opened": at info each connection gets one line, the
        // access log at its end ("connection complete", with the same peers), not two.
        debug!(
            original_dst = %original,
            upstream = %upstream.addr,
            dst_workload = %upstream.workload.key,
            protocol = ?upstream.protocol,
            via_waypoint = upstream.via_waypoint,
            service = upstream.service.as_ref().map_or("-", |s| s.hostname.as_str()),
            "captured outbound connection"
        );
        stream.set_nodelay(true)?;
        // The mesh sees the app at the pod's address (the app's socket is on loopback here).
        let pod_ip = source_workload
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == original.is_ipv4())
            .or(source_workload.ips.first())
            .copied()
            .unwrap_or(peer.ip());
        let source = Source {
            workload: &source_workload,
            netns: &self.netns,
            addr: SocketAddr::new(pod_ip, peer.port()),
        };
        let hbone = upstream.protocol == Protocol::Hbone;
        let mut record = ConnectionRecord::open(
            self.ctx.metrics.clone(),
            Opened {
                reporter: Reporter::Source,
                src: Peer::workload(&source_workload, source.addr),
                dst: if upstream.workload.key.is_empty() {
                    Peer::addr(upstream.addr) // passthrough: no workload
                } else {
                    Peer::workload(&upstream.workload, upstream.addr)
                },
                hbone_addr: hbone.then_some(upstream.tunnel_addr),
                service: upstream.service.clone(),
            },
        );
        self.ctx.note_fast_path(&mut record, &stream);
        let connection = match connector::connect(&self.ctx, &source, &upstream).await {
            Ok(c) => c,
            Err(e) => {
                // A TLS failure (wrong CA, wrong identity) is told apart from a refused connect.
                record.close(Outcome::Failed {
                    flag: failure_flag(&e),
                    error: format!("{e:#}"),
                });
                // The app saw its connect succeed (it reached this proxy): it learns of the
                // failure by a reset, as from a refused connect.
                relay::reset_on_close(&stream);
                return Ok(());
            }
        };
        let (t, result) = match connection {
            UpstreamConnection::Tcp(upstream) => {
                let (t, result) = relay::relay(stream, upstream).await;
                (t, result.map_err(BridgeError::Io))
            }
            UpstreamConnection::Hbone(tunnel) => {
                let result = bridge(stream, tunnel.send, tunnel.response.established()).await;
                drop(tunnel.lease);
                result
            }
        };
        match result {
            // The server refused the CONNECT (policy, no such app, no answer): a failed
            // connection, as if the connect itself had failed; nothing reached the app.
            // A TLS alert in place of the answer is the server refusing this node's certificate.
            Err(BridgeError::Refused(e)) => record.close(Outcome::Failed {
                flag: failure_flag(&e),
                error: format!("{e:#}"),
            }),
            result => record.close(Outcome::Completed {
                request_bytes: t.sent,
                response_bytes: t.received,
                error: result.err().map(|e| e.to_string()),
            }),
        }
        Ok(())
    }
}

/// The destination before an iptables `REDIRECT` (`SO_ORIGINAL_DST`, from conntrack).
fn iptables_original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    use std::os::fd::AsRawFd as _;
    // SO_ORIGINAL_DST = IP6T_SO_ORIGINAL_DST = 80 (linux/netfilter_ipv4.h, netfilter_ipv6).
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let level = if stream.local_addr()?.is_ipv6() {
        libc::SOL_IPV6
    } else {
        libc::SOL_IP
    };
    // SAFETY: storage is large enough for either family and len says so.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote a sockaddr of `len` bytes.
    let addr = unsafe { socket2::SockAddr::new(storage, len) };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("SO_ORIGINAL_DST is not an IP address"))
}

/// The response flag of a connection that failed before any byte reached the app.
fn failure_flag(error: &anyhow::Error) -> ResponseFlag {
    if is_tls_failure(error) {
        ResponseFlag::TlsFailure
    } else {
        ResponseFlag::Connect
    }
}

impl accept::Handler for Outbound {
    const LISTENER: &'static str = "outbound";

    fn pod(&self) -> &str {
        &self.pod
    }

    fn track(&self) -> Tracked {
        self.ctx.drain.track()
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Result<()> {
        self.handle(stream, peer).await
    }
}
