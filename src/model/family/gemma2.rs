//! Gemma 2 (Gemma Team, 2024), as transformers' `modeling_gemma2.py` computes it: Gemma 3's
//! block (four (1 + w) RMSNorms, scaled embeddings, GeGLU, query_pre_attn_scalar) without q/k
//! norms and with one rotary base, plus soft-capping of the attention scores
//! (cap·tanh(s / cap), cap 50) and of the final logits (cap 30); layers alternate between a
//! sliding window (first) and full attention.

use serde::Deserialize;

use crate::error::Result;
use crate::hf::config::{RawConfig, RopeParameters, RopeParametersField, TokenIds};
use crate::model::config::*;

/// `Gemma2Config`'s fields that shape the network (transformers' names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma2Config {
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
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeParameters>,
    pub rope_parameters: Option<RopeParametersField>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "super::defaults::scalar_256")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "super::defaults::window_4096")]
    pub sliding_window: usize,
    pub layer_types: Option<Vec<String>>,
    /// A JSON null turns soft-capping off.
    #[serde(default = "cap_30")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default = "cap_50")]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default = "super::defaults::yes")]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}
fn max_positions() -> usize {
    8192
}
fn cap_30() -> Option<f64> {
    Some(30.0)
}
fn cap_50() -> Option<f64> {
    Some(50.0)
}

/// Reads a Gemma 2 config.json.
pub fn config(raw: &RawConfig) -> Result<ModelConfig> {
    let c: Gemma2Config = raw.parse()?;
    let (heads, kv, d) = super::heads(raw, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, Some(c.head_dim))?;
    let act = super::activation(raw, "hidden_activation", &c.hidden_activation)?;
    // Even layers (0, 2, …) slide, as transformers' default layer_types.
    let sliding = super::gemma3::layer_types(raw, &c.layer_types, c.num_hidden_layers, |i| i % 2 == 0)?;
    let block = super::rope_block(&c.rope_parameters, &c.rope_scaling, "full_attention");
    let rope = super::rope(raw, block, c.rope_theta.unwrap_or(10_000.0), d, c.max_position_embeddings, None)?;
    Ok(ModelConfig {
        model_type: "gemma2",
        names: &super::gemma3::NAMES,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: d,
        max_position_embeddings: c.max_position_embeddings,
        norm: NormKind::Rms { eps: c.rms_norm_eps, unit_offset: true },
        positions: Positions::Rope(vec![rope]),
        attention: AttentionConfig {
            qkv: QkvLayout::Separate,
            qkv_bias: c.attention_bias,
            o_bias: c.attention_bias,
            qk_norm: false,
            scale: c.query_pre_attn_scalar.powf(-0.5),
            softcap: c.attn_logit_softcapping,
        },
        mlp: MlpConfig { kind: MlpKind::Gated, act, bias: false },
        residual: Residual::Sandwich,
        layers: sliding.iter().map(|&s| LayerConfig { window: s.then_some(c.sliding_window), rope: 0 }).collect(),
        layout: WeightLayout::OutIn,
        embed_scale: Some((c.hidden_size as f64).sqrt()),
        final_softcap: c.final_logit_softcapping,
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: super::first_id(&c.bos_token_id),
        eos_token_ids: super::all_ids(&c.eos_token_id),
    })
}

/// llama.cpp's GEMMA2 architecture (`Gemma2Model` in convert_hf_to_gguf.py): norms written as
/// 1 + w, no lm_head, the SentencePiece vocabulary.
pub const GGUF: super::Gguf = super::Gguf {
    arch: "gemma2",
    permute_qk: false,
    norm_plus_one: true,
    trim_embeddings: false,
    skip_lm_head: true,
    file_type: true,
    hparams: gguf_hparams,
    vocab: super::GgufVocab::SentencePiece,
    tokenizer_quirks: super::no_space_prefix,
};

/// Gemma2Model's own keys (it does not start from TextModel's: no rotary base is written,
/// llama.cpp assumes 10⁴), then both soft-caps and the window.
fn gguf_hparams(_: &RawConfig, c: &ModelConfig) -> Vec<(&'static str, crate::gguf::Value)> {
    use crate::gguf::Value::{F32, U32};
    let eps = match c.norm {
        NormKind::Rms { eps, .. } | NormKind::Layer { eps } => eps,
    };
    let mut v = vec![
        ("context_length", U32(c.max_position_embeddings as u32)),
        ("embedding_length", U32(c.hidden_size as u32)),
        ("block_count", U32(c.num_hidden_layers() as u32)),
        ("feed_forward_length", U32(c.intermediate_size as u32)),
        ("attention.head_count", U32(c.num_attention_heads as u32)),
        ("attention.head_count_kv", U32(c.num_key_value_heads as u32)),
        ("attention.layer_norm_rms_epsilon", F32(eps as f32)),
        ("attention.key_length", U32(c.head_dim as u32)),
        ("attention.value_length", U32(c.head_dim as u32)),
    ];
    if let Some(cap) = c.attention.softcap {
        v.push(("attn_logit_softcapping", F32(cap as f32)));
    }
    if let Some(cap) = c.final_softcap {
        v.push(("final_logit_softcapping", F32(cap as f32)));
    }
    if let Some(w) = c.layers.iter().find_map(|l| l.window) {
        v.push(("attention.sliding_window", U32(w as u32)));
    }
    v
}
