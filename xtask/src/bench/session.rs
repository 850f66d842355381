//! A mode's Ambit, for one measurement: its `ambit node` processes (one per lab node with an
//! enrolled pod), its config, and for the iptables mode the REDIRECT rules in the client pod;
//! for the relay mode, its two `bench-relay` processes instead. Stopping it removes all of that
//! and checks, in the client node's log, that the measured traffic really was captured.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use ambit_lab::{pod, Lab};
use anyhow::{bail, Context as _, Result};

use super::{mode::Mode, Env};

/// What the node's access log says of every outbound connection it captured, at its end (the
/// nodes run with a node's default log, `info`).
const CAPTURED: &str = "direction=\"outbound\"";

/// In the relay mode, the server pod's relay listens on each measured port plus this.
const RELAY_PORT_OFFSET: u16 = 10_000;

pub struct Session {
    mode: Mode,
    /// (lab node, pid of the mode's proxy there: its `ambit node`, or its relay).
    nodes: Vec<(&'static str, u32)>,
    /// The log of the client pod's node, where capture shows.
    client_log: Option<PathBuf>,
}

impl Session {
    /// Starts the mode's nodes (none for plain) with a config enrolling the mode's pods; `tag`
    /// names the config and logs in the output directory. `ports` are the server ports the
    /// measurement uses (the relay mode relays those).
    pub fn start(
        lab: &mut Lab,
        env: &Env,
        mode: Mode,
        tag: &str,
        ports: &[u16],
    ) -> Result<Session> {
        let mut session = Session {
            mode,
            nodes: Vec::new(),
            client_log: None,
        };
        if mode == Mode::Relay {
            // The server side first: the client side's targets must be there.
            for pod_name in [mode.server(), mode.client()] {
                let pid = start_relay(lab, env, mode, pod_name, ports, tag)?;
                session.nodes.push((pod(pod_name).node, pid));
            }
            return Ok(session);
        }
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
            require_program(pid, "ambit", &format!("node {node}"))?;
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
        if self.mode == Mode::Relay {
            for pod_name in [self.mode.client(), self.mode.server()] {
                lab.stop(&relay_name(pod_name))?;
            }
            return Ok(());
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

fn relay_name(pod_name: &str) -> String {
    format!("bench-relay in pod {pod_name}")
}

/// What the relay in `pod_name` relays, as `bench-relay` pairs (`LISTEN=TARGET`): the client
/// pod's takes each port on 127.0.0.1 (where Ambit's outbound listener would be) to the server
/// pod's address at port + `RELAY_PORT_OFFSET`; the server pod's takes that to the server on
/// 127.0.0.1 (as Ambit delivers inside the pod).
fn relay_pairs(mode: Mode, pod_name: &str, ports: &[u16]) -> Result<Vec<String>> {
    let server_ip = pod(mode.server()).ip;
    ports
        .iter()
        .map(|&port| {
            let hop = port
                .checked_add(RELAY_PORT_OFFSET)
                .with_context(|| format!("port {port} + {RELAY_PORT_OFFSET} is out of range"))?;
            Ok(if pod_name == mode.client() {
                format!("127.0.0.1:{port}={server_ip}:{hop}")
            } else {
                format!("{server_ip}:{hop}=127.0.0.1:{port}")
            })
        })
        .collect()
}

/// Starts the relay in `pod_name` and waits until it listens; returns its pid.
fn start_relay(
    lab: &mut Lab,
    env: &Env,
    mode: Mode,
    pod_name: &str,
    ports: &[u16],
    tag: &str,
) -> Result<u32> {
    let log = env.dir.join(format!("{tag}-relay-{pod_name}.log"));
    let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = lab.pod_command(pod_name, env.relay.to_str().context("relay path")?);
    cmd.arg(mode.worker_threads(env.cores).to_string())
        .args(relay_pairs(mode, pod_name, ports)?)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let name = relay_name(pod_name);
    let pid = lab.spawn(&name, cmd)?;
    let listening =
        || fs::read_to_string(&log).is_ok_and(|text| text.lines().any(|l| l.trim() == "listening"));
    ambit_lab::wait_until(
        Duration::from_secs(10),
        &format!("{name} listening"),
        listening,
    )
    .with_context(|| fs::read_to_string(&log).unwrap_or_default())?;
    // `ip netns exec` execs the relay: this pid is the relay itself.
    require_program(pid, "bench-relay", &name)?;
    Ok(pid)
}

/// The CPU and RSS read for `what` are those of `pid`: check it is really `program`.
fn require_program(pid: u32, program: &str, what: &str) -> Result<()> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != program {
        bail!("pid {pid} of {what} is {comm:?}, not {program}: CPU and RSS would be wrong");
    }
    Ok(())
}

/// The iptables mode's capture, in the client pod's netns only: connections to the server
/// pod go to the tunnel's outbound listener, except the tunnel's own (marked) sockets.
fn redirect(lab: &Lab, mode: Mode) -> Result<()> {
    lab.redirect_to_tunnel(mode.client(), &format!("{}/32", pod(mode.server()).ip))
}

fn flush_redirect(lab: &Lab, mode: Mode) -> Result<()> {
    lab.remove_redirect(mode.client())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relays_chain_the_two_hops_of_the_tunnel() {
        let c = pod("c").ip;
        assert_eq!(
            relay_pairs(Mode::Relay, "a", &[5201, 7000]).unwrap(),
            [
                format!("127.0.0.1:5201={c}:15201"),
                format!("127.0.0.1:7000={c}:17000")
            ]
        );
        assert_eq!(
            relay_pairs(Mode::Relay, "c", &[5201]).unwrap(),
            [format!("{c}:15201=127.0.0.1:5201")]
        );
        assert!(relay_pairs(Mode::Relay, "a", &[60_000]).is_err());
    }
}
