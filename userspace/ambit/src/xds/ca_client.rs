//! Workload certificates from istiod's CA (`IstioCertificateService/CreateCertificate`), as
//! ztunnel gets them: for each identity a fresh P-256 key made here (it never leaves this
//! process), a CSR with the identity as its one URI SAN, the node agent's bearer token, and
//! the identity named in the `ImpersonatedIdentity` metadata (the node asks on behalf of its
//! pods). The answer's leaf must carry exactly that identity.
//!
//! Trust anchors: the configured root file, plus every root an answer ends with, so that
//! during a root rotation certificates of the old and the new root are both accepted.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _, Result};
use prost_types::{value::Kind, Struct, Value};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::info;

use super::{
    ca::istio_certificate_service_client::IstioCertificateServiceClient,
    client::{bearer, channel},
    proto::ca::IstioCertificateRequest,
};
use crate::tls::{ca::pem, uri_sans, CertificateAuthority, Identity, WorkloadCert};

/// The CSR metadata key by which a node proxy asks for one of its pods' identities.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

pub struct IstiodCa {
    address: String,
    root_cert: PathBuf,
    token: Option<PathBuf>,
    trust_domain: String,
    /// The configured roots and those answers ended with, by DER (deduplicated).
    roots: Mutex<BTreeMap<Vec<u8>, CertificateDer<'static>>>,
    runtime: tokio::runtime::Handle,
}

impl IstiodCa {
    /// A client of the CA at `address` (`https://host:port`), verified with `root_cert` (also
    /// the first trust anchor), authenticated with the token in `token`.
    pub fn new(
        address: &str,
        root_cert: PathBuf,
        token: Option<PathBuf>,
        trust_domain: &str,
    ) -> Result<IstiodCa> {
        let roots = pem::read_certs(&root_cert)?
            .into_iter()
            .map(|c| (c.to_vec(), c))
            .collect();
        Ok(IstiodCa {
            address: address.to_owned(),
            root_cert,
            token,
            trust_domain: trust_domain.to_owned(),
            roots: Mutex::new(roots),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    async fn fetch(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .to_string()
                .try_into()
                .with_context(|| format!("{identity} as a URI SAN"))?,
        )];
        let csr = params
            .serialize_request(&key)
            .context("making the CSR")?
            .pem()
            .context("encoding the CSR")?;
        let metadata = Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_owned(),
                Value {
                    kind: Some(Kind::StringValue(identity.to_string())),
                },
            )]
            .into(),
        };
        let request = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        };
        let channel = channel(&self.address, &self.root_cert).await?;
        let token = bearer(self.token.as_deref())?;
        let mut request = tonic::Request::new(request);
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", token);
        }
        let answer = IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map_err(|status| {
                anyhow!(
                    "the CA at {} refused the CSR for {identity}: {} ({:?})",
                    self.address,
                    status.message(),
                    status.code()
                )
            })?
            .into_inner();
        let mut chain = Vec::new();
        for (i, text) in answer.cert_chain.iter().enumerate() {
            let certs = pem::parse_certs(text.as_bytes(), &format!("cert_chain[{i}]"))?;
            chain.extend(certs);
        }
        let Some(leaf) = chain.first() else {
            bail!("the CA at {} answered with no certificate", self.address);
        };
        let (_, x509) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| anyhow!("the CA's leaf certificate: {e}"))?;
        let got = leaf_identity(leaf)?;
        if &got != identity {
            bail!("the CA signed {got}, not the {identity} asked for");
        }
        let not_before = seconds(x509.validity().not_before.timestamp());
        let not_after = seconds(x509.validity().not_after.timestamp());
        // The answer ends with its root: trust it (the configured one stays trusted too), and
        // do not send it in handshakes.
        if chain.len() > 1 && is_self_signed(chain.last().unwrap()) {
            let root = chain.pop().unwrap();
            self.roots.lock().unwrap().insert(root.to_vec(), root);
        }
        info!(%identity, expires_in = ?not_after.duration_since(SystemTime::now()).unwrap_or_default(), "certificate from istiod's CA");
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
        })
    }
}

impl CertificateAuthority for IstiodCa {
    /// Asks istiod. Called from the tunnel's runtime threads: the call blocks this worker
    /// (`block_in_place`) while others go on; certificates are cached and renewed ahead of
    /// expiry, so this happens once per identity and half-lifetime.
    fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert> {
        tokio::task::block_in_place(|| self.runtime.block_on(self.fetch(identity, lifetime)))
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.lock().unwrap().values().cloned().collect()
    }

    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

/// The one SPIFFE identity in the leaf's URI SANs.
fn leaf_identity(leaf: &CertificateDer<'_>) -> Result<Identity> {
    let uris = uri_sans(leaf).map_err(|e| anyhow!("the leaf's SAN: {e}"))?;
    match uris.as_slice() {
        [uri] => Identity::parse(uri),
        _ => bail!("the leaf has {} URI SANs, not one", uris.len()),
    }
}

fn is_self_signed(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert)
        .is_ok_and(|(_, x)| x.subject().as_raw() == x.issuer().as_raw())
}

fn seconds(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64)
}
