//! `cargo xtask stress`: the long versions of the reliability tests, in a release
//! build, with one table at the end. The tests themselves live in userspace/ambit/tests and run
//! at a small scale in `cargo xtask test`; here they run at full scale:
//!
//! - load: `stress::many_concurrent_tunneled_connections_are_held_and_released` with 10,000
//!   connections held at once (memory per connection, everything released afterwards);
//! - churn: `stress::churned_connections_leave_nothing_behind` with 50,000 sequential and 50,000
//!   concurrent connections (fds, map entries, memory back to the baseline; counters balance);
//! - soak: `stress::a_mixed_load_holds_steady_over_time` for `--soak-seconds` (bulk transfers,
//!   churn and a latency probe at once; latency and memory must not grow);
//! - upgrade: `handover::replacing_the_node_process_three_times_refuses_and_resets_nothing`
//!   with `--handovers` replacements in a row (no refused or reset connection, transfers
//!   intact, nothing left behind), and the SIGKILL case with its measured gap;
//! - faults: every test in `lifecycle` (drain, deadline, crash, unreachable peer, vanished netns
//!   or cgroup, out of file descriptors, pins), each a row;
//! - hostile: every test in `security` (tunnel ports, Fast Open, unfinished handshakes) and
//!   `abuse` (stream floods, rapid reset, huge headers, slow readers, silent clients), each a row;
//! - fuzz: each cargo-fuzz target in `fuzz/` for `--fuzz-seconds` (see `fuzz`).
//!
//! The rows come from the tests' own `| ... |` lines and their pass/fail results, and from
//! libFuzzer's final statistics.

mod fuzz;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
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
    /// Seconds of mixed load in the soak test.
    #[arg(long, default_value_t = 300)]
    soak_seconds: u64,
    /// Node-process replacements in a row in the upgrade test.
    #[arg(long, default_value_t = 10)]
    handovers: usize,
    /// Seconds of fuzzing per fuzz target (cargo-fuzz, nightly); 0 skips fuzzing.
    #[arg(long, default_value_t = 60)]
    fuzz_seconds: u64,
}

/// The test files run here, and the kind of row their tests make.
const SUITES: [(&str, &str); 5] = [
    ("stress", "load"),
    ("handover", "upgrade"),
    ("lifecycle", "fault"),
    ("security", "hostile"),
    ("abuse", "hostile"),
];

pub fn run(args: &Args) -> Result<()> {
    ambit_lab::require_root()?;
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (test, kind) in SUITES {
        if !run_suite(args, test, kind, &mut rows)? {
            failed.push(test);
        }
    }
    let fuzzed = if args.fuzz_seconds > 0 {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest has no parent directory")?;
        fuzz::run_all(root, args.fuzz_seconds)?
    } else {
        Vec::new()
    };
    println!("\n| kind | what | result | nothing lost |\n|---|---|---|---|");
    for row in &rows {
        println!("{row}");
    }
    for outcome in &fuzzed {
        println!("{}", outcome.row());
    }
    if args.fuzz_seconds == 0 {
        println!("| fuzz | cargo fuzz targets | skipped (--fuzz-seconds 0) | — |");
    }
    println!("\ncargo xtask stress took {:.0?}", started.elapsed());
    if !failed.is_empty() {
        bail!("stress tests failed in {failed:?} (see above)");
    }
    let crashed: Vec<&str> = fuzzed
        .iter()
        .filter(|o| !o.ok())
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!("fuzz targets {crashed:?} crashed or did not finish (see the table)");
    }
    Ok(())
}

/// Runs one test file in a release build, one test at a time, printing its output and taking
/// its rows; whether every test passed.
fn run_suite(args: &Args, test: &str, kind: &str, rows: &mut Vec<String>) -> Result<bool> {
    let mut child = crate::util::cargo_command(&crate::util::cargo_program())
        .args(["test", "--release", "-p", "ambit", "--test", test])
        .args(["--", "--nocapture", "--test-threads", "1"])
        .env("AMBIT_STRESS_CHURN", args.churn.to_string())
        .env("AMBIT_STRESS_CONCURRENT", args.concurrent.to_string())
        .env("AMBIT_STRESS_SOAK_SECONDS", args.soak_seconds.to_string())
        .env("AMBIT_STRESS_HANDOVERS", args.handovers.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo test --test {test}"))?;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        rows.extend(table_row(&line, kind));
    }
    Ok(child.wait()?.success())
}

/// A table row from one line of the tests' output: their own `| ... |` figures, or a
/// `test <name> ... ok|FAILED` line of the fault and hostile-input tests.
fn table_row(line: &str, kind: &str) -> Option<String> {
    // With --nocapture a test's printed row and libtest's "test x ... " share one line.
    if let Some(at) = line.find("| ") {
        if line.trim_end().ends_with('|') {
            return Some(line[at..].trim_end().to_owned());
        }
    }
    let rest = line.strip_prefix("test ")?;
    let (name, result) = rest.split_once(" ... ")?;
    if name.starts_with("churned_")
        || name.starts_with("many_concurrent")
        || name.starts_with("a_mixed_load")
        || name.starts_with("replacing_the_node_process")
        || name.starts_with("after_a_sigkill")
    {
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
            "| {kind} | {} | {result} | {evidence} |",
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
            table_row(
                "test churned_connections_leave_nothing_behind ... | churn | 10 | ok | x |",
                "load"
            ),
            Some("| churn | 10 | ok | x |".into())
        );
        assert_eq!(
            table_row(
                "test a_pod_whose_netns_vanishes_is_released ... ok",
                "fault"
            ),
            Some(
                "| fault | a pod whose netns vanishes is released | ok | asserted in the test |"
                    .into()
            )
        );
        assert_eq!(
            table_row(
                "test churned_connections_leave_nothing_behind ... ok",
                "load"
            ),
            None
        );
        assert_eq!(table_row("running 3 tests", "load"), None);
        assert_eq!(
            table_row("test slow_readers_get_backpressure_not_buffers ... FAILED", "hostile"),
            Some(
                "| hostile | slow readers get backpressure not buffers | FAILED | see its output above |"
                    .into()
            )
        );
    }
}
