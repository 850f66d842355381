//! HBONE inbound (the HBONE server): the 15008 listener inside an enrolled pod's netns. It serves the pod's
//! certificate, requires a client certificate from the mesh's CA and trust domain, and answers
//! each CONNECT in ztunnel's order (see `docs/hbone.md`):
//! 400 not CONNECT / bad authority / authority not this pod's address; 503 no such workload or a
//! tunnel port; 401 denied by policy; 503 the app refused; 200 and bytes flow.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument as _};

use super::delivery::AppDelivery;
use super::{
    admit::{admit, Admission, InboundConnection, Transport},
    ProxyContext,
};
use crate::{
    drain::{Drain, Tracked},
    hbone::{
        bridge::bridge,
        keepalive,
        request::{check_connect, Refusal},
        HboneSettings,
    },
    observability::{Outcome, ResponseFlag},
    socket::accept,
    tls::{self, Identity, WorkloadCert},
};

pub struct HboneServer {
    ctx: Arc<ProxyContext>,
    pod: String,
    identity: Identity,
    delivery: Arc<AppDelivery>,
    /// Closed when the pod's tunnel is dropped (un-enrolled, or its netns vanished).
    pod_gone: watch::Receiver<()>,
    /// The server config for the current certificate; rebuilt when the certificate rotates.
    config: Mutex<Option<(Arc<WorkloadCert>, Arc<rustls::ServerConfig>)>>,
}

impl HboneServer {
    pub fn new(
        ctx: Arc<ProxyContext>,
        pod: String,
        identity: Identity,
        delivery: Arc<AppDelivery>,
        pod_gone: watch::Receiver<()>,
    ) -> Self {
        Self {
            ctx,
            pod,
            identity,
            delivery,
            pod_gone,
            config: Mutex::new(None),
        }
    }

    fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let cert = self.ctx.certs.get(&self.identity)?;
        let mut cached = self.config.lock().unwrap();
        if let Some((c, config)) = cached.as_ref() {
            if Arc::ptr_eq(c, &cert) {
                return Ok(config.clone());
            }
        }
        let config = tls::server_config(
            &cert,
            &self.ctx.certs.roots(),
            self.ctx.certs.compliance_policy(),
        )?;
        *cached = Some((cert, config.clone()));
        Ok(config)
    }

    async fn serve_connection(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr) -> Result<()> {
        let local = tcp.local_addr()?;
        tcp.set_nodelay(true)?;
        let acceptor = TlsAcceptor::from(self.server_config()?);
        let tls = tokio::time::timeout(
            self.ctx.hbone_settings.handshake_timeout,
            acceptor.accept(tcp),
        )
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
        let peer_identity = tls::peer_identity(tls.get_ref().1);
        debug!(
            %peer,
            client_identity = %peer_identity.as_ref().map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            kx = %tls::key_exchange(tls.get_ref().1),
            "HBONE connection accepted"
        );
        let s: &HboneSettings = &self.ctx.hbone_settings;
        let mut connection = s
            .h2_server()
            .handshake::<_, Bytes>(tls)
            .await
            .context("HTTP/2 handshake")?;
        let mut draining = false;
        let mut pod_gone = self.pod_gone.clone();
        let unanswered =
            keepalive::until_unanswered(connection.ping_pong(), s.ping_interval, s.ping_timeout);
        tokio::pin!(unanswered);
        loop {
            let next = tokio::select! {
                next = connection.accept() => next,
                reason = &mut unanswered => {
                    // Dropping the connection resets its streams: their bridges end and close
                    // their sockets to the app.
                    warn!(reason, "HBONE connection closed: the peer stopped answering PINGs");
                    break;
                }
                () = stop_taking_streams(&self.ctx.drain, &mut pod_gone), if !draining => {
                    // SIGTERM, or the pod left: GOAWAY, so the peer opens new streams elsewhere;
                    // the streams already open go on, and accept() ends once they are done.
                    connection.graceful_shutdown();
                    draining = true;
                    continue;
                }
            };
            let Some(next) = next else { break };
            let (request, respond) = next.context("HTTP/2")?;
            let this = self.clone();
            let peer_identity = peer_identity.clone();
            tokio::spawn(
                async move {
                    if let Err(e) = this
                        .serve_stream(request, respond, local, peer, peer_identity)
                        .await
                    {
                        warn!(error = %format!("{e:#}"), "HBONE stream failed");
                    }
                }
                .in_current_span(),
            );
        }
        Ok(())
    }

    async fn serve_stream(
        &self,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        local: SocketAddr,
        peer: SocketAddr,
        peer_identity: Option<Identity>,
    ) -> Result<()> {
        let _open = self.ctx.drain.track();
        let target = match self.check(&request, local) {
            Ok(target) => target,
            Err((status, why)) => {
                info!(status = status.as_u16(), why, "HBONE request refused");
                respond.send_response(Response::builder().status(status).body(())?, true)?;
                return Ok(());
            }
        };
        // Step 4: authorization at the destination, on the proven identity.
        let admission = admit(
            &self.ctx,
            InboundConnection {
                pod: &self.pod,
                peer,
                target,
                transport: Transport::Hbone {
                    local,
                    identity: peer_identity.clone(),
                },
            },
        );
        let (mut record, mut tracked) = match admission {
            Admission::Admitted { record, tracked } => (record, tracked),
            Admission::Denied { record, policy, .. } => {
                info!(dst = %target, policy, status = 401, "HBONE request denied by policy");
                respond.send_response(
                    Response::builder()
                        .status(StatusCode::UNAUTHORIZED)
                        .body(())?,
                    true,
                )?;
                record.close(Outcome::Denied { policy });
                return Ok(());
            }
        };
        // The app sees the HBONE connection's peer, the client workload's address, as ztunnel
        // delivers it.
        let app = match self.delivery.connect(peer.ip(), target).await {
            Ok(app) => app,
            Err(e) => {
                let error = format!("{e:#}");
                info!(target = %target, error, status = 503, "HBONE target refused");
                respond.send_response(
                    Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .body(())?,
                    true,
                )?;
                record.close(Outcome::Failed {
                    flag: ResponseFlag::Connect,
                    error,
                });
                return Ok(());
            }
        };
        self.ctx.note_fast_path(&mut record, &app);
        // At debug, like the outbound side's "captured outbound connection": the access log
        // line at the end is the one info line per connection.
        debug!(dst = %target, src_identity = %peer_identity.as_ref().map(|i| i.to_string()).unwrap_or_else(|| "-".into()), "HBONE stream accepted");
        let response = Response::builder()
            .status(StatusCode::OK)
            .header("baggage", self.baggage())
            .body(())?;
        let send = respond.send_response(response, false)?;
        let recv = request.into_body();
        let (t, result) = tokio::select! {
            r = bridge(app, send, std::future::ready(Ok(recv))) => r,
            reason = tracked.revoked() => {
                // Dropping the bridge resets the HTTP/2 stream and closes the app's socket.
                record.close(Outcome::Denied { policy: reason });
                return Ok(());
            }
        };
        // bridge(app, ..): "sent" is app → client (response), "received" client → app (request).
        record.close(Outcome::Completed {
            request_bytes: t.received,
            response_bytes: t.sent,
            error: result.err().map(|e| e.to_string()),
        });
        Ok(())
    }

    /// Steps 1–3 of the answer order: what to connect to, or the status to refuse with.
    /// The rules are in `request`; this server only says which address is its pod's.
    fn check(
        &self,
        request: &Request<h2::RecvStream>,
        local: SocketAddr,
    ) -> Result<SocketAddr, Refusal> {
        check_connect(request, local, |ip| {
            let state = self.ctx.state.borrow();
            state.workload_by_ip(ip).is_some_and(|w| w.key == self.pod)
        })
    }

    fn baggage(&self) -> String {
        let state = self.ctx.state.borrow();
        match state.workloads.get(&self.pod) {
            Some(w) => w.baggage(),
            None => String::new(),
        }
    }
}

/// Resolves when an HBONE connection should take no more streams: the node drains, or the pod's
/// tunnel was dropped (the sender side of `pod_gone` closed).
async fn stop_taking_streams(drain: &Drain, pod_gone: &mut watch::Receiver<()>) {
    tokio::select! {
        () = drain.started() => {}
        _ = pod_gone.changed() => {}
    }
}

impl accept::Handler for HboneServer {
    const LISTENER: &'static str = "HBONE";

    fn pod(&self) -> &str {
        &self.pod
    }

    /// Through the TLS and HTTP/2 handshakes until h2 has written the last frame and closed
    /// the connection: one still in its handshake when the drain begins gets its GOAWAY and
    /// its streams served too.
    fn track(&self) -> Tracked {
        self.ctx.drain.track_hbone()
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Result<()> {
        self.serve_connection(stream, peer).await
    }
}
