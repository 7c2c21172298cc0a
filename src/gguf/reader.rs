//! Reads a GGUF v3 file back: metadata, tensor infos, and each tensor's bytes (memory-mapped).
//! Used to check exports (and by the tests against llama.cpp's converters); every length and
//! offset is checked against the file before it is used.

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{value_type as t, Array, GgmlType, TensorInfo, Value, ALIGNMENT, MAGIC};
use crate::error::{Error, Result};

/// One key/value: the decoded value and the raw bytes it was stored as (after its type id).
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: String,
    pub value: Value,
    pub raw: std::ops::Range<usize>,
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub kv: Vec<Kv>,
    pub tensors: Vec<(TensorInfo, u64)>,
    data_start: usize,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.b.len());
        let end = end.ok_or_else(|| Error::format(self.path, format!("truncated GGUF: {n} bytes needed at offset {}", self.pos)))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| Error::format(self.path, format!("a string at offset {} is not UTF-8", self.pos)))
    }
    fn value(&mut self, ty: u32) -> Result<Value> {
        Ok(match ty {
            t::U8 => Value::U8(self.take(1)?[0]),
            t::I8 => Value::I8(self.take(1)?[0] as i8),
            t::U16 => Value::U16(u16::from_le_bytes(self.take(2)?.try_into().expect("2"))),
            t::I16 => Value::I16(i16::from_le_bytes(self.take(2)?.try_into().expect("2"))),
            t::U32 => Value::U32(self.u32()?),
            t::I32 => Value::I32(self.u32()? as i32),
            t::F32 => Value::F32(f32::from_bits(self.u32()?)),
            t::BOOL => Value::Bool(self.take(1)?[0] != 0),
            t::STRING => Value::String(self.string()?),
            t::U64 => Value::U64(self.u64()?),
            t::I64 => Value::I64(self.u64()? as i64),
            t::F64 => Value::F64(f64::from_bits(self.u64()?)),
            t::ARRAY => {
                let elem = self.u32()?;
                let n = self.u64()? as usize;
                if n > self.b.len() {
                    return Err(Error::format(self.path, format!("array of {n} values is longer than the file")));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem)?);
                }
                match elem {
                    t::U32 => Value::Array(Array::U32(items.iter().map(|v| if let Value::U32(x) = v { *x } else { 0 }).collect())),
                    t::I32 => Value::Array(Array::I32(items.iter().map(|v| if let Value::I32(x) = v { *x } else { 0 }).collect())),
                    t::F32 => Value::Array(Array::F32(items.iter().map(|v| if let Value::F32(x) = v { *x } else { 0.0 }).collect())),
                    t::BOOL => Value::Array(Array::Bool(items.iter().map(|v| matches!(v, Value::Bool(true))).collect())),
                    t::STRING => Value::Array(Array::String(
                        items.into_iter().map(|v| if let Value::String(s) = v { s } else { String::new() }).collect(),
                    )),
                    other => return Err(Error::format(self.path, format!("arrays of value type {other} are not read"))),
                }
            }
            other => return Err(Error::format(self.path, format!("unknown GGUF value type {other}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map of a file tune does not modify while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut c = Cursor { b: &mmap, pos: 0, path };
        if c.take(4)? != MAGIC {
            return Err(Error::format(path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if version != 3 {
            return Err(Error::format(path, format!("GGUF version {version} (expected 3)")));
        }
        let (n_tensors, n_kv) = (c.u64()?, c.u64()?);
        let mut kv = Vec::new();
        let mut alignment = ALIGNMENT;
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let start = c.pos;
            let value = c.value(ty)?;
            if key == "general.alignment" {
                if let Value::U32(a) = value {
                    alignment = a as u64;
                }
            }
            kv.push(Kv { key, value, raw: start..c.pos });
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            let ne = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let id = c.u32()?;
            let ty = GgmlType::from_id(id).ok_or_else(|| Error::format(path, format!("tensor `{name}`: ggml type {id} is not read")))?;
            let offset = c.u64()?;
            tensors.push((TensorInfo { name, ne, ty }, offset));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        for (info, off) in &tensors {
            if data_start + off + info.n_bytes() > mmap.len() as u64 {
                return Err(Error::format(path, format!("tensor `{}` lies outside the file", info.name)));
            }
        }
        Ok(GgufFile { path: path.to_path_buf(), data_start: data_start as usize, kv, tensors, mmap })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|k| k.key == key).map(|k| &k.value)
    }

    /// The bytes a key's value was stored as.
    pub fn raw(&self, key: &str) -> Option<&[u8]> {
        self.kv.iter().find(|k| k.key == key).map(|k| &self.mmap[k.raw.clone()])
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|(t, _)| t.name == name).map(|(t, _)| t)
    }

    /// A tensor's data bytes.
    pub fn data(&self, name: &str) -> Option<&[u8]> {
        let (info, off) = self.tensors.iter().find(|(t, _)| t.name == name)?;
        let start = self.data_start + *off as usize;
        Some(&self.mmap[start..start + info.n_bytes() as usize])
    }
}
