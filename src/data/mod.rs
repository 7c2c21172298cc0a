//! Datasets: JSON lines (or a JSON array) of records, turned into token ids.

pub mod batch;
pub mod examples;

use std::path::Path;

use serde_json::Value;

use crate::error::{read_to_string, Error, Result};
use crate::hf::Tokenizer;

/// One record and the line it starts on (1-based), for error messages.
#[derive(Debug, Clone)]
pub struct Record {
    pub line: usize,
    pub value: Value,
}

/// Reads a `.jsonl` file (one JSON object per line, blank lines skipped) or a file holding one
/// JSON array of objects.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = read_to_string(path)?;
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> =
            serde_json::from_str(&text).map_err(|e| Error::format(path, format!("line {}: invalid JSON array: {e}", e.line())))?;
        // Line numbers of array elements are not tracked; report the element's index instead.
        return Ok(values.into_iter().enumerate().map(|(i, value)| Record { line: i + 1, value }).collect());
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
        records.push(Record { line: i + 1, value });
    }
    Ok(records)
}

/// A string field of a record, or an error naming file, line and key.
pub fn string_field<'a>(path: &Path, record: &'a Record, key: &str) -> Result<&'a str> {
    match record.value.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Error::format(path, format!("line {}: `{key}` must be a string, found {}", record.line, json_kind(other)))),
        None => Err(Error::format(path, format!("line {}: missing key `{key}` (expected {{\"{key}\": \"...\"}})", record.line))),
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
