//! Grouped bar charts as standalone SVG, so a results file can carry its plot without a
//! plotting toolchain on the machine.

use std::fmt::Write as _;

/// One panel: a title, and per group (an x position) one value per series.
pub struct Panel {
    pub title: String,
    pub groups: Vec<(String, Vec<f64>)>,
}

const COLORS: &[&str] = &[
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
];
const PANEL_W: f64 = 420.0;
const PANEL_H: f64 = 300.0;
const MARGIN: f64 = 50.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Panels side by side with one shared legend of `series` names.
pub fn bar_chart(title: &str, series: &[&str], panels: &[Panel]) -> String {
    let width = MARGIN + panels.len() as f64 * (PANEL_W + MARGIN);
    let height = PANEL_H + 3.0 * MARGIN + 20.0 * series.len() as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    for (p, panel) in panels.iter().enumerate() {
        let x0 = MARGIN + p as f64 * (PANEL_W + MARGIN);
        let y0 = MARGIN + 10.0;
        let max = panel
            .groups
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0_f64, f64::max)
            .max(1e-9);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"#,
            x0 + PANEL_W / 2.0,
            y0 - 8.0,
            escape(&panel.title)
        );
        let _ = writeln!(
            svg,
            r#"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
            y0 + PANEL_H,
            x0 + PANEL_W,
            y0 + PANEL_H
        );
        let group_w = PANEL_W / panel.groups.len().max(1) as f64;
        let bar_w = group_w * 0.8 / series.len().max(1) as f64;
        for (g, (label, values)) in panel.groups.iter().enumerate() {
            let gx = x0 + g as f64 * group_w + group_w * 0.1;
            for (s, v) in values.iter().enumerate() {
                let h = v / max * (PANEL_H - 20.0);
                let x = gx + s as f64 * bar_w;
                let y = y0 + PANEL_H - h;
                let color = COLORS[s % COLORS.len()];
                let _ = writeln!(
                    svg,
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{color}"/>"#,
                    bar_w * 0.95
                );
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{v:.0}</text>"#,
                    x + bar_w / 2.0,
                    y - 3.0
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                gx + group_w * 0.4,
                y0 + PANEL_H + 16.0,
                escape(label)
            );
        }
    }
    let ly = MARGIN + PANEL_H + 50.0;
    for (s, name) in series.iter().enumerate() {
        let y = ly + 20.0 * s as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{MARGIN}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            y - 10.0,
            COLORS[s % COLORS.len()],
            MARGIN + 18.0,
            y,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_one_bar_per_value_and_escapes_text() {
        let svg = bar_chart(
            "a <b>",
            &["x", "y"],
            &[Panel {
                title: "p".into(),
                groups: vec![("g1".into(), vec![1.0, 2.0]), ("g2".into(), vec![3.0, 0.0])],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt;b&gt;"));
        // 4 bars + 1 background + 2 legend swatches.
        assert_eq!(svg.matches("<rect").count(), 7);
    }
}
