//! `--source xds` on a live lab: the nodes hold no mesh config and no CA. A stand-in istiod
//! (`ambit control-plane`, the server a real ztunnel accepts: see interop.rs) serves the mesh
//! over delta xDS and signs the nodes' CSRs; the nodes' own file only says where their pods
//! are. Everything a user would check: traffic captured and tunnelled, pushed policies and
//! removals applied live, a bad push refused with the last state kept, istiod going away and
//! coming back, certificates from istiod's CA that rotate, and a refusing CA that leaks no
//! plaintext.

mod common;

use std::{fs, path::Path, time::Duration};

use ambit_lab::{pod, split_mesh_and_pods, wait_until, LabConfig};
use common::{stdout, TestLab, AMBIT};

const DENY_8080: &str = "[{name: deny-8080, namespace: default, scope: Namespace, action: Deny, \
                         rules: [[[{destinationPorts: [8080]}]]]}]";

fn start(node_args: &[&str]) -> TestLab {
    TestLab::start_xds(&LabConfig::default(), node_args)
}

fn web(t: &TestLab) -> std::process::Output {
    t.curl("a", &format!("http://{}:8080/", pod("c").ip))
}

fn assert_reaches(t: &TestLab, what: &str) {
    let out = web(t);
    assert!(
        out.status.success() && stdout(&out).contains("hello from pod c"),
        "{what}: a → c failed: {}\n--- n1 ---\n{}\n--- control plane ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        t.log("n1"),
        t.control_plane_log()
    );
}

fn set_policies(t: &TestLab, policies: &str) {
    let text = t.lab.config_yaml_with(&LabConfig {
        policies,
        ..LabConfig::default()
    });
    t.write_config(&text, &["n2"]);
}

#[test]
fn a_node_fed_only_by_xds_tunnels_and_applies_pushed_policies_and_removals() {
    let t = start(&[]);
    assert_reaches(&t, "with the state istiod sent");
    // Tunnelled with certificates from istiod's CA: each node asked for its pod's identity.
    t.wait_log("n1", "certificate from istiod's CA", 1);
    t.wait_log("n2", "certificate from istiod's CA", 1);
    let cp = t.control_plane_log();
    for id in ["ns/default/sa/sleep", "ns/default/sa/web"] {
        assert!(
            cp.contains(&format!(
                "certificate signed identity=spiffe://cluster.local/{id}"
            )),
            "{cp}"
        );
    }
    // The nodes were never given a CA key.
    assert!(!t.log("n1").contains("plug-in CA") && !t.log("n1").contains("built-in CA"));

    set_policies(&t, DENY_8080);
    let out = web(&t);
    assert!(
        !out.status.success(),
        "the pushed Deny policy did not apply"
    );
    t.wait_log("n2", "HBONE request denied by policy", 1);
    set_policies(&t, "[]");
    assert_reaches(&t, "once the policy was removed");

    // istiod removes workload c: its node un-enrolls it (the pods file still lists it).
    let text = t.lab.config_yaml_with(&LabConfig::default());
    let without_c = remove_workload(&text, "c");
    t.write_config(&without_c, &["n2"]);
    let unenrolled = wait_until(Duration::from_secs(10), "pod c un-enrolled", || {
        !t.inspect("n2").contains("default/c")
    });
    assert!(
        unenrolled.is_ok(),
        "pod c is still enrolled after istiod removed its workload:\n{}\n--- n2 ---\n{}",
        t.inspect("n2"),
        t.log("n2")
    );
    assert!(
        t.control_plane_log().contains("removed=1"),
        "{}",
        t.control_plane_log()
    );
}

#[test]
fn a_bad_push_is_refused_and_the_last_state_stays_in_force() {
    let t = start(&[]);
    assert_reaches(&t, "at start");
    // A workload that claims pod c's address: a node must not accept two owners of one IP.
    let text = t.lab.config_yaml_with(&LabConfig::default());
    let (mesh, _) = split_mesh_and_pods(&text);
    let impostor = mesh.replacen(
        "workloads:\n",
        &format!(
            "workloads:\n- name: impostor\n  namespace: default\n  serviceAccount: impostor\n  \
                 workloadIps: [\"{}\"]\n  protocol: HBONE\n  node: elsewhere\n",
            pod("c").ip
        ),
        1,
    );
    fs::write(&t.config, impostor).unwrap();
    t.wait_log("n1", "rejected (NACK)", 1);
    let n1 = t.log("n1");
    let line = n1.lines().find(|l| l.contains("rejected (NACK)")).unwrap();
    assert!(
        line.contains("impostor") && line.contains("workloadIps"),
        "the NACK does not name the resource and the field: {line}"
    );
    wait_until(
        Duration::from_secs(10),
        "the stand-in logs the NACK",
        || t.control_plane_log().contains("NACK"),
    )
    .unwrap();
    assert_reaches(&t, "after the refused push");
}

#[test]
fn istiod_going_away_keeps_the_state_and_its_return_resumes_the_stream() {
    let mut t = start(&[]);
    assert_reaches(&t, "at start");
    let ca = t.dir.join("ca");
    let config = t.config.clone();
    t.lab.stop("control plane in n2").unwrap();
    t.wait_log("n1", "the last state stays in force", 1);
    assert_reaches(&t, "while istiod is away");

    t.lab
        .start_control_plane(
            Path::new(AMBIT),
            "n2",
            &config,
            &ca,
            &t.dir.join("control-plane-2.log"),
        )
        .unwrap();
    t.wait_log("n1", "xDS stream open", 2);
    t.wait_log("n2", "xDS stream open", 2);
    // The new stream carries pushes again.
    let text = t.lab.config_yaml_with(&LabConfig {
        policies: DENY_8080,
        ..LabConfig::default()
    });
    fs::write(&config, split_mesh_and_pods(&text).0).unwrap();
    // Polled, not checked once after the next "config applied": the reconnection's own first
    // push may be the one that line counts, arriving just after the stream opened.
    let denied = wait_until(
        Duration::from_secs(10),
        "the push after the reconnection",
        || !web(&t).status.success(),
    );
    assert!(
        denied.is_ok(),
        "the push after the reconnection did not apply"
    );
}

#[test]
fn certificates_from_istiods_ca_are_renewed_before_they_expire() {
    let t = start(&["--cert-lifetime", "4s"]);
    assert_reaches(&t, "at start");
    // Renewed at half of the lifetime: after 5 s the first certificate has expired, so a
    // working connection proves a renewed one.
    std::thread::sleep(Duration::from_secs(5));
    assert_reaches(&t, "after the first certificate expired");
    let signed = t
        .control_plane_log()
        .matches("certificate signed identity=spiffe://cluster.local/ns/default/sa/sleep")
        .count();
    assert!(signed >= 2, "no renewal:\n{}", t.control_plane_log());
}

#[test]
fn a_refusing_ca_is_logged_and_retried_and_nothing_passes_in_plaintext() {
    // One handshake per connection: a pooled connection made with a good certificate would
    // outlive it, and this is about new connections.
    let t = start(&[
        "--cert-lifetime",
        "4s",
        "--hbone-max-requests-per-connection",
        "1",
    ]);
    assert_reaches(&t, "at start");
    // The token goes bad: the stand-in's CA refuses every CSR from now on, renewals included.
    let token = t.dir.join("istio-token");
    fs::write(&token, "").unwrap();
    t.wait_log("n1", "refused the CSR", 1);
    // Once the last certificate expired, a → c fails closed: no certificate, no connection
    // (never a plaintext fallback).
    wait_until(
        Duration::from_secs(15),
        "a → c failing without a certificate",
        || !web(&t).status.success(),
    )
    .unwrap();
    // The token is good again: the next attempt gets a certificate.
    fs::write(&token, "lab-token").unwrap();
    wait_until(
        Duration::from_secs(15),
        "a → c once the CA signs again",
        || web(&t).status.success(),
    )
    .unwrap();
}

/// `text` without the workload named `name` (and its `services` entries).
fn remove_workload(text: &str, name: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.starts_with("- ") || !line.starts_with(' ') {
            skipping = line.starts_with("- uid: ") && line.ends_with(&format!("/{name}"));
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";

/// The lab's config with `policies`, a waypoint workload in pod d, and (if `waypoint` is set)
/// the web service and workload c naming `waypoint` (a ztunnel-style destination, e.g.
/// `"/<ip>"`) as their waypoint.
fn with_waypoint(t: &TestLab, waypoint: Option<&str>, policies: &str) -> String {
    use serde_yaml::Value;
    let text = t.lab.config_yaml_with(&LabConfig {
        policies,
        ..LabConfig::default()
    });
    let mut config: Value = serde_yaml::from_str(&text).unwrap();
    if let Some(destination) = waypoint {
        let gateway: Value =
            serde_yaml::from_str(&format!("{{destination: \"{destination}\"}}")).unwrap();
        for list in ["workloads", "services"] {
            for entry in config[list].as_sequence_mut().unwrap() {
                if entry["name"] == "c" || entry["name"] == "web" {
                    entry["waypoint"] = gateway.clone();
                }
            }
        }
    }
    let waypoint_workload: Value = serde_yaml::from_str(&format!(
        "{{uid: lab//v1/Pod/default/waypoint, name: waypoint, namespace: default, \
         serviceAccount: waypoint, workloadIps: [\"{}\"], protocol: HBONE, node: {}}}",
        pod("d").ip,
        t.lab.node_name("n2")
    ))
    .unwrap();
    config["workloads"]
        .as_sequence_mut()
        .unwrap()
        .push(waypoint_workload);
    serde_yaml::to_string(&config).unwrap()
}

/// Waypoints pushed by istiod, with Ambit on both sides: traffic to the web service and to pod
/// c goes through the waypoint (a stand-in in pod d, see interop.rs for the comparison with
/// ztunnel's CONNECT), c's node lets the waypoint's tunnel in and applies c's policies to the
/// waypoint's identity, and a waypoint that cannot be found fails closed: nothing goes around
/// it.
#[test]
fn a_pushed_waypoint_carries_the_traffic_and_an_unknown_one_fails_closed() {
    let t = start(&[]);
    let c_pod = format!("{}:8080", pod("c").ip);
    let web_vip = format!("{}:80", ambit_lab::WEB_VIP);
    let route = common::waypoint::Route {
        target: c_pod.parse().unwrap(),
        identity: "spiffe://cluster.local/ns/default/sa/web".into(),
    };
    let waypoint = common::waypoint::StandInWaypoint::start(
        &t.lab.netns_path("d"),
        &t.dir.join("ca"),
        WAYPOINT_ID,
        [(c_pod.clone(), route.clone()), (web_vip.clone(), route)]
            .into_iter()
            .collect(),
    )
    .unwrap();
    let d_address = format!("/{}", pod("d").ip);
    t.write_config(&with_waypoint(&t, Some(&d_address), "[]"), &["n1", "n2"]);
    let logs = || {
        format!(
            "--- n1 ---\n{}\n--- n2 ---\n{}\n--- control plane ---\n{}",
            t.log("n1"),
            t.log("n2"),
            t.control_plane_log()
        )
    };
    for authority in [&web_vip, &c_pod] {
        let out = t.curl("a", &format!("http://{authority}/"));
        assert!(
            out.status.success() && stdout(&out).contains("hello from pod c"),
            "a → {authority} through the waypoint: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            logs()
        );
    }
    let recorded: Vec<(String, String)> = waypoint
        .recorded()
        .into_iter()
        .map(|r| (r.client, r.authority))
        .collect();
    let a_id = "spiffe://cluster.local/ns/default/sa/sleep".to_owned();
    assert_eq!(
        recorded,
        [(a_id.clone(), web_vip.clone()), (a_id, c_pod.clone())],
        "{}",
        logs()
    );
    // c's policies see the waypoint as the peer: denying its principal refuses the traffic.
    let deny_waypoint = "[{name: deny-waypoint, namespace: default, scope: Namespace, \
                         action: Deny, rules: [[[{principals: [!Exact cluster.local/ns/default/sa/waypoint]}]]]}]";
    t.write_config(&with_waypoint(&t, Some(&d_address), deny_waypoint), &["n2"]);
    assert!(!web(&t).status.success(), "{}", logs());
    t.wait_log("n2", "HBONE request denied by policy", 1);
    // A waypoint nobody can find: refused at the source, never sent around it to c.
    let before = waypoint.recorded().len();
    t.write_config(&with_waypoint(&t, Some("/10.201.2.99"), "[]"), &["n1"]);
    for authority in [&web_vip, &c_pod] {
        let out = t.curl("a", &format!("http://{authority}/"));
        assert!(
            !out.status.success(),
            "a → {authority} went around an unknown waypoint\n{}",
            logs()
        );
    }
    t.wait_log("n1", "names waypoint \"/10.201.2.99\"", 2);
    assert_eq!(waypoint.recorded().len(), before);
    // And without a waypoint, straight to c again.
    t.write_config(&with_waypoint(&t, None, "[]"), &["n1"]);
    assert_reaches(&t, "once the waypoint was removed");
    assert_eq!(waypoint.recorded().len(), before);
}
