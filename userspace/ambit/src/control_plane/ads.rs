//! The stand-in istiod's delta xDS: `DeltaAggregatedResources`, wildcard subscriptions to
//! `istio.workload.Address` and `istio.security.Authorization`. Each stream gets every
//! resource of a type when it subscribes (minus what its `initial_resource_versions` already
//! hold), then only what changed, and the names of what was removed; ACKs and NACKs are
//! logged (a NACK with the client's error detail).

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::Resources;
use crate::xds::{
    ads::aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource},
};

pub fn server(resources: watch::Receiver<Arc<Resources>>) -> AggregatedDiscoveryServiceServer<Ads> {
    AggregatedDiscoveryServiceServer::new(Ads { resources })
}

pub struct Ads {
    resources: watch::Receiver<Arc<Resources>>,
}

type ResponseStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let (responses, rx) = mpsc::channel(16);
        let stream = Stream {
            requests: request.into_inner(),
            responses,
            resources: self.resources.clone(),
            sent: BTreeMap::new(),
            nonce: 0,
            node: peer,
        };
        tokio::spawn(stream.serve());
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One client's stream.
struct Stream {
    requests: Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    resources: watch::Receiver<Arc<Resources>>,
    /// Subscribed type URLs, and the version of each resource the client holds.
    sent: BTreeMap<String, BTreeMap<String, String>>,
    nonce: u64,
    /// The client's node id once it said it (its address until then), for logs.
    node: String,
}

impl Stream {
    async fn serve(mut self) {
        loop {
            tokio::select! {
                request = self.requests.message() => match request {
                    Ok(Some(request)) => {
                        if !self.on_request(request).await {
                            return;
                        }
                    }
                    Ok(None) => return debug!(node = %self.node, "xDS stream closed"),
                    Err(e) => return debug!(node = %self.node, error = %e, "xDS stream failed"),
                },
                changed = self.resources.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let types: Vec<String> = self.sent.keys().cloned().collect();
                    for type_url in types {
                        if !self.push(&type_url, false).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Handles one request; false once the client is gone.
    async fn on_request(&mut self, request: DeltaDiscoveryRequest) -> bool {
        if let Some(node) = &request.node {
            if !node.id.is_empty() && node.id != self.node {
                info!(node = %node.id, from = %self.node, "xDS client connected");
                self.node = node.id.clone();
            }
        }
        if !request.response_nonce.is_empty() {
            match &request.error_detail {
                Some(error) => warn!(
                    node = %self.node,
                    type_url = %request.type_url,
                    nonce = %request.response_nonce,
                    error = %error.message,
                    "NACK"
                ),
                None => {
                    debug!(node = %self.node, type_url = %request.type_url, nonce = %request.response_nonce, "ACK")
                }
            }
            return true;
        }
        // A new subscription (this stand-in serves every subscription as a wildcard).
        let held = request.initial_resource_versions.into_iter().collect();
        self.sent.insert(request.type_url.clone(), held);
        info!(node = %self.node, type_url = %request.type_url, "subscribed");
        self.push(&request.type_url, true).await
    }

    /// Sends what changed in `type_url` since the last push (everything the client does not
    /// hold yet); `always` sends even an empty response (a subscription is always answered).
    async fn push(&mut self, type_url: &str, always: bool) -> bool {
        let resources = self.resources.borrow_and_update().clone();
        let empty = BTreeMap::new();
        let current = resources.by_type.get(type_url).unwrap_or(&empty);
        let held = self.sent.entry(type_url.to_owned()).or_default();
        let changed: Vec<Resource> = current
            .iter()
            .filter(|(name, r)| held.get(*name) != Some(&r.version))
            .map(|(name, r)| Resource {
                name: name.clone(),
                version: r.version.clone(),
                resource: Some(r.resource.clone()),
                ..Default::default()
            })
            .collect();
        let removed: Vec<String> = held
            .keys()
            .filter(|name| !current.contains_key(*name))
            .cloned()
            .collect();
        if changed.is_empty() && removed.is_empty() && !always {
            return true;
        }
        for r in &changed {
            held.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            held.remove(name);
        }
        self.nonce += 1;
        info!(
            node = %self.node,
            type_url,
            version = %resources.version,
            changed = changed.len(),
            removed = removed.len(),
            "push"
        );
        let response = DeltaDiscoveryResponse {
            system_version_info: resources.version.clone(),
            resources: changed,
            type_url: type_url.to_owned(),
            removed_resources: removed,
            nonce: self.nonce.to_string(),
        };
        self.responses.send(Ok(response)).await.is_ok()
    }
}
