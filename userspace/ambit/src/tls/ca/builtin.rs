//! The built-in CA: a self-signed root generated when the node starts.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;

use super::{
    plugin::{CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT},
    sign_workload_cert, whole_seconds, CertificateAuthority, WorkloadCert, BACKDATE,
};
use crate::tls::identity::Identity;

/// Validity of the generated root (about ten years).
const ROOT_LIFETIME: Duration = Duration::from_secs(3650 * 24 * 3600);

/// A CA whose self-signed root (EC P-256, CA:true, ~10 years) is generated at start and lives
/// only in memory, unless written out with [`BuiltinCa::write_plugin_layout`].
pub struct BuiltinCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
    not_after: SystemTime,
}

impl BuiltinCa {
    /// Generates a fresh root key and self-signed root certificate for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<BuiltinCa> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating the CA key")?;
        let now = SystemTime::now();
        let not_after = whole_seconds(now + ROOT_LIFETIME);

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        // A per-key suffix keeps roots of different nodes apart: a peer signed by another
        // node's root then fails as "unknown issuer" rather than "bad signature".
        let key_tag: String = key.public_key_raw()[1..5]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("Ambit built-in root CA {key_tag}"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = whole_seconds(now - BACKDATE).into();
        params.not_after = not_after.into();

        let root = params
            .self_signed(&key)
            .context("self-signing the CA certificate")?;
        Ok(BuiltinCa {
            trust_domain: trust_domain.to_string(),
            root: root.der().clone(),
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
            not_after,
        })
    }

    /// Writes the root certificate (PEM) to `path`, for users and tools that need to trust it.
    pub fn write_root(&self, path: &Path) -> Result<()> {
        fs::write(path, &self.root_pem)
            .with_context(|| format!("writing the root certificate to {}", path.display()))
    }

    /// Writes Istio's plug-in CA layout into `dir` (created if missing): `ca-cert.pem`,
    /// `ca-key.pem` (mode 0600), `root-cert.pem` and `cert-chain.pem`. Here the CA certificate
    /// is the root, so all three certificate files hold it. [`super::PluginCa::load`] on that
    /// directory gives another node the same CA.
    pub fn write_plugin_layout(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for name in [CA_CERT, ROOT_CERT, CERT_CHAIN] {
            let path = dir.join(name);
            fs::write(&path, &self.root_pem)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let key_path = dir.join(CA_KEY);
        write_private(&key_path, self.issuer.key().serialize_pem().as_bytes())
            .with_context(|| format!("writing {}", key_path.display()))
    }
}

/// Writes `data` to `path`, readable by the owner only.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // `mode` only applies to new files; tighten an existing one too.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(data)
}

impl CertificateAuthority for BuiltinCa {
    fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert> {
        sign_workload_cert(&self.issuer, self.not_after, identity, lifetime)
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root.clone()]
    }

    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

#[cfg(test)]
mod tests {
    use x509_parser::{parse_x509_certificate, public_key::PublicKey};

    use super::*;
    use crate::tls::testutil::TempDir;

    #[test]
    fn root_is_a_p256_ca_valid_for_about_ten_years() {
        let ca = BuiltinCa::generate("example.org").unwrap();
        assert_eq!(ca.trust_domain(), "example.org");
        let roots = ca.roots();
        assert_eq!(roots.len(), 1);
        let (_, root) = parse_x509_certificate(&roots[0]).unwrap();
        assert!(root.is_ca());
        assert_eq!(root.subject().as_raw(), root.issuer().as_raw());
        assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert!(
            matches!(root.public_key().parsed().unwrap(), PublicKey::EC(p) if p.key_size() == 256)
        );
        let days = (root.validity().not_after.timestamp() - root.validity().not_before.timestamp())
            / 86_400;
        assert!((3649..=3651).contains(&days), "{days} days");
        assert!(root
            .subject()
            .iter_organization()
            .any(|o| o.as_str() == Ok("example.org")));
    }

    #[test]
    fn writes_root_and_plugin_layout() {
        let dir = TempDir::new();
        let ca = BuiltinCa::generate("cluster.local").unwrap();

        let root_path = dir.path().join("root.pem");
        ca.write_root(&root_path).unwrap();
        let root_pem = fs::read_to_string(&root_path).unwrap();
        assert!(root_pem.starts_with("-----BEGIN CERTIFICATE-----"));

        let layout = dir.path().join("nested/ca");
        ca.write_plugin_layout(&layout).unwrap();
        for name in [CA_CERT, ROOT_CERT, CERT_CHAIN] {
            assert_eq!(
                fs::read_to_string(layout.join(name)).unwrap(),
                root_pem,
                "{name}"
            );
        }
        let key_path = layout.join(CA_KEY);
        assert!(fs::read_to_string(&key_path)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        let mode = fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let err = ca
            .write_root(&dir.path().join("missing/root.pem"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("missing/root.pem"), "{err:#}");
    }
}
