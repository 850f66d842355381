//! Ambit's kernel side. Four programs, all attached per enrolled pod (never to host interfaces):
//!
//! - `ambit_connect4` / `ambit_connect6` (cgroup/connect4, cgroup/connect6 on the pod's cgroup):
//!   a connect() from an enrolled netns to a mesh destination is rewritten to the tunnel's
//!   outbound listener on loopback in the same netns; the original destination is remembered
//!   under the socket's cookie.
//! - `ambit_sockops` (sock_ops on the pod's cgroup): when that socket is established, its
//!   original destination is re-keyed by what the tunnel's accepted socket can see (netns
//!   cookie + the app's loopback address and port); both entries are removed when it closes.
//!   And when the app listens, its socket gets `APP_REPLY_MARK` (see "Delivery" below).
//! - `ambit_sk_lookup` (sk_lookup on the pod's netns): a new inbound TCP connection to the pod's
//!   IP is handed to the tunnel's plaintext listener, which sees the original destination as its
//!   local address; one from the node (the kubelet's probes) goes to the app's own listener,
//!   and so does the tunnel's own delivery of a connection (announced in `DELIVERIES`).
//! - `ambit_mark_listeners` / `ambit_unmark_sockets` (iter/tcp, run by the agent inside a pod's
//!   netns at enrollment and un-enrollment): put the mark on listeners that existed before the
//!   pod was enrolled, and take it off every socket when it leaves.
//! - The fast path (`--fast-path on`, see "Fast path" below): `ambit_sockops` and
//!   `ambit_tunnel_sockops` (sock_ops on the node process's own cgroup) add both ends of each
//!   loopback hop to `LOOPBACK_SOCKETS`, and `ambit_loopback_msg` (sk_msg on that map) moves
//!   each write straight into the other end's receive queue, skipping loopback TCP.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use ambit_abi::{
    ConnectionKey, Counter, DeliveryKey, DestinationKey, EnrolledPod, FastPathCounter, InboundPod,
    IpKey, LoopbackKey, LoopbackState, MeshDestination, OriginalDestination, PendingConnect,
    AF_INET, AF_INET6, APP_REPLY_MARK, APP_REPLY_MARK_MASK, HBONE_PORT, INBOUND_PLAINTEXT_PORT,
    LOOPBACK_BUDGET, LOOPBACK_FELL_BACK, LOOPBACK_IN_MAP, LOOPBACK_REDIRECTED, MAX_DELIVERIES,
    MAX_ENROLLED_PODS, MAX_LOOPBACK_SOCKETS, MAX_MESH_DESTINATIONS, MAX_NODE_ADDRESSES,
    MAX_TRACKED_CONNECTIONS, OUTBOUND_PORT, POD_FLAG_CAPTURE_ALL,
};
// eBPF-side logging (aya-log): off unless the node is started with --ebpf-log. The level is a
// load-time constant (AYA_LOG_LEVEL, patched by the loader), so with logging off the verifier
// prunes these calls as dead code and they cost nothing.
use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        BPF_F_INGRESS, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, SOL_SOCKET, SO_MARK,
    },
    btf_maps::{HashMap, LruHashMap, PerCpuArray, SkStorage, SockHash},
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt, bpf_setsockopt,
        bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock_addr, sk_lookup, sk_msg, sock_ops},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext},
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
static DELIVERIES: LruHashMap<DeliveryKey, u32, MAX_DELIVERIES> = LruHashMap::new();

#[btf_map]
static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
static FAST_COUNTERS: PerCpuArray<u64, { FastPathCounter::COUNT as usize }> = PerCpuArray::new();

/// Both ends of every loopback hop on the fast path, by `LoopbackKey`.
#[btf_map]
static LOOPBACK_SOCKS: SockHash<LoopbackKey, MAX_LOOPBACK_SOCKETS> = SockHash::new();

/// Each socket in `LOOPBACK_SOCKS`: what the fast path did with it, and its peer's key.
/// Socket-local storage, freed with the socket, readable by the tunnel for its own sockets.
#[btf_map]
static LOOPBACK_FLAGS: SkStorage<LoopbackState> = SkStorage::new();

/// Load-time constant (patched by the loader): 1 when the node runs with `--fast-path on`.
/// With 0 no socket is ever added to `LOOPBACK_SOCKS`, and the verifier prunes the code.
#[unsafe(no_mangle)]
static FAST_PATH: u8 = 0;

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other CPU writes it, a plain add is enough.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn count_fast(counter: FastPathCounter) {
    if let Some(value) = FAST_COUNTERS.get_ptr_mut(counter as u32) {
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
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // The app accepted the tunnel's delivery: its end of the server-side hop.
            if is_delivery(&ctx, Side::Pod) {
                add_loopback_socket(&ctx);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
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
    // The app's end of the client-side hop (to the tunnel's outbound listener).
    add_loopback_socket(ctx);
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

/// The app starts listening: mark the socket, so that the connections it accepts from the
/// tunnel's transparent deliveries (and their SYN-ACKs) are routed back to the tunnel by the
/// pod's delivery rule. The kernel calls this for every listen(), whatever the socket's flags.
/// No ENROLLED_NETNS check: the program is attached to the pod's cgroup before the agent marks
/// the listeners already open, so that none is missed; a mark is inert in a netns without the
/// delivery rule.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    set_reply_mark(ctx.as_ptr(), true);
}

/// Sets (or clears) Ambit's bits of a full socket's mark, keeping the others.
#[inline(always)]
fn set_reply_mark(sk: *mut core::ffi::c_void, on: bool) {
    let mut mark: u32 = 0;
    // bpf_getsockopt(SO_MARK) may be refused on an older kernel: the mark is then taken as 0.
    let got = unsafe {
        bpf_getsockopt(
            sk,
            SOL_SOCKET as i32,
            SO_MARK as i32,
            &mut mark as *mut u32 as *mut _,
            4,
        )
    };
    if got != 0 {
        mark = 0;
    }
    let mut new = mark & !APP_REPLY_MARK_MASK;
    if on {
        new |= APP_REPLY_MARK;
    } else if mark & APP_REPLY_MARK_MASK != APP_REPLY_MARK {
        return; // not ours
    }
    if new == mark {
        return;
    }
    let set = unsafe {
        bpf_setsockopt(
            sk,
            SOL_SOCKET as i32,
            SO_MARK as i32,
            &mut new as *mut u32 as *mut _,
            4,
        )
    };
    if set != 0 {
        count(Counter::Errors);
    }
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
    // The tunnel's own delivery of a connection to the app, from the client's address: it
    // announced the exact connection just before its connect().
    // Kernel-version note: until 5.19 `remote_port` was a u32 holding the port in network order
    // in its first two bytes (little-endian); since then a __be16 with 16 bits of padding. A
    // 2-byte load at its offset reads the same port on both (a narrow ctx load, which the
    // verifier allows either way).
    let remote_port = u16::from_be(unsafe { read_volatile(&(*lookup).remote_port) });
    let delivery = DeliveryKey {
        pod: local,
        client: remote,
        pod_port: local_port as u16,
        client_port: remote_port,
    };
    if unsafe { DELIVERIES.get(delivery) }.is_some() {
        count(Counter::InboundPassed);
        debug!(
            &ctx,
            "sk_lookup: port {} delivered by the tunnel", local_port
        );
        return SK_PASS;
    }
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

// ---------------------------------------------------------------------------------------------
// Delivery: the marks of sockets that existed before enrollment, and after it
// ---------------------------------------------------------------------------------------------

/// The context of an iter/tcp program (`struct bpf_iter__tcp`). The verifier types
/// `sk_common` from the kernel's BTF: a `struct sock_common *`, or null at the end.
#[repr(C)]
pub struct IterTcp {
    meta: *mut core::ffi::c_void,
    sk_common: *mut u8,
    uid: u32,
}

/// `skc_state` in `struct sock_common`: after the address pair (8 bytes), the hash (4), the
/// port pair (4) and the family (2). Rust eBPF has no CO-RE field relocations, so the offset is
/// fixed; it has been 18 in every kernel since sock_common's layout settled (before 4.0), and
/// the verifier checks it against the running kernel's BTF (a wrong offset fails the load).
const SKC_STATE_OFFSET: usize = 18;
/// `skc_num`, the local port in host byte order: after the address pair, the hash and
/// `skc_dport`.
const SKC_NUM_OFFSET: usize = 14;
const TCP_LISTEN: u8 = 10;

/// Run by the agent inside a pod's netns right after enrolling it: marks the listeners that
/// were open before (`ambit_sockops` marks those opened after). iter/tcp may call
/// bpf_setsockopt since Linux 5.15.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn ambit_mark_listeners(ctx: &IterTcp) -> i32 {
    let sk = ctx.sk_common;
    if sk.is_null() {
        return 0;
    }
    let state = unsafe { read_volatile(sk.add(SKC_STATE_OFFSET)) };
    // The tunnel's own listeners in the pod (made by the node, outside the pod's cgroup, so
    // sock_ops never sees them) must not be marked: their replies go to the network. The
    // tunnel's ports are the tunnel's alone in an enrolled pod (`ambit_bind4/6`).
    let port = unsafe { read_volatile(sk.add(SKC_NUM_OFFSET) as *const u16) };
    if state == TCP_LISTEN
        && port != OUTBOUND_PORT
        && port != INBOUND_PLAINTEXT_PORT
        && port != HBONE_PORT
    {
        set_reply_mark(sk as *mut _, true);
    }
    0
}

/// Run by the agent inside a pod's netns when it leaves the mesh: takes Ambit's mark off every
/// socket that has it (listeners and the connections they accepted). Sockets that are not full
/// sockets (TIME_WAIT, SYN_RECV) refuse bpf_setsockopt; they carry no mark to route by.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn ambit_unmark_sockets(ctx: &IterTcp) -> i32 {
    let sk = ctx.sk_common;
    if sk.is_null() {
        return 0;
    }
    set_reply_mark(sk as *mut _, false);
    0
}

// ---------------------------------------------------------------------------------------------
// Fast path: the loopback hops without loopback TCP
// ---------------------------------------------------------------------------------------------
//
// Each captured connection crosses loopback twice: app → tunnel in the client's pod, tunnel →
// app in the server's. Both ends of each hop go into LOOPBACK_SOCKS when they are established,
// and ambit_loopback_msg hands every write of one end to the other end's receive queue
// (bpf_msg_redirect_hash with BPF_F_INGRESS): no segments, no ACKs, no softirq.
//
// The key is the netns, the four-tuple and both initial sequence numbers (see LoopbackKey: a
// four-tuple alone can belong to two open sockets, one of them in TIME_WAIT). sk_msg cannot
// read sequence numbers, so sock_ops stores each socket's peer key in its LOOPBACK_FLAGS.
//
// Order is the one thing to guard. A socket's reads return what was redirected to it before
// what came through TCP, so a receiver must never get both: if a write finds no peer in the
// map (the peer's handshake not yet processed, under load), it goes through TCP and so does
// every later write of that socket (LOOPBACK_FELL_BACK, sticky). And a socket that already
// received bytes through TCP before it was established (TCP Fast Open data in the SYN) is not
// added at all.

/// Sock_ops on the node process's own cgroup: the tunnel's ends of the hops. Its accepted
/// sockets on a pod's outbound listener (client side), and its delivery sockets (server side,
/// announced in `DELIVERIES` around their connect()).
#[sock_ops]
pub fn ambit_tunnel_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            let Some(pod) = (unsafe { ENROLLED_NETNS.get(netns) }).copied() else {
                return 1;
            };
            if ctx.local_port() == u32::from(pod.outbound_port) {
                add_loopback_socket(&ctx);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB if is_delivery(&ctx, Side::Tunnel) => {
            add_loopback_socket(&ctx);
        }
        _ => {}
    }
    1
}

/// Which end of a delivery a sock_ops callback sees.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The tunnel's socket: local = the client's address, remote = the app.
    Tunnel,
    /// The app's accepted socket: local = the app, remote = the client's address.
    Pod,
}

#[inline(always)]
fn is_delivery(ctx: &SockOpsContext, side: Side) -> bool {
    if unsafe { read_volatile(&FAST_PATH) } == 0 {
        return false;
    }
    let key = sock_ops_key(ctx, 0);
    let (pod, pod_port, client, client_port) = if side == Side::Pod {
        (key.local, key.local_port, key.remote, key.remote_port)
    } else {
        (key.remote, key.remote_port, key.local, key.local_port)
    };
    let delivery = DeliveryKey {
        pod,
        client,
        pod_port,
        client_port,
    };
    unsafe { DELIVERIES.get(delivery) }.is_some()
}

/// Adds an established loopback socket to `LOOPBACK_SOCKS`, with its flags.
#[inline(always)]
fn add_loopback_socket(ctx: &SockOpsContext) {
    if unsafe { read_volatile(&FAST_PATH) } == 0 {
        return;
    }
    let ops = ctx.ops;
    // Bytes already received through TCP (Fast Open data in the SYN) would be read after the
    // ones redirected later: such a connection stays off the fast path.
    if unsafe { read_volatile(&(*ops).bytes_received) } != 0 {
        count_fast(FastPathCounter::SocketSkipped);
        return;
    }
    let sk = unsafe { (*ops).__bindgen_anon_2.sk };
    // Verifier: `sk` in sock_ops is "sock_or_null" (a request socket has none), and helpers
    // taking a socket need it checked first.
    if sk.is_null() {
        return;
    }
    // Kernel note: bpf_sk_storage_get in sock_ops needs `sk` in bpf_sock_ops (5.10); the node
    // turns the fast path off where it is missing (datapath::probe).
    let state = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&LOOPBACK_FLAGS).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    } as *mut LoopbackState;
    if state.is_null() {
        // Without its state a socket's writes could not find the peer, nor fall back for good.
        count_fast(FastPathCounter::SocketSkipped);
        return;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = sock_ops_key(ctx, netns);
    unsafe {
        (*state).peer = key.peer();
        (*state).flags = 0;
        (*state).redirected = 0;
    }
    // SAFETY: the context is the `bpf_sock_ops` the kernel passed in.
    if LOOPBACK_SOCKS
        .update(key, unsafe { &mut *ops }, u64::from(BPF_NOEXIST))
        .is_err()
    {
        count_fast(FastPathCounter::SocketSkipped);
        return;
    }
    unsafe { (*state).flags = LOOPBACK_IN_MAP };
    count_fast(FastPathCounter::SocketAdded);
}

/// A sock_ops socket's `LoopbackKey`, at establishment (the IPv4 and IPv6 fields are all read
/// unconditionally, at constant offsets: see `connection_key`). `local_port` is in host byte
/// order; `remote_port` holds the port in network byte order in its upper 16 bits on little-
/// endian (the kernel shifts `skc_dport` left by 16), so `u32::from_be` gives the port. When
/// the handshake completes and no data has moved, `snd_una` is this end's ISN + 1 and
/// `rcv_nxt` the other end's.
#[inline(always)]
fn sock_ops_key(ctx: &SockOpsContext, netns_cookie: u64) -> LoopbackKey {
    let ops = ctx.ops;
    let (family, local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_volatile(&(*ops).remote_ip4),
            read_v6(&(*ops).local_ip6),
            read_v6(&(*ops).remote_ip6),
        )
    };
    let (local_port, remote_port, snd_una, rcv_nxt) = unsafe {
        (
            read_volatile(&(*ops).local_port),
            read_volatile(&(*ops).remote_port),
            read_volatile(&(*ops).snd_una),
            read_volatile(&(*ops).rcv_nxt),
        )
    };
    let (local, remote) = if family == u32::from(AF_INET) {
        (IpKey::from_v4_raw(local4), IpKey::from_v4_raw(remote4))
    } else {
        (IpKey::from_v6_raw(local6), IpKey::from_v6_raw(remote6))
    };
    LoopbackKey {
        netns_cookie,
        local,
        remote,
        local_port: local_port as u16,
        remote_port: u32::from_be(remote_port) as u16,
        local_seq: snd_una,
        remote_seq: rcv_nxt,
        _pad: 0,
    }
}

/// sk_msg on `LOOPBACK_SOCKS`: runs for every write (sendmsg, sendfile, splice) of a socket in
/// the map, before TCP sees it.
#[sk_msg]
pub fn ambit_loopback_msg(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    let sk = unsafe { (*msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return SK_PASS;
    }
    let state = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&LOOPBACK_FLAGS).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    } as *mut LoopbackState;
    if state.is_null() {
        return SK_PASS; // not added by us: leave it to TCP
    }
    if unsafe { (*state).flags } & LOOPBACK_FELL_BACK != 0 {
        count_fast(FastPathCounter::Passed);
        return SK_PASS;
    }
    // The budget bounds what the peer can have queued unread (no backpressure: see
    // LOOPBACK_BUDGET). Past it, this write and every later one go through TCP.
    let size = u64::from(ctx.size());
    if unsafe { (*state).redirected } + size > LOOPBACK_BUDGET {
        unsafe { (*state).flags |= LOOPBACK_FELL_BACK };
        count_fast(FastPathCounter::Passed);
        return SK_PASS;
    }
    let mut peer = unsafe { (*state).peer };
    // The helper returns SK_DROP (and redirects nothing) when the peer is not in the map;
    // the program's own SK_PASS then sends the bytes through TCP.
    if LOOPBACK_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS)
    {
        unsafe {
            (*state).flags |= LOOPBACK_REDIRECTED;
            (*state).redirected += size;
        }
        count_fast(FastPathCounter::Redirected);
    } else {
        unsafe { (*state).flags |= LOOPBACK_FELL_BACK };
        count_fast(FastPathCounter::Passed);
    }
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
