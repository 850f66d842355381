//! Apps see their real clients: the tunnel delivers every inbound connection from the client's
//! own address (HBONE: the client workload's; plaintext: the peer's), and policies on source
//! addresses see that client too. The app is an unmodified Python HTTP server that answers with
//! the peer address of its accepted socket (tests/tools/whoami.py).

mod common;

use ambit_lab::{pod, LabConfig};
use common::{assert_ok, both_ips, http_url, stdout, TestLab};

/// whoami in pod c on `port` (IPv4 only, or `dual` for [::] with both families).
fn start_whoami(t: &mut TestLab, port: u16, dual: bool) {
    let mut cmd = t.lab.pod_command("c", "python3");
    cmd.arg(common::tool("whoami.py")).arg(port.to_string());
    if dual {
        cmd.arg("dual");
    }
    t.lab.spawn(&format!("whoami in c :{port}"), cmd).unwrap();
    t.lab.wait_listening("c", port, "whoami listening").unwrap();
}

/// What whoami in c answered `from` for `url`.
fn client_seen(t: &TestLab, from: &str, url: &str) -> String {
    let out = t.curl(from, url);
    assert_ok(&out, &format!("curl {from} → {url}"));
    stdout(&out).trim().to_owned()
}

fn in_c(t: &TestLab, program: &str, args: &[&str]) -> String {
    let out = t.lab.run_in_pod("c", program, args).unwrap();
    assert_ok(&out, &format!("{program} {args:?} in c"));
    stdout(&out)
}

#[test]
fn apps_see_their_clients_address_over_hbone_and_plaintext() {
    // c's first server listens before c joins the mesh (an app already running when its
    // namespace is labelled), the second after.
    let mut t = TestLab::start(&["a"]);
    start_whoami(&mut t, 8081, false);
    t.set_enrolled("n2", &["a", "c"]);
    start_whoami(&mut t, 8082, true);
    let (a, b, c) = (pod("a").ip, pod("b").ip, pod("c").ip);

    let (a6, b6, c6) = (pod("a").ip6, pod("b").ip6, pod("c").ip6);

    // HBONE from a (enrolled) and plaintext from b (outside the mesh, permissive mode).
    let old_listener = format!("http://{c}:8081/");
    let new_listener = format!("http://{c}:8082/");
    assert_eq!(client_seen(&t, "a", &old_listener), format!("client {a}"));
    assert_eq!(client_seen(&t, "b", &old_listener), format!("client {b}"));
    assert_eq!(
        client_seen(&t, "a", &new_listener),
        format!("client ::ffff:{a}")
    );
    assert_eq!(
        client_seen(&t, "b", &new_listener),
        format!("client ::ffff:{b}")
    );
    // And over IPv6.
    let over_ipv6 = http_url(c6, 8082);
    assert_eq!(client_seen(&t, "a", &over_ipv6), format!("client {a6}"));
    assert_eq!(client_seen(&t, "b", &over_ipv6), format!("client {b6}"));
    t.wait_log(
        "n2",
        "src_identity=spiffe://cluster.local/ns/default/sa/sleep",
        2,
    );

    // The pod to itself, by its address and over loopback: untouched.
    assert_eq!(client_seen(&t, "c", &old_listener), format!("client {c}"));
    assert_eq!(
        client_seen(&t, "c", "http://127.0.0.1:8081/"),
        "client 127.0.0.1"
    );

    // A port nobody listens on is refused at once, not after the connect timeout: the reset
    // the pod's kernel answers the delivery with comes back to the tunnel.
    for (n, ip) in [c, c6].into_iter().enumerate() {
        let out = t.curl("a", &http_url(ip, 8099));
        assert!(!out.status.success(), "nothing listens on {ip} 8099");
        t.wait_log("n2", "Connection refused", n + 1);
    }

    // What enrollment added to c: its rules, its table, the listeners' mark, fwmark_reflect.
    for family in ["-4", "-6"] {
        assert!(in_c(&t, "ip", &[family, "rule"]).contains("lookup 15006"));
        let table = in_c(&t, "ip", &[family, "route", "show", "table", "15006"]);
        assert!(table.contains("local default dev lo"), "{table}");
    }
    let table = in_c(&t, "ip", &["-4", "route", "show", "table", "15006"]);
    assert!(table.contains("throw 10.201.2.1"), "c's gateway: {table}");
    assert!(in_c(&t, "ss", &["-tlnHe", "sport = :8081"]).contains("fwmark:0x530000"));
    for sysctl in ["net.ipv4.fwmark_reflect", "net.ipv6.fwmark_reflect"] {
        assert_eq!(in_c(&t, "sysctl", &["-n", sysctl]).trim(), "1");
    }

    // c leaves the mesh: all of it is gone, and b reaches the app directly.
    t.set_enrolled("n2", &["a"]);
    for family in ["-4", "-6"] {
        let rules = in_c(&t, "ip", &[family, "rule"]);
        assert!(
            !rules.contains("15006"),
            "delivery rule left behind: {rules}"
        );
        let table = in_c(&t, "ip", &[family, "route", "show", "table", "15006"]);
        assert!(
            table.trim().is_empty(),
            "delivery table left behind: {table}"
        );
    }
    for port in [":8081", ":8082"] {
        let listener = in_c(&t, "ss", &["-tlnHe", &format!("sport = {port}")]);
        assert!(
            !listener.contains("fwmark"),
            "mark left on the listener: {listener}"
        );
    }
    assert_eq!(
        in_c(&t, "sysctl", &["-n", "net.ipv4.fwmark_reflect"]).trim(),
        "0",
        "the pod's own value is back"
    );
    assert_eq!(client_seen(&t, "b", &old_listener), format!("client {b}"));
    assert_eq!(client_seen(&t, "b", &over_ipv6), format!("client {b6}"));
}

/// Deny by source address, as an AuthorizationPolicy with `ipBlocks` is sent to ztunnel: the
/// pod's addresses of both families.
fn deny_from(pod_name: &str) -> String {
    let [v4, v6] = both_ips(pod_name);
    format!(
        "- name: deny-{pod_name}
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - sourceIps: [{v4}/32, '{v6}/128']"
    )
}

#[test]
fn policies_on_source_addresses_see_the_real_client() {
    fn config(policies: &str) -> LabConfig<'_> {
        LabConfig {
            enrolled: &["a", "c"],
            policies,
            ..Default::default()
        }
    }
    let policies = deny_from("b");
    let t = TestLab::start_with(&config(&policies), &[]);
    for c in both_ips("c") {
        let url = http_url(c, 8080);
        // b's plaintext is denied by its address; a's HBONE is not.
        let out = t.curl("b", &url);
        assert!(
            !out.status.success() || stdout(&out).is_empty(),
            "b got through a policy denying its address ({url})"
        );
        assert_ok(&t.curl("a", &url), &format!("curl a → {url}"));
    }

    // The other way round: a's HBONE is denied by a's address, b's plaintext gets in.
    let policies = deny_from("a");
    t.write_config(&t.lab.config_yaml_with(&config(&policies)), &["n1", "n2"]);
    for (n, c) in both_ips("c").into_iter().enumerate() {
        let url = http_url(c, 8080);
        let out = t.curl("a", &url);
        assert!(
            !out.status.success(),
            "a got through a policy denying its address ({url})"
        );
        t.wait_log("n2", "deny-a", n + 1);
        assert_ok(&t.curl("b", &url), &format!("curl b → {url}"));
    }
}

/// `--deliver-from pod`, the escape hatch: the app sees the pod's own address, and nothing is
/// added to the pod.
#[test]
fn with_deliver_from_pod_apps_see_the_pods_address_and_the_pod_is_unchanged() {
    let mut t = TestLab::start_with(
        &LabConfig {
            enrolled: &["a", "c"],
            ..Default::default()
        },
        &["--deliver-from", "pod"],
    );
    start_whoami(&mut t, 8081, false);
    let c = pod("c").ip;
    assert_eq!(
        client_seen(&t, "a", &format!("http://{c}:8081/")),
        format!("client {c}")
    );
    assert!(!in_c(&t, "ip", &["rule"]).contains("15006"));
    assert_eq!(
        in_c(&t, "sysctl", &["-n", "net.ipv4.fwmark_reflect"]).trim(),
        "0"
    );
}
