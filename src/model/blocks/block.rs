//! One decoder block: attention and MLP joined to the residual stream.

use burn::tensor::Tensor;

use super::{Attention, Context, KvSlot, Mlp, Norm};
use crate::backend::Backend;
use crate::model::config::Residual;
use crate::model::linear::Linear;

#[derive(Debug, Clone)]
pub struct Block<B: Backend> {
    /// Before attention (input_layernorm, ln_1).
    pub attn_norm: Norm<B>,
    pub attn: Attention<B>,
    /// Gemma: on the attention output, before the residual add.
    pub attn_out_norm: Option<Norm<B>>,
    /// Before the MLP (post_attention_layernorm, ln_2, pre_feedforward_layernorm).
    pub mlp_norm: Norm<B>,
    pub mlp: Mlp<B>,
    /// Gemma: on the MLP output, before the residual add.
    pub mlp_out_norm: Option<Norm<B>>,
    pub residual: Residual,
}

impl<B: Backend> Block<B> {
    /// `x` is the residual stream, `[b·s, hidden]`.
    pub fn forward(&self, x: Tensor<B, 2>, ctx: &Context<B>, cache: Option<&mut KvSlot<B>>) -> Tensor<B, 2> {
        let attn = self.attn.forward(self.attn_norm.forward(x.clone()), ctx, cache);
        match self.residual {
            Residual::Parallel => {
                let mlp = self.mlp.forward(self.mlp_norm.forward(x.clone()));
                x + attn + mlp
            }
            Residual::Sequential | Residual::Sandwich => {
                let attn = match &self.attn_out_norm {
                    Some(n) => n.forward(attn),
                    None => attn,
                };
                let h = x + attn;
                let mlp = self.mlp.forward(self.mlp_norm.forward(h.clone()));
                let mlp = match &self.mlp_out_norm {
                    Some(n) => n.forward(mlp),
                    None => mlp,
                };
                h + mlp
            }
        }
    }

    /// The block's linear layers, attention then MLP, in checkpoint order.
    pub fn linears(&self) -> Vec<&Linear<B>> {
        let mut out = self.attn.linears();
        out.extend(self.mlp.linears());
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        let mut out = self.attn.linears_mut();
        out.extend(self.mlp.linears_mut());
        out
    }
}
