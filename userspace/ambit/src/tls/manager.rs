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
    /// One slot per identity. The map's lock is held only to find a slot, so that a slow CA
    /// (istiod, over the network) stalls no other identity.
    cache: Mutex<HashMap<Identity, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    /// The current certificate (locked only to read or replace it).
    current: Mutex<Option<Cached>>,
    /// Held while this identity is being issued: one issuance at a time, and while a renewal
    /// runs the current certificate keeps serving without waiting for it.
    issuing: Mutex<()>,
}

impl Slot {
    fn current(&self) -> std::sync::MutexGuard<'_, Option<Cached>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current certificate if it is not due for renewal.
    fn fresh(&self) -> Option<Arc<WorkloadCert>> {
        let current = self.current();
        let cached = current.as_ref()?;
        (Instant::now() < cached.refresh_at).then(|| cached.cert.clone())
    }

    /// The current certificate if it has not expired.
    fn valid(&self) -> Option<Arc<WorkloadCert>> {
        let current = self.current();
        let cached = current.as_ref()?;
        (SystemTime::now() < cached.cert.not_after).then(|| cached.cert.clone())
    }
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
        let slot = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(identity.clone())
            .or_default()
            .clone();
        if let Some(fresh) = slot.fresh() {
            return Ok(fresh);
        }
        let _issuing = match slot.issuing.try_lock() {
            Ok(guard) => guard,
            // Another connection is renewing this identity: the current one serves meanwhile;
            // without one, wait for that issuance and take what it got.
            Err(_) => {
                if let Some(valid) = slot.valid() {
                    return Ok(valid);
                }
                let guard = slot.issuing.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(fresh) = slot.fresh() {
                    return Ok(fresh);
                }
                guard
            }
        };
        match self.issue(identity) {
            Ok(fresh) => {
                let cert = fresh.cert.clone();
                *slot.current() = Some(fresh);
                Ok(cert)
            }
            Err(e) => match slot.valid() {
                Some(old) => {
                    let error = format!("{e:#}");
                    warn!(%identity, %error, "certificate renewal failed; keeping the current one");
                    Ok(old)
                }
                None => Err(e),
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
            .filter_map(|(id, slot)| Some((id.clone(), slot.current().as_ref()?.cert.not_after)))
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

    /// Holds every issuance of one identity until the test lets it go.
    struct GatedCa {
        inner: BuiltinCa,
        gated: Identity,
        entered: std::sync::mpsc::SyncSender<()>,
        gate: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl CertificateAuthority for GatedCa {
        fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert> {
            if *identity == self.gated {
                self.entered.send(()).unwrap();
                self.gate.lock().unwrap().recv().unwrap();
            }
            self.inner.issue(identity, lifetime)
        }
        fn roots(&self) -> Vec<CertificateDer<'static>> {
            self.inner.roots()
        }
        fn trust_domain(&self) -> &str {
            self.inner.trust_domain()
        }
    }

    /// A manager whose CA holds `gated`'s issuances: (manager, entered, release).
    fn gated(
        gated: &Identity,
        lifetime: Duration,
    ) -> (
        Arc<CertManager>,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (release, gate) = std::sync::mpsc::channel();
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(4);
        let ca = Arc::new(GatedCa {
            inner: BuiltinCa::generate("cluster.local").unwrap(),
            gated: gated.clone(),
            entered: entered_tx,
            gate: Mutex::new(gate),
        });
        (Arc::new(CertManager::new(ca, lifetime)), entered, release)
    }

    /// `get` on a thread; its answer within 10 s, or a failure (not a hang) if it waits on the
    /// held issuance.
    fn get_soon(manager: &Arc<CertManager>, id: &Identity) -> Arc<WorkloadCert> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (m, id) = (manager.clone(), id.clone());
        std::thread::spawn(move || tx.send(m.get(&id).unwrap()));
        rx.recv_timeout(Duration::from_secs(10))
            .expect("waited for another identity's (or a renewal's) issuance")
    }

    #[test]
    fn an_identity_being_issued_holds_up_no_other() {
        let slow = Identity::new("cluster.local", "default", "slow");
        let (manager, entered, release) = gated(&slow, Duration::from_secs(3600));
        let m = manager.clone();
        let id = slow.clone();
        let held = std::thread::spawn(move || m.get(&id).unwrap());
        entered.recv().unwrap();
        let other = Identity::new("cluster.local", "default", "other");
        assert_eq!(get_soon(&manager, &other).identity, other);
        release.send(()).unwrap();
        assert_eq!(held.join().unwrap().identity, slow);
    }

    #[test]
    fn during_a_renewal_the_current_certificate_serves() {
        let id = Identity::new("cluster.local", "default", "sleep");
        // 4 s: a certificate's notAfter is whole seconds, so it may end up to 1 s early; with
        // 2 s the first one could expire right after the refresh point, and then it may not
        // serve (seen under load).
        let (manager, entered, release) = gated(&id, Duration::from_secs(4));
        release.send(()).unwrap();
        let first = manager.get(&id).unwrap();
        entered.recv().unwrap();
        std::thread::sleep(Duration::from_millis(2100)); // past the refresh point (≤ 2 s)
        let m = manager.clone();
        let renewing_id = id.clone();
        let renewing = std::thread::spawn(move || m.get(&renewing_id).unwrap());
        entered.recv().unwrap();
        assert!(Arc::ptr_eq(&get_soon(&manager, &id), &first));
        release.send(()).unwrap();
        assert!(!Arc::ptr_eq(&renewing.join().unwrap(), &first));
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
