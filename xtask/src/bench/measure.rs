//! One measurement of one mode: the same unmodified clients (iperf3, rr.py, hold.py) in the
//! client pod for every mode, and what /proc says about CPU time and memory meanwhile.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use ambit_lab::Lab;
use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::{
    session::Session,
    stats::{Figure, Figures, FIRST_BYTE_PERCENTILES, LATENCY_SIZES, PERCENTILES},
    Env,
};

pub const RR_PORT: u16 = 7000;
/// The connection-rate figure of the n-th measurement of a run goes to echo port
/// `CONNRATE_FIRST_PORT + n`, a destination no earlier measurement used. Every connection
/// leaves a TIME_WAIT socket for 60 s (in the client pod; in Ambit's modes also in the server
/// pod, from the tunnel's delivery to the app), and connect() slows down sharply as TIME_WAIT
/// sockets to the same destination pile up (measured here: 5.3 ms per connect with 17,600 of
/// them): a shared port would charge each mode for the modes measured before it.
pub const CONNRATE_FIRST_PORT: u16 = 7100;
pub const IPERF_PORT: u16 = 5201;
/// Round trips per latency figure (after rr.py's 100 warm-ups).
const ROUND_TRIPS: u32 = 5000;
/// Connections held open for the RSS-per-connection figure.
pub const IDLE_CONNECTIONS: u32 = 1000;
const GIB: f64 = (1u64 << 30) as f64;
const MIB_PER_KIB: f64 = 1.0 / 1024.0;

/// Every figure of the session's mode (its nodes, if any, running and not yet used).
/// `connrate_port`: the echo port for the connection rate, used by no other measurement.
pub fn figures(lab: &Lab, env: &Env, session: &Session, connrate_port: u16) -> Result<Figures> {
    let mode = session.mode();
    let (client, server) = (mode.client(), mode.destination());
    let mut f = Figures::default();
    if let Some(pid) = session.client_node_pid() {
        thread::sleep(Duration::from_millis(500));
        f.set(Figure::RssIdle, rss_mib(pid)?);
    }
    // A mode whose throughput run fails (an app's write refused: the fast path's `ENOMEM`
    // without backpressure) still gets its other figures; the failure is reported.
    if let Err(e) = single_stream(lab, env, session, &mut f) {
        println!("   throughput, 1 stream: failed: {e:#}");
        f.fail(format!(
            "throughput, 1 stream (and its CPU and RSS figures): {e:#}"
        ));
    }
    match iperf3(lab, client, server, 8, env.seconds) {
        Ok(eight) => f.set(Figure::Throughput8, eight.gbit_per_s()),
        Err(e) => {
            println!("   throughput, 8 streams: failed: {e:#}");
            f.fail(format!("throughput, 8 streams: {e:#}"));
        }
    }
    for bytes in LATENCY_SIZES {
        let (size, n) = (bytes.to_string(), ROUND_TRIPS.to_string());
        let port = RR_PORT.to_string();
        let out = rr(lab, env, client, &["latency", server, &port, &size, &n])?;
        for pct in PERCENTILES {
            f.set(
                Figure::Latency { bytes, pct },
                number(&out, &format!("p{pct}_us"))?,
            );
        }
    }
    let out = connrate(lab, env, session, connrate_port)?;
    f.set(Figure::ConnRate, number(&out, "conn_per_s")?);
    for pct in FIRST_BYTE_PERCENTILES {
        let key = format!("first_byte_p{pct}_us");
        f.set(Figure::FirstByte { pct }, number(&out, &key)?);
    }
    Ok(f)
}

/// rr.py's connection-rate loop (connect, a 1-byte exchange, close) for `env.seconds` to the
/// echo server on `port`.
fn connrate(lab: &Lab, env: &Env, session: &Session, port: u16) -> Result<Value> {
    let mode = session.mode();
    let args = [
        "connrate",
        mode.destination(),
        &port.to_string(),
        &env.seconds.to_string(),
    ];
    rr(lab, env, mode.client(), &args)
}

/// New connections per second alone (no other figure), e.g. under other node flags.
pub fn conn_per_s(lab: &Lab, env: &Env, session: &Session, port: u16) -> Result<f64> {
    number(&connrate(lab, env, session, port)?, "conn_per_s")
}

/// Single-stream throughput, and the CPU time and RSS it costs.
fn single_stream(lab: &Lab, env: &Env, session: &Session, f: &mut Figures) -> Result<()> {
    let mode = session.mode();
    let pids = session.node_pids();
    let machine_before = machine_busy_seconds()?;
    let proxy_before = cpu_seconds(&pids)?;
    let (run, rss_max) = while_sampling_rss(session.client_node_pid(), || {
        iperf3(lab, mode.client(), mode.destination(), 1, env.seconds)
    })?;
    let machine = machine_busy_seconds()? - machine_before;
    let proxy = cpu_seconds(&pids)? - proxy_before;
    let gib = run.bytes / GIB;
    f.set(Figure::Throughput1, run.gbit_per_s());
    f.set(Figure::MachineCpuPerGib, machine / gib);
    if let Some(rss) = rss_max {
        f.set(Figure::ProxyCpuPerGib, proxy / gib);
        f.set(
            Figure::ProxyCoresPerGbit,
            proxy / (run.gbit_per_s() * run.seconds),
        );
        f.set(Figure::RssLoad, rss);
    }
    Ok(())
}

/// Runs `work` while sampling the RSS of `pid` every 100 ms; returns its result and the
/// largest RSS seen (MiB), if there is a pid.
fn while_sampling_rss<T>(
    pid: Option<u32>,
    work: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<f64>)> {
    let Some(pid) = pid else {
        return Ok((work()?, None));
    };
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut max = 0.0f64;
            while !done.load(Ordering::Relaxed) {
                max = max.max(rss_mib(pid).unwrap_or(0.0));
                thread::sleep(Duration::from_millis(100));
            }
            max
        });
        let result = work();
        done.store(true, Ordering::Relaxed);
        let max = sampler.join().expect("RSS sampler panicked");
        Ok((result?, Some(max)))
    })
}

/// RSS growth of the client's node per 1,000 idle connections: hold.py opens
/// `IDLE_CONNECTIONS` connections through the tunnel to the echo server (one byte exchanged on
/// each, so each is established end to end) and holds them while the RSS is read.
pub fn rss_per_1000_idle(lab: &Lab, env: &Env, session: &Session) -> Result<f64> {
    let mode = session.mode();
    let pid = session
        .client_node_pid()
        .context("RSS per connection needs a node process")?;
    thread::sleep(Duration::from_millis(500));
    let idle = rss_mib(pid)?;
    let holder = Holder::open(lab, env, mode.client(), mode.destination())?;
    thread::sleep(Duration::from_secs(1));
    let held = rss_mib(pid)?;
    drop(holder);
    Ok((held - idle) * 1000.0 / f64::from(IDLE_CONNECTIONS))
}

/// hold.py, holding its connections open; killed when dropped, on every path.
struct Holder(Child);

impl Holder {
    fn open(lab: &Lab, env: &Env, client: &str, server: &str) -> Result<Holder> {
        let n = IDLE_CONNECTIONS;
        let child = lab
            .pod_command(client, "python3")
            .arg(&env.hold)
            .args([server, &RR_PORT.to_string(), &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting hold.py")?;
        let mut holder = Holder(child);
        let stdout = holder.0.stdout.take().context("hold.py's stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.trim() == format!("open {n}") => Ok(holder),
            Ok(line) => bail!("hold.py: expected \"open {n}\", got {line:?} (see its stderr)"),
            Err(_) => bail!("hold.py did not open {n} connections within 60 s"),
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run's result (the receiver's sums).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Iperf {
    pub bits_per_second: f64,
    pub bytes: f64,
    pub seconds: f64,
}

impl Iperf {
    pub fn gbit_per_s(&self) -> f64 {
        self.bits_per_second / 1e9
    }
}

/// iperf3 from pod `client` to the iperf3 server at `server`, `streams` parallel streams.
fn iperf3(lab: &Lab, client: &str, server: &str, streams: u32, seconds: u32) -> Result<Iperf> {
    let (port, secs, streams) = (
        IPERF_PORT.to_string(),
        seconds.to_string(),
        streams.to_string(),
    );
    let args = ["-c", server, "-p", &port, "-t", &secs, "-P", &streams, "-J"];
    // The server takes one test at a time and may still be finishing the previous one.
    let mut attempt = 1;
    loop {
        let out = lab.run_in_pod(client, "iperf3", &args)?;
        let json = String::from_utf8_lossy(&out.stdout);
        match parse_iperf(&json) {
            Err(e) if attempt < 3 && json.contains("busy") => {
                eprintln!("   {e:#}; retrying");
                attempt += 1;
                thread::sleep(Duration::from_secs(1));
            }
            result => {
                return result.with_context(|| {
                    format!(
                        "iperf3 {} in pod {client}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                });
            }
        }
    }
}

/// The receiver's totals from iperf3's JSON output (`-J`).
pub fn parse_iperf(json: &str) -> Result<Iperf> {
    let v: Value = serde_json::from_str(json).context("iperf3 printed no JSON")?;
    if let Some(error) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {error}");
    }
    let sum = &v["end"]["sum_received"];
    Ok(Iperf {
        bits_per_second: number(sum, "bits_per_second")?,
        bytes: number(sum, "bytes")?,
        seconds: number(sum, "seconds")?,
    })
}

/// rr.py in pod `pod` with `args`; its JSON output.
fn rr(lab: &Lab, env: &Env, pod: &str, args: &[&str]) -> Result<Value> {
    let out = lab
        .pod_command(pod, "python3")
        .arg(&env.rr)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running rr.py")?;
    if !out.status.success() {
        bail!(
            "rr.py {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("rr.py {}: output", args.join(" ")))
}

fn number(v: &Value, key: &str) -> Result<f64> {
    v.get(key)
        .and_then(Value::as_f64)
        .with_context(|| format!("no number {key:?} in {v}"))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of these processes (all their threads) so far.
fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    let mut ticks = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        ticks += process_ticks(&stat).with_context(|| format!("parsing {path}"))?;
    }
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// Non-idle CPU seconds of the whole machine (all CPUs) so far.
fn machine_busy_seconds() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks = machine_busy_ticks(&stat).context("parsing /proc/stat")?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// VmRSS of a process, in MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    Ok(ambit_lab::rss_kib(pid)? as f64 * MIB_PER_KIB)
}

/// utime + stime (fields 14 and 15) of a /proc/<pid>/stat line, in clock ticks.
pub fn process_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count from its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(field(14)? + field(15)?)
}

/// The non-idle ticks of /proc/stat's `cpu` line: user, nice, system, irq, softirq, steal
/// (guest time is already counted in user and nice; idle and iowait are idle).
pub fn machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_ticks_skip_odd_command_names() {
        let stat = "4242 (ambit (x) y) S 1 4242 4242 0 -1 4194560 9 0 0 0 170 30 0 0 20 0 9 0 \
                    123 456 789";
        assert_eq!(process_ticks(stat), Some(200));
        assert_eq!(process_ticks("garbage"), None);
    }

    #[test]
    fn machine_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 1000 40 3 2 1 7 0\ncpu0 50 2 25 500 20 1 1 0 0 0\n";
        assert_eq!(machine_busy_ticks(stat), Some(161));
    }

    #[test]
    fn iperf_json() {
        let json = r#"{"start": {}, "end": {"sum_sent": {"bytes": 1},
            "sum_received": {"start": 0, "end": 5.0001, "seconds": 5.0001,
            "bytes": 26843545600, "bits_per_second": 42949672960.0}}}"#;
        let r = parse_iperf(json).unwrap();
        assert_eq!(r.bytes, 26843545600.0);
        assert!((r.gbit_per_s() - 42.949672960).abs() < 1e-9);
        let busy = r#"{"start": {}, "end": {}, "error": "the server is busy running a test. try again later"}"#;
        assert!(format!("{:#}", parse_iperf(busy).unwrap_err()).contains("busy"));
        assert!(parse_iperf("").is_err());
    }
}
