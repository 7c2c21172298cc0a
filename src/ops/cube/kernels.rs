//! The CubeCL kernels of [`super`]. Every kernel reads and writes its tensors in their own dtype
//! (`#[define]`: f32 on wgpu, f32 or bf16 on CUDA) and computes in f32, as the CPU kernels do.
//!
//! None uses plane (warp) operations: CPU Vulkan devices such as lavapipe, on which CI runs
//! them, have none. A row's sums go through shared memory instead ([`block_sum`]).

use cubecl::prelude::*;

/// The sum of every unit's `v` over the cube (a power of two of units, `shared` one slot per
/// unit); every unit gets the total. Ends with a barrier so that `shared` can be used again.
#[cube]
fn block_sum(shared: &mut SharedMemory<f32>, v: f32) -> f32 {
    let t = UNIT_POS_X as usize;
    shared[t] = v;
    sync_cube();
    let mut stride = (CUBE_DIM_X / 2) as usize;
    while stride > 0 {
        if t < stride {
            let other = shared[t + stride];
            shared[t] += other;
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
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
