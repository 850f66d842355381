//! Pods run by a real containerd, driven over CRI as kubelet drives it (tests/common/cri.rs),
//! and a mesh pod's very first connection under it, with `ambit-cni` chained after the bridge
//! plugin and a real agent (tests/common/kube_agent.rs). Each test has a private containerd;
//! each checks that nothing of theirs is left on the host afterwards.
//!
//! Skipped (with a line on stderr) when containerd, runc, the CNI plugins or a static busybox
//! are missing: `cargo xtask setup` installs them.

mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use common::{
    cri::{api::ContainerState, Cri, Footprint},
    fake_api::fake_api,
    kube_agent::{added, deleted, modified, now_running, pending_pod, KubeAgent},
    AMBIT,
};
use serde_json::json;
use tokio::sync::broadcast;

/// A started harness, or None (and why, on stderr).
fn cri() -> Option<Cri> {
    if let Some(why) = Cri::unavailable() {
        eprintln!("containerd test skipped: {why}");
        return None;
    }
    Some(Cri::start().unwrap_or_else(|e| panic!("{e:#}")))
}

/// Drops the harness and asserts that it left nothing on the host.
fn assert_gone(cri: Cri) {
    let footprint: Footprint = cri.footprint();
    drop(cri);
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left on the host: {left:#?}");
}

/// Accepts one connection on `listener` within 20 s: reads a line, answers `hello <peer IP>`
/// and closes. Returns the peer and the line.
fn serve_once(listener: TcpListener) -> thread::JoinHandle<Result<(SocketAddr, String), String>> {
    thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut stream, peer) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("no connection from the pod within 20 s: {e}")),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .map_err(|e| format!("reading the pod's line: {e}"))?;
        writeln!(stream, "hello {}", peer.ip()).map_err(|e| e.to_string())?;
        Ok((peer, line.trim_end().to_owned()))
    })
}

/// Connects to `addr` (retrying while the pod's listener comes up), sends a line and reads
/// until the peer's first line.
fn talk_to(addr: SocketAddr, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("connecting to the pod's listener {addr}: {e}"),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    writeln!(stream, "{line}").unwrap();
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .unwrap_or_else(|e| panic!("reading the pod's answer from {addr}: {e}"));
    answer.trim_end().to_owned()
}

#[test]
fn pod_connects_out_restarts_listens_stops_and_leaves_nothing() {
    let Some(cri) = cri() else { return };
    let started = Instant::now();
    let pod = cri.run_pod("web").unwrap();

    // host-local's address on the bridge's subnet, in a netns of containerd's.
    let gateway = cri.gateway();
    assert_eq!(
        pod.ip.octets()[..3],
        gateway.octets()[..3],
        "pod IP {} outside {}",
        pod.ip,
        cri.subnet()
    );
    assert_ne!(pod.ip, gateway);
    let (pod_ns, host_ns) = (
        std::fs::metadata(&pod.netns).unwrap(),
        std::fs::metadata("/proc/self/ns/net").unwrap(),
    );
    assert_ne!(
        (pod_ns.dev(), pod_ns.ino()),
        (host_ns.dev(), host_ns.ino()),
        "the pod's netns {} is the host's",
        pod.netns.display()
    );

    // Attempt 0: the container's first act is a connection to a server in the host netns, on
    // the gateway address (which the bridge plugin set when the sandbox's network came up).
    let listener = TcpListener::bind((gateway, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = serve_once(listener);
    let first = cri
        .create_container(
            &pod,
            "app",
            0,
            &[
                "sh",
                "-c",
                &format!("echo first connection | nc -w 5 {gateway} {port}; exit 3"),
            ],
        )
        .unwrap();
    cri.start_container(&first).unwrap();
    let status = cri
        .wait_container(&first, ContainerState::ContainerExited, 20)
        .unwrap();
    assert_eq!(status.exit_code, 3, "{status:?}");
    let (peer, line) = server.join().unwrap().unwrap();
    assert_eq!(peer.ip(), pod.ip, "the connection came from elsewhere");
    assert_eq!(line, "first connection");
    let log = cri
        .wait_log(&pod, "app", 0, &format!("hello {}", pod.ip), 5)
        .unwrap();
    assert_eq!(log, format!("hello {}\n", pod.ip));

    // Restarted as kubelet restarts a container: attempt 1, in the same sandbox (same IP). It
    // listens; the host connects to the pod.
    let second = cri
        .create_container(
            &pod,
            "app",
            1,
            &[
                "sh",
                "-c",
                "trap 'echo got SIGTERM; exit 143' TERM; \
                 echo from the pod | nc -l -p 8080; sleep 600 & wait",
            ],
        )
        .unwrap();
    cri.start_container(&second).unwrap();
    cri.wait_container(&second, ContainerState::ContainerRunning, 10)
        .unwrap();
    let answer = talk_to(SocketAddr::from((pod.ip, 8080)), "from the host");
    assert_eq!(answer, "from the pod");
    cri.wait_log(&pod, "app", 1, "from the host", 5).unwrap();

    let mut containers: Vec<(u32, i32, String)> = cri
        .list_containers(&pod)
        .unwrap()
        .into_iter()
        .map(|c| (c.metadata.unwrap().attempt, c.state, c.id))
        .collect();
    containers.sort();
    assert_eq!(
        containers,
        [
            (0, ContainerState::ContainerExited as i32, first.clone()),
            (1, ContainerState::ContainerRunning as i32, second.clone()),
        ]
    );

    // StopContainer: SIGTERM first (the trap answers it), SIGKILL only after the grace period.
    let stopping = Instant::now();
    cri.stop_container(&second, Duration::from_secs(10))
        .unwrap();
    let status = cri
        .wait_container(&second, ContainerState::ContainerExited, 5)
        .unwrap();
    assert_eq!(status.exit_code, 143, "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "the stop waited for the grace period: {:?}",
        stopping.elapsed()
    );
    cri.wait_log(&pod, "app", 1, "got SIGTERM", 5).unwrap();
    cri.remove_container(&first).unwrap();

    // The sandbox goes: its netns with it; RemovePodSandbox takes the stopped container.
    cri.stop_pod(&pod).unwrap();
    assert!(
        !pod.netns.exists(),
        "{} outlived StopPodSandbox",
        pod.netns.display()
    );
    cri.remove_pod(&pod).unwrap();
    assert!(cri.list_containers(&pod).unwrap().is_empty());
    eprintln!("pod lifecycle: {:?}", started.elapsed());
    assert_gone(cri);
}

/// A CNI plugin appended to the chain (as `ambit-cni` will be) runs on ADD with the pod's
/// netns and the IP the bridge plugin gave, before any container, and on DEL.
#[test]
fn an_appended_cni_plugin_sees_the_pod_come_and_go() {
    let Some(cri) = cri() else { return };
    let log = cri.dir().join("chained.log");
    let plugin = cri.dir().join("chained-plugin");
    // A chained plugin's contract: pass prevResult on (ADD), answer VERSION.
    std::fs::write(
        &plugin,
        r#"#!/usr/bin/env python3
import json, os, sys
command = os.environ.get("CNI_COMMAND", "")
raw = sys.stdin.read()
conf = json.loads(raw) if raw.strip() else {}
if command == "VERSION":
    print(json.dumps({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}))
    sys.exit(0)
ips = [ip["address"] for ip in conf.get("prevResult", {}).get("ips", [])]
with open(conf["log"], "a") as f:
    f.write(" ".join([command, os.environ["CNI_CONTAINERID"], os.environ.get("CNI_NETNS", ""),
                      os.environ["CNI_IFNAME"]] + ips) + "\n")
if command == "ADD":
    print(json.dumps(conf["prevResult"]))
"#,
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    cri.add_cni_plugin(json!({"type": "chained", "log": log}), Some(&plugin))
        .unwrap();

    let pod = cri.run_pod("chained").unwrap();
    let read_log = || {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&log) {
            f.read_to_string(&mut text).unwrap();
        }
        text
    };
    let add = format!("ADD {} {} eth0 {}/24", pod.id, pod.netns.display(), pod.ip);
    assert_eq!(read_log().lines().collect::<Vec<_>>(), [add.as_str()]);

    cri.stop_pod(&pod).unwrap();
    let text = read_log();
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("DEL {} ", pod.id))),
        "no DEL in the plugin's log:\n{text}"
    );
    cri.remove_pod(&pod).unwrap();
    assert_gone(cri);
}

/// Whether something in the pod whose cgroup is `cgroup` listens on TCP `port`: the
/// /proc/<pid>/net/tcp and tcp6 of its processes (each shows its own netns, the pod's).
fn listening(cgroup: &Path, port: u16) -> bool {
    cgroup_procs(cgroup).iter().any(|pid| {
        ["tcp", "tcp6"].iter().any(|file| {
            let table = std::fs::read_to_string(format!("/proc/{pid}/net/{file}"));
            table.unwrap_or_default().lines().any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields
                    .get(1)
                    .is_some_and(|local| local.ends_with(&format!(":{port:04X}")))
                    && fields.get(3) == Some(&"0A")
            })
        })
    })
}

/// The processes in a cgroup tree.
fn cgroup_procs(dir: &Path) -> Vec<String> {
    let mut procs: Vec<String> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            procs.extend(cgroup_procs(&entry.path()));
        }
    }
    procs
}

/// The agent's log lines that contain every one of `needles`.
fn log_lines<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .collect()
}

/// Waits (10 s) until the agent's log has `count` lines with all of `needles`; the log then.
/// Fails with `what` and the log.
fn wait_for_lines(agent: &KubeAgent, needles: &[&str], count: usize, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = agent.log();
        if log_lines(&log, needles).len() >= count {
            return log;
        }
        assert!(Instant::now() < deadline, "{what}:\n{log}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The whole path of a mesh pod under a real runtime: containerd runs the CNI chain bridge →
/// ambit-cni for each sandbox, and the test plays kubelet (the pod's cgroup made first, CRI
/// calls) and the API server (a fake one the agent watches). Checked, as a user would see it:
/// the sandbox of a mesh pod does not start while the agent is down, and starts once it is up;
/// the very first connection of the pod's container (its entrypoint's) goes out as HBONE
/// (captured on the client's side, arriving at the destination pod's tunnel with the client's
/// identity, never as plaintext); a restart of the container keeps the enrollment it has (no
/// second one); the pod's deletion releases it.
#[test]
fn a_mesh_pods_first_connection_under_containerd_is_captured() {
    let Some(cri) = cri() else { return };
    // The fake API server on a runtime of its own: the harness's calls block, and must not run
    // inside one.
    let api = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (events, _) = broadcast::channel(16);
    let url = api.block_on(fake_api(events.clone()));
    let send = |event: String| {
        events
            .send(("/api/v1/pods".to_owned(), event))
            .expect("the agent watches the pods");
    };
    let node = format!("{}-node", cri.name());
    let agent_dir = cri.dir().join("agent");
    // ambit-cni after bridge, as the image installs it: the `ambit` binary under that name.
    cri.add_cni_plugin(
        KubeAgent::plugin_config_in(&agent_dir),
        Some(Path::new(AMBIT)),
    )
    .unwrap();
    // Namespace `demo` is ambient (the fake API's namespaces).
    let (web_uid, first_uid) = (
        format!("{}-web", cri.name()),
        format!("{}-first", cri.name()),
    );

    // (a) The agent is down: the mesh pod's sandbox fails, with the reason, and nothing of it
    // runs (kubelet would retry).
    let refused = match cri.run_pod_as("demo", "first", &first_uid) {
        Ok(pod) => panic!(
            "the sandbox of mesh pod demo/first started without the agent (IP {})",
            pod.ip
        ),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("ambit-cni") && refused.contains("agent cannot be reached"),
        "RunPodSandbox failed, but not for want of the agent: {refused}"
    );
    let first_cgroup = ambit::cgroup::cgroup2_root()
        .unwrap()
        .join(cri.name())
        .join(format!("pod{first_uid}"));
    assert_eq!(
        cgroup_procs(&first_cgroup),
        Vec::<String>::new(),
        "processes of the refused sandbox run"
    );

    // (b) The agent starts; the API server has both mesh pods as kubelet takes them on.
    let agent = KubeAgent::start(&agent_dir, &node, &url);
    let web_pod = pending_pod("demo", "web", &web_uid, &node);
    let first_pod = pending_pod("demo", "first", &first_uid, &node);
    send(added(web_pod.clone()));
    send(added(first_pod.clone()));

    // The destination, a mesh pod of this node: its app prints what each connection brings.
    let web = cri
        .run_pod_as("demo", "web", &web_uid)
        .unwrap_or_else(|e| panic!("{e:#}\n--- agent ---\n{}", agent.log()));
    let app = cri
        .create_container(
            &web,
            "app",
            0,
            &["sh", "-c", "while true; do nc -l -p 8080; done"],
        )
        .unwrap();
    cri.start_container(&app).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(&web.cgroup, 8080) {
        assert!(
            Instant::now() < deadline,
            "web's app does not listen: {:?}",
            cri.container_status(&app)
        );
        thread::sleep(Duration::from_millis(50));
    }
    send(modified(now_running(web_pod, &web.ip.to_string())));

    // The client: RunPodSandbox returns only once it is captured, so its entrypoint's first
    // connect() is.
    let first = cri
        .run_pod_as("demo", "first", &first_uid)
        .unwrap_or_else(|e| panic!("{e:#}\n--- agent ---\n{}", agent.log()));
    assert_eq!(
        log_lines(
            &agent.log(),
            &["CNI ADD: captured before start", "pod=demo/first"]
        )
        .len(),
        1,
        "{}",
        agent.log()
    );
    let attempt0 = cri
        .create_container(
            &first,
            "app",
            0,
            &[
                "sh",
                "-c",
                // The line comes from a file, not a pipe: web's nc, whose stdin is empty,
                // closes its side at once, and a client nc that sees that EOF before `echo`
                // has written to its pipe exits without sending (measured under load: the
                // connection tunnelled, 0 bytes). From a file it is read before the EOF.
                &format!(
                    "echo first connection > /tmp/line && nc -w 10 {} 8080 < /tmp/line; exit 3",
                    web.ip
                ),
            ],
        )
        .unwrap();
    cri.start_container(&attempt0).unwrap();
    send(modified(now_running(
        first_pod.clone(),
        &first.ip.to_string(),
    )));
    cri.wait_container(&attempt0, ContainerState::ContainerExited, 20)
        .unwrap();
    cri.wait_log(&web, "app", 0, "first connection", 20)
        .unwrap_or_else(|e| panic!("{e:#}\n--- agent ---\n{}", agent.log()));
    let web_app = format!("dst.addr={}:8080", web.ip);
    let first_identity = "src.identity=spiffe://cluster.local/ns/demo/sa/first";
    let log = wait_for_lines(
        &agent,
        &[
            "connection complete",
            "listener=\"HBONE\"",
            "direction=\"inbound\"",
            first_identity,
            &web_app,
        ],
        1,
        "demo/first's first connection was not captured: web's app got it, but web's HBONE \
         listener has no connection from first's identity",
    );
    let tunneled = log_lines(
        &log,
        &[
            "connection complete",
            "listener=\"HBONE\"",
            "direction=\"inbound\"",
            first_identity,
            &web_app,
        ],
    );
    assert_eq!(tunneled.len(), 1, "{log}");
    // The client's side: the original destination, sent on as HBONE to web's port 15008.
    let captured = format!("original_dst={}:8080", web.ip);
    let hbone = format!("dst.hbone_addr={}:15008", web.ip);
    wait_for_lines(
        &agent,
        &["captured outbound connection", &captured],
        1,
        "the agent did not capture first's connection on its side",
    );
    wait_for_lines(
        &agent,
        &["connection complete", "direction=\"outbound\"", &hbone],
        1,
        "the agent's access log has no outbound HBONE connection to web",
    );
    eprintln!(
        "the pod's first connection, at web's tunnel: {}",
        tunneled[0]
    );
    let plaintext = log_lines(
        &log,
        &[
            "connection complete",
            "direction=\"inbound\"",
            "src.identity=-",
            &web_app,
        ],
    );
    assert!(
        plaintext.is_empty(),
        "web got plaintext: {plaintext:#?}\n{log}"
    );
    // The agent runs as in the DaemonSet, with a read-only /proc/sys: the setting delivery
    // needs in web's netns was written through the host's procfs all the same.
    let reflect = std::process::Command::new("nsenter")
        .arg(format!("--net={}", web.netns.display()))
        .args(["sysctl", "-n", "net.ipv4.fwmark_reflect"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reflect.stdout).trim(),
        "1",
        "fwmark_reflect in web's netns: {reflect:?}"
    );

    // (c) The container restarts (kubelet creates attempt 1 in the same sandbox): the pod keeps
    // its one enrollment, and the new process's connection is captured as well.
    let attempt1 = cri
        .create_container(
            &first,
            "app",
            1,
            &[
                "sh",
                "-c",
                &format!(
                    "echo after the restart > /tmp/line && nc -w 10 {} 8080 < /tmp/line; \
                     sleep 600",
                    web.ip
                ),
            ],
        )
        .unwrap();
    cri.start_container(&attempt1).unwrap();
    cri.wait_log(&web, "app", 0, "after the restart", 20)
        .unwrap_or_else(|e| panic!("{e:#}\n--- agent ---\n{}", agent.log()));
    wait_for_lines(
        &agent,
        &["captured outbound connection", &captured],
        2,
        "the restarted container's connection was not captured",
    );
    let log = agent.log();
    assert_eq!(
        log_lines(&log, &["pod enrolled", "pod=demo/first"]).len(),
        1,
        "demo/first was enrolled more than once:\n{log}"
    );
    assert!(
        log_lines(&log, &["pod un-enrolled", "pod=demo/first"]).is_empty(),
        "demo/first was un-enrolled while its sandbox lives:\n{log}"
    );
    let pods = agent.captured_pods();
    assert!(
        pods.contains(&"demo/first".to_owned()),
        "ambit inspect: {pods:?}"
    );

    // (d) The pod is deleted: kubelet stops and removes its sandbox (CNI DEL), then the API
    // object goes. Capture is released; the other pod keeps its own.
    cri.stop_pod(&first).unwrap();
    agent.wait_log("CNI DEL: sandbox released");
    cri.remove_pod(&first).unwrap();
    send(deleted(now_running(first_pod, &first.ip.to_string())));
    wait_for_lines(
        &agent,
        &["pod un-enrolled", "pod=demo/first"],
        1,
        "demo/first was not un-enrolled",
    );
    let inspect = agent.inspect();
    assert_eq!(
        agent.captured_pods(),
        ["demo/web"],
        "after demo/first's deletion:\n{inspect}"
    );
    assert!(
        !inspect.contains(&format!("  {}\n", first.ip)),
        "demo/first's address keeps its inbound capture:\n{inspect}"
    );
    drop(agent);
    drop(api);
    assert_gone(cri);
}
