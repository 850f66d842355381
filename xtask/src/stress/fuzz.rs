//! The fuzzing part of `cargo xtask stress`: each cargo-fuzz target in `userspace/ambit/fuzz/`
//! (libFuzzer, nightly; cargo-fuzz's place for it, beside the crate it fuzzes) for a bounded
//! time, one at a time (the machine is shared), and a table row each from libFuzzer's own final
//! line, `Done <N> runs in <S> second(s)`.
//!
//! Corpus: libFuzzer reads every corpus directory given but writes new inputs only to the first.
//! The first is `target/fuzz-corpus/<target>` (kept between runs, outside git), the second the
//! checked-in seeds `userspace/ambit/fuzz/corpus/<target>`, so a stress run never dirties the
//! tree; worthwhile finds are copied into the seeds by hand (after `cargo fuzz cmin`). A crash or
//! a hang is written by cargo-fuzz to `userspace/ambit/fuzz/artifacts/<target>/` (ignored by
//! git) and fails the run.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// A single input slower than this counts as a hang (libFuzzer's default is 20 minutes).
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// The outcome of fuzzing one target.
pub struct Outcome {
    pub target: String,
    /// libFuzzer's final count and time, when it finished normally.
    pub done: Option<(u64, u64)>,
    /// Files in the checked-in corpus, and the ones this and earlier stress runs added.
    pub seeds: usize,
    pub found: usize,
    /// The input that crashed or hung the target, as libFuzzer reports it.
    pub crash: Option<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.done.is_some() && self.crash.is_none()
    }

    /// `| fuzz | <target> | <N> executions in <S> s, corpus <files> | no crash |`.
    pub fn row(&self) -> String {
        let corpus = format!("corpus {} seeds + {} found", self.seeds, self.found);
        match (&self.done, &self.crash) {
            (Some((runs, seconds)), None) => format!(
                "| fuzz | {} | {runs} executions in {seconds} s, {corpus} | no crash |",
                self.target
            ),
            (_, Some(crash)) => format!(
                "| fuzz | {} | FAILED, {corpus} | crash or hang: {crash} |",
                self.target
            ),
            (None, None) => format!(
                "| fuzz | {} | FAILED, {corpus} | libFuzzer did not finish (see its output above) |",
                self.target
            ),
        }
    }
}

/// The crate whose `fuzz/` directory holds the targets, relative to the repository root.
const FUZZED_CRATE: &str = "userspace/ambit";

/// Fuzzes every target for `seconds` each; `root` is the repository's root.
pub fn run_all(root: &Path, seconds: u64) -> Result<Vec<Outcome>> {
    crate::setup::cargo_fuzz()?;
    cargo_fuzz(root, &["build"]).context("building the fuzz targets")?;
    let mut outcomes = Vec::new();
    for target in targets(root)? {
        outcomes.push(run(root, &target, seconds)?);
    }
    Ok(outcomes)
}

/// `cargo fuzz list`: the targets of `userspace/ambit/fuzz/Cargo.toml`.
fn targets(root: &Path) -> Result<Vec<String>> {
    let out = nightly_cargo_fuzz(root)
        .arg("list")
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo fuzz list")?;
    if !out.status.success() {
        bail!("cargo fuzz list failed");
    }
    let targets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!(
            "cargo fuzz list found no fuzz targets in {}",
            root.display()
        );
    }
    Ok(targets)
}

/// Fuzzes `target` for `seconds`, echoing libFuzzer's output (stderr) as it reads it.
fn run(root: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let seeds_dir = root.join(FUZZED_CRATE).join("fuzz/corpus").join(target);
    let found_dir = root.join("target/fuzz-corpus").join(target);
    fs::create_dir_all(&found_dir).with_context(|| format!("creating {}", found_dir.display()))?;
    println!("\n== fuzzing {target} for {seconds} s");
    let mut child = nightly_cargo_fuzz(root)
        .arg("run")
        .arg(target)
        .arg(&found_dir)
        .arg(&seeds_dir)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    let mut done = None;
    let mut crash = None;
    for line in BufReader::new(child.stderr.take().expect("piped stderr")).lines() {
        let line = line.with_context(|| format!("reading cargo fuzz run {target}'s output"))?;
        eprintln!("{line}");
        done = done.or_else(|| done_line(&line));
        crash = crash.or_else(|| crash_file(&line));
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for cargo fuzz run {target}"))?;
    if !status.success() && crash.is_none() {
        crash = Some(format!(
            "cargo fuzz run exited with {status}, no input reported"
        ));
    }
    Ok(Outcome {
        target: target.to_owned(),
        done,
        seeds: count_files(&seeds_dir)?,
        found: count_files(&found_dir)?,
        crash,
    })
}

/// `cargo +nightly fuzz <args>` in `root`, checked.
fn cargo_fuzz(root: &Path, args: &[&str]) -> Result<()> {
    let status = nightly_cargo_fuzz(root)
        .args(args)
        .status()
        .with_context(|| format!("running cargo fuzz {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo +nightly fuzz {} failed", args.join(" "));
    }
    Ok(())
}

/// `cargo +nightly fuzz`, through rustup's proxy (as `crate::cargo` runs `+nightly`), in the
/// fuzzed crate.
fn nightly_cargo_fuzz(root: &Path) -> Command {
    let mut cmd = crate::util::cargo_command("cargo");
    cmd.args([&format!("+{}", crate::setup::ebpf_nightly()), "fuzz"])
        .current_dir(root.join(FUZZED_CRATE));
    cmd
}

/// `(runs, seconds)` from libFuzzer's `Done 123 runs in 60 second(s)`.
fn done_line(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("Done ")?;
    let (runs, rest) = rest.split_once(" runs in ")?;
    let (seconds, _) = rest.split_once(" second")?;
    Some((runs.parse().ok()?, seconds.parse().ok()?))
}

/// The input file from libFuzzer's `Test unit written to <path>` (after a crash or hang).
fn crash_file(line: &str) -> Option<String> {
    let path = line.split_once("Test unit written to ")?.1.trim();
    Some(path.to_owned())
}

fn count_files(dir: &Path) -> Result<usize> {
    let entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    Ok(entries.iter().filter(|p| p.is_file()).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_final_line_and_crash_file() {
        assert_eq!(
            done_line("Done 1234567 runs in 61 second(s)"),
            Some((1234567, 61))
        );
        assert_eq!(done_line("#2 INITED cov: 10 ft: 10 corp: 1/1b"), None);
        assert_eq!(
            crash_file("artifact_prefix='fuzz/artifacts/config/'; Test unit written to fuzz/artifacts/config/crash-da39a3ee"),
            Some("fuzz/artifacts/config/crash-da39a3ee".into())
        );
    }

    #[test]
    fn a_row_says_what_ran_or_what_crashed() {
        let mut outcome = Outcome {
            target: "config".into(),
            done: Some((1000, 60)),
            seeds: 7,
            found: 40,
            crash: None,
        };
        assert_eq!(
            outcome.row(),
            "| fuzz | config | 1000 executions in 60 s, corpus 7 seeds + 40 found | no crash |"
        );
        assert!(outcome.ok());
        outcome.crash = Some("fuzz/artifacts/config/crash-1".into());
        assert!(outcome
            .row()
            .contains("crash or hang: fuzz/artifacts/config/crash-1"));
        assert!(!outcome.ok());
    }
}
