//! The desired state of one node, indexed for the data path: which local pods are enrolled,
//! which destinations are in the mesh (what the kernel captures), and how the tunnel resolves a
//! captured destination to an endpoint. Built from any source (see `agent::source`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::Result;

use crate::{
    config::{
        DataplaneMode, GatewayAddress, GatewayDestination, LocalConfig, MtlsMode, Protocol,
        WorkloadTelemetry,
    },
    policy::{ConnectionInfo, Decision, DestinationWorkload, PolicySet},
    tls::Identity,
};

/// `namespace/name` of a pod (or workload).
pub type PodKey = String;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub key: PodKey,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub protocol: Protocol,
    pub trust_domain: String,
    pub node: String,
    /// WorkloadSelector policies (`ns/name`) that select this workload.
    pub authorization_policies: Vec<String>,
    /// Service key (`ns/hostname`) → service port → target port.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// The waypoint for traffic addressed to this workload's IP.
    pub waypoint: Option<GatewayAddress>,
    pub telemetry: WorkloadTelemetry,
    /// See [`crate::config::Workload::provisional`].
    pub provisional: bool,
}

/// A service as telemetry names it (`destination_service*` labels, the access log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName {
    pub hostname: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub hostname: String,
    pub ports: BTreeMap<u16, u16>,
    pub subject_alt_names: Vec<Identity>,
    /// The waypoint for traffic addressed to this service's VIPs.
    pub waypoint: Option<GatewayAddress>,
}

impl WorkloadInfo {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// The `baggage` header describing this workload (as ztunnel sends it): cluster,
    /// namespace, `k8s.<workload type>.name`, canonical service and revision.
    pub fn baggage(&self) -> String {
        let t = &self.telemetry;
        format!(
            "k8s.cluster.name={},k8s.namespace.name={},k8s.{}.name={},service.name={},service.version={}",
            t.cluster_id.as_deref().unwrap_or("Kubernetes"),
            self.namespace,
            t.workload_type.as_deref().unwrap_or("pod"),
            t.workload_name.as_deref().unwrap_or(&self.name),
            t.canonical_name.as_deref().unwrap_or(&self.name),
            t.canonical_revision.as_deref().unwrap_or("latest"),
        )
    }
}

/// A pod on this node that Ambit captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledPodSpec {
    pub key: PodKey,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub ips: Vec<IpAddr>,
    pub identity: Identity,
    pub mtls_mode: MtlsMode,
}

/// The deny reason for a connection to a provisional workload (see
/// [`crate::config::Workload::provisional`]).
pub const PROVISIONAL_WORKLOAD: &str = "workload not yet sent by istiod (its policies are unknown)";

/// What the kernel treats as a mesh destination: a workload IP (every port) or a VIP:port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MeshDestination {
    Workload(IpAddr),
    Service(SocketAddr),
}

#[derive(Debug, Default)]
pub struct State {
    pub workloads: BTreeMap<PodKey, WorkloadInfo>,
    pub services: BTreeMap<String, ServiceInfo>,
    workload_by_ip: BTreeMap<IpAddr, PodKey>,
    service_by_vip: BTreeMap<SocketAddr, String>,
    /// Local pods to enroll on this node.
    pub enrolled: BTreeMap<PodKey, EnrolledPodSpec>,
    /// Authorization policies, enforced at the destination.
    pub policies: PolicySet,
    /// The config's policies as written, for /config_dump.
    pub policies_raw: Vec<serde_yaml::Value>,
    /// Round-robin position for service endpoint choice.
    next_endpoint: AtomicUsize,
}

/// Where the tunnel sends a captured connection: the next hop (the destination itself, or the
/// waypoint in front of it) and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The workload the tunnel connects to: the destination, or its waypoint.
    pub workload: WorkloadInfo,
    /// The destination as the tunnel names it: the address a plain TCP connection goes to, or
    /// the target of the HBONE CONNECT (for a waypoint: the address the app dialled).
    pub addr: SocketAddr,
    pub protocol: Protocol,
    /// Where an HBONE tunnel goes: the workload's IP and port 15008, or a waypoint's IP and
    /// HBONE port. Unused for plain TCP.
    pub tunnel_addr: SocketAddr,
    /// Identities the next hop may present: its workload's, plus its service's SANs.
    pub expected_identities: Vec<Identity>,
    /// The service, when the application connected to a service VIP.
    pub service: Option<ServiceName>,
    /// Set when `workload` is the destination's waypoint, not the destination.
    pub via_waypoint: bool,
}

/// Why a captured destination has no upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    NotInMesh(SocketAddr),
    NoEndpoint {
        service: String,
    },
    /// Fail closed: the destination must be reached through its waypoint, never around it.
    UnknownWaypoint {
        destination: String,
        waypoint: String,
    },
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotInMesh(dst) => write!(f, "{dst} is not a mesh destination"),
            Self::NoEndpoint { service } => write!(f, "service {service} has no endpoint"),
            Self::UnknownWaypoint {
                destination,
                waypoint,
            } => write!(
                f,
                "{destination} names waypoint {waypoint:?}, which is no known workload or \
                 service with an endpoint"
            ),
        }
    }
}

impl std::error::Error for Unresolved {}

impl State {
    pub fn from_config(config: &LocalConfig, node: &str, trust_domain: &str) -> Result<Self> {
        let mut state = State {
            policies: PolicySet::new(config.policies.clone())?,
            policies_raw: config.policies_raw.clone(),
            ..State::default()
        };
        for w in &config.workloads {
            let key = format!("{}/{}", w.namespace, w.name);
            for ip in &w.workload_ips {
                state.workload_by_ip.insert(*ip, key.clone());
            }
            state.workloads.insert(
                key.clone(),
                WorkloadInfo {
                    key,
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    service_account: w.service_account.clone(),
                    ips: w.workload_ips.clone(),
                    protocol: w.protocol,
                    trust_domain: w
                        .trust_domain
                        .clone()
                        .unwrap_or_else(|| trust_domain.to_owned()),
                    node: w.node.clone(),
                    authorization_policies: w.authorization_policies.clone(),
                    services: w.services.clone(),
                    waypoint: w.waypoint.clone(),
                    telemetry: w.telemetry.clone(),
                    provisional: w.provisional,
                },
            );
        }
        for s in &config.services {
            let key = s.key();
            for vip in s.vip_addrs()? {
                for port in s.ports.keys() {
                    state
                        .service_by_vip
                        .insert(SocketAddr::new(vip, *port), key.clone());
                }
            }
            state.services.insert(
                key.clone(),
                ServiceInfo {
                    key,
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    hostname: s.hostname.clone(),
                    ports: s.ports.clone(),
                    subject_alt_names: s
                        .subject_alt_names
                        .iter()
                        .map(|san| Identity::parse(san))
                        .collect::<Result<_>>()?,
                    waypoint: s.waypoint.clone(),
                },
            );
        }
        for pod in &config.ambit.pods {
            let Some(w) = state.workloads.get(&pod.workload) else {
                continue; // rejected by validation
            };
            if w.node != node || pod.dataplane_mode == DataplaneMode::None {
                continue;
            }
            state.enrolled.insert(
                pod.workload.clone(),
                EnrolledPodSpec {
                    key: pod.workload.clone(),
                    netns: pod.netns.clone(),
                    cgroup: pod.cgroup.clone(),
                    ips: w.ips.clone(),
                    identity: w.identity(),
                    mtls_mode: pod.mtls_mode.unwrap_or(config.ambit.mtls_mode),
                },
            );
        }
        Ok(state)
    }

    /// The authorization decision for a connection to the local workload `dst`.
    pub fn authorize(&self, dst: &WorkloadInfo, conn: &ConnectionInfo) -> Decision {
        if dst.provisional {
            // Which policies select it is istiod's to say: refuse until it has.
            return Decision::Deny {
                policy: PROVISIONAL_WORKLOAD.into(),
            };
        }
        let dst = DestinationWorkload {
            namespace: &dst.namespace,
            name: &dst.name,
            selected_policies: &dst.authorization_policies,
        };
        self.policies.evaluate(&dst, conn)
    }

    /// The policies as JSON, for /config_dump.
    pub fn policies_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.policies_raw).unwrap_or_default()
    }

    /// Everything the kernel should capture, for `MESH_DESTINATIONS`.
    pub fn mesh_destinations(&self) -> BTreeSet<MeshDestination> {
        let workloads = self
            .workload_by_ip
            .keys()
            .map(|ip| MeshDestination::Workload(*ip));
        let services = self
            .service_by_vip
            .keys()
            .map(|sa| MeshDestination::Service(*sa));
        workloads.chain(services).collect()
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&WorkloadInfo> {
        self.workloads.get(self.workload_by_ip.get(&ip)?)
    }

    /// Resolves a captured original destination, as `source` dialled it, to the next hop:
    ///
    /// - a service VIP:port whose service names a waypoint → that waypoint;
    /// - a service VIP:port → one of its endpoints (round robin), its target port mapped;
    /// - a workload IP whose workload names a waypoint → that waypoint;
    /// - a workload IP → that workload.
    ///
    /// As ztunnel: a waypoint is never used for its own traffic, and the HBONE CONNECT to a
    /// waypoint names the destination as dialled (the VIP, untranslated). A waypoint that
    /// cannot be resolved is an error, never a reason to go around it.
    pub fn resolve(
        &self,
        dst: SocketAddr,
        source: Option<&WorkloadInfo>,
    ) -> Result<Upstream, Unresolved> {
        if let Some(service_key) = self.service_by_vip.get(&dst) {
            let service = self
                .services
                .get(service_key)
                .ok_or(Unresolved::NotInMesh(dst))?;
            let name = Some(ServiceName {
                hostname: service.hostname.clone(),
                namespace: service.namespace.clone(),
                name: service.name.clone(),
            });
            if let Some(waypoint) = &service.waypoint {
                let described = || format!("service {}", service.key);
                if let Some(upstream) =
                    self.via_waypoint(waypoint, dst, source, name.clone(), described)?
                {
                    return Ok(upstream);
                }
            }
            let (w, port) =
                self.pick_endpoint(service, dst.port())
                    .ok_or_else(|| Unresolved::NoEndpoint {
                        service: service.key.clone(),
                    })?;
            let ip = Self::same_family(w, dst.ip());
            let mut expected = vec![w.identity()];
            expected.extend(service.subject_alt_names.iter().cloned());
            return Ok(Self::direct(w, SocketAddr::new(ip, port), expected, name));
        }
        let w = self
            .workload_by_ip(dst.ip())
            .ok_or(Unresolved::NotInMesh(dst))?;
        if let Some(waypoint) = &w.waypoint {
            let described = || format!("workload {}", w.key);
            if let Some(upstream) = self.via_waypoint(waypoint, dst, source, None, described)? {
                return Ok(upstream);
            }
        }
        Ok(Self::direct(w, dst, vec![w.identity()], None))
    }

    /// The upstream through `waypoint`, or None when `source` is that waypoint.
    fn via_waypoint(
        &self,
        waypoint: &GatewayAddress,
        dst: SocketAddr,
        source: Option<&WorkloadInfo>,
        service: Option<ServiceName>,
        destination: impl Fn() -> String,
    ) -> Result<Option<Upstream>, Unresolved> {
        let unknown = || Unresolved::UnknownWaypoint {
            destination: destination(),
            waypoint: waypoint.destination.to_string(),
        };
        // The waypoint's workload, and the SANs of the service it was found through.
        let (w, sans) = match &waypoint.destination {
            GatewayDestination::Address(ip) => match self.workload_by_ip(*ip) {
                Some(w) => (w, Vec::new()),
                None => {
                    // An address may also be a service VIP (any of its ports).
                    let key = self
                        .service_by_vip
                        .iter()
                        .find(|(vip, _)| vip.ip() == *ip)
                        .map(|(_, key)| key)
                        .ok_or_else(unknown)?;
                    let svc = self.services.get(key).ok_or_else(unknown)?;
                    let (w, _) = self.pick_endpoint(svc, 0).ok_or_else(unknown)?;
                    (w, svc.subject_alt_names.clone())
                }
            },
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => {
                let svc = self
                    .services
                    .get(&format!("{namespace}/{hostname}"))
                    .ok_or_else(unknown)?;
                let (w, _) = self.pick_endpoint(svc, 0).ok_or_else(unknown)?;
                (w, svc.subject_alt_names.clone())
            }
        };
        if source.is_some_and(|s| s.key == w.key) {
            return Ok(None);
        }
        let ip = Self::same_family(w, dst.ip());
        let mut expected = vec![w.identity()];
        expected.extend(sans);
        expected.sort();
        expected.dedup();
        Ok(Some(Upstream {
            workload: w.clone(),
            addr: dst,
            // Always HBONE, whatever the waypoint workload's own protocol says.
            protocol: Protocol::Hbone,
            tunnel_addr: SocketAddr::new(ip, waypoint.hbone_mtls_port),
            expected_identities: expected,
            service,
            via_waypoint: true,
        }))
    }

    fn direct(
        w: &WorkloadInfo,
        addr: SocketAddr,
        mut expected: Vec<Identity>,
        service: Option<ServiceName>,
    ) -> Upstream {
        expected.sort();
        expected.dedup();
        Upstream {
            workload: w.clone(),
            addr,
            protocol: w.protocol,
            tunnel_addr: SocketAddr::new(addr.ip(), ambit_abi::HBONE_PORT),
            expected_identities: expected,
            service,
            via_waypoint: false,
        }
    }

    /// A destination outside the mesh, as the pod would reach it without the mesh: plain TCP to
    /// the address it dialled. (It reaches the tunnel only when every destination is captured:
    /// see `Agent`'s overflow of `MESH_DESTINATIONS`.)
    pub fn passthrough(dst: SocketAddr) -> Upstream {
        let unknown = WorkloadInfo {
            key: String::new(),
            namespace: String::new(),
            name: String::new(),
            service_account: String::new(),
            ips: vec![dst.ip()],
            protocol: Protocol::Tcp,
            trust_domain: String::new(),
            node: String::new(),
            authorization_policies: Vec::new(),
            services: BTreeMap::new(),
            waypoint: None,
            telemetry: WorkloadTelemetry::default(),
            provisional: false,
        };
        Self::direct(&unknown, dst, Vec::new(), None)
    }

    /// One of `service`'s endpoints (round robin) and the target port for `port`.
    fn pick_endpoint(&self, service: &ServiceInfo, port: u16) -> Option<(&WorkloadInfo, u16)> {
        let endpoints: Vec<(&WorkloadInfo, u16)> = self
            .workloads
            .values()
            .filter_map(|w| {
                let ports = w.services.get(&service.key)?;
                let target = ports
                    .get(&port)
                    .or_else(|| service.ports.get(&port))
                    .copied()
                    .unwrap_or(port);
                Some((w, target))
            })
            .filter(|(w, _)| !w.ips.is_empty())
            .collect();
        if endpoints.is_empty() {
            return None;
        }
        Some(endpoints[self.next_endpoint.fetch_add(1, Ordering::Relaxed) % endpoints.len()])
    }

    /// The workload's address of `like`'s family, else its first.
    fn same_family(w: &WorkloadInfo, like: IpAddr) -> IpAddr {
        *w.ips
            .iter()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
            .unwrap_or(&w.ips[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: &str = r#"
workloads:
- {name: a, namespace: default, workloadIps: [10.1.0.2], node: n1, protocol: TCP}
- {name: c, namespace: default, workloadIps: [10.2.0.2], node: n2,
   services: {"default/web.default.svc": {80: 8080}}}
- {name: e, namespace: default, workloadIps: [10.2.0.4], node: n2,
   services: {"default/web.default.svc": {80: 8081}}}
services:
- {name: web, namespace: default, hostname: web.default.svc, vips: ["/10.96.0.10"], ports: {80: 8080}}
ambit:
  pods:
  - {workload: default/a, netns: /run/netns/a, cgroup: lab/a}
  - {workload: default/c, netns: /run/netns/c, cgroup: lab/c}
  - {workload: default/e, netns: /run/netns/e, cgroup: lab/e, dataplaneMode: none}
"#;

    fn state(node: &str) -> State {
        State::from_config(
            &LocalConfig::parse(LAB, "lab.yaml").unwrap(),
            node,
            "cluster.local",
        )
        .unwrap()
    }

    #[test]
    fn enrolls_only_this_nodes_ambient_pods() {
        assert_eq!(
            state("n1").enrolled.keys().collect::<Vec<_>>(),
            ["default/a"]
        );
        // e is on n2 but opted out.
        assert_eq!(
            state("n2").enrolled.keys().collect::<Vec<_>>(),
            ["default/c"]
        );
    }

    #[test]
    fn a_provisional_workload_accepts_nothing_until_istiod_sends_it() {
        let mut config = LocalConfig::parse(LAB, "lab.yaml").unwrap();
        let conn = ConnectionInfo {
            src_ip: "10.1.0.2".parse().unwrap(),
            src_identity: Some("spiffe://cluster.local/ns/default/sa/a".parse().unwrap()),
            dst_ip: "10.2.0.2".parse().unwrap(),
            dst_port: 8080,
        };
        let decide = |config: &LocalConfig| {
            let s = State::from_config(config, "n2", "cluster.local").unwrap();
            s.authorize(&s.workloads["default/c"], &conn)
        };
        assert_eq!(decide(&config), Decision::Allow, "no policy: allowed");
        let c = config.workloads.iter_mut().find(|w| w.name == "c").unwrap();
        c.provisional = true;
        assert_eq!(
            decide(&config),
            Decision::Deny {
                policy: PROVISIONAL_WORKLOAD.into()
            }
        );
    }

    #[test]
    fn mesh_destinations_are_workload_ips_and_vip_ports() {
        let d = state("n1").mesh_destinations();
        assert!(d.contains(&MeshDestination::Workload("10.2.0.2".parse().unwrap())));
        assert!(d.contains(&MeshDestination::Service("10.96.0.10:80".parse().unwrap())));
        assert!(!d.contains(&MeshDestination::Service("10.96.0.10:81".parse().unwrap())));
        assert_eq!(d.len(), 4);
    }

    #[test]
    fn a_vip_resolves_round_robin_with_each_endpoints_target_port() {
        let s = state("n1");
        let vip = "10.96.0.10:80".parse().unwrap();
        let mut seen: Vec<SocketAddr> =
            (0..4).map(|_| s.resolve(vip, None).unwrap().addr).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen,
            vec![
                "10.2.0.2:8080".parse().unwrap(),
                "10.2.0.4:8081".parse().unwrap()
            ]
        );
        assert_eq!(
            s.resolve(vip, None)
                .unwrap()
                .service
                .map(|s| s.hostname)
                .as_deref(),
            Some("web.default.svc")
        );
    }

    #[test]
    fn a_workload_ip_resolves_to_itself_and_unknown_to_none() {
        let s = state("n1");
        let up = s.resolve("10.2.0.2:9000".parse().unwrap(), None).unwrap();
        assert_eq!(up.workload.key, "default/c");
        assert_eq!(up.addr, "10.2.0.2:9000".parse().unwrap());
        assert_eq!(up.tunnel_addr, "10.2.0.2:15008".parse().unwrap());
        assert!(!up.via_waypoint);
        let unknown = "10.9.9.9:80".parse().unwrap();
        assert_eq!(
            s.resolve(unknown, None),
            Err(Unresolved::NotInMesh(unknown))
        );
    }

    /// The lab plus a waypoint `wp` (HBONE port 15009) in front of service web (by hostname,
    /// through the waypoint's own service) and of workload c (by address).
    const WITH_WAYPOINTS: &str = r#"
workloads:
- {name: a, namespace: default, workloadIps: [10.1.0.2], node: n1, protocol: HBONE}
- {name: c, namespace: default, workloadIps: [10.2.0.2], node: n2, protocol: HBONE,
   services: {"default/web.default.svc": {80: 8080}},
   waypoint: {destination: "/10.2.0.9", hboneMtlsPort: 15009}}
- {name: wp, namespace: default, serviceAccount: waypoint, workloadIps: [10.2.0.9], node: n2,
   services: {"default/wp.default.svc": {15008: 15008}}}
services:
- {name: web, namespace: default, hostname: web.default.svc, vips: ["/10.96.0.10"],
   ports: {80: 8080}, waypoint: {destination: "default/wp.default.svc", hboneMtlsPort: 15009}}
- {name: wp, namespace: default, hostname: wp.default.svc, vips: ["/10.96.0.99"],
   ports: {15008: 15008}, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/wp-alt"]}
- {name: ghost, namespace: default, hostname: ghost.default.svc, vips: ["/10.96.0.11"],
   ports: {80: 80}, waypoint: {destination: "default/nobody.default.svc"}}
"#;

    fn waypoint_state() -> State {
        let config = LocalConfig::parse(WITH_WAYPOINTS, "lab.yaml").unwrap();
        State::from_config(&config, "n1", "cluster.local").unwrap()
    }

    #[test]
    fn a_service_with_a_waypoint_is_reached_through_it_by_the_vip_as_dialled() {
        let s = waypoint_state();
        let a = s.workloads["default/a"].clone();
        let vip = "10.96.0.10:80".parse().unwrap();
        let up = s.resolve(vip, Some(&a)).unwrap();
        assert!(up.via_waypoint);
        assert_eq!(up.workload.key, "default/wp");
        // The CONNECT names the VIP, untranslated; the tunnel goes to the waypoint's port.
        assert_eq!(up.addr, vip);
        assert_eq!(up.tunnel_addr, "10.2.0.9:15009".parse().unwrap());
        assert_eq!(up.protocol, Protocol::Hbone);
        assert_eq!(up.service.unwrap().hostname, "web.default.svc");
        let ids: Vec<String> = up
            .expected_identities
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            ids,
            [
                "spiffe://cluster.local/ns/default/sa/waypoint",
                "spiffe://cluster.local/ns/default/sa/wp-alt"
            ]
        );
    }

    #[test]
    fn a_workload_with_a_waypoint_is_reached_through_it_unless_the_waypoint_sends() {
        let s = waypoint_state();
        let dst = "10.2.0.2:8080".parse().unwrap();
        let a = s.workloads["default/a"].clone();
        let up = s.resolve(dst, Some(&a)).unwrap();
        assert!(up.via_waypoint);
        assert_eq!((up.addr, up.tunnel_addr.port()), (dst, 15009));
        // The waypoint's own traffic to c goes straight to c.
        let wp = s.workloads["default/wp"].clone();
        let up = s.resolve(dst, Some(&wp)).unwrap();
        assert!(!up.via_waypoint);
        assert_eq!(up.workload.key, "default/c");
        assert_eq!(up.tunnel_addr, "10.2.0.2:15008".parse().unwrap());
    }

    #[test]
    fn an_unknown_waypoint_fails_closed() {
        let s = waypoint_state();
        let err = s
            .resolve("10.96.0.11:80".parse().unwrap(), None)
            .unwrap_err();
        assert!(matches!(err, Unresolved::UnknownWaypoint { .. }), "{err}");
        assert!(
            err.to_string().contains("default/nobody.default.svc"),
            "{err}"
        );
    }
}
