//! Step checkpoints: `output.dir/checkpoints/step_NNNNNN/` holds
//!
//! - `adapter/`: the adapter in PEFT layout (f32), loadable on its own, with the chat template
//!   the run trains with (`chat_template.jinja`) when it has one
//! - `optimizer.safetensors`: AdamW's moments, `exp_avg.<module>.lora_A` etc., in tune's layout
//!   ([in, r] for lora_A, [r, out] for lora_B, [1, out] for DoRA's lora_magnitude_vector)
//! - `trainer_state.json`: step, epoch, position in the example stream, seed, hashes of the
//!   recipe and the dataset file, the date chat templates render `strftime_now` with, tune
//!   version, format version
//! - `recipe.yaml`: the recipe the run was started with
//! - `.complete`: written last
//!
//! Everything is written into a temporary directory, flushed, and renamed into place, so a crash
//! never leaves a checkpoint that looks complete. Nothing in the training state is hidden in an
//! RNG: shuffle order and dropout masks are derived from (seed, epoch, step), so the state above
//! is enough to continue bit for bit.

use std::path::{Path, PathBuf};

use crate::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::optimizer::AdamW;
use crate::adapter::LoraConfig;
use crate::error::{read_json, Error, Result};
use crate::hf::Weights;
use crate::model::CausalLm;
use crate::peft;

pub const FORMAT_VERSION: u32 = 1;
const COMPLETE: &str = ".complete";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "trainer_state.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format_version: u32,
    pub tune_version: String,
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Epochs completed, fractional.
    pub epoch: f64,
    /// Rows of the (seeded, epoch-by-epoch) example stream consumed so far.
    pub stream_position: usize,
    pub seed: u64,
    /// AdamW's step count t.
    pub adam_step: u64,
    /// Seconds of training before this checkpoint, so elapsed_s continues across a resume.
    pub elapsed_s: f64,
    pub recipe_hash: String,
    pub dataset_hash: String,
    /// The date (UTC, `YYYY-MM-DD`) the run's chat templates render `strftime_now` with: chosen
    /// when the run started, reused when it resumes. Absent in checkpoints of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_date: Option<crate::hf::ChatDate>,
    /// Fingerprint of dataset.eval_path, when the run evaluates on a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_dataset_hash: Option<String>,
    /// Where the evaluations stand, when the run has an eval set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalState>,
}

/// The evaluations of a run so far: what a resumed run needs to evaluate on the same steps,
/// keep the same best and stop at the same step as an uninterrupted one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalState {
    /// train.eval_every: evaluations follow steps that are multiples of it, and the last step.
    pub eval_every: Option<usize>,
    /// The latest evaluation: its step and eval loss.
    pub last_step: Option<usize>,
    pub last_loss: Option<f64>,
    /// The lowest eval loss so far and its step (that of `checkpoints/best` with
    /// output.save_best).
    pub best_step: Option<usize>,
    pub best_loss: Option<f64>,
    /// Evaluations in a row since the best that did not improve on it (early stopping's
    /// patience counter).
    pub bad_evals: usize,
    /// Set when early stopping ended the run, at `last_step`.
    pub stopped_early: bool,
}

impl EvalState {
    pub fn new(eval_every: Option<usize>) -> Self {
        EvalState { eval_every, last_step: None, last_loss: None, best_step: None, best_loss: None, bad_evals: 0, stopped_early: false }
    }

    /// Whether the run evaluates after optimizer step `step` (1-based) of `total`.
    pub fn due(&self, step: usize, total: usize) -> bool {
        step == total || self.eval_every.is_some_and(|n| step.is_multiple_of(n))
    }

    /// Records an evaluation; returns whether it is a new best (strictly lower).
    pub fn record(&mut self, step: usize, loss: f64) -> bool {
        self.last_step = Some(step);
        self.last_loss = Some(loss);
        let improved = self.best_loss.is_none_or(|best| loss < best);
        if improved {
            self.best_step = Some(step);
            self.best_loss = Some(loss);
            self.bad_evals = 0;
        } else {
            self.bad_evals += 1;
        }
        improved
    }
}

/// FNV-1a, 64 bit: a content fingerprint (not a security measure).
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn file_fingerprint(path: &Path) -> Result<String> {
    Ok(fingerprint(&std::fs::read(path).map_err(|e| Error::io(path, e))?))
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_dir(run_dir: &Path, step: usize) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("step_{step:06}"))
}

/// `checkpoints/best`: the checkpoint with the lowest eval loss (output.save_best). Its name
/// does not start with `step_`, so [`list`] and [`prune`] never see it.
pub fn best_dir(run_dir: &Path) -> PathBuf {
    checkpoints_dir(run_dir).join("best")
}

/// The adapter directory behind `path`: a PEFT adapter directory itself, a checkpoint or
/// finished run directory (its `adapter/`), or a run that has only checkpoints (the latest
/// complete one's adapter).
pub fn resolve_adapter_dir(path: &Path) -> Result<PathBuf> {
    use crate::peft::ADAPTER_CONFIG;
    if path.join(ADAPTER_CONFIG).is_file() {
        return Ok(path.to_path_buf());
    }
    let inside = path.join("adapter");
    if inside.join(ADAPTER_CONFIG).is_file() {
        return Ok(inside);
    }
    if let Some(latest) = list(path).pop() {
        return Ok(latest.dir.join("adapter"));
    }
    Err(Error::Model(format!("{}: not an adapter (no {ADAPTER_CONFIG}), nor a run or checkpoint directory holding one", path.display())))
}

/// Writes a checkpoint of the current training state. `chat_template` (the template the run
/// trains with) goes into the adapter directory as `chat_template.jinja`.
#[allow(clippy::too_many_arguments)]
pub fn save<B: Backend, O: Backend>(
    run_dir: &Path,
    model: &CausalLm<B>,
    lora_config: &LoraConfig,
    base_model: &str,
    opt: &AdamW<O>,
    state: &TrainerState,
    recipe_yaml: &str,
    chat_template: Option<&str>,
) -> Result<PathBuf> {
    let dir = step_dir(run_dir, state.step);
    save_to(&dir, model, lora_config, base_model, opt, state, recipe_yaml, chat_template)?;
    Ok(dir)
}

/// As [`save`], into `dir` (replacing what is there, atomically).
#[allow(clippy::too_many_arguments)]
pub fn save_to<B: Backend, O: Backend>(
    dir: &Path,
    model: &CausalLm<B>,
    lora_config: &LoraConfig,
    base_model: &str,
    opt: &AdamW<O>,
    state: &TrainerState,
    recipe_yaml: &str,
    chat_template: Option<&str>,
) -> Result<()> {
    let names = param_names(model);
    crate::fsutil::write_dir_atomically(dir, |tmp| {
        peft::save_peft(model, lora_config, base_model, &tmp.join("adapter"))?;
        crate::hf::adapter_template::write(&tmp.join("adapter"), chat_template)?;
        let mut tensors: Vec<crate::hf::safetensors::OwnedTensor> = Vec::new();
        for (name, (m, v)) in names.iter().zip(opt.exp_avg.iter().zip(&opt.exp_avg_sq)) {
            for (prefix, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let data = t.to_data();
                let bytes: Vec<u8> = data.iter::<f32>().flat_map(|x| x.to_le_bytes()).collect();
                tensors.push((format!("{prefix}.{name}"), t.dims().to_vec(), bytes));
            }
        }
        crate::hf::safetensors::write(&tmp.join(OPTIMIZER), &tensors, safetensors::Dtype::F32)?;
        let write = |name: &str, text: String| {
            let path = tmp.join(name);
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
        };
        write(STATE, serde_json::to_string_pretty(state).expect("json"))?;
        write("recipe.yaml", recipe_yaml.to_string())?;
        write(COMPLETE, String::new())
    })
}

/// `<module>.lora_A`, `<module>.lora_B` (and, with DoRA, `<module>.lora_magnitude_vector`)
/// for each adapter, in the trainer's parameter order.
fn param_names<B: Backend>(model: &CausalLm<B>) -> Vec<String> {
    let mut names = Vec::new();
    for p in model.linears() {
        let Some(l) = &p.adapter else { continue };
        names.push(format!("{}.lora_A", p.name));
        names.push(format!("{}.lora_B", p.name));
        if l.magnitude.is_some() {
            names.push(format!("{}.{}", p.name, peft::MAGNITUDE));
        }
    }
    names
}

/// A checkpoint found on disk.
#[derive(Debug, Clone)]
pub struct Found {
    pub dir: PathBuf,
    pub state: TrainerState,
}

/// Reads a checkpoint directory, checking that it is complete.
pub fn open(dir: &Path) -> Result<Found> {
    if !dir.join(COMPLETE).is_file() {
        return Err(Error::Model(format!("{}: incomplete checkpoint (no {COMPLETE} marker)", dir.display())));
    }
    for f in [STATE, OPTIMIZER, "recipe.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"] {
        if !dir.join(f).is_file() {
            return Err(Error::Model(format!("{}: damaged checkpoint: {f} is missing", dir.display())));
        }
    }
    let state: TrainerState = read_json(&dir.join(STATE))?;
    if state.format_version != FORMAT_VERSION {
        return Err(Error::Unsupported(format!(
            "{}: checkpoint format {} (this tune reads {FORMAT_VERSION})",
            dir.display(),
            state.format_version
        )));
    }
    Ok(Found { dir: dir.to_path_buf(), state })
}

/// Complete checkpoints of a run, oldest first. Damaged or partial ones are left out;
/// [`damaged`] says which and why.
pub fn list(run_dir: &Path) -> Vec<Found> {
    scan(run_dir).0
}

/// The checkpoint directories of a run that [`list`] leaves out, oldest first, each as the
/// error opening it gave.
pub fn damaged(run_dir: &Path) -> Vec<Error> {
    scan(run_dir).1
}

/// [`list`] and [`damaged`] from one pass over the run's checkpoint directories.
pub fn scan(run_dir: &Path) -> (Vec<Found>, Vec<Error>) {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(run_dir)) else {
        return (Vec::new(), Vec::new());
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step_")))
        .collect();
    dirs.sort();
    let (mut found, mut damaged) = (Vec::new(), Vec::new());
    for dir in dirs {
        match open(&dir) {
            Ok(f) => found.push(f),
            Err(e) => damaged.push(e),
        }
    }
    found.sort_by_key(|f| f.state.step);
    (found, damaged)
}

/// Total size of the files under a directory.
pub fn size_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        size_bytes(&p)
                    } else {
                        e.metadata().map_or(0, |m| m.len())
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Whether the run directory holds any checkpoint directory at all (complete or not).
pub fn any(run_dir: &Path) -> bool {
    std::fs::read_dir(checkpoints_dir(run_dir)).is_ok_and(|mut d| d.next().is_some())
}

/// Removes the oldest complete checkpoints beyond `keep_last` (called after a new one is written).
pub fn prune(run_dir: &Path, keep_last: usize) -> Result<()> {
    let found = list(run_dir);
    if keep_last == 0 || found.len() <= keep_last {
        return Ok(());
    }
    for f in &found[..found.len() - keep_last] {
        std::fs::remove_dir_all(&f.dir).map_err(|e| Error::io(&f.dir, e))?;
    }
    Ok(())
}

/// Restores AdamW's moments and step count from a checkpoint into `opt` (same parameter order).
pub fn load_optimizer<B: Backend, O: Backend>(
    dir: &Path,
    model: &CausalLm<B>,
    opt: &mut AdamW<O>,
    adam_step: u64,
    device: &O::Device,
) -> Result<()> {
    let weights = Weights::open_file(&dir.join(OPTIMIZER))?;
    for (i, name) in param_names(model).iter().enumerate() {
        let dims = opt.exp_avg[i].dims();
        let read = |prefix: &str| -> Result<Tensor<O, 2>> {
            let data = weights.read_f32(&format!("{prefix}.{name}"), &dims)?;
            Ok(Tensor::from_data(TensorData::new(data, dims), device))
        };
        opt.exp_avg[i] = read("exp_avg")?;
        opt.exp_avg_sq[i] = read("exp_avg_sq")?;
    }
    opt.step = adam_step;
    Ok(())
}
