//! Inbound plaintext: connections to an enrolled pod's IP that `ambit_sk_lookup` handed to this
//! listener. The accepted socket's local address is the original destination. The tunnel then
//! connects to the app inside the pod's netns, from the client's address (`delivery`).

use std::{net::SocketAddr, sync::Arc};

use anyhow::{bail, Result};
use tokio::net::TcpStream;
use tracing::{debug, info};

use ambit_abi::TUNNEL_PORTS;

use super::delivery::AppDelivery;
use super::{
    admit::{admit, Admission, InboundConnection, Transport},
    ProxyContext,
};
use crate::{
    drain::Tracked,
    observability::{Outcome, ResponseFlag},
    socket::{accept, relay},
};

pub struct InboundPlaintext {
    ctx: Arc<ProxyContext>,
    pod: String,
    delivery: Arc<AppDelivery>,
}

impl InboundPlaintext {
    pub fn new(ctx: Arc<ProxyContext>, pod: String, delivery: Arc<AppDelivery>) -> Self {
        Self { ctx, pod, delivery }
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
        let admission = admit(
            &self.ctx,
            InboundConnection {
                pod: &self.pod,
                peer,
                target: original,
                transport: Transport::Plaintext,
            },
        );
        let (mut record, mut tracked) = match admission {
            Admission::Admitted { record, tracked } => (record, tracked),
            // Closed without a byte, as ztunnel does for denied plaintext.
            Admission::Denied {
                record,
                strict_mtls: true,
                policy,
            } => {
                info!(original_dst = %original, "plaintext inbound refused: strict mTLS");
                record.close(Outcome::Denied { policy });
                return Ok(());
            }
            Admission::Denied { record, policy, .. } => {
                info!(original_dst = %original, policy, "plaintext inbound denied by policy");
                record.close(Outcome::Denied { policy });
                return Ok(());
            }
        };
        debug!(original_dst = %original, "captured inbound connection");
        stream.set_nodelay(true)?;
        // This connection is a socket in the pod's netns from `peer` to `original`: no delivery
        // may use the same four-tuple while it is open.
        let _held = self.delivery.hold_plaintext_peer(peer, original.port());
        let app = match self.delivery.connect(peer.ip(), original).await {
            Ok(app) => app,
            Err(e) => {
                record.close(Outcome::Failed {
                    flag: ResponseFlag::Connect,
                    error: format!("{e:#}"),
                });
                return Ok(());
            }
        };
        self.ctx.note_fast_path(&mut record, &app);
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

impl accept::Handler for InboundPlaintext {
    const LISTENER: &'static str = "inbound";

    fn pod(&self) -> &str {
        &self.pod
    }

    fn track(&self) -> Tracked {
        self.ctx.drain.track()
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Result<()> {
        self.handle(stream, peer).await
    }
}
