//! The network-namespace lab: Ambit's main job on one machine, and the stage of its privileged
//! integration tests.
//!
//! ```text
//!   pod a (10.201.1.2) ─┐                         ┌─ pod c (10.201.2.2)
//!   pod b (10.201.1.3) ─┴ br0 [node n1] ── link ── [node n2] br0 ┴─ pod d (10.201.2.3)
//!                        10.201.1.1   10.200.0.1   10.200.0.2   10.201.2.1
//!
//!   the same in IPv6 (every pod and node has both families):
//!   pod a (fd00:201:1::2) ─┐                            ┌─ pod c (fd00:201:2::2)
//!   pod b (fd00:201:1::3) ─┴ br0 [n1] ───── link ──── [n2] br0 ┴─ pod d (fd00:201:2::3)
//!                fd00:201:1::1   fd00:200::1   fd00:200::2   fd00:201:2::1
//! ```
//!
//! The service `web` has a VIP of each family, `WEB_VIP` (10.96.0.10) and `WEB_VIP6`
//! (fd00:96::10), port 80 → pod c's 8080; neither exists anywhere but in Ambit's maps.
//!
//! Every node and pod is a network namespace named `<prefix>-<name>`; every pod's processes run
//! in the cgroup `<cgroup2>/<prefix>/<pod>`. All addresses exist only inside these namespaces.
//! `Lab` removes everything it made when dropped (also when a test panics), and `sweep` removes
//! what an interrupted run left behind.
//!
//! - `topology`: the nodes, pods and service VIPs above.
//! - `lifecycle`: `Lab` itself: building it, naming its pieces, removing it (`sweep`).
//! - `processes`: commands in pods and nodes, and the processes the lab owns.
//! - `config`: the config the lab writes for its nodes.
//! - `capture`: iptables capture inside a pod (the eBPF-less baseline, ztunnel's).
//! - `ztunnel`: Istio's ztunnel in a lab pod.
//! - `system`: this machine (root, `ip`, mounts, CPUs, waiting, files).

mod capture;
mod config;
mod lifecycle;
mod processes;
mod system;
mod topology;
mod ztunnel;

pub use config::LabConfig;
pub use lifecycle::{sweep, Lab, HANDOVER_SOCKET_DIR};
pub use processes::{join_cgroup, open_fds, rss_kib, vm_rss_kib, NODE_LOG_WITH_CONNECTION_STARTS};
pub use system::{
    cgroup2_root, cores, ensure_bpffs, ip, require_root, timeout_scale, wait_until,
    worker_threads_per_node, write_atomically,
};
pub use topology::{pod, NodeSpec, PodSpec, NODES, PODS, WEB_VIP, WEB_VIP6};
pub use ztunnel::{
    split_mesh_and_pods, without_ambit_section, xds_node_args, Ztunnel, ZtunnelPod, ZtunnelSource,
};
