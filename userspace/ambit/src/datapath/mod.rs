//! Userspace side of the kernel data path: loads the eBPF object (embedded in the binary),
//! adopts or creates the node's pinned maps, attaches the programs to one pod at a time, and
//! keeps the maps' contents equal to the desired state.

pub mod pins;
pub mod probe;

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Mutex},
};

use ambit_abi::{
    map_names as m, program_names as p, ConnectionKey, DeliveryKey, DestinationKey, EnrolledPod,
    FastPathCounter, InboundPod, IpKey, LoopbackKey, LoopbackState,
    MeshDestination as AbiMeshDestination, OriginalDestination, PendingConnect, DELIVERY_PRESENT,
    DESTINATION_KIND_SERVICE, DESTINATION_KIND_WORKLOAD, LOOPBACK_FELL_BACK, LOOPBACK_IN_MAP,
    LOOPBACK_REDIRECTED, NODE_ADDRESS_PRESENT,
};
use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, SkStorage, SockHash},
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr, Iter, SkLookup, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use tracing::{debug, info, warn};

use crate::{netns::Netns, observability::FastPathUse, state::MeshDestination};
pub use ambit_settings::{Capture, EbpfLogLevel, FastPath};
pub use pins::PinLayout;

/// cgroup programs attach through bpf_link (5.7+), and bpf_links on a cgroup always coexist
/// with other programs there (multi-attach is implied); the kernel rejects link_create with
/// the BPF_F_ALLOW_MULTI flag (EINVAL), so the mode passed to aya must be the flag-less one.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The compiled eBPF object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit"));

pub struct Datapath {
    ebpf: Ebpf,
    capture: Capture,
    pins: PinLayout,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    mesh: HashMap<MapData, DestinationKey, AbiMeshDestination>,
    inbound_pods: HashMap<MapData, IpKey, InboundPod>,
    inbound_listeners: SockHash<MapData, IpKey>,
    node_addresses: HashMap<MapData, IpKey, u32>,
    original_destinations: OriginalDestinations,
    deliveries: Deliveries,
    /// The fast path's maps, when it is on (`--fast-path on` on a kernel that has it).
    fast_path: Option<FastPathMaps>,
}

/// The fast path's maps. The sockhash is kept open for as long as the node runs: the sk_msg
/// program is attached to it, and a new node process starts its own.
struct FastPathMaps {
    _sockets: SockHash<MapData, LoopbackKey>,
    flags: LoopbackFlags,
}

impl Datapath {
    /// Loads the programs into the kernel and adopts (or creates and pins) the node's maps.
    /// `ebpf_log` turns on the programs' own log lines (aya-log) at that level and forwards
    /// them to this process's log.
    pub fn open(
        bpffs: &Path,
        node: &str,
        ebpf_log: EbpfLogLevel,
        capture: Capture,
        fast_path: FastPath,
    ) -> Result<Self> {
        if !pins::is_bpffs(bpffs) {
            bail!(
                "{} is not a bpf filesystem; mount it first: mount -t bpf bpf {}",
                bpffs.display(),
                bpffs.display()
            );
        }
        let features = probe::KernelFeatures::probe();
        features.require()?;
        if ebpf_log != EbpfLogLevel::Off && !features.has_ring_buffers() {
            bail!("--ebpf-log needs BPF ring buffers (Linux 5.8)");
        }
        let fast_path = fast_path == FastPath::On
            && match features.fast_path_unsafe() {
                None => true,
                Some(why) => {
                    warn!("the fast path is off on this kernel: {why}");
                    false
                }
            };
        let pins = PinLayout::new(bpffs, node)?;
        fs::create_dir_all(pins.pods_dir())
            .with_context(|| format!("creating {}", pins.pods_dir().display()))?;
        check_pinned_maps(&pins)?;

        let paths: Vec<(&str, std::path::PathBuf)> =
            m::ALL.iter().map(|name| (*name, pins.map(name))).collect();
        let mut loader = EbpfLoader::new();
        // The kernel's BTF the probe parsed: without it the loader reads and parses
        // /sys/kernel/btf/vmlinux (megabytes) a second time, a good part of a restart's gap.
        loader.btf(features.btf.as_ref());
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        // A load-time constant: with 0 the verifier removes the log calls entirely.
        let level = ebpf_log as u8;
        loader.override_global("AYA_LOG_LEVEL", &level, true);
        let fast_path_global = u8::from(fast_path);
        loader.override_global("FAST_PATH", &fast_path_global, true);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        for name in [p::CONNECT4, p::CONNECT6, p::BIND4, p::BIND6] {
            program::<CgroupSockAddr>(&mut ebpf, name)?
                .load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        program::<SockOps>(&mut ebpf, p::SOCKOPS)?
            .load()
            .with_context(|| format!("verifier rejected {}", p::SOCKOPS))?;
        program::<SkLookup>(&mut ebpf, p::SK_LOOKUP)?
            .load()
            .with_context(|| format!("verifier rejected {}", p::SK_LOOKUP))?;
        // iter/tcp programs are typed against the running kernel's BTF.
        let btf = features
            .btf
            .as_ref()
            .context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
        for name in [p::MARK_LISTENERS, p::UNMARK_SOCKETS] {
            program::<Iter>(&mut ebpf, name)?
                .load("tcp", btf)
                .with_context(|| format!("verifier rejected {name}"))?;
        }

        if fast_path {
            program::<SockOps>(&mut ebpf, p::TUNNEL_SOCKOPS)?
                .load()
                .with_context(|| format!("verifier rejected {}", p::TUNNEL_SOCKOPS))?;
            program::<SkMsg>(&mut ebpf, p::LOOPBACK_MSG)?
                .load()
                .with_context(|| format!("verifier rejected {}", p::LOOPBACK_MSG))?;
        }

        if ebpf_log != EbpfLogLevel::Off {
            forward_ebpf_logs(&mut ebpf)?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        let enrolled = HashMap::try_from(take(m::ENROLLED_NETNS)?)?;
        let mesh = HashMap::try_from(take(m::MESH_DESTINATIONS)?)?;
        let inbound_pods = HashMap::try_from(take(m::INBOUND_PODS)?)?;
        let inbound_listeners = SockHash::try_from(take(m::INBOUND_LISTENERS)?)?;
        let node_addresses = HashMap::try_from(take(m::NODE_ADDRESSES)?)?;
        let original_destinations = OriginalDestinations(Arc::new(HashMap::try_from(take(
            m::ORIGINAL_DESTINATIONS,
        )?)?));
        let deliveries = Deliveries(Arc::new(Mutex::new(HashMap::try_from(take(
            m::DELIVERIES,
        )?)?)));
        let fast_path = if fast_path {
            let sockets: SockHash<MapData, LoopbackKey> =
                SockHash::try_from(take(m::LOOPBACK_SOCKETS)?)?;
            let flags = LoopbackFlags(Arc::new(SkStorage::try_from(take(m::LOOPBACK_FLAGS)?)?));
            program::<SkMsg>(&mut ebpf, p::LOOPBACK_MSG)?
                .attach(sockets.fd())
                .with_context(|| format!("attaching {} to its sockhash", p::LOOPBACK_MSG))?;
            Some(FastPathMaps {
                _sockets: sockets,
                flags,
            })
        } else {
            None
        };
        info!(
            pins = %pins.root().display(),
            fast_path = fast_path.is_some(),
            "eBPF programs loaded"
        );
        Ok(Self {
            ebpf,
            capture,
            pins,
            enrolled,
            mesh,
            inbound_pods,
            inbound_listeners,
            node_addresses,
            original_destinations,
            deliveries,
            fast_path,
        })
    }

    /// The fast path's per-socket flags, when the fast path is on.
    pub fn loopback_flags(&self) -> Option<LoopbackFlags> {
        self.fast_path.as_ref().map(|f| f.flags.clone())
    }

    /// Attaches `ambit_tunnel_sockops` to the node process's own cgroup, so that the tunnel's
    /// ends of the loopback hops join the fast path. The link is not pinned: it belongs to this
    /// process and goes with it.
    pub fn attach_tunnel_cgroup(&mut self, cgroup: &File, path: &Path) -> Result<()> {
        if self.fast_path.is_none() {
            return Ok(());
        }
        program::<SockOps>(&mut self.ebpf, p::TUNNEL_SOCKOPS)?
            .attach(cgroup, LINK_MODE)
            .with_context(|| {
                format!(
                    "attaching {} to the node's own cgroup {}",
                    p::TUNNEL_SOCKOPS,
                    path.display()
                )
            })?;
        info!(cgroup = %path.display(), "fast path on");
        Ok(())
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    pub fn original_destinations(&self) -> OriginalDestinations {
        self.original_destinations.clone()
    }

    pub fn deliveries(&self) -> Deliveries {
        self.deliveries.clone()
    }

    /// Puts `APP_REPLY_MARK` on every listening socket in `netns` (those opened before the pod
    /// was enrolled; `ambit_sockops` marks those opened after).
    pub fn mark_listeners(&mut self, netns: &Netns) -> Result<()> {
        self.run_socket_iterator(p::MARK_LISTENERS, netns)
    }

    /// Takes `APP_REPLY_MARK` off every socket in `netns` (the pod leaves the mesh).
    pub fn unmark_sockets(&mut self, netns: &Netns) -> Result<()> {
        self.run_socket_iterator(p::UNMARK_SOCKETS, netns)
    }

    /// Runs an iter/tcp program over the TCP sockets of `netns`: the iterator walks the netns
    /// of the thread that creates it, so it is created from inside; reading it to the end runs
    /// the program once per socket.
    fn run_socket_iterator(&mut self, name: &str, netns: &Netns) -> Result<()> {
        let prog = program::<Iter>(&mut self.ebpf, name)?;
        let id = prog.attach().with_context(|| format!("attaching {name}"))?;
        let link = prog.take_link(id)?;
        let mut iterator = netns
            .run(|| link.into_file())?
            .with_context(|| format!("creating the {name} iterator"))?;
        std::io::copy(&mut iterator, &mut std::io::sink())
            .with_context(|| format!("running {name} in {}", netns.path().display()))?;
        Ok(())
    }

    /// Attaches the capture programs to a pod's cgroup and netns and pins the links.
    ///
    /// Make-before-break: a link pinned by an earlier node process is replaced only after the
    /// new one is attached, so capture never has a gap. (For a moment both run; the second sees
    /// an already-rewritten destination, which is not a mesh destination, and passes.)
    pub fn attach_pod(&mut self, pod: &str, cgroup: &File, netns: &Netns) -> Result<()> {
        let dir = self.pins.pod_dir(pod);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // sock_ops marks the app's listeners (delivery from the client's address), whatever
        // captures the pod's outbound connections.
        self.attach_sock_ops(pod, cgroup)?;
        if self.capture == Capture::Iptables {
            // No outbound capture of our own: drop any left by an earlier `--capture ebpf` run.
            for name in [p::CONNECT4, p::CONNECT6] {
                match fs::remove_file(dir.join(name)) {
                    Err(e) if e.kind() != ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("unpinning {name} of {pod}"))
                    }
                    _ => {}
                }
            }
        } else {
            self.attach_outbound_capture(pod, cgroup)?;
        }
        // The tunnel's ports are the pod's to keep out of, whatever captures its traffic.
        for name in [p::BIND4, p::BIND6] {
            self.attach_sock_addr(pod, cgroup, name)?;
        }
        let prog = program::<SkLookup>(&mut self.ebpf, p::SK_LOOKUP)?;
        let id = prog
            .attach(netns)
            .with_context(|| format!("attaching {} to the netns of {pod}", p::SK_LOOKUP))?;
        let link: FdLink = prog.take_link(id)?.into();
        replace_pin(&dir, p::SK_LOOKUP, link)?;
        debug!(pod, "programs attached");
        Ok(())
    }

    /// Attaches one cgroup/{connect,bind}{4,6} program to a pod's cgroup and pins its link.
    fn attach_sock_addr(&mut self, pod: &str, cgroup: &File, name: &str) -> Result<()> {
        let prog = program::<CgroupSockAddr>(&mut self.ebpf, name)?;
        let id = prog
            .attach(cgroup, LINK_MODE)
            .with_context(|| format!("attaching {name} to the cgroup of {pod}"))?;
        let link = FdLink::try_from(prog.take_link(id)?)
            .map_err(|e| anyhow!("{name}: no bpf_link (kernel older than 5.7?): {e}"))?;
        replace_pin(&self.pins.pod_dir(pod), name, link)
    }

    fn attach_outbound_capture(&mut self, pod: &str, cgroup: &File) -> Result<()> {
        for name in [p::CONNECT4, p::CONNECT6] {
            self.attach_sock_addr(pod, cgroup, name)?;
        }
        Ok(())
    }

    fn attach_sock_ops(&mut self, pod: &str, cgroup: &File) -> Result<()> {
        let dir = self.pins.pod_dir(pod);
        let prog = program::<SockOps>(&mut self.ebpf, p::SOCKOPS)?;
        let id = prog
            .attach(cgroup, LINK_MODE)
            .with_context(|| format!("attaching {} to the cgroup of {pod}", p::SOCKOPS))?;
        let link = FdLink::try_from(prog.take_link(id)?)
            .map_err(|e| anyhow!("{}: no bpf_link: {e}", p::SOCKOPS))?;
        replace_pin(&dir, p::SOCKOPS, link)
    }

    /// Detaches a pod's programs by removing their pins (the links have no other owner).
    pub fn detach_pod(&mut self, pod: &str) -> Result<()> {
        let dir = self.pins.pod_dir(pod);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", dir.display()))
            }
            _ => Ok(()),
        }
    }

    /// Turns capture on for a netns: the last step of enrollment.
    pub fn enroll_netns(&mut self, cookie: u64, pod: EnrolledPod) -> Result<()> {
        self.enrolled
            .insert(cookie, pod, 0)
            .context("writing ENROLLED_NETNS")
    }

    /// Turns capture off for a netns: the first step of un-enrollment.
    pub fn unenroll_netns(&mut self, cookie: u64) -> Result<()> {
        ignore_missing(self.enrolled.remove(&cookie)).context("removing from ENROLLED_NETNS")
    }

    pub fn enrolled_netns(&self) -> Result<Vec<u64>> {
        Ok(self.enrolled.keys().collect::<Result<_, _>>()?)
    }

    /// Registers a pod IP for inbound capture, with the tunnel's plaintext listener for it.
    pub fn enroll_inbound(&mut self, ip: IpAddr, listener: &impl AsRawFd) -> Result<()> {
        let key = ip_key(ip);
        self.inbound_listeners
            .insert(key, listener.as_raw_fd(), 0)
            .with_context(|| format!("writing INBOUND_LISTENERS[{ip}]"))?;
        self.inbound_pods
            .insert(key, InboundPod::default(), 0)
            .with_context(|| format!("writing INBOUND_PODS[{ip}]"))
    }

    pub fn unenroll_inbound(&mut self, ip: IpAddr) -> Result<()> {
        let key = ip_key(ip);
        ignore_missing(self.inbound_pods.remove(&key))?;
        ignore_missing(self.inbound_listeners.remove(&key))?;
        Ok(())
    }

    pub fn inbound_pods(&self) -> Result<Vec<IpKey>> {
        Ok(self.inbound_pods.keys().collect::<Result<_, _>>()?)
    }

    /// Makes `NODE_ADDRESSES` equal to `desired`: the node's addresses as its enrolled pods see
    /// them, whose connections to those pods go to the app around the tunnel (kubelet probes).
    pub fn sync_node_addresses(&mut self, desired: &BTreeSet<IpAddr>) -> Result<()> {
        let want: BTreeSet<[u32; 4]> = desired.iter().map(|ip| ip_key(*ip).words).collect();
        let have: Vec<IpKey> = self.node_addresses.keys().collect::<Result<_, _>>()?;
        for key in &have {
            if !want.contains(&key.words) {
                ignore_missing(self.node_addresses.remove(key))?;
                debug!(address = %ip_from_key(*key), "node address removed");
            }
        }
        for ip in desired {
            let key = ip_key(*ip);
            if !have.contains(&key) {
                self.node_addresses
                    .insert(key, NODE_ADDRESS_PRESENT, 0)
                    .with_context(|| format!("writing NODE_ADDRESSES[{ip}]"))?;
                debug!(address = %ip, "node address added");
            }
        }
        Ok(())
    }

    pub fn node_addresses(&self) -> Result<Vec<IpAddr>> {
        Ok(self
            .node_addresses
            .keys()
            .map(|k| k.map(ip_from_key))
            .collect::<Result<_, _>>()?)
    }

    /// Makes `MESH_DESTINATIONS` equal to `desired`: adds what is missing, removes the rest.
    /// Writes `desired` into `MESH_DESTINATIONS` (removing what is no longer wanted first).
    /// Returns how many did not fit (the map holds [`ambit_abi::MAX_MESH_DESTINATIONS`]): the
    /// kernel does not capture connections to those by itself.
    pub fn sync_mesh_destinations(&mut self, desired: &BTreeSet<MeshDestination>) -> Result<usize> {
        let want: std::collections::BTreeMap<_, _> = desired
            .iter()
            .map(|d| {
                let (key, kind) = destination_entry(*d);
                ((key.ip.words, key.port), (key, kind))
            })
            .collect();
        let have: Vec<DestinationKey> = self.mesh.keys().collect::<Result<_, _>>()?;
        let mut removed = 0;
        for key in have {
            if !want.contains_key(&(key.ip.words, key.port)) {
                ignore_missing(self.mesh.remove(&key))?;
                removed += 1;
            }
        }
        let mut not_written = 0;
        for (key, kind) in want.values() {
            let value = AbiMeshDestination {
                kind: *kind,
                _pad: 0,
            };
            if self.mesh.get(key, 0).ok() != Some(value) {
                match self.mesh.insert(key, value, 0) {
                    Ok(()) => {}
                    // E2BIG: the map is full.
                    Err(aya::maps::MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                    {
                        not_written += 1
                    }
                    Err(e) => return Err(e).context("writing MESH_DESTINATIONS"),
                }
            }
        }
        debug!(
            total = want.len(),
            removed, not_written, "mesh destinations synced"
        );
        Ok(not_written)
    }
}

/// Reads the programs' log ring buffer and writes each record to this process's log. The
/// records are written at INFO whatever their eBPF level (the level is a field): asking for
/// `--ebpf-log debug` must show them without also changing RUST_LOG.
fn forward_ebpf_logs(ebpf: &mut Ebpf) -> Result<()> {
    struct ToTracing;
    impl log::Log for ToTracing {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            info!(target: "ambit_ebpf", level = %record.level(), "{}", record.args());
        }
        fn flush(&self) {}
    }
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, ToTracing)
        .context("starting the eBPF log reader")?;
    // SAFETY: the AsyncFd owns the logger, and so the ring buffer fd, for as long as it is
    // registered.
    let mut logger = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow!("registering the eBPF log reader: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Pins `link` as `dir/name`, replacing (and so detaching) whatever link was pinned there.
fn replace_pin(dir: &Path, name: &str, link: FdLink) -> Result<()> {
    let final_path = dir.join(name);
    // bpffs refuses names with a dot.
    let new_path = dir.join(format!("{name}_new"));
    let _ = fs::remove_file(&new_path);
    link.pin(&new_path)
        .with_context(|| format!("pinning {}", new_path.display()))?;
    // rename(2) over the old pin drops its reference: the old link detaches here, after the new
    // one is already attached.
    fs::rename(&new_path, &final_path).with_context(|| {
        format!(
            "renaming {} to {}",
            new_path.display(),
            final_path.display()
        )
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    program
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// Every map of the eBPF object: its name (`ambit_abi::map_names`) and the key and value sizes
/// this userspace reads it with. A test (tests/bpftool.rs) holds it against what the kernel
/// made from the eBPF crate's statics.
pub fn map_layout() -> [(&'static str, usize, usize); 10] {
    use std::mem::size_of;
    [
        (
            m::ENROLLED_NETNS,
            size_of::<u64>(),
            size_of::<EnrolledPod>(),
        ),
        (
            m::MESH_DESTINATIONS,
            size_of::<DestinationKey>(),
            size_of::<AbiMeshDestination>(),
        ),
        (
            m::PENDING_CONNECTS,
            size_of::<u64>(),
            size_of::<PendingConnect>(),
        ),
        (
            m::ORIGINAL_DESTINATIONS,
            size_of::<ConnectionKey>(),
            size_of::<OriginalDestination>(),
        ),
        (m::INBOUND_PODS, size_of::<IpKey>(), size_of::<InboundPod>()),
        (m::INBOUND_LISTENERS, size_of::<IpKey>(), size_of::<u32>()),
        (m::COUNTERS, size_of::<u32>(), size_of::<u64>()),
        (m::NODE_ADDRESSES, size_of::<IpKey>(), size_of::<u32>()),
        (m::DELIVERIES, size_of::<DeliveryKey>(), size_of::<u32>()),
        (m::FAST_PATH_COUNTERS, size_of::<u32>(), size_of::<u64>()),
    ]
}

/// A pinned map from an older (or newer) Ambit with another layout must not be adopted: the
/// programs would read it with the wrong layout.
fn check_pinned_maps(pins: &PinLayout) -> Result<()> {
    let expected = map_layout();
    for (name, key, value) in expected {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|map| map.info())
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        if info.key_size() as usize != key || info.value_size() as usize != value {
            bail!(
                "pinned map {} has key/value sizes {}/{} but this Ambit expects {key}/{value}: it \
                 was made by another Ambit version. Remove the node's pins with `ambit reset \
                 --node <node>` and start again.",
                path.display(),
                info.key_size(),
                info.value_size()
            );
        }
        // COUNTERS grows when a program learns to count something new (bind_refused did): an
        // older, shorter array would be adopted as is and the new counters silently lost.
        let counters = match name {
            m::COUNTERS => Some(ambit_abi::Counter::COUNT),
            m::FAST_PATH_COUNTERS => Some(FastPathCounter::COUNT),
            _ => None,
        };
        if let Some(count) = counters.filter(|count| info.max_entries() != *count) {
            bail!(
                "pinned map {} has {} counters but this Ambit counts {}: it was made by another \
                 Ambit version. Remove the node's pins with `ambit reset --node <node>` and start \
                 again.",
                path.display(),
                info.max_entries(),
                count
            );
        }
    }
    Ok(())
}

fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<()> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.kind() == ErrorKind::NotFound => {
            Ok(())
        }
        other => Ok(other?),
    }
}

pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey::from_octets(v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => IpKey::from_octets(v6.octets()),
    }
}

pub fn ip_from_key(key: IpKey) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(key.octets());
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn destination_entry(d: MeshDestination) -> (DestinationKey, u32) {
    let (ip, port, kind) = match d {
        MeshDestination::Workload(ip) => (ip, 0, DESTINATION_KIND_WORKLOAD),
        MeshDestination::Service(sa) => (sa.ip(), sa.port(), DESTINATION_KIND_SERVICE),
    };
    (
        DestinationKey {
            ip: ip_key(ip),
            port,
            _pad: [0; 2],
        },
        kind,
    )
}

/// Read-only handle on `ORIGINAL_DESTINATIONS`, shared with the proxy.
#[derive(Clone)]
pub struct OriginalDestinations(Arc<HashMap<MapData, ConnectionKey, OriginalDestination>>);

impl OriginalDestinations {
    /// The destination the app connected to, for a connection the tunnel accepted from `peer`
    /// on its outbound listener in the netns with `netns_cookie`.
    pub fn lookup(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = ConnectionKey {
            netns_cookie,
            ip: ip_key(peer.ip()),
            port: peer.port(),
            _pad: [0; 6],
        };
        let orig = self.0.get(&key, 0).ok()?;
        Some(SocketAddr::new(ip_from_key(orig.ip), orig.port))
    }
}

/// Handle on `DELIVERIES`, shared with the proxy: the tunnel announces each connection it opens
/// to an app from the client's address, so that `ambit_sk_lookup` lets it through.
#[derive(Clone)]
pub struct Deliveries(Arc<Mutex<HashMap<MapData, DeliveryKey, u32>>>);

impl Deliveries {
    /// Announces the connection `client` → `pod` until the returned guard is dropped.
    pub fn announce(&self, client: SocketAddr, pod: SocketAddr) -> Result<Announced> {
        let key = DeliveryKey {
            pod: ip_key(pod.ip()),
            client: ip_key(client.ip()),
            pod_port: pod.port(),
            client_port: client.port(),
        };
        self.0
            .lock()
            .unwrap()
            .insert(key, DELIVERY_PRESENT, 0)
            .context("writing DELIVERIES")?;
        Ok(Announced {
            deliveries: self.0.clone(),
            key,
        })
    }
}

/// A delivery announced in `DELIVERIES`; removed on drop.
pub struct Announced {
    deliveries: Arc<Mutex<HashMap<MapData, DeliveryKey, u32>>>,
    key: DeliveryKey,
}

impl Drop for Announced {
    fn drop(&mut self) {
        let _ = self.deliveries.lock().unwrap().remove(&self.key);
    }
}

/// Read-only handle on `LOOPBACK_FLAGS`, shared with the proxy: what the fast path did with
/// one of the tunnel's sockets.
#[derive(Clone)]
pub struct LoopbackFlags(Arc<SkStorage<MapData, LoopbackState>>);

impl LoopbackFlags {
    /// One map lookup (a syscall), keyed by the socket itself.
    pub fn of(&self, socket: &impl AsRawFd) -> FastPathUse {
        let flags = self.0.get(socket, 0).map_or(0, |state| state.flags);
        if flags & LOOPBACK_FELL_BACK != 0 {
            FastPathUse::FellBack
        } else if flags & (LOOPBACK_IN_MAP | LOOPBACK_REDIRECTED) != 0 {
            FastPathUse::Yes
        } else {
            FastPathUse::No
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_keys_round_trip_for_both_families() {
        for ip in ["10.1.2.3", "fd00::1", "::ffff:10.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let back = ip_from_key(ip_key(ip));
            // A v4-mapped v6 address comes back as the IPv4 address it stands for.
            assert_eq!(back, ip.to_canonical());
        }
        assert!(ip_key("10.1.2.3".parse().unwrap()).is_v4_mapped());
    }

    #[test]
    fn ip_key_matches_the_kernels_v4_layout() {
        // connect4 builds keys from user_ip4: network-order bytes in a u32.
        let raw = u32::from_ne_bytes([10, 1, 2, 3]);
        assert_eq!(ip_key("10.1.2.3".parse().unwrap()), IpKey::from_v4_raw(raw));
    }
}
