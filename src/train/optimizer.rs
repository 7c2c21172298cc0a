//! AdamW with PyTorch's semantics (Loshchilov & Hutter, 2019; torch.optim.AdamW): decoupled
//! weight decay applied to the parameter before the Adam update, bias-corrected moments, and
//! ε added after dividing √v by √(1-β2^t). burn's own AdamW has other defaults (ε 1e-5,
//! weight decay 1e-4), so tune keeps its own — which also makes the state easy to checkpoint.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults except weight decay, which LoRA recipes set to 0.
    fn default() -> Self {
        AdamWConfig { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0 }
    }
}

/// First and second moments per parameter, in the trainer's parameter order.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Optimizer steps taken so far (t in the bias corrections).
    pub step: u64,
    pub exp_avg: Vec<Tensor<B, 2>>,
    pub exp_avg_sq: Vec<Tensor<B, 2>>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig, params: &[Tensor<B, 2>]) -> Self {
        AdamW {
            config,
            step: 0,
            exp_avg: params.iter().map(Tensor::zeros_like).collect(),
            exp_avg_sq: params.iter().map(Tensor::zeros_like).collect(),
        }
    }

    /// One update of every parameter with its gradient at learning rate `lr`.
    pub fn update(&mut self, params: Vec<Tensor<B, 2>>, grads: Vec<Tensor<B, 2>>, lr: f64) -> Vec<Tensor<B, 2>> {
        let AdamWConfig { betas: [b1, b2], eps, weight_decay } = self.config;
        self.step += 1;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - b1.powi(t);
        let bias_correction2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        params
            .into_iter()
            .zip(grads)
            .enumerate()
            .map(|(i, (p, g))| {
                let p = if weight_decay != 0.0 { p * (1.0 - lr * weight_decay) } else { p };
                let m = self.exp_avg[i].clone() * b1 + g.clone() * (1.0 - b1);
                let v = self.exp_avg_sq[i].clone() * b2 + g.square() * (1.0 - b2);
                let denom = v.clone().sqrt() / bias_correction2_sqrt + eps;
                let p = p - m.clone() / denom * step_size;
                self.exp_avg[i] = m;
                self.exp_avg_sq[i] = v;
                p
            })
            .collect()
    }
}

/// Global L2 norm over all gradients (torch.nn.utils.clip_grad_norm_'s total_norm) and, when
/// `max_norm` is set, the gradients scaled by min(1, max_norm / (norm + 1e-6)). burn's built-in
/// clipping is per tensor, which is a different update.
pub fn clip_grad_norm<B: Backend>(grads: Vec<Tensor<B, 2>>, max_norm: Option<f64>) -> (Vec<Tensor<B, 2>>, f64) {
    if grads.is_empty() {
        return (grads, 0.0);
    }
    let squares: Vec<Tensor<B, 1>> = grads.iter().map(|g| g.clone().square().sum()).collect();
    // One read-back for all tensors; summed in f64.
    let total: f64 = Tensor::cat(squares, 0).into_data().iter::<f32>().map(|x| x as f64).sum();
    let norm = total.sqrt();
    let grads = match max_norm {
        Some(max) => {
            let coef = (max / (norm + 1e-6)).min(1.0);
            if coef < 1.0 {
                grads.into_iter().map(|g| g * coef).collect()
            } else {
                grads
            }
        }
        None => grads,
    };
    (grads, norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type B = crate::backend::Cpu;

    /// Hand-computed first step: m = 0.1·g, v = 0.001·g², m̂ = g, v̂ = g², so
    /// p ← p(1 − lr·wd) − lr·g/(|g| + ε).
    #[test]
    fn first_step_matches_the_formula() {
        let device = Default::default();
        let p = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, -2.0], [1, 2]), &device);
        let g = Tensor::<B, 2>::from_data(TensorData::new(vec![0.5f32, -0.25], [1, 2]), &device);
        let config = AdamWConfig { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(config, std::slice::from_ref(&p));
        let out: Vec<f32> = opt.update(vec![p], vec![g], 0.01).remove(0).into_data().iter::<f32>().collect();
        let expect = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (o, e) in out.iter().zip(expect) {
            assert!((*o as f64 - e).abs() < 1e-6, "{out:?} vs {expect:?}");
        }
        assert_eq!(opt.step, 1);
    }

    #[test]
    fn clipping_uses_the_global_norm() {
        let device = Default::default();
        let a = Tensor::<B, 2>::from_data(TensorData::new(vec![3.0f32], [1, 1]), &device);
        let b = Tensor::<B, 2>::from_data(TensorData::new(vec![4.0f32], [1, 1]), &device);
        let (clipped, norm) = clip_grad_norm(vec![a, b], Some(1.0));
        assert!((norm - 5.0).abs() < 1e-6);
        let a: f32 = clipped[0].clone().into_scalar();
        let b: f32 = clipped[1].clone().into_scalar();
        // Per-tensor clipping would give 1.0 and 1.0; the global norm keeps the direction.
        assert!((a - 0.6).abs() < 1e-5 && (b - 0.8).abs() < 1e-5, "{a} {b}");
    }
}
