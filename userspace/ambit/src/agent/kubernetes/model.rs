//! Kubernetes objects → Ambit's desired state, as Istio ambient reads them:
//!
//! - a pod is in the mesh when its namespace or the pod itself is labelled
//!   `istio.io/dataplane-mode=ambient`, unless the pod says `none`, has an Istio sidecar, uses
//!   the host network, or is not running with an IP; its identity comes from its service
//!   account; it speaks HBONE;
//! - a Service's cluster IPs and TCP ports become VIPs when it has an endpoint Ambit can reach:
//!   from its EndpointSlices, the ready endpoints (else the serving terminating ones, as
//!   kube-proxy does), only this node's with `internalTrafficPolicy: Local`, each with its
//!   target port. Endpoints outside the mesh are plain TCP workloads (ztunnel sends them plain
//!   TCP); headless services have no VIP: their pods are reached by pod IP;
//! - the mesh pods on this node are enrolled, at the netns and cgroup the locator finds.
//!
//! The result is the same `LocalConfig` the file source reads, so both sources share every
//! rule after this point.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service, ServicePort},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::discovery::PodLocator;
use crate::config::{
    AmbitSection, LocalConfig, LocalPod, Protocol, Service as ConfigService, Workload,
    WorkloadTelemetry,
};

pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Set by Istio's sidecar injector on the pods it injects.
const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
const SIDECAR_CONTAINER: &str = "istio-proxy";

/// Everything the watches currently hold.
#[derive(Default)]
pub struct ClusterView<'a> {
    pub pods: Vec<&'a Pod>,
    pub namespaces: Vec<&'a Namespace>,
    pub services: Vec<&'a Service>,
    pub slices: Vec<&'a EndpointSlice>,
}

/// Is this pod in the ambient mesh?
pub fn in_mesh(pod: &Pod, ambient_namespaces: &BTreeSet<String>, own_pod: Option<&str>) -> bool {
    wants_capture(pod, ambient_namespaces, own_pod) && reachable(pod)
}

/// Whether a pod is one Ambit captures once it runs: ambient by its namespace or its own label
/// (and not opted out), no sidecar, not on the host network, not the agent itself.
pub fn wants_capture(
    pod: &Pod,
    ambient_namespaces: &BTreeSet<String>,
    own_pod: Option<&str>,
) -> bool {
    let meta = &pod.metadata;
    let label = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
        .map(String::as_str);
    let namespace_ambient = meta
        .namespace
        .as_ref()
        .is_some_and(|ns| ambient_namespaces.contains(ns));
    let is_self = own_pod.is_some_and(|own| {
        meta.name.as_deref() == own.split_once('/').map(|(_, n)| n)
            && meta.namespace.as_deref() == own.split_once('/').map(|(ns, _)| ns)
    });
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    (namespace_ambient || label == Some("ambient"))
        && label != Some("none")
        && !has_sidecar(pod)
        && !host_network
        && !is_self
}

/// The namespaces labelled ambient.
pub fn ambient_namespaces(namespaces: &[&Namespace]) -> BTreeSet<String> {
    namespaces
        .iter()
        .filter(|ns| {
            ns.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
                .map(String::as_str)
                == Some("ambient")
        })
        .filter_map(|ns| ns.metadata.name.clone())
        .collect()
}

/// An Istio sidecar already proxies this pod: as istio-cni, leave it out of ambient capture.
fn has_sidecar(pod: &Pod) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION));
    let containers = pod.spec.as_ref().map(|s| s.containers.iter());
    annotated
        || containers
            .into_iter()
            .flatten()
            .any(|c| c.name == SIDECAR_CONTAINER)
}

/// Running with its own IP: an address a connection can go to (host-network pods share the
/// node's, so no workload can own it).
fn reachable(pod: &Pod) -> bool {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    !host_network && running && !pod_ips(pod).is_empty()
}

/// A pod's names for telemetry, as istiod derives them for ztunnel: the workload is the pod's
/// controller (a ReplicaSet made by a Deployment counts as the Deployment: its name minus the
/// `pod-template-hash` suffix), the canonical service and revision come from Istio's labels,
/// else the usual app labels.
fn pod_telemetry(pod: &Pod, pod_name: &str) -> WorkloadTelemetry {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let label = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let (workload_type, workload_name) = match owner {
        Some(o) if o.kind == "ReplicaSet" => match labels.get("pod-template-hash") {
            Some(hash) if o.name.ends_with(&format!("-{hash}")) => (
                "deployment".to_owned(),
                o.name[..o.name.len() - hash.len() - 1].to_owned(),
            ),
            _ => ("replicaset".to_owned(), o.name.clone()),
        },
        Some(o) => (o.kind.to_lowercase(), o.name.clone()),
        None => ("pod".to_owned(), pod_name.to_owned()),
    };
    WorkloadTelemetry {
        canonical_name: label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .or_else(|| Some(workload_name.clone())),
        canonical_revision: label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .or_else(|| Some("latest".to_owned())),
        workload_name: Some(workload_name),
        workload_type: Some(workload_type),
        cluster_id: None,
    }
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|p| p.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        ips.extend(
            status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    ips
}

/// The workload a pod is, as istiod describes it to ztunnel.
fn workload_of(pod: &Pod, ns: &str, name: &str, protocol: Protocol) -> Workload {
    let spec = pod.spec.as_ref();
    Workload {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        workload_ips: pod_ips(pod),
        protocol,
        trust_domain: None,
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        authorization_policies: Vec::new(),
        services: BTreeMap::new(),
        waypoint: None,
        telemetry: pod_telemetry(pod, name),
        provisional: false,
    }
}

/// A service port's name as EndpointSlices carry it: a single port may be unnamed, and its
/// slice port is then named "".
fn port_name(name: Option<&String>) -> &str {
    name.map_or("", String::as_str)
}

/// Only TCP ports are destinations the tunnel can carry (absent means TCP).
fn is_tcp(protocol: Option<&String>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

/// The port a Service's port forwards to when no EndpointSlice says otherwise.
fn spec_target(port: &ServicePort) -> i32 {
    match &port.target_port {
        Some(IntOrString::Int(t)) => *t,
        _ => port.port,
    }
}

/// One endpoint of a service, with what Kubernetes says about its state.
struct Candidate<'a> {
    pod: &'a Pod,
    node: Option<&'a str>,
    ready: bool,
    serving: bool,
    terminating: bool,
    ports: &'a [EndpointPort],
}

impl<'a> Candidate<'a> {
    /// The EndpointSlice API's defaults: `ready` absent is true, `serving` absent defers to
    /// `ready`, `terminating` absent is false. A pod being deleted is terminating even before
    /// its slice says so, and a terminating endpoint is never ready.
    fn new(endpoint: &'a Endpoint, pod: &'a Pod, ports: &'a [EndpointPort]) -> Self {
        let c = endpoint.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false)
            || pod.metadata.deletion_timestamp.is_some();
        Candidate {
            pod,
            node: endpoint
                .node_name
                .as_deref()
                .or_else(|| pod.spec.as_ref().and_then(|s| s.node_name.as_deref())),
            ready: ready && !terminating,
            serving: c.and_then(|c| c.serving).unwrap_or(ready),
            terminating,
            ports,
        }
    }
}

/// The endpoints traffic goes to, as kube-proxy chooses them: with `internalTrafficPolicy:
/// Local` only those on `node`; then the ready ones, else (during a rollout's last moments) the
/// serving terminating ones. `node` None: no node's view (every endpoint is kept).
fn select<'a>(
    mut candidates: Vec<Candidate<'a>>,
    node_local: bool,
    node: Option<&str>,
) -> Vec<Candidate<'a>> {
    if let (true, Some(node)) = (node_local, node) {
        candidates.retain(|c| c.node == Some(node));
    }
    if candidates.iter().any(|c| c.ready) {
        candidates.retain(|c| c.ready);
    } else {
        candidates.retain(|c| c.serving && c.terminating);
    }
    candidates
}

/// Builds the desired state of node `node`. `own_pod` (`ns/name`) is the agent itself.
pub fn build_config(
    view: &ClusterView<'_>,
    node: &str,
    own_pod: Option<&str>,
    locator: &dyn PodLocator,
) -> LocalConfig {
    build(view, Some(node), own_pod, locator)
}

/// The mesh as a control plane serves it to every node: no pods enrolled, and services with
/// `internalTrafficPolicy: Local` keep all their endpoints (the config cannot say "the client
/// node's only"). `own_pod` is left out, as in [`build_config`].
pub fn build_mesh(view: &ClusterView<'_>, own_pod: Option<&str>) -> LocalConfig {
    struct NoPods;
    impl PodLocator for NoPods {
        fn locate(&self, _uid: &str, _ips: &[IpAddr]) -> Option<super::discovery::PodLocation> {
            None
        }
    }
    build(view, None, own_pod, &NoPods)
}

fn build(
    view: &ClusterView<'_>,
    node: Option<&str>,
    own_pod: Option<&str>,
    locator: &dyn PodLocator,
) -> LocalConfig {
    let ambient_namespaces = ambient_namespaces(&view.namespaces);
    // A pod whose sandbox the CNI plugin reported is captured from its start, with the
    // addresses the plugin saw, before the API server says it runs.
    let sandbox_ips = |pod: &Pod| {
        let uid = pod.metadata.uid.as_deref()?;
        locator.sandbox_ips(uid).filter(|ips| !ips.is_empty())
    };

    let pods_by_key: BTreeMap<(&str, &str), &Pod> = view
        .pods
        .iter()
        .filter_map(|p| {
            let meta = &p.metadata;
            Some(((meta.namespace.as_deref()?, meta.name.as_deref()?), *p))
        })
        .collect();

    // Mesh pods → workloads, keyed by namespace/name.
    let mut workloads: BTreeMap<(String, String), (Workload, Option<String>)> = BTreeMap::new();
    for (&(ns, name), pod) in &pods_by_key {
        let reported = sandbox_ips(pod)
            .filter(|_| wants_capture(pod, &ambient_namespaces, own_pod) && !reachable(pod));
        if in_mesh(pod, &ambient_namespaces, own_pod) || reported.is_some() {
            let mut workload = workload_of(pod, ns, name, Protocol::Hbone);
            if let Some(ips) = reported {
                workload.workload_ips = ips;
            }
            let uid = pod.metadata.uid.clone();
            workloads.insert((ns.to_owned(), name.to_owned()), (workload, uid));
        }
    }
    let mesh_ips: BTreeSet<IpAddr> = workloads
        .values()
        .flat_map(|(w, _)| w.workload_ips.iter().copied())
        .collect();

    // Services with an endpoint to send to. While the client is a mesh pod, ztunnel carries all
    // of its traffic, so a service is captured whatever its endpoints are: mesh endpoints get
    // HBONE, the others plain TCP. Only a service with no reachable endpoint is left to
    // kube-proxy (it could only fail in the tunnel).
    let mut services = Vec::new();
    for svc in &view.services {
        let (Some(ns), Some(name)) = (svc.metadata.namespace.clone(), svc.metadata.name.clone())
        else {
            continue;
        };
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let cluster_ips = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.clone(),
            _ => spec.cluster_ip.iter().cloned().collect(),
        };
        // "None" (headless) and ExternalName's absent address parse as no IP.
        let vips: Vec<String> = cluster_ips
            .into_iter()
            .filter(|ip| ip.parse::<IpAddr>().is_ok())
            .map(|ip| format!("/{ip}"))
            .collect();
        if vips.is_empty() {
            continue; // headless or ExternalName: no VIP to capture; pods are reached by IP
        }
        let svc_ports: Vec<&ServicePort> = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_ref()))
            .collect();
        if svc_ports.is_empty() {
            continue;
        }
        let hostname = format!("{name}.{ns}.svc.cluster.local");
        let key = format!("{ns}/{hostname}");

        // Each pod once, even when it is in two slices for a moment (the ready copy wins).
        let mut candidates: BTreeMap<(&str, &str), Candidate<'_>> = BTreeMap::new();
        for slice in view.slices.iter().filter(|s| {
            s.metadata.namespace.as_deref() == Some(ns.as_str())
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    == Some(&name)
        }) {
            let slice_ports = slice.ports.as_deref().unwrap_or_default();
            for endpoint in &slice.endpoints {
                // Endpoints without a pod (managed by hand) have no workload to reach.
                let Some(target) = endpoint.target_ref.as_ref() else {
                    continue;
                };
                if target.kind.as_deref() != Some("Pod") {
                    continue;
                }
                let pod_ns = target.namespace.as_deref().unwrap_or(ns.as_str());
                let Some(pod_name) = target.name.as_deref() else {
                    continue;
                };
                let Some(pod) = pods_by_key.get(&(pod_ns, pod_name)) else {
                    continue;
                };
                if !reachable(pod) {
                    continue;
                }
                let candidate = Candidate::new(endpoint, pod, slice_ports);
                let better = candidates
                    .get(&(pod_ns, pod_name))
                    .is_none_or(|seen| candidate.ready && !seen.ready);
                if better {
                    candidates.insert((pod_ns, pod_name), candidate);
                }
            }
        }
        let node_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let chosen = select(candidates.into_values().collect(), node_local, node);

        let mut has_endpoint = false;
        for endpoint in chosen {
            let meta = &endpoint.pod.metadata;
            let (Some(pod_ns), Some(pod_name)) = (meta.namespace.clone(), meta.name.clone()) else {
                continue;
            };
            let workload_key = (pod_ns.clone(), pod_name.clone());
            if !workloads.contains_key(&workload_key) {
                // Outside the mesh: plain TCP, unless its IP is a mesh pod's (a stale object).
                let workload = workload_of(endpoint.pod, &pod_ns, &pod_name, Protocol::Tcp);
                if workload.workload_ips.iter().any(|ip| mesh_ips.contains(ip)) {
                    continue;
                }
                workloads.insert(workload_key.clone(), (workload, None));
            }
            let (workload, _) = workloads.get_mut(&workload_key).expect("inserted above");
            has_endpoint = true;
            let ports = workload.services.entry(key.clone()).or_default();
            for sp in &svc_ports {
                // The slice's port of the same name is the endpoint's target port.
                let target = endpoint
                    .ports
                    .iter()
                    .find(|p| {
                        port_name(p.name.as_ref()) == port_name(sp.name.as_ref())
                            && is_tcp(p.protocol.as_ref())
                    })
                    .and_then(|p| p.port)
                    .unwrap_or_else(|| spec_target(sp));
                ports.insert(sp.port as u16, target as u16);
            }
        }
        if !has_endpoint {
            continue;
        }
        services.push(ConfigService {
            name,
            namespace: ns,
            hostname,
            vips,
            ports: svc_ports
                .iter()
                .map(|p| (p.port as u16, spec_target(p) as u16))
                .collect(),
            subject_alt_names: Vec::new(),
            waypoint: None,
        });
    }

    // This node's mesh pods, where the locator finds them.
    let mut pods = Vec::new();
    for ((ns, name), (workload, uid)) in &workloads {
        if Some(workload.node.as_str()) != node || workload.protocol != Protocol::Hbone {
            continue;
        }
        let Some(location) = uid
            .as_deref()
            .and_then(|uid| locator.locate(uid, &workload.workload_ips))
        else {
            continue; // not found yet (containers starting): the next rebuild retries
        };
        pods.push(LocalPod {
            workload: format!("{ns}/{name}"),
            netns: location.netns,
            cgroup: location.cgroup,
            dataplane_mode: crate::config::DataplaneMode::Ambient,
            mtls_mode: None,
        });
    }

    LocalConfig {
        workloads: workloads.into_values().map(|(w, _)| w).collect(),
        services,
        policies: Vec::new(),
        policies_raw: Vec::new(),
        ambit: AmbitSection {
            pods,
            mtls_mode: Default::default(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::{agent::kubernetes::discovery::PodLocation, state::State};

    /// Finds every pod: the test only checks which ones are asked for.
    struct EveryPod;
    impl PodLocator for EveryPod {
        fn locate(&self, uid: &str, _ips: &[IpAddr]) -> Option<PodLocation> {
            Some(PodLocation {
                netns: PathBuf::from(format!("/proc/{uid}/ns/net")),
                cgroup: PathBuf::from(format!("/kubepods/pod{uid}")),
            })
        }
    }

    /// Recorded API objects (trimmed `kubectl get -o json` output), one cluster.
    fn objects() -> (Vec<Pod>, Vec<Namespace>, Vec<Service>, Vec<EndpointSlice>) {
        let list = |file: &str| -> serde_json::Value {
            serde_json::from_str(
                &std::fs::read_to_string(format!(
                    "{}/testdata/kubernetes/{file}",
                    env!("CARGO_MANIFEST_DIR")
                ))
                .unwrap(),
            )
            .unwrap()
        };
        fn items<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Vec<T> {
            serde_json::from_value(v["items"].clone()).unwrap()
        }
        (
            items(list("pods.json")),
            items(list("namespaces.json")),
            items(list("services.json")),
            items(list("endpointslices.json")),
        )
    }

    fn state(
        pods: &[Pod],
        namespaces: &[Namespace],
        services: &[Service],
        slices: &[EndpointSlice],
        node: &str,
    ) -> State {
        let view = ClusterView {
            pods: pods.iter().collect(),
            namespaces: namespaces.iter().collect(),
            services: services.iter().collect(),
            slices: slices.iter().collect(),
        };
        let config = build_config(&view, node, Some("ambit-system/ambit-x1"), &EveryPod);
        State::from_config(&config, node, "cluster.local").unwrap()
    }

    #[test]
    fn enrolls_ambient_pods_of_this_node_only() {
        let (pods, ns, svc, slices) = objects();
        let s = state(&pods, &ns, &svc, &slices, "worker");
        // demo/sleep and demo/web run on "worker"; demo/opted-out says none; default/plain is
        // in a namespace without the label; demo/hostnet uses the host network; the agent is
        // not enrolled; demo/web-2 runs on "worker2".
        assert_eq!(
            s.enrolled.keys().collect::<Vec<_>>(),
            ["demo/sleep", "demo/web"]
        );
        let s2 = state(&pods, &ns, &svc, &slices, "worker2");
        // A pod labelled ambient in a plain namespace is in the mesh too.
        assert_eq!(
            s2.enrolled.keys().collect::<Vec<_>>(),
            ["default/labelled", "demo/web-2"]
        );
        assert!(s.workloads.contains_key("default/labelled"));
        // default/plain is outside the mesh: a plain TCP workload (it backs plain-svc), never
        // enrolled; demo/opted-out backs no service and is not a workload at all.
        assert_eq!(s.workloads["default/plain"].protocol, Protocol::Tcp);
        assert!(!s.workloads.contains_key("demo/opted-out"));
        assert_eq!(
            s.workloads["demo/sleep"].identity().to_string(),
            "spiffe://cluster.local/ns/demo/sa/sleep"
        );
    }

    #[test]
    fn service_vips_resolve_to_mesh_endpoints_with_target_ports() {
        let (pods, ns, svc, slices) = objects();
        let s = state(&pods, &ns, &svc, &slices, "worker");
        let vip = "10.96.100.10:80".parse().unwrap();
        let mut endpoints: Vec<_> = (0..4)
            .map(|_| s.resolve(vip, None).unwrap().addr.to_string())
            .collect();
        endpoints.sort();
        endpoints.dedup();
        assert_eq!(endpoints, ["10.244.1.7:8080", "10.244.2.9:8080"]);
        // A service whose endpoints are all outside the mesh is captured too (as ztunnel does
        // for a mesh client), and reached in plain TCP at its unnamed port's target.
        let plain = s.resolve("10.96.100.20:80".parse().unwrap(), None).unwrap();
        assert_eq!(plain.addr.to_string(), "10.244.1.9:8080");
        assert_eq!(plain.protocol, Protocol::Tcp);
    }

    #[test]
    fn label_and_namespace_changes_enroll_and_unenroll() {
        let (mut pods, mut ns, svc, slices) = objects();
        // Label the namespace `none` at the namespace level: its pods leave the mesh.
        for n in ns
            .iter_mut()
            .filter(|n| n.metadata.name.as_deref() == Some("demo"))
        {
            n.metadata
                .labels
                .as_mut()
                .unwrap()
                .insert(DATAPLANE_MODE_LABEL.into(), "none".into());
        }
        assert!(state(&pods, &ns, &svc, &slices, "worker")
            .enrolled
            .is_empty());
        // The pod-level label still enrolls a pod in a non-ambient namespace.
        for p in pods
            .iter_mut()
            .filter(|p| p.metadata.name.as_deref() == Some("sleep"))
        {
            p.metadata
                .labels
                .get_or_insert_default()
                .insert(DATAPLANE_MODE_LABEL.into(), "ambient".into());
        }
        assert_eq!(
            state(&pods, &ns, &svc, &slices, "worker")
                .enrolled
                .keys()
                .collect::<Vec<_>>(),
            ["demo/sleep"]
        );
        // A deleted pod is un-enrolled.
        pods.retain(|p| p.metadata.name.as_deref() != Some("sleep"));
        assert!(state(&pods, &ns, &svc, &slices, "worker")
            .enrolled
            .is_empty());
    }
}

#[cfg(test)]
mod telemetry_tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_deployments_pod_is_named_after_the_deployment() {
        let p = pod(serde_json::json!({
            "metadata": {
                "name": "web-7d4b9c-x2x9q",
                "labels": {"pod-template-hash": "7d4b9c", "app": "web", "version": "v2"},
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c",
                    "uid": "1", "controller": true
                }]
            }
        }));
        let t = pod_telemetry(&p, "web-7d4b9c-x2x9q");
        assert_eq!(t.workload_name.as_deref(), Some("web"));
        assert_eq!(t.workload_type.as_deref(), Some("deployment"));
        assert_eq!(t.canonical_name.as_deref(), Some("web"));
        assert_eq!(t.canonical_revision.as_deref(), Some("v2"));
    }

    #[test]
    fn istios_labels_win_and_a_bare_pod_is_its_own_workload() {
        let p = pod(serde_json::json!({
            "metadata": {
                "name": "tool",
                "labels": {
                    "app": "x",
                    "service.istio.io/canonical-name": "toolbox",
                    "service.istio.io/canonical-revision": "r1"
                }
            }
        }));
        let t = pod_telemetry(&p, "tool");
        assert_eq!(t.workload_name.as_deref(), Some("tool"));
        assert_eq!(t.workload_type.as_deref(), Some("pod"));
        assert_eq!(t.canonical_name.as_deref(), Some("toolbox"));
        assert_eq!(t.canonical_revision.as_deref(), Some("r1"));

        let bare = pod(serde_json::json!({"metadata": {"name": "solo"}}));
        let t = pod_telemetry(&bare, "solo");
        assert_eq!(t.canonical_name.as_deref(), Some("solo"));
        assert_eq!(t.canonical_revision.as_deref(), Some("latest"));
    }

    #[test]
    fn other_controllers_keep_their_kind_and_name() {
        let p = pod(serde_json::json!({
            "metadata": {
                "name": "db-0",
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db",
                    "uid": "2", "controller": true
                }]
            }
        }));
        let t = pod_telemetry(&p, "db-0");
        assert_eq!(t.workload_name.as_deref(), Some("db"));
        assert_eq!(t.workload_type.as_deref(), Some("statefulset"));
    }
}

/// Services and their EndpointSlices as Kubernetes defines them, on objects built here.
#[cfg(test)]
mod endpoint_tests {
    use std::path::PathBuf;

    use serde_json::{json, Value};

    use super::*;
    use crate::{
        agent::kubernetes::discovery::PodLocation,
        state::{MeshDestination, State},
    };

    struct EveryPod;
    impl PodLocator for EveryPod {
        fn locate(&self, uid: &str, _ips: &[IpAddr]) -> Option<PodLocation> {
            Some(PodLocation {
                netns: PathBuf::from(format!("/proc/{uid}/ns/net")),
                cgroup: PathBuf::from(format!("/kubepods/pod{uid}")),
            })
        }
    }

    /// Namespace `demo` is ambient, `plain` is not.
    #[derive(Default)]
    struct Cluster {
        pods: Vec<Pod>,
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
    }

    fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    /// A running pod `ns/name` on `node` at `ip`.
    fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
        json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
            "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": ip}
        })
    }

    /// An endpoint for pod `demo/name` on `node`, with these conditions.
    fn endpoint(ns: &str, name: &str, node: &str, ip: &str, conditions: Value) -> Value {
        json!({
            "addresses": [ip], "conditions": conditions, "nodeName": node,
            "targetRef": {"kind": "Pod", "name": name, "namespace": ns}
        })
    }

    impl Cluster {
        fn pod(&mut self, v: Value) -> &mut Self {
            self.pods.push(from(v));
            self
        }
        /// Service `ns/name` at `vip` with `ports`, plus `extra` spec fields.
        fn service(&mut self, ns: &str, name: &str, vip: &str, ports: Value, extra: Value) {
            let mut spec = json!({"clusterIP": vip, "clusterIPs": [vip], "ports": ports});
            spec.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            self.services.push(from(json!({
                "metadata": {"name": name, "namespace": ns}, "spec": spec
            })));
        }
        fn slice(&mut self, ns: &str, service: &str, endpoints: Value, ports: Value) {
            let n = self.slices.len();
            self.slices.push(from(json!({
                "addressType": "IPv4",
                "metadata": {
                    "name": format!("{service}-{n}"), "namespace": ns,
                    "labels": {"kubernetes.io/service-name": service}
                },
                "endpoints": endpoints, "ports": ports
            })));
        }
        fn config(&self, node: Option<&str>) -> LocalConfig {
            let namespaces: Vec<Namespace> = vec![
                from(
                    json!({"metadata": {"name": "demo", "labels": {DATAPLANE_MODE_LABEL: "ambient"}}}),
                ),
                from(json!({"metadata": {"name": "plain"}})),
            ];
            let view = ClusterView {
                pods: self.pods.iter().collect(),
                namespaces: namespaces.iter().collect(),
                services: self.services.iter().collect(),
                slices: self.slices.iter().collect(),
            };
            match node {
                Some(node) => build_config(&view, node, None, &EveryPod),
                None => build_mesh(&view, None),
            }
        }
        fn state(&self, node: &str) -> State {
            State::from_config(&self.config(Some(node)), node, "cluster.local").unwrap()
        }
    }

    /// Where a VIP's connections go (every endpoint the round robin visits), with how.
    fn upstreams(s: &State, vip: &str) -> Vec<String> {
        let vip = vip.parse().unwrap();
        let mut seen: Vec<String> = (0..8)
            .filter_map(|_| s.resolve(vip, None).ok())
            .map(|u| format!("{} {:?}", u.addr, u.protocol))
            .collect();
        seen.sort();
        seen.dedup();
        seen
    }

    /// A dual-stack pod (`status.podIPs`: one address per family) is one workload with both
    /// addresses, enrolled with both (each gets its inbound listener); a dual-stack service's
    /// VIPs (`spec.clusterIPs`) each lead to the endpoint's address of their own family.
    #[test]
    fn a_dual_stack_pod_and_service_have_both_families() {
        let mut c = Cluster::default();
        let mut web = pod("demo", "web", "worker", "10.244.1.7");
        web["status"]["podIPs"] = json!([{"ip": "10.244.1.7"}, {"ip": "fd00:10:244:1::7"}]);
        c.pod(web);
        c.service(
            "demo",
            "web",
            "10.96.0.10",
            json!([{"port": 80, "protocol": "TCP", "targetPort": 8080}]),
            json!({"clusterIPs": ["10.96.0.10", "fd00:96::10"], "ipFamilyPolicy": "PreferDualStack"}),
        );
        c.slice(
            "demo",
            "web",
            json!([endpoint(
                "demo",
                "web",
                "worker",
                "10.244.1.7",
                json!({"ready": true})
            )]),
            json!([{"port": 8080, "protocol": "TCP"}]),
        );
        let s = c.state("worker");
        let both: Vec<IpAddr> = ["10.244.1.7", "fd00:10:244:1::7"]
            .map(|ip| ip.parse().unwrap())
            .to_vec();
        assert_eq!(s.enrolled["demo/web"].ips, both);
        assert_eq!(s.workloads["demo/web"].ips, both);
        for ip in &both {
            assert!(s
                .mesh_destinations()
                .contains(&MeshDestination::Workload(*ip)));
        }
        assert_eq!(upstreams(&s, "10.96.0.10:80"), ["10.244.1.7:8080 Hbone"]);
        assert_eq!(
            upstreams(&s, "[fd00:96::10]:80"),
            ["[fd00:10:244:1::7]:8080 Hbone"]
        );
    }

    #[test]
    fn an_unnamed_port_goes_to_its_slices_target_port() {
        let mut c = Cluster::default();
        c.pod(pod("demo", "web", "worker", "10.244.1.7"));
        // One unnamed port; its slice port is named "". The target is named in the service
        // (a container port), so only the slice says the number.
        c.service(
            "demo",
            "web",
            "10.96.0.10",
            json!([{"port": 80, "protocol": "TCP", "targetPort": "http"}]),
            json!({}),
        );
        c.slice(
            "demo",
            "web",
            json!([endpoint(
                "demo",
                "web",
                "worker",
                "10.244.1.7",
                json!({"ready": true})
            )]),
            json!([{"name": "", "port": 8080, "protocol": "TCP"}]),
        );
        // A UDP port is no TCP destination; a service with only UDP ports is not captured.
        c.service(
            "demo",
            "dns",
            "10.96.0.53",
            json!([{"name": "dns", "port": 53, "protocol": "UDP"}]),
            json!({}),
        );
        c.slice(
            "demo",
            "dns",
            json!([endpoint("demo", "web", "worker", "10.244.1.7", json!({}))]),
            json!([{"name": "dns", "port": 5353, "protocol": "UDP"}]),
        );
        let s = c.state("worker");
        assert_eq!(upstreams(&s, "10.96.0.10:80"), ["10.244.1.7:8080 Hbone"]);
        assert!(!s
            .mesh_destinations()
            .contains(&MeshDestination::Service("10.96.0.53:53".parse().unwrap())));
    }

    /// Three pods behind `web` in the given endpoint conditions (a JSON object each).
    fn rollout(conditions: [Value; 3], deleting: Option<usize>) -> Cluster {
        let mut c = Cluster::default();
        let names = ["web-a", "web-b", "web-c"];
        let mut endpoints = Vec::new();
        for (i, (name, cond)) in names.iter().zip(conditions).enumerate() {
            let ip = format!("10.244.1.{}", 10 + i);
            let mut p = pod("demo", name, "worker", &ip);
            if deleting == Some(i) {
                p["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
            }
            c.pod(p);
            endpoints.push(endpoint("demo", name, "worker", &ip, cond));
        }
        c.service(
            "demo",
            "web",
            "10.96.0.10",
            json!([{"name": "http", "port": 80, "targetPort": 8080}]),
            json!({}),
        );
        c.slice(
            "demo",
            "web",
            Value::Array(endpoints),
            json!([{"name": "http", "port": 8080}]),
        );
        c
    }

    #[test]
    fn rollouts_go_to_ready_endpoints_then_to_serving_terminating_ones() {
        let terminating = json!({"ready": false, "serving": true, "terminating": true});
        let gone = json!({"ready": false, "serving": false, "terminating": true});
        let unready = json!({"ready": false});
        // web-a ready, web-b terminating but still serving, web-c with no conditions (ready).
        let s = rollout(
            [json!({"ready": true}), terminating.clone(), json!({})],
            None,
        )
        .state("worker");
        assert_eq!(
            upstreams(&s, "10.96.0.10:80"),
            ["10.244.1.10:8080 Hbone", "10.244.1.12:8080 Hbone"]
        );
        // No ready endpoint left: the serving terminating one takes the traffic, not the one
        // that is neither ready nor terminating (failing its probe).
        let s = rollout([gone.clone(), terminating.clone(), unready.clone()], None).state("worker");
        assert_eq!(upstreams(&s, "10.96.0.10:80"), ["10.244.1.11:8080 Hbone"]);
        // Nothing serving: the service is not captured (kube-proxy has nothing either).
        let s = rollout([gone, unready.clone(), unready], None).state("worker");
        assert!(!s
            .mesh_destinations()
            .contains(&MeshDestination::Service("10.96.0.10:80".parse().unwrap())));
        // A pod being deleted is terminating even while its slice still says ready.
        let ready = || json!({"ready": true});
        let s = rollout([ready(), ready(), ready()], Some(1)).state("worker");
        assert_eq!(
            upstreams(&s, "10.96.0.10:80"),
            ["10.244.1.10:8080 Hbone", "10.244.1.12:8080 Hbone"]
        );
        // The pod stays a workload: reached by its IP until it is gone.
        assert!(s.workload_by_ip("10.244.1.11".parse().unwrap()).is_some());
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
        let mut c = Cluster::default();
        c.pod(pod("demo", "web-1", "worker", "10.244.1.7")).pod(pod(
            "demo",
            "web-2",
            "worker2",
            "10.244.2.9",
        ));
        let endpoints = json!([
            endpoint(
                "demo",
                "web-1",
                "worker",
                "10.244.1.7",
                json!({"ready": true})
            ),
            endpoint(
                "demo",
                "web-2",
                "worker2",
                "10.244.2.9",
                json!({"ready": true})
            ),
        ]);
        for (name, vip, policy) in [
            ("local", "10.96.0.11", "Local"),
            ("cluster", "10.96.0.12", "Cluster"),
        ] {
            c.service(
                "demo",
                name,
                vip,
                json!([{"port": 80}]),
                json!({"internalTrafficPolicy": policy}),
            );
            c.slice("demo", name, endpoints.clone(), json!([{"port": 80}]));
        }
        let worker = c.state("worker");
        assert_eq!(upstreams(&worker, "10.96.0.11:80"), ["10.244.1.7:80 Hbone"]);
        assert_eq!(
            upstreams(&worker, "10.96.0.12:80"),
            ["10.244.1.7:80 Hbone", "10.244.2.9:80 Hbone"]
        );
        let worker2 = c.state("worker2");
        assert_eq!(
            upstreams(&worker2, "10.96.0.11:80"),
            ["10.244.2.9:80 Hbone"]
        );
        // A node with no endpoint of its own leaves the Local service to kube-proxy.
        let worker3 = c.state("worker3");
        assert!(upstreams(&worker3, "10.96.0.11:80").is_empty());
        assert_eq!(upstreams(&worker3, "10.96.0.12:80").len(), 2);
        // The mesh a control plane serves to every node keeps both.
        let mesh = State::from_config(&c.config(None), "worker3", "cluster.local").unwrap();
        assert_eq!(upstreams(&mesh, "10.96.0.11:80").len(), 2);
    }

    #[test]
    fn endpoints_outside_the_mesh_are_plain_tcp_workloads() {
        let mut c = Cluster::default();
        c.pod(pod("demo", "web", "worker", "10.244.1.7"))
            .pod(pod("plain", "legacy", "worker", "10.244.1.8"))
            .pod(pod("plain", "db", "worker2", "10.244.2.8"));
        let mut hostnet = pod("plain", "agent", "worker", "172.18.0.3");
        hostnet["spec"]["hostNetwork"] = json!(true);
        c.pod(hostnet);
        // A service in the mesh's namespace with a mesh and a non-mesh endpoint.
        c.service(
            "demo",
            "web",
            "10.96.0.10",
            json!([{"port": 80}]),
            json!({}),
        );
        c.slice(
            "demo",
            "web",
            json!([
                endpoint("demo", "web", "worker", "10.244.1.7", json!({})),
                endpoint("plain", "legacy", "worker", "10.244.1.8", json!({})),
            ]),
            json!([{"port": 80}]),
        );
        // A service with only non-mesh endpoints, and one backed only by a host-network pod.
        c.service(
            "plain",
            "db",
            "10.96.0.20",
            json!([{"port": 5432}]),
            json!({}),
        );
        c.slice(
            "plain",
            "db",
            json!([endpoint("plain", "db", "worker2", "10.244.2.8", json!({}))]),
            json!([{"port": 5432}]),
        );
        c.service(
            "plain",
            "agent",
            "10.96.0.30",
            json!([{"port": 9100}]),
            json!({}),
        );
        c.slice(
            "plain",
            "agent",
            json!([endpoint(
                "plain",
                "agent",
                "worker",
                "172.18.0.3",
                json!({})
            )]),
            json!([{"port": 9100}]),
        );
        let s = c.state("worker");
        assert_eq!(
            upstreams(&s, "10.96.0.10:80"),
            ["10.244.1.7:80 Hbone", "10.244.1.8:80 Tcp"]
        );
        assert_eq!(upstreams(&s, "10.96.0.20:5432"), ["10.244.2.8:5432 Tcp"]);
        // Not captured: the node's address is no workload's, the tunnel could not reach it.
        assert!(!s.mesh_destinations().contains(&MeshDestination::Service(
            "10.96.0.30:9100".parse().unwrap()
        )));
        assert!(s.workload_by_ip("172.18.0.3".parse().unwrap()).is_none());
        // Non-mesh pods on this node are never enrolled.
        assert_eq!(s.enrolled.keys().collect::<Vec<_>>(), ["demo/web"]);
    }

    #[test]
    fn headless_services_have_no_vip_and_their_pods_are_reached_by_ip() {
        let mut c = Cluster::default();
        c.pod(pod("demo", "db-0", "worker2", "10.244.2.5")).pod(pod(
            "plain",
            "cache-0",
            "worker2",
            "10.244.2.6",
        ));
        c.service("demo", "db", "None", json!([{"port": 5432}]), json!({}));
        c.slice(
            "demo",
            "db",
            json!([
                endpoint("demo", "db-0", "worker2", "10.244.2.5", json!({})),
                endpoint("plain", "cache-0", "worker2", "10.244.2.6", json!({})),
            ]),
            json!([{"port": 5432}]),
        );
        let config = c.config(Some("worker"));
        assert!(config.services.is_empty(), "{:?}", config.services);
        let s = State::from_config(&config, "worker", "cluster.local").unwrap();
        // Only the mesh pod's IP is a destination: no VIP, and no non-mesh pod behind it.
        assert_eq!(
            s.mesh_destinations().into_iter().collect::<Vec<_>>(),
            [MeshDestination::Workload("10.244.2.5".parse().unwrap())]
        );
        let up = s.resolve("10.244.2.5:5432".parse().unwrap(), None).unwrap();
        assert_eq!(
            (up.workload.key.as_str(), up.protocol),
            ("demo/db-0", Protocol::Hbone)
        );
        assert!(up.service.is_none());
    }

    #[test]
    fn sidecar_injected_pods_are_not_enrolled() {
        let mut c = Cluster::default();
        let mut annotated = pod("demo", "annotated", "worker", "10.244.1.20");
        annotated["metadata"]["annotations"] = json!({SIDECAR_STATUS_ANNOTATION: "{}"});
        let mut proxied = pod("demo", "proxied", "worker", "10.244.1.21");
        proxied["spec"]["containers"] = json!([{"name": "app"}, {"name": "istio-proxy"}]);
        c.pod(annotated)
            .pod(proxied)
            .pod(pod("demo", "ambient", "worker", "10.244.1.22"));
        c.service(
            "demo",
            "web",
            "10.96.0.10",
            json!([{"port": 80}]),
            json!({}),
        );
        c.slice(
            "demo",
            "web",
            json!([endpoint(
                "demo",
                "proxied",
                "worker",
                "10.244.1.21",
                json!({})
            )]),
            json!([{"port": 80}]),
        );
        let s = c.state("worker");
        assert_eq!(s.enrolled.keys().collect::<Vec<_>>(), ["demo/ambient"]);
        assert!(!s.workloads.contains_key("demo/annotated"));
        // Its sidecar takes plain TCP from the tunnel, as from any client outside the mesh.
        assert_eq!(upstreams(&s, "10.96.0.10:80"), ["10.244.1.21:80 Tcp"]);
    }
}
