//! `fwmark_reflect` in an enrolled pod's netns. The kernel answers some packets without a
//! socket of their own: a TCP reset when a delivery reaches a port nobody listens on (or a
//! connection the app already closed), an ICMP error. Such a reply has mark 0, so the pod's
//! delivery rule (`routing`) does not match it, and it would leave for the network toward the
//! client's address: the tunnel would wait for its connect() to time out instead of learning
//! at once that the port is closed, and the reset would be seen on the wire. With
//! `net.ipv4.fwmark_reflect` and `net.ipv6.fwmark_reflect` set to 1, the reply carries the mark
//! of the packet it answers; the tunnel's delivery sockets carry `APP_REPLY_MARK`, so the reply
//! comes back to them. Packets from the network carry no mark (it is cleared when they cross
//! into the pod's netns), so nothing else changes.
//!
//! Written through the procfs at `--proc-root`: a DaemonSet's container has a read-only
//! `/proc/sys`, the host's procfs mounted at /host/proc (writable) is used instead. The pod's
//! earlier values are put back when it leaves the mesh.

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::netns::Netns;

const SYSCTLS: [&str; 2] = ["net/ipv4/fwmark_reflect", "net/ipv6/fwmark_reflect"];
const ON: &str = "1";

/// The values Ambit changed in one pod, to put back.
#[derive(Debug, Default)]
pub struct FwmarkReflect {
    changed: Vec<(&'static str, String)>,
}

impl FwmarkReflect {
    /// Turns reflection on in `netns`. IPv6 may be disabled in a pod: its sysctl is then
    /// absent and skipped.
    pub fn enable(netns: &Netns, proc_root: &Path) -> Result<Self> {
        let mut changed = Vec::new();
        for name in SYSCTLS {
            let before = match netns.sysctl(proc_root, name) {
                Ok(value) => value,
                Err(_) if name.starts_with("net/ipv6") => continue,
                Err(e) => return Err(e),
            };
            if before != ON {
                netns.set_sysctl(proc_root, name, ON).with_context(|| {
                    format!(
                        "{name} must be writable through {} (in a DaemonSet, the host's /proc \
                         mounted writable at /host/proc, --proc-root /host/proc)",
                        proc_root.display()
                    )
                })?;
                changed.push((name, before));
            }
        }
        Ok(Self { changed })
    }

    /// The pod's own values this process is to put back, by sysctl name: handed to a
    /// successor, which finds the sysctls already on.
    pub fn to_restore(&self) -> Vec<(String, String)> {
        self.changed
            .iter()
            .map(|(name, before)| (name.to_string(), before.clone()))
            .collect()
    }

    /// Takes over the values a predecessor was to put back (see `to_restore`).
    pub fn inherit(&mut self, values: &[(String, String)]) {
        for (name, before) in values {
            let known = SYSCTLS.iter().find(|s| **s == name.as_str());
            if let Some(name) = known {
                if !self.changed.iter().any(|(n, _)| n == name) {
                    self.changed.push((name, before.clone()));
                }
            }
        }
    }

    /// Puts back the pod's own values (it leaves the mesh; not on node shutdown, when the pod
    /// stays enrolled).
    pub fn restore(&self, netns: &Netns, proc_root: &Path) -> Result<()> {
        for (name, before) in &self.changed {
            netns.set_sysctl(proc_root, name, before)?;
        }
        Ok(())
    }
}

/// Fails unless this process can write the sysctls of a netns through `proc_root`: checked at
/// start, on the node's own netns (writing back the value it has), so that a DaemonSet with a
/// read-only procfs stops with this error instead of failing every pod.
pub fn check_writable(proc_root: &Path) -> Result<()> {
    let own = Netns::open(Path::new("/proc/self/ns/net"))?;
    let value = own.sysctl(proc_root, SYSCTLS[0])?;
    own.set_sysctl(proc_root, SYSCTLS[0], &value)
        .with_context(|| {
            format!(
                "the pods' sysctls are written through {}/sys, which is not writable here (in a \
             DaemonSet: mount the host's /proc writable at /host/proc and pass --proc-root \
             /host/proc)",
                proc_root.display()
            )
        })
}
