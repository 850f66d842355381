//! `--source xds`: the mesh (workloads, services, policies) from istiod over delta xDS, and
//! this node's pods from where the node learns them. istiod does not know where a pod's
//! network namespace and cgroup are (ztunnel learns that from istio-cni); here they come from
//! [`LocalPods`]: the Kubernetes API and the host's /proc (in a cluster), or a file with only
//! the `ambit.pods` section (`--config`, the lab), re-read when it changes.
//!
//! istiod learns a new pod only once its sandbox has an address, i.e. after the CNI plugin's
//! ADD, which waits for the pod's capture: so a pod the Kubernetes API lists is enrolled
//! before istiod sends its workload, with the workload the API describes (identity from its
//! service account), marked provisional: its inbound is refused until istiod's arrives (its
//! policies are unknown till then). With a pods file (no API), a pod waits for istiod.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info};

use super::client::{self, XdsSettings};
use crate::{
    agent::{
        kubernetes::KubernetesSource,
        source::{file_stamp, StateSource},
    },
    config::{yaml_error, AmbitSection, LocalConfig, Workload},
    state::State,
};

pub struct XdsSource {
    configs: watch::Receiver<Option<Arc<LocalConfig>>>,
    pods: Arc<LocalPods>,
    node: String,
    trust_domain: String,
}

/// This node's pods, and the workloads the Kubernetes API describes for them (none from a
/// pods file).
struct LocalView {
    pods: AmbitSection,
    workloads: Vec<Workload>,
}

/// Where this node's pods (their netns and cgroup) come from.
pub enum LocalPods {
    /// A file with only the `ambit` section.
    File(PathBuf),
    /// The Kubernetes API's pods on this node, found in the host's /proc.
    Kubernetes(Box<KubernetesSource>),
}

impl LocalPods {
    fn read(&self) -> Result<LocalView> {
        Ok(match self {
            LocalPods::File(path) => LocalView {
                pods: read_pods(path)?,
                workloads: Vec::new(),
            },
            LocalPods::Kubernetes(k8s) => {
                let local = k8s.local_pods()?;
                LocalView {
                    pods: local.ambit,
                    workloads: local.workloads,
                }
            }
        })
    }
}

impl XdsSource {
    /// Starts the xDS client and waits until istiod has sent a complete state (both types), at
    /// most `timeout`.
    pub async fn connect(
        settings: XdsSettings,
        pods: LocalPods,
        node: &str,
        trust_domain: &str,
        timeout: Duration,
    ) -> Result<XdsSource> {
        let address = settings.address.clone();
        let (configs_tx, mut configs) = watch::channel(None);
        tokio::spawn(client::run(settings, configs_tx));
        let first = match tokio::time::timeout(timeout, configs.wait_for(Option::is_some)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(anyhow!("the xDS client stopped")),
            Err(_) => Err(anyhow!(
                "no complete state from {address} within {timeout:?}"
            )),
        };
        first?;
        info!(%address, "xDS: first state received");
        Ok(XdsSource {
            configs,
            pods: Arc::new(pods),
            node: node.to_owned(),
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// The mesh istiod sent, with this node's pods as `local` has them.
    fn state(&self, local: LocalView) -> Result<Arc<State>> {
        let Some(mesh) = self.configs.borrow().clone() else {
            bail!("no state from istiod yet");
        };
        let mut config = (*mesh).clone();
        config.ambit = local.pods;
        let from_istiod: std::collections::BTreeSet<String> =
            config.workloads.iter().map(Workload::key).collect();
        let workloads = &mut config.workloads;
        config.ambit.pods.retain(|pod| {
            if from_istiod.contains(&pod.workload) {
                return true;
            }
            match local.workloads.iter().find(|w| w.key() == pod.workload) {
                Some(w) => {
                    debug!(pod = %pod.workload, "enrolled before istiod sent its workload: identity from the API, inbound refused until istiod's arrives");
                    workloads.push(Workload {
                        provisional: true,
                        ..w.clone()
                    });
                    true
                }
                None => {
                    debug!(pod = %pod.workload, "waiting for istiod to send this pod's workload");
                    false
                }
            }
        });
        Ok(Arc::new(State::from_config(
            &config,
            &self.node,
            &self.trust_domain,
        )?))
    }
}

impl StateSource for XdsSource {
    fn initial(&mut self) -> Result<Arc<State>> {
        self.state(self.pods.read()?)
    }

    fn watch(
        mut self: Box<Self>,
        updates: mpsc::Sender<Arc<State>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            // Pods are polled: a new pod's containers appear in /proc a moment after the API
            // says it runs, and a file is edited in place or replaced.
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut pods_stamp = self.pods_stamp();
            loop {
                tokio::select! {
                    changed = self.configs.changed() => if changed.is_err() { return },
                    _ = tick.tick() => {
                        let now = self.pods_stamp();
                        if now == pods_stamp && !self.pods_changed() {
                            continue;
                        }
                        pods_stamp = now;
                    }
                }
                // Reading the pods locates them in /proc and cgroupfs: a blocking thread does
                // it, never the runtime that carries the traffic.
                let pods = self.pods.clone();
                let Ok(local) = tokio::task::spawn_blocking(move || pods.read()).await else {
                    return; // the runtime is shutting down
                };
                match local.and_then(|local| self.state(local)) {
                    Ok(state) => {
                        if updates.send(state).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => error!("state rejected, the last good state stays in force: {e:#}"),
                }
            }
        })
    }
}

impl XdsSource {
    /// The pods file's modification stamp (none for Kubernetes).
    fn pods_stamp(&self) -> Option<(SystemTime, u64)> {
        match self.pods.as_ref() {
            LocalPods::File(path) => file_stamp(path),
            LocalPods::Kubernetes(_) => None,
        }
    }

    /// Whether the Kubernetes objects changed since the last look.
    fn pods_changed(&self) -> bool {
        match self.pods.as_ref() {
            LocalPods::File(_) => false,
            LocalPods::Kubernetes(k8s) => k8s.take_changed(),
        }
    }
}

/// The `ambit` section of the pods file; nothing else may be in it.
fn read_pods(path: &Path) -> Result<AmbitSection> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PodsFile {
        #[serde(default)]
        ambit: AmbitSection,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: PodsFile = serde_yaml::from_str(&text).map_err(|e| {
        anyhow!(
            "{:#} (with --source xds the file holds only the `ambit` section; the mesh comes \
             from istiod)",
            yaml_error(&path.display().to_string(), e)
        )
    })?;
    Ok(file.ambit)
}
