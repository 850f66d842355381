//! The processes a lab runs: commands placed in a pod's netns and cgroup or in a node's netns,
//! the long-running ones it owns (`ambit node`, servers), their signals and their end; and what
//! /proc says about a process.

use std::{
    ffi::CString,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    system::{run, wait_until},
    Lab,
};

/// The lab's and the tests' node log: a node's default (`info`: one access-log line per
/// connection, at its end) plus the start of each connection, which the tests wait for and the
/// lab shows ("captured outbound connection", "HBONE stream accepted": debug).
pub const NODE_LOG_WITH_CONNECTION_STARTS: &str =
    "info,ambit::proxy::outbound=debug,ambit::proxy::inbound=debug";

impl Lab {
    /// A command that runs inside a pod: in its netns and its cgroup.
    pub fn pod_command(&self, pod: &str, program: &str) -> Command {
        self.command_in(pod, &self.pod_cgroup(pod), program)
    }

    /// A command in the netns of lab pod `netns_of` and in the cgroup directory `cgroup` (which
    /// must be under this lab's cgroup, so that teardown removes it).
    pub fn command_in(&self, netns_of: &str, cgroup: &Path, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns(netns_of), program]);
        join_cgroup(&mut cmd, cgroup);
        cmd
    }

    /// The cgroup a lab node's `ambit node` runs in: one of its own, as a DaemonSet pod's
    /// container has (the fast path attaches a program to it).
    pub fn node_cgroup(&self, node: &str) -> PathBuf {
        self.cgroup_dir().join(format!("node-{node}"))
    }

    /// A command that runs inside a lab node's netns (not in any pod cgroup). `nsenter`, not
    /// `ip netns exec`: the latter remounts /sys, which would hide bpffs and cgroup2.
    pub fn node_command(&self, node: &str, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path(node).display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs a command in a pod to completion.
    pub fn run_in_pod(&self, pod: &str, program: &str, args: &[&str]) -> Result<Output> {
        self.pod_command(pod, program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in pod {pod}"))
    }

    /// Creates the lab's CA (Ambit's built-in CA, written in Istio's plug-in CA layout) in
    /// `dir`, so that both nodes issue certificates from one root (`dir/root-cert.pem`).
    pub fn init_ca(&self, ambit: &Path, dir: &Path) -> Result<()> {
        let mut cmd = Command::new(ambit);
        cmd.args(["ca", "init", "--dir"]).arg(dir);
        run(&mut cmd, "ambit ca init").map(drop)
    }

    /// Starts a long-running process that the lab stops on drop.
    pub fn spawn(&mut self, what: &str, mut cmd: Command) -> Result<u32> {
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let pid = child.id();
        self.children.push((what.to_owned(), child));
        Ok(pid)
    }

    /// Spawns `cmd` as `what` with its output to the file `log`, and waits until `ready` holds.
    /// A process that exits first (e.g. a node whose program the verifier rejected) will never
    /// be ready: that is reported at once, not at the (scaled) timeout. Errors carry the log.
    pub(crate) fn spawn_until_ready(
        &mut self,
        what: &str,
        mut cmd: Command,
        log: &Path,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let log_file =
            fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        self.spawn(what, cmd)?;
        let child = &mut self.children.last_mut().expect("just spawned").1;
        let mut exited = None;
        wait_until(Duration::from_secs(20), &format!("{what} ready"), || {
            exited = child.try_wait().ok().flatten();
            exited.is_some() || ready()
        })
        .and_then(|()| match exited {
            Some(status) => bail!("{what} exited ({status}) before it was ready"),
            None => Ok(()),
        })
        .with_context(|| {
            let log = fs::read_to_string(log).unwrap_or_default();
            format!("log of {what}:\n{log}")
        })
    }

    /// Gives a running process another name (e.g. a node process being replaced by a new
    /// one that takes its name).
    pub fn rename(&mut self, what: &str, to: &str) -> Result<()> {
        let child = self
            .children
            .iter_mut()
            .find(|(w, _)| w == what)
            .with_context(|| format!("no process named {what}"))?;
        child.0 = to.to_owned();
        Ok(())
    }

    /// The pid of a running process the lab started, by the name it was started under (`spawn`).
    pub fn pid(&self, what: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, child)| child.id())
    }

    /// The pid of the `ambit node` process of lab node `node` (see `start_node`), e.g. to read
    /// its CPU time and memory from /proc. `nsenter` execs it, so this is Ambit's own pid.
    pub fn node_pid(&self, node: &str) -> Option<u32> {
        self.pid(&format!("ambit node {node}"))
    }

    /// Starts an HTTP server (python3 http.server) in a pod, serving `dir` on both families (it
    /// binds `::` with `IPV6_V6ONLY` off), and waits until it accepts connections.
    pub fn start_http_server(&mut self, pod: &str, port: u16, dir: &Path) -> Result<()> {
        let mut cmd = self.pod_command(pod, "python3");
        cmd.args(["-m", "http.server", &port.to_string(), "--bind", "::"])
            .arg("--directory")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.spawn(&format!("http server in {pod}"), cmd)?;
        self.wait_listening(pod, port, &format!("http server in pod {pod}"))
    }

    /// Waits until something listens on `port` in a pod, probing over the pod's loopback (which
    /// capture never touches).
    pub fn wait_listening(&self, pod: &str, port: u16, what: &str) -> Result<()> {
        let ns = self.netns(pod);
        wait_until(Duration::from_secs(10), what, || {
            Command::new("ip")
                .args(["netns", "exec", &ns, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{port}"))
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
    }

    /// The log filter of the nodes started from now on (`RUST_LOG`, if set, still wins); the
    /// benchmark sets a node's default, `info`.
    pub fn set_node_log(&mut self, filter: &str) {
        self.node_log = filter.to_owned();
    }

    /// Starts an `ambit node` for a lab node, inside the node's netns, logging to `log`.
    /// `extra` are more `ambit node` flags (e.g. `--ca-dir`).
    pub fn start_node(
        &mut self,
        ambit: &Path,
        node: &str,
        config: &Path,
        log: &Path,
        extra: &[&str],
    ) -> Result<()> {
        let mut cmd = self.node_command(node, ambit.to_str().unwrap());
        let cgroup = self.node_cgroup(node);
        fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        join_cgroup(&mut cmd, &cgroup);
        cmd.args(["node", "--node", &self.node_name(node), "--config"])
            .arg(config)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| self.node_log.clone()),
            )
            .env("NO_COLOR", "1");
        let ready = || fs::read_to_string(log).is_ok_and(|l| l.contains("node ready"));
        self.spawn_until_ready(&format!("ambit node {node}"), cmd, log, ready)
    }

    /// Starts `ambit control-plane` (the stand-in istiod: xDS and CA) in node `node`'s netns,
    /// listening on the node's link address, port 15012, and serving `config` with the CA in
    /// `ca_dir`; waits until it accepts connections. Returns its address for `XDS_ADDRESS` /
    /// `--xds-address` (`https://<ip>:15012`).
    pub fn start_control_plane(
        &mut self,
        ambit: &Path,
        node: &str,
        config: &Path,
        ca_dir: &Path,
        log: &Path,
    ) -> Result<String> {
        let ip = crate::topology::node(node).link_ip;
        let mut cmd = self.node_command(node, ambit.to_str().unwrap());
        cmd.args([
            "control-plane",
            "--listen",
            &format!("{ip}:15012"),
            "--config",
        ])
        .arg(config)
        .arg("--ca-dir")
        .arg(ca_dir)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1");
        let ns = self.netns(node);
        let probe = format!("exec 3<>/dev/tcp/{ip}/15012");
        let ready = || {
            Command::new("ip")
                .args(["netns", "exec", &ns, "bash", "-c", &probe])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        self.spawn_until_ready(&format!("control plane in {node}"), cmd, log, ready)?;
        Ok(format!("https://{ip}:15012"))
    }

    /// Sends `signal` to a process the lab started, without waiting for it.
    pub fn signal(&self, what: &str, signal: i32) -> Result<()> {
        let pid = self
            .pid(what)
            .with_context(|| format!("no process {what:?}"))?;
        // SAFETY: signalling a child we own (not yet reaped, so the pid is still ours).
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for a process the lab started to exit; its exit status, or None
    /// if it is still running. An exited process is forgotten by the lab.
    pub fn wait_exit(&mut self, what: &str, timeout: Duration) -> Option<ExitStatus> {
        let i = self.children.iter().position(|(w, _)| w == what)?;
        let status = exit_within(&mut self.children[i].1, timeout)?;
        self.children.remove(i);
        Some(status)
    }

    /// Stops a process the lab started (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self, what: &str) -> Result<()> {
        if let Some(i) = self.children.iter().position(|(w, _)| w == what) {
            let (_, child) = self.children.remove(i);
            terminate(child);
        }
        Ok(())
    }
}

/// SIGTERM, then SIGKILL if `child` has not exited within 5 s.
/// Makes `cmd` join the cgroup directory `cgroup` (cgroup v2) before it executes.
pub fn join_cgroup(cmd: &mut Command, cgroup: &Path) {
    let procs = CString::new(cgroup.join("cgroup.procs").to_str().unwrap()).unwrap();
    // SAFETY: between fork and exec only async-signal-safe calls (open, write, close).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub(crate) fn terminate(mut child: Child) {
    // SAFETY: signalling a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    if exit_within(&mut child, Duration::from_secs(5)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `child`'s exit status once it has exited, or None if it still runs after `timeout`.
fn exit_within(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A process's resident memory (VmRSS of /proc/<pid>/status), in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    vm_rss_kib(&status).with_context(|| format!("no VmRSS in {path}"))
}

/// The VmRSS line of a /proc/<pid>/status text, in KiB.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A process's open file descriptors (entries of /proc/<pid>/fd).
pub fn open_fds(pid: u32) -> Result<usize> {
    let path = format!("/proc/{pid}/fd");
    Ok(fs::read_dir(&path)
        .with_context(|| format!("reading {path}"))?
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss() {
        let status = "Name:\tambit\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(vm_rss_kib(status), Some(12345));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn rss_and_fds_of_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(open_fds(me).unwrap() >= 3, "stdin, stdout, stderr at least");
    }
}
