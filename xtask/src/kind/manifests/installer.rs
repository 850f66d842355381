//! The DaemonSet's `install-cni` container against `ambit cni install`'s settings and the
//! agent: it runs `cni install` with flags the command accepts, writes into the runtime's CNI
//! directories on the host, and points the plugin at the socket the agent serves, through a
//! host directory both containers mount.

use std::collections::BTreeSet;

use ambit_settings::{CniInstallArgs, OnExit, DEFAULT_CNI_BIN_DIR, DEFAULT_CNI_CONF_DIR};
use clap::{FromArgMatches as _, ValueEnum as _};
use k8s_openapi::api::core::v1::{Container, PodSpec, VolumeMount};

use super::{list, Report, BINARY_IN_IMAGE};
use crate::kind::AGENT_NAMESPACE;

/// The container that chains the plugin.
pub(super) const INSTALLER: &str = "install-cni";

/// How the messages name the two containers.
const I: &str = "containers[install-cni]";
const A: &str = "containers[ambit]";

/// `path` under the mount at `mount` (or it).
fn under(path: &str, mount: &str) -> bool {
    path == mount || path.starts_with(&format!("{}/", mount.trim_end_matches('/')))
}

/// `/var/run` is `/run` on the hosts Kubernetes runs on: one spelling to compare.
fn canonical(path: &str) -> String {
    match path.strip_prefix("/var/run/") {
        Some(rest) => format!("/run/{rest}"),
        None if path == "/var/run" => "/run".to_owned(),
        None => path.to_owned(),
    }
}

/// The mount `path` (in container `c`) is on, and the host path it is when that mount is a
/// hostPath volume.
fn on_host<'a>(
    pod: &PodSpec,
    c: &'a Container,
    path: &str,
) -> Option<(&'a VolumeMount, Option<String>)> {
    let mount = list(&c.volume_mounts)
        .iter()
        .filter(|m| under(path, &m.mount_path))
        .max_by_key(|m| m.mount_path.len())?;
    let host = list(&pod.volumes)
        .iter()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.host_path.as_ref())
        .map(|h| {
            let rest = &path[mount.mount_path.trim_end_matches('/').len()..];
            canonical(&format!("{}{rest}", h.path.trim_end_matches('/')))
        });
    Some((mount, host))
}

/// Checks the installer (with the agent's `--cni-socket`, None when it passes none); returns
/// a summary.
pub(super) fn check_installer(
    pod: &PodSpec,
    agent: &Container,
    agent_socket: Option<&str>,
    r: &mut Report,
) -> String {
    if list(&pod.init_containers)
        .iter()
        .any(|c| c.name == INSTALLER)
    {
        r.add(format!(
            "initContainers[{INSTALLER}] must be one of the containers: it keeps the plugin in the chain while the primary CNI rewrites its config"
        ));
        return String::new();
    }
    let Some(c) = pod.containers.iter().find(|c| c.name == INSTALLER) else {
        r.add(format!(
            "spec.template.spec.containers: no {INSTALLER} (it chains ambit-cni into the node's CNI config, so that pods start captured)"
        ));
        return String::new();
    };
    let command = list(&c.command);
    if command != [BINARY_IN_IMAGE] {
        r.add(format!(
            "{I}.command must be [{BINARY_IN_IMAGE}], not {command:?}"
        ));
    }
    let args = list(&c.args);
    if args.len() < 2 || args[..2] != ["cni", "install"] {
        r.add(format!(
            "{I}.args must start with `cni install`, not {:?}",
            &args[..args.len().min(2)]
        ));
        return String::new();
    }
    let matches = CniInstallArgs::command().try_get_matches_from(
        ["ambit cni install"]
            .into_iter()
            .chain(args[2..].iter().map(String::as_str)),
    );
    let settings = match matches.and_then(|m| CniInstallArgs::from_arg_matches(&m)) {
        Ok(settings) => settings,
        Err(e) => {
            let e = e.to_string();
            let first = e
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ");
            r.add(format!(
                "{I}.args: `ambit cni install` refuses them: {first}"
            ));
            return String::new();
        }
    };
    // $(VAR) is expanded by the kubelet only when the container defines VAR.
    let env = list(&c.env);
    let env_names: BTreeSet<&str> = env.iter().map(|e| e.name.as_str()).collect();
    for arg in &args[2..] {
        for var in arg
            .split("$(")
            .skip(1)
            .filter_map(|s| Some(s.split_once(')')?.0))
        {
            if !env_names.contains(var) {
                r.add(format!("{I}.args: {arg}: {I}.env has no {var}"));
            }
        }
    }
    if let Some(on_exit) = env.iter().find(|e| e.name == "AMBIT_CNI_ON_EXIT") {
        let value = on_exit.value.as_deref().unwrap_or_default();
        if OnExit::from_str(value, false).is_err() {
            r.add(format!(
                "{I}.env: AMBIT_CNI_ON_EXIT {value:?} is neither keep nor remove"
            ));
        }
    }

    // The runtime's directories, written: the flags' values on hostPath volumes of them.
    let mut used = Vec::new();
    for (flag, value, host_dir) in [
        (
            "--cni-conf-dir",
            &settings.cni_conf_dir,
            DEFAULT_CNI_CONF_DIR,
        ),
        ("--cni-bin-dir", &settings.cni_bin_dir, DEFAULT_CNI_BIN_DIR),
    ] {
        let value = value.display().to_string();
        match on_host(pod, c, &value) {
            None | Some((_, None)) => r.add(format!(
                "{I}.volumeMounts: {flag} {value} is on no hostPath volume: the installer would write into its own container"
            )),
            Some((mount, Some(host))) => {
                if host != canonical(host_dir) {
                    r.add(format!(
                        "{I}: {flag} {value} is the host's {host}, not the runtime's {host_dir}"
                    ));
                }
                if mount.read_only == Some(true) {
                    r.add(format!("{I}.volumeMounts: {flag} {value}: mount must be writable"));
                }
                used.push(mount.mount_path.clone());
            }
        }
    }

    // The socket: the plugin, on the host, asks --agent-socket; the agent serves --cni-socket.
    let socket = settings.agent_socket.display().to_string();
    let Some(agent_socket) = agent_socket else {
        r.add(format!(
            "{A}.args must pass --cni-socket: the plugin install-cni chains asks the agent there, and fails every pod while nobody answers"
        ));
        return String::new();
    };
    let agent_side = on_host(pod, agent, agent_socket);
    match &agent_side {
        None | Some((_, None)) => r.add(format!(
            "{A}.volumeMounts: --cni-socket {agent_socket} is on no hostPath volume: the plugin, on the host, could not reach it"
        )),
        Some((mount, Some(host))) => {
            if mount.read_only == Some(true) {
                r.add(format!(
                    "{A}.volumeMounts: --cni-socket {agent_socket}: mount must be writable (the agent creates the socket)"
                ));
            }
            if *host != canonical(&socket) {
                r.add(format!(
                    "{I}.args: the plugin would ask --agent-socket {socket}, but the agent serves --cni-socket {agent_socket} at the host's {host}"
                ));
            }
        }
    }
    // The same host directory in the installer, at the same path, so that --agent-socket
    // names one file in both views (the installer reports whether an agent serves it).
    let installer_side = on_host(pod, c, &socket);
    let same_volume = match (&agent_side, &installer_side) {
        (Some((a, _)), Some((i, Some(host)))) => a.name == i.name && *host == canonical(&socket),
        _ => false,
    };
    if !same_volume {
        let volume = agent_side
            .as_ref()
            .map(|(m, _)| m.name.as_str())
            .unwrap_or("?");
        r.add(format!(
            "{I}.volumeMounts: --agent-socket {socket} must be on the agent's socket volume {volume}, mounted at its host path (one file in both views)"
        ));
    }
    if let Some((mount, _)) = installer_side {
        used.push(mount.mount_path.clone());
    }
    for m in list(&c.volume_mounts) {
        if !used.contains(&m.mount_path) {
            r.add(format!(
                "{I}.volumeMounts: mounts {}, which no flag of `ambit cni install` uses",
                m.mount_path
            ));
        }
    }

    // The agent's own pods start without it: the namespace, or $(VAR) of the pod's namespace.
    let own_namespace = |ns: &str| {
        ns == AGENT_NAMESPACE
            || ns
                .strip_prefix("$(")
                .and_then(|v| v.strip_suffix(')'))
                .is_some_and(|var| {
                    env.iter().any(|e| {
                        e.name == var
                            && e.value_from
                                .as_ref()
                                .and_then(|f| f.field_ref.as_ref())
                                .is_some_and(|f| f.field_path == "metadata.namespace")
                    })
                })
    };
    if !settings
        .exclude_namespaces
        .iter()
        .any(|ns| own_namespace(ns))
    {
        r.add(format!(
            "{I}.args: --exclude-namespaces must include the DaemonSet's own namespace ({AGENT_NAMESPACE}): a new agent pod would otherwise wait for the agent it replaces"
        ));
    }

    // Nothing but root's ownership of the two directories.
    let sc = c.security_context.as_ref();
    if sc.and_then(|s| s.privileged) == Some(true) {
        r.add(format!(
            "{I}.securityContext: must not be privileged: it only writes two directories root owns"
        ));
    }
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    if !caps.is_some_and(|caps| list(&caps.drop).iter().any(|d| d == "ALL")) {
        r.add(format!(
            "{I}.securityContext.capabilities.drop must be [ALL]"
        ));
    }
    if let Some(added) = caps.map(|caps| list(&caps.add)).filter(|a| !a.is_empty()) {
        r.add(format!(
            "{I}.securityContext.capabilities.add: {added:?}: the installer needs none (it writes as the directories' owner)"
        ));
    }
    if sc.and_then(|s| s.allow_privilege_escalation) != Some(false) {
        r.add(format!(
            "{I}.securityContext.allowPrivilegeEscalation must be false"
        ));
    }
    format!("install-cni chains ambit-cni → {socket}")
}
