//! The delivery rule: policy routing in an enrolled pod's netns that brings the app's replies
//! to a client's address back to the tunnel (see `proxy::delivery`).
//!
//! ```text
//! ip rule add from <pod address> fwmark 0x530000/0xff0000 lookup 15006 pref 15006
//! ip route add local 0.0.0.0/0 dev lo table 15006      (and local ::/0)
//! ip route add throw <node address> table 15006         (each of the node's addresses)
//! ```
//!
//! Only packets of sockets carrying `APP_REPLY_MARK` (the app's listeners and the connections
//! they accept; `ambit_sockops` marks them) match, and only from the pod's own addresses. What
//! that leaves alone:
//! - the app's own outgoing connections (not marked), and its loopback and self-connections
//!   (the `local` table, consulted first, already delivers those);
//! - the kubelet's probes: they come from the node's addresses, which the table throws back
//!   to the main table, so the replies leave the pod as before;
//! - a pod's own rules and marks: the rule's priority (15006) is below the kernel's `local`
//!   rule (0) and above `main` (32766); a pod's rules with a lower priority number come first,
//!   and Ambit's mark is only the bits of `APP_REPLY_MARK_MASK`.
//!
//! Made with netlink, no iptables. Removed when the pod leaves the mesh.

pub mod netlink;

use std::{collections::BTreeSet, net::IpAddr};

use ambit_abi::{APP_REPLY_MARK, APP_REPLY_MARK_MASK};
use anyhow::Result;

use crate::netns::Netns;
use netlink::{Route, RouteSocket, Rule};

/// The delivery table, and the delivery rule's priority.
pub const DELIVERY_TABLE: u32 = 15006;
pub const DELIVERY_RULE_PRIORITY: u32 = 15006;

/// Installs the delivery rule for `pod_ips` and the table with throws for `node_addresses`.
/// Idempotent: a pod adopted again after a restart keeps its rules.
pub fn install(netns: &Netns, pod_ips: &[IpAddr], node_addresses: &BTreeSet<IpAddr>) -> Result<()> {
    let mut socket = RouteSocket::open(netns)?;
    sync_table(&mut socket, pod_ips, node_addresses)?;
    for ip in pod_ips {
        socket.add_rule(&Rule {
            src: *ip,
            mark: APP_REPLY_MARK,
            mask: APP_REPLY_MARK_MASK,
            table: DELIVERY_TABLE,
            priority: DELIVERY_RULE_PRIORITY,
        })?;
    }
    Ok(())
}

/// Makes the delivery table hold exactly the `local` routes for the families of `pod_ips` and
/// a throw for each node address of those families.
pub fn sync_node_addresses(
    netns: &Netns,
    pod_ips: &[IpAddr],
    node_addresses: &BTreeSet<IpAddr>,
) -> Result<()> {
    let mut socket = RouteSocket::open(netns)?;
    sync_table(&mut socket, pod_ips, node_addresses)
}

/// Removes the delivery rules and empties the delivery table.
pub fn remove(netns: &Netns) -> Result<()> {
    let mut socket = RouteSocket::open(netns)?;
    for family_of in [IpAddr::V4(0.into()), IpAddr::V6(0.into())] {
        socket.delete_rules(family_of, DELIVERY_RULE_PRIORITY, DELIVERY_TABLE)?;
    }
    for route in socket.routes(DELIVERY_TABLE)? {
        socket.delete_route(DELIVERY_TABLE, route)?;
    }
    Ok(())
}

fn sync_table(
    socket: &mut RouteSocket,
    pod_ips: &[IpAddr],
    node_addresses: &BTreeSet<IpAddr>,
) -> Result<()> {
    let want = desired_routes(pod_ips, node_addresses);
    let have: BTreeSet<Route> = socket.routes(DELIVERY_TABLE)?.into_iter().collect();
    // Throws first, so that the table never delivers a probe's reply locally.
    for route in want.iter().rev() {
        if !have.contains(route) {
            socket.add_route(DELIVERY_TABLE, *route)?;
        }
    }
    for route in have.difference(&want) {
        socket.delete_route(DELIVERY_TABLE, *route)?;
    }
    Ok(())
}

/// The delivery table's routes for a pod: ordered so that throws sort after `local` (RTN_LOCAL
/// 2 < RTN_THROW 9).
fn desired_routes(pod_ips: &[IpAddr], node_addresses: &BTreeSet<IpAddr>) -> BTreeSet<Route> {
    let mut routes = BTreeSet::new();
    for ip in pod_ips {
        routes.insert(Route::local_all(*ip));
        for node in node_addresses {
            if node.is_ipv4() == ip.is_ipv4() {
                routes.insert(Route::throw(*node));
            }
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_throws_each_node_address_of_the_pods_families() {
        let pod: Vec<IpAddr> = vec!["10.201.1.2".parse().unwrap()];
        let nodes: BTreeSet<IpAddr> = ["10.201.1.1", "fd00:201:1::1", "192.168.0.7"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let routes: Vec<Route> = desired_routes(&pod, &nodes).into_iter().collect();
        assert_eq!(
            routes,
            vec![
                Route::local_all(pod[0]),
                Route::throw("10.201.1.1".parse().unwrap()),
                Route::throw("192.168.0.7".parse().unwrap()),
            ],
            "an IPv4-only pod gets no IPv6 routes"
        );
    }
}
