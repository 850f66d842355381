//! What an operator sees: metrics with Istio's names, readiness, the admin endpoint, the access
//! log, config errors, and `ambit inspect` — against a live lab.

mod common;

use ambit_lab::pod;
use common::{assert_ok, metric, stdout, TestLab};

fn node_http(t: &TestLab, node: &str, args: &[&str]) -> (bool, String) {
    let out = t
        .lab
        .node_command(node, "curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), stdout(&out))
}

#[test]
fn metrics_count_connections_and_bytes_exactly() {
    let mut t = TestLab::start(&["a", "c"]);
    t.start_sink("c", 9000);
    let bytes = 3 * 1024 * 1024 + 17;
    let (sent, received) = t.send("a", pod("c").ip, 9000, bytes);
    assert_eq!(sent, received);
    t.wait_log("n1", "connection complete", 1);
    t.wait_log("n2", "connection complete", 1);

    let (ok, n1) = node_http(&t, "n1", &["http://127.0.0.1:15020/metrics"]);
    assert!(ok, "{n1}");
    let src = [
        "reporter=\"source\"",
        "source_workload=\"a\"",
        "destination_workload=\"c\"",
    ];
    assert_eq!(
        metric(&n1, "istio_tcp_connections_opened_total", &src),
        1,
        "{n1}"
    );
    assert_eq!(
        metric(&n1, "istio_tcp_connections_closed_total", &src),
        1,
        "{n1}"
    );
    // Payload bytes, counted at the tunnel: exactly what the app sent (TLS and HTTP/2 framing
    // are not counted), and the server's 71-byte answer the other way.
    assert_eq!(
        metric(&n1, "istio_tcp_received_bytes_total", &src),
        bytes,
        "{n1}"
    );
    let answer = received.len() as u64 + 1;
    assert_eq!(
        metric(&n1, "istio_tcp_sent_bytes_total", &src),
        answer,
        "{n1}"
    );
    assert!(n1.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\""));
    assert!(n1.contains("connection_security_policy=\"mutual_tls\""));
    assert!(
        metric(
            &n1,
            "ambit_ebpf_events_total",
            &["event=\"outbound_captured\""]
        ) >= 1
    );
    assert!(
        metric(
            &n1,
            "ambit_ebpf_events_total",
            &["event=\"original_destination_recorded\""]
        ) >= 1
    );

    let (_, n2) = node_http(&t, "n2", &["http://127.0.0.1:15020/metrics"]);
    let dst = [
        "reporter=\"destination\"",
        "source_workload=\"a\"",
        "destination_workload=\"c\"",
    ];
    assert_eq!(
        metric(&n2, "istio_tcp_connections_opened_total", &dst),
        1,
        "{n2}"
    );
    assert_eq!(
        metric(&n2, "istio_tcp_received_bytes_total", &dst),
        bytes,
        "{n2}"
    );
}

#[test]
fn readiness_config_dump_and_log_level_at_run_time() {
    let t = TestLab::start(&["a", "c"]);
    let (ok, body) = node_http(&t, "n1", &["http://127.0.0.1:15021/healthz/ready"]);
    assert!(ok && body == "ready\n", "{body}");

    let (ok, dump) = node_http(&t, "n1", &["http://127.0.0.1:15000/config_dump"]);
    assert!(ok, "{dump}");
    for needle in [
        "\"workloads\"",
        "\"services\"",
        "\"policies\"",
        "\"enrolledPods\"",
        "\"certificates\"",
        "\"expires_unix\"",
        "spiffe://cluster.local/ns/default/sa/sleep",
        "web.default.svc.cluster.local",
    ] {
        assert!(dump.contains(needle), "config_dump lacks {needle}:\n{dump}");
    }

    // Log level: debug lines appear only after the change.
    assert!(!t.log("n1").contains(" DEBUG "), "{}", t.log("n1"));
    let (ok, body) = node_http(
        &t,
        "n1",
        &["-X", "POST", "http://127.0.0.1:15000/logging?level=debug"],
    );
    assert!(ok && body.contains("debug"), "{body}");
    assert_ok(
        &t.curl("a", &format!("http://{}:8080/", pod("c").ip)),
        "curl",
    );
    t.wait_log("n1", " DEBUG ", 1);
    let (_, body) = node_http(
        &t,
        "n1",
        &[
            "-X",
            "POST",
            "http://127.0.0.1:15000/logging?level=ambit=loud",
        ],
    );
    assert!(body.contains("log filter"), "{body}");
}

#[test]
fn a_pod_that_cannot_be_enrolled_makes_the_node_not_ready() {
    let t = TestLab::start(&["a", "c"]);
    let broken = std::fs::read_to_string(&t.config).unwrap().replace(
        &t.lab.netns_path("a").display().to_string(),
        "/run/netns/does-not-exist",
    );
    ambit_lab::write_atomically(&t.config, &broken).unwrap();
    t.wait_log("n1", "enrollment failed", 1);
    let (ok, _) = node_http(&t, "n1", &["-f", "http://127.0.0.1:15021/healthz/ready"]);
    assert!(!ok, "ready although pod a could not be enrolled");
}

#[test]
fn a_broken_config_edit_is_rejected_and_traffic_keeps_flowing() {
    let t = TestLab::start(&["a", "c"]);
    let url = format!("http://{}:8080/", pod("c").ip);
    let good = std::fs::read_to_string(&t.config).unwrap();
    let broken = good.replace("protocol: HBONE", "protocol: HBONEE");
    ambit_lab::write_atomically(&t.config, &broken).unwrap();
    t.wait_log(
        "n1",
        "config rejected, the last good config stays in force",
        1,
    );
    let log = t.log("n1");
    let line = log.lines().find(|l| l.contains("config rejected")).unwrap();
    // File, line and the offending value are named.
    assert!(line.contains(&format!("{}:", t.config.display())), "{line}");
    assert!(line.contains("HBONEE"), "{line}");
    assert_ok(&t.curl("a", &url), "curl under the last good config");
    t.wait_log("n1", "captured outbound connection", 1);
}

#[test]
fn access_log_has_one_line_per_connection_with_both_ends() {
    let t = TestLab::start(&["a", "c"]);
    for _ in 0..3 {
        assert_ok(
            &t.curl("a", &format!("http://{}:8080/", pod("c").ip)),
            "curl",
        );
    }
    t.wait_log("n1", "connection complete", 3);
    t.wait_log("n2", "connection complete", 3);
    let n1 = t.log("n1");
    let line = n1
        .lines()
        .find(|l| l.contains("connection complete"))
        .unwrap();
    for field in [
        "src.workload=a",
        "src.namespace=default",
        "src.identity=spiffe://cluster.local/ns/default/sa/sleep",
        "dst.workload=c",
        "dst.identity=spiffe://cluster.local/ns/default/sa/web",
        "dst.hbone_addr=10.201.2.2:15008",
        "direction=\"outbound\"",
        "bytes_sent=",
        "bytes_recv=",
        "duration_ms=",
        "policy=\"allow\"",
    ] {
        assert!(line.contains(field), "access log lacks {field}:\n{line}");
    }
    assert_eq!(n1.matches("connection complete").count(), 3);
}

#[test]
fn inspect_reads_the_pins_while_running_and_after_the_node_stopped() {
    let mut t = TestLab::start(&["a", "c"]);
    assert_ok(
        &t.curl("a", &format!("http://{}:8080/", pod("c").ip)),
        "curl",
    );
    for running in [true, false] {
        if !running {
            t.lab.stop("ambit node n1").unwrap();
        }
        let text = t.inspect("n1");
        assert!(
            text.contains(
                "default/a: ambit_bind4, ambit_bind6, ambit_connect4, ambit_connect6, ambit_sk_lookup, ambit_sockops"
            ),
            "{text}"
        );
        assert!(text.contains("→ 127.0.0.1:15001"), "{text}");
        assert!(text.contains("service 10.96.0.10:80"), "{text}");
        assert!(text.contains("workload 10.201.2.2 (every port)"), "{text}");
        assert!(common::counter(&text, "outbound_captured") >= 1, "{text}");
    }
}

#[test]
fn ebpf_logging_is_off_by_default_and_shows_decisions_when_asked() {
    let t = TestLab::start_with(&ambit_lab::LabConfig::default(), &["--ebpf-log", "debug"]);
    assert_ok(
        &t.curl("a", &format!("http://{}:8080/", pod("c").ip)),
        "curl",
    );
    t.wait_log(
        "n1",
        "mesh destination port 8080 redirected to the tunnel",
        1,
    );
    t.wait_log("n1", "original destination recorded", 1);

    let quiet = TestLab::start(&["a", "c"]);
    assert_ok(
        &quiet.curl("a", &format!("http://{}:8080/", pod("c").ip)),
        "curl",
    );
    quiet.wait_log("n1", "connection complete", 1);
    assert!(!quiet.log("n1").contains("redirected to the tunnel"));
}
