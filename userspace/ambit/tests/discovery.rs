//! Pod discovery against real processes in real namespaces and cgroups made by the test, laid
//! out as Kubernetes (systemd driver, containerd) lays out a pod.

mod common;

use std::{net::IpAddr, os::unix::fs::MetadataExt as _, process::Stdio, time::Duration};

use ambit::agent::kubernetes::discovery::{PodLocator, ProcLocator};
use ambit_lab::{wait_until, Lab};
use common::kube_agent::{added, now_running, pending_pod, KubeAgent};

#[test]
fn the_locator_finds_a_pods_netns_and_pod_level_cgroup_from_procfs() {
    let prefix = format!("{}k{}", common::test_prefix(), std::process::id() % 100_000);
    let mut lab = Lab::create(&prefix).unwrap();
    let uid = "6b1d2c3e-aaaa-4bbb-8ccc-0123456789ab";
    let pod_slice = pod_slice(&lab, uid);
    // Two processes of one container: the locator keeps the oldest.
    let scope = "cri-containerd-4d2b9e.scope";
    spawn_in_pod_a(&mut lab, &pod_slice, &[scope, scope]);
    let locator = ProcLocator::new("/proc", lab.cgroup_root());
    let pod_ip: IpAddr = ambit_lab::pod("a").ip.parse().unwrap();
    let mut found = None;
    wait_until(Duration::from_secs(5), "the pod's processes", || {
        found = locator.locate(uid, &[pod_ip]);
        found.is_some()
    })
    .unwrap();
    let found = found.unwrap();
    assert_eq!(found.cgroup, pod_slice, "not the pod-level cgroup");
    let want = std::fs::metadata(lab.netns_path("a")).unwrap().ino();
    assert_eq!(
        std::fs::metadata(&found.netns).unwrap().ino(),
        want,
        "not the pod's netns"
    );
    // Found without the IP too (a pod the API has no address for yet).
    assert_eq!(locator.locate(uid, &[]), Some(found.clone()));
    // The pod's processes are in no netns holding another pod's address: not found, rather
    // than enrolled in a netns that is not the pod's.
    let other_ip: IpAddr = ambit_lab::pod("c").ip.parse().unwrap();
    assert_eq!(locator.locate(uid, &[other_ip]), None);
    // Another UID finds nothing; the node's own processes are never taken for a pod.
    assert!(locator
        .locate("00000000-0000-0000-0000-000000000000", &[])
        .is_none());
}

/// A pod found through /proc whose oldest process is an app container, not a pause process
/// (CRI-O without an infra container): when that process exits (the container restarts), the
/// agent follows the pod's netns to its other process and keeps the pod enrolled, rather than
/// releasing it and enrolling it again (a gap in its capture).
#[test]
fn a_pod_found_through_an_app_process_stays_enrolled_when_that_process_exits() {
    let prefix = format!("{}f{}", common::test_prefix(), std::process::id() % 100_000);
    let mut lab = Lab::create(&prefix).unwrap();
    let uid = "7c2e4d1a-bbbb-4ccc-8ddd-0123456789ab";
    let pod_slice = pod_slice(&lab, uid);
    // Two app containers, no pause process.
    let pids = spawn_in_pod_a(&mut lab, &pod_slice, &["crio-1.scope", "crio-2.scope"]);

    let api = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (events, _) = tokio::sync::broadcast::channel(16);
    let url = api.block_on(common::fake_api::fake_api(events.clone()));
    let node = format!("{prefix}-node");
    let dir = std::env::temp_dir().join(format!("{prefix}-agent"));
    let _ = std::fs::remove_dir_all(&dir);
    let agent = KubeAgent::start(&dir, &node, &url);
    // Namespace `demo` is ambient (the fake API's namespaces); the pod runs with pod a's IP.
    let pod = now_running(
        pending_pod("demo", "app", uid, &node),
        ambit_lab::pod("a").ip,
    );
    events
        .send(("/api/v1/pods".to_owned(), added(pod)))
        .expect("the agent watches the pods");
    agent.wait_log("pod enrolled");
    let first = format!("{}/{}/ns/net", agent.proc_root().display(), pids[0]);
    assert!(
        agent.log().contains(&format!("netns={first}")),
        "not enrolled through the oldest process ({first}):\n{}",
        agent.log()
    );

    // The first container exits; its process is reaped (the lab is its parent).
    lab.stop("crio-1.scope").unwrap();
    agent.wait_log("pod's netns followed to another of its processes");
    // Past a full rebuild of the desired state (every 5 s), which locates the pod anew.
    std::thread::sleep(Duration::from_secs(6));
    let log = agent.log();
    assert_eq!(
        log.matches("pod enrolled").count(),
        1,
        "the pod was enrolled again:\n{log}"
    );
    assert!(
        !log.contains("un-enrolled") && !log.contains("pod released"),
        "the pod was let go:\n{log}"
    );
    assert_eq!(agent.captured_pods(), ["demo/app"]);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pod-level cgroup of pod `uid` as kubelet's systemd driver lays it out (best effort),
/// under the lab's cgroup.
fn pod_slice(lab: &Lab, uid: &str) -> std::path::PathBuf {
    lab.cgroup_dir().join(format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    ))
}

/// One `sleep` per entry of `scopes` (container cgroups under `pod_slice`), each in pod a's
/// netns, started 50 ms apart (oldest first); returns their pids. The lab names each process
/// after its scope (`Lab::stop` takes that name).
fn spawn_in_pod_a(lab: &mut Lab, pod_slice: &std::path::Path, scopes: &[&str]) -> Vec<u32> {
    scopes
        .iter()
        .map(|container| {
            let scope = pod_slice.join(container);
            std::fs::create_dir_all(&scope).unwrap();
            let mut cmd = lab.command_in("a", &scope, "sleep");
            cmd.arg("600").stdout(Stdio::null());
            let pid = lab.spawn(container, cmd).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            pid
        })
        .collect()
}
