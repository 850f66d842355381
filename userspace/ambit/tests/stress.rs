//! Load and churn (issue 8). The short versions run in `cargo xtask test`; `cargo xtask stress`
//! runs the same tests at full scale (AMBIT_STRESS_CHURN=100000, AMBIT_STRESS_CONCURRENT=10000)
//! and prints the `| ... |` lines they write as its table.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use ambit_lab::{pod, wait_until};
use common::{assert_ok, stdout, TestLab};

const ECHO_PORT: &str = "7000";

fn scale(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A lab with a and c enrolled (HBONE) and tools/echo.py listening in c. Idle pooled HBONE
/// connections are released after about 2 s (instead of 5 min), so that "back to the baseline"
/// can be checked without waiting.
fn lab_with_echo() -> TestLab {
    let mut t = TestLab::start_with(
        &ambit_lab::LabConfig {
            enrolled: &["a", "c"],
            ..Default::default()
        },
        &["--hbone-idle-timeout", "1s", "--hbone-ping-interval", "1s"],
    );
    let mut echo = t.lab.pod_command("c", "python3");
    echo.arg(common::tool("echo.py")).arg(ECHO_PORT);
    t.lab.spawn("echo in c", echo).unwrap();
    t.lab
        .wait_listening("c", ECHO_PORT.parse().unwrap(), "echo listening")
        .unwrap();
    t
}

fn churn(t: &TestLab, n: usize, concurrency: usize) {
    let out = t
        .lab
        .pod_command("a", "python3")
        .arg(common::tool("churn.py"))
        .args([
            pod("c").ip,
            ECHO_PORT,
            &n.to_string(),
            &concurrency.to_string(),
        ])
        .output()
        .unwrap();
    assert_ok(&out, &format!("churn.py {n} × {concurrency}"));
    assert_eq!(stdout(&out).trim(), format!("ok {n}"));
}

/// What a node holds, to compare before and after.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Holdings {
    fds: usize,
    rss_kib: usize,
}

fn holdings(t: &TestLab, node: &str) -> Holdings {
    let pid = t.lab.node_pid(node).unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    Holdings { fds, rss_kib }
}

/// Entries in a node's pinned map (bpftool's JSON dump: one "key" per entry).
fn map_entries(t: &TestLab, node: &str, map: &str) -> usize {
    let path = t.lab.pin_dir(node).join(map);
    t.bpftool(&["-j", "map", "dump", "pinned", path.to_str().unwrap()])
        .matches("\"key\"")
        .count()
}

fn connection_counter(t: &TestLab, node: &str, name: &str, reporter: &str) -> u64 {
    common::metric(
        &t.metrics(node),
        name,
        &[&format!("reporter=\"{reporter}\"")],
    )
}

#[test]
fn churned_connections_leave_nothing_behind() {
    let n = scale("AMBIT_STRESS_CHURN", 1000);
    let t = lab_with_echo();
    // Warm-up: the pool, metric label sets and buffers that stay by design exist from here on.
    churn(&t, 200, 100);
    std::thread::sleep(Duration::from_millis(500));
    let before = [holdings(&t, "n1"), holdings(&t, "n2")];
    let maps_before = [
        map_entries(&t, "n1", "ORIGINAL_DESTINATIONS"),
        map_entries(&t, "n1", "PENDING_CONNECTS"),
    ];

    let started = Instant::now();
    churn(&t, n, 1);
    churn(&t, n, 100);
    let rate = (2 * n) as f64 / started.elapsed().as_secs_f64();

    // Everything a connection held is given back: file descriptors and map entries exactly.
    let mut after = before;
    let settled = wait_until(
        Duration::from_secs(10),
        "nodes back to their baseline",
        || {
            after = [holdings(&t, "n1"), holdings(&t, "n2")];
            after[0].fds <= before[0].fds
                && after[1].fds <= before[1].fds
                && [
                    map_entries(&t, "n1", "ORIGINAL_DESTINATIONS"),
                    map_entries(&t, "n1", "PENDING_CONNECTS"),
                ] == maps_before
        },
    );
    assert!(
        settled.is_ok(),
        "leak after {} connections: before {before:?} {maps_before:?}, after {after:?} [{}, {}]",
        2 * n,
        map_entries(&t, "n1", "ORIGINAL_DESTINATIONS"),
        map_entries(&t, "n1", "PENDING_CONNECTS"),
    );
    // Memory: the allocator may keep some of what it had; it must not grow with the count.
    for (node, (b, a)) in ["n1", "n2"].iter().zip(before.iter().zip(after.iter())) {
        assert!(
            a.rss_kib <= b.rss_kib + 16 * 1024,
            "{node} RSS grew from {} to {} KiB over {} connections",
            b.rss_kib,
            a.rss_kib,
            2 * n
        );
    }
    // Counters balance: every connection opened was closed, on both reporters.
    let total = (200 + 2 * n) as u64;
    for (node, reporter) in [("n1", "source"), ("n2", "destination")] {
        let opened = connection_counter(&t, node, "istio_tcp_connections_opened_total", reporter);
        let closed = connection_counter(&t, node, "istio_tcp_connections_closed_total", reporter);
        assert_eq!((opened, closed), (total, total), "{node} {reporter}");
    }
    println!(
        "| churn | {n} sequential + {n} concurrent (100 at once) | {rate:.0} conn/s, no error | \
         fds n1 {}→{}, n2 {}→{}; map entries {maps_before:?}→same; RSS n1 {}→{} KiB, n2 {}→{} KiB; \
         opened = closed = {total} on both nodes |",
        before[0].fds,
        after[0].fds,
        before[1].fds,
        after[1].fds,
        before[0].rss_kib,
        after[0].rss_kib,
        before[1].rss_kib,
        after[1].rss_kib,
    );
}

/// Kills the holding client on every path.
struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn many_concurrent_tunneled_connections_are_held_and_released() {
    let n = scale("AMBIT_STRESS_CONCURRENT", 1000);
    let t = lab_with_echo();
    churn(&t, 100, 100);
    // Idle pooled connections released: the baseline is a node holding no connection at all.
    std::thread::sleep(Duration::from_secs(3));
    let before = [holdings(&t, "n1"), holdings(&t, "n2")];

    let hold = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../xtask/bench/hold.py");
    let mut held = Held(
        t.lab
            .pod_command("a", "python3")
            .arg(hold)
            .args([pod("c").ip, ECHO_PORT, &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(held.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    // Every connection exchanged a byte end to end through both nodes.
    assert_eq!(line.trim(), format!("open {n}"));
    let loaded = [holdings(&t, "n1"), holdings(&t, "n2")];
    let per_conn =
        |i: usize| (loaded[i].rss_kib.saturating_sub(before[i].rss_kib)) as f64 / n as f64;

    drop(held.0.stdin.take());
    let status = held.0.wait().unwrap();
    assert!(status.success());
    let mut after = before;
    wait_until(Duration::from_secs(20), "connections released", || {
        after = [holdings(&t, "n1"), holdings(&t, "n2")];
        after[0].fds <= before[0].fds && after[1].fds <= before[1].fds
    })
    .unwrap_or_else(|e| panic!("{e}: before {before:?}, after {after:?}"));
    println!(
        "| hold | {n} concurrent tunneled connections | all {n} exchanged a byte | RSS per \
         connection n1 {:.1} KiB, n2 {:.1} KiB; fds n1 {}→{}→{} |",
        per_conn(0),
        per_conn(1),
        before[0].fds,
        loaded[0].fds,
        after[0].fds,
    );
}
