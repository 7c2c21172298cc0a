//! Writes a GGUF file as a stream: metadata and tensor infos first (every offset follows from
//! the shapes and types alone), then each tensor's data as the caller produces it, so that at
//! most one tensor is in memory at a time.

use std::io::Write;
use std::path::Path;

use super::{GgmlType, Value, ALIGNMENT, MAGIC, VERSION};
use crate::error::{Error, Result};

/// A tensor to be written: its llama.cpp name, ggml dims (`ne`, the row length first: the
/// reverse of the PyTorch shape) and type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorInfo {
    /// Rows × bytes per row.
    pub fn n_bytes(&self) -> u64 {
        let rows: u64 = self.ne.iter().skip(1).product();
        rows * self.ty.row_bytes(self.ne[0] as usize) as u64
    }
}

/// The file being put together: key/values in the order added, then tensors in the order added.
#[derive(Debug, Default)]
pub struct GgufWriter {
    kv: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
}

fn pad(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT - n
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a key (replacing an earlier value, in place).
    pub fn set(&mut self, key: &str, value: Value) {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.kv.push((key.to_string(), value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn kv(&self) -> &[(String, Value)] {
        &self.kv
    }

    pub fn add_tensor(&mut self, info: TensorInfo) -> Result<()> {
        let block = info.ty.block_size() as u64;
        if info.ne.is_empty() || !info.ne[0].is_multiple_of(block) {
            return Err(Error::Unsupported(format!(
                "tensor `{}`: rows of {} values cannot be stored as {} (blocks of {block})",
                info.name,
                info.ne.first().copied().unwrap_or(0),
                info.ty.name()
            )));
        }
        if self.tensors.iter().any(|t| t.name == info.name) {
            return Err(Error::Unsupported(format!("tensor `{}` added twice", info.name)));
        }
        self.tensors.push(info);
        Ok(())
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Writes the file to `path` (via a temporary name): `data(i, info, buf)` must append
    /// exactly `info.n_bytes()` bytes for tensor `i` to the empty `buf`. Returns the file size.
    pub fn write(&self, path: &Path, mut data: impl FnMut(usize, &TensorInfo, &mut Vec<u8>) -> Result<()>) -> Result<u64> {
        let mut head = Vec::new();
        head.extend(MAGIC);
        head.extend(VERSION.to_le_bytes());
        head.extend((self.tensors.len() as u64).to_le_bytes());
        head.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            Value::String(k.clone()).encode(&mut head);
            head.extend(v.type_id().to_le_bytes());
            v.encode(&mut head);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            Value::String(t.name.clone()).encode(&mut head);
            head.extend((t.ne.len() as u32).to_le_bytes());
            t.ne.iter().for_each(|n| head.extend(n.to_le_bytes()));
            head.extend((t.ty as u32).to_le_bytes());
            head.extend(offset.to_le_bytes());
            offset += t.n_bytes() + pad(t.n_bytes());
        }
        head.resize(head.len() + pad(head.len() as u64) as usize, 0);
        let total = head.len() as u64 + offset;
        crate::fsutil::write_file_streaming(path, |w| {
            let io = |e| Error::io(path, e);
            w.write_all(&head).map_err(io)?;
            let mut buf = Vec::new();
            for (i, t) in self.tensors.iter().enumerate() {
                buf.clear();
                data(i, t, &mut buf)?;
                if buf.len() as u64 != t.n_bytes() {
                    return Err(Error::format(
                        path,
                        format!(
                            "tensor `{}`: {} bytes produced, {} expected for {:?} {}",
                            t.name,
                            buf.len(),
                            t.n_bytes(),
                            t.ne,
                            t.ty.name()
                        ),
                    ));
                }
                buf.resize(buf.len() + pad(buf.len() as u64) as usize, 0);
                w.write_all(&buf).map_err(io)?;
            }
            Ok(())
        })?;
        Ok(total)
    }
}
