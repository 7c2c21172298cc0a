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
        family: super::Family::from_model_type("phi3").expect("registered"),
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
