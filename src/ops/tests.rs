//! Each fused operation, through autodiff, against the same computation written as plain burn
//! ops and differentiated by burn: outputs and input gradients must agree. On burn-flex this
//! checks the CPU kernels and their backward passes; on burn-ndarray, the generic backward
//! formulas of [`super::FusedOps`].

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Distribution, ElementConversion, Tensor};

use super::{float, prim, FusedOps, Mask};
use crate::model::AttentionMask;

fn random<B: FusedOps, const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

/// f32 rounding differs between the two orders of computation by ~1e-5 of the largest value.
const TOL: f32 = 1e-4;

/// burn-ndarray's own matmul and reductions sum in another order than the naive graph; on an
/// AMD EPYC without AVX-512 the two differ by up to ~1e-3 of the largest gradient on these
/// unseeded random inputs (seen: 4.6e-4, 1.05e-3). A wrong formula is off by O(1).
fn tol<B: FusedOps>() -> f32 {
    if std::any::type_name::<B>().contains("NdArray") {
        5e-3
    } else {
        TOL
    }
}

/// Largest |a − b| relative to the largest |b|.
fn rel_diff<B: FusedOps, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    let scale: f32 = b.clone().abs().max().into_scalar().elem();
    let d: f32 = (a - b).abs().max().into_scalar().elem();
    d / scale.max(1e-12)
}

/// Attention as HF writes it: repeat kv heads, scores, −∞ where masked, softmax, times v.
fn naive_attention<B: FusedOps>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, masked: Tensor<B, 4, Bool>) -> Tensor<B, 4> {
    let [b, s, h, d] = q.dims();
    let [_, t, kv, _] = k.dims();
    let repeat = |x: Tensor<B, 4>| x.swap_dims(1, 2).unsqueeze_dim::<5>(2).expand([b, kv, h / kv, t, d]).reshape([b, h, t, d]);
    let scores = q.swap_dims(1, 2).matmul(repeat(k).swap_dims(2, 3)) / (d as f64).sqrt();
    let scores = scores.mask_fill(masked.expand([b, h, s, t]), f32::NEG_INFINITY);
    softmax(scores, 3).matmul(repeat(v)).swap_dims(1, 2)
}

/// Runs fused and naive attention on the same inputs under autodiff and compares the outputs
/// and the gradients of q, k and v for a random upstream gradient.
fn check_attention<B: FusedOps>(
    [b, s, t, h, kv]: [usize; 5],
    mask: AttentionMask<Autodiff<B>>,
    masked: Tensor<Autodiff<B>, 4, Bool>,
    what: &str,
) {
    type A<B> = Autodiff<B>;
    let d = 8;
    let q = random::<A<B>, 4>([b, s, h, d]).require_grad();
    let k = random::<A<B>, 4>([b, t, kv, d]).require_grad();
    let v = random::<A<B>, 4>([b, t, kv, d]).require_grad();
    let up = random::<A<B>, 4>([b, s, h, d]);
    let fused_mask = match mask {
        AttentionMask::Causal => Mask::Causal,
        AttentionMask::Explicit(m) => Mask::Explicit(m.into_primitive()),
    };
    let fused = float::<A<B>, 4>(A::<B>::fused_attention(
        prim(q.clone()),
        prim(k.clone()),
        prim(v.clone()),
        fused_mask,
        &super::AttentionOptions::new(d),
    ));
    let naive = naive_attention(q.clone(), k.clone(), v.clone(), masked);
    assert!(rel_diff(fused.clone(), naive.clone()) < tol::<B>(), "{what}: outputs differ");
    let gf = (fused * up.clone()).sum().backward();
    let gn = (naive * up).sum().backward();
    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
        let (f, n) = (x.grad(&gf).unwrap(), x.grad(&gn).unwrap());
        let r = rel_diff(f, n);
        assert!(r < tol::<B>(), "{what}: d{name} differs by {r}");
    }
}

fn attention_cases<B: FusedOps>() {
    let device = Default::default();
    // Longer than one 64-row tile, grouped-query (4 query heads on 2 kv heads).
    let causal = Tensor::<Autodiff<B>, 2, Bool>::tril_mask([70, 70], 0, &device).unsqueeze::<4>();
    check_attention::<B>([2, 70, 70, 4, 2], AttentionMask::Causal, causal, "causal");
    // New queries after cached keys: query i sees keys up to i + 6.
    let past = Tensor::<Autodiff<B>, 2, Bool>::tril_mask([3, 9], 6, &device).unsqueeze::<4>();
    check_attention::<B>([1, 3, 9, 2, 1], AttentionMask::Causal, past, "causal after a cache");
    // Packed rows: block-diagonal causal, and a padded tail.
    let packed = AttentionMask::<Autodiff<B>>::packed(&[vec![30, 30], vec![66]], 70, &device);
    let AttentionMask::Explicit(m) = packed.clone() else { unreachable!() };
    check_attention::<B>([2, 70, 70, 4, 4], packed, m, "packed");
}

#[test]
fn attention_cpu_kernel_matches_naive_attention() {
    attention_cases::<Flex>();
}

#[test]
fn attention_generic_backward_matches_naive_attention() {
    attention_cases::<NdArray>();
}

/// Each of RMSNorm, RoPE and SwiGLU, fused vs its plain-op reference, under autodiff.
fn elementwise_cases<B: FusedOps>() {
    type A<B> = Autodiff<B>;
    let x = random::<A<B>, 2>([70, 24]).require_grad();
    let w = random::<A<B>, 1>([24]);
    let up = random::<A<B>, 2>([70, 24]);
    let fused = float::<A<B>, 2>(A::<B>::fused_rms_norm(prim(x.clone()), prim(w.clone()), 1e-5));
    let naive = float::<A<B>, 2>(super::reference::rms_norm_forward::<A<B>>(prim(x.clone()), prim(w), 1e-5).0);
    assert!(rel_diff(fused.clone(), naive.clone()) < tol::<B>(), "rms_norm output");
    let (gf, gn) = ((fused * up.clone()).sum().backward(), (naive * up).sum().backward());
    assert!(rel_diff(x.grad(&gf).unwrap(), x.grad(&gn).unwrap()) < tol::<B>(), "rms_norm dx");

    let x = random::<A<B>, 4>([2, 70, 3, 8]).require_grad();
    let cos = random::<A<B>, 4>([2, 70, 1, 8]);
    // As Rope::tables builds them: sin carries rotate_half's sign, −sin on the first half.
    let half = random::<A<B>, 4>([2, 70, 1, 4]);
    let sin = Tensor::cat(vec![half.clone().neg(), half], 3);
    let up = random::<A<B>, 4>([2, 70, 3, 8]);
    let fused = float::<A<B>, 4>(A::<B>::fused_rope(prim(x.clone()), prim(cos.clone()), prim(sin.clone())));
    let naive = float::<A<B>, 4>(super::reference::fused_rope::<A<B>>(prim(x.clone()), prim(cos), prim(sin)));
    assert!(rel_diff(fused.clone(), naive.clone()) < tol::<B>(), "rope output");
    let (gf, gn) = ((fused * up.clone()).sum().backward(), (naive * up).sum().backward());
    assert!(rel_diff(x.grad(&gf).unwrap(), x.grad(&gn).unwrap()) < tol::<B>(), "rope dx");

    let gate = random::<A<B>, 2>([70, 40]).require_grad();
    let upp = random::<A<B>, 2>([70, 40]).require_grad();
    let g_out = random::<A<B>, 2>([70, 40]);
    let fused = float::<A<B>, 2>(A::<B>::fused_swiglu(prim(gate.clone()), prim(upp.clone())));
    let naive = burn::tensor::activation::silu(gate.clone()) * upp.clone();
    assert!(rel_diff(fused.clone(), naive.clone()) < tol::<B>(), "swiglu output");
    let (gf, gn) = ((fused * g_out.clone()).sum().backward(), (naive * g_out).sum().backward());
    assert!(rel_diff(gate.grad(&gf).unwrap(), gate.grad(&gn).unwrap()) < tol::<B>(), "swiglu d gate");
    assert!(rel_diff(upp.grad(&gf).unwrap(), upp.grad(&gn).unwrap()) < tol::<B>(), "swiglu d up");
}

/// A frozen linear layer with bias and its adapter, with and without LoRA dropout.
fn lora_linear_cases<B: FusedOps>() {
    type A<B> = Autodiff<B>;
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
        let p = |w: &Tensor<A<B>, 2>| super::LoraLinear {
            w: prim(w.clone()),
            bias: Some(prim(bias.clone())),
            a: prim(a.clone()),
            b: prim(b.clone()),
            scale: 2.0,
        };
        let fused = float::<A<B>, 2>(A::<B>::lora_linear(prim(x.clone()), x_lora().map(prim), p(&w)));
        let naive = float::<A<B>, 2>(super::reference::lora_linear::<A<B>>(prim(x.clone()), x_lora().map(prim), p(&w)));
        assert!(rel_diff(fused.clone(), naive.clone()) < tol::<B>(), "lora_linear output (dropout {dropout})");
        let (gf, gn) = ((fused * up.clone()).sum().backward(), (naive * up).sum().backward());
        for (name, t) in [("x", &x), ("lora_A", &a), ("lora_B", &b)] {
            let (f, n) = (t.grad(&gf), t.grad(&gn));
            assert!(f.is_some() && n.is_some(), "d{name} (dropout {dropout}): fused {} naive {}", f.is_some(), n.is_some());
            let r = rel_diff(f.unwrap(), n.unwrap());
            assert!(r < tol::<B>(), "lora_linear d{name} (dropout {dropout}) differs by {r}");
        }
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
fn rms_norm_rope_swiglu_cpu_kernels_match_plain_ops() {
    elementwise_cases::<Flex>();
}

#[test]
fn rms_norm_rope_swiglu_generic_backward_matches_plain_ops() {
    elementwise_cases::<NdArray>();
}

#[test]
fn cross_entropy_cpu_kernel_matches_plain_ops() {
    let logits = random::<Flex, 2>([5, 1000]) * 4.0;
    let targets = [3u32, 999, 0, 500, 42];
    let coef = [0.5f32, 0.0, 1.0, 0.25, 2.0];
    let (loss, grad) = Flex::cross_entropy(prim(logits.clone()), &targets, &coef, None);
    let (ref_loss, ref_grad) = super::reference::cross_entropy::<Flex>(prim(logits), &targets, &coef, None);
    assert!((loss - ref_loss).abs() <= 1e-5 * ref_loss.abs(), "loss {loss} vs {ref_loss}");
    assert!(rel_diff(float::<Flex, 2>(grad), float::<Flex, 2>(ref_grad)) < TOL, "gradient");
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
    Flex::attention_forward(prim(q), prim(k.clone()), prim(k), Mask::Causal);
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

/// One `[1, 1, s, t]` mask for a batch of two: each row reads it, none reads past it.
#[test]
fn attention_kernel_broadcasts_a_single_mask_over_the_batch() {
    let device = Default::default();
    let q = random::<Flex, 4>([2, 5, 2, 8]);
    let k = random::<Flex, 4>([2, 5, 1, 8]);
    let v = random::<Flex, 4>([2, 5, 1, 8]);
    let one = Tensor::<Flex, 2, Bool>::tril_mask([5, 5], 0, &device).unsqueeze::<4>();
    let (broadcast, _) =
        Flex::attention_forward(prim(q.clone()), prim(k.clone()), prim(v.clone()), Mask::Explicit(one.clone().into_primitive()));
    let (causal, _) = Flex::attention_forward(prim(q), prim(k), prim(v), Mask::Causal);
    assert!(rel_diff(float::<Flex, 4>(broadcast), float::<Flex, 4>(causal)) < TOL);
}
