//! ggml's block codecs, byte for byte as `llama-quantize` writes them without an importance
//! matrix: ggml-quants.c's reference quantizers (`quantize_row_*_ref`, which `quantize_q4_K` and
//! its siblings call when `quant_weights` is NULL), ggml's fp32 -> fp16 and bf16 conversions, and
//! the matching dequantizers (`dequantize_row_*`).
//!
//! Byte identity needs ggml's float arithmetic, not just its formulas: every intermediate is an
//! f32, sums run in ggml's loop order, `a*b + c` is two roundings (ggml-base is built without
//! `-march=native`, so the C compiler has no FMA to contract into; Rust never contracts), ggml's
//! `nearest_int` rounds half to even through the 1.5·2²³ trick while Q8_0 uses `roundf` (half away
//! from zero) and Q4_0/Q5_0/Q4_1/Q5_1 truncate after adding a half. Scales are stored as fp16
//! from ggml's bit-level conversion (round to nearest even) and read back from it before the final
//! codes are chosen, as ggml does.
//!
//! `tests/gguf_quants.rs` checks every codec against llama-quantize's output and gguf-py's
//! dequantization (`tests/fixtures/gguf_quants/`).

use super::GgmlType;
use crate::error::{Error, Result};

/// The k-quants' super-block (ggml's `QK_K`).
const QK_K: usize = 256;

/// ggml's `GROUP_MAX_EPS`: below this max |x| a group is all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Appends the blocks of `x` quantized to `t`, as `ggml_quantize_chunk(t, x, ..)` without an
/// importance matrix writes them. Rows are independent of one another at block boundaries, so
/// `x` may hold one row or several.
pub fn quantize_row(t: GgmlType, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    check_len(t, x.len())?;
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Unsupported(format!("quantizing to {}: value {} at index {i} is not finite", t.name(), x[i])));
    }
    out.reserve(t.row_bytes(x.len()));
    match t {
        GgmlType::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => x.iter().for_each(|&v| out.extend_from_slice(&fp32_to_fp16(v).to_le_bytes())),
        GgmlType::BF16 => x.iter().for_each(|&v| out.extend_from_slice(&fp32_to_bf16(v).to_le_bytes())),
        GgmlType::Q4_0 => x.chunks_exact(32).for_each(|b| q4_0(b, out)),
        GgmlType::Q4_1 => x.chunks_exact(32).for_each(|b| q4_1(b, out)),
        GgmlType::Q5_0 => x.chunks_exact(32).for_each(|b| q5_0(b, out)),
        GgmlType::Q5_1 => x.chunks_exact(32).for_each(|b| q5_1(b, out)),
        GgmlType::Q8_0 => x.chunks_exact(32).for_each(|b| q8_0(b, out)),
        GgmlType::Q4_K => x.chunks_exact(QK_K).for_each(|b| q4_k(b, out)),
        GgmlType::Q5_K => x.chunks_exact(QK_K).for_each(|b| q5_k(b, out)),
        GgmlType::Q6_K => x.chunks_exact(QK_K).for_each(|b| q6_k(b, out)),
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::IQ4_NL => return Err(unsupported(t)),
    }
    Ok(())
}

/// Decodes `bytes` (blocks of type `t`) into `out`, as ggml's `dequantize_row_*` (or its fp16 /
/// bf16 -> fp32 conversion) does. `bytes` must hold exactly `out.len()` values.
pub fn dequantize_row(t: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    check_len(t, out.len())?;
    let want = t.row_bytes(out.len());
    if bytes.len() != want {
        return Err(Error::Unsupported(format!(
            "dequantizing {} values from {}: expected {want} bytes, got {}",
            out.len(),
            t.name(),
            bytes.len()
        )));
    }
    let bs = t.block_size();
    let blocks = bytes.chunks_exact(t.type_size()).zip(out.chunks_exact_mut(bs));
    match t {
        GgmlType::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = fp16_to_fp32(u16::from_le_bytes([b[0], b[1]]))),
        GgmlType::BF16 => blocks.for_each(|(b, y)| y[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| dq4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| dq4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| dq5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| dq5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| dq8_0(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| dq4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| dq5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| dq6_k(b, y)),
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::IQ4_NL => return Err(unsupported(t)),
    }
    Ok(())
}

fn check_len(t: GgmlType, n: usize) -> Result<()> {
    if !n.is_multiple_of(t.block_size()) {
        return Err(Error::Unsupported(format!(
            "{}: {n} values are not a whole number of blocks of {} (llama-quantize falls back to another type for such rows)",
            t.name(),
            t.block_size()
        )));
    }
    Ok(())
}

fn unsupported(t: GgmlType) -> Error {
    Error::Unsupported(format!("ggml type {} has no codec in tune (q4_k_m never produces it)", t.name()))
}

/// ggml's `ggml_compute_fp32_to_fp16`: round to nearest even, overflow to infinity, subnormals
/// kept, NaN to a quiet NaN. The float additions do the rounding: adding a power of two chosen
/// from the exponent lines the fp16 mantissa up with the f32 one's low bits.
pub fn fp32_to_fp16(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 2^112
    let scale_to_zero = f32::from_bits(0x0880_0000); // 2^-110
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7C00;
    let mantissa_bits = bits & 0x0000_0FFF;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16) | if shl1_w > 0xFF00_0000 { 0x7E00 } else { nonsign }) as u16
}

/// fp16 -> f32, exact.
pub fn fp16_to_fp32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x3FF) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: man·2^-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            sign | v.to_bits()
        }
        (0x1F, _) => sign | 0x7F80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// ggml's `ggml_compute_fp32_to_bf16`: round to nearest even, NaN forced quiet.
pub fn fp32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    if u & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

/// ggml's `nearest_int`: round half to even by adding 1.5·2²³ and reading the low mantissa bits
/// (valid for |x| < 2²²).
#[inline]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007F_FFFF) as i32 - 0x0040_0000
}

fn push_f16(out: &mut Vec<u8>, v: f32) -> f32 {
    let h = fp32_to_fp16(v);
    out.extend_from_slice(&h.to_le_bytes());
    fp16_to_fp32(h)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    fp16_to_fp32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// The value of largest magnitude (the first one on a tie), as Q4_0/Q5_0 and `make_qx_quants`
/// find it: `max` keeps its sign.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

// ---------------------------------------------------------------- legacy 32-value blocks

fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    let (_, max) = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    for j in 0..16 {
        // C's (int8_t) cast truncates toward zero; the sums are in [0, 16.5] here.
        let xi0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let xi1 = ((x[16 + j] * id + 8.5) as i8).min(15) as u8;
        out.push(xi0 | (xi1 << 4));
    }
}

fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    push_f16(out, min);
    for j in 0..16 {
        let xi0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let xi1 = (((x[16 + j] - min) * id + 0.5) as i8).min(15) as u8;
        out.push(xi0 | (xi1 << 4));
    }
}

fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    let (_, max) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    let mut qs = [0u8; 16];
    let mut qh = 0u32;
    for j in 0..16 {
        let xi0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let xi1 = ((x[16 + j] * id + 16.5) as i8).min(31) as u8;
        qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend_from_slice(&qs);
}

fn q5_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    push_f16(out, min);
    let mut qs = [0u8; 16];
    let mut qh = 0u32;
    for j in 0..16 {
        // (uint8_t)(v + 0.5f): truncation; no clamp in ggml (v + 0.5 < 32 for these values).
        let xi0 = ((x[j] - min) * id + 0.5) as u8;
        let xi1 = ((x[16 + j] - min) * id + 0.5) as u8;
        qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend_from_slice(&qs);
}

fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    // roundf: half away from zero, as f32::round.
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

fn dq4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        y[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn dq4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..16 {
        y[j] = (b[4 + j] & 0x0F) as f32 * d + m;
        y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
    }
}

fn dq5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((b[6 + j] & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((b[6 + j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

fn dq5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((b[8 + j] & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = ((b[8 + j] >> 4) | h1) as f32 * d + m;
    }
}

fn dq8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

// ---------------------------------------------------------------- k-quants

/// ggml's `make_qkx2_quants` (no MAD): a scale and a min for `x` on the grid 0..=nmax, searched
/// over `nstep + 1` candidate scales by weighted least squares. Returns (scale, -min) and leaves
/// the codes in `l`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], l: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let w = weights[i];
            let qf = q as f32;
            sum_l += w * qf;
            sum_l2 += w * qf * qf;
            sum_xl += w * qf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights (weights x²): a signed
/// scale for `x` on the grid -nmax..nmax-1, refined over 18 candidate scales. Codes land in `l`
/// offset by nmax.
fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l: &mut [u8]) -> f32 {
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l[..x.len()].fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (i, &xi) in x.iter().enumerate() {
        let q = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
        l[i] = (q + nmax) as u8;
        let w = xi * xi;
        let qf = q as f32;
        sumlx += w * xi * qf;
        suml2 += w * qf * qf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &xi in x {
            let q = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
            let w = xi * xi;
            let qf = q as f32;
            sumlx += w * xi * qf;
            suml2 += w * qf * qf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &xi) in x.iter().enumerate() {
                l[i] = (nmax + nearest_int(iscale * xi).clamp(-nmax, nmax - 1)) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q4_K / Q5_K's 12 bytes of 6-bit scales and mins for the eight 32-value sub-blocks.
fn pack_scales_mins(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// ggml's `get_scale_min_k4`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The shared part of Q4_K and Q5_K: per sub-block scales and mins by `make_qkx2_quants`, their
/// 6-bit codes against the super-block's fp16 d and dmin (pushed to `out` with the packed scales),
/// then each value's code in 0..=nmax from the stored (rounded) scales.
fn qkx_super_block(x: &[f32], nmax: i32, rmin: f32, rdelta: f32, nstep: i32, out: &mut Vec<u8>) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let mut weights = [0.0f32; 32];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(nmax, xs, &weights, &mut l[32 * j..32 * j + 32], rmin, rdelta, nstep);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // uint8_t ls = nearest_int(..): C's conversion wraps, as `as u8` does.
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scales_mins(&ls, &lm);
    let d = push_f16(out, max_scale / 63.0);
    let dmin = push_f16(out, max_min / 63.0);
    out.extend_from_slice(&packed);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    l
}

fn q4_k(x: &[f32], out: &mut Vec<u8>) {
    let l = qkx_super_block(x, 15, -1.0, 0.1, 20, out);
    for j in (0..QK_K).step_by(64) {
        out.extend((0..32).map(|i| l[j + i] | (l[j + i + 32] << 4)));
    }
}

fn q5_k(x: &[f32], out: &mut Vec<u8>) {
    let l = qkx_super_block(x, 31, -0.5, 0.1, 15, out);
    let mut qh = [0u8; 32];
    let mut qs = [0u8; 128];
    let (mut m1, mut m2) = (1u8, 2u8);
    for (k, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            qs[32 * k + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
    out.extend_from_slice(&qh);
    out.extend_from_slice(&qs);
}

fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for ib in 0..16 {
        let s = make_qx_quants_rmse1(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend_from_slice(&[0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        // int8_t = MIN(127, int): C's conversion wraps, as `as i8` does.
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    let h = fp32_to_fp16(1.0 / iscale);
    let d = fp16_to_fp32(h);
    for j in 0..16 {
        let dj = d * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dj).clamp(-32, 31) + 32) as u8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (k, j) in (0..QK_K).step_by(128).enumerate() {
        for i in 0..32 {
            let q1 = l[j + i] & 0xF;
            let q2 = l[j + i + 32] & 0xF;
            let q3 = l[j + i + 64] & 0xF;
            let q4 = l[j + i + 96] & 0xF;
            ql[64 * k + i] = q1 | (q3 << 4);
            ql[64 * k + i + 32] = q2 | (q4 << 4);
            qh[32 * k + i] = (l[j + i] >> 4) | ((l[j + i + 32] >> 4) << 2) | ((l[j + i + 64] >> 4) << 4) | ((l[j + i + 96] >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&h.to_le_bytes());
}

fn dq4_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (k, j) in (0..QK_K).step_by(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let q = &qs[32 * k..32 * k + 32];
        for i in 0..32 {
            y[j + i] = d1 * (q[i] & 0xF) as f32 - m1;
            y[j + 32 + i] = d2 * (q[i] >> 4) as f32 - m2;
        }
    }
}

fn dq5_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    let (mut u1, mut u2) = (1u8, 2u8);
    for (k, j) in (0..QK_K).step_by(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let q = &ql[32 * k..32 * k + 32];
        for i in 0..32 {
            let h1 = if qh[i] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[i] & u2 != 0 { 16 } else { 0 };
            y[j + i] = d1 * ((q[i] & 0xF) + h1) as f32 - m1;
            y[j + 32 + i] = d2 * ((q[i] >> 4) + h2) as f32 - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

fn dq6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = f16_at(b, 208);
    for k in 0..2 {
        let (ql, qh, sc, y) = (&ql[64 * k..], &qh[32 * k..], &sc[8 * k..], &mut y[128 * k..]);
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fp32 -> fp16 against hand-computed halves: ties go to even, overflow to inf, tiny values
    /// to subnormals or zero.
    #[test]
    fn fp16_rounding() {
        assert_eq!(fp32_to_fp16(1.0), 0x3C00);
        assert_eq!(fp32_to_fp16(-2.0), 0xC000);
        assert_eq!(fp32_to_fp16(65504.0), 0x7BFF);
        assert_eq!(fp32_to_fp16(65520.0), 0x7C00); // halfway to 2^16 rounds up to inf
        assert_eq!(fp32_to_fp16(1.0 + 2f32.powi(-11)), 0x3C00); // tie, even stays
        assert_eq!(fp32_to_fp16(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02); // tie, odd goes up
        assert_eq!(fp32_to_fp16(2f32.powi(-24)), 0x0001);
        assert_eq!(fp32_to_fp16(2f32.powi(-25)), 0x0000); // tie with 0, even
        assert_eq!(fp32_to_fp16(1.5 * 2f32.powi(-24)), 0x0002);
        assert_eq!(fp32_to_fp16(f32::NAN) & 0x7E00, 0x7E00);
        for h in 0..=0xFFFFu16 {
            let f = fp16_to_fp32(h);
            if !f.is_nan() {
                assert_eq!(fp32_to_fp16(f), h, "{h:#06x} -> {f}");
            }
        }
    }

    #[test]
    fn nearest_int_is_half_even() {
        assert_eq!([0.5f32, 1.5, 2.5, -0.5, -1.5, 2.4999998, -3.7].map(nearest_int), [0, 2, 2, 0, -2, 2, -4]);
    }
}
