//! Qwen3: Llama with an RMSNorm over each head of q and k (before the rotation), an explicit
//! head_dim that need not be hidden_size / num_attention_heads, and optional attention bias.

use crate::error::Result;
use crate::hf::config::RawConfig;
use crate::model::config::ModelConfig;

use super::llama::{network, LlamaConfig};

/// Reads a Qwen3 config.json (`Qwen3Config`).
pub fn config(raw: &RawConfig) -> Result<ModelConfig> {
    let c: LlamaConfig = raw.parse()?;
    super::qwen2::refuse_sliding_window(raw, &c, "qwen3")?;
    let mut m = network(raw, &c, "qwen3")?;
    m.attention.qk_norm = true;
    Ok(m)
}

/// llama.cpp's QWEN3 architecture: Qwen2's, with the head size written (Qwen3Config has one).
pub const GGUF: super::Gguf = super::Gguf { arch: "qwen3", hparams: |_, c| super::gguf_text_hparams(c, true), ..super::qwen2::GGUF };
