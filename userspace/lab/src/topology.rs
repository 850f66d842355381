//! The lab's fixed topology: two nodes, four pods, one service VIP (drawn in the crate docs).

/// A lab node: a netns that routes between its pods and the other node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: &'static str,
    pub link_ip: &'static str,
    pub bridge_ip: &'static str,
    pub pod_subnet: &'static str,
}

#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: &'static str,
    pub node: &'static str,
    pub ip: &'static str,
}

pub const NODES: [NodeSpec; 2] = [
    NodeSpec {
        name: "n1",
        link_ip: "10.200.0.1",
        bridge_ip: "10.201.1.1",
        pod_subnet: "10.201.1.0/24",
    },
    NodeSpec {
        name: "n2",
        link_ip: "10.200.0.2",
        bridge_ip: "10.201.2.1",
        pod_subnet: "10.201.2.0/24",
    },
];

#[rustfmt::skip] // a table: one pod a line
pub const PODS: [PodSpec; 4] = [
    PodSpec { name: "a", node: "n1", ip: "10.201.1.2" },
    PodSpec { name: "b", node: "n1", ip: "10.201.1.3" },
    PodSpec { name: "c", node: "n2", ip: "10.201.2.2" },
    PodSpec { name: "d", node: "n2", ip: "10.201.2.3" },
];

/// The service VIP of the lab's `web` service (port 80 → pod c's 8080).
pub const WEB_VIP: &str = "10.96.0.10";

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
