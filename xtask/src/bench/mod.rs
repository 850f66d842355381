//! `cargo xtask bench`: every mode side by side on one lab, each measured several times with
//! the modes alternating, so that drift hits every mode alike and the spread is visible.
//!
//! Modes (`mode.rs`), all measured from pod a with the same unmodified clients:
//! - **plain**: pod a → pod c across the two lab nodes, no Ambit (the physical limit here);
//! - **relay**: pod a → pod c through a plaintext relay (src/bin/bench-relay.rs: no TLS, no
//!   HTTP/2) at each of the two hops Ambit's tunnel takes: what two userspace proxy hops cost
//!   by themselves, the floor under every figure of the tunnel's modes;
//! - **iptables**: Ambit's HBONE tunnel, captured by iptables REDIRECT rules in pod a instead of
//!   eBPF (`ambit node --capture iptables`): isolates the cost of capture;
//! - **ambit**: eBPF capture + HBONE mTLS between the two lab nodes (a on n1 → c on n2);
//! - **ambit-pqc**: ambit with both nodes on `--compliance-policy pqc` (X25519MLKEM768 only):
//!   what the post-quantum key exchange costs;
//! - **ambit-pod-source**: ambit with both nodes on `--deliver-from pod`: the delivery from the
//!   pod's own address that ambit's delivery from the client's address replaced;
//! - **ambit-same-node**: the same between two pods of one node (a → b, both on n1);
//! - **ztunnel**: Istio's ztunnel instead of Ambit, in dedicated mode in pods a and c (its own
//!   iptables capture in a), with as many worker threads as Ambit's nodes: the reference, from
//!   the same run. Measured when `ambit_lab::Ztunnel::find` finds its binary, else listed as
//!   skipped with the reason;
//! - **ambit+sockmap**: ambit with both nodes on `--fast-path on`: the loopback hops (app →
//!   tunnel, tunnel → app) carried by sockhash + sk_msg instead of loopback TCP.
//!
//! Figures (`stats.rs`): single- and 8-stream throughput (iperf3); request/response latency
//! p50/p90/p99 for 1 B, 100 B and 1 KiB messages over a long-lived connection; new connections
//! per second (connect, one 1-byte exchange, close); CPU seconds per GiB moved, of the whole
//! machine and of the proxies (the `ambit node` processes, the relays or the ztunnels; also as
//! proxy cores per Gbit/s); the client-side proxy's RSS idle, under load, and per 1,000 idle
//! connections (ambit and ztunnel, once per run).
//!
//! One lab (prefix `ambit-bench`) serves the whole run: the echo server (rr.py) and `iperf3 -s`
//! run in the server pods throughout; each repetition starts each mode's nodes, measures
//! (`measure.rs`) and stops them again (`session.rs`). Output (`report.rs`, `svg.rs`): the table
//! on stdout — median (min–max) and the ratio to plain per figure and mode — and
//! target/bench/results.json, results.md and chart.svg.
//!
//! `AMBIT_BENCH_NODE_ARGS`: more `ambit node` flags (split on whitespace), to compare settings
//! run against run. This is a benchmark, not a test: nothing here has a threshold.

mod measure;
mod mode;
mod report;
mod session;
mod stats;
mod svg;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use ambit_lab::{Lab, Ztunnel};
use anyhow::{bail, Context as _, Result};
use serde_json::json;

use self::{
    mode::Mode,
    session::Session,
    stats::{format_value, Figure, Figures, Results},
};

const PREFIX: &str = "ambit-bench";

#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of every mode (the modes alternate within each), for the spread.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Seconds per throughput and connection-rate measurement.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    seconds: u32,
    /// Modes to run, comma-separated, in the order given (ztunnel needs its binary: listed in
    /// the output, never measured without).
    #[arg(long, value_delimiter = ',', default_values_t = Mode::ALL)]
    modes: Vec<Mode>,
}

/// What every step needs: where things are, and the settings.
#[derive(Clone)]
pub struct Env {
    pub ambit: PathBuf,
    /// The relay mode's proxy (src/bin/bench-relay.rs), built with the release profile.
    pub relay: PathBuf,
    /// Istio's ztunnel for the ztunnel mode, if found.
    pub ztunnel: Option<Ztunnel>,
    pub rr: PathBuf,
    pub hold: PathBuf,
    /// target/bench: configs, node logs, CA, results.
    pub dir: PathBuf,
    pub ca: PathBuf,
    /// More `ambit node` flags (AMBIT_BENCH_NODE_ARGS); a `--worker-threads` there replaces
    /// the per-mode choice (`Mode::worker_threads`).
    pub node_args: Vec<String>,
    /// The machine's CPUs, shared by each mode's nodes.
    pub cores: usize,
    pub seconds: u32,
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    ambit_lab::require_root()?;
    let mut modes: Vec<Mode> = Vec::new();
    for &mode in &args.modes {
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    crate::cargo(&["build", "--release", "-p", "ambit"])?;
    if modes.contains(&Mode::Relay) {
        crate::cargo(&["build", "--release", "-p", "xtask", "--bin", "bench-relay"])?;
    }
    let built = started.elapsed();
    let mut results = Results::new(&modes, args.reps);
    let ztunnel = match Ztunnel::find() {
        Ok(ztunnel) => Some(ztunnel),
        Err(why) => {
            results.skip(Mode::Ztunnel, format!("skipped: {why}"));
            None
        }
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = root.join("target/bench");
    let env = Env {
        ambit: root.join("target/release/ambit"),
        relay: root.join("target/release/bench-relay"),
        ztunnel,
        rr: root.join("xtask/bench/rr.py"),
        hold: root.join("xtask/bench/hold.py"),
        ca: dir.join("ca"),
        dir,
        node_args: std::env::var("AMBIT_BENCH_NODE_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        seconds: args.seconds,
        cores: ambit_lab::cores(),
    };
    fs::create_dir_all(&env.dir)?;
    if modes.contains(&Mode::Iptables) {
        require_iptables_capture(&env.ambit)?;
    }

    let mut lab = Lab::create(PREFIX)?;
    // Measure what a node logs by default: one access-log line per connection.
    lab.set_node_log("info");
    if !env.ca.join("root-cert.pem").exists() {
        lab.init_ca(&env.ambit, &env.ca)?;
    }
    // Ambit's modes measure the connection rate twice (pooled, and a handshake each).
    let measurements = results.modes.len() * args.reps as usize * 2;
    let connrate_ports: Vec<u16> = (0..measurements)
        .map(|n| u16::try_from(n).map(|n| measure::CONNRATE_FIRST_PORT + n))
        .collect::<Result<_, _>>()
        .context("too many repetitions for one echo port per measurement")?;
    start_servers(&mut lab, &env, &results.modes, &connrate_ports)?;
    for (mode, reason) in &results.skipped {
        println!("== {mode}: {reason} ({}); not measured", mode.description());
    }
    let measured = results.modes.clone();
    let mut connrate_port = connrate_ports.iter().copied();
    for rep in 1..=args.reps {
        for &mode in &measured {
            println!("== {rep}/{} {mode}: {}", args.reps, mode.description());
            if rep == 1 && matches!(mode, Mode::Ambit | Mode::Ztunnel) {
                let per_1000 = rss_per_1000_idle(&mut lab, &env, mode)?;
                println!("   RSS per 1,000 idle connections: {per_1000:.2} MiB");
                results.push(mode, Figure::RssPer1000, per_1000);
            }
            let port = connrate_port
                .next()
                .context("an echo port per measurement")?;
            let figures = measure_mode(&mut lab, &env, mode, port)?;
            println!("   {}", summary_line(&figures));
            results.add(mode, &figures);
            if matches!(mode, Mode::Ambit | Mode::AmbitPqc) {
                let port = connrate_port
                    .next()
                    .context("an echo port per measurement")?;
                let rate = handshake_each_rate(&mut lab, &env, mode, port)?;
                println!("   new connections with a TLS handshake each: {rate:.0}/s");
                results.push(mode, Figure::ConnRateHandshakeEach, rate);
            }
        }
    }
    drop(lab);

    let wall = started.elapsed();
    write_results(&env, args, &results, built, wall)?;
    println!("\n{}", report::text_table(&results));
    println!(
        "results: {0}/results.json, {0}/results.md, {0}/chart.svg; node logs and configs in {0}",
        env.dir.display()
    );
    println!(
        "cargo xtask bench took {} (build {}, lab and measurements {})",
        format_duration(wall),
        format_duration(built),
        format_duration(wall - built)
    );
    Ok(())
}

/// `--capture iptables` is what the iptables mode is made of; without it, say so up front.
fn require_iptables_capture(ambit: &Path) -> Result<()> {
    let out = Command::new(ambit)
        .args(["node", "--help"])
        .output()
        .with_context(|| format!("running {} node --help", ambit.display()))?;
    if !String::from_utf8_lossy(&out.stdout).contains("--capture") {
        bail!(
            "mode iptables needs `ambit node --capture iptables`, which {} does not have (yet); \
             leave the mode out: --modes plain,ambit,ambit-same-node,ambit+sockmap",
            ambit.display()
        );
    }
    Ok(())
}

/// The echo server and `iperf3 -s` in every server pod the measured modes use, for the whole
/// run.
fn start_servers(lab: &mut Lab, env: &Env, modes: &[Mode], connrate_ports: &[u16]) -> Result<()> {
    let mut pods: Vec<&str> = modes.iter().map(|m| m.server()).collect();
    pods.sort_unstable();
    pods.dedup();
    for pod in pods {
        let mut echo = lab.pod_command(pod, "python3");
        echo.arg(&env.rr)
            .arg("server")
            .args(
                std::iter::once(measure::RR_PORT)
                    .chain(connrate_ports.iter().copied())
                    .map(|port| port.to_string()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        lab.spawn(&format!("echo server in {pod}"), echo)?;
        let mut iperf = lab.pod_command(pod, "iperf3");
        iperf
            .args(["-s", "-p", &measure::IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        lab.spawn(&format!("iperf3 server in {pod}"), iperf)?;
        for port in std::iter::once(measure::RR_PORT).chain(connrate_ports.iter().copied()) {
            lab.wait_listening(pod, port, &format!("echo server in pod {pod}"))?;
        }
    }
    // iperf3 -s is not probed (a probe would count as a failed test); give it a moment.
    thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// One measurement of one mode: its nodes start, the clients run, its nodes stop.
fn measure_mode(lab: &mut Lab, env: &Env, mode: Mode, connrate_port: u16) -> Result<Figures> {
    let ports = [measure::IPERF_PORT, measure::RR_PORT, connrate_port];
    let session = Session::start(lab, env, mode, mode.name(), &ports)?;
    let figures = measure::figures(lab, env, &session, connrate_port)?;
    session.stop(lab, env)?;
    Ok(figures)
}

/// The connection rate with nodes that give every tunneled connection its own HBONE
/// connection (`--hbone-max-requests-per-connection 1`), so each one pays a TLS handshake:
/// `ambit` against `ambit-pqc` prices X25519 against X25519MLKEM768.
fn handshake_each_rate(lab: &mut Lab, env: &Env, mode: Mode, port: u16) -> Result<f64> {
    let mut env = env.clone();
    env.node_args
        .extend(["--hbone-max-requests-per-connection".into(), "1".into()]);
    let tag = format!("{mode}-handshake-each");
    let session = Session::start(lab, &env, mode, &tag, &[port])?;
    let rate = measure::conn_per_s(lab, &env, &session, port)?;
    session.stop(lab, &env)?;
    Ok(rate)
}

/// Once per run, in nodes of its own so that no other traffic has touched them.
fn rss_per_1000_idle(lab: &mut Lab, env: &Env, mode: Mode) -> Result<f64> {
    let session = Session::start(
        lab,
        env,
        mode,
        &format!("{mode}-idle-conns"),
        &[measure::RR_PORT],
    )?;
    let per_1000 = measure::rss_per_1000_idle(lab, env, &session)?;
    session.stop(lab, env)?;
    Ok(per_1000)
}

fn summary_line(f: &Figures) -> String {
    let value = |figure| f.get(figure).map_or("n/a".into(), format_value);
    let latency = |pct| value(Figure::Latency { bytes: 100, pct });
    let mut line = format!(
        "{} Gbit/s (8 streams {}), 100 B p50 {} µs p99 {} µs, {} conn/s, machine {} CPU s/GiB",
        value(Figure::Throughput1),
        value(Figure::Throughput8),
        latency(50),
        latency(99),
        value(Figure::ConnRate),
        value(Figure::MachineCpuPerGib),
    );
    if f.get(Figure::ProxyCpuPerGib).is_some() {
        line.push_str(&format!(
            ", proxy {} CPU s/GiB, RSS {} MiB idle {} MiB load",
            value(Figure::ProxyCpuPerGib),
            value(Figure::RssIdle),
            value(Figure::RssLoad),
        ));
    }
    line
}

fn write_results(
    env: &Env,
    args: &Args,
    results: &Results,
    built: Duration,
    wall: Duration,
) -> Result<()> {
    let settings = json!({
        "reps": args.reps,
        "seconds": args.seconds,
        "modes": results.modes.iter().chain(results.skipped.iter().map(|(m, _)| m)).map(|m| m.name()).collect::<Vec<_>>(),
        "node_args": env.node_args,
        "latency_round_trips": 5000,
        "idle_connections": measure::IDLE_CONNECTIONS,
        "build_seconds": built.as_secs_f64(),
        "wall_seconds": wall.as_secs_f64(),
    });
    let json = report::json(results, machine(), settings);
    let write = |name: &str, text: String| {
        let path = env.dir.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("results.json", serde_json::to_string_pretty(&json)? + "\n")?;
    write("results.md", report::markdown_table(results))?;
    write("chart.svg", svg::chart(results))
}

/// What the figures were measured on.
fn machine() -> serde_json::Value {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned());
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    json!({
        "nproc": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "date": date,
    })
}

fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m {:02}s", s / 60, s % 60)
}
