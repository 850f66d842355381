//! HBONE client: opens a CONNECT stream to `podIP:15008` over a pooled mTLS HTTP/2 connection.
//!
//! Connections are pooled per (source netns, source identity, destination identities,
//! destination address): a connection carries at most `max_streams_per_connection` streams at
//! once (and, if `max_requests_per_connection` is set, that many in its life), is kept alive
//! with PINGs, and is released after `idle_timeout` without streams. Opening a new
//! connection for a key happens under that key's lock, so a burst of requests waits for the one
//! new connection instead of opening one each.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use h2::{client::SendRequest, RecvStream, SendStream};
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::HboneSettings;
use crate::{
    drain::Drain,
    netns::Netns,
    socket::connect_tcp,
    tls::{self, CertManager, Identity},
};

/// One tunnel to open.
pub struct TunnelRequest<'a> {
    /// The source pod's netns: the TCP connection to 15008 starts there.
    pub netns: &'a Netns,
    pub source: Identity,
    /// Identities the server may present (the workload's, plus the service's SANs).
    pub expected: Vec<Identity>,
    /// `podIP:15008`.
    pub hbone_addr: SocketAddr,
    /// The `:authority`: `podIP:targetPort`.
    pub target: SocketAddr,
    /// The application's address, for the `forwarded` header.
    pub client_addr: SocketAddr,
    /// The service hostname when a service VIP was the destination.
    pub service_host: Option<String>,
    pub baggage: String,
}

/// A CONNECT stream whose request is sent. Bytes may go out on `send` at once, before the
/// server's answer: the server holds them (within the stream's flow-control window) until it
/// has connected to the app, and drops them if it refuses. Waiting for the 200 first would cost
/// every new connection one more round trip through both nodes before the app's first byte
/// moves (measured: ≈ 1 ms → 0.75 ms per connect-exchange-close here). Nothing reaches the app
/// before the server's checks pass, and nothing leaves this node unencrypted or towards a peer
/// that did not prove an expected identity (the TLS handshake came first).
///
/// Keep `lease` as long as the stream is in use: it counts the stream against its pooled
/// connection.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub response: PendingResponse,
    pub lease: StreamLease,
}

/// The server's answer to a CONNECT, still to come.
pub struct PendingResponse {
    response: h2::client::ResponseFuture,
    conn: Arc<PooledConnection>,
    timeout: Duration,
    target: SocketAddr,
    hbone_addr: SocketAddr,
}

impl PendingResponse {
    /// The stream's receiving half once the server answered 200; an error naming the target
    /// for any other answer, a reset, or no answer within the connect timeout.
    pub async fn established(self) -> Result<RecvStream> {
        let (target, via) = (self.target, self.hbone_addr);
        let response = tokio::time::timeout(self.timeout, self.response)
            .await
            .map_err(|_| {
                // A peer that cannot answer a CONNECT in time is unreachable or stuck: retire
                // the connection, so later streams do not queue on it until the PING timeout.
                self.conn.closed.store(true, Ordering::Release);
                anyhow!(
                    "HBONE CONNECT {target} via {via}: no answer in {:?}",
                    self.timeout
                )
            })?
            .with_context(|| format!("HBONE CONNECT {target} via {via}"))?;
        if response.status() != http::StatusCode::OK {
            bail!(
                "HBONE CONNECT {target} via {via} answered {}",
                response.status()
            );
        }
        Ok(response.into_body())
    }
}

/// Marks an error as the TLS handshake's, in an error's chain (see [`is_tls_failure`]).
#[derive(Debug)]
pub struct TlsFailure;

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TLS failure")
    }
}

impl std::error::Error for TlsFailure {}

/// Whether opening or using a tunnel failed on TLS: the handshake (marked [`TlsFailure`]), or
/// a TLS error or alert that surfaced later through HTTP/2. In TLS 1.3 the client's handshake
/// is done before the server has judged the client's certificate, so a server's refusal
/// arrives as an alert on the first read: the HTTP/2 handshake, the CONNECT or its answer.
pub fn is_tls_failure(error: &anyhow::Error) -> bool {
    fn wraps_rustls(io: &std::io::Error) -> bool {
        io.get_ref()
            .is_some_and(|inner| inner.is::<rustls::Error>())
    }
    error.chain().any(|cause| {
        cause.is::<TlsFailure>()
            || cause.is::<rustls::Error>()
            || cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(wraps_rustls)
            || cause
                .downcast_ref::<h2::Error>()
                .and_then(h2::Error::get_io)
                .is_some_and(wraps_rustls)
    })
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    netns: u64,
    source: Identity,
    expected: Vec<Identity>,
    addr: SocketAddr,
}

struct PooledConnection {
    id: u64,
    sender: SendRequest<Bytes>,
    /// Streams open now.
    streams: AtomicUsize,
    /// Streams leased in its life (changed only under its pool slot's lock).
    leased: AtomicUsize,
    closed: AtomicBool,
    last_used: Mutex<Instant>,
}

pub struct StreamLease(Arc<PooledConnection>);

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
        *self.0.last_used.lock().unwrap() = Instant::now();
    }
}

type Slot = Arc<tokio::sync::Mutex<Vec<Arc<PooledConnection>>>>;

pub struct HboneClient {
    settings: HboneSettings,
    certs: Arc<CertManager>,
    connect_timeout: Duration,
    pool: Mutex<HashMap<PoolKey, Slot>>,
    next_id: AtomicU64,
    drain: Arc<Drain>,
}

impl HboneClient {
    pub fn new(
        settings: HboneSettings,
        certs: Arc<CertManager>,
        connect_timeout: Duration,
        drain: Arc<Drain>,
    ) -> Self {
        Self {
            settings,
            certs,
            connect_timeout,
            pool: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            drain,
        }
    }

    /// Live pooled connections (for tests and the admin dump).
    pub fn pooled_connections(&self) -> usize {
        let slots: Vec<Slot> = self.pool.lock().unwrap().values().cloned().collect();
        slots
            .iter()
            .map(|s| {
                s.try_lock()
                    .map(|v| {
                        v.iter()
                            .filter(|c| !c.closed.load(Ordering::Acquire))
                            .count()
                    })
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Drops the pooled connections opened from a pod's netns (the pod left): their sockets
    /// would otherwise keep its netns alive until the idle timeout. Streams in flight go on.
    pub fn forget_netns(&self, netns_cookie: u64) {
        self.pool
            .lock()
            .unwrap()
            .retain(|key, _| key.netns != netns_cookie);
    }

    /// Draining: forgets every pooled connection, so that each one closes (GOAWAY, frames
    /// flushed) once its last stream ends. Streams opened from now on get a connection of their
    /// own that closes the same way.
    pub fn stop_pooling(&self) {
        self.pool.lock().unwrap().clear();
    }

    /// Sends a CONNECT for `req` on a pooled connection (opening one if needed); the server's
    /// answer is `Tunnel::response`.
    pub async fn open(&self, req: TunnelRequest<'_>) -> Result<Tunnel> {
        let mut attempt = 0;
        let (conn, response, send) = loop {
            attempt += 1;
            let request = connect_request(&req)?;
            // The slot is counted from here: every path below either leases or releases it.
            let conn = self.checkout(&req).await?;
            let sender = conn.sender.clone();
            let stream = async {
                let mut ready = sender.ready().await?;
                ready.send_request(request, false)
            };
            match tokio::time::timeout(self.connect_timeout, stream).await {
                Ok(Ok((response, send))) => break (conn, response, send),
                // The peer is closing this connection (GOAWAY: it drains or restarts) and
                // takes no new streams: retire it and try once more on a fresh one.
                Ok(Err(e)) if attempt == 1 => {
                    debug!(conn = conn.id, error = %e, "pooled HBONE connection refused a stream; retrying on a new one");
                    conn.closed.store(true, Ordering::Release);
                    conn.streams.fetch_sub(1, Ordering::AcqRel);
                }
                Ok(Err(e)) => {
                    conn.streams.fetch_sub(1, Ordering::AcqRel);
                    return Err(e).with_context(|| format!("HBONE stream to {}", req.hbone_addr));
                }
                Err(_) => {
                    conn.streams.fetch_sub(1, Ordering::AcqRel);
                    bail!("HBONE stream to {} timed out", req.hbone_addr)
                }
            }
        };
        Ok(Tunnel {
            send,
            response: PendingResponse {
                response,
                conn: conn.clone(),
                timeout: self.connect_timeout,
                target: req.target,
                hbone_addr: req.hbone_addr,
            },
            lease: StreamLease(conn),
        })
    }

    /// A pooled connection with a free stream slot, opening one if there is none. The slot is
    /// already counted when this returns.
    async fn checkout(&self, req: &TunnelRequest<'_>) -> Result<Arc<PooledConnection>> {
        if self.drain.is_draining() {
            let conn = self.connect(req).await?;
            conn.streams.fetch_add(1, Ordering::AcqRel);
            return Ok(conn);
        }
        let key = PoolKey {
            netns: req.netns.cookie(),
            source: req.source.clone(),
            expected: req.expected.clone(),
            addr: req.hbone_addr,
        };
        let slot = self.pool.lock().unwrap().entry(key).or_default().clone();
        let mut conns = slot.lock().await;
        // A retired connection leaves the pool; once its last stream ends nothing holds its
        // sender any more and h2 closes it.
        conns.retain(|c| !c.closed.load(Ordering::Acquire) && !self.used_up(c));
        for c in conns.iter() {
            let n = c.streams.load(Ordering::Acquire);
            if n < self.settings.max_streams_per_connection
                && c.streams
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                c.leased.fetch_add(1, Ordering::AcqRel);
                return Ok(c.clone());
            }
        }
        let conn = self.connect(req).await?;
        conn.streams.fetch_add(1, Ordering::AcqRel);
        conn.leased.fetch_add(1, Ordering::AcqRel);
        if !self.used_up(&conn) {
            conns.push(conn.clone());
        }
        Ok(conn)
    }

    /// Whether a connection has carried as many streams as `max_requests_per_connection` allows.
    fn used_up(&self, conn: &PooledConnection) -> bool {
        let limit = self.settings.max_requests_per_connection;
        limit > 0 && conn.leased.load(Ordering::Acquire) >= limit
    }

    async fn connect(&self, req: &TunnelRequest<'_>) -> Result<Arc<PooledConnection>> {
        let cert = self.certs.get(&req.source)?;
        let config = tls::client_config(
            &cert,
            &self.certs.roots(),
            &req.expected,
            self.certs.compliance_policy(),
        )?;
        let tcp = connect_tcp(req.netns, req.hbone_addr, self.connect_timeout).await?;
        let tls = tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(config).connect(tls::dummy_server_name(), tcp),
        )
        .await
        .map_err(|_| {
            anyhow::Error::new(TlsFailure)
                .context(format!("TLS handshake with {} timed out", req.hbone_addr))
        })?
        .map_err(|e| anyhow::Error::new(e).context(TlsFailure))
        .with_context(|| format!("TLS handshake with {}", req.hbone_addr))?;
        let kx = tls::key_exchange(tls.get_ref().1);
        let s = &self.settings;
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(s.max_header_list_size)
            .handshake::<_, Bytes>(tls)
            .await
            .with_context(|| format!("HTTP/2 handshake with {}", req.hbone_addr))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pooled = Arc::new(PooledConnection {
            id,
            sender,
            streams: AtomicUsize::new(0),
            leased: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
        });
        info!(
            conn = id,
            src = %req.source,
            dst = %req.hbone_addr,
            %kx,
            "HBONE connection established"
        );
        let ping_pong = connection.ping_pong();
        // The task must not keep the connection's SendRequest alive: h2 closes a client
        // connection gracefully only once every SendRequest and stream is gone.
        let watched = Arc::downgrade(&pooled);
        let settings = self.settings.clone();
        let open = self.drain.track_hbone();
        tokio::spawn(async move {
            let reason = tokio::select! {
                r = &mut connection => format!("{:?}", r.err()),
                r = keepalive(ping_pong, &watched, &settings) => r,
            };
            if let Some(conn) = watched.upgrade() {
                conn.closed.store(true, Ordering::Release);
            }
            debug!(conn = id, reason, "HBONE connection closed");
            drop(open);
        });
        Ok(pooled)
    }
}

/// PINGs the peer every `ping_interval` and gives up when one is not answered within
/// `ping_timeout`; releases the connection after `idle_timeout` without streams. Once the pool
/// and every stream let go of the connection, h2 closes it by itself: keepalive then only waits.
async fn keepalive(
    ping_pong: Option<h2::PingPong>,
    conn: &Weak<PooledConnection>,
    s: &HboneSettings,
) -> String {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(s.ping_interval).await;
        let Some(conn) = conn.upgrade() else {
            return std::future::pending().await;
        };
        if conn.streams.load(Ordering::Acquire) == 0
            && conn.last_used.lock().unwrap().elapsed() >= s.idle_timeout
        {
            conn.closed.store(true, Ordering::Release);
            return "idle".into();
        }
        drop(conn);
        if let Err(why) = super::keepalive::ping(&mut ping_pong, s.ping_timeout).await {
            return why;
        }
    }
}

fn connect_request(req: &TunnelRequest<'_>) -> Result<http::Request<()>> {
    let mut forwarded = format!("for=\"{}\"", req.client_addr);
    if let Some(host) = &req.service_host {
        forwarded.push_str(&format!(";host={host}"));
    }
    Ok(http::Request::builder()
        .method(http::Method::CONNECT)
        // Authority-form URI: h2 sends only `:method` and `:authority` (RFC 7540 §8.3).
        .uri(req.target.to_string())
        .header("forwarded", forwarded)
        .header("baggage", &req.baggage)
        .header("traceparent", traceparent())
        .body(())?)
}

/// A random W3C traceparent, per connection.
fn traceparent() -> String {
    use rand::Rng as _;
    let mut rng = rand::thread_rng();
    format!("00-{:032x}-{:016x}-00", rng.gen::<u128>(), rng.gen::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ztunnel accepts an absolute-form CONNECT too, so the interop suite cannot catch a drift
    /// from the authority form (RFC 9113 §8.5: no `:scheme`, no `:path`): this test does.
    #[test]
    fn the_connect_request_is_in_authority_form_with_ztunnels_headers() {
        let netns = Netns::open(std::path::Path::new("/proc/self/ns/net")).unwrap();
        let req = TunnelRequest {
            netns: &netns,
            source: Identity::new("cluster.local", "default", "sleep"),
            expected: vec![Identity::new("cluster.local", "default", "web")],
            hbone_addr: "10.0.0.2:15008".parse().unwrap(),
            target: "10.0.0.2:8080".parse().unwrap(),
            client_addr: "10.0.0.1:40000".parse().unwrap(),
            service_host: Some("web.default.svc.cluster.local".into()),
            baggage: "k8s.namespace.name=default".into(),
        };
        let request = connect_request(&req).unwrap();
        assert_eq!(request.method(), http::Method::CONNECT);
        let uri = request.uri();
        assert_eq!(uri.authority().map(|a| a.as_str()), Some("10.0.0.2:8080"));
        assert_eq!((uri.scheme(), uri.path_and_query()), (None, None));
        assert_eq!(
            request.headers()["forwarded"],
            "for=\"10.0.0.1:40000\";host=web.default.svc.cluster.local"
        );
    }

    #[test]
    fn traceparent_has_the_w3c_shape() {
        let t = traceparent();
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "00")
        );
        assert_ne!(traceparent(), t);
    }
}
