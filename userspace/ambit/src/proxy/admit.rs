//! The destination side's admission, one step for both inbound transports (HBONE in
//! `inbound.rs`, plaintext in `inbound_plaintext.rs`): who the peers are, the connection's
//! record (metrics, access log), strict mTLS, authorization at the destination, and the
//! connection's registration for re-checks when policies change. What each transport does
//! with a refusal (an HTTP 401, or a close without a byte) stays with it.

use std::net::SocketAddr;

use super::{tracker::TrackedConnection, ProxyContext};
use crate::{
    config::MtlsMode,
    observability::{ConnectionRecord, Opened, Peer, Reporter},
    policy::{ConnectionInfo, Decision},
    tls::Identity,
};

/// How a connection reached the pod.
pub enum Transport {
    /// Over HBONE: the client proved `identity` with its certificate; `local` is the 15008
    /// address the connection arrived on.
    Hbone {
        local: SocketAddr,
        identity: Option<Identity>,
    },
    /// In plaintext (sk_lookup): the source's identity is unproven, whatever its address says.
    Plaintext,
}

/// One connection to a local pod's app, before anything is connected to the app.
pub struct InboundConnection<'a> {
    /// The enrolled pod (`namespace/name`).
    pub pod: &'a str,
    /// The client's address.
    pub peer: SocketAddr,
    /// The app's address in the pod.
    pub target: SocketAddr,
    pub transport: Transport,
}

/// The outcome of [`admit`]: either way the record is open, for the caller to close.
pub enum Admission {
    Admitted {
        record: ConnectionRecord,
        tracked: TrackedConnection,
    },
    Denied {
        record: ConnectionRecord,
        /// The deciding policy (`namespace/name`), or what else refused.
        policy: String,
        /// Refused because the pod admits only mTLS (plaintext), not by a policy.
        strict_mtls: bool,
    },
}

/// Admits or denies `conn` at its destination pod.
pub fn admit(ctx: &ProxyContext, conn: InboundConnection<'_>) -> Admission {
    let state = ctx.state.borrow().clone();
    let src_workload = state.workload_by_ip(conn.peer.ip());
    let dst_workload = state.workloads.get(conn.pod);
    let (hbone_addr, proven) = match &conn.transport {
        Transport::Hbone { local, identity } => (Some(*local), Some(identity.clone())),
        Transport::Plaintext => (None, None),
    };
    let src = Peer {
        // The identity is the one the client's certificate proved, never its address's.
        identity: proven.clone().flatten().map(|i| i.to_string()),
        ..src_workload
            .map(|w| Peer::workload(w, conn.peer))
            .unwrap_or_else(|| Peer::addr(conn.peer))
    };
    let dst = dst_workload
        .map(|w| Peer::workload(w, conn.target))
        .unwrap_or_else(|| Peer::addr(conn.target));
    let mtls = proven.is_some();
    let record = ConnectionRecord::open(
        ctx.metrics.clone(),
        Opened {
            reporter: Reporter::Destination,
            src,
            dst,
            hbone_addr,
            service: None,
        },
    );
    let strict = state
        .enrolled
        .get(conn.pod)
        .is_some_and(|p| p.mtls_mode == MtlsMode::Strict);
    if !mtls && strict {
        return Admission::Denied {
            record,
            policy: "strict mTLS".into(),
            strict_mtls: true,
        };
    }
    let info = ConnectionInfo {
        src_ip: conn.peer.ip(),
        src_identity: proven.flatten(),
        dst_ip: conn.target.ip(),
        dst_port: conn.target.port(),
    };
    let decision = match dst_workload {
        Some(w) => state.authorize(w, &info),
        None => Decision::Deny {
            policy: "no local workload".into(),
        },
    };
    match decision {
        Decision::Deny { policy } => Admission::Denied {
            record,
            policy,
            strict_mtls: false,
        },
        _ => Admission::Admitted {
            record,
            tracked: ctx.tracker.register(conn.pod, info),
        },
    }
}
