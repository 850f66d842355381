//! The chart (chart.svg), hand-written SVG: two panels of grouped bars, one group per mode —
//! latency p50/p90/p99 for 100 B messages, and single- and 8-stream throughput. Bars are
//! medians, whiskers the min–max over the repetitions, each bar has its value written on it.

use std::fmt::Write as _;

use super::{
    mode::Mode,
    stats::{format_value, repetitions, Figure, Results},
};

const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 340.0;
const TITLE_HEIGHT: f64 = 40.0;
/// Plot area insets within a panel.
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 50.0;

struct Series {
    name: &'static str,
    figure: Figure,
    colour: &'static str,
}

struct Panel {
    title: &'static str,
    unit: &'static str,
    series: Vec<Series>,
}

/// The whole chart for these results.
pub fn chart(results: &Results) -> String {
    let latency = |pct| Figure::Latency { bytes: 100, pct };
    let panels = [
        Panel {
            title: "Request/response latency, 100 B messages (lower is better)",
            unit: "latency (µs)",
            series: vec![
                Series {
                    name: "p50",
                    figure: latency(50),
                    colour: "#4e79a7",
                },
                Series {
                    name: "p90",
                    figure: latency(90),
                    colour: "#f28e2b",
                },
                Series {
                    name: "p99",
                    figure: latency(99),
                    colour: "#e15759",
                },
            ],
        },
        Panel {
            title: "Throughput, iperf3 (higher is better)",
            unit: "throughput (Gbit/s)",
            series: vec![
                Series {
                    name: "1 stream",
                    figure: Figure::Throughput1,
                    colour: "#59a14f",
                },
                Series {
                    name: "8 streams",
                    figure: Figure::Throughput8,
                    colour: "#76b7b2",
                },
            ],
        },
    ];
    let height = TITLE_HEIGHT + PANEL_HEIGHT * panels.len() as f64;
    let mut svg = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{WIDTH}\" height=\"{height}\" fill=\"white\"/>\n"
    );
    text(
        &mut svg,
        WIDTH / 2.0,
        26.0,
        "middle",
        "font-size=\"16\" font-weight=\"bold\"",
        &format!(
            "Ambit benchmark: median of {}, whiskers min–max",
            repetitions(results.repetitions)
        ),
    );
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(
            &mut svg,
            results,
            panel,
            TITLE_HEIGHT + PANEL_HEIGHT * i as f64,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn draw_panel(svg: &mut String, results: &Results, panel: &Panel, top: f64) {
    let groups: Vec<Mode> = results
        .modes
        .iter()
        .chain(results.skipped.iter().map(|(m, _)| m))
        .copied()
        .collect();
    let max = results
        .modes
        .iter()
        .flat_map(|&m| panel.series.iter().map(move |s| (m, s.figure)))
        .filter_map(|(m, f)| results.summary(m, f))
        .map(|s| s.max)
        .fold(0.0, f64::max);
    let (axis_max, step) = nice_axis(max);
    let (left, right) = (LEFT, WIDTH - RIGHT);
    let (plot_top, plot_bottom) = (top + TOP, top + PANEL_HEIGHT - BOTTOM);
    let y = |v: f64| plot_bottom - v / axis_max * (plot_bottom - plot_top);

    text(
        svg,
        10.0,
        top + 22.0,
        "start",
        "font-size=\"14\" font-weight=\"bold\"",
        panel.title,
    );
    // Legend, top right.
    let mut x = right - 100.0 * panel.series.len() as f64;
    for s in &panel.series {
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/>",
            top + 33.0,
            s.colour
        );
        text(svg, x + 17.0, top + 44.0, "start", "", s.name);
        x += 100.0;
    }
    // Y axis: grid lines, ticks, label.
    let mut tick = 0.0;
    while tick <= axis_max + step / 2.0 {
        let ty = y(tick);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{ty:.1}\" x2=\"{right}\" y2=\"{ty:.1}\" stroke=\"#ddd\"/>"
        );
        text(
            svg,
            left - 6.0,
            ty + 4.0,
            "end",
            "",
            &tick_label(tick, step),
        );
        tick += step;
    }
    let mid = (plot_top + plot_bottom) / 2.0;
    let _ = writeln!(
        svg,
        "<text x=\"20\" y=\"{mid:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 20 {mid:.1})\">{}</text>",
        escape(panel.unit)
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{plot_bottom}\" x2=\"{right}\" y2=\"{plot_bottom}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{plot_top}\" x2=\"{left}\" y2=\"{plot_bottom}\" stroke=\"black\"/>"
    );
    text(
        svg,
        (left + right) / 2.0,
        plot_bottom + 40.0,
        "middle",
        "font-style=\"italic\"",
        "mode",
    );
    // One group of bars per mode.
    let group_width = (right - left) / groups.len().max(1) as f64;
    let bar_width = group_width * 0.7 / panel.series.len() as f64;
    for (g, &mode) in groups.iter().enumerate() {
        let gx = left + group_width * g as f64;
        let centre = gx + group_width / 2.0;
        text(svg, centre, plot_bottom + 18.0, "middle", "", mode.name());
        if !results.modes.contains(&mode) {
            let why = "not measured";
            text(
                svg,
                centre,
                mid,
                "middle",
                "fill=\"#888\" font-style=\"italic\"",
                why,
            );
            continue;
        }
        for (i, s) in panel.series.iter().enumerate() {
            let Some(sum) = results.summary(mode, s.figure) else {
                continue;
            };
            let bx = gx + group_width * 0.15 + bar_width * i as f64;
            let bc = bx + bar_width / 2.0;
            let _ = writeln!(
                svg,
                "<rect class=\"bar\" x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                y(sum.median),
                bar_width - 2.0,
                plot_bottom - y(sum.median),
                s.colour
            );
            let (hi, lo) = (y(sum.max), y(sum.min));
            let _ = writeln!(
                svg,
                "<path d=\"M{:.1} {hi:.1}H{:.1}M{bc:.1} {hi:.1}V{lo:.1}M{:.1} {lo:.1}H{:.1}\" stroke=\"#333\" fill=\"none\"/>",
                bc - 4.0,
                bc + 4.0,
                bc - 4.0,
                bc + 4.0
            );
            text(
                svg,
                bc - 1.0,
                hi - 4.0,
                "middle",
                "font-size=\"11\"",
                &format_value(sum.median),
            );
        }
    }
}

fn text(svg: &mut String, x: f64, y: f64, anchor: &str, attrs: &str, content: &str) {
    let _ = writeln!(
        svg,
        "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\" {attrs}>{}</text>",
        escape(content)
    );
}

/// The axis maximum and tick step for values up to `max`: steps of 1, 2 or 5 × 10^k, about
/// five ticks, with some headroom for the value labels.
pub fn nice_axis(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (1.0, 0.2);
    }
    let max = max * 1.08;
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = match raw / magnitude {
        n if n <= 1.0 => 1.0,
        n if n <= 2.0 => 2.0,
        n if n <= 5.0 => 5.0,
        _ => 10.0,
    } * magnitude;
    ((max / step).ceil() * step, step)
}

fn tick_label(value: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{value:.decimals$}")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::sample_results;

    #[test]
    fn axes_are_round() {
        assert_eq!(nice_axis(43.0), (50.0, 10.0));
        assert_eq!(nice_axis(123.0), (150.0, 50.0));
        let (max, step) = nice_axis(0.7);
        assert!((step - 0.2).abs() < 1e-12 && (max - 0.8).abs() < 1e-12);
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        assert_eq!(tick_label(0.4, 0.2), "0.4");
        assert_eq!(tick_label(150.0, 50.0), "150");
    }

    #[test]
    fn chart_has_bars_values_legend_and_skipped_modes() {
        let svg = chart(&sample_results());
        // 2 modes × (3 latency + 2 throughput series).
        assert_eq!(svg.matches("class=\"bar\"").count(), 10);
        for s in [
            "p50",
            "p90",
            "p99",
            "1 stream",
            "8 streams",
            "latency (µs)",
            "Gbit/s",
        ] {
            assert!(svg.contains(s), "{s} missing");
        }
        assert!(
            svg.contains(">5.00<"),
            "the ambit 1-stream median is written on its bar"
        );
        assert_eq!(svg.matches("not measured").count(), 2);
        assert_well_formed(&svg);
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }

    /// Every element opened is closed, in order (a minimal XML well-formedness check).
    fn assert_well_formed(svg: &str) {
        let mut open = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("unclosed tag") + start;
            let tag = &rest[start + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.ends_with('/') {
                continue;
            }
            let name = tag.split_whitespace().next().unwrap();
            if let Some(name) = name.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name.to_owned()));
            } else {
                open.push(name.to_owned());
            }
        }
        assert!(open.is_empty(), "unclosed: {open:?}");
    }
}
