//! Helpers shared by the integration tests: fixture paths and reading reference tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

pub type B = tune::backend::Cpu;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny(name: &str) -> PathBuf {
    fixtures().join("tiny").join(name)
}

/// The tiny random checkpoints, one per family variant.
pub const TINY: &[&str] = &["llama", "llama-tied", "llama-linear", "mistral", "qwen2", "qwen3"];

/// A reference tensor written by make_fixtures.py: values widened to f64 plus its shape.
#[derive(Debug, Clone)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl RefTensor {
    pub fn ids(&self) -> Vec<u32> {
        self.values.iter().map(|&v| v as u32).collect()
    }
    pub fn f32s(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }
    pub fn scalar(&self) -> f64 {
        assert_eq!(self.values.len(), 1, "not a scalar: {:?}", self.shape);
        self.values[0]
    }
}

pub fn read_reference(path: &Path) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
                Dtype::F64 => data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
                Dtype::I64 => data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
                Dtype::I32 => data.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, RefTensor { shape: view.shape().to_vec(), values })
        })
        .collect()
}

/// max |a - b| and max |b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| (*y as f64).abs()).fold(0.0, f64::max);
    (diff, scale)
}

/// Location of the real SmolLM2-135M-Instruct: $TUNE_SMOLLM2 or the project script's default.
pub fn smollm2_dir() -> PathBuf {
    if let Ok(p) = std::env::var("TUNE_SMOLLM2") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let models = std::env::var("TUNE_MODELS").unwrap_or_else(|_| format!("{home}/.cache/tune/models"));
    PathBuf::from(models).join("smollm2-135m-instruct")
}
