//! BLOOM (BigScience, 2022), as transformers' `modeling_bloom.py` computes it.
//!
//! LayerNorm (bias) pre-LN blocks, with one more LayerNorm right after the embedding; no
//! position embedding: ALiBi adds −mₕ·(i − j) to head h's score of query i for key j, with
//! slopes mₕ from the head count; q, k and v from one `query_key_value` laid out per head, as
//! GPT-NeoX; a tanh-GELU MLP; the head tied to the embeddings.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::hf::config::{RawConfig, TokenIds};
use crate::model::config::*;

/// The module paths of `BloomForCausalLM`.
pub const NAMES: Names = Names {
    embed_tokens: "transformer.word_embeddings",
    embed_positions: None,
    embed_norm: Some("transformer.word_embeddings_layernorm"),
    layers: "transformer.h",
    attn_norm: "input_layernorm",
    attn_out_norm: None,
    mlp_norm: "post_attention_layernorm",
    mlp_out_norm: None,
    qkv: QkvNames::Fused("self_attention.query_key_value"),
    o_proj: "self_attention.dense",
    q_norm: "",
    k_norm: "",
    mlp: MlpNames::Plain { up: "mlp.dense_h_to_4h", down: "mlp.dense_4h_to_h" },
    final_norm: "transformer.ln_f",
    lm_head: "lm_head",
    // bigscience's checkpoints were saved from BloomModel, without `transformer.`.
    optional_prefix: Some("transformer."),
};

/// `BloomConfig`'s fields that shape the network (transformers' names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct BloomConfig {
    pub vocab_size: usize,
    #[serde(alias = "n_embed")]
    pub hidden_size: usize,
    #[serde(alias = "num_hidden_layers")]
    pub n_layer: usize,
    #[serde(alias = "num_attention_heads")]
    pub n_head: usize,
    #[serde(default = "super::defaults::eps_1e5")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    #[serde(default = "super::defaults::yes")]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}

/// Reads a BLOOM config.json.
pub fn config(raw: &RawConfig) -> Result<ModelConfig> {
    let c: BloomConfig = raw.parse()?;
    if c.apply_residual_connection_post_layernorm {
        return Err(Error::Unsupported(format!("{}: apply_residual_connection_post_layernorm: true is not supported", raw.path.display())));
    }
    let (heads, kv, d) = super::heads(raw, c.hidden_size, c.n_head, None, None)?;
    Ok(ModelConfig {
        model_type: "bloom",
        names: &NAMES,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: 4 * c.hidden_size,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: d,
        // ALiBi has no table and so no limit.
        max_position_embeddings: usize::MAX,
        norm: NormKind::Layer { eps: c.layer_norm_epsilon },
        positions: Positions::Alibi,
        attention: AttentionConfig {
            qkv: QkvLayout::FusedPerHead,
            qkv_bias: true,
            o_bias: true,
            qk_norm: false,
            scale: 1.0 / (d as f64).sqrt(),
            softcap: None,
        },
        mlp: MlpConfig { kind: MlpKind::Plain, act: Activation::GeluTanh, bias: true },
        residual: Residual::Sequential,
        layers: vec![LayerConfig { window: None, rope: 0 }; c.n_layer],
        layout: WeightLayout::OutIn,
        embed_scale: None,
        final_softcap: None,
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: super::first_id(&c.bos_token_id),
        eos_token_ids: super::all_ids(&c.eos_token_id),
    })
}

/// llama.cpp's BLOOM architecture (`BloomModel`): q, k, v regrouped as GPT-NeoX's.
pub const GGUF: super::Gguf = super::Gguf {
    arch: "bloom",
    permute_qk: false,
    norm_plus_one: false,
    trim_embeddings: false,
    skip_lm_head: false,
    file_type: true,
    hparams: |raw, c| {
        use crate::gguf::Value::{F32, U32};
        let NormKind::Layer { eps } = c.norm else { unreachable!("BLOOM uses LayerNorm") };
        // The converter's context: `seq_length` when the config has one, else n_embed.
        let ctx = raw.value.get("seq_length").and_then(serde_json::Value::as_u64).unwrap_or(c.hidden_size as u64);
        vec![
            ("context_length", U32(ctx as u32)),
            ("embedding_length", U32(c.hidden_size as u32)),
            ("feed_forward_length", U32(4 * c.hidden_size as u32)),
            ("block_count", U32(c.num_hidden_layers() as u32)),
            ("attention.head_count", U32(c.num_attention_heads as u32)),
            ("attention.head_count_kv", U32(c.num_attention_heads as u32)),
            ("attention.layer_norm_epsilon", F32(eps as f32)),
        ]
    },
    vocab: super::GgufVocab::Bpe,
    tokenizer_quirks: super::no_quirks,
};
