//! Delivery: the last hop of an inbound connection, from the tunnel to the app, inside the
//! pod's netns. The app sees the original client's address as its peer (as it would without a
//! mesh, and as ztunnel delivers): the tunnel's socket is transparent and bound to the client's
//! address (HBONE: the peer of the HBONE connection; plaintext: the captured connection's
//! peer). The pieces that make that work:
//!
//! - `ambit_sk_lookup` would capture the delivery like any connection from a client address;
//!   the tunnel announces it in `DELIVERIES` for the length of its connect(), and it passes.
//! - The app's replies go to the client's address; the pod's delivery rule (`routing`) sends
//!   them to `lo`, where the tunnel's socket receives them. The rule matches only sockets
//!   marked by `ambit_sockops` (the app's listeners and what they accept), so the app's own
//!   outgoing connections to the same addresses are untouched.
//!
//! The source port is chosen here, not by the kernel, for two reasons. A plaintext connection
//! the tunnel accepted for this pod is itself a socket in the pod's netns with the four-tuple
//! (client:port → app:port); a delivery from that same client port would collide with it (its
//! SYN would reach the tunnel's socket, not the app), so ports the tunnel holds for this client
//! and app port are skipped. And with an explicit port, connect() reuses a four-tuple left in
//! TIME_WAIT by an earlier delivery, so deliveries do not run out of ports when clients close
//! first (the kernel's own choice would need `tcp_tw_reuse=1` in the pod).
//!
//! With `--deliver-from pod`, every delivery comes from the pod's own address and the pod is
//! not changed (no rule, no sysctl). Else connections the tunnel cannot deliver from the
//! client's address come from the pod's own as well:
//! a client of the other address family than the app's address, and a client at one of the
//! node's addresses (the pod's rule sends replies to those to the node, for the kubelet).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ambit_settings::DeliverFrom;
use anyhow::{bail, Result};
use rand::Rng as _;
use tokio::net::TcpStream;
use tracing::debug;

use super::ProxyContext;
use crate::{
    netns::Netns,
    socket::{
        connect_tcp,
        transparent::{self, TransparentError},
    },
};

/// How many source ports one delivery tries before it gives up.
const PORT_ATTEMPTS: usize = 16;
/// How long the pod's ephemeral port range is trusted before it is read again.
const PORT_RANGE_MAX_AGE: Duration = Duration::from_secs(5);
/// Linux's default `ip_local_port_range`, if the pod's cannot be read.
const DEFAULT_PORT_RANGE: (u16, u16) = (32768, 60999);

/// The deliveries into one pod.
pub struct AppDelivery {
    ctx: Arc<ProxyContext>,
    netns: Arc<Netns>,
    /// Plaintext connections the tunnel holds in this pod: (client, app port) → client ports.
    plaintext_peers: Mutex<HashMap<(IpAddr, u16), Vec<u16>>>,
    /// The pod's `ip_local_port_range`, and when it was read.
    port_range: Mutex<Option<(Instant, (u16, u16))>>,
}

impl AppDelivery {
    pub fn new(ctx: Arc<ProxyContext>, netns: Arc<Netns>) -> Self {
        Self {
            ctx,
            netns,
            plaintext_peers: Mutex::new(HashMap::new()),
            port_range: Mutex::new(None),
        }
    }

    /// A connection to the app at `app`, from `client`'s address when it can be (see the
    /// module's comment), else from the pod's own.
    pub async fn connect(&self, client: IpAddr, app: SocketAddr) -> Result<TcpStream> {
        let timeout = self.ctx.connect_timeout;
        let client = client.to_canonical();
        if self.ctx.deliver_from == DeliverFrom::Pod
            || client.is_ipv4() != app.is_ipv4()
            || client.is_unspecified()
            || self.ctx.is_node_address(client)
        {
            debug!(%client, %app, "delivered from the pod's own address");
            return connect_tcp(&self.netns, app, timeout).await;
        }
        let (low, high) = self.port_range();
        let mut port = rand::thread_rng().gen_range(low..=high);
        for _ in 0..PORT_ATTEMPTS {
            port = if port >= high { low } else { port + 1 };
            if self.held_by_plaintext(client, app.port(), port) {
                continue;
            }
            let from = SocketAddr::new(client, port);
            let socket = match transparent::bound_socket(&self.netns, from) {
                Ok(socket) => socket,
                Err(TransparentError::SourceTaken) => continue,
                Err(TransparentError::Failed(e)) => return Err(e),
            };
            let _announced = self.ctx.deliveries.announce(from, app)?;
            match transparent::connect(socket, app, timeout).await {
                Ok(stream) => return Ok(stream),
                Err(TransparentError::SourceTaken) => continue,
                Err(TransparentError::Failed(e)) => return Err(e),
            }
        }
        bail!(
            "no free source port for a delivery from {client} to {app} after {PORT_ATTEMPTS} tries"
        )
    }

    /// Records a plaintext connection from `peer` to the app's `app_port` that the tunnel holds
    /// in this pod, until the returned guard is dropped: no delivery to that app port uses
    /// `peer` as its source meanwhile.
    pub fn hold_plaintext_peer(self: &Arc<Self>, peer: SocketAddr, app_port: u16) -> HeldPeer {
        let key = (peer.ip().to_canonical(), app_port);
        self.plaintext_peers
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .push(peer.port());
        HeldPeer {
            delivery: self.clone(),
            key,
            port: peer.port(),
        }
    }

    fn held_by_plaintext(&self, client: IpAddr, app_port: u16, port: u16) -> bool {
        self.plaintext_peers
            .lock()
            .unwrap()
            .get(&(client, app_port))
            .is_some_and(|ports| ports.contains(&port))
    }

    /// The pod's ephemeral port range: delivery ports stay inside it, as the kernel's own
    /// choice would (a pod may keep ports outside it for its listeners).
    fn port_range(&self) -> (u16, u16) {
        let mut cached = self.port_range.lock().unwrap();
        if let Some((read_at, range)) = *cached {
            if read_at.elapsed() < PORT_RANGE_MAX_AGE {
                return range;
            }
        }
        let range = self
            .netns
            .sysctl(
                std::path::Path::new("/proc"),
                "net/ipv4/ip_local_port_range",
            )
            .ok()
            .and_then(|text| parse_port_range(&text))
            .unwrap_or(DEFAULT_PORT_RANGE);
        *cached = Some((Instant::now(), range));
        range
    }
}

/// A plaintext peer held by [`AppDelivery::hold_plaintext_peer`].
pub struct HeldPeer {
    delivery: Arc<AppDelivery>,
    key: (IpAddr, u16),
    port: u16,
}

impl Drop for HeldPeer {
    fn drop(&mut self) {
        let mut peers = self.delivery.plaintext_peers.lock().unwrap();
        if let Some(ports) = peers.get_mut(&self.key) {
            if let Some(i) = ports.iter().position(|p| *p == self.port) {
                ports.swap_remove(i);
            }
            if ports.is_empty() {
                peers.remove(&self.key);
            }
        }
    }
}

/// `ip_local_port_range` as the kernel prints it: "32768\t60999".
fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    let (low, high) = (parts.next()?.ok()?, parts.next()?.ok()?);
    (low > 0 && low <= high).then_some((low, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_range_is_read_as_the_kernel_prints_it() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("40000 40049"), Some((40000, 40049)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("x"), None);
    }
}
