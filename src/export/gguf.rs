//! Base + adapter merged (as `merged.rs` computes it, DoRA included) as one GGUF file that
//! llama.cpp and Ollama run, written as llama.cpp's `convert_hf_to_gguf.py` writes the merged
//! checkpoint: its architecture keys, its tensor names and layouts, the tokenizer
//! (`gguf_vocab.rs`) and the chat template (the adapter's, else the base's).
//!
//! The family's differences (architecture name, q/k permutation, Gemma's 1 + w norms, ...) are
//! in its `family/<name>.rs` (`GGUF`); the role -> llama.cpp name mapping below is shared. The
//! file is streamed: every tensor's type and size is known from the config before any data is
//! read, then each is read, merged, rearranged and encoded in turn.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::merged::{merge_into, rescale_rows};
use super::{check_against_base, read_pairs, LoraPair, Options, Source};
use crate::error::{Error, Result};
use crate::gguf::mix::{q4_k_m_types, MixInfo};
use crate::gguf::{GgmlType, GgufWriter, TensorInfo, Value};
use crate::hf::config::RawConfig;
use crate::hf::Weights;
use crate::model::config::{MlpNames, ModelConfig, Positions, QkvLayout, QkvNames, RopeScaling, WeightLayout};
use crate::model::family::Gguf;
use crate::peft::{self as peft_format, ADAPTER_CONFIG};

/// The file type of a GGUF export (`--gguf-type`), as convert_hf_to_gguf.py's `--outtype`
/// (q4_k_m: as llama-quantize makes it from an f32 file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    #[default]
    Q8_0,
    Q4KM,
}

impl FromStr for GgufType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(GgufType::F32),
            "f16" => Ok(GgufType::F16),
            "bf16" => Ok(GgufType::Bf16),
            "q8_0" => Ok(GgufType::Q8_0),
            "q4_k_m" => Ok(GgufType::Q4KM),
            _ => Err(format!("unknown GGUF type `{s}` (expected f32, f16, bf16, q8_0 or q4_k_m)")),
        }
    }
}

impl GgufType {
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Bf16 => "bf16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4KM => "q4_k_m",
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::Q4KM => 15,
            GgufType::Bf16 => 32,
        }
    }

    /// The type of a tensor that is quantized at all.
    fn base_type(self) -> GgmlType {
        match self {
            GgufType::F32 => GgmlType::F32,
            GgufType::F16 => GgmlType::F16,
            GgufType::Bf16 => GgmlType::BF16,
            GgufType::Q8_0 | GgufType::Q4KM => GgmlType::Q8_0,
        }
    }
}

/// What a GGUF export needs beyond [`Options`].
#[derive(Debug, Clone, Default)]
pub struct GgufOptions {
    pub ty: GgufType,
    /// llama.cpp's pre-tokenizer name when tune does not recognise the tokenizer.
    pub pre: Option<String>,
}

/// A GGUF file written.
#[derive(Debug, Clone)]
pub struct WrittenFile {
    pub path: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    pub arch: &'static str,
}

/// How a checkpoint tensor becomes a GGUF one, in order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Step {
    /// Conv1D [in, out] -> [out, in].
    Transpose,
    /// Rows from rotate-half to adjacent pairs per head (convert_hf_to_gguf's `permute`).
    PermuteHeads(usize),
    /// Rows per head [q | k | v] -> [all q | all k | all v] (GPT-NeoX, BLOOM).
    RegroupQkv(usize),
    PlusOne,
    /// Only the first n rows.
    Rows(usize),
}

/// Adds a checkpoint tensor to the plan: (checkpoint name, llama.cpp name, steps, required).
type AddTensor<'a> = dyn FnMut(&str, String, Vec<Step>, bool) -> Result<()> + 'a;

struct Item {
    /// The checkpoint tensor (None: computed, Llama 3's rope_freqs or LongRoPE's factors).
    hf: Option<String>,
    /// Its PyTorch shape.
    shape: Vec<usize>,
    steps: Vec<Step>,
    generated: Option<Vec<f32>>,
    info: TensorInfo,
}

/// Writes base + adapter merged as one GGUF file.
pub fn export_gguf(src: &Source, out: &Path, opts: &Options, g: &GgufOptions) -> Result<WrittenFile> {
    let (c, lora) = peft_format::read_adapter_config(&src.adapter_dir)?;
    let pairs = read_pairs(&src.adapter_dir, &c)?;
    let base_dir = opts.base.clone().ok_or_else(|| {
        Error::Unsupported(format!(
            "a GGUF export needs the base model: pass --model DIR ({} names `{}`, which is not a local model directory)",
            src.adapter_dir.join(ADAPTER_CONFIG).display(),
            c.base_model_name_or_path.clone().unwrap_or_default()
        ))
    })?;
    let template = match crate::hf::adapter_template::read(&src.adapter_dir)? {
        Some((source, _)) => Some(source),
        None => super::gguf_vocab::model_chat_template(&base_dir)?,
    };
    write_model(&base_dir, &pairs, lora.scale(), template.as_deref(), out, opts.overwrite, &[&src.adapter_dir], g)
}

/// The GGUF of `base_dir` with `pairs` merged in at `scale`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_model(
    base_dir: &Path,
    pairs: &[LoraPair],
    scale: f64,
    chat_template: Option<&str>,
    out: &Path,
    overwrite: bool,
    inputs: &[&Path],
    g: &GgufOptions,
) -> Result<WrittenFile> {
    let raw = RawConfig::from_model_dir(base_dir)?;
    let cfg = ModelConfig::from_model_dir(base_dir)?;
    let facts = gguf_facts(&cfg)?;
    let base = Weights::open(base_dir)?;
    check_against_base(pairs, &base, cfg.layout, base_dir)?;
    check_output_file(out, overwrite, inputs, base_dir)?;
    if raw.value.get("quantization_config").is_some() {
        return Err(Error::Unsupported(format!("{}: exporting a quantized base model is not supported", raw.path.display())));
    }

    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(facts.arch.into()));
    w.set("general.type", Value::String("model".into()));
    let name = base_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    w.set("general.name", Value::String(name));
    for (k, v) in (facts.hparams)(&raw, &cfg) {
        w.set(&format!("{}.{k}", facts.arch), v);
    }
    if facts.file_type {
        w.set("general.file_type", Value::U32(g.ty.file_type()));
    }
    w.set("general.quantization_version", Value::U32(crate::gguf::QUANTIZATION_VERSION));
    let sentencepiece = super::gguf_vocab::uses_sentencepiece(base_dir, facts.vocab)?;
    for (k, v) in super::gguf_vocab::tokenizer_kv(base_dir, cfg.vocab_size, facts.vocab, g.pre.as_deref(), chat_template)? {
        w.set(&k, v);
    }
    let tc_path = base_dir.join("tokenizer_config.json");
    let tc: serde_json::Value = if tc_path.is_file() { crate::error::read_json(&tc_path)? } else { serde_json::Value::Null };
    for (k, v) in (facts.tokenizer_quirks)(&cfg, &tc, sentencepiece) {
        w.set(k, v);
    }

    let items = plan(&cfg, facts, &base, base_dir, g.ty)?;
    for it in &items {
        w.add_tensor(it.info.clone())?;
    }
    let by_weight: BTreeMap<String, &LoraPair> = pairs.iter().map(|p| (format!("{}.weight", p.module), p)).collect();
    let bytes = w.write(out, |i, info, buf| {
        let it = &items[i];
        let data = match (&it.generated, &it.hf) {
            (Some(d), _) => d.clone(),
            (None, Some(name)) => {
                let mut x = base.read_f32(name, &it.shape)?;
                if let Some(p) = by_weight.get(name) {
                    merge_into(&mut x, p, scale, cfg.layout);
                    if let Some(m) = &p.magnitude {
                        rescale_rows(&mut x, m, p, cfg.layout);
                    }
                }
                let mut shape = it.shape.clone();
                for s in &it.steps {
                    x = apply(*s, x, &mut shape);
                }
                x
            }
            (None, None) => unreachable!("every item has data"),
        };
        let row = info.ne[0] as usize;
        for r in data.chunks(row) {
            crate::gguf::encode_row(info.ty, r, buf)?;
        }
        Ok(())
    })?;
    Ok(WrittenFile { path: out.to_path_buf(), bytes, tensors: items.len(), arch: facts.arch })
}

/// The family's GGUF facts, or why it has none.
pub(crate) fn gguf_facts(cfg: &ModelConfig) -> Result<&'static Gguf> {
    cfg.family().gguf.ok_or_else(|| {
        Error::Unsupported(format!(
            "GGUF export of model_type `{}` is not supported (use llama.cpp's convert_hf_to_gguf.py on a \
             `tune export --merged` checkpoint)",
            cfg.family().name()
        ))
    })
}

fn check_output_file(out: &Path, overwrite: bool, inputs: &[&Path], base_dir: &Path) -> Result<()> {
    if out.is_dir() {
        return Err(Error::Unsupported(format!("{} is a directory; --gguf takes a file name (model.gguf)", out.display())));
    }
    if out.exists() && !overwrite {
        return Err(Error::Unsupported(format!("{} already exists; pass --overwrite to replace it", out.display())));
    }
    let canon = out.parent().and_then(|p| p.canonicalize().ok()).map(|p| p.join(out.file_name().unwrap_or_default()));
    for i in inputs.iter().copied().chain([base_dir]) {
        if let (Some(o), Ok(i)) = (&canon, i.canonicalize()) {
            if o.starts_with(&i) {
                return Err(Error::Unsupported(format!(
                    "{}: the output lies inside an input of the export ({})",
                    out.display(),
                    i.display()
                )));
            }
        }
    }
    Ok(())
}

/// Every tensor of the GGUF, in file order, from the checkpoint's names; every checkpoint
/// tensor must be used (but for buffers the converter drops too).
fn plan(cfg: &ModelConfig, facts: &Gguf, base: &Weights, base_dir: &Path, ty: GgufType) -> Result<Vec<Item>> {
    let n = cfg.names;
    // GPT-2 and BLOOM checkpoints saved from the base model lack the `transformer.` prefix.
    let resolve = |name: &str| -> Option<String> {
        if base.contains(name) {
            return Some(name.to_string());
        }
        let p = n.optional_prefix?;
        name.strip_prefix(p).filter(|s| base.contains(s)).map(str::to_string)
    };
    let mut used = std::collections::BTreeSet::new();
    let mut items = Vec::new();
    let mut add = |hf: &str, gguf: String, steps: Vec<Step>, required: bool| -> Result<()> {
        let Some(name) = resolve(hf) else {
            return if required {
                Err(Error::Tensor { path: base.path_of(hf), name: hf.to_string(), msg: "missing from the checkpoint".into() })
            } else {
                Ok(())
            };
        };
        let shape = base.meta(&name).expect("resolved").shape;
        let mut out_shape = shape.clone();
        for s in &steps {
            out_shape = step_shape(*s, &out_shape);
        }
        let ne: Vec<u64> = out_shape.iter().rev().map(|&d| d as u64).collect();
        let t = tensor_type(&gguf, &ne, ty);
        used.insert(name.clone());
        items.push(Item { hf: Some(name), shape, steps, generated: None, info: TensorInfo { name: gguf, ne, ty: t } });
        Ok(())
    };
    let norm = |steps: &mut Vec<Step>, hf: &str| {
        if facts.norm_plus_one && hf.ends_with("norm.weight") {
            steps.push(Step::PlusOne);
        }
    };
    // weight and bias of a norm
    let add_norm = |add: &mut AddTensor, hf: &str, gguf: &str| -> Result<()> {
        let mut steps = Vec::new();
        norm(&mut steps, &format!("{hf}.weight"));
        add(&format!("{hf}.weight"), format!("{gguf}.weight"), steps, true)?;
        add(&format!("{hf}.bias"), format!("{gguf}.bias"), Vec::new(), false)
    };

    let embed_steps = if facts.trim_embeddings { vec![Step::Rows(tokenizer_rows(base_dir, cfg, facts)?)] } else { Vec::new() };
    add(&format!("{}.weight", n.embed_tokens), "token_embd.weight".into(), embed_steps, true)?;
    if let Some(p) = n.embed_positions {
        add(&format!("{p}.weight"), "position_embd.weight".into(), Vec::new(), true)?;
    }
    if let Some(e) = n.embed_norm {
        add_norm(&mut add, e, "token_embd_norm")?;
    }
    let linear = |extra: Vec<Step>| -> Vec<Step> {
        let mut s = if cfg.layout == WeightLayout::InOut { vec![Step::Transpose] } else { Vec::new() };
        s.extend(extra);
        s
    };
    for l in 0..cfg.num_hidden_layers() {
        let p = format!("{}.{l}", n.layers);
        let b = format!("blk.{l}");
        add_norm(&mut add, &format!("{p}.{}", n.attn_norm), &format!("{b}.attn_norm"))?;
        let proj = |add: &mut AddTensor, hf: &str, gguf: &str, extra: Vec<Step>| -> Result<()> {
            add(&format!("{p}.{hf}.weight"), format!("{b}.{gguf}.weight"), linear(extra.clone()), true)?;
            add(&format!("{p}.{hf}.bias"), format!("{b}.{gguf}.bias"), extra, false)
        };
        match n.qkv {
            QkvNames::Separate { q, k, v } => {
                let (pq, pk) = if facts.permute_qk {
                    (vec![Step::PermuteHeads(cfg.num_attention_heads)], vec![Step::PermuteHeads(cfg.num_key_value_heads)])
                } else {
                    (Vec::new(), Vec::new())
                };
                proj(&mut add, q, "attn_q", pq)?;
                proj(&mut add, k, "attn_k", pk)?;
                proj(&mut add, v, "attn_v", Vec::new())?;
            }
            QkvNames::Fused(qkv) => {
                let regroup =
                    if cfg.attention.qkv == QkvLayout::FusedPerHead { vec![Step::RegroupQkv(cfg.num_attention_heads)] } else { Vec::new() };
                proj(&mut add, qkv, "attn_qkv", regroup)?;
            }
        }
        proj(&mut add, n.o_proj, "attn_output", Vec::new())?;
        if cfg.attention.qk_norm {
            add_norm(&mut add, &format!("{p}.{}", n.q_norm), &format!("{b}.attn_q_norm"))?;
            add_norm(&mut add, &format!("{p}.{}", n.k_norm), &format!("{b}.attn_k_norm"))?;
        }
        if let Some(o) = n.attn_out_norm {
            add_norm(&mut add, &format!("{p}.{o}"), &format!("{b}.post_attention_norm"))?;
        }
        add_norm(&mut add, &format!("{p}.{}", n.mlp_norm), &format!("{b}.ffn_norm"))?;
        if let Some(o) = n.mlp_out_norm {
            add_norm(&mut add, &format!("{p}.{o}"), &format!("{b}.post_ffw_norm"))?;
        }
        match n.mlp {
            MlpNames::Gated { gate, up, down } => {
                proj(&mut add, gate, "ffn_gate", Vec::new())?;
                proj(&mut add, up, "ffn_up", Vec::new())?;
                proj(&mut add, down, "ffn_down", Vec::new())?;
            }
            MlpNames::GatedFused { gate_up, down } => {
                proj(&mut add, gate_up, "ffn_up", Vec::new())?;
                proj(&mut add, down, "ffn_down", Vec::new())?;
            }
            MlpNames::Plain { up, down } => {
                proj(&mut add, up, "ffn_up", Vec::new())?;
                proj(&mut add, down, "ffn_down", Vec::new())?;
            }
        }
    }
    add_norm(&mut add, n.final_norm, "output_norm")?;
    if !facts.skip_lm_head {
        add(&format!("{}.weight", n.lm_head), "output.weight".into(), Vec::new(), false)?;
    }
    for (name, factors) in rope_factor_tensors(cfg) {
        let ne = vec![factors.len() as u64];
        items.push(Item {
            hf: None,
            shape: vec![factors.len()],
            steps: Vec::new(),
            generated: Some(factors),
            info: TensorInfo { name: name.into(), ne, ty: GgmlType::F32 },
        });
    }
    let skipped = |name: &str| {
        name.ends_with(".attn.bias")
            || name.ends_with(".attn.masked_bias")
            || name.ends_with(".attention.bias")
            || name.ends_with(".attention.masked_bias")
            || name.ends_with(".rotary_emb.inv_freq")
            || (facts.skip_lm_head && name == format!("{}.weight", n.lm_head))
    };
    if let Some(extra) = base.names().find(|t| !used.contains(*t) && !skipped(t)) {
        return Err(Error::Tensor {
            path: base.path_of(extra),
            name: extra.to_string(),
            msg: format!("has no counterpart in llama.cpp's {} architecture; refusing to write an incomplete GGUF", facts.arch),
        });
    }
    if ty == GgufType::Q4KM {
        // llama-quantize's choice depends on the other tensors (counters over attn_v and
        // ffn_down, whether output.weight exists), so it is made over the whole plan at once.
        let info = MixInfo {
            arch: facts.arch.to_string(),
            n_layer: cfg.num_hidden_layers(),
            n_head: cfg.num_attention_heads,
            n_head_kv: cfg.num_key_value_heads,
            n_expert: 0,
        };
        let tensors: Vec<(&str, Vec<u64>)> = items.iter().map(|it| (it.info.name.as_str(), it.info.ne.clone())).collect();
        let types = q4_k_m_types(&info, &tensors)?;
        for (it, t) in items.iter_mut().zip(types) {
            // None: llama-quantize copies the tensor as the f32 file has it.
            it.info.ty = t.unwrap_or(GgmlType::F32);
        }
    }
    Ok(items)
}

/// The llama.cpp name and rearrangement of every checkpoint tensor (`model.layers.0.self_attn.q_proj.weight` ->
/// `blk.0.attn_q.weight`, its steps), for adapters.
pub(crate) fn tensor_map(
    base_dir: &Path,
    cfg: &ModelConfig,
    facts: &Gguf,
    base: &Weights,
) -> Result<BTreeMap<String, (String, Vec<Step>)>> {
    Ok(plan(cfg, facts, base, base_dir, GgufType::F32)?.into_iter().filter_map(|it| Some((it.hf?, (it.info.name, it.steps)))).collect())
}

/// Gemma 3's token_embd rows, as the converter counts them: tokenizer.json's vocab plus its
/// added tokens (a SentencePiece vocabulary has the config's vocab_size: nothing is cut).
fn tokenizer_rows(base_dir: &Path, cfg: &ModelConfig, facts: &Gguf) -> Result<usize> {
    if super::gguf_vocab::uses_sentencepiece(base_dir, facts.vocab)? {
        return Ok(cfg.vocab_size);
    }
    let path = base_dir.join("tokenizer.json");
    let t: serde_json::Value = crate::error::read_json(&path)?;
    let n = |v: &serde_json::Value| v.as_object().map(|o| o.len()).or_else(|| v.as_array().map(Vec::len)).unwrap_or(0);
    Ok(n(&t["model"]["vocab"]) + n(&t["added_tokens"]))
}

/// The type of one tensor: 1-D tensors, norms, biases and position tables stay f32 (as the
/// converter keeps them); the rest takes the file type; rows that do not fill whole blocks fall
/// back as the converter falls back. q4_k_m's types are set over the whole plan (see `plan`).
fn tensor_type(name: &str, ne: &[u64], ty: GgufType) -> GgmlType {
    if ty == GgufType::F32
        || ty == GgufType::Q4KM
        || ne.len() <= 1
        || name.ends_with("_norm.weight")
        || !name.ends_with(".weight")
        || name == "position_embd.weight"
    {
        return GgmlType::F32;
    }
    // Only f16, bf16 and q8_0 reach here (q4_k_m's mix is chosen in gguf/mix.rs). The converter
    // writes f16 where a row is not a whole number of q8_0 blocks.
    let t = ty.base_type();
    if ne[0].is_multiple_of(t.block_size() as u64) {
        t
    } else {
        GgmlType::F16
    }
}

fn step_shape(s: Step, shape: &[usize]) -> Vec<usize> {
    match s {
        Step::Transpose => vec![shape[1], shape[0]],
        Step::Rows(n) => {
            let mut v = shape.to_vec();
            v[0] = n.min(v[0]);
            v
        }
        _ => shape.to_vec(),
    }
}

pub(crate) fn apply(s: Step, x: Vec<f32>, shape: &mut Vec<usize>) -> Vec<f32> {
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    let out = match s {
        Step::Transpose => {
            let mut t = vec![0f32; x.len()];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = x[r * cols + c];
                }
            }
            t
        }
        Step::PermuteHeads(heads) => {
            let hd = rows / heads;
            let half = hd / 2;
            let mut t = vec![0f32; x.len()];
            for h in 0..heads {
                for i in 0..half {
                    for j in 0..2 {
                        let from = h * hd + j * half + i;
                        let to = h * hd + i * 2 + j;
                        t[to * cols..(to + 1) * cols].copy_from_slice(&x[from * cols..(from + 1) * cols]);
                    }
                }
            }
            t
        }
        Step::RegroupQkv(heads) => {
            let hd = rows / heads / 3;
            let mut t = Vec::with_capacity(x.len());
            for part in 0..3 {
                for h in 0..heads {
                    let from = (h * 3 + part) * hd;
                    t.extend_from_slice(&x[from * cols..(from + hd) * cols]);
                }
            }
            t
        }
        Step::PlusOne => x.into_iter().map(|v| v + 1.0).collect(),
        Step::Rows(n) => {
            let mut x = x;
            x.truncate(n.min(rows) * cols);
            x
        }
    };
    *shape = step_shape(s, shape);
    out
}

/// Llama 3.1's rope scaling as llama.cpp reads it: one factor per rotary frequency (the
/// converter's `generate_extra_tensors`, in f32 as torch computes it there).
/// The tensors llama.cpp reads a rotary scaling from: Llama 3's `rope_freqs`, LongRoPE's
/// `rope_factors_long` and `rope_factors_short` (Phi-3's generate_extra_tensors).
fn rope_factor_tensors(cfg: &ModelConfig) -> Vec<(&'static str, Vec<f32>)> {
    let Positions::Rope(tables) = &cfg.positions else { return Vec::new() };
    match &tables[0].scaling {
        RopeScaling::LongRope { short_factor, long_factor, .. } => vec![
            ("rope_factors_long.weight", long_factor.iter().map(|&f| f as f32).collect()),
            ("rope_factors_short.weight", short_factor.iter().map(|&f| f as f32).collect()),
        ],
        _ => llama3_rope_factors(cfg).map(|f| vec![("rope_freqs.weight", f)]).unwrap_or_default(),
    }
}

fn llama3_rope_factors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let Positions::Rope(tables) = &cfg.positions else { return None };
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = tables[0].scaling else {
        return None;
    };
    let dim = cfg.head_dim;
    let base = tables[0].theta as f32;
    let old = original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
    let factors = (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0f32 / base.powf(i as f32 / dim as f32);
            let wavelen = (2.0 * std::f64::consts::PI) as f32 / freq;
            if (wavelen as f64) < high_wavelen {
                1.0
            } else if (wavelen as f64) > low_wavelen {
                factor as f32
            } else {
                let smooth = (old as f32 / wavelen - low_freq_factor as f32) / (high_freq_factor - low_freq_factor) as f32;
                1.0 / ((1.0 - smooth) / factor as f32 + smooth)
            }
        })
        .collect();
    Some(factors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_matches_the_converters_reshape() {
        // One head of 4 rows [r0 r1 r2 r3] (rotate-half: pairs (r0, r2), (r1, r3)) becomes
        // [r0 r2 r1 r3]: reshape(1, 2, 2, cols).swapaxes(1, 2).
        let x: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let mut shape = vec![4, 2];
        assert_eq!(apply(Step::PermuteHeads(1), x, &mut shape), [0., 1., 4., 5., 2., 3., 6., 7.]);
    }

    #[test]
    fn qkv_regroup_collects_q_then_k_then_v() {
        // Two heads of head_dim 1: rows [q0 k0 v0 q1 k1 v1] -> [q0 q1 k0 k1 v0 v1].
        let x = vec![0., 1., 2., 3., 4., 5.];
        let mut shape = vec![6];
        assert_eq!(apply(Step::RegroupQkv(2), x, &mut shape), [0., 3., 1., 4., 2., 5.]);
    }

    #[test]
    fn norms_biases_and_positions_stay_f32() {
        assert_eq!(tensor_type("blk.0.attn_norm.weight", &[64], GgufType::Q8_0), GgmlType::F32);
        assert_eq!(tensor_type("blk.0.attn_q.bias", &[64], GgufType::Q8_0), GgmlType::F32);
        assert_eq!(tensor_type("blk.0.attn_q.weight", &[64, 64], GgufType::Q8_0), GgmlType::Q8_0);
        assert_eq!(tensor_type("token_embd.weight", &[64, 256], GgufType::Bf16), GgmlType::BF16);
        // 48 values do not fill q8_0 blocks of 32: the converter falls back to f16.
        assert_eq!(tensor_type("blk.0.ffn_down.weight", &[48, 64], GgufType::Q8_0), GgmlType::F16);
    }
}
