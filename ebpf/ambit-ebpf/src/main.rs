//! Ambit's kernel side. Four programs, all attached per enrolled pod (never to host interfaces):
//!
//! - `ambit_connect4` / `ambit_connect6` (cgroup/connect4, cgroup/connect6 on the pod's cgroup):
//!   a connect() from an enrolled netns to a mesh destination is rewritten to the tunnel's
//!   outbound listener on loopback in the same netns; the original destination is remembered
//!   under the socket's cookie.
//! - `ambit_sockops` (sock_ops on the pod's cgroup): when that socket is established, its
//!   original destination is re-keyed by what the tunnel's accepted socket can see (netns
//!   cookie + the app's loopback address and port); both entries are removed when it closes.
//! - `ambit_sk_lookup` (sk_lookup on the pod's netns): a new inbound TCP connection to the pod's
//!   IP is handed to the tunnel's plaintext listener, which sees the original destination as its
//!   local address; one from the node (the kubelet's probes) goes to the app's own listener.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use ambit_abi::{
    ConnectionKey, Counter, DestinationKey, EnrolledPod, InboundPod, IpKey, MeshDestination,
    OriginalDestination, PendingConnect, AF_INET, AF_INET6, HBONE_PORT, INBOUND_PLAINTEXT_PORT,
    MAX_ENROLLED_PODS, MAX_MESH_DESTINATIONS, MAX_NODE_ADDRESSES, MAX_TRACKED_CONNECTIONS,
    OUTBOUND_PORT, POD_FLAG_CAPTURE_ALL,
};
// eBPF-side logging (aya-log): off unless the node is started with --ebpf-log. The level is a
// load-time constant (AYA_LOG_LEVEL, patched by the loader), so with logging off the verifier
// prunes these calls as dead code and they cost nothing.
use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    btf_maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{btf_map, cgroup_sock_addr, sk_lookup, sock_ops},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
    EbpfContext as _,
};
use aya_log_ebpf::{debug, error, warn};

/// Return values of cgroup sock_addr programs: 1 lets connect() proceed, 0 fails it with EPERM.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;

#[btf_map]
static ENROLLED_NETNS: HashMap<u64, EnrolledPod, MAX_ENROLLED_PODS> = HashMap::new();

#[btf_map]
static MESH_DESTINATIONS: HashMap<DestinationKey, MeshDestination, MAX_MESH_DESTINATIONS> =
    HashMap::new();

/// LRU: an entry whose socket never reaches established or close (connect() failed before a SYN
/// was sent) is evicted instead of staying forever.
#[btf_map]
static PENDING_CONNECTS: LruHashMap<u64, PendingConnect, MAX_TRACKED_CONNECTIONS> =
    LruHashMap::new();

#[btf_map]
static ORIGINAL_DESTINATIONS: LruHashMap<
    ConnectionKey,
    OriginalDestination,
    MAX_TRACKED_CONNECTIONS,
> = LruHashMap::new();

#[btf_map]
static INBOUND_PODS: HashMap<IpKey, InboundPod, MAX_ENROLLED_PODS> = HashMap::new();

#[btf_map]
static INBOUND_LISTENERS: SockHash<IpKey, MAX_ENROLLED_PODS> = SockHash::new();

#[btf_map]
static NODE_ADDRESSES: HashMap<IpKey, u32, MAX_NODE_ADDRESSES> = HashMap::new();

#[btf_map]
static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other CPU writes it, a plain add is enough.
        unsafe { *value += 1 };
    }
}

// ---------------------------------------------------------------------------------------------
// Outbound: connect4 / connect6
// ---------------------------------------------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn ambit_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let Some(pod) = enrolled_pod(&ctx) else {
        return ALLOW;
    };
    let ip = IpKey::from_v4_raw(sa.user_ip4);
    let port = u16::from_be(sa.user_port as u16);
    match capture(&ctx, pod, ip, port, AF_INET) {
        Capture::Pass => ALLOW,
        Capture::Redirect => {
            sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
            sa.user_port = u32::from(pod.outbound_port.to_be());
            ALLOW
        }
        Capture::Refuse => REJECT,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn ambit_connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let Some(pod) = enrolled_pod(&ctx) else {
        return ALLOW;
    };
    // Verifier: user_ip6 may only be read and written with 4-byte accesses, one word at a time.
    let ip = IpKey::from_v6_raw([
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ]);
    let port = u16::from_be(sa.user_port as u16);
    match capture(&ctx, pod, ip, port, AF_INET6) {
        Capture::Pass => ALLOW,
        Capture::Redirect => {
            // A v4-mapped destination travels as IPv4: send it to ::ffff:127.0.0.1, where the
            // IPv4 outbound listener is; a native IPv6 one to ::1.
            let loopback = if ip.is_v4_mapped() {
                IpKey::from_v4_raw(u32::from_ne_bytes([127, 0, 0, 1]))
            } else {
                IpKey::from_v6_raw([0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])])
            };
            sa.user_ip6[0] = loopback.words[0];
            sa.user_ip6[1] = loopback.words[1];
            sa.user_ip6[2] = loopback.words[2];
            sa.user_ip6[3] = loopback.words[3];
            sa.user_port = u32::from(pod.outbound_port.to_be());
            ALLOW
        }
        Capture::Refuse => REJECT,
    }
}

// ---------------------------------------------------------------------------------------------
// The tunnel's ports: bind4 / bind6
// ---------------------------------------------------------------------------------------------

/// An app in an enrolled pod may not bind the tunnel's ports in its netns. While the node is
/// down (its listeners closed, capture still attached) an app could otherwise take 15001 and
/// receive its neighbours' captured connections, take 15006/15008 and receive inbound traffic
/// meant for the tunnel, or make the node's re-enrollment fail. The node binds them from
/// outside the pod's cgroup, so this never applies to it.
#[cgroup_sock_addr(bind4)]
pub fn ambit_bind4(ctx: SockAddrContext) -> i32 {
    refuse_tunnel_ports(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn ambit_bind6(ctx: SockAddrContext) -> i32 {
    refuse_tunnel_ports(&ctx)
}

#[inline(always)]
fn refuse_tunnel_ports(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if port != OUTBOUND_PORT && port != INBOUND_PLAINTEXT_PORT && port != HBONE_PORT {
        return ALLOW;
    }
    if enrolled_pod(ctx).is_none() {
        return ALLOW;
    }
    count(Counter::BindRefused);
    warn!(ctx, "bind: port {} belongs to the tunnel, refused", port);
    REJECT
}

enum Capture {
    Pass,
    Redirect,
    Refuse,
}

/// The enrolled pod this socket's netns belongs to, if any. The program is attached only to
/// enrolled pods' cgroups; the netns check is what makes enrollment (and un-enrollment) take
/// effect atomically with one map write, and keeps a process that moved into the cgroup from
/// another netns out of capture.
#[inline(always)]
fn enrolled_pod(ctx: &SockAddrContext) -> Option<EnrolledPod> {
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    unsafe { ENROLLED_NETNS.get(cookie) }.copied()
}

#[inline(always)]
fn capture(ctx: &SockAddrContext, pod: EnrolledPod, ip: IpKey, port: u16, family: u16) -> Capture {
    // A pod's own loopback stays the pod's, also when every destination is captured (the
    // tunnel would only send it back): as ztunnel's rules leave `lo` alone.
    let capture_all = pod.flags & POD_FLAG_CAPTURE_ALL != 0 && !ip.is_loopback();
    if !capture_all && !is_mesh_destination(ip, port) {
        count(Counter::OutboundPassed);
        debug!(
            ctx,
            "outbound: port {} is not a mesh destination, passed", port
        );
        return Capture::Pass;
    }
    let pending = PendingConnect {
        original: OriginalDestination {
            ip,
            port,
            family,
            _pad: 0,
        },
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING_CONNECTS.insert(cookie, pending, 0).is_err() {
        // Without a recorded destination the tunnel could not forward it: fail the connect()
        // rather than let it go out uncaptured.
        count(Counter::Errors);
        error!(ctx, "outbound: PENDING_CONNECTS full, connect refused");
        return Capture::Refuse;
    }
    count(Counter::OutboundCaptured);
    debug!(
        ctx,
        "outbound: mesh destination port {} redirected to the tunnel", port
    );
    Capture::Redirect
}

#[inline(always)]
fn is_mesh_destination(ip: IpKey, port: u16) -> bool {
    let service = DestinationKey {
        ip,
        port,
        _pad: [0; 2],
    };
    let workload = DestinationKey {
        ip,
        port: 0,
        _pad: [0; 2],
    };
    unsafe { MESH_DESTINATIONS.get(service).is_some() || MESH_DESTINATIONS.get(workload).is_some() }
}

// ---------------------------------------------------------------------------------------------
// Outbound: sockops makes the original destination findable for the tunnel, and forgets it
// ---------------------------------------------------------------------------------------------

#[sock_ops]
pub fn ambit_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

/// A captured socket sends its SYN: ask for state callbacks so that a failed connect (refused,
/// tunnel down) removes its pending entry too.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if unsafe { PENDING_CONNECTS.get(cookie) }.is_some() {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(pending) = (unsafe { PENDING_CONNECTS.get(cookie) }).copied() else {
        return;
    };
    let key = connection_key(ctx, pending.netns_cookie);
    if ORIGINAL_DESTINATIONS
        .insert(key, pending.original, 0)
        .is_err()
    {
        count(Counter::Errors);
        return;
    }
    let _ = PENDING_CONNECTS.remove(cookie);
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    count(Counter::OriginalDestinationRecorded);
    debug!(
        ctx,
        "sockops: original destination recorded for app port {}", key.port
    );
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(pending) = (unsafe { PENDING_CONNECTS.get(cookie) }).copied() {
        let _ = PENDING_CONNECTS.remove(cookie);
        let _ = ORIGINAL_DESTINATIONS.remove(connection_key(ctx, pending.netns_cookie));
        return;
    }
    // Established captured sockets are keyed by netns cookie; bpf_get_netns_cookie in sock_ops
    // needs Linux 5.15 (Ambit's floor). Only sockets that asked for state callbacks get here.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let _ = ORIGINAL_DESTINATIONS.remove(connection_key(ctx, netns));
}

/// The app's end of the loopback hop, as the tunnel's accepted socket sees its peer.
#[inline(always)]
fn connection_key(ctx: &SockOpsContext, netns_cookie: u64) -> ConnectionKey {
    // Verifier workaround: when the v4 and v6 fields are read in two branches, LLVM sinks the
    // loads into one load through `ctx + select(28, 60)`, which the verifier rejects
    // ("dereference of modified ctx ptr"). So read every field unconditionally (each at a
    // constant offset; the unused family's fields read as zeros) and select the values.
    let ops = ctx.ops;
    let (family, v4, v6) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_v6(&(*ops).local_ip6),
        )
    };
    let ip = if family == u32::from(AF_INET) {
        IpKey::from_v4_raw(v4)
    } else {
        IpKey::from_v6_raw(v6)
    };
    ConnectionKey {
        netns_cookie,
        ip,
        // local_port is in host byte order (remote_port is not).
        port: unsafe { read_volatile(&(*ops).local_port) } as u16,
        _pad: [0; 6],
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound: sk_lookup steers plaintext connections to the tunnel's listener
// ---------------------------------------------------------------------------------------------

#[sk_lookup]
pub fn ambit_sk_lookup(ctx: SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    // Every field read unconditionally, at constant offsets: see `connection_key`.
    let (protocol, family, local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(&(*lookup).protocol),
            read_volatile(&(*lookup).family),
            read_volatile(&(*lookup).local_ip4),
            read_volatile(&(*lookup).remote_ip4),
            read_v6(&(*lookup).local_ip6),
            read_v6(&(*lookup).remote_ip6),
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let (local, remote) = if family == u32::from(AF_INET) {
        (IpKey::from_v4_raw(local4), IpKey::from_v4_raw(remote4))
    } else {
        (IpKey::from_v6_raw(local6), IpKey::from_v6_raw(remote6))
    };
    let local_port = unsafe { read_volatile(&(*lookup).local_port) };
    if unsafe { INBOUND_PODS.get(local) }.is_none() {
        return SK_PASS; // not an enrolled pod's address (e.g. loopback)
    }
    // HBONE has its own listener. A connection from the pod's own address is made inside the
    // pod: the app talking to itself, or the tunnel delivering to the app. Neither is captured.
    if local_port == u32::from(HBONE_PORT) || remote == local {
        count(Counter::InboundPassed);
        return SK_PASS;
    }
    // From the node: the kubelet's probes (and any host-network process, as Istio treats them).
    // They must reach the app whether or not the tunnel runs, or an agent restart fails every
    // liveness probe and the kubelet restarts healthy apps; and they are not mesh traffic, so
    // strict mTLS does not apply to them. Passing without a socket lets the kernel's own lookup
    // deliver to the app's listener, before the fail-closed drop below.
    //
    // How the node is recognised: the kubelet runs in the node's netns, so its connection to a
    // pod leaves through the pod's link with the node's address on that link as its source,
    // which is the pod's default gateway (the agent reads it from the pod's routes). Why another
    // pod cannot pass for it: it may put the gateway's address in a SYN, but this pod answers
    // the gateway (its SYN-ACK goes to the gateway's MAC, i.e. to the node, which resets it),
    // so the spoofer never completes the handshake and no byte reaches the app. A pod on
    // another node is routed back the same way. This is the trust istio-cni gives the address
    // it SNATs the kubelet's probes to (169.254.7.127), here without rewriting the source.
    if unsafe { NODE_ADDRESSES.get(remote) }.is_some() {
        count(Counter::InboundPassed);
        debug!(
            &ctx,
            "sk_lookup: port {} from the node, to the app", local_port
        );
        return SK_PASS;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, local, 0) {
        Ok(()) => {
            count(Counter::InboundCaptured);
            debug!(&ctx, "sk_lookup: port {} steered to the tunnel", local_port);
            SK_PASS
        }
        Err(_) => {
            // Enrolled but the tunnel's listener is gone (node process down): refuse, so that
            // plaintext never reaches the app around the tunnel.
            count(Counter::InboundRefused);
            warn!(
                &ctx,
                "sk_lookup: port {} refused, the tunnel is not listening", local_port
            );
            SK_DROP
        }
    }
}

/// Reads a `u32[4]` context field one word at a time (the verifier allows only 4-byte loads).
#[inline(always)]
unsafe fn read_v6(words: &[u32; 4]) -> [u32; 4] {
    unsafe {
        [
            read_volatile(&words[0]),
            read_volatile(&words[1]),
            read_volatile(&words[2]),
            read_volatile(&words[3]),
        ]
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
