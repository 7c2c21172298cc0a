//! Quantized storage of the frozen base (QLoRA, `model.quantize`): the codecs, bit for bit as
//! bitsandbytes computes them.
//!
//! A decoder's linear layers are quantized once, at load, one tensor at a time, and then kept
//! only in this form; the fused linear ([`crate::ops::FusedOps::quant_linear`]) dequantizes a
//! tile of the weight at a time into a scratch buffer and multiplies by that, so no dequantized
//! copy of a whole layer is held. LoRA's A and B stay f32. The matrix is `[out, in]`, an
//! `nn.Linear`'s layout (a `Conv1D`'s `[in, out]` is transposed before quantizing, as
//! transformers' bitsandbytes integration does), and its elements are taken in row-major order.
//!
//! - [`Nf4Matrix`]: bitsandbytes' 4-bit NormalFloat, `quantize_4bit(w, blocksize=64,
//!   quant_type="nf4")` without double quantization (`compress_statistics=False`: each block's
//!   absmax stays one f32), and its dequantization. 0.5 byte per weight + 4 bytes per 64.
//! - [`Int8Matrix`]: bitsandbytes' row-wise int8, `int8_vectorwise_quant` (no outlier threshold)
//!   and `int8_vectorwise_dequant`: weight-only int8 with f32 compute, not LLM.int8()'s int8
//!   activations and outlier decomposition. 1 byte per weight + 4 bytes per row.
//!
//! Each step is written as torch evaluates bitsandbytes' Python on the CPU (reciprocal then
//! multiply, NaN-propagating max and clamp, `bucketize`'s binary search), so that the codes,
//! the absmax values and the dequantized weights are bitsandbytes' exactly
//! (`tests/quant.rs` checks them against `tests/fixtures/quant/codec.safetensors`).

use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Consecutive weights sharing one absmax in NF4 (bitsandbytes' default blocksize).
pub const NF4_BLOCK: usize = 64;

/// bitsandbytes' NF4 code (`get_4bit_type("nf4")`): 16 quantiles of N(0, 1) scaled to [−1, 1],
/// sorted, with an exact 0. The values are the f32s torch makes of bitsandbytes' Python floats.
pub const NF4_CODE: [f32; 16] = [
    -1.0f64 as f32,
    -0.6961928009986877f64 as f32,
    -0.5250730514526367f64 as f32,
    -0.39491748809814453f64 as f32,
    -0.28444138169288635f64 as f32,
    -0.18477343022823334f64 as f32,
    -0.09105003625154495f64 as f32,
    0.0,
    0.07958029955625534f64 as f32,
    0.16093020141124725f64 as f32,
    0.24611230194568634f64 as f32,
    0.33791524171829224f64 as f32,
    0.44070982933044434f64 as f32,
    0.5626170039176941f64 as f32,
    0.7229568362236023f64 as f32,
    1.0,
];

/// What `model.quantize` (and `--quantize`) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// The base as loaded (`model.dtype`).
    #[default]
    None,
    /// bitsandbytes' NF4, blocks of 64, one f32 absmax each.
    Nf4,
    /// Row-wise int8 (bitsandbytes' `int8_vectorwise_quant`).
    Int8,
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Quantization::None),
            "nf4" => Ok(Quantization::Nf4),
            "int8" => Ok(Quantization::Int8),
            other => Err(format!("unknown quantization `{other}` (expected nf4, int8 or none)")),
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quantization::None => "none",
            Quantization::Nf4 => "nf4",
            Quantization::Int8 => "int8",
        })
    }
}

impl Quantization {
    /// Quantizes `w`, `[rows, cols]` row-major; None for [`Quantization::None`].
    pub fn quantize(self, w: &[f32], rows: usize, cols: usize) -> Option<QuantizedMatrix> {
        match self {
            Quantization::None => None,
            Quantization::Nf4 => Some(QuantizedMatrix::Nf4(Nf4Matrix::quantize(w, rows, cols))),
            Quantization::Int8 => Some(QuantizedMatrix::Int8(Int8Matrix::quantize(w, rows, cols))),
        }
    }
}

/// A frozen `[rows, cols]` matrix in one of the quantized forms.
#[derive(Clone)]
pub enum QuantizedMatrix {
    Nf4(Nf4Matrix),
    Int8(Int8Matrix),
}

impl std::fmt::Debug for QuantizedMatrix {
    /// The shape and form, not the codes (a layer holds millions).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            QuantizedMatrix::Nf4(_) => "nf4",
            QuantizedMatrix::Int8(_) => "int8",
        };
        write!(f, "QuantizedMatrix({kind}, [{}, {}], {} bytes)", self.rows(), self.cols(), self.stored_bytes())
    }
}

impl QuantizedMatrix {
    pub fn rows(&self) -> usize {
        match self {
            QuantizedMatrix::Nf4(m) => m.rows,
            QuantizedMatrix::Int8(m) => m.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            QuantizedMatrix::Nf4(m) => m.cols,
            QuantizedMatrix::Int8(m) => m.cols,
        }
    }

    pub fn kind(&self) -> Quantization {
        match self {
            QuantizedMatrix::Nf4(_) => Quantization::Nf4,
            QuantizedMatrix::Int8(_) => Quantization::Int8,
        }
    }

    /// Bytes held: codes and scales.
    pub fn stored_bytes(&self) -> usize {
        match self {
            QuantizedMatrix::Nf4(m) => m.packed.len() + 4 * m.absmax.len(),
            QuantizedMatrix::Int8(m) => m.q.len() + 4 * m.absmax.len(),
        }
    }

    /// Writes the dequantized elements `start..start + out.len()` (row-major) into `out`.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        match self {
            QuantizedMatrix::Nf4(m) => m.dequantize_into(start, out),
            QuantizedMatrix::Int8(m) => m.dequantize_into(start, out),
        }
    }

    /// The whole matrix dequantized, `[rows, cols]` row-major (for the reference path and tests;
    /// the CPU kernels dequantize tile by tile).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows() * self.cols()];
        out.par_chunks_mut(1 << 16).enumerate().for_each(|(i, chunk)| self.dequantize_into(i << 16, chunk));
        out
    }
}

/// A frozen weight shared by the layer and the autodiff graph's saved state without a copy.
pub type SharedMatrix = Arc<QuantizedMatrix>;

/// torch's `max` over a block of |x|: NaN if any element is NaN (f32::max would skip it).
fn absmax(xs: &[f32]) -> f32 {
    xs.iter().fold(0f32, |m, &x| if m.is_nan() || x.is_nan() { f32::NAN } else { m.max(x.abs()) })
}

/// torch's `clamp(min=lo)`: NaN stays NaN.
fn clamp_min(x: f32, lo: f32) -> f32 {
    if x < lo {
        lo
    } else {
        x
    }
}

/// torch's `clamp(x, −1, 1)`: NaN stays NaN (as f32::clamp keeps it).
fn clamp_unit(x: f32) -> f32 {
    x.clamp(-1.0, 1.0)
}

/// The smallest absmax bitsandbytes divides by (`clamp(min=1e-38)`, the Python float cast to f32).
const TINY: f32 = 1e-38f64 as f32;

/// Midpoints between consecutive NF4 codes, as bitsandbytes computes them in f32:
/// `(code[:-1] + code[1:]) / 2`.
fn nf4_bounds() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// `torch.bucketize(x, bounds)` (right=False): torch's binary search steps right while
/// `!(bounds[mid] >= x)`, so over sorted bounds it returns how many bounds that holds for: a
/// tie goes to the lower code, NaN to the last. Counted without branches, so that a block's
/// codes vectorize.
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(b >= x)` is true for NaN, `b < x` is not
#[inline(always)]
fn bucketize(x: f32, bounds: &[f32; 15]) -> u8 {
    bounds.iter().map(|&b| (!(b >= x)) as u8).sum()
}

/// The codes of up to one block of scaled values, two a byte, the first high; an odd count
/// is padded with the code of 0, as bitsandbytes pads the scaled values with a 0.
fn pack(scaled: &[f32], out: &mut [u8], bounds: &[f32; 15]) {
    let mut q = [0u8; NF4_BLOCK];
    for (q, &x) in q.iter_mut().zip(scaled) {
        *q = bucketize(x, bounds);
    }
    if scaled.len() % 2 == 1 {
        q[scaled.len()] = bucketize(0.0, bounds);
    }
    for (byte, pair) in out.iter_mut().zip(q.chunks_exact(2)) {
        *byte = (pair[0] << 4) | pair[1];
    }
}

/// bitsandbytes' NF4: blocks of [`NF4_BLOCK`] consecutive weights (row-major over the whole
/// matrix, so a block may span two rows), each scaled by its absmax to [−1, 1] and rounded to
/// the nearest of [`NF4_CODE`]; two codes a byte, the first element in the high nibble.
#[derive(Clone)]
pub struct Nf4Matrix {
    rows: usize,
    cols: usize,
    /// `ceil(rows·cols / 2)` bytes; an odd count ends with the code of 0 in the low nibble.
    packed: Vec<u8>,
    /// One per block, `ceil(rows·cols / 64)`.
    absmax: Vec<f32>,
}

impl Nf4Matrix {
    /// As bitsandbytes' `quantize_4bit` (its reference implementation, which its CPU backend
    /// runs): a whole block is multiplied by the f32 reciprocal of its absmax (clamped to 1e-38
    /// for an all-zero block, whose stored absmax stays 0); the elements left over after the
    /// last whole block are divided by theirs, and that absmax is stored clamped. Each scaled
    /// value is clamped to [−1, 1] and takes the code of the midpoint interval it falls in.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "Nf4Matrix::quantize: {} values for [{rows}, {cols}]", w.len());
        let bounds = nf4_bounds();
        let n = w.len();
        let full = n / NF4_BLOCK * NF4_BLOCK;
        let mut packed = vec![0u8; n.div_ceil(2)];
        let mut scales = vec![0f32; n.div_ceil(NF4_BLOCK)];
        packed[..full / 2].par_chunks_mut(NF4_BLOCK / 2).zip(scales.par_iter_mut()).zip(w[..full].par_chunks(NF4_BLOCK)).for_each(
            |((out, scale), block)| {
                let m = absmax(block);
                *scale = m;
                let r = 1.0 / clamp_min(m, TINY);
                let scaled: [f32; NF4_BLOCK] = std::array::from_fn(|j| clamp_unit(block[j] * r));
                pack(&scaled, out, &bounds);
            },
        );
        if full < n {
            let tail = &w[full..];
            let m = clamp_min(absmax(tail), TINY);
            scales[full / NF4_BLOCK] = m;
            let scaled: Vec<f32> = tail.iter().map(|&x| clamp_unit(x / m)).collect();
            pack(&scaled, &mut packed[full / 2..], &bounds);
        }
        Nf4Matrix { rows, cols, packed, absmax: scales }
    }

    /// Each element's code times its block's absmax, in f32 (bitsandbytes' dequantize_4bit).
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        assert!(end <= self.rows * self.cols, "Nf4Matrix: elements {start}..{end} of [{}, {}]", self.rows, self.cols);
        let (mut i, mut o) = (start, 0);
        while i < end {
            let block_end = ((i / NF4_BLOCK + 1) * NF4_BLOCK).min(end);
            let s = self.absmax[i / NF4_BLOCK];
            if i % 2 == 1 {
                out[o] = NF4_CODE[(self.packed[i / 2] & 15) as usize] * s;
                i += 1;
                o += 1;
            }
            // Blocks start at even elements, so from here the pairs are whole bytes.
            let pairs = (block_end - i) / 2;
            for (dst, &byte) in out[o..o + 2 * pairs].chunks_exact_mut(2).zip(&self.packed[i / 2..i / 2 + pairs]) {
                dst[0] = NF4_CODE[(byte >> 4) as usize] * s;
                dst[1] = NF4_CODE[(byte & 15) as usize] * s;
            }
            i += 2 * pairs;
            o += 2 * pairs;
            if i < block_end {
                out[o] = NF4_CODE[(self.packed[i / 2] >> 4) as usize] * s;
                i += 1;
                o += 1;
            }
        }
    }

    /// The packed codes, two a byte, first element high.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// One absmax per block of 64.
    pub fn absmax(&self) -> &[f32] {
        &self.absmax
    }
}

/// bitsandbytes' row-wise int8 (`int8_vectorwise_quant` without outliers): per row,
/// absmax = max |w|; q = round_half_even(w · ((1/absmax)·127)) as i8 (torch evaluates
/// `127.0 / absmax` as reciprocal times 127; an all-zero row gives NaN, stored as 0, as torch's
/// cast does on x86); dequantized, w' = (q · absmax) · f32(1/127) (`int8_vectorwise_dequant`).
#[derive(Clone)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    /// One per row.
    absmax: Vec<f32>,
}

/// `int8_vectorwise_dequant`'s 1/127, as torch multiplies by the Python float: in f32.
const INV_127: f32 = 7.874015718698502e-3f64 as f32;

impl Int8Matrix {
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "Int8Matrix::quantize: {} values for [{rows}, {cols}]", w.len());
        let mut q = vec![0i8; w.len()];
        let mut scales = vec![0f32; rows];
        if cols > 0 {
            q.par_chunks_mut(cols).zip(scales.par_iter_mut()).zip(w.par_chunks(cols)).for_each(|((q, scale), row)| {
                let m = absmax(row);
                *scale = m;
                let r = (1.0 / m) * 127.0;
                // `as` saturates and sends NaN to 0.
                q.iter_mut().zip(row).for_each(|(q, &x)| *q = (x * r).round_ties_even() as i8);
            });
        }
        Int8Matrix { rows, cols, q, absmax: scales }
    }

    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        assert!(end <= self.rows * self.cols, "Int8Matrix: elements {start}..{end} of [{}, {}]", self.rows, self.cols);
        for (k, (o, &q)) in out.iter_mut().zip(&self.q[start..end]).enumerate() {
            *o = (q as f32 * self.absmax[(start + k) / self.cols]) * INV_127;
        }
    }

    pub fn q(&self) -> &[i8] {
        &self.q
    }

    /// One per row.
    pub fn absmax(&self) -> &[f32] {
        &self.absmax
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect()
    }

    /// The kernels dequantize tiles (runs of rows, and column slices of each row) at any offset:
    /// every slice must equal the same elements of the whole matrix, which tests/quant.rs checks
    /// against bitsandbytes.
    #[test]
    fn any_slice_dequantizes_as_the_whole() {
        for (rows, cols) in [(5, 37), (3, 64), (7, 80), (1, 1), (2, 129)] {
            let w = values(rows * cols, (rows * 1000 + cols) as u64);
            for q in [Quantization::Nf4, Quantization::Int8] {
                let m = q.quantize(&w, rows, cols).unwrap();
                let whole = m.dequantize();
                let n = rows * cols;
                for start in [0, 1, 2, 31, 63, 64, 65, 100].into_iter().filter(|&s| s < n) {
                    for len in [1, 2, 3, 63, 64, 65, 130].into_iter().map(|l| l.min(n - start)) {
                        let mut out = vec![f32::NAN; len];
                        m.dequantize_into(start, &mut out);
                        let same = out.iter().zip(&whole[start..start + len]).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{q} [{rows}, {cols}]: elements {start}..{}", start + len);
                    }
                }
            }
        }
    }

    #[test]
    fn storage_is_packed() {
        let w = values(576 * 192, 3);
        let nf4 = Quantization::Nf4.quantize(&w, 192, 576).unwrap();
        assert_eq!(nf4.stored_bytes(), 576 * 192 / 2 + 4 * 576 * 192 / 64);
        let int8 = Quantization::Int8.quantize(&w, 192, 576).unwrap();
        assert_eq!(int8.stored_bytes(), 576 * 192 + 4 * 192);
    }
}
