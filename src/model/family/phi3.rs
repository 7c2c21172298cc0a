//! Phi-3 (Abdin et al., 2024): Phi-3/3.5-mini and Phi-4-mini, as transformers'
//! `modeling_phi3.py` computes them.
//!
//! The Llama block with q, k and v fused into one `qkv_proj` ([all q | all k | all v]) and gate
//! and up into one `gate_up_proj` ([gate | up]); rotary embeddings on the first
//! `partial_rotary_factor` of each head (0.75 on Phi-4-mini), and LongRoPE for the 128k-context
//! models: per-frequency factors, `short_factor` up to `original_max_position_embeddings` and
//! `long_factor` past it, with cos and sin scaled by √(1 + ln(s) / ln(original)).

use serde::Deserialize;

use crate::error::Result;
use crate::hf::config::{RawConfig, RopeParameters, RopeParametersField, TokenIds};
use crate::model::config::*;

/// The module paths of `Phi3ForCausalLM`.
pub const NAMES: Names = Names {
    qkv: QkvNames::Fused("self_attn.qkv_proj"),
    mlp: MlpNames::GatedFused { gate_up: "mlp.gate_up_proj", down: "mlp.down_proj" },
    ..super::llama::NAMES
};

/// `Phi3Config`'s fields that shape the network (transformers' names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct Phi3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "super::defaults::silu")]
    pub hidden_act: String,
    #[serde(default = "positions_4096")]
    pub max_position_embeddings: usize,
    /// The pre-training context: LongRoPE switches to its long factors past it.
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default = "super::defaults::eps_1e5")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeParameters>,
    pub rope_parameters: Option<RopeParametersField>,
    /// Rotated fraction of each head.
    pub partial_rotary_factor: Option<f64>,
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}

fn positions_4096() -> usize {
    4096
}

/// Reads a Phi-3 config.json.
pub fn config(raw: &RawConfig) -> Result<ModelConfig> {
    let c: Phi3Config = raw.parse()?;
    let (heads, kv, d) = super::heads(raw, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)?;
    let act = super::activation(raw, "hidden_act", &c.hidden_act)?;
    let block = super::rope_block(&c.rope_parameters, &c.rope_scaling, "full_attention");
    let fraction = c.partial_rotary_factor.or(block.and_then(|b| b.partial_rotary_factor)).unwrap_or(1.0);
    let rotary_dim = (d as f64 * fraction) as usize;
    let rope = super::rope(
        raw,
        block,
        c.rope_theta.unwrap_or(10_000.0),
        rotary_dim,
        c.max_position_embeddings,
        c.original_max_position_embeddings,
    )?;
    Ok(ModelConfig {
        model_type: "phi3",
        names: &NAMES,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: d,
        max_position_embeddings: c.max_position_embeddings,
        norm: NormKind::Rms { eps: c.rms_norm_eps, unit_offset: false },
        positions: Positions::Rope(vec![rope]),
        attention: AttentionConfig {
            qkv: QkvLayout::Fused,
            qkv_bias: false,
            o_bias: false,
            qk_norm: false,
            scale: 1.0 / (d as f64).sqrt(),
            softcap: None,
        },
        mlp: MlpConfig { kind: MlpKind::GatedFused, act, bias: false },
        residual: Residual::Sequential,
        layers: vec![LayerConfig { window: c.sliding_window, rope: 0 }; c.num_hidden_layers],
        layout: WeightLayout::OutIn,
        embed_scale: None,
        final_softcap: None,
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: super::first_id(&c.bos_token_id),
        eos_token_ids: super::all_ids(&c.eos_token_id),
    })
}

/// llama.cpp's PHI3 architecture (`Phi3MiniModel` in convert_hf_to_gguf.py): the fused qkv
/// and gate_up tensors as stored, rotated as NeoX does (no q/k permutation); LongRoPE's
/// factors become `rope_factors_long`/`rope_factors_short` tensors (written by `export::gguf`).
pub const GGUF: super::Gguf = super::Gguf {
    arch: "phi3",
    permute_qk: false,
    norm_plus_one: false,
    trim_embeddings: false,
    skip_lm_head: false,
    file_type: true,
    hparams: gguf_hparams,
    vocab: super::GgufVocab::Phi3,
    tokenizer_quirks: super::no_quirks,
};

/// Phi3MiniModel's keys (not TextModel's): the pre-training context, the rotated dimensions,
/// a window of 0 for none, and LongRoPE's attention factor as the converter computes it.
fn gguf_hparams(raw: &RawConfig, c: &ModelConfig) -> Vec<(&'static str, crate::gguf::Value)> {
    use crate::gguf::Value::{F32, U32};
    let Positions::Rope(tables) = &c.positions else { unreachable!("Phi-3 is rotary") };
    let rope = &tables[0];
    let original = match &rope.scaling {
        RopeScaling::LongRope { original_max_position_embeddings, .. } => *original_max_position_embeddings,
        // The converter requires the key; Phi-3-mini-4k's config carries it at the top level.
        _ => ["original_max_position_embeddings"]
            .iter()
            .find_map(|k| raw.value.get(k).or_else(|| raw.value.get("rope_parameters").and_then(|p| p.get(k))))
            .and_then(serde_json::Value::as_u64)
            .map_or(c.max_position_embeddings, |v| v as usize),
    };
    let eps = match c.norm {
        NormKind::Rms { eps, .. } | NormKind::Layer { eps } => eps,
    };
    let mut v = vec![
        ("context_length", U32(c.max_position_embeddings as u32)),
        ("rope.scaling.original_context_length", U32(original as u32)),
        ("embedding_length", U32(c.hidden_size as u32)),
        ("feed_forward_length", U32(c.intermediate_size as u32)),
        ("block_count", U32(c.num_hidden_layers() as u32)),
        ("attention.head_count", U32(c.num_attention_heads as u32)),
        ("attention.head_count_kv", U32(c.num_key_value_heads as u32)),
        ("attention.layer_norm_rms_epsilon", F32(eps as f32)),
        ("rope.dimension_count", U32(rope.rotary_dim as u32)),
        ("rope.freq_base", F32(rope.theta as f32)),
        ("attention.sliding_window", U32(c.layers[0].window.unwrap_or(0) as u32)),
    ];
    if let RopeScaling::LongRope { .. } = rope.scaling {
        let scale = c.max_position_embeddings as f64 / original as f64;
        let factor = if scale > 1.0 { (1.0 + scale.ln() / (original as f64).ln()).sqrt() } else { 1.0 };
        v.push(("rope.scaling.attn_factor", F32(factor as f32)));
    }
    v
}
