//! All policies, indexed by what they cover, and the allow/deny decision for a connection.

use std::{collections::HashMap, fmt};

use anyhow::{bail, Context as _, Result};
use tracing::debug;

use super::{
    eval::ConnectionInfo,
    model::{Action, Authorization, RbacMatch, Scope, StringMatch},
};

/// The deny reason when Allow policies cover the destination but none matched.
pub const NO_ALLOW_MATCHED: &str = "no allow policy matched";

/// The destination workload, as far as policy selection needs it.
#[derive(Debug, Clone, Copy)]
pub struct DestinationWorkload<'a> {
    /// The workload's namespace (selects `Namespace`-scoped policies of that namespace).
    pub namespace: &'a str,
    /// The workload's name (for logs).
    pub name: &'a str,
    /// `<namespace>/<name>` of the `WorkloadSelector` policies that select it (the workload's
    /// `authorizationPolicies`).
    pub selected_policies: &'a [String],
}

/// The outcome of evaluating the policies that cover a connection's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The connection may proceed.
    Allow,
    /// The connection is refused.
    Deny {
        /// `<namespace>/<name>` of the Deny policy that matched, or [`NO_ALLOW_MATCHED`].
        policy: String,
    },
}

impl Decision {
    /// Whether the connection may proceed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow => f.write_str("allow"),
            Decision::Deny { policy } => write!(f, "deny ({policy})"),
        }
    }
}

/// A validated set of policies, indexed for evaluation at the destination.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// In the order given; evaluation reports the first matching Deny policy in this order.
    policies: Vec<Authorization>,
    /// `<namespace>/<name>` → index.
    by_key: HashMap<String, usize>,
    /// Namespace → indexes of its `Namespace`-scoped policies.
    by_namespace: HashMap<String, Vec<usize>>,
    /// Indexes of `Global` policies.
    global: Vec<usize>,
}

impl PolicySet {
    /// Validates and indexes the policies. Errors name the policy (`<namespace>/<name>`) and
    /// the offending field: an empty name or namespace, two policies with the same key, a
    /// principal written with `spiffe://` (it could never match).
    pub fn new(policies: Vec<Authorization>) -> Result<PolicySet> {
        let mut set = PolicySet::default();
        for (i, policy) in policies.into_iter().enumerate() {
            validate(&policy)
                .with_context(|| format!("authorization policy {:?}", policy.key()))?;
            let key = policy.key();
            if set.by_key.insert(key.clone(), i).is_some() {
                bail!("authorization policy {key:?} is defined twice");
            }
            match policy.scope {
                Scope::Global => set.global.push(i),
                Scope::Namespace => set
                    .by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .push(i),
                // Attached by the workloads that name them.
                Scope::WorkloadSelector => {}
            }
            set.policies.push(policy);
        }
        Ok(set)
    }

    /// Parses and validates the `policies:` entries of a config file (kept as YAML values);
    /// errors name the entry (`policies[<i>]`) and, when it has one, the policy.
    pub fn from_yaml_values(values: &[serde_yaml::Value]) -> Result<PolicySet> {
        let policies = values
            .iter()
            .enumerate()
            .map(|(i, value)| {
                serde_yaml::from_value::<Authorization>(value.clone())
                    .with_context(|| entry_label(i, value))
            })
            .collect::<Result<Vec<_>>>()?;
        PolicySet::new(policies)
    }

    /// The number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there are no policies (everything is allowed).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policy with key `<namespace>/<name>`.
    pub fn get(&self, key: &str) -> Option<&Authorization> {
        self.by_key.get(key).map(|&i| &self.policies[i])
    }

    /// All policies, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = &Authorization> {
        self.policies.iter()
    }

    /// The policies that cover `dst`: Global ones, `Namespace` ones of its namespace, and the
    /// ones it names (unknown names are skipped), each once, in the order given.
    pub fn applicable(&self, dst: &DestinationWorkload) -> Vec<&Authorization> {
        let mut indexes: Vec<usize> = self.global.clone();
        indexes.extend(self.by_namespace.get(dst.namespace).into_iter().flatten());
        for key in dst.selected_policies {
            match self.by_key.get(key.as_str()) {
                Some(&i) => indexes.push(i),
                None => debug!(
                    dst.namespace,
                    dst.name,
                    policy = key.as_str(),
                    "skipping unknown authorization policy"
                ),
            }
        }
        indexes.sort_unstable();
        indexes.dedup();
        indexes.into_iter().map(|i| &self.policies[i]).collect()
    }

    /// Decides a connection to `dst`: a matching Deny policy denies; otherwise, with no Allow
    /// policy covering `dst` the connection is allowed, else it is allowed only if some Allow
    /// policy matches. Dry-run policies take no part; what they would have changed is logged
    /// at debug level.
    pub fn evaluate(&self, dst: &DestinationWorkload, conn: &ConnectionInfo) -> Decision {
        let applicable = self.applicable(dst);
        let enforced = decide(applicable.iter().filter(|p| !p.dry_run).copied(), conn);
        if applicable.iter().any(|p| p.dry_run) {
            let dry_run = decide(applicable.iter().copied(), conn);
            let matched: Vec<String> = applicable
                .iter()
                .filter(|p| p.dry_run && p.matches(conn))
                .map(|p| p.key())
                .collect();
            debug!(
                dst.namespace,
                dst.name,
                src = %conn.src_ip,
                identity = conn.src_identity.as_ref().map(|i| i.to_string()),
                decision = %enforced,
                with_dry_run = %dry_run,
                dry_run_matched = ?matched,
                "dry-run authorization policies evaluated (not enforced)"
            );
        }
        enforced
    }
}

/// `policies[<i>]`, with `(<namespace>/<name>)` when the entry has both.
fn entry_label(i: usize, value: &serde_yaml::Value) -> String {
    let field = |name: &str| value.get(name).and_then(serde_yaml::Value::as_str);
    match (field("namespace"), field("name")) {
        (Some(namespace), Some(name)) => format!("policies[{i}] ({namespace}/{name})"),
        _ => format!("policies[{i}]"),
    }
}

/// Istio's decision over the given policies: Deny first, then Allow (if any exist).
fn decide<'a>(
    policies: impl Iterator<Item = &'a Authorization> + Clone,
    conn: &ConnectionInfo,
) -> Decision {
    let mut denies = policies.clone().filter(|p| p.action == Action::Deny);
    if let Some(deny) = denies.find(|p| p.matches(conn)) {
        return Decision::Deny { policy: deny.key() };
    }
    let mut allows = policies.filter(|p| p.action == Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision::Allow;
    }
    if allows.any(|p| p.matches(conn)) {
        return Decision::Allow;
    }
    Decision::Deny {
        policy: NO_ALLOW_MATCHED.to_string(),
    }
}

/// Checks what parsing cannot: names present, principals without `spiffe://`.
fn validate(policy: &Authorization) -> Result<()> {
    if policy.name.is_empty() {
        bail!("name must not be empty");
    }
    if policy.namespace.is_empty() {
        bail!("namespace must not be empty");
    }
    for (r, rule) in policy.rules.iter().enumerate() {
        for (c, clause) in rule.iter().enumerate() {
            for (m, matcher) in clause.iter().enumerate() {
                validate_match(matcher).with_context(|| format!("rules[{r}][{c}][{m}]"))?;
            }
        }
    }
    Ok(())
}

fn validate_match(m: &RbacMatch) -> Result<()> {
    for (field, list) in [
        ("principals", &m.principals),
        ("notPrincipals", &m.not_principals),
    ] {
        for (i, principal) in list.iter().enumerate() {
            let written = match principal {
                StringMatch::Exact(s) | StringMatch::Prefix(s) => s,
                StringMatch::Suffix(_) | StringMatch::Presence() => continue,
            };
            if written.starts_with("spiffe://") {
                bail!(
                    "{field}[{i}]: {written:?}: principals are written without \"spiffe://\" \
                     (e.g. cluster.local/ns/default/sa/sleep); as written it could never match"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{policy::Cidr, tls::Identity};

    fn policy(
        namespace: &str,
        name: &str,
        scope: Scope,
        action: Action,
        m: RbacMatch,
    ) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: namespace.into(),
            scope,
            action,
            rules: vec![vec![vec![m]]],
            dry_run: false,
        }
    }

    fn ports(list: &[u16]) -> RbacMatch {
        RbacMatch {
            destination_ports: list.to_vec(),
            ..Default::default()
        }
    }

    fn namespaces(list: &[&str]) -> RbacMatch {
        RbacMatch {
            namespaces: list
                .iter()
                .map(|s| StringMatch::Exact(s.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn set(policies: Vec<Authorization>) -> PolicySet {
        PolicySet::new(policies).unwrap()
    }

    /// mTLS from cluster.local/ns/client/sa/sleep at 10.0.0.1 to 10.0.1.1:<port>.
    fn conn(port: u16) -> ConnectionInfo {
        ConnectionInfo {
            src_ip: "10.0.0.1".parse().unwrap(),
            src_identity: Some(Identity::new("cluster.local", "client", "sleep")),
            dst_ip: "10.0.1.1".parse().unwrap(),
            dst_port: port,
        }
    }

    fn plaintext(port: u16) -> ConnectionInfo {
        ConnectionInfo {
            src_identity: None,
            ..conn(port)
        }
    }

    const NONE: &[String] = &[];

    /// A workload `app` in `namespace`, selected by no policy.
    fn dst(namespace: &str) -> DestinationWorkload<'_> {
        DestinationWorkload {
            namespace,
            name: "app",
            selected_policies: NONE,
        }
    }

    fn deny(policy: &str) -> Decision {
        Decision::Deny {
            policy: policy.into(),
        }
    }

    fn not_allowed() -> Decision {
        deny(NO_ALLOW_MATCHED)
    }

    /// `policies:` of the repository's copy of ztunnel's examples/localhost.yaml.
    fn ztunnel_example() -> PolicySet {
        #[derive(serde::Deserialize)]
        struct File {
            policies: Vec<serde_yaml::Value>,
        }
        let text = include_str!("../../testdata/ztunnel-localhost.yaml");
        let file: File = serde_yaml::from_str(text).unwrap();
        PolicySet::from_yaml_values(&file.policies).unwrap()
    }

    #[test]
    fn ztunnels_example_denies_port_9999_only() {
        let set = ztunnel_example();
        assert_eq!(set.len(), 1);
        assert!(set.get("default/deny-9999").is_some());
        let default = dst("default");
        assert_eq!(set.evaluate(&default, &conn(80)), Decision::Allow);
        assert_eq!(set.evaluate(&default, &plaintext(80)), Decision::Allow);
        assert_eq!(set.evaluate(&default, &conn(9999)), not_allowed());
        assert_eq!(set.evaluate(&default, &plaintext(9999)), not_allowed());
        // A Namespace policy of "default" does not cover other namespaces.
        assert_eq!(set.evaluate(&dst("other"), &conn(9999)), Decision::Allow);
    }

    #[test]
    fn no_policies_allow_everything() {
        let set = PolicySet::default();
        assert!(set.is_empty());
        assert_eq!(set.len(), 0);
        assert_eq!(set.evaluate(&dst("ns"), &plaintext(1)), Decision::Allow);
        assert!(set.evaluate(&dst("ns"), &plaintext(1)).is_allowed());
    }

    #[test]
    fn deny_overrides_allow() {
        let set = set(vec![
            policy(
                "ns",
                "allow-80",
                Scope::Namespace,
                Action::Allow,
                ports(&[80]),
            ),
            policy(
                "ns",
                "deny-80",
                Scope::Namespace,
                Action::Deny,
                ports(&[80]),
            ),
        ]);
        let decision = set.evaluate(&dst("ns"), &conn(80));
        assert_eq!(decision, deny("ns/deny-80"));
        assert!(!decision.is_allowed());
        assert_eq!(decision.to_string(), "deny (ns/deny-80)");
    }

    #[test]
    fn the_first_matching_deny_is_reported() {
        let set = set(vec![
            policy("ns", "b", Scope::Namespace, Action::Deny, ports(&[80])),
            policy("ns", "a", Scope::Namespace, Action::Deny, ports(&[80, 81])),
        ]);
        assert_eq!(set.evaluate(&dst("ns"), &conn(80)), deny("ns/b"));
        assert_eq!(set.evaluate(&dst("ns"), &conn(81)), deny("ns/a"));
        assert_eq!(set.evaluate(&dst("ns"), &conn(82)), Decision::Allow);
    }

    #[test]
    fn without_allow_policies_whatever_is_not_denied_is_allowed() {
        let set = set(vec![policy(
            "ns",
            "deny-80",
            Scope::Namespace,
            Action::Deny,
            ports(&[80]),
        )]);
        assert_eq!(set.evaluate(&dst("ns"), &conn(80)), deny("ns/deny-80"));
        assert_eq!(set.evaluate(&dst("ns"), &conn(81)), Decision::Allow);
    }

    #[test]
    fn with_allow_policies_only_what_one_matches_is_allowed() {
        let set = set(vec![
            policy(
                "ns",
                "allow-80",
                Scope::Namespace,
                Action::Allow,
                ports(&[80]),
            ),
            policy(
                "ns",
                "allow-81",
                Scope::Namespace,
                Action::Allow,
                ports(&[81]),
            ),
        ]);
        assert_eq!(set.evaluate(&dst("ns"), &conn(80)), Decision::Allow);
        assert_eq!(set.evaluate(&dst("ns"), &conn(81)), Decision::Allow);
        let decision = set.evaluate(&dst("ns"), &conn(82));
        assert_eq!(decision, not_allowed());
        assert_eq!(decision.to_string(), "deny (no allow policy matched)");
    }

    #[test]
    fn an_allow_policy_without_rules_allows_nothing() {
        let mut allow_nothing = policy(
            "ns",
            "allow-nothing",
            Scope::Namespace,
            Action::Allow,
            ports(&[]),
        );
        allow_nothing.rules.clear();
        let set = set(vec![allow_nothing]);
        assert_eq!(set.evaluate(&dst("ns"), &conn(80)), not_allowed());
        assert_eq!(set.evaluate(&dst("other"), &conn(80)), Decision::Allow);
    }

    #[test]
    fn an_empty_rule_matches_everything() {
        let mut deny_all = policy("ns", "deny-all", Scope::Namespace, Action::Deny, ports(&[]));
        deny_all.rules = vec![vec![]];
        let set = set(vec![deny_all]);
        assert_eq!(
            set.evaluate(&dst("ns"), &plaintext(80)),
            deny("ns/deny-all")
        );
        assert_eq!(set.evaluate(&dst("ns"), &conn(1)), deny("ns/deny-all"));
    }

    #[test]
    fn global_policies_cover_every_namespace() {
        let set = set(vec![policy(
            "istio-system",
            "deny-9999",
            Scope::Global,
            Action::Deny,
            ports(&[9999]),
        )]);
        for ns in ["istio-system", "default", "other"] {
            assert_eq!(
                set.evaluate(&dst(ns), &conn(9999)),
                deny("istio-system/deny-9999")
            );
            assert_eq!(set.evaluate(&dst(ns), &conn(80)), Decision::Allow);
        }
    }

    #[test]
    fn namespace_policies_cover_only_their_namespace() {
        let set = set(vec![
            policy(
                "a",
                "allow-80",
                Scope::Namespace,
                Action::Allow,
                ports(&[80]),
            ),
            policy("b", "deny-80", Scope::Namespace, Action::Deny, ports(&[80])),
        ]);
        assert_eq!(set.evaluate(&dst("a"), &conn(80)), Decision::Allow);
        assert_eq!(set.evaluate(&dst("a"), &conn(81)), not_allowed());
        assert_eq!(set.evaluate(&dst("b"), &conn(80)), deny("b/deny-80"));
        assert_eq!(set.evaluate(&dst("b"), &conn(81)), Decision::Allow);
        assert_eq!(set.evaluate(&dst("c"), &conn(81)), Decision::Allow);
    }

    #[test]
    fn workload_selector_policies_cover_only_workloads_that_name_them() {
        let set = set(vec![policy(
            "ns",
            "only-80",
            Scope::WorkloadSelector,
            Action::Allow,
            ports(&[80]),
        )]);
        let selected = vec!["ns/only-80".to_string()];
        let chosen = DestinationWorkload {
            namespace: "ns",
            name: "chosen",
            selected_policies: &selected,
        };
        assert_eq!(set.evaluate(&chosen, &conn(80)), Decision::Allow);
        assert_eq!(set.evaluate(&chosen, &conn(81)), not_allowed());
        // Neither its namespace nor any other workload is covered by it.
        assert_eq!(set.evaluate(&dst("ns"), &conn(81)), Decision::Allow);
        assert_eq!(set.evaluate(&dst("other"), &conn(81)), Decision::Allow);
    }

    #[test]
    fn unknown_selected_policies_are_skipped() {
        let set = set(vec![policy(
            "ns",
            "deny-80",
            Scope::WorkloadSelector,
            Action::Deny,
            ports(&[80]),
        )]);
        let selected = vec!["ns/missing".to_string(), "ns/deny-80".to_string()];
        let wl = DestinationWorkload {
            namespace: "ns",
            name: "app",
            selected_policies: &selected,
        };
        assert_eq!(set.applicable(&wl).len(), 1);
        assert_eq!(set.evaluate(&wl, &conn(80)), deny("ns/deny-80"));
        assert_eq!(set.evaluate(&wl, &conn(81)), Decision::Allow);
    }

    #[test]
    fn scopes_combine_and_each_policy_counts_once() {
        let set = set(vec![
            policy(
                "root",
                "global-deny",
                Scope::Global,
                Action::Deny,
                ports(&[1]),
            ),
            policy(
                "ns",
                "ns-allow",
                Scope::Namespace,
                Action::Allow,
                ports(&[1, 2]),
            ),
            policy(
                "ns",
                "wl-allow",
                Scope::WorkloadSelector,
                Action::Allow,
                ports(&[3]),
            ),
        ]);
        // A workload may name any policy; a policy named twice (or already selected by
        // namespace) is still one policy.
        let selected = vec![
            "ns/wl-allow".to_string(),
            "ns/wl-allow".to_string(),
            "ns/ns-allow".to_string(),
        ];
        let wl = DestinationWorkload {
            namespace: "ns",
            name: "app",
            selected_policies: &selected,
        };
        let keys: Vec<String> = set.applicable(&wl).iter().map(|p| p.key()).collect();
        assert_eq!(keys, ["root/global-deny", "ns/ns-allow", "ns/wl-allow"]);
        assert_eq!(set.evaluate(&wl, &conn(1)), deny("root/global-deny"));
        assert_eq!(set.evaluate(&wl, &conn(2)), Decision::Allow);
        assert_eq!(set.evaluate(&wl, &conn(3)), Decision::Allow);
        assert_eq!(set.evaluate(&wl, &conn(4)), not_allowed());
        // The namespace's other workloads only get the namespace's and global policies.
        assert_eq!(set.evaluate(&dst("ns"), &conn(3)), not_allowed());
    }

    #[test]
    fn dry_run_policies_never_decide() {
        let mut dry_deny = policy(
            "ns",
            "dry-deny",
            Scope::Namespace,
            Action::Deny,
            ports(&[80]),
        );
        dry_deny.dry_run = true;
        let mut dry_allow = policy(
            "ns",
            "dry-allow",
            Scope::Namespace,
            Action::Allow,
            ports(&[81]),
        );
        dry_allow.dry_run = true;
        let set = set(vec![dry_deny, dry_allow]);
        // Matching a dry-run Deny does not deny; a dry-run Allow does not make the workload
        // "have Allow policies", so unmatched traffic is still allowed.
        for port in [80, 81, 82] {
            assert_eq!(
                set.evaluate(&dst("ns"), &conn(port)),
                Decision::Allow,
                "{port}"
            );
        }
        assert_eq!(set.applicable(&dst("ns")).len(), 2);
        // What they would have decided.
        let all: Vec<_> = set.applicable(&dst("ns"));
        assert_eq!(decide(all.iter().copied(), &conn(80)), deny("ns/dry-deny"));
        assert_eq!(decide(all.iter().copied(), &conn(81)), Decision::Allow);
        assert_eq!(decide(all.iter().copied(), &conn(82)), not_allowed());
    }

    #[test]
    fn dry_run_policies_do_not_change_enforced_ones() {
        let mut dry_allow = policy(
            "ns",
            "dry-allow",
            Scope::Namespace,
            Action::Allow,
            ports(&[81]),
        );
        dry_allow.dry_run = true;
        let set = set(vec![
            policy(
                "ns",
                "allow-80",
                Scope::Namespace,
                Action::Allow,
                ports(&[80]),
            ),
            dry_allow,
            policy(
                "ns",
                "deny-82",
                Scope::Namespace,
                Action::Deny,
                ports(&[82]),
            ),
        ]);
        assert_eq!(set.evaluate(&dst("ns"), &conn(80)), Decision::Allow);
        // The dry-run Allow would allow 81, but only the enforced policies count.
        assert_eq!(set.evaluate(&dst("ns"), &conn(81)), not_allowed());
        assert_eq!(set.evaluate(&dst("ns"), &conn(82)), deny("ns/deny-82"));
    }

    #[test]
    fn identity_based_policies_and_plaintext() {
        let set = set(vec![policy(
            "ns",
            "from-client",
            Scope::Namespace,
            Action::Allow,
            namespaces(&["client"]),
        )]);
        assert_eq!(set.evaluate(&dst("ns"), &conn(80)), Decision::Allow);
        assert_eq!(set.evaluate(&dst("ns"), &plaintext(80)), not_allowed());

        // A Deny on notNamespaces denies plaintext too (it has no namespace at all).
        let set = PolicySet::new(vec![policy(
            "ns",
            "only-client",
            Scope::Namespace,
            Action::Deny,
            RbacMatch {
                not_namespaces: vec![StringMatch::Exact("client".into())],
                ..Default::default()
            },
        )])
        .unwrap();
        assert_eq!(set.evaluate(&dst("ns"), &conn(80)), Decision::Allow);
        assert_eq!(
            set.evaluate(&dst("ns"), &plaintext(80)),
            deny("ns/only-client")
        );
    }

    #[test]
    fn source_ranges_in_a_yaml_policy() {
        let values: Vec<serde_yaml::Value> = serde_yaml::from_str(
            "
- name: from-pods
  namespace: ns
  scope: Namespace
  action: Allow
  rules:
  - - - sourceIps: [10.0.0.0/24, 'fd00::/64']
        principals: [!Exact cluster.local/ns/client/sa/sleep]
",
        )
        .unwrap();
        let set = PolicySet::from_yaml_values(&values).unwrap();
        assert_eq!(set.evaluate(&dst("ns"), &conn(80)), Decision::Allow);
        let v6 = ConnectionInfo {
            src_ip: "fd00::7".parse().unwrap(),
            dst_ip: "fd00:1::1".parse().unwrap(),
            ..conn(80)
        };
        assert_eq!(set.evaluate(&dst("ns"), &v6), Decision::Allow);
        let elsewhere = ConnectionInfo {
            src_ip: "10.0.1.7".parse().unwrap(),
            ..conn(80)
        };
        assert_eq!(set.evaluate(&dst("ns"), &elsewhere), not_allowed());
        assert_eq!(set.evaluate(&dst("ns"), &plaintext(80)), not_allowed());
        assert_eq!(
            set.get("ns/from-pods").unwrap().rules[0][0][0].source_ips[1],
            "fd00::/64".parse::<Cidr>().unwrap()
        );
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let err = PolicySet::new(vec![
            policy("ns", "p", Scope::Namespace, Action::Allow, ports(&[80])),
            policy("ns", "p", Scope::Global, Action::Deny, ports(&[81])),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"ns/p\"") && err.contains("twice"), "{err}");
        // Same name in another namespace is another policy.
        PolicySet::new(vec![
            policy("a", "p", Scope::Namespace, Action::Allow, ports(&[80])),
            policy("b", "p", Scope::Namespace, Action::Allow, ports(&[80])),
        ])
        .unwrap();
    }

    #[test]
    fn empty_names_are_rejected() {
        let err = format!(
            "{:#}",
            PolicySet::new(vec![policy(
                "ns",
                "",
                Scope::Namespace,
                Action::Allow,
                ports(&[80])
            )])
            .unwrap_err()
        );
        assert!(
            err.contains("\"ns/\"") && err.contains("name must not be empty"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            PolicySet::new(vec![policy(
                "",
                "p",
                Scope::Global,
                Action::Allow,
                ports(&[80])
            )])
            .unwrap_err()
        );
        assert!(err.contains("namespace must not be empty"), "{err}");
    }

    #[test]
    fn principals_with_the_spiffe_scheme_are_rejected() {
        let with_scheme = |m: RbacMatch| {
            let mut p = policy("ns", "p", Scope::Namespace, Action::Deny, ports(&[80]));
            p.rules = vec![vec![vec![ports(&[1])], vec![ports(&[2]), m]]];
            format!("{:#}", PolicySet::new(vec![p]).unwrap_err())
        };
        let err = with_scheme(RbacMatch {
            principals: vec![StringMatch::Exact(
                "spiffe://cluster.local/ns/a/sa/b".into(),
            )],
            ..Default::default()
        });
        assert!(err.contains("\"ns/p\""), "{err}");
        assert!(err.contains("rules[0][1][1]"), "{err}");
        assert!(err.contains("principals[0]"), "{err}");
        assert!(
            err.contains("without \\\"spiffe://\\\"") || err.contains("without \"spiffe://\""),
            "{err}"
        );
        let err = with_scheme(RbacMatch {
            not_principals: vec![
                StringMatch::Presence(),
                StringMatch::Prefix("spiffe://cluster.local/".into()),
            ],
            ..Default::default()
        });
        assert!(err.contains("notPrincipals[1]"), "{err}");
        // Written without the scheme, the same principals are fine.
        PolicySet::new(vec![policy(
            "ns",
            "p",
            Scope::Namespace,
            Action::Deny,
            RbacMatch {
                principals: vec![StringMatch::Exact("cluster.local/ns/a/sa/b".into())],
                not_principals: vec![StringMatch::Suffix("/sa/b".into())],
                ..Default::default()
            },
        )])
        .unwrap();
    }

    #[test]
    fn yaml_errors_name_the_entry_and_field() {
        let values: Vec<serde_yaml::Value> = serde_yaml::from_str(
            "
- {name: ok, namespace: ns, scope: Global, action: Allow, rules: []}
- name: typo
  namespace: ns
  scope: Namespace
  action: Deny
  rules:
  - - - sourceIp: [10.0.0.0/8]
",
        )
        .unwrap();
        let err = format!("{:#}", PolicySet::from_yaml_values(&values).unwrap_err());
        assert!(err.starts_with("policies[1] (ns/typo)"), "{err}");
        assert!(err.contains("unknown field `sourceIp`"), "{err}");
        assert!(
            err.contains("sourceIps"),
            "the expected fields are listed: {err}"
        );

        let values: Vec<serde_yaml::Value> =
            serde_yaml::from_str("[{name: n, scope: Global, action: Allow, rules: []}]").unwrap();
        let err = format!("{:#}", PolicySet::from_yaml_values(&values).unwrap_err());
        assert!(err.starts_with("policies[0]:"), "{err}");
        assert!(err.contains("missing field `namespace`"), "{err}");

        let values: Vec<serde_yaml::Value> = serde_yaml::from_str(
            "
- name: n
  namespace: ns
  scope: Global
  action: Allow
  rules: [[[{destinationIps: [10.0.0.300/8]}]]]
",
        )
        .unwrap();
        let err = format!("{:#}", PolicySet::from_yaml_values(&values).unwrap_err());
        assert!(err.starts_with("policies[0] (ns/n)"), "{err}");
        assert!(err.contains("\"10.0.0.300/8\""), "{err}");

        // Validation after parsing names the policy too.
        let values: Vec<serde_yaml::Value> = serde_yaml::from_str(
            "
- {name: a, namespace: ns, scope: Global, action: Allow, rules: []}
- {name: a, namespace: ns, scope: Namespace, action: Deny, rules: []}
",
        )
        .unwrap();
        let err = format!("{:#}", PolicySet::from_yaml_values(&values).unwrap_err());
        assert!(err.contains("\"ns/a\" is defined twice"), "{err}");
    }
}
