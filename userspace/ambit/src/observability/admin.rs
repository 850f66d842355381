//! The node's operational endpoints:
//!
//! - `0.0.0.0:15020/metrics` — Prometheus text;
//! - `0.0.0.0:15021/healthz/ready` — 200 once every enrolled pod has its programs attached and
//!   its listeners up, 503 before (and while an enrollment is failing);
//! - `127.0.0.1:15000/config_dump` — JSON: workloads, services, policies, enrolled pods,
//!   certificates with expiry; `POST 127.0.0.1:15000/logging?level=<filter>` changes the log
//!   filter at run time (e.g. `debug`, `ambit::hbone=trace`).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::UNIX_EPOCH,
};

use anyhow::{Context as _, Result};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use super::{
    http::{serve, Request, Response},
    Metrics,
};
use crate::{state::State, tls::CertManager};

/// Changes the log filter; returns an error for a filter that does not parse.
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<()> + Send + Sync>;

#[derive(Clone)]
pub struct AdminContext {
    pub node: String,
    pub state: watch::Receiver<Arc<State>>,
    pub certs: Arc<CertManager>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub set_log_level: SetLogLevel,
}

pub struct Addresses {
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    pub admin: SocketAddr,
}

impl Default for Addresses {
    fn default() -> Self {
        Self {
            metrics: ([0, 0, 0, 0], 15020).into(),
            readiness: ([0, 0, 0, 0], 15021).into(),
            admin: ([127, 0, 0, 1], 15000).into(),
        }
    }
}

/// Binds one endpoint. SO_REUSEPORT: while one node process takes over from another
/// (`handover`) both serve their endpoints; in a DaemonSet each has a netns of its own, but
/// where both share one (a node run by hand, the lab) the newcomer's would be refused.
fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket
        .bind(&addr.into())
        .and_then(|()| socket.listen(128))
        .with_context(|| format!("binding {addr}"))?;
    Ok(TcpListener::from_std(socket.into())?)
}

/// Binds the three endpoints (failing if a port is taken, but by another node process) and
/// serves them in the background.
pub async fn start(ctx: AdminContext, addrs: &Addresses) -> Result<Vec<JoinHandle<()>>> {
    let (metrics, readiness, admin) = (
        bind(addrs.metrics)?,
        bind(addrs.readiness)?,
        bind(addrs.admin)?,
    );
    let m = ctx.metrics.clone();
    let r = ctx.ready.clone();
    let a = ctx.clone();
    Ok(vec![
        tokio::spawn(serve(metrics, move |req| {
            let m = m.clone();
            async move {
                match req.path.as_str() {
                    "/metrics" | "/stats/prometheus" => Response {
                        status: 200,
                        content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        body: m.render(),
                    },
                    _ => Response::text(404, "not found\n"),
                }
            }
        })),
        tokio::spawn(serve(readiness, move |req| {
            let ready = r.load(Ordering::Acquire);
            async move {
                match (req.path.as_str(), ready) {
                    ("/healthz/ready", true) => Response::text(200, "ready\n"),
                    ("/healthz/ready", false) => Response::text(503, "not ready\n"),
                    _ => Response::text(404, "not found\n"),
                }
            }
        })),
        tokio::spawn(serve(admin, move |req| {
            let a = a.clone();
            async move { admin_route(&a, req) }
        })),
    ])
}

fn admin_route(ctx: &AdminContext, req: Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/config_dump") => Response::json(config_dump(ctx)),
        ("POST", "/logging") => match req.param("level") {
            Some(level) => match (ctx.set_log_level)(level) {
                Ok(()) => Response::text(200, format!("log level set to {level}\n")),
                Err(e) => Response::text(400, format!("{e:#}\n")),
            },
            None => Response::text(400, "usage: POST /logging?level=<filter>\n"),
        },
        (_, "/logging") => Response::text(405, "use POST /logging?level=<filter>\n"),
        _ => Response::text(
            404,
            "endpoints: GET /config_dump, POST /logging?level=<filter>\n",
        ),
    }
}

/// A waypoint as ztunnel's config dump writes it.
fn waypoint_json(g: &crate::config::GatewayAddress) -> serde_json::Value {
    json!({
        "destination": g.destination.to_string(),
        "hboneMtlsPort": g.hbone_mtls_port,
    })
}

pub fn config_dump(ctx: &AdminContext) -> String {
    let state = ctx.state.borrow().clone();
    let workloads: Vec<_> = state
        .workloads
        .values()
        .map(|w| {
            json!({
                "name": w.name,
                "namespace": w.namespace,
                "serviceAccount": w.service_account,
                "identity": w.identity().to_string(),
                "workloadIps": w.ips,
                "protocol": format!("{:?}", w.protocol).to_uppercase(),
                "node": w.node,
                "services": w.services,
                "waypoint": w.waypoint.as_ref().map(waypoint_json),
            })
        })
        .collect();
    let services: Vec<_> = state
        .services
        .values()
        .map(|s| {
            json!({
                "name": s.name,
                "namespace": s.namespace,
                "hostname": s.hostname,
                "ports": s.ports,
                "subjectAltNames": s.subject_alt_names.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "waypoint": s.waypoint.as_ref().map(waypoint_json),
            })
        })
        .collect();
    let enrolled: Vec<_> = state
        .enrolled
        .values()
        .map(|p| {
            json!({
                "workload": p.key,
                "netns": p.netns,
                "cgroup": p.cgroup,
                "ips": p.ips,
                "identity": p.identity.to_string(),
                "mtlsMode": format!("{:?}", p.mtls_mode).to_lowercase(),
            })
        })
        .collect();
    let certificates: Vec<_> = ctx
        .certs
        .certificates()
        .into_iter()
        .map(|(identity, not_after)| {
            json!({
                "identity": identity.to_string(),
                "expires_unix": not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            })
        })
        .collect();
    let dump = json!({
        "node": ctx.node,
        "ready": ctx.ready.load(Ordering::Acquire),
        "workloads": workloads,
        "services": services,
        "policies": state.policies_json(),
        "enrolledPods": enrolled,
        "certificates": certificates,
    });
    serde_json::to_string_pretty(&dump).unwrap_or_default()
}
