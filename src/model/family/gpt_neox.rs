//! GPT-NeoX (Black et al., 2022) and Pythia, as transformers' `modeling_gpt_neox.py` computes
//! them.
//!
//! LayerNorm (bias) blocks with a parallel residual, x + attn(ln₁(x)) + mlp(ln₂(x)) (or the
//! sequential form when `use_parallel_residual` is false); q, k and v from one
//! `query_key_value` whose output is laid out per head, [q | k | v] for each head in turn;
//! rotary embeddings on the first `rotary_pct` (¼) of each head; an exact-GELU MLP; an untied
//! head `embed_out`.

use serde::Deserialize;

use crate::error::Result;
use crate::hf::config::{RawConfig, RopeParameters, RopeParametersField, TokenIds};
use crate::model::config::*;

/// The module paths of `GPTNeoXForCausalLM`.
pub const NAMES: Names = Names {
    embed_tokens: "gpt_neox.embed_in",
    embed_positions: None,
    embed_norm: None,
    layers: "gpt_neox.layers",
    attn_norm: "input_layernorm",
    attn_out_norm: None,
    mlp_norm: "post_attention_layernorm",
    mlp_out_norm: None,
    qkv: QkvNames::Fused("attention.query_key_value"),
    o_proj: "attention.dense",
    q_norm: "",
    k_norm: "",
    mlp: MlpNames::Plain { up: "mlp.dense_h_to_4h", down: "mlp.dense_4h_to_h" },
    final_norm: "gpt_neox.final_layer_norm",
    lm_head: "embed_out",
    optional_prefix: None,
};

/// `GPTNeoXConfig`'s fields that shape the network (transformers' names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct GptNeoXConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// 4.x: the rotated fraction of each head (5.x: `partial_rotary_factor`).
    #[serde(alias = "partial_rotary_factor")]
    pub rotary_pct: Option<f64>,
    /// 4.x: the rotary base (5.x: in `rope_parameters`).
    #[serde(alias = "rope_theta")]
    pub rotary_emb_base: Option<f64>,
    pub rope_scaling: Option<RopeParameters>,
    pub rope_parameters: Option<RopeParametersField>,
    #[serde(default = "positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "super::defaults::eps_1e5")]
    pub layer_norm_eps: f64,
    #[serde(default = "super::defaults::yes")]
    pub use_parallel_residual: bool,
    #[serde(default = "super::defaults::yes")]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}

fn gelu() -> String {
    "gelu".into()
}
fn positions() -> usize {
    2048
}

/// Reads a GPT-NeoX config.json.
pub fn config(raw: &RawConfig) -> Result<ModelConfig> {
    let c: GptNeoXConfig = raw.parse()?;
    let (heads, kv, d) = super::heads(raw, c.hidden_size, c.num_attention_heads, None, None)?;
    let act = super::activation(raw, "hidden_act", &c.hidden_act)?;
    let block = super::rope_block(&c.rope_parameters, &c.rope_scaling, "full_attention");
    let fraction = c.rotary_pct.or(block.and_then(|b| b.partial_rotary_factor)).unwrap_or(0.25);
    let rotary_dim = (d as f64 * fraction) as usize;
    let rope = super::rope(raw, block, c.rotary_emb_base.unwrap_or(10_000.0), rotary_dim, c.max_position_embeddings, None)?;
    Ok(ModelConfig {
        model_type: "gpt_neox",
        names: &NAMES,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: d,
        max_position_embeddings: c.max_position_embeddings,
        norm: NormKind::Layer { eps: c.layer_norm_eps },
        positions: Positions::Rope(vec![rope]),
        attention: AttentionConfig {
            qkv: QkvLayout::FusedPerHead,
            qkv_bias: c.attention_bias,
            o_bias: c.attention_bias,
            qk_norm: false,
            scale: 1.0 / (d as f64).sqrt(),
            softcap: None,
        },
        mlp: MlpConfig { kind: MlpKind::Plain, act, bias: true },
        residual: if c.use_parallel_residual { Residual::Parallel } else { Residual::Sequential },
        layers: vec![LayerConfig { window: None, rope: 0 }; c.num_hidden_layers],
        layout: WeightLayout::OutIn,
        embed_scale: None,
        final_softcap: None,
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: super::first_id(&c.bos_token_id),
        eos_token_ids: super::all_ids(&c.eos_token_id),
    })
}

/// llama.cpp's GPTNEOX architecture (`GPTNeoXModel`): q, k, v regrouped from per-head to
/// [all q | all k | all v] (from the layout, in `export::gguf`); no general.file_type.
pub const GGUF: super::Gguf = super::Gguf {
    arch: "gptneox",
    permute_qk: false,
    norm_plus_one: false,
    trim_embeddings: false,
    skip_lm_head: false,
    file_type: false,
    hparams: |_, c| {
        use crate::gguf::Value::{Bool, F32, U32};
        let NormKind::Layer { eps } = c.norm else { unreachable!("GPT-NeoX uses LayerNorm") };
        let Positions::Rope(t) = &c.positions else { unreachable!("GPT-NeoX uses rotary positions") };
        vec![
            ("context_length", U32(c.max_position_embeddings as u32)),
            ("embedding_length", U32(c.hidden_size as u32)),
            ("block_count", U32(c.num_hidden_layers() as u32)),
            ("feed_forward_length", U32(c.intermediate_size as u32)),
            ("rope.dimension_count", U32(t[0].rotary_dim as u32)),
            ("attention.head_count", U32(c.num_attention_heads as u32)),
            ("use_parallel_residual", Bool(c.residual == Residual::Parallel)),
            ("attention.layer_norm_epsilon", F32(eps as f32)),
        ]
    },
    vocab: super::GgufVocab::Bpe,
    tokenizer_quirks: super::no_quirks,
};
