//! `cargo xtask lab`: builds Ambit, sets up the two-node lab, starts one `ambit node` per lab
//! node from a config file the user can edit, shows a real request being captured, prints where
//! to look, and tears everything down on Ctrl-C (or right away with `--once`).

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use ambit_lab::{pod, Lab, WEB_VIP, WEB_VIP6};
use anyhow::{bail, Context as _, Result};

use crate::util::workspace_root;

const PREFIX: &str = "ambit-lab";

/// Where the lab's nodes get the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    File,
    Xds,
}

pub fn run(once: bool, source: Source) -> Result<()> {
    ambit_lab::require_root()?;
    crate::cargo(&["build", "--release", "-p", "ambit"])?;
    let root = workspace_root();
    let ambit = root.join("target/release/ambit");
    let dir = root.join("target/lab");
    fs::create_dir_all(dir.join("www"))?;
    fs::write(dir.join("www/index.html"), "hello from pod c (web)\n")?;

    println!("== building the lab: 2 nodes, 4 pods (network namespaces {PREFIX}-*)");
    let mut lab = Lab::create(PREFIX)?;
    let config = dir.join("lab.yaml");
    fs::write(&config, lab.config_yaml(&["a", "c"]))?;
    for p in ["c", "d"] {
        lab.start_http_server(p, 8080, &dir.join("www"))?;
    }
    let ca = dir.join("ca");
    if !ca.join("root-cert.pem").exists() {
        lab.init_ca(&ambit, &ca)?;
    }
    let logs: Vec<PathBuf> = ["n1", "n2"]
        .iter()
        .map(|n| dir.join(format!("{n}.log")))
        .collect();
    let workers = ambit_lab::worker_threads_per_node(ambit_lab::cores(), 2).to_string();
    let mut args = vec!["--worker-threads".to_owned(), workers];
    // With xDS the nodes' config file holds only where their pods are (what istio-cni tells
    // ztunnel); the mesh comes from the stand-in istiod, and certificates from its CA.
    let node_config = match source {
        Source::File => {
            args.extend(["--ca-dir".to_owned(), ca.display().to_string()]);
            config.clone()
        }
        Source::Xds => {
            let (mesh, pods) = ambit_lab::split_mesh_and_pods(&fs::read_to_string(&config)?);
            fs::write(&config, mesh)?;
            let pods_file = dir.join("pods.yaml");
            fs::write(&pods_file, pods)?;
            let log = dir.join("control-plane.log");
            let address = lab.start_control_plane(&ambit, "n2", &config, &ca, &log)?;
            println!(
                "== stand-in istiod serving {} at {address} (log {})",
                config.display(),
                log.display()
            );
            let token = dir.join("istio-token");
            fs::write(&token, "lab-token")?;
            args.extend(ambit_lab::xds_node_args(
                &address,
                &ca.join("root-cert.pem"),
                &token,
            ));
            pods_file
        }
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for (node, log) in ["n1", "n2"].iter().zip(&logs) {
        lab.start_node(&ambit, node, &node_config, log, &args)?;
    }
    println!("== Ambit nodes running: {PREFIX}-n1 (pods a, b), {PREFIX}-n2 (pods c, d)");

    demo(&lab, &logs)?;
    print_where_to_look(&lab, &config, &logs, &ambit);
    if source == Source::Xds {
        println!(
            "  with xDS:     {config} is served by the stand-in istiod (edit it: it pushes the change);
                the nodes' pods: {pods}; its log: {log}",
            config = config.display(),
            pods = dir.join("pods.yaml").display(),
            log = dir.join("control-plane.log").display(),
        );
    }

    if once {
        println!("== --once: tearing down");
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc_handler(move || flag.store(true, Ordering::SeqCst))?;
    println!("\n== lab is up; press Ctrl-C to tear it down");
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\n== tearing down the lab");
    drop(lab);
    println!("== done: no namespace, cgroup, pin or process of the lab remains");
    Ok(())
}

fn demo(lab: &Lab, logs: &[PathBuf]) -> Result<()> {
    let (c, c6) = (pod("c").ip, pod("c").ip6);
    // One request of each kind over each family: the lab is dual-stack.
    for (what, url) in [
        ("pod a → pod c by pod IP, IPv4", format!("http://{c}:8080/")),
        (
            "pod a → pod c by pod IP, IPv6",
            format!("http://[{c6}]:8080/"),
        ),
        (
            "pod a → service web by VIP, IPv4",
            format!("http://{WEB_VIP}/"),
        ),
        (
            "pod a → service web by VIP, IPv6",
            format!("http://[{WEB_VIP6}]/"),
        ),
    ] {
        println!("\n$ ip netns exec {PREFIX}-a curl -sS {url}     # {what}");
        let out = lab.run_in_pod("a", "curl", &["-sS", "--max-time", "10", &url])?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            bail!(
                "the demo request failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    println!(
        "\n== what the nodes logged (captured with the original destination, tunnelled as HBONE):"
    );
    for log in logs {
        let text = fs::read_to_string(log).unwrap_or_default();
        let shown = [
            "captured",
            "HBONE connection established",
            "HBONE stream accepted",
        ];
        for line in text.lines().filter(|l| shown.iter().any(|s| l.contains(s))) {
            println!("  {}", line);
        }
    }
    Ok(())
}

fn print_where_to_look(lab: &Lab, config: &Path, logs: &[PathBuf], ambit: &Path) {
    let n1 = lab.node_name("n1");
    println!(
        "\n== where to look
  config (edit it: set a pod's dataplaneMode to none, add a service; nodes apply it live):
      {config}
  logs:         tail -f {log1} {log2}
  a request:    ip netns exec {p}-a curl http://{c}:8080/     (b and d are outside the mesh)
                ip netns exec {p}-a curl 'http://[{c6}]:8080/'     (the same over IPv6)
  kernel state: {ambit} inspect --node {n1}
  node:         ip netns exec {p}-n1 curl -s 127.0.0.1:15020/metrics | grep istio_tcp
                ip netns exec {p}-n1 curl -s 127.0.0.1:15000/config_dump
  mesh root CA: {ca}
  bpftool:      bpftool prog show name ambit_connect4
                bpftool cgroup show {cg}
                bpftool map dump pinned /sys/fs/bpf/ambit/{n1}/MESH_DESTINATIONS
                bpftool link show
  no rules:     ip netns exec {p}-n1 iptables-save; ip netns exec {p}-n1 tc filter show dev link0 ingress
                (both empty: capture is eBPF attached to the pods only)",
        config = config.display(),
        log1 = logs[0].display(),
        log2 = logs[1].display(),
        p = PREFIX,
        c = pod("c").ip,
        c6 = pod("c").ip6,
        ambit = ambit.display(),
        cg = lab.pod_cgroup("a").display(),
        ca = config.with_file_name("ca").join("root-cert.pem").display(),
    );
}

/// Calls `f` on SIGINT or SIGTERM (it must only do async-signal-safe work, like setting a flag).
fn ctrlc_handler(f: impl Fn() + Send + Sync + 'static) -> Result<()> {
    static HANDLER: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>> = std::sync::OnceLock::new();
    if HANDLER.set(Box::new(f)).is_err() {
        bail!("signal handler already set");
    }
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(f) = HANDLER.get() {
            f();
        }
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only calls a closure that stores an atomic flag.
        let previous = unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
        if previous == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}
