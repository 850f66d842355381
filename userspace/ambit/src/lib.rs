//! Ambit's node: eBPF capture of enrolled pods' TCP traffic and the userspace HBONE tunnel.
//! The `ambit` binary (main.rs) is a thin command line over these modules (`node` runs one); the integration
//! tests use them too (e.g. a hand-made HBONE client from the same `tls` and `hbone` code).
//!
//! Reading order: `config` (the file format) → `state` (desired state, indexed) → `agent`
//! (enrollment) → `datapath` (eBPF maps and links) → `proxy` (listeners and handlers:
//! outbound, HBONE inbound, plaintext inbound) → `hbone` (the client pool and the protocol's
//! pieces) and `tls` → `socket` and `drain` (plain TCP, shutdown). Each layer only uses the
//! ones after it. `xds` holds the protobuf messages of istiod's API (delta xDS and the CA).

pub mod agent;
pub mod cgroup;
pub mod config;
pub mod datapath;
pub mod drain;
#[doc(hidden)]
pub mod fuzzing;
pub mod handle;
pub mod hbone;
pub mod inspect;
pub mod netns;
pub mod node;
pub mod observability;
pub mod policy;
pub mod proxy;
pub mod socket;
pub mod state;
pub mod tls;
pub mod xds;
