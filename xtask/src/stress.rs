//! `cargo xtask stress`: the long versions of the reliability tests (issue 8), in a release
//! build, with one table at the end. The tests themselves live in userspace/ambit/tests and run
//! at a small scale in `cargo xtask test`; here they run at full scale:
//!
//! - load: `stress::many_concurrent_tunneled_connections_are_held_and_released` with 10,000
//!   connections held at once (memory per connection, everything released afterwards);
//! - churn: `stress::churned_connections_leave_nothing_behind` with 50,000 sequential and 50,000
//!   concurrent connections (fds, map entries, memory back to the baseline; counters balance);
//! - faults: every test in `lifecycle` (drain, deadline, unreachable peer, vanished netns, pins)
//!   and `security` (tunnel ports, Fast Open), each a row.
//!
//! The rows come from the tests' own `| ... |` lines and their pass/fail results.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Connections per churn phase (sequential, then 100 at a time).
    #[arg(long, default_value_t = 50_000)]
    churn: usize,
    /// Connections held open at once.
    #[arg(long, default_value_t = 10_000)]
    concurrent: usize,
}

pub fn run(args: &Args) -> Result<()> {
    ambit_lab::require_root()?;
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args([
            "test",
            "--release",
            "-p",
            "ambit",
            "--test",
            "stress",
            "--test",
            "lifecycle",
            "--test",
            "security",
            "--",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("AMBIT_STRESS_CHURN", args.churn.to_string())
        .env("AMBIT_STRESS_CONCURRENT", args.concurrent.to_string())
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut rows = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        rows.extend(table_row(&line));
    }
    let status = child.wait()?;
    println!("\n| kind | what | result | nothing lost |\n|---|---|---|---|");
    for row in &rows {
        println!("{row}");
    }
    println!(
        "| fuzz | cargo fuzz targets | not implemented yet | — |\n\ncargo xtask stress took {:.0?}",
        started.elapsed()
    );
    if !status.success() {
        bail!("stress tests failed (see above)");
    }
    Ok(())
}

/// A table row from one line of the tests' output: their own `| ... |` figures, or a
/// `test <name> ... ok|FAILED` line of the fault tests.
fn table_row(line: &str) -> Option<String> {
    // With --nocapture a test's printed row and libtest's "test x ... " share one line.
    if let Some(at) = line.find("| ") {
        if line.trim_end().ends_with('|') {
            return Some(line[at..].trim_end().to_owned());
        }
    }
    let rest = line.strip_prefix("test ")?;
    let (name, result) = rest.split_once(" ... ")?;
    if name.starts_with("churned_") || name.starts_with("many_concurrent") {
        return None; // reported by their own row
    }
    let result = result.trim();
    (result == "ok" || result == "FAILED").then(|| {
        let evidence = if result == "ok" {
            "asserted in the test"
        } else {
            "see its output above"
        };
        format!(
            "| fault | {} | {result} | {evidence} |",
            name.replace('_', " ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_from_figures_and_test_results() {
        assert_eq!(
            table_row("test churned_connections_leave_nothing_behind ... | churn | 10 | ok | x |"),
            Some("| churn | 10 | ok | x |".into())
        );
        assert_eq!(
            table_row("test a_pod_whose_netns_vanishes_is_released ... ok"),
            Some(
                "| fault | a pod whose netns vanishes is released | ok | asserted in the test |"
                    .into()
            )
        );
        assert_eq!(
            table_row("test churned_connections_leave_nothing_behind ... ok"),
            None
        );
        assert_eq!(table_row("running 3 tests"), None);
    }
}
