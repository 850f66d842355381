//! `cargo xtask kind up|down`, and the [`Shell`] every kind command runs through: commands
//! printed as shell lines, run unless `--dry-run`.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    KindCommand, AGENT, AGENT_NAMESPACE, AGENT_SELECTOR, CA_SECRET, CLUSTER, CLUSTER_CONFIG,
    CONTAINERFILE, CONTEXT, IMAGE, ISTIOD_NAMESPACE, LAB_ISTIOD, ROOT_CERT_CONFIGMAP,
};

/// The mesh CA: Istio's plug-in CA Secret's files.
const CA_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
];
/// Where `up` keeps the lab's CA (made once, reused by later `up`s).
const CA_DIR: &str = "target/kind/ca";

pub(super) fn up(sh: &Shell) -> Result<()> {
    sh.require(KindCommand::Up, &[Tool::Docker, Tool::Kind, Tool::Kubectl])?;

    sh.say("== the kind cluster: one control-plane, two workers");
    let clusters = sh.output("CLUSTERS", &words("kind get clusters"))?;
    if !sh.dry_run && clusters.lines().any(|c| c.trim() == CLUSTER) {
        sh.say(&format!("cluster {CLUSTER} exists; kept"));
        sh.run(&words(&format!("kind export kubeconfig --name {CLUSTER}")))?;
    } else {
        let create = format!("kind create cluster --name {CLUSTER} --config {CLUSTER_CONFIG}");
        sh.run(&words(&create))?;
    }

    sh.say("== the image (the first build takes a while: Rust, nightly and bpf-linker)");
    sh.run(&words(&format!(
        "docker build -f {CONTAINERFILE} -t {IMAGE} ."
    )))?;
    sh.run(&words(&format!(
        "kind load docker-image {IMAGE} --name {CLUSTER}"
    )))?;

    sh.say("== the mesh CA (Istio's plug-in CA layout), made once");
    let ca_dir = sh.root.join(CA_DIR);
    if sh.dry_run || !ca_dir.join("root-cert.pem").exists() {
        if !sh.dry_run {
            fs::create_dir_all(&ca_dir)
                .with_context(|| format!("creating {}", ca_dir.display()))?;
        }
        let volume = format!("{}:/ca", ca_dir.display());
        let user = format!("{}:{}", current_uid(), current_gid());
        sh.run(&[
            "docker", "run", "--rm", "--user", &user, "-v", &volume, IMAGE, "ca", "init", "--dir",
            "/ca",
        ])?;
    } else {
        sh.say(&format!("reusing the CA in {CA_DIR}"));
    }
    // The CA key goes to the stand-in istiod only (as with Istio, where istiod holds it):
    // no node holds it, the nodes send CSRs.
    sh.say("== the stand-in istiod (kind-config/istiod.yaml), holding the CA in istio-system");
    sh.run(&kubectl(&format!("apply -f {LAB_ISTIOD}")))?;
    let secret = format!("-n {ISTIOD_NAMESPACE} delete secret {CA_SECRET} --ignore-not-found");
    sh.run(&kubectl(&secret))?;
    // Whole words: the workspace's path may contain spaces.
    let mut create = kubectl(&format!(
        "-n {ISTIOD_NAMESPACE} create secret generic {CA_SECRET}"
    ));
    create.extend(
        CA_FILES
            .iter()
            .map(|f| format!("--from-file={f}={}", ca_dir.join(f).display())),
    );
    sh.run(&create)?;
    sh.run(&kubectl(&format!(
        "-n {ISTIOD_NAMESPACE} rollout restart deployment/istiod"
    )))?;
    sh.run(&kubectl(&format!(
        "-n {ISTIOD_NAMESPACE} rollout status deployment/istiod --timeout=300s"
    )))?;
    // istiod publishes its root in every namespace as this ConfigMap; the stand-in does not.
    sh.run(&kubectl("apply -f deploy/namespace.yaml"))?;
    let root =
        format!("-n {AGENT_NAMESPACE} delete configmap {ROOT_CERT_CONFIGMAP} --ignore-not-found");
    sh.run(&kubectl(&root))?;
    let mut create = kubectl(&format!(
        "-n {AGENT_NAMESPACE} create configmap {ROOT_CERT_CONFIGMAP}"
    ));
    create.push(format!(
        "--from-file=root-cert.pem={}",
        ca_dir.join("root-cert.pem").display()
    ));
    sh.run(&create)?;

    sh.say("== Ambit's DaemonSet");
    let daemonset = format!("-n {AGENT_NAMESPACE} get daemonset {AGENT}");
    let existing = sh.output(
        "EXISTING",
        &kubectl(&format!("{daemonset} -o name --ignore-not-found")),
    )?;
    sh.run(&kubectl("apply -k deploy/"))?;
    let restart = kubectl(&format!(
        "-n {AGENT_NAMESPACE} rollout restart daemonset/{AGENT}"
    ));
    if sh.dry_run {
        sh.show_with_note(
            &restart,
            "only when the DaemonSet existed before: the new ambit:dev image",
        );
    } else if !existing.trim().is_empty() {
        sh.run(&restart)?;
    }
    sh.run(&kubectl(&format!(
        "-n {AGENT_NAMESPACE} rollout status daemonset/{AGENT} --timeout=300s"
    )))?;
    sh.run(&kubectl(&format!(
        "-n {AGENT_NAMESPACE} get pods -l {AGENT_SELECTOR} -o wide"
    )))?;
    sh.say("\n== Ambit runs on every node; next: cargo xtask kind demo");
    Ok(())
}

pub(super) fn down(sh: &Shell) -> Result<()> {
    sh.require(KindCommand::Down, &[Tool::Docker, Tool::Kind])?;
    sh.run(&words(&format!("kind delete cluster --name {CLUSTER}")))?;
    sh.say(&format!(
        "== cluster {CLUSTER} deleted (the lab CA stays in {CA_DIR} for the next up)"
    ));
    Ok(())
}

/// A command written as one line: its words, split at spaces (so none may contain one).
pub(super) fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

/// `kubectl --context kind-ambit ARGS` (as [`words`]): never the user's current context.
pub(super) fn kubectl(args: &str) -> Vec<String> {
    words(&format!("kubectl --context {CONTEXT} {args}"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Tool {
    Docker,
    Kind,
    Kubectl,
}

/// Runs commands from the workspace root, printing each as `+ command`; in dry-run mode only
/// prints them.
pub(super) struct Shell {
    pub(super) dry_run: bool,
    pub(super) root: PathBuf,
}

impl Shell {
    pub(super) fn say(&self, text: &str) {
        if self.dry_run {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                println!("# {}", line.trim_start_matches("== ").trim());
            }
        } else {
            println!("{text}");
        }
    }

    pub(super) fn show<S: AsRef<str>>(&self, args: &[S]) {
        println!("+ {}", shell_line(args));
    }

    pub(super) fn show_with_note<S: AsRef<str>>(&self, args: &[S], note: &str) {
        println!("+ {}    # {note}", shell_line(args));
    }

    pub(super) fn command<S: AsRef<str>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(args[0].as_ref());
        cmd.args(args[1..].iter().map(|a| a.as_ref()))
            .current_dir(&self.root);
        cmd
    }

    /// Runs a command with the terminal's output; fails when it fails.
    pub(super) fn run<S: AsRef<str>>(&self, args: &[S]) -> Result<()> {
        self.show(args);
        if self.dry_run {
            return Ok(());
        }
        let status = self
            .command(args)
            .status()
            .with_context(|| format!("running {}", shell_line(args)))?;
        if !status.success() {
            bail!("`{}` failed ({status})", shell_line(args));
        }
        Ok(())
    }

    /// Runs a command for its output, trimmed (printed as `+ VAR=$(command)`); in dry-run mode
    /// returns `$VAR`, which later commands print as a shell variable.
    pub(super) fn output<S: AsRef<str>>(&self, var: &str, args: &[S]) -> Result<String> {
        println!("+ {var}=$({})", shell_line(args));
        if self.dry_run {
            return Ok(format!("${var}"));
        }
        let out = self
            .command(args)
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running {}", shell_line(args)))?;
        if !out.status.success() {
            bail!(
                "`{}` failed: {}",
                shell_line(args),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(value)
    }

    /// Runs a command (printed once) every 2 s until `done(stdout)`, for at most `timeout`.
    pub(super) fn poll<S: AsRef<str>>(
        &self,
        args: &[S],
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<()> {
        self.show_with_note(args, "repeated until it shows the pod");
        if self.dry_run {
            return Ok(());
        }
        let start = Instant::now();
        let mut last = String::new();
        loop {
            if let Ok(out) = self.command(args).stderr(Stdio::piped()).output() {
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                if done(&stdout) {
                    return Ok(());
                }
                last = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
            }
            if start.elapsed() > timeout {
                bail!("still not there after {timeout:?}; last output:\n{last}");
            }
            thread::sleep(Duration::from_secs(2));
        }
    }

    /// Checks that the tools are there (Docker: an engine that answers); names every missing
    /// one and stops.
    pub(super) fn require(&self, cmd: KindCommand, tools: &[Tool]) -> Result<()> {
        let mut missing = Vec::new();
        for tool in tools {
            let (check, name, hint): (&[&str], &str, &str) = match tool {
                Tool::Docker => (
                    &["docker", "info", "--format", "{{.ServerVersion}}"],
                    "docker",
                    "Docker Engine, running, with this user allowed on its socket",
                ),
                Tool::Kind => (
                    &["kind", "version"],
                    "kind",
                    "https://kind.sigs.k8s.io/docs/user/quick-start/#installation",
                ),
                Tool::Kubectl => (
                    &["kubectl", "version", "--client"],
                    "kubectl",
                    "https://kubernetes.io/docs/tasks/tools/",
                ),
            };
            self.show(check);
            if self.dry_run {
                continue;
            }
            match Command::new(check[0])
                .args(&check[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
            {
                Err(_) => missing.push(format!("{name} is not installed ({hint})")),
                Ok(out) if !out.status.success() => {
                    let why = String::from_utf8_lossy(&out.stderr);
                    let why = why.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                    let what = if *tool == Tool::Docker {
                        "the docker CLI is here but no Docker engine answers"
                    } else {
                        "installed but does not run"
                    };
                    missing.push(format!(
                        "{name}: {what}: `{}` failed: {} ({hint})",
                        shell_line(check),
                        why.trim()
                    ));
                }
                Ok(_) => {}
            }
        }
        if !missing.is_empty() {
            bail!(
                "cargo xtask kind {} needs what this machine lacks:\n  - {}\n(cargo xtask kind {} --dry-run prints the commands instead)",
                cmd.name(),
                missing.join("\n  - "),
                cmd.name()
            );
        }
        Ok(())
    }
}

/// One command line in shell syntax: plain words bare, `$VARIABLES` (dry-run placeholders) in
/// double quotes, anything else in single quotes.
pub(super) fn shell_line<S: AsRef<str>>(args: &[S]) -> String {
    args.iter()
        .map(|a| quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        return arg.to_owned();
    }
    let placeholder_only = arg.contains('$')
        && !arg.contains(['"', '\\', '`'])
        && !arg.contains("$(")
        && !arg.contains("${");
    if placeholder_only {
        return format!("\"{arg}\"");
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

fn current_gid() -> u32 {
    // SAFETY: getgid has no preconditions.
    unsafe { libc::getgid() }
}
