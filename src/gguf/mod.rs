//! GGUF, the single-file model format of llama.cpp and Ollama (version 3): a header, typed
//! metadata key/values, tensor infos (name, ggml dims, type, offset), then the tensor data,
//! each tensor aligned to `general.alignment` (32) bytes. All little-endian.
//!
//! This module knows the container only: `writer.rs` streams a file out tensor by tensor,
//! `reader.rs` reads one back (for checks and tests), `quants.rs` holds ggml's block codecs and
//! `mix.rs` llama-quantize's per-tensor type choice for q4_k_m. What goes into a model file
//! (names, metadata keys, tokenizer) is `export::gguf`'s business.

pub mod mix;
pub mod quants;
pub mod reader;
pub mod writer;

pub use reader::GgufFile;
pub use writer::{GgufWriter, TensorInfo};

/// The file magic, "GGUF".
pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
/// llama.cpp's default `general.alignment`.
pub const ALIGNMENT: u64 = 32;
/// `general.quantization_version` of every current ggml quantization.
pub const QUANTIZATION_VERSION: u32 = 2;

/// ggml's tensor types (`enum ggml_type`), those tune writes or may be asked to.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    IQ4_NL = 20,
    BF16 = 30,
}

impl GgmlType {
    pub const ALL: [GgmlType; 14] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::BF16,
    ];

    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::ALL.into_iter().find(|t| *t as u32 == id)
    }

    /// Values per block (1 for the float types, 32 for the legacy quants, 256 for k-quants).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 | GgmlType::IQ4_NL => 32,
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => 256,
        }
    }

    /// Bytes per block (ggml's `type_size`).
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::IQ4_NL => 18,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    /// Bytes of a row of `n` values (`n` a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }

    /// ggml's name (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q2_K => "q2_K",
            GgmlType::Q3_K => "q3_K",
            GgmlType::Q4_K => "q4_K",
            GgmlType::Q5_K => "q5_K",
            GgmlType::Q6_K => "q6_K",
            GgmlType::IQ4_NL => "iq4_nl",
            GgmlType::BF16 => "bf16",
        }
    }
}

/// A metadata value, with GGUF's value types (`gguf_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// The arrays tune writes (GGUF allows arrays of any value type).
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
}

/// GGUF's value type ids.
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl Value {
    pub fn type_id(&self) -> u32 {
        use value_type as t;
        match self {
            Value::U8(_) => t::U8,
            Value::I8(_) => t::I8,
            Value::U16(_) => t::U16,
            Value::I16(_) => t::I16,
            Value::U32(_) => t::U32,
            Value::I32(_) => t::I32,
            Value::F32(_) => t::F32,
            Value::Bool(_) => t::BOOL,
            Value::String(_) => t::STRING,
            Value::Array(_) => t::ARRAY,
            Value::U64(_) => t::U64,
            Value::I64(_) => t::I64,
            Value::F64(_) => t::F64,
        }
    }

    /// The value's bytes as they follow its type id in the file.
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn string(s: &str, out: &mut Vec<u8>) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend(v.to_le_bytes()),
            Value::U16(v) => out.extend(v.to_le_bytes()),
            Value::I16(v) => out.extend(v.to_le_bytes()),
            Value::U32(v) => out.extend(v.to_le_bytes()),
            Value::I32(v) => out.extend(v.to_le_bytes()),
            Value::F32(v) => out.extend(v.to_le_bytes()),
            Value::Bool(v) => out.push(u8::from(*v)),
            Value::String(s) => string(s, out),
            Value::U64(v) => out.extend(v.to_le_bytes()),
            Value::I64(v) => out.extend(v.to_le_bytes()),
            Value::F64(v) => out.extend(v.to_le_bytes()),
            Value::Array(a) => {
                let (elem, n) = match a {
                    Array::U32(v) => (value_type::U32, v.len()),
                    Array::I32(v) => (value_type::I32, v.len()),
                    Array::F32(v) => (value_type::F32, v.len()),
                    Array::Bool(v) => (value_type::BOOL, v.len()),
                    Array::String(v) => (value_type::STRING, v.len()),
                };
                out.extend(elem.to_le_bytes());
                out.extend((n as u64).to_le_bytes());
                match a {
                    Array::U32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
                    Array::I32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
                    Array::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
                    Array::Bool(v) => v.iter().for_each(|x| out.push(u8::from(*x))),
                    Array::String(v) => v.iter().for_each(|s| string(s, out)),
                }
            }
        }
    }
}

/// Appends `x` encoded as `t`. One set of codecs serves both tools tune matches: the converter's
/// f16 (numpy's round to nearest even) and bf16 (gguf-py's, NaNs quieted) are bit for bit ggml's
/// own conversions, which llama-quantize uses.
pub fn encode_row(t: GgmlType, x: &[f32], out: &mut Vec<u8>) -> crate::error::Result<()> {
    quants::quantize_row(t, x, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_like_gguf_py() {
        let bf16_bits = quants::fp32_to_bf16;
        // 1 + 2^-8 lies halfway between two bf16 values: ties go to the even one (1.0) ...
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // ... and 1 + 3·2^-8 to 1 + 2^-6 (the even one above).
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(-2.0), 0xc000);
        // A signalling NaN comes out quiet.
        assert_eq!(bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
    }

    #[test]
    fn type_sizes_are_ggmls() {
        assert_eq!(GgmlType::Q8_0.row_bytes(64), 68);
        assert_eq!(GgmlType::Q4_K.row_bytes(512), 288);
        assert_eq!(GgmlType::Q6_K.row_bytes(256), 210);
        assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
    }
}
