//! llama-quantize's per-tensor type choice for `Q4_K_M` (llama.cpp's `src/llama-quant.cpp`:
//! `tensor_allows_quantization`, `llama_tensor_get_type_impl` for `LLAMA_FTYPE_MOSTLY_Q4_K_M`,
//! and `tensor_type_fallback`), as llama-quantize runs it without an imatrix or overrides.
//!
//! The choice is not per tensor alone: llama.cpp counts the attn_v-like tensors
//! (`i_attention_wv`, over `attn_v`, `attn_qkv` and `attn_kv_b` weights) and the `ffn_down`
//! tensors (`i_ffn_down`) as it visits them, and the "use more bits" layers (the first and last
//! eighth, and every third one between) are picked from those counters; `token_embd` follows
//! `output.weight`'s rule only when the model has no `output.weight` (tied embeddings). So
//! [`Mix`] is built from the whole tensor list and asked in llama.cpp's visiting order
//! ([`llama_order`]: by layer number, non-layer tensors first, then by name), which is also the
//! order llama-quantize writes the tensors in. [`q4_k_m_types`] does both steps.

use std::cmp::Ordering;

use super::GgmlType;
use crate::error::{Error, Result};

/// What llama-quantize reads from the model's metadata for the mix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MixInfo {
    /// `general.architecture` (llama.cpp's arch name: "llama", "qwen2", "gemma3", ...).
    pub arch: String,
    /// `{arch}.block_count`.
    pub n_layer: usize,
    /// `{arch}.attention.head_count`.
    pub n_head: usize,
    /// `{arch}.attention.head_count_kv` (= `n_head` without GQA).
    pub n_head_kv: usize,
    /// `{arch}.expert_count`, 0 for a dense model. 8 experts turns on llama.cpp's Mixtral rules;
    /// more than 1 takes the ffn_down layer from the tensor name.
    pub n_expert: usize,
}

impl MixInfo {
    /// llama.cpp's `LLM_TYPE_70B`, the one model size the mix looks at (attn_v gets Q5_K instead
    /// of Q4_K): an 80-layer llama with GQA (llama.cpp calls the 80-layer one without GQA 65B) or
    /// an 80-layer qwen2 (and a few arches tune does not export).
    fn is_70b(&self) -> bool {
        match self.arch.as_str() {
            "llama" => self.n_expert != 8 && self.n_layer == 80 && self.n_head != self.n_head_kv,
            "qwen2" | "deci" | "olmo" => self.n_layer == 80,
            "jais2" => self.n_layer == 68,
            _ => false,
        }
    }
}

/// llama.cpp's `tensor_category`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    AttentionQ,
    AttentionV,
    AttentionK,
    AttentionQkv,
    AttentionKvB,
    AttentionOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Output,
    Other,
}

fn category(name: &str) -> Category {
    use Category::*;
    if name == "output.weight" {
        Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        TokenEmbd
    } else if name.contains("attn_qkv.weight") {
        AttentionQkv
    } else if name.contains("attn_kv_b.weight") {
        AttentionKvB
    } else if name.contains("attn_v.weight") {
        AttentionV
    } else if name.contains("attn_k.weight") {
        AttentionK
    } else if name.contains("attn_q.weight") {
        AttentionQ
    } else if name.contains("attn_output.weight") {
        AttentionOutput
    } else if name.contains("ffn_up") {
        FfnUp
    } else if name.contains("ffn_gate") {
        FfnGate
    } else if name.contains("ffn_down") {
        FfnDown
    } else {
        Other
    }
}

fn is_attn_v(c: Category) -> bool {
    matches!(c, Category::AttentionV | Category::AttentionQkv | Category::AttentionKvB)
}

/// ggml's `ggml_n_dims`: trailing dimensions of size 1 do not count, so a `[n, 1]` tensor is 1-D.
pub fn ggml_n_dims(ne: &[u64]) -> usize {
    ne.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1)
}

/// llama.cpp's `tensor_allows_quantization` for a plain llama-quantize run: 2-D (or 3-D) tensors
/// whose name ends in `weight`, except norms, positional and token-type embeddings, MoE routers
/// and a few small arch-specific ones. Everything else is copied in its source type.
pub fn allows_quantization(name: &str, ne: &[u64]) -> bool {
    if ggml_n_dims(ne) < 2 || !name.ends_with("weight") {
        return false;
    }
    const SKIP: &[&str] = &[
        "_norm.weight",
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
        "time_mix_first.weight",
        "time_mix_w0.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_v0.weight",
        "time_mix_v1.weight",
        "time_mix_v2.weight",
        "time_mix_a0.weight",
        "time_mix_a1.weight",
        "time_mix_a2.weight",
        "time_mix_g1.weight",
        "time_mix_g2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
        "attn_rel_b.weight",
        ".position_embd",
        "sam.pos_embd",
        "sam.neck.",
        "sam.net_",
        ".rel_pos",
        ".patch_embd",
        ".patch_merger",
        "a.rvq.codebook",
        "mm.a.code_embd",
    ];
    name != "position_embd.weight" && name != "token_types.weight" && !SKIP.iter().any(|s| name.contains(s))
}

/// The layer of a `blk.N.` name as llama.cpp reads it (`sscanf(name, "blk.%d.", ..)`), -1 for
/// the others.
fn layer_of(name: &str) -> Option<i64> {
    let rest = name.strip_prefix("blk.")?.trim_start();
    let (sign, digits) = match rest.as_bytes().first() {
        Some(b'-') => (-1, &rest[1..]),
        Some(b'+') => (1, &rest[1..]),
        _ => (1, rest),
    };
    let end = digits.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse::<i64>().ok().map(|v| sign * v)
}

/// llama.cpp's `weight_name_comparer`, the order of its `weights_map` and so the order
/// llama-quantize visits and writes tensors in: by layer (`blk.N.`, the others as layer -1),
/// then by name, bytewise.
pub fn llama_cmp(a: &str, b: &str) -> Ordering {
    let la = layer_of(a).unwrap_or(-1);
    let lb = layer_of(b).unwrap_or(-1);
    la.cmp(&lb).then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

/// Indices of `names` in llama.cpp's visiting order ([`llama_cmp`]).
pub fn llama_order<S: AsRef<str>>(names: &[S]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..names.len()).collect();
    idx.sort_by(|&i, &j| llama_cmp(names[i].as_ref(), names[j].as_ref()));
    idx
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third layer
/// in between.
fn use_more_bits(i_layer: i64, n_layers: i64) -> bool {
    i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2
}

/// llama.cpp's `tensor_type_fallback`: a type whose block does not divide the row length is
/// replaced by a 32-block one (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and by F16 when even
/// that does not divide it.
pub fn fallback(t: GgmlType, ncols: u64) -> GgmlType {
    if ncols.is_multiple_of(t.block_size() as u64) {
        return t;
    }
    let r = match t {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if !ncols.is_multiple_of(r.block_size() as u64) {
        GgmlType::F16
    } else {
        r
    }
}

/// llama-quantize's Q4_K_M type choice over one model, with its visiting counters.
#[derive(Debug, Clone)]
pub struct Mix {
    info: MixInfo,
    n_attention_wv: i64,
    tied_embeddings: bool,
    i_attention_wv: i64,
    i_ffn_down: i64,
}

impl Mix {
    /// `names`: every tensor in the model (llama.cpp counts the attn_v-like ones and looks for
    /// `output.weight` over all of them, before choosing any type).
    pub fn new<S: AsRef<str>>(info: &MixInfo, names: &[S]) -> Mix {
        let names = names.iter().map(|s| s.as_ref());
        let (mut n_attention_wv, mut tied_embeddings) = (0, true);
        for n in names {
            let c = category(n);
            if is_attn_v(c) {
                n_attention_wv += 1;
            }
            if c == Category::Output {
                tied_embeddings = false;
            }
        }
        Mix { info: info.clone(), n_attention_wv, tied_embeddings, i_attention_wv: 0, i_ffn_down: 0 }
    }

    /// The type llama-quantize Q4_K_M gives tensor `name` of ggml dims `ne` (row length first),
    /// after the fallback for row lengths the chosen type's block does not divide; `None` for a
    /// tensor it copies unchanged (see [`allows_quantization`]). Call it for every tensor, in
    /// [`llama_order`]: the attn_v and ffn_down counters advance as llama.cpp's do.
    pub fn choose(&mut self, name: &str, ne: &[u64]) -> Result<Option<GgmlType>> {
        if !allows_quantization(name, ne) {
            return Ok(None);
        }
        let info = &self.info;
        let falcon = info.arch == "falcon";
        let cat = category(name);
        let mut t = GgmlType::Q4_K;
        if cat == Category::Output || (self.tied_embeddings && cat == Category::TokenEmbd) {
            // Q6_K unless the row does not split into 256-blocks (Q8_0 then, not Q6_K's fallback).
            t = if falcon || !ne[0].is_multiple_of(256) { GgmlType::Q8_0 } else { GgmlType::Q6_K };
        } else if cat == Category::TokenEmbd {
            // An untied token_embd stays at the default type.
        } else if is_attn_v(cat) {
            // attn_qkv lands here too: this branch comes first in llama.cpp, which leaves its
            // own attn_qkv rule (Q5_K for Q4_K_M) unreachable.
            if use_more_bits(self.i_attention_wv, self.n_attention_wv) {
                t = GgmlType::Q6_K;
            }
            if info.is_70b() && t == GgmlType::Q4_K {
                t = GgmlType::Q5_K;
            }
            if info.n_expert == 8 {
                t = GgmlType::Q8_0;
            }
            self.i_attention_wv += 1;
        } else if cat == Category::AttentionK {
            if info.n_expert == 8 {
                t = GgmlType::Q8_0;
            }
        } else if cat == Category::FfnDown {
            let n_layer = info.n_layer as i64;
            let i_layer = if info.n_expert > 1 {
                match layer_of(name) {
                    Some(l) if (0..n_layer).contains(&l) => l,
                    _ => {
                        return Err(Error::Unsupported(format!(
                            "q4_k_m: tensor {name}: no layer in [0, {n_layer}) in its name (llama.cpp needs one for MoE ffn_down)"
                        )))
                    }
                }
            } else {
                self.i_ffn_down
            };
            if falcon {
                t = if i_layer < n_layer / 16 {
                    GgmlType::Q6_K
                } else if use_more_bits(i_layer, n_layer) {
                    GgmlType::Q5_K
                } else {
                    GgmlType::Q4_K
                };
            } else if use_more_bits(i_layer, n_layer) {
                t = GgmlType::Q6_K;
            }
            self.i_ffn_down += 1;
        } else if cat == Category::AttentionOutput && !falcon && info.n_expert == 8 {
            t = GgmlType::Q5_K;
        }
        Ok(Some(fallback(t, ne[0])))
    }
}

/// The Q4_K_M type of every tensor of a model (`None`: copied in its source type), in the order
/// given; `tensors` are (llama.cpp name, ggml dims) in any order.
pub fn q4_k_m_types<S: AsRef<str>>(info: &MixInfo, tensors: &[(S, Vec<u64>)]) -> Result<Vec<Option<GgmlType>>> {
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_ref()).collect();
    let mut mix = Mix::new(info, &names);
    let mut out = vec![None; tensors.len()];
    for i in llama_order(&names) {
        out[i] = mix.choose(names[i], &tensors[i].1)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_by_layer_then_name() {
        let names = ["blk.10.attn_v.weight", "output.weight", "blk.2.ffn_down.weight", "blk.2.attn_k.weight", "token_embd.weight"];
        let sorted: Vec<&str> = llama_order(&names).into_iter().map(|i| names[i]).collect();
        assert_eq!(sorted, ["output.weight", "token_embd.weight", "blk.2.attn_k.weight", "blk.2.ffn_down.weight", "blk.10.attn_v.weight"]);
    }

    /// use_more_bits for 30 layers by hand: n/8 = 3, 7n/8 = 26, then (i - 3) % 3 == 2.
    #[test]
    fn more_bits_layers() {
        let layers: Vec<i64> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(layers, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    }
}
