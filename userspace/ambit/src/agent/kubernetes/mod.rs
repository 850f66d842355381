//! The Kubernetes source of desired state (`ambit node --source kubernetes`): watches of Pods,
//! Namespaces, Services and EndpointSlices (read-only RBAC), turned into a `State` by `model`,
//! with each local pod's netns and cgroup found by `discovery`. Without istiod the whole
//! cluster's pods are watched: remote workloads' identities come from them. With istiod
//! (`--source xds`, [`KubernetesSource::local_pods_only`]) only this node's pods and the
//! namespaces are watched: the mesh comes from istiod.
//!
//! Watches reconnect with backoff on their own; while the API server is away the last state stays
//! in force, so pods already enrolled keep their data path.

pub mod discovery;
pub mod model;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{reflector, watcher, WatchStreamExt as _},
    Api, Client, Resource,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::source::StateSource;
use crate::{config::LocalConfig, state::State};
use discovery::PodLocator;
use model::{build_config, ClusterView};

/// Writes back `ambient.istio.io/redirection: enabled` on pods the agent captures (and removes
/// it when it stops capturing them), as Istio's CNI agent does: istiod only treats a pod as
/// reachable over HBONE when it is there. As istio-cni, it patches through the `status`
/// subresource, so it needs `patch` on `pods/status` only (the optional ClusterRole
/// `ambit-annotate`), not on pods' specs; without it the agent logs that once and captures
/// exactly as before.
#[derive(Clone)]
pub struct Annotator {
    client: Client,
    forbidden: Arc<AtomicBool>,
}

pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

impl Annotator {
    /// Marks `pod` (`namespace/name`) captured or not, in the background.
    pub fn mark(&self, pod: &str, captured: bool) {
        if self.forbidden.load(Ordering::Acquire) {
            return;
        }
        let Some((ns, name)) = pod.split_once('/') else {
            return;
        };
        let (ns, name) = (ns.to_owned(), name.to_owned());
        let this = self.clone();
        tokio::spawn(async move {
            let api: Api<Pod> = Api::namespaced(this.client.clone(), &ns);
            let value = if captured {
                serde_json::json!("enabled")
            } else {
                serde_json::Value::Null
            };
            let patch =
                serde_json::json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
            let params = kube::api::PatchParams::default();
            match api
                .patch_status(&name, &params, &kube::api::Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    if !this.forbidden.swap(true, Ordering::AcqRel) {
                        warn!("no permission to patch pods/status (ClusterRole ambit-annotate absent): capture works, the redirection annotation is not written back");
                    }
                }
                Err(e) => warn!(pod = %format!("{ns}/{name}"), "annotating the pod failed: {e}"),
            }
        });
    }
}

pub struct KubernetesSource {
    node: String,
    scope: Scope,
    trust_domain: String,
    /// `namespace/name` of the agent's own pod (never enrolled).
    own_pod: Option<String>,
    locator: Arc<dyn PodLocator>,
    stores: Option<Stores>,
    client: Option<Client>,
}

/// What the source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Every pod, namespace, service and EndpointSlice: the whole mesh.
    Cluster,
    /// This node's pods (field selector `spec.nodeName`) and the namespaces' labels.
    LocalPods,
}

struct Stores {
    pods: reflector::Store<Pod>,
    namespaces: reflector::Store<Namespace>,
    /// None when only local pods are watched.
    services: Option<reflector::Store<Service>>,
    slices: Option<reflector::Store<EndpointSlice>>,
    changed: Arc<AtomicBool>,
}

/// The stores' contents at one moment.
struct Snapshot {
    pods: Vec<Arc<Pod>>,
    namespaces: Vec<Arc<Namespace>>,
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
}

impl Stores {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            pods: self.pods.state(),
            namespaces: self.namespaces.state(),
            services: self
                .services
                .as_ref()
                .map(|s| s.state())
                .unwrap_or_default(),
            slices: self.slices.as_ref().map(|s| s.state()).unwrap_or_default(),
        }
    }
}

impl Snapshot {
    fn view(&self) -> ClusterView<'_> {
        ClusterView {
            pods: self.pods.iter().map(|p| p.as_ref()).collect(),
            namespaces: self.namespaces.iter().map(|n| n.as_ref()).collect(),
            services: self.services.iter().map(|s| s.as_ref()).collect(),
            slices: self.slices.iter().map(|s| s.as_ref()).collect(),
        }
    }
}

impl KubernetesSource {
    /// The whole cluster's mesh, and node `node`'s pods (`--source kubernetes`, the stand-in
    /// istiod).
    pub fn new(
        node: &str,
        trust_domain: &str,
        own_pod: Option<String>,
        locator: Arc<dyn PodLocator>,
    ) -> Self {
        Self::with_scope(Scope::Cluster, node, trust_domain, own_pod, locator)
    }

    /// Node `node`'s pods only, for [`Self::local_pods`] (`--source xds`, where istiod sends
    /// the mesh): pods are watched with the field selector `spec.nodeName=<node>`, Services and
    /// EndpointSlices not at all. It has no mesh: [`Self::mesh`] and `initial` fail.
    pub fn local_pods_only(
        node: &str,
        trust_domain: &str,
        own_pod: Option<String>,
        locator: Arc<dyn PodLocator>,
    ) -> Self {
        Self::with_scope(Scope::LocalPods, node, trust_domain, own_pod, locator)
    }

    fn with_scope(
        scope: Scope,
        node: &str,
        trust_domain: &str,
        own_pod: Option<String>,
        locator: Arc<dyn PodLocator>,
    ) -> Self {
        Self {
            node: node.to_owned(),
            scope,
            trust_domain: trust_domain.to_owned(),
            own_pod,
            locator,
            stores: None,
            client: None,
        }
    }

    /// The pod annotator, once connected.
    pub fn annotator(&self) -> Option<Annotator> {
        Some(Annotator {
            client: self.client.clone()?,
            forbidden: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Connects with the in-cluster config (or KUBECONFIG), starts the watches and waits (up to
    /// `timeout`) for their first complete lists.
    pub async fn connect(&mut self, timeout: Duration) -> Result<()> {
        crate::tls::install_default_provider();
        let client = Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
        self.connect_with(client, timeout).await
    }

    /// The same with a given client.
    pub async fn connect_with(&mut self, client: Client, timeout: Duration) -> Result<()> {
        let local = self.scope == Scope::LocalPods;
        if local && self.node.is_empty() {
            bail!("watching a node's pods needs the node's name (--node)");
        }
        self.client = Some(client.clone());
        let changed = Arc::new(AtomicBool::new(true));
        let pod_selector = local.then(|| format!("spec.nodeName={}", self.node));
        let pods = watch(
            Api::<Pod>::all(client.clone()),
            pod_selector.as_deref(),
            changed.clone(),
        );
        let namespaces = watch(Api::<Namespace>::all(client.clone()), None, changed.clone());
        let (services, slices) = if local {
            (None, None)
        } else {
            (
                Some(watch(
                    Api::<Service>::all(client.clone()),
                    None,
                    changed.clone(),
                )),
                Some(watch(
                    Api::<EndpointSlice>::all(client),
                    None,
                    changed.clone(),
                )),
            )
        };
        let ready = async {
            pods.wait_until_ready().await?;
            namespaces.wait_until_ready().await?;
            if let (Some(services), Some(slices)) = (&services, &slices) {
                services.wait_until_ready().await?;
                slices.wait_until_ready().await?;
            }
            Ok::<_, reflector::store::WriterDropped>(())
        };
        let watched = if local {
            format!(
                "this node's Pods (spec.nodeName={}) and Namespaces",
                self.node
            )
        } else {
            "Pods, Namespaces, Services and EndpointSlices".to_owned()
        };
        tokio::time::timeout(timeout, ready)
            .await
            .with_context(|| format!("the Kubernetes API did not list {watched} in time"))?
            .context("waiting for the first lists")?;
        info!(node = %self.node, "watching {watched}");
        self.stores = Some(Stores {
            pods,
            namespaces,
            services,
            slices,
            changed,
        });
        Ok(())
    }

    fn build(&self) -> Result<Arc<State>> {
        self.require_cluster()?;
        Ok(Arc::new(State::from_config(
            &self.config()?,
            &self.node,
            &self.trust_domain,
        )?))
    }

    /// This node's mesh pods and where they are (the `ambit` section of the config the API's
    /// objects make), with the workloads the API describes for them: what `--source xds`
    /// enrolls in a cluster, with the mesh from istiod.
    pub fn local_pods(&self) -> Result<LocalConfig> {
        self.config()
    }

    /// The mesh the API's objects make (workloads and services, no local pods): what the
    /// stand-in istiod serves with `--kubernetes`.
    pub fn mesh(&self) -> Result<LocalConfig> {
        self.require_cluster()?;
        let stores = self.stores.as_ref().context("not connected")?;
        Ok(model::build_mesh(
            &stores.snapshot().view(),
            self.own_pod.as_deref(),
        ))
    }

    fn require_cluster(&self) -> Result<()> {
        if self.scope == Scope::LocalPods {
            bail!(
                "this Kubernetes source watches only node {}'s pods: it has no mesh",
                self.node
            );
        }
        Ok(())
    }

    /// What the CNI plugin's requests need of the API's view: whether a pod is one to capture,
    /// and a way to have the desired state rebuilt at once. None until connected.
    pub fn pod_directory(&self) -> Option<PodDirectory> {
        let stores = self.stores.as_ref()?;
        Some(PodDirectory {
            pods: stores.pods.clone(),
            namespaces: stores.namespaces.clone(),
            own_pod: self.own_pod.clone(),
            changed: stores.changed.clone(),
        })
    }

    /// Whether an object changed since the last call (and so `local_pods` may have).
    pub fn take_changed(&self) -> bool {
        self.stores
            .as_ref()
            .is_some_and(|s| s.changed.swap(false, Ordering::AcqRel))
    }

    fn config(&self) -> Result<LocalConfig> {
        let stores = self.stores.as_ref().context("not connected")?;
        let snapshot = stores.snapshot();
        Ok(build_config(
            &snapshot.view(),
            &self.node,
            self.own_pod.as_deref(),
            self.locator.as_ref(),
        ))
    }
}

/// The API's pods and namespaces as the agent sees them, for the CNI plugin's requests.
#[derive(Clone)]
pub struct PodDirectory {
    pods: reflector::Store<Pod>,
    namespaces: reflector::Store<Namespace>,
    own_pod: Option<String>,
    changed: Arc<AtomicBool>,
}

impl PodDirectory {
    /// Whether the pod `namespace/name` is one to capture; None while the API's view does not
    /// have it yet (the watch event may come a moment after the runtime's CNI call).
    pub fn wants_capture(&self, namespace: &str, name: &str) -> Option<bool> {
        let pod = self.pods.state().into_iter().find(|p| {
            p.metadata.namespace.as_deref() == Some(namespace)
                && p.metadata.name.as_deref() == Some(name)
        })?;
        let namespaces = self.namespaces.state();
        let namespaces: Vec<&Namespace> = namespaces.iter().map(|n| n.as_ref()).collect();
        let ambient = model::ambient_namespaces(&namespaces);
        Some(model::wants_capture(
            &pod,
            &ambient,
            self.own_pod.as_deref(),
        ))
    }

    /// Asks for the desired state to be rebuilt (a sandbox came or went).
    pub fn touch(&self) {
        self.changed.store(true, Ordering::Release);
    }
}

/// A reflector store fed by a watch (of the objects `fields` selects, if given) that retries
/// with backoff forever; `changed` is set on every event.
fn watch<K>(api: Api<K>, fields: Option<&str>, changed: Arc<AtomicBool>) -> reflector::Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let config = match fields {
        Some(fields) => watcher::Config::default().fields(fields),
        None => watcher::Config::default(),
    };
    let stream = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.store(true, Ordering::Release),
                Err(e) => {
                    warn!(kind = %K::kind(&K::DynamicType::default()), "watch error (retrying): {e}")
                }
            }
        }
    });
    store
}

impl StateSource for KubernetesSource {
    fn initial(&mut self) -> Result<Arc<State>> {
        self.build()
    }

    fn watch(self: Box<Self>, updates: mpsc::Sender<Arc<State>>) -> tokio::task::JoinHandle<()> {
        // Building reads /proc and cgroupfs (locating pods): a blocking thread does it, never the
        // runtime that carries the traffic.
        let source: Arc<KubernetesSource> = Arc::from(self);
        tokio::spawn(async move {
            // Rebuild on changes, and every few seconds anyway: a new pod's containers appear in
            // /proc a moment after the API says it runs.
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut since_rebuild = 0u32;
            let mut last = String::new();
            loop {
                tick.tick().await;
                since_rebuild += 1;
                let Some(stores) = source.stores.as_ref() else {
                    return;
                };
                if !stores.changed.swap(false, Ordering::AcqRel) && since_rebuild < 10 {
                    continue;
                }
                since_rebuild = 0;
                let building = source.clone();
                let Ok(built) = tokio::task::spawn_blocking(move || building.build()).await else {
                    return; // the runtime is shutting down
                };
                match built {
                    Ok(state) => {
                        // Only a different state is news (the periodic rebuild mostly is not).
                        let fingerprint =
                            format!("{:?}", (&state.workloads, &state.services, &state.enrolled));
                        if fingerprint == last {
                            continue;
                        }
                        last = fingerprint;
                        if updates.send(state).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        warn!("cluster state rejected, the last good state stays in force: {e:#}")
                    }
                }
            }
        })
    }
}
