//! Parquet files, the Hub's default dataset format: each row becomes a record whose keys are
//! the columns, so a parquet file holds any of the JSON record shapes (a `messages` column of
//! list<struct<role, content>>, `conversations` of list<struct<from, value>>, string columns
//! for text, alpaca or prompt/completion).
//!
//! Read row by row with the parquet crate's record API (no Arrow: tune needs no columnar
//! compute). Snappy and zstd compression are supported (pyarrow's and the Hub's defaults).

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Value};

use super::{Record, Unit};
use crate::error::{Error, Result};

/// The magic bytes a parquet file starts (and ends) with.
const MAGIC: &[u8; 4] = b"PAR1";

/// A `.parquet` file, or any file that starts with parquet's magic bytes.
pub fn is_parquet(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
        return true;
    }
    let mut head = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok() && &head == MAGIC
}

/// The rows of a parquet file as records (numbered from 1). A null field of a struct is left
/// out, as if its key were absent: a parquet column holds each key for every row (pyarrow gives
/// a message without `tool_calls` a null one when another message has them), and a template
/// that asks `'tool_calls' in message` must see the record as its JSON-lines form would be.
/// A null top-level column stays null (tune reads a null `input` as an empty one).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| Error::format(path, format!("not a readable parquet file: {e}")))?;
    let rows = reader.get_row_iter(None).map_err(|e| Error::format(path, format!("cannot read its rows: {e}")))?;
    let mut records = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| Error::format(path, format!("row {}: {e}", i + 1)))?;
        let value = Value::Object(row.get_column_iter().map(|(k, f)| (k.clone(), json(f))).collect());
        records.push(Record { line: i + 1, value, unit: Unit::Row });
    }
    Ok(records)
}

fn object(row: &Row) -> Value {
    let map: Map<String, Value> =
        row.get_column_iter().filter(|(_, f)| !matches!(f, Field::Null)).map(|(k, f)| (k.clone(), json(f))).collect();
    Value::Object(map)
}

/// A parquet value as JSON. Strings, numbers, booleans, lists, structs and maps keep their
/// shape; binary that is UTF-8 becomes a string; dates, times and decimals (which no record
/// shape tune reads uses) become the text parquet prints for them.
fn json(field: &Field) -> Value {
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => (*n).into(),
        Field::Short(n) => (*n).into(),
        Field::Int(n) => (*n).into(),
        Field::Long(n) => (*n).into(),
        Field::UByte(n) => (*n).into(),
        Field::UShort(n) => (*n).into(),
        Field::UInt(n) => (*n).into(),
        Field::ULong(n) => (*n).into(),
        Field::Float16(x) => serde_json::Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number),
        Field::Float(x) => serde_json::Number::from_f64(*x as f64).map_or(Value::Null, Value::Number),
        Field::Double(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::String(field.to_string()),
        },
        Field::Group(row) => object(row),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(json).collect()),
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Field::Str(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (key, json(v))
                })
                .collect(),
        ),
        other => Value::String(other.to_string()),
    }
}
