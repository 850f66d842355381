//! A stand-in waypoint: an HBONE server (mutual TLS 1.3, HTTP/2 CONNECT on port 15008) in a lab
//! pod's netns, holding a certificate for the waypoint's identity from the lab's CA. It records
//! every CONNECT it gets (the client's identity, the authority, the headers), then does what a
//! waypoint does with it: opens its own HBONE tunnel, as the waypoint, to the destination the
//! test routed that authority to, and joins the two streams. Built from Ambit's own TLS and
//! HBONE client code; the node proxies on both sides of it are the ones under test.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use ambit::{
    drain::Drain,
    hbone::{
        client::{HboneClient, TunnelRequest},
        HboneSettings,
    },
    netns::Netns,
    tls::{self, CertManager, CompliancePolicy, Identity, PluginCa},
};
use anyhow::{Context as _, Result};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::net::TcpListener;

/// One CONNECT the waypoint received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The client's SPIFFE identity, from its certificate.
    pub client: String,
    pub authority: String,
    /// Header name → value, as received (names lower case, as HTTP/2 has them).
    pub headers: BTreeMap<String, String>,
}

/// Where the waypoint sends one authority: the destination's address and identity.
#[derive(Debug, Clone)]
pub struct Route {
    pub target: SocketAddr,
    pub identity: String,
}

pub struct StandInWaypoint {
    recorded: Arc<Mutex<Vec<Recorded>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandInWaypoint {
    /// Starts it in the netns `netns`, as `identity`, with a certificate from the plug-in CA
    /// in `ca_dir`; `routes` maps each authority it will be asked for to its destination.
    pub fn start(
        netns: &Path,
        ca_dir: &Path,
        identity: &str,
        routes: HashMap<String, Route>,
    ) -> Result<StandInWaypoint> {
        tls::install_default_provider();
        let identity: Identity = identity.parse()?;
        let ca = PluginCa::load(ca_dir, &identity.trust_domain)
            .with_context(|| format!("the lab CA in {}", ca_dir.display()))?;
        let certs = Arc::new(CertManager::new(Arc::new(ca), Duration::from_secs(3600)));
        let cert = certs.get(&identity)?;
        let server = tls::server_config(&cert, &certs.roots(), CompliancePolicy::Default)?;
        let netns = Netns::open(netns)?;
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let waypoint = Arc::new(Waypoint {
            identity,
            routes,
            recorded: recorded.clone(),
            client: HboneClient::new(
                HboneSettings::default(),
                certs,
                Duration::from_secs(5),
                Arc::new(Drain::default()),
            ),
        });
        // The listener is a socket of the pod's netns, and so is every tunnel the waypoint
        // opens (Ambit's client makes them there). The waypoint is not in the pod's cgroup:
        // nothing captures its traffic, as nothing captures a waypoint's own traffic in Istio.
        let listener = netns.socket(socket2::Domain::IPV4)?;
        listener.set_reuse_address(true)?;
        listener
            .bind(&"0.0.0.0:15008".parse::<SocketAddr>()?.into())
            .context("binding the waypoint's port 15008")?;
        listener.listen(128)?;
        listener.set_nonblocking(true)?;
        let netns = Arc::new(netns);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let listener = TcpListener::from_std(listener.into()).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(server);
                tokio::select! {
                    _ = stopped => {}
                    () = async {
                        while let Ok((tcp, _)) = listener.accept().await {
                            let (acceptor, waypoint, netns) =
                                (acceptor.clone(), waypoint.clone(), netns.clone());
                            tokio::spawn(async move {
                                if let Err(e) = waypoint.serve(acceptor, tcp, &netns).await {
                                    eprintln!("stand-in waypoint: {e:#}");
                                }
                            });
                        }
                    } => {}
                }
            })
        });
        Ok(StandInWaypoint {
            recorded,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Every CONNECT so far, in arrival order.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }
}

impl Drop for StandInWaypoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Waypoint {
    identity: Identity,
    routes: HashMap<String, Route>,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    client: HboneClient,
}

impl Waypoint {
    async fn serve(
        self: Arc<Self>,
        acceptor: tokio_rustls::TlsAcceptor,
        tcp: tokio::net::TcpStream,
        netns: &Arc<Netns>,
    ) -> Result<()> {
        let peer = tcp.peer_addr()?;
        let tls = acceptor.accept(tcp).await.context("TLS handshake")?;
        let client = tls::peer_identity(tls.get_ref().1)
            .map(|i| i.to_string())
            .unwrap_or_default();
        let mut h2 = HboneSettings::default().h2_server().handshake(tls).await?;
        while let Some(request) = h2.accept().await {
            let (request, mut respond) = request?;
            let authority = request
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let headers = request
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        v.to_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            self.recorded.lock().unwrap().push(Recorded {
                client: client.clone(),
                authority: authority.clone(),
                headers,
            });
            let (this, netns) = (self.clone(), netns.clone());
            tokio::spawn(async move {
                let Some(route) = this.routes.get(&authority).cloned() else {
                    eprintln!("stand-in waypoint: no route for {authority}");
                    let answer = http::Response::builder().status(503).body(()).unwrap();
                    let _ = respond.send_response(answer, true);
                    return;
                };
                let tunnel = this
                    .client
                    .open(TunnelRequest {
                        netns: &netns,
                        source: this.identity.clone(),
                        expected: vec![route.identity.parse().unwrap()],
                        hbone_addr: SocketAddr::new(route.target.ip(), 15008),
                        target: route.target,
                        client_addr: peer,
                        service_host: None,
                        baggage: String::new(),
                    })
                    .await;
                let tunnel = match tunnel {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("stand-in waypoint: to {}: {e:#}", route.target);
                        let answer = http::Response::builder().status(503).body(()).unwrap();
                        let _ = respond.send_response(answer, true);
                        return;
                    }
                };
                let upstream_recv = match tunnel.response.established().await {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("stand-in waypoint: {e:#}");
                        let answer = http::Response::builder().status(503).body(()).unwrap();
                        let _ = respond.send_response(answer, true);
                        return;
                    }
                };
                let answer = http::Response::builder().status(200).body(()).unwrap();
                let Ok(downstream_send) = respond.send_response(answer, false) else {
                    return;
                };
                // Both directions at once, each until its end of stream.
                let _lease = tunnel.lease;
                tokio::join!(
                    copy(request.into_body(), tunnel.send),
                    copy(upstream_recv, downstream_send)
                );
            });
        }
        Ok(())
    }
}

/// Copies one HTTP/2 stream's body into another, then ends it.
async fn copy(mut from: RecvStream, mut to: SendStream<Bytes>) {
    while let Some(chunk) = from.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = from.flow_control().release_capacity(chunk.len());
        if to.send_data(chunk, false).is_err() {
            return;
        }
    }
    let _ = to.send_data(Bytes::new(), true);
}
