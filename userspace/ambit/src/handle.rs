//! Noticing that a path the agent holds open (a pod's netns, its cgroup) now names something
//! else, or nothing. An open handle keeps the old object alive and usable, so nothing fails on
//! its own when a pod is killed or recreated: the agent has to compare.

use std::{fs::File, os::unix::fs::MetadataExt as _, path::Path};

/// Why `handle` no longer names what is at `path` (removed, or replaced by another `what`), or
/// None while it does. Identity is the (device, inode) pair.
pub fn replaced_or_gone(handle: &File, path: &Path, what: &str) -> Option<String> {
    let ours = match handle.metadata() {
        Ok(m) => (m.dev(), m.ino()),
        Err(e) => return Some(format!("{what} handle unreadable: {e}")),
    };
    match std::fs::metadata(path) {
        Err(e) => Some(format!("{what} {} is gone ({e})", path.display())),
        Ok(m) if (m.dev(), m.ino()) != ours => {
            Some(format!("{what} {} is now another {what}", path.display()))
        }
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_or_replaced_directory_is_noticed() {
        let base = std::env::temp_dir().join(format!("ambit-handle-{}", std::process::id()));
        let dir = base.join("pod");
        std::fs::create_dir_all(&dir).unwrap();
        let handle = File::open(&dir).unwrap();
        assert_eq!(replaced_or_gone(&handle, &dir, "cgroup"), None);

        std::fs::remove_dir(&dir).unwrap();
        let gone = replaced_or_gone(&handle, &dir, "cgroup").unwrap();
        assert!(
            gone.starts_with(&format!("cgroup {} is gone", dir.display())),
            "{gone}"
        );

        std::fs::create_dir(&dir).unwrap();
        let replaced = replaced_or_gone(&handle, &dir, "cgroup").unwrap();
        assert_eq!(
            replaced,
            format!("cgroup {} is now another cgroup", dir.display())
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
