//! Each CubeCL kernel against the generic burn ops of [`crate::ops::reference`] on the same
//! device: wgpu when built with `--features wgpu` (lavapipe in CI), CUDA when built with
//! `--features cuda` alone (scripts/gpu-check.sh). The references are themselves checked against
//! burn's autodiff in f64 on the CPU (`ops::tests`); WGSL has no f64, so the comparison here is
//! kernel against reference, both in f32.

use burn::tensor::{Distribution, ElementConversion, Tensor};

use crate::ops::{float, prim, reference, Activation, AttentionOptions, FusedOps, LoraLinear, Mask};

#[cfg(feature = "wgpu")]
type B = crate::backend::Wgpu;
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
type B = crate::backend::Cuda;

fn random<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

/// Largest |a − b| relative to the largest |b|.
fn rel_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let scale: f32 = b.clone().abs().max().into_scalar().elem();
    let d: f32 = (a - b).abs().max().into_scalar().elem();
    d / scale.max(1e-12)
}

/// Both compute in f32, in other orders: ~1e-6 of the largest value apart.
const TOL: f32 = 1e-5;

fn check<const D: usize>(kernel: Tensor<B, D>, reference: Tensor<B, D>, what: &str) {
    let r = rel_diff(kernel, reference);
    assert!(r < TOL, "{what}: the kernel is {r} off the reference");
}

/// Widths below, at and above the 256 units of a row's cube, and not multiples of them.
const WIDTHS: [usize; 4] = [8, 100, 256, 576];

#[test]
fn rms_norm_forward_and_backward_match_the_reference() {
    for d in WIDTHS {
        let rows = 37;
        let (x, w, grad) = (random::<2>([rows, d]), random::<1>([d]), random::<2>([rows, d]));
        let (out, rstd) = B::rms_norm_forward(prim(x.clone()), prim(w.clone()), 1e-6);
        let (out_ref, rstd_ref) = reference::rms_norm_forward::<B>(prim(x.clone()), prim(w.clone()), 1e-6);
        check::<2>(float(out), float(out_ref), &format!("rms_norm d={d}"));
        check::<2>(float(rstd.clone()), float(rstd_ref), &format!("rms_norm rstd d={d}"));
        let dx = B::rms_norm_backward(prim(x.clone()), prim(w.clone()), rstd.clone(), prim(grad.clone()));
        let dx_ref = reference::rms_norm_backward::<B>(prim(x), prim(w), rstd, prim(grad));
        check::<2>(float(dx), float(dx_ref), &format!("rms_norm backward d={d}"));
    }
}

#[test]
fn layer_norm_forward_and_backward_match_the_reference() {
    for d in WIDTHS {
        let rows = 19;
        // Off-centre rows, so that a one-pass variance would show.
        let x = random::<2>([rows, d]) * 3.0 + 5.0;
        let (w, b, grad) = (random::<1>([d]), random::<1>([d]), random::<2>([rows, d]));
        let (out, stats) = B::layer_norm_forward(prim(x.clone()), prim(w.clone()), prim(b.clone()), 1e-5);
        let (out_ref, stats_ref) = reference::layer_norm_forward::<B>(prim(x.clone()), prim(w.clone()), prim(b), 1e-5);
        check::<2>(float(out), float(out_ref), &format!("layer_norm d={d}"));
        check::<2>(float(stats.clone()), float(stats_ref), &format!("layer_norm stats d={d}"));
        let dx = B::layer_norm_backward(prim(x.clone()), prim(w.clone()), stats.clone(), prim(grad.clone()));
        let dx_ref = reference::layer_norm_backward::<B>(prim(x), prim(w), stats, prim(grad));
        check::<2>(float(dx), float(dx_ref), &format!("layer_norm backward d={d}"));
    }
}

#[test]
fn rope_matches_the_reference_whole_and_partial_with_shared_or_per_row_tables() {
    // (batch, table rows, head_dim, rotary dims): Llama's whole rotation, GPT-NeoX's and
    // Phi-3's partial one, one table for every row and one per row.
    for (b, rows, d, r) in [(2, 1, 16, 16), (2, 2, 16, 16), (3, 1, 32, 8), (2, 2, 24, 12)] {
        let (s, h) = (5, 3);
        let x = random::<4>([b, s, h, d]);
        let (cos, sin) = (random::<4>([rows, s, 1, r]), random::<4>([rows, s, 1, r]));
        let out = B::fused_rope(prim(x.clone()), prim(cos.clone()), prim(sin.clone()));
        let out_ref = reference::fused_rope::<B>(prim(x), prim(cos), prim(sin));
        check::<4>(float(out), float(out_ref), &format!("rope b={b} rows={rows} d={d} r={r}"));
    }
}

#[test]
fn gated_and_plain_activations_match_the_reference_both_ways() {
    for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
        // Wide inputs: the tails of σ, tanh and erf.
        let (gate, up, grad) = (random::<2>([13, 70]) * 4.0, random::<2>([13, 70]), random::<2>([13, 70]));
        let out = B::fused_glu(prim(gate.clone()), prim(up.clone()), act);
        let out_ref = reference::fused_glu::<B>(prim(gate.clone()), prim(up.clone()), act);
        check::<2>(float(out), float(out_ref), &format!("glu {act:?}"));
        let (d_gate, d_up) = B::glu_backward(prim(gate.clone()), prim(up.clone()), act, prim(grad.clone()));
        let (d_gate_ref, d_up_ref) = reference::glu_backward::<B>(prim(gate.clone()), prim(up), act, prim(grad.clone()));
        check::<2>(float(d_gate), float(d_gate_ref), &format!("glu backward d gate {act:?}"));
        check::<2>(float(d_up), float(d_up_ref), &format!("glu backward d up {act:?}"));

        let out = B::fused_activation(prim(gate.clone()), act);
        let out_ref = reference::activation::<B, 2>(gate.clone(), act);
        check::<2>(float(out), out_ref, &format!("activation {act:?}"));
        let dx = B::activation_backward(prim(gate.clone()), act, prim(grad.clone()));
        let dx_ref = reference::activation_backward::<B>(prim(gate), act, prim(grad));
        check::<2>(float(dx), float(dx_ref), &format!("activation backward {act:?}"));
    }
}

/// The frozen linear layer with LoRA, `[n, k]` -> `[n, m]` at rank r: the output, and each
/// gradient with and without x's, against the reference within `tol`.
fn check_lora_linear(w: Tensor<B, 2>, [n, r]: [usize; 2], bias: bool, dropout: bool, tol: f32, what: &str) {
    let [k, m] = w.dims();
    let x = random::<2>([n, k]);
    // With dropout the adapter sees its own input; without, x itself (one gradient for both).
    let x_lora = dropout.then(|| random::<2>([n, k]));
    let bias = bias.then(|| random::<1>([m]));
    let (a, b, grad) = (random::<2>([k, r]), random::<2>([r, m]), random::<2>([n, m]));
    let p = || LoraLinear::<B> { w: prim(w.clone()), bias: bias.clone().map(prim), a: prim(a.clone()), b: prim(b.clone()), scale: 1.75 };
    let x_lora_prim = || x_lora.clone().map(prim);
    let close = |kernel: Tensor<B, 2>, reference: Tensor<B, 2>, part: &str| {
        let d = rel_diff(kernel, reference);
        assert!(d < tol, "{what}: {part}: the kernel is {d} off the reference");
    };
    let y = B::lora_linear(prim(x.clone()), x_lora_prim(), p());
    let y_ref = reference::lora_linear::<B>(prim(x.clone()), x_lora_prim(), p());
    close(float(y), float(y_ref), "output");
    for need_dx in [true, false] {
        let (dx, dx_lora, da, db) = B::lora_linear_backward(prim(x.clone()), x_lora_prim(), p(), prim(grad.clone()), need_dx);
        let (dx_ref, dx_lora_ref, da_ref, db_ref) =
            reference::lora_linear_backward::<B>(prim(x.clone()), x_lora_prim(), p(), prim(grad.clone()), need_dx);
        assert_eq!((dx.is_some(), dx_lora.is_some()), (dx_ref.is_some(), dx_lora_ref.is_some()), "{what}: which gradients");
        assert_eq!(dx.is_some(), need_dx, "{what}: dx when need_dx is {need_dx}");
        assert_eq!(dx_lora.is_some(), dropout, "{what}: dx_lora with dropout {dropout}");
        if let (Some(dx), Some(dx_ref)) = (dx, dx_ref) {
            close(float(dx), float(dx_ref), "dx");
        }
        if let (Some(dx_lora), Some(dx_lora_ref)) = (dx_lora, dx_lora_ref) {
            close(float(dx_lora), float(dx_lora_ref), "dx_lora");
        }
        close(float(da), float(da_ref), "d lora_A");
        close(float(db), float(db_ref), "d lora_B");
    }
}

#[test]
fn lora_linear_forward_and_backward_match_the_reference() {
    // (rows, in, out, rank, bias, dropout): outputs that are not a multiple of a cube, ranks 1
    // and 16, the adapter on x itself or on its own (dropped) input.
    for (n, k, m, r, bias, dropout) in
        [(37, 48, 100, 8, true, false), (5, 576, 300, 16, false, true), (64, 32, 257, 1, true, true), (3, 8, 8, 4, false, false)]
    {
        check_lora_linear(random::<2>([k, m]), [n, r], bias, dropout, TOL, &format!("lora_linear n={n} in={k} out={m} r={r}"));
    }
}

#[test]
fn frozen_matmul_matches_the_reference_also_by_a_transposed_weight() {
    let (x, w) = (random::<2>([33, 40]), random::<2>([40, 70]));
    let y = B::frozen_matmul(prim(x.clone()), prim(w.clone()));
    check::<2>(float(y), float(reference::frozen_matmul::<B>(prim(x), prim(w.clone()))), "frozen_matmul");
    // The backward pass multiplies by wᵀ, a view.
    let g = random::<2>([33, 70]);
    let dx = B::frozen_matmul(prim(g.clone()), prim(w.clone().transpose()));
    check::<2>(float(dx), float(reference::frozen_matmul::<B>(prim(g), prim(w.transpose()))), "frozen_matmul by wᵀ");
}

/// On CUDA the base may be bf16. Its products read x (or the gradient) rounded to bf16 and sum
/// in f32 without rounding the result, so the reference is the f32 op on bf16-rounded inputs;
/// the generic path's bf16 output would be up to 2⁻⁹ off.
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
#[test]
fn frozen_matmul_with_a_bf16_base_sums_in_f32() {
    use burn::tensor::DType;
    let round = |t: Tensor<B, 2>| t.cast(DType::BF16).cast(DType::F32);
    let (x, w) = (random::<2>([65, 96]), random::<2>([96, 130]).cast(DType::BF16));
    let y = float::<B, 2>(B::frozen_matmul(prim(x.clone()), prim(w.clone())));
    assert_eq!(y.dtype(), DType::F32, "frozen_matmul: the output takes x's dtype");
    let y_ref = round(x).matmul(w.clone().cast(DType::F32));
    let d = rel_diff(y, y_ref);
    assert!(d < 1e-5, "frozen_matmul, bf16 base: {d} off the f32 sums of bf16-rounded inputs");
    let g = random::<2>([65, 130]);
    let dx = float::<B, 2>(B::frozen_matmul(prim(g.clone()), prim(w.clone().transpose())));
    let d = rel_diff(dx, round(g).matmul(w.cast(DType::F32).transpose()));
    assert!(d < 1e-5, "frozen_matmul by a bf16 wᵀ: {d} off");
}

/// The LoRA layer with a bf16 base on CUDA, against the generic path (which rounds the base's
/// product to bf16: 2⁻⁸ of the largest value covers it).
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
#[test]
fn lora_linear_with_a_bf16_base_matches_the_reference() {
    use burn::tensor::DType;
    for (n, k, m, r, bias, dropout) in [(37, 48, 100, 8, true, false), (5, 576, 300, 16, false, true)] {
        let w = random::<2>([k, m]).cast(DType::BF16);
        check_lora_linear(w, [n, r], bias, dropout, 1.0 / 256.0, &format!("lora_linear, bf16 base, n={n} in={k} out={m} r={r}"));
    }
}

/// A `[rows, 1, s, t]` mask, true where `hidden(row, i, j)`.
fn mask([rows, s, t]: [usize; 3], hidden: impl Fn(usize, usize, usize) -> bool) -> Tensor<B, 4, burn::tensor::Bool> {
    let data: Vec<bool> =
        (0..rows).flat_map(|r| (0..s).flat_map(move |i| (0..t).map(move |j| (r, i, j)))).map(|(r, i, j)| hidden(r, i, j)).collect();
    Tensor::from_data(burn::tensor::TensorData::new(data, [rows, 1, s, t]), &Default::default())
}

/// The attention kernels' output, lse and gradients of q, k and v against the reference's.
fn check_attention(
    [b, s, t, h, kv, d]: [usize; 6],
    explicit: Option<Tensor<B, 4, burn::tensor::Bool>>,
    opts: AttentionOptions,
    what: &str,
) {
    let (q, k, v) = (random::<4>([b, s, h, d]), random::<4>([b, t, kv, d]), random::<4>([b, t, kv, d]));
    let grad = random::<4>([b, s, h, d]);
    let mask = || match &explicit {
        None => Mask::Causal,
        Some(m) => Mask::Explicit(m.clone().into_primitive()),
    };
    let (out, lse) = B::attention_forward(prim(q.clone()), prim(k.clone()), prim(v.clone()), mask(), &opts);
    let (out_ref, lse_ref) = reference::attention_forward::<B>(prim(q.clone()), prim(k.clone()), prim(v.clone()), mask(), &opts);
    check::<4>(float(out.clone()), float(out_ref), &format!("{what}: out"));
    // A row that sees no key has the smallest finite lse in both: compare the others.
    let (lse, lse_ref): (Tensor<B, 3>, Tensor<B, 3>) = (float(lse.clone()), float(lse_ref));
    let seen = lse_ref.clone().greater_elem(-1e30);
    check::<3>(lse.clone().mask_fill(seen.clone().bool_not(), 0.0), lse_ref.mask_fill(seen.bool_not(), 0.0), &format!("{what}: lse"));
    let grads = B::attention_backward(
        prim(q.clone()),
        prim(k.clone()),
        prim(v.clone()),
        mask(),
        &opts,
        out.clone(),
        prim(lse.clone()),
        prim(grad.clone()),
    );
    let grads_ref = reference::attention_backward::<B>(prim(q), prim(k), prim(v), mask(), &opts, out, prim(lse), prim(grad));
    check::<4>(float(grads.0), float(grads_ref.0), &format!("{what}: dq"));
    check::<4>(float(grads.1), float(grads_ref.1), &format!("{what}: dk"));
    check::<4>(float(grads.2), float(grads_ref.2), &format!("{what}: dv"));
}

#[test]
fn attention_forward_and_backward_match_the_reference_for_every_familys_options() {
    // Causal, grouped-query heads (Llama, Qwen, Mistral), a head of 64.
    check_attention([2, 7, 7, 4, 2, 64], None, AttentionOptions::new(64), "causal gqa");
    // Queries after earlier keys (s < t): bottom-right alignment.
    check_attention([1, 3, 8, 2, 1, 8], None, AttentionOptions::new(8), "causal s<t");
    // Sliding window (Mistral, Gemma 2/3's local layers) with a soft-cap and a custom scale (Gemma 2).
    let mut opts = AttentionOptions::new(16);
    (opts.window, opts.softcap, opts.scale) = (Some(3), Some(5.0), 0.3);
    check_attention([2, 9, 9, 2, 1, 16], None, opts, "window softcap scale");
    // ALiBi (BLOOM), multi-head.
    let mut opts = AttentionOptions::new(8);
    opts.alibi = Some(vec![0.5, 0.25, 0.125]);
    check_attention([2, 6, 6, 3, 3, 8], None, opts, "alibi");
    // Block-diagonal masks of packed rows, one per row of the batch, and a padding query that
    // sees no key at all.
    let (s, t) = (8, 8);
    let packed = mask([2, s, t], |r, i, j| {
        let start = if r == 0 {
            if i < 3 {
                0
            } else {
                3
            }
        } else {
            0
        };
        j > i || j < start || (r == 1 && i == 7)
    });
    check_attention([2, s, t, 4, 2, 8], Some(packed), AttentionOptions::new(8), "packed rows");
    // One mask for every row of the batch, with a window on top.
    let shared = mask([1, s, t], |_, i, j| j > i || (i == 5 && j == 2));
    let mut opts = AttentionOptions::new(8);
    opts.window = Some(4);
    check_attention([3, s, t, 2, 2, 8], Some(shared), opts, "shared mask and window");
}

#[test]
fn cross_entropy_matches_the_reference_plain_and_soft_capped() {
    // A vocabulary neither a multiple of the cube nor below it; weights 0 (prompt) included.
    let (rows, vocab) = (6, 1000);
    let targets = [3u32, 999, 0, 500, 42, 7];
    let coef = [0.5f32, 0.0, 1.0, 0.25, 2.0, 1.0];
    for softcap in [None, Some(5.0)] {
        let logits = random::<2>([rows, vocab]) * 4.0;
        let (loss, grad) = B::cross_entropy(prim(logits.clone()), &targets, &coef, softcap);
        let (loss_ref, grad_ref) = reference::cross_entropy::<B>(prim(logits), &targets, &coef, softcap);
        check::<1>(float(loss), float(loss_ref), &format!("cross_entropy loss, soft-cap {softcap:?}"));
        check::<2>(float(grad), float(grad_ref), &format!("cross_entropy gradient, soft-cap {softcap:?}"));
    }
}

#[test]
fn dropout_mask_has_the_host_generators_exact_bits() {
    let device = Default::default();
    // Seeds and offsets whose additions carry across the 32-bit halves and wrap 2⁶⁴, offsets
    // past 2³², and a length that is not a multiple of a cube.
    for (p, seed, first) in
        [(0.1, 0u64, 0u64), (0.5, u64::MAX - 3, 12_345), (0.05, 0xDEAD_BEEF_0000_0001, 5 << 32), (0.9, 42, u64::MAX / 3)]
    {
        let len = 10_007;
        let kernel = float::<B, 1>(B::dropout_mask(len, p, seed, first, &device)).into_data().to_vec::<f32>().unwrap();
        let host = float::<B, 1>(reference::dropout_mask::<B>(len, p, seed, first, &device)).into_data().to_vec::<f32>().unwrap();
        let differ = kernel.iter().zip(&host).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "p={p} seed={seed} first={first}: {differ} of {len} elements differ from the host's mask");
        let dropped = host.iter().filter(|&&v| v == 0.0).count() as f64 / len as f64;
        assert!((dropped - p).abs() < 0.02, "p={p}: {dropped} dropped");
    }
}
