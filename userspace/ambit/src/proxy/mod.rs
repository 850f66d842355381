//! The userspace tunnel. For every enrolled pod it owns two listeners inside the pod's netns:
//!
//! - outbound (`127.0.0.1:15001`, `[::1]:15001`): connections the kernel redirected at
//!   connect(); the original destination comes from the `ORIGINAL_DESTINATIONS` map
//!   (`outbound.rs`);
//! - inbound plaintext (`127.0.0.1:15006`, `[::1]:15006`): connections sk_lookup steered here;
//!   the original destination is the accepted socket's local address (`inbound_plaintext.rs`);
//! - HBONE (`0.0.0.0:15008`, `[::]:15008`): mTLS HTTP/2 CONNECT from other nodes
//!   (`inbound.rs`, as ztunnel names its HBONE server).
//!
//! How a connection reaches its upstream depends on the upstream's protocol (`connector.rs`).
//! Below this layer: `hbone` (the client pool, the protocol's pieces), `tls`, `socket`.

pub mod admit;
pub mod connector;
pub mod delivery;
pub mod inbound;
pub mod inbound_plaintext;
pub mod outbound;
pub mod tracker;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, RwLock},
    time::Duration,
};

use ambit_abi::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use anyhow::{Context as _, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tracing::debug;

use crate::{
    datapath::{Capture, Deliveries, LoopbackFlags, OriginalDestinations},
    drain::Drain,
    hbone::{client::HboneClient, HboneSettings},
    netns::Netns,
    observability::{ConnectionRecord, Metrics},
    socket::accept,
    state::State,
    tls::{CertManager, Identity},
};

/// What every connection handler needs, shared by all pods of the node.
pub struct ProxyContext {
    pub state: watch::Receiver<Arc<State>>,
    pub original_destinations: OriginalDestinations,
    /// Announces the tunnel's deliveries to apps, so that sk_lookup lets them through.
    pub deliveries: Deliveries,
    /// The fast path's per-socket flags (`--fast-path on`): whether a connection took it.
    pub loopback_flags: Option<LoopbackFlags>,
    /// The node's addresses as its pods see them (`NODE_ADDRESSES`), kept by the agent.
    pub node_addresses: RwLock<BTreeSet<IpAddr>>,
    /// `--deliver-from`.
    pub deliver_from: ambit_settings::DeliverFrom,
    pub capture: Capture,
    pub connect_timeout: Duration,
    pub certs: Arc<CertManager>,
    pub hbone: Arc<HboneClient>,
    pub hbone_settings: HboneSettings,
    pub metrics: Arc<Metrics>,
    /// Live inbound connections, re-checked when policies change.
    pub tracker: Arc<tracker::ConnectionTracker>,
    /// Open connections, and the shutdown signal (SIGTERM).
    pub drain: Arc<Drain>,
}

impl ProxyContext {
    /// With the fast path on: records on `record` whether the tunnel's end of this node's
    /// loopback hop (`socket`) is on it. One map lookup per connection.
    pub fn note_fast_path(&self, record: &mut ConnectionRecord, socket: &TcpStream) {
        if let Some(flags) = &self.loopback_flags {
            record.set_fast_path(flags.of(socket));
        }
    }

    pub fn is_node_address(&self, ip: IpAddr) -> bool {
        self.node_addresses.read().unwrap().contains(&ip)
    }
}

/// One pod's tunnel: its listeners and accept loops. Dropping it closes the listeners (so
/// captured connections to this pod fail closed); connections in flight run to completion.
pub struct PodTunnel {
    accept_loops: Vec<JoinHandle<()>>,
    /// The listening sockets the accept loops serve, for handing them to a successor
    /// (`handover`); closed with the accept loops, or the listeners would stay open with
    /// nobody accepting.
    listener_fds: Vec<OwnedFd>,
    /// Dropped with the tunnel: tells the pod's HBONE connections to take no more streams
    /// (GOAWAY), so that idle pooled connections from other nodes let go of the pod's netns.
    _gone: watch::Sender<()>,
}

/// A pod's listeners, opened inside its netns before any program is attached to the pod.
pub struct PodListeners {
    pub outbound: Vec<TcpListener>,
    pub inbound_v4: Option<TcpListener>,
    pub inbound_v6: Option<TcpListener>,
    /// HBONE (15008) on every address of the pod; sk_lookup leaves this port alone.
    pub hbone: Vec<TcpListener>,
}

impl PodListeners {
    /// Opens the pod's listeners in its netns.
    pub fn open(netns: &Netns) -> Result<Self> {
        let mut outbound = vec![listen(netns, (Ipv4Addr::LOCALHOST, OUTBOUND_PORT).into())?];
        let inbound_v4 = Some(listen(
            netns,
            (Ipv4Addr::LOCALHOST, INBOUND_PLAINTEXT_PORT).into(),
        )?);
        // IPv6 may be disabled in the pod: then there is nothing to capture over it either.
        let mut inbound_v6 = None;
        let mut hbone = vec![listen(netns, (Ipv4Addr::UNSPECIFIED, HBONE_PORT).into())?];
        if let Ok(l) = listen(netns, (Ipv6Addr::LOCALHOST, OUTBOUND_PORT).into()) {
            outbound.push(l);
            inbound_v6 = listen(netns, (Ipv6Addr::LOCALHOST, INBOUND_PLAINTEXT_PORT).into()).ok();
            hbone.extend(listen(netns, (Ipv6Addr::UNSPECIFIED, HBONE_PORT).into()).ok());
        } else {
            debug!(netns = %netns.path().display(), "no IPv6 loopback in the pod; IPv4 only");
        }
        Ok(Self {
            outbound,
            inbound_v4,
            inbound_v6,
            hbone,
        })
    }

    /// The listeners a predecessor handed over (the same sockets it serves), told apart by
    /// their local addresses; each must live in `netns`.
    pub fn adopt(netns: &Netns, fds: Vec<OwnedFd>) -> Result<Self> {
        let mut listeners = Self {
            outbound: Vec::new(),
            inbound_v4: None,
            inbound_v6: None,
            hbone: Vec::new(),
        };
        for fd in fds {
            let addr = crate::handover::listener_address(&fd)?;
            let cookie = crate::netns::socket_netns_cookie(fd.as_fd())?;
            if cookie != netns.cookie() {
                anyhow::bail!(
                    "a handed-over listener on {addr} is in netns {cookie}, not the pod's ({})",
                    netns.cookie()
                );
            }
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            match addr.port() {
                OUTBOUND_PORT => listeners.outbound.push(listener),
                INBOUND_PLAINTEXT_PORT if addr.is_ipv4() => listeners.inbound_v4 = Some(listener),
                INBOUND_PLAINTEXT_PORT => listeners.inbound_v6 = Some(listener),
                HBONE_PORT => listeners.hbone.push(listener),
                _ => anyhow::bail!("a handed-over listener on {addr} is none of the tunnel's"),
            }
        }
        if listeners.outbound.is_empty()
            || listeners.inbound_v4.is_none()
            || listeners.hbone.is_empty()
        {
            anyhow::bail!("the handed-over listeners miss one of the tunnel's IPv4 ports");
        }
        Ok(listeners)
    }

    fn all(&self) -> impl Iterator<Item = &TcpListener> {
        self.outbound
            .iter()
            .chain(&self.inbound_v4)
            .chain(&self.inbound_v6)
            .chain(&self.hbone)
    }
}

fn listen(netns: &Netns, addr: SocketAddr) -> Result<TcpListener> {
    let socket = netns.socket(socket2::Domain::for_address(addr))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr} in {}", netns.path().display()))?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into())?)
}

impl PodTunnel {
    /// Closes the listeners (connections in flight go on): the first step of draining.
    pub async fn close_listeners(&mut self) {
        self.listener_fds.clear();
        let tasks: Vec<JoinHandle<()>> = self.accept_loops.drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        // Once they have stopped, every connection they accepted is counted by the drain.
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Copies of the listening sockets, for a successor (`handover`).
    pub fn listener_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.listener_fds.iter().map(|fd| fd.try_clone()).collect()
    }

    /// Stops the accept loops and returns once their listeners are closed, so that a
    /// re-enrollment can bind the same ports right away (aborting a task only schedules its
    /// cancellation; until then its listener still holds the port).
    pub async fn stop(mut self) {
        self.listener_fds.clear();
        let tasks: Vec<JoinHandle<()>> = self.accept_loops.drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    pub fn start(
        ctx: Arc<ProxyContext>,
        pod: String,
        identity: Identity,
        netns: Arc<Netns>,
        listeners: PodListeners,
    ) -> Result<Self> {
        let listener_fds = listeners
            .all()
            .map(|l| l.as_fd().try_clone_to_owned())
            .collect::<std::io::Result<_>>()
            .context("copying the pod's listeners")?;
        let mut accept_loops = Vec::new();
        let (gone, gone_rx) = watch::channel(());
        let delivery = Arc::new(delivery::AppDelivery::new(ctx.clone(), netns.clone()));
        for listener in listeners.outbound {
            let handler = outbound::Outbound::new(ctx.clone(), pod.clone(), netns.clone());
            accept_loops.push(tokio::spawn(accept::serve(listener, Arc::new(handler))));
        }
        for listener in [listeners.inbound_v4, listeners.inbound_v6]
            .into_iter()
            .flatten()
        {
            let handler = inbound_plaintext::InboundPlaintext::new(
                ctx.clone(),
                pod.clone(),
                delivery.clone(),
            );
            accept_loops.push(tokio::spawn(accept::serve(listener, Arc::new(handler))));
        }
        for listener in listeners.hbone {
            let server = inbound::HboneServer::new(
                ctx.clone(),
                pod.clone(),
                identity.clone(),
                delivery.clone(),
                gone_rx.clone(),
            );
            accept_loops.push(tokio::spawn(accept::serve(listener, Arc::new(server))));
        }
        Ok(Self {
            accept_loops,
            listener_fds,
            _gone: gone,
        })
    }
}

impl Drop for PodTunnel {
    fn drop(&mut self) {
        for task in &self.accept_loops {
            task.abort();
        }
    }
}
