//! One node: its command-line settings (`NodeArgs`) and its life (`run`): the desired state
//! from its source, the CA, the eBPF datapath, the per-pod tunnels, the agent that keeps them
//! in step, the observability endpoints, and the drain on SIGTERM. `main.rs` only parses the
//! command line and calls `run`.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    agent::{
        kubernetes::{discovery::ProcLocator, KubernetesSource},
        source::{FileSource, StateSource},
        Agent,
    },
    cgroup, datapath,
    datapath::Datapath,
    drain::Drain,
    hbone::{client::HboneClient, HboneSettings},
    observability::{
        admin::{self, Addresses, AdminContext, SetLogLevel},
        Metrics,
    },
    proxy::ProxyContext,
    tls::{
        BuiltinCa, CertManager, CertificateAuthority, CompliancePolicy, PluginCa,
        DEFAULT_TRUST_DOMAIN,
    },
};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// A ztunnel-format local config file, watched.
    File,
    /// The Kubernetes API (in-cluster config or KUBECONFIG).
    Kubernetes,
}

#[derive(clap::Args)]
pub struct NodeArgs {
    /// This node's name: workloads whose `node` matches are local.
    #[arg(long, env = "AMBIT_NODE")]
    node: String,
    /// Where the desired state comes from.
    #[arg(long, value_enum, default_value = "file")]
    source: SourceKind,
    /// ztunnel-format local config file (with Ambit's `ambit.pods` section); `--source file`.
    #[arg(long, required_if_eq("source", "file"))]
    config: Option<PathBuf>,
    /// The host's procfs, where pods' processes (and so their netns and cgroups) are found;
    /// `--source kubernetes` (in a DaemonSet: the host's /proc mounted read-only).
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,
    /// `namespace/name` of the agent's own pod, never enrolled.
    #[arg(long, env = "AMBIT_POD")]
    own_pod: Option<String>,
    /// Where bpffs is mounted.
    #[arg(long, default_value = datapath::pins::DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// The cgroup2 mount; found in /proc/self/mountinfo when not given.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Timeout for the tunnel's connections to upstreams and apps.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// SPIFFE trust domain of this node's workloads (unless a workload names its own).
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// A CA in Istio's plug-in CA layout (ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem), shared with other nodes (and Istio). Without it, a built-in CA is
    /// generated for this node alone and its root written to --ca-root-out.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Where the built-in CA's root certificate is written (PEM).
    #[arg(long, default_value = "/run/ambit/root-cert.pem")]
    ca_root_out: PathBuf,
    /// Istio's compliance policy for HBONE's TLS: empty (X25519, P-256, P-384 and the hybrid
    /// post-quantum X25519MLKEM768, in ztunnel's order) or `pqc` (X25519MLKEM768 only). Set it
    /// as on istiod and ztunnel.
    #[arg(
        long,
        env = "COMPLIANCE_POLICY",
        default_value = "",
        hide_default_value = true
    )]
    compliance_policy: CompliancePolicy,
    /// Lifetime of workload certificates; they are renewed at half of it.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// HBONE: streams per pooled connection before another is opened.
    #[arg(long, default_value_t = 100)]
    hbone_max_streams: usize,
    /// HBONE: streams a pooled connection carries in its life before it is retired (closed
    /// once its last stream ends); 0: no limit. 1 gives every connection its own handshake.
    #[arg(long, default_value_t = 0)]
    hbone_max_requests_per_connection: usize,
    /// HBONE: PING interval on every HBONE connection (the pooled ones this node opens and the
    /// ones its pods' servers accept).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    hbone_ping_interval: Duration,
    /// HBONE: a connection whose PING is not answered in this time is closed, with its streams.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    hbone_ping_timeout: Duration,
    /// HBONE: a pooled connection without streams for this long is released.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    hbone_idle_timeout: Duration,
    /// HBONE server: a peer that has not finished its TLS handshake after this long is dropped.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    hbone_handshake_timeout: Duration,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Admin (`/config_dump`, `POST /logging?level=`); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Detach capture on exit instead of keeping it (fail closed) for the next node process.
    #[arg(long)]
    detach_on_exit: bool,
    /// The eBPF programs' own log (what each one decided), forwarded to this log. Off costs
    /// nothing: the verifier removes the log calls.
    #[arg(long, value_enum, default_value = "off")]
    ebpf_log: datapath::EbpfLogLevel,
    /// How outbound connections are captured: `ebpf` (cgroup connect hooks), or `iptables`
    /// (REDIRECT rules installed in each pod by someone else; for comparison benchmarks).
    #[arg(long, value_enum, default_value = "ebpf")]
    capture: datapath::Capture,
    /// On SIGTERM: how long open connections may go on before the node exits anyway. Keep it
    /// below the pod's terminationGracePeriodSeconds.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Tokio worker threads of the tunnel (default: one per CPU).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 5s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

/// Runs the node until SIGTERM (and its drain) or a fatal error.
pub async fn run(args: NodeArgs, set_log_level: SetLogLevel) -> Result<()> {
    check_root()?;
    let cgroup_root = match &args.cgroup_root {
        Some(root) => root.clone(),
        None => cgroup::cgroup2_root()?,
    };
    raise_fd_limit();
    let mut annotator = None;
    let mut source: Box<dyn StateSource> = match args.source {
        SourceKind::File => {
            let config = args
                .config
                .as_deref()
                .context("--config is required with --source file")?;
            Box::new(FileSource::new(config, &args.node, &args.trust_domain))
        }
        SourceKind::Kubernetes => {
            let locator = Arc::new(ProcLocator {
                proc_root: args.proc_root.clone(),
                cgroup_root: cgroup_root.clone(),
            });
            let mut k8s = KubernetesSource::new(
                &args.node,
                &args.trust_domain,
                args.own_pod.clone(),
                locator,
            );
            k8s.connect(Duration::from_secs(60)).await?;
            annotator = k8s.annotator();
            Box::new(k8s)
        }
    };
    let initial = source.initial()?;
    let ca = certificate_authority(&args)?;
    let certs = Arc::new(
        CertManager::new(ca, args.cert_lifetime).with_compliance_policy(args.compliance_policy),
    );
    let datapath = Datapath::open(&args.bpffs, &args.node, args.ebpf_log, args.capture)?;
    let (state_tx, state_rx) = watch::channel(initial.clone());
    let metrics = Metrics::new();
    metrics.watch_ebpf_counters(&datapath.pins().map(ambit_abi::map_names::COUNTERS))?;
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
    let proxy = Arc::new(ProxyContext {
        state: state_rx,
        original_destinations: datapath.original_destinations(),
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
        metrics: metrics.clone(),
        tracker: Default::default(),
        drain,
    });
    let mut agent = Agent::new(datapath, cgroup_root, proxy.clone());
    if let Some(annotator) = annotator {
        agent.on_enrollment_change(move |pod, captured| annotator.mark(pod, captured));
    }
    let _admin = admin::start(
        AdminContext {
            node: args.node.clone(),
            state: state_tx.subscribe(),
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
    agent.apply(&initial).await?;
    info!(
        node = %args.node,
        source = %args.config.as_ref().map(|c| c.display().to_string()).unwrap_or_else(|| "kubernetes".into()),
        pins = %agent.datapath().pins().root().display(),
        enrolled = initial.enrolled.len(),
        "node ready"
    );
    release_startup_memory();

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
    loop {
        tokio::select! {
            Some(state) = updates.recv() => {
                state_tx.send_replace(state.clone());
                match agent.apply(&state).await {
                    Ok(()) => info!(enrolled = state.enrolled.len(), "config applied"),
                    Err(e) => error!("applying config: {e:#}"),
                }
                let closed = proxy.tracker.recheck(&state);
                if closed > 0 {
                    info!(closed, "connections closed: the new policy denies them");
                }
            }
            _ = retry.tick(), if agent.has_failed_pods() => {
                let state = state_tx.borrow().clone();
                if let Err(e) = agent.apply(&state).await {
                    error!("retrying enrollment: {e:#}");
                }
            }
            _ = renew.tick() => agent.refresh_certificates(),
            _ = vanished.tick() => {
                agent.release_vanished_pods().await;
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // Drain: no new connections (listeners closed, capture stays attached and refuses them),
    // the open ones may finish until the deadline; a second signal cuts them now.
    agent.close_listeners();
    proxy.drain.start();
    proxy.hbone.stop_pooling();
    let drain = &proxy.drain;
    info!(
        open = drain.open(),
        hbone_connections = drain.open_hbone(),
        deadline = ?args.drain_timeout,
        "draining: listeners closed, waiting for open connections"
    );
    tokio::select! {
        () = drain.idle() => info!("drained: every connection finished"),
        () = tokio::time::sleep(args.drain_timeout) => warn!(
            open = drain.open(),
            hbone_connections = drain.open_hbone(),
            "drain deadline reached: cutting the connections still open"
        ),
        _ = sigterm.recv() => warn!(open = drain.open(), "second SIGTERM: cutting open connections"),
        _ = sigint.recv() => warn!(open = drain.open(), "second SIGINT: cutting open connections"),
    }
    if args.detach_on_exit {
        agent.unenroll_all().await;
        info!("capture detached; node stopped");
    } else {
        info!(
            "node stopped; capture stays attached and refuses new connections until the next start"
        );
    }
    Ok(())
}

/// The CA that signs this node's workload certificates; a missing or malformed plug-in CA file
/// stops the node with an error naming it.
fn certificate_authority(args: &NodeArgs) -> Result<Arc<dyn CertificateAuthority>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }
}
