//! Small helpers every task uses, kept once.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The repository's root (xtask lives in it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Whether `command` is on PATH.
pub fn has_command(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this process has root's privileges (the effective uid: what the kernel checks).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
