//! Interoperability with Istio's ztunnel, the reference HBONE peer: one side of the lab is an
//! Ambit node (n1) with pod a enrolled, the other is pod c running ztunnel in dedicated mode
//! (its own iptables capture, as Istio's dedicated mode has it). Both take ztunnel's test CA,
//! so both chain to one root. Every test runs both directions: Ambit client → ztunnel server
//! (a → c) and ztunnel client → Ambit server (c → a).
//!
//! Skipped (with a line on stderr) when no ztunnel is found: see `ambit_lab::Ztunnel::find`.
//! `cargo xtask test` says whether the suite ran.

mod common;

use std::{fs, path::PathBuf, time::Duration};

use ambit_lab::{
    pod, split_mesh_and_pods, wait_until, without_ambit_section, Lab, Ztunnel, ZtunnelPod,
    ZtunnelSource, WEB_VIP,
};
use common::{assert_ok, stdout, tool, LabSetup, TestLab, AMBIT};

/// The VIP of the `sleep` service (port 80 → pod a's 8080), for the ztunnel → Ambit direction.
const SLEEP_VIP: &str = "10.96.0.11";
const A_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const C_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
/// Pod ports: sink.py (checksummed transfers), echo.py (short connections), halfclose.py.
const SINK: u16 = 9000;
const ECHO: u16 = 9001;
const HALF_CLOSE: u16 = 9002;

/// The ztunnel to test against, or None (and why, on stderr).
fn ztunnel() -> Option<Ztunnel> {
    match Ztunnel::find() {
        Ok(z) => Some(z),
        Err(why) => {
            eprintln!("interop test skipped: {why}");
            None
        }
    }
}

/// One direction of the lab: who connects to whom.
#[derive(Debug, Clone, Copy)]
struct Direction {
    client: &'static str,
    server: &'static str,
    /// The server pod's service VIP (port 80).
    vip: &'static str,
    client_id: &'static str,
    server_id: &'static str,
}

impl Direction {
    fn server_ip(&self) -> &'static str {
        pod(self.server).ip
    }

    /// Whether Ambit is the client side.
    fn ambit_client(&self) -> bool {
        self.client == "a"
    }
}

const AMBIT_TO_ZTUNNEL: Direction = Direction {
    client: "a",
    server: "c",
    vip: WEB_VIP,
    client_id: A_ID,
    server_id: C_ID,
};
const ZTUNNEL_TO_AMBIT: Direction = Direction {
    client: "c",
    server: "a",
    vip: SLEEP_VIP,
    client_id: C_ID,
    server_id: A_ID,
};
const BOTH_WAYS: [Direction; 2] = [AMBIT_TO_ZTUNNEL, ZTUNNEL_TO_AMBIT];

/// The mesh both sides share, in ztunnel's local config format: a (`sleep`, on n1) and c
/// (`web`, on n2) speak HBONE, each behind a service VIP; `policies` is a YAML list. The trust
/// domain is explicit: without it ztunnel's local config leaves it empty and its test CA
/// issues `spiffe:///ns/default/sa/web`, which no verifier (Ambit's or ztunnel's) accepts.
fn mesh_yaml(lab: &Lab, policies: &str) -> String {
    let (a, c) = (pod("a"), pod("c"));
    format!(
        r#"workloads:
- uid: lab//v1/Pod/default/a
  name: a
  namespace: default
  serviceAccount: sleep
  trustDomain: cluster.local
  workloadName: sleep
  workloadType: deployment
  canonicalName: sleep
  canonicalRevision: v1
  workloadIps: ["{a_ip}"]
  protocol: HBONE
  node: {n1}
  services:
    "default/sleep.default.svc.cluster.local":
      80: 8080
- uid: lab//v1/Pod/default/c
  name: c
  namespace: default
  serviceAccount: web
  trustDomain: cluster.local
  workloadName: web
  workloadType: deployment
  canonicalName: web
  canonicalRevision: v1
  workloadIps: ["{c_ip}"]
  protocol: HBONE
  node: {n2}
  services:
    "default/web.default.svc.cluster.local":
      80: 8080
services:
- name: web
  namespace: default
  hostname: web.default.svc.cluster.local
  vips: ["/{web_vip}"]
  ports:
    80: 8080
- name: sleep
  namespace: default
  hostname: sleep.default.svc.cluster.local
  vips: ["/{sleep_vip}"]
  ports:
    80: 8080
policies: {policies}
"#,
        a_ip = a.ip,
        c_ip = c.ip,
        n1 = lab.node_name("n1"),
        n2 = lab.node_name("n2"),
        web_vip = WEB_VIP,
        sleep_vip = SLEEP_VIP,
    )
}

/// Ambit's config: the mesh plus its `ambit` section (pod a enrolled).
fn ambit_yaml(lab: &Lab, policies: &str) -> String {
    format!(
        "{}ambit:\n  pods:\n  - workload: default/a\n    netns: {}\n    cgroup: {}\n    \
         dataplaneMode: ambient\n",
        mesh_yaml(lab, policies),
        lab.netns_path("a").display(),
        lab.pod_cgroup_rel("a"),
    )
}

/// Which CA Ambit's node takes.
#[derive(Clone, Copy, PartialEq)]
enum AmbitCa {
    /// ztunnel's test CA, as an Istio plug-in CA: both chain to one root.
    Ztunnel,
    /// A root of Ambit's own (`ambit ca init`): another root than ztunnel's.
    Foreign,
}

/// The lab: Ambit on n1 (pod a enrolled), ztunnel in pod c, servers in both pods.
struct Interop {
    t: TestLab,
    ztunnel: Ztunnel,
    ztunnel_config: PathBuf,
    ztunnel_log: PathBuf,
    ztunnel_compliance: &'static str,
    ztunnel_starts: usize,
}

impl Interop {
    fn start(
        ztunnel: Ztunnel,
        ca: AmbitCa,
        node_args: &[&str],
        ztunnel_compliance: &'static str,
    ) -> Interop {
        let zt = ztunnel.clone();
        let mut t = TestLab::start_custom(LabSetup {
            config: &|lab| ambit_yaml(lab, "[]"),
            ca: &|lab, dir| match ca {
                AmbitCa::Ztunnel => zt.write_plugin_ca(dir),
                AmbitCa::Foreign => lab.init_ca(std::path::Path::new(AMBIT), dir),
            },
            http_pods: &["a", "c"],
            nodes: &["n1"],
            node_args,
        });
        for p in ["a", "c"] {
            t.start_sink(p, SINK);
            let mut echo = t.lab.pod_command(p, "python3");
            echo.arg(tool("echo.py")).arg(ECHO.to_string());
            t.lab.spawn(&format!("echo in {p}"), echo).unwrap();
            t.lab.wait_listening(p, ECHO, "echo listening").unwrap();
        }
        let ztunnel_config = t.dir.join("ztunnel.yaml");
        let mut interop = Interop {
            ztunnel,
            ztunnel_log: t.dir.join("ztunnel.log"),
            ztunnel_config,
            ztunnel_compliance,
            ztunnel_starts: 0,
            t,
        };
        interop.start_ztunnel("[]");
        interop
    }

    /// (Re)starts ztunnel with `policies`. ztunnel reads its local config file only at start,
    /// so a policy change on its side means a restart.
    fn start_ztunnel(&mut self, policies: &str) {
        if self.ztunnel_starts > 0 {
            self.t.lab.stop_ztunnel("c").unwrap();
        }
        self.ztunnel_starts += 1;
        self.ztunnel_log = self
            .t
            .dir
            .join(format!("ztunnel-{}.log", self.ztunnel_starts));
        fs::write(
            &self.ztunnel_config,
            without_ambit_section(&mesh_yaml(&self.t.lab, policies)),
        )
        .unwrap();
        let spec = ZtunnelPod {
            pod: "c",
            namespace: "default",
            service_account: "web",
            source: ZtunnelSource::LocalConfig(&self.ztunnel_config),
            log: &self.ztunnel_log,
            worker_threads: 1,
            compliance_policy: self.ztunnel_compliance,
        };
        self.t.lab.start_ztunnel(&self.ztunnel, &spec).unwrap();
    }

    fn ztunnel_log(&self) -> String {
        fs::read_to_string(&self.ztunnel_log).unwrap_or_default()
    }

    fn ambit_log(&self) -> String {
        self.t.log("n1")
    }

    /// Both logs, for failure messages.
    fn logs(&self) -> String {
        format!(
            "--- Ambit (n1) ---\n{}\n--- ztunnel (pod c) ---\n{}",
            self.ambit_log(),
            self.ztunnel_log()
        )
    }

    /// Waits until ztunnel's log has `needle` `count` times.
    fn wait_ztunnel_log(&self, needle: &str, count: usize) {
        if let Err(e) = wait_until(Duration::from_secs(10), needle, || {
            self.ztunnel_log().matches(needle).count() >= count
        }) {
            panic!("{e}\n{}", self.logs());
        }
    }

    /// curl from the client pod; the body, or the error.
    fn get(&self, client: &str, url: &str) -> Result<String, String> {
        let out = self.t.curl(client, url);
        if out.status.success() {
            Ok(stdout(&out))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    fn python(&self, pod: &str, script: &str, args: &[&str]) -> String {
        let out = self
            .t
            .lab
            .pod_command(pod, "python3")
            .arg(tool(script))
            .args(args)
            .output()
            .unwrap();
        assert_ok(
            &out,
            &format!("{script} {args:?} in pod {pod}\n{}", self.logs()),
        );
        stdout(&out).trim().to_owned()
    }
}

/// Everything a client app does over the mesh, one direction at a time.
fn traffic_both_ways(ztunnel_compliance: &'static str, node_args: &[&str]) {
    let Some(zt) = ztunnel() else { return };
    let mut i = Interop::start(zt, AmbitCa::Ztunnel, node_args, ztunnel_compliance);
    for (p, port) in [("a", HALF_CLOSE), ("c", HALF_CLOSE)] {
        let log = i.t.dir.join(format!("halfclose-{p}.out"));
        let mut server = i.t.lab.pod_command(p, "python3");
        server
            .arg(tool("halfclose.py"))
            .args(["server", &port.to_string()])
            .stdout(fs::File::create(&log).unwrap());
        i.t.lab.spawn(&format!("halfclose in {p}"), server).unwrap();
        i.t.lab
            .wait_listening(p, port, "halfclose listening")
            .unwrap();
    }
    for d in BOTH_WAYS {
        let what = format!("{} → {}", d.client, d.server);
        let hello = format!("hello from pod {}\n", d.server);

        // HTTP by pod IP and through the service VIP.
        let by_ip = i.get(d.client, &format!("http://{}:8080/", d.server_ip()));
        assert_eq!(
            by_ip.as_deref(),
            Ok(hello.as_str()),
            "{what} by IP\n{}",
            i.logs()
        );
        let by_vip = i.get(d.client, &format!("http://{}/", d.vip));
        assert_eq!(
            by_vip.as_deref(),
            Ok(hello.as_str()),
            "{what} by VIP\n{}",
            i.logs()
        );

        // 1 GiB checksummed; the client half-closes and reads the server's digest after.
        let (sent, received) = i.t.send(d.client, d.server_ip(), SINK, 1 << 30);
        assert_eq!(
            received,
            sent,
            "{what}: 1 GiB arrived altered\n{}",
            i.logs()
        );
        assert!(sent.starts_with("1073741824 "), "{sent}");

        // The server half-closes first; the client's direction stays open and delivers.
        let line = i.python(
            d.client,
            "halfclose.py",
            &["client", d.server_ip(), &HALF_CLOSE.to_string(), "100000"],
        );
        let (greeting, sent) = line.split_once(" sent=").unwrap();
        assert!(greeting.starts_with("greeting=hello "), "{what}: {line}");
        let out = i.t.dir.join(format!("halfclose-{}.out", d.server));
        wait_until(
            Duration::from_secs(10),
            "half-closed server's digest",
            || fs::read_to_string(&out).unwrap_or_default().contains(sent),
        )
        .unwrap_or_else(|e| panic!("{what}: {e}: sent {sent}\n{}", i.logs()));

        // 1,000 short connections, 50 at a time.
        let churn = i.python(
            d.client,
            "churn.py",
            &[d.server_ip(), &ECHO.to_string(), "1000", "50"],
        );
        assert_eq!(churn, "ok 1000", "{what}");

        // 50 concurrent streams: one pooled HBONE connection carries them (Ambit's side
        // counts the connections it opens or accepts).
        let (opened, needle) = if d.ambit_client() {
            (
                "HBONE connection established",
                "HBONE connection established",
            )
        } else {
            ("HBONE connection accepted", "HBONE connection accepted")
        };
        let before = i.ambit_log().matches(needle).count();
        let many = i.python(
            d.client,
            "many.py",
            &[d.server_ip(), &SINK.to_string(), "50"],
        );
        assert_eq!(many, "ok 50", "{what}");
        let new = i.ambit_log().matches(needle).count() - before;
        assert!(
            new <= 1,
            "{what}: {new} new HBONE connections ({opened}) for 50 streams"
        );
    }
    for d in BOTH_WAYS {
        identities_in_access_logs(&i, d);
        metrics_agree(&i, d);
    }
    // The key exchange each pooled connection agreed on (X25519 unless post-quantum only).
    let kx = if ztunnel_compliance == "pqc" {
        "X25519MLKEM768"
    } else {
        "X25519"
    };
    for needle in ["HBONE connection established", "HBONE connection accepted"] {
        let log = i.ambit_log();
        let agreed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(needle))
            .filter_map(|l| l.split(" kx=").nth(1)?.split_whitespace().next())
            .collect();
        assert!(
            !agreed.is_empty() && agreed.iter().all(|g| *g == kx),
            "{needle}: key exchanges {agreed:?}, expected {kx} on all"
        );
    }
}

#[test]
fn traffic_flows_both_ways_between_ambit_and_ztunnel() {
    traffic_both_ways("", &[]);
}

/// Each side's access log names both peers by their proven identities.
fn identities_in_access_logs(i: &Interop, d: Direction) {
    let ambit = format!("src.identity={} ", d.client_id);
    let ambit_dst = format!("dst.identity={} ", d.server_id);
    let found = i
        .ambit_log()
        .lines()
        .any(|l| l.contains("connection complete") && l.contains(&ambit) && l.contains(&ambit_dst));
    assert!(
        found,
        "{d:?}: no Ambit access log line with {ambit}{ambit_dst}\n{}",
        i.logs()
    );
    let zt = format!("src.identity=\"{}\"", d.client_id);
    let zt_dst = format!("dst.identity=\"{}\"", d.server_id);
    let found = i
        .ztunnel_log()
        .lines()
        .any(|l| l.contains("connection complete") && l.contains(&zt) && l.contains(&zt_dst));
    assert!(
        found,
        "{d:?}: no ztunnel access log line with {zt} {zt_dst}\n{}",
        i.logs()
    );
}

/// One Prometheus sample: its labels and value.
type Sample = (std::collections::BTreeMap<String, String>, u64);

/// The samples of metric `name` in a Prometheus text.
fn samples(text: &str, name: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let labels = labels
                .split("\",")
                .filter_map(|pair| {
                    let (k, v) = pair.split_once("=\"")?;
                    Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// Labels that only the source side can know: the destination side of an HBONE connection
/// does not learn which service VIP the client dialled (neither ztunnel nor Ambit puts it in
/// the metrics), so both report `unknown` there.
const SOURCE_ONLY: [&str; 3] = [
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
];

/// Metrics parity for one direction: the client side's `reporter="source"` series and the
/// server side's `reporter="destination"` series of the same connections carry the same label
/// names (ztunnel's whole set) and values, and count the same connections and bytes.
fn metrics_agree(i: &Interop, d: Direction) {
    let of_direction = |text: &str, name: &str, reporter: &str| -> Vec<Sample> {
        samples(text, name)
            .into_iter()
            .filter(|(l, _)| {
                l.get("reporter").map(String::as_str) == Some(reporter)
                    && l.get("source_principal").map(String::as_str) == Some(d.client_id)
                    && l.get("destination_principal").map(String::as_str) == Some(d.server_id)
            })
            .collect()
    };
    let sides = || {
        let ambit = i.t.metrics("n1");
        let ztunnel = i.t.lab.ztunnel_metrics("c").unwrap();
        if d.ambit_client() {
            (ambit, ztunnel)
        } else {
            (ztunnel, ambit)
        }
    };
    let total = |s: &[Sample]| s.iter().map(|(_, v)| v).sum::<u64>();
    // Counters move when connections close, each side on its own: wait until both agree.
    let opened = "istio_tcp_connections_opened_total";
    let closed = "istio_tcp_connections_closed_total";
    let settled = wait_until(
        Duration::from_secs(10),
        "both sides' counters settled",
        || {
            let (client, server) = sides();
            let counts = [
                total(&of_direction(&client, opened, "source")),
                total(&of_direction(&client, closed, "source")),
                total(&of_direction(&server, opened, "destination")),
                total(&of_direction(&server, closed, "destination")),
            ];
            counts[0] > 0 && counts.iter().all(|c| *c == counts[0])
        },
    );
    let (client, server) = sides();
    let context = || format!("{d:?}\n--- client side ---\n{client}\n--- server side ---\n{server}");
    settled.unwrap_or_else(|e| panic!("{e}: {}", context()));

    let project = |samples: &[Sample]| -> std::collections::BTreeSet<Vec<(String, String)>> {
        samples
            .iter()
            .map(|(l, _)| {
                l.iter()
                    .filter(|(k, _)| *k != "reporter" && !SOURCE_ONLY.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .collect()
    };
    for name in [
        opened,
        closed,
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        let (c, s) = (
            of_direction(&client, name, "source"),
            of_direction(&server, name, "destination"),
        );
        assert_eq!(
            project(&c),
            project(&s),
            "{name}: label values differ: {}",
            context()
        );
        assert_eq!(total(&c), total(&s), "{name}: totals differ: {}", context());
        let names = |samples: &[Sample]| -> std::collections::BTreeSet<String> {
            samples
                .iter()
                .flat_map(|(l, _)| l.keys().cloned())
                .collect()
        };
        assert_eq!(
            names(&c),
            names(&s),
            "{name}: label names differ: {}",
            context()
        );
    }
    // The workload labels are the owners' names, not the pods'.
    let (client_name, server_name) = match d.client {
        "a" => ("sleep", "web"),
        _ => ("web", "sleep"),
    };
    let received = of_direction(&client, "istio_tcp_received_bytes_total", "source");
    assert!(
        received
            .iter()
            .all(|(l, _)| l["source_workload"] == client_name
                && l["destination_workload"] == server_name
                && l["connection_security_policy"] == "mutual_tls"
                && l["response_flags"] == "-"),
        "{}",
        context()
    );
    // The client side names the service it dialled by VIP (and its namespace and name).
    let by_vip = received
        .iter()
        .find(|(l, _)| l["destination_service"] != "unknown")
        .unwrap_or_else(|| panic!("no series with the VIP's service: {}", context()));
    assert_eq!(
        by_vip.0["destination_service"],
        format!("{server_name}.default.svc.cluster.local")
    );
    assert_eq!(by_vip.0["destination_service_name"], server_name);
    assert_eq!(by_vip.0["destination_service_namespace"], "default");
}

/// `policies:` denying a principal, scoped to the namespace (ztunnel's local format).
fn deny(principal_id: &str) -> String {
    let principal = principal_id.trim_start_matches("spiffe://");
    format!(
        "\n- name: deny-peer\n  namespace: default\n  scope: Namespace\n  action: Deny\n  \
         dryRun: false\n  rules:\n  - - - principals: [!Exact {principal}]\n"
    )
}

/// An AuthorizationPolicy on each side denying the other's principal: the connection is
/// refused at the destination with the reason in both logs, and works again once the policy
/// is gone. Ambit applies its config file live; ztunnel reads its local file only at start,
/// so its side restarts.
#[test]
fn each_side_enforces_a_deny_policy_on_the_others_principal() {
    let Some(zt) = ztunnel() else { return };
    let mut i = Interop::start(zt, AmbitCa::Ztunnel, &[], "");
    let a_url = format!("http://{}:8080/", pod("a").ip);
    let c_url = format!("http://{}:8080/", pod("c").ip);

    // Ambit (destination a) denies c's principal.
    i.t.write_config(&ambit_yaml(&i.t.lab, &deny(C_ID)), &["n1"]);
    assert!(
        i.get("c", &a_url).is_err(),
        "c → a despite Ambit's deny\n{}",
        i.logs()
    );
    i.t.wait_log("n1", "HBONE request denied by policy", 1);
    let denied = i.ambit_log();
    assert!(
        denied.contains("policy=\"default/deny-peer\"") && denied.contains("status=401"),
        "Ambit's log does not name the policy\n{}",
        i.logs()
    );
    // ztunnel, the client here, logs the answer in its access log.
    i.wait_ztunnel_log("http status: 401 Unauthorized", 1);
    let ztunnel = i.ztunnel_log();
    let line = ztunnel
        .lines()
        .find(|l| l.contains("401 Unauthorized"))
        .unwrap();
    assert!(line.contains(&format!("dst.identity=\"{A_ID}\"")), "{line}");
    i.t.write_config(&ambit_yaml(&i.t.lab, "[]"), &["n1"]);
    assert_eq!(i.get("c", &a_url).as_deref(), Ok("hello from pod a\n"));

    // ztunnel (destination c) denies a's principal.
    i.start_ztunnel(&deny(A_ID));
    assert!(
        i.get("a", &c_url).is_err(),
        "a → c despite ztunnel's deny\n{}",
        i.logs()
    );
    i.wait_ztunnel_log("policy rejection", 1);
    // Ambit's access line comes when the refused connection closes, a moment after ztunnel's.
    i.t.wait_log("n1", "answered 401 Unauthorized", 1);
    let line = i
        .ambit_log()
        .lines()
        .rfind(|l| l.contains("connection complete") && l.contains("dst.addr=10.201.2.2:8080"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains("401"),
        "Ambit's access log does not say 401: {line}\n{}",
        i.logs()
    );
    i.start_ztunnel("[]");
    assert_eq!(i.get("a", &c_url).as_deref(), Ok("hello from pod c\n"));
}

/// A peer whose certificate chains to another root, or names another trust domain, is
/// refused by both Ambit and ztunnel, in both directions, and both logs say why.
#[test]
fn a_foreign_root_or_trust_domain_is_refused_by_both() {
    let Some(zt) = ztunnel() else { return };
    let a_url = format!("http://{}:8080/", pod("a").ip);
    let c_url = format!("http://{}:8080/", pod("c").ip);
    for (ca, trust_domain, what) in [
        (AmbitCa::Foreign, None, "another root"),
        (
            AmbitCa::Ztunnel,
            Some("other.local"),
            "another trust domain",
        ),
    ] {
        let i = Interop::start(zt.clone(), ca, &[], "");
        if let Some(td) = trust_domain {
            // Pod a's identity in Ambit's config only: ztunnel still expects cluster.local.
            let text = ambit_yaml(&i.t.lab, "[]").replacen(
                "trustDomain: cluster.local",
                &format!("trustDomain: {td}"),
                1,
            );
            i.t.write_config(&text, &["n1"]);
        }
        // Ambit as client: it refuses ztunnel's certificate (or ztunnel refuses Ambit's).
        assert!(
            i.get("a", &c_url).is_err(),
            "a → c with {what}\n{}",
            i.logs()
        );
        // ztunnel as client.
        assert!(
            i.get("c", &a_url).is_err(),
            "c → a with {what}\n{}",
            i.logs()
        );
        // Each side says why, as client and as server (logs are written as the handshakes
        // end, which may be just after curl saw its reset).
        let refused = |log: &dyn Fn() -> String, needle: &str| {
            wait_until(Duration::from_secs(10), needle, || log().contains(needle))
                .unwrap_or_else(|e| panic!("{what}: {e}\n{}", i.logs()));
        };
        let ambit = || i.ambit_log();
        let ztunnel = || i.ztunnel_log();
        if trust_domain.is_none() {
            // Each refuses the other's root, as client and as server.
            refused(&ambit, "UnknownIssuer"); // Ambit, client: ztunnel's certificate
            refused(&ztunnel, "AlertReceived(UnknownCA)"); // ztunnel, server: Ambit's alert
            refused(&ztunnel, "invalid peer certificate: UnknownIssuer"); // ztunnel, client
            refused(&ambit, "TLS handshake: received fatal alert: UnknownCA"); // Ambit, server
        } else {
            // ztunnel, server: Ambit's client identity is outside its trust domain.
            refused(&ztunnel, "SanTrustDomainError");
            // ztunnel, client: Ambit's server identity is not the one it expects.
            refused(&ztunnel, "identity verification error");
            // Ambit, server: ztunnel's client identity is outside a's trust domain (ztunnel
            // aborted first, so Ambit sees its alert).
            refused(&ambit, "HBONE connection failed error=TLS handshake");
        }
        // Ambit, client: the failed connection is in its access log, and in its metrics as
        // failed. In TLS 1.3 a server's refusal of the client certificate comes after the
        // client's handshake is done: Ambit reads it as the server's alert (TLS_FAILURE) or,
        // when ztunnel's reset wins the race, as a broken connection (CONNECT).
        let failed = "dst.addr=10.201.2.2:8080";
        wait_until(Duration::from_secs(10), "a's failed connection", || {
            i.ambit_log().lines().any(|l| {
                l.contains("connection complete")
                    && l.contains(failed)
                    && (l.contains("response_flags=\"TLS_FAILURE\"")
                        || l.contains("response_flags=\"CONNECT\""))
            })
        })
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", i.logs()));
    }
}

/// Post-quantum: ztunnel with `COMPLIANCE_POLICY=pqc` offers and accepts only
/// X25519MLKEM768. Ambit under the same policy meets it both ways (the whole traffic suite);
/// Ambit's default meets it too (it lists X25519MLKEM768 last, as ztunnel does).
#[test]
fn traffic_flows_both_ways_with_post_quantum_key_exchange() {
    traffic_both_ways("pqc", &["--compliance-policy", "pqc"]);
}

/// Ambit's default policy meets a post-quantum-only ztunnel both ways: the client's first key
/// share (X25519) is refused with a HelloRetryRequest and both settle on X25519MLKEM768.
#[test]
fn ambit_by_default_meets_a_post_quantum_only_ztunnel() {
    let Some(zt) = ztunnel() else { return };
    let i = Interop::start(zt, AmbitCa::Ztunnel, &[], "pqc");
    for d in BOTH_WAYS {
        let url = format!("http://{}:8080/", d.server_ip());
        let hello = format!("hello from pod {}\n", d.server);
        assert_eq!(
            i.get(d.client, &url).as_deref(),
            Ok(hello.as_str()),
            "{d:?}\n{}",
            i.logs()
        );
    }
    let log = i.ambit_log();
    for needle in ["HBONE connection established", "HBONE connection accepted"] {
        let line = log.lines().find(|l| l.contains(needle)).unwrap_or_default();
        assert!(line.contains("kx=X25519MLKEM768"), "{needle}: {line}");
    }
}

/// A policy istiod would push: deny port 9999 to every workload of namespace `default`.
const DENY_9999: &str = "[{name: deny-9999, namespace: default, scope: Namespace, action: Deny, \
                         rules: [[[{destinationPorts: [9999]}]]]}]";

/// The stand-in istiod (`ambit control-plane`) is trusted because the real client accepts it:
/// ztunnel, without its test CA and without a local config, takes its certificate from the
/// stand-in's CA and its workloads, services and policies from its delta xDS, and shows them
/// in `/config_dump`.
#[test]
fn ztunnel_takes_config_and_certificates_from_the_stand_in_istiod() {
    let Some(zt) = ztunnel() else { return };
    let mut t = TestLab::start_custom(LabSetup {
        config: &|lab| ambit_yaml(lab, "[]"),
        ca: &|lab, dir| lab.init_ca(std::path::Path::new(AMBIT), dir),
        http_pods: &["c"],
        nodes: &[],
        node_args: &[],
    });
    let mesh = t.dir.join("mesh.yaml");
    fs::write(&mesh, without_ambit_section(&mesh_yaml(&t.lab, DENY_9999))).unwrap();
    let stand_in = t.start_stand_in(&mesh);
    let ztunnel_log = t.dir.join("ztunnel.log");
    let spec = fed_by(&stand_in, &ztunnel_log);
    let logs = || {
        format!(
            "--- control plane ---\n{}\n--- ztunnel ---\n{}",
            stand_in.log(),
            fs::read_to_string(&ztunnel_log).unwrap_or_default()
        )
    };
    if let Err(e) = t.lab.start_ztunnel(&zt, &spec) {
        panic!(
            "ztunnel did not get ready with the stand-in istiod: {e:#}\n{}",
            logs()
        );
    }
    let config_dump = || {
        stdout(
            &t.lab
                .run_in_pod("c", "curl", &["-sS", "http://127.0.0.1:15000/config_dump"])
                .unwrap(),
        )
    };
    // ztunnel asks for its workload's certificate when a connection first needs it: one
    // request from c to its own service, through ztunnel.
    let _ = t.lab.run_in_pod(
        "c",
        "curl",
        &["-sS", "--max-time", "5", &format!("http://{WEB_VIP}/")],
    );
    let _ = wait_until(Duration::from_secs(10), "ztunnel's certificate", || {
        config_dump().contains(C_ID.trim_start_matches("spiffe://"))
    });
    let dump = config_dump();
    let dump: serde_json::Value = serde_json::from_str(&dump)
        .unwrap_or_else(|e| panic!("config_dump is not JSON ({e}): {dump}\n{}", logs()));
    let names = |key: &str, field: &str| -> Vec<String> {
        dump[key]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i[field].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut workloads = names("workloads", "name");
    workloads.sort();
    assert_eq!(workloads, ["a", "c"], "{dump:#}\n{}", logs());
    let mut services = names("services", "hostname");
    services.sort();
    assert_eq!(
        services,
        [
            "sleep.default.svc.cluster.local",
            "web.default.svc.cluster.local"
        ],
        "{dump:#}"
    );
    assert_eq!(names("policies", "name"), ["deny-9999"], "{dump:#}");
    let certificates = dump["certificates"].to_string();
    assert!(
        certificates.contains(C_ID),
        "ztunnel holds no certificate for {C_ID}: {certificates}\n{}",
        logs()
    );
    let control_plane = stand_in.log();
    assert!(
        control_plane.contains(&format!("certificate signed identity={C_ID}")),
        "{}",
        logs()
    );
    assert!(!control_plane.contains("NACK"), "{}", logs());
}

/// ztunnel in pod c (`web`), fed by the stand-in istiod, logging to `log`.
fn fed_by<'a>(stand_in: &'a common::StandIn, log: &'a std::path::Path) -> ZtunnelPod<'a> {
    ZtunnelPod {
        pod: "c",
        namespace: "default",
        service_account: "web",
        source: stand_in.ztunnel_source(),
        log,
        worker_threads: 1,
        compliance_policy: "",
    }
}

/// Ambit on n1 (pod a) and ztunnel in pod c, both fed only by one stand-in istiod serving
/// `mesh` (a mesh of `mesh_yaml`'s shape) and both holding certificates from its CA.
struct FedByIstiod {
    t: TestLab,
    stand_in: common::StandIn,
    n1_log: PathBuf,
    ztunnel_log: PathBuf,
}

impl FedByIstiod {
    fn start(zt: &Ztunnel, mesh: impl Fn(&Lab) -> String) -> FedByIstiod {
        let mut t = TestLab::start_custom(LabSetup {
            config: &|lab| ambit_yaml(lab, "[]"),
            ca: &|lab, dir| lab.init_ca(std::path::Path::new(AMBIT), dir),
            http_pods: &["a", "c"],
            nodes: &[],
            node_args: &[],
        });
        let (_, pods) = split_mesh_and_pods(&fs::read_to_string(&t.config).unwrap());
        let mesh_file = t.dir.join("mesh.yaml");
        fs::write(&mesh_file, mesh(&t.lab)).unwrap();
        let pods_file = t.dir.join("pods.yaml");
        fs::write(&pods_file, pods).unwrap();
        let stand_in = t.start_stand_in(&mesh_file);
        let n1_log = t.dir.join("n1.log");
        let args = stand_in.node_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        t.lab
            .start_node(
                std::path::Path::new(AMBIT),
                "n1",
                &pods_file,
                &n1_log,
                &args,
            )
            .unwrap();
        let ztunnel_log = t.dir.join("ztunnel.log");
        let spec = fed_by(&stand_in, &ztunnel_log);
        t.lab.start_ztunnel(zt, &spec).unwrap();
        FedByIstiod {
            t,
            stand_in,
            n1_log,
            ztunnel_log,
        }
    }

    fn logs(&self) -> String {
        format!(
            "--- Ambit (n1) ---\n{}\n--- ztunnel ---\n{}\n--- control plane ---\n{}",
            fs::read_to_string(&self.n1_log).unwrap_or_default(),
            fs::read_to_string(&self.ztunnel_log).unwrap_or_default(),
            self.stand_in.log()
        )
    }

    /// curl from `client` to `url`: the body, or a panic with every log.
    fn get(&self, client: &str, url: &str) -> String {
        let out = self
            .t
            .lab
            .run_in_pod(client, "curl", &["-sS", "--max-time", "10", url])
            .unwrap();
        assert!(
            out.status.success(),
            "{client} → {url}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        stdout(&out)
    }
}

/// Ambit and ztunnel, both fed only by the stand-in istiod and both holding certificates from
/// its CA (no test CA, no local config on either side), exchange traffic both ways.
#[test]
fn ambit_and_ztunnel_fed_by_one_stand_in_istiod_talk_both_ways() {
    let Some(zt) = ztunnel() else { return };
    let f = FedByIstiod::start(&zt, |lab| without_ambit_section(&mesh_yaml(lab, "[]")));
    for d in BOTH_WAYS {
        let body = f.get(d.client, &format!("http://{}:8080/", d.server_ip()));
        assert!(
            body.contains(&format!("hello from pod {}", d.server)),
            "{} → {}: {body}\n{}",
            d.client,
            d.server,
            f.logs()
        );
    }
    // Each side saw the other's identity, issued by the one CA.
    let ztunnel_text = fs::read_to_string(&f.ztunnel_log).unwrap();
    assert!(ztunnel_text.contains(A_ID), "{}", f.logs());
    let n1_text = fs::read_to_string(&f.n1_log).unwrap();
    assert!(
        n1_text.contains("certificate from istiod's CA"),
        "{}",
        f.logs()
    );
    assert!(n1_text.contains(C_ID), "{}", f.logs());
}

/// The waypoint: pod d, service account `waypoint`, behind the `waypoint` service.
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const WAYPOINT_HOST: &str = "waypoint.default.svc.cluster.local";
const WAYPOINT_VIP: &str = "10.96.0.12";

/// `mesh_yaml` with a waypoint in pod d in front of everything: of both services (by the
/// waypoint service's hostname) and of both workloads (by the waypoint's address), as istiod
/// says it when a namespace is labelled `istio.io/use-waypoint`.
fn mesh_with_waypoint(lab: &Lab) -> String {
    use serde_yaml::{Mapping, Value};
    let mut mesh: Value =
        serde_yaml::from_str(&without_ambit_section(&mesh_yaml(lab, "[]"))).unwrap();
    let by_address: Value = serde_yaml::from_str(&format!(
        "{{destination: \"/{}\", hboneMtlsPort: 15008}}",
        pod("d").ip
    ))
    .unwrap();
    let by_hostname: Value = serde_yaml::from_str(&format!(
        "{{destination: \"default/{WAYPOINT_HOST}\", hboneMtlsPort: 15008}}"
    ))
    .unwrap();
    let set = |list: &mut Value, waypoint: &Value| {
        for entry in list.as_sequence_mut().unwrap() {
            let entry: &mut Mapping = entry.as_mapping_mut().unwrap();
            entry.insert("waypoint".into(), waypoint.clone());
        }
    };
    set(&mut mesh["workloads"], &by_address);
    set(&mut mesh["services"], &by_hostname);
    let waypoint_workload: Value = serde_yaml::from_str(&format!(
        r#"
uid: lab//v1/Pod/default/waypoint
name: waypoint
namespace: default
serviceAccount: waypoint
trustDomain: cluster.local
workloadIps: ["{d_ip}"]
protocol: HBONE
node: {n2}
services:
  "default/{WAYPOINT_HOST}":
    15008: 15008
"#,
        d_ip = pod("d").ip,
        n2 = lab.node_name("n2"),
    ))
    .unwrap();
    let waypoint_service: Value = serde_yaml::from_str(&format!(
        r#"
name: waypoint
namespace: default
hostname: {WAYPOINT_HOST}
vips: ["/{WAYPOINT_VIP}"]
ports:
  15008: 15008
"#
    ))
    .unwrap();
    mesh["workloads"]
        .as_sequence_mut()
        .unwrap()
        .push(waypoint_workload);
    mesh["services"]
        .as_sequence_mut()
        .unwrap()
        .push(waypoint_service);
    serde_yaml::to_string(&mesh).unwrap()
}

/// A destination with a waypoint: Ambit sends its traffic to the waypoint with the CONNECT
/// ztunnel sends (compared against the real ztunnel's, to the same stand-in waypoint), and
/// accepts the waypoint's own tunnel to its pod, as ztunnel does. Service-addressed (the
/// service's waypoint, found by hostname) and workload-addressed (the workload's, by address).
#[test]
fn traffic_to_a_destination_with_a_waypoint_goes_through_it_as_ztunnel_sends_it() {
    let Some(zt) = ztunnel() else { return };
    let f = FedByIstiod::start(&zt, mesh_with_waypoint);
    let route = |server: &str, id: &str| common::waypoint::Route {
        target: format!("{}:8080", pod(server).ip).parse().unwrap(),
        identity: id.to_owned(),
    };
    let routes = [
        (format!("{WEB_VIP}:80"), route("c", C_ID)),
        (format!("{}:8080", pod("c").ip), route("c", C_ID)),
        (format!("{SLEEP_VIP}:80"), route("a", A_ID)),
        (format!("{}:8080", pod("a").ip), route("a", A_ID)),
    ];
    let waypoint = common::waypoint::StandInWaypoint::start(
        &f.t.lab.netns_path("d"),
        &f.t.dir.join("ca"),
        WAYPOINT_ID,
        routes.into_iter().collect(),
    )
    .unwrap();
    // Each client, to the other side's service VIP and to its pod's address: every request
    // goes through the waypoint (which the server's node proxy lets in) and is answered.
    for d in BOTH_WAYS {
        for url in [
            format!("http://{}/", d.vip),
            format!("http://{}:8080/", d.server_ip()),
        ] {
            let body = f.get(d.client, &url);
            assert!(
                body.contains(&format!("hello from pod {}", d.server)),
                "{} → {url}: {body}\n{}",
                d.client,
                f.logs()
            );
        }
    }
    let recorded = waypoint.recorded();
    let from = |client: &str, authority: String| {
        recorded
            .iter()
            .find(|r| r.client == client && r.authority == authority)
            .unwrap_or_else(|| {
                panic!(
                    "the waypoint got no CONNECT {authority} from {client}: {recorded:#?}\n{}",
                    f.logs()
                )
            })
            .clone()
    };
    // By service: the CONNECT names the VIP as dialled (untranslated).
    let ambit_svc = from(A_ID, format!("{WEB_VIP}:80"));
    let ztunnel_svc = from(C_ID, format!("{SLEEP_VIP}:80"));
    // By workload: the pod's address as dialled.
    let ambit_pod = from(A_ID, format!("{}:8080", pod("c").ip));
    let ztunnel_pod = from(C_ID, format!("{}:8080", pod("a").ip));
    assert_eq!(recorded.len(), 4, "{recorded:#?}");
    // The same headers, and the same shape of `forwarded`: the client's address, and the
    // service's hostname when a service was dialled.
    let names = |r: &common::waypoint::Recorded| r.headers.keys().cloned().collect::<Vec<_>>();
    for (ambit, ztunnel) in [(&ambit_svc, &ztunnel_svc), (&ambit_pod, &ztunnel_pod)] {
        assert_eq!(
            names(ambit),
            names(ztunnel),
            "Ambit's CONNECT {ambit:#?}\nztunnel's {ztunnel:#?}"
        );
        assert_eq!(
            forwarded_shape(ambit, "a"),
            forwarded_shape(ztunnel, "c"),
            "Ambit's CONNECT {ambit:#?}\nztunnel's {ztunnel:#?}"
        );
    }
    assert_eq!(
        forwarded_shape(&ambit_svc, "a"),
        "for=\"<client>\";host=<service>.default.svc.cluster.local"
    );
}

/// A CONNECT's `forwarded` header with what differs between two clients blanked out: the
/// client's address (`<client>`, its port dropped) and the service's name (`<service>`).
fn forwarded_shape(r: &common::waypoint::Recorded, client: &str) -> String {
    let forwarded = r.headers.get("forwarded").cloned().unwrap_or_default();
    forwarded
        .split(';')
        .map(|part| match part.split_once('=') {
            Some(("for", addr)) if addr.trim_matches('"').starts_with(pod(client).ip) => {
                "for=\"<client>\"".to_owned()
            }
            Some(("host", host)) => format!(
                "host={}",
                host.replacen("web.", "<service>.", 1)
                    .replacen("sleep.", "<service>.", 1)
            ),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(";")
}
