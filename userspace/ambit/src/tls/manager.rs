//! Per-identity certificate cache with rotation at half-life.
//!
//! Rotation only affects new connections: an established TLS session keeps the certificate it
//! was made with, while the next `get` after the refresh point returns a freshly issued one.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use rustls_pki_types::CertificateDer;
use tracing::{info, warn};

use super::{
    ca::{CertificateAuthority, WorkloadCert},
    config::CompliancePolicy,
    identity::Identity,
};

/// Issues workload certificates on first use and re-issues them once more than half of their
/// validity has passed. Share it behind an `Arc`; all methods take `&self`.
pub struct CertManager {
    ca: Arc<dyn CertificateAuthority>,
    lifetime: Duration,
    /// The key exchanges the HBONE configurations built from these certificates use.
    compliance: CompliancePolicy,
    cache: Mutex<HashMap<Identity, Cached>>,
}

struct Cached {
    cert: Arc<WorkloadCert>,
    /// When to issue a replacement: halfway through the validity left at issue time.
    refresh_at: Instant,
}

impl CertManager {
    /// A manager issuing certificates from `ca`, each valid for `lifetime`.
    pub fn new(ca: Arc<dyn CertificateAuthority>, lifetime: Duration) -> CertManager {
        CertManager {
            ca,
            lifetime,
            compliance: CompliancePolicy::Default,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The same, for HBONE under `policy` (Istio's `COMPLIANCE_POLICY`).
    pub fn with_compliance_policy(mut self, policy: CompliancePolicy) -> CertManager {
        self.compliance = policy;
        self
    }

    /// The compliance policy HBONE's TLS configurations follow.
    pub fn compliance_policy(&self) -> CompliancePolicy {
        self.compliance
    }

    /// The current certificate for `identity`: the cached one, or a new one on first use and
    /// after half of the cached one's validity. If re-issuing fails while the cached one is
    /// still valid, the cached one is returned (and the failure logged).
    pub fn get(&self, identity: &Identity) -> Result<Arc<WorkloadCert>> {
        // Issuing is local and fast; holding the lock avoids issuing twice for one identity.
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = cache.get(identity);
        if let Some(cached) = cached.filter(|c| Instant::now() < c.refresh_at) {
            return Ok(cached.cert.clone());
        }
        match self.issue(identity) {
            Ok(fresh) => {
                let cert = fresh.cert.clone();
                cache.insert(identity.clone(), fresh);
                Ok(cert)
            }
            Err(e) => match cached {
                Some(old) if SystemTime::now() < old.cert.not_after => {
                    let error = format!("{e:#}");
                    warn!(%identity, %error, "certificate renewal failed; keeping the current one");
                    Ok(old.cert.clone())
                }
                _ => Err(e),
            },
        }
    }

    fn issue(&self, identity: &Identity) -> Result<Cached> {
        let issued_at = Instant::now();
        let issued_wall = SystemTime::now();
        let cert = self
            .ca
            .issue(identity, self.lifetime)
            .with_context(|| format!("issuing a certificate for {identity}"))?;
        let valid_for = cert
            .not_after
            .duration_since(issued_wall)
            .unwrap_or_default()
            .min(self.lifetime);
        info!(%identity, valid_secs = valid_for.as_secs(), "issued workload certificate");
        Ok(Cached {
            cert: Arc::new(cert),
            refresh_at: issued_at + valid_for / 2,
        })
    }

    /// The trust anchors of the CA.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.ca.roots()
    }

    /// The trust domain of the CA.
    pub fn trust_domain(&self) -> String {
        self.ca.trust_domain().to_string()
    }

    /// Identity and expiry (`not_after`) of every cached certificate, sorted by identity.
    pub fn certificates(&self) -> Vec<(Identity, SystemTime)> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let mut certs: Vec<_> = cache
            .iter()
            .map(|(id, c)| (id.clone(), c.cert.not_after))
            .collect();
        certs.sort();
        certs
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use anyhow::bail;

    use super::*;
    use crate::tls::ca::BuiltinCa;

    /// Counts issuances and can be told to fail.
    struct CountingCa {
        inner: BuiltinCa,
        issued: AtomicUsize,
        fail: AtomicBool,
    }

    impl CertificateAuthority for CountingCa {
        fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert> {
            if self.fail.load(Ordering::SeqCst) {
                bail!("CA unavailable");
            }
            self.issued.fetch_add(1, Ordering::SeqCst);
            self.inner.issue(identity, lifetime)
        }
        fn roots(&self) -> Vec<CertificateDer<'static>> {
            self.inner.roots()
        }
        fn trust_domain(&self) -> &str {
            self.inner.trust_domain()
        }
    }

    fn counting() -> Arc<CountingCa> {
        Arc::new(CountingCa {
            inner: BuiltinCa::generate("cluster.local").unwrap(),
            issued: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
        })
    }

    #[tokio::test]
    async fn caches_then_reissues_after_half_the_lifetime() {
        let ca = counting();
        let manager = CertManager::new(ca.clone(), Duration::from_secs(2));
        let id = Identity::new("cluster.local", "default", "sleep");

        let first = manager.get(&id).unwrap();
        let again = manager.get(&id).unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "cached before half the lifetime"
        );
        assert_eq!(ca.issued.load(Ordering::SeqCst), 1);

        tokio::time::sleep(Duration::from_millis(1100)).await;
        let renewed = manager.get(&id).unwrap();
        assert!(
            !Arc::ptr_eq(&first, &renewed),
            "re-issued after half the lifetime"
        );
        assert_eq!(ca.issued.load(Ordering::SeqCst), 2);
        assert_eq!(renewed.identity, id);
        assert_ne!(renewed.chain[0], first.chain[0]);
        assert!(Arc::ptr_eq(&renewed, &manager.get(&id).unwrap()));
    }

    #[test]
    fn identities_are_cached_separately_and_listed() {
        let ca = counting();
        let manager = CertManager::new(ca.clone(), Duration::from_secs(3600));
        let a = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let cert_b = manager.get(&b).unwrap();
        let cert_a = manager.get(&a).unwrap();
        assert_eq!(cert_a.identity, a);
        assert_eq!(ca.issued.load(Ordering::SeqCst), 2);
        assert_eq!(
            manager.certificates(),
            vec![(a, cert_a.not_after), (b, cert_b.not_after)]
        );
        assert_eq!(manager.trust_domain(), "cluster.local");
        assert_eq!(manager.roots(), ca.roots());
    }

    #[tokio::test]
    async fn keeps_a_valid_cert_when_renewal_fails() {
        let ca = counting();
        let manager = CertManager::new(ca.clone(), Duration::from_secs(4));
        let id = Identity::new("cluster.local", "default", "sleep");
        let first = manager.get(&id).unwrap();

        ca.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let kept = manager.get(&id).unwrap();
        assert!(Arc::ptr_eq(&first, &kept));

        let other = Identity::new("cluster.local", "default", "other");
        let err = format!("{:#}", manager.get(&other).unwrap_err());
        assert!(
            err.contains("issuing a certificate for spiffe://cluster.local/ns/default/sa/other"),
            "{err}"
        );
        assert!(err.contains("CA unavailable"), "{err}");
    }
}
