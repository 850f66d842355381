//! Certificate verifiers: the chain must lead to the CA roots (webpki), and the peer's SPIFFE
//! identity must be acceptable. DNS names and the server name play no part.

use std::{fmt, sync::Arc};

use anyhow::{anyhow, Result};
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate, WebPkiClientVerifier,
    },
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use super::{config::provider, identity::Identity};

/// Builds a root store from `roots`; every root must be a usable trust anchor.
pub(super) fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>> {
    if roots.is_empty() {
        return Err(anyhow!("no root certificates to verify peers against"));
    }
    let mut store = RootCertStore::empty();
    for (i, root) in roots.iter().enumerate() {
        store.add(root.clone()).map_err(|e| {
            anyhow!(
                "root certificate #{} is not a usable trust anchor: {e}",
                i + 1
            )
        })?;
    }
    Ok(Arc::new(store))
}

/// Checks that `leaf` chains through `intermediates` to one of `roots` now, as the TLS
/// verifiers do (used to check a CA's files when they are loaded).
pub(super) fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'static>],
) -> Result<()> {
    let store = root_store(roots)?;
    let parsed = ParsedCertificate::try_from(leaf)?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &store,
        intermediates,
        UnixTime::now(),
        provider().signature_verification_algorithms.all,
    )?;
    Ok(())
}

/// The URI SANs of `cert`, in order.
pub(crate) fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    let Some(san) = x509.subject_alternative_name().map_err(|e| e.to_string())? else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect())
}

/// The identity a certificate stands for: its first URI SAN, which must be a SPIFFE identity.
pub(super) fn cert_identity(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    let sans = uri_sans(cert)?;
    let first = sans.first().ok_or("certificate has no URI SAN")?;
    Identity::parse(first).map_err(|e| e.to_string())
}

/// A rejection reason carried through rustls to the handshake error, shown verbatim.
struct Rejected(String);

impl fmt::Debug for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

fn rejected(reason: String) -> rustls::Error {
    tracing::debug!(%reason, "peer certificate rejected");
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Rejected(
        reason,
    )))))
}

/// Client side: the server's chain must lead to the roots, and one of its URI SANs must be one
/// of the expected identities.
#[derive(Debug)]
pub(super) struct ServerIdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerIdentityVerifier {
    /// `expected` must not be empty.
    pub(super) fn new(
        roots: Arc<RootCertStore>,
        expected: Vec<Identity>,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Self {
        ServerIdentityVerifier {
            roots,
            expected,
            algorithms,
        }
    }

    fn check_identity(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let sans =
            uri_sans(end_entity).map_err(|e| rejected(format!("server certificate: {e}")))?;
        let presented: Vec<Identity> = sans
            .iter()
            .filter_map(|s| Identity::parse(s).ok())
            .collect();
        if presented.iter().any(|id| self.expected.contains(id)) {
            return Ok(());
        }
        let expected = join(&self.expected);
        Err(rejected(match presented.as_slice() {
            [] => {
                format!("server certificate has no SPIFFE identity; expected one of [{expected}]")
            }
            [one] => format!("server identity {one} is not one of [{expected}]"),
            many => format!(
                "server identities [{}] are not among [{expected}]",
                join(many)
            ),
        }))
    }
}

fn join(ids: &[Identity]) -> String {
    ids.iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        self.check_identity(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Server side: a client certificate is required, its chain must lead to the roots (webpki),
/// and its identity (first URI SAN, the one reported as the source) must be a SPIFFE identity
/// in the server's trust domain.
#[derive(Debug)]
pub(super) struct TrustDomainVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl TrustDomainVerifier {
    /// Verifies client chains against `roots` and identities against `trust_domain`.
    pub(super) fn new(roots: Arc<RootCertStore>, trust_domain: &str) -> Result<Self> {
        let chain = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| anyhow!("building the client certificate verifier: {e}"))?;
        Ok(TrustDomainVerifier {
            chain,
            trust_domain: trust_domain.to_string(),
        })
    }
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity =
            cert_identity(end_entity).map_err(|e| rejected(format!("client certificate: {e}")))?;
        if identity.trust_domain != self.trust_domain {
            return Err(rejected(format!(
                "client identity {identity} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tls::ca::{BuiltinCa, CertificateAuthority};

    fn cert(ca: &BuiltinCa, id: &Identity) -> CertificateDer<'static> {
        ca.issue(id, Duration::from_secs(60)).unwrap().chain[0].clone()
    }

    #[test]
    fn identity_is_first_uri_san() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let leaf = cert(&ca, &id);
        assert_eq!(uri_sans(&leaf).unwrap(), vec![id.to_string()]);
        assert_eq!(cert_identity(&leaf).unwrap(), id);
        // The CA root has no SAN at all.
        assert!(cert_identity(&ca.roots()[0])
            .unwrap_err()
            .contains("no URI SAN"));
    }

    #[test]
    fn server_identity_must_be_expected() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let a = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let c = Identity::new("cluster.local", "ns", "c");
        let verifier = ServerIdentityVerifier::new(
            root_store(&ca.roots()).unwrap(),
            vec![a.clone(), c.clone()],
            provider().signature_verification_algorithms,
        );
        verifier.check_identity(&cert(&ca, &a)).unwrap();
        verifier.check_identity(&cert(&ca, &c)).unwrap();
        let err = verifier
            .check_identity(&cert(&ca, &b))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("server identity {b} is not one of [{a}, {c}]")),
            "{err}"
        );
        let err = verifier
            .check_identity(&ca.roots()[0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no SPIFFE identity"), "{err}");
    }

    #[test]
    fn root_store_needs_roots() {
        assert!(root_store(&[]).is_err());
        let garbage = CertificateDer::from(vec![1, 2, 3]);
        let err = root_store(&[garbage]).unwrap_err().to_string();
        assert!(err.contains("root certificate #1"), "{err}");
    }
}
