//! `ambit`: one node of the Ambit data path.

mod agent;
mod cgroup;
mod config;
mod datapath;
mod inspect;
mod netns;
mod proxy;
mod state;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};
use tracing::{error, info};

use crate::{
    agent::{
        source::{FileSource, StateSource},
        Agent,
    },
    datapath::{pins::PinLayout, Datapath},
    proxy::ProxyContext,
};

#[derive(Parser)]
#[command(
    version,
    about = "Ambit: eBPF capture and tunnel for an ambient service mesh node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node: capture its enrolled pods' traffic and tunnel it.
    Node(NodeArgs),
    /// Show what is pinned for a node: programs, enrolled pods, mesh destinations, counters.
    Inspect {
        #[arg(long, env = "AMBIT_NODE")]
        node: String,
        #[arg(long, default_value = datapath::pins::DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Remove every pin of a node: detaches its programs from all its pods.
    Reset {
        #[arg(long, env = "AMBIT_NODE")]
        node: String,
        #[arg(long, default_value = datapath::pins::DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
}

#[derive(clap::Args)]
struct NodeArgs {
    /// This node's name: workloads whose `node` matches are local.
    #[arg(long, env = "AMBIT_NODE")]
    node: String,
    /// ztunnel-format local config file (with Ambit's `ambit.pods` section).
    #[arg(long)]
    config: PathBuf,
    /// Where bpffs is mounted.
    #[arg(long, default_value = datapath::pins::DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// The cgroup2 mount; found in /proc/self/mountinfo when not given.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Timeout for the tunnel's connections to upstreams and apps.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Detach capture on exit instead of keeping it (fail closed) for the next node process.
    #[arg(long)]
    detach_on_exit: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 5s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Node(args) => {
            init_logging(args.log_json);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run_node(args))
        }
        Command::Inspect { node, bpffs } => inspect::print(&PinLayout::new(&bpffs, &node)?),
        Command::Reset { node, bpffs } => {
            let pins = PinLayout::new(&bpffs, &node)?;
            pins.remove_all()?;
            println!("removed {}", pins.root().display());
            Ok(())
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run_node(args: NodeArgs) -> Result<()> {
    check_root()?;
    let cgroup_root = match &args.cgroup_root {
        Some(root) => root.clone(),
        None => cgroup::cgroup2_root()?,
    };
    let mut source: Box<dyn StateSource> = Box::new(FileSource::new(&args.config, &args.node));
    let initial = source.initial()?;
    let datapath = Datapath::open(&args.bpffs, &args.node)?;
    let (state_tx, state_rx) = watch::channel(initial.clone());
    let proxy = Arc::new(ProxyContext {
        state: state_rx,
        original_destinations: datapath.original_destinations(),
        connect_timeout: args.connect_timeout,
    });
    let mut agent = Agent::new(datapath, cgroup_root, proxy);
    agent.apply(&initial)?;
    info!(
        node = %args.node,
        config = %args.config.display(),
        pins = %agent.datapath().pins().root().display(),
        enrolled = initial.enrolled.len(),
        "node ready"
    );

    let (updates_tx, mut updates) = mpsc::channel(4);
    let _watch = source.watch(updates_tx);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            Some(state) = updates.recv() => {
                state_tx.send_replace(state.clone());
                match agent.apply(&state) {
                    Ok(()) => info!(enrolled = state.enrolled.len(), "config applied"),
                    Err(e) => error!("applying config: {e:#}"),
                }
            }
            _ = retry.tick(), if agent.has_failed_pods() => {
                let state = state_tx.borrow().clone();
                if let Err(e) = agent.apply(&state) {
                    error!("retrying enrollment: {e:#}");
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    if args.detach_on_exit {
        agent.unenroll_all();
        info!("capture detached; node stopped");
    } else {
        info!(
            "node stopped; capture stays attached and refuses new connections until the next start"
        );
    }
    Ok(())
}

fn check_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("ambit node needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
    }
}
