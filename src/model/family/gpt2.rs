//! GPT-2 (Radford et al., 2019), as transformers' `modeling_gpt2.py` computes it.
//!
//! Pre-LN blocks x + attn(ln_1(x)), x + mlp(ln_2(x)) with LayerNorm (bias); learned absolute
//! positions added to the token embeddings; q, k and v from one `c_attn` ([q | k | v]); a plain
//! GELU (tanh form, `gelu_new`) MLP; the head tied to the embeddings. Its linear layers are
//! `Conv1D`s, stored `[in, out]`, which tune keeps as stored (and its adapters say
//! `fan_in_fan_out: true`, as PEFT's do).
//!
//! The config's dropout probabilities (`resid_pdrop`, `embd_pdrop`, `attn_pdrop`) are not
//! applied in training: tune trains with LoRA dropout only (`lora.dropout`).

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::hf::config::{RawConfig, TokenIds};
use crate::model::config::*;

/// The module paths of `GPT2LMHeadModel`.
pub const NAMES: Names = Names {
    embed_tokens: "transformer.wte",
    embed_positions: Some("transformer.wpe"),
    embed_norm: None,
    layers: "transformer.h",
    attn_norm: "ln_1",
    attn_out_norm: None,
    mlp_norm: "ln_2",
    mlp_out_norm: None,
    qkv: QkvNames::Fused("attn.c_attn"),
    o_proj: "attn.c_proj",
    q_norm: "",
    k_norm: "",
    mlp: MlpNames::Plain { up: "mlp.c_fc", down: "mlp.c_proj" },
    final_norm: "transformer.ln_f",
    lm_head: "lm_head",
    // The original GPT-2 checkpoints were saved from GPT2Model, without `transformer.`.
    optional_prefix: Some("transformer."),
};

/// `GPT2Config`'s fields that shape the network (transformers' names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    #[serde(default = "vocab")]
    pub vocab_size: usize,
    #[serde(default = "positions")]
    pub n_positions: usize,
    #[serde(default = "embd")]
    pub n_embd: usize,
    #[serde(default = "layers")]
    pub n_layer: usize,
    #[serde(default = "heads")]
    pub n_head: usize,
    /// The MLP width; 4·n_embd when null.
    pub n_inner: Option<usize>,
    #[serde(default = "gelu_new")]
    pub activation_function: String,
    #[serde(default = "super::defaults::eps_1e5")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "super::defaults::yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub add_cross_attention: bool,
    #[serde(default = "super::defaults::yes")]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}

fn vocab() -> usize {
    50257
}
fn positions() -> usize {
    1024
}
fn embd() -> usize {
    768
}
fn layers() -> usize {
    12
}
fn heads() -> usize {
    12
}
fn gelu_new() -> String {
    "gelu_new".into()
}

/// Reads a GPT-2 config.json.
pub fn config(raw: &RawConfig) -> Result<ModelConfig> {
    let c: Gpt2Config = raw.parse()?;
    for (on, key) in
        [(c.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx"), (c.add_cross_attention, "add_cross_attention")]
    {
        if on {
            return Err(Error::Unsupported(format!("{}: {key}: true is not supported", raw.path.display())));
        }
    }
    let (heads, kv, d) = super::heads(raw, c.n_embd, c.n_head, None, None)?;
    let act = super::activation(raw, "activation_function", &c.activation_function)?;
    Ok(ModelConfig {
        model_type: "gpt2",
        names: &NAMES,
        vocab_size: c.vocab_size,
        hidden_size: c.n_embd,
        intermediate_size: c.n_inner.unwrap_or(4 * c.n_embd),
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: d,
        max_position_embeddings: c.n_positions,
        norm: NormKind::Layer { eps: c.layer_norm_epsilon },
        positions: Positions::Learned,
        attention: AttentionConfig {
            qkv: QkvLayout::Fused,
            qkv_bias: true,
            o_bias: true,
            qk_norm: false,
            scale: if c.scale_attn_weights { 1.0 / (d as f64).sqrt() } else { 1.0 },
            softcap: None,
        },
        mlp: MlpConfig { kind: MlpKind::Plain, act, bias: true },
        residual: Residual::Sequential,
        layers: vec![LayerConfig { window: None, rope: 0 }; c.n_layer],
        layout: WeightLayout::InOut,
        embed_scale: None,
        final_softcap: None,
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: super::first_id(&c.bos_token_id),
        eos_token_ids: super::all_ids(&c.eos_token_id),
    })
}

/// llama.cpp's GPT2 architecture (`GPT2Model`): its own short key list; Conv1D weights are
/// transposed to [out, in] (from the layout, in `export::gguf`).
pub const GGUF: super::Gguf = super::Gguf {
    arch: "gpt2",
    permute_qk: false,
    norm_plus_one: false,
    trim_embeddings: false,
    skip_lm_head: false,
    file_type: true,
    hparams: |_, c| {
        use crate::gguf::Value::{F32, U32};
        let NormKind::Layer { eps } = c.norm else { unreachable!("GPT-2 uses LayerNorm") };
        vec![
            ("block_count", U32(c.num_hidden_layers() as u32)),
            ("context_length", U32(c.max_position_embeddings as u32)),
            ("embedding_length", U32(c.hidden_size as u32)),
            // 4·n_embd whatever n_inner says, as the converter writes it.
            ("feed_forward_length", U32(4 * c.hidden_size as u32)),
            ("attention.head_count", U32(c.num_attention_heads as u32)),
            ("attention.layer_norm_epsilon", F32(eps as f32)),
        ]
    },
    vocab: super::GgufVocab::Bpe,
    tokenizer_quirks: super::no_quirks,
};
