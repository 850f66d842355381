//! The command line of `ambit node` that the DaemonSet must agree with. [`node_flags`] is the one
//! way in: today it reads `ambit node --help`, so that what is checked is what the binary says.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

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

/// `ambit node`'s flags, from `target/debug/ambit node --help` (built first if missing).
pub(super) fn node_flags(root: &Path) -> Result<NodeFlags> {
    let ambit = root.join("target/debug/ambit");
    if !ambit.exists() {
        crate::cargo(&["build", "-p", "ambit"])?;
    }
    let out = Command::new(&ambit)
        .args(["node", "--help"])
        .output()
        .with_context(|| format!("running {} node --help", ambit.display()))?;
    if !out.status.success() {
        bail!("{} node --help failed", ambit.display());
    }
    let flags = parse_help(&String::from_utf8_lossy(&out.stdout));
    if flags.flags.is_empty() {
        bail!("found no flag in `ambit node --help`");
    }
    Ok(flags)
}

/// Reads clap's long or short help.
fn parse_help(text: &str) -> NodeFlags {
    let mut flags = BTreeMap::new();
    let mut required = Vec::new();
    let mut current: Option<String> = None;
    let mut description: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(usage) = trimmed.strip_prefix("Usage:") {
            // Options outside [OPTIONS] in the usage line are required.
            required.extend(
                usage
                    .split_whitespace()
                    .filter(|t| t.starts_with("--"))
                    .map(|t| t.trim_matches(['[', ']']).to_owned()),
            );
            continue;
        }
        // `--flag <VALUE>` or `-f, --flag`; not the `- value: ...` lines of possible values.
        let b = trimmed.as_bytes();
        let flag_line = trimmed.starts_with("--")
            || (b.len() > 5
                && b[0] == b'-'
                && b[1].is_ascii_alphanumeric()
                && trimmed[2..].starts_with(", --"));
        if flag_line {
            let tokens: Vec<&str> = trimmed.split_whitespace().collect();
            current = None;
            for (i, t) in tokens.iter().enumerate() {
                if let Some(name) = t.strip_prefix("--") {
                    let name = format!("--{}", name.trim_end_matches(','));
                    let takes_value = tokens.get(i + 1).is_some_and(|n| n.starts_with('<'));
                    flags.insert(
                        name.clone(),
                        NodeFlag {
                            takes_value,
                            default: None,
                            env: None,
                        },
                    );
                    current = Some(name);
                    break;
                }
            }
            // Short help puts the description on the same line.
            if let Some(name) = &current {
                description.insert(name.clone(), trimmed.to_owned());
            }
        } else if let Some(name) = &current {
            let d = description.entry(name.clone()).or_default();
            d.push(' ');
            d.push_str(trimmed);
        }
    }
    let bracketed = |text: &str, tag: &str| -> Option<String> {
        let start = text.find(tag)? + tag.len();
        let end = text[start..].find(']')? + start;
        Some(text[start..end].trim().to_owned())
    };
    for (name, text) in description {
        if let Some(flag) = flags.get_mut(&name) {
            flag.default = bracketed(&text, "[default: ");
            flag.env = bracketed(&text, "[env: ").map(|e| e.trim_end_matches('=').to_owned());
        }
    }
    NodeFlags { flags, required }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_defaults_env_and_required_flags() {
        let help = parse_help(
            "Runs the node agent

Usage: ambit node [OPTIONS] --source <SOURCE> --node <NODE>

Options:
      --source <SOURCE>
          Where pods come from

          Possible values:
          - kubernetes: the API server
          - static:     a file

      --node <NODE>
          This node's name [env: NODE_NAME=]

      --metrics-addr <METRICS_ADDR>
          Prometheus
          [default: 0.0.0.0:15020]

  -v, --verbose
          More logs

  -h, --help  Print help (see a summary with '-h')
",
        );
        assert_eq!(help.required, ["--source", "--node"]);
        let flag = |takes_value, default: Option<&str>, env: Option<&str>| NodeFlag {
            takes_value,
            default: default.map(str::to_owned),
            env: env.map(str::to_owned),
        };
        assert_eq!(help.flags["--source"], flag(true, None, None));
        assert_eq!(help.flags["--node"], flag(true, None, Some("NODE_NAME")));
        assert_eq!(help.default_of("--metrics-addr"), Some("0.0.0.0:15020"));
        assert_eq!(help.flags["--verbose"], flag(false, None, None));
        assert_eq!(help.flags["--help"], flag(false, None, None));
        assert_eq!(help.flags.len(), 5);
    }
}
