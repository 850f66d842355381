//! `cargo xtask kind up|demo|down`: Ambit as a DaemonSet on a three-node kind cluster, and the
//! static checks of its manifests.
//!
//! - `up`: creates the cluster (kind-config/cluster.yaml), builds the image (deploy/Containerfile)
//!   and loads it into the nodes, creates the mesh CA Secret from `ambit ca init`, deploys
//!   deploy/ and waits for the DaemonSet.
//! - `demo`: deploys deploy/samples/ (sleep and web in the ambient namespace `demo`), waits until
//!   Ambit has enrolled them, sends requests from sleep to web, and shows the agent's "captured"
//!   log lines, the packets between the two pods (port 15008 only, no plaintext: needs root and
//!   tcpdump here), `ambit inspect`, bpftool inside a node, and the metrics.
//! - `down`: deletes the cluster.
//!
//! They need Docker (a running engine), kind and kubectl; where one is missing they say which and
//! stop. `--dry-run` prints every command instead (`+ ` first, shell syntax; values found at run
//! time appear as `$VARIABLES` set by earlier lines), which is what runs where there is no Docker.
//!
//! [`validate_manifests`] is the part that runs everywhere: every YAML under deploy/ against the
//! Kubernetes schemas (PyPI's kubernetes-validate, in a venv under target/), kind's cluster
//! config structurally, and the DaemonSet against the code: its flags against
//! `ambit node --help`, its probes and ports against the node's defaults, its mounts against the
//! flags that use them, its capabilities against the table below.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{has_command, is_root, workspace_root};

/// kind's cluster name (`name:` in kind-config/cluster.yaml): its nodes are `ambit-control-plane`,
/// `ambit-worker` and `ambit-worker2`, its kubectl context `kind-ambit`.
const CLUSTER: &str = "ambit";
const CONTEXT: &str = "kind-ambit";
const CLUSTER_CONFIG: &str = "kind-config/cluster.yaml";
const CONTAINERFILE: &str = "deploy/Containerfile";
const DOCKERIGNORE: &str = ".dockerignore";
const IMAGE: &str = "ambit:dev";
const BINARY_IN_IMAGE: &str = "/usr/local/bin/ambit";
const AGENT_NAMESPACE: &str = "ambit-system";
/// The DaemonSet, its container, its ServiceAccount and its read-only ClusterRole.
const AGENT: &str = "ambit";
const AGENT_SELECTOR: &str = "app.kubernetes.io/name=ambit";
/// The optional ClusterRole that lets the agent write `ambient.istio.io/redirection: enabled`.
const ANNOTATE_ROLE: &str = "ambit-annotate";
/// The init container that mounts bpffs and cgroup2 on the node.
const INIT_CONTAINER: &str = "mount-kernel-fs";
/// The mesh CA: Istio's plug-in CA Secret, name and files.
const CA_SECRET: &str = "cacerts";
const CA_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
];
/// Where `up` keeps the lab's CA (made once, reused by later `up`s).
const CA_DIR: &str = "target/kind/ca";

const DEMO_NAMESPACE: &str = "demo";
const DEMO_CLIENT: &str = "sleep";
const DEMO_SERVER: &str = "web";
const DEMO_SERVER_SERVICE_PORT: &str = "80";
const DEMO_SERVER_POD_PORT: &str = "8080";
const DEMO_PATH: &str = "/get";
const HBONE_PORT: u16 = 15008;
/// The agent's access-log line for each captured outbound connection, written when it ends
/// (userspace/ambit/src/observability/connection.rs; at the DaemonSet's `RUST_LOG=info`).
const CAPTURE_LOG: &str = "connection complete";
const OUTBOUND: &str = "direction=\"outbound\"";

/// The schema validator and the Kubernetes versions checked: 1.30 is the oldest the DaemonSet
/// can run on (securityContext.appArmorProfile), 1.37 the newest the validator knows.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
const VALIDATOR_VENV: &str = "target/kubernetes-validate";

/// The agent container's capabilities, each with what needs it and a string of the code that
/// does it (userspace/ambit/src): the DaemonSet must add exactly these.
const CAPABILITIES: &[(&str, &str, &str)] = &[
    ("BPF", "bpf(): programs, maps, pins", "aya"),
    (
        "PERFMON",
        "the verifier's privileged mode for Ambit's programs",
        "aya",
    ),
    (
        "NET_ADMIN",
        "cgroup sock_addr/sock_ops and sk_lookup programs, the listeners' SOCKHASH",
        "SkLookup",
    ),
    ("SYS_ADMIN", "setns() into each pod's netns", "setns"),
    (
        "SYS_PTRACE",
        "opening /proc/<pid>/ns/net of other users' processes",
        "ns/net",
    ),
];

/// Path-valued `ambit node` flags and the volume each must be on.
struct PathFlag {
    flag: &'static str,
    volume: Volume,
    read_only: bool,
    propagation: &'static [&'static str],
    why: &'static str,
}

enum Volume {
    /// A hostPath volume of this host path (None: the same path as the flag's value).
    HostPath(Option<&'static str>),
    Secret(&'static str),
}

const PATH_FLAGS: &[PathFlag] = &[
    PathFlag {
        flag: "--bpffs",
        volume: Volume::HostPath(Some("/sys/fs/bpf")),
        read_only: false,
        propagation: &["HostToContainer", "Bidirectional"],
        why: "pins must be in the node's bpffs to outlive the container",
    },
    PathFlag {
        flag: "--cgroup-root",
        volume: Volume::HostPath(None),
        read_only: true,
        propagation: &["HostToContainer"],
        why: "the node's cgroup2, mounted there by the init container",
    },
    PathFlag {
        flag: "--proc-root",
        volume: Volume::HostPath(Some("/proc")),
        read_only: true,
        propagation: &["None", ""],
        why: "the node's processes, for pods' netns and cgroups",
    },
    PathFlag {
        flag: "--ca-dir",
        volume: Volume::Secret(CA_SECRET),
        read_only: true,
        propagation: &["None", ""],
        why: "the mesh CA shared by all nodes: without it each node makes a CA of its own and \
              nodes cannot authenticate each other",
    },
];

/// Mounts of the agent container that no flag names, and why they are there anyway.
const MOUNTS_WITHOUT_FLAG: &[(&str, &str)] = &[(
    "/var/run/netns",
    "the runtime's named pod netns: lookup by sandbox netns path, nsenter when debugging",
)];

/// What the read-only ClusterRole must grant, exactly: (API group, resource).
const READ_RESOURCES: &[(&str, &str)] = &[
    ("", "pods"),
    ("", "namespaces"),
    ("", "services"),
    ("", "nodes"),
    ("discovery.k8s.io", "endpointslices"),
];

#[derive(clap::Subcommand, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KindCommand {
    /// Create the kind cluster, build and load the image, create the CA Secret, deploy Ambit.
    Up,
    /// Deploy two sample apps in an ambient namespace and show their traffic captured and
    /// encrypted (the wire check needs root and tcpdump), and a look inside a node.
    Demo,
    /// Delete the kind cluster.
    Down,
}

impl KindCommand {
    fn name(self) -> &'static str {
        match self {
            KindCommand::Up => "up",
            KindCommand::Demo => "demo",
            KindCommand::Down => "down",
        }
    }
}

pub fn run(cmd: KindCommand, dry_run: bool) -> Result<()> {
    let sh = Shell {
        dry_run,
        root: workspace_root(),
    };
    if dry_run {
        println!(
            "# cargo xtask kind {} --dry-run: the commands it runs",
            cmd.name()
        );
    }
    match cmd {
        KindCommand::Up => up(&sh),
        KindCommand::Demo => demo(&sh),
        KindCommand::Down => down(&sh),
    }
}

fn up(sh: &Shell) -> Result<()> {
    sh.require(KindCommand::Up, &[Tool::Docker, Tool::Kind, Tool::Kubectl])?;

    sh.say("== the kind cluster: one control-plane, two workers");
    let clusters = sh.output("CLUSTERS", &["kind", "get", "clusters"])?;
    if !sh.dry_run && clusters.lines().any(|c| c.trim() == CLUSTER) {
        sh.say(&format!("cluster {CLUSTER} exists; kept"));
        sh.run(&["kind", "export", "kubeconfig", "--name", CLUSTER])?;
    } else {
        sh.run(&[
            "kind",
            "create",
            "cluster",
            "--name",
            CLUSTER,
            "--config",
            CLUSTER_CONFIG,
        ])?;
    }

    sh.say("== the image (the first build takes a while: Rust, nightly and bpf-linker)");
    sh.run(&["docker", "build", "-f", CONTAINERFILE, "-t", IMAGE, "."])?;
    sh.run(&["kind", "load", "docker-image", IMAGE, "--name", CLUSTER])?;

    sh.say("== the mesh CA (Istio's plug-in CA layout) as the Secret cacerts");
    let ca_dir = sh.root.join(CA_DIR);
    if sh.dry_run || !ca_dir.join("root-cert.pem").exists() {
        if !sh.dry_run {
            fs::create_dir_all(&ca_dir)
                .with_context(|| format!("creating {}", ca_dir.display()))?;
        }
        let volume = format!("{}:/ca", ca_dir.display());
        let user = format!("{}:{}", current_uid(), current_gid());
        sh.run(&[
            "docker", "run", "--rm", "--user", &user, "-v", &volume, IMAGE, "ca", "init", "--dir",
            "/ca",
        ])?;
    } else {
        sh.say(&format!("reusing the CA in {CA_DIR}"));
    }
    sh.run(&kubectl(&["apply", "-f", "deploy/namespace.yaml"]))?;
    sh.run(&kubectl(&[
        "-n",
        AGENT_NAMESPACE,
        "delete",
        "secret",
        CA_SECRET,
        "--ignore-not-found",
    ]))?;
    let from_files: Vec<String> = CA_FILES
        .iter()
        .map(|f| format!("--from-file={f}={}", ca_dir.join(f).display()))
        .collect();
    let mut create = vec![
        "-n",
        AGENT_NAMESPACE,
        "create",
        "secret",
        "generic",
        CA_SECRET,
    ];
    create.extend(from_files.iter().map(String::as_str));
    sh.run(&kubectl(&create))?;

    sh.say("== Ambit's DaemonSet");
    let existing = sh.output(
        "EXISTING",
        &kubectl(&[
            "-n",
            AGENT_NAMESPACE,
            "get",
            "daemonset",
            AGENT,
            "-o",
            "name",
            "--ignore-not-found",
        ]),
    )?;
    sh.run(&kubectl(&["apply", "-k", "deploy/"]))?;
    let restart = kubectl(&[
        "-n",
        AGENT_NAMESPACE,
        "rollout",
        "restart",
        &format!("daemonset/{AGENT}"),
    ]);
    if sh.dry_run {
        sh.show_with_note(
            &restart,
            "only when the DaemonSet existed before: the new ambit:dev image",
        );
    } else if !existing.trim().is_empty() {
        sh.run(&restart)?;
    }
    sh.run(&kubectl(&[
        "-n",
        AGENT_NAMESPACE,
        "rollout",
        "status",
        &format!("daemonset/{AGENT}"),
        "--timeout=300s",
    ]))?;
    sh.run(&kubectl(&[
        "-n",
        AGENT_NAMESPACE,
        "get",
        "pods",
        "-l",
        AGENT_SELECTOR,
        "-o",
        "wide",
    ]))?;
    sh.say("\n== Ambit runs on every node; next: cargo xtask kind demo");
    Ok(())
}

fn demo(sh: &Shell) -> Result<()> {
    sh.require(KindCommand::Demo, &[Tool::Docker, Tool::Kubectl])?;

    sh.say("== the sample apps: sleep and web in the ambient namespace demo");
    sh.run(&kubectl(&["apply", "-k", "deploy/samples/"]))?;
    sh.run(&kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "wait",
        "--for=condition=Available",
        "deployment",
        DEMO_CLIENT,
        DEMO_SERVER,
        "--timeout=180s",
    ]))?;
    let pod_field = |var: &str, app: &str, field: &str| {
        sh.output(
            var,
            &kubectl(&[
                "-n",
                DEMO_NAMESPACE,
                "get",
                "pod",
                "-l",
                &format!("app={app}"),
                "--field-selector=status.phase=Running",
                "-o",
                &format!("jsonpath={{.items[0].{field}}}"),
            ]),
        )
    };
    let sleep_pod = pod_field("SLEEP_POD", DEMO_CLIENT, "metadata.name")?;
    let sleep_node = pod_field("SLEEP_NODE", DEMO_CLIENT, "spec.nodeName")?;
    let sleep_ip = pod_field("SLEEP_IP", DEMO_CLIENT, "status.podIP")?;
    let web_pod = pod_field("WEB_POD", DEMO_SERVER, "metadata.name")?;
    let web_node = pod_field("WEB_NODE", DEMO_SERVER, "spec.nodeName")?;
    let web_ip = pod_field("WEB_IP", DEMO_SERVER, "status.podIP")?;
    let agent_on = |var: &str, node: &str| {
        sh.output(
            var,
            &kubectl(&[
                "-n",
                AGENT_NAMESPACE,
                "get",
                "pod",
                "-l",
                AGENT_SELECTOR,
                &format!("--field-selector=spec.nodeName={node}"),
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ]),
        )
    };
    let sleep_agent = agent_on("SLEEP_AGENT", &sleep_node)?;
    let web_agent = agent_on("WEB_AGENT", &web_node)?;
    sh.say(&format!(
        "sleep {sleep_pod} ({sleep_ip}) on {sleep_node}, web {web_pod} ({web_ip}) on {web_node}"
    ));

    sh.say("== waiting until Ambit has enrolled both pods (ambit inspect on their nodes)");
    let inspect_sleep = kubectl(&[
        "-n",
        AGENT_NAMESPACE,
        "exec",
        &sleep_agent,
        "--",
        "ambit",
        "inspect",
        "--node",
        &sleep_node,
    ]);
    let inspect_web = kubectl(&[
        "-n",
        AGENT_NAMESPACE,
        "exec",
        &web_agent,
        "--",
        "ambit",
        "inspect",
        "--node",
        &web_node,
    ]);
    let sleep_key = format!("{DEMO_NAMESPACE}/{sleep_pod}:");
    sh.poll(&inspect_sleep, Duration::from_secs(120), |out| {
        out.lines().any(|l| l.trim_start().starts_with(&sleep_key))
    })
    .with_context(|| format!("{sleep_pod} was not enrolled on {sleep_node}; see the agent's log: kubectl --context {CONTEXT} -n {AGENT_NAMESPACE} logs {sleep_agent}"))?;
    sh.poll(&inspect_web, Duration::from_secs(120), |out| {
        out.lines().any(|l| l.trim() == web_ip)
    })
    .with_context(|| format!("{web_pod} ({web_ip}) has no inbound capture on {web_node}; see kubectl --context {CONTEXT} -n {AGENT_NAMESPACE} logs {web_agent}"))?;

    let wire = sh.start_wire_capture(&web_node, &sleep_ip, &web_ip)?;

    let by_service = match DEMO_SERVER_SERVICE_PORT {
        "80" => format!("http://{DEMO_SERVER}.{DEMO_NAMESPACE}.svc.cluster.local{DEMO_PATH}"),
        port => {
            format!("http://{DEMO_SERVER}.{DEMO_NAMESPACE}.svc.cluster.local:{port}{DEMO_PATH}")
        }
    };
    let by_pod_ip = format!("http://{web_ip}:{DEMO_SERVER_POD_PORT}{DEMO_PATH}");
    for (what, url) in [("by service name", &by_service), ("by pod IP", &by_pod_ip)] {
        sh.say(&format!("== sleep → web {what}"));
        sh.run(&kubectl(&[
            "-n",
            DEMO_NAMESPACE,
            "exec",
            &sleep_pod,
            "-c",
            DEMO_CLIENT,
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
            url,
        ]))?;
    }

    sh.say(&format!(
        "== the agent on {sleep_node}: \"{CAPTURE_LOG}\" lines of outbound connections"
    ));
    let logs = sh.output(
        "AGENT_LOG",
        &kubectl(&[
            "-n",
            AGENT_NAMESPACE,
            "logs",
            &sleep_agent,
            "-c",
            AGENT,
            "--tail=2000",
        ]),
    )?;
    if !sh.dry_run {
        let captured: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains(CAPTURE_LOG) && l.contains(OUTBOUND))
            .collect();
        if captured.is_empty() {
            bail!(
                "the agent on {sleep_node} logged no \"{CAPTURE_LOG}\" with {OUTBOUND}: the \
                 requests were not captured"
            );
        }
        for line in captured.iter().rev().take(4).rev() {
            println!("  {line}");
        }
    }

    if let Some(wire) = wire {
        wire.finish(&sleep_ip, &web_ip, &web_node)?;
    }

    sh.say(&format!(
        "== inside {sleep_node}: what Ambit pinned and attached"
    ));
    sh.run(&inspect_sleep)?;
    let install_bpftool = "command -v bpftool >/dev/null || { apt-get update -qq && apt-get install -y -qq bpftool >/dev/null; }";
    let pins = format!("/sys/fs/bpf/ambit/{sleep_node}/ENROLLED_NETNS");
    for cmd in [
        vec!["docker", "exec", &sleep_node, "sh", "-c", install_bpftool],
        vec![
            "docker",
            "exec",
            &sleep_node,
            "bpftool",
            "prog",
            "show",
            "name",
            "ambit_connect4",
        ],
        vec![
            "docker",
            "exec",
            &sleep_node,
            "bpftool",
            "map",
            "dump",
            "pinned",
            &pins,
        ],
    ] {
        if let Err(e) = sh.run(&cmd) {
            eprintln!("  (bpftool inside the node failed: {e:#}; ambit inspect above shows the same pins)");
            break;
        }
    }

    sh.say("== metrics of the agent on the client's node (through the API server's pod proxy)");
    let metrics_path =
        format!("/api/v1/namespaces/{AGENT_NAMESPACE}/pods/{sleep_agent}:15020/proxy/metrics");
    let metrics = sh.output("METRICS", &kubectl(&["get", "--raw", &metrics_path]))?;
    if !sh.dry_run {
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
        {
            println!("  {line}");
        }
    }

    sh.say(&format!(
        "\n== where to look (docs/kubernetes.md)
  logs:      kubectl --context {CONTEXT} -n {AGENT_NAMESPACE} logs -f -l {AGENT_SELECTOR} --prefix
  a request: kubectl --context {CONTEXT} -n {DEMO_NAMESPACE} exec deploy/{DEMO_CLIENT} -- curl -sS {by_service}
  pins:      kubectl --context {CONTEXT} -n {AGENT_NAMESPACE} exec {sleep_agent} -- ambit inspect --node {sleep_node}
  bpftool:   docker exec {sleep_node} bpftool cgroup tree
  metrics:   kubectl --context {CONTEXT} -n {AGENT_NAMESPACE} port-forward {sleep_agent} 15020 & curl -s localhost:15020/metrics
  the wire:  sudo nsenter -t $(docker inspect -f '{{{{.State.Pid}}}}' {web_node}) -n tcpdump -i any -nn -A \"tcp and host {web_ip}\"
  tear down: cargo xtask kind down"
    ));
    Ok(())
}

fn down(sh: &Shell) -> Result<()> {
    sh.require(KindCommand::Down, &[Tool::Docker, Tool::Kind])?;
    sh.run(&["kind", "delete", "cluster", "--name", CLUSTER])?;
    sh.say(&format!(
        "== cluster {CLUSTER} deleted (the lab CA stays in {CA_DIR} for the next up)"
    ));
    Ok(())
}

/// `kubectl --context kind-ambit ARGS`: never the user's current context.
fn kubectl(args: &[&str]) -> Vec<String> {
    let mut v = vec![
        "kubectl".to_owned(),
        "--context".to_owned(),
        CONTEXT.to_owned(),
    ];
    v.extend(args.iter().map(|a| (*a).to_owned()));
    v
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    Docker,
    Kind,
    Kubectl,
}

/// Runs commands from the workspace root, printing each as `+ command`; in dry-run mode only
/// prints them.
struct Shell {
    dry_run: bool,
    root: PathBuf,
}

impl Shell {
    fn say(&self, text: &str) {
        if self.dry_run {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                println!("# {}", line.trim_start_matches("== ").trim());
            }
        } else {
            println!("{text}");
        }
    }

    fn show<S: AsRef<str>>(&self, args: &[S]) {
        println!("+ {}", shell_line(args));
    }

    fn show_with_note<S: AsRef<str>>(&self, args: &[S], note: &str) {
        println!("+ {}    # {note}", shell_line(args));
    }

    fn command<S: AsRef<str>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(args[0].as_ref());
        cmd.args(args[1..].iter().map(|a| a.as_ref()))
            .current_dir(&self.root);
        cmd
    }

    /// Runs a command with the terminal's output; fails when it fails.
    fn run<S: AsRef<str>>(&self, args: &[S]) -> Result<()> {
        self.show(args);
        if self.dry_run {
            return Ok(());
        }
        let status = self
            .command(args)
            .status()
            .with_context(|| format!("running {}", shell_line(args)))?;
        if !status.success() {
            bail!("`{}` failed ({status})", shell_line(args));
        }
        Ok(())
    }

    /// Runs a command for its output, trimmed (printed as `+ VAR=$(command)`); in dry-run mode
    /// returns `$VAR`, which later commands print as a shell variable.
    fn output<S: AsRef<str>>(&self, var: &str, args: &[S]) -> Result<String> {
        println!("+ {var}=$({})", shell_line(args));
        if self.dry_run {
            return Ok(format!("${var}"));
        }
        let out = self
            .command(args)
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running {}", shell_line(args)))?;
        if !out.status.success() {
            bail!(
                "`{}` failed: {}",
                shell_line(args),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(value)
    }

    /// Runs a command (printed once) every 2 s until `done(stdout)`, for at most `timeout`.
    fn poll<S: AsRef<str>>(
        &self,
        args: &[S],
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<()> {
        self.show_with_note(args, "repeated until it shows the pod");
        if self.dry_run {
            return Ok(());
        }
        let start = Instant::now();
        let mut last = String::new();
        loop {
            if let Ok(out) = self.command(args).stderr(Stdio::piped()).output() {
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                if done(&stdout) {
                    return Ok(());
                }
                last = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
            }
            if start.elapsed() > timeout {
                bail!("still not there after {timeout:?}; last output:\n{last}");
            }
            thread::sleep(Duration::from_secs(2));
        }
    }

    /// Checks that the tools are there (Docker: an engine that answers); names every missing
    /// one and stops.
    fn require(&self, cmd: KindCommand, tools: &[Tool]) -> Result<()> {
        let mut missing = Vec::new();
        for tool in tools {
            let (check, name, hint): (&[&str], &str, &str) = match tool {
                Tool::Docker => (
                    &["docker", "info", "--format", "{{.ServerVersion}}"],
                    "docker",
                    "Docker Engine, running, with this user allowed on its socket",
                ),
                Tool::Kind => (
                    &["kind", "version"],
                    "kind",
                    "https://kind.sigs.k8s.io/docs/user/quick-start/#installation",
                ),
                Tool::Kubectl => (
                    &["kubectl", "version", "--client"],
                    "kubectl",
                    "https://kubernetes.io/docs/tasks/tools/",
                ),
            };
            self.show(check);
            if self.dry_run {
                continue;
            }
            match Command::new(check[0])
                .args(&check[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
            {
                Err(_) => missing.push(format!("{name} is not installed ({hint})")),
                Ok(out) if !out.status.success() => {
                    let why = String::from_utf8_lossy(&out.stderr);
                    let why = why.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                    let what = if *tool == Tool::Docker {
                        "the docker CLI is here but no Docker engine answers"
                    } else {
                        "installed but does not run"
                    };
                    missing.push(format!(
                        "{name}: {what}: `{}` failed: {} ({hint})",
                        shell_line(check),
                        why.trim()
                    ));
                }
                Ok(_) => {}
            }
        }
        if !missing.is_empty() {
            bail!(
                "cargo xtask kind {} needs what this machine lacks:\n  - {}\n(cargo xtask kind {} --dry-run prints the commands instead)",
                cmd.name(),
                missing.join("\n  - "),
                cmd.name()
            );
        }
        Ok(())
    }

    /// Starts tcpdump in the network namespace of web's kind node, on all its interfaces (the
    /// pods' veths and the node's eth0), for the packets between the two pods. Needs root and
    /// tcpdump and nsenter here; without them the demo says so and goes on.
    fn start_wire_capture(
        &self,
        node: &str,
        sleep_ip: &str,
        web_ip: &str,
    ) -> Result<Option<WireCapture>> {
        self.say(&format!(
            "== watching the wire between the pods, in {node}'s network namespace"
        ));
        let filter = format!("tcp and host {sleep_ip} and host {web_ip}");
        let can_capture = is_root() && has_command("tcpdump") && has_command("nsenter");
        if !self.dry_run && !can_capture {
            println!("  skipped: needs root, tcpdump and nsenter on this machine (sudo cargo xtask kind demo; docs/kubernetes.md shows it by hand)");
            return Ok(None);
        }
        let pid = self.output(
            "NODE_PID",
            &["docker", "inspect", "-f", "{{.State.Pid}}", node],
        )?;
        let args = [
            "nsenter", "-t", &pid, "-n", "tcpdump", "-i", "any", "-nn", "-l", "-A", "-s", "512",
            &filter,
        ];
        println!("+ {} &    # stopped after the requests", shell_line(&args));
        if self.dry_run {
            return Ok(None);
        }
        let mut child = self
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting tcpdump")?;
        let stdout = child.stdout.take().expect("piped");
        let reader = thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
                .collect::<Vec<String>>()
        });
        thread::sleep(Duration::from_secs(2));
        if let Ok(Some(status)) = child.try_wait() {
            println!("  skipped: tcpdump stopped at once ({status})");
            return Ok(None);
        }
        Ok(Some(WireCapture {
            child,
            reader: Some(reader),
        }))
    }
}

struct WireCapture {
    child: Child,
    reader: Option<thread::JoinHandle<Vec<String>>>,
}

impl Drop for WireCapture {
    /// tcpdump never outlives the demo, also when a step in between fails.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl WireCapture {
    /// Stops tcpdump and checks what it saw: every packet between the pods to or from port
    /// 15008, and no plaintext HTTP.
    fn finish(mut self, sleep_ip: &str, web_ip: &str, node: &str) -> Result<()> {
        thread::sleep(Duration::from_secs(1));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let lines = self
            .reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default();
        let mut packets = 0;
        let mut other_ports = BTreeSet::new();
        let mut plaintext = Vec::new();
        for line in &lines {
            if let Some((src, dst)) = tcpdump_ports(line) {
                packets += 1;
                if src != HBONE_PORT && dst != HBONE_PORT {
                    other_ports.insert(format!("{src} → {dst}"));
                }
            } else if line.contains("HTTP/1.1") || line.contains("User-Agent:") {
                plaintext.push(line.trim().to_owned());
            }
        }
        println!(
            "== on the wire between sleep ({sleep_ip}) and web ({web_ip}), seen in {node}: {packets} packets"
        );
        if !other_ports.is_empty() || !plaintext.is_empty() {
            bail!(
                "traffic between the pods outside HBONE: ports {:?}, plaintext {:?}",
                other_ports,
                plaintext.iter().take(3).collect::<Vec<_>>()
            );
        }
        if packets == 0 {
            println!("  tcpdump saw no packet (see docs/kubernetes.md to look by hand)");
        } else {
            println!("  every one to or from port {HBONE_PORT} (HBONE: TLS), no plaintext HTTP");
        }
        Ok(())
    }
}

/// The TCP ports of a tcpdump -nn header line (`... IP 10.244.1.2.40000 > 10.244.2.3.15008: ...`).
fn tcpdump_ports(line: &str) -> Option<(u16, u16)> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let arrow = tokens.iter().position(|t| *t == ">")?;
    if arrow == 0 || !tokens[..arrow].iter().any(|t| *t == "IP" || *t == "IP6") {
        return None;
    }
    let port =
        |t: &str| -> Option<u16> { t.trim_end_matches(':').rsplit('.').next()?.parse().ok() };
    Some((port(tokens[arrow - 1])?, port(tokens.get(arrow + 1)?)?))
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// Validates every YAML under deploy/ against the Kubernetes schemas and kind's cluster config
/// structurally, and checks that the DaemonSet matches the code. Fails listing every problem.
pub fn validate_manifests() -> Result<()> {
    let root = workspace_root();
    let deploy = root.join("deploy");
    let mut yaml_files = Vec::new();
    collect_yaml(&deploy, &mut yaml_files)?;
    yaml_files.sort();
    if yaml_files.is_empty() {
        bail!("no YAML under {}", deploy.display());
    }
    let venv = validator_venv(&root)?;
    let mut problems = Vec::new();

    // 1. The Kubernetes schemas (strict: unknown fields are errors), oldest and newest version.
    let objects: Vec<&Path> = yaml_files
        .iter()
        .filter(|f| !is_kustomization(f))
        .map(|f| f.strip_prefix(&root).unwrap_or(f))
        .collect();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(venv.join("bin").join(KUBERNETES_VALIDATE))
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(&objects)
            .current_dir(&root)
            .output()
            .context("running kubernetes-validate")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            // kubernetes-validate only warns about a kind it has no schema for: here that is a
            // typo in apiVersion or kind, so it is an error too.
            problems.push(format!("Kubernetes {version}: {}", line.trim()));
        }
        if !out.status.success() && text.trim().is_empty() {
            problems.push(format!(
                "Kubernetes {version}: kubernetes-validate failed ({})",
                out.status
            ));
        }
    }

    // 2. Everything parsed once, for the structural and consistency checks.
    let mut files = yaml_files.clone();
    files.push(root.join(CLUSTER_CONFIG));
    let docs = flatten_yaml(&venv, &root, &files)?;
    let manifests = Manifests { docs };

    check_kustomizations(&root, &yaml_files, &manifests, &mut problems);
    check_kind_config(&manifests, &mut problems);
    let summary = check_daemonset(&root, &manifests, &mut problems)?;
    check_rbac(&manifests, &mut problems);
    check_pod_templates(&manifests, &mut problems);
    check_samples(&manifests, &mut problems);
    check_image_build(&root, &mut problems);

    if !problems.is_empty() {
        bail!(
            "the manifests have {} problem(s):\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        );
    }
    println!(
        "manifests: {} files, {} objects valid against Kubernetes {}; {CLUSTER_CONFIG} well-formed; {summary}",
        yaml_files.len(),
        manifests
            .docs
            .iter()
            .filter(|d| d.file.starts_with("deploy/") && !d.file.ends_with("kustomization.yaml"))
            .count(),
        KUBERNETES_VERSIONS.join(" and ")
    );
    Ok(())
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_yaml(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n == "kustomization.yaml" || n == "kustomization.yml")
}

/// The venv with kubernetes-validate (and PyYAML, which it depends on), made once.
fn validator_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join(VALIDATOR_VENV);
    let tool = venv.join("bin").join(KUBERNETES_VALIDATE);
    let installed = Command::new(&tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == KUBERNETES_VALIDATE_VERSION);
    if installed {
        return Ok(venv);
    }
    if !venv.join("bin/python").exists() {
        eprintln!("xtask: creating {} (Python venv)", venv.display());
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("running python3 -m venv (Debian: apt-get install python3-venv)")?;
        if !status.success() {
            let _ = fs::remove_dir_all(&venv);
            bail!("python3 -m venv failed: install Debian's python3-venv");
        }
    }
    eprintln!(
        "xtask: installing {KUBERNETES_VALIDATE} {KUBERNETES_VALIDATE_VERSION} from PyPI into it"
    );
    // `python -m pip`, not `bin/pip`: a venv that was moved keeps stale script shebangs.
    let status = Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--force-reinstall",
            "--quiet",
            "--disable-pip-version-check",
            &format!("{KUBERNETES_VALIDATE}=={KUBERNETES_VALIDATE_VERSION}"),
        ])
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("pip install {KUBERNETES_VALIDATE}=={KUBERNETES_VALIDATE_VERSION} failed");
    }
    Ok(venv)
}

/// Turns each YAML document into `path → JSON scalar` lines (`spec.containers[0].name`,
/// `metadata.labels["istio.io/dataplane-mode"]`), so that Rust can check them without a YAML
/// parser. Empty maps and lists appear as `{}` and `[]`.
const FLATTEN_PY: &str = r#"
import json, re, sys, yaml
SIMPLE = re.compile(r'^[A-Za-z0-9_-]+$')
def walk(prefix, v, out):
    if isinstance(v, dict):
        if not v:
            out.append((prefix, '{}'))
        for k, x in v.items():
            k = str(k)
            if SIMPLE.match(k):
                p = prefix + '.' + k if prefix else k
            else:
                p = prefix + '[' + json.dumps(k) + ']'
            walk(p, x, out)
    elif isinstance(v, list):
        if not v:
            out.append((prefix, '[]'))
        for i, x in enumerate(v):
            walk(prefix + '[' + str(i) + ']', x, out)
    else:
        out.append((prefix, json.dumps(v, default=str)))
for f in sys.argv[1:]:
    try:
        with open(f) as fh:
            docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    except Exception as e:
        print('error\t' + f + '\t' + json.dumps(str(e)))
        continue
    for d in docs:
        out = []
        walk('', d, out)
        print('doc\t' + f)
        for p, v in out:
            print('field\t' + p + '\t' + v)
"#;

struct Doc {
    /// Relative to the workspace root.
    file: String,
    fields: BTreeMap<String, String>,
}

impl Doc {
    /// A scalar: strings decoded, numbers and booleans as written; None if absent or not a
    /// scalar.
    fn get(&self, path: &str) -> Option<String> {
        let raw = self.fields.get(path)?;
        if raw == "{}" || raw == "[]" {
            return None;
        }
        Some(json_string(raw).unwrap_or_else(|| raw.clone()))
    }

    fn get_or(&self, path: &str, default: &str) -> String {
        self.get(path).unwrap_or_else(|| default.to_owned())
    }

    fn has(&self, path: &str) -> bool {
        self.fields
            .range(path.to_owned()..)
            .take_while(|(k, _)| k.starts_with(path))
            .any(|(k, _)| k.len() == path.len() || matches!(k.as_bytes()[path.len()], b'.' | b'['))
    }

    fn len(&self, path: &str) -> usize {
        (0..)
            .take_while(|i| self.has(&format!("{path}[{i}]")))
            .count()
    }

    fn strings(&self, path: &str) -> Vec<String> {
        (0..self.len(path))
            .filter_map(|i| self.get(&format!("{path}[{i}]")))
            .collect()
    }

    /// The keys of the map at `path` ("" for the top level).
    fn keys(&self, path: &str) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for k in self.fields.keys() {
            let rest = if path.is_empty() {
                k.as_str()
            } else if let Some(rest) = k.strip_prefix(path).and_then(|r| r.strip_prefix('.')) {
                rest
            } else {
                continue;
            };
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            if end > 0 {
                keys.insert(rest[..end].to_owned());
            }
        }
        keys
    }

    fn kind(&self) -> String {
        self.get_or("kind", "")
    }

    fn name(&self) -> String {
        self.get_or("metadata.name", "")
    }

    fn describe(&self) -> String {
        format!("{} {} ({})", self.kind(), self.name(), self.file)
    }

    /// The index path of the container called `name` under `list` (containers or
    /// initContainers).
    fn container(&self, list: &str, name: &str) -> Option<String> {
        (0..self.len(list))
            .map(|i| format!("{list}[{i}]"))
            .find(|c| self.get(&format!("{c}.name")).as_deref() == Some(name))
    }
}

struct Manifests {
    docs: Vec<Doc>,
}

impl Manifests {
    fn find(&self, kind: &str, name: &str) -> Option<&Doc> {
        self.docs
            .iter()
            .find(|d| d.kind() == kind && d.name() == name)
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Doc> + 'a {
        self.docs.iter().filter(move |d| d.kind() == kind)
    }
}

fn flatten_yaml(venv: &Path, root: &Path, files: &[PathBuf]) -> Result<Vec<Doc>> {
    let rel: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(root)
                .unwrap_or(f)
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let out = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(FLATTEN_PY)
        .args(&rel)
        .current_dir(root)
        .output()
        .context("running Python to read the YAML")?;
    if !out.status.success() {
        bail!(
            "reading the YAML failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut docs: Vec<Doc> = Vec::new();
    let mut errors = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut parts = line.splitn(3, '\t');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("doc"), Some(file), None) => docs.push(Doc {
                file: file.to_owned(),
                fields: BTreeMap::new(),
            }),
            (Some("field"), Some(path), Some(value)) => {
                if let Some(doc) = docs.last_mut() {
                    doc.fields.insert(path.to_owned(), value.to_owned());
                }
            }
            (Some("error"), Some(file), Some(msg)) => errors.push(format!(
                "{file}: not valid YAML: {}",
                json_string(msg).unwrap_or_default()
            )),
            _ => bail!("unexpected line from the YAML reader: {line}"),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(docs)
}

/// Decodes a JSON string literal (as Python's json.dumps writes it).
fn json_string(raw: &str) -> Option<String> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    let mut pending_high: Option<u32> = None;
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'u' => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = u32::from_str_radix(&hex, 16).ok()?;
                if (0xD800..0xDC00).contains(&code) {
                    pending_high = Some(code);
                } else if (0xDC00..0xE000).contains(&code) {
                    let high = pending_high.take()?;
                    out.push(char::from_u32(
                        0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00),
                    )?);
                } else {
                    out.push(char::from_u32(code)?);
                }
            }
            other => out.push(other),
        }
    }
    Some(out)
}

fn check_kustomizations(
    root: &Path,
    yaml_files: &[PathBuf],
    m: &Manifests,
    problems: &mut Vec<String>,
) {
    for file in yaml_files.iter().filter(|f| is_kustomization(f)) {
        let rel = file.strip_prefix(root).unwrap_or(file).to_string_lossy();
        let Some(doc) = m.docs.iter().find(|d| d.file == rel) else {
            problems.push(format!("{rel}: empty"));
            continue;
        };
        if doc.get("apiVersion").as_deref() != Some("kustomize.config.k8s.io/v1beta1")
            || doc.kind() != "Kustomization"
        {
            problems.push(format!(
                "{rel}: not a kustomize.config.k8s.io/v1beta1 Kustomization"
            ));
        }
        let dir = file.parent().unwrap_or(root);
        let listed: BTreeSet<String> = doc.strings("resources").into_iter().collect();
        for r in &listed {
            if !dir.join(r).exists() {
                problems.push(format!("{rel}: resource {r} does not exist"));
            }
        }
        // Every manifest beside it is deployed by it: none is forgotten.
        for f in yaml_files {
            if f.parent() == Some(dir) && !is_kustomization(f) {
                let name = f
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if !listed.contains(&name) {
                    problems.push(format!("{rel}: does not list {name}, which is beside it"));
                }
            }
        }
    }
}

fn check_kind_config(m: &Manifests, problems: &mut Vec<String>) {
    let docs: Vec<&Doc> = m.docs.iter().filter(|d| d.file == CLUSTER_CONFIG).collect();
    let [doc] = docs.as_slice() else {
        problems.push(format!("{CLUSTER_CONFIG}: expected one YAML document"));
        return;
    };
    let p = |s: String| format!("{CLUSTER_CONFIG}: {s}");
    if doc.kind() != "Cluster" || doc.get("apiVersion").as_deref() != Some("kind.x-k8s.io/v1alpha4")
    {
        problems.push(p("not a kind.x-k8s.io/v1alpha4 Cluster".into()));
    }
    if doc.get("name").as_deref() != Some(CLUSTER) {
        problems.push(p(format!(
            "name must be {CLUSTER} (cargo xtask kind and the kubectl context kind-{CLUSTER} use it)"
        )));
    }
    const TOP: &[&str] = &[
        "kind",
        "apiVersion",
        "name",
        "nodes",
        "networking",
        "featureGates",
        "runtimeConfig",
        "kubeadmConfigPatches",
        "kubeadmConfigPatchesJSON6902",
        "containerdConfigPatches",
        "containerdConfigPatchesJSON6902",
    ];
    const NODE: &[&str] = &[
        "role",
        "image",
        "labels",
        "extraMounts",
        "extraPortMappings",
        "kubeadmConfigPatches",
        "kubeadmConfigPatchesJSON6902",
    ];
    for key in doc.keys("") {
        if !TOP.contains(&key.as_str()) {
            problems.push(p(format!("unknown field {key:?}")));
        }
    }
    let (mut control_planes, mut workers) = (0, 0);
    for i in 0..doc.len("nodes") {
        let node = format!("nodes[{i}]");
        for key in doc.keys(&node) {
            if !NODE.contains(&key.as_str()) {
                problems.push(p(format!("{node}: unknown field {key:?}")));
            }
        }
        match doc.get(&format!("{node}.role")).as_deref() {
            Some("control-plane") => control_planes += 1,
            Some("worker") => workers += 1,
            other => problems.push(p(format!(
                "{node}: role {other:?} is neither control-plane nor worker"
            ))),
        }
    }
    if control_planes != 1 || workers != 2 {
        problems.push(p(format!(
            "the lab is one control-plane and two workers, not {control_planes} and {workers}"
        )));
    }
}

/// The parts of `ambit node --help` the DaemonSet must agree with.
struct NodeHelp {
    /// `--flag` → (takes a value, default, env var)
    flags: BTreeMap<String, (bool, Option<String>, Option<String>)>,
    required: Vec<String>,
}

fn parse_node_help(text: &str) -> NodeHelp {
    let mut flags: BTreeMap<String, (bool, Option<String>, Option<String>)> = BTreeMap::new();
    let mut required = Vec::new();
    let mut current: Option<String> = None;
    let mut description: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(usage) = trimmed.strip_prefix("Usage:") {
            // Options outside [OPTIONS] in the usage line are required.
            required.extend(
                usage
                    .split_whitespace()
                    .filter(|t| t.starts_with("--"))
                    .map(|t| t.trim_matches(['[', ']']).to_owned()),
            );
            continue;
        }
        // `--flag <VALUE>` or `-f, --flag`; not the `- value: ...` lines of possible values.
        let b = trimmed.as_bytes();
        let flag_line = trimmed.starts_with("--")
            || (b.len() > 5
                && b[0] == b'-'
                && b[1].is_ascii_alphanumeric()
                && trimmed[2..].starts_with(", --"));
        if flag_line {
            let tokens: Vec<&str> = trimmed.split_whitespace().collect();
            current = None;
            for (i, t) in tokens.iter().enumerate() {
                if let Some(name) = t.strip_prefix("--") {
                    let name = format!("--{}", name.trim_end_matches(','));
                    let takes_value = tokens.get(i + 1).is_some_and(|n| n.starts_with('<'));
                    flags.insert(name.clone(), (takes_value, None, None));
                    current = Some(name);
                    break;
                }
            }
            // Short help puts the description on the same line.
            if let Some(name) = &current {
                description.insert(name.clone(), trimmed.to_owned());
            }
        } else if let Some(name) = &current {
            let d = description.entry(name.clone()).or_default();
            d.push(' ');
            d.push_str(trimmed);
        }
    }
    let bracketed = |text: &str, tag: &str| -> Option<String> {
        let start = text.find(tag)? + tag.len();
        let end = text[start..].find(']')? + start;
        Some(text[start..end].trim().to_owned())
    };
    for (name, text) in description {
        if let Some(flag) = flags.get_mut(&name) {
            flag.1 = bracketed(&text, "[default: ");
            flag.2 = bracketed(&text, "[env: ").map(|e| e.trim_end_matches('=').to_owned());
        }
    }
    NodeHelp { flags, required }
}

fn node_help(root: &Path) -> Result<String> {
    let ambit = root.join("target/debug/ambit");
    if !ambit.exists() {
        crate::cargo(&["build", "-p", "ambit"])?;
    }
    let out = Command::new(&ambit)
        .args(["node", "--help"])
        .output()
        .with_context(|| format!("running {} node --help", ambit.display()))?;
    if !out.status.success() {
        bail!("{} node --help failed", ambit.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn port_of(addr: &str) -> Option<(String, String)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.trim_matches(['[', ']']).to_owned(), port.to_owned()))
}

/// The DaemonSet against `ambit node`: flags, env, ports and probes, mounts, capabilities,
/// the init container. Returns a one-line summary.
fn check_daemonset(root: &Path, m: &Manifests, problems: &mut Vec<String>) -> Result<String> {
    let Some(ds) = m.find("DaemonSet", AGENT) else {
        problems.push(format!("deploy/: no DaemonSet named {AGENT}"));
        return Ok(String::new());
    };
    let here = ds.describe();
    let mut p = |s: String| problems.push(format!("{here}: {s}"));
    if ds.get("metadata.namespace").as_deref() != Some(AGENT_NAMESPACE) {
        p(format!("must be in namespace {AGENT_NAMESPACE}"));
    }
    let spec = "spec.template.spec";
    let Some(c) = ds.container(&format!("{spec}.containers"), AGENT) else {
        p(format!("no container named {AGENT}"));
        return Ok(String::new());
    };

    // The command line against `ambit node --help`.
    let help = parse_node_help(&node_help(root)?);
    if help.flags.is_empty() {
        bail!("found no flag in `ambit node --help`");
    }
    let command = ds.strings(&format!("{c}.command"));
    if command != [BINARY_IN_IMAGE] {
        p(format!(
            "command must be [{BINARY_IN_IMAGE}] (where {CONTAINERFILE} installs it), not {command:?}"
        ));
    }
    let args = ds.strings(&format!("{c}.args"));
    if args.first().map(String::as_str) != Some("node") {
        p(format!(
            "args must start with `node`, not {:?}",
            args.first()
        ));
    }
    let env_names: BTreeSet<String> = (0..ds.len(&format!("{c}.env")))
        .filter_map(|i| ds.get(&format!("{c}.env[{i}].name")))
        .collect();
    let mut passed: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut i = 1;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if !arg.starts_with("--") {
            p(format!("argument {arg:?} belongs to no flag"));
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let Some((takes_value, _, _)) = help.flags.get(&name) else {
            p(format!(
                "passes {name}, which `ambit node` does not have (target/debug/ambit node --help)"
            ));
            continue;
        };
        let value = if *takes_value {
            match inline {
                Some(v) => Some(v),
                None if args.get(i).is_some_and(|v| !v.starts_with("--")) => {
                    i += 1;
                    Some(args[i - 1].clone())
                }
                None => {
                    p(format!("{name} needs a value"));
                    None
                }
            }
        } else {
            if inline.is_some() {
                p(format!("{name} takes no value"));
            }
            None
        };
        if let Some(v) = &value {
            // $(VAR) is expanded by the kubelet only when the container defines VAR.
            let mut rest = v.as_str();
            while let Some(start) = rest.find("$(") {
                let Some(end) = rest[start..].find(')') else {
                    break;
                };
                let var = &rest[start + 2..start + end];
                if !env_names.contains(var) {
                    p(format!("{name} {v}: the container has no env {var}"));
                }
                rest = &rest[start + end..];
            }
        }
        if passed.insert(name.clone(), value).is_some() {
            p(format!("passes {name} twice"));
        }
    }
    for req in &help.required {
        let by_env = help
            .flags
            .get(req)
            .and_then(|f| f.2.as_ref())
            .is_some_and(|e| env_names.contains(e));
        if !passed.contains_key(req) && !by_env {
            p(format!(
                "`ambit node` requires {req}, which the DaemonSet does not pass"
            ));
        }
    }
    let effective = |flag: &str| -> Option<String> {
        passed
            .get(flag)
            .cloned()
            .flatten()
            .or_else(|| help.flags.get(flag).and_then(|f| f.1.clone()))
    };
    if passed.get("--source").cloned().flatten().as_deref() != Some("kubernetes") {
        p("must pass --source kubernetes".into());
    }
    if passed.get("--node").cloned().flatten().as_deref() != Some("$(NODE_NAME)") {
        p("must pass --node $(NODE_NAME)".into());
    }
    let node_name_from = (0..ds.len(&format!("{c}.env")))
        .map(|i| format!("{c}.env[{i}]"))
        .find(|e| ds.get(&format!("{e}.name")).as_deref() == Some("NODE_NAME"))
        .and_then(|e| ds.get(&format!("{e}.valueFrom.fieldRef.fieldPath")));
    if node_name_from.as_deref() != Some("spec.nodeName") {
        p("env NODE_NAME must come from fieldRef spec.nodeName".into());
    }

    // Ports: the node's defaults, reachable through the pod IP (probes, Prometheus), admin on
    // loopback.
    let default_of = |flag: &str| help.flags.get(flag).and_then(|f| f.1.clone());
    let container_ports: BTreeMap<String, String> = (0..ds.len(&format!("{c}.ports")))
        .filter_map(|i| {
            Some((
                ds.get(&format!("{c}.ports[{i}].containerPort"))?,
                ds.get_or(&format!("{c}.ports[{i}].name"), ""),
            ))
        })
        .collect();
    let resolve_port = |port: Option<String>| -> Option<String> {
        let port = port?;
        if port.chars().all(|ch| ch.is_ascii_digit()) {
            Some(port)
        } else {
            container_ports
                .iter()
                .find(|(_, name)| **name == port)
                .map(|(n, _)| n.clone())
        }
    };
    let mut ports_summary = Vec::new();
    for (flag, public) in [
        ("--metrics-addr", true),
        ("--readiness-addr", true),
        ("--admin-addr", false),
    ] {
        let (Some(value), Some(default)) = (effective(flag), default_of(flag)) else {
            p(format!("`ambit node --help` shows no default for {flag}"));
            continue;
        };
        if value != default {
            p(format!(
                "{flag} {value} differs from the node's default {default}"
            ));
        }
        let Some((host, port)) = port_of(&value) else {
            p(format!("{flag} {value} is not host:port"));
            continue;
        };
        let loopback = host.starts_with("127.") || host == "::1" || host == "localhost";
        if public && loopback {
            p(format!(
                "{flag} {value} is on loopback: kubelet and Prometheus come through the pod IP"
            ));
        }
        if !public && !loopback {
            p(format!("{flag} {value} must stay on loopback"));
        }
        if public && !container_ports.contains_key(&port) {
            p(format!("no containerPort {port} for {flag}"));
        }
        if flag == "--readiness-addr" {
            let readiness = resolve_port(ds.get(&format!("{c}.readinessProbe.httpGet.port")));
            if readiness.as_deref() != Some(port.as_str())
                || ds
                    .get(&format!("{c}.readinessProbe.httpGet.path"))
                    .as_deref()
                    != Some("/healthz/ready")
            {
                p(format!(
                    "readinessProbe must be httpGet /healthz/ready on port {port}"
                ));
            }
            let liveness = resolve_port(
                ds.get(&format!("{c}.livenessProbe.tcpSocket.port"))
                    .or_else(|| ds.get(&format!("{c}.livenessProbe.httpGet.port"))),
            );
            if liveness.as_deref() != Some(port.as_str()) {
                p(format!(
                    "livenessProbe must check the health port {port}, not {liveness:?}"
                ));
            }
        }
        if flag == "--metrics-addr" {
            let annotated = ds.get("spec.template.metadata.annotations[\"prometheus.io/port\"]");
            if annotated.is_some_and(|a| a != port) {
                p(format!("the prometheus.io/port annotation is not {port}"));
            }
        }
        ports_summary.push(port);
    }

    // Mounts: each path flag on the volume it needs, each mount used by a flag.
    let volumes: BTreeMap<String, String> = (0..ds.len(&format!("{spec}.volumes")))
        .filter_map(|i| {
            let v = format!("{spec}.volumes[{i}]");
            let name = ds.get(&format!("{v}.name"))?;
            let source = if let Some(path) = ds.get(&format!("{v}.hostPath.path")) {
                format!("hostPath:{path}")
            } else if let Some(secret) = ds.get(&format!("{v}.secret.secretName")) {
                format!("secret:{secret}")
            } else {
                "other".to_owned()
            };
            Some((name, source))
        })
        .collect();
    let mounts = |container: &str| -> Vec<(String, String, bool, String)> {
        (0..ds.len(&format!("{container}.volumeMounts")))
            .map(|i| {
                let vm = format!("{container}.volumeMounts[{i}]");
                (
                    ds.get_or(&format!("{vm}.name"), ""),
                    ds.get_or(&format!("{vm}.mountPath"), ""),
                    ds.get(&format!("{vm}.readOnly")).as_deref() == Some("true"),
                    ds.get_or(&format!("{vm}.mountPropagation"), ""),
                )
            })
            .collect()
    };
    let agent_mounts = mounts(&c);
    let path_values: Vec<(String, String)> = passed
        .iter()
        .filter_map(|(f, v)| Some((f.clone(), v.clone()?)))
        .filter(|(_, v)| v.starts_with('/'))
        .collect();
    for (flag, value) in &path_values {
        if !agent_mounts
            .iter()
            .any(|(_, mp, _, _)| value == mp || value.starts_with(&format!("{mp}/")))
        {
            p(format!(
                "{flag} {value} is on no volume: the agent would see its container's own files"
            ));
        }
    }
    for pf in PATH_FLAGS {
        let Some(value) = passed.get(pf.flag).cloned().flatten() else {
            p(format!("must pass {} ({})", pf.flag, pf.why));
            continue;
        };
        let Some((name, _, read_only, propagation)) =
            agent_mounts.iter().find(|(_, mp, _, _)| *mp == value)
        else {
            continue; // reported above
        };
        let want = match pf.volume {
            Volume::HostPath(path) => format!("hostPath:{}", path.unwrap_or(&value)),
            Volume::Secret(secret) => format!("secret:{secret}"),
        };
        if volumes.get(name) != Some(&want) {
            p(format!(
                "{} {value}: volume {name} must be {want} ({}), not {:?}",
                pf.flag,
                pf.why,
                volumes.get(name)
            ));
        }
        if *read_only != pf.read_only {
            p(format!(
                "{} {value}: mount must be {}",
                pf.flag,
                if pf.read_only { "readOnly" } else { "writable" }
            ));
        }
        if !pf.propagation.contains(&propagation.as_str()) {
            p(format!(
                "{} {value}: mountPropagation must be one of {:?}, not {propagation:?}",
                pf.flag, pf.propagation
            ));
        }
    }
    for (_, mount_path, _, _) in &agent_mounts {
        let used = path_values
            .iter()
            .any(|(_, v)| v == mount_path || v.starts_with(&format!("{mount_path}/")));
        let excused = MOUNTS_WITHOUT_FLAG
            .iter()
            .any(|(path, _)| path == mount_path);
        if !used && !excused {
            p(format!(
                "mounts {mount_path}, which no flag of `ambit node` uses (pass it to the flag that needs it, remove it, or add it with its reason to MOUNTS_WITHOUT_FLAG in xtask/src/kind.rs)"
            ));
        }
    }

    // The init container mounts bpffs and cgroup2 on the node, where the flags point.
    match ds.container(&format!("{spec}.initContainers"), INIT_CONTAINER) {
        None => p(format!(
            "no init container {INIT_CONTAINER} (it mounts bpffs and cgroup2 on the node)"
        )),
        Some(init) => {
            let script = ds.strings(&format!("{init}.command")).join(" ");
            let init_mounts = mounts(&init);
            for (flag, fstype) in [("--bpffs", "bpf"), ("--cgroup-root", "cgroup2")] {
                let Some(value) = passed.get(flag).cloned().flatten() else {
                    continue;
                };
                let Some((agent_volume, ..)) = agent_mounts.iter().find(|(_, mp, ..)| *mp == value)
                else {
                    continue;
                };
                let same = init_mounts
                    .iter()
                    .find(|(name, mp, ..)| name == agent_volume && *mp == value);
                match same {
                    Some((_, _, _, prop)) if prop == "Bidirectional" => {}
                    _ => p(format!(
                        "{INIT_CONTAINER} must mount volume {agent_volume} at {value} with Bidirectional propagation, so that its {fstype} mount reaches the node"
                    )),
                }
                if !script.contains(&format!("mount -t {fstype}")) || !script.contains(&value) {
                    p(format!(
                        "{INIT_CONTAINER} does not mount {fstype} at {value} ({flag})"
                    ));
                }
            }
            if let Some(proc_root) = passed.get("--proc-root").cloned().flatten() {
                if script.contains("/ns/cgroup")
                    && !script.contains(&format!("{proc_root}/1/ns/cgroup"))
                {
                    p(format!(
                        "{INIT_CONTAINER} must enter the node's cgroup namespace through {proc_root}/1/ns/cgroup"
                    ));
                }
            }
            if ds.get(&format!("{init}.image")).as_deref() != Some(IMAGE) {
                p(format!(
                    "{INIT_CONTAINER} runs sh, mount and nsenter from {IMAGE}: use that image"
                ));
            }
        }
    }

    // Capabilities: exactly the table's, each still needed by the code.
    let sc = format!("{c}.securityContext");
    if ds.get(&format!("{sc}.privileged")).as_deref() == Some("true") {
        p("the agent container must not be privileged (its capabilities are listed)".into());
    }
    let drop: BTreeSet<String> = ds
        .strings(&format!("{sc}.capabilities.drop"))
        .into_iter()
        .collect();
    if !drop.contains("ALL") {
        p("the agent container must drop ALL capabilities before adding its own".into());
    }
    let added: BTreeSet<String> = ds
        .strings(&format!("{sc}.capabilities.add"))
        .into_iter()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    let wanted: BTreeSet<String> = CAPABILITIES
        .iter()
        .map(|(c, _, _)| (*c).to_owned())
        .collect();
    for cap in added.difference(&wanted) {
        p(format!(
            "adds {cap}, which Ambit does not need (or add it with its reason to CAPABILITIES in xtask/src/kind.rs)"
        ));
    }
    for cap in wanted.difference(&added) {
        let why = CAPABILITIES
            .iter()
            .find(|(c, _, _)| c == cap)
            .map(|(_, w, _)| *w)
            .unwrap_or_default();
        p(format!("does not add {cap}, needed for {why}"));
    }
    let source = rust_sources(&root.join("userspace/ambit/src"));
    for (cap, why, needle) in CAPABILITIES {
        if !source.contains(needle) {
            p(format!(
                "{cap} is there for {why}, but userspace/ambit/src no longer contains {needle:?}: is it still needed?"
            ));
        }
    }

    // Policy the comments explain.
    if ds
        .get("spec.updateStrategy.rollingUpdate.maxSurge")
        .as_deref()
        != Some("0")
    {
        p("updateStrategy.rollingUpdate.maxSurge must be 0: two agents for one node must not run at once".into());
    }
    let tolerates_all = (0..ds.len(&format!("{spec}.tolerations"))).any(|i| {
        let t = format!("{spec}.tolerations[{i}]");
        ds.get(&format!("{t}.operator")).as_deref() == Some("Exists")
            && ds.get(&format!("{t}.key")).is_none()
            && ds.get(&format!("{t}.effect")).is_none()
    });
    if !tolerates_all {
        p("must tolerate every taint (operator: Exists, no key, no effect)".into());
    }
    if ds.get(&format!("{spec}.priorityClassName")).as_deref() != Some("system-node-critical") {
        p("priorityClassName must be system-node-critical".into());
    }
    if ds.get(&format!("{spec}.hostNetwork")).as_deref() == Some("true") {
        p("hostNetwork: the agent needs nothing of the node's netns (and its ports must stay off the node's addresses)".into());
    }
    for list in ["containers", "initContainers"] {
        for i in 0..ds.len(&format!("{spec}.{list}")) {
            let k = format!("{spec}.{list}[{i}]");
            let name = ds.get_or(&format!("{k}.name"), "?");
            if ds.get(&format!("{k}.image")).as_deref() != Some(IMAGE)
                || ds.get(&format!("{k}.imagePullPolicy")).as_deref() != Some("IfNotPresent")
            {
                p(format!(
                    "container {name}: image {IMAGE} with imagePullPolicy IfNotPresent (kind loads it; there is no registry to pull from)"
                ));
            }
        }
    }
    let sa = ds.get_or(&format!("{spec}.serviceAccountName"), "");
    if sa != AGENT {
        p(format!(
            "serviceAccountName must be {AGENT} (rbac.yaml binds it)"
        ));
    }
    let secret_ok = (0..ds.len(&format!("{spec}.volumes"))).any(|i| {
        ds.get(&format!("{spec}.volumes[{i}].secret.secretName"))
            .as_deref()
            == Some(CA_SECRET)
    });
    if !secret_ok {
        p(format!(
            "no volume of the Secret {CA_SECRET} (what cargo xtask kind up creates)"
        ));
    }

    Ok(format!(
        "DaemonSet consistent with `ambit node` ({} flags, ports {}, {} mounts, capabilities {})",
        passed.len(),
        ports_summary.join("/"),
        agent_mounts.len(),
        CAPABILITIES
            .iter()
            .map(|(c, _, _)| *c)
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

fn rust_sources(dir: &Path) -> String {
    let mut text = String::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return text;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            text.push_str(&rust_sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            text.push_str(&fs::read_to_string(&path).unwrap_or_default());
        }
    }
    text
}

/// RBAC: the read-only role grants exactly what the Kubernetes source watches, the optional
/// role nothing but `patch` on pods, and both are bound to the DaemonSet's ServiceAccount.
fn check_rbac(m: &Manifests, problems: &mut Vec<String>) {
    let rules = |doc: &Doc| -> Vec<(BTreeSet<String>, BTreeSet<String>, BTreeSet<String>)> {
        (0..doc.len("rules"))
            .map(|i| {
                let r = format!("rules[{i}]");
                let set = |k: &str| -> BTreeSet<String> {
                    doc.strings(&format!("{r}.{k}")).into_iter().collect()
                };
                (set("apiGroups"), set("resources"), set("verbs"))
            })
            .collect()
    };
    match m.find("ClusterRole", AGENT) {
        None => problems.push(format!("deploy/: no ClusterRole {AGENT}")),
        Some(role) => {
            let mut granted = BTreeSet::new();
            for (groups, resources, verbs) in rules(role) {
                let extra: Vec<&String> = verbs
                    .iter()
                    .filter(|v| !["get", "list", "watch"].contains(&v.as_str()))
                    .collect();
                if !extra.is_empty() {
                    problems.push(format!(
                        "{}: must be read-only, grants {extra:?}",
                        role.describe()
                    ));
                }
                if verbs.len() < 3 {
                    problems.push(format!(
                        "{}: {resources:?} need get, list and watch (reflectors list then watch)",
                        role.describe()
                    ));
                }
                for g in &groups {
                    for r in &resources {
                        granted.insert((g.clone(), r.clone()));
                    }
                }
            }
            let wanted: BTreeSet<(String, String)> = READ_RESOURCES
                .iter()
                .map(|(g, r)| ((*g).to_owned(), (*r).to_owned()))
                .collect();
            for (g, r) in wanted.difference(&granted) {
                problems.push(format!(
                    "{}: does not grant {r} (API group {g:?}), which the agent watches",
                    role.describe()
                ));
            }
            for (g, r) in granted.difference(&wanted) {
                problems.push(format!(
                    "{}: grants {r} (API group {g:?}), which the agent does not read",
                    role.describe()
                ));
            }
        }
    }
    if let Some(role) = m.find("ClusterRole", ANNOTATE_ROLE) {
        let want = (
            BTreeSet::from([String::new()]),
            BTreeSet::from(["pods".to_owned()]),
            BTreeSet::from(["patch".to_owned()]),
        );
        if rules(role) != [want] {
            problems.push(format!(
                "{}: must grant only patch on pods (the redirection annotation)",
                role.describe()
            ));
        }
    }
    let roles: BTreeSet<String> = m.of_kind("ClusterRole").map(Doc::name).collect();
    let bindings: Vec<&Doc> = m.of_kind("ClusterRoleBinding").collect();
    for binding in &bindings {
        let role = binding.get_or("roleRef.name", "");
        if binding.get("roleRef.kind").as_deref() != Some("ClusterRole") || !roles.contains(&role) {
            problems.push(format!(
                "{}: binds {role:?}, which is no ClusterRole in deploy/",
                binding.describe()
            ));
        }
        for i in 0..binding.len("subjects") {
            let s = format!("subjects[{i}]");
            if binding.get(&format!("{s}.kind")).as_deref() != Some("ServiceAccount")
                || binding.get(&format!("{s}.name")).as_deref() != Some(AGENT)
                || binding.get(&format!("{s}.namespace")).as_deref() != Some(AGENT_NAMESPACE)
            {
                problems.push(format!(
                    "{}: subject must be the ServiceAccount {AGENT_NAMESPACE}/{AGENT}",
                    binding.describe()
                ));
            }
        }
    }
    for role in &roles {
        if !bindings
            .iter()
            .any(|b| b.get("roleRef.name").as_deref() == Some(role))
        {
            problems.push(format!("ClusterRole {role} is bound to nobody"));
        }
    }
    match m.find("ServiceAccount", AGENT) {
        Some(sa) if sa.get("metadata.namespace").as_deref() == Some(AGENT_NAMESPACE) => {}
        _ => problems.push(format!(
            "deploy/: no ServiceAccount {AGENT} in {AGENT_NAMESPACE}"
        )),
    }
    match m.find("Namespace", AGENT_NAMESPACE) {
        Some(ns)
            if ns
                .get("metadata.labels[\"pod-security.kubernetes.io/enforce\"]")
                .as_deref()
                == Some("privileged") => {}
        _ => problems.push(format!(
            "deploy/: the Namespace {AGENT_NAMESPACE} must exist with pod-security.kubernetes.io/enforce: privileged (hostPath, capabilities, a privileged init container)"
        )),
    }
    for doc in m.docs.iter().filter(|d| {
        d.file.starts_with("deploy/")
            && !d.file.starts_with("deploy/samples/")
            && d.has("metadata.namespace")
    }) {
        if doc.get("metadata.namespace").as_deref() != Some(AGENT_NAMESPACE) {
            problems.push(format!(
                "{}: must be in namespace {AGENT_NAMESPACE}",
                doc.describe()
            ));
        }
    }
}

/// API rules the schemas do not carry, for every pod template under deploy/.
fn check_pod_templates(m: &Manifests, problems: &mut Vec<String>) {
    for doc in &m.docs {
        let spec = match doc.kind().as_str() {
            "DaemonSet" | "Deployment" | "StatefulSet" | "Job" => "spec.template.spec",
            "Pod" => "spec",
            _ => continue,
        };
        for list in ["containers", "initContainers"] {
            for i in 0..doc.len(&format!("{spec}.{list}")) {
                let c = format!("{spec}.{list}[{i}]");
                let name = doc.get_or(&format!("{c}.name"), "?");
                let privileged = doc
                    .get(&format!("{c}.securityContext.privileged"))
                    .as_deref()
                    == Some("true");
                let no_escalation = doc
                    .get(&format!("{c}.securityContext.allowPrivilegeEscalation"))
                    .as_deref()
                    == Some("false");
                let sys_admin = doc
                    .strings(&format!("{c}.securityContext.capabilities.add"))
                    .iter()
                    .any(|cap| cap.trim_start_matches("CAP_") == "SYS_ADMIN");
                if no_escalation && (privileged || sys_admin) {
                    problems.push(format!(
                        "{}: container {name}: the API rejects allowPrivilegeEscalation: false with privileged or SYS_ADMIN",
                        doc.describe()
                    ));
                }
                for j in 0..doc.len(&format!("{c}.volumeMounts")) {
                    let prop = doc.get(&format!("{c}.volumeMounts[{j}].mountPropagation"));
                    if prop.as_deref() == Some("Bidirectional") && !privileged {
                        problems.push(format!(
                            "{}: container {name}: the API allows Bidirectional mount propagation only in privileged containers",
                            doc.describe()
                        ));
                    }
                }
            }
        }
    }
}

/// The sample apps the demo relies on: an ambient namespace, the client and the server, a
/// Service whose selector and ports reach the server.
fn check_samples(m: &Manifests, problems: &mut Vec<String>) {
    let samples: Vec<&Doc> = m
        .docs
        .iter()
        .filter(|d| d.file.starts_with("deploy/samples/"))
        .collect();
    let find = |kind: &str, name: &str| {
        samples
            .iter()
            .find(|d| d.kind() == kind && d.name() == name)
            .copied()
    };
    match find("Namespace", DEMO_NAMESPACE) {
        Some(ns)
            if ns
                .get("metadata.labels[\"istio.io/dataplane-mode\"]")
                .as_deref()
                == Some("ambient") => {}
        _ => problems.push(format!(
            "deploy/samples: the Namespace {DEMO_NAMESPACE} must be labelled istio.io/dataplane-mode=ambient"
        )),
    }
    for doc in samples.iter().filter(|d| d.has("metadata.namespace")) {
        if doc.get("metadata.namespace").as_deref() != Some(DEMO_NAMESPACE) {
            problems.push(format!(
                "{}: must be in namespace {DEMO_NAMESPACE}",
                doc.describe()
            ));
        }
    }
    for (app, container) in [(DEMO_CLIENT, Some(DEMO_CLIENT)), (DEMO_SERVER, None)] {
        let Some(d) = find("Deployment", app) else {
            problems.push(format!("deploy/samples: no Deployment {app}"));
            continue;
        };
        if d.get("spec.template.metadata.labels.app").as_deref() != Some(app) {
            problems.push(format!(
                "{}: pods must carry app={app} (the demo selects them so)",
                d.describe()
            ));
        }
        if let Some(name) = container {
            if d.container("spec.template.spec.containers", name).is_none() {
                problems.push(format!(
                    "{}: no container {name} (the demo execs into it)",
                    d.describe()
                ));
            }
        }
    }
    let Some(svc) = find("Service", DEMO_SERVER) else {
        problems.push(format!("deploy/samples: no Service {DEMO_SERVER}"));
        return;
    };
    let selector: BTreeMap<String, String> = svc
        .keys("spec.selector")
        .into_iter()
        .filter_map(|k| Some((k.clone(), svc.get(&format!("spec.selector.{k}"))?)))
        .collect();
    let Some(server) = samples.iter().find(|d| {
        d.kind() == "Deployment"
            && !selector.is_empty()
            && selector.iter().all(|(k, v)| {
                d.get(&format!("spec.template.metadata.labels.{k}"))
                    .as_ref()
                    == Some(v)
            })
    }) else {
        problems.push(format!(
            "{}: its selector matches no Deployment's pods",
            svc.describe()
        ));
        return;
    };
    let mut ports = Vec::new();
    for i in 0..server.len("spec.template.spec.containers") {
        let c = format!("spec.template.spec.containers[{i}]");
        for j in 0..server.len(&format!("{c}.ports")) {
            ports.push((
                server.get_or(&format!("{c}.ports[{j}].containerPort"), ""),
                server.get_or(&format!("{c}.ports[{j}].name"), ""),
            ));
        }
    }
    let mut serves_demo_port = false;
    for i in 0..svc.len("spec.ports") {
        let port = svc.get_or(&format!("spec.ports[{i}].port"), "");
        let target = svc.get_or(&format!("spec.ports[{i}].targetPort"), &port);
        if !ports
            .iter()
            .any(|(n, name)| *n == target || *name == target)
        {
            problems.push(format!(
                "{}: targetPort {target} is no port of {}",
                svc.describe(),
                server.name()
            ));
        }
        if port == DEMO_SERVER_SERVICE_PORT
            && (target == DEMO_SERVER_POD_PORT
                || ports
                    .iter()
                    .any(|(n, name)| *name == target && n == DEMO_SERVER_POD_PORT))
        {
            serves_demo_port = true;
        }
    }
    if !serves_demo_port {
        problems.push(format!(
            "{}: the demo calls port {DEMO_SERVER_SERVICE_PORT} → pod port {DEMO_SERVER_POD_PORT}",
            svc.describe()
        ));
    }
}

/// The Containerfile installs the binary where the DaemonSet runs it; the build context skips
/// target/.
fn check_image_build(root: &Path, problems: &mut Vec<String>) {
    match fs::read_to_string(root.join(CONTAINERFILE)) {
        Ok(text) => {
            if !text.contains(BINARY_IN_IMAGE) {
                problems.push(format!(
                    "{CONTAINERFILE}: does not install {BINARY_IN_IMAGE}"
                ));
            }
        }
        Err(e) => problems.push(format!("{CONTAINERFILE}: {e}")),
    }
    match fs::read_to_string(root.join(DOCKERIGNORE)) {
        Ok(text)
            if text
                .lines()
                .any(|l| l.trim().trim_start_matches('/') == "target/" || l.trim() == "target") => {
        }
        _ => problems.push(format!(
            "{DOCKERIGNORE}: must exclude target/ from the image's build context"
        )),
    }
}

// ---------------------------------------------------------------------------------------------

/// One command line in shell syntax: plain words bare, `$VARIABLES` (dry-run placeholders) in
/// double quotes, anything else in single quotes.
fn shell_line<S: AsRef<str>>(args: &[S]) -> String {
    args.iter()
        .map(|a| quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        return arg.to_owned();
    }
    let placeholder_only = arg.contains('$')
        && !arg.contains(['"', '\\', '`'])
        && !arg.contains("$(")
        && !arg.contains("${");
    if placeholder_only {
        return format!("\"{arg}\"");
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

fn current_gid() -> u32 {
    // SAFETY: getgid has no preconditions.
    unsafe { libc::getgid() }
}
