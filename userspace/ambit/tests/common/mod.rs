//! Shared set-up for the privileged integration tests: a lab of its own per test (unique
//! prefix), Ambit nodes started on it, and helpers to read their logs.

#![allow(dead_code)]

pub mod cri;
pub mod fake_api;
pub mod kube_agent;
pub mod waypoint;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Output,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use ambit_lab::{
    split_mesh_and_pods, wait_until, write_atomically, xds_node_args, Lab, LabConfig, ZtunnelSource,
};

pub const AMBIT: &str = env!("CARGO_BIN_EXE_ambit");

/// Prefix of every test lab: `cargo xtask test` sweeps leftovers with it. A developer running
/// tests by hand while `cargo xtask test` runs on the same machine sets AMBIT_TEST_PREFIX (seven
/// characters, e.g. `ambit-h`: interface names are short) so that neither sweeps the other's labs.
pub fn test_prefix() -> String {
    std::env::var("AMBIT_TEST_PREFIX").unwrap_or_else(|_| "ambit-t".to_owned())
}

/// Flags every lab node of the tests gets on top of each test's own: AMBIT_TEST_NODE_ARGS,
/// whitespace-separated (`cargo xtask test` runs suites again with `--fast-path on`).
pub fn node_args_from_env() -> Vec<String> {
    std::env::var("AMBIT_TEST_NODE_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

pub struct TestLab {
    pub lab: Lab,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The current log file of each lab node's `ambit node`.
    logs: std::collections::HashMap<String, PathBuf>,
    /// Flags every `ambit node` of this lab gets.
    node_args: Vec<String>,
    protocol: &'static str,
    /// With `--source xds`: the nodes' pods file (`config` is then the stand-in istiod's).
    pods: Option<PathBuf>,
}

/// A stand-in istiod (`ambit control-plane`) a test started in node n2's netns, signing with
/// the lab's CA (`<dir>/ca`); the token file its callers present.
pub struct StandIn {
    pub address: String,
    pub root_cert: PathBuf,
    pub token: PathBuf,
    pub log: PathBuf,
}

impl StandIn {
    /// The flags of an `ambit node` fed by it.
    pub fn node_args(&self) -> Vec<String> {
        xds_node_args(&self.address, &self.root_cert, &self.token)
    }

    /// A lab ztunnel fed by it.
    pub fn ztunnel_source(&self) -> ZtunnelSource<'_> {
        ZtunnelSource::Istiod {
            address: &self.address,
            root_cert: &self.root_cert,
            token: &self.token,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl TestLab {
    /// A fresh lab with HTTP servers in pods c (8080) and d (8080), and an Ambit node per lab
    /// node, with `enrolled` pods in ambient mode; a and c speak HBONE.
    pub fn start(enrolled: &[&str]) -> TestLab {
        Self::start_with(
            &LabConfig {
                enrolled,
                ..LabConfig::default()
            },
            &[],
        )
    }

    /// The same with a and c as plain `protocol: TCP` workloads.
    pub fn start_tcp(enrolled: &[&str]) -> TestLab {
        Self::start_with(
            &LabConfig {
                enrolled,
                protocol: "TCP",
                ..LabConfig::default()
            },
            &[],
        )
    }

    /// A lab with a given config and extra `ambit node` flags.
    pub fn start_with(options: &LabConfig<'_>, node_args: &[&str]) -> TestLab {
        let mut t = Self::start_custom(LabSetup {
            config: &|lab| lab.config_yaml_with(options),
            ca: &|lab, dir| lab.init_ca(Path::new(AMBIT), dir),
            http_pods: &["c", "d"],
            nodes: &["n1", "n2"],
            node_args,
        });
        t.protocol = if options.protocol == "TCP" {
            "TCP"
        } else {
            "HBONE"
        };
        t
    }

    /// The lab of [`TestLab::start_with`], but the nodes hold no CA and no mesh config: a
    /// stand-in istiod (`ambit control-plane`, in node n2's netns) serves the mesh over delta
    /// xDS and signs their certificates; the nodes' `--config` only says where their pods are.
    pub fn start_xds(options: &LabConfig<'_>, node_args: &[&str]) -> TestLab {
        let mut t = Self::start_custom(LabSetup {
            config: &|lab| lab.config_yaml_with(options),
            ca: &|lab, dir| lab.init_ca(Path::new(AMBIT), dir),
            http_pods: &["c", "d"],
            nodes: &[],
            node_args: &[],
        });
        let (mesh, pods) = split_mesh_and_pods(&fs::read_to_string(&t.config).unwrap());
        fs::write(&t.config, mesh).unwrap();
        let pods_file = t.dir.join("pods.yaml");
        fs::write(&pods_file, pods).unwrap();
        let mesh_file = t.config.clone();
        let mut args = t.start_stand_in(&mesh_file).node_args();
        args.extend(node_args.iter().map(|a| a.to_string()));
        t.node_args = args;
        t.pods = Some(pods_file.clone());
        t.protocol = if options.protocol == "TCP" {
            "TCP"
        } else {
            "HBONE"
        };
        for node in ["n1", "n2"] {
            let log = t.dir.join(format!("{node}.log"));
            let a: Vec<&str> = t.node_args.iter().map(String::as_str).collect();
            t.lab
                .start_node(Path::new(AMBIT), node, &pods_file, &log, &a)
                .unwrap();
            t.logs.insert(node.to_owned(), log);
        }
        t
    }

    /// Starts the stand-in istiod serving `mesh` (logging to `<dir>/control-plane.log`) and
    /// writes the token its callers present (`<dir>/istio-token`).
    pub fn start_stand_in(&mut self, mesh: &Path) -> StandIn {
        let ca = self.dir.join("ca");
        let log = self.dir.join("control-plane.log");
        let address = self
            .lab
            .start_control_plane(Path::new(AMBIT), "n2", mesh, &ca, &log)
            .unwrap();
        let token = self.dir.join("istio-token");
        fs::write(&token, "a-projected-service-account-token").unwrap();
        StandIn {
            address,
            root_cert: ca.join("root-cert.pem"),
            token,
            log,
        }
    }

    /// The stand-in istiod's log (labs of [`TestLab::start_xds`]).
    pub fn control_plane_log(&self) -> String {
        fs::read_to_string(self.dir.join("control-plane.log")).unwrap_or_default()
    }

    /// A lab set up as `setup` says.
    pub fn start_custom(setup: LabSetup<'_>) -> TestLab {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "{}{}x{}",
            test_prefix(),
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab::create(&prefix).expect("creating the lab");
        let dir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("lab.yaml");
        fs::write(&config, (setup.config)(&lab)).unwrap();
        let ca = dir.join("ca");
        (setup.ca)(&lab, &ca).expect("the lab's CA");
        let mut args = vec!["--ca-dir".to_owned(), ca.display().to_string()];
        args.extend(setup.node_args.iter().map(|a| a.to_string()));
        args.extend(node_args_from_env());
        for pod in setup.http_pods {
            let www = dir.join(format!("www-{pod}"));
            fs::create_dir_all(&www).unwrap();
            fs::write(www.join("index.html"), format!("hello from pod {pod}\n")).unwrap();
            lab.start_http_server(pod, 8080, &www).unwrap();
        }
        let mut logs = std::collections::HashMap::new();
        for node in setup.nodes {
            let log = dir.join(format!("{node}.log"));
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.start_node(Path::new(AMBIT), node, &config, &log, &a)
                .unwrap();
            logs.insert(node.to_string(), log);
        }
        TestLab {
            lab,
            dir,
            config,
            logs,
            node_args: args,
            protocol: "HBONE",
            pods: None,
        }
    }

    pub fn log(&self, node: &str) -> String {
        fs::read_to_string(&self.logs[node]).unwrap_or_default()
    }

    /// Waits until a node's log contains `needle` at least `count` times.
    pub fn wait_log(&self, node: &str, needle: &str, count: usize) {
        self.wait_log_within(node, needle, count, Duration::from_secs(10))
    }

    /// The same, waiting up to `timeout` (scaled like every wait).
    pub fn wait_log_within(&self, node: &str, needle: &str, count: usize, timeout: Duration) {
        let ok = wait_until(timeout, needle, || {
            self.log(node).matches(needle).count() >= count
        });
        if let Err(e) = ok {
            panic!("{e}\n--- log of {node} ---\n{}", self.log(node));
        }
    }

    /// Rewrites the config (atomically, as an editor would) and waits for `node` to apply it.
    pub fn set_enrolled(&self, node: &str, enrolled: &[&str]) {
        let before = self.log(node).matches("config applied").count();
        let options = LabConfig {
            enrolled,
            protocol: self.protocol,
            ..LabConfig::default()
        };
        self.write_files(&self.lab.config_yaml_with(&options));
        self.wait_log(node, "config applied", before + 1);
    }

    /// Writes a whole config (atomically) and waits for each of `nodes` to apply it.
    pub fn write_config(&self, text: &str, nodes: &[&str]) {
        self.write_config_within(text, nodes, Duration::from_secs(10))
    }

    /// The same, waiting up to `timeout` for each node (a very large config).
    pub fn write_config_within(&self, text: &str, nodes: &[&str], timeout: Duration) {
        let before: Vec<usize> = nodes
            .iter()
            .map(|n| self.log(n).matches("config applied").count())
            .collect();
        self.write_files(text);
        for (node, before) in nodes.iter().zip(before) {
            self.wait_log_within(node, "config applied", before + 1, timeout);
        }
    }

    /// Writes a lab config: the nodes' file, or under xDS the stand-in's mesh and the pods file.
    fn write_files(&self, text: &str) {
        match &self.pods {
            None => write_atomically(&self.config, text).unwrap(),
            Some(pods_file) => {
                // Only what changed: a rewritten pods file is applied on its own, and a test
                // waiting for "config applied" must see the push.
                let (mesh, pods) = split_mesh_and_pods(text);
                if fs::read_to_string(pods_file).ok().as_deref() != Some(pods.as_str()) {
                    write_atomically(pods_file, &pods).unwrap();
                }
                write_atomically(&self.config, &mesh).unwrap();
            }
        }
    }

    pub fn curl(&self, pod: &str, url: &str) -> Output {
        // Scaled like every wait under vm-tests (AMBIT_TEST_TIMEOUT_SCALE).
        let max_time = (10.0 * ambit_lab::timeout_scale()).to_string();
        self.lab
            .run_in_pod(pod, "curl", &["-sS", "--max-time", &max_time, url])
            .unwrap()
    }

    /// Starts tools/sink.py in a pod (see there) and waits until it listens.
    pub fn start_sink(&mut self, pod: &str, port: u16) {
        self.start_server(pod, "sink", port);
    }

    /// Starts tools/<name>.py in a pod as a server on `port`, and waits until it listens.
    fn start_server(&mut self, pod: &str, name: &str, port: u16) {
        let mut cmd = self.lab.pod_command(pod, "python3");
        cmd.arg(tool(&format!("{name}.py"))).arg(port.to_string());
        self.lab.spawn(&format!("{name} in {pod}"), cmd).unwrap();
        self.lab
            .wait_listening(pod, port, &format!("{name} listening"))
            .unwrap();
    }

    /// Runs tools/outcome.py in `pod`: `n` connections to `host:port`, each sending a request
    /// first if `send`; how they ended, counted ("reset=3").
    pub fn outcomes(&self, pod: &str, host: &str, port: u16, n: usize, send: bool) -> String {
        let out = self
            .lab
            .pod_command(pod, "python3")
            .arg(tool("outcome.py"))
            .args([host, &port.to_string(), &n.to_string()])
            .args(send.then_some("--send"))
            .output()
            .unwrap();
        assert_ok(&out, "tools/outcome.py");
        stdout(&out).trim().to_owned()
    }

    /// Runs tools/source.py in a pod; returns (sent digest, digest the server received).
    pub fn send(&self, pod: &str, host: &str, port: u16, bytes: u64) -> (String, String) {
        let out = self
            .lab
            .pod_command(pod, "python3")
            .arg(tool("source.py"))
            .args([host, &port.to_string(), &bytes.to_string()])
            .output()
            .unwrap();
        assert_ok(&out, "source.py");
        let line = stdout(&out);
        let (sent, received) = line
            .trim()
            .split_once(" received=")
            .unwrap_or_else(|| panic!("unexpected source.py output: {line}"));
        (
            sent.trim_start_matches("sent=").to_owned(),
            received.to_owned(),
        )
    }

    /// The Prometheus text of a lab node's `/metrics` (port 15020).
    pub fn metrics(&self, node: &str) -> String {
        let out = self
            .lab
            .node_command(node, "curl")
            .args(["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"])
            .output()
            .unwrap();
        stdout(&out)
    }

    /// `ambit inspect` for a lab node.
    pub fn inspect(&self, node: &str) -> String {
        let out = std::process::Command::new(AMBIT)
            .args(["inspect", "--node", &self.lab.node_name(node)])
            .output()
            .unwrap();
        assert_ok(&out, "ambit inspect");
        stdout(&out)
    }

    /// Restarts a lab node's `ambit node` process (logging to a new file `<node>-<n>.log`).
    pub fn restart_node(&mut self, node: &str, log_name: &str) {
        self.lab.stop(&format!("ambit node {node}")).unwrap();
        let log = self.dir.join(log_name);
        self.lab
            .start_node(
                Path::new(AMBIT),
                node,
                &self.config,
                &log,
                &self
                    .node_args
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        self.logs.insert(node.to_owned(), log);
    }

    /// Starts a new `ambit node` process for `node` beside the running one, which hands the
    /// node over to it; returns once the new one is ready. The new process takes the running
    /// one's name (`ambit node <node>`) and log; the one replaced goes on draining under the
    /// name returned (its log stays readable under that name).
    pub fn replace_node(&mut self, node: &str, log_name: &str) -> String {
        let running = format!("ambit node {node}");
        let replaced = format!("{running} (replaced by {log_name})");
        self.lab.rename(&running, &replaced).unwrap();
        let old_log = self.logs[node].clone();
        self.logs.insert(replaced.clone(), old_log);
        let log = self.dir.join(log_name);
        let args: Vec<&str> = self.node_args.iter().map(String::as_str).collect();
        self.lab
            .start_node(Path::new(AMBIT), node, &self.config, &log, &args)
            .unwrap();
        self.logs.insert(node.to_owned(), log);
        replaced
    }

    /// Runs tools/idle_open.py in `pod`: `n` connections to `host:port` that send nothing,
    /// held until the returned process's stdin is closed; returns once every connect()
    /// returned.
    pub fn hold_idle_connections(
        &self,
        pod: &str,
        host: &str,
        port: u16,
        n: usize,
    ) -> std::process::Child {
        let mut idle = self
            .lab
            .pod_command(pod, "python3")
            .arg(tool("idle_open.py"))
            .args([host, &port.to_string(), &n.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(idle.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), format!("open {n}"));
        idle
    }

    /// Starts tools/echo.py in a pod and waits until it listens.
    pub fn start_echo(&mut self, pod: &str, port: u16) {
        self.start_server(pod, "echo", port);
    }

    /// Restarts a node with other flags (replacing the lab's `--ca-dir` etc.) and optionally
    /// another config file.
    pub fn restart_node_with(
        &mut self,
        node: &str,
        log_name: &str,
        args: &[&str],
        config: Option<&Path>,
    ) {
        self.lab.stop(&format!("ambit node {node}")).unwrap();
        let log = self.dir.join(log_name);
        let config = config.unwrap_or(&self.config).to_owned();
        self.lab
            .start_node(Path::new(AMBIT), node, &config, &log, args)
            .unwrap();
        self.logs.insert(node.to_owned(), log);
    }

    pub fn bpftool(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("bpftool")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// What `TestLab::start_custom` sets up.
pub struct LabSetup<'a> {
    /// The config file's text.
    pub config: &'a dyn Fn(&Lab) -> String,
    /// Fills the CA directory every node gets as `--ca-dir`.
    pub ca: &'a dyn Fn(&Lab, &Path) -> anyhow::Result<()>,
    /// Pods with an HTTP server on 8080, serving `<dir>/www-<pod>/` (its index.html:
    /// "hello from pod <pod>").
    pub http_pods: &'a [&'a str],
    /// Lab nodes that run an `ambit node`.
    pub nodes: &'a [&'a str],
    /// Flags every `ambit node` gets besides `--ca-dir`.
    pub node_args: &'a [&'a str],
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub fn tool(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tools")
        .join(name)
}

/// `ip:port` as a socket address is written, in URLs and in the nodes' logs: `[ip]:port` for
/// IPv6.
pub fn host_port(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// `http://<ip>:<port>/` for an address of either family.
pub fn http_url(ip: &str, port: u16) -> String {
    format!("http://{}/", host_port(ip, port))
}

/// The lab pod's IPv4 and IPv6 address, in that order: the two families a test runs for.
pub fn both_ips(pod: &str) -> [&'static str; 2] {
    let spec = ambit_lab::pod(pod);
    [spec.ip, spec.ip6]
}

/// A counter's value from `ambit inspect` output.
pub fn counter(inspect: &str, name: &str) -> u64 {
    inspect
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(name)).then(|| f.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no counter {name} in:\n{inspect}"))
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The sum of a metric's samples whose labels include every one of `labels` (`key="value"`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// What a lab node's `ambit node` process holds, from /proc: for tests that bound its memory and
/// check that it lets go of sockets.
impl TestLab {
    /// Resident memory of a lab node's `ambit node` process (VmRSS), in KiB.
    pub fn node_rss_kib(&self, node: &str) -> u64 {
        let pid = self.lab.node_pid(node).expect("the node runs");
        ambit_lab::rss_kib(pid).unwrap()
    }

    pub fn map_entries(&self, node: &str, map: &str) -> usize {
        let path = self.lab.pin_dir(node).join(map);
        let dump = self.bpftool(&["-j", "map", "dump", "pinned", path.to_str().unwrap()]);
        serde_json::from_str::<Vec<serde_json::Value>>(&dump)
            .unwrap_or_else(|e| panic!("bpftool map dump of {map}: {e}: {dump}"))
            .len()
    }

    /// Open file descriptors (sockets included) of a lab node's `ambit node` process.
    pub fn node_fds(&self, node: &str) -> usize {
        let pid = self.lab.node_pid(node).expect("the node runs");
        ambit_lab::open_fds(pid).unwrap()
    }
}

/// Serializes the tests of one test file that measure a node's memory, CPU or latency (which
/// another test's lab would blur on a 2-core machine). A failed test poisons the lock; the next
/// one may still run.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A test's scale from an environment variable (`cargo xtask stress` raises them), or `default`.
pub fn scale(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl TestLab {
    /// tools/slow.py from pod a to c's sink on `port`: one connection sending 512 B every
    /// 100 ms for `seconds`, then half-closing. See `completed_intact`.
    pub fn slow_transfer(&self, port: u16, seconds: &str) -> std::process::Child {
        self.lab
            .pod_command("a", "python3")
            .arg(tool("slow.py"))
            .args([ambit_lab::pod("c").ip, &port.to_string(), seconds])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// Whether a `slow_transfer` finished with the sink's digest equal to what it sent, and its line.
pub fn completed_intact(slow: std::process::Child) -> (bool, String) {
    let out = slow.wait_with_output().unwrap();
    let line = stdout(&out);
    let intact = out.status.success()
        && line
            .trim()
            .split_once(" received=")
            .is_some_and(|(sent, received)| sent.trim_start_matches("sent=") == received);
    (intact, line)
}
