//! Export: turns a run, a checkpoint or an adapter into files other tools load.
//!
//! - **Adapter profile**: the PEFT layout in the form every consumer accepts (PEFT, vLLM,
//!   llama.cpp's convert_lora_to_gguf, Ollama, mistral.rs): one unsharded
//!   `adapter_model.safetensors` with lora_A/lora_B tensors only, an integer `lora_alpha`, and
//!   `use_rslora: false` — vLLM and llama.cpp ignore rsLoRA and non-integer alphas, so any
//!   difference between the trained scale and alpha/r is folded into lora_B instead.
//! - **Merged**: W + s·B·A for every adapted projection, written as a full Hugging Face
//!   checkpoint (config, shards + index, tokenizer and chat template files).
//!
//! An adapter's `chat_template.jinja` (the template it was trained with) goes into both: beside
//! the exported adapter, and as the merged model's chat template in place of the base's.
//!
//! Both read the adapter straight from its safetensors file and the base model from its
//! memory-mapped shards, one tensor at a time: no burn model is built, and a merged export
//! holds at most one output shard in memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use half::{bf16, f16};
use safetensors::Dtype;

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::hf::{adapter_template, Weights};
use crate::lora::{self, AdapterConfig, LoraConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};

/// Storage dtype of exported tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutDtype {
    F32,
    #[default]
    Bf16,
    F16,
}

impl FromStr for OutDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(OutDtype::F32),
            "bf16" | "bfloat16" => Ok(OutDtype::Bf16),
            "f16" | "float16" => Ok(OutDtype::F16),
            _ => Err(format!("unknown dtype `{s}` (expected bf16, f16 or f32)")),
        }
    }
}

impl OutDtype {
    /// The name transformers writes in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::Bf16 => "bfloat16",
            OutDtype::F16 => "float16",
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            OutDtype::F32 => Dtype::F32,
            OutDtype::Bf16 => Dtype::BF16,
            OutDtype::F16 => Dtype::F16,
        }
    }

    fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::Bf16 | OutDtype::F16 => 2,
        }
    }

    /// Little-endian bytes, rounding to nearest even as torch's `.to(dtype)` does.
    fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            OutDtype::F32 => lora::f32_bytes(v),
            OutDtype::Bf16 => v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
            OutDtype::F16 => v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
        }
    }
}

/// Parses a shard size the way transformers' `max_shard_size` does: `5GB` (10⁹), `500MB`,
/// `2GiB` (2³⁰), `100KB`, or a plain number of bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size (e.g. 5GB, 500MB, 2GiB)"))?;
    let mult: f64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (KB, MB, GB, KiB, MiB, GiB)")),
    };
    let bytes = num * mult;
    if bytes.is_nan() || bytes < 1.0 {
        return Err(format!("`{s}`: the shard size must be positive"));
    }
    Ok(bytes as u64)
}

/// What is being exported: an adapter directory, and what is known of the run that made it.
#[derive(Debug, Clone)]
pub struct Source {
    pub adapter_dir: PathBuf,
    /// Optimizer steps behind the adapter, when it comes from a run or checkpoint.
    pub step: Option<usize>,
    /// Training loss of that step (from the run's metrics.jsonl).
    pub loss: Option<f32>,
    /// The run's recipe.
    pub recipe_yaml: Option<String>,
}

/// Resolves SRC: a checkpoint directory, a run directory (its latest complete checkpoint, or
/// its final `adapter/` when it has none), or a PEFT adapter directory.
pub fn resolve_source(path: &Path) -> Result<Source> {
    if !path.is_dir() {
        return Err(Error::Model(format!("{}: no such directory", path.display())));
    }
    if path.join(ADAPTER_CONFIG).is_file() {
        // An adapter; if it sits in a checkpoint or run directory, that one says more.
        let parent = path.parent().filter(|_| path.file_name().is_some_and(|n| n == "adapter"));
        if let Some(p) = parent.filter(|p| p.join("trainer_state.json").is_file()) {
            return from_checkpoint(&checkpoint::open(p)?);
        }
        let mut src = Source { adapter_dir: path.to_path_buf(), step: None, loss: None, recipe_yaml: None };
        if let Some(run) = parent.filter(|p| p.join("metrics.jsonl").is_file()) {
            fill_from_run(&mut src, run, None);
        }
        return Ok(src);
    }
    if path.join("trainer_state.json").is_file() || path.join(".complete").is_file() {
        return from_checkpoint(&checkpoint::open(path)?);
    }
    if let Some(latest) = checkpoint::list(path).pop() {
        return from_checkpoint(&latest);
    }
    Err(Error::Model(format!(
        "{}: nothing to export: not an adapter directory (no {ADAPTER_CONFIG}), and no complete checkpoint \
         under {} (a run writes one every output.save_every steps and at its end)",
        path.display(),
        checkpoint::checkpoints_dir(path).display()
    )))
}

fn from_checkpoint(found: &checkpoint::Found) -> Result<Source> {
    let mut src = Source {
        adapter_dir: found.dir.join("adapter"),
        step: Some(found.state.step),
        loss: None,
        recipe_yaml: std::fs::read_to_string(found.dir.join("recipe.yaml")).ok(),
    };
    // checkpoints/step_N/ -> the run directory.
    if let Some(run) = found.dir.parent().and_then(Path::parent) {
        fill_from_run(&mut src, run, Some(found.state.step));
    }
    Ok(src)
}

fn fill_from_run(src: &mut Source, run: &Path, step: Option<usize>) {
    if let Ok(metrics) = crate::train::metrics::read(&run.join("metrics.jsonl")) {
        let m = match step {
            Some(s) => metrics.iter().find(|m| m.step == s),
            None => metrics.last(),
        };
        if let Some(m) = m {
            src.step = Some(m.step);
            src.loss = Some(m.loss);
        }
    }
    if src.recipe_yaml.is_none() {
        src.recipe_yaml = std::fs::read_to_string(run.join("recipe.yaml")).ok();
    }
}

/// One adapted module: PEFT's lora_A [r, in] and lora_B [out, r], row-major f32.
struct LoraPair {
    module: String,
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    fan_in: usize,
    out: usize,
}

/// Reads every lora_A/lora_B pair of an adapter; anything else in the file is an error.
fn read_pairs(dir: &Path, c: &AdapterConfig) -> Result<Vec<LoraPair>> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let weights = Weights::open_file(&path)?;
    let mut halves: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    for name in weights.names() {
        let Some((module, which)) = lora::split_peft_key(name) else {
            return Err(Error::Tensor {
                path: path.clone(),
                name: name.to_string(),
                msg: "not a LoRA tensor (expected base_model.model.<module>.lora_A.weight or .lora_B.weight)".into(),
            });
        };
        let slot = if which == "lora_A" { 0 } else { 1 };
        halves.entry(module.to_string()).or_default()[slot] = Some(name.to_string());
    }
    let mut pairs = Vec::new();
    for (module, [a_name, b_name]) in halves {
        let (Some(a_name), Some(b_name)) = (a_name, b_name) else {
            return Err(Error::Tensor {
                path: path.clone(),
                name: module,
                msg: "has only one of lora_A / lora_B".into(),
            });
        };
        let shape = |n: &str| weights.meta(n).map(|m| m.shape).unwrap_or_default();
        let (sa, sb) = (shape(&a_name), shape(&b_name));
        if sa.len() != 2 || sb.len() != 2 || sa[0] != c.r || sb[1] != c.r {
            return Err(Error::Tensor {
                path: path.clone(),
                name: a_name,
                msg: format!("expected lora_A [r={}, in] and lora_B [out, r={}], found {sa:?} and {sb:?}", c.r, c.r),
            });
        }
        pairs.push(LoraPair {
            a: weights.read_f32(&a_name, &sa)?,
            b: weights.read_f32(&b_name, &sb)?,
            module,
            r: c.r,
            fan_in: sa[1],
            out: sb[0],
        });
    }
    if pairs.is_empty() {
        return Err(Error::Model(format!("{}: the adapter holds no lora_A/lora_B tensors", path.display())));
    }
    Ok(pairs)
}

/// Every adapted module must be a weight of the base model with shape [out, in].
fn check_against_base(pairs: &[LoraPair], base: &Weights, adapter_dir: &Path) -> Result<()> {
    for p in pairs {
        let name = format!("{}.weight", p.module);
        let adapter_tensor = lora::peft_key(&p.module, "lora_A");
        match base.meta(&name) {
            None => {
                return Err(Error::Tensor {
                    path: adapter_dir.join(ADAPTER_WEIGHTS),
                    name: adapter_tensor,
                    msg: format!("the base model in {} has no `{name}` (an adapter for another model?)", base.dir().display()),
                })
            }
            Some(m) if m.shape != [p.out, p.fan_in] => {
                return Err(Error::Tensor {
                    path: adapter_dir.join(ADAPTER_WEIGHTS),
                    name: adapter_tensor,
                    msg: format!(
                        "shape mismatch: lora_B·lora_A is [{}, {}] but the base model's `{name}` is {:?} (an adapter for another model?)",
                        p.out, p.fan_in, m.shape
                    ),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The base model directory: `--model`, else the adapter's `base_model_name_or_path` when that
/// is a local directory.
pub fn base_dir(explicit: Option<&Path>, adapter_dir: &Path) -> Result<Option<PathBuf>> {
    if let Some(p) = explicit {
        return Ok(Some(p.to_path_buf()));
    }
    let (c, _) = lora::read_adapter_config(adapter_dir)?;
    Ok(c.base_model_name_or_path.map(PathBuf::from).filter(|p| p.join("config.json").is_file()))
}

/// Refuses to replace an existing, non-empty output unless asked, and never the input.
fn check_output(out: &Path, overwrite: bool, inputs: &[&Path]) -> Result<()> {
    let canon = |p: &Path| p.canonicalize().ok();
    if let Some(o) = canon(out) {
        if inputs.iter().any(|i| canon(i).is_some_and(|i| i.starts_with(&o) || o.starts_with(&i))) {
            return Err(Error::Unsupported(format!(
                "{}: the output directory overlaps an input of the export; choose another",
                out.display()
            )));
        }
    }
    let non_empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if non_empty && !overwrite {
        return Err(Error::Unsupported(format!("{} already exists and is not empty; pass --overwrite to replace it", out.display())));
    }
    if out.exists() && !out.is_dir() {
        return Err(Error::Unsupported(format!("{} exists and is not a directory", out.display())));
    }
    Ok(())
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Options shared by both exports.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub dtype: OutDtype,
    /// The base model directory (needed for merged; checked against for adapters when known).
    pub base: Option<PathBuf>,
    /// `base_model_name_or_path` to write instead of the recorded one (e.g. a hub id).
    pub base_name: Option<String>,
    pub overwrite: bool,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub dir: PathBuf,
    pub files: Vec<String>,
    pub bytes: u64,
}

/// Writes the adapter profile into `out`.
pub fn export_adapter(src: &Source, out: &Path, opts: &Options) -> Result<Written> {
    let (c, config) = lora::read_adapter_config(&src.adapter_dir)?;
    let mut pairs = read_pairs(&src.adapter_dir, &c)?;
    if let Some(base) = &opts.base {
        check_against_base(&pairs, &Weights::open(base)?, &src.adapter_dir)?;
    }
    check_output(out, opts.overwrite, &[&src.adapter_dir])?;

    // Consumers compute the scale as lora_alpha / r from an integer alpha; fold the rest into B.
    let alpha = config.alpha.round().max(1.0);
    let fold = config.scale() * config.rank as f64 / alpha;
    if fold != 1.0 {
        for p in &mut pairs {
            p.b.iter_mut().for_each(|x| *x = (*x as f64 * fold) as f32);
        }
    }
    let mut tensors = Vec::new();
    for p in &pairs {
        tensors.push((lora::peft_key(&p.module, "lora_A"), vec![p.r, p.fan_in], opts.dtype.encode(&p.a)));
        tensors.push((lora::peft_key(&p.module, "lora_B"), vec![p.out, p.r], opts.dtype.encode(&p.b)));
    }
    let targets = target_kinds(&pairs);
    let base_name = opts.base_name.clone().or(c.base_model_name_or_path.clone()).unwrap_or_default();
    let adapter_config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": alpha as u64,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "base_model_name_or_path": base_name,
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let card = model_card(src, &base_name, &config, &targets, alpha, fold, opts.dtype);
    crate::fsutil::write_dir_atomically(out, |tmp| {
        crate::hf::safetensors::write(&tmp.join(ADAPTER_WEIGHTS), &tensors, opts.dtype.safetensors())?;
        write_text(&tmp.join(ADAPTER_CONFIG), &(serde_json::to_string_pretty(&adapter_config).expect("json") + "\n"))?;
        adapter_template::copy(&src.adapter_dir, tmp)?;
        write_text(&tmp.join("README.md"), &card)
    })?;
    Ok(written(out))
}

/// The projection kinds adapted (q_proj, ...), in the model's order.
fn target_kinds(pairs: &[LoraPair]) -> Vec<String> {
    let kinds: std::collections::BTreeSet<&str> = pairs.iter().map(|p| p.module.rsplit('.').next().unwrap_or(&p.module)).collect();
    let mut out: Vec<String> = crate::recipe::PROJECTIONS.iter().filter(|k| kinds.contains(**k)).map(|s| s.to_string()).collect();
    out.extend(kinds.iter().filter(|k| !crate::recipe::PROJECTIONS.contains(k)).map(|s| s.to_string()));
    out
}

fn model_card(src: &Source, base: &str, c: &LoraConfig, targets: &[String], alpha: f64, fold: f64, dtype: OutDtype) -> String {
    // The hub's metadata wants a repo id; a local path would be rejected there.
    let hub_id = !base.is_empty() && !base.starts_with(['/', '.', '~']) && base.matches('/').count() == 1;
    let mut s = String::from("---\nlibrary_name: peft\ntags:\n- lora\n- tune\n");
    if hub_id {
        s += &format!("base_model: {base}\n");
    }
    s += "---\n\n";
    s += &format!("# LoRA adapter for {}\n\n", if base.is_empty() { "(unknown base model)" } else { base });
    s += &format!("Trained with tune {}.\n\n", env!("CARGO_PKG_VERSION"));
    if let Some(step) = src.step {
        s += &format!("- optimizer steps: {step}\n");
    }
    if let Some(loss) = src.loss {
        s += &format!("- final training loss: {loss:.4}\n");
    }
    s += &format!(
        "- LoRA: rank {}, alpha {}{}, dropout {}, on {}\n",
        c.rank,
        c.alpha,
        if c.use_rslora { " (rsLoRA)" } else { "" },
        c.dropout,
        targets.join(", ")
    );
    if fold != 1.0 {
        s += &format!(
            "- exported with lora_alpha {alpha} and use_rslora false; the trained scale ({:.6}) is kept by \
             multiplying lora_B by {fold:.6}, so every consumer computes the same output\n",
            c.scale()
        );
    }
    s += &format!("- tensors stored as {}\n\n", dtype.torch_name());
    s += "## Use\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n";
    s += &format!("base = AutoModelForCausalLM.from_pretrained(\"{base}\")\nmodel = PeftModel.from_pretrained(base, \"path/to/this/dir\")\n```\n\n");
    s += "or with tune: `tune generate --model BASE --adapter THIS_DIR --prompt \"...\"`\n";
    if let Some(recipe) = &src.recipe_yaml {
        s += &format!("\n## Recipe\n\n```yaml\n{}\n```\n", recipe.trim_end());
    }
    s
}

/// Files copied unchanged from the base model directory into a merged export.
const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Writes base + adapter merged (W + s·B·A) as a full Hugging Face checkpoint into `out`.
pub fn export_merged(src: &Source, out: &Path, max_shard_bytes: u64, opts: &Options) -> Result<Written> {
    let (c, config) = lora::read_adapter_config(&src.adapter_dir)?;
    let pairs = read_pairs(&src.adapter_dir, &c)?;
    let base_dir = match &opts.base {
        Some(b) => b.clone(),
        None => {
            return Err(Error::Unsupported(format!(
                "a merged export needs the base model: pass --model DIR ({} names `{}`, which is not a local model directory)",
                src.adapter_dir.join(ADAPTER_CONFIG).display(),
                c.base_model_name_or_path.unwrap_or_default()
            )))
        }
    };
    let base = Weights::open(&base_dir)?;
    check_against_base(&pairs, &base, &src.adapter_dir)?;
    check_output(out, opts.overwrite, &[&src.adapter_dir, &base_dir])?;
    let config_path = base_dir.join("config.json");
    let mut hf_config: serde_json::Value = crate::error::read_json(&config_path)?;
    let Some(obj) = hf_config.as_object_mut() else {
        return Err(Error::format(&config_path, "expected a JSON object"));
    };
    if obj.contains_key("quantization_config") {
        return Err(Error::Unsupported(format!("{}: merging into a quantized base model is not supported", config_path.display())));
    }
    // transformers ≥ 4.56 writes `dtype`, older versions `torch_dtype`: update whichever is there.
    let keys: Vec<&str> = ["torch_dtype", "dtype"].into_iter().filter(|k| obj.contains_key(*k)).collect();
    for k in if keys.is_empty() { vec!["torch_dtype"] } else { keys } {
        obj.insert(k.to_string(), opts.dtype.torch_name().into());
    }

    let scale = config.scale();
    let by_weight: BTreeMap<String, &LoraPair> = pairs.iter().map(|p| (format!("{}.weight", p.module), p)).collect();
    // Shards as transformers cuts them: in name order, a new one when the next tensor would
    // overflow the limit.
    let names: Vec<String> = base.names().map(str::to_string).collect();
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let (mut current, mut total) = (0u64, 0u64);
    for name in &names {
        let meta = base.meta(name).expect("listed");
        let bytes = (meta.shape.iter().product::<usize>() * opts.dtype.size()) as u64;
        if current > 0 && current + bytes > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += bytes;
        total += bytes;
        shards.last_mut().expect("non-empty").push((name.clone(), meta.shape));
    }
    let n = shards.len();
    let file_name = |i: usize| if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
    let card = merged_card(src, &base_dir, &config, opts.dtype);
    let template = adapter_template::read(&src.adapter_dir)?;

    crate::fsutil::write_dir_atomically(out, |tmp| {
        let mut weight_map = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let mut tensors = Vec::with_capacity(shard.len());
            for (name, shape) in shard {
                let mut w = base.read_f32(name, shape)?;
                if let Some(p) = by_weight.get(name) {
                    merge_into(&mut w, p, scale);
                }
                tensors.push((name.clone(), shape.clone(), opts.dtype.encode(&w)));
                weight_map.insert(name.clone(), file_name(i));
            }
            crate::hf::safetensors::write(&tmp.join(file_name(i)), &tensors, opts.dtype.safetensors())?;
        }
        if n > 1 {
            let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
            write_text(&tmp.join("model.safetensors.index.json"), &(serde_json::to_string_pretty(&index).expect("json") + "\n"))?;
        }
        write_text(&tmp.join("config.json"), &(serde_json::to_string_pretty(&hf_config).expect("json") + "\n"))?;
        for f in COPIED {
            let from = base_dir.join(f);
            if from.is_file() {
                let to = tmp.join(f);
                std::fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
            }
        }
        // The adapter's chat template (the one it was trained with) replaces the base's.
        if let Some((source, _)) = &template {
            let _ = std::fs::remove_file(tmp.join("chat_template.json"));
            adapter_template::install_in_model_dir(tmp, source)?;
        }
        write_text(&tmp.join("README.md"), &card)
    })?;
    Ok(written(out))
}

/// w[out, in] += scale · B[out, r] · A[r, in], row by row (an axpy per rank).
fn merge_into(w: &mut [f32], p: &LoraPair, scale: f64) {
    for o in 0..p.out {
        let row = &mut w[o * p.fan_in..(o + 1) * p.fan_in];
        for k in 0..p.r {
            let coef = (scale * p.b[o * p.r + k] as f64) as f32;
            if coef == 0.0 {
                continue;
            }
            let a = &p.a[k * p.fan_in..(k + 1) * p.fan_in];
            row.iter_mut().zip(a).for_each(|(w, a)| *w += coef * a);
        }
    }
}

fn merged_card(src: &Source, base_dir: &Path, c: &LoraConfig, dtype: OutDtype) -> String {
    let mut s = format!(
        "# {} with a merged LoRA adapter\n\nWritten by tune {}: W + s·B·A for every adapted projection \
         (rank {}, alpha {}{}, s = {:.6}), stored as {}.\n\n",
        base_dir.file_name().unwrap_or_default().to_string_lossy(),
        env!("CARGO_PKG_VERSION"),
        c.rank,
        c.alpha,
        if c.use_rslora { ", rsLoRA" } else { "" },
        c.scale(),
        dtype.torch_name()
    );
    if let Some(step) = src.step {
        s += &format!("- optimizer steps: {step}\n");
    }
    if let Some(loss) = src.loss {
        s += &format!("- final training loss: {loss:.4}\n");
    }
    s += &format!("- base model: {}\n", base_dir.display());
    if let Some(recipe) = &src.recipe_yaml {
        s += &format!("\n## Recipe\n\n```yaml\n{}\n```\n", recipe.trim_end());
    }
    s
}

fn written(dir: &Path) -> Written {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    files.sort();
    Written { dir: dir.to_path_buf(), files, bytes: checkpoint::size_bytes(dir) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("100KB"), Ok(100_000));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0GB").is_err());
    }

    #[test]
    fn merge_adds_scaled_product() {
        // B [2, 1] = [1, 2], A [1, 3] = [1, 0, -1]; s = 0.5.
        let p = LoraPair { module: "m".into(), a: vec![1.0, 0.0, -1.0], b: vec![1.0, 2.0], r: 1, fan_in: 3, out: 2 };
        let mut w = vec![0.0; 6];
        merge_into(&mut w, &p, 0.5);
        assert_eq!(w, vec![0.5, 0.0, -0.5, 1.0, 0.0, -1.0]);
    }

    #[test]
    fn peft_keys_split() {
        assert_eq!(
            lora::split_peft_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj", "lora_A"))
        );
        assert_eq!(lora::split_peft_key("base_model.model.x.lora_B.default.weight"), Some(("x", "lora_B")));
        assert_eq!(lora::split_peft_key("model.x.weight"), None);
    }
}
