//! Mistral (Jiang et al., 2023): Llama with sliding-window attention — each position attends to
//! at most `sliding_window` positions (itself included); 4096 in v0.1, none from v0.2 on.

use crate::error::Result;
use crate::hf::config::RawConfig;
use crate::model::config::{LayerConfig, ModelConfig};

use super::llama::{network, LlamaConfig};

/// Reads a Mistral config.json (`MistralConfig`: Llama's fields, no biases).
pub fn config(raw: &RawConfig) -> Result<ModelConfig> {
    let c: LlamaConfig = raw.parse()?;
    let mut m = network(raw, &c, "mistral")?;
    m.attention.qkv_bias = false;
    m.attention.o_bias = false;
    m.layers = vec![LayerConfig { window: c.sliding_window, rope: 0 }; c.num_hidden_layers];
    Ok(m)
}

/// transformers' MistralForCausalLM converts as LlamaModel: llama.cpp's LLAMA architecture.
pub const GGUF: super::Gguf = super::llama::GGUF;
