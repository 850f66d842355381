//! `cargo xtask kind up|demo|down`: Ambit as a DaemonSet on a three-node kind cluster, and the
//! static checks of its manifests.
//!
//! - `up`: creates the cluster (kind-config/cluster.yaml), builds the image (deploy/Containerfile)
//!   and loads it into the nodes, runs the stand-in istiod (kind-config/istiod.yaml) with the
//!   mesh CA from `ambit ca init`, deploys deploy/ (which holds no CA key: the nodes send CSRs
//!   to the stand-in) and waits for the DaemonSet.
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
//! Kubernetes schemas, kind's cluster config structurally, and the DaemonSet against the code
//! (see the `manifests` module).

mod cluster;
mod demo;
mod manifests;

use anyhow::Result;

pub use manifests::validate_manifests;

use crate::util::workspace_root;

/// kind's cluster name (`name:` in kind-config/cluster.yaml): its nodes are `ambit-control-plane`,
/// `ambit-worker` and `ambit-worker2`, its kubectl context `kind-ambit`.
const CLUSTER: &str = "ambit";
const CONTEXT: &str = "kind-ambit";
const CLUSTER_CONFIG: &str = "kind-config/cluster.yaml";
const CONTAINERFILE: &str = "deploy/Containerfile";
const IMAGE: &str = "ambit:dev";
const AGENT_NAMESPACE: &str = "ambit-system";
/// The DaemonSet, its container, its ServiceAccount and its read-only ClusterRole.
const AGENT: &str = "ambit";
const AGENT_SELECTOR: &str = "app.kubernetes.io/name=ambit";
/// The mesh CA: Istio's plug-in CA Secret, which `up` creates for the stand-in istiod.
const CA_SECRET: &str = "cacerts";
/// The kind lab's istiod (Ambit's stand-in), its namespace, and the ConfigMap of its root that
/// the DaemonSet mounts (istiod publishes it in every namespace; `up` creates it).
const LAB_ISTIOD: &str = "kind-config/istiod.yaml";
const ISTIOD_NAMESPACE: &str = "istio-system";
const ROOT_CERT_CONFIGMAP: &str = "istio-ca-root-cert";

/// The sample apps of deploy/samples/ the demo calls, and how.
const DEMO_NAMESPACE: &str = "demo";
const DEMO_CLIENT: &str = "sleep";
const DEMO_SERVER: &str = "web";
const DEMO_SERVER_SERVICE_PORT: &str = "80";
const DEMO_SERVER_POD_PORT: &str = "8080";

#[derive(clap::Subcommand, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KindCommand {
    /// Create the kind cluster, build and load the image, run the stand-in istiod with the
    /// lab's CA, deploy Ambit.
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
    let sh = cluster::Shell {
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
        KindCommand::Up => cluster::up(&sh),
        KindCommand::Demo => demo::demo(&sh),
        KindCommand::Down => cluster::down(&sh),
    }
}
