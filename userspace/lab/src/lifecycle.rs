//! The lab on this machine: what `Lab::create` builds (namespaces, links, addresses, routes,
//! cgroups), where each piece is named, and its removal (`Drop`, `sweep`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{
    processes::{terminate, NODE_LOG_WITH_CONNECTION_STARTS},
    system::{cgroup2_root, ensure_bpffs, ip, require_root, sysctl},
    topology::{node, NODES, PODS},
};

pub struct Lab {
    prefix: String,
    cgroup_root: PathBuf,
    bpffs: PathBuf,
    /// The processes it started, by name (see `spawn`); stopped on drop.
    pub(crate) children: Vec<(String, Child)>,
    /// `RUST_LOG` of the `ambit node`s it starts (see `set_node_log`).
    pub(crate) node_log: String,
}

impl Lab {
    /// Builds the lab's namespaces, links, addresses, routes and cgroups. Anything left by an
    /// earlier lab with the same prefix is removed first.
    pub fn create(prefix: &str) -> Result<Self> {
        require_root()?;
        let cgroup_root = cgroup2_root()?;
        let bpffs = PathBuf::from("/sys/fs/bpf");
        ensure_bpffs(&bpffs)?;
        sweep(prefix)?;
        let lab = Lab::unbuilt(prefix, cgroup_root, bpffs);
        lab.build().context("building the lab")?;
        Ok(lab)
    }

    /// A lab that names the pieces of `prefix` without building any (dropping it still sweeps
    /// `prefix`).
    pub(crate) fn unbuilt(prefix: &str, cgroup_root: PathBuf, bpffs: PathBuf) -> Self {
        Lab {
            prefix: prefix.to_owned(),
            cgroup_root,
            bpffs,
            children: Vec::new(),
            node_log: NODE_LOG_WITH_CONNECTION_STARTS.to_owned(),
        }
    }

    fn build(&self) -> Result<()> {
        for node in &NODES {
            let ns = self.netns(node.name);
            add_netns(&ns)?;
            sysctl(&ns, "net.ipv4.ip_forward", "1")?;
            sysctl(&ns, "net.ipv6.conf.all.forwarding", "1")?;
            ip_in(&ns, "link add br0 type bridge")?;
            ip_in(&ns, &format!("addr add {}/24 dev br0", node.bridge_ip))?;
            // `nodad`: no duplicate address detection, so no tentative address to wait for.
            ip_in(
                &ns,
                &format!("addr add {}/64 dev br0 nodad", node.bridge_ip6),
            )?;
            ip_in(&ns, "link set br0 up")?;
        }
        let n2 = self.netns("n2");
        let link = format!("link add link0 type veth peer name link0 netns {n2}");
        ip_in(&self.netns("n1"), &link)?;
        for (node, peer) in [(&NODES[0], &NODES[1]), (&NODES[1], &NODES[0])] {
            let ns = self.netns(node.name);
            ip_in(&ns, &format!("addr add {}/30 dev link0", node.link_ip))?;
            ip_in(
                &ns,
                &format!("addr add {}/126 dev link0 nodad", node.link_ip6),
            )?;
            ip_in(&ns, "link set link0 up")?;
            let route = format!("route add {} via {}", peer.pod_subnet, peer.link_ip);
            ip_in(&ns, &route)?;
            let route = format!("route add {} via {}", peer.pod_subnet6, peer.link_ip6);
            ip_in(&ns, &route)?;
            // The service VIPs exist nowhere: only capture makes them reachable.
        }
        fs::create_dir_all(self.cgroup_dir())?;
        for pod in &PODS {
            let (ns, node_ns) = (self.netns(pod.name), self.netns(pod.node));
            let host_side = format!("v-{}", pod.name);
            add_netns(&ns)?;
            let veth = format!("link add eth0 type veth peer name {host_side} netns {node_ns}");
            ip_in(&ns, &veth)?;
            ip_in(&ns, &format!("addr add {}/24 dev eth0", pod.ip))?;
            ip_in(&ns, &format!("addr add {}/64 dev eth0 nodad", pod.ip6))?;
            ip_in(&ns, "link set eth0 up")?;
            let gateway = node(pod.node);
            ip_in(&ns, &format!("route add default via {}", gateway.bridge_ip))?;
            ip_in(
                &ns,
                &format!("-6 route add default via {}", gateway.bridge_ip6),
            )?;
            ip_in(&node_ns, &format!("link set {host_side} master br0"))?;
            ip_in(&node_ns, &format!("link set {host_side} up"))?;
            fs::create_dir_all(self.pod_cgroup(pod.name))?;
        }
        Ok(())
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The netns name of a lab node or pod.
    pub fn netns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    pub fn netns_path(&self, name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(self.netns(name))
    }

    /// The Ambit node name of a lab node (also its pin directory name).
    pub fn node_name(&self, node: &str) -> String {
        self.netns(node)
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    pub fn cgroup_dir(&self) -> PathBuf {
        self.cgroup_root.join(&self.prefix)
    }

    /// Relative to the cgroup2 root, as the config file names it.
    pub fn pod_cgroup_rel(&self, pod: &str) -> String {
        format!("{}/{pod}", self.prefix)
    }

    pub fn pod_cgroup(&self, pod: &str) -> PathBuf {
        self.cgroup_dir().join(pod)
    }

    pub fn pin_dir(&self, node: &str) -> PathBuf {
        self.bpffs.join("ambit").join(self.node_name(node))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in self.children.drain(..).rev() {
            terminate(child);
        }
        if let Err(e) = sweep(&self.prefix) {
            eprintln!("lab teardown: {e:#}");
        }
    }
}

/// Where `ambit node` makes its handover socket by default (`<node>.handover.sock`).
pub const HANDOVER_SOCKET_DIR: &str = "/var/run/ambit";

/// Removes every process, pin, netns, cgroup and handover socket of labs whose prefix starts with `prefix`.
pub fn sweep(prefix: &str) -> Result<()> {
    let cgroup_root = cgroup2_root()?;
    // Processes first (they hold cgroups and may hold namespaces).
    for dir in matching(&cgroup_root, prefix) {
        kill_cgroup_tree(&dir);
    }
    for dir in matching(Path::new("/sys/fs/bpf/ambit"), prefix) {
        fs::remove_dir_all(&dir).with_context(|| format!("removing pins {}", dir.display()))?;
    }
    for ns in matching(Path::new("/run/netns"), prefix) {
        let name = ns.file_name().unwrap().to_string_lossy().into_owned();
        // Anything still running inside (e.g. a node process) goes first.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                kill(pid);
            }
        }
        ip(&["netns", "del", &name]).with_context(|| format!("deleting netns {name}"))?;
    }
    for dir in matching(&cgroup_root, prefix) {
        remove_cgroup_tree(&dir)?;
    }
    // Handover sockets (`ambit node --handover-socket`'s default) of killed nodes.
    for socket in matching(Path::new(HANDOVER_SOCKET_DIR), prefix) {
        fs::remove_file(&socket).with_context(|| format!("removing {}", socket.display()))?;
    }
    Ok(())
}

/// A new netns with its loopback up, in which no IPv6 address is ever tentative: interfaces
/// made from now on skip duplicate address detection (`accept_dad=0`), their link-local
/// addresses too. A node forwarding to a neighbour it has not resolved yet sends its Neighbor
/// Solicitation from its link-local address, and does not send it at all while that address is
/// tentative: with DAD, the first IPv6 connection across the lab would wait ~2 s for it.
fn add_netns(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")?;
    ip_in(ns, "link set lo up")
}

/// `ip -n <ns> <command>`; the command's words are separated by whitespace (none has any).
fn ip_in(ns: &str, command: &str) -> Result<()> {
    let args: Vec<&str> = ["-n", ns]
        .into_iter()
        .chain(command.split_whitespace())
        .collect();
    ip(&args)
}

fn matching(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let named = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().starts_with(prefix);
    entries(dir).into_iter().filter(named).collect()
}

/// SIGKILL to a pid given as text (from `ip netns pids` or `cgroup.procs`); anything else is
/// skipped.
fn kill(pid: &str) {
    if let Ok(pid) = pid.trim().parse::<i32>() {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn kill_cgroup_tree(dir: &Path) {
    // cgroup.kill (Linux 5.14) kills the whole subtree at once.
    if fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            kill(pid);
        }
        for sub in subdirs(dir) {
            kill_cgroup_tree(&sub);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    for sub in subdirs(dir) {
        remove_cgroup_tree(&sub)?;
    }
    // A cgroup can only be removed once its last process has exited.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("removing cgroup {}", dir.display()))
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn subdirs(dir: &Path) -> impl Iterator<Item = PathBuf> {
    entries(dir).into_iter().filter(|p| p.is_dir())
}

/// The paths in `dir` (none if it cannot be read, e.g. is gone).
fn entries(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}
