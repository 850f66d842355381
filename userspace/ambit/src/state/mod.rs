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
    config::{DataplaneMode, LocalConfig, MtlsMode, Protocol, WorkloadTelemetry},
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
    pub telemetry: WorkloadTelemetry,
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

/// Where the tunnel sends a captured connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub workload: WorkloadInfo,
    pub addr: SocketAddr,
    /// The service, when the application connected to a service VIP.
    pub service: Option<ServiceName>,
    pub service_key: Option<String>,
}

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
                    telemetry: w.telemetry.clone(),
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

    /// Identities a server for `upstream` may present: the workload's, plus the service's SANs.
    pub fn expected_identities(&self, upstream: &Upstream) -> Vec<Identity> {
        let mut ids = vec![upstream.workload.identity()];
        if let Some(service) = upstream
            .service_key
            .as_ref()
            .and_then(|k| self.services.get(k))
        {
            ids.extend(service.subject_alt_names.iter().cloned());
        }
        ids.sort();
        ids.dedup();
        ids
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&WorkloadInfo> {
        self.workloads.get(self.workload_by_ip.get(&ip)?)
    }

    /// Resolves a captured original destination: a service VIP:port to one of its endpoints
    /// (round robin) with the port mapped, or a workload IP to that workload.
    pub fn resolve(&self, dst: SocketAddr) -> Option<Upstream> {
        if let Some(service_key) = self.service_by_vip.get(&dst) {
            let service = self.services.get(service_key)?;
            let endpoints: Vec<(&WorkloadInfo, u16)> = self
                .workloads
                .values()
                .filter_map(|w| {
                    let ports = w.services.get(service_key)?;
                    let target = ports
                        .get(&dst.port())
                        .or_else(|| service.ports.get(&dst.port()))
                        .copied()
                        .unwrap_or(dst.port());
                    Some((w, target))
                })
                .filter(|(w, _)| !w.ips.is_empty())
                .collect();
            if endpoints.is_empty() {
                return None;
            }
            let (w, port) =
                endpoints[self.next_endpoint.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
            let ip = w
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == dst.is_ipv4())
                .unwrap_or(&w.ips[0]);
            return Some(Upstream {
                workload: w.clone(),
                addr: SocketAddr::new(*ip, port),
                service: Some(ServiceName {
                    hostname: service.hostname.clone(),
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                }),
                service_key: Some(service.key.clone()),
            });
        }
        let w = self.workload_by_ip(dst.ip())?;
        Some(Upstream {
            workload: w.clone(),
            addr: dst,
            service: None,
            service_key: None,
        })
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
        let mut seen: Vec<SocketAddr> = (0..4).map(|_| s.resolve(vip).unwrap().addr).collect();
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
            s.resolve(vip)
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
        let up = s.resolve("10.2.0.2:9000".parse().unwrap()).unwrap();
        assert_eq!(up.workload.key, "default/c");
        assert_eq!(up.addr, "10.2.0.2:9000".parse().unwrap());
        assert!(s.resolve("10.9.9.9:80".parse().unwrap()).is_none());
    }
}
