//! The model: a family-neutral causal LM built from blocks.
//!
//! - `family/`  one file per model_type: its config.json struct, block choices and name map
//! - `config.rs` the architecture those resolve to (what the network is built from)
//! - `blocks/`  norm, positions, attention, MLP, decoder block: the variants in one place
//! - `linear.rs` the linear layer every projection is, where adapters attach (its frozen weight
//!   dense, or quantized: `crate::quant`)
//! - `lm.rs`    the causal LM: embeddings, blocks, final norm, head
//! - `loader.rs` tensors by name from safetensors, shape-checked
//!
//! To add a family, see `family/mod.rs`.

pub mod blocks;
pub mod config;
pub mod family;
pub mod linear;
pub mod lm;
pub mod loader;

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};

use crate::backend::Backend;
use crate::error::Result;
use crate::hf::Weights;

pub use blocks::AttentionMask;
pub use config::{LinearInfo, ModelConfig, RopeScaling};
pub use family::Family;
pub use linear::{FrozenWeight, Linear};
pub use lm::{CausalLm, KvCache};
pub use loader::Loader;

impl ModelConfig {
    /// Reads `dir/config.json` by its model_type.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        family::read(dir)
    }
}

/// Loads a model directory onto `device`: config, then weights, then the check that every
/// tensor in the files was used.
pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<CausalLm<B>> {
    load_with_dtype(dir, device, burn::tensor::FloatDType::F32)
}

/// How the frozen base is stored: `model.dtype` and `model.quantize`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    /// Storage dtype of the dense frozen matrices (f32 or bf16): every one when not quantized,
    /// else the embeddings and the head.
    pub dtype: burn::tensor::FloatDType,
    /// The decoder's linear layers quantized (NF4, int8) or not.
    pub quantize: crate::quant::Quantization,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: burn::tensor::FloatDType::F32, quantize: crate::quant::Quantization::None }
    }
}

/// As [`load`], with the frozen matrices stored in `dtype` (f32 or bf16).
pub fn load_with_dtype<B: Backend>(dir: &Path, device: &B::Device, dtype: burn::tensor::FloatDType) -> Result<CausalLm<B>> {
    load_with(dir, device, &LoadOptions { dtype, ..LoadOptions::default() })
}

/// As [`load`], with the base stored as `opts` says.
pub fn load_with<B: Backend>(dir: &Path, device: &B::Device, opts: &LoadOptions) -> Result<CausalLm<B>> {
    let config = ModelConfig::from_model_dir(dir)?;
    load_config_with(config, dir, device, opts)
}

/// Loads the weights of `dir` for an already-read (possibly edited) config.
pub fn load_config<B: Backend>(
    config: ModelConfig,
    dir: &Path,
    device: &B::Device,
    dtype: burn::tensor::FloatDType,
) -> Result<CausalLm<B>> {
    load_config_with(config, dir, device, &LoadOptions { dtype, ..LoadOptions::default() })
}

/// As [`load_config`], with the base stored as `opts` says.
pub fn load_config_with<B: Backend>(config: ModelConfig, dir: &Path, device: &B::Device, opts: &LoadOptions) -> Result<CausalLm<B>> {
    let weights = Weights::open(dir)?;
    let loader = Loader::new(&weights, device.clone())
        .with_matrix_dtype(opts.dtype)
        .with_quantization(opts.quantize)
        .with_optional_prefix(config.names.optional_prefix);
    let model = CausalLm::load(config, &loader)?;
    loader.finish()?;
    Ok(model)
}

/// Token ids `[rows, seq]` as an Int tensor.
pub fn token_tensor<B: Backend>(ids: &[u32], rows: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(data, [rows, ids.len() / rows]), device)
}
