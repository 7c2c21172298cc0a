//! The feed-forward sublayer: gated (SwiGLU, GeGLU; gate and up separate or fused) or plain.

use burn::tensor::Tensor;

use crate::backend::Backend;
use crate::model::linear::Linear;
use crate::ops::{float, prim, Activation};

#[derive(Debug, Clone)]
pub enum Mlp<B: Backend> {
    /// down(act(gate(x)) · up(x)) (Shazeer, 2020).
    Gated { gate_proj: Linear<B>, up_proj: Linear<B>, down_proj: Linear<B>, act: Activation },
    /// The same with gate and up in one projection, output [gate | up] (Phi-3).
    GatedFused { gate_up_proj: Linear<B>, down_proj: Linear<B>, act: Activation },
    /// down(act(up(x))).
    Plain { up_proj: Linear<B>, down_proj: Linear<B>, act: Activation },
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Mlp::Gated { gate_proj, up_proj, down_proj, act } => {
                let gate = gate_proj.forward(x.clone());
                let up = up_proj.forward(x);
                down_proj.forward(float(B::fused_glu(prim(gate), prim(up), *act)))
            }
            Mlp::GatedFused { gate_up_proj, down_proj, act } => {
                let y = gate_up_proj.forward(x);
                let i = y.dims()[1] / 2;
                let (gate, up) = (y.clone().narrow(1, 0, i), y.narrow(1, i, i));
                down_proj.forward(float(B::fused_glu(prim(gate), prim(up), *act)))
            }
            Mlp::Plain { up_proj, down_proj, act } => down_proj.forward(float(B::fused_activation(prim(up_proj.forward(x)), *act))),
        }
    }

    pub fn linears(&self) -> Vec<&Linear<B>> {
        match self {
            Mlp::Gated { gate_proj, up_proj, down_proj, .. } => vec![gate_proj, up_proj, down_proj],
            Mlp::GatedFused { gate_up_proj, down_proj, .. } => vec![gate_up_proj, down_proj],
            Mlp::Plain { up_proj, down_proj, .. } => vec![up_proj, down_proj],
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        match self {
            Mlp::Gated { gate_proj, up_proj, down_proj, .. } => vec![gate_proj, up_proj, down_proj],
            Mlp::GatedFused { gate_up_proj, down_proj, .. } => vec![gate_up_proj, down_proj],
            Mlp::Plain { up_proj, down_proj, .. } => vec![up_proj, down_proj],
        }
    }
}
