//! The YAML recipe `tune run` reads. The doc comments on these structs are the recipe reference
//! (the README's table is written from them); every optional key has the default shown.
//!
//! Parsing is strict: unknown keys are errors that name the closest valid key, and every error
//! names the file, line:column and key path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::DeviceKind;
use crate::error::did_you_mean;
use crate::error::{Error, Result};
use crate::quant::Quantization;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    #[serde(default)]
    pub lora: LoraSection,
    pub dataset: DatasetSection,
    #[serde(default)]
    pub train: TrainSection,
    /// `cpu` (default), `cuda` (needs a build with `--features cuda`) or `wgpu` (Vulkan, Metal
    /// or DX12 through wgpu, f32 only; needs a build with `--features wgpu`).
    #[serde(default)]
    pub device: DeviceKind,
    pub output: OutputSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Local Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    pub path: PathBuf,
    /// Storage and matmul dtype of the frozen base weights: `f32` or `bf16`. Default: `bf16`
    /// when `device` is `cuda`, `f32` on `cpu`. On the CPU a bf16 base takes half the memory
    /// of the weights and loads without conversion, but its products run on f32 units (x
    /// rounded to bf16 where it enters them, as autocast does), ~0.8× the f32 speed; see the
    /// README's performance section. LoRA weights, their gradients and the optimizer state are
    /// f32 either way. The run's recipe.yaml records the value used.
    #[serde(default)]
    pub dtype: Option<BaseDtype>,
    /// Store the decoder's linear layers quantized (QLoRA): `nf4` (bitsandbytes' 4-bit
    /// NormalFloat: blocks of 64 consecutive weights with one f32 absmax each, no double
    /// quantization; 0.5 byte a weight), `int8` (per output row, absmax/127 scales and
    /// round-to-nearest-even codes as bitsandbytes' `int8_vectorwise_quant`; 1 byte a weight,
    /// weight-only: the compute stays f32) or `none`. Default `none`. Quantized at load, one
    /// tensor at a time; the dequantized weights equal bitsandbytes' round trip bit for bit.
    /// Embeddings, norms and the output head stay in `model.dtype`, as in PEFT's QLoRA. LoRA
    /// trains in f32 on the dequantized weights, which are never held whole (a tile at a time
    /// inside the fused linear). Exports are as usual; a merged export adds the adapter to the
    /// original, unquantized weights of `model.path`, as PEFT's merge does.
    #[serde(default)]
    pub quantize: Quantization,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDtype {
    F32,
    Bf16,
}

impl BaseDtype {
    /// The default on a device: bf16 on cuda, f32 on cpu (where bf16 is the slower of the two)
    /// and on wgpu (WGSL has no bf16).
    pub fn for_device(device: DeviceKind) -> Self {
        match device {
            DeviceKind::Cuda => BaseDtype::Bf16,
            DeviceKind::Cpu | DeviceKind::Wgpu => BaseDtype::F32,
        }
    }

    /// Refuses a dtype the device cannot compute in.
    pub fn check_device(self, device: DeviceKind) -> Result<()> {
        if self == BaseDtype::Bf16 && device == DeviceKind::Wgpu {
            return Err(Error::Unsupported("model.dtype: bf16 is not available on device wgpu (WGSL has no bf16); use f32".into()));
        }
        Ok(())
    }

    pub fn float_dtype(self) -> burn::tensor::FloatDType {
        match self {
            BaseDtype::F32 => burn::tensor::FloatDType::F32,
            BaseDtype::Bf16 => burn::tensor::FloatDType::BF16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// Rank r of the update B·A. Default 8.
    pub rank: usize,
    /// Scale numerator: the update is multiplied by alpha / rank. Default 16.
    pub alpha: f64,
    /// Dropout on the adapter's input during training. Default 0.05.
    pub dropout: f64,
    /// Linear layers to adapt, by the checkpoint's own module names (Llama, Mistral, Qwen, Gemma:
    /// q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; Phi-3: qkv_proj o_proj
    /// gate_up_proj down_proj; GPT-2: c_attn c_proj c_fc; GPT-NeoX, BLOOM: query_key_value dense
    /// dense_h_to_4h dense_4h_to_h), suffixes such as `self_attn.q_proj` or full paths matched as
    /// PEFT matches them, or the string `all-linear` (every linear layer but the output head).
    /// Default: PEFT's default for the family ([q_proj, v_proj] for Llama, Mistral, Qwen and
    /// Gemma; [qkv_proj] for Phi-3; [c_attn] for GPT-2; [query_key_value] for GPT-NeoX and
    /// BLOOM).
    pub target_modules: Option<TargetModules>,
    /// Scale by alpha / √rank instead (rsLoRA). Default false.
    pub use_rslora: bool,
    /// DoRA (weight-decomposed LoRA, as PEFT's `use_dora`): each adapted layer also trains a
    /// magnitude per output feature, `lora_magnitude_vector`, initialised to the norm of the
    /// frozen weight's row, and computes with m · (W + s·B·A) / ‖W + s·B·A‖, the norm per output
    /// feature and not differentiated. One vector of out_features more per layer; each forward
    /// pass also forms W + s·B·A once per layer for the norm. Adapters are saved with
    /// `use_dora: true` and load in PEFT. Default false.
    pub use_dora: bool,
    /// A PEFT adapter directory to start from instead of a fresh init (LoRA or DoRA: its r,
    /// alpha, targets and use_dora win over the recipe's). Default none.
    pub init_from: Option<PathBuf>,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection { rank: 8, alpha: 16.0, dropout: 0.05, target_modules: None, use_rslora: false, use_dora: false, init_from: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    /// Only `all-linear` is accepted.
    Keyword(String),
}

impl TargetModules {
    /// The names given, or None for `all-linear`; which layers they name is the model's to say
    /// (`peft::resolve_targets`).
    pub fn names(&self) -> Option<&[String]> {
        match self {
            TargetModules::List(v) => Some(v),
            TargetModules::Keyword(_) => None,
        }
    }

    /// Whether this is `all-linear`.
    pub fn is_all_linear(&self) -> bool {
        matches!(self, TargetModules::Keyword(_))
    }

    fn check(&self) -> Result<()> {
        match self {
            TargetModules::Keyword(k) if k == "all-linear" => Ok(()),
            TargetModules::Keyword(k) => {
                Err(Error::Unsupported(format!("lora.target_modules: `{k}` is not a list of module names or `all-linear`")))
            }
            TargetModules::List(v) if v.is_empty() => Err(Error::Unsupported("lora.target_modules: empty list".into())),
            TargetModules::List(_) => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSection {
    /// The dataset file: JSON lines (`.jsonl`), a JSON array, or parquet (`.parquet`, or any
    /// file starting with parquet's `PAR1` magic: each row a record, its columns the keys).
    /// Either `path` or `sources` is set.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The record shape of `path` (see [`DataFormat`]). Detected from the first record's keys
    /// when omitted.
    #[serde(default)]
    pub format: Option<DataFormat>,
    /// Several datasets mixed into one, instead of `path`: a list of `{path, format?,
    /// weight?}`, each read and detected as `path` is. Without weights every example of every
    /// source is seen once an epoch (the files concatenated, as axolotl's `datasets:` list).
    /// With weights (all sources then have one; positive numbers, relative) a weight is the
    /// sampling probability of its source, as LLaMA-Factory's `interleave_probs`: an epoch still
    /// holds as many examples (rows when packed) as all sources together, and source i fills
    /// round(p_i × that) of them (largest remainders; p_i = weight_i / Σ weight), drawn without
    /// replacement from its own shuffled order and continuing where the previous epoch stopped,
    /// so a source weighted above its size is repeated (up-sampled) and one below it is cut
    /// (down-sampled), and across epochs every example of it comes round. The mixture is a pure
    /// function of train.seed and the epoch (so a resumed run sees the same batches); with
    /// `shuffle: false` each epoch is the sources' shares in source order.
    #[serde(default)]
    pub sources: Option<Vec<DataSource>>,
    /// Examples are truncated to this many tokens. Default 512.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// alpaca/chat/sharegpt/prompt_completion: also compute the loss on the prompt / user
    /// turns. Default false.
    #[serde(default)]
    pub train_on_input: bool,
    /// Concatenate examples into rows of max_seq_len (positions restart and attention stays
    /// within each example). Default false.
    #[serde(default)]
    pub packed: bool,
    /// Shuffle the example order each epoch (seeded by train.seed). Default true.
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// text/alpaca/prompt_completion (strings): append the EOS token to each example (never
    /// twice). Default true.
    #[serde(default = "yes")]
    pub add_eos: bool,
    /// chat/sharegpt/prompt_completion (messages): the chat template to render conversations with, instead of the model's own: a
    /// built-in name (`chatml`: `<|im_start|>{role}\n{content}<|im_end|>\n` per message and
    /// `<|im_start|>assistant\n` as the generation prompt, transformers' ChatML) or a Jinja file
    /// (any value holding a `/` or a `.`: `./template`, `chat.jinja`; relative to the current
    /// directory, `~` expands). Needed for chat data on a model without a template (a base
    /// model). Default: the `lora.init_from` adapter's `chat_template.jinja` if it has one, else
    /// the model's own. The template a run trains with is saved with its adapters as
    /// `chat_template.jinja`, which `tune generate --adapter` and `tune export` use.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// A held-out file to evaluate on during training (same format and options as `path`; see
    /// `train.eval_every`). Records are not truncated to max_seq_len: longer ones are scored in
    /// windows of max_seq_len tokens (at most the model's max_position_embeddings) with a stride
    /// of half that, as `tune eval --max-seq-len N` does. Default none.
    #[serde(default)]
    pub eval_path: Option<PathBuf>,
    /// Instead of `eval_path`: hold out this fraction of `path`'s records (of each file of
    /// `sources`; in (0, 1); at least one record, and at least one left to train on) as the
    /// eval set. The records are drawn with train.seed, so the split is the same on every run
    /// and resume with that seed; the rest keep their file order for training. Default none.
    #[serde(default)]
    pub eval_split: Option<f64>,
}

impl DatasetSection {
    /// The datasets the recipe reads: `sources`, or `path` with `format` as one source.
    pub fn sources(&self) -> Vec<DataSource> {
        match (&self.sources, &self.path) {
            (Some(s), _) => s.clone(),
            (None, Some(path)) => vec![DataSource { path: path.clone(), format: self.format, weight: None }],
            (None, None) => Vec::new(),
        }
    }

    /// The sampling weights of the sources, when they have them (see `sources`).
    pub fn weights(&self) -> Option<Vec<f64>> {
        self.sources.as_ref()?.iter().map(|s| s.weight).collect()
    }

    fn check_sources(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::Unsupported(format!("{key}: {msg}")));
        let Some(sources) = &self.sources else {
            if self.path.is_none() {
                return bad("dataset", "set `path` (one file) or `sources` (a list of {path, format?, weight?})".into());
            }
            return Ok(());
        };
        if self.path.is_some() || self.format.is_some() {
            return bad(
                if self.path.is_some() { "dataset.path" } else { "dataset.format" },
                "set either dataset.path (with dataset.format) or dataset.sources (each with its own format), not both".into(),
            );
        }
        if sources.is_empty() {
            return bad("dataset.sources", "empty list (expected [{path, format?, weight?}, ...])".into());
        }
        let weighted = sources.iter().filter(|s| s.weight.is_some()).count();
        if weighted != 0 && weighted != sources.len() {
            let i = sources.iter().position(|s| s.weight.is_none()).expect("one has none");
            return bad(
                &format!("dataset.sources[{i}].weight"),
                "missing: either every source has a weight or none has (then each example is seen once an epoch)".into(),
            );
        }
        for (i, s) in sources.iter().enumerate() {
            if let Some(w) = s.weight {
                if !(w.is_finite() && w > 0.0) {
                    return bad(&format!("dataset.sources[{i}].weight"), format!("{w}: must be a positive number"));
                }
            }
        }
        Ok(())
    }

    /// Whether the recipe has an eval set (`eval_path` or `eval_split`).
    pub fn has_eval(&self) -> bool {
        self.eval_path.is_some() || self.eval_split.is_some()
    }

    /// The Jinja source `chat_template` names (a built-in's, or the file's) and where it comes
    /// from (the built-in's name or the file), if set.
    pub fn chat_template_source(&self) -> Result<Option<(String, String)>> {
        let Some(value) = &self.chat_template else {
            return Ok(None);
        };
        if let Some(source) = crate::hf::chat_template::builtin(value) {
            return Ok(Some((source.to_string(), format!("built-in chat template `{value}`"))));
        }
        check_chat_template(value)?;
        let path = Path::new(value);
        let source = std::fs::read_to_string(path)
            .map_err(|e| Error::Unsupported(format!("dataset.chat_template: cannot read {}: {e}", path.display())))?;
        Ok(Some((source, path.display().to_string())))
    }
}

/// A `dataset.chat_template` value without `/` or `.` names a built-in template; any other is a
/// path to a Jinja file.
fn names_builtin_template(value: &str) -> bool {
    !value.contains(['/', '.'])
}

/// The built-in name exists, or the file does.
fn check_chat_template(value: &str) -> Result<()> {
    let builtins: Vec<&str> = crate::hf::chat_template::BUILTIN_TEMPLATES.iter().map(|(n, _)| *n).collect();
    if names_builtin_template(value) {
        if builtins.contains(&value) {
            return Ok(());
        }
        return Err(Error::Unsupported(format!(
            "dataset.chat_template: unknown built-in template `{value}`{} (built-ins: {}; a Jinja file is a path holding a `/` or a `.`, e.g. ./{value}.jinja)",
            did_you_mean(value, &builtins),
            builtins.join(", ")
        )));
    }
    if !Path::new(value).is_file() {
        return Err(Error::Unsupported(format!("dataset.chat_template: {value}: no such file (built-ins: {})", builtins.join(", "))));
    }
    Ok(())
}

/// One dataset of `dataset.sources`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// The file, as `dataset.path`.
    pub path: PathBuf,
    /// Its record shape, as `dataset.format`. Detected when omitted.
    #[serde(default)]
    pub format: Option<DataFormat>,
    /// Its sampling weight (see `dataset.sources`). Default: none (every example once).
    #[serde(default)]
    pub weight: Option<f64>,
}

/// The record shapes tune reads. Detected from the first record's keys, in this order:
/// `messages` (chat), `conversations` (sharegpt), `prompt` + `completion`
/// (prompt_completion), `instruction` + `output` (alpaca), `text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// `{"text"}`: loss on every token.
    Text,
    /// `{"instruction", "input"?, "output"}`: the Stanford Alpaca prompt; loss on the response.
    Alpaca,
    /// OpenAI-style `{"messages": [{"role", "content", ...}], "tools"?}`: rendered with the chat
    /// template (a `system` turn as the template places it, `tools` passed to it as
    /// `apply_chat_template(tools=...)` does; other message keys such as `tool_calls`,
    /// `tool_call_id`, `name` reach the template as they are; a null `content` is empty); loss
    /// on the assistant turns.
    Chat,
    /// ShareGPT `{"conversations": [{"from", "value"}], "system"?, "tools"?}`, rendered as chat.
    /// Roles as axolotl's default mapping: `human`/`user` -> user, `gpt`/`assistant` ->
    /// assistant, `system`, `tool`; any other is an error. A record-level `system` string
    /// becomes a first system turn unless the conversation starts with one (LLaMA-Factory's
    /// rule); `tools` may be a list or a JSON string of one (as LLaMA-Factory stores it).
    Sharegpt,
    /// TRL's `{"prompt", "completion"}`: both strings (the text is prompt + completion, the
    /// prompt's tokens are those of the prompt alone, EOS appended), or both message lists
    /// (prompt rendered with the generation prompt, then prompt + completion rendered whole,
    /// with the record's `tools`). Loss on the completion only.
    PromptCompletion,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Passes over the dataset. Default 1.
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides epochs). Default none.
    pub max_steps: Option<usize>,
    /// Examples (or packed rows) per micro-batch. Default 4.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Peak learning rate. Default 2e-4.
    pub lr: f64,
    /// Decoupled weight decay (AdamW). Default 0.0.
    pub weight_decay: f64,
    /// Adam β1, β2. Default [0.9, 0.999].
    pub betas: [f64; 2],
    /// Adam ε. Default 1e-8.
    pub eps: f64,
    /// Linear warm-up from 0 to lr over this many steps. Default 0.
    pub warmup_steps: usize,
    /// After warm-up: `cosine` (to 0, default), `linear` (to 0) or `constant`.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this; null turns clipping off. Default 1.0.
    pub max_grad_norm: Option<f64>,
    /// Seeds LoRA init, shuffling and dropout. Default 42.
    pub seed: u64,
    /// Keep only each decoder layer's input during the forward pass and recompute the layer
    /// in the backward pass: activation memory of one layer instead of all, for one more
    /// forward pass. Same gradients. Default false.
    pub activation_checkpointing: bool,
    /// With an eval set (dataset.eval_path or dataset.eval_split): evaluate every this many
    /// optimizer steps, and always after the last step. The eval loss is `tune eval`'s (mean
    /// next-token cross-entropy over the eval set's labelled tokens, adapters without dropout,
    /// nothing drawn from the training's random streams), logged as `eval_loss` on that step's
    /// line of metrics.jsonl, shown on the progress bar and plotted in report.svg. Default none:
    /// only after the last step.
    pub eval_every: Option<usize>,
    /// Data parallel: one replica of the model per device, each on an equal slice of every
    /// micro-batch's rows (so train.batch_size must divide by their number), with the LoRA
    /// gradients all-reduced before each optimizer step. A number N takes devices 0..N of the
    /// run's `device`; a list (`[0, 2]`) names them. On `cpu` every replica shares the CPU, so
    /// this checks the parallel path rather than speeding it up. Per-step losses equal one
    /// device's to float rounding, and a resumed run repeats the uninterrupted one bit for bit
    /// on the same number of devices. Default 1.
    pub devices: Devices,
    /// Data parallel across machines: several `tune run` processes, one per node, each with
    /// train.devices replicas, train as one run of count × devices replicas (replica r of node
    /// k takes share k × devices + r of every micro-batch's rows). Every node runs the same
    /// recipe but for `rank` (model and dataset paths may differ; the data and the model's
    /// config.json must not), and node 0 gathers every node's gradients each step and hands
    /// them all back, so every node takes the same optimizer step and writes the same
    /// checkpoints and adapter into its own output.dir. Per-step losses and the adapter equal
    /// those of one node with count × devices devices, bit for bit. When any node is
    /// interrupted or stops early, every node saves that step and stops; a run is resumed by
    /// resuming every node from the same step. Default none: one node.
    pub nodes: Option<Nodes>,
    /// Stop when this many evaluations in a row have not improved on the best eval loss so far
    /// (improving means strictly lower). The run ends with a checkpoint and the adapter of the
    /// step it stopped at, and says why it stopped. Needs train.eval_every. Default none.
    pub early_stopping_patience: Option<usize>,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            lr: 2e-4,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            max_grad_norm: Some(1.0),
            seed: 42,
            activation_checkpointing: false,
            eval_every: None,
            early_stopping_patience: None,
            devices: Devices::Count(1),
            nodes: None,
        }
    }
}

/// `train.devices`: how many devices, or which.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Devices {
    Count(usize),
    List(Vec<usize>),
}

impl Devices {
    /// The device indices, in replica order.
    pub fn indices(&self) -> Vec<usize> {
        match self {
            Devices::Count(n) => (0..*n).collect(),
            Devices::List(l) => l.clone(),
        }
    }
}

/// `train.nodes`: this process's place in a run over several nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nodes {
    /// How many nodes train together (at least 2).
    pub count: u32,
    /// This node's place among them, 0 to count − 1, each rank once. It decides which rows of
    /// every micro-batch this node's replicas take; node 0 also gathers the gradients.
    pub rank: u32,
    /// Node 0's address as every node reaches it, `HOST:PORT` (e.g. `10.0.0.1:29500`). Node 0
    /// listens on that port on every interface; the others connect to it, retrying while it
    /// starts. The same on every node.
    pub address: String,
    /// How long node 0 waits for every other node to join, and they for node 0 to answer, in
    /// seconds. Default 600.
    #[serde(default = "default_join_timeout")]
    pub join_timeout_s: u64,
}

fn default_join_timeout() -> u64 {
    600
}

impl Nodes {
    /// The port of [`Nodes::address`].
    pub fn port(&self) -> Option<u16> {
        let (host, port) = self.address.rsplit_once(':')?;
        (!host.is_empty() && !host.contains('/')).then_some(())?;
        port.parse().ok().filter(|&p| p != 0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Run directory: metrics.jsonl, report.svg, recipe.yaml, adapter/.
    pub dir: PathBuf,
    /// Save a checkpoint every this many optimizer steps (0: only at the end). Default 0.
    #[serde(default)]
    pub save_every: usize,
    /// Checkpoints to keep. Default 2.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// What to export at the end of the run, besides the f32 `adapter/` every run leaves:
    /// `adapter` (default: `export/adapter/`, the portable PEFT profile with a model card),
    /// `merged` (`export/merged/`, full Hugging Face weights), `both`, `gguf` (`export/model.gguf`,
    /// the merged model for llama.cpp and Ollama, q8_0) or `none`.
    /// Same as `tune export` afterwards.
    #[serde(default)]
    pub export: ExportKind,
    /// Storage dtype of the exported tensors: `bf16` (default), `f16` or `f32`.
    #[serde(default)]
    pub export_dtype: crate::hf::safetensors::OutDtype,
    /// Keep the checkpoint with the lowest eval loss so far as `checkpoints/best` (a full
    /// checkpoint: its trainer_state.json gives its step and eval loss; `tune export`,
    /// `tune eval --adapter` and `--resume` take it), besides and never pruned by `keep_last`.
    /// Replaced atomically when an evaluation improves. Needs an eval set. Default false.
    #[serde(default)]
    pub save_best: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportKind {
    #[default]
    Adapter,
    Merged,
    Both,
    Gguf,
    None,
}

fn default_max_seq_len() -> usize {
    512
}
fn default_keep_last() -> usize {
    2
}
fn yes() -> bool {
    true
}

/// Every key path the schema knows, for "did you mean" hints and override checks.
const KEYS: &[&str] = &[
    "model",
    "model.path",
    "model.dtype",
    "model.quantize",
    "lora",
    "lora.rank",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "lora.use_rslora",
    "lora.use_dora",
    "lora.init_from",
    "dataset",
    "dataset.path",
    "dataset.format",
    "dataset.sources",
    "dataset.max_seq_len",
    "dataset.train_on_input",
    "dataset.packed",
    "dataset.shuffle",
    "dataset.add_eos",
    "dataset.chat_template",
    "dataset.eval_path",
    "dataset.eval_split",
    "train",
    "train.epochs",
    "train.max_steps",
    "train.batch_size",
    "train.grad_accum",
    "train.lr",
    "train.weight_decay",
    "train.betas",
    "train.eps",
    "train.warmup_steps",
    "train.schedule",
    "train.max_grad_norm",
    "train.seed",
    "train.activation_checkpointing",
    "train.eval_every",
    "train.early_stopping_patience",
    "train.devices",
    "train.nodes",
    "train.nodes.count",
    "train.nodes.rank",
    "train.nodes.address",
    "train.nodes.join_timeout_s",
    "device",
    "output",
    "output.dir",
    "output.save_every",
    "output.keep_last",
    "output.export",
    "output.export_dtype",
    "output.save_best",
];

impl Recipe {
    /// Reads a recipe file and applies `key.path=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path, overrides)
    }

    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Recipe> {
        // Parse the text itself first, so errors carry its line and column.
        let recipe: Recipe = deserialize(serde_yaml::Deserializer::from_str(text), path, "")?;
        if overrides.is_empty() {
            return recipe.resolve_paths();
        }
        let mut value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| Error::format(path, e.to_string()))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let recipe: Recipe = deserialize(value, path, " (after command-line overrides)")?;
        recipe.resolve_paths()
    }

    /// Expands `~` and makes relative paths absolute against the current directory.
    fn resolve_paths(mut self) -> Result<Recipe> {
        self.model.path = resolve(&self.model.path);
        self.dataset.path = self.dataset.path.as_deref().map(resolve);
        for s in self.dataset.sources.iter_mut().flatten() {
            s.path = resolve(&s.path);
        }
        self.dataset.eval_path = self.dataset.eval_path.as_deref().map(resolve);
        self.output.dir = resolve(&self.output.dir);
        self.lora.init_from = self.lora.init_from.as_deref().map(resolve);
        if let Some(t) = self.dataset.chat_template.as_mut().filter(|t| !names_builtin_template(t)) {
            *t = resolve(Path::new(t.as_str())).to_string_lossy().into_owned();
        }
        self.model.dtype = Some(self.base_dtype());
        self.validate()?;
        Ok(self)
    }

    /// `model.dtype`, or its default for `device`.
    pub fn base_dtype(&self) -> BaseDtype {
        self.model.dtype.unwrap_or(BaseDtype::for_device(self.device))
    }

    fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: &str| Err(Error::Unsupported(format!("{key}: {msg}")));
        self.base_dtype().check_device(self.device)?;
        if let Some(t) = &self.lora.target_modules {
            t.check()?;
        }
        if self.lora.rank == 0 {
            return bad("lora.rank", "must be at least 1");
        }
        if self.lora.use_dora && self.model.quantize != crate::quant::Quantization::None {
            return bad(
                "lora.use_dora",
                "DoRA on a quantized base (model.quantize) is not supported: DoRA's weight norm needs the dense weight; \
                 set model.quantize: none or lora.use_dora: false",
            );
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return bad("lora.dropout", "must be in [0, 1)");
        }
        if self.train.batch_size == 0 || self.train.grad_accum == 0 {
            return bad("train.batch_size / train.grad_accum", "must be at least 1");
        }
        let devices = self.train.devices.indices();
        if devices.is_empty() {
            return bad("train.devices", "must be at least 1 (a number of devices, or a list of device indices)");
        }
        if let Some(d) = devices.iter().enumerate().find_map(|(i, d)| devices[..i].contains(d).then_some(d)) {
            return bad("train.devices", &format!("device {d} is listed twice"));
        }
        let mut replicas = devices.len();
        if let Some(nodes) = &self.train.nodes {
            if nodes.count < 2 {
                return bad("train.nodes.count", "must be at least 2 (for one node, leave train.nodes out)");
            }
            if nodes.rank >= nodes.count {
                return bad("train.nodes.rank", &format!("must be below train.nodes.count ({}), got {}", nodes.count, nodes.rank));
            }
            if nodes.port().is_none() {
                return bad("train.nodes.address", &format!("must be HOST:PORT (node 0's address), got {:?}", nodes.address));
            }
            replicas *= nodes.count as usize;
        }
        if !self.train.batch_size.is_multiple_of(replicas) {
            let key = if self.train.nodes.is_some() { "train.devices × train.nodes.count" } else { "train.devices" };
            return bad(
                key,
                &format!(
                    "{replicas} replicas cannot share train.batch_size {} evenly; use a batch size divisible by {replicas}",
                    self.train.batch_size,
                ),
            );
        }
        if self.train.epochs == 0 && self.train.max_steps.is_none() {
            return bad("train.epochs", "must be at least 1 (or set train.max_steps)");
        }
        if self.train.max_steps == Some(0) {
            return bad("train.max_steps", "must be at least 1");
        }
        if self.dataset.max_seq_len < 2 {
            return bad("dataset.max_seq_len", "must be at least 2");
        }
        if self.train.lr.is_nan() || self.train.lr <= 0.0 {
            return bad("train.lr", "must be positive");
        }
        if self.train.max_grad_norm.is_some_and(|n| n.is_nan() || n <= 0.0) {
            return bad("train.max_grad_norm", "must be positive, or null to turn clipping off");
        }
        if let Some(t) = &self.dataset.chat_template {
            check_chat_template(t)?;
        }
        self.dataset.check_sources()?;
        self.validate_eval()
    }

    /// The eval keys: a split in (0, 1) or a file, not both; the keys that act on evaluations
    /// only with an eval set.
    fn validate_eval(&self) -> Result<()> {
        let bad = |key: &str, msg: &str| Err(Error::Unsupported(format!("{key}: {msg}")));
        let d = &self.dataset;
        if d.eval_path.is_some() && d.eval_split.is_some() {
            return bad("dataset.eval_split", "set either dataset.eval_path or dataset.eval_split, not both");
        }
        if let Some(f) = d.eval_split {
            if !(f > 0.0 && f < 1.0) {
                return bad("dataset.eval_split", &format!("{f}: must be a fraction in (0, 1), e.g. 0.05"));
            }
        }
        let t = &self.train;
        let needs_eval = |key: &str| bad(key, "needs an eval set: set dataset.eval_path (a file) or dataset.eval_split (e.g. 0.05)");
        if t.eval_every == Some(0) {
            return bad("train.eval_every", "must be at least 1 (optimizer steps between evaluations)");
        }
        if t.eval_every.is_some() && !d.has_eval() {
            return needs_eval("train.eval_every");
        }
        if let Some(p) = t.early_stopping_patience {
            if !d.has_eval() {
                return needs_eval("train.early_stopping_patience");
            }
            if p == 0 {
                return bad("train.early_stopping_patience", "must be at least 1 (evaluations without improvement)");
            }
            if t.eval_every.is_none() {
                return bad(
                    "train.early_stopping_patience",
                    "needs train.eval_every: without it the only evaluation is after the last step",
                );
            }
        }
        if self.output.save_best && !d.has_eval() {
            return needs_eval("output.save_best");
        }
        Ok(())
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a recipe always serialises")
    }
}

fn deserialize<'de, D: serde::Deserializer<'de>>(de: D, path: &Path, context: &str) -> Result<Recipe>
where
    D::Error: std::fmt::Display,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.inner().to_string();
        let hint = unknown_field_hint(&inner, &key);
        // serde_yaml starts its message with the parent path ("train: unknown field ..."); the
        // full key path is more useful, so it replaces that.
        let inner = match inner.split_once(": ") {
            Some((head, tail)) if !head.contains(' ') => tail.to_string(),
            _ => inner,
        };
        let at = if key == "." { String::new() } else { format!("`{key}`: ") };
        Error::format(path, format!("{at}{inner}{hint}{context}"))
    })
}

/// For serde's "unknown field `lr2`, expected one of ..." adds "; did you mean `lr`?", looking
/// among the siblings of the unknown key (`key` is its full path, e.g. `train.lr2`).
fn unknown_field_hint(msg: &str, key: &str) -> String {
    let Some((_, rest)) = msg.split_once("unknown field `") else {
        return String::new();
    };
    let Some(field) = rest.split('`').next() else {
        return String::new();
    };
    let parent = key.strip_suffix(field).unwrap_or("").trim_end_matches('.');
    let prefix = if parent.is_empty() || parent == "." { String::new() } else { format!("{parent}.") };
    let candidates: Vec<&str> = KEYS.iter().filter_map(|k| k.strip_prefix(prefix.as_str())).filter(|k| !k.contains('.')).collect();
    did_you_mean(field, &candidates)
}

/// `train.lr=1e-4`: sets a key path, the value parsed as YAML (`[q_proj,v_proj]`, `null`, ...).
fn apply_override(root: &mut serde_yaml::Value, spec: &str) -> Result<()> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| Error::Unsupported(format!("override `{spec}`: expected key.path=value, e.g. train.lr=1e-4")))?;
    let key = key.trim();
    if !KEYS.contains(&key) {
        return Err(Error::Unsupported(format!("override `{spec}`: unknown key `{key}`{}", did_you_mean(key, KEYS))));
    }
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(raw).map_err(|e| Error::Unsupported(format!("override `{spec}`: value is not valid YAML: {e}")))?;
    // YAML 1.2 reads 1e-4 as a string (no dot); the schema's floats want a number.
    if let serde_yaml::Value::String(s) = &value {
        if let Ok(f) = s.parse::<f64>() {
            value = serde_yaml::Value::Number(f.into());
        }
    }
    let mut node = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !node.is_mapping() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().expect("made a mapping above");
        let k = serde_yaml::Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert(serde_yaml::Value::Null);
    }
    Ok(())
}

/// `~/x` -> `$HOME/x`; relative -> absolute against the current directory.
pub fn resolve(p: &Path) -> PathBuf {
    let p = match p.strip_prefix("~") {
        Ok(rest) => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(rest),
        Err(_) => p.to_path_buf(),
    };
    if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "model:\n  path: /m\ndataset:\n  path: /d.jsonl\noutput:\n  dir: /out\n";

    fn parse(text: &str, overrides: &[&str]) -> Result<Recipe> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Recipe::parse(text, Path::new("r.yaml"), &o)
    }

    #[test]
    fn defaults_fill_every_optional_key() {
        let r = parse(MINIMAL, &[]).unwrap();
        assert_eq!(r.lora, LoraSection::default());
        assert_eq!(r.train, TrainSection::default());
        assert_eq!(r.train.betas, [0.9, 0.999]);
        assert_eq!(r.dataset.max_seq_len, 512);
        assert!(r.dataset.shuffle && r.dataset.add_eos && !r.dataset.packed);
        assert_eq!(r.device, DeviceKind::Cpu);
        assert_eq!(r.output.export, ExportKind::Adapter);
    }

    /// `KEYS` (which overrides are checked against) is written by hand: it must list exactly
    /// the recipe's keys, sections included.
    #[test]
    fn override_keys_are_the_schema() {
        fn walk(prefix: &str, v: &serde_yaml::Value, out: &mut Vec<String>) {
            if let serde_yaml::Value::Mapping(m) = v {
                for (k, v) in m {
                    let k = k.as_str().unwrap();
                    let key = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
                    out.push(key.clone());
                    walk(&key, v, out);
                }
            }
        }
        let mut schema = Vec::new();
        // Optional sections appear with their keys only when set.
        let nodes = ["train.nodes.count=2", "train.nodes.rank=0", "train.nodes.address=a:1"];
        walk("", &serde_yaml::to_value(parse(MINIMAL, &nodes).unwrap()).unwrap(), &mut schema);
        schema.sort();
        let mut keys: Vec<String> = KEYS.iter().map(|k| k.to_string()).collect();
        keys.sort();
        assert_eq!(keys, schema);
    }

    #[test]
    fn base_dtype_defaults_by_device_and_is_recorded() {
        let cpu = parse(MINIMAL, &[]).unwrap();
        assert_eq!(cpu.model.dtype, Some(BaseDtype::F32));
        let cuda = parse(MINIMAL, &["device=cuda"]).unwrap();
        assert_eq!(cuda.model.dtype, Some(BaseDtype::Bf16));
        let explicit = parse(MINIMAL, &["device=cuda", "model.dtype=f32"]).unwrap();
        assert_eq!(explicit.model.dtype, Some(BaseDtype::F32));
        // What a run writes to its recipe.yaml reads back the same.
        let again = parse(&cuda.to_yaml(), &[]).unwrap();
        assert_eq!(again.model.dtype, Some(BaseDtype::Bf16));
    }

    /// A run resumed on another device keeps its dtype only when the recipe says so; otherwise
    /// resuming is refused naming `model.dtype`, not silently run at another precision.
    #[test]
    fn resuming_on_another_device_names_the_dtype_change() {
        let saved = parse(&parse(MINIMAL, &[]).unwrap().to_yaml(), &[]).unwrap();
        let cuda = parse(MINIMAL, &["device=cuda"]).unwrap();
        assert_eq!(crate::train::breaking_changes(&saved, &cuda), vec!["model.dtype".to_string()]);
        let cuda_f32 = parse(MINIMAL, &["device=cuda", "model.dtype=f32"]).unwrap();
        assert!(crate::train::breaking_changes(&saved, &cuda_f32).is_empty());
    }

    /// `model.quantize` reads nf4, int8 or none (the default), is recorded in the run's
    /// recipe.yaml, a wrong value names the key, and changing it refuses a resume.
    #[test]
    fn dora_on_a_quantized_base_is_refused_naming_both_keys() {
        let err = parse(MINIMAL, &["model.quantize=nf4", "lora.use_dora=true"]).unwrap_err().to_string();
        assert!(err.contains("lora.use_dora") && err.contains("model.quantize"), "{err}");
        assert!(parse(MINIMAL, &["model.quantize=nf4"]).is_ok() && parse(MINIMAL, &["lora.use_dora=true"]).is_ok());
    }

    #[test]
    fn quantize_is_a_model_key() {
        assert_eq!(parse(MINIMAL, &[]).unwrap().model.quantize, Quantization::None);
        let nf4 = parse(MINIMAL, &["model.quantize=nf4"]).unwrap();
        assert_eq!(nf4.model.quantize, Quantization::Nf4);
        assert_eq!(parse(&nf4.to_yaml(), &[]).unwrap().model.quantize, Quantization::Nf4);
        assert_eq!(parse(MINIMAL, &["model.quantize=int8"]).unwrap().model.quantize, Quantization::Int8);
        let err = parse(&MINIMAL.replace("  path: /m\n", "  path: /m\n  quantize: nf8\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("`model.quantize`") && err.contains("nf4") && err.contains("line 3"), "{err}");
        let err = parse(MINIMAL, &["model.quantize=4bit"]).unwrap_err().to_string();
        assert!(err.contains("model.quantize") && err.contains("int8"), "{err}");
        let saved = parse(&parse(MINIMAL, &[]).unwrap().to_yaml(), &[]).unwrap();
        assert_eq!(crate::train::breaking_changes(&saved, &nf4), vec!["model.quantize".to_string()]);
    }

    #[test]
    fn shipped_recipes_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 7, "found {n} recipes in {}", dir.display());
    }

    #[test]
    fn unknown_key_names_file_line_and_closest_key() {
        let text = format!("{MINIMAL}train:\n  lr: 1.0e-4\n  warmup_step: 3\n");
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.starts_with("r.yaml"), "{err}");
        assert!(err.contains("line 9"), "{err}");
        assert!(err.contains("unknown field `warmup_step`"), "{err}");
        assert!(err.contains("did you mean `warmup_steps`?"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = format!("{MINIMAL}lora:\n  rank: eight\n");
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("`lora.rank`") && err.contains("line 8"), "{err}");
        let text = format!("{MINIMAL}train:\n  schedule: cosin\n");
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("`train.schedule`") && err.contains("cosine"), "{err}");
    }

    #[test]
    fn overrides_are_typed_by_the_schema() {
        let r = parse(
            MINIMAL,
            &["train.lr=1e-4", "lora.target_modules=[q_proj,v_proj,down_proj]", "train.max_grad_norm=null", "dataset.packed=true"],
        )
        .unwrap();
        assert_eq!(r.train.lr, 1e-4);
        assert_eq!(r.lora.target_modules.as_ref().and_then(|t| t.names()).unwrap(), ["q_proj", "v_proj", "down_proj"]);
        assert_eq!(r.train.max_grad_norm, None);
        assert!(r.dataset.packed);
        let r = parse(MINIMAL, &["lora.target_modules=all-linear"]).unwrap();
        assert!(r.lora.target_modules.unwrap().is_all_linear());
        let err = parse(MINIMAL, &["train.lrate=1"]).unwrap_err().to_string();
        assert!(err.contains("did you mean `train.lr`"), "{err}");
        let err = parse(MINIMAL, &["train.batch_size=big"]).unwrap_err().to_string();
        assert!(err.contains("train.batch_size") && err.contains("overrides"), "{err}");
        assert!(parse(MINIMAL, &["train.lr"]).is_err());
    }

    #[test]
    fn invalid_values_are_refused() {
        assert!(parse(MINIMAL, &["lora.target_modules=[]"]).is_err());
        assert!(parse(MINIMAL, &["lora.target_modules=all"]).is_err());
        assert!(parse(MINIMAL, &["lora.dropout=1.5"]).is_err());
        assert!(parse(MINIMAL, &["train.max_grad_norm=0"]).is_err());
        assert!(parse(MINIMAL, &["lora.rank=0"]).is_err());
    }

    /// train.devices: a number or a list of indices; each refusal names the key and why.
    #[test]
    fn devices_are_a_count_or_a_list_that_splits_the_batch() {
        assert_eq!(parse(MINIMAL, &[]).unwrap().train.devices.indices(), vec![0]);
        assert_eq!(parse(MINIMAL, &["train.devices=2"]).unwrap().train.devices.indices(), vec![0, 1]);
        assert_eq!(parse(MINIMAL, &["train.devices=[1, 3]"]).unwrap().train.devices.indices(), vec![1, 3]);
        let err = |o: &[&str]| parse(MINIMAL, o).unwrap_err().to_string();
        let e = err(&["train.devices=3"]);
        assert!(e.contains("train.devices") && e.contains("train.batch_size 4") && e.contains("divisible by 3"), "{e}");
        let e = err(&["train.devices=0"]);
        assert!(e.contains("train.devices") && e.contains("at least 1"), "{e}");
        let e = err(&["train.devices=[2, 2]"]);
        assert!(e.contains("train.devices") && e.contains("device 2 is listed twice"), "{e}");
        // Over nodes: every node's replicas count, and each address is checked.
        let nodes = |rest: &[&str]| {
            let mut o = vec!["train.nodes.count=2", "train.nodes.rank=1", "train.nodes.address=10.0.0.1:29500"];
            o.extend_from_slice(rest);
            parse(MINIMAL, &o).map(|r| r.train.nodes.unwrap().port()).map_err(|e| e.to_string())
        };
        assert_eq!(nodes(&["train.devices=2"]), Ok(Some(29500)));
        let e = nodes(&["train.devices=3", "train.batch_size=9"]).unwrap_err();
        assert!(e.contains("train.devices × train.nodes.count") && e.contains("6 replicas") && e.contains("train.batch_size 9"), "{e}");
        let e = nodes(&["train.nodes.rank=2"]).unwrap_err();
        assert!(e.contains("train.nodes.rank") && e.contains("below train.nodes.count (2), got 2"), "{e}");
        let e = nodes(&["train.nodes.count=1", "train.nodes.rank=0"]).unwrap_err();
        assert!(e.contains("train.nodes.count") && e.contains("at least 2"), "{e}");
        let e = nodes(&["train.nodes.address=10.0.0.1"]).unwrap_err();
        assert!(e.contains("train.nodes.address") && e.contains("HOST:PORT"), "{e}");
        let e = nodes(&["train.nodes.address=ws://10.0.0.1:x"]).unwrap_err();
        assert!(e.contains("train.nodes.address") && e.contains("HOST:PORT"), "{e}");
        // Resuming on another number of devices continues the same run.
        let (one, two) = (parse(MINIMAL, &[]).unwrap(), parse(MINIMAL, &["train.devices=2"]).unwrap());
        assert!(crate::train::breaking_changes(&one, &two).is_empty());
    }

    /// The eval keys: defaults off; a split in (0, 1) or a file, not both; eval_every,
    /// save_best and early stopping only with an eval set; each error names its key.
    #[test]
    fn eval_keys_are_checked_naming_the_key() {
        let r = parse(MINIMAL, &[]).unwrap();
        assert!(!r.dataset.has_eval() && r.train.eval_every.is_none() && !r.output.save_best);
        assert!(r.train.early_stopping_patience.is_none());
        let ok =
            parse(MINIMAL, &["dataset.eval_split=0.05", "train.eval_every=10", "output.save_best=true", "train.early_stopping_patience=3"])
                .unwrap();
        assert_eq!((ok.dataset.eval_split, ok.train.eval_every, ok.train.early_stopping_patience), (Some(0.05), Some(10), Some(3)));
        let file = parse(MINIMAL, &["dataset.eval_path=held.jsonl"]).unwrap();
        assert_eq!(file.dataset.eval_path, Some(std::env::current_dir().unwrap().join("held.jsonl")));
        let err = |o: &[&str]| parse(MINIMAL, o).unwrap_err().to_string();
        for bad in ["0", "1", "1.5", "-0.1"] {
            let e = err(&[&format!("dataset.eval_split={bad}")]);
            assert!(e.contains("dataset.eval_split") && e.contains("(0, 1)"), "{e}");
        }
        let e = err(&["dataset.eval_split=0.1", "dataset.eval_path=/x.jsonl"]);
        assert!(e.contains("dataset.eval_split") && e.contains("not both"), "{e}");
        let e = err(&["dataset.eval_split=0.1", "train.eval_every=0"]);
        assert!(e.contains("train.eval_every") && e.contains("at least 1"), "{e}");
        for key in ["train.eval_every=5", "output.save_best=true", "train.early_stopping_patience=2"] {
            let e = err(&[key]);
            assert!(e.contains(key.split('=').next().unwrap()) && e.contains("needs an eval set"), "{e}");
        }
        let e = err(&["dataset.eval_split=0.1", "train.early_stopping_patience=2"]);
        assert!(e.contains("train.early_stopping_patience") && e.contains("train.eval_every"), "{e}");
        let e = err(&["dataset.eval_split=0.1", "train.eval_every=2", "train.early_stopping_patience=0"]);
        assert!(e.contains("train.early_stopping_patience") && e.contains("at least 1"), "{e}");
        // They change the run: a resume with other values is refused, naming them.
        let saved = parse(&ok.to_yaml(), &[]).unwrap();
        let other =
            parse(MINIMAL, &["dataset.eval_split=0.05", "train.eval_every=5", "output.save_best=true", "train.early_stopping_patience=3"])
                .unwrap();
        assert_eq!(crate::train::breaking_changes(&saved, &other), vec!["train.eval_every".to_string()]);
    }

    #[test]
    fn chat_template_is_a_builtin_or_a_file() {
        let r = parse(MINIMAL, &["dataset.chat_template=chatml"]).unwrap();
        assert_eq!(r.dataset.chat_template.as_deref(), Some("chatml"));
        let (source, origin) = r.dataset.chat_template_source().unwrap().unwrap();
        assert_eq!(source, crate::hf::chat_template::CHATML);
        assert!(origin.contains("chatml"), "{origin}");
        assert_eq!(parse(MINIMAL, &[]).unwrap().dataset.chat_template_source().unwrap(), None);

        // An unknown name lists the built-ins.
        let err = parse(MINIMAL, &["dataset.chat_template=chatlm"]).unwrap_err().to_string();
        assert!(err.contains("dataset.chat_template") && err.contains("unknown built-in template `chatlm`"), "{err}");
        assert!(err.contains("did you mean `chatml`?") && err.contains("built-ins: chatml"), "{err}");

        // A path: relative to the current directory, `~` expanded, and it must exist.
        let dir = crate::fsutil::TempDir::new("recipe-template", &[("t.jinja", "{{ messages[0].content }}")]);
        let file = dir.0.join("t.jinja");
        let r = parse(MINIMAL, &[&format!("dataset.chat_template={}", file.display())]).unwrap();
        assert_eq!(r.dataset.chat_template_source().unwrap().unwrap().0, "{{ messages[0].content }}");
        let missing = dir.0.join("nope.jinja");
        let err = parse(MINIMAL, &[&format!("dataset.chat_template={}", missing.display())]).unwrap_err().to_string();
        assert!(err.contains("dataset.chat_template") && err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("no such file"), "{err}");
        let relative = "model:\n  path: /m\ndataset:\n  path: /d.jsonl\n  chat_template: templates/missing.jinja\noutput:\n  dir: /out\n";
        let err = parse(relative, &[]).unwrap_err().to_string();
        let expected = std::env::current_dir().unwrap().join("templates/missing.jinja");
        assert!(err.contains(&expected.display().to_string()), "{err}");
        let home = "model:\n  path: /m\ndataset:\n  path: /d.jsonl\n  chat_template: ~/missing-tune-template.jinja\noutput:\n  dir: /out\n";
        let err = parse(home, &[]).unwrap_err().to_string();
        assert!(!err.contains('~') && err.contains("missing-tune-template.jinja"), "{err}");
    }

    #[test]
    fn paths_resolve_home_and_cwd() {
        let r = parse("model:\n  path: ~/m\ndataset:\n  path: d.jsonl\noutput:\n  dir: out\n", &[]).unwrap();
        assert!(r.model.path.is_absolute() && r.model.path.ends_with("m"));
        assert!(!r.model.path.to_string_lossy().contains('~'));
        assert_eq!(r.dataset.path, Some(std::env::current_dir().unwrap().join("d.jsonl")));
    }
}
