//! The matrix product of a bf16 base on the CPU: C (f32) = A·B with A in f32 and B, a frozen
//! weight, in bf16. A is rounded to bf16 (round to nearest even) where it enters the product,
//! as autocast rounds activations entering a bf16 matmul; the products of two bf16 numbers are
//! exact in f32 and are summed in f32.
//!
//! Three kernels compute it. [`Kernel::Amx`] multiplies bf16 tiles on Intel AMX (`amx.rs`),
//! where the CPU has it and Linux allows it: the fast one. [`Kernel::F32Tiles`] widens the
//! rounded operands to f32 (exactly) a tile at a time and runs the f32 gemm on each tile, so no
//! f32 copy of the weight is ever made: the path for every other CPU. [`Kernel::Avx512Bf16`]
//! multiplies the bf16 pairs with `vdpbf16ps`, 32 products an instruction; on paper twice the
//! f32 FMA rate, measured slower (see [`Kernel::detect`]).
//!
//! Layout of the AVX512-BF16 kernel: A is packed once per product in blocks of [`MR`] rows,
//! each k-pair (a[i, 2p], a[i, 2p + 1]) one 32-bit word the kernel broadcasts; each task packs
//! one panel of [`NR`] columns of B at a time, its k-pairs interleaved the same way, so that
//! one `vdpbf16ps` multiplies a row's pair into 16 columns at once. k is walked in blocks of
//! [`KC`] pairs so the panel's slice stays in L1 while every row block passes over it.

use half::bf16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod amx;

/// Rows of A per kernel call.
const MR: usize = 8;
/// Columns of B per panel (two 16-lane registers).
const NR: usize = 32;
/// k-pairs per block: a panel's slice of KC·NR·2 bf16 is 24 KiB.
const KC: usize = 192;

/// A strided matrix over a buffer: element (i, j) is `data[offset + i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a, T> {
    data: &'a [T],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T: Copy> View<'a, T> {
    /// Checks that every element lies inside `data`: the kernels then index without checks.
    pub fn new(data: &'a [T], offset: usize, [rows, cols]: [usize; 2], [rs, cs]: [usize; 2]) -> Self {
        if rows > 0 && cols > 0 {
            let last = offset + (rows - 1) * rs + (cols - 1) * cs;
            assert!(
                last < data.len(),
                "bf16 matmul: a [{rows}, {cols}] view with strides [{rs}, {cs}] at {offset} overruns {} elements",
                data.len()
            );
        }
        View { data, offset, rows, cols, rs, cs }
    }

    /// Row-major `[rows, cols]`.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "bf16 matmul: {} elements for [{rows}, {cols}]", data.len());
        View::new(data, 0, [rows, cols], [cols, 1])
    }

    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> T {
        // In bounds by the check in `new` for i < rows, j < cols.
        unsafe { *self.data.get_unchecked(self.offset + i * self.rs + j * self.cs) }
    }
}

/// Which kernel runs: see [`Kernel::detect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Intel AMX tiles (`tdpbf16ps`).
    Amx,
    Avx512Bf16,
    /// Rounded operands, f32 gemm: for every other CPU.
    F32Tiles,
}

impl Kernel {
    /// Whether this CPU can run [`Kernel::Avx512Bf16`].
    pub fn has_avx512_bf16() -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16") {
            return true;
        }
        false
    }

    /// Whether this CPU has AMX-BF16 and the kernel lets this process use its tiles.
    pub fn has_amx() -> bool {
        #[cfg(target_arch = "x86_64")]
        if amx::available() {
            return true;
        }
        false
    }

    /// The kernel tune uses: [`Kernel::Amx`] where the CPU has it, [`Kernel::F32Tiles`]
    /// everywhere else. On the Intel Xeons this was measured on, `vdpbf16ps` sustains one
    /// instruction per ~1.7 cycles, 87 GFLOP/s a core against 150 for f32 FMAs, so the widened
    /// f32 gemm beats it; AMX's `tdpbf16ps` beats both (`cargo bench --bench gemm_shapes`
    /// prints all three on W1's shapes).
    pub fn detect() -> Kernel {
        if Kernel::has_amx() {
            Kernel::Amx
        } else {
            Kernel::F32Tiles
        }
    }
}

/// c `[m, n]` (row-major) = c (if `accumulate`) + bf16(a)·b, with the kernel for this CPU.
pub fn matmul(a: View<f32>, b: View<bf16>, c: &mut [f32], accumulate: bool) {
    matmul_with(Kernel::detect(), a, b, c, accumulate)
}

/// As [`matmul`], with the kernel named (the tests run both).
pub fn matmul_with(kernel: Kernel, a: View<f32>, b: View<bf16>, c: &mut [f32], accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && c.len() == m * n,
        "bf16 matmul: a [{m}, {k}], b [{}, {n}], c of {} (expected [m, k], [k, n], m·n)",
        b.rows,
        c.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    match kernel {
        // The tiles read b along a unit stride; any other view is widened.
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx if Kernel::has_amx() && (b.rs == 1 || b.cs == 1) => amx::matmul(a, b, c, accumulate),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 if Kernel::has_avx512_bf16() => avx512::matmul(a, b, c, accumulate),
        _ => f32_tiles(a, b, c, accumulate),
    }
}

/// Round to nearest even, as `vdpbf16ps`' operands and autocast's casts are rounded.
#[inline(always)]
fn round(x: f32) -> bf16 {
    bf16::from_f32(x)
}

/// x rounded to the nearest bf16 (ties to even), as an f32: branch-free so that loops over
/// rows vectorise; a NaN stays a NaN (quieted), as `bf16::from_f32` keeps it.
#[inline(always)]
fn round_f32(x: f32) -> f32 {
    let u = x.to_bits();
    let rounded = u.wrapping_add(0x7FFF + ((u >> 16) & 1)) & 0xFFFF_0000;
    let nan = (u & 0x7FFF_FFFF) > 0x7F80_0000;
    f32::from_bits(if nan { (u | 0x0040_0000) & 0xFFFF_0000 } else { rounded })
}

/// The path for CPUs without AVX512-BF16, and the default on those with it where it measured
/// faster (see [`Kernel::detect`]): a rounded to bf16 and widened back once; b widened (bf16 ->
/// f32 is exact: a shift) a tile of at most [`TILE`] elements at a time, each tile one f32 gemm
/// over every core. A tile is all of b for a projection, a slab of columns of the lm_head, or a
/// slab of k (rows) for the lm_head's gradient, accumulated. The sums are those of the same
/// exact products as `vdpbf16ps`', in gemm's order.
fn f32_tiles(a: View<f32>, b: View<bf16>, c: &mut [f32], accumulate: bool) {
    const TILE: usize = 1 << 21;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut ar = vec![0f32; m * k];
    ar.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        if a.cs == 1 {
            let src = &a.data[a.offset + i * a.rs..][..k];
            row.iter_mut().zip(src).for_each(|(v, &x)| *v = round_f32(x));
        } else {
            row.iter_mut().enumerate().for_each(|(p, v)| *v = round_f32(a.at(i, p)));
        }
    });
    let (cols, rows) = if k * n <= TILE {
        (n, k)
    } else if n >= k {
        ((TILE / k).max(16).min(n), k)
    } else {
        (n, (TILE / n).max(64).min(k))
    };
    let mut bt = vec![0f32; rows * cols];
    for j0 in (0..n).step_by(cols) {
        let w = cols.min(n - j0);
        for p0 in (0..k).step_by(rows) {
            let kr = rows.min(k - p0);
            let by_columns = widen(b, p0, kr, j0, w, &mut bt[..kr * w]);
            let (rhs_rs, rhs_cs) = if by_columns { (1, kr as isize) } else { (w as isize, 1) };
            let acc = accumulate || p0 > 0;
            // Safe: c holds m·n (checked by the caller), ar m·k, bt kr·w, as the strides say.
            unsafe {
                #[rustfmt::skip]
                gemm::gemm(m, w, kr, c.as_mut_ptr().add(j0), 1, n as isize, acc, ar.as_ptr().add(p0), 1, k as isize, bt.as_ptr(), rhs_cs, rhs_rs, 1.0, 1.0, false, false, false, gemm::Parallelism::Rayon(0));
            }
        }
    }
}

/// b's rows p0..p0 + kr, columns j0..j0 + w as f32 in `out`, read along b's contiguous
/// direction: columns of a transposed weight (out is then [w, kr], column-major for gemm;
/// returns true), rows otherwise (out is [kr, w]; false).
fn widen(b: View<bf16>, p0: usize, kr: usize, j0: usize, w: usize, out: &mut [f32]) -> bool {
    let by_columns = b.rs < b.cs;
    if by_columns {
        out.par_chunks_mut(kr).enumerate().for_each(|(j, col)| {
            let base = b.offset + p0 * b.rs + (j0 + j) * b.cs;
            if b.rs == 1 {
                col.iter_mut().zip(&b.data[base..base + kr]).for_each(|(o, v)| *o = v.to_f32());
            } else {
                col.iter_mut().enumerate().for_each(|(p, o)| *o = b.at(p0 + p, j0 + j).to_f32());
            }
        });
    } else {
        out.par_chunks_mut(w).enumerate().for_each(|(p, row)| {
            let base = b.offset + (p0 + p) * b.rs + j0 * b.cs;
            if b.cs == 1 {
                row.iter_mut().zip(&b.data[base..base + w]).for_each(|(o, v)| *o = v.to_f32());
            } else {
                row.iter_mut().enumerate().for_each(|(j, o)| *o = b.at(p0 + p, j0 + j).to_f32());
            }
        });
    }
    by_columns
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::bf16;
    use rayon::prelude::*;

    use super::{round, View, KC, MR, NR};
    use crate::ops::cpu::shared::Shared;

    /// The two bf16 of a k-pair in one word, the even k in the low half (as `vdpbf16ps` pairs them).
    fn pair(lo: bf16, hi: bf16) -> u32 {
        lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
    }

    pub(super) fn matmul(a: View<f32>, b: View<bf16>, c: &mut [f32], accumulate: bool) {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let k2 = k.div_ceil(2);
        let blocks = m.div_ceil(MR);
        // ap[(block · k2 + p) · MR + r] = the pair p of row block·MR + r (zero past m or k).
        let mut ap = vec![0u32; blocks * k2 * MR];
        ap.par_chunks_mut(k2 * MR).enumerate().for_each(|(ib, blk)| {
            for r in 0..MR.min(m - ib * MR) {
                let i = ib * MR + r;
                for p in 0..k2 {
                    let lo = round(a.at(i, 2 * p));
                    let hi = if 2 * p + 1 < k { round(a.at(i, 2 * p + 1)) } else { bf16::ZERO };
                    blk[p * MR + r] = pair(lo, hi);
                }
            }
        });
        let dst = Shared(c.as_mut_ptr());
        (0..n.div_ceil(NR)).into_par_iter().for_each_init(
            || vec![0u32; k2 * NR],
            |bp, panel| {
                let (j0, w) = (panel * NR, NR.min(n - panel * NR));
                // bp[p · NR + j] = the pair p of column j0 + j (zero past n or k), read along
                // b's contiguous direction: w's rows forward, wᵀ's (w's columns) backward.
                let at = |p: usize, j: usize| {
                    let hi = if 2 * p + 1 < k { b.at(2 * p + 1, j0 + j) } else { bf16::ZERO };
                    pair(b.at(2 * p, j0 + j), hi)
                };
                bp.fill(0);
                if b.cs <= b.rs {
                    for p in 0..k2 {
                        for j in 0..w {
                            bp[p * NR + j] = at(p, j);
                        }
                    }
                } else {
                    for j in 0..w {
                        for p in 0..k2 {
                            bp[p * NR + j] = at(p, j);
                        }
                    }
                }
                let mut tile = [0f32; MR * NR];
                for p0 in (0..k2).step_by(KC) {
                    let kc = KC.min(k2 - p0);
                    for ib in 0..blocks {
                        let rows = MR.min(m - ib * MR);
                        // Safe: ap and bp hold kc pairs from p0 for this block and panel
                        // (sized above), and the CPU has AVX512-BF16 (checked by the caller).
                        unsafe { kernel(kc, ap.as_ptr().add((ib * k2 + p0) * MR), bp.as_ptr().add(p0 * NR), tile.as_mut_ptr()) };
                        let add = accumulate || p0 > 0;
                        for r in 0..rows {
                            // Each task writes only its panel's columns of c.
                            let out = unsafe { std::slice::from_raw_parts_mut(dst.at((ib * MR + r) * n + j0), w) };
                            let t = &tile[r * NR..][..w];
                            if add {
                                out.iter_mut().zip(t).for_each(|(o, t)| *o += t);
                            } else {
                                out.copy_from_slice(t);
                            }
                        }
                    }
                }
            },
        );
    }

    /// tile `[MR, NR]` = Σ over kc pairs of the row block's pairs times the panel's.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel(kc: usize, ap: *const u32, bp: *const u32, tile: *mut f32) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kc {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR) as *const __m512i));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16) as *const __m512i));
            let a = ap.add(p * MR);
            for (r, acc) in acc.iter_mut().enumerate() {
                let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], ar, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], ar, b1);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(tile.add(r * NR), acc[0]);
            _mm512_storeu_ps(tile.add(r * NR + 16), acc[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16(a)·b in f64: the exact sum the kernels approximate in f32.
    fn reference(a: View<f32>, b: View<bf16>) -> Vec<f64> {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| round(a.at(i, p)).to_f64() * b.at(p, j).to_f64()).sum();
            }
        }
        c
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect()
    }

    fn check(kernel: Kernel, m: usize, k: usize, n: usize, transposed_b: bool, accumulate: bool, want: &mut Option<Vec<f64>>) {
        let a = values(m * k, 1);
        let bv: Vec<bf16> = values(k * n, 2).into_iter().map(bf16::from_f32).collect();
        // b as stored [k, n], or the transposed view of a stored [n, k] (dx = g·wᵀ).
        let b = if transposed_b { View::new(&bv, 0, [k, n], [1, k]) } else { View::row_major(&bv, k, n) };
        let a = View::row_major(&a, m, k);
        let start = values(m * n, 3);
        let mut c = start.clone();
        matmul_with(kernel, a, b, &mut c, accumulate);
        // The same operands for every kernel: the exact sums are computed once.
        let want = want.get_or_insert_with(|| reference(a, b));
        for (idx, (&got, &w)) in c.iter().zip(want.iter()).enumerate() {
            let w = w + if accumulate { start[idx] as f64 } else { 0.0 };
            // f32 sums of k exact products of magnitude < 1: each step rounds by ≤ 2⁻²⁴·|sum|.
            let tol = 1e-6 * k as f64;
            assert!(
                (got as f64 - w).abs() <= tol,
                "{kernel:?} [{m}, {k}]·[{k}, {n}] (bᵀ {transposed_b}, acc {accumulate}) at {idx}: {got} vs {w}"
            );
        }
    }

    #[test]
    fn both_kernels_match_the_exact_sum_of_rounded_products() {
        let mut kernels = vec![Kernel::F32Tiles];
        if Kernel::has_avx512_bf16() {
            kernels.push(Kernel::Avx512Bf16);
        }
        if Kernel::has_amx() {
            kernels.push(Kernel::Amx);
        }
        // Edges of every block size: rows past MR (and AMX's 16 and 32), columns past NR, odd
        // k, k past KC pairs; whole AMX blocks read in place (k a multiple of 32, n of 32) beside
        // a partial one; rows enough for AMX's groups of rows (more than 1 MiB of rounded rows)
        // with a partial last block, in both of AMX's orientations.
        for (m, k, n) in [
            (1, 1, 1),
            (13, 37, 45),
            (8, 64, 32),
            (17, 2 * KC + 3, 70),
            (3, 500, 129),
            (70, 96, 80),
            (33, 64, 64),
            (260, 2050, 40),
            (230, 2048, 320),
        ] {
            for transposed_b in [false, true] {
                let mut want = None;
                for &kernel in &kernels {
                    for accumulate in [false, true] {
                        check(kernel, m, k, n, transposed_b, accumulate, &mut want);
                    }
                }
            }
        }
    }

    #[test]
    fn a_is_rounded_to_bf16_where_it_enters() {
        // 1 + 2⁻¹⁰ is not a bf16 (8 bits of mantissa): it rounds to 1, so the product is 1·b.
        let a = [1.0 + 2f32.powi(-10)];
        let b = [bf16::from_f32(3.0)];
        let available = |k: &Kernel| match k {
            Kernel::F32Tiles => true,
            Kernel::Avx512Bf16 => Kernel::has_avx512_bf16(),
            Kernel::Amx => Kernel::has_amx(),
        };
        for kernel in [Kernel::F32Tiles, Kernel::Avx512Bf16, Kernel::Amx].into_iter().filter(available) {
            let mut c = [0f32];
            matmul_with(kernel, View::row_major(&a, 1, 1), View::row_major(&b, 1, 1), &mut c, false);
            assert_eq!(c[0], 3.0, "{kernel:?}");
        }
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn a_view_past_its_buffer_is_refused() {
        let data = [0f32; 6];
        View::new(&data, 1, [2, 3], [3, 1]);
    }
}
