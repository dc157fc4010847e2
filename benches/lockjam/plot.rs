//! The two plots of BENCHMARKS.md, as plain SVG: a bar chart of stall time
//! per strategy, and lines of sample cost against client sessions. Text is
//! left to the viewer's fonts, so no font library is needed.

use std::fmt::Write;

use crate::cost::{lockjam_sample, LoadResult, LOCKJAM_ACTIVITY, LOCKJAM_CALM, LOCKJAM_PER_SECOND, LOCKJAM_WAITING};
use crate::outage::{Run, Strategy, Workload};

const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn svg(width: f64, height: f64, body: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"DejaVu Sans, Arial, sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

/// Longest application query per strategy and workload: the median of the
/// runs as a bar, min to max as a whisker.
pub fn stall(results: &[(Workload, Strategy, Vec<Run>)]) -> String {
    let (left, top, bar, gap, width) = (290.0, 40.0, 16.0, 14.0, 760.0);
    let max = results
        .iter()
        .flat_map(|(_, _, runs)| runs.iter().map(|r| r.max_latency))
        .fold(1.0f64, f64::max)
        * 1.1;
    let plot_width = width - left - 30.0;
    let x = |seconds: f64| left + seconds / max * plot_width;
    let mut body = String::new();
    let _ = writeln!(
        body,
        "<text x=\"{}\" y=\"22\" font-size=\"14\" text-anchor=\"middle\">Longest application query during the migration (s): median of runs, min–max</text>",
        width / 2.0
    );
    let mut y = top;
    for strategy in Strategy::ALL {
        let _ = writeln!(
            body,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 8.0,
            y + bar + 4.0,
            escape(strategy.label())
        );
        for (k, workload) in [Workload::Select, Workload::Update].into_iter().enumerate() {
            let Some((_, _, runs)) = results.iter().find(|(w, s, _)| *w == workload && *s == strategy) else {
                continue;
            };
            let values: Vec<f64> = runs.iter().map(|r| r.max_latency).collect();
            let stats = crate::common::Stats::of(&values);
            let _ = writeln!(
                body,
                "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{bar}\" fill=\"{}\"/>",
                x(stats.median) - left,
                COLOURS[k]
            );
            let mid = y + bar / 2.0;
            let _ = writeln!(
                body,
                "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{mid}\" y2=\"{mid}\" stroke=\"black\"/>",
                x(stats.min),
                x(stats.max)
            );
            let _ = writeln!(
                body,
                "<text x=\"{:.1}\" y=\"{:.1}\">{:.2} s</text>",
                x(stats.max) + 5.0,
                mid + 4.0,
                stats.median
            );
            y += bar + 2.0;
        }
        y += gap;
    }
    let axis = y;
    let _ = writeln!(
        body,
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{axis}\" y2=\"{axis}\" stroke=\"black\"/>",
        left + plot_width
    );
    let step = if max > 20.0 { 10.0 } else { 1.0 };
    let mut tick = 0.0;
    while tick <= max {
        let _ = writeln!(
            body,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{tick}</text>",
            x(tick),
            axis + 15.0
        );
        tick += step;
    }
    for (k, workload) in [Workload::Select, Workload::Update].into_iter().enumerate() {
        let lx = left + k as f64 * 200.0;
        let _ = writeln!(
            body,
            "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            axis + 28.0,
            COLOURS[k],
            lx + 16.0,
            axis + 38.0,
            escape(workload.label())
        );
    }
    svg(width, axis + 50.0, &body)
}

/// Median server time per sample against client sessions, one panel per
/// waiter count, log scale.
pub fn cost(results: &[LoadResult]) -> String {
    let mut waiters: Vec<usize> = results.iter().map(|r| r.waiters).collect();
    waiters.sort();
    waiters.dedup();
    let mut sessions: Vec<usize> = results.iter().map(|r| r.sessions).collect();
    sessions.sort();
    sessions.dedup();
    let mut names: Vec<String> = vec!["lockjam sample".into()];
    for r in results {
        for (name, _) in &r.rows {
            if ![LOCKJAM_CALM, LOCKJAM_ACTIVITY, LOCKJAM_WAITING, LOCKJAM_PER_SECOND].contains(&name.as_str())
                && !name.starts_with("probe candidate")
                && !names.contains(name)
            {
                names.push(name.clone());
            }
        }
    }
    let value = |r: &LoadResult, name: &str| {
        if name == "lockjam sample" {
            Some(lockjam_sample(r))
        } else {
            r.rows.iter().find(|(n, _)| n == name).map(|(_, s)| s.median)
        }
    };
    let all: Vec<f64> = results
        .iter()
        .flat_map(|r| names.iter().filter_map(move |n| value(r, n)))
        .filter(|v| *v > 0.0)
        .collect();
    let lo = all.iter().cloned().fold(f64::MAX, f64::min).log10().floor();
    let hi = all
        .iter()
        .cloned()
        .fold(f64::MIN, f64::max)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let (panel_w, panel_h, left, top) = (260.0, 240.0, 60.0, 50.0);
    let width = left + panel_w * waiters.len() as f64 + 20.0;
    let mut body = String::new();
    let _ = writeln!(
        body,
        "<text x=\"{}\" y=\"22\" font-size=\"14\" text-anchor=\"middle\">Server time per sample (ms, log scale) against client sessions</text>",
        width / 2.0
    );
    for (p, &w) in waiters.iter().enumerate() {
        let x0 = left + p as f64 * panel_w;
        let inner = panel_w - 40.0;
        let x = |i: usize| x0 + 20.0 + i as f64 * inner / (sessions.len().max(2) - 1) as f64;
        let y = |v: f64| top + panel_h - (v.log10() - lo) / (hi - lo) * panel_h;
        let _ = writeln!(
            body,
            "<rect x=\"{x0}\" y=\"{top}\" width=\"{}\" height=\"{panel_h}\" fill=\"none\" stroke=\"#999\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{w} waiters</text>",
            panel_w - 10.0,
            x0 + panel_w / 2.0,
            top - 6.0
        );
        for (i, s) in sessions.iter().enumerate() {
            let _ = writeln!(
                body,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{s}</text>",
                x(i),
                top + panel_h + 15.0
            );
        }
        if p == 0 {
            let mut e = lo;
            while e <= hi {
                let v = 10f64.powf(e);
                let _ = writeln!(
                    body,
                    "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                    x0 - 4.0,
                    y(v) + 4.0,
                    if v < 1.0 { format!("{v}") } else { format!("{v:.0}") }
                );
                e += 1.0;
            }
        }
        for (k, name) in names.iter().enumerate() {
            let points: Vec<String> = sessions
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let r = results.iter().find(|r| r.sessions == *s && r.waiters == w)?;
                    value(r, name).map(|v| format!("{:.1},{:.1}", x(i), y(v)))
                })
                .collect();
            let _ = writeln!(
                body,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"/>",
                points.join(" "),
                COLOURS[k % COLOURS.len()]
            );
            for point in &points {
                let (px, py) = point.split_once(',').unwrap();
                let _ = writeln!(
                    body,
                    "<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{}\"/>",
                    COLOURS[k % COLOURS.len()]
                );
            }
        }
    }
    let legend_top = top + panel_h + 35.0;
    for (k, name) in names.iter().enumerate() {
        let ly = legend_top + k as f64 * 16.0;
        let _ = writeln!(
            body,
            "<rect x=\"{left}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            ly - 10.0,
            COLOURS[k % COLOURS.len()],
            left + 16.0,
            ly,
            escape(name)
        );
    }
    svg(width, legend_top + names.len() as f64 * 16.0 + 10.0, &body)
}
