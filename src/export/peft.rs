//! The adapter profile that PEFT, vLLM, llama.cpp's convert_lora_to_gguf, Ollama and
//! mistral.rs all accept: one unsharded `adapter_model.safetensors` with lora_A/lora_B tensors
//! only, an integer `lora_alpha`, and `use_rslora: false` — vLLM and llama.cpp ignore rsLoRA
//! and non-integer alphas, so any difference between the trained scale and alpha/r is folded
//! into lora_B instead.
//!
//! A DoRA adapter keeps its lora_magnitude_vector tensors and `use_dora: true`, in PEFT's
//! layout: PEFT loads it, consumers without DoRA do not (the merged export is the way there).
//! Folding into lora_B still holds: it leaves s·B·A, and so DoRA's norm, unchanged.

use std::path::Path;

use super::{check_against_base, check_output, read_pairs, write_text, written, LoraPair, Options, OutDtype, Source, Written};
use crate::adapter::LoraConfig;
use crate::error::Result;
use crate::hf::Weights;
use crate::model::config::WeightLayout;
use crate::peft::{self as peft_format, ADAPTER_CONFIG, ADAPTER_WEIGHTS};

/// Writes the adapter profile into `out`.
pub fn export_adapter(src: &Source, out: &Path, opts: &Options) -> Result<Written> {
    let (c, config) = peft_format::read_adapter_config(&src.adapter_dir)?;
    let mut pairs = read_pairs(&src.adapter_dir, &c)?;
    // GPT-2's Conv1D layers carry PEFT's fan_in_fan_out flag (the adapter tensors are the same).
    let mut fan_in_fan_out = c.fan_in_fan_out;
    if let Some(base) = &opts.base {
        let layout = super::base_layout(base)?;
        check_against_base(&pairs, &Weights::open(base)?, layout, &src.adapter_dir)?;
        fan_in_fan_out = layout == WeightLayout::InOut;
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
        tensors.push((peft_format::peft_key(&p.module, "lora_A"), vec![p.r, p.fan_in], opts.dtype.encode(&p.a)));
        tensors.push((peft_format::peft_key(&p.module, "lora_B"), vec![p.out, p.r], opts.dtype.encode(&p.b)));
        if let Some(m) = &p.magnitude {
            tensors.push((peft_format::magnitude_key(&p.module), vec![p.out], opts.dtype.encode(m)));
        }
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
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": false,
        "use_dora": config.use_dora,
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
        crate::hf::adapter_template::copy(&src.adapter_dir, tmp)?;
        write_text(&tmp.join("README.md"), &card)
    })?;
    Ok(written(out))
}

/// The module names adapted (q_proj, ...), in the order of the layers of one block.
fn target_kinds(pairs: &[LoraPair]) -> Vec<String> {
    let kinds: std::collections::BTreeSet<&str> = pairs.iter().map(|p| p.module.rsplit('.').next().unwrap_or(&p.module)).collect();
    let rank = |k: &str| MODULE_ORDER.iter().position(|m| *m == k).unwrap_or(MODULE_ORDER.len());
    let mut out: Vec<String> = kinds.into_iter().map(str::to_string).collect();
    out.sort_by_key(|k| rank(k));
    out
}

/// Every family's linear layer names, in block order.
const MODULE_ORDER: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "c_attn",
    "query_key_value",
    "o_proj",
    "dense",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
    "c_fc",
    "c_proj",
    "dense_h_to_4h",
    "dense_4h_to_h",
];

fn model_card(src: &Source, base: &str, c: &LoraConfig, targets: &[String], alpha: f64, fold: f64, dtype: OutDtype) -> String {
    // The hub's metadata wants a repo id; a local path would be rejected there.
    let hub_id = !base.is_empty() && !base.starts_with(['/', '.', '~']) && base.matches('/').count() == 1;
    let mut s = String::from("---\nlibrary_name: peft\ntags:\n- lora\n- tune\n");
    if hub_id {
        s += &format!("base_model: {base}\n");
    }
    s += "---\n\n";
    let kind = if c.use_dora { "DoRA" } else { "LoRA" };
    s += &format!("# {kind} adapter for {}\n\n", if base.is_empty() { "(unknown base model)" } else { base });
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
    if c.use_dora {
        s += "- DoRA: with a lora_magnitude_vector per layer (use_dora: true); PEFT loads it, a consumer \
              without DoRA support needs `tune export --merged` instead\n";
    }
    s += &format!("- tensors stored as {}\n\n", dtype.torch_name());
    s += "## Use\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n";
    s += &format!(
        "base = AutoModelForCausalLM.from_pretrained(\"{base}\")\nmodel = PeftModel.from_pretrained(base, \"path/to/this/dir\")\n```\n\n"
    );
    s += "or with tune: `tune generate --model BASE --adapter THIS_DIR --prompt \"...\"`\n";
    if let Some(recipe) = &src.recipe_yaml {
        s += &format!("\n## Recipe\n\n```yaml\n{}\n```\n", recipe.trim_end());
    }
    s
}
