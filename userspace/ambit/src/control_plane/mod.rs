//! `ambit control-plane`: a small stand-in for istiod, for labs and tests and for meshes
//! without Istio. It serves what istiod serves a node proxy, on one TLS port (15012 by
//! default): the delta xDS stream of workloads, services and authorization policies
//! ([`ads`]), read from a config file in ztunnel's local-config format and pushed again when
//! the file changes, and the certificate service ([`ca`]), which signs workload CSRs with an
//! Istio plug-in CA. It is trusted because Istio's own ztunnel accepts it (the interop tests
//! run ztunnel against it).
//!
//! What it does not do: authenticate callers beyond requiring a bearer token (istiod checks
//! the token with the Kubernetes TokenReview API and only signs identities of pods on the
//! caller's node), scope pushes per node, or speak state-of-the-world xDS.

pub mod ads;
pub mod ca;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType};
use tokio::sync::watch;
use tracing::{error, info};

use crate::{
    agent::kubernetes::{
        discovery::{PodLocation, PodLocator},
        KubernetesSource,
    },
    config::LocalConfig,
    tls::PluginCa,
    xds::convert,
};

/// The name a node proxy reaches istiod by; the stand-in's serving certificate carries it.
pub const ISTIOD_HOSTNAME: &str = "istiod.istio-system.svc";

#[derive(clap::Args)]
pub struct ControlPlaneArgs {
    /// ztunnel-format local config file (workloads, services, policies), watched; its `ambit`
    /// section, if any, is ignored.
    #[arg(long, required_unless_present = "kubernetes")]
    pub config: Option<PathBuf>,
    /// Serve the mesh the Kubernetes API describes instead (in-cluster config or KUBECONFIG):
    /// the pods of ambient namespaces and their Services, read as `ambit node --source
    /// kubernetes` reads them. No policies: the stand-in does not read AuthorizationPolicies.
    #[arg(long, conflicts_with = "config")]
    pub kubernetes: bool,
    /// The mesh CA, in Istio's plug-in CA layout (`ambit ca init` makes one).
    #[arg(long)]
    pub ca_dir: PathBuf,
    #[arg(long, default_value = crate::tls::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Where to serve xDS and the CA (TLS, HTTP/2).
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Extra names and IP addresses for the serving certificate, besides
    /// `istiod.istio-system.svc` and the listen address.
    #[arg(long, value_delimiter = ',')]
    pub serving_names: Vec<String>,
    /// Longest certificate lifetime it signs (a CSR asking for more gets this).
    #[arg(long, default_value = "24h", value_parser = crate::node::parse_duration)]
    pub max_cert_lifetime: Duration,
}

/// Where the mesh it serves comes from.
pub enum Mesh {
    File(PathBuf),
    /// A connected source (its node name unused: the control plane enrolls nothing).
    Kubernetes(Box<KubernetesSource>),
}

/// Serves until the process is stopped.
pub async fn run(args: ControlPlaneArgs) -> Result<()> {
    let mesh = match &args.config {
        Some(path) => Mesh::File(path.clone()),
        None => {
            let mut k8s = KubernetesSource::new("", &args.trust_domain, None, Arc::new(NoPods));
            k8s.connect(Duration::from_secs(60)).await?;
            Mesh::Kubernetes(Box::new(k8s))
        }
    };
    serve(args, mesh).await
}

/// Serves `mesh` until the process is stopped.
pub async fn serve(args: ControlPlaneArgs, mesh: Mesh) -> Result<()> {
    let ca = Arc::new(PluginCa::load(&args.ca_dir, &args.trust_domain)?);
    let (source, resources) = match mesh {
        Mesh::File(path) => {
            let first = read_resources(&path)?;
            let (tx, rx) = watch::channel(Arc::new(first));
            let source = path.display().to_string();
            tokio::spawn(watch_config(path, tx));
            (source, rx)
        }
        Mesh::Kubernetes(k8s) => {
            let first = kubernetes_resources(&k8s)?;
            let (tx, rx) = watch::channel(Arc::new(first));
            tokio::spawn(watch_kubernetes(k8s, tx));
            ("the Kubernetes API".to_owned(), rx)
        }
    };

    let (cert_pem, key_pem) = serving_certificate(&args, &ca)?;
    let identity = tonic::transport::Identity::from_pem(cert_pem, key_pem);
    let tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    info!(listen = %args.listen, mesh = %source, "control plane serving xDS and the CA");
    tonic::transport::Server::builder()
        .tls_config(tls)
        .context("the serving certificate")?
        .add_service(ads::server(resources))
        .add_service(ca::server(ca, args.max_cert_lifetime))
        .serve(args.listen)
        .await
        .with_context(|| format!("serving on {}", args.listen))
}

/// The resources of one version of the config file, by type URL and name.
#[derive(Debug, Default)]
pub struct Resources {
    pub by_type: BTreeMap<&'static str, BTreeMap<String, Versioned>>,
    /// The config file's version (a hash of its text), for logs and `system_version_info`.
    pub version: String,
}

/// One encoded resource and its version: a hash of its encoding, so that a push after a
/// config change carries only the resources that changed.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub version: String,
    pub resource: prost_types::Any,
}

impl Versioned {
    fn new(resource: prost_types::Any) -> Versioned {
        Versioned {
            version: format!("{:016x}", fnv1a(&resource.value)),
            resource,
        }
    }
}

fn read_resources(path: &Path) -> Result<Resources> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config = LocalConfig::parse_unchecked(&text, &path.display().to_string())?;
    resources_of(&config, format!("{:016x}", fnv1a(text.as_bytes())))
}

/// The mesh the Kubernetes API describes, as resources; its version a hash of the mesh.
fn kubernetes_resources(k8s: &KubernetesSource) -> Result<Resources> {
    let config = k8s.mesh()?;
    let version = format!(
        "{:016x}",
        fnv1a(format!("{:?}", (&config.workloads, &config.services)).as_bytes())
    );
    resources_of(&config, version)
}

/// Rebuilds the resources when an API object changed; pushes them when the mesh did.
async fn watch_kubernetes(k8s: Box<KubernetesSource>, resources: watch::Sender<Arc<Resources>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if !k8s.take_changed() {
            continue;
        }
        match kubernetes_resources(&k8s) {
            Ok(new) if new.version != resources.borrow().version => {
                info!(version = %new.version, "the cluster's mesh changed; pushing");
                resources.send_replace(Arc::new(new));
            }
            Ok(_) => {}
            Err(e) => error!("the cluster's mesh: {e:#}"),
        }
    }
}

/// Locates no pod: the control plane enrolls nothing.
struct NoPods;
impl PodLocator for NoPods {
    fn locate(&self, _uid: &str, _ips: &[std::net::IpAddr]) -> Option<PodLocation> {
        None
    }
}

fn resources_of(config: &LocalConfig, version: String) -> Result<Resources> {
    use crate::xds::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
    let mut by_type = std::collections::BTreeMap::new();
    let addresses = convert::addresses(config)?
        .into_iter()
        .map(|(name, a)| Ok((name, Versioned::new(prost_types::Any::from_msg(&a)?))))
        .collect::<Result<_>>()?;
    let policies = convert::authorizations(config)
        .into_iter()
        .map(|(name, a)| Ok((name, Versioned::new(prost_types::Any::from_msg(&a)?))))
        .collect::<Result<_>>()?;
    by_type.insert(ADDRESS_TYPE_URL, addresses);
    by_type.insert(AUTHORIZATION_TYPE_URL, policies);
    Ok(Resources { by_type, version })
}

/// FNV-1a: a stable (across runs and builds) 64-bit hash for versions.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Re-reads the config file when it changes; a bad edit is logged and the last good
/// resources stay served.
async fn watch_config(path: PathBuf, resources: watch::Sender<Arc<Resources>>) {
    let mut last = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    loop {
        tick.tick().await;
        let now = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if now == last {
            continue;
        }
        last = now;
        match read_resources(&path) {
            Ok(new) if new.version != resources.borrow().version => {
                info!(version = %new.version, "config changed; pushing");
                resources.send_replace(Arc::new(new));
            }
            Ok(_) => {}
            Err(e) => error!("config rejected, the last good config stays served: {e:#}"),
        }
    }
}

/// A serving certificate signed by the mesh CA for istiod's name, the listen address and
/// `--serving-names`: what a node proxy verifies against its `XDS_ROOT_CA`/`CA_ROOT_CA`.
fn serving_certificate(args: &ControlPlaneArgs, ca: &PluginCa) -> Result<(String, String)> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, ISTIOD_HOSTNAME);
    let mut names = vec![ISTIOD_HOSTNAME.to_owned()];
    if !args.listen.ip().is_unspecified() {
        names.push(args.listen.ip().to_string());
    }
    names.extend(args.serving_names.iter().cloned());
    for name in names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                name.clone()
                    .try_into()
                    .with_context(|| format!("--serving-names: {name:?}"))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().context("generating the serving key")?;
    let chain = ca.sign_server_cert(params, &key)?;
    Ok((chain, key.serialize_pem()))
}
