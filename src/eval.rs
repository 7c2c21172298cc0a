//! `tune eval`: mean next-token cross-entropy over every predicted token of a dataset.

use crate::backend::Backend;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::{token_tensor, AttentionMask, CausalLm};

/// Rows of the [tokens × vocab] logits computed at once, so long sequences never hold all of them.
const LOGIT_CHUNK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Sum of token losses / number of predicted tokens, over the whole file.
    pub loss: f64,
    /// Number of predicted tokens.
    pub tokens: usize,
    pub perplexity: f64,
}

/// −log p(target) for each row of `logits` `[n, vocab]`.
pub fn token_nll<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let n = targets.dims()[0];
    log_softmax(logits, 1).gather(1, targets.reshape([n, 1])).reshape([n]).neg()
}

/// Per-token losses of one sequence: entry i is −log p(ids[i+1] | ids[..=i]).
pub fn sequence_nll<B: Backend>(model: &CausalLm<B>, ids: &[u32], device: &B::Device) -> Vec<f32> {
    let s = ids.len();
    if s < 2 {
        return Vec::new();
    }
    let positions: Vec<usize> = (0..s).collect();
    let mask = AttentionMask::Causal;
    let hidden = model.forward_hidden(token_tensor::<B>(ids, 1, device), &positions, &mask, None).reshape([s, model.config.hidden_size]);
    let mut out = Vec::with_capacity(s - 1);
    for start in (0..s - 1).step_by(LOGIT_CHUNK) {
        let n = LOGIT_CHUNK.min(s - 1 - start);
        let logits = model.lm_head(hidden.clone().narrow(0, start, n));
        let targets: Vec<i64> = ids[start + 1..start + 1 + n].iter().map(|&t| t as i64).collect();
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), device);
        let nll = token_nll(logits, targets).into_data();
        out.extend(nll.iter::<f32>());
    }
    out
}

/// Evaluates sequences one by one (no padding, so nothing to mask), accumulating in f64.
pub fn evaluate<B: Backend>(model: &CausalLm<B>, sequences: &[Vec<u32>], device: &B::Device) -> EvalReport {
    let mut sum = 0f64;
    let mut tokens = 0usize;
    for ids in sequences {
        let nll = sequence_nll(model, ids, device);
        tokens += nll.len();
        sum += nll.iter().map(|&x| x as f64).sum::<f64>();
    }
    let loss = if tokens == 0 { f64::NAN } else { sum / tokens as f64 };
    EvalReport { loss, tokens, perplexity: loss.exp() }
}
