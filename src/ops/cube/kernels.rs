//! The CubeCL kernels of [`super`]. Every kernel reads and writes its tensors in their own dtype
//! (`#[define]`: f32 on wgpu, f32 or bf16 on CUDA) and computes in f32, as the CPU kernels do.
//!
//! None uses plane (warp) operations: CPU Vulkan devices such as lavapipe, on which CI runs
//! them, have none. A row's sums go through shared memory instead ([`block_sum`]).

use cubecl::prelude::*;

/// The sum (or, with `max`, the largest) of every unit's `v` over the cube (a power of two of
/// units, `shared` one slot per unit); every unit gets the result. Ends with a barrier so that
/// `shared` can be used again.
#[cube]
fn block_reduce(shared: &mut SharedMemory<f32>, v: f32, #[comptime] max: bool) -> f32 {
    let t = UNIT_POS_X as usize;
    shared[t] = v;
    sync_cube();
    let mut stride = (CUBE_DIM_X / 2) as usize;
    while stride > 0 {
        if t < stride {
            let other = shared[t + stride];
            if max {
                shared[t] = f32::max(shared[t], other);
            } else {
                shared[t] += other;
            }
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

#[cube]
fn block_sum(shared: &mut SharedMemory<f32>, v: f32) -> f32 {
    block_reduce(shared, v, false)
}

/// One cube per row of `[rows, d]`: out = x·rstd·w and rstd = 1/√(mean(x²) + eps).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_forward<F: Float, W: Float>(
    x: &Tensor<F>,
    w: &Tensor<W>,
    out: &mut Tensor<F>,
    rstd: &mut Tensor<F>,
    rows: usize,
    d: usize,
    eps: f32,
    #[comptime] block: usize,
    #[define(F, W)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let t = UNIT_POS_X as usize;
    let base = row * d;
    let mut shared = SharedMemory::<f32>::new(block);
    let mut squares = f32::new(0.0);
    let mut i = t;
    while i < d {
        let v = f32::cast_from(x[base + i]);
        squares += v * v;
        i += block;
    }
    let total = block_sum(&mut shared, squares);
    let r = f32::new(1.0) / f32::sqrt(total / f32::cast_from(d) + eps);
    let mut i = t;
    while i < d {
        out[base + i] = F::cast_from(f32::cast_from(x[base + i]) * r * f32::cast_from(w[i]));
        i += block;
    }
    if t == 0 {
        rstd[row] = F::cast_from(r);
    }
}

/// One cube per row: with g = grad·w, dx = rstd·(g − x·rstd²·mean(g·x)).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward<F: Float, W: Float>(
    x: &Tensor<F>,
    w: &Tensor<W>,
    rstd: &Tensor<F>,
    grad: &Tensor<F>,
    dx: &mut Tensor<F>,
    rows: usize,
    d: usize,
    #[comptime] block: usize,
    #[define(F, W)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let t = UNIT_POS_X as usize;
    let base = row * d;
    let mut shared = SharedMemory::<f32>::new(block);
    let mut dot = f32::new(0.0);
    let mut i = t;
    while i < d {
        dot += f32::cast_from(grad[base + i]) * f32::cast_from(w[i]) * f32::cast_from(x[base + i]);
        i += block;
    }
    let mean = block_sum(&mut shared, dot) / f32::cast_from(d);
    let r = f32::cast_from(rstd[row]);
    let mut i = t;
    while i < d {
        let g = f32::cast_from(grad[base + i]) * f32::cast_from(w[i]);
        dx[base + i] = F::cast_from((g - f32::cast_from(x[base + i]) * r * r * mean) * r);
        i += block;
    }
}

/// One cube per row: out = (x − mean)·rstd·w + b, stats `[rows, 2]` = (mean, rstd), with the
/// biased variance, computed around the mean (two passes) as torch does.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_forward<F: Float, W: Float>(
    x: &Tensor<F>,
    w: &Tensor<W>,
    b: &Tensor<W>,
    out: &mut Tensor<F>,
    stats: &mut Tensor<F>,
    rows: usize,
    d: usize,
    eps: f32,
    #[comptime] block: usize,
    #[define(F, W)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let t = UNIT_POS_X as usize;
    let base = row * d;
    let mut shared = SharedMemory::<f32>::new(block);
    let mut sum = f32::new(0.0);
    let mut i = t;
    while i < d {
        sum += f32::cast_from(x[base + i]);
        i += block;
    }
    let mean = block_sum(&mut shared, sum) / f32::cast_from(d);
    let mut squares = f32::new(0.0);
    let mut i = t;
    while i < d {
        let c = f32::cast_from(x[base + i]) - mean;
        squares += c * c;
        i += block;
    }
    let var = block_sum(&mut shared, squares) / f32::cast_from(d);
    let r = f32::new(1.0) / f32::sqrt(var + eps);
    let mut i = t;
    while i < d {
        let c = f32::cast_from(x[base + i]) - mean;
        out[base + i] = F::cast_from(c * r * f32::cast_from(w[i]) + f32::cast_from(b[i]));
        i += block;
    }
    if t == 0 {
        stats[row * 2] = F::cast_from(mean);
        stats[row * 2 + 1] = F::cast_from(r);
    }
}

/// One cube per row: with x̂ = (x − mean)·rstd and g = grad·w,
/// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<F: Float, W: Float>(
    x: &Tensor<F>,
    w: &Tensor<W>,
    stats: &Tensor<F>,
    grad: &Tensor<F>,
    dx: &mut Tensor<F>,
    rows: usize,
    d: usize,
    #[comptime] block: usize,
    #[define(F, W)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let t = UNIT_POS_X as usize;
    let base = row * d;
    let mean = f32::cast_from(stats[row * 2]);
    let r = f32::cast_from(stats[row * 2 + 1]);
    let mut shared = SharedMemory::<f32>::new(block);
    let mut sum_g = f32::new(0.0);
    let mut sum_gx = f32::new(0.0);
    let mut i = t;
    while i < d {
        let g = f32::cast_from(grad[base + i]) * f32::cast_from(w[i]);
        sum_g += g;
        sum_gx += g * (f32::cast_from(x[base + i]) - mean) * r;
        i += block;
    }
    let mean_g = block_sum(&mut shared, sum_g) / f32::cast_from(d);
    let mean_gx = block_sum(&mut shared, sum_gx) / f32::cast_from(d);
    let mut i = t;
    while i < d {
        let g = f32::cast_from(grad[base + i]) * f32::cast_from(w[i]);
        let x_hat = (f32::cast_from(x[base + i]) - mean) * r;
        dx[base + i] = F::cast_from((g - mean_g - x_hat * mean_gx) * r);
        i += block;
    }
}

/// One unit per element of x `[b, s, h, d]`: the first r dimensions of each head rotate,
/// x·cos + cat(x2, x1)·sin, with tables `[rows, s, 1, r]` (rows 1 or b); the rest pass through.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn rope<F: Float, T: Float>(
    x: &Tensor<F>,
    cos: &Tensor<T>,
    sin: &Tensor<T>,
    out: &mut Tensor<F>,
    len: usize,
    seq: usize,
    heads: usize,
    d: usize,
    r: usize,
    table_rows: usize,
    #[define(F, T)] _dtypes: [StorageType; 2],
) {
    let p = ABSOLUTE_POS;
    if p >= len {
        terminate!();
    }
    let i = p % d;
    if i >= r {
        out[p] = x[p];
    } else {
        // b·seq + position
        let token = p / (heads * d);
        let mut table_row = token;
        if table_rows == 1 {
            table_row = token % seq;
        }
        let at = table_row * r + i;
        let half = r / 2;
        let mut partner = p + half;
        if i >= half {
            partner = p - half;
        }
        let rotated = f32::cast_from(x[p]) * f32::cast_from(cos[at]) + f32::cast_from(x[partner]) * f32::cast_from(sin[at]);
        out[p] = F::cast_from(rotated);
    }
}

/// The activations, by the code [`super::activation_code`] gives them: 0 SiLU, 1 tanh GELU,
/// 2 erf GELU.
#[cube]
fn act(x: f32, #[comptime] code: u32) -> f32 {
    if code == 0 {
        x / (f32::new(1.0) + f32::exp(-x))
    } else if code == 1 {
        let inner = (x + f32::new(0.044715) * x * x * x) * f32::new(0.7978846);
        f32::new(0.5) * x * (f32::new(1.0) + f32::tanh(inner))
    } else {
        f32::new(0.5) * x * (f32::new(1.0) + Erf::erf(x * f32::new(0.70710677)))
    }
}

/// act'(x): σ·(1 + x·(1 − σ)) for SiLU; for the tanh GELU, with u = √(2/π)(x + 0.044715x³),
/// 0.5(1 + tanh u) + 0.5x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²); Φ(x) + x·φ(x) for GELU.
#[cube]
fn act_grad(x: f32, #[comptime] code: u32) -> f32 {
    if code == 0 {
        let sig = f32::new(1.0) / (f32::new(1.0) + f32::exp(-x));
        sig * (f32::new(1.0) + x * (f32::new(1.0) - sig))
    } else if code == 1 {
        let k = f32::new(0.7978846);
        let th = f32::tanh((x + f32::new(0.044715) * x * x * x) * k);
        let du = (f32::new(1.0) + f32::new(3.0 * 0.044715) * x * x) * k;
        f32::new(0.5) * (f32::new(1.0) + th) + f32::new(0.5) * x * (f32::new(1.0) - th * th) * du
    } else {
        let cdf = f32::new(0.5) * (f32::new(1.0) + Erf::erf(x * f32::new(0.70710677)));
        let pdf = f32::exp(f32::new(-0.5) * x * x) * f32::new(0.3989423);
        cdf + x * pdf
    }
}

/// One unit per element: act(gate)·up.
#[cube(launch)]
pub fn glu<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    out: &mut Tensor<F>,
    len: usize,
    #[comptime] code: u32,
    #[define(F)] _dtype: StorageType,
) {
    let p = ABSOLUTE_POS;
    if p >= len {
        terminate!();
    }
    out[p] = F::cast_from(act(f32::cast_from(gate[p]), code) * f32::cast_from(up[p]));
}

/// One unit per element: d gate = grad·up·act'(gate), d up = grad·act(gate).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn glu_backward<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    grad: &Tensor<F>,
    d_gate: &mut Tensor<F>,
    d_up: &mut Tensor<F>,
    len: usize,
    #[comptime] code: u32,
    #[define(F)] _dtype: StorageType,
) {
    let p = ABSOLUTE_POS;
    if p >= len {
        terminate!();
    }
    let g = f32::cast_from(gate[p]);
    let dy = f32::cast_from(grad[p]);
    d_gate[p] = F::cast_from(dy * f32::cast_from(up[p]) * act_grad(g, code));
    d_up[p] = F::cast_from(dy * act(g, code));
}

/// One unit per element: act(x).
#[cube(launch)]
pub fn activation<F: Float>(x: &Tensor<F>, out: &mut Tensor<F>, len: usize, #[comptime] code: u32, #[define(F)] _dtype: StorageType) {
    let p = ABSOLUTE_POS;
    if p >= len {
        terminate!();
    }
    out[p] = F::cast_from(act(f32::cast_from(x[p]), code));
}

/// One unit per element: grad·act'(x).
#[cube(launch)]
pub fn activation_backward<F: Float>(
    x: &Tensor<F>,
    grad: &Tensor<F>,
    dx: &mut Tensor<F>,
    len: usize,
    #[comptime] code: u32,
    #[define(F)] _dtype: StorageType,
) {
    let p = ABSOLUTE_POS;
    if p >= len {
        terminate!();
    }
    dx[p] = F::cast_from(f32::cast_from(grad[p]) * act_grad(f32::cast_from(x[p]), code));
}

/// The sizes and options the three attention kernels share: q `[b, s, h, d]`, k and v
/// `[b, t, kv, d]`, the explicit mask's rows (1 when one serves every batch row), the score
/// scale, the soft-cap and the sliding window.
#[derive(CubeLaunch, CubeType)]
pub struct AttentionSizes {
    pub b: usize,
    pub s: usize,
    pub t: usize,
    pub h: usize,
    pub kv: usize,
    pub mask_rows: usize,
    pub scale: f32,
    pub cap: f32,
    pub window: usize,
}

/// What the attention kernels are compiled for: the head size, and which of the causal rule
/// (else an explicit mask), soft-cap, ALiBi and sliding window apply.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct AttentionFlags {
    pub head_dim: usize,
    pub causal: bool,
    pub softcap: bool,
    pub alibi: bool,
    pub window: bool,
}

/// Where query row (batch, head, i) sits: its absolute position i_abs (queries are the last s
/// of t positions), its kv head under GQA, its explicit mask's offset and its row in q.
#[derive(CubeType)]
struct QueryRow {
    i: usize,
    head: usize,
    batch: usize,
    kv_head: usize,
    i_abs: usize,
    mask_row: usize,
    q_row: usize,
}

/// The query row of unit p, p being its index in `[b, h, s]` (the lse's layout).
#[cube]
fn query_row(p: usize, n: &AttentionSizes, #[comptime] flags: AttentionFlags) -> QueryRow {
    let i = p % n.s;
    let head = (p / n.s) % n.h;
    let batch = p / (n.s * n.h);
    QueryRow {
        i,
        head,
        batch,
        kv_head: head / (n.h / n.kv),
        i_abs: i + n.t - n.s,
        mask_row: mask_offset(batch, n),
        q_row: ((batch * n.s + i) * n.h + head) * comptime![flags.head_dim],
    }
}

/// The offset of a batch row's explicit mask: 0 when one mask serves them all.
#[cube]
fn mask_offset(batch: usize, n: &AttentionSizes) -> usize {
    let mut offset = 0;
    if n.mask_rows != 1 {
        offset = batch * n.s * n.t;
    }
    offset
}

/// Whether query i (absolute position i_abs) may see key j: the causal rule or the explicit
/// mask (`[rows, 1, s, t]`, nonzero where hidden, its row's offset `mask_row`), then the
/// sliding window.
#[cube]
fn visible<M: Numeric>(
    mask: &Tensor<M>,
    mask_row: usize,
    i: usize,
    i_abs: usize,
    j: usize,
    n: &AttentionSizes,
    #[comptime] flags: AttentionFlags,
) -> bool {
    let mut seen = if comptime![flags.causal] { j <= i_abs } else { u32::cast_from(mask[mask_row + i * n.t + j]) == 0 };
    if comptime![flags.window] {
        // Hidden when i_abs − j >= window, written without a negative difference.
        if i_abs >= j + n.window {
            seen = false;
        }
    }
    seen
}

/// Query (head, i_abs) against key row k_row at position j: the soft-capped score
/// cap·tanh(scale·q·k / cap) (scale·q·k without a cap), and that minus the ALiBi bias
/// slope·(i_abs − j), the logit of the softmax.
#[cube]
#[allow(clippy::too_many_arguments)]
fn score<F: Float>(
    q: &Array<f32>,
    k: &Tensor<F>,
    k_row: usize,
    slopes: &Tensor<f32>,
    head: usize,
    i_abs: usize,
    j: usize,
    n: &AttentionSizes,
    #[comptime] flags: AttentionFlags,
) -> (f32, f32) {
    let mut dot = f32::new(0.0);
    for e in 0..comptime![flags.head_dim] {
        dot += q[e] * f32::cast_from(k[k_row + e]);
    }
    let mut capped = dot * n.scale;
    if comptime![flags.softcap] {
        capped = n.cap * f32::tanh(capped / n.cap);
    }
    let mut logit = capped;
    if comptime![flags.alibi] {
        logit -= slopes[head] * (f32::cast_from(i_abs) - f32::cast_from(j));
    }
    (capped, logit)
}

/// d logit → d (scale·q·k): the scale, and the soft-cap's derivative 1 − (capped/cap)².
#[cube]
fn raw_score_grad(d_logit: f32, capped: f32, n: &AttentionSizes, #[comptime] flags: AttentionFlags) -> f32 {
    let mut d = d_logit * n.scale;
    if comptime![flags.softcap] {
        let c = capped / n.cap;
        d *= f32::new(1.0) - c * c;
    }
    d
}

/// Attention forward, one unit per query row (b, h, i): an online softmax over the keys, so
/// nothing of size s·t is ever stored. Writes out `[b, s, h, d]` and lse `[b, h, s]` (the
/// unit's own index). A row that sees no key gets zeros and the smallest finite lse, as the
/// reference does.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<F: Float, M: Numeric>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    mask: &Tensor<M>,
    slopes: &Tensor<f32>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    n: AttentionSizes,
    #[comptime] flags: AttentionFlags,
    #[define(F, M)] _dtypes: [StorageType; 2],
) {
    let p = ABSOLUTE_POS;
    if p >= n.b * n.h * n.s {
        terminate!();
    }
    let head_dim = comptime![flags.head_dim];
    let row = query_row(p, &n, flags);
    let mut qi = Array::<f32>::new(head_dim);
    let mut acc = Array::<f32>::new(head_dim);
    for e in 0..head_dim {
        qi[e] = f32::cast_from(q[row.q_row + e]);
        acc[e] = f32::new(0.0);
    }
    let mut max = f32::new(-3.0e38);
    let mut sum = f32::new(0.0);
    for j in 0..n.t {
        if visible::<M>(mask, row.mask_row, row.i, row.i_abs, j, &n, flags) {
            let kv_row = ((row.batch * n.t + j) * n.kv + row.kv_head) * head_dim;
            let (_, logit) = score::<F>(&qi, k, kv_row, slopes, row.head, row.i_abs, j, &n, flags);
            let new_max = f32::max(max, logit);
            let shrink = f32::exp(max - new_max);
            let weight = f32::exp(logit - new_max);
            sum = sum * shrink + weight;
            for e in 0..head_dim {
                acc[e] = acc[e] * shrink + weight * f32::cast_from(v[kv_row + e]);
            }
            max = new_max;
        }
    }
    if sum > f32::new(0.0) {
        for e in 0..head_dim {
            out[row.q_row + e] = F::cast_from(acc[e] / sum);
        }
        lse[p] = F::cast_from(max + f32::ln(sum));
    } else {
        for e in 0..head_dim {
            out[row.q_row + e] = F::new(0.0);
        }
        lse[p] = F::cast_from(f32::new(-3.4028235e38));
    }
}

/// Attention backward for q, one unit per query row (b, h, i): the softmax rebuilt from lse,
/// dS = P·(dP − Σ grad·out) (times the cap's derivative), dq = scale·Σ_j dS·k_j. Also writes
/// each row's Σ grad·out to `delta` `[b, h, s]`, for [`attention_backward_kv`].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_q<F: Float, M: Numeric>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    mask: &Tensor<M>,
    slopes: &Tensor<f32>,
    out: &Tensor<F>,
    lse: &Tensor<F>,
    grad: &Tensor<F>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<f32>,
    n: AttentionSizes,
    #[comptime] flags: AttentionFlags,
    #[define(F, M)] _dtypes: [StorageType; 2],
) {
    let p = ABSOLUTE_POS;
    if p >= n.b * n.h * n.s {
        terminate!();
    }
    let head_dim = comptime![flags.head_dim];
    let row = query_row(p, &n, flags);
    let mut qi = Array::<f32>::new(head_dim);
    let mut gi = Array::<f32>::new(head_dim);
    let mut acc = Array::<f32>::new(head_dim);
    let mut row_delta = f32::new(0.0);
    for e in 0..head_dim {
        qi[e] = f32::cast_from(q[row.q_row + e]);
        gi[e] = f32::cast_from(grad[row.q_row + e]);
        acc[e] = f32::new(0.0);
        row_delta += gi[e] * f32::cast_from(out[row.q_row + e]);
    }
    delta[p] = row_delta;
    let row_lse = f32::cast_from(lse[p]);
    for j in 0..n.t {
        if visible::<M>(mask, row.mask_row, row.i, row.i_abs, j, &n, flags) {
            let kv_row = ((row.batch * n.t + j) * n.kv + row.kv_head) * head_dim;
            let (capped, logit) = score::<F>(&qi, k, kv_row, slopes, row.head, row.i_abs, j, &n, flags);
            let prob = f32::exp(logit - row_lse);
            let mut d_prob = f32::new(0.0);
            for e in 0..head_dim {
                d_prob += gi[e] * f32::cast_from(v[kv_row + e]);
            }
            let d_score = raw_score_grad(prob * (d_prob - row_delta), capped, &n, flags);
            for e in 0..head_dim {
                acc[e] += d_score * f32::cast_from(k[kv_row + e]);
            }
        }
    }
    for e in 0..head_dim {
        dq[row.q_row + e] = F::cast_from(acc[e]);
    }
}

/// Attention backward for k and v, one unit per key row (b, kv head, j), summing over the
/// query heads that share it and over the queries: dv = Σ P·grad_i, dk = scale·Σ dS·q_i.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_kv<F: Float, M: Numeric>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    mask: &Tensor<M>,
    slopes: &Tensor<f32>,
    lse: &Tensor<F>,
    delta: &Tensor<f32>,
    grad: &Tensor<F>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    n: AttentionSizes,
    #[comptime] flags: AttentionFlags,
    #[define(F, M)] _dtypes: [StorageType; 2],
) {
    let p = ABSOLUTE_POS;
    if p >= n.b * n.kv * n.t {
        terminate!();
    }
    let head_dim = comptime![flags.head_dim];
    // p = (batch·t + j)·kv + kv_head: dk and dv rows are the unit's own.
    let kv_head = p % n.kv;
    let j = (p / n.kv) % n.t;
    let batch = p / (n.kv * n.t);
    let group = n.h / n.kv;
    let mask_row = mask_offset(batch, &n);
    let kv_row = p * head_dim;
    let mut dk_acc = Array::<f32>::new(head_dim);
    let mut dv_acc = Array::<f32>::new(head_dim);
    let mut qi = Array::<f32>::new(head_dim);
    for e in 0..head_dim {
        dk_acc[e] = f32::new(0.0);
        dv_acc[e] = f32::new(0.0);
    }
    for g in 0..group {
        let head = kv_head * group + g;
        for i in 0..n.s {
            let i_abs = i + n.t - n.s;
            if visible::<M>(mask, mask_row, i, i_abs, j, &n, flags) {
                let q_row = ((batch * n.s + i) * n.h + head) * head_dim;
                for e in 0..head_dim {
                    qi[e] = f32::cast_from(q[q_row + e]);
                }
                let (capped, logit) = score::<F>(&qi, k, kv_row, slopes, head, i_abs, j, &n, flags);
                let stat = (batch * n.h + head) * n.s + i;
                let prob = f32::exp(logit - f32::cast_from(lse[stat]));
                let mut d_prob = f32::new(0.0);
                for e in 0..head_dim {
                    let gi = f32::cast_from(grad[q_row + e]);
                    dv_acc[e] += prob * gi;
                    d_prob += gi * f32::cast_from(v[kv_row + e]);
                }
                let d_score = raw_score_grad(prob * (d_prob - delta[stat]), capped, &n, flags);
                for e in 0..head_dim {
                    dk_acc[e] += d_score * qi[e];
                }
            }
        }
    }
    for e in 0..head_dim {
        dk[kv_row + e] = F::cast_from(dk_acc[e]);
        dv[kv_row + e] = F::cast_from(dv_acc[e]);
    }
}

/// A logit as the loss sees it: cap·tanh(x/cap) under Gemma 2's final soft-cap, else x.
#[cube]
fn loss_logit(x: f32, cap: f32, #[comptime] capped: bool) -> f32 {
    if capped {
        cap * f32::tanh(x / cap)
    } else {
        x
    }
}

/// One cube per row of logits `[rows, vocab]`, with c the row's [`loss_logit`]s:
/// loss[row] = coef·(logsumexp(c) − c[target]) and grad = (softmax(c) − one-hot)·coef, chained
/// back through the soft-cap by dc/dx = 1 − (c/cap)². Three passes over the row (max, Σ exp,
/// gradient) recompute c rather than store it.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy<F: Float>(
    logits: &Tensor<F>,
    targets: &Tensor<u32>,
    coef: &Tensor<f32>,
    grad: &mut Tensor<F>,
    loss: &mut Tensor<f32>,
    rows: usize,
    vocab: usize,
    cap: f32,
    #[comptime] capped: bool,
    #[comptime] block: usize,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let t = UNIT_POS_X as usize;
    let base = row * vocab;
    let mut shared = SharedMemory::<f32>::new(block);
    let mut largest = f32::new(-3.4028235e38);
    let mut i = t;
    while i < vocab {
        largest = f32::max(largest, loss_logit(f32::cast_from(logits[base + i]), cap, capped));
        i += block;
    }
    let max = block_reduce(&mut shared, largest, true);
    let mut sum = f32::new(0.0);
    let mut i = t;
    while i < vocab {
        sum += f32::exp(loss_logit(f32::cast_from(logits[base + i]), cap, capped) - max);
        i += block;
    }
    let total = block_sum(&mut shared, sum);
    let w = coef[row];
    let target = usize::cast_from(targets[row]);
    let scale = w / total;
    let mut i = t;
    while i < vocab {
        let c = loss_logit(f32::cast_from(logits[base + i]), cap, capped);
        let mut g = f32::exp(c - max) * scale;
        if i == target {
            g -= w;
        }
        if capped {
            let th = c / cap;
            g *= f32::new(1.0) - th * th;
        }
        grad[base + i] = F::cast_from(g);
        i += block;
    }
    if t == 0 {
        let picked = loss_logit(f32::cast_from(logits[base + target]), cap, capped);
        loss[row] = w * (max + f32::ln(total) - picked);
    }
}

/// a·b as (low, high) 32-bit halves, from 16-bit limbs: WGSL has no 64-bit integers.
#[cube]
fn mul_wide(a: u32, b: u32) -> (u32, u32) {
    let (a0, a1) = (a & 65535u32, a >> 16u32);
    let (b0, b1) = (b & 65535u32, b >> 16u32);
    let (p00, p01, p10, p11) = (a0 * b0, a0 * b1, a1 * b0, a1 * b1);
    let mid = (p00 >> 16u32) + (p01 & 65535u32) + (p10 & 65535u32);
    let lo = (p00 & 65535u32) | (mid << 16u32);
    let hi = p11 + (p01 >> 16u32) + (p10 >> 16u32) + (mid >> 16u32);
    (lo, hi)
}

/// a·b mod 2⁶⁴ on (low, high) halves.
#[cube]
fn mul64(a_lo: u32, a_hi: u32, b_lo: u32, b_hi: u32) -> (u32, u32) {
    let (lo, hi) = mul_wide(a_lo, b_lo);
    (lo, hi + a_lo * b_hi + a_hi * b_lo)
}

/// a + b mod 2⁶⁴ on (low, high) halves.
#[cube]
fn add64(a_lo: u32, a_hi: u32, b_lo: u32, b_hi: u32) -> (u32, u32) {
    let lo = a_lo + b_lo;
    let mut carry = 0u32;
    if lo < a_lo {
        carry = 1u32;
    }
    (lo, a_hi + b_hi + carry)
}

/// z ^ (z >> k) for 0 < k < 32 on (low, high) halves.
#[cube]
fn xor_shift64(lo: u32, hi: u32, #[comptime] k: u32) -> (u32, u32) {
    (lo ^ ((lo >> k) | (hi << (32 - k))), hi ^ (hi >> k))
}

/// One unit per element k of the mask: SplitMix64's draw from state base + k·γ (`base` being
/// seed + (first + 1)·γ, γ the golden gamma), as [`crate::rng::Rng::next_u64`] computes it;
/// dropped when its top 53 bits are below `threshold` = ⌈p·2⁵³⌉, which is exactly
/// `next_f64() < p`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn dropout_mask<F: Float>(
    mask: &mut Tensor<F>,
    len: usize,
    base_lo: u32,
    base_hi: u32,
    threshold_lo: u32,
    threshold_hi: u32,
    keep: f32,
    #[define(F)] _dtype: StorageType,
) {
    let p = ABSOLUTE_POS;
    if p >= len {
        terminate!();
    }
    let (step_lo, step_hi) = mul64(u32::cast_from(p), 0u32, 0x7F4A_7C15u32, 0x9E37_79B9u32);
    let (lo, hi) = add64(base_lo, base_hi, step_lo, step_hi);
    let (lo, hi) = xor_shift64(lo, hi, 30u32);
    let (lo, hi) = mul64(lo, hi, 0x1CE4_E5B9u32, 0xBF58_476Du32);
    let (lo, hi) = xor_shift64(lo, hi, 27u32);
    let (lo, hi) = mul64(lo, hi, 0x1331_11EBu32, 0x94D0_49BBu32);
    let (lo, hi) = xor_shift64(lo, hi, 31u32);
    // The top 53 bits, as (low 32, high 21).
    let (top_lo, top_hi) = ((lo >> 11u32) | (hi << 21u32), hi >> 11u32);
    let dropped = top_hi < threshold_hi || (top_hi == threshold_hi && top_lo < threshold_lo);
    let mut v = keep;
    if dropped {
        v = f32::new(0.0);
    }
    mask[p] = F::cast_from(v);
}

/// One unit per element of `out` `[n, m]`, in place: out = out + bias + scale·u·up, with u
/// `[n, r]` and up `[r, m]` at any strides (the adapter's rank r is small). This is the LoRA
/// up-projection folded into the frozen product's output: lora_B on the forward pass, lora_Aᵀ
/// on the input gradient's, so the adapter's `[n, m]` product is never stored nor added in a
/// pass of its own. Without a bias, `bias` is any tensor of W, unread.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn lora_add<F: Float, L: Float, W: Float>(
    out: &mut Tensor<F>,
    bias: &Tensor<W>,
    u: &Tensor<L>,
    up: &Tensor<L>,
    len: usize,
    m: usize,
    r: usize,
    scale: f32,
    #[comptime] has_bias: bool,
    #[define(F, L, W)] _dtypes: [StorageType; 3],
) {
    let p = ABSOLUTE_POS;
    if p >= len {
        terminate!();
    }
    let (i, j) = (p / m, p % m);
    let (u_row, u_col) = (u.stride(0), u.stride(1));
    let (up_row, up_col) = (up.stride(0), up.stride(1));
    let mut acc = f32::new(0.0);
    for k in 0..r {
        acc += f32::cast_from(u[i * u_row + k * u_col]) * f32::cast_from(up[k * up_row + j * up_col]);
    }
    // In the reference's order: the base with its bias, then the adapter.
    let mut y = f32::cast_from(out[p]);
    if has_bias {
        y += f32::cast_from(bias[j]);
    }
    out[p] = F::cast_from(y + scale * acc);
}
