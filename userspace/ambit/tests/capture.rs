//! Privileged integration tests of transparent capture, on a real lab: real eBPF programs in the
//! kernel, real network namespaces and cgroups, unmodified clients (curl, python, nc).

mod common;

use ambit_lab::{pod, WEB_VIP};
use common::{assert_ok, stdout, TestLab};

#[test]
fn curl_by_pod_ip_and_by_service_vip_is_captured() {
    let t = TestLab::start(&["a", "c"]);
    let c = pod("c").ip;

    let out = t.curl("a", &format!("http://{c}:8080/"));
    assert_ok(&out, "curl a → c by pod IP");
    assert_eq!(stdout(&out), "hello from pod c\n");
    t.wait_log("n1", &format!("captured outbound connection original_dst={c}:8080"), 1);
    // Node 2 captured it on the way in.
    t.wait_log("n2", &format!("captured inbound connection original_dst={c}:8080"), 1);

    let out = t.curl("a", &format!("http://{WEB_VIP}/"));
    assert_ok(&out, "curl a → web service VIP");
    assert_eq!(stdout(&out), "hello from pod c\n");
    t.wait_log(
        "n1",
        &format!("captured outbound connection original_dst={WEB_VIP}:80 upstream={c}:8080"),
        1,
    );
}
