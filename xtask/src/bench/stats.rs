//! The figures, their samples over the repetitions, and statistics on them. No I/O here.

use std::collections::BTreeMap;

use super::mode::Mode;

/// Message sizes of the request/response latency figures, in bytes.
pub const LATENCY_SIZES: [u32; 3] = [1, 100, 1024];
/// Latency percentiles reported.
pub const PERCENTILES: [u8; 3] = [50, 90, 99];
/// Percentiles of a new connection's time to its first answered byte.
pub const FIRST_BYTE_PERCENTILES: [u8; 2] = [50, 99];

/// One figure of the table. The derived order is the table's row order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Figure {
    /// iperf3, one stream.
    Throughput1,
    /// iperf3 -P 8, the sum.
    Throughput8,
    /// Request/response round trip over a long-lived connection.
    Latency { bytes: u32, pct: u8 },
    /// Connect, one 1-byte exchange, close.
    ConnRate,
    /// In that loop, from connect() to the answer's first byte (a new connection's set-up cost).
    FirstByte { pct: u8 },
    /// The same loop with every tunneled connection doing its own HBONE TLS handshake
    /// (`--hbone-max-requests-per-connection 1`): the handshake's price, which pooling hides
    /// (a pooled connection serves thousands of new connections). Ambit's modes only.
    ConnRateHandshakeEach,
    /// Non-idle CPU of the whole machine per GiB moved (single-stream run).
    MachineCpuPerGib,
    /// CPU of the `ambit node` processes per GiB moved (single-stream run).
    ProxyCpuPerGib,
    /// The same as cores busy per Gbit/s.
    ProxyCoresPerGbit,
    /// RSS of the client's node process before any traffic.
    RssIdle,
    /// Its largest RSS sampled during the single-stream run.
    RssLoad,
    /// Its RSS growth per 1,000 idle connections held open through the tunnel.
    RssPer1000,
}

impl Figure {
    /// Every figure, in table order.
    pub fn all() -> Vec<Figure> {
        let mut all = vec![Figure::Throughput1, Figure::Throughput8];
        for bytes in LATENCY_SIZES {
            all.extend(PERCENTILES.map(|pct| Figure::Latency { bytes, pct }));
        }
        all.push(Figure::ConnRate);
        all.extend(FIRST_BYTE_PERCENTILES.map(|pct| Figure::FirstByte { pct }));
        all.push(Figure::ConnRateHandshakeEach);
        all.extend([
            Figure::MachineCpuPerGib,
            Figure::ProxyCpuPerGib,
            Figure::ProxyCoresPerGbit,
            Figure::RssIdle,
            Figure::RssLoad,
            Figure::RssPer1000,
        ]);
        all
    }

    pub fn label(self) -> String {
        match self {
            Figure::Throughput1 => "throughput, 1 stream".into(),
            Figure::Throughput8 => "throughput, 8 streams".into(),
            Figure::Latency { bytes, pct } => format!("latency {} p{pct}", size_label(bytes)),
            Figure::ConnRate => "new connections".into(),
            Figure::FirstByte { pct } => format!("new connection, first byte p{pct}"),
            Figure::ConnRateHandshakeEach => "new connections, a TLS handshake each".into(),
            Figure::MachineCpuPerGib => "machine CPU per GiB".into(),
            Figure::ProxyCpuPerGib => "proxy CPU per GiB".into(),
            Figure::ProxyCoresPerGbit => "proxy cores per Gbit/s".into(),
            Figure::RssIdle => "proxy RSS idle".into(),
            Figure::RssLoad => "proxy RSS under load".into(),
            Figure::RssPer1000 => "proxy RSS per 1,000 idle conns".into(),
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Figure::Throughput1 | Figure::Throughput8 => "Gbit/s",
            Figure::Latency { .. } | Figure::FirstByte { .. } => "µs",
            Figure::ConnRate | Figure::ConnRateHandshakeEach => "conn/s",
            Figure::MachineCpuPerGib | Figure::ProxyCpuPerGib => "CPU s/GiB",
            Figure::ProxyCoresPerGbit => "cores",
            Figure::RssIdle | Figure::RssLoad | Figure::RssPer1000 => "MiB",
        }
    }

    /// The figure's name in results.json.
    pub fn key(self) -> String {
        match self {
            Figure::Throughput1 => "throughput_1_stream_gbit_s".into(),
            Figure::Throughput8 => "throughput_8_streams_gbit_s".into(),
            Figure::Latency { bytes, pct } => format!("latency_{bytes}B_p{pct}_us"),
            Figure::ConnRate => "new_connections_per_s".into(),
            Figure::FirstByte { pct } => format!("new_connection_first_byte_p{pct}_us"),
            Figure::ConnRateHandshakeEach => "new_connections_handshake_each_per_s".into(),
            Figure::MachineCpuPerGib => "machine_cpu_s_per_gib".into(),
            Figure::ProxyCpuPerGib => "proxy_cpu_s_per_gib".into(),
            Figure::ProxyCoresPerGbit => "proxy_cores_per_gbit_s".into(),
            Figure::RssIdle => "proxy_rss_idle_mib".into(),
            Figure::RssLoad => "proxy_rss_load_mib".into(),
            Figure::RssPer1000 => "proxy_rss_per_1000_idle_conns_mib".into(),
        }
    }
}

/// "1 B", "100 B", "1 KiB".
pub fn size_label(bytes: u32) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

/// One measurement of one mode: the figures it produced (a figure a mode lacks is absent).
#[derive(Debug, Clone, Default)]
pub struct Figures(BTreeMap<Figure, f64>, Vec<String>);

impl Figures {
    /// A measurement of this repetition that failed (the others still count), and why.
    pub fn fail(&mut self, what: String) {
        self.1.push(what);
    }

    pub fn set(&mut self, figure: Figure, value: f64) {
        self.0.insert(figure, value);
    }

    pub fn get(&self, figure: Figure) -> Option<f64> {
        self.0.get(&figure).copied()
    }
}

/// Median, minimum and maximum of a figure's samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

/// The summary of `samples`, None when there are none.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = match n {
        0 => return None,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    };
    Some(Summary {
        median,
        min: sorted[0],
        max: sorted[n - 1],
        count: n,
    })
}

/// `value / base`, when that means something (a positive, finite base).
pub fn ratio(value: f64, base: f64) -> Option<f64> {
    (base > 0.0 && base.is_finite() && value.is_finite()).then(|| value / base)
}

/// Every sample of every figure of every mode that ran, and the modes that could not run.
#[derive(Debug, Clone, Default)]
pub struct Results {
    /// The modes measured, in the order they ran.
    pub modes: Vec<Mode>,
    /// Modes listed but not measured, and why: not implemented, or what they need is missing.
    pub skipped: Vec<(Mode, String)>,
    /// Measurements that failed, per mode (each once, with the repetitions it failed in).
    pub failed: Vec<(Mode, String)>,
    pub repetitions: u32,
    samples: BTreeMap<(Mode, Figure), Vec<f64>>,
}

impl Results {
    pub fn new(modes: &[Mode], repetitions: u32) -> Self {
        Results {
            modes: modes.to_vec(),
            skipped: Vec::new(),
            failed: Vec::new(),
            repetitions,
            samples: BTreeMap::new(),
        }
    }

    /// Lists `mode` as not measured, for `reason` (e.g. the ztunnel mode without a ztunnel).
    pub fn skip(&mut self, mode: Mode, reason: String) {
        if let Some(i) = self.modes.iter().position(|&m| m == mode) {
            self.modes.remove(i);
            self.skipped.push((mode, reason));
        }
    }

    pub fn add(&mut self, mode: Mode, figures: &Figures) {
        for (&figure, &value) in &figures.0 {
            self.push(mode, figure, value);
        }
        for what in &figures.1 {
            if !self.failed.iter().any(|(m, w)| *m == mode && w == what) {
                self.failed.push((mode, what.clone()));
            }
        }
    }

    pub fn push(&mut self, mode: Mode, figure: Figure, value: f64) {
        self.samples.entry((mode, figure)).or_default().push(value);
    }

    pub fn samples(&self, mode: Mode, figure: Figure) -> &[f64] {
        self.samples
            .get(&(mode, figure))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn summary(&self, mode: Mode, figure: Figure) -> Option<Summary> {
        summarize(self.samples(mode, figure))
    }

    /// The median of `mode` over plain's median of the same figure in this run.
    pub fn ratio_to_plain(&self, mode: Mode, figure: Figure) -> Option<f64> {
        if mode == Mode::Plain {
            return None;
        }
        let plain = self.summary(Mode::Plain, figure)?;
        ratio(self.summary(mode, figure)?.median, plain.median)
    }

    /// The figures any mode has samples of, in table order.
    pub fn figures(&self) -> Vec<Figure> {
        Figure::all()
            .into_iter()
            .filter(|&f| self.modes.iter().any(|&m| !self.samples(m, f).is_empty()))
            .collect()
    }
}

/// "1 repetition", "3 repetitions".
pub fn repetitions(n: u32) -> String {
    format!("{n} repetition{}", if n == 1 { "" } else { "s" })
}

/// A figure's value with three significant digits (two decimals at most above 1).
pub fn format_value(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 || a == 0.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_odd_and_even_counts() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.count), (2.0, 1.0, 3.0, 3));
        let s = summarize(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        let s = summarize(&[7.5]).unwrap();
        assert_eq!((s.median, s.min, s.max), (7.5, 7.5, 7.5));
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(5.0, 10.0), Some(0.5));
        assert_eq!(ratio(5.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }

    #[test]
    fn results_ratio_to_plain_uses_medians() {
        let mut r = Results::new(&[Mode::Plain, Mode::Ambit], 3);
        assert_eq!(r.modes, [Mode::Plain, Mode::Ambit]);
        assert!(r.skipped.is_empty());
        for (p, a) in [(10.0, 4.0), (12.0, 6.0), (100.0, 5.0)] {
            r.push(Mode::Plain, Figure::Throughput1, p);
            r.push(Mode::Ambit, Figure::Throughput1, a);
        }
        r.push(Mode::Ambit, Figure::RssIdle, 20.0);
        assert_eq!(
            r.ratio_to_plain(Mode::Ambit, Figure::Throughput1),
            Some(5.0 / 12.0)
        );
        assert_eq!(r.ratio_to_plain(Mode::Plain, Figure::Throughput1), None);
        assert_eq!(r.ratio_to_plain(Mode::Ambit, Figure::RssIdle), None);
        assert_eq!(r.figures(), [Figure::Throughput1, Figure::RssIdle]);
    }

    #[test]
    fn a_skipped_mode_moves_to_the_skipped_list() {
        let mut r = Results::new(&[Mode::Plain, Mode::Ztunnel, Mode::AmbitSockmap], 1);
        r.skip(Mode::Ztunnel, "no ztunnel binary".into());
        assert_eq!(r.modes, [Mode::Plain, Mode::AmbitSockmap]);
        assert_eq!(r.skipped[0], (Mode::Ztunnel, "no ztunnel binary".into()));
    }

    #[test]
    fn figure_order_and_names() {
        let all = Figure::all();
        assert_eq!(all.len(), 2 + 9 + 1 + 2 + 1 + 6);
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(all, sorted, "all() is the derived order");
        let lat = Figure::Latency {
            bytes: 1024,
            pct: 99,
        };
        assert_eq!(lat.label(), "latency 1 KiB p99");
        assert_eq!(lat.key(), "latency_1024B_p99_us");
        assert_eq!(size_label(100), "100 B");
        let first = Figure::FirstByte { pct: 50 };
        assert_eq!(first.label(), "new connection, first byte p50");
        assert_eq!(first.key(), "new_connection_first_byte_p50_us");
    }

    #[test]
    fn values_have_three_significant_digits() {
        assert_eq!(format_value(1234.4), "1234");
        assert_eq!(format_value(42.17), "42.2");
        assert_eq!(format_value(3.14659), "3.15");
        assert_eq!(format_value(0.04567), "0.046");
        assert_eq!(format_value(0.0), "0.00");
        assert_eq!(repetitions(1), "1 repetition");
        assert_eq!(repetitions(3), "3 repetitions");
    }
}
