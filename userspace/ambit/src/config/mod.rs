//! The file source's format: ztunnel's local config (`workloads`, `services`, `policies`, in
//! camelCase; as in `examples/localhost.yaml` of istio/ztunnel), plus one Ambit section, `ambit`,
//! that says where each local pod's netns and cgroup are and whether it is enrolled. ztunnel's
//! own fields that Ambit does not use yet are accepted and ignored, so a ztunnel file loads as is.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Istio L4 authorization policies (ztunnel's format), enforced at the destination.
    #[serde(default)]
    pub policies: Vec<crate::policy::Authorization>,
    /// The policies as written, for /config_dump.
    #[serde(skip)]
    pub policies_raw: Vec<serde_yaml::Value>,
    #[serde(default)]
    pub ambit: AmbitSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    /// SPIFFE trust domain; the node's (`--trust-domain`) when absent.
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub node: String,
    /// `"<namespace>/<name>"` of the WorkloadSelector-scoped policies that select this workload.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    /// `"<namespace>/<hostname>"` → service port → target port.
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// The waypoint that traffic addressed to this workload's IP goes through.
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    /// What telemetry calls this workload (ztunnel's fields of the same names).
    #[serde(flatten)]
    pub telemetry: WorkloadTelemetry,
    /// Built by this node from the Kubernetes API because istiod has not sent it yet (a pod
    /// just created: istiod learns it only once its sandbox has an address). Enough to capture
    /// the pod and give it its identity; not enough to authorize connections to it (istiod has
    /// not said which policies select it), so its inbound is refused until istiod's arrives.
    #[serde(skip)]
    pub provisional: bool,
}

impl Workload {
    /// `<namespace>/<name>`, as pods and the state name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A workload's names for metrics and baggage, as Istio gives them to ztunnel. Absent ones
/// are reported as `unknown` (metrics) or left out (baggage), as ztunnel does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadTelemetry {
    /// The owner a pod belongs to (e.g. its Deployment's name): the `*_workload` label.
    #[serde(default)]
    pub workload_name: Option<String>,
    /// `deployment`, `pod`, ...: the `k8s.<type>.name` key of the baggage.
    #[serde(default)]
    pub workload_type: Option<String>,
    /// `service.istio.io/canonical-name` (else the `app` label, else the workload name).
    #[serde(default)]
    pub canonical_name: Option<String>,
    /// `service.istio.io/canonical-revision` (else the `version` label, else `latest`).
    #[serde(default)]
    pub canonical_revision: Option<String>,
    #[serde(default)]
    pub cluster_id: Option<String>,
}

fn default_service_account() -> String {
    "default".into()
}

/// How a workload receives mesh traffic: HBONE (through its node's tunnel) or plain TCP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "HBONE")]
    Hbone,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// `"<network>/<ip>"`, as ztunnel writes them.
    #[serde(default)]
    pub vips: Vec<String>,
    /// Service port → target port.
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    /// Extra identities a server of this service may present (SPIFFE URIs).
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// The waypoint that traffic addressed to this service's VIPs goes through.
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
}

/// Where a waypoint is reached (ztunnel's `GatewayAddress`): a workload or service address, or
/// a service by `namespace/hostname`, and the port its HBONE (mutual TLS) listener is on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    #[serde(default = "default_hbone_port")]
    pub hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    ambit_abi::HBONE_PORT
}

/// A gateway's destination as ztunnel's local config writes it: `"<network>/<ip>"` (an
/// address) or `"<namespace>/<hostname>"` (a service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayDestination {
    Address(IpAddr),
    Hostname { namespace: String, hostname: String },
}

impl GatewayDestination {
    pub fn parse(text: &str) -> Result<Self> {
        let Some((prefix, rest)) = text.split_once('/') else {
            bail!("{text:?} is neither \"<network>/<ip>\" nor \"<namespace>/<hostname>\"");
        };
        if let Ok(ip) = rest.parse::<IpAddr>() {
            return Ok(Self::Address(ip));
        }
        if prefix.is_empty() || rest.is_empty() {
            bail!("{text:?}: a hostname needs its namespace (\"<namespace>/<hostname>\")");
        }
        Ok(Self::Hostname {
            namespace: prefix.to_owned(),
            hostname: rest.to_owned(),
        })
    }
}

impl std::fmt::Display for GatewayDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Address(ip) => write!(f, "/{ip}"),
            Self::Hostname {
                namespace,
                hostname,
            } => write!(f, "{namespace}/{hostname}"),
        }
    }
}

impl<'de> Deserialize<'de> for GatewayDestination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

/// Ambit's own section: the lab (or any file-driven node) says here where its pods live.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AmbitSection {
    #[serde(default)]
    pub pods: Vec<LocalPod>,
    /// Plaintext inbound to enrolled pods: `permissive` (accepted) or `strict` (refused).
    #[serde(default)]
    pub mtls_mode: MtlsMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPod {
    /// `"<namespace>/<name>"` of a workload; the workload's `node` says which node runs it.
    pub workload: String,
    /// The pod's network namespace, e.g. `/run/netns/<name>`.
    pub netns: PathBuf,
    /// The pod's cgroup, absolute or relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    /// As Istio's `istio.io/dataplane-mode` label: `ambient` enrolls, `none` opts out.
    #[serde(default)]
    pub dataplane_mode: DataplaneMode,
    /// Overrides `ambit.mtlsMode` for this pod.
    #[serde(default)]
    pub mtls_mode: Option<MtlsMode>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneMode {
    #[default]
    Ambient,
    None,
}

impl Service {
    /// The VIPs' IP addresses (the network prefix is dropped: Ambit has one network).
    pub fn vip_addrs(&self) -> Result<Vec<IpAddr>> {
        self.vips
            .iter()
            .map(|vip| {
                let ip = vip.rsplit_once('/').map_or(vip.as_str(), |(_, ip)| ip);
                ip.parse::<IpAddr>().with_context(|| {
                    format!(
                        "service {}/{}: vip {vip:?} is not \"<network>/<ip>\"",
                        self.namespace, self.name
                    )
                })
            })
            .collect()
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// A YAML error naming its source (a file) and, where known, line and column.
pub(crate) fn yaml_error(source: &str, e: serde_yaml::Error) -> anyhow::Error {
    let at = e
        .location()
        .map(|l| format!(":{}:{}", l.line(), l.column()))
        .unwrap_or_default();
    anyhow::anyhow!("{source}{at}: {e}")
}

impl LocalConfig {
    /// Parses and validates; errors name the source (file) and, for YAML errors, line and field.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let config = Self::parse_unchecked(text, source)?;
        config
            .validate()
            .with_context(|| format!("{source}: invalid config"))?;
        Ok(config)
    }

    /// Parses without the checks across entries (unique workload IPs, known pods, policies that
    /// compile): what the stand-in istiod serves, so that a test can push what a node must
    /// refuse.
    pub fn parse_unchecked(text: &str, source: &str) -> Result<Self> {
        let yaml_error = |e| yaml_error(source, e);
        let mut config: LocalConfig = serde_yaml::from_str(text).map_err(yaml_error)?;
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            policies: Vec<serde_yaml::Value>,
        }
        config.policies_raw = serde_yaml::from_str::<Raw>(text)
            .map_err(yaml_error)?
            .policies;
        Ok(config)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let mut ips = BTreeMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            if w.name.is_empty() || w.namespace.is_empty() {
                bail!("workloads[{i}]: name and namespace must not be empty");
            }
            for ip in &w.workload_ips {
                if let Some(other) = ips.insert(*ip, format!("{}/{}", w.namespace, w.name)) {
                    bail!(
                        "workloads[{i}] ({}/{}): workloadIps: {ip} is also the address of {other}",
                        w.namespace,
                        w.name
                    );
                }
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            s.vip_addrs().with_context(|| format!("services[{i}]"))?;
            for san in &s.subject_alt_names {
                crate::tls::Identity::parse(san)
                    .with_context(|| format!("services[{i}].subjectAltNames"))?;
            }
        }
        crate::policy::PolicySet::new(self.policies.clone()).context("policies")?;
        let mut seen = BTreeMap::new();
        for (i, pod) in self.ambit.pods.iter().enumerate() {
            let Some(w) = self.workload(&pod.workload) else {
                bail!(
                    "ambit.pods[{i}]: workload {:?} is not in workloads (expected \"<namespace>/<name>\")",
                    pod.workload
                );
            };
            if w.workload_ips.is_empty() {
                bail!(
                    "ambit.pods[{i}]: workload {:?} has no workloadIps",
                    pod.workload
                );
            }
            if seen.insert(pod.workload.clone(), i).is_some() {
                bail!(
                    "ambit.pods[{i}]: workload {:?} is listed twice",
                    pod.workload
                );
            }
        }
        Ok(())
    }

    pub fn workload(&self, namespaced_name: &str) -> Option<&Workload> {
        let (ns, name) = namespaced_name.split_once('/')?;
        self.workloads
            .iter()
            .find(|w| w.namespace == ns && w.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZTUNNEL_EXAMPLE: &str = include_str!("../../testdata/ztunnel-localhost.yaml");

    #[test]
    fn reads_ztunnels_own_example() {
        let config = LocalConfig::parse(ZTUNNEL_EXAMPLE, "example.yaml").unwrap();
        assert_eq!(config.workloads.len(), 2);
        assert_eq!(config.workloads[0].protocol, Protocol::Hbone);
        assert_eq!(config.workloads[1].protocol, Protocol::Tcp);
        assert_eq!(
            config.workloads[0].services["default/example.com"][&80],
            8080
        );
        assert_eq!(
            config.services[1].vip_addrs().unwrap(),
            vec!["127.10.0.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(config.policies.len(), 1);
    }

    #[test]
    fn a_yaml_error_names_file_line_and_field() {
        let bad = "workloads:\n- name: a\n  namespace: default\n  protocol: HBONEE\n";
        let err = format!("{:#}", LocalConfig::parse(bad, "lab.yaml").unwrap_err());
        assert!(err.starts_with("lab.yaml:4:"), "{err}");
        assert!(err.contains("HBONEE"), "{err}");
    }

    #[test]
    fn a_policy_typo_names_file_line_and_field() {
        let bad = "policies:\n- name: p\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - destinationPort: [80]\n";
        let err = format!("{:#}", LocalConfig::parse(bad, "lab.yaml").unwrap_err());
        assert!(err.starts_with("lab.yaml:7:"), "{err}");
        assert!(err.contains("destinationPort"), "{err}");
    }

    #[test]
    fn policies_are_typed_and_kept_as_written() {
        let config = LocalConfig::parse(ZTUNNEL_EXAMPLE, "example.yaml").unwrap();
        assert_eq!(config.policies[0].name, "deny-9999");
        assert_eq!(config.policies_raw.len(), 1);
    }

    #[test]
    fn a_pod_must_name_a_known_workload() {
        let bad = "workloads: []\nambit:\n  pods:\n  - workload: default/ghost\n    netns: /run/netns/x\n    cgroup: x\n";
        let err = format!("{:#}", LocalConfig::parse(bad, "lab.yaml").unwrap_err());
        assert!(
            err.contains("ambit.pods[0]") && err.contains("default/ghost"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_ambit_field_is_an_error() {
        let bad = "ambit:\n  pods:\n  - workload: default/a\n    netns: /x\n    cgroup: x\n    dataplaneMod: none\n";
        let err = format!("{:#}", LocalConfig::parse(bad, "lab.yaml").unwrap_err());
        assert!(err.contains("dataplaneMod"), "{err}");
    }

    #[test]
    fn waypoints_read_as_ztunnel_writes_them() {
        let text = r#"
workloads:
- {name: a, namespace: d, workloadIps: [10.0.0.1],
   waypoint: {destination: "/10.0.0.9", hboneMtlsPort: 15008}}
services:
- {name: web, namespace: d, hostname: web.d.svc, vips: ["/10.96.0.1"], ports: {80: 8080},
   waypoint: {destination: "d/waypoint.d.svc.cluster.local"}}
"#;
        let config = LocalConfig::parse(text, "lab.yaml").unwrap();
        assert_eq!(
            config.workloads[0].waypoint,
            Some(GatewayAddress {
                destination: GatewayDestination::Address("10.0.0.9".parse().unwrap()),
                hbone_mtls_port: 15008,
            })
        );
        let service_waypoint = config.services[0].waypoint.as_ref().unwrap();
        assert_eq!(
            service_waypoint.destination.to_string(),
            "d/waypoint.d.svc.cluster.local"
        );
        assert_eq!(service_waypoint.hbone_mtls_port, 15008);
        let bad = "workloads:\n- {name: a, namespace: d, waypoint: {destination: waypoint}}\n";
        let err = format!("{:#}", LocalConfig::parse(bad, "lab.yaml").unwrap_err());
        assert!(
            err.starts_with("lab.yaml:2:") && err.contains("waypoint"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_workload_ips_are_rejected() {
        let bad = "workloads:\n- {name: a, namespace: d, workloadIps: [10.0.0.1]}\n- {name: b, namespace: d, workloadIps: [10.0.0.1]}\n";
        let err = format!("{:#}", LocalConfig::parse(bad, "lab.yaml").unwrap_err());
        assert!(err.contains("10.0.0.1") && err.contains("d/a"), "{err}");
    }
}
