//! PEFT's adapter layout (`adapter_config.json` + `adapter_model.safetensors`, tensors
//! `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r], and for DoRA
//! `lora_magnitude_vector` [out], saved without `.weight` as PEFT does): attaching
//! fresh or saved adapters to a model's linear layers and writing them back, so that PEFT, vLLM
//! and llama.cpp load what tune trains.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::adapter::{transpose, LoraAdapter, LoraConfig};
use crate::backend::Backend;
use crate::error::{read_json, Error, Result};
use crate::hf::Weights;
use crate::model::config::WeightLayout;
use crate::model::{CausalLm, ModelConfig};
use crate::rng::Rng;

/// Adds fresh adapters to every targeted linear layer, in model order from one seeded
/// generator.
pub fn inject<B: Backend>(model: &mut CausalLm<B>, config: &LoraConfig, seed: u64, device: &B::Device) {
    let mut rng = Rng::new(seed);
    for l in model.linears_mut() {
        if config.targets(&l.name) {
            let mut adapter = LoraAdapter::init(l.in_features(), l.out_features(), config, &mut rng, device);
            if config.use_dora {
                // Recipe::validate refuses lora.use_dora with model.quantize: DoRA's norm needs
                // the dense W.
                adapter.init_magnitude(
                    l.weight.dense().expect("DoRA needs a dense base (use_dora with a quantized base is refused at validation)"),
                );
            }
            l.adapter = Some(adapter);
        }
    }
}

/// Which layers a run adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targets<'a> {
    /// PEFT's default for the family.
    Default,
    /// Every linear layer but the output head, as PEFT resolves `all-linear`.
    AllLinear,
    /// Module names, suffixes or paths, checked against the model's linear layers.
    List(&'a [String]),
}

/// `target_modules` for a model, as module names in the model's order.
pub fn resolve_targets(targets: Targets, config: &ModelConfig) -> Result<Vec<String>> {
    let names = config.linear_names();
    let targets = match targets {
        Targets::AllLinear => return Ok(names),
        Targets::Default => return Ok(config.family().default_targets.iter().map(|s| s.to_string()).collect()),
        Targets::List(t) => t,
    };
    if targets.is_empty() {
        return Err(Error::Unsupported("lora.target_modules: empty list".into()));
    }
    let linears = config.linears();
    for t in targets {
        if !linears.iter().any(|l| crate::adapter::targets(t, &l.path)) {
            let candidates: Vec<&str> = names.iter().map(String::as_str).collect();
            return Err(Error::Unsupported(format!(
                "lora.target_modules: `{t}` names no linear layer of this {} model{} (its linear layers: {}, or `all-linear`)",
                config.family().name(),
                crate::error::did_you_mean(t, &candidates),
                names.join(", ")
            )));
        }
    }
    // The model's own order, so adapters and their files do not depend on how the list was written.
    let mut out: Vec<String> = names.iter().filter(|n| targets.contains(n)).cloned().collect();
    out.extend(targets.iter().filter(|t| !names.contains(t)).cloned());
    Ok(out)
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

/// DoRA's magnitude tensor name, as PEFT saves it: `lora_magnitude_vector`, with no `.weight`.
pub fn magnitude_key(module: &str) -> String {
    format!("base_model.model.{module}.{MAGNITUDE}")
}

/// PEFT's name for DoRA's magnitude.
pub const MAGNITUDE: &str = "lora_magnitude_vector";

/// The names a writer may give a projection's lora_A, lora_B or lora_magnitude_vector: PEFT's
/// file name first, then the variants PEFT's loader also accepts (the adapter name kept,
/// `.default.weight`; the magnitude with `.weight`).
fn key_variants(module: &str, which: &str) -> Vec<String> {
    if which == MAGNITUDE {
        let key = magnitude_key(module);
        vec![key.clone(), format!("{key}.weight"), format!("{key}.default.weight")]
    } else {
        let key = peft_key(module, which);
        let alt = key.replace(".weight", ".default.weight");
        vec![key, alt]
    }
}

/// Reads and checks `adapter_config.json`. Refuses what tune would get wrong silently (biases,
/// per-module ranks, modules_to_save); `fan_in_fan_out` is checked against the model
/// when the adapter is attached. The returned LoraConfig's
/// target_modules is empty: the tensors, not the config, say which projections are adapted.
pub fn read_adapter_config(dir: &Path) -> Result<(AdapterConfig, LoraConfig)> {
    let config_path = dir.join(ADAPTER_CONFIG);
    if !config_path.is_file() {
        return Err(Error::Model(format!("{}: not a PEFT adapter directory (no {ADAPTER_CONFIG})", dir.display())));
    }
    let c: AdapterConfig = read_json(&config_path)?;
    let refuse = |what: &str| Err(Error::Unsupported(format!("{}: {what} is not supported", config_path.display())));
    if c.peft_type != "LORA" {
        return refuse(&format!("peft_type `{}` (only LORA)", c.peft_type));
    }
    if c.bias != "none" {
        return refuse(&format!("bias `{}` (only \"none\")", c.bias));
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
        use_dora: c.use_dora,
    };
    Ok((c, config))
}

/// Splits a PEFT tensor name into (module path, "lora_A" | "lora_B" | "lora_magnitude_vector"),
/// accepting the variants of [`key_variants`].
pub fn split_peft_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("base_model.model.")?;
    let (rest, weight) = match rest.strip_suffix(".weight") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    for which in ["lora_A", "lora_B", MAGNITUDE] {
        if !weight && which != MAGNITUDE {
            continue;
        }
        if let Some(module) = rest.strip_suffix(which).and_then(|m| m.strip_suffix('.')) {
            return Some((module, which));
        }
    }
    None
}

/// Reads a PEFT adapter directory and attaches it to the model. Refuses what tune would get
/// wrong silently (see `read_adapter_config`) and any tensor that does not fit the model,
/// naming it. The returned config's target_modules are the adapted layers' short names, in
/// model order.
pub fn load_peft<B: Backend>(model: &mut CausalLm<B>, dir: &Path, device: &B::Device) -> Result<LoraConfig> {
    let (c, config) = read_adapter_config(dir)?;
    // PEFT sets fan_in_fan_out for Conv1D layers itself (with a warning), so false is fine on
    // GPT-2; true on nn.Linear layers would mean transposed weights, which these are not.
    if c.fan_in_fan_out && model.config.layout == WeightLayout::OutIn {
        return Err(Error::Unsupported(format!(
            "{}: fan_in_fan_out: true, but this {} model's linear layers are nn.Linear ([out, in]); the adapter is for another model",
            dir.join(ADAPTER_CONFIG).display(),
            model.config.family().name()
        )));
    }
    let weights = Weights::open_file(&dir.join(ADAPTER_WEIGHTS))?;
    let mut used = std::collections::BTreeSet::new();
    let mut targets: Vec<String> = Vec::new();
    for l in model.linears_mut() {
        let pick = |which: &str| key_variants(&l.name, which).into_iter().find(|k| weights.contains(k));
        let (Some(a_key), Some(b_key)) = (pick("lora_A"), pick("lora_B")) else {
            continue;
        };
        let (fan_in, out) = (l.in_features(), l.out_features());
        let a = weights.read_f32(&a_key, &[c.r, fan_in])?;
        let b = weights.read_f32(&b_key, &[out, c.r])?;
        let magnitude = match (pick(MAGNITUDE), c.use_dora) {
            (Some(key), true) if l.weight.quantized().is_some() => {
                return Err(Error::Tensor {
                    path: dir.join(ADAPTER_WEIGHTS),
                    name: key,
                    msg: "a DoRA adapter on a quantized base (model.quantize / --quantize): DoRA's weight norm needs the dense \
                          weight, so tune does not run QDoRA; load the base unquantized"
                        .into(),
                })
            }
            (Some(key), true) => {
                let m = weights.read_f32(&key, &[out])?;
                used.insert(key);
                Some(Tensor::from_data(TensorData::new(m, [1, out]), device))
            }
            (None, true) => {
                return Err(Error::Tensor {
                    path: dir.join(ADAPTER_WEIGHTS),
                    name: magnitude_key(&l.name),
                    msg: format!("missing: {ADAPTER_CONFIG} says use_dora: true, so every adapted layer needs its {MAGNITUDE} [{out}]"),
                })
            }
            (Some(key), false) => {
                return Err(Error::Tensor {
                    path: dir.join(ADAPTER_WEIGHTS),
                    name: key,
                    msg: format!("a DoRA magnitude, but {ADAPTER_CONFIG} says use_dora: false"),
                })
            }
            (None, false) => None,
        };
        l.adapter = Some(LoraAdapter {
            a: Tensor::from_data(TensorData::new(transpose(&a, c.r, fan_in), [fan_in, c.r]), device),
            b: Tensor::from_data(TensorData::new(transpose(&b, out, c.r), [c.r, out]), device),
            scale: config.scale(),
            dropout: config.dropout,
            dropout_draw: None,
            magnitude,
        });
        let short = l.short_name().to_string();
        if !targets.contains(&short) {
            targets.push(short);
        }
        used.insert(a_key);
        used.insert(b_key);
    }
    if let Some(extra) = weights.names().find(|n| !used.contains(*n)) {
        return Err(Error::Tensor {
            path: dir.join(ADAPTER_WEIGHTS),
            name: extra.to_string(),
            msg: format!(
                "does not match any linear layer of the base {} model (an adapter for another model?)",
                model.config.family().name()
            ),
        });
    }
    if used.is_empty() {
        return Err(Error::Model(format!("{}: the adapter holds no lora_A/lora_B tensors", dir.display())));
    }
    let mut config = config;
    config.target_modules = targets;
    Ok(config)
}

/// Writes the model's adapters in PEFT layout into `dir` (created; must not hold an adapter
/// already unless `overwrite`). Files go to a temporary directory first and are renamed into
/// place, so a crash never leaves a half-written adapter.
pub fn save_peft<B: Backend>(model: &CausalLm<B>, config: &LoraConfig, base_model: &str, dir: &Path) -> Result<()> {
    let mut tensors: Vec<crate::hf::safetensors::OwnedTensor> = Vec::new();
    // The file says what its tensors are, whatever the config was.
    let mut dora = false;
    for p in model.linears() {
        let Some(l) = &p.adapter else { continue };
        let (fan_in, r, out) = (p.in_features(), l.rank(), p.out_features());
        let a: Vec<f32> = l.a.to_data().iter::<f32>().collect();
        let b: Vec<f32> = l.b.to_data().iter::<f32>().collect();
        tensors.push((peft_key(&p.name, "lora_A"), vec![r, fan_in], f32_bytes(&transpose(&a, fan_in, r))));
        tensors.push((peft_key(&p.name, "lora_B"), vec![out, r], f32_bytes(&transpose(&b, r, out))));
        if let Some(m) = &l.magnitude {
            dora = true;
            let m: Vec<f32> = m.to_data().iter::<f32>().collect();
            tensors.push((magnitude_key(&p.name), vec![out], f32_bytes(&m)));
        }
    }
    let adapter_config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "bias": "none",
        // PEFT's flag for Conv1D layers (GPT-2), whose weights are stored [in, out].
        "fan_in_fan_out": model.config.layout == WeightLayout::InOut,
        "use_rslora": config.use_rslora,
        "use_dora": dora,
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

/// Number of trainable parameters of the model's adapters.
pub fn trainable_parameters<B: Backend>(model: &CausalLm<B>) -> usize {
    model.linears().iter().filter_map(|p| p.adapter.as_ref().map(LoraAdapter::num_parameters)).sum()
}
