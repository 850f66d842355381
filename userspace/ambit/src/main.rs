//! `ambit`: one node of the Ambit data path (`ambit node`, see `ambit::node`), and the tools
//! around it: inspect, ca init, reset, cni install|uninstall.

use std::{path::PathBuf, sync::Arc};

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing::info;

use ambit::{
    cni_install::{self, CniInstallArgs},
    control_plane::{self, ControlPlaneArgs},
    datapath::{self, pins::PinLayout},
    inspect,
    node::{Node, NodeArgs},
    observability::admin::SetLogLevel,
    tls::{BuiltinCa, DEFAULT_TRUST_DOMAIN},
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
    Node(Box<NodeArgs>),
    /// Show what is pinned for a node: programs, enrolled pods, mesh destinations, counters.
    Inspect {
        #[arg(long, env = "AMBIT_NODE")]
        node: String,
        #[arg(long, default_value = datapath::pins::DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// A stand-in istiod: xDS (workloads, services, policies from a config file) and a CA
    /// (signs workload CSRs), for labs and tests.
    ControlPlane(Box<ControlPlaneArgs>),
    /// Certificate authority tools.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The chained CNI plugin `ambit-cni` in the node's CNI configuration.
    #[command(subcommand)]
    Cni(CniCommand),
    /// Remove every pin of a node: detaches its programs from all its pods.
    Reset {
        #[arg(long, env = "AMBIT_NODE")]
        node: String,
        #[arg(long, default_value = datapath::pins::DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
}

#[derive(Subcommand)]
enum CniCommand {
    /// Copy this binary into the CNI bin directory as `ambit-cni`, chain it at the end of the
    /// primary CNI config's plugins, and keep it there (the primary CNI may rewrite its config)
    /// until SIGTERM; then keep it or take it out, as --on-exit says.
    Install(CniInstallArgs),
    /// Take `ambit-cni` out of every CNI config and delete its binary.
    Uninstall(CniInstallArgs),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new root CA (Ambit's built-in CA) in Istio's plug-in CA layout in DIR
    /// (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem), for `ambit node --ca-dir DIR`.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

fn main() -> Result<()> {
    // One binary in the image: copied onto a node's CNI bin directory as `ambit-cni`, it is
    // the chained CNI plugin (the runtime runs it by that name).
    let invoked_as = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&invoked_as).file_name() == Some(std::ffi::OsStr::new("ambit-cni")) {
        std::process::exit(match ambit_cni::plugin::main() {
            code if code == std::process::ExitCode::SUCCESS => 0,
            _ => 1,
        });
    }
    let cli = Cli::parse();
    ambit::tls::install_default_provider();
    match cli.command {
        Command::Node(args) => {
            let set_log_level = init_logging(args.log_json);
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = args.worker_threads {
                runtime.worker_threads(n.max(1));
            }
            let runtime = runtime.enable_all().build()?;
            let result =
                runtime.block_on(async { Node::build(*args, set_log_level).await?.run().await });
            // The node's work is done: do not wait for blocking threads still talking to a
            // successor that has not hung up yet (it takes over without this process).
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
        Command::ControlPlane(args) => {
            let _ = init_logging(false);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(control_plane::run(*args))
        }
        Command::Cni(CniCommand::Install(args)) => {
            let _ = init_logging(false);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(cni_install::install(&args))
        }
        Command::Cni(CniCommand::Uninstall(args)) => {
            let _ = init_logging(false);
            cni_install::uninstall(&args)
        }
        Command::Inspect { node, bpffs } => inspect::print(&PinLayout::new(&bpffs, &node)?),
        Command::Ca(CaCommand::Init { dir, trust_domain }) => {
            let ca = BuiltinCa::generate(&trust_domain)?;
            ca.write_plugin_layout(&dir)?;
            println!(
                "CA written to {} (root: {})",
                dir.display(),
                dir.join("root-cert.pem").display()
            );
            Ok(())
        }
        Command::Reset { node, bpffs } => {
            let pins = PinLayout::new(&bpffs, &node)?;
            pins.remove_all()?;
            println!("removed {}", pins.root().display());
            Ok(())
        }
    }
}

/// Logs to stderr (JSON lines with `--log-json`), filtered by RUST_LOG (default `info`); the
/// returned function changes the filter at run time (admin `POST /logging?level=`).
fn init_logging(json: bool) -> SetLogLevel {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder;
            let handle = builder.reload_handle();
            builder.init();
            Arc::new(move |level: &str| {
                let filter = EnvFilter::try_new(level)
                    .map_err(|e| anyhow::anyhow!("log filter {level:?}: {e}"))?;
                handle.reload(filter)?;
                info!(level, "log level changed");
                Ok(())
            }) as SetLogLevel
        }};
    }
    // Colour codes only for a person at a terminal: a log file or collector gets plain text.
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        install!(builder
            .json()
            .with_env_filter(filter)
            .with_filter_reloading())
    } else {
        install!(builder.with_env_filter(filter).with_filter_reloading())
    }
}
