//! Ambit's node: eBPF capture of enrolled pods' TCP traffic and the userspace HBONE tunnel.
//! The `ambit` binary (main.rs) is a thin command line over these modules (`node` runs one); the integration
//! tests use them too (e.g. a hand-made HBONE client from the same `tls` and `hbone` code).
//!
//! Reading order: `config` (the file format) → `state` (desired state, indexed) → `agent`
//! (enrollment) → `datapath` (eBPF maps and links) → `proxy` (listeners and handlers:
//! outbound, HBONE inbound, plaintext inbound) → `hbone` (the client pool and the protocol's
//! pieces) and `tls` → `socket` and `drain` (plain TCP, shutdown). Each layer only uses the
//! ones after it. `xds` talks to istiod (delta xDS as a source, its CA by CSR);
//! `control_plane` is `ambit control-plane`, a stand-in istiod built on the same messages;
//! `cni_install` is `ambit cni install|uninstall`, which chains the CNI plugin on a node.

pub mod agent;
pub mod cgroup;
pub mod cni_install;
pub mod config;
pub mod control_plane;
pub mod datapath;
pub mod drain;
#[doc(hidden)]
pub mod fuzzing;
pub mod handle;
pub mod handover;
pub mod hbone;
pub mod inspect;
pub mod netns;
pub mod node;
pub mod observability;
pub mod policy;
pub mod proxy;
pub mod routing;
pub mod socket;
pub mod state;
pub mod tls;
pub mod xds;
