//! The real SmolLM2-135M-Instruct against transformers' outputs (tests/fixtures/smollm2/, written
//! by tests/fixtures/reference.py), and an end-to-end fine-tune with a shipped recipe.
//!
//! The model comes from scripts/fetch-smollm2.sh. These tests are `#[ignore]`d; scripts/test.sh
//! fetches the model and runs them with `--include-ignored`, where a missing model fails them.

mod common;

use std::path::PathBuf;

use common::*;
use tune::data::text_ids;
use tune::generate::{generate, Sampling};
use tune::hf::{Message, Tokenizer};
use tune::model::{self, CausalLm};

fn model_dir() -> PathBuf {
    require_model(smollm2_dir(), "scripts/fetch-smollm2.sh")
}

fn json(path: &str) -> serde_json::Value {
    let p = fixtures().join(path);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-smollm2.sh); scripts/test.sh runs it"]
fn greedy_generation_equals_transformers() {
    let dir = model_dir();
    let device = Default::default();
    let model: CausalLm<B> = model::load(&dir, &device).unwrap();
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let stop = model.config.eos_token_ids.clone();
    let cases = json("smollm2/generate.json");
    let cases = cases.as_array().cloned().unwrap_or_else(|| vec![cases]);
    assert!(!cases.is_empty());
    for case in cases {
        let raw = case.get("raw").and_then(|r| r.as_bool()).unwrap_or(false);
        let prompt = case["prompt"].as_str().unwrap();
        let prompt_ids = if raw {
            tok.encode(prompt, true).unwrap()
        } else {
            let text = tok.chat_template().unwrap().render(&[Message::new("user", prompt)], true).unwrap();
            assert_eq!(text, case["prompt_text"].as_str().unwrap());
            tok.encode(&text, false).unwrap()
        };
        assert_eq!(prompt_ids, ids(&case["prompt_ids"]), "prompt ids for {prompt:?}");
        let want = ids(&case["new_ids"]);
        let got = generate(&model, &prompt_ids, want.len(), Sampling::default(), &stop, &device, |_| {});
        assert_eq!(got, want, "greedy ids for {prompt:?}");
        let completion = tok.decode(&got, true).unwrap();
        assert_eq!(completion, case["completion"].as_str().unwrap());
        eprintln!("{prompt:?} -> {completion:?}");
    }
}

#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-smollm2.sh); scripts/test.sh runs it"]
fn eval_loss_and_logits_equal_transformers() {
    let dir = model_dir();
    let device = Default::default();
    let model: CausalLm<B> = model::load(&dir, &device).unwrap();
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let reference = json("smollm2/eval_reference.json");
    let records = tune::data::read_records(&fixtures().join("smollm2/eval.jsonl")).unwrap();
    let eos = tok.eos_token_id();
    let sequences: Vec<Vec<u32>> = records.iter().map(|r| text_ids(&tok, r.value["text"].as_str().unwrap(), eos).unwrap()).collect();
    for (i, (seq, want)) in sequences.iter().zip(reference["ids"].as_array().unwrap()).enumerate() {
        assert_eq!(seq, &ids(want), "token ids of line {}", i + 1);
    }
    let report = tune::eval::evaluate(&model, &sequences, &device);
    let want = reference["loss"].as_f64().unwrap();
    assert_eq!(report.tokens as u64, reference["tokens"].as_u64().unwrap());
    let rel = (report.loss - want).abs() / want;
    eprintln!("eval loss {} vs transformers {want} (rel {rel:.2e})", report.loss);
    assert!(rel <= 1e-4, "eval loss {} vs transformers {want}", report.loss);

    // Logits at the first and last prompt position.
    let r = read_reference(&fixtures().join("smollm2/logits.safetensors"));
    let input = r["input_ids"].ids();
    let positions: Vec<usize> = (0..input.len()).collect();
    let hidden =
        model.forward_hidden(tune::model::token_tensor::<B>(&input, 1, &device), &positions, &tune::model::AttentionMask::Causal, None);
    let logits: Vec<f32> = model.lm_head(hidden).into_data().iter::<f32>().collect();
    let vocab = model.config.vocab_size;
    for (key, pos) in [("logits_first", 0), ("logits_last", input.len() - 1)] {
        let want = &r[key];
        let (d, s) = max_abs_diff(&logits[pos * vocab..(pos + 1) * vocab], &want.f32s());
        eprintln!("{key}: max |Δ| {d:.2e} of max |logit| {s:.1}");
        assert!(d / s <= 1e-4, "{key}: max |Δlogit| {d} vs scale {s}");
    }
}
