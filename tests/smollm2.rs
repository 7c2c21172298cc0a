//! The real SmolLM2-135M-Instruct against transformers' outputs (tests/fixtures/smollm2/, written
//! by tests/fixtures/reference.py), and an end-to-end fine-tune with a shipped recipe.
//!
//! The model comes from scripts/fetch-smollm2.sh. These tests are `#[ignore]`d; scripts/test.sh
//! fetches the model and runs them with `--include-ignored`, where a missing model fails them.

mod common;

use std::path::PathBuf;

use common::*;
use tune::generate::{generate, Sampling};
use tune::hf::{Message, Tokenizer};
use tune::model::{self, CausalLm};

fn model_dir() -> PathBuf {
    require_model(smollm2_dir(), "scripts/fetch-smollm2.sh")
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
    check_eval_loss_and_logits(&model, &tok, "smollm2");
}
