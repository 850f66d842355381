//! Inbound delivery and TIME_WAIT. The tunnel delivers every connection into a pod from the
//! pod's own address, so all deliveries to one app port share one (source address,
//! destination) pair, and so its ≈ 28,000 ephemeral ports. A client that closes first leaves a
//! 60 s TIME_WAIT socket on that pair for each delivery. With the kernel's default,
//! `tcp_tw_reuse = 2` (reuse over loopback addresses only), connect() then fails with
//! EADDRNOTAVAIL once they are all taken: a service with more than ≈ 470 new connections/s on
//! one port would be cut off (measured: see the test in tests/stress.rs). Without Ambit, every
//! client has its own pair.
//!
//! With `tcp_tw_reuse = 1` in the pod's netns, connect() may reuse a pair whose TIME_WAIT
//! socket has been quiet for a second; TCP timestamps keep the old connection's segments out of
//! the new one. The setting is per netns: it also applies to the app's own connects, where it
//! is equally safe. The pod's earlier value is put back when it leaves the mesh.

use anyhow::Result;
use tracing::warn;

use crate::netns::Netns;

const SYSCTL: &str = "net/ipv4/tcp_tw_reuse";
const REUSE: &str = "1";

/// The pod's value before enrollment, when Ambit changed it.
#[derive(Debug)]
pub struct TimeWaitReuse {
    before: Option<String>,
}

impl TimeWaitReuse {
    /// Lets connect() in `netns` reuse TIME_WAIT pairs (see the module's comment). A failure
    /// is logged, not fatal: the pod is served as before, with the limit.
    pub fn enable(netns: &Netns) -> Self {
        let enable = || -> Result<Option<String>> {
            let before = netns.sysctl(SYSCTL)?;
            if before == REUSE {
                return Ok(None);
            }
            netns.set_sysctl(SYSCTL, REUSE)?;
            Ok(Some(before))
        };
        match enable() {
            Ok(before) => Self { before },
            Err(e) => {
                warn!(netns = %netns.path().display(), "cannot set {SYSCTL} to {REUSE}: {e:#}");
                Self { before: None }
            }
        }
    }

    /// Puts back the pod's own value (the pod leaves the mesh; not on node shutdown, when the
    /// pod stays enrolled).
    pub fn restore(self, netns: &Netns) -> Result<()> {
        match self.before {
            Some(before) => netns.set_sysctl(SYSCTL, &before),
            None => Ok(()),
        }
    }
}
