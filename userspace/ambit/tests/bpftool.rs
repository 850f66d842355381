//! bpftool is a first-class debugger of Ambit: its programs and pinned maps must be readable,
//! with named fields (the maps carry BTF).

mod common;

use ambit_lab::pod;
use common::TestLab;

#[test]
fn bpftool_shows_programs_and_maps_with_named_fields() {
    let t = TestLab::start(&["a", "c"]);
    let pins = t.lab.pin_dir("n1");
    let progs = t.bpftool(&["prog", "show"]);
    for name in [
        "ambit_connect4",
        "ambit_connect6",
        "ambit_sockops",
        "ambit_sk_lookup",
    ] {
        assert!(progs.contains(name), "bpftool prog show lacks {name}");
    }

    let enrolled = t.bpftool(&[
        "map",
        "dump",
        "pinned",
        pins.join("ENROLLED_NETNS").to_str().unwrap(),
    ]);
    assert!(enrolled.contains("\"outbound_port\": 15001"), "{enrolled}");

    let mesh = t.bpftool(&[
        "map",
        "dump",
        "pinned",
        pins.join("MESH_DESTINATIONS").to_str().unwrap(),
    ]);
    for field in ["\"ip\"", "\"words\"", "\"port\": 80", "\"kind\": 2"] {
        assert!(
            mesh.contains(field),
            "MESH_DESTINATIONS dump lacks {field}:\n{mesh}"
        );
    }

    let links = t.bpftool(&["cgroup", "show", t.lab.pod_cgroup("a").to_str().unwrap()]);
    assert!(
        links.contains("ambit_connect4") && links.contains("ambit_sockops"),
        "{links}"
    );

    // sk_lookup is attached to pod c's netns (`bpftool net show` does not list sk_lookup; its
    // bpf_link does, with the netns inode).
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(t.lab.netns_path("c")).unwrap().ino();
    let links = t.bpftool(&["link", "show"]);
    assert!(
        links.contains(&format!("netns_ino {ino}  attach_type sk_lookup")),
        "no sk_lookup link on pod c's netns (inode {ino}):\n{links}"
    );
    let _ = pod("c");
}
