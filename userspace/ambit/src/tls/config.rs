//! rustls configurations for HBONE, as ztunnel negotiates them: TLS 1.3 only, AES-GCM suites
//! only, ALPN `h2`, mutual authentication with SPIFFE identities, no SNI, no resumption, and
//! ztunnel's key exchanges: X25519, P-256, P-384 and the hybrid post-quantum X25519MLKEM768 —
//! or, under the `pqc` compliance policy, X25519MLKEM768 alone.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::{
    client::Resumption,
    crypto::{aws_lc_rs, ring, CryptoProvider, SupportedKxGroup},
    version::TLS13,
    ClientConfig, CommonState, ServerConfig,
};
use rustls_pki_types::{CertificateDer, ServerName};

pub use ambit_settings::CompliancePolicy;

use super::{
    ca::WorkloadCert,
    identity::Identity,
    verify::{cert_identity, root_store, ServerIdentityVerifier, TrustDomainVerifier},
};

/// The only application protocol spoken over HBONE.
const ALPN_H2: &[u8] = b"h2";

/// The key-exchange groups of `policy`, in preference order. The classical groups are ring's
/// (as before); X25519MLKEM768 comes from aws-lc-rs, as ring has no ML-KEM.
fn kx_groups(policy: CompliancePolicy) -> Vec<&'static dyn SupportedKxGroup> {
    match policy {
        CompliancePolicy::Default => vec![
            ring::kx_group::X25519,
            ring::kx_group::SECP256R1,
            ring::kx_group::SECP384R1,
            aws_lc_rs::kx_group::X25519MLKEM768,
        ],
        CompliancePolicy::Pqc => vec![aws_lc_rs::kx_group::X25519MLKEM768],
    }
}

/// The ring provider restricted to TLS13_AES_256_GCM_SHA384 and TLS13_AES_128_GCM_SHA256
/// (no ChaCha20; ring's AES-GCM measured fastest here), with `policy`'s key exchanges. Used
/// explicitly; the process-wide default provider is never consulted.
pub(super) fn provider_with(policy: CompliancePolicy) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        kx_groups: kx_groups(policy),
        ..ring::default_provider()
    })
}

/// Installs ring as rustls's process-wide default provider, once (later calls do nothing).
/// With two providers compiled in (ring; aws-lc-rs for ML-KEM) rustls no longer picks a default
/// by itself, and libraries that build their TLS from it (the Kubernetes client) would panic.
/// HBONE never uses it: it passes its own provider explicitly.
pub fn install_default_provider() {
    let _ = ring::default_provider().install_default();
}

/// The provider for certificate checks (signature algorithms only; key exchange irrelevant).
pub(super) fn provider() -> Arc<CryptoProvider> {
    provider_with(CompliancePolicy::Default)
}

/// Server configuration for the HBONE listener: presents `cert`, requires a client certificate
/// that chains to `roots` and whose SPIFFE identity is in `cert.identity`'s trust domain;
/// `policy` sets the key exchanges accepted.
pub fn server_config(
    cert: &WorkloadCert,
    roots: &[CertificateDer<'static>],
    policy: CompliancePolicy,
) -> Result<Arc<ServerConfig>> {
    let verifier = TrustDomainVerifier::new(root_store(roots)?, &cert.identity.trust_domain)?;
    let mut config = ServerConfig::builder_with_provider(provider_with(policy))
        .with_protocol_versions(&[&TLS13])
        .context("TLS 1.3 with the AES-GCM suites")?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .with_context(|| format!("server certificate for {}", cert.identity))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Clients do not resume (ztunnel disables it too), so tickets would be wasted bytes.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client configuration for one HBONE connection: presents `cert`, accepts a server whose chain
/// leads to `roots` and whose certificate carries one of the `expected` identities as a URI SAN.
/// The server name is ignored (pass [`dummy_server_name`]); SNI and resumption are off.
/// `policy` sets the key exchanges offered.
pub fn client_config(
    cert: &WorkloadCert,
    roots: &[CertificateDer<'static>],
    expected: &[Identity],
    policy: CompliancePolicy,
) -> Result<Arc<ClientConfig>> {
    client_config_with_provider(cert, roots, expected, provider_with(policy))
}

/// `client_config` with a given provider (the tests give it providers a peer might have).
fn client_config_with_provider(
    cert: &WorkloadCert,
    roots: &[CertificateDer<'static>],
    expected: &[Identity],
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>> {
    if expected.is_empty() {
        bail!("no expected server identity: any server would be accepted");
    }
    let verifier = ServerIdentityVerifier::new(
        root_store(roots)?,
        expected.to_vec(),
        provider.signature_verification_algorithms,
    );
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .context("TLS 1.3 with the AES-GCM suites")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .with_context(|| format!("client certificate for {}", cert.identity))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// The identity of the peer of an established connection: the first URI SAN of its leaf
/// certificate, if that is a SPIFFE identity.
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    cert_identity(leaf).ok()
}

/// The key-exchange group an established connection agreed on (e.g. `X25519MLKEM768`), for
/// logs: it shows which peers meet post-quantum.
pub fn key_exchange(conn: &CommonState) -> String {
    conn.negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
        .unwrap_or_else(|| "-".to_owned())
}

/// A fixed server name for `connect`: it is neither sent (no SNI) nor verified.
pub fn dummy_server_name() -> ServerName<'static> {
    ServerName::try_from("hbone.ambit.invalid").expect("a valid DNS name")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::{CipherSuite, ProtocolVersion};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::tls::{
        ca::{BuiltinCa, CertificateAuthority},
        testutil::{assert_refused, handshake, Handshake},
    };

    const HOUR: Duration = Duration::from_secs(3600);
    const DEFAULT: CompliancePolicy = CompliancePolicy::Default;

    fn id(td: &str, sa: &str) -> Identity {
        Identity::new(td, "default", sa)
    }

    #[tokio::test]
    async fn mutual_tls_handshake() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let client_id = id("cluster.local", "client");
        let server_id = id("cluster.local", "server");
        let client_cert = ca.issue(&client_id, HOUR).unwrap();
        let server_cert = ca.issue(&server_id, HOUR).unwrap();

        let Handshake { server, client } = handshake(
            server_config(&server_cert, &ca.roots(), DEFAULT).unwrap(),
            client_config(
                &client_cert,
                &ca.roots(),
                std::slice::from_ref(&server_id),
                DEFAULT,
            )
            .unwrap(),
        )
        .await;
        let mut server = server.expect("server handshake");
        let mut client = client.expect("client handshake");

        let client_state: &CommonState = client.get_ref().1;
        let server_state: &CommonState = server.get_ref().1;
        for conn in [client_state, server_state] {
            assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
            let suite = conn.negotiated_cipher_suite().unwrap().suite();
            assert!(
                matches!(
                    suite,
                    CipherSuite::TLS13_AES_256_GCM_SHA384 | CipherSuite::TLS13_AES_128_GCM_SHA256
                ),
                "{suite:?}"
            );
        }
        assert_eq!(peer_identity(client.get_ref().1), Some(server_id));
        assert_eq!(peer_identity(server.get_ref().1), Some(client_id));

        client.write_all(b"ping").await.unwrap();
        let mut buf = [0; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn client_refuses_server_of_another_ca() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let rogue = BuiltinCa::generate("cluster.local").unwrap();
        let server_id = id("cluster.local", "server");
        let client_cert = ca.issue(&id("cluster.local", "client"), HOUR).unwrap();
        let server_cert = rogue.issue(&server_id, HOUR).unwrap();

        let outcome = handshake(
            server_config(&server_cert, &ca.roots(), DEFAULT).unwrap(),
            client_config(&client_cert, &ca.roots(), &[server_id], DEFAULT).unwrap(),
        )
        .await;
        let err = outcome.client.expect_err("client must refuse").to_string();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(outcome.server.is_err());
    }

    #[tokio::test]
    async fn server_refuses_client_of_untrusted_ca() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let other = BuiltinCa::generate("other.local").unwrap();
        let server_id = id("cluster.local", "server");
        let server_cert = ca.issue(&server_id, HOUR).unwrap();
        let client_cert = other.issue(&id("other.local", "client"), HOUR).unwrap();

        let outcome = handshake(
            server_config(&server_cert, &ca.roots(), DEFAULT).unwrap(),
            client_config(&client_cert, &ca.roots(), &[server_id], DEFAULT).unwrap(),
        )
        .await;
        let err = outcome
            .server
            .as_ref()
            .expect_err("server must refuse")
            .to_string();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert_refused(outcome.client).await;
    }

    #[tokio::test]
    async fn server_refuses_client_of_foreign_trust_domain() {
        // Same root, but the client's identity is in another trust domain.
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let server_id = id("cluster.local", "server");
        let server_cert = ca.issue(&server_id, HOUR).unwrap();
        let client_cert = ca.issue(&id("other.local", "client"), HOUR).unwrap();

        let outcome = handshake(
            server_config(&server_cert, &ca.roots(), DEFAULT).unwrap(),
            client_config(&client_cert, &ca.roots(), &[server_id], DEFAULT).unwrap(),
        )
        .await;
        let err = outcome
            .server
            .as_ref()
            .expect_err("server must refuse")
            .to_string();
        assert!(
            err.contains(
                "client identity spiffe://other.local/ns/default/sa/client \
                 is not in trust domain cluster.local"
            ),
            "{err}"
        );
        assert_refused(outcome.client).await;
    }

    #[tokio::test]
    async fn client_refuses_wrong_server_identity() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let a = id("cluster.local", "a");
        let b = id("cluster.local", "b");
        let client_cert = ca.issue(&id("cluster.local", "client"), HOUR).unwrap();
        let server_cert = ca.issue(&b, HOUR).unwrap();

        let outcome = handshake(
            server_config(&server_cert, &ca.roots(), DEFAULT).unwrap(),
            client_config(&client_cert, &ca.roots(), std::slice::from_ref(&a), DEFAULT).unwrap(),
        )
        .await;
        let err = outcome.client.expect_err("client must refuse").to_string();
        assert!(
            err.contains(&format!("server identity {b} is not one of [{a}]")),
            "{err}"
        );
        assert!(outcome.server.is_err());
    }

    #[tokio::test]
    async fn server_refuses_chacha_only_client() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let server_id = id("cluster.local", "server");
        let server_cert = ca.issue(&server_id, HOUR).unwrap();
        let client_cert = ca.issue(&id("cluster.local", "client"), HOUR).unwrap();
        let chacha = Arc::new(CryptoProvider {
            cipher_suites: vec![ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256],
            ..ring::default_provider()
        });
        let client =
            client_config_with_provider(&client_cert, &ca.roots(), &[server_id], chacha).unwrap();

        let outcome = handshake(
            server_config(&server_cert, &ca.roots(), DEFAULT).unwrap(),
            client,
        )
        .await;
        let err = outcome
            .server
            .as_ref()
            .expect_err("server must refuse")
            .to_string();
        assert!(err.contains("NoCipherSuitesInCommon"), "{err}");
        assert!(outcome.client.is_err());
    }

    #[test]
    fn client_config_settings() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let cert = ca.issue(&id("cluster.local", "client"), HOUR).unwrap();
        assert!(client_config(&cert, &ca.roots(), &[], DEFAULT).is_err());
        assert!(client_config(&cert, &[], &[id("cluster.local", "s")], DEFAULT).is_err());
        let config =
            client_config(&cert, &ca.roots(), &[id("cluster.local", "s")], DEFAULT).unwrap();
        assert!(!config.enable_sni);
        assert_eq!(config.alpn_protocols, vec![ALPN_H2.to_vec()]);
        let suites: Vec<_> = config
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            suites,
            vec![
                CipherSuite::TLS13_AES_256_GCM_SHA384,
                CipherSuite::TLS13_AES_128_GCM_SHA256
            ]
        );
        assert!(matches!(dummy_server_name(), ServerName::DnsName(_)));
    }

    /// The named group a finished handshake agreed on.
    fn agreed_group(conn: &CommonState) -> rustls::NamedGroup {
        conn.negotiated_key_exchange_group()
            .expect("a key exchange group")
            .name()
    }

    /// Default client and `pqc` server (and the other way round) meet on X25519MLKEM768, as
    /// Ambit meets a ztunnel whose COMPLIANCE_POLICY differs from its own; two defaults stay on
    /// X25519 (one round trip, the cheaper key share).
    #[tokio::test]
    async fn key_exchange_follows_the_compliance_policy() {
        use CompliancePolicy::{Default as Classic, Pqc};
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let server_id = id("cluster.local", "server");
        let server_cert = ca.issue(&server_id, HOUR).unwrap();
        let client_cert = ca.issue(&id("cluster.local", "client"), HOUR).unwrap();
        for (client_policy, server_policy, expected) in [
            (Classic, Classic, rustls::NamedGroup::X25519),
            (Classic, Pqc, rustls::NamedGroup::X25519MLKEM768),
            (Pqc, Classic, rustls::NamedGroup::X25519MLKEM768),
            (Pqc, Pqc, rustls::NamedGroup::X25519MLKEM768),
        ] {
            let Handshake { server, client } = handshake(
                server_config(&server_cert, &ca.roots(), server_policy).unwrap(),
                client_config(
                    &client_cert,
                    &ca.roots(),
                    std::slice::from_ref(&server_id),
                    client_policy,
                )
                .unwrap(),
            )
            .await;
            let (server, client) = (server.unwrap(), client.unwrap());
            let what = format!("client {client_policy}, server {server_policy}");
            assert_eq!(agreed_group(client.get_ref().1), expected, "{what}");
            assert_eq!(agreed_group(server.get_ref().1), expected, "{what}");
        }
    }

    /// A `pqc` server refuses a client that offers only classical groups (a ring-only peer,
    /// as Ambit was before), naming why.
    #[tokio::test]
    async fn pqc_server_refuses_classical_only_client() {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let server_id = id("cluster.local", "server");
        let server_cert = ca.issue(&server_id, HOUR).unwrap();
        let client_cert = ca.issue(&id("cluster.local", "client"), HOUR).unwrap();
        let classical = Arc::new(CryptoProvider {
            kx_groups: ring::default_provider().kx_groups,
            ..(*provider_with(DEFAULT)).clone()
        });
        let client =
            client_config_with_provider(&client_cert, &ca.roots(), &[server_id], classical)
                .unwrap();
        let outcome = handshake(
            server_config(&server_cert, &ca.roots(), CompliancePolicy::Pqc).unwrap(),
            client,
        )
        .await;
        let err = outcome.server.expect_err("server must refuse").to_string();
        assert!(err.contains("NoKxGroupsInCommon"), "{err}");
        assert!(outcome.client.is_err());
    }

    #[test]
    fn compliance_policy_spellings() {
        assert_eq!("".parse(), Ok(CompliancePolicy::Default));
        assert_eq!("pqc".parse(), Ok(CompliancePolicy::Pqc));
        let err = "PQC".parse::<CompliancePolicy>().unwrap_err();
        assert!(err.contains("unknown compliance policy \"PQC\""), "{err}");
        assert!("fips-140-2"
            .parse::<CompliancePolicy>()
            .unwrap_err()
            .contains("not supported"));
    }
}
