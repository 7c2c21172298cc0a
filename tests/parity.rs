//! Logits and loss of every family against transformers, on tiny random checkpoints written by
//! tests/fixtures/reference.py.
//!
//! Tolerance (f32): max |Δlogit| ≤ 1e-4 · max |logit| and |Δloss| ≤ 1e-4 · loss. The weights are
//! drawn wide (std 0.2, norm weights 1 ± 0.2, eps 0.01–0.05) so that a wrong norm epsilon or a
//! wrong rotary layout moves logits by far more than that; the last tests prove it.

mod common;

use common::*;
use std::path::Path;
use tune::eval::sequence_nll;
use tune::hf::Weights;
use tune::model::token_tensor;

use tune::model::config::{NormKind, Positions, QkvLayout, Residual, RopeConfig, WeightLayout};
use tune::model::{AttentionMask, CausalLm, ModelConfig, RopeScaling};

const TOL: f64 = 1e-4;

fn load(name: &str, edit: impl FnOnce(&mut ModelConfig)) -> CausalLm<B> {
    let dir = tiny(name);
    let mut config = ModelConfig::from_model_dir(&dir).unwrap();
    edit(&mut config);
    tune::model::load_config(config, &dir, &Default::default(), burn::tensor::FloatDType::F32).unwrap()
}

/// Logits for the reference batch and the HF-style mean loss over both rows.
fn run(model: &CausalLm<B>, reference: &Path) -> (Vec<f32>, f64) {
    let reference = read_reference(reference);
    let ids = reference["input_ids"].ids();
    let [rows, seq] = [reference["input_ids"].shape[0], reference["input_ids"].shape[1]];
    let device = Default::default();
    let positions: Vec<usize> = (0..rows).flat_map(|_| 0..seq).collect();
    let hidden = model.forward_hidden(token_tensor::<B>(&ids, rows, &device), &positions, &AttentionMask::Causal, None);
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

fn errors(name: &str, model: &CausalLm<B>) -> (f64, f64) {
    errors_with(model, &tiny(name).join("reference.safetensors"))
}

fn errors_with(model: &CausalLm<B>, path: &Path) -> (f64, f64) {
    let reference = read_reference(path);
    let (logits, loss) = run(model, path);
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

fn rope(c: &ModelConfig, i: usize) -> &RopeConfig {
    match &c.positions {
        Positions::Rope(t) => &t[i],
        other => panic!("no rotary tables: {other:?}"),
    }
}

fn rope_mut(c: &mut ModelConfig, i: usize) -> &mut RopeConfig {
    match &mut c.positions {
        Positions::Rope(t) => &mut t[i],
        other => panic!("no rotary tables: {other:?}"),
    }
}

fn set_eps(c: &mut ModelConfig, eps: f64) {
    c.norm = match c.norm {
        NormKind::Rms { unit_offset, .. } => NormKind::Rms { eps, unit_offset },
        NormKind::Layer { .. } => NormKind::Layer { eps },
    };
}

#[test]
fn fixtures_cover_the_features_they_claim() {
    let c = |n: &str| ModelConfig::from_model_dir(&tiny(n)).unwrap();
    assert!(matches!(rope(&c("llama"), 0).scaling, RopeScaling::Llama3 { .. }));
    assert!(matches!(rope(&c("llama-linear"), 0).scaling, RopeScaling::Linear { .. }));
    assert!(c("llama-tied").tie_word_embeddings && !c("llama").tie_word_embeddings);
    assert!(c("qwen2").attention.qkv_bias && c("qwen3").attention.qk_norm);
    assert_ne!(c("qwen3").head_dim, c("qwen3").hidden_size / c("qwen3").num_attention_heads);
    for n in ["llama", "llama-tied", "llama-linear", "mistral", "qwen2", "qwen3", "gemma3", "phi3"] {
        let cfg = c(n);
        assert!(cfg.num_key_value_heads < cfg.num_attention_heads, "{n}: not GQA");
    }
    // Sharded, bf16 and f16 checkpoints exercise the loader's index and dtype paths.
    assert!(tiny("llama").join("model.safetensors.index.json").is_file());
    let dtypes = |n: &str| Weights::open(&tiny(n)).unwrap().dtypes();
    assert_eq!(dtypes("mistral"), vec!["bf16"]);
    assert_eq!(dtypes("qwen3"), vec!["f16"]);
    // What each new family switches on (tests/fixtures/tiny/FEATURES.md: how far each moves logits).
    let g3 = c("gemma3");
    assert_eq!(g3.family().name(), "gemma3_text");
    assert!(g3.layers.iter().any(|l| l.window == Some(8)) && g3.layers.iter().any(|l| l.window.is_none()));
    assert_ne!(rope(&g3, 0).theta, rope(&g3, 1).theta, "gemma3: one base for global layers, one for local ones");
    assert!(matches!(rope(&g3, 0).scaling, RopeScaling::Linear { .. }) && rope(&g3, 1).scaling == RopeScaling::None);
    assert_ne!(g3.attention.scale, 1.0 / (g3.head_dim as f64).sqrt());
    assert!(g3.attention.qk_norm && g3.embed_scale.is_some() && g3.residual == Residual::Sandwich);
    let g2 = c("gemma2");
    assert!(g2.attention.softcap.is_some() && g2.final_softcap.is_some());
    assert_eq!(g2.layers.iter().map(|l| l.window.is_some()).collect::<Vec<_>>(), [true, false]);
    let phi = c("phi3");
    assert!(rope(&phi, 0).rotary_dim < phi.head_dim && matches!(rope(&phi, 0).scaling, RopeScaling::LongRope { .. }));
    assert_eq!(phi.attention.qkv, QkvLayout::Fused);
    let gpt2 = c("gpt2");
    assert!(gpt2.positions == Positions::Learned && gpt2.layout == WeightLayout::InOut);
    let neox = c("gpt-neox");
    assert!(neox.residual == Residual::Parallel && rope(&neox, 0).rotary_dim * 4 == neox.head_dim);
    assert_eq!(neox.attention.qkv, QkvLayout::FusedPerHead);
    let bloom = c("bloom");
    assert!(bloom.positions == Positions::Alibi && !bloom.num_attention_heads.is_power_of_two());
}

/// The parity test must be able to fail: a wrong epsilon or rotary frequency breaks it.
#[test]
fn parity_detects_wrong_norm_eps_and_rope() {
    for name in ["llama-tied", "qwen3", "gpt2", "gemma3"] {
        let (logit_err, _) = errors(name, &load(name, |c| set_eps(c, 1e-6)));
        assert!(logit_err > 100.0 * TOL, "{name}: eps 1e-6 only moved logits by {logit_err:.2e}");
    }
    for name in ["llama-tied", "qwen3", "gpt-neox", "phi3"] {
        let (logit_err, _) = errors(name, &load(name, |c| rope_mut(c, 0).theta *= 2.0));
        // GPT-NeoX rotates only a quarter of each head: the move is smaller, still 95× TOL.
        assert!(logit_err > 50.0 * TOL, "{name}: rope_theta×2 only moved logits by {logit_err:.2e}");
    }
    // Llama 3 scaling must matter for the llama fixture, or it tests nothing.
    let (logit_err, _) = errors("llama", &load("llama", |c| rope_mut(c, 0).scaling = RopeScaling::None));
    assert!(logit_err > 100.0 * TOL, "llama3 rope scaling only moved logits by {logit_err:.2e}");
    // Gemma 2's soft-caps and Gemma 3's windows.
    let (logit_err, _) = errors("gemma2", &load("gemma2", |c| c.attention.softcap = None));
    assert!(logit_err > 100.0 * TOL, "attention softcap only moved logits by {logit_err:.2e}");
    let (logit_err, _) = errors("gemma3", &load("gemma3", |c| c.layers.iter_mut().for_each(|l| l.window = None)));
    assert!(logit_err > 100.0 * TOL, "sliding window only moved logits by {logit_err:.2e}");
}

/// LongRoPE's short factors, on a sequence within the original context (the reference above is
/// past it, with the long factors).
#[test]
fn phi3_longrope_short_factors_match_transformers() {
    let model = load("phi3", |_| {});
    let (logit_err, loss_err) = errors_with(&model, &tiny("phi3").join("reference-short.safetensors"));
    eprintln!("phi3 short   max|Δlogit|/max|logit| = {logit_err:.2e}   |Δloss|/loss = {loss_err:.2e}");
    assert!(logit_err <= TOL && loss_err <= TOL, "phi3 short factors: {logit_err:.2e} {loss_err:.2e}");
}
