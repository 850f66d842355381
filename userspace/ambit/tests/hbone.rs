//! Privileged integration tests of the HBONE tunnel between lab nodes: real mTLS, real HTTP/2,
//! real captures on the link between the nodes.

mod common;

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use ambit::{
    netns::Netns,
    socket::connect_tcp,
    tls::{self, BuiltinCa, CertificateAuthority, Identity, PluginCa},
};
use ambit_lab::{pod, LabConfig};
use common::{assert_ok, host_port, http_url, stdout, TestLab, AMBIT};

#[test]
fn curl_and_iperf3_cross_nodes_and_only_tls_to_15008_is_on_the_link() {
    let mut t = TestLab::start(&["a", "c"]);
    let c = pod("c").ip;
    // A token that exists only in the served file: it must never appear on the link.
    let token = format!("plaintext-marker-{}", std::process::id());
    fs::write(t.dir.join("www-c/secret.txt"), format!("{token}\n")).unwrap();

    let pcap = t.dir.join("link.pcap");
    let mut cmd = t.lab.node_command("n1", "tcpdump");
    cmd.args(["-i", "link0", "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    t.lab.spawn("tcpdump", cmd).unwrap();
    ambit_lab::wait_until(Duration::from_secs(5), "tcpdump started", || pcap.exists()).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let out = t.curl("a", &format!("http://{c}:8080/secret.txt"));
    assert_ok(&out, "curl a → c over HBONE");
    assert_eq!(stdout(&out), format!("{token}\n"));
    t.wait_log("n1", "HBONE connection established", 1);
    t.wait_log("n2", "HBONE stream accepted", 1);
    // The same over IPv6: captured by connect6, tunnelled to c's IPv6 address on 15008.
    let c6 = pod("c").ip6;
    let out = t.curl("a", &format!("{}secret.txt", http_url(c6, 8080)));
    assert_ok(&out, "curl a → c over HBONE, IPv6");
    assert_eq!(stdout(&out), format!("{token}\n"));
    t.wait_log("n2", "HBONE stream accepted", 2);
    t.wait_log("n1", "connection complete", 2);
    t.wait_log("n2", "connection complete", 2);
    let n1 = t.log("n1");
    let v6_hbone = format!("dst.hbone_addr={}", host_port(c6, 15008));
    let line = n1
        .lines()
        .find(|l| l.contains("connection complete") && l.contains(&v6_hbone))
        .unwrap_or_else(|| panic!("no access log line with {v6_hbone}:\n{n1}"));
    for field in ["src.workload=a", "dst.workload=c", "direction=\"outbound\""] {
        assert!(line.contains(field), "access log lacks {field}:\n{line}");
    }
    let n2 = t.log("n2");
    let v6_dst = format!("dst.addr={}", host_port(c6, 8080));
    let line = n2
        .lines()
        .find(|l| l.contains("connection complete") && l.contains(&v6_dst))
        .unwrap_or_else(|| panic!("no access log line with {v6_dst}:\n{n2}"));
    for field in [
        "src.workload=a",
        "src.identity=spiffe://cluster.local/ns/default/sa/sleep",
        "direction=\"inbound\"",
    ] {
        assert!(line.contains(field), "access log lacks {field}:\n{line}");
    }

    let mut server = t.lab.pod_command("c", "iperf3");
    server
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null());
    t.lab.spawn("iperf3 server", server).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = t
        .lab
        .run_in_pod("a", "iperf3", &["-c", c, "-p", "5201", "-t", "2", "-J"])
        .unwrap();
    assert_ok(&out, "iperf3 a → c over HBONE");
    assert!(
        stdout(&out).contains("\"sum_received\""),
        "{}",
        stdout(&out)
    );

    std::thread::sleep(Duration::from_millis(300));
    t.lab.stop("tcpdump").unwrap();
    let raw = fs::read(&pcap).unwrap();
    assert!(
        !raw.windows(token.len()).any(|w| w == token.as_bytes()),
        "the payload crossed the link in plaintext"
    );
    let other = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&pcap)
        .args(["tcp and not port 15008"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&other.stdout).trim().is_empty(),
        "TCP other than HBONE on the link:\n{}",
        String::from_utf8_lossy(&other.stdout)
    );
    let hbone = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&pcap)
        .args(["tcp port 15008"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&hbone.stdout).lines().count() > 10);
}

#[test]
fn a_large_transfer_over_hbone_arrives_intact() {
    let mut t = TestLab::start(&["a", "c"]);
    t.start_sink("c", 9000);
    let (sent, received) = t.send("a", pod("c").ip, 9000, 1 << 30);
    assert_eq!(
        received, sent,
        "the server received other bytes than were sent"
    );
    assert!(sent.starts_with("1073741824 "));
}

#[test]
fn many_concurrent_connections_share_a_few_pooled_hbone_connections() {
    let mut t = TestLab::start(&["a", "c"]);
    t.start_sink("c", 9000);
    let out = t
        .lab
        .pod_command("a", "python3")
        .arg(common::tool("many.py"))
        .args([pod("c").ip, "9000", "1000"])
        .output()
        .unwrap();
    assert_ok(&out, "1000 concurrent connections");
    assert_eq!(stdout(&out).trim(), "ok 1000");
    let pooled = t.log("n1").matches("HBONE connection established").count();
    // 100 streams per connection: 1000 concurrent streams need 10.
    assert!(
        (1..=20).contains(&pooled),
        "{pooled} HBONE connections for 1000 streams"
    );
}

#[test]
fn certificates_rotate_under_a_long_lived_connection() {
    let mut t = TestLab::start_with(&LabConfig::default(), &["--cert-lifetime", "3s"]);
    t.start_sink("c", 9000);
    let out = t
        .lab
        .pod_command("a", "python3")
        .arg(common::tool("slow.py"))
        .args([pod("c").ip, "9000", "7"])
        .output()
        .unwrap();
    assert_ok(&out, "long-lived connection");
    let line = stdout(&out);
    let (sent, received) = line.trim().split_once(" received=").unwrap();
    assert_eq!(sent.trim_start_matches("sent="), received);
    // Renewed at half the lifetime: at least twice in 7 s, for a's identity on node 1.
    let renewals = t.log("n1").matches("issued workload certificate").count();
    assert!(
        renewals >= 2,
        "only {renewals} certificates issued:\n{}",
        t.log("n1")
    );
    // And a new connection after the rotations works with the new certificate.
    assert_ok(
        &t.curl("a", &format!("http://{}:8080/", pod("c").ip)),
        "curl after rotation",
    );
}

#[test]
fn a_node_with_another_ca_or_the_wrong_identity_is_refused_promptly() {
    let mut t = TestLab::start(&["a", "c"]);
    let url = format!("http://{}:8080/", pod("c").ip);
    assert_ok(&t.curl("a", &url), "curl with one CA");

    // Node 2 restarts with a CA of its own: node 1 must not trust it.
    let other_ca = t.dir.join("other-ca");
    t.lab.init_ca(Path::new(AMBIT), &other_ca).unwrap();
    t.restart_node_with(
        "n2",
        "n2-other-ca.log",
        &["--ca-dir", other_ca.to_str().unwrap()],
        None,
    );
    let start = Instant::now();
    let out = t.curl("a", &url);
    assert!(
        !out.status.success(),
        "a reached c through a node with a foreign CA"
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "the failure took {:?}",
        start.elapsed()
    );

    // Node 2 back on the shared CA, but its config gives c another service account: it
    // presents spiffe://.../sa/impostor where node 1 expects .../sa/web.
    let config = t.dir.join("n2-impostor.yaml");
    let text = fs::read_to_string(&t.config)
        .unwrap()
        .replace("serviceAccount: web", "serviceAccount: impostor");
    fs::write(&config, text).unwrap();
    let ca = t.dir.join("ca").display().to_string();
    t.restart_node_with("n2", "n2-impostor.log", &["--ca-dir", &ca], Some(&config));
    let out = t.curl("a", &url);
    assert!(
        !out.status.success(),
        "a reached a server presenting the wrong identity"
    );
    t.wait_log("n1", "sa/impostor", 1);
}

/// A hand-made HBONE client built from the same crates, connecting from node 2's netns.
struct HandMadeClient {
    netns: Netns,
    config: Arc<rustls::ClientConfig>,
}

impl HandMadeClient {
    fn new(t: &TestLab, ca: &dyn CertificateAuthority, td: &str, expected: &str) -> Self {
        Self::with_lifetime(t, ca, td, expected, Duration::from_secs(3600))
    }

    fn with_lifetime(
        t: &TestLab,
        ca: &dyn CertificateAuthority,
        td: &str,
        expected: &str,
        lifetime: Duration,
    ) -> Self {
        let lab_ca = PluginCa::load(&t.dir.join("ca"), "cluster.local").unwrap();
        let me = Identity::new(td, "default", "tester");
        let cert = ca.issue(&me, lifetime).unwrap();
        let expected = Identity::parse(expected).unwrap();
        let config = tls::client_config(
            &cert,
            &lab_ca.roots(),
            &[expected],
            tls::CompliancePolicy::Default,
        )
        .unwrap();
        Self {
            netns: Netns::open(&t.lab.netns_path("n2")).unwrap(),
            config,
        }
    }

    /// Sends one request on a fresh connection to pod c's port 15008; the status, or the error.
    fn request(&self, method: http::Method, authority: &str) -> Result<u16, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let hbone: SocketAddr = format!("{}:15008", pod("c").ip).parse().unwrap();
            let fut = async {
                let tcp = connect_tcp(&self.netns, hbone, Duration::from_secs(5))
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                let tls = tokio_rustls::TlsConnector::from(self.config.clone())
                    .connect(tls::dummy_server_name(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                let (mut sender, conn) = h2::client::handshake(tls)
                    .await
                    .map_err(|e| format!("h2: {e}"))?;
                tokio::spawn(conn);
                let uri = if method == http::Method::CONNECT {
                    authority.to_owned()
                } else {
                    format!("https://{authority}/")
                };
                let req = http::Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(())
                    .unwrap();
                let (resp, _send) = sender
                    .send_request(req, false)
                    .map_err(|e| format!("send: {e}"))?;
                let resp = resp.await.map_err(|e| format!("response: {e}"))?;
                Ok(resp.status().as_u16())
            };
            tokio::time::timeout(Duration::from_secs(10), fut)
                .await
                .unwrap_or_else(|_| Err("hung".into()))
        })
    }
}

#[test]
fn the_hbone_server_answers_like_ztunnel_and_checks_the_client() {
    let t = TestLab::start(&["a", "c"]);
    let lab_ca = PluginCa::load(&t.dir.join("ca"), "cluster.local").unwrap();
    let web = "spiffe://cluster.local/ns/default/sa/web";
    let c = pod("c").ip;
    let client = HandMadeClient::new(&t, &lab_ca, "cluster.local", web);

    assert_eq!(
        client.request(http::Method::CONNECT, &format!("{c}:8080")),
        Ok(200)
    );
    assert_eq!(
        client.request(http::Method::GET, &format!("{c}:8080")),
        Ok(400),
        "not CONNECT"
    );
    let d = pod("d").ip;
    assert_eq!(
        client.request(http::Method::CONNECT, &format!("{d}:8080")),
        Ok(400),
        "authority is not c's"
    );
    assert_eq!(
        client.request(http::Method::CONNECT, &format!("{c}:9999")),
        Ok(503),
        "nothing listens"
    );
    assert_eq!(
        client.request(http::Method::CONNECT, &format!("{c}:15008")),
        Ok(503),
        "tunnel port"
    );

    // A client certificate from another CA, or another trust domain, is refused; so is a
    // server that does not present the expected identity.
    let foreign = BuiltinCa::generate("cluster.local").unwrap();
    let r = HandMadeClient::new(&t, &foreign, "cluster.local", web)
        .request(http::Method::CONNECT, &format!("{c}:8080"));
    assert!(r.is_err(), "client cert from another CA accepted: {r:?}");
    let r = HandMadeClient::new(&t, &lab_ca, "other.domain", web)
        .request(http::Method::CONNECT, &format!("{c}:8080"));
    assert!(
        r.is_err(),
        "client from another trust domain accepted: {r:?}"
    );
    let r = HandMadeClient::new(
        &t,
        &lab_ca,
        "cluster.local",
        "spiffe://cluster.local/ns/default/sa/other",
    )
    .request(http::Method::CONNECT, &format!("{c}:8080"));
    assert!(r.is_err(), "server with the wrong identity accepted: {r:?}");

    // A client whose certificate has expired is refused, and the server says why.
    let expiring =
        HandMadeClient::with_lifetime(&t, &lab_ca, "cluster.local", web, Duration::from_secs(1));
    std::thread::sleep(Duration::from_secs(2));
    let r = expiring.request(http::Method::CONNECT, &format!("{c}:8080"));
    assert!(
        r.is_err(),
        "an expired client certificate was accepted: {r:?}"
    );
    t.wait_log("n2", "expired", 1);
}

#[test]
fn strict_mode_refuses_plaintext_and_permissive_accepts_it() {
    let t = TestLab::start(&["a", "c"]);
    // Both families: sk_lookup takes inbound IPv6 to c's IPv6 address to the tunnel's IPv6
    // plaintext listener as it takes IPv4 to the IPv4 one.
    let urls = common::both_ips("c").map(|c| http_url(c, 8080));
    // b is outside the mesh: its plaintext reaches c in permissive mode...
    for url in &urls {
        assert_ok(
            &t.curl("b", url),
            &format!("plaintext b → {url}, permissive"),
        );
        let accepted = format!(
            "captured inbound connection original_dst={}",
            url.trim_start_matches("http://").trim_end_matches('/')
        );
        t.wait_log("n2", &accepted, 1);
    }
    // ...and not in strict mode, while a's HBONE still does.
    let strict = t.lab.config_yaml_with(&LabConfig {
        mtls_mode: "strict",
        ..LabConfig::default()
    });
    let before = ["n1", "n2"].map(|n| t.log(n).matches("config applied").count());
    ambit_lab::write_atomically(&t.config, &strict).unwrap();
    t.wait_log("n1", "config applied", before[0] + 1);
    t.wait_log("n2", "config applied", before[1] + 1);
    for (i, url) in urls.iter().enumerate() {
        let out = t.curl("b", url);
        assert!(
            !out.status.success() || stdout(&out).is_empty(),
            "plaintext to {url} accepted in strict mode"
        );
        t.wait_log("n2", "plaintext inbound refused: strict mTLS", i + 1);
        let out = t.curl("a", url);
        assert!(
            out.status.success(),
            "HBONE a → {url}, strict: {}\n--- n1 ---\n{}\n--- n2 ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            t.log("n1"),
            t.log("n2")
        );
    }
}

/// A new connection's first bytes travel with its CONNECT, not one round trip after it: node 2
/// is replaced by a stand-in HBONE server (the lab CA's certificate for pod c) that waits for
/// the stream's first DATA before it answers 200. Had node 1 waited for the 200 before sending
/// the app's bytes, the stand-in would time out empty-handed.
#[test]
fn a_new_connection_sends_the_apps_first_bytes_with_its_connect() {
    let mut t = TestLab::start(&["a", "c"]);
    t.lab.stop("ambit node n2").unwrap();
    let c = pod("c").ip;
    let hbone: SocketAddr = format!("{c}:15008").parse().unwrap();
    let lab_ca = PluginCa::load(&t.dir.join("ca"), "cluster.local").unwrap();
    let web = Identity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let config = tls::server_config(
        &lab_ca.issue(&web, Duration::from_secs(3600)).unwrap(),
        &lab_ca.roots(),
        tls::CompliancePolicy::Default,
    )
    .unwrap();
    // Bound in pod c's netns, where node 2's HBONE listener was (it let go when it stopped).
    let netns = Netns::open(&t.lab.netns_path("c")).unwrap();
    let socket = netns.socket(socket2::Domain::IPV4).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&hbone.into()).unwrap();
    socket.listen(16).unwrap();
    let stand_in = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(socket.into()).unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(config)
                .accept(tcp)
                .await
                .unwrap();
            let mut h2 = ambit::hbone::HboneSettings::default()
                .h2_server()
                .handshake::<_, bytes::Bytes>(tls)
                .await
                .unwrap();
            let (request, mut respond) = h2.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while h2.accept().await.is_some() {} });
            let mut body = request.into_body();
            let before_answer = tokio::time::timeout(Duration::from_secs(3), body.data())
                .await
                .ok()
                .flatten()
                .map(|data| data.unwrap());
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            // Echo what came before the answer, then end the stream.
            let echo = before_answer.clone().unwrap_or_default();
            send.send_data(echo, true).unwrap();
            // Let h2 flush before the runtime ends.
            tokio::time::sleep(Duration::from_millis(300)).await;
            before_answer
        })
    });

    let out = t
        .lab
        .pod_command("a", "python3")
        .args([
            "-c",
            "import socket,sys\n\
             s = socket.create_connection((sys.argv[1], 9000), timeout=10)\n\
             s.sendall(b'first bytes')\n\
             got = b''\n\
             while True:\n\
             \x20   chunk = s.recv(100)\n\
             \x20   if not chunk: break\n\
             \x20   got += chunk\n\
             print(got.decode())",
            c,
        ])
        .output()
        .unwrap();
    let before_answer = stand_in.join().unwrap();
    assert_eq!(
        before_answer.as_deref(),
        Some(&b"first bytes"[..]),
        "the app's first bytes did not reach the server before its answer"
    );
    assert_ok(&out, "the app's connection");
    assert_eq!(
        stdout(&out).trim(),
        "first bytes",
        "the echo through the tunnel"
    );
    t.wait_log("n1", "captured outbound connection", 1);
}

/// `--hbone-max-requests-per-connection 1`: every tunneled connection does its own TLS
/// handshake (the benchmark's way to price a handshake), and each retired HBONE connection
/// closes once its stream ends instead of idling in the pool.
#[test]
fn a_connection_limit_retires_pooled_connections_and_closes_them() {
    let t = TestLab::start_with(
        &LabConfig::default(),
        &["--hbone-max-requests-per-connection", "1"],
    );
    let c = pod("c").ip;
    for n in 1..=5 {
        let out = t.curl("a", &format!("http://{c}:8080/"));
        assert_ok(&out, &format!("curl a → c #{n}"));
        assert_eq!(stdout(&out), "hello from pod c\n");
    }
    let opened = t.log("n1").matches("HBONE connection established").count();
    assert_eq!(opened, 5, "one HBONE connection per tunneled connection");
    // From pod a's netns (where the client's sockets live): no HBONE connection stays open.
    ambit_lab::wait_until(
        Duration::from_secs(10),
        "retired HBONE connections closed",
        || {
            let out = t
                .lab
                .run_in_pod(
                    "a",
                    "ss",
                    &["-Htn", "state", "established", "dport", "= :15008"],
                )
                .unwrap();
            stdout(&out).trim().is_empty()
        },
    )
    .unwrap();
}
