//! Mistral (Jiang et al., 2023): the Llama decoder with sliding-window attention — each position
//! attends to at most `sliding_window` previous ones (4096 in v0.1; none from v0.2 on).

use super::{llama, Family, ModelConfig};
use crate::error::Result;
use crate::hf::HfConfig;

/// Reads a Mistral config.json. Defaults are `MistralConfig`'s (rope_theta 10000, no biases).
pub fn config(hf: &HfConfig) -> Result<ModelConfig> {
    let mut c = ModelConfig::common(hf, Family::Mistral, &llama::NAMES)?;
    c.sliding_window = hf.sliding_window;
    Ok(c)
}
