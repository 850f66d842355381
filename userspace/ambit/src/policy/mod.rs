//! Istio's L4 authorization policies, enforced at the destination as ztunnel does.
//!
//! - [`model`]: the policy format (ztunnel's local config `policies:` entries).
//! - [`cidr`]: IP ranges for the `…Ips` fields.
//! - [`eval`]: whether one policy matches one connection.
//! - [`set`]: which policies cover a destination workload, and the decision.
//!
//! The decision, for a connection to a workload: if any Deny policy covering the workload
//! matches, deny; else if no Allow policy covers it, allow; else allow only if some Allow
//! policy matches. A policy covers a workload when it is `Global`, `Namespace`-scoped in the
//! workload's namespace, or a `WorkloadSelector` policy the workload names. Dry-run policies
//! never change a decision; what they would have decided is logged at debug level.

pub mod cidr;
pub mod eval;
pub mod model;
pub mod set;

pub use cidr::Cidr;
pub use eval::ConnectionInfo;
pub use model::{Action, Authorization, RbacMatch, Scope, ServiceAccountMatch, StringMatch};
pub use set::{Decision, DestinationWorkload, PolicySet, NO_ALLOW_MATCHED};
