//! The adapter as a llama.cpp GGUF LoRA (`llama-cli --lora FILE`, Ollama's `ADAPTER`), as
//! llama.cpp's `convert_lora_to_gguf.py` writes a PEFT adapter: `general.type` adapter,
//! `adapter.type` lora, `adapter.lora.alpha`, and for every adapted weight `<name>.lora_a`
//! (A, [r, in]) and `<name>.lora_b` (B, [out, r]) under the base tensor's llama.cpp name, with
//! the base converter's row rearrangements (Llama's q/k permutation, GPT-NeoX's and BLOOM's
//! q/k/v regrouping) applied to B's rows.
//!
//! As in the PEFT export, llama.cpp computes the scale as alpha / r from the file, so an rsLoRA
//! or fractional-alpha scale is folded into B with an integer alpha. DoRA has no GGUF form.
//!
//! GPT-2's Conv1D weights are written transposed to [out, in] by the base converter, which is
//! the orientation B·A already has: A and B are written as they are (convert_lora_to_gguf.py
//! swaps and transposes them there, which llama.cpp then rejects for non-square layers).

use std::path::Path;

use super::gguf::{apply, gguf_facts, Step};
use super::{read_pairs, Options, Source};
use crate::error::{Error, Result};
use crate::gguf::{GgmlType, GgufWriter, TensorInfo, Value};
use crate::hf::Weights;
use crate::model::ModelConfig;
use crate::peft::{self as peft_format, ADAPTER_CONFIG, ADAPTER_WEIGHTS};

/// Writes the adapter of `src` as a GGUF LoRA file.
pub fn export_gguf_adapter(src: &Source, out: &Path, opts: &Options, ty: super::GgufType) -> Result<super::gguf::WrittenFile> {
    let (c, lora) = peft_format::read_adapter_config(&src.adapter_dir)?;
    if c.use_dora {
        return Err(Error::Unsupported(format!(
            "{}: a DoRA adapter (use_dora: true) has no llama.cpp GGUF form (llama.cpp applies plain LoRA); \
             export the merged model instead: tune export SRC --gguf model.gguf",
            src.adapter_dir.join(ADAPTER_CONFIG).display()
        )));
    }
    let tensor_type = match ty {
        super::GgufType::F32 => GgmlType::F32,
        super::GgufType::F16 => GgmlType::F16,
        super::GgufType::Bf16 => GgmlType::BF16,
        super::GgufType::Q8_0 => GgmlType::Q8_0,
        super::GgufType::Q4KM => {
            return Err(Error::Unsupported("--gguf-type q4_k_m applies to models; an adapter is written as f32, f16, bf16 or q8_0".into()))
        }
    };
    let base_dir = opts.base.clone().ok_or_else(|| {
        Error::Unsupported(format!(
            "a GGUF adapter needs the base model's config and tensor names: pass --model DIR ({} names `{}`, which is not a local model directory)",
            src.adapter_dir.join(ADAPTER_CONFIG).display(),
            c.base_model_name_or_path.clone().unwrap_or_default()
        ))
    })?;
    let mut pairs = read_pairs(&src.adapter_dir, &c)?;
    let cfg = ModelConfig::from_model_dir(&base_dir)?;
    let facts = gguf_facts(&cfg)?;
    let base = Weights::open(&base_dir)?;
    super::check_against_base(&pairs, &base, cfg.layout, &src.adapter_dir)?;
    if out.is_dir() {
        return Err(Error::Unsupported(format!("{} is a directory; --gguf-adapter takes a file name (adapter.gguf)", out.display())));
    }
    if out.exists() && !opts.overwrite {
        return Err(Error::Unsupported(format!("{} already exists; pass --overwrite to replace it", out.display())));
    }
    let map = super::gguf::tensor_map(&base_dir, &cfg, facts, &base)?;

    // llama.cpp's scale is alpha / r: keep the trained one with an integer alpha.
    let alpha = lora.alpha.round().max(1.0);
    let fold = lora.scale() * lora.rank as f64 / alpha;
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(facts.arch.into()));
    w.set("general.type", Value::String("adapter".into()));
    w.set("adapter.type", Value::String("lora".into()));
    let name = src.adapter_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    w.set("general.name", Value::String(name));
    w.set("adapter.lora.alpha", Value::F32(alpha as f32));
    w.set("general.quantization_version", Value::U32(crate::gguf::QUANTIZATION_VERSION));

    let mut data: Vec<Vec<f32>> = Vec::new();
    for p in &mut pairs {
        let hf = format!("{}.weight", p.module);
        let (gguf_name, steps) = map
            .get(&hf)
            .or_else(|| {
                // A checkpoint saved without GPT-2's / BLOOM's `transformer.` prefix.
                cfg.names.optional_prefix.and_then(|pre| map.get(hf.strip_prefix(pre)?))
            })
            .ok_or_else(|| Error::Tensor {
                path: src.adapter_dir.join(ADAPTER_WEIGHTS),
                name: peft_format::peft_key(&p.module, "lora_A"),
                msg: format!("`{hf}` has no llama.cpp tensor to adapt"),
            })?;
        let mut b: Vec<f32> = p.b.iter().map(|x| (*x as f64 * fold) as f32).collect();
        let mut shape = vec![p.out, p.r];
        for s in steps {
            match s {
                Step::PermuteHeads(_) | Step::RegroupQkv(_) => b = apply(*s, b, &mut shape),
                Step::Transpose => {}
                Step::PlusOne | Step::Rows(_) => {
                    return Err(Error::Unsupported(format!("`{hf}`: adapters on norms or embeddings are not exported to GGUF")))
                }
            }
        }
        let ty = |n: usize| if n.is_multiple_of(tensor_type.block_size()) { tensor_type } else { GgmlType::F16 };
        w.add_tensor(TensorInfo { name: format!("{gguf_name}.lora_a"), ne: vec![p.fan_in as u64, p.r as u64], ty: ty(p.fan_in) })?;
        w.add_tensor(TensorInfo { name: format!("{gguf_name}.lora_b"), ne: vec![p.r as u64, p.out as u64], ty: ty(p.r) })?;
        data.push(std::mem::take(&mut p.a));
        data.push(b);
    }
    let bytes = w.write(out, |i, info, buf| {
        for row in data[i].chunks(info.ne[0] as usize) {
            crate::gguf::encode_row(info.ty, row, buf)?;
        }
        Ok(())
    })?;
    Ok(super::gguf::WrittenFile { path: out.to_path_buf(), bytes, tensors: w.tensors().len(), arch: facts.arch })
}
