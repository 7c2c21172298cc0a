//! Building blocks shared by the decoder families: RMSNorm, rotary position embeddings (HF's
//! rotate_half layout), the projection that can carry a LoRA adapter, and attention masks.

use crate::backend::Backend;
use burn::tensor::module::linear;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::ops::{float, prim};

use crate::lora::LoraAdapter;

/// y = x / sqrt(mean(x²) + eps) · weight, over the last dimension (Zhang & Sennrich, 2019).
#[derive(Debug, Clone)]
pub struct RmsNorm<B: Backend> {
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d = dims[D - 1];
        let rows = x.shape().num_elements() / d;
        let x = float(B::fused_rms_norm(prim(x.reshape([rows, d])), prim(self.weight.clone()), self.eps));
        Tensor::<B, 2>::reshape(x, dims)
    }
}

/// A linear layer `y = x·W (+ b)` as in HF's `nn.Linear`, plus an optional LoRA adapter.
///
/// Every q/k/v/o/gate/up/down projection of every family is one of these, so LoRA (and later
/// DoRA or a quantized base) attaches here without the family files knowing.
#[derive(Debug, Clone)]
pub struct Projection<B: Backend> {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`: PEFT names adapters by it.
    pub name: String,
    /// [in_features, out_features]: HF's [out, in] transposed once at load, so the forward pass
    /// is a plain matmul.
    pub weight: Tensor<B, 2>,
    pub bias: Option<Tensor<B, 1>>,
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Projection<B> {
    pub fn in_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// The module's short name (`q_proj`), which is what LoRA's target_modules match.
    pub fn kind(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lora {
            // One fused operation when base and adapter share x's dtype (an f32 base): the
            // adapter's output is accumulated into the base's, and the backward pass needs
            // neither the base's output nor W·x's gradient for W.
            Some(lora) if self.weight.dtype() == x.dtype() => {
                let dims = x.dims();
                let n = x.shape().num_elements() / dims[D - 1];
                let x = x.reshape([n, dims[D - 1]]);
                let x_lora = lora.dropped(x.clone());
                let p = crate::ops::LoraLinear {
                    w: prim(self.weight.clone()),
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
            Some(lora) => linear_in_weight_dtype(x.clone(), self.weight.clone(), self.bias.clone()) + lora.forward(x),
            None => linear_in_weight_dtype(x, self.weight.clone(), self.bias.clone()),
        }
    }
}

/// `x·w + b` computed in w's dtype (bf16 for a bf16 base) and returned in x's, so a frozen base
/// stored in bf16 never needs an f32 copy of itself.
pub fn linear_in_weight_dtype<B: burn::tensor::backend::Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let (xd, wd) = (x.dtype(), w.dtype());
    if xd == wd {
        return linear(x, w, bias);
    }
    let y = linear(x.cast(wd), w, None).cast(xd);
    match bias {
        Some(b) => y + b.unsqueeze::<D>(),
        None => y,
    }
}

/// How the rotary frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (Code Llama style).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Rotary position embedding (Su et al., 2021) in HF's rotate_half layout: the first half of each
/// head's dimensions pairs with the second half, not adjacent elements (Meta's layout).
#[derive(Debug, Clone)]
pub struct Rope {
    pub head_dim: usize,
    /// One frequency per pair of dimensions, [head_dim / 2], computed as transformers does in f32.
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        match *scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_len = original_max_position_embeddings as f64;
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    // HF computes in f32: round first so the wavelength comparisons agree.
                    let freq = *f as f32 as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    *f = if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth =
                            (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    };
                }
            }
        }
        Rope {
            head_dim,
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// cos and sin tables for the given positions, each `[rows, seq, 1, head_dim]` ready to
    /// broadcast over the heads of q or k laid out `[rows, seq, heads, head_dim]`. `positions`
    /// holds `rows × seq` positions, row-major.
    pub fn tables<B: Backend>(&self, positions: &[usize], rows: usize, device: &B::Device) -> RopeTables<B> {
        let seq = positions.len() / rows;
        let d = self.head_dim;
        let mut cos = Vec::with_capacity(positions.len() * d);
        let mut sin = Vec::with_capacity(positions.len() * d);
        for &p in positions {
            // Angle rounded to f32 as in HF (position · inv_freq in f32), then cos/sin of it.
            let angles = self.inv_freq.iter().map(|f| (p as f32 * f) as f64);
            let (c, s): (Vec<f32>, Vec<f32>) =
                angles.map(|a| (a.cos() as f32, a.sin() as f32)).unzip();
            // cat(freqs, freqs): both halves of a head see the same angles.
            cos.extend_from_slice(&c);
            cos.extend_from_slice(&c);
            // rotate_half(x) = cat(-x2, x1); folding the sign into sin saves a negation:
            // x·cos + rotate_half(x)·sin = x·cos + cat(x2, x1)·cat(-sin, sin).
            sin.extend(s.iter().map(|v| -v));
            sin.extend_from_slice(&s);
        }
        let shape = [rows, seq, 1, d];
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }
}

/// What [`apply_rope`] needs, built once per forward pass and shared by every layer.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `[rows, seq, 1, head_dim]`
    pub cos: Tensor<B, 4>,
    /// `[rows, seq, 1, head_dim]`, with rotate_half's sign folded in.
    pub sin: Tensor<B, 4>,
}

/// Applies the rotation to q or k laid out `[batch, seq, heads, head_dim]`.
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, t: &RopeTables<B>) -> Tensor<B, 4> {
    float(B::fused_rope(prim(x), prim(t.cos.clone()), prim(t.sin.clone())))
}

/// Which keys each query may attend to.
#[derive(Debug, Clone)]
pub enum AttentionMask<B: Backend> {
    /// Plain causal attention, aligned at the bottom right (a query sees every cached key).
    Causal,
    /// An explicit mask, `[batch, 1, q, k]`, `true` where attention is NOT allowed: packed rows
    /// (block-diagonal causal) and sliding windows.
    Explicit(Tensor<B, 4, Bool>),
}

impl<B: Backend> AttentionMask<B> {
    /// The mask for rows of packed examples: `segments[r]` lists the example lengths of row r
    /// (their sum is the row length). A query sees keys of its own example at or before it.
    pub fn packed(segments: &[Vec<usize>], seq: usize, window: Option<usize>, device: &B::Device) -> Self {
        let mut data = Vec::with_capacity(segments.len() * seq * seq);
        for row in segments {
            let mut example = Vec::with_capacity(seq);
            for (i, &len) in row.iter().enumerate() {
                example.extend(std::iter::repeat_n(i, len));
            }
            // Padding after the last example is its own segment (it attends only to itself).
            while example.len() < seq {
                example.push(usize::MAX - example.len());
            }
            for q in 0..seq {
                for k in 0..seq {
                    let allowed = k <= q
                        && example[k] == example[q]
                        && window.is_none_or(|w| q - k < w);
                    data.push(!allowed);
                }
            }
        }
        let mask = Tensor::<B, 4, Bool>::from_data(
            TensorData::new(data, [segments.len(), 1, seq, seq]),
            device,
        );
        AttentionMask::Explicit(mask)
    }

    /// Causal with an optional sliding window, for `q` new queries after `past` cached keys.
    pub fn causal(q: usize, past: usize, window: Option<usize>, device: &B::Device) -> Self {
        let k = past + q;
        match window {
            Some(w) if k > w => {
                let mut data = Vec::with_capacity(q * k);
                for qi in 0..q {
                    let qpos = past + qi;
                    for kpos in 0..k {
                        data.push(!(kpos <= qpos && qpos - kpos < w));
                    }
                }
                AttentionMask::Explicit(Tensor::from_data(TensorData::new(data, [1, 1, q, k]), device))
            }
            _ => AttentionMask::Causal,
        }
    }
}

/// softmax(q·kᵀ/√d)·v for q `[b, s, h, d]` and k, v `[b, t, kv, d]`: grouped-query
/// attention as one fused operation ([`crate::ops`]), which reads each kv head in place of
/// repeating it and keeps only a log-sum-exp per query for the backward pass.
pub fn scaled_dot_product_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
) -> Tensor<B, 4> {
    let mask = match mask {
        AttentionMask::Causal => crate::ops::Mask::Causal,
        AttentionMask::Explicit(m) => crate::ops::Mask::Explicit(m.clone().into_primitive()),
    };
    float(B::fused_attention(prim(q), prim(k), prim(v), mask))
}

/// Token ids `[rows, seq]` as an Int tensor.
pub fn token_tensor<B: Backend>(ids: &[u32], rows: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(data, [rows, ids.len() / rows]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = crate::backend::Cpu;

    /// HF pairs dimension i with i + d/2 (rotate_half); Meta's layout pairs 2i with 2i+1.
    #[test]
    fn rope_rotates_first_half_against_second_half() {
        let device = Default::default();
        let rope = Rope::new(4, 10_000.0, &RopeScaling::None);
        let p = 3usize;
        let tables = rope.tables::<B>(&[p], 1, &device);
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let t = Tensor::<B, 4>::from_data(TensorData::new(x.to_vec(), [1, 1, 1, 4]), &device);
        let out: Vec<f32> = apply_rope(t, &tables).into_data().iter::<f32>().collect();
        let a0 = p as f64; // inv_freq[0] = 1
        let a1 = p as f64 / 100.0; // inv_freq[1] = 10000^(-2/4)
        let expect = [
            x[0] as f64 * a0.cos() - x[2] as f64 * a0.sin(),
            x[1] as f64 * a1.cos() - x[3] as f64 * a1.sin(),
            x[2] as f64 * a0.cos() + x[0] as f64 * a0.sin(),
            x[3] as f64 * a1.cos() + x[1] as f64 * a1.sin(),
        ];
        for (o, e) in out.iter().zip(expect) {
            assert!((*o as f64 - e).abs() < 1e-5, "{out:?} vs {expect:?}");
        }
    }

    #[test]
    fn packed_mask_is_block_diagonal_causal() {
        let device = Default::default();
        let AttentionMask::Explicit(m) = AttentionMask::<B>::packed(&[vec![2, 2]], 4, None, &device) else {
            panic!("packed masks are explicit")
        };
        let masked: Vec<bool> = m.into_data().iter::<bool>().collect();
        #[rustfmt::skip]
        let expect = [
            false, true,  true,  true,
            false, false, true,  true,
            true,  true,  false, true,
            true,  true,  false, false,
        ];
        assert_eq!(masked, expect);
    }

    #[test]
    fn sliding_window_limits_lookback() {
        let device = Default::default();
        let AttentionMask::Explicit(m) = AttentionMask::<B>::causal(1, 4, Some(2), &device) else {
            panic!("a window shorter than the keys needs an explicit mask")
        };
        let masked: Vec<bool> = m.into_data().iter::<bool>().collect();
        assert_eq!(masked, [true, true, true, false, false]);
    }
}
