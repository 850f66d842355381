//! Inbound plaintext: connections to an enrolled pod's IP that `ambit_sk_lookup` handed to this
//! listener. The accepted socket's local address is the original destination. The tunnel then
//! connects to the app inside the pod's netns, from the pod's own address, which sk_lookup lets
//! through (it never captures a connection from the pod to itself).

use std::{net::SocketAddr, sync::Arc};

use anyhow::{bail, Result};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn, Instrument as _};

use super::{accept, connector, relay, ProxyContext};
use crate::{
    config::MtlsMode,
    hbone::server::TUNNEL_PORTS,
    netns::Netns,
    observability::{ConnectionRecord, Outcome, Peer, Reporter},
    policy::{ConnectionInfo, Decision},
};

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
        let pod = this.pod.clone();
        accept::serve(listener, "inbound", &pod, move |stream, peer| {
            let this = this.clone();
            let span = tracing::info_span!("inbound", pod = %this.pod, src = %peer);
            async move {
                if let Err(e) = this.handle(stream, peer).await {
                    warn!(error = %format!("{e:#}"), "inbound connection failed");
                }
            }
            .instrument(span)
        })
        .await
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr) -> Result<()> {
        let _open = self.ctx.drain.track();
        // sk_lookup keeps the destination the client used as our local address.
        let original = stream.local_addr()?;
        if TUNNEL_PORTS.contains(&original.port()) {
            bail!(
                "refusing plaintext to the tunnel's own port {}",
                original.port()
            );
        }
        let (src_workload, dst_workload, mode) = {
            let state = self.ctx.state.borrow();
            (
                state.workload_by_ip(peer.ip()).cloned(),
                state.workloads.get(&self.pod).cloned(),
                state.enrolled.get(&self.pod).map(|p| p.mtls_mode),
            )
        };
        let src = match &src_workload {
            Some(w) => Peer::workload(w, peer),
            None => Peer::addr(peer),
        };
        let dst = match &dst_workload {
            Some(w) => Peer::workload(w, original),
            None => Peer::addr(original),
        };
        let record = ConnectionRecord::open(
            self.ctx.metrics.clone(),
            Reporter::Destination,
            // Plaintext: the source's identity is unproven, whatever its address says.
            Peer {
                identity: None,
                ..src
            },
            dst,
            None,
            None,
            false,
        );
        if mode == Some(MtlsMode::Strict) {
            // Closed without a byte: strict mTLS admits only HBONE.
            info!(original_dst = %original, "plaintext inbound refused: strict mTLS");
            record.close(Outcome::Denied {
                policy: "strict mTLS".into(),
            });
            return Ok(());
        }
        let conn_info = ConnectionInfo {
            src_ip: peer.ip(),
            src_identity: None,
            dst_ip: original.ip(),
            dst_port: original.port(),
        };
        let decision = {
            let state = self.ctx.state.borrow();
            match &dst_workload {
                Some(w) => state.authorize(w, &conn_info),
                None => Decision::Deny {
                    policy: "no local workload".into(),
                },
            }
        };
        if let Decision::Deny { policy } = decision {
            // Closed without a response, as ztunnel does for denied plaintext.
            info!(original_dst = %original, policy, "plaintext inbound denied by policy");
            record.close(Outcome::Denied { policy });
            return Ok(());
        }
        let mut tracked = self.ctx.tracker.register(&self.pod, conn_info);
        info!(
            original_dst = %original,
            src_workload = src_workload.as_ref().map(|w| w.key.as_str()).unwrap_or("unknown"),
            "captured inbound connection"
        );
        stream.set_nodelay(true)?;
        let app =
            match connector::connect_tcp(&self.netns, original, self.ctx.connect_timeout).await {
                Ok(app) => app,
                Err(e) => {
                    record.close(Outcome::Failed {
                        flag: "CONNECT",
                        error: format!("{e:#}"),
                    });
                    return Ok(());
                }
            };
        let (t, result) = tokio::select! {
            r = relay::relay(stream, app) => r,
            reason = tracked.revoked() => {
                record.close(Outcome::Denied { policy: reason });
                return Ok(());
            }
        };
        record.close(Outcome::Completed {
            request_bytes: t.sent,
            response_bytes: t.received,
            error: result.err().map(|e| e.to_string()),
        });
        Ok(())
    }
}
