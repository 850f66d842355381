//! Workload identities and mutual TLS for HBONE, wire-compatible with Istio's ztunnel.
//!
//! - [`identity`]: SPIFFE identities (`spiffe://<td>/ns/<ns>/sa/<sa>`).
//! - [`ca`]: certificate authorities that issue workload certificates (built-in root or
//!   Istio's plug-in CA files).
//! - [`manager`]: the per-identity certificate cache, with rotation.
//! - [`config`]: rustls client and server configurations (TLS 1.3, AES-GCM, ALPN `h2`, mTLS,
//!   key exchanges by compliance policy, post-quantum included).
//! - `verify`: the certificate verifiers behind those configurations.

pub mod ca;
pub mod config;
pub mod identity;
pub mod manager;
#[cfg(test)]
pub(crate) mod testutil;
mod verify;
pub(crate) use verify::uri_sans;

// The public API, re-exported flat (`crate::tls::Identity`, ...). Until the node wires all of
// it in, some re-exports are unused.
pub use ca::{BuiltinCa, CertificateAuthority, PluginCa, SignedCsr, WorkloadCert};
pub use config::{
    client_config, dummy_server_name, install_default_provider, key_exchange, peer_identity,
    server_config, CompliancePolicy,
};
pub use identity::{Identity, DEFAULT_TRUST_DOMAIN};
pub use manager::CertManager;
