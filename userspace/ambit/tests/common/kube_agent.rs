//! A real node agent for the CNI tests: `ambit node --source kubernetes --cni-socket`, watching
//! a fake API server (common/fake_api.rs), with a local CA, its log in a file. Also the API
//! objects those tests feed the fake API server.
//!
//! The agent runs in the test's own netns (as the DaemonSet's agent runs in a pod of its own:
//! it reaches pods through their netns and cgroups, not through the network). Dropping a
//! [`KubeAgent`] stops it (SIGTERM: with `--detach-on-exit` it detaches from its pods, then
//! SIGKILL if it hangs) and removes its pins, also when the test panics.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::AMBIT;

pub struct KubeAgent {
    dir: PathBuf,
    node: String,
    child: Option<Child>,
}

impl KubeAgent {
    /// Starts the agent for node `node`, its files (kubeconfig, CA, log, CNI socket) in `dir`,
    /// watching the API server at `api_url`; returns once it logged "node ready".
    /// Where the agent sees the host's procfs (`--proc-root`), as the DaemonSet's /host/proc.
    pub fn proc_root(&self) -> PathBuf {
        Self::proc_root_in(&self.dir)
    }

    fn proc_root_in(dir: &Path) -> PathBuf {
        dir.join("host-proc")
    }

    pub fn start(dir: &Path, node: &str, api_url: &str) -> KubeAgent {
        fs::create_dir_all(dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{api_url}\"}}}}]\n\
                 contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
                 users: [{{name: fake, user: {{}}}}]\ncurrent-context: fake\n"
            ),
        )
        .unwrap();
        let ca = dir.join("ca");
        if !ca.exists() {
            let out = Command::new(AMBIT)
                .args(["ca", "init", "--dir"])
                .arg(&ca)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ambit ca init: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let free_port = || {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .to_string()
        };
        let log = fs::File::create(Self::log_path(dir)).unwrap();
        // As the DaemonSet runs it: in a mount namespace of its own where /proc/sys is
        // read-only (as a container runtime mounts it), with the host's procfs at another
        // path (the DaemonSet's /host/proc), through which it writes pods' sysctls. Mounts
        // made on the host later (the runtime's netns files) reach it (HostToContainer).
        let host_proc = Self::proc_root_in(dir);
        fs::create_dir_all(&host_proc).unwrap();
        // In a cgroup of its own, as a DaemonSet pod's container (the fast path attaches a
        // program to the agent's cgroup). Named after the node, so that a sweep of the test's
        // prefix finds it.
        let cgroup = Self::cgroup_of(node);
        fs::create_dir_all(&cgroup).unwrap();
        let mut command = Command::new("unshare");
        ambit_lab::join_cgroup(&mut command, &cgroup);
        let child = command
            .args(["--mount", "--propagation", "slave", "--", "sh", "-c"])
            .arg(
                "mount --bind /proc \"$0\" && mount --bind /proc/sys /proc/sys && \
                 mount -o remount,bind,ro /proc/sys && exec \"$@\"",
            )
            .arg(&host_proc)
            .arg(AMBIT)
            .args(["node", "--source", "kubernetes", "--node", node])
            .arg("--proc-root")
            .arg(&host_proc)
            .arg("--cni-socket")
            .arg(Self::socket_in(dir))
            .arg("--ca-dir")
            .arg(&ca)
            .args(["--detach-on-exit", "--metrics-addr"])
            .arg(free_port())
            .arg("--readiness-addr")
            .arg(free_port())
            .arg("--admin-addr")
            .arg(free_port())
            .env("KUBECONFIG", &kubeconfig)
            // Debug: "captured outbound connection" (with the original destination) is logged
            // at debug.
            .env("RUST_LOG", "info,ambit=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let agent = KubeAgent {
            dir: dir.to_owned(),
            node: node.to_owned(),
            child: Some(child),
        };
        agent.wait_log("node ready");
        agent
    }

    /// Where an agent started with `dir` listens for the plugin (known before it starts: the
    /// plugin is configured before the agent is up).
    pub fn socket_in(dir: &Path) -> PathBuf {
        dir.join("cni.sock")
    }

    /// The `ambit-cni` entry of a CNI chain, for an agent started with `dir`.
    pub fn plugin_config_in(dir: &Path) -> Value {
        json!({"type": "ambit-cni", "agentSocket": Self::socket_in(dir)})
    }

    pub fn plugin_config(&self) -> Value {
        Self::plugin_config_in(&self.dir)
    }

    fn log_path(dir: &Path) -> PathBuf {
        dir.join("agent.log")
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(Self::log_path(&self.dir)).unwrap_or_default()
    }

    /// Waits (15 s) until the agent's log contains `needle`; fails with the log.
    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(15).mul_f64(ambit_lab::timeout_scale());
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the agent did not log {needle:?}:\n{}",
                self.log()
            );
            if let Some(status) = self.exited() {
                panic!("the agent exited ({status}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn exited(&self) -> Option<String> {
        let pid = self.child.as_ref()?.id();
        // try_wait needs &mut; a zombie in /proc is an exited child.
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) if !stat.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')) => None,
            _ => Some(format!("pid {pid}")),
        }
    }

    /// SIGTERM, then waits (SIGKILL after 10 s).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }

    /// `ambit inspect` of its node: what the kernel holds for it, from its pins.
    pub fn inspect(&self) -> String {
        let out = Command::new(AMBIT)
            .args(["inspect", "--node", &self.node])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ambit inspect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The pods `ambit inspect` lists with capture attached (`namespace/name`).
    pub fn captured_pods(&self) -> Vec<String> {
        self.inspect()
            .split("\n\n")
            .find(|section| section.starts_with("pods with capture attached:"))
            .into_iter()
            .flat_map(|section| section.lines().skip(1))
            .filter_map(|line| Some(line.trim().split_once(": ")?.0.to_owned()))
            .collect()
    }

    fn cgroup_of(node: &str) -> PathBuf {
        ambit_lab::cgroup2_root()
            .unwrap()
            .join(format!("{node}-agent"))
    }

    /// Its pins (`/sys/fs/bpf/ambit/<node>`).
    pub fn pins(&self) -> PathBuf {
        Path::new("/sys/fs/bpf/ambit").join(&self.node)
    }
}

impl Drop for KubeAgent {
    fn drop(&mut self) {
        self.stop();
        // What a killed agent left pinned (the links with it: unpinned, they detach).
        let _ = fs::remove_dir_all(self.pins());
        let _ = fs::remove_dir(Self::cgroup_of(&self.node));
    }
}

/// A pod as the API server has it once kubelet took it on: scheduled, not running, no IP yet.
pub fn pending_pod(namespace: &str, name: &str, uid: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": {},
                     "resourceVersion": "5"},
        "spec": {"nodeName": node, "serviceAccountName": name,
                 "containers": [{"name": "main", "image": "example"}]},
        "status": {"phase": "Pending"}
    })
}

/// A running mesh pod on another node.
pub fn running_pod(namespace: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                     "labels": {}, "resourceVersion": "6"},
        "spec": {"nodeName": "elsewhere", "serviceAccountName": name,
                 "containers": [{"name": "main", "image": "example"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

/// A watch event adding `object`.
pub fn added(object: Value) -> String {
    json!({"type": "ADDED", "object": object}).to_string()
}

/// A watch event changing `object`.
pub fn modified(object: Value) -> String {
    json!({"type": "MODIFIED", "object": object}).to_string()
}

/// A watch event removing `object`.
pub fn deleted(object: Value) -> String {
    json!({"type": "DELETED", "object": object}).to_string()
}

/// `pod` as kubelet reports it once its sandbox and containers run: Running, with its IP.
pub fn now_running(mut pod: Value, ip: &str) -> Value {
    pod["metadata"]["resourceVersion"] = json!("7");
    pod["status"] = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
    pod
}
