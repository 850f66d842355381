//! Handing a node over from one node process to the next without refusing a connection (an
//! upgrade, a DaemonSet's surge rollout, a restart by hand).
//!
//! A running node listens on its handover socket (`--handover-socket`, a unix
//! `SOCK_SEQPACKET` socket only root can reach). A new node process for the same node connects
//! to it before it touches anything, and then:
//!
//! 1. **Hello.** Both say their version and map ABI ([`ambit_abi::ABI_VERSION`]). Different
//!    map ABIs cannot share the pinned maps: the new process stops there with an error, and
//!    the running one goes on as if nothing happened.
//! 2. **Take listeners.** The running node (the predecessor) stops changing the kernel's
//!    state and sends, pod by pod, the very listening sockets it serves in each pod's netns
//!    (`SCM_RIGHTS`). Both processes now hold the same sockets: nothing is closed or re-bound,
//!    so no connection is refused and none waiting in a backlog is lost; either may accept.
//! 3. **Enroll and become ready.** The new process (the successor) enrolls its pods with those
//!    listeners, re-attaching the programs make-before-break (pinned links are replaced only
//!    after the new one is attached) over the same pinned maps.
//! 4. **Drain.** Once every pod it took over is enrolled, the successor binds the handover
//!    socket itself and tells the predecessor to drain: it stops accepting, finishes its open
//!    connections (up to `--drain-timeout`) and exits without detaching anything.
//!
//! A successor that dies or gives up before step 4 leaves the predecessor serving: it resumes
//! following its source. A crash (SIGKILL) hands nothing over: the listeners close with the
//! process and capture fails closed until the next process has listeners again.

pub mod wire;

use std::{
    collections::BTreeMap,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::{MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::state::PodKey;
use wire::{Conversation, Message};

/// How long one message may take to arrive while the two processes talk.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// This binary's version, as said in the hello.
fn our_hello() -> Message {
    Message::Hello {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        map_abi: ambit_abi::ABI_VERSION,
    }
}

/// One pod's listeners as they cross from one process to the other.
pub struct PodListenerFds {
    pub pod: PodKey,
    /// The netns the listeners live in: a successor that finds the pod in another netns
    /// (it was re-created in between) opens new ones there instead.
    pub netns_cookie: u64,
    pub fds: Vec<OwnedFd>,
    /// Sysctls changed in the pod, with the values to put back when it leaves the mesh.
    pub restore_sysctls: Vec<(String, String)>,
}

/// What a successor received: each pod's listeners.
pub type HandedListeners = BTreeMap<PodKey, PodListenerFds>;

/// The successor's view of the running node it takes over from.
pub struct Predecessor {
    conversation: Conversation,
    version: String,
}

impl Predecessor {
    /// Connects to the node running at `socket`, if one answers there: `None` when there is no
    /// socket or nobody behind it (a crashed node's leftover). An error when one answers but
    /// this binary cannot take over from it.
    pub fn find(socket: &Path) -> Result<Option<Self>> {
        let conversation = match Conversation::connect(socket, MESSAGE_TIMEOUT) {
            Ok(c) => c,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", socket.display())),
        };
        conversation.send(&our_hello(), &[])?;
        let (version, map_abi) = match conversation.receive()? {
            Some((Message::Hello { version, map_abi }, _)) => (version, map_abi),
            other => bail!(
                "the node at {} answered {other:?} to hello: not an Ambit node",
                socket.display()
            ),
        };
        if map_abi != ambit_abi::ABI_VERSION {
            bail!(
                "the running node (Ambit {version}, map ABI {map_abi}) cannot hand over to this \
                 one (Ambit {}, map ABI {}): they cannot share the pinned maps. It goes on \
                 serving. To upgrade across this change, stop it, remove the node's pins \
                 (`ambit reset --node <node>`) and start this version: pods' connections are \
                 refused meanwhile (docs/upgrades.md).",
                env!("CARGO_PKG_VERSION"),
                ambit_abi::ABI_VERSION,
            );
        }
        Ok(Some(Self {
            conversation,
            version,
        }))
    }

    /// The predecessor's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Asks for every pod's listeners. From here the predecessor changes nothing in the
    /// kernel until told to drain, or until this process hangs up.
    pub fn take_listeners(&self) -> Result<HandedListeners> {
        self.conversation.send(&Message::TakeListeners, &[])?;
        let mut pods = HandedListeners::new();
        loop {
            match self.conversation.receive()? {
                Some((
                    Message::Pod {
                        pod,
                        netns_cookie,
                        restore_sysctls,
                    },
                    fds,
                )) => {
                    pods.insert(
                        pod.clone(),
                        PodListenerFds {
                            pod,
                            netns_cookie,
                            fds,
                            restore_sysctls,
                        },
                    );
                }
                Some((Message::ListenersSent { pods: count }, _)) if count == pods.len() => {
                    return Ok(pods)
                }
                Some((Message::ListenersSent { pods: count }, _)) => bail!(
                    "the running node said it sent {count} pods' listeners, {} arrived",
                    pods.len()
                ),
                Some((other, _)) => bail!("unexpected handover message {other:?}"),
                None => bail!(
                    "the running node hung up instead of sending its listeners (it is \
                     draining, or handing over to another process)"
                ),
            }
        }
    }

    /// Tells the predecessor to drain and exit: this process serves the node from now on.
    pub fn drain(self) -> Result<()> {
        self.conversation.send(&Message::Drain, &[])
    }
}

/// What the handover socket asks of the running node's main loop.
pub enum Request {
    /// A successor wants the listeners: answer with them (and stop changing the kernel's
    /// state), or drop the sender to refuse.
    TakeListeners(oneshot::Sender<Vec<PodListenerFds>>),
    /// The successor is ready: drain and exit.
    Drain,
    /// The successor took the listeners but hung up without asking to drain: go on.
    Abandoned,
}

/// The running node's handover socket.
pub struct Server {
    path: PathBuf,
    /// Which file at `path` is ours (device, inode): a successor binds its own there before
    /// this one is gone, and that one must not be removed.
    file: (u64, u64),
    task: JoinHandle<()>,
}

impl Server {
    /// Binds `path` (replacing whatever is there: a crashed node's socket, or the
    /// predecessor's, which stops being reachable) and serves successors in the background;
    /// their requests arrive on `requests`.
    pub fn start(path: &Path, requests: mpsc::Sender<Request>) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => {}
        }
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking().cloexec(), None)?;
        socket
            .bind(&SockAddr::unix(path)?)
            .with_context(|| format!("binding {}", path.display()))?;
        // Whoever connects gets this node's listeners: root alone.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        socket.listen(4)?;
        let meta = std::fs::metadata(path)?;
        // SAFETY: the Socket owns its fd and is moved into the AsyncFd, so the fd stays open
        // and is not closed or re-registered elsewhere while registered.
        let listener =
            unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("watching the handover socket: {e}"))?;
        let task = tokio::spawn(accept_successors(listener, requests));
        Ok(Self {
            path: path.to_owned(),
            file: (meta.dev(), meta.ino()),
            task,
        })
    }

    /// Stops serving successors and removes the socket file if it is still this node's.
    pub fn stop(self) {
        self.task.abort();
        let ours = std::fs::metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.file)
            .unwrap_or(false);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                warn!(socket = %self.path.display(), "removing the handover socket: {e}");
            }
        }
    }
}

async fn accept_successors(listener: AsyncFd<Socket>, requests: mpsc::Sender<Request>) {
    loop {
        let accepted = listener
            .async_io(tokio::io::Interest::READABLE, |s| s.accept())
            .await;
        match accepted {
            Ok((socket, _)) => {
                let requests = requests.clone();
                // A few blocking messages: a thread of their own, off the runtime.
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = talk_to_successor(socket, &requests) {
                        warn!("handover: {e:#}");
                    }
                });
            }
            Err(e) => {
                warn!("handover socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The predecessor's side of one conversation (see the module's steps).
fn talk_to_successor(socket: Socket, requests: &mpsc::Sender<Request>) -> Result<()> {
    let conversation = Conversation::with_timeout(socket, MESSAGE_TIMEOUT)?;
    match conversation.receive()? {
        Some((Message::Hello { version, map_abi }, _)) => {
            info!(%version, map_abi, "a new node process is taking over")
        }
        other => bail!("a handover began with {other:?} instead of hello"),
    }
    conversation.send(&our_hello(), &[])?;
    match conversation.receive()? {
        // The successor found it cannot take over (it says why in its own log).
        None => return Ok(()),
        Some((Message::TakeListeners, _)) => {}
        Some((other, _)) => bail!("unexpected handover message {other:?}"),
    }
    let (reply, pods) = oneshot::channel();
    requests.blocking_send(Request::TakeListeners(reply))?;
    let Ok(pods) = pods.blocking_recv() else {
        bail!("a successor asked for the listeners while this node is draining or handing over to another: refused");
    };
    // From here the main loop has stopped changing the kernel's state: whatever happens below
    // ends with either Drain or Abandoned.
    let outcome = send_listeners_and_wait(&conversation, &pods);
    drop(pods);
    let request = match &outcome {
        Ok(true) => Request::Drain,
        _ => Request::Abandoned,
    };
    requests.blocking_send(request)?;
    outcome.map(|_| ())
}

/// Sends every pod's listeners, then waits (as long as a successor may take to become
/// ready) for the word to drain. `false` if the successor hung up instead.
fn send_listeners_and_wait(conversation: &Conversation, pods: &[PodListenerFds]) -> Result<bool> {
    for pod in pods {
        let fds: Vec<_> = pod.fds.iter().map(|fd| fd.as_fd()).collect();
        conversation.send(
            &Message::Pod {
                pod: pod.pod.clone(),
                netns_cookie: pod.netns_cookie,
                restore_sysctls: pod.restore_sysctls.clone(),
            },
            &fds,
        )?;
    }
    conversation.send(&Message::ListenersSent { pods: pods.len() }, &[])?;
    conversation.set_timeout(None)?;
    match conversation.receive()? {
        Some((Message::Drain, _)) => Ok(true),
        None => Ok(false),
        Some((other, _)) => bail!("unexpected handover message {other:?}"),
    }
}

/// The local address of a handed-over listener, for telling which of a pod's listeners it is.
pub fn listener_address(fd: &OwnedFd) -> Result<std::net::SocketAddr> {
    let socket = socket2::SockRef::from(fd);
    if !socket.is_listener()? {
        bail!("handed fd {} is not a listening socket", fd.as_raw_fd());
    }
    socket
        .local_addr()?
        .as_socket()
        .context("a handed listener without an IP address")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testutil::TempDir;

    /// A stand-in for a running node at a fresh socket path that answers hello with
    /// `map_abi`, then reports what it received next.
    fn fake_predecessor(map_abi: u32) -> (TempDir, std::thread::JoinHandle<String>) {
        let dir = TempDir::new();
        let path = dir.path().join("handover.sock");
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        socket.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        socket.listen(1).unwrap();
        let thread = std::thread::spawn(move || {
            let (accepted, _) = socket.accept().unwrap();
            let c = Conversation::with_timeout(accepted, MESSAGE_TIMEOUT).unwrap();
            c.receive().unwrap().unwrap();
            let hello = Message::Hello {
                version: "0.0.9".into(),
                map_abi,
            };
            c.send(&hello, &[]).unwrap();
            format!("{:?}", c.receive().unwrap().map(|(m, _)| m))
        });
        (dir, thread)
    }

    #[test]
    fn a_running_node_with_another_map_abi_is_left_alone_and_the_error_says_why() {
        let (dir, predecessor) = fake_predecessor(ambit_abi::ABI_VERSION + 1);
        let err = Predecessor::find(&dir.path().join("handover.sock"))
            .err()
            .expect("a map ABI mismatch is refused");
        let err = format!("{err:#}");
        assert!(
            err.contains("map ABI") && err.contains("0.0.9") && err.contains("goes on serving"),
            "{err}"
        );
        // It hung up after hello: the running node was never asked for its listeners.
        assert_eq!(predecessor.join().unwrap(), "None");
    }

    #[test]
    fn no_running_node_is_none_even_with_a_crashed_ones_socket_left() {
        let dir = TempDir::new();
        let path = dir.path().join("handover.sock");
        assert!(Predecessor::find(&path).unwrap().is_none());
        // A socket file nobody listens on (its node was killed).
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        socket.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        drop(socket);
        assert!(Predecessor::find(&path).unwrap().is_none());
    }

    #[test]
    fn the_same_map_abi_proceeds_to_taking_the_listeners() {
        let (dir, predecessor) = fake_predecessor(ambit_abi::ABI_VERSION);
        let found = Predecessor::find(&dir.path().join("handover.sock"))
            .unwrap()
            .expect("a predecessor");
        assert_eq!(found.version(), "0.0.9");
        found
            .conversation
            .send(&Message::TakeListeners, &[])
            .unwrap();
        assert_eq!(predecessor.join().unwrap(), "Some(TakeListeners)");
    }
}
