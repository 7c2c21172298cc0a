//! The linear layer every projection of every family is, and where adapters attach.

use burn::tensor::module::linear;
use burn::tensor::Tensor;

use crate::adapter::LoraAdapter;
use crate::backend::Backend;
use crate::ops::{float, prim};
use crate::quant::{QuantizedMatrix, SharedMatrix};

use super::config::WeightLayout;

/// The frozen weight of a [`Linear`], as the model holds it.
#[derive(Debug, Clone)]
pub enum FrozenWeight<B: Backend> {
    /// `[in_features, out_features]` in `model.dtype`: an `nn.Linear`'s `[out, in]` transposed
    /// once at load (so the forward pass is a plain matmul), a `Conv1D`'s kept as stored.
    Dense(Tensor<B, 2>),
    /// `[out_features, in_features]` quantized (`model.quantize`), in host memory: an
    /// `nn.Linear`'s weight as stored, a `Conv1D`'s transposed, as bitsandbytes stores both.
    /// Only ever dequantized a tile at a time, inside [`crate::ops::FusedOps::quant_linear`].
    Quantized(SharedMatrix),
}

impl<B: Backend> FrozenWeight<B> {
    /// The dense tensor, `[in, out]`; None when quantized.
    pub fn dense(&self) -> Option<&Tensor<B, 2>> {
        match self {
            FrozenWeight::Dense(w) => Some(w),
            FrozenWeight::Quantized(_) => None,
        }
    }

    /// The quantized matrix, `[out, in]`; None when dense.
    pub fn quantized(&self) -> Option<&QuantizedMatrix> {
        match self {
            FrozenWeight::Dense(_) => None,
            FrozenWeight::Quantized(q) => Some(q),
        }
    }
}

/// `y = x·W (+ b)`, plus an optional adapter. Its name is the checkpoint's module path, which is
/// also PEFT's name for it.
#[derive(Debug, Clone)]
pub struct Linear<B: Backend> {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub weight: FrozenWeight<B>,
    pub bias: Option<Tensor<B, 1>>,
    /// How the weight is stored in the checkpoint (and so in a merged export).
    pub layout: WeightLayout,
    pub adapter: Option<LoraAdapter<B>>,
}

impl<B: Backend> Linear<B> {
    pub fn in_features(&self) -> usize {
        match &self.weight {
            FrozenWeight::Dense(w) => w.dims()[0],
            FrozenWeight::Quantized(q) => q.cols(),
        }
    }

    pub fn out_features(&self) -> usize {
        match &self.weight {
            FrozenWeight::Dense(w) => w.dims()[1],
            FrozenWeight::Quantized(q) => q.rows(),
        }
    }

    /// The last component of the path (`q_proj`), which is what `target_modules` names.
    pub fn short_name(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let weight = match &self.weight {
            FrozenWeight::Dense(w) => w,
            FrozenWeight::Quantized(q) => return self.forward_quantized(q, x),
        };
        match &self.adapter {
            Some(lora) if lora.magnitude.is_some() => self.forward_dora(weight, lora, x),
            // One fused operation: the adapter's output is accumulated into the base's, and
            // the backward pass needs neither the base's output nor W·x's gradient for W.
            Some(lora) => {
                let dims = x.dims();
                let n = x.shape().num_elements() / dims[D - 1];
                let x = x.reshape([n, dims[D - 1]]);
                let x_lora = lora.dropped(x.clone());
                let p = crate::ops::LoraLinear {
                    w: prim(weight.clone()),
                    bias: self.bias.clone().map(prim),
                    a: prim(lora.a.clone()),
                    b: prim(lora.b.clone()),
                    scale: lora.scale,
                };
                let y: Tensor<B, 2> = float(B::lora_linear(prim(x), x_lora.map(prim), p));
                let mut out = dims;
                out[D - 1] = self.out_features();
                y.reshape(out)
            }
            None => linear_in_weight_dtype(x, weight.clone(), self.bias.clone()),
        }
    }

    /// DoRA in PEFT's form, `weight` the dense frozen `[in, out]`. With g = m / ‖W + s·B·A‖ per
    /// output feature (a constant: PEFT detaches the norm), PEFT adds (g − 1)·W·x' + g·s·B·A·x'
    /// to W·x + b, x' being x after dropout. Without dropout that is b + g·(W·x + s·B·A·x), the
    /// fused LoRA op scaled; with dropout W meets both x and x', so it takes two products.
    fn forward_dora<const D: usize>(&self, weight: &Tensor<B, 2>, lora: &LoraAdapter<B>, x: Tensor<B, D>) -> Tensor<B, D> {
        let magnitude = lora.magnitude.clone().expect("a DoRA adapter");
        let dims = x.dims();
        let n = x.shape().num_elements() / dims[D - 1];
        let x = x.reshape([n, dims[D - 1]]);
        let g = magnitude / lora.weight_norm(weight);
        let y = match lora.dropped(x.clone()) {
            None => {
                let p = crate::ops::LoraLinear {
                    w: prim(weight.clone()),
                    bias: None,
                    a: prim(lora.a.clone()),
                    b: prim(lora.b.clone()),
                    scale: lora.scale,
                };
                let merged: Tensor<B, 2> = float(B::lora_linear(prim(x), None, p));
                let y = merged * g;
                match &self.bias {
                    Some(b) => y + b.clone().unsqueeze::<2>(),
                    None => y,
                }
            }
            Some(dropped) => {
                let base = linear_in_weight_dtype(dropped.clone(), weight.clone(), None);
                linear_in_weight_dtype(x, weight.clone(), self.bias.clone()) + base * (g.clone() - 1.0) + lora.delta(dropped) * g
            }
        };
        let mut out = dims;
        out[D - 1] = self.out_features();
        y.reshape(out)
    }

    /// The quantized base, with or without its adapter, as one fused operation in x's dtype
    /// (f32): W is dequantized a tile at a time, and takes no gradient.
    fn forward_quantized<const D: usize>(&self, w: &SharedMatrix, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let n = x.shape().num_elements() / dims[D - 1];
        let x = x.reshape([n, dims[D - 1]]);
        let x_lora = self.adapter.as_ref().and_then(|lora| lora.dropped(x.clone()));
        let p = crate::ops::QuantLinear {
            w: w.clone(),
            bias: self.bias.clone().map(prim),
            lora: self.adapter.as_ref().map(|lora| crate::ops::LoraWeights {
                a: prim(lora.a.clone()),
                b: prim(lora.b.clone()),
                scale: lora.scale,
            }),
        };
        let y: Tensor<B, 2> = float(B::quant_linear(prim(x), x_lora.map(prim), p));
        let mut out = dims;
        out[D - 1] = self.out_features();
        y.reshape(out)
    }
}

/// `x·w + b` for a frozen w, returned in x's dtype. A w stored in bf16 is multiplied as it is
/// (x rounded to bf16 where it enters, see [`crate::ops::FusedOps::frozen_matmul`]), so a bf16 base never
/// needs an f32 copy of itself.
pub fn linear_in_weight_dtype<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, D> {
    if x.dtype() == w.dtype() {
        return linear(x, w, bias);
    }
    let dims = x.dims();
    let k = dims[D - 1];
    let x = x.reshape([dims.iter().product::<usize>() / k.max(1), k]);
    let y: Tensor<B, 2> = float(B::frozen_matmul(prim(x), prim(w.clone())));
    let mut out = dims;
    out[D - 1] = w.dims()[1];
    let y = y.reshape(out);
    match bias {
        Some(b) => y + b.unsqueeze::<D>(),
        None => y,
    }
}
