//! `cargo xtask validate-manifests`: every YAML under deploy/ against the Kubernetes schemas
//! (PyPI's kubernetes-validate, in a venv under target/), then read into k8s-openapi's types
//! for what no schema knows: the kustomizations list every manifest, kind's cluster config is
//! the lab's, RBAC grants what the agent reads, pod templates keep API rules the schemas do not
//! carry, the sample apps are what the demo calls, the image installs what the DaemonSet runs,
//! and the DaemonSet agrees with the code (daemonset.rs; its CNI installer: installer.rs).

mod daemonset;
mod installer;
mod node_flags;

use std::{
    collections::BTreeSet,
    fmt::Display,
    fs,
    ops::Range,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        batch::v1::Job,
        core::v1::{Container, Namespace, Pod, PodSpec, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::{de::IgnoredAny, Deserialize};

use super::{
    AGENT, AGENT_NAMESPACE, CLUSTER, CLUSTER_CONFIG, CONTAINERFILE, DEMO_CLIENT, DEMO_NAMESPACE,
    DEMO_SERVER, DEMO_SERVER_POD_PORT, DEMO_SERVER_SERVICE_PORT, LAB_ISTIOD,
};
use crate::util::workspace_root;

const DOCKERIGNORE: &str = ".dockerignore";
const BINARY_IN_IMAGE: &str = "/usr/local/bin/ambit";
/// The optional ClusterRole that lets the agent write `ambient.istio.io/redirection: enabled`.
const ANNOTATE_ROLE: &str = "ambit-annotate";

/// The schema validator and the Kubernetes versions checked: 1.30 is the oldest the DaemonSet
/// can run on (securityContext.appArmorProfile), 1.37 the newest the validator knows.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
const VALIDATOR_VENV: &str = "target/kubernetes-validate";

/// What the read-only ClusterRole must grant, exactly: (API group, resource).
const READ_RESOURCES: &[(&str, &str)] = &[
    ("", "pods"),
    ("", "namespaces"),
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
];

/// Validates every YAML under deploy/ against the Kubernetes schemas and kind's cluster config
/// structurally, and checks that the DaemonSet matches the code. Fails listing every problem.
pub fn validate_manifests() -> Result<()> {
    let root = workspace_root();
    let mut yaml_files = Vec::new();
    collect_yaml(&root.join("deploy"), &mut yaml_files)?;
    yaml_files.sort();
    if yaml_files.is_empty() {
        bail!("no YAML under {}", root.join("deploy").display());
    }
    let (kustomizations, object_files): (Vec<PathBuf>, Vec<PathBuf>) = yaml_files
        .iter()
        .cloned()
        .partition(|f| is_kustomization(f));

    let mut problems = check_schemas(&root, &object_files)?;
    // The kind lab's stand-in istiod: not part of deploy/, but a manifest all the same.
    problems.extend(check_schemas(&root, &[root.join(LAB_ISTIOD)])?);
    let (mut objects, mut unreadable) = (Vec::new(), Vec::new());
    let lab_istiod = parse_objects(LAB_ISTIOD, &read(&root.join(LAB_ISTIOD))?, &mut unreadable);
    check_pod_templates(&Manifests(lab_istiod.iter().collect()), &mut problems);
    for file in &object_files {
        let text = read(file)?;
        objects.extend(parse_objects(
            &relative(&root, file),
            &text,
            &mut unreadable,
        ));
    }
    check_kustomizations(&root, &kustomizations, &object_files, &mut problems)?;
    check_kind_config(&read(&root.join(CLUSTER_CONFIG))?, &mut problems);
    let mut summary = String::new();
    // An object that did not parse would only show up again below as missing.
    if unreadable.is_empty() {
        let m = Manifests(objects.iter().collect());
        let flags = node_flags::node_flags()?;
        summary = daemonset::check_daemonset(&root, &flags, &m, &mut problems);
        check_rbac(&m, &mut problems);
        check_pod_templates(&m, &mut problems);
        check_samples(&m.samples(), &mut problems);
    }
    problems.extend(unreadable);
    check_image_build(&root, &mut problems);

    if !problems.is_empty() {
        bail!(
            "the manifests have {} problem(s):\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        );
    }
    println!(
        "manifests: {} files, {} objects valid against Kubernetes {}; {CLUSTER_CONFIG} well-formed; {summary}",
        yaml_files.len(),
        objects.len(),
        KUBERNETES_VERSIONS.join(" and ")
    );
    Ok(())
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let extension = path.extension().and_then(|e| e.to_str());
        if path.is_dir() {
            collect_yaml(&path, out)?;
        } else if matches!(extension, Some("yaml" | "yml")) {
            out.push(path);
        }
    }
    Ok(())
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n == "kustomization.yaml" || n == "kustomization.yml")
}

fn relative(root: &Path, file: &Path) -> String {
    file.strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string()
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// kubernetes-validate on every object (strict: unknown fields are errors), for the oldest and
/// the newest Kubernetes version; returns its complaints.
fn check_schemas(root: &Path, files: &[PathBuf]) -> Result<Vec<String>> {
    let venv = validator_venv(root)?;
    let files: Vec<String> = files.iter().map(|f| relative(root, f)).collect();
    let mut problems = Vec::new();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(venv.join("bin").join(KUBERNETES_VALIDATE))
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(&files)
            .current_dir(root)
            .output()
            .context("running kubernetes-validate")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let text = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            // kubernetes-validate only warns about a kind it has no schema for: here that is a
            // typo in apiVersion or kind, so it is an error too.
            problems.push(format!("Kubernetes {version}: {}", line.trim()));
        }
        if !out.status.success() && text.trim().is_empty() {
            let status = out.status;
            problems.push(format!(
                "Kubernetes {version}: kubernetes-validate failed ({status})"
            ));
        }
    }
    Ok(problems)
}

/// The venv with kubernetes-validate (and PyYAML, which it depends on), made once.
fn validator_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join(VALIDATOR_VENV);
    let tool = venv.join("bin").join(KUBERNETES_VALIDATE);
    let installed = Command::new(&tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == KUBERNETES_VALIDATE_VERSION);
    if installed {
        return Ok(venv);
    }
    if !venv.join("bin/python").exists() {
        eprintln!("xtask: creating {} (Python venv)", venv.display());
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("running python3 -m venv (Debian: apt-get install python3-venv)")?;
        if !status.success() {
            let _ = fs::remove_dir_all(&venv);
            bail!("python3 -m venv failed: install Debian's python3-venv");
        }
    }
    let package = format!("{KUBERNETES_VALIDATE}=={KUBERNETES_VALIDATE_VERSION}");
    eprintln!("xtask: installing {package} from PyPI into it");
    // `python -m pip`, not `bin/pip`: a venv that was moved keeps stale script shebangs.
    let status = Command::new(venv.join("bin/python"))
        .args("-m pip install --force-reinstall --quiet --disable-pip-version-check".split(' '))
        .arg(&package)
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("pip install {package} failed");
    }
    Ok(venv)
}

// ---------------------------------------------------------------------------------------------
// The objects, typed
// ---------------------------------------------------------------------------------------------

/// One Kubernetes object of a manifest under deploy/.
struct Object {
    /// Relative to the workspace root.
    file: String,
    kind: String,
    meta: ObjectMeta,
    typed: Typed,
}

/// Picks one of [`Typed`]'s types out of it.
trait Kind: 'static {
    fn pick(typed: &Typed) -> Option<&Self>;
}

/// The kinds the checks read, each as its k8s-openapi type (which also checks `apiVersion`);
/// any other kind is left to the schema check.
macro_rules! typed_kinds {
    ($($kind:ident),*) => {
        enum Typed {
            $($kind(Box<$kind>),)*
            Other,
        }

        impl Typed {
            fn parse(kind: &str, doc: serde_yaml::Deserializer) -> Result<Self, serde_yaml::Error> {
                Ok(match kind {
                    $(stringify!($kind) => Typed::$kind(Box::new($kind::deserialize(doc)?)),)*
                    _ => Typed::Other,
                })
            }
        }

        $(impl Kind for $kind {
            fn pick(typed: &Typed) -> Option<&Self> {
                match typed {
                    Typed::$kind(object) => Some(object),
                    _ => None,
                }
            }
        })*
    };
}

typed_kinds!(
    Namespace,
    ServiceAccount,
    ClusterRole,
    ClusterRoleBinding,
    DaemonSet,
    Deployment,
    StatefulSet,
    Job,
    Pod,
    Service
);

impl Object {
    fn name(&self) -> &str {
        self.meta.name.as_deref().unwrap_or("")
    }

    fn describe(&self) -> String {
        format!("{} {} ({})", self.kind, self.name(), self.file)
    }

    fn in_samples(&self) -> bool {
        self.file.starts_with("deploy/samples/")
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.meta.labels.as_ref()?.get(key).map(String::as_str)
    }

    fn pod_spec(&self) -> Option<&PodSpec> {
        match &self.typed {
            Typed::DaemonSet(o) => o.spec.as_ref()?.template.spec.as_ref(),
            Typed::Deployment(o) => o.spec.as_ref()?.template.spec.as_ref(),
            Typed::StatefulSet(o) => o.spec.as_ref()?.template.spec.as_ref(),
            Typed::Job(o) => o.spec.as_ref()?.template.spec.as_ref(),
            Typed::Pod(o) => o.spec.as_ref(),
            _ => None,
        }
    }
}

/// What a document says it is, read before the document is read as that.
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
}

/// The objects of one multi-document manifest. A document that does not parse, or does not
/// fit its kind's type, is a problem naming the file, the object and the field (serde_yaml's
/// path, line and column).
fn parse_objects(file: &str, text: &str, problems: &mut Vec<String>) -> Vec<Object> {
    let mut text = text.to_owned();
    loop {
        let (mut objects, mut errors) = (Vec::new(), Vec::new());
        let heads = serde_yaml::Deserializer::from_str(&text);
        let docs = serde_yaml::Deserializer::from_str(&text);
        for (i, (head, doc)) in heads.zip(docs).enumerate() {
            let head = match Option::<Head>::deserialize(head) {
                Ok(Some(head)) => head,
                Ok(None) => continue, // an empty document
                // After a syntax error serde_yaml yields that error for ever.
                Err(e) => {
                    errors.push((format!("document {}", i + 1), e));
                    break;
                }
            };
            let (kind, meta) = (head.kind, head.metadata);
            match Typed::parse(&kind, doc) {
                Ok(typed) => objects.push(Object {
                    file: file.to_owned(),
                    kind,
                    meta,
                    typed,
                }),
                Err(e) => errors.push((format!("{kind} {}", meta.name.unwrap_or_default()), e)),
            }
        }
        match errors.iter().find_map(|(_, e)| yaml11_octal(&text, e)) {
            Some((at, decimal)) => text.replace_range(at, &decimal),
            None => {
                let errors = errors
                    .iter()
                    .map(|(what, e)| format!("{file}: {what}: {e}"));
                problems.extend(errors);
                return objects;
            }
        }
    }
}

/// Kubernetes reads YAML 1.1, where a plain `0400` is an octal integer (a volume's
/// `defaultMode`); serde_yaml reads YAML 1.2, where it is a string. When a type wanted an
/// integer and found such a string, this is where it is and its value in decimal, to write
/// there before reading the file again.
fn yaml11_octal(text: &str, e: &serde_yaml::Error) -> Option<(Range<usize>, String)> {
    if !e.to_string().contains("invalid type: string") {
        return None;
    }
    let start = e.location()?.index();
    let rest = text.get(start..)?;
    let (token, after) = rest.split_at(
        rest.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len()),
    );
    let plain =
        after.is_empty() || after.starts_with(|c: char| c.is_whitespace() || ",]}#".contains(c));
    if !plain || token.len() < 2 || !token.starts_with('0') {
        return None;
    }
    let value = u64::from_str_radix(token, 8).ok()?;
    Some((start..start + token.len(), value.to_string()))
}

struct Manifests<'a>(Vec<&'a Object>);

impl<'a> Manifests<'a> {
    fn all<T: Kind>(&self) -> impl Iterator<Item = (&'a Object, &'a T)> + '_ {
        self.0.iter().filter_map(|o| Some((*o, T::pick(&o.typed)?)))
    }

    fn named<T: Kind>(&self, name: &str) -> Option<(&'a Object, &'a T)> {
        self.all::<T>().find(|(o, _)| o.name() == name)
    }

    fn samples(&self) -> Manifests<'a> {
        Manifests(self.0.iter().copied().filter(|o| o.in_samples()).collect())
    }
}

/// The problems of one object, each prefixed with it.
struct Report<'a> {
    at: String,
    problems: &'a mut Vec<String>,
}

impl<'a> Report<'a> {
    fn new(object: &Object, problems: &'a mut Vec<String>) -> Self {
        let at = object.describe();
        Report { at, problems }
    }

    fn add(&mut self, problem: impl Display) {
        self.problems.push(format!("{}: {problem}", self.at));
    }
}

/// An absent list of the API is an empty one.
fn list<T>(items: &Option<Vec<T>>) -> &[T] {
    items.as_deref().unwrap_or_default()
}

fn int_or_string(value: &IntOrString) -> String {
    match value {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => s.clone(),
    }
}

fn containers(pod: &PodSpec) -> impl Iterator<Item = &Container> {
    pod.containers.iter().chain(list(&pod.init_containers))
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

/// The fields of a kustomization.yaml that are checked.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kustomization {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
}

/// Each kustomization is one, its resources exist, and it lists every manifest beside it (none
/// is forgotten).
fn check_kustomizations(
    root: &Path,
    kustomizations: &[PathBuf],
    object_files: &[PathBuf],
    problems: &mut Vec<String>,
) -> Result<()> {
    for file in kustomizations {
        let rel = relative(root, file);
        let k: Kustomization = match serde_yaml::from_str(&read(file)?) {
            Ok(k) => k,
            Err(e) => {
                problems.push(format!("{rel}: {e}"));
                continue;
            }
        };
        if k.api_version.as_deref() != Some("kustomize.config.k8s.io/v1beta1")
            || k.kind.as_deref() != Some("Kustomization")
        {
            problems.push(format!(
                "{rel}: not a kustomize.config.k8s.io/v1beta1 Kustomization"
            ));
        }
        let dir = file.parent().unwrap_or(root);
        for r in k.resources.iter().filter(|r| !dir.join(r).exists()) {
            problems.push(format!("{rel}: resources: {r} does not exist"));
        }
        for f in object_files.iter().filter(|f| f.parent() == Some(dir)) {
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            if !k.resources.iter().any(|r| *r == name) {
                problems.push(format!(
                    "{rel}: resources: does not list {name}, which is beside it"
                ));
            }
        }
    }
    Ok(())
}

/// kind's cluster config (v1alpha4). Every field kind knows is named, so that a misspelt one
/// fails to parse; a few are checked.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)] // the fields named only so that they are known
struct KindCluster {
    kind: Option<String>,
    api_version: Option<String>,
    name: Option<String>,
    #[serde(default)]
    nodes: Vec<KindNode>,
    networking: Option<IgnoredAny>,
    feature_gates: Option<IgnoredAny>,
    runtime_config: Option<IgnoredAny>,
    kubeadm_config_patches: Option<IgnoredAny>,
    #[serde(rename = "kubeadmConfigPatchesJSON6902")]
    kubeadm_config_patches_json6902: Option<IgnoredAny>,
    containerd_config_patches: Option<IgnoredAny>,
    #[serde(rename = "containerdConfigPatchesJSON6902")]
    containerd_config_patches_json6902: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)] // as KindCluster
struct KindNode {
    role: Option<String>,
    image: Option<IgnoredAny>,
    labels: Option<IgnoredAny>,
    extra_mounts: Option<IgnoredAny>,
    extra_port_mappings: Option<IgnoredAny>,
    kubeadm_config_patches: Option<IgnoredAny>,
    #[serde(rename = "kubeadmConfigPatchesJSON6902")]
    kubeadm_config_patches_json6902: Option<IgnoredAny>,
}

fn check_kind_config(text: &str, problems: &mut Vec<String>) {
    let mut p = |s: String| problems.push(format!("{CLUSTER_CONFIG}: {s}"));
    // One document: serde_yaml refuses more.
    let cluster: KindCluster = match serde_yaml::from_str(text) {
        Ok(c) => c,
        Err(e) => return p(e.to_string()),
    };
    if cluster.kind.as_deref() != Some("Cluster")
        || cluster.api_version.as_deref() != Some("kind.x-k8s.io/v1alpha4")
    {
        p("not a kind.x-k8s.io/v1alpha4 Cluster".into());
    }
    if cluster.name.as_deref() != Some(CLUSTER) {
        p(format!(
            "name must be {CLUSTER} (cargo xtask kind and the kubectl context kind-{CLUSTER} use it)"
        ));
    }
    let (mut control_planes, mut workers) = (0, 0);
    for (i, node) in cluster.nodes.iter().enumerate() {
        match node.role.as_deref() {
            Some("control-plane") => control_planes += 1,
            Some("worker") => workers += 1,
            other => p(format!(
                "nodes[{i}]: role {other:?} is neither control-plane nor worker"
            )),
        }
    }
    if control_planes != 1 || workers != 2 {
        p(format!(
            "nodes: the lab is one control-plane and two workers, not {control_planes} and {workers}"
        ));
    }
}

/// RBAC: the read-only role grants exactly what the Kubernetes source watches, the optional
/// role nothing but `patch` on `pods/status`, both are bound to the DaemonSet's ServiceAccount, and
/// everything of the agent is in its namespace.
fn check_rbac(m: &Manifests, problems: &mut Vec<String>) {
    let set = |items: &[String]| items.iter().cloned().collect::<BTreeSet<String>>();
    // Each rule as (API groups, resources, verbs).
    let rules = |role: &ClusterRole| -> Vec<_> {
        let rules = list(&role.rules).iter();
        rules
            .map(|r| {
                (
                    set(list(&r.api_groups)),
                    set(list(&r.resources)),
                    set(&r.verbs),
                )
            })
            .collect()
    };
    match m.named::<ClusterRole>(AGENT) {
        None => problems.push(format!("deploy/: no ClusterRole {AGENT}")),
        Some((object, role)) => {
            let mut r = Report::new(object, problems);
            let mut granted = BTreeSet::new();
            for (groups, resources, verbs) in rules(role) {
                // Read-only, and all three: reflectors list then watch.
                if verbs != set(&["get", "list", "watch"].map(String::from)) {
                    r.add(format!(
                        "rules: {resources:?} must be get, list and watch, not {verbs:?}"
                    ));
                }
                for g in &groups {
                    granted.extend(resources.iter().map(|res| (g.clone(), res.clone())));
                }
            }
            let wanted: BTreeSet<(String, String)> = READ_RESOURCES
                .iter()
                .map(|(g, res)| (g.to_string(), res.to_string()))
                .collect();
            for (g, res) in wanted.difference(&granted) {
                r.add(format!(
                    "rules: do not grant {res} (API group {g:?}), which the agent watches"
                ));
            }
            for (g, res) in granted.difference(&wanted) {
                r.add(format!(
                    "rules: grant {res} (API group {g:?}), which the agent does not read"
                ));
            }
        }
    }
    if let Some((object, role)) = m.named::<ClusterRole>(ANNOTATE_ROLE) {
        let only = |s: &str| BTreeSet::from([s.to_owned()]);
        if rules(role) != [(only(""), only("pods/status"), only("patch"))] {
            let problem = "rules must grant only patch on pods/status (the redirection annotation)";
            Report::new(object, problems).add(problem);
        }
    }
    let roles: BTreeSet<&str> = m.all::<ClusterRole>().map(|(o, _)| o.name()).collect();
    let bindings: Vec<(&Object, &ClusterRoleBinding)> = m.all().collect();
    for (object, binding) in &bindings {
        let mut r = Report::new(object, problems);
        let role = &binding.role_ref;
        if role.kind != "ClusterRole" || !roles.contains(role.name.as_str()) {
            r.add(format!(
                "roleRef binds {:?}, which is no ClusterRole in deploy/",
                role.name
            ));
        }
        for (i, s) in list(&binding.subjects).iter().enumerate() {
            let namespace = s.namespace.as_deref();
            if s.kind != "ServiceAccount" || s.name != AGENT || namespace != Some(AGENT_NAMESPACE) {
                r.add(format!(
                    "subjects[{i}] must be the ServiceAccount {AGENT_NAMESPACE}/{AGENT}"
                ));
            }
        }
    }
    for role in roles
        .iter()
        .filter(|role| !bindings.iter().any(|(_, b)| b.role_ref.name == **role))
    {
        problems.push(format!("ClusterRole {role} is bound to nobody"));
    }
    match m.named::<ServiceAccount>(AGENT) {
        Some((sa, _)) if sa.meta.namespace.as_deref() == Some(AGENT_NAMESPACE) => {}
        _ => problems.push(format!(
            "deploy/: no ServiceAccount {AGENT} in {AGENT_NAMESPACE}"
        )),
    }
    match m.named::<Namespace>(AGENT_NAMESPACE) {
        Some((ns, _)) if ns.label("pod-security.kubernetes.io/enforce") == Some("privileged") => {}
        _ => problems.push(format!(
            "deploy/: the Namespace {AGENT_NAMESPACE} must exist with pod-security.kubernetes.io/enforce: privileged (hostPath, capabilities, a privileged init container)"
        )),
    }
    let agent = m.0.iter().copied().filter(|o| !o.in_samples());
    check_namespace(agent, AGENT_NAMESPACE, problems);
}

/// Each object that names a namespace names this one.
fn check_namespace<'a>(
    objects: impl Iterator<Item = &'a Object>,
    namespace: &str,
    problems: &mut Vec<String>,
) {
    for object in objects {
        if object
            .meta
            .namespace
            .as_ref()
            .is_some_and(|ns| ns != namespace)
        {
            let problem = format!("metadata.namespace must be {namespace}");
            Report::new(object, problems).add(problem);
        }
    }
}

/// API rules the schemas do not carry, for every pod template under deploy/.
fn check_pod_templates(m: &Manifests, problems: &mut Vec<String>) {
    for object in &m.0 {
        let mut r = Report::new(object, problems);
        for c in object.pod_spec().into_iter().flat_map(containers) {
            let sc = c.security_context.as_ref();
            let privileged = sc.and_then(|s| s.privileged) == Some(true);
            let no_escalation = sc.and_then(|s| s.allow_privilege_escalation) == Some(false);
            let added = sc
                .and_then(|s| s.capabilities.as_ref())
                .map(|caps| list(&caps.add));
            let sys_admin = added
                .unwrap_or_default()
                .iter()
                .any(|cap| cap.trim_start_matches("CAP_") == "SYS_ADMIN");
            if no_escalation && (privileged || sys_admin) {
                r.add(format!(
                    "container {}: the API rejects securityContext.allowPrivilegeEscalation: false with privileged or SYS_ADMIN",
                    c.name
                ));
            }
            for mount in list(&c.volume_mounts) {
                if mount.mount_propagation.as_deref() == Some("Bidirectional") && !privileged {
                    r.add(format!(
                        "container {}: volumeMounts {}: the API allows Bidirectional mount propagation only in privileged containers",
                        c.name, mount.name
                    ));
                }
            }
        }
    }
}

/// The sample apps the demo relies on: an ambient namespace, the client and the server, a
/// Service whose selector and ports reach the server.
fn check_samples(samples: &Manifests, problems: &mut Vec<String>) {
    match samples.named::<Namespace>(DEMO_NAMESPACE) {
        Some((ns, _)) if ns.label("istio.io/dataplane-mode") == Some("ambient") => {}
        _ => problems.push(format!(
            "deploy/samples: the Namespace {DEMO_NAMESPACE} must be labelled istio.io/dataplane-mode=ambient"
        )),
    }
    check_namespace(samples.0.iter().copied(), DEMO_NAMESPACE, problems);
    let pod_labels = |d: &Deployment| {
        let template = &d.spec.as_ref()?.template;
        template.metadata.as_ref()?.labels.clone()
    };
    for (app, container) in [(DEMO_CLIENT, Some(DEMO_CLIENT)), (DEMO_SERVER, None)] {
        let Some((object, d)) = samples.named::<Deployment>(app) else {
            problems.push(format!("deploy/samples: no Deployment {app}"));
            continue;
        };
        let mut r = Report::new(object, problems);
        if pod_labels(d).and_then(|l| l.get("app").cloned()).as_deref() != Some(app) {
            r.add(format!(
                "spec.template.metadata.labels: pods must carry app={app} (the demo selects them so)"
            ));
        }
        let pod = object.pod_spec();
        let has = |name: &str| pod.is_some_and(|p| p.containers.iter().any(|c| c.name == name));
        if let Some(name) = container.filter(|name| !has(name)) {
            r.add(format!("no container {name} (the demo execs into it)"));
        }
    }
    let Some((object, svc)) = samples.named::<Service>(DEMO_SERVER) else {
        problems.push(format!("deploy/samples: no Service {DEMO_SERVER}"));
        return;
    };
    let mut r = Report::new(object, problems);
    let spec = svc.spec.as_ref();
    let selector = spec.and_then(|s| s.selector.clone()).unwrap_or_default();
    let server = samples.all::<Deployment>().find(|(_, d)| {
        let labels = pod_labels(d).unwrap_or_default();
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    });
    let Some((server, _)) = server else {
        return r.add("spec.selector matches no Deployment's pods");
    };
    // (containerPort, name) of every container of the server.
    let ports: Vec<(String, String)> = server
        .pod_spec()
        .into_iter()
        .flat_map(|pod| &pod.containers)
        .flat_map(|c| list(&c.ports))
        .map(|p| {
            (
                p.container_port.to_string(),
                p.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    let mut serves_demo_port = false;
    for port in spec.map(|s| list(&s.ports)).unwrap_or_default() {
        let number = port.port.to_string();
        let target = port
            .target_port
            .as_ref()
            .map_or(number.clone(), int_or_string);
        if !ports
            .iter()
            .any(|(n, name)| *n == target || *name == target)
        {
            r.add(format!(
                "spec.ports: targetPort {target} is no port of {}",
                server.name()
            ));
        }
        let pod_port = |(n, name): &(String, String)| *name == target && n == DEMO_SERVER_POD_PORT;
        if number == DEMO_SERVER_SERVICE_PORT
            && (target == DEMO_SERVER_POD_PORT || ports.iter().any(pod_port))
        {
            serves_demo_port = true;
        }
    }
    if !serves_demo_port {
        r.add(format!(
            "spec.ports: the demo calls port {DEMO_SERVER_SERVICE_PORT} → pod port {DEMO_SERVER_POD_PORT}"
        ));
    }
}

/// The Containerfile installs the binary where the DaemonSet runs it; the build context skips
/// target/.
fn check_image_build(root: &Path, problems: &mut Vec<String>) {
    match fs::read_to_string(root.join(CONTAINERFILE)) {
        Ok(text) if text.contains(BINARY_IN_IMAGE) => {}
        Ok(_) => problems.push(format!(
            "{CONTAINERFILE}: does not install {BINARY_IN_IMAGE}"
        )),
        Err(e) => problems.push(format!("{CONTAINERFILE}: {e}")),
    }
    let text = fs::read_to_string(root.join(DOCKERIGNORE)).unwrap_or_default();
    let excluded = |l: &str| l.trim().trim_start_matches('/') == "target/" || l.trim() == "target";
    if !text.lines().any(excluded) {
        problems.push(format!(
            "{DOCKERIGNORE}: must exclude target/ from the image's build context"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::{node_flags::NodeFlag, *};

    fn parse(text: &str) -> (Vec<Object>, Vec<String>) {
        let mut problems = Vec::new();
        (
            parse_objects("deploy/x.yaml", text, &mut problems),
            problems,
        )
    }

    #[track_caller]
    fn assert_found(problems: &[String], wanted: &str) {
        let found = problems.iter().any(|p| p.contains(wanted));
        assert!(found, "{wanted:?} not in {problems:#?}");
    }

    #[test]
    fn a_document_that_does_not_fit_its_kind_names_file_object_field_and_line() {
        let (objects, problems) = parse(
            "# only a comment
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: ambit, namespace: ambit-system}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: ambit}
spec:
  selector: {}
  template:
    spec:
      containers:
      - name: ambit
        ports:
        - containerPort: http
",
        );
        assert!(ServiceAccount::pick(&objects[0].typed).is_some() && objects.len() == 1);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_found(&problems, "deploy/x.yaml: DaemonSet ambit: spec.template.spec.containers[0].ports[0].containerPort: invalid type: string \"http\", expected i32 at line 17");
    }

    #[test]
    fn a_wrong_api_version_and_a_syntax_error_are_problems() {
        let (objects, problems) = parse("apiVersion: apps/v1beta2\nkind: DaemonSet\n");
        assert!(objects.is_empty());
        assert_found(
            &problems,
            "deploy/x.yaml: DaemonSet : invalid value: string \"apps/v1beta2\", expected apps/v1",
        );
        let (_, problems) = parse("kind: Namespace\n---\nmetadata: [\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_found(&problems, "deploy/x.yaml: document 2: ");
    }

    #[test]
    fn a_plain_leading_zero_integer_is_octal_as_kubernetes_reads_it() {
        let mode = |mode: &str| {
            let (objects, problems) = parse(&format!("kind: Pod\napiVersion: v1\nspec:\n  containers: []\n  volumes:\n  - {{name: ca, secret: {{defaultMode: {mode}}}}}\n"));
            let pod = objects
                .first()
                .and_then(|o| Pod::pick(&o.typed)?.spec.as_ref());
            let mode = pod.and_then(|p| list(&p.volumes)[0].secret.as_ref()?.default_mode);
            (mode, problems)
        };
        assert_eq!(mode("0400"), (Some(0o400), vec![]));
        assert_eq!(mode("256"), (Some(256), vec![]));
        // Quoted, it is a string in YAML 1.1 too; 8 is no octal digit.
        for wrong in ["\"0400\"", "0480"] {
            assert_found(&mode(wrong).1, "defaultMode: invalid type: string");
        }
    }

    /// What the checks of typed objects find in deploy/ after `edit` of `file`. `ambit node` is
    /// taken to have every flag the DaemonSet passes, the addresses' defaults as passed.
    fn problems_after(file: &str, edit: impl Fn(&str) -> String) -> Vec<String> {
        let root = workspace_root();
        let mut files = Vec::new();
        collect_yaml(&root.join("deploy"), &mut files).unwrap();
        let (mut objects, mut problems) = (Vec::new(), Vec::new());
        for f in files.iter().filter(|f| !is_kustomization(f)) {
            let (rel, text) = (relative(&root, f), read(f).unwrap());
            let text = if rel == file { edit(&text) } else { text };
            objects.extend(parse_objects(&rel, &text, &mut problems));
        }
        assert!(problems.is_empty(), "{problems:?}");
        let m = Manifests(objects.iter().collect());
        let daemonset = read(&root.join("deploy/daemonset.yaml")).unwrap();
        let (original, _) = parse(&daemonset);
        let ds = DaemonSet::pick(&original[0].typed).unwrap();
        let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let args = list(&pod.containers[0].args);
        let flags = args.iter().enumerate().filter(|(_, a)| a.starts_with("--"));
        // And --ca-dir, which `ambit node` has but the DaemonSet must not pass.
        let ca_dir = "--ca-dir".to_owned();
        let flags = flags.chain([(usize::MAX, &ca_dir)]);
        let node = node_flags::NodeFlags {
            flags: flags
                .map(|(i, a)| {
                    let default = a.ends_with("-addr").then(|| args[i + 1].clone());
                    (
                        a.clone(),
                        NodeFlag {
                            // A switch is followed by the next flag, or by nothing.
                            takes_value: i == usize::MAX
                                || args.get(i + 1).is_some_and(|v| !v.starts_with("--")),
                            default,
                            env: None,
                        },
                    )
                })
                .collect(),
            required: vec!["--source".to_owned()],
        };
        daemonset::check_daemonset(&root, &node, &m, &mut problems);
        check_rbac(&m, &mut problems);
        check_pod_templates(&m, &mut problems);
        check_samples(&m.samples(), &mut problems);
        problems
    }

    #[test]
    fn deploy_passes_the_checks_and_each_break_is_named() {
        let problems = problems_after("", |_| unreachable!());
        assert!(problems.is_empty(), "{problems:#?}");
        for (file, from, to, wanted) in [
            ("daemonset", "        - SYS_PTRACE\n", "", "DaemonSet ambit (deploy/daemonset.yaml): containers[ambit].securityContext.capabilities.add: does not add SYS_PTRACE"),
            ("daemonset", "- --bpffs\n", "- --bpf-fs\n", "containers[ambit].args: passes --bpf-fs, which `ambit node` does not have"),
            ("daemonset", "/healthz/ready\n            port: 15021", "/healthz/ready\n            port: 15022", "containers[ambit].readinessProbe must be httpGet /healthz/ready on port 15021"),
            ("daemonset", "maxSurge: 1", "maxSurge: 0", "spec.updateStrategy.rollingUpdate must be maxSurge 1, maxUnavailable 0"),
            ("daemonset", "        - --wait-after-handover\n", "", "--wait-after-handover is missing"),
            ("daemonset", "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 15", "terminationGracePeriodSeconds (15) must exceed --drain-timeout (20 s)"),
            ("daemonset", "mountPath: /host/proc\n        # The container", "mountPath: /host/proc\n          readOnly: true\n        # The container", "containers[ambit].volumeMounts: --proc-root /host/proc: mount must be writable"),
            ("daemonset", "        - --token-file\n", "        - --ca-dir\n        - /var/run/secrets/istio\n        - --token-file\n", "containers[ambit].args: --ca-dir puts the mesh CA's key on every node"),
            ("daemonset", "audience: istio-ca", "audience: kubernetes", "--token-file /var/run/secrets/tokens/istio-token: volume istio-token must be token:istio-ca"),
            ("daemonset", "        configMap:\n          name: istio-ca-root-cert", "        secret:\n          secretName: cacerts", "volumes: istiod-ca-cert is a Secret: the agent needs none"),
            ("daemonset", "      - name: install-cni\n", "      - name: install-cn\n", "spec.template.spec.containers: no install-cni (it chains ambit-cni"),
            ("daemonset", "        - cni\n        - install\n", "        - cni\n        - uninstall\n", "containers[install-cni].args must start with `cni install`"),
            ("daemonset", "        - --cni-bin-dir\n", "        - --cni-bin\n", "containers[install-cni].args: `ambit cni install` refuses them: unexpected argument '--cni-bin'"),
            ("daemonset", "          path: /etc/cni/net.d\n", "          path: /etc/cni/net.x\n", "containers[install-cni]: --cni-conf-dir /host/etc/cni/net.d is the host's /etc/cni/net.x, not the runtime's /etc/cni/net.d"),
            ("daemonset", "        - name: cni-bin-dir\n          mountPath: /host/opt/cni/bin\n", "", "containers[install-cni].volumeMounts: --cni-bin-dir /host/opt/cni/bin is on no hostPath volume"),
            ("daemonset", "        - --agent-socket\n        - /var/run/ambit/cni.sock\n", "        - --agent-socket\n        - /var/run/ambit/agent.sock\n", "containers[install-cni].args: the plugin would ask --agent-socket /var/run/ambit/agent.sock, but the agent serves --cni-socket /var/run/ambit/cni.sock at the host's /run/ambit/cni.sock"),
            ("daemonset", "        - --cni-socket\n        - /var/run/ambit/cni.sock\n", "", "containers[ambit].args must pass --cni-socket"),
            ("daemonset", "          mountPath: /var/run/ambit\n          readOnly: true\n", "          mountPath: /run/ambit-cni\n          readOnly: true\n", "containers[install-cni].volumeMounts: --agent-socket /var/run/ambit/cni.sock must be on the agent's socket volume cni-socket, mounted at its host path"),
            ("daemonset", "        - kube-system,istio-system,$(POD_NAMESPACE)\n", "        - kube-system,istio-system\n", "--exclude-namespaces must include the DaemonSet's own namespace (ambit-system)"),
            ("daemonset", "          allowPrivilegeEscalation: false\n          readOnlyRootFilesystem: true\n          capabilities:\n            drop: [\"ALL\"]\n", "          allowPrivilegeEscalation: false\n          readOnlyRootFilesystem: true\n          capabilities:\n            drop: [\"ALL\"]\n            add: [\"DAC_OVERRIDE\"]\n", "containers[install-cni].securityContext.capabilities.add: [\"DAC_OVERRIDE\"]: the installer needs none"),
            ("daemonset", "          value: keep\n", "          value: forever\n", "AMBIT_CNI_ON_EXIT \"forever\" is neither keep nor remove"),
            ("rbac", "verbs: [\"patch\"]", "verbs: [\"patch\", \"delete\"]", "ClusterRole ambit-annotate (deploy/rbac.yaml): rules must grant only patch on pods/status"),
            ("rbac", "resources: [\"pods/status\"]", "resources: [\"pods\"]", "ClusterRole ambit-annotate (deploy/rbac.yaml): rules must grant only patch on pods/status"),
            ("rbac", "\"services\"]", "\"services\", \"nodes\"]", "ClusterRole ambit (deploy/rbac.yaml): rules: grant nodes (API group \"\"), which the agent does not read"),
            ("rbac", "[\"pods\", \"namespaces\"", "[\"namespaces\"", "ClusterRole ambit (deploy/rbac.yaml): rules: do not grant pods (API group \"\"), which the agent watches"),
            ("samples/web", "targetPort: 8080", "targetPort: 9090", "Service web (deploy/samples/web.yaml): spec.ports: targetPort 9090 is no port of web"),
        ] {
            let file = format!("deploy/{file}.yaml");
            let edit = |text: &str| {
                assert!(text.contains(from), "{from:?} is not in {file}");
                text.replacen(from, to, 1)
            };
            assert_found(&problems_after(&file, edit), wanted);
        }
    }

    #[test]
    fn kind_config_fields_are_known_and_the_lab_is_three_nodes() {
        let config = read(&workspace_root().join(CLUSTER_CONFIG)).unwrap();
        let problems = |text: String| {
            let mut problems = Vec::new();
            check_kind_config(&text, &mut problems);
            problems
        };
        assert_eq!(problems(config.clone()), Vec::<String>::new());
        for (more, wanted) in [
            ("- role: worker\n", "not 1 and 3"),
            (
                "- role: worker\n  extraMount: []\n",
                "nodes[3]: unknown field `extraMount`, expected one of `role`",
            ),
            ("netwrking: {}\n", "unknown field `netwrking`"),
            (&format!("---\n{config}"), "more than one document"),
        ] {
            assert_found(&problems(format!("{config}{more}")), wanted);
        }
    }
}
