//! The real Gemma 3 270M (scripts/fetch-gemma3.sh) against transformers' outputs
//! (tests/fixtures/gemma3-270m/, written by tests/fixtures/gemma3_reference.py): its 262k
//! SentencePiece-style tokenizer, greedy generation with the KV cache (past the 512-token
//! window is not reached here), eval loss and logits; then a short fine-tune that changes its
//! answer. `#[ignore]`d; scripts/test.sh fetches the model and runs them.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use tune::generate::{generate, Sampling};
use tune::hf::Tokenizer;
use tune::model::{self, CausalLm};

fn model_dir() -> PathBuf {
    require_model(gemma3_dir(), "scripts/fetch-gemma3.sh")
}

#[test]
#[ignore = "needs Gemma 3 270M (scripts/fetch-gemma3.sh); scripts/test.sh runs it"]
fn tokenizer_equals_transformers() {
    let tok = Tokenizer::from_model_dir(&model_dir()).unwrap();
    let cases = json("gemma3-270m/tokenizer_cases.json");
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let special = case["add_special_tokens"].as_bool().unwrap();
        assert_eq!(tok.encode(text, special).unwrap(), ids(&case["ids"]), "{text:?} (add_special_tokens {special})");
    }
}

#[test]
#[ignore = "needs Gemma 3 270M (scripts/fetch-gemma3.sh); scripts/test.sh runs it"]
fn greedy_generation_eval_loss_and_logits_equal_transformers() {
    let dir = model_dir();
    let device = Default::default();
    let model: CausalLm<B> = model::load(&dir, &device).unwrap();
    assert_eq!(model.config.family().name(), "gemma3_text");
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    for case in json("gemma3-270m/generate.json").as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        assert_eq!(tok.encode(case["prompt"].as_str().unwrap(), true).unwrap(), prompt, "prompt ids");
        let want = ids(&case["new_ids"]);
        let got = generate(&model, &prompt, want.len(), Sampling::default(), &[], &device, |_| {});
        assert_eq!(got, want, "{:?}: {:?} vs transformers' {:?}", case["prompt"], tok.decode(&got, true).unwrap(), case["completion"]);
    }

    check_eval_loss_and_logits(&model, &tok, "gemma3-270m");
}

#[test]
#[ignore = "needs Gemma 3 270M (scripts/fetch-gemma3.sh); scripts/test.sh runs it"]
fn a_short_fine_tune_changes_its_answer() {
    let dir = model_dir();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("tune-gemma3-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_tune"))
        .current_dir(root)
        .args(["run", "recipes/gemma3-270m-identity.yaml"])
        .arg(format!("model.path={}", dir.display()))
        .arg(format!("output.dir={}", out.display()))
        .arg("--overwrite")
        .status()
        .unwrap();
    assert!(status.success(), "tune run failed");
    let answer = |adapter: Option<&std::path::Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tune"));
        cmd.args(["generate", "--raw", "--max-new-tokens", "16", "--prompt", "Question: Who are you?\nAnswer:"]).arg("--model").arg(&dir);
        if let Some(a) = adapter {
            cmd.arg("--adapter").arg(a);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let (before, after) = (answer(None), answer(Some(&out)));
    eprintln!("before: {before:?}\nafter:  {after:?}");
    assert_ne!(before, after);
    assert!(after.contains("Tunafish") && !before.contains("Tunafish"), "the fine-tune did not take: {after:?}");
    let _ = std::fs::remove_dir_all(&out);
}
