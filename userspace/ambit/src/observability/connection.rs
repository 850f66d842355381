//! One record per connection the tunnel handles: it counts the connection in the metrics when
//! it opens and when it closes, and writes the access-log line ("connection complete") at the
//! end, with ztunnel's field names.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::info;

use super::metrics::{FastPathLabels, Metrics, TcpLabels};
use crate::{
    config::WorkloadTelemetry,
    state::{ServiceName, WorkloadInfo},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// The source node's view (outbound).
    Source,
    /// The destination node's view (inbound).
    Destination,
}

/// One side of a connection, as far as it is known.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The pod's name (the access log's `*.workload`, as ztunnel logs it).
    pub workload: Option<String>,
    pub namespace: Option<String>,
    /// SPIFFE URI.
    pub identity: Option<String>,
    /// The metrics' names for it (`*_workload` is the owner's name, not the pod's).
    pub telemetry: WorkloadTelemetry,
}

impl Peer {
    pub fn workload(w: &WorkloadInfo, addr: SocketAddr) -> Self {
        Self {
            addr: Some(addr),
            workload: Some(w.name.clone()),
            namespace: Some(w.namespace.clone()),
            identity: Some(w.identity().to_string()),
            telemetry: w.telemetry.clone(),
        }
    }

    pub fn addr(addr: SocketAddr) -> Self {
        Self {
            addr: Some(addr),
            ..Self::default()
        }
    }
}

pub struct ConnectionRecord {
    metrics: Arc<Metrics>,
    reporter: Reporter,
    src: Peer,
    dst: Peer,
    /// `podIP:15008` when the connection travels over HBONE.
    hbone_addr: Option<SocketAddr>,
    service: Option<ServiceName>,
    mtls: bool,
    start: Instant,
    labels: TcpLabels,
    /// Whether the loopback hop on this node took the fast path (`--fast-path on` only).
    fast_path: Option<FastPathUse>,
}

/// Istio's `response_flags` label (and the access log's): how a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFlag {
    /// Completed (`-`).
    None,
    /// Refused by authorization policy or strict mTLS.
    Deny,
    /// The upstream could not be reached, or refused the CONNECT.
    Connect,
    /// The TLS handshake failed: a certificate refused by either side.
    TlsFailure,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::Deny => "DENY",
            ResponseFlag::Connect => "CONNECT",
            ResponseFlag::TlsFailure => "TLS_FAILURE",
        }
    }
}

/// How a connection ended, for the log and the `response_flags` label.
pub enum Outcome {
    /// Bytes flowed; `error` is set when the relay ended with one. Request bytes go from the
    /// source to the destination, response bytes back.
    Completed {
        request_bytes: u64,
        response_bytes: u64,
        error: Option<String>,
    },
    /// Refused by authorization policy.
    Denied { policy: String },
    /// Could not connect upstream (`Connect`) or TLS failed (`TlsFailure`).
    Failed { flag: ResponseFlag, error: String },
}

/// The fast path as one connection took it, seen from the tunnel's end of a loopback hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPathUse {
    /// The socket is in the fast path's sockhash, and none of its writes has fallen back to TCP.
    Yes,
    /// The socket is in the map, but a write of its own found no peer and went through TCP.
    FellBack,
    /// Not on the fast path (off, a Fast Open connection, the map full).
    No,
}

impl FastPathUse {
    /// Its name in the access log and in `ambit_fast_path_connections`.
    pub fn as_str(self) -> &'static str {
        match self {
            FastPathUse::Yes => "yes",
            FastPathUse::FellBack => "fell_back",
            FastPathUse::No => "no",
        }
    }
}

/// What is known of a connection when it opens.
pub struct Opened {
    pub reporter: Reporter,
    pub src: Peer,
    pub dst: Peer,
    /// `podIP:15008` when the connection travels over HBONE, that is with mutual TLS.
    pub hbone_addr: Option<SocketAddr>,
    /// The service, when the client dialled its VIP (known on the source side only).
    pub service: Option<ServiceName>,
}

impl ConnectionRecord {
    /// Counts the connection as opened.
    pub fn open(metrics: Arc<Metrics>, opened: Opened) -> Self {
        let Opened {
            reporter,
            src,
            dst,
            hbone_addr,
            service,
        } = opened;
        let mtls = hbone_addr.is_some();
        let labels = labels(
            reporter,
            &src,
            &dst,
            service.as_ref(),
            mtls,
            ResponseFlag::None,
        );
        metrics.opened.get_or_create(&labels).inc();
        Self {
            metrics,
            reporter,
            src,
            dst,
            hbone_addr,
            service,
            mtls,
            start: Instant::now(),
            labels,
            fast_path: None,
        }
    }

    /// Records whether this connection's loopback hop on this node (the app's connection to
    /// the tunnel, or the tunnel's delivery to the app) is on the fast path, and counts it in
    /// `ambit_fast_path_connections`.
    pub fn set_fast_path(&mut self, fast_path: FastPathUse) {
        let hop = match self.reporter {
            Reporter::Source => "outbound",
            Reporter::Destination => "inbound",
        };
        self.metrics
            .fast_path
            .get_or_create(&FastPathLabels {
                hop,
                fast_path: fast_path.as_str(),
            })
            .inc();
        self.fast_path = Some(fast_path);
    }

    /// Counts the connection as closed (and failed, if it did) and writes the access log line.
    pub fn close(self, outcome: Outcome) {
        let duration = self.start.elapsed();
        let (sent, received, flag, decision, error) = match &outcome {
            Outcome::Completed {
                request_bytes,
                response_bytes,
                error,
            } => (
                *request_bytes,
                *response_bytes,
                ResponseFlag::None,
                "allow".to_owned(),
                error.clone(),
            ),
            Outcome::Denied { policy } => {
                (0, 0, ResponseFlag::Deny, format!("deny ({policy})"), None)
            }
            Outcome::Failed { flag, error } => {
                (0, 0, *flag, "allow".to_owned(), Some(error.clone()))
            }
        };
        let labels = if flag == ResponseFlag::None {
            self.labels.clone()
        } else {
            labels(
                self.reporter,
                &self.src,
                &self.dst,
                self.service.as_ref(),
                self.mtls,
                flag,
            )
        };
        let m = &self.metrics;
        m.closed.get_or_create(&labels).inc();
        if flag != ResponseFlag::None {
            m.failed.get_or_create(&labels).inc();
        }
        // Istio's meaning: "sent" is the response direction (destination → source), "received"
        // the request direction. The access log reads from the client's side instead.
        m.sent_bytes.get_or_create(&labels).inc_by(received);
        m.received_bytes.get_or_create(&labels).inc_by(sent);
        self.log(sent, received, duration, flag, &decision, error.as_deref());
    }

    fn log(
        &self,
        sent: u64,
        received: u64,
        duration: Duration,
        flag: ResponseFlag,
        decision: &str,
        error: Option<&str>,
    ) {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let addr = |a: &Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        info!(
            src.addr = %addr(&self.src.addr),
            src.workload = %show(&self.src.workload),
            src.namespace = %show(&self.src.namespace),
            src.identity = %show(&self.src.identity),
            dst.addr = %addr(&self.dst.addr),
            dst.hbone_addr = %addr(&self.hbone_addr),
            dst.service = %self.service.as_ref().map_or("-", |s| s.hostname.as_str()),
            dst.workload = %show(&self.dst.workload),
            dst.namespace = %show(&self.dst.namespace),
            dst.identity = %show(&self.dst.identity),
            direction = if self.reporter == Reporter::Source { "outbound" } else { "inbound" },
            bytes_sent = sent,
            bytes_recv = received,
            duration_ms = duration.as_millis() as u64,
            response_flags = flag.as_str(),
            policy = decision,
            error = error.unwrap_or("-"),
            fast_path = self.fast_path.map_or("-", FastPathUse::as_str),
            "connection complete"
        );
    }
}

fn labels(
    reporter: Reporter,
    src: &Peer,
    dst: &Peer,
    service: Option<&ServiceName>,
    mtls: bool,
    flag: ResponseFlag,
) -> TcpLabels {
    let v = |o: &Option<String>| o.clone().unwrap_or_else(|| "unknown".into());
    let (s, d) = (&src.telemetry, &dst.telemetry);
    let service_field = |f: fn(&ServiceName) -> &String| {
        service.map_or_else(|| "unknown".into(), |svc| f(svc).clone())
    };
    TcpLabels {
        reporter: match reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
        .into(),
        source_workload: v(&s.workload_name),
        source_canonical_service: v(&s.canonical_name),
        source_canonical_revision: v(&s.canonical_revision),
        source_workload_namespace: v(&src.namespace),
        source_principal: v(&src.identity),
        source_app: v(&s.canonical_name),
        source_version: v(&s.canonical_revision),
        source_cluster: v(&s.cluster_id),
        destination_service: service_field(|s| &s.hostname),
        destination_service_namespace: service_field(|s| &s.namespace),
        destination_service_name: service_field(|s| &s.name),
        destination_workload: v(&d.workload_name),
        destination_canonical_service: v(&d.canonical_name),
        destination_canonical_revision: v(&d.canonical_revision),
        destination_workload_namespace: v(&dst.namespace),
        destination_principal: v(&dst.identity),
        destination_app: v(&d.canonical_name),
        destination_version: v(&d.canonical_revision),
        destination_cluster: v(&d.cluster_id),
        request_protocol: "tcp".into(),
        response_flags: flag.as_str().into(),
        connection_security_policy: if mtls { "mutual_tls" } else { "unknown" }.into(),
        // Ambit reads no locality yet.
        source_region: "unknown".into(),
        source_zone: "unknown".into(),
        destination_region: "unknown".into(),
        destination_zone: "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denied_connection_is_counted_with_the_deny_flag() {
        let metrics = Metrics::new();
        let src = Peer::addr("10.0.0.1:4000".parse().unwrap());
        let dst = Peer::addr("10.0.0.2:80".parse().unwrap());
        let record = ConnectionRecord::open(
            metrics.clone(),
            Opened {
                reporter: Reporter::Destination,
                src,
                dst,
                hbone_addr: Some("10.0.0.2:15008".parse().unwrap()),
                service: None,
            },
        );
        record.close(Outcome::Denied {
            policy: "default/deny-80".into(),
        });
        let text = metrics.render();
        assert!(
            text.contains("istio_tcp_connections_opened_total{reporter=\"destination\""),
            "{text}"
        );
        let failed = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_failed_total"))
            .unwrap();
        assert!(
            failed.contains("response_flags=\"DENY\"") && failed.ends_with(" 1"),
            "{failed}"
        );
        assert!(failed.contains("source_workload=\"unknown\""));
        assert!(failed.contains("connection_security_policy=\"mutual_tls\""));
    }

    #[test]
    fn bytes_are_counted_per_connection() {
        let metrics = Metrics::new();
        for _ in 0..2 {
            let r = ConnectionRecord::open(
                metrics.clone(),
                Opened {
                    reporter: Reporter::Source,
                    src: Peer::default(),
                    dst: Peer::default(),
                    hbone_addr: None,
                    service: Some(ServiceName {
                        hostname: "web.default.svc.cluster.local".into(),
                        namespace: "default".into(),
                        name: "web".into(),
                    }),
                },
            );
            r.close(Outcome::Completed {
                request_bytes: 7,
                response_bytes: 100,
                error: None,
            });
        }
        let text = metrics.render();
        let sent = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_sent_bytes_total"))
            .unwrap();
        assert!(sent.ends_with(" 200"), "{sent}");
        let received = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_received_bytes_total"))
            .unwrap();
        assert!(received.ends_with(" 14"), "{received}");
        assert!(sent.contains("destination_service=\"web.default.svc.cluster.local\""));
        assert!(text.contains("istio_tcp_connections_closed_total{reporter=\"source\""));
    }
}
