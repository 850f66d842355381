//! The policy format: ztunnel's `policies:` entries of its local config, field for field.
//!
//! ```yaml
//! - name: allow-sleep            # with namespace, the key "<namespace>/<name>"
//!   namespace: default
//!   scope: Namespace             # Global | Namespace | WorkloadSelector
//!   action: Allow                # Allow | Deny
//!   dryRun: false                # optional, default false
//!   rules:                       # any rule matches ...
//!   - - - principals:            # ... when all of its clauses match; a clause matches when
//!           - !Exact cluster.local/ns/default/sa/sleep   # any of its matches matches
//!         destinationPorts: [80]
//! ```
//!
//! Every field of a match is a list (empty or absent: not checked):
//!
//! - `namespaces`, `notNamespaces`: string matches on the source identity's namespace;
//! - `serviceAccounts`, `notServiceAccounts`: `{namespace: <ns>, serviceAccount: <sa>}`;
//! - `principals`, `notPrincipals`: string matches on the source identity without `spiffe://`
//!   (`<trust domain>/ns/<ns>/sa/<sa>`);
//! - `sourceIps`, `notSourceIps`, `destinationIps`, `notDestinationIps`: IP ranges
//!   (`10.0.0.0/8`, `fd00::/64`, or one address);
//! - `destinationPorts`, `notDestinationPorts`: port numbers.
//!
//! A string match is written as ztunnel's YAML writes it, with a tag: `!Exact s`, `!Prefix s`,
//! `!Suffix s` or `!Presence []`; the one-key map form of ztunnel's JSON dumps (`{Exact: s}`,
//! `{Presence: []}`) reads too. Ports and IP ranges are plain (`80`, `10.0.0.0/8`). Unknown
//! fields are errors, so a misspelt field cannot silently widen or narrow a policy.

use std::fmt;

use serde::{
    de::{self, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor},
    Deserialize, Deserializer, Serialize,
};

use super::cidr::Cidr;

/// One authorization policy (Istio's `AuthorizationPolicy`, as ztunnel receives it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    /// The policy's name; with the namespace, its key `<namespace>/<name>`.
    pub name: String,
    /// The policy's namespace; for `Namespace` scope, the namespace whose workloads it covers.
    pub namespace: String,
    /// Which destination workloads the policy covers.
    pub scope: Scope,
    /// What a match does.
    pub action: Action,
    /// Rules, any of which may match: each a list of clauses that must all match, each clause
    /// a list of matches any of which may match. No rules at all never matches.
    pub rules: Vec<Vec<Vec<RbacMatch>>>,
    /// A dry-run policy is evaluated and logged but never changes a decision.
    #[serde(default)]
    pub dry_run: bool,
}

impl Authorization {
    /// The policy's key, `<namespace>/<name>`, as workloads' `authorizationPolicies` name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Which destination workloads a policy covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Scope {
    /// Every workload in the mesh.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Only workloads that name the policy in their `authorizationPolicies`.
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Action {
    /// Matching connections may be allowed; once a workload has an Allow policy, only
    /// connections some Allow policy matches are.
    Allow,
    /// Matching connections are refused, whatever else matches.
    Deny,
}

/// One match: all of its non-empty fields must hold. A field holds when the connection matches
/// any entry of the positive list (if given) and no entry of the `not…` list. A match with no
/// fields at all never matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RbacMatch {
    /// The source identity's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    /// The source identity's namespace must match none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// The source identity's namespace and service account.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// The source identity must be none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// The source identity without `spiffe://`: `<td>/ns/<ns>/sa/<sa>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    /// The source identity (without `spiffe://`) must match none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    /// The connection's source address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<Cidr>,
    /// The source address must be in none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<Cidr>,
    /// The connection's destination address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<Cidr>,
    /// The destination address must be in none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<Cidr>,
    /// The connection's destination port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    /// The destination port must be none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

impl RbacMatch {
    /// Whether no field is set (such a match never matches).
    pub fn is_empty(&self) -> bool {
        let RbacMatch {
            namespaces,
            not_namespaces,
            service_accounts,
            not_service_accounts,
            principals,
            not_principals,
            source_ips,
            not_source_ips,
            destination_ips,
            not_destination_ips,
            destination_ports,
            not_destination_ports,
        } = self;
        namespaces.is_empty()
            && not_namespaces.is_empty()
            && service_accounts.is_empty()
            && not_service_accounts.is_empty()
            && principals.is_empty()
            && not_principals.is_empty()
            && source_ips.is_empty()
            && not_source_ips.is_empty()
            && destination_ips.is_empty()
            && not_destination_ips.is_empty()
            && destination_ports.is_empty()
            && not_destination_ports.is_empty()
    }
}

/// A match on a string. In YAML, ztunnel's tag form `!Exact s`, `!Prefix s`, `!Suffix s`,
/// `!Presence []`; the map form of its JSON dumps, `{Exact: s}` (`{Presence: []}`), also reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum StringMatch {
    /// Equal to the string.
    Exact(String),
    /// Starts with the string.
    Prefix(String),
    /// Ends with the string.
    Suffix(String),
    /// Any non-empty value (Istio's `*`).
    Presence(),
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<StringMatch, D::Error> {
        deserializer.deserialize_any(StringMatchVisitor)
    }
}

/// The kinds of string match, as written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Exact,
    Prefix,
    Suffix,
    Presence,
}

impl Kind {
    const NAMES: &'static [&'static str] = &["Exact", "Prefix", "Suffix", "Presence"];

    fn parse<E: de::Error>(name: &str) -> Result<Kind, E> {
        match name {
            "Exact" => Ok(Kind::Exact),
            "Prefix" => Ok(Kind::Prefix),
            "Suffix" => Ok(Kind::Suffix),
            "Presence" => Ok(Kind::Presence),
            other => Err(E::unknown_variant(other, Kind::NAMES)),
        }
    }

    /// The match of this kind on `text` (which `Presence` does not use).
    fn with_text(self, text: String) -> StringMatch {
        match self {
            Kind::Exact => StringMatch::Exact(text),
            Kind::Prefix => StringMatch::Prefix(text),
            Kind::Suffix => StringMatch::Suffix(text),
            Kind::Presence => StringMatch::Presence(),
        }
    }
}

struct StringMatchVisitor;

impl<'de> Visitor<'de> for StringMatchVisitor {
    type Value = StringMatch;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(
            "a string match: `!Exact <s>`, `!Prefix <s>`, `!Suffix <s>` or `!Presence []` \
             (or the map form `{Exact: <s>}`)",
        )
    }

    /// The tag form, `!Exact s`.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<StringMatch, A::Error> {
        let (name, variant) = data.variant::<String>()?;
        match Kind::parse(&name)? {
            Kind::Presence => {
                variant.newtype_variant::<Nothing>()?;
                Ok(StringMatch::Presence())
            }
            kind => Ok(kind.with_text(variant.newtype_variant()?)),
        }
    }

    /// The map form, `{Exact: s}`: exactly one key.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringMatch, A::Error> {
        let Some(name) = map.next_key::<String>()? else {
            return Err(de::Error::invalid_length(0, &"one key"));
        };
        let found = match Kind::parse(&name)? {
            Kind::Presence => {
                map.next_value::<Nothing>()?;
                StringMatch::Presence()
            }
            kind => kind.with_text(map.next_value()?),
        };
        if map.next_key::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::invalid_length(2, &"one key"));
        }
        Ok(found)
    }
}

/// The value that comes with `Presence`: empty (`[]`, `{}` or null).
struct Nothing;

impl<'de> Deserialize<'de> for Nothing {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Nothing, D::Error> {
        struct NothingVisitor;
        impl<'de> Visitor<'de> for NothingVisitor {
            type Value = Nothing;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("nothing (`[]`) after Presence")
            }

            fn visit_unit<E: de::Error>(self) -> Result<Nothing, E> {
                Ok(Nothing)
            }

            fn visit_none<E: de::Error>(self) -> Result<Nothing, E> {
                Ok(Nothing)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Nothing, A::Error> {
                match seq.next_element::<de::IgnoredAny>()? {
                    None => Ok(Nothing),
                    Some(_) => Err(de::Error::invalid_length(1, &self)),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Nothing, A::Error> {
                match map.next_key::<de::IgnoredAny>()? {
                    None => Ok(Nothing),
                    Some(_) => Err(de::Error::invalid_length(1, &self)),
                }
            }
        }
        deserializer.deserialize_any(NothingVisitor)
    }
}

/// A match on the source identity's namespace and service account (any trust domain).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    /// The identity's namespace, exactly.
    pub namespace: String,
    /// The identity's service account, exactly.
    pub service_account: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Authorization {
        serde_yaml::from_str(yaml).unwrap()
    }

    /// A Global Allow policy with the given `rules:` (flow YAML).
    fn with_rules(rules: &str) -> String {
        format!("{{name: n, namespace: ns, scope: Global, action: Allow, rules: {rules}}}")
    }

    fn parse_err(yaml: &str) -> String {
        serde_yaml::from_str::<Authorization>(yaml)
            .unwrap_err()
            .to_string()
    }

    /// The policy of ztunnel's examples/localhost.yaml, verbatim.
    const ZTUNNEL_EXAMPLE: &str = "
action: Allow
rules:
- - - notDestinationPorts:
      - 9999
name: deny-9999
namespace: default
scope: Namespace
dryRun: false
";

    #[test]
    fn reads_ztunnels_example() {
        assert_eq!(
            parse(ZTUNNEL_EXAMPLE),
            Authorization {
                name: "deny-9999".into(),
                namespace: "default".into(),
                scope: Scope::Namespace,
                action: Action::Allow,
                rules: vec![vec![vec![RbacMatch {
                    not_destination_ports: vec![9999],
                    ..Default::default()
                }]]],
                dry_run: false,
            }
        );
        assert_eq!(parse(ZTUNNEL_EXAMPLE).key(), "default/deny-9999");
    }

    #[test]
    fn reads_every_match_field() {
        let policy = parse(
            "
name: all
namespace: ns
scope: WorkloadSelector
action: Deny
dryRun: true
rules:
- - - namespaces: [{Exact: a}, {Prefix: b}]
      notNamespaces: [{Suffix: c}]
      serviceAccounts: [{namespace: a, serviceAccount: sleep}]
      notServiceAccounts: [{namespace: a, serviceAccount: curl}]
      principals: [{Presence: []}, !Exact cluster.local/ns/a/sa/sleep]
      notPrincipals: [{Prefix: other.td/}]
      sourceIps: [10.0.0.0/8, 'fd00::/8']
      notSourceIps: [10.9.9.9]
      destinationIps: [10.1.0.0/16]
      notDestinationIps: ['fd00::1/128']
      destinationPorts: [80, 443]
      notDestinationPorts: [8080]
",
        );
        let m = &policy.rules[0][0][0];
        assert_eq!(policy.scope, Scope::WorkloadSelector);
        assert_eq!(policy.action, Action::Deny);
        assert!(policy.dry_run);
        assert_eq!(
            m.namespaces,
            vec![
                StringMatch::Exact("a".into()),
                StringMatch::Prefix("b".into())
            ]
        );
        assert_eq!(m.not_namespaces, vec![StringMatch::Suffix("c".into())]);
        assert_eq!(
            m.service_accounts,
            vec![ServiceAccountMatch {
                namespace: "a".into(),
                service_account: "sleep".into()
            }]
        );
        assert_eq!(m.not_service_accounts[0].service_account, "curl");
        assert_eq!(
            m.principals,
            vec![
                StringMatch::Presence(),
                StringMatch::Exact("cluster.local/ns/a/sa/sleep".into())
            ]
        );
        assert_eq!(
            m.not_principals,
            vec![StringMatch::Prefix("other.td/".into())]
        );
        assert_eq!(m.source_ips.len(), 2);
        assert_eq!(m.not_source_ips[0].prefix_len(), 32);
        assert_eq!(m.destination_ips[0].to_string(), "10.1.0.0/16");
        assert_eq!(m.not_destination_ips[0].to_string(), "fd00::1/128");
        assert_eq!(m.destination_ports, vec![80, 443]);
        assert_eq!(m.not_destination_ports, vec![8080]);
        assert!(!m.is_empty());
    }

    fn string_matches(yaml: &str) -> Result<Vec<StringMatch>, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    #[test]
    fn string_matches_read_in_tag_and_map_forms() {
        let expected = vec![
            StringMatch::Exact("a".into()),
            StringMatch::Prefix("b/".into()),
            StringMatch::Suffix("/c".into()),
            StringMatch::Presence(),
        ];
        let tags = "[!Exact a, !Prefix b/, !Suffix /c, !Presence []]";
        assert_eq!(string_matches(tags).unwrap(), expected);
        let maps = "[{Exact: a}, {Prefix: b/}, {Suffix: /c}, {Presence: []}]";
        assert_eq!(string_matches(maps).unwrap(), expected);
        // Presence takes nothing, however written.
        for nothing in [
            "!Presence",
            "!Presence ~",
            "!Presence {}",
            "{Presence: }",
            "{Presence: {}}",
        ] {
            assert_eq!(
                string_matches(&format!("- {nothing}\n")).unwrap(),
                vec![StringMatch::Presence()],
                "{nothing}"
            );
        }
        // Through serde_yaml::Value too (the config keeps policies as values).
        let values: serde_yaml::Value = serde_yaml::from_str(tags).unwrap();
        assert_eq!(Vec::<StringMatch>::deserialize(values).unwrap(), expected);
        let values: serde_yaml::Value = serde_yaml::from_str(maps).unwrap();
        assert_eq!(Vec::<StringMatch>::deserialize(values).unwrap(), expected);
    }

    #[test]
    fn string_matches_write_in_ztunnels_tag_form() {
        let text = serde_yaml::to_string(&vec![
            StringMatch::Exact("a".into()),
            StringMatch::Presence(),
        ])
        .unwrap();
        assert_eq!(text, "- !Exact a\n- !Presence []\n");
    }

    #[test]
    fn malformed_string_matches_are_errors() {
        let err = |yaml: &str| string_matches(yaml).unwrap_err().to_string();
        let e = err("[!Exactly a]");
        assert!(
            e.contains("unknown variant `Exactly`") && e.contains("Prefix"),
            "{e}"
        );
        let e = err("[{Exactly: a}]");
        assert!(e.contains("unknown variant `Exactly`"), "{e}");
        let e = err("[cluster.local/ns/a/sa/b]");
        assert!(e.contains("expected a string match"), "{e}");
        let e = err("[{Exact: a, Prefix: b}]");
        assert!(e.contains("one key"), "{e}");
        let e = err("[{}]");
        assert!(e.contains("one key"), "{e}");
        let e = err("[!Presence [x]]");
        assert!(e.contains("after Presence"), "{e}");
        let e = err("[!Exact [a]]");
        assert!(e.contains("[0]"), "{e}");
    }

    #[test]
    fn dry_run_defaults_to_false_and_rules_may_be_empty() {
        let policy = parse("{name: n, namespace: ns, scope: Global, action: Deny, rules: []}");
        assert!(!policy.dry_run);
        assert!(policy.rules.is_empty());
        let policy =
            parse("{name: n, namespace: ns, scope: Global, action: Allow, rules: [[[{}]]]}");
        assert!(policy.rules[0][0][0].is_empty());
    }

    #[test]
    fn serializes_back_to_the_same_policy() {
        let policy = parse(
            "
name: p
namespace: ns
scope: Global
action: Allow
rules:
- - - principals: [{Presence: []}, {Suffix: /sa/sleep}]
      sourceIps: [10.0.0.0/8]
  - - destinationPorts: [80]
",
        );
        let text = serde_yaml::to_string(&policy).unwrap();
        assert_eq!(parse(&text), policy, "{text}");
        assert!(text.contains("dryRun: false"), "{text}");
        assert!(!text.contains("notNamespaces"), "{text}");
    }

    #[test]
    fn an_unknown_field_is_an_error_naming_it() {
        let err = parse_err(
            "{name: n, namespace: ns, scope: Global, action: Allow, rules: [], dryrun: true}",
        );
        assert!(err.contains("unknown field `dryrun`"), "{err}");
        assert!(err.contains("dryRun"), "expected fields are listed: {err}");

        let err = parse_err(&with_rules("[[[{notDestinationPort: [1]}]]]"));
        assert!(err.contains("unknown field `notDestinationPort`"), "{err}");
        assert!(err.contains("rules[0][0][0]"), "{err}");

        let err = parse_err(&with_rules(
            "[[[{serviceAccounts: [{namespace: a, sa: b}]}]]]",
        ));
        assert!(err.contains("unknown field `sa`"), "{err}");
    }

    #[test]
    fn a_missing_field_is_an_error_naming_it() {
        let err = parse_err("{name: n, namespace: ns, action: Allow, rules: []}");
        assert!(err.contains("missing field `scope`"), "{err}");
        let err = parse_err("{name: n, namespace: ns, scope: Global, action: Allow}");
        assert!(err.contains("missing field `rules`"), "{err}");
    }

    #[test]
    fn a_bad_value_is_an_error_naming_the_field() {
        let err = parse_err("{name: n, namespace: ns, scope: Global, action: ALLOW, rules: []}");
        assert!(err.contains("action") && err.contains("ALLOW"), "{err}");
        let err = parse_err("{name: n, namespace: ns, scope: Cluster, action: Allow, rules: []}");
        assert!(err.contains("scope") && err.contains("Cluster"), "{err}");

        let err = parse_err(&with_rules("[[[{sourceIps: [10.0.0.0/33]}]]]"));
        assert!(err.contains("sourceIps"), "{err}");
        assert!(err.contains("\"10.0.0.0/33\""), "{err}");

        let err = parse_err(&with_rules("[[[{destinationPorts: [70000]}]]]"));
        assert!(err.contains("destinationPorts[0]"), "{err}");

        // A string match must say how it matches.
        let err = parse_err(&with_rules("[[[{principals: [cluster.local/ns/a/sa/b]}]]]"));
        assert!(err.contains("principals[0]"), "{err}");
        assert!(
            err.contains("Exact"),
            "the expected variants are listed: {err}"
        );
    }
}
