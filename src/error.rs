//! The library's error type. Every variant names the file (or key) involved and what was expected,
//! so the CLI can print it as is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The io::Error is part of the message, not a `source` (hence its field name), so that error chains printed by
    /// the CLI do not repeat it.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    /// A file whose content is not what tune expects (bad JSON, corrupt safetensors, bad record).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    /// A model directory that does not hold a usable checkpoint.
    #[error("{0}")]
    Model(String),

    /// A tensor that is missing, unexpected, or has the wrong shape.
    #[error("{path}: tensor `{name}`: {msg}")]
    Tensor { path: PathBuf, name: String, msg: String },

    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    #[error("chat template: {0}")]
    Template(String),

    /// Drawing the run report (report.svg) failed.
    #[error("run report: {0}")]
    Report(String),

    /// Anything the user asked for that tune does not support.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io { path: path.into(), error }
    }

    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
}

/// Reads a whole file, naming it in the error.
pub fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Parses a JSON file, reporting line and column of a syntax error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON at line {} column {}: {e}", e.line(), e.column())))
}

/// "; did you mean `x`?" for the closest candidate within a small edit distance.
pub fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 3.max(c.len() / 3))
        .min()
        .map(|(_, c)| format!("; did you mean `{c}`?"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
