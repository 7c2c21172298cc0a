//! Multi-head attention with grouped-query heads, as one fused operation (`ops`): q, k and v
//! from separate or fused projections in the checkpoint's own layout, an optional norm on each
//! head of q and k, rotary positions (or ALiBi), and the family's scale, soft-cap and window.

use burn::tensor::Tensor;

use super::norm::Norm;
use super::positions::apply_rope;
use super::{Context, KvSlot};
use crate::backend::Backend;
use crate::model::linear::Linear;
use crate::ops::{float, prim, AttentionOptions};

/// Where q, k and v come from.
#[derive(Debug, Clone)]
pub enum Qkv<B: Backend> {
    Separate {
        q_proj: Linear<B>,
        k_proj: Linear<B>,
        v_proj: Linear<B>,
    },
    /// One projection, output [all q | all k | all v] (Phi-3, GPT-2).
    Fused(Linear<B>),
    /// One projection, output per head [q | k | v] (GPT-NeoX, BLOOM).
    FusedPerHead(Linear<B>),
}

#[derive(Debug, Clone)]
pub struct Attention<B: Backend> {
    pub qkv: Qkv<B>,
    pub o_proj: Linear<B>,
    /// Qwen3 and Gemma 3 normalise each head of q and k before the rotation.
    pub q_norm: Option<Norm<B>>,
    pub k_norm: Option<Norm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The rotary table this layer uses, if the model rotates.
    pub rope: Option<usize>,
    /// Scale, soft-cap, sliding window and ALiBi slopes of this layer.
    pub options: AttentionOptions,
}

impl<B: Backend> Attention<B> {
    /// q `[b, s, h, d]`, k and v `[b, s, kv, d]` from the residual stream `[b·s, hidden]`.
    fn project(&self, x: Tensor<B, 2>, b: usize) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let s = x.dims()[0] / b;
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        match &self.qkv {
            Qkv::Separate { q_proj, k_proj, v_proj } => (
                q_proj.forward(x.clone()).reshape([b, s, h, d]),
                k_proj.forward(x.clone()).reshape([b, s, kv, d]),
                v_proj.forward(x).reshape([b, s, kv, d]),
            ),
            Qkv::Fused(proj) => {
                let y = proj.forward(x);
                (
                    y.clone().narrow(1, 0, h * d).reshape([b, s, h, d]),
                    y.clone().narrow(1, h * d, kv * d).reshape([b, s, kv, d]),
                    y.narrow(1, (h + kv) * d, kv * d).reshape([b, s, kv, d]),
                )
            }
            Qkv::FusedPerHead(proj) => {
                let y = proj.forward(x).reshape([b, s, h, 3 * d]);
                (y.clone().narrow(3, 0, d), y.clone().narrow(3, d, d), y.narrow(3, 2 * d, d))
            }
        }
    }

    /// `x` is `[b·s, hidden]`, `b` rows of `s` positions each.
    pub fn forward(&self, x: Tensor<B, 2>, ctx: &Context<B>, cache: Option<&mut KvSlot<B>>) -> Tensor<B, 2> {
        let b = ctx.rows;
        let s = x.dims()[0] / b;
        let (h, d) = (self.num_heads, self.head_dim);
        let (mut q, mut k, mut v) = self.project(x, b);
        if let Some(norm) = &self.q_norm {
            q = norm.forward(q);
        }
        if let Some(norm) = &self.k_norm {
            k = norm.forward(k);
        }
        if let Some(i) = self.rope {
            q = apply_rope(q, &ctx.ropes[i]);
            k = apply_rope(k, &ctx.ropes[i]);
        }
        if let Some(slot) = cache {
            if let Some((past_k, past_v)) = slot.take() {
                k = Tensor::cat(vec![past_k, k], 1);
                v = Tensor::cat(vec![past_v, v], 1);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let out: Tensor<B, 4> = float(B::fused_attention(prim(q), prim(k), prim(v), ctx.mask.to_ops(), &self.options));
        // [b, s, h, d] -> [b·s, h·d]
        self.o_proj.forward(out.reshape([b * s, h * d]))
    }

    /// The layer's linear layers, in checkpoint order.
    pub fn linears(&self) -> Vec<&Linear<B>> {
        let mut out = match &self.qkv {
            Qkv::Separate { q_proj, k_proj, v_proj } => vec![q_proj, k_proj, v_proj],
            Qkv::Fused(p) | Qkv::FusedPerHead(p) => vec![p],
        };
        out.push(&self.o_proj);
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        let mut out = match &mut self.qkv {
            Qkv::Separate { q_proj, k_proj, v_proj } => vec![q_proj, k_proj, v_proj],
            Qkv::Fused(p) | Qkv::FusedPerHead(p) => vec![p],
        };
        out.push(&mut self.o_proj);
        out
    }
}
