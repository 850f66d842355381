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

/// The maps are kept in three places — the eBPF crate's statics (what the kernel creates), the
/// ABI's names, and the sizes userspace reads them with (`datapath::map_layout`, also what a
/// restarted node checks adopted pins against) — and this holds them together: the node pins
/// exactly the ABI's maps, each with the layout userspace expects.
#[test]
fn the_pinned_maps_are_the_abis_with_the_layout_userspace_reads() {
    let t = TestLab::start(&["a", "c"]);
    let pins = t.lab.pin_dir("n1");
    let mut pinned: Vec<String> = std::fs::read_dir(&pins)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    pinned.sort();
    let mut abi: Vec<String> = ambit_abi::map_names::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    abi.sort();
    assert_eq!(pinned, abi, "pinned maps in {}", pins.display());
    let layout = ambit::datapath::map_layout();
    assert_eq!(layout.len(), abi.len());
    for (name, key, value) in layout {
        let path = pins.join(name);
        let show = t.bpftool(&["-j", "map", "show", "pinned", path.to_str().unwrap()]);
        let info: serde_json::Value = serde_json::from_str(&show).unwrap();
        assert_eq!(
            (info["bytes_key"].as_u64(), info["bytes_value"].as_u64()),
            (Some(key as u64), Some(value as u64)),
            "{name}: the kernel's map (from the eBPF statics) against datapath::map_layout"
        );
    }
}
