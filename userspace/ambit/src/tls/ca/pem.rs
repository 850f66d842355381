//! Reading the PEM files of a plug-in CA, with errors that name the file and the problem.

use std::{fs, path::Path};

use anyhow::{anyhow, bail, Context, Result};
use rcgen::KeyPair;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Reads every certificate in the PEM file at `path`; at least one is required and each
/// must be valid X.509.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    parse_certs(&read(path)?, &path.display().to_string())
}

/// Every certificate in PEM `data` (named `name` in errors); at least one is required and each
/// must be valid X.509. Separate from the file read so that hostile bytes can be fuzzed.
pub(crate) fn parse_certs(data: &[u8], name: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{name}: malformed PEM: {e}"))?;
    if certs.is_empty() {
        bail!("{name}: no PEM CERTIFICATE block found");
    }
    for (i, cert) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(cert)
            .map_err(|e| anyhow!("{name}: certificate #{} is not valid X.509: {e}", i + 1))?;
    }
    Ok(certs)
}

/// Reads the private key in the PEM file at `path`: PKCS#8 (`PRIVATE KEY`), PKCS#1
/// (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`, P-256 or P-384).
pub(super) fn read_key(path: &Path) -> Result<KeyPair> {
    parse_key(&read(path)?, &path.display().to_string())
}

/// The private key in PEM `data` (named `name` in errors), in any of `read_key`'s encodings.
pub(crate) fn parse_key(data: &[u8], name: &str) -> Result<KeyPair> {
    let key = PrivateKeyDer::from_pem_slice(data).map_err(|e| {
        anyhow!(
            "{name}: no usable PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY): {e}"
        )
    })?;
    key_pair(&key).map_err(|e| anyhow!("{name}: unsupported or malformed private key: {e}"))
}

/// `cert` as a PEM `CERTIFICATE` block (what istiod's CA answers with).
pub(crate) fn to_pem(cert: &CertificateDer<'_>) -> String {
    ::pem::encode(&::pem::Pem::new("CERTIFICATE", cert.to_vec()))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Turns a private key of any of the three encodings into a signing key.
///
/// `rcgen` on `ring` only takes PKCS#8, so PKCS#1 and SEC1 keys are wrapped into PKCS#8 first.
fn key_pair(key: &PrivateKeyDer<'_>) -> Result<KeyPair, rcgen::Error> {
    match key {
        PrivateKeyDer::Pkcs8(pkcs8) => KeyPair::try_from(pkcs8),
        PrivateKeyDer::Pkcs1(rsa) => from_pkcs8(pkcs8_wrap(&RSA_ALGORITHM, rsa.secret_pkcs1_der())),
        // SEC1 may omit the curve: try each, ring checks the key against the one we claim.
        PrivateKeyDer::Sec1(ec) => [&EC_P256_ALGORITHM[..], &EC_P384_ALGORITHM[..]]
            .into_iter()
            .map(|algorithm| from_pkcs8(pkcs8_wrap(algorithm, ec.secret_sec1_der())))
            .find(Result::is_ok)
            .unwrap_or(Err(rcgen::Error::CouldNotParseKeyPair)),
        _ => Err(rcgen::Error::CouldNotParseKeyPair),
    }
}

fn from_pkcs8(der: Vec<u8>) -> Result<KeyPair, rcgen::Error> {
    KeyPair::try_from(&PrivatePkcs8KeyDer::from(der))
}

/// AlgorithmIdentifier contents for rsaEncryption (1.2.840.113549.1.1.1) with NULL parameters.
const RSA_ALGORITHM: [u8; 13] = [
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// AlgorithmIdentifier contents for id-ecPublicKey (1.2.840.10045.2.1) on prime256v1.
const EC_P256_ALGORITHM: [u8; 19] = [
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d,
    0x03, 0x01, 0x07,
];
/// AlgorithmIdentifier contents for id-ecPublicKey (1.2.840.10045.2.1) on secp384r1.
const EC_P384_ALGORITHM: [u8; 16] = [
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22,
];

/// PKCS#8 `PrivateKeyInfo { version 0, algorithm, privateKey OCTET STRING }` around `key`.
fn pkcs8_wrap(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend(der(0x30, algorithm));
    body.extend(der(0x04, key));
    der(0x30, &body)
}

/// One DER element: tag, definite length, contents.
fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
    let len = contents.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend(&bytes[skip..]);
    }
    out.extend(contents);
    out
}

#[cfg(test)]
mod tests {
    use rcgen::{PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256};

    use super::*;
    use crate::tls::testutil::TempDir;

    #[test]
    fn der_lengths() {
        assert_eq!(der(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der(0x04, &[0; 200]);
        assert_eq!(&long[..3], &[0x04, 0x81, 200]);
        let longer = der(0x04, &[0; 1000]);
        assert_eq!(&longer[..4], &[0x04, 0x82, 0x03, 0xe8]);
    }

    /// The SEC1 `ECPrivateKey` inside a PKCS#8 key from rcgen: the last element's contents.
    fn sec1_of(pkcs8: &[u8]) -> Vec<u8> {
        let (_, info) = x509_parser::der_parser::parse_der(pkcs8).unwrap();
        let items = info.as_sequence().unwrap();
        items.last().unwrap().as_slice().unwrap().to_vec()
    }

    #[test]
    fn reads_sec1_ec_keys() {
        for alg in [&PKCS_ECDSA_P256_SHA256, &PKCS_ECDSA_P384_SHA384] {
            let original = KeyPair::generate_for(alg).unwrap();
            let sec1 = sec1_of(&original.serialize_der());
            let key = key_pair(&PrivateKeyDer::Sec1(sec1.into())).unwrap();
            assert_eq!(key.public_key_raw(), original.public_key_raw());
            assert_eq!(key.algorithm(), alg);
        }
    }

    #[test]
    fn reads_pkcs1_rsa_key_from_pem_file() {
        let dir = TempDir::new();
        let path = dir.path().join("rsa.pem");
        fs::write(&path, include_str!("testdata/rsa-ca-key.pem")).unwrap();
        let key = read_key(&path).unwrap();
        assert_eq!(key.algorithm(), &PKCS_RSA_SHA256);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = TempDir::new();
        let missing = dir.path().join("missing.pem");
        let err = format!("{:#}", read_certs(&missing).unwrap_err());
        assert!(err.contains(&missing.display().to_string()), "{err}");

        let garbage = dir.path().join("garbage.pem");
        fs::write(&garbage, "not a pem file").unwrap();
        for err in [
            format!("{:#}", read_certs(&garbage).unwrap_err()),
            format!("{:#}", read_key(&garbage).unwrap_err()),
        ] {
            assert!(err.contains(&garbage.display().to_string()), "{err}");
        }

        let bad_der = dir.path().join("bad-der.pem");
        fs::write(
            &bad_der,
            "-----BEGIN CERTIFICATE-----\nAAECAwQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = format!("{:#}", read_certs(&bad_der).unwrap_err());
        assert!(
            err.contains("bad-der.pem: certificate #1 is not valid X.509"),
            "{err}"
        );
    }
}
