//! Privileged integration tests of what a pod or a peer must not be able to do to the data
//! path: take the tunnel's ports in its own netns (running or not), leave around capture
//! with another socket call, pass for another pod, or hold the HBONE server with handshakes that
//! never finish.

mod common;

use common::{assert_ok, stdout, TestLab};

/// Where `TRY_BIND` binds: the wildcard and loopback of each family.
const BIND_HOSTS: [&str; 4] = ["0.0.0.0", "127.0.0.1", "::", "::1"];

/// Tries to bind (TCP, on the wildcard and loopback of both families) each port in a pod;
/// prints `host:port:errno-name` per attempt.
const TRY_BIND: &str = r#"
import errno, socket, sys
for port in map(int, sys.argv[1:]):
    for host in ("0.0.0.0", "127.0.0.1", "::", "::1"):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            print(f"{host}:{port}:ok")
        except OSError as e:
            print(f"{host}:{port}:{errno.errorcode[e.errno]}")
        s.close()
"#;

fn try_bind(t: &TestLab, pod: &str, ports: &[&str]) -> String {
    let mut args = vec!["-c", TRY_BIND];
    args.extend(ports);
    let out = t.lab.run_in_pod(pod, "python3", &args).unwrap();
    assert_ok(&out, "bind attempts");
    stdout(&out)
}

#[test]
fn an_enrolled_pod_cannot_bind_the_tunnel_ports_even_while_the_node_is_down() {
    let mut t = TestLab::start(&["a", "c"]);
    let tunnel_ports = ["15001", "15006", "15008"];

    for running in [true, false] {
        if !running {
            // Down: the listeners are gone, the pinned programs stay. This is when a port
            // could otherwise be taken.
            t.lab.stop("ambit node n1").unwrap();
        }
        let text = try_bind(&t, "a", &tunnel_ports);
        for port in tunnel_ports {
            for host in BIND_HOSTS {
                assert!(
                    text.contains(&format!("{host}:{port}:EPERM")),
                    "pod a bound {host}:{port} (node running: {running}):\n{text}"
                );
            }
        }
        // Other ports are the app's.
        let text = try_bind(&t, "a", &["8081"]);
        for host in BIND_HOSTS {
            assert!(text.contains(&format!("{host}:8081:ok")), "{text}");
        }
    }
    assert!(common::counter(&t.inspect("n1"), "bind_refused") >= 24);

    // A pod outside the mesh is not affected.
    let text = try_bind(&t, "b", &tunnel_ports);
    assert!(!text.contains("EPERM"), "pod b is not enrolled:\n{text}");
}

/// A client in pod a sending to c through `sendto(MSG_FASTOPEN)` (TCP Fast Open: connect and
/// data in one call) instead of connect(); prints the HTTP status line it gets back.
const FAST_OPEN_GET: &str = r#"
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family)  # blocking: a timeout would make sendto return EINPROGRESS
s.sendto(b"GET / HTTP/1.0\r\n\r\n", socket.MSG_FASTOPEN, (sys.argv[1], 8080))
print(s.recv(4096).split(b"\r\n")[0].decode())
"#;

#[test]
fn tcp_fast_open_does_not_bypass_capture() {
    let t = TestLab::start(&["a", "c"]);
    for (i, c) in common::both_ips("c").into_iter().enumerate() {
        let out = t
            .lab
            .run_in_pod("a", "timeout", &["10", "python3", "-c", FAST_OPEN_GET, c])
            .unwrap();
        assert_ok(&out, &format!("sendto(MSG_FASTOPEN) from pod a to {c}"));
        assert!(stdout(&out).starts_with("HTTP/1.0 200"), "{}", stdout(&out));
        // It went through the tunnel: captured on node 1, arrived over HBONE on node 2.
        t.wait_log(
            "n1",
            &format!(
                "captured outbound connection original_dst={}",
                common::host_port(c, 8080)
            ),
            1,
        );
        t.wait_log("n2", "HBONE stream accepted", i + 1);
    }
}

/// Opens N connections to HOST:15008 and sends the first bytes of a TLS record on each, never
/// the rest; prints "closed N max <seconds>" once the server has closed every one of them.
const STALLED_HANDSHAKES: &str = r#"
import socket, sys, time
host, n = sys.argv[1], int(sys.argv[2])
conns = [socket.create_connection((host, 15008), timeout=30) for _ in range(n)]
for s in conns:
    s.sendall(b"\x16\x03\x01")
start, last = time.monotonic(), 0.0
for s in conns:
    try:
        s.recv(1)
    except ConnectionResetError:
        pass
    last = time.monotonic() - start
print(f"closed {n} max {last:.1f}", flush=True)
"#;

#[test]
fn peers_that_never_finish_the_tls_handshake_are_dropped_and_others_are_unaffected() {
    let t = TestLab::start_with(
        &ambit_lab::LabConfig {
            enrolled: &["a", "c"],
            ..Default::default()
        },
        &["--hbone-handshake-timeout", "2s"],
    );
    let c = ambit_lab::pod("c").ip;
    // From node 1's own netns: a peer outside any pod, holding 50 half-started handshakes.
    let stalled = t
        .lab
        .node_command("n1", "timeout")
        .args(["30", "python3", "-c", STALLED_HANDSHAKES, c, "50"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Meanwhile a mesh client's HBONE connection to the same server works.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = t.curl("a", &format!("http://{c}:8080/"));
    assert_ok(&out, "curl a → c while 50 handshakes are stalled");
    assert_eq!(stdout(&out), "hello from pod c\n");

    let out = stalled.wait_with_output().unwrap();
    assert_ok(&out, "stalled handshakes");
    let line = stdout(&out);
    let max: f64 = line
        .trim()
        .strip_prefix("closed 50 max ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output: {line}"));
    assert!(
        (1.0..6.0).contains(&max),
        "stalled handshakes closed after {max} s with a 2 s timeout"
    );
    assert!(t.log("n2").contains("TLS handshake timed out"));
}

/// From pod a, a connection whose source address is pod b's (IP_FREEBIND needs no privilege);
/// prints the HTTP status line, "closed", or the error.
const GET_FROM_ANOTHER_ADDRESS: &str = r#"
import socket, sys
s = socket.socket()
s.settimeout(5)
s.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
s.bind((sys.argv[1], 0))
try:
    s.connect((sys.argv[2], 8080))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    print(s.recv(4096).split(b"\r\n")[0].decode() or "closed")
except OSError as e:
    print(f"error {e}")
"#;

/// c lets in only b's identity.
const ONLY_B: &str = "policies:
- name: only-b
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [!Exact cluster.local/ns/default/sa/b]";

/// A pod's identity is the one of the pod whose netns its connection was captured in, proven by
/// that pod's certificate: taking another pod's address as the source does not make a pod pass
/// for it at the destination.
#[test]
fn a_pod_cannot_pass_for_another_by_taking_its_address() {
    let t = TestLab::start(&["a", "c"]);
    // a and b on node 1, c on node 2; identities .../sa/a, /b, /c; c allows only b.
    let config = t
        .lab
        .config_yaml_workloads(&["a", "b", "c"])
        .replace("policies: []", ONLY_B);
    assert!(config.contains("only-b"));
    t.write_config(&config, &["n1", "n2"]);
    let (b, c) = (ambit_lab::pod("b").ip, ambit_lab::pod("c").ip);
    let b_identity = "src_identity=spiffe://cluster.local/ns/default/sa/b";

    // b itself is let in.
    assert_ok(&t.curl("b", &format!("http://{c}:8080/")), "curl b → c");
    t.wait_log("n2", b_identity, 1);

    // a, with b's address as its source, is not. (Measured on 6.18: its connect() fails with
    // ENETUNREACH, since capture redirects it to the tunnel's loopback listener, which a foreign
    // source address cannot reach; so it never leaves the pod, in plaintext or otherwise.)
    let out = t
        .lab
        .run_in_pod("a", "python3", &["-c", GET_FROM_ANOTHER_ADDRESS, b, c])
        .unwrap();
    assert_ok(&out, "the spoofing client");
    assert!(
        !stdout(&out).starts_with("HTTP/1.0 200"),
        "pod a got in with b's address: {}",
        stdout(&out)
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        t.log("n2").matches(b_identity).count(),
        1,
        "node 2 saw b's identity on a connection b did not make:\n{}",
        t.log("n2")
    );
}
