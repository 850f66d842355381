//! Pods run by a real containerd, driven over CRI as kubelet drives it (tests/common/cri.rs):
//! the ground the tests of a pod's very first connection stand on. Each test has a private
//! containerd; both check that nothing of theirs is left on the host afterwards.
//!
//! Skipped (with a line on stderr) when containerd, runc, the CNI plugins or a static busybox
//! are missing: `cargo xtask setup` installs them.

mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    thread,
    time::{Duration, Instant},
};

use common::cri::{api::ContainerState, Cri, Footprint};
use serde_json::json;

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
