//! Quantized base (QLoRA, `model.quantize`) against bitsandbytes, transformers and PEFT, from
//! the fixtures tests/fixtures/reference.py --quant writes (bitsandbytes 0.50.2):
//!
//! - the codecs: NF4 and int8 codes, absmax and dequantized weights equal bitsandbytes' bit for
//!   bit (`quant/codec.safetensors`: random tensors, an element count that is not a multiple of
//!   64 and an odd one, rows of 80, values at and beside the code midpoints, zeros, 60 decades
//!   of scale, bf16 values);
//! - tiny Llama and GPT-2 (Conv1D) with every decoder linear layer quantized: logits and loss as
//!   transformers gives them on the round-tripped weights, and PEFT's LoRA loss, gradients and 5
//!   AdamW steps on that base, to 1e-4 as tests/lora_parity.rs holds the unquantized ones (a
//!   batch of the fixture's own, whose gradients have no element at f32 noise level: see
//!   quant_model_reference in reference.py);
//! - SmolLM2 (`#[ignore]`d, run by scripts/test.sh): eval loss and logits with `--quantize nf4`
//!   and `int8` against transformers on the round-tripped weights, 1e-4.

mod common;

use std::collections::HashMap;

use burn::backend::Autodiff;
use burn::tensor::{FloatDType, Tensor};
use common::*;
use tune::data::batch::{Batch, Row};
use tune::data::examples::Example;
use tune::model::{self, CausalLm, LoadOptions};
use tune::peft;
use tune::quant::{Quantization, QuantizedMatrix};
use tune::train::optimizer::{AdamW, AdamWConfig};
use tune::train::{batch_loss, lora_params, loss_for_backward, train_step, StepOptions};

type AB = Autodiff<B>;
const TOL: f64 = 1e-4;

fn codec() -> HashMap<String, RefTensor> {
    read_reference(&fixtures().join("quant/codec.safetensors"))
}

fn cases(r: &HashMap<String, RefTensor>, kind: &str) -> Vec<String> {
    let mut names: Vec<String> =
        r.keys().filter_map(|k| k.strip_prefix(&format!("{kind}.")).and_then(|k| k.strip_suffix(".input")).map(str::to_string)).collect();
    names.sort();
    names
}

fn quantized(kind: Quantization, input: &RefTensor) -> QuantizedMatrix {
    let (rows, cols) = (input.shape[0], input.shape[1]);
    kind.quantize(&input.f32s(), rows, cols).unwrap()
}

/// Every bit of two f32 slices (so 0 and −0 differ, and NaN would have to match NaN).
fn first_bit_difference(a: &[f32], b: &[f32]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits())
}

#[test]
fn nf4_equals_bitsandbytes_bit_for_bit() {
    let r = codec();
    let names = cases(&r, "nf4");
    assert!(names.len() >= 8, "nf4 cases: {names:?}");
    let (mut moved, mut total) = (0, 0);
    for name in names {
        let at = |k: &str| &r[&format!("nf4.{name}.{k}")];
        let m = quantized(Quantization::Nf4, at("input"));
        let QuantizedMatrix::Nf4(nf4) = &m else { unreachable!() };
        let want_packed: Vec<u8> = at("packed").values.iter().map(|&v| v as u8).collect();
        assert_eq!(nf4.packed(), want_packed.as_slice(), "nf4 {name}: packed codes");
        assert_eq!(first_bit_difference(nf4.absmax(), &at("absmax").f32s()), None, "nf4 {name}: absmax");
        let deq = m.dequantize();
        let want = at("dequantized").f32s();
        if let Some(i) = first_bit_difference(&deq, &want) {
            panic!("nf4 {name}: element {i} dequantizes to {} (bitsandbytes {})", deq[i], want[i]);
        }
        let input = at("input").f32s();
        moved += input.iter().zip(&want).filter(|(a, b)| a != b).count();
        total += input.len();
    }
    // The cases exercise the codes: the round trip moves most values.
    assert!(moved * 10 >= total * 8, "nf4: only {moved} of {total} values change");
}

#[test]
fn int8_equals_bitsandbytes_bit_for_bit() {
    let r = codec();
    let names = cases(&r, "int8");
    assert!(names.len() >= 5, "int8 cases: {names:?}");
    for name in names {
        let at = |k: &str| &r[&format!("int8.{name}.{k}")];
        let m = quantized(Quantization::Int8, at("input"));
        let QuantizedMatrix::Int8(int8) = &m else { unreachable!() };
        let want_q: Vec<i8> = at("q").values.iter().map(|&v| v as i8).collect();
        assert_eq!(int8.q(), want_q.as_slice(), "int8 {name}: codes");
        assert_eq!(first_bit_difference(int8.absmax(), &at("absmax").f32s()), None, "int8 {name}: absmax");
        let deq = m.dequantize();
        let want = at("dequantized").f32s();
        if let Some(i) = first_bit_difference(&deq, &want) {
            panic!("int8 {name}: element {i} dequantizes to {} (bitsandbytes {})", deq[i], want[i]);
        }
    }
}

fn load(name: &str, quantize: Quantization) -> CausalLm<AB> {
    let opts = LoadOptions { dtype: FloatDType::F32, quantize };
    model::load_with(&tiny(name), &Default::default(), &opts).unwrap()
}

fn reference(name: &str, kind: &str) -> HashMap<String, RefTensor> {
    read_reference(&fixtures().join(format!("quant/{name}-{kind}/reference.safetensors")))
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (d, s) = max_abs_diff(a, b);
    d / s.max(1e-12)
}

const MODELS: &[(&str, Quantization, &str)] = &[
    ("llama", Quantization::Nf4, "nf4"),
    ("llama", Quantization::Int8, "int8"),
    ("gpt2", Quantization::Nf4, "nf4"),
    ("gpt2", Quantization::Int8, "int8"),
];

/// Every decoder linear layer is stored quantized; the embeddings and head stay f32.
#[test]
fn decoder_linears_are_stored_quantized() {
    for &(name, q, _) in MODELS {
        let m = load(name, q);
        let linears = m.linears();
        assert!(!linears.is_empty());
        for l in &linears {
            let stored = l.weight.quantized().unwrap_or_else(|| panic!("{name}: {} is not quantized", l.name));
            assert_eq!(stored.kind(), q);
            assert_eq!([stored.rows(), stored.cols()], [l.out_features(), l.in_features()], "{name}: {}", l.name);
        }
        assert_eq!(m.embed_tokens.dtype(), burn::tensor::DType::F32);
    }
}

#[test]
fn quantized_logits_equal_transformers_on_round_tripped_weights() {
    let device = Default::default();
    for &(name, q, kind) in MODELS {
        let r = reference(name, kind);
        let m = load(name, q);
        let ids = r["input_ids"].ids();
        let rows = r["input_ids"].shape[0];
        let seq = r["input_ids"].shape[1];
        let positions: Vec<usize> = (0..rows).flat_map(|_| 0..seq).collect();
        let hidden = m.forward_hidden(model::token_tensor::<AB>(&ids, rows, &device), &positions, &model::AttentionMask::Causal, None);
        let logits: Vec<f32> = m.lm_head(hidden).into_data().iter::<f32>().collect();
        let want = r["logits"].f32s();
        let err = rel(&logits, &want);
        // The unquantized model's logits are far from these (report.json: 0.03 to 0.7 of
        // max |logit|), so this comparison sees the quantization.
        let plain = read_reference(&tiny(name).join("reference.safetensors"));
        let moved = rel(&plain["logits"].f32s(), &want);
        eprintln!("{name}-{kind}: logits rel err {err:.2e} (quantization moves them by {moved:.2e})");
        assert!(moved > 100.0 * TOL, "{name}-{kind}: the fixture barely quantizes ({moved:.2e})");
        assert!(err <= TOL, "{name}-{kind}: max |Δlogit| / max |logit| = {err:.2e}");
    }
}

fn model_with_adapter(name: &str, q: Quantization) -> CausalLm<AB> {
    let device = Default::default();
    let mut m = load(name, q);
    peft::load_peft(&mut m, &tiny(name).join("lora").join("adapter"), &device).unwrap();
    for p in m.linears_mut() {
        if let Some(l) = p.adapter.as_mut() {
            l.a = l.a.clone().require_grad();
            l.b = l.b.clone().require_grad();
        }
    }
    m
}

fn lora_batch(r: &HashMap<String, RefTensor>) -> Batch {
    let ids = r["lora.input_ids"].ids();
    let labels = &r["lora.labels"].values;
    let seq = r["lora.input_ids"].shape[1];
    let rows: Vec<Row> = ids
        .chunks(seq)
        .zip(labels.chunks(seq))
        .map(|(ids, labels)| Row::from_example(&Example { ids: ids.to_vec(), trained: labels.iter().map(|&l| l != -100.0).collect() }))
        .collect();
    Batch::new(&rows.iter().collect::<Vec<_>>(), 0)
}

fn peft_layout(t: Tensor<B, 2>) -> Vec<f32> {
    t.transpose().into_data().iter::<f32>().collect()
}

#[test]
fn qlora_loss_and_gradients_match_peft() {
    let device = Default::default();
    for &(name, q, kind) in MODELS {
        let r = reference(name, kind);
        let model = model_with_adapter(name, q);
        let batch = lora_batch(&r);
        let value: f32 = batch_loss(&model, &batch, batch.label_count(), &device).into_scalar();
        let want = r["lora.loss"].scalar();
        let loss_err = (value as f64 - want).abs() / want;
        assert!(loss_err <= TOL, "{name}-{kind}: loss {value} vs PEFT {want} (rel {loss_err:.2e})");
        let (surrogate, _) = loss_for_backward(&model, &batch, batch.label_count(), &device);
        let grads = surrogate.backward();
        let (mut worst, mut checked) = (0f64, 0);
        for p in model.linears() {
            let Some(l) = &p.adapter else { continue };
            for (which, t) in [("lora_A", &l.a), ("lora_B", &l.b)] {
                let key = format!("grad.{}", peft::peft_key(&p.name, which));
                let err = rel(&peft_layout(t.grad(&grads).expect("adapter tensors have gradients")), &r[&key].f32s());
                worst = worst.max(err);
                assert!(err <= TOL, "{name}-{kind}: {key} relative error {err:.2e}");
                checked += 1;
            }
        }
        assert_eq!(checked, r.keys().filter(|k| k.starts_with("grad.")).count(), "{name}-{kind}: every gradient compared");
        eprintln!("{name}-{kind}: loss rel err {loss_err:.2e}, worst grad rel err {worst:.2e} over {checked} tensors");
    }
}

#[test]
fn qlora_five_adamw_steps_match_peft() {
    let device = Default::default();
    for &(name, q, kind) in MODELS {
        let r = reference(name, kind);
        let mut model = model_with_adapter(name, q);
        let batch = lora_batch(&r);
        let config = AdamWConfig { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.01 };
        let inner: Vec<_> = lora_params(&model).into_iter().map(|p| p.inner()).collect();
        let mut opt = AdamW::new(config, &inner);
        let (losses, norms) = (&r["adam_losses"].values, &r["adam_grad_norms"].values);
        let mut worst = 0f64;
        for step in 0..5 {
            let options = StepOptions { lr: 1e-2, max_grad_norm: Some(1.0), dropout_seed: 0, activation_checkpointing: step % 2 == 1 };
            let stats = train_step(&mut model, &mut opt, std::slice::from_ref(&batch), options, &device);
            let loss_err = (stats.loss as f64 - losses[step]).abs() / losses[step];
            let norm_err = (stats.grad_norm - norms[step]).abs() / norms[step];
            worst = worst.max(loss_err).max(norm_err);
            assert!(loss_err <= TOL, "{name}-{kind} step {}: loss {} vs PEFT {} (rel {loss_err:.2e})", step + 1, stats.loss, losses[step]);
            assert!(norm_err <= TOL, "{name}-{kind} step {}: grad norm {} vs PEFT {}", step + 1, stats.grad_norm, norms[step]);
        }
        assert!((losses[4] - losses[0]).abs() > 1e-3, "{name}-{kind}: reference losses barely change");
        for p in model.linears() {
            let Some(l) = &p.adapter else { continue };
            for (which, t) in [("lora_A", &l.a), ("lora_B", &l.b)] {
                let key = format!("final.{}", peft::peft_key(&p.name, which));
                let (ours, want) = (peft_layout(t.clone().inner()), r[&key].f32s());
                // As in tests/lora_parity.rs: the weights as a whole, ‖Δ‖/‖w‖ ≤ 1e-3.
                let d: f64 = ours.iter().zip(&want).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
                let n: f64 = want.iter().map(|y| (*y as f64).powi(2)).sum();
                let err = (d / n).sqrt();
                assert!(err <= 1e-3, "{name}-{kind}: {key} after 5 steps, ‖Δ‖/‖w‖ = {err:.2e}");
            }
        }
        eprintln!("{name}-{kind}: 5 AdamW steps, worst loss/grad-norm rel err {worst:.2e}");
    }
}

fn smollm2(kind: Quantization) {
    let dir = require_model(smollm2_dir(), "scripts/fetch-smollm2.sh");
    let opts = LoadOptions { dtype: FloatDType::F32, quantize: kind };
    let model: CausalLm<B> = model::load_with(&dir, &Default::default(), &opts).unwrap();
    let tok = tune::hf::Tokenizer::from_model_dir(&dir).unwrap();
    check_eval_loss_and_logits(&model, &tok, &format!("smollm2-{kind}"));
}

#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-smollm2.sh); scripts/test.sh runs it"]
fn smollm2_nf4_eval_equals_transformers_on_round_tripped_weights() {
    smollm2(Quantization::Nf4);
}

#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-smollm2.sh); scripts/test.sh runs it"]
fn smollm2_int8_eval_equals_transformers_on_round_tripped_weights() {
    smollm2(Quantization::Int8);
}

fn temp(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tune-quant-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `tune run` with `model.quantize: nf4` trains on the quantized base, records the key, and its
/// merged export adds the adapter to the checkpoint's original weights (as PEFT merges a QLoRA
/// adapter into the unquantized base), not to the NF4 round trip the run trained on.
#[test]
fn qlora_run_merges_into_the_unquantized_base() {
    let dir = temp("run");
    let (model_dir, data, out) = (dir.join("model"), dir.join("data.jsonl"), dir.join("run"));
    write_tiny_model(&model_dir, 7);
    write_text_dataset(&data, 16, 3);
    let recipe = format!(
        "model:\n  path: {}\n  quantize: nf4\nlora:\n  rank: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules: [q_proj, v_proj]\n\
         dataset:\n  path: {}\n  max_seq_len: 16\ntrain:\n  max_steps: 3\n  batch_size: 4\n  lr: 1.0e-2\n\
         output:\n  dir: {}\n  export: merged\n  export_dtype: f32\n",
        model_dir.display(),
        data.display(),
        out.display()
    );
    std::fs::write(dir.join("recipe.yaml"), recipe).unwrap();
    let (code, stderr) = tune(&["run", s(&dir.join("recipe.yaml"))]);
    assert_eq!(code, 0, "{stderr}");
    assert!(std::fs::read_to_string(out.join("recipe.yaml")).unwrap().contains("quantize: nf4"));

    let base = read_reference(&model_dir.join("model.safetensors"));
    let merged = read_reference(&out.join("export/merged/model.safetensors"));
    let adapter = read_reference(&out.join("adapter/adapter_model.safetensors"));
    // Not adapted: the original bits, which the NF4 round trip would have changed.
    let name = "model.layers.0.self_attn.o_proj.weight";
    let w = base[name].f32s();
    assert_eq!(first_bit_difference(&merged[name].f32s(), &w), None, "{name}: merged is not the original weight");
    let round_trip = Quantization::Nf4.quantize(&w, 32, 32).unwrap().dequantize();
    assert!(first_bit_difference(&round_trip, &w).is_some());
    // Adapted: W + (alpha / r)·B·A on the original W.
    let name = "model.layers.1.self_attn.q_proj";
    let (w, got) = (base[&format!("{name}.weight")].f32s(), merged[&format!("{name}.weight")].f32s());
    let a = adapter[&format!("base_model.model.{name}.lora_A.weight")].f32s(); // [4, 32]
    let b = adapter[&format!("base_model.model.{name}.lora_B.weight")].f32s(); // [32, 4]
    assert!(b.iter().any(|&v| v != 0.0), "training moved lora_B off zero");
    let want: Vec<f32> = (0..32 * 32)
        .map(|k| {
            let (o, i) = (k / 32, k % 32);
            w[k] + 2.0 * (0..4).map(|r| b[o * 4 + r] * a[r * 32 + i]).sum::<f32>()
        })
        .collect();
    let (d, scale) = max_abs_diff(&got, &want);
    assert!(d <= 1e-6 * scale, "{name}: merged differs from W + s·B·A by {d}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tune eval --quantize` loads the base as model.quantize does (the library path the tests
/// above hold to transformers); a bad value names the flag and the choices.
#[test]
fn eval_quantize_flag() {
    let dir = temp("eval");
    let (model_dir, data) = (dir.join("model"), dir.join("data.jsonl"));
    write_tiny_model(&model_dir, 5);
    write_text_dataset(&data, 6, 9);
    let tok = tune::hf::Tokenizer::from_model_dir(&model_dir).unwrap();
    let records = tune::data::read_records(&data).unwrap();
    let sequences: Vec<Vec<u32>> =
        records.iter().map(|r| tune::data::text_ids(&tok, r.value["text"].as_str().unwrap(), tok.eos_token_id()).unwrap()).collect();
    let mut losses = Vec::new();
    for (flag, q) in [("nf4", Quantization::Nf4), ("int8", Quantization::Int8), ("none", Quantization::None)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tune"))
            .args(["eval", "--model", s(&model_dir), "--data", s(&data), "--quantize", flag, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let opts = LoadOptions { dtype: FloatDType::F32, quantize: q };
        let model: CausalLm<B> = model::load_with(&model_dir, &Default::default(), &opts).unwrap();
        let want = tune::eval::evaluate(&model, &sequences, &Default::default()).loss;
        assert_eq!(report["loss"].as_f64().unwrap(), want, "--quantize {flag}");
        losses.push(want);
    }
    assert!(losses[0] != losses[2] && losses[1] != losses[2], "the flag changes the model: {losses:?}");
    let (code, stderr) = tune(&["eval", "--model", s(&model_dir), "--data", s(&data), "--quantize", "nf5"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--quantize") && stderr.contains("nf4, int8 or none"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
