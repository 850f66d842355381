//! Istio L4 authorization at the destination, on a live lab: HBONE requests denied with 401,
//! plaintext closed, live connections re-checked when the policy tightens.

mod common;

use ambit_lab::{pod, write_atomically, LabConfig};
use common::{assert_ok, stdout, TestLab};

const DENY_8080: &str = r#"
- name: deny-8080
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - destinationPorts: [8080]
"#;

const DENY_9000: &str = r#"
- name: deny-9000
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - destinationPorts: [9000]
"#;

const ONLY_SLEEP: &str = r#"
- name: only-sleep
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [!Exact cluster.local/ns/default/sa/sleep]
"#;

fn set_policies(t: &TestLab, policies: &str) {
    let text = t.lab.config_yaml_with(&LabConfig {
        policies,
        ..LabConfig::default()
    });
    let before = t.log("n2").matches("config applied").count();
    write_atomically(&t.config, &text).unwrap();
    t.wait_log("n2", "config applied", before + 1);
}

#[test]
fn a_deny_policy_on_a_port_refuses_it_at_the_destination_and_is_counted() {
    let mut t = TestLab::start(&["a", "c"]);
    t.start_sink("c", 9000);
    set_policies(&t, DENY_8080);
    let c = pod("c").ip;

    let out = t.curl("a", &format!("http://{c}:8080/"));
    assert!(
        !out.status.success(),
        "port 8080 reached despite the Deny policy: {}",
        stdout(&out)
    );
    t.wait_log("n2", "HBONE request denied by policy", 1);
    // An app that already sent its request and half-closed learns it was refused by a reset,
    // not by an orderly close that could pass for "delivered, no answer" (its bytes went out
    // with the CONNECT, and the destination dropped them). Many times over: the answer and the
    // end of the stream race inside the source node.
    assert_eq!(
        t.outcomes("a", c, 8080, 200, true),
        "reset=200",
        "what the refused apps saw"
    );
    // Another port of the same pod still works.
    let (sent, received) = t.send("a", c, 9000, 4096);
    assert_eq!(sent, received);
    // The same over IPv6: the policy names a port, not an address family.
    let c6 = pod("c").ip6;
    let out = t.curl("a", &common::http_url(c6, 8080));
    assert!(
        !out.status.success(),
        "port 8080 reached over IPv6 despite the Deny policy: {}",
        stdout(&out)
    );
    t.wait_log("n2", "HBONE request denied by policy", 2);
    assert_eq!(t.outcomes("a", c6, 8080, 20, true), "reset=20");
    let (sent, received) = t.send("a", c6, 9000, 4096);
    assert_eq!(sent, received, "port 9000 over IPv6");

    let out = t
        .lab
        .node_command("n2", "curl")
        .args(["-sS", "http://127.0.0.1:15020/metrics"])
        .output()
        .unwrap();
    let metrics = stdout(&out);
    let denied = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_failed_total")
                && l.contains("response_flags=\"DENY\"")
        })
        .unwrap_or_else(|| panic!("no DENY in metrics:\n{metrics}"));
    assert!(
        denied.contains("reporter=\"destination\"") && denied.contains("source_workload=\"a\""),
        "{denied}"
    );
    t.wait_log("n2", "policy=\"deny (default/deny-8080)\"", 1);
}

#[test]
fn plaintext_is_denied_by_an_allow_policy_for_mesh_identities_only() {
    let t = TestLab::start(&["a", "c"]);
    set_policies(&t, ONLY_SLEEP);
    for (i, c) in common::both_ips("c").into_iter().enumerate() {
        let url = common::http_url(c, 8080);
        assert_ok(&t.curl("a", &url), "a (sa/sleep over HBONE) is allowed");
        let out = t.curl("b", &url);
        assert!(
            !out.status.success() || stdout(&out).is_empty(),
            "plaintext from b to {url} allowed"
        );
        t.wait_log("n2", "plaintext inbound denied by policy", i + 1);
    }
}

#[test]
fn tightening_a_policy_closes_an_open_connection_it_no_longer_allows() {
    let mut t = TestLab::start(&["a", "c"]);
    t.start_sink("c", 9000);
    let slow = t.slow_transfer(9000, "8");
    t.wait_log("n2", "HBONE stream accepted", 1);
    set_policies(&t, DENY_9000);
    t.wait_log("n2", "closing a connection the new policy denies", 1);
    let (completed, line) = common::completed_intact(slow);
    assert!(
        !completed,
        "the connection survived the policy that denies it: {line}"
    );
}
