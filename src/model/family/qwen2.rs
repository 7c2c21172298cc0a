//! Qwen2 / Qwen2.5: Llama with a bias on q_proj, k_proj and v_proj (not on o_proj).

use crate::error::Result;
use crate::hf::config::RawConfig;
use crate::model::config::ModelConfig;

use super::llama::{network, LlamaConfig};

/// Reads a Qwen2 config.json (`Qwen2Config`).
pub fn config(raw: &RawConfig) -> Result<ModelConfig> {
    let c: LlamaConfig = raw.parse()?;
    refuse_sliding_window(raw, &c, "qwen2")?;
    let mut m = network(raw, &c, "qwen2")?;
    m.attention.qkv_bias = true;
    m.attention.o_bias = false;
    Ok(m)
}

/// transformers windows only the layers from `max_window_layers` on when
/// `use_sliding_window` is set; no released Qwen2/Qwen3 checkpoint sets it.
pub(super) fn refuse_sliding_window(raw: &RawConfig, c: &LlamaConfig, family: &str) -> Result<()> {
    if c.use_sliding_window.unwrap_or(false) {
        return Err(crate::Error::Unsupported(format!("{}: use_sliding_window: true is not supported for {family}", raw.path.display())));
    }
    Ok(())
}

/// llama.cpp's QWEN2 architecture: TextModel's keys, rotary halves as stored.
pub const GGUF: super::Gguf = super::Gguf {
    arch: "qwen2",
    permute_qk: false,
    norm_plus_one: false,
    trim_embeddings: false,
    skip_lm_head: false,
    file_type: true,
    hparams: |_, c| super::gguf_text_hparams(c, false),
    vocab: super::GgufVocab::SentencePieceOrBpe,
    tokenizer_quirks: super::no_quirks,
};
