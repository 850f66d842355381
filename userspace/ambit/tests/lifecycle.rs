//! Privileged integration tests of the node's lifecycle: SIGTERM drains open
//! connections up to a deadline, and while the node is going away capture stays attached and
//! refuses new connections instead of letting them out around the tunnel.

mod common;

use std::time::{Duration, Instant};

use ambit_lab::pod;
use common::TestLab;

#[test]
fn sigterm_drains_open_connections_refuses_new_ones_then_exits() {
    let mut t = TestLab::start_with(
        &ambit_lab::LabConfig {
            enrolled: &["a", "c"],
            ..Default::default()
        },
        &["--drain-timeout", "20s"],
    );
    t.start_sink("c", 9000);
    let slow = t.slow_transfer(9000, "4");
    t.wait_log("n2", "HBONE stream accepted", 1);

    // Both ends go down at once, as in a node drain.
    let signalled = Instant::now();
    for node in ["n1", "n2"] {
        t.lab
            .signal(&format!("ambit node {node}"), libc::SIGTERM)
            .unwrap();
    }
    t.wait_log("n1", "draining: listeners closed", 1);

    // A new connection from the enrolled pod is refused at once, not sent around the tunnel.
    let started = Instant::now();
    let out = t.curl("a", &format!("http://{}:8080/", pod("c").ip));
    assert!(
        !out.status.success(),
        "a new connection got through while draining"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // The open connection finishes intact through both draining nodes.
    let (intact, line) = common::completed_intact(slow);
    assert!(
        intact,
        "the open connection did not survive the drain: {line}"
    );

    // Then each node exits on its own, long before the 20 s deadline.
    for node in ["n1", "n2"] {
        let status = t
            .lab
            .wait_exit(&format!("ambit node {node}"), Duration::from_secs(8))
            .unwrap_or_else(|| panic!("node {node} still running after its connections ended"));
        assert!(status.success(), "node {node} exited with {status}");
        assert!(t.log(node).contains("drained: every connection finished"));
    }
    assert!(signalled.elapsed() < Duration::from_secs(15));
}

#[test]
fn the_drain_deadline_cuts_connections_still_open() {
    let mut t = TestLab::start_with(
        &ambit_lab::LabConfig {
            enrolled: &["a", "c"],
            ..Default::default()
        },
        &["--drain-timeout", "1s"],
    );
    t.start_sink("c", 9000);
    let slow = t.slow_transfer(9000, "10");
    t.wait_log("n2", "HBONE stream accepted", 1);

    let signalled = Instant::now();
    t.lab.signal("ambit node n1", libc::SIGTERM).unwrap();
    let status = t
        .lab
        .wait_exit("ambit node n1", Duration::from_secs(6))
        .expect("node n1 still running after its drain deadline");
    assert!(status.success(), "node n1 exited with {status}");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "exit {took:?} after SIGTERM with a 1 s deadline"
    );
    assert!(t.log("n1").contains(
        "drain deadline reached: cutting the connections still open open=1 hbone_connections=1"
    ));
    // The cut connection fails visibly; it is not completed in plaintext around the tunnel.
    let (intact, line) = common::completed_intact(slow);
    assert!(!intact, "a connection outlived the deadline: {line}");
}

fn failed_connects(t: &TestLab) -> u64 {
    common::metric(
        &t.metrics("n1"),
        "istio_tcp_connections_failed_total",
        &["response_flags=\"CONNECT\"", "reporter=\"source\""],
    )
}

#[test]
fn an_unreachable_peer_fails_promptly_says_why_and_traffic_resumes_when_it_returns() {
    let t = TestLab::start_with(
        &ambit_lab::LabConfig {
            enrolled: &["a", "c"],
            ..Default::default()
        },
        &["--connect-timeout", "1s"],
    );
    let c = pod("c").ip;
    let url = format!("http://{c}:8080/");
    // A pooled HBONE connection to node 2 exists before the network goes away.
    common::assert_ok(&t.curl("a", &url), "curl a → c");

    // Node 1 loses its route to c: packets (SYNs, and the pooled connection's) vanish.
    let route = |verb: &str| {
        let out = t
            .lab
            .node_command("n1", "ip")
            .args(["route", verb, "blackhole", &format!("{c}/32")])
            .output()
            .unwrap();
        common::assert_ok(&out, &format!("ip route {verb} blackhole"));
    };
    route("add");
    for attempt in 1..=2 {
        let started = Instant::now();
        let out = t.curl("a", &url);
        let took = started.elapsed();
        assert!(
            !out.status.success(),
            "curl {attempt} got through a blackhole"
        );
        assert!(
            took < Duration::from_secs(4),
            "curl {attempt}: failure took {took:?} with --connect-timeout 1s"
        );
    }
    // An app that waits for the server to speak first learns of the failure by a reset, not
    // by an orderly close it could take for a server that closed without a word. (curl above
    // sent its request, and a socket closed with unread bytes resets anyway.)
    assert_eq!(t.outcomes("a", c, 8080, 1, false), "reset=1", "what it saw");
    assert!(failed_connects(&t) >= 3, "{}", t.metrics("n1"));
    let log = t.log("n1");
    assert!(
        log.lines()
            .any(|l| l.contains("connection complete") && l.contains("timed out")),
        "the access log does not say why:\n{log}"
    );

    // The network is back: new connections work again without restarting anything.
    route("del");
    let mut recovered = false;
    for _ in 0..10 {
        if t.curl("a", &url).status.success() {
            recovered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        recovered,
        "traffic did not resume after the route came back"
    );
}

#[test]
fn a_pod_whose_netns_vanishes_is_released() {
    use std::os::unix::fs::MetadataExt as _;
    let t = TestLab::start(&["a", "c"]);
    let url = format!("http://{}:8080/", pod("c").ip);
    common::assert_ok(&t.curl("a", &url), "curl a → c");

    let netns = t.lab.netns_path("c");
    let meta = std::fs::metadata(&netns).unwrap();
    let id = (meta.dev(), meta.ino());
    let n2 = t.lab.node_pid("n2").unwrap();
    // Whether node 2 still has c's netns open (an fd whose file is that nsfs inode).
    let holds_netns = || {
        std::fs::read_dir(format!("/proc/{n2}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::metadata(e.unwrap().path()).ok())
            .any(|m| (m.dev(), m.ino()) == id)
    };
    assert!(
        holds_netns(),
        "node 2 should hold c's netns while c is enrolled"
    );
    let pod_pins = t.lab.pin_dir("n2").join("pods/default_c");
    assert!(pod_pins.exists());

    // The pod is killed: its netns goes away while the config still lists it.
    ambit_lab::ip(&["netns", "del", &t.lab.netns("c")]).unwrap();
    t.wait_log("n2", "pod released", 1);
    ambit_lab::wait_until(
        Duration::from_secs(5),
        "node 2 lets go of c's netns",
        || !holds_netns(),
    )
    .unwrap();
    assert!(!pod_pins.exists(), "c's programs are still pinned");
    let inspect = t.inspect("n2");
    assert!(!inspect.contains("default/c"), "{inspect}");
    // Node 1's pod is not touched by it.
    assert!(t.inspect("n1").contains("default/a"));
}

/// A pod's cgroup replaced under a running node (removed and made again at the same path: the
/// new one has no programs) is noticed, the pod released and enrolled again on the new cgroup,
/// so its connections stay captured. A cgroup missing at start is a clear error naming the path,
/// and the pod is enrolled once the cgroup is there.
#[test]
fn a_pod_whose_cgroup_is_replaced_or_missing_is_enrolled_again_on_the_new_one() {
    let mut t = TestLab::start(&["a", "c"]);
    let url = format!("http://{}:8080/", pod("c").ip);
    common::assert_ok(&t.curl("a", &url), "curl a → c");
    t.wait_log("n1", "captured outbound connection", 1);

    // Replaced while running: nothing is in a's cgroup between commands, so it can go.
    let cgroup = t.lab.pod_cgroup("a");
    std::fs::remove_dir(&cgroup).unwrap();
    std::fs::create_dir(&cgroup).unwrap();
    t.wait_log("n1", "pod released", 1);
    let log = t.log("n1");
    let released = log.lines().find(|l| l.contains("pod released")).unwrap();
    assert!(
        released.contains(&format!("cgroup {}", cgroup.display())),
        "{released}"
    );
    t.wait_log("n1", "pod enrolled", 2);
    common::assert_ok(&t.curl("a", &url), "curl a → c on the new cgroup");
    t.wait_log("n1", "captured outbound connection", 2);

    // Missing when the node starts: an error naming the cgroup; the node runs, not ready, and
    // enrolls the pod once the cgroup exists.
    t.lab.stop("ambit node n1").unwrap();
    std::fs::remove_dir(&cgroup).unwrap();
    t.restart_node("n1", "n1-restarted.log");
    t.wait_log("n1", "enrollment failed", 1);
    let log = t.log("n1");
    let failed = log
        .lines()
        .find(|l| l.contains("enrollment failed"))
        .unwrap();
    assert!(
        failed.contains(&format!(
            "{} is not a cgroup v2 directory",
            cgroup.display()
        )),
        "{failed}"
    );
    assert!(
        !t.lab.pin_dir("n1").join("pods/default_a").exists(),
        "programs of a pod without a cgroup are still pinned"
    );
    std::fs::create_dir(&cgroup).unwrap();
    t.wait_log("n1", "pod enrolled", 1);
    common::assert_ok(&t.curl("a", &url), "curl a → c after the cgroup came back");
    t.wait_log("n1", "captured outbound connection", 1);
}

/// CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses: utime is the 12th.
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A node out of file descriptors cannot accept the connections waiting in its listeners'
/// queues. It must back off (not spin on accept() and flood its log), keep the connections it
/// has, and take the waiting ones once descriptors are free again.
#[test]
fn running_out_of_file_descriptors_backs_off_and_recovers() {
    let t = TestLab::start(&["a", "c"]);
    let url = format!("http://{}:8080/", pod("c").ip);
    common::assert_ok(&t.curl("a", &url), "curl a → c");
    let pid = t.lab.node_pid("n1").unwrap();
    let limit = t.node_fds("n1") as u64 + 40;
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: plain syscall on a process of ours, with a valid struct.
    let set = unsafe {
        libc::prlimit(
            pid as i32,
            libc::RLIMIT_NOFILE,
            &rlimit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());

    // 120 connections from a: node 1 can accept about 40; the rest wait in the kernel's queue.
    let mut idle = t.hold_idle_connections("a", pod("c").ip, 8080, 120);
    t.wait_log("n1", "out of file descriptors", 1);

    // Backing off: little CPU and few log lines while the queue cannot be served.
    let (cpu, before) = (cpu_ticks(pid), t.log("n1").lines().count());
    std::thread::sleep(Duration::from_secs(2));
    let log = t.log("n1");
    // The connections accepted before the limit was hit log their start ("captured outbound
    // connection", at debug) whenever their tasks run, possibly inside the window: they are
    // not the error loop this measures.
    let written: Vec<&str> = log
        .lines()
        .skip(before)
        .filter(|l| !l.contains("captured outbound connection"))
        .collect();
    let (cpu, lines) = (cpu_ticks(pid) - cpu, written.len());
    assert!(
        cpu < 40,
        "node 1 spent {cpu} ticks of CPU in 2 s out of descriptors"
    );
    assert!(
        lines < 40,
        "node 1 wrote {lines} log lines in 2 s out of descriptors:\n{}",
        written.join("\n")
    );

    // The held connections go; the waiting ones are taken, and new connections work again.
    drop(idle.stdin.take());
    assert!(idle.wait().unwrap().success());
    common::assert_ok(&t.curl("a", &url), "curl a → c once descriptors are free");
}

/// Whether a lab node answers its readiness probe with 200.
fn ready(t: &TestLab, node: &str) -> bool {
    t.lab
        .node_command(node, "curl")
        .args([
            "-sf",
            "--max-time",
            "1",
            "http://127.0.0.1:15021/healthz/ready",
        ])
        .output()
        .unwrap()
        .status
        .success()
}

/// Makes exactly `pods` the enrolled mesh workloads and waits for `nodes` to apply it.
fn write_workloads(t: &TestLab, pods: &[&str], nodes: &[&str]) {
    t.write_config(&t.lab.config_yaml_workloads(pods), nodes);
}

/// A crash (SIGKILL) leaves capture attached and closed; the desired state changes while the
/// node is down; the next start adopts the pins, removes what is no longer desired, adds what
/// is, with no stale or duplicate entry, and capture works within a second of readiness.
#[test]
fn after_a_crash_the_node_reconciles_and_captures_within_a_second_of_ready() {
    let mut t = TestLab::start(&["a", "c"]);
    // a, b (node 1) and c (node 2) in the mesh.
    write_workloads(&t, &["a", "b", "c"], &["n1", "n2"]);
    t.wait_log("n1", "pod enrolled", 2);
    let url = format!("http://{}:8080/", pod("c").ip);
    // Identities changed (a and c are re-enrolled): a re-enrollment binds the same ports again
    // at once, it does not fail and leave the pod uncaptured until a retry.
    for node in ["n1", "n2"] {
        assert!(
            !t.log(node).contains("enrollment failed"),
            "{node}: {}",
            t.log(node)
        );
    }
    common::assert_ok(&t.curl("a", &url), "curl a → c");

    t.lab.signal("ambit node n1", libc::SIGKILL).unwrap();
    t.lab
        .wait_exit("ambit node n1", Duration::from_secs(5))
        .expect("SIGKILL");
    let out = t.curl("a", &url);
    assert!(
        !out.status.success(),
        "pod a reached c while its node was dead: plaintext leak"
    );
    // While node 1 is dead, b leaves the mesh (node 2 applies it).
    write_workloads(&t, &["a", "c"], &["n2"]);

    t.restart_node("n1", "n1-restarted.log");
    let became_ready = {
        let started = Instant::now();
        while !ready(&t, "n1") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "node 1 not ready 10 s after its start: {}",
                t.log("n1")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Instant::now()
    };
    common::assert_ok(&t.curl("a", &url), "curl a → c after the restart");
    let captured_after = became_ready.elapsed();
    t.wait_log("n1", "captured outbound connection", 1);
    assert!(
        captured_after < Duration::from_secs(1),
        "capture worked only {captured_after:?} after readiness"
    );

    // Exactly the desired state: a's entries (its netns, its two addresses: IPv4 and IPv6) and
    // one link per program; nothing of b's.
    for (map, entries) in [("ENROLLED_NETNS", 1), ("INBOUND_PODS", 2)] {
        assert_eq!(
            t.map_entries("n1", map),
            entries,
            "{map}:\n{}",
            t.inspect("n1")
        );
    }
    let links = |pod: &str| {
        t.bpftool(&["cgroup", "show", t.lab.pod_cgroup(pod).to_str().unwrap()])
            .matches("ambit_")
            .count()
    };
    assert_eq!(links("a"), 5, "connect4/6, sockops, bind4/6 once each");
    assert_eq!(links("b"), 0, "b left the mesh while the node was down");
    assert!(!t.lab.pin_dir("n1").join("pods/default_b").exists());
    // b is no longer captured: its connection reaches c as plaintext from outside the mesh.
    let before = t.log("n1").matches("captured outbound connection").count();
    common::assert_ok(&t.curl("b", &url), "curl b → c");
    assert_eq!(
        t.log("n1").matches("captured outbound connection").count(),
        before
    );
}

#[test]
fn without_a_bpf_filesystem_the_node_refuses_to_start_and_says_how_to_fix_it() {
    let t = TestLab::start(&[]);
    let not_bpffs = t.dir.join("not-bpffs");
    std::fs::create_dir_all(&not_bpffs).unwrap();
    let out = std::process::Command::new(common::AMBIT)
        .args(["node", "--node", &t.lab.node_name("n3"), "--config"])
        .arg(&t.config)
        .arg("--ca-dir")
        .arg(t.dir.join("ca"))
        .arg("--bpffs")
        .arg(&not_bpffs)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without bpffs: {stderr}");
    assert!(
        stderr.contains(&format!(
            "{} is not a bpf filesystem; mount it first: mount -t bpf bpf",
            not_bpffs.display()
        )),
        "{stderr}"
    );
}

#[test]
fn pins_from_another_ambit_version_are_refused_with_the_fix() {
    let t = TestLab::start(&[]);
    // An older Ambit pinned COUNTERS with one counter fewer (before bind_refused).
    let node = t.lab.node_name("n3");
    let pins = t.lab.pin_dir("n3");
    std::fs::create_dir_all(&pins).unwrap();
    let counters = pins.join("COUNTERS");
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&counters)
        .args(["type", "percpu_array", "key", "4", "value", "8", "entries"])
        .arg((ambit_abi::Counter::COUNT - 1).to_string())
        .args(["name", "COUNTERS"])
        .output()
        .unwrap();
    common::assert_ok(&created, "bpftool map create");

    let out = std::process::Command::new(common::AMBIT)
        .args(["node", "--node", &node, "--config"])
        .arg(&t.config)
        .arg("--ca-dir")
        .arg(t.dir.join("ca"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "adopted an incompatible pin: {stderr}"
    );
    assert!(
        stderr.contains(&format!("pinned map {}", counters.display()))
            && stderr.contains("ambit reset --node"),
        "{stderr}"
    );
}

#[test]
fn a_pinned_map_removed_by_hand_is_recreated_on_restart() {
    let mut t = TestLab::start(&["a", "c"]);
    let url = format!("http://{}:8080/", pod("c").ip);
    common::assert_ok(&t.curl("a", &url), "curl a → c");

    let pin = t.lab.pin_dir("n1").join("ORIGINAL_DESTINATIONS");
    std::fs::remove_file(&pin).unwrap();
    // The running node and its programs hold the map by fd: capture goes on.
    common::assert_ok(&t.curl("a", &url), "curl a → c with the pin gone");

    // A restart pins a new map and re-attaches the programs that use it.
    t.restart_node("n1", "n1-restarted.log");
    assert!(pin.exists(), "the map was not pinned again");
    common::assert_ok(&t.curl("a", &url), "curl a → c after the restart");
    t.wait_log("n1", "captured outbound connection", 1);
    assert_eq!(
        t.bpftool(&["cgroup", "show", t.lab.pod_cgroup("a").to_str().unwrap()])
            .matches("ambit_connect4")
            .count(),
        1
    );
}
