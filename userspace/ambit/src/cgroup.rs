//! cgroup v2: where it is mounted (it differs between a pure v2 host, `/sys/fs/cgroup`, and a
//! hybrid one, `/sys/fs/cgroup/unified`), and opening a pod's cgroup directory.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    find_cgroup2(&mountinfo).context("no cgroup2 filesystem is mounted (Ambit needs cgroup v2)")
}

/// mountinfo lines: `id parent major:minor root mountpoint options [optional...] - fstype ...`.
pub fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The node process's own cgroup directory, as this process sees the cgroup tree: the cgroup2
/// mount whose root is the root of this process's cgroup namespace, joined with the path in
/// `/proc/self/cgroup`. In a container with a private cgroup namespace that is the container's
/// own cgroup mount at /sys/fs/cgroup (path "/"); elsewhere the host's mount and the full path.
/// `None` when the process is in the host's root cgroup: nothing may be attached there (every
/// process on the host would run it).
pub fn own_cgroup() -> Result<Option<PathBuf>> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let membership =
        std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let Some(path) = membership.lines().find_map(|l| l.strip_prefix("0::")) else {
        bail!("/proc/self/cgroup has no cgroup v2 line (0::...)");
    };
    let Some(mount) = find_namespace_root_cgroup2(&mountinfo) else {
        bail!("no cgroup2 mount shows this process's cgroup namespace root");
    };
    let dir = resolve(&mount, Path::new(path));
    // Only the root of the whole hierarchy lacks cgroup.events.
    if !dir.join("cgroup.events").exists() {
        return Ok(None);
    }
    Ok(Some(dir))
}

/// A cgroup2 mount whose mountinfo root is "/": mountinfo shows a cgroup2 mount's root relative
/// to the reader's cgroup namespace, so a mount of an outer namespace's tree shows `/..`.
pub fn find_namespace_root_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mountpoint = fields.next()?;
        (root == "/").then(|| PathBuf::from(mountpoint))
    })
}

/// Resolves a pod's cgroup from the config: absolute, or relative to the cgroup2 mount.
pub fn resolve(root: &Path, cgroup: &Path) -> PathBuf {
    if cgroup.starts_with(root) {
        cgroup.to_owned()
    } else {
        root.join(cgroup.strip_prefix("/").unwrap_or(cgroup))
    }
}

/// An open pod cgroup directory: what the programs are attached to.
pub struct PodCgroup {
    path: PathBuf,
    dir: File,
}

impl PodCgroup {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.join("cgroup.procs").exists() {
            bail!("{} is not a cgroup v2 directory", path.display());
        }
        let dir = File::open(path).with_context(|| format!("opening cgroup {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            dir,
        })
    }

    pub fn dir(&self) -> &File {
        &self.dir
    }

    /// Why the cgroup we attached to is no longer at its path, or None while it is. A cgroup
    /// that is removed takes its programs with it, and one made again at the same path starts
    /// with none: the pod's traffic would leave uncaptured if the agent did not notice.
    pub fn vanished(&self) -> Option<String> {
        crate::handle::replaced_or_gone(&self.dir, &self.path, "cgroup")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let mountinfo = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            find_cgroup2(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup2_in_a_unified_layout_and_none_without() {
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let v1_only = "32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(find_cgroup2(v1_only), None);
    }

    #[test]
    fn the_own_cgroup_mount_is_the_one_rooted_at_the_namespace_root() {
        // A DaemonSet container: its own cgroup mount (private cgroup namespace), and the
        // node's tree mounted by the init container, which shows as outside the namespace.
        let container = "\
40 30 0:27 /../../.. /run/ambit/cgroupv2 rw - cgroup2 none rw
41 30 0:27 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
";
        assert_eq!(
            find_namespace_root_cgroup2(container),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let host = "31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_namespace_root_cgroup2(host),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn this_process_has_a_cgroup_of_its_own_or_is_in_the_root() {
        // Whatever the machine, the answer is an existing cgroup directory (or the root).
        if let Some(dir) = own_cgroup().unwrap() {
            assert!(dir.join("cgroup.procs").exists(), "{}", dir.display());
        }
    }

    #[test]
    fn resolves_relative_and_absolute_pod_cgroups() {
        let root = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            resolve(root, Path::new("ambit-lab/a")),
            PathBuf::from("/sys/fs/cgroup/unified/ambit-lab/a")
        );
        assert_eq!(
            resolve(root, Path::new("/ambit-lab/a")),
            PathBuf::from("/sys/fs/cgroup/unified/ambit-lab/a")
        );
        assert_eq!(
            resolve(root, Path::new("/sys/fs/cgroup/unified/x")),
            PathBuf::from("/sys/fs/cgroup/unified/x")
        );
    }
}
