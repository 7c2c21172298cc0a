//! The fused operations for burn-flex, on the raw f32 buffers: rayon over rows or heads, the
//! gemm crate (which burn-flex's own matmul uses) for attention's products. Inputs in another
//! dtype take the reference path.

use burn::backend::Flex;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::bf16::{self as bf16_gemm, View};
use super::{float, prim, reference, Activation, AttentionOptions, FusedOps, LoraLinear, Mask, QuantLinear};

mod quant;
pub(super) mod shared;
pub(super) mod simd;

use shared::Shared;
use simd::multiversion;

/// Query rows per attention tile: a causal tile only needs the keys up to its last row.
const TILE: usize = 64;
/// Rows per task in the row-parallel kernels.
const ROWS_PER_TASK: usize = 64;

/// e^x in f32 (Cephes' expf: range reduction by ln 2 and a degree-6 polynomial, within 2 ulp
/// of libm), written without branches or calls so that loops over slices vectorize; libm's
/// expf is a scalar call per element. Below −87.3 (including −∞, a masked score) it is 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e = (p * r * r + r + 1.0) * f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        e
    }
}

/// tanh in f32 without branches or calls, so that loops over slices vectorize (Cephes' tanhf):
/// x + x³·P(x²) below |x| = 0.625, where 1 − 2/(e^{2|x|} + 1) would lose digits to the
/// subtraction, that above; within 1e-7 of tanh. |x| is clamped at 10, where tanh is 1 in f32.
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    let a = x.abs().min(10.0);
    let large = (1.0 - 2.0 / (exp(2.0 * a) + 1.0)).copysign(x);
    let z = x * x;
    let small = ((((-5.704_988_7e-3 * z + 2.063_909e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z - 3.333_328e-1) * z * x + x;
    if a < 0.625 {
        small
    } else {
        large
    }
}

/// erf in f32 without branches or calls: x·P(2x² − 1) below |x| = 1, and above it
/// 1 − e^{−x²}·Q((|x| − 2.5)/1.5) up to |x| = 4, past which erf is 1 in f32 (erfc(x)·e^{x²} is
/// smooth there, erfc itself is not). P (degree 6) and Q (degree 11) are Chebyshev fits to
/// erf(x)/x and erfc(x)·e^{x²}; within 1e-7 of erf.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    #[rustfmt::skip]
    const P: [f32; 7] = [
        1.231_640_1e-6, -1.766_908_1e-5, 2.175_119_9e-4, -2.285_419_5e-3, 1.985_249_8e-2, -1.405_361e-1, 9.654_687_4e-1,
    ];
    #[rustfmt::skip]
    const Q: [f32; 12] = [
        -3.692_872_3e-5, 9.640_452e-5, -1.439_486e-4, 3.678_686_7e-4, -1.017_117_8e-3, 2.425_885e-3,
        -5.567_332_9e-3, 1.248_403_5e-2, -2.700_572_5e-2, 5.611_096e-2, -1.115_210_05e-1, 2.108_063_6e-1,
    ];
    let a = x.abs().min(4.0);
    let small = x * horner(2.0 * a * a - 1.0, &P);
    let large = (1.0 - exp(-a * a) * horner((a - 2.5) * (1.0 / 1.5), &Q)).copysign(x);
    if a < 1.0 {
        small
    } else {
        large
    }
}

/// The polynomial with coefficients `c`, highest power first, at x.
#[inline(always)]
fn horner<const N: usize>(x: f32, c: &[f32; N]) -> f32 {
    c.iter().fold(0.0, |acc, &c| acc * x + c)
}

/// √(2/π) and 1/√(2π)
const SQRT_2_OVER_PI: f32 = std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;

/// An activation as the kernels compute it: f32, inlined, without branches, so that the
/// element-wise loops vectorize; one type per [`Activation`], so each loop is its own.
trait Act {
    /// act(x) and act'(x)
    fn value_grad(x: f32) -> (f32, f32);

    fn value(x: f32) -> f32 {
        Self::value_grad(x).0
    }

    /// The gradients of gate and up for act(gate)·up and the output's gradient d.
    #[inline(always)]
    fn glu_grad(g: f32, u: f32, d: f32) -> (f32, f32) {
        let (a, da) = Self::value_grad(g);
        (d * u * da, d * a)
    }
}

struct Silu;
struct GeluTanh;
struct Gelu;

impl Act for Silu {
    #[inline(always)]
    fn value_grad(x: f32) -> (f32, f32) {
        let sig = 1.0 / (1.0 + exp(-x));
        (x * sig, sig * (1.0 + x * (1.0 - sig)))
    }

    #[inline(always)]
    fn value(x: f32) -> f32 {
        x / (1.0 + exp(-x))
    }

    #[inline(always)]
    fn glu_grad(g: f32, u: f32, d: f32) -> (f32, f32) {
        let sig = 1.0 / (1.0 + exp(-g));
        (d * u * sig * (1.0 + g * (1.0 - sig)), d * g * sig)
    }
}

impl Act for GeluTanh {
    #[inline(always)]
    fn value_grad(x: f32) -> (f32, f32) {
        let th = tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x));
        let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x);
        (0.5 * x * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du)
    }
}

impl Act for Gelu {
    #[inline(always)]
    fn value_grad(x: f32) -> (f32, f32) {
        let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        (x * cdf, cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x))
    }
}

/// GELU and its tanh form as the kernels compute them, for the accuracy test.
#[cfg(test)]
pub(crate) fn gelu(x: f32) -> f32 {
    Gelu::value(x)
}

#[cfg(test)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    GeluTanh::value(x)
}

/// Elements per task in the element-wise kernels.
const CHUNK: usize = 1 << 14;

multiversion! {
    /// act(gate)·up
    fn glu_f32<A: Act>(gs: &[f32], us: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; gs.len()];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
            let (g, u) = (&gs[c * CHUNK..][..out.len()], &us[c * CHUNK..][..out.len()]);
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = A::value(g) * u;
            }
        });
        out
    }
}

multiversion! {
    /// The gradients of gate and up.
    fn glu_backward_f32<A: Act>(gs: &[f32], us: &[f32], ds: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut dgate = vec![0f32; gs.len()];
        let mut dup = vec![0f32; gs.len()];
        dgate.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (dg, du))| {
            let n = dg.len();
            let (g, u, d) = (&gs[c * CHUNK..][..n], &us[c * CHUNK..][..n], &ds[c * CHUNK..][..n]);
            for i in 0..n {
                (dg[i], du[i]) = A::glu_grad(g[i], u[i], d[i]);
            }
        });
        (dgate, dup)
    }
}

multiversion! {
    /// act(x), or with `grad` the gradient of x, grad·act'(x).
    fn activation_f32<A: Act>(xs: &[f32], grad: Option<&[f32]>) -> Vec<f32> {
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
            let x = &xs[c * CHUNK..][..out.len()];
            match grad {
                None => out.iter_mut().zip(x).for_each(|(o, &x)| *o = A::value(x)),
                Some(ds) => {
                    let d = &ds[c * CHUNK..][..out.len()];
                    for ((o, &x), &d) in out.iter_mut().zip(x).zip(d) {
                        *o = d * A::value_grad(x).1;
                    }
                }
            }
        });
        out
    }
}

fn all_f32(ts: &[&FlexTensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32)
}

/// A bf16 base's weight under f32 activations: what [`bf16_gemm`] multiplies.
fn bf16_base(w: &FlexTensor, rest: &[&FlexTensor]) -> bool {
    w.dtype() == DType::BF16 && all_f32(rest)
}

/// A 2-d bf16 tensor as the kernel reads it, views (wᵀ) included; a view with negative strides
/// is copied first.
fn bf16_view(w: &FlexTensor) -> (FlexTensor, [usize; 2], [usize; 2], usize) {
    let w = if w.layout().strides().iter().all(|&s| s >= 0) { w.clone() } else { contiguous(w.clone()) };
    let d = dims(&w);
    assert_eq!(d.len(), 2, "bf16 weight of shape {d:?} (expected 2 dimensions)");
    let st = w.layout().strides();
    let (strides, offset) = ([st[0] as usize, st[1] as usize], w.layout().start_offset());
    (w, [d[0], d[1]], strides, offset)
}

/// y `[n, m]` (= y + if `accumulate`) x `[n, k]` · w `[k, m]` for a bf16 w.
fn bf16_matmul(x: &[f32], n: usize, w: &FlexTensor, y: &mut [f32], accumulate: bool) {
    let (w, shape, strides, offset) = bf16_view(w);
    let wv = View::new(w.storage::<half::bf16>(), offset, shape, strides);
    bf16_gemm::matmul(View::row_major(x, n, shape[0]), wv, y, accumulate);
}

fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().iter().copied().collect()
}

/// The tensor's elements in row-major order (copied only if it is a strided view).
fn contiguous(t: FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// One core: the attention kernels already run one task per core.
const ONE_CORE: gemm::Parallelism = gemm::Parallelism::None;
/// Every core, for one large product.
const ALL_CORES: gemm::Parallelism = gemm::Parallelism::Rayon(0);

/// dst (rows `m`, cols `n`, strides `dst_rs`, 1) = dst (if `accumulate`) + beta · lhs·rhs.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    parallelism: gemm::Parallelism,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    beta: f32,
) {
    gemm::gemm(m, n, k, dst, 1, dst_rs, accumulate, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, 1.0, beta, false, false, false, parallelism);
}

/// Shape, mask and options of one attention call.
struct Geometry<'a> {
    b: usize,
    s: usize,
    t: usize,
    h: usize,
    kv: usize,
    d: usize,
    /// `[b or 1, 1, s, t]` as bytes, non-zero where masked; None for causal.
    mask: Option<&'a [u8]>,
    /// The mask's batch: 1 when one mask serves every row.
    mask_batch: usize,
    /// Multiplies q·kᵀ.
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    /// One slope per query head.
    alibi: Option<&'a [f32]>,
}

impl Geometry<'_> {
    /// Keys a tile of query rows `r0..r1` can see at all, `lo..hi`: a causal tile stops at its
    /// last row's diagonal, a sliding window starts at its first row's oldest key.
    fn keys(&self, r0: usize, r1: usize) -> (usize, usize) {
        let hi = match self.mask {
            None => (r1 + self.t - self.s).min(self.t),
            Some(_) => self.t,
        };
        let lo = self.window.map_or(0, |w| (r0 + self.t - self.s + 1).saturating_sub(w));
        (lo, hi)
    }

    /// Turns query `i`'s row of scale·q·kᵀ over keys `lo..lo + row.len()` (batch row `bi`, head
    /// `head`) into the scores its softmax sees: soft-capped, plus the ALiBi bias, −∞ where masked.
    /// With `cap_grad`, also writes dc/draw = 1 − (c/cap)² per key. Each option is its own pass
    /// over the row, taken only when it is set.
    #[inline(always)]
    fn prepare_row(&self, bi: usize, head: usize, i: usize, lo: usize, row: &mut [f32], cap_grad: Option<&mut [f32]>) {
        if let Some(cap) = self.softcap {
            let inv = 1.0 / cap;
            match cap_grad {
                Some(cg) => {
                    for (x, g) in row.iter_mut().zip(cg) {
                        let c = tanh(*x * inv);
                        *x = cap * c;
                        *g = 1.0 - c * c;
                    }
                }
                None => row.iter_mut().for_each(|x| *x = cap * tanh(*x * inv)),
            }
        }
        if let Some(slopes) = self.alibi {
            // −slope·(i_abs − j) = slope·(j − i_abs)
            let slope = slopes[head];
            let first = lo as f32 - (i + self.t - self.s) as f32;
            for (j, x) in row.iter_mut().enumerate() {
                *x += slope * (first + j as f32);
            }
        }
        self.mask_row(bi, i, lo, row);
    }

    /// Sets masked scores of query `i` (batch row `bi`) to −∞, in a row of keys `lo..`.
    #[inline(always)]
    fn mask_row(&self, bi: usize, i: usize, lo: usize, row: &mut [f32]) {
        let n = row.len();
        match self.mask {
            None => {
                let limit = (i + 1 + self.t - self.s).min(lo + n) - lo;
                row[limit..].fill(f32::NEG_INFINITY);
            }
            Some(m) => {
                // A [1, 1, s, t] mask serves every row of the batch.
                let m = &m[((bi % self.mask_batch) * self.s + i) * self.t + lo..];
                for (x, &masked) in row.iter_mut().zip(m) {
                    if masked != 0 {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
        if let Some(w) = self.window {
            // Keys before i_abs − w + 1 are out of the window.
            let oldest = (i + self.t - self.s + 1).saturating_sub(w);
            row[..oldest.saturating_sub(lo).min(n)].fill(f32::NEG_INFINITY);
        }
    }
}

/// exp(x − lse) in place; masked scores (−∞) become 0. A fully masked row has lse = f32::MIN
/// and comes out all 0.
#[inline(always)]
fn exp_shifted(row: &mut [f32], lse: f32) {
    for x in row.iter_mut() {
        *x = exp(*x - lse);
    }
}

/// Softmax of a masked row in place; returns its log-sum-exp.
#[inline(always)]
fn softmax_row(row: &mut [f32]) -> f32 {
    let max = simd::max(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::MIN;
    }
    row.iter_mut().for_each(|x| *x = exp(*x - max));
    let sum = simd::sum(row);
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

multiversion! {
    // gemm's 14 arguments on one line each call: rustfmt would give each its own line.
    fn attention_forward_f32(q: &[f32], k: &[f32], v: &[f32], g: &Geometry) -> (Vec<f32>, Vec<f32>) {
        let Geometry { b, s, t, h, kv, d, scale, .. } = *g;
        let rep = h / kv;
        let mut out = vec![0f32; b * s * h * d];
        let mut lse = vec![0f32; b * h * s];
        let out_ptr = Shared(out.as_mut_ptr());
        let lse_ptr = Shared(lse.as_mut_ptr());
        (0..b * h).into_par_iter().for_each(|task| {
            let (bi, hi) = (task / h, task % h);
            let q0 = &q[(bi * s * h + hi) * d..];
            let k0 = &k[(bi * t * kv + hi / rep) * d..];
            let v0 = &v[(bi * t * kv + hi / rep) * d..];
            let mut scores = vec![0f32; TILE * t];
            for r0 in (0..s).step_by(TILE) {
                let rows = TILE.min(s - r0);
                let (lo, hi_key) = g.keys(r0, r0 + rows);
                let n = hi_key - lo;
                let (k_t, v_t) = (&k0[lo * kv * d..], &v0[lo * kv * d..]);
                // scores = scale · q_tile · k[lo..]ᵀ, [rows, n] with row stride t
                unsafe {
                    gemm(ONE_CORE, rows, n, d, scores.as_mut_ptr(), t as isize, false, q0[r0 * h * d..].as_ptr(), (h * d) as isize, 1, k_t.as_ptr(), 1, (kv * d) as isize, scale);
                }
                for ii in 0..rows {
                    let i = r0 + ii;
                    let row = &mut scores[ii * t..ii * t + n];
                    g.prepare_row(bi, hi, i, lo, row, None);
                    let row_lse = softmax_row(row);
                    unsafe { *lse_ptr.at((bi * h + hi) * s + i) = row_lse };
                }
                // out_tile = p · v
                unsafe {
                    gemm(ONE_CORE, rows, d, n, out_ptr.at(((bi * s + r0) * h + hi) * d), (h * d) as isize, false, scores.as_ptr(), t as isize, 1, v_t.as_ptr(), (kv * d) as isize, 1, 1.0);
                }
            }
        });
        (out, lse)
    }
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    // gemm's 14 arguments on one line each call: rustfmt would give each its own line.
    fn attention_backward_f32(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        grad: &[f32],
        g: &Geometry,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Geometry { b, s, t, h, kv, d, scale, .. } = *g;
        let rep = h / kv;
        let mut dq = vec![0f32; b * s * h * d];
        let mut dk = vec![0f32; b * t * kv * d];
        let mut dv = vec![0f32; b * t * kv * d];
        let (dq_ptr, dk_ptr, dv_ptr) = (Shared(dq.as_mut_ptr()), Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
        // One task per kv head: it alone accumulates that head's dk and dv, over its query heads.
        (0..b * kv).into_par_iter().for_each(|task| {
            let (bi, gi) = (task / kv, task % kv);
            let kv_off = (bi * t * kv + gi) * d;
            let mut p = vec![0f32; TILE * t];
            let mut dp = vec![0f32; TILE * t];
            // dc/draw of the soft-capped scores, kept from the rebuild of p to the scores' gradient
            let mut cap_grad = vec![0f32; if g.softcap.is_some() { TILE * t } else { 0 }];
            for hi in gi * rep..(gi + 1) * rep {
                for r0 in (0..s).step_by(TILE) {
                    let rows = TILE.min(s - r0);
                    let (lo, hi_key) = g.keys(r0, r0 + rows);
                    let n = hi_key - lo;
                    // keys lo.. of this kv head, and their rows of dk and dv
                    let kv_t = kv_off + lo * kv * d;
                    let (k_t, v_t) = (&k[kv_t..], &v[kv_t..]);
                    let row_off = ((bi * s + r0) * h + hi) * d;
                    let (q_t, o_t, g_t) = (&q[row_off..], &out[row_off..], &grad[row_off..]);
                    let ld = (h * d) as isize;
                    unsafe {
                        // p = softmax(scale · q kᵀ), rebuilt from the saved log-sum-exp
                        gemm(ONE_CORE, rows, n, d, p.as_mut_ptr(), t as isize, false, q_t.as_ptr(), ld, 1, k_t.as_ptr(), 1, (kv * d) as isize, scale);
                    }
                    for ii in 0..rows {
                        let i = r0 + ii;
                        let row = &mut p[ii * t..ii * t + n];
                        let cg = if g.softcap.is_some() { Some(&mut cap_grad[ii * t..ii * t + n]) } else { None };
                        g.prepare_row(bi, hi, i, lo, row, cg);
                        exp_shifted(row, lse[(bi * h + hi) * s + i]);
                    }
                    unsafe {
                        // dv += pᵀ · grad
                        gemm(ONE_CORE, n, d, rows, dv_ptr.at(kv_t), (kv * d) as isize, true, p.as_ptr(), 1, t as isize, g_t.as_ptr(), ld, 1, 1.0);
                        // dp = grad · vᵀ
                        gemm(ONE_CORE, rows, n, d, dp.as_mut_ptr(), t as isize, false, g_t.as_ptr(), ld, 1, v_t.as_ptr(), 1, (kv * d) as isize, 1.0);
                    }
                    // ds = p · (dp − Σ grad·out), the softmax's backward, times the score scale
                    for ii in 0..rows {
                        let o = &o_t[ii * h * d..ii * h * d + d];
                        let gr = &g_t[ii * h * d..ii * h * d + d];
                        let dot: f32 = o.iter().zip(gr).map(|(a, b)| a * b).sum();
                        let (pr, dr) = (&p[ii * t..ii * t + n], &mut dp[ii * t..ii * t + n]);
                        for (x, &pv) in dr.iter_mut().zip(pr) {
                            *x = pv * (*x - dot) * scale;
                        }
                        if g.softcap.is_some() {
                            // through the cap: d raw = d c · (1 − (c/cap)²)
                            dr.iter_mut().zip(&cap_grad[ii * t..ii * t + n]).for_each(|(x, &cg)| *x *= cg);
                        }
                    }
                    unsafe {
                        // dq = ds · k
                        gemm(ONE_CORE, rows, d, n, dq_ptr.at(row_off), ld, false, dp.as_ptr(), t as isize, 1, k_t.as_ptr(), (kv * d) as isize, 1, 1.0);
                        // dk += dsᵀ · q
                        gemm(ONE_CORE, n, d, rows, dk_ptr.at(kv_t), (kv * d) as isize, true, dp.as_ptr(), 1, t as isize, q_t.as_ptr(), ld, 1, 1.0);
                    }
                }
            }
        });
        (dq, dk, dv)
    }
}

/// The shapes the raw kernels index by, checked: q `[b, s, h, d]`, k and v `[b, t, kv, d]` with
/// h a multiple of kv, an explicit mask `[b or 1, 1, s, t]`, one ALiBi slope per query head, a
/// window of at least one key, and any further tensor (the output and its gradient) shaped as q.
fn geometry<'a>(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    mask: &'a Option<FlexTensor>,
    opts: &'a AttentionOptions,
    like_q: &[&FlexTensor],
) -> Geometry<'a> {
    let (qd, kd, vd) = (dims(q), dims(k), dims(v));
    assert!(
        qd.len() == 4 && kd.len() == 4 && kd == vd && qd[0] == kd[0] && qd[3] == kd[3] && kd[2] > 0 && qd[2] % kd[2] == 0 && qd[1] <= kd[1],
        "fused attention: q {qd:?}, k {kd:?}, v {vd:?} (expected q [b, s, h, d], k = v [b, t, kv, d], h a multiple of kv, s <= t)"
    );
    for t in like_q {
        assert_eq!(dims(t), qd, "fused attention: output or gradient shaped unlike q");
    }
    let mut mask_batch = 1;
    if let Some(m) = mask {
        let md = dims(m);
        assert!(
            md.len() == 4 && (md[0] == 1 || md[0] == qd[0]) && md[1] == 1 && md[2] == qd[1] && md[3] == kd[1],
            "fused attention: mask {md:?} for q {qd:?}, k {kd:?} (expected [b or 1, 1, s, t])"
        );
        mask_batch = md[0];
    }
    if let Some(slopes) = &opts.alibi {
        assert_eq!(slopes.len(), qd[2], "fused attention: {} ALiBi slopes for q {qd:?}", slopes.len());
    }
    assert!(opts.window != Some(0), "fused attention: a sliding window of 0 keys");
    let d = qd[3];
    // The default scale as the kernels always computed it, in f32 (1/√d rounded from f64 differs
    // in the last bit for some d, 96 among them).
    let scale = if opts.scale == 1.0 / (d as f64).sqrt() { 1.0 / (d as f32).sqrt() } else { opts.scale as f32 };
    Geometry {
        b: qd[0],
        s: qd[1],
        h: qd[2],
        d,
        t: kd[1],
        kv: kd[2],
        mask: mask.as_ref().map(|m| m.storage::<u8>()),
        mask_batch,
        scale,
        softcap: opts.softcap.map(|c| c as f32),
        window: opts.window,
        alibi: opts.alibi.as_deref(),
    }
}

/// x `[n, in]` (and x_lora like it), w `[in, out]`, lora_A `[in, r]`, lora_B `[r, out]`, bias
/// `[out]`, the output gradient `[n, out]`: what the raw gemm calls of lora_linear index by.
fn check_lora(
    x: &FlexTensor,
    x_lora: Option<&FlexTensor>,
    w: &FlexTensor,
    a: &FlexTensor,
    b: &FlexTensor,
    bias: Option<&FlexTensor>,
    grad: Option<&FlexTensor>,
) {
    let (xd, wd, ad, bd) = (dims(x), dims(w), dims(a), dims(b));
    assert!(
        xd.len() == 2
            && wd.len() == 2
            && ad.len() == 2
            && bd.len() == 2
            && xd[1] == wd[0]
            && ad[0] == wd[0]
            && ad[1] == bd[0]
            && bd[1] == wd[1],
        "lora_linear: x {xd:?}, w {wd:?}, lora_A {ad:?}, lora_B {bd:?} (expected [n, in], [in, out], [in, r], [r, out])"
    );
    if let Some(xl) = x_lora {
        assert_eq!(dims(xl), xd, "lora_linear: x after dropout shaped unlike x");
    }
    if let Some(bias) = bias {
        assert_eq!(dims(bias), [wd[1]], "lora_linear: bias for {} outputs", wd[1]);
    }
    if let Some(g) = grad {
        assert_eq!(dims(g), [xd[0], wd[1]], "lora_linear: output gradient shape");
    }
}

/// One row of [`FusedOps::cross_entropy`] with soft-capped logits: the softmax of
/// c = cap·tanh(x/cap), its gradient chained back to x through 1 − (c/cap)² (tanh recomputed
/// rather than kept: the row's buffer holds c, then the gradient). Returns coef·nll.
#[inline(always)]
fn capped_cross_entropy_row(x: &[f32], g: &mut [f32], target: usize, w: f32, cap: f32) -> f64 {
    let inv = 1.0 / cap;
    for (g, &v) in g.iter_mut().zip(x) {
        *g = cap * tanh(v * inv);
    }
    let max = simd::max(g);
    let picked = g[target];
    g.iter_mut().for_each(|g| *g = exp(*g - max));
    let sum = simd::sum(g);
    let scale = w / sum;
    for (g, &v) in g.iter_mut().zip(x) {
        let c = tanh(v * inv);
        *g *= scale * (1.0 - c * c);
    }
    let c = tanh(x[target] * inv);
    g[target] -= w * (1.0 - c * c);
    (max + sum.ln() - picked) as f64 * w as f64
}

multiversion! {
    /// Σ coef·nll over the rows of `xs` (`[rows, vocab]`) and the logits' gradient. Per row:
    /// max, Σ exp, then the gradient (softmax − one-hot)·coef in one more pass.
    fn cross_entropy_f32(xs: &[f32], vocab: usize, targets: &[u32], coef: &[f32], softcap: Option<f64>) -> (f64, Vec<f32>) {
        let mut grad = vec![0f32; xs.len()];
        let loss: f64 = grad
            .par_chunks_mut(vocab)
            .enumerate()
            .map(|(i, g)| {
                let x = &xs[i * vocab..][..vocab];
                if let Some(cap) = softcap {
                    return capped_cross_entropy_row(x, g, targets[i] as usize, coef[i], cap as f32);
                }
                let max = simd::max(x);
                for (g, &v) in g.iter_mut().zip(x) {
                    *g = exp(v - max);
                }
                let sum = simd::sum(g);
                let w = coef[i];
                let scale = w / sum;
                g.iter_mut().for_each(|g| *g *= scale);
                let t = targets[i] as usize;
                g[t] -= w;
                let nll = (max + sum.ln() - x[t]) as f64;
                nll * w as f64
            })
            .sum();
        (loss, grad)
    }
}

multiversion! {
    /// x/rms(x)·w per row of d = w's length, and each row's 1/rms.
    fn rms_norm_f32(xs: &[f32], ws: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
        let d = ws.len();
        let n = xs.len() / d;
        let mut out = vec![0f32; n * d];
        let mut rstd = vec![0f32; n];
        out.par_chunks_mut(ROWS_PER_TASK * d).zip(rstd.par_chunks_mut(ROWS_PER_TASK)).enumerate().for_each(|(c, (out, rstd))| {
            for (r, (o, rs)) in out.chunks_mut(d).zip(rstd.iter_mut()).enumerate() {
                let x = &xs[(c * ROWS_PER_TASK + r) * d..][..d];
                let ms = simd::sum_zip(x, x, |a, b| a * b) / d as f32;
                *rs = 1.0 / (ms + eps).sqrt();
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(ws) {
                    *o = x * *rs * w;
                }
            }
        });
        (out, rstd)
    }
}

multiversion! {
    /// The gradient of x through [`rms_norm_f32`].
    fn rms_norm_backward_f32(xs: &[f32], ws: &[f32], rs: &[f32], gs: &[f32]) -> Vec<f32> {
        let d = ws.len();
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(ROWS_PER_TASK * d).enumerate().for_each_init(
            || vec![0f32; d],
            |gw, (c, dx)| {
                for (r, dx) in dx.chunks_mut(d).enumerate() {
                    let row = c * ROWS_PER_TASK + r;
                    let (x, g, rs) = (&xs[row * d..][..d], &gs[row * d..][..d], rs[row]);
                    gw.iter_mut().zip(g).zip(ws).for_each(|((o, &g), &w)| *o = g * w);
                    let dot = simd::sum_zip(x, gw, |x, gw| x * gw) / d as f32;
                    let c2 = rs * rs * dot;
                    for ((o, &x), &gw) in dx.iter_mut().zip(x).zip(gw.iter()) {
                        *o = rs * (gw - x * c2);
                    }
                }
            },
        );
        dx
    }
}

multiversion! {
    /// (x − mean)/σ·w + b per row of d = w's length, and each row's (mean, 1/σ).
    fn layer_norm_f32(xs: &[f32], ws: &[f32], bs: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
        let d = ws.len();
        let n = xs.len() / d;
        let mut out = vec![0f32; n * d];
        let mut stats = vec![0f32; n * 2];
        out.par_chunks_mut(ROWS_PER_TASK * d).zip(stats.par_chunks_mut(ROWS_PER_TASK * 2)).enumerate().for_each(|(c, (out, stats))| {
            for (r, (o, st)) in out.chunks_mut(d).zip(stats.chunks_mut(2)).enumerate() {
                let x = &xs[(c * ROWS_PER_TASK + r) * d..][..d];
                // Two passes, mean then Σ(x − mean)²: no cancellation when the mean is large.
                let mean = simd::sum(x) / d as f32;
                let var = simd::sum_zip(x, x, |a, _| (a - mean) * (a - mean)) / d as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(ws).zip(bs) {
                    *o = (x - mean) * rstd * w + b;
                }
                st.copy_from_slice(&[mean, rstd]);
            }
        });
        (out, stats)
    }
}

multiversion! {
    /// The gradient of x through [`layer_norm_f32`].
    fn layer_norm_backward_f32(xs: &[f32], ws: &[f32], st: &[f32], gs: &[f32]) -> Vec<f32> {
        let d = ws.len();
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(ROWS_PER_TASK * d).enumerate().for_each_init(
            || vec![0f32; d],
            |gw, (c, dx)| {
                for (r, dx) in dx.chunks_mut(d).enumerate() {
                    let row = c * ROWS_PER_TASK + r;
                    let (x, g) = (&xs[row * d..][..d], &gs[row * d..][..d]);
                    let (mean, rstd) = (st[2 * row], st[2 * row + 1]);
                    gw.iter_mut().zip(g).zip(ws).for_each(|((o, &g), &w)| *o = g * w);
                    // mean(g·w) and mean(g·w·x̂)
                    let mean_g = simd::sum(gw) / d as f32;
                    let mean_gx = simd::sum_zip(gw, x, |gw, x| gw * (x - mean) * rstd) / d as f32;
                    for ((o, &x), &gw) in dx.iter_mut().zip(x).zip(gw.iter()) {
                        *o = rstd * (gw - mean_g - (x - mean) * rstd * mean_gx);
                    }
                }
            },
        );
        dx
    }
}

multiversion! {
    /// Rotates the first r of each head's d dimensions of x `[positions, h, d]` by its
    /// position's cos and sin (`[positions, r]`), as rotate_half does; the rest pass through.
    fn rope_f32(xs: &[f32], cs: &[f32], ss: &[f32], h: usize, d: usize, r: usize) -> Vec<f32> {
        let half = r / 2;
        let mut out = vec![0f32; xs.len()];
        // One task per chunk of positions; every head of a position shares its cos and sin.
        out.par_chunks_mut(ROWS_PER_TASK * h * d).enumerate().for_each(|(c, out)| {
            for (p, o) in out.chunks_mut(h * d).enumerate() {
                let pos = c * ROWS_PER_TASK + p;
                let (cos, sin) = (&cs[pos * r..][..r], &ss[pos * r..][..r]);
                for (head, o) in o.chunks_mut(d).enumerate() {
                    let x = &xs[(pos * h + head) * d..][..d];
                    let (o_lo, o_hi) = o.split_at_mut(half);
                    let (x_lo, x_hi) = (&x[..half], &x[half..r]);
                    for i in 0..half {
                        o_lo[i] = x_lo[i] * cos[i] + x_hi[i] * sin[i];
                        o_hi[i] = x_hi[i] * cos[i + half] + x_lo[i] * sin[i + half];
                    }
                    // Past the rotary dimensions, each head passes through.
                    o[r..].copy_from_slice(&x[r..]);
                }
            }
        });
        out
    }
}

/// The mask as the kernels read it: `Some(None)` for causal, `Some(Some(bytes))` for an
/// explicit mask stored one byte per element, None when it is stored otherwise (the kernels
/// then leave the call to the reference path).
fn kernel_mask(mask: &Mask<Flex>) -> Option<Option<FlexTensor>> {
    match mask {
        Mask::Causal => Some(None),
        Mask::Explicit(m) => {
            let m = contiguous(m.clone());
            let one_byte_each = m.layout().shape().iter().product::<usize>() == m.storage::<u8>().len();
            one_byte_each.then_some(Some(m))
        }
    }
}

impl FusedOps for Flex {
    fn quant_linear(x: FloatTensor<Self>, x_lora: Option<FloatTensor<Self>>, p: QuantLinear<Self>) -> FloatTensor<Self> {
        quant::forward(x, x_lora, p)
    }

    fn quant_linear_input_grad(w: &crate::quant::SharedMatrix, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        quant::input_grad(w, grad)
    }

    #[allow(clippy::type_complexity)]
    fn quant_lora_linear_backward(
        x: FloatTensor<Self>,
        x_lora: Option<FloatTensor<Self>>,
        p: QuantLinear<Self>,
        grad: FloatTensor<Self>,
        need_dx: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>) {
        quant::lora_backward(x, x_lora, p, grad, need_dx)
    }

    fn cross_entropy(
        logits: FloatTensor<Self>,
        targets: &[u32],
        coef: &[f32],
        softcap: Option<f64>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&logits]) {
            return reference::cross_entropy::<Self>(logits, targets, coef, softcap);
        }
        let logits = contiguous(logits);
        let shape = dims(&logits);
        assert!(
            shape.len() == 2 && targets.len() == shape[0] && coef.len() == shape[0],
            "cross_entropy: logits {shape:?} for {} targets and {} weights",
            targets.len(),
            coef.len()
        );
        let vocab = shape[1];
        if let Some((row, t)) = targets.iter().enumerate().find(|&(_, &t)| t as usize >= vocab) {
            panic!("cross_entropy: target {t} of row {row} is not below the vocabulary size {vocab} (logits {shape:?})");
        }
        let (loss, grad) = cross_entropy_f32(logits.storage::<f32>(), vocab, targets, coef, softcap);
        (tensor(vec![loss as f32], vec![1]), tensor(grad, shape))
    }

    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        if !bf16_base(&w, &[&x]) {
            return reference::frozen_matmul::<Self>(x, w);
        }
        let x = contiguous(x);
        let (xd, wd) = (dims(&x), dims(&w));
        assert!(xd.len() == 2 && wd.len() == 2 && xd[1] == wd[0], "frozen_matmul: x {xd:?}, w {wd:?} (expected [n, k], [k, m])");
        let mut y = vec![0f32; xd[0] * wd[1]];
        bf16_matmul(x.storage::<f32>(), xd[0], &w, &mut y, false);
        tensor(y, vec![xd[0], wd[1]])
    }

    // gemm's 14 arguments on one line each call: rustfmt would give each its own line.
    #[rustfmt::skip]
    fn lora_linear(x: FloatTensor<Self>, x_lora: Option<FloatTensor<Self>>, p: LoraLinear<Self>) -> FloatTensor<Self> {
        let mut ts = vec![&x, &p.a, &p.b];
        ts.extend(x_lora.iter().chain(p.bias.iter()));
        let bf16 = bf16_base(&p.w, &ts);
        let f32_base = all_f32(&ts) && p.w.dtype() == DType::F32;
        if !(bf16 || f32_base) {
            return reference::lora_linear::<Self>(x, x_lora, p);
        }
        // A bf16 weight is read through its strides (a transposed view as loaded): copying it
        // to row-major order would cost more than the product.
        let w = if bf16 { p.w } else { contiguous(p.w) };
        let (x, a, b) = (contiguous(x), contiguous(p.a), contiguous(p.b));
        check_lora(&x, x_lora.as_ref(), &w, &a, &b, p.bias.as_ref(), None);
        let x_lora = x_lora.map(contiguous);
        let (n, din) = (dims(&x)[0], dims(&x)[1]);
        let (dout, r) = (dims(&w)[1], dims(&a)[1]);
        let (xs, as_, bs) = (x.storage::<f32>(), a.storage::<f32>(), b.storage::<f32>());
        let xl = x_lora.as_ref().map_or(xs, |t| t.storage::<f32>());
        let mut y = vec![0f32; n * dout];
        let mut down = vec![0f32; n * r];
        if bf16 {
            bf16_matmul(xs, n, &w, &mut y, false);
        }
        unsafe {
            // y = x·w, down = x_lora·a, y += scale · down·b: the adapter's output lands in y's
            // buffer with no separate add.
            if !bf16 {
                gemm(ALL_CORES, n, dout, din, y.as_mut_ptr(), dout as isize, false, xs.as_ptr(), din as isize, 1, w.storage::<f32>().as_ptr(), dout as isize, 1, 1.0);
            }
            gemm(ALL_CORES, n, r, din, down.as_mut_ptr(), r as isize, false, xl.as_ptr(), din as isize, 1, as_.as_ptr(), r as isize, 1, 1.0);
            gemm(ALL_CORES, n, dout, r, y.as_mut_ptr(), dout as isize, true, down.as_ptr(), r as isize, 1, bs.as_ptr(), dout as isize, 1, p.scale as f32);
        }
        if let Some(bias) = p.bias {
            let bias = contiguous(bias);
            let bias = bias.storage::<f32>();
            y.par_chunks_mut(ROWS_PER_TASK * dout).for_each(|rows| {
                for row in rows.chunks_mut(dout) {
                    row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
                }
            });
        }
        tensor(y, vec![n, dout])
    }

    // gemm's 14 arguments on one line each call: rustfmt would give each its own line.
    #[rustfmt::skip]
    fn lora_linear_backward(
        x: FloatTensor<Self>,
        x_lora: Option<FloatTensor<Self>>,
        p: LoraLinear<Self>,
        grad: FloatTensor<Self>,
        need_dx: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>) {
        let mut ts = vec![&x, &p.a, &p.b, &grad];
        ts.extend(x_lora.iter());
        let bf16 = bf16_base(&p.w, &ts);
        let f32_base = all_f32(&ts) && p.w.dtype() == DType::F32;
        if !(bf16 || f32_base) {
            return reference::lora_linear_backward::<Self>(x, x_lora, p, grad, need_dx);
        }
        let w = if bf16 { p.w } else { contiguous(p.w) };
        let (x, a, b, g) = (contiguous(x), contiguous(p.a), contiguous(p.b), contiguous(grad));
        check_lora(&x, x_lora.as_ref(), &w, &a, &b, None, Some(&g));
        let x_lora = x_lora.map(contiguous);
        let (n, din) = (dims(&x)[0], dims(&x)[1]);
        let (dout, r) = (dims(&w)[1], dims(&a)[1]);
        let (xs, as_, bs, gs) = (x.storage::<f32>(), a.storage::<f32>(), b.storage::<f32>(), g.storage::<f32>());
        let xl = x_lora.as_ref().map_or(xs, |t| t.storage::<f32>());
        let s = p.scale as f32;
        let mut down = vec![0f32; n * r];
        let mut v = vec![0f32; n * r];
        let mut da = vec![0f32; din * r];
        let mut db = vec![0f32; r * dout];
        let mut dx = vec![0f32; if need_dx { n * din } else { 0 }];
        let mut dx_lora = vec![0f32; if x_lora.is_some() { n * din } else { 0 }];
        unsafe {
            // down = x_lora·a (recomputed: [n, r] is cheap), v = grad·bᵀ
            gemm(ALL_CORES, n, r, din, down.as_mut_ptr(), r as isize, false, xl.as_ptr(), din as isize, 1, as_.as_ptr(), r as isize, 1, 1.0);
            gemm(ALL_CORES, n, r, dout, v.as_mut_ptr(), r as isize, false, gs.as_ptr(), dout as isize, 1, bs.as_ptr(), 1, dout as isize, 1.0);
            // db = scale · downᵀ·grad, da = scale · x_loraᵀ·v
            gemm(ALL_CORES, r, dout, n, db.as_mut_ptr(), dout as isize, false, down.as_ptr(), 1, r as isize, gs.as_ptr(), dout as isize, 1, s);
            gemm(ALL_CORES, din, r, n, da.as_mut_ptr(), r as isize, false, xl.as_ptr(), 1, din as isize, v.as_ptr(), r as isize, 1, s);
            if need_dx {
                // dx = grad·wᵀ (+ scale · v·aᵀ when the adapter saw x itself)
                if bf16 {
                    bf16_matmul(gs, n, &Flex::float_transpose(w.clone()), &mut dx, false);
                } else {
                    gemm(ALL_CORES, n, din, dout, dx.as_mut_ptr(), din as isize, false, gs.as_ptr(), dout as isize, 1, w.storage::<f32>().as_ptr(), 1, dout as isize, 1.0);
                }
                if x_lora.is_none() {
                    gemm(ALL_CORES, n, din, r, dx.as_mut_ptr(), din as isize, true, v.as_ptr(), r as isize, 1, as_.as_ptr(), 1, r as isize, s);
                }
            }
            if x_lora.is_some() {
                gemm(ALL_CORES, n, din, r, dx_lora.as_mut_ptr(), din as isize, false, v.as_ptr(), r as isize, 1, as_.as_ptr(), 1, r as isize, s);
            }
        }
        let dx = need_dx.then(|| tensor(dx, vec![n, din]));
        let dx_lora = x_lora.is_some().then(|| tensor(dx_lora, vec![n, din]));
        (dx, dx_lora, tensor(da, vec![din, r]), tensor(db, vec![r, dout]))
    }

    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Mask<Self>,
        opts: &AttentionOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let Some(m) = kernel_mask(&mask).filter(|_| all_f32(&[&q, &k, &v])) else {
            return reference::attention_forward::<Self>(q, k, v, mask, opts);
        };
        let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
        let g = geometry(&q, &k, &v, &m, opts, &[]);
        let (out, lse) = attention_forward_f32(q.storage(), k.storage(), v.storage(), &g);
        (tensor(out, vec![g.b, g.s, g.h, g.d]), tensor(lse, vec![g.b, g.h, g.s]))
    }

    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Mask<Self>,
        opts: &AttentionOptions,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let Some(m) = kernel_mask(&mask).filter(|_| all_f32(&[&q, &k, &v, &out, &lse, &grad])) else {
            return reference::attention_backward::<Self>(q, k, v, mask, opts, out, lse, grad);
        };
        let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
        let (out, lse, grad) = (contiguous(out), contiguous(lse), contiguous(grad));
        let g = geometry(&q, &k, &v, &m, opts, &[&out, &grad]);
        assert_eq!(dims(&lse), [g.b, g.h, g.s], "fused attention: log-sum-exp shape");
        let (dq, dk, dv) = attention_backward_f32(q.storage(), k.storage(), v.storage(), out.storage(), lse.storage(), grad.storage(), &g);
        let kv_shape = vec![g.b, g.t, g.kv, g.d];
        (tensor(dq, vec![g.b, g.s, g.h, g.d]), tensor(dk, kv_shape.clone()), tensor(dv, kv_shape))
    }

    fn rms_norm_forward(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&x, &w]) {
            return reference::rms_norm_forward::<Self>(x, w, eps);
        }
        let (x, w) = (contiguous(x), contiguous(w));
        let shape = dims(&x);
        assert!(shape.last() == dims(&w).last() && dims(&w).len() == 1, "rms_norm: x {shape:?}, weight {:?}", dims(&w));
        let (out, rstd) = rms_norm_f32(x.storage::<f32>(), w.storage::<f32>(), eps as f32);
        let n = rstd.len();
        (tensor(out, shape), tensor(rstd, vec![n, 1]))
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if !all_f32(&[&x, &w, &rstd, &grad]) {
            return reference::rms_norm_backward::<Self>(x, w, rstd, grad);
        }
        let (x, w, rstd, grad) = (contiguous(x), contiguous(w), contiguous(rstd), contiguous(grad));
        let shape = dims(&x);
        assert!(
            shape.last() == dims(&w).last()
                && dims(&grad) == shape
                && dims(&rstd)[0] * shape[shape.len() - 1] == shape.iter().product::<usize>(),
            "rms_norm backward: x {shape:?}, weight {:?}, 1/rms {:?}, gradient {:?}",
            dims(&w),
            dims(&rstd),
            dims(&grad)
        );
        let dx = rms_norm_backward_f32(x.storage::<f32>(), w.storage::<f32>(), rstd.storage::<f32>(), grad.storage::<f32>());
        tensor(dx, shape)
    }

    fn layer_norm_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&x, &w, &b]) {
            return reference::layer_norm_forward::<Self>(x, w, b, eps);
        }
        let (x, w, b) = (contiguous(x), contiguous(w), contiguous(b));
        let shape = dims(&x);
        assert!(
            shape.len() == 2 && dims(&w) == [shape[1]] && dims(&b) == [shape[1]],
            "layer_norm: x {shape:?}, weight {:?}, bias {:?} (expected [n, d], [d], [d])",
            dims(&w),
            dims(&b)
        );
        let (out, stats) = layer_norm_f32(x.storage::<f32>(), w.storage::<f32>(), b.storage::<f32>(), eps as f32);
        let n = shape[0];
        (tensor(out, shape), tensor(stats, vec![n, 2]))
    }

    fn layer_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if !all_f32(&[&x, &w, &stats, &grad]) {
            return reference::layer_norm_backward::<Self>(x, w, stats, grad);
        }
        let (x, w, stats, grad) = (contiguous(x), contiguous(w), contiguous(stats), contiguous(grad));
        let shape = dims(&x);
        assert!(
            shape.len() == 2 && dims(&w) == [shape[1]] && dims(&stats) == [shape[0], 2] && dims(&grad) == shape,
            "layer_norm backward: x {shape:?}, weight {:?}, stats {:?}, gradient {:?}",
            dims(&w),
            dims(&stats),
            dims(&grad)
        );
        let dx = layer_norm_backward_f32(x.storage::<f32>(), w.storage::<f32>(), stats.storage::<f32>(), grad.storage::<f32>());
        tensor(dx, shape)
    }

    fn fused_rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        if !all_f32(&[&x, &cos, &sin]) {
            return reference::fused_rope::<Self>(x, cos, sin);
        }
        let (x, cos, sin) = (contiguous(x), contiguous(cos), contiguous(sin));
        let shape = dims(&x);
        let r = dims(&cos).get(3).copied().unwrap_or(0);
        let table = [shape.first().copied().unwrap_or(0), shape.get(1).copied().unwrap_or(0), 1, r];
        assert!(
            shape.len() == 4 && dims(&cos) == table && dims(&sin) == table && r.is_multiple_of(2) && r <= shape[3],
            "rope: x {shape:?}, cos {:?}, sin {:?} (expected tables [b, s, 1, r] with r even and at most the head dim)",
            dims(&cos),
            dims(&sin)
        );
        let out = rope_f32(x.storage::<f32>(), cos.storage::<f32>(), sin.storage::<f32>(), shape[2], shape[3], r);
        tensor(out, shape)
    }

    fn fused_glu(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: Activation) -> FloatTensor<Self> {
        if !all_f32(&[&gate, &up]) {
            return reference::fused_glu::<Self>(gate, up, act);
        }
        let (gate, up) = (contiguous(gate), contiguous(up));
        let shape = dims(&gate);
        assert_eq!(dims(&up), shape, "glu: gate {shape:?} and up {:?} shapes", dims(&up));
        let (gs, us) = (gate.storage::<f32>(), up.storage::<f32>());
        let out = match act {
            Activation::Silu => glu_f32::<Silu>(gs, us),
            Activation::GeluTanh => glu_f32::<GeluTanh>(gs, us),
            Activation::Gelu => glu_f32::<Gelu>(gs, us),
        };
        tensor(out, shape)
    }

    fn glu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        act: Activation,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&gate, &up, &grad]) {
            return reference::glu_backward::<Self>(gate, up, act, grad);
        }
        let (gate, up, grad) = (contiguous(gate), contiguous(up), contiguous(grad));
        let shape = dims(&gate);
        assert!(
            dims(&up) == shape && dims(&grad) == shape,
            "glu backward: gate {shape:?}, up {:?} and gradient {:?} shapes",
            dims(&up),
            dims(&grad)
        );
        let (gs, us, ds) = (gate.storage::<f32>(), up.storage::<f32>(), grad.storage::<f32>());
        let (dgate, dup) = match act {
            Activation::Silu => glu_backward_f32::<Silu>(gs, us, ds),
            Activation::GeluTanh => glu_backward_f32::<GeluTanh>(gs, us, ds),
            Activation::Gelu => glu_backward_f32::<Gelu>(gs, us, ds),
        };
        (tensor(dgate, shape.clone()), tensor(dup, shape))
    }

    fn fused_activation(x: FloatTensor<Self>, act: Activation) -> FloatTensor<Self> {
        if !all_f32(&[&x]) {
            return prim(reference::activation::<Self, 2>(float(x), act));
        }
        let x = contiguous(x);
        let (shape, xs) = (dims(&x), x.storage::<f32>());
        let out = match act {
            Activation::Silu => activation_f32::<Silu>(xs, None),
            Activation::GeluTanh => activation_f32::<GeluTanh>(xs, None),
            Activation::Gelu => activation_f32::<Gelu>(xs, None),
        };
        tensor(out, shape)
    }

    fn activation_backward(x: FloatTensor<Self>, act: Activation, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        if !all_f32(&[&x, &grad]) {
            return reference::activation_backward::<Self>(x, act, grad);
        }
        let (x, grad) = (contiguous(x), contiguous(grad));
        let shape = dims(&x);
        assert_eq!(dims(&grad), shape, "activation backward: x {shape:?} and gradient {:?} shapes", dims(&grad));
        let (xs, ds) = (x.storage::<f32>(), grad.storage::<f32>());
        let dx = match act {
            Activation::Silu => activation_f32::<Silu>(xs, Some(ds)),
            Activation::GeluTanh => activation_f32::<GeluTanh>(xs, Some(ds)),
            Activation::Gelu => activation_f32::<Gelu>(xs, Some(ds)),
        };
        tensor(dx, shape)
    }
}
