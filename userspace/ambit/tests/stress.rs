//! Load and churn. The short versions run in `cargo xtask test`; `cargo xtask stress`
//! runs the same tests at full scale (AMBIT_STRESS_CHURN=50000, AMBIT_STRESS_CONCURRENT=10000,
//! AMBIT_STRESS_SOAK_SECONDS=300) and prints the `| ... |` lines they write as its table.
//!
//! The tests of this file run one at a time: each measures its nodes' memory and latency, which
//! the others' load would blur on a 2-core machine.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use ambit_lab::{pod, wait_until};
use common::{assert_ok, stdout, TestLab};

const ECHO_PORT: &str = "7000";

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
    churn_at(t, n, concurrency, None)
}

/// `churn` starting at most `rate` connections per second.
fn churn_at(t: &TestLab, n: usize, concurrency: usize, rate: Option<u32>) {
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
        .args(rate.map(|r| r.to_string()))
        .output()
        .unwrap();
    assert_ok(&out, &format!("churn.py {n} × {concurrency}"));
    assert_eq!(stdout(&out).trim(), format!("ok {n}"));
}

/// What a node holds, to compare before and after.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Holdings {
    fds: usize,
    rss_kib: u64,
}

fn holdings(t: &TestLab, node: &str) -> Holdings {
    Holdings {
        fds: t.node_fds(node),
        rss_kib: t.node_rss_kib(node),
    }
}

fn connection_counter(t: &TestLab, node: &str, name: &str, reporter: &str) -> u64 {
    common::metric(
        &t.metrics(node),
        name,
        &[&format!("reporter=\"{reporter}\"")],
    )
}

/// Deliveries into pod c come from their client's address, and a client that closes first
/// leaves each delivery's four-tuple in TIME_WAIT for 60 s. Here all come from one client, c
/// has 50 ephemeral ports and takes 150 connections, one at a time, 40 a second: the tunnel
/// must reuse those four-tuples without any pod setting (`tcp_tw_reuse` keeps the kernel's
/// default, 2: loopback only).
#[test]
fn more_new_connections_into_a_port_than_the_pod_has_ephemeral_ports() {
    let _serial = common::one_at_a_time();
    let t = lab_with_echo();
    let sysctl = |args: &[&str]| {
        let out = t
            .lab
            .pod_command("c", "sysctl")
            .args(args)
            .output()
            .unwrap();
        assert_ok(&out, &format!("sysctl {args:?} in c"));
        stdout(&out).trim().to_owned()
    };
    sysctl(&["-w", "net.ipv4.ip_local_port_range=40000 40049"]);

    churn_at(&t, 150, 1, Some(40));

    assert_eq!(
        sysctl(&["-n", "net.ipv4.tcp_tw_reuse"]),
        "2",
        "the pod's setting is not changed"
    );
    let time_wait = t
        .lab
        .pod_command("c", "ss")
        .args(["-tanH", "state", "time-wait"])
        .output()
        .unwrap();
    let from_a = stdout(&time_wait)
        .lines()
        .filter(|l| l.contains(pod("a").ip) && l.contains(":400"))
        .count();
    assert!(
        from_a > 0,
        "no delivery from a's address in TIME_WAIT: the test did not exercise reuse"
    );
}

#[test]
fn churned_connections_leave_nothing_behind() {
    let _serial = common::one_at_a_time();
    let n = common::scale("AMBIT_STRESS_CHURN", 1000);
    let t = lab_with_echo();
    // Warm-up: the pool, metric label sets and buffers that stay by design exist from here on.
    churn(&t, 200, 100);
    std::thread::sleep(Duration::from_millis(500));
    let before = [holdings(&t, "n1"), holdings(&t, "n2")];
    let maps_before = [
        t.map_entries("n1", "ORIGINAL_DESTINATIONS"),
        t.map_entries("n1", "PENDING_CONNECTS"),
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
                    t.map_entries("n1", "ORIGINAL_DESTINATIONS"),
                    t.map_entries("n1", "PENDING_CONNECTS"),
                ] == maps_before
        },
    );
    assert!(
        settled.is_ok(),
        "leak after {} connections: before {before:?} {maps_before:?}, after {after:?} [{}, {}]",
        2 * n,
        t.map_entries("n1", "ORIGINAL_DESTINATIONS"),
        t.map_entries("n1", "PENDING_CONNECTS"),
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
    let _serial = common::one_at_a_time();
    let n = common::scale("AMBIT_STRESS_CONCURRENT", 1000);
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

/// One window of tools/probe.py's output.
#[derive(Debug)]
struct LatencyWindow {
    p50_us: u64,
    p99_us: u64,
}

fn parse_window(line: &str) -> Option<LatencyWindow> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    Some(LatencyWindow {
        p50_us: field("p50_us=")?,
        p99_us: field("p99_us=")?,
    })
}

/// The median of some windows' p50s.
fn median_p50(windows: &[LatencyWindow]) -> u64 {
    let mut p50s: Vec<u64> = windows.iter().map(|w| w.p50_us).collect();
    p50s.sort_unstable();
    p50s[p50s.len() / 2]
}

/// Minutes of mixed load through the tunnel at once: bulk transfers (checksummed), connection
/// churn, and a ping-pong probe that reports latency per window, while both nodes' memory and
/// file descriptors are sampled every second. Nothing may fail, latency must not grow, memory
/// must level off, and everything is given back at the end.
#[test]
fn a_mixed_load_holds_steady_over_time() {
    let _serial = common::one_at_a_time();
    let seconds = common::scale("AMBIT_STRESS_SOAK_SECONDS", 20) as u64;
    let window = (seconds / 10).max(1);
    let mut t = lab_with_echo();
    t.start_sink("c", 9000);
    churn(&t, 200, 100);
    std::thread::sleep(Duration::from_secs(3));
    let before = [holdings(&t, "n1"), holdings(&t, "n2")];
    let c = pod("c").ip;
    let deadline = Instant::now() + Duration::from_secs(seconds);

    let mut samples: Vec<[Holdings; 2]> = Vec::new();
    let (windows, churned, bulk_bytes) = std::thread::scope(|s| {
        let probe = s.spawn(|| {
            let out = t
                .lab
                .pod_command("a", "python3")
                .arg(common::tool("probe.py"))
                .args([c, ECHO_PORT, &seconds.to_string(), &window.to_string()])
                .output()
                .unwrap();
            assert_ok(&out, "probe.py");
            stdout(&out)
                .lines()
                .map(|l| parse_window(l).unwrap_or_else(|| panic!("probe.py said: {l}")))
                .collect::<Vec<_>>()
        });
        let churner = s.spawn(|| {
            let mut churned = 0;
            while Instant::now() < deadline {
                churn(&t, 300, 10);
                churned += 300;
            }
            churned
        });
        let bulk = s.spawn(|| {
            let mut bytes = 0u64;
            while Instant::now() < deadline {
                let (sent, received) = t.send("a", c, 9000, 16 << 20);
                assert_eq!(sent, received, "a bulk transfer arrived changed");
                bytes += 16 << 20;
            }
            bytes
        });
        while Instant::now() < deadline {
            samples.push([holdings(&t, "n1"), holdings(&t, "n2")]);
            std::thread::sleep(Duration::from_secs(1));
        }
        (
            probe.join().expect("the latency probe failed"),
            churner.join().expect("connection churn failed"),
            bulk.join().expect("a bulk transfer failed"),
        )
    });

    // Latency does not grow: the last third of the windows against the first third. The bound
    // is loose because the two cores are shared with everything else on the machine; a leak or
    // a growing queue shows as a multiple, not as noise.
    assert!(windows.len() >= 9, "probe windows: {windows:?}");
    let third = windows.len() / 3;
    let (early, late) = (
        median_p50(&windows[..third]),
        median_p50(&windows[windows.len() - third..]),
    );
    assert!(
        late <= 2 * early + 200,
        "latency grew under steady load: p50 {early} µs early, {late} µs late: {windows:?}"
    );
    // Memory levels off: the last third of the samples holds no more than the middle third's
    // peak plus a margin.
    let third = samples.len() / 3;
    for (i, node) in ["n1", "n2"].iter().enumerate() {
        let peak = |s: &[[Holdings; 2]]| s.iter().map(|h| h[i].rss_kib).max().unwrap();
        let (middle, late) = (
            peak(&samples[third..2 * third]),
            peak(&samples[samples.len() - third..]),
        );
        assert!(
            late <= middle + 8 * 1024,
            "{node} RSS still growing: {middle} KiB, then {late} KiB"
        );
    }
    // Everything is given back, and every connection opened was closed.
    let mut after = before;
    wait_until(Duration::from_secs(20), "connections released", || {
        after = [holdings(&t, "n1"), holdings(&t, "n2")];
        after[0].fds <= before[0].fds && after[1].fds <= before[1].fds
    })
    .unwrap_or_else(|e| panic!("{e}: before {before:?}, after {after:?}"));
    for (node, reporter) in [("n1", "source"), ("n2", "destination")] {
        let opened = connection_counter(&t, node, "istio_tcp_connections_opened_total", reporter);
        let closed = connection_counter(&t, node, "istio_tcp_connections_closed_total", reporter);
        assert_eq!(opened, closed, "{node} {reporter}: opened ≠ closed");
    }
    let p99_max = windows.iter().map(|w| w.p99_us).max().unwrap();
    let rss_max = |i: usize| samples.iter().map(|h| h[i].rss_kib).max().unwrap();
    println!(
        "| soak | {seconds} s of bulk transfers + churn (10 at once) + 100 B ping-pong at once | \
         {:.1} GiB checksummed, {churned} connections, p50 {early}→{late} µs (first→last third), \
         worst window p99 {p99_max} µs, no error | RSS peak n1 {} KiB, n2 {} KiB, levelled off; \
         fds n1 {}→{}, n2 {}→{}; opened = closed |",
        bulk_bytes as f64 / (1u64 << 30) as f64,
        rss_max(0),
        rss_max(1),
        before[0].fds,
        after[0].fds,
        before[1].fds,
        after[1].fds,
    );
}
