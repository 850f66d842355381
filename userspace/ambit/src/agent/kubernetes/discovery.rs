//! Finding a pod's network namespace and cgroup on the node, from the host's procfs and cgroupfs
//! (as istio-cni does): the pod's processes carry its UID in their cgroup path.
//!
//! Cgroup paths look like (cgroup v2):
//! - systemd driver: `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid with _>.slice/cri-containerd-<id>.scope`
//!   (`crio-<id>.scope` on CRI-O; guaranteed pods have no QoS level)
//! - cgroupfs driver: `/kubepods/besteffort/pod<uid>/<id>`
//! - kind: the same under `/kubelet.slice/kubelet-kubepods.slice/...`
//!
//! `/proc/<pid>/cgroup` shows paths relative to the *reader's* cgroup namespace, so they are
//! matched loosely: the pod-level directory is the path component carrying the UID, and when that
//! path does not exist under our cgroup2 mount the mount is searched for it.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

/// Where a pod lives on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLocation {
    /// `<proc>/<pid>/ns/net` of the pod's oldest process.
    pub netns: PathBuf,
    /// The pod-level cgroup directory (covers all its containers).
    pub cgroup: PathBuf,
}

/// Finds pods on this node.
pub trait PodLocator: Send + Sync {
    /// Where the pod `pod_uid` lives. `pod_ips` are its addresses as the API reports them:
    /// when given, only a netns holding one of them is taken for the pod's.
    fn locate(&self, pod_uid: &str, pod_ips: &[IpAddr]) -> Option<PodLocation>;

    /// The addresses of a pod whose sandbox the CNI plugin reported, before the API server
    /// knows them (the pod is still `Pending` then): such a pod is captured from its start.
    fn sandbox_ips(&self, _pod_uid: &str) -> Option<Vec<IpAddr>> {
        None
    }
}

/// The real locator: scans `<proc_root>/*/cgroup`. A pod once found is not searched for again
/// while the path it was found at still names the same netns: the desired state is rebuilt
/// every few seconds, and a scan of /proc per pod each time would grow with pods × processes.
pub struct ProcLocator {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    /// Pod UID → where it was found.
    found: Mutex<HashMap<String, Found>>,
}

impl ProcLocator {
    pub fn new(proc_root: impl Into<PathBuf>, cgroup_root: impl Into<PathBuf>) -> Self {
        ProcLocator {
            proc_root: proc_root.into(),
            cgroup_root: cgroup_root.into(),
            found: Mutex::new(HashMap::new()),
        }
    }

    /// The pod's location found earlier, if its netns path and cgroup are still there and
    /// the netns holds one of `pod_ips` (checked once per address set).
    fn found_earlier(&self, pod_uid: &str, pod_ips: &[IpAddr]) -> Option<PodLocation> {
        let mut found = self.found.lock().unwrap();
        let entry = found.get_mut(pod_uid)?;
        let netns_path = &entry.location.netns;
        let same_netns = fs::metadata(netns_path).is_ok_and(|m| m.ino() == entry.netns);
        let holds_ip = || {
            let proc_dir = netns_path.parent().and_then(Path::parent);
            proc_dir.is_some_and(|dir| local_addresses(dir).iter().any(|ip| pod_ips.contains(ip)))
        };
        let ips_known = pod_ips.iter().all(|ip| entry.ips.contains(ip));
        if same_netns && entry.location.cgroup.exists() && (ips_known || holds_ip()) {
            if !pod_ips.is_empty() {
                entry.ips = pod_ips.to_vec();
            }
            return Some(entry.location.clone());
        }
        found.remove(pod_uid);
        None
    }
}

struct Found {
    location: PodLocation,
    /// The netns's inode when found: the path names a process, whose pid may be reused.
    netns: u64,
    /// The pod addresses it was checked to hold (none: found without addresses).
    ips: Vec<IpAddr>,
}

impl PodLocator for ProcLocator {
    fn locate(&self, pod_uid: &str, pod_ips: &[IpAddr]) -> Option<PodLocation> {
        if let Some(location) = self.found_earlier(pod_uid, pod_ips) {
            return Some(location);
        }
        let location = self.scan(pod_uid, pod_ips)?;
        let netns = fs::metadata(&location.netns).ok()?.ino();
        let found = Found {
            location: location.clone(),
            netns,
            ips: pod_ips.to_vec(),
        };
        self.found.lock().unwrap().insert(pod_uid.to_owned(), found);
        Some(location)
    }
}

impl ProcLocator {
    fn scan(&self, pod_uid: &str, pod_ips: &[IpAddr]) -> Option<PodLocation> {
        // Neither the agent's own netns nor the node's (pid 1's): a process of the pod's cgroup
        // in one of those (CRI-O's conmon, a host-network helper) is not in the pod's netns.
        let excluded: Vec<u64> = ["self/ns/net", "1/ns/net"]
            .iter()
            .filter_map(|p| fs::metadata(self.proc_root.join(p)).ok())
            .map(|m| m.ino())
            .collect();
        // Whether a netns (by inode) holds one of the pod's addresses, read once per netns.
        let mut holds_pod_ip: HashMap<u64, bool> = HashMap::new();
        let mut best: Option<(u64, u32, String)> = None; // (start time, pid, cgroup path)
        for (pid, dir, path) in self.processes_of(|path| pod_cgroup_prefix(path, pod_uid).is_some())
        {
            let Some(netns) = fs::metadata(dir.join("ns/net")).ok().map(|m| m.ino()) else {
                continue;
            };
            if excluded.contains(&netns) {
                continue;
            }
            // The pod's IP is the proof that this netns is the pod's: the oldest process of the
            // pod's cgroup is the pause process on containerd, but on CRI-O without an infra
            // container it is an app container, and a helper may sit in another netns.
            if !pod_ips.is_empty()
                && !*holds_pod_ip
                    .entry(netns)
                    .or_insert_with(|| local_addresses(&dir).iter().any(|ip| pod_ips.contains(ip)))
            {
                continue;
            }
            let Some(start) = start_time(&dir) else {
                continue;
            };
            if best.as_ref().is_none_or(|(s, _, _)| start < *s) {
                best = Some((start, pid, path));
            }
        }
        let (_, pid, path) = best?;
        let prefix = pod_cgroup_prefix(&path, pod_uid)?;
        let direct = self.cgroup_root.join(prefix.trim_start_matches('/'));
        let cgroup = if direct.join("cgroup.procs").exists() {
            direct
        } else {
            // Our cgroup namespace differs from the pod's: search by the UID component.
            let name = Path::new(prefix).file_name()?.to_str()?.to_owned();
            find_dir(&self.cgroup_root, &name, 6)?
        };
        Some(PodLocation {
            netns: self.proc_root.join(pid.to_string()).join("ns/net"),
            cgroup,
        })
    }

    /// Every process whose cgroup v2 path `wanted` accepts: (pid, its /proc dir, the path).
    fn processes_of<'a>(
        &'a self,
        wanted: impl Fn(&str) -> bool + 'a,
    ) -> impl Iterator<Item = (u32, PathBuf, String)> + 'a {
        fs::read_dir(&self.proc_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(move |entry| {
                let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
                let dir = entry.path();
                let cgroups = fs::read_to_string(dir.join("cgroup")).ok()?;
                let path = unified_path(&cgroups)?;
                wanted(path).then(|| (pid, dir, path.to_owned()))
            })
    }

    /// Another `<proc>/<pid>/ns/net` path to the netns `netns_ino`, from a process of the pod
    /// cgroup named `pod_cgroup_name`: where an enrolled pod's netns can still be reached once
    /// the process it was found through has exited (a container restarting, on a runtime
    /// without a pause process), so the pod is not re-enrolled for it.
    pub fn netns_path_of(&self, pod_cgroup_name: &str, netns_ino: u64) -> Option<PathBuf> {
        self.processes_of(|path| path.split('/').any(|c| c == pod_cgroup_name))
            .map(|(_, dir, _)| dir.join("ns/net"))
            .find(|ns| fs::metadata(ns).is_ok_and(|m| m.ino() == netns_ino))
    }
}

/// The addresses configured in the netns of the process `proc_dir` (`/proc/<pid>`), read from
/// its `net/fib_trie` (IPv4 local routes) and `net/if_inet6` without entering the netns.
pub fn local_addresses(proc_dir: &Path) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = fs::read_to_string(proc_dir.join("net/fib_trie"))
        .map(|t| {
            parse_fib_trie_locals(&t)
                .into_iter()
                .map(IpAddr::V4)
                .collect()
        })
        .unwrap_or_default();
    if let Ok(text) = fs::read_to_string(proc_dir.join("net/if_inet6")) {
        ips.extend(parse_if_inet6(&text).into_iter().map(IpAddr::V6));
    }
    ips
}

/// The local addresses in a `/proc/net/fib_trie` dump: leaves (`|-- <ip>`) with a
/// `/32 host LOCAL` entry.
fn parse_fib_trie_locals(text: &str) -> Vec<Ipv4Addr> {
    let mut locals = Vec::new();
    let mut leaf: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ") {
            leaf = ip.parse().ok();
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(ip) = leaf.filter(|ip| !locals.contains(ip)) {
                locals.push(ip);
            }
        } else if !line.starts_with('/') {
            leaf = None;
        }
    }
    locals
}

/// The addresses in a `/proc/net/if_inet6` table (first column: 32 hex digits).
fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| {
            let hex = line.split_whitespace().next()?;
            u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from)
        })
        .collect()
}

/// The cgroup v2 line (`0::<path>`) of a `/proc/<pid>/cgroup` file.
pub fn unified_path(cgroup_file: &str) -> Option<&str> {
    cgroup_file.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The path up to and including the component that names the pod (`pod<uid>`, with the UID's
/// dashes as dashes or underscores), or None if the path is not the pod's.
pub fn pod_cgroup_prefix<'a>(path: &'a str, pod_uid: &str) -> Option<&'a str> {
    let dashed = pod_uid.to_ascii_lowercase();
    let underscored = dashed.replace('-', "_");
    let mut end = 0;
    for component in path.split('/') {
        end += component.len();
        let lower = component.to_ascii_lowercase();
        let names_pod = [&dashed, &underscored]
            .iter()
            .any(|uid| lower.contains(&format!("pod{uid}")));
        if names_pod {
            return Some(&path[..end]);
        }
        end += 1; // the '/'
    }
    None
}

/// Process start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
fn start_time(proc_dir: &Path) -> Option<u64> {
    let stat = fs::read_to_string(proc_dir.join("stat")).ok()?;
    // The command name (field 2) may contain spaces: count fields after its closing ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The pod-level cgroup directory of the pod `pod_uid` under the cgroup2 mount `root` (made by
/// kubelet before it asks the runtime for the pod's sandbox), in any of the layouts above.
pub fn find_pod_cgroup(root: &Path, pod_uid: &str) -> Option<PathBuf> {
    let mut level = vec![root.to_owned()];
    for _ in 0..8 {
        let mut next = Vec::new();
        for dir in level {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if pod_cgroup_prefix(&name, pod_uid) == Some(&*name) {
                    return Some(entry.path());
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    None
}

fn find_dir(root: &Path, name: &str, depth: usize) -> Option<PathBuf> {
    let mut level = vec![root.to_owned()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for dir in level {
            for entry in fs::read_dir(&dir).ok()?.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if entry.file_name().to_str() == Some(name) {
                    return Some(entry.path());
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f4a1c2e-7b7d-4a8e-9c1f-2b3c4d5e6f70";

    #[test]
    fn finds_a_pod_cgroup_directory_by_uid() {
        let root = std::env::temp_dir().join(format!("ambit-podcg-{}", std::process::id()));
        let pod = root.join(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f4a1c2e_7b7d_4a8e_9c1f_2b3c4d5e6f70.slice",
        );
        fs::create_dir_all(pod.join("cri-containerd-1.scope")).unwrap();
        fs::create_dir_all(root.join("kubepods.slice/kubepods-podffff.slice")).unwrap();
        assert_eq!(find_pod_cgroup(&root, UID), Some(pod));
        assert_eq!(find_pod_cgroup(&root, "1234"), None);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn finds_the_pod_level_cgroup_in_every_layout() {
        let cases = [
            // systemd driver, containerd
            (
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f4a1c2e_7b7d_4a8e_9c1f_2b3c4d5e6f70.slice/cri-containerd-4d2b.scope\n",
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f4a1c2e_7b7d_4a8e_9c1f_2b3c4d5e6f70.slice",
            ),
            // systemd driver, CRI-O, guaranteed QoS (no QoS level)
            (
                "0::/kubepods.slice/kubepods-pod0f4a1c2e_7b7d_4a8e_9c1f_2b3c4d5e6f70.slice/crio-9a8b.scope\n",
                "/kubepods.slice/kubepods-pod0f4a1c2e_7b7d_4a8e_9c1f_2b3c4d5e6f70.slice",
            ),
            // cgroupfs driver
            (
                "0::/kubepods/burstable/pod0f4a1c2e-7b7d-4a8e-9c1f-2b3c4d5e6f70/8c2f1e\n",
                "/kubepods/burstable/pod0f4a1c2e-7b7d-4a8e-9c1f-2b3c4d5e6f70",
            ),
            // kind (cgroupRoot /kubelet), seen from the host
            (
                "0::/system.slice/docker-1234.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0f4a1c2e_7b7d_4a8e_9c1f_2b3c4d5e6f70.slice/cri-containerd-77.scope\n",
                "/system.slice/docker-1234.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0f4a1c2e_7b7d_4a8e_9c1f_2b3c4d5e6f70.slice",
            ),
            // hybrid host: v1 lines first, then the unified one; relative to another cgroupns
            (
                "12:pids:/kubepods/besteffort/pod0f4a1c2e-7b7d-4a8e-9c1f-2b3c4d5e6f70/ab\n0::/../../kubepods/besteffort/pod0f4a1c2e-7b7d-4a8e-9c1f-2b3c4d5e6f70/ab\n",
                "/../../kubepods/besteffort/pod0f4a1c2e-7b7d-4a8e-9c1f-2b3c4d5e6f70",
            ),
        ];
        for (file, want) in cases {
            let path = unified_path(file).unwrap();
            assert_eq!(pod_cgroup_prefix(path, UID), Some(want), "{file}");
        }
    }

    #[test]
    fn another_pods_cgroup_does_not_match() {
        let path = "/kubepods/besteffort/pod11111111-2222-3333-4444-555555555555/ab";
        assert_eq!(pod_cgroup_prefix(path, UID), None);
        assert_eq!(unified_path("1:name=systemd:/x\n"), None);
    }

    #[test]
    fn reads_a_netns_local_addresses_from_procfs_tables() {
        // `cat /proc/<pid>/net/fib_trie` of a pod with 10.244.1.5/24 (abridged: Local table).
        let fib_trie = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.0
           /24 link UNICAST
        |-- 10.244.1.5
           /32 host LOCAL
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.244.1.5
        /32 host LOCAL
     |-- 10.244.1.255
        /32 link BROADCAST
";
        assert_eq!(
            parse_fib_trie_locals(fib_trie),
            [
                "10.244.1.5".parse::<Ipv4Addr>().unwrap(),
                "127.0.0.1".parse().unwrap()
            ]
        );
        let if_inet6 = "fd000000000000000000000000000005 02 40 00 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
";
        assert_eq!(
            parse_if_inet6(if_inet6),
            ["fd00::5".parse::<Ipv6Addr>().unwrap(), Ipv6Addr::LOCALHOST]
        );
        // This process's own netns has at least its loopback address.
        assert!(local_addresses(Path::new("/proc/self")).contains(&"127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn start_time_skips_a_command_name_with_spaces() {
        let dir = std::env::temp_dir().join(format!("ambit-stat-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("stat"),
            "42 (my proc) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10\n",
        )
        .unwrap();
        assert_eq!(start_time(&dir), Some(98765));
        fs::remove_dir_all(&dir).unwrap();
    }
}
