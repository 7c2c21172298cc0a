//! The quantized frozen linear on burn-flex: W (`[out, in]`, [`crate::quant`]) is never
//! dequantized whole. Each task dequantizes one tile of it into an f32 scratch buffer of its
//! own and runs the same gemm as the dense kernels on that tile, writing a disjoint block of
//! the output, so the tasks need no reduction: the forward pass tiles W by output rows (a
//! tile's columns of y), the input gradient tiles it by input columns (a tile's columns of dx).
//! LoRA's products are the dense kernel's.

use burn::backend::Flex;
use burn::tensor::ops::FloatTensor;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::shared::Shared;
use super::{all_f32, contiguous, dims, gemm, tensor, ALL_CORES, ONE_CORE, ROWS_PER_TASK};
use crate::ops::{reference, QuantLinear};
use crate::quant::{QuantizedMatrix, SharedMatrix, NF4_BLOCK};

/// Weights dequantized per tile: 128 KiB of f32, which stays in a core's L2 while gemm reads it
/// once per block of x's rows.
const TILE_ELEMS: usize = 1 << 15;

/// A tile's extent along a dimension of `len`: about `TILE_ELEMS / other` (`other`: the
/// dimension each tile spans whole), at least 16 (gemm's register block), a multiple of
/// `align`, and small enough that every core gets several tiles.
fn tile_len(len: usize, other: usize, align: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads();
    let t = (TILE_ELEMS / other.max(1)).min(len.div_ceil(tasks)).max(16);
    t.div_ceil(align).saturating_mul(align).min(len).max(1)
}

/// W `[out, in]` against x `[n, in]`, and the adapter and bias when there are: the shapes the
/// raw gemm calls index by.
fn check(x: &FlexTensor, x_lora: Option<&FlexTensor>, w: &QuantizedMatrix, p: &QuantLinear<Flex>, grad: Option<&FlexTensor>) {
    let (xd, (out, din)) = (dims(x), (w.rows(), w.cols()));
    assert!(xd.len() == 2 && xd[1] == din, "quant_linear: x {xd:?} for a weight [{out}, {din}] (expected [n, {din}])");
    if let Some(l) = &p.lora {
        let (ad, bd) = (dims(&l.a), dims(&l.b));
        assert!(
            ad.len() == 2 && bd.len() == 2 && ad[0] == din && ad[1] == bd[0] && bd[1] == out,
            "quant_linear: lora_A {ad:?}, lora_B {bd:?} for a weight [{out}, {din}] (expected [{din}, r], [r, {out}])"
        );
    }
    if let Some(xl) = x_lora {
        assert_eq!(dims(xl), xd, "quant_linear: x after dropout shaped unlike x");
    }
    if let Some(bias) = &p.bias {
        assert_eq!(dims(bias), [out], "quant_linear: bias for {out} outputs");
    }
    if let Some(g) = grad {
        assert_eq!(dims(g), [xd[0], out], "quant_linear: output gradient shape");
    }
}

/// y = x·Wᵀ + bias (+ scale·(x_lora·a)·b).
// gemm's 14 arguments on one line each call: rustfmt would give each its own line.
#[rustfmt::skip]
pub(super) fn forward(x: FloatTensor<Flex>, x_lora: Option<FloatTensor<Flex>>, p: QuantLinear<Flex>) -> FloatTensor<Flex> {
    let mut ts = vec![&x];
    ts.extend(x_lora.iter().chain(p.bias.iter()).chain(p.lora.iter().flat_map(|l| [&l.a, &l.b])));
    if !all_f32(&ts) {
        return reference::quant_linear::<Flex>(x, x_lora, p);
    }
    let x = contiguous(x);
    let x_lora = x_lora.map(contiguous);
    check(&x, x_lora.as_ref(), &p.w, &p, None);
    let (n, din, dout) = (dims(&x)[0], p.w.cols(), p.w.rows());
    let xs = x.storage::<f32>();
    let mut y = vec![0f32; n * dout];
    let rows = tile_len(dout, din, 1);
    let dst = Shared(y.as_mut_ptr());
    (0..dout.div_ceil(rows)).into_par_iter().for_each_init(
        || vec![0f32; rows * din],
        |scratch, t| {
            let (o0, o1) = (t * rows, ((t + 1) * rows).min(dout));
            let tile = &mut scratch[..(o1 - o0) * din];
            p.w.dequantize_into(o0 * din, tile);
            // y[:, o0..o1] = x · tileᵀ (the tile is rows o0..o1 of W, [o1 − o0, in])
            unsafe { gemm(ONE_CORE, n, o1 - o0, din, dst.at(o0), dout as isize, false, xs.as_ptr(), din as isize, 1, tile.as_ptr(), 1, din as isize, 1.0) };
        },
    );
    if let Some(l) = &p.lora {
        let (a, b) = (contiguous(l.a.clone()), contiguous(l.b.clone()));
        let r = dims(&a)[1];
        let (as_, bs) = (a.storage::<f32>(), b.storage::<f32>());
        let xl = x_lora.as_ref().map_or(xs, |t| t.storage::<f32>());
        let mut down = vec![0f32; n * r];
        unsafe {
            gemm(ALL_CORES, n, r, din, down.as_mut_ptr(), r as isize, false, xl.as_ptr(), din as isize, 1, as_.as_ptr(), r as isize, 1, 1.0);
            gemm(ALL_CORES, n, dout, r, y.as_mut_ptr(), dout as isize, true, down.as_ptr(), r as isize, 1, bs.as_ptr(), dout as isize, 1, l.scale as f32);
        }
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

/// dx = grad·W into `dx` `[n, in]`, W tiled by columns: each task dequantizes W[:, c0..c1]
/// (a slice of every row) and fills dx[:, c0..c1].
// gemm's 14 arguments on one line each call: rustfmt would give each its own line.
#[rustfmt::skip]
fn input_grad_into(w: &QuantizedMatrix, gs: &[f32], n: usize, dx: &mut [f32]) {
    let (dout, din) = (w.rows(), w.cols());
    // NF4 blocks run along the rows: column tiles of whole blocks keep each row's slice on
    // whole bytes.
    let cols = tile_len(din, dout, if din >= NF4_BLOCK { NF4_BLOCK } else { 1 });
    let dst = Shared(dx.as_mut_ptr());
    (0..din.div_ceil(cols)).into_par_iter().for_each_init(
        || vec![0f32; dout * cols],
        |scratch, t| {
            let (c0, c1) = (t * cols, ((t + 1) * cols).min(din));
            let width = c1 - c0;
            let tile = &mut scratch[..dout * width];
            for (o, row) in tile.chunks_exact_mut(width).enumerate() {
                w.dequantize_into(o * din + c0, row);
            }
            // dx[:, c0..c1] = grad · tile (the tile is W[:, c0..c1], [out, c1 − c0])
            unsafe { gemm(ONE_CORE, n, width, dout, dst.at(c0), din as isize, false, gs.as_ptr(), dout as isize, 1, tile.as_ptr(), width as isize, 1, 1.0) };
        },
    );
}

pub(super) fn input_grad(w: &SharedMatrix, grad: FloatTensor<Flex>) -> FloatTensor<Flex> {
    if !all_f32(&[&grad]) {
        return reference::quant_linear_input_grad::<Flex>(w, grad);
    }
    let g = contiguous(grad);
    let gd = dims(&g);
    assert!(gd.len() == 2 && gd[1] == w.rows(), "quant_linear: output gradient {gd:?} for a weight [{}, {}]", w.rows(), w.cols());
    let mut dx = vec![0f32; gd[0] * w.cols()];
    input_grad_into(w, g.storage::<f32>(), gd[0], &mut dx);
    tensor(dx, vec![gd[0], w.cols()])
}

/// The adapter's gradients as in the dense kernel, with dx from the tiled input gradient.
// gemm's 14 arguments on one line each call: rustfmt would give each its own line.
#[rustfmt::skip]
#[allow(clippy::type_complexity)]
pub(super) fn lora_backward(
    x: FloatTensor<Flex>,
    x_lora: Option<FloatTensor<Flex>>,
    p: QuantLinear<Flex>,
    grad: FloatTensor<Flex>,
    need_dx: bool,
) -> (Option<FloatTensor<Flex>>, Option<FloatTensor<Flex>>, FloatTensor<Flex>, FloatTensor<Flex>) {
    let lora = p.lora.as_ref().expect("quant_lora_linear_backward: a layer with an adapter");
    let mut ts = vec![&x, &lora.a, &lora.b, &grad];
    ts.extend(x_lora.iter());
    if !all_f32(&ts) {
        return reference::quant_lora_linear_backward::<Flex>(x, x_lora, p, grad, need_dx);
    }
    let (x, g) = (contiguous(x), contiguous(grad));
    let x_lora = x_lora.map(contiguous);
    check(&x, x_lora.as_ref(), &p.w, &p, Some(&g));
    let (a, b) = (contiguous(lora.a.clone()), contiguous(lora.b.clone()));
    let (n, din, dout, r) = (dims(&x)[0], p.w.cols(), p.w.rows(), dims(&a)[1]);
    let (xs, as_, bs, gs) = (x.storage::<f32>(), a.storage::<f32>(), b.storage::<f32>(), g.storage::<f32>());
    let xl = x_lora.as_ref().map_or(xs, |t| t.storage::<f32>());
    let s = lora.scale as f32;
    let mut down = vec![0f32; n * r];
    let mut v = vec![0f32; n * r];
    let mut da = vec![0f32; din * r];
    let mut db = vec![0f32; r * dout];
    let mut dx = vec![0f32; if need_dx { n * din } else { 0 }];
    let mut dx_lora = vec![0f32; if x_lora.is_some() { n * din } else { 0 }];
    if need_dx {
        input_grad_into(&p.w, gs, n, &mut dx);
    }
    unsafe {
        // down = x_lora·a (recomputed: [n, r] is cheap), v = grad·bᵀ
        gemm(ALL_CORES, n, r, din, down.as_mut_ptr(), r as isize, false, xl.as_ptr(), din as isize, 1, as_.as_ptr(), r as isize, 1, 1.0);
        gemm(ALL_CORES, n, r, dout, v.as_mut_ptr(), r as isize, false, gs.as_ptr(), dout as isize, 1, bs.as_ptr(), 1, dout as isize, 1.0);
        // db = scale · downᵀ·grad, da = scale · x_loraᵀ·v
        gemm(ALL_CORES, r, dout, n, db.as_mut_ptr(), dout as isize, false, down.as_ptr(), 1, r as isize, gs.as_ptr(), dout as isize, 1, s);
        gemm(ALL_CORES, din, r, n, da.as_mut_ptr(), r as isize, false, xl.as_ptr(), 1, din as isize, v.as_ptr(), r as isize, 1, s);
        // The adapter's part of the input gradient, scale · v·aᵀ: into dx when it saw x itself.
        if x_lora.is_some() {
            gemm(ALL_CORES, n, din, r, dx_lora.as_mut_ptr(), din as isize, false, v.as_ptr(), r as isize, 1, as_.as_ptr(), 1, r as isize, s);
        } else if need_dx {
            gemm(ALL_CORES, n, din, r, dx.as_mut_ptr(), din as isize, true, v.as_ptr(), r as isize, 1, as_.as_ptr(), 1, r as isize, s);
        }
    }
    let dx = need_dx.then(|| tensor(dx, vec![n, din]));
    let dx_lora = x_lora.is_some().then(|| tensor(dx_lora, vec![n, din]));
    (dx, dx_lora, tensor(da, vec![din, r]), tensor(db, vec![r, dout]))
}
