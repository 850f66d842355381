//! istiod's resources and Ambit's config, both ways. The xDS client turns the `Address` and
//! `Authorization` resources it holds into the same [`LocalConfig`] a file gives (so every
//! source feeds one `State`); the stand-in istiod turns a config file into resources. A
//! resource that does not convert is rejected with an error naming it and its field, so that
//! the client can NACK it and keep the last good state.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::proto::{
    security,
    workload::{self, address, gateway_address},
};
use crate::{
    config::{
        GatewayAddress, GatewayDestination, LocalConfig, Protocol, Service, Workload,
        WorkloadTelemetry,
    },
    policy::{Action, Authorization, Cidr, RbacMatch, Scope, ServiceAccountMatch, StringMatch},
};

/// The network name Ambit writes (it has one network); istiod's default network is empty.
const DEFAULT_NETWORK: &str = "";

// --- from istiod --------------------------------------------------------------------------

/// What an `Address` resource holds, converted.
#[derive(Debug, Clone)]
pub enum MeshAddress {
    Workload(Workload),
    Service(Service),
}

/// Converts one `Address` resource named `name`.
pub fn mesh_address(name: &str, resource: &workload::Address) -> Result<MeshAddress> {
    let converted = match &resource.r#type {
        Some(address::Type::Workload(w)) => workload_from(w).map(MeshAddress::Workload),
        Some(address::Type::Service(s)) => service_from(s).map(MeshAddress::Service),
        None => Err(anyhow!("neither a workload nor a service")),
    };
    converted.with_context(|| format!("Address {name:?}"))
}

fn workload_from(w: &workload::Workload) -> Result<Workload> {
    if w.name.is_empty() || w.namespace.is_empty() {
        bail!("workload: name and namespace must not be empty");
    }
    let workload_ips = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, bytes)| ip_from(bytes).with_context(|| format!("workload.addresses[{i}]")))
        .collect::<Result<_>>()?;
    let protocol = match workload::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(workload::TunnelProtocol::Hbone) => Protocol::Hbone,
        Ok(workload::TunnelProtocol::None) => Protocol::Tcp,
        Err(_) => bail!(
            "workload.tunnelProtocol: unknown value {}",
            w.tunnel_protocol
        ),
    };
    let mut services = BTreeMap::new();
    for (key, ports) in &w.services {
        let ports = ports
            .ports
            .iter()
            .map(|p| port_pair(p).with_context(|| format!("workload.services[{key:?}]")))
            .collect::<Result<BTreeMap<_, _>>>()?;
        services.insert(key.clone(), ports);
    }
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let workload_type = workload::WorkloadType::try_from(w.workload_type)
        .map(|t| match t {
            workload::WorkloadType::Deployment => "deployment",
            workload::WorkloadType::Cronjob => "cronjob",
            workload::WorkloadType::Pod => "pod",
            workload::WorkloadType::Job => "job",
        })
        .unwrap_or("pod");
    Ok(Workload {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: non_empty(&w.service_account).unwrap_or_else(|| "default".into()),
        workload_ips,
        protocol,
        trust_domain: non_empty(&w.trust_domain),
        node: w.node.clone(),
        authorization_policies: w.authorization_policies.clone(),
        services,
        waypoint: w
            .waypoint
            .as_ref()
            .map(|g| gateway_from(g).context("workload.waypoint"))
            .transpose()?,
        telemetry: WorkloadTelemetry {
            workload_name: non_empty(&w.workload_name),
            workload_type: Some(workload_type.to_owned()),
            canonical_name: non_empty(&w.canonical_name),
            canonical_revision: non_empty(&w.canonical_revision),
            cluster_id: non_empty(&w.cluster_id),
        },
        provisional: false,
    })
}

fn service_from(s: &workload::Service) -> Result<Service> {
    if s.name.is_empty() || s.namespace.is_empty() || s.hostname.is_empty() {
        bail!("service: name, namespace and hostname must not be empty");
    }
    let vips = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let ip = ip_from(&a.address).with_context(|| format!("service.addresses[{i}]"))?;
            Ok(format!("{}/{ip}", a.network))
        })
        .collect::<Result<_>>()?;
    let ports = s
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| port_pair(p).with_context(|| format!("service.ports[{i}]")))
        .collect::<Result<_>>()?;
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        ports,
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s
            .waypoint
            .as_ref()
            .map(|g| gateway_from(g).context("service.waypoint"))
            .transpose()?,
    })
}

fn gateway_from(g: &workload::GatewayAddress) -> Result<GatewayAddress> {
    let destination = match &g.destination {
        Some(gateway_address::Destination::Address(a)) => {
            GatewayDestination::Address(ip_from(&a.address).context("address")?)
        }
        Some(gateway_address::Destination::Hostname(h)) => {
            if h.namespace.is_empty() || h.hostname.is_empty() {
                bail!("hostname: namespace and hostname must not be empty");
            }
            GatewayDestination::Hostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
            }
        }
        None => bail!("destination: neither an address nor a hostname"),
    };
    let hbone_mtls_port = match g.hbone_mtls_port {
        0 => ambit_abi::HBONE_PORT,
        p => u16::try_from(p).map_err(|_| anyhow!("hboneMtlsPort: {p} is not a port"))?,
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port,
    })
}

fn gateway_to(g: &GatewayAddress) -> workload::GatewayAddress {
    let destination = match &g.destination {
        GatewayDestination::Address(ip) => {
            gateway_address::Destination::Address(workload::NetworkAddress {
                network: DEFAULT_NETWORK.into(),
                address: ip_bytes(ip),
            })
        }
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => gateway_address::Destination::Hostname(workload::NamespacedHostname {
            namespace: namespace.clone(),
            hostname: hostname.clone(),
        }),
    };
    workload::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: g.hbone_mtls_port.into(),
    }
}

/// Converts one `Authorization` resource named `name`.
pub fn authorization(name: &str, a: &security::Authorization) -> Result<Authorization> {
    authorization_from(a).with_context(|| format!("Authorization {name:?}"))
}

fn authorization_from(a: &security::Authorization) -> Result<Authorization> {
    let scope = match security::Scope::try_from(a.scope) {
        Ok(security::Scope::Global) => Scope::Global,
        Ok(security::Scope::Namespace) => Scope::Namespace,
        Ok(security::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => bail!("scope: unknown value {}", a.scope),
    };
    let action = match security::Action::try_from(a.action) {
        Ok(security::Action::Allow) => Action::Allow,
        Ok(security::Action::Deny) => Action::Deny,
        Err(_) => bail!("action: unknown value {}", a.action),
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for (r, rule) in a.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.iter().enumerate() {
            let matches = clause
                .matches
                .iter()
                .enumerate()
                .map(|(m, one)| {
                    rbac_match_from(one)
                        .with_context(|| format!("rules[{r}].clauses[{c}].matches[{m}]"))
                })
                .collect::<Result<_>>()?;
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    Ok(Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    })
}

fn rbac_match_from(m: &security::Match) -> Result<RbacMatch> {
    let strings = |v: &[security::StringMatch], field: &str| -> Result<Vec<StringMatch>> {
        v.iter()
            .enumerate()
            .map(|(i, s)| string_match_from(s).with_context(|| format!("{field}[{i}]")))
            .collect()
    };
    let cidrs = |v: &[security::Address], field: &str| -> Result<Vec<Cidr>> {
        v.iter()
            .enumerate()
            .map(|(i, a)| cidr_from(a).with_context(|| format!("{field}[{i}]")))
            .collect()
    };
    let ports = |v: &[u32], field: &str| -> Result<Vec<u16>> {
        v.iter()
            .map(|p| u16::try_from(*p).map_err(|_| anyhow!("{field}: {p} is not a port")))
            .collect()
    };
    let accounts = |v: &[security::ServiceAccountMatch]| {
        v.iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    Ok(RbacMatch {
        namespaces: strings(&m.namespaces, "namespaces")?,
        not_namespaces: strings(&m.not_namespaces, "notNamespaces")?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings(&m.principals, "principals")?,
        not_principals: strings(&m.not_principals, "notPrincipals")?,
        source_ips: cidrs(&m.source_ips, "sourceIps")?,
        not_source_ips: cidrs(&m.not_source_ips, "notSourceIps")?,
        destination_ips: cidrs(&m.destination_ips, "destinationIps")?,
        not_destination_ips: cidrs(&m.not_destination_ips, "notDestinationIps")?,
        destination_ports: ports(&m.destination_ports, "destinationPorts")?,
        not_destination_ports: ports(&m.not_destination_ports, "notDestinationPorts")?,
    })
}

fn cidr_from(a: &security::Address) -> Result<Cidr> {
    let length = u8::try_from(a.length).map_err(|_| anyhow!("length {}", a.length))?;
    Cidr::new(ip_from(&a.address)?, length)
}

fn string_match_from(s: &security::StringMatch) -> Result<StringMatch> {
    use security::string_match::MatchType;
    Ok(match &s.match_type {
        Some(MatchType::Exact(v)) => StringMatch::Exact(v.clone()),
        Some(MatchType::Prefix(v)) => StringMatch::Prefix(v.clone()),
        Some(MatchType::Suffix(v)) => StringMatch::Suffix(v.clone()),
        Some(MatchType::Presence(())) => StringMatch::Presence(),
        None => bail!("no match type"),
    })
}

fn ip_from(bytes: &[u8]) -> Result<IpAddr> {
    match bytes.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes)?))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes)?))),
        n => bail!("{n} bytes is not an IPv4 (4) or IPv6 (16) address"),
    }
}

fn port_pair(p: &workload::Port) -> Result<(u16, u16)> {
    let port = |n: u32| u16::try_from(n).map_err(|_| anyhow!("{n} is not a port"));
    let service_port = port(p.service_port)?;
    // istiod sends 0 when the target port is the service port.
    let target_port = match p.target_port {
        0 => service_port,
        n => port(n)?,
    };
    Ok((service_port, target_port))
}

/// Everything the client holds, as the config a file would give (without the `ambit` section,
/// which says where this node's pods are and does not come from istiod).
pub fn local_config<'a>(
    addresses: impl IntoIterator<Item = &'a MeshAddress>,
    policies: impl IntoIterator<Item = &'a Authorization>,
) -> LocalConfig {
    let mut config = LocalConfig::default();
    for address in addresses {
        match address {
            MeshAddress::Workload(w) => config.workloads.push(w.clone()),
            MeshAddress::Service(s) => config.services.push(s.clone()),
        }
    }
    config.policies = policies.into_iter().cloned().collect();
    config.policies_raw = config
        .policies
        .iter()
        .filter_map(|p| serde_yaml::to_value(p).ok())
        .collect();
    config
}

// --- to istiod's form (the stand-in istiod) -----------------------------------------------

/// The resource name istiod gives a workload: `<cluster>//Pod/<namespace>/<name>`.
pub fn workload_uid(w: &Workload) -> String {
    let cluster = w.telemetry.cluster_id.as_deref().unwrap_or("Kubernetes");
    format!("{cluster}//Pod/{}/{}", w.namespace, w.name)
}

/// The workloads and services of `config` as `Address` resources, by resource name (a
/// workload's uid, a service's `namespace/hostname`).
pub fn addresses(config: &LocalConfig) -> Result<BTreeMap<String, workload::Address>> {
    let mut out = BTreeMap::new();
    for w in &config.workloads {
        let resource = workload::Address {
            r#type: Some(address::Type::Workload(workload_to(w))),
        };
        out.insert(workload_uid(w), resource);
    }
    for s in &config.services {
        let resource = workload::Address {
            r#type: Some(address::Type::Service(service_to(s)?)),
        };
        out.insert(s.key(), resource);
    }
    Ok(out)
}

fn workload_to(w: &Workload) -> workload::Workload {
    let t = &w.telemetry;
    let workload_type = match t.workload_type.as_deref() {
        Some("deployment") => workload::WorkloadType::Deployment,
        Some("cronjob") => workload::WorkloadType::Cronjob,
        Some("job") => workload::WorkloadType::Job,
        _ => workload::WorkloadType::Pod,
    };
    workload::Workload {
        uid: workload_uid(w),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.workload_ips.iter().map(ip_bytes).collect(),
        network: DEFAULT_NETWORK.into(),
        tunnel_protocol: match w.protocol {
            Protocol::Hbone => workload::TunnelProtocol::Hbone,
            Protocol::Tcp => workload::TunnelProtocol::None,
        } as i32,
        trust_domain: w.trust_domain.clone().unwrap_or_default(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        canonical_name: t.canonical_name.clone().unwrap_or_default(),
        canonical_revision: t.canonical_revision.clone().unwrap_or_default(),
        workload_type: workload_type as i32,
        workload_name: t.workload_name.clone().unwrap_or_default(),
        services: w
            .services
            .iter()
            .map(|(key, ports)| {
                let ports = ports
                    .iter()
                    .map(|(&service_port, &target_port)| workload::Port {
                        service_port: service_port.into(),
                        target_port: target_port.into(),
                    })
                    .collect();
                (key.clone(), workload::PortList { ports })
            })
            .collect(),
        authorization_policies: w.authorization_policies.clone(),
        waypoint: w.waypoint.as_ref().map(gateway_to),
        cluster_id: t.cluster_id.clone().unwrap_or_else(|| "Kubernetes".into()),
        ..Default::default()
    }
}

fn service_to(s: &Service) -> Result<workload::Service> {
    let addresses = s
        .vips
        .iter()
        .map(|vip| {
            let (network, ip) = vip.rsplit_once('/').unwrap_or(("", vip));
            let ip: IpAddr = ip
                .parse()
                .with_context(|| format!("service {}: vip {vip:?}", s.key()))?;
            Ok(workload::NetworkAddress {
                network: network.to_owned(),
                address: ip_bytes(&ip),
            })
        })
        .collect::<Result<_>>()?;
    Ok(workload::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses,
        ports: s
            .ports
            .iter()
            .map(|(&service_port, &target_port)| workload::Port {
                service_port: service_port.into(),
                target_port: target_port.into(),
            })
            .collect(),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(gateway_to),
        ..Default::default()
    })
}

/// The policies of `config` as `Authorization` resources, by `namespace/name`.
pub fn authorizations(config: &LocalConfig) -> BTreeMap<String, security::Authorization> {
    config
        .policies
        .iter()
        .map(|p| (p.key(), authorization_to(p)))
        .collect()
}

fn authorization_to(a: &Authorization) -> security::Authorization {
    let rules = a
        .rules
        .iter()
        .map(|clauses| security::Rule {
            clauses: clauses
                .iter()
                .map(|matches| security::Clause {
                    matches: matches.iter().map(rbac_match_to).collect(),
                })
                .collect(),
        })
        .collect();
    security::Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope: match a.scope {
            Scope::Global => security::Scope::Global,
            Scope::Namespace => security::Scope::Namespace,
            Scope::WorkloadSelector => security::Scope::WorkloadSelector,
        } as i32,
        action: match a.action {
            Action::Allow => security::Action::Allow,
            Action::Deny => security::Action::Deny,
        } as i32,
        rules,
        dry_run: a.dry_run,
        extensions: Vec::new(),
    }
}

fn rbac_match_to(m: &RbacMatch) -> security::Match {
    let strings = |v: &[StringMatch]| v.iter().map(string_match_to).collect();
    let cidrs = |v: &[Cidr]| {
        v.iter()
            .map(|c| security::Address {
                address: ip_bytes(&c.addr()),
                length: c.prefix_len().into(),
            })
            .collect()
    };
    let accounts = |v: &[ServiceAccountMatch]| {
        v.iter()
            .map(|s| security::ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    let ports = |v: &[u16]| v.iter().map(|&p| p.into()).collect();
    security::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: cidrs(&m.source_ips),
        not_source_ips: cidrs(&m.not_source_ips),
        destination_ips: cidrs(&m.destination_ips),
        not_destination_ips: cidrs(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        extensions: Vec::new(),
    }
}

fn string_match_to(s: &StringMatch) -> security::StringMatch {
    use security::string_match::MatchType;
    let match_type = match s {
        StringMatch::Exact(v) => MatchType::Exact(v.clone()),
        StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
        StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
        StringMatch::Presence() => MatchType::Presence(()),
    };
    security::StringMatch {
        match_type: Some(match_type),
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = include_str!("../../testdata/ztunnel-localhost.yaml");

    #[test]
    fn a_config_survives_the_trip_through_istiods_resources() {
        let config = LocalConfig::parse(CONFIG, "example.yaml").unwrap();
        let addresses = addresses(&config).unwrap();
        let policies = authorizations(&config);
        let back: Vec<MeshAddress> = addresses
            .iter()
            .map(|(name, a)| mesh_address(name, a).unwrap())
            .collect();
        let back_policies: Vec<Authorization> = policies
            .iter()
            .map(|(name, a)| authorization(name, a).unwrap())
            .collect();
        let round = local_config(&back, &back_policies);
        let by_key = |ws: &[Workload]| -> BTreeMap<String, String> {
            ws.iter()
                .map(|w| {
                    let mut w = w.clone();
                    // The telemetry default istiod fills in is not in the file.
                    w.telemetry.workload_type = None;
                    w.telemetry.cluster_id = None;
                    (format!("{}/{}", w.namespace, w.name), format!("{w:?}"))
                })
                .collect()
        };
        assert_eq!(by_key(&round.workloads), by_key(&config.workloads));
        let services = |ss: &[Service]| -> BTreeMap<String, String> {
            ss.iter().map(|s| (s.key(), format!("{s:?}"))).collect()
        };
        assert_eq!(services(&round.services), services(&config.services));
        assert_eq!(round.policies, config.policies);
    }

    #[test]
    fn waypoints_survive_the_trip_both_ways() {
        let text = r#"
workloads:
- {name: a, namespace: d, workloadIps: [10.0.0.1],
   waypoint: {destination: "/10.0.0.9", hboneMtlsPort: 15008}}
services:
- {name: web, namespace: d, hostname: web.d.svc, vips: ["/10.96.0.1"], ports: {80: 8080},
   waypoint: {destination: "d/waypoint.d.svc.cluster.local", hboneMtlsPort: 15009}}
"#;
        let config = LocalConfig::parse(text, "lab.yaml").unwrap();
        let back: Vec<MeshAddress> = addresses(&config)
            .unwrap()
            .iter()
            .map(|(name, a)| mesh_address(name, a).unwrap())
            .collect();
        let round = local_config(&back, &[]);
        assert_eq!(round.workloads[0].waypoint, config.workloads[0].waypoint);
        assert_eq!(round.services[0].waypoint, config.services[0].waypoint);
    }

    #[test]
    fn a_bad_address_is_named_with_its_field() {
        let resource = workload::Address {
            r#type: Some(address::Type::Workload(workload::Workload {
                name: "a".into(),
                namespace: "default".into(),
                addresses: vec![vec![10, 0, 0]],
                ..Default::default()
            })),
        };
        let err = format!(
            "{:#}",
            mesh_address("K//Pod/default/a", &resource).unwrap_err()
        );
        assert!(err.contains("K//Pod/default/a"), "{err}");
        assert!(err.contains("workload.addresses[0]"), "{err}");
        assert!(err.contains("3 bytes"), "{err}");
    }

    #[test]
    fn a_bad_policy_is_named_with_its_field() {
        let policy = security::Authorization {
            name: "p".into(),
            namespace: "default".into(),
            rules: vec![security::Rule {
                clauses: vec![security::Clause {
                    matches: vec![security::Match {
                        destination_ports: vec![70000],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        let err = format!("{:#}", authorization("default/p", &policy).unwrap_err());
        assert!(err.contains("default/p"), "{err}");
        assert!(err.contains("rules[0].clauses[0].matches[0]"), "{err}");
        assert!(err.contains("70000"), "{err}");
    }
}
