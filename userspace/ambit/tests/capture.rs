//! Privileged integration tests of transparent capture, on a real lab: real eBPF programs in the
//! kernel, real network namespaces and cgroups, unmodified clients (curl, python, nc).

mod common;

use ambit_lab::{pod, WEB_VIP, WEB_VIP6};
use common::{assert_ok, host_port, http_url, stdout, TestLab};

#[test]
fn curl_by_pod_ip_and_by_service_vip_is_captured() {
    let t = TestLab::start_tcp(&["a", "c"]);
    // Over IPv4, then over IPv6 (native: connect6 with an IPv6 destination).
    for (c, vip) in [(pod("c").ip, WEB_VIP), (pod("c").ip6, WEB_VIP6)] {
        let c_8080 = host_port(c, 8080);
        let out = t.curl("a", &http_url(c, 8080));
        assert_ok(&out, &format!("curl a → c by pod IP {c}"));
        assert_eq!(stdout(&out), "hello from pod c\n");
        t.wait_log(
            "n1",
            &format!("captured outbound connection original_dst={c_8080}"),
            1,
        );
        // Node 2 captured it on the way in.
        t.wait_log(
            "n2",
            &format!("captured inbound connection original_dst={c_8080}"),
            1,
        );

        let out = t.curl("a", &http_url(vip, 80));
        assert_ok(&out, &format!("curl a → web service VIP {vip}"));
        assert_eq!(stdout(&out), "hello from pod c\n");
        t.wait_log(
            "n1",
            &format!(
                "captured outbound connection original_dst={} upstream={c_8080}",
                host_port(vip, 80)
            ),
            1,
        );
    }
}

#[test]
fn pods_outside_the_mesh_and_destinations_outside_it_are_untouched() {
    let t = TestLab::start_tcp(&["a", "c"]);
    for d in common::both_ips("d") {
        // b is not enrolled, d is not in the mesh: straight through, no node sees it.
        let out = t.curl("b", &http_url(d, 8080));
        assert_ok(&out, &format!("curl b → d at {d}"));
        // a is enrolled, but d is not a mesh destination: not redirected.
        let before = common::counter(&t.inspect("n1"), "outbound_passed");
        let out = t.curl("a", &http_url(d, 8080));
        assert_ok(&out, &format!("curl a → d at {d}"));
        assert_eq!(
            common::counter(&t.inspect("n1"), "outbound_passed"),
            before + 1
        );
        assert_eq!(common::counter(&t.inspect("n1"), "outbound_captured"), 0);
    }

    for node in ["n1", "n2"] {
        let log = t.log(node);
        assert!(
            !log.contains("captured"),
            "node {node} saw traffic it must not see:\n{log}"
        );
    }
}

#[test]
fn enrolling_and_unenrolling_by_config_edit_applies_without_restart() {
    let t = TestLab::start_tcp(&["a", "c"]);
    let c = pod("c").ip;
    let url = format!("http://{c}:8080/");
    let pin_dir = t.lab.pin_dir("n1").join("pods/default_a");
    assert!(pin_dir.join("ambit_connect4").exists());

    // Opt pod a out: its pins, map entries and listeners go; its traffic goes direct.
    t.set_enrolled("n1", &["c"]);
    t.wait_log("n1", "pod un-enrolled", 1);
    assert!(!pin_dir.exists(), "pins of un-enrolled pod a remain");
    let inspect = t.inspect("n1");
    assert!(
        !inspect.contains("netns "),
        "ENROLLED_NETNS not empty:\n{inspect}"
    );
    for ip in common::both_ips("a") {
        assert!(
            !inspect.contains(&format!("\n  {ip}\n")),
            "INBOUND_PODS still has pod a's {ip}:\n{inspect}"
        );
    }
    let listeners = t.lab.run_in_pod("a", "ss", &["-Htln"]).unwrap();
    assert!(
        !stdout(&listeners).contains(":15001") && !stdout(&listeners).contains(":15006"),
        "tunnel listeners remain in pod a:\n{}",
        stdout(&listeners)
    );
    let prog_links = t.bpftool(&["cgroup", "show", t.lab.pod_cgroup("a").to_str().unwrap()]);
    assert!(
        !prog_links.contains("ambit"),
        "programs still attached to pod a's cgroup:\n{prog_links}"
    );
    let captured_before = t.log("n1").matches("captured outbound").count();
    assert_ok(&t.curl("a", &url), "curl a → c with a un-enrolled");
    assert_eq!(
        t.log("n1").matches("captured outbound").count(),
        captured_before
    );

    // And back in.
    t.set_enrolled("n1", &["a", "c"]);
    t.wait_log("n1", "pod enrolled", 2);
    let out = t.curl("a", &url);
    assert_ok(&out, "curl a → c re-enrolled");
    t.wait_log("n1", "captured outbound connection", captured_before + 1);
}

#[test]
fn a_large_transfer_and_a_half_close_pass_through_capture_intact() {
    let mut t = TestLab::start_tcp(&["a", "c"]);
    t.start_sink("c", 9000);
    let c = pod("c").ip;
    // 1 GiB from a to c through both nodes' tunnels; the answer comes back after a's
    // half-close, so this is also the half-close test.
    let (sent, received) = t.send("a", c, 9000, 1 << 30);
    assert_eq!(
        received, sent,
        "the server received other bytes than were sent"
    );
    assert!(sent.starts_with("1073741824 "));
    t.wait_log("n1", "bytes_sent=1073741824", 1);
}

#[test]
fn ipv4_mapped_connect_on_an_ipv6_socket_is_captured_too() {
    let mut t = TestLab::start_tcp(&["a", "c"]);
    t.start_sink("c", 9000);
    let mapped = format!("::ffff:{}", pod("c").ip);
    let (sent, received) = t.send("a", &mapped, 9000, 1 << 20);
    assert_eq!(received, sent);
    t.wait_log(
        "n1",
        &format!(
            "captured outbound connection original_dst={}:9000",
            pod("c").ip
        ),
        1,
    );
}

#[test]
fn nc_through_capture_works() {
    let t = TestLab::start_tcp(&["a", "c"]);
    // A plain TCP echo-less exchange with netcat: request, half-close, response.
    let out = t
        .lab
        .pod_command("a", "bash")
        .arg("-c")
        .arg(format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -N -w 10 {} 8080",
            pod("c").ip
        ))
        .output()
        .unwrap();
    assert_ok(&out, "nc a → c");
    assert!(
        stdout(&out).contains("hello from pod c"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn while_a_node_is_down_captured_connections_fail_closed_and_it_recovers() {
    let mut t = TestLab::start_tcp(&["a", "c"]);
    let url = format!("http://{}:8080/", pod("c").ip);
    let url6 = http_url(pod("c").ip6, 8080);

    // Node 1 down: pod a's capture stays attached (pinned), so its connection to a mesh
    // destination is refused instead of leaving uncaptured, over either family.
    t.lab.stop("ambit node n1").unwrap();
    for url in [&url, &url6] {
        let out = t.curl("a", url);
        assert!(
            !out.status.success(),
            "pod a reached {url} while its node was down: plaintext leak"
        );
    }
    // Node 2 down: plaintext to the enrolled pod c is refused, not handed to the app directly.
    t.lab.stop("ambit node n2").unwrap();
    for url in [&url, &url6] {
        let out = t.curl("b", url);
        assert!(
            !out.status.success(),
            "b reached {url} around its stopped node"
        );
    }
    let inspect = t.inspect("n2");
    assert!(
        common::counter(&inspect, "inbound_refused") >= 2,
        "{inspect}"
    );

    // Both back: they adopt their pins and capture works again.
    t.restart_node("n1", "n1-restarted.log");
    t.restart_node("n2", "n2-restarted.log");
    let out = t.curl("a", &url);
    assert_ok(&out, "curl a → c after restart");
    t.wait_log("n1", "captured outbound connection", 1);
    assert_eq!(
        t.bpftool(&["cgroup", "show", t.lab.pod_cgroup("a").to_str().unwrap()])
            .matches("ambit_connect4")
            .count(),
        1,
        "a restart must replace the old link, not add a second"
    );
}

/// `--capture iptables` (the benchmark's baseline): the node attaches no cgroup programs, and
/// iptables REDIRECT rules inside the pod bring the app's connection to the same tunnel, which
/// reads the destination with SO_ORIGINAL_DST. The tunnel's own sockets carry mark 0x539, so the
/// rules let them through instead of looping them back.
#[test]
fn iptables_capture_feeds_the_same_tunnel() {
    let t = TestLab::start_with(
        &ambit_lab::LabConfig {
            enrolled: &["a", "c"],
            ..Default::default()
        },
        &["--capture", "iptables"],
    );
    let c = pod("c").ip;
    let pin_dir = t.lab.pin_dir("n1");
    let pod_pins: Vec<String> = std::fs::read_dir(pin_dir.join("pods"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !pod_pins.iter().any(|p| p.contains("connect")),
        "no connect programs with --capture iptables: {pod_pins:?}"
    );

    // Before the rules exist nothing captures a's connection on n1: it reaches c in plaintext
    // (n2 takes it in through sk_lookup, as for any client outside the mesh).
    assert_ok(
        &t.curl("a", &format!("http://{c}:8080/")),
        "curl a → c, no rules",
    );
    t.wait_log(
        "n2",
        &format!("captured inbound connection original_dst={c}:8080"),
        1,
    );
    assert!(!t.log("n1").contains("captured outbound"));

    t.lab.redirect_to_tunnel("a", c).unwrap();
    let out = t.curl("a", &format!("http://{c}:8080/"));
    assert_ok(&out, "curl a → c through iptables capture");
    assert_eq!(stdout(&out), "hello from pod c\n");
    t.wait_log(
        "n1",
        &format!("captured outbound connection original_dst={c}:8080"),
        1,
    );
    t.wait_log("n2", "HBONE stream accepted", 1);
}

/// More mesh destinations than the kernel's map holds: no pod's enrollment stops, and nothing
/// reaches a mesh destination in plaintext. Every connection of the enrolled pods goes to the
/// tunnel while the map is full; mesh destinations are tunnelled, others pass through in
/// plaintext as they would without the mesh. Once the mesh fits again, only mesh
/// destinations are captured.
#[test]
fn a_full_map_of_mesh_destinations_captures_everything_and_stops_no_pod() {
    let t = TestLab::start(&["a", "c"]);
    let (c, d) = (pod("c").ip, pod("d").ip);
    let fits = t.lab.config_yaml(&["a", "c"]);
    assert!(
        fits.contains("\nworkloads:\n- "),
        "the lab's config changed shape:\n{fits}"
    );
    // Workloads at made-up addresses (10.128.0.0/10) on a node that does not exist.
    let filler: String = (0..ambit_abi::MAX_MESH_DESTINATIONS + 16)
        .map(|i| {
            format!(
                "- {{name: f{i}, namespace: filler, workloadIps: [\"10.{}.{}.{}\"], protocol: HBONE, node: elsewhere}}\n",
                128 + (i >> 16),
                (i >> 8) & 255,
                i & 255
            )
        })
        .collect();
    let full = fits.replacen("\nworkloads:\n", &format!("\nworkloads:\n{filler}"), 1);
    // Each node parses and applies 65,000 workloads: slow in a debug build on a busy machine.
    let big = std::time::Duration::from_secs(60);
    t.write_config_within(&full, &["n1", "n2"], big);
    t.wait_log("n1", "MESH_DESTINATIONS is full", 1);
    assert!(
        !t.log("n1").contains("pod un-enrolled"),
        "a pod was let go:\n{}",
        t.log("n1")
    );

    // a → c: tunnelled, as ever.
    let out = t.curl("a", &format!("http://{c}:8080/"));
    assert_ok(&out, "curl a → c with the map full");
    assert_eq!(stdout(&out), "hello from pod c\n");
    t.wait_log(
        "n1",
        &format!("captured outbound connection original_dst={c}:8080"),
        1,
    );
    t.wait_log("n2", "HBONE connection accepted", 1);
    // a → d (outside the mesh): through the tunnel, on in plaintext, as without the mesh.
    let out = t.curl("a", &format!("http://{d}:8080/"));
    assert_ok(&out, "curl a → d with the map full");
    t.wait_log(
        "n1",
        &format!("captured outbound connection original_dst={d}:8080"),
        1,
    );

    // The mesh shrinks: only mesh destinations are captured again.
    t.write_config_within(&fits, &["n1", "n2"], big);
    t.wait_log("n1", "mesh destinations fit again", 1);
    let before = common::counter(&t.inspect("n1"), "outbound_passed");
    let out = t.curl("a", &format!("http://{d}:8080/"));
    assert_ok(&out, "curl a → d once the mesh fits");
    assert_eq!(
        common::counter(&t.inspect("n1"), "outbound_passed"),
        before + 1,
        "a → d was captured although d is outside the mesh"
    );
}

/// The kubelet probes pods from the node's netns, so its connections come from the node's
/// address on the pod's link: the pod's default gateway. They are not mesh traffic and reach
/// the app's own listener, also in strict mTLS mode and while the node agent is down (an agent
/// restart must not fail liveness probes); plaintext from other pods is still refused, and a
/// pod that writes the gateway's address as its source gets no answer.
#[test]
fn probes_from_the_node_reach_the_app_with_or_without_the_agent() {
    let mut t = strict_lab_with_whoami_in_c();
    let c = pod("c").ip;
    let gateway = "10.201.2.1"; // node n2's bridge: pod c's default route
    let inspect = t.inspect("n2");
    // Both of pod c's default gateways, IPv4 and IPv6 (n2's bridge addresses).
    for gateway in [gateway, ambit_lab::NODES[1].bridge_ip6] {
        assert!(
            inspect.contains(&format!("\n  node {gateway}\n")),
            "NODE_ADDRESSES lacks pod c's gateway {gateway}:\n{inspect}"
        );
    }

    // As the kubelet's httpGet probe: curl from the node's netns.
    let probe = |t: &TestLab| probe_c_from_n2(t, None);
    let passed = common::counter(&inspect, "inbound_passed");
    let out = probe(&t);
    assert_ok(&out, "probe from node n2 → c, strict, agent running");
    assert_eq!(stdout(&out), format!("client {gateway}\n"));
    assert!(common::counter(&t.inspect("n2"), "inbound_passed") > passed);
    assert!(
        !t.log("n2").contains("captured inbound"),
        "the probe went through the tunnel:\n{}",
        t.log("n2")
    );

    // Pod d, on the same bridge, in plaintext: refused (strict).
    let url = format!("http://{c}:8081/");
    let out = t.curl("d", &url);
    assert!(
        !out.status.success() || stdout(&out).is_empty(),
        "plaintext d → c accepted in strict mode: {}",
        stdout(&out)
    );
    t.wait_log("n2", "plaintext inbound refused: strict mTLS", 1);
    // Pod d with the gateway's address as its source (IP_FREEBIND needs no privilege): c's
    // SYN-ACK goes to the gateway, not to d, so the handshake never completes.
    let spoof = format!(
        "import socket; s = socket.socket(); s.setsockopt(socket.SOL_IP, 15, 1); \
         s.bind(('{gateway}', 0)); s.settimeout({}); s.connect(('{c}', 8081)); \
         s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100))",
        3.0 * ambit_lab::timeout_scale()
    );
    let out = t
        .lab
        .pod_command("d", "python3")
        .args(["-c", &spoof])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "pod d passed for the node: {}",
        stdout(&out)
    );

    // The agent down: fail closed for every other connection, the probe still reaches the app.
    t.lab.stop("ambit node n2").unwrap();
    let out = t.curl("a", &url);
    assert!(!out.status.success(), "a reached c with its node down");
    let out = t.curl("d", &url);
    assert!(!out.status.success(), "d reached c with its node down");
    let out = probe(&t);
    assert_ok(&out, "probe from node n2 → c, agent down");
    assert_eq!(stdout(&out), format!("client {gateway}\n"));
}

/// On a routed CNI (Calico) the node reaches pods from its own address, not from the pods'
/// gateway: `--node-address` (the DaemonSet passes `status.hostIP`) makes those connections the
/// node's too. Without it such a probe is plaintext from outside the mesh: refused in strict
/// mode.
#[test]
fn probes_from_the_nodes_own_address_reach_the_app_with_node_address() {
    let mut t = strict_lab_with_whoami_in_c();
    let node_ip = ambit_lab::NODES[1].link_ip; // n2's address on the link between the nodes
    let probe = |t: &TestLab| probe_c_from_n2(t, Some(node_ip));
    let out = probe(&t);
    assert!(
        !out.status.success() || stdout(&out).is_empty(),
        "a connection from the node's own address passed without --node-address: {}",
        stdout(&out)
    );

    t.restart_node_with(
        "n2",
        "n2-node-address.log",
        &["--node-address", node_ip],
        None,
    );
    let inspect = t.inspect("n2");
    assert!(
        inspect.contains(&format!("\n  node {node_ip}\n")),
        "NODE_ADDRESSES lacks --node-address:\n{inspect}"
    );
    let out = probe(&t);
    assert_ok(&out, "probe from n2's own address → c, strict");
    assert_eq!(stdout(&out), format!("client {node_ip}\n"));
}

/// The lab with a and c enrolled, strict mTLS, and c's port 8081 answering with the client
/// address it sees (tests/tools/whoami.py): what a probe test needs.
fn strict_lab_with_whoami_in_c() -> TestLab {
    let mut t = TestLab::start_with(
        &ambit_lab::LabConfig {
            enrolled: &["a", "c"],
            mtls_mode: "strict",
            ..Default::default()
        },
        &[],
    );
    let mut cmd = t.lab.pod_command("c", "python3");
    cmd.arg(common::tool("whoami.py")).arg("8081");
    t.lab.spawn("whoami in c", cmd).unwrap();
    t.lab.wait_listening("c", 8081, "whoami in c").unwrap();
    t
}

/// As the kubelet's httpGet probe: curl from node n2's netns to c:8081, from `source` when
/// given (else the address the route picks: the pod's gateway).
fn probe_c_from_n2(t: &TestLab, source: Option<&str>) -> std::process::Output {
    let max_time = (10.0 * ambit_lab::timeout_scale()).to_string();
    let mut curl = t.lab.node_command("n2", "curl");
    curl.args(["-sS", "--max-time", &max_time]);
    if let Some(source) = source {
        curl.args(["--interface", source]);
    }
    curl.arg(format!("http://{}:8081/", pod("c").ip))
        .output()
        .unwrap()
}
