//! `metrics.jsonl`, one line per optimizer step: what a run leaves for the user to read, and what
//! its report (`report.svg`, [`super::report`]) is drawn from.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_loss_is_optional_both_ways() {
        let dir = crate::fsutil::TempDir::new(
            "metrics",
            &[(
                "metrics.jsonl",
                // A line from before eval_loss existed, then one that has it.
                "{\"step\":1,\"epoch\":0.5,\"loss\":2.5,\"lr\":0.001,\"grad_norm\":1.5,\"tokens\":40,\"tokens_per_s\":100.0,\"elapsed_s\":0.4}\n\
                 {\"step\":2,\"epoch\":1.0,\"loss\":2.25,\"eval_loss\":2.75,\"lr\":0.001,\"grad_norm\":1.25,\"tokens\":40,\"tokens_per_s\":100.0,\"elapsed_s\":0.8}\n",
            )],
        );
        let path = dir.0.join("metrics.jsonl");
        let m = read(&path).unwrap();
        assert_eq!((m[0].eval_loss, m[1].eval_loss), (None, Some(2.75)));
        assert_eq!(m[1].loss, 2.25);
        // Written back, a step without an evaluation has no eval_loss key at all.
        let again = dir.0.join("again.jsonl");
        for s in &m {
            append(&again, s).unwrap();
        }
        let text = std::fs::read_to_string(&again).unwrap();
        assert_eq!(text.lines().map(|l| l.contains("eval_loss")).collect::<Vec<_>>(), [false, true]);
        assert_eq!(read(&again).unwrap(), m);
    }

    #[test]
    fn a_bad_line_names_the_file_and_line() {
        let dir = crate::fsutil::TempDir::new("metrics-bad", &[("metrics.jsonl", "{\"step\":1}\n")]);
        let err = read(&dir.0.join("metrics.jsonl")).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl: line 1: missing field"), "{err}");
    }

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
    }
}
