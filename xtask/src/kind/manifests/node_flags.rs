//! The command line of `ambit node` that the DaemonSet must agree with, read from the same clap
//! definitions the node parses (`ambit_settings::NodeArgs`).

use std::collections::BTreeMap;

use anyhow::{bail, Result};

pub(super) struct NodeFlags {
    /// By long name (`--bpffs`).
    pub flags: BTreeMap<String, NodeFlag>,
    /// The flags `ambit node` does not run without.
    pub required: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct NodeFlag {
    pub takes_value: bool,
    pub default: Option<String>,
    /// The environment variable that sets it.
    pub env: Option<String>,
}

impl NodeFlags {
    pub fn default_of(&self, flag: &str) -> Option<&str> {
        self.flags.get(flag)?.default.as_deref()
    }
}

/// `ambit node`'s flags (`--help` included, as clap adds it).
pub(super) fn node_flags() -> Result<NodeFlags> {
    let mut command = ambit_settings::NodeArgs::command();
    command.build();
    let mut flags = BTreeMap::new();
    let mut required = Vec::new();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else {
            continue;
        };
        let name = format!("--{long}");
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        // A switch's implicit `false` is not a default anyone writes down.
        let takes_value = arg.get_action().takes_values();
        flags.insert(
            name.clone(),
            NodeFlag {
                takes_value,
                default: (takes_value && !defaults.is_empty()).then(|| defaults.join(",")),
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            },
        );
        if arg.is_required_set() {
            required.push(name);
        }
    }
    if flags.is_empty() {
        bail!("found no flag in `ambit node`'s settings");
    }
    Ok(NodeFlags { flags, required })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_defaults_env_and_required_flags() {
        let node = node_flags().unwrap();
        assert_eq!(node.required, ["--node"]);
        let flag = |takes_value, default: Option<&str>, env: Option<&str>| NodeFlag {
            takes_value,
            default: default.map(str::to_owned),
            env: env.map(str::to_owned),
        };
        assert_eq!(node.flags["--node"], flag(true, None, Some("AMBIT_NODE")));
        assert_eq!(node.default_of("--metrics-addr"), Some("0.0.0.0:15020"));
        assert_eq!(node.flags["--detach-on-exit"], flag(false, None, None));
        assert_eq!(node.flags["--help"], flag(false, None, None));
    }
}
