//! The DaemonSet against the code: its command line against `ambit node`'s flags, its ports and
//! probes against the node's defaults, its mounts against the flags that use them, the init
//! container against the kernel filesystems those flags point at, its capabilities against
//! [`CAPABILITIES`], the scheduling policy deploy/daemonset.yaml explains, and the CNI
//! installer beside the agent (installer.rs).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    installer, int_or_string, list, node_flags::NodeFlags, Manifests, Report, BINARY_IN_IMAGE,
};
use crate::kind::{AGENT, AGENT_NAMESPACE, CONTAINERFILE, IMAGE, ROOT_CERT_CONFIGMAP};

/// The audience istiod's CA accepts tokens for.
const ISTIO_CA_AUDIENCE: &str = "istio-ca";

/// The init container that mounts bpffs and cgroup2 on the node.
const INIT_CONTAINER: &str = "mount-kernel-fs";

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
    ConfigMap(&'static str),
    /// A projected service-account token for this audience.
    Token(&'static str),
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
        // Writable: pods' fwmark_reflect is written through <proc-root>/sys.
        read_only: false,
        propagation: &["None", ""],
        why: "the node's processes, for pods' netns and cgroups, and pods' sysctls",
    },
    PathFlag {
        flag: "--xds-root-cert",
        volume: Volume::ConfigMap(ROOT_CERT_CONFIGMAP),
        read_only: true,
        propagation: &["None", ""],
        why: "istiod's root, which istiod publishes in every namespace",
    },
    PathFlag {
        flag: "--token-file",
        volume: Volume::Token(ISTIO_CA_AUDIENCE),
        read_only: true,
        propagation: &["None", ""],
        why: "the agent's token for istiod, projected and rotated by the kubelet",
    },
];

/// Mounts of the agent container that no flag names, and why they are there anyway.
const MOUNTS_WITHOUT_FLAG: &[(&str, &str)] = &[(
    "/var/run/netns",
    "the runtime's named pod netns: lookup by sandbox netns path, nsenter when debugging",
)];

/// How the agent's messages name its container.
const C: &str = "containers[ambit]";

/// The flags the DaemonSet passes, each with its value.
struct Passed(BTreeMap<String, Option<String>>);

impl Passed {
    fn value(&self, flag: &str) -> Option<&str> {
        self.0.get(flag)?.as_deref()
    }
}

/// Checks the DaemonSet; returns a one-line summary.
pub(super) fn check_daemonset(
    root: &Path,
    node: &NodeFlags,
    m: &Manifests,
    problems: &mut Vec<String>,
) -> String {
    let Some((object, ds)) = m.named::<DaemonSet>(AGENT) else {
        problems.push(format!("deploy/: no DaemonSet named {AGENT}"));
        return String::new();
    };
    let mut r = Report {
        at: object.describe(),
        problems,
    };
    if object.meta.namespace.as_deref() != Some(AGENT_NAMESPACE) {
        r.add(format!("metadata.namespace must be {AGENT_NAMESPACE}"));
    }
    let Some(pod) = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()) else {
        r.add("no spec.template.spec");
        return String::new();
    };
    let Some(agent) = pod.containers.iter().find(|c| c.name == AGENT) else {
        r.add(format!("spec.template.spec.containers: none named {AGENT}"));
        return String::new();
    };
    let passed = check_command_line(agent, node, &mut r);
    let ports = check_ports(ds, agent, node, &passed, &mut r);
    check_mounts(pod, agent, &passed, &mut r);
    check_init_container(pod, agent, &passed, &mut r);
    check_capabilities(root, agent, &mut r);
    check_policy(pod, &mut r);
    check_rollout(ds, pod, &passed, &mut r);
    let installer = installer::check_installer(pod, agent, passed.value("--cni-socket"), &mut r);
    format!(
        "DaemonSet consistent with `ambit node` ({} flags, ports {}, {} mounts, capabilities {}); {installer}",
        passed.0.len(),
        ports.join("/"),
        list(&agent.volume_mounts).len(),
        CAPABILITIES
            .iter()
            .map(|(c, _, _)| *c)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The agent's command and args against `ambit node`'s flags: each one known, with a value
/// where it takes one, once, its `$(VAR)`s defined; the required ones there.
fn check_command_line(c: &Container, node: &NodeFlags, r: &mut Report) -> Passed {
    let command = list(&c.command);
    if command != [BINARY_IN_IMAGE] {
        r.add(format!(
            "{C}.command must be [{BINARY_IN_IMAGE}] (where {CONTAINERFILE} installs it), not {command:?}"
        ));
    }
    let args = list(&c.args);
    if args.first().map(String::as_str) != Some("node") {
        r.add(format!(
            "{C}.args must start with `node`, not {:?}",
            args.first()
        ));
    }
    let env = list(&c.env);
    let env_names: BTreeSet<&str> = env.iter().map(|e| e.name.as_str()).collect();
    let mut passed = BTreeMap::new();
    let mut rest = args.iter().skip(1).peekable();
    while let Some(arg) = rest.next() {
        if !arg.starts_with("--") {
            r.add(format!("{C}.args: {arg:?} belongs to no flag"));
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        let Some(flag) = node.flags.get(name) else {
            r.add(format!(
                "{C}.args: passes {name}, which `ambit node` does not have (userspace/settings: NodeArgs)"
            ));
            continue;
        };
        let value = match (flag.takes_value, inline) {
            (true, Some(v)) => Some(v),
            (true, None) => {
                let v = rest.next_if(|v| !v.starts_with("--")).cloned();
                if v.is_none() {
                    r.add(format!("{C}.args: {name} needs a value"));
                }
                v
            }
            (false, inline) => {
                if inline.is_some() {
                    r.add(format!("{C}.args: {name} takes no value"));
                }
                None
            }
        };
        // $(VAR) is expanded by the kubelet only when the container defines VAR.
        let vars = value.iter().flat_map(|v| v.split("$(").skip(1));
        for var in vars.filter_map(|s| Some(s.split_once(')')?.0)) {
            if !env_names.contains(var) {
                r.add(format!(
                    "{C}.args: {name} {}: {C}.env has no {var}",
                    value.as_deref().unwrap_or_default()
                ));
            }
        }
        if passed.insert(name.to_owned(), value).is_some() {
            r.add(format!("{C}.args: passes {name} twice"));
        }
    }
    let passed = Passed(passed);
    for req in &node.required {
        let by_env = node
            .flags
            .get(req)
            .and_then(|f| f.env.as_deref())
            .is_some_and(|e| env_names.contains(e));
        if !passed.0.contains_key(req) && !by_env {
            r.add(format!(
                "{C}.args: `ambit node` requires {req}, which the DaemonSet does not pass"
            ));
        }
    }
    if passed.value("--source") != Some("xds") {
        r.add(format!(
            "{C}.args must pass --source xds (the mesh from istiod, the pods from the API)"
        ));
    }
    for flag in ["--xds-address", "--ca-address"] {
        if passed.value(flag).is_none() {
            r.add(format!("{C}.args must pass {flag} (istiod)"));
        }
    }
    if passed.0.contains_key("--ca-dir") {
        r.add(format!(
            "{C}.args: --ca-dir puts the mesh CA's key on every node, where one compromised node \
             could mint any identity: pass --ca-address (istiod's CA) instead"
        ));
    }
    if passed.value("--node") != Some("$(NODE_NAME)") {
        r.add(format!("{C}.args must pass --node $(NODE_NAME)"));
    }
    let node_name_from = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    if node_name_from != Some("spec.nodeName") {
        r.add(format!(
            "{C}.env: NODE_NAME must come from fieldRef spec.nodeName"
        ));
    }
    passed
}

/// The node's ports at its defaults: metrics and readiness reachable through the pod IP
/// (kubelet, Prometheus), admin on loopback; the probes and the Prometheus annotation on them.
/// Returns the ports.
fn check_ports(
    ds: &DaemonSet,
    c: &Container,
    node: &NodeFlags,
    passed: &Passed,
    r: &mut Report,
) -> Vec<String> {
    // containerPort → name
    let container_ports: BTreeMap<String, &str> = list(&c.ports)
        .iter()
        .map(|p| {
            (
                p.container_port.to_string(),
                p.name.as_deref().unwrap_or(""),
            )
        })
        .collect();
    let resolve = |port: &IntOrString| -> Option<String> {
        let port = int_or_string(port);
        if port.chars().all(|ch| ch.is_ascii_digit()) {
            Some(port)
        } else {
            container_ports
                .iter()
                .find(|(_, name)| **name == port)
                .map(|(n, _)| n.clone())
        }
    };
    let mut ports = Vec::new();
    for (flag, public) in [
        ("--metrics-addr", true),
        ("--readiness-addr", true),
        ("--admin-addr", false),
    ] {
        let Some(default) = node.default_of(flag) else {
            r.add(format!("`ambit node` has no default for {flag}"));
            continue;
        };
        let value = passed.value(flag).unwrap_or(default);
        if value != default {
            r.add(format!(
                "{C}.args: {flag} {value} differs from the node's default {default}"
            ));
        }
        let Some((host, port)) = value.rsplit_once(':') else {
            r.add(format!("{C}.args: {flag} {value} is not host:port"));
            continue;
        };
        let host = host.trim_matches(['[', ']']);
        let loopback = host.starts_with("127.") || host == "::1" || host == "localhost";
        if public && loopback {
            r.add(format!(
                "{C}.args: {flag} {value} is on loopback: kubelet and Prometheus come through the pod IP"
            ));
        }
        if !public && !loopback {
            r.add(format!("{C}.args: {flag} {value} must stay on loopback"));
        }
        if public && !container_ports.contains_key(port) {
            r.add(format!("{C}.ports: no containerPort {port} for {flag}"));
        }
        if flag == "--readiness-addr" {
            let readiness = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref());
            if !readiness.is_some_and(|get| {
                resolve(&get.port).as_deref() == Some(port)
                    && get.path.as_deref() == Some("/healthz/ready")
            }) {
                r.add(format!(
                    "{C}.readinessProbe must be httpGet /healthz/ready on port {port}"
                ));
            }
            let liveness = c.liveness_probe.as_ref().and_then(|p| {
                let port = p.tcp_socket.as_ref().map(|t| &t.port);
                resolve(port.or(p.http_get.as_ref().map(|h| &h.port))?)
            });
            if liveness.as_deref() != Some(port) {
                r.add(format!(
                    "{C}.livenessProbe must check the health port {port}, not {liveness:?}"
                ));
            }
        }
        if flag == "--metrics-addr" {
            let template = ds.spec.as_ref().and_then(|s| s.template.metadata.as_ref());
            let annotations = template.and_then(|t| t.annotations.as_ref());
            if annotations
                .and_then(|a| a.get("prometheus.io/port"))
                .is_some_and(|a| a != port)
            {
                r.add(format!(
                    "spec.template.metadata.annotations: prometheus.io/port is not {port}"
                ));
            }
        }
        ports.push(port.to_owned());
    }
    ports
}

/// Each path flag on the volume it needs, and each mount used by a flag.
fn check_mounts(pod: &PodSpec, c: &Container, passed: &Passed, r: &mut Report) {
    // volume name → its source, as "hostPath:/path" or "secret:name"
    let volumes: BTreeMap<&str, String> = list(&pod.volumes)
        .iter()
        .map(|v| {
            let config_map = v.config_map.as_ref().map(|c| c.name.as_str());
            let token_audience = v.projected.as_ref().and_then(|p| {
                list(&p.sources)
                    .iter()
                    .find_map(|s| s.service_account_token.as_ref()?.audience.clone())
            });
            let source = match (&v.host_path, config_map, token_audience) {
                (Some(host), _, _) => format!("hostPath:{}", host.path),
                (None, Some(name), _) => format!("configMap:{name}"),
                (None, None, Some(audience)) => format!("token:{audience}"),
                _ => "other".to_owned(),
            };
            (v.name.as_str(), source)
        })
        .collect();
    let mounts = list(&c.volume_mounts);
    let under = |path: &str, mount: &str| path == mount || path.starts_with(&format!("{mount}/"));
    let path_values: Vec<(&str, &str)> = passed
        .0
        .iter()
        .filter_map(|(f, v)| Some((f.as_str(), v.as_deref()?)))
        .filter(|(_, v)| v.starts_with('/'))
        .collect();
    for (flag, value) in &path_values {
        if !mounts.iter().any(|m| under(value, &m.mount_path)) {
            r.add(format!(
                "{C}.volumeMounts: {flag} {value} is on no volume: the agent would see its container's own files"
            ));
        }
    }
    for pf in PATH_FLAGS {
        let Some(value) = passed.value(pf.flag) else {
            r.add(format!("{C}.args must pass {} ({})", pf.flag, pf.why));
            continue;
        };
        // A file flag (a certificate, a token) is on the volume mounted at its directory.
        let Some(mount) = mounts
            .iter()
            .filter(|m| under(value, &m.mount_path))
            .max_by_key(|m| m.mount_path.len())
        else {
            continue; // reported above
        };
        let want = match pf.volume {
            Volume::HostPath(path) => format!("hostPath:{}", path.unwrap_or(value)),
            Volume::ConfigMap(name) => format!("configMap:{name}"),
            Volume::Token(audience) => format!("token:{audience}"),
        };
        if volumes.get(mount.name.as_str()) != Some(&want) {
            r.add(format!(
                "spec.template.spec.volumes: {} {value}: volume {} must be {want} ({}), not {:?}",
                pf.flag,
                mount.name,
                pf.why,
                volumes.get(mount.name.as_str())
            ));
        }
        if mount.read_only.unwrap_or(false) != pf.read_only {
            r.add(format!(
                "{C}.volumeMounts: {} {value}: mount must be {}",
                pf.flag,
                if pf.read_only { "readOnly" } else { "writable" }
            ));
        }
        let propagation = mount.mount_propagation.as_deref().unwrap_or("");
        if !pf.propagation.contains(&propagation) {
            r.add(format!(
                "{C}.volumeMounts: {} {value}: mountPropagation must be one of {:?}, not {propagation:?}",
                pf.flag, pf.propagation
            ));
        }
    }
    for m in mounts {
        let used = path_values.iter().any(|(_, v)| under(v, &m.mount_path));
        let excused = MOUNTS_WITHOUT_FLAG
            .iter()
            .any(|(path, _)| *path == m.mount_path);
        if !used && !excused {
            r.add(format!(
                "{C}.volumeMounts: mounts {}, which no flag of `ambit node` uses (pass it to the flag that needs it, remove it, or add it with its reason to MOUNTS_WITHOUT_FLAG in xtask/src/kind/manifests/daemonset.rs)",
                m.mount_path
            ));
        }
    }
}

/// The init container mounts bpffs and cgroup2 on the node, where the flags point.
fn check_init_container(pod: &PodSpec, agent: &Container, passed: &Passed, r: &mut Report) {
    let init = list(&pod.init_containers)
        .iter()
        .find(|c| c.name == INIT_CONTAINER);
    let Some(init) = init else {
        return r.add(format!(
            "spec.template.spec.initContainers: no {INIT_CONTAINER} (it mounts bpffs and cgroup2 on the node)"
        ));
    };
    let at = format!("initContainers[{INIT_CONTAINER}]");
    let script = list(&init.command).join(" ");
    for (flag, fstype) in [("--bpffs", "bpf"), ("--cgroup-root", "cgroup2")] {
        let Some(value) = passed.value(flag) else {
            continue;
        };
        let Some(volume) = list(&agent.volume_mounts)
            .iter()
            .find(|m| m.mount_path == value)
            .map(|m| &m.name)
        else {
            continue;
        };
        let bidirectional = list(&init.volume_mounts).iter().any(|m| {
            m.name == *volume
                && m.mount_path == value
                && m.mount_propagation.as_deref() == Some("Bidirectional")
        });
        if !bidirectional {
            r.add(format!(
                "{at}.volumeMounts must mount volume {volume} at {value} with Bidirectional propagation, so that its {fstype} mount reaches the node"
            ));
        }
        if !script.contains(&format!("mount -t {fstype}")) || !script.contains(value) {
            r.add(format!(
                "{at}.command does not mount {fstype} at {value} ({flag})"
            ));
        }
    }
    if let Some(proc_root) = passed.value("--proc-root") {
        if script.contains("/ns/cgroup") && !script.contains(&format!("{proc_root}/1/ns/cgroup")) {
            r.add(format!(
                "{at}.command must enter the node's cgroup namespace through {proc_root}/1/ns/cgroup"
            ));
        }
    }
    if init.image.as_deref() != Some(IMAGE) {
        r.add(format!(
            "{at}.image: it runs sh, mount and nsenter from {IMAGE}: use that image"
        ));
    }
}

/// Exactly the table's capabilities, each still needed by the code, and nothing privileged.
fn check_capabilities(root: &Path, c: &Container, r: &mut Report) {
    let sc = c.security_context.as_ref();
    if sc.and_then(|s| s.privileged) == Some(true) {
        r.add(format!(
            "{C}.securityContext: the agent container must not be privileged (its capabilities are listed)"
        ));
    }
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    if !caps.is_some_and(|caps| list(&caps.drop).iter().any(|d| d == "ALL")) {
        r.add(format!(
            "{C}.securityContext.capabilities.drop: the agent container must drop ALL capabilities before adding its own"
        ));
    }
    let added: BTreeSet<&str> = caps
        .map(|caps| list(&caps.add))
        .unwrap_or_default()
        .iter()
        .map(|cap| cap.trim_start_matches("CAP_"))
        .collect();
    let wanted: BTreeSet<&str> = CAPABILITIES.iter().map(|(cap, _, _)| *cap).collect();
    let at = format!("{C}.securityContext.capabilities.add");
    for cap in added.difference(&wanted) {
        r.add(format!(
            "{at}: adds {cap}, which Ambit does not need (or add it with its reason to CAPABILITIES in xtask/src/kind/manifests/daemonset.rs)"
        ));
    }
    let source = rust_sources(&root.join("userspace/ambit/src"));
    for (cap, why, needle) in CAPABILITIES {
        if !added.contains(cap) {
            r.add(format!("{at}: does not add {cap}, needed for {why}"));
        }
        if !source.contains(needle) {
            r.add(format!(
                "{cap} is there for {why}, but userspace/ambit/src no longer contains {needle:?}: is it still needed?"
            ));
        }
    }
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

/// The rollout the handover makes possible: the new agent pod beside the old one (surge 1,
/// unavailable 0), the old one waiting for its SIGTERM after handing over, and a grace period
/// longer than the drain.
fn check_rollout(ds: &DaemonSet, pod: &PodSpec, passed: &Passed, r: &mut Report) {
    let rolling = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref()?.rolling_update.as_ref());
    let max_surge = rolling
        .and_then(|u| u.max_surge.as_ref())
        .map(int_or_string);
    let max_unavailable = rolling
        .and_then(|u| u.max_unavailable.as_ref())
        .map(int_or_string);
    if max_surge.as_deref() != Some("1") || max_unavailable.as_deref() != Some("0") {
        r.add("spec.updateStrategy.rollingUpdate must be maxSurge 1, maxUnavailable 0: the new agent takes the node over from the old one (handover), which needs both running");
    }
    if !passed.0.contains_key("--wait-after-handover") {
        r.add("containers[ambit].args: --wait-after-handover is missing: an agent that exits after handing over is restarted by the kubelet and takes the node back");
    }
    let drain = passed
        .value("--drain-timeout")
        .map(|d| d.trim_end_matches('s').parse::<i64>().unwrap_or(i64::MAX))
        .unwrap_or(20);
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    if grace <= drain {
        r.add(format!(
            "spec.template.spec.terminationGracePeriodSeconds ({grace}) must exceed --drain-timeout ({drain} s): the kubelet would kill the draining agent"
        ));
    }
}

/// The policy deploy/daemonset.yaml's comments explain.
fn check_policy(pod: &PodSpec, r: &mut Report) {
    let tolerates_all = list(&pod.tolerations)
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none());
    if !tolerates_all {
        r.add("spec.template.spec.tolerations: must tolerate every taint (operator: Exists, no key, no effect)");
    }
    if pod.priority_class_name.as_deref() != Some("system-node-critical") {
        r.add("spec.template.spec.priorityClassName must be system-node-critical");
    }
    if pod.host_network == Some(true) {
        r.add("spec.template.spec.hostNetwork: the agent needs nothing of the node's netns (and its ports must stay off the node's addresses)");
    }
    for c in super::containers(pod) {
        if c.image.as_deref() != Some(IMAGE)
            || c.image_pull_policy.as_deref() != Some("IfNotPresent")
        {
            r.add(format!(
                "container {}: image {IMAGE} with imagePullPolicy IfNotPresent (kind loads it; there is no registry to pull from)",
                c.name
            ));
        }
    }
    if pod.service_account_name.as_deref() != Some(AGENT) {
        r.add(format!(
            "spec.template.spec.serviceAccountName must be {AGENT} (rbac.yaml binds it)"
        ));
    }
    // No CA key on the nodes: the agent mounts no Secret at all.
    for v in list(&pod.volumes).iter().filter(|v| v.secret.is_some()) {
        r.add(format!(
            "spec.template.spec.volumes: {} is a Secret: the agent needs none (certificates come from istiod's CA)",
            v.name
        ));
    }
}
