//! The agent keeps the kernel and the tunnel in step with the desired state.
//!
//! Enrollment of a pod, in this order (un-enrollment is the reverse):
//! netns handle → netns cookie → listeners opened in the netns → programs attached to the pod's
//! cgroup and netns → maps written (capture is on from that last write).
//!
//! Besides, the agent keeps `NODE_ADDRESSES` equal to the default gateways of its enrolled pods
//! and the node's own addresses (`--node-address`), from which the kubelet's probes come. Those
//! go to the apps around the tunnel, also while the agent is away (the map is pinned). And while
//! the mesh's destinations do not fit in `MESH_DESTINATIONS`, it has the kernel capture every
//! connection of the enrolled pods (see `set_capture_all`).

pub mod cni;
pub mod fwmark_reflect;
pub mod kubernetes;
pub mod source;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use ambit_abi::{EnrolledPod, OUTBOUND_PORT};
use ambit_settings::DeliverFrom;
use anyhow::{Context as _, Result};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    agent::kubernetes::discovery::ProcLocator,
    cgroup,
    datapath::{self, Datapath},
    handover::{HandedListeners, PodListenerFds},
    netns::Netns,
    proxy::{PodListeners, PodTunnel, ProxyContext},
    routing,
    state::{EnrolledPodSpec, PodKey, State},
};

/// Called with (pod, enrolled) after each enrollment change.
type EnrollmentHook = Box<dyn Fn(&str, bool) + Send>;

/// Which pods are enrolled, and which could not be and why: published after every change, for
/// whoever waits on a pod (the CNI plugin's ADD).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnrollmentReport {
    /// Each enrolled pod and the netns it was enrolled in.
    pub enrolled: BTreeMap<PodKey, PathBuf>,
    pub failed: BTreeMap<PodKey, String>,
}

/// A pod this node has enrolled, and what it holds for it.
struct Enrolled {
    spec: EnrolledPodSpec,
    netns: Arc<Netns>,
    cgroup: cgroup::PodCgroup,
    tunnel: PodTunnel,
    fwmark_reflect: fwmark_reflect::FwmarkReflect,
    /// The pod's default gateways: the node as the pod sees it (kubelet probes come from there).
    gateways: Vec<IpAddr>,
}

impl Enrolled {
    /// Why the pod is no longer where it was enrolled (netns or cgroup removed or replaced).
    /// A netns found through a process (`<proc>/<pid>/ns/net`, the /proc scan) outlives that
    /// process when it is not the pod's pause process (an app container on a runtime without
    /// one, restarting): it is then followed to another process of the pod in the same netns,
    /// so a container restart does not re-enroll the pod.
    fn vanished(&mut self) -> Option<String> {
        if let Some(why) = self.netns.vanished_at(&self.spec.netns) {
            let Some(path) = self.netns_through_another_process() else {
                return Some(why);
            };
            info!(pod = %self.spec.key, from = %self.spec.netns.display(), to = %path.display(),
                "pod's netns followed to another of its processes");
            self.spec.netns = path;
        }
        self.cgroup.vanished()
    }

    fn netns_through_another_process(&self) -> Option<PathBuf> {
        let proc_root = process_netns_path(&self.spec.netns)?;
        let locator = ProcLocator::new(proc_root, PathBuf::new());
        let pod_cgroup = self.spec.cgroup.file_name()?.to_str()?;
        locator.netns_path_of(pod_cgroup, self.netns.inode().ok()?)
    }

    /// Whether `new` puts the pod somewhere else, or makes it someone else. The same netns
    /// under another path (another of the pod's processes) is not a move; nor is the path of a
    /// process that has exited while the pod's netns lives on (the source has not seen the exit
    /// yet; [`Enrolled::vanished`] decides whether the pod is gone). Any other path that does
    /// not exist is a move, whose enrollment fails and is reported.
    fn needs_reenrollment(&self, new: &EnrolledPodSpec) -> bool {
        let old = &self.spec;
        let exited_process = process_netns_path(&new.netns).is_some() && !new.netns.exists();
        let netns_moved =
            old.netns != new.netns && !self.netns.is_at(&new.netns) && !exited_process;
        netns_moved
            || old.cgroup != new.cgroup
            || old.ips != new.ips
            || old.identity != new.identity
    }

    /// Takes `new` as the pod's spec, keeping the path the pod's netns is reached by when the
    /// new one does not reach it.
    fn update_spec(&mut self, new: &EnrolledPodSpec) {
        let netns = if self.netns.is_at(&new.netns) {
            new.netns.clone()
        } else {
            self.spec.netns.clone()
        };
        self.spec = EnrolledPodSpec {
            netns,
            ..new.clone()
        };
    }
}

pub struct Agent {
    datapath: Datapath,
    cgroup_root: PathBuf,
    proxy: Arc<ProxyContext>,
    pods: BTreeMap<PodKey, Enrolled>,
    /// Pods that should be enrolled but could not be (netns not there yet, ...): retried.
    failed: BTreeMap<PodKey, String>,
    /// Told of every enrollment (true) and un-enrollment (false), e.g. to annotate the pod.
    on_change: Option<EnrollmentHook>,
    /// The node's readiness (`/healthz/ready`), owned here: ready once every pod the desired
    /// state enrolls has its programs attached and listeners open, and never again once
    /// draining began.
    ready: Arc<AtomicBool>,
    draining: bool,
    report: watch::Sender<EnrollmentReport>,
    /// Set while the mesh's destinations do not all fit in `MESH_DESTINATIONS`: every enrolled
    /// pod's connections then go to the tunnel, which tells mesh destinations from the rest
    /// (those pass through in plaintext, as they would without the mesh). Otherwise a mesh
    /// destination left out of the map would be reached in plaintext.
    capture_all: bool,
    /// `--node-address`.
    node_addresses: Vec<IpAddr>,
    /// `--proc-root`: pods' sysctls are written through it.
    proc_root: PathBuf,
    /// Listeners a predecessor handed over, per pod, until the pod is enrolled with them.
    handed: HandedListeners,
}

impl Agent {
    pub fn new(datapath: Datapath, cgroup_root: PathBuf, proxy: Arc<ProxyContext>) -> Self {
        Self {
            datapath,
            cgroup_root,
            proxy,
            pods: BTreeMap::new(),
            failed: BTreeMap::new(),
            on_change: None,
            ready: Arc::new(AtomicBool::new(false)),
            draining: false,
            capture_all: false,
            node_addresses: Vec::new(),
            proc_root: PathBuf::from("/proc"),
            handed: HandedListeners::new(),
            report: watch::Sender::new(EnrollmentReport::default()),
        }
    }

    /// The procfs through which pods' sysctls are written (`--proc-root`).
    pub fn set_proc_root(&mut self, proc_root: PathBuf) {
        self.proc_root = proc_root;
    }

    /// Listeners a predecessor handed over: each pod listed is enrolled with them (if it is
    /// still in the same netns) instead of with new ones, which could not be bound while the
    /// predecessor holds these.
    pub fn adopt_listeners(&mut self, handed: HandedListeners) {
        self.handed = handed;
    }

    /// Pods whose handed-over listeners are not in use yet (their enrollment failed so far).
    /// Empty once the takeover is complete.
    pub fn pods_not_taken_over(&self) -> Vec<PodKey> {
        self.handed.keys().cloned().collect()
    }

    /// Every enrolled pod's listeners (copies), for a successor.
    pub fn listeners_for_handover(&self) -> Vec<PodListenerFds> {
        self.pods
            .iter()
            .filter_map(|(key, pod)| match pod.tunnel.listener_fds() {
                Ok(fds) => Some(PodListenerFds {
                    pod: key.clone(),
                    netns_cookie: pod.netns.cookie(),
                    fds,
                    restore_sysctls: pod.fwmark_reflect.to_restore(),
                }),
                Err(e) => {
                    // The successor opens the pod's listeners anew once this node is gone.
                    error!(pod = %key, "copying the pod's listeners for the successor: {e}");
                    None
                }
            })
            .collect()
    }

    /// The enrollment report, updated after every change.
    pub fn enrollment_report(&self) -> watch::Receiver<EnrollmentReport> {
        self.report.subscribe()
    }

    fn publish_report(&self) {
        let report = EnrollmentReport {
            enrolled: self
                .pods
                .iter()
                .map(|(k, p)| (k.clone(), p.spec.netns.clone()))
                .collect(),
            failed: self.failed.clone(),
        };
        self.report.send_if_modified(|current| {
            let changed = *current != report;
            *current = report;
            changed
        });
    }

    /// The node's readiness, for the readiness endpoint to read.
    pub fn readiness(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    fn update_readiness(&self) {
        let ready = !self.draining && self.failed.is_empty();
        self.ready.store(ready, Ordering::Release);
        self.publish_report();
    }

    /// Calls `hook(pod, enrolled)` after each enrollment and un-enrollment.
    pub fn on_enrollment_change(&mut self, hook: impl Fn(&str, bool) + Send + 'static) {
        self.on_change = Some(Box::new(hook));
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    pub fn has_failed_pods(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Brings kernel and tunnel to `state`. Errors for one pod do not stop the others; they are
    /// logged and the pod is retried on the next call. Readiness follows.
    pub async fn apply(&mut self, state: &State) -> Result<()> {
        let result = self.reconcile(state).await;
        let nodes = self.sync_node_addresses();
        self.update_readiness();
        result.and(nodes)
    }

    /// The node's own addresses (`--node-address`), kept in `NODE_ADDRESSES` beside the pods'
    /// gateways.
    pub fn set_node_addresses(&mut self, addresses: Vec<IpAddr>) {
        self.node_addresses = addresses;
    }

    /// Writes the node's addresses and the union of the enrolled pods' gateways to
    /// `NODE_ADDRESSES`; a gateway leaves it once no enrolled pod has it. A pod whose routes
    /// had no gateway when it was enrolled (its network still being set up) is read again
    /// first.
    fn sync_node_addresses(&mut self) -> Result<()> {
        for pod in self.pods.values_mut() {
            if pod.gateways.is_empty() {
                pod.gateways = read_gateways(&pod.spec.key, &pod.netns);
            }
        }
        let addresses: BTreeSet<IpAddr> = self
            .pods
            .values()
            .flat_map(|p| p.gateways.iter().copied())
            .chain(self.node_addresses.iter().copied())
            .collect();
        self.datapath
            .sync_node_addresses(&addresses)
            .context("syncing node addresses")?;
        let from_clients = self.proxy.deliver_from == DeliverFrom::Client;
        if from_clients && *self.proxy.node_addresses.read().unwrap() != addresses {
            for pod in self.pods.values() {
                if let Err(e) = routing::sync_node_addresses(&pod.netns, &pod.spec.ips, &addresses)
                {
                    error!(pod = %pod.spec.key, "updating the pod's delivery table: {e:#}");
                }
            }
            *self.proxy.node_addresses.write().unwrap() = addresses;
        }
        Ok(())
    }

    async fn reconcile(&mut self, state: &State) -> Result<()> {
        // Un-enroll what is no longer wanted, or wanted differently.
        // Only a change of where the pod is (netns, cgroup, addresses) or who it is needs a
        // re-enrollment; anything else (e.g. its mTLS mode) is read per connection from the
        // state, so it changes without the gap a re-enrollment would open.
        let stale: Vec<PodKey> = self
            .pods
            .iter()
            .filter(|(key, pod)| match state.enrolled.get(*key) {
                Some(spec) => pod.needs_reenrollment(spec),
                None => true,
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.unenroll(&key).await;
        }
        for (key, pod) in self.pods.iter_mut() {
            if let Some(spec) = state.enrolled.get(key) {
                pod.update_spec(spec);
            }
        }

        // A destination that does not fit must not stop any pod's enrollment.
        let destinations = state.mesh_destinations();
        let not_written = self
            .datapath
            .sync_mesh_destinations(&destinations)
            .unwrap_or_else(|e| {
                error!("syncing mesh destinations: {e:#}");
                destinations.len() // unknown which are in: capture everything
            });
        self.set_capture_all(not_written, destinations.len());

        self.failed.clear();
        for (key, spec) in &state.enrolled {
            if self.pods.contains_key(key) {
                continue;
            }
            match self.enroll(spec) {
                Ok(pod) => {
                    info!(pod = %key, netns = %spec.netns.display(), cookie = pod.netns.cookie(), "pod enrolled");
                    self.pods.insert(key.clone(), pod);
                    if let Some(hook) = &self.on_change {
                        hook(key, true);
                    }
                }
                Err(e) => {
                    error!(pod = %key, "enrollment failed (will retry): {e:#}");
                    // Leave nothing half-done behind.
                    let _ = self.datapath.detach_pod(key);
                    self.failed.insert(key.clone(), format!("{e:#}"));
                }
            }
        }
        // Handed-over listeners of pods no longer wanted are closed here (the predecessor
        // still serves them until it drains).
        self.handed
            .retain(|key, _| state.enrolled.contains_key(key));
        self.remove_orphans()
    }

    /// Turns capture of every destination on for all enrolled pods while `not_written` of the
    /// mesh's `total` destinations are missing from the kernel's map, and off once they fit.
    fn set_capture_all(&mut self, not_written: usize, total: usize) {
        let capture_all = not_written > 0;
        if capture_all == self.capture_all {
            return;
        }
        if capture_all {
            error!(
                not_written,
                total,
                capacity = ambit_abi::MAX_MESH_DESTINATIONS,
                "MESH_DESTINATIONS is full: every connection of enrolled pods now goes through the tunnel (destinations outside the mesh pass through it in plaintext)"
            );
        } else {
            info!(
                total,
                "mesh destinations fit again: only mesh destinations are captured"
            );
        }
        self.capture_all = capture_all;
        let value = self.enrolled_value();
        for pod in self.pods.values() {
            if let Err(e) = self.datapath.enroll_netns(pod.netns.cookie(), value) {
                error!(pod = %pod.spec.key, "updating ENROLLED_NETNS: {e:#}");
            }
        }
    }

    /// A pod's `ENROLLED_NETNS` value.
    fn enrolled_value(&self) -> EnrolledPod {
        EnrolledPod {
            outbound_port: OUTBOUND_PORT,
            flags: if self.capture_all {
                ambit_abi::POD_FLAG_CAPTURE_ALL
            } else {
                0
            },
            _pad: 0,
        }
    }

    fn enroll(&mut self, spec: &EnrolledPodSpec) -> Result<Enrolled> {
        // Issue the pod's certificate now, not on its first connection.
        self.proxy.certs.get(&spec.identity)?;
        let netns = Arc::new(Netns::open(&spec.netns)?);
        let cgroup_path = cgroup::resolve(&self.cgroup_root, &spec.cgroup);
        let cgroup = cgroup::PodCgroup::open(&cgroup_path)?;

        netns.ensure_loopback_up()?;
        let handed = self.handed.get(&spec.key);
        let listeners = match handed {
            // Copies: should the enrollment fail below, the next try takes them again.
            Some(handed) if handed.netns_cookie == netns.cookie() => PodListeners::adopt(
                &netns,
                handed
                    .fds
                    .iter()
                    .map(|fd| fd.try_clone())
                    .collect::<std::io::Result<_>>()?,
            )
            .context("adopting the listeners handed over")?,
            _ => PodListeners::open(&netns)?,
        };
        let inbound: Vec<(IpAddr, i32)> = spec
            .ips
            .iter()
            .filter_map(|ip| {
                let listener = if ip.is_ipv4() {
                    listeners.inbound_v4.as_ref()
                } else {
                    listeners.inbound_v6.as_ref()
                }?;
                Some((*ip, listener.as_raw_fd()))
            })
            .collect();

        // Delivery from the clients' addresses: the pod's rule and table first, then the marks
        // (sock_ops, attached with the other programs, marks new listeners; the iterator those
        // already open), all before inbound connections are steered to the tunnel.
        let gateways = read_gateways(&spec.key, &netns);
        let from_clients = self.proxy.deliver_from == DeliverFrom::Client;
        // An enrollment that fails below leaves neither the rule nor the sysctls behind.
        let mut setup = DeliverySetup {
            netns: &netns,
            proc_root: &self.proc_root,
            fwmark_reflect: None,
            routes: false,
        };
        if from_clients {
            let mut reflect = fwmark_reflect::FwmarkReflect::enable(&netns, &self.proc_root)?;
            // A predecessor turned it on: its values are the pod's own.
            if let Some(handed) = handed.filter(|h| h.netns_cookie == netns.cookie()) {
                reflect.inherit(&handed.restore_sysctls);
            }
            setup.fwmark_reflect = Some(reflect);
            setup.routes = true; // a half-made rule is removed as well
            let node_addresses: BTreeSet<IpAddr> = self
                .proxy
                .node_addresses
                .read()
                .unwrap()
                .iter()
                .chain(&gateways)
                .copied()
                .collect();
            routing::install(&netns, &spec.ips, &node_addresses)
                .context("installing the pod's delivery rule")?;
        } else {
            // What an earlier run with `--deliver-from client` left.
            routing::remove(&netns).context("removing the pod's delivery rule")?;
        }
        self.datapath.attach_pod(&spec.key, cgroup.dir(), &netns)?;
        if from_clients {
            self.datapath.mark_listeners(&netns)?;
        }
        for (ip, fd) in &inbound {
            self.datapath.enroll_inbound(*ip, &Fd(*fd))?;
        }
        let tunnel = PodTunnel::start(
            self.proxy.clone(),
            spec.key.clone(),
            spec.identity.clone(),
            netns.clone(),
            listeners,
        )?;
        self.datapath
            .enroll_netns(netns.cookie(), self.enrolled_value())?;
        // Taken over (or the pod moved to another netns, where new listeners serve it).
        self.handed.remove(&spec.key);
        let fwmark_reflect = setup.keep();
        Ok(Enrolled {
            spec: spec.clone(),
            netns,
            cgroup,
            tunnel,
            fwmark_reflect,
            gateways,
        })
    }

    async fn unenroll(&mut self, key: &str) {
        let Some(pod) = self.pods.remove(key) else {
            return;
        };
        let steps = [
            self.datapath.unenroll_netns(pod.netns.cookie()),
            pod.spec
                .ips
                .iter()
                .try_for_each(|ip| self.datapath.unenroll_inbound(*ip)),
            self.datapath.detach_pod(key),
            // After sock_ops is detached, so that no new listener gets the mark.
            self.datapath.unmark_sockets(&pod.netns),
            routing::remove(&pod.netns),
            pod.fwmark_reflect.restore(&pod.netns, &self.proc_root),
        ];
        for step in steps {
            if let Err(e) = step {
                warn!(pod = %key, "un-enrollment step failed: {e:#}");
            }
        }
        self.proxy.hbone.forget_netns(pod.netns.cookie());
        // Listeners closed before returning: the pod may be enrolled again at once. Dropping the
        // rest closes the netns and cgroup handles.
        pod.tunnel.stop().await;
        info!(pod = %key, "pod un-enrolled");
        if let Some(hook) = &self.on_change {
            hook(key, false);
        }
    }

    /// Map entries and pins that no enrolled pod owns: left by an earlier node process for pods
    /// that are gone or no longer enrolled.
    fn remove_orphans(&mut self) -> Result<()> {
        for pod in self.datapath.pins().pinned_pods()? {
            if !self.pods.contains_key(&pod) {
                info!(pod = %pod, "detaching programs left from an earlier run");
                self.datapath.detach_pod(&pod)?;
            }
        }
        let cookies: Vec<u64> = self.pods.values().map(|p| p.netns.cookie()).collect();
        for cookie in self.datapath.enrolled_netns()? {
            if !cookies.contains(&cookie) {
                self.datapath.unenroll_netns(cookie)?;
            }
        }
        let ips: Vec<IpAddr> = self
            .pods
            .values()
            .flat_map(|p| p.spec.ips.clone())
            .collect();
        for key in self.datapath.inbound_pods()? {
            let ip = datapath::ip_from_key(key);
            if !ips.contains(&ip) {
                self.datapath.unenroll_inbound(ip)?;
            }
        }
        Ok(())
    }

    /// Renews the certificates of enrolled pods that passed half their lifetime, before they
    /// are needed: new connections always find a fresh certificate.
    pub fn refresh_certificates(&self) {
        for pod in self.pods.values() {
            if let Err(e) = self.proxy.certs.get(&pod.spec.identity) {
                error!(pod = %pod.spec.key, "certificate renewal failed: {e:#}");
            }
        }
    }

    /// Releases every enrolled pod whose netns or cgroup is no longer where the desired state
    /// says (the pod was killed and they were removed, or replaced by new ones): its listeners,
    /// netns handle, programs, map entries and pooled connections. While the desired state still
    /// lists it, the pod is retried like any pod that cannot be enrolled. Returns how many.
    pub async fn release_vanished_pods(&mut self) -> usize {
        let vanished: Vec<(PodKey, String)> = self
            .pods
            .iter_mut()
            .filter_map(|(key, pod)| {
                pod.vanished()
                    .map(|why| (key.clone(), format!("{why}: pod released")))
            })
            .collect();
        for (key, why) in &vanished {
            warn!(pod = %key, "{why}");
            self.unenroll(key).await;
            self.failed.insert(key.clone(), why.clone());
        }
        if let Err(e) = self.sync_node_addresses() {
            error!("{e:#}");
        }
        self.update_readiness();
        vanished.len()
    }

    /// Closes every pod's listeners and leaves capture attached: new connections from and to
    /// enrolled pods are refused (fail closed) while those in flight go on. Draining.
    /// The node is not ready from here on.
    pub async fn close_listeners(&mut self) {
        self.draining = true;
        self.update_readiness();
        for pod in self.pods.values_mut() {
            pod.tunnel.close_listeners().await;
        }
    }

    /// Un-enrolls every pod: used by `--detach-on-exit`.
    pub async fn unenroll_all(&mut self) {
        let keys: Vec<PodKey> = self.pods.keys().cloned().collect();
        for key in keys {
            self.unenroll(&key).await;
        }
        if let Err(e) = self.sync_node_addresses() {
            error!("{e:#}");
        }
    }
}

/// The procfs root of a netns path that names a process's netns (`<proc>/<pid>/ns/net`), or
/// None for any other path (a runtime's or the CNI's bind mount, a lab's `/run/netns/<name>`).
fn process_netns_path(path: &Path) -> Option<&Path> {
    if !path.ends_with("ns/net") {
        return None;
    }
    let pid_dir = path.parent()?.parent()?;
    pid_dir.file_name()?.to_str()?.parse::<u32>().ok()?;
    pid_dir.parent()
}

/// A pod's default gateways, or none (logged) if its routes cannot be read: its probes then
/// take the tunnel like any plaintext connection.
fn read_gateways(pod: &str, netns: &Netns) -> Vec<IpAddr> {
    match netns.default_gateways() {
        Ok(gateways) => gateways,
        Err(e) => {
            warn!(pod, "reading the pod's default gateways: {e:#}");
            Vec::new()
        }
    }
}

/// What an enrollment set up for delivery from the clients' addresses; undone when dropped,
/// unless kept (the enrollment failed half-way).
struct DeliverySetup<'a> {
    netns: &'a Netns,
    proc_root: &'a Path,
    fwmark_reflect: Option<fwmark_reflect::FwmarkReflect>,
    routes: bool,
}

impl DeliverySetup<'_> {
    fn keep(mut self) -> fwmark_reflect::FwmarkReflect {
        self.routes = false;
        self.fwmark_reflect.take().unwrap_or_default()
    }
}

impl Drop for DeliverySetup<'_> {
    fn drop(&mut self) {
        let netns = self.netns;
        if self.routes {
            if let Err(e) = routing::remove(netns) {
                warn!(netns = %netns.path().display(), "removing a delivery rule: {e:#}");
            }
        }
        if let Some(reflect) = self.fwmark_reflect.take() {
            if let Err(e) = reflect.restore(netns, self.proc_root) {
                warn!(netns = %netns.path().display(), "restoring fwmark_reflect: {e:#}");
            }
        }
    }
}

/// A borrowed raw fd, for handing a listener to the sockhash.
struct Fd(i32);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_netns_path_is_told_from_a_bind_mount() {
        assert_eq!(
            process_netns_path(Path::new("/host/proc/4242/ns/net")),
            Some(Path::new("/host/proc"))
        );
        assert_eq!(process_netns_path(Path::new("/run/netns/cni-1234")), None);
        assert_eq!(process_netns_path(Path::new("/proc/self/ns/net")), None);
    }
}
