//! Kubernetes objects → Ambit's desired state, as Istio ambient reads them:
//!
//! - a pod is in the mesh when its namespace or the pod itself is labelled
//!   `istio.io/dataplane-mode=ambient`, unless the pod says `none`, uses the host network, or is
//!   not running with an IP; its identity comes from its service account; it speaks HBONE;
//! - a Service's cluster IPs and ports become VIPs when at least one of its endpoints (from its
//!   EndpointSlices) is a mesh pod, with each endpoint's target port;
//! - the mesh pods on this node are enrolled, at the netns and cgroup the locator finds.
//!
//! The result is the same `LocalConfig` the file source reads, so both sources share every
//! rule after this point.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};

use super::discovery::PodLocator;
use crate::config::{
    AmbitSection, LocalConfig, LocalPod, Protocol, Service as ConfigService, Workload,
    WorkloadTelemetry,
};

pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    wants_capture(pod, ambient_namespaces, own_pod) && running && !pod_ips(pod).is_empty()
}

/// Whether a pod is one Ambit captures once it runs: ambient by its namespace or its own label
/// (and not opted out), not on the host network, not the agent itself.
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
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let is_self = own_pod.is_some_and(|own| {
        meta.name.as_deref() == own.split_once('/').map(|(_, n)| n)
            && meta.namespace.as_deref() == own.split_once('/').map(|(ns, _)| ns)
    });
    (namespace_ambient || label == Some("ambient"))
        && label != Some("none")
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

/// Builds the desired state of node `node`. `own_pod` (`ns/name`) is the agent itself.
pub fn build_config(
    view: &ClusterView<'_>,
    node: &str,
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

    // Mesh pods → workloads, keyed by namespace/name.
    let mut workloads: BTreeMap<(String, String), (Workload, Option<String>)> = BTreeMap::new();
    for pod in view.pods.iter().filter(|p| {
        in_mesh(p, &ambient_namespaces, own_pod)
            || (wants_capture(p, &ambient_namespaces, own_pod) && sandbox_ips(p).is_some())
    }) {
        let (Some(ns), Some(name)) = (pod.metadata.namespace.clone(), pod.metadata.name.clone())
        else {
            continue;
        };
        let spec = pod.spec.as_ref();
        let workload = Workload {
            name: name.clone(),
            namespace: ns.clone(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            workload_ips: Some(pod_ips(pod))
                .filter(|ips| !ips.is_empty())
                .or_else(|| sandbox_ips(pod))
                .unwrap_or_default(),
            protocol: Protocol::Hbone,
            trust_domain: None,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            authorization_policies: Vec::new(),
            services: BTreeMap::new(),
            waypoint: None,
            telemetry: pod_telemetry(pod, &name),
        };
        workloads.insert((ns, name), (workload, pod.metadata.uid.clone()));
    }

    // Services with mesh endpoints.
    let mut services = Vec::new();
    for svc in &view.services {
        let (Some(ns), Some(name)) = (svc.metadata.namespace.clone(), svc.metadata.name.clone())
        else {
            continue;
        };
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let vips: Vec<String> = spec
            .cluster_ips
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|ip| ip.parse::<IpAddr>().is_ok())
            .map(|ip| format!("/{ip}"))
            .collect();
        if vips.is_empty() {
            continue; // headless or ExternalName: no VIP to capture
        }
        let hostname = format!("{name}.{ns}.svc.cluster.local");
        let key = format!("{ns}/{hostname}");
        let svc_ports = spec.ports.clone().unwrap_or_default();
        let mut has_mesh_endpoint = false;
        for slice in view.slices.iter().filter(|s| {
            s.metadata.namespace.as_deref() == Some(ns.as_str())
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    == Some(&name)
        }) {
            let slice_ports = slice.ports.clone().unwrap_or_default();
            for endpoint in &slice.endpoints {
                let Some(target) = endpoint.target_ref.as_ref() else {
                    continue;
                };
                if target.kind.as_deref() != Some("Pod") {
                    continue;
                }
                let pod_key = (ns.clone(), target.name.clone().unwrap_or_default());
                let Some((workload, _)) = workloads.get_mut(&pod_key) else {
                    continue;
                };
                has_mesh_endpoint = true;
                let ports = workload.services.entry(key.clone()).or_default();
                for sp in &svc_ports {
                    // The slice's port with the service port's name is the endpoint's target.
                    let target = slice_ports
                        .iter()
                        .find(|p| p.name == sp.name)
                        .and_then(|p| p.port)
                        .unwrap_or(sp.port);
                    ports.insert(sp.port as u16, target as u16);
                }
            }
        }
        if !has_mesh_endpoint {
            continue;
        }
        services.push(ConfigService {
            name,
            namespace: ns,
            hostname,
            vips,
            ports: svc_ports
                .iter()
                .map(|p| {
                    let target = match &p.target_port {
                        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) => {
                            *t
                        }
                        _ => p.port,
                    };
                    (p.port as u16, target as u16)
                })
                .collect(),
            subject_alt_names: Vec::new(),
            waypoint: None,
        });
    }

    // This node's mesh pods, where the locator finds them.
    let mut pods = Vec::new();
    for ((ns, name), (workload, uid)) in &workloads {
        if workload.node != node {
            continue;
        }
        let Some(location) = uid.as_deref().and_then(|uid| locator.locate(uid)) else {
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
        fn locate(&self, uid: &str) -> Option<PodLocation> {
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
        assert!(!s.workloads.contains_key("default/plain"));
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
        // A service whose endpoints are all outside the mesh is not captured.
        assert!(s.resolve("10.96.100.20:80".parse().unwrap(), None).is_err());
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
