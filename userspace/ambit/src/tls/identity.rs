//! SPIFFE workload identities, in the one shape Istio uses.

use std::{fmt, str::FromStr};

use anyhow::{bail, Result};

pub use ambit_settings::DEFAULT_TRUST_DOMAIN;

const SCHEME: &str = "spiffe://";
const SHAPE: &str = "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>";

/// A workload identity: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Kubernetes namespace of the workload.
    pub namespace: String,
    /// Kubernetes service account of the workload.
    pub service_account: String,
}

impl Identity {
    /// Builds an identity from its three parts (taken as given, not validated).
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// Parses exactly `spiffe://<td>/ns/<ns>/sa/<sa>` with no part empty; anything else is an
    /// error that shows the input and the expected shape.
    pub fn parse(uri: &str) -> Result<Identity> {
        let Some(path) = uri.strip_prefix(SCHEME) else {
            bail!("{uri:?} is not a SPIFFE identity: expected {SHAPE}");
        };
        match path.split('/').collect::<Vec<_>>().as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => bail!("{uri:?} is not a SPIFFE workload identity: expected {SHAPE}"),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Identity::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let id = Identity::new(DEFAULT_TRUST_DOMAIN, "default", "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(Identity::parse(&id.to_string()).unwrap(), id);
        assert_eq!(
            "spiffe://td/ns/a/sa/b".parse::<Identity>().unwrap(),
            Identity::new("td", "a", "b")
        );
    }

    #[test]
    fn parse_rejects_other_shapes() {
        for bad in [
            "spiffe://td/ns/x",
            "spiffe://td/ns/x/sa",
            "spiffe://td/ns/x/sa/",
            "spiffe://td/ns//sa/y",
            "spiffe:///ns/x/sa/y",
            "spiffe://td/ns/x/sa/y/extra",
            "spiffe://td/namespace/x/sa/y",
            "spiffe://td/sa/y/ns/x",
            "https://td/ns/x/sa/y",
            "td/ns/x/sa/y",
            "",
        ] {
            let err = Identity::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
            assert!(err.contains(SHAPE), "{err}");
        }
    }

    #[test]
    fn orders_by_trust_domain_then_namespace_then_account() {
        let mut ids = vec![
            Identity::new("b", "a", "a"),
            Identity::new("a", "b", "a"),
            Identity::new("a", "a", "b"),
        ];
        ids.sort();
        assert_eq!(
            ids,
            vec![
                Identity::new("a", "a", "b"),
                Identity::new("a", "b", "a"),
                Identity::new("b", "a", "a"),
            ]
        );
    }
}
