//! Model families. Each file maps one `model_type` of transformers onto a network:
//!
//! - `llama.rs`   Llama 2/3/3.1/3.2, SmolLM/SmolLM2 — and the decoder the others reuse
//! - `mistral.rs` Mistral (Llama + sliding-window attention)
//! - `qwen2.rs`   Qwen2 / Qwen2.5 (Llama + q/k/v bias)
//! - `qwen3.rs`   Qwen3 (Llama + per-head q/k RMSNorm, explicit head_dim)
//!
//! To add a family: write `<family>.rs` with a `config()` that reads its config.json into a
//! [`ModelConfig`] and a [`WeightNames`] table of its HF tensor names, then add it to [`Family`].
//! A family whose network differs beyond these switches gets its own model struct there.

pub mod layers;
pub mod llama;
pub mod loader;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;

use std::path::Path;

use crate::backend::Backend;

use crate::error::{Error, Result};
use crate::hf::{HfConfig, Weights};
pub use layers::{AttentionMask, Projection, RopeScaling};
pub use llama::{KvCache, Llama};
pub use loader::Loader;

/// The `model_type`s tune can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Family {
    pub const SUPPORTED: &'static [&'static str] = &["llama", "mistral", "qwen2", "qwen3"];

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    fn config(self, hf: &HfConfig) -> Result<ModelConfig> {
        match self {
            Family::Llama => llama::config(hf),
            Family::Mistral => mistral::config(hf),
            Family::Qwen2 => qwen2::config(hf),
            Family::Qwen3 => qwen3::config(hf),
        }
    }
}

/// HF tensor names of a family, without the `.weight` / `.bias` suffix. Per-layer names are
/// relative to `{layers}.{i}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightNames {
    pub embed_tokens: &'static str,
    pub layers: &'static str,
    pub input_layernorm: &'static str,
    pub q_proj: &'static str,
    pub k_proj: &'static str,
    pub v_proj: &'static str,
    pub o_proj: &'static str,
    pub q_norm: &'static str,
    pub k_norm: &'static str,
    pub post_attention_layernorm: &'static str,
    pub gate_proj: &'static str,
    pub up_proj: &'static str,
    pub down_proj: &'static str,
    pub norm: &'static str,
    pub lm_head: &'static str,
}

/// The architecture, resolved from config.json with the family's defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub names: &'static WeightNames,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q_proj, k_proj, v_proj.
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm on each head of q and k (Qwen3).
    pub qk_norm: bool,
    /// Attend to at most this many previous positions (Mistral v0.1).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads `dir/config.json` and dispatches on its model_type.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let hf = HfConfig::from_model_dir(dir)?;
        let model_type = hf
            .model_type
            .clone()
            .ok_or_else(|| hf.err("missing key `model_type`"))?;
        let family = Family::from_model_type(&model_type).ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: model_type `{model_type}` is not supported (supported: {})",
                hf.path.display(),
                Family::SUPPORTED.join(", ")
            ))
        })?;
        family.config(&hf)
    }

    /// The fields every Llama-like family reads the same way; families adjust the rest.
    pub fn common(hf: &HfConfig, family: Family, names: &'static WeightNames) -> Result<Self> {
        let heads = hf.num_attention_heads;
        let kv_heads = hf.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(hf.err(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            )));
        }
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None if hf.hidden_size.is_multiple_of(heads) => hf.hidden_size / heads,
            None => {
                return Err(hf.err(format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({heads}) and no head_dim is given",
                    hf.hidden_size
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(hf.err(format!("head_dim ({head_dim}) must be even for rotary embeddings")));
        }
        if let Some(act) = hf.hidden_act.as_deref() {
            if act != "silu" && act != "swish" {
                return Err(Error::Unsupported(format!(
                    "{}: hidden_act `{act}` is not supported for {} (expected silu)",
                    hf.path.display(),
                    family.name()
                )));
            }
        }
        Ok(ModelConfig {
            family,
            names,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: hf.rope_theta().unwrap_or(10_000.0),
            rope_scaling: rope_scaling(hf)?,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias: false,
            o_bias: false,
            mlp_bias: hf.mlp_bias.unwrap_or(false),
            qk_norm: false,
            sliding_window: None,
            bos_token_id: hf.bos_token_id.as_ref().and_then(|t| t.to_vec().first().copied()),
            eos_token_ids: hf.eos_token_id.as_ref().map(|t| t.to_vec()).unwrap_or_default(),
        })
    }

    /// Parameters of the network (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let (h, d) = (self.hidden_size, self.head_dim);
        let q = h * self.num_attention_heads * d;
        let kv = 2 * h * self.num_key_value_heads * d;
        let o = self.num_attention_heads * d * h;
        let bias = if self.qkv_bias {
            (self.num_attention_heads + 2 * self.num_key_value_heads) * d
        } else {
            0
        } + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * self.intermediate_size
            + if self.mlp_bias { 2 * self.intermediate_size + h } else { 0 };
        let norms = 2 * h + if self.qk_norm { 2 * d } else { 0 };
        let layer = q + kv + o + bias + mlp + norms;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        self.num_hidden_layers * layer + embed + head + h
    }
}

fn rope_scaling(hf: &HfConfig) -> Result<RopeScaling> {
    let Some(s) = hf.rope_scaling() else {
        return Ok(RopeScaling::None);
    };
    let need = |v: Option<f64>, key: &str| v.ok_or_else(|| hf.err(format!("rope_scaling: missing key `{key}`")));
    match s.rope_type.as_deref() {
        Some("linear") => Ok(RopeScaling::Linear {
            factor: need(s.factor, "factor")?,
        }),
        Some("llama3") => Ok(RopeScaling::Llama3 {
            factor: need(s.factor, "factor")?,
            low_freq_factor: need(s.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(s.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: s
                .original_max_position_embeddings
                .ok_or_else(|| hf.err("rope_scaling: missing key `original_max_position_embeddings`"))?,
        }),
        Some(other) => Err(Error::Unsupported(format!(
            "{}: rope_type `{other}` is not supported (supported: default, linear, llama3)",
            hf.path.display()
        ))),
        None => unreachable!("HfConfig::rope_scaling filters out untyped blocks"),
    }
}

/// Loads a model directory onto `device`: config, then weights, then the check that every
/// tensor in the files was used.
pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<Llama<B>> {
    load_with_dtype(dir, device, burn::tensor::FloatDType::F32)
}

/// As [`load`], with the frozen matrices stored in `dtype` (f32 or bf16).
pub fn load_with_dtype<B: Backend>(dir: &Path, device: &B::Device, dtype: burn::tensor::FloatDType) -> Result<Llama<B>> {
    let config = ModelConfig::from_model_dir(dir)?;
    let weights = Weights::open(dir)?;
    let loader = Loader::new(&weights, device.clone()).with_matrix_dtype(dtype);
    let model = Llama::load(config, &loader)?;
    loader.finish()?;
    Ok(model)
}
