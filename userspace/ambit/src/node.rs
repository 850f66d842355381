//! One node: its settings (`NodeArgs`, from the ambit-settings crate) and its life.
//! [`Node::build`] starts what it serves (the desired state from its source, the CA, the eBPF
//! datapath, the per-pod tunnels, the agent that keeps them in step, the observability
//! endpoints); [`Node::run`] follows the source until SIGTERM and then drains. `main.rs` only
//! parses the command line and calls both.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Context as _, Result};
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    agent::{
        cni::{CniServer, SandboxLocator, SandboxRegistry},
        kubernetes::{discovery::ProcLocator, KubernetesSource},
        source::{FileSource, StateSource},
        Agent,
    },
    cgroup,
    datapath::Datapath,
    drain::Drain,
    handover,
    hbone::{client::HboneClient, HboneSettings},
    observability::{
        admin::{self, Addresses, AdminContext, SetLogLevel},
        Metrics,
    },
    proxy::ProxyContext,
    state::State,
    tls::{BuiltinCa, CertManager, CertificateAuthority, PluginCa},
    xds::{
        ca_client::IstiodCa,
        client::XdsSettings,
        source::{LocalPods, XdsSource},
    },
};

pub use ambit_settings::{parse_duration, NodeArgs, SourceKind};

/// A started node: its state, its enrolled pods and its tunnels, ready to follow its source.
pub struct Node {
    args: NodeArgs,
    source: Box<dyn StateSource>,
    /// The desired state the tunnels and the admin endpoints read; the loop replaces it.
    state: watch::Sender<Arc<State>>,
    agent: Agent,
    proxy: Arc<ProxyContext>,
    /// The metrics, readiness and admin servers, stopped with the node.
    _admin: Vec<JoinHandle<()>>,
    /// The CNI plugin's socket server (`--cni-socket`).
    _cni: Option<JoinHandle<()>>,
    /// The handover socket a successor takes the node over on, and what it asks.
    handover: handover::Server,
    handover_requests: mpsc::Receiver<handover::Request>,
}

impl Node {
    /// Starts everything a node serves: reads the source's first state, makes the CA, opens
    /// the eBPF datapath, starts the observability endpoints and enrolls the pods of the first
    /// state. Returns once the node is ready.
    pub async fn build(args: NodeArgs, set_log_level: SetLogLevel) -> Result<Node> {
        check_root()?;
        // Before anything is touched: a node process running for this node hands over to this
        // one, or (if it cannot) is left alone.
        let handover_socket = args.handover_socket_path();
        let predecessor = handover::Predecessor::find(&handover_socket)?;
        if let Some(p) = &predecessor {
            info!(version = p.version(), socket = %handover_socket.display(),
                "a node process runs for this node: taking over from it");
        }
        let cgroup_root = match &args.cgroup_root {
            Some(root) => root.clone(),
            None => cgroup::cgroup2_root()?,
        };
        raise_fd_limit();
        let mut annotator = None;
        // Sandboxes the CNI plugin reports; the Kubernetes source locates pods through them.
        let sandboxes = Arc::new(SandboxRegistry::default());
        let mut directory = None;
        let mut source: Box<dyn StateSource> = match args.source {
            SourceKind::File => {
                let config = args
                    .config
                    .as_deref()
                    .context("--config is required with --source file")?;
                Box::new(FileSource::new(config, &args.node, &args.trust_domain))
            }
            SourceKind::Kubernetes => {
                let k8s = kubernetes_source(&args, &cgroup_root, &sandboxes, false).await?;
                annotator = k8s.annotator();
                directory = k8s.pod_directory();
                Box::new(k8s)
            }
            SourceKind::Xds => {
                let pods = match &args.config {
                    Some(file) => LocalPods::File(file.clone()),
                    None => {
                        let k8s = kubernetes_source(&args, &cgroup_root, &sandboxes, true).await?;
                        annotator = k8s.annotator();
                        directory = k8s.pod_directory();
                        LocalPods::Kubernetes(Box::new(k8s))
                    }
                };
                Box::new(
                    XdsSource::connect(
                        xds_settings(&args),
                        pods,
                        &args.node,
                        &args.trust_domain,
                        Duration::from_secs(60),
                    )
                    .await?,
                )
            }
        };
        let initial = source.initial()?;
        let ca = certificate_authority(&args)?;
        let certs = Arc::new(
            CertManager::new(ca, args.cert_lifetime).with_compliance_policy(args.compliance_policy),
        );
        let mut datapath = Datapath::open(
            &args.bpffs,
            &args.node,
            args.ebpf_log,
            args.capture,
            args.fast_path,
        )?;
        if datapath.loopback_flags().is_some() {
            attach_to_own_cgroup(&mut datapath)?;
        }
        let (state, state_rx) = watch::channel(initial.clone());
        let metrics = Metrics::new();
        metrics.watch_ebpf_counters(
            &datapath.pins().map(ambit_abi::map_names::COUNTERS),
            &datapath
                .pins()
                .map(ambit_abi::map_names::FAST_PATH_COUNTERS),
        )?;
        let proxy = Arc::new(proxy_context(
            &args,
            state_rx,
            &datapath,
            certs,
            metrics.clone(),
        ));
        if args.deliver_from == ambit_settings::DeliverFrom::Client {
            crate::agent::fwmark_reflect::check_writable(&args.proc_root)?;
        }
        let mut agent = Agent::new(datapath, cgroup_root, proxy.clone());
        agent.set_node_addresses(args.node_addresses.clone());
        agent.set_proc_root(args.proc_root.clone());
        if let Some(annotator) = annotator {
            agent.on_enrollment_change(move |pod, captured| annotator.mark(pod, captured));
        }
        let admin = admin::start(
            AdminContext {
                node: args.node.clone(),
                state: state.subscribe(),
                certs: proxy.certs.clone(),
                metrics,
                ready: agent.readiness(),
                set_log_level,
            },
            &Addresses {
                metrics: args.metrics_addr,
                readiness: args.readiness_addr,
                admin: args.admin_addr,
            },
        )
        .await?;
        if let Some(predecessor) = &predecessor {
            agent.adopt_listeners(predecessor.take_listeners()?);
        }
        agent.apply(&initial).await?;
        if predecessor.is_some() {
            wait_until_taken_over(&mut agent, &initial, args.handover_timeout).await?;
        }
        let (requests, handover_requests) = mpsc::channel(4);
        let handover = handover::Server::start(&handover_socket, requests)?;
        if let Some(predecessor) = predecessor {
            predecessor.drain()?;
            info!("took over every pod: the previous node process drains and exits");
        }
        let cni = match (&args.cni_socket, directory) {
            (None, _) => None,
            (Some(socket), Some(directory)) => Some(
                CniServer {
                    registry: sandboxes,
                    directory,
                    report: agent.enrollment_report(),
                }
                .listen(socket)?,
            ),
            (Some(_), None) => bail!(
                "--cni-socket needs the pods from the Kubernetes API (--source kubernetes, or \
                 --source xds without --config)"
            ),
        };
        info!(
            node = %args.node,
            source = %match args.source {
                SourceKind::File => args.config.as_ref().map(|c| c.display().to_string()).unwrap_or_default(),
                SourceKind::Kubernetes => "kubernetes".into(),
                SourceKind::Xds => args.xds_address.clone(),
            },
            pins = %agent.datapath().pins().root().display(),
            enrolled = initial.enrolled.len(),
            "node ready"
        );
        release_startup_memory();
        Ok(Node {
            args,
            source,
            state,
            agent,
            proxy,
            _admin: admin,
            _cni: cni,
            handover,
            handover_requests,
        })
    }

    /// Follows the source until SIGTERM or SIGINT, then drains.
    pub async fn run(self) -> Result<()> {
        let Node {
            args,
            source,
            state: state_tx,
            mut agent,
            proxy,
            _admin,
            _cni,
            handover,
            mut handover_requests,
        } = self;
        let (updates_tx, mut updates) = mpsc::channel(4);
        let _watch = source.watch(updates_tx);
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut retry = tokio::time::interval(Duration::from_secs(2));
        // A killed pod's netns can vanish before the source says the pod is gone.
        let mut vanished = tokio::time::interval(Duration::from_secs(1));
        // Renewal happens at half the lifetime; check often enough to be on time.
        let mut renew = tokio::time::interval(
            (args.cert_lifetime / 10).clamp(Duration::from_millis(200), Duration::from_secs(60)),
        );
        // Set while a successor takes the node over: the kernel's state is its to change.
        let mut handing_over = false;
        let mut handed_over = false;
        loop {
            tokio::select! {
                Some(request) = handover_requests.recv() => match request {
                    handover::Request::TakeListeners(reply) if !handing_over => {
                        handing_over = true;
                        let pods = agent.listeners_for_handover();
                        info!(pods = pods.len(), "handing the pods' listeners to the successor");
                        let _ = reply.send(pods);
                    }
                    // A second successor while one takes over: refused (the sender dropped).
                    handover::Request::TakeListeners(_) => {}
                    handover::Request::Drain => {
                        handed_over = true;
                        break;
                    }
                    handover::Request::Abandoned => {
                        handing_over = false;
                        warn!("the successor gave up taking over: this node goes on");
                        let state = state_tx.borrow().clone();
                        if let Err(e) = agent.apply(&state).await {
                            error!("applying config: {e:#}");
                        }
                    }
                },
                Some(state) = updates.recv() => {
                    state_tx.send_replace(state.clone());
                    // While a successor takes over, the kernel's state is its to change (from
                    // its own source); this node applies it only if the successor gives up.
                    if !handing_over {
                        match agent.apply(&state).await {
                            Ok(()) => info!(enrolled = state.enrolled.len(), "config applied"),
                            Err(e) => error!("applying config: {e:#}"),
                        }
                    }
                    let closed = proxy.tracker.recheck(&state);
                    if closed > 0 {
                        info!(closed, "connections closed: the new policy denies them");
                    }
                }
                _ = retry.tick(), if agent.has_failed_pods() && !handing_over => {
                    let state = state_tx.borrow().clone();
                    if let Err(e) = agent.apply(&state).await {
                        error!("retrying enrollment: {e:#}");
                    }
                }
                _ = renew.tick() => agent.refresh_certificates(),
                _ = vanished.tick(), if !handing_over => {
                    agent.release_vanished_pods().await;
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }
        handover.stop();
        // Stopped while a successor takes over: it holds the listeners and owns the kernel's
        // state now, so nothing may be detached here whatever --detach-on-exit says.
        let handed_over = handed_over || handing_over;
        let signalled = drain(
            &args,
            &mut agent,
            &proxy,
            &mut sigterm,
            &mut sigint,
            handed_over,
        )
        .await;
        if handed_over {
            info!("node stopped; its successor serves the node");
            if args.wait_after_handover && !signalled {
                info!("waiting for SIGTERM (--wait-after-handover)");
                tokio::select! {
                    _ = sigterm.recv() => {}
                    _ = sigint.recv() => {}
                }
            }
        } else if args.detach_on_exit {
            agent.unenroll_all().await;
            info!("capture detached; node stopped");
        } else {
            info!(
                "node stopped; capture stays attached and refuses new connections until the next start"
            );
        }
        Ok(())
    }
}

/// No new connections (listeners closed: capture stays attached and refuses them, or the
/// successor accepts them); the open ones may finish until the deadline; a second signal cuts
/// them now. After a handover the first signal is only noted: the kubelet sends it as soon as
/// the successor's pod is ready, which is when this drain has just begun. Returns whether a
/// signal came.
async fn drain(
    args: &NodeArgs,
    agent: &mut Agent,
    proxy: &ProxyContext,
    sigterm: &mut Signal,
    sigint: &mut Signal,
    handed_over: bool,
) -> bool {
    agent.close_listeners().await;
    proxy.drain.start();
    proxy.hbone.stop_pooling();
    let drain = &proxy.drain;
    info!(
        open = drain.open(),
        hbone_connections = drain.open_hbone(),
        deadline = ?args.drain_timeout,
        "draining: listeners closed, waiting for open connections"
    );
    let deadline = tokio::time::sleep(args.drain_timeout);
    tokio::pin!(deadline);
    let mut signalled = false;
    loop {
        let name = tokio::select! {
            () = drain.idle() => {
                info!("drained: every connection finished");
                return signalled;
            }
            () = &mut deadline => {
                warn!(
                    open = drain.open(),
                    hbone_connections = drain.open_hbone(),
                    "drain deadline reached: cutting the connections still open"
                );
                return signalled;
            }
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        if handed_over && !signalled {
            info!(
                open = drain.open(),
                "{name} while draining after the handover: draining on"
            );
            signalled = true;
            continue;
        }
        warn!(
            open = drain.open(),
            "second {name}: cutting open connections"
        );
        return true;
    }
}

/// After the pods a predecessor handed over were enrolled once: retries those that failed until
/// every one is enrolled with its handed-over listeners, or gives up after `timeout` (the
/// predecessor then goes on serving).
async fn wait_until_taken_over(agent: &mut Agent, state: &State, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let missing = agent.pods_not_taken_over();
        if missing.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "pods {missing:?} could not be taken over within {timeout:?} \
                 (--handover-timeout): giving up; the running node process goes on serving"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Err(e) = agent.apply(state).await {
            warn!("taking over: {e:#}");
        }
    }
}

/// What every tunnel of this node shares: the state, the original destinations, the CA, the
/// HBONE client and its pool, the metrics, the connection tracker and the drain.
fn proxy_context(
    args: &NodeArgs,
    state: watch::Receiver<Arc<State>>,
    datapath: &Datapath,
    certs: Arc<CertManager>,
    metrics: Arc<Metrics>,
) -> ProxyContext {
    let hbone_settings = HboneSettings {
        max_streams_per_connection: args.hbone_max_streams.max(1),
        max_requests_per_connection: args.hbone_max_requests_per_connection,
        ping_interval: args.hbone_ping_interval,
        ping_timeout: args.hbone_ping_timeout,
        idle_timeout: args.hbone_idle_timeout,
        handshake_timeout: args.hbone_handshake_timeout,
        ..HboneSettings::default()
    };
    let drain = Arc::new(Drain::default());
    ProxyContext {
        state,
        original_destinations: datapath.original_destinations(),
        deliveries: datapath.deliveries(),
        loopback_flags: datapath.loopback_flags(),
        node_addresses: Default::default(),
        deliver_from: args.deliver_from,
        capture: args.capture,
        connect_timeout: args.connect_timeout,
        certs: certs.clone(),
        hbone: Arc::new(HboneClient::new(
            hbone_settings.clone(),
            certs,
            args.connect_timeout,
            drain.clone(),
        )),
        hbone_settings,
        metrics,
        tracker: Default::default(),
        drain,
    }
}

/// The CA that signs this node's workload certificates; a missing or malformed plug-in CA file
/// stops the node with an error naming it.
fn certificate_authority(args: &NodeArgs) -> Result<Arc<dyn CertificateAuthority>> {
    if let Some(address) = &args.ca_address {
        let root = args
            .ca_root_cert
            .clone()
            .unwrap_or_else(|| args.xds_root_cert.clone());
        let ca = IstiodCa::new(
            address,
            root,
            Some(args.token_file.clone()),
            &args.trust_domain,
        )?;
        info!(%address, "certificates from istiod's CA");
        return Ok(Arc::new(ca));
    }
    if let Some(dir) = &args.ca_dir {
        let ca = PluginCa::load(dir, &args.trust_domain)?;
        info!(dir = %dir.display(), "using the plug-in CA");
        return Ok(Arc::new(ca));
    }
    let ca = BuiltinCa::generate(&args.trust_domain)?;
    if let Some(parent) = args.ca_root_out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    ca.write_root(&args.ca_root_out)?;
    info!(root = %args.ca_root_out.display(), "using a built-in CA for this node alone");
    Ok(Arc::new(ca))
}

/// The Kubernetes API's view of this node, connected: the mesh under `--source kubernetes`,
/// this node's pods alone (`local_only`) under `--source xds`; pods located through the
/// sandboxes the CNI plugin reports, else by the /proc scan.
async fn kubernetes_source(
    args: &NodeArgs,
    cgroup_root: &Path,
    sandboxes: &Arc<SandboxRegistry>,
    local_only: bool,
) -> Result<KubernetesSource> {
    let locator = Arc::new(SandboxLocator {
        registry: sandboxes.clone(),
        cgroup_root: cgroup_root.to_owned(),
        fallback: ProcLocator::new(args.proc_root.clone(), cgroup_root),
    });
    let new = if local_only {
        KubernetesSource::local_pods_only
    } else {
        KubernetesSource::new
    };
    let mut k8s = new(
        &args.node,
        &args.trust_domain,
        args.own_pod.clone(),
        locator,
    );
    k8s.connect(Duration::from_secs(60)).await?;
    Ok(k8s)
}

/// How `--source xds` reaches istiod and who this node is to it.
fn xds_settings(args: &NodeArgs) -> XdsSettings {
    let (pod_namespace, pod_name) = args
        .own_pod
        .as_deref()
        .and_then(|p| p.split_once('/'))
        .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
        .unwrap_or_else(|| ("istio-system".to_owned(), format!("ambit-{}", args.node)));
    XdsSettings {
        address: args.xds_address.clone(),
        root_cert: args.xds_root_cert.clone(),
        token: Some(args.token_file.clone()),
        node_name: args.node.clone(),
        pod_name,
        pod_namespace,
        instance_ip: args.instance_ip.clone(),
        cluster_id: args.cluster_id.clone(),
    }
}

/// The fast path needs the tunnel's own sockets seen by sock_ops: attach it to the node
/// process's cgroup (a DaemonSet container's; the lab gives each node one). In the host's root
/// cgroup it would run for every process on the host, so the node refuses to start there
/// with the fast path on.
fn attach_to_own_cgroup(datapath: &mut Datapath) -> Result<()> {
    let Some(path) = cgroup::own_cgroup()? else {
        bail!(
            "--fast-path on needs the node in a cgroup of its own (it is in the host's root \
             cgroup, where the fast path's sock_ops program would run for every process): run it \
             in a container or a cgroup of its own, or pass --fast-path off"
        );
    };
    let dir = std::fs::File::open(&path)
        .with_context(|| format!("opening the node's own cgroup {}", path.display()))?;
    datapath.attach_tunnel_cgroup(&dir, &path)
}

/// Each captured connection holds a few sockets: raise the soft fd limit to the hard one.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn check_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("ambit node needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)");
    }
    Ok(())
}

/// Hands the heap pages start-up freed back to the kernel. Loading the eBPF object parses the
/// kernel's BTF (megabytes, freed once the programs are loaded), but glibc keeps freed pages
/// below the top of its heaps: without this they stay in the node's RSS for its whole life.
fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
