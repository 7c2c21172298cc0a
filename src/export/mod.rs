//! Export: turns a run, a checkpoint or an adapter into files other tools load. One file per
//! target:
//!
//! - `peft.rs`: the adapter in the PEFT profile every consumer accepts (PEFT, vLLM, llama.cpp's
//!   convert_lora_to_gguf, Ollama, mistral.rs);
//! - `merged.rs`: W + s·B·A for every adapted layer, as a full Hugging Face checkpoint;
//! - `gguf.rs`: the same merged model as one GGUF file for llama.cpp and Ollama (its tokenizer
//!   metadata in `gguf_vocab.rs`);
//! - `gguf_adapter.rs`: the adapter as a llama.cpp GGUF LoRA;
//! - `ollama.rs`: a directory Ollama builds a model from (Modelfile + GGUF).
//!
//! An adapter's `chat_template.jinja` (the template it was trained with) goes into both: beside
//! the exported adapter, and as the merged model's chat template in place of the base's.
//!
//! Both read the adapter straight from its safetensors file and the base model from its
//! memory-mapped shards, one tensor at a time: no burn model is built, and a merged export
//! holds at most one output shard in memory. This file holds what they share: the source, the
//! adapter's tensors, the checks against the base model, the output directory rules.

pub mod gguf;
pub mod gguf_adapter;
pub mod gguf_vocab;
pub mod merged;
pub mod ollama;
pub mod peft;

pub use crate::hf::safetensors::OutDtype;
pub use gguf::{export_gguf, GgufOptions, GgufType};
pub use gguf_adapter::export_gguf_adapter;
pub use merged::export_merged;
pub use ollama::export_ollama;
pub use peft::export_adapter;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hf::Weights;
use crate::model::config::WeightLayout;
use crate::model::ModelConfig;
use crate::peft::{self as peft_format, AdapterConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::train::checkpoint;

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

/// One adapted module: PEFT's lora_A [r, in] and lora_B [out, r], row-major f32, and DoRA's
/// lora_magnitude_vector [out].
pub(crate) struct LoraPair {
    module: String,
    a: Vec<f32>,
    b: Vec<f32>,
    magnitude: Option<Vec<f32>>,
    r: usize,
    fan_in: usize,
    out: usize,
}

/// Reads every lora_A/lora_B pair of an adapter, with its magnitude when the config says
/// use_dora; anything else in the file is an error.
pub(crate) fn read_pairs(dir: &Path, c: &AdapterConfig) -> Result<Vec<LoraPair>> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let weights = Weights::open_file(&path)?;
    let mut parts: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
    for name in weights.names() {
        let split = peft_format::split_peft_key(name).filter(|(_, which)| c.use_dora || *which != peft_format::MAGNITUDE);
        let Some((module, which)) = split else {
            let expected = if c.use_dora {
                "base_model.model.<module>.lora_A.weight, .lora_B.weight or .lora_magnitude_vector"
            } else {
                "base_model.model.<module>.lora_A.weight or .lora_B.weight; a lora_magnitude_vector needs use_dora: true"
            };
            return Err(Error::Tensor {
                path: path.clone(),
                name: name.to_string(),
                msg: format!("not a LoRA tensor (expected {expected})"),
            });
        };
        let slot = match which {
            "lora_A" => 0,
            "lora_B" => 1,
            _ => 2,
        };
        parts.entry(module.to_string()).or_default()[slot] = Some(name.to_string());
    }
    let mut pairs = Vec::new();
    for (module, [a_name, b_name, m_name]) in parts {
        let (Some(a_name), Some(b_name)) = (a_name, b_name) else {
            return Err(Error::Tensor { path: path.clone(), name: module, msg: "has only one of lora_A / lora_B".into() });
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
        let magnitude = match m_name {
            Some(m) => Some(weights.read_f32(&m, &[sb[0]])?),
            None if c.use_dora => {
                return Err(Error::Tensor {
                    path: path.clone(),
                    name: peft_format::magnitude_key(&module),
                    msg: format!("missing: {ADAPTER_CONFIG} says use_dora: true, so every adapted layer needs one"),
                })
            }
            None => None,
        };
        pairs.push(LoraPair {
            a: weights.read_f32(&a_name, &sa)?,
            b: weights.read_f32(&b_name, &sb)?,
            magnitude,
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

/// How the base model stores its linear layers: its config says (GPT-2's Conv1D is [in, out]).
pub(crate) fn base_layout(base_dir: &Path) -> Result<WeightLayout> {
    Ok(ModelConfig::from_model_dir(base_dir)?.layout)
}

/// Every adapted module must be a weight of the base model with shape [out, in] ([in, out] for
/// a Conv1D model).
pub(crate) fn check_against_base(pairs: &[LoraPair], base: &Weights, layout: WeightLayout, adapter_dir: &Path) -> Result<()> {
    for p in pairs {
        let expected = match layout {
            WeightLayout::OutIn => [p.out, p.fan_in],
            WeightLayout::InOut => [p.fan_in, p.out],
        };
        let name = format!("{}.weight", p.module);
        let adapter_tensor = peft_format::peft_key(&p.module, "lora_A");
        match base.meta(&name) {
            None => {
                return Err(Error::Tensor {
                    path: adapter_dir.join(ADAPTER_WEIGHTS),
                    name: adapter_tensor,
                    msg: format!("the base model in {} has no `{name}` (an adapter for another model?)", base.dir().display()),
                })
            }
            Some(m) if m.shape != expected => {
                return Err(Error::Tensor {
                    path: adapter_dir.join(ADAPTER_WEIGHTS),
                    name: adapter_tensor,
                    msg: format!(
                        "shape mismatch: lora_B·lora_A is [{}, {}], so the base model's `{name}` should be {expected:?}, but it is {:?} (an adapter for another model?)",
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
    let (c, _) = peft_format::read_adapter_config(adapter_dir)?;
    Ok(c.base_model_name_or_path.map(PathBuf::from).filter(|p| p.join("config.json").is_file()))
}

/// Refuses to replace an existing, non-empty output unless asked, and never the input.
pub(crate) fn check_output(out: &Path, overwrite: bool, inputs: &[&Path]) -> Result<()> {
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

pub(crate) fn write_text(path: &Path, text: &str) -> Result<()> {
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

pub(crate) fn written(dir: &Path) -> Written {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    files.sort();
    Written { dir: dir.to_path_buf(), files, bytes: checkpoint::size_bytes(dir) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use merged::merge_into;

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
        let p = LoraPair { module: "m".into(), a: vec![1.0, 0.0, -1.0], b: vec![1.0, 2.0], magnitude: None, r: 1, fan_in: 3, out: 2 };
        let mut w = vec![0.0; 6];
        merge_into(&mut w, &p, 0.5, WeightLayout::OutIn);
        assert_eq!(w, vec![0.5, 0.0, -0.5, 1.0, 0.0, -1.0]);
        // A Conv1D weight is [in, out]: the same update, transposed.
        let mut w = vec![0.0; 6];
        merge_into(&mut w, &p, 0.5, WeightLayout::InOut);
        assert_eq!(w, vec![0.5, 1.0, 0.0, 0.0, -0.5, -1.0]);
    }

    #[test]
    fn peft_keys_split() {
        assert_eq!(
            peft_format::split_peft_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj", "lora_A"))
        );
        assert_eq!(peft_format::split_peft_key("base_model.model.x.lora_B.default.weight"), Some(("x", "lora_B")));
        assert_eq!(peft_format::split_peft_key("model.x.weight"), None);
    }
}
