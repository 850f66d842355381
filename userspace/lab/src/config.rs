//! The config the lab writes for its nodes: Ambit's local config, which is ztunnel's local config
//! format (`workloads`, `services`, `policies`) plus Ambit's `ambit` section (where each pod's
//! netns and cgroup are, and whether it is enrolled). Only the fields the lab sets are here; the
//! format itself is Ambit's (`ambit::config`), which the lab cannot depend on.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Serialize;

use crate::{
    topology::{pod, WEB_VIP, WEB_VIP6},
    Lab,
};

/// What the lab's config says, beyond its fixed topology.
#[derive(Debug, Clone)]
pub struct LabConfig<'a> {
    pub enrolled: &'a [&'a str],
    /// `HBONE` or `TCP`, for the mesh workloads a and c.
    pub protocol: &'a str,
    /// `permissive` or `strict`.
    pub mtls_mode: &'a str,
    /// The `policies:` value (YAML, ztunnel's format), e.g. `[]`.
    pub policies: &'a str,
}

impl Default for LabConfig<'_> {
    fn default() -> Self {
        Self {
            enrolled: &["a", "c"],
            protocol: "HBONE",
            mtls_mode: "permissive",
            policies: "[]",
        }
    }
}

/// The comment every config the lab writes starts with (serde writes no comments).
const HEADER: &str = "# Ambit lab: ztunnel's local config format, plus Ambit's `ambit` section.\n";

/// The mesh config's second line, for whoever edits it while the lab runs (`cargo xtask lab`).
const EDIT_HINT: &str = "# Edit and save: the nodes apply it without restarting (a bad edit is \
                         reported and ignored).\n";

/// The lab's `web` service: port 80 of its VIPs (one of each family), served by pod c's 8080.
const WEB_HOSTNAME: &str = "web.default.svc.cluster.local";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalConfig<'a> {
    workloads: Vec<Workload<'a>>,
    services: Vec<Service>,
    policies: serde_yaml::Value,
    /// Last: ztunnel refuses it, and `without_ambit_section` cuts from it to the end.
    ambit: AmbitSection<'a>,
}

/// Each workload's `node` is its last field but `services`: readers of the workloads-only
/// config (the benchmark's ztunnel config) add fields after that line.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Workload<'a> {
    uid: String,
    name: &'a str,
    namespace: &'a str,
    workload_name: &'a str,
    service_account: &'a str,
    /// IPv4, then IPv6.
    workload_ips: [&'static str; 2],
    protocol: &'a str,
    node: String,
    /// Service key (`<namespace>/<hostname>`) → service port → target port.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    services: BTreeMap<String, Ports>,
}

#[derive(Serialize)]
struct Service {
    name: &'static str,
    namespace: &'static str,
    hostname: &'static str,
    vips: Vec<String>,
    ports: Ports,
}

/// Service port → target port.
type Ports = BTreeMap<u16, u16>;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AmbitSection<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    mtls_mode: Option<&'a str>,
    pods: Vec<LocalPod>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalPod {
    workload: String,
    netns: PathBuf,
    /// Relative to the cgroup2 root.
    cgroup: String,
    dataplane_mode: &'static str,
}

impl Lab {
    /// The lab's desired state in ztunnel's local config format: pods a and c are mesh
    /// workloads speaking HBONE, b and d are outside the mesh. `enrolled` lists the pods whose
    /// `dataplaneMode` is `ambient`; the other mesh pods are listed as `none`.
    pub fn config_yaml(&self, enrolled: &[&str]) -> String {
        self.config_yaml_with(&LabConfig {
            enrolled,
            ..LabConfig::default()
        })
    }

    /// The same with every option of `LabConfig`: a is the client `sleep`, c the server `web`
    /// behind the service VIPs `WEB_VIP` and `WEB_VIP6`.
    pub fn config_yaml_with(&self, options: &LabConfig<'_>) -> String {
        let mut c = self.workload("c", "web", options.protocol);
        let web_ports = Ports::from([(80, 8080)]);
        c.services = BTreeMap::from([(format!("default/{WEB_HOSTNAME}"), web_ports.clone())]);
        let mode = |pod| {
            if options.enrolled.contains(&pod) {
                "ambient"
            } else {
                "none"
            }
        };
        let config = LocalConfig {
            workloads: vec![self.workload("a", "sleep", options.protocol), c],
            services: vec![Service {
                name: "web",
                namespace: "default",
                hostname: WEB_HOSTNAME,
                vips: vec![format!("/{WEB_VIP}"), format!("/{WEB_VIP6}")],
                ports: web_ports,
            }],
            policies: serde_yaml::from_str(options.policies)
                .expect("LabConfig::policies is not YAML"),
            ambit: AmbitSection {
                mtls_mode: Some(options.mtls_mode),
                pods: vec![
                    self.local_pod("a", mode("a")),
                    self.local_pod("c", mode("c")),
                ],
            },
        };
        format!("{HEADER}{EDIT_HINT}{}", to_yaml(&config))
    }

    /// A config in which exactly `pods` are mesh workloads (HBONE, service account = pod name),
    /// all of them enrolled, with no services and no policies: e.g. the benchmark's same-node
    /// pair a and b, which `config_yaml` cannot express.
    pub fn config_yaml_workloads(&self, pods: &[&str]) -> String {
        let config = LocalConfig {
            workloads: pods.iter().map(|&p| self.workload(p, p, "HBONE")).collect(),
            services: Vec::new(),
            policies: serde_yaml::Value::Sequence(Vec::new()),
            ambit: AmbitSection {
                mtls_mode: None,
                pods: pods.iter().map(|p| self.local_pod(p, "ambient")).collect(),
            },
        };
        format!("{HEADER}{}", to_yaml(&config))
    }

    fn workload<'a>(
        &self,
        name: &'a str,
        service_account: &'a str,
        protocol: &'a str,
    ) -> Workload<'a> {
        let spec = pod(name);
        Workload {
            uid: format!("lab//v1/Pod/default/{name}"),
            name,
            namespace: "default",
            workload_name: name,
            service_account,
            workload_ips: [spec.ip, spec.ip6],
            protocol,
            node: self.node_name(spec.node),
            services: BTreeMap::new(),
        }
    }

    fn local_pod(&self, name: &str, dataplane_mode: &'static str) -> LocalPod {
        LocalPod {
            workload: format!("default/{name}"),
            netns: self.netns_path(name),
            cgroup: self.pod_cgroup_rel(name),
            dataplane_mode,
        }
    }
}

fn to_yaml(config: &LocalConfig<'_>) -> String {
    serde_yaml::to_string(config).expect("the lab's config serializes")
}

#[cfg(test)]
mod tests {
    use std::mem::ManuallyDrop;

    use super::*;

    /// A lab that only names things: dropping it would sweep its prefix on this machine.
    fn lab() -> ManuallyDrop<Lab> {
        ManuallyDrop::new(Lab::unbuilt(
            "ambit-u",
            "/sys/fs/cgroup".into(),
            "/sys/fs/bpf".into(),
        ))
    }

    const POLICIES: &str = r#"
- name: only-sleep
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [!Exact cluster.local/ns/default/sa/sleep]
- name: deny-8080
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - destinationPorts: [8080]
"#;

    /// `written` means what the hand-written reference text `expected` means, as YAML.
    fn assert_same_yaml(written: &str, expected: &str) {
        let parse = |text| serde_yaml::from_str::<serde_yaml::Value>(text).unwrap();
        assert_eq!(parse(written), parse(expected), "written:\n{written}");
    }

    #[test]
    fn the_mesh_config_means_the_reference() {
        let lab = lab();
        assert_same_yaml(
            &lab.config_yaml(&["a", "c"]),
            include_str!("../testdata/mesh.yaml"),
        );
        let options = LabConfig {
            enrolled: &["c"],
            protocol: "TCP",
            mtls_mode: "strict",
            policies: POLICIES,
        };
        assert_same_yaml(
            &lab.config_yaml_with(&options),
            include_str!("../testdata/mesh-tcp-strict.yaml"),
        );
    }

    #[test]
    fn the_workloads_config_means_the_reference() {
        assert_same_yaml(
            &lab().config_yaml_workloads(&["a", "b", "c"]),
            include_str!("../testdata/workloads.yaml"),
        );
    }

    /// Text that readers edit: the tests replace `protocol: HBONE`, a pod's netns path and
    /// `policies: []`; the benchmark adds fields after each workload's `node:` line, the last
    /// of a workloads-only config; `without_ambit_section` cuts at `ambit:`.
    #[test]
    fn the_lines_that_readers_edit_are_there() {
        let lab = lab();
        let mesh = lab.config_yaml(&["a", "c"]);
        assert!(mesh.starts_with(HEADER), "{mesh}");
        assert!(mesh.contains("\n  protocol: HBONE\n"), "{mesh}");
        assert!(
            mesh.contains("\n    netns: /run/netns/ambit-u-a\n"),
            "{mesh}"
        );
        let workloads = lab.config_yaml_workloads(&["a", "b"]);
        assert!(workloads.contains("\npolicies: []\n"), "{workloads}");
        let after_node = |next: &str| format!("\n  node: ambit-u-n1\n{next}");
        assert!(workloads.contains(&after_node("- uid: ")), "{workloads}");
        assert!(
            workloads.contains(&after_node("services: []")),
            "{workloads}"
        );
        let cut = crate::without_ambit_section(&workloads);
        assert!(cut.ends_with("policies: []\n"), "{cut}");
    }
}
