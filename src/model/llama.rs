//! The Llama decoder (Touvron et al., 2023), as transformers' `modeling_llama.py` computes it.
//!
//! Pre-norm transformer: each layer is x + attn(rms_norm(x)) then x + mlp(rms_norm(x)); attention
//! is grouped-query with rotary positions; the MLP is SwiGLU. Mistral, Qwen2 and Qwen3 are this
//! same network with a switch or two (sliding window, q/k/v bias, per-head q/k norm), so they
//! reuse it: see their files for what differs.

use crate::backend::Backend;
use burn::tensor::module::embedding;
use burn::tensor::{DType, Int, Tensor};

use super::layers::{apply_rope, scaled_dot_product_attention, AttentionMask, Projection, RmsNorm, Rope, RopeTables};
use super::loader::Loader;
use super::ModelConfig;
use crate::error::Result;
use crate::ops::{float, prim};

/// HF's tensor names for the Llama layout, shared by Mistral, Qwen2 and Qwen3.
pub const NAMES: super::WeightNames = super::WeightNames {
    embed_tokens: "model.embed_tokens",
    layers: "model.layers",
    input_layernorm: "input_layernorm",
    q_proj: "self_attn.q_proj",
    k_proj: "self_attn.k_proj",
    v_proj: "self_attn.v_proj",
    o_proj: "self_attn.o_proj",
    q_norm: "self_attn.q_norm",
    k_norm: "self_attn.k_norm",
    post_attention_layernorm: "post_attention_layernorm",
    gate_proj: "mlp.gate_proj",
    up_proj: "mlp.up_proj",
    down_proj: "mlp.down_proj",
    norm: "model.norm",
    lm_head: "lm_head",
};

/// Keys and values of the positions seen so far, one entry per layer, `[b, t, kv_heads, d]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct Attention<B: Backend> {
    pub q_proj: Projection<B>,
    pub k_proj: Projection<B>,
    pub v_proj: Projection<B>,
    pub o_proj: Projection<B>,
    /// Qwen3 normalises each head of q and k before RoPE.
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// `x` is `[b·s, hidden]`, `b` rows of `s` positions each.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        b: usize,
        rope: &RopeTables<B>,
        mask: &AttentionMask<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 2> {
        let s = x.dims()[0] / b;
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);

        // [b·s, heads·d] -> [b, s, heads, d]
        let q = self.q_proj.forward(x.clone()).reshape([b, s, h, d]);
        let k = self.k_proj.forward(x.clone()).reshape([b, s, kv, d]);
        let v = self.v_proj.forward(x).reshape([b, s, kv, d]);
        let q = match &self.q_norm {
            Some(norm) => norm.forward(q),
            None => q,
        };
        let k = match &self.k_norm {
            Some(norm) => norm.forward(k),
            None => k,
        };

        // Rotate by position.
        let q = apply_rope(q, rope);
        let mut k = apply_rope(k, rope);
        let mut v = v;

        if let Some(slot) = cache {
            if let Some((past_k, past_v)) = slot.take() {
                k = Tensor::cat(vec![past_k, k], 1);
                v = Tensor::cat(vec![past_v, v], 1);
            }
            *slot = Some((k.clone(), v.clone()));
        }

        // Grouped-query attention: each kv head serves h / kv query heads.
        let out = scaled_dot_product_attention(q, k, v, mask);

        // [b, s, h, d] -> [b·s, h·d]
        self.o_proj.forward(out.reshape([b * s, h * d]))
    }
}

/// SwiGLU feed-forward (Shazeer, 2020): down(silu(gate(x)) · up(x)).
#[derive(Debug, Clone)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Projection<B>,
    pub up_proj: Projection<B>,
    pub down_proj: Projection<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let gate = self.gate_proj.forward(x.clone());
        let up = self.up_proj.forward(x);
        self.down_proj.forward(float(B::fused_swiglu(prim(gate), prim(up))))
    }
}

#[derive(Debug, Clone)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// `x` is the residual stream, `[b·s, hidden]`.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        b: usize,
        rope: &RopeTables<B>,
        mask: &AttentionMask<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 2> {
        let h = x.clone() + self.self_attn.forward(self.input_layernorm.forward(x), b, rope, mask, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }

    /// The layer's projections in a fixed order: q k v o gate up down.
    pub fn projections(&self) -> [&Projection<B>; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }

    pub fn projections_mut(&mut self) -> [&mut Projection<B>; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
    }
}

/// The whole causal language model: embeddings, decoder layers, final norm, lm_head.
#[derive(Debug, Clone)]
pub struct Llama<B: Backend> {
    pub config: ModelConfig,
    /// [vocab, hidden]
    pub embed_tokens: Tensor<B, 2>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// [hidden, vocab]; None when tied to the embeddings.
    pub lm_head: Option<Tensor<B, 2>>,
    pub rope: Rope,
}

impl<B: Backend> Llama<B> {
    pub fn load(config: ModelConfig, loader: &Loader<B>) -> Result<Self> {
        let c = &config;
        let names = c.names;
        let (hidden, d) = (c.hidden_size, c.head_dim);
        let norm = |name: &str, n: usize| -> Result<RmsNorm<B>> {
            Ok(RmsNorm {
                weight: loader.vector(&format!("{name}.weight"), n)?,
                eps: c.rms_norm_eps,
            })
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("{}.{i}", names.layers);
            let at = |n: &str| format!("{p}.{n}");
            let self_attn = Attention {
                q_proj: loader.projection(&at(names.q_proj), hidden, c.num_attention_heads * d, c.qkv_bias)?,
                k_proj: loader.projection(&at(names.k_proj), hidden, c.num_key_value_heads * d, c.qkv_bias)?,
                v_proj: loader.projection(&at(names.v_proj), hidden, c.num_key_value_heads * d, c.qkv_bias)?,
                o_proj: loader.projection(&at(names.o_proj), c.num_attention_heads * d, hidden, c.o_bias)?,
                q_norm: c.qk_norm.then(|| norm(&at(names.q_norm), d)).transpose()?,
                k_norm: c.qk_norm.then(|| norm(&at(names.k_norm), d)).transpose()?,
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: d,
            };
            let mlp = Mlp {
                gate_proj: loader.projection(&at(names.gate_proj), hidden, c.intermediate_size, c.mlp_bias)?,
                up_proj: loader.projection(&at(names.up_proj), hidden, c.intermediate_size, c.mlp_bias)?,
                down_proj: loader.projection(&at(names.down_proj), c.intermediate_size, hidden, c.mlp_bias)?,
            };
            layers.push(DecoderLayer {
                input_layernorm: norm(&at(names.input_layernorm), hidden)?,
                self_attn,
                post_attention_layernorm: norm(&at(names.post_attention_layernorm), hidden)?,
                mlp,
            });
        }
        let embed_tokens = loader.matrix(&format!("{}.weight", names.embed_tokens), c.vocab_size, hidden)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(loader.projection(names.lm_head, hidden, c.vocab_size, false)?.weight)
        };
        Ok(Llama {
            embed_tokens,
            layers,
            norm: norm(names.norm, hidden)?,
            lm_head,
            rope: Rope::new(d, c.rope_theta, &c.rope_scaling),
            config,
        })
    }

    /// Hidden states after the final norm, `[b, s, hidden]`, for token ids `[b, s]` at the given
    /// positions (`b × s`, row-major). With a cache, keys and values are appended to it.
    pub fn forward_hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        positions: &[usize],
        mask: &AttentionMask<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        let rope = self.rope.tables::<B>(positions, b, &input_ids.device());
        let mut x = self.embed(input_ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, b, &rope, mask, slot);
        }
        self.norm.forward(x).reshape([b, s, self.config.hidden_size])
    }

    /// The residual stream's start, `[b·s, hidden]` in f32, for token ids `[b, s]`.
    ///
    /// The stream is kept 2-D: every projection is then one matmul (not b batched ones), and
    /// its backward uses the weight in place, where a 3-D input makes burn reshape, and so
    /// copy, the transposed weight.
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, s] = input_ids.dims();
        let x = embedding(self.embed_tokens.clone(), input_ids).reshape([b * s, self.config.hidden_size]);
        // A bf16 base keeps the residual stream in f32.
        if x.dtype() != DType::F32 {
            x.cast(DType::F32)
        } else {
            x
        }
    }

    /// Logits `[.., vocab]` for hidden states `[.., hidden]`.
    pub fn lm_head<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        super::layers::linear_in_weight_dtype(hidden, self.lm_head_weight(), None)
    }

    /// The output projection as [hidden, vocab]: lm_head, or the embedding when tied.
    pub fn lm_head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(w) => w.clone(),
            None => self.embed_tokens.clone().transpose(),
        }
    }

    /// Every projection, in a fixed order (layer by layer, q k v o gate up down).
    pub fn projections_mut(&mut self) -> Vec<&mut Projection<B>> {
        self.layers.iter_mut().flat_map(DecoderLayer::projections_mut).collect()
    }

    pub fn projections(&self) -> Vec<&Projection<B>> {
        self.layers.iter().flat_map(DecoderLayer::projections).collect()
    }
}

/// Reads a Llama config.json. Defaults are `LlamaConfig`'s.
pub fn config(hf: &crate::hf::HfConfig) -> Result<ModelConfig> {
    let mut c = ModelConfig::common(hf, super::Family::Llama, &NAMES)?;
    c.qkv_bias = hf.attention_bias.unwrap_or(false);
    c.o_bias = c.qkv_bias;
    Ok(c)
}
