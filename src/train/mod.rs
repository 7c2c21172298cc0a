//! `tune run`: LoRA training. The loop is [`train`], one function, top to bottom; the pieces it
//! calls live beside it (data order, one optimizer step, optimizer, schedule, metrics, data
//! parallel).

pub mod checkpoint;
pub mod data;
pub mod metrics;
pub mod nodes;
pub mod optimizer;
pub mod parallel;
pub mod report;
pub mod schedule;
pub mod step;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::Backend;
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::adapter::LoraConfig;
use crate::error::{Error, Result};
use crate::hf::Tokenizer;
use crate::model::{self, CausalLm, ModelConfig};
use crate::peft;
use crate::recipe::Recipe;
use data::{prepare, step_batches, Prepared};
use metrics::StepMetrics;
use optimizer::{AdamW, AdamWConfig};
use step::set_lora_params;
pub use step::{
    apply_grads, batch_loss, for_eval, lora_params, loss_and_grads, loss_for_backward, shard_grads, train_step, Shard, StepOptions,
    StepStats, LOSS_CHUNK,
};

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

/// A data-parallel replica on another device than the training loop's: the same base and
/// adapter layout (its LoRA values come from the training loop's before every step).
fn replica_on<B: Backend>(recipe: &Recipe, lora: &LoraConfig, device: &B::Device) -> Result<CausalLm<Autodiff<B>>> {
    let opts = model::LoadOptions { dtype: recipe.base_dtype().float_dtype(), quantize: recipe.model.quantize };
    let mut model: CausalLm<Autodiff<B>> = model::load_with(&recipe.model.path, device, &opts)?;
    peft::inject(&mut model, lora, recipe.train.seed, device);
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
    /// A resume passed over a damaged or partial checkpoint (an interrupted save), for `why`.
    fn skipped_checkpoint(&mut self, _why: &Error) {}
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
    "train.devices",
    "train.nodes",
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
    let mut differ = differing_keys(&flat(old), &flat(new));
    differ.retain(|k| !under(k, RESUMABLE_CHANGES));
    differ
}

/// The keys whose values differ between two flattened recipes (a key missing on one side
/// differs), in key order.
fn differing_keys(a: &std::collections::BTreeMap<String, String>, b: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).cloned().collect()
}

/// Recipe keys naming files, which may sit at other paths on other machines (the data's and
/// the model's config.json are compared by fingerprint instead; the weights are not compared).
const MACHINE_PATHS: &[&str] = &["model.path", "dataset.path", "dataset.eval_path", "lora.init_from"];

/// The recipe's keys that decide what a run trains, with their values: what every node of a
/// run over several nodes must agree on. Each of dataset.sources counts without its path.
fn run_keys(recipe: &Recipe) -> std::collections::BTreeMap<String, String> {
    let mut value = serde_yaml::to_value(recipe).expect("recipes serialise");
    if let Some(serde_yaml::Value::Sequence(sources)) = value.get_mut("dataset").and_then(|d| d.get_mut("sources")) {
        for source in sources.iter_mut().filter_map(serde_yaml::Value::as_mapping_mut) {
            source.remove("path");
        }
    }
    let mut out = std::collections::BTreeMap::new();
    flatten("", &value, &mut out);
    out.retain(|k, _| !under(k, RESUMABLE_CHANGES) && !under(k, MACHINE_PATHS));
    out
}

/// Whether the flattened recipe key `key` is one of `roots` or lies within one.
fn under(key: &str, roots: &[&str]) -> bool {
    roots.iter().any(|r| key == *r || key.strip_prefix(r).is_some_and(|rest| rest.starts_with('.')))
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
    // The first of train.devices runs the loop; data-parallel replicas take the others.
    let devices: Vec<B::Device> = match recipe.train.devices.indices().as_slice() {
        [0] => vec![B::Device::default()],
        indices => indices.iter().map(|&i| crate::backend::device_at::<B>(i)).collect(),
    };
    let device = devices[0].clone();
    let chat_date = data::chat_date(recipe, &start);
    let mut setup = setup(recipe, chat_date)?;
    let paths = RunPaths::new(&recipe.output.dir);
    let recipe_yaml = recipe.to_yaml();
    let dataset_hash = data::dataset_fingerprint(recipe)?;
    observer.dataset(&setup.data);
    let eval_dataset_hash = recipe.dataset.eval_path.as_deref().map(checkpoint::file_fingerprint).transpose()?;

    // 0. The run directory: fresh, overwritten, or resumed from a checkpoint.
    let (resume_from, skipped) = prepare_run_dir(&paths, &start)?;
    std::fs::create_dir_all(&paths.dir).map_err(|e| Error::io(&paths.dir, e))?;

    // 1. The frozen base model with LoRA adapters, and AdamW over the adapters only.
    let mut model: CausalLm<Autodiff<B>> = model_with_lora(recipe, &mut setup, &device)?;
    let t = &recipe.train;
    let adamw = AdamWConfig { betas: t.betas, eps: t.eps, weight_decay: t.weight_decay };
    let inner: Vec<_> = lora_params(&model).into_iter().map(|p| p.inner()).collect();
    let mut opt = AdamW::new(adamw, &inner);
    drop(inner);
    // Data parallel: replicas on this node's other devices and, over several nodes, the link to
    // the others, which checks that every node trains this run from this step before this run
    // writes anything (`--overwrite` has cleared the old run already).
    let run = t.nodes.as_ref().map(|_| nodes::RunIdentity {
        keys: run_keys(recipe),
        dataset: dataset_hash.clone(),
        eval_dataset: eval_dataset_hash.clone(),
        model_config: checkpoint::file_fingerprint(&recipe.model.path.join("config.json")).unwrap_or_default(),
        first_step: resume_from.as_ref().map_or(0, |found| found.state.step),
    });
    let mut replicas = match (devices.len(), t.nodes.as_ref().zip(run.as_ref())) {
        (1, None) => None,
        (_, nodes) => Some(parallel::Replicas::start(&model, &devices, nodes, |d| replica_on(recipe, &setup.lora, d))?),
    };
    let (first_step, elapsed_before, mut history) = match &resume_from {
        None => {
            crate::fsutil::write_atomically(&paths.recipe, recipe_yaml.as_bytes())?;
            let _ = std::fs::remove_file(&paths.metrics);
            (0, 0.0, Vec::new())
        }
        Some(found) => {
            let resumed = resume(recipe, &dataset_hash, eval_dataset_hash.as_deref(), found, &mut model, &mut opt, &paths, &device)?;
            for why in &skipped {
                observer.skipped_checkpoint(why);
            }
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
        let stats = match replicas.as_mut() {
            None => train_step(&mut model, &mut opt, &batches, options, &device),
            Some(r) => r.train_step(&mut model, &mut opt, &batches, options, &device)?,
        };
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
        // Asked after the step is reported (an observer may count steps). Over several nodes,
        // every node stops after the same step: where any was interrupted or stopped early, all
        // save this step and stop, so that a run can be resumed from a step every node has.
        let mut stop_requested = observer.should_stop();
        if let Some(r) = replicas.as_mut() {
            if let Some([stop, early]) = r.agree_across_nodes([stop_requested, stopped_early.is_some()])? {
                stop_requested = stop;
                if early && stopped_early.is_none() && done < total {
                    stopped_early = Some(format!("early stopping: another node's evaluation stopped the run after step {done}"));
                    if let Some(state) = eval_state.as_mut() {
                        state.stopped_early = true;
                    }
                }
            }
        }
        let state = state_at(&opt, done, elapsed_s, eval_state.as_ref());
        if improved && recipe.output.save_best {
            let saving = Instant::now();
            let dir = checkpoint::best_dir(&paths.dir);
            checkpoint::save_to(&dir, &model, &setup.lora, &base, &opt, &state, &recipe_yaml, setup.data.chat_template.as_deref())?;
            observer.checkpoint(&dir, checkpoint::size_bytes(&dir), saving.elapsed().as_secs_f64());
        }
        let periodic = recipe.output.save_every > 0 && done % recipe.output.save_every == 0;
        if done == total || periodic || stop_requested || stopped_early.is_some() {
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
            if done < total && stop_requested {
                interrupted = Some(dir);
                break;
            }
        }
    }
    observer.finish();
    if let Some(r) = replicas.take() {
        r.finish();
    }

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

/// Applies the `Start` policy to the run directory; returns the checkpoint to resume from and,
/// when that is the latest complete one, the damaged checkpoints the search passed over.
fn prepare_run_dir(paths: &RunPaths, start: &Start) -> Result<(Option<checkpoint::Found>, Vec<Error>)> {
    let has_run = paths.metrics.exists() || checkpoint::any(&paths.dir);
    match start {
        Start::Fresh if has_run => Err(Error::Unsupported(format!(
            "{} already holds a run; continue it with `tune run RECIPE --resume`, or replace it with --overwrite",
            paths.dir.display()
        ))),
        Start::Fresh => Ok((None, Vec::new())),
        Start::Overwrite => {
            for p in [&paths.metrics, &paths.report, &paths.recipe] {
                let _ = std::fs::remove_file(p);
            }
            for d in [checkpoint::checkpoints_dir(&paths.dir), paths.adapter.clone(), paths.dir.join("export")] {
                if d.exists() {
                    std::fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
                }
            }
            Ok((None, Vec::new()))
        }
        Start::Resume(Some(dir)) => Ok((Some(checkpoint::open(dir)?), Vec::new())),
        Start::Resume(None) => match checkpoint::scan(&paths.dir) {
            (mut complete, damaged) if !complete.is_empty() => Ok((complete.pop(), damaged)),
            _ => Err(Error::Model(format!("{}: no complete checkpoint to resume from", checkpoint::checkpoints_dir(&paths.dir).display()))),
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
