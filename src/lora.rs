//! LoRA (Hu et al., 2021) as PEFT computes it: y = W·x + s·B(A(dropout(x))), s = alpha / r
//! (or alpha / √r with rsLoRA). The frozen W is never merged with B·A during training.

use burn::tensor::backend::Backend;
use burn::tensor::module::linear;
use burn::tensor::Tensor;

#[derive(Debug, Clone)]
pub struct LoraAdapter<B: Backend> {
    /// lora_A transposed: [in_features, r] (PEFT stores [r, in]).
    pub a: Tensor<B, 2>,
    /// lora_B transposed: [r, out_features] (PEFT stores [out, r]).
    pub b: Tensor<B, 2>,
    /// alpha / r, or alpha / √r with rsLoRA.
    pub scale: f64,
}

impl<B: Backend> LoraAdapter<B> {
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// s·B(A(x)): two thin matmuls, never the [in, out] product.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let down = linear(x, self.a.clone(), None);
        linear(down, self.b.clone(), None) * self.scale
    }
}
