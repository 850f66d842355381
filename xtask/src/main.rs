//! `cargo xtask <command>`: everything around the code — prerequisites, the lab, tests.
//!
//! - `setup`: installs what a fresh machine lacks (Debian packages, nightly rust-src,
//!   bpf-linker), idempotently; every other command runs it first.
//! - `test`: lint, build, unit and privileged integration tests, and a check that the tests
//!   left nothing behind. The README's test command and what CI runs.
//! - `lab`: Ambit's main job on one machine (see README).
//! - `bench`: every mode (plain, iptables capture, Ambit across and within a node) on the lab,
//!   repeated, as a table with the spread and ratios to plain, JSON and a chart.
//! - `stress`: the reliability tests at full scale (10,000 held, 100,000 churned, 5 minutes of
//!   mixed load, faults, hostile peers) and every fuzz target, as a table.

mod bench;
mod kind;
mod lab;
mod setup;
mod stress;
mod util;
mod vmtest;

use std::os::unix::fs::MetadataExt as _;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Ambit's build, lab and test tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites (idempotent; quick when all are present).
    Setup,
    /// Lint, build and run every test, including the privileged integration tests (root).
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the vm-tests (the data-path tests on other kernels under qemu).
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Run the two-node lab: capture a real request, show where to look, tear down on Ctrl-C.
    Lab {
        /// Run the demonstration once and tear down (for scripts).
        #[arg(long)]
        once: bool,
        /// Where the nodes get the mesh: `file` (each node watches the config file) or `xds`
        /// (a stand-in istiod, `ambit control-plane`, serves the file over delta xDS and signs
        /// the nodes' certificates; the nodes hold no CA key).
        #[arg(long, value_enum, default_value = "file")]
        source: lab::Source,
    },
    /// Run the privileged data-path tests on Debian's 6.1 and 6.12 kernels under qemu, and on
    /// the host's kernel directly (see vm-tests/README.md); one line per kernel.
    VmTest {
        /// `host`, a name from vm-tests/kernels.txt (`6.1`, `6.12`) or a Debian package
        /// (`linux-image-6.1.0-47-amd64`); repeatable. Default: all of them and the host.
        #[arg(long)]
        kernel: Vec<String>,
        /// Seconds one guest may take, boot to power-off, before it is killed as hung.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
    },
    /// Ambit as a DaemonSet on a kind cluster (needs Docker and kind): up, demo, down.
    Kind {
        #[command(subcommand)]
        command: kind::KindCommand,
        /// Print the commands instead of running them.
        #[arg(long, global = true)]
        dry_run: bool,
    },
    /// Validate the Kubernetes manifests (schemas, and the DaemonSet against `ambit node`).
    ValidateManifests,
    /// Benchmark every mode on the lab (plain, iptables capture, Ambit across and within a
    /// node), repeated; prints the table and writes target/bench/{results.json,results.md,chart.svg}.
    Bench(bench::Args),
    /// The reliability tests at full scale (load, churn, soak, faults, hostile peers) in a
    /// release build, then every fuzz target; a table.
    Stress(stress::Args),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Test {
            no_lint,
            no_vm,
            cargo_args,
        } => test(!no_lint, !no_vm, &cargo_args),
        Task::Lab { once, source } => {
            setup::run()?;
            lab::run(once, source)
        }
        Task::VmTest { kernel, timeout } => {
            setup::run()?;
            vmtest::run(&vmtest::Options {
                kernels: kernel,
                with_host: true,
                timeout: std::time::Duration::from_secs(timeout),
            })
        }
        Task::Kind { command, dry_run } => kind::run(command, dry_run),
        Task::ValidateManifests => kind::validate_manifests(),
        Task::Bench(args) => {
            setup::run()?;
            bench::run(&args)
        }
        Task::Stress(args) => {
            setup::run()?;
            stress::run(&args)
        }
    }
}

/// Prefix of the integration tests' labs (userspace/ambit/tests/common).
const TEST_LAB_PREFIX: &str = "ambit-t";

fn test(lint: bool, vm: bool, cargo_args: &[String]) -> Result<()> {
    setup::run()?;
    ambit_lab::require_root()?;
    // No `--workspace`: the default members exclude ebpf/ambit-ebpf, which only builds for
    // bpfel-unknown-none (userspace/ambit/build.rs builds it) and is linted separately below.
    if lint {
        cargo(&["fmt", "--all", "--check"])?;
        cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
        // The eBPF crate is linted for its real target.
        let nightly = format!("+{}", setup::ebpf_nightly());
        cargo(&[
            &nightly,
            "clippy",
            "-p",
            "ambit-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])?;
    }
    // Leftovers of an interrupted earlier run would only confuse this one.
    ambit_lab::sweep(TEST_LAB_PREFIX)?;
    cargo(&["build"])?;
    // The Kubernetes deployment: every manifest against the schemas and the DaemonSet against
    // `ambit node`; the kind lab's commands as a dry run (no Docker engine needed).
    kind::validate_manifests()?;
    for command in [
        kind::KindCommand::Up,
        kind::KindCommand::Demo,
        kind::KindCommand::Down,
    ] {
        kind::run(command, true)?;
    }
    // The interop suite (userspace/ambit/tests/interop.rs) needs Istio's ztunnel; say whether
    // it runs, since its tests pass trivially without it.
    match ambit_lab::Ztunnel::find() {
        Ok(z) => println!("interop suite: runs against {}", z.bin.display()),
        Err(why) => println!("interop suite: SKIPPED: {why}"),
    }
    let mut args = vec!["test", "--no-fail-fast"];
    args.extend(cargo_args.iter().map(String::as_str));
    let mut result = cargo(&args);
    if cargo_args.is_empty() && result.is_ok() {
        // The data-path suites again with the fast path on (`--fast-path on`, off by default):
        // every byte of them must still arrive through sk_msg (docs/fast-path.md).
        println!("the data-path suites again with --fast-path on");
        result = cargo_with_env(
            &[
                "test",
                "--no-fail-fast",
                "-p",
                "ambit",
                "--test",
                "hbone",
                "--test",
                "capture",
                "--test",
                "source_address",
                "--test",
                "stress",
                "--test",
                "abuse",
                "--test",
                "security",
                "--test",
                "policy",
                "--test",
                "handover",
                // Not interop: its half-close step (a blocking server that half-closes first,
                // then reads) meets a kernel limit of the fast path, a blocking recv() that
                // returns EAGAIN (docs/fast-path.md, "Kernel limits").
            ],
            &[("AMBIT_TEST_NODE_ARGS", "--fast-path on")],
        );
    }
    let leftovers = leftovers(TEST_LAB_PREFIX)?;
    ambit_lab::sweep(TEST_LAB_PREFIX)?;
    result?;
    if !leftovers.is_empty() {
        bail!(
            "the tests left these behind (now removed):\n  {}",
            leftovers.join("\n  ")
        );
    }
    println!("all tests passed; no netns, cgroup, pin or process left behind");
    if vm {
        // The data-path tests on Debian's kernels under qemu (the host's ran above).
        vmtest::run(&vmtest::Options {
            kernels: Vec::new(),
            with_host: false,
            timeout: std::time::Duration::from_secs(1800),
        })?;
    }
    Ok(())
}

/// Network namespaces, cgroups, bpffs pins and handover sockets whose names start with
/// `prefix`.
fn leftovers(prefix: &str) -> Result<Vec<String>> {
    let cgroup_root = ambit_lab::cgroup2_root()?;
    let mut found = Vec::new();
    for dir in [
        std::path::PathBuf::from("/run/netns"),
        cgroup_root,
        std::path::PathBuf::from("/sys/fs/bpf/ambit"),
        std::path::PathBuf::from(ambit_lab::HANDOVER_SOCKET_DIR),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(prefix) {
                    found.push(e.path().display().to_string());
                }
            }
        }
    }
    // Processes still inside one of the lab's network namespaces (nodes, the stand-in istiod,
    // ztunnels, servers): only this run's, whatever else runs on the machine.
    let lab_namespaces: Vec<u64> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter_map(|e| e.metadata().ok().map(|m| m.ino()))
        .collect();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(netns) = std::fs::metadata(entry.path().join("ns/net")) else {
            continue;
        };
        if lab_namespaces.contains(&netns.ino()) {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("process {pid} ({})", name.trim()));
        }
    }
    Ok(found)
}

pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

/// `cargo <args>` with more environment variables.
pub fn cargo_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    // `cargo +nightly` works through rustup's proxy, not through the resolved cargo binary.
    let program = if args.first().is_some_and(|a| a.starts_with('+')) {
        "cargo".to_owned()
    } else {
        util::cargo_program()
    };
    let status = util::cargo_command(&program)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}
