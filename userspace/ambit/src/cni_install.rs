//! `ambit cni install` and `ambit cni uninstall`: put Ambit's chained CNI plugin into the node's
//! CNI configuration, the way istio-cni's install-cni puts itself there, and take it out.
//!
//! `install` copies this binary into the CNI bin directory as `ambit-cni` (the name the binary
//! recognises when the runtime runs it), appends `{"type": "ambit-cni", "agentSocket": ...,
//! "excludeNamespaces": [...]}` to the plugins of the primary network configuration (the one the runtime uses: the
//! lexically first `*.conflist`, `*.conf` or `*.json`), and then keeps it there: the primary
//! CNI (Calico, Cilium, flannel, kindnet, ...) may rewrite its file at any time, and a new
//! primary may appear. Every write is atomic (a temporary file renamed over the old one), so
//! the runtime never reads half a file, nor a binary half copied. On SIGTERM the plugin stays
//! (`--on-exit keep`, fail closed) or is taken out (`--on-exit remove`); `uninstall` takes it out
//! once.
//!
//! The plugin is appended, never put first: it needs the pod's addresses from the result of the
//! plugin that made the pod's interface (`prevResult`).

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};
use tracing::{info, warn};

pub use ambit_settings::{CniInstallArgs, OnExit};

/// The plugin's `type` in the chain, and its binary's name in the CNI bin directory.
pub const PLUGIN: &str = "ambit-cni";

/// How often `install` looks at the configuration directory again.
const POLL: Duration = Duration::from_secs(1);

/// The files the runtime reads network configurations from (libcni's `ConfFiles`, as
/// containerd and CRI-O call it).
const EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// The running binary: still readable when the file it was started from has been replaced.
const SELF_EXE: &str = "/proc/self/exe";

/// The plugin's entry in the chain, with the keys `ambit_cni::plugin` reads.
pub fn plugin_entry(agent_socket: &Path, exclude_namespaces: &[String]) -> Value {
    json!({
        "type": PLUGIN,
        "agentSocket": agent_socket.to_string_lossy(),
        "excludeNamespaces": exclude_namespaces,
    })
}

/// The network configuration files of `dir`, in the order the runtime considers them: the
/// first is the one it uses. A missing directory has none (the primary CNI has not written it
/// yet).
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow!("{}: {e}", dir.display())),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        let known = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e));
        // fs::metadata follows symlinks, as the runtime does.
        if known && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    // libcni sorts the paths as strings: byte order.
    files.sort_by(|a, b| {
        a.as_os_str()
            .as_encoded_bytes()
            .cmp(b.as_os_str().as_encoded_bytes())
    });
    Ok(files)
}

fn is_conflist(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "conflist")
}

/// Where the chain of `path` is written: a `.conflist` in place; a single-plugin `.conf` or
/// `.json` becomes `<stem>.conflist` (a list is the only form that chains plugins), as
/// istio-cni renames it.
fn conflist_path(path: &Path) -> PathBuf {
    if is_conflist(path) {
        path.to_owned()
    } else {
        path.with_extension("conflist")
    }
}

/// The chain `path` holds, as a network configuration list: a `.conflist` as it is, a
/// single-plugin `.conf` or `.json` as the list of that one plugin (libcni's
/// `ConfListFromConf`). Errors name the file and what is wrong with it.
pub fn read_chain(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
    let Some(object) = value.as_object() else {
        bail!("{}: not a JSON object", path.display());
    };
    if is_conflist(path) {
        if !object.get("plugins").is_some_and(Value::is_array) {
            bail!(
                "{}: no \"plugins\" array: not a CNI network configuration list",
                path.display()
            );
        }
        return Ok(value);
    }
    if !object.get("type").is_some_and(Value::is_string) {
        bail!(
            "{}: no \"type\": not a CNI network configuration",
            path.display()
        );
    }
    Ok(json!({
        "cniVersion": object.get("cniVersion").cloned().unwrap_or(Value::Null),
        "name": object.get("name").cloned().unwrap_or(Value::Null),
        "plugins": [value],
    }))
}

fn plugins_mut(chain: &mut Value) -> &mut Vec<Value> {
    match chain.get_mut("plugins") {
        Some(Value::Array(plugins)) => plugins,
        // read_chain only returns chains with a plugins array.
        _ => unreachable!("a chain without plugins"),
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN)
}

/// `chain` with `entry` as its last plugin, once: an `ambit-cni` entry anywhere in it (an older
/// install's, or one with another socket) is replaced, never doubled. Everything else stays.
pub fn with_plugin(chain: &Value, entry: &Value, path: &Path) -> Result<Value> {
    let mut chain = chain.clone();
    let plugins = plugins_mut(&mut chain);
    plugins.retain(|p| !is_ours(p));
    if plugins.is_empty() {
        bail!(
            "{}: no plugin to chain after: {PLUGIN} needs the one that gives the pod its interface",
            path.display()
        );
    }
    plugins.push(entry.clone());
    Ok(chain)
}

/// `chain` without any `ambit-cni` entry.
pub fn without_plugin(chain: &Value) -> Value {
    let mut chain = chain.clone();
    plugins_mut(&mut chain).retain(|p| !is_ours(p));
    chain
}

fn has_plugin(chain: &Value) -> bool {
    chain["plugins"]
        .as_array()
        .is_some_and(|plugins| plugins.iter().any(is_ours))
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory (named so
/// that the runtime does not read it: a leading dot and no configuration extension), synced,
/// with `mode`, renamed over `path`.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.ambit-tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow!("writing {}: {e}", path.display())
    })
}

fn write_chain(path: &Path, chain: &Value, mode: u32) -> Result<()> {
    let mut text = serde_json::to_string_pretty(chain)?;
    text.push('\n');
    write_atomically(path, text.as_bytes(), mode)
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777)
}

/// Copies this binary to `<bin_dir>/ambit-cni`, atomically: the runtime may run the plugin at
/// any moment, and must find either the old binary or the whole new one. (Renaming over a
/// running binary is allowed; writing into it is not.)
pub fn install_binary(bin_dir: &Path) -> Result<PathBuf> {
    let target = bin_dir.join(PLUGIN);
    let tmp = bin_dir.join(format!(".{PLUGIN}.{}.ambit-tmp", std::process::id()));
    let copy = || -> std::io::Result<()> {
        fs::copy(SELF_EXE, &tmp)?;
        let file = fs::File::open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(0o755))?;
        file.sync_all()?;
        fs::rename(&tmp, &target)
    };
    copy().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow!("installing the plugin binary {}: {e}", target.display())
    })?;
    Ok(target)
}

/// What one look at the configuration directory found to do.
#[derive(Debug)]
pub struct Plan {
    /// The configuration the runtime uses now.
    pub primary: PathBuf,
    /// Where its chain with the plugin goes (`primary`, or its `.conflist` when it is a
    /// single-plugin file).
    pub target: PathBuf,
    /// None when the primary already chains the plugin as it should.
    write: Option<Value>,
    /// Other files that still chain the plugin (a former primary): it is taken out of them,
    /// so that it is only where the runtime reads it.
    stale: Vec<(PathBuf, Value)>,
}

impl Plan {
    /// Whether applying it writes anything.
    pub fn changes(&self) -> bool {
        self.write.is_some() || !self.stale.is_empty()
    }
}

/// Reads `dir` and works out what to write so that its primary configuration chains `entry`
/// (None: no configuration yet). Writes nothing: a primary that cannot be read is an error
/// naming the file, and leaves the directory as it was.
pub fn plan(dir: &Path, entry: &Value) -> Result<Option<Plan>> {
    let files = config_files(dir)?;
    let Some(primary) = files.first().cloned() else {
        return Ok(None);
    };
    let chain = read_chain(&primary)?;
    let desired = with_plugin(&chain, entry, &primary)?;
    let target = conflist_path(&primary);
    let write = (target != primary || desired != chain).then_some(desired);
    let mut stale = Vec::new();
    for file in files
        .iter()
        .skip(1)
        .filter(|f| is_conflist(f) && **f != target)
    {
        // Another file the runtime does not use: one that does not parse is not ours to judge.
        if let Ok(chain) = read_chain(file) {
            if has_plugin(&chain) {
                stale.push((file.clone(), without_plugin(&chain)));
            }
        }
    }
    Ok(Some(Plan {
        primary,
        target,
        write,
        stale,
    }))
}

/// Writes what `plan` found missing.
pub fn apply(plan: &Plan) -> Result<()> {
    if let Some(chain) = &plan.write {
        write_chain(&plan.target, chain, mode_of(&plan.primary))?;
        if plan.target != plan.primary {
            fs::remove_file(&plan.primary)
                .with_context(|| format!("removing {}", plan.primary.display()))?;
            info!(
                from = %plan.primary.display(),
                to = %plan.target.display(),
                "the primary CNI config is a single plugin: rewritten as a list"
            );
        }
    }
    for (file, chain) in &plan.stale {
        write_chain(file, chain, mode_of(file))?;
        info!(file = %file.display(), "took {PLUGIN} out of a config the runtime no longer uses");
    }
    Ok(())
}

/// Takes the plugin out of every configuration list in `dir` that chains it; returns them.
pub fn remove_from_configs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for file in config_files(dir)?.into_iter().filter(|f| is_conflist(f)) {
        let chain = match read_chain(&file) {
            Ok(chain) => chain,
            Err(e) => {
                warn!("skipped: {e:#}");
                continue;
            }
        };
        if has_plugin(&chain) {
            write_chain(&file, &without_plugin(&chain), mode_of(&file))?;
            changed.push(file);
        }
    }
    Ok(changed)
}

/// Deletes `<bin_dir>/ambit-cni`; true if it was there.
pub fn remove_binary(bin_dir: &Path) -> Result<bool> {
    let path = bin_dir.join(PLUGIN);
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(anyhow!("removing {}: {e}", path.display())),
    }
}

/// `ambit cni uninstall`: the plugin out of every configuration, its binary deleted.
pub fn uninstall(args: &CniInstallArgs) -> Result<()> {
    for file in remove_from_configs(&args.cni_conf_dir)? {
        info!(file = %file.display(), "took {PLUGIN} out of the chain");
    }
    if remove_binary(&args.cni_bin_dir)? {
        info!(binary = %args.cni_bin_dir.join(PLUGIN).display(), "removed the plugin binary");
    }
    Ok(())
}

/// `ambit cni install`: installs the binary and the chain entry, keeps the entry in the
/// primary configuration until SIGTERM (or SIGINT), then does what `--on-exit` says.
///
/// A primary configuration that cannot be read when it starts is an error (the container
/// restarts, its log names the file); later, the same is logged and retried, since the primary
/// CNI may be in the middle of rewriting it.
pub async fn install(args: &CniInstallArgs) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Before anything is written: a SIGTERM from now on is handled as --on-exit says.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (dir, entry) = (
        &args.cni_conf_dir,
        plugin_entry(&args.agent_socket, &args.exclude_namespaces),
    );
    // Checked before the binary is copied: a configuration Ambit cannot chain into leaves the
    // node untouched.
    let first = plan(dir, &entry)?;
    // The binary before the entry: a chain naming a plugin the runtime cannot find fails
    // every pod on the node.
    let binary = install_binary(&args.cni_bin_dir)?;
    info!(binary = %binary.display(), "installed the plugin binary");
    let mut waiting = false;
    let mut last_error: Option<String> = None;
    let step = |plan: Result<Option<Plan>>, waiting: &mut bool| -> Result<()> {
        let Some(plan) = plan? else {
            if !*waiting {
                info!(dir = %dir.display(), "no CNI config yet: waiting for the primary CNI to write one");
                *waiting = true;
            }
            return Ok(());
        };
        *waiting = false;
        if plan.changes() {
            apply(&plan)?;
            if plan.write.is_some() {
                info!(
                    config = %plan.target.display(),
                    agent_socket = %args.agent_socket.display(),
                    "{PLUGIN} chained in the primary CNI config"
                );
            }
        }
        Ok(())
    };
    step(Ok(first), &mut waiting)?;
    // Whether the agent's socket is there, logged when it changes: while it is not, every new
    // pod sandbox on the node fails at this plugin, and this log says why.
    let mut served = None;
    loop {
        let now = fs::symlink_metadata(&args.agent_socket).is_ok();
        if served != Some(now) {
            let socket = args.agent_socket.display();
            if now {
                info!("the agent serves {socket}");
            } else {
                warn!("no agent serves {socket} (yet): new pods on this node fail to start, and are retried, until one does");
            }
            served = Some(now);
        }
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tokio::time::sleep(POLL) => {}
        }
        if fs::symlink_metadata(&binary).is_err() {
            match install_binary(&args.cni_bin_dir) {
                Ok(_) => {
                    warn!(binary = %binary.display(), "the plugin binary was gone: copied it again")
                }
                Err(e) => warn!("{e:#}"),
            }
        }
        match step(plan(dir, &entry), &mut waiting) {
            Ok(()) => last_error = None,
            Err(e) => {
                let e = format!("{e:#}");
                // Once per distinct problem, not every second.
                if last_error.as_ref() != Some(&e) {
                    warn!("{e} (retrying)");
                    last_error = Some(e);
                }
            }
        }
    }
    match args.on_exit {
        OnExit::Keep => info!(
            "stopping; {PLUGIN} stays in the chain (--on-exit keep): pods cannot start on this node until the agent serves {} again",
            args.agent_socket.display()
        ),
        OnExit::Remove => {
            info!("stopping; taking {PLUGIN} out of the chain (--on-exit remove)");
            uninstall(args)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "ambit-cni-install-unit-{name}-{}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn bridge() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    #[test]
    fn the_entry_is_appended_once_and_replaces_an_older_one() {
        let path = Path::new("/x/10-pods.conflist");
        let entry = plugin_entry(Path::new("/var/run/ambit/cni.sock"), &[]);
        let once = with_plugin(&bridge(), &entry, path).unwrap();
        let plugins = once["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2], entry);
        assert_eq!(plugins[..2], bridge()["plugins"].as_array().unwrap()[..]);
        assert_eq!(with_plugin(&once, &entry, path).unwrap(), once);
        // An entry of an older install, with another socket, in the middle.
        let mut old = bridge();
        plugins_mut(&mut old).insert(
            1,
            plugin_entry(Path::new("/old.sock"), &["kube-system".into()]),
        );
        assert_eq!(with_plugin(&old, &entry, path).unwrap(), once);
        assert_eq!(without_plugin(&once), bridge());
        let lonely = json!({"cniVersion": "1.0.0", "name": "x", "plugins": [entry]});
        let e = with_plugin(&lonely, &entry, path).unwrap_err().to_string();
        assert!(
            e.contains("/x/10-pods.conflist: no plugin to chain after"),
            "{e}"
        );
    }

    #[test]
    fn the_primary_is_the_lexically_first_config_and_a_conf_becomes_a_list() {
        let dir = TempDir::new("primary");
        for name in [
            "20-b.conflist",
            "10-a.conf",
            "05-notes.txt",
            ".10-a.conf.1.ambit-tmp",
        ] {
            fs::write(dir.0.join(name), "{}").unwrap();
        }
        fs::create_dir(dir.0.join("00-dir.conf")).unwrap();
        let names: Vec<_> = config_files(&dir.0)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["10-a.conf", "20-b.conflist"]);
        let conf = json!({"cniVersion": "0.4.0", "name": "a", "type": "ptp"});
        fs::write(dir.0.join("10-a.conf"), conf.to_string()).unwrap();
        let chain = read_chain(&dir.0.join("10-a.conf")).unwrap();
        assert_eq!(
            chain,
            json!({"cniVersion": "0.4.0", "name": "a", "plugins": [conf]})
        );
        assert_eq!(
            conflist_path(&dir.0.join("10-a.conf")),
            dir.0.join("10-a.conflist")
        );
        assert!(config_files(&dir.0.join("missing")).unwrap().is_empty());
    }

    #[test]
    fn unreadable_configs_are_named_with_what_is_wrong() {
        let dir = TempDir::new("errors");
        let write = |name: &str, text: &str| {
            let path = dir.0.join(name);
            fs::write(&path, text).unwrap();
            read_chain(&path).unwrap_err().to_string()
        };
        let e = write("10-a.conflist", "{\"plugins\": [");
        assert!(
            e.contains("10-a.conflist: not valid JSON: EOF while parsing"),
            "{e}"
        );
        let e = write("10-b.conflist", r#"{"name": "b"}"#);
        assert!(e.contains("10-b.conflist: no \"plugins\" array"), "{e}");
        let e = write("10-c.conf", r#"{"name": "c"}"#);
        assert!(e.contains("10-c.conf: no \"type\""), "{e}");
    }

    #[test]
    fn the_installed_entry_points_where_the_plugin_and_the_agent_look() {
        assert_eq!(
            ambit_settings::DEFAULT_CNI_AGENT_SOCKET,
            ambit_cni::DEFAULT_AGENT_SOCKET
        );
        let entry = plugin_entry(Path::new(ambit_cni::DEFAULT_AGENT_SOCKET), &[]);
        assert_eq!(entry["agentSocket"], ambit_cni::DEFAULT_AGENT_SOCKET);
        assert_eq!(entry["excludeNamespaces"], json!([]));
    }
}
