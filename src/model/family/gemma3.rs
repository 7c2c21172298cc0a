//! Gemma 3 (Gemma Team, 2025), text models (`Gemma3ForCausalLM`: 270M, 1B), as transformers'
//! `modeling_gemma3.py` computes them.
//!
//! The Llama block with: RMSNorm computed in f32 and scaled by (1 + w); four norms per block,
//! one before and one after each sublayer; RMSNorm on each head of q and k; embeddings scaled by
//! √hidden_size; scores scaled by query_pre_attn_scalar^−½; GeGLU (tanh GELU) MLP; and
//! interleaved local and global layers — local ones attend within a sliding window and rotate
//! with base `rope_local_base_freq` (10⁴), global ones see everything and rotate with
//! `rope_theta` (10⁶), optionally scaled.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::hf::config::{RawConfig, RopeParameters, RopeParametersField, TokenIds};
use crate::model::config::*;

/// The module paths of `Gemma3ForCausalLM` (Gemma 2's are the same).
pub const NAMES: Names = Names {
    attn_out_norm: Some("post_attention_layernorm"),
    mlp_norm: "pre_feedforward_layernorm",
    mlp_out_norm: Some("post_feedforward_layernorm"),
    ..super::llama::NAMES
};

/// `Gemma3TextConfig`'s fields that shape the network (transformers' names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma3TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "super::defaults::head_dim_256")]
    pub head_dim: usize,
    #[serde(default = "super::defaults::gelu_tanh")]
    pub hidden_activation: String,
    #[serde(default = "max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "super::defaults::eps_1e6")]
    pub rms_norm_eps: f64,
    /// 4.x: the global layers' rotary base ...
    pub rope_theta: Option<f64>,
    /// ... the local layers' base ...
    pub rope_local_base_freq: Option<f64>,
    /// ... and the global layers' scaling (linear, factor 8, on 4B and up).
    pub rope_scaling: Option<RopeParameters>,
    /// 5.x: one block per layer type, `full_attention` and `sliding_attention`.
    pub rope_parameters: Option<RopeParametersField>,
    #[serde(default)]
    pub attention_bias: bool,
    /// The scores are scaled by query_pre_attn_scalar^−½ (not head_dim^−½).
    #[serde(default = "super::defaults::scalar_256")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "super::defaults::window_4096")]
    pub sliding_window: usize,
    /// 5.x (and late 4.x): `sliding_attention` or `full_attention` per layer ...
    pub layer_types: Option<Vec<String>>,
    /// ... else every n-th layer is global.
    #[serde(alias = "_sliding_window_pattern", default = "pattern_6")]
    pub sliding_window_pattern: usize,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default = "super::defaults::yes")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_bidirectional_attention: bool,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}
fn max_positions() -> usize {
    131_072
}
fn pattern_6() -> usize {
    6
}

/// Which layers are local (sliding) and which global: `layer_types`, or the pattern.
pub(super) fn layer_types(raw: &RawConfig, given: &Option<Vec<String>>, n: usize, sliding: impl Fn(usize) -> bool) -> Result<Vec<bool>> {
    match given {
        Some(types) => {
            if types.len() != n {
                return Err(raw.err(format!("layer_types has {} entries, expected num_hidden_layers = {n}", types.len())));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(raw.err(format!("layer_types: `{other}` (expected sliding_attention or full_attention)"))),
                })
                .collect()
        }
        None => Ok((0..n).map(sliding).collect()),
    }
}

/// The Gemma 3 text network for a config.
pub fn network(raw: &RawConfig, c: &Gemma3TextConfig) -> Result<ModelConfig> {
    if c.use_bidirectional_attention {
        return Err(Error::Unsupported(format!(
            "{}: use_bidirectional_attention: true (an embedding model) is not a causal LM",
            raw.path.display()
        )));
    }
    let (heads, kv, d) = super::heads(raw, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, Some(c.head_dim))?;
    let act = super::activation(raw, "hidden_activation", &c.hidden_activation)?;
    let pattern = c.sliding_window_pattern.max(1);
    let sliding = layer_types(raw, &c.layer_types, c.num_hidden_layers, |i| (i + 1) % pattern != 0)?;
    // 4.x's rope_scaling is the global layers' only: the local ones never scale.
    let local_block = c.rope_parameters.as_ref().and_then(|p| p.for_layer_type("sliding_attention"));
    let global_block = super::rope_block(&c.rope_parameters, &c.rope_scaling, "full_attention");
    let global = super::rope(raw, global_block, c.rope_theta.unwrap_or(1e6), d, c.max_position_embeddings, None)?;
    let local = super::rope(raw, local_block, c.rope_local_base_freq.unwrap_or(1e4), d, c.max_position_embeddings, None)?;
    Ok(ModelConfig {
        model_type: "gemma3_text",
        names: &NAMES,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: d,
        max_position_embeddings: c.max_position_embeddings,
        norm: NormKind::Rms { eps: c.rms_norm_eps, unit_offset: true },
        positions: Positions::Rope(vec![global, local]),
        attention: AttentionConfig {
            qkv: QkvLayout::Separate,
            qkv_bias: c.attention_bias,
            o_bias: c.attention_bias,
            qk_norm: true,
            scale: c.query_pre_attn_scalar.powf(-0.5),
            softcap: c.attn_logit_softcapping,
        },
        mlp: MlpConfig { kind: MlpKind::Gated, act, bias: false },
        residual: Residual::Sandwich,
        layers: sliding
            .iter()
            .map(|&s| if s { LayerConfig { window: Some(c.sliding_window), rope: 1 } } else { LayerConfig { window: None, rope: 0 } })
            .collect(),
        layout: WeightLayout::OutIn,
        embed_scale: Some((c.hidden_size as f64).sqrt()),
        final_softcap: c.final_logit_softcapping,
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: super::first_id(&c.bos_token_id),
        eos_token_ids: super::all_ids(&c.eos_token_id),
    })
}

/// Reads a Gemma 3 text config.json (`model_type: gemma3_text`).
pub fn config(raw: &RawConfig) -> Result<ModelConfig> {
    network(raw, &raw.parse()?)
}

/// The multimodal Gemma 3 (4B and up, `Gemma3ForConditionalGeneration`) keeps its language
/// model under another prefix next to a vision tower; tune refuses it rather than guess.
pub fn config_multimodal(raw: &RawConfig) -> Result<ModelConfig> {
    Err(Error::Unsupported(format!(
        "{}: model_type `gemma3` is the multimodal Gemma 3 (4B and up, with a vision tower); tune trains the \
         text-only checkpoints (model_type `gemma3_text`: Gemma 3 270M and 1B). Extract the text tower into a \
         `Gemma3ForCausalLM` checkpoint first",
        raw.path.display()
    )))
}

/// llama.cpp's GEMMA3 architecture (`Gemma3Model` in convert_hf_to_gguf.py): norms written as
/// 1 + w, the embedding cut to the tokenizer's rows, no lm_head.
pub const GGUF: super::Gguf = super::Gguf {
    arch: "gemma3",
    permute_qk: false,
    norm_plus_one: true,
    trim_embeddings: true,
    skip_lm_head: true,
    file_type: true,
    hparams: gguf_hparams,
    vocab: super::GgufVocab::SentencePieceOrBpe,
    tokenizer_quirks: super::no_space_prefix,
};

/// TextModel's keys, then Gemma3Model's: the soft-cap when set, and the window unless every
/// layer is global.
fn gguf_hparams(_: &RawConfig, c: &ModelConfig) -> Vec<(&'static str, crate::gguf::Value)> {
    let mut v = super::gguf_text_hparams(c, true);
    if let Some(cap) = c.final_softcap.filter(|cap| *cap != 0.0) {
        v.push(("final_logit_softcapping", crate::gguf::Value::F32(cap as f32)));
    }
    if let Some(w) = c.layers.iter().find_map(|l| l.window) {
        v.push(("attention.sliding_window", crate::gguf::Value::U32(w as u32)));
    }
    v
}
