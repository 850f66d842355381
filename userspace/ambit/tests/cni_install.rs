//! `ambit cni install` and `ambit cni uninstall`, the real binary on temporary CNI conf and bin
//! directories, playing the primary CNI's part (writing, rewriting and adding its configs) and
//! the kubelet's (SIGTERM).
//!
//! Checked: the entry is appended to the primary config's plugins and the rest of it stays as
//! it was; the binary is there and executable; a second install changes nothing; a `.conf`
//! primary becomes a `.conflist`; an entry someone took out comes back, and a new primary gets
//! it (and the old one loses it); SIGTERM keeps everything by default and takes it out with
//! `--on-exit remove`; `uninstall` cleans up; a config that does not parse is named in the
//! error and nothing is written; an empty conf dir is waited for; and the installed binary,
//! run as the runtime runs the installed chain's last plugin, asks the socket its entry names
//! and fails the pod (fail closed) when no agent answers there, except in the excluded
//! namespaces.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{fs::MetadataExt as _, fs::PermissionsExt as _, net::UnixListener},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

const AMBIT: &str = env!("CARGO_BIN_EXE_ambit");
/// How long the installer may take to notice a change (it looks every second).
const NOTICE: Duration = Duration::from_secs(5);

fn test_prefix() -> String {
    std::env::var("AMBIT_TEST_PREFIX").unwrap_or_else(|_| "ambit-t".to_owned())
}

/// A node's CNI directories in a temporary directory, and the installers running on them;
/// everything removed (and every installer killed) on drop, also when the test fails.
struct Node {
    root: PathBuf,
    conf: PathBuf,
    bin: PathBuf,
    socket: PathBuf,
    installers: Vec<Child>,
    logs: Vec<PathBuf>,
}

impl Node {
    fn new(name: &str) -> Node {
        let root = std::env::temp_dir().join(format!(
            "{}-cni-install-{name}-{}",
            test_prefix(),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&root);
        let (conf, bin) = (root.join("net.d"), root.join("bin"));
        fs::create_dir_all(&conf).unwrap();
        fs::create_dir_all(&bin).unwrap();
        let socket = root.join("cni.sock");
        Node {
            root,
            conf,
            bin,
            socket,
            installers: Vec::new(),
            logs: Vec::new(),
        }
    }

    fn command(&self, sub: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(AMBIT);
        command
            .args(["cni", sub, "--cni-conf-dir"])
            .arg(&self.conf)
            .arg("--cni-bin-dir")
            .arg(&self.bin)
            .arg("--agent-socket")
            .arg(&self.socket)
            .args(["--exclude-namespaces", "kube-system,ambit-system"])
            .args(extra)
            .env_remove("AMBIT_CNI_ON_EXIT")
            .env("RUST_LOG", "info");
        command
    }

    /// Starts `ambit cni install`; its log goes to a file of the test's directory.
    fn start(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        let log = self.root.join(format!("install-{}.log", self.logs.len()));
        let mut command = self.command("install", extra);
        command.envs(env.iter().copied());
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.installers.push(child);
        self.logs.push(log);
    }

    /// The log of the last installer started.
    fn log(&self) -> String {
        fs::read_to_string(self.logs.last().unwrap()).unwrap_or_default()
    }

    /// Runs a one-shot command to its end.
    fn run(&self, sub: &str, extra: &[&str]) -> Output {
        let mut child = self
            .command(sub, extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let output = child.wait_with_output().unwrap();
                panic!(
                    "`ambit cni {sub}` did not end: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }

    /// SIGTERM to the last installer started; its exit status.
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.installers.pop().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the installer did not stop on SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.conf.join(name)
    }

    fn write(&self, name: &str, value: &Value) {
        fs::write(
            self.path(name),
            serde_json::to_string_pretty(value).unwrap(),
        )
        .unwrap();
    }

    fn read(&self, name: &str) -> Value {
        let path = self.path(name);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap()
    }

    /// The file names in the conf dir.
    fn conf_files(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn entry(&self) -> Value {
        json!({
            "type": "ambit-cni",
            "agentSocket": self.socket.to_str().unwrap(),
            "excludeNamespaces": ["kube-system", "ambit-system"],
        })
    }

    fn chains_ambit(&self, name: &str) -> bool {
        let plugins = self.read(name)["plugins"].as_array().cloned();
        plugins.is_some_and(|p| p.iter().any(|p| p["type"] == "ambit-cni"))
    }

    fn binary(&self) -> PathBuf {
        self.bin.join("ambit-cni")
    }

    /// Waits until `what` holds; fails with the installer's log when it does not in time.
    #[track_caller]
    fn wait_until(&self, what: &str, within: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !f() {
            if Instant::now() > deadline {
                panic!(
                    "{what}: not within {within:?}; installer log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the entry in `name` and checks it is the last plugin, exactly once.
    #[track_caller]
    fn wait_for_entry(&self, name: &str) {
        self.wait_until(&format!("ambit-cni chained in {name}"), NOTICE, || {
            self.path(name).exists() && self.chains_ambit(name)
        });
        let plugins = self.read(name)["plugins"].as_array().cloned().unwrap();
        assert_eq!(plugins.last(), Some(&self.entry()), "{plugins:#?}");
        let ours = plugins.iter().filter(|p| p["type"] == "ambit-cni").count();
        assert_eq!(ours, 1, "{plugins:#?}");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for child in &mut self.installers {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A primary CNI's config: the reference bridge plugin and portmap, with fields of all kinds.
fn bridge() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "pods",
        "disableCheck": false,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": true,
                "mtu": 1450,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

/// `chain` without ambit-cni's entry.
fn without_ambit(mut chain: Value) -> Value {
    chain["plugins"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "ambit-cni");
    chain
}

#[test]
fn installs_into_a_bridge_conflist_once_and_leaves_the_rest() {
    let mut node = Node::new("bridge");
    node.write("10-bridge.conflist", &bridge());
    let other =
        "{\"cniVersion\": \"1.0.0\", \"name\": \"other\", \"plugins\": [{\"type\": \"ptp\"}]}";
    fs::write(node.path("99-other.conflist"), other).unwrap();
    fs::set_permissions(
        node.path("10-bridge.conflist"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    node.start(&[], &[]);
    node.wait_for_entry("10-bridge.conflist");
    // Everything else of the file as it was, its mode too; the other config untouched.
    assert_eq!(without_ambit(node.read("10-bridge.conflist")), bridge());
    let meta = fs::metadata(node.path("10-bridge.conflist")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        fs::read_to_string(node.path("99-other.conflist")).unwrap(),
        other
    );
    // The binary: a whole copy, executable; no temporary file left anywhere.
    let binary = fs::metadata(node.binary()).unwrap();
    assert_eq!(binary.len(), fs::metadata(AMBIT).unwrap().len());
    assert_eq!(binary.permissions().mode() & 0o111, 0o111);
    assert_eq!(
        node.conf_files(),
        ["10-bridge.conflist", "99-other.conflist"]
    );
    assert_eq!(fs::read_dir(&node.bin).unwrap().count(), 1);

    // A second installer (the next DaemonSet pod) finds nothing to change: the file is not
    // even rewritten.
    let (bytes, inode) = (
        fs::read(node.path("10-bridge.conflist")).unwrap(),
        meta.ino(),
    );
    assert!(node.stop().success());
    node.start(&[], &[]);
    node.wait_until("the second installer's binary", NOTICE, || {
        node.log().contains("installed the plugin binary")
    });
    std::thread::sleep(Duration::from_secs(2));
    node.wait_for_entry("10-bridge.conflist");
    assert_eq!(fs::read(node.path("10-bridge.conflist")).unwrap(), bytes);
    let inode_now = fs::metadata(node.path("10-bridge.conflist")).unwrap().ino();
    assert_eq!(inode_now, inode, "rewritten although nothing changed");
    assert!(
        !node.log().contains("chained in the primary"),
        "{}",
        node.log()
    );
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist() {
    let mut node = Node::new("conf");
    let conf = json!({
        "cniVersion": "0.4.0",
        "name": "kindnet",
        "type": "ptp",
        "ipMasq": false,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.2.0/24"}]]}
    });
    node.write("10-kindnet.conf", &conf);
    node.start(&[], &[]);
    node.wait_for_entry("10-kindnet.conflist");
    assert_eq!(node.conf_files(), ["10-kindnet.conflist"]);
    assert_eq!(
        node.read("10-kindnet.conflist"),
        json!({"cniVersion": "0.4.0", "name": "kindnet", "plugins": [conf, node.entry()]})
    );
}

#[test]
fn the_entry_comes_back_and_follows_a_new_primary() {
    let mut node = Node::new("watch");
    node.write("10-bridge.conflist", &bridge());
    node.start(&[], &[]);
    node.wait_for_entry("10-bridge.conflist");

    // The primary CNI rewrites its config (as Calico and Cilium do when they restart).
    node.write("10-bridge.conflist", &bridge());
    assert!(!node.chains_ambit("10-bridge.conflist"));
    node.wait_for_entry("10-bridge.conflist");
    assert_eq!(without_ambit(node.read("10-bridge.conflist")), bridge());

    // A new primary, lexically first: the runtime now reads it, so the entry goes there, and
    // out of the config the runtime no longer uses.
    let mut calico = bridge();
    calico["name"] = json!("k8s-pod-network");
    calico["plugins"][0] = json!({"type": "calico", "ipam": {"type": "calico-ipam"}});
    node.write("05-calico.conflist", &calico);
    node.wait_for_entry("05-calico.conflist");
    assert_eq!(without_ambit(node.read("05-calico.conflist")), calico);
    node.wait_until("ambit-cni out of the former primary", NOTICE, || {
        !node.chains_ambit("10-bridge.conflist")
    });
    assert_eq!(node.read("10-bridge.conflist"), bridge());

    // The binary, deleted by someone, is copied again: the chain names it.
    fs::remove_file(node.binary()).unwrap();
    node.wait_until("the binary copied again", NOTICE, || node.binary().exists());
}

#[test]
fn sigterm_keeps_the_plugin_by_default_and_remove_takes_it_out() {
    let mut node = Node::new("sigterm");
    node.write("10-bridge.conflist", &bridge());
    node.start(&[], &[]);
    node.wait_for_entry("10-bridge.conflist");
    assert!(node.stop().success());
    // Fail closed: the plugin stays in the chain and its binary in place.
    assert!(node.chains_ambit("10-bridge.conflist"));
    assert!(node.binary().exists());
    assert!(node.log().contains("--on-exit keep"), "{}", node.log());

    // --on-exit remove, here through the DaemonSet's environment variable.
    node.start(&[], &[("AMBIT_CNI_ON_EXIT", "remove")]);
    node.wait_until("the installer running", NOTICE, || {
        node.log().contains("installed the plugin binary")
    });
    assert!(node.stop().success());
    assert_eq!(node.read("10-bridge.conflist"), bridge());
    assert!(!node.binary().exists());
    assert_eq!(node.conf_files(), ["10-bridge.conflist"]);
}

#[test]
fn uninstall_takes_it_out_everywhere() {
    let mut node = Node::new("uninstall");
    node.write("10-bridge.conflist", &bridge());
    node.start(&[], &[]);
    node.wait_for_entry("10-bridge.conflist");
    assert!(node.stop().success());
    // An entry left in a config that is no longer the primary (a crashed installer's).
    let mut old = bridge();
    old["plugins"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "ambit-cni", "agentSocket": "/old.sock"}));
    node.write("20-old.conflist", &old);
    let out = node.run("uninstall", &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(node.read("10-bridge.conflist"), bridge());
    assert_eq!(node.read("20-old.conflist"), bridge());
    assert!(!node.binary().exists());
    // Again: nothing left to do, still fine.
    let out = node.run("uninstall", &[]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_config_that_does_not_parse_is_named_and_nothing_is_written() {
    let node = Node::new("bad");
    for (text, wanted) in [
        (
            "{\"cniVersion\": \"1.0.0\", \"plugins\": [",
            "10-bad.conflist: not valid JSON: EOF while parsing",
        ),
        (
            "{\"cniVersion\": \"1.0.0\", \"name\": \"x\"}",
            "10-bad.conflist: no \"plugins\" array",
        ),
    ] {
        fs::write(node.path("10-bad.conflist"), text).unwrap();
        let out = node.run("install", &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        let named = format!("{}", node.path(wanted).display());
        assert!(stderr.contains(&named), "{named:?} not in {stderr}");
        assert_eq!(
            fs::read_to_string(node.path("10-bad.conflist")).unwrap(),
            text
        );
        assert_eq!(node.conf_files(), ["10-bad.conflist"]);
        assert_eq!(fs::read_dir(&node.bin).unwrap().count(), 0, "binary copied");
    }
}

#[test]
fn an_empty_conf_dir_is_waited_for() {
    let mut node = Node::new("wait");
    node.start(&[], &[]);
    node.wait_until("the waiting line", NOTICE, || {
        node.log().contains("waiting for the primary CNI")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        node.log().matches("waiting for the primary CNI").count(),
        1,
        "{}",
        node.log()
    );
    node.write("10-bridge.conflist", &bridge());
    node.wait_for_entry("10-bridge.conflist");
}

/// The installed binary, run as the runtime runs the installed chain's last plugin (its entry
/// with the list's `cniVersion` and `name`, and the previous plugin's result), for a pod.
fn run_plugin(node: &Node, namespace: &str, config: &Value) -> (bool, Value) {
    let mut child = Command::new(node.binary())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c-1")
        .env("CNI_NETNS", "/var/run/netns/cni-test")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &node.bin)
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=sleep;K8S_POD_UID=u-1"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = config.to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout:?}"));
    (out.status.success(), result)
}

#[test]
fn the_installed_plugin_asks_the_socket_its_entry_names() {
    let mut node = Node::new("plugin");
    node.write("10-bridge.conflist", &bridge());
    node.start(&[], &[]);
    node.wait_for_entry("10-bridge.conflist");
    let chain = node.read("10-bridge.conflist");
    let mut config = chain["plugins"].as_array().unwrap().last().unwrap().clone();
    config["cniVersion"] = chain["cniVersion"].clone();
    config["name"] = chain["name"].clone();
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-test"}],
        "ips": [{"address": "10.244.1.7/24", "interface": 0}]
    });
    config["prevResult"] = prev.clone();

    // No agent on the socket: the sandbox fails (the runtime retries), naming the socket.
    let (ok, error) = run_plugin(&node, "demo", &config);
    assert!(!ok, "{error}");
    assert_eq!(error["code"], 11, "{error}");
    let details = error["details"].as_str().unwrap_or_default();
    assert!(details.contains(node.socket.to_str().unwrap()), "{error}");
    // Except for the excluded namespaces' pods: the agent's own among them, which could not
    // start otherwise.
    let (ok, result) = run_plugin(&node, "ambit-system", &config);
    assert!(ok, "{result}");
    assert_eq!(result["ips"], prev["ips"]);

    // An agent stand-in there: it is asked about this pod, and ADD passes the result on.
    let listener = UnixListener::bind(&node.socket).unwrap();
    assert!(node.log().contains("no agent serves"), "{}", node.log());
    node.wait_until(
        "the installer's log says the agent is there",
        NOTICE,
        || node.log().contains("the agent serves"),
    );
    let agent = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        (&stream)
            .write_all(b"{\"result\":\"ok\",\"captured\":true}\n")
            .unwrap();
        let _ = (&stream).read(&mut [0; 1]);
        line
    });
    let (ok, result) = run_plugin(&node, "demo", &config);
    assert!(ok, "{result}");
    assert_eq!(result["ips"], prev["ips"]);
    let request: Value = serde_json::from_str(&agent.join().unwrap()).unwrap();
    assert_eq!(request["command"], "add");
    assert_eq!(request["name"], "sleep");
    assert_eq!(request["ips"], json!(["10.244.1.7"]));
}
