//! `config.json` of a Hugging Face checkpoint, read as transformers writes it.
//!
//! Only the fields tune's families use are read; every other key is ignored, as transformers does.
//! Whether a field is required, and its default, is a family's decision (see `model::<family>`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{read_json, Error, Result};

/// The raw fields of `config.json`. Field names are transformers'.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    /// Explicit per-head size (Qwen3, Gemma); otherwise hidden_size / num_attention_heads.
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    /// transformers < 5 writes rope_theta at the top level ...
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeParameters>,
    /// ... transformers >= 5 writes rope_theta and the scaling inside `rope_parameters`.
    pub rope_parameters: Option<RopeParameters>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<TokenIds>,
    pub torch_dtype: Option<String>,
    /// transformers >= 5 renamed torch_dtype to dtype.
    pub dtype: Option<String>,
    /// Where this config was read from, for error messages.
    #[serde(skip)]
    pub path: PathBuf,
}

/// `rope_scaling` (older configs) or `rope_parameters` (newer ones).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeParameters {
    /// `rope_type`, or `type` in configs written before transformers 4.43.
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// A token id field that is a single id or a list of ids (`eos_token_id: [128001, 128009]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

impl HfConfig {
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Model(format!(
                "{}: model directory not found (expected a Hugging Face checkpoint directory with config.json and *.safetensors)",
                dir.display()
            )));
        }
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(Error::Model(format!(
                "{}: no config.json (is this a Hugging Face model directory?)",
                dir.display()
            )));
        }
        let mut config: HfConfig = read_json(&path)?;
        config.path = path;
        Ok(config)
    }

    /// rope_theta wherever this transformers version wrote it.
    pub fn rope_theta(&self) -> Option<f64> {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
    }

    /// The rope scaling block, if any: `rope_scaling`, else a `rope_parameters` whose type is
    /// not "default".
    pub fn rope_scaling(&self) -> Option<&RopeParameters> {
        let scaling = self.rope_scaling.as_ref().or(self.rope_parameters.as_ref())?;
        match scaling.rope_type.as_deref() {
            None | Some("default") => None,
            Some(_) => Some(scaling),
        }
    }

    /// The dtype the weights were saved in, as written in config.json.
    pub fn saved_dtype(&self) -> Option<&str> {
        self.dtype.as_deref().or(self.torch_dtype.as_deref())
    }

    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(&self.path, msg)
    }
}

/// `generation_config.json`, for the eos ids generation stops at.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}

impl GenerationConfig {
    /// Ok(None) when the file is absent: it is optional in HF checkpoints.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }
}
