//! `tune run`: LoRA training. The loop is [`train`], one function, top to bottom; the pieces it
//! calls live beside it (data order, optimizer, schedule, metrics).

pub mod data;
pub mod metrics;
pub mod optimizer;
pub mod schedule;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::eval::token_nll;
use crate::hf::Tokenizer;
use crate::lora::{self, LoraConfig};
use crate::model::layers::token_tensor;
use crate::model::{self, AttentionMask, Llama, ModelConfig};
use crate::recipe::Recipe;
use data::{prepare, step_batches, Order, Prepared};
use metrics::StepMetrics;
use optimizer::{clip_grad_norm, AdamW, AdamWConfig};

/// Loss of one micro-batch: the sum of the labelled tokens' losses divided by `label_total`,
/// the number of labelled tokens in the whole optimizer step, so that summing micro-batches
/// gives the step's mean (not a mean of micro-batch means).
pub fn batch_loss<B: Backend>(model: &Llama<B>, batch: &Batch, label_total: usize, device: &B::Device) -> Tensor<B, 1> {
    let (rows, seq, hidden) = (batch.rows, batch.seq, model.config.hidden_size);
    let window = model.config.sliding_window;
    let mask = match &batch.segments {
        Some(segments) => AttentionMask::packed(segments, seq, window, device),
        None => AttentionMask::causal(seq, 0, window, device),
    };
    let h = model.forward_hidden(token_tensor::<B>(&batch.ids, rows, device), &batch.positions, &mask, None);
    let logits = model.lm_head(h.reshape([rows * seq, hidden]));
    let targets: Vec<i64> = batch.targets.iter().map(|&t| t as i64).collect();
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [rows * seq]), device);
    let weights = Tensor::<B, 1>::from_data(TensorData::new(batch.weights.clone(), [rows * seq]), device);
    (token_nll(logits, targets) * weights).sum() / label_total.max(1) as f64
}

/// The trainable tensors, in a fixed order: for each adapted projection, lora_A then lora_B.
pub fn lora_params<B: Backend>(model: &Llama<B>) -> Vec<Tensor<B, 2>> {
    model
        .projections()
        .iter()
        .filter_map(|p| p.lora.as_ref())
        .flat_map(|l| [l.a.clone(), l.b.clone()])
        .collect()
}

fn set_lora_params<B: Backend>(model: &mut Llama<B>, params: Vec<Tensor<B, 2>>) {
    let mut it = params.into_iter();
    for p in model.projections_mut() {
        if let Some(l) = p.lora.as_mut() {
            l.a = it.next().expect("one tensor per lora_A");
            l.b = it.next().expect("one tensor per lora_B");
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

/// One optimizer step over `batches` (the micro-batches of gradient accumulation): forward and
/// backward per micro-batch with gradients summed, global-norm clipping, AdamW. `tune bench`
/// times exactly this.
pub fn train_step<B: AutodiffBackend>(
    model: &mut Llama<B>,
    opt: &mut AdamW<B::InnerBackend>,
    batches: &[Batch],
    lr: f64,
    max_grad_norm: Option<f64>,
    dropout_seed: u64,
    device: &B::Device,
) -> StepStats {
    let label_total: usize = batches.iter().map(Batch::label_count).sum();
    let params = lora_params(model);
    let mut grads: Option<Vec<Tensor<B::InnerBackend, 2>>> = None;
    let mut loss = 0f64;
    let mut tokens = 0;
    for (m, batch) in batches.iter().enumerate() {
        // A fresh dropout seed per micro-batch and projection, derived from the step's seed.
        for (i, p) in model.projections_mut().into_iter().enumerate() {
            if let Some(l) = p.lora.as_mut() {
                l.dropout_seed = Some(crate::rng::Rng::new(dropout_seed ^ ((m as u64) << 32) ^ i as u64).next_u64());
            }
        }
        tokens += batch.tokens;
        let l = batch_loss(model, batch, label_total, device);
        loss += l.clone().into_scalar().elem::<f64>();
        let g = l.backward();
        let step: Vec<_> = params.iter().map(|p| p.grad(&g).expect("LoRA tensors require grad")).collect();
        grads = Some(match grads {
            None => step,
            Some(acc) => acc.into_iter().zip(step).map(|(a, b)| a + b).collect(),
        });
    }
    for p in model.projections_mut() {
        if let Some(l) = p.lora.as_mut() {
            l.dropout_seed = None;
        }
    }
    let (grads, grad_norm) = clip_grad_norm(grads.unwrap_or_default(), max_grad_norm);
    let inner: Vec<_> = params.into_iter().map(|p| p.inner()).collect();
    let updated = opt.update(inner, grads, lr);
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

/// Checks the recipe against the model directory and the dataset, without loading weights.
pub fn setup(recipe: &Recipe) -> Result<Setup> {
    recipe.device.check_available()?;
    let config = ModelConfig::from_model_dir(&recipe.model.path)?;
    let tokenizer = Tokenizer::from_model_dir(&recipe.model.path)?;
    let data = prepare(recipe, &tokenizer, config.eos_token_ids.first().copied())?;
    let lora = LoraConfig {
        rank: recipe.lora.rank,
        alpha: recipe.lora.alpha,
        dropout: recipe.lora.dropout,
        target_modules: recipe.lora.target_modules.resolve()?,
        use_rslora: recipe.lora.use_rslora,
    };
    let t = &recipe.train;
    let per_step = t.batch_size * t.grad_accum;
    let total_steps = t.max_steps.unwrap_or_else(|| (t.epochs * data.rows.len()).div_ceil(per_step));
    Ok(Setup { config, tokenizer, data, lora, total_steps })
}

/// Loads the base model on the autodiff backend with LoRA attached: fresh, or from
/// `lora.init_from`. Only the adapters require gradients.
pub fn model_with_lora<B: AutodiffBackend>(recipe: &Recipe, setup: &mut Setup, device: &B::Device) -> Result<Llama<B>> {
    let mut model: Llama<B> = model::load(&recipe.model.path, device)?;
    match &recipe.lora.init_from {
        Some(dir) => {
            let loaded = lora::load_peft(&mut model, dir, device)?;
            // The adapter's own shape wins over the recipe's; dropout stays the recipe's.
            setup.lora = LoraConfig { dropout: recipe.lora.dropout, ..loaded };
            for p in model.projections_mut() {
                if let Some(l) = p.lora.as_mut() {
                    l.dropout = recipe.lora.dropout;
                }
            }
        }
        None => lora::inject(&mut model, &setup.lora, recipe.train.seed, device),
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
    pub plot: PathBuf,
    pub recipe: PathBuf,
}

impl RunPaths {
    pub fn new(dir: &Path) -> Self {
        RunPaths {
            dir: dir.to_path_buf(),
            metrics: dir.join("metrics.jsonl"),
            adapter: dir.join("adapter"),
            plot: dir.join("loss.svg"),
            recipe: dir.join("recipe.yaml"),
        }
    }
}

/// Progress reporting, kept out of the loop so tests and the CLI can differ.
pub trait Observer {
    fn start(&mut self, _total_steps: usize) {}
    fn step(&mut self, _m: &StepMetrics) {}
    fn finish(&mut self) {}
}

impl Observer for () {}

pub struct Summary {
    pub steps: usize,
    pub final_loss: f32,
    pub tokens: usize,
    pub elapsed_s: f64,
}

/// The training loop.
pub fn train<B: Backend>(recipe: &Recipe, overwrite: bool, observer: &mut dyn Observer) -> Result<Summary>
where
    B::Device: Default,
{
    let device = B::Device::default();
    let mut setup = setup(recipe)?;
    let paths = RunPaths::new(&recipe.output.dir);
    if paths.metrics.exists() && !overwrite {
        return Err(Error::Unsupported(format!(
            "{} already holds a run (metrics.jsonl); pass --overwrite to replace it, or choose another output.dir",
            paths.dir.display()
        )));
    }
    std::fs::create_dir_all(&paths.dir).map_err(|e| Error::io(&paths.dir, e))?;
    let _ = std::fs::remove_file(&paths.metrics);
    crate::fsutil::write_atomically(&paths.recipe, recipe.to_yaml().as_bytes())?;

    // 1. The frozen base model with LoRA adapters, and AdamW over the adapters only.
    let mut model: Llama<Autodiff<B>> = model_with_lora(recipe, &mut setup, &device)?;
    let t = &recipe.train;
    let adamw = AdamWConfig { betas: t.betas, eps: t.eps, weight_decay: t.weight_decay };
    let inner: Vec<_> = lora_params(&model).into_iter().map(|p| p.inner()).collect();
    let mut opt = AdamW::new(adamw, &inner);
    drop(inner);

    // 2. Steps: batch_size × grad_accum rows each, in seeded order, lr from the schedule.
    let mut order = Order::new(setup.data.rows.len(), recipe.dataset.shuffle, t.seed);
    let total = setup.total_steps;
    let per_step = t.batch_size * t.grad_accum;
    let started = Instant::now();
    let mut history = Vec::with_capacity(total);
    let mut tokens_seen = 0;
    observer.start(total);
    for step in 0..total {
        let step_start = Instant::now();
        let batches = step_batches(&setup.data, &mut order, step, t.batch_size, t.grad_accum);
        let lr = schedule::lr_at(step, total, t.warmup_steps, t.lr, t.schedule);
        let dropout_seed = crate::rng::Rng::new(t.seed ^ 0xD50F ^ (step as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)).next_u64();
        let stats = train_step(&mut model, &mut opt, &batches, lr, t.max_grad_norm, dropout_seed, &device);
        if !stats.loss.is_finite() {
            return Err(Error::Unsupported(format!(
                "step {}: loss is {} — lower train.lr or set train.max_grad_norm",
                step + 1,
                stats.loss
            )));
        }
        tokens_seen += stats.tokens;
        let m = StepMetrics {
            step: step + 1,
            epoch: ((step + 1) * per_step) as f64 / setup.data.rows.len() as f64,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens: stats.tokens,
            tokens_per_s: stats.tokens as f64 / step_start.elapsed().as_secs_f64(),
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        metrics::append(&paths.metrics, &m)?;
        observer.step(&m);
        history.push(m);
    }
    observer.finish();

    // 3. What the run leaves: the adapter in PEFT layout and the loss curve.
    let base = recipe.model.path.to_string_lossy().into_owned();
    lora::save_peft(&model, &setup.lora, &base, &paths.adapter)?;
    let title = format!("tune run — {}", recipe.model.path.file_name().unwrap_or_default().to_string_lossy());
    crate::fsutil::write_atomically(&paths.plot, metrics::loss_svg(&history, &title).as_bytes())?;
    Ok(Summary {
        steps: total,
        final_loss: history.last().map_or(f32::NAN, |m| m.loss),
        tokens: tokens_seen,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}
