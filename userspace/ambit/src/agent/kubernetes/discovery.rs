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
    fs,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
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
    fn locate(&self, pod_uid: &str) -> Option<PodLocation>;

    /// The addresses of a pod whose sandbox the CNI plugin reported, before the API server
    /// knows them (the pod is still `Pending` then): such a pod is captured from its start.
    fn sandbox_ips(&self, _pod_uid: &str) -> Option<Vec<IpAddr>> {
        None
    }
}

/// The real locator: scans `<proc_root>/*/cgroup`.
pub struct ProcLocator {
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
}

impl PodLocator for ProcLocator {
    fn locate(&self, pod_uid: &str) -> Option<PodLocation> {
        // Neither the agent's own netns nor the node's (pid 1's): a process of the pod's cgroup
        // in one of those (CRI-O's conmon, a host-network helper) is not in the pod's netns.
        let excluded: Vec<u64> = ["self/ns/net", "1/ns/net"]
            .iter()
            .filter_map(|p| fs::metadata(self.proc_root.join(p)).ok())
            .map(|m| m.ino())
            .collect();
        let mut best: Option<(u64, u32, String)> = None; // (start time, pid, cgroup path)
        for entry in fs::read_dir(&self.proc_root).ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let dir = entry.path();
            let Ok(cgroups) = fs::read_to_string(dir.join("cgroup")) else {
                continue;
            };
            let Some(path) = unified_path(&cgroups) else {
                continue;
            };
            if pod_cgroup_prefix(path, pod_uid).is_none() {
                continue;
            }
            // A process in the node's own netns is not the pod's (host-network pods are never
            // enrolled anyway).
            let Some(netns) = fs::metadata(dir.join("ns/net")).ok().map(|m| m.ino()) else {
                continue;
            };
            if excluded.contains(&netns) {
                continue;
            }
            let Some(start) = start_time(&dir) else {
                continue;
            };
            if best.as_ref().is_none_or(|(s, _, _)| start < *s) {
                best = Some((start, pid, path.to_owned()));
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
