//! `cargo xtask vm-test`: Ambit's privileged data-path tests on other kernels.
//!
//! Every kernel of vm-tests/kernels.txt (a Debian package, fetched with `apt-get download`
//! and unpacked once into target/vm-tests/kernels/) boots under qemu — TCG emulation, since
//! KVM hangs on this project's machines — with a small initramfs: static busybox, the
//! kernel's own modules (vm-tests/modules.txt) and vm-tests/init. The guest mounts the host's
//! root filesystem read-only over 9p under a tmpfs overlay, so it runs the host's tools and
//! the test binaries built here (vm-tests/tests.txt), and writes their output to a shared run
//! directory. The host's kernel runs the same tests directly. See vm-tests/README.md.
//!
//! Prints one line per kernel (`vm-test <kernel>: N passed, M failed (T s)`), followed on
//! failure by the failed tests' output (which holds the node's log, and so the verifier's).

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

/// Wait timeouts in the guests are multiplied by this (AMBIT_TEST_TIMEOUT_SCALE, read by
/// userspace/lab and the tests' common module): TCG is 10-30x slower than the host.
const GUEST_TIMEOUT_SCALE: u32 = 6;
/// vCPUs and memory of a guest. Two vCPUs are two host threads under TCG (MTTCG).
const GUEST_CPUS: u32 = 2;
const GUEST_MEMORY_MIB: u32 = 2048;
/// Failure output shown per test binary: the head and the tail (where a verifier log ends
/// with the rejected instruction); the whole output stays in the run directory.
const DETAIL_HEAD: usize = 40;
const DETAIL_TAIL: usize = 120;

pub struct Options {
    /// `host`, a name from vm-tests/kernels.txt, or a Debian package name; none: every
    /// kernel of the list (and the host's, if `with_host`).
    pub kernels: Vec<String>,
    pub with_host: bool,
    /// Limit for one guest, boot to power-off; a guest still running then is killed.
    pub timeout: Duration,
}

/// What one kernel's run came to.
struct Outcome {
    kernel: String,
    passed: usize,
    failed: usize,
    secs: u64,
    failed_tests: Vec<String>,
    /// Why it failed: test output, or what went wrong around the tests.
    details: String,
    logs: PathBuf,
}

impl Outcome {
    fn broken(kernel: &str, secs: u64, planned: usize, details: String, logs: PathBuf) -> Self {
        Self {
            kernel: kernel.to_owned(),
            passed: 0,
            failed: planned.max(1),
            secs,
            failed_tests: Vec::new(),
            details,
            logs,
        }
    }

    fn ok(&self) -> bool {
        self.failed == 0 && self.passed > 0
    }

    fn summary(&self) -> String {
        let mut line = format!(
            "vm-test {}: {} passed, {} failed ({} s)",
            self.kernel, self.passed, self.failed, self.secs
        );
        if !self.failed_tests.is_empty() {
            line.push_str(&format!(" — failed: {}", self.failed_tests.join(", ")));
        }
        line
    }
}

/// One test binary of the plan and the tests it runs.
struct PlannedBinary {
    name: String,
    exe: PathBuf,
    tests: Vec<String>,
}

struct Paths {
    root: PathBuf,
    /// target/vm-tests
    work: PathBuf,
}

pub fn run(options: &Options) -> Result<()> {
    ambit_lab::require_root()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_owned();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"));
    let paths = Paths {
        work: target.join("vm-tests"),
        root,
    };
    fs::create_dir_all(&paths.work)?;
    let _lock = lock(&paths.work.join(".lock"))?;

    let lines = kernel_lines(&paths.root.join("vm-tests/kernels.txt"))?;
    let mut host = false;
    let mut debian: Vec<(String, Option<&KernelLine>)> = Vec::new();
    if options.kernels.is_empty() {
        host = options.with_host;
        debian.extend(lines.iter().map(|l| (l.name.clone(), Some(l))));
    }
    for k in &options.kernels {
        if k == "host" {
            host = true;
        } else if let Some(line) = lines.iter().find(|l| &l.name == k) {
            debian.push((k.clone(), Some(line)));
        } else if k.starts_with("linux-image-") {
            debian.push((k.clone(), None));
        } else {
            let names: Vec<&str> = lines.iter().map(|l| l.name.as_str()).collect();
            bail!(
                "unknown kernel {k:?}: use `host`, one of {names:?} (vm-tests/kernels.txt) or a \
                 Debian package name such as linux-image-6.1.0-47-amd64"
            );
        }
    }
    if !debian.is_empty() {
        check_tools()?;
    }

    let plan = build_plan(&paths)?;
    let planned: usize = plan.iter().map(|b| b.tests.len()).sum();
    let mut outcomes = Vec::new();
    if host {
        let outcome = run_host(&paths, &plan, planned);
        print_outcome(&outcome);
        outcomes.push(outcome);
    }
    if !debian.is_empty() {
        let snapshot = Snapshot::take(&paths.work.join("snapshot"), &plan)?;
        for (name, line) in &debian {
            let started = Instant::now();
            let outcome = match fetch_kernel(&paths, name, *line) {
                Ok(kernel) => run_guest(&paths, &kernel, &snapshot, planned, options.timeout),
                Err(e) => Outcome::broken(
                    name,
                    started.elapsed().as_secs(),
                    planned,
                    format!("could not get the kernel: {e:#}"),
                    paths.work.join("kernels"),
                ),
            };
            print_outcome(&outcome);
            outcomes.push(outcome);
        }
    }

    println!();
    for o in &outcomes {
        println!("{}", o.summary());
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok())
        .map(|o| o.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

fn print_outcome(o: &Outcome) {
    println!("{}", o.summary());
    if !o.ok() {
        for line in o.details.lines() {
            println!("    {line}");
        }
        println!("    (logs: {})", o.logs.display());
    }
}

// --- the plan: which tests, built where ---------------------------------------------------

fn build_plan(paths: &Paths) -> Result<Vec<PlannedBinary>> {
    let file = paths.root.join("vm-tests/tests.txt");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let mut wanted: Vec<(String, Vec<String>)> = Vec::new();
    for (n, line) in config_lines(&text) {
        let mut f = line.split_whitespace();
        let (Some(binary), Some(test), None) = (f.next(), f.next(), f.next()) else {
            bail!(
                "{}:{n}: expected `<test binary> <test name>`",
                file.display()
            );
        };
        match wanted.iter_mut().find(|(b, _)| b == binary) {
            Some((_, tests)) => tests.push(test.to_owned()),
            None => wanted.push((binary.to_owned(), vec![test.to_owned()])),
        }
    }
    if wanted.is_empty() {
        bail!("{} lists no tests", file.display());
    }
    let names: Vec<&str> = wanted.iter().map(|(b, _)| b.as_str()).collect();
    let exes = build_test_binaries(&names)?;
    let mut plan = Vec::new();
    for (binary, tests) in wanted {
        let exe = exes
            .get(&binary)
            .with_context(|| format!("cargo built no test binary {binary}"))?
            .clone();
        let listed = list_tests(&exe)?;
        for t in &tests {
            if !listed.contains(t) {
                bail!(
                    "{}: test binary {binary} has no test {t} (renamed? update the list)",
                    file.display()
                );
            }
        }
        plan.push(PlannedBinary {
            name: binary,
            exe,
            tests,
        });
    }
    Ok(plan)
}

/// Builds the `ambit` package's integration tests (and so the `ambit` binary they run);
/// returns each test binary's executable by name.
fn build_test_binaries(names: &[&str]) -> Result<HashMap<String, PathBuf>> {
    let mut cmd = crate::util::cargo_command(&crate::util::cargo_program());
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
        "-p",
        "ambit",
    ]);
    for n in names {
        cmd.args(["--test", n]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run (building the vm-tests' test binaries) failed");
    }
    Ok(test_executables(&String::from_utf8_lossy(&out.stdout)))
}

/// Test target name → executable, from cargo's JSON messages (one per line).
fn test_executables(messages: &str) -> HashMap<String, PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["kind"][0] == "test")
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?.to_owned();
            let exe = m["executable"].as_str()?;
            Some((name, PathBuf::from(exe)))
        })
        .collect()
}

fn list_tests(exe: &Path) -> Result<HashSet<String>> {
    let out = Command::new(exe)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("listing the tests of {}", exe.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect())
}

/// The test binaries and `ambit` as they were when the run started (hard links, or copies),
/// so that a rebuild on the host while the guests run changes nothing in them.
struct Snapshot {
    dir: PathBuf,
    /// (plan entry name, executable in the snapshot, tests)
    binaries: Vec<(String, PathBuf, Vec<String>)>,
    /// (snapshot, path the tests have compiled in)
    binds: Vec<(PathBuf, PathBuf)>,
}

impl Snapshot {
    fn take(dir: &Path, plan: &[PlannedBinary]) -> Result<Self> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        let mut snapshot = Snapshot {
            dir: dir.to_owned(),
            binaries: Vec::new(),
            binds: Vec::new(),
        };
        for b in plan {
            let copy = dir.join(&b.name);
            link_or_copy(&b.exe, &copy)?;
            snapshot
                .binaries
                .push((b.name.clone(), copy, b.tests.clone()));
        }
        // CARGO_BIN_EXE_ambit: every test binary was built against the same `ambit`.
        let ambit = ambit_next_to(&plan[0].exe)?;
        let copy = dir.join("ambit");
        link_or_copy(&ambit, &copy)?;
        snapshot.binds.push((copy, ambit));
        Ok(snapshot)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The `ambit` binary next to a test binary (target/<profile>/deps/x → target/<profile>/ambit),
/// which is what CARGO_BIN_EXE_ambit names.
fn ambit_next_to(test_exe: &Path) -> Result<PathBuf> {
    let ambit = test_exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("ambit"))
        .context("locating the ambit binary")?;
    if !ambit.exists() {
        bail!("{} not built", ambit.display());
    }
    Ok(ambit)
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

// --- the host's own kernel ------------------------------------------------------------------

fn run_host(paths: &Paths, plan: &[PlannedBinary], planned: usize) -> Outcome {
    let started = Instant::now();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let kernel = format!("{release} (host)");
    let dir = paths.work.join("host");
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = fs::create_dir_all(&dir) {
        return Outcome::broken(&kernel, 0, planned, format!("{e:#}"), dir);
    }
    println!("vm-test {kernel}: running {planned} tests directly");
    let mut results = Vec::new();
    for b in plan {
        let out = Command::new(&b.exe)
            .arg("--exact")
            .args(&b.tests)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .output();
        let text = match out {
            Ok(o) => {
                let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
                t.push_str(&String::from_utf8_lossy(&o.stderr));
                results.push(BinaryResult::parse(&b.name, &b.tests, &t, o.status.code()));
                t
            }
            Err(e) => {
                let t = format!("could not run {}: {e}", b.exe.display());
                results.push(BinaryResult::parse(&b.name, &b.tests, &t, None));
                t
            }
        };
        let _ = fs::write(dir.join(format!("{}.out", b.name)), text);
    }
    Outcome::from_results(&kernel, started.elapsed().as_secs(), results, dir)
}

// --- kernels ----------------------------------------------------------------------------

struct KernelLine {
    name: String,
    meta: String,
    pattern: String,
}

fn kernel_lines(file: &Path) -> Result<Vec<KernelLine>> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    config_lines(&text)
        .map(|(n, line)| {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f[..] {
                [name, meta, pattern] => Ok(KernelLine {
                    name: name.into(),
                    meta: meta.into(),
                    pattern: pattern.into(),
                }),
                _ => bail!(
                    "{}:{n}: expected `<name> <meta-package> <pattern>`",
                    file.display()
                ),
            }
        })
        .collect()
}

/// Non-empty, non-comment lines with their line numbers.
fn config_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// An unpacked kernel package.
struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

fn fetch_kernel(paths: &Paths, name: &str, line: Option<&KernelLine>) -> Result<Kernel> {
    let dir = paths.work.join("kernels");
    fs::create_dir_all(&dir)?;
    let package = match line {
        None => name.to_owned(),
        Some(line) => match newest_package(line) {
            Ok(p) => p,
            Err(e) => {
                // Offline, or the lists are gone: the newest kernel of the line already here.
                let cached = cached_packages(&dir, &line.pattern);
                let p = cached.into_iter().max_by(|a, b| version_cmp(a, b));
                p.ok_or(e)?
            }
        },
    };
    let tree = dir.join(&package);
    if !tree.join(".complete").exists() {
        println!("vm-test {name}: fetching {package}");
        unpack_package(&dir, &package, &tree)?;
    }
    let release = fs::read_to_string(tree.join(".complete"))?
        .trim()
        .to_owned();
    Ok(Kernel {
        vmlinuz: tree.join(format!("boot/vmlinuz-{release}")),
        modules: tree.join(format!("lib/modules/{release}")),
        release,
    })
}

/// The package a kernel line stands for now: what its meta-package depends on, or else the
/// newest package matching its pattern.
fn newest_package(line: &KernelLine) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", &line.meta])
        .output()
        .context("running apt-cache")?;
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(p) = l.trim().strip_prefix("Depends: ") {
            if glob(&line.pattern, p) {
                return Ok(p.to_owned());
            }
        }
    }
    let out = Command::new("apt-cache")
        .args(["pkgnames", "linux-image-"])
        .output()
        .context("running apt-cache")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|p| glob(&line.pattern, p))
        .max_by(|a, b| version_cmp(a, b))
        .map(str::to_owned)
        .ok_or_else(|| {
            anyhow!(
                "no package matches {} (nor does {}'s dependency); try apt-get update",
                line.pattern,
                line.meta
            )
        })
}

fn cached_packages(dir: &Path, pattern: &str) -> Vec<String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(".complete").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|p| glob(pattern, p))
        .collect()
}

/// Downloads a kernel package, unpacks it and generates its modules.dep (which Debian
/// generates at install time); `.complete` holds its release (`uname -r`).
fn unpack_package(dir: &Path, package: &str, tree: &Path) -> Result<()> {
    let debs = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
            })
            .collect()
    };
    if debs(dir).is_empty() {
        let download = || {
            Command::new("apt-get")
                // As root into target/: apt's sandbox user could not write there.
                .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
                .current_dir(dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !download() {
            eprintln!("vm-test: apt-get download {package} failed; apt-get update and retry");
            let _ = Command::new("apt-get").args(["update", "-qq"]).status();
            if !download() {
                bail!("apt-get download {package} failed");
            }
        }
    }
    let deb = debs(dir)
        .pop()
        .with_context(|| format!("no .deb of {package} after apt-get download"))?;
    let partial = dir.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    run_quiet(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    let modules = partial.join("lib/modules");
    let release = fs::read_dir(&modules)
        .with_context(|| format!("{} has no lib/modules", deb.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{} has no lib/modules", deb.display()))?;
    run_quiet(
        Command::new("busybox")
            .args(["depmod", "-b"])
            .arg(&partial)
            .arg(&release),
    )?;
    fs::write(partial.join(".complete"), format!("{release}\n"))?;
    let _ = fs::remove_dir_all(tree);
    fs::rename(&partial, tree)?;
    let _ = fs::remove_file(&deb);
    Ok(())
}

/// `*` matches any run of characters; everything else matches itself.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || !s[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// Orders package names with their numbers compared as numbers (6.12.117 > 6.12.99).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => x
                .parse::<u64>()
                .unwrap_or(0)
                .cmp(&y.parse::<u64>().unwrap_or(0)),
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

// --- the guest --------------------------------------------------------------------------

fn check_tools() -> Result<()> {
    for (command, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("apt-get", "apt"),
        ("dpkg", "dpkg"),
    ] {
        if which(command).is_none() {
            bail!("vm-test needs {command}: apt-get install {package} (cargo xtask setup)");
        }
    }
    let busybox = which("busybox").unwrap();
    if !is_static_elf(&busybox)? {
        bail!(
            "{} is dynamically linked; the guest's initramfs needs busybox-static \
             (apt-get install busybox-static)",
            busybox.display()
        );
    }
    Ok(())
}

fn which(command: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(command))
            .find(|p| p.is_file())
    })
}

/// Whether an x86-64 ELF executable has no program interpreter (PT_INTERP).
fn is_static_elf(path: &Path) -> Result<bool> {
    let data = fs::read(path)?;
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > data.len() {
            break;
        }
        if u32::from_le_bytes(data[o..o + 4].try_into()?) == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

fn run_guest(
    paths: &Paths,
    kernel: &Kernel,
    snapshot: &Snapshot,
    planned: usize,
    timeout: Duration,
) -> Outcome {
    let started = Instant::now();
    let dir = paths.work.join(&kernel.release);
    let result = (|| -> Result<Outcome> {
        let share = prepare_run_dir(paths, &dir, snapshot, timeout)?;
        let initrd = dir.join("initrd.cpio");
        build_initramfs(paths, kernel, &initrd)?;
        println!(
            "vm-test {}: booting under qemu (TCG), {planned} tests, timeout {} s",
            kernel.release,
            timeout.as_secs()
        );
        let mut guest = boot(kernel, &initrd, &share, &dir)?;
        let finished = guest.wait(timeout)?;
        let secs = started.elapsed().as_secs();
        collect(kernel, &share, &dir, snapshot, finished, secs)
    })();
    result.unwrap_or_else(|e| {
        Outcome::broken(
            &kernel.release,
            started.elapsed().as_secs(),
            planned,
            format!("{e:#}"),
            dir,
        )
    })
}

/// target/vm-tests/<release>/: initrd.cpio, console.log, and share/ — the guest's /vmtest
/// (guest.sh, env, binds, plan; the guest writes <binary>.out and .rc back).
fn prepare_run_dir(
    paths: &Paths,
    dir: &Path,
    snapshot: &Snapshot,
    timeout: Duration,
) -> Result<PathBuf> {
    let _ = fs::remove_dir_all(dir);
    let share = dir.join("share");
    fs::create_dir_all(&share)?;
    fs::copy(paths.root.join("vm-tests/guest.sh"), share.join("guest.sh"))?;
    // A test binary that hangs is killed at half the guest's time, so that the guest still
    // reports which test hung, and the binaries after it still run.
    let binary_timeout = (timeout.as_secs() / 2).max(60);
    fs::write(
        share.join("env"),
        format!(
            "AMBIT_TEST_TIMEOUT_SCALE={GUEST_TIMEOUT_SCALE}\nTEST_THREADS=1\n\
             BINARY_TIMEOUT={binary_timeout}\n"
        ),
    )?;
    let mut binds = String::new();
    for (from, to) in &snapshot.binds {
        binds.push_str(&format!("{} {}\n", from.display(), to.display()));
    }
    fs::write(share.join("binds"), binds)?;
    let mut plan = String::new();
    for (name, exe, tests) in &snapshot.binaries {
        plan.push_str(&format!("{name} {} {}\n", exe.display(), tests.join(" ")));
    }
    fs::write(share.join("plan"), plan)?;
    Ok(share)
}

/// The guest's initramfs (newc cpio, uncompressed): /init, /bin/busybox, /dev/console and
/// the modules of vm-tests/modules.txt with their dependencies, /modules/order listing them
/// in load order.
fn build_initramfs(paths: &Paths, kernel: &Kernel, out: &Path) -> Result<()> {
    let wanted_file = paths.root.join("vm-tests/modules.txt");
    let wanted_text = fs::read_to_string(&wanted_file)?;
    let wanted: Vec<&str> = config_lines(&wanted_text).map(|(_, l)| l).collect();
    let modules = module_closure(&kernel.modules, &wanted)?;

    let mut cpio = Cpio::default();
    for d in [
        "bin", "dev", "proc", "sys", "modules", "newroot", "lower", "rw", "tmp",
    ] {
        cpio.dir(d);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file("init", 0o755, &fs::read(paths.root.join("vm-tests/init"))?);
    cpio.file(
        "bin/busybox",
        0o755,
        &fs::read(which("busybox").context("busybox")?)?,
    );
    let mut order = String::new();
    for (name, path) in &modules {
        cpio.file(&format!("modules/{name}.ko"), 0o644, &decompress(path)?);
        order.push_str(name);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes());
    fs::write(out, cpio.finish())?;
    Ok(())
}

/// Modules named `wanted` and their dependencies, dependencies first; built-in ones are left
/// out. From the package's modules.dep (generated by busybox depmod when it was unpacked).
fn module_closure(dir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    fn base(path: &str) -> String {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    }
    let dep = fs::read_to_string(dir.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", dir.display()))?;
    let mut table: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        if let Some((path, deps)) = line.split_once(':') {
            let deps = deps.split_whitespace().map(base).collect();
            table.insert(base(path), (path.to_owned(), deps));
        }
    }
    let builtin: HashSet<String> = fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(base)
        .collect();

    fn visit(
        name: &str,
        table: &HashMap<String, (String, Vec<String>)>,
        dir: &Path,
        done: &mut HashSet<String>,
        out: &mut Vec<(String, PathBuf)>,
    ) {
        if !done.insert(name.to_owned()) {
            return;
        }
        let (path, deps) = &table[name];
        // modules.dep lists the whole closure; the ones a dependency needs come last.
        for d in deps.iter().rev() {
            if table.contains_key(d) {
                visit(d, table, dir, done, out);
            }
        }
        out.push((name.to_owned(), dir.join(path)));
    }
    let mut done = HashSet::new();
    let mut out = Vec::new();
    for w in wanted {
        let w = w.replace('-', "_");
        if table.contains_key(&w) {
            visit(&w, &table, dir, &mut done, &mut out);
        } else if !builtin.contains(&w) {
            bail!(
                "kernel module {w} is neither a module nor built in ({})",
                dir.display()
            );
        }
    }
    Ok(out)
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool: &[&str] = if name.ends_with(".ko.xz") {
        &["busybox", "xz", "-dc"]
    } else if name.ends_with(".ko.gz") {
        &["busybox", "gzip", "-dc"]
    } else if name.ends_with(".ko.zst") {
        &["zstd", "-dcq"]
    } else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool[0])
        .args(&tool[1..])
        .arg(path)
        .output()
        .with_context(|| format!("running {}", tool[0]))?;
    if !out.status.success() {
        bail!(
            "decompressing {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// A newc ("070701") cpio archive, as the kernel unpacks into its initramfs.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0,
            body.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, body: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), body);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

/// A running qemu, killed when dropped (also when xtask fails or is interrupted).
struct Guest {
    child: Child,
    console: Option<thread::JoinHandle<()>>,
    release: String,
}

fn boot(kernel: &Kernel, initrd: &Path, share: &Path, dir: &Path) -> Result<Guest> {
    let hostroot = "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,\
                    multidevs=remap";
    let vmtest = format!(
        "local,path={},mount_tag=vmtest,security_model=none,multidevs=remap",
        share.display()
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max"])
        .args(["-smp", &GUEST_CPUS.to_string()])
        .args(["-m", &GUEST_MEMORY_MIB.to_string()])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .args(["-serial", "stdio", "-monitor", "none", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=4"])
        .args(["-virtfs", hostroot, "-virtfs", &vmtest])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(dir.join("qemu-stderr.log"))?);
    // SAFETY: prctl only, between fork and exec. qemu dies with xtask, even on SIGKILL.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().unwrap();
    let mut log = fs::File::create(dir.join("console.log"))?;
    let release = kernel.release.clone();
    let console = thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut raw = Vec::new();
        while reader.read_until(b'\n', &mut raw).unwrap_or(0) > 0 {
            let line = printable(&raw);
            let _ = writeln!(log, "{line}");
            // Progress: the guest's own lines and libtest's per-test results.
            if line.starts_with("vm-test")
                || (line.starts_with("test ") && line.contains(" ... "))
                || line.contains("Kernel panic")
                || line.contains("BUG:")
            {
                println!("  [{release}] {line}");
            }
            raw.clear();
        }
    });
    Ok(Guest {
        child,
        console: Some(console),
        release: kernel.release.clone(),
    })
}

/// A console line without the terminal control sequences SeaBIOS and the kernel emit.
fn printable(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // ESC [ params letter, or ESC letter.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for p in chars.by_ref() {
                        if p.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

impl Guest {
    /// Waits for the guest to power off; kills it at the timeout. True if it finished.
    fn wait(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let finished = loop {
            if self.child.try_wait()?.is_some() {
                break true;
            }
            if Instant::now() > deadline {
                println!(
                    "  [{}] timed out after {} s: killing the guest",
                    self.release,
                    timeout.as_secs()
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
                break false;
            }
            thread::sleep(Duration::from_millis(250));
        };
        // The console's reader ends with qemu's stdout.
        if let Some(console) = self.console.take() {
            let _ = console.join();
        }
        Ok(finished)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(
    kernel: &Kernel,
    share: &Path,
    dir: &Path,
    snapshot: &Snapshot,
    finished: bool,
    secs: u64,
) -> Result<Outcome> {
    let mut results = Vec::new();
    for (name, _, tests) in &snapshot.binaries {
        let out = fs::read_to_string(share.join(format!("{name}.out"))).unwrap_or_default();
        let rc = fs::read_to_string(share.join(format!("{name}.rc")))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        results.push(BinaryResult::parse(name, tests, &out, rc));
    }
    let mut outcome = Outcome::from_results(&kernel.release, secs, results, dir.to_owned());
    let ran = share.join("uname").exists();
    if !finished || !ran || outcome.passed + outcome.failed == 0 {
        let console = fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        let init_error = fs::read_to_string(share.join("init-error")).unwrap_or_default();
        let qemu = fs::read_to_string(dir.join("qemu-stderr.log")).unwrap_or_default();
        let why = if !finished {
            "the guest did not finish in time and was killed".to_owned()
        } else if !init_error.is_empty() {
            format!("the guest's init failed: {}", init_error.trim())
        } else if !ran {
            "the guest never ran the tests".to_owned()
        } else {
            "the guest ran no tests".to_owned()
        };
        let mut details = format!("{why}; console's last lines:\n{}", tail(&console, 40));
        if !qemu.trim().is_empty() {
            details.push_str(&format!("\nqemu: {}", qemu.trim()));
        }
        if !outcome.details.is_empty() {
            details = format!("{}\n{details}", outcome.details);
        }
        outcome.details = details;
        if outcome.failed == 0 {
            outcome.failed = 1;
        }
    }
    Ok(outcome)
}

// --- libtest's output -------------------------------------------------------------------

struct BinaryResult {
    passed: usize,
    failed: Vec<String>,
    /// The captured output of each failed test: (test, `---- <test> stdout ----` block).
    blocks: Vec<(String, String)>,
    /// What else explains the failure (a binary that did not finish, ...).
    notes: String,
}

impl BinaryResult {
    /// Reads libtest's human output: per-test `test <name> ... ok` lines, the final
    /// `failures:` list, and the failed tests' captured output in between.
    fn parse(binary: &str, planned: &[String], out: &str, rc: Option<i32>) -> Self {
        let finished = out.lines().any(|l| l.starts_with("test result: "));
        let all_ok = rc == Some(0) && out.lines().any(|l| l.starts_with("test result: ok."));
        // A test's child processes write to the same output, so its verdict can land on a line
        // of its own after theirs (`test <name> ... <a child's traceback>` … `ok`): in a binary
        // that exited 0 with "test result: ok", every test that started passed.
        let passed_test = |name: &str| {
            let prefix = format!("test {name} ... ");
            out.lines()
                .any(|l| l.starts_with(&prefix) && (all_ok || l.trim_end().ends_with(" ok")))
        };
        let mut passed = 0;
        let mut failed = Vec::new();
        for t in planned {
            if passed_test(t) {
                passed += 1;
            } else {
                failed.push(format!("{binary}::{t}"));
            }
        }
        let mut blocks = Vec::new();
        let mut notes = String::new();
        if !failed.is_empty() && out.trim().is_empty() && rc.is_none() {
            notes = format!("{binary}: did not run");
        } else if !failed.is_empty() {
            if let Some(section) = failure_section(out) {
                blocks = split_blocks(section);
            }
            if !finished {
                let why = match rc {
                    Some(124) | Some(137) => "was killed at its time limit".to_owned(),
                    Some(rc) => format!("exited with {rc} before finishing"),
                    None => "did not finish".to_owned(),
                };
                notes = format!("{binary} {why}; its last output:\n{}", tail(out, 40));
            } else if blocks.is_empty() {
                notes = format!("{binary}: output:\n{}", tail(out, 60));
            }
        }
        Self {
            passed,
            failed,
            blocks,
            notes,
        }
    }
}

/// libtest's failure report: from the first `failures:` (the captured output of each failed
/// test, `---- <name> stdout ----` …) up to the second one (the list of names).
fn failure_section(out: &str) -> Option<&str> {
    let start = out.find("\nfailures:\n\n---- ")? + "\nfailures:\n\n".len();
    let rest = &out[start..];
    let end = rest.find("\nfailures:\n").unwrap_or(rest.len());
    Some(&rest[..end])
}

fn split_blocks(section: &str) -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in section.lines() {
        let name = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"));
        match (name, blocks.last_mut()) {
            (Some(name), _) => blocks.push((name.to_owned(), format!("{line}\n"))),
            (None, Some((_, block))) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, None) => {}
        }
    }
    for (_, block) in &mut blocks {
        let trimmed = block.trim_end().len();
        block.truncate(trimmed);
    }
    blocks
}

/// A failure's output with what differs between runs of the same failure (the test's name,
/// times, process ids, temporary paths) blanked out.
fn failure_fingerprint(name: &str, block: &str) -> String {
    let block: Vec<&str> = block
        .lines()
        .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    let mut out = String::new();
    let block = block
        .join("\n")
        .replace(&format!("---- {name} stdout ----"), "")
        .replace(&format!("thread '{name}'"), "");
    for c in block.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('#') {
            out.push('#');
        }
    }
    out
}

fn clip(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= DETAIL_HEAD + DETAIL_TAIL {
        return text.to_owned();
    }
    format!(
        "{}\n[... {} lines left out: the whole output is in the logs ...]\n{}",
        lines[..DETAIL_HEAD].join("\n"),
        lines.len() - DETAIL_HEAD - DETAIL_TAIL,
        lines[lines.len() - DETAIL_TAIL..].join("\n")
    )
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Outcome {
    /// Sums up the binaries' results; a failure seen before (the same output but for the
    /// test's name, times and ids: typically a node that cannot load its programs) is named,
    /// not repeated.
    fn from_results(kernel: &str, secs: u64, results: Vec<BinaryResult>, logs: PathBuf) -> Self {
        let mut o = Outcome {
            kernel: kernel.to_owned(),
            passed: 0,
            failed: 0,
            secs,
            failed_tests: Vec::new(),
            details: String::new(),
            logs,
        };
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut details = Vec::new();
        for r in results {
            o.passed += r.passed;
            o.failed += r.failed.len();
            o.failed_tests.extend(r.failed);
            for (name, block) in r.blocks {
                match seen.get(&failure_fingerprint(&name, &block)) {
                    Some(first) => details.push(format!("---- {name}: failed as {first} did ----")),
                    None => {
                        seen.insert(failure_fingerprint(&name, &block), name);
                        details.push(clip(&block));
                    }
                }
            }
            if !r.notes.is_empty() {
                details.push(r.notes);
            }
        }
        o.details = details.join("\n");
        o
    }
}

// --- misc ---------------------------------------------------------------------------------

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// An exclusive lock on `path` for as long as the returned file lives: one vm-test run at a
/// time per target directory (they share its files, and two would starve each other).
fn lock(path: &Path) -> Result<fs::File> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        println!(
            "vm-test: waiting for another vm-test run ({})",
            path.display()
        );
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking");
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_packages_are_matched_and_ordered_by_their_numbers() {
        let p = "linux-image-6.12.*+deb12-amd64";
        assert!(glob(p, "linux-image-6.12.117+deb12-amd64"));
        assert!(!glob(p, "linux-image-6.12.117+deb12-cloud-amd64"));
        assert!(!glob(p, "linux-image-6.12-amd64"));
        assert!(glob(
            "linux-image-6.1.0-*-amd64",
            "linux-image-6.1.0-56-amd64"
        ));
        assert!(!glob(
            "linux-image-6.1.0-*-amd64",
            "linux-image-6.1.0-56-rt-amd64x"
        ));
        let mut names = [
            "linux-image-6.12.99+deb12-amd64",
            "linux-image-6.12.117+deb12-amd64",
            "linux-image-6.12.100+deb12-amd64",
        ];
        names.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(names[2], "linux-image-6.12.117+deb12-amd64");
    }

    #[test]
    fn cargo_messages_yield_the_test_executables() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"capture"},"executable":"/t/debug/deps/capture-1\"x"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"ambit"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"hbone"},"executable":null}"#,
            "\nnot json\n",
        );
        let exes = test_executables(messages);
        assert_eq!(exes.len(), 1, "{exes:?}");
        assert_eq!(exes["capture"], PathBuf::from("/t/debug/deps/capture-1\"x"));
    }

    #[test]
    fn libtest_output_gives_counts_and_one_copy_of_a_repeated_failure() {
        let out = "\nrunning 3 tests\ntest a ... ok\ntest b ... FAILED\ntest c ... FAILED\n\n\
                   failures:\n\n---- b stdout ----\nthread 'b' (12) panicked at x.rs:1:2:\n\
                   invalid bpf_context access off=4096 size=1\nnote: run with `RUST_BACKTRACE=1`\n\n\
                   ---- c stdout ----\nthread 'c' (345) panicked at x.rs:1:2:\n\
                   invalid bpf_context access off=4096 size=1\n\n\nfailures:\n    b\n    c\n\n\
                   test result: FAILED. 1 passed; 2 failed; 0 ignored\n";
        let tests: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let r = BinaryResult::parse("capture", &tests, out, Some(101));
        assert_eq!(r.passed, 1);
        assert_eq!(r.failed, ["capture::b", "capture::c"]);
        let o = Outcome::from_results("k", 1, vec![r], PathBuf::new());
        assert_eq!(o.details.matches("off=4096").count(), 1, "{}", o.details);
        assert!(o.details.contains("---- c: failed as b did ----"));
        assert!(!o.ok());
        assert_eq!(
            o.summary(),
            "vm-test k: 1 passed, 2 failed (1 s) — failed: capture::b, capture::c"
        );

        let hung = BinaryResult::parse("hbone", &tests, "running 3 tests\ntest a ... ", Some(124));
        assert_eq!((hung.passed, hung.failed.len()), (0, 3));
        assert!(hung.notes.contains("killed at its time limit"));
        let never = BinaryResult::parse("policy", &tests, "", None);
        assert_eq!(never.notes, "policy: did not run");
    }

    #[test]
    fn a_verdict_pushed_to_its_own_line_by_a_childs_output_still_counts() {
        let out = "running 2 tests\ntest a ... ok\ntest b ... Exception in thread T:\n\
                   BlockingIOError: [Errno 11]\nok\n\n\
                   test result: ok. 2 passed; 0 failed; 0 ignored\n";
        let tests: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let r = BinaryResult::parse("fast_path", &tests, out, Some(0));
        assert_eq!((r.passed, r.failed.len()), (2, 0));
        // The same output from a binary that failed proves nothing about b.
        let r = BinaryResult::parse("fast_path", &tests, out, Some(101));
        assert_eq!(r.failed, ["fast_path::b"]);
        // Nor does a test that never started.
        let r = BinaryResult::parse(
            "fast_path",
            &tests,
            "test a ... ok\ntest result: ok.",
            Some(0),
        );
        assert_eq!(r.failed, ["fast_path::b"]);
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"#!/bin/sh\n");
        let data = c.finish();
        assert!(data.starts_with(b"070701"));
        assert_eq!(&data[110..115], b"init\0");
        assert_eq!(data.len() % 4, 0);
        assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
