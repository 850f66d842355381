//! The lab's fixed topology: two nodes, four dual-stack pods, one service with a VIP of each
//! family (drawn in the crate docs).

/// A lab node: a netns that routes between its pods and the other node, in both families.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: &'static str,
    /// Its address on the link between the nodes (/30).
    pub link_ip: &'static str,
    /// Its pods' gateway: its address on its bridge (/24).
    pub bridge_ip: &'static str,
    pub pod_subnet: &'static str,
    /// The same three in IPv6 (link /126, bridge and pod subnet /64).
    pub link_ip6: &'static str,
    pub bridge_ip6: &'static str,
    pub pod_subnet6: &'static str,
}

/// A lab pod: an IPv4 and an IPv6 address on its `eth0`.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: &'static str,
    pub node: &'static str,
    pub ip: &'static str,
    pub ip6: &'static str,
}

pub const NODES: [NodeSpec; 2] = [
    NodeSpec {
        name: "n1",
        link_ip: "10.200.0.1",
        bridge_ip: "10.201.1.1",
        pod_subnet: "10.201.1.0/24",
        link_ip6: "fd00:200::1",
        bridge_ip6: "fd00:201:1::1",
        pod_subnet6: "fd00:201:1::/64",
    },
    NodeSpec {
        name: "n2",
        link_ip: "10.200.0.2",
        bridge_ip: "10.201.2.1",
        pod_subnet: "10.201.2.0/24",
        link_ip6: "fd00:200::2",
        bridge_ip6: "fd00:201:2::1",
        pod_subnet6: "fd00:201:2::/64",
    },
];

#[rustfmt::skip] // a table: one pod a line
pub const PODS: [PodSpec; 4] = [
    PodSpec { name: "a", node: "n1", ip: "10.201.1.2", ip6: "fd00:201:1::2" },
    PodSpec { name: "b", node: "n1", ip: "10.201.1.3", ip6: "fd00:201:1::3" },
    PodSpec { name: "c", node: "n2", ip: "10.201.2.2", ip6: "fd00:201:2::2" },
    PodSpec { name: "d", node: "n2", ip: "10.201.2.3", ip6: "fd00:201:2::3" },
];

/// The IPv4 VIP of the lab's `web` service (port 80 → pod c's 8080).
pub const WEB_VIP: &str = "10.96.0.10";

/// The IPv6 VIP of the same service (port 80 → pod c's 8080). Like `WEB_VIP`, it exists
/// nowhere: only capture makes it reachable.
pub const WEB_VIP6: &str = "fd00:96::10";

pub fn pod(name: &str) -> &'static PodSpec {
    PODS.iter()
        .find(|p| p.name == name)
        .expect("no such lab pod")
}

pub(crate) fn node(name: &str) -> &'static NodeSpec {
    NODES
        .iter()
        .find(|n| n.name == name)
        .expect("no such lab node")
}
