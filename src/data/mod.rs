//! Datasets: JSON lines, a JSON array, or a parquet file of records, turned into token ids.

pub mod batch;
pub mod examples;
pub mod parquet;

use std::path::Path;

use serde_json::Value;

use crate::error::{read_to_string, Error, Result};
use crate::hf::Tokenizer;

/// What a record's number counts in its file, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unit {
    /// A line of a JSON-lines file (1-based).
    #[default]
    Line,
    /// An element of a JSON array file (1-based).
    Element,
    /// A row of a parquet file (1-based).
    Row,
}

/// One record and where it is in its file (1-based), for error messages.
#[derive(Debug, Clone)]
pub struct Record {
    pub line: usize,
    pub value: Value,
    pub unit: Unit,
}

impl Record {
    /// A record on line `line` of a JSON-lines file.
    pub fn at_line(line: usize, value: Value) -> Self {
        Record { line, value, unit: Unit::Line }
    }

    /// "line 3", "element 3" or "row 3".
    pub fn at(&self) -> String {
        let unit = match self.unit {
            Unit::Line => "line",
            Unit::Element => "element",
            Unit::Row => "row",
        };
        format!("{unit} {}", self.line)
    }
}

/// Reads a dataset file: parquet (by its `.parquet` extension or its `PAR1` magic bytes; see
/// [`parquet::read_records`]), else a `.jsonl` file (one JSON object per line, blank lines
/// skipped) or a file holding one JSON array of objects.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    if parquet::is_parquet(path) {
        return parquet::read_records(path);
    }
    let text = read_to_string(path)?;
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> =
            serde_json::from_str(&text).map_err(|e| Error::format(path, format!("line {}: invalid JSON array: {e}", e.line())))?;
        // Line numbers of array elements are not tracked; report the element's index instead.
        return Ok(values.into_iter().enumerate().map(|(i, value)| Record { line: i + 1, value, unit: Unit::Element }).collect());
    }
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| Error::format(path, format!("line {}: invalid JSON ({e}); expected one JSON object per line", i + 1)))?;
        if !value.is_object() {
            return Err(Error::format(path, format!("line {}: expected a JSON object", i + 1)));
        }
        records.push(Record::at_line(i + 1, value));
    }
    Ok(records)
}

/// A string field of a record, or an error naming file, line and key.
pub fn string_field<'a>(path: &Path, record: &'a Record, key: &str) -> Result<&'a str> {
    match record.value.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Error::format(path, format!("{}: `{key}` must be a string, found {}", record.at(), json_kind(other)))),
        None => Err(Error::format(path, format!("{}: missing key `{key}` (expected {{\"{key}\": \"...\"}})", record.at()))),
    }
}

pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Token ids of a text record: `encode(text, add_special_tokens = true)` then EOS, unless the
/// encoding already ends with it. Training on text and `tune eval` use exactly these ids.
pub fn text_ids(tokenizer: &Tokenizer, text: &str, eos: Option<u32>) -> Result<Vec<u32>> {
    let mut ids = tokenizer.encode(text, true)?;
    if let Some(eos) = eos {
        if ids.last() != Some(&eos) {
            ids.push(eos);
        }
    }
    Ok(ids)
}

/// min / median / p90 / p99 / max of token lengths. Percentiles are nearest-rank: the p-th is
/// the smallest length that at least p% of the examples do not exceed (so the median of an
/// even count is the lower middle one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LengthSummary {
    pub min: usize,
    pub median: usize,
    pub p90: usize,
    pub p99: usize,
    pub max: usize,
}

impl LengthSummary {
    /// The summary of `lengths` (all zero when empty).
    pub fn of(lengths: &[usize]) -> Self {
        if lengths.is_empty() {
            return LengthSummary::default();
        }
        let mut sorted = lengths.to_vec();
        sorted.sort_unstable();
        let n = sorted.len();
        // ceil(p·n/100) - 1, in integers.
        let rank = |p: usize| sorted[(p * n).div_ceil(100).max(1) - 1];
        LengthSummary { min: sorted[0], median: rank(50), p90: rank(90), p99: rank(99), max: sorted[n - 1] }
    }
}
