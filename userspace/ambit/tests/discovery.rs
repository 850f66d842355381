//! Pod discovery against real processes in real namespaces and cgroups made by the test, laid
//! out as Kubernetes (systemd driver, containerd) lays out a pod.

mod common;

use std::{net::IpAddr, os::unix::fs::MetadataExt as _, process::Stdio, time::Duration};

use ambit::agent::kubernetes::discovery::{PodLocator, ProcLocator};
use ambit_lab::{wait_until, Lab};

#[test]
fn the_locator_finds_a_pods_netns_and_pod_level_cgroup_from_procfs() {
    let prefix = format!("{}k{}", common::test_prefix(), std::process::id() % 100_000);
    let mut lab = Lab::create(&prefix).unwrap();
    let uid = "6b1d2c3e-aaaa-4bbb-8ccc-0123456789ab";
    let pod_slice = lab.cgroup_dir().join(format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    ));
    let scope = pod_slice.join("cri-containerd-4d2b9e.scope");
    std::fs::create_dir_all(&scope).unwrap();
    // Two "containers": the locator keeps the oldest process.
    for _ in 0..2 {
        let mut cmd = lab.command_in("a", &scope, "sleep");
        cmd.arg("60").stdout(Stdio::null());
        lab.spawn("pod process", cmd).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let locator = ProcLocator {
        proc_root: "/proc".into(),
        cgroup_root: lab.cgroup_root().to_owned(),
    };
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
