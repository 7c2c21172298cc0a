//! Adapters: the trainable part attached to a frozen linear layer. LoRA (Hu et al., 2021) as
//! PEFT computes it: y = W·x + s·B(A(dropout(x))), s = alpha / r (or alpha / √r with rsLoRA);
//! W is never merged with B·A during training. DoRA (Liu et al., 2024) adds a magnitude m per
//! output feature: the layer's weight becomes m · (W + s·B·A) / ‖W + s·B·A‖, the norm taken per
//! output feature and treated as a constant (no gradient), as PEFT's `DoraLinearLayer` does.
//!
//! This module knows nothing of models or files: `model::Linear` holds an adapter, and
//! `crate::peft` reads and writes them in PEFT's layout.

use burn::tensor::module::linear;
use burn::tensor::{Tensor, TensorData};

use crate::backend::Backend;
use crate::ops::{float, prim};
use crate::rng::Rng;

#[derive(Debug, Clone)]
pub struct LoraAdapter<B: Backend> {
    /// lora_A transposed: [in_features, r] (PEFT stores [r, in]).
    pub a: Tensor<B, 2>,
    /// lora_B transposed: [r, out_features] (PEFT stores [out, r]).
    pub b: Tensor<B, 2>,
    /// alpha / r, or alpha / √r with rsLoRA.
    pub scale: f64,
    /// Dropout probability on the adapter's input; applied only while `dropout_draw` is set,
    /// which the training loop does before each forward pass (a fresh seed per micro-batch).
    pub dropout: f64,
    pub dropout_draw: Option<DropoutDraw>,
    /// DoRA's lora_magnitude_vector as `[1, out_features]` (PEFT stores `[out]`), so it trains
    /// beside lora_A and lora_B as one more matrix; None for plain LoRA.
    pub magnitude: Option<Tensor<B, 2>>,
}

impl<B: Backend> LoraAdapter<B> {
    /// A fresh adapter: A like PyTorch's nn.Linear init (kaiming_uniform with a = √5, i.e.
    /// U(−1/√in, 1/√in)), drawn in PEFT's [r, in] order; B zeros, so training starts at the
    /// base model exactly.
    pub fn init(fan_in: usize, out: usize, config: &LoraConfig, rng: &mut Rng, device: &B::Device) -> Self {
        let bound = 1.0 / (fan_in as f64).sqrt();
        let a_rows: Vec<f32> = (0..config.rank * fan_in).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
        let a = transpose(&a_rows, config.rank, fan_in);
        LoraAdapter {
            a: Tensor::from_data(TensorData::new(a, [fan_in, config.rank]), device),
            b: Tensor::zeros([config.rank, out], device),
            scale: config.scale(),
            dropout: config.dropout,
            dropout_draw: None,
            magnitude: None,
        }
    }

    /// DoRA's magnitude at the start, ‖W‖ per output feature (PEFT's init: with B zero the
    /// layer's weight is then exactly W). `weight` is the layer's `[in, out]`.
    pub fn init_magnitude(&mut self, weight: &Tensor<B, 2>) {
        self.magnitude = Some(self.weight_norm(weight));
    }

    /// ‖W + s·B·A‖ per output feature, `[1, out]`, for the layer's `weight` `[in, out]`: a
    /// constant, with no gradient to A or B (PEFT detaches it).
    pub fn weight_norm(&self, weight: &Tensor<B, 2>) -> Tensor<B, 2> {
        float(B::dora_weight_norm(prim(weight.clone()), prim(self.a.clone()), prim(self.b.clone()), self.scale))
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// Trainable parameters.
    pub fn num_parameters(&self) -> usize {
        let magnitude = self.magnitude.as_ref().map_or(0, |m| m.shape().num_elements());
        self.a.shape().num_elements() + self.b.shape().num_elements() + magnitude
    }

    /// s·B(A(dropout(x))): two thin matmuls, never the [in, out] product.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = self.dropped(x.clone()).unwrap_or(x);
        self.delta(x)
    }

    /// s·B(A(x)), on x as given (dropout, if any, already applied).
    pub fn delta<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let down = linear(x, self.a.clone(), None);
        linear(down, self.b.clone(), None) * self.scale
    }

    /// x after the adapter's dropout, or None when no dropout applies (p = 0, or not training).
    pub fn dropped<const D: usize>(&self, x: Tensor<B, D>) -> Option<Tensor<B, D>> {
        match self.dropout_draw {
            Some(draw) if self.dropout > 0.0 => {
                let mask = dropout_mask::<B, D>(&x.dims(), self.dropout, draw, &x.device());
                Some(x * mask)
            }
            _ => None,
        }
    }
}

impl<B: Backend + burn::tensor::backend::AutodiffBackend> LoraAdapter<B> {
    /// The same values as leaves that do not require gradients, so a forward pass through them
    /// records no graph. (`detach` would not do: burn keeps a detached leaf's `require_grad`.)
    pub fn untracked(&mut self) {
        self.a = Tensor::from_inner(self.a.clone().inner());
        self.b = Tensor::from_inner(self.b.clone().inner());
        self.magnitude = self.magnitude.take().map(|m| Tensor::from_inner(m.inner()));
    }
}

/// Which masks a forward pass draws: those of a micro-batch seeded with `seed`, for its rows
/// `first_row..first_row + rows`. One device holds every row (`first_row` 0); a data-parallel
/// replica holds a slice, and draws exactly the part of the whole batch's masks its rows would
/// get on one device, so a run's dropout does not depend on how many replicas share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutDraw {
    pub seed: u64,
    pub first_row: usize,
    pub rows: usize,
}

/// Inverted dropout mask: 0 with probability p, else 1/(1-p), drawn by the backend
/// ([`crate::ops::FusedOps::dropout_mask`]) from tune's own seeded generator, so a run is
/// reproducible on any backend and a resumed run draws the same masks. The batch's rows are the
/// outermost dimension of `dims`, whatever the layout inside a row.
fn dropout_mask<B: Backend, const D: usize>(dims: &[usize; D], p: f64, draw: DropoutDraw, device: &B::Device) -> Tensor<B, D> {
    let n: usize = dims.iter().product();
    assert!(draw.rows > 0 && n.is_multiple_of(draw.rows), "dropout: {dims:?} does not hold {} batch rows", draw.rows);
    let first = (draw.first_row * (n / draw.rows)) as u64;
    float::<B, 1>(B::dropout_mask(n, p, draw.seed, first, device)).reshape(*dims)
}

/// The LoRA shape of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names (`q_proj`, `c_attn`), suffixes (`self_attn.q_proj`) or full paths, matched as
    /// PEFT matches them: a module is targeted when its path equals one or ends with `.` + one.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output feature on top of B·A.
    pub use_dora: bool,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// PEFT's rule for a list of target_modules.
    pub fn targets(&self, module_path: &str) -> bool {
        self.target_modules.iter().any(|t| targets(t, module_path))
    }
}

/// Whether target `t` names the module at `path` (equal, or a `.`-separated suffix of it).
pub fn targets(t: &str, path: &str) -> bool {
    path == t || (path.len() > t.len() && path.ends_with(t) && path.as_bytes()[path.len() - t.len() - 1] == b'.')
}

/// Row-major [rows, cols] -> [cols, rows].
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_match_as_peft_matches() {
        let path = "model.layers.0.self_attn.q_proj";
        for t in ["q_proj", "self_attn.q_proj", path] {
            assert!(super::targets(t, path), "{t}");
        }
        for t in ["proj", "_proj", "k_proj", "attn.q_proj.x", "layers.0.self_attn"] {
            assert!(!super::targets(t, path), "{t}");
        }
    }
}
