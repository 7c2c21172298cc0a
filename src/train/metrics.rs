//! What a run leaves for the user to read: `metrics.jsonl` (one line per optimizer step, with
//! `eval_loss` on the steps the run evaluated after) and `loss.svg`, a plot of it.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: usize,
    /// Epochs completed, fractional.
    pub epoch: f64,
    /// Mean loss over the labelled tokens of the step, at full f32 precision.
    pub loss: f32,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens fed (not counting padding).
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// The eval loss after this step, on the steps the run evaluates after (train.eval_every
    /// and the last); absent otherwise, and in files written before tune evaluated during runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// Appends one line and flushes it, so a crash loses at most the line being written.
pub fn append(path: &Path, m: &StepMetrics) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(m).expect("metrics serialise");
    writeln!(f, "{line}").and_then(|_| f.flush()).map_err(|e| Error::io(path, e))
}

pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1))))
        .collect()
}

/// A line plot of loss against step as a standalone SVG.
pub fn loss_svg(metrics: &[StepMetrics], title: &str) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 400.0, 60.0, 20.0, 40.0, 40.0);
    let steps = metrics.last().map_or(1, |m| m.step).max(1) as f64;
    let values = metrics.iter().flat_map(|m| std::iter::once(m.loss as f64).chain(m.eval_loss));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), l| (lo.min(l), hi.max(l)));
    let (lo, hi) = if lo.is_finite() && hi > lo { (lo, hi) } else { (0.0, lo.max(1.0)) };
    let x = |s: f64| left + (s / steps) * (w - left - right);
    let y = |l: f64| top + (hi - l) / (hi - lo) * (h - top - bottom);
    let points: Vec<String> = metrics.iter().map(|m| format!("{:.1},{:.1}", x(m.step as f64), y(m.loss as f64))).collect();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"24\" font-size=\"14\">{}</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        escape(title),
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for i in 0..=4 {
        let l = lo + (hi - lo) * i as f64 / 4.0;
        svg += &format!("<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{l:.3}</text>\n", left - 6.0, y(l) + 4.0);
    }
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">optimizer step (1–{})</text>\n",
        (left + w - right) / 2.0,
        h - 10.0,
        steps
    );
    svg += &format!("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n", points.join(" "));
    let evals: Vec<(f64, f64)> = metrics.iter().filter_map(|m| m.eval_loss.map(|l| (x(m.step as f64), y(l)))).collect();
    if !evals.is_empty() {
        let points: Vec<String> = evals.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        svg += &format!("<polyline fill=\"none\" stroke=\"#ff7f0e\" stroke-width=\"1.5\" points=\"{}\"/>\n", points.join(" "));
        for (x, y) in &evals {
            svg += &format!("<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2.5\" fill=\"#ff7f0e\"/>\n");
        }
        svg += &format!(
            "<text x=\"{}\" y=\"24\" text-anchor=\"end\"><tspan fill=\"#1f77b4\">— train loss</tspan> <tspan fill=\"#ff7f0e\">● eval loss</tspan></text>\n",
            w - right
        );
    }
    svg + "</svg>\n"
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: usize, eval_loss: Option<f64>) -> StepMetrics {
        StepMetrics { step, epoch: 0.5, loss: 1.25, lr: 1e-4, grad_norm: 0.5, tokens: 10, tokens_per_s: 1.0, elapsed_s: 2.0, eval_loss }
    }

    /// Lines written before eval_loss existed still read; eval_loss is written only where there
    /// is one, and reads back bit for bit (a value the default serde_json parser gets one ulp off).
    #[test]
    fn eval_loss_is_optional_and_exact() {
        let dir = crate::fsutil::TempDir::new("metrics", &[]);
        let path = dir.0.join("metrics.jsonl");
        let old = r#"{"step":1,"epoch":0.5,"loss":1.25,"lr":0.0001,"grad_norm":0.5,"tokens":10,"tokens_per_s":1.0,"elapsed_s":2.0}"#;
        std::fs::write(&path, format!("{old}\n")).unwrap();
        append(&path, &line(2, Some(3.9199374543186045))).unwrap();
        append(&path, &line(3, None)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("eval_loss").count(), 1, "{text}");
        let read = read(&path).unwrap();
        assert_eq!(read, vec![line(1, None), line(2, Some(3.9199374543186045)), line(3, None)]);
        assert_eq!(read[1].eval_loss.unwrap().to_bits(), 3.9199374543186045f64.to_bits());
        let svg = loss_svg(&read, "t");
        assert_eq!(svg.matches("<circle").count(), 1, "one eval point");
        assert!(svg.contains("eval loss"));
    }
}
