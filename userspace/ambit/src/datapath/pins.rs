//! Where a node's eBPF objects live in bpffs:
//!
//! ```text
//! <bpffs>/ambit/<node>/<MAP>                 the maps (ENROLLED_NETNS, MESH_DESTINATIONS, ...)
//! <bpffs>/ambit/<node>/pods/<ns>_<name>/<program>   one bpf_link per program and pod
//! ```
//!
//! Every object has one owner: a node owns its directory, a pod its `pods/` entry. Pinned links
//! keep capture attached while the node process is down (connections then fail closed); the next
//! node process adopts them.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

pub use ambit_settings::DEFAULT_BPFFS;

#[derive(Debug, Clone)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(bpffs: &Path, node: &str) -> Result<Self> {
        if node.is_empty() || node.contains('/') || node.starts_with('.') {
            bail!("node name {node:?} cannot name a pin directory");
        }
        Ok(Self {
            root: bpffs.join("ambit").join(node),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn pods_dir(&self) -> PathBuf {
        self.root.join("pods")
    }

    pub fn pod_dir(&self, pod: &str) -> PathBuf {
        self.pods_dir().join(pod_dir_name(pod))
    }

    /// Pod directories found under `pods/` (from this or an earlier node process).
    pub fn pinned_pods(&self) -> Result<Vec<String>> {
        let dir = self.pods_dir();
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut pods = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            pods.push(pod_key_from_dir_name(&name));
        }
        pods.sort();
        Ok(pods)
    }

    /// Removes every pin of this node: detaches its programs from every pod and frees its maps
    /// (once no process holds them). `ambit reset`.
    pub fn remove_all(&self) -> Result<()> {
        if self.root.exists() {
            fs::remove_dir_all(&self.root)
                .with_context(|| format!("removing {}", self.root.display()))?;
        }
        Ok(())
    }
}

/// `default/client-a` → `default_client-a`. bpffs refuses names with a dot (EPERM), and
/// Kubernetes names never contain `_` (pod names may contain dots, namespaces neither), so
/// `_` stands for both the separator and a dot, reversibly.
pub fn pod_dir_name(pod: &str) -> String {
    pod.replace(['/', '.'], "_")
}

pub fn pod_key_from_dir_name(dir: &str) -> String {
    match dir.split_once('_') {
        Some((ns, name)) => format!("{ns}/{}", name.replace('_', ".")),
        None => dir.to_owned(),
    }
}

/// Is `path` on a bpf filesystem? (statfs magic BPF_FS_MAGIC)
pub fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dir_names_round_trip() {
        assert_eq!(pod_dir_name("default/client-a"), "default_client-a");
        assert_eq!(
            pod_key_from_dir_name("default_client-a"),
            "default/client-a"
        );
        assert_eq!(pod_key_from_dir_name(&pod_dir_name("ns/a.b")), "ns/a.b");
    }

    #[test]
    fn layout_is_per_node() {
        let l = PinLayout::new(Path::new("/sys/fs/bpf"), "node1").unwrap();
        assert_eq!(
            l.map("COUNTERS"),
            PathBuf::from("/sys/fs/bpf/ambit/node1/COUNTERS")
        );
        assert_eq!(
            l.pod_dir("default/a"),
            PathBuf::from("/sys/fs/bpf/ambit/node1/pods/default_a")
        );
        assert!(PinLayout::new(Path::new("/sys/fs/bpf"), "../x").is_err());
    }
}
