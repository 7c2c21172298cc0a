//! Llama (Touvron et al., 2023), as transformers' `modeling_llama.py` computes it: pre-norm
//! blocks x + attn(rms_norm(x)), x + mlp(rms_norm(x)); grouped-query attention with rotary
//! positions (rotate_half layout); a SwiGLU MLP. Mistral, Qwen2 and Qwen3 are this network with
//! a switch or two, written as the diff from it in their own files.

use serde::Deserialize;

use crate::error::Result;
use crate::hf::config::{RawConfig, RopeParameters, RopeParametersField, TokenIds};
use crate::model::config::*;

/// The module paths of `LlamaForCausalLM`, shared by Mistral, Qwen2, Qwen3 and Gemma.
pub const NAMES: Names = Names {
    embed_tokens: "model.embed_tokens",
    embed_positions: None,
    embed_norm: None,
    layers: "model.layers",
    attn_norm: "input_layernorm",
    attn_out_norm: None,
    mlp_norm: "post_attention_layernorm",
    mlp_out_norm: None,
    qkv: QkvNames::Separate { q: "self_attn.q_proj", k: "self_attn.k_proj", v: "self_attn.v_proj" },
    o_proj: "self_attn.o_proj",
    q_norm: "self_attn.q_norm",
    k_norm: "self_attn.k_norm",
    mlp: MlpNames::Gated { gate: "mlp.gate_proj", up: "mlp.up_proj", down: "mlp.down_proj" },
    final_norm: "model.norm",
    lm_head: "lm_head",
    optional_prefix: None,
};

/// `LlamaConfig`'s fields that shape the network (transformers' names and defaults); Mistral,
/// Qwen2 and Qwen3 configs are read with it too.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention; defaults to num_attention_heads (plain multi-head).
    pub num_key_value_heads: Option<usize>,
    /// Per-head size when it is not hidden_size / num_attention_heads (Qwen3).
    pub head_dim: Option<usize>,
    #[serde(default = "super::defaults::silu")]
    pub hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "super::defaults::eps_1e6")]
    pub rms_norm_eps: f64,
    /// transformers 4.x: the rotary base at the top level, scaling in `rope_scaling`.
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5.x: base and scaling together.
    pub rope_parameters: Option<RopeParametersField>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v and o (Llama, Qwen3).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral v0.1's sliding window; null from v0.2 on.
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: whether sliding_window is used at all.
    pub use_sliding_window: Option<bool>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}

fn default_max_positions() -> usize {
    2048
}

/// The Llama network for a config: the other Llama-like families start from this.
pub fn network(raw: &RawConfig, c: &LlamaConfig, family: &'static str) -> Result<ModelConfig> {
    let (heads, kv, head_dim) = super::heads(raw, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)?;
    let act = super::activation(raw, "hidden_act", &c.hidden_act)?;
    if act != Activation::Silu {
        return Err(crate::Error::Unsupported(format!(
            "{}: hidden_act `{}` is not supported for {family} (expected silu)",
            raw.path.display(),
            c.hidden_act
        )));
    }
    let theta = c.rope_theta.unwrap_or(10_000.0);
    let rope = super::rope(
        raw,
        super::rope_block(&c.rope_parameters, &c.rope_scaling, "full_attention"),
        theta,
        head_dim,
        c.max_position_embeddings,
        None,
    )?;
    Ok(ModelConfig {
        model_type: family,
        names: &NAMES,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        max_position_embeddings: c.max_position_embeddings,
        norm: NormKind::Rms { eps: c.rms_norm_eps, unit_offset: false },
        positions: Positions::Rope(vec![rope]),
        attention: AttentionConfig {
            qkv: QkvLayout::Separate,
            qkv_bias: c.attention_bias,
            o_bias: c.attention_bias,
            qk_norm: false,
            scale: 1.0 / (head_dim as f64).sqrt(),
            softcap: None,
        },
        mlp: MlpConfig { kind: MlpKind::Gated, act, bias: c.mlp_bias },
        residual: Residual::Sequential,
        layers: vec![LayerConfig { window: None, rope: 0 }; c.num_hidden_layers],
        layout: WeightLayout::OutIn,
        embed_scale: None,
        final_softcap: None,
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: super::first_id(&c.bos_token_id),
        eos_token_ids: super::all_ids(&c.eos_token_id),
    })
}

/// Reads a Llama config.json.
pub fn config(raw: &RawConfig) -> Result<ModelConfig> {
    network(raw, &raw.parse()?, "llama")
}

/// llama.cpp's LLAMA architecture (`LlamaModel` in convert_hf_to_gguf.py).
pub const GGUF: super::Gguf = super::Gguf {
    arch: "llama",
    permute_qk: true,
    norm_plus_one: false,
    trim_embeddings: false,
    skip_lm_head: false,
    file_type: true,
    hparams: gguf_hparams,
    vocab: super::GgufVocab::SentencePieceOrBpe,
    tokenizer_quirks: gguf_tokenizer_quirks,
};

/// TextModel's keys, then LlamaModel's vocab_size and rope.dimension_count.
pub(crate) fn gguf_hparams(_: &RawConfig, c: &ModelConfig) -> Vec<(&'static str, crate::gguf::Value)> {
    let mut v = super::gguf_text_hparams(c, true);
    v.push(("vocab_size", crate::gguf::Value::U32(c.vocab_size as u32)));
    v.push(("rope.dimension_count", crate::gguf::Value::U32(c.head_dim as u32)));
    v
}

/// LlamaModel.set_vocab: tokenizer_config's add_prefix_space becomes add_space_prefix, and a
/// 49152-token vocabulary (the converter's test for Granite's small models, which SmolLM's
/// matches too) gets add_bos_token false.
pub(crate) fn gguf_tokenizer_quirks(
    c: &ModelConfig,
    tokenizer_config: &serde_json::Value,
    _: bool,
) -> Vec<(&'static str, crate::gguf::Value)> {
    let mut v = Vec::new();
    if let Some(b) = tokenizer_config.get("add_prefix_space").and_then(serde_json::Value::as_bool) {
        v.push(("tokenizer.ggml.add_space_prefix", crate::gguf::Value::Bool(b)));
    }
    if c.vocab_size == 49152 {
        v.push(("tokenizer.ggml.add_bos_token", crate::gguf::Value::Bool(false)));
    }
    v
}
