//! Just enough rtnetlink to add, list and delete policy-routing rules and routes in a netns:
//! the messages of `ip rule` and `ip route`, without iptables or an external tool.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context as _, Result};

use crate::netns::Netns;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_DUMP: u16 = 0x300;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;

const FRA_SRC: u16 = 2;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;

pub const RTN_LOCAL: u8 = 2;
pub const RTN_THROW: u8 = 9;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_HOST: u8 = 254;
const RTPROT_STATIC: u8 = 4;
/// `lo` has this index in every netns.
const LOOPBACK_IFINDEX: u32 = 1;

/// A policy-routing rule: `from <src> fwmark <mark>/<mask> lookup <table> pref <priority>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub src: IpAddr,
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
    pub priority: u32,
}

/// A route of one table: `local <all> dev lo` or `throw <dst>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub kind: u8,
    pub dst: IpAddr,
    pub dst_len: u8,
}

impl Route {
    /// Every destination of `dst`'s family delivered locally: `local 0.0.0.0/0 dev lo`.
    pub fn local_all(family_of: IpAddr) -> Self {
        let dst = match family_of {
            IpAddr::V4(_) => IpAddr::V4(0.into()),
            IpAddr::V6(_) => IpAddr::V6(0.into()),
        };
        Self {
            kind: RTN_LOCAL,
            dst,
            dst_len: 0,
        }
    }

    /// `throw <dst>/<host>`: the lookup goes on with the next rule (the main table).
    pub fn throw(dst: IpAddr) -> Self {
        Self {
            kind: RTN_THROW,
            dst,
            dst_len: if dst.is_ipv4() { 32 } else { 128 },
        }
    }
}

/// A NETLINK_ROUTE socket opened inside a netns: what it changes is that netns's routing.
pub struct RouteSocket {
    fd: OwnedFd,
    seq: u32,
}

impl RouteSocket {
    pub fn open(netns: &Netns) -> Result<Self> {
        let fd = netns.run(|| {
            // SAFETY: plain socket(2); the fd is owned right away.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_ROUTE,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })??;
        Ok(Self { fd, seq: 0 })
    }

    /// Adds `rule`; Ok if the same rule is already there.
    pub fn add_rule(&mut self, rule: &Rule) -> Result<()> {
        let msg = rule_message(rule);
        match self.request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &msg) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other.with_context(|| format!("adding rule {rule:?}")),
        }
    }

    /// Deletes every rule of `family_of`'s family with this priority and table.
    pub fn delete_rules(&mut self, family_of: IpAddr, priority: u32, table: u32) -> Result<()> {
        let mut msg = Vec::new();
        push_rule_header(&mut msg, family(family_of), 0);
        push_attr(&mut msg, FRA_PRIORITY, &priority.to_ne_bytes());
        push_attr(&mut msg, FRA_TABLE, &table.to_ne_bytes());
        // One rule per request; the pod has one per address, so a few rounds.
        for _ in 0..64 {
            match self.request(RTM_DELRULE, 0, &msg) {
                Ok(()) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(e) => return Err(e).context("deleting delivery rules"),
            }
        }
        bail!("more than 64 rules with priority {priority} and table {table}")
    }

    /// Adds (or replaces) `route` in `table`.
    pub fn add_route(&mut self, table: u32, route: Route) -> Result<()> {
        let msg = route_message(table, route);
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &msg)
            .with_context(|| format!("adding route {route:?} to table {table}"))
    }

    /// Deletes `route` from `table`; Ok if it is not there.
    pub fn delete_route(&mut self, table: u32, route: Route) -> Result<()> {
        let msg = route_message(table, route);
        match self.request(RTM_DELROUTE, 0, &msg) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
            other => other.with_context(|| format!("deleting route {route:?} from table {table}")),
        }
    }

    /// The routes of `table` (both families).
    pub fn routes(&mut self, table: u32) -> Result<Vec<Route>> {
        let mut msg = Vec::new();
        push_route_header(&mut msg, libc::AF_UNSPEC as u8, 0, 0, 0, 0);
        self.seq += 1;
        self.send(RTM_GETROUTE, NLM_F_DUMP, &msg)
            .context("listing routes")?;
        let mut routes = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf).context("listing routes")?;
            for (kind, payload) in messages(&buf[..n]) {
                match kind {
                    NLMSG_DONE => return Ok(routes),
                    NLMSG_ERROR => {
                        let errno = error_code(payload);
                        if errno != 0 {
                            bail!("listing routes: {}", io::Error::from_raw_os_error(errno));
                        }
                    }
                    RTM_NEWROUTE => routes.extend(parse_route(payload, table)),
                    _ => {}
                }
            }
        }
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        self.seq += 1;
        self.send(kind, flags | NLM_F_ACK, payload)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, payload) in messages(&buf[..n]) {
                if kind == NLMSG_ERROR {
                    return match error_code(payload) {
                        0 => Ok(()),
                        errno => Err(io::Error::from_raw_os_error(errno)),
                    };
                }
            }
        }
    }

    fn send(&self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(16 + payload.len());
        msg.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        // SAFETY: an all-zero sockaddr_nl is the kernel's address (pid 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and kernel outlive the call; their sizes are given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn family(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn push_attr(msg: &mut Vec<u8>, kind: u16, value: &[u8]) {
    msg.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(value);
    msg.resize(msg.len().next_multiple_of(4), 0);
}

/// `struct fib_rule_hdr`.
fn push_rule_header(msg: &mut Vec<u8>, family: u8, src_len: u8) {
    msg.extend_from_slice(&[family, 0, src_len, 0, 0, 0, 0, FR_ACT_TO_TBL]);
    msg.extend_from_slice(&0u32.to_ne_bytes());
}

/// `struct rtmsg`.
fn push_route_header(
    msg: &mut Vec<u8>,
    family: u8,
    dst_len: u8,
    protocol: u8,
    scope: u8,
    kind: u8,
) {
    msg.extend_from_slice(&[family, dst_len, 0, 0, 0, protocol, scope, kind]);
    msg.extend_from_slice(&0u32.to_ne_bytes());
}

fn rule_message(rule: &Rule) -> Vec<u8> {
    let mut msg = Vec::new();
    let src_len = if rule.src.is_ipv4() { 32 } else { 128 };
    push_rule_header(&mut msg, family(rule.src), src_len);
    push_attr(&mut msg, FRA_SRC, &ip_bytes(rule.src));
    push_attr(&mut msg, FRA_PRIORITY, &rule.priority.to_ne_bytes());
    push_attr(&mut msg, FRA_FWMARK, &rule.mark.to_ne_bytes());
    push_attr(&mut msg, FRA_FWMASK, &rule.mask.to_ne_bytes());
    push_attr(&mut msg, FRA_TABLE, &rule.table.to_ne_bytes());
    msg
}

fn route_message(table: u32, route: Route) -> Vec<u8> {
    let mut msg = Vec::new();
    let scope = if route.kind == RTN_LOCAL {
        RT_SCOPE_HOST
    } else {
        RT_SCOPE_UNIVERSE
    };
    push_route_header(
        &mut msg,
        family(route.dst),
        route.dst_len,
        RTPROT_STATIC,
        scope,
        route.kind,
    );
    if route.dst_len > 0 {
        push_attr(&mut msg, RTA_DST, &ip_bytes(route.dst));
    }
    push_attr(&mut msg, RTA_TABLE, &table.to_ne_bytes());
    if route.kind == RTN_LOCAL {
        push_attr(&mut msg, RTA_OIF, &LOOPBACK_IFINDEX.to_ne_bytes());
    }
    msg
}

/// The netlink messages in one datagram: (type, payload after the 16-byte header).
fn messages(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        out.push((kind, &buf[16..len]));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

/// The (positive) errno of an NLMSG_ERROR payload; 0 is an acknowledgement.
fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(0..4)
        .map(|b| -i32::from_ne_bytes(b.try_into().unwrap()))
        .unwrap_or(libc::EIO)
}

/// A route of `table` from an RTM_NEWROUTE payload, or None for any other route.
fn parse_route(payload: &[u8], table: u32) -> Option<Route> {
    let header = payload.get(0..12)?;
    let (family, dst_len, kind) = (header[0], header[1], header[7]);
    let mut route_table = u32::from(header[4]);
    let mut dst = None;
    let mut attrs = &payload[12..];
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let attr = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        let value = &attrs[4..len];
        match attr {
            RTA_TABLE if value.len() == 4 => {
                route_table = u32::from_ne_bytes(value.try_into().unwrap())
            }
            RTA_DST => dst = ip_from_bytes(value),
            _ => {}
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    if route_table != table {
        return None;
    }
    let dst = match dst {
        Some(dst) => dst,
        None if family == libc::AF_INET as u8 => IpAddr::V4(0.into()),
        None if family == libc::AF_INET6 as u8 => IpAddr::V6(0.into()),
        None => return None,
    };
    Some(Route { kind, dst, dst_len })
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_message_round_trips_through_the_dump_parser() {
        for route in [
            Route::local_all("10.0.0.1".parse().unwrap()),
            Route::local_all("fd00::1".parse().unwrap()),
            Route::throw("10.201.1.1".parse().unwrap()),
            Route::throw("fd00:201:1::1".parse().unwrap()),
        ] {
            let msg = route_message(15006, route);
            assert_eq!(parse_route(&msg, 15006), Some(route), "{route:?}");
            assert_eq!(parse_route(&msg, 254), None, "another table's route");
        }
    }

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut msg = Vec::new();
        push_attr(&mut msg, 1, &[1, 2, 3, 4, 5]);
        assert_eq!(msg.len(), 12);
        assert_eq!(u16::from_ne_bytes([msg[0], msg[1]]), 9);
    }

    #[test]
    fn an_error_message_carries_a_negative_errno() {
        assert_eq!(error_code(&(-libc::EEXIST).to_ne_bytes()), libc::EEXIST);
        assert_eq!(error_code(&0i32.to_ne_bytes()), 0);
        assert_eq!(error_code(&[]), libc::EIO);
    }
}
