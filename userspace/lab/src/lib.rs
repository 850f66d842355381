//! The network-namespace lab: Ambit's main job on one machine, and the stage of its privileged
//! integration tests.
//!
//! ```text
//!   pod a (10.201.1.2) ─┐                         ┌─ pod c (10.201.2.2)
//!   pod b (10.201.1.3) ─┴ br0 [node n1] ── link ── [node n2] br0 ┴─ pod d (10.201.2.3)
//!                        10.201.1.1   10.200.0.1   10.200.0.2   10.201.2.1
//! ```
//!
//! Every node and pod is a network namespace named `<prefix>-<name>`; every pod's processes run
//! in the cgroup `<cgroup2>/<prefix>/<pod>`. All addresses exist only inside these namespaces.
//! `Lab` removes everything it made when dropped (also when a test panics), and `sweep` removes
//! what an interrupted run left behind.

use std::{
    ffi::CString,
    fs,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

mod ztunnel;
pub use ztunnel::{without_ambit_section, Ztunnel, ZtunnelPod};

/// A lab node: a netns that routes between its pods and the other node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: &'static str,
    pub link_ip: &'static str,
    pub bridge_ip: &'static str,
    pub pod_subnet: &'static str,
}

#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: &'static str,
    pub node: &'static str,
    pub ip: &'static str,
}

pub const NODES: [NodeSpec; 2] = [
    NodeSpec {
        name: "n1",
        link_ip: "10.200.0.1",
        bridge_ip: "10.201.1.1",
        pod_subnet: "10.201.1.0/24",
    },
    NodeSpec {
        name: "n2",
        link_ip: "10.200.0.2",
        bridge_ip: "10.201.2.1",
        pod_subnet: "10.201.2.0/24",
    },
];

pub const PODS: [PodSpec; 4] = [
    PodSpec {
        name: "a",
        node: "n1",
        ip: "10.201.1.2",
    },
    PodSpec {
        name: "b",
        node: "n1",
        ip: "10.201.1.3",
    },
    PodSpec {
        name: "c",
        node: "n2",
        ip: "10.201.2.2",
    },
    PodSpec {
        name: "d",
        node: "n2",
        ip: "10.201.2.3",
    },
];

/// The service VIP of the lab's `web` service (port 80 → pod c's 8080).
pub const WEB_VIP: &str = "10.96.0.10";

pub fn pod(name: &str) -> &'static PodSpec {
    PODS.iter()
        .find(|p| p.name == name)
        .expect("no such lab pod")
}

/// What the lab's config says, beyond its fixed topology.
#[derive(Debug, Clone)]
pub struct LabConfig<'a> {
    pub enrolled: &'a [&'a str],
    /// `HBONE` or `TCP`, for the mesh workloads a and c.
    pub protocol: &'a str,
    /// `permissive` or `strict`.
    pub mtls_mode: &'a str,
    /// The `policies:` value (YAML, ztunnel's format), e.g. `[]`.
    pub policies: &'a str,
}

impl Default for LabConfig<'_> {
    fn default() -> Self {
        Self {
            enrolled: &["a", "c"],
            protocol: "HBONE",
            mtls_mode: "permissive",
            policies: "[]",
        }
    }
}

pub struct Lab {
    prefix: String,
    cgroup_root: PathBuf,
    bpffs: PathBuf,
    children: Vec<(String, Child)>,
    /// `RUST_LOG` of the `ambit node`s it starts (see `set_node_log`).
    node_log: String,
}

/// The lab's and the tests' node log: a node's default (`info`: one access-log line per
/// connection, at its end) plus the start of each connection, which the tests wait for and the
/// lab shows ("captured outbound connection", "HBONE stream accepted": debug).
pub const NODE_LOG_WITH_CONNECTION_STARTS: &str =
    "info,ambit::proxy::outbound=debug,ambit::proxy::inbound=debug";

impl Lab {
    /// Builds the lab's namespaces, links, addresses, routes and cgroups. Anything left by an
    /// earlier lab with the same prefix is removed first.
    pub fn create(prefix: &str) -> Result<Self> {
        require_root()?;
        let cgroup_root = cgroup2_root()?;
        let bpffs = PathBuf::from("/sys/fs/bpf");
        ensure_bpffs(&bpffs)?;
        sweep(prefix)?;
        let lab = Lab {
            prefix: prefix.to_owned(),
            cgroup_root,
            bpffs,
            children: Vec::new(),
            node_log: NODE_LOG_WITH_CONNECTION_STARTS.to_owned(),
        };
        lab.build().context("building the lab")?;
        Ok(lab)
    }

    fn build(&self) -> Result<()> {
        for node in &NODES {
            let ns = self.netns(node.name);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", node.bridge_ip),
                "dev",
                "br0",
            ])?;
            ip(&["-n", &ns, "link", "set", "br0", "up"])?;
            sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        }
        let (n1, n2) = (self.netns("n1"), self.netns("n2"));
        ip(&[
            "-n", &n1, "link", "add", "link0", "type", "veth", "peer", "name", "link0", "netns",
            &n2,
        ])?;
        for (node, peer) in [(&NODES[0], &NODES[1]), (&NODES[1], &NODES[0])] {
            let ns = self.netns(node.name);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/30", node.link_ip),
                "dev",
                "link0",
            ])?;
            ip(&["-n", &ns, "link", "set", "link0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                peer.pod_subnet,
                "via",
                peer.link_ip,
            ])?;
            // The service VIP exists nowhere: only capture makes it reachable.
        }
        fs::create_dir_all(self.cgroup_dir())?;
        for pod in &PODS {
            let ns = self.netns(pod.name);
            let node_ns = self.netns(pod.node);
            let node = NODES.iter().find(|n| n.name == pod.node).unwrap();
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let host_side = format!("v-{}", pod.name);
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &host_side,
                "netns", &node_ns,
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", pod.ip),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", node.bridge_ip])?;
            ip(&["-n", &node_ns, "link", "set", &host_side, "master", "br0"])?;
            ip(&["-n", &node_ns, "link", "set", &host_side, "up"])?;
            fs::create_dir_all(self.pod_cgroup(pod.name))?;
        }
        Ok(())
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The netns name of a lab node or pod.
    pub fn netns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    pub fn netns_path(&self, name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(self.netns(name))
    }

    /// The Ambit node name of a lab node (also its pin directory name).
    pub fn node_name(&self, node: &str) -> String {
        self.netns(node)
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    pub fn cgroup_dir(&self) -> PathBuf {
        self.cgroup_root.join(&self.prefix)
    }

    /// Relative to the cgroup2 root, as the config file names it.
    pub fn pod_cgroup_rel(&self, pod: &str) -> String {
        format!("{}/{pod}", self.prefix)
    }

    pub fn pod_cgroup(&self, pod: &str) -> PathBuf {
        self.cgroup_dir().join(pod)
    }

    pub fn pin_dir(&self, node: &str) -> PathBuf {
        self.bpffs.join("ambit").join(self.node_name(node))
    }

    /// The lab's desired state in ztunnel's local config format: pods a and c are mesh
    /// workloads speaking HBONE, b and d are outside the mesh. `enrolled` lists the pods whose
    /// `dataplaneMode` is `ambient`; the other mesh pods are listed as `none`.
    pub fn config_yaml(&self, enrolled: &[&str]) -> String {
        self.config_yaml_with(&LabConfig {
            enrolled,
            ..LabConfig::default()
        })
    }

    pub fn config_yaml_with(&self, options: &LabConfig<'_>) -> String {
        let enrolled = options.enrolled;
        let mode = |pod: &str| {
            if enrolled.contains(&pod) {
                "ambient"
            } else {
                "none"
            }
        };
        let (a, c) = (pod("a"), pod("c"));
        format!(
            r#"# Ambit lab: ztunnel's local config format, plus Ambit's `ambit` section.
# Edit and save: the nodes apply it without restarting (a bad edit is reported and ignored).
workloads:
- uid: lab//v1/Pod/default/a
  name: a
  namespace: default
  workloadName: a
  serviceAccount: sleep
  workloadIps: ["{a_ip}"]
  protocol: {protocol}
  node: {n1}
- uid: lab//v1/Pod/default/c
  name: c
  namespace: default
  workloadName: c
  serviceAccount: web
  workloadIps: ["{c_ip}"]
  protocol: {protocol}
  node: {n2}
  services:
    "default/web.default.svc.cluster.local":
      80: 8080
services:
- name: web
  namespace: default
  hostname: web.default.svc.cluster.local
  vips: ["/{vip}"]
  ports:
    80: 8080
policies: {policies}
ambit:
  mtlsMode: {mtls_mode}
  pods:
  - workload: default/a
    netns: {a_ns}
    cgroup: {a_cg}
    dataplaneMode: {a_mode}
  - workload: default/c
    netns: {c_ns}
    cgroup: {c_cg}
    dataplaneMode: {c_mode}
"#,
            a_ip = a.ip,
            c_ip = c.ip,
            n1 = self.node_name("n1"),
            n2 = self.node_name("n2"),
            vip = WEB_VIP,
            a_ns = self.netns_path("a").display(),
            c_ns = self.netns_path("c").display(),
            a_cg = self.pod_cgroup_rel("a"),
            c_cg = self.pod_cgroup_rel("c"),
            a_mode = mode("a"),
            c_mode = mode("c"),
            protocol = options.protocol,
            mtls_mode = options.mtls_mode,
            policies = options.policies,
        )
    }

    /// A config in which exactly `pods` are mesh workloads (HBONE, service account = pod name),
    /// all of them enrolled, with no services and no policies: e.g. the benchmark's same-node
    /// pair a and b, which `config_yaml` cannot express.
    pub fn config_yaml_workloads(&self, pods: &[&str]) -> String {
        let mut workloads = String::new();
        let mut enrolled = String::new();
        for name in pods {
            let p = pod(name);
            workloads.push_str(&format!(
                "- uid: lab//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  \
                 workloadName: {name}\n  \
                 serviceAccount: {name}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  \
                 node: {node}\n",
                ip = p.ip,
                node = self.node_name(p.node),
            ));
            enrolled.push_str(&format!(
                "  - workload: default/{name}\n    netns: {netns}\n    cgroup: {cgroup}\n    \
                 dataplaneMode: ambient\n",
                netns = self.netns_path(name).display(),
                cgroup = self.pod_cgroup_rel(name),
            ));
        }
        format!(
            "# Ambit lab: ztunnel's local config format, plus Ambit's `ambit` section.\n\
             workloads:\n{workloads}services: []\npolicies: []\nambit:\n  pods:\n{enrolled}"
        )
    }

    /// A command that runs inside a pod: in its netns and its cgroup.
    pub fn pod_command(&self, pod: &str, program: &str) -> Command {
        self.command_in(pod, &self.pod_cgroup(pod), program)
    }

    /// A command in the netns of lab pod `netns_of` and in the cgroup directory `cgroup` (which
    /// must be under this lab's cgroup, so that teardown removes it).
    pub fn command_in(&self, netns_of: &str, cgroup: &Path, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns(netns_of), program]);
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
        cmd
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

    /// The iptables capture Ambit's `--capture iptables` mode expects (the baseline the
    /// benchmark compares eBPF capture with), in `pod`'s netns only: TCP to `destination` (an
    /// address or CIDR) goes to the tunnel's outbound listener 15001, except the tunnel's own
    /// sockets (marked 0x539, ztunnel's mark). Undone by `remove_redirect` or the pod's end.
    pub fn redirect_to_tunnel(&self, pod: &str, destination: &str) -> Result<()> {
        self.iptables(
            pod,
            &[
                "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "--mark", "0x539", "-j",
                "RETURN",
            ],
        )?;
        self.iptables(
            pod,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                destination,
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
        )
    }

    /// Removes what `redirect_to_tunnel` added (the pod's nat OUTPUT chain).
    pub fn remove_redirect(&self, pod: &str) -> Result<()> {
        self.iptables(pod, &["-t", "nat", "-F", "OUTPUT"])
    }

    fn iptables(&self, pod: &str, args: &[&str]) -> Result<()> {
        let out = self.run_in_pod(pod, "iptables", args)?;
        if !out.status.success() {
            bail!(
                "iptables {} in pod {pod}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Starts a long-running process that the lab stops on drop.
    pub fn spawn(&mut self, what: &str, mut cmd: Command) -> Result<u32> {
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let pid = child.id();
        self.children.push((what.to_owned(), child));
        Ok(pid)
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

    /// Starts an HTTP server (python3 http.server) in a pod, serving `dir`, and waits until it
    /// accepts connections.
    pub fn start_http_server(&mut self, pod: &str, port: u16, dir: &Path) -> Result<()> {
        let mut cmd = self.pod_command(pod, "python3");
        cmd.args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "0.0.0.0",
            "--directory",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        self.spawn(&format!("http server in {pod}"), cmd)?;
        self.wait_listening(pod, port, &format!("http server in pod {pod}"))
    }

    /// Creates the lab's CA (Ambit's built-in CA, written in Istio's plug-in CA layout) in
    /// `dir`, so that both nodes issue certificates from one root (`dir/root-cert.pem`).
    pub fn init_ca(&self, ambit: &Path, dir: &Path) -> Result<()> {
        let out = Command::new(ambit)
            .args(["ca", "init", "--dir"])
            .arg(dir)
            .output()
            .context("running ambit ca init")?;
        if !out.status.success() {
            bail!("ambit ca init: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
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
        let log_file =
            fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = self.node_command(node, ambit.to_str().unwrap());
        cmd.args(["node", "--node", &self.node_name(node), "--config"])
            .arg(config)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| self.node_log.clone()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        self.spawn(&format!("ambit node {node}"), cmd)?;
        let log = log.to_owned();
        // Under vm-tests a node that exited (e.g. a program the verifier rejected) will
        // never be ready; say so now instead of at the (scaled) timeout.
        let child = &mut self.children.last_mut().unwrap().1;
        let mut exited = None;
        wait_until(
            Duration::from_secs(20),
            &format!("ambit node {node} ready"),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    exited = Some(status);
                    return true;
                }
                fs::read_to_string(&log)
                    .map(|l| l.contains("node ready"))
                    .unwrap_or(false)
            },
        )
        .and_then(|()| match exited {
            Some(status) => bail!("ambit node {node} exited ({status}) before it was ready"),
            None => Ok(()),
        })
        .with_context(|| {
            format!(
                "log of node {node}:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            )
        })
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
    pub fn wait_exit(&mut self, what: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        let i = self.children.iter().position(|(w, _)| w == what)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.children[i].1.try_wait() {
                self.children.remove(i);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops a process the lab started (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self, what: &str) -> Result<()> {
        if let Some(i) = self.children.iter().position(|(w, _)| w == what) {
            let (_, child) = self.children.remove(i);
            terminate(child);
        }
        Ok(())
    }

    fn teardown(&mut self) {
        for (_, child) in self.children.drain(..).rev() {
            terminate(child);
        }
        if let Err(e) = sweep(&self.prefix) {
            eprintln!("lab teardown: {e:#}");
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn terminate(mut child: Child) {
    // SAFETY: signalling a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Removes every process, pin, netns and cgroup of labs whose prefix starts with `prefix`.
pub fn sweep(prefix: &str) -> Result<()> {
    let cgroup_root = cgroup2_root()?;
    // Processes first (they hold cgroups and may hold namespaces).
    for dir in matching(&cgroup_root, prefix) {
        kill_cgroup_tree(&dir);
    }
    for dir in matching(Path::new("/sys/fs/bpf/ambit"), prefix) {
        fs::remove_dir_all(&dir).with_context(|| format!("removing pins {}", dir.display()))?;
    }
    for ns in matching(Path::new("/run/netns"), prefix) {
        let name = ns.file_name().unwrap().to_string_lossy().into_owned();
        // Anything still running inside (e.g. a node process) goes first.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        ip(&["netns", "del", &name]).with_context(|| format!("deleting netns {name}"))?;
    }
    for dir in matching(&cgroup_root, prefix) {
        remove_cgroup_tree(&dir)?;
    }
    Ok(())
}

fn matching(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect()
}

fn kill_cgroup_tree(dir: &Path) {
    // cgroup.kill (Linux 5.14) kills the whole subtree at once.
    if fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    kill_cgroup_tree(&e.path());
                }
            }
        }
    }
}

fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    // A cgroup can only be removed once its last process has exited.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("removing cgroup {}", dir.display()))
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c"])
        .arg(format!("echo {value} > {path}"))
        .output()?;
    if !out.status.success() {
        bail!(
            "sysctl {key}={value} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

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

/// `ambit node --worker-threads` for each of `nodes` lab nodes: they share this machine's
/// `cores` as real nodes would each have their own. More workers than that only add wake-ups
/// between threads (`cargo xtask bench` measured it: README, Benchmark).
pub fn worker_threads_per_node(cores: usize, nodes: usize) -> usize {
    (cores / nodes.max(1)).max(1)
}

/// This machine's CPUs (1 if unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// --- vm-tests ---
/// Factor for the tests' wait timeouts: `AMBIT_TEST_TIMEOUT_SCALE` (default 1), which
/// `cargo xtask vm-test` sets in its guests, where qemu's emulation (TCG) is 10-30x slower.
pub fn timeout_scale() -> f64 {
    std::env::var("AMBIT_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f >= 1.0)
        .unwrap_or(1.0)
}
// --- end vm-tests ---

/// Writes `text` to `path` atomically (write to a temp file, then rename), as editors do.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
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
