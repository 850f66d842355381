//! Graceful shutdown. Every connection the tunnel handles holds a [`Tracked`] while it is open,
//! and so does every HBONE (HTTP/2) connection until it is closed: a stream that has ended may
//! still have its last bytes queued in HTTP/2, so exiting when the streams end could lose them.
//! On SIGTERM the node closes its listeners (new connections fail closed in the kernel), tells
//! the HBONE servers to stop taking streams (HTTP/2 GOAWAY) and the HBONE client to stop pooling,
//! and waits for both counts to reach zero or for its deadline.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use tokio::sync::{watch, Notify};

#[derive(Default)]
pub struct Drain {
    /// Proxied connections (an application's TCP connection, one per HBONE stream).
    connections: AtomicUsize,
    /// HBONE connections, client and server side.
    hbone_connections: AtomicUsize,
    closed_one: Notify,
    draining: watch::Sender<bool>,
}

/// Counts one open connection until dropped.
pub struct Tracked {
    drain: Arc<Drain>,
    hbone: bool,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drain
            .counter(self.hbone)
            .fetch_sub(1, Ordering::AcqRel);
        self.drain.closed_one.notify_waiters();
    }
}

impl Drain {
    /// Tracks a proxied connection.
    pub fn track(self: &Arc<Self>) -> Tracked {
        self.track_kind(false)
    }

    /// Tracks an HBONE connection until its last frame is written.
    pub fn track_hbone(self: &Arc<Self>) -> Tracked {
        self.track_kind(true)
    }

    fn track_kind(self: &Arc<Self>, hbone: bool) -> Tracked {
        self.counter(hbone).fetch_add(1, Ordering::AcqRel);
        Tracked {
            drain: self.clone(),
            hbone,
        }
    }

    fn counter(&self, hbone: bool) -> &AtomicUsize {
        if hbone {
            &self.hbone_connections
        } else {
            &self.connections
        }
    }

    /// Proxied connections open now.
    pub fn open(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// HBONE connections open now.
    pub fn open_hbone(&self) -> usize {
        self.hbone_connections.load(Ordering::Acquire)
    }

    /// Tells every HBONE connection to stop accepting streams.
    pub fn start(&self) {
        self.draining.send_replace(true);
    }

    /// Whether `start` was called.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves once `start` was called.
    pub async fn started(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Resolves when no connection of either kind is open.
    pub async fn idle(&self) {
        loop {
            let closed = self.closed_one.notified();
            if self.open() == 0 && self.open_hbone() == 0 {
                return;
            }
            closed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_the_last_connection() {
        let drain = Arc::new(Drain::default());
        let a = drain.track();
        let b = drain.track();
        assert_eq!(drain.open(), 2);
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.idle().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one connection is still open");
        let h2 = drain.track_hbone();
        drop(b);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "an HBONE connection may still be flushing"
        );
        assert_eq!((drain.open(), drain.open_hbone()), (0, 1));
        drop(h2);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("idle after the last close")
            .unwrap();
    }

    #[tokio::test]
    async fn started_resolves_after_start_even_for_late_subscribers() {
        let drain = Drain::default();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), drain.started())
                .await
                .is_err()
        );
        drain.start();
        tokio::time::timeout(Duration::from_millis(100), drain.started())
            .await
            .unwrap();
    }
}
