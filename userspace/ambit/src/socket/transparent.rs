//! Transparent connections: a socket inside a pod's netns whose source is an address the pod
//! does not have (a client's), so that the app it connects to sees that client as its peer.
//! `IP_TRANSPARENT` lets the socket bind a non-local address; the replies come back to it only
//! because the pod's routing sends them to `lo` (see `routing`).

use std::{io, net::SocketAddr, os::fd::AsRawFd, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

use super::TUNNEL_SOCKET_MARK;
use crate::netns::Netns;

/// `IPV6_TRANSPARENT` (linux/in6.h); libc has no constant for it.
const IPV6_TRANSPARENT: libc::c_int = 75;

/// Why a transparent connect failed.
#[derive(Debug)]
pub enum TransparentError {
    /// The source address and port are taken for this destination (bind EADDRINUSE, connect
    /// EADDRNOTAVAIL): another port may work.
    SourceTaken,
    Failed(anyhow::Error),
}

/// A socket in `netns`, bound to `from` (any address, local or not), ready to connect. It is
/// marked as the tunnel's, and may share its source with other sockets to other destinations
/// (`SO_REUSEADDR`): with an explicit port, connect() then checks only that the full
/// four-tuple is free, and reuses one that is in TIME_WAIT (TCP timestamps keep the old
/// connection's segments out), whatever the pod's `tcp_tw_reuse`.
pub fn bound_socket(netns: &Netns, from: SocketAddr) -> Result<TcpSocket, TransparentError> {
    let failed = |what: &str, e: io::Error| {
        TransparentError::Failed(anyhow::anyhow!("{what} for a delivery from {from}: {e}"))
    };
    let socket = netns
        .socket(socket2::Domain::for_address(from))
        .map_err(TransparentError::Failed)?;
    // The tunnel's mark (for `--capture iptables` rules) and the app-reply mark: a reply the
    // kernel sends for this socket's packets without a socket of its own (a reset from a port
    // nobody listens on) carries it back here (fwmark_reflect, see agent/fwmark_reflect.rs).
    socket
        .set_mark(TUNNEL_SOCKET_MARK | ambit_abi::APP_REPLY_MARK)
        .map_err(|e| failed("setting SO_MARK", e))?;
    set_transparent(&socket, from).map_err(|e| failed("setting IP_TRANSPARENT", e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| failed("setting SO_REUSEADDR", e))?;
    match socket.bind(&from.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            return Err(TransparentError::SourceTaken)
        }
        Err(e) => return Err(failed("bind", e)),
    }
    Ok(TcpSocket::from_std_stream(socket.into()))
}

/// Connects a socket from [`bound_socket`] to `to`.
pub async fn connect(
    socket: TcpSocket,
    to: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, TransparentError> {
    let stream = match tokio::time::timeout(timeout, socket.connect(to)).await {
        Err(_) => {
            return Err(TransparentError::Failed(anyhow::anyhow!(
                "connect to {to} timed out after {timeout:?}"
            )))
        }
        Ok(Err(e)) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            return Err(TransparentError::SourceTaken)
        }
        Ok(Err(e)) => {
            return Err(TransparentError::Failed(
                anyhow::Error::new(e).context(format!("connect to {to}")),
            ))
        }
        Ok(Ok(stream)) => stream,
    };
    stream
        .set_nodelay(true)
        .map_err(|e| TransparentError::Failed(e.into()))?;
    Ok(stream)
}

fn set_transparent(socket: &socket2::Socket, from: SocketAddr) -> io::Result<()> {
    let (level, name) = match from {
        SocketAddr::V4(_) => (libc::SOL_IP, libc::IP_TRANSPARENT),
        SocketAddr::V6(_) => (libc::SOL_IPV6, IPV6_TRANSPARENT),
    };
    let on: libc::c_int = 1;
    // SAFETY: the option value is a c_int that lives across the call, and its size is given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
