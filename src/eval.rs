//! The eval loss: mean next-token cross-entropy over the labelled tokens of a dataset (every
//! token but each record's first for text). `tune eval` and the evaluation during `tune run`
//! (`dataset.eval_path` / `dataset.eval_split`) both call [`evaluate_examples`], so the two
//! report the same number for the same data and adapter.
//!
//! A record longer than the window (the model's context, or a shorter `--max-seq-len` /
//! `dataset.max_seq_len`) is scored in overlapping windows, as llama.cpp's perplexity and
//! transformers' "Perplexity of fixed-length models" guide do: windows start every `stride`
//! tokens, each is one forward pass of at most `len` tokens, and each scores only the tokens the
//! previous window did not reach (the first window scores all of its own); the tokens before them
//! are context (labels -100 in transformers). Every token is scored exactly once, with at least
//! `len − stride` tokens of context once past the first window, and no forward pass is longer
//! than the window, so a 200k-token record costs 200k / stride passes of `len` tokens instead of
//! one quadratic pass beyond the model's positions.

use crate::backend::Backend;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use crate::data::examples::Example;
use crate::error::{Error, Result};
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
    /// Records scored.
    pub records: usize,
    /// Records longer than the window, scored in more than one window.
    pub windowed_records: usize,
    /// Forward passes: one per record that fits, more for the windowed ones.
    pub windows: usize,
    /// Window length and stride used; None when records are scored whole.
    pub window: Option<usize>,
    pub stride: Option<usize>,
}

/// Window length and stride for records longer than the model's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub len: usize,
    pub stride: usize,
}

/// One forward pass over `ids[begin..end]`, scoring the predictions of `ids[first..end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub begin: usize,
    pub end: usize,
    pub first: usize,
}

impl Window {
    /// A window of `len` tokens (at least 2) moving by `stride` (default half the window, at
    /// least 1; at most `len`).
    pub fn new(len: usize, stride: Option<usize>) -> Result<Window> {
        if len < 2 {
            return Err(Error::Unsupported(format!("eval window: {len} tokens; a window needs at least 2")));
        }
        let stride = stride.unwrap_or((len / 2).max(1));
        if stride == 0 || stride > len {
            return Err(Error::Unsupported(format!("--stride {stride}: must be in 1..={len} (the window length)")));
        }
        Ok(Window { len, stride })
    }

    /// The windows of a record of `n` tokens: transformers' loop (begin every stride, end at
    /// most len later, scoring from where the previous window ended), stopping at the window
    /// that reaches the end. A record of at most `len` tokens is one window scored whole.
    pub fn spans(&self, n: usize) -> Vec<Span> {
        let mut spans = Vec::new();
        if n < 2 {
            return spans;
        }
        let (mut begin, mut prev_end) = (0, 0);
        loop {
            let end = (begin + self.len).min(n);
            // The window's own first token has no context in it: it is never a target.
            spans.push(Span { begin, end, first: prev_end.max(begin + 1) });
            if end == n {
                break;
            }
            prev_end = end;
            begin += self.stride;
        }
        spans
    }
}

/// −log p(target) for each row of `logits` `[n, vocab]`.
pub fn token_nll<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let n = targets.dims()[0];
    log_softmax(logits, 1).gather(1, targets.reshape([n, 1])).reshape([n]).neg()
}

/// Per-token losses of one sequence: entry i is −log p(ids[i+1] | ids[..=i]).
pub fn sequence_nll<B: Backend>(model: &CausalLm<B>, ids: &[u32], device: &B::Device) -> Vec<f32> {
    let scored = vec![true; ids.len()];
    let mut out = Vec::with_capacity(ids.len().saturating_sub(1));
    scored_nll(model, ids, &scored, 1, device, |_, nll| out.push(nll));
    out
}

/// One forward pass over `ids`; calls `each(j, loss)` in order for every target j ≥ `first`
/// with `scored[j]`. The lm_head runs LOGIT_CHUNK rows at a time from row `first − 1`, and not
/// at all on chunks with nothing to score (prompts, context).
fn scored_nll<B: Backend>(
    model: &CausalLm<B>,
    ids: &[u32],
    scored: &[bool],
    first: usize,
    device: &B::Device,
    mut each: impl FnMut(usize, f32),
) {
    let s = ids.len();
    if s < 2 || first >= s || !scored[first..].contains(&true) {
        return;
    }
    let positions: Vec<usize> = (0..s).collect();
    let mask = AttentionMask::Causal;
    let hidden = model.forward_hidden(token_tensor::<B>(ids, 1, device), &positions, &mask, None).reshape([s, model.config.hidden_size]);
    for start in (first - 1..s - 1).step_by(LOGIT_CHUNK) {
        let n = LOGIT_CHUNK.min(s - 1 - start);
        if !scored[start + 1..start + 1 + n].contains(&true) {
            continue;
        }
        let logits = model.lm_head(hidden.clone().narrow(0, start, n));
        let targets: Vec<i64> = ids[start + 1..start + 1 + n].iter().map(|&t| t as i64).collect();
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), device);
        let nll = token_nll(logits, targets).into_data();
        for (k, x) in nll.iter::<f32>().enumerate() {
            if scored[start + 1 + k] {
                each(start + 1 + k, x);
            }
        }
    }
}

/// The eval loss of `examples`: each record one by one (no padding, so nothing to mask but the
/// prompt), in windows when `window` is given and the record is longer, the token losses of each
/// window summed in f64 and the windows' sums added up in order. A token counts when
/// `trained` marks it (the first token of a record is never predicted). No dropout is drawn:
/// adapters only drop out while the training loop sets their seed.
pub fn evaluate_examples<B: Backend>(model: &CausalLm<B>, examples: &[Example], window: Option<Window>, device: &B::Device) -> EvalReport {
    let (mut sum, mut tokens, mut windows, mut windowed_records) = (0f64, 0usize, 0usize, 0usize);
    for ex in examples {
        let n = ex.ids.len();
        let spans = match window {
            Some(w) => w.spans(n),
            None if n >= 2 => vec![Span { begin: 0, end: n, first: 1 }],
            None => Vec::new(),
        };
        windows += spans.len();
        windowed_records += usize::from(spans.len() > 1);
        for span in spans {
            let ids = &ex.ids[span.begin..span.end];
            let scored = &ex.trained[span.begin..span.end];
            let mut window_sum = 0f64;
            scored_nll(model, ids, scored, span.first - span.begin, device, |_, nll| {
                window_sum += nll as f64;
                tokens += 1;
            });
            sum += window_sum;
        }
    }
    let loss = if tokens == 0 { f64::NAN } else { sum / tokens as f64 };
    EvalReport {
        loss,
        tokens,
        perplexity: loss.exp(),
        records: examples.len(),
        windowed_records,
        windows,
        window: window.map(|w| w.len),
        stride: window.map(|w| w.stride),
    }
}

/// [`evaluate_examples`] on plain token sequences, every token a label, each scored whole.
pub fn evaluate<B: Backend>(model: &CausalLm<B>, sequences: &[Vec<u32>], device: &B::Device) -> EvalReport {
    let examples: Vec<Example> = sequences.iter().map(|ids| Example { ids: ids.clone(), trained: vec![true; ids.len()] }).collect();
    evaluate_examples(model, &examples, None, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(len: usize, stride: usize, n: usize) -> Vec<(usize, usize, usize)> {
        Window::new(len, Some(stride)).unwrap().spans(n).iter().map(|s| (s.begin, s.end, s.first)).collect()
    }

    /// transformers' guide loop by hand: max_length 4, stride 2 over 9 tokens.
    #[test]
    fn windows_score_every_token_once() {
        assert_eq!(spans(4, 2, 9), vec![(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 9, 8)]);
        // A record that fits is one window, scored whole.
        assert_eq!(spans(4, 2, 4), vec![(0, 4, 1)]);
        assert_eq!(spans(4, 2, 1), vec![]);
        // Disjoint windows: each window's first token has no context and is not scored.
        assert_eq!(spans(3, 3, 7), vec![(0, 3, 1), (3, 6, 4), (6, 7, 7)]);
        for (len, stride, n) in [(4, 2, 9), (5, 1, 12), (7, 3, 30), (128, 64, 300)] {
            let mut scored: Vec<usize> = Window::new(len, Some(stride)).unwrap().spans(n).iter().flat_map(|s| s.first..s.end).collect();
            assert!(scored.windows(2).all(|w| w[0] < w[1]), "{len}/{stride}: in order, no repeats");
            if stride < len {
                scored.dedup();
                assert_eq!(scored, (1..n).collect::<Vec<_>>(), "{len}/{stride}/{n}: every target once");
            }
        }
        assert_eq!(Window::new(8, None).unwrap().stride, 4);
        assert!(Window::new(8, Some(9)).is_err() && Window::new(8, Some(0)).is_err() && Window::new(1, None).is_err());
    }
}
