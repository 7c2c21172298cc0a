//! The bf16 product on Intel AMX: `tdpbf16ps` multiplies a 16×32 bf16 tile by a 32×16 one into a
//! 16×16 f32 tile, 8,192 products an instruction. On the Xeon this was written on it runs W1's
//! products 2.5–3× as fast as the f32 gemm (`cargo bench --bench gemm_shapes`).
//!
//! The instruction wants its left operand row-major (k contiguous, 32 bf16 a tile row) and its
//! right operand "VNNI" packed: row p of the tile holds, for each of 16 columns, the k-pair
//! (b[2p, j], b[2p + 1, j]) as one 32-bit word. a is always rounded into row-major rows; how b
//! becomes an operand depends on how the bf16 weight lies in memory:
//!
//! - a row-major b (the input gradient, `g·w`): its rows are interleaved in pairs into the
//!   right operand, 32 columns to a panel ([`packed_right`]);
//! - b with k-contiguous columns (an nn.Linear weight read through its transposed view, the
//!   forward pass `x·wᵀ`): either its columns' words are transposed into the right operand
//!   (again [`packed_right`]), or cᵀ = bᵀ·aᵀ is computed with b's columns as the left operand
//!   loaded as they lie, a packed as the right one and c written back transposed
//!   ([`transposed`]). [`matmul`] takes whichever moves fewer words.
//!
//! Each task holds a 32×32 block of c in four tiles while k is swept in steps of 32: every output
//! is one f32 sum in a fixed k order, whatever the number of threads, so runs repeat bit for bit.
//!
//! Tiles are per thread: a task (or a rayon job) loads the tile configuration and releases it
//! when done, and the kernel asks Linux once per process for the permission to use the tiles.

use std::arch::asm;
use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use super::View;
use crate::ops::cpu::shared::Shared;
use crate::ops::cpu::simd::multiversion;

/// Rows (and columns) of a tile; a block of c is two by two tiles.
const T: usize = 16;
/// Rows and columns of c per block.
const BLOCK: usize = 2 * T;
/// k per tile: 32 bf16 make a tile row's 64 bytes.
const KT: usize = 32;
/// The packed rows a group of tasks shares: a core's L2 holds them while every block of the
/// other operand passes over them once, instead of streaming all of them from L3 per block.
const GROUP_BYTES: usize = 1 << 20;

/// Blocks of 32 rows of m per group: as many as GROUP_BYTES of packed rows hold, at least one.
fn group_blocks(m: usize, kp: usize) -> usize {
    (GROUP_BYTES / (BLOCK * row_stride(kp) * 2)).clamp(1, m.div_ceil(BLOCK))
}

/// Whether this CPU has AMX-BF16 and Linux lets this process use it (asked once).
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let amx = leaf7.edx >> 22 & 1 == 1 && leaf7.edx >> 24 & 1 == 1;
        // The packing around the tiles is AVX-512 (F, BW, VL), which every AMX CPU has.
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl");
        // The tile data state is off until the process asks for it (Linux 5.16+):
        // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). Older kernels refuse it.
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        amx && avx512 && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
    })
}

/// The tile configuration (palette 1): tmm0–3 hold c's block, tmm4–5 two left tiles, tmm6–7 two
/// right tiles; all 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

const CONFIG: Config = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row, little-endian u16
        c[48 + t] = T as u8; // rows
        t += 1;
    }
    Config(c)
};

/// The tiles of one thread, configured for as long as it lives.
struct Tiles;

impl Tiles {
    /// Safe to call only where [`available`] returned true.
    unsafe fn configure() -> Tiles {
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
        Tiles
    }

    /// out (32×32 f32 with rows `out_stride` bytes apart) = out (if `accumulate`) + Σ over
    /// `steps` k-steps of left · right, where the left operand's 32 rows start at `left` with
    /// `left_stride` bytes between rows (a k-step is 64 bytes along a row), and the right operand
    /// is two packed 16-column panels, each a k-step of 1 KiB after the other.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        steps: usize,
        left: *const u8,
        left_stride: usize,
        right: [*const u8; 2],
        out: *mut f32,
        out_stride: usize,
        accumulate: bool,
    ) {
        let o = out as *mut u8;
        let quadrant = [o, o.add(T * 4), o.add(T * out_stride), o.add(T * out_stride + T * 4)];
        if accumulate {
            asm!(
                "tileloadd tmm0, [{c0} + {s}]",
                "tileloadd tmm1, [{c1} + {s}]",
                "tileloadd tmm2, [{c2} + {s}]",
                "tileloadd tmm3, [{c3} + {s}]",
                c0 = in(reg) quadrant[0],
                c1 = in(reg) quadrant[1],
                c2 = in(reg) quadrant[2],
                c3 = in(reg) quadrant[3],
                s = in(reg) out_stride,
                options(nostack, readonly),
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
        let left_low = left.add(T * left_stride);
        for s in 0..steps {
            // The left rows two k-steps ahead: 32 rows far apart are more streams than the
            // hardware prefetcher follows (measured: up to a quarter faster on W1's shapes).
            if s + 2 < steps {
                for r in 0..BLOCK {
                    _mm_prefetch::<_MM_HINT_T0>(left.add(r * left_stride + (s + 2) * 64) as *const i8);
                }
            }
            asm!(
                "tileloadd tmm4, [{a0} + {sa}]",
                "tileloadd tmm5, [{a1} + {sa}]",
                "tileloadd tmm6, [{b0} + {sb}]",
                "tileloadd tmm7, [{b1} + {sb}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) left.add(s * 64),
                a1 = in(reg) left_low.add(s * 64),
                sa = in(reg) left_stride,
                b0 = in(reg) right[0].add(s * 1024),
                b1 = in(reg) right[1].add(s * 1024),
                sb = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c0} + {s}], tmm0",
            "tilestored [{c1} + {s}], tmm1",
            "tilestored [{c2} + {s}], tmm2",
            "tilestored [{c3} + {s}], tmm3",
            c0 = in(reg) quadrant[0],
            c1 = in(reg) quadrant[1],
            c2 = in(reg) quadrant[2],
            c3 = in(reg) quadrant[3],
            s = in(reg) out_stride,
            options(nostack),
        );
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // Released, the tile state costs nothing on a context switch.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// c `[m, n]` (= c + if `accumulate`) bf16(a)·b on AMX; b is read along its contiguous direction
/// (the caller checked that one of its strides is 1).
pub(super) fn matmul(a: View<f32>, b: View<bf16>, c: &mut [f32], accumulate: bool) {
    let rounded = round_rows(a);
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // With k-contiguous columns either orientation works: packing b's columns as the right
    // operand costs a transpose of n·k/2 words, computing cᵀ costs one of a's m·k/2 words and
    // one of c's m·n elements. W1's projections (m = 1024) take the first, a 7B model's
    // (m = 256) and the lm_head's 128-row chunks the second.
    if b.rs == 1 && m * k / 2 + m * n < n * k / 2 {
        transposed(m, &rounded, b, c, accumulate)
    } else {
        packed_right(m, &rounded, b, c, accumulate)
    }
}

multiversion! {
    /// rounded[i · row_stride + p] = a[i, p] rounded to bf16 (zero past k, and in the rows past
    /// m that make whole blocks of rows).
    fn round_rows(a: View<f32>) -> Vec<u16> {
        let ld = row_stride(k_padded(a.cols));
        let rows = a.rows.div_ceil(BLOCK) * BLOCK;
        let mut rounded = vec![0u16; rows * ld];
        rounded.par_chunks_mut(ld).take(a.rows).enumerate().for_each(|(i, row)| {
            let row = &mut row[..a.cols];
            if a.cs == 1 {
                let src = &a.data[a.offset + i * a.rs..][..a.cols];
                row.iter_mut().zip(src).for_each(|(v, &x)| *v = round_bits(x));
            } else {
                row.iter_mut().enumerate().for_each(|(p, v)| *v = round_bits(a.at(i, p)));
            }
        });
        rounded
    }
}

/// x rounded to bf16 (ties to even, a NaN kept a NaN), as its bits: branch-free, so the loops
/// over rows vectorise.
#[inline(always)]
fn round_bits(x: f32) -> u16 {
    (super::round_f32(x).to_bits() >> 16) as u16
}

/// k rounded up to whole k-steps.
fn k_padded(k: usize) -> usize {
    k.div_ceil(KT) * KT
}

/// Elements from one row of the rounded rows to the next: a k-step more than the row, so that
/// the 16 rows a tile load reads do not all fall in one L1 set when kp is a power of two.
fn row_stride(kp: usize) -> usize {
    kp + KT
}

/// b's columns are k-contiguous (a weight `[n, k]` read as `[k, n]`): cᵀ = bᵀ·aᵀ, with b's
/// columns as the left operand and a's rounded rows packed as the right one.
fn transposed(m: usize, rounded: &[u16], b: View<bf16>, c: &mut [f32], accumulate: bool) {
    let (k, n) = (b.rows, b.cols);
    let kp = k_padded(k);
    let pairs = kp / 2;
    // right[(panel · pairs + p) · 16 + j] = the k-pair p of a's row panel·16 + j, one word: each
    // panel of 16 rows of a is the 16 columns of a right operand. A row block's two panels
    // always exist (`rounded` holds whole blocks).
    let ld = row_stride(kp);
    let mut right = vec![0u32; rounded.len() / ld * pairs];
    right.par_chunks_mut(pairs * T).enumerate().for_each(|(panel, dst)| {
        let src = &rounded[panel * T * ld..][..T * ld];
        // Safe: `available` held (AVX-512 included); src holds 16 rows of ld ≥ kp bf16, dst
        // pairs·16 words, and kp and ld are multiples of 32.
        unsafe { simd::transpose_words(src.as_ptr() as *const u32, ld / 2, dst.as_mut_ptr(), pairs) };
    });
    // b's column j (a weight row) starts at data[offset + j·cs]; a block of 32 of them is the
    // left operand as it lies, when all 32 exist and each has whole k-steps.
    let direct = k.is_multiple_of(KT);
    let dst = Shared(c.as_mut_ptr());
    // A task is a group of row blocks of a against one block of b's columns; the tasks of a
    // group run one after the other on a core, so its packed rows stay in that core's L2.
    let (group, blocks) = (group_blocks(m, kp), n.div_ceil(BLOCK));
    let row_blocks = m.div_ceil(BLOCK);
    // Safe: reached only where `available` held. The tiles stay configured for a whole rayon job,
    // which runs on one thread.
    let init = || (Vec::<bf16>::new(), unsafe { Tiles::configure() });
    (0..row_blocks.div_ceil(group) * blocks).into_par_iter().for_each_init(init, |(scratch, tiles), task| {
        let (grp, blk) = (task / blocks, task % blocks);
        let (j0, w) = (blk * BLOCK, BLOCK.min(n - blk * BLOCK));
        let (left, stride) = if direct && w == BLOCK {
            (b.data[b.offset + j0 * b.cs..].as_ptr(), b.cs * 2)
        } else {
            scratch.clear();
            scratch.resize(BLOCK * kp, bf16::ZERO);
            for j in 0..w {
                for p in 0..k {
                    scratch[j * kp + p] = b.at(p, j0 + j);
                }
            }
            (scratch.as_ptr(), kp * 2)
        };
        let mut out = [0f32; BLOCK * BLOCK];
        // Safe below: the left operand has 32 rows of kp bf16 at `stride` bytes (in place,
        // checked above, or the padded scratch), each right panel pairs·16 words.
        for rb in grp * group..row_blocks.min((grp + 1) * group) {
            let r0 = right[2 * rb * pairs * T..].as_ptr() as *const u8;
            let r1 = right[(2 * rb + 1) * pairs * T..].as_ptr() as *const u8;
            unsafe { tiles.block(kp / KT, left as *const u8, stride, [r0, r1], out.as_mut_ptr(), BLOCK * 4, false) };
            // out[jj][ii] is c[rb·32 + ii][j0 + jj]: each task writes only its columns of c.
            let rows = BLOCK.min(m - rb * BLOCK);
            for (qi, qj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let (i0, jj0) = (qi * T, qj * T);
                if i0 >= rows || jj0 >= w {
                    continue;
                }
                let c0 = dst.at((rb * BLOCK + i0) * n + j0 + jj0);
                // Safe: the quadrant's valid rows and columns lie inside c (counted above).
                unsafe {
                    simd::store_transposed(out.as_ptr().add(jj0 * BLOCK + i0), BLOCK, c0, n, T.min(rows - i0), T.min(w - jj0), accumulate)
                };
            }
        }
    });
}

/// c = a·b, with a's rounded rows as the left operand and b packed, 32 columns to a panel, as
/// the right one: a row-major b (`[k, n]`, n contiguous) by interleaving its rows in pairs, one
/// with k-contiguous columns (a weight `[n, k]` read as `[k, n]`) by transposing its words.
///
/// Where the rows make several groups and the packed b is small enough to stay in L2/L3, b is
/// packed once and each task takes a group of rows against one panel, so a group's rows stay
/// in a core's L2. Otherwise (a 7B model's weights, at tens of MB packed) each task packs its
/// own panel and passes every row over it while it is in L2: measured faster there than
/// writing and re-reading the whole packed weight (`cargo bench --bench gemm_shapes -- dx`).
fn packed_right(m: usize, rounded: &[u16], b: View<bf16>, c: &mut [f32], accumulate: bool) {
    /// The most packed b kept whole.
    const PACKED_BYTES: usize = 4 << 20;
    let (k, n) = (b.rows, b.cols);
    let kp = k_padded(k);
    let (pairs, ld, blocks) = (kp / 2, row_stride(kp), n.div_ceil(BLOCK));
    let (group, row_blocks) = (group_blocks(m, kp), m.div_ceil(BLOCK));
    // bf16 is a u16 underneath (repr(transparent)).
    let bits: &[u16] = unsafe { std::slice::from_raw_parts(b.data.as_ptr() as *const u16, b.data.len()) };
    // panel[(half · pairs + p) · 16 + j] = the k-pair p of b's column blk·32 + half·16 + j
    // (zero past n or k).
    let pack = |blk: usize, panel: &mut [u32]| {
        let j0 = blk * BLOCK;
        if b.cs == 1 {
            let w = BLOCK.min(n - j0);
            // Safe: `available` held; rows 0..k of b from column j0 hold w elements each (the
            // view was checked), the panel 2·pairs·16 words.
            unsafe { simd::interleave_rows(bits.as_ptr().add(b.offset + j0), b.rs, k, w, panel.as_mut_ptr(), pairs) };
            return;
        }
        for (h, half) in panel.chunks_mut(pairs * T).enumerate() {
            let j = j0 + h * T;
            if k.is_multiple_of(KT) && b.cs.is_multiple_of(2) && j + T <= n {
                // Column j's k-pairs are the words of its storage: 16 columns transposed.
                // Safe: `available` held; the 16 columns hold k = 2·pairs elements each (the
                // view was checked), the half pairs·16 words.
                unsafe { simd::transpose_words(bits.as_ptr().add(b.offset + j * b.cs) as *const u32, b.cs / 2, half.as_mut_ptr(), pairs) };
            } else {
                for p in 0..pairs {
                    for jj in 0..T {
                        let at = |q: usize| if q < k && j + jj < n { b.at(q, j + jj) } else { bf16::ZERO };
                        half[p * T + jj] = at(2 * p).to_bits() as u32 | (at(2 * p + 1).to_bits() as u32) << 16;
                    }
                }
            }
        }
    };
    let dst = Shared(c.as_mut_ptr());
    // Row blocks `rows` of c's columns blk·32.. from the packed panel.
    let run = |blk: usize, panel: &[u32], rows: std::ops::Range<usize>| {
        let (j0, w) = (blk * BLOCK, BLOCK.min(n - blk * BLOCK));
        let r0 = panel.as_ptr() as *const u8;
        let r1 = panel[pairs * T..].as_ptr() as *const u8;
        let mut out = [0f32; BLOCK * BLOCK];
        // Safe: reached only where `available` held; `rounded` holds whole blocks of rows of
        // kp bf16 (ld apart), the panel two halves of pairs·16 words.
        let tiles = unsafe { Tiles::configure() };
        for rb in rows {
            let l = rounded[rb * BLOCK * ld..].as_ptr() as *const u8;
            let whole = w == BLOCK && (rb + 1) * BLOCK <= m;
            if whole {
                // A whole block goes straight to c (and is read from it to accumulate).
                unsafe { tiles.block(kp / KT, l, ld * 2, [r0, r1], dst.at(rb * BLOCK * n + j0), n * 4, accumulate) };
                continue;
            }
            unsafe { tiles.block(kp / KT, l, ld * 2, [r0, r1], out.as_mut_ptr(), BLOCK * 4, false) };
            for ii in 0..BLOCK.min(m - rb * BLOCK) {
                // Each task writes only its columns of c.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.at((rb * BLOCK + ii) * n + j0), w) };
                let src = &out[ii * BLOCK..][..w];
                if accumulate {
                    row.iter_mut().zip(src).for_each(|(o, v)| *o += v);
                } else {
                    row.copy_from_slice(src);
                }
            }
        }
    };
    let groups = row_blocks.div_ceil(group);
    if groups > 1 && blocks * 2 * pairs * T * 4 <= PACKED_BYTES {
        let mut packed = vec![0u32; blocks * 2 * pairs * T];
        packed.par_chunks_mut(2 * pairs * T).enumerate().for_each(|(blk, panel)| pack(blk, panel));
        (0..groups * blocks).into_par_iter().for_each(|task| {
            let (grp, blk) = (task / blocks, task % blocks);
            run(blk, &packed[blk * 2 * pairs * T..][..2 * pairs * T], grp * group..row_blocks.min((grp + 1) * group));
        });
    } else {
        (0..blocks).into_par_iter().for_each_init(
            || vec![0u32; 2 * pairs * T],
            |panel, blk| {
                pack(blk, panel);
                run(blk, panel, 0..row_blocks);
            },
        );
    }
}

/// The AVX-512 moves around the tiles (every AMX CPU has AVX-512 F, BW and VL).
mod simd {
    use std::arch::x86_64::*;

    use super::T;

    /// The 16×16 transpose of 16 rows of 16 lanes: out[j] holds lane j of every row.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose(r: [__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4g + c], 128-bit lane l: rows 4g..4g + 4 of column 4l + c.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            u[4 * g] = _mm512_shuffle_ps::<0x44>(t[4 * g], t[4 * g + 2]);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * g], t[4 * g + 2]);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t[4 * g + 1], t[4 * g + 3]);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * g + 1], t[4 * g + 3]);
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let even01 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let odd01 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
            let even23 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let odd23 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(even01, even23);
            out[8 + c] = _mm512_shuffle_f32x4::<0xDD>(even01, even23);
            out[4 + c] = _mm512_shuffle_f32x4::<0x88>(odd01, odd23);
            out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(odd01, odd23);
        }
        out
    }

    /// dst[p · 16 + j] = src[j · src_stride + p] for 16 rows j and `words` words p (a multiple
    /// of 16); strides in words.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_words(src: *const u32, src_stride: usize, dst: *mut u32, words: usize) {
        for p0 in (0..words).step_by(T) {
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, r) in r.iter_mut().enumerate() {
                *r = _mm512_castsi512_ps(_mm512_loadu_si512(src.add(j * src_stride + p0) as *const __m512i));
            }
            for (p, col) in transpose(r).iter().enumerate() {
                _mm512_storeu_si512(dst.add((p0 + p) * T) as *mut __m512i, _mm512_castps_si512(*col));
            }
        }
    }

    /// c[i · ldc + j] (+)= src[j · lds + i] for i < rows, j < cols (each at most 16).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store_transposed(
        src: *const f32,
        lds: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut r = [_mm512_setzero_ps(); 16];
        for (j, r) in r.iter_mut().enumerate().take(cols) {
            *r = _mm512_loadu_ps(src.add(j * lds));
        }
        let mask: __mmask16 = if cols == T { 0xFFFF } else { (1u16 << cols) - 1 };
        for (i, row) in transpose(r).iter().enumerate().take(rows) {
            let at = c.add(i * ldc);
            let v = if accumulate { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), *row) } else { *row };
            _mm512_mask_storeu_ps(at, mask, v);
        }
    }

    /// dst (two panels of `pairs`·16 words) = the k-pairs of b's rows 2p and 2p + 1 (`rs`
    /// elements apart, starting at `b`) for `w` ≤ 32 columns: panel h, word p·16 + j holds
    /// column h·16 + j; zero past w and past k rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn interleave_rows(b: *const u16, rs: usize, k: usize, w: usize, dst: *mut u32, pairs: usize) {
        let masks = [(w.min(T)), w.saturating_sub(T)].map(|n| if n == T { 0xFFFFu16 } else { (1u16 << n) - 1 });
        for (h, &mask) in masks.iter().enumerate() {
            let panel = dst.add(h * pairs * T);
            for p in 0..pairs {
                let lo = widen(b, 2 * p, rs, k, h, mask);
                let hi = widen(b, 2 * p + 1, rs, k, h, mask);
                let word = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                _mm512_storeu_si512(panel.add(p * T) as *mut __m512i, word);
            }
        }
    }

    /// The 16 bf16 of row `row`, panel h, each in the low half of a word (zero past k or the mask).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn widen(b: *const u16, row: usize, rs: usize, k: usize, h: usize, mask: u16) -> __m512i {
        if row < k {
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, b.add(row * rs + h * T) as *const i16))
        } else {
            _mm512_setzero_si512()
        }
    }
}
