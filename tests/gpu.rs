//! The GPU backends (burn's CubeBackend, no fusion, with tune's CubeCL kernels) against
//! transformers and against the CPU, on the tiny fixtures: every family's logits and loss, a
//! `tune eval`, and a short `tune run` with dropout, step by step; on CUDA also the same run with
//! a bf16 base. Built with `--features wgpu` they run on wgpu, which CI runs on lavapipe, Mesa's
//! Vulkan driver on the CPU, in f32 (WGSL has no bf16); built with `--features cuda` alone, on
//! CUDA (scripts/gpu-check.sh). They need a device, so a plain `cargo test` skips them;
//! scripts/test.sh installs lavapipe where it can and runs them, and they fail when no device is
//! found.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use tune::backend::DeviceKind;
use tune::eval::sequence_nll;
use tune::model::{token_tensor, AttentionMask, CausalLm, ModelConfig};
use tune::recipe::Recipe;
use tune::train::metrics::StepMetrics;
use tune::train::{self, Observer, Start};

#[cfg(feature = "wgpu")]
type G = tune::backend::Wgpu;
#[cfg(feature = "wgpu")]
const DEVICE: &str = "wgpu";
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
type G = tune::backend::Cuda;
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
const DEVICE: &str = "cuda";

/// transformers' f32 reference, as tests/parity.rs holds the CPU to.
const TOL: f64 = 1e-4;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tune-gpu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "needs a GPU, or lavapipe for wgpu (apt-get install mesa-vulkan-drivers libvulkan1); scripts/test.sh and scripts/gpu-check.sh run it"]
fn every_family_matches_transformers_on_the_gpu() {
    let device = Default::default();
    for name in TINY {
        let dir = tiny(name);
        let config = ModelConfig::from_model_dir(&dir).unwrap();
        let model: CausalLm<G> = tune::model::load_config(config, &dir, &device, burn::tensor::FloatDType::F32).unwrap();
        let reference = read_reference(&dir.join("reference.safetensors"));
        let ids = reference["input_ids"].ids();
        let [rows, seq] = [reference["input_ids"].shape[0], reference["input_ids"].shape[1]];
        let positions: Vec<usize> = (0..rows).flat_map(|_| 0..seq).collect();
        let hidden = model.forward_hidden(token_tensor::<G>(&ids, rows, &device), &positions, &AttentionMask::Causal, None);
        let logits: Vec<f32> = model.lm_head(hidden).into_data().iter::<f32>().collect();
        let (diff, scale) = max_abs_diff(&logits, &reference["logits"].f32s());
        let (mut sum, mut n) = (0.0, 0);
        for row in ids.chunks(seq) {
            let nll = sequence_nll(&model, row, &device);
            n += nll.len();
            sum += nll.iter().map(|&x| x as f64).sum::<f64>();
        }
        let ref_loss = reference["loss"].scalar();
        let (logit_err, loss_err) = (diff / scale, (sum / n as f64 - ref_loss).abs() / ref_loss);
        eprintln!("{name:14} {DEVICE}: max|Δlogit|/max|logit| = {logit_err:.2e}   |Δloss|/loss = {loss_err:.2e}");
        assert!(logit_err <= TOL, "{name}: relative logit error {logit_err:.3e} > {TOL:e}");
        assert!(loss_err <= TOL, "{name}: relative loss error {loss_err:.3e} > {TOL:e}");
    }
}

/// `tune eval --device wgpu|cuda` (an f32 base) with the committed tiny run's adapter gives the
/// CPU's loss and token count.
#[test]
#[ignore = "needs a GPU, or lavapipe for wgpu (apt-get install mesa-vulkan-drivers libvulkan1); scripts/test.sh and scripts/gpu-check.sh run it"]
fn tune_eval_on_the_gpu_equals_the_cpu() {
    let run = fixtures().join("tiny-run");
    let eval = |device: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tune"))
            .current_dir(root())
            .args(["eval", "--model", "tests/fixtures/tiny/llama-tied", "--adapter"])
            .arg(run.join("run"))
            .arg("--data")
            .arg(run.join("data.jsonl"))
            .args(["--device", device, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "tune eval --device {device}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["loss"].as_f64().unwrap(), v["tokens"].as_u64().unwrap())
    };
    let (cpu, cpu_tokens) = eval("cpu");
    let (gpu, gpu_tokens) = eval(DEVICE);
    eprintln!("tune eval: cpu {cpu:.7}, {DEVICE} {gpu:.7} over {cpu_tokens} tokens");
    assert_eq!(gpu_tokens, cpu_tokens);
    assert!(cpu_tokens > 100, "the eval scores the whole file");
    assert!((gpu - cpu).abs() <= 1e-5 * cpu, "{DEVICE} loss {gpu} vs cpu {cpu}");
}

#[derive(Default)]
struct Losses(Vec<(usize, f32, f64)>);

impl Observer for Losses {
    fn step(&mut self, m: &StepMetrics) {
        self.0.push((m.step, m.loss, m.grad_norm));
    }
}

/// The tiny run's recipe, with `overrides`, on `device`: each step's (step, loss, grad norm).
fn tiny_run(dir: &Path, device: &str, overrides: &[&str]) -> Vec<(usize, f32, f64)> {
    let recipe = root().join("tests/fixtures/tiny-run/recipe.yaml");
    let mut all = vec![format!("device={device}"), format!("output.dir={}", dir.join(device).display())];
    all.extend(overrides.iter().map(|o| o.to_string()));
    let recipe = Recipe::load(&recipe, &all).unwrap();
    let mut losses = Losses::default();
    match recipe.device {
        DeviceKind::Cpu => train::train::<B>(&recipe, Start::Fresh, &mut losses).unwrap(),
        _ => train::train::<G>(&recipe, Start::Fresh, &mut losses).unwrap(),
    };
    losses.0
}

/// The tiny run's recipe (LoRA on every linear layer, dropout 0.1, gradient accumulation) on
/// the GPU with an f32 base: every step's loss and gradient norm are the CPU's, and so is the
/// adapter it writes. Dropout masks are drawn from the run's seed with the host generator's
/// bits, so both devices drop the same units.
#[test]
#[ignore = "needs a GPU, or lavapipe for wgpu (apt-get install mesa-vulkan-drivers libvulkan1); scripts/test.sh and scripts/gpu-check.sh run it"]
fn tune_run_on_the_gpu_trains_as_the_cpu_does() {
    let dir = scratch("run");
    let recipe = root().join("tests/fixtures/tiny-run/recipe.yaml");
    let run = |device: &str| tiny_run(&dir, device, &["model.dtype=f32"]);
    let cpu = run("cpu");
    let gpu = run(DEVICE);
    assert_eq!(cpu.len(), 6);
    assert_eq!(gpu.iter().map(|s| s.0).collect::<Vec<_>>(), cpu.iter().map(|s| s.0).collect::<Vec<_>>());
    for ((step, c, cg), (_, g, gg)) in cpu.iter().zip(&gpu) {
        eprintln!("step {step}: loss cpu {c:.7} {DEVICE} {g:.7}   grad_norm cpu {cg:.7} {DEVICE} {gg:.7}");
        assert!(((g - c) as f64).abs() <= 1e-4 * *c as f64, "step {step}: {DEVICE} loss {g} vs cpu {c}");
        assert!((gg - cg).abs() <= 1e-3 * cg, "step {step}: {DEVICE} grad norm {gg} vs cpu {cg}");
    }
    assert!(cpu[5].1 < cpu[0].1, "the run learns: {cpu:?}");
    let adapter = |device: &str| {
        let path = dir.join(device).join("adapter/adapter_model.safetensors");
        read_reference(&path)
    };
    let (a, b) = (adapter("cpu"), adapter(DEVICE));
    assert_eq!(a.len(), b.len());
    assert!(a.len() >= 28, "lora_A and lora_B of 7 projections × 2 layers: {}", a.len());
    // AdamW moves every element by up to about lr a step whatever its gradient's size, so where a
    // gradient is near zero, float rounding on either device changes the step's direction: the
    // bound is a fraction of one step (lr 1e-2), not relative to the weights.
    let lr = Recipe::load(&recipe, &[]).unwrap().train.lr;
    let mut worst = (0.0f64, String::new());
    for (name, t) in &a {
        let (diff, scale) = max_abs_diff(&b[name].f32s(), &t.f32s());
        eprintln!("{name}: max |Δ| {diff:.2e} against max |w| {scale:.2e}");
        if diff > worst.0 {
            worst = (diff, name.clone());
        }
    }
    assert!(worst.0 <= 0.1 * lr, "{}: max |Δ| {:e} is over a tenth of one AdamW step (lr {lr})", worst.1, worst.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// CUDA's bf16 base (its default) against the CPU's f32 run of the same recipe: every step's
/// loss within 2% (the bound tests/finetune.rs holds the CPU's bf16 base to over 40 steps), and
/// the run learns. The CPU's own bf16 base on this run is printed beside it, for scale.
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
#[test]
#[ignore = "needs a CUDA GPU; scripts/gpu-check.sh runs it"]
fn a_bf16_base_on_cuda_trains_close_to_the_cpus_f32_run() {
    let dir = scratch("bf16");
    let cpu = tiny_run(&dir, "cpu", &["model.dtype=f32"]);
    let cpu_bf16 = tiny_run(&dir.join("cpu-bf16"), "cpu", &["model.dtype=bf16"]);
    let gpu = tiny_run(&dir, DEVICE, &["model.dtype=bf16"]);
    assert_eq!(gpu.len(), cpu.len());
    let mut worst = 0f64;
    for (((step, c, _), (_, g, _)), (_, cb, _)) in cpu.iter().zip(&gpu).zip(&cpu_bf16) {
        let rel = ((g - c) as f64).abs() / *c as f64;
        worst = worst.max(rel);
        eprintln!("step {step}: loss cpu f32 {c:.6}, cuda bf16 {g:.6} ({:.3}%), cpu bf16 {cb:.6}", rel * 100.0);
    }
    eprintln!("cuda bf16 vs cpu f32: worst step {:.3}%", worst * 100.0);
    assert!(worst <= 0.02, "a step's loss is {:.3}% off the f32 run's", worst * 100.0);
    assert!(gpu[gpu.len() - 1].1 < gpu[0].1, "the run learns: {gpu:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every file under `dir`, with its bytes, in path order.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// A GPU start keeps what it learns in tune's own cache, one directory per GPU: the first
/// `tune bench --device wgpu|cuda` writes its autotune results under `$TUNE_CUBECL_CACHE/<gpu name>`
/// (and not where cubecl would put them by default: a Cargo `target/` or `~/.cache/cubecl`), and
/// a second start finds them all and tunes nothing again (cubecl appends a line for each result
/// it tunes).
#[test]
#[ignore = "needs a GPU, or lavapipe for wgpu (apt-get install mesa-vulkan-drivers libvulkan1); scripts/test.sh and scripts/gpu-check.sh run it"]
fn a_second_gpu_start_finds_the_first_ones_autotune_results() {
    let dir = scratch("warm-start");
    let (cache, home, cwd) = (dir.join("cache"), dir.join("home"), dir.join("cwd"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    let bench = || {
        let out = Command::new(env!("CARGO_BIN_EXE_tune"))
            .current_dir(&cwd)
            .env("HOME", &home)
            .env("TUNE_CUBECL_CACHE", &cache)
            .args(["bench", "--device", DEVICE, "--dtype", "f32", "--model"])
            .arg(tiny("llama"))
            .args(["--seq", "8", "--batch", "1", "--rank", "2", "--steps", "1", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "tune bench --device {DEVICE}: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["to_first_step_s"].as_f64().unwrap()
    };
    let cold = bench();
    let gpus: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(gpus.len(), 1, "one directory for the one GPU: {gpus:?}");
    let first = files_under(&cache);
    let tuned: Vec<_> = first.iter().filter(|(p, bytes)| p.to_string_lossy().contains("autotune") && !bytes.is_empty()).collect();
    assert!(!tuned.is_empty(), "no autotune results under {}: {:?}", cache.display(), first.iter().map(|f| &f.0).collect::<Vec<_>>());
    assert!(!home.join(".cache/cubecl").exists(), "cubecl's default cache was written too");
    assert!(!cwd.join("target").exists(), "cubecl's default cache was written too");
    let warm = bench();
    let second = files_under(&cache);
    let names = |f: &[(PathBuf, Vec<u8>)]| f.iter().map(|(p, b)| (p.clone(), b.len())).collect::<Vec<_>>();
    assert_eq!(names(&second), names(&first), "the warm start tuned again");
    assert!(second == first, "the warm start rewrote the cache");
    eprintln!("to the first step: cold {cold:.2} s, warm {warm:.2} s ({} autotune files)", tuned.len());
    let _ = std::fs::remove_dir_all(&dir);
}
