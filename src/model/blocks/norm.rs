//! RMSNorm (Zhang & Sennrich, 2019) and LayerNorm (Ba et al., 2016), over the last dimension.

use burn::tensor::Tensor;

use crate::backend::Backend;
use crate::ops::{float, prim};

#[derive(Debug, Clone)]
pub enum Norm<B: Backend> {
    /// x / sqrt(mean(x²) + eps) · weight. Gemma's (1 + w) is folded into `weight` at load:
    /// 1 + w in f32 is exactly what transformers multiplies by.
    Rms { weight: Tensor<B, 1>, eps: f64 },
    /// (x − mean) / sqrt(var + eps) · weight + bias, with the biased variance.
    Layer { weight: Tensor<B, 1>, bias: Tensor<B, 1>, eps: f64 },
}

impl<B: Backend> Norm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d = dims[D - 1];
        let rows = x.shape().num_elements() / d;
        let x = x.reshape([rows, d]);
        let y: Tensor<B, 2> = match self {
            Norm::Rms { weight, eps } => float(B::fused_rms_norm(prim(x), prim(weight.clone()), *eps)),
            Norm::Layer { weight, bias, eps } => float(B::fused_layer_norm(prim(x), prim(weight.clone()), prim(bias.clone()), *eps)),
        };
        y.reshape(dims)
    }
}
