//! Memory-mapped safetensors weights: a single `model.safetensors` or the shards listed in
//! `model.safetensors.index.json`.
//!
//! Model files are untrusted downloads. Only safetensors is read (never pickle); every shard path
//! from the index must stay inside the model directory; each header is validated (offsets inside
//! the file, sizes matching shape × dtype) before a tensor is touched, and a tensor's shape is
//! checked against what the model expects before anything is allocated for it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;

use crate::error::{read_json, Error, Result};

/// One mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

/// All weight files of a model directory, indexed by tensor name.
pub struct Weights {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// tensor name -> shard index
    index: BTreeMap<String, usize>,
}

/// Where a tensor's bytes live and what they are.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: HashMap<String, String>,
}

impl Shard {
    /// Drops the mapped pages of a tensor that has been converted, so that loading holds the
    /// converted copy and at most one tensor of the file, not the whole file as well. The
    /// pages stay in the page cache; reading the tensor again maps them back in.
    fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        // SAFETY: the map is shared and read-only, so MADV_DONTNEED only unmaps clean pages that
        // the next access reads back from the file; no reference into the range is held.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len);
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }
}

impl Weights {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut weights = Weights { dir: dir.to_path_buf(), shards: Vec::new(), index: BTreeMap::new() };
        if index_path.is_file() {
            let index: IndexFile = read_json(&index_path)?;
            // Shard names in sorted order so loading is deterministic.
            let files: Vec<&String> = {
                let set: HashSet<&String> = index.weight_map.values().collect();
                let mut v: Vec<_> = set.into_iter().collect();
                v.sort();
                v
            };
            for file in files {
                let path = shard_path(dir, &index_path, file)?;
                weights.add_shard(&path)?;
            }
            // Every tensor the index names must be in the shard it names.
            for (name, file) in &index.weight_map {
                match weights.index.get(name) {
                    Some(&i) if weights.shards[i].path.ends_with(file) => {}
                    _ => {
                        return Err(Error::Tensor {
                            path: index_path.clone(),
                            name: name.clone(),
                            msg: format!("listed in the index as stored in {file}, but not found there"),
                        })
                    }
                }
            }
        } else if single.is_file() {
            weights.add_shard(&single)?;
        } else {
            let has_bin = ["pytorch_model.bin", "model.bin", "consolidated.00.pth"].iter().any(|f| dir.join(f).exists());
            let hint = if has_bin {
                " (this directory only has pickle weights, which tune never loads for safety: convert them to safetensors first)"
            } else {
                ""
            };
            return Err(Error::Model(format!("{}: no model.safetensors or model.safetensors.index.json{hint}", dir.display())));
        }
        Ok(weights)
    }

    /// One safetensors file on its own (a PEFT adapter's weights).
    pub fn open_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Model(format!("{}: file not found", path.display())));
        }
        let mut weights =
            Weights { dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(), shards: Vec::new(), index: BTreeMap::new() };
        weights.add_shard(path)?;
        Ok(weights)
    }

    fn add_shard(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; tune never writes to model files while they are mapped.
        // Another process truncating the file under us is the one hazard mmap brings.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file ({e:?}); the download may be truncated or corrupt")))?;
        let shard_id = self.shards.len();
        for name in metadata.tensors().keys() {
            if let Some(&other) = self.index.get(name) {
                return Err(Error::Tensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    msg: format!("also present in {}", self.shards[other].path.display()),
                });
            }
            self.index.insert(name.clone(), shard_id);
        }
        self.shards.push(Shard { path: path.to_path_buf(), mmap, data_start: 8 + header_len, metadata });
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn info(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let shard = &self.shards[*self.index.get(name)?];
        Some((shard, shard.metadata.info(name)?))
    }

    pub fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.info(name).map(|(_, info)| TensorMeta { dtype: info.dtype, shape: info.shape.clone() })
    }

    /// The file a tensor is stored in, for error messages.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.info(name).map(|(s, _)| s.path.clone()).unwrap_or_else(|| self.dir.clone())
    }

    /// The dtypes present on disk (for `tune inspect`).
    pub fn dtypes(&self) -> Vec<String> {
        let mut set: Vec<String> =
            self.index.keys().filter_map(|n| self.meta(n)).map(|m| format!("{:?}", m.dtype).to_lowercase()).collect();
        set.sort();
        set.dedup();
        set
    }

    /// Total number of elements over all tensors.
    pub fn num_elements(&self) -> usize {
        self.index.keys().filter_map(|n| self.meta(n)).map(|m| m.shape.iter().product::<usize>()).sum()
    }

    /// Reads a tensor as f32 after checking it has `expected` shape.
    ///
    /// f32, bf16 and f16 are converted; the result is the only copy tune keeps (the file stays
    /// mapped, and the tensor's pages are released once converted).
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        self.read_as(name, expected, |dtype, bytes| match dtype {
            Dtype::F32 => convert(bytes, f32::from_le_bytes),
            Dtype::BF16 => convert(bytes, |b| bf16::from_le_bytes(b).to_f32()),
            _ => convert(bytes, |b| f16::from_le_bytes(b).to_f32()),
        })
    }

    /// As [`Weights::read_f32`], as bf16: a bf16 tensor is copied as it is (a bf16 base loads
    /// without a conversion), f32 and f16 are rounded to nearest even.
    pub fn read_bf16(&self, name: &str, expected: &[usize]) -> Result<Vec<bf16>> {
        self.read_as(name, expected, |dtype, bytes| match dtype {
            Dtype::BF16 => convert(bytes, bf16::from_le_bytes),
            Dtype::F32 => convert(bytes, |b| bf16::from_f32(f32::from_le_bytes(b))),
            _ => convert(bytes, |b| bf16::from_f32(f16::from_le_bytes(b).to_f32())),
        })
    }

    /// Checks the tensor's presence, shape, dtype (F32, BF16 or F16) and byte count, then
    /// converts its bytes and releases their pages.
    fn read_as<T>(&self, name: &str, expected: &[usize], convert: impl Fn(Dtype, &[u8]) -> Vec<T>) -> Result<Vec<T>> {
        let (shard, info) = self.info(name).ok_or_else(|| Error::Tensor {
            path: self.dir.clone(),
            name: name.to_string(),
            msg: "missing from the checkpoint".into(),
        })?;
        if info.shape != expected {
            return Err(Error::Tensor {
                path: shard.path.clone(),
                name: name.to_string(),
                msg: format!("shape mismatch: expected {expected:?}, found {:?}", info.shape),
            });
        }
        let (start, end) = info.data_offsets;
        // read_metadata validated the offsets against the file length; re-check to be explicit.
        let bytes = shard
            .mmap
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| Error::format(&shard.path, format!("tensor `{name}` lies outside the file")))?;
        let n: usize = expected.iter().product();
        let elem = match info.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(Error::Tensor {
                    path: shard.path.clone(),
                    name: name.to_string(),
                    msg: format!("dtype {other:?} is not supported (expected F32, BF16 or F16)"),
                })
            }
        };
        if bytes.len() != n * elem {
            return Err(Error::format(&shard.path, format!("tensor `{name}` has {} bytes, expected {}", bytes.len(), n * elem)));
        }
        let out = convert(info.dtype, bytes);
        shard.release(shard.data_start + start, end - start);
        Ok(out)
    }
}

/// `bytes`, S to an element, converted by `f` into a new Vec, on every core. Loading a 7B model
/// is otherwise one core faulting in and zeroing 14.5 GB of fresh pages and copying into them,
/// while the disk could deliver twice as fast: measured 115 s, then 44–50 s, before this.
fn convert<T: Send, const S: usize>(bytes: &[u8], f: impl Fn([u8; S]) -> T + Sync) -> Vec<T> {
    const CHUNK: usize = 1 << 16;
    let n = bytes.len() / S;
    let mut out: Vec<T> = Vec::with_capacity(n);
    let dst = &mut out.spare_capacity_mut()[..n];
    advise_huge_pages(dst);
    dst.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * S)).for_each(|(dst, src)| {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(S)) {
            d.write(f(s.try_into().expect("chunks of S bytes")));
        }
    });
    // SAFETY: the loop above wrote each of the n elements (bytes holds n·S bytes).
    unsafe { out.set_len(n) };
    out
}

/// Asks Linux to back a large, still untouched buffer with 2 MiB pages: fewer page faults when
/// it is filled, and fewer TLB misses when the kernels stream the weights later (THP is often
/// `madvise`-only, as on this project's machines).
fn advise_huge_pages<T>(buf: &mut [std::mem::MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (p, len) = (buf.as_mut_ptr() as usize, std::mem::size_of_val(buf));
        let (start, end) = (p.next_multiple_of(HUGE), (p + len) / HUGE * HUGE);
        if end > start {
            // SAFETY: an advice on memory this Vec owns; it changes how pages are backed, never
            // their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// A tensor to write: name, shape, and its little-endian bytes.
pub type OwnedTensor = (String, Vec<usize>, Vec<u8>);

/// Writes tensors of one dtype as a safetensors file, with `{"format": "pt"}` metadata as
/// PyTorch writes it (transformers refuses files without a known format).
pub fn write(path: &Path, tensors: &[OwnedTensor], dtype: Dtype) -> Result<()> {
    let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(dtype, s.clone(), b).expect("shape and byte count agree by construction");
            (n.as_str(), view)
        })
        .collect();
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, &metadata, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(e) => Error::io(path, e),
        e => Error::format(path, format!("writing safetensors: {e}")),
    })
}

/// Resolves a shard file name from the index, refusing anything that would leave `dir`.
fn shard_path(dir: &Path, index_path: &Path, file: &str) -> Result<PathBuf> {
    let rel = Path::new(file);
    let escapes = rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if escapes || file.is_empty() {
        return Err(Error::format(
            index_path,
            format!("shard path `{file}` is not a plain file name inside the model directory; refusing to read it"),
        ));
    }
    let path = dir.join(rel);
    // A symlink inside the directory could still point elsewhere: compare canonical paths.
    let canon_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let canon = path.canonicalize().map_err(|e| Error::io(&path, e))?;
    if !canon.starts_with(&canon_dir) {
        return Err(Error::format(index_path, format!("shard `{file}` resolves outside the model directory; refusing to read it")));
    }
    Ok(path)
}

/// Storage dtype of written tensors (exports, and the recipe's `output.export_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutDtype {
    F32,
    #[default]
    Bf16,
    F16,
}

impl FromStr for OutDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(OutDtype::F32),
            "bf16" | "bfloat16" => Ok(OutDtype::Bf16),
            "f16" | "float16" => Ok(OutDtype::F16),
            _ => Err(format!("unknown dtype `{s}` (expected bf16, f16 or f32)")),
        }
    }
}

impl OutDtype {
    /// The name transformers writes in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::Bf16 => "bfloat16",
            OutDtype::F16 => "float16",
        }
    }

    pub fn safetensors(self) -> Dtype {
        match self {
            OutDtype::F32 => Dtype::F32,
            OutDtype::Bf16 => Dtype::BF16,
            OutDtype::F16 => Dtype::F16,
        }
    }

    pub fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::Bf16 | OutDtype::F16 => 2,
        }
    }

    /// Little-endian bytes, rounding to nearest even as torch's `.to(dtype)` does.
    pub fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            OutDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutDtype::Bf16 => v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
            OutDtype::F16 => v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_safetensors(path: &Path, tensors: &[(&str, Vec<f32>, Vec<usize>)]) {
        let views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
        drop(views);
        let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, v, _)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((n, _, s), b)| (*n, safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, &None, path).unwrap();
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tune-st-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_and_checks_shape() {
        let d = tmpdir("shape");
        write_safetensors(&d.join("model.safetensors"), &[("a", vec![1.0, 2.0, 3.0, 4.0], vec![2, 2])]);
        let w = Weights::open(&d).unwrap();
        assert_eq!(w.read_f32("a", &[2, 2]).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        // Reading releases the tensor's pages; a second read maps them back from the file.
        assert_eq!(w.read_f32("a", &[2, 2]).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        let err = w.read_f32("a", &[4, 1]).unwrap_err().to_string();
        assert!(err.contains("expected [4, 1], found [2, 2]"), "{err}");
        let err = w.read_f32("b", &[1]).unwrap_err().to_string();
        assert!(err.contains("`b`") && err.contains("missing"), "{err}");
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let d = tmpdir("trunc");
        let p = d.join("model.safetensors");
        write_safetensors(&p, &[("a", vec![1.0; 64], vec![64])]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let err = Weights::open(&d).err().unwrap().to_string();
        assert!(err.contains("model.safetensors") && err.contains("truncated or corrupt"), "{err}");
    }

    #[test]
    fn index_paths_must_stay_inside() {
        let d = tmpdir("escape");
        std::fs::write(d.join("model.safetensors.index.json"), r#"{"weight_map": {"a": "../outside.safetensors"}}"#).unwrap();
        let err = Weights::open(&d).err().unwrap().to_string();
        assert!(err.contains("refusing"), "{err}");
        std::fs::write(d.join("model.safetensors.index.json"), r#"{"weight_map": {"a": "/etc/passwd"}}"#).unwrap();
        let err = Weights::open(&d).err().unwrap().to_string();
        assert!(err.contains("refusing"), "{err}");
    }

    #[test]
    fn pickle_only_directory_is_refused() {
        let d = tmpdir("pickle");
        std::fs::write(d.join("pytorch_model.bin"), b"not read").unwrap();
        let err = Weights::open(&d).err().unwrap().to_string();
        assert!(err.contains("pickle"), "{err}");
    }
}
