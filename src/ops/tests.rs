//! Each fused operation, through autodiff, against the same computation written as plain burn
//! ops and differentiated by burn: outputs and input gradients must agree. On burn-flex this
//! checks the CPU kernels and their backward passes; on burn-ndarray, the generic backward
//! formulas of [`super::FusedOps`].
//!
//! The plain-op side runs in f64. burn's autodiff takes every division's gradient through
//! `recip`, which burn-ndarray computes with the 12-bit `rcpps` estimate on AVX2: an f32
//! reference of softmax or a norm is itself ~1e-4 off there, as large as the tolerance.

use burn::backend::autodiff::grads::Gradients;
use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Distribution, ElementConversion, Tensor, TensorData};

use burn::tensor::ops::FloatTensor;

use super::{float, prim, Activation, AttentionOptions, FusedOps, Mask};

type A<B> = Autodiff<B>;

fn random<B: FusedOps, const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

/// f32 rounding differs between the two orders of computation by ~1e-5 of the largest value.
const TOL: f32 = 1e-4;

/// Largest |a − b| relative to the largest |b|.
fn rel_diff<B: FusedOps, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    let scale: f32 = b.clone().abs().max().into_scalar().elem();
    let d: f32 = (a - b).abs().max().into_scalar().elem();
    d / scale.max(1e-12)
}

fn wide<B: FusedOps, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.cast(DType::F64)
}

fn narrow<B: FusedOps, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.cast(DType::F32)
}

/// Asserts the gradients the two graphs gave each tensor agree.
fn check_grads<B: FusedOps, const D: usize>(fused: &Gradients, naive: &Gradients, xs: &[(&str, &Tensor<A<B>, D>)], what: &str) {
    check_grads_within::<B, D>(fused, naive, xs, what, TOL)
}

fn check_grads_within<B: FusedOps, const D: usize>(
    fused: &Gradients,
    naive: &Gradients,
    xs: &[(&str, &Tensor<A<B>, D>)],
    what: &str,
    tol: f32,
) {
    for (name, x) in xs {
        let (f, n) = (x.grad(fused), x.grad(naive));
        assert!(f.is_some() && n.is_some(), "{what}: d{name}: fused {} naive {}", f.is_some(), n.is_some());
        let r = rel_diff(f.unwrap(), n.unwrap());
        assert!(r < tol, "{what}: d{name} differs by {r}");
    }
}

/// A `[rows, 1, s, t]` mask, true where `hidden(row, i, j)`: key j hidden from query i.
fn mask<B: FusedOps>([rows, s, t]: [usize; 3], hidden: impl Fn(usize, usize, usize) -> bool) -> Tensor<A<B>, 4, Bool> {
    let mut data = Vec::with_capacity(rows * s * t);
    for r in 0..rows {
        for i in 0..s {
            data.extend((0..t).map(|j| hidden(r, i, j)));
        }
    }
    Tensor::from_data(TensorData::new(data, [rows, 1, s, t]), &Default::default())
}

/// Attention as transformers writes it: repeat kv heads, scale·q·kᵀ, cap·tanh(·/cap), plus the
/// ALiBi bias −slope·(i_abs − j), −∞ where masked or outside the window, softmax, times v.
fn naive_attention<B: FusedOps>(
    q: Tensor<A<B>, 4>,
    k: Tensor<A<B>, 4>,
    v: Tensor<A<B>, 4>,
    masked: Tensor<A<B>, 4, Bool>,
    opts: &AttentionOptions,
) -> Tensor<A<B>, 4> {
    let (q, k, v) = (wide(q), wide(k), wide(v));
    let [b, s, h, d] = q.dims();
    let [_, t, kv, _] = k.dims();
    let repeat = |x: Tensor<A<B>, 4>| x.swap_dims(1, 2).unsqueeze_dim::<5>(2).expand([b, kv, h / kv, t, d]).reshape([b, h, t, d]);
    let mut scores = q.swap_dims(1, 2).matmul(repeat(k).swap_dims(2, 3)) * opts.scale;
    if let Some(cap) = opts.softcap {
        scores = (scores / cap).tanh() * cap;
    }
    if let Some(slopes) = &opts.alibi {
        let bias: Vec<f32> =
            (0..h).flat_map(|hh| (0..s).flat_map(move |i| (0..t).map(move |j| -slopes[hh] * ((i + t - s) as f32 - j as f32)))).collect();
        scores = scores + wide(Tensor::<A<B>, 4>::from_data(TensorData::new(bias, [1, h, s, t]), &Default::default()));
    }
    let mut masked = masked.expand([b, h, s, t]);
    if let Some(w) = opts.window {
        masked = masked.bool_or(mask::<B>([1, s, t], |_, i, j| i + t - s >= j + w).expand([b, h, s, t]));
    }
    let scores = scores.mask_fill(masked, f32::NEG_INFINITY);
    narrow(softmax(scores, 3).matmul(repeat(v)).swap_dims(1, 2))
}

/// Runs fused and naive attention on the same inputs under autodiff and compares the outputs
/// and the gradients of q, k and v for a random upstream gradient. `mask` None is causal.
fn check_attention<B: FusedOps>(
    [b, s, t, h, kv]: [usize; 5],
    mask: Option<Tensor<A<B>, 4, Bool>>,
    opts: impl FnOnce(&mut AttentionOptions),
    what: &str,
) {
    let d = 8;
    let q = random::<A<B>, 4>([b, s, h, d]).require_grad();
    let k = random::<A<B>, 4>([b, t, kv, d]).require_grad();
    let v = random::<A<B>, 4>([b, t, kv, d]).require_grad();
    let up = random::<A<B>, 4>([b, s, h, d]);
    let (fused_mask, masked) = match mask {
        None => (Mask::Causal, self::mask::<B>([1, s, t], |_, i, j| j > i + (t - s))),
        Some(m) => (Mask::Explicit(m.clone().into_primitive()), m),
    };
    let mut o = AttentionOptions::new(d);
    opts(&mut o);
    let fused = float::<A<B>, 4>(A::<B>::fused_attention(prim(q.clone()), prim(k.clone()), prim(v.clone()), fused_mask, &o));
    let naive = naive_attention(q.clone(), k.clone(), v.clone(), masked, &o);
    let r = rel_diff(fused.clone(), naive.clone());
    assert!(r < TOL, "{what}: outputs differ by {r}");
    let gf = (fused * up.clone()).sum().backward();
    let gn = (naive * up).sum().backward();
    check_grads::<B, 4>(&gf, &gn, &[("q", &q), ("k", &k), ("v", &v)], what);
}

/// Rows of packed examples: a query sees the keys of its own example at or before it, and
/// padding after the last example attends only to itself.
fn packed<B: FusedOps>(rows: &[&[usize]], seq: usize) -> Tensor<A<B>, 4, Bool> {
    let example: Vec<Vec<usize>> = rows
        .iter()
        .map(|lens| {
            let mut ex: Vec<usize> = lens.iter().enumerate().flat_map(|(e, &n)| std::iter::repeat_n(e, n)).collect();
            while ex.len() < seq {
                ex.push(usize::MAX - ex.len());
            }
            ex
        })
        .collect();
    mask::<B>([rows.len(), seq, seq], |r, i, j| !(j <= i && example[r][j] == example[r][i]))
}

fn attention_cases<B: FusedOps>() {
    let plain = |_: &mut AttentionOptions| {};
    // Longer than one 64-row tile, grouped-query (4 query heads on 2 kv heads).
    check_attention::<B>([2, 70, 70, 4, 2], None, plain, "causal");
    // New queries after cached keys: query i sees keys up to i + 6.
    check_attention::<B>([1, 3, 9, 2, 1], None, plain, "causal after a cache");
    // Packed rows: block-diagonal causal, and a padded tail.
    check_attention::<B>([2, 70, 70, 4, 4], Some(packed::<B>(&[&[30, 30], &[66]], 70)), plain, "packed");
    // A sliding window shorter than the row, as a mask.
    let window = mask::<B>([1, 70, 70], |_, i, j| !(j <= i && i - j < 16));
    check_attention::<B>([1, 70, 70, 2, 1], Some(window.clone()), plain, "sliding window mask");
    // One [1, 1, s, t] mask for a batch of two: every row reads it, none reads past it.
    check_attention::<B>([2, 70, 70, 4, 2], Some(window), plain, "one mask for the batch");

    // Gemma 2: its own scale, and scores soft-capped where tanh bends (|scores| ~ 1).
    let gemma2 = |o: &mut AttentionOptions| {
        o.scale = 0.3;
        o.softcap = Some(1.5);
    };
    check_attention::<B>([2, 70, 70, 4, 2], None, gemma2, "scale and soft-cap");
    // The window as an option: the second tile starts at key 49, the first ones are skipped.
    let window = |o: &mut AttentionOptions| o.window = Some(16);
    check_attention::<B>([2, 70, 70, 4, 2], None, window, "sliding window");
    check_attention::<B>([1, 3, 9, 2, 1], None, |o: &mut AttentionOptions| o.window = Some(4), "sliding window after a cache");
    check_attention::<B>([2, 70, 70, 4, 4], Some(packed::<B>(&[&[30, 30], &[66]], 70)), window, "sliding window on packed rows");
    // BLOOM: ALiBi, one slope per head.
    let alibi = |o: &mut AttentionOptions| o.alibi = Some(vec![0.5, 0.25, 0.125, 0.0625]);
    check_attention::<B>([2, 70, 70, 4, 4], None, alibi, "ALiBi");
    check_attention::<B>([2, 70, 70, 4, 4], Some(packed::<B>(&[&[70]], 70)), alibi, "ALiBi with one mask for the batch");
    // All of it at once, grouped-query, over packed rows and after a cache.
    let all = |o: &mut AttentionOptions| {
        gemma2(o);
        o.window = Some(20);
        o.alibi = Some(vec![0.3, 0.2, 0.1, 0.05]);
    };
    check_attention::<B>([2, 70, 70, 4, 2], Some(packed::<B>(&[&[30, 30], &[66]], 70)), all, "every option");
    check_attention::<B>([1, 3, 9, 4, 2], None, all, "every option after a cache");
}

#[test]
fn attention_cpu_kernel_matches_naive_attention() {
    attention_cases::<Flex>();
}

#[test]
fn attention_generic_backward_matches_naive_attention() {
    attention_cases::<NdArray>();
}

/// Each of RMSNorm, LayerNorm, RoPE, the gated MLP's gate and the plain MLP's activation, fused
/// vs plain ops, under autodiff.
fn elementwise_cases<B: FusedOps>() {
    let x = random::<A<B>, 2>([70, 24]).require_grad();
    let w = random::<A<B>, 1>([24]);
    let up = random::<A<B>, 2>([70, 24]);
    let fused = float::<A<B>, 2>(A::<B>::fused_rms_norm(prim(x.clone()), prim(w.clone()), 1e-5));
    let xw = wide(x.clone());
    let naive = narrow(xw.clone() / (xw.square().mean_dim(1) + 1e-5).sqrt() * wide(w).unsqueeze::<2>());
    assert!(rel_diff(fused.clone(), naive.clone()) < TOL, "rms_norm output");
    let (gf, gn) = ((fused * up.clone()).sum().backward(), (naive * up).sum().backward());
    check_grads::<B, 2>(&gf, &gn, &[("x", &x)], "rms_norm");

    // Rows far from zero mean: a one-pass variance would lose them.
    let x = (random::<A<B>, 2>([70, 24]) + 3.0).detach().require_grad();
    let (w, b) = (random::<A<B>, 1>([24]), random::<A<B>, 1>([24]));
    let up = random::<A<B>, 2>([70, 24]);
    let fused = float::<A<B>, 2>(A::<B>::fused_layer_norm(prim(x.clone()), prim(w.clone()), prim(b.clone()), 1e-5));
    let xw = wide(x.clone());
    let centred = xw.clone() - xw.mean_dim(1);
    let var = centred.clone().square().mean_dim(1);
    let naive = narrow(centred / (var + 1e-5).sqrt() * wide(w).unsqueeze::<2>() + wide(b).unsqueeze::<2>());
    assert!(rel_diff(fused.clone(), naive.clone()) < TOL, "layer_norm output");
    let (gf, gn) = ((fused * up.clone()).sum().backward(), (naive * up).sum().backward());
    check_grads::<B, 2>(&gf, &gn, &[("x", &x)], "layer_norm");

    // Every dimension rotated (r = d), and a partial rotation (r = 4 of 8) passing the rest through.
    for r in [8, 4] {
        let x = random::<A<B>, 4>([2, 70, 3, 8]).require_grad();
        let cos = random::<A<B>, 4>([2, 70, 1, r]);
        // As the rope tables build them: sin carries rotate_half's sign, −sin on the first half.
        let half = random::<A<B>, 4>([2, 70, 1, r / 2]);
        let sin = Tensor::cat(vec![half.clone().neg(), half], 3);
        let up = random::<A<B>, 4>([2, 70, 3, 8]);
        let fused = float::<A<B>, 4>(A::<B>::fused_rope(prim(x.clone()), prim(cos.clone()), prim(sin.clone())));
        let xw = wide(x.clone());
        let rot = xw.clone().narrow(3, 0, r);
        let swapped = Tensor::cat(vec![rot.clone().narrow(3, r / 2, r / 2), rot.clone().narrow(3, 0, r / 2)], 3);
        let mut parts = vec![rot * wide(cos) + swapped * wide(sin)];
        if r < 8 {
            parts.push(xw.narrow(3, r, 8 - r));
        }
        let naive = narrow(Tensor::cat(parts, 3));
        let what = format!("rope ({r} of 8 dims)");
        assert!(rel_diff(fused.clone(), naive.clone()) < TOL, "{what}: output");
        let (gf, gn) = ((fused * up.clone()).sum().backward(), (naive * up).sum().backward());
        check_grads::<B, 4>(&gf, &gn, &[("x", &x)], &what);
    }

    for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
        // ×3: through GELU's tails and both of erf's ranges (|x| < 1 and above).
        let gate = (random::<A<B>, 2>([70, 40]) * 3.0).detach().require_grad();
        let upp = random::<A<B>, 2>([70, 40]).require_grad();
        let g_out = random::<A<B>, 2>([70, 40]);
        let fused = float::<A<B>, 2>(A::<B>::fused_glu(prim(gate.clone()), prim(upp.clone()), act));
        let naive = narrow(naive_activation(wide(gate.clone()), act) * wide(upp.clone()));
        let what = format!("glu ({act:?})");
        assert!(rel_diff(fused.clone(), naive.clone()) < TOL, "{what}: output");
        let (gf, gn) = ((fused * g_out.clone()).sum().backward(), (naive * g_out.clone()).sum().backward());
        check_grads::<B, 2>(&gf, &gn, &[("gate", &gate), ("up", &upp)], &what);

        // A fresh leaf: the gate, reused for a second pair of graphs, got no gradient in the last one.
        let x = gate.detach().require_grad();
        let fused = float::<A<B>, 2>(A::<B>::fused_activation(prim(x.clone()), act));
        let naive = narrow(naive_activation(wide(x.clone()), act));
        let what = format!("activation ({act:?})");
        assert!(rel_diff(fused.clone(), naive.clone()) < TOL, "{what}: output");
        let (gf, gn) = ((fused * g_out.clone()).sum().backward(), (naive * g_out).sum().backward());
        check_grads::<B, 2>(&gf, &gn, &[("x", &x)], &what);
    }
}

/// The activations as transformers writes them.
fn naive_activation<B: FusedOps>(x: Tensor<A<B>, 2>, act: Activation) -> Tensor<A<B>, 2> {
    use std::f64::consts::{FRAC_1_SQRT_2, PI};
    match act {
        Activation::Silu => x.clone() / (x.neg().exp() + 1.0),
        Activation::GeluTanh => {
            let inner = (x.clone() + x.clone() * x.clone() * x.clone() * 0.044715) * (2.0 / PI).sqrt();
            x * (inner.tanh() + 1.0) * 0.5
        }
        Activation::Gelu => x.clone() * ((x * FRAC_1_SQRT_2).erf() + 1.0) * 0.5,
    }
}

/// A frozen linear layer with bias and its adapter, with and without LoRA dropout.
fn lora_linear_cases<B: FusedOps>() {
    let w = random::<A<B>, 2>([24, 40]);
    let bias = random::<A<B>, 1>([40]);
    for dropout in [false, true] {
        let x = random::<A<B>, 2>([70, 24]).require_grad();
        let a = random::<A<B>, 2>([24, 4]).require_grad();
        let b = random::<A<B>, 2>([4, 40]).require_grad();
        let up = random::<A<B>, 2>([70, 40]);
        // Inverted dropout at p = 0.5: each input kept ×2 or zeroed.
        let keep = Tensor::<A<B>, 2>::random([70, 24], Distribution::Bernoulli(0.5), &Default::default()) * 2.0;
        // Built once per graph: a node shared by two graphs is consumed by the first backward.
        let x_lora = || dropout.then(|| x.clone() * keep.clone());
        let p =
            super::LoraLinear { w: prim(w.clone()), bias: Some(prim(bias.clone())), a: prim(a.clone()), b: prim(b.clone()), scale: 2.0 };
        let fused = float::<A<B>, 2>(A::<B>::lora_linear(prim(x.clone()), x_lora().map(prim), p));
        let xl = wide(x_lora().unwrap_or_else(|| x.clone()));
        let base = wide(x.clone()).matmul(wide(w.clone())) + wide(bias.clone()).unsqueeze::<2>();
        let naive = narrow(base + xl.matmul(wide(a.clone())).matmul(wide(b.clone())) * 2.0);
        let what = format!("lora_linear (dropout {dropout})");
        assert!(rel_diff(fused.clone(), naive.clone()) < TOL, "{what}: output");
        let (gf, gn) = ((fused * up.clone()).sum().backward(), (naive * up).sum().backward());
        check_grads::<B, 2>(&gf, &gn, &[("x", &x), ("lora_A", &a), ("lora_B", &b)], &what);
    }
}

/// A bf16 base under f32 activations, on burn-flex (burn-ndarray holds no bf16): the frozen
/// product, alone and with an adapter, through autodiff, against the f64 product of the same
/// bf16 weights with the unrounded x. The kernels round x (and, backward, the output gradient)
/// to bf16 where it enters the base's product, ~2⁻⁹ of each element; what this catches is a
/// wrong operand or layout, which is off by O(1). The rounding itself is tested in `bf16`.
#[test]
fn bf16_base_cpu_kernels_match_plain_ops() {
    const BF16_TOL: f32 = 1e-2;
    type B = Flex;
    let stored = random::<A<B>, 2>([40, 24]).cast(DType::BF16);
    // w as a Linear holds an nn.Linear's weight: the transposed view of the stored [out, in].
    for (what, w) in
        [("w [in, out]", stored.clone().transpose().cast(DType::F32).cast(DType::BF16)), ("wᵀ view", stored.clone().transpose())]
    {
        let x = random::<A<B>, 2>([70, 24]).require_grad();
        let up = random::<A<B>, 2>([70, 40]);
        let fused = float::<A<B>, 2>(A::<B>::frozen_matmul(prim(x.clone()), prim(w.clone())));
        assert_eq!(fused.dtype(), DType::F32, "{what}: the product comes back in x's dtype");
        let naive = narrow(wide(x.clone()).matmul(wide(w.clone())));
        assert!(rel_diff(fused.clone(), naive.clone()) < BF16_TOL, "frozen_matmul ({what}): output");
        let (gf, gn) = ((fused * up.clone()).sum().backward(), (naive * up.clone()).sum().backward());
        check_grads_within::<B, 2>(&gf, &gn, &[("x", &x)], &format!("frozen_matmul ({what})"), BF16_TOL);

        // A fresh x: the first backward consumed the graph x was in.
        let x = random::<A<B>, 2>([70, 24]).require_grad();
        let bias = random::<A<B>, 1>([40]);
        let a = random::<A<B>, 2>([24, 4]).require_grad();
        let b = random::<A<B>, 2>([4, 40]).require_grad();
        let p =
            super::LoraLinear { w: prim(w.clone()), bias: Some(prim(bias.clone())), a: prim(a.clone()), b: prim(b.clone()), scale: 2.0 };
        let fused = float::<A<B>, 2>(A::<B>::lora_linear(prim(x.clone()), None, p));
        let base = wide(x.clone()).matmul(wide(w.clone())) + wide(bias).unsqueeze::<2>();
        let naive = narrow(base + wide(x.clone()).matmul(wide(a.clone())).matmul(wide(b.clone())) * 2.0);
        assert!(rel_diff(fused.clone(), naive.clone()) < BF16_TOL, "lora_linear, bf16 base ({what}): output");
        let (gf, gn) = ((fused * up.clone()).sum().backward(), (naive * up).sum().backward());
        check_grads_within::<B, 2>(
            &gf,
            &gn,
            &[("x", &x), ("lora_A", &a), ("lora_B", &b)],
            &format!("lora_linear, bf16 base ({what})"),
            BF16_TOL,
        );
    }
}

#[test]
fn lora_linear_cpu_kernel_matches_plain_ops() {
    lora_linear_cases::<Flex>();
}

#[test]
fn lora_linear_generic_backward_matches_plain_ops() {
    lora_linear_cases::<NdArray>();
}

#[test]
fn norms_rope_activations_cpu_kernels_match_plain_ops() {
    elementwise_cases::<Flex>();
}

#[test]
fn norms_rope_activations_generic_backward_matches_plain_ops() {
    elementwise_cases::<NdArray>();
}

/// Σ coef·nll and its gradient, from burn's autodiff of log-softmax in f64; plain and with
/// Gemma 2's final soft-cap (at 5, where the logits, ~N(0, 16), bend).
fn cross_entropy_cases<B: FusedOps>() {
    for softcap in [None, Some(5.0)] {
        let logits = random::<B, 2>([5, 1000]) * 4.0;
        let targets = [3u32, 999, 0, 500, 42];
        let coef = [0.5f32, 0.0, 1.0, 0.25, 2.0];
        let (loss, grad) = B::cross_entropy(prim(logits.clone()), &targets, &coef, softcap);
        let loss: f64 = float::<B, 1>(loss).into_scalar().elem();
        let logits = Tensor::<A<B>, 2>::from_inner(logits).require_grad();
        let mut x = wide(logits.clone());
        if let Some(cap) = softcap {
            x = (x / cap).tanh() * cap;
        }
        let lse = (x.clone() - x.clone().max_dim(1).detach()).exp().sum_dim(1).log() + x.clone().max_dim(1).detach();
        let picked =
            Tensor::cat(targets.iter().enumerate().map(|(i, &t)| x.clone().slice([i..i + 1, t as usize..t as usize + 1])).collect(), 0);
        let weight = wide(Tensor::<A<B>, 2>::from_data(TensorData::new(coef.to_vec(), [5, 1]), &Default::default()));
        let naive = ((lse - picked) * weight).sum();
        let ref_loss: f64 = naive.clone().into_scalar().elem();
        let ref_grad = logits.grad(&naive.backward()).unwrap();
        assert!((loss - ref_loss).abs() <= 1e-5 * ref_loss.abs(), "soft-cap {softcap:?}: loss {loss} vs {ref_loss}");
        let r = rel_diff(float::<B, 2>(grad), ref_grad);
        assert!(r < TOL, "soft-cap {softcap:?}: gradient differs by {r}");
    }
}

#[test]
fn cross_entropy_cpu_kernel_matches_plain_ops() {
    cross_entropy_cases::<Flex>();
}

#[test]
fn cross_entropy_generic_formula_matches_plain_ops() {
    cross_entropy_cases::<NdArray>();
}

#[test]
fn fast_tanh_is_within_1e7() {
    let mut worst = 0f64;
    for i in 0..=400_000 {
        let x = -20.0 + 40.0 * i as f32 / 400_000.0;
        worst = worst.max((super::cpu::tanh(x) as f64 - (x as f64).tanh()).abs());
    }
    assert!(worst < 1e-7, "worst absolute error {worst:e}");
    assert_eq!(super::cpu::tanh(0.0), 0.0);
    assert_eq!(super::cpu::tanh(f32::INFINITY), 1.0);
    assert_eq!(super::cpu::tanh(f32::NEG_INFINITY), -1.0);
}

/// erf(x) = 2/√π · e^{−x²} · Σ 2ⁿ x^{2n+1} / (1·3·…·(2n+1)): positive terms, so no cancellation,
/// to f64 precision (std has no erf).
fn erf64(x: f64) -> f64 {
    let a = x.abs();
    let (mut term, mut sum, mut n) = (a, a, 0);
    while term > 1e-17 * sum {
        n += 1;
        term *= 2.0 * a * a / (2 * n + 1) as f64;
        sum += term;
    }
    (2.0 / std::f64::consts::PI.sqrt() * (-a * a).exp() * sum).copysign(x)
}

#[test]
fn fast_erf_and_gelus_are_within_2e7() {
    let (mut erf, mut gelu, mut gelu_tanh) = (0f64, 0f64, 0f64);
    for i in 0..=400_000 {
        let x = -10.0 + 20.0 * i as f32 / 400_000.0;
        let xd = x as f64;
        erf = erf.max((super::cpu::erf(x) as f64 - erf64(xd)).abs());
        // GELU's values reach |x|, where an f32 ulp is itself above 2e-7: error relative to max(1, |x|)
        let scale = xd.abs().max(1.0);
        let exact = 0.5 * xd * (1.0 + erf64(xd * std::f64::consts::FRAC_1_SQRT_2));
        gelu = gelu.max((super::cpu::gelu(x) as f64 - exact).abs() / scale);
        let exact = 0.5 * xd * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd)).tanh());
        gelu_tanh = gelu_tanh.max((super::cpu::gelu_tanh(x) as f64 - exact).abs() / scale);
    }
    assert!(erf <= 2e-7 && gelu <= 2e-7 && gelu_tanh <= 2e-7, "worst errors: erf {erf:e}, gelu {gelu:e}, gelu_tanh {gelu_tanh:e}");
    assert_eq!(super::cpu::erf(0.0), 0.0);
    assert_eq!(super::cpu::erf(f32::INFINITY), 1.0);
    assert_eq!(super::cpu::erf(f32::NEG_INFINITY), -1.0);
}

#[test]
fn fast_exp_is_within_two_ulp_and_zero_below_range() {
    let mut worst = 0f64;
    for i in 0..200_000 {
        let x = -87.0 + 175.0 * i as f32 / 200_000.0;
        let (ours, exact) = (super::cpu::exp(x) as f64, (x as f64).exp());
        worst = worst.max((ours - exact).abs() / exact);
    }
    // 2 ulp of f32 is 2.4e-7 relative.
    assert!(worst < 2.4e-7, "worst relative error {worst:e}");
    assert_eq!(super::cpu::exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(super::cpu::exp(-100.0), 0.0);
}

/// The kernels index raw buffers by the shapes they are given: a mismatch is a panic naming the
/// operation and the shapes, before any unsafe gemm call.
#[test]
#[should_panic(expected = "fused attention: q")]
fn attention_kernel_refuses_mismatched_shapes() {
    let q = random::<Flex, 4>([1, 4, 3, 8]);
    let k = random::<Flex, 4>([1, 4, 2, 8]);
    Flex::attention_forward(prim(q), prim(k.clone()), prim(k), Mask::Causal, &AttentionOptions::new(8));
}

#[test]
#[should_panic(expected = "lora_linear: x")]
fn lora_linear_kernel_refuses_mismatched_shapes() {
    let p = super::LoraLinear::<Flex> {
        w: prim(random::<Flex, 2>([24, 40])),
        bias: None,
        a: prim(random::<Flex, 2>([20, 4])),
        b: prim(random::<Flex, 2>([4, 40])),
        scale: 1.0,
    };
    Flex::lora_linear(prim(random::<Flex, 2>([7, 24])), None, p);
}

#[test]
#[should_panic(expected = "fused attention: mask [2, 1, 4, 4] for q [3, 4, 2, 8]")]
fn attention_kernel_refuses_a_mask_for_another_batch() {
    let q = random::<Flex, 4>([3, 4, 2, 8]);
    let k = random::<Flex, 4>([3, 4, 1, 8]);
    let m = Tensor::<Flex, 4, Bool>::from_data(TensorData::new(vec![false; 32], [2, 1, 4, 4]), &Default::default());
    Flex::attention_forward(prim(q), prim(k.clone()), prim(k), Mask::Explicit(m.into_primitive()), &AttentionOptions::new(8));
}

#[test]
#[should_panic(expected = "fused attention: 3 ALiBi slopes for q [1, 4, 2, 8]")]
fn attention_kernel_refuses_alibi_slopes_for_other_heads() {
    let q = random::<Flex, 4>([1, 4, 2, 8]);
    let k = random::<Flex, 4>([1, 4, 1, 8]);
    let opts = AttentionOptions { alibi: Some(vec![0.5, 0.25, 0.125]), ..AttentionOptions::new(8) };
    Flex::attention_forward(prim(q), prim(k.clone()), prim(k), Mask::Causal, &opts);
}

#[test]
#[should_panic(expected = "layer_norm: x [7, 24], weight [24], bias [20]")]
fn layer_norm_kernel_refuses_a_bias_of_another_width() {
    let (x, w, b) = (random::<Flex, 2>([7, 24]), random::<Flex, 1>([24]), random::<Flex, 1>([20]));
    Flex::fused_layer_norm(prim(x), prim(w), prim(b), 1e-5);
}

#[test]
#[should_panic(expected = "rope: x [1, 5, 2, 8], cos [1, 5, 1, 10]")]
fn rope_kernel_refuses_tables_wider_than_a_head() {
    let (x, t) = (random::<Flex, 4>([1, 5, 2, 8]), random::<Flex, 4>([1, 5, 1, 10]));
    Flex::fused_rope(prim(x), prim(t.clone()), prim(t));
}

#[test]
#[should_panic(expected = "cross_entropy: target 1000 of row 1 is not below the vocabulary size 1000")]
fn cross_entropy_kernel_refuses_a_target_past_the_vocabulary() {
    Flex::cross_entropy(prim(random::<Flex, 2>([2, 1000])), &[3, 1000], &[1.0, 1.0], None);
}

/// A quantized frozen layer `[37, 70]` (NF4 blocks then span rows, the input gradient's column
/// tiles start mid-block, the forward pass has several row tiles), with and without an adapter
/// and LoRA dropout, against x·Wᵀ written out with W dequantized whole.
fn quant_linear_cases<B: FusedOps>() {
    use crate::quant::Quantization;
    use std::sync::Arc;
    let (out, din) = (37, 70);
    let values: Vec<f32> = random::<B, 2>([out, din]).into_data().iter::<f32>().collect();
    for kind in [Quantization::Nf4, Quantization::Int8] {
        let w = Arc::new(kind.quantize(&values, out, din).unwrap());
        let dense = Tensor::<A<B>, 2>::from_data(TensorData::new(w.dequantize(), [out, din]), &Default::default());
        let bias = random::<A<B>, 1>([out]);
        for (adapter, dropout) in [(false, false), (true, false), (true, true)] {
            let x = random::<A<B>, 2>([50, din]).require_grad();
            let a = random::<A<B>, 2>([din, 3]).require_grad();
            let b = random::<A<B>, 2>([3, out]).require_grad();
            let up = random::<A<B>, 2>([50, out]);
            let keep = Tensor::<A<B>, 2>::random([50, din], Distribution::Bernoulli(0.5), &Default::default()) * 2.0;
            let x_lora = || dropout.then(|| x.clone() * keep.clone());
            let lora = adapter.then(|| super::LoraWeights { a: prim(a.clone()), b: prim(b.clone()), scale: 0.5 });
            let p = super::QuantLinear { w: w.clone(), bias: Some(prim(bias.clone())), lora };
            let fused = float::<A<B>, 2>(A::<B>::quant_linear(prim(x.clone()), x_lora().map(prim), p));
            let mut naive = wide(x.clone()).matmul(wide(dense.clone()).transpose()) + wide(bias.clone()).unsqueeze::<2>();
            if adapter {
                let xl = wide(x_lora().unwrap_or_else(|| x.clone()));
                naive = naive + xl.matmul(wide(a.clone())).matmul(wide(b.clone())) * 0.5;
            }
            let naive = narrow(naive);
            let what = format!("quant_linear ({kind}, adapter {adapter}, dropout {dropout})");
            assert!(rel_diff(fused.clone(), naive.clone()) < TOL, "{what}: output");
            let (gf, gn) = ((fused * up.clone()).sum().backward(), (naive * up).sum().backward());
            if adapter {
                check_grads::<B, 2>(&gf, &gn, &[("x", &x), ("lora_A", &a), ("lora_B", &b)], &what);
            } else {
                check_grads::<B, 2>(&gf, &gn, &[("x", &x)], &what);
            }
        }
    }
}

#[test]
fn quant_linear_cpu_kernel_matches_plain_ops() {
    quant_linear_cases::<Flex>();
}

#[test]
fn quant_linear_generic_backward_matches_plain_ops() {
    quant_linear_cases::<NdArray>();
}

#[test]
#[should_panic(expected = "quant_linear: x")]
fn quant_linear_kernel_refuses_mismatched_shapes() {
    let w = std::sync::Arc::new(crate::quant::Quantization::Nf4.quantize(&[0.5; 24 * 40], 40, 24).unwrap());
    Flex::quant_linear(prim(random::<Flex, 2>([7, 25])), None, super::QuantLinear { w, bias: None, lora: None });
}

/// The CPU kernels' AVX-512 copies and their baseline copies (`cpu::simd`) give the same bits:
/// each fused operation with options that take every branch, run once each way.
#[test]
fn cpu_kernels_give_the_same_bits_in_their_avx512_and_baseline_copies() {
    use std::sync::atomic::Ordering;

    use super::cpu::simd::{avx512, BASELINE_ONLY};

    type F = Flex;
    fn bits(t: FloatTensor<F>) -> Vec<u8> {
        float::<F, 1>(t).into_data().as_bytes().to_vec()
    }
    fn bits4(t: FloatTensor<F>) -> Vec<u8> {
        bits(prim(float::<F, 4>(t).reshape([-1])))
    }
    let (b, s, h, kv, d) = (2, 37, 4, 2, 16);
    let q = prim(random::<F, 4>([b, s, h, d]));
    let k = prim(random::<F, 4>([b, s, kv, d]));
    let v = prim(random::<F, 4>([b, s, kv, d]));
    let g = prim(random::<F, 4>([b, s, h, d]));
    let x = prim(random::<F, 2>([70, 48]));
    let w = prim(random::<F, 1>([48]));
    let bias = prim(random::<F, 1>([48]));
    let gx = prim(random::<F, 2>([70, 48]));
    let logits = prim(random::<F, 2>([5, 1000]) * 4.0);
    let rope_x = prim(random::<F, 4>([2, 9, 3, 16]));
    let (cos, sin) = (prim(random::<F, 4>([2, 9, 1, 12])), prim(random::<F, 4>([2, 9, 1, 12])));
    let run = || {
        let mut out = Vec::new();
        let mut opts = AttentionOptions::new(d);
        for (softcap, window, alibi) in [(None, None, false), (Some(20.0), Some(5), true)] {
            opts.softcap = softcap;
            opts.window = window;
            opts.alibi = alibi.then(|| vec![0.5, 0.25, 0.125, 0.0625]);
            let (o, lse) = F::attention_forward(q.clone(), k.clone(), v.clone(), Mask::Causal, &opts);
            let (dq, dk, dv) =
                F::attention_backward(q.clone(), k.clone(), v.clone(), Mask::Causal, &opts, o.clone(), lse.clone(), g.clone());
            out.extend([bits4(o), bits(prim(float::<F, 3>(lse).reshape([-1]))), bits4(dq), bits4(dk), bits4(dv)]);
        }
        let (y, rstd) = F::rms_norm_forward(x.clone(), w.clone(), 1e-5);
        let dx = F::rms_norm_backward(x.clone(), w.clone(), rstd.clone(), gx.clone());
        let (ly, stats) = F::layer_norm_forward(x.clone(), w.clone(), bias.clone(), 1e-5);
        let ldx = F::layer_norm_backward(x.clone(), w.clone(), stats.clone(), gx.clone());
        for t in [y, rstd, dx, ly, stats, ldx] {
            out.push(bits(prim(float::<F, 2>(t).reshape([-1]))));
        }
        for softcap in [None, Some(5.0)] {
            let (loss, grad) = F::cross_entropy(logits.clone(), &[3, 999, 0, 500, 42], &[0.5, 0.0, 1.0, 0.25, 2.0], softcap);
            out.extend([bits(loss), bits(prim(float::<F, 2>(grad).reshape([-1])))]);
        }
        out.push(bits4(F::fused_rope(rope_x.clone(), cos.clone(), sin.clone())));
        for act in [Activation::Silu, Activation::Gelu, Activation::GeluTanh] {
            let glu = F::fused_glu(x.clone(), gx.clone(), act);
            let (dg, du) = F::glu_backward(x.clone(), gx.clone(), act, glu.clone());
            let a = F::fused_activation(x.clone(), act);
            let da = F::activation_backward(x.clone(), act, gx.clone());
            for t in [glu, dg, du, a, da] {
                out.push(bits(prim(float::<F, 2>(t).reshape([-1]))));
            }
        }
        out
    };
    assert!(avx512() || !std::arch::is_x86_feature_detected!("avx512f"), "AVX-512 is there but the kernels do not take it");
    let wide = run();
    BASELINE_ONLY.store(true, Ordering::Relaxed);
    let baseline = run();
    BASELINE_ONLY.store(false, Ordering::Relaxed);
    assert_eq!(wide.len(), baseline.len());
    for (i, (a, b)) in wide.iter().zip(&baseline).enumerate() {
        assert!(a == b, "output {i} differs between the AVX-512 and baseline copies");
    }
}
