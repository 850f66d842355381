//! Live connections at the destination, with what their authorization was decided on, so that
//! a policy change can re-check them and close those it no longer allows (Istio's semantics).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::oneshot;
use tracing::info;

use crate::{policy::ConnectionInfo, state::State};

#[derive(Default)]
pub struct ConnectionTracker {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Tracked>>,
}

struct Tracked {
    pod: String,
    conn: ConnectionInfo,
    revoke: oneshot::Sender<String>,
}

/// A registered connection; dropping it unregisters it.
pub struct TrackedConnection {
    id: u64,
    tracker: Arc<ConnectionTracker>,
    revoked: oneshot::Receiver<String>,
}

impl ConnectionTracker {
    /// Registers an allowed connection to the local workload `pod`.
    pub fn register(self: &Arc<Self>, pod: &str, conn: ConnectionInfo) -> TrackedConnection {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (revoke, revoked) = oneshot::channel();
        self.live.lock().unwrap().insert(
            id,
            Tracked {
                pod: pod.to_owned(),
                conn,
                revoke,
            },
        );
        TrackedConnection {
            id,
            tracker: self.clone(),
            revoked,
        }
    }

    /// Re-evaluates every live connection under `state`'s policies; those now denied are told
    /// to close. Returns how many were.
    pub fn recheck(&self, state: &State) -> usize {
        let mut live = self.live.lock().unwrap();
        let denied: Vec<(u64, String)> = live
            .iter()
            .filter_map(|(id, t)| {
                let decision = match state.workloads.get(&t.pod) {
                    Some(dst) => state.authorize(dst, &t.conn),
                    None => return Some((*id, "the destination workload is gone".into())),
                };
                (!decision.is_allowed()).then(|| (*id, decision.to_string()))
            })
            .collect();
        for (id, reason) in &denied {
            if let Some(t) = live.remove(id) {
                info!(pod = %t.pod, src = %t.conn.src_ip, reason = %reason, "closing a connection the new policy denies");
                let _ = t.revoke.send(reason.clone());
            }
        }
        denied.len()
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl TrackedConnection {
    /// Completes when a policy change revokes this connection, with the reason.
    pub async fn revoked(&mut self) -> String {
        match (&mut self.revoked).await {
            Ok(reason) => reason,
            // The tracker dropped its side without a reason: never revoked.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        self.tracker.live.lock().unwrap().remove(&self.id);
    }
}
