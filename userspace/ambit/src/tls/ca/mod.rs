//! Certificate authorities that issue workload certificates.
//!
//! Two implementations share one leaf profile ([`sign_workload_cert`]): the built-in CA
//! ([`BuiltinCa`], a root generated at start) and Istio's plug-in CA files ([`PluginCa`]).

mod builtin;
// The crate's fuzz entry points parse PEM bytes with it.
pub(crate) mod pem;
mod plugin;

use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub use builtin::BuiltinCa;
pub use plugin::PluginCa;

use super::identity::Identity;

/// How far in the past a certificate's validity starts, to absorb clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

/// A workload certificate and its private key, as presented in the TLS handshake.
pub struct WorkloadCert {
    /// The identity in the certificate's (only) URI SAN.
    pub identity: Identity,
    /// Leaf first, then intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// EC P-256 private key of the leaf (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// Start of validity (as written in the certificate, whole seconds).
    pub not_before: SystemTime,
    /// End of validity (as written in the certificate, whole seconds).
    pub not_after: SystemTime,
}

impl Clone for WorkloadCert {
    fn clone(&self) -> Self {
        WorkloadCert {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for WorkloadCert {
    /// Shows everything but the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Something that signs workload certificates.
pub trait CertificateAuthority: Send + Sync + 'static {
    /// Issues a certificate for `identity`, valid from a minute ago until `lifetime` from now
    /// (capped at the CA certificate's own expiry). Any identity is signed; the caller decides
    /// which identities to ask for.
    fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert>;
    /// The trust anchors that peers' chains must lead to.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
    /// The trust domain of the identities this CA is meant for.
    fn trust_domain(&self) -> &str;
}

/// Signs a workload certificate for `identity` with `issuer`, whose own certificate expires at
/// `ca_not_after`. Returns it with `chain = [leaf]`; the caller appends its intermediates.
///
/// Profile (as Istio's CA): fresh EC P-256 key, empty subject, exactly one URI SAN (the identity,
/// marked critical because the subject is empty), CA:false, key usage digitalSignature +
/// keyEncipherment, extended key usage serverAuth + clientAuth.
fn sign_workload_cert(
    issuer: &Issuer<'_, KeyPair>,
    ca_not_after: SystemTime,
    identity: &Identity,
    lifetime: Duration,
) -> Result<WorkloadCert> {
    let (params, not_before, not_after) = leaf_params(ca_not_after, identity, lifetime)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a P-256 key")?;
    let leaf = params
        .signed_by(&key, issuer)
        .with_context(|| format!("signing a certificate for {identity}"))?;
    Ok(WorkloadCert {
        identity: identity.clone(),
        chain: vec![leaf.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_before,
        not_after,
    })
}

/// A certificate signed for a certificate signing request: the requester holds the key.
#[derive(Debug, Clone)]
pub struct SignedCsr {
    pub identity: Identity,
    /// Leaf first, then the CA's intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
}

/// Signs the public key of a PEM certificate signing request with the workload profile of
/// [`sign_workload_cert`], for the identity in the request's one URI SAN. Only the key and
/// that identity are taken from the request; everything else is the profile's.
fn sign_csr(
    issuer: &Issuer<'_, KeyPair>,
    ca_not_after: SystemTime,
    csr_pem: &str,
    lifetime: Duration,
) -> Result<SignedCsr> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .context("the certificate signing request does not parse")?;
    let uris: Vec<&str> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        bail!(
            "the certificate signing request has {} URI SANs; exactly one SPIFFE identity is signed",
            uris.len()
        );
    };
    let identity = Identity::parse(uri).context("the certificate signing request's URI SAN")?;
    let (params, _, _) = leaf_params(ca_not_after, &identity, lifetime)?;
    let leaf = params
        .signed_by(&csr.public_key, issuer)
        .with_context(|| format!("signing a certificate for {identity}"))?;
    Ok(SignedCsr {
        identity,
        chain: vec![leaf.der().clone()],
    })
}

/// The workload profile's parameters for `identity`, valid from a minute ago for `lifetime`
/// (capped at the CA's expiry), with that validity.
fn leaf_params(
    ca_not_after: SystemTime,
    identity: &Identity,
    lifetime: Duration,
) -> Result<(CertificateParams, SystemTime, SystemTime)> {
    if lifetime < Duration::from_secs(1) {
        bail!("certificate lifetime {lifetime:?} is shorter than a second");
    }
    let now = SystemTime::now();
    if ca_not_after <= now {
        bail!(
            "the CA certificate expired {}s ago",
            now.duration_since(ca_not_after)
                .unwrap_or_default()
                .as_secs()
        );
    }
    let not_before = whole_seconds(now - BACKDATE);
    let not_after = whole_seconds((now + lifetime).min(ca_not_after));

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity
        .to_string()
        .try_into()
        .with_context(|| format!("{identity} is not a valid URI SAN"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok((params, not_before, not_after))
}

/// `t` truncated to whole seconds, as X.509 stores it.
fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use x509_parser::{extensions::GeneralName, parse_x509_certificate, public_key::PublicKey};

    use super::*;

    #[test]
    fn workload_cert_has_istio_profile() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "default", "sleep");
        let cert = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(cert.identity, id);
        assert_eq!(cert.chain.len(), 1, "built-in CA has no intermediates");
        assert!(matches!(cert.key, PrivateKeyDer::Pkcs8(_)));

        let (_, x509) = parse_x509_certificate(&cert.chain[0]).unwrap();
        let roots = ca.roots();
        let (_, root) = parse_x509_certificate(&roots[0]).unwrap();
        assert_eq!(x509.issuer().as_raw(), root.subject().as_raw());
        assert!(x509.subject().as_raw().len() <= 2, "empty subject");

        let san = x509.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "SAN is critical when the subject is empty");
        let names: Vec<_> = san.value.general_names.iter().collect();
        assert_eq!(names.len(), 1);
        assert!(matches!(names[0], GeneralName::URI(uri) if *uri == id.to_string()));

        let bc = x509.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);

        match x509.public_key().parsed().unwrap() {
            PublicKey::EC(point) => assert_eq!(point.key_size(), 256),
            other => panic!("expected an EC key, got {other:?}"),
        }

        let now = SystemTime::now();
        let backdate = now.duration_since(cert.not_before).unwrap();
        assert!(backdate >= BACKDATE && backdate <= BACKDATE + Duration::from_secs(2));
        let ahead = cert.not_after.duration_since(now).unwrap();
        assert!(ahead <= Duration::from_secs(3600) && ahead >= Duration::from_secs(3598));
        assert_eq!(
            x509.validity().not_after.timestamp() as u64,
            cert.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs()
        );
    }

    #[test]
    fn lifetime_is_capped_at_ca_expiry() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "default", "sleep");
        let ten_years = Duration::from_secs(3650 * 24 * 3600);
        let cert = ca.issue(&id, ten_years * 2).unwrap();
        let roots = ca.roots();
        let (_, root) = parse_x509_certificate(&roots[0]).unwrap();
        assert_eq!(
            cert.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            root.validity().not_after.timestamp() as u64
        );
    }

    #[test]
    fn debug_hides_the_key() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let cert = ca
            .issue(
                &Identity::new("cluster.local", "a", "b"),
                Duration::from_secs(60),
            )
            .unwrap();
        let text = format!("{:?}", cert.clone());
        assert!(text.contains("spiffe://cluster.local/ns/a/sa/b"), "{text}");
        assert!(!text.contains("key"), "{text}");
    }
}
