//! The delta xDS client: one gRPC stream to istiod (`DeltaAggregatedResources`), wildcard
//! subscriptions to workloads and services (`istio.workload.Address`) and authorization
//! policies (`istio.security.Authorization`), as ztunnel subscribes.
//!
//! Every response is converted and checked whole before anything of it applies: a response
//! with one bad resource is NACKed (the error detail names the resource and the field) and
//! the last good state stays in force; a good one is ACKed and applies, removals included.
//! When the stream breaks, the client reconnects with backoff and resumes with the versions
//! it holds (`initial_resource_versions`), keeping its state meanwhile.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use prost::Message as _;
use prost_types::{value::Kind, Struct, Value};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use super::{
    ads::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    convert::{self, MeshAddress},
    proto::{
        discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status},
        security, workload, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL,
    },
};
use crate::{config::LocalConfig, policy::Authorization};

/// gRPC's INVALID_ARGUMENT, the code of a NACK's error detail.
const INVALID_ARGUMENT: i32 = 3;
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// How to reach istiod, and who this node is to it.
#[derive(Debug, Clone)]
pub struct XdsSettings {
    /// `https://host:port` (istiod: `https://istiod.istio-system.svc:15012`).
    pub address: String,
    /// The root certificate istiod's serving certificate chains to (PEM).
    pub root_cert: PathBuf,
    /// A file holding the bearer token sent with every call (a projected service account token
    /// with audience `istio-ca`), re-read at each connection; none: no token.
    pub token: Option<PathBuf>,
    /// This node's name (`NODE_NAME` in the node metadata).
    pub node_name: String,
    /// The agent's own pod, namespace and IP, when known (the node id istiod logs).
    pub pod_name: String,
    pub pod_namespace: String,
    pub instance_ip: String,
    /// `CLUSTER_ID`.
    pub cluster_id: String,
}

impl XdsSettings {
    /// The node istiod sees: a ztunnel-type proxy id and the metadata ztunnel sends.
    fn node(&self) -> Node {
        let string = |s: &str| Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        let fields = [
            ("NODE_NAME", &self.node_name),
            ("NAME", &self.pod_name),
            ("NAMESPACE", &self.pod_namespace),
            ("INSTANCE_IPS", &self.instance_ip),
            ("CLUSTER_ID", &self.cluster_id),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), string(v)))
        .collect();
        Node {
            id: format!(
                "ztunnel~{}~{}.{}~{}.svc.cluster.local",
                self.instance_ip, self.pod_name, self.pod_namespace, self.pod_namespace
            ),
            metadata: Some(Struct { fields }),
            ..Default::default()
        }
    }
}

/// A TLS channel to `address`, verified against `root_cert`.
pub async fn channel(address: &str, root_cert: &std::path::Path) -> Result<Channel> {
    let pem = std::fs::read(root_cert)
        .with_context(|| format!("reading istiod's root certificate {}", root_cert.display()))?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
    let endpoint = Endpoint::from_shared(address.to_owned())
        .with_context(|| format!("istiod address {address:?}"))?
        .tls_config(tls)
        .with_context(|| format!("TLS to {address}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {address}"))
}

/// `authorization: Bearer <token>` from `file`, if any.
pub fn bearer(
    file: Option<&std::path::Path>,
) -> Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>> {
    let Some(file) = file else { return Ok(None) };
    let token = std::fs::read_to_string(file)
        .with_context(|| format!("reading the token {}", file.display()))?;
    let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
        anyhow!(
            "the token in {} is not a valid header value",
            file.display()
        )
    })?;
    Ok(Some(value))
}

/// What the client holds: every accepted resource, by type and name, with its version.
#[derive(Debug, Clone, Default)]
struct Held {
    addresses: BTreeMap<String, (String, MeshAddress)>,
    policies: BTreeMap<String, (String, Authorization)>,
    /// The types whose first response has arrived (the state is complete once both have).
    synced: std::collections::BTreeSet<String>,
}

impl Held {
    fn versions(&self, type_url: &str) -> std::collections::HashMap<String, String> {
        match type_url {
            ADDRESS_TYPE_URL => self
                .addresses
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
            _ => self
                .policies
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
        }
    }

    /// `response` applied to a copy of what is held, if every resource in it converts and the
    /// result is a valid config.
    fn with(&self, response: &DeltaDiscoveryResponse) -> Result<Held> {
        let mut next = self.clone();
        match response.type_url.as_str() {
            ADDRESS_TYPE_URL => {
                for r in &response.resources {
                    let any = r
                        .resource
                        .as_ref()
                        .ok_or_else(|| anyhow!("Address {:?}: the resource is missing", r.name))?;
                    let address = workload::Address::decode(any.value.as_slice())
                        .with_context(|| format!("Address {:?}: does not decode", r.name))?;
                    let converted = convert::mesh_address(&r.name, &address)?;
                    next.addresses
                        .insert(r.name.clone(), (r.version.clone(), converted));
                }
                for name in &response.removed_resources {
                    next.addresses.remove(name);
                }
            }
            AUTHORIZATION_TYPE_URL => {
                for r in &response.resources {
                    let any = r.resource.as_ref().ok_or_else(|| {
                        anyhow!("Authorization {:?}: the resource is missing", r.name)
                    })?;
                    let policy = security::Authorization::decode(any.value.as_slice())
                        .with_context(|| format!("Authorization {:?}: does not decode", r.name))?;
                    let converted = convert::authorization(&r.name, &policy)?;
                    next.policies
                        .insert(r.name.clone(), (r.version.clone(), converted));
                }
                for name in &response.removed_resources {
                    next.policies.remove(name);
                }
            }
            other => bail!("unexpected type {other:?} (subscribed to Address and Authorization)"),
        }
        next.synced.insert(response.type_url.clone());
        next.config().validate()?;
        Ok(next)
    }

    fn config(&self) -> LocalConfig {
        convert::local_config(
            self.addresses.values().map(|(_, a)| a),
            self.policies.values().map(|(_, p)| p),
        )
    }

    fn complete(&self) -> bool {
        self.synced.contains(ADDRESS_TYPE_URL) && self.synced.contains(AUTHORIZATION_TYPE_URL)
    }
}

/// Runs the client until `configs` has no receiver: each accepted state of the mesh is sent
/// as a config (once both types have arrived), across reconnections.
pub async fn run(settings: XdsSettings, configs: watch::Sender<Option<Arc<LocalConfig>>>) {
    let mut held = Held::default();
    let mut backoff = BACKOFF_FIRST;
    loop {
        match stream(&settings, &mut held, &configs).await {
            Ok(true) => backoff = BACKOFF_FIRST,
            Ok(false) => {}
            Err(e) => warn!(
                address = %settings.address,
                retry_in = ?backoff,
                "xDS: {e:#}; the last state stays in force"
            ),
        }
        if configs.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One stream's life. Ok(true) if it carried at least one response.
async fn stream(
    settings: &XdsSettings,
    held: &mut Held,
    configs: &watch::Sender<Option<Arc<LocalConfig>>>,
) -> Result<bool> {
    let channel = channel(&settings.address, &settings.root_cert).await?;
    let token = bearer(settings.token.as_deref())?;
    let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            if let Some(token) = &token {
                request
                    .metadata_mut()
                    .insert("authorization", token.clone());
            }
            Ok(request)
        },
    );
    let (requests, rx) = mpsc::channel(8);
    let node = settings.node();
    for type_url in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
        let subscribe = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.to_owned(),
            initial_resource_versions: held.versions(type_url),
            ..Default::default()
        };
        requests.send(subscribe).await?;
    }
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .context("opening the delta xDS stream")?
        .into_inner();
    info!(address = %settings.address, "xDS stream open");
    let mut carried = false;
    while let Some(response) = responses.message().await.context("delta xDS stream")? {
        carried = true;
        let mut reply = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        match held.with(&response) {
            Ok(next) => {
                debug!(
                    type_url = %response.type_url,
                    changed = response.resources.len(),
                    removed = response.removed_resources.len(),
                    "xDS: accepted"
                );
                *held = next;
                if held.complete() {
                    configs.send_replace(Some(Arc::new(held.config())));
                }
            }
            Err(e) => {
                let message = format!("{e:#}");
                warn!(type_url = %response.type_url, nonce = %response.nonce, error = %message, "xDS: rejected (NACK); the last good state stays in force");
                reply.error_detail = Some(Status {
                    code: INVALID_ARGUMENT,
                    message,
                    details: Vec::new(),
                });
            }
        }
        if requests.send(reply).await.is_err() {
            break;
        }
    }
    Ok(carried)
}
