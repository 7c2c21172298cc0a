//! GFLOP/s of the gemm crate (what burn-flex and tune's CPU kernels call) on W1's matmul
//! shapes and on a 7B model's (256 rows), on all cores and on one: the ceiling for tune's
//! training step on this machine; and of tune's bf16 kernels (`tune::ops::bf16`, a bf16 base)
//! on the same shapes, all cores, with the weight as a bf16 base holds it (`[out, in]` as
//! stored: read transposed in the forward pass, row-major for the input gradient).
//!
//! `cargo bench --bench gemm_shapes` prints a table; the README's performance section uses it
//! to bound tokens/s (a step's FLOPs over the gemm rate). `cargo bench --bench gemm_shapes --
//! 7B` prints only the rows whose name contains "7B".

use std::time::Instant;

/// GFLOP/s of `[m, k]·[k, n]`, best of 20; `rhs_transposed` reads the right operand as `[n, k]`
/// (a weight used transposed, as in the backward pass).
fn gflops(par: gemm::Parallelism, m: usize, n: usize, k: usize, rhs_transposed: bool) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * n];
    let (rhs_rs, rhs_cs) = if rhs_transposed { (1, k as isize) } else { (n as isize, 1) };
    let mut best = f64::MAX;
    for _ in 0..20 {
        let t = Instant::now();
        // SAFETY: the buffers hold m·k, k·n and m·n elements, matching the strides given.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                rhs_cs,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

/// GFLOP/s of tune's bf16 product on `[m, k]·[k, n]`, best of 20.
fn bf16_gflops(kernel: tune::ops::bf16::Kernel, m: usize, n: usize, k: usize, rhs_transposed: bool) -> f64 {
    use tune::ops::bf16::{matmul_with, View};
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<half::bf16> = (0..k * n).map(|i| half::bf16::from_f32((i % 5) as f32 * 0.1)).collect();
    let mut c = vec![0f32; m * n];
    let strides = if rhs_transposed { [1, k] } else { [n, 1] };
    let mut best = f64::MAX;
    for _ in 0..20 {
        let t = Instant::now();
        matmul_with(kernel, View::row_major(&a, m, k), View::new(&b, 0, [k, n], strides), &mut c, false);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // (what, m, n, k, rhs transposed): 1024 tokens of SmolLM2-135M (W1).
    let shapes = [
        ("q_proj / o_proj forward", 1024, 576, 576, false),
        ("k_proj / v_proj forward", 1024, 192, 576, false),
        ("gate / up forward", 1024, 1536, 576, false),
        ("down forward", 1024, 576, 1536, false),
        ("q_proj / o_proj dx", 1024, 576, 576, true),
        ("k_proj / v_proj dx", 1024, 576, 192, true),
        ("gate / up dx", 1024, 576, 1536, true),
        ("down dx", 1024, 1536, 576, true),
        ("lm_head chunk (128 rows)", 128, 49152, 576, true),
        ("lm_head dx chunk", 128, 576, 49152, false),
        // 256 tokens of Mistral-7B (hidden 4096, 8 kv heads of 128, ffn 14336).
        ("7B q_proj forward", 256, 4096, 4096, false),
        ("7B k_proj forward", 256, 1024, 4096, false),
        ("7B gate forward", 256, 14336, 4096, false),
        ("7B down forward", 256, 4096, 14336, false),
        ("7B q_proj dx", 256, 4096, 4096, true),
        ("7B gate dx", 256, 4096, 14336, true),
        ("7B down dx", 256, 14336, 4096, true),
    ];
    use tune::ops::bf16::Kernel;
    println!("| matmul | m | n | k | f32 GFLOP/s, {cores} cores | f32, 1 core | bf16 AMX, {cores} cores | bf16 AVX512-BF16, {cores} cores | bf16 f32 tiles, {cores} cores |");
    println!("|---|---|---|---|---|---|---|---|---|");
    // cargo bench passes --bench to the harness; any other argument filters the rows.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    for (what, m, n, k, t) in shapes.into_iter().filter(|s| filter.as_ref().is_none_or(|f| s.0.contains(f.as_str()))) {
        let all = gflops(gemm::Parallelism::Rayon(cores), m, n, k, t);
        let one = gflops(gemm::Parallelism::None, m, n, k, t);
        // An f32 base holds its weights [in, out]; a bf16 base keeps them [out, in].
        let bf16 = |kernel, available: bool| if available { format!("{:.1}", bf16_gflops(kernel, m, n, k, !t)) } else { "-".into() };
        let amx = bf16(Kernel::Amx, Kernel::has_amx());
        let dp = bf16(Kernel::Avx512Bf16, Kernel::has_avx512_bf16());
        let tiles = bf16(Kernel::F32Tiles, true);
        println!("| {what} | {m} | {n} | {k} | {all:.1} | {one:.1} | {amx} | {dp} | {tiles} |");
    }
}
