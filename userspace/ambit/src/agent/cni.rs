//! The node agent's side of `ambit-cni`, the chained CNI plugin: a unix socket
//! (`--cni-socket`) on which the plugin reports each pod sandbox the runtime sets up, and
//! waits until the pod is captured.
//!
//! An ADD records the sandbox (its netns and addresses, by pod UID) in the [`SandboxRegistry`],
//! has the desired state rebuilt at once, and answers when the agent's enrollment report lists
//! the pod (programs attached to its cgroup and netns, listeners open), or when the API's view
//! says the pod is not one to capture. Until then the runtime holds the sandbox: the pod's
//! containers (init containers included) start with capture in place. If the agent cannot
//! enroll the pod, or does not within [`ADD_TIMEOUT`], the ADD fails and the runtime retries.
//!
//! The sandbox's cgroup is the pod-level cgroup kubelet makes before it asks for the sandbox,
//! found by the pod's UID; the netns is the one the runtime gives CNI. So a pod is never
//! located through its processes, which are not there yet.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use ambit_cni::{Answer, PodSandbox, Request};
use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tracing::{info, warn};

use super::{
    kubernetes::{
        discovery::{find_pod_cgroup, PodLocation, PodLocator},
        PodDirectory,
    },
    EnrollmentReport,
};

/// How long an ADD waits for the pod to be enrolled before it fails (the runtime retries).
pub const ADD_TIMEOUT: Duration = Duration::from_secs(30);

/// A sandbox the plugin reported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sandbox {
    netns: PathBuf,
    ips: Vec<IpAddr>,
    /// The pod-level cgroup, once found (searched for once, not at every rebuild).
    cgroup: Option<PathBuf>,
}

/// The sandboxes the CNI plugin reported, by pod UID.
#[derive(Default)]
pub struct SandboxRegistry {
    by_uid: Mutex<BTreeMap<String, Sandbox>>,
}

impl SandboxRegistry {
    fn insert(&self, uid: &str, sandbox: Sandbox) {
        self.by_uid.lock().unwrap().insert(uid.to_owned(), sandbox);
    }

    fn remove(&self, uid: &str) {
        self.by_uid.lock().unwrap().remove(uid);
    }

    fn get(&self, uid: &str) -> Option<Sandbox> {
        self.by_uid.lock().unwrap().get(uid).cloned()
    }

    /// The pod-level cgroup of the sandbox of `uid`: the one found earlier while it exists,
    /// else searched for under `cgroup_root` (kubelet makes it before the sandbox).
    fn pod_cgroup(&self, uid: &str, cgroup_root: &Path) -> Option<PathBuf> {
        let known = self.get(uid)?.cgroup.filter(|c| c.exists());
        if known.is_some() {
            return known;
        }
        let found = find_pod_cgroup(cgroup_root, uid)?;
        if let Some(sandbox) = self.by_uid.lock().unwrap().get_mut(uid) {
            sandbox.cgroup = Some(found.clone());
        }
        Some(found)
    }
}

/// Locates a pod by its reported sandbox; a pod the plugin did not report (it ran before the
/// agent, or the plugin is not installed) by `fallback` (the /proc scan).
pub struct SandboxLocator<L> {
    pub registry: Arc<SandboxRegistry>,
    pub cgroup_root: PathBuf,
    pub fallback: L,
}

impl<L: PodLocator> PodLocator for SandboxLocator<L> {
    fn locate(&self, pod_uid: &str, pod_ips: &[IpAddr]) -> Option<PodLocation> {
        match self.registry.get(pod_uid) {
            Some(sandbox) => Some(PodLocation {
                netns: sandbox.netns,
                cgroup: self.registry.pod_cgroup(pod_uid, &self.cgroup_root)?,
            }),
            None => self.fallback.locate(pod_uid, pod_ips),
        }
    }

    fn sandbox_ips(&self, pod_uid: &str) -> Option<Vec<IpAddr>> {
        self.registry.get(pod_uid).map(|s| s.ips)
    }
}

/// What a request handler needs.
#[derive(Clone)]
pub struct CniServer {
    pub registry: Arc<SandboxRegistry>,
    pub directory: PodDirectory,
    pub report: watch::Receiver<EnrollmentReport>,
}

impl CniServer {
    /// Serves on `path` (replacing a socket a previous agent left) until the task is dropped.
    pub fn listen(self, path: &Path) -> Result<tokio::task::JoinHandle<()>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        info!(socket = %path.display(), "waiting for the CNI plugin's requests");
        Ok(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let server = self.clone();
                        tokio::spawn(async move {
                            if let Err(e) = server.serve(stream).await {
                                warn!("CNI request: {e:#}");
                            }
                        });
                    }
                    Err(e) => {
                        warn!("CNI socket accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }))
    }

    async fn serve(&self, stream: UnixStream) -> Result<()> {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await?;
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(request) => self.answer(request).await,
            Err(e) => Answer::Error {
                error: format!("not a request: {e}"),
            },
        };
        let mut out = serde_json::to_string(&answer)?;
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
        Ok(())
    }

    async fn answer(&self, request: Request) -> Answer {
        match request {
            Request::Status => Answer::Ok { captured: false },
            Request::Add(pod) => self.add(pod).await,
            Request::Del(pod) => {
                self.registry.remove(&pod.uid);
                self.directory.touch();
                info!(pod = %format!("{}/{}", pod.namespace, pod.name), "CNI DEL: sandbox released");
                Answer::Ok { captured: false }
            }
            Request::Check(pod) => self.check(&pod),
        }
    }

    async fn add(&self, pod: PodSandbox) -> Answer {
        let key = format!("{}/{}", pod.namespace, pod.name);
        self.registry.insert(
            &pod.uid,
            Sandbox {
                netns: PathBuf::from(&pod.netns),
                ips: pod.ips.clone(),
                cgroup: None,
            },
        );
        self.directory.touch();
        let mut report = self.report.clone();
        let waited = tokio::time::timeout(ADD_TIMEOUT, async {
            loop {
                {
                    let now = report.borrow_and_update();
                    // Enrolled in this sandbox's netns (not an earlier sandbox's of the pod).
                    if now.enrolled.get(&key) == Some(&PathBuf::from(&pod.netns)) {
                        return Answer::Ok { captured: true };
                    }
                    if let Some(why) = now.failed.get(&key) {
                        return Answer::Error {
                            error: format!("enrolling {key}: {why}"),
                        };
                    }
                }
                if self.directory.wants_capture(&pod.namespace, &pod.name) == Some(false) {
                    return Answer::Ok { captured: false };
                }
                // The report changes when the agent enrolls; the API's view may change
                // without it (the pod's watch event): look again every 100 ms as well.
                let _ = tokio::time::timeout(Duration::from_millis(100), report.changed()).await;
            }
        })
        .await;
        let answer = waited.unwrap_or_else(|_| Answer::Error {
            error: format!(
                "{key} was not enrolled within {ADD_TIMEOUT:?} (is it in the API server's view yet?)"
            ),
        });
        match &answer {
            Answer::Ok { captured: true } => info!(pod = %key, "CNI ADD: captured before start"),
            Answer::Ok { captured: false } => {
                // Not a mesh pod: nothing to hold for it.
                self.registry.remove(&pod.uid);
                info!(pod = %key, "CNI ADD: not a mesh pod")
            }
            Answer::Error { error } => {
                warn!(pod = %key, "CNI ADD refused: {error}")
            }
        }
        answer
    }

    fn check(&self, pod: &PodSandbox) -> Answer {
        let key = format!("{}/{}", pod.namespace, pod.name);
        let enrolled = self.report.borrow().enrolled.contains_key(&key);
        match self.directory.wants_capture(&pod.namespace, &pod.name) {
            Some(true) if !enrolled => Answer::Error {
                error: format!("{key} is a mesh pod and is not captured"),
            },
            wants => Answer::Ok {
                captured: wants == Some(true),
            },
        }
    }
}
