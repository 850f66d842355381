//! Whether one policy matches one connection (the rules, clauses and matches; not the decision).

use std::net::IpAddr;

use tracing::trace;

use super::model::{Authorization, RbacMatch, ServiceAccountMatch, StringMatch};
use crate::tls::Identity;

/// What is known about a connection at the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The peer's address.
    pub src_ip: IpAddr,
    /// The peer's verified identity; `None` for plaintext.
    pub src_identity: Option<Identity>,
    /// The address the connection was made to.
    pub dst_ip: IpAddr,
    /// The port the connection was made to (the workload's port, not the tunnel's).
    pub dst_port: u16,
}

/// The source identity in the shapes the match fields compare against.
struct Source<'a> {
    identity: &'a Identity,
    /// `<td>/ns/<ns>/sa/<sa>`: the identity without `spiffe://`, as principals are written.
    principal: String,
}

impl<'a> Source<'a> {
    fn new(identity: &'a Identity) -> Self {
        let principal = format!(
            "{}/ns/{}/sa/{}",
            identity.trust_domain, identity.namespace, identity.service_account
        );
        Source {
            identity,
            principal,
        }
    }
}

impl Authorization {
    /// Whether any rule matches the connection (regardless of action and dry-run).
    pub fn matches(&self, conn: &ConnectionInfo) -> bool {
        let source = conn.src_identity.as_ref().map(Source::new);
        let matched = self.rules.iter().any(|rule| {
            // Every clause must match; a clause matches when any of its matches does. No
            // clauses (or a clause with no matches) therefore matches everything.
            rule.iter().all(|clause| {
                clause.is_empty() || clause.iter().any(|m| m.matches(conn, source.as_ref()))
            })
        });
        trace!(policy = %self.key(), matched, "authorization policy evaluated");
        matched
    }
}

impl RbacMatch {
    /// Whether all fields hold for the connection. A match with no fields never matches.
    fn matches(&self, conn: &ConnectionInfo, source: Option<&Source>) -> bool {
        if self.is_empty() {
            return false;
        }
        // Without an identity, nothing identity-based matches: positive lists fail and the
        // `not…` lists hold.
        let identity = source.map(|s| s.identity);
        let fields = [
            field(&self.destination_ports, &self.not_destination_ports, |p| {
                *p == conn.dst_port
            }),
            field(&self.destination_ips, &self.not_destination_ips, |c| {
                c.contains(conn.dst_ip)
            }),
            field(&self.source_ips, &self.not_source_ips, |c| {
                c.contains(conn.src_ip)
            }),
            field(&self.namespaces, &self.not_namespaces, |m| {
                identity.is_some_and(|id| m.matches(&id.namespace))
            }),
            field(&self.service_accounts, &self.not_service_accounts, |m| {
                identity.is_some_and(|id| m.matches(id))
            }),
            field(&self.principals, &self.not_principals, |m| {
                source.is_some_and(|s| m.matches(&s.principal))
            }),
        ];
        fields.into_iter().all(|holds| holds)
    }
}

/// One field with its `not…` form: some positive entry (when there are any) and no negative
/// entry must match.
fn field<T>(positive: &[T], negative: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&matches)) && !negative.iter().any(&matches)
}

impl StringMatch {
    /// Whether `value` matches. `Presence` matches any non-empty value.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence() => !value.is_empty(),
        }
    }
}

impl ServiceAccountMatch {
    /// Whether the identity has this namespace and service account (any trust domain).
    pub fn matches(&self, identity: &Identity) -> bool {
        identity.namespace == self.namespace && identity.service_account == self.service_account
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, Scope};

    fn allow(rules: Vec<Vec<Vec<RbacMatch>>>) -> Authorization {
        Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            scope: Scope::Global,
            action: Action::Allow,
            rules,
            dry_run: false,
        }
    }

    /// A policy of one rule, one clause, one match.
    fn single(m: RbacMatch) -> Authorization {
        allow(vec![vec![vec![m]]])
    }

    /// Plaintext from 10.0.0.1 to 10.0.1.1:8080.
    fn plaintext() -> ConnectionInfo {
        ConnectionInfo {
            src_ip: "10.0.0.1".parse().unwrap(),
            src_identity: None,
            dst_ip: "10.0.1.1".parse().unwrap(),
            dst_port: 8080,
        }
    }

    /// mTLS from cluster.local/ns/ns/sa/sleep at 10.0.0.1 to 10.0.1.1:8080.
    fn sleep() -> ConnectionInfo {
        ConnectionInfo {
            src_identity: Some(Identity::new("cluster.local", "ns", "sleep")),
            ..plaintext()
        }
    }

    /// mTLS from other.td/ns/other/sa/curl at 10.0.0.2 to 10.0.1.2:9090.
    fn curl() -> ConnectionInfo {
        ConnectionInfo {
            src_ip: "10.0.0.2".parse().unwrap(),
            src_identity: Some(Identity::new("other.td", "other", "curl")),
            dst_ip: "10.0.1.2".parse().unwrap(),
            dst_port: 9090,
        }
    }

    /// IPv6 mTLS from fd00::1 (sleep) to [fd00:1::1]:8080.
    fn sleep_v6() -> ConnectionInfo {
        ConnectionInfo {
            src_ip: "fd00::1".parse().unwrap(),
            dst_ip: "fd00:1::1".parse().unwrap(),
            ..sleep()
        }
    }

    /// Checks a one-match policy against (plaintext, sleep, curl).
    fn check(m: RbacMatch, expected: [bool; 3]) {
        let policy = single(m);
        let got = [plaintext(), sleep(), curl()].map(|c| policy.matches(&c));
        assert_eq!(got, expected, "{:?}", policy.rules[0][0][0]);
    }

    fn exact(s: &str) -> StringMatch {
        StringMatch::Exact(s.into())
    }

    fn cidrs(list: &[&str]) -> Vec<crate::policy::Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn sa(namespace: &str, service_account: &str) -> ServiceAccountMatch {
        ServiceAccountMatch {
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    #[test]
    fn namespaces_and_not_namespaces() {
        let list = vec![exact("ns")];
        check(
            RbacMatch {
                namespaces: list.clone(),
                ..Default::default()
            },
            [false, true, false],
        );
        check(
            RbacMatch {
                not_namespaces: list,
                ..Default::default()
            },
            [true, false, true],
        );
    }

    #[test]
    fn service_accounts_and_not_service_accounts() {
        let list = vec![sa("ns", "sleep")];
        check(
            RbacMatch {
                service_accounts: list.clone(),
                ..Default::default()
            },
            [false, true, false],
        );
        check(
            RbacMatch {
                not_service_accounts: list,
                ..Default::default()
            },
            [true, false, true],
        );
        // Both parts must agree; the trust domain is not compared.
        check(
            RbacMatch {
                service_accounts: vec![sa("ns", "curl"), sa("other", "sleep")],
                ..Default::default()
            },
            [false, false, false],
        );
        check(
            RbacMatch {
                service_accounts: vec![sa("other", "curl")],
                ..Default::default()
            },
            [false, false, true],
        );
    }

    #[test]
    fn principals_and_not_principals() {
        let list = vec![exact("cluster.local/ns/ns/sa/sleep")];
        check(
            RbacMatch {
                principals: list.clone(),
                ..Default::default()
            },
            [false, true, false],
        );
        check(
            RbacMatch {
                not_principals: list,
                ..Default::default()
            },
            [true, false, true],
        );
    }

    #[test]
    fn principals_are_compared_without_the_spiffe_scheme() {
        // Written with the scheme, a principal never matches (as in ztunnel; `PolicySet::new`
        // rejects such policies so this cannot happen by mistake).
        check(
            RbacMatch {
                principals: vec![exact("spiffe://cluster.local/ns/ns/sa/sleep")],
                ..Default::default()
            },
            [false, false, false],
        );
        check(
            RbacMatch {
                principals: vec![StringMatch::Prefix("spiffe://".into())],
                ..Default::default()
            },
            [false, false, false],
        );
    }

    #[test]
    fn principals_prefix_suffix_and_presence() {
        let principals = |m: StringMatch| RbacMatch {
            principals: vec![m],
            ..Default::default()
        };
        check(
            principals(StringMatch::Prefix("cluster.local/".into())),
            [false, true, false],
        );
        check(
            principals(StringMatch::Suffix("/sa/curl".into())),
            [false, false, true],
        );
        check(principals(StringMatch::Presence()), [false, true, true]);
        // Istio's "any authenticated peer" as a not-form: only plaintext is left.
        check(
            RbacMatch {
                not_principals: vec![StringMatch::Presence()],
                ..Default::default()
            },
            [true, false, false],
        );
    }

    #[test]
    fn namespaces_prefix_suffix_and_presence() {
        let namespaces = |m: StringMatch| RbacMatch {
            namespaces: vec![m],
            ..Default::default()
        };
        check(
            namespaces(StringMatch::Prefix("oth".into())),
            [false, false, true],
        );
        check(
            namespaces(StringMatch::Suffix("s".into())),
            [false, true, false],
        );
        check(namespaces(StringMatch::Presence()), [false, true, true]);
        // Even a matcher that accepts an empty string does not match plaintext.
        check(
            namespaces(StringMatch::Prefix(String::new())),
            [false, true, true],
        );
    }

    #[test]
    fn source_ips_and_not_source_ips() {
        let list = cidrs(&["10.0.0.1/32"]);
        check(
            RbacMatch {
                source_ips: list.clone(),
                ..Default::default()
            },
            [true, true, false],
        );
        check(
            RbacMatch {
                not_source_ips: list,
                ..Default::default()
            },
            [false, false, true],
        );
        check(
            RbacMatch {
                source_ips: cidrs(&["10.0.0.0/30"]),
                ..Default::default()
            },
            [true, true, true],
        );
    }

    #[test]
    fn destination_ips_and_not_destination_ips() {
        let list = cidrs(&["10.0.1.2"]);
        check(
            RbacMatch {
                destination_ips: list.clone(),
                ..Default::default()
            },
            [false, false, true],
        );
        check(
            RbacMatch {
                not_destination_ips: list,
                ..Default::default()
            },
            [true, true, false],
        );
        check(
            RbacMatch {
                destination_ips: cidrs(&["10.0.1.0/24"]),
                ..Default::default()
            },
            [true, true, true],
        );
    }

    #[test]
    fn destination_ports_and_not_destination_ports() {
        check(
            RbacMatch {
                destination_ports: vec![8080],
                ..Default::default()
            },
            [true, true, false],
        );
        check(
            RbacMatch {
                not_destination_ports: vec![8080],
                ..Default::default()
            },
            [false, false, true],
        );
        check(
            RbacMatch {
                destination_ports: vec![1, 9090, 8080],
                ..Default::default()
            },
            [true, true, true],
        );
    }

    #[test]
    fn ipv6_ranges() {
        let v6 = sleep_v6();
        let m = |src: &[&str], dst: &[&str]| {
            single(RbacMatch {
                source_ips: cidrs(src),
                destination_ips: cidrs(dst),
                ..Default::default()
            })
            .matches(&v6)
        };
        assert!(m(&["fd00::/64"], &["fd00:1::/32"]));
        assert!(m(&["fd00::1"], &["fd00:1::1/128"]));
        assert!(!m(&["fd00::2"], &[]));
        assert!(!m(&["fd01::/16"], &[]));
        assert!(!m(&[], &["fd00:2::/32"]));
        // An IPv4 range never holds an IPv6 peer, nor the reverse.
        assert!(!m(&["0.0.0.0/0"], &[]));
        assert!(!single(RbacMatch {
            source_ips: cidrs(&["::/0"]),
            ..Default::default()
        })
        .matches(&sleep()));
        // The not-forms over IPv6.
        assert!(!single(RbacMatch {
            not_source_ips: cidrs(&["fd00::/16"]),
            ..Default::default()
        })
        .matches(&v6));
        assert!(single(RbacMatch {
            not_destination_ips: cidrs(&["fd00:2::/32"]),
            ..Default::default()
        })
        .matches(&v6));
    }

    #[test]
    fn positive_and_not_forms_combine() {
        // In 10.0.0.0/24 but not 10.0.0.2: only sources at 10.0.0.1 match.
        check(
            RbacMatch {
                source_ips: cidrs(&["10.0.0.0/24"]),
                not_source_ips: cidrs(&["10.0.0.2"]),
                ..Default::default()
            },
            [true, true, false],
        );
        // A port both listed and excluded never matches.
        check(
            RbacMatch {
                destination_ports: vec![8080],
                not_destination_ports: vec![8080],
                ..Default::default()
            },
            [false, false, false],
        );
    }

    #[test]
    fn all_fields_of_a_match_must_hold() {
        // Namespace ns (sleep only) and port 9090 (curl only): nobody.
        check(
            RbacMatch {
                namespaces: vec![exact("ns")],
                destination_ports: vec![9090],
                ..Default::default()
            },
            [false, false, false],
        );
        check(
            RbacMatch {
                namespaces: vec![exact("ns")],
                destination_ports: vec![8080],
                source_ips: cidrs(&["10.0.0.0/8"]),
                ..Default::default()
            },
            [false, true, false],
        );
    }

    #[test]
    fn or_within_a_clause() {
        let policy = allow(vec![vec![vec![
            RbacMatch {
                namespaces: vec![exact("ns")],
                ..Default::default()
            },
            RbacMatch {
                destination_ports: vec![9090],
                ..Default::default()
            },
        ]]]);
        assert!(!policy.matches(&plaintext()));
        assert!(policy.matches(&sleep()));
        assert!(policy.matches(&curl()));
    }

    #[test]
    fn and_across_clauses() {
        let policy = allow(vec![vec![
            vec![
                RbacMatch {
                    namespaces: vec![exact("ns")],
                    ..Default::default()
                },
                RbacMatch {
                    namespaces: vec![exact("other")],
                    ..Default::default()
                },
            ],
            vec![RbacMatch {
                destination_ports: vec![8080],
                ..Default::default()
            }],
        ]]);
        assert!(!policy.matches(&plaintext()), "no namespace");
        assert!(policy.matches(&sleep()), "namespace ns, port 8080");
        assert!(!policy.matches(&curl()), "namespace other, but port 9090");
        assert!(policy.matches(&ConnectionInfo {
            dst_port: 8080,
            ..curl()
        }));
    }

    #[test]
    fn or_across_rules() {
        let policy = allow(vec![
            vec![vec![RbacMatch {
                namespaces: vec![exact("ns")],
                ..Default::default()
            }]],
            vec![vec![RbacMatch {
                source_ips: cidrs(&["10.0.0.2"]),
                ..Default::default()
            }]],
        ]);
        assert!(!policy.matches(&plaintext()));
        assert!(policy.matches(&sleep()));
        assert!(policy.matches(&curl()));
    }

    #[test]
    fn empty_rules_clauses_and_matches() {
        for conn in [plaintext(), sleep(), curl()] {
            // No rules: never matches (an Allow policy without rules allows nothing).
            assert!(!allow(vec![]).matches(&conn));
            // A rule without clauses: matches everything.
            assert!(allow(vec![vec![]]).matches(&conn));
            // A clause without matches: holds.
            assert!(allow(vec![vec![vec![]]]).matches(&conn));
            // A match without fields: never matches, so its clause fails ...
            assert!(!allow(vec![vec![vec![RbacMatch::default()]]]).matches(&conn));
            // ... unless another match of the clause holds.
            assert!(allow(vec![vec![vec![
                RbacMatch::default(),
                RbacMatch {
                    destination_ips: cidrs(&["0.0.0.0/0"]),
                    ..Default::default()
                }
            ]]])
            .matches(&conn));
            // An empty rule next to a failing one still matches (rules are ORed).
            assert!(allow(vec![vec![vec![RbacMatch::default()]], vec![]]).matches(&conn));
        }
    }

    #[test]
    fn string_match_kinds() {
        let cases = [
            (exact("foo"), "foo", true),
            (exact("foo"), "foobar", false),
            (exact("foo"), "", false),
            (StringMatch::Prefix("foo".into()), "foobar", true),
            (StringMatch::Prefix("foo".into()), "barfoo", false),
            (StringMatch::Prefix("foo".into()), "", false),
            (StringMatch::Suffix("foo".into()), "barfoo", true),
            (StringMatch::Suffix("foo".into()), "foobar", false),
            (StringMatch::Suffix("foo".into()), "", false),
            (StringMatch::Presence(), "x", true),
            (StringMatch::Presence(), "", false),
        ];
        for (m, value, expected) in cases {
            assert_eq!(m.matches(value), expected, "{m:?} on {value:?}");
        }
    }

    #[test]
    fn action_and_dry_run_do_not_affect_matching() {
        let mut policy = single(RbacMatch {
            destination_ports: vec![8080],
            ..Default::default()
        });
        policy.action = Action::Deny;
        policy.dry_run = true;
        assert!(policy.matches(&sleep()));
        assert!(!policy.matches(&curl()));
    }
}
