//! A mode's Ambit, for one measurement: its `ambit node` processes (one per lab node with an
//! enrolled pod), its config, and for the iptables mode the REDIRECT rules in the client pod.
//! Stopping it removes all of that and checks, in the client node's log, that the measured
//! traffic really was captured.

use std::{fs, path::PathBuf, process::Command};

use ambit_lab::{pod, Lab};
use anyhow::{bail, Context as _, Result};

use super::{mode::Mode, Env};

/// What the node logs for every outbound connection it captured.
const CAPTURED: &str = "captured outbound connection";

pub struct Session {
    mode: Mode,
    /// (lab node, pid of its `ambit node`).
    nodes: Vec<(&'static str, u32)>,
    /// The log of the client pod's node, where capture shows.
    client_log: Option<PathBuf>,
}

impl Session {
    /// Starts the mode's nodes (none for plain) with a config enrolling the mode's pods; `tag`
    /// names the config and logs in the output directory.
    pub fn start(lab: &mut Lab, env: &Env, mode: Mode, tag: &str) -> Result<Session> {
        let mut session = Session {
            mode,
            nodes: Vec::new(),
            client_log: None,
        };
        if mode.nodes().is_empty() {
            return Ok(session);
        }
        let config = env.dir.join(format!("{tag}.yaml"));
        fs::write(&config, lab.config_yaml_workloads(&mode.enrolled()))?;
        let ca = env.ca.to_str().context("CA path")?;
        let mut args = vec!["--ca-dir", ca];
        args.extend(mode.node_flags());
        let workers = mode.worker_threads(env.cores).to_string();
        if !env.node_args.iter().any(|a| a == "--worker-threads") {
            args.extend(["--worker-threads", &workers]);
        }
        args.extend(env.node_args.iter().map(String::as_str));
        for node in mode.nodes() {
            let log = env.dir.join(format!("{tag}-{node}.log"));
            lab.start_node(&env.ambit, node, &config, &log, &args)
                .with_context(|| format!("starting ambit node {node} for mode {mode}"))?;
            let pid = lab.node_pid(node).context("the node's pid")?;
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != "ambit" {
                bail!(
                    "pid {pid} of node {node} is {comm:?}, not ambit: CPU and RSS would be wrong"
                );
            }
            session.nodes.push((node, pid));
            if node == pod(mode.client()).node {
                session.client_log = Some(log);
            }
        }
        if mode == Mode::Iptables {
            redirect(lab, mode)?;
        }
        Ok(session)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The pids of the mode's `ambit node` processes (empty for plain).
    pub fn node_pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|&(_, pid)| pid).collect()
    }

    /// The pid of the `ambit node` of the client pod's node.
    pub fn client_node_pid(&self) -> Option<u32> {
        let node = pod(self.mode.client()).node;
        self.nodes.iter().find(|(n, _)| *n == node).map(|&(_, p)| p)
    }

    /// Removes the REDIRECT rules, stops the nodes, removes their pins (capture stays attached
    /// after a node exits: fail closed), and checks that the traffic was captured.
    pub fn stop(self, lab: &mut Lab, env: &Env) -> Result<()> {
        if self.mode == Mode::Iptables {
            flush_redirect(lab, self.mode)?;
        }
        for (node, _) in &self.nodes {
            lab.stop(&format!("ambit node {node}"))?;
            let out = Command::new(&env.ambit)
                .args(["reset", "--node", &lab.node_name(node)])
                .output()
                .context("running ambit reset")?;
            if !out.status.success() {
                bail!(
                    "ambit reset --node {}: {}",
                    lab.node_name(node),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        if let Some(log) = &self.client_log {
            let text =
                fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
            if !text.contains(CAPTURED) {
                bail!(
                    "mode {} was not captured: no \"{CAPTURED}\" in {}",
                    self.mode,
                    log.display()
                );
            }
        }
        Ok(())
    }
}

/// The iptables mode's capture, in the client pod's netns only: connections to the server
/// pod go to the tunnel's outbound listener, except the tunnel's own (marked) sockets.
fn redirect(lab: &Lab, mode: Mode) -> Result<()> {
    lab.redirect_to_tunnel(mode.client(), &format!("{}/32", pod(mode.server()).ip))
}

fn flush_redirect(lab: &Lab, mode: Mode) -> Result<()> {
    lab.remove_redirect(mode.client())
}
