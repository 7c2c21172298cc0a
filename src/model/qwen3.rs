//! Qwen3: the Llama decoder with an RMSNorm over each head of q and k (before RoPE), an explicit
//! head_dim that need not equal hidden_size / num_attention_heads, and optional attention bias.

use super::{llama, Family, ModelConfig};
use crate::error::Result;
use crate::hf::HfConfig;

/// Reads a Qwen3 config.json. Defaults are `Qwen3Config`'s.
pub fn config(hf: &HfConfig) -> Result<ModelConfig> {
    let mut c = ModelConfig::common(hf, Family::Qwen3, &llama::NAMES)?;
    c.qk_norm = true;
    c.qkv_bias = hf.attention_bias.unwrap_or(false);
    c.o_bias = c.qkv_bias;
    if hf.use_sliding_window.unwrap_or(false) {
        // transformers then windows only layers from max_window_layers on; not implemented yet.
        return Err(crate::Error::Unsupported(format!(
            "{}: use_sliding_window: true is not supported for {}",
            hf.path.display(),
            c.family.name()
        )));
    }
    Ok(c)
}
