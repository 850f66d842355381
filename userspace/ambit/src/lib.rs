//! Ambit's node: eBPF capture of enrolled pods' TCP traffic and the userspace HBONE tunnel.
//! The `ambit` binary (main.rs) is a thin command line over these modules; the integration
//! tests use them too (e.g. a hand-made HBONE client from the same `tls` and `hbone` code).
//!
//! Reading order: `config` (the file format) → `state` (desired state, indexed) → `agent`
//! (enrollment) → `datapath` (eBPF maps and links) → `proxy` (listeners and handlers) →
//! `hbone` and `tls` (the tunnel).

pub mod agent;
pub mod cgroup;
pub mod config;
pub mod datapath;
#[doc(hidden)]
pub mod fuzzing;
pub mod handle;
pub mod hbone;
pub mod inspect;
pub mod netns;
pub mod observability;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod tls;
