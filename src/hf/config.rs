//! `config.json` of a Hugging Face checkpoint, read as transformers reads it: `model_type` first,
//! then the whole file as that family's own config struct (see `model::family`).
//!
//! This file holds only what every family shares: the raw JSON with its path, the key types
//! transformers writes the same way for every family (token ids, rope parameters in both the
//! 4.x and the 5.x form), and `generation_config.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{read_json, Error, Result};

/// A parsed config.json and where it came from.
#[derive(Debug, Clone)]
pub struct RawConfig {
    pub path: PathBuf,
    pub value: serde_json::Value,
}

impl RawConfig {
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Model(format!(
                "{}: model directory not found (expected a Hugging Face checkpoint directory with config.json and *.safetensors)",
                dir.display()
            )));
        }
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(Error::Model(format!("{}: no config.json (is this a Hugging Face model directory?)", dir.display())));
        }
        let value: serde_json::Value = read_json(&path)?;
        if !value.is_object() {
            return Err(Error::format(&path, "expected a JSON object"));
        }
        Ok(RawConfig { path, value })
    }

    /// The `model_type`, which decides how the rest of the file is read.
    pub fn model_type(&self) -> Result<&str> {
        match self.value.get("model_type") {
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(_) => Err(self.err("`model_type` must be a string")),
            None => Err(self.err("missing key `model_type`")),
        }
    }

    /// The whole file as a family's config struct; a wrong or missing key is named with its
    /// path in the file (`rope_parameters.factor: invalid type ...`).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_path_to_error::deserialize(&self.value).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            if key == "." {
                self.err(inner.to_string())
            } else {
                self.err(format!("key `{key}`: {inner}"))
            }
        })
    }

    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(&self.path, msg)
    }
}

/// `rope_scaling` (transformers 4.x) or one entry of `rope_parameters` (5.x).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RopeParameters {
    /// `rope_type`, or `type` in configs written before transformers 4.43.
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    /// LongRoPE's per-frequency factors below and above the original context.
    pub short_factor: Option<Vec<f64>>,
    pub long_factor: Option<Vec<f64>>,
    /// LongRoPE / YaRN: multiplies cos and sin; derived from the context ratio when absent.
    pub attention_factor: Option<f64>,
    /// Some 5.x configs keep the rotary fraction here.
    pub partial_rotary_factor: Option<f64>,
}

/// `rope_parameters` as transformers 5.x writes it: one block, or one block per layer type
/// (Gemma 3: `full_attention`, `sliding_attention`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RopeParametersField {
    PerLayerType(BTreeMap<String, RopeParameters>),
    Single(RopeParameters),
}

impl RopeParametersField {
    /// The block for a layer type (the only block when there is one).
    pub fn for_layer_type(&self, layer_type: &str) -> Option<&RopeParameters> {
        match self {
            RopeParametersField::Single(p) => Some(p),
            RopeParametersField::PerLayerType(m) => m.get(layer_type),
        }
    }
}

/// A token id field that is a single id or a list of ids (`eos_token_id: [128001, 128009]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_parameters_read_in_both_forms() {
        let single: RopeParametersField = serde_json::from_str(r#"{"rope_type": "default", "rope_theta": 10000.0}"#).unwrap();
        assert_eq!(single.for_layer_type("anything").unwrap().rope_theta, Some(10000.0));
        let per: RopeParametersField = serde_json::from_str(
            r#"{"full_attention": {"rope_theta": 1e6, "rope_type": "default"}, "sliding_attention": {"rope_theta": 1e4}}"#,
        )
        .unwrap();
        assert_eq!(per.for_layer_type("full_attention").unwrap().rope_theta, Some(1e6));
        assert_eq!(per.for_layer_type("sliding_attention").unwrap().rope_theta, Some(1e4));
        assert!(per.for_layer_type("chunked_attention").is_none());
    }
}
