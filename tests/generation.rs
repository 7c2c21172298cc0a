//! Greedy generation with the KV cache on every tiny family against transformers'
//! `generate(use_cache=True)` (tests/fixtures/reference.py writes `generate.safetensors`: a
//! 5-token prompt, 20 new tokens, and the logits of each step). Prompt + generation is 25
//! positions, past the fixtures' sliding window of 8, so windowed layers read a cache longer
//! than their window, ALiBi runs on positions past the prompt, and Phi-3's LongRoPE switches
//! to its long factors mid-generation (recomputing the cache, as transformers' Phi-3 does).

mod common;

use common::*;
use tune::generate::{generate, Sampling};
use tune::model::{self, token_tensor, AttentionMask, CausalLm, KvCache};

const TOL: f64 = 1e-4;

#[test]
fn greedy_generation_with_the_cache_equals_transformers() {
    let device = Default::default();
    for name in TINY {
        let r = read_reference(&tiny(name).join("generate.safetensors"));
        let prompt = r["prompt_ids"].ids();
        let want = r["new_ids"].ids();
        let step_logits = r["step_logits"].f32s();
        let model: CausalLm<B> = model::load(&tiny(name), &device).unwrap();
        let vocab = model.config.vocab_size;

        // The ids, through the code path `tune generate` runs.
        let got = generate(&model, &prompt, want.len(), Sampling::default(), &[], &device, |_| {});
        assert_eq!(got, want, "{name}: greedy ids differ from transformers'");

        // Each step's logits: the prompt in one pass, then one position at a time.
        let mut cache = KvCache::new(model.layers.len());
        let mut input = prompt.clone();
        let mut all = prompt.clone();
        let mut worst = 0f64;
        for (step, &next) in want.iter().enumerate() {
            // As transformers' Phi-3 does once its sequence passes LongRoPE's original context.
            if model.rope_switches_between(cache.len(), all.len()) {
                cache = KvCache::new(model.layers.len());
                input = all.clone();
            }
            let past = cache.len();
            let positions: Vec<usize> = (past..past + input.len()).collect();
            let hidden = model.forward_hidden(token_tensor::<B>(&input, 1, &device), &positions, &AttentionMask::Causal, Some(&mut cache));
            let last = hidden.narrow(1, input.len() - 1, 1).reshape([1, model.config.hidden_size]);
            let logits: Vec<f32> = model.lm_head(last).into_data().iter::<f32>().collect();
            let (diff, scale) = max_abs_diff(&logits, &step_logits[step * vocab..(step + 1) * vocab]);
            worst = worst.max(diff / scale);
            assert!(diff <= TOL * scale, "{name}: step {step} logits differ by {:.2e} relative", diff / scale);
            input = vec![next];
            all.push(next);
        }
        eprintln!("{name:14} 20 greedy tokens equal; worst step max|Δlogit|/max|logit| = {worst:.2e}");
    }
}
