//! Qwen2 / Qwen2.5: the Llama decoder with a bias on q_proj, k_proj and v_proj (not on o_proj).

use super::{llama, Family, ModelConfig};
use crate::error::Result;
use crate::hf::HfConfig;

/// Reads a Qwen2 config.json. Defaults are `Qwen2Config`'s.
pub fn config(hf: &HfConfig) -> Result<ModelConfig> {
    let mut c = ModelConfig::common(hf, Family::Qwen2, &llama::NAMES)?;
    c.qkv_bias = true;
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
