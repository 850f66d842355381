//! The contract between Ambit's eBPF programs and its userspace: map names, keys, values and
//! constants. Every type is `#[repr(C)]` with explicit padding, so that both sides agree on the
//! layout byte for byte and `bpftool map dump` prints named fields (the maps carry BTF).
//!
//! Addresses are stored as 16 bytes in network byte order; IPv4 addresses are IPv4-mapped IPv6
//! (`::ffff:a.b.c.d`), so that one key type serves both families and a v4-mapped `connect()` on
//! an IPv6 socket finds the same entry as a plain IPv4 one.
#![no_std]

/// Bumped whenever a map's key, value or type changes. Two node processes built with different
/// values cannot share the pinned maps: a new one refuses to take a node over from a running
/// one (the handover's hello says both), and the release that bumps it says how to upgrade
/// (docs/upgrades.md).
pub const ABI_VERSION: u32 = 1;

/// Map names, as the eBPF object declares them and as they are pinned.
pub mod map_names {
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    pub const MESH_DESTINATIONS: &str = "MESH_DESTINATIONS";
    pub const PENDING_CONNECTS: &str = "PENDING_CONNECTS";
    pub const ORIGINAL_DESTINATIONS: &str = "ORIGINAL_DESTINATIONS";
    pub const INBOUND_PODS: &str = "INBOUND_PODS";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const NODE_ADDRESSES: &str = "NODE_ADDRESSES";
    pub const DELIVERIES: &str = "DELIVERIES";
    pub const FAST_PATH_COUNTERS: &str = "FAST_COUNTERS";
    pub const ALL: [&str; 10] = [
        ENROLLED_NETNS,
        MESH_DESTINATIONS,
        PENDING_CONNECTS,
        ORIGINAL_DESTINATIONS,
        INBOUND_PODS,
        INBOUND_LISTENERS,
        COUNTERS,
        NODE_ADDRESSES,
        DELIVERIES,
        FAST_PATH_COUNTERS,
    ];
    /// The fast path's maps (see `LoopbackKey`). Not pinned: they live with the programs of
    /// the node process that loaded them (a new process starts new ones), so they are not in
    /// `ALL`.
    pub const LOOPBACK_SOCKETS: &str = "LOOPBACK_SOCKS";
    pub const LOOPBACK_FLAGS: &str = "LOOPBACK_FLAGS";
}

/// Program names (function names in the eBPF object; `bpftool prog show` shows the first 15
/// characters).
pub mod program_names {
    pub const CONNECT4: &str = "ambit_connect4";
    pub const CONNECT6: &str = "ambit_connect6";
    pub const SOCKOPS: &str = "ambit_sockops";
    pub const SK_LOOKUP: &str = "ambit_sk_lookup";
    pub const BIND4: &str = "ambit_bind4";
    pub const BIND6: &str = "ambit_bind6";
    /// Iterators (iter/tcp), run once per enrollment and un-enrollment, not attached to a pod.
    pub const MARK_LISTENERS: &str = "ambit_mark_listeners";
    pub const UNMARK_SOCKETS: &str = "ambit_unmark_sockets";
    /// The fast path (`--fast-path on`): sock_ops on the node process's own cgroup, and the
    /// sk_msg program attached to `LOOPBACK_SOCKETS`.
    pub const TUNNEL_SOCKOPS: &str = "ambit_tunnel_sockops";
    pub const LOOPBACK_MSG: &str = "ambit_loopback_msg";
}

/// Map sizes. Large enough for a busy node; hash maps only use memory for live entries.
pub const MAX_ENROLLED_PODS: usize = 1024;
pub const MAX_MESH_DESTINATIONS: usize = 65536;
pub const MAX_TRACKED_CONNECTIONS: usize = 65536;
/// A node has a handful of addresses its pods see it by (their default gateways).
pub const MAX_NODE_ADDRESSES: usize = 64;

/// Ports of a ztunnel-compatible node, inside each enrolled pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;
/// On the node: admin (loopback), metrics, readiness.
pub const ADMIN_PORT: u16 = 15000;
pub const METRICS_PORT: u16 = 15020;
pub const READINESS_PORT: u16 = 15021;
/// Ports of the tunnel itself (and of a ztunnel node): never a destination the tunnel delivers
/// to, whatever a client asks.
pub const TUNNEL_PORTS: [u16; 6] = [
    OUTBOUND_PORT,
    INBOUND_PLAINTEXT_PORT,
    HBONE_PORT,
    ADMIN_PORT,
    METRICS_PORT,
    READINESS_PORT,
];

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// An IP address: 16 bytes in network order, IPv4 as IPv4-mapped IPv6. Stored as four `u32`
/// words because the kernel's `user_ip6`/`local_ip6` context fields are `u32[4]` in network order
/// and must be read with 4-byte loads.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    pub words: [u32; 4],
}

impl IpKey {
    /// The third word of an IPv4-mapped address: bytes `00 00 ff ff` in memory.
    pub const V4_MAPPED_MARKER: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    /// `ip4` is the address as the kernel stores it: network-order bytes in a `u32`.
    #[inline(always)]
    pub const fn from_v4_raw(ip4: u32) -> Self {
        Self {
            words: [0, 0, Self::V4_MAPPED_MARKER, ip4],
        }
    }

    #[inline(always)]
    pub const fn from_v6_raw(words: [u32; 4]) -> Self {
        Self { words }
    }

    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == Self::V4_MAPPED_MARKER
    }

    /// 127.0.0.0/8 (as IPv4-mapped) or ::1: the pod's own loopback, never a mesh destination.
    #[inline(always)]
    pub const fn is_loopback(&self) -> bool {
        let last = self.words[3].to_ne_bytes();
        if self.is_v4_mapped() {
            return last[0] == 127;
        }
        self.words[0] == 0
            && self.words[1] == 0
            && self.words[2] == 0
            && self.words[3] == u32::from_ne_bytes([0, 0, 0, 1])
    }

    pub fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.words[i].to_ne_bytes();
            out[i * 4] = b[0];
            out[i * 4 + 1] = b[1];
            out[i * 4 + 2] = b[2];
            out[i * 4 + 3] = b[3];
            i += 1;
        }
        out
    }

    pub fn from_octets(o: [u8; 16]) -> Self {
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        Self {
            words: [w(0), w(4), w(8), w(12)],
        }
    }
}

/// `ENROLLED_NETNS`: netns cookie → what the capture programs need to know about the pod.
/// Written by the agent as the last step of enrollment (capture is off until it exists) and
/// removed as the first step of un-enrollment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EnrolledPod {
    /// Port of the tunnel's outbound listener on loopback in the pod's netns.
    pub outbound_port: u16,
    /// `POD_FLAG_*` bits.
    pub flags: u16,
    pub _pad: u32,
}

/// Capture every TCP destination, not only mesh destinations.
pub const POD_FLAG_CAPTURE_ALL: u16 = 1;

/// `MESH_DESTINATIONS` key: a workload IP (port 0 = every port) or a service VIP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DestinationKey {
    pub ip: IpKey,
    /// Host byte order; 0 matches every port of a workload IP.
    pub port: u16,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MeshDestination {
    /// `DESTINATION_KIND_*`.
    pub kind: u32,
    pub _pad: u32,
}

pub const DESTINATION_KIND_WORKLOAD: u32 = 1;
pub const DESTINATION_KIND_SERVICE: u32 = 2;

/// Where an application meant to connect before `connect4`/`connect6` rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OriginalDestination {
    pub ip: IpKey,
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6` of the application's socket.
    pub family: u16,
    pub _pad: u32,
}

/// `PENDING_CONNECTS`: socket cookie → the rewritten connect, until the socket is established
/// (then it moves to `ORIGINAL_DESTINATIONS`) or closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingConnect {
    pub original: OriginalDestination,
    pub netns_cookie: u64,
}

/// `ORIGINAL_DESTINATIONS` key: what the tunnel sees of an accepted outbound connection —
/// the netns its listener lives in, and the application's address and port (its peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnectionKey {
    pub netns_cookie: u64,
    pub ip: IpKey,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// `INBOUND_PODS`: an enrolled pod's IP → inbound capture settings. `INBOUND_LISTENERS` (a
/// sockhash with the same key) holds the tunnel's plaintext listener for that pod. A pod in
/// `INBOUND_PODS` whose listener is missing (tunnel down) has its inbound connections refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InboundPod {
    pub flags: u32,
    pub _pad: u32,
}

/// `NODE_ADDRESSES`: an address of the node as its enrolled pods see it (their default
/// gateway, the node's end of their link) → `NODE_ADDRESS_PRESENT`. A connection from one of
/// them to an enrolled pod is the kubelet's probe (or another host-network process): it goes to
/// the app's own listener, around the tunnel, whether or not the node's listeners are open.
/// Written by the agent at each enrollment change; kept while the agent is away (pinned).
pub const NODE_ADDRESS_PRESENT: u32 = 1;

/// `DELIVERIES`: a connection the tunnel is opening to an app from its client's address (a
/// transparent socket inside the pod's netns) → `DELIVERY_PRESENT`. Written just before the
/// connect() and removed once it returns: `ambit_sk_lookup` passes the connection's SYN to the
/// app instead of capturing it (it comes from a client address like any captured connection).
/// LRU, so that an entry a crashed tunnel left is evicted in time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DeliveryKey {
    /// The pod's address (the connection's destination).
    pub pod: IpKey,
    /// The client's address (the connection's source).
    pub client: IpKey,
    /// Host byte order.
    pub pod_port: u16,
    /// Host byte order.
    pub client_port: u16,
}

pub const DELIVERY_PRESENT: u32 = 1;
pub const MAX_DELIVERIES: usize = 65536;

/// The mark (`SO_MARK`) that the app's listening sockets in an enrolled pod carry, and with
/// them every connection they accept and its SYN-ACK. A policy-routing rule in the pod's netns
/// sends marked packets from the pod's address to a table that delivers them locally: that is
/// how an app's replies to a client address reach the tunnel's transparent socket instead of
/// the network. Only the bits of `APP_REPLY_MARK_MASK` are Ambit's; a mark the app set itself
/// keeps its other bits.
pub const APP_REPLY_MARK: u32 = 0x0053_0000;
pub const APP_REPLY_MARK_MASK: u32 = 0x00ff_0000;

/// `LOOPBACK_SOCKETS` key: one end of a loopback hop (the app's socket and the tunnel's on the
/// client side; the tunnel's delivery socket and the app's accepted one on the server side),
/// as that socket sees itself. A socket's peer has the key with local and remote swapped.
///
/// The four-tuple alone is not unique: every pod has its own loopback (hence the netns), and a
/// four-tuple is used again while the socket that had it before is still open, its connection
/// in TIME_WAIT (`tcp_tw_reuse` on loopback, the tunnel's explicit-port deliveries). A new
/// socket under the old key would replace the old one in the map, and the kernel drops the
/// unread bytes of a socket taken out of the map. So the key also holds both initial sequence
/// numbers (+1, as `snd_una` and `rcv_nxt` are when the handshake completes): each end knows
/// both, and they differ between two uses of a four-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LoopbackKey {
    pub netns_cookie: u64,
    pub local: IpKey,
    pub remote: IpKey,
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    /// This end's initial sequence number + 1.
    pub local_seq: u32,
    /// The other end's initial sequence number + 1.
    pub remote_seq: u32,
    pub _pad: u32,
}

impl LoopbackKey {
    /// The key of the socket at the other end of the same connection.
    pub const fn peer(&self) -> Self {
        Self {
            netns_cookie: self.netns_cookie,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            local_seq: self.remote_seq,
            remote_seq: self.local_seq,
            _pad: 0,
        }
    }
}

/// `LOOPBACK_FLAGS` value (socket-local storage of each socket in `LOOPBACK_SOCKETS`): what the
/// fast path did with the socket (`LOOPBACK_*` bits), and its peer's key, which sock_ops knows
/// (sequence numbers) and sk_msg does not.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LoopbackState {
    pub flags: u32,
    pub _pad: u32,
    /// Bytes this socket's writes moved into its peer so far (see `LOOPBACK_BUDGET`).
    pub redirected: u64,
    pub peer: LoopbackKey,
}

/// How many bytes each socket's writes may move straight into its peer; the rest of the
/// connection's bytes in that direction go through TCP. The kernel's sockmap has no
/// backpressure (a redirected write never waits for the reader: a fast writer and a slower
/// reader fill the host's TCP memory, until writes fail with ENOMEM), so the budget is what
/// bounds the bytes a socket can have queued unread: never more than TCP's own receive buffer
/// would hold. Switching to TCP keeps the order: a socket reads everything redirected to it
/// before anything from TCP, and no write of this socket is redirected after the switch.
pub const LOOPBACK_BUDGET: u64 = 1 << 20;

/// Sockets in `LOOPBACK_SOCKETS`: two per connection on the fast path.
pub const MAX_LOOPBACK_SOCKETS: usize = 2 * MAX_TRACKED_CONNECTIONS;

/// `LoopbackState::flags` bits: what the fast path did with a socket.
/// The socket is in `LOOPBACK_SOCKETS`; set by sock_ops when it adds it.
pub const LOOPBACK_IN_MAP: u32 = 1;
/// At least one of its writes went straight into its peer's receive queue.
pub const LOOPBACK_REDIRECTED: u32 = 2;
/// A write went through TCP: it found no peer (not added yet, or gone), or the socket's
/// `LOOPBACK_BUDGET` was spent. From then on every write of this socket does, so that its
/// peer never gets bytes out of order (see `ambit_loopback_msg`).
pub const LOOPBACK_FELL_BACK: u32 = 4;

/// Indices of the per-CPU `FAST_PATH_COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPathCounter {
    /// A loopback socket added to `LOOPBACK_SOCKETS` at establishment.
    SocketAdded = 0,
    /// A loopback socket left out: it had already received bytes (TCP Fast Open data), or the
    /// map or its storage was full.
    SocketSkipped = 1,
    /// A write moved straight into the peer socket.
    Redirected = 2,
    /// A write that went through TCP (no peer in the map, the socket's budget spent, or an
    /// earlier write did).
    Passed = 3,
}

impl FastPathCounter {
    pub const COUNT: u32 = 4;
    pub const ALL: [FastPathCounter; 4] = [
        FastPathCounter::SocketAdded,
        FastPathCounter::SocketSkipped,
        FastPathCounter::Redirected,
        FastPathCounter::Passed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FastPathCounter::SocketAdded => "fast_path_sockets_added",
            FastPathCounter::SocketSkipped => "fast_path_sockets_skipped",
            FastPathCounter::Redirected => "fast_path_writes_redirected",
            FastPathCounter::Passed => "fast_path_writes_passed",
        }
    }
}

/// Indices of the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() to a mesh destination rewritten to the tunnel.
    OutboundCaptured = 0,
    /// connect() from an enrolled pod to a destination outside the mesh, left alone.
    OutboundPassed = 1,
    /// Original destination recorded for an established captured connection.
    OriginalDestinationRecorded = 2,
    /// A map update failed in a program (map full?): the connection was refused.
    Errors = 3,
    /// Inbound plaintext connection steered to the tunnel's listener.
    InboundCaptured = 4,
    /// Inbound connection to an enrolled pod refused because its listener is missing.
    InboundRefused = 5,
    /// Inbound connection left alone: to the tunnel's HBONE port, from inside the pod itself,
    /// or from the node (`NODE_ADDRESSES`: the kubelet's probes), which goes to the app.
    InboundPassed = 6,
    /// An app in an enrolled pod tried to bind one of the tunnel's ports: refused.
    BindRefused = 7,
}

impl Counter {
    pub const COUNT: u32 = 8;
    pub const ALL: [Counter; 8] = [
        Counter::OutboundCaptured,
        Counter::OutboundPassed,
        Counter::OriginalDestinationRecorded,
        Counter::Errors,
        Counter::InboundCaptured,
        Counter::InboundRefused,
        Counter::InboundPassed,
        Counter::BindRefused,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::OutboundCaptured => "outbound_captured",
            Counter::OutboundPassed => "outbound_passed",
            Counter::OriginalDestinationRecorded => "original_destination_recorded",
            Counter::Errors => "errors",
            Counter::InboundCaptured => "inbound_captured",
            Counter::InboundRefused => "inbound_refused",
            Counter::InboundPassed => "inbound_passed",
            Counter::BindRefused => "bind_refused",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are #[repr(C)], made only of integers, with explicit padding.
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::EnrolledPod {}
    unsafe impl aya::Pod for super::DestinationKey {}
    unsafe impl aya::Pod for super::MeshDestination {}
    unsafe impl aya::Pod for super::OriginalDestination {}
    unsafe impl aya::Pod for super::PendingConnect {}
    unsafe impl aya::Pod for super::ConnectionKey {}
    unsafe impl aya::Pod for super::InboundPod {}
    unsafe impl aya::Pod for super::DeliveryKey {}
    unsafe impl aya::Pod for super::LoopbackKey {}
    unsafe impl aya::Pod for super::LoopbackState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<IpKey>(), 16);
        assert_eq!(size_of::<EnrolledPod>(), 8);
        assert_eq!(size_of::<DestinationKey>(), 20);
        assert_eq!(size_of::<MeshDestination>(), 8);
        assert_eq!(size_of::<OriginalDestination>(), 24);
        assert_eq!(size_of::<PendingConnect>(), 32);
        assert_eq!(size_of::<ConnectionKey>(), 32);
        assert_eq!(size_of::<InboundPod>(), 8);
        assert_eq!(size_of::<DeliveryKey>(), 36);
        assert_eq!(size_of::<LoopbackKey>(), 56);
        assert_eq!(size_of::<LoopbackState>(), 72);
    }

    #[test]
    fn loopback_is_127_slash_8_and_ipv6_one() {
        let v4 = |o: [u8; 4]| IpKey::from_v4_raw(u32::from_ne_bytes(o));
        assert!(v4([127, 0, 0, 1]).is_loopback());
        assert!(v4([127, 9, 8, 7]).is_loopback());
        assert!(!v4([10, 0, 0, 127]).is_loopback());
        let v6 = |last: u8, first: u8| {
            let mut o = [0u8; 16];
            o[0] = first;
            o[15] = last;
            IpKey::from_octets(o)
        };
        assert!(v6(1, 0).is_loopback()); // ::1
        assert!(!v6(1, 0xfd).is_loopback()); // fd00::1
        assert!(!v6(0, 0).is_loopback()); // ::
    }

    #[test]
    fn v4_mapped_round_trip() {
        // 10.1.2.3 as the kernel stores it: network-order bytes.
        let raw = u32::from_ne_bytes([10, 1, 2, 3]);
        let key = IpKey::from_v4_raw(raw);
        assert!(key.is_v4_mapped());
        assert_eq!(
            key.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
        assert_eq!(IpKey::from_octets(key.octets()), key);
    }
}
