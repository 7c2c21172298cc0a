//! The model families: one file each, holding its config.json struct (transformers' field names
//! and defaults), its block choices and its tensor name map.
//!
//! To add a family: write `<name>.rs` with a `config(&RawConfig) -> Result<ModelConfig>` and a
//! `Names` table, then add one line to [`FAMILIES`]. Every linear layer of every family is a
//! [`crate::model::Linear`], so LoRA attaches to the new family without code of its own.

pub mod bloom;
pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod gpt_neox;
pub mod llama;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;

use crate::error::{Error, Result};
use crate::hf::config::{RawConfig, RopeParameters, RopeParametersField, TokenIds};

use super::config::{Activation, ModelConfig, RopeConfig, RopeScaling};

/// A `model_type` tune can load.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// transformers' `model_type`.
    pub model_type: &'static str,
    /// The transformers classes (`*ForCausalLM`) and the models it covers, for `tune inspect`
    /// and the README.
    pub models: &'static str,
    /// PEFT's default `target_modules` for the model_type.
    pub default_targets: &'static [&'static str],
    config: fn(&RawConfig) -> Result<ModelConfig>,
    /// How llama.cpp's converter writes it as GGUF; None: not exported to GGUF.
    pub gguf: Option<&'static Gguf>,
}

/// How llama.cpp's `convert_hf_to_gguf.py` writes a family: what `export::gguf` needs beyond the
/// name map (the role -> llama.cpp tensor name mapping itself is generic, in `export::gguf`).
#[derive(Debug, Clone, Copy)]
pub struct Gguf {
    /// llama.cpp's architecture: `general.architecture`, and the prefix of the model's keys.
    pub arch: &'static str,
    /// q and k rows permuted from transformers' rotate-half layout to the adjacent pairs that
    /// llama.cpp's LLAMA architecture rotates (the NeoX-style architectures rotate halves, as
    /// stored).
    pub permute_qk: bool,
    /// Norm weights stored as w − 1 and applied as (1 + w) (Gemma): written as w + 1.
    pub norm_plus_one: bool,
    /// token_embd keeps only the rows the tokenizer has tokens for (Gemma 3).
    pub trim_embeddings: bool,
    /// The checkpoint's lm_head is never written (Gemma: tied to the embeddings).
    pub skip_lm_head: bool,
    /// Whether the converter's model class writes `general.file_type` (GPT-NeoX's does not).
    pub file_type: bool,
    /// The `{arch}.*` hyperparameters, keys without the prefix.
    pub hparams: fn(&RawConfig, &ModelConfig) -> Vec<(&'static str, crate::gguf::Value)>,
    /// Which of the converter's vocabulary readers the model class takes.
    pub vocab: GgufVocab,
    /// Tokenizer keys the model class adds or overrides after the generic ones, from the
    /// config, tokenizer_config.json and whether the vocabulary came from a tokenizer.model.
    pub tokenizer_quirks: fn(&ModelConfig, &serde_json::Value, bool) -> Vec<(&'static str, crate::gguf::Value)>,
}

/// The vocabulary readers of convert_hf_to_gguf.py (`export::gguf_vocab` implements them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufVocab {
    /// `_set_vocab_gpt2`: tokenizer.json's BPE tokens and merges.
    Bpe,
    /// `_set_vocab_sentencepiece` when the checkpoint has a tokenizer.model, else BPE (Llama,
    /// Mistral, Qwen2/3, Gemma 3).
    SentencePieceOrBpe,
    /// `_set_vocab_sentencepiece`; the tokenizer.model is required (Gemma 2).
    SentencePiece,
    /// `Phi3MiniModel.set_vocab`: its own reading of the tokenizer.model (added tokens typed
    /// user-defined or control by their `special` flag alone, tokenizer.json's added tokens
    /// too), or BPE when tokenizer_config names a `GPT2Tokenizer` (Phi-4-mini).
    Phi3,
}

/// No tokenizer quirks.
pub(crate) fn no_quirks(_: &ModelConfig, _: &serde_json::Value, _: bool) -> Vec<(&'static str, crate::gguf::Value)> {
    Vec::new()
}

/// Gemma's model classes write add_space_prefix = false after a SentencePiece vocabulary.
pub(crate) fn no_space_prefix(_: &ModelConfig, _: &serde_json::Value, sentencepiece: bool) -> Vec<(&'static str, crate::gguf::Value)> {
    if sentencepiece {
        vec![("tokenizer.ggml.add_space_prefix", crate::gguf::Value::Bool(false))]
    } else {
        Vec::new()
    }
}

/// What the converter's `TextModel.set_gguf_parameters` writes for every family that does not
/// override it, from the resolved config. `head_dim`: whether transformers' config class has a
/// `head_dim` attribute (it then writes key_length and value_length).
pub(crate) fn gguf_text_hparams(c: &ModelConfig, head_dim: bool) -> Vec<(&'static str, crate::gguf::Value)> {
    use crate::gguf::Value::{String as S, F32, U32};
    let mut v = vec![
        ("block_count", U32(c.num_hidden_layers() as u32)),
        ("context_length", U32(c.max_position_embeddings as u32)),
        ("embedding_length", U32(c.hidden_size as u32)),
        ("feed_forward_length", U32(c.intermediate_size as u32)),
        ("attention.head_count", U32(c.num_attention_heads as u32)),
        ("attention.head_count_kv", U32(c.num_key_value_heads as u32)),
    ];
    if let super::config::Positions::Rope(tables) = &c.positions {
        match &tables[0].scaling {
            super::config::RopeScaling::Linear { factor } => {
                v.push(("rope.scaling.type", S("linear".into())));
                v.push(("rope.scaling.factor", F32(*factor as f32)));
            }
            super::config::RopeScaling::LongRope { .. } => v.push(("rope.scaling.type", S("longrope".into()))),
            // Llama 3's scaling is a rope_freqs tensor.
            super::config::RopeScaling::Llama3 { .. } | super::config::RopeScaling::None => {}
        }
        v.push(("rope.freq_base", F32(tables[0].theta as f32)));
        if let Some(local) = tables.get(1) {
            v.push(("rope.freq_base_swa", F32(local.theta as f32)));
        }
    }
    match c.norm {
        super::config::NormKind::Rms { eps, .. } => v.push(("attention.layer_norm_rms_epsilon", F32(eps as f32))),
        super::config::NormKind::Layer { eps } => v.push(("attention.layer_norm_epsilon", F32(eps as f32))),
    }
    if head_dim {
        v.push(("attention.key_length", U32(c.head_dim as u32)));
        v.push(("attention.value_length", U32(c.head_dim as u32)));
    }
    v
}

/// Every family, by model_type. `gemma3` is the multimodal Gemma 3 (4B and up): its text tower
/// is read from `text_config`.
pub const FAMILIES: &[Family] = &[
    Family {
        model_type: "llama",
        models: "Llama 2/3/3.1/3.2, SmolLM/SmolLM2",
        default_targets: &["q_proj", "v_proj"],
        config: llama::config,
        gguf: Some(&llama::GGUF),
    },
    Family {
        model_type: "mistral",
        models: "Mistral 7B",
        default_targets: &["q_proj", "v_proj"],
        config: mistral::config,
        gguf: Some(&mistral::GGUF),
    },
    Family {
        model_type: "qwen2",
        models: "Qwen2, Qwen2.5",
        default_targets: &["q_proj", "v_proj"],
        config: qwen2::config,
        gguf: Some(&qwen2::GGUF),
    },
    Family {
        model_type: "qwen3",
        models: "Qwen3",
        default_targets: &["q_proj", "v_proj"],
        config: qwen3::config,
        gguf: Some(&qwen3::GGUF),
    },
    Family {
        model_type: "gemma3_text",
        models: "Gemma 3 270M, 1B",
        default_targets: &["q_proj", "v_proj"],
        config: gemma3::config,
        gguf: Some(&gemma3::GGUF),
    },
    Family {
        model_type: "gemma3",
        models: "Gemma 3 4B+ (text tower only)",
        default_targets: &["q_proj", "v_proj"],
        config: gemma3::config_multimodal,
        gguf: None,
    },
    Family {
        model_type: "gemma2",
        models: "Gemma 2",
        default_targets: &["q_proj", "v_proj"],
        config: gemma2::config,
        gguf: Some(&gemma2::GGUF),
    },
    Family {
        model_type: "phi3",
        models: "Phi-3/3.5-mini, Phi-4-mini",
        default_targets: &["qkv_proj"],
        config: phi3::config,
        gguf: Some(&phi3::GGUF),
    },
    Family { model_type: "gpt2", models: "GPT-2", default_targets: &["c_attn"], config: gpt2::config, gguf: Some(&gpt2::GGUF) },
    Family {
        model_type: "gpt_neox",
        models: "GPT-NeoX, Pythia",
        default_targets: &["query_key_value"],
        config: gpt_neox::config,
        gguf: Some(&gpt_neox::GGUF),
    },
    Family {
        model_type: "bloom",
        models: "BLOOM, BLOOMZ",
        default_targets: &["query_key_value"],
        config: bloom::config,
        gguf: Some(&bloom::GGUF),
    },
];

impl PartialEq for Family {
    fn eq(&self, other: &Self) -> bool {
        self.model_type == other.model_type
    }
}

impl Family {
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        FAMILIES.iter().copied().find(|f| f.model_type == model_type)
    }

    pub fn name(self) -> &'static str {
        self.model_type
    }

    pub fn supported() -> Vec<&'static str> {
        FAMILIES.iter().map(|f| f.model_type).collect()
    }

    pub fn config(self, raw: &RawConfig) -> Result<ModelConfig> {
        (self.config)(raw)
    }
}

// Here rather than in config.rs, so that the config does not import the families that build it.
impl ModelConfig {
    /// The family this config was read as.
    pub fn family(&self) -> Family {
        Family::from_model_type(self.model_type).expect("a ModelConfig is built by a registered family")
    }
}

/// serde defaults that several families' config structs share (transformers' own values).
pub(crate) mod defaults {
    pub fn yes() -> bool {
        true
    }
    pub fn silu() -> String {
        "silu".into()
    }
    pub fn gelu_tanh() -> String {
        "gelu_pytorch_tanh".into()
    }
    pub fn eps_1e5() -> f64 {
        1e-5
    }
    pub fn eps_1e6() -> f64 {
        1e-6
    }
    pub fn head_dim_256() -> usize {
        256
    }
    /// Gemma's query_pre_attn_scalar.
    pub fn scalar_256() -> f64 {
        256.0
    }
    pub fn window_4096() -> usize {
        4096
    }
}

/// The rope block for a layer type: 5.x `rope_parameters` (one block, or one per layer type),
/// else 4.x `rope_scaling` (which never held a base: that was the top-level `rope_theta`).
pub(crate) fn rope_block<'a>(
    parameters: &'a Option<RopeParametersField>,
    scaling: &'a Option<RopeParameters>,
    layer_type: &str,
) -> Option<&'a RopeParameters> {
    parameters.as_ref().and_then(|p| p.for_layer_type(layer_type)).or(scaling.as_ref())
}

/// Head counts and size, as every family checks them.
pub(crate) fn heads(
    raw: &RawConfig,
    hidden: usize,
    heads: usize,
    kv_heads: Option<usize>,
    head_dim: Option<usize>,
) -> Result<(usize, usize, usize)> {
    let kv = kv_heads.unwrap_or(heads);
    if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
        return Err(raw.err(format!("num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv})")));
    }
    let d = match head_dim {
        Some(d) => d,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            return Err(
                raw.err(format!("hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) and no head_dim is given"))
            )
        }
    };
    if d == 0 {
        return Err(raw.err("head_dim must be positive"));
    }
    Ok((heads, kv, d))
}

/// transformers' activation names (ACT2FN) that tune computes.
pub(crate) fn activation(raw: &RawConfig, key: &str, name: &str) -> Result<Activation> {
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::Gelu),
        other => Err(Error::Unsupported(format!(
            "{}: {key} `{other}` is not supported (supported: silu, gelu, gelu_new, gelu_pytorch_tanh)",
            raw.path.display()
        ))),
    }
}

/// A rotary table from a rope block (4.x `rope_scaling`, or a 5.x `rope_parameters` entry).
/// `theta` is the base when the block does not carry one.
pub(crate) fn rope(
    raw: &RawConfig,
    params: Option<&RopeParameters>,
    theta: f64,
    rotary_dim: usize,
    max_position_embeddings: usize,
    original_max: Option<usize>,
) -> Result<RopeConfig> {
    if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
        return Err(raw.err(format!("the rotary dimension ({rotary_dim}) must be even and positive")));
    }
    let theta = params.and_then(|p| p.rope_theta).unwrap_or(theta);
    let need = |v: Option<f64>, key: &str| v.ok_or_else(|| raw.err(format!("rope scaling: missing key `{key}`")));
    let scaling = match params.and_then(|p| p.rope_type.as_deref().map(|t| (p, t))) {
        None | Some((_, "default")) => RopeScaling::None,
        Some((p, "linear")) => RopeScaling::Linear { factor: need(p.factor, "factor")? },
        Some((p, "llama3")) => RopeScaling::Llama3 {
            factor: need(p.factor, "factor")?,
            low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: p
                .original_max_position_embeddings
                .ok_or_else(|| raw.err("rope scaling: missing key `original_max_position_embeddings`"))?,
        },
        Some((p, "longrope")) => {
            let factors = |v: &Option<Vec<f64>>, key: &str| -> Result<Vec<f64>> {
                let v = v.clone().ok_or_else(|| raw.err(format!("longrope: missing key `{key}`")))?;
                if v.len() != rotary_dim / 2 {
                    return Err(raw.err(format!(
                        "longrope: `{key}` has {} entries, expected rotary dim / 2 = {}",
                        v.len(),
                        rotary_dim / 2
                    )));
                }
                Ok(v)
            };
            // transformers: the original context is the config's own field, else the block's,
            // else max_position_embeddings (then no switch ever happens).
            let original = original_max.or(p.original_max_position_embeddings).unwrap_or(max_position_embeddings);
            let factor = if original_max.is_some() || p.original_max_position_embeddings.is_some() {
                max_position_embeddings as f64 / original as f64
            } else {
                p.factor.unwrap_or(1.0)
            };
            let attention_factor =
                p.attention_factor.unwrap_or(if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / (original as f64).ln()).sqrt() });
            RopeScaling::LongRope {
                short_factor: factors(&p.short_factor, "short_factor")?,
                long_factor: factors(&p.long_factor, "long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        Some((_, other)) => {
            return Err(Error::Unsupported(format!(
                "{}: rope_type `{other}` is not supported (supported: default, linear, llama3, longrope)",
                raw.path.display()
            )))
        }
    };
    Ok(RopeConfig { theta, scaling, rotary_dim })
}

pub(crate) fn first_id(ids: &Option<TokenIds>) -> Option<u32> {
    ids.as_ref().and_then(|t| t.to_vec().first().copied())
}

pub(crate) fn all_ids(ids: &Option<TokenIds>) -> Vec<u32> {
    ids.as_ref().map(TokenIds::to_vec).unwrap_or_default()
}

/// Reads `dir/config.json` by its model_type.
pub fn read(dir: &std::path::Path) -> Result<ModelConfig> {
    let raw = RawConfig::from_model_dir(dir)?;
    let model_type = raw.model_type()?;
    let family = Family::from_model_type(model_type).ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: model_type `{model_type}` is not supported (supported: {})",
            raw.path.display(),
            Family::supported().join(", ")
        ))
    })?;
    family.config(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Positions, RopeScaling};

    fn raw(json: serde_json::Value) -> RawConfig {
        RawConfig { path: "config.json".into(), value: json }
    }

    fn ropes(c: &ModelConfig) -> &[RopeConfig] {
        match &c.positions {
            Positions::Rope(t) => t,
            other => panic!("{other:?}"),
        }
    }

    /// transformers 4.x wrote Gemma 3's bases at the top level and the layer pattern as a number;
    /// 5.x writes `rope_parameters` per layer type and `layer_types`. Both read the same.
    #[test]
    fn gemma3_reads_both_config_forms() {
        let common = serde_json::json!({"model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 8});
        let mut v4 = common.clone();
        let o = v4.as_object_mut().unwrap();
        o.insert("rope_theta".into(), 1e6.into());
        o.insert("rope_local_base_freq".into(), 1e4.into());
        o.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": 8.0}));
        o.insert("sliding_window_pattern".into(), 3.into());
        let mut v5 = common;
        let o = v5.as_object_mut().unwrap();
        o.insert(
            "rope_parameters".into(),
            serde_json::json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        );
        let types: Vec<&str> = (0..6).map(|i| if (i + 1) % 3 == 0 { "full_attention" } else { "sliding_attention" }).collect();
        o.insert("layer_types".into(), serde_json::json!(types));
        let (a, b) = (gemma3::config(&raw(v4)).unwrap(), gemma3::config(&raw(v5)).unwrap());
        assert_eq!(a.layers, b.layers);
        assert_eq!(ropes(&a), ropes(&b));
        assert_eq!(a.layers.iter().map(|l| l.window.is_none()).collect::<Vec<_>>(), [false, false, true, false, false, true]);
        assert_eq!(ropes(&a)[0].scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!((ropes(&a)[0].theta, ropes(&a)[1].theta), (1e6, 1e4));
    }

    #[test]
    fn gpt_neox_and_phi3_read_their_4x_keys() {
        let neox = gpt_neox::config(&raw(serde_json::json!({"model_type": "gpt_neox", "vocab_size": 256, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "rotary_pct": 0.5, "rotary_emb_base": 5e4})))
        .unwrap();
        assert_eq!((ropes(&neox)[0].rotary_dim, ropes(&neox)[0].theta), (8, 5e4));
        let phi = phi3::config(&raw(serde_json::json!({"model_type": "phi3", "vocab_size": 256, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
            "original_max_position_embeddings": 16,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], "long_factor": [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]}})))
        .unwrap();
        let RopeScaling::LongRope { attention_factor, original_max_position_embeddings, .. } = ropes(&phi)[0].scaling else {
            panic!("longrope")
        };
        assert_eq!(original_max_position_embeddings, 16);
        assert!((attention_factor - (1.0 + 4f64.ln() / 16f64.ln()).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn multimodal_gemma3_is_refused_by_name() {
        let err = read_raw(raw(serde_json::json!({"model_type": "gemma3", "text_config": {}}))).unwrap_err().to_string();
        assert!(err.contains("gemma3_text") && err.contains("vision"), "{err}");
    }

    fn read_raw(r: RawConfig) -> Result<ModelConfig> {
        Family::from_model_type(r.model_type()?).unwrap().config(&r)
    }
}
