//! The Kubernetes source against a fake API server on loopback that serves recorded objects
//! (userspace/ambit/testdata/kubernetes) and streams watch events: the real kube-rs client,
//! watches and reflectors, no cluster. Checks that workloads, services and this node's pods
//! follow label, namespace and pod changes.

mod common;

use std::{sync::Arc, time::Duration};

use ambit::{
    agent::{
        kubernetes::{
            discovery::{PodLocation, PodLocator},
            KubernetesSource,
        },
        source::StateSource,
    },
    xds::{
        client::XdsSettings,
        source::{LocalPods, XdsSource},
    },
};
use common::fake_api::{fake_api, fake_api_recording, fixture};
use tokio::sync::{broadcast, mpsc};

/// Finds every pod (at made-up paths): this test is about which pods are enrolled.
struct EveryPod;
impl PodLocator for EveryPod {
    fn locate(&self, uid: &str, _ips: &[std::net::IpAddr]) -> Option<PodLocation> {
        Some(PodLocation {
            netns: format!("/proc/{uid}/ns/net").into(),
            cgroup: format!("/kubepods/pod{uid}").into(),
        })
    }
}

fn modified(kind: &str, object: serde_json::Value) -> String {
    serde_json::json!({"type": kind, "object": object}).to_string()
}

#[tokio::test]
async fn the_kubernetes_source_follows_the_api() {
    let (events, _) = broadcast::channel(16);
    let url = fake_api(events.clone()).await;
    let config = kube::Config::new(url.parse().unwrap());
    // As `ambit node` does before its Kubernetes client: rustls has two providers built in.
    ambit::tls::install_default_provider();
    let client = kube::Client::try_from(config).unwrap();

    let mut source = KubernetesSource::new(
        "worker",
        "cluster.local",
        Some("ambit-system/ambit-x1".into()),
        Arc::new(EveryPod),
    );
    source
        .connect_with(client, Duration::from_secs(10))
        .await
        .unwrap();
    let initial = source.initial().unwrap();
    assert_eq!(
        initial.enrolled.keys().collect::<Vec<_>>(),
        ["demo/sleep", "demo/web"]
    );
    assert!(
        initial
            .resolve("10.96.100.10:80".parse().unwrap(), None)
            .is_ok(),
        "the web VIP"
    );

    let (tx, mut rx) = mpsc::channel(4);
    let _task = Box::new(source).watch(tx);
    // Give the watch connections a moment to open before sending events.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The pod demo/sleep opts out with the `none` label: it is un-enrolled.
    let mut sleep = fixture("pods.json")["items"][0].clone();
    assert_eq!(sleep["metadata"]["name"], "sleep");
    sleep["metadata"]["labels"] = serde_json::json!({"istio.io/dataplane-mode": "none"});
    sleep["metadata"]["resourceVersion"] = "2".into();
    events
        .send(("/api/v1/pods".into(), modified("MODIFIED", sleep)))
        .unwrap();
    let state = next_state(&mut rx, |s| !s.enrolled.contains_key("demo/sleep")).await;
    assert_eq!(state.enrolled.keys().collect::<Vec<_>>(), ["demo/web"]);

    // A rollout: demo/web terminates (its slice says so). The VIP goes to web-2 alone.
    let mut slice = fixture("endpointslices.json")["items"][0].clone();
    assert_eq!(slice["endpoints"][0]["targetRef"]["name"], "web");
    slice["endpoints"][0]["conditions"] =
        serde_json::json!({"ready": false, "serving": true, "terminating": true});
    slice["metadata"]["resourceVersion"] = "3".into();
    events
        .send((
            "/apis/discovery.k8s.io/v1/endpointslices".into(),
            modified("MODIFIED", slice),
        ))
        .unwrap();
    let web_vip = "10.96.100.10:80".parse().unwrap();
    let endpoints = |s: &ambit::state::State| -> Vec<String> {
        let mut seen: Vec<String> = (0..4)
            .filter_map(|_| s.resolve(web_vip, None).ok())
            .map(|u| format!("{} {:?}", u.addr, u.protocol))
            .collect();
        seen.sort();
        seen.dedup();
        seen
    };
    let state = next_state(&mut rx, |s| endpoints(s).len() == 1).await;
    assert_eq!(endpoints(&state), ["10.244.2.9:8080 Hbone"]);

    // The namespace `demo` leaves ambient mode: every pod in it is un-enrolled, and the web
    // service, now without mesh endpoints, is reached in plain TCP (as ztunnel does).
    let mut demo = fixture("namespaces.json")["items"][0].clone();
    assert_eq!(demo["metadata"]["name"], "demo");
    demo["metadata"]["labels"] = serde_json::json!({});
    demo["metadata"]["resourceVersion"] = "4".into();
    events
        .send(("/api/v1/namespaces".into(), modified("MODIFIED", demo)))
        .unwrap();
    let state = next_state(&mut rx, |s| s.enrolled.is_empty()).await;
    assert_eq!(endpoints(&state), ["10.244.2.9:8080 Tcp"]);
}

/// `--source xds` asks the API only for this node's pods (field selector `spec.nodeName`) and
/// the namespaces: another node's pods never reach the agent, and Services and EndpointSlices
/// are not watched at all.
#[tokio::test]
async fn a_local_pods_source_sees_only_this_nodes_pods() {
    let (events, _) = broadcast::channel(16);
    let (url, requests) = fake_api_recording(events.clone()).await;
    ambit::tls::install_default_provider();
    let connected = |local_only: bool| {
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let new = if local_only {
            KubernetesSource::local_pods_only
        } else {
            KubernetesSource::new
        };
        let mut k8s = new(
            "worker",
            "cluster.local",
            Some("ambit-system/ambit-x1".into()),
            Arc::new(EveryPod),
        );
        async move {
            k8s.connect_with(client, Duration::from_secs(10))
                .await
                .unwrap();
            k8s
        }
    };
    let local = connected(true).await;
    let local_requests = requests.lock().unwrap().clone();
    let cluster = connected(false).await;
    let enrolled = |k8s: &KubernetesSource| -> Vec<String> {
        let pods = k8s.local_pods().unwrap().ambit.pods;
        pods.into_iter().map(|p| p.workload).collect()
    };
    assert_eq!(enrolled(&local), ["demo/sleep", "demo/web"]);
    let err = local.mesh().unwrap_err().to_string();
    assert!(err.contains("only node worker's pods"), "{err}");

    // What it asked: pods with the selector, namespaces, nothing else.
    let pods: Vec<&String> = local_requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?"))
        .collect();
    assert!(!pods.is_empty(), "{local_requests:?}");
    for request in &pods {
        assert!(
            request.contains("fieldSelector=spec.nodeName=worker"),
            "{request}"
        );
    }
    for request in &local_requests {
        assert!(
            request.starts_with("GET /api/v1/pods?")
                || request.starts_with("GET /api/v1/namespaces?"),
            "a local-pods source asked for {request}"
        );
    }

    // demo/web-2 (on worker2) changes: the cluster-wide source sees it, the local one does not.
    tokio::time::sleep(Duration::from_millis(500)).await;
    local.take_changed();
    cluster.take_changed();
    let mut web2 = fixture("pods.json")["items"][2].clone();
    assert_eq!(
        (&web2["metadata"]["name"], &web2["spec"]["nodeName"]),
        (&"web-2".into(), &"worker2".into())
    );
    web2["metadata"]["labels"]["version"] = "v2".into();
    web2["metadata"]["resourceVersion"] = "2".into();
    events
        .send(("/api/v1/pods".into(), modified("MODIFIED", web2)))
        .unwrap();
    wait_for(|| cluster.take_changed()).await;
    assert!(!local.take_changed(), "the local source saw worker2's pod");

    // A pod of this node changes: the local source follows it.
    let mut sleep = fixture("pods.json")["items"][0].clone();
    sleep["metadata"]["labels"] = serde_json::json!({"istio.io/dataplane-mode": "none"});
    sleep["metadata"]["resourceVersion"] = "3".into();
    events
        .send(("/api/v1/pods".into(), modified("MODIFIED", sleep)))
        .unwrap();
    wait_for(|| local.take_changed()).await;
    assert_eq!(enrolled(&local), ["demo/web"]);
}

/// The redirection annotation is written through the pod's `status` subresource (what the
/// ClusterRole ambit-annotate grants: `patch` on `pods/status`), never by patching the pod.
#[tokio::test]
async fn the_annotation_is_patched_through_pods_status() {
    let (events, _) = broadcast::channel(16);
    let (url, requests) = fake_api_recording(events).await;
    ambit::tls::install_default_provider();
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let mut k8s = KubernetesSource::local_pods_only(
        "worker",
        "cluster.local",
        Some("ambit-system/ambit-x1".into()),
        Arc::new(EveryPod),
    );
    k8s.connect_with(client, Duration::from_secs(10))
        .await
        .unwrap();
    k8s.annotator().unwrap().mark("demo/sleep", true);
    let patches = || -> Vec<String> {
        let requests = requests.lock().unwrap();
        requests
            .iter()
            .filter(|r| r.starts_with("PATCH"))
            .cloned()
            .collect()
    };
    wait_for(|| !patches().is_empty()).await;
    assert_eq!(
        patches(),
        ["PATCH /api/v1/namespaces/demo/pods/sleep/status?"]
    );
}

async fn wait_for(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the change did not arrive in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn next_state(
    rx: &mut mpsc::Receiver<Arc<ambit::state::State>>,
    done: impl Fn(&ambit::state::State) -> bool,
) -> Arc<ambit::state::State> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let state = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("no matching state from the Kubernetes source in 15 s")
            .expect("source ended");
        if done(&state) {
            return state;
        }
    }
}

/// A stand-in istiod in this process (`ambit control-plane`'s server) serving `mesh`, with a
/// fresh CA; returns its address and the CA's root file.
async fn stand_in_istiod(dir: &std::path::Path, mesh: &str) -> (String, std::path::PathBuf) {
    std::fs::write(dir.join("mesh.yaml"), mesh).unwrap();
    let file = ambit::control_plane::Mesh::File(dir.join("mesh.yaml"));
    stand_in_istiod_serving(dir, file).await
}

/// The same serving the mesh from `mesh`.
async fn stand_in_istiod_serving(
    dir: &std::path::Path,
    mesh: ambit::control_plane::Mesh,
) -> (String, std::path::PathBuf) {
    let ca = dir.join("ca");
    ambit::tls::BuiltinCa::generate("cluster.local")
        .unwrap()
        .write_plugin_layout(&ca)
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let args = ambit::control_plane::ControlPlaneArgs {
        config: None,
        kubernetes: false,
        ca_dir: ca.clone(),
        trust_domain: "cluster.local".into(),
        listen,
        serving_names: Vec::new(),
        max_cert_lifetime: Duration::from_secs(3600),
    };
    tokio::spawn(async move { ambit::control_plane::serve(args, mesh).await.unwrap() });
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (format!("https://{listen}"), ca.join("root-cert.pem"))
}

/// The mesh as istiod would send it for the fixture's cluster: only some of its pods.
fn mesh(workloads: &[(&str, &str, &str)]) -> String {
    let mut yaml = String::from("workloads:\n");
    for (name, ip, node) in workloads {
        yaml.push_str(&format!(
            "- {{name: {name}, namespace: demo, serviceAccount: {name}, workloadIps: [\"{ip}\"], \
             protocol: HBONE, node: {node}}}\n"
        ));
    }
    yaml.push_str("services: []\npolicies: []\n");
    yaml
}

/// `--source xds` in a cluster: the mesh from istiod, this node's pods (and where they are)
/// from the Kubernetes API. A local mesh pod istiod has not sent yet (istiod learns a pod only
/// once its sandbox has an address, after the CNI ADD that waits for its capture) is enrolled
/// with the workload the API describes, provisional until istiod's arrives.
#[tokio::test(flavor = "multi_thread")]
async fn with_xds_the_mesh_comes_from_istiod_and_the_pods_from_the_api() {
    let dir = std::env::temp_dir().join(format!("ambit-xds-k8s-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // istiod knows demo/sleep (on this node) and demo/web-2 (on worker2), not demo/web yet.
    let (address, root) = stand_in_istiod(
        &dir,
        &mesh(&[
            ("sleep", "10.244.1.5", "worker"),
            ("web-2", "10.244.2.9", "worker2"),
        ]),
    )
    .await;
    let (events, _) = broadcast::channel(16);
    let url = fake_api(events.clone()).await;
    ambit::tls::install_default_provider();
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let mut k8s = KubernetesSource::local_pods_only(
        "worker",
        "cluster.local",
        Some("ambit-system/ambit-x1".into()),
        Arc::new(EveryPod),
    );
    k8s.connect_with(client, Duration::from_secs(10))
        .await
        .unwrap();
    let settings = XdsSettings {
        address,
        root_cert: root,
        token: None,
        node_name: "worker".into(),
        pod_name: "ambit-x1".into(),
        pod_namespace: "ambit-system".into(),
        instance_ip: "10.244.1.2".into(),
        cluster_id: "Kubernetes".into(),
    };
    let mut source = XdsSource::connect(
        settings,
        LocalPods::Kubernetes(Box::new(k8s)),
        "worker",
        "cluster.local",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let initial = source.initial().unwrap();
    assert_eq!(
        initial.enrolled.keys().collect::<Vec<_>>(),
        ["demo/sleep", "demo/web"]
    );
    assert_eq!(
        initial.workloads.keys().collect::<Vec<_>>(),
        ["demo/sleep", "demo/web", "demo/web-2"]
    );
    // demo/web from the API: its identity from its service account, provisional (its inbound
    // is refused until istiod says which policies select it); the others from istiod.
    let web = &initial.workloads["demo/web"];
    assert!(web.provisional);
    assert_eq!(
        initial.enrolled["demo/web"].identity.to_string(),
        "spiffe://cluster.local/ns/demo/sa/web"
    );
    assert!(!initial.workloads["demo/sleep"].provisional);

    let (tx, mut rx) = mpsc::channel(4);
    let _task = Box::new(source).watch(tx);
    // istiod sends demo/web: the same pod, now as istiod describes it.
    std::fs::write(
        dir.join("mesh.yaml"),
        mesh(&[
            ("sleep", "10.244.1.5", "worker"),
            ("web", "10.244.1.7", "worker"),
            ("web-2", "10.244.2.9", "worker2"),
        ]),
    )
    .unwrap();
    let state = next_state(&mut rx, |s| {
        s.workloads.get("demo/web").is_some_and(|w| !w.provisional)
    })
    .await;
    assert_eq!(
        state.enrolled.keys().collect::<Vec<_>>(),
        ["demo/sleep", "demo/web"]
    );
    assert_eq!(
        state.enrolled["demo/web"], initial.enrolled["demo/web"],
        "istiod's workload changed how the pod is enrolled (a re-enrollment)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The stand-in istiod with `--kubernetes` (what `cargo xtask kind up` runs as istiod): it
/// serves the mesh the API describes, and a node fed by it over xDS sees the same workloads
/// and services as a node reading the API itself, and follows the API's changes.
#[tokio::test(flavor = "multi_thread")]
async fn the_stand_in_istiod_serves_the_clusters_mesh_from_the_api() {
    let dir = std::env::temp_dir().join(format!("ambit-cp-k8s-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (events, _) = broadcast::channel(16);
    let url = fake_api(events.clone()).await;
    ambit::tls::install_default_provider();
    let connected = |node: &str, local_only: bool| {
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let new = if local_only {
            KubernetesSource::local_pods_only
        } else {
            KubernetesSource::new
        };
        let mut k8s = new(
            node,
            "cluster.local",
            Some("ambit-system/ambit-x1".into()),
            Arc::new(EveryPod),
        );
        async move {
            k8s.connect_with(client, Duration::from_secs(10))
                .await
                .unwrap();
            k8s
        }
    };
    // What a node reading the API itself sees.
    let mut direct = connected("worker", false).await;
    let expected = direct.initial().unwrap();
    let control_plane = connected("", false).await;
    let (address, root) = stand_in_istiod_serving(
        &dir,
        ambit::control_plane::Mesh::Kubernetes(Box::new(control_plane)),
    )
    .await;
    let settings = XdsSettings {
        address,
        root_cert: root,
        token: None,
        node_name: "worker".into(),
        pod_name: "ambit-x1".into(),
        pod_namespace: "ambit-system".into(),
        instance_ip: "10.244.1.2".into(),
        cluster_id: "Kubernetes".into(),
    };
    let mut source = XdsSource::connect(
        settings,
        LocalPods::Kubernetes(Box::new(connected("worker", true).await)),
        "worker",
        "cluster.local",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let initial = source.initial().unwrap();
    assert_eq!(
        initial.workloads.keys().collect::<Vec<_>>(),
        expected.workloads.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        initial.services.keys().collect::<Vec<_>>(),
        expected.services.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        initial.enrolled.keys().collect::<Vec<_>>(),
        ["demo/sleep", "demo/web"]
    );
    assert_eq!(initial.mesh_destinations(), expected.mesh_destinations());

    // The pod demo/sleep leaves the mesh: the stand-in pushes its removal.
    let (tx, mut rx) = mpsc::channel(4);
    let _task = Box::new(source).watch(tx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sleep = fixture("pods.json")["items"][0].clone();
    sleep["metadata"]["labels"] = serde_json::json!({"istio.io/dataplane-mode": "none"});
    sleep["metadata"]["resourceVersion"] = "2".into();
    events
        .send(("/api/v1/pods".into(), modified("MODIFIED", sleep)))
        .unwrap();
    let state = next_state(&mut rx, |s| !s.workloads.contains_key("demo/sleep")).await;
    assert_eq!(state.enrolled.keys().collect::<Vec<_>>(), ["demo/web"]);
    let _ = std::fs::remove_dir_all(&dir);
}
