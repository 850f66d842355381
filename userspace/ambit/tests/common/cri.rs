//! A node's container runtime for the integration tests: a private containerd with its CRI
//! plugin, runc and CNI, driven over CRI v1 the way kubelet drives it, so that a test runs real
//! pods (a sandbox holding a network namespace set up by a CNI chain, containers started in it)
//! and can later check what Ambit does from a pod's very first connection.
//!
//! [`Cri::start`] writes everything under `<tmp>/<name>` (`name`: the test prefix, the pid, `c`,
//! a counter; also the bridge's, the CNI network's and the pods' parent cgroup's name):
//! containerd's config, root, state and socket, the CNI conf and bin dirs, the pods' logs. It
//! never talks to a system containerd (nor reads /etc/containerd). Choices:
//! - cgroup driver cgroupfs (`SystemdCgroup = false`): kubelet and runtime must agree, the tests
//!   run without systemd as PID 1, and runc's cgroupfs driver works on v1, hybrid and v2 hosts.
//!   Pods go under `/<name>/pod<uid>` in every mounted hierarchy; as kubelet does, the harness
//!   makes that pod-level cgroup (in cgroup2) before it asks for the sandbox.
//! - snapshotter overlayfs when an overlay mount works in the temp dir, else native (copies).
//! - images: no registry is reachable, so one local image is built from the static busybox (an
//!   OCI layout tarball imported with `ctr`). It is also the sandbox ("pause") image: pause only
//!   has to keep the pod's namespaces alive, and containerd SIGKILLs it, so `sleep` does.
//! - netns under containerd's state dir (`netns_mounts_under_state_dir`), not /run/netns: the
//!   test's dir holds all its state; the path is in [`Pod::netns`].
//! - runc's state (`Root`) under the dir too; AppArmor off (no profile to load in a test).
//! - `restrict_oom_score_adj`: CRI gives the sandbox oom_score_adj -998, which needs
//!   CAP_SYS_RESOURCE; a test host may lack it (runc then fails with "can't get final child's
//!   PID from pipe"), so scores are clamped to containerd's own. Nothing here depends on them.
//! - outside the dir, only what containerd 1.6 and libcni hard-code: the shims' sockets in
//!   /run/containerd/s and libcni's cache in /var/lib/cni/results (see [`SHARED_DIRS`]), and
//!   the bridge plugin's `net.ipv4.ip_forward=1` (isGateway), left on.
//! - CNI: one conflist chaining `bridge` (+ `host-local` IPAM with its data dir in the test's
//!   dir) on 10.230.<k>.0/24, gateway .1 on the bridge, no masquerade; containerd adds the
//!   loopback itself. [`Cri::add_cni_plugin`] appends a plugin to the chain.
//!
//! Dropping a [`Cri`] stops and removes its sandboxes, stops containerd, kills what is left in
//! its cgroups and its shims, unmounts everything under its dir, deletes the bridge and the
//! cgroups, and removes the dir: also when the test panics. containerd gets
//! `PR_SET_PDEATHSIG`, so a killed test run leaves no daemon (create and drop a `Cri` on one
//! thread); its shims, pods, mounts and bridge stay until the next [`Cri::start`] of the same
//! test prefix, a minute later or more, removes them. [`Footprint::leftovers`] lists what
//! remains.
//!
//! What a real kubelet does that this harness does not: pull images (and their credentials),
//! put the pod's cgroup under its QoS class with limits (`kubepods/<qos>/pod<uid>`), set DNS
//! config, port mappings, security contexts, volumes and service-account tokens, run probes
//! and restart policies by itself (a test restarts a container by creating the next attempt,
//! as kubelet does), rotate logs, garbage-collect dead containers and images, report status to
//! an API server, and use the systemd cgroup driver on systemd hosts.
//!
//! The calls block (a runtime of the harness's own drives gRPC): do not call them from inside a
//! tokio runtime.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::{fs::symlink, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use api::*;
use serde_json::{json, Value};

/// The one local image: pause and apps (busybox; `/bin/sh`, `nc`, `sleep`...).
pub const IMAGE: &str = "ambit.test/busybox:1";
/// Every CRI call's deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The CNI plugins of /usr/lib/cni the chain needs (containerd runs `loopback` itself).
const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];
const CNI_DIR: &str = "/usr/lib/cni";
/// Host directories containerd 1.6 and libcni create whatever the config says: the shims'
/// sockets (`/run/containerd/s/<hash>`, each removed by its shim) and libcni's result cache
/// (each entry removed by CNI DEL). Deepest first; removed when empty unless they existed
/// before this process's first harness.
const SHARED_DIRS: &[&str] = &[
    "/run/containerd/s",
    "/run/containerd",
    "/var/lib/cni/results",
    "/var/lib/cni",
];
static SHARED_DIRS_BEFORE: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();

/// A private containerd and the CRI client driving it.
pub struct Cri {
    name: String,
    dir: PathBuf,
    socket: PathBuf,
    /// The pods' subnet is 10.230.<octet>.0/24.
    octet: u8,
    containerd: Option<Child>,
    rt: tokio::runtime::Runtime,
    channel: Option<tonic::transport::Channel>,
    /// Sandboxes not yet removed (Drop removes them).
    sandboxes: Mutex<Vec<String>>,
    /// The CNI chain (the conflist's `plugins`).
    chain: Mutex<Vec<Value>>,
}

/// A running pod sandbox.
pub struct Pod {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// From host-local, on the bridge's subnet.
    pub ip: Ipv4Addr,
    /// The network namespace containerd made (a bind mount under its state dir).
    pub netns: PathBuf,
    /// The pod-level cgroup (cgroup2), made before the sandbox as kubelet makes it.
    pub cgroup: PathBuf,
    /// The config it ran with (CreateContainer repeats it, as kubelet does).
    pub config: PodSandboxConfig,
}

impl Cri {
    /// Why the harness cannot run here (a machine without `cargo xtask setup`'s packages), or
    /// None.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root".into());
        }
        for command in ["containerd", "containerd-shim-runc-v2", "ctr", "runc", "ip"] {
            if which(command).is_none() {
                return Some(format!(
                    "{command} not found (cargo xtask setup installs it)"
                ));
            }
        }
        for plugin in CNI_PLUGINS {
            if !Path::new(CNI_DIR).join(plugin).exists() {
                return Some(format!(
                    "{CNI_DIR}/{plugin} not found (containernetworking-plugins)"
                ));
            }
        }
        match which("busybox") {
            None => Some("busybox not found (busybox-static)".into()),
            Some(b) if !is_static_elf(&b) => Some(format!(
                "{} is dynamically linked: the image needs busybox-static",
                b.display()
            )),
            Some(_) => None,
        }
    }

    /// Starts containerd with the local image imported and the CNI chain loaded.
    pub fn start() -> Result<Cri> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("{}{}c{n}", super::test_prefix(), pid % 100_000);
        let dir = std::env::temp_dir().join(&name);
        let socket = dir.join("containerd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        // Built before anything exists on the host, so that Drop cleans up whatever follows.
        let mut cri = Cri {
            octet: free_octet(pid.wrapping_add(n * 37))?,
            name,
            dir,
            socket,
            containerd: None,
            rt,
            channel: None,
            sandboxes: Mutex::new(Vec::new()),
            chain: Mutex::new(Vec::new()),
        };
        sweep_stale(); // before this: what stale harnesses left is not the host's
        SHARED_DIRS_BEFORE.get_or_init(|| {
            SHARED_DIRS
                .iter()
                .copied()
                .filter(|d| Path::new(d).exists())
                .collect()
        });
        cri.cleanup(); // an earlier run's leftovers with the same name
        if let Err(e) = cri.set_up() {
            // The dir goes with the drop: keep the log's errors (else its end) in the error.
            let log = cri.containerd_log();
            let mut lines: Vec<&str> = log
                .lines()
                .filter(|l| {
                    ["level=error", "level=fatal", "failed to load plugin"]
                        .iter()
                        .any(|m| l.contains(m))
                })
                .collect();
            if lines.is_empty() {
                lines = log.lines().collect();
            }
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            bail!("starting containerd: {e:#}\n--- containerd's log ---\n{tail}");
        }
        Ok(cri)
    }

    fn set_up(&mut self) -> Result<()> {
        for sub in [
            "root",
            "state",
            "opt",
            "runc",
            "cni/bin",
            "cni/net.d",
            "cni/ipam",
            "pods",
        ] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        // As on a Kubernetes node, where the runtime's netns dir is a shared mount: the
        // sandboxes' netns files mounted here later reach an agent that runs in a mount
        // namespace of its own (tests/common/kube_agent.rs, as the DaemonSet's HostToContainer
        // mounts). Unmounted with everything else under the dir.
        shared_mount(&self.dir)?;
        for plugin in fs::read_dir(CNI_DIR)? {
            let plugin = plugin?;
            symlink(plugin.path(), self.cni_bin_dir().join(plugin.file_name()))?;
        }
        let snapshotter = if overlay_works(&self.dir)? {
            "overlayfs"
        } else {
            "native"
        };
        fs::write(self.dir.join("config.toml"), self.config_toml(snapshotter))?;
        *self.chain.lock().unwrap() = vec![json!({
            "type": "bridge",
            "bridge": self.name,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet(), "gateway": self.gateway().to_string()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                // Not the host's /var/lib/cni/networks.
                "dataDir": self.dir.join("cni/ipam"),
            },
        })];
        self.write_conflist()?;

        let log = fs::File::create(self.dir.join("containerd.log"))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.containerd = Some(cmd.spawn().context("spawning containerd")?);

        let endpoint =
            tonic::transport::Endpoint::try_from(format!("unix://{}", self.socket.display()))?
                .connect_timeout(Duration::from_secs(5));
        self.channel = Some({
            let _guard = self.rt.enter();
            endpoint.connect_lazy()
        });
        let mut no_cri = false;
        self.wait("containerd's CRI to answer Version", 20, || {
            let request = VersionRequest {
                version: "v1".into(),
            };
            match self.call::<_, VersionResponse>(VERSION, request) {
                // Up without the CRI plugin (it failed to load): no use waiting.
                Err(e) if format!("{e:#}").contains("Unimplemented") => {
                    no_cri = true;
                    Ok(true)
                }
                r => r.map(|v| !v.runtime_version.is_empty()),
            }
        })?;
        if no_cri {
            bail!("containerd runs without its CRI plugin");
        }

        self.import_image(snapshotter)?;
        self.wait("CRI conditions RuntimeReady and NetworkReady", 20, || {
            let status =
                self.call::<_, StatusResponse>(STATUS, StatusRequest { verbose: false })?;
            let conditions = status.status.unwrap_or_default().conditions;
            Ok(["RuntimeReady", "NetworkReady"]
                .iter()
                .all(|t| conditions.iter().any(|c| c.r#type == *t && c.status)))
        })
    }

    fn config_toml(&self, snapshotter: &str) -> String {
        let d = self.dir.display();
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
# Snapshotters that only probe the host's filesystems and warn.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[{cri}]
  sandbox_image = "{IMAGE}"
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "{snapshotter}"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [{cri}.cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
"#
        )
    }

    /// Builds the image and imports it into containerd's `k8s.io` namespace (CRI's), then waits
    /// until the CRI image service lists it.
    fn import_image(&self, snapshotter: &str) -> Result<()> {
        let tarball = self.dir.join("image.tar");
        fs::write(&tarball, oci_image_tarball()?)?;
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io", "images", "import"])
            .args([
                "--snapshotter",
                snapshotter,
                "--base-name",
                "ambit.test/busybox",
            ])
            .arg(&tarball)
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr images import: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.wait(&format!("CRI's ImageStatus to know {IMAGE}"), 10, || {
            let status = self.call::<_, ImageStatusResponse>(
                IMAGE_STATUS,
                ImageStatusRequest {
                    image: Some(ImageSpec {
                        image: IMAGE.into(),
                    }),
                    verbose: false,
                },
            )?;
            Ok(status.image.is_some())
        })
    }

    /// containerd's log so far (for a failing test's message).
    pub fn containerd_log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The name of the bridge, the CNI network and the pods' parent cgroup.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CRI socket (for tools such as `ctr --address` or crictl).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The pods' subnet, `10.230.<k>.0/24`.
    pub fn subnet(&self) -> String {
        format!("10.230.{}.0/24", self.octet)
    }

    /// The bridge's address in the host netns: the pods' gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 230, self.octet, 1)
    }

    /// containerd's CNI bin dir: links to /usr/lib/cni's plugins and whatever a test adds.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni/bin")
    }

    /// Appends a plugin to the CNI chain, as a chained plugin's installer does on a node:
    /// `binary` (if any) becomes `<bin dir>/<conf.type>`, the conflist is rewritten, and this
    /// returns once containerd has loaded the new chain (pods run from then on go through it).
    pub fn add_cni_plugin(&self, conf: Value, binary: Option<&Path>) -> Result<()> {
        let kind = conf["type"]
            .as_str()
            .ok_or_else(|| anyhow!("a CNI plugin conf needs a \"type\""))?
            .to_owned();
        if let Some(binary) = binary {
            symlink(binary, self.cni_bin_dir().join(&kind))?;
        }
        self.chain.lock().unwrap().push(conf);
        self.write_conflist()?;
        self.wait(
            &format!("containerd to load the chain with {kind}"),
            10,
            || {
                let status =
                    self.call::<_, StatusResponse>(STATUS, StatusRequest { verbose: true })?;
                // The loaded config, as JSON (containerd's `cniconfig`).
                Ok(status.info.get("cniconfig").is_some_and(|c| {
                    c.contains(&format!("\"type\":\"{kind}\""))
                        || c.contains(&format!("\\\"type\\\":\\\"{kind}\\\""))
                }))
            },
        )
    }

    /// The conflist, written atomically (libcni reads only *.conf, *.conflist, *.json).
    fn write_conflist(&self) -> Result<()> {
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": *self.chain.lock().unwrap(),
        });
        let dir = self.dir.join("cni/net.d");
        let tmp = dir.join("chain.tmp");
        fs::write(&tmp, serde_json::to_string(&conflist)?)?;
        fs::rename(&tmp, dir.join("10-ambit-test.conflist"))?;
        Ok(())
    }

    /// RunPodSandbox for a pod `name` in namespace `default`; returns it once its network is up.
    pub fn run_pod(&self, name: &str) -> Result<Pod> {
        self.run_pod_as("default", name, &format!("{}-{name}", self.name))
    }

    /// RunPodSandbox for the pod `namespace/name` with UID `uid` (containerd hands all three to
    /// CNI in `CNI_ARGS`, as `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`). As kubelet
    /// does, the pod-level cgroup (`/<harness>/pod<uid>` in cgroup2) is made first and is the
    /// sandbox's cgroup parent: a chained CNI plugin that attaches to the pod's cgroup finds it
    /// during ADD, before the sandbox's first process exists. Returns once the network is up.
    pub fn run_pod_as(&self, namespace: &str, name: &str, uid: &str) -> Result<Pod> {
        let log_directory = self.dir.join(format!("pods/{namespace}_{name}_{uid}"));
        fs::create_dir_all(&log_directory)?;
        let cgroup_parent = format!("/{}/pod{uid}", self.name);
        let cgroup = ambit::cgroup::cgroup2_root()?.join(cgroup_parent.trim_start_matches('/'));
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating the pod cgroup {}", cgroup.display()))?;
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_directory.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent,
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .call::<_, RunPodSandboxResponse>(
                RUN_POD_SANDBOX,
                RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: String::new(),
                },
            )
            .with_context(|| format!("RunPodSandbox {namespace}/{name}"))?
            .pod_sandbox_id;
        self.sandboxes.lock().unwrap().push(id.clone());
        let status = self.pod_status(&id)?;
        let network = status.status.and_then(|s| s.network).unwrap_or_default();
        let ip = network
            .ip
            .parse()
            .with_context(|| format!("pod {name}'s IP {:?}", network.ip))?;
        // containerd's verbose `info`: the sandbox's OCI spec names the netns it joined.
        let info: Value = serde_json::from_str(status.info.get("info").map_or("{}", |s| s))?;
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .ok_or_else(|| anyhow!("no network namespace path in pod {name}'s status"))?
            .into();
        Ok(Pod {
            id,
            name: name.into(),
            namespace: namespace.into(),
            uid: uid.into(),
            ip,
            netns,
            cgroup,
            config,
        })
    }

    /// PodSandboxStatus, verbose (containerd's `info` JSON included).
    pub fn pod_status(&self, id: &str) -> Result<PodSandboxStatusResponse> {
        self.call(
            POD_SANDBOX_STATUS,
            PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            },
        )
    }

    /// StopPodSandbox: its containers are killed, its network torn down (CNI DEL), its netns
    /// removed.
    pub fn stop_pod(&self, pod: &Pod) -> Result<()> {
        self.call::<_, Empty>(
            STOP_POD_SANDBOX,
            PodSandboxIdRequest {
                pod_sandbox_id: pod.id.clone(),
            },
        )
        .map(drop)
    }

    /// RemovePodSandbox (after [`Cri::stop_pod`], as kubelet does), then the pod-level cgroup,
    /// as kubelet removes it once the pod is gone.
    pub fn remove_pod(&self, pod: &Pod) -> Result<()> {
        self.call::<_, Empty>(
            REMOVE_POD_SANDBOX,
            PodSandboxIdRequest {
                pod_sandbox_id: pod.id.clone(),
            },
        )?;
        self.sandboxes.lock().unwrap().retain(|id| *id != pod.id);
        remove_cgroup_tree(&pod.cgroup);
        if pod.cgroup.exists() {
            bail!("the pod cgroup {} outlived its pod", pod.cgroup.display());
        }
        Ok(())
    }

    /// CreateContainer: `command` in the local image, its log at `<name>/<attempt>.log` in the
    /// pod's log directory. kubelet restarts a container by creating attempt + 1.
    pub fn create_container(
        &self,
        pod: &Pod,
        name: &str,
        attempt: u32,
        command: &[&str],
    ) -> Result<String> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt,
            }),
            image: Some(ImageSpec {
                image: IMAGE.into(),
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}/{attempt}.log"),
            ..Default::default()
        };
        let response: CreateContainerResponse = self
            .call(
                CREATE_CONTAINER,
                CreateContainerRequest {
                    pod_sandbox_id: pod.id.clone(),
                    config: Some(config),
                    sandbox_config: Some(pod.config.clone()),
                },
            )
            .with_context(|| format!("CreateContainer {name} in pod {}", pod.name))?;
        Ok(response.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        self.call::<_, Empty>(
            START_CONTAINER,
            ContainerIdRequest {
                container_id: id.into(),
            },
        )
        .map(drop)
    }

    /// StopContainer: SIGTERM (the image's stop signal), SIGKILL after `grace`.
    pub fn stop_container(&self, id: &str, grace: Duration) -> Result<()> {
        self.call::<_, Empty>(
            STOP_CONTAINER,
            StopContainerRequest {
                container_id: id.into(),
                timeout: grace.as_secs() as i64,
            },
        )
        .map(drop)
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        self.call::<_, Empty>(
            REMOVE_CONTAINER,
            ContainerIdRequest {
                container_id: id.into(),
            },
        )
        .map(drop)
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        let response: ContainerStatusResponse = self.call(
            CONTAINER_STATUS,
            ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            },
        )?;
        response
            .status
            .ok_or_else(|| anyhow!("no status for container {id}"))
    }

    /// Waits until a container is in `state`; its status then.
    pub fn wait_container(
        &self,
        id: &str,
        state: ContainerState,
        seconds: u64,
    ) -> Result<ContainerStatus> {
        let mut last = None;
        self.wait(&format!("container {id} to be {state:?}"), seconds, || {
            let status = self.container_status(id)?;
            let done = status.state == state as i32;
            last = Some(status);
            Ok(done)
        })
        .with_context(|| format!("its last status: {last:?}"))?;
        Ok(last.unwrap())
    }

    /// ListContainers of a pod (every state).
    pub fn list_containers(&self, pod: &Pod) -> Result<Vec<Container>> {
        let response: ListContainersResponse = self.call(
            LIST_CONTAINERS,
            ListContainersRequest {
                filter: Some(ContainerFilter {
                    pod_sandbox_id: pod.id.clone(),
                    ..Default::default()
                }),
            },
        )?;
        Ok(response.containers)
    }

    /// A container's stdout and stderr as CRI logged them (each line of the file is
    /// `<time> <stream> <P|F> <text>`; P: a partial line continued by the next).
    pub fn container_log(&self, pod: &Pod, name: &str, attempt: u32) -> Result<String> {
        let path = Path::new(&pod.config.log_directory).join(format!("{name}/{attempt}.log"));
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut out = String::new();
        for line in text.lines() {
            let mut fields = line.splitn(4, ' ');
            let (tag, content) = (fields.nth(2), fields.next().unwrap_or(""));
            out.push_str(content);
            if tag != Some("P") {
                out.push('\n');
            }
        }
        Ok(out)
    }

    /// Waits until a container's log contains `needle`; the log then.
    pub fn wait_log(
        &self,
        pod: &Pod,
        name: &str,
        attempt: u32,
        needle: &str,
        seconds: u64,
    ) -> Result<String> {
        let mut log = String::new();
        self.wait(
            &format!("{needle:?} in the log of {name} (attempt {attempt})"),
            seconds,
            || {
                log = self.container_log(pod, name, attempt).unwrap_or_default();
                Ok(log.contains(needle))
            },
        )
        .with_context(|| format!("the log: {log:?}"))?;
        Ok(log)
    }

    /// What this harness puts on the host, to check after the drop that nothing remains.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            name: self.name.clone(),
            dir: self.dir.clone(),
        }
    }

    /// A unary CRI call, with [`CALL_TIMEOUT`].
    fn call<Req, Resp>(&self, path: &'static str, request: Req) -> Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let channel = self
            .channel
            .clone()
            .ok_or_else(|| anyhow!("containerd is not running"))?;
        self.rt.block_on(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            let call = async {
                grpc.ready().await.map_err(|e| anyhow!("{e}"))?;
                grpc.unary(
                    tonic::Request::new(request),
                    http::uri::PathAndQuery::from_static(path),
                    tonic_prost::ProstCodec::<Req, Resp>::default(),
                )
                .await
                .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))
            };
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(Ok(response)) => Ok(response.into_inner()),
                Ok(Err(e)) => Err(e.context(format!("CRI {path}"))),
                Err(_) => bail!("CRI {path}: no answer within {CALL_TIMEOUT:?}"),
            }
        })
    }

    /// Polls `check` until it is true; fails naming `what` after `seconds` (scaled like every
    /// test wait) or at once when containerd has exited.
    fn wait(
        &self,
        what: &str,
        seconds: u64,
        mut check: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let timeout = Duration::from_secs(seconds).mul_f64(ambit_lab::timeout_scale());
        let deadline = Instant::now() + timeout;
        let mut last_error = None;
        loop {
            match check() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_error = Some(e),
            }
            if self.containerd_exited() {
                bail!("containerd exited while waiting for {what}");
            }
            if Instant::now() > deadline {
                let why = last_error.map(|e| format!(" (last error: {e:#})"));
                bail!(
                    "timed out after {timeout:?} waiting for {what}{}",
                    why.unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn containerd_exited(&self) -> bool {
        // try_wait needs &mut; /proc tells as well (a zombie counts as exited).
        self.containerd.as_ref().is_some_and(|c| {
            fs::read_to_string(format!("/proc/{}/stat", c.id())).map_or(true, |s| {
                s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z'))
            })
        })
    }

    /// Removes everything of this harness from the host (see the module doc). Each step runs
    /// even when one before it failed.
    fn cleanup(&mut self) {
        let sandboxes = std::mem::take(&mut *self.sandboxes.lock().unwrap());
        if self.containerd.is_some() && !self.containerd_exited() {
            for id in sandboxes {
                let request = PodSandboxIdRequest { pod_sandbox_id: id };
                for path in [STOP_POD_SANDBOX, REMOVE_POD_SANDBOX] {
                    if let Err(e) = self.call::<_, Empty>(path, request.clone()) {
                        eprintln!("cri cleanup: {e:#}");
                    }
                }
            }
        }
        self.channel = None;
        if let Some(mut containerd) = self.containerd.take() {
            signal(containerd.id() as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while containerd.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = containerd.kill();
            let _ = containerd.wait();
        }
        remove_from_host(&self.name, &self.dir);
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// The host side of a harness's cleanup: what is left in its cgroups and its shims killed,
/// its mounts, bridge, cgroups, libcni cache entries and dir removed.
fn remove_from_host(name: &str, dir: &Path) {
    // Containers the removal missed, then their shims (which name containerd's socket).
    for pid in cgroup_pids(name) {
        signal(pid, libc::SIGKILL);
    }
    let socket = dir.join("containerd.sock").display().to_string();
    for pid in pids_where(|cmdline, _| cmdline.contains(&socket)) {
        let cmdline = fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        signal(pid, libc::SIGKILL);
        // A killed shim leaves its socket: /run/containerd/s/<sha256 of address/namespace/id>.
        let args: Vec<&str> = cmdline.split('\0').collect();
        let arg = |flag: &str| {
            args.iter()
                .position(|a| *a == flag)
                .and_then(|i| args.get(i + 1))
        };
        if let (Some(ns), Some(id)) = (arg("-namespace"), arg("-id")) {
            let hash = sha256_hex(format!("{socket}/{ns}/{id}").as_bytes());
            let shim_socket = Path::new(SHARED_DIRS[0]).join(hash);
            let _ = fs::remove_file(shim_socket);
        }
    }
    unmount_under(dir);
    if Path::new("/sys/class/net").join(name).exists() {
        let _ = Command::new("ip").args(["link", "del", name]).status();
    }
    for root in cgroup_mounts() {
        remove_cgroup_tree(&root.join(name));
    }
    // libcni's result cache (containerd sets no cache dir of its own): each entry is removed by
    // CNI DEL, unless a pod's DEL never ran. Ours: `<name>-<sandbox>-eth0` and, for containerd's
    // own loopback network, `cni-loopback-<sandbox>-lo`.
    let sandboxes: Vec<String> = ["root", "state"]
        .iter()
        .flat_map(|d| fs::read_dir(dir.join(d).join("io.containerd.grpc.v1.cri/sandboxes")))
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if let Ok(entries) = fs::read_dir("/var/lib/cni/results") {
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if file.starts_with(&format!("{name}-"))
                || sandboxes
                    .iter()
                    .any(|id| file == format!("cni-loopback-{id}-lo"))
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let before = SHARED_DIRS_BEFORE.get().map_or(&[][..], |v| v.as_slice());
    for shared in SHARED_DIRS.iter().filter(|d| !before.contains(d)) {
        let _ = fs::remove_dir(shared); // only when empty: another harness may use it
    }
    if dir.exists() {
        if let Err(e) = fs::remove_dir_all(dir) {
            eprintln!("cri cleanup: removing {}: {e}", dir.display());
        }
    }
}

/// Removes the leftovers of harnesses whose test process died without dropping them (killed):
/// a dir of this test prefix whose containerd no longer runs, written over a minute ago (a
/// harness starting in another process is younger).
fn sweep_stale() {
    let prefix = super::test_prefix();
    for entry in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let harness = rest.split_once('c').is_some_and(|(p, n)| {
            [p, n]
                .iter()
                .all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        });
        let config = entry.path().join("config.toml");
        let old = fs::metadata(&config)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60));
        let config = config.display().to_string();
        if harness && old && pids_where(|cmdline, _| cmdline.contains(&config)).is_empty() {
            eprintln!("cri: removing the leftovers of {name}");
            remove_from_host(&name, &entry.path());
        }
    }
}

/// The names and paths a [`Cri`] used, kept past its drop.
#[derive(Clone, Debug)]
pub struct Footprint {
    pub name: String,
    pub dir: PathBuf,
}

impl Footprint {
    /// What is left on the host: mounts, the dir, the bridge, cgroups, processes.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for mount in mounts_under(&self.dir) {
            left.push(format!("mount {}", mount.display()));
        }
        if self.dir.exists() {
            left.push(format!("dir {}", self.dir.display()));
        }
        if Path::new("/sys/class/net").join(&self.name).exists() {
            left.push(format!("link {}", self.name));
        }
        for root in cgroup_mounts() {
            let cgroup = root.join(&self.name);
            if cgroup.exists() {
                left.push(format!("cgroup {}", cgroup.display()));
            }
        }
        let dir = self.dir.display().to_string();
        let cgroup = format!(":/{}/", self.name);
        for pid in
            pids_where(|cmdline, cgroups| cmdline.contains(&dir) || cgroups.contains(&cgroup))
        {
            let cmdline = fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            left.push(format!("process {pid}: {}", cmdline.replace('\0', " ")));
        }
        left
    }
}

fn which(command: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(command))
        .find(|p| p.is_file())
}

/// Whether an ELF executable has no program interpreter (PT_INTERP), i.e. is static.
fn is_static_elf(path: &Path) -> bool {
    let Ok(elf) = fs::read(path) else {
        return false;
    };
    // 64-bit little-endian ELF only (the image is built for this host).
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= elf.len() && u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) != 3
    })
}

/// The third octet of a 10.230.x.0/24 no interface address or route of the host uses.
fn free_octet(seed: u32) -> Result<u8> {
    let used = |args: &[&str]| -> Result<String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .context("running ip")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let taken = used(&["-4", "-o", "addr", "show"])? + &used(&["-4", "route", "show"])?;
    (0..256)
        .map(|i| ((seed + i) % 256) as u8)
        .find(|k| !taken.contains(&format!("10.230.{k}.")))
        .ok_or_else(|| anyhow!("no free 10.230.x.0/24 on this host"))
}

/// Whether an overlay mount works in `dir` (containerd's overlayfs snapshotter needs it: not
/// on every filesystem, nor inside every container).
fn overlay_works(dir: &Path) -> Result<bool> {
    let probe = dir.join("overlay-probe");
    for sub in ["lower", "upper", "work", "merged"] {
        fs::create_dir_all(probe.join(sub))?;
    }
    let p = probe.display();
    let works = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={p}/lower,upperdir={p}/upper,workdir={p}/work"
        ))
        .arg(probe.join("merged"))
        .stderr(Stdio::null())
        .status()?
        .success();
    if works {
        Command::new("umount").arg(probe.join("merged")).status()?;
    }
    fs::remove_dir_all(&probe)?;
    Ok(works)
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tar entry's header: every timestamp 0, root-owned, so the image's digests are the same at
/// every build (re-importing it is a no-op).
fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// The image's one layer: /bin/busybox with a link per applet, and the directories runc mounts
/// on.
fn busybox_layer() -> Result<Vec<u8>> {
    let busybox_path = which("busybox").ok_or_else(|| anyhow!("no busybox"))?;
    let busybox = fs::read(&busybox_path)?;
    let applets = Command::new(&busybox_path).arg("--list").output()?;
    let mut tar = tar::Builder::new(Vec::new());
    for (dir, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
    ]
    .into_iter()
    .chain([("sys", 0o555), ("tmp", 0o1777), ("root", 0o700)])
    {
        let mut h = tar_header(tar::EntryType::Directory, mode, 0);
        tar.append_data(&mut h, format!("{dir}/"), std::io::empty())?;
    }
    let mut h = tar_header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    tar.append_data(&mut h, "bin/busybox", busybox.as_slice())?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "busybox" && !applet.contains('/') {
            let mut h = tar_header(tar::EntryType::Symlink, 0o777, 0);
            tar.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
        }
    }
    Ok(tar.into_inner()?)
}

/// An OCI image layout (oci-layout, index.json, blobs/sha256/*) as a tarball, for
/// `ctr images import`: one uncompressed layer, its config (entrypoint: the pause's sleep) and
/// its manifest.
fn oci_image_tarball() -> Result<Vec<u8>> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let layer = busybox_layer()?;
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            // The pause: hold the namespaces until killed (busybox sleep cannot sleep forever).
            "Entrypoint": ["/bin/sleep", "2147483647"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&config)),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let tag = IMAGE.rsplit(':').next().unwrap();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&manifest)),
            "size": manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }))?;
    let mut tar = tar::Builder::new(Vec::new());
    let file = |tar: &mut tar::Builder<Vec<u8>>, path: String, data: &[u8]| {
        let mut h = tar_header(tar::EntryType::Regular, 0o644, data.len() as u64);
        tar.append_data(&mut h, path, data)
    };
    file(
        &mut tar,
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    file(&mut tar, "index.json".into(), &index)?;
    for blob in [&layer, &config, &manifest] {
        file(&mut tar, format!("blobs/sha256/{}", sha256_hex(blob)), blob)?;
    }
    Ok(tar.into_inner()?)
}

/// Mount points of every cgroup (v1) and cgroup2 hierarchy.
fn cgroup_mounts() -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .filter(|(_, fstype)| fstype == "cgroup" || fstype == "cgroup2")
        .map(|(point, _)| point)
        .collect()
}

/// (mount point, filesystem type) of this process's mounts.
fn mountinfo() -> Vec<(PathBuf, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = unescape_octal(fields.get(4)?);
            let dash = fields.iter().position(|f| *f == "-")?;
            Some((PathBuf::from(point), fields.get(dash + 1)?.to_string()))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Bind-mounts `dir` on itself and makes it a shared mount (`mount --make-shared`).
fn shared_mount(dir: &Path) -> Result<()> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid NUL-terminated paths; null fstype and data are allowed for these flags.
    unsafe {
        if libc::mount(
            path.as_ptr(),
            path.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
            || libc::mount(
                std::ptr::null(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_SHARED,
                std::ptr::null(),
            ) != 0
        {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("making {} a shared mount", dir.display()));
        }
    }
    Ok(())
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .map(|(point, _)| point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Unmounts (lazily, deepest first) everything mounted under `dir`: snapshots, shm, netns.
fn unmount_under(dir: &Path) {
    for _ in 0..3 {
        let mut mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        mounts.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for m in mounts {
            let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The pids in a cgroup tree named `name` at the root of any hierarchy.
fn cgroup_pids(name: &str) -> Vec<i32> {
    fn walk(dir: &Path, pids: &mut Vec<i32>) {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.parse::<i32>().ok()));
        }
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), pids);
            }
        }
    }
    let mut pids = Vec::new();
    for root in cgroup_mounts() {
        walk(&root.join(name), &mut pids);
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// rmdir a cgroup tree bottom-up, retrying while killed processes leave it.
fn remove_cgroup_tree(dir: &Path) {
    fn remove(dir: &Path) -> bool {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove(&e.path());
            }
        }
        fs::remove_dir(dir).is_ok() || !dir.exists()
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while dir.exists() && !remove(dir) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
}

/// Pids (not this process) whose command line (NULs as they are) and /proc/<pid>/cgroup text
/// satisfy `pred`.
fn pids_where(pred: impl Fn(&str, &str) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            pred(&String::from_utf8_lossy(&cmdline), &cgroups)
        })
        .collect()
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

pub mod api {
    //! The CRI v1 messages the harness sends and reads (package `runtime.v1`), written by hand as
    //! prost structs like src/xds/proto.rs: no protoc, no crate pinned to another tonic/prost.
    //!
    //! Field numbers and types follow kubernetes/cri-api `pkg/apis/runtime/v1/api.proto`; each
    //! struct names its message. Only the fields the harness uses are declared: a decoder skips the
    //! others as unknown fields, and an encoder leaves them at their defaults, as a client built
    //! from the whole file would when it does not set them.

    use std::collections::HashMap;

    /// gRPC methods (`/runtime.v1.<Service>/<Method>`).
    pub const VERSION: &str = "/runtime.v1.RuntimeService/Version";
    pub const STATUS: &str = "/runtime.v1.RuntimeService/Status";
    pub const RUN_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/RunPodSandbox";
    pub const STOP_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/StopPodSandbox";
    pub const REMOVE_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/RemovePodSandbox";
    pub const POD_SANDBOX_STATUS: &str = "/runtime.v1.RuntimeService/PodSandboxStatus";
    pub const CREATE_CONTAINER: &str = "/runtime.v1.RuntimeService/CreateContainer";
    pub const START_CONTAINER: &str = "/runtime.v1.RuntimeService/StartContainer";
    pub const STOP_CONTAINER: &str = "/runtime.v1.RuntimeService/StopContainer";
    pub const REMOVE_CONTAINER: &str = "/runtime.v1.RuntimeService/RemoveContainer";
    pub const LIST_CONTAINERS: &str = "/runtime.v1.RuntimeService/ListContainers";
    pub const CONTAINER_STATUS: &str = "/runtime.v1.RuntimeService/ContainerStatus";
    pub const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";

    /// `VersionRequest`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct VersionRequest {
        #[prost(string, tag = "1")]
        pub version: String,
    }

    /// `VersionResponse`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct VersionResponse {
        #[prost(string, tag = "1")]
        pub version: String,
        #[prost(string, tag = "2")]
        pub runtime_name: String,
        #[prost(string, tag = "3")]
        pub runtime_version: String,
        #[prost(string, tag = "4")]
        pub runtime_api_version: String,
    }

    /// `StatusRequest`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct StatusRequest {
        #[prost(bool, tag = "1")]
        pub verbose: bool,
    }

    /// `StatusResponse`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct StatusResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<RuntimeStatus>,
        /// With `verbose`: containerd puts the CNI config it loaded under `cniconfig` (JSON).
        #[prost(map = "string, string", tag = "2")]
        pub info: HashMap<String, String>,
    }

    /// `RuntimeStatus`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct RuntimeStatus {
        #[prost(message, repeated, tag = "1")]
        pub conditions: Vec<RuntimeCondition>,
    }

    /// `RuntimeCondition` (types `RuntimeReady`, `NetworkReady`).
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct RuntimeCondition {
        #[prost(string, tag = "1")]
        pub r#type: String,
        #[prost(bool, tag = "2")]
        pub status: bool,
        #[prost(string, tag = "3")]
        pub reason: String,
        #[prost(string, tag = "4")]
        pub message: String,
    }

    /// `PodSandboxMetadata`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct PodSandboxMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub uid: String,
        #[prost(string, tag = "3")]
        pub namespace: String,
        #[prost(uint32, tag = "4")]
        pub attempt: u32,
    }

    /// `LinuxPodSandboxConfig`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct LinuxPodSandboxConfig {
        #[prost(string, tag = "1")]
        pub cgroup_parent: String,
        #[prost(map = "string, string", tag = "3")]
        pub sysctls: HashMap<String, String>,
    }

    /// `PodSandboxConfig`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct PodSandboxConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(string, tag = "2")]
        pub hostname: String,
        #[prost(string, tag = "3")]
        pub log_directory: String,
        #[prost(map = "string, string", tag = "6")]
        pub labels: HashMap<String, String>,
        #[prost(map = "string, string", tag = "7")]
        pub annotations: HashMap<String, String>,
        #[prost(message, optional, tag = "8")]
        pub linux: Option<LinuxPodSandboxConfig>,
    }

    /// `RunPodSandboxRequest`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct RunPodSandboxRequest {
        #[prost(message, optional, tag = "1")]
        pub config: Option<PodSandboxConfig>,
        #[prost(string, tag = "2")]
        pub runtime_handler: String,
    }

    /// `RunPodSandboxResponse`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct RunPodSandboxResponse {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }

    /// `StopPodSandboxRequest`, `RemovePodSandboxRequest` (the same single field).
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct PodSandboxIdRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }

    /// `StopPodSandboxResponse`, `RemovePodSandboxResponse`, `StartContainerResponse`,
    /// `StopContainerResponse`, `RemoveContainerResponse` (all empty).
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Empty {}

    /// `PodSandboxStatusRequest`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct PodSandboxStatusRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }

    /// `PodSandboxStatusResponse`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct PodSandboxStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<PodSandboxStatus>,
        /// With `verbose`: containerd's `info` key holds JSON with `netNamespacePath` (CRI's
        /// `Namespace` message carries no path).
        #[prost(map = "string, string", tag = "2")]
        pub info: HashMap<String, String>,
    }

    /// `PodSandboxState`
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
    #[repr(i32)]
    pub enum PodSandboxState {
        SandboxReady = 0,
        SandboxNotready = 1,
    }

    /// `PodSandboxStatus`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct PodSandboxStatus {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(enumeration = "PodSandboxState", tag = "3")]
        pub state: i32,
        #[prost(int64, tag = "4")]
        pub created_at: i64,
        #[prost(message, optional, tag = "5")]
        pub network: Option<PodSandboxNetworkStatus>,
    }

    /// `PodSandboxNetworkStatus`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct PodSandboxNetworkStatus {
        #[prost(string, tag = "1")]
        pub ip: String,
        #[prost(message, repeated, tag = "2")]
        pub additional_ips: Vec<PodIp>,
    }

    /// `PodIP`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct PodIp {
        #[prost(string, tag = "1")]
        pub ip: String,
    }

    /// `ImageSpec`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
    }

    /// `KeyValue`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// `ContainerMetadata`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ContainerMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(uint32, tag = "2")]
        pub attempt: u32,
    }

    /// `ContainerConfig`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ContainerConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(message, optional, tag = "2")]
        pub image: Option<ImageSpec>,
        #[prost(string, repeated, tag = "3")]
        pub command: Vec<String>,
        #[prost(string, repeated, tag = "4")]
        pub args: Vec<String>,
        #[prost(string, tag = "5")]
        pub working_dir: String,
        #[prost(message, repeated, tag = "6")]
        pub envs: Vec<KeyValue>,
        #[prost(map = "string, string", tag = "9")]
        pub labels: HashMap<String, String>,
        #[prost(map = "string, string", tag = "10")]
        pub annotations: HashMap<String, String>,
        #[prost(string, tag = "11")]
        pub log_path: String,
    }

    /// `CreateContainerRequest`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct CreateContainerRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "2")]
        pub config: Option<ContainerConfig>,
        #[prost(message, optional, tag = "3")]
        pub sandbox_config: Option<PodSandboxConfig>,
    }

    /// `CreateContainerResponse`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct CreateContainerResponse {
        #[prost(string, tag = "1")]
        pub container_id: String,
    }

    /// `StartContainerRequest`, `RemoveContainerRequest` (the same single field).
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ContainerIdRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
    }

    /// `StopContainerRequest`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct StopContainerRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        /// Grace period in seconds before SIGKILL.
        #[prost(int64, tag = "2")]
        pub timeout: i64,
    }

    /// `ContainerState` (variant names as prost-build makes them from `CONTAINER_CREATED`...).
    #[allow(clippy::enum_variant_names)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
    #[repr(i32)]
    pub enum ContainerState {
        ContainerCreated = 0,
        ContainerRunning = 1,
        ContainerExited = 2,
        ContainerUnknown = 3,
    }

    /// `ContainerStateValue`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ContainerStateValue {
        #[prost(enumeration = "ContainerState", tag = "1")]
        pub state: i32,
    }

    /// `ContainerFilter`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ContainerFilter {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub state: Option<ContainerStateValue>,
        #[prost(string, tag = "3")]
        pub pod_sandbox_id: String,
        #[prost(map = "string, string", tag = "4")]
        pub label_selector: HashMap<String, String>,
    }

    /// `ListContainersRequest`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ListContainersRequest {
        #[prost(message, optional, tag = "1")]
        pub filter: Option<ContainerFilter>,
    }

    /// `ListContainersResponse`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ListContainersResponse {
        #[prost(message, repeated, tag = "1")]
        pub containers: Vec<Container>,
    }

    /// `Container`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Container {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "3")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(message, optional, tag = "4")]
        pub image: Option<ImageSpec>,
        #[prost(string, tag = "5")]
        pub image_ref: String,
        #[prost(enumeration = "ContainerState", tag = "6")]
        pub state: i32,
        #[prost(int64, tag = "7")]
        pub created_at: i64,
    }

    /// `ContainerStatusRequest`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ContainerStatusRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }

    /// `ContainerStatusResponse`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ContainerStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<ContainerStatus>,
        #[prost(map = "string, string", tag = "2")]
        pub info: HashMap<String, String>,
    }

    /// `ContainerStatus`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ContainerStatus {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(enumeration = "ContainerState", tag = "3")]
        pub state: i32,
        #[prost(int64, tag = "4")]
        pub created_at: i64,
        #[prost(int64, tag = "5")]
        pub started_at: i64,
        #[prost(int64, tag = "6")]
        pub finished_at: i64,
        #[prost(int32, tag = "7")]
        pub exit_code: i32,
        #[prost(message, optional, tag = "8")]
        pub image: Option<ImageSpec>,
        #[prost(string, tag = "9")]
        pub image_ref: String,
        #[prost(string, tag = "10")]
        pub reason: String,
        #[prost(string, tag = "11")]
        pub message: String,
        #[prost(string, tag = "15")]
        pub log_path: String,
    }

    /// `ImageStatusRequest`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ImageStatusRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }

    /// `ImageStatusResponse`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ImageStatusResponse {
        /// None when the runtime does not have the image.
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }

    /// `Image`
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Image {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, repeated, tag = "2")]
        pub repo_tags: Vec<String>,
        #[prost(string, repeated, tag = "3")]
        pub repo_digests: Vec<String>,
        #[prost(uint64, tag = "4")]
        pub size: u64,
    }
}
