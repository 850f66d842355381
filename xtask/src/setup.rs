//! Prerequisites, installed only when missing so that a second run takes a second.
//!
//! Versions are those known to build here (README, "Kernel"): the aya 0.14 train needs a
//! nightly's rust-src for `-Z build-std=core`, and bpf-linker 0.10.3, which uses that nightly
//! rustc's own LLVM 22 (0.11+ wants a system LLVM that Debian does not ship). The nightly is
//! pinned by date (`ebpf/nightly-toolchain`): a floating `nightly` moved to LLVM 23.

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::util::{has_command, is_root};

/// Debian packages the lab and tests use: (package, a command it provides, or an executable's
/// absolute path for packages that put nothing on PATH: `command -v` accepts a path).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("iproute2", "ip"),
    ("iperf3", "iperf3"),
    ("curl", "curl"),
    ("netcat-openbsd", "nc"),
    ("tcpdump", "tcpdump"),
    ("procps", "pgrep"),
    ("util-linux", "nsenter"),
    ("python3", "python3"),
    // `cargo xtask bench`: the iptables-capture baseline (rules only inside lab pods).
    ("iptables", "iptables"),
    // vm-tests (vm-tests/README.md): the guests and their initramfs.
    ("qemu-system-x86", "qemu-system-x86_64"),
    // Also the tests' container image (tests/common/cri.rs builds it from /bin/busybox).
    ("busybox-static", "busybox"),
    // tests/containerd.rs: a private containerd (its CRI plugin) playing a node's runtime; ctr
    // (in the containerd package) imports the tests' local images.
    ("containerd", "containerd"),
    ("runc", "runc"),
    // The CNI plugins containerd runs for a pod (bridge, host-local, loopback).
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
];

const BPF_LINKER_VERSION: &str = "0.10.3";

/// The dated nightly of the eBPF build (userspace/ambit/build.rs reads the same file).
pub fn ebpf_nightly() -> &'static str {
    include_str!("../../ebpf/nightly-toolchain").trim()
}

pub fn run() -> Result<()> {
    debian_packages()?;
    pinned_nightly()?;
    bpf_linker()?;
    if is_root() {
        ambit_lab::ensure_bpffs(std::path::Path::new("/sys/fs/bpf"))?;
    }
    Ok(())
}

fn debian_packages() -> Result<()> {
    let mut missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, command)| !has_command(command))
        .map(|(package, _)| *package)
        .collect();
    // `cargo xtask test` validates the Kubernetes manifests with PyPI's kubernetes-validate in a
    // venv; python3-venv provides no command to look for.
    if !python_venv_works() {
        missing.push("python3-venv");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them as root: apt-get install {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages {missing:?}");
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The pinned nightly with rust-src (the eBPF build) and clippy (the eBPF crate's lint).
fn pinned_nightly() -> Result<()> {
    let nightly = ebpf_nightly();
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", nightly, "--installed"])
        .stderr(Stdio::null())
        .output()
        .context("running rustup (Ambit's eBPF build needs a rustup nightly toolchain)")?;
    let components = String::from_utf8_lossy(&installed.stdout);
    if installed.status.success()
        && components.contains("rust-src")
        && components.contains("clippy")
    {
        return Ok(());
    }
    eprintln!("xtask: installing {nightly} with rust-src and clippy");
    run_cmd(Command::new("rustup").args([
        "toolchain",
        "install",
        nightly,
        "--profile",
        "minimal",
        "--component",
        "rust-src,clippy",
    ]))
}

fn bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = version {
        if String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (a few minutes, once)");
    run_cmd(Command::new("cargo").args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
    ]))
}

/// cargo-fuzz, for `cargo xtask stress`'s fuzzing (not part of `run`: only stress needs it).
pub fn cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (a few minutes, once)");
    run_cmd(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

fn python_venv_works() -> bool {
    Command::new("python3")
        .args(["-c", "import ensurepip, venv"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed");
    }
    Ok(())
}
