//! The handover's messages on the wire: one JSON document per `SOCK_SEQPACKET` message (the
//! socket keeps message boundaries, so no framing), and the listening sockets that go with a
//! message as `SCM_RIGHTS` ancillary data. Blocking calls with timeouts: a conversation is a
//! handful of messages, held at start-up or on a thread of its own.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

/// What predecessor and successor say to each other, in the order they say it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Both sides, first: who they are, and the map ABI they were built for.
    Hello { version: String, map_abi: u32 },
    /// Successor: "send me your pods' listeners"; the predecessor stops changing the kernel's
    /// state from here on (its successor now does).
    TakeListeners,
    /// Predecessor: one pod's listeners (attached), the netns they live in, and the sysctls
    /// it changed in the pod with the values to put back when the pod leaves the mesh.
    Pod {
        pod: String,
        netns_cookie: u64,
        #[serde(default)]
        restore_sysctls: Vec<(String, String)>,
    },
    /// Predecessor: that was every pod.
    ListenersSent { pods: usize },
    /// Successor: "I am ready; drain and go". Without it (the successor died or gave up),
    /// the predecessor goes on as before.
    Drain,
}

/// Most listening sockets one message carries: a pod has at most six (outbound, inbound
/// plaintext and HBONE, each for IPv4 and IPv6), well below the kernel's SCM_MAX_FD (253).
const MAX_FDS: usize = 16;
/// Largest message: a pod's name and a few numbers.
const MAX_MESSAGE: usize = 64 * 1024;

/// One end of a handover conversation.
pub struct Conversation {
    socket: Socket,
}

impl Conversation {
    /// Connects to a running node's handover socket.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Self> {
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
        socket.connect(&SockAddr::unix(path)?)?;
        Self::with_timeout(socket, timeout)
    }

    /// A conversation on an accepted socket.
    pub fn with_timeout(socket: Socket, timeout: Duration) -> io::Result<Self> {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.set_write_timeout(Some(timeout))?;
        Ok(Self { socket })
    }

    /// How long a send or a receive may block; `None`: for ever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket.set_read_timeout(timeout)?;
        self.socket.set_write_timeout(timeout)
    }

    /// Sends a message with `fds` attached.
    pub fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<()> {
        assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} fds per message");
        let body = serde_json::to_vec(message)?;
        let mut iov = libc::iovec {
            iov_base: body.as_ptr() as *mut _,
            iov_len: body.len(),
        };
        let mut control = vec![0u8; cmsg_space(fds.len())];
        // SAFETY: msghdr is plain data; every pointer in it points into a buffer that outlives
        // the sendmsg call, and the control buffer has room for one SCM_RIGHTS header with
        // `fds.len()` descriptors (cmsg_space).
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if !fds.is_empty() {
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = control.len() as _;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<RawFd>()) as u32) as _;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    data.add(i).write_unaligned(fd.as_raw_fd());
                }
            }
            libc::sendmsg(self.socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        if sent < 0 {
            return Err(io::Error::last_os_error()).context("sending a handover message");
        }
        Ok(())
    }

    /// Receives the next message and the fds attached to it; `None` when the other side hung
    /// up.
    pub fn receive(&self) -> Result<Option<(Message, Vec<OwnedFd>)>> {
        let mut body = vec![0u8; MAX_MESSAGE];
        let mut iov = libc::iovec {
            iov_base: body.as_mut_ptr().cast(),
            iov_len: body.len(),
        };
        let mut control = vec![0u8; cmsg_space(MAX_FDS)];
        // SAFETY: as in `send`; the kernel writes at most msg_controllen bytes of control data
        // and at most iov_len bytes of body.
        let (received, msg) = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len() as _;
            let n = libc::recvmsg(self.socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            (n, msg)
        };
        if received < 0 {
            return Err(io::Error::last_os_error()).context("receiving a handover message");
        }
        // Take ownership of every fd the kernel installed before anything can fail, so that
        // none leaks.
        let fds = received_fds(&msg);
        if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
            bail!("a handover message or its fds did not fit: refused");
        }
        if received == 0 {
            return Ok(None);
        }
        let message = serde_json::from_slice(&body[..received as usize])
            .context("a handover message that is not one")?;
        Ok(Some((message, fds)))
    }
}

/// The descriptors in a received message's SCM_RIGHTS headers, owned.
fn received_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: walks the control buffer the kernel filled, with the CMSG_* macros that bound
    // every header by msg_controllen; each descriptor in an SCM_RIGHTS header was installed
    // in this process for us and is owned by no one else.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize - header) / size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    fds
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic.
    unsafe { libc::CMSG_SPACE((fds.max(1) * size_of::<RawFd>()) as u32) as usize }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::Read as _, net::TcpListener};

    fn pair() -> (Conversation, Conversation) {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let timeout = Duration::from_secs(5);
        (
            Conversation::with_timeout(a, timeout).unwrap(),
            Conversation::with_timeout(b, timeout).unwrap(),
        )
    }

    #[test]
    fn a_message_arrives_whole_with_its_listeners() {
        let (a, b) = pair();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let message = Message::Pod {
            pod: "default/a".into(),
            netns_cookie: 42,
            restore_sysctls: vec![("net/ipv4/fwmark_reflect".into(), "0".into())],
        };
        use std::os::fd::AsFd as _;
        a.send(&message, &[listener.as_fd()]).unwrap();
        drop(listener);
        let (got, fds) = b.receive().unwrap().unwrap();
        assert_eq!(got, message);
        assert_eq!(fds.len(), 1);
        // The very same listening socket: it still accepts on its address.
        let received = TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), addr);
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (mut server, _) = received.accept().unwrap();
        use std::io::Write as _;
        server.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn a_hang_up_is_none_and_garbage_is_an_error() {
        let (a, b) = pair();
        a.socket.send(b"not json").unwrap();
        let err = b.receive().unwrap_err();
        assert!(format!("{err:#}").contains("not one"), "{err:#}");
        drop(a);
        assert!(b.receive().unwrap().is_none());
    }
}
