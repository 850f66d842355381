//! Istio's ztunnel as a peer in the lab: the interop tests and the benchmark's `ztunnel` mode run
//! it in a lab pod, in dedicated mode (one ztunnel serving the one workload of its netns), with
//! its test CA (`FAKE_CA=true`) and a local config file instead of istiod.
//!
//! Which ztunnel: `AMBIT_ZTUNNEL_BIN`, else `ztunnel` on PATH, else none; its test CA (`root-cert.pem`,
//! `ca-key.pem`) is read from `AMBIT_ZTUNNEL_FAKE_CA`, else `fake-ca/` beside the binary. Ambit
//! takes that CA as an Istio plug-in CA ([`Ztunnel::write_plugin_ca`]) so that both sides chain
//! to one root.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::{capture::TUNNEL_MARK, system::run, Lab};

/// A ztunnel binary and the test CA its `FAKE_CA` mode signs with.
#[derive(Debug, Clone)]
pub struct Ztunnel {
    pub bin: PathBuf,
    pub fake_ca: PathBuf,
}

impl Ztunnel {
    /// The ztunnel to test against, or why there is none (for the one line a skipped suite
    /// prints).
    pub fn find() -> std::result::Result<Ztunnel, String> {
        let bin = match std::env::var_os("AMBIT_ZTUNNEL_BIN") {
            Some(bin) => PathBuf::from(bin),
            None => std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join("ztunnel"))
                .find(|bin| bin.is_file())
                .ok_or(
                    "no ztunnel on PATH (set AMBIT_ZTUNNEL_BIN to Istio's ztunnel, built with \
                        its `testing` feature)",
                )?,
        };
        if !bin.is_file() {
            return Err(format!(
                "no ztunnel binary at {} (AMBIT_ZTUNNEL_BIN: Istio's ztunnel, built with its \
                 `testing` feature)",
                bin.display()
            ));
        }
        let fake_ca = match std::env::var_os("AMBIT_ZTUNNEL_FAKE_CA") {
            Some(dir) => PathBuf::from(dir),
            None => bin.parent().unwrap_or(Path::new(".")).join("fake-ca"),
        };
        for file in ["root-cert.pem", "ca-key.pem"] {
            if !fake_ca.join(file).is_file() {
                return Err(format!(
                    "no {file} in {} (ztunnel's FAKE_CA test CA; set AMBIT_ZTUNNEL_FAKE_CA)",
                    fake_ca.display()
                ));
            }
        }
        Ok(Ztunnel { bin, fake_ca })
    }

    /// Writes ztunnel's test CA in Istio's plug-in CA layout into `dir` (for `ambit node
    /// --ca-dir`): the root is its own signing certificate and whole chain.
    pub fn write_plugin_ca(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let root = self.fake_ca.join("root-cert.pem");
        for name in ["ca-cert.pem", "root-cert.pem", "cert-chain.pem"] {
            fs::copy(&root, dir.join(name))
                .with_context(|| format!("copying {} to {}", root.display(), dir.display()))?;
        }
        fs::copy(self.fake_ca.join("ca-key.pem"), dir.join("ca-key.pem"))
            .with_context(|| format!("copying the test CA's key to {}", dir.display()))?;
        Ok(())
    }
}

/// One ztunnel in a lab pod.
#[derive(Debug, Clone)]
pub struct ZtunnelPod<'a> {
    pub pod: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// Where its config and certificates come from.
    pub source: ZtunnelSource<'a>,
    pub log: &'a Path,
    /// `ZTUNNEL_WORKER_THREADS`.
    pub worker_threads: usize,
    /// `COMPLIANCE_POLICY`: empty or `pqc`.
    pub compliance_policy: &'a str,
}

/// Where a lab ztunnel gets its config and its certificates.
#[derive(Debug, Clone)]
pub enum ZtunnelSource<'a> {
    /// A local config file (`workloads`, `services`, `policies` only: ztunnel refuses unknown
    /// fields, so Ambit's `ambit` section must not be in it; see [`without_ambit_section`]) and
    /// certificates from its test CA (`FAKE_CA`).
    LocalConfig(&'a Path),
    /// An istiod (or Ambit's stand-in) at `address` (`https://host:port`) for both xDS and the
    /// CA, verified with `root_cert`, authenticated with the token in `token`.
    Istiod {
        address: &'a str,
        root_cert: &'a Path,
        token: &'a Path,
    },
}

impl Lab {
    /// Starts ztunnel in a pod as Istio's dedicated mode runs it: outbound TCP of the pod (not
    /// to loopback, not ztunnel's own marked sockets) redirected to its 15001 by an iptables
    /// rule in the pod's netns; waits until `/healthz/ready` answers 200. The process is the
    /// lab's `ztunnel in <pod>`, stopped with the lab.
    pub fn start_ztunnel(&mut self, ztunnel: &Ztunnel, spec: &ZtunnelPod<'_>) -> Result<()> {
        let pod = spec.pod;
        // ztunnel's connections to istiod are not marked: keep them out of its own capture.
        let capture = match &spec.source {
            ZtunnelSource::LocalConfig(_) => "! -o lo".to_owned(),
            ZtunnelSource::Istiod { address, .. } => {
                let host = address
                    .trim_start_matches("https://")
                    .rsplit_once(':')
                    .map_or(*address, |(host, _)| host);
                format!("! -o lo ! -d {host}")
            }
        };
        self.redirect_outbound(pod, &capture)?;
        let mut cmd = self.pod_command(pod, ztunnel.bin.to_str().unwrap());
        cmd.env_clear()
            .env("PROXY_MODE", "dedicated")
            .env(
                "PROXY_WORKLOAD_INFO",
                format!("{}/{pod}/{}", spec.namespace, spec.service_account),
            )
            .env("NODE_NAME", self.node_name(crate::pod(pod).node))
            .env("POD_NAME", pod)
            .env("POD_NAMESPACE", spec.namespace)
            .env("INSTANCE_IP", crate::pod(pod).ip)
            .env("PACKET_MARK", TUNNEL_MARK.to_string())
            .env("ENABLE_ORIG_SRC", "false")
            .env("ZTUNNEL_WORKER_THREADS", spec.worker_threads.to_string())
            .env("COMPLIANCE_POLICY", spec.compliance_policy)
            .env("RUST_LOG", "info");
        match &spec.source {
            ZtunnelSource::LocalConfig(config) => {
                cmd.env("LOCAL_XDS_PATH", config)
                    .env("XDS_ADDRESS", "")
                    .env("FAKE_CA", "true");
            }
            ZtunnelSource::Istiod {
                address,
                root_cert,
                token,
            } => {
                cmd.env("XDS_ADDRESS", address)
                    .env("CA_ADDRESS", address)
                    .env("XDS_ROOT_CA", root_cert)
                    .env("CA_ROOT_CA", root_cert)
                    .env("AUTH_TOKEN", token);
            }
        }
        let netns = self.netns(pod);
        let ready = || http_status_in(&netns, "http://127.0.0.1:15021/healthz/ready") == Some(200);
        self.spawn_until_ready(&format!("ztunnel in {pod}"), cmd, spec.log, ready)
    }

    /// Stops the ztunnel of a pod and removes its capture rule.
    pub fn stop_ztunnel(&mut self, pod: &str) -> Result<()> {
        self.stop(&format!("ztunnel in {pod}"))?;
        self.remove_redirect(pod)
    }

    /// The Prometheus text of the ztunnel in `pod` (its `/metrics` on 15020).
    pub fn ztunnel_metrics(&self, pod: &str) -> Result<String> {
        let mut curl = self.pod_command(pod, "curl");
        curl.args(["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"]);
        run(&mut curl, &format!("ztunnel metrics in pod {pod}"))
    }
}

/// The HTTP status of a GET from inside netns `netns` (over its loopback), if any answer came.
fn http_status_in(netns: &str, url: &str) -> Option<u16> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-s", "-o"])
        .args(["/dev/null", "-w", "%{http_code}", "--max-time", "2", url])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// A lab config without its `ambit` section (the last top-level key), for ztunnel, which
/// refuses unknown fields.
pub fn without_ambit_section(config: &str) -> String {
    split_mesh_and_pods(config).0
}

/// A lab config's two halves: the mesh (`workloads`, `services`, `policies`: what istiod, or
/// the stand-in, serves) and the `ambit` section (where the nodes' pods are: what a node under
/// `--source xds` reads from its `--config`). Without an `ambit` section, no pods.
pub fn split_mesh_and_pods(config: &str) -> (String, String) {
    match config.find("\nambit:") {
        Some(at) => (config[..=at].to_owned(), config[at + 1..].to_owned()),
        None => (config.to_owned(), "ambit:\n  pods: []\n".to_owned()),
    }
}

/// The `ambit node` flags of a node fed by an istiod (or the stand-in) at `address`: the mesh
/// over xDS and certificates from its CA, both verified with `root_cert`, with the token in
/// `token`.
pub fn xds_node_args(address: &str, root_cert: &Path, token: &Path) -> Vec<String> {
    let (root, token) = (root_cert.display().to_string(), token.display().to_string());
    [
        "--source",
        "xds",
        "--xds-address",
        address,
        "--xds-root-cert",
        &root,
        "--ca-address",
        address,
        "--token-file",
        &token,
    ]
    .map(str::to_owned)
    .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ambit_section_is_cut() {
        let config = "workloads: []\nservices: []\npolicies: []\nambit:\n  pods: []\n";
        assert_eq!(
            without_ambit_section(config),
            "workloads: []\nservices: []\npolicies: []\n"
        );
        assert_eq!(without_ambit_section("workloads: []\n"), "workloads: []\n");
        assert_eq!(
            split_mesh_and_pods(config),
            (
                "workloads: []\nservices: []\npolicies: []\n".to_owned(),
                "ambit:\n  pods: []\n".to_owned()
            )
        );
    }
}
