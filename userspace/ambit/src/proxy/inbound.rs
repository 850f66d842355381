//! Inbound plaintext: connections to an enrolled pod's IP that `ambit_sk_lookup` handed to this
//! listener. The accepted socket's local address is the original destination. The tunnel then
//! connects to the app inside the pod's netns, from the pod's own address, which sk_lookup lets
//! through (it never captures a connection from the pod to itself).

use std::{net::SocketAddr, sync::Arc};

use anyhow::{bail, Result};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn, Instrument as _};

use super::{connector, relay, ProxyContext};
use crate::{config::MtlsMode, hbone::server::TUNNEL_PORTS, netns::Netns};

pub struct InboundPlaintext {
    ctx: Arc<ProxyContext>,
    pod: String,
    netns: Arc<Netns>,
}

impl InboundPlaintext {
    pub fn new(ctx: Arc<ProxyContext>, pod: String, netns: Arc<Netns>) -> Self {
        Self { ctx, pod, netns }
    }

    pub async fn run(self, listener: TcpListener) {
        let this = Arc::new(self);
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(pod = %this.pod, error = %e, "inbound accept failed");
                    continue;
                }
            };
            let this = this.clone();
            let span = tracing::info_span!("inbound", pod = %this.pod, src = %peer);
            tokio::spawn(
                async move {
                    if let Err(e) = this.handle(stream, peer).await {
                        warn!(error = %format!("{e:#}"), "inbound connection failed");
                    }
                }
                .instrument(span),
            );
        }
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr) -> Result<()> {
        // sk_lookup keeps the destination the client used as our local address.
        let original = stream.local_addr()?;
        if TUNNEL_PORTS.contains(&original.port()) {
            bail!(
                "refusing plaintext to the tunnel's own port {}",
                original.port()
            );
        }
        let (src_workload, mode) = {
            let state = self.ctx.state.borrow();
            (
                state.workload_by_ip(peer.ip()).map(|w| w.key.clone()),
                state.enrolled.get(&self.pod).map(|p| p.mtls_mode),
            )
        };
        if mode == Some(MtlsMode::Strict) {
            // Closed without a byte: strict mTLS admits only HBONE.
            info!(original_dst = %original, "plaintext inbound refused: strict mTLS");
            return Ok(());
        }
        info!(
            original_dst = %original,
            src_workload = src_workload.as_deref().unwrap_or("unknown"),
            "captured inbound connection"
        );
        stream.set_nodelay(true)?;
        let app = connector::connect_tcp(&self.netns, original, self.ctx.connect_timeout).await?;
        let (t, result) = relay::relay(stream, app).await;
        info!(
            direction = "inbound",
            original_dst = %original,
            bytes_sent = t.sent,
            bytes_recv = t.received,
            duration_ms = t.duration.as_millis() as u64,
            error = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default(),
            "connection complete"
        );
        Ok(())
    }
}
