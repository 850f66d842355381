//! Graceful shutdown. Every connection the tunnel handles holds a [`Tracked`] while it is open;
//! on SIGTERM the node closes its listeners (new connections fail closed in the kernel), tells
//! the HBONE servers to stop taking streams (HTTP/2 GOAWAY), and waits for the open count to
//! reach zero or for its deadline.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use tokio::sync::{watch, Notify};

#[derive(Default)]
pub struct Drain {
    open: AtomicUsize,
    closed_one: Notify,
    draining: watch::Sender<bool>,
}

/// Counts one open connection until dropped.
pub struct Tracked(Arc<Drain>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.closed_one.notify_waiters();
    }
}

impl Drain {
    pub fn track(self: &Arc<Self>) -> Tracked {
        self.open.fetch_add(1, Ordering::AcqRel);
        Tracked(self.clone())
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Tells every HBONE connection to stop accepting streams.
    pub fn start(&self) {
        self.draining.send_replace(true);
    }

    /// Resolves once `start` was called.
    pub async fn started(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Resolves when no connection is open.
    pub async fn idle(&self) {
        loop {
            let closed = self.closed_one.notified();
            if self.open() == 0 {
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
        drop(b);
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
