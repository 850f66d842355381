//! `ambit-cni`, the chained CNI plugin, run as a container runtime runs it: after the reference
//! `bridge` plugin (Debian's containernetworking-plugins, with `host-local` addresses), with
//! the CNI environment and the previous plugin's result, against a real `ambit node --source
//! kubernetes --cni-socket` fed by a fake API server. The test plays the runtime's and
//! kubelet's parts: the node's and the pods' netns, the pod-level cgroup kubelet makes before
//! it asks for a sandbox, and the first process of the pod.
//!
//! Checked: ADD fails (and the runtime would retry) while the agent is down; ADD of a mesh pod
//! returns only once capture is in place, so the pod's very first connection is captured
//! (and nothing reaches the destination in plaintext); ADD of a pod outside the mesh passes
//! at once; DEL releases the pod.
//!
//! Skipped (with a line on stderr) when the CNI plugins are not installed (`cargo xtask setup`
//! installs them).

mod common;

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{
    fake_api::fake_api,
    kube_agent::{added, pending_pod, running_pod, KubeAgent},
    test_prefix, AMBIT,
};
use serde_json::{json, Value};
use tokio::sync::broadcast;

const CNI_BIN: &str = "/usr/lib/cni";
/// The test's pod network (inside the node netns the test makes).
const SUBNET: &str = "10.207.0.0/24";

/// Everything the test made, removed on drop (also when it fails).
struct Sandboxes {
    prefix: String,
    dir: PathBuf,
    cgroup: PathBuf,
    agent: Option<KubeAgent>,
    /// The processes the test runs in the pods' netns.
    processes: Vec<Child>,
}

impl Sandboxes {
    fn netns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn netns_path(&self, name: &str) -> PathBuf {
        Path::new("/run/netns").join(self.netns(name))
    }

    /// Runs a CNI plugin (`plugin` under `bin`) in the node netns, as the runtime does.
    fn cni(
        &self,
        bin: &Path,
        command: &str,
        pod: &str,
        cni_args: &str,
        config: &Value,
    ) -> (bool, Value) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.netns("node")])
            .arg(bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("{}-{pod}", self.prefix))
            .env("CNI_NETNS", self.netns_path(pod))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_BIN)
            .env("CNI_ARGS", cni_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(config.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let parsed = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success(), parsed)
    }

    /// The bridge plugin's config: the node's pod network.
    fn bridge_config(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "ambit-test",
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": SUBNET}]],
                "dataDir": self.dir.join("ipam"),
            },
        })
    }

    /// Sets up `pod`'s interface with the bridge plugin; its result.
    fn bridge_add(&self, pod: &str) -> Value {
        run(Command::new("ip").args(["netns", "add", &self.netns(pod)]));
        let (ok, result) = self.cni(
            &Path::new(CNI_BIN).join("bridge"),
            "ADD",
            pod,
            "",
            &self.bridge_config(),
        );
        assert!(ok, "bridge ADD for {pod}: {result}");
        result
    }

    fn agent(&self) -> &KubeAgent {
        self.agent.as_ref().expect("the agent is running")
    }
}

impl Drop for Sandboxes {
    fn drop(&mut self) {
        // The agent first: it stops (and its pins go) before the netns it serves.
        drop(self.agent.take());
        for mut child in self.processes.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in ["pod", "plain", "server", "node"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns(ns)])
                .output();
        }
        // The pod's first process has ended with the pod netns; then the cgroup can go.
        for dir in [
            self.cgroup.clone(),
            self.cgroup.parent().unwrap().to_owned(),
        ] {
            for _ in 0..50 {
                if fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The first address of a CNI result.
fn result_ip(result: &Value) -> String {
    let address = result["ips"][0]["address"].as_str().unwrap();
    address.split('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mesh_pod_is_captured_before_its_sandbox_starts() {
    if !Path::new(CNI_BIN).join("bridge").exists() {
        eprintln!("CNI test skipped: no {CNI_BIN}/bridge (cargo xtask setup installs containernetworking-plugins)");
        return;
    }
    let prefix = format!("{}{}c", test_prefix(), std::process::id() % 100_000);
    let dir = std::env::temp_dir().join(&prefix);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("bin")).unwrap();
    let uid = format!("uid-{prefix}-sleep");
    // The pod-level cgroup kubelet makes before it asks for the sandbox (cgroupfs layout).
    let cgroup = ambit::cgroup::cgroup2_root()
        .unwrap()
        .join(format!("{prefix}-kubepods"))
        .join(format!("pod{uid}"));
    fs::create_dir_all(&cgroup).unwrap();
    let mut t = Sandboxes {
        prefix: prefix.clone(),
        dir: dir.clone(),
        cgroup: cgroup.clone(),
        agent: None,
        processes: Vec::new(),
    };
    let node = t.netns("node");
    run(Command::new("ip").args(["netns", "add", &node]));
    run(Command::new("ip").args(["-n", &node, "link", "set", "lo", "up"]));

    // The plugin is the `ambit` binary under the name `ambit-cni`, as the image installs it.
    let plugin = dir.join("bin/ambit-cni");
    fs::copy(AMBIT, &plugin).unwrap();
    let chained = |prev: &Value| {
        let mut conf = KubeAgent::plugin_config_in(&dir);
        conf["cniVersion"] = json!("1.0.0");
        conf["name"] = json!("ambit-test");
        conf["prevResult"] = prev.clone();
        conf
    };
    let pod_args = |ns: &str, name: &str, uid: &str| {
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}")
    };

    // The destination: a mesh pod "on another node" (a netns on the same bridge) with a server
    // that must never see plaintext from the captured pod.
    let server = t.bridge_add("server");
    let server_ip = result_ip(&server);
    let plaintext_log = dir.join("server.log");
    let server_process = Command::new("ip")
        .args(["netns", "exec", &t.netns("server"), "python3", "-c"])
        .arg(
            "import socket,sys\n\
             s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0', 8080)); s.listen()\n\
             while True:\n\
             \x20   c,a=s.accept(); open(sys.argv[1],'a').write('accepted %s\\n' % (a,)); c.close()\n",
        )
        .arg(&plaintext_log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    t.processes.push(server_process);

    // 1. The agent is not there: ADD fails, with the reason, and the runtime would retry.
    let pod = t.bridge_add("pod");
    let pod_ip = result_ip(&pod);
    let args = pod_args("demo", "sleep", &uid);
    let (ok, err) = t.cni(&plugin, "ADD", "pod", &args, &chained(&pod));
    assert!(!ok, "ADD succeeded without the agent: {err}");
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("cannot be reached"),
        "{err}"
    );

    // 2. The agent starts, watching a fake API server.
    let (events, _) = broadcast::channel(16);
    let url = fake_api(events.clone()).await;
    t.agent = Some(KubeAgent::start(&dir, &node, &url));
    // The API server learns of the pods: the destination, and the pod as kubelet takes it on.
    let pods = "/api/v1/pods".to_owned();
    events
        .send((
            pods.clone(),
            added(running_pod("demo", "web-far", &server_ip)),
        ))
        .unwrap();
    events
        .send((
            pods.clone(),
            added(pending_pod("demo", "sleep", &uid, &node)),
        ))
        .unwrap();

    // 3. ADD again, as the runtime retries: it returns once the pod is captured, and passes the
    // bridge's result on.
    let (ok, result) = t.cni(&plugin, "ADD", "pod", &args, &chained(&pod));
    assert!(ok, "ADD with the agent up: {result}\n{}", t.agent().log());
    assert_eq!(result["ips"], pod["ips"], "{result}");
    let log = t.agent().log();
    assert!(log.contains("CNI ADD: captured before start"), "{log}");

    // The pod's first process, in its cgroup and netns, connects at once to the mesh pod:
    // captured (the agent tunnels it, and the destination, which speaks no HBONE, refuses the
    // tunnel), so nothing reaches the server's port 8080 in plaintext.
    // (Into the cgroup first: `ip netns exec` mounts a sysfs of its own, without cgroup2.)
    let first = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 -c \"import socket; s=socket.create_connection(('{server_ip}', 8080), timeout=5); s.sendall(b'plaintext?'); print(s.recv(10))\"",
            cgroup.display(),
            t.netns("pod"),
        ))
        .output()
        .unwrap();
    eprintln!(
        "the pod's first connection: {} {}",
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr)
    );
    t.agent().wait_log(&format!("dst.addr={server_ip}:8080"));
    let log = t.agent().log();
    assert!(
        log.contains(&format!("original_dst={server_ip}:8080")),
        "the pod's first connection was not captured:\n{}\n{log}",
        String::from_utf8_lossy(&first.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    let plaintext = fs::read_to_string(&plaintext_log).unwrap_or_default();
    assert!(
        plaintext.is_empty(),
        "the server got plaintext from the pod: {plaintext}"
    );
    assert!(!pod_ip.is_empty());

    // 4. A pod outside the mesh (namespace `default` is not ambient): ADD passes at once.
    let plain = t.bridge_add("plain");
    events
        .send((
            pods.clone(),
            added(pending_pod("default", "plain", "uid-plain", &node)),
        ))
        .unwrap();
    let started = Instant::now();
    let (ok, result) = t.cni(
        &plugin,
        "ADD",
        "plain",
        &pod_args("default", "plain", "uid-plain"),
        &chained(&plain),
    );
    assert!(ok, "ADD of a pod outside the mesh: {result}");
    assert!(started.elapsed() < Duration::from_secs(5));
    t.agent().wait_log("CNI ADD: not a mesh pod");

    // 5. DEL releases the pod.
    let (ok, out) = t.cni(&plugin, "DEL", "pod", &args, &chained(&pod));
    assert!(ok, "DEL: {out}");
    t.agent().wait_log("pod un-enrolled");
}
