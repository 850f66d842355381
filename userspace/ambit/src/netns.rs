//! Network namespaces: the tunnel's sockets for a pod are created inside that pod's netns (so
//! that no plaintext leaves it), by switching the *current thread* into the netns for the one
//! `socket()` call and straight back. A socket keeps the netns it was created in for its life.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{bail, Context as _, Result};

/// `SO_NETNS_COOKIE` (Linux 5.14): the netns cookie of a socket, as `bpf_get_netns_cookie` sees it.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The netns this process started in; every thread returns to it after a `Netns::run`.
fn home_netns() -> &'static File {
    static HOME: OnceLock<File> = OnceLock::new();
    HOME.get_or_init(|| {
        File::open("/proc/self/ns/net").expect("cannot open /proc/self/ns/net (is /proc mounted?)")
    })
}

/// An open handle on a network namespace, and its cookie.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
    cookie: u64,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self> {
        home_netns();
        let file = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
        let mut netns = Netns {
            path: path.to_owned(),
            file,
            cookie: 0,
        };
        let probe = netns.socket(socket2::Domain::IPV4)?;
        netns.cookie = socket_netns_cookie(probe.as_fd())
            .with_context(|| format!("reading the netns cookie of {}", path.display()))?;
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Why this handle no longer names the netns at its path (path removed, or now another
    /// netns), or None while it does. Our open handle keeps a removed netns alive: this is how
    /// the agent notices it should let go.
    pub fn vanished(&self) -> Option<String> {
        self.vanished_at(&self.path)
    }

    /// [`Netns::vanished`] for another path to the same netns (it was opened through one
    /// process's `/proc/<pid>/ns/net`, and is now reached through another's).
    pub fn vanished_at(&self, path: &Path) -> Option<String> {
        crate::handle::replaced_or_gone(&self.file, path, "netns")
    }

    /// Whether `path` names this very netns.
    pub fn is_at(&self, path: &Path) -> bool {
        self.vanished_at(path).is_none()
    }

    /// The netns's inode (its identity on this node, as `ls -iL /proc/<pid>/ns/net` shows it).
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(self.file.metadata()?.ino())
    }

    /// Runs `f` with the current thread inside this netns. `f` must not block or yield.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        setns(self.file.as_fd())
            .with_context(|| format!("entering netns {}", self.path.display()))?;
        struct Return;
        impl Drop for Return {
            fn drop(&mut self) {
                // Failing to return would leave a runtime thread in a pod's netns: abort.
                if let Err(e) = setns(home_netns().as_fd()) {
                    eprintln!("fatal: cannot return to the node's netns: {e}");
                    std::process::abort();
                }
            }
        }
        let _return = Return;
        Ok(f())
    }

    /// A sysctl of this netns, e.g. `net/ipv4/fwmark_reflect`, read through the procfs at
    /// `proc_root` (its path under `<proc_root>/sys`).
    pub fn sysctl(&self, proc_root: &Path, name: &str) -> Result<String> {
        let path = proc_root.join("sys").join(name);
        // /proc/sys/net shows the netns of the thread that opens the file, whichever procfs
        // mount it is opened through (in a DaemonSet: the host's, as the container's own
        // /proc/sys is read-only).
        let value = self
            .run(|| std::fs::read_to_string(&path))?
            .with_context(|| {
                format!(
                    "reading {} in netns {}",
                    path.display(),
                    self.path.display()
                )
            })?;
        Ok(value.trim().to_owned())
    }

    pub fn set_sysctl(&self, proc_root: &Path, name: &str, value: &str) -> Result<()> {
        let path = proc_root.join("sys").join(name);
        self.run(|| std::fs::write(&path, value))?.with_context(|| {
            format!(
                "writing {value} to {} in netns {}",
                path.display(),
                self.path.display()
            )
        })
    }

    /// Brings the netns's loopback up if it is down. A pod's sandbox gets `lo` up from the
    /// runtime, but the CNI plugin may enroll it before that (the order of a runtime's network
    /// steps is its own), and the tunnel's listeners need 127.0.0.1.
    pub fn ensure_loopback_up(&self) -> Result<()> {
        let socket =
            self.run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None))??;
        // SAFETY: ifreq is plain data; its name is "lo" and NUL-terminated; the ioctls read
        // and write only it.
        unsafe {
            let mut req: libc::ifreq = std::mem::zeroed();
            for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
                *dst = *src as libc::c_char;
            }
            if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("reading lo's flags in {}", self.path.display()));
            }
            let flags = req.ifr_ifru.ifru_flags;
            if flags & libc::IFF_UP as libc::c_short == 0 {
                req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
                if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("bringing lo up in {}", self.path.display()));
                }
            }
        }
        Ok(())
    }

    /// The gateways of this netns's default routes, IPv4 and IPv6: for a pod, the node's address
    /// on the pod's link, which is where the kubelet's probes come from. A default route without
    /// a gateway (a device route) gives none; so do IPv6 link-local gateways, which nothing
    /// connects to a pod's address from.
    pub fn default_gateways(&self) -> Result<Vec<IpAddr>> {
        // /proc/thread-self/net shows the netns of the reading thread (/proc/self/net would show
        // the main thread's).
        let (v4, v6) = self.run(|| {
            (
                std::fs::read_to_string("/proc/thread-self/net/route"),
                std::fs::read_to_string("/proc/thread-self/net/ipv6_route"),
            )
        })?;
        let mut gateways = parse_ipv4_default_gateways(
            &v4.with_context(|| format!("reading the IPv4 routes of {}", self.path.display()))?,
        );
        // A netns without IPv6 (ipv6.disable=1) has no ipv6_route.
        if let Ok(v6) = v6 {
            gateways.extend(parse_ipv6_default_gateways(&v6));
        }
        gateways.sort();
        gateways.dedup();
        Ok(gateways)
    }

    /// A new non-blocking, close-on-exec TCP socket inside this netns. Both flags are given to
    /// socket() itself (socket2 adds `SOCK_CLOEXEC`): setting them afterwards cost three
    /// `fcntl`s per delivery, a tenth of a delivery's syscalls.
    pub fn socket(&self, domain: socket2::Domain) -> Result<socket2::Socket> {
        Ok(self.run(|| {
            socket2::Socket::new(
                domain,
                socket2::Type::STREAM.nonblocking(),
                Some(socket2::Protocol::TCP),
            )
        })??)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `RTF_GATEWAY` of a route's flags (linux/route.h, also used by ipv6_route).
const RTF_GATEWAY: u32 = 0x2;

/// The gateways of the default routes in `/proc/net/route`: one line per route, tab-separated
/// `Iface Destination Gateway Flags RefCnt Use Metric Mask ...`, addresses as the hex of the
/// kernel's network-order u32 printed in host order.
fn parse_ipv4_default_gateways(text: &str) -> Vec<IpAddr> {
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, gateway, flags, mask) = (
                hex(f.get(1)?)?,
                hex(f.get(2)?)?,
                hex(f.get(3)?)?,
                hex(f.get(7)?)?,
            );
            (dest == 0 && mask == 0 && flags & RTF_GATEWAY != 0 && gateway != 0)
                .then(|| IpAddr::V4(Ipv4Addr::from(gateway.to_ne_bytes())))
        })
        .collect()
}

/// The gateways of the default routes in `/proc/net/ipv6_route`: one line per route,
/// `dest dest_len src src_len next_hop metric refcnt use flags iface`, addresses as 32 hex
/// digits in network order, lengths and flags in hex.
fn parse_ipv6_default_gateways(text: &str) -> Vec<IpAddr> {
    let addr = |s: &str| u128::from_str_radix(s, 16).ok().map(Ipv6Addr::from);
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, dest_len, next_hop, flags) = (
                addr(f.first()?)?,
                u8::from_str_radix(f.get(1)?, 16).ok()?,
                addr(f.get(4)?)?,
                u32::from_str_radix(f.get(8)?, 16).ok()?,
            );
            let link_local = next_hop.segments()[0] & 0xffc0 == 0xfe80;
            (dest.is_unspecified()
                && dest_len == 0
                && flags & RTF_GATEWAY != 0
                && !next_hop.is_unspecified()
                && !link_local)
                .then_some(IpAddr::V6(next_hop))
        })
        .collect()
}

fn setns(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn socket_netns_cookie(fd: BorrowedFd<'_>) -> Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for writes of the given size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!(
            "getsockopt(SO_NETNS_COOKIE): {} (needs Linux 5.14 or newer)",
            std::io::Error::last_os_error()
        );
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_netns_socket_is_non_blocking_and_close_on_exec_from_the_start() {
        if unsafe { libc::geteuid() } != 0 {
            return; // setns needs CAP_SYS_ADMIN, even into the thread's own netns
        }
        let netns = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let socket = netns.socket(socket2::Domain::IPV6).unwrap();
        let fd = socket.as_raw_fd();
        // SAFETY: fcntl reads the flags of an fd we own.
        let (status, fd_flags) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        };
        assert_ne!(status & libc::O_NONBLOCK, 0);
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        assert_eq!(socket.r#type().unwrap(), socket2::Type::STREAM);
    }

    #[test]
    fn ipv4_default_gateways_are_read_from_proc_net_route() {
        // A pod: default via 10.201.1.1 on eth0, its subnet on-link; then a device-only default
        // route (no gateway), which gives none.
        let route =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0101C90A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t0001C90A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth1\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n";
        let expected: IpAddr = "10.201.1.1".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(parse_ipv4_default_gateways(route), vec![expected]);
        }
        assert!(parse_ipv4_default_gateways("Iface\tDestination\n").is_empty());
    }

    #[test]
    fn ipv6_default_gateways_are_read_from_proc_net_ipv6_route() {
        let route = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";
        assert_eq!(
            parse_ipv6_default_gateways(route),
            vec!["fd00::1".parse::<IpAddr>().unwrap()]
        );
    }
}
