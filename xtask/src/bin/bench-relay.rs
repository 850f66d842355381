//! `bench-relay`: the proxy of the benchmark's `relay` mode.
//!
//! A plaintext TCP relay with nothing else in it: no TLS, no HTTP/2, no policy, no capture.
//! Run at the two hops Ambit's tunnel takes (in the client pod's netns and in the server
//! pod's), it measures what two userspace proxy hops cost on this machine by themselves: the
//! floor under Ambit's figures. It copies the way Ambit's tunnel does: TCP_NODELAY on both
//! sides, reads of up to 256 KiB, a half-close passed on.
//!
//! ```text
//! bench-relay WORKERS LISTEN=TARGET [LISTEN=TARGET ...]
//! ```
//!
//! Prints `listening` once every listener is bound; a failed connection is reported on stderr.

use std::net::SocketAddr;

use anyhow::{bail, Context as _, Result};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage: bench-relay WORKERS LISTEN=TARGET [LISTEN=TARGET ...] \
                     (e.g. bench-relay 1 127.0.0.1:5201=10.201.2.2:15201)";

/// Ambit's tunnel reads up to 256 KiB at a time (`hbone::bridge`).
const BUFFER: usize = 256 * 1024;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((workers, pairs)) = args.split_first() else {
        bail!("{USAGE}");
    };
    let workers: usize = workers
        .parse()
        .with_context(|| format!("WORKERS {workers:?} is not a number; {USAGE}"))?;
    if pairs.is_empty() {
        bail!("no LISTEN=TARGET pair; {USAGE}");
    }
    let pairs = pairs
        .iter()
        .map(|pair| parse_pair(pair))
        .collect::<Result<Vec<_>>>()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()?
        .block_on(run(pairs))
}

fn parse_pair(pair: &str) -> Result<(SocketAddr, SocketAddr)> {
    let (listen, target) = pair
        .split_once('=')
        .with_context(|| format!("{pair:?} is not LISTEN=TARGET; {USAGE}"))?;
    let addr = |s: &str| {
        s.parse::<SocketAddr>()
            .with_context(|| format!("{s:?} in {pair:?} is not an IP:port"))
    };
    Ok((addr(listen)?, addr(target)?))
}

async fn run(pairs: Vec<(SocketAddr, SocketAddr)>) -> Result<()> {
    let mut listeners = Vec::new();
    for (listen, target) in pairs {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        listeners.push((listener, target));
    }
    println!("listening");
    let mut serving = tokio::task::JoinSet::new();
    for (listener, target) in listeners {
        serving.spawn(serve(listener, target));
    }
    while let Some(done) = serving.join_next().await {
        done??;
    }
    Ok(())
}

async fn serve(listener: TcpListener, target: SocketAddr) -> Result<()> {
    loop {
        let (inbound, peer) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = relay(inbound, target).await {
                eprintln!("bench-relay: {peer} → {target}: {e}");
            }
        });
    }
}

async fn relay(mut inbound: TcpStream, target: SocketAddr) -> std::io::Result<()> {
    inbound.set_nodelay(true)?;
    let mut outbound = TcpStream::connect(target).await?;
    outbound.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut outbound, BUFFER, BUFFER).await?;
    Ok(())
}
