//! `tune run`: LoRA training. The loop is [`train`], one function, top to bottom; the pieces it
//! calls live beside it (data order, optimizer, schedule, metrics).

pub mod data;
pub mod metrics;
pub mod optimizer;
pub mod report;
pub mod schedule;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::Backend;
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::adapter::LoraConfig;
use crate::checkpoint;
use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::eval::token_nll;
use crate::hf::Tokenizer;
use crate::model::blocks::{Block, Context};
use crate::model::linear::linear_in_weight_dtype;
use crate::model::{self, token_tensor, AttentionMask, CausalLm, ModelConfig};
use crate::ops::{float, prim};
use crate::peft;
use crate::recipe::Recipe;
use data::{prepare, step_batches, Prepared};
use metrics::StepMetrics;
use optimizer::{clip_grad_norm, AdamW, AdamWConfig};

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
/// (the lm_head is frozen, so nothing else needs them).
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
    let mut loss = 0f64;
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
        loss += l;
        grad.push(linear_in_weight_dtype(float::<_, 2>(dlogits), w.clone().transpose(), None));
    }
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
/// no graph. (`detach` would not do: burn keeps a detached leaf's `require_grad`.)
fn without_grad<B: AutodiffBackend + Backend>(layer: &Block<B>) -> Block<B> {
    let mut layer = layer.clone();
    for p in layer.linears_mut() {
        if let Some(l) = p.adapter.as_mut() {
            l.a = Tensor::from_inner(l.a.clone().inner());
            l.b = Tensor::from_inner(l.b.clone().inner());
            l.magnitude = l.magnitude.take().map(|m| Tensor::from_inner(m.inner()));
        }
    }
    layer
}

/// The model as evaluation sees it: the same tensors with adapters that do not require
/// gradients, so its forward pass records no graph and runs the inner backend's kernels (the
/// ones `tune eval` runs), and no dropout seed, so nothing is dropped.
pub fn for_eval<B: AutodiffBackend + Backend>(model: &CausalLm<B>) -> CausalLm<B> {
    let mut model = model.clone();
    for p in model.linears_mut() {
        if let Some(l) = p.adapter.as_mut() {
            l.a = Tensor::from_inner(l.a.clone().inner());
            l.b = Tensor::from_inner(l.b.clone().inner());
            l.magnitude = l.magnitude.take().map(|m| Tensor::from_inner(m.inner()));
            l.dropout_seed = None;
        }
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

fn set_lora_params<B: Backend>(model: &mut CausalLm<B>, params: Vec<Tensor<B, 2>>) {
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
    let mut grads: Option<Vec<Tensor<B::InnerBackend, 2>>> = None;
    let mut loss = 0f64;
    let mut tokens = 0;
    for (m, batch) in batches.iter().enumerate() {
        // A fresh dropout seed per micro-batch and projection, derived from the step's seed.
        for (i, p) in model.linears_mut().into_iter().enumerate() {
            if let Some(l) = p.adapter.as_mut() {
                l.dropout_seed = Some(crate::rng::Rng::new(options.dropout_seed ^ ((m as u64) << 32) ^ i as u64).next_u64());
            }
        }
        tokens += batch.tokens;
        let (l, step) = loss_and_grads(model, batch, label_total, options.activation_checkpointing, device);
        loss += l;
        grads = Some(match grads {
            None => step,
            Some(acc) => acc.into_iter().zip(step).map(|(a, b)| a + b).collect(),
        });
    }
    for p in model.linears_mut() {
        if let Some(l) = p.adapter.as_mut() {
            l.dropout_seed = None;
        }
    }
    let (grads, grad_norm) = clip_grad_norm(grads.unwrap_or_default(), options.max_grad_norm);
    let inner: Vec<_> = lora_params(model).into_iter().map(|p| p.inner()).collect();
    let updated = opt.update(inner, grads, options.lr);
    set_lora_params(model, updated.into_iter().map(|p| Tensor::from_inner(p).require_grad()).collect());
    StepStats { loss: loss as f32, grad_norm, tokens }
}

/// Everything `tune run` and `tune validate` need before the first step.
pub struct Setup {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub data: Prepared,
    pub lora: LoraConfig,
    pub total_steps: usize,
}

/// What `lora.target_modules` asks for.
fn targets(recipe: &Recipe) -> peft::Targets<'_> {
    match &recipe.lora.target_modules {
        None => peft::Targets::Default,
        Some(t) => t.names().map_or(peft::Targets::AllLinear, peft::Targets::List),
    }
}

/// Checks the recipe against the model directory and the dataset, without loading weights.
pub fn setup(recipe: &Recipe, chat_date: crate::hf::ChatDate) -> Result<Setup> {
    recipe.device.check_available()?;
    let config = ModelConfig::from_model_dir(&recipe.model.path)?;
    let tokenizer = data::tokenizer(recipe, chat_date)?;
    let data = prepare(recipe, &tokenizer, config.eos_token_ids.first().copied())?;
    let lora = LoraConfig {
        rank: recipe.lora.rank,
        alpha: recipe.lora.alpha,
        dropout: recipe.lora.dropout,
        target_modules: peft::resolve_targets(targets(recipe), &config)?,
        use_rslora: recipe.lora.use_rslora,
        use_dora: recipe.lora.use_dora,
    };
    let t = &recipe.train;
    let per_step = t.batch_size * t.grad_accum;
    let total_steps = t.max_steps.unwrap_or_else(|| (t.epochs * data.rows.len()).div_ceil(per_step));
    Ok(Setup { config, tokenizer, data, lora, total_steps })
}

/// Loads the base model on the autodiff backend with LoRA attached: fresh, or from
/// `lora.init_from`. Only the adapters require gradients.
pub fn model_with_lora<B: AutodiffBackend<InnerBackend: Backend> + Backend>(
    recipe: &Recipe,
    setup: &mut Setup,
    device: &B::Device,
) -> Result<CausalLm<B>> {
    let opts = model::LoadOptions { dtype: recipe.base_dtype().float_dtype(), quantize: recipe.model.quantize };
    let mut model: CausalLm<B> = model::load_with(&recipe.model.path, device, &opts)?;
    match &recipe.lora.init_from {
        Some(dir) => {
            let loaded = peft::load_peft(&mut model, dir, device)?;
            // The adapter's own shape wins over the recipe's; dropout stays the recipe's.
            setup.lora = LoraConfig { dropout: recipe.lora.dropout, ..loaded };
            for p in model.linears_mut() {
                if let Some(l) = p.adapter.as_mut() {
                    l.dropout = recipe.lora.dropout;
                }
            }
        }
        None => peft::inject(&mut model, &setup.lora, recipe.train.seed, device),
    }
    let params = lora_params(&model).into_iter().map(Tensor::require_grad).collect();
    set_lora_params(&mut model, params);
    Ok(model)
}

/// Where a run's files go.
pub struct RunPaths {
    pub dir: PathBuf,
    pub metrics: PathBuf,
    pub adapter: PathBuf,
    pub report: PathBuf,
    pub recipe: PathBuf,
}

impl RunPaths {
    pub fn new(dir: &Path) -> Self {
        RunPaths {
            dir: dir.to_path_buf(),
            metrics: dir.join("metrics.jsonl"),
            adapter: dir.join("adapter"),
            report: dir.join("report.svg"),
            recipe: dir.join("recipe.yaml"),
        }
    }
}

/// Progress reporting and stop requests (Ctrl-C), kept out of the loop so tests and the CLI
/// can differ.
pub trait Observer {
    fn start(&mut self, _first_step: usize, _total_steps: usize) {}
    fn step(&mut self, _m: &StepMetrics) {}
    fn checkpoint(&mut self, _dir: &Path, _bytes: u64, _seconds: f64) {}
    /// A run continues from the checkpoint `dir`, after `step` of `total` steps.
    fn resumed(&mut self, _dir: &Path, _step: usize, _total: usize) {}
    /// The dataset as read, before the first step: its sources, and how many records were
    /// truncated or skipped (no labelled token left after truncation).
    fn dataset(&mut self, _data: &Prepared) {}
    /// After each evaluation (before `step` reports the same step): the report, and where the
    /// evaluations stand with it counted (best so far, patience used).
    fn eval(&mut self, _step: usize, _report: &crate::eval::EvalReport, _state: &checkpoint::EvalState) {}
    /// The run ends before its last step, after `step`, for `reason` (early stopping).
    fn stopped_early(&mut self, _step: usize, _reason: &str) {}
    /// Checked after every optimizer step: true finishes that step, saves and returns.
    fn should_stop(&self) -> bool {
        false
    }
    fn finish(&mut self) {}
}

impl Observer for () {}

pub struct Summary {
    pub steps: usize,
    pub final_loss: f32,
    pub tokens: usize,
    pub elapsed_s: f64,
    /// Set when a stop request ended the run early: the checkpoint to resume from.
    pub interrupted: Option<PathBuf>,
    /// Set when early stopping ended the run: why.
    pub stopped_early: Option<String>,
    /// Where the evaluations ended, when the run has an eval set.
    pub eval: Option<checkpoint::EvalState>,
}

/// How `tune run` treats an existing run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Refuse a directory that already holds a run.
    Fresh,
    /// Delete what a previous run left, then start fresh.
    Overwrite,
    /// Continue from the latest complete checkpoint (None) or the given one.
    Resume(Option<PathBuf>),
}

/// Recipe keys that may differ between the run that wrote a checkpoint and the one resuming it;
/// any other difference changes the run (model, LoRA, data, batches, schedule, seed) and is
/// refused.
pub const RESUMABLE_CHANGES: &[&str] = &[
    "device",
    "train.activation_checkpointing",
    "output.dir",
    "output.save_every",
    "output.keep_last",
    "output.export",
    "output.export_dtype",
];

/// The keys whose values differ between two recipes, except those that may change on resume.
pub fn breaking_changes(old: &Recipe, new: &Recipe) -> Vec<String> {
    let flat = |r: &Recipe| {
        let mut out = std::collections::BTreeMap::new();
        flatten("", &serde_yaml::to_value(r).expect("recipes serialise"), &mut out);
        out
    };
    let (a, b) = (flat(old), flat(new));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .filter(|k| !RESUMABLE_CHANGES.iter().any(|r| k == r || k.starts_with(&format!("{r}."))))
        .cloned()
        .collect()
}

fn flatten(prefix: &str, v: &serde_yaml::Value, out: &mut std::collections::BTreeMap<String, String>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().unwrap_or_default();
                let key = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), serde_yaml::to_string(other).unwrap_or_default());
        }
    }
}

/// The training loop.
pub fn train<B: Backend>(recipe: &Recipe, start: Start, observer: &mut dyn Observer) -> Result<Summary>
where
    B::Device: Default,
{
    let device = B::Device::default();
    let chat_date = data::chat_date(recipe, &start);
    let mut setup = setup(recipe, chat_date)?;
    let paths = RunPaths::new(&recipe.output.dir);
    let recipe_yaml = recipe.to_yaml();
    let dataset_hash = data::dataset_fingerprint(recipe)?;
    observer.dataset(&setup.data);
    let eval_dataset_hash = recipe.dataset.eval_path.as_deref().map(checkpoint::file_fingerprint).transpose()?;

    // 0. The run directory: fresh, overwritten, or resumed from a checkpoint.
    let resume_from = prepare_run_dir(&paths, &start)?;
    std::fs::create_dir_all(&paths.dir).map_err(|e| Error::io(&paths.dir, e))?;

    // 1. The frozen base model with LoRA adapters, and AdamW over the adapters only.
    let mut model: CausalLm<Autodiff<B>> = model_with_lora(recipe, &mut setup, &device)?;
    let t = &recipe.train;
    let adamw = AdamWConfig { betas: t.betas, eps: t.eps, weight_decay: t.weight_decay };
    let inner: Vec<_> = lora_params(&model).into_iter().map(|p| p.inner()).collect();
    let mut opt = AdamW::new(adamw, &inner);
    drop(inner);
    let (first_step, elapsed_before, mut history) = match &resume_from {
        None => {
            crate::fsutil::write_atomically(&paths.recipe, recipe_yaml.as_bytes())?;
            let _ = std::fs::remove_file(&paths.metrics);
            (0, 0.0, Vec::new())
        }
        Some(found) => {
            let resumed = resume(recipe, &dataset_hash, eval_dataset_hash.as_deref(), found, &mut model, &mut opt, &paths, &device)?;
            observer.resumed(&found.dir, resumed.0, found.state.total_steps);
            resumed
        }
    };
    // The evaluations: on the eval set, in windows of the training's sequence length (within
    // the model's context), with the state a resumed run left them in.
    let eval_set = setup.data.eval.take();
    let window = crate::eval::Window::new(recipe.dataset.max_seq_len.min(setup.config.max_position_embeddings), None)?;
    let mut eval_state = match (&eval_set, &resume_from) {
        (None, _) => None,
        (Some(_), Some(found)) => Some(found.state.eval.clone().unwrap_or_else(|| checkpoint::EvalState::new(t.eval_every))),
        (Some(_), None) => Some(checkpoint::EvalState::new(t.eval_every)),
    };
    let early_stop_reason = |state: &checkpoint::EvalState| -> Option<String> {
        let patience = t.early_stopping_patience?;
        (state.bad_evals >= patience).then(|| {
            format!(
                "early stopping: {patience} evaluation{} in a row without improving on the best eval loss {:.6} (step {})",
                if patience == 1 { "" } else { "s" },
                state.best_loss.unwrap_or(f64::NAN),
                state.best_step.unwrap_or(0)
            )
        })
    };

    // 2. Steps: batch_size × grad_accum rows each, in seeded order, lr from the schedule.
    let mut order = setup.data.order(recipe.dataset.shuffle, t.seed);
    let total = setup.total_steps;
    let per_step = t.batch_size * t.grad_accum;
    let started = Instant::now();
    let mut tokens_seen = 0;
    let base = recipe.model.path.to_string_lossy().into_owned();
    let state_at = |opt: &AdamW<B>, step: usize, elapsed_s: f64, eval: Option<&checkpoint::EvalState>| checkpoint::TrainerState {
        format_version: checkpoint::FORMAT_VERSION,
        tune_version: env!("CARGO_PKG_VERSION").to_string(),
        step,
        total_steps: total,
        epoch: (step * per_step) as f64 / setup.data.rows.len() as f64,
        stream_position: step * per_step,
        seed: t.seed,
        adam_step: opt.step,
        elapsed_s,
        recipe_hash: checkpoint::fingerprint(recipe_yaml.as_bytes()),
        dataset_hash: dataset_hash.clone(),
        chat_date: Some(chat_date),
        eval_dataset_hash: eval_dataset_hash.clone(),
        eval: eval.cloned(),
    };
    let save = |model: &CausalLm<Autodiff<B>>, opt: &AdamW<B>, state: &checkpoint::TrainerState| -> Result<PathBuf> {
        let dir = checkpoint::save(&paths.dir, model, &setup.lora, &base, opt, state, &recipe_yaml, setup.data.chat_template.as_deref())?;
        // Older checkpoints go only once the new one is complete.
        checkpoint::prune(&paths.dir, recipe.output.keep_last)?;
        Ok(dir)
    };
    let title = format!("tune run — {}", recipe.model.path.file_name().unwrap_or_default().to_string_lossy());
    observer.start(first_step, total);
    let mut interrupted = None;
    // A run that early stopping ended stays ended when resumed.
    let mut stopped_early = eval_state.as_ref().and_then(|s| s.stopped_early.then(|| early_stop_reason(s)).flatten());
    let last = if stopped_early.is_some() { first_step } else { total };
    for step in first_step..last {
        let step_start = Instant::now();
        let batches = step_batches(&setup.data, &mut order, step, t.batch_size, t.grad_accum);
        let lr = schedule::lr_at(step, total, t.warmup_steps, t.lr, t.schedule);
        let dropout_seed = crate::rng::Rng::new(t.seed ^ 0xD50F ^ (step as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)).next_u64();
        let options =
            StepOptions { lr, max_grad_norm: t.max_grad_norm, dropout_seed, activation_checkpointing: t.activation_checkpointing };
        let stats = train_step(&mut model, &mut opt, &batches, options, &device);
        if !stats.loss.is_finite() {
            return Err(Error::Unsupported(format!(
                "step {}: loss is {} — lower train.lr or set train.max_grad_norm",
                step + 1,
                stats.loss
            )));
        }
        tokens_seen += stats.tokens;
        let elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        let tokens_per_s = stats.tokens as f64 / step_start.elapsed().as_secs_f64();
        let done = step + 1;
        // Evaluate after the update, before anything is saved, so that the checkpoint of this
        // step holds the evaluation's outcome.
        let mut improved = false;
        let mut eval_loss = None;
        if let (Some(set), Some(state)) = (&eval_set, eval_state.as_mut()) {
            if state.due(done, total) {
                let report = crate::eval::evaluate_examples(&for_eval(&model), &set.examples, Some(window), &device);
                improved = state.record(done, report.loss);
                eval_loss = Some(report.loss);
                observer.eval(done, &report, state);
                if done < total {
                    stopped_early = early_stop_reason(state);
                    state.stopped_early = stopped_early.is_some();
                }
            }
        }
        let m = StepMetrics {
            step: done,
            epoch: (done * per_step) as f64 / setup.data.rows.len() as f64,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens: stats.tokens,
            tokens_per_s,
            elapsed_s,
            eval_loss,
        };
        metrics::append(&paths.metrics, &m)?;
        observer.step(&m);
        history.push(m);
        let state = state_at(&opt, done, elapsed_s, eval_state.as_ref());
        if improved && recipe.output.save_best {
            let saving = Instant::now();
            let dir = checkpoint::best_dir(&paths.dir);
            checkpoint::save_to(&dir, &model, &setup.lora, &base, &opt, &state, &recipe_yaml, setup.data.chat_template.as_deref())?;
            observer.checkpoint(&dir, checkpoint::size_bytes(&dir), saving.elapsed().as_secs_f64());
        }
        let periodic = recipe.output.save_every > 0 && done % recipe.output.save_every == 0;
        if done == total || periodic || observer.should_stop() || stopped_early.is_some() {
            let saving = Instant::now();
            let dir = save(&model, &opt, &state)?;
            // Redrawn with each checkpoint from the whole history (on resume, the steps before
            // it too), so the report covers what the run can be resumed from.
            report::write(&paths.report, &history, &title)?;
            observer.checkpoint(&dir, checkpoint::size_bytes(&dir), saving.elapsed().as_secs_f64());
            if let Some(reason) = &stopped_early {
                observer.stopped_early(done, reason);
                break;
            }
            if done < total && observer.should_stop() {
                interrupted = Some(dir);
                break;
            }
        }
    }
    observer.finish();

    // 3. What the run leaves: the adapter in PEFT layout (the report is written with the last
    // checkpoint).
    if interrupted.is_none() {
        peft::save_peft(&model, &setup.lora, &base, &paths.adapter)?;
        crate::hf::adapter_template::write(&paths.adapter, setup.data.chat_template.as_deref())?;
    }
    Ok(Summary {
        steps: history.last().map_or(0, |m| m.step),
        final_loss: history.last().map_or(f32::NAN, |m| m.loss),
        tokens: tokens_seen,
        elapsed_s: started.elapsed().as_secs_f64(),
        interrupted,
        stopped_early,
        eval: eval_state,
    })
}

/// Applies the `Start` policy to the run directory; returns the checkpoint to resume from.
fn prepare_run_dir(paths: &RunPaths, start: &Start) -> Result<Option<checkpoint::Found>> {
    let has_run = paths.metrics.exists() || checkpoint::any(&paths.dir);
    match start {
        Start::Fresh if has_run => Err(Error::Unsupported(format!(
            "{} already holds a run; continue it with `tune run RECIPE --resume`, or replace it with --overwrite",
            paths.dir.display()
        ))),
        Start::Fresh => Ok(None),
        Start::Overwrite => {
            for p in [&paths.metrics, &paths.report, &paths.recipe] {
                let _ = std::fs::remove_file(p);
            }
            for d in [checkpoint::checkpoints_dir(&paths.dir), paths.adapter.clone(), paths.dir.join("export")] {
                if d.exists() {
                    std::fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
                }
            }
            Ok(None)
        }
        Start::Resume(Some(dir)) => checkpoint::open(dir).map(Some),
        Start::Resume(None) => match checkpoint::list(&paths.dir).pop() {
            Some(found) => Ok(Some(found)),
            None => {
                Err(Error::Model(format!("{}: no complete checkpoint to resume from", checkpoint::checkpoints_dir(&paths.dir).display())))
            }
        },
    }
}

/// Loads a checkpoint's adapter and optimizer state after checking the recipe and dataset are
/// the ones it was written with; trims metrics.jsonl to the checkpoint's step.
#[allow(clippy::type_complexity)]
#[allow(clippy::too_many_arguments)]
fn resume<B: Backend>(
    recipe: &Recipe,
    dataset_hash: &str,
    eval_dataset_hash: Option<&str>,
    found: &checkpoint::Found,
    model: &mut CausalLm<Autodiff<B>>,
    opt: &mut AdamW<B>,
    paths: &RunPaths,
    device: &B::Device,
) -> Result<(usize, f64, Vec<StepMetrics>)> {
    let saved = Recipe::load(&found.dir.join("recipe.yaml"), &[])?;
    let changed = breaking_changes(&saved, recipe);
    if !changed.is_empty() {
        return Err(Error::Unsupported(format!(
            "cannot resume {}: the recipe changed in keys that change the run: {} (only {} may change)",
            found.dir.display(),
            changed.join(", "),
            RESUMABLE_CHANGES.join(", ")
        )));
    }
    if found.state.dataset_hash != dataset_hash {
        return Err(Error::Unsupported(format!(
            "cannot resume {}: the content of the dataset ({}) changed since the checkpoint",
            found.dir.display(),
            recipe.dataset.sources().iter().map(|s| s.path.display().to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    if found.state.eval_dataset_hash.as_deref() != eval_dataset_hash {
        return Err(Error::Unsupported(format!(
            "cannot resume {}: the content of dataset.eval_path ({}) changed since the checkpoint",
            found.dir.display(),
            recipe.dataset.eval_path.as_deref().unwrap_or(Path::new("none")).display()
        )));
    }
    peft::load_peft(model, &found.dir.join("adapter"), device)?;
    let params: Vec<_> = lora_params(model).into_iter().map(Tensor::require_grad).collect();
    set_lora_params(model, params);
    checkpoint::load_optimizer(&found.dir, model, opt, found.state.adam_step, device)?;
    // Steps after the checkpoint (written before a crash) are dropped: they will run again.
    let step = found.state.step;
    let history: Vec<StepMetrics> =
        if paths.metrics.exists() { metrics::read(&paths.metrics)?.into_iter().filter(|m| m.step <= step).collect() } else { Vec::new() };
    if history.len() != step {
        return Err(Error::Model(format!(
            "{}: has {} of the {step} steps before the checkpoint; cannot continue it exactly",
            paths.metrics.display(),
            history.len()
        )));
    }
    let text: String = history.iter().map(|m| serde_json::to_string(m).expect("json") + "\n").collect();
    crate::fsutil::write_atomically(&paths.metrics, text.as_bytes())?;
    Ok((step, found.state.elapsed_s, history))
}
