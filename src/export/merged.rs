//! Base + adapter merged, W + s·B·A for every adapted layer (DoRA: m · (W + s·B·A) /
//! ‖W + s·B·A‖, per output feature), written as a full Hugging Face checkpoint (config, shards +
//! index, tokenizer and chat template files), each weight in the checkpoint's own layout.

use std::collections::BTreeMap;
use std::path::Path;

use super::{check_against_base, check_output, read_pairs, write_text, written, LoraPair, Options, OutDtype, Source, Written};
use crate::adapter::LoraConfig;
use crate::error::{Error, Result};
use crate::hf::Weights;
use crate::model::config::WeightLayout;
use crate::peft::{self as peft_format, ADAPTER_CONFIG};

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

/// Writes base + adapter merged (W + s·B·A, rescaled per output feature for DoRA) as a full
/// Hugging Face checkpoint into `out`.
pub fn export_merged(src: &Source, out: &Path, max_shard_bytes: u64, opts: &Options) -> Result<Written> {
    let (c, config) = peft_format::read_adapter_config(&src.adapter_dir)?;
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
    let layout = super::base_layout(&base_dir)?;
    check_against_base(&pairs, &base, layout, &src.adapter_dir)?;
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
    let template = crate::hf::adapter_template::read(&src.adapter_dir)?;

    crate::fsutil::write_dir_atomically(out, |tmp| {
        let mut weight_map = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let mut tensors = Vec::with_capacity(shard.len());
            for (name, shape) in shard {
                let mut w = base.read_f32(name, shape)?;
                if let Some(p) = by_weight.get(name) {
                    merge_into(&mut w, p, scale, layout);
                    if let Some(m) = &p.magnitude {
                        rescale_rows(&mut w, m, p, layout);
                    }
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
            crate::hf::adapter_template::install_in_model_dir(tmp, source)?;
        }
        write_text(&tmp.join("README.md"), &card)
    })?;
    Ok(written(out))
}

/// w += scale · B[out, r] · A[r, in], with w stored [out, in] (an axpy per rank along each
/// row) or, for Conv1D, [in, out] (the same product, transposed).
pub(crate) fn merge_into(w: &mut [f32], p: &LoraPair, scale: f64, layout: WeightLayout) {
    for o in 0..p.out {
        for k in 0..p.r {
            let coef = (scale * p.b[o * p.r + k] as f64) as f32;
            if coef == 0.0 {
                continue;
            }
            let a = &p.a[k * p.fan_in..(k + 1) * p.fan_in];
            match layout {
                WeightLayout::OutIn => {
                    let row = &mut w[o * p.fan_in..(o + 1) * p.fan_in];
                    row.iter_mut().zip(a).for_each(|(w, a)| *w += coef * a);
                }
                WeightLayout::InOut => {
                    for (i, a) in a.iter().enumerate() {
                        w[i * p.out + o] += coef * a;
                    }
                }
            }
        }
    }
}

/// DoRA's merge, on w = W + s·B·A: each output feature's weights times m / their norm, as
/// PEFT's merge computes it (the norm of the very sum being scaled). Summed in f64: a row is
/// up to `in` long.
pub(crate) fn rescale_rows(w: &mut [f32], magnitude: &[f32], p: &LoraPair, layout: WeightLayout) {
    let mut sq = vec![0f64; p.out];
    match layout {
        WeightLayout::OutIn => {
            for (o, row) in w.chunks_exact(p.fan_in).enumerate() {
                sq[o] = row.iter().map(|&x| x as f64 * x as f64).sum();
            }
        }
        WeightLayout::InOut => {
            for row in w.chunks_exact(p.out) {
                sq.iter_mut().zip(row).for_each(|(s, &x)| *s += x as f64 * x as f64);
            }
        }
    }
    // In f32 like PEFT's dora_factor, the same for every weight of the feature.
    let factor: Vec<f32> = magnitude.iter().zip(&sq).map(|(&m, &s)| m / (s.sqrt() as f32)).collect();
    match layout {
        WeightLayout::OutIn => {
            for (row, f) in w.chunks_exact_mut(p.fan_in).zip(&factor) {
                row.iter_mut().for_each(|x| *x *= f);
            }
        }
        WeightLayout::InOut => {
            for row in w.chunks_exact_mut(p.out) {
                row.iter_mut().zip(&factor).for_each(|(x, f)| *x *= f);
            }
        }
    }
}

fn merged_card(src: &Source, base_dir: &Path, c: &LoraConfig, dtype: OutDtype) -> String {
    let (kind, update) =
        if c.use_dora { ("DoRA", "m · (W + s·B·A) / ‖W + s·B·A‖ (per output feature)") } else { ("LoRA", "W + s·B·A") };
    let mut s = format!(
        "# {} with a merged {kind} adapter\n\nWritten by tune {}: {update} for every adapted projection \
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
