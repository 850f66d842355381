//! The results as a text table (stdout), a Markdown table (results.md) and JSON (results.json).

use serde_json::{json, Map, Value};

use super::{
    mode::Mode,
    stats::{format_value, repetitions, Figure, Results},
};

/// One table cell: "median (min–max)", then the median's ratio to plain's ("0.52×").
pub fn cell(results: &Results, mode: Mode, figure: Figure) -> String {
    let Some(s) = results.summary(mode, figure) else {
        return "n/a".into();
    };
    let mut text = format_value(s.median);
    if s.count > 1 {
        text.push_str(&format!(
            " ({}–{})",
            format_value(s.min),
            format_value(s.max)
        ));
    }
    if let Some(r) = results.ratio_to_plain(mode, figure) {
        text.push_str(&format!(" {r:.2}×"));
    }
    text
}

/// Header and rows of the table: one row per figure, one column per mode.
fn rows(results: &Results) -> (Vec<String>, Vec<Vec<String>>) {
    let mut header = vec!["figure".to_owned()];
    header.extend(results.modes.iter().map(|m| m.name().to_owned()));
    let rows = results
        .figures()
        .into_iter()
        .map(|figure| {
            let mut row = vec![format!("{} ({})", figure.label(), figure.unit())];
            row.extend(results.modes.iter().map(|&m| cell(results, m, figure)));
            row
        })
        .collect();
    (header, rows)
}

/// What the cells mean, and what was not measured.
fn notes(results: &Results) -> Vec<String> {
    let mut notes = vec![format!(
        "cells: median (min–max) over {}, modes alternating; × = the median's ratio to \
         plain's median in the same run",
        repetitions(results.repetitions)
    )];
    notes.push(
        "proxy = the mode's `ambit node` processes (for relay: its two relays; for ztunnel: its \
         two ztunnels): CPU of all of them (n1 and n2; n1 alone for ambit-same-node), RSS of the \
         client side's (n1's, pod a's ztunnel); CPU per GiB over the single-stream run; machine \
         CPU = all non-idle CPU time of the host (shared: includes other load); RSS per 1,000 \
         idle conns measured once, in the first `ambit` and `ztunnel` repetitions"
            .into(),
    );
    notes.push(
        "each mode's nodes share the machine's cores, as real nodes would each have their \
         own: `ambit node --worker-threads` = cores / the mode's nodes (the relays alike, and \
         ztunnel's `ZTUNNEL_WORKER_THREADS`)"
            .into(),
    );
    for (mode, reason) in &results.skipped {
        notes.push(format!(
            "{}: {reason} ({}); nothing measured",
            mode.name(),
            mode.description()
        ));
    }
    for (mode, what) in &results.failed {
        notes.push(format!("{}: failed: {what}", mode.name()));
    }
    notes
}

/// The table for a terminal: columns padded to their widest cell.
pub fn text_table(results: &Results) -> String {
    let (header, rows) = rows(results);
    let width = |i: usize| {
        std::iter::once(&header)
            .chain(&rows)
            .map(|r| r[i].chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(&header);
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    out.push_str(&line(&rule));
    for row in &rows {
        out.push_str(&line(row));
    }
    for note in notes(results) {
        out.push_str(&format!("\n{note}"));
    }
    out.push('\n');
    out
}

/// The same table in Markdown, ready to paste into the README.
pub fn markdown_table(results: &Results) -> String {
    let (header, rows) = rows(results);
    let escape = |c: &String| c.replace('|', "\\|");
    let mut out = format!(
        "| {} |\n|{}\n",
        header.iter().map(escape).collect::<Vec<_>>().join(" | "),
        "---|".repeat(header.len())
    );
    for row in &rows {
        out.push_str(&format!(
            "| {} |\n",
            row.iter().map(escape).collect::<Vec<_>>().join(" | ")
        ));
    }
    out.push('\n');
    for note in notes(results) {
        out.push_str(&format!("- {note}\n"));
    }
    out
}

/// Everything in results.json: the machine, the settings, and per mode per figure every
/// sample with its median, minimum, maximum and ratio to plain.
pub fn json(results: &Results, machine: Value, settings: Value) -> Value {
    let mut modes = Map::new();
    for &mode in &results.modes {
        let mut figures = Map::new();
        for figure in results.figures() {
            let Some(s) = results.summary(mode, figure) else {
                continue;
            };
            figures.insert(
                figure.key(),
                json!({
                    "label": figure.label(),
                    "unit": figure.unit(),
                    "samples": results.samples(mode, figure),
                    "median": s.median,
                    "min": s.min,
                    "max": s.max,
                    "ratio_to_plain": results.ratio_to_plain(mode, figure),
                }),
            );
        }
        let failed: Vec<&String> = results
            .failed
            .iter()
            .filter(|(m, _)| *m == mode)
            .map(|(_, what)| what)
            .collect();
        modes.insert(
            mode.name().into(),
            json!({
                "description": mode.description(),
                "status": "measured",
                "figures": figures,
                "failed": failed,
            }),
        );
    }
    for (mode, reason) in &results.skipped {
        modes.insert(
            mode.name().into(),
            json!({ "description": mode.description(), "status": "skipped", "reason": reason }),
        );
    }
    json!({ "machine": machine, "settings": settings, "modes": modes })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::stats::Figures;

    /// Three repetitions of plain and ambit, and ztunnel skipped.
    pub(crate) fn sample_results() -> Results {
        let mut r = Results::new(&[Mode::Plain, Mode::Ambit, Mode::Ztunnel], 3);
        r.skip(Mode::Ztunnel, "no ztunnel binary".into());
        for (p, a) in [(40.0, 4.0), (42.0, 5.0), (41.0, 6.0)] {
            r.push(Mode::Plain, Figure::Throughput1, p);
            r.push(Mode::Ambit, Figure::Throughput1, a);
            r.push(Mode::Plain, Figure::Throughput8, p * 1.5);
            r.push(Mode::Ambit, Figure::Throughput8, a * 1.5);
            for pct in [50, 90, 99] {
                let f = Figure::Latency { bytes: 100, pct };
                r.push(Mode::Plain, f, p + f64::from(pct));
                r.push(Mode::Ambit, f, 3.0 * p + f64::from(pct));
            }
            r.push(Mode::Ambit, Figure::RssIdle, a + 10.0);
        }
        r.push(Mode::Ambit, Figure::RssPer1000, 1.25);
        let mut failed = Figures::default();
        failed.fail("throughput, 8 streams: ENOMEM".into());
        r.add(Mode::Ambit, &failed);
        r.add(Mode::Ambit, &failed);
        r
    }

    #[test]
    fn cells_show_median_spread_and_ratio() {
        let r = sample_results();
        assert_eq!(
            cell(&r, Mode::Plain, Figure::Throughput1),
            "41.0 (40.0–42.0)"
        );
        assert_eq!(
            cell(&r, Mode::Ambit, Figure::Throughput1),
            "5.00 (4.00–6.00) 0.12×"
        );
        assert_eq!(cell(&r, Mode::Plain, Figure::RssIdle), "n/a");
        assert_eq!(cell(&r, Mode::Ambit, Figure::RssIdle), "15.0 (14.0–16.0)");
        assert_eq!(cell(&r, Mode::Ambit, Figure::RssPer1000), "1.25");
    }

    #[test]
    fn text_table_is_aligned_and_lists_skipped_modes() {
        let t = text_table(&sample_results());
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("figure"));
        assert!(lines[0].contains("plain") && lines[0].contains("ambit"));
        assert!(
            !lines[0].contains("ztunnel"),
            "no column for an unmeasured mode"
        );
        // The plain column starts at the same character in every row.
        let col = lines[0].find("plain").unwrap();
        let col = lines[0][..col].chars().count();
        for line in &lines[2..7] {
            let before: String = line.chars().take(col).collect();
            assert!(before.ends_with("  "), "{line:?}");
        }
        assert!(t.contains("throughput, 1 stream (Gbit/s)"));
        assert!(t.contains("ztunnel: no ztunnel binary"));
    }

    #[test]
    fn markdown_table_has_one_row_per_figure() {
        let md = markdown_table(&sample_results());
        let table: Vec<&str> = md.lines().take_while(|l| l.starts_with('|')).collect();
        assert_eq!(table[0], "| figure | plain | ambit |");
        assert_eq!(table[1], "|---|---|---|");
        // 2 throughputs, 3 latency percentiles, RSS idle, RSS per 1,000.
        assert_eq!(table.len(), 2 + 7);
        assert!(md.contains("- ztunnel: no ztunnel binary"));
        assert!(md.contains("- ambit: failed: throughput, 8 streams: ENOMEM"));
        assert_eq!(md.matches("ENOMEM").count(), 1, "each failure once");
    }

    #[test]
    fn json_has_samples_summary_and_status() {
        let v = json(&sample_results(), json!({"nproc": 2}), json!({"reps": 3}));
        let t = &v["modes"]["ambit"]["figures"]["throughput_1_stream_gbit_s"];
        assert_eq!(t["samples"], json!([4.0, 5.0, 6.0]));
        assert_eq!(t["median"], json!(5.0));
        assert_eq!(t["ratio_to_plain"], json!(5.0 / 41.0));
        assert_eq!(
            v["modes"]["plain"]["figures"]["throughput_1_stream_gbit_s"]["ratio_to_plain"],
            Value::Null
        );
        assert_eq!(v["modes"]["ztunnel"]["status"], "skipped");
        assert_eq!(
            v["modes"]["ambit"]["failed"][0],
            "throughput, 8 streams: ENOMEM"
        );
        assert_eq!(v["machine"]["nproc"], 2);
    }
}
