//! One optimizer step: the loss of a micro-batch and its LoRA gradients (with or without
//! activation checkpointing), their sum over gradient accumulation, clipping and AdamW. The
//! training loop, `tune bench` and the data-parallel replicas all step through here.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::adapter::{DropoutDraw, LoraAdapter};
use crate::backend::Backend;
use crate::data::batch::Batch;
use crate::eval::token_nll;
use crate::model::blocks::{Block, Context};
use crate::model::linear::linear_in_weight_dtype;
use crate::model::{token_tensor, AttentionMask, CausalLm};
use crate::ops::{float, prim};

use super::optimizer::{clip_grad_norm, AdamW};

/// Loss of one micro-batch: the sum of the labelled tokens' losses divided by `label_total`,
/// the number of labelled tokens in the whole optimizer step, so that summing micro-batches
/// gives the step's mean (not a mean of micro-batch means).
pub fn batch_loss<B: Backend>(model: &CausalLm<B>, batch: &Batch, label_total: usize, device: &B::Device) -> Tensor<B, 1> {
    let n = batch.rows * batch.seq;
    let logits = model.lm_head(final_hidden(model, batch, device));
    let targets: Vec<i64> = batch.targets.iter().map(|&t| t as i64).collect();
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), device);
    let weights = Tensor::<B, 1>::from_data(TensorData::new(batch.weights.clone(), [n]), device);
    (token_nll(logits, targets) * weights).sum() / label_total.max(1) as f64
}

/// The last hidden states of a batch, `[rows × seq, hidden]`, under its causal or packed mask.
fn final_hidden<B: Backend>(model: &CausalLm<B>, batch: &Batch, device: &B::Device) -> Tensor<B, 2> {
    model
        .forward_hidden(token_tensor::<B>(&batch.ids, batch.rows, device), &batch.positions, &batch_mask(batch, device), None)
        .reshape([batch.rows * batch.seq, model.config.hidden_size])
}

fn batch_mask<B: Backend>(batch: &Batch, device: &B::Device) -> AttentionMask<B> {
    match &batch.segments {
        Some(segments) => AttentionMask::packed(segments, batch.seq, device),
        None => AttentionMask::Causal,
    }
}

/// Rows of logits materialised at once by [`head_gradient`]: 128 × SmolLM2's 49,152-token
/// vocabulary is 25 MB, small enough for the allocator to reuse instead of mapping fresh pages.
pub const LOSS_CHUNK: usize = 128;

/// The same loss as [`batch_loss`], for training: returns a surrogate whose gradient is the
/// loss's gradient, and the loss's value.
///
/// The graph only needs Σ h ⊙ (d loss / d h), whose gradient with respect to the final hidden
/// states h is exactly d loss / d h; [`head_gradient`] computes that outside the graph.
pub fn loss_for_backward<B: AutodiffBackend<InnerBackend: Backend> + Backend>(
    model: &CausalLm<B>,
    batch: &Batch,
    label_total: usize,
    device: &B::Device,
) -> (Tensor<B, 1>, f64) {
    let h = final_hidden(model, batch, device);
    let (grad, loss) = head_gradient(h.clone().inner(), model.lm_head_weight().inner(), model.config.final_softcap, batch, label_total);
    ((h * Tensor::from_inner(grad)).sum(), loss)
}

/// d loss / d h and the loss for final hidden states `h` `[n, hidden]` and the lm_head `w`
/// `[hidden, vocab]`, without autodiff.
///
/// The lm_head and cross-entropy run LOSS_CHUNK rows at a time, with their gradient written
/// out: d loss / d logits = (softmax − one-hot) · w / label_total, so d loss / d h = that ·
/// lm_headᵀ. The [tokens × vocab] logits are never held whole, nor saved for the backward pass
/// (the lm_head is frozen, so nothing else needs them). The chunks' losses are summed in f64
/// once all of them are queued.
fn head_gradient<B: Backend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    softcap: Option<f64>,
    batch: &Batch,
    label_total: usize,
) -> (Tensor<B, 2>, f64) {
    let [n, hidden] = h.dims();
    let device = h.device();
    let coef: Vec<f32> = batch.weights.iter().map(|w| w / label_total.max(1) as f32).collect();
    let mut losses = Vec::with_capacity(n.div_ceil(LOSS_CHUNK));
    let mut grad = Vec::with_capacity(n.div_ceil(LOSS_CHUNK));
    for start in (0..n).step_by(LOSS_CHUNK) {
        let c = LOSS_CHUNK.min(n - start);
        if coef[start..start + c].iter().all(|&w| w == 0.0) {
            // Only prompt or padding here: no loss, no gradient, no need for the logits.
            grad.push(Tensor::zeros([c, hidden], &device));
            continue;
        }
        let logits = linear_in_weight_dtype(h.clone().narrow(0, start, c), w.clone(), None);
        let (l, dlogits) = B::cross_entropy(prim(logits), &batch.targets[start..start + c], &coef[start..start + c], softcap);
        losses.push(float::<B, 1>(l));
        grad.push(linear_in_weight_dtype(float::<_, 2>(dlogits), w.clone().transpose(), None));
    }
    // The one read back of the loss: a GPU runs every chunk without waiting for the host.
    let loss = if losses.is_empty() { 0.0 } else { Tensor::cat(losses, 0).into_data().iter::<f64>().sum() };
    (Tensor::cat(grad, 0), loss)
}

/// The loss of one micro-batch and its gradient for every LoRA tensor, in [`lora_params`]
/// order.
///
/// With `activation_checkpointing`, the forward pass keeps only each decoder layer's input;
/// the backward pass then walks the layers from the last, recomputing each layer's forward
/// pass under autodiff and back-propagating the gradient that arrived at its output. Peak
/// memory holds one layer's activations instead of all of them, for one more forward pass of
/// the layers. LoRA dropout is seeded per projection, so the recomputation draws the same
/// masks, and the gradients are those of the plain pass.
pub fn loss_and_grads<B: AutodiffBackend<InnerBackend: Backend> + Backend>(
    model: &CausalLm<B>,
    batch: &Batch,
    label_total: usize,
    activation_checkpointing: bool,
    device: &B::Device,
) -> (f64, Vec<Tensor<B::InnerBackend, 2>>) {
    if !activation_checkpointing {
        let (surrogate, loss) = loss_for_backward(model, batch, label_total, device);
        let g = surrogate.backward();
        return (loss, lora_params(model).iter().map(|p| p.grad(&g).expect("LoRA tensors require grad")).collect());
    }

    // Forward without a graph, keeping each layer's input.
    let ropes = model.rope_tables(&batch.positions, batch.rows, device);
    let mask = batch_mask(batch, device);
    let ctx = Context { rows: batch.rows, ropes: &ropes, mask: &mask };
    let mut x = model.embed(token_tensor::<B>(&batch.ids, batch.rows, device), &batch.positions);
    let mut inputs = Vec::with_capacity(model.layers.len());
    for layer in &model.layers {
        inputs.push(x.clone());
        x = without_grad(layer).forward(x, &ctx, None);
    }
    // The head: final norm, lm_head and cross-entropy; the gradient arriving at the last layer.
    let x = x.detach().require_grad();
    let h = model.norm.forward(x.clone());
    let (dh, loss) = head_gradient(h.clone().inner(), model.lm_head_weight().inner(), model.config.final_softcap, batch, label_total);
    let g = (h * Tensor::from_inner(dh)).sum().backward();
    let mut dx = x.grad(&g).expect("the last layer's output requires grad");

    // The layers, last to first: recompute under autodiff, back-propagate dx.
    let mut per_layer = Vec::with_capacity(model.layers.len());
    for (i, (layer, input)) in model.layers.iter().zip(inputs).enumerate().rev() {
        // The embeddings are frozen: layer 0 needs no gradient for its input.
        let input = if i == 0 { input } else { input.detach().require_grad() };
        let out = layer.forward(input.clone(), &ctx, None);
        let g = (out * Tensor::from_inner(dx.clone())).sum().backward();
        let grads: Vec<_> = layer_lora_params(layer).map(|p| p.grad(&g).expect("LoRA tensors require grad")).collect();
        per_layer.push(grads);
        if i > 0 {
            dx = input.grad(&g).expect("the layer's input requires grad");
        }
    }
    (loss, per_layer.into_iter().rev().flatten().collect())
}

/// A copy of the layer whose adapters do not require gradients, so its forward pass records
/// no graph.
fn without_grad<B: AutodiffBackend + Backend>(layer: &Block<B>) -> Block<B> {
    let mut layer = layer.clone();
    layer.linears_mut().into_iter().filter_map(|p| p.adapter.as_mut()).for_each(LoraAdapter::untracked);
    layer
}

/// The model as evaluation sees it: the same tensors with adapters that do not require
/// gradients, so its forward pass records no graph and runs the inner backend's kernels (the
/// ones `tune eval` runs), and no dropout seed, so nothing is dropped.
pub fn for_eval<B: AutodiffBackend + Backend>(model: &CausalLm<B>) -> CausalLm<B> {
    let mut model = model.clone();
    for l in model.linears_mut().into_iter().filter_map(|p| p.adapter.as_mut()) {
        l.untracked();
        l.dropout_draw = None;
    }
    model
}

/// The trainable tensors, in a fixed order: layer by layer, for each adapted projection,
/// lora_A, lora_B and, with DoRA, the magnitude (`[1, out]`).
pub fn lora_params<B: Backend>(model: &CausalLm<B>) -> Vec<Tensor<B, 2>> {
    model.layers.iter().flat_map(layer_lora_params).cloned().collect()
}

/// One layer's part of [`lora_params`].
fn layer_lora_params<B: Backend>(layer: &Block<B>) -> impl Iterator<Item = &Tensor<B, 2>> {
    layer.linears().into_iter().filter_map(|p| p.adapter.as_ref()).flat_map(|l| [Some(&l.a), Some(&l.b), l.magnitude.as_ref()]).flatten()
}

pub(crate) fn set_lora_params<B: Backend>(model: &mut CausalLm<B>, params: Vec<Tensor<B, 2>>) {
    let mut it = params.into_iter();
    for p in model.linears_mut() {
        if let Some(l) = p.adapter.as_mut() {
            l.a = it.next().expect("one tensor per lora_A");
            l.b = it.next().expect("one tensor per lora_B");
            if l.magnitude.is_some() {
                l.magnitude = Some(it.next().expect("one tensor per lora_magnitude_vector"));
            }
        }
    }
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub loss: f32,
    pub grad_norm: f64,
    pub tokens: usize,
}

/// How one optimizer step runs, besides its batches.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    pub lr: f64,
    pub max_grad_norm: Option<f64>,
    /// Seeds LoRA dropout for this step.
    pub dropout_seed: u64,
    pub activation_checkpointing: bool,
}

/// One optimizer step over `batches` (the micro-batches of gradient accumulation): forward and
/// backward per micro-batch with gradients summed, global-norm clipping, AdamW. `tune bench`
/// times exactly this.
pub fn train_step<B: AutodiffBackend<InnerBackend: Backend> + Backend>(
    model: &mut CausalLm<B>,
    opt: &mut AdamW<B::InnerBackend>,
    batches: &[Batch],
    options: StepOptions,
    device: &B::Device,
) -> StepStats {
    let label_total: usize = batches.iter().map(Batch::label_count).sum();
    let (loss, grads) = shard_grads(model, batches, label_total, options, Shard::WHOLE, device);
    let grad_norm = apply_grads(model, opt, grads, options);
    StepStats { loss: loss as f32, grad_norm, tokens: batches.iter().map(|b| b.tokens).sum() }
}

/// The rows of every micro-batch one data-parallel replica holds: replica `index` of `count`
/// takes the `index`-th of `count` equal slices of each micro-batch's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// One device, every row.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };
}

/// The loss and the summed LoRA gradients (in [`lora_params`] order) of one shard of an
/// optimizer step's micro-batches, each scaled by the whole step's `label_total`, so that the
/// shards' losses and gradients add up to the step's.
pub fn shard_grads<B: AutodiffBackend<InnerBackend: Backend> + Backend>(
    model: &mut CausalLm<B>,
    batches: &[Batch],
    label_total: usize,
    options: StepOptions,
    shard: Shard,
    device: &B::Device,
) -> (f64, Vec<Tensor<B::InnerBackend, 2>>) {
    let mut grads: Option<Vec<Tensor<B::InnerBackend, 2>>> = None;
    let mut loss = 0f64;
    for (m, whole) in batches.iter().enumerate() {
        assert_eq!(whole.rows % shard.count, 0, "{} rows do not split into {} shards", whole.rows, shard.count);
        let rows = whole.rows / shard.count;
        let first_row = shard.index * rows;
        let sliced = (shard.count > 1).then(|| whole.rows(first_row, rows));
        let batch = sliced.as_ref().unwrap_or(whole);
        // A fresh dropout seed per micro-batch and projection, derived from the step's seed.
        for (i, p) in model.linears_mut().into_iter().enumerate() {
            if let Some(l) = p.adapter.as_mut() {
                let seed = crate::rng::Rng::new(options.dropout_seed ^ ((m as u64) << 32) ^ i as u64).next_u64();
                l.dropout_draw = Some(DropoutDraw { seed, first_row, rows });
            }
        }
        let (l, step) = loss_and_grads(model, batch, label_total, options.activation_checkpointing, device);
        loss += l;
        grads = Some(match grads {
            None => step,
            Some(acc) => acc.into_iter().zip(step).map(|(a, b)| a + b).collect(),
        });
    }
    for p in model.linears_mut() {
        if let Some(l) = p.adapter.as_mut() {
            l.dropout_draw = None;
        }
    }
    (loss, grads.unwrap_or_default())
}

/// The end of an optimizer step, once the step's gradients are summed: global-norm clipping and
/// AdamW on the LoRA tensors. Returns the gradient norm before clipping.
pub fn apply_grads<B: AutodiffBackend<InnerBackend: Backend> + Backend>(
    model: &mut CausalLm<B>,
    opt: &mut AdamW<B::InnerBackend>,
    grads: Vec<Tensor<B::InnerBackend, 2>>,
    options: StepOptions,
) -> f64 {
    let (grads, grad_norm) = clip_grad_norm(grads, options.max_grad_norm);
    let inner: Vec<_> = lora_params(model).into_iter().map(|p| p.inner()).collect();
    let updated = opt.update(inner, grads, options.lr);
    set_lora_params(model, updated.into_iter().map(|p| Tensor::from_inner(p).require_grad()).collect());
    grad_norm
}
