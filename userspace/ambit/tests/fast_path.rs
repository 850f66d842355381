//! The fast path (`--fast-path on`): both loopback hops of a captured connection (app → tunnel
//! in the client's pod, tunnel → app in the server's) are carried by sockhash + sk_msg instead
//! of loopback TCP. What an app must still get: every byte, in order, with half-close, resets,
//! sendfile(), MSG_PEEK and a reader that starts late; what an operator must see: which
//! connections took it, and that sockets leave the map when they close.
//!
//! The apps are tests/tools/streams.py: blocking sockets, as unmodified apps use them.

mod common;

use std::time::Duration;

use ambit_lab::{pod, wait_until, LabConfig};
use common::{assert_ok, counter, metric, stdout, TestLab};
use serde_json::Value;

const STREAMS_PORT: u16 = 9100;
const SECONDS_10: Duration = Duration::from_secs(10);

fn fast_path_lab() -> TestLab {
    let mut t = TestLab::start_with(&LabConfig::default(), &["--fast-path", "on"]);
    start_streams_server(&mut t);
    t
}

fn start_streams_server(t: &mut TestLab) {
    let mut cmd = t.lab.pod_command("c", "python3");
    cmd.arg(common::tool("streams.py"))
        .args(["server", &STREAMS_PORT.to_string()]);
    t.lab.spawn("streams server in c", cmd).unwrap();
    t.lab
        .wait_listening("c", STREAMS_PORT, "streams server listening")
        .unwrap();
}

/// Runs every stream check from `from` to c; returns its "ok <check>" lines.
fn run_stream_checks(t: &TestLab, from: &str) -> String {
    let out = t
        .lab
        .pod_command(from, "python3")
        .arg(common::tool("streams.py"))
        .args(["client", pod("c").ip, &STREAMS_PORT.to_string()])
        .output()
        .unwrap();
    assert_ok(&out, &format!("streams.py client in {from}"));
    stdout(&out)
}

/// Access-log lines of a node with `fast_path="<value>"`.
fn logged_with(t: &TestLab, node: &str, value: &str) -> usize {
    t.log(node)
        .lines()
        .filter(|l| {
            l.contains("connection complete") && l.contains(&format!("fast_path=\"{value}\""))
        })
        .count()
}

/// Waits until each node's sockhash holds `count` sockets.
fn wait_for_sockets(t: &TestLab, count: usize, what: &str) {
    wait_until(SECONDS_10, what, || {
        loopback_sockets(t, "n1") == count && loopback_sockets(t, "n2") == count
    })
    .unwrap();
}

/// Entries of the fast path's sockhash of a lab node's `ambit node` process. The map is not
/// pinned: it is the one sockhash named LOOPBACK_SOCKS among the maps that process holds open
/// (`map_id` in /proc/<pid>/fdinfo).
fn loopback_sockets(t: &TestLab, node: &str) -> usize {
    let pid = t.lab.node_pid(node).expect("the node runs");
    let ids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            let id = info.lines().find_map(|l| l.strip_prefix("map_id:"))?;
            Some(id.trim().to_owned())
        })
        .collect();
    let id = ids
        .iter()
        .find(|id| {
            let show: Value =
                serde_json::from_str(&t.bpftool(&["-j", "map", "show", "id", id])).unwrap();
            if show["name"] != "LOOPBACK_SOCKS" {
                return false;
            }
            // The kernel's map (from the eBPF static) has the ABI's key.
            let key = std::mem::size_of::<ambit_abi::LoopbackKey>() as u64;
            assert_eq!(show["bytes_key"].as_u64(), Some(key), "{show}");
            true
        })
        .unwrap_or_else(|| panic!("pid {pid} holds no LOOPBACK_SOCKS map"));
    let dump: Vec<Value> =
        serde_json::from_str(&t.bpftool(&["-j", "map", "dump", "id", id])).unwrap();
    dump.len()
}

#[test]
fn every_byte_arrives_in_order_through_both_fast_path_hops() {
    let t = fast_path_lab();
    let lines = run_stream_checks(&t, "a");
    for check in [
        "echo-half-close",
        "echo-small-writes",
        "slow-reader",
        "peek",
        "sendfile-from-server",
        "sendfile-from-client",
        "reset",
    ] {
        assert!(
            lines.contains(&format!("ok {check}\n")),
            "{check}:\n{lines}"
        );
    }
    // Both hops of those connections took the fast path: the client's (n1: a → tunnel) and the
    // server's (n2: tunnel → c). The bulk transfers (4 to 16 MiB) went on through TCP once each
    // socket's budget (LOOPBACK_BUDGET, 1 MiB) was spent, in order.
    let n1 = t.metrics("n1");
    let n2 = t.metrics("n2");
    let taken = |text: &str, hop: &str| {
        metric(
            text,
            "ambit_fast_path_connections_total",
            &[&format!("hop=\"{hop}\""), "fast_path=\"yes\""],
        )
    };
    assert!(taken(&n1, "outbound") >= 7, "n1:\n{n1}");
    assert!(taken(&n2, "inbound") >= 7, "n2:\n{n2}");
    assert!(logged_with(&t, "n1", "yes") >= 7, "{}", t.log("n1"));
    assert_eq!(logged_with(&t, "n1", "no"), 0, "{}", t.log("n1"));
    for node in ["n1", "n2"] {
        let inspect = t.inspect(node);
        assert!(
            counter(&inspect, "fast_path_writes_redirected") > 0,
            "{inspect}"
        );
        assert!(
            counter(&inspect, "fast_path_writes_passed") > 0,
            "{inspect}"
        );
        assert_eq!(
            counter(&inspect, "fast_path_sockets_skipped"),
            0,
            "{inspect}"
        );
    }

    // Plaintext into the mesh (b is outside it, c permissive): the delivery hop is on the
    // fast path too.
    let lines = run_stream_checks(&t, "b");
    assert!(lines.contains("ok reset\n"), "{lines}");
    let n2 = t.metrics("n2");
    assert!(taken(&n2, "inbound") >= 14, "n2:\n{n2}");
}

#[test]
fn sockets_leave_the_map_when_their_connections_close_and_a_killed_node_fails_closed() {
    let mut t = fast_path_lab();
    t.start_sink("c", 9000);
    // One long connection open: its two sockets are in each node's map.
    let slow = t.slow_transfer(9000, "4");
    wait_for_sockets(&t, 2, "the slow connection on both fast-path hops");
    let (intact, line) = common::completed_intact(slow);
    assert!(intact, "{line}");
    // Closed: both maps empty again.
    wait_for_sockets(&t, 0, "the sockets to leave the maps");

    // A node killed with a fast-path connection open: the app's connection ends (it is never
    // handed to anything else), and new connections are refused until a node runs again.
    let slow = t.slow_transfer(9000, "6");
    wait_until(
        SECONDS_10,
        "the second slow connection on the fast path",
        || loopback_sockets(&t, "n1") == 2,
    )
    .unwrap();
    t.lab.signal("ambit node n1", libc::SIGKILL).unwrap();
    let (intact, line) = common::completed_intact(slow);
    assert!(
        !intact,
        "a connection survived its tunnel's SIGKILL: {line}"
    );
    let out = t.curl("a", &format!("http://{}:8080/", pod("c").ip));
    assert!(!out.status.success(), "a connection while n1 is down");
    t.restart_node("n1", "n1-restarted.log");
    let lines = run_stream_checks(&t, "a");
    assert!(lines.contains("ok echo-half-close\n"), "{lines}");
    assert!(logged_with(&t, "n1", "yes") >= 7, "{}", t.log("n1"));
}

#[test]
fn with_the_fast_path_off_no_socket_is_added() {
    // The default.
    let mut t = TestLab::start_with(&LabConfig::default(), &[]);
    start_streams_server(&mut t);
    let lines = run_stream_checks(&t, "a");
    assert!(lines.contains("ok reset\n"), "{lines}");
    for node in ["n1", "n2"] {
        let inspect = t.inspect(node);
        assert_eq!(counter(&inspect, "fast_path_sockets_added"), 0, "{inspect}");
        assert!(!t
            .metrics(node)
            .contains("ambit_fast_path_connections_total{"));
    }
    assert!(t.log("n1").contains("fast_path=\"-\""));
}

/// The client's pod leaves the mesh with a fast-path connection open. Connections in flight run
/// to completion (PodTunnel): its two sockets stay in the map until it ends (taking a live
/// socket out would drop its unread bytes), it ends intact, and the pod's next connections
/// are neither captured nor on its node's fast path.
#[test]
fn a_client_pod_leaving_the_mesh_keeps_its_open_connection_whole() {
    let mut t = fast_path_lab();
    t.start_sink("c", 9000);
    let slow = t.slow_transfer(9000, "5");
    wait_for_sockets(&t, 2, "the slow connection on both fast-path hops");
    t.set_enrolled("n1", &["c"]);
    t.wait_log("n1", "pod un-enrolled", 1);
    assert_eq!(loopback_sockets(&t, "n1"), 2, "a live socket left the map");
    let (intact, line) = common::completed_intact(slow);
    assert!(intact, "{line}");
    wait_for_sockets(&t, 0, "the sockets to leave the maps");
    // a's next connections: straight to c (no tunnel on n1, so no access-log line there), and
    // no socket of n1 on the fast path.
    let completed = |t: &TestLab| t.log("n1").matches("connection complete").count();
    let (added, logged) = (
        counter(&t.inspect("n1"), "fast_path_sockets_added"),
        completed(&t),
    );
    let lines = run_stream_checks(&t, "a");
    assert!(lines.contains("ok reset\n"), "{lines}");
    assert_eq!(
        counter(&t.inspect("n1"), "fast_path_sockets_added"),
        added,
        "a pod outside the mesh put a socket on the fast path"
    );
    assert_eq!(completed(&t), logged, "n1 still tunnels a's connections");
}
