//! The adapter `tune run` writes loads in PEFT and gives the same eval loss there as in tune.
//! tests/fixtures/tiny-run/ holds a tiny run (recipe, data, the adapter it wrote) and PEFT's
//! verdict on it (peft_eval.json, from tests/fixtures/reference.py --peft-check), and the same
//! for the DoRA recipe (recipe-dora.yaml, run-dora/, peft_eval_dora.json).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use tune::data::{read_records, string_field, text_ids};
use tune::hf::Tokenizer;
use tune::model::{self, CausalLm};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn peft_loads_the_run_adapter_and_agrees_on_eval_loss() {
    check_run_adapter("run", "peft_eval.json", false);
}

/// The DoRA run's adapter: its lora_magnitude_vector tensors load in PEFT under use_dora.
#[test]
fn peft_loads_the_dora_run_adapter_and_agrees_on_eval_loss() {
    check_run_adapter("run-dora", "peft_eval_dora.json", true);
}

fn check_run_adapter(run_dir: &str, report: &str, dora: bool) {
    let run = fixtures().join("tiny-run");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join(report)).unwrap()).unwrap();
    assert_eq!(report["missing_keys"].as_array().unwrap().len(), 0, "{report}");
    assert_eq!(report["unexpected_keys"].as_array().unwrap().len(), 0, "{report}");
    let per_layer = if dora { 3 } else { 2 };
    assert_eq!(
        report["lora_tensors"].as_u64(),
        Some(per_layer * 7 * 2),
        "lora_A, lora_B (DoRA: and the magnitude) for 7 projections × 2 layers"
    );
    if dora {
        assert_eq!(report["use_dora"], true, "PEFT read the adapter as DoRA: {report}");
    }

    let base = tiny("llama-tied");
    let device = Default::default();
    let mut m: CausalLm<B> = model::load(&base, &device).unwrap();
    let config =
        tune::peft::load_peft(&mut m, &tune::train::checkpoint::resolve_adapter_dir(&run.join(run_dir)).unwrap(), &device).unwrap();
    assert_eq!(config.use_dora, dora);
    let tok = Tokenizer::from_model_dir(&base).unwrap();
    let data = run.join("data.jsonl");
    let sequences: Vec<Vec<u32>> = read_records(&data)
        .unwrap()
        .iter()
        .map(|r| text_ids(&tok, string_field(&data, r, "text").unwrap(), tok.eos_token_id()).unwrap())
        .collect();
    let ours = tune::eval::evaluate(&m, &sequences, &device);
    let peft = report["loss"].as_f64().unwrap();
    assert_eq!(ours.tokens as u64, report["tokens"].as_u64().unwrap());
    let rel = (ours.loss - peft).abs() / peft;
    assert!(rel <= 1e-6, "tune eval --adapter {} vs PEFT {peft} (rel {rel:.2e})", ours.loss);
}

/// Running the recipe twice writes the same adapter bit for bit, and that adapter is the one
/// committed (and checked by PEFT) up to the rounding of another CPU's kernels: the fixture was
/// written on an AVX-512 machine, gemm's AVX2 kernels sum in another order, and six AdamW steps
/// at lr 1e-2 amplify that (measured 1.4e-4 at most on an AMD EPYC without AVX-512; a wrong
/// step moves the weights by ~1e-2).
#[test]
fn the_run_is_reproducible() {
    check_reproducible("recipe.yaml", "run");
}

#[test]
fn the_dora_run_is_reproducible() {
    check_reproducible("recipe-dora.yaml", "run-dora");
}

fn check_reproducible(recipe: &str, run_dir: &str) {
    let run = |tag: &str| {
        let out = std::env::temp_dir().join(format!("tune-tiny-{run_dir}-{tag}-{}", std::process::id()));
        let status = Command::new(env!("CARGO_BIN_EXE_tune"))
            .current_dir(root())
            .args(["run", &format!("tests/fixtures/tiny-run/{recipe}"), &format!("output.dir={}", out.display()), "--overwrite"])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let bytes = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
        let tensors = read_reference(&out.join("adapter/adapter_model.safetensors"));
        let _ = std::fs::remove_dir_all(&out);
        (bytes, tensors)
    };
    let (first, fresh) = run("a");
    let (second, _) = run("b");
    assert!(first == second, "two runs of the same recipe wrote different adapters");
    let committed = read_reference(&fixtures().join(format!("tiny-run/{run_dir}/adapter/adapter_model.safetensors")));
    assert_eq!(committed.len(), fresh.len());
    for (k, v) in &committed {
        let (d, s) = max_abs_diff(&fresh[k].f32s(), &v.f32s());
        assert!(d <= 1e-3 * s.max(1.0), "{k}: differs by {d}");
    }
}
