//! Logits and loss of every family against transformers, on tiny random checkpoints written by
//! tests/fixtures/reference.py.
//!
//! Tolerance (f32): max |Δlogit| ≤ 1e-4 · max |logit| and |Δloss| ≤ 1e-4 · loss. The weights are
//! drawn wide (std 0.2, norm weights 1 ± 0.2, eps 0.01–0.05) so that a wrong norm epsilon or a
//! wrong rotary layout moves logits by far more than that; the last tests prove it.

mod common;

use common::*;
use tune::eval::sequence_nll;
use tune::hf::Weights;
use tune::model::layers::token_tensor;
use tune::model::{AttentionMask, Llama, Loader, ModelConfig};

const TOL: f64 = 1e-4;

fn load(name: &str, edit: impl FnOnce(&mut ModelConfig)) -> Llama<B> {
    let dir = tiny(name);
    let mut config = ModelConfig::from_model_dir(&dir).unwrap();
    edit(&mut config);
    let weights = Weights::open(&dir).unwrap();
    let loader = Loader::new(&weights, Default::default());
    let model = Llama::load(config, &loader).unwrap();
    loader.finish().unwrap();
    model
}

/// Logits for the reference batch and the HF-style mean loss over both rows.
fn run(model: &Llama<B>, name: &str) -> (Vec<f32>, f64) {
    let reference = read_reference(&tiny(name).join("reference.safetensors"));
    let ids = reference["input_ids"].ids();
    let [rows, seq] = [reference["input_ids"].shape[0], reference["input_ids"].shape[1]];
    let device = Default::default();
    let positions: Vec<usize> = (0..rows).flat_map(|_| 0..seq).collect();
    let hidden = model.forward_hidden(
        token_tensor::<B>(&ids, rows, &device),
        &positions,
        &AttentionMask::causal(seq, 0, model.config.sliding_window, &device),
        None,
    );
    let logits: Vec<f32> = model.lm_head(hidden).into_data().iter::<f32>().collect();
    let mut sum = 0.0;
    let mut n = 0;
    for row in ids.chunks(seq) {
        let nll = sequence_nll(model, row, &device);
        n += nll.len();
        sum += nll.iter().map(|&x| x as f64).sum::<f64>();
    }
    (logits, sum / n as f64)
}

fn errors(name: &str, model: &Llama<B>) -> (f64, f64) {
    let reference = read_reference(&tiny(name).join("reference.safetensors"));
    let (logits, loss) = run(model, name);
    let (diff, scale) = max_abs_diff(&logits, &reference["logits"].f32s());
    let ref_loss = reference["loss"].scalar();
    (diff / scale, (loss - ref_loss).abs() / ref_loss)
}

#[test]
fn every_family_matches_transformers() {
    for name in TINY {
        let model = load(name, |_| {});
        let (logit_err, loss_err) = errors(name, &model);
        eprintln!("{name:14} max|Δlogit|/max|logit| = {logit_err:.2e}   |Δloss|/loss = {loss_err:.2e}");
        assert!(logit_err <= TOL, "{name}: relative logit error {logit_err:.3e} > {TOL:e}");
        assert!(loss_err <= TOL, "{name}: relative loss error {loss_err:.3e} > {TOL:e}");
    }
}

#[test]
fn fixtures_cover_the_features_they_claim() {
    let c = |n: &str| ModelConfig::from_model_dir(&tiny(n)).unwrap();
    assert!(matches!(c("llama").rope_scaling, tune::model::RopeScaling::Llama3 { .. }));
    assert!(matches!(c("llama-linear").rope_scaling, tune::model::RopeScaling::Linear { .. }));
    assert!(c("llama-tied").tie_word_embeddings && !c("llama").tie_word_embeddings);
    assert!(c("qwen2").qkv_bias && c("qwen3").qk_norm);
    assert_ne!(c("qwen3").head_dim, c("qwen3").hidden_size / c("qwen3").num_attention_heads);
    for n in TINY {
        let cfg = c(n);
        assert!(cfg.num_key_value_heads < cfg.num_attention_heads, "{n}: not GQA");
    }
    // Sharded, bf16 and f16 checkpoints exercise the loader's index and dtype paths.
    assert!(tiny("llama").join("model.safetensors.index.json").is_file());
    let dtypes = |n: &str| Weights::open(&tiny(n)).unwrap().dtypes();
    assert_eq!(dtypes("mistral"), vec!["bf16"]);
    assert_eq!(dtypes("qwen3"), vec!["f16"]);
}

/// The parity test must be able to fail: a wrong epsilon or rotary frequency breaks it.
#[test]
fn parity_detects_wrong_norm_eps_and_rope() {
    for name in ["llama-tied", "qwen3"] {
        let (logit_err, _) = errors(name, &load(name, |c| c.rms_norm_eps = 1e-6));
        assert!(logit_err > 100.0 * TOL, "{name}: eps 1e-6 only moved logits by {logit_err:.2e}");
        let (logit_err, _) = errors(name, &load(name, |c| c.rope_theta *= 2.0));
        assert!(logit_err > 100.0 * TOL, "{name}: rope_theta×2 only moved logits by {logit_err:.2e}");
    }
    // Llama 3 scaling must matter for the llama fixture, or it tests nothing.
    let (logit_err, _) = errors("llama", &load("llama", |c| c.rope_scaling = tune::model::RopeScaling::None));
    assert!(logit_err > 100.0 * TOL, "llama3 rope scaling only moved logits by {logit_err:.2e}");
}
