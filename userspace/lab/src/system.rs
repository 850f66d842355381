//! This machine: root, iproute2 and sysctls, the cgroup2 and bpffs mounts, CPUs, waiting, files.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the lab and Ambit's privileged integration tests need root (network namespaces, \
             cgroups, eBPF); run them as root, e.g. `sudo -E cargo xtask test`"
        );
    }
    Ok(())
}

/// Runs `cmd` to completion: its stdout, or an error that names `what` and quotes its stderr.
pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs iproute2's `ip` with `args`.
pub fn ip(args: &[&str]) -> Result<()> {
    run(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
    )
    .map(drop)
}

pub(crate) fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "sh", "-c"])
        .arg(format!("echo {value} > {path}"));
    run(&mut cmd, &format!("sysctl {key}={value} in {ns}")).map(drop)
}

/// The cgroup2 mount point, from /proc/self/mountinfo (hybrid hosts mount it at
/// /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    for line in mountinfo.lines() {
        if let Some((left, right)) = line.split_once(" - ") {
            if right.split_whitespace().next() == Some("cgroup2") {
                if let Some(mp) = left.split_whitespace().nth(4) {
                    return Ok(PathBuf::from(mp));
                }
            }
        }
    }
    bail!("no cgroup2 filesystem mounted")
}

/// Mounts bpffs at `path` if it is not mounted there yet.
pub fn ensure_bpffs(path: &Path) -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    let target = path.to_str().unwrap();
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(1) == Some(target) && f.next() == Some("bpf")
    }) {
        return Ok(());
    }
    fs::create_dir_all(path)?;
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf", target])
        .status()?;
    if !status.success() {
        bail!("mount -t bpf bpf {target} failed");
    }
    Ok(())
}

/// This machine's CPUs (1 if unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `ambit node --worker-threads` for each of `nodes` lab nodes: they share this machine's
/// `cores` as real nodes would each have their own. More workers than that only add wake-ups
/// between threads (`cargo xtask bench` measured it: README, Benchmark).
pub fn worker_threads_per_node(cores: usize, nodes: usize) -> usize {
    (cores / nodes.max(1)).max(1)
}

/// Polls `check` until it holds, or fails after `timeout` naming `what`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let timeout = timeout.mul_f64(timeout_scale()); // slower under vm-tests: see timeout_scale
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Factor for the tests' wait timeouts: `AMBIT_TEST_TIMEOUT_SCALE` (default 1), which
/// `cargo xtask vm-test` sets in its guests, where qemu's emulation (TCG) is 10-30x slower.
pub fn timeout_scale() -> f64 {
    std::env::var("AMBIT_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f >= 1.0)
        .unwrap_or(1.0)
}

/// Writes `text` to `path` atomically (write to a temp file, then rename), as editors do.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}
