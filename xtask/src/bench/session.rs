//! A mode's Ambit, for one measurement: its `ambit node` processes (one per lab node with an
//! enrolled pod), its config, and for the iptables mode the REDIRECT rules in the client pod;
//! for the relay mode, its two `bench-relay` processes instead; for the ztunnel mode, a ztunnel
//! in each of the two pods (with its own capture rule). Stopping it removes all of that and
//! checks, in the client side's log, that the measured traffic really was captured.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use ambit_lab::{pod, Lab, ZtunnelPod, ZtunnelSource};
use anyhow::{bail, Context as _, Result};

use super::{mode::Mode, Env};

/// What the node's access log says of every outbound connection it captured, at its end (the
/// nodes run with a node's default log, `info`; ztunnel's access log has the same field).
const CAPTURED: &str = "direction=\"outbound\"";

/// What the client's node logs of each HBONE connection (TLS handshake) it opens, with the
/// key exchange group (`kx`).
const HBONE_OPENED: &str = "HBONE connection established";

/// The one key exchange group of `--compliance-policy pqc`.
const PQC_GROUP: &str = "X25519MLKEM768";

/// In the relay mode, the server pod's relay listens on each measured port plus this.
const RELAY_PORT_OFFSET: u16 = 10_000;

pub struct Session {
    mode: Mode,
    /// (lab node, pid of the mode's proxy there: its `ambit node`, its relay, or its ztunnel).
    nodes: Vec<(&'static str, u32)>,
    /// The log of the client pod's node (or of its ztunnel), where capture shows.
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
        if mode == Mode::Ztunnel {
            start_ztunnels(lab, env, &mut session, tag)?;
            return Ok(session);
        }
        if mode.nodes().is_empty() {
            return Ok(session);
        }
        let config = env.dir.join(format!("{tag}.yaml"));
        fs::write(&config, lab.config_yaml_workloads(&mode.enrolled()))?;
        let ca = env.ca.to_str().context("CA path")?;
        // Each mode starts from untouched pods: a node that keeps its capture when it stops
        // (fail closed) also keeps the pod's delivery rule and the marks on its listeners, and
        // the next mode's plaintext replies would follow them back to loopback.
        let mut args = vec!["--ca-dir", ca, "--detach-on-exit"];
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

    /// The pids of the mode's proxies: `ambit node` processes, relays or ztunnels (empty for
    /// plain).
    pub fn node_pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|&(_, pid)| pid).collect()
    }

    /// The pid of the client side's proxy: the `ambit node` of the client pod's node, or the
    /// client pod's relay or ztunnel.
    pub fn client_node_pid(&self) -> Option<u32> {
        let node = pod(self.mode.client()).node;
        self.nodes.iter().find(|(n, _)| *n == node).map(|&(_, p)| p)
    }

    /// Removes the REDIRECT rules, stops the nodes, removes their pins (capture stays attached
    /// after a node exits: fail closed), or stops the ztunnels and removes their capture rules,
    /// and checks that the traffic was captured.
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
        if self.mode == Mode::Ztunnel {
            for pod_name in [self.mode.client(), self.mode.server()] {
                lab.stop_ztunnel(pod_name)?;
            }
        } else {
            self.stop_nodes(lab, env)?;
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
            if self.mode != Mode::Ztunnel {
                self.check_handshakes(&text, log)?;
            }
        }
        Ok(())
    }

    /// Says how many HBONE connections (TLS handshakes) the client's node opened, with which
    /// key exchange (new connections share a pooled one: few handshakes per measurement), and
    /// that the pqc mode's were all post-quantum.
    fn check_handshakes(&self, log_text: &str, log: &std::path::Path) -> Result<()> {
        let groups = key_exchanges(log_text);
        let mut distinct = groups.clone();
        distinct.sort_unstable();
        distinct.dedup();
        println!(
            "   {} HBONE connection(s) opened by the client's node, key exchange {}",
            groups.len(),
            distinct.join(", ")
        );
        if self.mode == Mode::AmbitPqc && (groups.is_empty() || distinct != [PQC_GROUP]) {
            bail!(
                "mode {}: HBONE connections with key exchange {distinct:?}, not only {PQC_GROUP} \
                 (see {})",
                self.mode,
                log.display()
            );
        }
        Ok(())
    }

    /// Stops the `ambit node` processes and removes their pins.
    fn stop_nodes(&self, lab: &mut Lab, env: &Env) -> Result<()> {
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
        Ok(())
    }
}

/// The ztunnel mode: ztunnel in dedicated mode in the server pod, then in the client pod (each
/// with its capture rule), with the mode's worker threads; both take ztunnel's test CA
/// (`FAKE_CA`), so they trust each other.
fn start_ztunnels(lab: &mut Lab, env: &Env, session: &mut Session, tag: &str) -> Result<()> {
    let mode = session.mode;
    let ztunnel = env
        .ztunnel
        .as_ref()
        .context("the ztunnel mode without a ztunnel binary")?;
    let pods = [mode.server(), mode.client()];
    let config = env.dir.join(format!("{tag}.yaml"));
    fs::write(&config, ztunnel_config(&lab.config_yaml_workloads(&pods)))?;
    for pod_name in pods {
        let log = env.dir.join(format!("{tag}-{pod_name}.log"));
        let spec = ZtunnelPod {
            pod: pod_name,
            namespace: "default",
            // `config_yaml_workloads`: service account = pod name.
            service_account: pod_name,
            source: ZtunnelSource::LocalConfig(&config),
            log: &log,
            worker_threads: mode.worker_threads(env.cores),
            compliance_policy: "",
        };
        lab.start_ztunnel(ztunnel, &spec)
            .with_context(|| format!("starting ztunnel in pod {pod_name}"))?;
        // The lab's name for it (`Lab::start_ztunnel`); `ip netns exec` execs ztunnel.
        let name = format!("ztunnel in {pod_name}");
        let pid = lab.pid(&name).context("ztunnel's pid")?;
        require_program(pid, "ztunnel", &name)?;
        session.nodes.push((pod(pod_name).node, pid));
        if pod_name == mode.client() {
            session.client_log = Some(log);
        }
    }
    Ok(())
}

/// A lab config (`Lab::config_yaml_workloads`) as ztunnel takes it: without Ambit's section
/// (ztunnel refuses unknown fields), and each workload with the `services` ztunnel requires and
/// an explicit trust domain (without one, its test CA issues `spiffe:///ns/...`, which no
/// verifier accepts).
fn ztunnel_config(lab_config: &str) -> String {
    let mut out = String::new();
    for line in ambit_lab::without_ambit_section(lab_config).lines() {
        out.push_str(line);
        out.push('\n');
        // Each workload's last field in the lab's config.
        if line.starts_with("  node: ") {
            out.push_str("  trustDomain: cluster.local\n  services: {}\n");
        }
    }
    out
}

/// The key exchange group of every HBONE connection a node's log says it opened.
fn key_exchanges(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(HBONE_OPENED))
        .map(|l| {
            l.split_whitespace()
                .find_map(|field| field.strip_prefix("kx="))
                .unwrap_or("?")
                .trim_matches('"')
                .to_owned()
        })
        .collect()
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

    #[test]
    fn key_exchanges_are_read_from_the_log() {
        let log = "x INFO ambit::hbone::client: HBONE connection established conn=0 src=a \
                   dst=10.0.0.3:15008 kx=X25519MLKEM768\n\
                   x INFO ambit::hbone::client: HBONE connection established conn=1 kx=\"X25519\"\n\
                   x INFO ambit::proxy: connection complete direction=\"outbound\"\n";
        assert_eq!(key_exchanges(log), ["X25519MLKEM768", "X25519"]);
    }

    #[test]
    fn ztunnel_gets_services_a_trust_domain_and_no_ambit_section() {
        let lab = "# comment\nworkloads:\n- uid: lab//v1/Pod/default/a\n  name: a\n  \
                   node: x-n1\n- uid: lab//v1/Pod/default/c\n  name: c\n  node: x-n2\n\
                   services: []\npolicies: []\nambit:\n  pods:\n  - workload: default/a\n";
        let config = ztunnel_config(lab);
        assert!(!config.contains("ambit:"), "{config}");
        assert_eq!(config.matches("  services: {}\n").count(), 2, "{config}");
        assert_eq!(
            config.matches("  trustDomain: cluster.local\n").count(),
            2,
            "{config}"
        );
        assert!(config.ends_with("services: []\npolicies: []\n"), "{config}");
    }
}
