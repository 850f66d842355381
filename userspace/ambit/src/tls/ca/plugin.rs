//! Istio's plug-in CA: the signing certificate and key, and the chain, read from files.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context, Result};
use rcgen::{Issuer, KeyPair};
use rustls_pki_types::CertificateDer;

use super::{pem, sign_workload_cert, CertificateAuthority, WorkloadCert};
use crate::tls::{identity::Identity, verify};

/// The signing (CA) certificate.
pub(super) const CA_CERT: &str = "ca-cert.pem";
/// The private key of the signing certificate.
pub(super) const CA_KEY: &str = "ca-key.pem";
/// The trust anchors (one or more roots).
pub(super) const ROOT_CERT: &str = "root-cert.pem";
/// The chain from the signing certificate up to the root, appended after each leaf.
pub(super) const CERT_CHAIN: &str = "cert-chain.pem";

/// A CA loaded from Istio's plug-in CA files (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
/// `cert-chain.pem`) in one directory, the layout of Istio's `cacerts` secret.
pub struct PluginCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl PluginCa {
    /// Loads the four files from `dir`. A missing or malformed file is an error naming its path
    /// and the problem. The CA is checked before use: `ca-cert.pem` must be a CA certificate,
    /// `ca-key.pem` must be its key, and a certificate it signs must chain through
    /// `cert-chain.pem` to `root-cert.pem`.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<PluginCa> {
        let ca_cert_path = dir.join(CA_CERT);
        let ca_key_path = dir.join(CA_KEY);
        // As Istio, the signing certificate is the first one in its file.
        let ca_cert = pem::read_certs(&ca_cert_path)?.swap_remove(0);
        let key = pem::read_key(&ca_key_path)?;
        let roots = pem::read_certs(&dir.join(ROOT_CERT))?;
        let chain = pem::read_certs(&dir.join(CERT_CHAIN))?;

        let (_, x509) = x509_parser::parse_x509_certificate(&ca_cert)
            .map_err(|e| anyhow!("{}: {e}", ca_cert_path.display()))?;
        if !x509.is_ca() {
            bail!(
                "{}: not a CA certificate (basicConstraints CA:true is missing)",
                ca_cert_path.display()
            );
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            bail!(
                "{}: this key does not belong to the certificate in {}",
                ca_key_path.display(),
                ca_cert_path.display()
            );
        }
        let not_after =
            UNIX_EPOCH + Duration::from_secs(x509.validity().not_after.timestamp().max(0) as u64);
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key)
            .map_err(|e| anyhow!("{}: cannot sign with it: {e}", ca_cert_path.display()))?;

        let ca = PluginCa {
            trust_domain: trust_domain.to_string(),
            issuer,
            not_after,
            chain,
            roots,
        };
        ca.self_check().with_context(|| {
            format!(
                "plug-in CA in {}: a certificate signed with {CA_KEY} does not verify \
                 through {CERT_CHAIN} to {ROOT_CERT}",
                dir.display()
            )
        })?;
        Ok(ca)
    }

    /// Signs a certificate signing request (the stand-in istiod's CA); the chain is the leaf and
    /// this CA's `cert-chain.pem`.
    pub fn sign_csr(&self, csr_pem: &str, lifetime: Duration) -> Result<super::SignedCsr> {
        let mut signed = super::sign_csr(&self.issuer, self.not_after, csr_pem, lifetime)?;
        signed.chain.extend(self.chain.iter().cloned());
        Ok(signed)
    }

    /// Signs a TLS serving certificate for `key` (the stand-in istiod's); returns the leaf and
    /// this CA's chain as PEM.
    pub fn sign_server_cert(
        &self,
        params: rcgen::CertificateParams,
        key: &KeyPair,
    ) -> Result<String> {
        let leaf = params
            .signed_by(key, &self.issuer)
            .context("signing the serving certificate")?;
        let mut pem = leaf.pem();
        for cert in &self.chain {
            pem.push_str(&super::pem::to_pem(cert));
        }
        Ok(pem)
    }

    /// Issues a short-lived probe certificate and verifies it against the roots, so that a
    /// broken set of files fails at load rather than in every handshake.
    fn self_check(&self) -> Result<()> {
        let probe = Identity::new(&self.trust_domain, "ambit-self-check", "probe");
        let cert = self.issue(&probe, Duration::from_secs(60))?;
        verify::verify_chain(&cert.chain[0], &cert.chain[1..], &self.roots)
    }
}

impl CertificateAuthority for PluginCa {
    fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert> {
        let mut cert = sign_workload_cert(&self.issuer, self.not_after, identity, lifetime)?;
        cert.chain.extend(self.chain.iter().cloned());
        Ok(cert)
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }

    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::tls::{ca::BuiltinCa, testutil::TempDir};

    fn layout() -> (TempDir, BuiltinCa) {
        let dir = TempDir::new();
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        ca.write_plugin_layout(dir.path()).unwrap();
        (dir, ca)
    }

    #[test]
    fn loads_builtin_layout_and_issues_chaining_certs() {
        let (dir, builtin) = layout();
        let ca = PluginCa::load(dir.path(), "cluster.local").unwrap();
        assert_eq!(ca.trust_domain(), "cluster.local");
        assert_eq!(ca.roots(), builtin.roots());

        let id = Identity::new("cluster.local", "default", "sleep");
        let cert = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(cert.identity, id);
        assert_eq!(cert.chain.len(), 2, "leaf + cert-chain.pem");
        assert_eq!(cert.chain[1], builtin.roots()[0]);
        verify::verify_chain(&cert.chain[0], &cert.chain[1..], &ca.roots()).unwrap();
        // The same CA on two nodes: a cert from one verifies against the other's roots.
        let other = builtin.issue(&id, Duration::from_secs(3600)).unwrap();
        verify::verify_chain(&other.chain[0], &[], &ca.roots()).unwrap();
    }

    #[test]
    fn loads_istio_style_rsa_ca() {
        // Istio's sample CA has an RSA key in PKCS#1 ("RSA PRIVATE KEY") form.
        let key_pem = include_str!("testdata/rsa-ca-key.pem");
        assert!(key_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        let dir = TempDir::new();
        fs::write(dir.path().join(CA_KEY), key_pem).unwrap();
        let key = pem::read_key(&dir.path().join(CA_KEY)).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap().pem();
        for name in [CA_CERT, ROOT_CERT, CERT_CHAIN] {
            fs::write(dir.path().join(name), &cert).unwrap();
        }
        let ca = PluginCa::load(dir.path(), "cluster.local").unwrap();
        let cert = ca
            .issue(
                &Identity::new("cluster.local", "a", "b"),
                Duration::from_secs(60),
            )
            .unwrap();
        verify::verify_chain(&cert.chain[0], &cert.chain[1..], &ca.roots()).unwrap();
    }

    #[test]
    fn missing_or_garbage_file_is_named() {
        for name in [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN] {
            let (dir, _) = layout();
            let path = dir.path().join(name);

            fs::remove_file(&path).unwrap();
            let err = format!(
                "{:#}",
                PluginCa::load(dir.path(), "cluster.local").err().unwrap()
            );
            assert!(err.contains(&path.display().to_string()), "{name}: {err}");
            assert!(err.contains("No such file"), "{name}: {err}");

            fs::write(&path, "garbage\n").unwrap();
            let err = format!(
                "{:#}",
                PluginCa::load(dir.path(), "cluster.local").err().unwrap()
            );
            assert!(err.contains(&path.display().to_string()), "{name}: {err}");
        }
    }

    #[test]
    fn key_of_another_ca_is_refused() {
        let (dir, _) = layout();
        let (other, _) = layout();
        fs::copy(other.path().join(CA_KEY), dir.path().join(CA_KEY)).unwrap();
        let err = format!(
            "{:#}",
            PluginCa::load(dir.path(), "cluster.local").err().unwrap()
        );
        assert!(
            err.contains(&dir.path().join(CA_KEY).display().to_string()),
            "{err}"
        );
        assert!(err.contains("does not belong"), "{err}");
    }

    #[test]
    fn root_of_another_ca_is_refused() {
        let (dir, _) = layout();
        let (other, _) = layout();
        fs::copy(other.path().join(ROOT_CERT), dir.path().join(ROOT_CERT)).unwrap();
        let err = format!(
            "{:#}",
            PluginCa::load(dir.path(), "cluster.local").err().unwrap()
        );
        assert!(
            err.contains(ROOT_CERT) && err.contains("does not verify"),
            "{err}"
        );
    }

    #[test]
    fn non_ca_certificate_is_refused() {
        let (dir, _) = layout();
        let key = KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::default()
            .self_signed(&key)
            .unwrap();
        fs::write(dir.path().join(CA_CERT), cert.pem()).unwrap();
        fs::write(dir.path().join(CA_KEY), key.serialize_pem()).unwrap();
        let err = format!(
            "{:#}",
            PluginCa::load(dir.path(), "cluster.local").err().unwrap()
        );
        assert!(
            err.contains(&dir.path().join(CA_CERT).display().to_string()),
            "{err}"
        );
        assert!(err.contains("not a CA certificate"), "{err}");
    }
}
