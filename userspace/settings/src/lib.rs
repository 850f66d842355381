//! The command-line settings of `ambit node` and `ambit cni install`, in a crate of their own:
//! the binary parses them, and tools that check a deployment against them (xtask's DaemonSet
//! check) read the same definitions through [`NodeArgs::command`] and
//! [`CniInstallArgs::command`] without building the data path.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::CommandFactory as _;

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Where bpffs is mounted on a node.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// A ztunnel-format local config file, watched.
    File,
    /// The Kubernetes API (in-cluster config or KUBECONFIG).
    Kubernetes,
    /// istiod's delta xDS (`--xds-address`) for workloads, services and policies; this
    /// node's pods from the Kubernetes API (as `kubernetes`), or from `--config` when given (a
    /// file with only the `ambit.pods` section).
    Xds,
}

#[derive(clap::Args)]
pub struct NodeArgs {
    /// This node's name: workloads whose `node` matches are local.
    #[arg(long, env = "AMBIT_NODE")]
    pub node: String,
    /// Where the desired state comes from.
    #[arg(long, value_enum, default_value = "file")]
    pub source: SourceKind,
    /// ztunnel-format local config file (with Ambit's `ambit.pods` section); `--source file`.
    #[arg(long, required_if_eq("source", "file"))]
    pub config: Option<PathBuf>,
    /// istiod's xDS (`--source xds`): `https://host:port`.
    #[arg(
        long,
        env = "XDS_ADDRESS",
        default_value = "https://istiod.istio-system.svc:15012"
    )]
    pub xds_address: String,
    /// The root certificate istiod's serving certificate chains to (`--source xds`, and the CA
    /// client's default).
    #[arg(
        long,
        env = "XDS_ROOT_CA",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    pub xds_root_cert: PathBuf,
    /// istiod's CA: certificates are requested from it (CSRs; the keys stay on this node)
    /// instead of signed by a local CA. `https://host:port`.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// The root certificate of the CA's serving certificate (default: `--xds-root-cert`); also
    /// the first trust anchor of workload certificates.
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root_cert: Option<PathBuf>,
    /// The bearer token sent to istiod (a projected service account token, audience
    /// `istio-ca`), re-read at each connection.
    #[arg(
        long,
        env = "AUTH_TOKEN",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub token_file: PathBuf,
    /// The cluster's name in the mesh (`CLUSTER_ID`).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// This agent pod's IP (the node id istiod logs).
    #[arg(long, env = "INSTANCE_IP", default_value = "")]
    pub instance_ip: String,
    /// The node's own addresses (in a DaemonSet: `status.hostIP`), comma-separated.
    /// Connections from them to enrolled pods are the node's (kubelet probes) and reach the app
    /// directly, as those from the pods' default gateways do: needed where the node reaches
    /// pods from its own address rather than the pods' gateway (routed CNIs such as Calico).
    #[arg(
        long = "node-address",
        env = "AMBIT_NODE_ADDRESSES",
        value_delimiter = ','
    )]
    pub node_addresses: Vec<std::net::IpAddr>,
    /// The host's procfs, where pods' processes (and so their netns and cgroups) are found;
    /// `--source kubernetes` (in a DaemonSet: the host's /proc mounted read-only).
    #[arg(long, default_value = "/proc")]
    pub proc_root: PathBuf,
    /// `namespace/name` of the agent's own pod, never enrolled.
    #[arg(long, env = "AMBIT_POD")]
    pub own_pod: Option<String>,
    /// The unix socket the chained CNI plugin (`ambit-cni`) reaches this agent on, to have each
    /// mesh pod captured before its sandbox starts. With pods from the Kubernetes API only.
    #[arg(long)]
    pub cni_socket: Option<PathBuf>,
    /// Where bpffs is mounted.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// The cgroup2 mount; found in /proc/self/mountinfo when not given.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Timeout for the tunnel's connections to upstreams and apps.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// SPIFFE trust domain of this node's workloads (unless a workload names its own).
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// A CA in Istio's plug-in CA layout (ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem), shared with other nodes (and Istio). Without it, a built-in CA is
    /// generated for this node alone and its root written to --ca-root-out.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Where the built-in CA's root certificate is written (PEM).
    #[arg(long, default_value = "/run/ambit/root-cert.pem")]
    pub ca_root_out: PathBuf,
    /// Istio's compliance policy for HBONE's TLS: empty (X25519, P-256, P-384 and the hybrid
    /// post-quantum X25519MLKEM768, in ztunnel's order) or `pqc` (X25519MLKEM768 only). Set it
    /// as on istiod and ztunnel.
    #[arg(
        long,
        env = "COMPLIANCE_POLICY",
        default_value = "",
        hide_default_value = true
    )]
    pub compliance_policy: CompliancePolicy,
    /// Lifetime of workload certificates; they are renewed at half of it.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub cert_lifetime: Duration,
    /// HBONE: streams per pooled connection before another is opened.
    #[arg(long, default_value_t = 100)]
    pub hbone_max_streams: usize,
    /// HBONE: streams a pooled connection carries in its life before it is retired (closed
    /// once its last stream ends); 0: no limit. 1 gives every connection its own handshake.
    #[arg(long, default_value_t = 0)]
    pub hbone_max_requests_per_connection: usize,
    /// HBONE: PING interval on every HBONE connection (the pooled ones this node opens and the
    /// ones its pods' servers accept).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hbone_ping_interval: Duration,
    /// HBONE: a connection whose PING is not answered in this time is closed, with its streams.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub hbone_ping_timeout: Duration,
    /// HBONE: a pooled connection without streams for this long is released.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub hbone_idle_timeout: Duration,
    /// HBONE server: a peer that has not finished its TLS handshake after this long is dropped.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hbone_handshake_timeout: Duration,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Admin (`/config_dump`, `POST /logging?level=`); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Detach capture on exit instead of keeping it (fail closed) for the next node process.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// The eBPF programs' own log (what each one decided), forwarded to this log. Off costs
    /// nothing: the verifier removes the log calls.
    #[arg(long, value_enum, default_value = "off")]
    pub ebpf_log: EbpfLogLevel,
    /// How outbound connections are captured: `ebpf` (cgroup connect hooks), or `iptables`
    /// (REDIRECT rules installed in each pod by someone else; for comparison benchmarks).
    #[arg(long, value_enum, default_value = "ebpf")]
    pub capture: Capture,
    /// Whose address an app in the mesh sees on the connections the tunnel delivers to it:
    /// `client` (the client's own, as without a mesh; a routing rule and `fwmark_reflect` in
    /// each enrolled pod), or `pod` (the pod's own address, nothing changed in the pod; the
    /// escape hatch, and the benchmark's previous delivery).
    #[arg(long, value_enum, default_value = "client")]
    pub deliver_from: DeliverFrom,
    /// `on`: the loopback hops between apps and the tunnel (app → tunnel in the client's
    /// pod, tunnel → app in the server's) skip loopback TCP: eBPF (sockhash + sk_msg) moves
    /// each write straight into the other socket. Experimental, off by default: the kernel's
    /// sockmap has no backpressure, splice() readers never see the bytes, and a burst test
    /// loses answers (docs/fast-path.md). Kernels with known sockmap bugs get `off` anyway.
    #[arg(long, value_enum, default_value = "off")]
    pub fast_path: FastPath,
    /// On SIGTERM: how long open connections may go on before the node exits anyway. Keep it
    /// below the pod's terminationGracePeriodSeconds.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// The unix socket on which a running node hands its pods' listeners to the next node
    /// process for the same node (an upgrade), and on which a starting node looks for one to
    /// take over from. Default: `/var/run/ambit/<node>.handover.sock`.
    #[arg(long)]
    pub handover_socket: Option<PathBuf>,
    /// How long a node taking over waits for the pods it took over to be enrolled before it
    /// gives up (and exits with an error; the running node goes on serving).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub handover_timeout: Duration,
    /// After handing over to a successor and draining, wait for SIGTERM instead of exiting.
    /// For a DaemonSet: the kubelet restarts a container that exits on its own, and the
    /// restarted process would take the node back from its successor.
    #[arg(long)]
    pub wait_after_handover: bool,
    /// Tokio worker threads of the tunnel (default: one per CPU).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

/// Where the container runtime reads CNI network configurations (kubelet's and containerd's
/// default).
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// Where the container runtime finds CNI plugin binaries.
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";

/// Where the agent serves the plugin (`ambit node --cni-socket`), and so what the installed
/// plugin config names: the same default as the plugin's own.
pub const DEFAULT_CNI_AGENT_SOCKET: &str = "/var/run/ambit/cni.sock";

/// The settings of `ambit cni install` and `ambit cni uninstall`: where the node's CNI
/// configuration and plugins are, and what the installed plugin config points at.
#[derive(Clone, clap::Args)]
pub struct CniInstallArgs {
    /// The node's CNI network configurations: the primary one (the lexically first
    /// `*.conflist`, `*.conf` or `*.json`, as the runtime picks it) gets `ambit-cni` chained
    /// at the end of its plugins.
    #[arg(long, default_value = DEFAULT_CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// The node's CNI plugin binaries: `ambit-cni` (this binary) is copied there.
    #[arg(long, default_value = DEFAULT_CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    /// The agent's unix socket as the plugin (run by the runtime on the host) reaches it: the
    /// agent's `--cni-socket`, at its host path. Written into the plugin's config as
    /// `agentSocket`.
    #[arg(long, default_value = DEFAULT_CNI_AGENT_SOCKET)]
    pub agent_socket: PathBuf,
    /// Namespaces whose pods the plugin lets start without asking the agent (written into its
    /// config as `excludeNamespaces`), comma-separated. The agent's own namespace belongs here:
    /// its pod could not start while no agent answers (after an upgrade, a reboot).
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    pub exclude_namespaces: Vec<String>,
    /// `install`, on SIGTERM: `keep` the plugin in the chain (fail closed: no pod starts on
    /// the node while the agent is away, as istio-cni by default) or `remove` it (pods start
    /// uncaptured until the next install).
    #[arg(long, value_enum, env = "AMBIT_CNI_ON_EXIT", default_value = "keep")]
    pub on_exit: OnExit,
}

/// What `ambit cni install` leaves on the node when it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// Leave the plugin in the chain and its binary in place: while no agent serves the
    /// socket, every new pod sandbox on the node fails (and kubelet retries) rather than
    /// starting uncaptured.
    Keep,
    /// Take the plugin out of the chain and delete its binary.
    Remove,
}

/// `5s`, `250ms`, `5m`, `24h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 5s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

/// How an enrolled pod's outbound connections reach the tunnel's 15001 listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Capture {
    /// `ambit_connect4/6` + `ambit_sockops` on the pod's cgroup (the default).
    Ebpf,
    /// iptables `REDIRECT` rules that someone else installed inside each pod (the benchmark's
    /// baseline, to measure what eBPF capture saves). The cgroup programs are not attached; the
    /// original destination comes from `SO_ORIGINAL_DST`; inbound still uses sk_lookup.
    Iptables,
}

/// The source address of the tunnel's connections to the apps (`--deliver-from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeliverFrom {
    Client,
    Pod,
}

/// `--fast-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FastPath {
    On,
    Off,
}

/// Levels of the eBPF programs' own logging (aya-log's numbering; 0 is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EbpfLogLevel {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// Which key exchanges HBONE offers and accepts: Istio's `COMPLIANCE_POLICY` (set the same on
/// istiod, ztunnel and Ambit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CompliancePolicy {
    /// ztunnel's default order: X25519, P-256, P-384, then X25519MLKEM768. A client sends a
    /// key share for X25519 first; a `pqc` server answers with a HelloRetryRequest for
    /// X25519MLKEM768, which costs one more round trip but meets.
    #[default]
    Default,
    /// Post-quantum only: X25519MLKEM768 is the one group offered and accepted (TLS 1.3 and
    /// the AES-GCM suites, as always). Peers without it fail the handshake
    /// (`NoKxGroupsInCommon`).
    Pqc,
}

impl std::str::FromStr for CompliancePolicy {
    type Err = String;

    /// Istio's spellings: empty (the default) or `pqc`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "default" => Ok(CompliancePolicy::Default),
            "pqc" => Ok(CompliancePolicy::Pqc),
            "fips-140-2" => Err("compliance policy fips-140-2 is not supported: Ambit's \
                 cryptography (ring, aws-lc-rs for ML-KEM) is not a FIPS-validated build"
                .to_owned()),
            other => Err(format!(
                "unknown compliance policy {other:?} (expected empty, or pqc)"
            )),
        }
    }
}

impl std::fmt::Display for CompliancePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CompliancePolicy::Default => "default",
            CompliancePolicy::Pqc => "pqc",
        })
    }
}

/// `ambit node`'s settings as a standalone command: what the node accepts, for tools.
#[derive(clap::Parser)]
#[command(name = "ambit node")]
struct NodeCommand {
    #[command(flatten)]
    args: NodeArgs,
}

impl NodeArgs {
    /// `--handover-socket`, or its default for this node.
    pub fn handover_socket_path(&self) -> PathBuf {
        self.handover_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/var/run/ambit/{}.handover.sock", self.node)))
    }

    /// The clap command `ambit node` parses: its flags, values, defaults and environment
    /// variables.
    pub fn command() -> clap::Command {
        NodeCommand::command()
    }
}

/// `ambit cni install`'s settings as a standalone command, for tools.
#[derive(clap::Parser)]
#[command(name = "ambit cni install")]
struct CniInstallCommand {
    #[command(flatten)]
    args: CniInstallArgs,
}

impl CniInstallArgs {
    /// The clap command `ambit cni install` parses.
    pub fn command() -> clap::Command {
        CniInstallCommand::command()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn the_command_lists_the_node_flags_with_their_defaults() {
        let command = NodeArgs::command();
        command.clone().debug_assert();
        let metrics = command
            .get_arguments()
            .find(|a| a.get_id() == "metrics_addr")
            .expect("--metrics-addr");
        assert_eq!(metrics.get_long(), Some("metrics-addr"));
        assert_eq!(metrics.get_default_values(), ["0.0.0.0:15020"]);
    }

    #[test]
    fn cni_install_defaults_are_the_node_paths_and_keep() {
        let command = CniInstallArgs::command();
        command.clone().debug_assert();
        let default = |id: &str| {
            let arg = command.get_arguments().find(|a| a.get_id() == id).unwrap();
            arg.get_default_values()[0].to_string_lossy().into_owned()
        };
        assert_eq!(default("cni_conf_dir"), "/etc/cni/net.d");
        assert_eq!(default("cni_bin_dir"), "/opt/cni/bin");
        assert_eq!(default("agent_socket"), "/var/run/ambit/cni.sock");
        assert_eq!(default("on_exit"), "keep");
        assert_eq!(default("exclude_namespaces"), "kube-system");
    }
}
