//! The modes the benchmark compares: which pods talk, which pods are enrolled, how the nodes run.

use std::{fmt, str::FromStr};

use ambit_lab::pod;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Pod a → pod c, no Ambit: the physical limit on this machine.
    Plain,
    /// Pod a → pod c through a plaintext relay at each of the tunnel's two hops (`bench-relay`,
    /// no TLS, no HTTP/2): what two userspace proxy hops cost by themselves.
    Relay,
    /// The same tunnel as `Ambit`, captured by iptables REDIRECT rules in pod a.
    Iptables,
    /// eBPF capture + HBONE mTLS between the two lab nodes (a on n1 → c on n2).
    Ambit,
    /// `Ambit` with both nodes on `--compliance-policy pqc` (X25519MLKEM768 only): what the
    /// post-quantum key exchange costs, against `Ambit` in the same run.
    AmbitPqc,
    /// `Ambit` with both nodes on `--deliver-from pod`: the previous delivery (the app sees
    /// the pod's own address), against `Ambit`'s delivery from the client's address.
    AmbitPodSource,
    /// eBPF capture + HBONE between two pods of one node (a → b, both on n1).
    AmbitSameNode,
    /// Istio's ztunnel instead of Ambit: one in dedicated mode in each of pods a and c, its
    /// own iptables capture in pod a, HBONE between them. Measured when its binary is found.
    Ztunnel,
    /// `Ambit` with both nodes on `--fast-path on`: the loopback hops (app → tunnel on n1,
    /// tunnel → app on n2) carried by sk_msg instead of loopback TCP.
    AmbitSockmap,
}

impl Mode {
    /// Every mode, in the order one repetition runs them.
    pub const ALL: [Mode; 9] = [
        Mode::Plain,
        Mode::Relay,
        Mode::Iptables,
        Mode::Ambit,
        Mode::AmbitPqc,
        Mode::AmbitPodSource,
        Mode::AmbitSameNode,
        Mode::Ztunnel,
        Mode::AmbitSockmap,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Relay => "relay",
            Mode::Iptables => "iptables",
            Mode::Ambit => "ambit",
            Mode::AmbitPqc => "ambit-pqc",
            Mode::AmbitPodSource => "ambit-pod-source",
            Mode::AmbitSameNode => "ambit-same-node",
            Mode::Ztunnel => "ztunnel",
            Mode::AmbitSockmap => "ambit+sockmap",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Mode::Plain => "pod a → pod c (two lab nodes), no Ambit",
            Mode::Relay => {
                "pod a → pod c through a plaintext relay in each pod (no TLS, no HTTP/2): \
                 two proxy hops alone"
            }
            Mode::Iptables => {
                "pod a → pod c, Ambit's HBONE tunnel, captured by iptables REDIRECT in pod a"
            }
            Mode::Ambit => "pod a → pod c, eBPF capture + HBONE mTLS between the two lab nodes",
            Mode::AmbitPqc => {
                "ambit with both nodes on --compliance-policy pqc (X25519MLKEM768 key exchange only)"
            }
            Mode::AmbitPodSource => {
                "ambit with both nodes on --deliver-from pod (apps see the pod's own address, \
                 the delivery before client addresses)"
            }
            Mode::AmbitSameNode => "pod a → pod b (both on n1), eBPF capture + HBONE mTLS",
            Mode::Ztunnel => {
                "pod a → pod c, Istio's ztunnel in dedicated mode in each pod (its iptables \
                 capture in pod a), HBONE mTLS between them"
            }
            Mode::AmbitSockmap => {
                "ambit with both nodes on --fast-path on (the loopback hops by sockhash + sk_msg)"
            }
        }
    }

    /// The pod the clients run in.
    pub fn client(self) -> &'static str {
        "a"
    }

    /// The pod the servers (echo server, iperf3 -s) run in.
    pub fn server(self) -> &'static str {
        match self {
            Mode::AmbitSameNode => "b",
            _ => "c",
        }
    }

    /// Where the clients connect: the server pod's address, or in the relay mode the relay
    /// in the client pod, on loopback (as an app's captured connection reaches Ambit's tunnel).
    pub fn destination(self) -> &'static str {
        match self {
            Mode::Relay => "127.0.0.1",
            _ => pod(self.server()).ip,
        }
    }

    /// The pods this mode enrolls in Ambit (none: no `ambit node` runs).
    pub fn enrolled(self) -> Vec<&'static str> {
        match self {
            Mode::Plain | Mode::Relay | Mode::Ztunnel => Vec::new(),
            _ => vec![self.client(), self.server()],
        }
    }

    /// The lab nodes that need an `ambit node`: those of the enrolled pods.
    pub fn nodes(self) -> Vec<&'static str> {
        let mut nodes: Vec<&str> = self.enrolled().iter().map(|p| pod(p).node).collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes
    }

    /// Tokio worker threads per `ambit node` of this mode
    /// (`ambit_lab::worker_threads_per_node`). Measured: one worker per node for the two-node
    /// modes cut the p50 latency by 16 % and raised connections/s by 13 %; for
    /// ambit-same-node one worker cost a third of the throughput, hence per mode.
    /// The relay mode's two relays and the ztunnel mode's two ztunnels
    /// (`ZTUNNEL_WORKER_THREADS`) share the cores the same way as two nodes.
    pub fn worker_threads(self, cores: usize) -> usize {
        let proxies = match self {
            Mode::Relay | Mode::Ztunnel => 2,
            _ => self.nodes().len(),
        };
        ambit_lab::worker_threads_per_node(cores, proxies)
    }

    /// `ambit node` flags this mode needs.
    pub fn node_flags(self) -> &'static [&'static str] {
        match self {
            Mode::Iptables => &["--capture", "iptables"],
            Mode::AmbitPqc => &["--compliance-policy", "pqc"],
            Mode::AmbitPodSource => &["--deliver-from", "pod"],
            Mode::AmbitSockmap => &["--fast-path", "on"],
            _ => &[],
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<_> = Mode::ALL.iter().map(|m| m.name()).collect();
                format!("unknown mode {s:?}; modes: {}", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for mode in Mode::ALL {
            assert_eq!(mode.name().parse::<Mode>(), Ok(mode));
        }
        assert!("sockmap".parse::<Mode>().is_err());
    }

    #[test]
    fn pods_and_nodes() {
        assert!(Mode::Plain.nodes().is_empty());
        assert_eq!(Mode::Ambit.enrolled(), ["a", "c"]);
        assert_eq!(Mode::Ambit.nodes(), ["n1", "n2"]);
        assert_eq!(Mode::Iptables.nodes(), ["n1", "n2"]);
        assert_eq!(Mode::AmbitSameNode.enrolled(), ["a", "b"]);
        assert_eq!(Mode::AmbitSameNode.nodes(), ["n1"]);
        assert_eq!(Mode::AmbitSockmap.nodes(), ["n1", "n2"]);
        assert_eq!(Mode::AmbitSockmap.node_flags(), ["--fast-path", "on"]);
        assert_eq!(Mode::Iptables.node_flags(), ["--capture", "iptables"]);
        assert_eq!(Mode::AmbitPqc.nodes(), ["n1", "n2"]);
        assert_eq!(Mode::AmbitPqc.node_flags(), ["--compliance-policy", "pqc"]);
        assert_eq!(Mode::AmbitPodSource.node_flags(), ["--deliver-from", "pod"]);
        assert_eq!(Mode::AmbitPodSource.nodes(), ["n1", "n2"]);
        // The ztunnel mode runs no `ambit node`: its ztunnels are in the pods themselves.
        assert!(Mode::Ztunnel.nodes().is_empty());
        assert_eq!(Mode::Ztunnel.destination(), pod("c").ip);
        // The relay mode runs no node: nothing is captured, the clients go to the relay.
        assert!(Mode::Relay.nodes().is_empty());
        assert_eq!(Mode::Relay.destination(), "127.0.0.1");
        assert_eq!(Mode::Ambit.destination(), pod("c").ip);
        assert_eq!(Mode::AmbitSameNode.destination(), pod("b").ip);
    }

    #[test]
    fn the_nodes_of_a_mode_share_the_cores() {
        assert_eq!(Mode::Ambit.worker_threads(2), 1);
        assert_eq!(Mode::Iptables.worker_threads(8), 4);
        assert_eq!(Mode::AmbitSameNode.worker_threads(2), 2);
        assert_eq!(Mode::Ambit.worker_threads(1), 1);
        assert_eq!(Mode::Relay.worker_threads(2), 1);
        assert_eq!(Mode::Ztunnel.worker_threads(2), 1);
        assert_eq!(Mode::Ztunnel.worker_threads(8), 4);
        assert_eq!(Mode::AmbitPqc.worker_threads(2), 1);
    }
}
