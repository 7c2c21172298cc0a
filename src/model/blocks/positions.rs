//! Positions: rotary embeddings (Su et al., 2021) in HF's rotate_half layout, full or partial,
//! with their scalings; and ALiBi's slopes (Press et al., 2022). Learned absolute positions are
//! an embedding table (see `lm.rs`).

use burn::tensor::{Tensor, TensorData};

use crate::backend::Backend;
use crate::model::config::{RopeConfig, RopeScaling};
use crate::ops::{float, prim};

/// One rotary table's frequencies. HF pairs dimension i with i + r/2 (rotate_half) within the
/// first r = rotary_dim dimensions of each head; Meta's layout pairs 2i with 2i + 1.
#[derive(Debug, Clone)]
pub struct Rope {
    pub config: RopeConfig,
    /// One frequency per rotated pair, [r / 2], as transformers computes it in f32.
    inv_freq: Vec<f32>,
    /// LongRoPE: the frequencies past the original context, and the cos/sin factor.
    long: Option<(Vec<f32>, usize)>,
    attention_factor: f32,
}

impl Rope {
    pub fn new(config: &RopeConfig) -> Self {
        let r = config.rotary_dim;
        let theta = config.theta;
        let base = |i: usize| theta.powf((2 * i) as f64 / r as f64);
        let mut inv_freq: Vec<f64> = (0..r / 2).map(|i| 1.0 / base(i)).collect();
        let mut long = None;
        let mut attention_factor = 1.0;
        match &config.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old_len = *original_max_position_embeddings as f64;
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
                        let smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    };
                }
            }
            RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, attention_factor: a } => {
                let scaled = |factors: &[f64]| -> Vec<f32> { (0..r / 2).map(|i| 1.0 / (factors[i] as f32 * base(i) as f32)).collect() };
                long = Some((scaled(long_factor), *original_max_position_embeddings));
                inv_freq = scaled(short_factor).into_iter().map(f64::from).collect();
                attention_factor = *a as f32;
            }
        }
        Rope { config: config.clone(), inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(), long, attention_factor }
    }

    /// cos and sin tables for the given positions, each `[rows, seq, 1, r]`, ready to broadcast
    /// over the heads of q or k laid out `[rows, seq, heads, head_dim]`. `positions` holds
    /// `rows × seq` positions, row-major.
    pub fn tables<B: Backend>(&self, positions: &[usize], rows: usize, device: &B::Device) -> RopeTables<B> {
        let seq = positions.len() / rows;
        let r = self.config.rotary_dim;
        // LongRoPE picks its factors per forward pass from the largest position, as
        // transformers' dynamic update does (so one decoding step may differ from the prompt's).
        let inv_freq = match &self.long {
            Some((long, original)) if positions.iter().max().is_some_and(|&p| p + 1 > *original) => long,
            _ => &self.inv_freq,
        };
        let mut cos = Vec::with_capacity(positions.len() * r);
        let mut sin = Vec::with_capacity(positions.len() * r);
        for &p in positions {
            // Angle rounded to f32 as in HF (position · inv_freq in f32), then cos/sin of it.
            let angles = inv_freq.iter().map(|f| (p as f32 * f) as f64);
            let (c, s): (Vec<f32>, Vec<f32>) =
                angles.map(|a| ((a.cos() as f32) * self.attention_factor, (a.sin() as f32) * self.attention_factor)).unzip();
            // cat(freqs, freqs): both halves see the same angles.
            cos.extend_from_slice(&c);
            cos.extend_from_slice(&c);
            // rotate_half(x) = cat(-x2, x1); folding the sign into sin saves a negation:
            // x·cos + rotate_half(x)·sin = x·cos + cat(x2, x1)·cat(-sin, sin).
            sin.extend(s.iter().map(|v| -v));
            sin.extend_from_slice(&s);
        }
        let shape = [rows, seq, 1, r];
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }
}

/// What [`apply_rope`] needs, built once per forward pass per table and shared by its layers.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `[rows, seq, 1, r]`
    pub cos: Tensor<B, 4>,
    /// `[rows, seq, 1, r]`, with rotate_half's sign folded in.
    pub sin: Tensor<B, 4>,
}

/// Rotates the first r dimensions of each head of q or k laid out `[batch, seq, heads, head_dim]`
/// (r from the tables: all of head_dim, or a partial rotary's fraction), one fused operation.
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, t: &RopeTables<B>) -> Tensor<B, 4> {
    float(B::fused_rope(prim(x), prim(t.cos.clone()), prim(t.sin.clone())))
}

/// ALiBi's slopes as BLOOM computes them: 2^(−8i/n) for i = 1..n with n the largest power of
/// two ≤ heads, then, for the remaining heads, every other slope of the 2n-head sequence.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    let base = 2f64.powf(-(2f64.powf(-((closest as f64).log2() - 3.0))));
    let mut slopes: Vec<f32> = (1..=closest).map(|i| base.powi(i as i32) as f32).collect();
    if closest != heads {
        let extra_base = 2f64.powf(-(2f64.powf(-((2 * closest) as f64).log2() + 3.0)));
        let remaining = (heads - closest).min(closest);
        slopes.extend((0..remaining).map(|i| extra_base.powi((2 * i + 1) as i32) as f32));
    }
    slopes
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = crate::backend::Cpu;

    #[test]
    fn rope_rotates_first_half_against_second_half() {
        let device = Default::default();
        let rope = Rope::new(&RopeConfig { theta: 10_000.0, scaling: RopeScaling::None, rotary_dim: 4 });
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

    /// BLOOM's build_alibi_tensor for 8 and 6 heads (6: four slopes of the 4-head sequence, then
    /// slopes 1 and 3 of the 8-head one).
    #[test]
    fn alibi_slopes_match_bloom() {
        let s8 = alibi_slopes(8);
        let expect8: Vec<f32> = (1..=8).map(|i| 0.5f32.powi(i)).collect();
        assert_eq!(s8, expect8);
        let s6 = alibi_slopes(6);
        let expect6 = [0.25f32, 0.0625, 0.015625, 0.00390625, 0.5, 0.125];
        for (a, b) in s6.iter().zip(expect6) {
            assert!((a - b).abs() < 1e-7, "{s6:?}");
        }
    }
}
