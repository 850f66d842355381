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

/// A `cargo` command that builds exactly what the same command typed in a shell builds, so
/// that the two share one build. `cargo xtask` runs this process under `cargo run`, which sets
/// the package's variables (CARGO_PKG_NAME=xtask, CARGO_MANIFEST_DIR, …) in its environment;
/// ring's build script declares `rerun-if-env-changed` on them, so a nested cargo that
/// inherited them re-ran it and rebuilt ring and everything above it (rustls, kube, rcgen,
/// ambit: six minutes in release) — and the next plain `cargo build` rebuilt them back.
/// `RUSTUP_TOOLCHAIN` goes too: `cargo +toolchain` and the repository's own choice must win.
pub fn cargo_command(program: &str) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&name.as_ref())
            || name == "RUSTUP_TOOLCHAIN"
        {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// The cargo that runs xtask (`$CARGO`), or the one on PATH.
pub fn cargo_program() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}
