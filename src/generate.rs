//! `tune generate`: autoregressive decoding with a KV cache, greedy or sampled.

use crate::backend::Backend;

use crate::model::{token_tensor, AttentionMask, CausalLm, KvCache};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` for each new id, and
/// stopping after any id in `stop`. Each step after the prompt feeds one position.
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: Sampling,
    stop: &[u32],
    device: &B::Device,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    let mut rng = Rng::new(sampling.seed);
    let mut cache = KvCache::new(model.layers.len());
    let mut generated = Vec::new();
    let mut input: Vec<u32> = prompt.to_vec();
    let mut all: Vec<u32> = prompt.to_vec();
    while generated.len() < max_new_tokens && !input.is_empty() {
        // LongRoPE switches to its long factors once the sequence passes the original
        // context; transformers' Phi-3 then recomputes the whole cache with them, once.
        if model.rope_switches_between(cache.len(), all.len()) {
            cache = KvCache::new(model.layers.len());
            input = all.clone();
        }
        let past = cache.len();
        let positions: Vec<usize> = (past..past + input.len()).collect();
        let mask = AttentionMask::Causal;
        let hidden = model.forward_hidden(token_tensor::<B>(&input, 1, device), &positions, &mask, Some(&mut cache));
        let last = hidden.narrow(1, input.len() - 1, 1).reshape([1, model.config.hidden_size]);
        let logits: Vec<f32> = model.lm_head(last).into_data().iter::<f32>().collect();
        let next = pick(&logits, sampling, &mut rng);
        generated.push(next);
        on_token(next);
        if stop.contains(&next) {
            break;
        }
        input = vec![next];
        all.push(next);
    }
    generated
}

/// Chooses the next token: argmax at temperature 0 (first maximum, as torch.argmax), else a
/// sample from softmax(logits / T) restricted to the top-p nucleus.
pub fn pick(logits: &[f32], sampling: Sampling, rng: &mut Rng) -> u32 {
    if sampling.temperature <= 0.0 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let t = sampling.temperature as f64;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits.iter().enumerate().map(|(i, &l)| (i, ((l as f64 - max) / t).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1;
        if mass >= sampling.top_p as f64 {
            break;
        }
    }
    let mut r = rng.next_f64() * mass;
    for p in &probs[..kept] {
        if r < p.1 {
            return p.0 as u32;
        }
        r -= p.1;
    }
    probs[kept - 1].0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        let mut rng = Rng::new(0);
        assert_eq!(pick(&[0.1, 3.0, 3.0, -1.0], Sampling::default(), &mut rng), 1);
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // p ≈ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps only the first two.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let sampling = Sampling { temperature: 1.0, top_p: 0.8, seed: 1 };
        let mut rng = Rng::new(1);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[pick(&logits, sampling, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[0] > seen[1] && seen[1] > 300, "{seen:?}");
    }
}
