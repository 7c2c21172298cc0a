//! LoRA (Hu et al., 2021) as PEFT computes it: y = W·x + s·B(A(dropout(x))), s = alpha / r
//! (or alpha / √r with rsLoRA). The frozen W is never merged with B·A during training.
//!
//! Adapters are read and written in PEFT's layout (`adapter_config.json` +
//! `adapter_model.safetensors`, tensors `base_model.model.<module>.lora_A.weight` [r, in] and
//! `lora_B.weight` [out, r]) so that PEFT, vLLM and llama.cpp load what tune trains.

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::Backend;
use burn::tensor::module::linear;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{read_json, Error, Result};
use crate::hf::Weights;
use crate::model::{Llama, Projection};
use crate::rng::Rng;

#[derive(Debug, Clone)]
pub struct LoraAdapter<B: Backend> {
    /// lora_A transposed: [in_features, r] (PEFT stores [r, in]).
    pub a: Tensor<B, 2>,
    /// lora_B transposed: [r, out_features] (PEFT stores [out, r]).
    pub b: Tensor<B, 2>,
    /// alpha / r, or alpha / √r with rsLoRA.
    pub scale: f64,
    /// Dropout probability on the adapter's input; applied only while `dropout_seed` is set,
    /// which the training loop does before each forward pass (a fresh seed per micro-batch).
    pub dropout: f64,
    pub dropout_seed: Option<u64>,
}

impl<B: Backend> LoraAdapter<B> {
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// s·B(A(dropout(x))): two thin matmuls, never the [in, out] product.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = self.dropped(x.clone()).unwrap_or(x);
        let down = linear(x, self.a.clone(), None);
        linear(down, self.b.clone(), None) * self.scale
    }

    /// x after the adapter's dropout, or None when no dropout applies (p = 0, or not training).
    pub fn dropped<const D: usize>(&self, x: Tensor<B, D>) -> Option<Tensor<B, D>> {
        match self.dropout_seed {
            Some(seed) if self.dropout > 0.0 => {
                let mask = dropout_mask::<B, D>(&x.dims(), self.dropout, seed, &x.device());
                Some(x * mask)
            }
            _ => None,
        }
    }
}

/// Inverted dropout mask: 0 with probability p, else 1/(1-p). Drawn from tune's own seeded
/// generator so a run is reproducible on any backend and a resumed run draws the same masks.
fn dropout_mask<B: Backend, const D: usize>(dims: &[usize; D], p: f64, seed: u64, device: &B::Device) -> Tensor<B, D> {
    let n: usize = dims.iter().product();
    let mut rng = Rng::new(seed);
    let keep = (1.0 / (1.0 - p)) as f32;
    let data: Vec<f32> = (0..n).map(|_| if rng.next_f64() < p { 0.0 } else { keep }).collect();
    Tensor::from_data(TensorData::new(data, *dims), device)
}

/// The LoRA shape of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Projection names (`q_proj`, ...).
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// Adds fresh adapters to every targeted projection: A like PyTorch's nn.Linear init
/// (kaiming_uniform with a = √5, i.e. U(−1/√in, 1/√in)), B zeros, so training starts at the
/// base model exactly.
pub fn inject<B: Backend>(model: &mut Llama<B>, config: &LoraConfig, seed: u64, device: &B::Device) {
    let mut rng = Rng::new(seed);
    for p in targeted(model, &config.target_modules) {
        let (fan_in, out) = (p.in_features(), p.out_features());
        let bound = 1.0 / (fan_in as f64).sqrt();
        // Drawn in PEFT's [r, in] order, then stored transposed.
        let a_rows: Vec<f32> = (0..config.rank * fan_in)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let a = transpose(&a_rows, config.rank, fan_in);
        p.lora = Some(LoraAdapter {
            a: Tensor::from_data(TensorData::new(a, [fan_in, config.rank]), device),
            b: Tensor::zeros([config.rank, out], device),
            scale: config.scale(),
            dropout: config.dropout,
            dropout_seed: None,
        });
    }
}

/// The projections whose kind is in `targets`, in model order.
pub fn targeted<'m, B: Backend>(model: &'m mut Llama<B>, targets: &[String]) -> Vec<&'m mut Projection<B>> {
    model
        .projections_mut()
        .into_iter()
        .filter(|p| targets.iter().any(|t| t == p.kind()))
        .collect()
}

/// `adapter_config.json` as PEFT writes and reads it (the fields tune uses or checks).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default = "lora_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetList,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
}

fn lora_type() -> String {
    "LORA".into()
}
fn bias_none() -> String {
    "none".into()
}

/// PEFT writes target_modules as a list, or as a string (a regex, or "all-linear").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetList {
    List(Vec<String>),
    One(String),
}

/// File names of the PEFT layout.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The PEFT tensor name of a projection's lora_A / lora_B.
pub fn peft_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.{which}.weight")
}

/// The adapter directory behind `path`: a PEFT adapter directory itself, a checkpoint or
/// finished run directory (its `adapter/`), or a run that has only checkpoints (the latest
/// complete one's adapter).
pub fn resolve_adapter_dir(path: &Path) -> Result<std::path::PathBuf> {
    if path.join(ADAPTER_CONFIG).is_file() {
        return Ok(path.to_path_buf());
    }
    let inside = path.join("adapter");
    if inside.join(ADAPTER_CONFIG).is_file() {
        return Ok(inside);
    }
    if let Some(latest) = crate::checkpoint::list(path).pop() {
        return Ok(latest.dir.join("adapter"));
    }
    Err(Error::Model(format!(
        "{}: not an adapter (no {ADAPTER_CONFIG}), nor a run or checkpoint directory holding one",
        path.display()
    )))
}

/// Reads and checks `adapter_config.json`. Refuses what tune would get wrong silently (DoRA,
/// biases, per-module ranks, fan_in_fan_out, modules_to_save). The returned LoraConfig's
/// target_modules is empty: the tensors, not the config, say which projections are adapted.
pub fn read_adapter_config(dir: &Path) -> Result<(AdapterConfig, LoraConfig)> {
    let config_path = dir.join(ADAPTER_CONFIG);
    if !config_path.is_file() {
        return Err(Error::Model(format!(
            "{}: not a PEFT adapter directory (no {ADAPTER_CONFIG})",
            dir.display()
        )));
    }
    let c: AdapterConfig = read_json(&config_path)?;
    let refuse = |what: &str| Err(Error::Unsupported(format!("{}: {what} is not supported", config_path.display())));
    if c.peft_type != "LORA" {
        return refuse(&format!("peft_type `{}` (only LORA)", c.peft_type));
    }
    if c.use_dora {
        return refuse("use_dora: true");
    }
    if c.bias != "none" {
        return refuse(&format!("bias `{}` (only \"none\")", c.bias));
    }
    if c.fan_in_fan_out {
        return refuse("fan_in_fan_out: true");
    }
    if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
        return refuse("rank_pattern / alpha_pattern");
    }
    if c.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return refuse("modules_to_save");
    }
    if c.r == 0 {
        return Err(Error::format(&config_path, "`r` must be at least 1"));
    }
    let config = LoraConfig {
        rank: c.r,
        alpha: c.lora_alpha,
        dropout: c.lora_dropout,
        target_modules: Vec::new(),
        use_rslora: c.use_rslora,
    };
    Ok((c, config))
}

/// Splits a PEFT tensor name into (module path, "lora_A" | "lora_B"), accepting the variant with
/// PEFT's adapter name (`.lora_A.default.weight`) that some writers keep.
pub fn split_peft_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("base_model.model.")?;
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    for which in ["lora_A", "lora_B"] {
        if let Some(module) = rest.strip_suffix(which).and_then(|m| m.strip_suffix('.')) {
            return Some((module, which));
        }
    }
    None
}

/// Reads a PEFT adapter directory and attaches it to the model. Refuses what tune would get
/// wrong silently (see `read_adapter_config`) and any tensor that does not fit the model,
/// naming it.
pub fn load_peft<B: Backend>(model: &mut Llama<B>, dir: &Path, device: &B::Device) -> Result<LoraConfig> {
    let (c, config) = read_adapter_config(dir)?;
    let weights = Weights::open_file(&dir.join(ADAPTER_WEIGHTS))?;
    let mut used = std::collections::BTreeSet::new();
    let mut targets = std::collections::BTreeSet::new();
    for p in model.projections_mut() {
        let a_key = peft_key(&p.name, "lora_A");
        let b_key = peft_key(&p.name, "lora_B");
        // Some writers keep PEFT's adapter name in the key.
        let alt = |k: &str| k.replace(".weight", ".default.weight");
        let pick = |k: String| if weights.contains(&k) { Some(k) } else { Some(alt(&k)).filter(|k| weights.contains(k)) };
        let (Some(a_key), Some(b_key)) = (pick(a_key), pick(b_key)) else {
            continue;
        };
        let (fan_in, out) = (p.in_features(), p.out_features());
        let a = weights.read_f32(&a_key, &[c.r, fan_in])?;
        let b = weights.read_f32(&b_key, &[out, c.r])?;
        p.lora = Some(LoraAdapter {
            a: Tensor::from_data(TensorData::new(transpose(&a, c.r, fan_in), [fan_in, c.r]), device),
            b: Tensor::from_data(TensorData::new(transpose(&b, out, c.r), [c.r, out]), device),
            scale: config.scale(),
            dropout: config.dropout,
            dropout_seed: None,
        });
        targets.insert(p.kind().to_string());
        used.insert(a_key);
        used.insert(b_key);
    }
    if let Some(extra) = weights.names().find(|n| !used.contains(*n)) {
        return Err(Error::Tensor {
            path: dir.join(ADAPTER_WEIGHTS),
            name: extra.to_string(),
            msg: "does not match any projection of the base model (an adapter for another model?)".into(),
        });
    }
    if used.is_empty() {
        return Err(Error::Model(format!("{}: the adapter holds no lora_A/lora_B tensors", dir.display())));
    }
    let mut config = config;
    config.target_modules = crate::recipe::PROJECTIONS
        .iter()
        .filter(|p| targets.contains(**p))
        .map(|s| s.to_string())
        .collect();
    Ok(config)
}

/// Row-major [rows, cols] -> [cols, rows].
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// Writes the model's adapters in PEFT layout into `dir` (created; must not hold an adapter
/// already unless `overwrite`). Files go to a temporary directory first and are renamed into
/// place, so a crash never leaves a half-written adapter.
pub fn save_peft<B: Backend>(model: &Llama<B>, config: &LoraConfig, base_model: &str, dir: &Path) -> Result<()> {
    let mut tensors: Vec<crate::hf::safetensors::OwnedTensor> = Vec::new();
    for p in model.projections() {
        let Some(l) = &p.lora else { continue };
        let (fan_in, r, out) = (p.in_features(), l.rank(), p.out_features());
        let a: Vec<f32> = l.a.to_data().iter::<f32>().collect();
        let b: Vec<f32> = l.b.to_data().iter::<f32>().collect();
        tensors.push((peft_key(&p.name, "lora_A"), vec![r, fan_in], f32_bytes(&transpose(&a, fan_in, r))));
        tensors.push((peft_key(&p.name, "lora_B"), vec![out, r], f32_bytes(&transpose(&b, r, out))));
    }
    let adapter_config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": config.use_rslora,
        "use_dora": false,
        "modules_to_save": null,
        "base_model_name_or_path": base_model,
        "init_lora_weights": true,
        "inference_mode": true,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    crate::fsutil::write_dir_atomically(dir, |tmp| {
        crate::hf::safetensors::write(&tmp.join(ADAPTER_WEIGHTS), &tensors, safetensors::Dtype::F32)?;
        let path = tmp.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(&adapter_config).expect("json");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    })
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Number of trainable parameters the config adds to a model.
pub fn trainable_parameters<B: Backend>(model: &Llama<B>) -> usize {
    model
        .projections()
        .iter()
        .filter_map(|p| p.lora.as_ref().map(|l| l.rank() * (p.in_features() + p.out_features())))
        .sum()
}
