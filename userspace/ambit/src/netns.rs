//! Network namespaces: the tunnel's sockets for a pod are created inside that pod's netns (so
//! that no plaintext leaves it), by switching the *current thread* into the netns for the one
//! `socket()` call and straight back. A socket keeps the netns it was created in for its life.

use std::{
    fs::File,
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

    /// A sysctl of this netns, e.g. `net/ipv4/tcp_tw_reuse` (its path under /proc/sys).
    pub fn sysctl(&self, name: &str) -> Result<String> {
        let path = Path::new("/proc/sys").join(name);
        // /proc/sys/net shows the netns of the thread that opens the file.
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

    pub fn set_sysctl(&self, name: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(name);
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

    /// A new non-blocking TCP socket inside this netns.
    pub fn socket(&self, domain: socket2::Domain) -> Result<socket2::Socket> {
        let socket = self.run(|| {
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        })??;
        socket.set_nonblocking(true)?;
        socket.set_cloexec(true)?;
        Ok(socket)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
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
