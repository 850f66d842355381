//! `cargo xtask bench`: one lab, two modes measured in the same run, reported as ratios.
//!
//! - **plain**: pod a → pod c across the two lab nodes, no Ambit running;
//! - **ambit**: the same pods enrolled: eBPF capture on both sides + HBONE (mTLS, HTTP/2).
//!
//! Figures: single-stream throughput (iperf3), request/response latency p50/p99 for 100-byte
//! messages on a long-lived connection, and new connections per second (connect, one 1-byte
//! exchange, close). The same unmodified clients (iperf3, xtask/bench/rr.py) serve every mode.
//! This is a benchmark, not a test: nothing here has a threshold.

use std::{fs, path::Path, process::Stdio, time::Duration};

use ambit_lab::{pod, Lab};
use anyhow::{bail, Context as _, Result};

const PREFIX: &str = "ambit-bench";
const RR_PORT: &str = "7000";
const IPERF_PORT: &str = "5201";

#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    gbit_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    conn_per_s: f64,
}

pub fn run(seconds: u32) -> Result<()> {
    ambit_lab::require_root()?;
    crate::cargo(&["build", "--release", "-p", "ambit"])?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned();
    let ambit = root.join("target/release/ambit");
    let rr = root.join("xtask/bench/rr.py");
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir)?;

    let mut lab = Lab::create(PREFIX)?;
    let c = pod("c").ip;
    let mut server = lab.pod_command("c", "python3");
    server
        .arg(&rr)
        .args(["server", RR_PORT])
        .stdout(Stdio::null());
    lab.spawn("rr server", server)?;
    let mut iperf = lab.pod_command("c", "iperf3");
    iperf
        .args(["-s", "-p", IPERF_PORT])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn("iperf3 server", iperf)?;
    std::thread::sleep(Duration::from_millis(500));

    println!("== plain: pod a → pod c, no Ambit");
    let plain = measure(&lab, &rr, c, seconds)?;

    println!("== ambit: eBPF capture + HBONE between the two lab nodes");
    let config = dir.join("lab.yaml");
    fs::write(&config, lab.config_yaml(&["a", "c"]))?;
    let ca = dir.join("ca");
    if !ca.join("root-cert.pem").exists() {
        lab.init_ca(&ambit, &ca)?;
    }
    let ca = ca.display().to_string();
    // AMBIT_BENCH_NODE_ARGS: more `ambit node` flags, to compare settings run against run.
    let extra = std::env::var("AMBIT_BENCH_NODE_ARGS").unwrap_or_default();
    let mut args = vec!["--ca-dir", ca.as_str()];
    args.extend(extra.split_whitespace());
    for node in ["n1", "n2"] {
        let log = dir.join(format!("{node}.log"));
        lab.start_node(&ambit, node, &config, &log, &args)?;
    }
    let through = measure(&lab, &rr, c, seconds)?;
    let captured = fs::read_to_string(dir.join("n1.log"))?
        .matches("captured outbound")
        .count();
    if captured == 0 {
        bail!(
            "the ambit run was not captured: see {}",
            dir.join("n1.log").display()
        );
    }

    report(&plain, &through, &dir)?;
    drop(lab);
    Ok(())
}

fn measure(lab: &Lab, rr: &Path, c: &str, seconds: u32) -> Result<Figures> {
    let out = lab.run_in_pod(
        "a",
        "iperf3",
        &["-c", c, "-p", IPERF_PORT, "-t", &seconds.to_string(), "-J"],
    )?;
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("iperf3 failed: {json}");
    }
    let gbit_per_s = json_number(&json, "\"sum_received\"", "\"bits_per_second\"")? / 1e9;
    let rr = rr.to_str().unwrap();
    let lat = run_json(lab, &[rr, "latency", c, RR_PORT, "100", "5000"])?;
    let conn = run_json(lab, &[rr, "connrate", c, RR_PORT, &seconds.to_string()])?;
    let f = Figures {
        gbit_per_s,
        p50_us: json_number(&lat, "", "\"p50_us\"")?,
        p99_us: json_number(&lat, "", "\"p99_us\"")?,
        conn_per_s: json_number(&conn, "", "\"conn_per_s\"")?,
    };
    println!(
        "   {:.2} Gbit/s, p50 {:.0} µs, p99 {:.0} µs, {:.0} conn/s",
        f.gbit_per_s, f.p50_us, f.p99_us, f.conn_per_s
    );
    Ok(f)
}

fn run_json(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = lab.pod_command("a", "python3").args(args).output()?;
    if !out.status.success() {
        bail!("rr.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The number after `key` (after `section`, if given) in a JSON text. Enough for iperf3's and
/// rr.py's output without a JSON dependency in xtask.
fn json_number(json: &str, section: &str, key: &str) -> Result<f64> {
    let from = if section.is_empty() {
        0
    } else {
        json.find(section)
            .with_context(|| format!("{section} not in output"))?
    };
    let at = json[from..]
        .find(key)
        .with_context(|| format!("{key} not in output"))?
        + from
        + key.len();
    let rest = json[at..].trim_start_matches(|c: char| c == ':' || c.is_whitespace());
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-' || c == '+'))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .with_context(|| format!("{key}: not a number"))
}

fn report(plain: &Figures, ambit: &Figures, dir: &Path) -> Result<()> {
    let rows = [
        (
            "single-stream throughput (Gbit/s)",
            plain.gbit_per_s,
            ambit.gbit_per_s,
        ),
        (
            "request/response 100 B p50 (µs)",
            plain.p50_us,
            ambit.p50_us,
        ),
        (
            "request/response 100 B p99 (µs)",
            plain.p99_us,
            ambit.p99_us,
        ),
        (
            "new connections per second",
            plain.conn_per_s,
            ambit.conn_per_s,
        ),
    ];
    println!("\n| figure | plain | ambit | ambit / plain |\n|---|---|---|---|");
    let mut json = String::from("{\n");
    for (i, (name, p, a)) in rows.iter().enumerate() {
        println!("| {name} | {p:.2} | {a:.2} | {:.2}× |", a / p);
        json.push_str(&format!(
            "  \"{name}\": {{\"plain\": {p:.3}, \"ambit\": {a:.3}, \"ratio\": {:.3}}}{}\n",
            a / p,
            if i + 1 < rows.len() { "," } else { "" }
        ));
    }
    json.push('}');
    let path = dir.join("results.json");
    fs::write(&path, json)?;
    println!("\n(results in {})", path.display());
    Ok(())
}
