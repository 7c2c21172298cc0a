//! The causal language model every family is: embeddings (scaled, plus learned positions or a
//! norm where the family has them), the blocks, a final norm, and the output head (tied to the
//! embeddings or not, soft-capped or not).

use burn::tensor::module::embedding;
use burn::tensor::{DType, Int, Tensor, TensorData};

use super::blocks::attention::Qkv;
use super::blocks::{alibi_slopes, Attention, AttentionMask, Block, Context, KvSlot, Mlp, Norm, Rope};
use super::config::{MlpKind, MlpNames, ModelConfig, Positions, QkvLayout, QkvNames};
use super::linear::{linear_in_weight_dtype, Linear};
use super::loader::Loader;
use crate::backend::Backend;
use crate::error::Result;
use crate::ops::AttentionOptions;

/// Keys and values of the positions seen so far, one slot per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache<B: Backend> {
    layers: Vec<KvSlot<B>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: vec![None; num_layers] }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct CausalLm<B: Backend> {
    pub config: ModelConfig,
    /// [vocab, hidden]
    pub embed_tokens: Tensor<B, 2>,
    /// GPT-2's learned positions, [max_positions, hidden].
    pub embed_positions: Option<Tensor<B, 2>>,
    /// BLOOM's norm of the embeddings.
    pub embed_norm: Option<Norm<B>>,
    pub layers: Vec<Block<B>>,
    pub norm: Norm<B>,
    /// [hidden, vocab]; None when tied to the embeddings.
    pub lm_head: Option<Tensor<B, 2>>,
    /// One per rotary table of the config.
    pub ropes: Vec<Rope>,
}

impl<B: Backend> CausalLm<B> {
    pub fn load(config: ModelConfig, loader: &Loader<B>) -> Result<Self> {
        let c = &config;
        let names = c.names;
        let hidden = c.hidden_size;
        let norm = |name: &str, n: usize| loader.norm(name, n, c.norm);
        let ropes: Vec<Rope> = match &c.positions {
            Positions::Rope(tables) => tables.iter().map(Rope::new).collect(),
            _ => Vec::new(),
        };
        let alibi = (c.positions == Positions::Alibi).then(|| alibi_slopes(c.num_attention_heads));
        let mut layers = Vec::with_capacity(c.num_hidden_layers());
        for (i, layer) in c.layers.iter().enumerate() {
            let at = |n: &str| format!("{}.{i}.{n}", names.layers);
            let linear = |n: &str, fan_in: usize, out: usize, bias: bool| loader.linear(&at(n), fan_in, out, bias, c.layout);
            let (h, kv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
            let a = &c.attention;
            let qkv = match (names.qkv, a.qkv) {
                (QkvNames::Separate { q, k, v }, _) => Qkv::Separate {
                    q_proj: linear(q, hidden, h * d, a.qkv_bias)?,
                    k_proj: linear(k, hidden, kv * d, a.qkv_bias)?,
                    v_proj: linear(v, hidden, kv * d, a.qkv_bias)?,
                },
                (QkvNames::Fused(n), QkvLayout::FusedPerHead) => Qkv::FusedPerHead(linear(n, hidden, (h + 2 * kv) * d, a.qkv_bias)?),
                (QkvNames::Fused(n), _) => Qkv::Fused(linear(n, hidden, (h + 2 * kv) * d, a.qkv_bias)?),
            };
            let mut options = AttentionOptions::new(d);
            options.scale = a.scale;
            options.softcap = a.softcap;
            options.window = layer.window;
            options.alibi = alibi.clone();
            let attn = Attention {
                qkv,
                o_proj: linear(names.o_proj, h * d, hidden, a.o_bias)?,
                q_norm: a.qk_norm.then(|| norm(&at(names.q_norm), d)).transpose()?,
                k_norm: a.qk_norm.then(|| norm(&at(names.k_norm), d)).transpose()?,
                num_heads: h,
                num_kv_heads: kv,
                head_dim: d,
                rope: (!ropes.is_empty()).then_some(layer.rope),
                options,
            };
            let (m, inter) = (&c.mlp, c.intermediate_size);
            let mlp = match (names.mlp, m.kind) {
                (MlpNames::Gated { gate, up, down }, MlpKind::Gated) => Mlp::Gated {
                    gate_proj: linear(gate, hidden, inter, m.bias)?,
                    up_proj: linear(up, hidden, inter, m.bias)?,
                    down_proj: linear(down, inter, hidden, m.bias)?,
                    act: m.act,
                },
                (MlpNames::GatedFused { gate_up, down }, MlpKind::GatedFused) => Mlp::GatedFused {
                    gate_up_proj: linear(gate_up, hidden, 2 * inter, m.bias)?,
                    down_proj: linear(down, inter, hidden, m.bias)?,
                    act: m.act,
                },
                (MlpNames::Plain { up, down }, MlpKind::Plain) => {
                    Mlp::Plain { up_proj: linear(up, hidden, inter, m.bias)?, down_proj: linear(down, inter, hidden, m.bias)?, act: m.act }
                }
                (names, kind) => unreachable!("a family pairs MLP names {names:?} with {kind:?}"),
            };
            layers.push(Block {
                attn_norm: norm(&at(names.attn_norm), hidden)?,
                attn,
                attn_out_norm: names.attn_out_norm.map(|n| norm(&at(n), hidden)).transpose()?,
                mlp_norm: norm(&at(names.mlp_norm), hidden)?,
                mlp,
                mlp_out_norm: names.mlp_out_norm.map(|n| norm(&at(n), hidden)).transpose()?,
                residual: c.residual,
            });
        }
        let embed_tokens = loader.matrix(&format!("{}.weight", names.embed_tokens), c.vocab_size, hidden)?;
        let embed_positions = match (c.positions == Positions::Learned, names.embed_positions) {
            (true, Some(n)) => Some(loader.matrix(&format!("{n}.weight"), c.max_position_embeddings, hidden)?),
            _ => None,
        };
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            // Never quantized, as in PEFT's QLoRA.
            Some(loader.dense_weight(names.lm_head, hidden, c.vocab_size, super::config::WeightLayout::OutIn)?)
        };
        Ok(CausalLm {
            embed_tokens,
            embed_positions,
            embed_norm: names.embed_norm.map(|n| norm(n, hidden)).transpose()?,
            layers,
            norm: norm(names.final_norm, hidden)?,
            lm_head,
            ropes,
            config,
        })
    }

    /// Whether a LongRoPE table changes factors between a cache of `past` positions and a
    /// sequence of `total`: the cached keys were rotated with the short factors.
    pub fn rope_switches_between(&self, past: usize, total: usize) -> bool {
        self.config.positions_switch_at().is_some_and(|original| past <= original && total > original)
    }

    /// The rotary tables of one forward pass, shared by its blocks (also for callers that walk
    /// the layers themselves: activation checkpointing).
    pub fn rope_tables(&self, positions: &[usize], rows: usize, device: &B::Device) -> Vec<super::blocks::RopeTables<B>> {
        self.ropes.iter().map(|r| r.tables::<B>(positions, rows, device)).collect()
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
        let device = input_ids.device();
        let ropes = self.rope_tables(positions, b, &device);
        let ctx = Context { rows: b, ropes: &ropes, mask };
        let mut x = self.embed(input_ids, positions);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, &ctx, slot);
        }
        self.norm.forward(x).reshape([b, s, self.config.hidden_size])
    }

    /// The residual stream's start, `[b·s, hidden]` in f32, for token ids `[b, s]`.
    ///
    /// The stream is kept 2-D: every projection is then one matmul (not b batched ones), and
    /// its backward uses the weight in place, where a 3-D input makes burn reshape, and so
    /// copy, the transposed weight.
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>, positions: &[usize]) -> Tensor<B, 2> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let hidden = self.config.hidden_size;
        let mut x = embedding(self.embed_tokens.clone(), input_ids).reshape([b * s, hidden]);
        if let Some(scale) = self.config.embed_scale {
            // transformers multiplies by √hidden cast to the embedding's dtype.
            let scale = match x.dtype() {
                DType::BF16 => half::bf16::from_f64(scale).to_f64(),
                DType::F16 => half::f16::from_f64(scale).to_f64(),
                _ => scale as f32 as f64,
            };
            x = x * scale;
        }
        // A bf16 base keeps the residual stream in f32.
        if x.dtype() != DType::F32 {
            x = x.cast(DType::F32);
        }
        if let Some(table) = &self.embed_positions {
            let ids: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, b * s]), &device);
            let pos = embedding(table.clone(), ids).reshape([b * s, hidden]);
            x = x + if pos.dtype() != DType::F32 { pos.cast(DType::F32) } else { pos };
        }
        if let Some(norm) = &self.embed_norm {
            x = norm.forward(x);
        }
        x
    }

    /// Logits `[.., vocab]` for hidden states `[.., hidden]`, soft-capped where the family does.
    pub fn lm_head<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        let logits = linear_in_weight_dtype(hidden, self.lm_head_weight(), None);
        match self.config.final_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// The output projection as [hidden, vocab]: lm_head, or the embedding when tied.
    pub fn lm_head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(w) => w.clone(),
            None => self.embed_tokens.clone().transpose(),
        }
    }

    /// Every linear layer but the head, in model order (layer by layer, attention then MLP):
    /// the walk adapters attach along, as PEFT's `named_modules`.
    pub fn linears(&self) -> Vec<&Linear<B>> {
        self.layers.iter().flat_map(Block::linears).collect()
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        self.layers.iter_mut().flat_map(Block::linears_mut).collect()
    }
}
