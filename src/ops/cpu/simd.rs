//! The CPU kernels compiled twice: for AVX-512 and for the baseline x86-64 (or another
//! architecture) that the binary targets, the wide copy taken at run time where the CPU has it.
//! tune is built for any x86-64, so without this its loops over rows would be SSE2, 4 lanes.
//!
//! Which copy runs never changes a result: Rust does not fuse a multiply and an add, and the
//! reductions below keep 16 partial sums in a fixed order whatever the vector width, so the
//! wide copy computes exactly what the baseline one does, only more at a time.

/// Whether this CPU runs the AVX-512 copies (std caches the answer).
#[inline]
pub(in crate::ops) fn avx512() -> bool {
    #[cfg(test)]
    if BASELINE_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Set by the test that runs the kernels once in each copy and compares their bits.
#[cfg(test)]
pub(in crate::ops) static BASELINE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Defines `fn $name` with its body compiled twice, as the module comment says. The body is
/// pasted into a function with AVX-512 enabled, so the closures it hands to rayon are compiled
/// for AVX-512 too.
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident $(<$T:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name $(<$T: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn wide $(<$T: $bound>)? ($($arg: $ty),*) $(-> $ret)? $body
                if $crate::ops::cpu::simd::avx512() {
                    // Safe: the CPU has the features `wide` is compiled for.
                    return unsafe { wide $(::<$T>)? ($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(in crate::ops) use multiversion;

/// Lanes of the reductions: one AVX-512 register of f32.
const LANES: usize = 16;

/// Folds 16 partial sums pairwise, in a fixed order.
#[inline(always)]
fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            acc[j] += acc[j + w];
        }
        w /= 2;
    }
    acc[0]
}

/// Σ f(a[i], b[i]) over 16 lanes (see the module comment).
#[inline(always)]
pub(in crate::ops) fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..LANES {
            acc[j] += f(x[j], y[j]);
        }
    }
    for (j, (&x, &y)) in ar.iter().zip(br).enumerate() {
        acc[j] += f(x, y);
    }
    fold(acc)
}

/// Σ x over 16 lanes.
#[inline(always)]
pub(in crate::ops) fn sum(xs: &[f32]) -> f32 {
    sum_zip(xs, xs, |x, _| x)
}

/// The largest element (−∞ for an empty slice; NaNs are passed over, as `f32::max` does).
#[inline(always)]
pub(in crate::ops) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    for (j, &x) in rest.iter().enumerate() {
        acc[j] = acc[j].max(x);
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_sums_and_max_match_plain_loops() {
        for n in [0, 1, 15, 16, 17, 100, 577] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 29) as f32 - 14.0) / 3.0).collect();
            let exact = |f: &dyn Fn(usize) -> f64| (0..n).map(f).sum::<f64>();
            let tol = 1e-5 * (1.0 + n as f64);
            assert!((sum(&a) as f64 - exact(&|i| a[i] as f64)).abs() < tol, "sum of {n}");
            let dot = sum_zip(&a, &b, |x, y| x * y) as f64;
            assert!((dot - exact(&|i| a[i] as f64 * b[i] as f64)).abs() < tol * 10.0, "dot of {n}");
            let want = a.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max(&a), want, "max of {n}");
        }
    }
}
